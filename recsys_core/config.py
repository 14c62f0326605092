"""One frozen dataclass config per job, loaded from YAML with dotted ``--set a.b=c`` overrides.

Every job (``jobs.nightly``, ``jobs.prepare``, ``jobs.train``, ``jobs.infer``) reads the same
:class:`NightlyConfig`; each stage uses its own section.
"""
from __future__ import annotations

import codecs
import dataclasses
import datetime as dt
import difflib
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key."""


# Enum-like values: each is checked at load against its choices (each matches a registry: tests/test_config.py)
ShuffleName = Literal["sort_shuffle_pull_based", "sort_shuffle_push_based", "hash_shuffle", "shuffle_v2", "gpu_shuffle"]
Baseline = Literal["popularity", "recent_popularity", "itemknn", "ease"]  # recsys_core.eval.baselines.BASELINES


@dataclass(frozen=True)
class StorageConfig:
    root: str = "outputs"  # local folder or s3://bucket/prefix; every output lives under it
    lease_ttl_s: float = 600.0  # one run per (root, date): its lease expires this long after the last heartbeat
    lease_wait_s: float = 0.0  # a second run of the same date waits this long for the lease, then exits 2


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS if set (ray job submit), else a local cluster
    num_cpus: int | None = None  # only for a local cluster
    shuffle_parallelism: int = 4  # hash-shuffle partitions (shuffle_v2 / hash_shuffle strategies only)
    # Ray Data's shuffle for the prepare stage's group-by (ray.data.context.ShuffleStrategy). Ray 2.60's
    # default, "shuffle_v2", starts aggregator actors per shuffle (10 s of the ML-100k prepare on 2 busy
    # cores vs 3 s sort-based); set "shuffle_v2" for logs too large for a sort-based shuffle.
    shuffle_strategy: ShuffleName = "sort_shuffle_pull_based"
    # Ray 2.60's parquet reader "V2" starts 32 footer-reader actors (32 worker processes) for every
    # read_parquet: seconds per read on a small machine, 20-50 s when its CPUs are busy. False: the V1
    # reader (footers read in the read tasks), the same rows and blocks without the actor pool.
    parquet_datasource_v2: bool = False
    # Local cluster only: Ray starts workers at nice 15 (below the driver); here the workers do all of
    # the job's work, and niced workers starve behind any other busy process. None: Ray's default.
    local_worker_niceness: int | None = 0
    # A Ray Data actor pool (sized to fit the cluster, recsys_core.runtime.pool_args) starts all of its
    # actors before it takes work (DataContext.wait_for_min_actors_s), so the whole pool, spread over the
    # nodes, shares the work; a pool the cluster cannot place fails after this many seconds instead of
    # waiting forever. 0: Ray's default (actors start asynchronously; a small dataset may finish on the
    # first actors up, all on one node).
    pool_start_timeout_s: int = 600


@dataclass(frozen=True)
class ColumnsConfig:
    """Maps the data contract's names to the columns of the user's parquet files."""

    user_id: str = "user_id"  # column holding the user id
    item_id: str = "item_id"  # column holding the item id
    ts: str = "ts"  # column holding the event time (timestamp, epoch seconds or date-time string)


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 400  # synthetic users
    n_items: int = 120  # synthetic catalog size
    n_topics: int = 6  # planted tastes: each user favours one topic
    events_per_user: int = 25  # events generated per user
    seed: int = 0  # random seed of the generator


@dataclass(frozen=True)
class DataConfig:
    source: Literal["parquet", "movielens100k", "synthetic"] = "parquet"  # registry: recsys_core.data.sources.SOURCES
    interactions: str = ""  # parquet dataset (folder/prefix, hive partitions ok); for parquet source
    items: str = ""  # parquet file or folder with item_id + text fields
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)  # maps the data contract's names to your columns
    item_template: str = "{title}"  # item text from the items table's fields, e.g. "{title} ({year})"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # the synthetic source's generator
    ts_unit: Literal["s", "ms", "us", "ns", "auto"] = "s"  # unit of numeric timestamps (auto: each value by its magnitude)
    text_encoding: str = "utf-8"  # decodes binary-typed catalog text columns; undecodable bytes are an error


@dataclass(frozen=True)
class PrepareConfig:
    min_user_interactions: int = 3  # users with fewer are dropped (protocol, not quarantine)
    max_history: int = 1000  # most recent interactions kept per user
    max_reject_fraction: float = 0.05  # fail the run when more rows than this are quarantined
    bucket_rows: int = 1_000_000  # rows per user-hash bucket of the history build (one Python call per bucket)
    min_ts: str = "1990-01-01"  # earliest plausible event time (ISO, UTC); earlier: quarantined ts_out_of_range
    max_ts: str | None = None  # latest plausible event time (ISO, UTC); None: now + 1 day


@dataclass(frozen=True)
class TowerConfig:
    size: Literal["tiny", "mini", "small", "gpt2", "gpt2-medium"] = "tiny"  # recsys_core.model.towers.SIZES
    pretrained: str | None = None  # hub name, save_pretrained folder, s3:// prefix, .gguf, smollm2-135m-instruct; None = scratch
    # item tower only: the pretrained LM stays frozen; its pooled text features are computed once per catalog
    # (model.features), cached in storage, and the tower trains a projection (+ ID embedding) on them
    frozen: bool = False
    # item tower, fine-tuned: only the top k transformer blocks (and the final norm) train, under LoRA only
    # they get adapters; the blocks below and the embeddings stay frozen, and the hidden states entering
    # block L-k are computed once per training run for every item's text, so a step's LM cost on item
    # text is about k/L of a full pass (the cached blocks run without dropout). 0: every layer trains.
    train_top_layers: int = 0
    dropout: float = 0.1  # dropout inside the tower


@dataclass(frozen=True)
class ModelConfig:
    item_tower: TowerConfig = field(default_factory=TowerConfig)  # GPT-2 tower that embeds an item's text
    user_tower: TowerConfig = field(default_factory=TowerConfig)  # GPT-2 tower that embeds a user's history
    embed_dim: int = 64  # size of the shared user/item embedding space
    max_text_tokens: int = 32  # item text truncated to this many tokens
    max_seq_len: int = 50  # most recent history items the user tower reads
    pooling: Literal["mean", "last"] = "mean"  # text tower: mean over tokens, or the last token
    id_embedding: bool = True  # hybrid: learned item-ID embedding added to the text embedding
    similarity: Literal["dot", "cosine"] = "dot"  # dot | cosine (both towers L2-normalised; pair with a temperature ~0.05-0.1)
    tokenizer: str = "gpt2-offline"  # gpt2-offline | hub name | save_pretrained folder


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 2  # Ray Train workers (DDP processes)
    use_gpu: bool = False  # one GPU per worker
    threads_per_worker: int = 1  # torch threads per worker
    epochs: int = 10  # maximum epochs (early stopping may end sooner)
    batch_size: int = 64  # sequences per worker per step
    lr: float = 1e-3  # peak learning rate (AdamW)
    item_backbone_lr: float | None = None  # lr of the item tower's LM body or its LoRA adapters; None = lr
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 20  # linear lr warm-up steps
    grad_clip: float = 1.0  # gradient-norm clip
    # Exponential moving average of the weights (recsys_core.train.ema): validation, early stopping and the
    # saved checkpoints use the average, training steps the raw weights. Decay per step; 0: off.
    ema_decay: float = 0.0
    loss: Literal["full_softmax", "sampled_softmax"] = "full_softmax"  # registry: recsys_core.model.losses.LOSSES
    num_negatives: int = 256  # uniform negatives for sampled_softmax
    temperature: float = 1.0  # initial softmax temperature
    learn_temperature: bool = False  # learn the softmax temperature too
    text_items_per_step: int = 128  # items whose text embedding gets gradients each step
    patience: int = 3  # early stopping on validation NDCG@10
    val_users: int = 2000  # users sampled for per-epoch validation
    seed: int = 0  # random seed (init, shuffling, validation sample)
    max_failures: int = 0  # Ray Train FailureConfig
    # Training examples of at most this many MiB (uncompressed, from the parquet footers) are read once
    # into Ray's object store and every epoch iterates that copy; larger ones stream from storage each
    # epoch. 0: always stream.
    materialize_mib: int = 256
    # Object store the training input may hold while it streams (read ahead of the workers), MiB; a
    # bound that does not grow with the log. 0: Ray Data's own limit (a share of the object store).
    ingest_object_store_mib: int = 512
    placement_strategy: str = "PACK"  # Ray Train workers' placement group: PACK | SPREAD (one per node) | STRICT_*
    # After model selection, train the same way again on every event (the validation and test events
    # included) for the selected number of epochs; that model is the one published (its holdout
    # figures are the selection model's, which never saw the held-out events). Off: the selection model
    # is published (half the training time; tests and quick checks).
    refit: bool = True


@dataclass(frozen=True)
class InferConfig:
    k: int = 50  # recommendations published per user
    batch_size: int = 256  # users per scoring batch
    concurrency: int = 2  # scorer actors (Ray Data map_batches pool size)
    item_batch_size: int = 512  # items per batch when embedding the catalog
    # Cap on a Ray Data block of users (MiB in memory). A users file is small on disk, so without a cap it
    # arrives as one block: one scorer actor does all the work and buffers its whole output.
    block_mib: float = 8.0
    # How each user's top-k is found: exact (every item scored, recsys_core.serve.retrieval) or a FAISS
    # index over the item vectors built in each scorer actor (recsys_core.serve.ann.BUILDERS; needs
    # faiss-cpu): flat (exact, FAISS's kernel), ivf, hnsw. The holdout always ranks exactly.
    retrieval: Literal["exact", "flat", "ivf", "hnsw"] = "exact"  # exact | flat | ivf | hnsw (FAISS: faiss-cpu)
    ann_nlist: int = 0  # ivf: coarse clusters; 0: 4 * sqrt(items), at most items / 39
    ann_nprobe: int = 8  # ivf: clusters scanned per user (benchmarks/README.md: recall against exact)
    ann_hnsw_m: int = 32  # hnsw: graph degree
    ann_ef_search: int = 128  # hnsw: candidates kept while searching


@dataclass(frozen=True)
class PriorConfig:
    """The recency prior of the published score (recsys_core.model.prior), chosen on validation."""

    enabled: bool = True  # choose a prior on validation and publish with it (all-zero weights: the model alone)
    windows_days: tuple[int, ...] = (7, 14, 30, 90)  # popularity windows chosen from
    betas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # prior weights chosen from, per gap bucket
    gap_edges_s: tuple[int, ...] = (3600, 86400, 604800)  # time-since-last-event bucket edges (1 h, 1 d, 1 w)
    fraction: float = 0.1  # the tomorrow-like validation's cutoff: this fraction of the fit log's span before its end
    n_cuts: int = 3  # tomorrow-like cuts at 1, 2, ... n_cuts times `fraction` before the end, their queries pooled
    max_users: int = 5000  # validation queries scored per kind (a seeded sample above it)


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (10, 50)  # cutoffs of the holdout metrics (NDCG@k, Recall@k)
    n_boot: int = 1000  # bootstrap resamples for the 95% intervals
    baselines: tuple[Baseline, ...] = ("popularity", "recent_popularity", "itemknn", "ease")  # beside the model
    itemknn_neighbors: int = 200  # neighbours kept per item by the itemknn baseline
    max_users: int | None = None  # holdout scores a seeded sample (train.seed) of this many users; None: all
    pop_windows_days: tuple[int, ...] = (7, 14, 30, 90, 0)  # recent_popularity: days chosen on validation; 0 = all
    ease_lambdas: tuple[float, ...] = (1.0, 10.0, 100.0, 500.0, 2000.0)  # EASE L2 strengths chosen on validation
    ease_max_items: int = 20000  # EASE is skipped (a log line) above this catalog size: dense I x I float32 inverse
    protocol: Literal["loo", "temporal"] = "loo"  # loo: each user's last events held out | temporal: a global cutoff
    temporal_fraction: float = 0.1  # temporal: the cutoff sits this fraction of the log's time span before its end
    prior: PriorConfig = field(default_factory=PriorConfig)  # the recency prior of the published score


@dataclass(frozen=True)
class LoraConfig:
    """peft LoRA adapters on the item tower's language model; its base weights stay frozen."""

    enabled: bool = False  # train LoRA adapters instead of the item LM's weights
    r: int = 8  # LoRA rank
    alpha: int = 16  # LoRA scaling alpha
    dropout: float = 0.0  # dropout on the LoRA path
    target_modules: tuple[str, ...] = ("all-linear",)  # ("all-linear",) or module names, e.g. [c_attn]


