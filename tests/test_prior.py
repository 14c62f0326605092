"""The recency prior (recsys_core.model.prior) and its choice on validation (recsys_core.eval.recency),
checked against hand-computed counts, buckets, scores and choices."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys_core.eval.recency import (choose_prior, fit_log, holdout_queries, tomorrow_cuts,
                                     tomorrow_popularity_window, tomorrow_queries)
from recsys_core.model.prior import DAY_S, RecencyPrior, apply_prior, augment_items, augment_users, prior_term, window_counts

pytestmark = pytest.mark.unit


def test_window_counts_by_hand():
    items = np.array([0, 1, 0, 2, 0])
    ts = np.array([10, 20, 30, 40, 50])
    got = window_counts(items, ts, 3, np.array([35, 50, 5, 51]), window_s=25)
    # t=35: [10, 35) -> ts 10 (0), 20 (1), 30 (0); t=50: [25, 50) -> 30 (0), 40 (2), 50 excluded;
    # t=5: nothing; t=51: [26, 51) -> 30 (0), 40 (2), 50 (0)
    assert got.tolist() == [[2, 1, 0], [1, 0, 1], [0, 0, 0], [2, 0, 1]]


def test_window_counts_match_a_brute_force_count_on_shuffled_events():
    rng = np.random.default_rng(0)
    items, ts = rng.integers(0, 7, 300), rng.integers(0, 1000, 300)
    q = rng.integers(-50, 1100, 40)
    got = window_counts(items, ts, 7, q, window_s=120)
    want = np.array([[((items == i) & (ts >= t - 120) & (ts < t)).sum() for i in range(7)] for t in q])
    assert np.array_equal(got, want)


def test_buckets_and_weights_by_gap():
    p = RecencyPrior(14, (0.0, 1.0, 4.0), (3600, 86400))
    gaps = np.array([0, 3599, 3600, 86399, 86400, 10**7])
    assert p.buckets(gaps).tolist() == [0, 0, 1, 1, 2, 2]
    assert p.weights(gaps).tolist() == [0, 0, 1, 1, 4, 4]
    assert not p.off and RecencyPrior(7, (0.0, 0.0, 0.0), (3600, 86400)).off
    assert RecencyPrior.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="3 betas for 2 gap buckets"):
        RecencyPrior(14, (0.0, 1.0, 2.0), (3600,))


def test_apply_and_augment_add_the_weighted_log_count():
    logits = np.array([[1.0, 2.0], [0.0, 0.0]], np.float32)
    term = prior_term(np.array([0.0, np.e - 1]))  # log1p -> [0, 1]
    assert np.allclose(apply_prior(logits, np.array([2.0, 0.5]), term), [[1.0, 4.0], [0.0, 0.5]])
    u, t = torch.randn(3, 4), torch.randn(5, 4)
    w, it = torch.tensor([0.0, 1.0, 3.0]), torch.rand(5)
    au, at = augment_users(u, w), augment_items(t, it)
    assert au.shape == (3, 5) and at.shape == (5, 5)
    assert torch.allclose(au @ at.T, u @ t.T + w[:, None] * it[None, :], atol=1e-6)


def test_choose_prior_per_bucket_then_window_by_hand():
    betas = (0.0, 1.0, 2.0)
    buckets = np.array([0, 0, 1, 1])
    ndcg = {7: np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 1, 1]], float),  # bucket 0 -> 0; bucket 1 -> tie 1 vs 2 -> 1
            30: np.full((3, 4), 0.5)}
    prior, curve = choose_prior(ndcg, buckets, betas, (3600,))
    assert prior == RecencyPrior(7, (0.0, 1.0), (3600,))
    assert curve["7"] == {"ndcg@10": 1.0, "betas": [0.0, 1.0]}
    assert curve["30"] == {"ndcg@10": 0.5, "betas": [0.0, 0.0]}


def _users() -> pa.Table:
    return pa.table({"user_id": [1, 2], "items": [[1, 2, 3, 4], [5, 6, 7]], "ts": [[0, 100, 200, 300], [0, 50, 400]]})


def test_holdout_and_tomorrow_queries_by_hand():
    users = _users()
    val = holdout_queries(users, "val")  # leave-one-out: the second-to-last event, asked at its own time
    assert [h.tolist() for h in val.hist] == [[1, 2], [5]]
    assert val.target.tolist() == [3, 6] and val.query_ts.tolist() == [200, 50] and val.gap_s.tolist() == [100, 50]
    test = holdout_queries(users, "test")
    assert test.target.tolist() == [4, 7] and test.gap_s.tolist() == [100, 350]
    items, ts = fit_log(users, "val").flat()  # every user's events before the validation target
    assert items.tolist() == [1, 2, 5] and ts.tolist() == [0, 100, 0]
    # fitting log span [0, 100], half of it: cut at 50; user 1 has events on both sides, user 2 only before
    tom = tomorrow_queries(fit_log(users, "val"), 0.5)
    assert [h.tolist() for h in tom.hist] == [[1]]
    assert tom.target.tolist() == [2] and tom.query_ts.tolist() == [50] and tom.gap_s.tolist() == [50]
    # two cuts a quarter of the span apart: at 75 and at 50, user 1 each time (cut by cut, users in order)
    assert tomorrow_cuts(0, 100, 0.25, 3) == (75, 50, 25)
    two = tomorrow_queries(fit_log(users, "val"), 0.25, n_cuts=2)
    assert [h.tolist() for h in two.hist] == [[1], [1]] and two.target.tolist() == [2, 2]
    assert two.query_ts.tolist() == [75, 50] and two.gap_s.tolist() == [75, 50] and two.rows.tolist() == [0, 0]
    with pytest.raises(ValueError, match="reach past the start"):
        tomorrow_cuts(0, 100, 0.25, 4)


def test_queries_and_logs_read_a_batch_at_a_time_equal_the_whole_table_rules(tmp_path):
    """The readers the evaluate stage uses (offsets into one array, a batch of users at a time, only the
    sampled users' rows) equal the whole-table rules: the per-user ts lookups, ``fit_log(...).sorted``,
    and the sampled ``holdout_queries`` / ``tomorrow_queries``, on several files under both protocols."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    from recsys_core.data.split import split_columns, split_members  # noqa: PLC0415
    from recsys_core.eval.recency import (_sample, holdout_queries_at, read_fit_log,  # noqa: PLC0415
                                          sampled_tomorrow_queries)
    rng = np.random.default_rng(2)
    n = 200
    seqs = [rng.integers(0, 20, rng.integers(3, 8)).tolist() for _ in range(n)]
    ts = [sorted(rng.integers(0, 1000, len(s)).tolist()) for s in seqs]
    whole = pa.table({"user_id": list(range(n)), "items": seqs, "ts": ts})
    for k, t in enumerate((whole, split_columns(whole, "temporal", 700))):
        sliced = pa.concat_tables([t.slice(3, 15), t.slice(18)])  # two chunks, the first a slice
        for which in ("val", "test"):
            q = holdout_queries(sliced, which)
            tl = sliced["ts"].to_pylist()
            at = [len(h) for h in q.hist]
            assert len(q) > 0 and q.query_ts.tolist() == [tl[r][a] for r, a in zip(q.rows, at)]
            assert q.gap_s.tolist() == [tl[r][a] - tl[r][a - 1] for r, a in zip(q.rows, at)]
        folder = tmp_path / str(k)
        folder.mkdir()
        for i, part in enumerate((t.slice(0, 70), t.slice(70))):
            pq.write_table(part, folder / f"part-{i}.parquet", row_group_size=30)
        uri = str(folder)
        for which in ("val", "test"):
            log, want = read_fit_log(uri, which, 20), fit_log(t, which).sorted(20)
            np.testing.assert_array_equal(log.items, want.items)
            np.testing.assert_array_equal(log.ts, want.ts)
            for m in (9, 10_000):
                got, want_q = holdout_queries_at(uri, which, split_members(uri, which, m, 4)), _sample(
                    holdout_queries(t, which), m, 4)
                assert [h.tolist() for h in got.hist] == [h.tolist() for h in want_q.hist]
                for f in ("target", "query_ts", "gap_s", "rows"):
                    np.testing.assert_array_equal(getattr(got, f), getattr(want_q, f))
        _, vts = fit_log(t, "val").flat()
        for m, n_cuts in ((7, 1), (10_000, 1), (14, 2), (10_000, 3)):
            got = sampled_tomorrow_queries(uri, read_fit_log(uri, "val", 20), 0.3, m, 5, n_cuts)
            cuts = tomorrow_cuts(int(vts.min()), int(vts.max()), 0.3, n_cuts)
            per_cut = [tomorrow_queries(fit_log(t, "val"), 0.3, cuts=[c]) for c in cuts]
            want_q = per_cut[0].take(np.arange(0))
            for q in per_cut:  # each cut sampled on its own, max_users // n_cuts of it
                want_q = want_q.concat(_sample(q, m // n_cuts, 5))
            assert len(got) == sum(min(m // n_cuts, len(q)) for q in per_cut) and len(got) > 0
            assert len(set(got.query_ts.tolist())) == n_cuts
            assert [h.tolist() for h in got.hist] == [h.tolist() for h in want_q.hist]
            for f in ("target", "query_ts", "gap_s", "rows"):
                np.testing.assert_array_equal(getattr(got, f), getattr(want_q, f))


def test_tomorrow_popularity_window_by_hand():
    # (item, day) per user; each user's last two events are the leave-one-out targets, out of the fitting log.
    # Fitting log: item 0 long ago (days 0, 1, 2), item 1 lately (days 8, 9), span [0, 16]: a quarter of it
    # cuts at day 12. Only user 6 has fitting events on both sides: history [2], target 1.
    rows = [[(0, 0), (3, 1)], [(0, 1), (4, 2)], [(0, 2)], [(1, 8)], [(1, 9)], [(2, 4), (1, 16)]]
    rows = [r + [(10, 40), (11, 41)] for r in rows]
    users = pa.table({"user_id": list(range(1, 7)), "items": [[i for i, _ in r] for r in rows],
                      "ts": [[d * DAY_S for _, d in r] for r in rows]})
    window, curve = tomorrow_popularity_window(users, 12, (0, 7, 30), 0.25)
    # all time (and 30 days) at the cut: item 0 (3 events) above item 1 (2): the target ranks 2nd -> 1/log2(3);
    # the last 7 days [day 5, day 12): item 1 alone -> 1st -> 1
    assert curve == pytest.approx({"0": 1 / np.log2(3), "7": 1.0, "30": 1 / np.log2(3)})
    assert window == 7
    assert tomorrow_popularity_window(users, 12, (30, 0), 0.25)[0] == 30  # a tie goes to the first


def test_serving_term_streamed_equals_the_whole_log_window(tmp_path):
    """serving_term reads the users a batch at a time; it equals the window counts of the whole log at
    now = newest + 1 s, events exactly at the window's start counted and none at or after now."""
    from recsys_core import storage
    from recsys_core.eval.recency import serving_term
    rng = np.random.default_rng(0)
    newest = 100 * DAY_S
    all_items, all_ts = [], []
    for f in range(3):
        seqs = [rng.integers(0, 6, rng.integers(1, 6)) for _ in range(7)]
        tss = [np.sort(rng.integers(newest - 20 * DAY_S, newest, len(q))) for q in seqs]
        if f == 2:
            tss[0][-1] = newest  # the newest event
            tss[1][0] = newest + 1 - 7 * DAY_S  # exactly at the 7-day window's start
        all_items += [q for q in seqs]
        all_ts += tss
        storage.write_table(pa.table({"items": pa.array([q.tolist() for q in seqs], pa.list_(pa.int32())),
                                      "ts": pa.array([t.tolist() for t in tss], pa.list_(pa.int64()))}),
                            str(tmp_path / "users" / f"part-{f}.parquet"))
    prior = RecencyPrior(window_days=7, betas=(1.0,), gap_edges_s=())
    term, now = serving_term(str(tmp_path / "users"), 6, prior)
    assert now == newest + 1
    want = window_counts(np.concatenate(all_items), np.concatenate(all_ts), 6, np.array([now]), 7 * DAY_S)[0]
    np.testing.assert_allclose(term, prior_term(want))
    assert want.sum() > 0 and (want < np.bincount(np.concatenate(all_items), minlength=6)).any()
