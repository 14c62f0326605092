"""The split rules, in one place: which of a user's events train, validate and test.

Leave-one-out (the protocol of ``prepare``): a user's history is sorted by (ts, item_id); the last
event is the test target, the second-to-last the validation target, the rest is training data.
Every stage asks this module, never slices a history itself:

- ``train_part(seq)``: the events a model may train on;
- ``holdout(seqs, "val")``: inputs = training part, target = the validation event (model selection);
- ``holdout(seqs, "test")``: inputs = training + validation, target = the test event (the holdout).

Temporal (``eval.protocol: temporal``, the production view): one global cutoff ``eval.temporal_fraction``
of the log's time span before its newest event. Every event before the cutoff trains; a user with
events on both sides is evaluated on the first event after it (the next item), with the events before
it as inputs; users are assigned to validation or test by a stable hash of their id (half each).
Users whose every event is after the cutoff have no history: they neither train nor evaluate. A
target item first seen after the cutoff stays a target (the catalog holds it and the text tower can
score it; ID-only baselines cannot) and is counted (``cold_targets``).

Prepare writes the rule of the configured protocol as per-user columns (:data:`SPLIT_COLUMNS`), and
every stage reads them through :func:`split_rows` / :func:`fit_prefixes` / :func:`train_len_of`;
tables without them follow leave-one-out.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


# Per-user split columns: the model's training prefix, the validation and test target positions
# (null: not in that split) and the baselines' fitting prefix for the test split.
SPLIT_COLUMNS = ("train_len", "val_pos", "test_pos", "test_fit_len")


def temporal_cutoff(ts_min: int, ts_max: int, fraction: float) -> int:
    """The global cutoff ``fraction`` of the span before the newest event: events with ts < cutoff train."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval.temporal_fraction must be in (0, 1), got {fraction}")
    return int(np.floor(ts_max - fraction * (ts_max - ts_min)))


def temporal_role(user_id: Any) -> Which:
    """Validation or test, by a stable hash of the user id (the same on every run and machine)."""
    return "val" if zlib.crc32(str(user_id).encode()) % 2 == 0 else "test"


def _loo_rule(user_id: Any, ts: np.ndarray, cutoff: int | None) -> tuple[int, int | None, int | None, int]:
    n = len(ts)
    return n - HELD_OUT["val"], n - HELD_OUT["val"], n - HELD_OUT["test"], n - HELD_OUT["test"]


def _temporal_rule(user_id: Any, ts: np.ndarray, cutoff: int | None) -> tuple[int, int | None, int | None, int]:
    if cutoff is None:
        raise ValueError("the temporal protocol needs a cutoff")
    before = int(np.searchsorted(np.asarray(ts), cutoff, side="left"))  # chronological: events with ts < cutoff
    if before == 0 or before == len(ts):  # no history before, or nothing after: not evaluated
        return before, None, None, before
    role = temporal_role(user_id)
    return before, before if role == "val" else None, before if role == "test" else None, before


# protocol -> (user id, chronological ts, cutoff) -> (train_len, val_pos, test_pos, test_fit_len)
PROTOCOLS: dict[str, Callable[[Any, np.ndarray, int | None], tuple[int, int | None, int | None, int]]] = {
    "loo": _loo_rule,
    "temporal": _temporal_rule,
}


