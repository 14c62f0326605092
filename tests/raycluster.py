"""`ray start` clusters for tests: a head and optional extra nodes, each its own raylet, temp dir and
free ports (another Ray cluster on this machine would otherwise hold a default port), stopped after."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import BASE_ENV, REPO, free_port

BIN = Path(sys.executable).parent
# Fixed default ports of every node's agents, each given a free one.
_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
               "metrics-export-port", "node-manager-port", "object-manager-port")


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment from before this process started any Ray, with the venv's `ray`/`python` first."""
    return {**BASE_ENV, "PATH": f"{BIN}:{BASE_ENV['PATH']}", "RAY_AUTH_MODE": "disabled", **(extra or {})}


@dataclass
class Cluster:
    env: dict[str, str]
    gcs: str = ""  # 127.0.0.1:PORT, for `ray start --address` and ray.init
    dashboard: str = ""  # http://127.0.0.1:PORT, for `ray job submit --address` and the state API
    procs: list[subprocess.Popen] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)

    def _start(self, args: list[str]) -> None:
        tmp = tempfile.mkdtemp(prefix="rayn", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.temp_dirs.append(tmp)
        ports = [f"--{name}={free_port()}" for name in _PORT_FLAGS]
        self.procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", f"--temp-dir={tmp}", *ports, *args], env=self.env,
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def start_head(self, num_cpus: int) -> None:
        gcs, dash = free_port(), free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        self._start(["--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                     "--include-dashboard=true", f"--ray-client-server-port={free_port()}", f"--num-cpus={num_cpus}"])
        self.wait(lambda: subprocess.run([str(BIN / "ray"), "job", "list", "--address", self.dashboard],
                                         env=self.env, capture_output=True).returncode == 0, "ray head")

    def add_node(self, num_cpus: int, resources: str | None = None) -> None:
        """A second raylet joining the head (`ray start --address`), with its own temp dir and resources."""
        n = self.nodes_alive()
        self._start([f"--address={self.gcs}", f"--num-cpus={num_cpus}",
                     *([f"--resources={resources}"] if resources else [])])
        self.wait(lambda: self.nodes_alive() > n, "second ray node")

    def nodes_alive(self) -> int:
        r = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", self.dashboard, "--filter", "state=ALIVE",
                            "--format", "json"], env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            return 0
        return len(json.loads(r.stdout or "[]"))

    def wait(self, ready, what: str, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if ready():
                return
            time.sleep(2)
        self.stop()
        pytest.fail(f"{what} did not come up")

    def submit(self, *job_args: str, timeout_s: float = 900) -> subprocess.CompletedProcess:
        """`ray job submit --address <dashboard> --working-dir . -- python -m jobs.nightly ...` from the repo."""
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", ".", "--",
               "python", "-m", *job_args]
        for _ in range(10):  # the dashboard agent can lag the head by a few seconds
            r = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout_s)
            if "No available agent" not in r.stderr + r.stdout:
                return r
            time.sleep(3)
        return r

    def stop(self) -> None:
        for p in reversed(self.procs):  # worker nodes first, the head last
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.clear()
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