@dataclass(frozen=True)
class GuardConfig:
    """Protecting the item tower's language model (see recsys_core.guard); every switch combinable."""

    lora: LoraConfig = field(default_factory=LoraConfig)  # peft LoRA adapters on the item tower's LM
    lm_weight: float = 0.0  # lambda: causal-LM loss on replay windows of general text, mixed into each step
    item_lm_weight: float = 0.0  # causal-LM loss on the step's item texts (repetitive catalog text: keep small)
    kl_weight: float = 0.0  # beta: KL(reference || model) of next-token distributions on replay text
    replay_corpus: str = "builtin"  # text file (local or s3://); builtin = shipped public-domain English
    heldout_corpus: str = "builtin"  # general English never trained on, for perplexity
    replay_batch_size: int = 4  # replay windows per step
    replay_seq_len: int = 64  # tokens per replay window
    item_lm_per_step: int = 16  # item texts per step in the item LM loss (held-out items never)
    heldout_item_every: int = 20  # every n-th item's text is held out of the LM loss, for perplexity
    eval_window: int = 128  # sliding-window perplexity
    eval_stride: int = 64  # stride of the sliding-window perplexity
    eval_tokens: int = 4096  # held-out tokens scored (before and after)
    max_ppl_increase: float = 0.05  # the gate: general-English perplexity may rise at most +5%
    # WiSE-FT strength scan after fine-tuning (recsys_core.train.strength): the item LM's weights
    # base + alpha * (tuned - base) for each alpha (0 = the base LM, always scanned); the alpha with the best
    # validation NDCG@10 within max_ppl_increase is kept. () = no scan, the fine-tuned weights as trained.
    # Runs for a fine-tuned (not frozen) item LM whose guard is enforced.
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    enforce: Literal["always", "pretrained", "never"] = "pretrained"  # always | pretrained (a random-init LM has nothing to protect) | never
    # prompts whose greedy generations are shown before and after training
    prompts: tuple[str, ...] = ("The film begins with", "My favourite kind of movie is")
    generate_tokens: int = 16  # tokens generated per prompt, before and after training


