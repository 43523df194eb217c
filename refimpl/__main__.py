"""Command line of the reference implementation: conformance vectors, checking results, self-check.

``python -m refimpl`` (no arguments) runs a quick self-check; ``python -m refimpl --help`` lists
the subcommands. Exit codes: 0 success, 1 a check failed, 2 unusable input (malformed files).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import conformance

DESCRIPTION = """\
bnfold's reference implementation: BatchNorm-folding conformance vectors and checks.

Without a subcommand, runs a self-check: each fold family on a random case against the float64
reference ops within the error model, and the integrity of the committed vectors.

subcommands:
  vectors --out DIR        write the conformance vectors (one JSON per case + manifest.json)
  check [VECTORS] RESULTS  judge another implementation's results file against the vectors
                           (default VECTORS: the committed set, which an installed package ships)
  results --out FILE       write refimpl's own results file (a working example of the format)

The vector and results formats and the tolerance policy are documented in spec/conformance.md.
"""


def _self_check_families() -> list[tuple[str, bool, str]]:
    """Each fold family on random float64 data: the folded layer against the unfused pair."""
    rng = np.random.default_rng(2024)

    def bn(channels: int) -> dict:
        return {"eps": 1e-5, "track_running_stats": True, "running_mean": rng.normal(0, 1, channels),
                "running_var": rng.uniform(0.1, 3, channels), "weight": rng.uniform(0.5, 2, channels),
                "bias": rng.normal(0, 1, channels)}

    def conv(dims, cin, cout, *, groups=1, transposed=False, stride=1, padding=0, padding_mode="zeros"):
        return {"type": "conv", "in_channels": cin, "out_channels": cout, "kernel_size": [3] * dims,
                "stride": [stride] * dims, "padding": [padding] * dims, "dilation": [1] * dims, "groups": groups,
                "transposed": transposed, "output_padding": [0] * dims, "padding_mode": padding_mode}

    families = [
        ("conv2d(groups=2) -> BN", "conv_bn", conv(2, 4, 6, groups=2, padding=1), (6, 2, 3, 3), 6, (2, 4, 6, 6)),
        ("conv_transpose2d(groups=2, stride=2) -> BN", "conv_bn", conv(2, 4, 6, groups=2, transposed=True, stride=2),
         (4, 3, 3, 3), 6, (2, 4, 4, 4)),
        ("linear -> BN", "linear_bn", {"type": "linear", "in_features": 7, "out_features": 3}, (3, 7), 3, (5, 7)),
        ("BN -> conv2d(padding_mode=reflect)", "bn_conv", conv(2, 3, 4, padding=1, padding_mode="reflect"),
         (4, 3, 3, 3), 3, (2, 3, 5, 5)),
        ("BN -> linear", "bn_linear", {"type": "linear", "in_features": 6, "out_features": 2}, (2, 6), 6, (5, 6)),
    ]
    outcomes = []
    for label, fold, layer, weight_shape, bn_channels, x_shape in families:
        out_channels = layer.get("out_channels", layer.get("out_features"))
        weight, bias = rng.normal(0, 1, weight_shape), rng.normal(0, 1, out_channels)
        result = conformance.verify_fold(fold, layer, weight, bias, bn(bn_channels), rng.normal(0, 1, x_shape))
        outcomes.append((label, result.ok, result.describe("folded output")))
    return outcomes


def _self_check() -> int:
    failures = 0
    print("refimpl self-check")
    for label, ok, detail in _self_check_families():
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} fold {label}: {detail}")
    vectors = conformance.build_all()
    print(f"  ok   built {len(vectors)} conformance cases (each verifies its own expected values)")
    directory = conformance.VECTORS_DIR
    if (directory / "manifest.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            stale = _compare_dirs(conformance.write_vectors(tmp), directory)
        failures += bool(stale)
        print(f"  {'ok  ' if not stale else 'FAIL'} committed vectors in {directory} "
              + ("match a fresh regeneration byte for byte" if not stale else f"differ: {', '.join(stale)}"))
        vectors = conformance.load_vectors(directory)
    else:
        print(f"  skip committed vectors: {directory} not found (neither a source checkout nor an installed "
              "package)")
    outcomes, _ = conformance.check_results(vectors, conformance.reference_results(vectors))
    bad = [o.name for o in outcomes if not o.ok]
    failures += bool(bad)
    print(f"  {'ok  ' if not bad else 'FAIL'} check passes refimpl's own results on {len(outcomes)} cases"
          + (f" (failed: {', '.join(bad)})" if bad else ""))
    print("self-check " + ("passed" if not failures else f"FAILED ({failures} problem(s))"))
    return 1 if failures else 0


def _compare_dirs(written: list[Path], committed: Path) -> list[str]:
    """Names of files that differ between a fresh regeneration and ``committed`` (either way)."""
    fresh = {p.name: p.read_bytes() for p in written}
    existing = {p.name: p.read_bytes() for p in committed.glob("*.json")}
    return sorted(name for name in fresh.keys() | existing.keys() if fresh.get(name) != existing.get(name))


def _check(vectors_dir: str | Path, results_path: str) -> int:
    try:
        vectors = conformance.load_vectors(vectors_dir)
        results = json.loads(Path(results_path).read_text(encoding="utf-8"))
        outcomes, notes = conformance.check_results(vectors, results)
    except FileNotFoundError as error:
        print(f"error: {error.filename!r} does not exist", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        print(f"error: results file {results_path!r} is not readable JSON: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyError as error:
        print(f"error: vectors in {vectors_dir!r} lack the entry {error}: not a {conformance.FORMAT} set",
              file=sys.stderr)
        return 2
    implementation = results.get("implementation", "unnamed implementation")
    print(f"checking {implementation!s} against {len(vectors)} cases in {vectors_dir}")
    for outcome in outcomes:
        print(outcome.line())
    for note in notes:
        print(f"note: {note}")
    failed = [o.name for o in outcomes if not o.ok]
    print(f"{len(outcomes)} cases: {len(outcomes) - len(failed)} passed, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


def _output_file_problem(out: str) -> str | None:
    """Why the file ``out`` cannot be written, found before any work; None when it can."""
    target = Path(out)
    if target.is_dir():
        return f"--out {out!r} is a folder; give a file name"
    if not target.parent.is_dir():
        return f"--out {out!r}: the folder {str(target.parent)!r} does not exist"
    return None


def _vectors(out: str) -> int:
    try:  # the folder first, so that a bad --out fails before the cases are built
        Path(out).mkdir(parents=True, exist_ok=True)
        written = conformance.write_vectors(out)
    except OSError as error:
        print(f"error: --out {out!r}: cannot write the vectors there ({error.strerror or error})", file=sys.stderr)
        return 2
    print(f"wrote {len(written) - 1} cases and manifest.json to {out}")
    return 0


def _results(vectors_dir: str | None, out: str) -> int:
    problem = _output_file_problem(out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        vectors = conformance.load_vectors(vectors_dir) if vectors_dir else conformance.build_all()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        Path(out).write_text(json.dumps(conformance.reference_results(vectors), indent=1, sort_keys=True) + "\n",
                             encoding="utf-8")
    except OSError as error:
        print(f"error: --out {out!r}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"wrote refimpl's results for {len(vectors)} cases to {out}")
    return 0


def build_parser(prog: str = "python -m refimpl") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{vectors,check,results}")
    vectors = sub.add_parser("vectors", help="write the conformance vectors",
                             description="Regenerate the conformance vectors deterministically: one JSON file per "
                                         "case and manifest.json (sorted keys, stable formatting, float64 values in "
                                         "shortest round-trip form).")
    vectors.add_argument("--out", required=True, help="directory to write (created if missing)")
    check = sub.add_parser("check", help="check an implementation's results file",
                           description="Judge RESULTS against VECTORS. Prints pass/FAIL per case with its worst "
                                       "element (index, expected, actual, bound, ratio) and a summary. Exit 0 when "
                                       "every case passes, 1 when any fails or is missing, 2 on malformed files.")
    check.add_argument("vectors", metavar="VECTORS", nargs="?", default=conformance.VECTORS_DIR,
                       help="directory holding manifest.json and the case files (default: the committed vectors, "
                            "%(default)s)")
    check.add_argument("results", metavar="RESULTS", help="results JSON written by the implementation under test")
    results = sub.add_parser("results", help="write refimpl's own results file",
                             description="Fold every case with refimpl (float64, rounded once to the storage dtype) "
                                         "and write a results file: a working example of the format.")
    results.add_argument("--out", required=True, help="results file to write")
    results.add_argument("--vectors", help="vectors directory to read (default: build the cases in memory)")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m refimpl") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.command is None:
        return _self_check()
    if args.command == "vectors":
        return _vectors(args.out)
    if args.command == "check":
        return _check(args.vectors, args.results)
    return _results(args.vectors, args.out)


if __name__ == "__main__":
    sys.exit(main())
