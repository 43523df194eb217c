"""The vector files: the manifest, writing every case, reading a set back, and where the shipped set lives.

``spec/vectors/`` in a source checkout is the one source of the vectors; a wheel ships a copy of
it as package data (``refimpl/conformance/vectors/``, copied by ``setup.py`` at build time), so
:data:`VECTORS_DIR` finds them with or without a checkout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..tolerance import SAFETY, unit_roundoff
from .cases import build_all
from .encoding import FORMAT, MANIFEST_FORMAT, VERDICTS, dumps
from .rounding import LOW_PRECISION

__all__ = ["VECTORS_DIR", "CHECKOUT_VECTORS_DIR", "SHIPPED_VECTORS_DIR", "manifest", "write_vectors",
           "load_vectors"]

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: The vectors of a source checkout: ``spec/vectors`` beside the ``refimpl`` package.
CHECKOUT_VECTORS_DIR = _PROJECT_ROOT / "spec" / "vectors"
#: The copy a wheel ships as package data (absent in a source checkout).
SHIPPED_VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
#: The committed vectors: the checkout's when running from one (an editable install included),
#: else the copy the installed package ships.
VECTORS_DIR = (CHECKOUT_VECTORS_DIR if (_PROJECT_ROOT / "pyproject.toml").is_file()
               and (CHECKOUT_VECTORS_DIR / "manifest.json").is_file() else SHIPPED_VECTORS_DIR)


def manifest(vectors: dict[str, dict]) -> dict:
    """The manifest: the cases with their fold, storage dtype and policy, and the tolerance policy."""
    storage = sorted({v["storage_dtype"] for v in vectors.values()})
    return {
        "format": MANIFEST_FORMAT,
        "cases": [{"name": name, "file": f"{name}.json", "fold": v["fold"], "storage_dtype": v["storage_dtype"],
                   "policy": v["tolerance"]["policy"], "verdict": v["expected"]["verdict"]}
                  for name, v in sorted(vectors.items())],
        "verdicts": dict(sorted(VERDICTS.items())),
        "tolerance_policy": {
            "error_model": {
                "applies_to": [d for d in storage if d not in LOW_PRECISION],
                "unit_roundoff": {d: unit_roundoff(d) for d in storage if d not in LOW_PRECISION},
                "safety": SAFETY,
                "bound": "bound[i] = safety * (gamma_n + u) * magnitude[i], gamma_n = n*u / (1 - n*u); "
                         "u is the unit roundoff of the storage dtype, n and magnitude are stored per tensor "
                         "in the case's 'tolerance' entry (and in 'probe' for the probe output)",
                "passes": "|actual[i] - expected[i]| <= bound[i] for every element i, expected being the "
                          "float64 value in 'expected'",
                "magnitude": "the sum of the absolute values of every term that makes up the element (the fold "
                             "run on |W|, |b|, |gamma|, |beta|, -|mu|; a merge run on these and |scale|, "
                             "|coefficient|; for the probe, the folded layer run on |x| and |W'| plus the bias "
                             "magnitude, or the merged magnitudes run on |x|), rounded up to 8 significant bits",
            },
            "bit_exact": {
                "applies_to": [d for d in storage if d in LOW_PRECISION],
                "unit_roundoff": {d: unit_roundoff(d) for d in storage if d in LOW_PRECISION},
                "expected": "'weight_rounded' / 'bias_rounded': the float64 fold (or merge) rounded once, to "
                            "nearest with ties to even, to the storage dtype ('correctly rounded'); 'data' holds the "
                            "exact value as float64 and 'bits' the raw 16 bits in hex",
                "passes": "every element has exactly the expected bits (0 ulp). Each expected value lies farther "
                          "from a rounding midpoint than the float64 fold's error bound, so it is the correctly "
                          "rounded value of the exact real fold and any implementation that folds in float64 (or "
                          "exactly) and rounds once reproduces it. Allowing 1 ulp would accept folding in the "
                          "parameter dtype, which these cases exist to catch: its error is typically 1 to 4 ulp.",
            },
            "verdict": {"passes": "the results entry's 'verdict' equals the expected verdict string exactly"},
            "layer": {"passes": "a merge into a conv: the results entry's 'layer' has the 'kernel_size', 'stride', "
                                "'padding', 'dilation', 'groups' and 'padding_mode' of 'expected.layer', exactly"},
        },
    }


def write_vectors(out: str | Path) -> list[Path]:
    """Write every case to ``out/<name>.json`` and the manifest to ``out/manifest.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vectors = build_all()
    written = []
    for name, vector in vectors.items():
        path = out / f"{name}.json"
        path.write_text(dumps(vector), encoding="utf-8")
        written.append(path)
    path = out / "manifest.json"
    path.write_text(dumps(manifest(vectors)), encoding="utf-8")
    written.append(path)
    return written


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} {str(path)!r} is not readable JSON: {error}") from None


def load_vectors(directory: str | Path = VECTORS_DIR) -> dict[str, dict]:
    """Read ``manifest.json`` and every case file it lists; ``ValueError`` on a malformed set."""
    directory = Path(directory)
    index = _read_json(directory / "manifest.json", "vectors manifest")
    if not isinstance(index, dict) or index.get("format") != MANIFEST_FORMAT or not isinstance(index.get("cases"),
                                                                                               list):
        raise ValueError(f"{str(directory / 'manifest.json')!r} is not a {MANIFEST_FORMAT} manifest "
                         "(expected an object with 'format' and a 'cases' list)")
    vectors = {}
    for entry in index["cases"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ValueError(f"manifest entry {entry!r} has no 'file'")
        vector = _read_json(directory / entry["file"], "vector file")
        if not isinstance(vector, dict) or vector.get("format") != FORMAT or "expected" not in vector:
            raise ValueError(f"{str(directory / entry['file'])!r} is not a {FORMAT} vector")
        vectors[vector["name"]] = vector
    return vectors
