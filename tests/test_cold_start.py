"""Cold start: items absent from training are scored from their text alone and still found."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import jobs.nightly
from recsys_core import storage
from recsys_core.config import SyntheticConfig, load_config
from recsys_core.data.sources import synthetic_tables
from tests.conftest import REPO

# Marked slow: about 2 minutes on 2 cores. The default run stayed over its 30-minute budget on a 2-core Intel
# Xeon (pytest 29:28, 32:02 with the install); `make test-all` runs it. Items first seen after a split are also
# covered by the split and baseline unit tests.
pytestmark = [pytest.mark.integration, pytest.mark.slow]
N_TOPICS = 6


def cold_start_data(folder) -> tuple[str, str, set[int]]:
    """Synthetic logs where 12 items never occur before a user's last event; 150 users end on one
    from their favourite topic (item topic = item_id % n_topics, revealed by the item's title)."""
    inter, items = synthetic_tables(SyntheticConfig(n_users=400, n_items=120, n_topics=N_TOPICS, seed=1))
    cold = set(range(12))  # 12 items, 2 per topic
    u, i, t = (inter[c].to_numpy() for c in ("user_id", "item_id", "ts"))
    keep = ~np.isin(i, list(cold))
    users, items_, ts = list(u[keep]), list(i[keep]), list(t[keep])
    rng = np.random.default_rng(0)
    for user in range(150):
        own = i[keep & (u == user)]
        fav = np.bincount(own % N_TOPICS, minlength=N_TOPICS).argmax()
        users.append(user)
        items_.append(int(rng.choice([c for c in cold if c % N_TOPICS == fav])))
        ts.append(int(t[u == user].max()) + 1000)
    table = pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items_, pa.int64()),
                      "ts": pa.array(ts, pa.int64())})
    storage.write_table(table, storage.join(str(folder), "inter", "part-0.parquet"))
    storage.write_table(items, storage.join(str(folder), "items.parquet"))
    return str(folder / "inter"), str(folder / "items.parquet"), cold


def test_cold_items_are_recommended_from_text(ray_local, tmp_path):
    inter, items, cold = cold_start_data(tmp_path)
    cfg = load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [
        f"storage.root={tmp_path / 'store'}", "data.source=parquet", f"data.interactions={inter}",
        f"data.items={items}", "eval.baselines=[popularity]"])
    out = jobs.nightly.main(cfg=cfg, run_date="2026-11-27")
    cs = out["evaluate"]["metrics"]["cold_start"]
    assert cs["users"] == 150
    pop = cs["baselines"]["popularity"]
    assert pop["recall@10"] == 0.0  # never-seen items have no popularity

    # Only the cold items are ranked: "never-trained items first" is then no help, and what is left is
    # whether the text tower tells the user's topic among 12 cold items (2 per topic). The model's order
    # of the cold items is their order in its holdout top-50 (absent ones last); the trivial heuristic,
    # computed here on the same users, is a random order of the cold items.
    recs = storage.read_table(storage.join(out["evaluate"]["eval_dir"], "holdout_recs.parquet")).to_pylist()
    targets = {str(r["user_id"]): str(r["item_id"]) for r in cold_targets(inter)}  # ids compared as text
    rng = np.random.default_rng(0)
    hits_model, hits_random = [], []
    for r in recs:
        target = targets.get(str(r["user_id"]))
        if target is None:
            continue
        cold_ids = [str(c) for c in sorted(cold)]
        ranked = [str(i) for i in r["item_ids"] if str(i) in cold_ids]
        ranked += [c for c in cold_ids if c not in ranked]
        hits_model.append(target in ranked[:2])
        hits_random.append(target in list(rng.permutation(cold_ids))[:2])
    assert len(hits_model) == 150
    model_r2, random_r2 = float(np.mean(hits_model)), float(np.mean(hits_random))  # random: about 2/12
    assert model_r2 >= random_r2 + 0.25, (model_r2, random_r2)


def cold_targets(inter_folder: str) -> list[dict]:
    """Each user's last event (the test item) when it is a cold item."""
    t = storage.read_table(inter_folder).to_pylist()
    last: dict[int, dict] = {}
    for row in t:
        if row["user_id"] not in last or row["ts"] > last[row["user_id"]]["ts"]:
            last[row["user_id"]] = row
    return [r for r in last.values() if r["item_id"] < 12]