def split_columns(batch: pa.Table, protocol: str, cutoff: int | None) -> pa.Table:
    """Add the :data:`SPLIT_COLUMNS` of ``protocol`` to prepared users (user_id, items, ts)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol: {protocol!r} unknown; choose from {sorted(PROTOCOLS)}")
    rows = [PROTOCOLS[protocol](u, np.asarray(t, dtype=np.int64), cutoff)
            for u, t in zip(batch["user_id"].to_pylist(), batch["ts"].to_pylist())]
    cols = list(zip(*rows)) if rows else [[] for _ in SPLIT_COLUMNS]
    for name, values in zip(SPLIT_COLUMNS, cols):
        batch = batch.append_column(name, pa.array(list(values), pa.int32()))
    return batch


NEVER = np.iinfo(np.int64).max  # first-seen ts of an item without any event


def cold_targets(targets: Sequence[int], first_seen: np.ndarray, cutoff: int) -> int:
    """How many targets are items first seen at or after the cutoff (``first_seen``: (N,) ts of each
    item's first event, :data:`NEVER` when none)."""
    return int((np.asarray(first_seen)[np.asarray(targets, dtype=np.int64)] >= cutoff).sum())


def has_split_columns(table: pa.Table) -> bool:
    return all(c in table.column_names for c in SPLIT_COLUMNS)


def list_column(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (U+1,) into values, values (E,) as int64) of a list column, without Python objects."""
    col = table[column]
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return (arr.offsets.to_numpy().astype(np.int64),
            np.asarray(arr.values.to_numpy(zero_copy_only=False), dtype=np.int64))


def _int_column(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(values with nulls as 0, valid mask), each (U,), of an integer column."""
    col = table[column]
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_null(arr.type):  # every value null
        return np.zeros(len(arr), dtype=np.int64), np.zeros(len(arr), dtype=bool)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return pc.fill_null(arr, 0).to_numpy(zero_copy_only=False).astype(np.int64), valid


def _loo_cut(lens: np.ndarray, which: Which) -> np.ndarray:
    if which not in HELD_OUT:
        raise ValueError(f"split {which!r} unknown; choose from {sorted(HELD_OUT)}")
    if (lens < HELD_OUT[which]).any():
        raise ValueError(f"a history of {int(lens.min())} events has no {which} target (leave-one-out needs "
                         f"{HELD_OUT[which]} or more)")
    return lens - HELD_OUT[which]


def split_rows(table: pa.Table, which: Which) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Inputs, targets and row indices of the users of ``which`` in a users table (items, and the
    split columns; leave-one-out over every row without them). Inputs are int64 views of one array."""
    offsets, values = list_column(table, "items")  # (U+1,), (E,)
    if not has_split_columns(table):
        pos = _loo_cut(np.diff(offsets), which)  # (U,) index of the target in each history
        rows = np.arange(len(pos), dtype=np.int64)
    else:
        pos, valid = _int_column(table, f"{which}_pos")  # (U,)
        rows = np.flatnonzero(valid).astype(np.int64)
        bad = (pos[rows] < 0) | (pos[rows] >= np.diff(offsets)[rows])
        if bad.any():
            raise ValueError(f"{which}_pos {int(pos[rows][bad][0])} of row {int(rows[bad][0])} is outside its "
                             f"history of {int(np.diff(offsets)[rows][bad][0])} events")
    starts = offsets[:-1][rows]  # (Q,)
    ends = starts + pos[rows]  # (Q,) the target's index in values
    return [values[a:b] for a, b in zip(starts.tolist(), ends.tolist())], values[ends], rows


def fit_prefixes(table: pa.Table, column: str, which: Which) -> list[np.ndarray]:
    """Every user's events a baseline may be fit on for ``which`` (``column``: items or ts): before the
    user's own target (leave-one-out) or before the cutoff (temporal). int64 views of one array."""
    offsets, values = list_column(table, column)  # (U+1,), (E,)
    n = fit_lens(table, offsets, which)  # (U,)
    starts = offsets[:-1]
    return [values[a:b] for a, b in zip(starts.tolist(), (starts + n).tolist())]


def fit_values(table: pa.Table, column: str, which: Which) -> np.ndarray:
    """The events of :func:`fit_prefixes`, concatenated in user order: (F,) int64, no object per user."""
    offsets, values = list_column(table, column)  # (U+1,), (E,)
    n = fit_lens(table, offsets, which)  # (U,)
    first = np.repeat(np.cumsum(n) - n, n)  # (F,) where each event's user starts in the output
    return values[np.repeat(offsets[:-1], n) + np.arange(int(n.sum()), dtype=np.int64) - first]


def fit_lens(table: pa.Table, offsets: np.ndarray, which: Which) -> np.ndarray:
    """(U,) (``offsets``: (U+1,) of one of its list columns) how many of each user's first events a baseline may fit on for ``which``."""
    if not has_split_columns(table):
        return _loo_cut(np.diff(offsets), which)
    return np.clip(_int_column(table, "train_len" if which == "val" else "test_fit_len")[0], 0, np.diff(offsets))


def train_len_of(seq: Sequence[int], train_len: int | None) -> int:
    """The model's training prefix length of a history (leave-one-out when no split column)."""
    return len(train_part(seq)) if train_len is None else int(train_len)


def sample_rows(n: int, k: int, seed: int) -> np.ndarray:
    """(k,) sorted distinct rows of ``n`` drawn with ``seed``: the one sampling rule of validation and holdout users."""
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def split_members(users_uri: str, which: Which, max_users: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted rows of the users file that have a ``which`` target (every row without split columns),
    ``max_users`` of them sampled with ``seed``. Reads the ``{which}_pos`` column only."""
    names = storage.column_names(users_uri)
    if all(c in names for c in SPLIT_COLUMNS):
        valid = [t[f"{which}_pos"].is_valid().to_numpy(zero_copy_only=False)
                 for t in storage.iter_batches(users_uri, columns=[f"{which}_pos"])]
        rows = np.flatnonzero(np.concatenate(valid)) if valid else np.zeros(0, np.int64)
    else:
        rows = np.arange(storage.parquet_totals(users_uri)[0])
    rows = rows.astype(np.int64)
    if max_users is not None and len(rows) > max_users:
        rows = rows[sample_rows(len(rows), max_users, seed)]
    return rows


def load_split(users_uri: str, which: Which, max_users: int | None = None,
               seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, list[Any]]:
    """Histories, targets and user ids of the prepared users for ``which`` (``max_users`` sampled:
    :func:`split_members`). Only those users' rows are read."""
    names = storage.column_names(users_uri)
    t = storage.take_rows(users_uri, split_members(users_uri, which, max_users, seed),
                          columns=[c for c in ("user_id", "items", *SPLIT_COLUMNS) if c in names])
    hist, tgt, _ = split_rows(t, which)
    return hist, tgt, t["user_id"].to_pylist()
