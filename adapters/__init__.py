"""Framework adapters: apply the reference fold math to real models (``adapters.torch``)."""
