"""Storage and the whole pipeline against S3 (moto's server over HTTP, real pyarrow and boto3 clients)."""
from __future__ import annotations

import boto3
import pyarrow as pa
import pytest

import jobs.nightly
from recsys_core import storage
from recsys_core.config import load_config
from recsys_core.infer import read_recommendations
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
        storage.delete(storage.join(root, "a"))
        assert not storage.exists(storage.join(root, "a", "x.json"))
    with pytest.raises(ValueError, match="refusing"):
        storage.join("s3://recsys-test/x", "../escape")


@pytest.mark.integration
def test_nightly_pipeline_on_s3(ray_local, moto_s3):
    root = "s3://recsys-test/nightly"
    cfg = load_config(REPO / "jobs" / "configs" / "synthetic.yaml",
                      [f"storage.root={root}", "train.epochs=2", "eval.baselines=[popularity]"])
    out = jobs.nightly.main(cfg=cfg, run_date="2026-11-27")
    recs, manifest = read_recommendations(f"{root}/recommendations/run_date=2026-11-27")
    assert recs.num_rows == manifest["rows"] == out["prepare"]["stats"]["users_kept"]

    # The real boto3 client sees what pyarrow wrote: manifest, parts, model registry, Ray Train checkpoints.
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="recsys-test", Prefix="nightly/")
            for o in page.get("Contents", [])]
    assert "nightly/recommendations/run_date=2026-11-27/_MANIFEST.json" in keys
    assert sum(k.startswith("nightly/recommendations/run_date=2026-11-27/part-") for k in keys) == len(manifest["files"])
    version = out["train"]["model_version"]
    for name in ("model.safetensors", "model_config.json", "_COMPLETE", "metrics.json"):
        assert f"nightly/models/{version}/{name}" in keys
    assert any("/ray_train/" in k and k.endswith("model.safetensors") for k in keys)

    # Credentials never reach any output.
    secret = S3_ENV["AWS_SECRET_ACCESS_KEY"].encode()
    for k in keys:
        assert secret not in s3.get_object(Bucket="recsys-test", Key=k)["Body"].read(), k
