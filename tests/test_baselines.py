"""Baselines checked against hand-computed popularity counts and cosine similarities."""

import math

import numpy as np
import pytest

from recsys_core import storage
from recsys_core.eval import baselines
from recsys_core.eval.baselines import (BASELINES, BaselineOptions, itemknn_score_chunks, popularity_scores,
                                        windowed_popularity_scores)


def itemknn_scores(train_users, train_items, n_users, n_items, query_histories, **kw) -> np.ndarray:
    """Every score block of the item-kNN baseline stacked into one dense (Q, n_items) matrix."""
    blocks = list(itemknn_score_chunks(train_users, train_items, n_users, n_items, query_histories, **kw))
    return np.concatenate(blocks) if blocks else np.zeros((0, n_items), dtype=np.float32)


# Training interactions (user, item); (0, 0) is duplicated and must count once.
#   u0: {0, 1}   u1: {0, 1, 2}   u2: {1, 2, 3}   u3: {0}
# Item users: 0 -> {0,1,3} ||x||=sqrt3, 1 -> {0,1,2} sqrt3, 2 -> {1,2} sqrt2, 3 -> {2} 1.
# Co-counts / cosine:
#   (0,1): u0,u1 -> 2/(sqrt3*sqrt3) = 2/3      (0,2): u1 -> 1/sqrt6     (0,3): 0
#   (1,2): u1,u2 -> 2/(sqrt3*sqrt2) = 2/sqrt6  (1,3): u2 -> 1/sqrt3     (2,3): u2 -> 1/sqrt2
USERS = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
ITEMS = np.array([0, 1, 0, 0, 1, 2, 1, 2, 3, 0])
S6, S3, S2 = math.sqrt(6), math.sqrt(3), math.sqrt(2)
SIM = np.array(
    [
        [0.0, 2 / 3, 1 / S6, 0.0],
        [2 / 3, 0.0, 2 / S6, 1 / S3],
        [1 / S6, 2 / S6, 0.0, 1 / S2],
        [0.0, 1 / S3, 1 / S2, 0.0],
    ]
)
ONE_HOT = [np.array([i]) for i in range(4)]  # history [i] -> score row = similarity row i


def _knn(histories, **kw):
    return itemknn_scores(USERS, ITEMS, n_users=4, n_items=4, query_histories=histories, **kw)


@pytest.mark.unit
def test_popularity_counts():
    out = popularity_scores(np.array([2, 0, 2, 2, 4]), n_items=6)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1, 0, 3, 0, 1, 0])
    with pytest.raises(ValueError):
        popularity_scores(np.array([6]), n_items=6)


@pytest.mark.unit
def test_itemknn_full_similarity_hand_values():
    scores = _knn(ONE_HOT)
    assert scores.dtype == np.float32 and scores.shape == (4, 4)
    np.testing.assert_allclose(scores, SIM, rtol=1e-6)
    np.testing.assert_array_equal(np.diag(scores), 0.0)  # never similar to itself


@pytest.mark.unit
def test_itemknn_scores_sum_history_rows():
    # History {0, 1} (1 repeated): row0 + row1 = [2/3, 2/3, 3/sqrt6, 1/sqrt3].
    scores = _knn([np.array([0, 1, 1]), np.array([], dtype=np.int64), np.array([3])])
    np.testing.assert_allclose(scores[0], [2 / 3, 2 / 3, 3 / S6, 1 / S3], rtol=1e-6)
    np.testing.assert_array_equal(scores[1], 0.0)
    np.testing.assert_allclose(scores[2], [0.0, 1 / S3, 1 / S2, 0.0], rtol=1e-6)


@pytest.mark.unit
def test_itemknn_shrink():
    # shrink=1: (0,1) -> 2/(3+1) = 0.5, (2,3) -> 1/(sqrt2+1), (1,3) -> 1/(sqrt3+1).
    scores = _knn(ONE_HOT, shrink=1.0)
    assert scores[0, 1] == pytest.approx(0.5)
    assert scores[2, 3] == pytest.approx(1 / (S2 + 1))
    assert scores[1, 3] == pytest.approx(1 / (S3 + 1))


