"""The fine-tuning strength, chosen after training (WiSE-FT, Wortsman et al., CVPR 2022).

The item tower's language model is interpolated between its starting weights and the fine-tuned ones,
``theta(alpha) = theta_base + alpha * (theta_tuned - theta_base)``: alpha 0 is the base LM (with the rest
of the model as trained), alpha 1 the fine-tuned LM. Every alpha of ``guard.alphas`` is measured on
general-English perplexity (the guard's held-out text) and validation NDCG@10 (the training loop's
validation users). The kept alpha has the best validation NDCG@10 among those whose perplexity rise stays
within ``guard.max_ppl_increase``; alpha 0 always qualifies, its LM being the base. The refit on every event
(``train.refit``) has no validation of its own: it takes the alpha chosen on the selection model.

- :func:`interpolate` and :func:`choose_alpha`: pure, tested on hand-computed values.
- :func:`choose_strength`: the train stage's driver-side scan; the kept weights become the checkpoint.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from recsys_core import storage
from recsys_core.config import NightlyConfig
from recsys_core.data.split import load_split
from recsys_core.eval.holdout import evaluate_histories
from recsys_core.model.checkpoint import copy_model_folder, load_checkpoint, save_model_folder
from recsys_core.model.towers import TwoTower, build_two_tower
from recsys_core.train.guard import ENFORCE, guard_inputs, measure_tower
from recsys_core.train.objective import ItemTensors

log = logging.getLogger(__name__)

LM_MODULES = ("backbone", "lm_head")  # the item tower's language model: body and (untied) head


def interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """``base + alpha * (tuned - base)`` for every floating tensor of ``tuned`` (others, such as integer
    buffers, are ``tuned``'s); the keys of both must match."""
    if base.keys() != tuned.keys():
        raise ValueError(f"interpolating state dicts with different keys: {sorted(base.keys() ^ tuned.keys())[:5]}")
    return {k: (base[k] + alpha * (v - base[k])).to(v.dtype) if v.is_floating_point() else v
            for k, v in tuned.items()}


def within(point: dict[str, Any], max_increase: float) -> bool:
    """Whether a scanned point's general-English perplexity rose by at most ``max_increase``."""
    return point["ppl_general"] / point["ppl_general_base"] - 1.0 <= max_increase


def choose_alpha(curve: Sequence[dict[str, Any]], max_increase: float) -> dict[str, Any]:
    """The point (``alpha``, ``ppl_general``, ``ppl_general_base``, ``val_ndcg10``) with the best validation
    NDCG@10 among those within the perplexity bound; a tie goes to the smaller alpha (less drift)."""
    ok = [p for p in curve if within(p, max_increase)]
    if not ok:
        raise ValueError(f"no alpha keeps the perplexity rise within {max_increase:+.1%} "
                         f"(scanned {[p['alpha'] for p in curve]}; alpha 0, the base LM, always does)")
    return max(ok, key=lambda p: (p["val_ndcg10"], -p["alpha"]))


def applies(cfg: NightlyConfig) -> bool:
    """The scan runs for a fine-tuned (not frozen) item LM whose guard is enforced, with alphas to scan."""
    tower = cfg.model.item_tower
    return (not tower.frozen and bool(cfg.guard.alphas)
            and ENFORCE[cfg.guard.enforce](bool(tower.pretrained)))


def lm_state(model: TwoTower) -> dict[str, torch.Tensor]:
    """The item tower's LM weights (body and untied head), keyed by module name."""
    tower = model.item_tower
    return {f"{m}.{k}": v.detach().clone() for m in LM_MODULES if getattr(tower, m) is not None
            for k, v in getattr(tower, m).state_dict().items()}


def load_lm_state(model: TwoTower, state: dict[str, torch.Tensor]) -> None:
    tower = model.item_tower
    for m in LM_MODULES:
        if getattr(tower, m) is not None:
            getattr(tower, m).load_state_dict({k[len(m) + 1:]: v for k, v in state.items() if k.startswith(m + ".")})


def choose_strength(cfg: NightlyConfig, items_uri: str, users_uri: str, checkpoint: str, run_dir: str,
                    alpha: float | None = None) -> dict[str, Any]:
    """Scan ``guard.alphas`` on the fine-tuned ``checkpoint`` (``alpha`` given: only that one, the refit's
    case, with no validation) and keep the chosen interpolation. Returns the curve, the chosen alpha and
    the checkpoint to register (``checkpoint`` itself when alpha is 1)."""
    g, t0 = cfg.guard, time.time()
    tuned, meta = load_checkpoint(checkpoint)
    torch.manual_seed(cfg.train.seed)  # the workers' starting weights (the guard's "before")
    n_items = tuned.n_items
    base = lm_state(build_two_tower(cfg.model, n_items))
    tuned_lm = lm_state(tuned)
    general, held_texts, _ = guard_inputs(cfg, items_uri)
    val = None
    if alpha is None:
        items = ItemTensors.load(items_uri, "train_count")
        val = load_split(users_uri, "val", cfg.train.val_users, cfg.train.seed)
        if cfg.model.item_tower.train_top_layers:
            # only the top blocks differ between alphas (the blocks below and the embeddings stayed as
            # pretrained): their input for every item text is computed once, each alpha runs the top blocks
            tuned.item_tower.train_top_layers(cfg.model.item_tower.train_top_layers)
            tuned.item_tower.cache_lower(items.tokens, items.mask)
    curve = []
    for a in ([alpha] if alpha is not None else sorted(set(g.alphas) | {0.0})):
        load_lm_state(tuned, interpolate(base, tuned_lm, float(a)))
        ppl = measure_tower(g, tuned.item_tower.lm(), general, held_texts)
        point = {"alpha": float(a), **ppl}
        if val is not None:
            vm = evaluate_histories(tuned, items.tokens, items.mask, val[0], val[1], cfg.model.max_seq_len)
            point.update(val_ndcg10=vm["ndcg@10"], val_recall10=vm["recall@10"])
        curve.append(point)
        log.info("strength alpha %.2f: general-English perplexity %.2f%s", a, ppl["ppl_general"],
                 f", validation NDCG@10 {point['val_ndcg10']:.4f}" if val is not None else "")
    if alpha is None:
        for p in curve:
            p["ppl_general_base"] = curve[0]["ppl_general"]  # alpha 0 (always scanned, first): the base LM
            p["within_bound"] = within(p, g.max_ppl_increase)
        kept = choose_alpha(curve, g.max_ppl_increase)
        how = (f"best validation NDCG@10 ({kept['val_ndcg10']:.4f}) among the alphas within the perplexity "
               f"bound {g.max_ppl_increase:+.1%}")
    else:
        kept, how = curve[0], "the alpha chosen on the selection model's validation (the refit has none)"
    chosen = kept["alpha"]
    out = checkpoint
    if chosen != 1.0:
        load_lm_state(tuned, interpolate(base, tuned_lm, chosen))
        key = hashlib.sha256(checkpoint.encode()).hexdigest()[:12]  # one folder per fine-tuned checkpoint
        out = storage.join(run_dir, "strength", f"{key}-alpha={chosen:g}")
        with tempfile.TemporaryDirectory() as d:
            save_model_folder(tuned, d, {**(meta.get("metrics") or {}), "strength_alpha": chosen})
            copy_model_folder(d, out)
    log.info("strength: kept alpha %g (%s)", chosen, how)
    return {"alpha": chosen, "curve": curve, "rule": how, "checkpoint": out, "tuned_checkpoint": checkpoint,
            "max_increase": g.max_ppl_increase, "scan_s": round(time.time() - t0, 1)}
