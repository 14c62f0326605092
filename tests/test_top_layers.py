"""Top-k-layer training of the item LM (``model.item_tower.train_top_layers``): the hidden states entering
block L-k are cached once, and a step runs only the top k blocks. On GPT-2 and on a Llama body (SmolLM2's
architecture), built small here, the cached forward equals the full forward, its gradients equal the full
forward's on the trained parameters, and the lower blocks never run."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recsys_core.config import ConfigError, LoraConfig, ModelConfig, TowerConfig, load_config
from recsys_core.model.towers import build_two_tower, decoder_blocks
from recsys_core.train.guard import apply_lora
from tests.conftest import REPO

pytestmark = pytest.mark.unit
N, T = 10, 6


def llama_folder(tmp_path) -> str:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True))
    lm.save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama")


@pytest.fixture(params=["gpt2", "llama"])
def tower(request, tmp_path):
    item = (TowerConfig(size="small", dropout=0.0) if request.param == "gpt2"  # 4 blocks
            else TowerConfig(pretrained=llama_folder(tmp_path), dropout=0.0))
    cfg = ModelConfig(item_tower=item, user_tower=TowerConfig(size="tiny", dropout=0.0), embed_dim=16,
                      max_text_tokens=T, max_seq_len=5)
    torch.manual_seed(0)
    return build_two_tower(cfg, N).item_tower


def tokens():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 500, (N, T), generator=g)
    mask = torch.ones(N, T)
    lengths = torch.tensor([6, 3, 5, 6, 2, 4, 6, 1, 6, 5])  # right padding, as the catalog is padded
    mask[torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return ids * mask.long(), mask


@pytest.mark.parametrize("k", [1, 2, 4])
def test_cached_top_k_forward_equals_the_full_forward(tower, k):
    ids, mask = tokens()
    tower.eval()
    with torch.no_grad():
        full = tower.hidden(ids, mask)  # (N, T, H) every block
    tower.train_top_layers(k)
    tower.cache_lower(ids, mask, batch_size=4)
    assert tower.lower.shape == (N, T, full.size(-1))
    idx = torch.tensor([7, 0, 3, 3, 9])
    with torch.no_grad():
        top = tower.hidden(ids[idx], mask[idx], idx)
    real = mask[idx].bool()
    assert torch.allclose(top[real], full[idx][real], atol=1e-5), (top - full[idx]).abs().max()


def test_gradients_reach_only_the_top_blocks_and_match_the_full_forward(tower):
    ids, mask = tokens()
    tower.eval()  # dropout off: the two paths are the same function
    tower.train_top_layers(2)
    holder, name = decoder_blocks(tower.backbone)
    blocks = list(getattr(holder, name))
    trained = [p for n, p in tower.named_parameters() if p.requires_grad and n.startswith(("backbone.", "proj."))]
    assert not any(p.requires_grad for b in blocks[:2] for p in b.parameters())
    assert all(p.requires_grad for b in blocks[2:] for p in b.parameters())
    assert not tower.backbone.get_input_embeddings().weight.requires_grad

    def grads(use_cache: bool) -> list[torch.Tensor]:
        tower.zero_grad(set_to_none=True)
        idx = torch.arange(N)
        h = tower.hidden(ids, mask, idx if use_cache else None)
        tower.embed_hidden(h, mask).square().sum().backward()
        return [p.grad.clone() for p in trained]

    full = grads(False)
    tower.cache_lower(ids, mask)
    calls = {"lower": 0}
    hooks = [b.register_forward_hook(lambda *a: calls.__setitem__("lower", calls["lower"] + 1)) for b in blocks[:2]]
    cached = grads(True)
    for h in hooks:
        h.remove()
    assert calls["lower"] == 0  # a cached step never runs the frozen blocks
    for a, b in zip(full, cached):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in cached)


def test_lora_on_top_layers_puts_adapters_on_those_blocks_only(tower):
    body = apply_lora(tower.backbone, LoraConfig(enabled=True, r=2, alpha=4), top_layers=1)
    holder, name = decoder_blocks(body)
    with_lora = [i for i, b in enumerate(getattr(holder, name)) if any("lora_" in n for n, _ in b.named_parameters())]
    assert with_lora == [len(getattr(holder, name)) - 1]
    # the cached forward through the wrapped body (peft's base model holds the blocks) equals the full one
    tower.backbone = body
    tower.train_top_layers(1)
    ids, mask = tokens()
    tower.eval()
    with torch.no_grad():
        full = tower.hidden(ids, mask)
        tower.cache_lower(ids, mask)
        top = tower.hidden(ids, mask, torch.arange(N))
    assert torch.allclose(top[mask.bool()], full[mask.bool()], atol=1e-5)


def test_train_top_layers_config_rules():
    synthetic = REPO / "jobs" / "configs" / "synthetic.yaml"
    with pytest.raises(ConfigError, match="train_top_layers"):
        load_config(REPO / "jobs" / "configs" / "ml100k.yaml", ["model.item_tower.train_top_layers=2"])  # frozen
    with pytest.raises(ConfigError, match="user_tower.train_top_layers"):
        load_config(synthetic, ["model.user_tower.train_top_layers=1"])
    with pytest.raises(ConfigError, match="train_top_layers"):
        load_config(synthetic, ["model.item_tower.train_top_layers=-1"])
    assert load_config(synthetic, ["model.item_tower.train_top_layers=1"]).model.item_tower.train_top_layers == 1


def test_more_layers_than_the_lm_has_is_an_error(tower):
    with pytest.raises(ValueError, match="has 4 blocks"):
        tower.train_top_layers(5)
