"""Command line: ``python -m adapters.torch [options]``, ``... verify ...``, ``... audit ...``.

Run with ``--help`` (or ``verify --help``, ``audit --help``) for the full description. Bad input
(arguments, files, a model that cannot be built or run) is reported as one ``error:`` line on
stderr with exit status 2; torch is imported only once the arguments are understood.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refimpl import MODEL_RATIO

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .suite.demo import ModelRow

PROG = "python -m adapters.torch"

#: What each column of the main job's table means: printed under the table and in --help.
COLUMN_LEGEND = f"""\
columns:
  norms           norm layers found in the model
  folded          norm layers folded away (replaced by nn.Identity)
  left (reasons)  norm layers left in place, with the report's reason codes
  error ratio     the fused model's relative RMS error against the float64 reference run of the original,
                  divided by the unfused model's own error in the same dtype: at most {MODEL_RATIO:g} passes
  max |diff|      largest absolute difference of the fused model's output from the float64 reference
  speedup         forward time of the original / of the fused model (medians of --repeats runs)
  verdict         ok, or FAILED when the error ratio exceeds {MODEL_RATIO:g}"""

#: Printed after the built-in models' table: the same for one's own model.
YOUR_MODEL_HINT = """\
your own model: python -m adapters.torch --model package.module:factory --input-shape 1,3,224,224
  (or --model path/to/file.py:factory; FACTORY() returns the nn.Module; -o fused.pt saves the fused
  model, --checkpoint weights.pth loads a state_dict; --help lists every option)"""

_MAIN_DESCRIPTION = """\
Fold BatchNorm layers into neighbouring conv/linear layers, verify the result against a float64
reference run of the original model, and time the forward pass.

With no arguments, runs a built-in selection of small models from adapters/torch/suite/cases/ (every
fold family -- conv->bn, conv_transpose->bn, linear->bn, bn->conv, bn->linear -- the norm-layer
variants and traps that registration-order fusers get wrong; random weights, random BatchNorm
statistics, no downloads) and prints one row per model, the columns explained below it.

With --model it works on your model instead. The exit status is 0 when every fused model
verifies, 1 otherwise, 2 for bad arguments.
"""

_MAIN_EPILOG = COLUMN_LEGEND + """

subcommands (each has its own --help):
  verify   check a fused model (from any tool) against the float64 reference of the original
  audit    run a third-party fuser MODULE:FUNCTION over the case suite and the model zoo

examples:
  python -m adapters.torch
  python -m adapters.torch --model torchvision.models:resnet18 --input-shape 1,3,224,224 -o fused.pt
  python -m adapters.torch --model path/to/mynet.py:build --input-shape 8,3,64,64
  python -m adapters.torch --model mypkg.nets:build --checkpoint weights.pth --dtype float16 --device cuda
  python -m adapters.torch --reparameterize --model timm.models:repvgg_a0 --random-stats --input-shape 1,3,224,224
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
suite (adapters/torch/suite/cases/) and, unless --no-zoo, of the model zoo (torchvision/timm
architectures, when installed) is put in eval mode, deep-copied and handed to the fuser; the
result is verified against the float64 reference of the original and its norm evaluations are
counted. One line per model:

  ok      output right, every foldable norm folded
  missed  output right, but foldable norms left (left = evaluations left / necessary)
  WRONG   output breaks the error model (ratio = fused error / unfused error, limit 4)
  CRASH   the fuser or the fused model raised (exception type and message)

then a summary line. Exit status 0 when nothing is WRONG or CRASH, 1 otherwise, 2 for bad
arguments. Progress (models done, an estimate of the time left) goes to stderr unless --quiet.

A fuser that traces the model on example inputs, such as AIMET's fold_all_batch_norms, is
audited with --with-inputs and called as FUNCTION(model, example_inputs), example_inputs being a
tuple of the model's input tensors. The peers come wrapped with their calling conventions in
adapters/torch/suite/peers.py:

  python -m adapters.torch audit adapters.torch.suite.peers:mmcv_fuse
  python -m adapters.torch audit adapters.torch.suite.peers:fx_fuse
  python -m adapters.torch audit adapters.torch.suite.peers:aimet_fold --with-inputs
