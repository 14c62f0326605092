"""Prepare's pure functions (no Ray): row validation, per-user chronological histories, next-item windows."""

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from recsys_core.data.prepare import build_user, likely_unit, plausible_range, unit_divisors, validate_batch
from recsys_core.data.split import training_windows

COLUMNS = {"user_id": "user_id", "item_id": "item_id", "ts": "ts"}
CATALOG = pa.array(["1", "2", "3"])  # item_idx 0, 1, 2
# 2026-11-27T00:00:00Z: 56 years (14 leap days) + Jan..Oct 2026 (304 days) + 26 days = 20784 days.
NOV27 = 20784 * 86400


def _group(items, ts, user="u"):
    return pa.table({"user_id": [user] * len(items), "item_idx": pa.array(items, pa.int32()),
                     "ts": pa.array(ts, pa.int64())})


# ----------------------------------------------------------------------------- build_user


@pytest.mark.unit
def test_build_user_sorts_by_ts_then_item_and_sets_exact_duplicates_aside():
    # (item, ts): (5,20) (2,10) (7,10) (2,10) (1,30) (3,5)
    # sorted by ts, ties by item: (3,5) (2,10) (2,10)dup (7,10) (5,20) (1,30)
    row = build_user(_group([5, 2, 7, 2, 1, 3], [20, 10, 10, 10, 30, 5]), max_history=100).to_pylist()
    assert row == [{"user_id": "u", "items": [3, 2, 7, 5, 1], "ts": [5, 10, 10, 20, 30],
                    "dup_items": [2], "dup_ts": [10]}]


@pytest.mark.unit
def test_build_user_tie_rule_is_item_ascending_regardless_of_input_order():
    a = build_user(_group([9, 4, 6], [7, 7, 7]), 100)["items"].to_pylist()
    b = build_user(_group([6, 9, 4], [7, 7, 7]), 100)["items"].to_pylist()
    assert a == b == [[4, 6, 9]]


@pytest.mark.unit
def test_build_user_same_item_at_another_time_is_not_a_duplicate():
    row = build_user(_group([2, 2, 2, 2], [10, 40, 10, 10]), 100).to_pylist()[0]
    assert row["items"] == [2, 2] and row["ts"] == [10, 40]
    assert row["dup_items"] == [2, 2] and row["dup_ts"] == [10, 10]  # the two extra copies at ts 10


@pytest.mark.unit
def test_build_user_keeps_only_the_last_max_history():
    row = build_user(_group([5, 2, 7, 2, 1, 3], [20, 10, 10, 10, 30, 5]), max_history=3).to_pylist()[0]
    assert row["items"] == [7, 5, 1] and row["ts"] == [10, 20, 30]
    assert row["dup_items"] == [2]  # duplicates are reported even if older than the kept history


# ----------------------------------------------------------------------------- training_windows


@pytest.mark.unit
def test_training_windows_seven_items_seq_len_three_by_hand():
    items = np.array([10, 11, 12, 13, 14, 15, 16])
    got = [(x.tolist(), y.tolist()) for x, y in training_windows(items, 3)]
    assert got == [
        ([13, 14, 15], [14, 15, 16]),  # newest window first, full context
        ([10, 11, 12], [11, 12, 13]),
    ]


@pytest.mark.unit
def test_training_windows_eight_items_seq_len_three_by_hand():
    items = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    got = [(x.tolist(), y.tolist()) for x, y in training_windows(items, 3)]
    assert got == [
        ([14, 15, 16], [15, 16, 17]),
        ([11, 12, 13], [12, 13, 14]),
        ([10], [11]),  # the oldest remainder is a short window
    ]


@pytest.mark.unit
@pytest.mark.parametrize("n", range(0, 12))
@pytest.mark.parametrize("seq_len", [1, 2, 3, 5])
def test_training_windows_cover_every_next_item_position_once(n, seq_len):
    items = np.arange(100, 100 + n)  # value - 100 = position
    windows = training_windows(items, seq_len)
    targets = [int(t) - 100 for _, y in windows for t in y]
    assert sorted(targets) == list(range(1, n))  # positions 1..n-1, each exactly once
    for x, y in windows:
        assert 1 <= len(x) == len(y) <= seq_len
        np.testing.assert_array_equal(x + 1, y)  # target is the next item
    starts = [int(y[0]) for _, y in windows]
    assert starts == sorted(starts, reverse=True)  # newest first


