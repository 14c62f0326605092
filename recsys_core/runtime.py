"""Process setup: logging with run/stage context, connecting to (or starting) Ray, and sizing the job's
Ray work to the cluster it runs on (actor pools and training workers that always leave room for tasks)."""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator

import ray
import ray.data

from recsys_core.config import RayConfig

_run = contextvars.ContextVar("run", default="-")
_stage = contextvars.ContextVar("stage", default="-")
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
log = logging.getLogger(__name__)
# Logical CPUs every plan below leaves free: a Ray Data read or write task asks for one CPU (Ray's
# default), and an actor pool or training group holding every CPU starves them ("backpressured:
# ResourceBudget": the job hangs with no error).
TASK_CPUS = 1.0


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_date = _run.get()
        record.stage = _stage.get()
        return True


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s [run_date=%(run_date)s stage=%(stage)s] %(name)s: %(message)s"))
    root = logging.getLogger("recsys_core")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


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
    ray.data.DataContext.get_current().use_datasource_v2 = cfg.parquet_datasource_v2
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:  # the job's runtime_env (cluster/runtime_env.yaml) sets the workers' environment
        ray.init(address=address, log_to_driver=True)
        return
    if cfg.local_worker_niceness is not None:  # read by the raylet this process starts
        os.environ.setdefault("RAY_worker_niceness", str(cfg.local_worker_niceness))
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    # A private single-machine cluster: token auth has nothing to protect here.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Logical CPUs above the core count, so Ray Data tasks can run beside the training workers
    # (2 workers on a 2-core machine would otherwise starve the data pipeline feeding them).
    num_cpus = cfg.num_cpus or (os.cpu_count() or 1) + 2
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=True)


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
