"""Model selection on MovieLens-100k, on the validation split only (the test split is never read).

    python benchmarks/ml100k_select.py --json benchmarks/results/ml100k_select.json \
        --candidate tiny-random-init=config:ml100k_tiny \
        --candidate smollm2-frozen-len50=config:ml100k \
        --candidate smollm2-frozen-len200=config:ml100k,model.max_seq_len=200

Each candidate is a shipped config plus dotted overrides. For each, the prepare job and the train job
(Ray Train, DDP, early stopping on validation NDCG@10) run on their own storage root; the row records
the best validation NDCG@10 and Recall@10 (943 validation users: each user's second-to-last event),
the kept epoch, the epochs run and the train stage's wall time, with the CPU model. The shipped default
is the candidate with the best validation NDCG@10; the evaluate stage's test figures are then measured
once, by the nightly, on that choice.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchlib  # noqa: E402
import ray  # noqa: E402

import jobs.prepare  # noqa: E402
import jobs.train  # noqa: E402
from recsys_core.cli import resolve_config  # noqa: E402
from recsys_core.config import load_config  # noqa: E402


def parse_candidate(text: str) -> tuple[str, str, list[str]]:
    """``name=config:NAME[,key=value,...]`` -> (name, config, overrides)."""
    name, rest = text.split("=", 1)
    parts = rest.split(",")
    if not parts[0].startswith("config:"):
        raise SystemExit(f"--candidate {text!r}: the value starts with config:NAME")
    return name, parts[0][len("config:"):], parts[1:]


def run_candidate(name: str, config: str, overrides: list[str], root: Path, run_date: str) -> dict[str, Any]:
    benchlib.share_features(root, name)
    cfg = load_config(resolve_config(config), [*overrides, f"storage.root={root / name}"])
    t0 = time.time()
    prep = jobs.prepare.main(cfg=cfg, run_date=run_date)["prepare"]
    out = jobs.train.main(cfg=cfg, run_date=run_date, force=True)["train"]
    ray.shutdown()
    hist = out["history"]
    best = max(hist, key=lambda h: h["val_ndcg10"])
    return {"name": name, "config": config, "overrides": overrides, "best_val_ndcg10": best["val_ndcg10"],
            "best_val_recall10": best["val_recall10"], "kept_epoch": best["epoch"], "epochs_run": len(hist),
            "train_s": out.get("wall_s"), "prepare_s": prep.get("wall_s"), "wall_s": round(time.time() - t0, 1),
            "val_curve": [round(h["val_ndcg10"], 4) for h in hist]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", action="append", required=True, metavar="NAME=config:CFG[,k=v...]")
    p.add_argument("--root", default="outputs/ml100k-select")
    p.add_argument("--run-date", default="2026-12-01")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    for c in a.candidate:
        name, config, overrides = parse_candidate(c)
        rows.append(run_candidate(name, config, overrides, Path(a.root), a.run_date))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| candidate | val NDCG@10 | val Recall@10 | kept epoch / run | train s |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["best_val_ndcg10"]):
        print(f"| {r['name']} | {r['best_val_ndcg10']:.4f} | {r['best_val_recall10']:.4f} | "
              f"{r['kept_epoch']} / {r['epochs_run']} | {r['train_s'] or 0:.0f} |")
    if a.json:
        out = Path(a.json)
        prev = json.loads(out.read_text()) if out.exists() else {"rows": []}
        keep = [r for r in prev.get("rows", []) if r["name"] not in {x["name"] for x in rows}]
        out.write_text(json.dumps({"cpu": benchlib.cpu_model(), "split": "validation (second-to-last event per user)",
                                   "rows": keep + rows}, indent=2))


if __name__ == "__main__":
    main()
