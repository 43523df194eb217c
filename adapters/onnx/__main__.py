"""Command line: ``python -m adapters.onnx MODEL.onnx -o FOLDED.onnx``, ``... verify ...``, ``... audit ...``.

Run with ``--help`` (or ``verify --help``, ``audit --help``) for the full description.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "python -m adapters.onnx"

_MAIN_DESCRIPTION = """\
Fold the BatchNormalization nodes of an ONNX model into neighbouring Conv / ConvTranspose / Gemm /
MatMul nodes (in float64, rounded once to each initializer's dtype), write the folded model to -o
and print the report: every folded pair, and every BatchNormalization left with its reason code.

Bad input -- an unreadable file, a model that fails onnx.checker.check_model(full_check=True), an
opset this tool does not support, an output path that cannot be written -- is reported on one line
with exit status 2, before any work is done, and nothing is written. With --verify the folded model
is also judged against the float64 reference of the original (exit status 1 if it fails).
"""

_MAIN_EPILOG = """\
subcommands (each has its own --help):
  verify   check a folded ONNX model (from any tool) against the float64 reference of the original
  audit    run a third-party pass MODULE:FUNCTION (ModelProto -> ModelProto) over the ONNX case suite

examples:
  python -m adapters.onnx model.onnx -o folded.onnx
  python -m adapters.onnx model.onnx -o folded.onnx --json --verify
  python -m adapters.onnx verify model.onnx folded.onnx --input-shape input=1,3,224,224
  python -m adapters.onnx audit adapters.onnx.suite.peers:onnxoptimizer_fuse_bn
"""

_VERIFY_DESCRIPTION = """\
Check a folded ONNX model against the float64 reference run of the original: the original graph
with every floating-point type made float64, run by onnx's reference evaluator; both models in
their own dtype run by onnxruntime with graph optimizations disabled. The folded model passes when
its relative RMS error is within 4x the original's own error in the same dtype (or that of the
original with every parameter rounded once more), for every output and for every intermediate value
the two graphs share by name and folding leaves unchanged; the first diverging value is named.

Inputs are seeded random (standard normal floats). Dynamic dims (named, unknown or negative, as
PaddlePaddle writes them) take --input-shape, else the smallest candidate size (the graph's own size
constants, then 8, 16, 32, 64, 224, 320, 640) on which the original graph's outputs are finite and not
constant; without one, verify refuses and names the inputs. Exit status 0 when the folded model
passes, 1 when it fails (or cannot run), 2 for bad input.
"""

_AUDIT_DESCRIPTION = """\
Run one or more third-party passes, each a function ModelProto -> ModelProto given as
MODULE:FUNCTION, over the ONNX case suite (adapters/onnx/suite/cases/; with --zoo also the ONNX
exports of the model zoo, which need torch and torchvision) and give each model one status:

  ok       the output is right and every foldable BatchNormalization was folded
  missed   the output is right but foldable BatchNormalization nodes are left
  WRONG    the output breaks the error model (the first diverging value is named)
  CRASH    the pass raised or returned no ModelProto, or its model raised when run
  INVALID  the returned model fails onnx.checker.check_model(full_check=True) or onnxruntime
           cannot load it

Exit status 0 when no model is WRONG, CRASH or INVALID, 1 otherwise, 2 for bad arguments.
"""

_AUDIT_EPILOG = """\
examples:
  python -m adapters.onnx audit adapters.onnx:fuse_bn
  python -m adapters.onnx audit adapters.onnx.suite.peers:onnxoptimizer_fuse_bn --select trap
  python -m adapters.onnx audit adapters.onnx:fuse_bn adapters.onnx.suite.peers:onnxsim_simplify --markdown
