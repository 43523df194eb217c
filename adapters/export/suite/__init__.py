"""The export adapter's case suite, its audit over any folder, and the peers it is compared with."""
