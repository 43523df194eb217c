"""Hypothesis fuzzer: random graphs of fold/no-fold blocks, modules registered in shuffled order.

A drawn *program* is a chain of blocks on a (N, C, H, W) stream, each block a small dataflow
graph (conv -> BN, BN -> conv with a padding mode, conv -> act -> BN, conv -> BN -> BN, branches
merged by add or concat, shared and reused modules, Dropout / Identity in between, transposed
conv -> BN, BN after an add), optionally ending in a linear head. Consecutive blocks are joined
by an activation, so whether a block's norms fold depends only on the block: each block records
which of its norms a correct fuser folds, by construction -- that is the oracle. The modules are
registered in a shuffled order under meaningless names, and ``forward`` interprets the program,
so neither registration order nor names say anything about the dataflow.

Checked per example: the fused output matches the original within the error model, exactly the
foldable norms were folded (read off the fused model and off the report), and the number of norm
evaluations left is the number of calls of the norms that must stay.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from adapters.torch import fuse
from adapters.torch.checking import rounded_copy
from adapters.torch.suite.cases import (
    Conv2dSame,
    count_norm_calls,
    is_norm_module,
    norm_module_names,
    randomize_norm_stats,
    randomize_parameters,
)
from adapters.torch.suite.realcode_cases import CustomBatchNormCall, FrozenCopy, PaddedConv2d, SquaredLookalike
from refimpl import compare_models

CHANNELS = 4
INPUT_SHAPE = (2, CHANNELS, 6, 6)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass
class Program:
    """Straight-line code over named values; ``modules`` maps names to modules, in creation order."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    code: list[tuple] = field(default_factory=list)
    foldable: set[str] = field(default_factory=set)  # norm module names a correct fuser folds
    calls: dict[str, int] = field(default_factory=dict)  # norm module name -> forward calls per pass
    values: int = 0
    blocks: list[str] = field(default_factory=list)

    def module(self, module: nn.Module) -> str:
        name = f"_{len(self.modules)}"
        self.modules[name] = module
        if is_norm_module(module):
            self.calls[name] = 0
        return name

    def value(self) -> str:
        self.values += 1
        return f"v{self.values}"

    def call(self, module_name: str, source: str) -> str:
        out = self.value()
        self.code.append(("call", out, module_name, source))
        if module_name in self.calls:
            self.calls[module_name] += 1
        return out

    def apply(self, op: str, *sources: str) -> str:
        out = self.value()
        self.code.append((op, out, *sources))
        return out


