"""The one epoch loop (run_epoch): step counting, stopping rules, loss terms, and learning."""
from __future__ import annotations

import contextlib

import pytest
import torch

from recsys_core.config import ModelConfig, TowerConfig
from recsys_core.model.towers import build_two_tower, text_table
from recsys_core.train.loop import run_epoch
from recsys_core.train.objective import ItemTensors, Objective

pytestmark = pytest.mark.unit
N, T, L = 12, 4, 5
MODEL = ModelConfig(item_tower=TowerConfig(size="tiny", dropout=0.0), user_tower=TowerConfig(size="tiny", dropout=0.0),
                    embed_dim=16, max_text_tokens=T, max_seq_len=L)


def _setup(loss: str = "full_softmax"):
    torch.manual_seed(0)
    model = build_two_tower(MODEL, N)
    items = ItemTensors(torch.randint(1, 500, (N, T)), torch.ones(N, T), torch.full((N,), 1.0 / N),
                        torch.ones(N, dtype=torch.bool))
    objective = Objective(model, loss, 4, 100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, items, objective, opt


def _batches(n: int, b: int = 3):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        seq = torch.randint(1, N, (b, L), generator=g)
        yield seq, torch.full_like(seq, 3), torch.ones(b, L)  # the next item is always item 3: learnable


def test_counts_steps_samples_and_parts():
    model, items, obj, opt = _setup()
    seen = []
    ep = run_epoch(obj, opt, None, model.parameters(), 1.0, contextlib.nullcontext(), _batches(4), items,
                   text_table(model, items.tokens, items.mask), on_step=lambda s: seen.append(s.steps))
    assert (ep.steps, ep.samples, seen) == (4, 12, [1, 2, 3, 4])
    assert set(ep.parts) == {"rec_loss"} and len(ep.parts["rec_loss"]) == 4
    assert ep.step_s >= 0 and ep.mean_loss == pytest.approx(sum(ep.losses) / 4)


def test_max_steps_stops_the_epoch_and_an_empty_epoch_is_nan():
    model, items, obj, opt = _setup("sampled_softmax")
    cache = text_table(model, items.tokens, items.mask)
    ep = run_epoch(obj, opt, None, model.parameters(), 1.0, contextlib.nullcontext(), _batches(10), items, cache,
                   max_steps=3)
    assert ep.steps == 3
    empty = run_epoch(obj, opt, None, model.parameters(), 1.0, contextlib.nullcontext(), iter(()), items, cache)
    assert empty.steps == 0 and empty.step_s == 0.0 and empty.mean_loss != empty.mean_loss  # NaN


def test_epochs_learn_a_constant_next_item():
    """The loss falls well below its start (about ln(N), uniform guessing) over epochs of the same batches."""
    model, items, obj, opt = _setup()
    first = None
    for _ in range(8):
        ep = run_epoch(obj, opt, None, model.parameters(), 1.0, contextlib.nullcontext(), _batches(4), items,
                       text_table(model, items.tokens, items.mask))
        first = ep.losses[0] if first is None else first  # the very first step: about ln(12)
    assert first > 2.0 and ep.mean_loss < 0.5 * first  # a loop that never stepped would stay at ~ln(12)


def test_every_step_clips_the_gradient_even_given_a_generator(monkeypatch):
    """``model.parameters()`` is a generator: the clip must see every parameter at every step, not only at the
    first (a spent generator clips nothing, silently)."""
    model, items, obj, opt = _setup()
    n_params = len(list(model.parameters()))
    seen: list[int] = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        seen.append(len(params))
        return real(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    run_epoch(obj, opt, None, model.parameters(), 1.0, contextlib.nullcontext(), _batches(3), items,
              text_table(model, items.tokens, items.mask))
    assert seen == [n_params] * 3
