"""What a fusion pass did: every folded pair and every norm layer left unfused, with its reason; and, for a
re-parameterisation, every sum of branches merged into one layer and every such sum left, with its reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["FoldedPair", "SkippedNorm", "MergedBranches", "SkippedMerge", "FusionReport", "REASONS",
           "REASON_PRIORITY", "FOLD_KINDS", "most_specific_reason"]

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
    # torch.export programs and FX graphs
    "training_mode": "the graph computes it in training mode (batch statistics, running statistics updated): "
                     "folding would change what the program computes",
    # Merging parallel branches (structural re-parameterisation): why a sum of branches is left as it is.
    "different_inputs": "the operands of the sum are affine functions of different tensors",
    "nonlinear_branch": "an operand of the sum is not an affine function of the sum's input (an activation, ...)",
    "branch_output_used_elsewhere": "a branch's output, or a tensor inside the branch, also feeds something besides "
                                    "the sum (or an in-place op writes into such a tensor)",
    "stride_mismatch": "the branches have different strides",
    "dilation_mismatch": "the branches whose kernels are larger than 1 have different dilations",
    "padding_misaligned": "a smaller kernel centred in the largest would not read the positions its branch reads",
    "padding_mode_mismatch": "the branches that pad use different padding modes",
    "groups_incompatible": "the conv branches have different groups",
    "channels_mismatch": "the branches have different channel counts (the sum broadcasts, or an identity branch "
                         "has in != out channels)",
    "sequential_unsupported": "a branch chains two convs neither of which is 1x1 with stride 1 and no padding",
    "constant_not_per_channel": "a constant added to or multiplied into the sum varies along more than the channel "
                                "axis",
    "sum_in_model_forward": "the sum is computed in the model's own forward, which is kept (merging would have to "
                            "replace the model itself)",
}

#: When several reasons apply to one norm left unfused, the most specific (earliest here) is reported;
#: codes missing here come last.
REASON_PRIORITY = ("overflow", "training_mode", "no_running_stats", "not_constant", "not_per_channel",
                   "reused_incompatibly", "parametrized", "unsupported_layer", "rank_unknown", "output_used_elsewhere",
                   "zero_padding", "transposed_after_bn", "untraceable", "unknown_norm", "no_fusable_neighbour")


def most_specific_reason(reasons: list[tuple[str, str]]) -> tuple[str, str]:
    """The ``(code, detail)`` among ``reasons`` whose code comes first in :data:`REASON_PRIORITY`."""
    def rank(reason: tuple[str, str]) -> int:
        return REASON_PRIORITY.index(reason[0]) if reason[0] in REASON_PRIORITY else len(REASON_PRIORITY)
    return min(reasons, key=rank)


@dataclass(frozen=True)
class FoldedPair:
    """A norm folded into a layer. ``norm`` and ``layer`` are qualified module names.

    ``max_rel_change`` is ``max |W' - W| / max |W|`` for this fold (float64, before rounding).
    ``note`` is non-empty when the pairing rests on the path one recorded run took (example inputs):
    it names the code whose path may differ on other calls (see spec/folding.md, "Recorded dataflow").
    """

    norm: str
    layer: str
    kind: str
    max_rel_change: float
    note: str = ""

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


@dataclass(frozen=True)
class MergedBranches:
    """Parallel branches summed in ``block``'s forward, merged into one conv or linear layer ``layer``.

    ``block`` (a qualified module name) was replaced, under the same name, by a ``torch.fx.GraphModule``
    of its own forward with the sum rewritten (``block_class`` is the class it had): the merged layer
    and whatever followed the sum (activation, SE, ...); or, when nothing else was left of that forward,
    by the merged layer itself (then ``layer == block``). ``node`` names the sum's node in that
    forward (``add``, ``add_1``, ...). ``branches`` are the sum's operands as expressions of its
    input ``x``, with module names relative to the block, and ``then`` the norms and constant scales
    applied to the sum that were merged too; ``kernel_size`` is the merged layer's (empty for a
    linear layer); ``norms`` the norm layers (qualified names) merged away.
    """

    block: str
    node: str
    branches: tuple[str, ...]
    layer: str
    kernel_size: tuple[int, ...]
    norms: tuple[str, ...] = ()
    block_class: str = ""
    then: tuple[str, ...] = ()


@dataclass(frozen=True)
class SkippedMerge:
    """A sum of branches left as it is, with a stable reason code (see :data:`REASONS`) and a detail.

    ``block`` is the qualified name of the module whose forward computes the sum ('' for the model
    itself), ``node`` the sum's node in the traced graph.
    """

    block: str
    node: str
    reason: str
    detail: str

    def __post_init__(self):
        if self.reason not in REASONS:
            raise ValueError(f"SkippedMerge.reason must be one of {sorted(REASONS)}, got {self.reason!r}")


def _columns(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]


@dataclass
class FusionReport:
    """Outcome of :func:`adapters.torch.fuse` (and of :func:`adapters.torch.reparameterize`, which also merges)."""

    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[SkippedNorm] = field(default_factory=list)
    training_mode: bool = False
    norms_found: int = 0
    merged: list[MergedBranches] = field(default_factory=list)
    merges_skipped: list[SkippedMerge] = field(default_factory=list)
    #: Qualified names of the ``nn.Identity`` modules that folded norms left and that were removed from their
    #: sequential containers (``reparameterize`` only; ``fuse`` keeps every module).
    removed_identities: list[str] = field(default_factory=list)

    def summary(self) -> str:
        folded_norms = len({p.norm for p in self.folded})
        if self.merged or self.merges_skipped:
            merged_norms = len({n for m in self.merged for n in m.norms})
            blocks = len({m.block for m in self.merged})
            text = (f"{len(self.folded)} fold(s), {len(self.merged)} merge(s): {folded_norms + merged_norms} of "
                    f"{self.norms_found} norm layer(s) folded or merged, {len(self.skipped)} left; {blocks} block(s) "
                    f"rewritten, {len(self.merges_skipped)} sum(s) of branches left")
        else:
            text = (f"{len(self.folded)} fold(s): {folded_norms} of {self.norms_found} norm layer(s) folded, "
                    f"{len(self.skipped)} left")
        specialised = sum(1 for p in self.folded if p.note)
        if specialised:
            text += f"; {specialised} fold(s) rest on the recorded path (see their note)"
        if self.removed_identities:
            text += f"; {len(self.removed_identities)} Identity module(s) left by folded norms removed"
        if self.training_mode:
            text += "; the model was in training mode: folded with eval semantics (running statistics)"
        return text

    def table(self) -> str:
        """The report as aligned text columns: folded pairs, then skipped norms, then a summary line."""
        lines: list[str] = []
        if self.folded:
            if any(p.note for p in self.folded):
                lines += _columns(("norm", "layer", "kind", "max rel change", "note"),
                                  [(p.norm, p.layer, p.kind, f"{p.max_rel_change:.3g}", p.note) for p in self.folded])
            else:
                lines += _columns(("norm", "layer", "kind", "max rel change"),
                                  [(p.norm, p.layer, p.kind, f"{p.max_rel_change:.3g}") for p in self.folded])
            lines.append("")
        if self.skipped:
            lines += _columns(("skipped norm", "reason", "detail"),
                              [(s.norm, s.reason, s.detail) for s in self.skipped])
            lines.append("")
        if self.merged:
            lines += _columns(("merged in block", "sum", "into", "kernel", "branches"),
                              [(m.block, m.node, m.layer, "x".join(map(str, m.kernel_size)) or "linear",
                                " + ".join(m.branches) + "".join(f", then {t}" for t in m.then))
                               for m in self.merged])
            lines.append("")
        if self.merges_skipped:
            lines += _columns(("sum left in block", "sum", "reason", "detail"),
                              [(m.block or "<model>", m.node, m.reason, m.detail) for m in self.merges_skipped])
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
            "merged": [asdict(m) for m in self.merged],
            "merges_skipped": [asdict(m) for m in self.merges_skipped],
            "removed_identities": list(self.removed_identities),
        }
