"""Publishing recommendations so that no reader ever sees a mix, a partial set or a stale count.

Layout of one date (``recommendations/run_date=D/``)::

    recommendations.parquet          the current generation, one row per user: the only data file
    _MANIFEST.json                   attempt, rows, users, model, metrics; the switch for manifest readers
    _generations/<attempt>.parquet   the current and the previous generation (what the manifests name)

    recommendations/_staging/run_date=D/<attempt>/part-*.parquet   Ray Data's parts while publishing

Why one data file: a folder of several objects cannot switch atomically on S3, so a reader that lists
the folder (``pyarrow.dataset``, ``pandas.read_parquet(folder)``, DuckDB
``read_parquet('<folder>/*.parquet')``, Spark, Athena) could see two generations or half of one. One
object can: an S3 upload or copy becomes visible only when it completes, and a local file is written
under a hidden name and renamed over. So a plain reader sees the old generation or the whole new one,
never both, also when a publish is killed. Names starting with ``_`` or ``.`` are skipped by those
readers (and ``*.parquet`` matches no other file); explanations live in ``explanations/run_date=D/``.

``publish``:

1. Ray Data writes the generation to its own staging folder (no other attempt writes there);
2. the staged parts are merged (streamed, a row group at a time) into one local file, counting rows
   and distinct users: rows == distinct users == the parts' footer row sum == the expected ``users``
   of the manifest, or nothing is switched;
3. the file is uploaded as ``_generations/<attempt>.parquet`` (immutable);
4. under the folder's publish lease (:mod:`recsys_core.ops.lease`) the manifest being replaced is
   read with its version and the new one is written conditionally on it (S3 ``If-Match``,
   ``If-None-Match: *`` for the first): the switch for manifest readers. Two overlapping publishes
   switch one after the other; each manifest names its own generation;
5. still under the lease, the generation is copied over ``recommendations.parquet`` (the switch for
   plain readers; a publish killed between 4 and 5 leaves plain readers on the previous generation,
   whole, until the rerun);
6. cleanup deletes only the generation named as previous by the manifest just replaced (two
   generations back: a slow manifest reader of the previous one can finish), the attempt's own
   staging folder, and staging folders and unnamed generations of attempts started more than
   ``stale_staging_s`` ago (killed publishes: an attempt still writing is never that old).

The attempt is also stored in each data file's parquet metadata; :func:`read_recommendations` checks
it against the manifest and that rows == users, and raises on any mismatch.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FilenameProvider

from recsys_core import storage
from recsys_core.ops import lease

log = logging.getLogger(__name__)
MANIFEST = "_MANIFEST.json"
DATA_FILE = "recommendations.parquet"
PUBLISH_LEASE = "_PUBLISH_LEASE.json"
GENERATIONS = "_generations"
ATTEMPT_KEY = b"recsys_core.attempt"
STALE_STAGING_S = 6 * 3600.0
PUBLISH_LEASE_TTL_S = 120.0
PUBLISH_LEASE_WAIT_S = 600.0


class PublishError(RuntimeError):
    """A publish that would expose wrong data was stopped, or a published folder does not verify."""


class _PartNames(FilenameProvider):
    """``part-<attempt>-<write uuid>-<task>.parquet`` inside the attempt's staging folder."""

    def __init__(self, attempt: str):
        super().__init__(file_format="parquet")
        self.attempt = attempt

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{self.attempt}-{write_uuid}-{task_index:05d}.parquet"


def new_attempt(now: dt.datetime | None = None) -> str:
    """``%Y%m%dT%H%M%S%f-<6 hex>``: sorts by start time, unique."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:6]


def attempt_started(attempt: str) -> float:
    """Epoch seconds an attempt id was made at."""
    return dt.datetime.strptime(attempt[:21], "%Y%m%dT%H%M%S%f").replace(tzinfo=dt.timezone.utc).timestamp()


def staging_dir(folder: str, attempt: str | None = None) -> str:
    """``<parent>/_staging/<run_date=D>/[<attempt>]``: beside the dated folders, outside their read path."""
    parent, name = folder.rstrip("/").rsplit("/", 1)
    base = storage.join(parent, "_staging", name)
    return storage.join(base, attempt) if attempt else base


def count_check(rows: int, distinct_users: int, footer_rows: int, expected_users: int | None) -> str | None:
    """Why a generation must not be switched to, or None when rows == users == the parts' row sum."""
    if rows != footer_rows:
        return f"merged {rows} rows but the parts' footers sum to {footer_rows}"
    if distinct_users != rows:
        return f"{rows} rows but {distinct_users} distinct users (a user appears more than once)"
    if expected_users is not None and rows != expected_users:
        return f"{rows} rows but the manifest expects users={expected_users}"
    return None


