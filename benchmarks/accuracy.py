"""Accuracy, rounding and coverage of BatchNorm folding: ours against mmcv and torch.fx, side by side.

Usage: ``python benchmarks/accuracy.py [--device cpu|cuda] [--models a,b] [--dtypes fp32,fp16,bf16]
[--batch 16] [--size 64] [--quick] [--json [PATH]]``

For each zoo model (random weights, randomised BatchNorm statistics, fixed seed) and each
compute dtype, the model is first converted to that dtype -- what users do, and what exposes
folding in the parameter dtype -- and the same converted model is handed to every fuser.

1. Accuracy. The original model run in float64 on a batch of 16 is the reference. For the
   unfused model in the dtype and for each fused model: the relative RMS error
   (``refimpl.relative_rms_error``) and the relative max error ``max|err| / max|ref|``. Reported
   as the fused error divided by the unfused model's own error in the same dtype (1.00x: folding
   cost nothing). Target for ours: RMS ratio <= 1.2x on every model and dtype.
2. Rounding. For every (layer, norm) pair ours folded, the correctly rounded fold of the *stored*
   parameters: the fold (``refimpl.fold_*``, the one source of the formula) evaluated in
   ``np.longdouble`` and rounded once, by hand, to the dtype with round-to-nearest-even (see
   :func:`round_to_dtype`). Reported: the fraction of fused weight (and bias) elements equal to
   it, for every fuser that folded the same pair. Target >= 99.9%.
3. Coverage. Norm evaluations in one forward pass of each fused model
   (``adapters.torch.suite.cases.count_norm_calls``), against the number that cannot be folded
   (worked out by hand per architecture in ``adapters.torch.suite.zoo``). Fewer left than that number
   means a fuser folded something it could not fold exactly; the accuracy table shows the cost.

Run time: fp16 convolutions have no fast CPU kernels, so the default CPU run (8 models, 3 dtypes,
batch 16 at 64x64) takes about 15 minutes on two cores; ``--quick`` (4 models) about a third of
that. On a GPU the default (224x224) takes about a minute, most of it the longdouble folds.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from adapters.torch.checking import rounded_copy  # noqa: E402
from benchmarks.common import (  # noqa: E402
    DTYPES,
    Report,
    Table,
    base_parser,
    configure_threads,
    disable_tf32,
    format_float,
    format_ratio,
    machine_info,
    make_fusers,
    parse_models,
    resolve_device,
    short_error,
)
from refimpl import (  # noqa: E402
    MODEL_RATIO,
    fold_bn_conv,
    fold_bn_linear,
    fold_conv_bn,
    fold_linear_bn,
    relative_rms_error,  # noqa: E402
)

log = logging.getLogger("bnfold.benchmarks.accuracy")

DEFAULT_MODELS = ("torchvision/resnet50", "torchvision/mobilenet_v3_large", "torchvision/efficientnet_b0",
                  "torchvision/regnet_y_800mf", "torchvision/densenet121", "torchvision/resnet50_frozenbn",
                  "timm/efficientnet_b0", "timm/resnet50d")
QUICK_MODELS = ("torchvision/resnet50", "torchvision/mobilenet_v3_large", "torchvision/densenet121",
                "timm/efficientnet_b0")

#: Target of the issue: ours' RMS error ratio and correctly rounded fraction.
RMS_RATIO_TARGET = 1.2
ROUNDED_TARGET = 0.999

# ----------------------------------------------------------------------------------------------
# Correct rounding by hand.

#: (precision p including the implicit bit, smallest normal exponent emin, largest finite value)
_FORMATS: dict[torch.dtype, tuple[int, int, float]] = {
    torch.float32: (24, -126, float(torch.finfo(torch.float32).max)),
    torch.float16: (11, -14, float(torch.finfo(torch.float16).max)),
    torch.bfloat16: (8, -126, float(torch.finfo(torch.bfloat16).max)),
}


def round_to_dtype(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Round ``x`` (np.longdouble) once, to nearest with ties to even, onto the grid of ``dtype``.

    Returns float64, which holds every fp32, fp16 and bf16 value exactly. Converting through
    another format instead (longdouble -> float64 -> fp16, or torch's float64 -> bf16 on a value
    first rounded to float64) rounds twice, and a value just beyond a midpoint of the target grid
    can land exactly on it after the first rounding and then go the wrong way.

    With ``x = m * 2**e`` (``0.5 <= |m| < 1``) the spacing of the target grid around ``x`` is
    ``2**(max(e - 1, emin) - p + 1)`` (constant below the smallest normal: subnormals). Scaling by
    a power of two is exact in longdouble, and ``np.rint`` rounds half to even exactly, so the
    result is the correctly rounded value of ``x``; beyond the largest finite value it is +-inf,
    as IEEE rounding overflows.
    """
    precision, emin, largest = _FORMATS[dtype]
    x = np.asarray(x, dtype=np.longdouble)
    _, exponent = np.frexp(x)
    shift = np.maximum(exponent.astype(np.int64) - 1, emin) - precision + 1
    rounded = np.ldexp(np.rint(np.ldexp(x, -shift)), shift)
    rounded = np.where(np.abs(rounded) > largest, np.copysign(np.inf, x), rounded)
    return rounded.astype(np.float64)