"""

class BadInput(Exception):
    """Bad input: reported on one line, exit status 2, nothing written."""


def _fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _readable_model(path_text: str, what: str) -> Any:
    """Load and check the model at ``path_text``; BadInput naming the file if it cannot be used."""
    import onnx

    from .graph import MIN_OPSET

    path = Path(path_text)
    if not path.exists():
        raise BadInput(f"{what} {path_text}: no such file")
    if path.is_dir():
        raise BadInput(f"{what} {path_text} is a directory, not an ONNX file")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise BadInput(f"cannot read {what} {path_text}: {error.strerror or error}") from error
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf DecodeError, missing external data, ...
        raise BadInput(f"{what} {path_text} is not a readable ONNX model: {type(error).__name__}: {error}") from error
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        raise BadInput(f"{what} {path_text} imports no ai.onnx opset: unsupported")
    if opset < MIN_OPSET:
        raise BadInput(f"{what} {path_text} uses opset {opset}: unsupported (opset {MIN_OPSET} to {newest} are)")
    if opset > newest:
        raise BadInput(f"{what} {path_text} uses opset {opset}, newer than the installed onnx {onnx.__version__} "
                       f"knows ({newest}): unsupported")
    try:
        if _has_negative_dims(model):
            # PaddlePaddle writes -1 for a dynamic dim, which onnx's shape inference would compute with: check the
            # weightless skeleton, whose negative dims are left unknown.
            from .graph import skeleton

            onnx.checker.check_model(skeleton(model, {t.name: t for t in model.graph.initializer}), full_check=True)
        else:
            onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # ValidationError, InferenceError
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInput(f"{what} {path_text} is not a valid ONNX model (onnx.checker): {first}") from error
    return model


def _has_negative_dims(model: Any) -> bool:
    graph = model.graph
    return any(d.HasField("dim_value") and d.dim_value < 0 for info in (*graph.input, *graph.output, *graph.value_info)
               if info.type.HasField("tensor_type") for d in info.type.tensor_type.shape.dim)


def _writable_output(path_text: str, source: str) -> Path:
    path = Path(path_text)
    if path.is_dir():
        raise BadInput(f"output {path_text} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(f"cannot write output {path_text}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BadInput(f"cannot write output {path_text}: permission denied")
    if path.exists() and Path(source).exists() and path.resolve() == Path(source).resolve():
        raise BadInput(f"output {path_text} is the input model: write the folded model elsewhere")
    return path


def _save(model: Any, path: Path) -> None:
    """Write ``model`` to ``path`` (with external data next to it above 2 GB), replacing it only when complete."""
    import onnx

    large = model.ByteSize() > 1_800_000_000
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        if large:
            onnx.save_model(model, temporary, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data")
        else:
            onnx.save_model(model, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fold_main(argv: Sequence[str], prog: str = PROG) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=_MAIN_DESCRIPTION,
                                     epilog=_MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to fold")
    parser.add_argument("-o", "--output", required=True, metavar="FOLDED.onnx", help="where to write the folded model")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--verify", action="store_true",
                        help="also judge the folded model against the float64 reference of the original")
    parser.add_argument("--input-shape", action="append", default=[], metavar="[NAME=]D0,D1,...",
                        help="with --verify: shape of a graph input's generated feed (repeat for several inputs)")
    args = parser.parse_args(argv)
    try:
        output = _writable_output(args.output, args.model)
        model = _readable_model(args.model, "model")
        shapes = _parse_shapes(args.input_shape, model)
    except BadInput as error:
        return _fail(str(error))
    if shapes and not args.verify:
        return _fail("--input-shape is for --verify (the fold itself needs no inputs)")

    from . import fuse

    try:
        folded, report = fuse(model)
    except (ValueError, TypeError) as error:  # bad input the folder names (node, shapes, values)
        return _fail(f"cannot fold {args.model}: {error}")
    verdict = None
    if args.verify:
        from .checking import ModelRunError, verify

        try:
            verdict = verify(model, folded, input_shapes=shapes)
        except (ModelRunError, ValueError) as error:
            return _fail(f"cannot verify {args.model}: {error}")
    try:
        _save(folded, output)
    except OSError as error:
        return _fail(f"cannot write output {args.output}: {error.strerror or error}")
    if args.json:
        data: dict[str, Any] = {"model": args.model, "output": str(output), "report": report.to_dict()}
        if verdict is not None:
            data["verify"] = verdict.to_dict()
        print(json.dumps(data, indent=2, default=str))
    else:
        print(report.table())
        if verdict is not None:
            print(verdict)
        print(f"wrote {output}")
    return 0 if verdict is None or verdict.ok else 1


def _parse_shapes(specs: Sequence[str], model: Any) -> dict[str, list[int]]:
    """``NAME=1,3,224,224`` for a named input, or ``1,3,224,224`` for the next unnamed graph input in order."""
    from .checking import graph_feeds

    names = [v.name for v in graph_feeds(model)]
    shapes: dict[str, list[int]] = {}
    unnamed = iter(names)
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        if not sep:
            name = next((n for n in unnamed if n not in shapes), "")
            if not name:
                raise BadInput(f"--input-shape {spec}: more shapes than graph inputs ({names})")
        elif name not in names:
            raise BadInput(f"--input-shape {spec}: the model has no graph input {name!r} (inputs: {names})")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            raise BadInput(f"--input-shape {spec}: expected comma-separated integers like 1,3,224,224") from None
        if any(d < 0 for d in shape):
            raise BadInput(f"--input-shape {spec}: dimensions must be non-negative")
        shapes[name] = shape
    return shapes


def _verify_main(argv: Sequence[str], prog: str = PROG) -> int:
    parser = argparse.ArgumentParser(prog=f"{prog} verify", description=_VERIFY_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original", metavar="ORIGINAL.onnx")
    parser.add_argument("folded", metavar="FOLDED.onnx")
    parser.add_argument("--input-shape", action="append", default=[], metavar="[NAME=]D0,D1,...",
                        help="shape of a graph input's generated feed (repeat for several inputs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--no-per-node", action="store_true",
                        help="compare the graph outputs only, not the intermediate values")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    args = parser.parse_args(argv)

    from .checking import ModelRunError, verify

    try:
        original = _readable_model(args.original, "original model")
        folded = _readable_model(args.folded, "folded model")
        shapes = _parse_shapes(args.input_shape, original)
    except BadInput as error:
        return _fail(str(error))
    try:
        verdict = verify(original, folded, input_shapes=shapes, seed=args.seed, per_node=not args.no_per_node)
    except ValueError as error:
        return _fail(str(error))
    except ModelRunError as error:
        if error.which != "folded":
            return _fail(str(error))
        message = f"FAILED: {' '.join(str(error).split())}"
        print(json.dumps({"ok": False, "error": message}) if args.json else message)
        return 1
    print(json.dumps(verdict.to_dict(), indent=2, default=str) if args.json else verdict)
    return 0 if verdict.ok else 1


def _audit_main(argv: Sequence[str], prog: str = PROG) -> int:
    parser = argparse.ArgumentParser(prog=f"{prog} audit", description=_AUDIT_DESCRIPTION,
                                     epilog=_AUDIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("passes", nargs="+", metavar="MODULE:FUNCTION",
                        help="the pass(es) to audit, each a function ModelProto -> ModelProto")
    parser.add_argument("--select", action="append", default=[], metavar="NAME_OR_FAMILY",
                        help="audit only these cases or families (repeatable), e.g. trap or conv->bn")
    parser.add_argument("--zoo", action="store_true", help="also audit the ONNX exports of the model zoo")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                        help="torch.onnx exporter for the zoo models (default dynamo)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--markdown", action="store_true",
                        help="print a markdown table (one status column per pass) after the results")
    args = parser.parse_args(argv)

    from ..audit import (
        AuditResult,
        exit_code,
        format_header,
        format_result,
        format_summary,
        load_object,
        markdown_table,
    )
    from .suite.audit import audit_targets, run_audit

    passes = {}
    for spec in args.passes:
        try:
            fold_pass = load_object(spec, "pass")
        except ValueError as error:
            return _fail(str(error))
        if not callable(fold_pass):
            return _fail(f"pass {spec} is a {type(fold_pass).__name__}, not a function ModelProto -> ModelProto")
        passes[spec] = fold_pass
    targets = list(audit_targets(zoo=args.zoo, select=args.select, exporter=args.exporter))
    if not targets:
        return _fail(f"--select {args.select} matches no case or family")

    runs: dict[str, Sequence[AuditResult]] = {}
    for spec, fold_pass in passes.items():
        if not args.json:
            print(f"pass {spec}")
            print(format_header(), flush=True)

        def show(outcome):
            if not args.json:
                print(format_result(outcome), flush=True)

        runs[spec] = run_audit(fold_pass, targets, on_result=show)
        if not args.json:
            print(format_summary(runs[spec], spec), flush=True)
            print()
    if args.json:
        print(json.dumps({spec: [r.to_dict() for r in results] for spec, results in runs.items()}, indent=2))
    elif args.markdown:
        labels = [spec.rpartition(":")[2] for spec in runs]  # the function names, unless two are alike
        named = dict(zip(labels, runs.values(), strict=True)) if len(set(labels)) == len(labels) else runs
        print(markdown_table(named))
        print()
        for spec, results in runs.items():
            print(format_summary(results, spec))
    return max(exit_code(results) for results in runs.values())


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "verify":
        return _verify_main(argv[1:], prog)
    if argv and argv[0] == "audit":
        return _audit_main(argv[1:], prog)
    return _fold_main(argv, prog)


if __name__ == "__main__":
    from ..cli_runner import run

    run(main)
