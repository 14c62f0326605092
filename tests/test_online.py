"""The online proxy's pure parts on hand-computed values (no Ray)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from recsys_core import storage
from recsys_core.eval import online
from recsys_core.ops import report

L3 = 1 / math.log2(3)  # discount of rank 1 (0-based)


@pytest.mark.unit
def test_per_user_online_hand_values():
    lists = [[10, 11, 12], [20, 21, 22]]
    events = [{11, 30}, {99}]
    pu = online.per_user_online(lists, events, k=3)
    # u1: item 11 at rank 1 -> hit 1, recall 1/2, NDCG = (1/log2 3) / (1 + 1/log2 3); u2: a miss
    np.testing.assert_allclose(pu["hit_rate@3"], [1, 0])
    np.testing.assert_allclose(pu["recall@3"], [0.5, 0])
    np.testing.assert_allclose(pu["ndcg@3"], [L3 / (1 + L3), 0])
    # k=1 keeps only the first item: u1's 10 is not among {11, 30}
    np.testing.assert_allclose(online.per_user_online(lists, events, k=1)["hit_rate@1"], [0, 0])
    # every new item at the top: NDCG 1; more new items than k: the ideal has k hits
    full = online.per_user_online([[1, 2], [1, 2]], [{1, 2}, {1, 2, 3}], k=2)
    np.testing.assert_allclose(full["ndcg@2"], [1, 1])
    np.testing.assert_allclose(full["recall@2"], [1, 2 / 3])


@pytest.mark.unit
def test_events_since_and_score_published():
    users = pa.table({"user_id": pa.array([1, 2, 3, 4], pa.int64()),
                      "items": [[0, 1, 2], [2, 0], [1], [3, 3]], "ts": [[5, 10, 11], [3, 12], [4], [20, 30]]})
    item_ids = pa.array([100, 101, 102, 103], pa.int64())
    ev = online.events_since(users, item_ids, since_ts=10)
    assert ev == {1: {102}, 2: {100}, 4: {103}}  # user 3 was not active since; ts 10 is not after 10
    chunked = pa.concat_tables([users.slice(0, 1), users.slice(1)])  # rows counted across chunks
    assert online.events_since(chunked, item_ids, since_ts=10) == ev
    recs = pa.table({"user_id": pa.array([1, 2, 3], pa.int64()),
                     "item_ids": pa.array([[102, 103], [101, 103], [100, 101]], pa.list_(pa.int64()))})
    out = online.score_published(recs, ev, k=2, n_boot=20)
    # user 1 hits at rank 0 (NDCG 1), user 2 misses; user 4 is active but had no list (coverage 2/3)
    assert out["n_users"] == 2 and out["users_active"] == 3 and out["coverage"] == pytest.approx(2 / 3)
    assert out["hit_rate@2"] == pytest.approx(0.5) and out["recall@2"] == pytest.approx(0.5)
    assert out["ndcg@2"] == pytest.approx(0.5)
    assert out["ndcg@2_ci_low"] <= 0.5 <= out["ndcg@2_ci_high"]


@pytest.mark.unit
def test_previous_published_date_and_history_columns(tmp_path):
    root = str(tmp_path)
    for d in ("2026-12-01", "2026-12-03"):
        storage.write_json(storage.join(root, "recommendations", f"run_date={d}", "_MANIFEST.json"), {"files": []})
    storage.write_table(pa.table({"x": [1]}), storage.join(root, "recommendations", "run_date=2026-12-02", "p.parquet"))
    assert online.previous_published(root, "2026-12-01") is None
    assert online.previous_published(root, "2026-12-03") == "2026-12-01"  # 12-02 never published
    assert online.previous_published(root, "2026-12-04") == "2026-12-03"
    cols = report.online_columns({"from_run_date": "2026-12-01", "model_version": "v", "since_ts": 5, "k": 10,
                                  "hit_rate@10": 0.2, "hit_rate@10_ci_low": 0.1, "n_users": 7})
    assert cols == {"online_hit_rate@10": 0.2, "online_n_users": 7, "online_from_run_date": "2026-12-01",
                    "online_model_version": "v"}
    assert report.online_columns(None) == {}


@pytest.mark.unit
def test_history_row_carries_the_protocol_and_the_online_proxy():
    from tests.test_registry import fake_records

    recs = fake_records(promote=True)
    row = report.history_row("2026-01-02", recs)
    assert row["protocol"] == "loo" and "online_hit_rate@10" not in row  # nothing published before
    recs["evaluate"]["metrics"].update(protocol={"protocol": "temporal", "cutoff": 5},
                                       online={"from_run_date": "2026-01-01", "model_version": "v1", "k": 10,
                                               "hit_rate@10": 0.25, "ndcg@10": 0.1, "n_users": 4, "users_active": 5})
    row = report.history_row("2026-01-02", recs)
    assert row["protocol"] == "temporal" and row["online_hit_rate@10"] == 0.25 and row["online_users_active"] == 5
    page = report.render("2026-01-02", recs, [row])
    assert 'id="online"' in page and "published on 2026-01-01" in page and "4 of 5 active" in page
