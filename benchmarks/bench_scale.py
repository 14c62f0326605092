"""Prepare at production scale: the Ray Data prepare stage vs a single-process pyarrow + numpy anchor.

    python benchmarks/bench_scale.py [--sizes 1000000 6500000 20000000] [--items 30000] [--days 30]
                                     [--nightly-sizes 1000000] [--per-user-events 200000]
                                     [--json benchmarks/results/scale.json]

Each size runs in a fresh process. It writes a generated log of that many events
(``data.sources.write_scale_log``: Zipf item popularity, Pareto user activity, ``--days`` daily hive
partitions, int64 ids, 0.1% exact duplicates, 0.05% unknown items; users = events / 21.7 as in the
issue's 6.5M events / 300k users), then times, in this order:

1. the anchor: one process, no Ray - pyarrow reads the partitions, drops unknown items and invalid
   rows, and the stage's own block functions (``build_histories``: one sort by (user, ts, item),
   duplicates, offsets into list arrays; ``_examples``; ``_train_counts``) run once over the whole
   table; users, examples and quarantine are written as parquet. The catalog is loaded and tokenised
   by the same ``load_catalog``;
2. ``run_prepare`` on a fresh local Ray cluster (the nightly's stage, unchanged), with its phase times
   (``stats["seconds"]``).

A sampler thread reads the RSS of the driver and every Ray process every 0.2 s; object-store spill
is read from ``ray memory --stats-only``. ``--nightly-sizes`` (sizes among ``--sizes``) then runs, in the same
Ray cluster, the whole nightly on that log (``NIGHTLY``: 1 epoch, sampled softmax, the holdout on a
sample of ``eval.max_users``) and records per stage its wall time, events/s, the peak RSS of driver and
workers (the sampler's segment per stage) and, after the job, the object store's spill. ``--per-user-events`` (0: off) also times, on a log of that
size, the previous history build (``groupby("user_id").map_groups(build_user)``, one Python call per
user) against the bucketed one (``groupby("bucket").map_groups(build_histories)``) on the same
validated rows in the same cluster.
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from recsys_core.config import NightlyConfig, RayConfig, load_config
from recsys_core.data.prepare import (
    PreparedPaths,
    _examples,
    _good_rows,
    _kept,
    _train_counts,
    build_histories,
    build_user,
    catalog_id_values,
    interaction_rows,
    load_catalog,
    read_validated,
    run_prepare,
)
from recsys_core.data.sources import LogShape, SourceData, write_scale_log
from recsys_core.data.split import MIN_EVENTS
from recsys_core.data.text import load_tokenizer
from recsys_core.pipeline import run_job
from recsys_core.runtime import init_ray

EVENTS_PER_USER = 6_500_000 / 300_000  # the log
# The whole nightly at scale (issue 17): one epoch of sampled softmax, larger batches than the test config's
# 16, the holdout on a sample of users (evaluate says so), no taste descriptions (random-init LM). The
# generated log has popularity but no tastes to learn, so a 1-epoch model does not beat popularity; with no
# baselines the gate promotes it and inference publishes every user (the stage this measures).
NIGHTLY = ["train.epochs=1", "train.loss=sampled_softmax", "train.batch_size=128", "eval.max_users=20000",
           "eval.baselines=[]", "explain.n_users=0"]
RUN_DATE = "2026-12-01"


def shape(n: int, items: int, days: int) -> LogShape:
    return LogShape(n_events=n, n_users=max(1, round(n / EVENTS_PER_USER)), n_items=items, n_days=days, seed=0)


def config(root: Path, src: SourceData, store: str = "store", extra: tuple[str, ...] = ()) -> NightlyConfig:
    return load_config(benchlib.REPO / "jobs" / "configs" / "synthetic.yaml", [
        f"storage.root={root / store}", "data.source=parquet", f"data.interactions={src.interactions}",
        f"data.items={src.items}", "data.item_template={title}. Topic: {genres}.", "model.max_seq_len=50", *extra])


class Laps:
    def __init__(self) -> None:
        self.t, self.seconds = time.perf_counter(), {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.t, 3)
        self.t = now


class CpuMeter:
    """CPU seconds (user + system) used by this process and its descendants (the local Ray cluster)
    between enter and exit: a measure that, unlike wall time, hardly moves with other users' load.
    Processes that exit before the end are not counted (Ray's workers stay alive)."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.cpu_s = 0.0
        self.parts: dict[str, float] = {}  # driver | workers (ray::*) | infra (raylet, GCS, agents)

    def _read(self) -> dict[tuple[int, float], tuple[str, float]]:
        out = {}
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                title = (p.cmdline() or [p.name()])[0]
                kind = "driver" if p.pid == self.me.pid else "workers" if title.startswith("ray::") else "infra"
                out[(p.pid, p.create_time())] = (kind, t.user + t.system)
            except psutil.Error:
                continue
        return out

    def __enter__(self) -> CpuMeter:
        self.start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        self.parts = {"driver": 0.0, "workers": 0.0, "infra": 0.0}
        for k, (kind, v) in self._read().items():
            self.parts[kind] += v - self.start.get(k, (kind, 0.0))[1]
        self.cpu_s = sum(self.parts.values())


def anchor(src: SourceData, cfg: NightlyConfig, out: Path) -> dict[str, Any]:
    """The single-process prepare: same outputs (users, examples, quarantine, train counts), no Ray."""
    lap = Laps()
    catalog = load_catalog(src.items, cfg)
    lap("catalog")
    t = pads.dataset(src.interactions, format="parquet", partitioning="hive").to_table(
        columns=["user_id", "item_id", "ts"])
    lap("read")
    item_idx = pc.index_in(t["item_id"], value_set=catalog["item_id"])  # null when unknown
    ts = t["ts"]
    bad = pc.or_(pc.or_(pc.is_null(t["user_id"]), pc.is_null(item_idx)),
                 pc.or_(pc.is_null(ts), pc.less(ts, 0)))
    good = pa.table({"user_id": pc.cast(t["user_id"], pa.string()), "item_idx": pc.cast(item_idx, pa.int32()), "ts": ts}).filter(
        pc.invert(pc.fill_null(bad, True)))
    rejected = t.filter(pc.fill_null(bad, True))
    lap("validate")
    users = build_histories(good, cfg.prepare.max_history)
    lap("histories")
    kept = _kept(users, max(cfg.prepare.min_user_interactions, MIN_EVENTS))
    examples = _examples(kept, cfg.model.max_seq_len)
    c = _train_counts(kept)
    counts = np.zeros(catalog.num_rows, dtype=np.int64)
    np.add.at(counts, c["item_idx"].to_numpy(), c["count"].to_numpy())
    lap("examples_and_counts")
    out.mkdir(parents=True, exist_ok=True)
    dup_len = pc.list_value_length(users["dup_items"]).to_numpy()
    pq.write_table(kept, out / "users.parquet")
    pq.write_table(examples, out / "train_examples.parquet")
    pq.write_table(rejected, out / "quarantine.parquet")
    pq.write_table(catalog.append_column("train_count", pa.array(counts)), out / "items.parquet")
    lap("write")
    return {"seconds": lap.seconds, "total_s": sum(lap.seconds.values()), "rows_read": t.num_rows,
            "rows_rejected": rejected.num_rows + int(dup_len.sum()), "users_kept": kept.num_rows,
            "train_examples": examples.num_rows, "train_interactions": int(counts.sum())}


class StageMarks(logging.Handler):
    """Starts an RSS segment when the pipeline logs "stage X started"."""

    def __init__(self, rss: benchlib.RssSampler) -> None:
        super().__init__(logging.INFO)
        self.rss = rss

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("stage ") and msg.endswith(" started"):
            self.rss.mark(msg.split()[1])


def nightly_run(root: Path, src: SourceData, n: int) -> dict[str, Any]:
    """The whole nightly (NIGHTLY overrides) on the log, in the running Ray cluster: per-stage wall time,
    events/s, peak RSS of driver + workers, and the spill after it."""
    cfg = config(root, src, store="nightly", extra=tuple(NIGHTLY))
    marks = logging.getLogger("recsys_core.pipeline")
    level = marks.level
    marks.setLevel(logging.INFO)  # the stage lines, whatever the benchmark's own logging
    with benchlib.RssSampler() as rss, CpuMeter() as cpu:
        handler = StageMarks(rss)
        marks.addHandler(handler)
        t = time.perf_counter()
        try:
            out = run_job("nightly", cfg, RUN_DATE, force=True)
        finally:
            marks.removeHandler(handler)
            marks.setLevel(level)
        wall = time.perf_counter() - t
    summary = rss.summary()
    segments = summary.pop("segments_mib", {})
    stages = {name: {"wall_s": rec["wall_s"], "events_per_s": n / rec["wall_s"] if rec["wall_s"] else None,
                     "peak_rss_mib": segments.get(name)} for name, rec in out.items()}
    spill, mem = spilled_mib()
    ev = out["evaluate"]["metrics"]
    return {"overrides": NIGHTLY, "wall_s": wall, "cpu_s": cpu.cpu_s, "stages": stages, "peak_rss": summary,
            "spilled_mib": spill, "memory_summary": mem, "published": out["infer"]["published"],
            "users_published": (out["infer"].get("manifest") or {}).get("rows"),
            "train": {"steps_per_rank": out["train"]["history"][-1].get("steps_per_rank"),
                      "examples": out["prepare"]["stats"]["train_examples"]},
            "holdout": {"users_scored": ev.get("users_scored"), "model_ndcg@10": ev["model"]["ndcg@10"],
                        "baselines_ndcg@10": {b: v["ndcg@10"] for b, v in ev["baselines"].items()}}}


def spilled_mib() -> tuple[float | None, str]:
    try:
        text = ray._private.internal_api.memory_summary(  # what `ray memory --stats-only` prints
            address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception as e:  # noqa: BLE001 - a reading, not the benchmark
        return None, f"memory_summary failed: {e!r}"[:200]
    m = re.search(r"Spilled ([\d.]+) MiB", text)
    return (float(m.group(1)) if m else 0.0), " ".join(text.split())[:400]


def per_user_vs_bucketed(root: Path, n: int, items: int, days: int) -> dict[str, Any]:
    """The previous history build (one call per user) vs the bucketed one, on the same validated rows."""
    src = write_scale_log(shape(n, items, days), str(root / f"log_{n}"))
    cfg = config(root, src)
    n_buckets = max(cfg.ray.shuffle_parallelism, math.ceil(n / cfg.prepare.bucket_rows))
    files, _ = interaction_rows(src, cfg)
    good = read_validated(files, cfg, catalog_id_values(load_catalog(src.items, cfg)), _good_rows,  # as run_prepare
                          n_buckets=n_buckets).materialize()
    out: dict[str, Any] = {"events": n, "rows_good": good.count(), "bucketed_runs_s": []}

    out["bucketed_runs_cpu_s"] = []

    def bucketed_run() -> ray.data.Dataset:
        t = time.perf_counter()
        with CpuMeter() as cpu:
            ds = good.groupby("bucket").map_groups(build_histories, batch_format="pyarrow",
                                                   fn_kwargs={"max_history": cfg.prepare.max_history}).materialize()
        out["bucketed_runs_s"].append(time.perf_counter() - t)
        out["bucketed_runs_cpu_s"].append(cpu.cpu_s)
        return ds

    bucketed = bucketed_run()  # before and after the per-user run: the first one also warms the workers
    t = time.perf_counter()
    with CpuMeter() as cpu:
        per_user = good.groupby("user_id").map_groups(build_user, batch_format="pyarrow",
                                                      fn_kwargs={"max_history": cfg.prepare.max_history}).materialize()
    out["per_user_s"], out["per_user_cpu_s"] = time.perf_counter() - t, cpu.cpu_s
    bucketed_run()
    out["bucketed_s"], out["bucketed_cpu_s"] = min(out["bucketed_runs_s"]), min(out["bucketed_runs_cpu_s"])
    out["users"] = bucketed.count()
    if per_user.count() != out["users"]:
        raise AssertionError(f"per-user build gave {per_user.count()} users, bucketed {out['users']}")
    out["per_user_vs_bucketed"] = out["per_user_s"] / out["bucketed_s"]
    out["per_user_vs_bucketed_cpu"] = out["per_user_cpu_s"] / out["bucketed_cpu_s"]
    return out


def scale_run(root: Path, n: int, items: int, days: int, per_user_events: int, nightly: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"events": n, "load_before": benchlib.load()}
    t = time.perf_counter()
    log_shape = shape(n, items, days)
    src = write_scale_log(log_shape, str(root / f"log_{n}"))
    res["generate_s"] = time.perf_counter() - t
    res["shape"] = vars(log_shape)
    res["log_mib_on_disk"] = sum(f.stat().st_size for f in Path(src.interactions).rglob("*.parquet")) / 2**20
    gc.collect()
    cfg = config(root, src)
    load_tokenizer(cfg.model.tokenizer)  # warm-up, untimed: the first import of transformers takes seconds
    with benchlib.RssSampler() as rss, CpuMeter() as cpu:
        res["anchor"] = anchor(src, cfg, root / f"anchor_{n}")
    res["anchor"]["rss"], res["anchor"]["cpu_s"] = rss.summary(), cpu.cpu_s
    gc.collect()

    os.environ["RAY_TMPDIR"] = str(root / "ray")
    t = time.perf_counter()
    try:
        init_ray(RayConfig())
    except Exception as e:  # noqa: BLE001 - on a loaded machine the raylet can miss its start deadline once
        print(f"Ray start failed ({e}); retrying once", flush=True)
        ray.shutdown()
        init_ray(RayConfig())
    res["ray_start_s"] = time.perf_counter() - t
    res["ray_cpus"] = ray.cluster_resources().get("CPU")
    with benchlib.RssSampler() as rss, CpuMeter() as cpu:
        t = time.perf_counter()
        stats = run_prepare(cfg, src, PreparedPaths(str(root / f"prepared_{n}")))
        res["prepare_s"] = time.perf_counter() - t
    res["prepare_rss"], res["prepare_cpu_s"], res["prepare_cpu_parts_s"] = rss.summary(), cpu.cpu_s, cpu.parts
    res["prepare_cpu_vs_anchor"] = cpu.cpu_s / res["anchor"]["cpu_s"]
    res["spilled_mib"], res["memory_summary"] = spilled_mib()
    res["prepare_stats"] = {k: v for k, v in stats.items() if k not in ("source", "interactions_uri", "items_uri")}
    res["prepare_rows_per_s"] = stats["rows_read"] / res["prepare_s"]
    res["anchor_rows_per_s"] = res["anchor"]["rows_read"] / res["anchor"]["total_s"]
    res["prepare_vs_anchor"] = res["prepare_s"] / res["anchor"]["total_s"]
    same = {k: (stats[k], res["anchor"][k]) for k in ("rows_read", "rows_rejected", "users_kept", "train_examples",
                                                        "train_interactions")}
    res["same_counts_as_anchor"] = all(a == b for a, b in same.values())
    res["counts_prepare_vs_anchor"] = same
    if nightly:
        res["nightly"] = nightly_run(root, src, n)
    if per_user_events:
        res["history_build"] = per_user_vs_bucketed(root, per_user_events, items, days)
    ray.shutdown()
    res["load_after"] = benchlib.load()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 6_500_000])
    p.add_argument("--items", type=int, default=30_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--per-user-events", type=int, default=200_000,
                   help="log size of the per-user vs bucketed history build comparison (smallest size's run); 0: off")
    p.add_argument("--nightly-sizes", type=int, nargs="*", default=[],
                   help="sizes (among --sizes) at which the whole nightly also runs on the log (NIGHTLY overrides)")
    p.add_argument("--nightly", action="store_true", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--timeout-s", type=float, default=1800, help="per size")
    p.add_argument("--root", default=None, help="data folder (default: a temporary one, removed at the end)")
    p.add_argument("--scale-run", type=int, default=None, help=argparse.SUPPRESS)  # child mode: one size
    p.add_argument("--json", default=str(benchlib.REPO / "benchmarks" / "results" / "scale.json"))
    a = p.parse_args()
    if a.scale_run is not None:
        benchlib.write_json(a.json, scale_run(Path(a.root), a.scale_run, a.items, a.days, a.per_user_events,
                                              a.nightly))
        return
    t0, load0 = time.time(), benchlib.load()
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(a.root or tmp)
        for i, n in enumerate(a.sizes):
            child = root / f"size_{n}"
            child.mkdir(parents=True, exist_ok=True)
            args = ["--root", str(child), "--scale-run", str(n), "--items", str(a.items), "--days", str(a.days),
                    "--per-user-events", str(a.per_user_events if i == 0 else 0),
                    *(["--nightly"] if n in a.nightly_sizes else [])]
            try:
                runs.append(benchlib.run_child("bench_scale.py", args, child / "run.json", timeout_s=a.timeout_s))
            except RuntimeError as e:  # a size past --timeout-s on a loaded machine: recorded, not fatal
                failed.append({"events": n, "error": str(e)[:2000]})
                print(f"{n:,} events: FAILED - {str(e)[:300]}", flush=True)
                continue
            r = runs[-1]
            print(f"{n:,} events: prepare {r['prepare_s']:.1f} s, anchor {r['anchor']['total_s']:.1f} s "
                  f"({r['prepare_vs_anchor']:.1f}x), same counts: {r['same_counts_as_anchor']}", flush=True)
            shutil.rmtree(child / f"log_{n}", ignore_errors=True)
    print(benchlib.table(
        "Prepare stage (read, validate, quarantine, histories, examples, writes) vs a single-process "
        "pyarrow + numpy anchor doing the same work, same log, same run",
        ["events", "users kept", "generate s", "anchor s", "Ray start s", "prepare s", "prepare / anchor",
         "anchor CPU s", "prepare CPU s (driver + Ray)", "CPU prepare / anchor",
         "prepare events/s", "anchor events/s", "prepare peak RSS driver+workers MiB", "anchor peak RSS MiB",
         "spilled MiB"],
        [[r["events"], r["prepare_stats"]["users_kept"], r["generate_s"], r["anchor"]["total_s"], r["ray_start_s"],
          r["prepare_s"], r["prepare_vs_anchor"], r["anchor"]["cpu_s"], r["prepare_cpu_s"],
          r["prepare_cpu_vs_anchor"], r["prepare_rows_per_s"], r["anchor_rows_per_s"],
          r["prepare_rss"]["driver_plus_workers_mib"], r["anchor"]["rss"]["driver_mib"],
          r["spilled_mib"] if r["spilled_mib"] is not None else "n/a"] for r in runs]), flush=True)
    phases = list(runs[0]["prepare_stats"]["seconds"])
    print(benchlib.table("Prepare phases, wall s (stats['seconds'])", ["events", *phases],
                         [[r["events"], *[r["prepare_stats"]["seconds"].get(k, "") for k in phases]] for r in runs]),
          flush=True)
    aphases = list(runs[0]["anchor"]["seconds"])
    print(benchlib.table("Anchor phases, wall s", ["events", *aphases],
                         [[r["events"], *[r["anchor"]["seconds"][k] for k in aphases]] for r in runs]), flush=True)
    for r in runs:
        if "nightly" in r:
            nr = r["nightly"]
            print(benchlib.table(
                f"Whole nightly on {r['events']:,} events ({' '.join(nr['overrides'])}): {nr['wall_s']:.0f} s, "
                f"spilled {nr['spilled_mib']} MiB",
                ["stage", "wall s", "events/s", "peak RSS driver+workers MiB", "peak RSS driver MiB",
                 "peak private driver+workers MiB", "peak PSS whole job MiB"],
                [[name, st["wall_s"], st["events_per_s"] or "",
                  (st["peak_rss_mib"] or {}).get("driver_plus_workers", ""),
                  (st["peak_rss_mib"] or {}).get("driver", ""),
                  (st["peak_rss_mib"] or {}).get("driver_plus_workers_private", ""),
                  (st["peak_rss_mib"] or {}).get("job_pss", "")] for name, st in nr["stages"].items()]), flush=True)
    hb = runs[0].get("history_build")
    if hb:
        print(benchlib.table(
            "History build alone on Ray Data, same validated rows: one call per user vs one per hash bucket",
            ["events", "users", "groupby(user_id).map_groups(build_user) s", "groupby(bucket).map_groups(build_histories) s", "ratio", "CPU s per-user", "CPU s bucketed", "CPU ratio"],
            [[hb["events"], hb["users"], hb["per_user_s"], hb["bucketed_s"], hb["per_user_vs_bucketed"],
              hb["per_user_cpu_s"], hb["bucketed_cpu_s"], hb["per_user_vs_bucketed_cpu"]]]), flush=True)
    if not runs:
        raise SystemExit(f"every size failed: {failed}")
    out: dict[str, Any] = {"cpu_model": benchlib.cpu_model(), "cores": os.cpu_count(), "runs": runs, "failed": failed,
                           "wall_s": time.time() - t0, "load_before": load0, "load_after": benchlib.load()}
    if len(runs) > 1:  # the largest size against the 6.5M events (or the smallest size)
        big = max(runs, key=lambda r: r["events"])
        small = next((r for r in runs if r["events"] == 6_500_000 and r is not big),
                     min(runs, key=lambda r: r["events"]))
        out["growth_between_events"] = [small["events"], big["events"]]
        out["prepare_cost_per_event_growth"] = (big["prepare_s"] / big["events"]) / (small["prepare_s"] / small["events"])
        out["prepare_cpu_per_event_growth"] = ((big["prepare_cpu_s"] / big["events"])
                                               / (small["prepare_cpu_s"] / small["events"]))
        out["prepare_rss_growth"] = (big["prepare_rss"]["driver_plus_workers_mib"]
                                     / small["prepare_rss"]["driver_plus_workers_mib"])
        if big["prepare_rss"].get("job_pss_mib") and small["prepare_rss"].get("job_pss_mib"):
            out["prepare_job_pss_growth"] = big["prepare_rss"]["job_pss_mib"] / small["prepare_rss"]["job_pss_mib"]
        if big.get("nightly") and small.get("nightly"):  # the whole job's peak: RSS sum, private, PSS
            b, s_ = big["nightly"]["peak_rss"], small["nightly"]["peak_rss"]
            out["nightly_peak_growth"] = {k: b[f"{k}_mib"] / s_[f"{k}_mib"]
                                          for k in ("driver_plus_workers", "driver_plus_workers_private", "job_pss")
                                          if b.get(f"{k}_mib") and s_.get(f"{k}_mib")}
    benchlib.write_json(a.json, out)


if __name__ == "__main__":
    benchlib.setup_env()
    main()
