"""The promotion gate against the best baseline (issue 13): hand-made decisions, no Ray."""
from __future__ import annotations

import pytest

from recsys_core.ops import gate

GUARD_OK = {"passed": True, "enforced": True, "message": "generation guard passed"}
GUARD_FAIL = {"passed": False, "enforced": True, "message": "generation guard FAILED: 10.00 -> 12.00"}
BASELINES = {"popularity": {"ndcg@10": 0.025, "recall@10": 0.05},
             "recent_popularity": {"ndcg@10": 0.031, "recall@10": 0.06},
             "ease": {"ndcg@10": 0.030, "recall@10": 0.07}}


@pytest.mark.unit
def test_best_baseline_is_the_highest_ndcg():
    assert gate.best_baseline(BASELINES) == ("recent_popularity", 0.031)
    assert gate.best_baseline(BASELINES, "recall@10") == ("ease", 0.07)
    assert gate.best_baseline({}) is None
    # ties: the first one named
    assert gate.best_baseline({"a": {"ndcg@10": 0.1}, "b": {"ndcg@10": 0.1}}) == ("a", 0.1)


@pytest.mark.unit
@pytest.mark.parametrize("new, prod, guard, promote, words", [
    # the first run: a 1-epoch model below the best baseline is NOT promoted (the 0.017 vs 0.025)
    (0.017, None, GUARD_OK, False, "0.0170 does not beat the best baseline recent_popularity 0.0310"),
    (0.031, None, GUARD_OK, False, "does not beat"),  # equal is not better
    (0.0311, None, GUARD_OK, True, "no production model yet; beats the best baseline recent_popularity 0.0310"),
    (0.05, None, GUARD_FAIL, False, "FAILED"),  # the guard still decides first
    # with a production model: both floors apply
    (0.040, 0.045, GUARD_OK, True, ">= production 0.0450 - tolerance 0.0100; beats the best baseline"),
    (0.030, 0.035, GUARD_OK, False, "does not beat the best baseline"),  # within tolerance of production, below baseline
    (0.040, 0.060, GUARD_OK, False, "< production 0.0600"),  # above the baseline, too far below production
])
def test_gate_refuses_a_model_below_the_best_baseline(new, prod, guard, promote, words):
    d = gate.gate_decision(new, prod, 0.01, guard, baseline=gate.best_baseline(BASELINES))
    assert d.promote is promote, d.reason
    assert words in d.reason
    assert d.to_dict()["baseline"] == "recent_popularity" and d.to_dict()["baseline_ndcg"] == 0.031


@pytest.mark.unit
def test_gate_without_baselines_is_unchanged():
    d = gate.gate_decision(0.001, None, 0.01, None)
    assert d.promote is True and d.baseline is None and d.baseline_ndcg is None
