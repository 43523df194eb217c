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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from adapters.torch.checking import rounded_copy  # noqa: E402
from benchmarks.common import (  # noqa: E402
    DTYPES,
    FUSER_NAMES,
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

def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolating linearly between closest ranks.

    The sorted values sit at ranks ``0 .. n-1``; the percentile is at rank ``h = (n - 1) * q / 100``,
    between the values at ``floor(h)`` and ``floor(h) + 1`` (numpy's default, Hyndman and Fan's
    type 7). NaN counts as +inf: a batch whose output is not a number is the worst batch, not a
    hole in the statistic.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    ordered = sorted(math.inf if math.isnan(v) else v for v in values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    if rank == low:
        return ordered[low]
    return ordered[low] + (rank - low) * (ordered[low + 1] - ordered[low])


def ratio_statistics(fused: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                     seeds: Sequence[int]) -> dict[str, Any]:
    """Median, 90th percentile and worst of the per-batch ratios ``fused[i][j] / baseline[i][j]``.

    ``fused`` and ``baseline`` hold one error per model seed (``seeds[i]``) and input batch ``j``.
    Returns ``{"median", "p90", "worst": {"ratio", "seed", "batch"}, "ratios", "n"}``; ``ratios``
    keeps every batch's ratio, seed by seed.
    """
    if len(fused) != len(baseline) or len(fused) != len(seeds):
        raise ValueError(f"{len(fused)} seeds of fused errors, {len(baseline)} of baseline errors, "
                         f"{len(seeds)} seeds")
    ratios = []
    for fused_row, base_row in zip(fused, baseline, strict=True):
        if len(fused_row) != len(base_row):
            raise ValueError(f"{len(fused_row)} fused batch errors against {len(base_row)} baseline errors")
        ratios.append([_ratio(f, b) for f, b in zip(fused_row, base_row, strict=True)])
    flat = [(math.inf if math.isnan(r) else r, i, j) for i, row in enumerate(ratios) for j, r in enumerate(row)]
    worst, seed_index, batch = max(flat)
    values = [r for r, _, _ in flat]
    return {"median": percentile(values, 50), "p90": percentile(values, 90),
            "worst": {"ratio": worst, "seed": seeds[seed_index], "batch": batch}, "ratios": ratios, "n": len(flat)}


def _batch_errors(out: torch.Tensor, ref: torch.Tensor, batch: int) -> tuple[list[float], list[float]]:
    """Relative RMS and relative max error of every consecutive ``batch`` samples of ``out`` against ``ref``."""
    rms, worst = [], []
    for start in range(0, ref.shape[0], batch):
        r, w = _errors(out[start:start + batch], ref[start:start + batch])
        rms.append(r)
        worst.append(w)
    return rms, worst


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


def input_batches(entry: Any, *, batches: int, batch: int, size: int | None, seed: int) -> torch.Tensor:
    """``batches`` independent standard-normal batches of ``batch`` samples, stacked along dim 0.

    Batch ``j`` is drawn from its own generator (seeded by ``seed`` and ``j``), so a batch does not
    depend on how many others are drawn. The stack runs as one forward pass and is judged batch by
    batch: an eval-mode network treats every sample on its own.
    """
    channels, height, width = entry.input_shape
    if size is not None:
        height = width = size
    parts = [torch.randn((batch, channels, height, width), generator=torch.Generator().manual_seed(seed * 1000 + j))
             for j in range(batches)]
    return torch.cat(parts)


@torch.no_grad()
def measure_model(name: str, *, device: torch.device, dtypes: list[str], batch: int, batches: int,
                  seeds: list[int], size: int | None, fusers: list, count_norm_calls) -> dict[str, Any]:
    """All three measurements for one zoo model; failures of a fuser are recorded, never raised.

    Accuracy over every seed and batch; rounding and coverage on the first seed (they do not depend
    on the input, and the correctly rounded folds in longdouble are the slow part).
    """
    from adapters.torch.suite.zoo import ZOO

    entry = ZOO[name]
    result: dict[str, Any] = {"model": name, "norm_layers": entry.norm_layers, "unfoldable": entry.unfoldable,
                              "seeds": seeds, "batches": batches, "batch": batch, "dtypes": {}, "coverage": {}}
    per_dtype: dict[str, dict[str, Any]] = {
        d: {"unfused_rms": [], "unfused_max": [], "rounded_rms": [],
            "fusers": {f.name: {"rms": [], "max": [], "fuse_s": []} for f in fusers}} for d in dtypes}
    for seed in seeds:
        model = entry.build(seed).to(device)
        x = input_batches(entry, batches=batches, batch=batch, size=size, seed=seed).to(device)
        result["input"] = [batch, *x.shape[1:]]
        reference = copy.deepcopy(model).double()(x.double())
        first_seed = seed == seeds[0]
        small = x[:2]
        if first_seed:
            result["coverage"]["unfused"] = count_norm_calls(model, small)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            per = per_dtype[dtype_name]
            base = copy.deepcopy(model).to(dtype)
            xd = x.to(dtype)
            rms, worst = _batch_errors(base(xd), reference, batch)
            per["unfused_rms"].append(rms)
            per["unfused_max"].append(worst)
            # The original with every parameter rounded once more: the error a fused model carries by
            # storing its folded parameters in the dtype (refimpl.compare_models' `perturbed` baseline),
            # the worse of two draws per batch.
            trials = [_batch_errors(rounded_copy(base, trial)(xd), reference, batch)[0] for trial in range(2)]
            per["rounded_rms"].append([max(values) for values in zip(*trials, strict=True)])
            folded_pairs = None
            rounded_folds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for fuser in fusers:
                record = per["fusers"][fuser.name]
                if "error" in record:
                    continue  # failed on an earlier seed: one failure is the finding
                start = time.perf_counter()
                try:
                    fused, report = fuser.fuse(base, (xd[:batch],))
                except Exception as exc:  # a peer that cannot handle a model is a result, not a crash
                    record["error"] = short_error(exc)
                    log.info("%s on %s (%s, seed %d) failed: %s", fuser.name, name, dtype_name, seed, exc)
                    continue
                record["fuse_s"].append(time.perf_counter() - start)
                if report is not None and first_seed:
                    folded_pairs = report.folded
                    record["folded"] = len(report.folded)
                    record["skipped"] = {}
                    for skip in report.skipped:
                        record["skipped"][skip.reason] = record["skipped"].get(skip.reason, 0) + 1
                try:
                    rms, worst = _batch_errors(fused(xd), reference, batch)
                except Exception as exc:
                    record["error"] = f"fused model fails to run: {short_error(exc)}"
                    continue
                record["rms"].append(rms)
                record["max"].append(worst)
                if first_seed:
                    if folded_pairs is not None:
                        record["rounding"] = rounding_stats(base, fused, folded_pairs, dtype, rounded_folds)
                    if dtype_name == dtypes[0]:
                        result["coverage"][fuser.name] = norm_evaluations(fused.to(torch.float32), small,
                                                                          count_norm_calls, model)
                del fused
            if first_seed and folded_pairs is None:
                per["rounding_note"] = "ours did not run: no pairs to compare"
            del base
        del model, reference
    for dtype_name, per in per_dtype.items():
        for record in per["fusers"].values():
            if "error" in record:
                continue
            record["rms_stats"] = ratio_statistics(record["rms"], per["unfused_rms"], seeds)
            record["max_stats"] = ratio_statistics(record["max"], per["unfused_max"], seeds)
            baseline = [[max(u, r) for u, r in zip(us, rs, strict=True)]
                        for us, rs in zip(per["unfused_rms"], per["rounded_rms"], strict=True)]
            record["rounded_stats"] = ratio_statistics(record["rms"], baseline, seeds)
        result["dtypes"][dtype_name] = per
    return result


# ----------------------------------------------------------------------------------------------
# Tables.

def _cell(record: dict[str, Any], key: str, part: str) -> str:
    if "error" in record:
        return "fails"
    stats = record.get(key)
    return "—" if stats is None else format_ratio(stats[part])


def _median_error(rows: list[list[float]]) -> float:
    return percentile([v for row in rows for v in row], 50)


def build_tables(results: list[dict[str, Any]], fuser_names: list[str], dtypes: list[str]) -> list[Table]:
    accuracy = Table(
        "1. Accuracy: fused RMS error / unfused RMS error, per batch against the float64 reference; median and "
        "90th percentile over seeds x batches",
        ["model", "dtype", "unfused RMS err (median)"] + [f"{f} {m}" for f in fuser_names for m in ("median×", "p90×")])
    baseline = Table(
        "1b. Against the parameter-rounded baseline: fused RMS error / max(unfused, original with every parameter "
        "rounded once more), per batch; median and 90th percentile",
        ["model", "dtype", "unfused RMS err (median)", "rounded RMS err (median)"]
        + [f"{f} {m}" for f in fuser_names for m in ("median×", "p90×")])
    rounding = Table(
        "2. Rounding: fused weights equal to the correctly rounded fold (% of elements; layers compared), first seed",
        ["model", "dtype"] + [f"{f} weights" for f in fuser_names] + ["ours biases"])
    coverage = Table(
        f"3. Coverage: norm evaluations per forward pass, before and after fusion ({dtypes[0]}, first seed)",
        ["model", "norms", "cannot fold", "left: " + ", ".join(fuser_names), "ours skipped (reason: count)",
         "wrong output"])
    worst_ours: tuple[float, str] | None = None
    worst_rounded: tuple[float, str] | None = None
    failures: dict[str, str] = {}
    for res in results:
        model = res["model"]
        if "error" in res:
            accuracy.rows.append([model, "—", f"not measured: {res['error']}"] + [""] * (2 * len(fuser_names)))
            continue
        for dtype_name, per in res["dtypes"].items():
            row = [model, dtype_name, format_float(_median_error(per["unfused_rms"]))]
            brow = [model, dtype_name, format_float(_median_error(per["unfused_rms"])),
                    format_float(_median_error(per["rounded_rms"]))]
            rrow = [model, dtype_name]
            for fname in fuser_names:
                rec = per["fusers"][fname]
                row += [_cell(rec, "rms_stats", "median"), _cell(rec, "rms_stats", "p90")]
                brow += [_cell(rec, "rounded_stats", "median"), _cell(rec, "rounded_stats", "p90")]
                if "error" in rec:
                    failures.setdefault(f"{fname}: {rec['error']}", f"{model} {dtype_name}")
                    rrow.append("fails")
                    continue
                rs = rec.get("rounding")
                if rs is None or not rs["weights"]:
                    rrow.append("— (0 layers)" if rs is not None else "—")
                else:
                    rrow.append(f"{100 * rs['weight_fraction']:.3f}% ({rs['layers']})")
                    if fname == "ours" and (worst_rounded is None or rs["weight_fraction"] < worst_rounded[0]):
                        worst_rounded = (rs["weight_fraction"], f"{model} {dtype_name}")
                if fname == "ours":
                    median = rec["rms_stats"]["median"]
                    if worst_ours is None or median > worst_ours[0]:
                        worst_ours = (median, f"{model} {dtype_name}")
            ours_rec = per["fusers"].get("ours", {})
            rs = ours_rec.get("rounding")
            rrow.append(f"{100 * rs['bias_fraction']:.3f}%" if rs and rs["biases"] else "—")
            accuracy.rows.append(row)
            baseline.rows.append(brow)
            rounding.rows.append(rrow)
            for fname in fuser_names:
                rec = per["fusers"][fname]
                record: dict[str, Any] = {"model": model, "dtype": dtype_name, "fuser": fname,
                                          "seeds": res["seeds"], "batches": res["batches"], "batch": res["batch"]}
                if "error" in rec:
                    record["error"] = rec["error"]
                else:
                    record.update({key: rec[key] for key in ("rms_stats", "max_stats", "rounded_stats")})
                    record["rms"] = rec["rms"]
                accuracy.records.append(record)
                if rec.get("rounding"):
                    rounding.records.append({"model": model, "dtype": dtype_name, "fuser": fname, **rec["rounding"]})
            accuracy.records.append({"model": model, "dtype": dtype_name, "fuser": "unfused",
                                     "rms": per["unfused_rms"], "max": per["unfused_max"],
                                     "rounded_rms": per["rounded_rms"]})
        first = res["dtypes"][next(iter(res["dtypes"]))]
        cov = res["coverage"]
        left = ", ".join(str(cov.get(f, "fails")) for f in fuser_names)
        skipped = first["fusers"].get("ours", {}).get("skipped", {})
        # The project's error model (refimpl.compare_models with the parameter-rounded baseline), on the
        # median batch: a model is wrong when it computes something else, not when one batch is unlucky.
        wrong = [f for f in fuser_names if "error" not in first["fusers"][f]
                 and first["fusers"][f]["rounded_stats"]["median"] > MODEL_RATIO]
        coverage.rows.append([model, cov["unfused"], res["unfoldable"], left,
                              ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none",
                              ", ".join(wrong) or "none"])
        coverage.records.append({"model": model, "norms": cov["unfused"], "norm_layers": res["norm_layers"],
                                 "unfoldable": res["unfoldable"], "left": {f: cov.get(f) for f in fuser_names},
                                 "ours_skipped": skipped, "wrong_output": wrong})
    if worst_ours is not None:
        verdict = "met" if worst_ours[0] <= RMS_RATIO_TARGET else "NOT met"
        accuracy.notes.append(f"Worst median RMS ratio of ours: {worst_ours[0]:.3f}× ({worst_ours[1]}); target ≤ "
                              f"{RMS_RATIO_TARGET}× (median) {verdict}.")
    accuracy.notes.append("Each ratio is one batch's fused relative RMS error over the unfused model's on the same "
                          "batch; the JSON output keeps every batch's ratio and the worst (with its seed and batch).")
    accuracy.notes.append("Ratios below 1 are real: a folded layer rounds fewer times than conv + BatchNorm.")
    accuracy.notes.append(f"'fails': the fuser raised or its model did not run; a ratio above {MODEL_RATIO:g}× "
                          "means the fused model computes something else (the error model's limit).")
    for what, where in failures.items():
        accuracy.notes.append(f"{what} (first seen on {where})")
    if worst_rounded is not None:
        verdict = "met" if worst_rounded[0] >= ROUNDED_TARGET else "NOT met"
        rounding.notes.append(f"Lowest fraction for ours: {100 * worst_rounded[0]:.3f}% ({worst_rounded[1]}); "
                              f"target ≥ {100 * ROUNDED_TARGET:.1f}% {verdict}.")
    rounding.notes.append("A layer is compared for a fuser when the fuser removed every norm ours folded into it; "
                          "'— (0 layers)': the fuser folded none of ours' pairs (mmcv folds only Conv2d, torch.fx "
                          "only exact torch classes).")
    coverage.notes.append("'cannot fold': worked out by hand per architecture (adapters/torch/suite/zoo.py). A fuser "
                          "that leaves fewer has folded something that is not exact; 'wrong output' lists fusers whose "
                          f"median batch RMS error exceeds {MODEL_RATIO:g}× the larger of the unfused model's own and "
                          "the parameter-rounded copies' (table 1b; refimpl.compare_models).")
    baseline.notes.append("A fused model must store its folded parameters rounded to the dtype; where a network is "
                          "more sensitive to its parameters than to the rounding of its activations, the unfused "
                          "error alone understates what any correct fold can reach (rounded RMS err: per batch the "
                          "worse of 2 copies, adapters.torch.rounded_copy).")
    return [accuracy, baseline, rounding, coverage]


def main(argv: list[str] | None = None) -> int:
    from adapters.torch.suite.zoo import ZOO

    parser = base_parser(__doc__.splitlines()[0], default_models=DEFAULT_MODELS, quick_models=QUICK_MODELS)
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated compute dtypes (fp32,fp16,bf16)")
    parser.add_argument("--batch", type=int, default=None,
                        help="samples per batch (default: 16 on cuda, 8 on cpu)")
    parser.add_argument("--batches", type=int, default=8, help="independent input batches per seed (default 8)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="model seeds: random weights and randomised BatchNorm statistics, --seed, --seed+1, ... "
                             "(default 3)")
    parser.add_argument("--size", type=int, default=None,
                        help="input height and width (default: the zoo's small input, 64x64, on cpu; 224 on cuda)")
    parser.add_argument("--fusers", default=",".join(FUSER_NAMES),
                        help=f"comma-separated fusers to compare ({','.join(FUSER_NAMES)}; default: all, those that "
                             "do not import here are left out with a note)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure_threads(args.threads)
    device = resolve_device(args.device)
    models = parse_models(args.models, args.quick, DEFAULT_MODELS, QUICK_MODELS, sorted(ZOO))
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise SystemExit(f"--dtypes: unknown {bad}; known: {', '.join(DTYPES)}")
    batch = args.batch if args.batch is not None else (16 if device.type == "cuda" else 8)
    for option, value in (("--batch", batch), ("--batches", args.batches), ("--seeds", args.seeds)):
        if value < 1:
            raise SystemExit(f"{option} must be >= 1, got {value}")
    seeds = [args.seed + k for k in range(args.seeds)]
    size = args.size if args.size is not None else (224 if device.type == "cuda" else None)
    notes = [check_rounding_helper()]
    if device.type == "cuda":
        notes.insert(0, disable_tf32() + ": fp32 means fp32.")
    from adapters.torch.suite.cases import count_norm_calls

    requested = [f.strip() for f in args.fusers.split(",") if f.strip()]
    try:
        fusers = make_fusers(requested)
    except ValueError as exc:
        raise SystemExit(f"--fusers: {exc}") from None
    for fuser in fusers:
        if fuser.unavailable:
            notes.append(f"{fuser.name} left out: {fuser.unavailable}.")
    fusers = [f for f in fusers if not f.unavailable]
    started = time.perf_counter()
    results = []
    for name in models:
        t0 = time.perf_counter()
        try:
            results.append(measure_model(name, device=device, dtypes=dtypes, batch=batch, batches=args.batches,
                                         seeds=seeds, size=size, fusers=fusers, count_norm_calls=count_norm_calls))
        except Exception as exc:  # keep the other models' numbers
            log.exception("%s: not measured", name)
            results.append({"model": name, "error": short_error(exc)})
        print(f"{name}: measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    input_desc = f"{args.batches} batches of {batch}x3x{size or 64}x{size or 64}" + ("" if size else " (zoo default)")
    report = Report(
        "Accuracy, rounding and coverage",
        machine_info(device),
        {"device": str(device), "input": input_desc, "dtypes": ",".join(dtypes),
         "seeds": ",".join(map(str, seeds)), "fusers": ",".join(f.name for f in fusers), "models": len(models),
         "wall_s": round(time.perf_counter() - started, 1)},
        build_tables(results, [f.name for f in fusers], dtypes),
        notes + ["Every fuser gets the same model already converted to the dtype (peers then fold in that dtype; "
                 "ours folds in float64 and rounds once); a fuser that takes example inputs (AIMET) gets the first "
                 "batch.",
                 "Seeds: each builds the zoo model anew with its own random weights and randomised, calibrated "
                 "BatchNorm statistics (adapters/torch/suite/zoo.py), and draws its own input batches."])
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
