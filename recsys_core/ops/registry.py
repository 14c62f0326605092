"""Model registry in storage: versions, lineage, the PRODUCTION pointer, the promotion gate, retention.

Layout under ``storage.root``::

    models/<version>/    model.safetensors, model_config.json   the weights and how to rebuild them
                         metrics.json                          best epoch, per-epoch history, guard record
                         lineage.json                          input snapshot, catalog hash, code version,
                                                               parent model, warm start, run date, config,
                                                               tokenizer identifier
                         tokenizer/                            the tokenizer (save_pretrained files)
                         catalog.parquet                       item_id in item_idx order (what each row means)
                         refit/                                (train.refit) the published weights: the same
                                                               training again on every event, held-out ones
                                                               included; the folder's own weights are the
                                                               selection model the holdout and gate measured
                         _COMPLETE                             written last; only complete versions count
    models/PRODUCTION    {"version", "promoted_at", "run_date", "reason", "previous"}: one atomic write,
                         made only after the promotion gate passed

Versions are ``YYYYMMDD-HHMMSS[-suffix]`` (run date + wall-clock time of the train stage); they are
never derived from ids in the data, and they are validated before they become path components.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from safetensors.numpy import load, save

from recsys_core import storage
from recsys_core.data.text import load_tokenizer
from recsys_core.model.checkpoint import (
    CONFIG,
    MARKER,
    WEIGHTS,
    CheckpointError,
    copy_model_folder,
    marker_bytes,
    verify_checkpoint,
)

log = logging.getLogger(__name__)
POINTER = "PRODUCTION"
LINEAGE = "lineage.json"
METRICS = "metrics.json"
TOKENIZER = "tokenizer"
CATALOG = "catalog.parquet"
REFIT = "refit"
VERSION_RE = re.compile(r"^\d{8}-\d{6}(-[0-9a-z]{1,16})?$")
ID_EMB, ID_KNOWN = "item_tower.id_emb.weight", "item_tower.id_known"
TEXT_FEATURES = "item_tower.text_features"


def models_root(root: str) -> str:
    return storage.join(root, "models")


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ValueError(f"model version {version!r} is not YYYYMMDD-HHMMSS[-suffix]")
    return version


def version_dir(root: str, version: str) -> str:
    return storage.join(models_root(root), check_version(version))


def is_complete(root: str, version: str) -> bool:
    return storage.exists(storage.join(version_dir(root, version), MARKER))


def published_dir(root: str, version: str) -> str:
    """The weights a version publishes and describes with: its refit on every event when it has one,
    else the version's own (selection) weights."""
    refit = storage.join(version_dir(root, version), REFIT)
    return refit if storage.exists(storage.join(refit, MARKER)) else version_dir(root, version)


def new_version(root: str, run_date: str, now: float | None = None) -> str:
    """``YYYYMMDD-HHMMSS`` from the run date and the clock; a suffix when that folder already exists."""
    stamp = time.strftime("%H%M%S", time.gmtime(now if now is not None else time.time()))
    version = check_version(f"{run_date.replace('-', '')}-{stamp}")
    while storage.list_files(version_dir(root, version)):
        version = check_version(f"{run_date.replace('-', '')}-{stamp}-{uuid.uuid4().hex[:6]}")
    return version


def versions_in(paths: Iterable[str], marker: str) -> list[str]:
    """Complete versions among file paths below ``models/``: ``.../<version>/<marker>``, sorted oldest first."""
    out = set()
    for p in paths:
        parts = p.replace("\\", "/").rsplit("/", 2)
        if len(parts) == 3 and parts[2] == marker and VERSION_RE.match(parts[1]):
            out.add(parts[1])
    return sorted(out)


def list_versions(root: str) -> list[str]:
    """Complete versions (a ``_COMPLETE`` marker), oldest first (version ids sort by run date, then time)."""

    return versions_in(storage.list_files(models_root(root), MARKER), MARKER)


def incomplete_versions(root: str, run_date: str) -> list[str]:
    """This run date's version folders without a marker (left by a train stage that crashed mid-copy)
    or whose files do not match their marker's sizes (cut short after it, e.g. by a full disk). The
    production version is never among them."""

    prefix = run_date.replace("-", "") + "-"
    complete = set(list_versions(root))
    seen = set()
    for f in storage.list_files(models_root(root)):
        parts = f.replace("\\", "/").rsplit("/", 2)
        if len(parts) == 3 and VERSION_RE.match(parts[1]) and parts[1].startswith(prefix) and parts[2] != MARKER:
            seen.add(parts[1])
    broken = set()
    for v in sorted(complete & seen):
        try:
            verify_checkpoint(version_dir(root, v), hashes=False)
        except CheckpointError as e:
            log.warning("models/%s: %s", v, e)
            broken.add(v)
    pointer = storage.join(models_root(root), POINTER)
    prod = storage.read_json(pointer).get("version") if storage.exists(pointer) else None
    return sorted(((seen - complete) | broken) - {prod})


