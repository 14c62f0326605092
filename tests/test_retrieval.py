"""Exact top-k with seen items masked, on a 3-user x 5-item case worked out by hand."""

import numpy as np
import pytest
import torch

from recsys_core.retrieval import topk_excluding, topk_from_scores

ITEMS = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, -1.0], [0.0, 2.0], [-1.0, 3.0]])
USERS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
# Inner products (user x item):
#   u0 (1, 0):  [ 1,  2,  3, 0, -1]   seen {2}       -> 1 (2), 0 (1), 3 (0)
#   u1 (0, 1):  [ 0,  1, -1, 2,  3]   seen {}        -> 4 (3), 3 (2), 1 (1)
#   u2 (-1, 0): [-1, -2, -3, 0,  1]   seen {0, 3, 4} -> 1 (-2), 2 (-3), then nothing left
SEEN = [np.array([2]), np.array([], dtype=np.int64), np.array([0, 3, 4])]
WANT_IDX = np.array([[1, 0, 3], [4, 3, 1], [1, 2, -1]])
WANT_SCORES = np.array([[2, 1, 0], [3, 2, 1], [-2, -3, -np.inf]], dtype=np.float32)


@pytest.mark.unit
def test_topk_excluding_hand_case():
    idx, scores = topk_excluding(USERS, ITEMS, SEEN, k=3)
    np.testing.assert_array_equal(idx, WANT_IDX)
    np.testing.assert_array_equal(scores, WANT_SCORES)
    assert idx.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.unit
def test_topk_excluding_never_returns_seen_items_and_scores_are_inner_products():
    idx, scores = topk_excluding(USERS, ITEMS, SEEN, k=3)
    full = (USERS @ ITEMS.T).numpy()
    for u in range(3):
        real = idx[u][idx[u] >= 0]
        assert not set(real) & set(SEEN[u].tolist())
        np.testing.assert_array_equal(scores[u, : len(real)], full[u, real])
        assert np.all(np.diff(scores[u, : len(real)]) < 0)  # best first


@pytest.mark.unit
def test_topk_excluding_chunk_of_one_user_matches_one_chunk():
    a = topk_excluding(USERS, ITEMS, SEEN, k=3, chunk=1)
    b = topk_excluding(USERS, ITEMS, SEEN, k=3, chunk=1024)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = topk_excluding(USERS, ITEMS, SEEN, k=3, chunk=2)
    np.testing.assert_array_equal(c[0], WANT_IDX)


@pytest.mark.unit
def test_topk_excluding_k_larger_than_catalog_pads_with_minus_one():
    idx, scores = topk_excluding(USERS[1:2], ITEMS, SEEN[1:2], k=7)
    np.testing.assert_array_equal(idx, [[4, 3, 1, 0, 2, -1, -1]])
    np.testing.assert_array_equal(scores, np.array([[3, 2, 1, 0, -1, -np.inf, -np.inf]], np.float32))


@pytest.mark.unit
def test_topk_excluding_no_users():
    idx, scores = topk_excluding(USERS[:0], ITEMS, [], k=3)
    assert idx.shape == (0, 3) and scores.shape == (0, 3)


@pytest.mark.unit
@pytest.mark.parametrize("chunk", [1, 2, 4096])
def test_topk_from_scores_matches_hand_case(chunk):
    scores = (USERS @ ITEMS.T).numpy().astype(np.float64)
    np.testing.assert_array_equal(topk_from_scores(scores, SEEN, k=3, chunk=chunk), WANT_IDX)


@pytest.mark.unit
def test_topk_from_scores_no_users():
    assert topk_from_scores(np.zeros((0, 5)), [], k=3).shape == (0, 3)
