"""Training throughput: the Ray Train loop (1 and 2 workers) vs a plain single-process PyTorch loop.

    python benchmarks/bench_train.py [--epochs 3] [--nightly] [--root DIR] [--json train.json]

Data and model: the shipped MovieLens-100k config (tiny GPT-2 towers, full softmax over 1,682
items, 64 sequences per worker per step). The prepare and train jobs run first with
``train.epochs`` cut to ``--epochs`` (2 Ray Train workers as shipped; ``--nightly``: every stage
of the nightly job); their stage records give per-stage wall times and the train history the
2-worker throughput. Ray Train with 1 worker runs on the same prepared data, between two runs of
the plain loop in this process on the same prepared examples (2 epochs each, 1 thread), built
from the same pieces as the worker loop (``initial_model``, ``Objective``, ``ItemTensors``,
``collate``, ``text_table``, AdamW with the same groups and schedule, gradient clipping); the
plain loop with 2 threads runs last, for at most 10 steps per epoch.

Throughput counts the step loop only (from the first batch to the last step of each epoch, what
the train history's ``step_s`` measures), summed over epochs after the first of each run (warm-up). The
per-epoch work outside it (the text-embedding cache, rank-0 validation, checkpointing) is reported
separately, as is the cost of iterating the Ray dataset alone.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import ray
import torch

from recsys_core import storage
from recsys_core.config import load_config, replace
from recsys_core.data.split import load_split
from recsys_core.eval.holdout import evaluate_histories
from recsys_core.model.towers import text_table
from recsys_core.pipeline import Run, run_job
from recsys_core.runtime import setup_logging
from recsys_core.train.loop import initial_model, lr_lambda, param_groups, run_epoch
from recsys_core.train.objective import ItemTensors, Objective, collate
from recsys_core.train.trainer import run_train

RUN_DATE = "2026-11-27"


def throughput(history: list[dict[str, Any]], workers: int, skip: int = 1) -> dict[str, float]:
    """Samples/s of the step loop over epochs ``skip``.. (all workers: rank 0's count x workers)."""
    h = history[skip:] or history
    samples = sum(e["samples_per_worker"] for e in h) * workers
    step_s = sum(e["step_s"] for e in h)
    steps = sum(e["steps"] for e in h)
    epoch_s = sum(e["epoch_s"] for e in h)
    return {"samples_per_s": samples / step_s, "step_ms": 1000 * step_s / steps, "epochs_measured": len(h),
            "epoch_samples_per_s": samples / epoch_s,
            "outside_steps_s_per_epoch": float(np.mean([e["epoch_s"] - e["step_s"] for e in h]))}


def positions_per_example(prepared: Any, max_len: int) -> float:
    """Mean real (non-pad) history positions per training example: tokens of the user tower."""

    t = storage.read_table(prepared.train_examples, columns=["input"])
    lens = np.fromiter((min(len(x), max_len) for x in t["input"].to_pylist()), dtype=np.int64)
    return float(lens.mean())


def plain_loop(cfg: Any, prepared: Any, epochs: int, threads: int, device: str = "cpu",
               max_steps: int | None = None, max_step_s: float | None = None) -> list[dict[str, Any]]:
    """The worker loop without Ray: same model, objective, optimiser, schedule, batch and examples.

    On ``cuda``: bf16 autocast and fused AdamW, as the worker loop does on a GPU. ``max_steps`` /
    ``max_step_s`` end an epoch's step loop early (after at least 3 steps)."""

    tc = cfg.train
    torch.set_num_threads(threads)
    np.random.seed(tc.seed)
    dev = torch.device(device)
    items = ItemTensors.load(prepared.items).to(dev)
    torch.manual_seed(tc.seed)
    model = initial_model(cfg, items.tokens.size(0), None)
    model.log_temperature.requires_grad_(tc.learn_temperature)
    model.item_tower.id_known.copy_(items.known.float())
    model.to(dev)
    cuda = dev.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    opt = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr, fused=cuda, foreach=not cuda)
    examples = storage.read_table(prepared.train_examples, columns=["input", "target"])
    inputs = examples["input"].to_numpy(zero_copy_only=False)  # object arrays of int32 arrays
    targets = examples["target"].to_numpy(zero_copy_only=False)
    n = len(inputs)
    steps_per_epoch = math.ceil(n / tc.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, steps_per_epoch * tc.epochs))
    objective = Objective(model, tc.loss, tc.num_negatives, tc.text_items_per_step)
    val = load_split(prepared.users, "val", tc.val_users, tc.seed)
    rng = np.random.default_rng(tc.seed)
    history = []
    for epoch in range(epochs):
        t0 = time.time()
        cache = text_table(model, items.tokens, items.mask)
        t_cache = time.time() - t0
        perm = rng.permutation(n)
        timer = {"collate_s": 0.0}

        def batches():
            for s in range(0, n, tc.batch_size):
                td = time.time()
                sel = perm[s:s + tc.batch_size]
                out = tuple(x.to(dev) for x in collate({"input": inputs[sel], "target": targets[sel]},
                                                       cfg.model.max_seq_len))
                timer["collate_s"] += time.time() - td
                yield out

        ep = run_epoch(objective, opt, sched, model.parameters(), tc.grad_clip, autocast, batches(), items, cache,
                       max_steps=max_steps, max_seconds=max_step_s)
        tv = time.time()
        vm = evaluate_histories(model, items.tokens, items.mask, val[0], val[1], cfg.model.max_seq_len)
        val_s = time.time() - tv
        history.append({"epoch": epoch, "train_loss": ep.mean_loss, "val_ndcg10": vm["ndcg@10"],
                        "step_s": ep.step_s, "steps": ep.steps, "samples_per_worker": ep.samples,
                        "epoch_s": time.time() - t0, "cache_s": t_cache, "val_s": val_s,
                        "collate_s": timer["collate_s"]})
    return history


