"""What a fusion pass did: every folded pair and every norm layer left unfused, with its reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["FoldedPair", "SkippedNorm", "FusionReport", "REASONS", "REASON_PRIORITY", "FOLD_KINDS",
           "most_specific_reason"]

#: Fold kinds, named in dataflow order.
FOLD_KINDS = ("conv->bn", "conv_transpose->bn", "linear->bn", "bn->conv", "bn->linear")

#: Stable reason codes for a norm layer left unfused, with what each means.
REASONS = {
    "no_fusable_neighbour": "nothing foldable directly before or after it",
    "output_used_elsewhere": "the producer's (or the norm's) output has another consumer",
    "reused_incompatibly": "a module is called at several sites that do not all allow the same fold",
    "no_running_stats": "track_running_stats=False: it normalises with batch statistics",
    "untraceable": "its region could not be traced by torch.fx",
    "unknown_norm": "a norm subclass whose forward is not known",
    "zero_padding": "it feeds a conv that zero-pads (not exact at the borders)",
    "transposed_after_bn": "it feeds a transposed conv (not foldable)",
    "rank_unknown": "BatchNorm1d <-> Linear with an input not proven 2-D (pass example_inputs)",
    "parametrized": "the neighbour's weight is parametrized",
    "overflow": "the fused weight or bias does not fit the parameter dtype",
    "unsupported_layer": "the neighbour is quantized or otherwise unsupported",
    # ONNX graphs
    "not_constant": "a parameter (of the norm or its neighbour) is a graph input or computed, not a constant",
    "not_per_channel": "parameters vary along more than the channel axis (spatial=0 statistics, a matrix bias)",
}

#: When several reasons apply to one norm left unfused, the most specific (earliest here) is reported;
#: codes missing here come last.
REASON_PRIORITY = ("overflow", "no_running_stats", "not_constant", "not_per_channel", "reused_incompatibly",
                   "parametrized", "unsupported_layer", "rank_unknown", "output_used_elsewhere", "zero_padding",
                   "transposed_after_bn", "untraceable", "unknown_norm", "no_fusable_neighbour")


def most_specific_reason(reasons: list[tuple[str, str]]) -> tuple[str, str]:
    """The ``(code, detail)`` among ``reasons`` whose code comes first in :data:`REASON_PRIORITY`."""
    def rank(reason: tuple[str, str]) -> int:
        return REASON_PRIORITY.index(reason[0]) if reason[0] in REASON_PRIORITY else len(REASON_PRIORITY)
    return min(reasons, key=rank)


@dataclass(frozen=True)
class FoldedPair:
    """A norm folded into a layer. ``norm`` and ``layer`` are qualified module names.

    ``max_rel_change`` is ``max |W' - W| / max |W|`` for this fold (float64, before rounding).
    """

    norm: str
    layer: str
    kind: str
    max_rel_change: float

    def __post_init__(self):
        if self.kind not in FOLD_KINDS:
            raise ValueError(f"FoldedPair.kind must be one of {FOLD_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class SkippedNorm:
    """A norm layer left in the model, with a stable reason code (see :data:`REASONS`) and a detail."""

    norm: str
    reason: str
    detail: str

    def __post_init__(self):
        if self.reason not in REASONS:
            raise ValueError(f"SkippedNorm.reason must be one of {sorted(REASONS)}, got {self.reason!r}")


def _columns(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]


@dataclass
class FusionReport:
    """Outcome of :func:`adapters.torch.fuse`."""

    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[SkippedNorm] = field(default_factory=list)
    training_mode: bool = False
    norms_found: int = 0

    def summary(self) -> str:
        folded_norms = len({p.norm for p in self.folded})
        text = (f"{len(self.folded)} fold(s): {folded_norms} of {self.norms_found} norm layer(s) folded, "
                f"{len(self.skipped)} left")
        if self.training_mode:
            text += "; the model was in training mode: folded with eval semantics (running statistics)"
        return text

    def table(self) -> str:
        """The report as aligned text columns: folded pairs, then skipped norms, then a summary line."""
        lines: list[str] = []
        if self.folded:
            lines += _columns(("norm", "layer", "kind", "max rel change"),
                              [(p.norm, p.layer, p.kind, f"{p.max_rel_change:.3g}") for p in self.folded])
            lines.append("")
        if self.skipped:
            lines += _columns(("skipped norm", "reason", "detail"),
                              [(s.norm, s.reason, s.detail) for s in self.skipped])
            lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        """Plain, JSON-serialisable data."""
        return {
            "folded": [asdict(p) for p in self.folded],
            "skipped": [asdict(s) for s in self.skipped],
            "training_mode": bool(self.training_mode),
            "norms_found": int(self.norms_found),
        }
