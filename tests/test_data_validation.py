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
                                           "ts_out_of_range": 0, "ts_unit_mismatch": 0,
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


# ----------------------------------------------------------------------------- issue 15: timestamps, files, text


def _flat(folder, name, users, items, ts, ts_type=pa.int64(), item_type=pa.int64()):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"uid": pa.array(users, pa.string()), "movie": pa.array(items, item_type),
                             "when": pa.array(ts, ts_type)}), folder / name)


def _src(tmp_path, items=None):
    if items is None:
        _items(tmp_path / "items.parquet")
    return SourceData(str(tmp_path / "inter"), str(items or tmp_path / "items.parquet"), "test")


def _mixed_unit_files(tmp_path):
    """Users u0-u3 with events 100 s apart in seconds (a.parquet) and their later events in milliseconds
    (b.parquet): in true time order each user's items are 10, 11, 12, 13."""
    users = [f"u{u}" for u in range(4)]
    _flat(tmp_path / "inter", "a.parquet", users * 2, [10] * 4 + [11] * 4, [T0] * 4 + [T0 + 100] * 4)
    _flat(tmp_path / "inter", "b.parquet", users * 2, [12] * 4 + [13] * 4,
          [(T0 + 200) * 1000] * 4 + [(T0 + 300) * 1000] * 4)


def test_milliseconds_file_refused_naming_it_when_unit_is_seconds(ray_local, tmp_path):
    _mixed_unit_files(tmp_path)
    with pytest.raises(DataValidationError, match=r"b\.parquet: timestamps look like milliseconds .* "
                                                  r"data\.ts_unit=s; set data\.ts_unit=ms"):
        run_prepare(_cfg(tmp_path), _src(tmp_path), PreparedPaths(str(tmp_path / "p")))


def test_mixed_units_within_one_text_column_refused_naming_the_file(ray_local, tmp_path):
    """Strings carry no footer statistics: the rows are checked one by one, then the file is named."""
    users = [f"u{u}" for u in range(4)]
    ts = [str(T0)] * 4 + [str(T0 + 100)] * 4 + [str((T0 + 200) * 1000)] * 4
    _flat(tmp_path / "inter", "mixed.parquet", users * 3, [10] * 4 + [11] * 4 + [12] * 4, ts, ts_type=pa.string())
    out = PreparedPaths(str(tmp_path / "p"))
    with pytest.raises(DataValidationError, match=r"mixed\.parquet: 4 timestamps are plausible only in another "
                                                  r"unit than data\.ts_unit=s"):
        run_prepare(_cfg(tmp_path, "prepare.max_reject_fraction=0.9"), _src(tmp_path), out)
    q = storage.read_table(out.quarantine)
    assert q["reason"].to_pylist() == ["ts_unit_mismatch"] * 4 and all(f.endswith("mixed.parquet")
                                                                       for f in q["file"].to_pylist())


def test_auto_unit_converts_mixed_files_into_the_true_order(ray_local, tmp_path):
    _mixed_unit_files(tmp_path)
    out = PreparedPaths(str(tmp_path / "p"))
    stats = run_prepare(_cfg(tmp_path, "data.ts_unit=auto"), _src(tmp_path), out)
    users = storage.read_table(out.users)
    assert stats["rows_rejected"] == 0
    assert users["items"].to_pylist() == [[0, 1, 2, 3]] * 4  # item_idx of 10, 11, 12, 13
    assert users["ts"].to_pylist() == [[T0, T0 + 100, T0 + 200, T0 + 300]] * 4


def test_out_of_range_timestamps_quarantined_with_their_own_reason(ray_local, tmp_path):
    """1e30 and 9.3e18 (beyond int64 as seconds) and year 10000 are quarantined, never cast to int64 min
    (which made them each user's first event) or kept as a user's latest (test) item."""
    users = [f"u{u}" for u in range(4)]
    year_10000 = float(dt.datetime(9999, 12, 31, tzinfo=dt.timezone.utc).timestamp() + 86400)
    _flat(tmp_path / "inter", "a.parquet", users * 3 + ["u0", "u1", "u2", "u3"],
          [10] * 4 + [11] * 4 + [12] * 4 + [13] * 4,
          [T0] * 4 + [T0 + 100] * 4 + [T0 + 200] * 4 + [1e30, 9.3e18, year_10000, 631_000_000.0],
          ts_type=pa.float64())  # the last: 1989-12-30, before prepare.min_ts
    out = PreparedPaths(str(tmp_path / "p"))
    stats = run_prepare(_cfg(tmp_path, "prepare.max_reject_fraction=0.5"), _src(tmp_path), out)
    assert stats["rejected_by_reason"]["ts_out_of_range"] == 4
    users = storage.read_table(out.users)
    assert users["items"].to_pylist() == [[0, 1, 2]] * 4  # item 13's implausible events are not in any history
    assert min(min(t) for t in users["ts"].to_pylist()) == T0
    q = storage.read_table(out.quarantine)
    assert sorted(q["ts"].to_pylist()) == sorted(str(v) for v in [1e30, 9.3e18, year_10000, 631_000_000.0])


