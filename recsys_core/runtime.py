"""Process setup: logging with run/stage context, connecting to (or starting) Ray, and sizing the job's
Ray work to the cluster it runs on (actor pools and training workers that always leave room for tasks)."""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray
import ray.data

from recsys_core.config import RayConfig

log = logging.getLogger(__name__)
_run = contextvars.ContextVar("run", default="-")
_stage = contextvars.ContextVar("stage", default="-")
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# Without --verbose: no tqdm bars inside Ray workers (each refresh reaches the driver as a new line), and
# Ray Data's console logging at WARNING (read at each dataset's execution, in the driver and the workers).
RAY_DATA_QUIET_LOGGING = str(Path(__file__).resolve().parent / "assets" / "ray_data_logging.yaml")
QUIET_WORKER_ENV = {"TQDM_DISABLE": "1", "RAY_DATA_LOGGING_CONFIG": RAY_DATA_QUIET_LOGGING,
                    "PYTHONWARNINGS": "ignore::DeprecationWarning"}
HUMAN_FORMAT = "%(asctime)s %(stage_tag)s%(levelname_tag)s%(message)s"
VERBOSE_FORMAT = "%(asctime)s %(levelname)s [run_date=%(run_date)s stage=%(stage)s] %(name)s: %(message)s"
_verbose = {"on": False}  # set by setup_logging; read when Ray and Ray Train are configured

log = logging.getLogger(__name__)
# Logical CPUs every plan below leaves free: a Ray Data read or write task asks for one CPU (Ray's
# default), and an actor pool or training group holding every CPU starves them ("backpressured:
# ResourceBudget": the job hangs with no error).
TASK_CPUS = 1.0


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_date = _run.get()
        record.stage = _stage.get()
        record.stage_tag = f"[{record.stage}] " if record.stage != "-" else ""
        record.levelname_tag = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return True


def setup_logging(level: int = logging.INFO, verbose: bool = False) -> None:
    """The project's log lines on stderr: ``12:01:02 [train] message`` (``verbose``: the full format with
    run date and logger name, and Ray's own progress bars, plan lines and result dumps left on)."""
    _verbose["on"] = verbose
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(logging.Formatter(VERBOSE_FORMAT) if verbose else logging.Formatter(HUMAN_FORMAT, "%H:%M:%S"))
    root = logging.getLogger("recsys_core")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if not verbose:  # Ray Data's advice to write filters as expressions, once per filter call
        warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'")


def is_verbose() -> bool:
    return _verbose["on"]


def ray_train_log_level() -> str:
    """Ray Train's console level: INFO prints a ``Reporting training result ...`` dump per report call."""
    return "INFO" if is_verbose() else "WARNING"


def quiet_train_worker() -> None:
    """In a Ray Train worker: no ``Reporting training result N: TrainingReport(...)`` line per report.

    Ray Train 2.60 logs it at INFO on a logger named by its file path (``logging.getLogger(__file__)``
    in ray/train/v2/_internal/execution/context.py), which LoggingConfig's level filter (loggers named
    ``ray.train.*``) does not reach."""
    for name in list(logging.Logger.manager.loggerDict):
        if "/ray/train/" in name.replace(os.sep, "/"):
            logging.getLogger(name).setLevel(logging.WARNING)


def configure_ray_data(cfg: RayConfig) -> None:
    """The driver's Ray Data context (datasets carry it to the workers): the parquet reader, whole actor
    pools before work (``ray.pool_start_timeout_s``), and without --verbose no progress bars and no
    'Execution plan of Dataset ...' lines."""
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = cfg.parquet_datasource_v2
    # > 0: every actor pool starts whole before taking work (and fails after this long if it cannot)
    ctx.wait_for_min_actors_s = cfg.pool_start_timeout_s if cfg.pool_start_timeout_s > 0 else -1
    if not is_verbose():
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_QUIET_LOGGING)


@contextlib.contextmanager
def stage_context(run_date: str, stage: str) -> Iterator[None]:
    t1, t2 = _run.set(run_date), _stage.set(stage)
    try:
        yield
    finally:
        _stage.reset(t2)
        _run.reset(t1)