def production(root: str) -> dict[str, Any] | None:
    """The ``models/PRODUCTION`` pointer, or None before the first promotion."""
    uri = storage.join(models_root(root), POINTER)
    if not storage.exists(uri):
        return None
    pointer = storage.read_json(uri)
    if not isinstance(pointer, dict) or "version" not in pointer:
        raise ValueError(f"{uri}: not a production pointer (expected a JSON object with 'version')")
    check_version(pointer["version"])
    if not is_complete(root, pointer["version"]):
        raise FileNotFoundError(f"{uri} names version {pointer['version']!r}, which is not a complete "
                                f"model under {models_root(root)}")
    return pointer


def production_version(root: str) -> str | None:
    pointer = production(root)
    return pointer["version"] if pointer else None


def promote(root: str, version: str, run_date: str, reason: str, previous: str | None = None) -> dict[str, Any]:
    """Point ``models/PRODUCTION`` at a complete version (one atomic write)."""
    if not is_complete(root, version):
        raise FileNotFoundError(f"cannot promote {version!r}: {version_dir(root, version)} is not complete")
    verify_checkpoint(version_dir(root, version), hashes=False)  # sizes: a file cut short after the marker
    pointer = {"version": version, "run_date": run_date, "reason": reason, "previous": previous,
               "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_json(storage.join(models_root(root), POINTER), pointer)
    log.info("PRODUCTION -> %s (was %s): %s", version, previous, reason)
    return pointer


def retention_plan(versions: list[str], keep: int, protect: Iterable[str | None]) -> list[str]:
    """Versions to delete: all but the newest ``keep``, never a protected one (PRODUCTION, today's)."""
    if keep < 1:
        raise ValueError(f"registry.keep_versions must be >= 1, got {keep}")
    keep_set = set(sorted(versions)[-keep:]) | {p for p in protect if p}
    return [v for v in sorted(versions) if v not in keep_set]


def apply_retention(root: str, keep: int, protect: Iterable[str | None]) -> list[str]:
    doomed = retention_plan(list_versions(root), keep, protect)
    for v in doomed:
        storage.delete(version_dir(root, v))
    if doomed:
        log.info("retention (keep %d): deleted %s", keep, doomed)
    return doomed


def catalog_hash(ids: pa.Array) -> str:
    """sha256 of the item_id column in item_idx order (same ids in the same order <=> same hash)."""
    h = hashlib.sha256(str(ids.type).encode())
    if pa.types.is_integer(ids.type):
        h.update(np.asarray(ids.to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    else:
        h.update(json.dumps([None if v is None else str(v) for v in ids.to_pylist()]).encode())
    return h.hexdigest()


def id_map(old_ids: pa.Array, new_ids: pa.Array) -> np.ndarray:
    """(N_new,) int64: each new item's row in the old catalog, -1 for items the old model never had."""
    where = {v: i for i, v in enumerate(old_ids.to_pylist())}
    return np.asarray([where.get(v, -1) for v in new_ids.to_pylist()], dtype=np.int64)


def reindex_item_rows(weight: np.ndarray | None, known: np.ndarray, mapping: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Item-ID rows moved to a new catalog: weight (N_old, D) and known (N_old,) -> (N_new, D), (N_new,).

    An item the old model never had gets a zero ID vector and ``known = 0`` (embedded from text alone)."""
    has = mapping >= 0
    src = np.where(has, mapping, 0)
    new_known = np.where(has, known[src], 0.0).astype(known.dtype)
    new_weight = None
    if weight is not None:
        new_weight = np.where(has[:, None], weight[src], 0.0).astype(weight.dtype)
    return new_weight, new_known


def code_version() -> dict[str, str | None]:
    """The git commit when the code runs from a checkout, else None; always the package version."""

    try:
        package = metadata.version("recsys-core")
    except metadata.PackageNotFoundError:
        package = None
    commit = None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()):
            commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": commit, "package": package}


def save_tokenizer(name: str, model_dir: str) -> dict[str, Any]:
    """Copy the tokenizer into ``model_dir/tokenizer/`` (save_pretrained files: the version is usable
    without the hub, ``model.tokenizer`` may name that folder); returns its identifier and settings."""
    rec: dict[str, Any] = {"name": name}
    try:
        tok = load_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - the identifier alone still says what was used
        rec["load_error"] = f"{type(e).__name__}: {e}"[:300]
        return rec
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        storage.upload_dir(d, storage.join(model_dir, TOKENIZER))
    rec.update(folder=TOKENIZER, cls=type(tok).__name__, vocab_size=len(tok), eos_token=tok.eos_token,
               pad_token=tok.pad_token)
    return rec


def write_version_files(model_dir: str, lineage: dict[str, Any], item_ids: pa.Array) -> None:
    """lineage.json and catalog.parquet: written before the version's _COMPLETE marker."""
    storage.write_json(storage.join(model_dir, LINEAGE), lineage)
    storage.write_table(pa.table({"item_id": item_ids}), storage.join(model_dir, CATALOG))


def register_version(root: str, version: str, checkpoint: str, *, metrics: dict[str, Any],
                     lineage: dict[str, Any], item_ids: pa.Array, tokenizer: str, refit: str | None = None) -> str:
    """The one way a version enters the registry: metrics.json, lineage.json (with the tokenizer it
    used), catalog.parquet, tokenizer/, the refit's model files (``refit/``, marker last), the model
    files, and ``_COMPLETE`` last (a reader trusts a version only through its marker). Returns the
    version's folder."""
    model_dir = version_dir(root, version)
    storage.write_json(storage.join(model_dir, METRICS), metrics)
    write_version_files(model_dir, {**lineage, "tokenizer": save_tokenizer(tokenizer, model_dir)}, item_ids)
    if refit is not None:
        copy_model_folder(refit, storage.join(model_dir, REFIT))
    copy_model_folder(checkpoint, model_dir)  # the marker last
    return model_dir


def read_lineage(root: str, version: str) -> dict[str, Any] | None:
    uri = storage.join(version_dir(root, version), LINEAGE)
    return storage.read_json(uri) if storage.exists(uri) else None


def read_metrics(root: str, version: str) -> dict[str, Any] | None:
    uri = storage.join(version_dir(root, version), METRICS)
    return storage.read_json(uri) if storage.exists(uri) else None


def _canon(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif _canon(a) != _canon(b):
            out.append(f"{prefix}{k}")
    return out


def architecture(config: dict[str, Any]) -> dict[str, Any]:
    """What the weights' shapes and meaning depend on: the model section and the LoRA adapters."""
    return {"model": config.get("model", {}), "lora": config.get("guard", {}).get("lora", {})}


def warm_start_check(prod_lineage: dict[str, Any] | None, config: dict[str, Any]) -> tuple[bool, str]:
    """Can today's training start from the production model's weights? (ok, why)."""
    if prod_lineage is None:
        return False, "the production model has no lineage.json"
    diff = config_diff(architecture(prod_lineage.get("config", {})), architecture(config))
    if diff:
        return False, f"the model architecture changed since the production model: {diff}"
    return True, "same architecture"


def comparable_check(prod_lineage: dict[str, Any] | None, config: dict[str, Any]) -> tuple[bool, str]:
    """Can the production model score today's prepared items (same tokens, within its text window)?"""
    if prod_lineage is None:
        return False, "the production model has no lineage.json"
    old = prod_lineage.get("config", {}).get("model", {})
    new = config.get("model", {})
    if old.get("tokenizer") != new.get("tokenizer"):
        return False, f"tokenizer changed ({old.get('tokenizer')!r} -> {new.get('tokenizer')!r})"
    if int(new.get("max_text_tokens", 0)) > int(old.get("max_text_tokens", 0)):
        return False, (f"today's item texts are longer than the production model reads "
                       f"(max_text_tokens {new.get('max_text_tokens')} > {old.get('max_text_tokens')})")
    return True, "same tokenizer"


def on_catalog(root: str, version: str, item_ids: pa.Array, today_hash: str, workdir: str,
               published: bool = False) -> tuple[str, str]:
    """A model folder of ``version`` whose item rows follow today's catalog: the version's own folder
    (``published``: its :func:`published_dir`) when the catalogs match, else a re-indexed copy under
    ``workdir`` (items it never had: text only).

    Returns (model folder, note)."""


    src = published_dir(root, version) if published else version_dir(root, version)
    lineage = read_lineage(root, version) or {}
    if lineage.get("catalog", {}).get("sha256") == today_hash:
        return src, "same catalog"
    dest = storage.join(workdir, version + (f"-{REFIT}" if src != version_dir(root, version) else ""))
    old_ids = storage.read_table(storage.join(version_dir(root, version), CATALOG),
                                 columns=["item_id"])["item_id"].combine_chunks()
    mapping = id_map(old_ids, item_ids)
    note = (f"catalog changed: {int((mapping >= 0).sum())} of {len(mapping)} of today's items known to "
            f"{version}; the rest are embedded from text alone")
    if storage.exists(storage.join(dest, MARKER)):
        try:
            verify_checkpoint(dest, hashes=False)
            return dest, note
        except CheckpointError as e:  # cut short after its marker: made again below
            log.warning("re-indexed copy %s is incomplete (%s); rebuilding it", dest, e)
            storage.delete(dest)
    state = load(storage.read_bytes(storage.join(src, WEIGHTS)))
    weight, known = reindex_item_rows(state.get(ID_EMB), state[ID_KNOWN], mapping)
    if weight is not None:
        state[ID_EMB] = weight
    state[ID_KNOWN] = known
    if TEXT_FEATURES in state:  # a frozen item tower: its features are today's catalog's (the trainer refills them)
        state[TEXT_FEATURES] = reindex_item_rows(state[TEXT_FEATURES], known, mapping)[0]
    meta = json.loads(storage.read_bytes(storage.join(src, CONFIG)))
    meta["n_items"] = len(mapping)
    meta["reindexed_from"] = version
    files = {WEIGHTS: save({k: np.ascontiguousarray(v) for k, v in state.items()}),
             CONFIG: json.dumps(meta, indent=2, default=str).encode()}
    for name, data in files.items():
        storage.write_bytes(storage.join(dest, name), data)
    storage.write_bytes(storage.join(dest, MARKER), marker_bytes(files))
    log.info("%s", note)
    return dest, note
