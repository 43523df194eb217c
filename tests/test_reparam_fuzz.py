"""A fuzzer over random branch blocks: the expected merges follow from how each block is built.

Each example draws a block -- channels, stride, groups, 2 to 4 branches of random kinds (conv, conv+BN,
identity, BatchNorm alone, average pool, layer scale, 1x1 -> kxk chain), random ways of writing the sum
(``+``, ``-``, ``torch.add(alpha=)``, ``+=``, ``sum()``) and at most one *defect* that forbids the merge
(another padding mode, another dilation, another groups, a BatchNorm shift before a zero-padded kxk conv,
a non-linear branch, a branch output used elsewhere). The expectation is derived from that construction
alone: which branches merge, which reason is reported, how many convs and norms are left. The oracles are
the float64 run of the original (``refimpl.compare_models``) and, for the merged layer, the branches
applied with the float64 reference ops (per element, ``refimpl.error_bound``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from adapters.torch import reparameterize  # noqa: E402
from adapters.torch.suite.cases import count_norm_calls, randomize_norm_stats, randomize_parameters  # noqa: E402
from adapters.torch.suite.merge_cases import LayerScale2d, Pair, Reference, count_layer_calls  # noqa: E402
from refimpl import compare, compare_models, error_bound  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Branch:
    kind: str            # conv, convbn, identity, bn, pool, scaled, chain
    kernel: tuple[int, int] = (3, 3)
    coefficient: float = 1.0
    mode: str = "zeros"
    dilation: int = 1
    groups: int | None = None   # None: the block's groups
    shift: bool = False         # chain: a BatchNorm between the 1x1 and the kxk conv


@dataclass
class Spec:
    cin: int
    cout: int
    stride: int
    groups: int
    branches: list[Branch]
    defect: str                 # none, mode, dilation, groups, shift, nonlinear, used_elsewhere
    writing: list[str] = field(default_factory=list)


DEFECTS = ["none", "mode", "dilation", "groups", "shift", "nonlinear", "used_elsewhere"]


@st.composite
def specs(draw, defect: str):
    groups = draw(st.sampled_from([1, 2]))
    cin = draw(st.sampled_from([4, 6]))
    stride = draw(st.sampled_from([1, 1, 2]))
    cout = cin if stride == 1 and draw(st.booleans()) else draw(st.sampled_from([4, 6]))
    same = cin == cout and stride == 1
    kinds = ["conv", "convbn", "scaled", "chain"] + (["identity", "bn", "pool"] if same else ["pool"] * 0)
    count = draw(st.integers(1, 3))
    branches = [Branch("convbn", (3, 3))]  # one 3x3 conv: the merged kernel's size and padding mode
    for _ in range(count - 1 if defect in ("nonlinear", "used_elsewhere") else max(count, 2) - 1):
        kind = draw(st.sampled_from(kinds))
        kernel = draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1), (5, 5)])) if kind in ("conv", "convbn",
                                                                                              "scaled") else (3, 3)
        branches.append(Branch(kind, kernel, draw(st.sampled_from([1.0, 1.0, -1.0, 0.5]))))
    if defect == "mode":
        branches.append(Branch("conv", (3, 3), mode="reflect"))
    elif defect == "dilation":
        branches.append(Branch("conv", (3, 3), dilation=2))
    elif defect == "groups":
        branches.append(Branch("conv", (3, 3), groups=3 - groups))
    elif defect == "shift":
        branches.append(Branch("chain", (3, 3), shift=True))
    elif defect in ("nonlinear", "used_elsewhere"):
        branches.append(Branch("convbn", (1, 1)))
    writing = [draw(st.sampled_from(["plus", "minus", "torch_add", "iadd"])) for _ in branches[1:]]
    return Spec(cin, cout, stride, groups, branches, defect, writing)


class FuzzBlock(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.branches = nn.ModuleList([self._branch(b) for b in spec.branches])

    def _branch(self, b: Branch) -> nn.Module:
        s, g = self.spec, b.groups or self.spec.groups
        padding = tuple(b.dilation * (k - 1) // 2 for k in b.kernel)
        if b.kind in ("conv", "convbn", "scaled"):
            conv = nn.Conv2d(s.cin, s.cout, b.kernel, s.stride, padding, b.dilation, g, bias=b.kind == "conv",
                             padding_mode=b.mode)
            if b.kind == "conv":
                return conv
            layers = [conv, nn.BatchNorm2d(s.cout)] + ([LayerScale2d(s.cout)] if b.kind == "scaled" else [])
            return nn.Sequential(*layers)
        if b.kind == "identity":
            return nn.Identity()
        if b.kind == "bn":
            return nn.BatchNorm2d(s.cout)
        if b.kind == "pool":
            return nn.AvgPool2d(3, s.stride, 1, count_include_pad=True)
        layers = [nn.Conv2d(s.cin, s.cout, 1, groups=g, bias=False)] + ([nn.BatchNorm2d(s.cout)] if b.shift else [])
        return nn.Sequential(*layers, nn.Conv2d(s.cout, s.cout, 3, s.stride, 1, groups=g, bias=False))

    def forward(self, x):
        spec = self.spec
        terms = []
        for i, branch in enumerate(self.branches):
            y = branch(x)
            if i == len(spec.branches) - 1 and spec.defect == "nonlinear":
                y = torch.relu(y)
            terms.append(y)
        out = terms[0]
        for b, y, how in zip(spec.branches[1:], terms[1:], spec.writing, strict=True):
            c = b.coefficient
            if how == "torch_add" or c not in (1.0, -1.0):
                out = torch.add(out, y, alpha=c)
            elif how == "minus":
                out = out - (-c) * y if c == 1.0 else out - y
            elif how == "iadd" and c == 1.0:
                out += y
            else:
                out = out + y if c == 1.0 else out - y
        if spec.defect == "used_elsewhere":
            return out * torch.sigmoid(terms[-1])
        return torch.relu(out)


def _expected(spec: Spec):
    """(merges, convs left, norms left, reasons of the sums left), from the construction alone."""
    convs_per_branch = {"conv": 1, "convbn": 1, "scaled": 1, "identity": 0, "bn": 0, "pool": 0, "chain": 2}
    all_convs = sum(convs_per_branch[b.kind] for b in spec.branches) + 1    # + the head
    identity_norms = sum(b.kind == "bn" for b in spec.branches)
    if spec.defect in ("mode", "dilation", "groups", "shift"):
        reason = {"mode": "padding_mode_mismatch", "dilation": "dilation_mismatch", "groups": "groups_incompatible",
                  "shift": "zero_padding"}[spec.defect]
        return 0, all_convs, identity_norms, (reason,)
    if spec.defect in ("nonlinear", "used_elsewhere"):
        # The last branch stays apart; the others (always a 3x3 conv+BN among them) merge if two or more.
        if len(spec.branches) - 1 >= 2:
            return 1, 1 + 1 + 1, 0, ()
        reason = "nonlinear_branch" if spec.defect == "nonlinear" else "branch_output_used_elsewhere"
        return 0, all_convs, identity_norms, (reason,)
    return 1, 2, 0, ()


def _reference(spec: Spec, block: FuzzBlock, x: Pair, upto: int | None = None) -> Pair:
    r = Reference
    total = None
    count = len(spec.branches) if upto is None else upto
    for i, (b, branch) in enumerate(zip(spec.branches[:count], block.branches, strict=False)):
        if b.kind == "conv":
            y = r.conv(x, branch)
        elif b.kind in ("convbn", "scaled"):
            y = r.bn(r.conv(x, branch[0]), branch[1])
            if b.kind == "scaled":
                y = y.scaled(branch[2].gamma.detach().reshape(-1).numpy())
        elif b.kind == "identity":
            y = x
        elif b.kind == "bn":
            y = r.bn(x, branch)
        elif b.kind == "pool":
            y = r.pool(x, branch)
        else:
            y = r.conv(x, branch[0])
            if b.shift:
                y = r.bn(y, branch[1])
            y = r.conv(y, branch[-1])
        c = 1.0 if i == 0 else b.coefficient
        y = y if c == 1.0 else y.scaled(c)
        total = y if total is None else total + y
    assert total is not None
    return total


@pytest.mark.parametrize("defect", DEFECTS)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=8, deadline=None)
def test_random_branch_blocks(defect, data, seed):
    spec = data.draw(specs(defect))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        model = nn.Sequential(FuzzBlock(spec), nn.Conv2d(spec.cout, 2, 1))
    randomize_parameters(model, generator)
    randomize_norm_stats(model, generator)
    for m in model.modules():
        if isinstance(m, LayerScale2d):
            with torch.no_grad():
                m.gamma.copy_(0.5 + torch.rand(m.gamma.shape, generator=generator, dtype=torch.float64))
    model.eval()
    x = torch.randn((2, spec.cin, 8, 8), generator=generator)
    merged, report = reparameterize(model, example_inputs=(x,))
    merges, convs, norms, left = _expected(spec)
    assert len(report.merged) == merges, (spec, report)
    assert count_layer_calls(merged, x) == convs, (spec, report)
    assert count_norm_calls(merged, x) == norms, (spec, report)
    assert tuple(s.reason for s in report.merges_skipped) == left, (spec, report)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
        verdict = compare_models(merged(x), model(x), reference, "float32")
    assert verdict.ok, (spec, verdict)
    if merges:
        layer = merged.get_submodule(report.merged[0].layer)
        together = len(spec.branches) - (1 if spec.defect in ("nonlinear", "used_elsewhere") else 0)
        expected = _reference(spec, model[0], Reference.input(x), together)
        with torch.no_grad():
            got = layer(x).double().numpy()
        result = compare(got, expected.value, error_bound(expected.magnitude, layer.weight[0].numel() + 12, "float32"))
        assert result.ok, (spec, result.describe(report.merged[0].layer))
