"""Typed records that stages hand each other (frozen dataclasses with to/from JSON).

Each stage returns one of these; the pipeline stores it as the stage's completion record
(``runs/run_date=D/stages/<stage>.json``, with the bookkeeping fields ``stage``, ``run_date``,
``wall_s``, ``inputs``, ``finished_at``) and the next stage reads it back typed, so a field a stage
needs is a name, not a dictionary key spelled again.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

R = TypeVar("R", bound="Record")


@dataclass(frozen=True)
class Record:
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        """Build from a stored record; bookkeeping keys that are not fields are ignored."""
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value, tp = data[f.name], hints[f.name]
            nested = [a for a in (typing.get_args(tp) or (tp,)) if isinstance(a, type) and issubclass(a, Record)]
            if nested and isinstance(value, dict):
                value = nested[0].from_json(value)
            kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class PrepareRecord(Record):
    prepared: str  # the prepared folder (recsys_core.data.prepare.PreparedPaths root)
    stats: dict[str, Any]  # row, reject, user and item counts (prepared/stats.json)


@dataclass(frozen=True)
class TrainRecord(Record):
    model_version: str
    model_dir: str  # registry folder of the new version
    best: dict[str, Any]  # the kept epoch's metrics (best validation NDCG@10)
    history: list[dict[str, Any]]  # per-epoch metrics
    guard: dict[str, Any] | None  # generation-guard report
    parent: str | None  # the version it was warm-started from
    warm_start: dict[str, Any]
    epochs_max: int | None = None  # train.epochs and train.patience of the run (early stopping is stated)
    patience: int | None = None
    # train.refit: the published weights' training on every event (epochs, examples, history, folder)
    refit: dict[str, Any] | None = None


@dataclass(frozen=True)
class EvaluateRecord(Record):
    metrics: dict[str, Any]  # metrics.json: model, baselines, cold start (95% CIs)
    eval_dir: str
    holdout_users_uri: str | None = None  # the users scored (a sample when eval.max_users is set)


@dataclass(frozen=True)
class ModelSource(Record):
    """A model that can score today's users: the new version or the production one (re-indexed)."""

    model_version: str
    model_dir: str
    role: str  # "new" | "production"
    item_embeddings: str  # .npy of the catalog's item vectors (written by the evaluation)
    max_seq_len: int
    metrics: dict[str, Any]  # its holdout summary on today's data
    guard: dict[str, Any] | None = None
    note: str | None = None
    trained_on: str | None = None  # what the published weights saw (the refit: every event)
    prior: dict[str, Any] | None = None  # the recency prior it publishes with (recsys_core.model.prior), None: none


@dataclass(frozen=True)
class PromoteRecord(Record):
    decision: dict[str, Any]  # recsys_core.ops.gate.Decision
    model_version: str  # the new version
    production_before: str | None
    production: str | None  # PRODUCTION after the gate
    production_eval: ModelSource | None
    publish: ModelSource | None  # whose recommendations are published (None: nothing)
    publish_reason: str
    retention_deleted: list[str]


@dataclass(frozen=True)
class InferRecord(Record):
    recommendations: str | None
    manifest: dict[str, Any] | None
    published: bool
    reason: str


@dataclass(frozen=True)
class ReportRecord(Record):
    report: str
    history: str


@dataclass(frozen=True)
class ExplainRecord(Record):
    explanations: str | None
    reason: str | None = None
    users: int = 0
    model_version: str | None = None
    examples: list[dict[str, str]] = dataclasses.field(default_factory=list)
    quality: dict[str, float] | None = None  # clean_share, grounded_share, n (ops.explain.description_quality)


STAGE_RECORDS: dict[str, type[Record]] = {
    "prepare": PrepareRecord, "train": TrainRecord, "evaluate": EvaluateRecord, "promote": PromoteRecord,
    "infer": InferRecord, "report": ReportRecord, "explain": ExplainRecord,
}
