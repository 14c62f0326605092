"""Every DDP rank runs the same number of steps per epoch (a cap computed up front), even when the
ranks' shards are blocked differently and the local shuffle buffer yields short batches mid-stream
(ray-project/ray#66085): unit cases by hand, real Ray Data splits, and 2-worker DDP on uneven blocks."""
from __future__ import annotations

import threading

import pyarrow as pa
import pytest
import ray

import jobs.prepare
from recsys_core import storage
from recsys_core.config import replace
from recsys_core.data.prepare import PreparedPaths
from recsys_core.pipeline import Run
from recsys_core.train.loop import capped_batches, steps_per_epoch
from recsys_core.train.trainer import run_train


@pytest.mark.unit
@pytest.mark.parametrize("n, world, batch, expected", [
    (397, 2, 16, 12),  # 198 rows per rank: 12 full batches + 6 rows; every rank runs 12 (not ceil = 13)
    (400, 2, 16, 12),  # 400 / 32 = 12.5
    (384, 2, 16, 12),  # exact
    (40, 1, 8, 5),
    (5, 2, 16, 1),  # fewer rows than one batch per rank: one (short) step each
    (2, 2, 16, 1),
])
def test_steps_per_epoch_by_hand(n, world, batch, expected):
    assert steps_per_epoch(n, world, batch) == expected


@pytest.mark.unit
def test_fewer_examples_than_workers_is_refused():
    with pytest.raises(ValueError, match="3 training examples cannot feed train.num_workers=4"):
        steps_per_epoch(3, 4, 16)


@pytest.mark.unit
def test_capped_batches_stops_at_the_cap_and_closes_the_source():
    closed = []

    def shard():  # the short mid-stream batches of ray-project/ray#66085: 40 rows, blocks [30, 10], batch 8
        try:
            yield from [8, 8, 8, 6, 8, 2]
        finally:
            closed.append(True)

    assert list(capped_batches(shard(), steps_per_epoch(40, 1, 8), rank=0)) == [8, 8, 8, 6, 8]
    assert closed == [True]
    with pytest.raises(RuntimeError, match="rank 1: the training shard ended after 2 batches, before the common 3"):
        list(capped_batches(iter([8, 8]), 3, rank=1))


@pytest.mark.integration
def test_uneven_splits_of_real_ray_data_give_every_rank_the_cap(ray_local):
    """Two consumers of ``streaming_split(2, equal=True)`` over blocks of very different sizes, batched
    with a local shuffle buffer as the training loop does: capped, both yield exactly the cap."""
    sizes = [61, 7, 33, 3, 47, 11, 29, 5]  # 196 rows in 8 blocks
    ds = ray.data.from_arrow([pa.table({"x": list(range(sum(sizes[:i]), sum(sizes[:i + 1])))})
                              for i in range(len(sizes))])
    batch, cap = 8, steps_per_epoch(sum(sizes), 2, 8)
    assert cap == 12  # floor(196 / 16)
    splits = ds.streaming_split(2, equal=True)
    raw: dict[int, list[int]] = {}
    capped: dict[int, list[int]] = {}

    def consume(rank: int) -> None:
        for epoch in range(2):
            it = splits[rank].iter_batches(batch_size=batch, batch_format="numpy", local_shuffle_buffer_size=4 * batch,
                                           local_shuffle_seed=epoch)
            if epoch == 0:
                raw[rank] = [len(b["x"]) for b in it]
            else:
                capped[rank] = [len(b["x"]) for b in capped_batches(it, cap, rank)]

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(raw[0]) == sum(raw[1]) == 98  # equal rows per rank...
    assert min(len(raw[0]), len(raw[1])) >= cap  # ...so at least ceil(98 / 8) = 13 batches each
    assert [len(capped[0]), len(capped[1])] == [cap, cap]


@pytest.mark.integration
def test_ddp_ranks_on_uneven_blocks_run_the_same_steps_and_finish(ray_local, synthetic_cfg):
    """Two DDP workers on training examples rewritten as three files of odd, unequal sizes (so the
    ranks' shards hold different blocks): each epoch every rank ran floor(n / (2 * batch)) steps."""
    cfg = replace(synthetic_cfg, **{"train.epochs": 2, "train.patience": 5, "train.num_workers": 2})
    jobs.prepare.main(cfg=cfg, run_date="2026-11-27")
    run = Run(cfg, "2026-11-27")
    prepared: PreparedPaths = run.prepared
    table = storage.read_table(prepared.train_examples)
    n = table.num_rows - (1 - table.num_rows % 2)  # an odd row count
    cuts = [0, n // 3 + 1, n // 3 + 1 + n // 9, n]  # three unequal blocks
    storage.delete(prepared.train_examples)
    for i in range(3):
        storage.write_table(table.slice(cuts[i], cuts[i + 1] - cuts[i]),
                            storage.join(prepared.train_examples, f"part-{i}.parquet"))
    assert storage.parquet_totals(prepared.train_examples)[0] == n
    fit = run_train(cfg, prepared, run.run_dir, fresh=True)
    cap = n // (2 * cfg.train.batch_size)
    assert cap != -(-n // (2 * cfg.train.batch_size))  # the cap differs from the uncapped ceil
    assert [h["steps_per_rank"] for h in fit["history"]] == [[cap, cap], [cap, cap]]


@pytest.mark.unit
def test_training_ingest_bounds_the_streamed_inputs_object_store():
    from recsys_core.train.trainer import ingest_config
    opts = ingest_config(512)._resolve_execution_options("train")  # what each shard's execution gets
    assert opts.resource_limits.object_store_memory == 512 * 2**20
    assert ingest_config(0)._resolve_execution_options("train").resource_limits.object_store_memory == float("inf")
