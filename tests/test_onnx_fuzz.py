"""Hypothesis fuzzer over random ONNX graphs whose node order is shuffled within topological constraints.

A drawn *program* grows a graph block by block on (N, 4, 5, 5) values. Each block reads one or two
*public* values (the graph input or an earlier block's result, so values are shared between blocks
at random) and publishes one; what it builds inside stays private to it. Each block records how
many of its BatchNormalization nodes a correct folder removes, by construction -- that is the
oracle, never the code under test:

- conv/transposed conv (random kernel, group, bias) -> [Identity] -> 1 or 2 BNs: all fold;
- BN -> [Identity] -> 1x1 conv (explicit zero pads or auto_pad), or -> Pad(reflect/edge) -> 3x3 conv: the BN
  folds (backward, or forward when what it reads happens to be a conv output read by nothing else -- one fold
  either way);
- two convs -> Concat(axis=1) -> BN: folds, a channel slice into each conv;
- Relu -> BN -> zero-padded 3x3 conv; Relu -> BN -> Relu; Relu -> BN -> transposed conv;
  Relu -> BN -> two convs; conv -> BN added to the conv's own output: none fold;
- a bias as its own Add (PaddlePaddle): conv -> Add(per-channel constant) -> 1 or 2 BNs, or BN -> Add(per-channel
  constant) -> 1x1 conv: all fold; conv -> Add(a constant along W, or per position) -> BN -> Relu: none;
- a plain conv, or an Add of two public values: no BN;
- optionally a head: GlobalAveragePool -> Flatten -> Gemm or MatMul+Add -> BN (folds), or
  Flatten -> BN -> Gemm (folds).

Graph outputs are the values nothing reads plus a random few others (a BN whose output is a graph
output still folds; a conv output that is one is simply not a fold partner forward). The nodes are
then written in a random topological order. Checked: the exact number of BNs folded and left, a
valid and faithful model, and the output judged against the float64 reference by the error model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx_helpers import assert_faithful  # noqa: E402

from adapters.onnx import fuse  # noqa: E402
from adapters.onnx.checking import verify  # noqa: E402
from adapters.onnx.suite.cases import GraphBuilder, count_batch_norms  # noqa: E402

C = 4
SHAPE = [2, C, 5, 5]


@dataclass
class Program:
    b: GraphBuilder
    public: list[str]
    folds: int = 0
    left: int = 0
    blocks: list[str] = field(default_factory=list)
    counter: int = 0

    def name(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"


def _conv(p: Program, data: st.DataObject, x: str, *, transposed: bool | None = None, cout: int = C) -> str:
    b = p.b
    kernel = data.draw(st.sampled_from([1, 3]))
    pads = {"pads": [kernel // 2] * 4}
    group = data.draw(st.sampled_from([g for g in (1, 2, 4) if cout % g == 0]))
    bias = data.draw(st.booleans())
    if transposed is None:
        transposed = data.draw(st.booleans())
    if transposed:
        return b.conv_transpose(x, p.name("convt"), C, cout, kernel, group=group, bias=bias, **pads)
    return b.conv(x, p.name("conv"), C, cout, kernel, group=group, bias=bias, **pads)


def _maybe_identity(p: Program, data: st.DataObject, x: str) -> str:
    return p.b.node("Identity", [x], p.name("id")) if data.draw(st.booleans()) else x


def block_conv_bn(p: Program, data: st.DataObject, x: str) -> str:
    y = _maybe_identity(p, data, _conv(p, data, x))
    norms = data.draw(st.integers(1, 2))
    for _ in range(norms):
        y = p.b.bn(y, p.name("bn"), C)
    p.folds += norms
    return y


def block_bn_conv(p: Program, data: st.DataObject, x: str) -> str:
    y = _maybe_identity(p, data, p.b.bn(x, p.name("bn"), C))
    p.folds += 1
    group = data.draw(st.sampled_from([1, 2]))
    if data.draw(st.booleans()):  # a copying Pad (as exporters write reflect/replicate padded convs), then no pads
        pads = p.b.init(p.name("pads"), np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))
        mode = data.draw(st.sampled_from(["reflect", "edge"]))
        return p.b.conv(p.b.node("Pad", [y, pads], p.name("pad"), mode=mode), p.name("conv"), C, C, 3, group=group)
    padding = data.draw(st.sampled_from([{"pads": [0, 0, 0, 0]}, {"auto_pad": "VALID"}, {"auto_pad": "SAME_UPPER"}]))
    return p.b.conv(y, p.name("conv"), C, C, 1, group=group, **padding)


def block_concat_bn(p: Program, data: st.DataObject, x: str) -> str:
    first = data.draw(st.sampled_from([1, 2, 3]))
    parts = [_conv(p, data, x, transposed=False, cout=first), _conv(p, data, x, transposed=False, cout=C - first)]
    p.folds += 1
    return p.b.bn(p.b.node("Concat", parts, p.name("concat"), axis=1), p.name("bn"), C)


def block_trap(p: Program, data: st.DataObject, x: str) -> str:
    b = p.b
    kind = data.draw(st.sampled_from(["padded_conv", "relu", "conv_transpose", "two_convs", "residual"]))
    p.left += 1
    if kind == "residual":
        c = _conv(p, data, x)
        return b.node("Add", [b.bn(c, p.name("bn"), C), c], p.name("add"))
    y = b.bn(b.node("Relu", [x], p.name("relu")), p.name("bn"), C)
    if kind == "padded_conv":
        return b.conv(y, p.name("conv"), C, C, 3, pads=[1, 1, 1, 1])
    if kind == "relu":
        return b.node("Relu", [y], p.name("relu"))
    if kind == "conv_transpose":
        return b.conv_transpose(y, p.name("convt"), C, C, 1)
    return b.node("Add", [b.conv(y, p.name("conv"), C, C, 1), b.conv(y, p.name("conv"), C, C, 1)], p.name("add"))


#: Shapes of an Add's constant that add one value per channel to an (N, C, H, W) value, and shapes that do not.
PER_CHANNEL = [(1, C, 1, 1), (C, 1, 1), (), (1,), (1, 1, 1, 1)]
NOT_PER_CHANNEL = [(SHAPE[3],), (1, C, SHAPE[2], SHAPE[3]), (1, 1, SHAPE[2], 1)]


def _add_constant(p: Program, data: st.DataObject, y: str, shapes: list) -> str:
    shape = data.draw(st.sampled_from(shapes))
    return p.b.add_constant(y, p.name("add"), shape, first=data.draw(st.booleans()))


def block_add_bias(p: Program, data: st.DataObject, x: str) -> str:
    """A bias written as its own Add (PaddlePaddle): conv -> Add(c) -> 1 or 2 BNs, or BN -> Add(c) -> unpadded
    conv; every BN folds."""
    if data.draw(st.booleans()):
        y = _add_constant(p, data, _conv(p, data, x), PER_CHANNEL)
        norms = data.draw(st.integers(1, 2))
        for _ in range(norms):
            y = p.b.bn(y, p.name("bn"), C)
        p.folds += norms
        return y
    y = _add_constant(p, data, p.b.bn(x, p.name("bn"), C), PER_CHANNEL)
    p.folds += 1
    return p.b.conv(y, p.name("conv"), C, C, 1, group=data.draw(st.sampled_from([1, 2])))


def block_add_trap(p: Program, data: st.DataObject, x: str) -> str:
    """conv -> Add(a constant that is not per channel) -> BN -> Relu: the BN stays."""
    y = _add_constant(p, data, _conv(p, data, x, transposed=False), NOT_PER_CHANNEL)
    p.left += 1
    return p.b.node("Relu", [p.b.bn(y, p.name("bn"), C)], p.name("relu"))


def block_plain(p: Program, data: st.DataObject, x: str) -> str:
    return _conv(p, data, x)


BLOCKS = {"conv_bn": block_conv_bn, "bn_conv": block_bn_conv, "concat_bn": block_concat_bn, "trap": block_trap,
          "plain": block_plain, "add_bias": block_add_bias, "add_trap": block_add_trap}


def head(p: Program, data: st.DataObject, x: str) -> str:
    b = p.b
    kind = data.draw(st.sampled_from(["gemm_bn", "matmul_bn", "bn_gemm"]))
    p.blocks.append(f"head:{kind}")
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [x], p.name("pool"))], p.name("flatten"))
    p.folds += 1
    if kind == "bn_gemm":
        trans_b = data.draw(st.booleans())
        w = b.weight(p.name("fc.weight"), (3, C) if trans_b else (C, 3), C)
        return b.node("Gemm", [b.bn(flat, p.name("bn"), C), w], p.name("fc"), transB=int(trans_b))
    if kind == "gemm_bn":
        trans_b = data.draw(st.booleans())
        w = b.weight(p.name("fc.weight"), (3, C) if trans_b else (C, 3), C)
        alpha = data.draw(st.sampled_from([1.0, 0.3, 2.0]))
        y = b.node("Gemm", [flat, w, b.init(p.name("fc.bias"), b.uniform((3,), 0.5))], p.name("fc"),
                   transB=int(trans_b), alpha=alpha)
    else:
        y = b.node("MatMul", [flat, b.weight(p.name("fc.weight"), (C, 3), C)], p.name("fc"))
        bias = b.init(p.name("fc.bias"), b.uniform((3,), 0.5))
        y = b.node("Add", [bias, y] if data.draw(st.booleans()) else [y, bias], p.name("add"))
    return b.bn(y, p.name("bn"), 3)


def _shuffled(nodes: list, rng: random.Random) -> list:
    """The nodes in a random order that still defines every value before it is read."""
    produced = {o: i for i, n in enumerate(nodes) for o in n.output}
    needs = [{produced[name] for name in n.input if name in produced} for n in nodes]
    done: set[int] = set()
    order: list = []
    while len(order) < len(nodes):
        ready = [i for i in range(len(nodes)) if i not in done and needs[i] <= done]
        pick = rng.choice(ready)
        done.add(pick)
        order.append(nodes[pick])
    return order


@st.composite
def programs(draw):
    data = draw(st.data())
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    b = GraphBuilder("fuzz", opset=draw(st.sampled_from([13, 17])), dtype=dtype,
                     rng=np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    p = Program(b, [b.input("x", SHAPE)])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(sorted(BLOCKS)))
        p.blocks.append(kind)
        inputs = [draw(st.sampled_from(p.public))]
        if draw(st.integers(0, 4)) == 0 and len(p.public) > 1:
            other = draw(st.sampled_from(p.public))
            p.public.append(b.node("Add", [inputs[0], other], p.name("add")))
            p.blocks.append("add")
        p.public.append(BLOCKS[kind](p, data, inputs[0]))
    read = {name for node in b.nodes for name in node.input}
    sinks = [v for v in p.public if v not in read and v != "x"]
    if draw(st.booleans()):
        sinks = [v for v in sinks if v != p.public[-1]] + [head(p, data, p.public[-1])]
    extra = [v for v in p.public[1:] if v not in sinks and draw(st.integers(0, 5)) == 0]
    b.output(*sinks, *extra)
    b.nodes = _shuffled(b.nodes, random.Random(draw(st.integers(0, 2**32 - 1))))
    return p


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_random_graphs_fold_exactly_the_foldable_norms(program):
    event(f"{program.b.dtype.name}, {len(program.blocks)} blocks")
    model = program.b.model()
    onnx.checker.check_model(model, full_check=True)
    assert count_batch_norms(model) == program.folds + program.left, program.blocks

    folded, report = fuse(model)

    onnx.checker.check_model(folded, full_check=True)
    assert count_batch_norms(folded) == program.left, (program.blocks, report.table())
    assert len({pair.norm for pair in report.folded}) == program.folds, (program.blocks, report.table())
    assert_faithful(model, folded, report)
    verdict = verify(model, folded, program.b.feeds, per_node=False)
    assert verdict.ok, f"{program.blocks}\n{verdict}"
