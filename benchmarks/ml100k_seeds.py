"""Run the shipped ml100k nightly for several seeds and print the holdout table (README "Results").

    python benchmarks/ml100k_seeds.py --seeds 0 1 2 --root /tmp/ml100k-seeds --json seeds.json [--set key=value ...]

Each seed is a full `jobs.nightly` run (prepare, Ray Train DDP, evaluate, publish) on its own
storage root (the first seed's frozen-LM feature cache is copied to the later ones: the same pass); the table shows each seed, the mean and the spread (max - min), and the baselines.
Each row also records the best validation NDCG@10 (the kept epoch's): compare configurations
(``--set train.lr=...``) on that column only; the test columns are read once, for the chosen one.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import benchlib
import numpy as np

import jobs.nightly
from recsys_core import storage
from recsys_core.config import load_config

REPO = Path(__file__).resolve().parents[1]
COLS = ["recall@10", "ndcg@10", "recall@50", "mrr@50"]


def descriptions(explain: dict, prepared: str, n: int = 5) -> dict:
    """The explain stage's outcome and its first ``n`` descriptions beside each user's last five items."""
    out = {"reason": explain.get("reason"), "quality": explain.get("quality"), "examples": []}
    if explain.get("explanations"):
        ex = storage.read_table(explain["explanations"]).to_pylist()[:n]
        users = storage.read_table(storage.join(prepared, "users"), columns=["user_id", "items"]).to_pylist()
        texts = storage.read_table(storage.join(prepared, "items.parquet"), columns=["text"])["text"].to_pylist()
        hist = {u["user_id"]: u["items"] for u in users}
        out["examples"] = [{"user_id": e["user_id"], "last_items": [texts[i] for i in hist[e["user_id"]][-5:]],
                            "description": e["description"]} for e in ex]
    return out


def prior_row(prior: dict | None) -> dict | None:
    """The recency prior's choice and the test figures of model + prior (with their intervals)."""
    if not prior:
        return None
    t = prior["test"]
    return {"selected": prior["selected"], "model_plus_prior": {c: t[c] for c in COLS if c in t},
            "model_plus_prior_ci": {c: [t[f"{c}_ci_low"], t[f"{c}_ci_high"]] for c in COLS if f"{c}_ci_low" in t}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", default="outputs/ml100k-seeds")
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "ml100k.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    for i, seed in enumerate(a.seeds):
        if i:  # later seeds reuse the first one's LM feature cache (same catalog and LM): its pass runs once
            benchlib.share_features(Path(a.root), f"seed{seed}")
        cfg = load_config(a.config, [*a.overrides, f"storage.root={a.root}/seed{seed}", f"train.seed={seed}"])
        t0 = time.time()
        out = jobs.nightly.main(cfg=cfg, run_date="2026-11-27", force=True)
        m = out["evaluate"]["metrics"]
        best = max(out["train"]["history"], key=lambda h: h["val_ndcg10"])
        rows.append({"seed": seed, "overrides": a.overrides, "wall_s": round(time.time() - t0, 1),
                     "kept_epoch": best["epoch"], "best_val_ndcg10": best["val_ndcg10"],
                     "train_s": out["train"]["wall_s"], "epochs": len(out["train"]["history"]),
                     "model": {c: m["model"][c] for c in COLS},
                     "model_ci": {c: [m["model"][f"{c}_ci_low"], m["model"][f"{c}_ci_high"]] for c in COLS
                                  if f"{c}_ci_low" in m["model"]},
                     # the published score: the model + the recency prior chosen on validation (None: prior off)
                     "prior": prior_row(m.get("recency_prior")),
                     "baselines": {b: {c: v[c] for c in COLS} for b, v in m["baselines"].items()},
                     "stage_s": {s: round(r.get("wall_s", 0.0), 1) for s, r in out.items() if isinstance(r, dict)},
                     "guard": {k: out["train"]["guard"].get(k) for k in ("ppl_general_before", "ppl_general_after",
                                                                         "change", "ppl_items_before",
                                                                         "ppl_items_after", "items_change",
                                                                         "message")},
                     "explain": descriptions(out["explain"], out["prepare"]["prepared"])})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| run | val ndcg@10 | {' | '.join(COLS)} | nightly wall |\n|---|---|{'---|' * len(COLS)}---|")
    for r in rows:
        print(f"| seed {r['seed']} | {r['best_val_ndcg10']:.4f} | " + " | ".join(f"{r['model'][c]:.4f}" for c in COLS)
              + f" | {r['wall_s']:.0f} s |")
    vals = {c: np.array([r["model"][c] for r in rows]) for c in COLS}
    print("| mean | " + " | ".join(f"{v.mean():.4f}" for v in vals.values()) + " | |")
    print("| spread (max-min) | " + " | ".join(f"{np.ptp(v):.4f}" for v in vals.values()) + " | |")
    with_prior = [r for r in rows if r["prior"] and r["prior"]["model_plus_prior"]]
    if with_prior:
        for r in with_prior:
            mp = r["prior"]["model_plus_prior"]
            print(f"| seed {r['seed']}, model + prior | | " + " | ".join(f"{mp.get(c, float('nan')):.4f}" for c in COLS)
                  + " | |")
        pv = {c: np.array([r["prior"]["model_plus_prior"].get(c, np.nan) for r in with_prior]) for c in COLS}
        print("| mean, model + prior | | " + " | ".join(f"{v.mean():.4f}" for v in pv.values()) + " | |")
    for b, bm in rows[0]["baselines"].items():
        print(f"| {b} | " + " | ".join(f"{bm[c]:.4f}" for c in COLS) + " | |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
