"""One frozen dataclass config per job, loaded from YAML with dotted ``--set a.b=c`` overrides.

Every job (``jobs.nightly``, ``jobs.prepare``, ``jobs.train``, ``jobs.infer``) reads the same
:class:`NightlyConfig`; each stage uses its own section.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key."""


@dataclass(frozen=True)
class StorageConfig:
    root: str = "outputs"  # local folder or s3://bucket/prefix; every output lives under it


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS if set (ray job submit), else a local cluster
    num_cpus: int | None = None  # only for a local cluster
    shuffle_parallelism: int = 4  # hash-shuffle partitions (shuffle_v2 / hash_shuffle strategies only)
    # Ray Data's shuffle for the prepare stage's group-by (ray.data.context.ShuffleStrategy). Ray 2.60's
    # default, "shuffle_v2", starts aggregator actors per shuffle (10 s of the ML-100k prepare on 2 busy
    # cores vs 3 s sort-based); set "shuffle_v2" for logs too large for a sort-based shuffle.
    shuffle_strategy: str = "sort_shuffle_pull_based"
    # Ray 2.60's parquet reader "V2" starts 32 footer-reader actors (32 worker processes) for every
    # read_parquet: seconds per read on a small machine, 20-50 s when its CPUs are busy. False: the V1
    # reader (footers read in the read tasks), the same rows and blocks without the actor pool.
    parquet_datasource_v2: bool = False
    # Local cluster only: Ray starts workers at nice 15 (below the driver); here the workers do all of
    # the job's work, and niced workers starve behind any other busy process. None: Ray's default.
    local_worker_niceness: int | None = 0


@dataclass(frozen=True)
class ColumnsConfig:
    """Maps the data contract's names to the columns of the user's parquet files."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    ts: str = "ts"


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 400
    n_items: int = 120
    n_topics: int = 6
    events_per_user: int = 25
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    source: str = "parquet"  # registry in recsys_core.sources: parquet | movielens100k | synthetic
    interactions: str = ""  # parquet dataset (folder/prefix, hive partitions ok); for parquet source
    items: str = ""  # parquet file or folder with item_id + text fields
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    item_template: str = "{title}"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class PrepareConfig:
    min_user_interactions: int = 3  # users with fewer are dropped (protocol, not quarantine)
    max_history: int = 1000  # most recent interactions kept per user
    max_reject_fraction: float = 0.05  # fail the run when more rows than this are quarantined


@dataclass(frozen=True)
class TowerConfig:
    size: str = "tiny"  # named size in recsys_core.model.SIZES
    pretrained: str | None = None  # hub name, save_pretrained folder or s3:// prefix; None = scratch
    dropout: float = 0.1


@dataclass(frozen=True)
class ModelConfig:
    item_tower: TowerConfig = field(default_factory=TowerConfig)
    user_tower: TowerConfig = field(default_factory=TowerConfig)
    embed_dim: int = 64
    max_text_tokens: int = 32
    max_seq_len: int = 50
    pooling: str = "mean"  # mean | last
    id_embedding: bool = True  # hybrid: learned item-ID embedding added to the text embedding
    similarity: str = "dot"  # dot | cosine (both towers L2-normalised; pair with a temperature ~0.05-0.1)
    tokenizer: str = "gpt2-offline"  # gpt2-offline | hub name | save_pretrained folder


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    threads_per_worker: int = 1
    epochs: int = 10
    batch_size: int = 64  # sequences per worker per step
    lr: float = 1e-3
    item_backbone_lr: float | None = None  # lr of the item tower's LM body or its LoRA adapters; None = lr
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    loss: str = "full_softmax"  # registry in recsys_core.losses
    num_negatives: int = 256  # uniform negatives for sampled_softmax
    temperature: float = 1.0  # initial softmax temperature
    learn_temperature: bool = False
    text_items_per_step: int = 128  # items whose text embedding gets gradients each step
    patience: int = 3  # early stopping on validation NDCG@10
    val_users: int = 2000  # users sampled for per-epoch validation
    seed: int = 0
    max_failures: int = 0  # Ray Train FailureConfig
    # Training examples of at most this many MiB (uncompressed, from the parquet footers) are read once
    # into Ray's object store and every epoch iterates that copy; larger ones stream from storage each
    # epoch. 0: always stream.
    materialize_mib: int = 256
    placement_strategy: str = "PACK"  # Ray Train workers' placement group: PACK | SPREAD (one per node) | STRICT_*


@dataclass(frozen=True)
class InferConfig:
    k: int = 50
    batch_size: int = 256
    concurrency: int = 2
    item_batch_size: int = 512
    # Cap on a Ray Data block of users (MiB in memory). A users file is small on disk, so without a cap it
    # arrives as one block: one scorer actor does all the work and buffers its whole output.
    block_mib: float = 8.0


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (10, 50)
    n_boot: int = 1000
    baselines: tuple[str, ...] = ("popularity", "itemknn")
    itemknn_neighbors: int = 200


@dataclass(frozen=True)
class LoraConfig:
    """peft LoRA adapters on the item tower's language model; its base weights stay frozen."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)  # ("all-linear",) or module names, e.g. [c_attn]


