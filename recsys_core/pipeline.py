"""The nightly pipeline: prepare -> train -> evaluate -> promote -> infer + publish -> report,
each stage rerunnable alone.

Storage layout under ``storage.root``::

    raw/<source>/                              demo sources materialised at run time
    runs/run_date=D/prepared/                  prepare outputs (see recsys_core.data)
    runs/run_date=D/ray_train/                 Ray Train run (checkpoints)
    runs/run_date=D/production/                the production model re-indexed to today's catalog (when it
                                               changed) and its item embeddings, for warm start and the gate
    runs/run_date=D/stages/<stage>.json        completion markers (written last)
    models/<version>/, models/PRODUCTION       the registry (see recsys_core.registry)
    evaluation/run_date=D/                     holdout_recs.parquet, metrics.json, learning_curve.png,
                                               production_holdout_recs.parquet, promotion.json, report.html
    recommendations/run_date=D/                part-*.parquet + _MANIFEST.json (written last)
    history/metrics.parquet                    one row per run date (see recsys_core.report)
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable

import pyarrow as pa

from recsys_core import storage
from recsys_core.config import NightlyConfig, replace
from recsys_core.data.prepare import PreparedPaths, catalog_ids, run_prepare
from recsys_core.data.sources import resolve_source
from recsys_core.eval.baselines import baseline_per_user
from recsys_core.eval.holdout import cold_start_metrics, evaluate_model
from recsys_core.eval.metrics import summarize_values
from recsys_core.model.checkpoint import CONFIG, copy_model_folder
from recsys_core.ops import gate, registry, report
from recsys_core.ops.explain import describe_users
from recsys_core.ops.gate import ON_REJECT
from recsys_core.ops.report import plot_learning_curve, point_metrics
from recsys_core.preflight import preflight
from recsys_core.runtime import init_ray, stage_context
from recsys_core.serve.infer import embed_items, score_users
from recsys_core.serve.publish import publish
from recsys_core.train.trainer import run_train

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
                                       "promote": ("evaluate",), "infer": ("promote",), "report": ("infer",),
                                       "explain": ("infer",)}


JOB_OF = {"prepare": "prepare", "train": "train", "evaluate": "infer", "promote": "infer", "infer": "infer",
          "report": "infer", "explain": "explain"}


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


def prepare_stage(run: Run) -> dict[str, Any]:

    src = resolve_source(run.cfg.data, run.root)
    stats = run_prepare(run.cfg, src, run.prepared)
    return {"prepared": run.prepared.root, "stats": stats}


def train_stage(run: Run) -> dict[str, Any]:

    stats = run.require("prepare")["stats"]
    for stale in registry.incomplete_versions(run.root, run.run_date):
        log.info("removing models/%s: an earlier attempt of this date stopped before its _COMPLETE marker", stale)
        storage.delete(registry.version_dir(run.root, stale))
    ids = catalog_ids(run.prepared.items)
    catalog = {"n_items": len(ids), "sha256": registry.catalog_hash(ids)}
    config = asdict(run.cfg)
    warm = _warm_start(run, ids, catalog["sha256"], config)
    fit = run_train(run.cfg, run.prepared, run.run_dir, init_from=warm.get("init_from"), fresh=run.force)
    guard = fit.get("guard")
    version = registry.new_version(run.root, run.run_date)
    model_dir = registry.version_dir(run.root, version)
    storage.write_json(storage.join(model_dir, registry.METRICS),
                       {"best": fit["metrics"], "history": fit["history"], "guard": guard, "run_date": run.run_date,
                        "input": run.prepared.root, "config": config})
    lineage = {
        "version": version, "run_date": run.run_date, "parent": warm.get("from") if warm["used"] else None,
        "warm_start": warm, "catalog": catalog, "code": registry.code_version(),
        "tokenizer": registry.save_tokenizer(run.cfg.model.tokenizer, model_dir),
        "input": {"prepared": run.prepared.root, "interactions_uri": stats["interactions_uri"],
                  "items_uri": stats["items_uri"], "rows_read": stats["rows_read"],
                  "rows_rejected": stats["rows_rejected"], "users_kept": stats["users_kept"]},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": config,
    }
    registry.write_version_files(model_dir, lineage, ids)
    copy_model_folder(fit["checkpoint"], model_dir)  # _COMPLETE last
    return {"model_version": version, "model_dir": model_dir, "best": fit["metrics"], "history": fit["history"],
            "guard": guard, "parent": lineage["parent"], "warm_start": warm}


def _warm_start(run: Run, ids: pa.Array, today_hash: str, config: dict[str, Any]) -> dict[str, Any]:
    """Start from the production model when there is one, warm start is on and the architecture matches
    (a changed catalog is re-indexed: known items keep their ID vectors, new ones start at zero)."""
    prod = registry.production_version(run.root)
    if prod is None:
        return {"used": False, "reason": "no production model yet"}
    if not run.cfg.registry.warm_start:
        return {"used": False, "from": prod, "reason": "registry.warm_start is off"}
    ok, why = registry.warm_start_check(registry.read_lineage(run.root, prod), config)
    if not ok:
        log.warning("warm start from %s skipped: %s; training from scratch", prod, why)
        return {"used": False, "from": prod, "reason": why}
    model_dir, note = registry.on_catalog(run.root, prod, ids, today_hash, storage.join(run.run_dir, "production"))
    log.info("warm start from production model %s (%s)", prod, note)
    return {"used": True, "from": prod, "reason": note, "init_from": model_dir}


def evaluate_stage(run: Run) -> dict[str, Any]:

    cfg, trained = run.cfg, run.require("train")
    items = storage.read_table(run.prepared.items, columns=["item_id", "train_count"])
    n_users = run.require("prepare")["stats"]["users_kept"]
    per_user, model_m, n_scored = evaluate_model(
        trained["model_dir"], trained["model_version"], run.prepared.items, run.prepared.users,
        storage.join(trained["model_dir"], "item_embeddings.npy"), storage.join(run.eval_dir, "holdout_recs.parquet"),
        cfg.eval, cfg.infer, cfg.model.max_seq_len, n_users)
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


def promote_stage(run: Run) -> dict[str, Any]:
    """The promotion gate: the production model is evaluated on today's holdout too; the new model
    replaces it only when its NDCG@10 is within ``registry.ndcg_tolerance`` and the generation guard
    passed. Decides which model's recommendations are published, then applies retention."""
    cfg, trained, evaluated = run.cfg, run.require("train"), run.require("evaluate")
    new = trained["model_version"]
    pointer = registry.production(run.root)
    # A rerun after a crash between the pointer write and this stage's record compares with the one before.
    base = (pointer.get("previous") if pointer["version"] == new else pointer["version"]) if pointer else None
    prod_eval, note = None, "no production model yet"
    if base and not registry.is_complete(run.root, base):
        base, note = None, "the previous production model is no longer in the registry"
    elif base:
        ok, why = registry.comparable_check(registry.read_lineage(run.root, base), asdict(cfg))
        if ok:
            prod_eval = _evaluate_production(run, base)
        else:
            note = f"production model {base} cannot score today's data: {why}"
            log.warning("%s; the gate compares against nothing", note)
    decision = gate.gate_decision(evaluated["metrics"]["model"]["ndcg@10"],
                                      prod_eval["metrics"]["ndcg@10"] if prod_eval else None,
                                      cfg.registry.ndcg_tolerance, trained.get("guard"), note)
    new_source = {"model_version": new, "model_dir": trained["model_dir"], "role": "new",
                  "item_embeddings": storage.join(trained["model_dir"], "item_embeddings.npy"),
                  "max_seq_len": cfg.model.max_seq_len, "metrics": evaluated["metrics"]["model"],
                  "guard": trained.get("guard")}
    if decision.promote:
        registry.promote(run.root, new, run.run_date, decision.reason, previous=base)
        source, why_source = new_source, "the new model passed the promotion gate"
    else:
        log.warning("model %s NOT promoted: %s", new, decision.reason)
        source, why_source = ON_REJECT[cfg.registry.on_reject](prod_eval, base)
        log.warning("publishing for %s: %s", run.run_date, why_source)
    production = registry.production_version(run.root)
    deleted = registry.apply_retention(run.root, cfg.registry.keep_versions, protect=[new, production])
    out = {"decision": decision.to_dict(), "model_version": new, "production_before": base,
           "production": production, "production_eval": prod_eval, "publish": source, "publish_reason": why_source,
           "retention_deleted": deleted}
    storage.write_json(storage.join(run.eval_dir, "promotion.json"), out)
    return out