# ----------------------------------------------------------------------------- validate_batch


@pytest.mark.unit
def test_validate_batch_names_each_bad_row_and_keeps_good_rows():
    batch = pa.table({
        "user_id": ["u1", None, "u3", "u4", "u5", "u6", "u7", "u8", "u9", None],
        "item_id": ["1", "2", None, "9", "2", "3", "3", "1", "2", "9"],
        "ts": ["100", "101", "102", "103", "abc", "-5", None, "2026-11-27T00:00:00Z",
               "2026-11-27T01:00:00+01:00", "abc"],
    })
    out = validate_batch(batch, COLUMNS, catalog_ids=CATALOG).to_pylist()
    assert [r["reason"] for r in out] == [
        None,             # u1: good
        "null_user_id",
        "null_item_id",
        "unknown_item",   # item "9" not in the catalog
        "bad_timestamp",  # unparseable
        "bad_timestamp",  # negative
        "bad_timestamp",  # null
        None,             # ISO-8601, UTC
        None,             # ISO-8601 with an offset: the same instant
        "null_user_id",   # several failures: the first rule (null user) names the row
    ]
    assert out[0] == {"user_id": "u1", "item_idx": 0, "ts": 100, "raw_item_id": "1", "raw_ts": "100", "reason": None}
    assert out[7] == {"user_id": "u8", "item_idx": 0, "ts": NOV27, "raw_item_id": "1",
                      "raw_ts": "2026-11-27T00:00:00Z", "reason": None}
    assert (out[8]["item_idx"], out[8]["ts"]) == (1, NOV27)
    # Rejected rows keep their raw text for the quarantine.
    assert (out[4]["raw_ts"], out[4]["raw_item_id"]) == ("abc", "2")
    assert out[3]["raw_item_id"] == "9"


@pytest.mark.unit
def test_validate_batch_numeric_ids_match_string_catalog_and_numeric_ts_pass_through():
    batch = pa.table({"uid": pa.array([7, 8], pa.int64()), "iid": pa.array([3, 1], pa.int64()),
                      "time": pa.array([5, 0], pa.int64())})
    out = validate_batch(batch, {"user_id": "uid", "item_id": "iid", "ts": "time"}, catalog_ids=CATALOG)
    assert out["user_id"].to_pylist() == [7, 8] and out["user_id"].type == pa.int64()  # ids keep their type
    assert out["item_idx"].to_pylist() == [2, 0]
    assert out["ts"].to_pylist() == [5, 0]  # ts 0 (the epoch) is valid
    assert out["reason"].to_pylist() == [None, None]


@pytest.mark.unit
def test_validate_batch_whole_second_timestamp_column():
    ts = pa.array([dt.datetime(2026, 11, 27), None], pa.timestamp("ms", tz="UTC"))
    batch = pa.table({"user_id": ["a", "b"], "item_id": ["1", "2"], "ts": ts})
    out = validate_batch(batch, COLUMNS, catalog_ids=CATALOG)
    assert out["ts"].to_pylist()[0] == NOV27
    assert out["reason"].to_pylist() == [None, "bad_timestamp"]


@pytest.mark.unit
def test_validate_batch_sub_second_timestamp_column_truncates_to_seconds():
    ts = pa.array([dt.datetime(2026, 11, 27, 0, 0, 0, 500000)], pa.timestamp("ms", tz="UTC"))
    batch = pa.table({"user_id": ["a"], "item_id": ["1"], "ts": ts})
    out = validate_batch(batch, COLUMNS, catalog_ids=CATALOG)
    assert out["ts"].to_pylist() == [NOV27]
    assert out["reason"].to_pylist() == [None]


# ----------------------------------------------------------------------------- the temporal protocol

import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from recsys_core import storage  # noqa: E402
from recsys_core.data.split import (  # noqa: E402
    NEVER,
    cold_targets,
    fit_prefixes,
    fit_values,
    has_split_columns,
    holdout,
    load_split,
    sample_rows,
    split_columns,
    split_members,
    split_rows,
    temporal_cutoff,
    temporal_role,
)


