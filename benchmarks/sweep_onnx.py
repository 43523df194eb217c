"""Robustness sweep of the ONNX adapter: ``fuse``, ``verify`` and the full checker on 31 real exported networks.

Usage: ``python benchmarks/sweep_onnx.py [--models torchvision/a,timm/b] [--quick] [--exports torchscript-17,dynamo]
[--variants fp16,...] [--convert-to 21] [--json [PATH]] [--threads 1] [--seed 0]``

Not a speed benchmark: it checks that folding real exports, in the forms users get them, never crashes, never
returns a wrong or invalid graph, never modifies its input, refuses what it cannot read with one clear line,
and that ``verify`` catches a wrong fold. Per network (torchvision and timm, random weights from
``torch.manual_seed(seed)``, calibrated random BatchNorm statistics from
``adapters.torch.suite.zoo.randomize_calibrated_norm_stats``; batch 1, 64x64 input, 96 for Inception, 224 for
LeViT, 32 for VGG; networks over 60 M parameters are skipped):

- exported with every BatchNormalization kept (``adapters.onnx.suite.zoo.export_keeping_bn``) by each of
  ``--exports`` (default: TorchScript opset 17, and dynamo at its default opset);
- variants of the TorchScript opset-17 export (``--variants``): ``fp16`` (every float tensor rounded once to
  float16: ``adapters.onnx.checking.retyped_copy``), ``extdata-loaded`` (saved with external data, fused by
  path), ``extdata-notloaded`` (loaded without its external data: ``fuse`` must refuse with one ValueError
  line, ``clear_error``), ``onnxsim`` and ``onnxslim`` (simplified first, their own BN fusion off); and
  ``--convert-to`` opsets through ``onnx.version_converter`` (off by default);
- each graph: ``fuse(model)`` (the input must be unchanged), ``onnx.checker.check_model(folded, full_check=True)``,
  the BatchNormalization nodes left with their reasons, ``verify(model, folded, feeds)`` (per node); on each
  base export a deliberately wrong fold (the first conv bias offset by 0.05 + 3% of its RMS on one channel)
  that ``verify`` must call wrong.

Status per graph: ``ok``; ``WRONG`` (verify fails); ``CRASH`` (fuse or verify raised); ``MODIFIED`` (the input
changed); ``INVALID`` (the folded graph fails the checker); ``clear_error`` / ``NO_ERROR`` (external data not
loaded: refused with one line / not refused -- right only when there is no BatchNormalization to read);
``EXPORT_FAIL`` / ``VARIANT_FAIL`` (the exporter or a variant's tool failed: not a finding about folding);
``skipped``. Seconds are wall time of fuse + checker + verify.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import collections  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, numpy_helper  # noqa: E402

import adapters.onnx as ao  # noqa: E402
from adapters.onnx.checking import retyped_copy  # noqa: E402
from adapters.onnx.suite.cases import count_batch_norms  # noqa: E402
from adapters.onnx.suite.zoo import export_keeping_bn  # noqa: E402
from adapters.torch.suite.zoo import randomize_calibrated_norm_stats  # noqa: E402
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

log = logging.getLogger("bnfold.benchmarks.sweep_onnx")


@dataclass(frozen=True)
class Network:
    """How to build one network of the sweep: library, architecture, keyword arguments, input size."""

    library: str  # "torchvision", "torchvision.segmentation" or "timm"
    arch: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    size: int = 64

    def build(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        kwargs = dict(self.kwargs)
        if self.library == "timm":
            return require("timm").create_model(self.arch, pretrained=False, **kwargs)
        models = require("torchvision").models
        if self.library == "torchvision.segmentation":
            return getattr(models.segmentation, self.arch)(weights=None, weights_backbone=None, num_classes=5,
                                                           **kwargs)
        return getattr(models, self.arch)(weights=None, **kwargs)


_INCEPTION = (("aux_logits", False), ("init_weights", True))
NETWORKS: dict[str, Network] = {
    **{f"torchvision/{arch}": Network("torchvision", arch) for arch in (
        "resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
        "shufflenet_v2_x0_5", "mnasnet0_5", "densenet121", "squeezenet1_1", "convnext_tiny")},
    "torchvision/googlenet": Network("torchvision", "googlenet", _INCEPTION),
    "torchvision/inception_v3": Network("torchvision", "inception_v3", _INCEPTION, size=96),
    "torchvision/vgg11_bn": Network("torchvision", "vgg11_bn", size=32),
    "torchvision/fcn_resnet50": Network("torchvision.segmentation", "fcn_resnet50", (("aux_loss", False),)),
    "torchvision/deeplabv3_mobilenet_v3_large": Network("torchvision.segmentation", "deeplabv3_mobilenet_v3_large",
                                                        (("aux_loss", False),)),
    "torchvision/lraspp_mobilenet_v3_large": Network("torchvision.segmentation", "lraspp_mobilenet_v3_large"),
    **{f"timm/{arch}": Network("timm", arch) for arch in (
        "repvgg_a0", "mixnet_s", "tf_efficientnet_b0", "dla34", "dpn48b", "res2net50_26w_4s", "ghostnet_100",
        "rexnet_100", "hrnet_w18_small", "selecsls42b", "cspresnet50", "ese_vovnet19b_dw")},
    "timm/levit_128s": Network("timm", "levit_128s", (("img_size", 224),), size=224),
    "timm/inception_v3": Network("timm", "inception_v3", size=96),
}
MODELS = tuple(NETWORKS)
QUICK_MODELS = ("torchvision/resnet18", "timm/repvgg_a0")
EXPORTS = ("torchscript-17", "dynamo")
VARIANTS = ("fp16", "extdata-loaded", "extdata-notloaded", "onnxsim", "onnxslim")
VARIANT_TOOLS = {"onnxsim": "onnxsim", "onnxslim": "onnxslim"}
MAX_PARAMS_M = 60.0
STATUSES = ("ok", "WRONG", "CRASH", "MODIFIED", "INVALID", "clear_error", "NO_ERROR", "EXPORT_FAIL", "VARIANT_FAIL",
            "skipped")


#: Import a library the models or variants asked for need, or exit with one line saying what to install.
require = functools.partial(common.require, script="benchmarks/sweep_onnx.py",
                            purpose="for the models or variants asked for")


def parse_export(text: str) -> tuple[str, int | None]:
    """``torchscript-17`` -> ("torchscript", 17); ``dynamo`` -> ("dynamo", None: the exporter's default)."""
    exporter, _, opset = text.partition("-")
    if exporter not in ("torchscript", "dynamo") or (opset and not opset.isdigit()):
        raise SystemExit(f"--exports: {text!r} is not EXPORTER[-OPSET] with EXPORTER torchscript or dynamo")
    return exporter, int(opset) if opset else None


def sabotaged(folded: onnx.ModelProto) -> onnx.ModelProto | None:
    """A deliberately wrong fold: the first conv bias offset by 0.05 + 3% of its RMS on channel 0 (None: no bias)."""
    bad = onnx.ModelProto()
    bad.CopyFrom(folded)
    initializers = {t.name: t for t in bad.graph.initializer}
    for node in bad.graph.node:
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in initializers:
            tensor = initializers[node.input[2]]
            bias = numpy_helper.to_array(tensor).copy()
            rms = np.sqrt(np.mean(bias.astype(np.float64) ** 2))
            bias.flat[0] += np.asarray(0.05 + 0.03 * rms, bias.dtype)
            tensor.CopyFrom(numpy_helper.from_array(bias, tensor.name))
            return bad
    return None


def check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, source: onnx.ModelProto | str | None = None,
          sabotage: bool = False) -> dict[str, Any]:
    """Fuse ``source`` (default: ``model``; a path for external data), check and verify the result against ``model``."""
    started = time.perf_counter()
    record: dict[str, Any] = {"bn_before": count_batch_norms(model)}
    before = model.SerializeToString()
    try:
        folded, report = ao.fuse(model if source is None else source)
    except Exception as exc:
        return dict(record, status="CRASH", detail=f"fuse: {short_error(exc, 200)}",
                    seconds=time.perf_counter() - started)
    record.update(bn_left=count_batch_norms(folded), folds=len(report.folded),
                  reasons=dict(collections.Counter(s.reason for s in report.skipped)))
    findings: list[tuple[str, str]] = []
    if model.SerializeToString() != before:
        findings.append(("MODIFIED", "fuse changed its input"))
    try:
        onnx.checker.check_model(folded, full_check=True)
    except Exception as exc:
        findings.append(("INVALID", f"checker: {short_error(exc, 200)}"))
    try:
        verdict = ao.verify(model, folded, feeds)
        record["ratio"] = verdict.ratio
        if not verdict.ok:
            divergence = verdict.first_divergence.describe() if verdict.first_divergence else ""
            findings.append(("WRONG", f"ratio {verdict.ratio:.3g}; {divergence}"[:200]))
    except Exception as exc:
        findings.append(("CRASH", f"verify: {short_error(exc, 200)}"))
    findings.sort(key=lambda f: ("CRASH", "MODIFIED", "WRONG", "INVALID").index(f[0]))
    record["status"] = findings[0][0] if findings else "ok"
    record["detail"] = "; ".join(detail for _, detail in findings)
    if sabotage and record["status"] == "ok":
        bad = sabotaged(folded)
        if bad is None:
            record["sabotage"] = "no conv bias"
        else:
            try:
                record["sabotage"] = "MISSED" if ao.verify(model, bad, feeds).ok else "caught"
            except Exception as exc:
                record["sabotage"] = f"verify raised {short_error(exc, 120)}"
    record["seconds"] = time.perf_counter() - started
    return record


