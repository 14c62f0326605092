"""Every CPU benchmark of the project, each against its alternative, in one command (about 10 minutes on 2 cores).

    python benchmarks/run_all.py --json benchmarks/results/results.json [--quick] [--only topk infer train] [--nightly]

Each area runs in its own process (its own local Ray cluster and memory) and prints its tables:
- train (bench_train.py): Ray Train (1 and 2 workers) vs a plain PyTorch loop; the nightly's per-stage wall times
- topk  (bench_topk.py):  exact torch top-k with seen masking vs FAISS IndexFlatIP; FAISS IVF/HNSW recall@10
                          (with --nightly also on the trained model's own vectors)
- infer (bench_infer.py): Ray Data batch inference users/s vs one batched process; peak RSS at 100k vs 1M users
The JSON holds the headline ratios at the top level, then each area's full results, the machine and
the load averages seen (other processes on the machine slow every wall-clock figure).
The GPU benchmarks are separate: benchmarks/gpu.py.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import benchlib
import ray

HEADLINES = ["train_ray_vs_plain", "train_ray2_vs_plain", "infer_vs_single_process", "topk_vs_faiss",
             "infer_rss_growth_100k_to_1m", "ann_recall_at_10", "ann_recall_at_10_trained"]
# name: (script, arguments for a full / quick run, timeout in seconds: generous, for a machine shared with others)
AREAS: dict[str, tuple[str, Callable[[bool], list[str]], int]] = {
    "topk": ("bench_topk.py", lambda quick: ["--quick"] if quick else [], 1800),
    "infer": ("bench_infer.py", lambda quick: ["--sizes", "20000", "50000", "--items", "2000"] if quick else [], 2400),
    "train": ("bench_train.py", lambda quick: ["--epochs", "2"] if quick else [], 2400),
}


def machine() -> dict[str, Any]:
    import faiss
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "faiss": faiss.__version__, "os": platform.platform()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every script (~5 min)")
    p.add_argument("--only", nargs="+", choices=sorted(AREAS), default=["train", "topk", "infer"])
    p.add_argument("--nightly", action="store_true",
                   help="train area: the whole nightly (every stage's wall time) instead of prepare + train")
    a = p.parse_args()
    t0 = time.time()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for name in a.only:
            script, args, timeout = AREAS[name]
            print(f"\n## {name} ({script})\n", flush=True)
            ts = time.time()
            extra = []
            if name == "train":  # its storage root stays for topk: ANN recall on the trained model's vectors
                extra = ["--root", str(Path(tmp) / "train_root")] + (["--nightly"] if a.nightly else [])
            elif name == "topk" and a.nightly and "train" in a.only:
                extra = ["--trained-root", str(Path(tmp) / "train_root")]
            results[name] = benchlib.run_child(script, args(a.quick) + extra, Path(tmp) / f"{name}.json", timeout)
            print(f"[{name}: {time.time() - ts:.0f} s, load averages before {results[name]['load_before']} "
                  f"after {results[name]['load_after']}]", flush=True)
    head = {k: v for r in results.values() for k, v in r.items() if k in HEADLINES}
    out = {**head, "quick": a.quick, "total_wall_s": time.time() - t0, "machine": machine(),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **results}
    print(benchlib.table("Headline figures", ["figure", "value"], [[k, head[k]] for k in HEADLINES if k in head]))
    print(f"total {out['total_wall_s']:.0f} s on {out['machine']['cpu']} ({out['machine']['cores']} cores)")
    benchlib.write_json(a.json, out)
    if a.json:
        print(f"wrote {a.json}")


if __name__ == "__main__":
    benchlib.setup_env()
    main()
