"""``reparameterize`` removes the ``nn.Identity`` that folded norms leave at the end of sequential containers.

Oracles: hand-worked names of the modules removed and hand-worked counts of module calls per forward pass;
``fuse`` on the same model for the parameter and ``state_dict`` keys (removal must change none); the float64
run of the original and the project's error model for the outputs (``refimpl.compare_models``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")
from torch import fx, nn  # noqa: E402

from adapters.torch import fuse, reparameterize  # noqa: E402
from adapters.torch.suite.cases import count_calls, randomize_norm_stats, randomize_parameters  # noqa: E402
from refimpl import compare_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvNorm(nn.Sequential):
    """A conv and its BatchNorm under the names ``c`` and ``bn`` (timm's ``ConvNorm``): Sequential's forward."""

    def __init__(self, cin: int, cout: int, norms: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, 3, padding=1, bias=False))
        for i in range(norms):
            self.add_module("bn" if i == 0 else f"bn{i}", nn.BatchNorm2d(cout))


class Residual(nn.Module):
    """x + b(relu(a(x))): calls its two ConvNorms as units (the sum is not affine: left)."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = ConvNorm(4, 8), nn.ReLU(), ConvNorm(8, 4)

    def forward(self, x):
        return x + self.b(self.act(self.a(x)))


class IndexesItsChild(nn.Module):
    """Calls the children of a Sequential one by one, by position (the last by a negative index)."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        return torch.relu(self.seq[-1](self.seq[0](x)))


class CallsByName(nn.Module):
    """Calls the children of a ConvNorm by their names."""

    def __init__(self):
        super().__init__()
        self.cn = ConvNorm(4, 4)

    def forward(self, x):
        return self.cn.bn(self.cn.c(x))


class Doubling(nn.Sequential):
    """A Sequential subclass with a forward of its own."""

    def forward(self, x):
        return 2 * super().forward(x)


def _randomised(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    return randomize_norm_stats(randomize_parameters(model, generator), generator).eval()


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    removed: tuple[str, ...]   # qualified names, by hand
    calls: int                 # module calls per forward pass after reparameterize (fuse's minus the removed)
    calls_fuse: int


def _graph_module() -> nn.Module:
    return fx.symbolic_trace(nn.Sequential(ConvNorm(4, 4), nn.ReLU()).eval())


CASES = [
    # model, 2 x (Residual, a: ConvNorm + c + bn, act, b: ConvNorm + c + bn) = 1 + 2 * 8 = 17; 4 bn removed.
    Case("convnorm_in_blocks", lambda: nn.Sequential(Residual(), Residual()),
         ("0.a.bn", "0.b.bn", "1.a.bn", "1.b.bn"), 13, 17),
    # model, ConvNorm, c, bn, bn1: conv -> BN -> BN both fold; both Identities trail: removed.
    Case("two_folded_norms_trailing", lambda: nn.Sequential(ConvNorm(4, 4, norms=2), nn.ReLU()),
         ("0.bn", "0.bn1"), 4, 6),
    # model, inner Sequential, conv, bn, relu, relu: the bn is not last (relu would move to position 1): kept.
    Case("norm_in_the_middle", lambda: nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                                                                  nn.ReLU()), nn.ReLU()), (), 6, 6),
    # The model itself is a ConvNorm: the caller holds it and may index it: kept. model, c, bn.
    Case("the_model_itself", lambda: ConvNorm(4, 4), (), 3, 3),
    # Its parent calls seq[0] and seq[-1] itself: model, IndexesItsChild, conv, bn = 4 calls (seq is never called).
    Case("indexed_by_its_parent", lambda: nn.Sequential(IndexesItsChild()), (), 4, 4),
    # A forward of its own: model, Doubling, conv, bn.
    Case("forward_overridden", lambda: nn.Sequential(Doubling(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))),
         (), 4, 4),
    # Its parent calls cn.c and cn.bn by name: model, CallsByName, c, bn.
    Case("called_by_name", lambda: nn.Sequential(CallsByName()), (), 4, 4),
    # A symbolically traced model calls 0.c and 0.bn by name; fx keeps "0" as a plain nn.Module: model, c, bn, relu.
    Case("called_by_name_from_a_graph_module", _graph_module, (), 4, 4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case(case):
    model = _randomised(case.build())
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    fused, fuse_report = fuse(model)
    ours, report = reparameterize(model)
    assert tuple(report.removed_identities) == case.removed
    assert report.to_dict()["removed_identities"] == list(case.removed)
    assert ("Identity module(s) left by folded norms removed" in report.summary()) == bool(case.removed)
    assert {p.norm for p in report.folded} == {p.norm for p in fuse_report.folded}
    assert count_calls(fused, x) == case.calls_fuse and count_calls(ours, x) == case.calls
    # Nothing but the removed Identities differs: the same parameters, buffers and state_dict keys as fuse's.
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in fused.named_parameters()]
    assert list(ours.state_dict()) == list(fused.state_dict())
    assert {name for name, _ in fused.named_modules()} - {name for name, _ in ours.named_modules()} == set(
        case.removed)
    with torch.no_grad():
        verdict = compare_models(ours(x), model(x), copy.deepcopy(model).double()(x.double()), "float32")
    assert verdict.ok, verdict


def test_remaining_children_keep_their_positions():
    model = _randomised(nn.Sequential(ConvNorm(4, 4, norms=2), nn.ReLU()))
    ours, report = reparameterize(model)
    container = ours[0]
    assert report.removed_identities == ["0.bn", "0.bn1"]
    assert list(container._modules) == ["c"] and container[0] is container.c and len(container) == 1
    assert type(container) is ConvNorm  # the class is kept (not replaced by its single child)


def test_inplace_removal_keeps_the_output_and_survives_a_copy():
    model = _randomised(nn.Sequential(Residual()))
    original = copy.deepcopy(model)
    x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    ours, report = reparameterize(model, inplace=True)
    assert ours is model and report.removed_identities == ["0.a.bn", "0.b.bn"]
    assert not hasattr(model[0].a, "bn") and not hasattr(model[0].b, "bn")
    with torch.no_grad():
        verdict = compare_models(model(x), original(x), copy.deepcopy(original).double()(x.double()), "float32")
        assert verdict.ok, verdict
        assert torch.equal(copy.deepcopy(model)(x), model(x))