def merge_parts(parts: list[str], out_path: str, attempt: str) -> tuple[int, int]:
    """Stream the parts into one local parquet file tagged with ``attempt``; (rows, distinct user ids)."""
    writer: pq.ParquetWriter | None = None
    users: list[np.ndarray] = []
    rows = 0
    try:
        for uri in parts:
            fs, path = storage.filesystem(uri)
            pf = pq.ParquetFile(path, filesystem=fs)
            for i in range(pf.num_row_groups):
                t = pf.read_row_group(i)
                if writer is None:
                    schema = t.schema.with_metadata({**(t.schema.metadata or {}), ATTEMPT_KEY: attempt.encode()})
                    writer = pq.ParquetWriter(out_path, schema, compression="zstd")
                writer.write_table(t.replace_schema_metadata(writer.schema.metadata))
                rows += t.num_rows
                users.append(pc.cast(t["user_id"], pa.string()).to_numpy(zero_copy_only=False))
    finally:
        if writer is not None:
            writer.close()
    distinct = len(np.unique(np.concatenate(users))) if users else 0
    return rows, distinct


def generation(folder: str, attempt: str) -> str:
    return storage.join(folder, GENERATIONS, f"{attempt}.parquet")


def publish(ds: ray.data.Dataset, folder: str, manifest: dict[str, Any], stale_staging_s: float = STALE_STAGING_S,
            lease_wait_s: float = PUBLISH_LEASE_WAIT_S) -> dict[str, Any]:
    """Write ``ds`` as the date's new generation and switch readers to it (see the module doc).
    ``manifest["users"]``, when given, is the row count the generation must have."""
    attempt = new_attempt()
    stage = staging_dir(folder, attempt)
    path, fs = storage.ray_location(stage)
    ds.write_parquet(path, filesystem=fs, filename_provider=_PartNames(attempt))
    parts = storage.list_files(stage, ".parquet")
    footer_rows = sum(storage.parquet_rows(f) for f in parts)
    expected = manifest.get("users")
    with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        merged = os.path.join(tmp, DATA_FILE)
        rows, distinct = merge_parts(parts, merged, attempt) if parts else (0, 0)
        why = count_check(rows, distinct, footer_rows, None if expected is None else int(expected))
        if why or not rows:
            storage.delete(stage)
            raise PublishError(f"{folder}: not published (attempt {attempt}): {why or 'no rows'}")
        storage.upload_file(merged, generation(folder, attempt))
    storage.delete(stage)
    full = {**manifest, "attempt": attempt, "files": [f"{GENERATIONS}/{attempt}.parquet"], "rows": rows,
            "users": rows if expected is None else int(expected), "data_file": DATA_FILE}
    man_uri = storage.join(folder, MANIFEST)
    with lease.acquire(storage.join(folder, PUBLISH_LEASE), PUBLISH_LEASE_TTL_S, wait_s=lease_wait_s,
                       what=f"publishing {folder}", poll_s=0.2) as held:
        held.start_heartbeat()
        current = storage.read_versioned(man_uri)
        replaced = json.loads(current[0]) if current else {}
        full["previous_attempt"] = replaced.get("attempt")
        full["published_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        held.check()
        body = json.dumps(full, indent=2, sort_keys=True, default=str).encode()
        if not storage.replace_if_match(man_uri, body, current[1] if current else None):
            raise PublishError(f"{folder}: {MANIFEST} changed under the publish lease (attempt {attempt} not "
                               f"switched); rerun the publish")
        storage.copy_file(generation(folder, attempt), storage.join(folder, DATA_FILE))
    if replaced.get("previous_attempt"):
        storage.delete(generation(folder, replaced["previous_attempt"]))
    _clean_stale(folder, stale_staging_s, keep={attempt, replaced.get("attempt")})
    return full


def _clean_stale(folder: str, stale_s: float, keep: set[str | None]) -> None:
    """Delete staging folders and unnamed generations of attempts started over ``stale_s`` ago."""
    now = time.time()
    base = staging_dir(folder)
    found = {(storage.join(base, f[len(base):].strip("/").split("/", 1)[0]), f[len(base):].strip("/").split("/")[0])
             for f in storage.list_files(base)}
    gens = storage.join(folder, GENERATIONS)
    found |= {(f, f.rsplit("/", 1)[-1][:-len(".parquet")]) for f in storage.list_files(gens, ".parquet")}
    for uri, a in sorted(found):
        try:
            old = now - attempt_started(a) > stale_s
        except ValueError:
            continue  # not an attempt id: not ours to delete
        if old and a not in keep:
            log.info("removing %s: publish attempt %s started over %.0f s ago and was never switched to", uri, a,
                     stale_s)
            storage.delete(uri)


def verify(table_attempt: str | None, table_rows: int, manifest: dict[str, Any]) -> str | None:
    """Why a read does not match its manifest, or None."""
    if table_attempt != manifest.get("attempt"):
        return f"the data file is attempt {table_attempt}, the manifest names {manifest.get('attempt')}"
    if table_rows != manifest.get("rows") or table_rows != manifest.get("users"):
        return f"{table_rows} rows read, manifest says rows={manifest.get('rows')} users={manifest.get('users')}"
    return None


def _read_generation(uri: str, users: pa.Array | pa.ChunkedArray | None
                     ) -> tuple[pa.Table, int, dict[bytes, bytes] | None]:
    """(rows, the file's row count, its schema metadata) of one published file; ``users``: only their
    rows, filtered a batch at a time, count and metadata from the footer."""
    if users is None:
        table = storage.read_table(uri)
        return table, table.num_rows, table.schema.metadata
    with storage.open_parquet(uri) as pf:  # footer and rows from one handle: one generation, never a mix
        schema = pf.schema_arrow
        wanted = pc.cast(users, schema.field("user_id").type)
        parts = [pa.Table.from_batches([b]).filter(pc.is_in(b.column("user_id"), value_set=wanted))
                 for b in pf.iter_batches(batch_size=65_536)]  # one batch in memory at a time
        n_rows = pf.metadata.num_rows
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    return table, n_rows, schema.metadata


def read_recommendations(folder: str, retries: int = 2, retry_s: float = 0.2,
                         users: pa.Array | pa.ChunkedArray | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Read a published date through its manifest and check the data against it; raises
    :class:`PublishError` on any mismatch. A generation deleted under a slow reader (two publishes
    later) is read again from the new manifest. ``users``: only these users' rows, read a batch at a
    time (the check then reads the row count and tag from the file's footer)."""
    man_uri = storage.join(folder, MANIFEST)
    if not storage.exists(man_uri):
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; this run was never published")
    for attempt in range(retries + 1):
        manifest = storage.read_json(man_uri)
        files = manifest.get("files") or []
        if len(files) != 1 or not files[0].startswith(f"{GENERATIONS}/"):
            raise PublishError(f"{man_uri}: names files {files}; expected one {GENERATIONS}/<attempt>.parquet "
                               f"(an older layout: republish this date)")
        try:
            table, n_rows, meta = _read_generation(storage.join(folder, files[0]), users)
        except FileNotFoundError:
            if attempt == retries:
                raise
            time.sleep(retry_s)
            continue
        tagged = (meta or {}).get(ATTEMPT_KEY)
        why = verify(tagged.decode() if tagged else None, n_rows, manifest)
        if why:
            raise PublishError(f"{folder}: published data does not match {MANIFEST}: {why}")
        return table.replace_schema_metadata(None), manifest
    raise AssertionError("unreachable")