def _evaluate_production(run: Run, version: str) -> dict[str, Any]:
    """The production model (re-indexed when the catalog changed) through the same holdout evaluation."""


    cfg = run.cfg
    ids = catalog_ids(run.prepared.items)
    workdir = storage.join(run.run_dir, "production")
    model_dir, note = registry.on_catalog(run.root, version, ids, registry.catalog_hash(ids), workdir)
    max_seq_len = int(json.loads(storage.read_bytes(storage.join(model_dir, CONFIG)))["model"]["max_seq_len"])
    emb = storage.join(workdir, f"{version}-item_embeddings.npy")
    n_users = run.require("prepare")["stats"]["users_kept"]
    _, summary, _ = evaluate_model(model_dir, version, run.prepared.items, run.prepared.users, emb,
                                   storage.join(run.eval_dir, "production_holdout_recs.parquet"),
                                   cfg.eval, cfg.infer, max_seq_len, n_users)
    log.info("production model %s on today's holdout: NDCG@10 %.4f (%s)", version, summary["ndcg@10"], note)
    prod_metrics = registry.read_metrics(run.root, version) or {}
    return {"model_version": version, "model_dir": model_dir, "role": "production", "item_embeddings": emb,
            "max_seq_len": max_seq_len, "metrics": summary, "guard": prod_metrics.get("guard"), "note": note}


