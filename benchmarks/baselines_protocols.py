"""ML-100k baselines under both protocols (issue 13): leave-one-out and temporal (a global cutoff
``--fraction`` of the time span before the newest event). Everything a grid chooses (the popularity
window, EASE's lambda) is chosen on the validation split. No model training: the baselines a model
must beat, with bootstrap 95% intervals over the test users.

    python benchmarks/baselines_protocols.py [--fraction 0.1] [--out benchmarks/results/baselines_protocols.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_core import storage
from recsys_core.config import EvalConfig
from recsys_core.data.prepare import build_user
from recsys_core.data.sources import movielens_tables
from recsys_core.data.split import MIN_EVENTS, split_columns, temporal_cutoff
from recsys_core.eval.baselines import baseline_options, baseline_per_user
from recsys_core.eval.metrics import summarize_values


def prepared_users(inter: pa.Table, item_ids: pa.Array) -> pa.Table:
    """Prepare's per-user histories (build_user: chronological, ties by item, exact duplicates out)."""
    idx = pc.index_in(inter["item_id"], value_set=item_ids)
    t = pa.table({"user_id": inter["user_id"], "item_idx": pc.cast(idx, pa.int32()), "ts": inter["ts"]})
    t = t.sort_by("user_id")
    users = t["user_id"].to_numpy()
    bounds = np.flatnonzero(np.diff(users)) + 1
    rows = [build_user(t.slice(a, b - a), 1000) for a, b in zip([0, *bounds], [*bounds, t.num_rows])]
    out = pa.concat_tables(rows).select(["user_id", "items", "ts"])
    return out.filter(pc.greater_equal(pc.list_value_length(out["items"]), MIN_EVENTS))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results/baselines_protocols.json")
    args = ap.parse_args()
    inter, items = movielens_tables()
    item_ids = items.sort_by("item_id")["item_id"].combine_chunks()
    users = prepared_users(inter, item_ids)
    flat = pc.list_flatten(users["ts"])
    ev = EvalConfig()
    results = {"dataset": "MovieLens-100k (recbole 1.2.1 atomic files), every rating an interaction",
               "users": users.num_rows, "items": len(item_ids), "ks": list(ev.ks),
               "cpu": subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.split("Model name:")[-1]
               .splitlines()[0].strip() if platform.system() == "Linux" else platform.processor(),
               "protocols": {}}
    for protocol in ("loo", "temporal"):
        cutoff = (temporal_cutoff(pc.min(flat).as_py(), pc.max(flat).as_py(), args.fraction)
                  if protocol == "temporal" else None)
        table = split_columns(users, protocol, cutoff)
        n_test = int(pc.sum(pc.is_valid(table["test_pos"])).as_py())
        with tempfile.TemporaryDirectory() as d:
            uri = str(Path(d) / "users.parquet")
            storage.write_table(table, uri)
            t0 = time.time()
            per_user, _, chosen = baseline_per_user(uri, len(item_ids), ev.baselines, ev.ks, baseline_options(ev))
            wall = time.time() - t0
        results["protocols"][protocol] = {
            "cutoff": cutoff, "test_users": n_test,
            "val_users": int(pc.sum(pc.is_valid(table["val_pos"])).as_py()),
            "baselines": {b: summarize_values(pu, n_test, args.n_boot) for b, pu in per_user.items()},
            "selection": chosen, "wall_s": round(wall, 1)}
        for b, m in results["protocols"][protocol]["baselines"].items():
            print(f"{protocol:9s} {b:18s} NDCG@10 {m['ndcg@10']:.4f} [{m['ndcg@10_ci_low']:.4f}, "
                  f"{m['ndcg@10_ci_high']:.4f}]  Recall@10 {m['recall@10']:.4f} [{m['recall@10_ci_low']:.4f}, "
                  f"{m['recall@10_ci_high']:.4f}]  ({chosen[b].get('param')})")
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
