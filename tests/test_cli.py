"""The command line: the ``recsys-core`` entry point, shipped configs by name, ``config show`` with every
key documented, YAML 1.1 floats, one-line user errors (exit 2) and hints that work as printed."""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from recsys_core import cli
from recsys_core.config import ConfigError, NightlyConfig, from_dict, load_config
from recsys_core.config_doc import config_docs, config_rows, parse_field_docs, render_config
from recsys_core.pipeline import Run, StageNotDone

REPO = Path(__file__).resolve().parents[1]


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, sections included."""
    out = []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _keys(type(default), f"{prefix}{f.name}.")
    return out


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.unit
def test_console_script_points_at_the_entry_function():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["recsys-core"].split(":")
    assert module == "recsys_core.cli" and getattr(cli, func) is cli.main


@pytest.mark.unit
def test_shipped_configs_found_by_name_or_path(tmp_path):
    shipped = cli.shipped_configs()
    assert set(shipped) == {p.stem for p in (REPO / "jobs" / "configs").glob("*.yaml")}
    for ref in ("ml100k", "ml100k.yaml", "jobs/configs/ml100k.yaml"):
        assert cli.resolve_config(ref).read_text() == (REPO / "jobs/configs/ml100k.yaml").read_text()
    own = tmp_path / "ml100k.yaml"  # a file of that name wins over the shipped config
    own.write_text("name: mine\n")
    assert cli.resolve_config(str(own)) == own
    names = ", ".join(sorted(p.stem for p in (REPO / "jobs" / "configs").glob("*.yaml")))
    with pytest.raises(ConfigError, match=rf"'nope' not found.*{names}"):
        cli.resolve_config("nope")


@pytest.mark.unit
def test_config_show_lists_every_key_of_every_section_with_its_doc(capsys):
    assert cli.command(["config", "show", "--config", "synthetic", "--set", "train.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if not ln.startswith("#")]
    keys = _keys(NightlyConfig)
    assert len(lines) == len(keys) > 100
    for key, line in zip(keys, lines):  # in declaration order, indented by depth
        depth, name = key.count("."), key.rsplit(".", 1)[-1]
        assert line.startswith("  " * depth + name + ":"), (key, line)
        assert re.search(r"\s# \S", line), f"{key} has no doc: {line!r}"
    # what it prints is the resolved config: it loads back to the same object
    assert from_dict(NightlyConfig, yaml.safe_load(out)) == load_config(REPO / "jobs/configs/synthetic.yaml",
                                                                       ["train.lr=1e-3"])
    assert "lr: 0.001" in out and "name: synthetic" in out


@pytest.mark.unit
def test_every_config_field_has_a_doc_comment():
    docs = config_docs()
    rows = config_rows(NightlyConfig(), docs)
    assert [k for _, k, _, _, _ in rows] == _keys(NightlyConfig)
    assert [k for _, k, _, d, _ in rows if not d] == []


@pytest.mark.unit
def test_field_docs_come_from_trailing_comments_or_the_block_above():
    src = '''
class A:
    """Doc of A."""

    x: int = 1  # the x
    # Block about y. More detail
    # on two lines.
    y: str = "a # not a comment"
    z: float = 0.5
    w: int = 2  # w's doc
'''
    assert parse_field_docs(src) == {"A": {"x": "the x", "y": "Block about y.", "z": "", "w": "w's doc"}}


@pytest.mark.unit
def test_render_config_aligns_docs_and_quotes_what_yaml_needs():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        t: str = "{title} (x)"

    @dataclasses.dataclass(frozen=True)
    class Outer:
        ks: tuple[int, ...] = (10, 50)
        inner: Inner = dataclasses.field(default_factory=Inner)
        none: str | None = None

    docs = {"Outer": {"ks": "cutoffs", "inner": "a section", "none": "nothing"}, "Inner": {"t": "template"}}
    # docs start two columns after the longest line: "  t: '{title} (x)'" is 18 characters
    assert render_config(Outer(), docs) == ("ks: [10, 50]        # cutoffs\n"
                                            "inner:              # a section\n"
                                            "  t: '{title} (x)'  # template\n"
                                            "none: null          # nothing\n")


@pytest.mark.unit
@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1E5", 1e5), ("3e-4", 3e-4), ("+3e2", 300.0),
                                         ("0.002", 0.002), ("5", 5.0), (".5", 0.5)])
def test_yaml_1_1_float_spellings_are_floats_from_set_and_from_yaml(tmp_path, text, value):
    cfg = load_config(None, [f"train.lr={text}", f"train.item_backbone_lr={text}"])
    assert cfg.train.lr == value and isinstance(cfg.train.lr, float)
    assert cfg.train.item_backbone_lr == value  # an optional float too
    p = tmp_path / "c.yaml"
    p.write_text(f"train:\n  lr: {text}\nguard:\n  max_ppl_increase: {text}\n")
    assert yaml.safe_load(p.read_text())["train"]["lr"] == (text if "e" in text.lower() else yaml.safe_load(text))
    cfg = load_config(p)
    assert cfg.train.lr == value == cfg.guard.max_ppl_increase


@pytest.mark.unit
def test_float_coercion_leaves_text_and_ints_alone():
    with pytest.raises(ConfigError, match="'train.lr' must be float, got 'abc'"):
        load_config(None, ["train.lr=abc"])
    with pytest.raises(ConfigError, match="'train.epochs' must be int"):
        load_config(None, ["train.epochs=1e3"])  # not silently truncated to an int
    cfg = load_config(None, ["name=1e-3"])
    assert cfg.name == "1e-3"


@pytest.mark.unit
def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"'train.epochz': did you mean 'train.epochs'\?"):
        load_config(None, ["train.epochz=1"])


def _bad_yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


@pytest.mark.unit
@pytest.mark.parametrize("entry", [["-m", "recsys_core.cli", "nightly"], ["-m", "jobs.nightly"]], ids=["cli", "jobs"])
def test_user_errors_are_one_line_exit_2(tmp_path, entry):
    cases = {  # case -> (extra args, what the line must name)
        "bad key": (["--config", str(_bad_yaml(tmp_path, "train:\n  epochz: 3\n"))], "train.epochz"),
        "bad value": (["--config", "synthetic", "--set", "train.epochs=many"], "train.epochs"),
        "missing file": (["--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        "bad date": (["--config", "synthetic", "--run-date", "2026-13-01"], "--run-date"),
    }
    for case, (args, names) in cases.items():
        r = _run(*entry, *args)
        assert r.returncode == 2, (case, r.stderr)
        assert len(r.stderr.splitlines()) <= 2 and "Traceback" not in r.stderr, (case, r.stderr)
        assert names in r.stderr and "error:" in r.stderr, (case, r.stderr)


@pytest.mark.unit
def test_debug_shows_the_traceback(tmp_path):
    r = _run("-m", "recsys_core.cli", "nightly", "--config", str(tmp_path / "missing.yaml"), "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "ConfigError" in r.stderr


@pytest.mark.unit
def test_missing_stage_hint_is_a_command_that_parses_to_the_same_run(tmp_path):
    root = tmp_path / "store dir"  # a space: the hint must quote it
    args = ["--config", "synthetic", "--set", f"storage.root={root}"]
    job = cli.parse_cli(args, job="infer")
    run = Run(job.config, "2026-11-27", invocation=job.invocation)
    with pytest.raises(StageNotDone) as e:
        run.require("train")
    hint = re.search(r"run `(.*)` first", str(e.value)).group(1)
    argv = shlex.split(hint)
    assert argv[:3] == ["python", "-m", "jobs.train"]
    again = cli.parse_cli(argv[3:], job="train")
    assert again.config == job.config and again.run_date == "2026-11-27"


@pytest.mark.unit
def test_a_job_run_out_of_order_fails_in_one_line_before_ray_starts(tmp_path):
    """`jobs.infer` on an empty store: the message is the train command with this config, nothing else."""
    root = tmp_path / "store"
    r = _run("-m", "jobs.infer", "--config", "synthetic", "--set", f"storage.root={root}",
             "--run-date", "2026-11-27", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(err) == 1 and len(r.stderr.splitlines()) <= 2, r.stderr
    assert (f"run `python -m jobs.train --config synthetic --set storage.root={root} --run-date 2026-11-27` first"
            in err[0])
    assert not (root / "runs").exists()


@pytest.mark.unit
def test_quiet_logging_turns_off_ray_noise_and_verbose_keeps_it(monkeypatch):
    import logging

    import ray.data
    import ray.train.v2._internal.execution.context as train_context

    from recsys_core import runtime
    from recsys_core.config import RayConfig

    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    monkeypatch.setattr(ctx, "print_on_execution_start", True)
    try:
        runtime.setup_logging(verbose=True)
        runtime.configure_ray_data(RayConfig())
        assert ctx.enable_progress_bars and ctx.print_on_execution_start and runtime.ray_train_log_level() == "INFO"
        assert "RAY_DATA_LOGGING_CONFIG" not in os.environ
        runtime.setup_logging(verbose=False)
        runtime.configure_ray_data(RayConfig())
        assert not ctx.enable_progress_bars and not ctx.print_on_execution_start
        assert runtime.ray_train_log_level() == "WARNING"
        conf = yaml.safe_load(Path(os.environ["RAY_DATA_LOGGING_CONFIG"]).read_text())
        assert conf["handlers"]["console"]["level"] == "WARNING" and conf["handlers"]["file"]["filename"]
        # Ray Train's "Reporting training result" logger is named by its file path (Ray 2.60)
        reporting = logging.getLogger(train_context.__file__)
        assert train_context.logger is reporting
        monkeypatch.setattr(reporting, "level", logging.NOTSET)
        runtime.quiet_train_worker()
        assert not reporting.isEnabledFor(logging.INFO) and reporting.isEnabledFor(logging.WARNING)
    finally:
        _reset_project_logger()


@pytest.mark.unit
def test_human_log_lines_carry_the_stage_and_flag_warnings(capsys):
    import logging

    from recsys_core import runtime

    runtime.setup_logging(verbose=False)
    log = logging.getLogger("recsys_core.test")
    try:
        with runtime.stage_context("2026-11-27", "train"):
            log.info("epoch 3 kept")
            log.warning("slow")
        log.info("outside")
    finally:
        _reset_project_logger()
    err = capsys.readouterr().err.splitlines()
    assert [re.sub(r"^\d\d:\d\d:\d\d ", "", ln) for ln in err] == [
        "[train] epoch 3 kept", "[train] WARNING: slow", "outside"]


def _reset_project_logger() -> None:
    """Back to an unconfigured project logger (the handler above writes to this test's captured stderr)."""
    import logging

    from recsys_core import runtime

    logger = logging.getLogger("recsys_core")
    logger.handlers[:] = []
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
    runtime._verbose["on"] = False


@pytest.mark.unit
def test_config_list_names_every_shipped_config_with_its_description(capsys):
    assert cli.command(["config", "list"]) == 0
    out = dict(ln.split(None, 1) for ln in capsys.readouterr().out.splitlines())
    assert set(out) == set(cli.shipped_configs())
    assert out["ml100k_gpt2"].startswith("GPU cluster: MovieLens-100k with a pretrained GPT-2")
    assert out["ml100k"].startswith("The embedded demo (`make demo`): MovieLens-100k")
    assert out["ml100k_tiny"].startswith("MovieLens-100k with RANDOM-INIT tiny GPT-2 towers")
    assert cli.config_summary("# python -m jobs.x\n# (a command)\n# What it is.\nname: x\n# later") == "What it is."


@pytest.mark.unit
def test_data_errors_are_user_errors_and_bugs_are_not(monkeypatch, capsys):
    from recsys_core.data.prepare import DataValidationError

    def bad_data(job, args, force):
        raise DataValidationError("interactions/part-0.parquet: 120 of 1000 rows quarantined (12.0%)\n> 1%")

    monkeypatch.setattr(cli, "_run_job", bad_data)
    assert cli.command(["prepare", "--config", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert err == ("recsys-core: error: interactions/part-0.parquet: 120 of 1000 rows quarantined (12.0%) > 1%\n")
    assert cli.is_user_error(StageNotDone("x")) and cli.is_user_error(FileNotFoundError("y"))

    def bug(job, args, force):
        raise KeyError("a bug keeps its traceback")

    monkeypatch.setattr(cli, "_run_job", bug)
    with pytest.raises(KeyError):
        cli.command(["prepare", "--config", "synthetic"])


@pytest.mark.unit
def test_summary_metric_columns_have_one_order_whatever_the_record_order():
    from recsys_core.ops import report

    assert sorted(["mrr@50", "ndcg@50", "recall@50", "ndcg@10", "recall@10"], key=report.metric_order) == [
        "recall@10", "ndcg@10", "recall@50", "ndcg@50", "mrr@50"]
    m = {"recall@10": 0.5, "recall@10_ci_low": 0.25, "recall@10_ci_high": 0.75, "ndcg@10": 0.125, "n_users": 8}
    fresh = {"model": m, "baselines": {"popularity": dict(m), "itemknn": dict(m)}}
    stored = {"baselines": {"itemknn": dict(sorted(m.items())), "popularity": m}, "model": dict(sorted(m.items()))}
    lines = report.holdout_lines(fresh)
    assert lines == report.holdout_lines(stored)
    assert lines == ["holdout, 8 users (95% bootstrap intervals):",
                     "              recall@10                ndcg@10",
                     "  model       0.5000 [0.2500, 0.7500]  0.1250",
                     "  itemknn     0.5000 [0.2500, 0.7500]  0.1250",
                     "  popularity  0.5000 [0.2500, 0.7500]  0.1250"]
