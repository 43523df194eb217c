"""Robustness sweep of the torch adapter: ``reparameterize``, ``fuse`` and ``verify`` on 113 timm/torchvision models.

Usage: ``python benchmarks/sweep_torch.py [--models timm/a,torchvision/b] [--quick] [--json [PATH]]
[--threads 1] [--seed 0]``

Not a speed benchmark: it checks that folding and merging never crash, never return a wrong model, never
touch the original, and merge at least as much as the models' own re-parameterisation code, on architectures
the tests do not build. Per model (the smallest variant of each timm / torchvision family):

- built with random weights (``torch.manual_seed(seed)``); models over 60 M parameters are skipped;
- the input is the smallest of 64, 96, 128, 224, 256 px the model accepts (batch 1 probe), then the BatchNorm
  statistics are randomised and calibrated (``adapters.torch.suite.zoo.randomize_calibrated_norm_stats``) and
  the model runs on ``x`` = 2x3xHxW random values;
- ``reparameterize(model, example_inputs=x)`` and ``fuse(model, example_inputs=x)``, each followed by
  ``verify(model, result, x)`` (the float64 reference, per layer);
- norm evaluations (``count_norm_calls``) and conv/linear calls (``count_layer_calls``) left in each result,
  and, where any submodule has its own ``reparameterize``/``fuse``, in ``timm.utils.reparameterize_model``'s;
- the original's module classes and parameter/buffer sums before and after (``fuse`` and ``reparameterize``
  must not modify it, also not when they raise).

Status per model: ``ok``; ``WRONG`` (verify fails); ``CRASH`` (reparameterize, fuse, verify or a count raised);
``MODIFIED`` (the original changed); ``BEHIND`` (more norms or conv/linear calls left than timm's own code);
``skipped`` (over 60 M parameters). The seconds are the process's CPU time of each call (1 torch thread by default).
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Report,
    Table,
    base_parser,
    configure_threads,
    format_counts,
    machine_info,
    parse_models,
    short_error,
)

log = logging.getLogger("bnfold.benchmarks.sweep_torch")

TIMM_MODELS = """
repvgg_a0 repvgg_b1g4 repvgg_d2se mobileone_s0 fastvit_t8 fastvit_mci0 repghostnet_050 repvit_m0_9 levit_128s
levit_conv_128s efficientvit_b0 efficientvit_m0 ghostnet_050 ghostnetv2_100 ghostnetv3_050 hgnet_tiny hgnetv2_b0
rexnet_100 rexnetr_100 cs3darknet_s cspnext_tiny cspresnet50 cspdarknet53 darknet17 dla34 dla46_c dla60_res2net dpn48b
res2net50_14w_8s res2next50 selecsls42b ese_vovnet19b_slim_dw ese_vovnet19b_dw vovnet39a regnetx_002 regnety_002
regnetz_005 regnetz_b16 convnext_atto inception_v3 inception_v4 inception_resnet_v2 inception_next_atto mixnet_s
efficientnet_b0 efficientnet_lite0 efficientnet_es efficientnet_cc_b0_4e mobilenetv3_small_050
mobilenetv4_conv_small_035 mobilenetv4_hybrid_medium_075 tinynet_e resnet10t resnet18d resnet26t resnet32ts gernet_s
lcnet_035 lcnetv2_small fbnetc_100 fbnetv3_b mnasnet_small spnasnet_100 densenet121 mobilevit_xxs mobilevitv2_050
edgenext_xx_small hrnet_w18_small tresnet_m skresnet18 resnest14d xception41p bat_resnext26ts eca_resnet33ts
gcresnet33ts sebotnet33ts_256 starnet_s050 efficientformer_l1 efficientformerv2_s0 poolformerv2_s12
coatnet_nano_rw_224 test_byobnet test_efficientnet test_resnet test_convnext test_nfnet rdnet_tiny mambaout_femto
csatv2 tiny_vit_5m_224 shvit_s1 efficientvim_m1 iformer_s nextvit_small
""".split()

#: torchvision architectures and the keyword arguments they are built with (besides ``weights=None``).
TORCHVISION_MODELS: dict[str, dict[str, Any]] = {
    "resnet18": {}, "resnext50_32x4d": {}, "wide_resnet50_2": {}, "mobilenet_v2": {}, "mobilenet_v3_small": {},
    "mobilenet_v3_large": {}, "efficientnet_b0": {}, "efficientnet_v2_s": {}, "regnet_x_400mf": {},
    "regnet_y_400mf": {}, "shufflenet_v2_x0_5": {}, "mnasnet0_5": {},
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "densenet121": {}, "squeezenet1_1": {}, "convnext_tiny": {}, "maxvit_t": {}, "swin_t": {},
}

MODELS = tuple([f"timm/{m}" for m in TIMM_MODELS] + [f"torchvision/{m}" for m in TORCHVISION_MODELS])
QUICK_MODELS = ("timm/repvgg_a0", "timm/test_efficientnet", "torchvision/resnet18")
INPUT_SIZES = (64, 96, 128, 224, 256)
MAX_PARAMS_M = 60.0
STATUSES = ("ok", "WRONG", "CRASH", "MODIFIED", "BEHIND", "skipped")


#: Import a library the models or variants asked for need, or exit with one line saying what to install.
require = functools.partial(common.require, script="benchmarks/sweep_torch.py",
                            purpose="for the models asked for")


def build(name: str, seed: int) -> nn.Module:
    library, arch = name.split("/", 1)
    torch.manual_seed(seed)
    if library == "torchvision":
        return getattr(require("torchvision").models, arch)(weights=None, **TORCHVISION_MODELS[arch])
    return require("timm").create_model(arch, pretrained=False)


def smallest_input_size(model: nn.Module) -> int:
    """The first of :data:`INPUT_SIZES` a batch-1 forward pass accepts (the largest if none does)."""
    for size in INPUT_SIZES:
        try:
            with torch.no_grad():
                model(torch.randn(1, 3, size, size))
            return size
        except Exception:  # too small for the model's strides or fixed attention size: try the next
            continue
    return INPUT_SIZES[-1]


def fingerprint(model: nn.Module) -> tuple[list[str], dict[str, float]]:
    """Module classes and the sum of every floating-point parameter/buffer: changes if the model is touched."""
    return ([type(m).__name__ for m in model.modules()],
            {k: float(v.double().sum()) for k, v in model.state_dict().items() if v.is_floating_point()})


def has_own_reparameterization(model: nn.Module) -> bool:
    return any(hasattr(m, "reparameterize") or hasattr(m, "fuse") for m in model.modules() if m is not model)


def reasons(items: Any) -> dict[str, int]:
    return dict(collections.Counter(item.reason for item in items))


@dataclass
class CallResult:
    """One call of ``reparameterize`` or ``fuse`` on a model, verified and counted."""

    seconds: float = 0.0
    error: str | None = None  # one line: which step raised and what
    modified: bool = False
    ok: bool | None = None
    ratio: float | None = None
    norms: int | None = None
    layers: int | None = None
    folded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    merges: int = 0
    merges_skipped: dict[str, int] = field(default_factory=dict)


def run_call(fn: Callable[..., Any], model: nn.Module, x: torch.Tensor) -> CallResult:
    from adapters.torch import verify
    from adapters.torch.suite.cases import count_norm_calls
    from adapters.torch.suite.merge_cases import count_layer_calls

    result = CallResult()
    before = fingerprint(model)
    start = time.process_time()
    try:
        out, report = fn(model, example_inputs=x)
    except Exception as exc:
        result.seconds = time.process_time() - start
        result.error = short_error(exc, 200)
        result.modified = fingerprint(model) != before
        return result
    result.seconds = time.process_time() - start
    result.modified = fingerprint(model) != before
    result.folded = len({p.norm for p in report.folded})
    result.skipped = reasons(report.skipped)
    result.merges = len(report.merged)
    result.merges_skipped = reasons(report.merges_skipped)
    try:
        verdict = verify(model, out, x)
        result.ok, result.ratio = bool(verdict.ok), float(verdict.ratio)
        if not verdict.ok and verdict.first_divergence is not None:
            result.error = verdict.first_divergence.describe()[:200]
    except Exception as exc:
        result.error = f"verify: {short_error(exc, 200)}"
    try:
        result.norms, result.layers = count_norm_calls(out, x), count_layer_calls(out, x)
    except Exception as exc:
        result.error = result.error or f"counting calls: {short_error(exc, 200)}"
    return result


def sweep_model(name: str, seed: int) -> dict[str, Any]:
    """One model's record (plain data): status, detail line, counts and seconds."""
    from adapters.torch import fuse, reparameterize
    from adapters.torch.suite.cases import count_norm_calls
    from adapters.torch.suite.merge_cases import count_layer_calls
    from adapters.torch.suite.zoo import randomize_calibrated_norm_stats

    started = time.process_time()
    model = build(name, seed).eval()
    record: dict[str, Any] = {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    if record["params_m"] > MAX_PARAMS_M:
        return dict(record, status="skipped", detail=f"{record['params_m']} M parameters > {MAX_PARAMS_M:g} M")
    size = smallest_input_size(model)
    shape = (3, size, size)
    randomize_calibrated_norm_stats(model, shape, torch.Generator().manual_seed(seed))
    model.eval()
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(seed + 1))
    record.update(input=size, norms=count_norm_calls(model, x), layers=count_layer_calls(model, x))
    calls = {"reparameterize": run_call(reparameterize, model, x), "fuse": run_call(fuse, model, x)}
    for label, result in calls.items():
        record[label] = vars(result)
    if has_own_reparameterization(model):
        from timm.utils import reparameterize_model

        try:
            theirs = reparameterize_model(copy.deepcopy(model))
            record["timm"] = {"norms": count_norm_calls(theirs, x), "layers": count_layer_calls(theirs, x)}
        except Exception as exc:  # the model's own code failing is a finding about timm, not about us
            record["timm"] = {"error": short_error(exc, 200)}
    record["seconds"] = round(time.process_time() - started, 2)
    record["status"], record["detail"] = judge(calls, record.get("timm"))
    return record