def _midpoints(grid: np.ndarray, precision: int, nudge: np.ndarray) -> np.ndarray:
    """Points halfway between neighbours of a target grid, and just either side of them."""
    _, exponent = np.frexp(grid)
    half_ulp = np.ldexp(np.ones_like(grid), exponent - precision - 1)
    mid = np.concatenate([grid + half_ulp, grid - half_ulp])
    return np.concatenate([mid, mid + nudge * np.abs(mid), mid - nudge * np.abs(mid)])


def check_rounding_helper() -> str:
    """Cross-check :func:`round_to_dtype` against conversions known to round once, correctly.

    numpy's float64 -> float32 and float64 -> float16 casts round once (torch's do not: it casts
    float64 -> float32 -> float16, and float64 -> float32 -> bfloat16, which rounds twice), and
    torch's float32 -> bfloat16 rounds once. On inputs of those source types -- random values of
    every scale, exact midpoints of the target grid and their near neighbours, subnormals,
    overflow -- the results must agree bit for bit. Raises RuntimeError naming the first
    disagreement; returns a line for the report.
    """
    rng = np.random.default_rng(12345)
    scales = np.exp2(rng.integers(-30, 20, 4000).astype(np.float64))
    random64 = rng.standard_normal(4000) * scales
    cases = {
        torch.float32: (np.float64, lambda v: v.astype(np.float32).astype(np.float64)),
        torch.float16: (np.float64, lambda v: v.astype(np.float16).astype(np.float64)),
        torch.bfloat16: (np.float32, lambda v: torch.from_numpy(v).to(torch.bfloat16).double().numpy()),
    }
    checked = 0
    for dtype, (source, oracle) in cases.items():
        precision, _, largest = _FORMATS[dtype]
        grid = torch.tensor(rng.standard_normal(1000), dtype=dtype).double().numpy()
        special = np.array([float(torch.finfo(dtype).tiny) / 3, float(torch.finfo(dtype).tiny) * 0.75,
                            largest * 1.001, -largest, 0.0])
        nudge = np.array(2.0**-40 if source is np.float64 else 2.0**-22)
        values = np.concatenate([random64, _midpoints(grid, precision, nudge), special]).astype(source)
        values = values[np.isfinite(values)]
        ours = round_to_dtype(values.astype(np.longdouble), dtype)
        with np.errstate(over="ignore"):
            theirs = oracle(values)
        bad = ours != theirs
        if bad.any():
            i = int(np.argmax(bad))
            raise RuntimeError(f"round_to_dtype disagrees with a correctly rounded cast to {dtype} at "
                               f"x={float(values[i])!r}: {ours[i]!r} vs {theirs[i]!r}")
        checked += values.size
    extended = np.finfo(np.longdouble)
    return (f"Correct rounding: folds evaluated in np.longdouble ({extended.nmant + 1}-bit significand) and rounded "
            f"once by hand, checked bit for bit on {checked} values (midpoints, subnormals, overflow) against casts "
            "that round once.")


