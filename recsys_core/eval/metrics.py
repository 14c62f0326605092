"""Leave-one-out ranking metrics (single held-out item per user) with bootstrap CIs.

numpy only: callers hand in top-k item indices already computed (and masked) elsewhere.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Upper bound on bootstrap index entries drawn at once (~128 MiB of int64).
_BOOT_MAX_ENTRIES = 16_000_000


def _check_ks(ks: Sequence[int]) -> list[int]:
    """Validated, de-duplicated ks in the given order."""
    out: list[int] = []
    for k in ks:
        if int(k) != k or k < 1:
            raise ValueError(f"ks must be positive integers, got {k!r}")
        if int(k) not in out:
            out.append(int(k))
    if not out:
        raise ValueError("ks must be non-empty")
    return out


def _check_inputs(ranked: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ranked = np.asarray(ranked)
    target = np.asarray(target)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be 2-D (U, K), got shape {ranked.shape}")
    if target.ndim != 1 or target.shape[0] != ranked.shape[0]:
        raise ValueError(f"target must be (U,) = ({ranked.shape[0]},), got shape {target.shape}")
    return ranked, target


def target_ranks(ranked: np.ndarray, target: np.ndarray) -> np.ndarray:
    """ranked (U, K) item indices best-first, target (U,) -> (U,) 0-based rank of target in the list, or -1 if absent."""
    ranked, target = _check_inputs(ranked, target)
    hit = ranked == target[:, None]  # (U, K)
    if hit.shape[1] == 0:
        return np.full(hit.shape[0], -1, dtype=np.int64)
    first = hit.argmax(axis=1)  # (U,) first match, 0 when none
    return np.where(hit.any(axis=1), first, -1).astype(np.int64)


def per_user_metrics(
    ranked: np.ndarray, target: np.ndarray, ks: Sequence[int] = (10, 50)
) -> dict[str, np.ndarray]:
    """Per-user values (U,) for f"recall@{k}" (=HR@k, single held-out item), f"ndcg@{k}" (binary relevance, 1/log2(rank+2)), and "mrr@{max(ks)}" (1/(rank+1) if rank < max k else 0). Raises ValueError if ranked has fewer than max(ks) columns."""
    ks = _check_ks(ks)
    ranked, target = _check_inputs(ranked, target)
    k_max = max(ks)
    if ranked.shape[1] < k_max:
        raise ValueError(f"ranked has {ranked.shape[1]} columns, need at least max(ks)={k_max}")
    rank = target_ranks(ranked[:, :k_max], target)  # (U,) -1 = miss within top k_max
    found = rank >= 0  # (U,)
    pos = np.where(found, rank, 0).astype(np.float64)  # (U,) safe for log/div
    gain = np.where(found, 1.0 / np.log2(pos + 2.0), 0.0)  # (U,)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = found & (rank < k)  # (U,)
        out[f"recall@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, gain, 0.0)
    out[f"mrr@{k_max}"] = np.where(found, 1.0 / (pos + 1.0), 0.0)
    return out


def _resampled_means(arrays: tuple[np.ndarray, ...], n_boot: int, seed: int) -> tuple[np.ndarray, ...]:
    """(B,) means of each (n,) array over ``n_boot`` resamples of its n positions, the same positions for
    every array (np.random.default_rng(seed); indices drawn in row blocks to bound memory)."""
    n = arrays[0].shape[0]
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOT_MAX_ENTRIES // n)
    means = tuple(np.empty(n_boot, dtype=np.float64) for _ in arrays)
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))  # (b, n)
        for out, a in zip(means, arrays):
            out[start:stop] = a[idx].mean(axis=1)
    return means


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (vectorised: draw (n_boot, n) indices with np.random.default_rng(seed)).

    Indices are drawn in row blocks to bound memory; (0.0, 0.0) for empty input.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = values.shape[0]
    if n == 0:
        return 0.0, 0.0
    (means,) = _resampled_means((values,), n_boot, seed)  # (B,)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, alpha: float = 0.05,
             seed: int = 0) -> tuple[float, float, float]:
    """mean(num) / mean(den) and its paired percentile bootstrap CI: each resample draws the same users for
    both (``num`` and ``den``: (n,) per-user values of two rankers on the same users). Resamples whose
    ``den`` mean is 0 are left out; (nan, nan, nan) when every one is."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"ratio_ci: num {num.shape} and den {den.shape} must be the same 1-D shape")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = num.shape[0]
    if n == 0 or den.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    num_means, den_means = _resampled_means((num, den), n_boot, seed)  # (B,), (B,): the same users for both
    ratios = num_means[den_means > 0] / den_means[den_means > 0]
    low, high = np.quantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0]) if len(ratios) else (np.nan, np.nan)
    return float(num.mean() / den.mean()), float(low), float(high)


def summarize(
    ranked: np.ndarray,
    target: np.ndarray,
    ks: Sequence[int] = (10, 50),
    n_users_total: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of each per-user metric over n_users_total users (users missing from `ranked` count as misses, i.e. zeros padded), plus f"{name}_ci_low"/f"{name}_ci_high" from bootstrap, plus "n_users". Returns plain python floats (JSON-serialisable)."""
    ks = _check_ks(ks)
    ranked = np.asarray(ranked)
    target = np.asarray(target)
    n_eval = int(target.shape[0]) if target.ndim == 1 else -1
    if n_eval == 0:
        # No evaluated users: every metric is a miss; no column check needed.
        k_max = max(ks)
        names = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + [f"mrr@{k_max}"]
        per_user = {name: np.zeros(0, dtype=np.float64) for name in names}
    else:
        per_user = per_user_metrics(ranked, target, ks)
    n_total = n_eval if n_users_total is None else int(n_users_total)
    if n_total < n_eval:
        raise ValueError(f"n_users_total={n_total} < number of evaluated users {n_eval}")
    return summarize_values(per_user, n_total, n_boot=n_boot, seed=seed)


def summarize_values(
    per_user: dict[str, np.ndarray], n_users_total: int, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Means of per-user metric values over ``n_users_total`` (absent users are zeros) with bootstrap CIs."""
    out: dict[str, float] = {}
    for name, vals in per_user.items():
        vals = np.asarray(vals, dtype=np.float64)
        if len(vals) > n_users_total:
            raise ValueError(f"{name}: {len(vals)} values > n_users_total={n_users_total}")
        padded = np.zeros(n_users_total, dtype=np.float64)  # (N,) missing users = 0
        padded[: len(vals)] = vals
        low, high = bootstrap_ci(padded, n_boot=n_boot, seed=seed)
        out[name] = float(padded.mean()) if n_users_total > 0 else 0.0
        out[f"{name}_ci_low"] = low
        out[f"{name}_ci_high"] = high
    out["n_users"] = n_users_total
    return out