@pytest.mark.unit
def test_temporal_cutoff_by_hand():
    # span 0..100, last 10% -> cutoff 90 (events at ts < 90 train); 15% of 1000..2000 -> 1850
    assert temporal_cutoff(0, 100, 0.1) == 90
    assert temporal_cutoff(1000, 2000, 0.15) == 1850
    with pytest.raises(ValueError):
        temporal_cutoff(0, 100, 1.0)


def _log(protocol, cutoff=None):
    """Hand-made log, items as item_idx, chronological ts; cutoff 90:
      a: [1, 2, 3] @ 10, 50, 95   -> history [1, 2], next item 3 (after the cutoff)
      b: [4, 5, 6] @ 91, 92, 99   -> every event after the cutoff: no history, never evaluated or trained
      c: [1, 3, 7] @ 20, 30, 40   -> nothing after the cutoff: trains, never evaluated (item 3 is known
                                     before the cutoff: a's target is warm)
      d: [2, 8, 1] @ 60, 90, 93   -> ts 90 is not before the cutoff: history [2], next item 8 (first seen after
                                     the cutoff: a cold target, kept)
    """
    return split_columns(pa.table({"user_id": ["a", "b", "c", "d"], "items": [[1, 2, 3], [4, 5, 6], [1, 3, 7], [2, 8, 1]],
                                   "ts": [[10, 50, 95], [91, 92, 99], [20, 30, 40], [60, 90, 93]]}), protocol, cutoff)


@pytest.mark.unit
def test_temporal_split_rules_on_a_hand_made_log():
    t = _log("temporal", 90)
    assert t["train_len"].to_pylist() == [2, 0, 3, 1]  # events before the cutoff
    roles = {u: temporal_role(u) for u in "abcd"}
    evaluated = {"a": 2, "d": 1}  # target positions: the first event after the cutoff
    for which in ("val", "test"):
        want = [evaluated.get(u) if roles[u] == which else None for u in "abcd"]
        assert t[f"{which}_pos"].to_pylist() == want
    # validation and test users never overlap; together they are exactly a and d
    assert {u for u, p in zip("abcd", t["val_pos"].to_pylist()) if p is not None}.isdisjoint(
        {u for u, p in zip("abcd", t["test_pos"].to_pylist()) if p is not None})
    both = [(u, h, y) for which in ("val", "test") for u, h, y in zip(
        [["a", "b", "c", "d"][r] for r in split_rows(t, which)[2]], *[x for x in split_rows(t, which)[:2]])]
    assert sorted((u, h.tolist(), int(y)) for u, h, y in both) == [("a", [1, 2], 3), ("d", [2], 8)]
    # items first seen after the cutoff: 4, 5, 6 (user b) and 8 (user d at ts 90); d's target 8 is one
    first_seen = np.full(10, NEVER, dtype=np.int64)
    for seq, ts in zip(t["items"].to_pylist(), t["ts"].to_pylist()):
        np.minimum.at(first_seen, seq, ts)
    assert np.flatnonzero((first_seen >= 90) & (first_seen < NEVER)).tolist() == [4, 5, 6, 8]
    assert cold_targets([3, 8], first_seen, 90) == 1 and cold_targets([3], first_seen, 90) == 0
    assert cold_targets([4, 8, 9], first_seen, 90) == 3  # 9: no event at all (NEVER) counts as new
    # baselines fit on every user's events before the cutoff, for validation and test alike
    for which in ("val", "test"):
        assert [p.tolist() for p in fit_prefixes(t, "items", which)] == [[1, 2], [], [1, 3, 7], [2]]
        assert [p.tolist() for p in fit_prefixes(t, "ts", which)] == [[10, 50], [], [20, 30, 40], [60]]


@pytest.mark.unit
def test_roles_are_a_stable_hash_of_the_id():
    assert [temporal_role(u) for u in range(8)] == [temporal_role(u) for u in range(8)]
    roles = [temporal_role(f"user{u}") for u in range(400)]
    assert 150 < roles.count("val") < 250  # about half each


@pytest.mark.unit
def test_leave_one_out_columns_match_the_leave_one_out_functions():
    t = _log("loo")
    assert t["train_len"].to_pylist() == [1, 1, 1, 1] and t["val_pos"].to_pylist() == [1, 1, 1, 1]
    assert t["test_pos"].to_pylist() == [2, 2, 2, 2] and t["test_fit_len"].to_pylist() == [2, 2, 2, 2]
    bare = t.select(["user_id", "items", "ts"])  # no split columns: leave-one-out
    for which in ("val", "test"):
        for a, b in zip(split_rows(t, which), split_rows(bare, which)):
            np.testing.assert_array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object))
        assert [p.tolist() for p in fit_prefixes(t, "items", which)] == [
            p.tolist() for p in fit_prefixes(bare, "items", which)]