def _on_reject(value: str) -> str:
    if value not in ON_REJECT:
        raise ValueError(f"registry.on_reject: {value!r} unknown; choose from {sorted(ON_REJECT)}")
    return value


def infer_stage(run: Run) -> dict[str, Any]:

    cfg, prepared, promoted = run.cfg, run.require("prepare"), run.require("promote")
    evaluated = run.require("evaluate")
    src = promoted["publish"]
    if src is None:
        log.warning("no recommendations published for %s: %s", run.run_date, promoted["publish_reason"])
        return {"recommendations": None, "manifest": None, "published": False, "reason": promoted["publish_reason"]}
    if not storage.exists(src["item_embeddings"]):
        embed_items(src["model_dir"], run.prepared.items, src["item_embeddings"], cfg.infer.item_batch_size,
                    cfg.infer.concurrency)
    recs = score_users(src["model_dir"], src["item_embeddings"], run.prepared.users, catalog_ids(run.prepared.items),
                       cfg.infer.k, src["max_seq_len"], src["model_version"], cfg.infer.batch_size,
                       cfg.infer.concurrency, block_mib=cfg.infer.block_mib)
    manifest = publish(recs, run.recs_dir, {
        "run_date": run.run_date, "model_version": src["model_version"], "k": cfg.infer.k,
        "users": prepared["stats"]["users_kept"],
        "metrics": manifest_metrics(src, evaluated["metrics"]["baselines"], promoted),
        "input_snapshot": {"interactions": prepared["stats"]["interactions_uri"],
                           "items": prepared["stats"]["items_uri"], "rows_read": prepared["stats"]["rows_read"]},
    })
    log.info("published %d users' top-%d from model %s (%s) to %s", manifest["rows"], cfg.infer.k,
             src["model_version"], src["role"], run.recs_dir)
    return {"recommendations": run.recs_dir, "manifest": manifest, "published": True,
            "reason": promoted["publish_reason"]}


