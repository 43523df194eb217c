"""Conformance vectors and ``python -m refimpl check``: regeneration, and deliberately wrong results."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from refimpl import bn_scale_shift, compare, conformance, error_bound
from refimpl import conv as refimpl_conv
from refimpl.__main__ import main

torch = pytest.importorskip("torch")

LOW_PRECISION = ["conv2d_bn_float16", "linear_bn_bfloat16", "bn_linear_float16", "conv1d_bn_bfloat16"]


@pytest.fixture(scope="module")
def vectors():
    return conformance.load_vectors(conformance.VECTORS_DIR)


@pytest.fixture(scope="module")
def good_results(vectors):
    return conformance.reference_results(vectors)


def run_check(tmp_path, results, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    code = main(["check", str(conformance.VECTORS_DIR), str(path)])
    return code, capsys.readouterr().out


def case_line(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.split(":")[0].split()[-1:] == [name])


class TestVectors:
    def test_regenerated_vectors_match_committed_bytes(self, tmp_path):
        written = conformance.write_vectors(tmp_path)
        committed = sorted(p.name for p in conformance.VECTORS_DIR.glob("*.json"))
        assert sorted(p.name for p in written) == committed
        for path in written:
            assert path.read_bytes() == (conformance.VECTORS_DIR / path.name).read_bytes(), path.name

    def test_cli_writes_the_same_vectors(self, tmp_path, capsys):
        assert main(["vectors", "--out", str(tmp_path)]) == 0
        assert (tmp_path / "manifest.json").read_bytes() == (conformance.VECTORS_DIR / "manifest.json").read_bytes()

    def test_coverage_of_folds_and_verdicts(self, vectors):
        assert {v["fold"] for v in vectors.values()} == {"conv_bn", "linear_bn", "bn_conv", "bn_linear", "merge"}
        assert {v["expected"]["verdict"] for v in vectors.values()} == set(conformance.VERDICTS)
        assert {v["storage_dtype"] for v in vectors.values()} == {"float64", "float32", "float16", "bfloat16"}
        folds = [v for v in vectors.values() if v["fold"] != "merge"]
        assert any(v["layer"].get("transposed") and v["layer"]["groups"] > 1 for v in folds)
        assert {v["layer"].get("padding_mode") for v in folds if v["fold"] == "bn_conv"} >= {
            "zeros", "reflect", "replicate", "circular"}

    def test_coverage_of_merges(self, vectors):
        merges = [v for v in vectors.values() if v["fold"] == "merge"]
        layers = [v["expected"]["layer"] for v in merges if "layer" in v["expected"]]
        ops = [op for v in merges for b in v["inputs"]["branches"] for op in b["ops"]]
        assert {op["op"] for op in ops} == {"layer", "batch_norm", "avg_pool", "scale"}
        assert {v["storage_dtype"] for v in merges} == {"float64", "float32", "float16", "bfloat16"}
        assert {layer["type"] for layer in layers} == {"conv", "linear"}
        assert {layer.get("padding_mode") for layer in layers} >= {"zeros", "reflect"}
        assert any(layer.get("groups", 1) > 1 for layer in layers)
        assert any(max(layer.get("stride", [1])) > 1 for layer in layers)
        assert any(max(layer.get("dilation", [1])) > 1 for layer in layers)
        assert any(b["coefficient"] < 0 for v in merges for b in v["inputs"]["branches"])
        assert any(v["inputs"]["after"] for v in merges) and any(not b["ops"] for v in merges
                                                                  for b in v["inputs"]["branches"])
        assert sum(v["expected"]["verdict"] == "mergeable" for v in merges) == 17 and len(merges) == 25

    def test_float64_values_round_trip_exactly(self, vectors):
        # The JSON holds Python's shortest repr; parsing must give back the generator's float64 bits.
        fresh = conformance.build_case("conv2d_bn")
        stored = vectors["conv2d_bn"]
        assert fresh["expected"]["weight"]["data"] == stored["expected"]["weight"]["data"]
        assert fresh["probe"]["y"]["data"] == stored["probe"]["y"]["data"]

    def test_expected_fold_agrees_with_torch_float64(self, vectors):
        # Independent oracle: torch's own fuse helpers (float64, groups=1 layouts where they are right).
        from torch.nn.utils.fusion import fuse_conv_bn_weights
        v = vectors["conv2d_bn"]
        def t(x):
            return None if x is None else torch.tensor(conformance.decode_tensor(x), dtype=torch.float64)

        bn = v["inputs"]["bn"]
        w, b = fuse_conv_bn_weights(t(v["inputs"]["weight"]), t(v["inputs"]["bias"]), t(bn["running_mean"]),
                                    t(bn["running_var"]), bn["eps"], t(bn["weight"]), t(bn["bias"]))
        tolerance = v["tolerance"]
        for name, actual in (("weight", w), ("bias", b)):
            bound = error_bound(conformance.decode_tensor(tolerance[name]["magnitude"]), tolerance[name]["n"],
                                            "float64")
            assert compare(actual, conformance.decode_tensor(v["expected"][name]), bound).ok, name

    def test_probe_output_agrees_with_torch_float64(self, vectors):
        v = vectors["conv_transpose2d_bn_grouped"]
        layer, bn = v["layer"], v["inputs"]["bn"]
        def t(x):
            return torch.tensor(conformance.decode_tensor(x), dtype=torch.float64)

        y = torch.nn.functional.conv_transpose2d(t(v["probe"]["x"]), t(v["inputs"]["weight"]), t(v["inputs"]["bias"]),
                                                 stride=layer["stride"], padding=layer["padding"],
                                                 output_padding=layer["output_padding"], groups=layer["groups"])
        y = torch.nn.functional.batch_norm(y, t(bn["running_mean"]), t(bn["running_var"]), t(bn["weight"]),
                                           t(bn["bias"]), eps=bn["eps"])
        expected = conformance.decode_tensor(v["probe"]["y"])
        bound = error_bound(conformance.decode_tensor(v["probe"]["magnitude"]), v["probe"]["n"], "float64")
        assert compare(y, expected, bound).ok

    def test_rounding_matches_numpy_float16(self):
        values = np.random.default_rng(0).normal(0, 300, 2000) * np.logspace(-9, 0, 2000)
        ours = conformance.round_to_dtype(values, "float16")
        assert np.array_equal(ours, values.astype(np.float16).astype(np.float64))

    def test_bfloat16_rounding_is_direct_not_via_float32(self):
        # 1 + 2^-8 + 2^-30 rounds up in bfloat16; via float32 it first becomes the tie 1 + 2^-8 and goes to even.
        x = 1.0 + 2.0**-8 + 2.0**-30
        assert conformance.round_to_dtype([x], "bfloat16")[0] == 1.0 + 2.0**-7
        assert torch.tensor([x], dtype=torch.float64).float().bfloat16().double().item() == 1.0

    def test_duplicate_case_name_is_rejected(self):
        def conv2d_bn() -> dict:
            """A second case under an existing name."""
            return {}

        with pytest.raises(ValueError, match="registered twice"):
            conformance.case(conv2d_bn)
        assert conformance.CASES["conv2d_bn"] is not conv2d_bn

    def test_case_without_docstring_is_rejected(self):
        def undocumented_case() -> dict:
            return {}

        with pytest.raises(ValueError, match="no docstring"):
            conformance.case(undocumented_case)
        assert "undocumented_case" not in conformance.CASES

    def test_name_and_description_come_from_the_case_function(self, vectors):
        function = conformance.CASES["bn_linear"]
        assert function.__name__ == "bn_linear" and vectors["bn_linear"]["name"] == "bn_linear"
        assert vectors["bn_linear"]["description"] == " ".join(function.__doc__.split())


class TestCheck:
    def test_refimpl_results_pass(self, tmp_path, good_results, capsys):
        code, out = run_check(tmp_path, good_results, capsys)
        assert code == 0, out
        assert f"{len(good_results['results'])} passed, 0 failed" in out

    def test_results_subcommand_writes_a_passing_file(self, tmp_path, capsys):
        path = tmp_path / "refimpl-results.json"
        assert main(["results", "--out", str(path), "--vectors", str(conformance.VECTORS_DIR)]) == 0
        assert main(["check", str(conformance.VECTORS_DIR), str(path)]) == 0

    def test_weight_a_few_ulp_beyond_the_bound_fails(self, tmp_path, vectors, good_results, capsys):
        results = copy.deepcopy(good_results)
        v = vectors["conv2d_bn_float64"]
        weight = np.array(results["results"]["conv2d_bn_float64"]["weight"])
        bound = error_bound(conformance.decode_tensor(v["tolerance"]["weight"]["magnitude"]),
                                        v["tolerance"]["weight"]["n"], "float64")
        index = (1, 0, 2, 1)
        weight[index] = conformance.decode_tensor(v["expected"]["weight"])[index] + 1.5 * bound[index]
        results["results"]["conv2d_bn_float64"]["weight"] = weight.tolist()
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1
        line = case_line(out, "conv2d_bn_float64")
        assert line.startswith("FAIL") and "weight[1, 0, 2, 1]" in line and "ratio=1.5" in line

    def test_bias_with_wrong_sign_fails(self, tmp_path, good_results, capsys):
        results = copy.deepcopy(good_results)
        entry = results["results"]["linear_bn"]
        entry["bias"] = [-b for b in entry["bias"]]
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1
        line = case_line(out, "linear_bn")
        assert line.startswith("FAIL") and "bias[" in line

    def test_transposed_groups_scaled_in_the_wrong_layout_fails(self, tmp_path, vectors, good_results, capsys):
        # torch.nn.utils.fusion reshapes s to [1, out, 1, 1] for a ConvTranspose weight [in, out/groups, k, k],
        # which cannot broadcast when groups > 1; a fuser that makes it broadcast scales axis 1 by
        # s[:out/groups] in every group, so group 1's output channels get group 0's scale.
        name = "conv_transpose2d_bn_grouped"
        v = vectors[name]
        bn = {key: conformance.decode_tensor(value) if isinstance(value, dict) else value
              for key, value in v["inputs"]["bn"].items()}
        s, _ = bn_scale_shift(bn["running_mean"], bn["running_var"], bn["eps"], bn["weight"], bn["bias"])
        weight = conformance.decode_tensor(v["inputs"]["weight"])
        per_group = weight.shape[1]
        results = copy.deepcopy(good_results)
        results["results"][name]["weight"] = (weight * s[None, :per_group, None, None]).tolist()
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1
        line = case_line(out, name)
        assert line.startswith(f"FAIL  {name}: weight[")
        assert int(line.split("weight[")[1].split(",")[0]) >= weight.shape[0] // 2  # a group-1 input channel

    def test_low_precision_folded_naively_fails(self, tmp_path, vectors, good_results, capsys):
        results = copy.deepcopy(good_results)
        for name in LOW_PRECISION:
            v = vectors[name]
            dtype = getattr(torch, v["storage_dtype"])
            def t(x, dtype=dtype):
                return None if x is None else torch.tensor(conformance.decode_tensor(x), dtype=dtype)

            bn = {key: t(value) if isinstance(value, dict) else value for key, value in v["inputs"]["bn"].items()}
            weight, bias = conformance.fold_pair(v["fold"], v["layer"], t(v["inputs"]["weight"]),
                                             t(v["inputs"]["bias"]), bn)
            def as_json(a):
                return [x if math.isfinite(x) else repr(x) for x in a.double().flatten().tolist()]

            results["results"][name] = {"weight": np.reshape(np.array(as_json(weight), dtype=object),
                                                             tuple(weight.shape)).tolist(),
                                        "bias": as_json(bias)}
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1
        for name in LOW_PRECISION:
            line = case_line(out, name)
            assert line.startswith("FAIL") and "bit for bit" in line, line
        assert f"{len(LOW_PRECISION)} failed" in out

    def test_low_precision_off_by_one_ulp_fails(self, tmp_path, good_results, capsys):
        results = copy.deepcopy(good_results)
        bits = results["results"]["conv2d_bn_float16"]["bias_bits"]
        bits[3] = f"0x{int(bits[3], 16) + 1:04x}"
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1
        assert "bias[3]" in case_line(out, "conv2d_bn_float16") and "1 ulp off" in out

    def test_wrong_verdict_fails(self, tmp_path, good_results, capsys):
        results = copy.deepcopy(good_results)
        results["results"]["bn_conv2d_zero_padding"] = {"verdict": "foldable"}
        results["results"]["conv2d_bn_negative_variance"] = {"verdict": "not_foldable: zero_padding"}
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1
        assert "expected verdict 'not_foldable: zero_padding', got folded weights" in case_line(
            out, "bn_conv2d_zero_padding")
        assert case_line(out, "conv2d_bn_negative_variance").startswith("FAIL")

    def test_refusing_a_foldable_case_fails(self, tmp_path, good_results, capsys):
        results = copy.deepcopy(good_results)
        results["results"]["bn_conv2d_reflect"] = {"verdict": "not_foldable: zero_padding"}
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1 and case_line(out, "bn_conv2d_reflect").startswith("FAIL")

    def test_missing_case_fails(self, tmp_path, good_results, capsys):
        results = copy.deepcopy(good_results)
        del results["results"]["conv3d_bn"]
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1
        assert case_line(out, "conv3d_bn") == "FAIL  conv3d_bn: missing from the results"

    def test_wrong_probe_output_fails(self, tmp_path, good_results, capsys):
        results = copy.deepcopy(good_results)
        output = np.array(results["results"]["conv2d_bn_strided"]["output"])
        output[0, 1, 0, 0] += 1e-3
        results["results"]["conv2d_bn_strided"]["output"] = output.tolist()
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1 and "output[0, 1, 0, 0]" in case_line(out, "conv2d_bn_strided")

    @pytest.mark.parametrize("content", [
        "{not json",
        json.dumps({"results": []}),
        json.dumps({"results": {"conv2d_bn": {"weight": [[1.0, "x"]]}}}),
        json.dumps({"results": {"conv2d_bn": {"weight": [[1.0], [1.0, 2.0]]}}}),
        json.dumps({"format": "something-else", "results": {}}),
    ], ids=["bad-json", "results-not-object", "non-number", "ragged", "wrong-format"])
    def test_malformed_results_exit_2(self, tmp_path, capsys, content):
        path = tmp_path / "results.json"
        path.write_text(content, encoding="utf-8")
        assert main(["check", str(conformance.VECTORS_DIR), str(path)]) == 2
        assert capsys.readouterr().err.startswith("error: ")

    def test_missing_vectors_dir_exits_2(self, tmp_path, capsys):
        path = tmp_path / "results.json"
        path.write_text("{}", encoding="utf-8")
        assert main(["check", str(tmp_path / "nowhere"), str(path)]) == 2
        assert "does not exist" in capsys.readouterr().err

    def test_subprocess_check_fails_and_names_the_case(self, tmp_path, good_results):
        results = copy.deepcopy(good_results)
        del results["results"]["bn_linear"]
        path = tmp_path / "results.json"
        path.write_text(json.dumps(results), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "refimpl", "check", str(conformance.VECTORS_DIR), str(path)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert "FAIL  bn_linear: missing from the results" in done.stdout


class TestMergeCheck:
    """``check`` on merge vectors: refimpl's own results pass (TestCheck); deliberately wrong merges fail."""

    @staticmethod
    def _scale(bn: dict) -> np.ndarray:
        return bn["weight"] / np.sqrt(bn["running_var"] + bn["eps"])

    @staticmethod
    def _shift(bn: dict) -> np.ndarray:
        return bn["bias"] - bn["running_mean"] * TestMergeCheck._scale(bn)

    def test_kernel_not_centred_fails(self, tmp_path, vectors, good_results, capsys):
        # A merge that pads the 1x1 kernel and the identity on the right instead of centring them.
        name = "merge_repvgg_3x3_1x1_identity"
        conv3, conv1, alone = conformance.decode_merge_inputs(vectors[name]["inputs"])["branches"]
        s3, s1, s0 = (self._scale(b["ops"][-1]["bn"]) for b in (conv3, conv1, alone))
        weight = conv3["ops"][0]["weight"] * s3[:, None, None, None]
        weight[:, :, 0, 0] += conv1["ops"][0]["weight"][:, :, 0, 0] * s1[:, None] + np.diag(s0)
        results = copy.deepcopy(good_results)
        results["results"][name]["weight"] = weight.tolist()
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1
        line = case_line(out, name)
        assert line.startswith(f"FAIL  {name}: weight[") and line.split("]")[0].endswith(("0, 0", "1, 1")), line

    def test_bias_missing_a_branch_fails(self, tmp_path, vectors, good_results, capsys):
        # BN(conv3x3 + conv1x1 + x): a merge that forgets the conv1x1's own bias.
        name = "merge_bn_after_sum"
        inputs = conformance.decode_merge_inputs(vectors[name]["inputs"])
        after = inputs["after"][0]["bn"]
        results = copy.deepcopy(good_results)
        bias = np.array(results["results"][name]["bias"]) - self._scale(after) * inputs["branches"][1]["ops"][0]["bias"]
        results["results"][name]["bias"] = bias.tolist()
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1 and case_line(out, name).startswith(f"FAIL  {name}: bias[")

    @pytest.mark.parametrize("name", ["merge_repvgg_float16", "merge_repvgg_bfloat16"])
    def test_double_rounded_low_precision_fails(self, tmp_path, vectors, good_results, capsys, name):
        # Each branch folded in float64 and rounded to the storage dtype, then the branches summed
        # there: two roundings where the vector requires one.
        dtype = getattr(torch, vectors[name]["storage_dtype"])
        conv3, conv1, alone = conformance.decode_merge_inputs(vectors[name]["inputs"])["branches"]
        kernels, biases = [], []
        for branch, size in ((conv3, 3), (conv1, 1), (alone, 1)):
            bn = branch["ops"][-1]["bn"]
            weight = branch["ops"][0]["weight"] if len(branch["ops"]) == 2 else np.eye(4).reshape(4, 4, 1, 1)
            pad = (3 - size) // 2
            kernel = np.pad(weight * self._scale(bn)[:, None, None, None], [(0, 0), (0, 0), (pad, pad), (pad, pad)])
            kernels.append(torch.tensor(kernel).to(dtype))
            biases.append(torch.tensor(self._shift(bn)).to(dtype))
        weight, bias = kernels[0] + kernels[1] + kernels[2], biases[0] + biases[1] + biases[2]
        results = copy.deepcopy(good_results)
        results["results"][name] = {"weight": weight.double().tolist(), "bias": bias.double().tolist(),
                                    "layer": results["results"][name]["layer"]}
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1
        line = case_line(out, name)
        assert line.startswith("FAIL") and "bit for bit" in line, line

    def test_wrong_merge_verdicts_fail(self, tmp_path, good_results, capsys):
        results = copy.deepcopy(good_results)
        entries = results["results"]
        entries["merge_even_kernel"] = {"weight": np.ones((2, 2, 2, 2)).tolist(), "bias": [0.0, 0.0]}
        entries["compose_zero_padding"] = {"verdict": "not_mergeable: padding_misaligned"}
        entries["merge_reflect_with_unpadded"] = {"verdict": "not_mergeable: padding_mode_mismatch"}
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1
        assert case_line(out, "merge_even_kernel").endswith(
            "expected verdict 'not_mergeable: padding_misaligned', got merged weights")
        assert case_line(out, "compose_zero_padding").endswith(
            "expected verdict 'not_mergeable: zero_padding', got verdict 'not_mergeable: padding_misaligned'")
        assert case_line(out, "merge_reflect_with_unpadded").endswith(
            "mergeable, but the results give verdict 'not_mergeable: padding_mode_mismatch'")

    def test_wrong_or_missing_geometry_fails(self, tmp_path, good_results, capsys):
        results = copy.deepcopy(good_results)
        entries = results["results"]
        entries["merge_reflect_with_unpadded"]["layer"]["padding_mode"] = "zeros"
        entries["merge_repvgg_stride2_no_identity"]["layer"]["padding"] = [0, 0]
        del entries["merge_acnet_1x3_3x1"]["layer"]
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1
        assert "layer: padding_mode 'zeros', expected 'reflect'" in case_line(out, "merge_reflect_with_unpadded")
        assert "layer: padding [0, 0], expected [1, 1]" in case_line(out, "merge_repvgg_stride2_no_identity")
        assert "layer: missing" in case_line(out, "merge_acnet_1x3_3x1")
        assert "3 failed" in out

    def test_output_padded_with_zeros_instead_of_reflect_fails(self, tmp_path, vectors, good_results, capsys):
        name = "merge_reflect_with_unpadded"
        entry = good_results["results"][name]
        x = conformance.decode_tensor(vectors[name]["probe"]["x"])
        results = copy.deepcopy(good_results)
        results["results"][name]["output"] = refimpl_conv(x, np.array(entry["weight"]), np.array(entry["bias"]),
                                                          padding=1).tolist()
        code, out = run_check(tmp_path, results, capsys)
        assert code == 1 and case_line(out, name).startswith(f"FAIL  {name}: output[")


