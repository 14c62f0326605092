"""Exact top-k by inner product, tiled over users and items, with each user's seen items masked out.

Scores are computed one (users x items) tile at a time into a reused buffer (no page faults on a
fresh multi-hundred-MB block per chunk, and catalogs of millions of items fit any memory), the
seen items of the tile's users are set to -inf in place, and each tile's top-k is merged into a
running top-k. The per-tile selection is two-stage for long rows (:func:`select_topk`), about half
the CPU cost of ``torch.topk`` over the whole row (0.7 vs 1.4 ns per score, 100k items, k=50).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

GROUP = 64  # columns per group in the two-stage selection
TILE_ITEMS = 131_072  # items per score tile (wider catalogs are merged tile by tile)
TILE_BYTES = 64 << 20  # float32 score tile budget: users per tile = TILE_BYTES / (4 * tile width)


def seen_mask_indices(seen: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user seen item lists -> (rows, cols) index tensors for masking a (U, N) score block."""
    lens = np.fromiter((len(s) for s in seen), dtype=np.int64, count=len(seen))
    rows = np.repeat(np.arange(len(seen)), lens)
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in seen]) if len(seen) else np.zeros(0, np.int64)
    return torch.from_numpy(rows), torch.from_numpy(cols)


def select_topk(scores: torch.Tensor, k: int, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact row-wise top-k of (r, w) scores: (r, min(k, w)) values, best first, and column indices.

    Long rows go in two stages: the max of every ``group`` consecutive columns, the k best groups
    (the k best values lie in at most k groups), then ``torch.topk`` over those groups' columns
    plus the ragged tail. The values equal ``torch.topk``'s; among equal values the columns may differ."""
    r, w = scores.shape
    k = min(k, w)
    n_groups = w // group
    if n_groups <= 4 * k:
        return torch.topk(scores, k, dim=1)
    scores = scores.contiguous()
    body = scores.as_strided((r, n_groups, group), (w, group, 1))  # (r, G, g) view of the first G*g columns
    _, gi = torch.topk(body.amax(2), k, dim=1, sorted=False)  # (r, k) best groups, any order
    cand = body.gather(1, gi.unsqueeze(-1).expand(r, k, group)).reshape(r, k * group)  # (r, k*g)
    cols = (gi.unsqueeze(-1) * group + torch.arange(group, device=scores.device)).reshape(r, k * group)
    val, j = torch.topk(cand, k, dim=1)
    cols = cols.gather(1, j)
    if w > n_groups * group:  # the ragged tail (< group columns) is merged with the body's top-k
        tail = torch.arange(n_groups * group, w, device=scores.device).expand(r, -1)
        val, j = torch.topk(torch.cat([val, scores[:, n_groups * group:]], 1), k, dim=1)
        cols = torch.cat([cols, tail], 1).gather(1, j)
    return val, cols


def _finish(val: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Device (u, k') values/indices -> numpy (u, k) int64 indices (-1 where nothing) and float32 scores."""
    val_np, idx_np = val.float().cpu().numpy(), idx.cpu().numpy().astype(np.int64)
    idx_np[~np.isfinite(val_np)] = -1
    if idx_np.shape[1] < k:
        pad = k - idx_np.shape[1]
        idx_np = np.pad(idx_np, ((0, 0), (0, pad)), constant_values=-1)
        val_np = np.pad(val_np, ((0, 0), (0, pad)), constant_values=-np.inf)
    return idx_np, val_np.astype(np.float32)


def topk_block(scores: torch.Tensor, seen: Sequence[np.ndarray], k: int,
               inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(u, N) scores -> (u, k) indices and scores; seen items excluded, missing slots are -1 / -inf.

    ``inplace=True`` masks ``scores`` itself (for a block nobody else reads)."""
    scores = scores.float()
    if not inplace:
        scores = scores.clone()
    rows, cols = seen_mask_indices(seen)
    scores[rows.to(scores.device), cols.to(scores.device)] = float("-inf")
    return _finish(*select_topk(scores, k), k)


def tile_shape(n_users: int, n_items: int, chunk: int, tile_items: int = TILE_ITEMS,
               tile_bytes: int = TILE_BYTES) -> tuple[int, int]:
    """(users, items) per score tile: items up to ``tile_items``, users up to ``chunk`` within the byte budget."""
    width = max(1, min(n_items, tile_items))
    return max(1, min(chunk, n_users, tile_bytes // (4 * width))), width


@torch.no_grad()
def topk_excluding(user_vecs: torch.Tensor, item_table: torch.Tensor, seen: Sequence[np.ndarray], k: int,
                   chunk: int = 1024, tile_items: int = TILE_ITEMS,
                   tile_bytes: int = TILE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """(U, D) users x (N, D) items -> top-k item indices (U, k) int64 and scores (U, k) float32."""
    n_users, n_items = user_vecs.size(0), item_table.size(0)
    if n_users == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    users, items = user_vecs.float(), item_table.float()
    rows, width = tile_shape(n_users, n_items, chunk, tile_items, tile_bytes)
    buf = torch.empty(rows * width, device=users.device)  # reused by every tile
    idx_parts, val_parts = [], []
    for s in range(0, n_users, rows):
        u = users[s:s + rows]  # (r, D)
        r = u.size(0)
        srow, scol = (t.to(users.device) for t in seen_mask_indices(seen[s:s + rows]))
        best_v = best_i = None
        for t0 in range(0, n_items, width):
            w = min(width, n_items - t0)
            tile = buf[: r * w].view(r, w)
            torch.mm(u, items[t0:t0 + w].T, out=tile)  # (r, w)
            inside = (scol >= t0) & (scol < t0 + w)
            tile[srow[inside], scol[inside] - t0] = float("-inf")
            v, i = select_topk(tile, k)
            i = i + t0
            if best_v is not None:  # merge with the earlier tiles' top-k
                v, j = torch.topk(torch.cat([best_v, v], 1), min(k, best_v.size(1) + v.size(1)), dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_v, best_i = v, i
        idx, val = _finish(best_v, best_i, k)
        idx_parts.append(idx)
        val_parts.append(val)
    return np.concatenate(idx_parts), np.concatenate(val_parts)


def topk_from_scores(scores: np.ndarray, seen: Sequence[np.ndarray], k: int, chunk: int = 4096) -> np.ndarray:
    """Top-k item indices of a precomputed (U, N) score matrix (baselines), seen items excluded."""
    parts = [topk_block(torch.from_numpy(np.array(scores[s:s + chunk], dtype=np.float32)), seen[s:s + chunk], k,
                        inplace=True)[0]
             for s in range(0, len(scores), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, k), np.int64)
