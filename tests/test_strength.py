"""The fine-tuning strength chosen after training (WiSE-FT, recsys_core.train.strength), on an item LM
trained on its top block only (``model.item_tower.train_top_layers``).

Unit: interpolation and the choice rule on hand-computed values. Integration: a tiny GPT-2 LM pretrained
here on the shipped replay corpus is fine-tuned as the item tower by the train job (Ray Train, 2 DDP
workers); the scan's curve is checked against the guard and the training's own validation, and the scan
rerun on the same fine-tuned weights under a perplexity bound that the fine-tuned LM breaks keeps an
alpha within it and publishes exactly that interpolation."""
from __future__ import annotations

import pytest
import torch

import jobs.prepare
import jobs.train
from recsys_core.config import ConfigError, load_config, replace
from recsys_core.model.checkpoint import load_checkpoint
from recsys_core.ops.report import guard_sentence, strength_table
from recsys_core.train.guard import BUILTIN, guard_inputs, measure_tower
from recsys_core.train.strength import choose_alpha, choose_strength, interpolate, within
from tests.conftest import REPO

RUN_DATE = "2026-11-21"


def point(alpha: float, ppl: float, ndcg: float, base: float = 10.0) -> dict:
    return {"alpha": alpha, "ppl_general": ppl, "ppl_general_base": base, "val_ndcg10": ndcg}


def test_interpolate_is_base_plus_alpha_times_the_delta():
    base = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor([3])}
    tuned = {"w": torch.tensor([3.0, -2.0]), "steps": torch.tensor([7])}
    assert torch.equal(interpolate(base, tuned, 0.0)["w"], torch.tensor([1.0, 2.0]))
    assert torch.equal(interpolate(base, tuned, 1.0)["w"], torch.tensor([3.0, -2.0]))
    assert torch.allclose(interpolate(base, tuned, 0.25)["w"], torch.tensor([1.5, 1.0]))  # 1 + .25*2, 2 + .25*-4
    assert torch.equal(interpolate(base, tuned, 0.5)["steps"], torch.tensor([7]))  # integer buffers: tuned's
    with pytest.raises(ValueError, match="different keys"):
        interpolate({"w": base["w"]}, tuned, 0.5)


def test_choose_alpha_keeps_the_best_validation_within_the_bound():
    curve = [point(0.0, 10.0, 0.10), point(0.5, 10.3, 0.14), point(1.0, 11.0, 0.15)]  # rises 0, +3%, +10%
    assert choose_alpha(curve, 0.05)["alpha"] == 0.5  # alpha 1 is best but +10% > +5%
    assert choose_alpha(curve, 0.20)["alpha"] == 1.0
    assert choose_alpha(curve, 0.0)["alpha"] == 0.0
    assert within(curve[1], 0.031) and not within(curve[1], 0.029)  # +3%
    tie = [point(0.0, 10.0, 0.10), point(0.5, 10.0, 0.12), point(1.0, 10.0, 0.12)]
    assert choose_alpha(tie, 0.05)["alpha"] == 0.5  # a tie goes to the smaller alpha (less drift)
    with pytest.raises(ValueError, match="no alpha keeps"):
        choose_alpha([point(1.0, 12.0, 0.2)], 0.05)


def test_alphas_outside_zero_one_are_refused_at_load():
    with pytest.raises(ConfigError, match="guard.alphas"):
        load_config(REPO / "jobs" / "configs" / "synthetic.yaml", ["guard.alphas=[0, 1.5]"])


@pytest.fixture(scope="module")
def scanned(ray_local, tiny_pretrained_lm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strength")
    torch.set_num_threads(1)
    cfg = load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [
        f"storage.root={tmp / 'store'}", f"model.item_tower.pretrained={tiny_pretrained_lm}",
        "model.max_text_tokens=16", "data.synthetic.n_users=200", "train.epochs=3", "train.patience=3",
        "train.lr=0.002", "train.val_users=200", "registry.warm_start=false", "guard.enforce=always",
        f"guard.heldout_corpus={BUILTIN['replay']}", "guard.eval_tokens=768", "guard.generate_tokens=6",
        "guard.alphas=[0, 0.5, 1]", "guard.max_ppl_increase=100",  # loose: every alpha qualifies
        "model.item_tower.train_top_layers=1",  # of 2 blocks: the lower one frozen, its output cached
        "train.item_backbone_lr=0.02",  # a large step on the top block: the LM drifts (the scan has work to do)
    ])
    jobs.prepare.main(cfg=cfg, run_date=RUN_DATE)
    return cfg, jobs.train.main(cfg=cfg, run_date=RUN_DATE)["train"]