@dataclass(frozen=True)
class GuardConfig:
    """Protecting the item tower's language model (see recsys_core.guard); every switch combinable."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    lm_weight: float = 0.0  # lambda: causal-LM loss on replay windows of general text, mixed into each step
    item_lm_weight: float = 0.0  # causal-LM loss on the step's item texts (repetitive catalog text: keep small)
    kl_weight: float = 0.0  # beta: KL(reference || model) of next-token distributions on replay text
    replay_corpus: str = "builtin"  # text file (local or s3://); builtin = shipped public-domain English
    heldout_corpus: str = "builtin"  # general English never trained on, for perplexity
    replay_batch_size: int = 4  # replay windows per step
    replay_seq_len: int = 64
    item_lm_per_step: int = 16  # item texts per step in the item LM loss (held-out items never)
    heldout_item_every: int = 20  # every n-th item's text is held out of the LM loss, for perplexity
    eval_window: int = 128  # sliding-window perplexity
    eval_stride: int = 64
    eval_tokens: int = 4096  # held-out tokens scored (before and after)
    max_ppl_increase: float = 0.05  # the gate: general-English perplexity may rise at most +5%
    enforce: str = "pretrained"  # always | pretrained (a random-init LM has nothing to protect) | never
    prompts: tuple[str, ...] = ("The film begins with", "My favourite kind of movie is")
    generate_tokens: int = 16


@dataclass(frozen=True)
class RegistryConfig:
    """models/<version>/ + models/PRODUCTION; what a new model must do to replace the production one."""

    keep_versions: int = 5  # retention: newest versions kept (PRODUCTION's version is always kept)
    warm_start: bool = True  # initialise training from the production model when it fits the catalog
    ndcg_tolerance: float = 0.01  # new holdout NDCG@10 may trail production's by at most this (absolute)
    on_reject: str = "production"  # production: publish the production model's recs | none: publish nothing


@dataclass(frozen=True)
class ExplainConfig:
    """``jobs.explain``: one-line taste descriptions generated by the protected language model."""

    n_users: int = 20
    max_history: int = 5  # most recent items named in the prompt
    max_new_tokens: int = 24
    prompt: str = "A viewer who enjoyed {items} likes"
    seed: int = 0


@dataclass(frozen=True)
class NightlyConfig:
    name: str = "nightly"
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)


class _Override(str):
    """A ``--set`` value as typed on the command line; parsed as YAML unless the field is text."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, _Override):
        text_field = tp is str or (origin in (typing.Union, types.UnionType) and str in typing.get_args(tp))
        if not (text_field and value.strip() not in ("null", "~", "")):
            try:
                value = yaml.safe_load(value) if value.strip() else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"override for '{key}' is not valid YAML: {e}") from None
        else:
            value = str(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (elem, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float, dt.date)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}' (known: {sorted(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; typed fields parse it as YAML (``3``, ``true``, ``[1,2]``)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{p}' is not a section")
    node[parts[-1]] = _Override(raw)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> NightlyConfig:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for o in overrides:
        apply_override(data, o)
    try:
        return from_dict(NightlyConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}") from None


def replace(cfg: Any, **dotted: Any) -> Any:
    """``replace(cfg, **{"train.epochs": 2})``: a copy of a frozen config with dotted keys changed."""
    data = to_dict(cfg)
    for k, v in dotted.items():
        node = data
        *head, last = k.split(".")
        for p in head:
            node = node[p]
        node[last] = v
    return from_dict(type(cfg), data)


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_run_date(value: str | None) -> str:
    """A run is keyed by its date; it becomes a path component, so it is validated strictly."""
    if value is None:
        return dt.datetime.now(dt.timezone.utc).date().isoformat()
    if not _DATE.match(value):
        raise ConfigError(f"--run-date must be YYYY-MM-DD, got {value!r}")
    try:
        dt.date.fromisoformat(value)
    except ValueError as e:
        raise ConfigError(f"--run-date {value!r} is not a real date: {e}") from None
    return value