def judge(calls: dict[str, CallResult], timm: dict[str, Any] | None) -> tuple[str, str]:
    """The worst finding over both calls (CRASH > MODIFIED > WRONG > BEHIND > ok) and its one-line detail."""
    findings: list[tuple[str, str]] = []
    for label, result in calls.items():
        if result.ok is None or result.norms is None:
            findings.append(("CRASH", f"{label}: {result.error}"))
        if result.modified:
            findings.append(("MODIFIED", f"{label} changed the original model"))
        if result.ok is False:
            findings.append(("WRONG", f"{label}: ratio {result.ratio:.3g}; {result.error or ''}".rstrip("; ")))
    ours = calls["reparameterize"]
    if timm and "norms" in timm and ours.norms is not None and ours.layers is not None:
        if ours.norms > timm["norms"] or ours.layers > timm["layers"]:
            findings.append(("BEHIND", f"norms {ours.norms} (timm {timm['norms']}), "
                                       f"conv/linear calls {ours.layers} (timm {timm['layers']})"))
    if not findings:
        return "ok", ""
    findings.sort(key=lambda f: ("CRASH", "MODIFIED", "WRONG", "BEHIND").index(f[0]))
    return findings[0][0], "; ".join(detail for _, detail in findings)


def _value(value: Any) -> str:
    return "—" if value is None else str(value)


