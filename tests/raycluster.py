"""`ray start` clusters for tests: a head and optional extra nodes, each its own raylet, temp dir and
free ports (another Ray cluster on this machine would otherwise hold a default port), stopped after."""
from __future__ import annotations

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
from ray.util.state import list_nodes

from tests.conftest import BASE_ENV, LOCAL_RAY, REPO, free_port

BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 256 * 2**20  # per node: the tests move kilobytes; 5 engineers share 24 GiB
# Fixed default ports of every node's agents, each given a free one.
_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
               "metrics-export-port", "node-manager-port", "object-manager-port")


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment from before this process started any Ray, with the venv's `ray`/`python` first."""
    return {**BASE_ENV, "PATH": f"{BIN}:{BASE_ENV['PATH']}", "RAY_AUTH_MODE": "disabled",
            # a raylet waits this long for its dashboard agent (slow to start on a busy 2-core machine)
            "RAY_agent_register_timeout_ms": "120000", **(extra or {})}


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
            [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}",
             f"--object-store-memory={OBJECT_STORE_BYTES}", *ports, *args], env=self.env,
            start_new_session=True, stdout=open(os.path.join(tmp, "ray-start.log"), "wb"), stderr=subprocess.STDOUT))

    def _start_until(self, args: list[str], ready, what: str, attempts: int = 3) -> None:
        """`ray start` until ``ready()``. `ray start` gives its raylet 30 s (fixed in Ray) to register with
        the GCS; on a loaded machine it can miss that and exit, so an exited node is started again."""
        for attempt in range(attempts):
            self._start(args)
            proc, last = self.procs[-1], attempt == attempts - 1
            self.wait(lambda: (proc.poll() is None and ready()) or (proc.poll() is not None and not last), what)
            if proc.poll() is None:
                return
            self.procs.pop()
            try:  # what the failed `ray start` left running (its GCS, raylet) would hold the ports
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def start_head(self, num_cpus: int) -> None:
        LOCAL_RAY.stop()  # the session's in-process cluster would confuse the job agent lookup
        gcs, dash = free_port(), free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        args = ["--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                "--include-dashboard=true", f"--ray-client-server-port={free_port()}", f"--num-cpus={num_cpus}"]
        self._start_until(args, lambda: self.nodes_alive() >= 1 and subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", self.dashboard], env=self.env,
            capture_output=True).returncode == 0, "ray head")

    def add_node(self, num_cpus: int, resources: str | None = None) -> None:
        """A second raylet joining the head (`ray start --address`), with its own temp dir and resources."""
        args = [f"--address={self.gcs}", f"--num-cpus={num_cpus}", *([f"--resources={resources}"] if resources else [])]
        n = len(self.procs) + 1
        self._start_until(args, lambda: self.nodes_alive() >= n, f"ray node {n}")

    def nodes_alive(self) -> int:
        try:
            return sum(n.state == "ALIVE" for n in list_nodes(address=self.dashboard, timeout=10))
        except Exception:  # noqa: BLE001 - the state API is not up yet (connection refused, 5xx, ...)
            return 0

    def wait(self, ready, what: str, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if ready():
                return
            time.sleep(2)
        log = Path(self.temp_dirs[-1], "ray-start.log").read_text(errors="replace")[-2000:]
        self.stop()
        pytest.fail(f"{what} did not come up; the last `ray start` said:\n{log}")

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