# ----------------------------------------------------------------------------- timestamp units and range


@pytest.mark.unit
def test_unit_divisors_and_likely_unit_by_hand():
    v = np.array([1.7e9, 1.7e12, 1.7e15, 1.7e18, np.nan])
    assert unit_divisors(v, "auto").tolist() == [1.0, 1e3, 1e6, 1e9, 1.0]
    assert unit_divisors(v, "ms").tolist() == [1e3] * 5
    lo, hi = plausible_range("1990-01-01", "2030-01-01")
    assert (lo, hi) == (631152000.0, 1893456000.0)
    assert plausible_range("1990-01-01", None, now=1e9)[1] == 1e9 + 86400
    assert [likely_unit(x, lo, hi) for x in (1.7e9, 1.7e12, 1.7e15, 1.7e18, 1e30, 5.0)] == \
        ["s", "ms", "us", "ns", None, None]


@pytest.mark.unit
def test_validate_batch_range_units_and_no_overflow():
    rng = plausible_range("1990-01-01", "2030-01-01")
    batch = pa.table({"user_id": ["a"] * 7, "item_id": ["1"] * 7,
                      "ts": pa.array([1.7e9, 1.7e12, 1e30, 9.3e18, 5.0, float("nan"), -3.0])})
    out = validate_batch(batch, COLUMNS, catalog_ids=CATALOG, ts_unit="s", ts_range=rng)
    assert out["reason"].to_pylist() == [None, "ts_unit_mismatch", "ts_out_of_range", "ts_out_of_range",
                                         "ts_out_of_range", "bad_timestamp", "bad_timestamp"]
    assert out["ts"].to_pylist() == [1_700_000_000] + [-1] * 6  # never int64 min
    auto = validate_batch(batch, COLUMNS, catalog_ids=CATALOG, ts_unit="auto", ts_range=rng)
    assert auto["ts"].to_pylist()[:2] == [1_700_000_000, 1_700_000_000]
    assert auto["reason"].to_pylist()[:2] == [None, None]
    # without a range, a value beyond int64 seconds is still refused, not wrapped
    plain = validate_batch(batch, COLUMNS, catalog_ids=CATALOG)
    assert plain["reason"].to_pylist()[2:4] == ["bad_timestamp", "bad_timestamp"]


@pytest.mark.unit
def test_interaction_files_a_single_file_or_a_folder_without_hidden_names(tmp_path):
    import pyarrow.parquet as pq  # noqa: PLC0415 - only this test writes files

    from recsys_core.data.prepare import interaction_files  # noqa: PLC0415
    for rel in ("a.parquet", "dt=1/b.parquet", "_tmp/c.parquet", ".d.parquet", "dt=1/_e.parquet"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"x": [1]}), tmp_path / rel)
    assert interaction_files(str(tmp_path)) == [str(tmp_path / "a.parquet"), str(tmp_path / "dt=1" / "b.parquet")]
    assert interaction_files(str(tmp_path / "a.parquet")) == [str(tmp_path / "a.parquet")]
    assert interaction_files(str(tmp_path / "missing")) == []


