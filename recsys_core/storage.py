"""All IO goes through here: local paths and ``s3://bucket/prefix`` URIs alike.

S3 endpoint, region and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or an
instance role). Transient S3 errors are retried by pyarrow's AWS standard retry strategy.
"""
from __future__ import annotations

import functools
import io
import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

S3_RETRY_ATTEMPTS = 10


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts; parts never contain '..' (ids from data never reach here)."""
    for p in parts:
        if ".." in p.split("/"):
            raise ValueError(f"refusing path component {p!r}")
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). S3 paths come back without the ``s3://`` scheme."""
    if is_s3(uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return _s3(endpoint, region), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
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
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def list_files(uri: str, suffix: str = "") -> list[str]:
    """All files below ``uri`` (recursive), as URIs of the same kind, sorted."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def delete(uri: str) -> None:
    """Delete a file or a whole folder; missing is fine."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (local or S3)."""
    local_dir = Path(local_dir)
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            write_bytes(join(uri, *f.relative_to(local_dir).parts), f.read_bytes())


def download_dir(uri: str, local_dir: str | Path) -> Path:
    local_dir = Path(local_dir)
    fs, root = filesystem(uri)
    files = list_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri}: no files")
    for f in files:
        rel = posixpath.relpath(filesystem(f)[1], root)
        dest = local_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(f))
    return local_dir


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A parquet file or a folder of parquet files (hive partitions become columns)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: not found")
    return pq.read_table(path, filesystem=fs, columns=columns)


def write_table(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def ray_location(uri: str) -> tuple[str, pafs.FileSystem]:
    """(path, filesystem) as Ray Data / Ray Train want them (S3 paths without the scheme)."""
    fs, path = filesystem(uri)
    return path, fs
