"""`ray job submit` of the nightly to a local `ray start --head` cluster (its own processes, stopped after),
on the heads a new user starts: the default 2 CPUs of a 2-core machine, and a single CPU. Actor pools
and training workers sized to the cluster leave a CPU for Ray Data's read and write tasks, so no stage
waits forever for one ("backpressured: ResourceBudget")."""
from __future__ import annotations

import pytest

from recsys_core import storage
from tests.raycluster import Cluster, ray_env

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("num_cpus, workers", [
    (2, 2),
    # a 1-CPU head: the sizing rules are unit-tested in tests/test_resources.py; the whole job (94-110 s)
    # runs with `make test-all`, out of the default run for the 30-minute CI budget
    pytest.param(1, 1, marks=pytest.mark.slow),
])
def test_ray_job_submit_runs_the_nightly(tmp_path, num_cpus, workers):
    cluster = Cluster(ray_env())
    try:
        cluster.start_head(num_cpus)
        root = tmp_path / "store"
        r = cluster.submit("jobs.nightly", "--config", "jobs/configs/synthetic.yaml", "--run-date", "2026-11-27",
                           "--set", f"storage.root={root}", "--set", "train.epochs=1",
                           "--set", f"train.num_workers={workers}", "--set", "infer.concurrency=2",
                           "--set", "eval.baselines=[popularity]", "--set", "explain.n_users=0",
                           "--set", "data.synthetic.n_users=150", "--set", "train.val_users=150",
                           "--set", "guard.eval_tokens=512", "--set", "guard.generate_tokens=4")
    finally:
        cluster.stop()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr)
    man = storage.read_json(str(root / "recommendations" / "run_date=2026-11-27" / "_MANIFEST.json"))
    assert man["rows"] == 150 and man["run_date"] == "2026-11-27"
    expected_actors = 1  # infer.concurrency=2 asked for; 2 CPUs leave room for one beside a task's CPU
    assert f"UserScorer: {expected_actors} actor(s) x {1 if num_cpus == 2 else 0} CPU on a {num_cpus}-CPU cluster" \
        in r.stdout + r.stderr