"""


def _add_model_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--model", metavar="MODULE:FACTORY", required=required,
                        help="import MODULE (or run path/to/file.py) and call FACTORY() with no arguments; it must "
                             "return an nn.Module (e.g. torchvision.models:resnet18 -- random weights unless "
                             "--checkpoint)")
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
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random input and statistics, and of the global RNG while the factory runs "
                             "(so its random weights are reproducible) (default: 0)")


def _main_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=_MAIN_DESCRIPTION,
                                     epilog=_MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(parser, required=False)
    parser.add_argument("-o", "--output", metavar="PATH",
                        help="with --model: save the fused model as a whole module, torch.save(fused_model, PATH) "
                             "(not a state_dict: folded norms are gone, so the original class cannot load it). "
                             "Load with torch.load(PATH, weights_only=False); the model's classes must be importable")
    parser.add_argument("--case", action="append", default=[], metavar="NAME",
                        help="without --model: run this case of adapters/torch/suite/cases/ (repeatable) instead of "
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
    parser.add_argument("--reparameterize", action="store_true",
                        help="also merge parallel linear branches (RepVGG, MobileOne, ACNet, RepConv, ...) into "
                             "single convs, as adapters.torch.reparameterize does; the report lists each merge")
    return parser


def _verify_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=_VERIFY_DESCRIPTION,
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


def _audit_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=_AUDIT_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fuser", metavar="MODULE:FUNCTION",
                        help="the fuser to audit, called as FUNCTION(model) (with --with-inputs: "
                             "FUNCTION(model, example_inputs))")
    parser.add_argument("--no-zoo", action="store_true", help="skip the model zoo (torchvision/timm models)")
    parser.add_argument("--no-cases", action="store_true", help="skip the case suite (audit the zoo only)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME_OR_FAMILY",
                        help="audit only this case or zoo model, or this family (conv->bn, bn->conv, trap, zoo, "
                             "...); repeatable")
    parser.add_argument("--device", default="cpu", help="device to run on (default: %(default)s)")
    parser.add_argument("--with-inputs", action="store_true",
                        help="call the fuser as FUNCTION(model, example_inputs), example_inputs a tuple of the "
                             "model's input tensors (for fusers that trace the model, e.g. AIMET)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: {'fuser', 'with_inputs', 'ok', 'summary', 'results': [...]}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines (models done, estimated time left) on stderr")
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


def _error(message: str) -> int:
    """Report bad input as one line; the exit status for it."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def _configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _output_problem(path: str) -> str | None:
    """Why ``-o PATH`` cannot be written, found before any work is done; None when it can."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        return f"-o {path!r} is a folder; give a file name, e.g. {str(target / 'fused.pt')!r}"
    if not folder.is_dir():
        return f"-o {path!r}: the folder {str(folder)!r} does not exist (relative to the working directory " \
               f"{os.getcwd()})"
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        return f"-o {path!r}: {'the file' if target.exists() else 'the folder ' + repr(str(folder))} is not writable"
    return None


def _device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    import torch

    try:
        return torch.device(name)
    except RuntimeError as error:
        parser.error(f"--device {name!r}: {error}")


def _warn_slow_dtype(dtype: torch.dtype, device: torch.device) -> None:
    from .suite.demo import slow_half_precision_warning

    warning = slow_half_precision_warning(dtype, device)
    if warning:
        print(warning, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The main job: fuse, verify and time the built-in models or the user's model

def _check_main_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.output and not args.model:
        parser.error("-o/--output needs --model (it saves that one fused model)")
    if args.model and (args.case or args.all_cases):
        parser.error("--case/--all-cases select built-in models; they cannot be combined with --model")
    if not args.model and (args.checkpoint or args.random_stats):
        parser.error("--checkpoint/--random-stats apply to --model")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")


def _fuser(args: argparse.Namespace) -> Callable[..., tuple[nn.Module, Any]] | None:
    """``reparameterize`` with --reparameterize; None (the demo's default, ``fuse``) otherwise."""
    if not args.reparameterize:
        return None
    from .reparam import reparameterize

    return reparameterize


def _builtin_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    from .suite import cases as case_suite
    from .suite.demo import DEFAULT_CASES

    if args.all_cases:
        names = tuple(case.name for case in case_suite.iter_cases())
    else:
        names = tuple(args.case) or DEFAULT_CASES
    unknown = [n for n in names if n not in case_suite.CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(case_suite.CASES)}")
    return names


def _run_builtin_models(names: tuple[str, ...], args: argparse.Namespace, dtype: torch.dtype,
                        device: torch.device) -> list[ModelRow]:
    """One row per built-in case; a built-in model that fails to fuse or run is a bug: it raises."""
    from .suite.demo import default_models, run_model

    rows = []
    for index, (name, model, inputs) in enumerate(default_models(names, dtype=dtype, device=device), 1):
        _progress(not args.quiet, f"[{index}/{len(names)}] {name}: fusing, verifying, timing")
        row, _ = run_model(name, model, inputs, repeats=args.repeats, fuse=_fuser(args))
        if not row.ok:
            _progress(not args.quiet, row.verdict_text)
        rows.append(row)
    return rows


def _run_user_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device
                    ) -> tuple[list[ModelRow], nn.Module] | str:
    """The user's model built, fused, verified and timed, stage by stage; a one-line error instead."""
    from .suite.demo import load_user_model, parse_shape, run_model
    from .suite.loading import raised_where

    name = args.model

    def stage(text: str) -> None:
        _progress(not args.quiet, f"[1/1] {name}: {text}")

    try:
        model, inputs = load_user_model(name, input_shape=parse_shape(args.input_shape), dtype=dtype,
                                        device=device, checkpoint=args.checkpoint, random_stats=args.random_stats,
                                        seed=args.seed, progress=stage)
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        return str(error)
    try:
        row, fused = run_model(name, model, inputs, repeats=args.repeats, fuse=_fuser(args), progress=stage)
    except Exception as error:  # the user's model (or its input shape) is at fault: one line, not a traceback
        where = "" if isinstance(error, (ValueError, TypeError, RuntimeError)) else f" (at {raised_where(error)})"
        return (f"{name} with input shape {tuple(inputs[0].shape)}: {type(error).__name__}: "
                + " ".join(str(error).split()) + where)
    if not row.ok:
        _progress(not args.quiet, row.verdict_text)
    return [row], fused


