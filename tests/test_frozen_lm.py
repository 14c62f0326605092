"""A frozen pretrained item LM: its text features computed once per catalog by a Ray Data pass, cached
and reused, a tower that trains a projection on them, checkpoints without the LM's weights, the config
rules, and the whole nightly on a small pretrained GPT-2 saved here (guard: unchanged by construction;
explain: the LM by name, its noise withheld by the description bar)."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

import jobs.nightly
from recsys_core import storage
from recsys_core.config import ConfigError, ModelConfig, TowerConfig, load_config
from recsys_core.data.features import (
    FEATURES,
    MARKER,
    TextFeaturizer,
    catalog_features,
    feature_key,
    read_features,
    standardise,
)
from recsys_core.data.text import load_tokenizer, tokenize_texts
from recsys_core.model.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from recsys_core.model.pretrained import load_causal_lm
from recsys_core.model.towers import build_two_tower, encode_items, mean_pool
from recsys_core.runtime import pool_args
from recsys_core.train.objective import ItemTensors, Objective
from tests.conftest import REPO

TEXTS = ["Toy Story (1995). Genres: Animation.", "Heat (1995). Genres: Action, Crime.", "Casino (1995).",
         "Babe (1995). Genres: Children's, Comedy, Drama."]


@pytest.fixture(scope="module")
def tiny_lm(tiny_pretrained_lm, tmp_path_factory):
    """A copy of the session's small pretrained LM (one test here touches its files)."""
    import shutil

    return str(shutil.copytree(tiny_pretrained_lm, tmp_path_factory.mktemp("lm") / "tiny-lm"))


def items_file(folder, texts=TEXTS) -> str:
    tok = load_tokenizer("gpt2-offline")
    uri = str(folder / "items.parquet")
    storage.write_table(pa.table({"item_idx": pa.array(range(len(texts)), pa.int64()), "text": texts,
                                  "input_ids": tokenize_texts(tok, texts, 16)}), uri)
    return uri


@pytest.mark.unit
def test_feature_key_changes_with_tokens_pooling_and_the_models_files(tiny_lm, tmp_path):
    tokens = [[1, 2, 3], [4, 5]]
    k = feature_key(tiny_lm, "mean", tokens)
    assert k == feature_key(tiny_lm, "mean", [[1, 2, 3], [4, 5]])  # stable
    assert k != feature_key(tiny_lm, "last", tokens)
    assert k != feature_key(tiny_lm, "mean", [[1, 2], [3, 4, 5]])  # the item boundaries count
    assert k != feature_key(tiny_lm, "mean", [[4, 5], [1, 2, 3]])  # and the order
    assert feature_key("smollm2-135m-instruct", "mean", tokens) != feature_key("gpt2", "mean", tokens)
    weights = os.path.join(tiny_lm, "model.safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the weights were rewritten
    assert feature_key(tiny_lm, "mean", tokens) != k


@pytest.mark.unit
def test_featurizer_is_the_lms_pooled_last_hidden_state(tiny_lm, tmp_path):
    items = storage.read_table(items_file(tmp_path))
    out = TextFeaturizer(tiny_lm, "mean")(items)
    feats = np.stack(out["features"].to_numpy(zero_copy_only=False))
    body = load_causal_lm(tiny_lm).base_model.eval()
    for i, ids in enumerate(items["input_ids"].to_pylist()):  # one item at a time: no padding at all
        with torch.no_grad():
            h = body(input_ids=torch.tensor([ids])).last_hidden_state  # (1, T, H)
        want = mean_pool(h, torch.ones(1, len(ids)))[0].numpy()
        np.testing.assert_allclose(feats[i], want, rtol=1e-4, atol=1e-5)
    assert out["item_idx"].to_pylist() == [0, 1, 2, 3]


@pytest.mark.unit
def test_standardise_gives_zero_mean_unit_variance_columns():
    x = np.array([[1.0, 100.0], [3.0, 300.0], [5.0, 200.0]], dtype=np.float32)
    z = standardise(x)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(z[:, 0], [-1.2247449, 0.0, 1.2247449], rtol=1e-5)


def frozen_cfg() -> ModelConfig:
    return ModelConfig(item_tower=TowerConfig(size="tiny", pretrained="any", frozen=True, dropout=0.0),
                       user_tower=TowerConfig(size="tiny", dropout=0.0), embed_dim=8, max_seq_len=6,
                       max_text_tokens=16)


@pytest.mark.unit
def test_frozen_tower_projects_cached_features_trains_and_saves_without_the_lm(tmp_path):
    torch.manual_seed(0)
    feats = torch.randn(4, 12)
    model = build_two_tower(frozen_cfg(), 4, text_features=feats)
    assert model.item_tower.frozen and model.item_tower.backbone is None
    idx = torch.tensor([2, 0])
    tokens = torch.zeros(2, 3, dtype=torch.long)  # ignored: a frozen tower reads its features by index
    torch.testing.assert_close(model.item_tower.text_embed(tokens, tokens, idx), model.item_tower.proj(feats[idx]))
    with pytest.raises(ValueError, match="by index"):
        model.item_tower.text_embed(tokens, tokens)
    assert not any(k.startswith("item_tower.backbone") for k in model.state_dict())

    items = ItemTensors(torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long),
                        torch.full((4,), 0.25), torch.ones(4, dtype=torch.bool))
    obj = Objective(model, "full_softmax", 2, 4)
    seq, tgt, mask = torch.tensor([[0, 1, 2]]), torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)
    loss = obj(seq, tgt, mask, items, torch.zeros(4, 8))
    loss.backward()
    assert model.item_tower.proj.weight.grad.abs().sum() > 0  # the projection learns from every candidate

    save_checkpoint(model, ModelSpec.of(model), tmp_path / "ckpt")
    loaded, _ = load_checkpoint(str(tmp_path / "ckpt"))
    assert loaded.item_tower.frozen
    torch.testing.assert_close(loaded.item_tower.text_features, feats)
    torch.testing.assert_close(encode_items(loaded, items.tokens, items.mask), encode_items(model, items.tokens, items.mask))
    with pytest.raises(ValueError, match="text features of all 4 items"):
        build_two_tower(frozen_cfg(), 4)


