"""The vectorised history build (one call per block) against the per-user reference implementation."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from recsys_core.data.prepare import (
    _block_facts,
    _duplicates,
    _examples,
    _kept,
    _train_counts,
    build_histories,
    user_bucket,
)
from recsys_core.data.split import (
    train_lengths,
    training_window_bounds,
    training_windows,
)
from tests.prepare_reference import (
    reference_duplicates,
    reference_examples,
    reference_histories,
    reference_train_counts,
)

pytestmark = pytest.mark.unit


def _events(users, items, ts) -> pa.Table:
    return pa.table({"user_id": pa.array(users, pa.string()), "item_idx": pa.array(items, pa.int32()),
                     "ts": pa.array(ts, pa.int64())})


def _random_events(seed: int, n: int = 3000, n_users: int = 120, n_items: int = 8, n_ts: int = 15) -> pa.Table:
    """Few items and timestamps: many ties and exact duplicates; user activity from 1 to ~100 events."""
    rng = np.random.default_rng(seed)
    users = rng.zipf(1.5, n) % n_users
    return _events([f"user-{u}" for u in users], rng.integers(0, n_items, n), rng.integers(0, n_ts, n))


def _rows(t: pa.Table) -> list[dict]:
    return sorted(t.to_pylist(), key=lambda r: r["user_id"])


def test_build_histories_hand_case_three_users_in_one_block():
    # user b: (item, ts) (5,20) (2,10) (7,10) (2,10) (1,30) (3,5) -> 3 2 [2 dup] 7 5 1, last 3 kept
    # user a: 2 at ts 10 three times and once at 40 -> [2, 2], two duplicates at ts 10
    # user c: a single event
    t = _events(["b", "a", "b", "b", "a", "c", "b", "a", "b", "b", "a"],
                [5, 2, 2, 7, 2, 4, 2, 2, 1, 3, 2],
                [20, 10, 10, 10, 40, 0, 10, 10, 30, 5, 10])
    assert build_histories(t, max_history=3).to_pylist() == [
        {"user_id": "a", "items": [2, 2], "ts": [10, 40], "dup_items": [2, 2], "dup_ts": [10, 10]},
        {"user_id": "b", "items": [7, 5, 1], "ts": [10, 20, 30], "dup_items": [2], "dup_ts": [10]},
        {"user_id": "c", "items": [4], "ts": [0], "dup_items": [], "dup_ts": []},
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_history", [1, 3, 1000])
def test_build_histories_equals_build_user_per_user(seed, max_history):
    t = _random_events(seed)
    got = build_histories(t, max_history)
    assert got.schema == reference_histories(t.slice(0, 5), max_history).schema
    assert _rows(got) == _rows(reference_histories(t, max_history))
    # a user's events spread over chunks and a sliced table give the same result
    chunked = pa.concat_tables([t.slice(0, 1000), t.slice(1000)])
    assert _rows(build_histories(chunked, max_history)) == _rows(got)


@pytest.mark.parametrize("seq_len", [1, 2, 3, 5, 50])
def test_examples_equal_the_per_history_windows(seq_len):
    hist = reference_histories(_random_events(3), max_history=1000).slice(7)  # a sliced list column
    got, want = _examples(hist, seq_len), reference_examples(hist, seq_len)
    assert got.num_rows == want.num_rows > 0
    assert got.to_pylist() == want.to_pylist()  # same windows, same order (users, then newest first)


def test_full_examples_cover_the_held_out_events_by_hand():
    # leave-one-out, seq_len 2: user a has 1 2 3 4 5 (train part 1 2 3), user b 6 7 8 (train part 6)
    hist = pa.table({"user_id": ["a", "b"], "items": pa.array([[1, 2, 3, 4, 5], [6, 7, 8]], pa.list_(pa.int32()))})
    assert _examples(hist, 2).to_pylist() == [{"input": [1, 2], "target": [2, 3]}]  # b: one training event
    assert _examples(hist, 2, full=True).to_pylist() == [
        {"input": [3, 4], "target": [4, 5]}, {"input": [1, 2], "target": [2, 3]},  # a, newest window first
        {"input": [6, 7], "target": [7, 8]}]
    facts = _block_facts(hist.append_column("ts", pa.array([[1, 2, 3, 4, 5], [1, 2, 3]], pa.list_(pa.int64())))
                         .append_column("val_pos", pa.array([3, 1], pa.int32()))
                         .append_column("test_pos", pa.array([4, 2], pa.int32())), 9)
    assert facts["train_count"][0].as_py() == [0, 1, 1, 1, 0, 0, 1, 0, 0]
    assert facts["event_count"][0].as_py() == [0, 1, 1, 1, 1, 1, 1, 1, 1]


def test_train_counts_duplicates_and_kept_equal_the_reference():
    hist = reference_histories(_random_events(4), max_history=1000)
    c = _train_counts(hist)
    counts = np.zeros(8, dtype=np.int64)
    np.add.at(counts, c["item_idx"].to_numpy(), c["count"].to_numpy())
    np.testing.assert_array_equal(counts, reference_train_counts(hist, 8))
    catalog = pa.array([f"id{i}" for i in range(8)])
    assert _duplicates(hist, catalog).to_pylist() == reference_duplicates(hist, catalog).to_pylist()
    kept = _kept(hist, 3)
    assert kept.column_names == ["user_id", "items", "ts"]
    assert kept["user_id"].to_pylist() == [r["user_id"] for r in hist.to_pylist() if len(r["items"]) >= 3]


def test_window_bounds_by_hand_and_against_training_windows():
    # 8 items, seq_len 3 (test_split's hand case): windows [4, 8), [1, 5), [0, 2); 1 item: none; 2 items: [0, 2)
    owner, start, end = training_window_bounds(np.array([8, 1, 2]), 3)
    assert owner.tolist() == [0, 0, 0, 2] and start.tolist() == [4, 1, 0, 0] and end.tolist() == [8, 5, 2, 2]
    for seq_len in (1, 2, 3, 5):
        n = np.arange(0, 14)
        owner, start, end = training_window_bounds(n, seq_len)
        for u in n:
            items = np.arange(u) + 100
            want = [(x.tolist(), y.tolist()) for x, y in training_windows(items, seq_len)]
            got = [(items[s:e - 1].tolist(), items[s + 1:e].tolist()) for s, e in zip(start[owner == u], end[owner == u])]
            assert got == want
    assert train_lengths(np.array([0, 1, 2, 3, 10])).tolist() == [0, 0, 0, 1, 8]


def _bucket_by_hand(s: str, p: int) -> int:
    m = 2 ** 64
    h = sum((b + 1) * pow(1_000_003, k + 1, m) for k, b in enumerate(s.encode())) % m if s else 0
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, None):
        h ^= h >> 33
        if mult:
            h = h * mult % m
    return h % p


def test_user_bucket_matches_the_formula_and_ignores_chunking():
    ids = ["u1", "", "user-123456", "é", "42", "u1"]
    got = user_bucket(pa.array(ids), 7)
    assert got.tolist() == [_bucket_by_hand(s, 7) for s in ids]
    assert got[0] == got[5]
    chunked = pa.chunked_array([pa.array(ids[:2]), pa.array(ids[2:])])
    assert user_bucket(chunked, 7).tolist() == got.tolist()
    assert user_bucket(pa.array(ids).slice(2), 7).tolist() == got[2:].tolist()
    spread = np.bincount(user_bucket(pa.array([str(i) for i in range(20_000)]), 8), minlength=8)
    assert spread.min() > 2_000  # about 2,500 each: numeric ids spread over every bucket