@pytest.mark.integration
def test_scan_measures_every_alpha_and_keeps_the_best_validation(scanned):
    _, out = scanned
    guard, strength = out["guard"], out["guard"]["strength"]
    curve = strength["curve"]
    assert [p["alpha"] for p in curve] == [0.0, 0.5, 1.0]
    # alpha 0 is the base LM: the guard's "before"; alpha 1 is the fine-tuned model the training validated
    assert curve[0]["ppl_general"] == pytest.approx(guard["ppl_general_before"], rel=1e-5)
    assert curve[-1]["val_ndcg10"] == pytest.approx(out["best"]["val_ndcg10"], abs=1e-6)
    assert curve[-1]["ppl_general"] > curve[0]["ppl_general"]  # fine-tuning moved the LM (the test's premise)
    kept = max(curve, key=lambda p: (p["val_ndcg10"], -p["alpha"]))
    assert strength["alpha"] == kept["alpha"]
    # the registered model is the kept interpolation: the guard measured exactly its LM
    assert guard["ppl_general_after"] == pytest.approx(kept["ppl_general"], rel=1e-5)
    assert f"fine-tuning strength alpha {kept['alpha']:g} kept on validation" in guard_sentence(guard)
    assert "(kept)" in strength_table(strength) and "validation NDCG@10" in strength_table(strength)


@pytest.mark.integration
def test_a_bound_the_fine_tuned_lm_breaks_keeps_an_alpha_within_it(scanned, tmp_path):
    cfg, out = scanned
    curve = out["guard"]["strength"]["curve"]
    rise = curve[-1]["ppl_general"] / curve[0]["ppl_general"] - 1.0  # the fine-tuned LM's rise (> 0, above)
    tight = replace(cfg, **{"guard.max_ppl_increase": rise / 2})
    prepared = f"{cfg.storage.root}/runs/run_date={RUN_DATE}/prepared"
    res = choose_strength(tight, f"{prepared}/items.parquet", f"{prepared}/users",
                          out["guard"]["strength"]["tuned_checkpoint"], str(tmp_path / "run"))
    kept = [p for p in res["curve"] if p["alpha"] == res["alpha"]][0]
    assert res["alpha"] < 1.0 and kept["within_bound"]
    assert kept["ppl_general"] / kept["ppl_general_base"] - 1.0 <= rise / 2
    assert not [p for p in res["curve"] if p["alpha"] == 1.0][0]["within_bound"]
    better = [p for p in res["curve"] if p["within_bound"] and p["val_ndcg10"] > kept["val_ndcg10"]]
    assert not better
    # the scan ran each alpha's top block on the lower block's cached output: a full forward gives the same
    full = choose_strength(replace(tight, **{"model.item_tower.train_top_layers": 0}), f"{prepared}/items.parquet",
                           f"{prepared}/users", out["guard"]["strength"]["tuned_checkpoint"], str(tmp_path / "full"))
    assert [p["val_ndcg10"] for p in full["curve"]] == pytest.approx([p["val_ndcg10"] for p in res["curve"]], abs=1e-6)
    # the written checkpoint holds that interpolation: its LM's perplexity is the kept point's
    model, _ = load_checkpoint(res["checkpoint"])
    general, held, _ = guard_inputs(tight, f"{prepared}/items.parquet")
    again = measure_tower(tight.guard, model.item_tower.lm(), general, held)
    assert again["ppl_general"] == pytest.approx(kept["ppl_general"], rel=1e-5)


@pytest.mark.integration
def test_top_layer_training_left_the_lower_block_and_embeddings_as_pretrained(scanned, tiny_pretrained_lm):
    from transformers import AutoModelForCausalLM

    _, out = scanned
    tuned, _ = load_checkpoint(out["guard"]["strength"]["tuned_checkpoint"])
    base = AutoModelForCausalLM.from_pretrained(tiny_pretrained_lm).transformer
    body = tuned.item_tower.backbone
    for name in ("wte", "wpe", "h.0"):
        a, b = body.get_submodule(name).state_dict(), base.get_submodule(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    changed = [k for k, v in body.h[1].state_dict().items() if not torch.equal(v, base.h[1].state_dict()[k])]
    assert changed  # the top block was fine-tuned
