"""`ray job submit` of the nightly to a local `ray start --head` cluster (its own processes, stopped after)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from recsys_core import storage
from tests.conftest import BASE_ENV, REPO, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def ray_head():
    bin_dir = str(Path(sys.executable).parent)
    # The environment from before this process started its own Ray cluster (ray_local).
    env = {**BASE_ENV, "PATH": f"{bin_dir}:{BASE_ENV['PATH']}", "RAY_AUTH_MODE": "disabled"}
    gcs, dash = free_port(), free_port()
    # Every fixed default port gets a free one: another Ray cluster on this machine (a test's
    # in-process cluster, a developer's own) would otherwise hold the dashboard agent's port.
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    tmp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=4", f"--temp-dir={tmp}", "--include-dashboard=true", *ports],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        r = subprocess.run([f"{bin_dir}/ray", "job", "list", "--address", address], env=env, capture_output=True)
        if r.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("ray head did not come up")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def test_ray_job_submit_runs_the_nightly(ray_head, tmp_path):
    address, env = ray_head
    root = tmp_path / "store"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--", "python", "-m", "jobs.nightly", "--config", "jobs/configs/synthetic.yaml",
           "--run-date", "2026-11-27", "--set", f"storage.root={root}", "--set", "train.epochs=1",
           "--set", "eval.baselines=[popularity]"]
    for _ in range(10):  # the dashboard agent can lag the head by a few seconds
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in r.stderr + r.stdout:
            break
        time.sleep(3)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr)
    man = storage.read_json(str(root / "recommendations" / "run_date=2026-11-27" / "_MANIFEST.json"))
    assert man["rows"] == 400 and man["run_date"] == "2026-11-27"
