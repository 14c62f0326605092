"""The nightly pipeline: prepare -> train -> evaluate -> promote -> infer + publish -> report,
each stage rerunnable alone.

Storage layout under ``storage.root``::

    raw/<source>/                              demo sources materialised at run time
    runs/run_date=D/prepared/                  prepare outputs (see recsys_core.data)
    runs/run_date=D/ray_train/                 Ray Train run (checkpoints)
    runs/run_date=D/production/                the production model re-indexed to today's catalog (when it
                                               changed) and its item embeddings, for warm start and the gate
    runs/run_date=D/published/                 item embeddings of the published refit (train.refit)
    runs/run_date=D/stages/<stage>.json        completion markers (written last)
    runs/run_date=D/_LEASE.json                held while a job runs for the date (recsys_core.ops.lease)
    models/<version>/, models/PRODUCTION       the registry (see recsys_core.registry)
    evaluation/run_date=D/                     holdout_recs.parquet, metrics.json (with "online": the previous
                                               date's published recs vs the events since), learning_curve.png,
                                               production_holdout_recs.parquet, promotion.json, report.html
    recommendations/run_date=D/                recommendations.parquet (the current generation only) +
                                               _MANIFEST.json + _generations/ (see recsys_core.serve.publish)
    explanations/run_date=D/                   explanations.parquet (jobs.explain)
    history/metrics.parquet                    one row per run date (see recsys_core.report)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from recsys_core import storage
from recsys_core.config import InferConfig, NightlyConfig, check_config, replace
from recsys_core.data.prepare import PreparedPaths, catalog_ids, run_prepare
from recsys_core.data.sources import resolve_source
from recsys_core.eval.baselines import (
    baseline_options,
    baseline_per_user,
    validation_popularity,
)
from recsys_core.eval.holdout import cold_start_metrics, evaluate_model, holdout_users
from recsys_core.eval.metrics import summarize_values
from recsys_core.eval.online import newest_event_ts, online_proxy
from recsys_core.eval.recency import published_prior, recency_prior, serving_term
from recsys_core.model.checkpoint import CONFIG
from recsys_core.model.prior import RecencyPrior
from recsys_core.ops import gate, lease, registry, report
from recsys_core.ops.explain import describe_users, description_bar
from recsys_core.ops.gate import ON_REJECT
from recsys_core.ops.report import plot_learning_curve, point_metrics
from recsys_core.preflight import preflight
from recsys_core.records import (
    STAGE_RECORDS,
    EvaluateRecord,
    ExplainRecord,
    InferRecord,
    ModelSource,
    PrepareRecord,
    PromoteRecord,
    Record,
    ReportRecord,
    TrainRecord,
)
from recsys_core.runtime import init_ray, stage_context
from recsys_core.serve.infer import embed_items, score_users
from recsys_core.serve.publish import publish
from recsys_core.train.trainer import run_train

log = logging.getLogger(__name__)
ONLINE_K = 10  # the online proxy scores the published top 10


class StageNotDone(RuntimeError):
    """A job needs a stage that has not completed for this run date; the message is the command to run."""


@dataclass(frozen=True)
class Run:
    cfg: NightlyConfig
    run_date: str
    force: bool = False
    invocation: str = "--config CONFIG"  # the config arguments as typed, for hints that work as printed
    held: lease.Lease | None = field(default=None, compare=False)  # the date's lease, checked before each record

    @property
    def root(self) -> str:
        return self.cfg.storage.root

    @property
    def run_dir(self) -> str:
        return storage.join(self.root, "runs", f"run_date={self.run_date}")

    @property
    def lease_uri(self) -> str:
        return storage.join(self.run_dir, "_LEASE.json")

    @property
    def prepared(self) -> PreparedPaths:
        return PreparedPaths(storage.join(self.run_dir, "prepared"))

    @property
    def eval_dir(self) -> str:
        return storage.join(self.root, "evaluation", f"run_date={self.run_date}")

    @property
    def recs_dir(self) -> str:
        return storage.join(self.root, "recommendations", f"run_date={self.run_date}")

    @property
    def explain_dir(self) -> str:
        return storage.join(self.root, "explanations", f"run_date={self.run_date}")

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

    def record(self, stage: str) -> Any:
        """The stage's completion record, typed (``recsys_core.records``)."""
        return STAGE_RECORDS[stage].from_json(self.require(stage))

    def require(self, stage: str) -> dict[str, Any]:
        rec = self.done(stage)
        if rec is None:
            raise StageNotDone(f"stage '{stage}' has not completed (or is stale) for run_date={self.run_date} "
                               f"under {self.root}; run `python -m jobs.{JOB_OF[stage]} {self.invocation} "
                               f"--run-date {self.run_date}` first")
        return rec


