"""FAISS ANN path: seen items never returned, over-fetch refills short lists, recall vs exact search."""

import numpy as np
import pytest
import torch

from recsys_core.serve.ann import (
    AnnIndex,
    AnnSpec,
    default_nlist,
    drop_seen,
    recall_at_k,
)
from recsys_core.serve.retrieval import topk_excluding

pytest.importorskip("faiss")


def clustered(n_items: int, n_users: int, n_clusters: int = 20, dim: int = 16, seed: int = 0):
    """Items and users drawn around shared cluster centres (how trained embeddings look)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32) * 3
    items = centres[rng.integers(n_clusters, size=n_items)] + rng.normal(size=(n_items, dim)).astype(np.float32)
    users = centres[rng.integers(n_clusters, size=n_users)] + rng.normal(size=(n_users, dim)).astype(np.float32)
    return items.astype(np.float32), users.astype(np.float32)


@pytest.mark.unit
def test_drop_seen_hand_case():
    # user 0: candidates 4, 2, 7, 1 with 2 seen -> 4, 7 (k=2); user 1: a miss (-1) and 3 seen -> only 5 left.
    idx = np.array([[4, 2, 7, 1], [3, 5, -1, -1]])
    scores = np.array([[9, 8, 7, 6], [5, 4, -np.inf, -np.inf]], np.float32)
    out_idx, out_scores, found = drop_seen(idx, scores, [np.array([2]), np.array([3, 0])], k=2, n_items=8)
    np.testing.assert_array_equal(out_idx, [[4, 7], [5, -1]])
    np.testing.assert_array_equal(out_scores, np.array([[9, 7], [4, -np.inf]], np.float32))
    np.testing.assert_array_equal(found, [3, 1])


@pytest.mark.unit
def test_drop_seen_pads_when_fewer_candidates_than_k():
    out_idx, out_scores, found = drop_seen(np.array([[1]]), np.array([[0.5]], np.float32), [np.array([], np.int64)],
                                           k=3, n_items=4)
    np.testing.assert_array_equal(out_idx, [[1, -1, -1]])
    assert out_scores[0, 0] == np.float32(0.5) and np.isneginf(out_scores[0, 1:]).all()
    assert found.tolist() == [1]


@pytest.mark.unit
def test_default_nlist_bounds():
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(1000) == 25  # 1000 // 39: enough training points per centroid
    assert default_nlist(10) == 1


@pytest.mark.unit
def test_flat_index_equals_exact_search_with_seen_masked():
    items, users = clustered(500, 40)
    rng = np.random.default_rng(1)
    seen = [rng.choice(500, size=rng.integers(0, 30), replace=False) for _ in range(40)]
    want_idx, want_scores = topk_excluding(torch.from_numpy(users), torch.from_numpy(items), seen, k=10)
    idx, scores = AnnIndex(items, AnnSpec(kind="flat")).search(users, seen, k=10, block=16)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-4)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_never_returns_seen_items_even_when_they_fill_the_top(kind):
    items, users = clustered(3000, 60)
    exact, _ = topk_excluding(torch.from_numpy(users), torch.from_numpy(items), [np.zeros(0, np.int64)] * 60, k=200)
    # 3 users have seen their 150 best items (over the over-fetch quantile: a second, longer search); the rest 0-3.
    seen = [exact[u, :150] if u % 20 == 0 else exact[u, : u % 4] for u in range(60)]
    index = AnnIndex(items, AnnSpec(kind=kind, nlist=40, nprobe=10))
    calls = []
    raw = index._raw
    index._raw = lambda q, kk: calls.append((len(q), kk)) or raw(q, kk)
    idx, scores = index.search(users, seen, k=10)
    assert calls[0] == (60, 13) and calls[1] == (3, 160), calls  # k + 0.9-quantile of lengths, then k + 150
    assert idx.shape == (60, 10) and idx.dtype == np.int64 and scores.dtype == np.float32
    for u in range(60):
        assert not set(idx[u].tolist()) & set(seen[u].tolist()), f"user {u} got a seen item"
        assert (idx[u] >= 0).all(), f"user {u} has fewer than 10 items"
        np.testing.assert_allclose(scores[u], items[idx[u]] @ users[u], rtol=1e-5, atol=1e-4)
        assert np.all(np.diff(scores[u]) <= 0)


@pytest.mark.unit
@pytest.mark.parametrize("kind,spec", [("ivf", AnnSpec(kind="ivf", nlist=50, nprobe=8)),
                                        ("hnsw", AnnSpec(kind="hnsw", hnsw_m=16, ef_search=64))])
def test_ann_recall_at_10_on_clustered_data(kind, spec):
    items, users = clustered(5000, 200)
    rng = np.random.default_rng(2)
    seen = [rng.choice(5000, size=20, replace=False) for _ in range(200)]
    exact, _ = topk_excluding(torch.from_numpy(users), torch.from_numpy(items), seen, k=10)
    approx, _ = AnnIndex(items, spec).search(users, seen, k=10)
    assert recall_at_k(approx, exact) >= 0.9


@pytest.mark.unit
def test_recall_at_k_hand_case():
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [-1, -1, -1, -1]])  # the third user has nothing to find
    approx = np.array([[1, 2, 9, 8], [6, 7, -1, -1], [0, 1, 2, 3]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 4 + 1 / 2) / 2)


@pytest.mark.unit
def test_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="hnsw"):
        AnnIndex(np.zeros((4, 2), np.float32), AnnSpec(kind="lsh"))


def _scorer_inputs(tmp_path, n_items: int = 200, dim: int = 16):
    """A tiny two-tower model (loader injected), its item table and a recency-prior term on disk."""
    from recsys_core.config import ModelConfig, TowerConfig
    from recsys_core.model.towers import build_two_tower
    from recsys_core import storage

    torch.manual_seed(0)
    cfg = ModelConfig(item_tower=TowerConfig(size="tiny", dropout=0.0), user_tower=TowerConfig(size="tiny", dropout=0.0),
                      embed_dim=dim, max_seq_len=8, max_text_tokens=8)
    model = build_two_tower(cfg, n_items=n_items, temperature=0.5).eval()
    items, _ = clustered(n_items, 1, dim=dim)
    storage.write_npy(str(tmp_path / "items.npy"), items)
    rng = np.random.default_rng(3)
    storage.write_npy(str(tmp_path / "term.npy"), np.log1p(rng.integers(0, 50, n_items)).astype(np.float32))
    hist = [rng.choice(n_items, size=int(rng.integers(1, 12)), replace=False).astype(np.int64) for _ in range(64)]
    last_ts = rng.integers(0, 20 * 86_400, size=64).astype(np.int64)
    return (lambda uri: (model, {})), hist, last_ts


@pytest.mark.unit
@pytest.mark.parametrize("with_prior", [False, True])
def test_user_scorer_through_an_ann_index_matches_exact(tmp_path, with_prior):
    """infer.retrieval: the serving scorer's FAISS path (an exhaustive IVF: nprobe = nlist, and the flat
    index) returns the exact path's top-k, seen items excluded, with and without the recency prior."""
    import pyarrow as pa

    from recsys_core.model.prior import RecencyPrior
    from recsys_core.serve.infer import UserScorer

    loader, hist, last_ts = _scorer_inputs(tmp_path)
    prior = {}
    if with_prior:
        prior = {"prior": RecencyPrior(window_days=14, gap_edges_s=(3600, 86_400, 604_800),
                                       betas=(0.0, 2.0, 1.0, 8.0)).to_dict(),
                 "prior_term_uri": str(tmp_path / "term.npy"), "now": 20 * 86_400}
    common = dict(model_uri="m", item_emb_uri=str(tmp_path / "items.npy"), item_ids=pa.array(range(200)), k=10,
                  max_seq_len=8, model_version="v", loader=loader, **prior)
    exact = UserScorer(**common).rank(hist, last_ts if with_prior else None)
    for ann in ({"kind": "flat"}, {"kind": "ivf", "nlist": 5, "nprobe": 5}):
        got = UserScorer(**common, ann=ann).rank(hist, last_ts if with_prior else None)
        np.testing.assert_array_equal(got[0], exact[0])
        np.testing.assert_allclose(got[1], exact[1], rtol=1e-4, atol=1e-4)
        assert not any(set(r.tolist()) & set(h.tolist()) for r, h in zip(got[0], hist))  # seen never returned


@pytest.mark.unit
def test_retrieval_config_reaches_the_scorers():
    from recsys_core.config import InferConfig
    from recsys_core.pipeline import ann_spec

    assert ann_spec(InferConfig()) is None
    spec = ann_spec(InferConfig(retrieval="ivf", ann_nlist=64, ann_nprobe=4))
    assert AnnSpec(**spec) == AnnSpec(kind="ivf", nlist=64, nprobe=4, hnsw_m=32, ef_search=128)
