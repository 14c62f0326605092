"""Prepare stage: read, validate, quarantine, split, and build histories and training examples (Ray Data).

Outputs, under ``{root}/runs/run_date=D/prepared/``:
- ``items.parquet``: item_idx, item_id, text, input_ids (tokenised once per run), train_count, event_count
  (every kept event, held-out ones included)
- ``users/``: one row per kept user: user_id, items (list<int32> item_idx, chronological), ts
- ``train_examples/``: next-item windows over each user's training part: input, target (list<int32>)
- ``full_examples/`` (``train.refit``): the same windows over each user's whole history, held-out events
  included, for the model that is published after selection
- ``quarantine/``: rejected rows (user_id, item_id, ts as text, reason, file), never silently dropped
- ``stats.json``: row counts, reject counts per reason, user and example counts

Protocol (``eval.protocol``, rules in recsys_core.data.split): per user, sort by (ts, item_id); leave-one-out:
last = test, second-to-last = validation, rest = train; temporal: a global cutoff. ``users/`` carries
the rule as per-user columns (train_len, val_pos, test_pos, test_fit_len).

Inputs are checked before any Ray work, from the parquet footers only: every file's schema (a corrupt
file, a missing column, an unsupported type such as float item ids, or a type family that differs
between files is an error naming the file), zero-row files are skipped wherever they sort, and numeric
timestamp columns whose footer statistics look like a finer unit than ``data.ts_unit`` are refused.
Row by row, timestamps are converted to epoch seconds without any overflowing cast; unparseable ones
are quarantined as ``bad_timestamp``, implausible ones (outside ``prepare.min_ts`` .. ``max_ts``) as
``ts_out_of_range``, and numbers that are plausible only in another unit as ``ts_unit_mismatch``,
which fails the run naming the files.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.context import ShuffleStrategy

from recsys_core import storage
from recsys_core.config import NightlyConfig, TrainConfig
from recsys_core.data.sources import SourceData
from recsys_core.data.split import (
    MIN_EVENTS,
    NEVER,
    SPLIT_COLUMNS,
    cold_targets,
    split_columns,
    temporal_cutoff,
    train_lengths,
    training_window_bounds,
)
from recsys_core.data.text import (
    load_tokenizer,
    render_texts,
    template_fields,
    tokenize_texts,
)

log = logging.getLogger(__name__)
REASONS = ("null_user_id", "null_item_id", "bad_timestamp", "ts_out_of_range", "ts_unit_mismatch", "unknown_item",
           "duplicate")
QUARANTINE_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                               ("ts", pa.string()), ("reason", pa.string()), ("file", pa.string())])
TS_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
INT64_SAFE_S = 2.0 ** 62  # seconds beyond this cannot be held as int64 (and are never plausible)
PATH_COLUMN = "path"  # Ray Data's include_paths column: the file each row came from


class DataValidationError(ValueError):
    """Input data is unusable; the message names the file, field or counts."""


@dataclass(frozen=True)
class PreparedPaths:
    root: str

    @property
    def items(self) -> str:
        return storage.join(self.root, "items.parquet")

    @property
    def users(self) -> str:
        return storage.join(self.root, "users")

    @property
    def train_examples(self) -> str:
        return storage.join(self.root, "train_examples")

    @property
    def full_examples(self) -> str:
        return storage.join(self.root, "full_examples")

    @property
    def quarantine(self) -> str:
        return storage.join(self.root, "quarantine")

    @property
    def stats(self) -> str:
        return storage.join(self.root, "stats.json")

    @property
    def histories(self) -> str:
        """Every user's history as built, before the minimum-events filter and the split: prepare's own
        intermediate (later passes stream from it instead of holding it in memory), deleted at its end."""
        return storage.join(self.root, "_histories")


def _canonical_ids(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Item/user ids compared as text: int64 242 and string "242" are the same id."""
    return pc.cast(col, pa.string()) if not pa.types.is_string(col.type) else col


