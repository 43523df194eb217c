"""``bnfold``: the console script, one command for ``python -m adapters.torch``, ``python -m adapters.onnx``
and ``python -m refimpl``.

Each subcommand hands its arguments unchanged to the module it names, so ``bnfold fuse ...``
is ``python -m adapters.torch ...``, ``bnfold onnx verify ...`` is ``python -m adapters.onnx verify ...``
and ``bnfold check ...`` is ``python -m refimpl check ...``. torch (onnx) is imported only by the
subcommands that need it: ``bnfold check`` runs where only numpy is installed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .cli_runner import run

PROG = "bnfold"

#: subcommand -> (the ``python -m`` form it runs, what it does)
COMMANDS = {
    "fuse": ("python -m adapters.torch", "fuse, verify and time the built-in models, or --model yours (torch)"),
    "verify": ("python -m adapters.torch verify", "check a fused model against the float64 reference (torch)"),
    "audit": ("python -m adapters.torch audit", "run a fuser MODULE:FUNCTION over the case suite and the zoo "
                                                "(torch)"),
    "onnx": ("python -m adapters.onnx", "fold BatchNormalization in an ONNX file; 'onnx verify', 'onnx audit' "
                                        "(onnx, no torch)"),
    "export": ("python -m adapters.export", "fold BatchNorm in a torch.export program (.pt2); 'export verify', "
                                            "'export audit' (torch)"),
    "vectors": ("python -m refimpl vectors", "write the conformance vectors"),
    "check": ("python -m refimpl check", "judge an implementation's results file against the conformance vectors"),
    "results": ("python -m refimpl results", "write refimpl's own results file (a working example)"),
    "self-check": ("python -m refimpl", "self-check of the reference implementation"),
}

_TORCH_COMMANDS = ("fuse", "verify", "audit")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [ARGS ...]", "", "BatchNorm folding: the reference implementation and the "
             "adapters' tools.", "", "commands (each has its own --help):"]
    lines += [f"  {name:<{width}}  {what}  [{module}]" for name, (module, what) in COMMANDS.items()]
    lines += ["", "examples:", f"  {PROG} fuse",
              f"  {PROG} fuse --model path/to/mynet.py:build --input-shape 1,3,224,224 -o fused.pt",
              f"  {PROG} verify --model path/to/mynet.py:build --input-shape 1,3,224,224 --fused fused.pt",
              f"  {PROG} onnx model.onnx -o folded.onnx && {PROG} onnx verify model.onnx folded.onnx",
              f"  {PROG} check RESULTS.json      # against the conformance vectors shipped with the package"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"{PROG}: unknown command {command!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # `python -m` puts the working directory on sys.path; a console script does not. Do the same, so
    # that `bnfold fuse --model mynet:build` finds mynet.py where `python -m adapters.torch` would.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if command in _TORCH_COMMANDS:
        try:
            import torch  # noqa: F401
        except ImportError:
            print(f"error: {PROG} {command} needs torch: pip install 'bnfold[torch]'", file=sys.stderr)
            return 2
        from .torch.__main__ import audit_job, main_job, verify_job

        job = {"fuse": main_job, "verify": verify_job, "audit": audit_job}[command]
        return job(rest, f"{PROG} {command}")
    if command == "export":
        from .export.__main__ import main as export_main

        return export_main(rest, f"{PROG} export")
    if command == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            print(f"error: {PROG} onnx needs onnx and onnxruntime: pip install 'bnfold[onnx]'", file=sys.stderr)
            return 2
        from .onnx.__main__ import main as onnx_main

        return onnx_main(rest, f"{PROG} onnx")

    from refimpl.__main__ import main as refimpl_main

    if command == "self-check":
        if rest:
            print(f"{PROG} self-check takes no arguments, got {' '.join(rest)}", file=sys.stderr)
            return 2
        return refimpl_main([], prog=f"{PROG} self-check")
    return refimpl_main([command, *rest], prog=PROG)


def console() -> NoReturn:
    """The ``bnfold`` console script."""
    run(main)


if __name__ == "__main__":
    console()
