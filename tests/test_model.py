"""Two-tower model on tiny sizes: shapes, causality, pooling, checkpoint round trip, unwrapping."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from recsys_core.config import ModelConfig, TowerConfig
from recsys_core.model.checkpoint import (
    MARKER,
    ModelSpec,
    load_checkpoint,
    save_checkpoint,
)
from recsys_core.model.towers import build_two_tower, pool, unwrap

N_ITEMS, D, L, T = 10, 16, 8, 8
CFG = ModelConfig(item_tower=TowerConfig(size="tiny", dropout=0.0), user_tower=TowerConfig(size="tiny", dropout=0.0),
                  embed_dim=D, max_seq_len=L, max_text_tokens=T)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return build_two_tower(CFG, n_items=N_ITEMS, temperature=0.5).eval()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (N_ITEMS, T), generator=g)
    mask = torch.ones(N_ITEMS, T, dtype=torch.long)
    mask[:, 5:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def table(model, tokens):
    with torch.no_grad():
        return model.item_embeddings(model.item_tower.text_embed(*tokens), torch.arange(N_ITEMS))


def _seqs():
    # Right-padded: lengths 5 and 3 (padding index 0, mask 0).
    seq = torch.tensor([[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 0, 0, 0, 0, 0]])
    mask = (torch.arange(L) < torch.tensor([[5], [3]])).long()
    return seq, mask


@pytest.mark.unit
def test_shapes(model, tokens, table):
    seq, mask = _seqs()
    with torch.no_grad():
        assert model.item_tower.text_embed(*tokens).shape == (N_ITEMS, D)
        assert table.shape == (N_ITEMS, D)
        assert model.user_states(table, seq, mask).shape == (2, L, D)
        assert model.last_state(table, seq, mask).shape == (2, D)
    assert model.temperature.item() == pytest.approx(0.5)


@pytest.mark.unit
def test_last_state_is_state_at_last_real_position(model, table):
    seq, mask = _seqs()
    with torch.no_grad():
        states = model.user_states(table, seq, mask)
        last = model.last_state(table, seq, mask)
    torch.testing.assert_close(last[0], states[0, 4])
    torch.testing.assert_close(last[1], states[1, 2])
    assert not torch.allclose(last[1], states[1, -1])  # not simply the final (padded) slot


@pytest.mark.unit
def test_user_tower_is_causal(model, table):
    seq = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    mask = torch.ones_like(seq)
    changed = seq.clone()
    changed[0, 3] = 9
    with torch.no_grad():
        a = model.user_states(table, seq, mask)
        b = model.user_states(table, changed, mask)
    torch.testing.assert_close(a[0, :3], b[0, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0, 3], b[0, 3])  # the change is visible from its own position on
    assert not torch.allclose(a[0, 7], b[0, 7])


@pytest.mark.unit
def test_item_id_embedding_is_added_to_text(model):
    text = torch.zeros(2, D)
    got = model.item_embeddings(text, torch.tensor([3, 7]))
    torch.testing.assert_close(got, model.item_tower.id_emb.weight[[3, 7]])


@pytest.mark.unit
def test_pool_mean_and_last_hand_values():
    hidden = torch.tensor([[[1.0, 10.0], [3.0, 20.0], [100.0, 100.0]],
                           [[2.0, 4.0], [100.0, 100.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0, 15.0], [2.0, 4.0]]))
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.tensor([[3.0, 20.0], [2.0, 4.0]]))


@pytest.mark.unit
def test_pool_unknown_raises():
    with pytest.raises(ValueError, match="max"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "max")


@pytest.mark.unit
def test_checkpoint_round_trip_gives_identical_outputs(model, tokens, tmp_path):
    save_checkpoint(model, ModelSpec.of(model), tmp_path / "ckpt", extra={"epoch": 3})
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"model.safetensors", "model_config.json", MARKER}
    loaded, meta = load_checkpoint(str(tmp_path / "ckpt"))
    assert meta["epoch"] == 3 and meta["n_items"] == N_ITEMS
    assert loaded.cfg == CFG
    assert not loaded.training
    seq, mask = _seqs()
    with torch.no_grad():
        t1, t2 = model.item_tower.text_embed(*tokens), loaded.item_tower.text_embed(*tokens)
        torch.testing.assert_close(t1, t2, rtol=0, atol=0)
        tab1, tab2 = model.item_embeddings(t1, torch.arange(N_ITEMS)), loaded.item_embeddings(t2, torch.arange(N_ITEMS))
        torch.testing.assert_close(model.user_states(tab1, seq, mask), loaded.user_states(tab2, seq, mask),
                                   rtol=0, atol=0)
    assert loaded.temperature.item() == pytest.approx(0.5)


@pytest.mark.unit
def test_load_checkpoint_without_marker_raises(model, tmp_path):
    save_checkpoint(model, ModelSpec.of(model), tmp_path / "ckpt")
    (tmp_path / "ckpt" / MARKER).unlink()
    with pytest.raises(FileNotFoundError, match=MARKER):
        load_checkpoint(str(tmp_path / "ckpt"))


class _DDPLike(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.module = inner


class _CompiledLike(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner


@pytest.mark.unit
def test_unwrap_strips_ddp_and_compile_wrappers():
    inner = nn.Linear(2, 2)
    assert unwrap(inner) is inner
    assert unwrap(_DDPLike(inner)) is inner
    assert unwrap(_CompiledLike(inner)) is inner
    assert unwrap(_DDPLike(_CompiledLike(inner))) is inner
    assert set(unwrap(_DDPLike(inner)).state_dict()) == {"weight", "bias"}  # no "module." prefix


@pytest.mark.unit
def test_save_checkpoint_of_wrapped_model_has_unprefixed_keys(model, tmp_path):
    save_checkpoint(_DDPLike(model), ModelSpec.of(_DDPLike(model)), tmp_path / "ckpt")
    keys = load_file(str(tmp_path / "ckpt" / "model.safetensors")).keys()
    assert set(keys) == set(model.state_dict())