# ----------------------------------------------------------------------------------------------
# Exact folds of stored parameters.

def _extended(t: torch.Tensor | None) -> np.ndarray | None:
    # fp16/bf16/fp32 -> float64 is exact, float64 -> longdouble is exact.
    return None if t is None else t.detach().to("cpu", torch.float64).numpy().astype(np.longdouble)


def exact_fold(layer: nn.Module, norms: list[tuple[str, nn.Module]]) -> tuple[np.ndarray, np.ndarray]:
    """The fold of ``norms`` (kind, module), in dataflow order, into ``layer``, in np.longdouble."""
    from adapters.torch.norms import NormInfo, classify_norm, norm_stats

    weight, bias = _extended(layer.weight), _extended(layer.bias)
    for kind, norm in norms:
        info = classify_norm(norm)
        if not isinstance(info, NormInfo):
            raise ValueError(f"{type(norm).__name__} was folded by ours but is not a recognised norm: {info!r}")
        stats = norm_stats(norm, info)
        args = (_extended(stats.mean), _extended(stats.var), float(stats.eps), _extended(stats.weight),
                _extended(stats.bias))
        if kind == "conv->bn":
            weight, bias = fold_conv_bn(weight, bias, *args, groups=layer.groups)
        elif kind == "conv_transpose->bn":
            weight, bias = fold_conv_bn(weight, bias, *args, transposed=True, groups=layer.groups)
        elif kind == "linear->bn":
            weight, bias = fold_linear_bn(weight, bias, *args)
        elif kind == "bn->conv":
            weight, bias = fold_bn_conv(weight, bias, *args, groups=layer.groups)
        elif kind == "bn->linear":
            weight, bias = fold_bn_linear(weight, bias, *args)
        else:
            raise ValueError(f"unknown fold kind {kind!r} for layer {type(layer).__name__}")
    return weight, bias


def _inlined_by_fx(module: nn.Module, name: str) -> bool:
    """Whether ``torch.fx.symbolic_trace`` traces through ``module`` instead of keeping it as a call.

    fx keeps only ``torch.nn`` classes as modules and inlines the forward of every other one (timm's
    ``BatchNormAct2d``, torchvision's ``FrozenBatchNorm2d``): what is left of such a norm in a
    GraphModule is arithmetic on constants, which no module hook sees and which fx's fuser never
    folds (its patterns match module calls only).
    """
    return not torch.fx.Tracer().is_leaf_module(module, name)


def norm_evaluations(model: nn.Module, x: torch.Tensor, count_norm_calls, original: nn.Module) -> int:
    """Norm evaluations in one forward pass of ``model``, a fused version of ``original``.

    Module calls, counted with hooks; for an fx GraphModule, plus the calls of ``original``'s norms
    that fx inlined (never folded by it, see :func:`_inlined_by_fx`).
    """
    calls = count_norm_calls(model, x)
    if isinstance(model, torch.fx.GraphModule):
        from adapters.torch.suite.cases import is_norm_module

        inlined = 0

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            nonlocal inlined
            inlined += 1

        handles = [m.register_forward_hook(hook) for n, m in original.named_modules()
                   if is_norm_module(m) and _inlined_by_fx(m, n)]
        try:
            original(x)
        finally:
            for handle in handles:
                handle.remove()
        calls += inlined
    return calls


def _is_gone(fused: nn.Module, fused_modules: dict[str, nn.Module], base_modules: dict[str, nn.Module],
             norm_name: str) -> bool:
    """Whether a fused model no longer evaluates the norm registered under ``norm_name``."""
    from adapters.torch.norms import classify_norm

    if isinstance(fused, torch.fx.GraphModule) and _inlined_by_fx(base_modules[norm_name], norm_name):
        return False
    module = fused_modules.get(norm_name)
    return module is None or classify_norm(module) is None


