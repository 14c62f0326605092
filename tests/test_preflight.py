"""Preflight before Ray starts: the storage root is absolute/s3 under `ray job submit`, reachable and
writable (S3: the bucket exists, a probe object is written and deleted), and the inputs exist. Each
failure is one PreflightError line naming the key and URI, raised before Ray is initialised."""
from __future__ import annotations


import boto3
import pytest
import ray

from recsys_core import storage
from recsys_core.config import ConfigError, replace
from recsys_core.pipeline import run_job
from recsys_core.preflight import PROBE_PREFIX, PreflightError, preflight
from tests.conftest import LOCAL_RAY, free_port

pytestmark = pytest.mark.unit


def with_root(cfg, root: str):
    return replace(cfg, **{"storage.root": root})


def expect(cfg, *fragments: str) -> str:
    with pytest.raises(PreflightError) as e:
        preflight(cfg)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_preflight_error_is_a_config_error():
    assert issubclass(PreflightError, ConfigError)


def test_writable_s3_root_passes_and_leaves_no_probe(moto_s3, synthetic_cfg):
    preflight(with_root(synthetic_cfg, "s3://recsys-test/preflight-ok"))
    left = boto3.client("s3", endpoint_url=moto_s3).list_objects_v2(Bucket="recsys-test", Prefix="preflight-ok/")
    keys = [o["Key"] for o in left.get("Contents", [])]
    assert not [k for k in keys if PROBE_PREFIX in k], keys  # (pyarrow may keep the root itself as a folder marker)


def test_missing_bucket_is_named(moto_s3, synthetic_cfg):
    expect(with_root(synthetic_cfg, "s3://no-such-bucket-0417/recsys"),
           "storage.root=s3://no-such-bucket-0417/recsys", "bucket 'no-such-bucket-0417' does not exist")


def test_closed_port_fails_at_once(moto_s3, synthetic_cfg, monkeypatch):
    port = free_port()  # bound and released: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    expect(with_root(synthetic_cfg, "s3://recsys-test/recsys"), "storage.root=s3://recsys-test/recsys",
           "nothing answers at the endpoint", f"http://127.0.0.1:{port}")


def test_unresolvable_host_fails_at_once_and_is_never_retried(moto_s3, synthetic_cfg, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://nonexistent.invalid:9000")
    expect(with_root(synthetic_cfg, "s3://recsys-test/recsys"), "storage.root=s3://recsys-test/recsys",
           "the endpoint's host name does not resolve", "nonexistent.invalid")
    # the pipeline's own calls do not repeat it as transient either (a dropped connection still is)
    with pytest.raises(OSError) as e:
        storage.exists("s3://recsys-test/recsys/x")  # through the pipeline's filesystem
    assert "resolve host" in str(e.value) and not storage.is_transient(e.value)
    assert storage.is_transient(OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, "
                                        "Failure when receiving data from the peer"))
    assert not storage.is_transient(OSError("AWS Error UNKNOWN (HTTP status 403) during HeadObject operation"))


def test_relative_root_refused_under_job_submit(synthetic_cfg, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = with_root(synthetic_cfg, "outputs/synthetic")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    expect(cfg, "storage.root='outputs/synthetic' is relative", "http://127.0.0.1:8265",
           "pass an absolute path or an s3:// URI")
    expect(replace(cfg, **{"ray.address": "127.0.0.1:6379"}), "127.0.0.1:6379")
    monkeypatch.delenv("RAY_ADDRESS")
    preflight(cfg)  # a local run: relative to the current folder, pinned to an absolute path later
    assert (tmp_path / "outputs" / "synthetic").is_dir()
    assert not list((tmp_path / "outputs" / "synthetic").iterdir())  # the probe file is gone


def test_unwritable_local_root_is_named(synthetic_cfg, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    expect(with_root(synthetic_cfg, str(blocker / "store")), f"storage.root={blocker / 'store'}: not writable")


def test_missing_inputs_are_named(moto_s3, synthetic_cfg, tmp_path):
    items = tmp_path / "items.parquet"
    items.write_bytes(b"")
    cfg = replace(synthetic_cfg, **{"data.source": "parquet", "data.interactions": str(tmp_path / "nope"),
                                    "data.items": str(items)})
    expect(cfg, f"data.interactions={tmp_path / 'nope'}: not found")
    cfg = replace(cfg, **{"data.interactions": str(items), "data.items": "s3://recsys-test/missing/items.parquet"})
    expect(cfg, "data.items=s3://recsys-test/missing/items.parquet: not found")
    expect(replace(synthetic_cfg, **{"guard.replay_corpus": str(tmp_path / "corpus.txt")}),
           f"guard.replay_corpus={tmp_path / 'corpus.txt'}: not found")


def test_run_job_fails_before_ray_starts(moto_s3, synthetic_cfg, monkeypatch):
    LOCAL_RAY.stop()  # the session's local cluster (tests/conftest.py) is down: nothing here may start one
    assert not ray.is_initialized()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://nonexistent.invalid:9000")
    with pytest.raises(PreflightError, match="storage.root=s3://recsys-test/r: cannot reach the bucket"):
        run_job("nightly", with_root(synthetic_cfg, "s3://recsys-test/r"), "2026-11-27")
    assert not ray.is_initialized()


def test_ann_retrieval_without_faiss_is_named(synthetic_cfg, monkeypatch):
    """infer.retrieval=ivf on a machine without FAISS fails before Ray, naming the key and the install."""
    import recsys_core.preflight as pf

    def missing():
        raise ImportError("No module named 'faiss'")

    monkeypatch.setattr(pf, "require_faiss", missing)
    expect(replace(synthetic_cfg, **{"infer.retrieval": "ivf"}), "infer.retrieval=ivf needs FAISS",
           "pip install faiss-cpu")
    preflight(synthetic_cfg)  # exact retrieval does not need it
