"""A registry of small named models with a hand-worked answer: what a correct fuser folds and leaves.

Each :class:`Case` builds a tiny ``nn.Module`` (a few channels, 8x8 inputs) in eval mode with
random weights and randomised BatchNorm statistics, drawn from a local ``torch.Generator``
seeded by the case name, so every build is identical and the global RNG is never touched.

The expected numbers are the oracle, worked out by hand from each model's *dataflow* (what
``forward`` computes), never from registration order and never from running a fuser:

``foldable``
    how many norm *modules* a correct fuser folds away (a BatchNorm shared by two convs that
    both fold counts once);
``left``
    how many norm *evaluations* (forward calls of norm modules) remain in one forward pass
    of the fused model, counted with :func:`count_norm_calls`;
``skips``
    for each norm module that must stay, the report reason codes a correct fuser may give.
    Where two codes describe the same situation equally well (the conv feeding a shared
    BatchNorm is also used elsewhere: "output used elsewhere" and "reused incompatibly" are
    both true) both are accepted;
``pairs``
    where given, the exact set of ``(norm, layer, kind)`` folds (qualified module names, kind as
    in the report: "conv->bn", "conv_transpose->bn", "linear->bn", "bn->conv", "bn->linear");
``rank_dependent``
    BatchNorm1d <-> Linear folds that are exact only on 2-D ``(N, C)`` inputs. With
    ``example_inputs`` a correct fuser folds them; without, it may prove the rank statically
    (after ``flatten``) or report them as ``"rank_unknown"``.

The suite is used by the tests, the model zoo, the demo CLI, the benchmarks and the audit of
third-party fusers, so it lives inside the package and depends on torch only.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .model_tools import randomize_norm_stats, randomize_parameters

#: Families a case belongs to: the five fold kinds of the report, norm-layer variants, and traps.
FAMILIES = ("conv->bn", "conv_transpose->bn", "linear->bn", "bn->conv", "bn->linear", "norms", "trap")


@dataclass(frozen=True)
class Case:
    """One named model with its hand-worked expected fuse outcome (see the module docstring)."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    foldable: int
    left: int
    family: str
    description: str
    skips: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rank_dependent: tuple[str, ...] = ()
    pairs: frozenset[tuple[str, str, str]] | None = None

    def make_input(self, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """A deterministic standard-normal input of ``input_shape``."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.input_shape, generator=generator, dtype=torch.float64)
        return x.to(dtype=dtype, device=device)


CASES: dict[str, Case] = {}


def get_case(name: str) -> Case:
    try:
        return CASES[name]
    except KeyError:
        raise KeyError(f"no case named {name!r}; known cases: {sorted(CASES)}") from None


def iter_cases(family: str | None = None) -> Iterator[Case]:
    """All cases in registration order, optionally only one family."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {FAMILIES}")
    return (case for case in CASES.values() if family is None or case.family == family)


def _register(name: str, input_shape: tuple[int, ...], *, foldable: int, left: int, family: str,
              skips: Mapping[str, tuple[str, ...]] | None = None, rank_dependent: tuple[str, ...] = (),
              pairs: tuple[tuple[str, str, str], ...] | None = None
              ) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Register a builder; its docstring is the case description (the hand-worked reasoning)."""
    if family not in FAMILIES:
        raise ValueError(f"case {name!r}: unknown family {family!r}; families: {FAMILIES}")

    def decorator(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in CASES:
            raise ValueError(f"case {name!r} registered twice")
        seed = zlib.crc32(name.encode())

        def build() -> nn.Module:
            generator = torch.Generator().manual_seed(seed)
            # Module constructors draw their default init from the global RNG; every value is redrawn
            # below, so only the global RNG's state needs protecting from the side effect.
            with torch.random.fork_rng(devices=[]):
                model = make()
            randomize_parameters(model, generator)
            randomize_norm_stats(model, generator)
            return model.eval()

        build.__name__ = f"build_{name}"
        build.__doc__ = make.__doc__
        description = " ".join((make.__doc__ or "").split())
        CASES[name] = Case(name=name, build=build, input_shape=tuple(input_shape), foldable=foldable, left=left,
                           family=family, description=description, skips=dict(skips or {}),
                           rank_dependent=tuple(rank_dependent),
                           pairs=None if pairs is None else frozenset(pairs))
        return make

    return decorator


#: torch's padding modes, for the cases that run through each.
_PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
_PADDING_MODES: tuple[_PaddingMode, ...] = ("zeros", "reflect", "replicate", "circular")


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)
