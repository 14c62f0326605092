"""The split rules, in one place: which of a user's events train, validate and test.

Leave-one-out (the protocol of ``prepare``): a user's history is sorted by (ts, item_id); the last
event is the test target, the second-to-last the validation target, the rest is training data.
Every stage asks this module, never slices a history itself:

- ``train_part(seq)``: the events a model may train on;
- ``holdout(seqs, "val")``: inputs = training part, target = the validation event (model selection);
- ``holdout(seqs, "test")``: inputs = training + validation, target = the test event (the holdout).
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

from recsys_core import storage

Which = Literal["val", "test"]
HELD_OUT = {"val": 2, "test": 1}  # targets sit this many events from the end
MIN_EVENTS = 3  # a user needs a train, a validation and a test event


def train_part(seq: Sequence[int] | np.ndarray) -> Sequence[int] | np.ndarray:
    """The training events of one chronological history (validation and test removed)."""
    return seq[:-HELD_OUT["val"]]


def holdout(seqs: Sequence[Sequence[int]], which: Which) -> tuple[list[np.ndarray], np.ndarray]:
    """Model inputs (everything before the target) and the target of each history, for ``which``."""
    if which not in HELD_OUT:
        raise ValueError(f"split {which!r} unknown; choose from {sorted(HELD_OUT)}")
    cut = HELD_OUT[which]
    hist = [np.asarray(s[:-cut], dtype=np.int64) for s in seqs]
    tgt = np.asarray([s[-cut] for s in seqs], dtype=np.int64)
    return hist, tgt


def training_windows(items: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Next-item windows over a training sequence, newest first: inputs w[:-1], targets w[1:].

    A sequence of n items gives n-1 (input, target) positions, cut into windows of at most
    ``seq_len`` positions from the end so the most recent context is always complete.
    """
    out = []
    end = len(items)
    while end >= 2:
        start = max(0, end - seq_len - 1)
        w = items[start:end]
        out.append((w[:-1], w[1:]))
        end = start + 1
        if start == 0:
            break
    return out


def train_lengths(lengths: np.ndarray) -> np.ndarray:
    """(U,) number of training events of histories of ``lengths`` events: ``len(train_part(seq))``."""
    return np.maximum(np.asarray(lengths, dtype=np.int64) - HELD_OUT["val"], 0)


def training_window_bounds(n_train: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The windows of :func:`training_windows` for many sequences at once, without a Python loop.

    ``n_train`` (U,) holds each sequence's length. Returns (owner, start, end), each (W,): window w covers
    positions ``start[w]:end[w]`` of sequence ``owner[w]`` (inputs ``[start, end-1)``, targets
    ``[start+1, end)``); sequences in order, each one's windows newest first, as ``training_windows``.
    A sequence of n >= 2 items has ceil((n-1)/seq_len) windows, the j-th ending at n - j*seq_len.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = np.asarray(n_train, dtype=np.int64)  # (U,)
    n_win = np.where(n >= 2, (n - 2) // seq_len + 1, 0)  # (U,)
    owner = np.repeat(np.arange(n.shape[0], dtype=np.int64), n_win)  # (W,)
    j = np.arange(owner.shape[0], dtype=np.int64) - np.repeat(np.cumsum(n_win) - n_win, n_win)  # (W,) rank
    end = n[owner] - j * seq_len  # (W,)
    start = np.maximum(0, end - seq_len - 1)  # (W,)
    return owner, start, end


def load_split(users_uri: str, which: Which, max_users: int | None = None,
               seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, list[Any]]:
    """Histories, targets and user ids of the prepared users for ``which`` (``max_users`` sampled)."""
    t = storage.read_table(users_uri, columns=["user_id", "items"])
    if max_users is not None and t.num_rows > max_users:
        t = t.take(np.sort(np.random.default_rng(seed).choice(t.num_rows, max_users, replace=False)))
    hist, tgt = holdout(t["items"].to_pylist(), which)
    return hist, tgt, t["user_id"].to_pylist()
