"""Evaluate stage: holdout metrics of the model (and, in :mod:`recsys_core.eval.baselines`, of reference
baselines) on the same split, through one evaluator (:func:`rank_holdout`).

The test users and their inputs follow the prepared split (:mod:`recsys_core.data.split`; leave-one-out:
each user's last interaction is the test item, the rest is the model's input and is excluded from the
candidates). Users missing from the output count as misses.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from recsys_core import storage
from recsys_core.config import EvalConfig, InferConfig
from recsys_core.data.prepare import catalog_ids
from recsys_core.data.split import SPLIT_COLUMNS, Which, sample_rows, split_rows
from recsys_core.eval.metrics import per_user_metrics, summarize_values
from recsys_core.model.towers import TwoTower, encode_items, user_vectors
from recsys_core.serve.infer import UserScorer, embed_items, score_users
from recsys_core.serve.retrieval import topk_excluding


def holdout_rows(n_users: int, max_users: int | None, seed: int) -> np.ndarray | None:
    """Sorted rows of the users file the holdout scores: None (every user) when ``max_users`` is None or
    not below ``n_users``, else ``max_users`` distinct rows drawn with ``seed``."""
    if max_users is None or n_users <= max_users:
        return None
    if max_users < 1:
        raise ValueError(f"eval.max_users must be >= 1 or null, got {max_users}")
    return sample_rows(n_users, max_users, seed)


def holdout_users(users_uri: str, out_uri: str, max_users: int | None, seed: int) -> dict[str, Any]:
    """The users the holdout scores: the prepared users file itself, or (more than ``max_users`` users)
    a seeded sample written to ``out_uri``. Returns its uri, the count scored and the count kept."""
    total = storage.parquet_totals(users_uri)[0]
    rows = holdout_rows(total, max_users, seed)
    if rows is None:
        return {"uri": users_uri, "users": total, "of": total, "sampled": False, "rows": None}
    storage.write_table(storage.take_rows(users_uri, rows), out_uri)
    return {"uri": out_uri, "users": len(rows), "of": total, "sampled": True, "seed": seed, "rows": rows}


def model_holdout(scored: ray.data.Dataset, out_uri: str, metric_names: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """Write holdout_recs.parquet (user_id, item_ids best first) and gather per-user metric columns
    (plus ``target_item_idx``, the held-out item of each user)."""
    metric_names = [*metric_names, "target_item_idx"]
    cols: dict[str, list[np.ndarray]] = {m: [] for m in metric_names}
    tables = []
    for t in scored.iter_batches(batch_format="pyarrow", batch_size=None):
        tables.append(t.select(["user_id", "item_ids"]))
        for m in metric_names:
            cols[m].append(t[m].to_numpy())
    table = pa.concat_tables(tables)
    storage.write_table(table, out_uri)
    return {m: np.concatenate(v) if v else np.zeros(0) for m, v in cols.items()}, table.num_rows


def cold_start_metrics(model_pu: dict[str, np.ndarray], base_pu: dict[str, dict[str, np.ndarray]],
                       base_target: np.ndarray, cold_items: np.ndarray, n_boot: int) -> dict[str, Any] | None:
    """Metrics restricted to users whose test item never occurs in training (scored from text alone)."""
    model_mask = cold_items[model_pu["target_item_idx"].astype(np.int64)]
    if not model_mask.any():
        return None
    base_mask = cold_items[base_target]
    pick = lambda pu, m: {k: v[m] for k, v in pu.items() if k != "target_item_idx"}  # noqa: E731
    return {"users": int(model_mask.sum()),
            "model": summarize_values(pick(model_pu, model_mask), int(model_mask.sum()), n_boot),
            "baselines": {b: summarize_values(pick(pu, base_mask), int(base_mask.sum()), n_boot)
                          for b, pu in base_pu.items()}}


def metric_names(ks: tuple[int, ...]) -> list[str]:
    return [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + [f"mrr@{max(ks)}"]


def rank_holdout(model: TwoTower, table: torch.Tensor, histories: list[np.ndarray], targets: np.ndarray,
                 max_len: int, k: int, ks: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The holdout evaluator: rank every item for each history (seen items excluded) and score the
    held-out target. Returns top-``k`` indices and scores (U, k) and per-user metrics. Validation
    during training and the evaluate stage's test holdout both go through here."""
    users = user_vectors(model, table, histories, max_len)  # (U, D)
    ranked, scores = topk_excluding(users, table, histories, k)  # (U, k)
    return ranked, scores, per_user_metrics(ranked, targets, ks)


def evaluate_histories(model: TwoTower, tokens: torch.Tensor, mask: torch.Tensor, histories: list[np.ndarray],
                       targets: np.ndarray, max_len: int, ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """Mean holdout metrics of an in-memory model (item tokens (N, T) embedded first)."""
    table = encode_items(model, tokens, mask)  # (N, D)
    _, _, per_user = rank_holdout(model, table, histories, targets, max_len, max(ks), ks)
    return {k: float(v.mean()) for k, v in per_user.items()}


class HoldoutScorer(UserScorer):
    """``map_batches`` callable for the evaluate stage: the serving model's loading and ranking, with
    the split's ``which`` target hidden from the inputs; adds ``target_item_idx`` and per-user metrics."""

    def __init__(self, *args: Any, ks: tuple[int, ...] = (10, 50), which: Which = "test", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ks, self.which = ks, which

    def __call__(self, batch: pa.Table) -> pa.Table:
        hist, target, rows = split_rows(batch, self.which)  # only the users of this split
        if len(rows) == 0:
            return pa.table({"user_id": batch["user_id"].slice(0, 0), "item_ids": pa.array([], pa.list_(self.item_ids.type)),
                             "scores": pa.array([], pa.list_(pa.float32())), "model_version": pa.array([], pa.string()),
                             "target_item_idx": pa.array([], pa.int64()),
                             **{m: pa.array([], pa.float64()) for m in metric_names(self.ks)}})
        batch = batch.take(pa.array(rows))
        ranked, scores, per_user = rank_holdout(self.model, self.table, hist, target, self.max_seq_len, self.k,
                                                self.ks)
        out = self.rows(batch, ranked, scores)
        out["target_item_idx"] = pa.array(target)
        for name, v in per_user.items():
            out[name] = pa.array(v.astype(np.float64))
        return pa.table(out)


def evaluate_model(model_dir: str, model_version: str, items_uri: str, users_uri: str, emb_uri: str, out_uri: str,
                   ev: EvalConfig, inf: InferConfig, max_seq_len: int, n_users: int
                   ) -> tuple[dict[str, np.ndarray], dict[str, float], int]:
    """One model on the test holdout: embed the catalog, rank for every user with the test item
    hidden, write ``out_uri`` (holdout_recs.parquet). Returns per-user metric columns, their summary
    with bootstrap CIs, and the number of users scored. The new model and the production model (the
    promotion gate) both go through here."""
    embed_items(model_dir, items_uri, emb_uri, inf.item_batch_size, inf.concurrency)
    scored = score_users(model_dir, emb_uri, users_uri, catalog_ids(items_uri), max(ev.ks), max_seq_len,
                         model_version, inf.batch_size, inf.concurrency, block_mib=inf.block_mib,
                         scorer=HoldoutScorer, columns=("user_id", "items", *SPLIT_COLUMNS), ks=tuple(ev.ks),
                         which="test")
    per_user, n_scored = model_holdout(scored, out_uri, metric_names(ev.ks))
    summary = summarize_values({k: v for k, v in per_user.items() if k != "target_item_idx"}, n_users, ev.n_boot)
    return per_user, summary, n_scored
