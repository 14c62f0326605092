"""Process setup: logging with run/stage context, and connecting to (or starting) Ray."""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Iterator

import ray
import ray.data

from recsys_core.config import RayConfig

_run = contextvars.ContextVar("run", default="-")
_stage = contextvars.ContextVar("stage", default="-")
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


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