def rounding_stats(base: nn.Module, fused: nn.Module, folded: list[Any], dtype: torch.dtype,
                   cache: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Compare the folded layers of ``fused`` with the correctly rounded folds of ``base``'s stored parameters.

    ``folded`` is ours' list of FoldedPair; a layer counts for a fuser when every norm ours folded
    into it is gone from that fuser's model too (the fuser folded the same pairs). ``cache`` keeps
    the correctly rounded folds by layer name, for the next fuser given the same ``base``.
    """
    base_modules = dict(base.named_modules())
    fused_modules = dict(fused.named_modules())
    by_layer: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for pair in folded:
        by_layer[pair.layer].append((pair.kind, pair.norm))
    layers = weights_ok = weights_all = biases_ok = biases_all = 0
    for layer_name, pairs in by_layer.items():
        layer = fused_modules.get(layer_name)
        if layer is None or not all(_is_gone(fused, fused_modules, base_modules, norm) for _, norm in pairs):
            continue
        if layer_name not in cache:
            exact_w, exact_b = exact_fold(base_modules[layer_name], [(k, base_modules[n]) for k, n in pairs])
            cache[layer_name] = (round_to_dtype(exact_w, dtype), round_to_dtype(exact_b, dtype))
        want_w, want_b = cache[layer_name]
        got_w = layer.weight.detach().to("cpu", torch.float64).numpy()
        got_b = (np.zeros(want_b.shape) if layer.bias is None
                 else layer.bias.detach().to("cpu", torch.float64).numpy())
        if got_w.shape != want_w.shape:
            continue
        layers += 1
        weights_ok += int(np.count_nonzero(got_w == want_w))
        weights_all += want_w.size
        biases_ok += int(np.count_nonzero(got_b == want_b))
        biases_all += want_b.size
    return {"layers": layers, "weights_correct": weights_ok, "weights": weights_all,
            "biases_correct": biases_ok, "biases": biases_all,
            "weight_fraction": weights_ok / weights_all if weights_all else None,
            "bias_fraction": biases_ok / biases_all if biases_all else None}


# ----------------------------------------------------------------------------------------------
# Running the models.

def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Relative RMS error and relative max error ``max|out - ref| / max|ref|`` against the float64 reference."""
    rms = relative_rms_error(out, ref)
    diff = (out.detach().double() - ref).abs()
    peak = float(ref.abs().max())
    worst = float(diff.max()) if torch.isfinite(diff).all() else math.inf
    return rms, (worst / peak if peak > 0 else math.inf)


def _ratio(fused: float, unfused: float) -> float:
    if unfused == 0:
        return 1.0 if fused == 0 else math.inf
    return fused / unfused


@torch.no_grad()
def measure_model(name: str, *, device: torch.device, dtypes: list[str], batch: int, size: int | None, seed: int,
                  fusers: list, count_norm_calls) -> dict[str, Any]:
    """All three measurements for one zoo model; failures of a fuser are recorded, never raised."""
    from adapters.torch.suite.zoo import ZOO

    entry = ZOO[name]
    model = entry.build(seed).to(device)
    if size is None:
        x = entry.example_input(batch, seed).to(device)
    else:
        generator = torch.Generator().manual_seed(seed + 1)
        x = torch.randn((batch, entry.input_shape[0], size, size), generator=generator).to(device)
    reference = copy.deepcopy(model).double()(x.double())
    result: dict[str, Any] = {"model": name, "norm_layers": entry.norm_layers, "unfoldable": entry.unfoldable,
                              "input": list(x.shape), "dtypes": {}, "coverage": {}}
    small = x[:2]
    result["coverage"]["unfused"] = count_norm_calls(model, small)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        base = copy.deepcopy(model).to(dtype)
        xd = x.to(dtype)
        unfused_rms, unfused_max = _errors(base(xd), reference)
        # The original with every parameter rounded once more: the error a fused model carries by
        # storing its folded parameters in the dtype (refimpl.compare_models' `perturbed` baseline).
        rounded_rms = max(_errors(rounded_copy(base, trial)(xd), reference)[0] for trial in range(2))
        per_dtype: dict[str, Any] = {"unfused_rms": unfused_rms, "unfused_max": unfused_max,
                                     "rounded_rms": rounded_rms, "fusers": {}}
        folded_pairs = None
        rounded_folds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for fuser in fusers:
            record: dict[str, Any] = {}
            per_dtype["fusers"][fuser.name] = record
            if fuser.unavailable:
                record["error"] = fuser.unavailable
                continue
            start = time.perf_counter()
            try:
                fused, report = fuser.fuse(base)
            except Exception as exc:  # a peer that cannot handle a model is a result, not a crash
                record["error"] = short_error(exc)
                log.info("%s on %s (%s) failed: %s", fuser.name, name, dtype_name, exc)
                continue
            record["fuse_s"] = time.perf_counter() - start
            if report is not None:
                folded_pairs = report.folded
                record["folded"] = len(report.folded)
                record["skipped"] = {}
                for skip in report.skipped:
                    record["skipped"][skip.reason] = record["skipped"].get(skip.reason, 0) + 1
            try:
                rms, worst = _errors(fused(xd), reference)
            except Exception as exc:
                record["error"] = f"fused model fails to run: {short_error(exc)}"
                continue
            record.update(rms=rms, max=worst, rms_ratio=_ratio(rms, unfused_rms), max_ratio=_ratio(worst, unfused_max),
                          rms_ratio_rounded=_ratio(rms, max(unfused_rms, rounded_rms)))
            if folded_pairs is not None:
                record["rounding"] = rounding_stats(base, fused, folded_pairs, dtype, rounded_folds)
            if dtype_name == dtypes[0]:
                result["coverage"][fuser.name] = norm_evaluations(fused.to(torch.float32), small, count_norm_calls,
                                                                  model)
            del fused
        if folded_pairs is None:
            per_dtype["rounding_note"] = "ours did not run: no pairs to compare"
        result["dtypes"][dtype_name] = per_dtype
        del base
    return result


# ----------------------------------------------------------------------------------------------
# Tables.

def _cell_ratio(record: dict[str, Any], key: str) -> str:
    if "error" in record:
        return "fails"
    return format_ratio(record.get(key))


def build_tables(results: list[dict[str, Any]], fuser_names: list[str], dtypes: list[str]) -> list[Table]:
    accuracy = Table(
        "1. Accuracy: fused error / unfused error (relative RMS | relative max), against the float64 reference",
        ["model", "dtype", "unfused RMS err", "unfused max err"]
        + [f"{f} {m}" for f in fuser_names for m in ("RMS×", "max×")])
    baseline = Table(
        "1b. Against the parameter-rounded baseline: fused RMS error / max(unfused, original with every "
        "parameter rounded once more)",
        ["model", "dtype", "unfused RMS err", "rounded RMS err"] + [f"{f} RMS×" for f in fuser_names])
    rounding = Table(
        "2. Rounding: fused weights equal to the correctly rounded fold (% of elements; layers compared)",
        ["model", "dtype"] + [f"{f} weights" for f in fuser_names] + ["ours biases"])
    coverage = Table(
        f"3. Coverage: norm evaluations per forward pass, before and after fusion ({dtypes[0]})",
        ["model", "norms", "cannot fold", "left: " + ", ".join(fuser_names), "ours skipped (reason: count)",
         "wrong output"])
    worst_ours: tuple[float, str] | None = None
    worst_rounded: tuple[float, str] | None = None
    failures: dict[str, str] = {}
    for res in results:
        model = res["model"]
        if "error" in res:
            accuracy.rows.append([model, "—", f"not measured: {res['error']}", ""] + [""] * (2 * len(fuser_names)))
            continue
        for dtype_name, per in res["dtypes"].items():
            row = [model, dtype_name, format_float(per["unfused_rms"]), format_float(per["unfused_max"])]
            rrow = [model, dtype_name]
            for fname in fuser_names:
                rec = per["fusers"][fname]
                row += [_cell_ratio(rec, "rms_ratio"), _cell_ratio(rec, "max_ratio")]
                if "error" in rec:
                    failures.setdefault(f"{fname}: {rec['error']}", model)
                    rrow.append("fails")
                    continue
                rs = rec.get("rounding")
                if rs is None or not rs["weights"]:
                    rrow.append("— (0 layers)" if rs is not None else "—")
                else:
                    rrow.append(f"{100 * rs['weight_fraction']:.3f}% ({rs['layers']})")
                    if fname == "ours" and (worst_rounded is None or rs["weight_fraction"] < worst_rounded[0]):
                        worst_rounded = (rs["weight_fraction"], f"{model} {dtype_name}")
                if fname == "ours" and "rms_ratio" in rec:
                    if worst_ours is None or rec["rms_ratio"] > worst_ours[0]:
                        worst_ours = (rec["rms_ratio"], f"{model} {dtype_name}")
            ours_rec = per["fusers"].get("ours", {})
            rs = ours_rec.get("rounding")
            rrow.append(f"{100 * rs['bias_fraction']:.3f}%" if rs and rs["biases"] else "—")
            accuracy.rows.append(row)
            rounding.rows.append(rrow)
            baseline.rows.append([model, dtype_name, format_float(per["unfused_rms"]), format_float(per["rounded_rms"])]
                                 + [_cell_ratio(per["fusers"][f], "rms_ratio_rounded") for f in fuser_names])
            for fname in fuser_names:
                rec = per["fusers"][fname]
                accuracy.records.append({"model": model, "dtype": dtype_name, "fuser": fname,
                                         "unfused_rms": per["unfused_rms"], "unfused_max": per["unfused_max"],
                                         **{k: rec.get(k) for k in ("rms", "max", "rms_ratio", "max_ratio", "error")}})
                if rec.get("rounding"):
                    rounding.records.append({"model": model, "dtype": dtype_name, "fuser": fname, **rec["rounding"]})
        first = res["dtypes"][next(iter(res["dtypes"]))]
        cov = res["coverage"]
        left = ", ".join(str(cov.get(f, "fails")) for f in fuser_names)
        skipped = first["fusers"].get("ours", {}).get("skipped", {})
        # The project's error model (refimpl.compare_models with the parameter-rounded baseline).
        wrong = [f for f in fuser_names if first["fusers"][f].get("rms_ratio_rounded", 0) > MODEL_RATIO]
        coverage.rows.append([model, cov["unfused"], res["unfoldable"], left,
                              ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none",
                              ", ".join(wrong) or "none"])
        coverage.records.append({"model": model, "norms": cov["unfused"], "norm_layers": res["norm_layers"],
                                 "unfoldable": res["unfoldable"], "left": {f: cov.get(f) for f in fuser_names},
                                 "ours_skipped": skipped, "wrong_output": wrong})
    if worst_ours is not None:
        verdict = "met" if worst_ours[0] <= RMS_RATIO_TARGET else "NOT met"
        accuracy.notes.append(f"Worst RMS ratio of ours: {worst_ours[0]:.3f}× ({worst_ours[1]}); target ≤ "
                              f"{RMS_RATIO_TARGET}× {verdict}.")
    accuracy.notes.append("Ratios below 1 are real: a folded layer rounds fewer times than conv + BatchNorm.")
    accuracy.notes.append(f"'fails': the fuser raised or its model did not run; a ratio above {MODEL_RATIO:g}× "
                          "means the fused model computes something else (the error model's limit).")
    for what, model in failures.items():
        accuracy.notes.append(f"{what} (first seen on {model})")
    if worst_rounded is not None:
        verdict = "met" if worst_rounded[0] >= ROUNDED_TARGET else "NOT met"
        rounding.notes.append(f"Lowest fraction for ours: {100 * worst_rounded[0]:.3f}% ({worst_rounded[1]}); "
                              f"target ≥ {100 * ROUNDED_TARGET:.1f}% {verdict}.")
    rounding.notes.append("A layer is compared for a fuser when the fuser removed every norm ours folded into it; "
                          "'— (0 layers)': the fuser folded none of ours' pairs (mmcv folds only Conv2d, torch.fx "
                          "only exact torch classes).")
    coverage.notes.append("'cannot fold': worked out by hand per architecture (adapters/torch/suite/zoo.py). "
                          "A fuser that "
                          "leaves fewer has folded something that is not exact; 'wrong output' lists fusers whose "
                          f"fused model's RMS error exceeds {MODEL_RATIO:g}× the larger of the unfused model's own and "
                          "the parameter-rounded copies' (table 1b; refimpl.compare_models).")
    baseline.notes.append("A fused model must store its folded parameters rounded to the dtype; where a network is "
                          "more sensitive to its parameters than to the rounding of its activations, the unfused "
                          "error alone understates what any correct fold can reach (rounded RMS err: worst of 2 "
                          "copies, adapters.torch.rounded_copy).")
    return [accuracy, baseline, rounding, coverage]


def main(argv: list[str] | None = None) -> int:
    from adapters.torch.suite.zoo import ZOO

    parser = base_parser(__doc__.splitlines()[0], default_models=DEFAULT_MODELS, quick_models=QUICK_MODELS)
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated compute dtypes (fp32,fp16,bf16)")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the accuracy run (default 16)")
    parser.add_argument("--size", type=int, default=None,
                        help="input height and width (default: the zoo's small input, 64x64, on cpu; 224 on cuda)")
    parser.add_argument("--fusers", default=",".join(("ours", "mmcv", "torch.fx")),
                        help="comma-separated fusers to compare (ours,mmcv,torch.fx)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure_threads(args.threads)
    device = resolve_device(args.device)
    models = parse_models(args.models, args.quick, DEFAULT_MODELS, QUICK_MODELS, sorted(ZOO))
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise SystemExit(f"--dtypes: unknown {bad}; known: {', '.join(DTYPES)}")
    size = args.size if args.size is not None else (224 if device.type == "cuda" else None)
    notes = [check_rounding_helper()]
    if device.type == "cuda":
        notes.insert(0, disable_tf32() + ": fp32 means fp32.")
    from adapters.torch.suite.cases import count_norm_calls

    fusers = make_fusers([f.strip() for f in args.fusers.split(",") if f.strip()])
    started = time.perf_counter()
    results = []
    for name in models:
        t0 = time.perf_counter()
        try:
            results.append(measure_model(name, device=device, dtypes=dtypes, batch=args.batch, size=size,
                                         seed=args.seed, fusers=fusers, count_norm_calls=count_norm_calls))
        except Exception as exc:  # keep the other models' numbers
            log.exception("%s: not measured", name)
            results.append({"model": name, "error": short_error(exc)})
        log.info("%s done in %.1f s", name, time.perf_counter() - t0)
    input_desc = (f"{args.batch}x3x{size}x{size}" if size else f"{args.batch}x3x64x64 (zoo default)")
    report = Report(
        "Accuracy, rounding and coverage",
        machine_info(device),
        {"device": str(device), "input": input_desc, "dtypes": ",".join(dtypes), "seed": args.seed,
         "fusers": ",".join(f.name for f in fusers), "models": len(models),
         "wall_s": round(time.perf_counter() - started, 1)},
        build_tables(results, [f.name for f in fusers], dtypes),
        notes + ["Every fuser gets the same model already converted to the dtype (peers then fold in that dtype; "
                 "ours folds in float64 and rounds once)."])
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
