"""Storage and the whole pipeline against S3 (moto's server over HTTP, real pyarrow and boto3 clients),
also through a proxy that answers a share of the requests with S3's transient errors."""
from __future__ import annotations

import contextlib
import http.client
import os
import pickle
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import ray

import jobs.nightly
from recsys_core import storage
from recsys_core.config import load_config
from recsys_core.data.prepare import catalog_ids
from recsys_core.serve.publish import read_recommendations
from tests.conftest import REPO, S3_ENV


@pytest.mark.integration
def test_storage_roundtrip_on_s3_and_local(moto_s3, tmp_path):
    for root in ("s3://recsys-test/storage-test", str(tmp_path / "local")):
        storage.write_json(storage.join(root, "a", "x.json"), {"k": 1})
        storage.write_table(pa.table({"v": [1, 2]}), storage.join(root, "b", "t.parquet"))
        assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": 1}
        assert storage.read_table(storage.join(root, "b")).num_rows == 2
        assert [f.rsplit("/", 1)[-1] for f in storage.list_files(root)] == ["x.json", "t.parquet"]
        dl = storage.download_dir(storage.join(root, "a"), tmp_path / "dl" / str(abs(hash(root))))
        storage.upload_dir(dl, storage.join(root, "c"))
        assert storage.read_json(storage.join(root, "c", "x.json")) == {"k": 1}
        big = storage.join(root, "big", "t.parquet")  # 80,000 bytes of int64s that compress to almost nothing
        storage.write_table(pa.table({"v": pa.array(range(10_000), pa.int64())}), big)
        rows, n = storage.parquet_totals(storage.join(root, "big"))
        assert rows == 10_000 and 80_000 <= n < 200_000  # the values, plus a dictionary page
        assert len(storage.read_bytes(big)) < n / 2  # the file on disk is zstd-compressed
        assert storage.parquet_totals(storage.join(root, "missing")) == (0, 0)
        storage.delete(storage.join(root, "a"))
        assert not storage.exists(storage.join(root, "a", "x.json"))
    with pytest.raises(ValueError, match="refusing"):
        storage.join("s3://recsys-test/x", "../escape")


@pytest.mark.integration
def test_json_replaced_in_place_is_never_read_torn(moto_s3):
    """A document rewritten between a short and a long version while it is read (the manifest during
    two publishes): every read is one whole version, never the old size with the new bytes."""
    uri = "s3://recsys-test/torn/doc.json"
    versions = [{"v": "short"}, {"v": "long" * 200, "files": ["x" * 50] * 10}]
    storage.write_json(uri, versions[0])
    stop, seen, errors = threading.Event(), [], []

    def write() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            storage.write_json(uri, versions[i % 2])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(150):
            try:
                seen.append(storage.read_json(uri))
            except ValueError as e:  # a torn read fails to decode
                errors.append(repr(e))
    finally:
        stop.set()
        writer.join()
    assert not errors, errors[:3]
    assert all(doc in versions for doc in seen) and {d["v"][:4] for d in seen} == {"shor", "long"}


def bucket_keys(s3, prefix: str = "") -> list[str]:
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="recsys-test", Prefix=prefix)
            for o in page.get("Contents", [])]


