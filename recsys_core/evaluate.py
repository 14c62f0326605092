"""Evaluate stage: leave-one-out holdout metrics of the model and of reference baselines on the same split.

For each user the last interaction is the test item; the rest (train + validation) is the model's
input and is excluded from the candidates. Users missing from the output count as misses.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import ray

from recsys_core import storage
from recsys_core.baselines import itemknn_score_chunks, popularity_scores
from recsys_core.config import EvalConfig, InferConfig
from recsys_core.metrics import per_user_metrics, summarize_values
from recsys_core.retrieval import topk_from_scores

log = logging.getLogger(__name__)


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


BLOCK_USERS = 4096  # query users per dense score block of a baseline


def _baseline_popularity(train_users: np.ndarray, train_items: np.ndarray, n_users: int, n_items: int,
                         hist: list[np.ndarray], **_: Any) -> Iterator[np.ndarray]:
    pop = popularity_scores(train_items, n_items)  # (N,), one row shared by every user
    for s in range(0, len(hist), BLOCK_USERS):
        yield np.broadcast_to(pop, (len(hist[s:s + BLOCK_USERS]), n_items))


def _baseline_itemknn(train_users: np.ndarray, train_items: np.ndarray, n_users: int, n_items: int,
                      hist: list[np.ndarray], k_neighbors: int = 200, **_: Any) -> Iterator[np.ndarray]:
    return itemknn_score_chunks(train_users, train_items, n_users, n_items, hist, k_neighbors=k_neighbors,
                                chunk_size=BLOCK_USERS)


# name -> (..., query histories) -> (q, N) score blocks in query order (memory: one block at a time)
BASELINES: dict[str, Callable[..., Iterator[np.ndarray]]] = {
    "popularity": _baseline_popularity,
    "itemknn": _baseline_itemknn,
}


def baseline_per_user(users_uri: str, n_items: int, names: tuple[str, ...], ks: tuple[int, ...],
                      k_neighbors: int) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """Baselines fit on train+validation interactions, ranked for the test item (seen excluded).

    Returns per-user metric values for each baseline and the test item of each user."""
    t = storage.read_table(users_uri, columns=["items"])
    seqs = [np.asarray(s, dtype=np.int64) for s in t["items"].to_pylist()]
    hist = [s[:-1] for s in seqs]
    target = np.asarray([s[-1] for s in seqs], dtype=np.int64)
    train_users = np.repeat(np.arange(len(hist)), [len(h) for h in hist])
    train_items = np.concatenate(hist) if hist else np.zeros(0, np.int64)
    out = {}
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"eval.baselines: {name!r} unknown; choose from {sorted(BASELINES)}")
        ranked, done = [], 0
        for block in BASELINES[name](train_users, train_items, len(hist), n_items, hist, k_neighbors=k_neighbors):
            ranked.append(topk_from_scores(block, hist[done:done + len(block)], max(ks)))  # (q, K)
            done += len(block)
        top = np.concatenate(ranked) if ranked else np.zeros((0, max(ks)), np.int64)
        out[name] = per_user_metrics(top, target, ks)
    return out, target


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


def evaluate_model(model_dir: str, model_version: str, items_uri: str, users_uri: str, emb_uri: str, out_uri: str,
                   ev: EvalConfig, inf: InferConfig, max_seq_len: int, n_users: int
                   ) -> tuple[dict[str, np.ndarray], dict[str, float], int]:
    """One model on the holdout: embed the catalog, rank for every user with the test item hidden,
    write ``out_uri`` (holdout_recs.parquet). Returns per-user metric columns, their summary with
    bootstrap CIs, and the number of users scored. The new model and the production model (the
    promotion gate) both go through here."""
    from recsys_core.infer import catalog_ids, embed_items, score_users

    embed_items(model_dir, items_uri, emb_uri, inf.item_batch_size, inf.concurrency)
    scored = score_users(model_dir, emb_uri, users_uri, catalog_ids(items_uri), max(ev.ks), max_seq_len,
                         model_version, inf.batch_size, inf.concurrency, holdout=True,
                         block_mib=inf.block_mib)
    per_user, n_scored = model_holdout(scored, out_uri, metric_names(ev.ks))
    summary = summarize_values({k: v for k, v in per_user.items() if k != "target_item_idx"}, n_users, ev.n_boot)
    return per_user, summary, n_scored


def learning_curve_png(history: list[dict[str, Any]], baselines: dict[str, dict[str, float]]) -> bytes:
    """PNG: training loss and validation NDCG@10 per epoch, with baselines' test NDCG@10 for scale."""
    from recsys_core.report import figure_png, pyplot

    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [h["train_loss"] for h in history], marker="o")
    a.set(title="training loss", xlabel="epoch", ylabel="loss")
    b.plot(epochs, [h["val_ndcg10"] for h in history], marker="o", label="model (validation)")
    for (name, m), color in zip(baselines.items(), ["tab:gray", "tab:orange", "tab:green", "tab:red"]):
        b.axhline(m["ndcg@10"], linestyle="--", color=color, label=f"{name} (test)")
    b.set(title="NDCG@10", xlabel="epoch")
    b.legend(fontsize=8)
    return figure_png(fig)


def plot_learning_curve(history: list[dict[str, Any]], baselines: dict[str, dict[str, float]], out_uri: str) -> None:
    storage.write_bytes(out_uri, learning_curve_png(history, baselines))
