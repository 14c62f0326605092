"""Faults the nightly survives: a Ray Train worker SIGKILLed mid-run, the driver SIGKILLed during inference.

Both tests kill real processes (their own only: found among this test's descendants, or by the
private RAY_TMPDIR of the cluster they started) and check what is left in storage afterwards.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset  # noqa: F401 (pa.dataset)
import pytest
import ray

import jobs.prepare
import jobs.train
from recsys_core.config import load_config
from recsys_core.data.split import load_split
from recsys_core.eval.baselines import popularity_scores
from recsys_core.eval.holdout import evaluate_histories
from recsys_core.eval.metrics import per_user_metrics
from recsys_core.model.checkpoint import load_checkpoint
from recsys_core.serve.publish import MANIFEST, publish, read_recommendations
from recsys_core.serve.retrieval import topk_from_scores
from recsys_core.train.objective import ItemTensors
from tests.conftest import BASE_ENV, REPO

# slow: about 150 s of a 2-core CI run (a killed Ray Train worker, a killed driver), beyond its budget
pytestmark = [pytest.mark.integration, pytest.mark.slow]
SYNTHETIC = REPO / "jobs" / "configs" / "synthetic.yaml"
RESUMED = re.compile(r"resumed from checkpoint at epoch (\d+)")


# ----------------------------------------------------------------------------- helpers


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def own_train_workers() -> list[psutil.Process]:
    """Ray Train worker processes of the cluster this test process started (never another cluster's
    on this machine): Ray titles them ``ray::RayTrainWorker...``; they descend from our raylet."""
    return [p for p in psutil.Process().children(recursive=True) if _cmdline(p).startswith("ray::RayTrainWorker")]


def registered_epoch(ray_train_dir: Path) -> int | None:
    """Epoch of the latest checkpoint Ray Train's controller has registered (what a restart resumes from),
    read from its state snapshot in the run folder (``ray_train/<run name>/``)."""
    for snapshot in ray_train_dir.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return int(json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None  # caught mid-write, or no checkpoint yet
    return None


class WorkerKiller(threading.Thread):
    """Waits for the first registered checkpoint, then SIGKILLs one Ray Train worker process."""

    def __init__(self, ray_train_dir: Path, timeout_s: float = 900):
        super().__init__(daemon=True)
        self.ray_train_dir, self.deadline = ray_train_dir, time.time() + timeout_s
        self.stop = threading.Event()
        self.epoch: int | None = None  # latest registered checkpoint when the worker was killed
        self.pid: int | None = None
        self.workers_seen = 0

    def run(self) -> None:
        while not self.stop.is_set() and time.time() < self.deadline:
            epoch = registered_epoch(self.ray_train_dir)
            workers = own_train_workers()
            if epoch is not None and workers:
                victim = workers[-1]
                self.epoch, self.pid, self.workers_seen = epoch, victim.pid, len(workers)
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=30)
                return
            time.sleep(0.2)


def worker_logs(ray_tmpdir: str) -> str:
    """stdout + stderr of every Ray worker process of the cluster rooted at ``ray_tmpdir`` (each file once:
    ``session_latest`` links to the session folder)."""
    files = {f.resolve() for f in Path(ray_tmpdir).rglob("session_*/logs/worker-*") if f.suffix in (".err", ".out")}
    return "\n".join(f.read_text(errors="replace") for f in sorted(files))


# ----------------------------------------------------------------------------- a train worker dies

DATE = "2026-11-20"
EPOCHS = 3


def overrides(root: Path) -> list[str]:
    """The tiny synthetic run both tests share (one prepare + train serves both)."""
    return [f"storage.root={root}", "train.max_failures=1", f"train.epochs={EPOCHS}", "train.patience=10",
            "eval.baselines=[popularity]", "eval.n_boot=50", "guard.eval_tokens=512", "guard.generate_tokens=4"]


@dataclass
class KilledTrain:
    root: Path
    cfg: Any
    train: dict[str, Any]  # the train stage's record
    killer: WorkerKiller
    resumed: list[int]  # epochs in the workers' "resumed from checkpoint at epoch N" lines


@pytest.fixture(scope="module")
def killed_train(ray_local, tmp_path_factory) -> KilledTrain:
    """Prepare + train the date, SIGKILLing one Ray Train worker once the first checkpoint is registered."""
    root = tmp_path_factory.mktemp("faults") / "store"
    cfg = load_config(SYNTHETIC, overrides(root))
    jobs.prepare.main(cfg=cfg, run_date=DATE)
    killer = WorkerKiller(root / "runs" / f"run_date={DATE}" / "ray_train")
    killer.start()
    try:
        out = jobs.train.main(cfg=cfg, run_date=DATE)
    finally:
        killer.stop.set()
        killer.join()
    resumed = [int(m) for m in RESUMED.findall(worker_logs(os.environ["RAY_TMPDIR"]))]
    return KilledTrain(root, cfg, out["train"], killer, resumed)


def test_train_worker_killed_mid_run_resumes_from_checkpoint(killed_train):
    k, cfg = killed_train.killer, killed_train.cfg
    print(f"killed RayTrainWorker pid {k.pid} (1 of {k.workers_seen}) after the checkpoint of epoch {k.epoch} "
          f"was registered; workers logged: resumed from checkpoint at epoch {killed_train.resumed}")
    assert k.pid is not None, "no Ray Train worker was killed (no checkpoint or no worker seen)"
    assert not psutil.pid_exists(k.pid) or psutil.Process(k.pid).status() == psutil.STATUS_ZOMBIE

    # Training resumed from the checkpoint registered before the kill, not from scratch:
    # every worker of the one restarted group logs the epoch it starts at.
    resumed = killed_train.resumed
    assert len(resumed) == cfg.train.num_workers and len(set(resumed)) == 1, f"expected one restart, saw {resumed}"
    assert k.epoch + 1 <= resumed[0] < EPOCHS, (k.epoch, resumed)
    history = killed_train.train["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS)), "history must be continuous, each epoch once"

    # The registered model loads and recommends better than popularity on the holdout.
    model, _ = load_checkpoint(killed_train.train["model_dir"])
    prepared = killed_train.root / "runs" / f"run_date={DATE}" / "prepared"
    items = ItemTensors.load(str(prepared / "items.parquet"))
    hist, target, _ = load_split(str(prepared / "users"), "test")
    ours = evaluate_histories(model, items.tokens, items.mask, hist, target, cfg.model.max_seq_len)
    pop = popularity_scores(np.concatenate(hist), items.tokens.size(0))
    ranked = topk_from_scores(np.tile(pop, (len(hist), 1)), hist, 10)
    pop_recall = float(per_user_metrics(ranked, target, (10,))["recall@10"].mean())
    print(f"holdout recall@10: resumed model {ours['recall@10']:.4f}, popularity {pop_recall:.4f}")
    assert ours["recall@10"] > pop_recall


# ----------------------------------------------------------------------------- the driver dies in inference


def nightly_cmd(root: Path) -> list[str]:
    sets = [a for o in overrides(root) for a in ("--set", o)]
    return [sys.executable, "-m", "jobs.nightly", "--config", str(SYNTHETIC), "--run-date", DATE, *sets]


def _title(p: psutil.Process) -> str:
    try:
        return _cmdline(p).split(" ")[0] or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return str(p.pid)


def part_files(folder: Path) -> set[str]:
    """Part files Ray Data writes while publishing ``folder`` (its staging folder, see serve.publish)."""
    staging = folder.parent / "_staging" / folder.name
    return {f.name for f in staging.rglob("part-*.parquet")} if staging.is_dir() else set()


def own_ray_processes(ray_tmpdir: str) -> list[psutil.Process]:
    """Processes of the cluster started with this RAY_TMPDIR (raylet, gcs, workers, agents)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and (ray_tmpdir in _cmdline(p) or p.environ().get("RAY_TMPDIR") == ray_tmpdir):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Reader(threading.Thread):
    """Reads an already-published date through its manifest, again and again."""

    def __init__(self, folder: str):
        super().__init__(daemon=True)
        self.folder, self.stop = folder, threading.Event()
        self.reads, self.errors = 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                table, manifest = read_recommendations(self.folder)
                assert table.num_rows == manifest["rows"]
                self.reads += 1
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                self.errors.append(repr(e))
            time.sleep(0.2)


