"""The main job: fuse models, verify each against the float64 reference, and time the forward pass.

:func:`run_model` fuses one model with :func:`adapters.torch.fuse`, checks the fused model with
:func:`adapters.torch.verify` and measures the forward pass of both; :func:`format_table`
prints one row per model. ``python -m adapters.torch`` runs it on a default selection of the case
suite (every fold family and a few traps) or on a user's model.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checking import verify
from ..running import eval_mode
from . import cases as case_suite
from .loading import call_factory, load_callable, load_checkpoint

__all__ = ["DEFAULT_CASES", "ModelRow", "DTYPES", "default_models", "load_user_model", "parse_shape",
           "run_model", "time_forward", "format_table", "slow_half_precision_warning"]

#: The default run: each fold family, each norm-layer variant that needs care, and traps a
#: registration-order fuser gets wrong -- small enough to finish in seconds.
DEFAULT_CASES = (
    "conv2d_bn_pad_zeros", "conv_bn_bn", "conv3d_bn", "conv_transpose2d_groups_bn", "flatten_linear_bn1d",
    "bn_conv2d_pad_reflect", "bn_conv2d_zero_padding", "reid_bn_dropout_linear", "frozen_bn", "batchnorm_act",
    "bn_no_running_stats", "trap_bn_before_conv_zero_padding", "trap_activation_between",
    "trap_conv_reused_two_bns", "trap_bn_shared_by_two_convs", "trap_split_sequential",
    "trap_untraceable_parent_own_pair", "trap_unknown_norm_subclass",
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class ModelRow:
    """One model of the main job: what was folded and left, the verdict, and the forward-pass timings."""

    name: str
    norms_found: int
    folded: int
    left: int
    left_reasons: dict[str, int]
    ok: bool
    ratio: float
    max_abs_error: float
    unfused_seconds: float
    fused_seconds: float
    report: dict[str, Any] = field(repr=False)
    verdict: dict[str, Any] = field(repr=False)
    verdict_text: str = field(default="", repr=False)

    @property
    def speedup(self) -> float:
        return self.unfused_seconds / self.fused_seconds if self.fused_seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "norms_found": self.norms_found, "folded": self.folded, "left": self.left,
                "left_reasons": dict(self.left_reasons), "ok": self.ok, "ratio": self.ratio,
                "max_abs_error": self.max_abs_error, "unfused_seconds": self.unfused_seconds,
                "fused_seconds": self.fused_seconds, "speedup": self.speedup, "report": self.report,
                "verdict": self.verdict}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"input shape must be comma-separated positive integers like 1,3,224,224, got {text!r}"
                         ) from None
    if not shape or any(n <= 0 for n in shape):
        raise ValueError(f"input shape must be comma-separated positive integers like 1,3,224,224, got {text!r}")
    return shape


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(models: Sequence[nn.Module], inputs: tuple, *, repeats: int = 7, min_seconds: float = 2e-3
                 ) -> list[float]:
    """Median seconds per forward call of each model, in eval mode under no_grad.

    The models are timed in turns, one run each per round for ``repeats`` rounds, so that a load
    change on the machine hits all of them alike. Each run loops enough calls for the first model
    to last ``min_seconds`` (tiny models take microseconds per call, below the timer's
    resolution); two warm-up calls per model come first (allocator, cuDNN autotuning).

    On the CPU with one torch thread the clock is the process's CPU time, which time spent
    descheduled on a busy machine does not inflate; otherwise it is wall time.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))

    clock = time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter

    def run(model: nn.Module, loops: int) -> float:
        start = clock()
        for _ in range(loops):
            model(*inputs)
        _synchronize(device)
        return (clock() - start) / loops

    with eval_mode(*models), torch.no_grad():
        for model in models:
            run(model, 2)
        loops = 1
        while run(models[0], loops) * loops < min_seconds and loops < 1 << 16:
            loops *= 2
        samples: list[list[float]] = [[] for _ in models]
        for _ in range(repeats):
            for model, times in zip(models, samples, strict=True):
                times.append(run(model, loops))
    return [statistics.median(times) for times in samples]


