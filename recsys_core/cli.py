"""The ``recsys-core`` command (``[project.scripts]``) and the entry shared by ``python -m jobs.*``.

    recsys-core nightly --config ml100k [--run-date YYYY-MM-DD] [--set key=value ...] [--force]
    recsys-core prepare|train|infer|explain --config ml100k ...     one job alone
    recsys-core config show --config ml100k [--set key=value ...]   the resolved config, each key documented
    recsys-core config list                                         the shipped configs

``--config`` takes a file or a shipped config's name. A user error (a config mistake, a missing file,
unusable input data, a stage run out of order) is one line on stderr and exit code 2; ``--debug``
shows its traceback. ``--verbose`` brings back Ray's progress bars, plan lines and result dumps.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from recsys_core.config import ConfigError, NightlyConfig, load_config, parse_run_date
from recsys_core.config_doc import render_config

JOBS = {
    "nightly": "the whole pipeline: prepare, train, evaluate, promote, infer + publish, explain, report",
    "prepare": "validate, quarantine and split the interaction log (Ray Data)",
    "train": "fine-tune the two GPT-2 towers (Ray Train, DDP) and register the model",
    "infer": "evaluate on the holdout, apply the promotion gate, publish every user's top-k, write the report",
    "explain": "one-line taste descriptions from the protected language model",
}
EXIT_USER_ERROR = 2


def shipped_configs() -> dict[str, Path]:
    """The configs packaged with the project (jobs/configs/*.yaml), by name."""
    folder = resources.files("jobs") / "configs"
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve_config(ref: str) -> Path:
    """A config file, or a shipped config by name (``ml100k``, ``ml100k.yaml``, ``jobs/configs/ml100k.yaml``)."""
    path = Path(ref)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if path.suffix in ("", ".yaml") and path.parent in (Path("."), Path("jobs/configs")) and path.stem in shipped:
        return shipped[path.stem]
    raise ConfigError(f"config {ref!r} not found: no such file, and not a shipped config "
                      f"({', '.join(sorted(shipped))})")


def invocation(config_ref: str, overrides: Sequence[str]) -> str:
    """The config part of a command line, shell-quoted: hints built from it work as printed."""
    return shlex.join(["--config", config_ref, *(a for o in overrides for a in ("--set", o))])


@dataclass(frozen=True)
class JobArgs:
    config: NightlyConfig
    run_date: str
    force: bool
    invocation: str = "--config CONFIG"
    verbose: bool = False


def _config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", required=required, help="YAML file or shipped name: "
                   + ", ".join(sorted(shipped_configs())))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.epochs=3 (repeatable; `config show` lists the keys)")


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")


def _job_args(p: argparse.ArgumentParser) -> None:
    _config_args(p, required=True)
    p.add_argument("--run-date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--force", action="store_true", help="recompute stages already complete for this date")
    p.add_argument("--verbose", action="store_true",
                   help="also Ray's progress bars, execution plans and training result dumps")
    _common_args(p)


def build_parser(prog: str = "recsys-core", job: str | None = None) -> argparse.ArgumentParser:
    """``recsys-core COMMAND ...``, or with ``job`` the parser of ``python -m jobs.<job>``."""
    if job is not None:
        p = argparse.ArgumentParser(prog=prog, description=f"recsys-core: the {job} job: {JOBS[job]}")
        _job_args(p)
        p.set_defaults(command=job)
        return p
    p = argparse.ArgumentParser(prog=prog, description="Ray-native nightly fine-tuning of two-tower "
                                "recommenders, batch top-k publishing and a run report.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in JOBS.items():
        _job_args(sub.add_parser(name, help=text, description=text))
    conf = sub.add_parser("config", help="show the resolved config (each key with its doc) or list shipped ones")
    actions = conf.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="the resolved config as YAML, each key with its one-line doc")
    _config_args(show, required=False)
    _common_args(show)
    _common_args(actions.add_parser("list", help="the shipped configs"))
    return p


def parse_cli(argv: Sequence[str] | None, job: str = "nightly", prog: str | None = None) -> JobArgs:
    """The arguments of one job (``python -m jobs.<job>``), the config resolved and loaded."""
    a = build_parser(prog or f"python -m jobs.{job}", job).parse_args(argv)
    return _job_from(a)


def _job_from(a: argparse.Namespace) -> JobArgs:
    cfg = load_config(resolve_config(a.config), a.overrides)
    return JobArgs(cfg, parse_run_date(a.run_date), a.force, invocation(a.config, a.overrides), a.verbose)


def job_main(job: str, argv: Sequence[str] | None = None, *, cfg: NightlyConfig | None = None,
             run_date: str | None = None, force: bool = False) -> dict[str, Any]:
    """Entry point shared by ``jobs/*.py``' ``main``: parse the CLI (or take a config object), run the job and
    return its stage records. Errors propagate (``command`` turns user errors into one line)."""
    if cfg is None:
        args = parse_cli(argv, job=job)
    else:
        args = JobArgs(cfg, parse_run_date(run_date), force)
    return _run_job(job, args, force=args.force or force)


def _run_job(job: str, args: JobArgs, force: bool) -> dict[str, Any]:
    given = "" if args.invocation == JobArgs.invocation else f" ({args.invocation})"
    print(f"{time.strftime('%H:%M:%S')} {job} for {args.run_date}{given}: loading Ray and torch",
          file=sys.stderr, flush=True)
    # lazy: torch, Ray and transformers take seconds to import; config errors and `config show` answer at once
    from recsys_core.pipeline import run_job
    from recsys_core.runtime import setup_logging

    setup_logging(verbose=args.verbose)
    return run_job(job, args.config, args.run_date, force, invocation=args.invocation)


def _config_show(a: argparse.Namespace) -> int:
    ref = a.config
    cfg = load_config(resolve_config(ref) if ref else None, a.overrides)
    source = f"{ref} ({resolve_config(ref)})" if ref else "the defaults"
    header = f"resolved config: {source}" + "".join(f" --set {o}" for o in a.overrides)
    sys.stdout.write(render_config(cfg, header=header))
    return 0


def config_summary(text: str) -> str:
    """A shipped config's description: its first comment line that is not a command."""
    for line in text.splitlines():
        body = line.lstrip("# ").strip()
        if not line.startswith("#"):
            break
        if body and not body.startswith(("python ", "(", "ray ", "recsys-core ")):
            return body
    return ""


def _config_list(a: argparse.Namespace) -> int:
    for name, path in sorted(shipped_configs().items()):
        print(f"{name:<14} {config_summary(path.read_text())}")
    return 0


# Errors a user fixes (not bugs), beside ConfigError (and its PreflightError) and FileNotFoundError: module ->
# class. Looked up in sys.modules: an error of a module not imported yet cannot have been raised, and
# importing the stage modules to classify a config mistake would cost seconds.
USER_ERRORS = {"recsys_core.data.prepare": "DataValidationError", "recsys_core.pipeline": "StageNotDone"}


def is_user_error(e: BaseException) -> bool:
    found = tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules)
    return isinstance(e, (ConfigError, FileNotFoundError, *found))


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _dispatch(a: argparse.Namespace) -> int:
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {"show": _config_show, "list": _config_list}
    if a.command == "config":
        return handlers[a.action](a)
    args = _job_from(a)
    _run_job(a.command, args, force=args.force)
    return 0


def command(argv: Sequence[str] | None = None, prog: str = "recsys-core", job: str | None = None) -> int:
    """Run a command line; returns the exit code (2 and one stderr line for a user error)."""
    a = build_parser(prog, job).parse_args(argv)
    try:
        return _dispatch(a)
    except Exception as e:
        if a.debug or not is_user_error(e):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


def main() -> None:
    """The ``recsys-core`` console script."""
    sys.exit(command(sys.argv[1:]))


if __name__ == "__main__":
    main()
