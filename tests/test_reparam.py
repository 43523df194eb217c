"""Branch merging in the torch adapter: ``adapters.torch.reparameterize`` on the named merge cases and more.

Oracles: the hand-worked counts of each case (``adapters/torch/suite/merge_cases.py``); the float64 run of
the original model and the project's error model for whole networks (``refimpl.compare_models``); for each
merged layer, the sum it replaces computed from the *original* branches with the float64 reference ops
(``refimpl.conv``, ``batch_norm``, ``linear``; torch's float64 pooling) and compared per element with
``refimpl.error_bound``; numpy's single float64 -> float16 rounding for the rounding policy.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import fx, nn  # noqa: E402

from adapters.report import REASONS, MergedBranches, SkippedMerge  # noqa: E402
from adapters.torch import reparameterize  # noqa: E402
from adapters.torch.__main__ import main  # noqa: E402
from adapters.torch.suite.cases import count_norm_calls, norm_module_names  # noqa: E402
from adapters.torch.suite.merge_cases import (  # noqa: E402
    MERGE_CASES,
    ConvBN,
    Reference,
    RepConv,
    count_layer_calls,
)
from refimpl import bn_scale_shift, compare, compare_models, error_bound  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MERGED = [c for c in MERGE_CASES.values() if c.reference is not None]


def _reference_run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# The named cases: hand-worked counts, the error model, the original untouched

@pytest.mark.parametrize("case", MERGE_CASES.values(), ids=lambda c: c.name)
def test_case(case):
    model = case.build()
    x = case.make_input()
    before = _state(model)
    merged, report = reparameterize(model, example_inputs=(x,))
    assert len(report.merged) == case.merges, report
    assert count_layer_calls(merged, x) == case.convs, report
    assert count_norm_calls(merged, x) == case.norms, report
    assert tuple(sorted(s.reason for s in report.merges_skipped)) == case.left, report
    assert all(s.reason in REASONS for s in report.merges_skipped)
    # The model keeps its class; each block named in the report became a GraphModule of its rewritten forward,
    # or, when that forward is the merged layer alone, the merged layer itself; nothing else changed class.
    assert type(merged) is type(model) and not isinstance(merged, fx.GraphModule)
    rewritten = {name for name, m in merged.named_modules() if isinstance(m, fx.GraphModule)}
    assert rewritten == {m.block for m in report.merged if m.layer != m.block}
    for record in report.merged:
        assert isinstance(merged.get_submodule(record.layer), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
        assert record.layer == record.block or record.layer.startswith(record.block + ".reparam_")
    originals = {name: type(m) for name, m in model.named_modules()}
    norms = set(norm_module_names(model))  # folded norms become nn.Identity, as with fuse
    assert all(type(m) is originals[name] for name, m in merged.named_modules()
               if name in originals and name not in norms and name not in {r.block for r in report.merged}
               and not any(name.startswith(b + ".") for b in rewritten))
    # Norm accounting: every norm of the original is folded, merged away or reported left.
    folded = {p.norm for p in report.folded} | {n for m in report.merged for n in m.norms}
    assert report.norms_found == len(norm_module_names(model))
    assert len(folded) + len(report.skipped) == report.norms_found
    with torch.no_grad():
        verdict = compare_models(merged(x), model(x), _reference_run(model, x), "float32")
    assert verdict.ok, verdict
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", MERGED, ids=lambda c: c.name)
def test_merged_layer_against_the_float64_reference_of_the_original_branches(case):
    """The merged layer alone, on the block's input, per element against the sum of the original branches."""
    model = case.build()
    x = case.make_input()
    merged, report = reparameterize(model, example_inputs=(x,))
    [record] = report.merged
    layer = merged.get_submodule(record.layer)
    block = model.get_submodule(case.block)
    expected = case.reference(Reference, block, Reference.input(x))
    with torch.no_grad():
        got = layer(x).double().numpy()
    reduction = layer.weight[0].numel() + 8  # the merged conv's reduction, then the sum's adds and the norms
    result = compare(got, expected.value, error_bound(expected.magnitude, reduction, "float32"))
    assert result.ok, result.describe(f"{case.name}: {record.layer}")


