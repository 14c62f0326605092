"""The prepare job: read, validate, quarantine, split, build histories and examples (Ray Data).

    python -m jobs.prepare --config ml100k|FILE [--run-date YYYY-MM-DD] [--set key=value ...] [--force]
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

from recsys_core.cli import command, job_main
from recsys_core.config import NightlyConfig


def main(argv: Sequence[str] | None = None, cfg: NightlyConfig | None = None, run_date: str | None = None,
         force: bool = False) -> dict[str, Any]:
    return job_main("prepare", argv, cfg=cfg, run_date=run_date, force=force)


if __name__ == "__main__":
    sys.exit(command(sys.argv[1:], prog="python -m jobs.prepare", job="prepare"))
