"""Train stage: Ray Train ``TorchTrainer`` (DDP) fine-tuning the GPT-2 towers on next-item prediction.

Each step embeds the step's candidate items (all items for ``full_softmax``; batch items plus
uniform negatives for ``sampled_softmax``). Item text embeddings come from a per-epoch cache, and
the items that are positives in this step (up to ``text_items_per_step``) are re-embedded with
gradients, so the text tower trains at a cost independent of the catalog size.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict
from typing import Any

import torch
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from recsys_core import storage
from recsys_core.config import NightlyConfig
from recsys_core.data.features import catalog_features
from recsys_core.data.prepare import PreparedPaths, examples_dataset
from recsys_core.data.text import load_tokenizer
from recsys_core.runtime import (
    cluster_cpus,
    is_verbose,
    pool_args,
    ray_train_log_level,
    train_workers,
)
from recsys_core.train.guard import corpus_ids, guard_report, needs_replay, read_corpus
from recsys_core.train.loop import (
    STATE,
    VAL_METRIC,
    steps_per_epoch,
    train_loop_per_worker,
)
from recsys_core.train.strength import applies as strength_applies
from recsys_core.train.strength import choose_strength

log = logging.getLogger(__name__)

def ingest_config(object_store_mib: int) -> DataConfig:
    """Ray Train's data ingest: Ray Data's defaults, the streamed input's object store bounded to
    ``object_store_mib`` MiB (0: Ray Data's own limit) so the read-ahead does not grow with the log."""
    opts = DataConfig.default_ingest_options()
    if object_store_mib:
        opts.resource_limits = opts.resource_limits.copy(object_store_memory=float(object_store_mib) * 2**20)
    return DataConfig(execution_options=opts)


def run_train(cfg: NightlyConfig, prepared: PreparedPaths, run_dir: str, init_from: str | None = None,
              fresh: bool = False, refit_epochs: int | None = None, guard: bool = True,
              alpha: float | None = None) -> dict[str, Any]:
    """Fit with Ray Train; returns the best checkpoint's URI, its metrics, the per-epoch history and the
    generation guard's record (None without ``guard``). ``fresh`` discards an earlier attempt's
    checkpoints (``--force``).

    ``refit_epochs``: the refit on every event (``prepared.full_examples``, held-out events included)
    for that many epochs under the same lr schedule, without validation; the last epoch is kept.

    A fine-tuned item LM under an enforced guard gets its strength chosen after training
    (:mod:`recsys_core.train.strength`): scanned on validation, or ``alpha`` as given (the refit's, chosen
    on the selection model); the returned checkpoint holds the kept interpolation."""
    examples = prepared.full_examples if refit_epochs else prepared.train_examples
    train_ds, n_examples = examples_dataset(examples, cfg.train)
    cpus = cluster_cpus()
    plan = train_workers(cpus, cfg.train.num_workers)
    if not plan.stream:  # no CPU beside the workers for read tasks: read the examples before training
        train_ds = train_ds.materialize()
    steps = steps_per_epoch(n_examples, cfg.train.num_workers, cfg.train.batch_size)  # fails before Ray Train starts
    log.info("training: %d worker(s) x %g CPU on a %g-CPU cluster (%s), input %s, %d steps per epoch on every rank",
             cfg.train.num_workers, plan.cpus, cpus, cfg.train.placement_strategy,
             "streams" if plan.stream else "read up front", steps)
    features = None
    if cfg.model.item_tower.frozen:  # the frozen LM's pass over the catalog, once per catalog and model
        features, _ = catalog_features(prepared.items, cfg.model.item_tower.pretrained, cfg.model.pooling,
                                       cfg.storage.root, cfg.infer.item_batch_size,
                                       pool_args("TextFeaturizer", cfg.infer.concurrency))
    replay_ids = None
    if needs_replay(cfg.guard):
        replay_ids = corpus_ids(read_corpus(cfg.guard.replay_corpus, "replay"), load_tokenizer(cfg.model.tokenizer))
    spath, sfs = storage.ray_location(storage.join(run_dir, "ray_train"))
    # Ray Train resumes a run of the same name from its latest checkpoint (a crashed driver's rerun);
    # the name carries the training config, so a rerun with another config starts afresh.
    ident = json.dumps([asdict(cfg.model), asdict(cfg.train), asdict(cfg.guard), prepared.root, init_from]
                       + ([refit_epochs] if refit_epochs else []), sort_keys=True, default=str)
    name = "train-" + hashlib.sha256(ident.encode()).hexdigest()[:12]
    if fresh and storage.exists(storage.join(run_dir, "ray_train", name)):
        storage.delete(storage.join(run_dir, "ray_train", name))
    score = "epoch" if refit_epochs else VAL_METRIC  # the refit keeps its last epoch
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": asdict(cfg), "prepared": prepared.root, "n_examples": n_examples,
                           "init_from": init_from, "replay_ids": replay_ids, "quiet": not is_verbose(),
                           "features": features, "refit_epochs": refit_epochs},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": plan.cpus},
                                     placement_strategy=cfg.train.placement_strategy),
        run_config=RunConfig(
            name=name, storage_path=spath, storage_filesystem=sfs,
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=score,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=LoggingConfig(log_level=ray_train_log_level()),  # --verbose: the per-report dumps
        ),
        datasets={"train": train_ds},
        dataset_config=ingest_config(cfg.train.ingest_object_store_mib),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][score])
    uri = ("s3://" + best_ckpt.path) if storage.is_s3(run_dir) else best_ckpt.path
    strength = None
    if strength_applies(cfg) and (alpha is not None or not refit_epochs):
        strength = choose_strength(cfg, prepared.items, prepared.users, uri, run_dir, alpha=alpha)
        uri = strength["checkpoint"]
    report = None
    if guard:
        report = guard_report(cfg, prepared.items, uri)
        if strength is not None:
            report["strength"] = strength
        log.info(report["message"])
    return {"checkpoint": uri, "metrics": best_metrics, "history": _history(result, run_dir), "guard": report,
            "features": features, "examples": n_examples, "strength": strength}


def _history(result: Any, run_dir: str) -> list[dict[str, Any]]:
    """Per-epoch metrics of the whole run, from the latest checkpoint's training state.

    (``result.metrics_dataframe`` only holds the epochs whose checkpoints were retained.)"""

    latest = result.checkpoint
    uri = ("s3://" + latest.path) if storage.is_s3(run_dir) else latest.path
    return json.loads(read_train_state(uri)["history"])


def read_train_state(checkpoint: str) -> dict[str, Any]:
    """A Ray Train checkpoint folder's training state (epoch, history, optimizer, the weights to resume from)."""
    return torch.load(io.BytesIO(storage.read_bytes(storage.join(checkpoint, STATE))), weights_only=True)
