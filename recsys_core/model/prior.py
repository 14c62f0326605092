"""The recency prior: time in the served score (issue 13, item 4).

The two-tower score knows what a user likes, not what is being watched now nor how long the user has been
away. The published score adds a prior to the model's logit::

    score(u, i, t) = <u, v_i> / temperature + beta[g(t - t_last(u))] * log(1 + c_W(i, t))

- ``c_W(i, t)``: events of item ``i`` in the ``W`` days before the query time ``t``
  (``t - W * 86400 <= ts < t``), counted on the log the model was fit on;
- ``g``: the bucket of the time since the user's last event, cut at ``gap_edges_s`` (seconds): a user in
  the middle of a session is scored by taste alone, one back after weeks leans on what is popular now;
- ``beta``: one weight per bucket, chosen with ``W`` on validation (:mod:`recsys_core.eval.recency`);
  all zeros is the model alone.

Serving folds the prior into the inner product (:func:`augment_users`, :func:`augment_items`): one more dimension, ``tau * beta`` on
the user side and ``log(1 + c_W(i, now))`` on the item side, so exact top-k and ANN indexes work unchanged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

DAY_S = 86_400


def gap_buckets(gap_s: np.ndarray, gap_edges_s: tuple[int, ...]) -> np.ndarray:
    """(Q,) bucket of each gap: 0 below the first edge, i for edges[i-1] <= gap < edges[i]."""
    return np.digitize(np.asarray(gap_s, dtype=np.int64), np.asarray(gap_edges_s, dtype=np.int64))


@dataclass(frozen=True)
class RecencyPrior:
    """A chosen prior: the popularity window and one weight per time-since-last-event bucket."""

    window_days: int
    betas: tuple[float, ...]  # len(gap_edges_s) + 1 weights, bucket 0 = shortest gaps
    gap_edges_s: tuple[int, ...]  # increasing bucket edges in seconds

    def __post_init__(self) -> None:
        if len(self.betas) != len(self.gap_edges_s) + 1:
            raise ValueError(f"recency prior: {len(self.betas)} betas for {len(self.gap_edges_s) + 1} gap buckets")
        if list(self.gap_edges_s) != sorted(set(self.gap_edges_s)):
            raise ValueError(f"recency prior: gap_edges_s must increase strictly, got {list(self.gap_edges_s)}")
        if self.window_days <= 0:
            raise ValueError(f"recency prior: window_days must be > 0, got {self.window_days}")

    @property
    def off(self) -> bool:
        return all(b == 0 for b in self.betas)

    def buckets(self, gap_s: np.ndarray) -> np.ndarray:
        return gap_buckets(gap_s, self.gap_edges_s)

    def weights(self, gap_s: np.ndarray) -> np.ndarray:
        """(Q,) float32 beta of each query's gap bucket."""
        return np.asarray(self.betas, dtype=np.float32)[self.buckets(gap_s)]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "betas": list(self.betas), "gap_edges_s": list(self.gap_edges_s)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RecencyPrior":
        return cls(int(d["window_days"]), tuple(float(b) for b in d["betas"]), tuple(int(e) for e in d["gap_edges_s"]))


class TimeSortedLog:
    """An event log sorted by time once, for any number of :meth:`window_counts` calls."""

    def __init__(self, items: np.ndarray, ts: np.ndarray, n_items: int):
        items, ts = np.asarray(items, dtype=np.int64), np.asarray(ts, dtype=np.int64)
        if items.shape != ts.shape:
            raise ValueError(f"window_counts: items {items.shape} and ts {ts.shape} differ in length")
        order = np.argsort(ts, kind="stable")
        self.items, self.ts, self.n_items = items[order], ts[order], n_items  # (E,), (E,) by time

    def window_counts(self, query_ts: np.ndarray, window_s: int) -> np.ndarray:
        """(Q, N) float32: per query time ``t``, events of each item with ``t - window_s <= ts < t``.

        One pass over the log in time order: the running per-item counts at each window boundary are
        added to the query that ends there and subtracted from the one that starts there."""
        q = np.asarray(query_ts, dtype=np.int64)
        hi = np.searchsorted(self.ts, q, side="left")  # (Q,) first event at or after t
        lo = np.searchsorted(self.ts, q - int(window_s), side="left")  # (Q,) first event inside the window
        bounds, rows = np.concatenate([lo, hi]), np.concatenate([np.arange(len(q)), np.arange(len(q))])  # (2Q,)
        sign = np.concatenate([-np.ones(len(q), np.float32), np.ones(len(q), np.float32)])
        out = np.zeros((len(q), self.n_items), dtype=np.float32)
        running, done = np.zeros(self.n_items, dtype=np.float32), 0
        for i in np.argsort(bounds, kind="stable"):
            if bounds[i] > done:
                running += np.bincount(self.items[done:bounds[i]], minlength=self.n_items)[:self.n_items]
                done = int(bounds[i])
            out[rows[i]] += sign[i] * running
        return out


def window_counts(items: np.ndarray, ts: np.ndarray, n_items: int, query_ts: np.ndarray,
                  window_s: int) -> np.ndarray:
    """(Q, N) float32: :meth:`TimeSortedLog.window_counts` of a log sorted for this call alone."""
    return TimeSortedLog(items, ts, n_items).window_counts(query_ts, window_s)


def prior_term(counts: np.ndarray) -> np.ndarray:
    """log(1 + c), the prior's per-item feature (same shape as ``counts``)."""
    return np.log1p(np.asarray(counts, dtype=np.float32))


def apply_prior(logits: np.ndarray, weights: np.ndarray, term: np.ndarray) -> np.ndarray:
    """(Q, N) logits + weights[:, None] * term; ``term`` is (Q, N) or one (N,) row for every query."""
    term = np.asarray(term, dtype=np.float32)
    return logits + np.asarray(weights, dtype=np.float32)[:, None] * (term if term.ndim == 2 else term[None, :])


def augment_items(item_table: torch.Tensor, item_term: torch.Tensor) -> torch.Tensor:
    """(N, D+1): the item side of the prior as one more inner-product dimension, ``item_term`` (N,)."""
    return torch.cat([item_table, item_term.to(item_table.dtype)[:, None]], dim=1)


def augment_users(user_vecs: torch.Tensor, user_weight: torch.Tensor) -> torch.Tensor:
    """(U, D+1): the user side, ``user_weight`` (U,) in the units of ``u @ i`` (beta times the
    temperature), so ``augment_users(u, w) @ augment_items(t, c).T = u @ t.T + w[:, None] * c[None]``."""
    return torch.cat([user_vecs, user_weight.to(user_vecs.dtype)[:, None]], dim=1)
