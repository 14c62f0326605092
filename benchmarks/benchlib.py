"""Shared helpers for the benchmark scripts: timing, load readings, peak-RSS sampling, tables, subprocesses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
# RAY_ENABLE_AUTO_CONNECT=0: a Ray Data prefetch thread outliving ray.shutdown() must not start a new cluster.
BENCH_ENV = {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "RAY_DEDUP_LOGS": "0", "RAY_ENABLE_AUTO_CONNECT": "0"}


def setup_env() -> None:
    """Process environment every benchmark runs under (before torch or Ray start threads)."""
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it (/proc/cpuinfo's where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines() or Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("Model name:", "model name")):
            return line.split(":", 1)[1].strip()
    return "unknown"


def load() -> list[float]:
    """1-minute, 5-minute, 15-minute load averages: other processes competing for the 2 cores."""
    return [round(x, 2) for x in os.getloadavg()]


def best_of(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, float]:
    """Fastest wall time and fastest process CPU time of ``repeat`` calls.

    On a shared machine the wall time of a single-threaded call stretches with other processes'
    load; its CPU time much less, so single-thread comparisons use the CPU time."""
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table with a bold title line, numbers formatted to 3-4 significant digits."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class RssSampler:
    """Samples the RSS of this process and of every descendant (a local Ray cluster's raylet and workers).

    Records per-process peaks and the peak of the sum at one instant of: this process (the driver),
    Ray worker processes (titles starting ``ray::``), and everything else (raylet, GCS, agents).
    RSS counts the shared-memory pages of Ray's object store a process has touched; "private" is
    RSS minus shared pages (the process's own heap), reported beside it. ``job_pss`` is the sum of PSS
    (proportional set size: each resident page divided by the number of processes mapping it) over this
    process and every descendant, Ray's own processes included: the machine memory the whole job holds,
    each shared page counted once. Reading it walks every process's page tables (about 14 ms per process
    of a running Ray cluster, 2026-12-04), so it is read every ``pss_every``-th sample only: at every sample
    it would take half a core and slow what it measures."""

    def __init__(self, interval_s: float = 0.2, pss_every: int = 25):
        import psutil

        self._psutil = psutil
        self.interval_s = interval_s
        self.me = psutil.Process()
        self.peak = {"driver": 0, "workers_total": 0, "driver_plus_workers": 0, "ray_infra": 0,
                     "driver_private": 0, "workers_private_total": 0, "driver_plus_workers_private": 0,
                     "job_pss": 0}
        self.per_worker: dict[int, tuple[int, int, str]] = {}  # pid -> (peak rss, peak private, title)
        self.samples = 0
        self.pss_every = pss_every
        self._tick = 0  # samples since the last PSS reading
        self.segment: str | None = None  # mark(): peaks of the sum per named segment (a pipeline stage)
        self.segments: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def mark(self, name: str) -> None:
        """From now on, samples also count towards the peaks of segment ``name`` (until the next mark)."""
        self._tick = 0
        self._sample()  # the previous segment's last reading, PSS included
        self.segment = name
        self.segments.setdefault(name, {"driver": 0, "workers_total": 0, "driver_plus_workers": 0,
                                        "driver_plus_workers_private": 0, "job_pss": 0})
        self._tick = 0
        self._sample()  # the new segment's first reading, PSS included

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        ps = self._psutil
        try:
            mem = self.me.memory_info()
            kids = self.me.children(recursive=True)
        except ps.Error:
            return
        now = dict.fromkeys(self.peak, 0)
        now["driver"], now["driver_private"] = mem.rss, mem.rss - mem.shared
        pss = self._tick % self.pss_every == 0  # (mark() resets it: each segment gets readings)
        self._tick += 1
        now["job_pss"] = self._pss(self.me) if pss else 0
        for p in kids:
            try:
                m = p.memory_info()
                title = (p.cmdline() or [p.name()])[0]
            except ps.Error:
                continue
            now["job_pss"] += self._pss(p) if pss else 0
            if title.startswith("ray::"):
                now["workers_total"] += m.rss
                now["workers_private_total"] += m.rss - m.shared
                old = self.per_worker.get(p.pid, (0, 0, title))
                self.per_worker[p.pid] = (max(old[0], m.rss), max(old[1], m.rss - m.shared),
                                          title if m.rss > old[0] else old[2])
            else:
                now["ray_infra"] += m.rss
        now["driver_plus_workers"] = now["driver"] + now["workers_total"]
        now["driver_plus_workers_private"] = now["driver_private"] + now["workers_private_total"]
        self.samples += 1
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        seg = self.segments.get(self.segment) if self.segment is not None else None
        for k in seg or ():
            seg[k] = max(seg[k], now[k])

    def _pss(self, p: Any) -> int:
        try:
            return int(getattr(p.memory_full_info(), "pss", 0))  # /proc/<pid>/smaps_rollup on Linux
        except self._psutil.Error:
            return 0

    def summary(self) -> dict[str, Any]:
        mib = 1 << 20
        top = max(self.per_worker.values(), default=(0, 0, ""))
        top_private = max(self.per_worker.values(), key=lambda v: v[1], default=(0, 0, ""))
        return {**{f"{k}_mib": v / mib for k, v in self.peak.items()},
                "max_worker_mib": top[0] / mib, "max_worker_title": top[2][:80],
                "max_worker_private_mib": top_private[1] / mib, "max_worker_private_title": top_private[2][:80],
                "samples": self.samples, "worker_processes": len(self.per_worker),
                **({"segments_mib": {name: {k: v / mib for k, v in peaks.items()}
                                     for name, peaks in self.segments.items()}} if self.segments else {})}


def run_child(script: str, args: Sequence[str], out_json: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` in a fresh process (its own Ray cluster and memory); returns its JSON.

    Its stdout (the tables) passes through; its stderr (Ray's logs) goes to ``<out_json>.log``. On a
    timeout the child's whole process group is terminated (its local Ray cluster with it)."""
    import signal

    env = {**os.environ, **BENCH_ENV}
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *args, "--json", str(out_json)]
    log = out_json.with_suffix(".log")
    t0 = time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sys.stdout, stderr=err, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    if rc != 0:
        tail = log.read_text()[-3000:]
        why = f"timed out after {timeout_s:.0f}s" if rc is None else f"failed ({rc}) after {time.time() - t0:.0f}s"
        raise RuntimeError(f"{' '.join(cmd)} {why}:\n{tail}")
    return json.loads(out_json.read_text())


def write_json(path: str | Path | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=float) + "\n")


def share_features(root: Path, name: str, source: Path | None = None) -> None:
    """Seed ``root/name``'s frozen-LM feature cache with every complete one under ``root/*`` and anywhere
    below ``source`` (the cache is keyed by catalog and LM, so a run only ever reuses features of its own
    catalog and LM: the pass runs once for a set of runs)."""
    found = [*Path(root).glob("*/features/*/_COMPLETE"), *(Path(source).glob("**/features/*/_COMPLETE") if source else [])]
    for done in found:
        dest = Path(root) / name / "features" / done.parent.name
        if not dest.exists():
            shutil.copytree(done.parent, dest)
