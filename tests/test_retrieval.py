"""Exact top-k with seen items masked, on a 3-user x 5-item case worked out by hand."""

import numpy as np
import pytest
import torch

from recsys_core.serve.retrieval import (
    select_topk,
    tile_shape,
    topk_excluding,
    topk_from_scores,
)

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


@pytest.mark.unit
@pytest.mark.parametrize("tile_items,tile_bytes", [(2, 1 << 20), (3, 8), (5, 4 * 5), (4096, 1 << 25)])
def test_topk_excluding_item_tiles_match_hand_case(tile_items, tile_bytes):
    # Tiles of 2-3 items split each user's row (and its seen items) across tiles; 8 bytes = 1 user per tile.
    idx, scores = topk_excluding(USERS, ITEMS, SEEN, k=3, tile_items=tile_items, tile_bytes=tile_bytes)
    np.testing.assert_array_equal(idx, WANT_IDX)
    np.testing.assert_array_equal(scores, WANT_SCORES)


@pytest.mark.unit
@pytest.mark.parametrize("width", [64 * 300, 64 * 300 + 17, 64 * 20 + 5, 7])
def test_select_topk_two_stage_equals_full_sort(width):
    # Long rows take the two-stage path (group maxima, then the best groups' columns and the tail).
    g = torch.Generator().manual_seed(width)
    scores = torch.randn(6, width, generator=g)
    scores[0, :] = float("-inf")  # a row with nothing left
    scores[1, width - 3:] = 100.0  # the best items sit in the ragged tail
    val, col = select_topk(scores, 10)
    want_val, want_col = torch.topk(scores, min(10, width), dim=1)
    torch.testing.assert_close(val, want_val)
    torch.testing.assert_close(scores.gather(1, col), val)  # columns point at their values
    np.testing.assert_array_equal(col[2:].numpy(), want_col[2:].numpy())  # distinct values: same columns


@pytest.mark.unit
@pytest.mark.parametrize("tile_items", [1024, 1000, 131_072])
def test_topk_excluding_random_matches_brute_force_across_tiles(tile_items):
    # 6,000 items: 6 tiles of 1,024 (the last 880 wide), 6 of 1,000, or one tile of 6,000: 93 groups of
    # 64 > 4 k, the two-stage selection with a ragged tail of 48 columns.
    rng = np.random.default_rng(0)
    users, items = torch.randn(37, 8, generator=torch.Generator().manual_seed(1)), torch.randn(6000, 8)
    seen = [rng.choice(6000, size=int(rng.integers(0, 200)), replace=False) for _ in range(37)]
    idx, scores = topk_excluding(users, items, seen, k=20, chunk=8, tile_items=tile_items)
    full = (users @ items.T).numpy()
    for u in range(37):
        row = full[u].copy()
        row[seen[u]] = -np.inf
        want = np.argsort(-row, kind="stable")[:20]
        np.testing.assert_array_equal(idx[u], want)
        np.testing.assert_allclose(scores[u], row[want], rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_tile_shape_respects_the_byte_budget():
    assert tile_shape(10_000, 1_000_000, chunk=1024) == (128, 131_072)  # 64 MiB / (4 B * 131,072)
    assert tile_shape(10, 1682, chunk=1024) == (10, 1682)
    assert tile_shape(5000, 1682, chunk=1024) == (1024, 1682)