def test_merged_kernel_is_the_branches_kernels_summed():
    """RepVGG by hand, in numpy: s3*W3 + pad(s1*W1) + pad(diag(s_id)) and the biases."""
    case = MERGE_CASES["repvgg_block"]
    model = case.build()
    merged, report = reparameterize(model)
    block = model.block
    layer = merged.get_submodule(report.merged[0].layer)

    def folded(conv_bn):
        bn = conv_bn.bn if isinstance(conv_bn, ConvBN) else conv_bn
        s, t = bn_scale_shift(*(v.detach().double().numpy() for v in (bn.running_mean, bn.running_var)), bn.eps,
                              bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy())
        return s, t

    s3, t3 = folded(block.kxk)
    s1, t1 = folded(block.k1)
    si, ti = folded(block.identity)
    weight = block.kxk.conv.weight.detach().double().numpy() * s3[:, None, None, None]
    weight[:, :, 1, 1] += block.k1.conv.weight.detach().double().numpy()[:, :, 0, 0] * s1[:, None]
    weight[np.arange(4), np.arange(4), 1, 1] += si
    assert np.array_equal(layer.weight.detach().numpy(), weight.astype(np.float32))
    assert np.array_equal(layer.bias.detach().numpy(), (t3 + t1 + ti).astype(np.float32))
    assert layer.padding == (1, 1) and layer.groups == 1 and layer.kernel_size == (3, 3)


# --------------------------------------------------------------------------------------------
# Numbers: float64, one rounding; fp16/bf16; devices