@pytest.mark.integration
def test_nightly_pipeline_on_s3(ray_local, moto_s3, capfd):
    root = "s3://recsys-test/nightly"
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    keys_before = set(bucket_keys(s3))
    cfg = load_config(REPO / "jobs" / "configs" / "synthetic.yaml",
                      [f"storage.root={root}", "train.epochs=2", "eval.baselines=[popularity]",
                       "guard.eval_tokens=512", "guard.generate_tokens=4", "infer.retrieval=ivf"])
    out = jobs.nightly.main(cfg=cfg, run_date="2026-11-27")
    recs, manifest = read_recommendations(f"{root}/recommendations/run_date=2026-11-27")
    assert recs.num_rows == manifest["rows"] == out["prepare"]["stats"]["users_kept"]
    # served through a FAISS IVF index in every scorer actor (infer.retrieval), seen items still excluded
    assert manifest["metrics"]["retrieval"]["kind"] == "ivf" and manifest["metrics"]["retrieval"]["nprobe"] == 8
    users = storage.read_table(f"{root}/runs/run_date=2026-11-27/prepared/users", columns=["user_id", "items"])
    ids = catalog_ids(f"{root}/runs/run_date=2026-11-27/prepared/items.parquet").to_pylist()
    seen = {u: {ids[i] for i in h} for u, h in zip(users["user_id"].to_pylist(), users["items"].to_pylist())}
    lists = recs["item_ids"].to_pylist()
    assert all(len(r) == cfg.infer.k for r in lists)
    assert not any(set(r) & seen[u] for u, r in zip(recs["user_id"].to_pylist(), lists))

    # The real boto3 client sees what pyarrow wrote: manifest, parts, model registry, Ray Train checkpoints.
    keys = bucket_keys(s3, "nightly/")
    assert "nightly/recommendations/run_date=2026-11-27/_MANIFEST.json" in keys
    published = "nightly/recommendations/run_date=2026-11-27/"
    assert published + "recommendations.parquet" in keys and all(published + f in keys for f in manifest["files"])
    # staging removed (pyarrow may leave an empty folder marker, a key ending in "/")
    assert not [k for k in keys if k.startswith("nightly/recommendations/_staging/") and not k.endswith("/")]
    assert not any(k.endswith("_LEASE.json") for k in keys)  # the date's and the publish lease released
    version = out["train"]["model_version"]
    for name in ("model.safetensors", "model_config.json", "_COMPLETE", "metrics.json"):
        assert f"nightly/models/{version}/{name}" in keys
    assert any("/ray_train/" in k and k.endswith("model.safetensors") for k in keys)
    # Every write stayed under storage.root.
    assert {k for k in bucket_keys(s3) if k not in keys_before} == set(keys)

    # Credentials never reach any output: not an object (registry, reports, manifests, checkpoints,
    # stage records), not the job's own output, not a Ray log of the run.
    secrets = [S3_ENV["AWS_SECRET_ACCESS_KEY"].encode(), S3_ENV["AWS_ACCESS_KEY_ID"].encode()]
    kinds = Counter(k.rsplit("/", 1)[-1].rsplit(".", 1)[-1] for k in keys)
    for k in keys:
        body = s3.get_object(Bucket="recsys-test", Key=k)["Body"].read()
        assert not any(s in body for s in secrets), k
    captured = capfd.readouterr()
    logs = [p for p in Path(os.environ["RAY_TMPDIR"]).rglob("*") if p.is_file() and "/logs/" in str(p)]
    texts = {"stdout": captured.out.encode(), "stderr": captured.err.encode(),
             **{str(p): p.read_bytes() for p in logs}}
    for where, text in texts.items():
        assert not any(s in text for s in secrets), where
    print(f"searched {len(keys)} objects ({dict(kinds)}), the job's stdout/stderr and {len(logs)} Ray log files")


# ----------------------------------------------------------------------------- transient S3 errors

# What S3 sends when it throttles or fails internally (status, code, message).
FAULTS = {503: ("SlowDown", "Please reduce your request rate."),
          500: ("InternalError", "We encountered an internal error. Please try again.")}
Policy = Callable[[int, str, str], int | None]  # (request number, method, path) -> fault status or None


