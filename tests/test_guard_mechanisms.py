"""The guard's mechanisms on tiny GPT-2 towers: LoRA (exact base logits when disabled, merged export),
the LM/KL training terms, the frozen reference, replay windows and the promotion verdict."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from recsys_core.config import (
    GuardConfig,
    LoraConfig,
    ModelConfig,
    NightlyConfig,
    TowerConfig,
    TrainConfig,
)
from recsys_core.data.text import load_tokenizer
from recsys_core.model.checkpoint import load_checkpoint, save_model_folder
from recsys_core.model.towers import build_two_tower, is_lora, item_causal_lm
from recsys_core.train.guard import (
    GuardTerms,
    apply_lora,
    frozen_reference,
    generations,
    heldout_items,
    kl_to_reference,
    lm_loss,
    reference_logits,
    replay_windows,
    verdict,
)
from recsys_core.train.loop import initial_model, param_groups
from recsys_core.train.objective import ItemTensors, Objective

pytestmark = pytest.mark.unit
N_ITEMS, D, L, T = 12, 16, 6, 8
MODEL = ModelConfig(item_tower=TowerConfig(size="tiny", dropout=0.0), user_tower=TowerConfig(size="tiny", dropout=0.0),
                    embed_dim=D, max_seq_len=L, max_text_tokens=T)
LORA = LoraConfig(enabled=True, r=4, alpha=8)


def _cfg(**guard) -> NightlyConfig:
    return NightlyConfig(model=MODEL, guard=GuardConfig(**guard))


def _items() -> ItemTensors:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 50257, (N_ITEMS, T), generator=g)
    mask = torch.ones(N_ITEMS, T, dtype=torch.long)
    mask[::2, 5:] = 0
    return ItemTensors(tokens, mask, torch.full((N_ITEMS,), 1.0 / N_ITEMS), torch.ones(N_ITEMS, dtype=torch.bool))


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seq = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 0, 0, 0]])
    tgt = torch.tensor([[2, 3, 4, 5, 0, 0], [6, 7, 8, 0, 0, 0]])
    mask = (seq > 0).long()
    return seq, tgt, mask


def _randomize_lora(backbone: torch.nn.Module) -> None:
    """LoRA's B starts at zero (a no-op); give the adapters weights so they change the output."""
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)