@pytest.mark.unit
def test_config_rules_of_a_frozen_item_lm():
    path = REPO / "jobs" / "configs" / "synthetic.yaml"
    with pytest.raises(ConfigError, match="model.item_tower.frozen' needs model.item_tower.pretrained"):
        load_config(path, ["model.item_tower.frozen=true"])
    with pytest.raises(ConfigError, match="guard.lora"):
        load_config(path, ["model.item_tower.frozen=true", "model.item_tower.pretrained=gpt2",
                           "guard.lora.enabled=true"])
    with pytest.raises(ConfigError, match="only the item tower"):
        load_config(path, ["model.user_tower.frozen=true"])
    assert load_config(path, ["model.item_tower.frozen=true", "model.item_tower.pretrained=gpt2"]).model.item_tower.frozen


@pytest.mark.integration
def test_catalog_features_pass_is_cached_and_reused(ray_local, tiny_lm, tmp_path):
    items = items_file(tmp_path)
    root = str(tmp_path / "store")
    folder, reused = catalog_features(items, tiny_lm, "mean", root, 2, pool_args("TextFeaturizer", 1))
    assert not reused and storage.exists(storage.join(folder, MARKER))
    feats = read_features(folder)
    assert feats.shape == (4, 64) and feats.dtype == np.float32
    direct = np.stack(TextFeaturizer(tiny_lm, "mean")(storage.read_table(items))["features"]
                      .to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-5)  # batches of 2 (padding) == one batch
    storage.write_bytes(storage.join(folder, FEATURES), b"not read again")  # a reuse must not recompute ...
    again, reused = catalog_features(items, tiny_lm, "mean", root, 2, pool_args("TextFeaturizer", 1))
    assert reused and again == folder  # ... and does not
    changed = items_file(tmp_path, TEXTS[:3] + ["Fargo (1996). Genres: Crime, Drama, Thriller."])
    other, reused = catalog_features(changed, tiny_lm, "mean", root, 2, pool_args("TextFeaturizer", 1))
    assert not reused and other != folder  # a changed catalog gets its own features


@pytest.mark.integration
def test_nightly_with_a_frozen_pretrained_item_lm(ray_local, tiny_lm, tmp_path):
    cfg = load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [
        f"storage.root={tmp_path / 'store'}", f"model.item_tower.pretrained={tiny_lm}", "model.item_tower.frozen=true",
        "data.synthetic.n_users=150", "train.epochs=3", "train.patience=3", "train.lr=0.003", "train.val_users=150",
        "guard.eval_tokens=256", "guard.generate_tokens=4", "explain.n_users=6", "explain.max_new_tokens=6",
        "eval.n_boot=20", "eval.baselines=[popularity]"])
    out = jobs.nightly.main(cfg=cfg, run_date="2026-11-20")
    m = out["evaluate"]["metrics"]
    pop = m["baselines"]["popularity"]
    assert m["model"]["ndcg@10"] > 1.5 * pop["ndcg@10"], (m["model"], pop)  # planted tastes, learnt over features
    guard = out["train"]["guard"]
    assert guard["frozen"] and guard["change"] == 0.0 and guard["applicable"] and guard["passed"]
    assert "unchanged by construction" in guard["message"]
    assert guard["generations_before"] == guard["generations_after"]
    features = storage.list_files(storage.join(cfg.storage.root, "features"))
    assert any(f.endswith(FEATURES) for f in features) and any(f.endswith(MARKER) for f in features)
    model, _ = load_checkpoint(out["train"]["model_dir"])
    assert model.item_tower.frozen and not any("backbone" in k for k in model.item_tower.state_dict())
    # a 40-step LM writes no grounded English: described, measured, withheld, and the reason recorded
    ex = out["explain"]
    assert ex["explanations"] is None and ex["users"] == 6 and ex["quality"]["n"] == 6
    assert ex["reason"].startswith("withheld, below the bar: ")
    assert not storage.exists(storage.join(cfg.storage.root, "explanations"))
    assert out["infer"]["published"]