def _user_ids(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """User ids keep their type in every output: integers stay integers, anything else becomes text."""
    return col if pa.types.is_integer(col.type) else _canonical_ids(col)


def load_catalog(items_uri: str, cfg: NightlyConfig) -> pa.Table:
    """Item catalog with a dense ``item_idx`` ordered by item_id (numeric when ids are numeric)."""
    try:
        items = storage.read_table(items_uri)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataValidationError(f"{items_uri}: item catalog is not readable parquet: {e}") from None
    id_col = cfg.data.columns.item_id
    if id_col not in items.column_names:
        raise DataValidationError(f"{items_uri}: item catalog has no column {id_col!r} "
                                  f"(config data.columns.item_id); columns are {items.column_names}")
    if id_col != "item_id":
        items = items.rename_columns(["item_id" if c == id_col else c for c in items.column_names])
    null_ids = items["item_id"].null_count
    if null_ids:
        raise DataValidationError(f"{items_uri}: {null_ids} of {items.num_rows} catalog rows have a null item_id")
    sort_key = items["item_id"]
    if not (pa.types.is_integer(sort_key.type) or pa.types.is_string(sort_key.type)):
        raise DataValidationError(f"{items_uri}: item_id must be integer or string, got {sort_key.type}")
    items = items.sort_by("item_id")
    ids = _canonical_ids(items["item_id"])
    if pc.count_distinct(ids).as_py() != items.num_rows:
        raise DataValidationError(f"{items_uri}: item_id is not unique "
                                  f"({items.num_rows - pc.count_distinct(ids).as_py()} repeated ids)")
    items = decode_text_columns(items, template_fields(cfg.data.item_template), cfg.data.text_encoding, items_uri)
    texts = render_texts(items, cfg.data.item_template, source=items_uri)
    tok = load_tokenizer(cfg.model.tokenizer)
    input_ids = tokenize_texts(tok, texts, cfg.model.max_text_tokens)
    return pa.table({
        "item_idx": pa.array(np.arange(items.num_rows, dtype=np.int32)),
        "item_id": items["item_id"],
        "text": pa.array(texts, pa.string()),
        "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
    })


def decode_text_columns(items: pa.Table, fields: list[str], encoding: str, source: str) -> pa.Table:
    """Binary-typed text columns decoded with ``encoding``; invalid text (bytes that do not decode, or a
    string column holding invalid UTF-8) is an error naming the file, the column and the rows."""
    for f in fields:
        if f not in items.column_names:
            continue  # render_texts names the missing field
        col = items[f]
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            values, bad = [], []
            for i, v in enumerate(col.to_pylist()):
                try:
                    values.append(None if v is None else v.decode(encoding))
                except UnicodeDecodeError:
                    values.append(None)
                    bad.append(i)
            if bad:
                raise DataValidationError(f"{source}: column {f!r} holds bytes that are not valid {encoding} in "
                                          f"{len(bad)} of {items.num_rows} rows (first: row {bad[0]}); set "
                                          f"data.text_encoding to the catalog's encoding or fix the file")
            items = items.set_column(items.column_names.index(f), f, pa.array(values, pa.string()))
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            try:
                col.validate(full=True)
            except pa.ArrowInvalid as e:
                raise DataValidationError(f"{source}: column {f!r} is typed as text but holds invalid UTF-8 "
                                          f"({e}); rewrite it as binary and set data.text_encoding") from None
    return items


def plausible_range(min_ts: str, max_ts: str | None, now: float | None = None) -> tuple[float, float]:
    """(earliest, latest) plausible event time as epoch seconds; ``max_ts`` None: now + 1 day."""
    def parse(v: str) -> float:
        t = dt.datetime.fromisoformat(v)
        return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()
    hi = parse(max_ts) if max_ts else (dt.datetime.now(dt.timezone.utc).timestamp() if now is None else now) + 86400
    return parse(min_ts), hi


def unit_divisors(values: np.ndarray, unit: str) -> np.ndarray:
    """Per value, what divides it into seconds: the declared unit, or under ``auto`` the unit its
    magnitude says (below 1e11 seconds, 1e14 ms, 1e17 us, else ns: 1e11 s is year 5138)."""
    if unit == "auto":
        a = np.abs(np.nan_to_num(values, nan=0.0))
        return np.select([a < 1e11, a < 1e14, a < 1e17], [1.0, 1e3, 1e6], 1e9)
    return np.full(values.shape, float(TS_UNITS[unit]))


def likely_unit(value: float, lo: float, hi: float) -> str | None:
    """The unit (s/ms/us/ns) under which a plain number is a plausible time, or None."""
    for unit, div in TS_UNITS.items():
        if lo <= np.floor(value / div) <= hi:
            return unit
    return None


def _parse_ts(col: pa.ChunkedArray | pa.Array, unit: str = "s") -> tuple[np.ndarray, np.ndarray]:
    """(epoch seconds, floored, NaN where unparseable; mask of the values that were plain numbers).

    Typed timestamps and dates carry their unit; plain numbers (numeric columns or numeric strings)
    are in ``unit``. Integer arithmetic on the stored values: no cast can overflow."""
    n = len(col)
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        if pa.types.is_date32(col.type):
            raw, div, mul = pc.cast(col, pa.int32()), 1, 86400
        elif pa.types.is_date64(col.type):
            raw, div, mul = pc.cast(col, pa.int64()), 1000, 1
        else:
            raw, div, mul = pc.cast(col, pa.int64()), TS_UNITS[col.type.unit], 1
        valid = pc.is_valid(raw).to_numpy(zero_copy_only=False)
        ints = pc.fill_null(raw, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        secs = np.floor_divide(ints, div).astype(np.float64) * mul  # sub-second part dropped
        return np.where(valid, secs, np.nan), np.zeros(n, dtype=bool)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        num = pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        numeric = np.isfinite(num)
    else:
        s = pd.Series(pc.cast(col, pa.string()).to_pylist() if not pa.types.is_null(col.type) else [None] * n,
                      dtype="object")
        num = pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64", copy=True)
        numeric = np.isfinite(num)
        need = ~numeric & s.notna().to_numpy()
        if need.any():
            parsed = pd.to_datetime(s[need], errors="coerce", utc=True, format="mixed")
            num[need] = np.floor((parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype="float64"))
    with np.errstate(invalid="ignore", over="ignore"):
        secs = np.where(numeric, np.floor(num / unit_divisors(num, unit)), num)
    return secs, numeric


def validate_batch(batch: pa.Table, columns: dict[str, str], catalog_ids: pa.Array, ts_unit: str = "s",
                   ts_range: tuple[float, float] | None = None, raw: bool = True) -> pa.Table:
    """Normalise one batch to (user_id, item_idx, ts, raw_item_id, raw_ts, reason[, file]); reason is null
    for good rows. ``ts_range`` (epoch seconds): plausible times; None checks only that a time is one.
    ``raw=False`` leaves out the raw text and file columns (only quarantine rows need them)."""
    user = batch[columns["user_id"]]
    item = batch[columns["item_id"]]
    ts, numeric = _parse_ts(batch[columns["ts"]], ts_unit)  # (R,)
    item_idx = pc.index_in(_canonical_ids(item), value_set=catalog_ids)  # null when unknown
    reason = np.full(batch.num_rows, None, dtype=object)
    bad_ts = ~np.isfinite(ts) | (np.nan_to_num(ts, nan=-1) < 0)
    out_of_range = np.zeros(batch.num_rows, dtype=bool)
    mismatch = np.zeros(batch.num_rows, dtype=bool)
    if ts_range is not None:
        lo, hi = ts_range
        out_of_range = ~bad_ts & ((ts < lo) | (ts > hi))
        if ts_unit != "auto":  # the number as given: seconds back in the declared unit
            for i in np.flatnonzero(out_of_range & numeric):
                mismatch[i] = likely_unit(ts[i] * TS_UNITS[ts_unit], lo, hi) not in (None, ts_unit)
    else:
        bad_ts |= np.abs(np.nan_to_num(ts, nan=0.0)) >= INT64_SAFE_S
    # Later checks do not overwrite earlier reasons: the first failing rule names the row.
    checks = [
        ("ts_out_of_range", out_of_range),
        ("ts_unit_mismatch", mismatch),
        ("bad_timestamp", bad_ts),
        ("unknown_item", pc.is_null(item_idx).to_numpy(zero_copy_only=False)),
        ("null_item_id", pc.is_null(item).to_numpy(zero_copy_only=False)),
        ("null_user_id", pc.is_null(user).to_numpy(zero_copy_only=False)),
    ]
    for name, bad in checks:  # reverse priority: the last assignment wins
        reason[bad] = name
    keep = ~bad_ts & ~out_of_range  # a time that fits int64 seconds (others are -1: no cast overflows)
    out = {
        "user_id": _user_ids(user),
        "item_idx": pc.cast(item_idx, pa.int32()),
        "ts": pa.array(np.where(keep, np.nan_to_num(ts, nan=-1.0), -1.0).astype(np.int64)),  # never overflows
    }
    if raw:
        out["raw_item_id"] = _canonical_ids(item)
        out["raw_ts"] = pa.array([None if v is None else str(v) for v in batch[columns["ts"]].to_pylist()],
                                 pa.string())
    out["reason"] = pa.array(reason.tolist(), pa.string())
    if raw and PATH_COLUMN in batch.column_names and PATH_COLUMN not in columns.values():
        out["file"] = pc.cast(batch[PATH_COLUMN], pa.string())
    return pa.table(out)


def history_schema(user_type: pa.DataType = pa.string()) -> pa.Schema:
    """The history build's rows; user ids keep their type (integers stay integers)."""
    return pa.schema([("user_id", user_type), ("items", pa.list_(pa.int32())), ("ts", pa.list_(pa.int64())),
                      ("dup_items", pa.list_(pa.int32())), ("dup_ts", pa.list_(pa.int64()))])


HISTORY_SCHEMA = history_schema()
USERS_SCHEMA = pa.schema([HISTORY_SCHEMA.field(c) for c in ("user_id", "items", "ts")]
                         + [pa.field(c, pa.int32()) for c in SPLIT_COLUMNS])  # prepared users (split_columns)
EXAMPLES_SCHEMA = pa.schema([("input", pa.list_(pa.int32())), ("target", pa.list_(pa.int32()))])


def user_bucket(user_id: pa.Array | pa.ChunkedArray, n_buckets: int) -> np.ndarray:
    """(R,) int64 bucket in [0, n_buckets) of each user id, hashed from its UTF-8 bytes with numpy over the
    string buffers: the same on every process and machine (Python's ``hash`` of str is salted per process)."""
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    arr = user_id.combine_chunks() if isinstance(user_id, pa.ChunkedArray) else user_id
    if pa.types.is_large_string(arr.type):
        arr = pc.cast(arr, pa.string())
    if not pa.types.is_string(arr.type):
        raise TypeError(f"user_bucket needs string user ids, got {arr.type}")
    n = len(arr)
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int32)[arr.offset:arr.offset + n + 1].astype(np.int64)  # (R+1,)
    lens = np.diff(offsets)  # (R,)
    first = offsets[0] if n else 0
    total = int(offsets[-1] - first) if n else 0
    h = np.zeros(n, dtype=np.uint64)
    if total:
        data = np.frombuffer(data_buf, dtype=np.uint8)[first:first + total].astype(np.uint64)  # (B,)
        starts = offsets[:-1] - first  # (R,)
        pos = np.arange(total, dtype=np.int64) - np.repeat(starts, lens)  # (B,) byte position in its id
        powers = np.cumprod(np.full(int(lens.max()), 1_000_003, dtype=np.uint64))  # wraps mod 2**64
        with np.errstate(over="ignore"):
            terms = (data + np.uint64(1)) * powers[pos]  # (B,)
            nonempty = lens > 0
            h[nonempty] = np.add.reduceat(terms, starts[nonempty])
            h ^= h >> np.uint64(33)  # murmur3 finaliser: spread the low bits before the modulo
            h *= np.uint64(0xFF51AFD7ED558CCD)
            h ^= h >> np.uint64(33)
            h *= np.uint64(0xC4CEB9FE1A85EC53)
            h ^= h >> np.uint64(33)
    return (h % np.uint64(n_buckets)).astype(np.int64)


def _good(batch: pa.Table, n_buckets: int) -> pa.Table:
    """Valid rows (user_id, item_idx, ts) and the hash ``bucket`` of their user (the history build's group key)."""
    good = batch.filter(pc.is_null(batch["reason"])).select(["user_id", "item_idx", "ts"])
    return good.append_column("bucket", pa.array(user_bucket(_canonical_ids(good["user_id"]), n_buckets)))


def _bad(batch: pa.Table) -> pa.Table:
    bad = batch.filter(pc.is_valid(batch["reason"]))
    file = bad["file"] if "file" in bad.column_names else pa.nulls(bad.num_rows, pa.string())
    return pa.table({"user_id": pc.cast(bad["user_id"], pa.string()), "item_id": bad["raw_item_id"], "ts": bad["raw_ts"],
                     "reason": bad["reason"], "file": file}, schema=QUARANTINE_SCHEMA)


def build_user(group: pa.Table, max_history: int) -> pa.Table:
    """One user's events -> chronological history (ties by item_id), exact duplicates set aside.

    The per-user reference implementation (one Python call per user): the stage runs
    :func:`build_histories`, which tests compare against this."""
    ts = group["ts"].to_numpy()
    items = group["item_idx"].to_numpy()
    order = np.lexsort((items, ts))  # by ts, then item_idx (== item_id order)
    ts, items = ts[order], items[order]
    dup = np.zeros(len(ts), dtype=bool)
    dup[1:] = (ts[1:] == ts[:-1]) & (items[1:] == items[:-1])
    keep_items, keep_ts = items[~dup][-max_history:], ts[~dup][-max_history:]
    return pa.table({
        "user_id": pa.array([group["user_id"][0].as_py()], group.schema.field("user_id").type),
        "items": pa.array([keep_items.astype(np.int32)], pa.list_(pa.int32())),
        "ts": pa.array([keep_ts.astype(np.int64)], pa.list_(pa.int64())),
        "dup_items": pa.array([items[dup].astype(np.int32)], pa.list_(pa.int32())),
        "dup_ts": pa.array([ts[dup].astype(np.int64)], pa.list_(pa.int64())),
    })


def _list_array(lengths: np.ndarray, values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    """List array of ``lengths`` (U,) consecutive runs of ``values``."""
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int32)  # (U+1,)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type_))


def _run_positions(lengths: np.ndarray) -> np.ndarray:
    """(sum(lengths),) position of each element within its run: 0..len-1 for each run, concatenated."""
    total = int(lengths.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def build_histories(events: pa.Table, max_history: int) -> pa.Table:
    """Many users' events (user_id, item_idx, ts) -> one row per user, as :func:`build_user` for each:
    chronological ``items``/``ts`` (ties by item_idx), the last ``max_history`` kept, and the exact
    duplicates (same user, ts and item) set aside in ``dup_items``/``dup_ts``. One pyarrow sort and numpy
    over the whole block (the ids, never null, are sorted once per distinct user); rows ordered by user_id."""
    n = events.num_rows
    schema = history_schema(events.schema.field("user_id").type)
    if n == 0:
        return schema.empty_table()
    enc = pc.dictionary_encode(events["user_id"].combine_chunks())  # (R,) indices into the distinct ids
    by_id = pc.array_sort_indices(enc.dictionary).to_numpy()  # (U,) distinct ids in id order
    rank = np.empty(by_id.shape[0], dtype=np.int64)
    rank[by_id] = np.arange(by_id.shape[0])
    code = rank[enc.indices.to_numpy()]  # (R,) user number in id order
    items = events["item_idx"].to_numpy().astype(np.int32)  # (R,)
    ts = events["ts"].to_numpy().astype(np.int64)  # (R,)
    order = np.lexsort((items, ts, code))  # (R,) by user, then ts, then item_idx
    code, items, ts = code[order], items[order], ts[order]
    new_user = np.ones(n, dtype=bool)  # (R,) first event of its user
    new_user[1:] = code[1:] != code[:-1]
    dup = np.zeros(n, dtype=bool)  # (R,) an exact repeat of the event before it
    dup[1:] = ~new_user[1:] & (ts[1:] == ts[:-1]) & (items[1:] == items[:-1])
    owner = np.cumsum(new_user) - 1  # (R,) user number of each event
    n_users = int(owner[-1]) + 1
    keep = ~dup
    kept_len = np.bincount(owner[keep], minlength=n_users)  # (U,) >= 1: a first event is never a duplicate
    hist_len = np.minimum(kept_len, max_history)  # (U,)
    pos = _run_positions(kept_len)  # (K,) position within the user's kept events
    recent = pos >= np.repeat(kept_len - hist_len, kept_len)  # (K,) among the last max_history
    dup_len = np.bincount(owner[dup], minlength=n_users)  # (U,)
    return pa.table({
        "user_id": enc.dictionary.take(pa.array(by_id)),  # every distinct id has events: user u is by_id[u]
        "items": _list_array(hist_len, items[keep][recent], pa.int32()),
        "ts": _list_array(hist_len, ts[keep][recent], pa.int64()),
        "dup_items": _list_array(dup_len, items[dup], pa.int32()),
        "dup_ts": _list_array(dup_len, ts[dup], pa.int64()),
    }, schema=schema)


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (U+1,) into values, values) of a list column, slices included."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.offsets.to_numpy().astype(np.int64), arr.values.to_numpy(zero_copy_only=False)


def _examples(batch: pa.Table, seq_len: int, full: bool = False) -> pa.Table:
    """Next-item windows (``split.training_windows``) over the training part of every history in the batch
    (``full``: over the whole history, for the refit on every event)."""
    if batch.num_rows == 0:
        return EXAMPLES_SCHEMA.empty_table()
    offsets, values = _list_parts(batch["items"])  # (U+1,), (E,)
    n = np.diff(offsets) if full else _n_train(batch, offsets)  # (U,) events the windows cover
    owner, start, end = training_window_bounds(n, seq_len)  # (W,) each
    win_len = end - start - 1  # (W,) positions per window
    first = offsets[:-1][owner] + start  # (W,) index in values of each window's first input
    idx = np.repeat(first, win_len) + _run_positions(win_len)  # (P,)
    return pa.table({"input": _list_array(win_len, values[idx], pa.int32()),
                     "target": _list_array(win_len, values[idx + 1], pa.int32())}, schema=EXAMPLES_SCHEMA)


def _train_counts(batch: pa.Table) -> pa.Table:
    """Training interactions per item in the batch's histories (item_idx, count), item-sized."""
    offsets, values = _list_parts(batch["items"])  # (U+1,), (E,)
    n_train = _n_train(batch, offsets)  # (U,)
    idx = np.repeat(offsets[:-1], n_train) + _run_positions(n_train)  # (T,)
    item, count = np.unique(values[idx], return_counts=True)
    return pa.table({"item_idx": pa.array(item.astype(np.int64)), "count": pa.array(count.astype(np.int64))})


def _n_train(batch: pa.Table, offsets: np.ndarray) -> np.ndarray:
    """(U,) training events per history: the protocol's ``train_len`` column (``split.split_columns``),
    else the leave-one-out rule on the history lengths."""
    if "train_len" in batch.column_names:
        return np.clip(batch["train_len"].to_numpy(zero_copy_only=False).astype(np.int64), 0, np.diff(offsets))
    return train_lengths(np.diff(offsets))


def _block_facts(batch: pa.Table, n_items: int) -> pa.Table:
    """One row per block, item-sized, from one pass over kept users: the training interactions per item
    (:func:`_train_counts`, dense), each item's first event ts, the newest event ts, the users without a
    training event, and the validation and test target items (for the split's stats)."""
    offsets, items = _list_parts(batch["items"])  # (U+1,), (E,)
    _, ts = _list_parts(batch["ts"])  # (E,)
    counts = np.zeros(n_items, dtype=np.int64)  # (N,)
    sparse = _train_counts(batch)
    counts[sparse["item_idx"].to_numpy()] = sparse["count"].to_numpy()
    events = np.bincount(items.astype(np.int64), minlength=n_items)  # (N,) every kept event
    first = np.full(n_items, NEVER, dtype=np.int64)  # (N,)
    np.minimum.at(first, items.astype(np.int64), ts.astype(np.int64))
    out = {"train_count": pa.array([counts], pa.list_(pa.int64())),
           "event_count": pa.array([events], pa.list_(pa.int64())),
           "first_seen": pa.array([first], pa.list_(pa.int64())),
           "newest_ts": pa.array([int(ts.max()) if len(ts) else None], pa.int64()),
           "no_history": pa.array([int((_n_train(batch, offsets) == 0).sum())], pa.int64())}
    for which in ("val", "test"):
        pos = batch[f"{which}_pos"].combine_chunks()
        rows = np.flatnonzero(pos.is_valid().to_numpy(zero_copy_only=False))  # users in this split
        at = offsets[:-1][rows] + pos.to_numpy(zero_copy_only=False)[rows].astype(np.int64)
        out[f"{which}_targets"] = pa.array([items[at].astype(np.int64)], pa.list_(pa.int64()))
    return pa.table(out)


def _kept(batch: pa.Table, min_n: int) -> pa.Table:
    keep = pc.greater_equal(pc.list_value_length(batch["items"]), min_n)
    return batch.filter(keep).select(["user_id", "items", "ts"])


def _duplicates(batch: pa.Table, catalog_ids: pa.Array) -> pa.Table:
    """Quarantine rows (reason ``duplicate``) for the duplicates set aside in each history row."""
    dup_items = batch["dup_items"].combine_chunks()
    parent = pc.list_parent_indices(dup_items)  # (D,) row of each duplicate
    item = pc.list_flatten(dup_items)  # (D,)
    n = len(item)
    return pa.table({"user_id": pc.cast(batch["user_id"].combine_chunks().take(parent), pa.string()),
                     "item_id": pc.cast(catalog_ids.take(item), pa.string()),
                     "ts": pc.cast(pc.list_flatten(batch["dup_ts"].combine_chunks()), pa.string()),
                     "reason": pa.repeat(pa.scalar("duplicate", pa.string()), n),
                     "file": pa.nulls(n, pa.string())},
                    schema=QUARANTINE_SCHEMA)


ALLOWED_FAMILIES = {"user_id": ("integer", "string"), "item_id": ("integer", "string"),
                    "ts": ("integer", "string", "timestamp", "date", "float")}


def type_family(t: pa.DataType) -> str:
    """The kind of a column type, as compared across files (int32 and int64 read alike, string and int do not)."""
    for name, test in (("integer", pa.types.is_integer), ("float", pa.types.is_floating),
                       ("timestamp", pa.types.is_timestamp), ("date", pa.types.is_date), ("null", pa.types.is_null)):
        if test(t):
            return name
    return "string" if (pa.types.is_string(t) or pa.types.is_large_string(t)) else str(t)


def interaction_files(uri: str) -> list[str]:
    """The parquet files of an interactions dataset (a file, or a folder/prefix: hidden ``_``/``.`` names skipped)."""
    if storage.is_file(uri):
        return [uri]
    return [f for f in storage.list_files(uri, ".parquet")
            if not any(p.startswith(("_", ".")) for p in posixpath.relpath(f, uri).split("/"))]


def _footer_ts_unit_check(f: str, meta: pq.FileMetaData, col_index: int, unit: str, lo: float, hi: float) -> None:
    """Refuse a numeric timestamp column whose footer statistics are plausible only in another unit."""
    highs = []
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(col_index).statistics
        if st is not None and st.has_min_max and st.max is not None:
            highs.append(float(st.max))
    if not highs or unit == "auto":
        return
    top = max(highs)
    if lo <= np.floor(top / TS_UNITS[unit]) <= hi:
        return
    guess = likely_unit(top, lo, hi)
    if guess is not None and guess != unit:
        raise DataValidationError(
            f"{f}: timestamps look like {UNIT_NAMES[guess]} (max {top:.0f}) but data.ts_unit={unit}; "
            f"set data.ts_unit={guess} (or auto) for this data")


def check_footers(files: list[str], columns: dict[str, str], ts_unit: str, ts_range: tuple[float, float],
                  where: str) -> tuple[list[str], int]:
    """Read every file's footer; return the files with rows and their total rows. Errors name the file
    (and the other file of a type conflict)."""
    if not files:
        raise DataValidationError(f"{where}: no parquet files (an empty interactions folder?)")
    seen: dict[str, tuple[str, str, str]] = {}  # contract key -> (family, type, first file)
    keep, rows = [], 0
    for f in files:
        try:
            meta = storage.parquet_metadata(f)
            schema = meta.schema.to_arrow_schema()
        except FileNotFoundError:
            raise
        except (pa.ArrowInvalid, OSError) as e:
            raise DataValidationError(f"{f}: not a readable parquet file ({e})") from None
        if meta.num_rows == 0:
            log.info("%s: zero rows; skipped", f)
            continue
        keep.append(f)
        rows += meta.num_rows
        for key, col in columns.items():
            if col not in schema.names:
                if f"/{col}=" in f:  # a hive partition column
                    continue
                raise DataValidationError(f"{f}: interactions have no column {col!r} (config data.columns.{key}); "
                                          f"columns are {schema.names}")
            t = schema.field(col).type
            fam = type_family(t)
            if fam == "null":  # all values null in this file: quarantined row by row
                continue
            if fam not in ALLOWED_FAMILIES[key]:
                raise DataValidationError(f"{f}: column {col!r} (config data.columns.{key}) has type {t}; expected "
                                          + ("integer or string" if key != "ts" else
                                             "integer or string, timestamp or float"))
            first = seen.setdefault(key, (fam, str(t), f))
            if first[0] != fam:
                raise DataValidationError(f"{f}: column {col!r} (config data.columns.{key}) has type {t}, but "
                                          f"{first[2]} has {first[1]}: one column must have one kind of type "
                                          f"in every file")
            if key == "ts" and fam in ("integer", "float"):
                _footer_ts_unit_check(f, meta, schema.get_field_index(col), ts_unit, *ts_range)
    if not keep:
        raise DataValidationError(f"{where}: all {len(files)} parquet files have zero rows")
    return keep, rows


def catalog_id_values(catalog: pa.Table) -> pa.Array:
    """The catalog's item ids as one text array, in catalog order (what validation looks ids up in)."""
    ids = _canonical_ids(catalog["item_id"])
    return ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids


def rejected_rows(batch: pa.Table, columns: dict[str, str], catalog_ids: pa.Array, ts_unit: str = "s",
                  ts_range: tuple[float, float] | None = None) -> pa.Table:
    """The quarantine rows (``QUARANTINE_SCHEMA``) of one read batch: :func:`validate_batch`'s reasons, the
    raw text built only for the rejected rows (every rule looks at its own row only)."""
    kw = {"columns": columns, "catalog_ids": catalog_ids, "ts_unit": ts_unit, "ts_range": ts_range}
    reason = validate_batch(batch, raw=False, **kw)["reason"]
    idx = np.flatnonzero(pc.is_valid(reason).to_numpy(zero_copy_only=False))  # (Q,)
    return _bad(validate_batch(batch.take(pa.array(idx, pa.int64())), raw=True, **kw))


def _good_rows(batch: pa.Table, n_buckets: int, **validate: Any) -> pa.Table:
    """The valid rows of one read batch with their user's bucket (:func:`_good` of :func:`validate_batch`)."""
    return _good(validate_batch(batch, raw=False, **validate), n_buckets)


def read_validated(files: list[str], cfg: NightlyConfig, catalog_ids: pa.Array,
                   fn: Callable[..., pa.Table] = validate_batch, **fn_kwargs: Any) -> ray.data.Dataset:
    """The interaction ``files`` (from :func:`interaction_rows`) read and validated, one block (one file's
    rows) per batch. ``fn`` is :func:`validate_batch` (every row with its reason, null for good rows),
    :func:`rejected_rows` or :func:`_good_rows`; it gets the validation settings and ``fn_kwargs``. Lazy.
    Rows carry their file's path except for :func:`_good_rows` (only rejected rows name their file)."""
    fs = storage.filesystem(files[0])[0]
    return ray.data.read_parquet([storage.filesystem(f)[1] for f in files], filesystem=fs,
                                 include_paths=fn is not _good_rows).map_batches(
        fn, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"columns": vars(cfg.data.columns), "catalog_ids": catalog_ids, "ts_unit": cfg.data.ts_unit,
                   "ts_range": plausible_range(cfg.prepare.min_ts, cfg.prepare.max_ts), **fn_kwargs})


