"""The Ray prepare stage (vectorised, hash buckets) against the previous per-user implementation on the
same validated rows: same histories, training examples, quarantine rows and counts, train counts."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recsys_core import storage
from recsys_core.config import load_config
from recsys_core.data.prepare import PreparedPaths, _good, run_prepare, validate_batch
from recsys_core.data.sources import SourceData
from tests.conftest import REPO
from tests.prepare_reference import (
    reference_duplicates,
    reference_examples,
    reference_histories,
    reference_train_counts,
)

pytestmark = pytest.mark.integration
T0 = 1_790_000_000
ITEM_IDS = [10, 11, 12, 13, 14, 15]


def _log(tmp_path) -> SourceData:
    """Two days of string-typed events: 300 users of very uneven activity, ties, exact duplicates and a
    few rows of every invalid kind."""
    rng = np.random.default_rng(7)
    n = 4000
    users = [f"u{u}" for u in rng.zipf(1.4, n) % 300]
    items = rng.choice(ITEM_IDS, n)
    ts = [str(T0 + int(t)) for t in rng.integers(0, 40, n)]
    rows = list(zip(users, items.tolist(), ts))
    rows += [(None, 10, str(T0)), ("u1", None, str(T0)), ("u2", 10, "not-a-time"), ("u3", 99, str(T0))]
    rows += rows[:50]  # more exact repeats
    rng.shuffle(rows)
    for day, part in (("2026-11-26", rows[: len(rows) // 2]), ("2026-11-27", rows[len(rows) // 2:])):
        d = tmp_path / "inter" / f"dt={day}"
        d.mkdir(parents=True)
        u, i, t = zip(*part)
        pq.write_table(pa.table({"uid": pa.array(u, pa.string()), "movie": pa.array(i, pa.int64()),
                                 "when": pa.array(t, pa.string())}), d / "part-0.parquet")
    pq.write_table(pa.table({"movie": pa.array(ITEM_IDS, pa.int64()), "title": [f"T{i}" for i in ITEM_IDS]}),
                   tmp_path / "items.parquet")
    return SourceData(str(tmp_path / "inter"), str(tmp_path / "items.parquet"), "test")


def test_vectorised_prepare_matches_the_per_user_reference(ray_local, tmp_path):
    src = _log(tmp_path)
    cfg = load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [
        f"storage.root={tmp_path / 'store'}", "data.source=parquet", "data.columns.user_id=uid",
        "data.columns.item_id=movie", "data.columns.ts=when", "data.item_template={title}", "prepare.max_history=12",
        "model.max_seq_len=4", "prepare.bucket_rows=500", "prepare.max_reject_fraction=0.5"])
    out = PreparedPaths(str(tmp_path / "prepared"))
    stats = run_prepare(cfg, src, out)

    # The reference, in one process: the same validation, then one build_user call per user.
    table = pq.read_table(src.interactions).select(["uid", "movie", "when"])
    catalog = pa.array([str(i) for i in ITEM_IDS])
    validated = validate_batch(table, {"user_id": "uid", "item_id": "movie", "ts": "when"}, catalog)
    good = _good(validated, n_buckets=1)
    hist = reference_histories(good, max_history=12)
    kept = hist.filter(pc.greater_equal(pc.list_value_length(hist["items"]), 3))

    users = storage.read_table(out.users)
    assert users.num_rows == stats["users_kept"] == kept.num_rows > 100
    key = lambda r: r["user_id"]
    assert sorted(users.select(["user_id", "items", "ts"]).to_pylist(), key=key) == sorted(
        kept.select(["user_id", "items", "ts"]).to_pylist(), key=key)
    assert stats["users_seen"] == hist.num_rows

    ex = storage.read_table(out.train_examples)
    want = reference_examples(kept, 4)
    as_pairs = lambda t: Counter(zip(map(tuple, t["input"].to_pylist()), map(tuple, t["target"].to_pylist())))
    assert ex.num_rows == stats["train_examples"] == want.num_rows
    assert as_pairs(ex) == as_pairs(want)

    dups = reference_duplicates(hist, catalog)
    want_reasons = Counter(r for r in validated["reason"].to_pylist() if r) + Counter(dups["reason"].to_pylist())
    assert {k: v for k, v in stats["rejected_by_reason"].items() if v} == dict(want_reasons)
    assert want_reasons["duplicate"] >= 50 and want_reasons["unknown_item"] == 1
    q = storage.read_table(out.quarantine)
    row = lambda r: (r["user_id"], r["item_id"], r["ts"], r["reason"])
    want_q = [r for r in validated.to_pylist() if r["reason"]]
    assert Counter(map(row, q.to_pylist())) == Counter(
        [(r["user_id"], r["raw_item_id"], r["raw_ts"], r["reason"]) for r in want_q] + list(map(row, dups.to_pylist())))

    counts = storage.read_table(out.items)["train_count"].to_numpy()
    np.testing.assert_array_equal(counts, reference_train_counts(kept, len(ITEM_IDS)))
    assert stats["train_interactions"] == int(counts.sum())