def check_refused(model: onnx.ModelProto) -> dict[str, Any]:
    """A model whose external data is not loaded: ``fuse`` must refuse it with one ValueError line."""
    started = time.perf_counter()
    record: dict[str, Any] = {"bn_before": count_batch_norms(model)}
    before = model.SerializeToString()
    try:
        ao.fuse(model)
        record.update(status="NO_ERROR", detail="fuse returned" + (" (no BatchNormalization to read)"
                                                                   if record["bn_before"] == 0 else ""))
    except ValueError as exc:
        record.update(status="clear_error", detail=short_error(exc, 200))
    except Exception as exc:
        record.update(status="CRASH", detail=f"fuse: {short_error(exc, 200)}")
    if model.SerializeToString() != before:
        record.update(status="MODIFIED", detail="fuse changed its input")
    record["seconds"] = time.perf_counter() - started
    return record


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def run_variant(variant: str, base: onnx.ModelProto, feeds: dict[str, np.ndarray], folder: str) -> dict[str, Any]:
    """Make ``variant`` of the base export and check it; a variant its tool cannot make is VARIANT_FAIL."""
    source: onnx.ModelProto | str | None = None
    try:
        if variant == "fp16":
            model = retyped_copy(base, TensorProto.FLOAT16)
            onnx.checker.check_model(model, full_check=True)
            feeds = {name: value.astype(np.float16) for name, value in feeds.items()}
        elif variant.startswith("extdata-"):
            path = os.path.join(folder, f"{variant}.onnx")
            onnx.save_model(_copy(base), path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{variant}.data", size_threshold=0)
            if variant == "extdata-notloaded":
                return check_refused(onnx.load(path, load_external_data=False))
            model, source = onnx.load(path), path
        elif variant == "onnxsim":
            model, _ = require("onnxsim").simplify(_copy(base), skip_fuse_bn=True)
        elif variant == "onnxslim":
            model = require("onnxslim").slim(_copy(base),
                                             skip_fusion_patterns=["FusionConvBN", "FusionConvTransposeBN"])
        elif variant.startswith("opset"):
            from onnx import version_converter

            model = version_converter.convert_version(base, int(variant[len("opset"):]))
            onnx.checker.check_model(model, full_check=True)
        else:
            raise ValueError(f"unknown variant {variant!r}")
    except Exception as exc:
        return {"status": "VARIANT_FAIL", "detail": short_error(exc, 200)}
    return check(model, feeds, source=source)


def sweep_network(name: str, exports: list[tuple[str, int | None]], variants: list[str], seed: int,
                  emit: Callable[[dict[str, Any]], None]) -> None:
    """Every record of one network: each export, then the variants of the TorchScript opset-17 export."""
    network = NETWORKS[name]
    model = network.build(seed)
    params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    if params_m > MAX_PARAMS_M:
        emit({"model": name, "status": "skipped", "detail": f"{params_m} M parameters > {MAX_PARAMS_M:g} M"})
        return
    shape = (3, network.size, network.size)
    randomize_calibrated_norm_stats(model, shape, torch.Generator().manual_seed(seed))
    model.eval()
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + 1))
    feeds = {"input": x.numpy()}
    for exporter, opset in exports:
        where: dict[str, Any] = {"model": name, "exporter": exporter, "opset": opset, "input": network.size}
        started = time.perf_counter()
        try:
            base = export_keeping_bn(model, (x,), exporter=exporter, opset=opset, input_names=["input"])
        except Exception as exc:
            emit(dict(where, variant="base", dtype="float32", status="EXPORT_FAIL", detail=short_error(exc, 200)))
            continue
        where["export_s"] = time.perf_counter() - started
        emit(dict(where, variant="base", dtype="float32", **check(base, feeds, sabotage=True)))
        if (exporter, opset) == ("torchscript", 17):
            with tempfile.TemporaryDirectory() as folder:
                for variant in variants:
                    dtype = "float16" if variant == "fp16" else "float32"
                    emit(dict(where, variant=variant, dtype=dtype, **run_variant(variant, base, feeds, folder)))