def interaction_rows(src: SourceData, cfg: NightlyConfig) -> tuple[list[str], int]:
    """The interaction files with rows, after :func:`check_footers`, and their total rows (from the footers)."""
    if not storage.exists(src.interactions):
        raise DataValidationError(f"{src.interactions}: interactions not found")
    return check_footers(interaction_files(src.interactions), vars(cfg.data.columns), cfg.data.ts_unit,
                         plausible_range(cfg.prepare.min_ts, cfg.prepare.max_ts), src.interactions)


def shuffle_strategy(name: str) -> "ray.data.context.ShuffleStrategy":
    choices = sorted({s.value for s in ShuffleStrategy})
    if name not in choices:
        raise ValueError(f"ray.shuffle_strategy={name!r} unknown; choose one of {choices}")
    return ShuffleStrategy(name)


class _Laps:
    """Wall seconds of consecutive phases: ``lap(name)`` closes the phase that started at the previous lap."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.t, 3)
        self.t = now


def _read(uri: str, schema: pa.Schema = HISTORY_SCHEMA) -> ray.data.Dataset:
    """The parquet files below ``uri`` as Ray Data (streamed when consumed); an empty dataset of
    ``schema`` when a write produced none."""
    if not storage.parquet_files(uri):
        return ray.data.from_arrow(schema.empty_table())
    path, fs = storage.ray_location(uri)
    return ray.data.read_parquet(path, filesystem=fs)


def _write(ds: ray.data.Dataset, uri: str) -> None:
    storage.delete(uri)
    path, fs = storage.ray_location(uri)
    ds.write_parquet(path, filesystem=fs)


def run_prepare(cfg: NightlyConfig, src: SourceData, out: PreparedPaths) -> dict[str, Any]:
    """Run the prepare stage with Ray Data; returns the stats also written to ``stats.json``.

    Nothing proportional to the log is held in memory between passes: the read is validated twice
    (once for the rejected rows, the only rows kept in the object store; once streaming the good rows
    into the history build), the histories are written to storage, and every later pass streams from there."""
    ctx = ray.data.DataContext.get_current()
    ctx.default_hash_shuffle_parallelism = cfg.ray.shuffle_parallelism
    ctx.shuffle_strategy = shuffle_strategy(cfg.ray.shuffle_strategy)  # progress bars: runtime.configure_ray_data
    lap = _Laps()

    catalog = load_catalog(src.items, cfg)
    lap("catalog")
    catalog_ids = catalog_id_values(catalog)
    files, rows_read = interaction_rows(src, cfg)
    try:
        return _prepare_histories(cfg, src, out, catalog, catalog_ids, files, rows_read, lap)
    finally:
        try:
            storage.delete(out.histories)
        except Exception as e:  # never instead of the error that is on its way out
            log.warning("%s: intermediate histories not removed (%s); the next prepare of this date removes them",
                        out.histories, e)


def _prepare_histories(cfg: NightlyConfig, src: SourceData, out: PreparedPaths, catalog: pa.Table,
                       catalog_ids: pa.Array, files: list[str], rows_read: int, lap: _Laps) -> dict[str, Any]:
    bad = read_validated(files, cfg, catalog_ids, rejected_rows).materialize()  # the rejected rows alone
    lap("validate")
    # Users are spread over hash buckets; each bucket is one Python call that sorts and groups all of its
    # users at once (a group-by on user_id would pay one call per user). Buckets shuffle across nodes, and
    # the histories stream to storage.
    n_buckets = max(cfg.ray.shuffle_parallelism, math.ceil(rows_read / cfg.prepare.bucket_rows))
    _write(read_validated(files, cfg, catalog_ids, _good_rows, n_buckets=n_buckets)
           .groupby("bucket")
           .map_groups(build_histories, batch_format="pyarrow", fn_kwargs={"max_history": cfg.prepare.max_history}),
           out.histories)
    lap("histories")
    dups = _read(out.histories).map_batches(_duplicates, batch_format="pyarrow",
                                            fn_kwargs={"catalog_ids": catalog_ids}).materialize()

    reasons: dict[str, int] = dict.fromkeys(REASONS, 0)
    mismatched: dict[str, int] = {}
    for t in bad.iter_batches(batch_format="pyarrow", batch_size=None):
        for r, n in zip(*np.unique(t["reason"].to_numpy(zero_copy_only=False), return_counts=True)):
            reasons[str(r)] += int(n)
        wrong = t.filter(pc.equal(t["reason"], "ts_unit_mismatch"))["file"].to_pylist()
        for f in wrong:
            mismatched[str(f)] = mismatched.get(str(f), 0) + 1
    for t in dups.iter_batches(batch_format="pyarrow", batch_size=None):
        reasons["duplicate"] += t.num_rows
    rejected = sum(reasons.values())
    lap("count_rejected")

    storage.delete(out.quarantine)
    if rejected:
        _write(bad.union(dups).repartition(1), out.quarantine)
    del bad, dups  # the rejected rows leave the object store before the passes that follow
    lap("write_quarantine")

    if mismatched:
        raise DataValidationError(
            f"{', '.join(sorted(mismatched))}: {sum(mismatched.values())} timestamps are plausible only in another "
            f"unit than data.ts_unit={cfg.data.ts_unit} (per file {mismatched}); set data.ts_unit (or auto); "
            f"rows kept in {out.quarantine}")
    if rejected / rows_read > cfg.prepare.max_reject_fraction:  # before any other output is written
        raise DataValidationError(
            f"{src.interactions}: {rejected} of {rows_read} rows rejected ({rejected / rows_read:.1%} > "
            f"prepare.max_reject_fraction={cfg.prepare.max_reject_fraction:.1%}); by reason "
            f"{ {k: v for k, v in reasons.items() if v} }; rows kept in {out.quarantine}")

    min_n = max(cfg.prepare.min_user_interactions, MIN_EVENTS)
    kept = _read(out.histories).map_batches(_kept, batch_format="pyarrow", fn_kwargs={"min_n": min_n})
    cutoff = None
    if cfg.eval.protocol == "temporal":
        lo, hi = event_ts_range(kept)
        if lo <= hi:  # some user kept
            cutoff = temporal_cutoff(lo, hi, cfg.eval.temporal_fraction)
    _write(kept.map_batches(split_columns, batch_format="pyarrow",
                            fn_kwargs={"protocol": cfg.eval.protocol, "cutoff": cutoff}), out.users)
    lap("write_users")

    _write(_read(out.users, USERS_SCHEMA).map_batches(_examples, batch_format="pyarrow", fn_kwargs={"seq_len": cfg.model.max_seq_len}),
           out.train_examples)
    storage.delete(out.full_examples)
    if cfg.train.refit:
        _write(_read(out.users, USERS_SCHEMA).map_batches(_examples, batch_format="pyarrow",
                                            fn_kwargs={"seq_len": cfg.model.max_seq_len, "full": True}),
               out.full_examples)
    lap("write_examples")

    # Training popularity (for logQ correction and the popularity baseline) and the split's facts, in one
    # pass over the kept users; every block sends item-sized arrays, never its users.
    counts = np.zeros(catalog.num_rows, dtype=np.int64)  # (N,)
    events = np.zeros(catalog.num_rows, dtype=np.int64)  # (N,)
    first_seen = np.full(catalog.num_rows, NEVER, dtype=np.int64)  # (N,) first event ts of each item
    targets: dict[str, list[int]] = {"val": [], "test": []}
    newest, no_history = None, 0
    for t in _read(out.users, USERS_SCHEMA).map_batches(_block_facts, batch_format="pyarrow", fn_kwargs={"n_items": catalog.num_rows}
                                          ).iter_batches(batch_format="pyarrow", batch_size=None):
        for row in range(t.num_rows):  # one row per block
            counts += np.asarray(t["train_count"][row].values, dtype=np.int64)
            events += np.asarray(t["event_count"][row].values, dtype=np.int64)
            np.minimum(first_seen, np.asarray(t["first_seen"][row].values, dtype=np.int64), out=first_seen)
            block_newest = t["newest_ts"][row].as_py()
            if block_newest is not None:
                newest = block_newest if newest is None else max(newest, block_newest)
            no_history += int(t["no_history"][row].as_py())
            for which in targets:
                targets[which] += t[f"{which}_targets"][row].values.to_pylist()
    n_train = int(counts.sum())
    storage.write_table(catalog.append_column("train_count", pa.array(counts))
                        .append_column("event_count", pa.array(events)), out.items)
    lap("train_counts")

    stats = {
        "rows_read": rows_read,
        "rows_rejected": rejected,
        "reject_fraction": rejected / rows_read,
        "rejected_by_reason": reasons,
        "rows_good": rows_read - rejected,
        "users_seen": storage_count(out.histories),
        "users_kept": storage_count(out.users),
        "items": catalog.num_rows,
        "train_interactions": n_train,
        "train_examples": storage_count(out.train_examples),
        "full_examples": storage_count(out.full_examples) if cfg.train.refit else None,
        "split": split_stats(cfg.eval.protocol, cutoff, targets, first_seen, no_history),
        "newest_event_ts": newest,
        "source": src.description,
        "interactions_uri": src.interactions,
        "items_uri": src.items,
    }
    lap("count_users")
    stats["seconds"] = lap.seconds  # wall time of each phase, in order
    storage.write_json(out.stats, stats)
    log.info("prepare: %d rows, %d rejected %s, %d users kept, %d items",
             rows_read, rejected, {k: v for k, v in reasons.items() if v}, stats["users_kept"], catalog.num_rows)
    if stats["users_kept"] == 0:
        raise DataValidationError(f"{src.interactions}: no user has {min_n} or more valid interactions")
    return stats


def event_ts_range(ds: ray.data.Dataset) -> tuple[int, int]:
    """Oldest and newest event ts of prepared users (user-sized pass, item-sized state)."""
    lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for t in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
        flat = pc.list_flatten(t["ts"])
        if len(flat):
            lo, hi = min(lo, pc.min(flat).as_py()), max(hi, pc.max(flat).as_py())
    return int(lo), int(hi)


def split_stats(protocol: str, cutoff: int | None, targets: dict[str, list[int]], first_seen: np.ndarray,
                no_history: int) -> dict[str, Any]:
    """Users per split, users without history before the cutoff, targets first seen after it."""
    out: dict[str, Any] = {"protocol": protocol, "cutoff": cutoff,
                           "val_users": len(targets["val"]), "test_users": len(targets["test"])}
    if cutoff is not None:
        out["cold_targets"] = {w: cold_targets(v, first_seen, cutoff) for w, v in targets.items()}
        out["users_no_history"] = no_history
        out["items_first_seen_after_cutoff"] = int(((first_seen >= cutoff) & (first_seen < NEVER)).sum())
    return out


def storage_count(uri: str) -> int:
    """Rows of the parquet files below ``uri`` (from their footers)."""
    return storage.parquet_totals(uri)[0]


def examples_dataset(uri: str, tc: TrainConfig) -> tuple[ray.data.Dataset, int]:
    """The training examples as Ray Data (block order shuffled) and their count. At most
    ``tc.materialize_mib`` MiB (uncompressed) are read once into the object store (not the driver's heap),
    so every epoch iterates that copy instead of re-reading storage (seconds before each epoch's first
    batch on a small dataset); larger ones stream from storage every epoch."""
    path, fs = storage.ray_location(uri)
    ds = ray.data.read_parquet(path, filesystem=fs).randomize_block_order(seed=tc.seed)
    rows, size = storage.parquet_totals(uri)
    if size / 2**20 > tc.materialize_mib:
        return ds, rows
    log.info("training examples (%d rows, %.1f MiB) held in the object store for all epochs", rows, size / 2**20)
    return ds.materialize(), rows


def catalog_ids(items_uri: str) -> pa.Array:
    """The prepared catalog's ``item_id`` column in ``item_idx`` order (one array)."""
    return storage.read_table(items_uri, columns=["item_id"])["item_id"].combine_chunks()