DEPENDS: dict[str, tuple[str, ...]] = {"prepare": (), "train": ("prepare",), "evaluate": ("train",),
                                       "promote": ("evaluate",), "infer": ("promote",), "report": ("infer",),
                                       "explain": ("infer",)}


JOB_OF = {"prepare": "prepare", "train": "train", "evaluate": "infer", "promote": "infer", "infer": "infer",
          "report": "infer", "explain": "explain"}


def _stage(name: str, fn: Callable[[Run], Record], run: Run) -> tuple[dict[str, Any], bool]:
    """Run one stage unless its marker says it already completed (``--force`` reruns it); returns its
    record and whether it ran."""
    with stage_context(run.run_date, name):
        rec = run.done(name)
        if rec is not None and not run.force:
            log.info("stage %s already complete for %s; skipping (--force reruns it)", name, run.run_date)
            return rec, False
        log.info("stage %s started", name)
        t0 = time.time()
        out = fn(run).to_json()
        if run.held is not None:
            run.held.check()  # a run that lost its date to another writes no record
        inputs = {dep: run.require(dep)["finished_at"] for dep in DEPENDS[name]}
        finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
        out = {**out, "stage": name, "run_date": run.run_date, "wall_s": round(time.time() - t0, 2),
               "inputs": inputs, "finished_at": finished}
        storage.write_json(run.marker(name), out)
        log.info("stage %s done in %.1fs", name, out["wall_s"])
        return out, True


def prepare_stage(run: Run) -> PrepareRecord:
    src = resolve_source(run.cfg.data, run.root)
    stats = run_prepare(run.cfg, src, run.prepared)
    return PrepareRecord(prepared=run.prepared.root, stats=stats)


