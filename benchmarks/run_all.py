"""Run every benchmark script side by side and collect their tables, as markdown, in one folder.

Usage: ``python benchmarks/run_all.py OUT_DIR [--device cpu|cuda] [--quick] [--only accuracy,latency,...]
[--timeout SECONDS]``

Each script runs in its own process (one crash or timeout loses only its own table) with its
stdout -- the markdown tables -- in ``OUT_DIR/<script>.md``, its JSON in ``OUT_DIR/<script>.json``
where it accepts ``--json PATH``, and its log in ``OUT_DIR/<script>.log``. ``OUT_DIR/summary.md``
holds one row per model (worst accuracy ratio, correctly rounded fraction, norms left, fuse time
and batch-1 latency, ours beside mmcv and torch.fx), then every script's tables in full.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))

from benchmarks.common import format_ratio, markdown_table  # noqa: E402

#: Scripts in the order they run: measurements 1-3, 4, 5, 6.
SCRIPTS = ("accuracy", "fuse_time", "latency", "reference_ops")
FUSERS = ("ours", "mmcv", "torch.fx")


def _help(script: Path) -> str:
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    return done.stdout


def run_script(name: str, out_dir: Path, *, device: str, quick: bool, timeout: float) -> dict[str, Any]:
    """Run ``benchmarks/<name>.py`` with the options it accepts; returns its status for the summary."""
    script = BENCHMARKS / f"{name}.py"
    if not script.exists():
        return {"script": name, "status": "missing"}
    options = _help(script)
    argv = [sys.executable, str(script)]
    if "--device" in options:
        argv += ["--device", device]
    elif device != "cpu":
        return {"script": name, "status": "skipped (no --device option; it measures the CPU only)"}
    if quick and "--quick" in options:
        argv.append("--quick")
    json_path = out_dir / f"{name}.json"
    # A script whose --json takes a path writes JSON there and still prints its tables; one whose
    # --json is a bare switch would print JSON *instead*, so it gets none.
    if "--json [PATH]" in options:
        argv += ["--json", str(json_path)]
    started = time.perf_counter()
    with open(out_dir / f"{name}.md", "w", encoding="utf-8") as out, \
            open(out_dir / f"{name}.log", "w", encoding="utf-8") as err:
        try:
            done = subprocess.run(argv, stdout=out, stderr=err, timeout=timeout, cwd=BENCHMARKS.parent)
            status = "ok" if done.returncode == 0 else f"FAILED (exit status {done.returncode}; see {name}.log)"
        except subprocess.TimeoutExpired:
            status = f"TIMED OUT after {timeout:g} s"
    return {"script": name, "status": status, "seconds": round(time.perf_counter() - started, 1),
            "command": " ".join(["python", f"benchmarks/{name}.py"] + argv[2:]),
            "json": json_path if json_path.exists() and status == "ok" else None}


def _records(data: dict[str, Any] | None, index: int) -> list[dict[str, Any]]:
    if not data or len(data.get("tables", [])) <= index:
        return []
    return data["tables"][index].get("records", [])


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per model from the scripts' JSON: what a reader compares first."""
    loaded = {}
    for name, res in results.items():
        if res.get("json"):
            loaded[name] = json.loads(Path(res["json"]).read_text(encoding="utf-8"))
    accuracy, rounding, coverage = (_records(loaded.get("accuracy"), i) for i in range(3))
    fuse_time = _records(loaded.get("fuse_time"), 0)
    latency = _records(loaded.get("latency"), 0)
    models: list[str] = []
    for rec in accuracy + fuse_time + latency:
        if rec.get("model") and rec["model"] not in models:
            models.append(rec["model"])
    if not models:
        return "(no per-model results to summarise)"

    def worst_ratio(model: str, fuser: str) -> str:
        recs = [r for r in accuracy if r["model"] == model and r["fuser"] == fuser]
        if not recs:
            return "—"
        if any(r.get("rms_ratio") is None for r in recs):
            return "fails"
        worst = max(recs, key=lambda r: r["rms_ratio"] if not math.isnan(r["rms_ratio"]) else math.inf)
        return f"{format_ratio(worst['rms_ratio'])} ({worst['dtype']})"

    def rounded(model: str, fuser: str) -> str:
        recs = [r for r in rounding if r["model"] == model and r["fuser"] == fuser and r.get("weights")]
        return f"{100 * min(r['weight_fraction'] for r in recs):.2f}%" if recs else "—"

    def left(model: str) -> str:
        recs = [r for r in coverage if r["model"] == model]
        if not recs:
            return "—"
        rec = recs[0]
        return f"{rec['unfoldable']} | " + "/".join(str(rec["left"].get(f, "—")) for f in FUSERS)

    def fuse_ms(model: str) -> str:
        recs = [r for r in fuse_time if r.get("model") == model]
        if not recs:
            return "—"
        per = recs[0].get("fusers", {})
        return "/".join(f"{1e3 * per[f]['median_s']:.0f}" if "median_s" in per.get(f, {}) else "—" for f in FUSERS)

    def speedup(model: str) -> str:
        recs = {r["variant"]: r for r in latency
                if r.get("model") == model and r.get("dtype") == "fp32" and r.get("batch") == 1}
        base = recs.get("unfused", {}).get("ms")
        cells = []
        for f in ("ours", "torch.fx"):
            ms = recs.get(f, {}).get("ms")
            cells.append(f"{base / ms:.2f}×" if base and ms else "—")
        return "/".join(cells)

    headers = ["model", "worst RMS ratio: ours", "mmcv", "torch.fx", "correctly rounded (min): ours", "mmcv",
               "torch.fx", "cannot fold | left (ours/mmcv/fx)", "fuse ms (ours/mmcv/fx)",
               "fp32 batch-1 speed-up (ours/fx)"]
    rows = [[m, worst_ratio(m, "ours"), worst_ratio(m, "mmcv"), worst_ratio(m, "torch.fx"), rounded(m, "ours"),
             rounded(m, "mmcv"), rounded(m, "torch.fx"), left(m), fuse_ms(m), speedup(m)] for m in models]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for the tables (created if missing)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script that takes it")
    parser.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated scripts (default: all of "
                                                                   f"{','.join(SCRIPTS)})")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per script before it is stopped")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCRIPTS]
    if unknown:
        raise SystemExit(f"--only: unknown script(s) {unknown}; known: {', '.join(SCRIPTS)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in chosen:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_script(name, args.out_dir, device=args.device, quick=args.quick, timeout=args.timeout)
        print(f"  {results[name]['status']}", file=sys.stderr, flush=True)
    parts = ["# Benchmarks", "", "| script | status | seconds | command |", "| --- | --- | --- | --- |"]
    parts += [f"| {r['script']} | {r['status']} | {r.get('seconds', '—')} | `{r.get('command', '')}` |"
              for r in results.values()]
    parts += ["", "## Summary", "", summary_table(results)]
    for name in results:
        md = args.out_dir / f"{name}.md"
        if md.exists() and md.stat().st_size:
            text = md.read_text(encoding="utf-8").rstrip()
            # A script printing plain text rather than markdown tables goes in as a code block.
            parts += ["", text if text.lstrip().startswith("#") else f"## {name}\n\n```\n{text}\n```"]
    (args.out_dir / "summary.md").write_text("\n".join(parts) + "\n", encoding="utf-8")
    print(f"wrote {args.out_dir / 'summary.md'}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
