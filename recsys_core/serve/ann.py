"""Approximate top-k by inner product with FAISS (IVF or HNSW), each user's seen items excluded.

For catalogs of millions of items, where exact scoring (:mod:`recsys_core.retrieval`, U x N x D
multiply-adds) is the bottleneck; the serving scorer uses it when ``infer.retrieval`` names an index.
FAISS is optional (``pip install faiss-cpu``; in the dev and bench extras) and imported only when an
index is built; the preflight checks it is there when the config asks for one.

Seen items: a FAISS search applies one filter to a whole query batch, so per-user exclusion is done
by over-fetching. Each block of users asks for ``k + q`` neighbours, ``q`` being a quantile of the
block's seen-list lengths; seen items are dropped; the few users left with fewer than ``k`` items
(long histories whose seen items crowd their top list) are searched again with ``k + len(seen)``,
which always leaves ``k`` unseen candidates when the index can return that many.

Conventions match :func:`recsys_core.retrieval.topk_excluding`: (U, k) int64 item indices and
float32 scores, best first, ``-1`` / ``-inf`` where fewer than ``k`` items were found.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class AnnSpec:
    kind: str = "ivf"  # ivf | hnsw | flat (exact FAISS search, the reference)
    nlist: int = 0  # ivf: coarse clusters; 0 = 4 * sqrt(N), at most N // 39 (FAISS wants 39 points per centroid)
    nprobe: int = 32  # ivf: clusters scanned per query
    train_size: int = 200_000  # ivf: items sampled to train the coarse quantizer
    hnsw_m: int = 32  # hnsw: graph degree
    ef_construction: int = 64
    ef_search: int = 128
    threads: int = 0  # FAISS OpenMP threads; 0 leaves FAISS's default
    seed: int = 0


def require_faiss() -> Any:
    try:
        import faiss  # optional dependency (the bench extra / faiss-cpu)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("recsys_core.ann needs FAISS: pip install faiss-cpu (or 'recsys-core[bench]')") from e
    return faiss


def default_nlist(n_items: int) -> int:
    """4 * sqrt(N) clusters (the FAISS guideline), at least 1 and at most N // 39 (enough training points each)."""
    return max(1, min(int(4 * math.sqrt(n_items)), n_items // 39))


def _flat(items: np.ndarray, spec: AnnSpec) -> Any:
    faiss = require_faiss()
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    return index


def _ivf(items: np.ndarray, spec: AnnSpec) -> Any:
    faiss = require_faiss()
    n, d = items.shape
    nlist = spec.nlist or default_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(spec.seed)
    sample = items if n <= spec.train_size else items[np.sort(rng.choice(n, spec.train_size, replace=False))]
    index.cp.seed = spec.seed
    index.train(sample)
    index.add(items)
    index.nprobe = min(spec.nprobe, nlist)
    return index


def _hnsw(items: np.ndarray, spec: AnnSpec) -> Any:
    faiss = require_faiss()
    index = faiss.IndexHNSWFlat(items.shape[1], spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = spec.ef_construction
    index.add(items)
    index.hnsw.efSearch = spec.ef_search
    return index


BUILDERS: dict[str, Callable[[np.ndarray, AnnSpec], Any]] = {"flat": _flat, "ivf": _ivf, "hnsw": _hnsw}


def drop_seen(idx: np.ndarray, scores: np.ndarray, seen: Sequence[np.ndarray], k: int,
              n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, k') candidates best first -> (u, k) without seen items or misses, and (u,) unseen counts found.

    Missing candidates (``-1``) and each user's seen items are removed; the remaining order is kept."""
    u = idx.shape[0]
    rows = np.repeat(np.arange(u, dtype=np.int64), idx.shape[1])
    keys = rows * n_items + idx.reshape(-1)  # (u * k',)
    lens = np.fromiter((len(s) for s in seen), dtype=np.int64, count=u)
    seen_keys = (np.repeat(np.arange(u, dtype=np.int64), lens) * n_items
                 + (np.concatenate([np.asarray(s, np.int64) for s in seen]) if u else np.zeros(0, np.int64)))
    drop = (np.isin(keys, seen_keys) | (idx.reshape(-1) < 0)).reshape(idx.shape)  # (u, k')
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept candidates first, in rank order
    out_idx = np.take_along_axis(idx, order, 1).astype(np.int64)
    out_scores = np.take_along_axis(scores, order, 1).astype(np.float32)
    gone = np.take_along_axis(drop, order, 1)
    out_idx[gone] = -1
    out_scores[gone] = -np.inf
    if out_idx.shape[1] < k:  # fewer candidates than k
        pad = k - out_idx.shape[1]
        out_idx = np.pad(out_idx, ((0, 0), (0, pad)), constant_values=-1)
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return out_idx, out_scores, (~drop).sum(1)


class AnnIndex:
    """A FAISS index over (N, D) item vectors, searched by inner product with seen items excluded."""

    def __init__(self, items: np.ndarray, spec: AnnSpec = AnnSpec()):
        if spec.kind not in BUILDERS:
            raise ValueError(f"ANN kind {spec.kind!r} unknown; choose one of {sorted(BUILDERS)}")
        faiss = require_faiss()
        if spec.threads:
            faiss.omp_set_num_threads(spec.threads)
        self.spec = spec
        self.n_items = int(items.shape[0])
        self.index = BUILDERS[spec.kind](np.ascontiguousarray(items, dtype=np.float32), spec)

    def _raw(self, users: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = self.index.search(users, min(kk, self.n_items))
        return idx, scores

    def search(self, users: np.ndarray, seen: Sequence[np.ndarray], k: int, block: int = 4096,
               overfetch_quantile: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """(U, D) user vectors -> (U, k) item indices int64 and scores float32, seen items excluded."""
        users = np.ascontiguousarray(users, dtype=np.float32)
        out_idx = np.full((len(users), k), -1, dtype=np.int64)
        out_scores = np.full((len(users), k), -np.inf, dtype=np.float32)
        lens = np.fromiter((len(s) for s in seen), dtype=np.int64, count=len(seen))
        for s in range(0, len(users), block):
            e = min(s + block, len(users))
            part = seen[s:e]
            extra = int(np.ceil(np.quantile(lens[s:e], overfetch_quantile))) if e > s else 0
            kk = min(k + extra, self.n_items)
            idx, scores = self._raw(users[s:e], kk)
            i, sc, found = drop_seen(idx, scores, part, k, self.n_items)
            # Users short of k whose search came back full may have more unseen items further down.
            retry = np.flatnonzero((found < k) & (idx[:, -1] >= 0) & (kk < self.n_items))
            if retry.size:
                kr = min(k + int(lens[s + retry].max()), self.n_items)
                ridx, rsc = self._raw(users[s + retry], kr)
                i[retry], sc[retry], _ = drop_seen(ridx, rsc, [part[r] for r in retry], k, self.n_items)
            out_idx[s:e], out_scores[s:e] = i, sc
        return out_idx, out_scores


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over users of |approx ∩ exact| / |exact| (valid entries only; users with no exact items skipped)."""
    per_user = [len(set(x[x >= 0].tolist()) & set(a[a >= 0].tolist())) / int((x >= 0).sum())
                for a, x in zip(approx, exact) if (x >= 0).any()]
    return float(np.mean(per_user)) if per_user else float("nan")
