"""Reference recommenders (popularity, item-kNN) scored on the same split as the model.

They return raw SCORE matrices (item-kNN also as bounded blocks of query users); masking of seen items
and top-k selection are the caller's job.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp

from recsys_core import storage
from recsys_core.data.split import holdout, load_split
from recsys_core.eval.metrics import per_user_metrics
from recsys_core.serve.retrieval import topk_from_scores

# Upper bound on dense float64 entries materialised at once while building similarities (~64 MiB).
_SIM_BLOCK_ENTRIES = 8_000_000


def _check_index(idx: np.ndarray, n: int, name: str) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {idx.shape}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{name} must hold integer indices, got dtype {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{name} has indices outside [0, {n})")
    return idx


def popularity_scores(train_item_idx: np.ndarray, n_items: int) -> np.ndarray:
    """(n_items,) float32 interaction counts of each item in the training interactions."""
    items = _check_index(train_item_idx, n_items, "train_item_idx")
    return np.bincount(items, minlength=n_items).astype(np.float32)  # (I,)


def _binary_matrix(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> sp.csr_matrix:
    """Binary (n_rows, n_cols) csr with a 1 wherever (row, col) occurs (duplicates count once)."""
    data = np.ones(rows.shape[0], dtype=np.float64)
    x = sp.csr_matrix((data, (rows, cols)), shape=(n_rows, n_cols))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def _topk_per_column(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and column offsets of the k largest positive entries of each column of block (I, B)."""
    n_rows = block.shape[0]
    if k < n_rows:
        keep = np.argpartition(-block, k - 1, axis=0)[:k]  # (k, B) ties broken arbitrarily
    else:
        keep = np.broadcast_to(np.arange(n_rows)[:, None], block.shape)  # (I, B)
    cols = np.broadcast_to(np.arange(block.shape[1])[None, :], keep.shape)  # same shape as keep
    vals = block[keep, cols]
    pos = vals > 0  # zero similarities never contribute to scores
    return keep[pos], cols[pos]


