"""What ``verify`` found: the verdict on a folded model against the float64 reference, for every adapter.

The judgement itself is :func:`refimpl.compare_models`; these types carry its outcome per output
and for the first intermediate value that breaks it, and print it the same way whichever adapter
ran the models (torch modules or ONNX graphs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from refimpl import MODEL_RATIO

__all__ = ["Verdict", "OutputCheck", "LayerDivergence", "ModelRunError"]


class ModelRunError(RuntimeError):
    """Running one of the models raised. ``which`` names the model (``"original"``, ``"reference"``, ``"fused"``).

    ``model`` (its class or graph name) and ``inputs`` (the inputs' shapes, described) go into the
    message when the adapter knows them; the error it wraps is ``__cause__``.
    """

    def __init__(self, which: str, error: BaseException, model: str = "", inputs: str = ""):
        self.which = which
        named = f" ({model})" if model else ""
        subject = ("the float64 reference copy of the original model" + named if which == "reference"
                   else f"the {which} model{named}")
        given = f" on {inputs}" if inputs else ""
        super().__init__(f"running {subject}{given} raised {type(error).__name__}: {error}")


@dataclass(frozen=True)
class OutputCheck:
    """One floating-point output tensor of the model, judged by :func:`refimpl.compare_models`."""

    path: str
    ok: bool
    fused_error: float
    unfused_error: float
    limit: float
    ratio: float
    max_abs_error: float
    detail: str = ""


@dataclass(frozen=True)
class LayerDivergence:
    """The first layer (module or graph node), in execution order, whose output breaks the error model."""

    module: str
    call: int
    path: str
    fused_error: float
    unfused_error: float
    limit: float
    ratio: float
    max_abs_error: float
    suspects: tuple[str, ...]
    detail: str = ""

    def describe(self) -> str:
        where = (self.module or "<the model itself>") + (f" (call {self.call})" if self.call else "") + (
            f" output {self.path}" if self.path != "output" else "")
        text = f"first diverging layer: {where}"
        if self.detail:
            return f"{text}: {self.detail}"
        text += (f": relative RMS error {self.fused_error:.3e} vs the unfused model's {self.unfused_error:.3e}"
                 f" ({self.ratio:.3g}x, limit {MODEL_RATIO:g}x); max |diff| {self.max_abs_error:.3e}")
        if self.suspects:
            text += f"; ran just before it: {', '.join(self.suspects)}"
        return text


@dataclass(frozen=True)
class Verdict:
    """Outcome of ``verify``. ``ok`` is true when every output and every compared layer is within the model."""

    ok: bool
    dtype: str
    outputs: tuple[OutputCheck, ...]
    first_divergence: LayerDivergence | None
    layers_compared: int
    layers_not_compared: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())

    @property
    def ratio(self) -> float:
        """Worst ``fused error / unfused error`` over the outputs (``<= MODEL_RATIO`` passes)."""
        return max((o.ratio for o in self.outputs), default=0.0)

    @property
    def max_abs_error(self) -> float:
        """Largest ``|fused - float64 reference|`` over every output element."""
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["max_abs_error"] = self.max_abs_error
        data["outputs"] = [asdict(o) for o in self.outputs]
        data["layers_not_compared"] = list(self.layers_not_compared)
        data["notes"] = list(self.notes)
        if self.first_divergence is not None:
            data["first_divergence"]["suspects"] = list(self.first_divergence.suspects)
        return data

    def __str__(self) -> str:
        lines = [f"{'OK' if self.ok else 'FAILED'}: fused model vs float64 reference ({self.dtype}); "
                 f"error ratio {self.ratio:.3g} (limit {MODEL_RATIO:g}), max |diff| {self.max_abs_error:.3e}"]
        for o in self.outputs:
            status = "ok" if o.ok else "EXCEEDS"
            extra = f" -- {o.detail}" if o.detail else ""
            lines.append(f"  {o.path}: fused error {o.fused_error:.3e}, unfused {o.unfused_error:.3e}, "
                         f"ratio {o.ratio:.3g}, max |diff| {o.max_abs_error:.3e}: {status}{extra}")
        lines.append(f"  layers compared: {self.layers_compared}")
        if self.first_divergence is not None:
            lines.append("  " + self.first_divergence.describe())
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)
