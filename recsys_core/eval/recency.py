"""Choosing the recency prior (:mod:`recsys_core.model.prior`) on validation, and its test figure.

Two kinds of validation queries, both from the validation split's fitting log (test targets are never read):

- ``holdout``: each user's validation target (the protocol's rule), asked at the target's own time. Most
  such gaps are seconds or minutes: a user in the middle of a session.
- ``tomorrow``: the fitting log cut ``fraction`` of its time span before its newest event. For each user
  with fitting events on both sides, the first event after the cut is the target, asked at the cut. This
  is the nightly's own situation (users coming back after hours or weeks), one period earlier.

For each window, each gap bucket takes the weight with the best summed NDCG@10 over its queries (ties go
to the smaller weight). The window with the best total wins (ties go to the first).

Caveat, stated in the report: the model scored is the selection model. It trained on each user's events
up to the validation target, so a ``tomorrow`` target may be one of its training events. That flatters
the model against the prior, so the chosen weights err towards the model alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recsys_core import storage
from recsys_core.config import EvalConfig, PriorConfig
from recsys_core.data.split import Which, fit_prefixes, sample_rows, split_rows, temporal_cutoff
from recsys_core.eval.metrics import per_user_metrics, summarize_values
from recsys_core.model.checkpoint import load_checkpoint
from recsys_core.model.prior import DAY_S, RecencyPrior, apply_prior, prior_term, window_counts
from recsys_core.model.towers import user_vectors
from recsys_core.serve.retrieval import topk_from_scores

log = logging.getLogger(__name__)
CHUNK = 256  # queries per dense (q, N) score block
SELECT_K = 10  # the prior is chosen on NDCG@10


@dataclass(frozen=True)
class Queries:
    """Ranking questions asked at a time: history, the item that came next, when, and how long after
    the user's previous event."""

    hist: list[np.ndarray]  # (Q,) item_idx histories, oldest first
    target: np.ndarray  # (Q,) item_idx
    query_ts: np.ndarray  # (Q,) epoch seconds the question is asked at
    gap_s: np.ndarray  # (Q,) query_ts minus the history's last event

    def __len__(self) -> int:
        return len(self.hist)

    def take(self, rows: np.ndarray) -> "Queries":
        return Queries([self.hist[r] for r in rows], self.target[rows], self.query_ts[rows], self.gap_s[rows])

    def concat(self, other: "Queries") -> "Queries":
        return Queries(self.hist + other.hist, np.concatenate([self.target, other.target]),
                       np.concatenate([self.query_ts, other.query_ts]), np.concatenate([self.gap_s, other.gap_s]))


def holdout_queries(users: pa.Table, which: Which) -> Queries:
    """The split's targets (users table with items and ts), each asked at its own event time."""
    hist, target, rows = split_rows(users, which)
    ts = users["ts"].to_pylist()
    q = np.array([ts[r][len(h)] for r, h in zip(rows, hist)], dtype=np.int64)
    last = np.array([ts[r][len(h) - 1] for r, h in zip(rows, hist)], dtype=np.int64)
    return Queries(hist, np.asarray(target, dtype=np.int64), q, q - last)