def test_lora_disabled_gives_exactly_the_base_logits():
    torch.manual_seed(0)
    model = build_two_tower(MODEL, N_ITEMS).eval()
    base = copy.deepcopy(model.item_tower.lm())
    ids = torch.randint(0, 50257, (2, T))
    model.item_tower.backbone = apply_lora(model.item_tower.backbone, LORA)
    _randomize_lora(model.item_tower.backbone)
    lm = model.item_tower.lm().eval()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        with lm.backbone.disable_adapter():
            disabled = lm(input_ids=ids).logits
        enabled = lm(input_ids=ids).logits
    assert torch.equal(disabled, expected)
    assert not torch.allclose(enabled, expected)
    # base weights frozen; only adapters train in the body
    trainable = {n for n, p in model.item_tower.backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_checkpoint_is_merged_and_adapters_saved_separately(tmp_path):
    torch.manual_seed(0)
    model = initial_model(_cfg(lora=LORA), N_ITEMS, None).eval()
    assert is_lora(model.item_tower.backbone)
    _randomize_lora(model.item_tower.backbone)
    items = _items()
    state = save_model_folder(model, str(tmp_path), {"epoch": 0})
    assert set(state) == {"model"} and any("lora_" in k for k in state["model"])
    assert (tmp_path / "lora_item" / "adapter_model.safetensors").exists()
    assert (tmp_path / "lora_item" / "adapter_config.json").exists()
    loaded, meta = load_checkpoint(str(tmp_path))
    assert meta["lora"] is True and not is_lora(loaded.item_tower.backbone)  # served without peft
    with torch.no_grad():
        a = model.item_tower.text_embed(items.tokens, items.mask)
        b = loaded.item_tower.text_embed(items.tokens, items.mask)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the unmerged state restores the peft model exactly (resume after a failure)
    fresh = initial_model(_cfg(lora=LORA), N_ITEMS, None)
    fresh.load_state_dict(state["model"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().item_tower.text_embed(items.tokens, items.mask), a)


def test_guard_terms_add_weighted_lm_and_kl():
    """total = rec + lambda * LM(replay) + mu * LM(items) + beta * KL(replay), recomputed by hand."""
    torch.manual_seed(0)
    model = build_two_tower(MODEL, N_ITEMS)
    model.eval()  # no dropout: the hand computation sees the same forward
    items = _items()
    seq, tgt, mask = _batch()
    replay = torch.randint(0, 50257, (2, T), generator=torch.Generator().manual_seed(5))
    held = torch.zeros(N_ITEMS, dtype=torch.bool)
    held[[4, 6]] = True  # items 4 and 6 are targets but held out of the LM loss
    reference = frozen_reference(model.item_tower.lm())
    with torch.no_grad():  # move the model away from its reference so KL > 0
        for p in model.item_tower.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lam, mu, beta = 0.7, 0.2, 0.3
    obj = Objective(model, "full_softmax", 0, 100, GuardTerms(lam, beta, mu, 100, held, reference))
    cache = torch.zeros(N_ITEMS, D)
    total = obj(seq, tgt, mask, items, cache, replay)
    plain = Objective(model, "full_softmax", 0, 100)(seq, tgt, mask, items, cache)

    tower = model.item_tower
    fresh = torch.unique(tgt[mask.bool()])
    keep = fresh[~held[fresh]]
    logits_r = tower.lm_logits(tower.hidden(replay))
    lm_items = lm_loss(tower.lm_logits(tower.hidden(items.tokens[keep], items.mask[keep])), items.tokens[keep],
                       items.mask[keep])
    lm = lm_loss(logits_r, replay, torch.ones_like(replay))
    kl = kl_to_reference(logits_r, reference(input_ids=replay).logits, torch.ones_like(replay))
    assert float(kl) > 0
    torch.testing.assert_close(total, plain + lam * lm + mu * lm_items + beta * kl, rtol=1e-5, atol=1e-5)
    assert set(obj.parts) == {"rec_loss", "lm_loss", "item_lm_loss", "kl"}
    total.backward()
    assert tower.backbone.get_input_embeddings().weight.grad is not None


def test_reference_under_lora_is_the_base_with_adapters_off():
    torch.manual_seed(0)
    model = build_two_tower(MODEL, N_ITEMS)
    base = copy.deepcopy(model.item_tower.lm()).eval()
    model.item_tower.backbone = apply_lora(model.item_tower.backbone, LORA)
    _randomize_lora(model.item_tower.backbone)
    lm = model.item_tower.lm().train()
    assert frozen_reference(lm) is None
    ids = torch.randint(0, 50257, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(reference_logits(lm, None, ids), base(input_ids=ids).logits)
    assert lm.training  # restored


def test_frozen_reference_is_a_detached_copy():
    torch.manual_seed(0)
    lm = build_two_tower(MODEL, N_ITEMS).item_tower.lm()
    ref = frozen_reference(lm)
    assert all(not p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        lm.backbone.get_input_embeddings().weight.add_(1.0)
    assert not torch.equal(ref.backbone.get_input_embeddings().weight, lm.backbone.get_input_embeddings().weight)


def test_replay_windows_are_contiguous_slices():
    stream = torch.arange(100, 140)
    w = replay_windows(stream, 5, 8, torch.Generator().manual_seed(0))
    assert w.shape == (5, 8)
    assert torch.all(w[:, 1:] - w[:, :-1] == 1) and int(w.min()) >= 100 and int(w.max()) < 140
    assert replay_windows(stream[:3], 2, 8, torch.Generator()).shape == (2, 3)  # never longer than the stream


def test_heldout_items_every_nth():
    assert heldout_items(7, 3).tolist() == [True, False, False, True, False, False, True]


def test_verdict_blocks_only_when_enforced_and_over_the_limit():
    g = GuardConfig(max_ppl_increase=0.05)
    over = verdict({"ppl_general": 20.0, "ppl_items": 50.0}, {"ppl_general": 22.0, "ppl_items": 40.0}, g,
                   pretrained=True)
    assert over["passed"] is False and over["blocks_promotion"] is True
    assert over["change"] == pytest.approx(0.10) and over["items_change"] == pytest.approx(-0.2)
    assert "FAILED" in over["message"] and "+10.0%" in over["message"]
    within = verdict({"ppl_general": 20.0}, {"ppl_general": 20.9}, g, pretrained=True)
    assert within["passed"] and not within["blocks_promotion"]
    scratch = verdict({"ppl_general": 20.0}, {"ppl_general": 30.0}, g, pretrained=False)
    assert not scratch["passed"] and not scratch["blocks_promotion"] and scratch["applicable"] is False
    assert scratch["message"].startswith("generation guard not applicable: the item tower was not pretrained")
    assert "passed" not in scratch["message"]  # a random-init LM is never reported as protected
    never = verdict({"ppl_general": 20.0}, {"ppl_general": 30.0}, dataclasses.replace(g, enforce="never"), True)
    assert not never["blocks_promotion"] and never["message"].endswith("(not enforced: guard.enforce=never)")
    always = verdict({"ppl_general": 20.0}, {"ppl_general": 30.0}, dataclasses.replace(g, enforce="always"), False)
    assert always["blocks_promotion"]
    with pytest.raises(ValueError, match="guard.enforce"):
        verdict({"ppl_general": 1.0}, {"ppl_general": 1.0}, dataclasses.replace(g, enforce="sometimes"), True)


def test_item_causal_lm_matches_the_tower_and_generates():
    torch.manual_seed(0)
    model = build_two_tower(MODEL, N_ITEMS).eval()
    model.item_tower.backbone = apply_lora(model.item_tower.backbone, LORA)
    _randomize_lora(model.item_tower.backbone)
    ids = torch.randint(0, 50257, (1, T))
    causal = item_causal_lm(model.item_tower)
    with torch.no_grad():
        torch.testing.assert_close(causal(input_ids=ids).logits, model.item_tower.lm().eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    out = causal.generate(ids[:, :3], attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=4,
                          do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7) and np.array_equal(out[0, :3].numpy(), ids[0, :3].numpy())


def test_generations_fit_the_position_window():
    """A long prompt plus many new tokens on an 8-position LM: the prompt is cut, nothing overflows."""

    torch.manual_seed(0)
    model = build_two_tower(MODEL, N_ITEMS).eval()  # max_text_tokens=8: 8 positions
    out = generations(item_causal_lm(model.item_tower), load_tokenizer("gpt2-offline"),
                      ("a rather long prompt that is much longer than eight tokens in total",), 16)
    assert len(out) == 1 and isinstance(out[0], str)


def test_param_groups_give_the_item_lm_body_its_own_lr():
    torch.manual_seed(0)
    model = build_two_tower(MODEL, N_ITEMS)
    body = {id(p) for p in model.item_tower.backbone.parameters() if p.requires_grad}
    groups = param_groups(model, TrainConfig(lr=1e-3, item_backbone_lr=5e-5, weight_decay=0.1))
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= body if g["lr"] == 5e-5 else not (ids & body)
        assert g["weight_decay"] == (0.1 if all(p.dim() >= 2 for p in g["params"]) else 0.0)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    assert {g["lr"] for g in param_groups(model, TrainConfig(lr=1e-3))} == {1e-3}
