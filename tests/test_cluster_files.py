"""Static checks of the deployment files in cluster/ (no cloud, no cluster needed)."""

import fcntl
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

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


def test_runtime_env_pip_covers_pyproject_dependencies():
    deps = {dist_name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    envs = {"runtime_env.yaml": load("runtime_env.yaml")}
    for where, env in envs.items():
        missing = deps - {"ray"} - {dist_name(p) for p in env["pip"]}
        assert not missing, f"add to the pip list of {where}: {missing}"


def test_image_requirements_pin_exactly_pyprojects_dependencies():
    """cluster/requirements.txt (the Dockerfiles' dependency list): the same packages as pyproject.toml,
    extras included, each pinned to one version inside pyproject's range."""
    deps = {Requirement(d).name.lower(): Requirement(d)
            for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    lines = [ln.strip() for ln in (CLUSTER / "requirements.txt").read_text().splitlines()]
    pins = {r.name.lower(): r for r in (Requirement(ln) for ln in lines if ln and not ln.startswith("#"))}
    assert set(pins) == set(deps), {"missing": set(deps) - set(pins), "extra": set(pins) - set(deps)}
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{name}: pin one version, not {spec}"
        assert spec.version in deps[name].specifier, f"{name}=={spec.version} is outside pyproject's {deps[name]}"
        assert pin.extras == deps[name].extras, name


@pytest.mark.parametrize("dockerfile, base", [("Dockerfile", "rayproject/ray:2.60.0-py311"),
                                              ("Dockerfile.gpu", "rayproject/ray:2.60.0-py311-gpu")])
def test_dockerfiles_build_on_the_ray_image_with_the_pinned_requirements(dockerfile, base):
    text = (CLUSTER / dockerfile).read_text()
    assert f"ARG RAY_IMAGE={base}\nFROM ${{RAY_IMAGE}}" in text
    assert "pip install" in text and "-r cluster/requirements.txt" in text
    assert "pip install --no-deps ." in text  # the project itself, without re-resolving the pins
    for path in re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, flags=re.M):
        assert (ROOT / path).exists(), f"{dockerfile} copies {path}, which is not in the repository"
    ray_pin = next(ln for ln in (CLUSTER / "requirements.txt").read_text().splitlines() if ln.startswith("ray["))
    assert ray_pin.endswith("==" + base.split(":")[1].split("-")[0])  # no second Ray over the image's


def test_kuberay_uses_the_baked_image_and_installs_nothing_per_run():
    job = load("kuberay/rayjob.yaml")
    groups = [job["spec"]["rayClusterSpec"]["headGroupSpec"], *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {"123456789012.dkr.ecr.us-west-2.amazonaws.com/recsys-core:0.1.0-gpu"}
    assert "docker build -f cluster/Dockerfile.gpu -t " + images.pop() in (CLUSTER / "kuberay/rayjob.yaml").read_text()
    assert "pip" not in yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_runtime_env_excludes_local_state():
    assert {".venv", ".git"} <= set(load("runtime_env.yaml")["excludes"])


def test_s3_access_by_role_with_retries_everywhere():
    """No keys anywhere: nodes use instance profiles (VM) or a service account (EKS); boto3 retries."""
    aws = load("aws-cluster.yaml")
    for node in aws["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert any(t.get("resources", {}).get("GPU") for t in aws["available_node_types"].values())
    for cmd in aws["head_start_ray_commands"][-1:] + aws["worker_start_ray_commands"][-1:]:
        assert "AWS_RETRY_MODE=standard" in cmd and "AWS_MAX_ATTEMPTS=" in cmd
    job = load("kuberay/rayjob.yaml")["spec"]
    groups = [job["rayClusterSpec"]["headGroupSpec"], *job["rayClusterSpec"]["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "recsys-ray"
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env["AWS_RETRY_MODE"] == "standard" and int(env["AWS_MAX_ATTEMPTS"]) >= 3
    for env in (load("runtime_env.yaml"), yaml.safe_load(job["runtimeEnvYAML"])):
        assert env["env_vars"]["AWS_RETRY_MODE"] == "standard"


def test_entrypoints_survive_a_lost_train_worker():
    for spec in (load("kuberay/rayjob.yaml")["spec"], load("kuberay/raycronjob.yaml")["spec"]["jobTemplate"]):
        assert re.search(r"--set train\.max_failures=[1-9]", spec["entrypoint"])
        assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] < 24 * 3600
    assert re.search(r"--set train\.max_failures=[1-9]", NIGHTLY_SH.read_text())


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


FAKE_RAY = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_RAY_CALLS"
[ "$(wc -l < "$FAKE_RAY_CALLS")" -ge "$FAKE_RAY_SUCCEEDS_AT" ]
"""


def run_cron(tmp_path: Path, succeeds_at: int, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run cron/nightly.sh with a fake `ray` that fails until its ``succeeds_at``-th call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ray").write_text(FAKE_RAY)
    (bin_dir / "ray").chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    calls.touch()
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "LOG_DIR": str(tmp_path / "logs"),
            "LOCK_FILE": str(tmp_path / "lock"), "FAKE_RAY_CALLS": str(calls),
            "FAKE_RAY_SUCCEEDS_AT": str(succeeds_at), **env}
    r = subprocess.run(["bash", str(NIGHTLY_SH)], env=full, capture_output=True, text=True, timeout=60)
    return r, calls.read_text().splitlines()


def test_cron_script_resubmits_a_failed_run_for_the_same_date(tmp_path):
    r, calls = run_cron(tmp_path, succeeds_at=2, RUN_DATE="2026-11-27", STORAGE_ROOT="s3://my-bucket/recsys")
    assert r.returncode == 0 and r.stdout == r.stderr == "", r.stderr
    assert len(calls) == 2
    for call in calls:
        argv = shlex.split(call)
        assert argv[0] == "job" and argv[1] == "submit"
        assert_runnable(argv[argv.index("--") + 1:])
        assert argv[argv.index("--run-date") + 1] == "2026-11-27"
        assert "storage.root=s3://my-bucket/recsys" in argv
    log = (tmp_path / "logs" / "nightly-2026-11-27.log").read_text()
    assert "attempt 1 of run 2026-11-27 failed" in log and "run 2026-11-27 finished" in log


def test_cron_script_reports_a_failed_night_and_skips_while_locked(tmp_path):
    r, calls = run_cron(tmp_path, succeeds_at=99, RUN_DATE="2026-11-27", ATTEMPTS="2")
    assert r.returncode == 1 and len(calls) == 2
    assert r.stderr.strip() == f"recsys nightly 2026-11-27 failed (exit 1), log: {tmp_path}/logs/nightly-2026-11-27.log"

    with open(tmp_path / "lock", "w") as held:  # a previous run still holds the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r, calls = run_cron(tmp_path, succeeds_at=1, RUN_DATE="2026-11-28")
    assert r.returncode == 75 and calls == []
