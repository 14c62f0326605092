"""Peak memory of the evaluate stage's driver-side reads, on the users a bench_scale nightly prepared.

    python benchmarks/bench_evaluate_memory.py --root /tmp/scale_final --sizes 6500000 20000000 \
        --baseline-code /tmp/evaluate_before --json benchmarks/results/evaluate_memory.json

For each size (``<root>/size_<n>/nightly``: the prepared users and the trained model of
``bench_scale.py --nightly-sizes``) and each piece the evaluate stage runs in its driver, a fresh
process runs the piece with the evaluate stage's arguments (holdout sample of ``--max-users`` users,
``train.val_users`` validation users, the default recency prior) and reports its peak RSS (VmHWM), the
RSS before the piece (imports done) and its wall time. ``--baseline-code`` (a checkout of an earlier
commit) runs the same pieces on that code in the same run, for the before/after comparison.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

PIECES = ("load_split", "validation_popularity", "baseline_targets", "recency_prior")

CHILD = r'''
import json, sys, time
piece, users, model_dir, max_users, val_users = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
import numpy as np
from recsys_core import storage
from recsys_core.config import EvalConfig
from recsys_core.data.split import load_split
from recsys_core.eval.baselines import baseline_per_user, validation_popularity
from recsys_core.eval.holdout import holdout_rows
from recsys_core.eval.recency import recency_prior

def hwm():
    status = open("/proc/self/status").read()
    return {k: int(status.split(k + ":")[1].split()[0]) / 1024 for k in ("VmHWM", "VmRSS")}

n_users = storage.parquet_totals(users)[0]
n_items = len(np.load(model_dir + "/item_embeddings.npy", mmap_mode="r"))
rows = holdout_rows(n_users, max_users, 0)
before = hwm()["VmRSS"]
t = time.perf_counter()
if piece == "load_split":
    out = len(load_split(users, "val", val_users, 0)[0])
elif piece == "validation_popularity":
    out = validation_popularity(users, n_items, val_users, 0)
elif piece == "baseline_targets":
    out = int(baseline_per_user(users, n_items, (), (10, 50), query_rows=rows)[1].sum())
else:
    r = recency_prior(model_dir, model_dir + "/item_embeddings.npy", users, 50, EvalConfig(), 0, rows, len(rows))
    out = {"selected": r["selected"], "queries": r["validation"]["queries"], "test_ndcg@10": r["test"]["ndcg@10"]}
wall = time.perf_counter() - t
print(json.dumps({"peak_mib": hwm()["VmHWM"], "rss_before_mib": before, "wall_s": wall, "users": n_users,
                  "result": out}, default=float))
'''


def run_piece(code: Path, piece: str, users: str, model_dir: str, max_users: int, val_users: int) -> dict[str, Any]:
    env = {**os.environ, **benchlib.BENCH_ENV, "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, "-c", CHILD, piece, users, model_dir, str(max_users), str(val_users)],
                         env=env, cwd=str(code), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{piece} on {users} ({code}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def nightly_dirs(root: Path, size: int) -> tuple[str, str]:
    base = root / f"size_{size}" / "nightly"
    users = sorted(glob.glob(str(base / "runs" / "run_date=*" / "prepared" / "users")))
    models = sorted(p for p in glob.glob(str(base / "models" / "*")) if Path(p, "item_embeddings.npy").exists())
    if not users or not models:
        raise SystemExit(f"{base}: no prepared users or trained model (run bench_scale.py --nightly-sizes {size})")
    return users[-1], models[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="bench_scale.py's --root")
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    p.add_argument("--max-users", type=int, default=20_000, help="the holdout sample (bench_scale: eval.max_users)")
    p.add_argument("--val-users", type=int, default=2_000, help="train.val_users")
    p.add_argument("--baseline-code", type=Path, help="a checkout of the earlier code, run in the same pass")
    p.add_argument("--json")
    a = p.parse_args()
    benchlib.setup_env()
    codes = {"now": benchlib.REPO, **({"before": a.baseline_code} if a.baseline_code else {})}
    t0, load_before = time.time(), benchlib.load()
    runs: list[dict[str, Any]] = []
    for size in a.sizes:
        users, model_dir = nightly_dirs(a.root, size)
        for piece in PIECES:
            for name, code in codes.items():
                r = run_piece(code, piece, users, model_dir, a.max_users, a.val_users)
                runs.append({"events": size, "piece": piece, "code": name, **r})
                print(f"{size:>11,} {piece:<22} {name:<6} peak {r['peak_mib']:7.0f} MiB  "
                      f"(before the piece {r['rss_before_mib']:5.0f})  {r['wall_s']:6.1f} s", flush=True)
    growth = {}
    if len(a.sizes) >= 2:
        lo, hi = min(a.sizes), max(a.sizes)
        for name in codes:
            for piece in PIECES:
                pk = {r["events"]: r["peak_mib"] for r in runs if r["code"] == name and r["piece"] == piece}
                growth[f"{name}/{piece}"] = pk[hi] / pk[lo]
    rows = [[r["events"], r["piece"], r["code"], r["peak_mib"], r["rss_before_mib"], r["wall_s"]] for r in runs]
    print(benchlib.table(f"Evaluate's driver-side pieces, peak RSS (VmHWM) per fresh process (load {load_before})",
                         ["events", "piece", "code", "peak MiB", "RSS before the piece MiB", "wall s"], rows))
    benchlib.write_json(a.json, {"cpu_model": benchlib.cpu_model(),
                                 "cores": os.cpu_count(), "load_before": load_before, "load_after": benchlib.load(),
                                 "wall_s": time.time() - t0, "sizes": a.sizes, "max_users": a.max_users,
                                 "val_users": a.val_users, "codes": {k: str(v) for k, v in codes.items()},
                                 "runs": runs, "peak_growth": growth})


if __name__ == "__main__":
    main()
