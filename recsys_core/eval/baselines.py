"""Reference recommenders (popularity, popularity of the last N days, item-kNN, EASE) scored on the same split as the model.

They return raw SCORE matrices (item-kNN also as bounded blocks of query users); masking of seen items
and top-k selection are the caller's job.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from recsys_core import storage
from recsys_core.config import EvalConfig
from recsys_core.data.split import SPLIT_COLUMNS, fit_prefixes, fit_values, load_split, split_rows
from recsys_core.eval.metrics import per_user_metrics
from recsys_core.model.prior import DAY_S
from recsys_core.serve.retrieval import topk_from_scores

# Upper bound on dense float32 entries materialised at once while building similarities (~32 MiB).
_SIM_BLOCK_ENTRIES = 8_000_000
# Upper bound on the entries of one dense float32 (users, items) item-kNN score block (~64 MiB): at 30k+
# items a block holds fewer than ``chunk_size`` users.
_SCORE_BLOCK_ENTRIES = 16_000_000

_log = logging.getLogger(__name__)


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
    x = x.astype(np.float32)  # counts are exact in float32 below 2**24 co-occurrences
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
    vals = np.concatenate(vals_out) if vals_out else np.zeros(0, dtype=np.float32)
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
    blocks of at most ``chunk_size`` query users (fewer when a block would exceed ``_SCORE_BLOCK_ENTRIES``
    entries), in query order: memory is bounded by one block and by the float32 similarity blocks.

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
    q = _binary_matrix(q_rows, q_cols, n_q, n_items).astype(np.float32)  # (Q, I)
    step = max(1, min(chunk_size, _SCORE_BLOCK_ENTRIES // max(n_items, 1)))  # users per dense block
    for start in range(0, n_q, step):
        yield (q[start:start + step] @ w).toarray().astype(np.float32, copy=False)  # (q, I)


BLOCK_USERS = 4096  # query users per dense score block of a baseline


def windowed_popularity_scores(train_items: np.ndarray, train_ts: np.ndarray, n_items: int, window_days: int,
                               now: int | None = None) -> np.ndarray:
    """(n_items,) float32 counts of the training events in the last ``window_days`` days, i.e. with
    ``now - window_days * 86400 < ts <= now`` (``now``: the newest training event). 0 days = all time."""
    items = _check_index(train_items, n_items, "train_items")
    ts = np.asarray(train_ts, dtype=np.int64)
    if ts.shape != items.shape:
        raise ValueError(f"train_ts {ts.shape} and train_items {items.shape} differ in length")
    if window_days < 0:
        raise ValueError(f"window_days must be >= 0 (0 = all time), got {window_days}")
    if window_days == 0 or ts.size == 0:
        return popularity_scores(items, n_items)
    newest = int(ts.max()) if now is None else int(now)
    recent = (ts > newest - int(window_days) * DAY_S) & (ts <= newest)  # (E,)
    return popularity_scores(items[recent], n_items)


def ease_weights(x: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE (Steck 2019) in closed form, float32: P = (X^T X + lam I)^-1, B = I - P / diag(P), i.e.
    B[i, j] = -P[i, j] / P[j, j] off the diagonal and diag(B) = 0. Returns (I, I) B; scores = X_u B."""
    if lam <= 0:
        raise ValueError(f"EASE lambda must be > 0, got {lam}")
    xf = x.astype(np.float32)
    g = np.asarray((xf.T @ xf).todense(), dtype=np.float32)  # (I, I) Gram matrix
    g[np.diag_indices_from(g)] += np.float32(lam)
    p = np.linalg.inv(g)  # (I, I) float32
    b = p / (-np.diag(p))[None, :]  # column j divided by -P[j, j]
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32, copy=False)


@dataclass(frozen=True)
class TrainLog:
    """The interactions a baseline is fit on: one entry per training event."""

    users: np.ndarray  # (E,) row of the event's user
    items: np.ndarray  # (E,) item_idx
    ts: np.ndarray  # (E,) epoch seconds
    n_users: int
    n_items: int


@dataclass(frozen=True)
class BaselineOptions:
    """Baselines' settings (from EvalConfig): fixed ones and the grids chosen from on validation."""

    k_neighbors: int = 200
    pop_windows_days: tuple[int, ...] = (7, 14, 30, 90, 0)
    ease_lambdas: tuple[float, ...] = (1.0, 10.0, 100.0, 500.0, 2000.0)
    ease_max_items: int = 20_000


def baseline_options(ev: EvalConfig) -> BaselineOptions:
    return BaselineOptions(k_neighbors=ev.itemknn_neighbors, pop_windows_days=tuple(ev.pop_windows_days),
                           ease_lambdas=tuple(float(x) for x in ev.ease_lambdas), ease_max_items=ev.ease_max_items)


