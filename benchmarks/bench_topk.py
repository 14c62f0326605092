"""Top-k retrieval: our exact torch top-k (seen items masked) vs FAISS IndexFlatIP, and FAISS IVF/HNSW recall.

    python benchmarks/bench_topk.py [--quick] [--trained-root ROOT [--only-trained]] [--json topk.json]

Exact: the same random (U, 64) users and (N, 64) items for both; FAISS has no per-query masking,
so it is asked for k + (seen per user) neighbours and the seen items are dropped afterwards (with
:func:`recsys_core.ann.drop_seen`, timed). One thread each, as in the inference actors, then two.

ANN: FAISS IVF-Flat (1M items) and HNSW (100k items: its build is slow on 2 cores) by inner
product vs exact search, recall@10 with 20 seen items per user masked, on clustered embeddings
(1,000 planted Gaussian clusters, noise as large as the spread of the centres: with nlist 1024 this
is IVF's best case), IVF on i.i.d. Gaussian vectors (no structure: the worst case for any ANN
index), and, with ``--trained-root``, IVF on a trained model's own item and user vectors (the
production model of a finished nightly; seen items = the users' real histories).

FAISS's flat search is several times slower per query when called with few queries at once
(``faiss_query_batches``); every exact case therefore runs both methods on the same, large batch.
"""
from __future__ import annotations

import argparse
import io
import time
from typing import Any

import benchlib
import numpy as np
import torch

from recsys_core import storage
from recsys_core.model.checkpoint import load_checkpoint
from recsys_core.model.towers import user_vectors
from recsys_core.ops import registry
from recsys_core.serve.ann import AnnIndex, AnnSpec, drop_seen, recall_at_k
from recsys_core.serve.retrieval import topk_excluding

DIM, K, SEEN = 64, 50, 30


def _data(n_users: int, n_items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n_items, DIM), dtype=np.float32)
    users = rng.standard_normal((n_users, DIM), dtype=np.float32)
    seen = [rng.choice(n_items, size=SEEN, replace=False) for _ in range(n_users)]
    return users, items, seen


def faiss_query_batches(n_items: int, batches: list[int]) -> list[dict[str, Any]]:
    """FAISS IndexFlatIP users/s (1 thread, CPU time) by the number of queries per search call, on the
    same items: its brute-force search is several times slower per query in small calls, which is
    what the 1M-item case measured when it ran with 512 users."""
    import faiss  # optional dependency (the bench extra)

    faiss.omp_set_num_threads(1)
    users, items, _ = _data(max(batches), n_items, seed=2)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(items)
    rows = []
    for nq in batches:
        _, cpu = benchlib.best_of(lambda: flat.search(users[:nq], K + SEEN), 1)
        rows.append({"items": n_items, "queries_per_call": nq, "faiss_users_s": nq / cpu})
    return rows


def exact_vs_faiss(n_users: int, n_items: int, threads: int, repeat: int) -> dict[str, Any]:
    import faiss  # optional dependency (the bench extra)

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    users, items, seen = _data(n_users, n_items)
    tu, ti = torch.from_numpy(users), torch.from_numpy(items)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(items)
    ours: dict[str, np.ndarray] = {}
    theirs: dict[str, np.ndarray] = {}

    def run_ours() -> None:
        ours["idx"], _ = topk_excluding(tu, ti, seen, K)

    def run_faiss() -> None:
        scores, idx = flat.search(users, K + SEEN)
        theirs["idx"], _, _ = drop_seen(idx, scores, seen, K, n_items)

    w_ours, c_ours = benchlib.best_of(run_ours, repeat)
    w_faiss, c_faiss = benchlib.best_of(run_faiss, repeat)
    agree = recall_at_k(ours["idx"], theirs["idx"])  # same top-k sets (ties aside)
    # One thread: CPU time (robust to other processes); two threads: wall time.
    t_ours, t_faiss = (c_ours, c_faiss) if threads == 1 else (w_ours, w_faiss)
    return {"users": n_users, "items": n_items, "threads": threads, "clock": "cpu" if threads == 1 else "wall",
            "ours_users_s": n_users / t_ours, "faiss_users_s": n_users / t_faiss, "ratio": t_faiss / t_ours,
            "ours_users_s_wall": n_users / w_ours, "faiss_users_s_wall": n_users / w_faiss, "agreement": agree}


def _clustered(n: int, centres: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, centres.shape[1]), np.float32)
    for s in range(0, n, 250_000):  # in slices: no (n, D) float64 temporaries
        e = min(n, s + 250_000)
        out[s:e] = centres[rng.integers(len(centres), size=e - s)]
        out[s:e] += noise * rng.standard_normal((e - s, centres.shape[1]), dtype=np.float32)
    return out