@pytest.mark.unit
def test_split_rows_and_prefixes_on_chunked_and_sliced_tables_equal_the_list_rule():
    """The vectorised readers (offsets into one array) on a table of several chunks, one of them a slice,
    give what the per-history rule (``holdout``) gives."""
    seqs = [[5, 1, 2], [3, 3, 4, 9], [7, 8, 6, 1, 0], [2, 4, 6]]
    ts = [[10 * j for j in range(len(s))] for s in seqs]
    whole = pa.table({"items": pa.array([[0, 0, 0]] + seqs, pa.list_(pa.int32())),
                      "ts": pa.array([[0, 0, 0]] + ts, pa.list_(pa.int64()))})
    t = pa.concat_tables([whole.slice(1, 2), whole.slice(3)])  # two chunks, the first a slice
    assert t["items"].num_chunks == 2
    for which in ("val", "test"):
        hist, tgt, rows = split_rows(t, which)
        want_hist, want_tgt = holdout(seqs, which)
        assert [h.tolist() for h in hist] == [h.tolist() for h in want_hist]
        assert tgt.tolist() == want_tgt.tolist() and rows.tolist() == [0, 1, 2, 3]
        assert [p.tolist() for p in fit_prefixes(t, "ts", which)] == [x.tolist() for x in holdout(ts, which)[0]]
    with pytest.raises(ValueError, match="history of 1 events has no val target"):
        split_rows(pa.table({"items": pa.array([[1]], pa.list_(pa.int32()))}), "val")
    cols = {"items": pa.array([[1, 2], [3, 4, 5]], pa.list_(pa.int32())), "train_len": pa.array([1, 2], pa.int32()),
            "val_pos": pa.nulls(2), "test_pos": pa.array([1, 3], pa.int32()), "test_fit_len": pa.array([1, 2], pa.int32())}
    assert split_rows(pa.table(cols), "val")[2].tolist() == []  # an all-null column: nobody in the split
    with pytest.raises(ValueError, match="test_pos 3 of row 1 is outside its history of 3 events"):
        split_rows(pa.table(cols), "test")


@pytest.mark.unit
def test_fit_values_equal_the_concatenated_prefixes_on_chunked_sliced_and_temporal_tables():
    seqs = [[5, 1, 2], [3, 3, 4, 9], [7, 8, 6, 1, 0], [2, 4, 6]]
    whole = pa.table({"items": pa.array([[0, 0, 0]] + seqs, pa.list_(pa.int32())),
                      "ts": pa.array([[0, 0, 0]] + [[10 * j for j in range(len(s))] for s in seqs], pa.list_(pa.int64()))})
    for t in (pa.concat_tables([whole.slice(1, 2), whole.slice(3)]), _log("temporal", 90), _log("loo")):
        for which in ("val", "test"):
            for col in ("items", "ts"):
                want = [x for p in fit_prefixes(t, col, which) for x in p.tolist()]
                assert fit_values(t, col, which).tolist() == want
    assert fit_values(_log("temporal", 90), "items", "val").tolist() == [1, 2, 1, 3, 7, 2]  # by hand (see _log)


def _old_load_split(uri, which, max_users, seed):
    """The previous load_split: the whole table read, filtered to the split, then sampled."""
    t = storage.read_table(uri)
    if has_split_columns(t):
        t = t.filter(pc.is_valid(t[f"{which}_pos"]))
    if max_users is not None and t.num_rows > max_users:
        t = t.take(sample_rows(t.num_rows, max_users, seed))
    hist, tgt, _ = split_rows(t, which)
    return hist, tgt, t["user_id"].to_pylist()


@pytest.mark.unit
@pytest.mark.parametrize("protocol", ["temporal", "loo", None])
def test_load_split_reads_the_rows_the_whole_table_rule_picks(tmp_path, protocol):
    """load_split reads only the split's (sampled) rows, over several files and batches, and returns what
    filtering and sampling the whole table returned."""
    rng = np.random.default_rng(1)
    n = 300
    seqs = [rng.integers(0, 50, rng.integers(3, 9)).tolist() for _ in range(n)]
    ts = [sorted(rng.integers(0, 1000, len(s)).tolist()) for s in seqs]
    t = pa.table({"user_id": [f"u{i}" for i in range(n)], "items": seqs, "ts": ts})
    if protocol is not None:
        t = split_columns(t, protocol, 800 if protocol == "temporal" else None)
    for i, part in enumerate((t.slice(0, 120), t.slice(120, 100), t.slice(220))):
        pq.write_table(part, tmp_path / f"part-{i}.parquet", row_group_size=40)
    uri = str(tmp_path)
    for which in ("val", "test"):
        members = split_members(uri, which)
        assert len(members) == (n if protocol is None else t[f"{which}_pos"].is_valid().to_numpy(False).sum())
        for max_users in (None, 17, 10_000):
            got, want = load_split(uri, which, max_users, 3), _old_load_split(uri, which, max_users, 3)
            assert got[2] == want[2] and got[1].tolist() == want[1].tolist()
            assert [h.tolist() for h in got[0]] == [h.tolist() for h in want[0]]
            assert len(got[2]) == min(len(members), max_users or n)