@dataclass(frozen=True)
class RegistryConfig:
    """models/<version>/ + models/PRODUCTION; what a new model must do to replace the production one."""

    keep_versions: int = 5  # retention: newest versions kept (PRODUCTION's version is always kept)
    warm_start: bool = True  # initialise training from the production model when it fits the catalog
    ndcg_tolerance: float = 0.01  # new holdout NDCG@10 may trail production's by at most this (absolute)
    on_reject: Literal["production", "none"] = "production"  # production: publish the production model's recs | none: publish nothing


@dataclass(frozen=True)
class ExplainConfig:
    """``jobs.explain``: one-line taste descriptions generated by the protected language model."""

    n_users: int = 20  # users described (0: skip the stage)
    max_history: int = 5  # most recent items named in the prompt
    max_new_tokens: int = 24  # tokens generated per description
    prompt: str = "A viewer who enjoyed {items} likes"  # continuation prompt for an LM without a chat template
    # the user turn for an instruct LM (its tokenizer's chat template): {items} is the user's recent item texts
    instruction: str = ("A viewer recently watched: {items}. In one sentence, describe this viewer's taste "
                        "in movies.")
    min_clean_share: float = 0.9  # publish only when at least this share has no degenerate repetition
    min_grounded_share: float = 0.7  # ... and at least this share names a genre or title word of the history
    seed: int = 0  # random seed of the user sample


