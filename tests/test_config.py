"""Config: every shipped YAML loads, dotted overrides land in the frozen dataclass, errors name the key."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from recsys_core.config import (
    ConfigError,
    check_ranges,
    NightlyConfig,
    RayConfig,
    load_config,
    parse_run_date,
    replace,
)
from recsys_core.data.prepare import shuffle_strategy
from recsys_core.model.losses import LOSSES
from recsys_core.model.towers import SIZES

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))
SYNTHETIC = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "synthetic.yaml"


@pytest.mark.unit
def test_job_configs_exist():
    assert {p.name for p in CONFIGS} >= {"ml100k.yaml", "synthetic.yaml"}


@pytest.mark.unit
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_job_config_parses_and_starts_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, NightlyConfig)
    assert path.read_text().splitlines()[0].startswith("# python -m jobs.")


@pytest.mark.unit
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_job_config_names_a_known_model_size_and_loss(path):
    cfg = load_config(path)
    assert cfg.model.item_tower.size in SIZES and cfg.model.user_tower.size in SIZES
    assert cfg.train.loss in LOSSES


@pytest.mark.unit
def test_dotted_overrides_land_in_the_dataclass_on_top_of_the_file():
    cfg = load_config(SYNTHETIC, ["train.epochs=3", "model.item_tower.size=mini", "eval.ks=[5,20]", "train.lr=1"])
    assert cfg.train.epochs == 3
    assert cfg.model.item_tower.size == "mini"
    assert cfg.eval.ks == (5, 20)  # a YAML list becomes the declared tuple
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int widened to float
    # Keys not overridden keep the file's values, not the dataclass defaults.
    assert cfg.name == "synthetic"
    assert cfg.train.batch_size == yaml.safe_load(SYNTHETIC.read_text())["train"]["batch_size"]
    assert cfg.model.user_tower.size == "tiny"
    assert cfg.model.embed_dim == 32


@pytest.mark.unit
def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"


@pytest.mark.unit
def test_unknown_override_key_raises_naming_the_dotted_key():
    with pytest.raises(ConfigError, match=re.escape("train.epochz")):
        load_config(SYNTHETIC, ["train.epochz=1"])


@pytest.mark.unit
def test_unknown_key_in_file_raises_naming_the_dotted_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  item_tower: {sise: tiny}\n")
    with pytest.raises(ConfigError, match=re.escape("model.item_tower.sise")):
        load_config(p)


@pytest.mark.unit
@pytest.mark.parametrize("override, key", [
    ("train.epochs=abc", "train.epochs"),
    ("train.use_gpu=3", "train.use_gpu"),
    ("train.epochs=true", "train.epochs"),  # a bool is not an int
    ("eval.ks=[5,x]", "eval.ks[1]"),
    ("eval.ks=5", "eval.ks"),
    ("model=3", "model"),
])
def test_wrong_type_raises_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load_config(None, [override])


@pytest.mark.unit
def test_override_without_equals_sign_raises():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs"])


@pytest.mark.unit
def test_override_value_that_is_not_yaml_is_kept_as_text():
    cfg = load_config(None, ["data.item_template={title} ({year})", "name=2026-11-27"])
    assert cfg.data.item_template == "{title} ({year})"
    assert cfg.name == "2026-11-27"


@pytest.mark.unit
def test_parse_run_date_accepts_iso_date():
    assert parse_run_date("2026-11-27") == "2026-11-27"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", parse_run_date(None))


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["2026-1-1", "../x", "2026-11-27/..", "", "20261127"])
def test_parse_run_date_rejects_malformed(bad):
    with pytest.raises(ConfigError, match="--run-date"):
        parse_run_date(bad)


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["2026-13-01", "2026-02-30"])
def test_parse_run_date_rejects_impossible_dates(bad):
    with pytest.raises(ValueError):
        parse_run_date(bad)


@pytest.mark.unit
def test_parse_run_date_impossible_date_is_a_config_error_naming_the_flag():
    with pytest.raises(ConfigError, match="--run-date"):
        parse_run_date("2026-13-01")


@pytest.mark.unit
def test_replace_changes_dotted_key_and_leaves_original():
    cfg = load_config(SYNTHETIC)
    new = replace(cfg, **{"train.epochs": 2, "model.user_tower.size": "mini"})
    assert new.train.epochs == 2 and new.model.user_tower.size == "mini"
    assert cfg.train.epochs == yaml.safe_load(SYNTHETIC.read_text())["train"]["epochs"]
    assert cfg.model.user_tower.size == "tiny"
    assert dataclasses.replace(new.train, epochs=cfg.train.epochs) == cfg.train  # nothing else in train changed
    assert isinstance(new, NightlyConfig)


@pytest.mark.unit
def test_replace_unknown_key_raises():
    with pytest.raises(ConfigError, match=re.escape("train.epochz")):
        replace(load_config(None), **{"train.epochz": 2})


@pytest.mark.unit
def test_shuffle_strategy_names_the_setting_and_its_choices():
    assert shuffle_strategy(RayConfig().shuffle_strategy).value == "sort_shuffle_pull_based"
    with pytest.raises(ValueError, match=r"ray.shuffle_strategy='bogus' unknown; choose one of \[.*hash_shuffle"):
        shuffle_strategy("bogus")


# ----------------------------------------------------------------------------- enum-like values


def _literal_choices(tp: object) -> tuple[str, ...]:
    import typing

    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    assert typing.get_origin(tp) is typing.Literal, tp
    return typing.get_args(tp)


def test_literal_choices_match_the_registries():
    """Every enum-like config value is a Literal whose choices are exactly its registry's keys."""
    import typing

    from ray.data.context import ShuffleStrategy

    from recsys_core import config as C
    from recsys_core.data.prepare import TS_UNITS
    from recsys_core.data.sources import SOURCES
    from recsys_core.eval.baselines import BASELINES
    from recsys_core.model.losses import LOSSES
    from recsys_core.model.towers import POOLING, SIMILARITY, SIZES
    from recsys_core.ops.gate import ON_REJECT
    from recsys_core.serve.ann import BUILDERS
    from recsys_core.train.guard import ENFORCE

    hints = lambda cls: typing.get_type_hints(cls)  # noqa: E731
    pairs = [
        (hints(C.RayConfig)["shuffle_strategy"], {s.value for s in ShuffleStrategy}),
        (hints(C.DataConfig)["source"], SOURCES),
        (hints(C.TowerConfig)["size"], SIZES),
        (hints(C.ModelConfig)["pooling"], POOLING),
        (hints(C.ModelConfig)["similarity"], SIMILARITY),
        (hints(C.TrainConfig)["loss"], LOSSES),
        (hints(C.EvalConfig)["baselines"], BASELINES),
        (hints(C.GuardConfig)["enforce"], ENFORCE),
        (hints(C.RegistryConfig)["on_reject"], ON_REJECT),
        (hints(C.DataConfig)["ts_unit"], {*TS_UNITS, "auto"}),
        (hints(C.InferConfig)["retrieval"], {"exact", *BUILDERS}),
    ]
    for tp, registry in pairs:
        assert set(_literal_choices(tp)) == set(registry), tp