def init_ray(cfg: RayConfig) -> None:
    """Attach to the cluster in ``ray.address`` / ``$RAY_ADDRESS`` (ray job submit), else start a local one."""
    configure_ray_data(cfg)
    if ray.is_initialized():
        return
    level = logging.INFO if is_verbose() else logging.WARNING  # ray.init's "Started a local Ray instance" etc.
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:  # the job's runtime_env (cluster/runtime_env.yaml) sets the workers' environment
        ray.init(address=address, log_to_driver=True, logging_level=level)
        return
    if cfg.local_worker_niceness is not None:  # read by the raylet this process starts
        os.environ.setdefault("RAY_worker_niceness", str(cfg.local_worker_niceness))
    defaults = WORKER_ENV if is_verbose() else {**WORKER_ENV, **QUIET_WORKER_ENV}
    env = {k: os.environ.get(k, v) for k, v in defaults.items()}
    # A private single-machine cluster: token auth has nothing to protect here.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Logical CPUs above the core count, so Ray Data tasks can run beside the training workers
    # (2 workers on a 2-core machine would otherwise starve the data pipeline feeding them).
    num_cpus = cfg.num_cpus or (os.cpu_count() or 1) + 2
    log.info("starting a local Ray cluster (%d logical CPUs)", num_cpus)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=True, logging_level=level)


@dataclass(frozen=True)
class ActorPool:
    """A fixed-size Ray Data actor pool: ``size`` actors of ``cpus`` logical CPUs each."""

    size: int
    cpus: float


@dataclass(frozen=True)
class WorkerPlan:
    """Ray Train workers' logical CPUs, and whether their input may stream from storage during training
    (read tasks beside the workers) or must be read before training starts."""

    cpus: float
    stream: bool


def actor_pool(cluster_cpus: float, requested: int) -> ActorPool:
    """At most ``requested`` actors of one CPU, leaving ``TASK_CPUS`` for the read/write tasks around them.

    With less than ``1 + TASK_CPUS`` CPUs in the cluster, one actor takes what is left over the tasks'
    share (0 CPUs on a 1-CPU cluster: Ray then places it without reserving a CPU, and it shares the
    core with the tasks). A cluster reporting under 1 CPU (an autoscaler still adding nodes) gets the
    request as asked: the nodes it is waiting for will have the CPUs."""
    if requested < 1:
        raise ValueError(f"an actor pool needs at least 1 actor, got {requested}")
    if cluster_cpus < 1:
        return ActorPool(requested, 1.0)
    free = cluster_cpus - TASK_CPUS
    if free >= 1:
        return ActorPool(min(requested, math.floor(free)), 1.0)
    return ActorPool(1, round(max(0.0, free), 4))


def train_workers(cluster_cpus: float, world: int) -> WorkerPlan:
    """One CPU per training worker when ``world`` of them fit beside a task's CPU; else an equal share of
    what is left over one task (input still streams), and on a cluster with no CPU to spare (1 CPU) an
    equal share of the whole cluster with the input read up front (no read task has to run beside them)."""
    if world < 1:
        raise ValueError(f"training needs at least 1 worker, got {world}")
    if cluster_cpus < 1:
        return WorkerPlan(1.0, True)
    free = cluster_cpus - TASK_CPUS
    if free >= world:
        return WorkerPlan(1.0, True)
    if free > 0:
        return WorkerPlan(round(free / world, 4), True)
    return WorkerPlan(round(cluster_cpus / world, 4), False)


def cluster_cpus() -> float:
    """Logical CPUs of the connected Ray cluster (all nodes)."""
    return float(ray.cluster_resources().get("CPU", 0.0))


def pool_args(what: str, concurrency: int) -> dict[str, Any]:
    """``map_batches`` arguments for an actor pool of at most ``concurrency`` actors that fits the
    connected cluster with a CPU left for the read and write tasks (see :func:`actor_pool`)."""
    cpus = cluster_cpus()
    pool = actor_pool(cpus, concurrency)
    log.info("%s: %d actor(s) x %g CPU on a %g-CPU cluster (asked for %d)", what, pool.size, pool.cpus, cpus,
             concurrency)
    # SPREAD: the pool's actors go to every node with room instead of packing the driver's node first
    # (on one node it changes nothing); each actor loads the model from storage, never from a local path
    return {"compute": ray.data.ActorPoolStrategy(size=pool.size), "num_cpus": pool.cpus,
            "scheduling_strategy": "SPREAD"}


def gather_item_rows(ds: ray.data.Dataset, column: str, n_items: int) -> np.ndarray:
    """(N, D) float32: the fixed-size vectors in ``column`` of a per-item dataset (``item_idx``, vector),
    each at its item's row; every one of the ``n_items`` items must come back exactly once."""
    parts = [(t["item_idx"].to_numpy(), np.stack(t[column].to_numpy(zero_copy_only=False)))
             for t in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    idx = np.concatenate([p[0] for p in parts])
    if len(idx) != n_items or len(np.unique(idx)) != n_items:
        raise RuntimeError(f"{column}: {len(np.unique(idx))} distinct items of {len(idx)} rows computed for a "
                           f"catalog of {n_items}")
    out = np.zeros((n_items, parts[0][1].shape[1]), dtype=np.float32)
    out[idx] = np.concatenate([p[1] for p in parts])
    return out