def _itemknn_weights(x: sp.csr_matrix, k_neighbors: int, shrink: float) -> sp.csr_matrix:
    """(I, I) sparse W with W[i, j] = cosine sim of i to j, keeping the top k_neighbors i per column j."""
    n_items = x.shape[1]
    xt = x.T.tocsr()  # (I, U)
    xc = x.tocsc()  # (U, I)
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())  # (I,) binary => ||x_i|| = sqrt(count)
    width = max(1, _SIM_BLOCK_ENTRIES // max(n_items, 1))
    rows_out: list[np.ndarray] = []
    cols_out: list[np.ndarray] = []
    vals_out: list[np.ndarray] = []
    for start in range(0, n_items, width):
        stop = min(start + width, n_items)
        co = (xt @ xc[:, start:stop]).toarray()  # (I, B) co-occurrence counts
        denom = norms[:, None] * norms[None, start:stop] + shrink  # (I, B)
        sim = np.divide(co, denom, out=np.zeros_like(co), where=denom > 0)  # (I, B)
        offs = np.arange(stop - start)
        sim[start + offs, offs] = 0.0  # no self-similarity
        r, c = _topk_per_column(sim, k_neighbors)
        rows_out.append(r)
        cols_out.append(c + start)
        vals_out.append(sim[r, c])
    rows = np.concatenate(rows_out) if rows_out else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(cols_out) if cols_out else np.zeros(0, dtype=np.int64)
    vals = np.concatenate(vals_out) if vals_out else np.zeros(0, dtype=np.float64)
    return sp.csr_matrix((vals, (rows, cols)), shape=(n_items, n_items))


def itemknn_score_chunks(
    train_users: np.ndarray,
    train_items: np.ndarray,
    n_users: int,
    n_items: int,
    query_histories: list[np.ndarray],
    k_neighbors: int = 200,
    shrink: float = 0.0,
    *,
    chunk_size: int = 4096,
) -> Iterator[np.ndarray]:
    """Item-kNN with cosine similarity (as in RecBole's ItemKNN), as dense (q, n_items) float32 score
    blocks of at most ``chunk_size`` query users, in query order: memory is bounded by one block.

    The binary user-item matrix (scipy.sparse csr) is built from the training interactions (duplicates
    count once); item-item similarity = (X^T X) / (||x_i|| ||x_j|| + shrink) with a zero diagonal, the
    top ``k_neighbors`` kept per item (column); a query user's scores = the sum of the similarity rows of
    the items in their history (items repeated within one history count once, as in RecBole). Ties at
    the ``k_neighbors`` cut-off are broken arbitrarily; zero similarities are dropped.
    """
    if k_neighbors < 1:
        raise ValueError(f"k_neighbors must be >= 1, got {k_neighbors}")
    if shrink < 0:
        raise ValueError(f"shrink must be >= 0, got {shrink}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    users = _check_index(train_users, n_users, "train_users")
    items = _check_index(train_items, n_items, "train_items")
    if users.shape != items.shape:
        raise ValueError(f"train_users {users.shape} and train_items {items.shape} differ in length")

    x = _binary_matrix(users, items, n_users, n_items)  # (U, I)
    w = _itemknn_weights(x, k_neighbors, float(shrink))  # (I, I)

    hists = [_check_index(h, n_items, f"query_histories[{i}]") for i, h in enumerate(query_histories)]
    n_q = len(hists)
    lens = np.array([h.shape[0] for h in hists], dtype=np.int64)  # (Q,)
    q_rows = np.repeat(np.arange(n_q, dtype=np.int64), lens)
    q_cols = np.concatenate(hists) if n_q else np.zeros(0, dtype=np.int64)
    q = _binary_matrix(q_rows, q_cols, n_q, n_items)  # (Q, I)
    for start in range(0, n_q, chunk_size):
        yield (q[start:start + chunk_size] @ w).toarray().astype(np.float32, copy=False)  # (q, I)


BLOCK_USERS = 4096  # query users per dense score block of a baseline


def _baseline_popularity(train_users: np.ndarray, train_items: np.ndarray, n_users: int, n_items: int,
                         hist: list[np.ndarray], **_: Any) -> Iterator[np.ndarray]:
    pop = popularity_scores(train_items, n_items)  # (N,), one row shared by every user
    for s in range(0, len(hist), BLOCK_USERS):
        yield np.broadcast_to(pop, (len(hist[s:s + BLOCK_USERS]), n_items))


def _baseline_itemknn(train_users: np.ndarray, train_items: np.ndarray, n_users: int, n_items: int,
                      hist: list[np.ndarray], k_neighbors: int = 200, **_: Any) -> Iterator[np.ndarray]:
    return itemknn_score_chunks(train_users, train_items, n_users, n_items, hist, k_neighbors=k_neighbors,
                                chunk_size=BLOCK_USERS)


# name -> (..., query histories) -> (q, N) score blocks in query order (memory: one block at a time)
BASELINES: dict[str, Callable[..., Iterator[np.ndarray]]] = {
    "popularity": _baseline_popularity,
    "itemknn": _baseline_itemknn,
}


def baseline_per_user(users_uri: str, n_items: int, names: tuple[str, ...], ks: tuple[int, ...],
                      k_neighbors: int) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """Baselines fit on train+validation interactions, ranked for the test item (seen excluded).

    Returns per-user metric values for each baseline and the test item of each user."""
    t = storage.read_table(users_uri, columns=["items"])
    hist, target = holdout(t["items"].to_pylist(), "test")
    train_users = np.repeat(np.arange(len(hist)), [len(h) for h in hist])
    train_items = np.concatenate(hist) if hist else np.zeros(0, np.int64)
    out = {}
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"eval.baselines: {name!r} unknown; choose from {sorted(BASELINES)}")
        ranked, done = [], 0
        for block in BASELINES[name](train_users, train_items, len(hist), n_items, hist, k_neighbors=k_neighbors):
            ranked.append(topk_from_scores(block, hist[done:done + len(block)], max(ks)))  # (q, K)
            done += len(block)
        top = np.concatenate(ranked) if ranked else np.zeros((0, max(ks)), np.int64)
        out[name] = per_user_metrics(top, target, ks)
    return out, target


def validation_popularity(users_uri: str, n_items: int, max_users: int | None, seed: int,
                          ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """Popularity's mean metrics on the validation split, for the users the training loop validates
    on (``load_split(..., "val", train.val_users, train.seed)``): the scale for the validation curves.
    Counts come from every user's training events; each user's seen items are excluded."""
    seqs = storage.read_table(users_uri, columns=["items"])["items"].to_pylist()
    train_hist, _ = holdout(seqs, "val")
    pop = popularity_scores(np.concatenate(train_hist) if train_hist else np.zeros(0, np.int64), n_items)
    hist, target, _ = load_split(users_uri, "val", max_users, seed)
    top = topk_from_scores(np.broadcast_to(pop, (len(hist), n_items)), hist, max(ks))  # (U, K)
    return {name: float(v.mean()) if len(v) else 0.0 for name, v in per_user_metrics(top, target, ks).items()}