def manifest_metrics(src: dict[str, Any], baselines: dict[str, dict[str, float]],
                     promoted: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers of the model whose recommendations are published (all on today's holdout)."""

    guard = src.get("guard") or {}
    return {"holdout": point_metrics(src["metrics"]), "baselines": {b: point_metrics(m) for b, m in baselines.items()},
            "ppl_general_before": guard.get("ppl_general_before"), "ppl_general_after": guard.get("ppl_general_after"),
            "guard_passed": guard.get("passed"), "source": src["role"],
            "promotion": {**promoted["decision"], "new_version": promoted["model_version"],
                          "production_before": promoted["production_before"],
                          "production": promoted["production"], "publish_reason": promoted["publish_reason"]}}


def explain_stage(run: Run) -> dict[str, Any]:
    """One-line taste descriptions from the published model's protected LM, beside the recommendations."""

    published = run.require("infer")
    if not published.get("published") or run.cfg.explain.n_users <= 0:
        return {"explanations": None, "reason": published.get("reason") or "explain.n_users is 0"}
    version = published["manifest"]["model_version"]
    table = describe_users(run.model_dir(version), run.prepared.users, run.prepared.items, run.cfg.model.tokenizer,
                           run.cfg.explain, version)
    uri = storage.join(run.recs_dir, "explanations.parquet")
    storage.write_table(table, uri)
    return {"explanations": uri, "users": table.num_rows, "model_version": version,
            "examples": [{"prompt": p, "description": d} for p, d in
                         zip(table["prompt"].to_pylist()[:3], table["description"].to_pylist()[:3])]}


def report_stage(run: Run) -> dict[str, Any]:

    records = {s: run.require(s) for s in ("prepare", "train", "evaluate", "promote", "infer")}
    history = report.upsert_history(run.root, report.history_row(run.run_date, records))
    uri = storage.join(run.eval_dir, "report.html")
    storage.write_bytes(uri, report.render(run.run_date, records, history).encode())
    log.info("report: %s", uri)
    return {"report": uri, "history": report.history_uri(run.root)}


def _log_table(model: dict[str, float], base: dict[str, dict[str, float]]) -> None:
    cols = [k for k in model if "_ci_" not in k and k != "n_users"]
    log.info("holdout (%d users): %s", model["n_users"], "  ".join(cols))
    for name, m in [("model", model), *base.items()]:
        log.info("  %-12s %s", name, "  ".join(f"{m[c]:.4f}" for c in cols))


STAGES: dict[str, list[tuple[str, Callable[[Run], dict[str, Any]]]]] = {
    "prepare": [("prepare", prepare_stage)],
    "train": [("train", train_stage)],
    "infer": [("evaluate", evaluate_stage), ("promote", promote_stage), ("infer", infer_stage),
              ("report", report_stage)],
    "explain": [("explain", explain_stage)],
    "nightly": [("prepare", prepare_stage), ("train", train_stage), ("evaluate", evaluate_stage),
                ("promote", promote_stage), ("infer", infer_stage), ("report", report_stage),
                ("explain", explain_stage)],
}


def run_job(job: str, cfg: NightlyConfig, run_date: str, force: bool = False) -> dict[str, Any]:
    """Run a job's stages in order, after the preflight checks (before Ray starts); returns each stage's
    completion record."""
    preflight(cfg)  # PreflightError (a ConfigError): one line naming the key or URI
    if not storage.is_s3(cfg.storage.root):  # Ray workers run in other folders: pin relative roots
        cfg = replace(cfg, **{"storage.root": os.path.abspath(cfg.storage.root)})
    _on_reject(cfg.registry.on_reject)  # a typo fails before hours of training
    init_ray(cfg.ray)
    run = Run(cfg, run_date, force)
    t0 = time.time()
    results = {name: _stage(name, fn, run) for name, fn in STAGES[job]}
    log.info("job %s for %s finished in %.1fs; outputs under %s", job, run_date, time.time() - t0, run.root)
    return results