@dataclass(frozen=True)
class NightlyConfig:
    name: str = "nightly"  # run name (shown in logs and reports)
    storage: StorageConfig = field(default_factory=StorageConfig)  # where outputs live
    ray: RayConfig = field(default_factory=RayConfig)  # the Ray cluster
    data: DataConfig = field(default_factory=DataConfig)  # input data source and its columns
    prepare: PrepareConfig = field(default_factory=PrepareConfig)  # validation, quarantine and the leave-one-out split
    model: ModelConfig = field(default_factory=ModelConfig)  # the two GPT-2 towers
    train: TrainConfig = field(default_factory=TrainConfig)  # Ray Train fine-tuning
    infer: InferConfig = field(default_factory=InferConfig)  # batch inference and publishing
    eval: EvalConfig = field(default_factory=EvalConfig)  # holdout evaluation
    guard: GuardConfig = field(default_factory=GuardConfig)  # the generation guard protecting the item tower's LM
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # model registry and promotion gate
    explain: ExplainConfig = field(default_factory=ExplainConfig)  # taste descriptions (jobs.explain)


# Decimal spellings of a float, with or without a dot or exponent sign: 1e-3, 1E5, -2e-4, .5, 3.
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


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
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
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
    if tp is float and isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
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
        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        guess = f"did you mean '{where}{close[0]}'? " if close else f"known: {', '.join(sorted(names))}; "
        raise ConfigError(f"unknown config key '{where}{unknown[0]}': {guess}(`recsys-core config show` lists every key)")
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


