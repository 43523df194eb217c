"""Shared test configuration: array backends and the CUDA skip.

Tests marked ``cuda`` run only where torch sees a CUDA device; everywhere else they are
skipped with a reason, so the suite passes on machines without a GPU (CI has none).
"""

from __future__ import annotations

import numpy as np
import pytest

try:
    import torch
except ImportError:  # the refimpl tests run without torch; torch tests skip
    torch = None

HAS_CUDA = torch is not None and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none available)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("torch-cpu", id="torch-cpu"),
    pytest.param("torch-cuda", id="torch-cuda", marks=pytest.mark.cuda),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """A function converting a float64 numpy array to the backend's array (keeping float64)."""
    name = request.param
    if name == "numpy":
        return lambda a: np.asarray(a, dtype=np.float64)
    if torch is None:
        pytest.skip("torch is not installed")
    device = "cuda" if name == "torch-cuda" else "cpu"
    return lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), device=device)


@pytest.fixture
def one_thread():
    """Run torch on one thread: the case models are tiny, so one thread is faster and immune to other load."""
    if torch is None:
        pytest.skip("torch is not installed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