def _save(fused: nn.Module, path: str, quiet: bool) -> str | None:
    """Save the fused model whole; a one-line error (and no partial file) when it cannot be."""
    import torch

    try:
        torch.save(fused, path)
    except Exception as error:  # unpicklable model code (local classes, lambdas), full disk, ...
        Path(path).unlink(missing_ok=True)
        return f"cannot save the fused model to {path!r}: {type(error).__name__}: {' '.join(str(error).split())}"
    _progress(not quiet, f"saved the fused model (whole module) to {path}")
    return None


def _print_rows(rows: list[ModelRow], args: argparse.Namespace, device: torch.device) -> None:
    import torch

    from .suite.demo import format_table

    ok = all(row.ok for row in rows)
    if args.json:
        print(json.dumps(_json_safe({"ok": ok, "dtype": args.dtype, "device": str(device),
                                     "threads": torch.get_num_threads(),
                                     "models": [row.to_dict() for row in rows]}), indent=2))
        return
    print(format_table(rows))
    failed = [row.name for row in rows if not row.ok]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} fused models verified"
          + (f"; FAILED: {', '.join(failed)}" if failed else "")
          + f" ({args.dtype}, {device}, {torch.get_num_threads()} thread(s); speedup = unfused / fused "
            f"forward time, medians of {args.repeats} runs)")
    print(f"\n{COLUMN_LEGEND}")
    if not args.model:
        print(f"\n{YOUR_MODEL_HINT}")


def main_job(argv: Sequence[str], prog: str = PROG) -> int:
    """Fuse, verify and time the built-in models, or the one named by ``--model``."""
    parser = _main_parser(prog)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    _check_main_arguments(parser, args)
    if args.output and (problem := _output_problem(args.output)):
        return _error(problem)
    names = () if args.model else _builtin_names(parser, args)

    import torch

    from .suite.demo import DTYPES

    device = _device(parser, args.device)
    dtype = DTYPES[args.dtype]
    threads = args.threads if args.threads is not None else (None if args.model else 1)
    if threads is not None:
        torch.set_num_threads(threads)
    _warn_slow_dtype(dtype, device)
    if args.model:
        outcome = _run_user_model(args, dtype, device)
        if isinstance(outcome, str):
            return _error(outcome)
        rows, fused = outcome
        if args.output and (problem := _save(fused, args.output, args.quiet)):
            return _error(problem)
    else:
        rows = _run_builtin_models(names, args, dtype, device)
    _print_rows(rows, args, device)
    return 0 if all(row.ok for row in rows) else 1