def train_stage(run: Run) -> TrainRecord:
    stats = run.record("prepare").stats
    refit_on = run.cfg.train.refit
    if refit_on and not storage.list_files(run.prepared.full_examples, ".parquet"):
        raise StageNotDone(f"train.refit is on but {run.prepared.full_examples} is missing (prepared with train.refit "
                           f"off); run `python -m jobs.prepare {run.invocation} --run-date {run.run_date} --force` "
                           "first, or set train.refit=false")
    for stale in registry.incomplete_versions(run.root, run.run_date):
        log.info("removing models/%s: an earlier attempt of this date left it incomplete (no _COMPLETE marker, "
                 "or files that do not match it)", stale)
        storage.delete(registry.version_dir(run.root, stale))
    ids = catalog_ids(run.prepared.items)
    catalog = {"n_items": len(ids), "sha256": registry.catalog_hash(ids)}
    config = asdict(run.cfg)
    warm = _warm_start(run, ids, catalog["sha256"], config)
    fit = run_train(run.cfg, run.prepared, run.run_dir, init_from=warm.get("init_from"), fresh=run.force,
                    guard=not refit_on)  # with a refit, the guard measures the weights that are published
    guard, refit, refit_ckpt = fit.get("guard"), None, None
    if refit_on:
        epochs = int(fit["metrics"]["epoch"]) + 1  # the selected budget
        log.info("refit: training again on every event (held-out ones included) for the selected %d epoch(s); "
                 "that model is published", epochs)
        strength = fit.get("strength")  # the alpha chosen on the selection model's validation, if scanned
        again = run_train(run.cfg, run.prepared, run.run_dir, init_from=warm.get("init_from"), fresh=run.force,
                          refit_epochs=epochs, alpha=strength["alpha"] if strength else None)
        guard, refit_ckpt = again["guard"], again["checkpoint"]
        if strength and guard is not None:
            guard["strength"] = {**strength, "refit_checkpoint": again["checkpoint"],
                                 "refit_point": again["strength"]["curve"][0]}
        refit = {"epochs": epochs, "examples": again["examples"], "selection_examples": fit["examples"],
                 "history": again["history"], "trained_on": REFIT_TRAINED_ON}
    version = registry.new_version(run.root, run.run_date)
    metrics = {"best": fit["metrics"], "history": fit["history"], "guard": guard, "run_date": run.run_date,
               "input": run.prepared.root, "config": config, "refit": refit}
    lineage = {
        "version": version, "run_date": run.run_date, "parent": warm.get("from") if warm["used"] else None,
        "warm_start": warm, "catalog": catalog, "code": registry.code_version(),
        "input": {"prepared": run.prepared.root, "interactions_uri": stats["interactions_uri"],
                  "items_uri": stats["items_uri"], "rows_read": stats["rows_read"],
                  "rows_rejected": stats["rows_rejected"], "users_kept": stats["users_kept"]},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": config,
    }
    model_dir = registry.register_version(run.root, version, fit["checkpoint"], metrics=metrics, lineage=lineage,
                                          item_ids=ids, tokenizer=run.cfg.model.tokenizer,
                                          refit=refit_ckpt)
    outcome = report.training_outcome(fit["history"], run.cfg.train.epochs, run.cfg.train.patience)
    log.info("training %s", report.training_sentence(outcome))
    if refit:
        refit = {**refit, "model_dir": registry.published_dir(run.root, version)}
    return TrainRecord(model_version=version, model_dir=model_dir, best=fit["metrics"], history=fit["history"],
                       guard=guard, parent=lineage["parent"], warm_start=warm, epochs_max=run.cfg.train.epochs,
                       patience=run.cfg.train.patience, refit=refit)


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


def evaluate_stage(run: Run) -> EvaluateRecord:
    cfg, trained = run.cfg, run.record("train")
    items = storage.read_table(run.prepared.items, columns=["item_id", "train_count"])
    held = holdout_users(run.prepared.users, storage.join(run.eval_dir, "holdout_users.parquet"),
                         cfg.eval.max_users, cfg.train.seed)
    stats = run.record("prepare").stats
    # users the metrics average over (absent ones count as misses): the test split's, or the sample's
    n_users = held["users"] if held["sampled"] else test_users(stats)
    if held["sampled"]:
        log.info("holdout: %d of %d users sampled (eval.max_users, seed %d)", n_users, held["of"], held["seed"])
    per_user, model_m, n_scored = evaluate_model(
        trained.model_dir, trained.model_version, run.prepared.items, held["uri"],
        storage.join(trained.model_dir, "item_embeddings.npy"), storage.join(run.eval_dir, "holdout_recs.parquet"),
        cfg.eval, cfg.infer, cfg.model.max_seq_len, n_users)
    base_pu, base_target, base_chosen = baseline_per_user(run.prepared.users, items.num_rows, cfg.eval.baselines,
                                                          cfg.eval.ks, baseline_options(cfg.eval),
                                                          query_rows=held["rows"])
    base = {b: summarize_values(pu, n_users, cfg.eval.n_boot) for b, pu in base_pu.items()}
    cold = cold_start_metrics(per_user, base_pu, base_target, items["train_count"].to_numpy() == 0, cfg.eval.n_boot)
    online = online_proxy(run.root, run.run_date, run.prepared.users, run.prepared.items, ONLINE_K, cfg.eval.n_boot)
    prior = (recency_prior(trained.model_dir, storage.join(trained.model_dir, "item_embeddings.npy"),
                           run.prepared.users, cfg.model.max_seq_len, cfg.eval, cfg.train.seed, held["rows"], n_users)
             if cfg.eval.prior.enabled else None)
    val_base = {"popularity": validation_popularity(run.prepared.users, items.num_rows, cfg.train.val_users,
                                                    cfg.train.seed)}
    metrics = {"model": model_m, "baselines": base, "model_version": trained.model_version,
               "online": online, "protocol": stats.get("split", {"protocol": "loo"}),
               # from prepare's stats (a date prepared by an older version has none: read the users)
               "newest_event_ts": stats.get("newest_event_ts") or newest_event_ts(run.prepared.users),
               "validation_baselines": val_base, "recency_prior": prior,
               "users_scored": n_scored, "cold_start": cold, "baseline_selection": base_chosen,
               "holdout_users": {"scored": n_users, "of": held["of"], "sampled": held["sampled"],
                                 "seed": held.get("seed"), "max_users": cfg.eval.max_users},
               "note": "bootstrap 95% CIs over users; with ~1k users, differences under ~0.015 are noise"
                       + (f"; holdout on a seeded sample of {n_users} of {held['of']} users (eval.max_users)"
                          if held["sampled"] else "")}
    storage.write_json(storage.join(run.eval_dir, "metrics.json"), metrics)
    plot_learning_curve(trained.history, val_base, storage.join(run.eval_dir, "learning_curve.png"))
    _log_table(model_m, base)
    return EvaluateRecord(metrics=metrics, eval_dir=run.eval_dir, holdout_users_uri=held["uri"])


