"""Exact top-k by inner product, chunked over users, with each user's seen items masked out."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def seen_mask_indices(seen: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user seen item lists -> (rows, cols) index tensors for masking a (U, N) score block."""
    lens = np.fromiter((len(s) for s in seen), dtype=np.int64, count=len(seen))
    rows = np.repeat(np.arange(len(seen)), lens)
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in seen]) if len(seen) else np.zeros(0, np.int64)
    return torch.from_numpy(rows), torch.from_numpy(cols)


def topk_block(scores: torch.Tensor, seen: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, N) scores -> (u, k) indices and scores; seen items excluded, missing slots are -1 / -inf."""
    scores = scores.float().clone()
    rows, cols = seen_mask_indices(seen)
    scores[rows.to(scores.device), cols.to(scores.device)] = float("-inf")
    k_eff = min(k, scores.size(1))
    val, idx = torch.topk(scores, k_eff, dim=1)  # (u, k_eff)
    val_np, idx_np = val.cpu().numpy(), idx.cpu().numpy()
    idx_np[~np.isfinite(val_np)] = -1
    if k_eff < k:
        pad = k - k_eff
        idx_np = np.pad(idx_np, ((0, 0), (0, pad)), constant_values=-1)
        val_np = np.pad(val_np, ((0, 0), (0, pad)), constant_values=-np.inf)
    return idx_np, val_np.astype(np.float32)


@torch.no_grad()
def topk_excluding(user_vecs: torch.Tensor, item_table: torch.Tensor, seen: Sequence[np.ndarray], k: int,
                   chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(U, D) users x (N, D) items -> top-k item indices (U, k) int64 and scores (U, k) float32."""
    parts = [topk_block(user_vecs[s:s + chunk] @ item_table.T, seen[s:s + chunk], k)
             for s in range(0, user_vecs.size(0), chunk)]
    if not parts:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def topk_from_scores(scores: np.ndarray, seen: Sequence[np.ndarray], k: int, chunk: int = 4096) -> np.ndarray:
    """Top-k item indices of a precomputed (U, N) score matrix (baselines), seen items excluded."""
    parts = [topk_block(torch.from_numpy(np.array(scores[s:s + chunk], dtype=np.float32)), seen[s:s + chunk], k)[0]
             for s in range(0, len(scores), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, k), np.int64)