@pytest.mark.unit
def test_itemknn_k_neighbors_keeps_largest_per_column():
    # k=1 keeps the largest sim in each column j (the neighbour i of item j):
    #   col0 -> item1 (2/3), col1 -> item2 (2/sqrt6), col2 -> item1 (2/sqrt6), col3 -> item2 (1/sqrt2).
    expected1 = np.zeros((4, 4))
    expected1[1, 0] = 2 / 3
    expected1[2, 1] = 2 / S6
    expected1[1, 2] = 2 / S6
    expected1[2, 3] = 1 / S2
    np.testing.assert_allclose(_knn(ONE_HOT, k_neighbors=1), expected1, rtol=1e-6)
    # k=2 adds the runner-up: col0 item2 (1/sqrt6), col1 item0 (2/3), col2 item3 (1/sqrt2), col3 item1 (1/sqrt3).
    expected2 = expected1.copy()
    expected2[2, 0] = 1 / S6
    expected2[0, 1] = 2 / 3
    expected2[3, 2] = 1 / S2
    expected2[1, 3] = 1 / S3
    np.testing.assert_allclose(_knn(ONE_HOT, k_neighbors=2), expected2, rtol=1e-6)


@pytest.mark.unit
def test_itemknn_cold_item_and_validation():
    # Item 4 never seen in training: no similarity either way.
    scores = itemknn_scores(USERS, ITEMS, 4, 5, [np.array([4]), np.array([0])])
    np.testing.assert_array_equal(scores[0], 0.0)
    np.testing.assert_allclose(scores[1], [0.0, 2 / 3, 1 / S6, 0.0, 0.0], rtol=1e-6)
    assert itemknn_scores(USERS, ITEMS, 4, 4, []).shape == (0, 4)
    with pytest.raises(ValueError):
        _knn([np.array([4])])  # history item out of range
    with pytest.raises(ValueError):
        _knn(ONE_HOT, k_neighbors=0)


@pytest.mark.unit
def test_itemknn_chunking_matches_dense_reference(monkeypatch):
    monkeypatch.setattr(baselines, "_SIM_BLOCK_ENTRIES", 12 * 5)  # 3 similarity column blocks (5, 5, 2)
    rng = np.random.default_rng(0)
    n_users, n_items = 30, 12
    users = rng.integers(0, n_users, 150)
    items = rng.integers(0, n_items, 150)
    hists = [rng.integers(0, n_items, rng.integers(0, 5)) for _ in range(9)]
    x = np.zeros((n_users, n_items))
    x[users, items] = 1.0
    norms = np.sqrt(x.sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.nan_to_num(x.T @ x / np.outer(norms, norms))
    np.fill_diagonal(sim, 0.0)
    q = np.zeros((len(hists), n_items))
    for r, h in enumerate(hists):
        q[r, h] = 1.0
    got = itemknn_scores(users, items, n_users, n_items, hists, chunk_size=2)
    np.testing.assert_allclose(got, q @ sim, rtol=1e-5, atol=1e-7)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["popularity", "recent_popularity", "itemknn", "ease"])
def test_baselines_rank_the_same_in_small_score_blocks(tmp_path, monkeypatch, name):
    """The evaluate stage scores baselines a block of users at a time; block size changes nothing."""
    import pyarrow as pa


    rng = np.random.default_rng(1)
    seqs = [rng.choice(40, size=int(rng.integers(3, 12)), replace=False).tolist() for _ in range(25)]
    ts = [np.sort(rng.integers(0, 60 * DAY, len(s))).tolist() for s in seqs]
    uri = str(tmp_path / "users.parquet")
    storage.write_table(pa.table({"items": seqs, "ts": ts}), uri)
    opts = BaselineOptions(k_neighbors=20, pop_windows_days=(7, 30, 0), ease_lambdas=(10.0, 100.0))
    whole, target, chosen = baselines.baseline_per_user(uri, 40, (name,), (5, 10), opts)
    monkeypatch.setattr(baselines, "BLOCK_USERS", 4)  # 7 blocks, the last one ragged
    blocked, target2, chosen2 = baselines.baseline_per_user(uri, 40, (name,), (5, 10), opts)
    np.testing.assert_array_equal(target, [s[-1] for s in seqs])
    np.testing.assert_array_equal(target, target2)
    assert chosen == chosen2
    for m, v in whole[name].items():
        np.testing.assert_array_equal(v, blocked[name][m])
    assert whole[name]["recall@10"].shape == (25,)


