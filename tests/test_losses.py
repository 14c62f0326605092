"""Losses checked against softmax cross-entropies computed by hand on 2-3 candidates."""

import math

import pytest
import torch

from recsys_core.model.losses import (
    LOSSES,
    expected_log_q,
    full_softmax_loss,
    get_loss,
    sampled_softmax_loss,
)

# One user state s = (1, 0) against candidates (1, 0) and (0, 0): logits (1, 0).
S = torch.tensor([[1.0, 0.0]])
T2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])


@pytest.mark.unit
@pytest.mark.parametrize("loss", [full_softmax_loss, sampled_softmax_loss])
def test_two_candidates_positive_first(loss):
    # -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    out = loss(S, T2, torch.tensor([0]), 1.0)
    assert out.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("loss", [full_softmax_loss, sampled_softmax_loss])
def test_two_candidates_positive_second(loss):
    # -log(e^0 / (e^1 + e^0)) = log(1 + e)
    out = loss(S, T2, torch.tensor([1]), 1.0)
    assert out.item() == pytest.approx(math.log(1 + math.e), rel=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("tau", [0.5, torch.tensor(0.5)])
def test_temperature_divides_logits(tau):
    # logits (1, 0) / 0.5 = (2, 0): loss log(1 + e^-2)
    out = full_softmax_loss(S, T2, torch.tensor([0]), tau)
    assert out.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


@pytest.mark.unit
def test_three_candidates_mean_over_users():
    states = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # user 0 logits (1, 0, -1), positive 1: log(e + 1 + e^-1) - 0
    # user 1 logits (0, 2, 0),  positive 2: log(1 + e^2 + 1) - 0
    want = (math.log(math.e + 1 + math.exp(-1)) + math.log(2 + math.exp(2))) / 2
    out = full_softmax_loss(states, table, torch.tensor([1, 2]), 1.0)
    assert out.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.unit
def test_sampled_softmax_subtracts_log_q():
    # logits (1, 0) - log_q (log 2, 0) = (1 - log 2, 0): loss log(1 + e^-(1 - log 2)) = log(1 + 2/e)
    log_q = torch.tensor([math.log(2.0), 0.0])
    out = sampled_softmax_loss(S, T2, torch.tensor([0]), 1.0, log_q=log_q)
    assert out.item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)


@pytest.mark.unit
def test_sampled_softmax_log_q_applies_after_temperature():
    # logits (1, 0) / 0.5 = (2, 0); minus (log 2, 0) = (2 - log 2, 0): loss log(1 + 2 e^-2)
    log_q = torch.tensor([math.log(2.0), 0.0])
    out = sampled_softmax_loss(S, T2, torch.tensor([0]), 0.5, log_q=log_q)
    assert out.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)


@pytest.mark.unit
def test_full_softmax_ignores_log_q():
    log_q = torch.tensor([math.log(2.0), 0.0])
    out = full_softmax_loss(S, T2, torch.tensor([0]), 1.0, log_q=log_q)
    assert out.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


@pytest.mark.unit
def test_loss_gradient_flows_to_states_and_table():
    states, table = S.clone().requires_grad_(), T2.clone().requires_grad_()
    sampled_softmax_loss(states, table, torch.tensor([0]), 1.0).backward()
    # d/ds of log(1 + e^{-(s.t0 - s.t1)}) = -(1 - p0)(t0 - t1), p0 = e/(e+1)
    p0 = math.e / (math.e + 1)
    torch.testing.assert_close(states.grad, torch.tensor([[-(1 - p0), 0.0]]))
    assert table.grad.abs().sum() > 0


@pytest.mark.unit
def test_expected_log_q_hand_values():
    item_prob = torch.tensor([0.5, 0.3, 0.2, 0.0])
    # n_in_batch=4, n_uniform=8, N=4: q = 4 p + 2
    got = expected_log_q(torch.tensor([0, 3, 1]), item_prob, n_in_batch=4, n_uniform=8)
    torch.testing.assert_close(got, torch.tensor([math.log(4.0), math.log(2.0), math.log(3.2)]))


@pytest.mark.unit
def test_expected_log_q_never_infinite_for_zero_probability():
    got = expected_log_q(torch.tensor([3]), torch.tensor([0.5, 0.3, 0.2, 0.0]), n_in_batch=4, n_uniform=0)
    assert torch.isfinite(got).all()
    assert got.item() == pytest.approx(math.log(1e-12), rel=1e-5)


@pytest.mark.unit
def test_get_loss_known_names():
    assert get_loss("full_softmax").fn is full_softmax_loss
    assert get_loss("sampled_softmax").fn is sampled_softmax_loss
    assert set(LOSSES) == {"full_softmax", "sampled_softmax"}


@pytest.mark.unit
def test_get_loss_unknown_raises_naming_choices():
    with pytest.raises(ValueError) as e:
        get_loss("bpr")
    msg = str(e.value)
    assert "bpr" in msg and "full_softmax" in msg and "sampled_softmax" in msg


def test_loss_entries_choose_their_candidates_and_correction():
    """Each registry entry carries its candidate rule and logQ: the objective never branches on the name."""
    step = torch.tensor([3, 1, 3])
    full = get_loss("full_softmax")
    assert full.candidates(step, 5, 2).tolist() == [0, 1, 2, 3, 4]
    assert full.log_q(torch.arange(5), torch.full((5,), 0.2), 3, 2) is None
    torch.manual_seed(0)
    sampled = get_loss("sampled_softmax")
    cand = sampled.candidates(step, 100, 4)
    assert {1, 3} <= set(cand.tolist()) and len(cand) <= 6 and cand.tolist() == sorted(set(cand.tolist()))
    prob = torch.full((100,), 0.01)
    lq = sampled.log_q(cand, prob, 3, 4)  # 3 * 0.01 + 4 / 100 = 0.07 per candidate
    assert torch.allclose(lq, torch.full((len(cand),), math.log(0.07)))