def test_float16_merge_is_correctly_rounded():
    """The merged fp16 weights are the float64 merge rounded once (numpy's float64 -> float16 cast is one
    rounding); merging in fp16, as a model's own re-parameterisation does, is not."""
    model = nn.Sequential(RepConv(8, 8)).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(8, generator=gen))
                m.running_var.copy_(torch.rand(8, generator=gen) * 3 + 0.05)
                m.weight.copy_(torch.randn(8, generator=gen))
                m.bias.copy_(torch.randn(8, generator=gen))
    half = copy.deepcopy(model).half()
    merged, report = reparameterize(half)
    layer = merged.get_submodule(report.merged[0].layer)

    def exact(conv_bn_or_bn, kernel):
        bn = conv_bn_or_bn.bn if isinstance(conv_bn_or_bn, ConvBN) else conv_bn_or_bn
        s, t = bn_scale_shift(*(p.detach().double().numpy() for p in (bn.running_mean, bn.running_var)), bn.eps,
                              bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy())
        return kernel * s[:, None, None, None], t

    block = half[0]
    w3, t3 = exact(block.conv1, block.conv1.conv.weight.detach().double().numpy())
    w1, t1 = exact(block.conv2, block.conv2.conv.weight.detach().double().numpy())
    wi, ti = exact(block.bn, np.eye(8)[:, :, None, None])
    w3[:, :, 1:2, 1:2] += w1 + wi
    expected_w, expected_b = w3.astype(np.float16), (t3 + t1 + ti).astype(np.float16)
    assert layer.weight.dtype == torch.float16
    assert np.array_equal(layer.weight.detach().numpy(), expected_w)
    assert np.array_equal(layer.bias.detach().numpy(), expected_b)
    # The same merge in fp16 arithmetic (fold each branch in fp16, add in fp16) is off somewhere.
    naive = (torch.from_numpy(w3 - np.pad(w1 + wi, ((0, 0), (0, 0), (1, 1), (1, 1)))).half()
             + torch.from_numpy(np.pad(w1, ((0, 0), (0, 0), (1, 1), (1, 1)))).half()
             + torch.from_numpy(np.pad(wi, ((0, 0), (0, 0), (1, 1), (1, 1)))).half())
    assert not np.array_equal(naive.numpy(), expected_w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models(dtype):
    case = MERGE_CASES["mobileone_k_branches"]
    model = case.build()
    x = case.make_input()
    low = copy.deepcopy(model).to(dtype)
    merged, report = reparameterize(low, example_inputs=(x.to(dtype),))
    assert len(report.merged) == 1
    layer = merged.get_submodule(report.merged[0].layer)
    assert layer.weight.dtype == dtype and layer.bias.dtype == dtype
    with torch.no_grad():
        verdict = compare_models(merged(x.to(dtype)).double(), low(x.to(dtype)).double(), _reference_run(model, x),
                                 str(dtype).removeprefix("torch."))
    assert verdict.ok, verdict


def test_channels_last_and_requires_grad_are_kept():
    case = MERGE_CASES["repvgg_block"]
    model = case.build().to(memory_format=torch.channels_last)
    merged, report = reparameterize(model)
    layer = merged.get_submodule(report.merged[0].layer)
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    assert layer.weight.requires_grad and layer.bias.requires_grad


@pytest.mark.cuda
def test_cuda_model_stays_on_its_device():
    case = MERGE_CASES["bn_after_sum"]
    model = case.build().cuda()
    x = case.make_input(device="cuda")
    merged, report = reparameterize(model, example_inputs=(x,))
    layer = merged.get_submodule(report.merged[0].layer)
    assert layer.weight.device.type == "cuda"
    with torch.no_grad():
        verdict = compare_models(merged(x).cpu().double(), model(x).cpu().double(),
                                 _reference_run(model.cpu(), x.cpu()), "tf32")
    assert verdict.ok, verdict


# --------------------------------------------------------------------------------------------
# The model after the rewrite

def test_inplace_keeps_the_object_names_and_state_dict_keys():
    case = MERGE_CASES["repvgg_block"]
    model = case.build()
    x = case.make_input()
    reference = _reference_run(model, x)
    with torch.no_grad():
        unfused = model(x)
    head_keys = {k for k in model.state_dict() if k.startswith("head.")}
    same, report = reparameterize(model, inplace=True)
    assert same is model
    assert {"block.reparam_conv.weight", "block.reparam_conv.bias"} <= set(model.state_dict())
    assert head_keys <= set(model.state_dict())
    assert not any(k.startswith(("block.kxk", "block.k1", "block.identity")) for k in model.state_dict())
    assert report.merged[0].block_class == "_Block" and type(model.block).__name__ == "_BlockReparameterized"
    with torch.no_grad():
        assert compare_models(model(x), unfused, reference, "float32").ok


def test_training_flags_hooks_pickling_and_a_second_pass():
    case = MERGE_CASES["bn_after_sum"]
    model = case.build()
    x = case.make_input()
    model.train()
    calls = []
    model.block.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    merged, report = reparameterize(model, example_inputs=(x,))
    assert report.training_mode
    assert report.merged[0].layer == "block"  # bn(sum) alone: the merged conv replaces the block itself
    assert merged.training and merged.block.training and isinstance(merged.block, nn.Conv2d)
    merged.eval()
    calls.clear()
    with torch.no_grad():
        out = merged(x)
    assert calls == [torch.Size([2, 4, 8, 8])]  # the block's hook survived the rewrite
    merged.block._forward_hooks.clear()           # (a local lambda: not picklable)
    buffer = io.BytesIO()
    torch.save(merged, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    again, second = reparameterize(copy.deepcopy(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(x), out) and torch.equal(again(x), out)
    assert second.merged == [] and second.folded == []


def test_transactional_when_a_norm_is_invalid():
    for where in ("block.identity", "head_bn"):
        case = MERGE_CASES["repvgg_block"]
        model = nn.Sequential()
        inner = case.build()
        model.add_module("net", inner)
        model.add_module("head_bn", nn.BatchNorm2d(3))
        model.eval()
        bad = model.get_submodule("net.block.identity" if where == "block.identity" else "head_bn")
        with torch.no_grad():
            bad.running_var[0] = -1.0
        before = _state(model)
        modules = dict(model.named_modules())
        with pytest.raises(ValueError, match="running variance -1"):
            reparameterize(model, inplace=True)
        assert dict(model.named_modules()).keys() == modules.keys()
        assert all(modules[name] is m for name, m in model.named_modules())
        after = _state(model)
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_input_raises_one_clear_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        reparameterize("not a model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; users still have them
        scripted = torch.jit.script(nn.Sequential(nn.Conv2d(2, 2, 1)))
    with pytest.raises(TypeError, match="TorchScript"):
        reparameterize(scripted)


def test_rank_of_batchnorm1d_among_linear_branches_needs_proof():
    case = MERGE_CASES["linear_bn_heads_averaged"]
    merged, report = reparameterize(case.build())
    assert [s.reason for s in report.merges_skipped] == ["rank_unknown"] and report.merged == []


class _Hidden(nn.Module):
    """A block whose conv is also called from code torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.block = MERGE_CASES["identity_plain_x"].build().block
        self.gate = _Untraceable(self.block.conv)

    def forward(self, x):
        return self.gate(self.block(x))


class _Untraceable(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: not traceable
            return x
        return self.conv(x)


def test_calls_hidden_from_the_tracer_block_the_merge():
    model = _Hidden().eval()
    x = torch.randn(2, 4, 8, 8)
    merged, report = reparameterize(model, example_inputs=(x,))
    assert report.merged == []
    assert [s.reason for s in report.merges_skipped] == ["untraceable"]
    with torch.no_grad():
        assert torch.equal(merged(x), model(x))


# --------------------------------------------------------------------------------------------
# The report and the command line

class _MaskedSum(nn.Module):
    """A block whose forward has optional arguments (a mask, a scale), as attention and residual blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.kxk, self.k1, self.identity = ConvBN(4, 4, 3, padding=1), ConvBN(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x, scale: float = 1.0, mask=None):
        y = self.kxk(x) + self.k1(x) + self.identity(x)
        if mask is not None:
            y = y * mask
        return y * scale


class _CallsMaskedSum(nn.Module):
    def __init__(self, scales: tuple[float, ...]) -> None:
        super().__init__()
        self.block, self.head, self.scales = _MaskedSum(), nn.Conv2d(4, 3, 1), scales

    def forward(self, x):
        for scale in self.scales:
            x = torch.relu(self.block(x=x, scale=scale))
        return self.head(x)


def _randomized(model: nn.Module) -> nn.Module:
    from adapters.torch.suite.cases import randomize_norm_stats, randomize_parameters
    generator = torch.Generator().manual_seed(0)
    randomize_parameters(model, generator)
    randomize_norm_stats(model, generator)
    return model.eval()


def test_a_block_is_rewritten_for_the_arguments_its_callers_pass():
    """The block is called as block(x=x, scale=0.5) with mask left at None. Traced on its own with mask as a
    proxy, its rewrite would multiply by mask (None at run time: a crash). Traced with what the caller fixes,
    it merges its three branches into one 3x3 conv (+ the head: 2 convs, no norm) and still takes x and scale
    by keyword, asserting at run time that they keep the traced values."""
    model = _randomized(_CallsMaskedSum((0.5,)))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    merged, report = reparameterize(model, example_inputs=(x,))
    assert len(report.merged) == 1 and not report.merges_skipped, report
    assert (count_layer_calls(merged, x), count_norm_calls(merged, x)) == (2, 0)
    assert compare_models(merged(x), model(x), _reference_run(model, x), "float32").ok
    with pytest.raises(Exception, match="specialized"):
        merged.block(x, scale=2.0)


def test_a_block_called_with_different_fixed_arguments_is_left():
    """The same block called with scale 0.5, then 2.0: no one traced graph runs both calls. Its sum is left as
    untraceable at both calls; the conv BNs still fold (2 convs per call + the head: 5 conv calls; the identity BN
    has no conv: 2 norm calls)."""
    model = _randomized(_CallsMaskedSum((0.5, 2.0)))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    merged, report = reparameterize(model, example_inputs=(x,))
    assert not report.merged
    assert [s.reason for s in report.merges_skipped] == ["untraceable"] * 2, report
    assert all("'scale' (0.5, 2.0)" in s.detail for s in report.merges_skipped)
    assert (count_layer_calls(merged, x), count_norm_calls(merged, x)) == (5, 2)
    assert compare_models(merged(x), model(x), _reference_run(model, x), "float32").ok


class _DataDependentCaller(nn.Module):
    """A model torch.fx cannot trace (control flow on a value) calling a block with an optional argument left out."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = _MaskedSum(), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.head(torch.relu(self.block(x)))


def test_a_block_whose_callers_cannot_be_traced_is_rewritten_for_the_calls_seen_on_example_inputs():
    """The block is traced as a region of its own (its caller cannot be traced), so the trace says nothing about
    scale and mask. With example_inputs the run shows block(x): scale 1.0 and mask None by default; the three
    branches merge (one 3x3 conv + the head, no norm). Without them the values are unknown: the sum is left
    (untraceable, asking for example_inputs) and the model still runs as before."""
    model = _randomized(_DataDependentCaller())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    merged, report = reparameterize(model, example_inputs=(x,))
    assert len(report.merged) == 1 and not report.merges_skipped, report
    assert (count_layer_calls(merged, x), count_norm_calls(merged, x)) == (2, 0)
    assert compare_models(merged(x), model(x), _reference_run(model, x), "float32").ok

    merged, report = reparameterize(model)
    assert not report.merged
    assert [s.reason for s in report.merges_skipped] == ["untraceable"], report
    assert "example_inputs" in report.merges_skipped[0].detail and "mask" in report.merges_skipped[0].detail
    assert compare_models(merged(x), model(x), _reference_run(model, x), "float32").ok


def test_report_covers_merges():
    case = MERGE_CASES["bn_after_sum"]
    _, report = reparameterize(case.build(), example_inputs=(case.make_input(),))
    [record] = report.merged
    assert record == MergedBranches(block="block", node="add_1", branches=("conv.bn(conv.conv(x))", "conv1(x)", "x"),
                                    layer="block", kernel_size=(3, 3), norms=record.norms,
                                    block_class="_Block", then=("bn",))
    assert sorted(record.norms) == ["block.bn", "block.conv.bn"]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["merged"][0]["layer"] == "block" and data["merges_skipped"] == []
    assert "conv.bn(conv.conv(x)) + conv1(x) + x, then bn" in report.table()
    assert "1 merge(s)" in report.summary() and "2 of 2 norm layer(s) folded or merged" in report.summary()
    _, left = reparameterize(MERGE_CASES["trap_groups_incompatible"].build())
    assert "groups_incompatible" in left.table() and "1 sum(s) of branches left" in left.summary()
    with pytest.raises(ValueError, match="SkippedMerge.reason must be one of"):
        SkippedMerge("b", "add", "no_such_reason", "")


def example_net() -> nn.Module:
    """A factory for --model: YOLO's RepConv on 4 channels, then a 1x1 conv."""
    return nn.Sequential(RepConv(4, 4), nn.Conv2d(4, 2, 1))


def test_command_line(capsys):
    code = main(["--reparameterize", "--model", "test_reparam:example_net", "--input-shape", "1,4,8,8",
                 "--random-stats", "--repeats", "1", "--json", "-q"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["ok"]
    [row] = data["models"]
    assert (row["norms_found"], row["folded"], row["left"]) == (3, 3, 0)
    assert [m["block"] for m in row["report"]["merged"]] == ["0"]
    code = main(["--model", "test_reparam:example_net", "--input-shape", "1,4,8,8", "--repeats", "1", "--json",
                 "-q"])
    plain = json.loads(capsys.readouterr().out)["models"][0]
    assert plain["report"]["merged"] == [] and plain["left"] == 1   # fuse alone leaves the identity BN


def test_merge_reasons_are_one_contiguous_block():
    codes = list(REASONS)
    merge_codes = ["different_inputs", "nonlinear_branch", "branch_output_used_elsewhere", "stride_mismatch",
                   "dilation_mismatch", "padding_misaligned", "padding_mode_mismatch", "groups_incompatible",
                   "channels_mismatch", "sequential_unsupported", "constant_not_per_channel", "sum_in_model_forward"]
    start = codes.index(merge_codes[0])
    assert codes[start:start + len(merge_codes)] == merge_codes
    assert Counter(codes)["zero_padding"] == 1