def test_users(stats: dict[str, Any]) -> int:
    """Users in the test split (every kept user under leave-one-out); absent ones count as misses."""
    return int((stats.get("split") or {}).get("test_users", stats["users_kept"]))


def promote_stage(run: Run) -> PromoteRecord:
    """The promotion gate: the production model is evaluated on today's holdout too; the new model
    replaces it only when its NDCG@10 beats the best baseline's (the first promotion included), is
    within ``registry.ndcg_tolerance`` of production's and the generation guard passed. Decides which
    model's recommendations are published, then applies retention."""
    cfg, trained, evaluated = run.cfg, run.record("train"), run.record("evaluate")
    new = trained.model_version
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
    decision = gate.gate_decision(evaluated.metrics["model"]["ndcg@10"],
                                  prod_eval.metrics["ndcg@10"] if prod_eval else None,
                                  cfg.registry.ndcg_tolerance, trained.guard, note,
                                  baseline=gate.best_baseline(evaluated.metrics["baselines"]))
    new_source = ModelSource(model_version=new, model_dir=trained.model_dir, role="new",
                             item_embeddings=storage.join(trained.model_dir, "item_embeddings.npy"),
                             max_seq_len=cfg.model.max_seq_len, metrics=evaluated.metrics["model"],
                             guard=trained.guard, prior=published_prior(evaluated.metrics.get("recency_prior")))
    if decision.promote:
        registry.promote(run.root, new, run.run_date, decision.reason, previous=base)
        source, why_source = new_source, "the new model passed the promotion gate"
    else:
        log.warning("model %s NOT promoted: %s", new, decision.reason)
        source, why_source = ON_REJECT[cfg.registry.on_reject](prod_eval, base)
        log.warning("publishing for %s: %s", run.run_date, why_source)
    source = _published_form(run, source)
    production = registry.production_version(run.root)
    deleted = registry.apply_retention(run.root, cfg.registry.keep_versions, protect=[new, production])
    out = PromoteRecord(decision=decision.to_dict(), model_version=new, production_before=base,
                        production=production, production_eval=prod_eval, publish=source,
                        publish_reason=why_source, retention_deleted=deleted)
    storage.write_json(storage.join(run.eval_dir, "promotion.json"), out.to_json())
    return out


REFIT_TRAINED_ON = ("every event up to the run date, the held-out validation and test events included "
                    "(train.refit); the holdout figures are those of the selection model, trained without them")