def _blocks(hist: list[np.ndarray], row: np.ndarray) -> Iterator[np.ndarray]:
    """One score row shared by every query user, as (q, N) blocks."""
    for s in range(0, len(hist), BLOCK_USERS):
        yield np.broadcast_to(row, (len(hist[s:s + BLOCK_USERS]), row.shape[0]))


def _query_matrix(hist: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    hists = [_check_index(h, n_items, f"query_histories[{i}]") for i, h in enumerate(hist)]
    lens = np.array([h.shape[0] for h in hists], dtype=np.int64)
    rows = np.repeat(np.arange(len(hists), dtype=np.int64), lens)
    cols = np.concatenate(hists) if hists else np.zeros(0, dtype=np.int64)
    return _binary_matrix(rows, cols, len(hists), n_items)


def _baseline_popularity(log: TrainLog, hist: list[np.ndarray], opts: BaselineOptions,
                         param: Any) -> Iterator[np.ndarray]:
    return _blocks(hist, popularity_scores(log.items, log.n_items))


def _baseline_recent_popularity(log: TrainLog, hist: list[np.ndarray], opts: BaselineOptions,
                                param: Any) -> Iterator[np.ndarray]:
    return _blocks(hist, windowed_popularity_scores(log.items, log.ts, log.n_items, int(param)))


def _baseline_itemknn(log: TrainLog, hist: list[np.ndarray], opts: BaselineOptions,
                      param: Any) -> Iterator[np.ndarray]:
    return itemknn_score_chunks(log.users, log.items, log.n_users, log.n_items, hist, k_neighbors=opts.k_neighbors,
                                chunk_size=BLOCK_USERS)


def _baseline_ease(log: TrainLog, hist: list[np.ndarray], opts: BaselineOptions,
                   param: Any) -> Iterator[np.ndarray]:
    b = ease_weights(_binary_matrix(_check_index(log.users, log.n_users, "train_users"),
                                    _check_index(log.items, log.n_items, "train_items"), log.n_users, log.n_items),
                     float(param))
    q = _query_matrix(hist, log.n_items)  # (Q, I)
    for s in range(0, len(hist), BLOCK_USERS):
        yield np.asarray(q[s:s + BLOCK_USERS] @ b, dtype=np.float32)  # (q, I)


@dataclass(frozen=True)
class Baseline:
    """A reference recommender: (train log, query histories, options, param) -> (q, N) score blocks in
    query order (memory: one block at a time); ``grid`` lists the params chosen from on validation
    ((None,): nothing to choose); ``skip`` says why it cannot run on a catalog (None: it runs)."""

    score: Callable[[TrainLog, list[np.ndarray], BaselineOptions, Any], Iterator[np.ndarray]]
    grid: Callable[[BaselineOptions], tuple[Any, ...]] = lambda o: (None,)
    skip: Callable[[BaselineOptions, int], str | None] = lambda o, n: None


def _ease_skip(opts: BaselineOptions, n_items: int) -> str | None:
    if n_items > opts.ease_max_items:
        return (f"EASE skipped: {n_items} items > eval.ease_max_items={opts.ease_max_items} (its dense "
                f"{n_items}x{n_items} float32 inverse would need {4 * n_items ** 2 / 2**30:.1f} GiB per copy)")
    return None


BASELINES: dict[str, Baseline] = {
    "popularity": Baseline(_baseline_popularity),
    "recent_popularity": Baseline(_baseline_recent_popularity, grid=lambda o: tuple(o.pop_windows_days)),
    "itemknn": Baseline(_baseline_itemknn),
    "ease": Baseline(_baseline_ease, grid=lambda o: tuple(o.ease_lambdas), skip=_ease_skip),
}


def train_log(hist: list[np.ndarray], hist_ts: list[np.ndarray], n_items: int) -> TrainLog:
    """Per-user event prefixes (items, ts) as a training log (user r = prefix r)."""
    users = np.repeat(np.arange(len(hist)), [len(h) for h in hist]).astype(np.int64)
    items = np.concatenate(hist).astype(np.int64) if hist else np.zeros(0, np.int64)
    ts = np.concatenate(hist_ts).astype(np.int64) if hist_ts else np.zeros(0, np.int64)
    return TrainLog(users, items, ts, len(hist), n_items)


def rank_baseline(name: str, log: TrainLog, hist: list[np.ndarray], k: int, opts: BaselineOptions,
                  param: Any) -> np.ndarray:
    """(Q, k) top-k item indices of baseline ``name`` for each query history (its items excluded)."""
    return _rank_blocks(BASELINES[name].score(log, hist, opts, param), hist, k)


def _rank_blocks(blocks: Iterator[np.ndarray], hist: list[np.ndarray], k: int) -> np.ndarray:
    """(Q, k) top-k of consecutive (q, N) score blocks of the query histories, their items excluded."""
    ranked, done = [], 0
    for block in blocks:
        ranked.append(topk_from_scores(block, hist[done:done + len(block)], k))  # (q, K)
        done += len(block)
    return np.concatenate(ranked) if ranked else np.zeros((0, k), np.int64)


def selection_metric(ks: tuple[int, ...]) -> str:
    """The metric the grids are chosen on: NDCG@10 (NDCG at the smallest k when 10 is not evaluated)."""
    return f"ndcg@{10 if 10 in ks else min(ks)}"


def choose_on_validation(name: str, users: pa.Table, n_items: int, ks: tuple[int, ...],
                         opts: BaselineOptions) -> tuple[Any, dict[str, float]]:
    """The grid value of baseline ``name`` with the best mean validation ``selection_metric`` (the
    first one on ties): fit on the validation split's fitting events, ranked for the validation
    targets. The test targets are never read. Returns the value and the validation score of every
    grid value."""
    grid = BASELINES[name].grid(opts)
    if len(grid) == 1:
        return grid[0], {}
    hist, target, _ = split_rows(users, "val")
    log = train_log(fit_prefixes(users, "items", "val"), fit_prefixes(users, "ts", "val"), n_items)
    metric = selection_metric(ks)
    scores = {str(g): float(per_user_metrics(rank_baseline(name, log, hist, max(ks), opts, g), target, ks)[metric].mean())
              for g in grid}
    best = max(range(len(grid)), key=lambda i: (scores[str(grid[i])], -i))
    return grid[best], scores


def baseline_per_user(users_uri: str, n_items: int, names: tuple[str, ...], ks: tuple[int, ...],
                      opts: BaselineOptions | int = BaselineOptions(), query_rows: np.ndarray | None = None
                      ) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, dict[str, dict[str, Any]]]:
    """Baselines fit on the test split's fitting events (leave-one-out: train+validation; temporal: every
    event before the cutoff), ranked for the test targets (seen excluded); a baseline with a grid has its value chosen on the validation split first (:func:`choose_on_validation`).

    Returns per-user metric values for each baseline that ran, the test item of each user, and per
    baseline what was chosen (``param``, ``validation`` scores) or why it was skipped (``skipped``).
    ``query_rows``: rows of ``users_uri`` to score (the holdout's sample, ``eval.max_users``); the
    baselines are still fit on every user."""
    if isinstance(opts, int):  # the item-kNN neighbour count alone
        opts = BaselineOptions(k_neighbors=opts)
    if not names:  # no baseline: the queried users' test targets alone (for the cold-start rows)
        cols = [c for c in storage.column_names(users_uri) if c in ("items", *SPLIT_COLUMNS)]
        q = storage.read_table(users_uri, cols) if query_rows is None else storage.take_rows(
            users_uri, np.asarray(query_rows, dtype=np.int64), cols)
        return {}, split_rows(q, "test")[1], {}
    t = storage.read_table(users_uri)
    hist, target, rows = split_rows(t, "test")
    log = train_log(fit_prefixes(t, "items", "test"), fit_prefixes(t, "ts", "test"), n_items)
    if query_rows is not None:  # score the sampled users only
        keep = np.isin(rows, np.asarray(query_rows, dtype=np.int64))
        hist, target = [h for h, k in zip(hist, keep) if k], target[keep]
    out: dict[str, dict[str, np.ndarray]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"eval.baselines: {name!r} unknown; choose from {sorted(BASELINES)}")
        why = BASELINES[name].skip(opts, n_items)
        if why is not None:
            _log.warning("%s", why)
            chosen[name] = {"skipped": why}
            continue
        param, val_scores = choose_on_validation(name, t, n_items, ks, opts)
        chosen[name] = {"param": param, "validation": val_scores, "metric": selection_metric(ks)}
        if val_scores:
            _log.info("baseline %s: %s on validation %s -> %s", name, selection_metric(ks), val_scores, param)
        out[name] = per_user_metrics(rank_baseline(name, log, hist, max(ks), opts, param), target, ks)
    return out, target, chosen


def validation_popularity(users_uri: str, n_items: int, max_users: int | None, seed: int,
                          ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """Popularity's mean metrics on the validation split, for the users the training loop validates
    on (``load_split(..., "val", train.val_users, train.seed)``): the scale for the validation curves.
    Fit on every user's validation-fitting events (the split's rule), each user's seen items excluded."""
    counts = np.zeros(n_items, dtype=np.int64)  # (I,) a batch of users at a time
    for t in storage.iter_batches(users_uri, columns=[c for c in storage.column_names(users_uri)
                                                      if c in ("items", *SPLIT_COLUMNS)]):
        counts += np.bincount(_check_index(fit_values(t, "items", "val"), n_items, "items"), minlength=n_items)
    hist, target, _ = load_split(users_uri, "val", max_users, seed)
    top = _rank_blocks(_blocks(hist, counts.astype(np.float32)), hist, max(ks))  # (U, K): popularity_scores
    return {name: float(v.mean()) if len(v) else 0.0 for name, v in per_user_metrics(top, target, ks).items()}