@pytest.mark.parametrize("override, key", [
    ("model.similarity=cosin", "model.similarity"),
    ("guard.enforce=sometimes", "guard.enforce"),
    ("eval.baselines=[popularity,ease2]", "eval.baselines[1]"),
    ("train.loss=bpr", "train.loss"),
    ("registry.on_reject=skip", "registry.on_reject"),
    ("model.item_tower.size=huge", "model.item_tower.size"),
])
def test_enum_typos_fail_at_load_naming_key_and_choices(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and "must be one of" in msg


def test_enum_values_load_from_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  similarity: cosine\n  pooling: last\n")
    cfg = load_config(p, ["train.loss=sampled_softmax", "eval.baselines=[itemknn]"])
    assert (cfg.model.similarity, cfg.model.pooling, cfg.train.loss, cfg.eval.baselines) == (
        "cosine", "last", "sampled_softmax", ("itemknn",))


@pytest.mark.unit
@pytest.mark.parametrize("override, key, words", [
    ("registry.keep_versions=0", "registry.keep_versions", "> 0"),
    ("prepare.max_reject_fraction=1.5", "prepare.max_reject_fraction", "in [0, 1]"),
    ("train.epochs=0", "train.epochs", "> 0"),
    ("eval.ks=[10,0]", "eval.ks", "> 0"),
    ("data.ts_unit=minutes", "data.ts_unit", "one of s, ms, us, ns, auto"),
    ("data.text_encoding=klingon", "data.text_encoding", "a Python text encoding"),
    ("prepare.min_ts=yesterday", "prepare.min_ts", "an ISO date"),
    ("eval.prior.n_cuts=0", "eval.prior.n_cuts", "> 0"),
])
def test_out_of_range_values_refused_at_load_naming_the_key(override, key, words):
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}' must be {words}")):
        load_config(None, [override])


@pytest.mark.unit
def test_tomorrow_cuts_past_the_start_of_the_log_refused_at_load():
    assert load_config(None, ["eval.prior.n_cuts=4", "eval.prior.fraction=0.2"]).eval.prior.n_cuts == 4
    with pytest.raises(ConfigError, match=re.escape("'eval.prior.n_cuts' x 'eval.prior.fraction' must stay below 1")):
        load_config(None, ["eval.prior.n_cuts=5", "eval.prior.fraction=0.2"])


@pytest.mark.unit
def test_ranges_checked_on_replace_and_every_shipped_config_passes():
    cfg = load_config(None)
    with pytest.raises(ConfigError, match=r"config key 'registry.keep_versions' must be > 0, got 0"):
        replace(cfg, **{"registry.keep_versions": 0})
    for path in CONFIGS:
        check_ranges(load_config(path))
    assert load_config(None, ["train.item_backbone_lr=null", "prepare.max_ts=2030-01-01"]).prepare.max_ts == "2030-01-01"


@pytest.mark.integration
def test_cli_refuses_keep_versions_zero_with_exit_2_and_one_line(tmp_path):
    import subprocess  # noqa: PLC0415 - only this test starts a job process
    import sys  # noqa: PLC0415

    root = tmp_path / "store"
    p = subprocess.run([sys.executable, "-m", "jobs.nightly", "--config", str(SYNTHETIC), "--set",
                        f"storage.root={root}", "--set", "registry.keep_versions=0"],
                       cwd=SYNTHETIC.parents[2], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "config key 'registry.keep_versions' must be > 0, got 0" in p.stderr and "Traceback" not in p.stderr
    assert not root.exists()  # nothing ran, nothing was written
