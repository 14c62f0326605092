"""Sizing Ray work to the cluster: actor pools and training workers always leave a CPU for Ray Data's
read/write tasks (hand-computed cases), and a real pool on a 1-CPU cluster finishes."""
from __future__ import annotations

import pytest

from recsys_core.runtime import TASK_CPUS, ActorPool, WorkerPlan, actor_pool, train_workers

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("cpus, requested, expected", [
    (16, 2, ActorPool(2, 1.0)),  # plenty: as asked
    (4, 2, ActorPool(2, 1.0)),  # 2 actors + 1 task CPU fit in 4
    (3, 2, ActorPool(2, 1.0)),  # exactly 2 + 1
    (2, 2, ActorPool(1, 1.0)),  # the default `ray start --head` on 2 cores: one actor, one CPU for reads
    (2.5, 4, ActorPool(1, 1.0)),  # floor(2.5 - 1) = 1
    (1.5, 2, ActorPool(1, 0.5)),  # what is left over the task's CPU
    (1, 2, ActorPool(1, 0.0)),  # 1 CPU: the actor reserves none, the read task gets the CPU
    (0, 3, ActorPool(3, 1.0)),  # no CPUs yet (autoscaler): as asked, the coming nodes have them
])
def test_actor_pool_leaves_a_cpu_for_tasks(cpus, requested, expected):
    pool = actor_pool(cpus, requested)
    assert pool == expected
    if cpus >= 1:
        assert pool.size * pool.cpus + TASK_CPUS <= cpus


@pytest.mark.parametrize("cpus, world, expected", [
    (8, 2, WorkerPlan(1.0, True)),
    (3, 2, WorkerPlan(1.0, True)),  # 2 workers + 1 task CPU
    (2, 2, WorkerPlan(0.5, True)),  # (2 - 1) / 2
    (2, 1, WorkerPlan(1.0, True)),
    (4, 4, WorkerPlan(0.75, True)),  # (4 - 1) / 4
    (1, 1, WorkerPlan(1.0, False)),  # nothing beside the worker: the examples are read before training
    (1, 2, WorkerPlan(0.5, False)),
    (0, 2, WorkerPlan(1.0, True)),
])
def test_train_workers_leave_a_cpu_for_reads(cpus, world, expected):
    plan = train_workers(cpus, world)
    assert plan == expected
    if plan.stream and cpus >= 1:
        assert world * plan.cpus + TASK_CPUS <= cpus


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="at least 1 actor"):
        actor_pool(4, 0)
    with pytest.raises(ValueError, match="at least 1 worker"):
        train_workers(4, 0)


def test_pools_start_whole_before_taking_work(monkeypatch):
    """ray.pool_start_timeout_s reaches Ray Data's context (0: Ray's asynchronous default, -1)."""
    import ray.data

    from recsys_core.config import RayConfig
    from recsys_core.runtime import configure_ray_data

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "wait_for_min_actors_s", ctx.wait_for_min_actors_s)  # restored after the test
    configure_ray_data(RayConfig())
    assert ctx.wait_for_min_actors_s == RayConfig().pool_start_timeout_s == 600
    configure_ray_data(RayConfig(pool_start_timeout_s=0))
    assert ctx.wait_for_min_actors_s == -1


@pytest.mark.integration
def test_a_pool_the_cluster_cannot_place_fails_instead_of_waiting(ray_local, monkeypatch):
    """An actor pool asking for more CPUs than the cluster has ends in an error after
    ray.pool_start_timeout_s, not in a job that waits forever."""
    import ray
    import ray.data

    from recsys_core.config import RayConfig
    from recsys_core.runtime import configure_ray_data

    class Echo:
        def __call__(self, batch):
            return batch

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "wait_for_min_actors_s", ctx.wait_for_min_actors_s)  # restored after the test
    cpus = ray.cluster_resources()["CPU"]
    configure_ray_data(RayConfig(pool_start_timeout_s=3))
    ds = ray.data.range(4).map_batches(Echo, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cpus + 1)
    with pytest.raises(Exception, match="Timed out while starting actors"):
        ds.take_all()
    # a pool that fits starts and finishes (a start deadline a loaded 2-core machine meets)
    configure_ray_data(RayConfig(pool_start_timeout_s=120))
    ds = ray.data.range(4).map_batches(Echo, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)
    assert sorted(r["id"] for r in ds.take_all()) == [0, 1, 2, 3]