def ray_data_iteration(cfg: Any, prepared: Any, epochs: int, materialize: bool = False) -> dict[str, float]:
    """Iterate the training dataset as a 1-worker Ray Train shard does (streaming split, local
    shuffle, same batch size) and collate, with no training: the data path's cost per batch, and
    the wait for each epoch's first batch. ``materialize``: blocks read once, kept in the object store."""


    tc = cfg.train
    path, fs = storage.ray_location(prepared.train_examples)
    ds = ray.data.read_parquet(path, filesystem=fs).randomize_block_order(seed=tc.seed)
    if materialize:
        ds = ds.materialize()
    shard = ds.streaming_split(1, equal=True)[0]
    per_batch, first = [], []
    for epoch in range(epochs):
        t, batches = time.time(), 0
        for batch in shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy",
                                        local_shuffle_buffer_size=4 * tc.batch_size,
                                        local_shuffle_seed=tc.seed + epoch):
            if batches == 0:
                first.append(time.time() - t)  # the dataset's execution starts again every epoch
                t = time.time()  # as the train loop: the step clock starts at the first batch
            collate(batch, cfg.model.max_seq_len)
            batches += 1
        per_batch.append((time.time() - t) / max(1, batches - 1))
    return {"ms_per_batch": 1000 * float(np.median(per_batch[1:] or per_batch)),
            "first_batch_s": float(np.median(first[1:] or first)), "batches": batches}


