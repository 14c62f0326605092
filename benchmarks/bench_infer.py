"""Batch inference: the Ray Data pipeline vs one batched process, users/s and peak RSS, 100k to 1M users.

    python benchmarks/bench_infer.py [--sizes 100000 1000000] [--items 10000] [--no-uncapped]
                                     [--json infer.json]

A tiny random-init two-tower model (GPT-2 tiny towers, 32-d embeddings) and synthetic parquet
written directly: a catalog of ``--items`` items with random BPE token ids, and users with
histories of 5-10 items (``max_seq_len`` 10). Each size runs in a fresh process with its own local
Ray cluster, through the real code path: ``infer.embed_items`` (Ray Data, ItemEmbedder actors),
``infer.score_users`` (Ray Data, UserScorer actors: user tower + exact top-k with seen masking)
and ``infer.publish`` (parquet parts + ``_MANIFEST.json``). A sampler thread reads the RSS of the
driver and of every process of the local Ray cluster every 0.2 s.

The alternative is what a user would otherwise run (``single_process``): one process that embeds
the catalog in batches, reads users in record batches, scores them with the same user tower and the
same exact top-k with seen masking (``serve.retrieval.topk_excluding``), and writes one parquet file,
with all cores' threads. The question is what Ray buys (scale-out over nodes, bounded memory, a
streaming write) and what it costs on one machine; both run in fresh processes, in the same run.

Finding: the users parquet of 1M users is 43 MB, under Ray Data's 128 MiB target block size, so
an uncapped ``read_parquet`` yields ONE block: one UserScorer actor scores every user (the other
idles; Ray Data warns) and buffers its output until the block is done (private memory grows with the
number of users, the write starts only at the end). ``infer.score_users`` therefore caps users'
blocks at ``infer.block_mib`` (8 MiB) on its dataset's own DataContext; the shipped sizes run with
that cap, and a comparison run repeats the largest size uncapped (``block_mib=0``, Ray's default).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from recsys_core.config import InferConfig, ModelConfig, RayConfig, TowerConfig
from recsys_core.data.text import PAD, pad_token_lists
from recsys_core.model.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from recsys_core.model.towers import build_two_tower, encode_items, user_vectors
from recsys_core.runtime import init_ray
from recsys_core.serve.infer import embed_items, score_users
from recsys_core.serve.publish import publish
from recsys_core.serve.retrieval import topk_excluding

K = 10
SEQ = 10
USERS_PER_FILE = 100_000


def model_config() -> Any:
    return ModelConfig(item_tower=TowerConfig("tiny", dropout=0.0), user_tower=TowerConfig("tiny", dropout=0.0),
                       embed_dim=32, max_text_tokens=16, max_seq_len=SEQ)


def setup(root: Path, n_items: int, sizes: list[int]) -> None:
    """Model checkpoint, item catalog and one users dataset per size (skipped when already there)."""

    rng = np.random.default_rng(0)
    if not (root / "model" / "_COMPLETE").exists():
        torch.manual_seed(0)
        model = build_two_tower(model_config(), n_items)
        save_checkpoint(model, ModelSpec.of(model), root / "model")
    if not (root / "items.parquet").exists():
        lens = rng.integers(6, 16, size=n_items)
        tokens = [rng.integers(0, 50_000, size=n).astype(np.int32) for n in lens]
        pq.write_table(pa.table({"item_idx": pa.array(np.arange(n_items, dtype=np.int32)),
                                 "item_id": pa.array(np.arange(n_items, dtype=np.int64)),
                                 "input_ids": pa.array(tokens, pa.list_(pa.int32()))}), root / "items.parquet")
    for n in sizes:
        folder = root / f"users_{n}"
        if (folder / "_DONE").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for f, s in enumerate(range(0, n, USERS_PER_FILE)):  # written in slices: never all users at once
            m = min(USERS_PER_FILE, n - s)
            lens = rng.integers(5, SEQ + 1, size=m)
            flat = rng.integers(0, n_items, size=int(lens.sum())).astype(np.int32)
            offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            pq.write_table(pa.table({"user_id": pa.array(np.arange(s, s + m, dtype=np.int64)),
                                     "items": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))}),
                           folder / f"part-{f:05d}.parquet")
        (folder / "_DONE").write_text("ok\n")


def scale_run(root: Path, n_users: int, block_mib: float) -> dict[str, Any]:
    """One size, in this (fresh) process: Ray start, embed items, score users, publish; peak RSS sampled.

    ``block_mib``: ``score_users``' cap on a users block (0: uncapped, Ray's 128 MiB default, which
    makes the small users file one block)."""


    icfg = InferConfig()
    items = pq.read_table(root / "items.parquet", columns=["item_id"])["item_id"].combine_chunks()
    out = root / f"recs_{n_users}"
    with benchlib.RssSampler() as rss:
        t0 = time.time()
        init_ray(RayConfig())
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        t1 = time.time()
        emb_uri = str(root / f"item_embeddings_{n_users}.npy")
        embed_items(str(root / "model"), str(root / "items.parquet"), emb_uri, icfg.item_batch_size,
                    icfg.concurrency)
        t2 = time.time()
        recs = score_users(str(root / "model"), emb_uri, str(root / f"users_{n_users}"), items, K, SEQ, "bench",
                           icfg.batch_size, icfg.concurrency, block_mib=block_mib)
        manifest = publish(recs, str(out), {"k": K, "users": n_users})
        t3 = time.time()
    ray.shutdown()
    if manifest["rows"] != n_users:
        raise RuntimeError(f"published {manifest['rows']} rows for {n_users} users")
    return {"users": n_users, "ray_start_s": t1 - t0, "embed_s": t2 - t1, "score_write_s": t3 - t2,
            "end_to_end_s": t3 - t1, "users_per_s": n_users / (t3 - t1), "rss": rss.summary(),
            "load": benchlib.load()}


def single_process(root: Path, n_users: int, threads: int) -> dict[str, Any]:
    """What a user would otherwise run: one process, items embedded in batches, users read in record
    batches and scored with the same user tower and the same exact top-k (seen items masked), one
    parquet writer. Run in a fresh child process so its peak RSS is its own."""
    torch.set_num_threads(threads)
    with benchlib.RssSampler() as rss:
        t0 = time.time()
        model, _ = load_checkpoint(str(root / "model"))
        items = pq.read_table(root / "items.parquet")
        ids, mask = pad_token_lists(items["input_ids"].to_pylist(), pad_id=PAD)
        table = encode_items(model, torch.from_numpy(ids), torch.from_numpy(mask))  # (N, D)
        item_ids = items["item_id"].combine_chunks()
        t1 = time.time()
        files = sorted((root / f"users_{n_users}").glob("part-*.parquet"))
        with tempfile.TemporaryDirectory() as d:
            writer, rows = None, 0
            for f in files:
                for b in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=["user_id", "items"]):
                    hist = [np.asarray(h, dtype=np.int64) for h in b.column("items").to_pylist()]
                    users = user_vectors(model, table, hist, SEQ)  # (b, D)
                    idx, scores = topk_excluding(users, table, hist, K)  # (b, K)
                    offsets = pa.array(np.arange(0, idx.size + 1, K, dtype=np.int32))
                    out = pa.table({"user_id": b.column("user_id"),
                                    "item_ids": pa.ListArray.from_arrays(offsets, item_ids.take(pa.array(idx.ravel()))),
                                    "scores": pa.ListArray.from_arrays(offsets, pa.array(scores.ravel(), pa.float32()))})
                    writer = writer or pq.ParquetWriter(Path(d) / "recs.parquet", out.schema)
                    writer.write_table(out)
                    rows += out.num_rows
            writer.close()
        t2 = time.time()
    if rows != n_users:
        raise RuntimeError(f"single process wrote {rows} rows for {n_users} users")
    return {"users": n_users, "threads": threads, "embed_s": t1 - t0, "score_write_s": t2 - t1,
            "end_to_end_s": t2 - t0, "users_per_s": n_users / (t2 - t0), "peak_rss_mib": rss.summary()["driver_mib"],
            "load": benchlib.load()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--single-threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the single-process alternative (default: all cores, as a user would)")
    p.add_argument("--no-uncapped", action="store_true",
                   help="skip the comparison run of the largest size with uncapped (one) users blocks")
    p.add_argument("--root", default=None, help="data folder (default: a temporary one, removed at the end)")
    p.add_argument("--scale-run", type=int, default=None, help=argparse.SUPPRESS)  # child mode: one size
    p.add_argument("--block-mib", type=float, default=0.0, help=argparse.SUPPRESS)  # child mode: block size
    p.add_argument("--single-run", type=int, default=None, help=argparse.SUPPRESS)  # child mode: the alternative
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.scale_run is not None:
        benchlib.write_json(a.json, scale_run(Path(a.root), a.scale_run, a.block_mib))
        return
    if a.single_run is not None:
        benchlib.write_json(a.json, single_process(Path(a.root), a.single_run, a.single_threads))
        return
    t0, load0 = time.time(), benchlib.load()

    cap = InferConfig().block_mib
    plan = [(n, cap) for n in a.sizes] + ([] if a.no_uncapped else [(a.sizes[-1], 0)])
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        root = Path(a.root or tmp)
        setup(root, a.items, a.sizes)
        runs = []
        for n, mib in plan:
            runs.append(benchlib.run_child("bench_infer.py",
                                           ["--root", str(root), "--scale-run", str(n), "--block-mib", str(mib)],
                                           root / f"scale_{n}_{mib}.json", timeout_s=1800))
            runs[-1]["block_mib"] = mib
            print(f"{n:,} users ({f'{mib:g} MiB blocks' if mib else 'uncapped blocks'}): {runs[-1]['users_per_s']:,.0f} users/s end to "
                  f"end, driver+workers peak RSS {runs[-1]['rss']['driver_plus_workers_mib']:,.0f} MiB", flush=True)
        single = {}
        for n in a.sizes:  # the alternative, each size in its own process, right after Ray's runs
            single[n] = benchlib.run_child("bench_infer.py", ["--root", str(root), "--single-run", str(n),
                                                              "--single-threads", str(a.single_threads)],
                                           root / f"single_{n}.json", timeout_s=1800)
            print(f"{n:,} users, single process ({a.single_threads} threads): {single[n]['users_per_s']:,.0f} users/s, "
                  f"peak RSS {single[n]['peak_rss_mib']:,.0f} MiB", flush=True)
    shipped = runs[: len(a.sizes)]
    label = {id(r): f"{r['users']:,}" + ("" if r["block_mib"] else " (uncapped blocks)")
             for r in runs}
    print(benchlib.table(
        f"Batch inference end to end (embed {a.items:,} items + user tower + exact top-{K} with seen masking + "
        "parquet write + manifest), Ray Data, 2 actors x 1 thread",
        ["users", "Ray start s", "embed items s", "score + write s", "users/s", "Ray worker processes seen"],
        [[label[id(r)], r["ray_start_s"], r["embed_s"], r["score_write_s"], r["users_per_s"],
          r["rss"]["worker_processes"]] for r in runs]), flush=True)
    mem_rows = [("driver", "driver_mib", "driver_private_mib"),
                ("largest Ray worker", "max_worker_mib", "max_worker_private_mib"),
                ("driver + all Ray workers (sum at one instant)", "driver_plus_workers_mib",
                 "driver_plus_workers_private_mib"),
                ("Ray infrastructure (raylet, GCS, agents)", "ray_infra_mib", None)]
    base = shipped[0]
    print(benchlib.table(
        "Peak memory of the inference path, MiB: RSS / private (RSS minus shared object-store pages); "
        f"growth vs {base['users']:,} users",
        ["process"] + [f"{label[id(r)]} users" for r in runs]
        + [f"growth {label[id(r)]}" for r in runs[1:]],
        [[name] + [f"{r['rss'][k]:,.0f} / " + (f"{r['rss'][kp]:,.0f}" if kp else "-") for r in runs]
         + [f"{r['rss'][k] / base['rss'][k]:.2f} / " + (f"{r['rss'][kp] / base['rss'][kp]:.2f}" if kp else "-")
            for r in runs[1:]]
         for name, k, kp in mem_rows]), flush=True)
    for r in runs[1:]:
        print(f"largest worker, {label[id(r)]} users: {r['rss']['max_worker_title']}", flush=True)
    first, last = shipped[0], shipped[-1]
    print(benchlib.table(
        f"Ray Data pipeline vs one batched process ({a.single_threads} threads: same model, same top-k, same output)",
        ["users", "Ray users/s", "single users/s", "Ray / single", "Ray peak RSS MiB (all)", "single peak RSS MiB"],
        [[label[id(r)], r["users_per_s"], single[r["users"]]["users_per_s"],
          r["users_per_s"] / single[r["users"]]["users_per_s"], r["rss"]["driver_plus_workers_mib"],
          single[r["users"]]["peak_rss_mib"]] for r in shipped]), flush=True)
    keys = ("driver_mib", "max_worker_mib", "driver_plus_workers_mib", "driver_private_mib",
            "max_worker_private_mib", "driver_plus_workers_private_mib")
    growth = {k: last["rss"][k] / first["rss"][k] for k in keys}
    name = ("infer_rss_growth_100k_to_1m" if (first["users"], last["users"]) == (100_000, 1_000_000)
            else f"infer_rss_growth_{first['users']}_to_{last['users']}")
    out = {"infer_vs_single_process": last["users_per_s"] / single[last["users"]]["users_per_s"],
           "infer_vs_single_process_smallest": first["users_per_s"] / single[first["users"]]["users_per_s"],
           name: growth["driver_plus_workers_mib"], "infer_rss_growth_parts": growth,
           "single_process_rss_growth": single[last["users"]]["peak_rss_mib"] / single[first["users"]]["peak_rss_mib"],
           "infer_users_per_s": {label[id(r)]: r["users_per_s"] for r in runs},
           "runs": runs, "single_process": {str(n): v for n, v in single.items()}, "items": a.items, "seq_len": SEQ,
           "k": K,
           "wall_s": time.time() - t0, "load_before": load0, "load_after": benchlib.load()}
    out["infer_block_mib"] = cap
    if not a.no_uncapped:
        v = runs[-1]
        out["infer_uncapped"] = {
            "block_mib": 0, "users": v["users"], "users_per_s": v["users_per_s"],
            "ours_vs_uncapped": last["users_per_s"] / v["users_per_s"],
            "rss_growth_vs_shipped_smallest": {k: v["rss"][k] / first["rss"][k] for k in keys}}
    benchlib.write_json(a.json, out)

if __name__ == "__main__":
    benchlib.setup_env()
    main()
