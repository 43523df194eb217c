"""Shared test configuration: array backends and the CUDA skip.

The refimpl array functions (``refimpl.fold``, ``refimpl.merge``) are tested on every namespace in ``BACKENDS``
(as array-api-extra's ``xp`` fixture does): their test modules patch the functions under test through
``run_on_backend``, so each test, written once with numpy inputs and numpy oracles, runs on numpy, torch (CPU,
and CUDA where present) and array_api_strict. ``refimpl.ops``, ``rounding``, ``tolerance`` and the conformance
vectors are float64 numpy by design and run on numpy only.

Tests marked ``cuda`` run only where torch sees a CUDA device; everywhere else they are
skipped with a reason, so the suite passes on machines without a GPU (CI has none).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

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


#: Every array namespace refimpl's array functions (refimpl.fold, refimpl.merge) claim to run on. numpy is the
#: reference; array_api_strict is the strict check (no numpy-only behaviour slips through: no implicit casts, no
#: methods beyond the standard); torch on CUDA runs only where a device is present.
BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("torch-cpu", id="torch-cpu"),
    pytest.param("torch-cuda", id="torch-cuda", marks=pytest.mark.cuda),
    pytest.param("array-api-strict", id="array-api-strict"),
]


@dataclass(frozen=True)
class Backend:
    """An array namespace: ``backend(a)`` converts a numpy array to it (same dtype and shape), ``run(f)`` wraps a
    refimpl array function so that a test written with numpy arrays calls it on this namespace."""

    name: str
    convert: Callable[[np.ndarray], Any]
    array_type: type
    device: Any = None

    def __call__(self, a: Any) -> Any:
        return self.convert(np.asarray(a))

    def to_numpy(self, x: Any) -> np.ndarray:
        """A result back in numpy, after checking that it stayed in this namespace, on this device."""
        assert isinstance(x, self.array_type), f"{self.name}: a result is a {type(x).__name__}"
        if self.device is not None:
            assert x.device == self.device, f"{self.name}: a result is on {x.device}, its inputs on {self.device}"
        if torch is not None and isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
        return np.from_dlpack(x) if not isinstance(x, np.ndarray) else x

    def _inputs(self, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return self(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self._inputs(v) for v in value)
        if is_dataclass(value) and not isinstance(value, type):
            return replace(value, **{f.name: self._inputs(getattr(value, f.name)) for f in fields(value)
                                     if f.init})
        return value

    def _outputs(self, value: Any) -> Any:
        if isinstance(value, self.array_type):
            return self.to_numpy(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self._outputs(v) for v in value)
        if is_dataclass(value) and not isinstance(value, type):
            return replace(value, **{f.name: self._outputs(getattr(value, f.name)) for f in fields(value)
                                     if f.init})
        return value

    def run(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` with its numpy array arguments (also inside lists, tuples and dataclasses such as
        refimpl.Kernel) converted to this namespace, and its array results converted back to numpy."""
        @functools.wraps(function)
        def on_backend(*args: Any, **kwargs: Any) -> Any:
            return self._outputs(function(*self._inputs(args), **{k: self._inputs(v) for k, v in kwargs.items()}))
        return on_backend


def make_backend(name: str) -> Backend:
    if name == "numpy":
        return Backend(name, lambda a: a, np.ndarray)
    if name == "array-api-strict":
        strict = pytest.importorskip("array_api_strict")  # the 'test' extra installs it
        return Backend(name, strict.asarray, type(strict.asarray(0.0)))
    if torch is None:
        pytest.skip("torch is not installed")
    device = torch.device("cuda" if name == "torch-cuda" else "cpu")
    # torch.as_tensor keeps the dtype; .to(device) copies to the GPU (the numpy buffer is never shared there).
    return Backend(name, lambda a: torch.as_tensor(a).to(device), torch.Tensor, device)


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    """Each array backend in turn (see BACKENDS)."""
    return make_backend(request.param)


def run_on_backend(backend: Backend, monkeypatch: pytest.MonkeyPatch, module: Any, names: Sequence[str]) -> None:
    """Make the test module's refimpl array functions ``names`` run on ``backend`` for one test: the test's own
    numpy inputs and numpy oracles stay as they are, the function under test sees the backend's arrays, and every
    array it returns must be of the backend (checked on the way back)."""
    for name in names:
        monkeypatch.setattr(module, name, backend.run(getattr(module, name)))


@pytest.fixture
def one_thread():
    """Run torch on one thread: the case models are tiny, so one thread is faster and immune to other load."""
    if torch is None:
        pytest.skip("torch is not installed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