class FuzzModel(nn.Module):
    """Interprets a program; fx traces straight through the loop (its control flow is static)."""

    def __init__(self, modules: list[tuple[str, nn.Module]], code: list[tuple]) -> None:
        super().__init__()
        for name, module in modules:
            self.add_module(name, module)
        self.code = tuple(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {"x": x}
        out = "x"
        for op, out, *args in self.code:
            if op == "call":
                env[out] = getattr(self, args[0])(env[args[1]])
            elif op == "add":
                env[out] = env[args[0]] + env[args[1]]
            elif op == "cat":
                env[out] = torch.cat([env[args[0]], env[args[1]]], dim=1)
            elif op == "relu":
                env[out] = torch.relu(env[args[0]])
            elif op == "flatten":
                env[out] = torch.flatten(env[args[0]], 1)
            elif op == "tokens":      # (N, C, H, W) -> (N, H*W, C)
                env[out] = env[args[0]].flatten(2).transpose(1, 2)
            elif op == "untokens":    # (N, H*W, C) -> (N, C, H, W), shaped like args[1]
                env[out] = env[args[0]].transpose(1, 2).reshape_as(env[args[1]])
            elif op == "rows":        # (N, L, C) -> (N*L, C)
                env[out] = env[args[0]].flatten(0, 1)
            elif op == "reshape_as":
                env[out] = env[args[0]].reshape_as(env[args[1]])
            elif op == "write":       # an in-place write into the tensor (no new value for the graph)
                env[args[0]][:, :1] = 0.5
                env[out] = env[args[0]]
            elif op == "pad_same":    # TF-"same" zero padding for a 3x3 kernel, computed from the shape
                height, width = env[args[0]].shape[-2:]
                env[out] = nn.functional.pad(env[args[0]], [1, 1, 1, 1] if height > 1 and width > 1 else [0] * 4)
            else:
                raise ValueError(f"unknown op {op!r} in program")
        return env[out]


def _conv(draw, groups_ok: bool = True, *, kernel: int | None = None, mode: str | None = None) -> nn.Conv2d:
    kernel = draw(st.sampled_from([1, 3])) if kernel is None else kernel
    mode = draw(st.sampled_from(PADDING_MODES)) if mode is None else mode
    groups = draw(st.sampled_from([1, 2, CHANNELS])) if groups_ok else 1
    return nn.Conv2d(CHANNELS, CHANNELS, kernel, padding=kernel // 2, padding_mode=mode, groups=groups,
                     bias=draw(st.booleans()))


# Each block takes the name of its input value and returns the name of its output value.

def block_conv_bn(draw, p: Program, x: str) -> str:
    conv, bn = p.module(_conv(draw)), p.module(nn.BatchNorm2d(CHANNELS))
    y = p.call(conv, x)
    if draw(st.booleans()):
        y = p.call(p.module(nn.Identity()), y)
    p.foldable.add(bn)
    return p.call(bn, y)


def block_conv_bn_bn(draw, p: Program, x: str) -> str:
    conv = p.module(_conv(draw))
    bn1 = p.module(nn.BatchNorm2d(CHANNELS))
    bn2 = p.module(nn.BatchNorm2d(CHANNELS, affine=draw(st.booleans())))
    p.foldable |= {bn1, bn2}
    return p.call(bn2, p.call(bn1, p.call(conv, x)))


def block_conv_act_bn(draw, p: Program, x: str) -> str:
    conv, bn = p.module(_conv(draw)), p.module(nn.BatchNorm2d(CHANNELS))
    act = p.module(draw(st.sampled_from([nn.ReLU, nn.Hardswish, nn.Tanh]))())
    return p.call(bn, p.call(act, p.call(conv, x)))


def block_bn_conv(draw, p: Program, x: str) -> str:
    bn = p.module(nn.BatchNorm2d(CHANNELS))
    padding = draw(st.sampled_from(("none",) + PADDING_MODES))
    conv_module = _conv(draw, kernel=1, mode="zeros") if padding == "none" else _conv(draw, kernel=3, mode=padding)
    conv = p.module(conv_module)
    y = p.call(bn, x)
    between = draw(st.sampled_from([None, nn.Identity, nn.Dropout]))
    if between is not None:
        y = p.call(p.module(between()), y)
    # Exact only if the conv reads BN outputs everywhere: no padding, or padding that copies them.
    if conv_module.kernel_size == (1, 1) or conv_module.padding_mode != "zeros":
        p.foldable.add(bn)
    return p.call(conv, y)


def block_bn_conv_transpose(draw, p: Program, x: str) -> str:
    bn = p.module(nn.BatchNorm2d(CHANNELS))
    convt = p.module(nn.ConvTranspose2d(CHANNELS, CHANNELS, 3, padding=1, groups=draw(st.sampled_from([1, 2]))))
    return p.call(convt, p.call(bn, x))


def block_conv_transpose_bn(draw, p: Program, x: str) -> str:
    convt = p.module(nn.ConvTranspose2d(CHANNELS, CHANNELS, 3, padding=1, groups=draw(st.sampled_from([1, 2, 4])),
                                        bias=draw(st.booleans())))
    bn = p.module(nn.BatchNorm2d(CHANNELS))
    p.foldable.add(bn)
    return p.call(bn, p.call(convt, x))


def block_branches(draw, p: Program, x: str) -> str:
    merge = draw(st.sampled_from(["add", "cat"]))
    width = CHANNELS if merge == "add" else CHANNELS // 2
    outs = []
    for _ in range(2):
        conv = p.module(nn.Conv2d(CHANNELS, width, draw(st.sampled_from([1, 3])), padding="same"))
        bn = p.module(nn.BatchNorm2d(width))
        p.foldable.add(bn)
        outs.append(p.call(bn, p.call(conv, x)))
    return p.apply(merge, *outs)


def block_bn_after_add(draw, p: Program, x: str) -> str:
    a, b = p.module(_conv(draw)), p.module(_conv(draw))
    bn = p.module(nn.BatchNorm2d(CHANNELS))
    return p.call(bn, p.apply("add", p.call(a, x), p.call(b, x)))


def block_conv_output_used_twice(draw, p: Program, x: str) -> str:
    conv, bn = p.module(_conv(draw)), p.module(nn.BatchNorm2d(CHANNELS))
    y = p.call(conv, x)
    return p.apply("add", p.call(bn, y), y)


def block_conv_reused(draw, p: Program, x: str) -> str:
    conv, bn = p.module(_conv(draw, groups_ok=False)), p.module(nn.BatchNorm2d(CHANNELS))
    if draw(st.booleans()):
        # The same conv -> same BN at both calls: one fold serves both.
        p.foldable.add(bn)
        return p.call(bn, p.call(conv, p.apply("relu", p.call(bn, p.call(conv, x)))))
    other = p.module(nn.BatchNorm2d(CHANNELS))  # a second BN after the second call: neither folds
    return p.apply("add", p.call(bn, p.call(conv, x)), p.call(other, p.call(conv, p.apply("relu", x))))


def block_shared_bn(draw, p: Program, x: str) -> str:
    conv1, conv2 = p.module(_conv(draw)), p.module(_conv(draw))
    bn = p.module(nn.BatchNorm2d(CHANNELS))
    y2 = p.call(conv2, x)
    out = p.apply("add", p.call(bn, p.call(conv1, x)), p.call(bn, y2))
    if draw(st.booleans()):
        return p.apply("add", out, y2)  # conv2 also feeds the add: the shared BN cannot fold
    p.foldable.add(bn)
    return out


def block_same_conv(draw, p: Program, x: str) -> str:
    kernel = draw(st.sampled_from([1, 3]))
    conv = p.module(Conv2dSame(CHANNELS, CHANNELS, kernel, bias=draw(st.booleans())))
    bn = p.module(nn.BatchNorm2d(CHANNELS))
    if draw(st.booleans()):
        p.foldable.add(bn)                       # conv -> BN: the padding is before the conv
        return p.call(bn, p.call(conv, x))
    if kernel == 1:
        p.foldable.add(bn)                       # BN -> 1x1 'SAME' conv pads nothing
    return p.call(conv, p.call(bn, x))


def block_token_linear_bn(draw, p: Program, x: str) -> str:
    # LeViT's LinearNorm over the H*W tokens: linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as.
    linear = p.module(nn.Linear(CHANNELS, CHANNELS, bias=draw(st.booleans())))
    bn = p.module(nn.BatchNorm1d(CHANNELS))
    p.foldable.add(bn)                           # the fuzzer passes example inputs: the rank is known
    tokens = p.call(linear, p.apply("tokens", x))
    normed = p.apply("reshape_as", p.call(bn, p.apply("rows", tokens)), tokens)
    return p.apply("untokens", normed, x)


def block_norm_by_semantics(draw, p: Program, x: str) -> str:
    # Norms recognised from their recorded forward (a FrozenBatchNorm copy with a literal eps, F.batch_norm in a
    # custom module) fold like BatchNorm2d; a running-statistics lookalike that squares its output never does.
    kind = draw(st.sampled_from([FrozenCopy, CustomBatchNormCall, SquaredLookalike]))
    conv, norm = p.module(_conv(draw)), p.module(kind(CHANNELS))
    if kind is not SquaredLookalike:
        p.foldable.add(norm)
    return p.call(norm, p.call(conv, x))


def block_padded_conv(draw, p: Program, x: str) -> str:
    # A conv subclass that pads from x.shape, then F.conv2d on its own weight and bias: a partner for a BN after
    # it, never for one before it (the padding sits between them).
    conv = p.module(PaddedConv2d(CHANNELS, CHANNELS, 3, bias=draw(st.booleans())))
    bn = p.module(nn.BatchNorm2d(CHANNELS))
    if draw(st.booleans()):
        p.foldable.add(bn)
        return p.call(bn, p.call(conv, x))
    return p.call(conv, p.call(bn, x))


def block_written_or_padded(draw, p: Program, x: str) -> str:
    # conv -> in-place write -> BN: the written values are not the conv's, nothing folds. Padding computed from
    # the input's shape before a conv (padding=0) -> BN: folds (the padding is before the conv).
    bn = p.module(nn.BatchNorm2d(CHANNELS))
    if draw(st.booleans()):
        conv = p.module(_conv(draw))
        return p.call(bn, p.apply("write", p.call(conv, x)))
    conv = p.module(nn.Conv2d(CHANNELS, CHANNELS, 3, bias=draw(st.booleans())))
    p.foldable.add(bn)
    return p.call(bn, p.call(conv, p.apply("pad_same", x)))


BLOCKS = [block_norm_by_semantics, block_padded_conv, block_written_or_padded,
          block_same_conv, block_token_linear_bn, block_conv_bn, block_conv_bn_bn, block_conv_act_bn, block_bn_conv,
          block_bn_conv_transpose,
          block_conv_transpose_bn, block_branches, block_bn_after_add, block_conv_output_used_twice,
          block_conv_reused, block_shared_bn]


def head(draw, p: Program, x: str) -> str:
    kind = draw(st.sampled_from([None, "linear_bn", "bn_linear"]))
    if kind is None:
        return x
    y = p.apply("flatten", p.call(p.module(nn.AdaptiveAvgPool2d(1)), x))
    if kind == "linear_bn":
        bn = p.module(nn.BatchNorm1d(6))
        p.foldable.add(bn)
        return p.call(bn, p.call(p.module(nn.Linear(CHANNELS, 6)), y))
    bn = p.module(nn.BatchNorm1d(CHANNELS))
    p.foldable.add(bn)
    y = p.call(bn, y)
    if draw(st.booleans()):
        y = p.call(p.module(nn.Dropout(0.3)), y)
    return p.call(p.module(nn.Linear(CHANNELS, 3, bias=draw(st.booleans()))), y)


@st.composite
def programs(draw) -> tuple[Program, list[str], int]:
    p = Program()
    x = "x"
    # A prefix of a permutation: every example mixes several distinct blocks, so 30 examples
    # exercise each block's variants many times over.
    chosen = draw(st.permutations(BLOCKS))[:draw(st.integers(3, len(BLOCKS)))]
    for index, block in enumerate(chosen):
        if index:
            # Join blocks with an activation (a module or a function) so each block's oracle is local.
            x = p.call(p.module(nn.ReLU()), x) if draw(st.booleans()) else p.apply("relu", x)
        p.blocks.append(block.__name__)
        x = block(draw, p, x)
    x = head(draw, p, x)
    order = draw(st.permutations(list(p.modules)))
    seed = draw(st.integers(0, 2**31 - 1))
    return p, order, seed


def build(p: Program, order: list[str], seed: int) -> tuple[FuzzModel, Program]:
    """The model, with modules registered in ``order`` and renamed by registration position (so
    names carry no trace of creation order), and the program rewritten to the new names."""
    rename = {old: f"m{position}" for position, old in enumerate(order)}
    code = [(op, out, rename[args[0]], *args[1:]) if op == "call" else (op, out, *args)
            for op, out, *args in p.code]
    renamed = Program(modules={rename[name]: module for name, module in p.modules.items()}, code=code,
                      foldable={rename[name] for name in p.foldable},
                      calls={rename[name]: count for name, count in p.calls.items()}, values=p.values,
                      blocks=list(p.blocks))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        model = FuzzModel([(rename[name], p.modules[name]) for name in order], code)
    randomize_parameters(model, generator)
    randomize_norm_stats(model, generator)
    return model.eval(), renamed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_fuzz_fuse(drawn: tuple[Program, list[str], int]) -> None:
    p, order, seed = drawn
    for block in p.blocks:
        event(block)
    model, p = build(copy.deepcopy(p), order, seed)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
        unfused = model(x)

    fused, report = fuse(model, example_inputs=x)

    with torch.no_grad():
        # The baseline includes the original with its parameters rounded once more: some drawn
        # graphs (a BN shift folded into a conv bias it nearly cancels) are far more sensitive
        # to the rounding of parameters, which folding cannot avoid, than to that of activations.
        rounded = [rounded_copy(model, trial)(x) for trial in range(3)]
        result = compare_models(fused(x), unfused, reference, torch.float32, perturbed=rounded)
    assert result.ok, f"blocks {p.blocks}: {result.describe()}"
    modules = dict(fused.named_modules())
    folded = {name for name in norm_module_names(model) if not is_norm_module(modules[name])}
    assert folded == p.foldable, (
        f"blocks {p.blocks}: folded {sorted(folded)}, foldable {sorted(p.foldable)}; skipped: "
        + "; ".join(f"{s.norm}: {s.reason} ({s.detail})" for s in report.skipped))
    assert {pair.norm for pair in report.folded} == folded
    assert {skip.norm for skip in report.skipped} == set(p.calls) - folded
    expected_left = sum(count for name, count in p.calls.items() if name not in p.foldable)
    assert count_norm_calls(fused, x) == expected_left, f"blocks {p.blocks}"
