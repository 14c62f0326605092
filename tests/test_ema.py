"""The weight average (train.ema_decay): hand-computed values, and a real 2-worker DDP run that saves it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from recsys_core.config import replace
from recsys_core.train.ema import WeightAverage, warmup_decay


def test_warmup_decay_values():
    assert warmup_decay(0.99, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert warmup_decay(0.99, 10) == pytest.approx(11 / 20)
    assert warmup_decay(0.9, 1000) == 0.9  # capped at the configured decay


def _model() -> nn.Module:
    m = nn.Linear(1, 1)
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.fill_(0.0)
    m.bias.requires_grad_(False)  # not trained: not averaged
    return m


def _set(m: nn.Module, w: float) -> None:
    with torch.no_grad():
        m.weight.fill_(w)


def _after_one_step(decay: float, w: float) -> tuple[nn.Module, WeightAverage]:
    """A model at weight 1, its average, then one step to weight ``w`` folded in."""
    m = _model()
    ema = WeightAverage(m, decay)
    _set(m, w)
    ema.update()
    return m, ema


def test_update_folds_weights_in_with_the_warmup_decay():
    m, ema = _after_one_step(0.5, 3.0)  # d = min(0.5, 1/10) = 0.1: 0.1 * 1 + 0.9 * 3 = 2.8
    assert ema.shadow["weight"].item() == pytest.approx(2.8)
    _set(m, 5.0)
    ema.update()  # d = min(0.5, 2/11) = 2/11: 2/11 * 2.8 + 9/11 * 5 = 4.6
    assert ema.shadow["weight"].item() == pytest.approx(2 / 11 * 2.8 + 9 / 11 * 5.0)
    assert set(ema.shadow) == {"weight"}
    assert ema.steps == 2


def test_applied_swaps_the_average_in_and_restores_the_weights():
    m, ema = _after_one_step(0.5, 3.0)
    x = torch.ones(1, 1)
    with ema.applied():
        assert m(x).item() == pytest.approx(2.8)
    assert m.weight.item() == 3.0
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("restored even when the block fails")
    assert m.weight.item() == 3.0


def test_state_round_trip_and_bad_decay():
    m, ema = _after_one_step(0.9, 2.0)
    other = WeightAverage(_model(), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.steps == 1 and other.shadow["weight"].item() == pytest.approx(ema.shadow["weight"].item())
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(m, 1.0)


@pytest.mark.integration
def test_ddp_training_validates_and_saves_the_average(ray_local, synthetic_cfg):
    """Two DDP workers with train.ema_decay: the kept checkpoint's weights are the average (its training
    state carries it and the raw weights, which differ), and validation scored those weights."""
    import jobs.prepare
    from recsys_core.model.checkpoint import load_checkpoint
    from recsys_core.pipeline import Run
    from recsys_core.train.trainer import read_train_state, run_train

    cfg = replace(synthetic_cfg, **{"train.epochs": 2, "train.patience": 5, "train.num_workers": 2,
                                    "train.ema_decay": 0.9})
    jobs.prepare.main(cfg=cfg, run_date="2026-12-07")
    run = Run(cfg, "2026-12-07")
    fit = run_train(cfg, run.prepared, run.run_dir, fresh=True)
    assert len(fit["history"]) == 2 and fit["metrics"]["val_ndcg10"] > 0
    state = read_train_state(fit["checkpoint"])
    saved, _ = load_checkpoint(fit["checkpoint"])
    named = dict(saved.named_parameters())
    shadow, raw = state["ema"]["shadow"], state["model"]
    assert state["ema"]["steps"] > 0 and shadow
    for name, avg in shadow.items():
        assert torch.allclose(named[name].detach(), avg, atol=1e-6), name
    assert any(not torch.allclose(raw[n], shadow[n]) for n in shadow)  # the average is not the weights