@pytest.mark.unit
def test_itemknn_at_30k_items_is_memory_bounded_float32_top_k(monkeypatch):
    """30k items: a dense item-item float64 matrix would be 7.2 GB and one (2,000 x 30k) float64 score
    block 480 MB; the chunked float32 build with top-k neighbours stays far below either."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n_users, n_items, k = 2_000, 30_000, 50
    users = rng.integers(0, n_users, 40_000)
    items = rng.zipf(1.3, 40_000) % n_items
    hists = [rng.integers(0, n_items, 5) for _ in range(2_000)]
    built = []
    weights = baselines._itemknn_weights
    monkeypatch.setattr(baselines, "_itemknn_weights", lambda *a: built.append(weights(*a)) or built[-1])
    tracemalloc.start()
    shapes = [b.shape for b in itemknn_score_chunks(users, items, n_users, n_items, hists, k_neighbors=k,
                                                   chunk_size=4096)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    (w,) = built
    assert w.dtype == np.float32 and w.shape == (n_items, n_items)
    assert np.diff(w.tocsc().indptr).max() <= k  # at most k neighbours kept per item
    step = baselines._SCORE_BLOCK_ENTRIES // n_items  # 533 users per block
    assert shapes == [(step, n_items)] * 3 + [(2_000 - 3 * step, n_items)]
    assert peak < 250 * 2**20, f"peak {peak / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- popularity of the last N days

DAY = 86_400


@pytest.mark.unit
def test_windowed_popularity_hand_values():
    # events (item, day): (0, 0) (1, 10) (1, 28) (2, 29) (2, 1) (2, 2); newest = day 29
    items = np.array([0, 1, 1, 2, 2, 2])
    ts = np.array([0, 10, 28, 29, 1, 2]) * DAY
    # 7 days: (22, 29] -> item 1 at 28, item 2 at 29
    np.testing.assert_array_equal(windowed_popularity_scores(items, ts, 4, 7), [0, 1, 1, 0])
    # 28 days: (1, 29] -> day 1 is out (strictly older than 28 days), day 2 is in
    np.testing.assert_array_equal(windowed_popularity_scores(items, ts, 4, 28), [0, 2, 2, 0])
    # 30 days and 0 (= all time): every event
    np.testing.assert_array_equal(windowed_popularity_scores(items, ts, 4, 30), [1, 2, 3, 0])
    np.testing.assert_array_equal(windowed_popularity_scores(items, ts, 4, 0), [1, 2, 3, 0])
    # an explicit "now" (day 12): 7 days = (5, 12] -> item 1 at day 10 only (later events are not counted)
    np.testing.assert_array_equal(windowed_popularity_scores(items, ts, 4, 7, now=12 * DAY), [0, 1, 0, 0])
    assert windowed_popularity_scores(items, ts, 4, 7).dtype == np.float32
    with pytest.raises(ValueError):
        windowed_popularity_scores(items, ts, 4, -1)


def _users_table(tmp_path, seqs, days):
    import pyarrow as pa

    uri = str(tmp_path / "users.parquet")
    storage.write_table(pa.table({"items": seqs, "ts": [[d * DAY for d in ds] for ds in days]}), uri)
    return uri


@pytest.mark.unit
def test_window_is_chosen_on_validation_never_on_test(tmp_path):
    """Item 0 was popular long ago, item 1 is popular lately. The validation events are item 1 (the
    7-day window wins), the test events item 0 (all-time popularity would win): 7 days is chosen.

    Validation fit (train parts, newest day 97): bg [0,0,0,1,1] @1,2,3,96,97; q1 [2] @90; q2 [3] @91.
      7 days (90, 97]: counts [0, 2, 0, 1, 0]; all time: [3, 2, 1, 1, 0].
      q1 (seen {2}) and q2 (seen {3}) -> 7 days ranks item 1 first (hit), all time item 0 (miss);
      bg's validation item 4: a miss either way. HR@1 = NDCG@1: 7 days 2/3, all time 0.
    Test fit (newest day 98): 7 days (91, 98]: bg 1,1,4 + q1 1 + q2 1 -> [0, 4, 0, 0, 1]: q1 (seen
      {2, 1}) and q2 (seen {3, 1}) get item 4 first, their test item is 0: misses. (All time would hit.)"""
    seqs = [[0, 0, 0, 1, 1, 4, 4], [2, 1, 0], [3, 1, 0]]
    days = [[1, 2, 3, 96, 97, 98, 99], [90, 98, 99], [91, 98, 99]]
    uri = _users_table(tmp_path, seqs, days)
    opts = BaselineOptions(pop_windows_days=(7, 0))
    out, target, chosen = baselines.baseline_per_user(uri, 5, ("recent_popularity", "popularity"), (1,), opts)
    assert chosen["recent_popularity"]["param"] == 7
    assert chosen["recent_popularity"]["validation"] == pytest.approx({"7": 2 / 3, "0": 0.0})
    np.testing.assert_array_equal(target, [4, 0, 0])
    np.testing.assert_array_equal(out["recent_popularity"]["recall@1"], [0, 0, 0])
    # all-time popularity (no grid) on the same test: q1 and q2 get item 0 (count 3, unseen): hits
    np.testing.assert_array_equal(out["popularity"]["recall@1"], [0, 1, 1])
    assert chosen["popularity"] == {"param": None, "validation": {}, "metric": "ndcg@1"}


# ----------------------------------------------------------------------------- EASE

# X (users x items) = [[1,1,0],[0,1,1],[1,0,0]]; X^T X + 1 I = [[3,1,0],[1,3,1],[0,1,2]], det 13,
# P = (1/13) [[5,-2,1],[-2,6,-3],[1,-3,8]]; B[i,j] = -P[i,j]/P[j,j], diag 0:
EASE_B = np.array([[0.0, 1 / 3, -1 / 8],
                   [2 / 5, 0.0, 3 / 8],
                   [-1 / 5, 1 / 2, 0.0]])
EASE_USERS, EASE_ITEMS = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 2, 0])


@pytest.mark.unit
def test_ease_weights_hand_values():
    import scipy.sparse as sp

    x = sp.csr_matrix((np.ones(5), (EASE_USERS, EASE_ITEMS)), shape=(3, 3))
    b = baselines.ease_weights(x, 1.0)
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, EASE_B, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        baselines.ease_weights(x, 0.0)


@pytest.mark.unit
def test_ease_scores_are_history_rows_of_b():
    log = baselines.TrainLog(EASE_USERS, EASE_ITEMS, np.zeros(5, np.int64), 3, 3)
    opts = BaselineOptions()
    blocks = list(BASELINES["ease"].score(log, [np.array([0]), np.array([1, 2]), np.array([], np.int64)], opts, 1.0))
    scores = np.concatenate(blocks)
    np.testing.assert_allclose(scores[0], EASE_B[0], rtol=1e-5, atol=1e-6)  # [0, 1/3, -1/8]
    np.testing.assert_allclose(scores[1], EASE_B[1] + EASE_B[2], rtol=1e-5, atol=1e-6)  # [1/5, 1/2, 3/8]
    np.testing.assert_array_equal(scores[2], 0.0)
    # history {0}: item 1 (1/3) ranks before item 2 (-1/8); item 0 is seen
    assert baselines.rank_baseline("ease", log, [np.array([0])], 2, opts, 1.0).tolist() == [[1, 2]]


@pytest.mark.unit
def test_ease_is_skipped_above_the_catalog_limit_with_a_log_line(tmp_path, caplog):
    seqs = [[0, 1, 2, 3], [1, 2, 3, 4], [4, 3, 2, 1]]
    uri = _users_table(tmp_path, seqs, [[1, 2, 3, 4]] * 3)
    opts = BaselineOptions(ease_max_items=4)
    with caplog.at_level("WARNING"):
        out, _, chosen = baselines.baseline_per_user(uri, 5, ("ease", "popularity"), (1,), opts)
    assert "ease" not in out and "popularity" in out
    assert "5 items > eval.ease_max_items=4" in chosen["ease"]["skipped"]
    assert "EASE skipped" in caplog.text
    out, _, chosen = baselines.baseline_per_user(uri, 5, ("ease",), (1,), BaselineOptions(ease_max_items=5,
                                                                                        ease_lambdas=(1.0, 10.0)))
    assert chosen["ease"]["param"] in (1.0, 10.0) and set(chosen["ease"]["validation"]) == {"1.0", "10.0"}
