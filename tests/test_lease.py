"""One run per (root, date): leases in storage (local and moto S3), and two nightlies started together."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import shutil

import pytest

from recsys_core import storage
from recsys_core.ops import lease
from recsys_core.ops.lease import LeaseHeldError, LeaseLostError, acquire
from tests.conftest import BASE_ENV, REPO

SYNTHETIC = REPO / "jobs" / "configs" / "synthetic.yaml"


@pytest.fixture(params=["local", "s3"])
def lease_uri(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("moto_s3")
        return f"s3://recsys-test/lease-{tmp_path.name}/runs/run_date=2026-11-27/_LEASE.json"
    return str(tmp_path / "runs" / "run_date=2026-11-27" / "_LEASE.json")


@pytest.mark.unit
def test_second_holder_refused_naming_holder_and_expiry(lease_uri):
    first = acquire(lease_uri, ttl_s=600, holder="hostA:1:aaaaaa", clock=lambda: 1_000_000.0)
    with pytest.raises(LeaseHeldError, match=r"the date is held by hostA:1:aaaaaa \(lease .*_LEASE.json, acquired "
                                             r"1970-01-12T13:46:40Z, expires 1970-01-12T13:56:40Z"):
        acquire(lease_uri, ttl_s=600, holder="hostB:2:bbbbbb", what="the date", clock=lambda: 1_000_100.0)
    first.release()
    assert not storage.exists(lease_uri)
    acquire(lease_uri, ttl_s=600, holder="hostB:2:bbbbbb").release()  # free again after release


@pytest.mark.unit
def test_crashed_holders_lease_expires_and_the_old_holder_finds_it_lost(lease_uri):
    crashed = acquire(lease_uri, ttl_s=60, holder="hostA:1:aaaaaa", clock=lambda: 1_000_000.0)
    # never renewed (the holder crashed): after its expiry another run takes it over
    taker = acquire(lease_uri, ttl_s=60, holder="hostB:2:bbbbbb", clock=lambda: 1_000_061.0)
    assert json.loads(storage.read_bytes(lease_uri))["holder"] == "hostB:2:bbbbbb"
    assert not crashed.renew(now=1_000_062.0)  # a holder that was only stalled finds out
    with pytest.raises(LeaseLostError):
        crashed.check()
    crashed.release()  # does not delete the new holder's lease
    assert json.loads(storage.read_bytes(lease_uri))["holder"] == "hostB:2:bbbbbb"
    assert taker.renew()
    taker.release()


@pytest.mark.unit
def test_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(tmp_path):
    uri = str(tmp_path / "_LEASE.json")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = f"{lease.socket.gethostname()}:{int(dead.stdout)}:cccccc"
    acquire(uri, ttl_s=600, holder=holder)  # never released: the process is gone
    assert lease.holder_gone(holder) and not lease.holder_gone(lease.holder_id())
    acquire(uri, ttl_s=600).release()


@pytest.mark.unit
def test_concurrent_acquires_exactly_one_wins(lease_uri):
    results: list[str] = []
    barrier = threading.Barrier(6)

    def take(i: int) -> None:
        barrier.wait()
        try:
            acquire(lease_uri, ttl_s=600, holder=f"host:{i}:{i:06d}")
            results.append("won")
        except LeaseHeldError:
            results.append("refused")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 5 + ["won"]


@pytest.mark.integration
@pytest.mark.slow  # a whole nightly in a subprocess (about 60 s on 2 cores): beyond the CI budget
def test_two_nightlies_started_together_one_runs_one_refuses(tmp_path):
    """Two `python -m jobs.nightly` for one root and date, started at the same moment (tiny synthetic
    data): one completes, the other exits 2 before starting Ray, naming the holder and the expiry."""
    root = tmp_path / "store"
    sets = ["storage.root=" + str(root), "data.synthetic.n_users=60", "data.synthetic.n_items=30",
            "train.epochs=1", "train.num_workers=1", "train.val_users=60", "eval.n_boot=10", "explain.n_users=0",
            "ray.num_cpus=2"]
    cmd = [sys.executable, "-m", "jobs.nightly", "--config", str(SYNTHETIC), "--run-date", "2026-11-27",
           *[a for s in sets for a in ("--set", s)]]
    ray_tmp = tempfile.mkdtemp(prefix="rayl", dir="/tmp")
    env = {**BASE_ENV, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    try:
        procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], [o[-3000:] for o in outs]
    refused = outs[codes.index(2)]
    assert "run_date=2026-11-27 under" in refused and "is held by" in refused and "expires" in refused
    assert "Traceback" not in refused and "Started a local Ray instance" not in refused, refused[-3000:]
    stages = root / "runs" / "run_date=2026-11-27" / "stages"
    assert sorted(p.stem for p in stages.glob("*.json")) == sorted(
        ["prepare", "train", "evaluate", "promote", "infer", "report", "explain"])
    assert not (root / "runs" / "run_date=2026-11-27" / "_LEASE.json").exists()  # released at the end
    print("refused run said:", [line for line in refused.splitlines() if "is held by" in line][0])
