"""The generation guard end to end: a tiny GPT-2 LM pretrained here on the shipped replay corpus is
fine-tuned as the item tower by the train job (Ray Train, 2 DDP workers) without and with the guard
(LoRA + LM replay + KL); the guarded run's perplexity drifts less.

A 2-layer LM trained for seconds models only the text it saw, so drift is measured on that text (the
replay corpus) here: what the starting LM can do is what fine-tuning may destroy. The SmolLM2 benchmark
measures the real case, held-out English on a genuinely pretrained LM."""
from __future__ import annotations

import pytest
import torch

import jobs.prepare
import jobs.train
from recsys_core import storage
from recsys_core.config import load_config, replace
from recsys_core.model.checkpoint import load_checkpoint
from recsys_core.train.guard import BUILTIN
from tests.conftest import REPO

pytestmark = pytest.mark.integration
RUN_DATE = "2026-11-20"


@pytest.fixture(scope="module")
def runs(ray_local, tiny_pretrained_lm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard")
    torch.set_num_threads(1)
    lm_dir = tiny_pretrained_lm
    cfg = load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [
        f"storage.root={tmp / 'store'}", f"model.item_tower.pretrained={lm_dir}", "model.max_text_tokens=16",
        "data.synthetic.n_users=200", "train.epochs=3", "train.patience=3", "train.lr=0.002", "train.val_users=200",
        "registry.warm_start=false", "guard.enforce=always", f"guard.heldout_corpus={BUILTIN['replay']}",
        "guard.eval_tokens=768", "guard.replay_batch_size=2", "guard.replay_seq_len=32", "guard.generate_tokens=6",
        "guard.alphas=[]",  # the mechanisms alone, as trained (tests/test_strength.py scans the strength)
    ])
    jobs.prepare.main(cfg=cfg, run_date=RUN_DATE)
    plain = jobs.train.main(cfg=cfg, run_date=RUN_DATE)["train"]
    guarded_cfg = replace(cfg, **{"guard.lora.enabled": True, "guard.lm_weight": 1.0, "guard.kl_weight": 0.5})
    guarded = jobs.train.main(cfg=guarded_cfg, run_date=RUN_DATE, force=True)["train"]
    return plain, guarded


def test_guarded_perplexity_drifts_less_than_unguarded(runs):
    plain, guarded = runs
    p, g = plain["guard"], guarded["guard"]
    # both measured from the same pretrained starting point
    assert p["ppl_general_before"] == pytest.approx(g["ppl_general_before"], rel=1e-6)
    assert p["change"] > 0, p  # full fine-tuning for recommendation hurts the language model
    assert g["change"] < p["change"], (g["message"], p["message"])
    assert g["mechanisms"] == {"lora": True, "lm_weight": 1.0, "item_lm_weight": 0.0, "kl_weight": 0.5}
    assert p["blocks_promotion"] == (p["change"] > p["max_increase"])  # enforce=always
    assert len(g["generations_after"]) == len(g["prompts"]) == 2
    for rec in (p, g):
        assert "ppl_items_before" in rec and rec["ppl_items_after"] > 1.0


def test_guarded_training_still_recommends_and_logs_its_terms(runs):
    plain, guarded = runs
    hist = guarded["history"]
    assert {"rec_loss", "lm_loss", "kl"} <= set(hist[-1])
    assert guarded["best"]["val_ndcg10"] > 0.5 * plain["best"]["val_ndcg10"]
    # served weights are merged; the adapters are also kept on their own, in peft format
    assert storage.exists(storage.join(guarded["model_dir"], "lora_item", "adapter_config.json"))

    model, meta = load_checkpoint(guarded["model_dir"])
    assert meta["lora"] is True and not hasattr(model.item_tower.backbone, "peft_config")
