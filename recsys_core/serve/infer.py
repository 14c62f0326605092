"""Infer stage: Ray Data batch inference (callable classes on an actor pool).

1. ``ItemEmbedder`` embeds every catalog item (text tower + ID embedding) -> ``item_embeddings.npy``.
2. ``UserScorer`` embeds each user's history with the user tower, scores all items by inner
   product, masks the user's seen items and keeps the exact top-k.
Publishing the rows is :mod:`recsys_core.serve.publish`.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa
import ray
import torch

from recsys_core import storage
from recsys_core.data.text import PAD, pad_token_lists
from recsys_core.model.checkpoint import load_checkpoint
from recsys_core.model.prior import RecencyPrior, augment_items, augment_users
from recsys_core.model.towers import TwoTower, user_vectors
from recsys_core.runtime import gather_item_rows, pool_args
from recsys_core.serve.ann import AnnIndex, AnnSpec
from recsys_core.serve.retrieval import topk_excluding

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
        text = self.model.item_tower.text_embed(torch.from_numpy(ids), torch.from_numpy(mask), idx)
        emb = self.model.item_embeddings(text, idx).float().numpy()  # (b, D)
        return pa.table({"item_idx": batch["item_idx"],
                         "embedding": pa.FixedSizeListArray.from_arrays(emb.reshape(-1), emb.shape[1])})


class UserScorer:
    """``map_batches`` callable: users (user_id, items) -> top-k recommendations (seen items excluded).

    ``histories`` turns a batch's item lists into the user tower's inputs (all of them when serving);
    the holdout evaluator (:class:`recsys_core.eval.holdout.HoldoutScorer`) reuses the loading and
    ranking with the split's inputs. The loader is injectable (tests, other checkpoint formats).

    With a recency ``prior`` (a :class:`RecencyPrior` dict), serving ranks by model + prior asked at
    ``now``: ``prior_term_uri`` holds the (N,) item term ``log(1 + c_W(i, now))`` and each user's weight
    comes from ``now`` minus the user's last event (the batch's ``ts`` column).

    With ``ann`` (an :class:`AnnSpec` dict), the top-k comes from a FAISS index over the item side
    (built once per actor, on ``threads`` threads) instead of scoring every item."""

    def __init__(self, model_uri: str, item_emb_uri: str, item_ids: pa.Array, k: int, max_seq_len: int,
                 model_version: str, loader: Loader = load_checkpoint, threads: int = 1,
                 prior: dict[str, Any] | None = None, prior_term_uri: str | None = None, now: int | None = None,
                 ann: dict[str, Any] | None = None):
        torch.set_num_threads(threads)
        self.model, _ = loader(model_uri)
        self.table = torch.from_numpy(storage.read_npy(item_emb_uri))  # (N, D)
        self.item_ids = item_ids
        self.k, self.max_seq_len, self.version = k, max_seq_len, model_version
        self.prior = RecencyPrior.from_dict(prior) if prior else None
        if self.prior is not None:
            if prior_term_uri is None or now is None:
                raise ValueError("UserScorer: a recency prior needs prior_term_uri and now")
            self.now = int(now)
            # the prior as one more inner-product dimension, the item side built once: (N, D+1)
            self.prior_table = augment_items(self.table, torch.from_numpy(storage.read_npy(prior_term_uri)))
        items = self.prior_table if self.prior is not None else self.table  # (N, D) or (N, D+1)
        self.ann = AnnIndex(items.numpy(), AnnSpec(**{"threads": threads, **ann})) if ann else None

    def _topk(self, users: torch.Tensor, items: torch.Tensor, hist: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(b, D') users against the (N, D') item side: exact, or through the FAISS index built on it."""
        if self.ann is not None:
            return self.ann.search(users.numpy(), hist, self.k)
        return topk_excluding(users, items, hist, self.k)

    def rank(self, hist: list[np.ndarray], last_ts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices (-1 where fewer candidates) and scores, both (b, k). With a prior and each
        user's last event time ``last_ts`` (b,), by model + prior: the user side's extra dimension is
        beta times the temperature (the prior's weight in the units of ``u @ v``)."""
        users = user_vectors(self.model, self.table, hist, self.max_seq_len)  # (b, D)
        if self.prior is None or last_ts is None:
            if self.ann is not None and self.prior is not None:
                raise ValueError("UserScorer: the ANN index holds the prior's dimension; rank needs last_ts")
            return self._topk(users, self.table, hist)
        weight = torch.from_numpy(self.prior.weights(self.now - last_ts)) * float(self.model.temperature)  # (b,)
        return self._topk(augment_users(users, weight), self.prior_table, hist)  # (b, D+1) x (N, D+1)

    def rows(self, batch: pa.Table, idx: np.ndarray, scores: np.ndarray) -> dict[str, pa.Array]:
        """The published columns: user_id, item_ids and scores (best first), model_version."""
        lengths = (idx >= 0).sum(1)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        return {
            "user_id": batch["user_id"],
            "item_ids": pa.ListArray.from_arrays(offsets, self.item_ids.take(pa.array(idx[idx >= 0]))),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(scores[idx >= 0], pa.float32())),
            "model_version": pa.array([self.version] * batch.num_rows, pa.string()),
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        hist = [np.asarray(s, dtype=np.int64) for s in batch["items"].to_pylist()]
        last = (np.array([t[-1] for t in batch["ts"].to_pylist()], dtype=np.int64)  # (b,)
                if self.prior is not None else None)
        return pa.table(self.rows(batch, *self.rank(hist, last)))


def embed_items(model_uri: str, items_uri: str, out_uri: str, batch_size: int, concurrency: int) -> np.ndarray:
    """Embed the catalog with Ray Data (at most ``concurrency`` actors, fewer on a small cluster); the
    (N, D) matrix is item-sized and saved as .npy."""
    path, fs = storage.ray_location(items_uri)
    ds = ray.data.read_parquet(path, filesystem=fs, columns=["item_idx", "input_ids"])
    emb = ds.map_batches(ItemEmbedder, fn_constructor_kwargs={"model_uri": model_uri},
                         batch_size=batch_size, batch_format="pyarrow", **pool_args("ItemEmbedder", concurrency))
    table = gather_item_rows(emb, "embedding", storage.parquet_rows(items_uri))  # (N, D)
    storage.write_npy(out_uri, table)
    return table


def score_users(model_uri: str, item_emb_uri: str, users_uri: str, item_ids: pa.Array, k: int, max_seq_len: int,
                model_version: str, batch_size: int, concurrency: int, block_mib: float = 8.0,
                scorer: type[UserScorer] = UserScorer, columns: tuple[str, ...] = ("user_id", "items"),
                **scorer_kwargs: Any) -> ray.data.Dataset:
    """Lazy dataset of ``scorer`` rows per user (top-k recommendations by default). Users are read in
    blocks of at most ``block_mib`` MiB (this dataset's own DataContext), so every scorer actor gets
    work and output streams to the writer."""
    path, fs = storage.ray_location(users_uri)
    users = ray.data.read_parquet(path, filesystem=fs, columns=list(columns))  # the columns ``scorer`` reads
    if block_mib > 0:
        users.context.target_max_block_size = max(1, int(block_mib * 2**20))
    return users.map_batches(
        scorer, batch_size=batch_size, batch_format="pyarrow", **pool_args(scorer.__name__, concurrency),
        fn_constructor_kwargs={"model_uri": model_uri, "item_emb_uri": item_emb_uri, "item_ids": item_ids,
                               "k": k, "max_seq_len": max_seq_len, "model_version": model_version,
                               **scorer_kwargs})