def table_row(r: dict[str, Any]) -> list[Any]:
    if r["status"] == "skipped" or "reparameterize" not in r:
        return [r["model"], r.get("params_m", "—"), r["status"], r.get("detail", "")] + ["—"] * 9
    ours, fused, timm = r["reparameterize"], r["fuse"], r.get("timm") or {}
    ratios = "/".join("—" if c["ratio"] is None else f"{c['ratio']:.2f}" for c in (ours, fused))
    timm_norms = f" ({timm['norms']})" if "norms" in timm else (" (timm fails)" if "error" in timm else "")
    timm_layers = f" ({timm['layers']})" if "layers" in timm else ""
    return [r["model"], r["params_m"], r["status"], r["detail"] or f"ratio {ratios}", r["input"],
            f"{r['norms']} → {_value(ours['norms'])}{timm_norms} / {_value(fused['norms'])}",
            f"{r['layers']} → {_value(ours['layers'])}{timm_layers}",
            ours["merges"], format_counts(ours["merges_skipped"]), format_counts(fused["skipped"]),
            f"{ours['seconds']:.1f}", f"{fused['seconds']:.1f}", f"{r['seconds']:.1f}"]


HEADERS = ["model", "params M", "status", "detail (verify ratio reparameterize/fuse)", "input px",
           "norms orig → reparameterize (timm) / fuse", "conv/linear calls orig → ours (timm)", "merges",
           "merges left (reasons)", "norms left by fuse (reasons)", "reparameterize s", "fuse s", "model s"]


def summary(records: list[dict[str, Any]], wall_s: float) -> str:
    counts = collections.Counter(r["status"] for r in records)
    parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s]]
    with_timm = [r for r in records if "norms" in (r.get("timm") or {})]
    return (f"{len(records)} models: {', '.join(parts)}; {len(with_timm)} with their own re-parameterisation "
            f"compared with timm.utils.reparameterize_model; {wall_s:.0f} s wall.")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], default_models=MODELS, quick_models=QUICK_MODELS)
    parser.set_defaults(threads=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.device != "cpu":
        raise SystemExit("benchmarks/sweep_torch.py runs on the CPU only")
    models = parse_models(args.models, args.quick, MODELS, QUICK_MODELS, MODELS)
    configure_threads(args.threads)
    for library in sorted({m.split("/", 1)[0] for m in models} | {"timm"}):  # timm: also reparameterize_model
        require(library)
    started = time.perf_counter()
    records = []
    for name in models:
        try:
            record = sweep_model(name, args.seed)
        except Exception as exc:  # building or running the unfused model failed: not a finding about folding
            log.exception("%s: not swept", name)
            record = {"model": name, "status": "CRASH", "detail": f"sweep: {short_error(exc, 200)}"}
        log.info("%s: %s %s", name, record["status"], record.get("detail", ""))
        records.append(record)
    wall_s = time.perf_counter() - started
    table = Table("reparameterize, fuse and verify on each model (random weights, calibrated random statistics)",
                  HEADERS, [table_row(r) for r in records], records)
    table.notes.append("norms/calls: evaluations during one forward pass; '(timm)' only for models with their own "
                       "reparameterize/fuse methods, run through timm.utils.reparameterize_model.")
    table.notes.append(f"Summary: {summary(records, wall_s)}")
    report = Report("Robustness sweep: reparameterize / fuse / verify", machine_info(torch.device("cpu")),
                    {"models": len(models), "seed": args.seed, "batch": 2, "wall_s": round(wall_s, 1)}, [table])
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
