"""Prepare stage: read, validate, quarantine, split, and build histories and training examples (Ray Data).

Outputs, under ``{root}/runs/run_date=D/prepared/``:
- ``items.parquet``: item_idx, item_id, text, input_ids (tokenised once per run), train_count
- ``users/``: one row per kept user: user_id, items (list<int32> item_idx, chronological), ts
- ``train_examples/``: next-item windows over each user's training part: input, target (list<int32>)
- ``quarantine/``: rejected rows (user_id, item_id, ts as text, reason, file), never silently dropped
- ``stats.json``: row counts, reject counts per reason, user and example counts

Protocol: per user, sort by (ts, item_id); last = test, second-to-last = validation, rest = train.

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
import posixpath
from dataclasses import dataclass
from typing import Any

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
from recsys_core.data.split import MIN_EVENTS, train_part, training_windows
from recsys_core.data.text import load_tokenizer, render_texts, template_fields, tokenize_texts

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
    def quarantine(self) -> str:
        return storage.join(self.root, "quarantine")

    @property
    def stats(self) -> str:
        return storage.join(self.root, "stats.json")


def _canonical_ids(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Item/user ids compared as text: int64 242 and string "242" are the same id."""
    return pc.cast(col, pa.string()) if not pa.types.is_string(col.type) else col


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
                   ts_range: tuple[float, float] | None = None) -> pa.Table:
    """Normalise one batch to (user_id, item_idx, ts, raw_item_id, raw_ts, reason[, file]); reason is null
    for good rows. ``ts_range`` (epoch seconds): plausible times; None checks only that a time is one."""
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
        "user_id": _canonical_ids(user),
        "item_idx": pc.cast(item_idx, pa.int32()),
        "ts": pa.array(np.where(keep, np.nan_to_num(ts, nan=-1.0), -1.0).astype(np.int64)),  # never overflows
        "raw_item_id": _canonical_ids(item),
        "raw_ts": pa.array([None if v is None else str(v) for v in batch[columns["ts"]].to_pylist()], pa.string()),
        "reason": pa.array(reason.tolist(), pa.string()),
    }
    if PATH_COLUMN in batch.column_names and PATH_COLUMN not in columns.values():
        out["file"] = pc.cast(batch[PATH_COLUMN], pa.string())
    return pa.table(out)


def _good(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"])).select(["user_id", "item_idx", "ts"])


def _bad(batch: pa.Table) -> pa.Table:
    bad = batch.filter(pc.is_valid(batch["reason"]))
    file = bad["file"] if "file" in bad.column_names else pa.nulls(bad.num_rows, pa.string())
    return pa.table({"user_id": bad["user_id"], "item_id": bad["raw_item_id"], "ts": bad["raw_ts"],
                     "reason": bad["reason"], "file": file}, schema=QUARANTINE_SCHEMA)


def build_user(group: pa.Table, max_history: int) -> pa.Table:
    """One user's events -> chronological history (ties by item_id), exact duplicates set aside."""
    ts = group["ts"].to_numpy()
    items = group["item_idx"].to_numpy()
    order = np.lexsort((items, ts))  # by ts, then item_idx (== item_id order)
    ts, items = ts[order], items[order]
    dup = np.zeros(len(ts), dtype=bool)
    dup[1:] = (ts[1:] == ts[:-1]) & (items[1:] == items[:-1])
    keep_items, keep_ts = items[~dup][-max_history:], ts[~dup][-max_history:]
    return pa.table({
        "user_id": [group["user_id"][0].as_py()],
        "items": pa.array([keep_items.astype(np.int32)], pa.list_(pa.int32())),
        "ts": pa.array([keep_ts.astype(np.int64)], pa.list_(pa.int64())),
        "dup_items": pa.array([items[dup].astype(np.int32)], pa.list_(pa.int32())),
        "dup_ts": pa.array([ts[dup].astype(np.int64)], pa.list_(pa.int64())),
    })


def _examples(batch: pa.Table, seq_len: int) -> pa.Table:
    inputs, targets = [], []
    for seq in batch["items"].to_pylist():
        train = np.asarray(train_part(seq), dtype=np.int32)
        for x, y in training_windows(train, seq_len):
            inputs.append(x)
            targets.append(y)
    return pa.table({"input": pa.array(inputs, pa.list_(pa.int32())),
                     "target": pa.array(targets, pa.list_(pa.int32()))})


def _duplicates(batch: pa.Table, catalog_ids: pa.Array) -> pa.Table:
    users, items, ts = [], [], []
    for u, di, dt_ in zip(batch["user_id"].to_pylist(), batch["dup_items"].to_pylist(), batch["dup_ts"].to_pylist()):
        for i, t in zip(di, dt_):
            users.append(u)
            items.append(catalog_ids[i].as_py())
            ts.append(str(t))
    return pa.table({"user_id": users, "item_id": items, "ts": ts, "reason": ["duplicate"] * len(users),
                     "file": [None] * len(users)}, schema=QUARANTINE_SCHEMA)


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
                  where: str) -> list[str]:
    """Read every file's footer; return the files with rows. Errors name the file (and the other file of a
    type conflict)."""
    if not files:
        raise DataValidationError(f"{where}: no parquet files (an empty interactions folder?)")
    seen: dict[str, tuple[str, str, str]] = {}  # contract key -> (family, type, first file)
    keep = []
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
    return keep


