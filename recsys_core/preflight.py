"""Checks run before Ray starts: a job that cannot write its outputs or read its inputs fails in
seconds with one line naming the key or URI, not after minutes of cluster start-up and retries.

- ``storage.root``: absolute or ``s3://`` under ``ray job submit`` (a relative root would resolve
  inside Ray's unpacked working directory on the head's session temp folder); reachable and writable,
  proved by writing and deleting a probe object (S3: endpoint reachable, bucket exists, credentials
  accepted, put/delete allowed).
- input URIs named by the config (``data.interactions``/``data.items`` of the parquet source, guard
  corpora other than ``builtin``) exist.

S3 probes use their own filesystem with short timeouts and a single attempt per request: the
pipeline's filesystem retries each request ten times, which is right for a busy bucket and wrong
for a host name that does not resolve.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

from recsys_core import storage
from recsys_core.config import ConfigError, NightlyConfig
from recsys_core.serve.ann import require_faiss

PROBE_CONNECT_TIMEOUT_S = 3.0
PROBE_REQUEST_TIMEOUT_S = 5.0
PROBE_PREFIX = "_preflight-"  # probe objects sit directly under the root (pyarrow keeps an emptied parent as a
# folder marker, so a probe sub-folder would be left behind as an empty object)
# A pyarrow/AWS SDK message fragment -> what it means for the user (first match wins).
S3_DIAGNOSES: tuple[tuple[str, str], ...] = (
    ("resolve host", "the endpoint's host name does not resolve"),
    ("Name or service not known", "the endpoint's host name does not resolve"),
    ("Couldn't connect", "nothing answers at the endpoint"),
    ("Could not connect", "nothing answers at the endpoint"),
    ("Connection refused", "nothing answers at the endpoint"),
    ("Timeout was reached", "the endpoint did not answer in time"),
    ("InvalidAccessKeyId", "the access key is not valid"),
    ("SignatureDoesNotMatch", "the secret key does not match the access key"),
    ("ExpiredToken", "the session token has expired"),
    ("InvalidToken", "the session token is not valid"),
    ("ACCESS_DENIED", "access denied (credentials or bucket policy)"),
    ("AccessDenied", "access denied (credentials or bucket policy)"),
    ("HTTP status 403", "access denied (credentials or bucket policy)"),
    ("NoSuchBucket", "the bucket does not exist"),
)


class PreflightError(ConfigError):
    """A check before Ray starts failed; the message is one line naming the key or URI."""


@dataclass(frozen=True)
class Target:
    """A URI the job needs, and the config key that names it (for the message)."""

    key: str
    uri: str


def under_job_submit(cfg: NightlyConfig) -> bool:
    """True when the job attaches to an existing cluster (``ray job submit`` sets ``RAY_ADDRESS``)."""
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def check_root_form(cfg: NightlyConfig) -> None:
    root = cfg.storage.root
    if not root:
        raise PreflightError("storage.root is empty; pass an absolute path or an s3:// URI")
    if storage.is_s3(root) or os.path.isabs(root) or not under_job_submit(cfg):
        return
    where = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    raise PreflightError(
        f"storage.root={root!r} is relative, and this job runs on a Ray cluster ({where}): it would land in "
        f"Ray's temporary working directory; pass an absolute path or an s3:// URI (--set storage.root=...)")


def probe_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem on the pipeline's endpoint and region: one attempt per request, short timeouts."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict = {"region": region, "connect_timeout": PROBE_CONNECT_TIMEOUT_S,
                    "request_timeout": PROBE_REQUEST_TIMEOUT_S,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1)}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


def diagnose(err: BaseException) -> str:
    """A short reason for an S3 error, or the error's own first line."""
    text = str(err)
    for marker, meaning in S3_DIAGNOSES:
        if marker in text:
            return meaning
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _endpoint_note() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" (endpoint {endpoint})" if endpoint else ""


def _s3_call(key: str, uri: str, what: str, fn: Callable[[], object]) -> object:
    try:
        return fn()
    except OSError as e:
        raise PreflightError(f"{key}={uri}: cannot {what}: {diagnose(e)}{_endpoint_note()}") from None


def check_s3_root(key: str, uri: str, fs: pafs.S3FileSystem) -> None:
    """Bucket exists, then a probe object is written and deleted under the root."""
    path = uri[len("s3://"):].rstrip("/")
    bucket = path.split("/", 1)[0]
    info = _s3_call(key, uri, "reach the bucket", lambda: fs.get_file_info(bucket))
    if info.type == pafs.FileType.NotFound:
        raise PreflightError(f"{key}={uri}: bucket {bucket!r} does not exist{_endpoint_note()}")
    probe = f"{path}/{PROBE_PREFIX}{uuid.uuid4().hex}"

    def put() -> None:
        with fs.open_output_stream(probe) as f:
            f.write(b"recsys-core preflight probe\n")

    _s3_call(key, uri, "write a probe object", put)
    _s3_call(key, uri, "delete the probe object", lambda: fs.delete_file(probe))


def check_local_root(key: str, root: str) -> None:
    """The folder exists or can be created, and a probe file can be written and removed."""
    folder = Path(root).absolute()
    probe = folder / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"recsys-core preflight probe\n")
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"{key}={root}: not writable: {e.strerror or e}") from None


def inputs(cfg: NightlyConfig) -> list[Target]:
    """Input URIs the config names directly (demo sources are written under the root at run time)."""
    found: list[Target] = []
    if cfg.data.source == "parquet":
        found += [Target("data.interactions", cfg.data.interactions), Target("data.items", cfg.data.items)]
    for key, uri in (("guard.replay_corpus", cfg.guard.replay_corpus), ("guard.heldout_corpus", cfg.guard.heldout_corpus)):
        if uri != "builtin":
            found.append(Target(key, uri))
    return found


def check_input(target: Target, fs: pafs.S3FileSystem | None) -> None:
    if not target.uri:
        raise PreflightError(f"{target.key} is empty; it must name the input (a path or s3:// URI)")
    if storage.is_s3(target.uri):
        assert fs is not None
        path = target.uri[len("s3://"):].rstrip("/")
        info = _s3_call(target.key, target.uri, "read", lambda: fs.get_file_info(path))
        missing = info.type == pafs.FileType.NotFound
    else:
        missing = not os.path.exists(target.uri)
    if missing:
        raise PreflightError(f"{target.key}={target.uri}: not found")


def check_retrieval(cfg: NightlyConfig) -> None:
    """A FAISS retrieval (infer.retrieval) needs faiss importable here (the job's image)."""
    if cfg.infer.retrieval == "exact":
        return
    try:
        require_faiss()
    except ImportError:
        raise PreflightError(f"infer.retrieval={cfg.infer.retrieval} needs FAISS, which is not installed: "
                             "pip install faiss-cpu (or set infer.retrieval=exact)") from None


def preflight(cfg: NightlyConfig) -> None:
    """Every check above, in order; raises :class:`PreflightError` at the first failure."""
    check_root_form(cfg)
    check_retrieval(cfg)
    uris = [cfg.storage.root, *(t.uri for t in inputs(cfg))]
    fs = probe_filesystem() if any(storage.is_s3(u) for u in uris) else None
    if storage.is_s3(cfg.storage.root):
        assert fs is not None
        check_s3_root("storage.root", cfg.storage.root, fs)
    else:
        check_local_root("storage.root", cfg.storage.root)
    for target in inputs(cfg):
        check_input(target, fs)