def _iso_time(v: Any) -> bool:
    try:
        dt.datetime.fromisoformat(str(v))
        return True
    except ValueError:
        return False


def _codec(v: Any) -> bool:
    try:
        codecs.lookup(str(v))
        return True
    except LookupError:
        return False


# Value rules by name (a registry: one predicate and its wording each), and the keys they apply to.
# Checked when a config is loaded or replaced, so a bad value fails before Ray starts, never after a
# stage has changed anything (e.g. registry.keep_versions=0 used to fail after PRODUCTION switched).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "> 0"),
    "non_negative": (lambda v: v >= 0, ">= 0"),
    "fraction": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "open_fraction": (lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    "unit_interval": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "at_least_2": (lambda v: v >= 2, ">= 2"),
    "iso_time": (_iso_time, "an ISO date or date-time (YYYY-MM-DD[THH:MM:SS])"),
    "codec": (_codec, "a Python text encoding (e.g. utf-8, latin-1)"),
}
RANGES: dict[str, str] = {
    "ray.shuffle_parallelism": "positive", "ray.pool_start_timeout_s": "non_negative",
    "data.synthetic.n_users": "positive", "data.synthetic.n_items": "positive", "data.synthetic.n_topics": "positive",
    "data.synthetic.events_per_user": "positive", "data.text_encoding": "codec",
    "prepare.min_user_interactions": "positive", "prepare.bucket_rows": "positive", "prepare.max_history": "positive",
    "prepare.max_reject_fraction": "fraction", "prepare.min_ts": "iso_time", "prepare.max_ts": "iso_time",
    "model.item_tower.dropout": "fraction", "model.item_tower.train_top_layers": "non_negative", "model.user_tower.dropout": "fraction", "model.embed_dim": "positive",
    "model.max_text_tokens": "at_least_2", "model.max_seq_len": "positive",
    "train.num_workers": "positive", "train.threads_per_worker": "positive", "train.epochs": "positive",
    "train.batch_size": "positive", "train.lr": "non_negative", "train.item_backbone_lr": "non_negative",
    "train.weight_decay": "non_negative", "train.warmup_steps": "non_negative", "train.grad_clip": "positive", "train.ema_decay": "unit_interval",
    "train.num_negatives": "positive", "train.temperature": "positive", "train.text_items_per_step": "positive",
    "train.patience": "positive", "train.val_users": "positive", "train.max_failures": "non_negative",
    "train.materialize_mib": "non_negative", "train.ingest_object_store_mib": "non_negative",
    "infer.ann_nlist": "non_negative", "infer.ann_nprobe": "positive", "infer.ann_hnsw_m": "positive",
    "infer.ann_ef_search": "positive",
    "infer.k": "positive", "infer.batch_size": "positive", "infer.concurrency": "positive",
    "infer.item_batch_size": "positive", "infer.block_mib": "positive",
    "eval.ks": "positive", "eval.n_boot": "positive", "eval.itemknn_neighbors": "positive",
    "eval.prior.windows_days": "positive", "eval.prior.betas": "non_negative", "eval.prior.gap_edges_s": "positive",
    "eval.prior.fraction": "open_fraction", "eval.prior.max_users": "positive", "eval.prior.n_cuts": "positive",
    "guard.lora.r": "positive", "guard.lora.alpha": "positive", "guard.lora.dropout": "fraction",
    "guard.lm_weight": "non_negative", "guard.item_lm_weight": "non_negative", "guard.kl_weight": "non_negative",
    "guard.replay_batch_size": "positive", "guard.replay_seq_len": "positive", "guard.max_ppl_increase": "non_negative",
    "guard.alphas": "fraction",
    "registry.keep_versions": "positive", "registry.ndcg_tolerance": "fraction",
    "explain.n_users": "non_negative", "explain.max_history": "positive", "explain.max_new_tokens": "positive",
    "explain.min_clean_share": "fraction", "explain.min_grounded_share": "fraction",
    "storage.lease_ttl_s": "positive", "storage.lease_wait_s": "non_negative",
}