def measure(epochs: int, root: str, config: str, nightly: bool) -> dict[str, Any]:
    """Run everything; returns the raw measurements (histories, timings) that :func:`report` prints.

    ``nightly``: the whole nightly job (every stage) instead of its prepare and train jobs."""


    cfg = load_config(config, [f"storage.root={root}", f"train.epochs={epochs}", f"train.patience={epochs}"])
    setup_logging()
    t0 = time.time()
    stages = run_job("prepare", cfg, RUN_DATE, force=True)
    prepare_s = time.time() - t0
    run = Run(cfg, RUN_DATE)
    # The plain loop runs just before and just after Ray Train's 1-worker run (Ray started but
    # idle), so that a change in other processes' load during the run affects both sides alike.
    plain_a = plain_loop(cfg, run.prepared, 2, threads=1)
    t0 = time.time()
    fit1 = run_train(replace(cfg, **{"train.num_workers": 1}), run.prepared, str(Path(root) / "bench_1worker"))
    fit1_s = time.time() - t0
    plain_b = plain_loop(cfg, run.prepared, 2, threads=1)
    t0 = time.time()
    stages.update(run_job("nightly" if nightly else "train", cfg, RUN_DATE))  # prepare is done: not redone
    nightly_s = prepare_s + time.time() - t0
    data_iter = ray_data_iteration(cfg, run.prepared, 3)
    data_iter_mat = ray_data_iteration(cfg, run.prepared, 3, materialize=True)
    plain2 = plain_loop(cfg, run.prepared, 2, threads=2, max_steps=10, max_step_s=20)  # slow when contended
    ray.shutdown()
    return {"epochs": epochs, "ray_1w": fit1["history"], "ray_2w": stages["train"]["history"],
            "plain_1t": plain_a + plain_b, "plain_1t_before": plain_a, "plain_1t_after": plain_b,
            "plain_2t": plain2, "data_iter": data_iter, "data_iter_materialized": data_iter_mat, "fit1_s": fit1_s,
            "guard_s": float(fit1.get("guard", {}).get("measure_s", 0.0)),
            "stage_s": {k: v["wall_s"] for k, v in stages.items()}, "nightly_s": nightly_s,
            "positions_per_example": positions_per_example(run.prepared, cfg.model.max_seq_len)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--root", default=None, help="storage root (default: a temporary folder, removed at the end)")
    p.add_argument("--config", default=str(benchlib.REPO / "jobs" / "configs" / "ml100k_tiny.yaml"))
    p.add_argument("--nightly", action="store_true", help="run every nightly stage (per-stage wall times)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    t_all, load0 = time.time(), benchlib.load()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        raw = measure(a.epochs, str(Path(a.root or tmp).resolve()), a.config, a.nightly)
    out = report(raw)
    out.update(wall_s=time.time() - t_all, load_before=load0, load_after=benchlib.load())
    benchlib.write_json(a.json, out)


def report(raw: dict[str, Any]) -> dict[str, Any]:
    """Print the tables; returns the JSON record (headline ratios first)."""
    hist1, hist2, plain2 = raw["ray_1w"], raw["ray_2w"], raw["plain_2t"]
    data_iter, fit1_s, guard_s, pos = raw["data_iter"], raw["fit1_s"], raw["guard_s"], raw["positions_per_example"]
    epochs = raw["epochs"]
    r1, r2 = throughput(hist1, 1), throughput(hist2, 2)
    p1 = throughput(raw["plain_1t_before"][1:] + raw["plain_1t_after"][1:], 1, skip=0)  # each run's 2nd epoch
    p2 = throughput(plain2, 1)
    pa, pb = throughput(raw["plain_1t_before"], 1), throughput(raw["plain_1t_after"], 1)
    rows = [["plain PyTorch loop, 1 process, 1 thread (before and after Ray 1 worker)", p1],
            ["  plain, before Ray 1 worker", pa],
            ["  plain, after Ray 1 worker", pb],
            ["plain PyTorch loop, 1 process, 2 threads (up to 10 steps)", p2],
            ["Ray Train, 1 worker x 1 thread", r1],
            ["Ray Train DDP, 2 workers x 1 thread (global batch 2 x 64)", r2]]
    print(benchlib.table(
        f"Training on MovieLens-100k (tiny GPT-2 towers, batch 64 per worker), epochs 2-{epochs}: step loop, "
        "and whole epochs (+ text cache, validation, Ray Data start)",
        ["loop", "samples/s", "positions/s", "ms/step", "vs plain 1 thread", "epoch samples/s",
         "epoch vs plain"],
        [[name, r["samples_per_s"], r["samples_per_s"] * pos, r["step_ms"], r["samples_per_s"] / p1["samples_per_s"],
          r["epoch_samples_per_s"], r["epoch_samples_per_s"] / p1["epoch_samples_per_s"]]
         for name, r in rows]), flush=True)
    later = raw["plain_1t_before"][1:] + raw["plain_1t_after"][1:]
    epochs_s = sum(e["epoch_s"] for e in hist1)
    per_epoch = {"text_cache_s": float(np.mean([e["cache_s"] for e in later])),
                 "validation_s": float(np.mean([e["val_s"] for e in later])),
                 "plain_collate_ms_per_batch": 1000 * float(np.mean([e["collate_s"] / e["steps"] for e in later])),
                 "ray_data_iter_ms_per_batch": data_iter["ms_per_batch"],
                 "ray_data_first_batch_s": data_iter["first_batch_s"],
                 "ray_data_first_batch_materialized_s": raw["data_iter_materialized"]["first_batch_s"],
                 "ray_1w_outside_steps_s": r1["outside_steps_s_per_epoch"],
                 "ray_2w_outside_steps_s": r2["outside_steps_s_per_epoch"],
                 "plain_outside_steps_s": p1["outside_steps_s_per_epoch"],
                 "ray_1w_fit_s": fit1_s, "ray_1w_epochs_s": epochs_s, "ray_1w_guard_report_s": guard_s,
                 "ray_1w_start_checkpoints_teardown_s": fit1_s - epochs_s - guard_s}
    print(benchlib.table(
        "Where Ray Train's time goes outside the step loop (1 worker), and the data path per batch",
        ["item", "value"],
        [["epoch time outside the step loop: plain / Ray 1 worker / Ray 2 workers, s",
          f"{p1['outside_steps_s_per_epoch']:.2f} / {r1['outside_steps_s_per_epoch']:.2f} / "
          f"{r2['outside_steps_s_per_epoch']:.2f}"],
         ["  of which text-embedding cache (plain loop), s", per_epoch["text_cache_s"]],
         ["  of which validation, 943 users (plain loop), s", per_epoch["validation_s"]],
         ["  Ray Data: wait for an epoch's first batch, read_parquet re-executed each epoch "
          "(train.materialize_mib=0), s",
          data_iter["first_batch_s"]],
         ["  Ray Data: the same with the dataset materialized once (as shipped), s",
          raw["data_iter_materialized"]["first_batch_s"]],
         ["collate per batch, in-memory examples (plain loop), ms", per_epoch["plain_collate_ms_per_batch"]],
         ["Ray Data shard iteration + collate per batch, no training, ms", per_epoch["ray_data_iter_ms_per_batch"]],
         [f"Ray Train fit wall, 1 worker, {epochs} epochs, s", fit1_s],
         ["  of which epochs / generation-guard report / start + checkpoints + teardown, s",
          f"{epochs_s:.1f} / {guard_s:.1f} / {fit1_s - epochs_s - guard_s:.1f}"]]), flush=True)
    stage_s = raw["stage_s"]
    print(benchlib.table(
        f"Nightly stages on MovieLens-100k, train.epochs={epochs} (2 workers), wall time",
        ["stage", "wall s"],
        [[k, v] for k, v in stage_s.items()] + [["these stages (incl. Ray start)", raw["nightly_s"]]]), flush=True)
    return {"train_ray_vs_plain": r1["samples_per_s"] / p1["samples_per_s"],
            "train_ray2_vs_plain": r2["samples_per_s"] / p1["samples_per_s"],
            "train_epoch_ray_vs_plain": r1["epoch_samples_per_s"] / p1["epoch_samples_per_s"],
            "train_plain_2threads_vs_1thread": p2["samples_per_s"] / p1["samples_per_s"],
            "train_samples_per_s": {"plain_1t": p1["samples_per_s"], "plain_2t": p2["samples_per_s"],
                                    "ray_1w": r1["samples_per_s"], "ray_2w": r2["samples_per_s"]},
            "positions_per_example": pos, "per_epoch_overheads": per_epoch, "ray_fit_1w_s": fit1_s,
            "nightly_stage_wall_s": stage_s, "nightly_wall_s": raw["nightly_s"], "epochs": epochs,
            "histories": {k: raw[k] for k in ("ray_1w", "ray_2w", "plain_1t_before", "plain_1t_after", "plain_2t")}}


if __name__ == "__main__":
    benchlib.setup_env()
    main()
