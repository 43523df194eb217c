"""Branch merging on real re-parameterisable networks: timm's RepVGG, MobileOne, FastViT, RepGhostNet, RepViT,
and a YOLO-style RepConv backbone (``adapters.torch.suite.merge_cases.repconv_backbone``).

Each network is built once per module with random weights and calibrated random norm statistics, and
re-parameterised three ways: ours (``adapters.torch.reparameterize``), the model's own
(``timm.utils.reparameterize_model``, which calls each block's hand-written ``reparameterize``/``fuse``),
and BatchNorm folding alone (``fuse``). Ours must leave no BatchNorm evaluation where the model's own
leaves none (and never more), no more conv/linear calls than the model's own, merge the number of sums
worked out by hand below, and pass ``adapters.torch.verify`` (the error model of ``refimpl.compare_models``
end to end and per block).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from torch import nn  # noqa: E402

from adapters.torch import FusionReport, reparameterize, verify  # noqa: E402
from adapters.torch.suite.cases import count_norm_calls  # noqa: E402
from adapters.torch.suite.merge_cases import count_layer_calls, repconv_backbone  # noqa: E402
from adapters.torch.suite.zoo import randomize_calibrated_norm_stats  # noqa: E402

pytestmark = [pytest.mark.zoo, pytest.mark.usefixtures("one_thread")]

# Sums that merge, worked out from each architecture's source:
#   repvgg_a0 (byobnet.py, RepVggBlock: conv_1x1 + conv_kxk [+ identity BN]): stem + stages of 2, 4, 14, 1
#     blocks = 22.
#   mobileone_s0 (byobnet.py, MobileOneBlock: scale 1x1 + 4 kxk branches [+ identity BN]): stem 1 + stages of
#     2, 8, 10, 1 "mobileone" units of two blocks each (depthwise 3x3, then pointwise 1x1) = 1 + 42 = 43.
#   fastvit_t8 (fastvit.py): stem of 3 MobileOneBlocks; RepMixer token mixers in 2, 2, 4, 2 blocks (each
#     x + gamma*(mixer(x) - norm(x)), one sum); 3 PatchEmbeds of ReparamLargeKernelConv (7x7 + 3x3) and a
#     MobileOneBlock; the final MobileOneBlock: 3 + 10 + 6 + 1 = 20. The 10 RepMixerBlock residuals
#     x + layer_scale(mlp(x)) stay (the MLP has a GELU).
#   repghostnet_050 (repghost.py, RepGhostModule: cheap_operation(x1) + fusion_bn(x1)): 16 bottlenecks of
#     two modules = 32.
#   repvit_m1 (repvit.py, RepVggDw token mixers): blocks 2 + 2 + 14 + 2 and 3 downsample pre-blocks = 23, and
#     the distillation head (head(x) + head_dist(x)) / 2 of BatchNorm1d -> Linear = 24. The 26 residuals
#     around the channel-mixer MLPs stay (GELU).
#   repconv_backbone: four RepConv blocks = 4.
#: Small inputs keep the module under a few seconds of CPU; every network downsamples by 32, to 1x1 here.
INPUT = (3, 32, 32)

ENTRIES = {"repvgg_a0": 22, "mobileone_s0": 43, "fastvit_t8": 20, "repghostnet_050": 32, "repvit_m1": 24,
           "repconv_backbone": 4}

# Identities of folded norms removed at the end of sequential containers, worked out the same way:
#   repvit_m1: the ConvNorms (nn.Sequential subclasses c, bn) that are not merged away: 2 in the stem, 2 in each
#     of the 26 channel-mixer MLPs, 2 in each of the 3 downsamples (spatial and channel) = 60.
#   repghostnet_050: its folded BatchNorms sit in Sequential(conv, bn, relu) (not last: kept) or in modules with
#     their own forward; fastvit_t8's 10 are folded with their activation (FoldedNormAct); the others fold no norm
#     outside a merge.
REMOVED = {"repvgg_a0": 0, "mobileone_s0": 0, "fastvit_t8": 0, "repghostnet_050": 0, "repvit_m1": 60,
           "repconv_backbone": 0}


@dataclass
class Built:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    ours: nn.Module
    report: FusionReport
    timms: nn.Module


@pytest.fixture(scope="module", params=list(ENTRIES))
def built(request) -> Built:
    name = request.param
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module-scoped: built before the function-scoped one_thread fixture applies)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = repconv_backbone() if name == "repconv_backbone" else timm.create_model(name, pretrained=False)
    randomize_calibrated_norm_stats(model, INPUT, torch.Generator().manual_seed(0))
    model.eval()
    inputs = torch.randn((2, *INPUT), generator=torch.Generator().manual_seed(1))
    ours, report = reparameterize(model, example_inputs=(inputs,))
    timms = timm.utils.reparameterize_model(copy.deepcopy(model))
    return Built(name, model, inputs, ours, report, timms)


def test_no_norm_left_where_the_models_own_leaves_none(built: Built):
    ours = count_norm_calls(built.ours, built.inputs)
    theirs = count_norm_calls(built.timms, built.inputs)
    assert ours <= theirs and (theirs > 0 or ours == 0), (ours, theirs)
    assert ours == 0, built.report.table()


def test_no_more_conv_calls_than_the_models_own(built: Built):
    assert count_layer_calls(built.ours, built.inputs) <= count_layer_calls(built.timms, built.inputs)


def test_merges_the_sums_worked_out_by_hand(built: Built):
    report = built.report
    assert len(report.merged) == ENTRIES[built.name], report.table()
    assert all(s.reason == "nonlinear_branch" for s in report.merges_skipped), report.table()
    assert report.norms_found == len({n for m in report.merged for n in m.norms} | {p.norm for p in report.folded})
    assert len(report.removed_identities) == REMOVED[built.name], report.removed_identities
    if built.name == "repvit_m1":
        assert all(name.endswith(".bn") and type(built.model.get_submodule(name[:-3])).__name__ == "ConvNorm"
                   for name in report.removed_identities)


def test_output_within_the_error_model(built: Built):
    verdict = verify(built.model, built.ours, built.inputs)
    assert verdict.ok, str(verdict)