def tomorrow_queries(users: pa.Table, which: Which, fraction: float) -> Queries:
    """The fitting log of ``which`` cut ``fraction`` of its span before its newest event: per user with
    events on both sides, the history before the cut and the first event after it, asked at the cut."""
    items, ts = fit_prefixes(users, "items", which), fit_prefixes(users, "ts", which)
    flat = np.concatenate(ts) if ts else np.zeros(0, np.int64)
    if flat.size == 0 or flat.min() == flat.max():
        return Queries([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    cut = temporal_cutoff(int(flat.min()), int(flat.max()), fraction)
    hist, target, last = [], [], []
    for it, t in zip(items, ts):
        before = int(np.searchsorted(t, cut, side="left"))
        if 0 < before < len(t):
            hist.append(it[:before])
            target.append(it[before])
            last.append(t[before - 1])
    n = len(hist)
    return Queries(hist, np.asarray(target, np.int64), np.full(n, cut, np.int64), cut - np.asarray(last, np.int64))


def fit_log(users: pa.Table, which: Which) -> tuple[np.ndarray, np.ndarray]:
    """(E,) items and ts of every fitting event of ``which``: what the prior's counts are taken from."""
    items, ts = fit_prefixes(users, "items", which), fit_prefixes(users, "ts", which)
    if not items:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(items).astype(np.int64), np.concatenate(ts).astype(np.int64)


def choose_prior(ndcg: dict[int, np.ndarray], buckets: np.ndarray, betas: tuple[float, ...],
                 gap_edges_s: tuple[int, ...]) -> tuple[RecencyPrior, dict[str, Any]]:
    """``ndcg[window]``: (len(betas), Q) per-query NDCG@10 with each weight. Per window, each bucket's
    weight maximises its summed NDCG (ties: the smaller weight); the best total window wins (ties: the
    first). Returns the prior and, per window, its mean NDCG and weights."""
    n_buckets = len(gap_edges_s) + 1
    order = np.argsort(np.asarray(betas), kind="stable")  # ties go to the smaller weight
    per_window: dict[str, Any] = {}
    best: tuple[float, int, tuple[float, ...]] | None = None
    for w, table in ndcg.items():
        chosen, total = [], 0.0
        for b in range(n_buckets):
            sums = table[:, buckets == b].sum(axis=1)  # (len(betas),)
            i = int(order[np.argmax(sums[order])])
            chosen.append(float(betas[i]))
            total += float(sums[i])
        mean = total / max(table.shape[1], 1)
        per_window[str(w)] = {"ndcg@10": mean, "betas": chosen}
        if best is None or mean > best[0]:
            best = (mean, int(w), tuple(chosen))
    if best is None:
        raise ValueError("choose_prior: no window to choose from")
    return RecencyPrior(best[1], best[2], tuple(gap_edges_s)), per_window


class QueryScorer:
    """The model's logits ``<u, v_i> / temperature`` for queries, in (q, N) blocks."""

    def __init__(self, model_dir: str, item_emb_uri: str, max_seq_len: int):
        self.model, _ = load_checkpoint(model_dir)
        self.table = torch.from_numpy(storage.read_npy(item_emb_uri))  # (N, D)
        self.max_seq_len = max_seq_len
        self.tau = float(self.model.temperature)

    @torch.no_grad()
    def logits(self, hist: list[np.ndarray]) -> np.ndarray:
        users = user_vectors(self.model, self.table, hist, self.max_seq_len)  # (q, D)
        return (users @ self.table.T / self.tau).float().numpy()  # (q, N)


def _grid(scorer: QueryScorer, qs: Queries, log_items: np.ndarray, log_ts: np.ndarray,
          pc: PriorConfig) -> dict[int, np.ndarray]:
    n_items = scorer.table.shape[0]
    out = {w: np.zeros((len(pc.betas), len(qs)), np.float64) for w in pc.windows_days}
    for s in range(0, len(qs), CHUNK):
        part = qs.take(np.arange(s, min(s + CHUNK, len(qs))))
        logits = scorer.logits(part.hist)  # (q, N)
        for w in pc.windows_days:
            term = prior_term(window_counts(log_items, log_ts, n_items, part.query_ts, w * DAY_S))  # (q, N)
            for j, beta in enumerate(pc.betas):
                top = topk_from_scores(apply_prior(logits, np.full(len(part), beta, np.float32), term),
                                       part.hist, SELECT_K)  # (q, 10)
                out[w][j, s:s + len(part)] = per_user_metrics(top, part.target, (SELECT_K,))[f"ndcg@{SELECT_K}"]
    return out


def _sample(qs: Queries, max_users: int, seed: int) -> Queries:
    return qs if len(qs) <= max_users else qs.take(sample_rows(len(qs), max_users, seed))


def rank_with_prior(scorer: QueryScorer, qs: Queries, prior: RecencyPrior, log_items: np.ndarray,
                    log_ts: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) top-k item_idx of model + prior (each history's items excluded)."""
    n_items, ranked = scorer.table.shape[0], []
    for s in range(0, len(qs), CHUNK):
        part = qs.take(np.arange(s, min(s + CHUNK, len(qs))))
        term = prior_term(window_counts(log_items, log_ts, n_items, part.query_ts, prior.window_days * DAY_S))
        scores = apply_prior(scorer.logits(part.hist), prior.weights(part.gap_s), term)  # (q, N)
        ranked.append(topk_from_scores(scores, part.hist, k))
    return np.concatenate(ranked) if ranked else np.zeros((0, k), np.int64)


def recency_prior(model_dir: str, item_emb_uri: str, users_uri: str, max_seq_len: int, ev: EvalConfig,
                  seed: int, test_rows: np.ndarray | None, n_test_users: int) -> dict[str, Any]:
    """Choose the prior on validation (the selection model in ``model_dir``) and measure model + prior on
    the test split (``test_rows``: the holdout's sample; None: every test user). Returns a JSON-able
    dict: ``chosen`` (a :class:`RecencyPrior` dict, None when the weights are all zero), the
    ``validation`` curve per window, query counts and ``test`` (summary with CIs, ``n_test_users``)."""
    pc = ev.prior
    users = storage.read_table(users_uri, columns=None)
    scorer = QueryScorer(model_dir, item_emb_uri, max_seq_len)
    val = _sample(holdout_queries(users, "val"), pc.max_users, seed)
    tom = _sample(tomorrow_queries(users, "val", pc.fraction), pc.max_users, seed)
    qs = val.concat(tom)
    items, ts = fit_log(users, "val")
    grid = _grid(scorer, qs, items, ts, pc)
    probe = RecencyPrior(pc.windows_days[0], tuple(0.0 for _ in range(len(pc.gap_edges_s) + 1)), pc.gap_edges_s)
    buckets = probe.buckets(qs.gap_s)
    prior, curve = choose_prior(grid, buckets, pc.betas, pc.gap_edges_s)
    zero = list(pc.betas).index(0.0)
    model_alone = float(grid[prior.window_days][zero].mean()) if len(qs) else 0.0
    log.info("recency prior: window %d d, weights %s by gap (edges %s s): validation NDCG@10 %.4f "
             "(model alone %.4f) on %d holdout + %d tomorrow queries", prior.window_days, list(prior.betas),
             list(prior.gap_edges_s), curve[str(prior.window_days)]["ndcg@10"], model_alone, len(val), len(tom))
    test = holdout_queries(users, "test")
    if test_rows is not None:  # the holdout's sample, by row of the users table
        _, _, rows = split_rows(users, "test")
        test = test.take(np.flatnonzero(np.isin(rows, np.asarray(test_rows, dtype=np.int64))))
    t_items, t_ts = fit_log(users, "test")
    top = rank_with_prior(scorer, test, prior, t_items, t_ts, max(ev.ks))
    test_m = summarize_values(per_user_metrics(top, test.target, ev.ks), n_test_users, ev.n_boot)
    bucket_counts = np.bincount(buckets, minlength=len(pc.gap_edges_s) + 1).tolist()
    return {"chosen": None if prior.off else prior.to_dict(), "selected": prior.to_dict(),
            "validation": {"per_window": curve, "model_alone_ndcg@10": model_alone,
                           "queries": {"holdout": len(val), "tomorrow": len(tom), "per_gap_bucket": bucket_counts}},
            "test": test_m, "test_users": len(test)}


def serving_term(users_uri: str, n_items: int, prior: RecencyPrior) -> tuple[np.ndarray, int]:
    """The published score's item term ``log(1 + c_W(i, now))`` over every prepared event, asked at
    ``now`` = the newest event + 1 s (the log as it stands tonight). Returns the (N,) term and ``now``."""
    t = storage.read_table(users_uri, columns=["items", "ts"])
    items = pc.list_flatten(t["items"]).to_numpy().astype(np.int64)  # (E,)
    ts = pc.list_flatten(t["ts"]).to_numpy().astype(np.int64)  # (E,)
    now = (int(ts.max()) if ts.size else 0) + 1
    counts = window_counts(items, ts, n_items, np.array([now]), prior.window_days * DAY_S)[0]  # (N,)
    return prior_term(counts), now
