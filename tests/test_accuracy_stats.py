"""The statistics of benchmarks/accuracy.py: per-batch errors, percentiles and ratios over seeds x batches.

Every expected value below is worked out by hand in the comment next to it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from benchmarks.accuracy import _batch_errors, input_batches, percentile, ratio_statistics


class TestPercentile:
    def test_linear_interpolation_between_closest_ranks(self):
        values = [7.0, 1.0, 3.0, 10.0, 2.0, 5.0, 4.0, 9.0, 6.0, 8.0]  # 1..10, shuffled
        # Sorted ranks 0..9. Median: rank 4.5, halfway between 5 and 6.
        assert percentile(values, 50) == 5.5
        # 90th: rank 9 * 0.9 = 8.1, 0.1 of the way from 9 to 10.
        assert percentile(values, 90) == pytest.approx(9.1, abs=1e-15)
        assert percentile(values, 0) == 1.0 and percentile(values, 100) == 10.0
        assert percentile([3.0], 90) == 3.0

    def test_nan_counts_as_worst(self):
        # Sorted as [1, 2, inf]: the median is 2; the 90th (rank 1.8) lies between 2 and inf.
        assert percentile([1.0, math.nan, 2.0], 50) == 2.0
        assert percentile([1.0, math.nan, 2.0], 90) == math.inf

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="no values"):
            percentile([], 50)
        with pytest.raises(ValueError, match=r"within \[0, 100\]"):
            percentile([1.0], 101)


class TestRatioStatistics:
    def test_two_seeds_two_batches(self):
        fused = [[1.0, 2.0], [3.0, 4.0]]
        unfused = [[1.0, 1.0], [1.0, 2.0]]
        stats = ratio_statistics(fused, unfused, seeds=[5, 6])
        # Ratios [[1, 2], [3, 2]], sorted [1, 2, 2, 3]: median (rank 1.5) 2; 90th (rank 2.7) 2 + 0.7 * 1.
        assert stats["ratios"] == [[1.0, 2.0], [3.0, 2.0]]
        assert stats["median"] == 2.0
        assert stats["p90"] == pytest.approx(2.7, abs=1e-15)
        assert stats["worst"] == {"ratio": 3.0, "seed": 6, "batch": 0}
        assert stats["n"] == 4

    def test_three_seeds_eight_batches(self):
        # Ratios 0.1, 0.2, ..., 2.4 (seed i, batch j -> (8 i + j + 1) / 10), each fused error over an
        # unfused error of 0.5. Median: rank 11.5 -> between 1.2 and 1.3 = 1.25. 90th: rank 23 * 0.9 = 20.7
        # -> 2.1 + 0.7 * 0.1 = 2.17. Worst: 2.4 at the last seed's last batch.
        fused = [[(8 * i + j + 1) / 20 for j in range(8)] for i in range(3)]
        unfused = [[0.5] * 8 for _ in range(3)]
        stats = ratio_statistics(fused, unfused, seeds=[0, 1, 2])
        assert stats["median"] == pytest.approx(1.25, rel=1e-14)
        assert stats["p90"] == pytest.approx(2.17, rel=1e-14)
        assert stats["worst"]["seed"] == 2 and stats["worst"]["batch"] == 7
        assert stats["worst"]["ratio"] == pytest.approx(2.4, rel=1e-15)

    def test_zero_and_nan_errors(self):
        # 0/0 is a perfect batch (ratio 1); x/0 and a NaN error are infinitely bad.
        stats = ratio_statistics([[0.0, 1.0, math.nan]], [[0.0, 0.0, 1.0]], seeds=[0])
        assert stats["ratios"][0][0] == 1.0 and stats["ratios"][0][1] == math.inf
        assert stats["median"] == math.inf and stats["worst"]["batch"] in (1, 2)

    def test_shapes_must_match(self):
        with pytest.raises(ValueError, match="2 fused batch errors against 3"):
            ratio_statistics([[1.0, 1.0]], [[1.0, 1.0, 1.0]], seeds=[0])
        with pytest.raises(ValueError, match="seeds"):
            ratio_statistics([[1.0]], [[1.0]], seeds=[0, 1])


def test_batch_errors_split_by_batch():
    reference = torch.tensor([[3.0, 4.0], [0.0, 5.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    out = reference.clone()
    out[0, 0] += 1.0  # batch 0: ||diff|| = 1 over ||ref|| = sqrt(9 + 16 + 25) = sqrt(50)
    out[3, 1] *= 1.5  # batch 1: ||diff|| = 1 over ||ref|| = sqrt(1 + 4) = sqrt(5)
    rms, worst = _batch_errors(out.float(), reference, batch=2)
    assert rms == pytest.approx([1 / math.sqrt(50), 1 / math.sqrt(5)], rel=1e-12)
    # Relative max error: max |diff| / max |ref| per batch: 1 / 5 and 1 / 2.
    assert worst == pytest.approx([0.2, 0.5], rel=1e-12)


def test_input_batches_are_independent_of_how_many_are_drawn():
    entry = SimpleNamespace(input_shape=(3, 8, 8))
    two = input_batches(entry, batches=2, batch=4, size=None, seed=1)
    three = input_batches(entry, batches=3, batch=4, size=None, seed=1)
    assert two.shape == (8, 3, 8, 8) and three.shape == (12, 3, 8, 8)
    assert torch.equal(two, three[:8])
    assert not torch.equal(three[:4], three[4:8])  # batches differ
    assert not torch.equal(two, input_batches(entry, batches=2, batch=4, size=None, seed=2))  # seeds differ
    assert input_batches(entry, batches=1, batch=2, size=16, seed=0).shape == (2, 3, 16, 16)