class FlakyS3(ThreadingHTTPServer):
    """An HTTP proxy in front of moto that answers the requests ``policy`` picks with an S3 error."""

    daemon_threads = True

    def __init__(self, upstream: str, policy: Policy):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream, self.policy = upstream.removeprefix("http://"), policy
        self.lock = threading.Lock()
        self.requests = 0
        self.injected: Counter[tuple[int, str]] = Counter()  # (status, method) -> count

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def decide(self, method: str, path: str) -> int | None:
        with self.lock:
            self.requests += 1
            status = self.policy(self.requests, method, path)
            if status:
                self.injected[(status, method)] += 1
            return status


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FlakyS3

    def log_message(self, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return out
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, length: int) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()  # read the request first, so the connection stays usable after a fault
        status = self.server.decide(self.command, self.path)
        if status:
            code, message = FAULTS[status]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                   f"<RequestId>injected</RequestId></Error>").encode()
            self._reply(status, [("Content-Type", "application/xml")], xml, 0 if self.command == "HEAD" else len(xml))
            return
        conn = http.client.HTTPConnection(self.server.upstream, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect", "connection")}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        keep = [(k, v) for k, v in r.getheaders() if k.lower() not in ("transfer-encoding", "connection", "content-length")]
        length = int(r.getheader("Content-Length") or 0) if self.command == "HEAD" else len(data)
        self._reply(r.status, keep, data, length)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


@contextlib.contextmanager
def flaky_s3(upstream: str, policy: Policy) -> Iterator[FlakyS3]:
    """Point AWS_ENDPOINT_URL (so storage.*) at a fault-injecting proxy for the duration."""
    proxy = FlakyS3(upstream, policy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    old = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    try:
        yield proxy
    finally:
        os.environ["AWS_ENDPOINT_URL"] = old
        proxy.shutdown()
        proxy.server_close()


def every_third_per_method() -> Policy:
    """The 3rd, 6th, 9th, ... request of each HTTP method fails: alternately 500 InternalError and 503 SlowDown."""
    seen: Counter[str] = Counter()

    def policy(n: int, method: str, path: str) -> int | None:
        seen[method] += 1
        return None if seen[method] % 3 else (503 if seen[method] % 6 == 0 else 500)
    return policy


@pytest.mark.integration
def test_storage_loses_nothing_through_transient_s3_errors(moto_s3, tmp_path):
    root = "s3://recsys-test/flaky"
    table = pa.table({"user_id": list(range(2000)), "item_ids": [[i, i + 1] for i in range(2000)]})
    folder = tmp_path / "folder"
    files = {"a.json": b'{"k": 1}', "sub/b.bin": os.urandom(1 << 16), "sub/deep/c.txt": b"text\n",
             "big.bin": os.urandom(6 << 20)}  # 6 MiB: a multipart upload
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)

    with flaky_s3(moto_s3, every_third_per_method()) as proxy:
        storage.write_table(table, storage.join(root, "t", "part-0.parquet"))
        storage.write_json(storage.join(root, "m.json"), {"rows": 2000})
        storage.write_bytes(storage.join(root, "raw.bin"), b"\x00\x01" * 1000)
        storage.upload_dir(folder, storage.join(root, "dir"))
        got_table = storage.read_table(storage.join(root, "t"))
        got_rows = storage.parquet_rows(storage.join(root, "t", "part-0.parquet"))
        got_json = storage.read_json(storage.join(root, "m.json"))
        got_raw = storage.read_bytes(storage.join(root, "raw.bin"))
        listed = storage.list_files(storage.join(root, "dir"))
        back = storage.download_dir(storage.join(root, "dir"), tmp_path / "back")
        storage.delete(storage.join(root, "raw.bin"))
        storage.delete(storage.join(root, "dir"))
        gone = (storage.exists(storage.join(root, "raw.bin")), storage.list_files(storage.join(root, "dir")))

    print(f"{proxy.requests} requests through the proxy, faults injected: {dict(proxy.injected)}")
    assert {s for s, _ in proxy.injected} == {500, 503}
    assert {m for _, m in proxy.injected} >= {"GET", "PUT", "HEAD", "POST"}
    assert got_table.equals(table) and got_rows == 2000
    assert got_json == {"rows": 2000} and got_raw == b"\x00\x01" * 1000
    assert [u.split("/dir/", 1)[1] for u in listed] == sorted(files)
    assert {str(p.relative_to(back)): p.read_bytes() for p in back.rglob("*") if p.is_file()} == files
    assert gone == (False, [])


@pytest.mark.unit
def test_transient_errors_are_told_apart():
    transient = [
        "AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate.",
        "AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream (eof: 0, bad: 1)",
        "When reading information for key 'k' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) during HeadObject",
        "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 28, Timeout was reached",
    ]
    permanent = ["AWS Error ACCESS_DENIED during PutObject operation: Access Denied",
                 "AWS Error NO_SUCH_BUCKET during ListObjectsV2", "Path does not exist 'b/k'"]
    assert all(storage.is_transient(OSError(m)) for m in transient)
    assert not any(storage.is_transient(OSError(m)) for m in permanent)
    assert not storage.is_transient(FileNotFoundError("AWS Error SLOW_DOWN"))
    assert not storage.is_transient(ValueError("AWS Error SLOW_DOWN"))
    assert [storage.backoff_s(a, base=0.2, cap=1.0) for a in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]


def first_attempts_fail(n_failing: int, method: str) -> Policy:
    """The first ``n_failing`` attempts of every ``method`` request (per path) get 503 SlowDown."""
    seen: Counter[str] = Counter()

    def policy(n: int, m: str, path: str) -> int | None:
        if m != method:
            return None
        seen[path] += 1
        return 503 if seen[path] <= n_failing else None
    return policy


@ray.remote
def _put_from_worker(fs: pafs.FileSystem, path: str) -> str:
    try:
        with fs.open_output_stream(path) as f:
            f.write(b"payload")
        return "ok"
    except OSError as e:
        return f"failed: {e}"


@pytest.mark.integration
def test_s3_retries_survive_pickling_to_ray_workers(ray_local, moto_s3):
    """pyarrow pickles an S3FileSystem without its retry strategy (a worker's copy makes 3 attempts);
    ours is rebuilt with S3_RETRY_ATTEMPTS, so a write whose first 3 attempts fail still lands."""
    with flaky_s3(moto_s3, first_attempts_fail(3, "PUT")) as proxy:
        ours = storage.filesystem("s3://recsys-test/pickled")[0]
        plain = pafs.S3FileSystem(region="us-east-1", endpoint_override=proxy.endpoint.removeprefix("http://"),
                                  scheme="http", retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=10))
        assert isinstance(pickle.loads(pickle.dumps(ours)), storage.RetryingS3FileSystem)
        results = ray.get([_put_from_worker.remote(ours, "recsys-test/pickled/ours.bin"),
                           _put_from_worker.remote(plain, "recsys-test/pickled/plain.bin")])
    print(f"in a Ray worker, first 3 PUT attempts failing: ours -> {results[0]}; plain pyarrow -> {results[1]}")
    assert results[0] == "ok"
    assert results[1].startswith("failed") and "SLOW_DOWN" in results[1]  # the control: pyarrow alone gives up
    assert storage.read_bytes("s3://recsys-test/pickled/ours.bin") == b"payload"