def test_corrupt_file_among_good_ones_is_named(ray_local, tmp_path):
    _flat(tmp_path / "inter", "a.parquet", ["u0"] * 3, [10, 11, 12], [T0, T0 + 1, T0 + 2])
    (tmp_path / "inter" / "b.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    with pytest.raises(DataValidationError, match=r"b\.parquet: not a readable parquet file"):
        run_prepare(_cfg(tmp_path), _src(tmp_path), PreparedPaths(str(tmp_path / "p")))


def test_empty_interactions_folder_is_named(ray_local, tmp_path):
    (tmp_path / "inter").mkdir()
    with pytest.raises(DataValidationError, match=r"inter: no parquet files \(an empty interactions folder\?\)"):
        run_prepare(_cfg(tmp_path), _src(tmp_path), PreparedPaths(str(tmp_path / "p")))


@pytest.mark.parametrize("name", ["0-empty.parquet", "z-empty.parquet"])
def test_zero_row_null_typed_file_is_skipped_wherever_it_sorts(ray_local, tmp_path, name):
    users = [f"u{u}" for u in range(4)]
    _flat(tmp_path / "inter", "m.parquet", users * 3, [10] * 4 + [11] * 4 + [12] * 4,
          [T0] * 4 + [T0 + 1] * 4 + [T0 + 2] * 4)
    pq.write_table(pa.table({"uid": pa.array([], pa.null()), "movie": pa.array([], pa.null()),
                             "when": pa.array([], pa.null())}), tmp_path / "inter" / name)
    stats = run_prepare(_cfg(tmp_path), _src(tmp_path), PreparedPaths(str(tmp_path / "p")))
    assert stats["rows_read"] == 12 and stats["rows_rejected"] == 0 and stats["users_kept"] == 4


def test_float_item_ids_refused_in_a_later_file(ray_local, tmp_path):
    _flat(tmp_path / "inter", "a.parquet", ["u0"] * 3, [10, 11, 12], [T0, T0 + 1, T0 + 2])
    _flat(tmp_path / "inter", "b.parquet", ["u1"] * 3, [10.0, 11.0, 12.0], [T0, T0 + 1, T0 + 2],
          item_type=pa.float64())
    with pytest.raises(DataValidationError, match=r"b\.parquet: column 'movie' \(config data.columns.item_id\) "
                                                  r"has type double"):
        run_prepare(_cfg(tmp_path), _src(tmp_path), PreparedPaths(str(tmp_path / "p")))


def test_type_conflict_across_files_names_both(ray_local, tmp_path):
    _flat(tmp_path / "inter", "a.parquet", ["u0"] * 3, [10, 11, 12], [T0, T0 + 1, T0 + 2])
    _flat(tmp_path / "inter", "b.parquet", ["u1"] * 3, ["10", "11", "12"], [T0, T0 + 1, T0 + 2],
          item_type=pa.string())
    with pytest.raises(DataValidationError, match=r"b\.parquet: column 'movie' .* has type string, but "
                                                  r".*a\.parquet has int64"):
        run_prepare(_cfg(tmp_path), _src(tmp_path), PreparedPaths(str(tmp_path / "p")))


def _binary_catalog(path, titles):
    pq.write_table(pa.table({"movie": pa.array([10, 11, 12, 13], pa.int64()),
                             "title": pa.array(titles, pa.binary())}), path)


def test_binary_titles_not_valid_utf8_are_named_never_fed_as_repr(ray_local, tmp_path):
    _flat(tmp_path / "inter", "a.parquet", ["u0"] * 3, [10, 11, 12], [T0, T0 + 1, T0 + 2])
    _binary_catalog(tmp_path / "bin_items.parquet", [b"Alpha", b"\xff\xfeBeta", b"Gamma", b"Caf\xe9"])
    with pytest.raises(DataValidationError, match=r"bin_items\.parquet: column 'title' holds bytes that are not "
                                                  r"valid utf-8 in 2 of 4 rows \(first: row 1\)"):
        run_prepare(_cfg(tmp_path), _src(tmp_path, tmp_path / "bin_items.parquet"), PreparedPaths(str(tmp_path / "p")))


def test_binary_titles_decoded_with_the_declared_encoding(ray_local, tmp_path):
    users = [f"u{u}" for u in range(4)]
    _flat(tmp_path / "inter", "m.parquet", users * 3, [10] * 4 + [11] * 4 + [12] * 4,
          [T0] * 4 + [T0 + 1] * 4 + [T0 + 2] * 4)
    _binary_catalog(tmp_path / "bin_items.parquet", [b"Alpha", b"Beta", b"Gamma", b"Caf\xe9"])
    out = PreparedPaths(str(tmp_path / "p"))
    run_prepare(_cfg(tmp_path, "data.text_encoding=latin-1"), _src(tmp_path, tmp_path / "bin_items.parquet"), out)
    assert storage.read_table(out.items)["text"].to_pylist() == ["Alpha", "Beta", "Gamma", "Café"]


def test_prepare_streams_through_an_intermediate_it_removes(ray_local, tmp_path, broken):
    src, _, _ = broken
    out = PreparedPaths(str(tmp_path / "prepared"))
    stats = run_prepare(_cfg(tmp_path, "prepare.max_reject_fraction=0.9"), src, out)
    assert stats["users_seen"] == 5 and stats["users_kept"] == 5
    assert not storage.exists(out.histories)  # the histories written between passes are gone
    with pytest.raises(DataValidationError):  # also when prepare fails after writing them
        run_prepare(_cfg(tmp_path, "prepare.max_reject_fraction=0.05"), src, out)
    assert not storage.exists(out.histories)


def test_every_row_rejected_is_a_named_error_with_the_rows_kept(ray_local, tmp_path):
    _flat(tmp_path / "inter", "a.parquet", ["u0"] * 3, [97, 98, 99], [T0, T0 + 1, T0 + 2])
    _items(tmp_path / "items.parquet")
    out = PreparedPaths(str(tmp_path / "p"))
    with pytest.raises(DataValidationError, match=r"no user has \d+ or more valid interactions"):
        run_prepare(_cfg(tmp_path, "prepare.max_reject_fraction=1.0"), _src(tmp_path), out)
    assert storage.read_table(out.quarantine)["reason"].to_pylist() == ["unknown_item"] * 3
    assert storage.read_json(out.stats)["users_seen"] == 0
