"""The holdout at scale: a seeded sample of eval.max_users users; baselines still fit on every user."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from recsys_core import storage
from recsys_core.eval.baselines import baseline_per_user
from recsys_core.eval.holdout import holdout_rows, holdout_users

pytestmark = pytest.mark.unit


def test_holdout_rows_all_users_or_a_seeded_sorted_sample():
    assert holdout_rows(10, None, 0) is None
    assert holdout_rows(10, 10, 0) is None  # not fewer than kept: every user
    rows = holdout_rows(1000, 50, seed=3)
    assert rows.shape == (50,) and len(set(rows.tolist())) == 50 and (np.diff(rows) > 0).all()
    assert rows.min() >= 0 and rows.max() < 1000
    np.testing.assert_array_equal(rows, holdout_rows(1000, 50, seed=3))
    assert not np.array_equal(rows, holdout_rows(1000, 50, seed=4))
    with pytest.raises(ValueError, match="eval.max_users"):
        holdout_rows(10, 0, 0)


def _users(tmp_path, n=60, n_items=9):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, n_items, rng.integers(3, 12)).tolist() for _ in range(n)]
    uri = str(tmp_path / "users" / "part-0.parquet")
    storage.write_table(pa.table({"user_id": [f"u{i}" for i in range(n)],
                                  "items": pa.array(seqs, pa.list_(pa.int32())),
                                  "ts": pa.array([list(range(len(q))) for q in seqs], pa.list_(pa.int64()))}), uri)
    return str(tmp_path / "users"), seqs


def test_holdout_users_writes_the_sample_and_says_how_many(tmp_path):
    uri, seqs = _users(tmp_path)
    same = holdout_users(uri, str(tmp_path / "h.parquet"), None, 0)
    assert same == {"uri": uri, "users": 60, "of": 60, "sampled": False, "rows": None}
    held = holdout_users(uri, str(tmp_path / "h.parquet"), 7, seed=1)
    assert (held["users"], held["of"], held["sampled"], held["seed"]) == (7, 60, True, 1)
    t = storage.read_table(held["uri"])
    assert t["user_id"].to_pylist() == [f"u{i}" for i in held["rows"]]
    assert t["items"].to_pylist() == [seqs[i] for i in held["rows"]]


@pytest.mark.parametrize("name", ["popularity", "itemknn"])
def test_sampled_baselines_equal_the_full_run_at_the_sampled_users(tmp_path, name):
    """Baselines fit on every user's interactions, so a sampled user's metrics equal the full run's."""
    uri, _ = _users(tmp_path)
    full, full_target, _ = baseline_per_user(uri, 9, (name,), (3, 5), 4)
    rows = holdout_rows(60, 11, seed=2)
    part, target, _ = baseline_per_user(uri, 9, (name,), (3, 5), 4, query_rows=rows)
    np.testing.assert_array_equal(target, full_target[rows])
    assert set(part[name]) == set(full[name])
    for metric, v in part[name].items():
        assert v.shape == (11,)
        np.testing.assert_allclose(v, full[name][metric][rows])
    assert any(v.any() for v in part[name].values())  # some hits: the comparison is not of zeros


def test_sample_taken_batch_by_batch_equals_the_whole_table_take(tmp_path):
    """take_rows reads a folder of several files a batch at a time, in read_table's order."""
    rng = np.random.default_rng(1)
    # written out of name order, one in a sub-folder, an empty one among them
    for f, (name, n) in enumerate([("d.parquet", 5), ("b.parquet", 0), ("c/a.parquet", 23), ("a.parquet", 11)]):
        storage.write_table(pa.table({"user_id": pa.array([f * 100 + i for i in range(n)], pa.int64()),
                                      "items": pa.array([rng.integers(0, 9, 3).tolist() for _ in range(n)],
                                                        pa.list_(pa.int32()))}), str(tmp_path / "u" / name))
    uri = str(tmp_path / "u")
    whole = storage.read_table(uri)
    assert whole["user_id"][0].as_py() == 300  # read_table's order: a.parquet first
    rows = holdout_rows(whole.num_rows, 9, seed=0)
    got = storage.take_rows(uri, rows)
    assert got.equals(whole.take(pa.array(rows)))
    assert storage.take_rows(uri, rows, ["user_id"]).equals(whole.select(["user_id"]).take(pa.array(rows)))
    assert sum(t.num_rows for t in storage.iter_batches(uri, batch_rows=4)) == 39
    assert storage.take_rows(uri, np.array([0, 38])).column("user_id").to_pylist() == [300, 4]
    with pytest.raises(IndexError, match="39 rows"):
        storage.take_rows(uri, np.array([39]))
    with pytest.raises(FileNotFoundError):
        next(storage.iter_batches(str(tmp_path / "gone")))


def test_targets_alone_read_only_the_sampled_rows_and_equal_the_whole_table(tmp_path):
    """With no baseline configured only the queried users' rows are read; the targets equal the whole
    table's at those rows."""
    uri, seqs = _users(tmp_path)
    _, whole, _ = baseline_per_user(uri, 9, (), (5,))
    assert whole.tolist() == [s[-1] for s in seqs]
    rows = holdout_rows(60, 11, seed=2)
    out, target, chosen = baseline_per_user(uri, 9, (), (5,), query_rows=rows)
    assert out == {} and chosen == {} and target.tolist() == [seqs[r][-1] for r in rows]


def test_validation_popularity_streamed_equals_the_whole_log_popularity(tmp_path):
    """validation_popularity counts a batch of users at a time; it equals popularity fit on the whole
    validation fitting log and ranked for the sampled validation users."""
    from recsys_core.data.split import fit_prefixes, load_split  # noqa: PLC0415
    from recsys_core.eval.baselines import (BaselineOptions, rank_baseline, train_log,  # noqa: PLC0415
                                            validation_popularity)
    from recsys_core.eval.metrics import per_user_metrics  # noqa: PLC0415
    uri, _ = _users(tmp_path, n=300)
    t = storage.read_table(uri)
    log = train_log(fit_prefixes(t, "items", "val"), fit_prefixes(t, "ts", "val"), 9)
    for max_users in (None, 40):
        hist, target, _ = load_split(uri, "val", max_users, 5)
        top = rank_baseline("popularity", log, hist, 5, BaselineOptions(), None)
        want = {k: float(v.mean()) for k, v in per_user_metrics(top, target, (3, 5)).items()}
        got = validation_popularity(uri, 9, max_users, 5, ks=(3, 5))
        assert got == pytest.approx(want) and want["recall@5"] > 0
