"""Static checks of the deployment files in cluster/ (no cloud, no cluster needed)."""

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
NIGHTLY_SH = CLUSTER / "cron" / "nightly.sh"


def load(rel: str) -> dict:
    return yaml.safe_load((CLUSTER / rel).read_text())


def assert_runnable(argv: list[str]) -> None:
    """`python -m jobs.<name> --config <path>`: module file and config exist in the repo."""
    module = argv[argv.index("-m") + 1]
    assert re.fullmatch(r"jobs\.\w+", module), module
    assert (ROOT / "jobs" / f"{module.split('.')[1]}.py").is_file(), f"{module} has no file"
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), f"missing config {config}"


def test_yaml_files_parse_and_name_their_command():
    assert len(YAMLS) >= 4
    for path in YAMLS:
        text = path.read_text()
        assert isinstance(yaml.safe_load(text), dict), path
        assert re.match(r"# (ray|kubectl) ", text), f"{path}: first line should be the command"


def test_rayjob_and_raycronjob():
    job, cron = load("kuberay/rayjob.yaml"), load("kuberay/raycronjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert cron["spec"]["schedule"] == "0 2 * * *"
    assert cron["spec"]["jobTemplate"] == job["spec"], "RayCronJob must run the RayJob's spec"
    for spec in (job["spec"], cron["spec"]["jobTemplate"]):
        assert_runnable(shlex.split(spec["entrypoint"]))


def dist_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_kuberay_pip_covers_pyproject_dependencies():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pip = yaml.safe_load(load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])["pip"]
    missing = {dist_name(d) for d in deps} - {"ray"} - {dist_name(p) for p in pip}
    assert not missing, f"add to runtimeEnvYAML pip (rayjob + raycronjob): {missing}"


def test_runtime_env_excludes_local_state():
    assert {".venv", ".git"} <= set(load("runtime_env.yaml")["excludes"])


def test_job_runtime_envs_set_the_worker_environment():
    # Attached to a cluster, init_ray passes no runtime_env (Ray refuses to merge one that repeats
    # a job's env vars), so each job runtime_env must carry the workers' environment itself.
    from recsys_core.runtime import WORKER_ENV

    kuberay_env = yaml.safe_load(load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    for env in (load("runtime_env.yaml"), kuberay_env):
        assert env["env_vars"].items() >= WORKER_ENV.items()


def test_cron_script():
    subprocess.run(["bash", "-n", str(NIGHTLY_SH)], check=True)
    text = NIGHTLY_SH.read_text()
    assert "-m jobs.nightly" in text and "flock" in text
    assert_runnable(["-m", "jobs.nightly", "--config", re.search(r"--config (\S+)", text).group(1)])


def test_no_aws_secrets_under_cluster():
    key = re.compile(r"AKIA[0-9A-Z]{16}|(?i:aws_secret_access_key)\s*[:=]\s*\S+")
    for path in (p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text(errors="ignore")
        assert not key.search(text), f"{path} looks like it holds an AWS key"
