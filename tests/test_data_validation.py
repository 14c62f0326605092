"""Prepare stage on deliberately broken inputs (real Ray Data): named errors, quarantine counts, good rows kept."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_core import storage
from recsys_core.config import load_config
from recsys_core.data.prepare import DataValidationError, PreparedPaths, run_prepare
from recsys_core.data.sources import SourceData
from tests.conftest import REPO

pytestmark = pytest.mark.integration
T0 = 1_790_000_000


def _items(path):
    pq.write_table(pa.table({"movie": pa.array([10, 11, 12, 13], pa.int64()),
                             "title": ["Alpha", "Beta", "Gamma", "Delta"]}), path)


def _good_rows(n_users: int = 5, per_user: int = 4):
    rows = []
    for u in range(n_users):
        for j in range(per_user):
            rows.append((f"u{u}", 10 + (u + j) % 4, T0 + 100 * u + j))
    return rows


def _write_partitioned(folder, rows_by_day):
    """Hive-partitioned interactions: folder/dt=YYYY-MM-DD/part-0.parquet, columns uid/movie/when."""
    for day, rows in rows_by_day.items():
        d = folder / f"dt={day}"
        d.mkdir(parents=True)
        uid, mid, when = zip(*rows)
        pq.write_table(pa.table({"uid": pa.array(uid, pa.string()), "movie": pa.array(mid, pa.int64()),
                                 "when": pa.array(when, pa.string())}), d / "part-0.parquet")


def _cfg(tmp_path, *over):
    return load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [
        f"storage.root={tmp_path / 'store'}", "data.source=parquet", "data.columns.user_id=uid",
        "data.columns.item_id=movie", "data.columns.ts=when", "data.item_template={title}", *over])


@pytest.fixture
def broken(tmp_path):
    good = _good_rows()
    bad = [
        (None, 10, str(T0)), (None, 11, str(T0 + 1)),  # null_user_id x2
        ("u1", None, str(T0 + 2)),  # null_item_id
        ("u2", 10, "not-a-time"), ("u3", 11, None),  # bad_timestamp x2
        ("u1", 99, str(T0 + 3)), ("u2", 98, str(T0 + 4)), ("u4", 97, str(T0 + 5)),  # unknown_item x3
    ]
    dups = [good[0], good[5]]  # exact repeats of good rows -> duplicate x2
    rows = [(u, i, str(t)) for u, i, t in good] + bad + [(u, i, str(t)) for u, i, t in dups]
    _write_partitioned(tmp_path / "inter", {"2026-11-26": rows[:12], "2026-11-27": rows[12:]})
    _items(tmp_path / "items.parquet")
    return SourceData(str(tmp_path / "inter"), str(tmp_path / "items.parquet"), "test"), len(good), len(rows)


def test_each_bad_case_is_quarantined_by_reason_and_good_rows_survive(ray_local, tmp_path, broken):
    src, n_good, n_rows = broken
    out = PreparedPaths(str(tmp_path / "prepared"))
    stats = run_prepare(_cfg(tmp_path, "prepare.max_reject_fraction=0.9"), src, out)
    assert stats["rows_read"] == n_rows
    assert stats["rejected_by_reason"] == {"null_user_id": 2, "null_item_id": 1, "bad_timestamp": 2,
                                           "unknown_item": 3, "duplicate": 2}
    q = storage.read_table(out.quarantine)
    assert q.num_rows == 10
    assert sorted(q["reason"].to_pylist()).count("unknown_item") == 3
    assert "not-a-time" in q["ts"].to_pylist()
    users = storage.read_table(out.users)
    assert sum(len(s) for s in users["items"].to_pylist()) == n_good  # every good row kept, once
    assert sorted(users["user_id"].to_pylist()) == [f"u{u}" for u in range(5)]
    items = storage.read_table(out.items)
    assert items["item_id"].to_pylist() == [10, 11, 12, 13]


def test_reject_fraction_over_threshold_fails_naming_file_and_counts(ray_local, tmp_path, broken):
    src, _, n_rows = broken
    out = PreparedPaths(str(tmp_path / "prepared"))
    with pytest.raises(DataValidationError) as e:
        run_prepare(_cfg(tmp_path, "prepare.max_reject_fraction=0.05"), src, out)
    msg = str(e.value)
    assert src.interactions in msg and f"10 of {n_rows} rows rejected" in msg and "unknown_item" in msg
    assert storage.read_table(out.quarantine).num_rows == 10  # the rejected rows are kept for inspection


def test_missing_column_names_the_file_and_config_key(ray_local, tmp_path, broken):
    src, _, _ = broken
    with pytest.raises(DataValidationError, match=r"no column 'timestamp' \(config data.columns.ts\)"):
        run_prepare(_cfg(tmp_path, "data.columns.ts=timestamp"), src, PreparedPaths(str(tmp_path / "p")))


def test_unsupported_column_type_is_named(ray_local, tmp_path):
    (tmp_path / "inter").mkdir()
    pq.write_table(pa.table({"uid": ["a"], "movie": [1.5], "when": [T0]}), tmp_path / "inter" / "x.parquet")
    _items(tmp_path / "items.parquet")
    src = SourceData(str(tmp_path / "inter"), str(tmp_path / "items.parquet"), "test")
    with pytest.raises(DataValidationError, match=r"column 'movie' \(config data.columns.item_id\) has type double"):
        run_prepare(_cfg(tmp_path), src, PreparedPaths(str(tmp_path / "p")))


def test_catalog_without_id_column_is_named(ray_local, tmp_path, broken):
    src, _, _ = broken
    pq.write_table(pa.table({"name": ["x"]}), tmp_path / "bad_items.parquet")
    bad = SourceData(src.interactions, str(tmp_path / "bad_items.parquet"), "test")
    with pytest.raises(DataValidationError, match="bad_items.parquet: item catalog has no column 'movie'"):
        run_prepare(_cfg(tmp_path), bad, PreparedPaths(str(tmp_path / "p")))


def test_timestamp_columns_and_tie_rule(ray_local, tmp_path):
    """Real timestamp type; equal timestamps are ordered by item id, so the split is deterministic."""
    ts = pa.array([dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)] * 3 +
                  [dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc)], pa.timestamp("ms", tz="UTC"))
    (tmp_path / "inter").mkdir()
    pq.write_table(pa.table({"uid": ["a"] * 4, "movie": pa.array([13, 11, 12, 10], pa.int64()), "when": ts}),
                   tmp_path / "inter" / "x.parquet")
    _items(tmp_path / "items.parquet")
    src = SourceData(str(tmp_path / "inter"), str(tmp_path / "items.parquet"), "test")
    out = PreparedPaths(str(tmp_path / "prepared"))
    run_prepare(_cfg(tmp_path), src, out)
    users = storage.read_table(out.users)
    # item_idx follows item_id order: 10->0, 11->1, 12->2, 13->3; day-1 ties sorted by id, day 2 last
    assert users["items"].to_pylist() == [[1, 2, 3, 0]]
    ex = storage.read_table(out.train_examples)
    assert ex["input"].to_pylist() == [[1]] and ex["target"].to_pylist() == [[2]]
