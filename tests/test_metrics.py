"""Metrics checked against hand-computed values."""

import json
import math

import numpy as np
import pytest

from recsys_core.eval.metrics import (
    bootstrap_ci,
    per_user_metrics,
    ratio_ci,
    summarize,
    target_ranks,
)

# 4 users, top-3 lists, ks=(1, 3):
#   u0: target 4 at rank 0      -> recall@1=1, recall@3=1, ndcg=1,            mrr=1
#   u1: target 3 at rank 2 (last) -> recall@1=0, recall@3=1, ndcg@3=1/log2(4)=0.5, mrr=1/3
#   u2: target 8 absent         -> all 0
#   u3: target 8 at rank 1      -> recall@1=0, recall@3=1, ndcg@3=1/log2(3), mrr=1/2
RANKED = np.array([[4, 2, 9], [1, 2, 3], [0, 5, 6], [7, 8, 1]])
TARGET = np.array([4, 3, 8, 8])
NDCG3 = np.array([1.0, 0.5, 0.0, 1.0 / math.log2(3)])


@pytest.mark.unit
def test_target_ranks_hand_values():
    np.testing.assert_array_equal(target_ranks(RANKED, TARGET), [0, 2, -1, 1])


@pytest.mark.unit
def test_target_ranks_empty_and_first_duplicate():
    assert target_ranks(np.zeros((0, 5), dtype=int), np.zeros(0, dtype=int)).shape == (0,)
    np.testing.assert_array_equal(target_ranks(np.zeros((2, 0), dtype=int), np.array([1, 2])), [-1, -1])
    # Duplicate item in a list: the first occurrence counts.
    np.testing.assert_array_equal(target_ranks(np.array([[5, 7, 7]]), np.array([7])), [1])


@pytest.mark.unit
def test_target_ranks_shape_mismatch_raises():
    with pytest.raises(ValueError):
        target_ranks(RANKED, np.array([1, 2]))


@pytest.mark.unit
def test_per_user_metrics_hand_values():
    m = per_user_metrics(RANKED, TARGET, ks=(1, 3))
    assert list(m) == ["recall@1", "ndcg@1", "recall@3", "ndcg@3", "mrr@3"]
    np.testing.assert_allclose(m["recall@1"], [1, 0, 0, 0])
    np.testing.assert_allclose(m["ndcg@1"], [1, 0, 0, 0])
    np.testing.assert_allclose(m["recall@3"], [1, 1, 0, 1])
    np.testing.assert_allclose(m["ndcg@3"], NDCG3)
    np.testing.assert_allclose(m["mrr@3"], [1.0, 1.0 / 3.0, 0.0, 0.5])


@pytest.mark.unit
def test_per_user_metrics_ignores_hits_beyond_max_k():
    # 5 columns but ks max is 3: a target at rank 4 is a miss everywhere (mrr included).
    m = per_user_metrics(np.array([[0, 1, 2, 3, 4]]), np.array([4]), ks=(1, 3))
    for vals in m.values():
        np.testing.assert_allclose(vals, [0.0])


@pytest.mark.unit
def test_per_user_metrics_default_ks():
    ranked = np.tile(np.arange(50), (3, 1))  # (3, 50), item i at rank i
    m = per_user_metrics(ranked, np.array([9, 10, 49]))  # ks=(10, 50)
    np.testing.assert_allclose(m["recall@10"], [1, 0, 0])
    np.testing.assert_allclose(m["recall@50"], [1, 1, 1])
    np.testing.assert_allclose(m["ndcg@10"], [1 / math.log2(11), 0, 0])
    np.testing.assert_allclose(m["ndcg@50"], [1 / math.log2(11), 1 / math.log2(12), 1 / math.log2(51)])
    np.testing.assert_allclose(m["mrr@50"], [1 / 10, 1 / 11, 1 / 50])


@pytest.mark.unit
def test_per_user_metrics_too_few_columns_raises():
    with pytest.raises(ValueError, match="columns"):
        per_user_metrics(RANKED, TARGET)  # 3 columns < 50
    with pytest.raises(ValueError):
        per_user_metrics(RANKED, TARGET, ks=(0, 3))


@pytest.mark.unit
def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci(np.full(7, 0.25)) == (0.25, 0.25)
    assert bootstrap_ci(np.array([0.8])) == (0.8, 0.8)
    assert bootstrap_ci(np.zeros(0)) == (0.0, 0.0)


