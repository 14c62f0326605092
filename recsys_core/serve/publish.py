"""Atomic publishing of recommendations: parts, then the manifest that names them (the switch).

``publish`` writes ``part-<attempt>-*.parquet`` beside any older attempt's files, then the
``_MANIFEST.json`` listing exactly its files (the atomic switch), then deletes older parts.
Readers go through the manifest (:func:`read_recommendations`), so they never see a mix.
"""
from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import pyarrow as pa
import ray
from ray.data.datasource import FilenameProvider

from recsys_core import storage

MANIFEST = "_MANIFEST.json"


class _PartNames(FilenameProvider):
    """``part-<attempt>-<task>.parquet``: an attempt's files never collide with an older attempt's."""

    def __init__(self, attempt: str):
        super().__init__(file_format="parquet")
        self.attempt = attempt

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{self.attempt}-{write_uuid}-{task_index:05d}.parquet"


def publish(ds: ray.data.Dataset, folder: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``ds`` as ``folder/part-<attempt>-*.parquet`` and switch readers to it with one manifest write.

    The previous generation's files stay (a reader holding the old manifest can finish); the
    generation before that is deleted. Only files named by a manifest are ever deleted, so an
    overlapping publish never removes another attempt's fresh parts."""
    man_uri = storage.join(folder, MANIFEST)
    previous = storage.read_json(man_uri) if storage.exists(man_uri) else None
    # microseconds: a later attempt sorts later, even within one second (see part_attempt)
    attempt = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:6]
    path, fs = storage.ray_location(folder)
    ds.write_parquet(path, filesystem=fs, filename_provider=_PartNames(attempt))
    files = [f for f in storage.list_files(folder, ".parquet") if f.rsplit("/", 1)[-1].startswith(f"part-{attempt}-")]
    rows = sum(storage.parquet_rows(f) for f in files)
    full = {**manifest, "attempt": attempt, "files": [f.rsplit("/", 1)[-1] for f in files], "rows": rows,
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "previous_files": previous["files"] if previous else []}
    storage.write_json(man_uri, full)  # the atomic switch
    keep = set(full["files"]) | set(full["previous_files"])
    for uri in storage.list_files(folder, ".parquet"):
        name = uri.rsplit("/", 1)[-1]
        # Older attempts' parts that no manifest still names: the generation before the previous one,
        # and the parts of an attempt killed before its manifest (one publisher per date).
        if name.startswith("part-") and name not in keep and part_attempt(name) < attempt:
            storage.delete(uri)
    return full


def part_attempt(name: str) -> str:
    """``part-<attempt>-<write uuid>-<task>.parquet`` -> ``<attempt>`` (``%Y%m%dT%H%M%S%f-<6 hex>``: sorts by start)."""
    return name[len("part-"):len("part-") + len("20261127T020000123456-abcdef")]


def read_recommendations(folder: str) -> tuple[pa.Table, dict[str, Any]]:
    """Read a published run through its manifest; a folder without one is not trusted."""
    man_uri = storage.join(folder, MANIFEST)
    if not storage.exists(man_uri):
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; this run was never published")
    for attempt in range(2):  # a publish two generations later may delete files under a slow reader
        manifest = storage.read_json(man_uri)
        try:
            tables = [storage.read_table(storage.join(folder, f)) for f in manifest["files"]]
            return pa.concat_tables(tables) if tables else pa.table({}), manifest
        except FileNotFoundError:
            if attempt:
                raise
    raise AssertionError("unreachable")