def run_model(name: str, model: nn.Module, inputs: tuple, *, repeats: int = 7,
              fuse: Callable[..., tuple[nn.Module, Any]] | None = None,
              progress: Callable[[str], None] | None = None) -> tuple[ModelRow, nn.Module]:
    """Fuse ``model`` (a copy: it is left as it was), verify the result and time both.

    Returns the row and the fused model. ``progress`` is told each stage as it starts, with the
    time the one before took.
    """
    if fuse is None:
        from .. import fuse as default_fuse
        fuse = default_fuse
    report_stage = progress or (lambda text: None)
    start = time.perf_counter()

    def took() -> str:
        return f"{time.perf_counter() - start:.1f} s"

    report_stage("fusing")
    fused, report = fuse(model, inplace=False, example_inputs=inputs)
    folded = len({p.norm for p in report.folded})
    report_stage(f"fused ({folded} of {report.norms_found} norm layers folded) after {took()}; "
                 "verifying against the float64 reference")
    verdict = verify(model, fused, inputs)
    reasons = Counter(skip.reason for skip in report.skipped)
    report_stage(f"verified ({'ok' if verdict.ok else 'FAILED'}, error ratio {verdict.ratio:.3g}) after {took()}; "
                 f"timing the forward pass ({repeats} runs of each model)")
    unfused_seconds, fused_seconds = time_forward([model, fused], inputs, repeats=repeats)
    report_stage(f"done after {took()}")
    # Norms gone from the model: folded into a layer, or merged with their branches (reparameterize).
    gone = {p.norm for p in report.folded} | {n for m in getattr(report, "merged", ()) for n in m.norms}
    row = ModelRow(name=name, norms_found=report.norms_found, folded=len(gone),
                   left=len(report.skipped), left_reasons=dict(reasons), ok=verdict.ok, ratio=verdict.ratio,
                   max_abs_error=verdict.max_abs_error,
                   unfused_seconds=unfused_seconds, fused_seconds=fused_seconds,
                   report=report.to_dict(), verdict=verdict.to_dict(), verdict_text=str(verdict))
    return row, fused


def default_models(names: tuple[str, ...] = DEFAULT_CASES, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> Iterator[tuple[str, nn.Module, tuple]]:
    """``(name, model, inputs)`` for each named case of :mod:`adapters.torch.suite.cases`."""
    for name in names:
        case = case_suite.get_case(name)
        model = case.build().to(device=device, dtype=dtype)
        yield name, model, (case.make_input(dtype=dtype, device=device),)


def load_user_model(spec: str, *, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", checkpoint: str | None = None,
                    random_stats: bool = False, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> tuple[nn.Module, tuple]:
    """Build ``package.module:factory`` or ``path/to/file.py:factory`` (global RNG seeded with ``seed``),
    load ``checkpoint``, make a random input.

    A checkpoint may be a state_dict or a dict holding one under ``"state_dict"`` or ``"model"``
    (the common training-script layouts); it is loaded with ``weights_only=True`` and ``strict=True``.
    Whatever goes wrong raises ``ValueError``/``TypeError`` with a one-line message (see
    :mod:`.loading`). ``progress`` is told each stage as it starts.
    """
    report = progress or (lambda text: None)
    factory = load_callable(spec, "--model")
    report(f"building the model ({spec}())")
    # Seeded, so that the same command builds the same random weights (when no checkpoint replaces
    # them); the caller's global RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = call_factory(factory, spec, "--model")
    if checkpoint is not None:
        report(f"loading the checkpoint {checkpoint}")
        state = load_checkpoint(checkpoint)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"--checkpoint {checkpoint!r} does not fit {spec}: "
                             + " ".join(str(error).split())) from None
    if random_stats:
        case_suite.randomize_norm_stats(model, torch.Generator().manual_seed(seed))
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return model, (x.to(device=device, dtype=dtype),)


def slow_half_precision_warning(dtype: torch.dtype, device: torch.device) -> str | None:
    """The warning for float16/bfloat16 on the CPU, where torch's kernels are slow; None elsewhere."""
    if device.type != "cpu" or dtype not in (torch.float16, torch.bfloat16):
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"warning: {name} on the CPU: torch's CPU half-precision kernels are slow (a large model can take "
            "minutes to verify and time); use --device cuda, or float32 on the CPU")


def _left_text(row: ModelRow) -> str:
    if not row.left:
        return "0"
    reasons = ", ".join(f"{reason}" + (f" x{count}" if count > 1 else "")
                        for reason, count in sorted(row.left_reasons.items()))
    return f"{row.left} ({reasons})"


def format_table(rows: list[ModelRow]) -> str:
    """One aligned row per model; ``error ratio`` is the fused model's error over the unfused model's own."""
    header = ("model", "norms", "folded", "left (reasons)", "error ratio", "max |diff|", "speedup", "verdict")
    body = [(r.name, str(r.norms_found), str(r.folded), _left_text(r), f"{r.ratio:.3g}", f"{r.max_abs_error:.2e}",
             f"{r.speedup:.2f}x", "ok" if r.ok else "FAILED") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    numeric = {1, 2, 4, 5, 6}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *(line(b) for b in body)])
