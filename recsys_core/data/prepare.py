"""Prepare stage: read, validate, quarantine, split, and build histories and training examples (Ray Data).

Outputs, under ``{root}/runs/run_date=D/prepared/``:
- ``items.parquet``: item_idx, item_id, text, input_ids (tokenised once per run), train_count
- ``users/``: one row per kept user: user_id, items (list<int32> item_idx, chronological), ts
- ``train_examples/``: next-item windows over each user's training part: input, target (list<int32>)
- ``quarantine/``: rejected rows (user_id, item_id, ts as text, reason), never silently dropped
- ``stats.json``: row counts, reject counts per reason, user and example counts

Protocol: per user, sort by (ts, item_id); last = test, second-to-last = validation, rest = train.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.context import ShuffleStrategy

from recsys_core import storage
from recsys_core.config import NightlyConfig, TrainConfig
from recsys_core.data.sources import SourceData
from recsys_core.data.split import MIN_EVENTS, train_part, training_windows
from recsys_core.data.text import load_tokenizer, render_texts, tokenize_texts

log = logging.getLogger(__name__)
REASONS = ("null_user_id", "null_item_id", "bad_timestamp", "unknown_item", "duplicate")
QUARANTINE_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                               ("ts", pa.string()), ("reason", pa.string())])


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
    items = storage.read_table(items_uri)
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
    texts = render_texts(items, cfg.data.item_template, source=items_uri)
    tok = load_tokenizer(cfg.model.tokenizer)
    input_ids = tokenize_texts(tok, texts, cfg.model.max_text_tokens)
    return pa.table({
        "item_idx": pa.array(np.arange(items.num_rows, dtype=np.int32)),
        "item_id": items["item_id"],
        "text": pa.array(texts, pa.string()),
        "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
    })


def _parse_ts(col: pa.ChunkedArray) -> np.ndarray:
    """Epoch seconds as float (NaN where unparseable) from timestamps, numbers or strings."""
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        secs = pc.cast(pc.cast(col, pa.timestamp("s"), safe=False), pa.int64())  # sub-second part dropped
        return secs.to_numpy(zero_copy_only=False).astype("float64")
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    s = pd.Series(col.to_pylist(), dtype="object")
    num = pd.to_numeric(s, errors="coerce")
    need = num.isna() & s.notna()
    if need.any():
        parsed = pd.to_datetime(s[need], errors="coerce", utc=True, format="mixed")
        num[need] = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return num.to_numpy(dtype="float64")


def validate_batch(batch: pa.Table, columns: dict[str, str], catalog_ids: pa.Array) -> pa.Table:
    """Normalise one batch to (user_id, item_idx, ts, raw_item_id, raw_ts, reason); reason is null for good rows."""
    user = batch[columns["user_id"]]
    item = batch[columns["item_id"]]
    ts = _parse_ts(batch[columns["ts"]])  # (R,)
    item_idx = pc.index_in(_canonical_ids(item), value_set=catalog_ids)  # null when unknown
    reason = np.full(batch.num_rows, None, dtype=object)
    # Later checks do not overwrite earlier reasons: the first failing rule names the row.
    checks = [
        ("bad_timestamp", ~np.isfinite(ts) | (np.nan_to_num(ts, nan=-1) < 0)),
        ("unknown_item", pc.is_null(item_idx).to_numpy(zero_copy_only=False)),
        ("null_item_id", pc.is_null(item).to_numpy(zero_copy_only=False)),
        ("null_user_id", pc.is_null(user).to_numpy(zero_copy_only=False)),
    ]
    for name, bad in checks:  # reverse priority: the last assignment wins
        reason[bad] = name
    return pa.table({
        "user_id": _canonical_ids(user),
        "item_idx": pc.cast(item_idx, pa.int32()),
        "ts": pa.array(np.nan_to_num(ts, nan=-1).astype(np.int64)),
        "raw_item_id": _canonical_ids(item),
        "raw_ts": pa.array([None if v is None else str(v) for v in batch[columns["ts"]].to_pylist()], pa.string()),
        "reason": pa.array(reason.tolist(), pa.string()),
    })


def _good(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"])).select(["user_id", "item_idx", "ts"])


def _bad(batch: pa.Table) -> pa.Table:
    bad = batch.filter(pc.is_valid(batch["reason"]))
    return pa.table({"user_id": bad["user_id"], "item_id": bad["raw_item_id"], "ts": bad["raw_ts"],
                     "reason": bad["reason"]}, schema=QUARANTINE_SCHEMA)


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
    return pa.table({"user_id": users, "item_id": items, "ts": ts,
                     "reason": ["duplicate"] * len(users)}, schema=QUARANTINE_SCHEMA)


def _read_interactions(src: SourceData, cfg: NightlyConfig) -> ray.data.Dataset:
    path, fs = storage.ray_location(src.interactions)
    if not storage.exists(src.interactions):
        raise DataValidationError(f"{src.interactions}: interactions not found")
    ds = ray.data.read_parquet(path, filesystem=fs)
    schema = ds.schema()
    types_ = dict(zip(schema.names, schema.types))
    for key, col in vars(cfg.data.columns).items():
        if col not in types_:
            raise DataValidationError(f"{src.interactions}: interactions have no column {col!r} "
                                      f"(config data.columns.{key}); columns are {schema.names}")
        t = types_[col]
        ok = (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
              or (key == "ts" and (pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_floating(t))))
        if not ok:
            raise DataValidationError(f"{src.interactions}: column {col!r} (config data.columns.{key}) has "
                                      f"type {t}; expected integer or string" + (", timestamp or float"
                                                                                  if key == "ts" else ""))
    return ds


def shuffle_strategy(name: str) -> "ray.data.context.ShuffleStrategy":

    choices = sorted({s.value for s in ShuffleStrategy})
    if name not in choices:
        raise ValueError(f"ray.shuffle_strategy={name!r} unknown; choose one of {choices}")
    return ShuffleStrategy(name)


def run_prepare(cfg: NightlyConfig, src: SourceData, out: PreparedPaths) -> dict[str, Any]:
    """Run the prepare stage with Ray Data; returns the stats also written to ``stats.json``."""
    ctx = ray.data.DataContext.get_current()
    ctx.default_hash_shuffle_parallelism = cfg.ray.shuffle_parallelism
    ctx.shuffle_strategy = shuffle_strategy(cfg.ray.shuffle_strategy)  # progress bars: runtime.configure_ray_data

    catalog = load_catalog(src.items, cfg)
    catalog_ids = _canonical_ids(catalog["item_id"])
    if isinstance(catalog_ids, pa.ChunkedArray):
        catalog_ids = catalog_ids.combine_chunks()
    columns = vars(cfg.data.columns)

    validated = _read_interactions(src, cfg).map_batches(
        validate_batch, batch_format="pyarrow", fn_kwargs={"columns": columns, "catalog_ids": catalog_ids},
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
    for t in bad.iter_batches(batch_format="pyarrow", batch_size=None):
        for r, n in zip(*np.unique(t["reason"].to_numpy(zero_copy_only=False), return_counts=True)):
            reasons[str(r)] += int(n)
    for t in dups.iter_batches(batch_format="pyarrow", batch_size=None):
        reasons["duplicate"] += t.num_rows
    rejected = sum(reasons.values())

    storage.delete(out.quarantine)
    if rejected:
        qpath, qfs = storage.ray_location(out.quarantine)
        bad.union(dups).repartition(1).write_parquet(qpath, filesystem=qfs)

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