def _published_form(run: Run, src: ModelSource | None) -> ModelSource | None:
    """The chosen model as it is published: its refit on every event when the version has one
    (re-indexed to today's catalog when that changed), with its own item-embedding file."""
    if src is None or registry.published_dir(run.root, src.model_version) == registry.version_dir(
            run.root, src.model_version):
        return src
    ids = catalog_ids(run.prepared.items)
    model_dir, _ = registry.on_catalog(run.root, src.model_version, ids, registry.catalog_hash(ids),
                                       storage.join(run.run_dir, "production"), published=True)
    emb = storage.join(run.run_dir, "published", f"{src.model_version}-item_embeddings.npy")
    return dataclasses.replace(src, model_dir=model_dir, item_embeddings=emb, trained_on=REFIT_TRAINED_ON)


def _evaluate_production(run: Run, version: str) -> ModelSource:
    """The production model (re-indexed when the catalog changed) through the same holdout evaluation."""
    cfg = run.cfg
    ids = catalog_ids(run.prepared.items)
    workdir = storage.join(run.run_dir, "production")
    model_dir, note = registry.on_catalog(run.root, version, ids, registry.catalog_hash(ids), workdir)
    max_seq_len = int(json.loads(storage.read_bytes(storage.join(model_dir, CONFIG)))["model"]["max_seq_len"])
    emb = storage.join(workdir, f"{version}-item_embeddings.npy")
    evaluated = run.record("evaluate")
    users_uri = evaluated.holdout_users_uri or run.prepared.users  # the same users as the new model
    n_users = (evaluated.metrics.get("holdout_users") or {}).get("scored") or test_users(run.record("prepare").stats)
    _, summary, _ = evaluate_model(model_dir, version, run.prepared.items, users_uri, emb,
                                   storage.join(run.eval_dir, "production_holdout_recs.parquet"),
                                   cfg.eval, cfg.infer, max_seq_len, n_users)
    log.info("production model %s on today's holdout: NDCG@10 %.4f (%s)", version, summary["ndcg@10"], note)
    prod_metrics = registry.read_metrics(run.root, version) or {}
    return ModelSource(model_version=version, model_dir=model_dir, role="production", item_embeddings=emb,
                       max_seq_len=max_seq_len, metrics=summary, guard=prod_metrics.get("guard"), note=note)


def infer_stage(run: Run) -> InferRecord:
    cfg, prepared, promoted = run.cfg, run.record("prepare"), run.record("promote")
    evaluated = run.record("evaluate")
    src = promoted.publish
    if src is None:
        log.warning("no recommendations published for %s: %s", run.run_date, promoted.publish_reason)
        return InferRecord(recommendations=None, manifest=None, published=False, reason=promoted.publish_reason)
    if not storage.exists(src.item_embeddings):
        embed_items(src.model_dir, run.prepared.items, src.item_embeddings, cfg.infer.item_batch_size,
                    cfg.infer.concurrency)
    ids = catalog_ids(run.prepared.items)
    prior_kw: dict[str, Any] = {}
    if src.prior:  # ranked by model + recency prior, asked at the log's end
        term, now = serving_term(run.prepared.users, len(ids), RecencyPrior.from_dict(src.prior))
        term_uri = storage.join(run.run_dir, "published", f"{src.model_version}-recency_prior.npy")
        storage.write_npy(term_uri, term)
        prior_kw = {"prior": src.prior, "prior_term_uri": term_uri, "now": now, "columns": ("user_id", "items", "ts")}
    ann = ann_spec(cfg.infer)
    recs = score_users(src.model_dir, src.item_embeddings, run.prepared.users, ids,
                       cfg.infer.k, src.max_seq_len, src.model_version, cfg.infer.batch_size,
                       cfg.infer.concurrency, block_mib=cfg.infer.block_mib, ann=ann, **prior_kw)
    stats = prepared.stats
    manifest = publish(recs, run.recs_dir, {
        "run_date": run.run_date, "model_version": src.model_version, "k": cfg.infer.k,
        "users": stats["users_kept"],
        "metrics": {**manifest_metrics(src, evaluated.metrics["baselines"], promoted),
                    "retrieval": ann or {"kind": "exact"}},
        "input_snapshot": {"interactions": stats["interactions_uri"], "items": stats["items_uri"],
                           "rows_read": stats["rows_read"], "newest_event_ts": evaluated.metrics.get("newest_event_ts")},
    })
    log.info("published %d users' top-%d from model %s (%s) to %s", manifest["rows"], cfg.infer.k,
             src.model_version, src.role, run.recs_dir)
    return InferRecord(recommendations=run.recs_dir, manifest=manifest, published=True,
                       reason=promoted.publish_reason)


