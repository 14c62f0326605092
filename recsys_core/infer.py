"""Infer stage: Ray Data batch inference (callable classes on an actor pool) and atomic publishing.

1. ``ItemEmbedder`` embeds every catalog item (text tower + ID embedding) -> ``item_embeddings.npy``.
2. ``UserScorer`` embeds each user's history with the user tower, scores all items by inner
   product, masks the user's seen items and keeps the exact top-k.
3. ``publish`` writes ``part-<attempt>-*.parquet`` beside any older attempt's files, then the
   ``_MANIFEST.json`` listing exactly its files (the atomic switch), then deletes older parts.
   Readers go through the manifest (:func:`read_recommendations`), so they never see a mix.
"""
from __future__ import annotations

import datetime as dt
import io
import logging
import time
import uuid
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.datasource import FilenameProvider

from recsys_core import storage
from recsys_core.metrics import per_user_metrics
from recsys_core.model import TwoTower, load_checkpoint
from recsys_core.retrieval import topk_excluding
from recsys_core.text import pad_token_lists
from recsys_core.train import PAD, user_vectors

log = logging.getLogger(__name__)
MANIFEST = "_MANIFEST.json"
Loader = Callable[[str], tuple[TwoTower, dict[str, Any]]]


class ItemEmbedder:
    """``map_batches`` callable: items (item_idx, input_ids) -> (item_idx, embedding)."""

    def __init__(self, model_uri: str, loader: Loader = load_checkpoint, threads: int = 1):
        torch.set_num_threads(threads)
        self.model, _ = loader(model_uri)

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        ids, mask = pad_token_lists(batch["input_ids"].to_pylist(), pad_id=PAD)
        idx = torch.from_numpy(batch["item_idx"].to_numpy().astype(np.int64))
        text = self.model.item_tower.text_embed(torch.from_numpy(ids), torch.from_numpy(mask))
        emb = self.model.item_embeddings(text, idx).float().numpy()  # (b, D)
        return pa.table({"item_idx": batch["item_idx"],
                         "embedding": pa.FixedSizeListArray.from_arrays(emb.reshape(-1), emb.shape[1])})


class UserScorer:
    """``map_batches`` callable: users (user_id, items) -> top-k recommendations.

    ``holdout=True`` hides each user's last item (the test item), ranks with the rest as input
    and also returns per-user metrics against the hidden item.
    """

    def __init__(self, model_uri: str, item_emb_uri: str, item_ids: pa.Array, k: int, max_seq_len: int,
                 model_version: str, holdout: bool = False, ks: tuple[int, ...] = (10, 50),
                 loader: Loader = load_checkpoint, threads: int = 1):
        torch.set_num_threads(threads)
        self.model, _ = loader(model_uri)
        self.table = torch.from_numpy(np.load(io.BytesIO(storage.read_bytes(item_emb_uri))))
        self.item_ids = item_ids
        self.k, self.max_seq_len, self.version = k, max_seq_len, model_version
        self.holdout, self.ks = holdout, ks

    def __call__(self, batch: pa.Table) -> pa.Table:
        seqs = [np.asarray(s, dtype=np.int64) for s in batch["items"].to_pylist()]
        hist = [s[:-1] for s in seqs] if self.holdout else seqs
        users = user_vectors(self.model, self.table, hist, self.max_seq_len)  # (b, D)
        idx, scores = topk_excluding(users, self.table, hist, self.k)  # (b, k)
        lengths = (idx >= 0).sum(1)
        flat = idx[idx >= 0]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        out = {
            "user_id": batch["user_id"],
            "item_ids": pa.ListArray.from_arrays(pa.array(offsets), self.item_ids.take(pa.array(flat))),
            "scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores[idx >= 0], pa.float32())),
            "model_version": pa.array([self.version] * len(seqs), pa.string()),
        }
        if self.holdout:
            target = np.asarray([s[-1] for s in seqs], dtype=np.int64)
            out["target_item_idx"] = pa.array(target)
            for name, v in per_user_metrics(idx, target, self.ks).items():
                out[name] = pa.array(v.astype(np.float64))
        return pa.table(out)


class _PartNames(FilenameProvider):
    """``part-<attempt>-<task>.parquet``: an attempt's files never collide with an older attempt's."""

    def __init__(self, attempt: str):
        super().__init__(file_format="parquet")
        self.attempt = attempt

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{self.attempt}-{write_uuid}-{task_index:05d}.parquet"


def catalog_ids(items_uri: str) -> pa.Array:
    """The prepared catalog's ``item_id`` column in ``item_idx`` order (one array)."""
    return storage.read_table(items_uri, columns=["item_id"])["item_id"].combine_chunks()