# --------------------------------------------------------------------------------------------------
# verify and audit

def _fused_by(fuser_spec: str, model: nn.Module) -> nn.Module:
    import copy

    from torch import nn

    from .suite.loading import load_callable, raised_where

    fuser = load_callable(fuser_spec, "--fuser")
    try:
        fused = fuser(copy.deepcopy(model))
    except Exception as error:
        raise ValueError(f"--fuser {fuser_spec!r} raised {type(error).__name__}: {' '.join(str(error).split())} "
                         f"(at {raised_where(error)})") from error
    if not isinstance(fused, nn.Module):
        raise TypeError(f"--fuser {fuser_spec!r} returned {type(fused).__name__}, not an nn.Module")
    return fused


def verify_job(argv: Sequence[str], prog: str = f"{PROG} verify") -> int:
    """Check a fused model (a file, or a fuser's result) against the float64 reference of the original."""
    parser = _verify_parser(prog)
    args = parser.parse_args(argv)
    _configure_logging()

    from .checking import ModelRunError, verify
    from .suite.demo import DTYPES, load_user_model, parse_shape
    from .suite.loading import load_whole_model

    device = _device(parser, args.device)
    dtype = DTYPES[args.dtype]
    _warn_slow_dtype(dtype, device)
    try:
        model, inputs = load_user_model(args.model, input_shape=parse_shape(args.input_shape), dtype=dtype,
                                        device=device, checkpoint=args.checkpoint, random_stats=args.random_stats,
                                        seed=args.seed)
        fused = load_whole_model(args.fused, device) if args.fused else _fused_by(args.fuser, model)
        verdict = verify(model, fused, inputs, per_layer=not args.no_layers)
    except (ValueError, TypeError, OSError, ModelRunError) as error:
        return _error(str(error))
    if args.json:
        print(json.dumps(_json_safe(verdict.to_dict()), indent=2))
    else:
        print(verdict)
    return 0 if verdict.ok else 1


def audit_job(argv: Sequence[str], prog: str = f"{PROG} audit") -> int:
    """Run a fuser over the case suite and the model zoo and judge each result."""
    parser = _audit_parser(prog)
    args = parser.parse_args(argv)
    _configure_logging()
    if args.no_zoo and args.no_cases:
        parser.error("--no-zoo and --no-cases leave nothing to audit")

    from .suite.audit import (
        AuditProgress,
        audit_targets,
        exit_code,
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
    from .suite.peers import PEERS, peer_unavailable

    for peer in PEERS.values():
        if fuser is peer.function and (missing := peer_unavailable(peer)) is not None:
            parser.error(f"{args.fuser!r} cannot run here: {missing}")
    targets = list(audit_targets(cases=not args.no_cases, zoo=not args.no_zoo, select=args.only,
                                 device=args.device))
    if not targets:
        parser.error(f"no case or zoo model matches --only {args.only}")

    progress = None if args.quiet else AuditProgress(targets, sys.stderr)

    def on_result(outcome: Any) -> None:
        if not args.json:
            if progress is not None:
                progress.clear()  # a progress line rewritten in place on a terminal
            print(format_result(outcome), flush=True)
        if progress is not None:
            progress.update(outcome)

    if not args.json:
        print(format_header(), flush=True)
    results = run_audit(fuser, targets, on_result=on_result, with_inputs=args.with_inputs)
    if progress is not None:
        progress.clear()
    if args.json:
        print(json.dumps(_json_safe({"fuser": args.fuser, "with_inputs": args.with_inputs,
                                     "ok": exit_code(results) == 0, "summary": summarize(results),
                                     "results": [r.to_dict() for r in results]}), indent=2))
    else:
        print(format_summary(results, args.fuser + (" (called with example inputs)" if args.with_inputs else "")))
    return exit_code(results)


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        return verify_job(argv[1:], f"{prog} verify")
    if argv and argv[0] == "audit":
        return audit_job(argv[1:], f"{prog} audit")
    return main_job(argv, prog)


if __name__ == "__main__":
    from ..cli_runner import run

    run(main)