def test_driver_killed_during_inference_rerun_publishes_once(killed_train, tmp_path):
    """The nightly (prepare and train already done by the fixture, so it starts at evaluate) is
    SIGKILLed with its whole process group as soon as inference writes a part file, then rerun."""
    root = killed_train.root
    # An earlier date, published by the same publish() the nightly uses (in this process's cluster).
    before = root / "recommendations" / "run_date=2026-11-19"
    earlier = pa.table({"user_id": [1, 2, 3], "item_ids": [[4], [5], [6]], "scores": [[0.5], [0.4], [0.3]],
                        "model_version": ["20261119-000000"] * 3})
    publish(ray.data.from_arrow(earlier), str(before), {"run_date": "2026-11-19", "users": 3})
    reader = Reader(str(before))
    reader.start()

    recs = root / "recommendations" / f"run_date={DATE}"
    stages = root / "runs" / f"run_date={DATE}" / "stages"
    ray_tmp = tempfile.mkdtemp(prefix="rayk", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**BASE_ENV, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "killed_run.log"
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(nightly_cmd(root), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            # Kill as soon as the infer stage writes its first part file (before its manifest, if we are quick).
            deadline = time.time() + 900
            while time.time() < deadline and proc.poll() is None and not part_files(recs):
                time.sleep(0.01)
            alive = proc.poll() is None
            if alive:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        assert alive, f"the nightly ended before inference could be interrupted:\n{log_path.read_text()[-3000:]}"
        killed_parts = part_files(recs)
        phase = ("after its manifest" if (recs / MANIFEST).exists() else
                 f"mid-publish ({len(killed_parts)} part file(s), no manifest)")
        assert (stages / "promote.json").exists() and not (stages / "infer.json").exists()
        print(f"driver killed during inference, {phase}")

        # Did the local cluster die with its driver's process group? Whatever it left is ours to stop
        # (a leftover Ray Data writer could still add part files).
        left = own_ray_processes(ray_tmp)
        titles = {p.pid: _title(p) for p in left}
        gone, alive_after = psutil.wait_procs(left, timeout=10)
        print(f"Ray processes of the killed run still running right after SIGKILL of its process group: "
              f"{len(left)} ({sorted(titles.values())}); {len(gone)} exited on their own within 10 s; "
              f"killing {len(alive_after)}: {sorted(titles[p.pid] for p in alive_after)}")
        for p in alive_after:
            p.kill()
        psutil.wait_procs(alive_after, timeout=10)

        rerun = subprocess.run(nightly_cmd(root), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    finally:
        reader.stop.set()
        reader.join()
        for p in own_ray_processes(ray_tmp):
            p.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # Exactly one complete, manifest-backed output.
    table, manifest = read_recommendations(str(recs))
    users = json.loads((stages / "prepare.json").read_text())["stats"]["users_kept"]
    assert manifest["rows"] == table.num_rows == users
    assert len(set(table["user_id"].to_pylist())) == users
    assert all((recs / f).is_file() for f in manifest["files"])
    # the plain folder read is the same generation, one row per user
    plain = pa.dataset.dataset(str(recs), format="parquet").to_table()
    assert plain.num_rows == users and sorted(plain["user_id"].to_pylist()) == sorted(table["user_id"].to_pylist())
    # the killed attempt's staging is left only while it could still be writing (stale after hours)
    left = part_files(recs)
    print(f"staging part files left by the killed attempt: {len(left)}")
    assert (stages / "infer.json").exists()

    # The earlier date stayed readable the whole time.
    print(f"earlier date read {reader.reads} times while the run was killed and rerun; errors: {reader.errors}")
    assert reader.reads > 0 and not reader.errors