def table_row(r: dict[str, Any]) -> list[Any]:
    bn = f"{r['bn_before']} → {r['bn_left']}" if "bn_left" in r else str(r.get("bn_before", "—"))
    detail = r.get("detail") or (f"ratio {r['ratio']:.2f}" if r.get("ratio") is not None else "")
    opset = r.get("opset") or ("default" if r.get("exporter") else "—")
    seconds = f"{r['seconds']:.1f}" if "seconds" in r else "—"
    return [r["model"], r.get("exporter", "—"), opset, r.get("variant", "—"), r.get("dtype", "—"), r["status"], bn,
            format_counts(r.get("reasons")), r.get("sabotage", "—"), seconds, detail]


HEADERS = ["model", "exporter", "opset", "variant", "dtype", "status", "BN before → left", "reasons left",
           "sabotaged fold", "s", "detail (verify ratio, or the one line)"]


def summary(records: list[dict[str, Any]], wall_s: float) -> str:
    counts = collections.Counter(r["status"] for r in records)
    parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s]]
    sabotaged_runs = [r["sabotage"] for r in records if r.get("sabotage") not in (None, "no conv bias")]
    caught = sum(s == "caught" for s in sabotaged_runs)
    networks = len({r["model"] for r in records})
    return (f"{networks} networks, {len(records)} graphs: {', '.join(parts)}; sabotaged folds caught "
            f"{caught}/{len(sabotaged_runs)}; {wall_s:.0f} s wall.")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], default_models=MODELS, quick_models=QUICK_MODELS)
    parser.set_defaults(threads=1)
    parser.add_argument("--exports", default=",".join(EXPORTS),
                        help=f"EXPORTER[-OPSET] list (default {','.join(EXPORTS)}; e.g. torchscript-9 as well)")
    parser.add_argument("--variants", default=None,
                        help=f"variants of the torchscript-17 export (default {','.join(VARIANTS)}; --quick: fp16, "
                             "extdata-notloaded, onnxslim; 'none' for none)")
    parser.add_argument("--convert-to", default="",
                        help="also convert the torchscript-17 export to these opsets with onnx.version_converter "
                             "(e.g. 21; default none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.device != "cpu":
        raise SystemExit("benchmarks/sweep_onnx.py runs on the CPU only")
    models = parse_models(args.models, args.quick, MODELS, QUICK_MODELS, MODELS)
    exports = [parse_export(e.strip()) for e in args.exports.split(",") if e.strip()]
    default_variants = ("fp16", "extdata-notloaded", "onnxslim") if args.quick else VARIANTS
    variants = [v.strip() for v in (args.variants or ",".join(default_variants)).split(",") if v.strip()]
    variants = [] if variants == ["none"] else variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    variants += [f"opset{int(o)}" for o in args.convert_to.split(",") if o.strip()]
    configure_threads(args.threads)
    for library in sorted({NETWORKS[m].library.split(".")[0] for m in models}
                          | {VARIANT_TOOLS[v] for v in variants if v in VARIANT_TOOLS}):
        require(library)
    started = time.perf_counter()
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        log.info("%s", record)
        records.append(record)

    for name in models:
        try:
            sweep_network(name, exports, variants, args.seed, emit)
        except Exception as exc:  # building or calibrating the torch network failed: not a finding about folding
            log.exception("%s: not swept", name)
            emit({"model": name, "status": "EXPORT_FAIL", "detail": f"build: {short_error(exc, 200)}"})
    wall_s = time.perf_counter() - started
    table = Table("fuse, checker and verify on each export and variant (random weights, calibrated statistics)",
                  HEADERS, [table_row(r) for r in records], records)
    table.notes.append("sabotaged fold: verify on the folded base export with one conv bias offset on one channel "
                       "(caught = verify says it is wrong).")
    table.notes.append(f"Summary: {summary(records, wall_s)}")
    report = Report("Robustness sweep: ONNX fuse / verify", machine_info(torch.device("cpu")),
                    {"networks": len(models), "exports": args.exports, "variants": ",".join(variants) or "none",
                     "seed": args.seed, "batch": 1, "wall_s": round(wall_s, 1)}, [table])
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
