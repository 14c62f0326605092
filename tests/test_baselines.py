"""Baselines checked against hand-computed popularity counts and cosine similarities."""

import math

import numpy as np
import pytest

from recsys_core import storage
from recsys_core.eval import baselines
from recsys_core.eval.baselines import itemknn_score_chunks, popularity_scores


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
@pytest.mark.parametrize("name", ["popularity", "itemknn"])
def test_baselines_rank_the_same_in_small_score_blocks(tmp_path, monkeypatch, name):
    """The evaluate stage scores baselines a block of users at a time; block size changes nothing."""
    import pyarrow as pa


    rng = np.random.default_rng(1)
    seqs = [rng.choice(40, size=int(rng.integers(3, 12)), replace=False).tolist() for _ in range(25)]
    uri = str(tmp_path / "users.parquet")
    storage.write_table(pa.table({"items": seqs}), uri)
    whole, target = baselines.baseline_per_user(uri, 40, (name,), (5, 10), 20)
    monkeypatch.setattr(baselines, "BLOCK_USERS", 4)  # 7 blocks, the last one ragged
    blocked, target2 = baselines.baseline_per_user(uri, 40, (name,), (5, 10), 20)
    np.testing.assert_array_equal(target, [s[-1] for s in seqs])
    np.testing.assert_array_equal(target, target2)
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