def trained_vectors(root: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], str]:
    """Item and user vectors of a trained model: the production version of a nightly under ``root``
    (its evaluated item embeddings, users from their full histories, seen items = the histories)."""
    version = registry.production_version(root)
    if version is None:
        raise SystemExit(f"{root}: no production model (run a nightly first)")
    model_dir = registry.version_dir(root, version)
    model, meta = load_checkpoint(model_dir)
    items = np.load(io.BytesIO(storage.read_bytes(storage.join(model_dir, "item_embeddings.npy"))))  # (N, D)
    run_date = registry.read_lineage(root, version)["run_date"]
    users_uri = storage.join(root, "runs", f"run_date={run_date}", "prepared", "users")
    hist = [np.asarray(h, np.int64) for h in storage.read_table(users_uri, columns=["items"])["items"].to_pylist()]
    users = user_vectors(model, torch.from_numpy(items), hist, int(meta["model"]["max_seq_len"])).numpy()  # (U, D)
    return items.astype(np.float32), users.astype(np.float32), hist, version


def ann_recall(kind: str, n_items: int, n_users: int, data: str, specs: list[AnnSpec],
               vectors: tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None = None) -> list[dict]:
    """Index built with 2 threads; exact and ANN searches on 1 thread, timed by CPU time. ``vectors``:
    given (items, users, seen) instead of generated ones (a trained model's)."""
    import faiss  # optional dependency (the bench extra)

    rng = np.random.default_rng(1)
    if vectors is not None:
        items, users, seen = vectors
        n_items, n_users = len(items), len(users)
    elif data == "clustered":
        centres = rng.standard_normal((1000, DIM), dtype=np.float32)
        items, users = _clustered(n_items, centres, 1.0, rng), _clustered(n_users, centres, 1.0, rng)
    else:
        items = rng.standard_normal((n_items, DIM), dtype=np.float32)
        users = rng.standard_normal((n_users, DIM), dtype=np.float32)
    if vectors is None:
        seen = [rng.choice(n_items, size=20, replace=False) for _ in range(n_users)]
    torch.set_num_threads(1)
    box: dict[str, np.ndarray] = {}
    _, exact_s = benchlib.best_of(lambda: box.update(exact=topk_excluding(
        torch.from_numpy(users), torch.from_numpy(items), seen, 10)[0]), 1)
    faiss.omp_set_num_threads(2)
    t = time.perf_counter()
    index = AnnIndex(items, specs[0])
    build_s = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    rows = []
    for spec in specs:
        if kind == "ivf":
            index.index.nprobe = spec.nprobe
        else:
            index.index.hnsw.efSearch = spec.ef_search
        _, search_s = benchlib.best_of(lambda: box.update(approx=index.search(users, seen, 10)[0]), 1)
        rows.append({"kind": kind, "data": data, "items": n_items, "users": n_users,
                     "param": f"nprobe={spec.nprobe}/nlist={index.index.nlist}" if kind == "ivf"
                     else f"efSearch={spec.ef_search}/M={spec.hnsw_m}",
                     "recall_at_10": recall_at_k(box["approx"], box["exact"]), "build_s": build_s,
                     "ann_users_s": n_users / search_s, "exact_users_s": n_users / exact_s,
                     "speedup_vs_exact": exact_s / search_s})
    return rows