@pytest.mark.unit
def test_bootstrap_ci_two_points():
    # Means of 2 draws from {0, 1}: 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4.
    # alpha=0.05 -> 2.5%/97.5% quantiles are 0 and 1; alpha=0.6 -> 30%/70% both 0.5.
    v = np.array([0.0, 1.0])
    assert bootstrap_ci(v, n_boot=10_000, alpha=0.05) == (0.0, 1.0)
    assert bootstrap_ci(v, n_boot=10_000, alpha=0.6) == (0.5, 0.5)


@pytest.mark.unit
def test_bootstrap_ci_deterministic_and_brackets_mean():
    v = np.arange(20, dtype=float) / 20.0  # mean 0.475
    lo, hi = bootstrap_ci(v, n_boot=500, seed=3)
    assert (lo, hi) == bootstrap_ci(v, n_boot=500, seed=3)
    assert 0.0 <= lo < 0.475 < hi <= 1.0
    with pytest.raises(ValueError):
        bootstrap_ci(v, alpha=1.0)


@pytest.mark.unit
def test_summarize_hand_means():
    s = summarize(RANKED, TARGET, ks=(1, 3), n_boot=200)
    assert s["n_users"] == 4
    assert s["recall@1"] == pytest.approx(0.25)
    assert s["ndcg@1"] == pytest.approx(0.25)
    assert s["recall@3"] == pytest.approx(0.75)
    assert s["ndcg@3"] == pytest.approx((1.0 + 0.5 + 1.0 / math.log2(3)) / 4)
    assert s["mrr@3"] == pytest.approx((1.0 + 1.0 / 3.0 + 0.5) / 4)
    for name in ("recall@1", "ndcg@1", "recall@3", "ndcg@3", "mrr@3"):
        assert s[f"{name}_ci_low"] <= s[name] <= s[f"{name}_ci_high"]
    assert all(type(v) in (float, int) for v in s.values())
    json.dumps(s)


@pytest.mark.unit
def test_summarize_pads_missing_users_as_misses():
    s = summarize(RANKED, TARGET, ks=(1, 3), n_users_total=8, n_boot=200)
    assert s["n_users"] == 8
    assert s["recall@3"] == pytest.approx(3 / 8)
    assert s["mrr@3"] == pytest.approx((1.0 + 1.0 / 3.0 + 0.5) / 8)
    with pytest.raises(ValueError):
        summarize(RANKED, TARGET, ks=(1, 3), n_users_total=3)


@pytest.mark.unit
def test_summarize_no_users():
    s = summarize(np.zeros((0, 0), dtype=int), np.zeros(0, dtype=int), ks=(1, 3))
    assert s["n_users"] == 0
    assert set(s) == {"n_users"} | {
        f"{n}{suf}" for n in ("recall@1", "ndcg@1", "recall@3", "ndcg@3", "mrr@3") for suf in ("", "_ci_low", "_ci_high")
    }
    assert all(v == 0.0 for k, v in s.items() if k != "n_users")
    json.dumps(s)
    padded = summarize(np.zeros((0, 0), dtype=int), np.zeros(0, dtype=int), ks=(1, 3), n_users_total=5)
    assert padded["n_users"] == 5 and padded["recall@3"] == 0.0


@pytest.mark.unit
def test_ratio_ci_by_hand():
    # num = 2 x den user by user: every paired resample has ratio exactly 2
    den = np.array([0.0, 1.0, 0.5, 0.25])
    assert ratio_ci(2 * den, den, n_boot=200) == pytest.approx((2.0, 2.0, 2.0))
    # two users: (num, den) = (1, 0) and (0, 1). Resamples: both first (den 0: left out), both second
    # (ratio 0), one of each (ratio 1): the ratio of means is 1, the interval [0, 1]
    r, low, high = ratio_ci(np.array([1.0, 0.0]), np.array([0.0, 1.0]), n_boot=400)
    assert (r, low, high) == (1.0, 0.0, 1.0)
    assert all(math.isnan(v) for v in ratio_ci(np.ones(3), np.zeros(3)))
    with pytest.raises(ValueError, match="same 1-D shape"):
        ratio_ci(np.ones(3), np.ones(2))
