"""All IO goes through here: local paths and ``s3://bucket/prefix`` URIs alike.

S3 endpoint, region and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or an
instance role).

Transient S3 errors are retried at two levels:

1. each HTTP request, by the AWS SDK's standard retry strategy (``S3_RETRY_ATTEMPTS`` attempts:
   503 SlowDown, 500 InternalError, other 5xx, dropped connections), in this process and in every
   Ray worker the filesystem is pickled to (:class:`RetryingS3FileSystem`);
2. each call of this module, when an error still escapes as a transient one
   (:func:`is_transient`). The SDK cannot retry every transient failure: the XML body of a 503
   answering a small ranged GET overflows the read buffer pyarrow hands it, and the SDK then
   reports a non-retryable ``INTERNAL_FAILURE ... Failed to flush response stream``. Every call
   here is idempotent (a write rewrites the whole object), so it is simply repeated.

Conditional writes (:func:`create_if_absent`, :func:`replace_if_match`: leases and the publish
switch) and whole-object reads of JSON documents replaced in place (:func:`read_json`: one GET, one
version) are the only boto3 calls of the project: pyarrow has no ``If-None-Match``/``If-Match``, and
its input stream reads an object's size and its bytes in separate requests. On a
local root they are made atomic with a hard link (create) and an ``flock`` on a hidden sidecar file
(compare-and-swap), which holds for every process of one machine. ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS``
in ``cluster/`` configure the boto3 clients Ray itself uses (e.g. to fetch an s3:// working_dir).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import logging
import os
import posixpath
import random
import socket
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
T = TypeVar("T")
S3_RETRY_ATTEMPTS = 10  # per HTTP request, inside the AWS SDK
CALL_RETRY_ATTEMPTS = 5  # per call of this module, for transient errors the SDK gave up on
CALL_RETRY_BASE_S = 0.2
CALL_RETRY_MAX_S = 10.0
# Substrings of pyarrow's OSError messages for failures worth repeating (the AWS SDK's error
# types, as Ray Data's DataContext.retried_io_errors lists them, plus the flush failure above).
TRANSIENT_MARKERS = (
    "AWS Error SLOW_DOWN",
    "AWS Error INTERNAL_FAILURE",
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error THROTTLING",
    "AWS Error REQUEST_TIMEOUT",
    "(HTTP status 500)",
    "(HTTP status 502)",
    "(HTTP status 503)",
    "(HTTP status 504)",
    "Failed to flush response stream",
)
# Never repeated, even inside a transient-looking error: a host name that does not resolve (curl's
# code 6) or credentials the server rejects do not get better in a minute.
PERMANENT_MARKERS = (
    "curlCode: 6",
    "Could not resolve host",
    "AWS Error ACCESS_DENIED",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "(HTTP status 401)",
    "(HTTP status 403)",
)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts under ``base``; a part may not climb out of it ('..') or restart it ('/...').

    Ids from the data never reach here: paths are built from fixed names, validated run dates and
    model versions only."""
    for p in parts:
        if ".." in p.split("/") or p.startswith(("/", "\\")):
            raise ValueError(f"refusing path component {p!r} (it would leave {base!r})")
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that keeps its retry policy when pickled.

    pyarrow pickles an ``S3FileSystem`` without its ``retry_strategy``, so the copy a Ray Data task
    or a Ray Train worker receives would fall back to pyarrow's default of 3 attempts. This one
    unpickles through :func:`_s3`, i.e. rebuilt with the same endpoint, region and retries (and
    credentials from the worker's own environment or instance role: none travel in the pickle)."""

    def __init__(self, endpoint: str | None, region: str):
        self._key = (endpoint, region)
        kwargs: dict[str, Any] = {
            "region": region,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS),
        }
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        super().__init__(**kwargs)

    def __reduce__(self) -> tuple[Any, tuple[str | None, str]]:
        return _s3, self._key


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str) -> RetryingS3FileSystem:
    if endpoint:
        resolve_endpoint(endpoint)
    return RetryingS3FileSystem(endpoint, region)