def ann_spec(ic: InferConfig) -> dict[str, Any] | None:
    """The scorers' FAISS index settings (an AnnSpec dict) for ``infer.retrieval``; None: exact top-k."""
    if ic.retrieval == "exact":
        return None
    return {"kind": ic.retrieval, "nlist": ic.ann_nlist, "nprobe": ic.ann_nprobe, "hnsw_m": ic.ann_hnsw_m,
            "ef_search": ic.ann_ef_search}


def manifest_metrics(src: ModelSource, baselines: dict[str, dict[str, float]],
                     promoted: PromoteRecord) -> dict[str, Any]:
    """Headline numbers of the model whose recommendations are published (all on today's holdout)."""
    guard = src.guard or {}
    return {"holdout": point_metrics(src.metrics), "baselines": {b: point_metrics(m) for b, m in baselines.items()},
            "ppl_general_before": guard.get("ppl_general_before"), "ppl_general_after": guard.get("ppl_general_after"),
            "guard_passed": guard.get("passed"), "source": src.role,
            "strength_alpha": (guard.get("strength") or {}).get("alpha"),  # WiSE-FT alpha kept (None: no scan)
            "trained_on": src.trained_on or "the training part of each history (the held-out events excluded)",
            "recency_prior": src.prior,
            "promotion": {**promoted.decision, "new_version": promoted.model_version,
                          "production_before": promoted.production_before,
                          "production": promoted.production, "publish_reason": promoted.publish_reason}}


NOT_PRETRAINED = ("not applicable: the item tower's language model was not pretrained (random init, no "
                  "language to describe a taste with); no descriptions published")


def explain_stage(run: Run) -> ExplainRecord:
    """One-line taste descriptions from the published model's protected LM, in their own folder (the
    recommendations folder holds only recommendations, for readers that read whole folders). Published
    only from a pretrained LM and only when they clear the quality bar (``ops.explain.description_bar``)."""
    published = run.record("infer")
    if not published.published or run.cfg.explain.n_users <= 0:
        return ExplainRecord(explanations=None, reason=published.reason or "explain.n_users is 0")
    if not run.cfg.model.item_tower.pretrained:
        log.info("explain: %s", NOT_PRETRAINED)
        return ExplainRecord(explanations=None, reason=NOT_PRETRAINED)
    version = published.manifest["model_version"]
    it = run.cfg.model.item_tower
    table, quality = describe_users(registry.published_dir(run.root, version), run.prepared.users,
                                    run.prepared.items, run.cfg.model.tokenizer, run.cfg.explain, version,
                                    frozen_lm=it.pretrained if it.frozen else None)
    ok, why = description_bar(quality, run.cfg.explain)
    log.info("explain: %s", why)
    if not ok:
        return ExplainRecord(explanations=None, reason=why, users=table.num_rows, model_version=version,
                             quality=quality)
    uri = storage.join(run.explain_dir, "explanations.parquet")
    storage.write_table(table, uri)
    return ExplainRecord(explanations=uri, reason=why, users=table.num_rows, model_version=version,
                         examples=[{"prompt": p, "description": d} for p, d in
                                   zip(table["prompt"].to_pylist()[:3], table["description"].to_pylist()[:3])],
                         quality=quality)


