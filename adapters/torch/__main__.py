"""Command line: ``python -m adapters.torch [options]``, ``... verify ...``, ``... audit ...``.

Run with ``--help`` (or ``verify --help``, ``audit --help``) for the full description.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

_MAIN_DESCRIPTION = """\
Fold BatchNorm layers into neighbouring conv/linear layers, verify the result against a float64
reference run of the original model, and time the forward pass.

With no arguments, runs a built-in selection of small models from adapters/torch/suite/cases.py (every
fold family -- conv->bn, conv_transpose->bn, linear->bn, bn->conv, bn->linear -- the norm-layer
variants and traps that registration-order fusers get wrong; random weights, random BatchNorm
statistics, no downloads) and prints one row per model:

  norms           norm layers found
  folded          norm layers folded away (replaced by nn.Identity)
  left (reasons)  norm layers left in place, with the report's reason codes
  error ratio     the fused model's relative RMS error against the float64 reference, divided by
                  the unfused model's own error in the same dtype (<= 4 passes)
  max |diff|      largest absolute difference from the float64 reference
  speedup         forward-pass time of the original / the fused model (medians of --repeats runs)
  verdict         ok, or FAILED when the fused model breaks the error model

With --model it works on your model instead. The exit status is 0 when every fused model
verifies, 1 otherwise, 2 for bad arguments.
"""

_MAIN_EPILOG = """\
subcommands (each has its own --help):
  verify   check a fused model (from any tool) against the float64 reference of the original
  audit    run a third-party fuser MODULE:FUNCTION over the case suite and the model zoo

examples:
  python -m adapters.torch
  python -m adapters.torch --model torchvision.models:resnet18 --input-shape 1,3,224,224 -o fused.pt
  python -m adapters.torch --model mypkg.nets:build --checkpoint weights.pth --dtype float16 --device cuda
  python -m adapters.torch verify --model torchvision.models:resnet18 --fuser mmcv.cnn:fuse_conv_bn
  python -m adapters.torch audit torch.fx.experimental.optimization:fuse --no-zoo
"""

_VERIFY_DESCRIPTION = """\
Check a fused model against the float64 reference run of the original, end to end and per
layer where the two models have a module under the same qualified name, using the project's
error model: the fused model's relative RMS error must be within 4x the unfused model's own
error in the same dtype. Prints the verdict (naming the first diverging layer, if any); exit
status 0 when it passes, 1 when it fails, 2 for bad arguments.

The fused model comes either from a file (--fused FILE: a whole module saved with
torch.save(module), as `python -m adapters.torch -o FILE` writes; loading it unpickles code, so
use only files you trust) or from a fuser applied to a copy of the original
(--fuser MODULE:FUNCTION, called as FUNCTION(model) -> model).
"""

_AUDIT_DESCRIPTION = """\
Audit a BatchNorm fuser called as FUNCTION(model) -> model, e.g. mmcv.cnn:fuse_conv_bn,
torch.fx.experimental.optimization:fuse or adapters.torch:fuse_conv_bn. Each model of the case
suite (adapters/torch/suite/cases.py) and, unless --no-zoo, of the model zoo (torchvision/timm
architectures, when installed) is put in eval mode, deep-copied and handed to the fuser; the
result is verified against the float64 reference of the original and its norm evaluations are
counted. One line per model:

  ok      output right, every foldable norm folded
  missed  output right, but foldable norms left (left = evaluations left / necessary)
  WRONG   output breaks the error model (ratio = fused error / unfused error, limit 4)
  CRASH   the fuser or the fused model raised (exception type and message)

