"""The nightly pipeline: prepare -> train -> evaluate -> infer + publish, each stage rerunnable alone.

Storage layout under ``storage.root``::

    raw/<source>/                              demo sources materialised at run time
    runs/run_date=D/prepared/                  prepare outputs (see recsys_core.data)
    runs/run_date=D/ray_train/                 Ray Train run (checkpoints)
    runs/run_date=D/stages/<stage>.json        completion markers (written last)
    models/<version>/                          registry: weights, config, metrics, marker last
    evaluation/run_date=D/                     holdout_recs.parquet, metrics.json, learning_curve.png
    recommendations/run_date=D/                part-*.parquet + _MANIFEST.json (written last)
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable

import pyarrow as pa

from recsys_core import storage
from recsys_core.config import NightlyConfig, replace
from recsys_core.data import PreparedPaths, run_prepare
from recsys_core.runtime import init_ray, stage_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    cfg: NightlyConfig
    run_date: str
    force: bool = False

    @property
    def root(self) -> str:
        return self.cfg.storage.root

    @property
    def run_dir(self) -> str:
        return storage.join(self.root, "runs", f"run_date={self.run_date}")

    @property
    def prepared(self) -> PreparedPaths:
        return PreparedPaths(storage.join(self.run_dir, "prepared"))

    @property
    def eval_dir(self) -> str:
        return storage.join(self.root, "evaluation", f"run_date={self.run_date}")

    @property
    def recs_dir(self) -> str:
        return storage.join(self.root, "recommendations", f"run_date={self.run_date}")

    def model_dir(self, version: str) -> str:
        return storage.join(self.root, "models", version)

    def marker(self, stage: str) -> str:
        return storage.join(self.run_dir, "stages", f"{stage}.json")

    def done(self, stage: str) -> dict[str, Any] | None:
        """The stage's completion record, or None when it has to run.

        A record is stale (None) when a stage it consumed was redone after it: each record stores
        the ``finished_at`` of the upstream records it read."""
        if not storage.exists(self.marker(stage)):
            return None
        rec = storage.read_json(self.marker(stage))
        for dep in DEPENDS[stage]:
            up = self.done(dep)
            if up is None or rec.get("inputs", {}).get(dep) != up.get("finished_at"):
                return None
        return rec

    def require(self, stage: str) -> dict[str, Any]:
        rec = self.done(stage)
        if rec is None:
            raise RuntimeError(f"stage '{stage}' has not completed (or is stale) for run_date={self.run_date} "
                               f"under {self.root}; run `python -m jobs.{JOB_OF[stage]} --run-date "
                               f"{self.run_date}` first")
        return rec


DEPENDS: dict[str, tuple[str, ...]] = {"prepare": (), "train": ("prepare",), "evaluate": ("train",),
                                       "infer": ("train",)}
JOB_OF = {"prepare": "prepare", "train": "train", "evaluate": "infer", "infer": "infer"}


def _stage(name: str, fn: Callable[[Run], dict[str, Any]], run: Run) -> dict[str, Any]:
    """Run one stage unless its marker says it already completed (``--force`` reruns it)."""
    with stage_context(run.run_date, name):
        rec = run.done(name)
        if rec is not None and not run.force:
            log.info("stage %s already complete for %s; skipping (use --force to rerun)", name, run.run_date)
            return rec
        t0 = time.time()
        out = fn(run)
        inputs = {dep: run.require(dep)["finished_at"] for dep in DEPENDS[name]}
        finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
        out = {**out, "stage": name, "run_date": run.run_date, "wall_s": round(time.time() - t0, 2),
               "inputs": inputs, "finished_at": finished}
        storage.write_json(run.marker(name), out)
        log.info("stage %s done in %.1fs", name, out["wall_s"])
        return out


# ----------------------------------------------------------------------------- stages


def prepare_stage(run: Run) -> dict[str, Any]:
    from recsys_core.sources import resolve_source

    src = resolve_source(run.cfg.data, run.root)
    stats = run_prepare(run.cfg, src, run.prepared)
    return {"prepared": run.prepared.root, "stats": stats}


def train_stage(run: Run) -> dict[str, Any]:
    from recsys_core.train import copy_checkpoint, run_train

    run.require("prepare")
    fit = run_train(run.cfg, run.prepared, run.run_dir)
    version = f"{run.run_date.replace('-', '')}-{time.strftime('%H%M%S')}"
    model_dir = run.model_dir(version)
    storage.write_json(storage.join(model_dir, "metrics.json"),
                       {"best": fit["metrics"], "history": fit["history"], "run_date": run.run_date,
                        "input": run.prepared.root, "config": asdict(run.cfg)})
    copy_checkpoint(fit["checkpoint"], model_dir)
    return {"model_version": version, "model_dir": model_dir, "best": fit["metrics"], "history": fit["history"]}


def evaluate_stage(run: Run) -> dict[str, Any]:
    from recsys_core.evaluate import baseline_per_user, cold_start_metrics, model_holdout, plot_learning_curve
    from recsys_core.infer import embed_items, score_users
    from recsys_core.metrics import summarize_values

    cfg, trained = run.cfg, run.require("train")
    items = storage.read_table(run.prepared.items, columns=["item_id", "train_count"])
    emb_uri = storage.join(trained["model_dir"], "item_embeddings.npy")
    embed_items(trained["model_dir"], run.prepared.items, emb_uri, cfg.infer.item_batch_size, cfg.infer.concurrency)
    scored = score_users(trained["model_dir"], emb_uri, run.prepared.users, _ids(items), max(cfg.eval.ks),
                         cfg.model.max_seq_len, trained["model_version"], cfg.infer.batch_size,
                         cfg.infer.concurrency, holdout=True)
    names = [f"{m}@{k}" for k in cfg.eval.ks for m in ("recall", "ndcg")] + [f"mrr@{max(cfg.eval.ks)}"]
    per_user, n_scored = model_holdout(scored, storage.join(run.eval_dir, "holdout_recs.parquet"), names)
    n_users = run.require("prepare")["stats"]["users_kept"]
    model_m = summarize_values({k: v for k, v in per_user.items() if k != "target_item_idx"}, n_users,
                               cfg.eval.n_boot)
    base_pu, base_target = baseline_per_user(run.prepared.users, items.num_rows, cfg.eval.baselines, cfg.eval.ks,
                                             cfg.eval.itemknn_neighbors)
    base = {b: summarize_values(pu, n_users, cfg.eval.n_boot) for b, pu in base_pu.items()}
    cold = cold_start_metrics(per_user, base_pu, base_target, items["train_count"].to_numpy() == 0, cfg.eval.n_boot)
    metrics = {"model": model_m, "baselines": base, "model_version": trained["model_version"],
               "users_scored": n_scored, "cold_start": cold,
               "note": "bootstrap 95% CIs over users; with ~1k users, differences under ~0.015 are noise"}
    storage.write_json(storage.join(run.eval_dir, "metrics.json"), metrics)
    plot_learning_curve(trained["history"], base, storage.join(run.eval_dir, "learning_curve.png"))
    _log_table(model_m, base)
    return {"metrics": metrics, "eval_dir": run.eval_dir}


def infer_stage(run: Run) -> dict[str, Any]:
    from recsys_core.infer import embed_items, publish, score_users

    cfg, trained, prepared = run.cfg, run.require("train"), run.require("prepare")
    evaluated = run.done("evaluate")
    items = storage.read_table(run.prepared.items, columns=["item_id"])
    emb_uri = storage.join(trained["model_dir"], "item_embeddings.npy")
    if not storage.exists(emb_uri):
        embed_items(trained["model_dir"], run.prepared.items, emb_uri, cfg.infer.item_batch_size, cfg.infer.concurrency)
    recs = score_users(trained["model_dir"], emb_uri, run.prepared.users, _ids(items), cfg.infer.k,
                       cfg.model.max_seq_len, trained["model_version"], cfg.infer.batch_size, cfg.infer.concurrency)
    headline = {}
    if evaluated:
        m = evaluated["metrics"]
        headline = {"holdout": {k: v for k, v in m["model"].items() if "_ci_" not in k},
                    "baselines": {b: {k: v for k, v in bm.items() if "_ci_" not in k}
                                  for b, bm in m["baselines"].items()}}
    manifest = publish(recs, run.recs_dir, {
        "run_date": run.run_date, "model_version": trained["model_version"], "k": cfg.infer.k,
        "users": prepared["stats"]["users_kept"], "metrics": headline,
        "input_snapshot": {"interactions": prepared["stats"]["interactions_uri"],
                           "items": prepared["stats"]["items_uri"], "rows_read": prepared["stats"]["rows_read"]},
    })
    log.info("published %d users' top-%d to %s", manifest["rows"], cfg.infer.k, run.recs_dir)
    return {"recommendations": run.recs_dir, "manifest": manifest}


def _ids(items: pa.Table) -> pa.Array:
    col = items["item_id"]
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _log_table(model: dict[str, float], base: dict[str, dict[str, float]]) -> None:
    cols = [k for k in model if "_ci_" not in k and k != "n_users"]
    log.info("holdout (%d users): %s", model["n_users"], "  ".join(cols))
    for name, m in [("model", model), *base.items()]:
        log.info("  %-12s %s", name, "  ".join(f"{m[c]:.4f}" for c in cols))


STAGES: dict[str, list[tuple[str, Callable[[Run], dict[str, Any]]]]] = {
    "prepare": [("prepare", prepare_stage)],
    "train": [("train", train_stage)],
    "infer": [("evaluate", evaluate_stage), ("infer", infer_stage)],
    "nightly": [("prepare", prepare_stage), ("train", train_stage), ("evaluate", evaluate_stage),
                ("infer", infer_stage)],
}


def run_job(job: str, cfg: NightlyConfig, run_date: str, force: bool = False) -> dict[str, Any]:
    """Run a job's stages in order; returns each stage's completion record."""
    if not storage.is_s3(cfg.storage.root):  # Ray workers run in other folders: pin relative roots
        cfg = replace(cfg, **{"storage.root": os.path.abspath(cfg.storage.root)})
    init_ray(cfg.ray)
    run = Run(cfg, run_date, force)
    t0 = time.time()
    results = {name: _stage(name, fn, run) for name, fn in STAGES[job]}
    log.info("job %s for %s finished in %.1fs; outputs under %s", job, run_date, time.time() - t0, run.root)
    return results