class TestOutputs:
    def test_results_into_a_missing_folder_exits_2_before_the_work(self, tmp_path, capsys, monkeypatch):
        monkeypatch.setattr(conformance, "build_all", lambda: pytest.fail("built the cases before checking --out"))
        assert main(["results", "--out", str(tmp_path / "missing" / "results.json")]) == 2
        assert capsys.readouterr().err == f"error: --out {str(tmp_path / 'missing' / 'results.json')!r}: the " \
                                          f"folder {str(tmp_path / 'missing')!r} does not exist\n"
        assert main(["results", "--out", str(tmp_path)]) == 2
        assert "is a folder" in capsys.readouterr().err

    def test_vectors_into_a_file_exits_2(self, tmp_path, capsys):
        occupied = tmp_path / "occupied"
        occupied.write_text("", encoding="utf-8")
        assert main(["vectors", "--out", str(occupied)]) == 2
        assert capsys.readouterr().err.startswith(f"error: --out {str(occupied)!r}: cannot write the vectors there")

    def test_check_defaults_to_the_committed_vectors(self, tmp_path, good_results, capsys):
        path = tmp_path / "results.json"
        path.write_text(json.dumps(good_results), encoding="utf-8")
        assert main(["check", str(path)]) == 0
        assert f"in {conformance.VECTORS_DIR}" in capsys.readouterr().out


class TestSelfCheckAndHelp:
    def test_self_check_passes(self, capsys):
        assert main([]) == 0
        out = capsys.readouterr().out
        assert "self-check passed" in out and "match a fresh regeneration byte for byte" in out
        assert out.count("ok   fold ") == 5

    def test_help_lists_every_subcommand(self, capsys):
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for command in ("vectors", "check", "results"):
            assert command in out
