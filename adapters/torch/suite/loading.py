"""Loading what the command line names, with one clear line for everything that can go wrong.

- :func:`load_callable`: ``package.module:factory`` (imported) or ``path/to/file.py:factory``
  (run from its file, whose folder then goes on ``sys.path`` so that it can import its
  neighbours and a saved model of its classes loads again);
- :func:`call_factory`: the factory called, its exception reported with its type and where;
- :func:`load_checkpoint`: a ``state_dict`` read with ``torch.load(weights_only=True)``;
- :func:`load_whole_model`: a whole pickled ``nn.Module`` (``torch.save(module)``, what ``-o`` writes).

Every failure is a :class:`ValueError` (or :class:`TypeError` for a wrong kind of object) whose
message names the argument, the file and the cause; the command line prints it as one line.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .audit import load_object

__all__ = ["load_callable", "call_factory", "load_checkpoint", "load_whole_model", "raised_where"]


def raised_where(error: BaseException) -> str:
    """``file:line in function`` of the innermost frame that raised ``error``."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "unknown location"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _is_file_spec(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def _import_file(path: Path, what: str, spec: str) -> ModuleType:
    if not path.is_file():
        raise ValueError(f"{what} {spec!r}: {str(path)!r} is not a file (relative paths start at the working "
                         f"directory {os.getcwd()})")
    path = path.resolve()
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == path:
            return loaded
        raise ValueError(f"{what} {spec!r}: a module named {name!r} is already imported (from "
                         f"{getattr(loaded, '__file__', 'a built-in')}); rename {path.name}")
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{what} {spec!r}: {str(path)!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # Its folder on sys.path: the file may import its neighbours, and a model saved with -o pickles
    # its classes as `<file stem>.<class>`, which must import again when the model is loaded.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ValueError(f"{what} {spec!r}: importing {path} raised {_first_line(error)} "
                         f"(at {raised_where(error)})") from error
    return module


def _working_directory_hint(module_name: str, error: BaseException) -> str:
    cause = error.__cause__
    missing = getattr(cause, "name", None) if isinstance(cause, ModuleNotFoundError) else None
    if missing is None or module_name.split(".")[0] != missing.split(".")[0]:
        return ""
    file_hint = module_name.replace(".", "/") + ".py"
    return (f"; modules are looked up from the working directory {os.getcwd()} and sys.path: run from the folder "
            f"that holds {file_hint}, or name the file: --model path/to/{file_hint}:FACTORY")


def load_callable(spec: str, what: str = "--model") -> Callable[..., Any]:
    """The callable named by ``package.module:attribute`` or ``path/to/file.py:attribute``."""
    module_part, sep, attribute = spec.rpartition(":")
    if sep and module_part and attribute and _is_file_spec(module_part):
        target: Any = _import_file(Path(module_part), what, spec)
        for part in attribute.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise ValueError(f"{what} {spec!r}: {module_part} has no attribute {attribute!r}") from None
    else:
        try:
            target = load_object(spec, what)
        except ValueError as error:
            raise ValueError(f"{error}{_working_directory_hint(spec.partition(':')[0], error)}") from error
    if not callable(target):
        raise TypeError(f"{what} {spec!r} is a {type(target).__name__}, not a callable")
    return target


def call_factory(factory: Callable[[], Any], spec: str, what: str = "--model") -> nn.Module:
    """``factory()``, which must return an ``nn.Module``; whatever it raises becomes one line."""
    try:
        model = factory()
    except Exception as error:
        raise ValueError(f"{what} {spec!r}: the factory raised {_first_line(error)} "
                         f"(at {raised_where(error)})") from error
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load_checkpoint(path: str) -> Mapping[str, Any]:
    """The ``state_dict`` in ``path`` (or under its ``"state_dict"`` / ``"model"`` key), read safely."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise ValueError(f"--checkpoint {path!r}: {error.strerror or error}") from None
    except Exception as error:
        if "Unsupported global" in str(error):
            raise ValueError(f"--checkpoint {path!r} holds pickled Python objects (a whole model saved with "
                             "torch.save(model), as -o writes?), not a state_dict of tensors; it is not loaded "
                             "because unpickling runs code. Save torch.save(model.state_dict(), PATH) instead, or "
                             "check a whole fused model with `verify --fused PATH`") from None
        raise ValueError(f"--checkpoint {path!r} is not a readable torch.save file ({_first_line(error)}); "
                         "is it corrupt or truncated?") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise TypeError(f"--checkpoint {path!r} holds a {type(state).__name__}, not a state_dict")
    return state


def load_whole_model(path: str, device: torch.device | str, what: str = "--fused") -> nn.Module:
    """A whole ``nn.Module`` saved with ``torch.save(module, path)``. Unpickling runs code: trusted files only."""
    try:
        model = torch.load(path, map_location=device, weights_only=False)
    except OSError as error:
        raise ValueError(f"{what} {path!r}: {error.strerror or error}") from None
    except (ModuleNotFoundError, AttributeError) as error:
        raise ValueError(f"{what} {path!r} pickles a class that cannot be imported here ({_first_line(error)}); "
                         "run from the folder the model's code was imported from") from None
    except Exception as error:
        raise ValueError(f"{what} {path!r} is not a readable torch.save file ({_first_line(error)}); "
                         "is it corrupt or truncated?") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} {path!r} holds a {type(model).__name__}, not a whole nn.Module "
                        f"(save the fused model with torch.save(module, FILE), not its state_dict)")
    return model