def trained_case(root: str) -> dict[str, Any]:
    """IVF (sqrt(N) lists, nprobe 1-8) on the trained model's vectors under ``root``; the headline is the
    fastest setting with recall@10 >= 0.95 (else the most accurate)."""
    items_t, users_t, seen_t, version = trained_vectors(root)
    nl = max(8, int(round(np.sqrt(len(items_t)))))  # the usual sqrt(N) lists
    trained = ann_recall("ivf", 0, 0, f"trained ({version})",
                         [AnnSpec(kind="ivf", nlist=nl, nprobe=n, train_size=len(items_t)) for n in (1, 2, 4, 8)],
                         vectors=(items_t, users_t, seen_t))
    print(benchlib.table(
        f"FAISS IVF vs exact search on {version}'s own vectors, recall@10 (the users' histories masked; "
        "searches on 1 thread, CPU time)",
        ["items", "users", "setting", "recall@10", "build s", "ANN users/s", "exact users/s", "speed-up"],
        [[r["items"], r["users"], r["param"], r["recall_at_10"], r["build_s"], r["ann_users_s"], r["exact_users_s"],
          r["speedup_vs_exact"]] for r in trained]), flush=True)
    best = max((r for r in trained if r["recall_at_10"] >= 0.95), key=lambda r: r["speedup_vs_exact"],
               default=max(trained, key=lambda r: r["recall_at_10"]))
    return {"ann_trained": trained, "trained_root": root, "ann_recall_at_10_trained": best["recall_at_10"],
            "ann_trained_case": {k: best[k] for k in ("data", "items", "users", "param", "speedup_vs_exact")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument("--trained-root", default=None,
                   help="storage root of a finished nightly: also measure ANN recall on its trained model's vectors")
    p.add_argument("--only-trained", action="store_true",
                   help="with --trained-root: measure only the trained model's ANN recall (no generated cases)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    t0, load0 = time.time(), benchlib.load()
    if a.only_trained:
        if not a.trained_root:
            raise SystemExit("--only-trained needs --trained-root")
        out = trained_case(a.trained_root)
        benchlib.write_json(a.json, {**out, "wall_s": time.time() - t0, "load_before": load0,
                                     "load_after": benchlib.load()})
        return
    q = a.quick
    exact_cases = [(2048, 10_000, 1), (4096 if not q else 512, 100_000, 1), (4096 if not q else 256, 1_000_000, 1),
                   (4096 if not q else 512, 100_000, 2)]
    exact = [exact_vs_faiss(u, n, th, repeat=1 if q else 2 if n >= 1_000_000 else 3) for u, n, th in exact_cases]
    print(benchlib.table(
        "Exact top-50 with 30 seen items masked per user: ours (torch, tiled) vs FAISS IndexFlatIP (+ seen filter)",
        ["users", "items", "threads", "clock", "ours users/s", "FAISS users/s", "ours / FAISS", "same top-k"],
        [[r["users"], r["items"], r["threads"], r["clock"], r["ours_users_s"], r["faiss_users_s"], r["ratio"],
          r["agreement"]]
         for r in exact]), flush=True)

    batches = faiss_query_batches(1_000_000 if not q else 100_000, [512, 4096] if not q else [64, 512])
    print(benchlib.table("FAISS IndexFlatIP users/s by queries per search call (1 thread, CPU time)",
                         ["items", "queries per call", "FAISS users/s"],
                         [[r["items"], r["queries_per_call"], r["faiss_users_s"]] for r in batches]), flush=True)

    big = 1_000_000 if not q else 100_000
    nlist = 1024 if not q else 256
    ivf = ann_recall("ivf", big, 1000 if not q else 200, "clustered",
                     [AnnSpec(kind="ivf", nlist=nlist, nprobe=n, train_size=65_536) for n in (8, 16, 32, 64)])
    hn = 100_000 if not q else 20_000  # HNSW builds slowly on 2 cores (about 1 minute per 100k at M=32)
    hnsw = ann_recall("hnsw", hn, 1000 if not q else 200, "clustered",
                      [AnnSpec(kind="hnsw", hnsw_m=16, ef_construction=40, ef_search=e) for e in (64, 128, 256)])
    worst = ann_recall("ivf", 2 * hn, 500 if not q else 100, "iid-gaussian",
                       [AnnSpec(kind="ivf", nlist=512 if not q else 128, nprobe=n, train_size=65_536)
                        for n in (32, 128)])
    trained_out = trained_case(a.trained_root) if a.trained_root else {}
    trained = trained_out.get("ann_trained", [])
    ann_rows = ivf + hnsw + worst + trained
    print(benchlib.table(
        "FAISS ANN vs exact search, recall@10 (20 seen items masked per user; searches on 1 thread, CPU time; "
        "index built on 2 threads)",
        ["index", "data", "items", "setting", "recall@10", "build s", "ANN users/s", "exact users/s", "speed-up"],
        [[r["kind"], r["data"], r["items"], r["param"], r["recall_at_10"], r["build_s"], r["ann_users_s"],
          r["exact_users_s"], r["speedup_vs_exact"]] for r in ann_rows]), flush=True)

    headline_exact = next(r for r in exact if r["items"] == 100_000 and r["threads"] == 1)
    headline_ann = next(r for r in ivf if r["param"].startswith("nprobe=32"))
    out = {"topk_vs_faiss": headline_exact["ratio"],
           "topk_vs_faiss_case": {k: headline_exact[k] for k in ("users", "items", "threads")},
           "ann_recall_at_10": headline_ann["recall_at_10"],
           "ann_case": {k: headline_ann[k] for k in ("kind", "data", "items", "param", "speedup_vs_exact")},
           "exact": exact, "ann": ann_rows, "faiss_query_batches": batches, "wall_s": time.time() - t0, "load_before": load0,
           "load_after": benchlib.load()}
    out.update({k: v for k, v in trained_out.items() if k != "ann_trained"})
    benchlib.write_json(a.json, out)


if __name__ == "__main__":
    benchlib.setup_env()
    main()
