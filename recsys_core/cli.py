"""Command-line entry shared by ``jobs/*.py``: parse the config and run a job."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from recsys_core.config import ConfigError, NightlyConfig, load_config, parse_run_date
from recsys_core.pipeline import run_job
from recsys_core.runtime import setup_logging


@dataclass(frozen=True)
class JobArgs:
    config: NightlyConfig
    run_date: str
    force: bool


def parse_cli(argv: Sequence[str] | None, description: str) -> JobArgs:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config (jobs/configs/*.yaml)")
    p.add_argument("--run-date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--force", action="store_true", help="recompute stages already complete for this date")
    a = p.parse_args(argv)
    return JobArgs(load_config(a.config, a.overrides), parse_run_date(a.run_date), a.force)


def job_main(job: str, argv: Sequence[str] | None = None, *, cfg: NightlyConfig | None = None,
             run_date: str | None = None, force: bool = False) -> dict[str, Any]:
    """Entry point shared by ``jobs/*.py``: parse the CLI (or take a config object), then run the job."""

    if cfg is not None:
        setup_logging()
        return run_job(job, cfg, parse_run_date(run_date), force)
    setup_logging()
    try:  # from the command line: a config problem or a date held by another run is one line, exit 2
        args = parse_cli(argv, description=f"recsys-core: the {job} job")
        return run_job(job, args.config, args.run_date, args.force or force)
    except ConfigError as e:
        logging.getLogger("recsys_core").error("%s", e)
        raise SystemExit(2) from None