def embed_items(model_uri: str, items_uri: str, out_uri: str, batch_size: int, concurrency: int) -> np.ndarray:
    """Embed the catalog with Ray Data; the (N, D) matrix is item-sized and saved as .npy."""
    path, fs = storage.ray_location(items_uri)
    ds = ray.data.read_parquet(path, filesystem=fs, columns=["item_idx", "input_ids"])
    emb = ds.map_batches(ItemEmbedder, fn_constructor_kwargs={"model_uri": model_uri},
                         batch_size=batch_size, batch_format="pyarrow", concurrency=concurrency)
    parts = sorted(((t["item_idx"].to_numpy(), np.stack(t["embedding"].to_numpy(zero_copy_only=False)))
                    for t in emb.iter_batches(batch_format="pyarrow", batch_size=None)), key=lambda p: p[0][0])
    idx = np.concatenate([p[0] for p in parts])
    table = np.zeros((len(idx), parts[0][1].shape[1]), dtype=np.float32)
    table[idx] = np.concatenate([p[1] for p in parts])
    buf = io.BytesIO()
    np.save(buf, table)
    storage.write_bytes(out_uri, buf.getvalue())
    return table


def score_users(model_uri: str, item_emb_uri: str, users_uri: str, item_ids: pa.Array, k: int, max_seq_len: int,
                model_version: str, batch_size: int, concurrency: int, holdout: bool = False,
                block_mib: float = 8.0) -> ray.data.Dataset:
    """Lazy dataset of top-k rows per user. Users are read in blocks of at most ``block_mib`` MiB (this
    dataset's own DataContext), so every scorer actor gets work and output streams to the writer."""
    path, fs = storage.ray_location(users_uri)
    users = ray.data.read_parquet(path, filesystem=fs, columns=["user_id", "items"])
    if block_mib > 0:
        users.context.target_max_block_size = max(1, int(block_mib * 2**20))
    return users.map_batches(
        UserScorer, batch_size=batch_size, batch_format="pyarrow", concurrency=concurrency,
        fn_constructor_kwargs={"model_uri": model_uri, "item_emb_uri": item_emb_uri, "item_ids": item_ids,
                               "k": k, "max_seq_len": max_seq_len, "model_version": model_version,
                               "holdout": holdout})


def publish(ds: ray.data.Dataset, folder: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``ds`` as ``folder/part-<attempt>-*.parquet`` and switch readers to it with one manifest write.

    The previous generation's files stay (a reader holding the old manifest can finish); the
    generation before that is deleted. Only files named by a manifest are ever deleted, so an
    overlapping publish never removes another attempt's fresh parts."""
    man_uri = storage.join(folder, MANIFEST)
    previous = storage.read_json(man_uri) if storage.exists(man_uri) else None
    # microseconds: a later attempt sorts later, even within one second (see part_attempt)
    attempt = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:6]
    path, fs = storage.ray_location(folder)
    ds.write_parquet(path, filesystem=fs, filename_provider=_PartNames(attempt))
    files = [f for f in storage.list_files(folder, ".parquet") if f.rsplit("/", 1)[-1].startswith(f"part-{attempt}-")]
    rows = sum(storage.parquet_rows(f) for f in files)
    full = {**manifest, "attempt": attempt, "files": [f.rsplit("/", 1)[-1] for f in files], "rows": rows,
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "previous_files": previous["files"] if previous else []}
    storage.write_json(man_uri, full)  # the atomic switch
    keep = set(full["files"]) | set(full["previous_files"])
    for uri in storage.list_files(folder, ".parquet"):
        name = uri.rsplit("/", 1)[-1]
        # Older attempts' parts that no manifest still names: the generation before the previous one,
        # and the parts of an attempt killed before its manifest (one publisher per date).
        if name.startswith("part-") and name not in keep and part_attempt(name) < attempt:
            storage.delete(uri)
    return full


def part_attempt(name: str) -> str:
    """``part-<attempt>-<write uuid>-<task>.parquet`` -> ``<attempt>`` (``%Y%m%dT%H%M%S%f-<6 hex>``: sorts by start)."""
    return name[len("part-"):len("part-") + len("20261127T020000123456-abcdef")]


def read_recommendations(folder: str) -> tuple[pa.Table, dict[str, Any]]:
    """Read a published run through its manifest; a folder without one is not trusted."""
    man_uri = storage.join(folder, MANIFEST)
    if not storage.exists(man_uri):
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; this run was never published")
    for attempt in range(2):  # a publish two generations later may delete files under a slow reader
        manifest = storage.read_json(man_uri)
        try:
            tables = [storage.read_table(storage.join(folder, f)) for f in manifest["files"]]
            return pa.concat_tables(tables) if tables else pa.table({}), manifest
        except FileNotFoundError:
            if attempt:
                raise
    raise AssertionError("unreachable")
