"""``python -m adapters.export`` (``bnfold export``): fold a saved ExportedProgram, verify one, audit a folder.

    python -m adapters.export fuse model.pt2 -o folded.pt2 [--json]
    python -m adapters.export verify model.pt2 folded.pt2 [--input-shape 1,3,224,224]
    python -m adapters.export audit [MODULE:FUNCTION] [--ir training,inference] [--select NAME ...]
                                    [--json | --markdown | --peers]
    python -m adapters.export zoo [--models NAME ...]

``verify`` runs both programs on the example inputs saved with the original program, or on
random inputs of ``--input-shape`` (one per positional argument). Bad input ends with one line
on stderr and exit status 2; an audit in which the folder broke a model exits with 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


class _Usage(Exception):
    """Bad input: reported as one line, exit status 2."""


def _load(path: str) -> Any:
    import torch

    if not Path(path).is_file():
        raise _Usage(f"no such file: {path}")
    # torch.export.load logs a traceback for a file it cannot read before it raises; the error line is enough.
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(path)
    except Exception as error:  # noqa: BLE001 -- any unreadable file is the user's input
        from ..audit import one_line
        raise _Usage(f"cannot load {path} as a torch.export program: {one_line(error)}") from error
    finally:
        logger.setLevel(level)


def _inputs(program: Any, shapes: list[str]) -> tuple:
    import torch

    if shapes:
        try:
            dims = [tuple(int(d) for d in shape.split(",")) for shape in shapes]
        except ValueError as error:
            raise _Usage(f"--input-shape takes comma-separated integers, e.g. 1,3,224,224; got {shapes}") from error
        generator = torch.Generator().manual_seed(0)
        return tuple(torch.randn(d, generator=generator) for d in dims)
    saved = program.example_inputs
    if not saved or not saved[0]:
        raise _Usage("the program was saved without example inputs; pass --input-shape (one per argument)")
    if saved[1]:
        raise _Usage("the program's example inputs include keyword arguments, which verify does not pass; "
                     "pass --input-shape")
    return tuple(saved[0])


def _fuse(args: argparse.Namespace) -> int:
    import torch

    from .fusion import fuse

    program = _load(args.program)
    if not isinstance(program, torch.export.ExportedProgram):
        raise _Usage(f"{args.program} holds a {type(program).__name__}, not an ExportedProgram")
    try:
        folded, report = fuse(program)
    except (ValueError, TypeError) as error:
        raise _Usage(str(error)) from error
    if args.output:
        assert isinstance(folded, torch.export.ExportedProgram)  # fuse returns the kind it was given
        torch.export.save(folded, args.output)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .checking import verify

    original, folded = _load(args.original), _load(args.folded)
    inputs = _inputs(original, args.input_shape)
    from ..verdict import ModelRunError
    try:
        verdict = verify(original, folded, inputs)
    except (ModelRunError, ValueError, TypeError) as error:
        raise _Usage(str(error)) from error
    print(json.dumps(verdict.to_dict(), indent=2) if args.json else verdict)
    return 0 if verdict.ok else 1


def _audit(args: argparse.Namespace) -> int:
    from ..audit import AuditProgress, exit_code, format_header, format_result, format_summary, load_object
    from ..audit import markdown_table as table
    from .suite.audit import audit_targets, run_audit

    try:
        targets = audit_targets([ir.strip() for ir in args.ir.split(",") if ir.strip()], args.select)
        if args.peers:
            from .suite.peers import available
            fusers = {name: spec for name, spec in available().items() if name != "Inductor freezing"}
        else:
            fusers = {args.fuser: args.fuser}
        passes = {name: load_object(spec, "the folder") for name, spec in fusers.items()}
    except ValueError as error:
        raise _Usage(str(error)) from error
    runs: dict[str, Sequence[Any]] = {}
    for name, fold_pass in passes.items():
        progress = AuditProgress(targets, sys.stderr) if args.progress else None
        runs[name] = run_audit(fold_pass, targets, None if progress is None else progress.update)
        if progress is not None:
            progress.clear()
    if args.peers:
        print(table(runs))
        for name, results in runs.items():
            print(f"\n{format_summary(results, name)}")
        return exit_code(runs[next(iter(runs))])
    results = runs[args.fuser]
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    elif args.markdown:
        print(table({args.fuser: results}))
    else:
        print(format_header())
        for outcome in results:
            print(format_result(outcome))
        print(format_summary(results, args.fuser))
    return exit_code(results)


def _zoo(args: argparse.Namespace) -> int:
    from .suite.zoo import ZOO, compare

    names = args.models or list(ZOO)
    unknown = [name for name in names if name not in ZOO]
    if unknown:
        raise _Usage(f"unknown zoo model(s) {unknown}; known: {', '.join(ZOO)}")
    print("| model | norms | folded (export / module adapter) | bit-identical | verify | ratio | fold CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    failed = False
    for name in names:
        result = compare(name)
        failed |= not (result.identical and result.ok)
        print(f"| {name} | {result.norms} | {result.folded} / {result.module_folded} | "
              f"{'yes' if result.identical else 'NO: ' + ', '.join(result.mismatched[:3])} | "
              f"{'ok' if result.ok else 'WRONG'} | {result.ratio:.3g} | {result.seconds:.3f} |", flush=True)
    return int(failed)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Fold BatchNorm in torch.export programs (.pt2), verify "
                                                            "a folded program, audit a folder over the case suite.")
    commands = parser.add_subparsers(dest="command", required=True)
    fuse = commands.add_parser("fuse", help="fold a saved ExportedProgram")
    fuse.add_argument("program", help="a .pt2 file written by torch.export.save")
    fuse.add_argument("-o", "--output", help="where to save the folded program (.pt2)")
    fuse.add_argument("--json", action="store_true", help="print the report as JSON")
    verify = commands.add_parser("verify", help="check a folded program against the float64 reference")
    verify.add_argument("original")
    verify.add_argument("folded")
    verify.add_argument("--input-shape", action="append", default=[],
                        help="shape of one positional input, e.g. 1,3,224,224 (repeat per argument); default: the "
                             "example inputs saved with the original")
    verify.add_argument("--json", action="store_true")
    audit = commands.add_parser("audit", help="run a folder MODULE:FUNCTION over the export case suite")
    audit.add_argument("fuser", nargs="?", default="adapters.export.suite.peers:bnfold")
    audit.add_argument("--ir", default="training,inference", help="comma-separated IRs: training, inference, edge, fx")
    audit.add_argument("--select", nargs="*", default=[], help="case names or families")
    audit.add_argument("--progress", action="store_true", help="progress lines on stderr")
    audit.add_argument("--peers", action="store_true",
                       help="run bnfold and every peer that imports here (Inductor apart: name it as the folder) and "
                            "print one markdown table; the exit status is bnfold's")
    zoo = commands.add_parser("zoo", help="fold exported torchvision/timm networks; compare with the module adapter")
    zoo.add_argument("--models", nargs="*", default=[], help="zoo names (default: all)")
    output = audit.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true")
    output.add_argument("--markdown", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m adapters.export") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print(f"error: {prog} needs torch: pip install 'bnfold[torch]'", file=sys.stderr)
        return 2
    job = {"fuse": _fuse, "verify": _verify, "audit": _audit, "zoo": _zoo}[args.command]
    try:
        return job(args)
    except _Usage as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from ..cli_runner import run

    run(lambda: main())
