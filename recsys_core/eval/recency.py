"""Choosing the recency prior (:mod:`recsys_core.model.prior`) on validation, and its test figure.

Two kinds of validation queries, both from the validation split's fitting log (test targets are never read):

- ``holdout``: each user's validation target (the protocol's rule), asked at the target's own time. Most
  such gaps are seconds or minutes: a user in the middle of a session.
- ``tomorrow``: the fitting log cut ``fraction`` of its time span before its newest event, and again at
  ``2 * fraction``, ... (``n_cuts`` cuts). For each cut and each user with fitting events on both sides, the
  first event after the cut is the target, asked at the cut. This is the nightly's own situation (users
  coming back after hours or weeks), one, two, ... periods earlier. One cut gives few such users (48 on
  MovieLens-100k) and the weights it picks swing from cut to cut; several cuts pool them.

For each window, each gap bucket takes the weight with the best summed NDCG@10 over its queries (ties go
to the smaller weight). The window with the best total wins (ties go to the first).

Caveat, stated in the report: the model scored is the selection model. It trained on each user's events
up to the validation target, so a ``tomorrow`` target may be one of its training events. That flatters
the model against the prior, so the chosen weights err towards the model alone.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recsys_core import storage
from recsys_core.config import EvalConfig, PriorConfig
from recsys_core.data.split import (
    SPLIT_COLUMNS,
    Which,
    fit_lens,
    fit_prefixes,
    fit_values,
    list_column,
    sample_rows,
    split_members,
    split_rows,
    temporal_cutoff,
)
from recsys_core.eval.metrics import per_user_metrics, summarize_values
from recsys_core.model.checkpoint import load_checkpoint
from recsys_core.model.losses import logits as scaled_logits
from recsys_core.model.prior import DAY_S, RecencyPrior, TimeSortedLog, apply_prior, gap_buckets, prior_term
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
    rows: np.ndarray  # (Q,) row of the asking user in the users table

    def __len__(self) -> int:
        return len(self.hist)

    def take(self, rows: np.ndarray) -> "Queries":
        return Queries([self.hist[r] for r in rows], self.target[rows], self.query_ts[rows], self.gap_s[rows],
                       self.rows[rows])

    def concat(self, other: "Queries") -> "Queries":
        return Queries(self.hist + other.hist, *(np.concatenate([getattr(self, f), getattr(other, f)])
                                                 for f in ("target", "query_ts", "gap_s", "rows")))

    def chunks(self, size: int = CHUNK) -> Iterator["Queries"]:
        for s in range(0, len(self), size):
            yield self.take(np.arange(s, min(s + size, len(self))))


@dataclass(frozen=True)
class FitLog:
    """Every user's fitting events of a split (per user, time order): the tomorrow queries' source and,
    flattened, what the prior's counts are taken from."""

    items: list[np.ndarray]  # (U,) item_idx per user
    ts: list[np.ndarray]  # (U,) epoch seconds per user

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(E,) items and ts of every fitting event."""
        if not self.items:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(self.items).astype(np.int64), np.concatenate(self.ts).astype(np.int64)

    def sorted(self, n_items: int) -> TimeSortedLog:
        return TimeSortedLog(*self.flat(), n_items)


def fit_log(users: pa.Table, which: Which) -> FitLog:
    """The fitting events of ``which`` (the split's rule, :func:`recsys_core.data.split.fit_prefixes`)."""
    return FitLog(fit_prefixes(users, "items", which), fit_prefixes(users, "ts", which))


def holdout_queries(users: pa.Table, which: Which) -> Queries:
    """The split's targets (users table with items and ts), each asked at its own event time."""
    hist, target, rows = split_rows(users, which)
    offsets, ts = list_column(users, "ts")  # (U+1,), (E,)
    at = offsets[:-1][rows] + np.fromiter((len(h) for h in hist), np.int64, len(hist))  # (Q,) the target's ts
    q = ts[at]
    last = np.where(at > offsets[:-1][rows], ts[np.maximum(at - 1, 0)], q)  # (Q,) an empty history: no gap
    return Queries(hist, np.asarray(target, dtype=np.int64), q, q - last, np.asarray(rows, np.int64))


def tomorrow_cuts(ts_min: int, ts_max: int, fraction: float, n_cuts: int) -> tuple[int, ...]:
    """The tomorrow-like cuts of a log spanning [ts_min, ts_max]: ``k * fraction`` of the span before its
    newest event, k = 1 .. n_cuts (the temporal protocol's rule, :func:`temporal_cutoff`)."""
    if n_cuts * fraction >= 1.0:
        raise ValueError(f"tomorrow_cuts: {n_cuts} cuts of {fraction} reach past the start of the log")
    return tuple(temporal_cutoff(ts_min, ts_max, k * fraction) for k in range(1, n_cuts + 1))


def _empty_queries() -> Queries:
    return Queries([], *(np.zeros(0, np.int64) for _ in range(4)))


def tomorrow_queries(log: FitLog, fraction: float, n_cuts: int = 1, cuts: Sequence[int] | None = None) -> Queries:
    """A fitting log cut at :func:`tomorrow_cuts` of its span (``cuts``: those times, given when ``log``
    holds only some users of the log): per cut and per user with events on both sides, the history before
    the cut and the first event after it, asked at the cut. Cut by cut, users in log order."""
    if cuts is None:
        _, flat = log.flat()
        if flat.size == 0 or flat.min() == flat.max():
            return _empty_queries()
        cuts = tomorrow_cuts(int(flat.min()), int(flat.max()), fraction, n_cuts)
    hist, target, asked, last, rows = [], [], [], [], []
    for cut in cuts:
        for r, (it, t) in enumerate(zip(log.items, log.ts)):
            before = int(np.searchsorted(t, cut, side="left"))
            if 0 < before < len(t):
                hist.append(it[:before])
                target.append(it[before])
                asked.append(cut)
                last.append(t[before - 1])
                rows.append(r)
    asked_ = np.asarray(asked, np.int64)
    return Queries(hist, np.asarray(target, np.int64), asked_, asked_ - np.asarray(last, np.int64),
                   np.asarray(rows, np.int64))


def _log_columns(users_uri: str) -> list[str]:
    return [c for c in storage.column_names(users_uri) if c in ("items", "ts", *SPLIT_COLUMNS)]


def read_fit_log(users_uri: str, which: Which, n_items: int) -> TimeSortedLog:
    """``fit_log(users, which).sorted(n_items)`` of a users file, read a batch of users at a time: (E,)
    arrays, no array per user."""
    items, ts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for t in storage.iter_batches(users_uri, _log_columns(users_uri)):
        items.append(fit_values(t, "items", which))
        ts.append(fit_values(t, "ts", which))
    return TimeSortedLog(np.concatenate(items), np.concatenate(ts), n_items)


def holdout_queries_at(users_uri: str, which: Which, rows: np.ndarray) -> Queries:
    """:func:`holdout_queries` of the users at ``rows`` (sorted) of a users file, reading only them;
    ``Queries.rows`` are rows of the file."""
    rows = np.asarray(rows, dtype=np.int64)
    q = holdout_queries(storage.take_rows(users_uri, rows, _log_columns(users_uri)), which)
    return replace(q, rows=rows[q.rows])


def sampled_tomorrow_queries(users_uri: str, val_log: TimeSortedLog, fraction: float, max_users: int,
                             seed: int, n_cuts: int = 1) -> Queries:
    """Per cut ``c`` of :func:`tomorrow_cuts`, ``_sample(tomorrow_queries(fit_log(users, "val"), cuts=[c]),
    max_users // n_cuts, seed)``, concatenated, reading a batch of users at a time (``val_log``: that fitting
    log, for its span) and then only the sampled users."""
    if val_log.ts.size == 0 or val_log.ts[0] == val_log.ts[-1]:
        return _empty_queries()
    cuts = tomorrow_cuts(int(val_log.ts[0]), int(val_log.ts[-1]), fraction, n_cuts)
    rows: list[list[np.ndarray]] = [[] for _ in cuts]
    start = 0
    for t in storage.iter_batches(users_uri, _log_columns(users_uri)):
        offsets, _ = list_column(t, "ts")  # (U+1,)
        n = fit_lens(t, offsets, "val")  # (U,) fitting events per user
        owner, fit_ts = np.repeat(np.arange(t.num_rows), n), fit_values(t, "ts", "val")  # (F,), (F,)
        for c, cut in enumerate(cuts):
            before = np.bincount(owner, weights=fit_ts < cut, minlength=t.num_rows).astype(np.int64)  # (U,)
            rows[c].append(start + np.flatnonzero((before > 0) & (before < n)))
        start += t.num_rows
    per_cut = max(1, max_users // len(cuts))
    out = _empty_queries()
    for cut, parts in zip(cuts, rows):
        rows_ = np.concatenate(parts).astype(np.int64)
        if len(rows_) > per_cut:
            rows_ = rows_[sample_rows(len(rows_), per_cut, seed)]
        q = tomorrow_queries(fit_log(storage.take_rows(users_uri, rows_, _log_columns(users_uri)), "val"), fraction,
                             cuts=[cut])
        out = out.concat(replace(q, rows=rows_[q.rows]))
    return out


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

    @torch.no_grad()
    def logits(self, hist: list[np.ndarray]) -> np.ndarray:
        users = user_vectors(self.model, self.table, hist, self.max_seq_len)  # (q, D)
        return scaled_logits(users, self.table, self.model.temperature).numpy()  # (q, N)


def _grid(scorer: QueryScorer, qs: Queries, log: TimeSortedLog, pr: PriorConfig) -> dict[int, np.ndarray]:
    """Per window, (len(betas), Q) per-query NDCG@10 of model + prior with each weight for every query."""
    out = {w: np.zeros((len(pr.betas), len(qs)), np.float64) for w in pr.windows_days}
    s = 0
    for part in qs.chunks():
        logits = scorer.logits(part.hist)  # (q, N)
        for w in pr.windows_days:
            term = prior_term(log.window_counts(part.query_ts, w * DAY_S))  # (q, N)
            for j, beta in enumerate(pr.betas):
                top = topk_from_scores(apply_prior(logits, np.full(len(part), beta, np.float32), term),
                                       part.hist, SELECT_K)  # (q, 10)
                out[w][j, s:s + len(part)] = per_user_metrics(top, part.target, (SELECT_K,))[f"ndcg@{SELECT_K}"]
        s += len(part)
    return out


def tomorrow_popularity_window(users: pa.Table, n_items: int, windows_days: tuple[int, ...],
                               fraction: float, n_cuts: int = 1) -> tuple[int, dict[str, float]]:
    """The popularity window a practitioner shipping tomorrow's list would pick: on the validation
    fitting log's ``tomorrow`` queries (the prior's, ``n_cuts`` cuts), the window (days; 0 = all time) whose
    counts of the events in the last W days before each cut rank the targets best by NDCG@10, seen items
    excluded (ties: the first). Returns the window and the mean NDCG@10 per window."""
    val_log = fit_log(users, "val")
    qs = tomorrow_queries(val_log, fraction, n_cuts)
    if not len(qs):
        raise ValueError(f"tomorrow_popularity_window: no user has fitting events on both sides of a cut "
                         f"{fraction:.0%} of the span (x1..{n_cuts}) before the newest event")
    log = val_log.sorted(n_items)
    curve: dict[str, float] = {}
    for w in windows_days:
        span = w * DAY_S if w else int(qs.query_ts.max() - log.ts.min()) + 1  # 0: every event before the cut
        ndcg = [per_user_metrics(topk_from_scores(log.window_counts(part.query_ts, span), part.hist, SELECT_K),
                                 part.target, (SELECT_K,))[f"ndcg@{SELECT_K}"] for part in qs.chunks()]
        curve[str(w)] = float(np.concatenate(ndcg).mean())
    return max(windows_days, key=lambda w: curve[str(w)]), curve


def _sample(qs: Queries, max_users: int, seed: int) -> Queries:
    return qs if len(qs) <= max_users else qs.take(sample_rows(len(qs), max_users, seed))


def rank_with_prior(scorer: QueryScorer, qs: Queries, prior: RecencyPrior, log: TimeSortedLog,
                    k: int) -> np.ndarray:
    """(Q, k) top-k item_idx of model + prior (each history's items excluded)."""
    ranked = []
    for part in qs.chunks():
        term = prior_term(log.window_counts(part.query_ts, prior.window_days * DAY_S))  # (q, N)
        scores = apply_prior(scorer.logits(part.hist), prior.weights(part.gap_s), term)  # (q, N)
        ranked.append(topk_from_scores(scores, part.hist, k))
    return np.concatenate(ranked) if ranked else np.zeros((0, k), np.int64)


def published_prior(evaluated: dict[str, Any] | None) -> dict[str, Any] | None:
    """The prior the new model publishes with (``metrics["recency_prior"]``): the selected one, None when
    the prior is off or every chosen weight is 0."""
    sel = (evaluated or {}).get("selected")
    return None if sel is None or RecencyPrior.from_dict(sel).off else sel


def recency_prior(model_dir: str, item_emb_uri: str, users_uri: str, max_seq_len: int, ev: EvalConfig,
                  seed: int, test_rows: np.ndarray | None, n_test_users: int) -> dict[str, Any]:
    """Choose the prior on validation (the selection model in ``model_dir``) and measure model + prior on
    the test split (``test_rows``: the holdout's sample; None: every test user). Returns a JSON-able
    dict: ``selected`` (a :class:`RecencyPrior` dict; :func:`published_prior` says whether it is used),
    the ``validation`` curve per window, query counts and ``test`` (summary with CIs over ``n_test_users``)."""
    pr = ev.prior
    scorer = QueryScorer(model_dir, item_emb_uri, max_seq_len)
    n_items = scorer.table.shape[0]
    val_log = read_fit_log(users_uri, "val", n_items)
    val = holdout_queries_at(users_uri, "val", split_members(users_uri, "val", pr.max_users, seed))
    tom = sampled_tomorrow_queries(users_uri, val_log, pr.fraction, pr.max_users, seed, pr.n_cuts)
    qs = val.concat(tom)
    grid = _grid(scorer, qs, val_log, pr)
    del val_log
    buckets = gap_buckets(qs.gap_s, pr.gap_edges_s)
    prior, curve = choose_prior(grid, buckets, pr.betas, pr.gap_edges_s)
    model_alone = float(grid[prior.window_days][list(pr.betas).index(0.0)].mean()) if len(qs) else 0.0
    log.info("recency prior: window %d d, weights %s by gap (edges %s s): validation NDCG@10 %.4f "
             "(model alone %.4f) on %d holdout + %d tomorrow queries", prior.window_days, list(prior.betas),
             list(prior.gap_edges_s), curve[str(prior.window_days)]["ndcg@10"], model_alone, len(val), len(tom))
    # the holdout's sample (rows of the users table; None: every test user)
    test = holdout_queries_at(users_uri, "test", split_members(users_uri, "test") if test_rows is None else test_rows)
    top = rank_with_prior(scorer, test, prior, read_fit_log(users_uri, "test", n_items), max(ev.ks))
    test_m = summarize_values(per_user_metrics(top, test.target, ev.ks), n_test_users, ev.n_boot)
    bucket_counts = np.bincount(buckets, minlength=len(pr.gap_edges_s) + 1).tolist()
    return {"selected": prior.to_dict(),
            "validation": {"per_window": curve, "model_alone_ndcg@10": model_alone,
                           "queries": {"holdout": len(val), "tomorrow": len(tom), "per_gap_bucket": bucket_counts}},
            "test": test_m, "test_users": len(test)}


def serving_term(users_uri: str, n_items: int, prior: RecencyPrior) -> tuple[np.ndarray, int]:
    """The published score's item term ``log(1 + c_W(i, now))`` over every prepared event, asked at
    ``now`` = the newest event + 1 s (the log as it stands tonight). Returns the (N,) term and ``now``.
    Two passes a batch at a time (the newest event, then the window's counts): item-sized memory."""
    newest = None
    for t in storage.iter_batches(users_uri, columns=["ts"]):
        flat = pc.list_flatten(t["ts"])
        if len(flat):
            m = int(pc.max(flat).as_py())
            newest = m if newest is None else max(newest, m)
    now = (0 if newest is None else newest) + 1
    start = now - prior.window_days * DAY_S  # the window: start <= ts < now (TimeSortedLog.window_counts)
    counts = np.zeros(n_items, dtype=np.int64)  # (N,)
    for t in storage.iter_batches(users_uri, columns=["items", "ts"]):
        items = pc.list_flatten(t["items"]).to_numpy().astype(np.int64)  # (E,)
        ts = pc.list_flatten(t["ts"]).to_numpy().astype(np.int64)  # (E,)
        counts += np.bincount(items[(ts >= start) & (ts < now)], minlength=n_items)[:n_items]
    return prior_term(counts.astype(np.float32)), now