def check_ranges(cfg: Any, ranges: dict[str, str] = RANGES) -> None:
    """Raise :class:`ConfigError` naming the first key whose value breaks its rule (None: not set, allowed)."""
    for key, rule in ranges.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part, None)
        test, words = RULES[rule]
        for v in node if isinstance(node, tuple) else (node,):
            if v is not None and not test(v):
                raise ConfigError(f"config key '{key}' must be {words}, got {v!r}")


def check_combinations(cfg: NightlyConfig) -> None:
    """Rules between keys: a frozen item LM must be pretrained, and nothing may train or adapt it."""
    it = cfg.model.item_tower
    if it.frozen and not it.pretrained:
        raise ConfigError("config key 'model.item_tower.frozen' needs model.item_tower.pretrained (a frozen "
                          "random-init LM has no features worth reading)")
    if it.frozen and (cfg.guard.lora.enabled or cfg.guard.lm_weight > 0 or cfg.guard.kl_weight > 0
                      or cfg.guard.item_lm_weight > 0):
        raise ConfigError("config key 'model.item_tower.frozen' leaves the LM untouched: guard.lora, "
                          "guard.lm_weight, guard.kl_weight and guard.item_lm_weight must be off")
    pr = cfg.eval.prior
    if list(pr.gap_edges_s) != sorted(set(pr.gap_edges_s)):
        raise ConfigError(f"config key 'eval.prior.gap_edges_s' must increase strictly, got {list(pr.gap_edges_s)}")
    if pr.n_cuts * pr.fraction >= 1.0:
        raise ConfigError(f"config keys 'eval.prior.n_cuts' x 'eval.prior.fraction' must stay below 1 (the cuts would "
                          f"reach past the start of the log), got {pr.n_cuts} x {pr.fraction}")
    if 0.0 not in pr.betas:
        raise ConfigError("config key 'eval.prior.betas' must include 0 (the model alone is always a candidate)")
    if it.frozen and it.train_top_layers:
        raise ConfigError("config key 'model.item_tower.train_top_layers' trains the top blocks of the item LM, "
                          "which model.item_tower.frozen leaves untouched: set one of them")
    if cfg.model.user_tower.train_top_layers:
        raise ConfigError("config key 'model.user_tower.train_top_layers': only the item tower reads text")
    if cfg.model.user_tower.frozen:
        raise ConfigError("config key 'model.user_tower.frozen': only the item tower reads text features")


def check_config(cfg: NightlyConfig) -> None:
    """Every load-time rule: the value ranges, then the rules between keys."""
    check_ranges(cfg)
    check_combinations(cfg)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> NightlyConfig:
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for o in overrides:
        apply_override(data, o)
    try:
        cfg = from_dict(NightlyConfig, data)
        check_config(cfg)
        return cfg
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
    out = from_dict(type(cfg), data)
    if isinstance(out, NightlyConfig):
        check_config(out)
    return out


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