def report_stage(run: Run) -> ReportRecord:
    records = {s: run.require(s) for s in ("prepare", "train", "evaluate", "promote", "infer")}
    explained = run.done("explain")  # the nightly explains first; a later `jobs.explain` is not waited for
    history = report.upsert_history(run.root, report.history_row(run.run_date, records))
    uri = storage.join(run.eval_dir, "report.html")
    recs = run.recs_dir if records["infer"].get("published") else None
    samples = report.load_samples(run.prepared.users, run.prepared.items, recs,
                                  (explained or {}).get("explanations"), n=10, seed=run.cfg.explain.seed)
    storage.write_bytes(uri, report.render(run.run_date, records, history, samples, explained).encode())
    log.info("report: %s", uri)
    return ReportRecord(report=uri, history=report.history_uri(run.root))


def _log_table(model: dict[str, float], base: dict[str, dict[str, float]]) -> None:
    cols = [k for k in model if "_ci_" not in k and k != "n_users"]
    log.info("holdout (%d users): %s", model["n_users"], "  ".join(cols))
    for name, m in [("model", model), *base.items()]:
        log.info("  %-12s %s", name, "  ".join(f"{m[c]:.4f}" for c in cols))


STAGES: dict[str, list[tuple[str, Callable[[Run], Record]]]] = {
    "prepare": [("prepare", prepare_stage)],
    "train": [("train", train_stage)],
    "infer": [("evaluate", evaluate_stage), ("promote", promote_stage), ("infer", infer_stage),
              ("report", report_stage)],
    "explain": [("explain", explain_stage)],
    "nightly": [("prepare", prepare_stage), ("train", train_stage), ("evaluate", evaluate_stage),
                ("promote", promote_stage), ("infer", infer_stage), ("explain", explain_stage),
                ("report", report_stage)],  # the report shows the explanations
}


def run_job(job: str, cfg: NightlyConfig, run_date: str, force: bool = False,
            invocation: str = "--config CONFIG") -> dict[str, Any]:
    """Run a job's stages in order, after the preflight checks (before Ray starts), then log the summary
    block; returns each stage's completion record. ``invocation`` is the config part of the command line
    (``--config X --set ...``), for hints."""
    preflight(cfg)  # PreflightError (a ConfigError): one line naming the key or URI
    if not storage.is_s3(cfg.storage.root):  # Ray workers run in other folders: pin relative roots
        cfg = replace(cfg, **{"storage.root": os.path.abspath(cfg.storage.root)})
    check_config(cfg)  # a config built in code is checked like a loaded one, before Ray and before any stage
    run = Run(cfg, run_date, force, invocation)
    names = [name for name, _ in STAGES[job]]
    for dep in DEPENDS[names[0]]:  # a stage run out of order fails before Ray starts
        if dep not in names:
            run.require(dep)
    # One run per (root, date), taken before Ray starts: a second run exits (LeaseHeldError, exit 2)
    # naming the holder, or waits storage.lease_wait_s; a crashed holder's lease expires.
    held = lease.acquire(run.lease_uri, cfg.storage.lease_ttl_s, wait_s=cfg.storage.lease_wait_s,
                         what=f"run_date={run_date} under {cfg.storage.root}").start_heartbeat()
    try:
        init_ray(cfg.ray)
        run = dataclasses.replace(run, held=held)  # stages check the lease before writing records
        t0 = time.time()
        results, skipped = {}, []
        for name, fn in STAGES[job]:
            results[name], ran = _stage(name, fn, run)
            if not ran:
                skipped.append(name)
        wall = time.time() - t0
    finally:
        held.release()
    if len(skipped) == len(results):
        log.info("job %s for %s: every stage was already complete; nothing ran (--force reruns)", job, run_date)
    else:
        log.info("job %s for %s finished in %.1fs; outputs under %s", job, run_date, wall, run.root)
    log.info("summary\n%s", report.summary_text(job, run_date, results, skipped, wall))
    return results