def resolve_endpoint(endpoint: str) -> None:
    """Fail at once when a custom endpoint's host name does not resolve: the AWS SDK counts that as a
    network error and retries each request (about 95 s at ``S3_RETRY_ATTEMPTS``), then this module's
    caller would see it again on every call. Not cached on failure (``_s3``'s cache skips exceptions)."""
    host = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"//{endpoint}").hostname
    if not host:
        return
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise OSError(f"S3 endpoint {endpoint}: Could not resolve host {host} ({e.strerror})") from None


def is_transient(err: BaseException) -> bool:
    """An S3 error that may succeed when repeated (throttling, 5xx, network); never 'not found', a host
    name that does not resolve, or rejected credentials."""
    if not isinstance(err, OSError) or isinstance(err, (FileNotFoundError, PermissionError)):
        return False
    text = str(err)
    return any(m in text for m in TRANSIENT_MARKERS) and not any(m in text for m in PERMANENT_MARKERS)


def backoff_s(attempt: int, base: float = CALL_RETRY_BASE_S, cap: float = CALL_RETRY_MAX_S) -> float:
    """Upper bound of the 'full jitter' delay before retry ``attempt`` (0-based): base * 2^attempt, capped."""
    return min(cap, base * 2.0 ** attempt)


def _retry(uri: str, what: str, fn: Callable[[], T]) -> T:
    """Run one idempotent S3 call, repeating it on transient errors; local calls run once."""
    if not is_s3(uri):
        return fn()
    for attempt in range(CALL_RETRY_ATTEMPTS):
        try:
            return fn()
        except OSError as e:
            if not is_transient(e) or attempt == CALL_RETRY_ATTEMPTS - 1:
                raise
            delay = random.uniform(0, backoff_s(attempt))
            log.warning("transient S3 error in %s %s (attempt %d of %d), retrying in %.2fs: %s",
                        what, uri, attempt + 1, CALL_RETRY_ATTEMPTS, delay, e)
            time.sleep(delay)
    raise AssertionError("unreachable")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). S3 paths come back without the ``s3://`` scheme."""
    if is_s3(uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return _s3(endpoint, region), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _retry(uri, "exists", lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def is_file(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _retry(uri, "is_file", lambda: fs.get_file_info(path).type == pafs.FileType.File)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return _retry(uri, "read", read)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: not found") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic for readers: a local write goes to a temp file then ``os.replace``; an S3 PUT is atomic."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    _retry(uri, "write", put)


def write_npy(uri: str, array: np.ndarray) -> None:
    """One .npy file (atomic for readers, like every write here)."""
    buf = io.BytesIO()
    np.save(buf, array)
    write_bytes(uri, buf.getvalue())


def read_npy(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(uri)))


def read_json(uri: str) -> Any:
    """A JSON document. On S3 it is one whole-object GET (:func:`read_versioned`): manifests, pointers and
    records are replaced in place, and pyarrow's stream (a HEAD for the size, then ranged GETs) can pair
    the old version's size with the new version's bytes: a torn read."""
    if is_s3(uri):
        got = read_versioned(uri)
        if got is None:
            raise FileNotFoundError(f"{uri}: not found")
        return json.loads(got[0])
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def list_files(uri: str, suffix: str = "") -> list[str]:
    """All files below ``uri`` (recursive), as URIs of the same kind, sorted."""
    fs, path = filesystem(uri)
    if not exists(uri):
        return []
    infos = _retry(uri, "list", lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def parquet_files(uri: str) -> list[str]:
    """A parquet file itself, or the parquet files below a folder/prefix in :func:`list_files` order
    (names under a ``_`` or ``.`` path part skipped), the files and order :func:`read_table` reads."""
    if is_file(uri):
        return [uri]
    base = uri.rstrip("/")
    return [f for f in list_files(uri, ".parquet")
            if not any(p.startswith(("_", ".")) for p in f[len(base) + 1:].split("/"))]


def parquet_totals(uri: str) -> tuple[int, int]:
    """(rows, uncompressed bytes) of a parquet file or the parquet files below ``uri``, from their footers;
    the bytes are roughly what reading them into memory takes. (0, 0) when there are none."""
    rows = size = 0
    for f in parquet_files(uri):
        meta = parquet_metadata(f)
        rows += meta.num_rows
        size += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return rows, size


def delete(uri: str) -> None:
    """Delete a file or a whole folder; missing is fine."""
    fs, path = filesystem(uri)

    def remove() -> None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)

    _retry(uri, "delete", remove)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (local or S3)."""
    local_dir = Path(local_dir)
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            write_bytes(join(uri, *f.relative_to(local_dir).parts), f.read_bytes())


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy the files below ``uri`` into ``local_dir``; an object key that would land outside it
    (``a/../../x``: S3 keys are plain strings) is refused."""
    local_dir = Path(local_dir)
    fs, root = filesystem(uri)
    files = list_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri}: no files")
    top = local_dir.resolve()
    for f in files:
        rel = posixpath.relpath(filesystem(f)[1], root)
        dest = local_dir / rel
        if not dest.resolve().is_relative_to(top):
            raise ValueError(f"{f}: refusing to download outside {local_dir}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(f))
    return local_dir


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A parquet file or a folder of parquet files (hive partitions become columns)."""
    fs, path = filesystem(uri)
    if not exists(uri):
        raise FileNotFoundError(f"{uri}: not found")
    return _retry(uri, "read_table", lambda: pq.read_table(path, filesystem=fs, columns=columns))


def iter_batches(uri: str, columns: list[str] | None = None, batch_rows: int = 65_536) -> Iterator[pa.Table]:
    """The rows of a parquet file or folder (:func:`parquet_files`, the order :func:`read_table` reads),
    as tables of at most ``batch_rows`` rows: a pass whose memory is one batch, not the table. Missing:
    FileNotFoundError. Opening a file is retried like every call here; a read failing midway is not
    (the SDK's own retries still apply)."""
    if not exists(uri):
        raise FileNotFoundError(f"{uri}: not found")
    for f in parquet_files(uri):
        with open_parquet(f) as pf:
            for b in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield pa.Table.from_batches([b])


@contextlib.contextmanager
def open_parquet(uri: str) -> Iterator[pq.ParquetFile]:
    """One parquet file opened once: its footer (``.metadata``) and its batches from the same handle."""
    fs, path = filesystem(uri)
    with _retry(uri, "open parquet", lambda: fs.open_input_file(path)) as fh:
        yield pq.ParquetFile(fh)


def take_rows(uri: str, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
    """Rows ``rows`` (sorted, distinct) of a parquet file or folder, read one batch at a time (never the
    whole table) and only until the last of them: ``read_table(uri, columns).take(rows)``."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and rows[0] < 0:
        raise IndexError(f"{uri}: row {rows[0]} asked")
    parts, start = [], 0
    for t in iter_batches(uri, columns):
        lo, hi = np.searchsorted(rows, [start, start + t.num_rows])
        parts.append(t.take(pa.array(rows[lo:hi] - start, pa.int64())))
        start += t.num_rows
        if hi == len(rows) and len(parts) > 0:
            break
    if len(rows) and rows[-1] >= start:
        raise IndexError(f"{uri}: row {rows[-1]} asked of a table of {start} rows")
    if not parts:  # no rows in the file(s): their schema, empty
        schema = parquet_schema(parquet_files(uri)[0])
        return schema.empty_table().select(columns) if columns is not None else schema.empty_table()
    return pa.concat_tables(parts)


def parquet_rows(uri: str) -> int:
    """Row count of one parquet file, from its footer (a small ranged read: retried like every call here)."""
    return parquet_metadata(uri).num_rows


def write_table(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def ray_location(uri: str) -> tuple[str, pafs.FileSystem]:
    """(path, filesystem) as Ray Data / Ray Train want them (S3 paths without the scheme)."""
    fs, path = filesystem(uri)
    return path, fs


def parquet_metadata(uri: str) -> pq.FileMetaData:
    """One parquet file's footer: schema, row count, row-group statistics (no data pages read)."""
    fs, path = filesystem(uri)
    return _retry(uri, "parquet footer", lambda: pq.ParquetFile(path, filesystem=fs).metadata)


def parquet_schema(uri: str) -> pa.Schema:
    """One parquet file's schema, from its footer only."""
    fs, path = filesystem(uri)
    return _retry(uri, "parquet_schema", lambda: pq.read_schema(path, filesystem=fs))


def column_names(uri: str) -> list[str]:
    """Column names of a parquet file or folder (its first file's footer; no data read)."""
    files = parquet_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri}: no parquet files")
    return parquet_schema(files[0]).names


def upload_file(local_path: str | Path, uri: str) -> None:
    """Copy a local file to ``uri`` so that readers see the old object or the whole new one: a local
    destination is written beside it under a hidden name, then renamed over; an S3 upload (multipart
    for large files) only becomes visible when it completes."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            pafs.copy_files(os.path.abspath(str(local_path)), tmp, destination_filesystem=fs)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    _retry(uri, "upload", lambda: pafs.copy_files(os.path.abspath(str(local_path)), path,
                                                  source_filesystem=pafs.LocalFileSystem(),
                                                  destination_filesystem=fs))


def copy_file(src: str, dest: str) -> None:
    """Copy one object within a store, atomically for readers of ``dest`` (S3: a server-side copy; local:
    a hidden copy renamed over)."""
    fs, spath = filesystem(src)
    dpath = filesystem(dest)[1]
    if isinstance(fs, pafs.LocalFileSystem):
        upload_file(spath, dest)
        return
    _retry(dest, "copy", lambda: fs.copy_file(spath, dpath))


# --- conditional writes ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _boto_s3(endpoint: str | None, region: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name=region,
                        config=botocore.config.Config(retries={"max_attempts": S3_RETRY_ATTEMPTS, "mode": "standard"}))


def _s3_client_and_key(uri: str) -> tuple[Any, str, str]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    bucket, _, key = uri[len("s3://"):].partition("/")
    return _boto_s3(endpoint, region), bucket, key


def _precondition_failed(err: botocore.exceptions.ClientError) -> bool:
    """412 (the condition did not hold) or 409 (a concurrent conditional write won)."""
    code = err.response.get("Error", {}).get("Code", "")
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _local_token(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """(content, version token) of an object, or None when it does not exist. The token is what
    :func:`replace_if_match` compares: the S3 ETag, or a local file's inode/mtime/size (every local
    write is a rename, so a new inode)."""
    if is_s3(uri):
        client, bucket, key = _s3_client_and_key(uri)
        try:
            obj = client.get_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return obj["Body"].read(), obj["ETag"]
    path = filesystem(uri)[1]
    with _local_lock(path):
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return f.read(), _local_token(path)


class _local_lock:
    """``flock`` on a hidden sidecar (``.<name>.lock``) for a local compare-and-swap."""

    def __init__(self, path: str):
        self.lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")

    def __enter__(self) -> "_local_lock":
        Path(self.lock_path).parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def create_if_absent(uri: str, data: bytes) -> bool:
    """Write ``data`` only when nothing exists at ``uri`` (S3 ``If-None-Match: *``); False when it does."""
    if is_s3(uri):
        client, bucket, key = _s3_client_and_key(uri)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except botocore.exceptions.ClientError as e:
            if _precondition_failed(e):
                return False
            raise
    path = filesystem(uri)[1]
    with _local_lock(path):
        if os.path.exists(path):
            return False
        write_bytes(path, data)
        return True


def replace_if_match(uri: str, data: bytes, token: str | None) -> bool:
    """Replace the object only while it is still the version ``token`` names (S3 ``If-Match``; None:
    only while it does not exist). False when another writer changed it first."""
    if token is None:
        return create_if_absent(uri, data)
    if is_s3(uri):
        client, bucket, key = _s3_client_and_key(uri)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=token)
            return True
        except botocore.exceptions.ClientError as e:
            if _precondition_failed(e) or e.response.get("Error", {}).get("Code") == "NoSuchKey":
                return False
            raise
    path = filesystem(uri)[1]
    with _local_lock(path):
        if not os.path.exists(path) or _local_token(path) != token:
            return False
        write_bytes(path, data)
        return True


def delete_if_match(uri: str, token: str) -> bool:
    """Delete the object only while it is the version ``token`` names (locally under the lock; on S3 a
    read-compare-delete: a writer slipping in between loses its object, the lease module's only use
    is releasing its own lease)."""
    if is_s3(uri):
        cur = read_versioned(uri)
        if cur is None or cur[1] != token:
            return False
        delete(uri)
        return True
    path = filesystem(uri)[1]
    with _local_lock(path):
        if not os.path.exists(path) or _local_token(path) != token:
            return False
        os.unlink(path)
        return True