def _read_interactions(src: SourceData, cfg: NightlyConfig, ts_range: tuple[float, float]) -> ray.data.Dataset:
    """The interactions as Ray Data, after :func:`check_footers`: only the files with rows and the
    contract columns, each row tagged with its file."""
    if not storage.exists(src.interactions):
        raise DataValidationError(f"{src.interactions}: interactions not found")
    columns = vars(cfg.data.columns)
    files = check_footers(interaction_files(src.interactions), columns, cfg.data.ts_unit, ts_range,
                          src.interactions)
    fs = storage.filesystem(files[0])[0]
    return ray.data.read_parquet([storage.filesystem(f)[1] for f in files], filesystem=fs,
                                 include_paths=True)


def shuffle_strategy(name: str) -> "ray.data.context.ShuffleStrategy":

    choices = sorted({s.value for s in ShuffleStrategy})
    if name not in choices:
        raise ValueError(f"ray.shuffle_strategy={name!r} unknown; choose one of {choices}")
    return ShuffleStrategy(name)


def run_prepare(cfg: NightlyConfig, src: SourceData, out: PreparedPaths) -> dict[str, Any]:
    """Run the prepare stage with Ray Data; returns the stats also written to ``stats.json``."""
    ctx = ray.data.DataContext.get_current()
    ctx.default_hash_shuffle_parallelism = cfg.ray.shuffle_parallelism
    ctx.shuffle_strategy = shuffle_strategy(cfg.ray.shuffle_strategy)
    ctx.enable_progress_bars = True

    catalog = load_catalog(src.items, cfg)
    catalog_ids = _canonical_ids(catalog["item_id"])
    if isinstance(catalog_ids, pa.ChunkedArray):
        catalog_ids = catalog_ids.combine_chunks()
    columns = vars(cfg.data.columns)

    ts_range = plausible_range(cfg.prepare.min_ts, cfg.prepare.max_ts)
    validated = _read_interactions(src, cfg, ts_range).map_batches(
        validate_batch, batch_format="pyarrow", batch_size=None,  # one block (one file's rows) per batch
        fn_kwargs={"columns": columns, "catalog_ids": catalog_ids, "ts_unit": cfg.data.ts_unit, "ts_range": ts_range},
    ).materialize()
    rows_read = validated.count()
    if rows_read == 0:
        raise DataValidationError(f"{src.interactions}: no interaction rows")
    bad = validated.map_batches(_bad, batch_format="pyarrow").materialize()
    users = (validated.map_batches(_good, batch_format="pyarrow")
             .groupby("user_id")
             .map_groups(build_user, batch_format="pyarrow", fn_kwargs={"max_history": cfg.prepare.max_history})
             .materialize())
    dups = users.map_batches(_duplicates, batch_format="pyarrow", fn_kwargs={"catalog_ids": catalog_ids})

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

    storage.delete(out.quarantine)
    if rejected:
        qpath, qfs = storage.ray_location(out.quarantine)
        bad.union(dups).repartition(1).write_parquet(qpath, filesystem=qfs)

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
    kept = users.filter(lambda r: len(r["items"]) >= min_n).select_columns(["user_id", "items", "ts"]).materialize()
    storage.delete(out.users)
    upath, ufs = storage.ray_location(out.users)
    kept.write_parquet(upath, filesystem=ufs)

    examples = kept.map_batches(_examples, batch_format="pyarrow", fn_kwargs={"seq_len": cfg.model.max_seq_len})
    storage.delete(out.train_examples)
    epath, efs = storage.ray_location(out.train_examples)
    examples.write_parquet(epath, filesystem=efs)

    # Training popularity (for logQ correction and the popularity baseline), item-sized, not user-sized.
    counts = np.zeros(catalog.num_rows, dtype=np.int64)
    n_train = 0
    for t in kept.iter_batches(batch_format="pyarrow", batch_size=4096):
        for seq in t["items"].to_pylist():
            part = np.asarray(train_part(seq), dtype=np.int64)
            np.add.at(counts, part, 1)
            n_train += len(part)
    storage.write_table(catalog.append_column("train_count", pa.array(counts)), out.items)

    stats = {
        "rows_read": rows_read,
        "rows_rejected": rejected,
        "reject_fraction": rejected / rows_read,
        "rejected_by_reason": reasons,
        "rows_good": rows_read - rejected,
        "users_seen": users.count(),
        "users_kept": kept.count(),
        "items": catalog.num_rows,
        "train_interactions": n_train,
        "train_examples": storage_count(out.train_examples),
        "source": src.description,
        "interactions_uri": src.interactions,
        "items_uri": src.items,
    }
    storage.write_json(out.stats, stats)
    log.info("prepare: %d rows, %d rejected %s, %d users kept, %d items",
             rows_read, rejected, {k: v for k, v in reasons.items() if v}, stats["users_kept"], catalog.num_rows)
    if stats["users_kept"] == 0:
        raise DataValidationError(f"{src.interactions}: no user has {min_n} or more valid interactions")
    return stats


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