then a summary line. Exit status 0 when nothing is WRONG or CRASH, 1 otherwise, 2 for bad
arguments.
"""


def _add_model_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--model", metavar="MODULE:FACTORY", required=required,
                        help="import MODULE and call FACTORY() with no arguments; it must return an nn.Module "
                             "(e.g. torchvision.models:resnet18 -- random weights unless --checkpoint)")
    stats = parser.add_mutually_exclusive_group()
    stats.add_argument("--checkpoint", metavar="PATH",
                       help="a state_dict (or a dict holding one under 'state_dict' or 'model') loaded into the "
                            "model with strict=True; read with torch.load(weights_only=True)")
    stats.add_argument("--random-stats", action="store_true",
                       help="give every norm layer random running statistics and affine parameters (seeded), so "
                            "that an untrained model's folds are not near no-ops")
    parser.add_argument("--input-shape", metavar="N,C,...", default="1,3,224,224",
                        help="shape of the random example input (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="dtype the model and input are converted to (default: %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="device to run on: cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input and statistics, and of the global RNG while the factory runs "
                             "(so its random weights are reproducible) (default: 0)")


def _main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapters.torch", description=_MAIN_DESCRIPTION,
                                     epilog=_MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(parser, required=False)
    parser.add_argument("-o", "--output", metavar="PATH",
                        help="with --model: save the fused model as a whole module, torch.save(fused_model, PATH) "
                             "(not a state_dict: folded norms are gone, so the original class cannot load it). "
                             "Load with torch.load(PATH, weights_only=False); the model's classes must be importable")
    parser.add_argument("--case", action="append", default=[], metavar="NAME",
                        help="without --model: run this case of adapters/torch/suite/cases.py (repeatable) instead of "
                             "the default selection")
    parser.add_argument("--all-cases", action="store_true", help="without --model: run every case of the suite")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed runs per model; the speedup uses their medians (default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (torch.set_num_threads); default: 1 for the built-in models "
                             "(tiny tensors: threads cost more than they gain, and one thread keeps the timings "
                             "steady on a busy machine), torch's default with --model")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table: {'ok': ..., 'models': [...]} with the full "
                             "fusion report and verdict of each model")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the fuser does (to stderr)")
    return parser


def _verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapters.torch verify", description=_VERIFY_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(parser, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--fused", metavar="FILE", help="a fused model saved whole with torch.save(module)")
    source.add_argument("--fuser", metavar="MODULE:FUNCTION",
                        help="a fuser applied to a deep copy of the original: FUNCTION(model) -> model")
    parser.add_argument("--no-layers", action="store_true",
                        help="compare the outputs only, not the intermediate layers (saves memory)")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    return parser


def _audit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapters.torch audit", description=_AUDIT_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fuser", metavar="MODULE:FUNCTION", help="the fuser to audit, called as FUNCTION(model)")
    parser.add_argument("--no-zoo", action="store_true", help="skip the model zoo (torchvision/timm models)")
    parser.add_argument("--no-cases", action="store_true", help="skip the case suite (audit the zoo only)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME_OR_FAMILY",
                        help="audit only this case or zoo model, or this family (conv->bn, bn->conv, trap, zoo, "
                             "...); repeatable")
    parser.add_argument("--device", default="cpu", help="device to run on (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: {'fuser', 'ok', 'summary', 'results': [...]}; progress goes "
                             "to stderr")
    return parser


def _json_safe(value: Any) -> Any:
    # JSON has no inf/nan; an infinite ratio (a shape mismatch) is written as the string "inf".
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _progress(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


def _main_job(argv: Sequence[str]) -> int:
    parser = _main_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.output and not args.model:
        parser.error("-o/--output needs --model (it saves that one fused model)")
    if args.model and (args.case or args.all_cases):
        parser.error("--case/--all-cases select built-in models; they cannot be combined with --model")
    if not args.model and (args.checkpoint or args.random_stats):
        parser.error("--checkpoint/--random-stats apply to --model")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    import torch

    from .suite import cases as case_suite
    from .suite.demo import DEFAULT_CASES, DTYPES, default_models, format_table, load_user_model, parse_shape, run_model

    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads if args.threads is not None else (None if args.model else 1)
    if threads is not None:
        torch.set_num_threads(threads)
    dtype = DTYPES[args.dtype]
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if args.model:
        try:
            model, inputs = load_user_model(args.model, input_shape=parse_shape(args.input_shape), dtype=dtype,
                                            device=device, checkpoint=args.checkpoint,
                                            random_stats=args.random_stats, seed=args.seed)
        except (ValueError, TypeError, RuntimeError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        models = iter([(args.model, model, inputs)])
        total = 1
    else:
        if args.all_cases:
            names = tuple(case.name for case in case_suite.iter_cases())
        else:
            names = tuple(args.case) or DEFAULT_CASES
        unknown = [n for n in names if n not in case_suite.CASES]
        if unknown:
            parser.error(f"unknown case(s) {unknown}; known: {', '.join(case_suite.CASES)}")
        models = default_models(names, dtype=dtype, device=device)
        total = len(names)

    rows = []
    for index, (name, model, inputs) in enumerate(models, 1):
        _progress(not args.quiet, f"[{index}/{total}] {name}: fusing, verifying, timing")
        try:
            row, fused = run_model(name, model, inputs, repeats=args.repeats)
        except (ValueError, TypeError, RuntimeError) as error:
            if not args.model:
                raise  # a built-in model must always fuse and run: that is a bug, show the traceback
            print(f"error: {name} with input shape {tuple(inputs[0].shape)}: {type(error).__name__}: {error}",
                  file=sys.stderr)
            return 2
        rows.append(row)
        if not row.ok:
            _progress(not args.quiet, row.verdict_text)
        if args.output:
            torch.save(fused, args.output)
            _progress(not args.quiet, f"saved the fused model (whole module) to {args.output}")

    ok = all(row.ok for row in rows)
    if args.json:
        print(json.dumps(_json_safe({"ok": ok, "dtype": args.dtype, "device": str(device),
                                     "threads": torch.get_num_threads(),
                                     "models": [row.to_dict() for row in rows]}), indent=2))
    else:
        print(format_table(rows))
        failed = [row.name for row in rows if not row.ok]
        print(f"\n{len(rows) - len(failed)} of {len(rows)} fused models verified"
              + (f"; FAILED: {', '.join(failed)}" if failed else "")
              + f" ({args.dtype}, {device}, {torch.get_num_threads()} thread(s); speedup = unfused / fused "
                f"forward time, medians of {args.repeats} runs)")
    return 0 if ok else 1


def _verify_job(argv: Sequence[str]) -> int:
    parser = _verify_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import copy

    import torch
    from torch import nn

    from .checking import ModelRunError, verify
    from .suite.audit import load_object
    from .suite.demo import DTYPES, load_user_model, parse_shape

    try:
        device = torch.device(args.device)
        model, inputs = load_user_model(args.model, input_shape=parse_shape(args.input_shape),
                                        dtype=DTYPES[args.dtype], device=device, checkpoint=args.checkpoint,
                                        random_stats=args.random_stats, seed=args.seed)
        if args.fused:
            fused = torch.load(args.fused, map_location=device, weights_only=False)
            if not isinstance(fused, nn.Module):
                raise TypeError(f"--fused {args.fused!r} holds a {type(fused).__name__}, not a whole nn.Module "
                                f"(save the fused model with torch.save(module, FILE), not its state_dict)")
        else:
            fuser = load_object(args.fuser, "--fuser")
            fused = fuser(copy.deepcopy(model))
            if not isinstance(fused, nn.Module):
                raise TypeError(f"--fuser {args.fuser!r} returned {type(fused).__name__}, not an nn.Module")
        verdict = verify(model, fused, inputs, per_layer=not args.no_layers)
    except (ValueError, TypeError, OSError, ModelRunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_json_safe(verdict.to_dict()), indent=2))
    else:
        print(verdict)
    return 0 if verdict.ok else 1


def _audit_job(argv: Sequence[str]) -> int:
    parser = _audit_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.no_zoo and args.no_cases:
        parser.error("--no-zoo and --no-cases leave nothing to audit")

    from .suite.audit import (
        audit_targets,
        format_header,
        format_result,
        format_summary,
        load_object,
        run_audit,
        summarize,
    )

    try:
        fuser = load_object(args.fuser, "the fuser")
    except ValueError as error:
        parser.error(str(error))
    if not callable(fuser):
        parser.error(f"{args.fuser!r} is a {type(fuser).__name__}, not a callable")
    targets = list(audit_targets(cases=not args.no_cases, zoo=not args.no_zoo, select=args.only,
                                 device=args.device))
    if not targets:
        parser.error(f"no case or zoo model matches --only {args.only}")

    if args.json:
        results = run_audit(fuser, targets, on_result=lambda r: _progress(True, f"{r.status:<7} {r.name}"))
        counts = summarize(results)
        ok = counts["WRONG"] == 0 and counts["CRASH"] == 0
        print(json.dumps(_json_safe({"fuser": args.fuser, "ok": ok, "summary": counts,
                                     "results": [r.to_dict() for r in results]}), indent=2))
    else:
        print(format_header(), flush=True)
        results = run_audit(fuser, targets, on_result=lambda r: print(format_result(r), flush=True))
        counts = summarize(results)
        ok = counts["WRONG"] == 0 and counts["CRASH"] == 0
        print(format_summary(results, args.fuser))
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        return _verify_job(argv[1:])
    if argv and argv[0] == "audit":
        return _audit_job(argv[1:])
    return _main_job(argv)


if __name__ == "__main__":
    sys.exit(main())
