"""Shared fixtures: a moto S3 server (separate process, real HTTP), one local Ray cluster, tiny configs."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import ray

from recsys_core import storage
from recsys_core.config import RayConfig, load_config
from recsys_core.runtime import init_ray
from recsys_core.serve.publish import read_recommendations

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BASE_ENV = dict(os.environ)  # before any test starts Ray in this process (for subprocess clusters)
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log-7f3a9c",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """moto's standalone server on 127.0.0.1; env vars point boto3, pyarrow and Ray workers at it."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="recsys-test")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


class LocalRay:
    """One in-process local Ray cluster for the whole session, started on first use (about 10 s a start on
    2 cores, paid once instead of once per module) after the S3 env is set so workers inherit it.

    A test that runs a cluster of its own (tests/raycluster.py: `ray start --head`, `ray job submit`)
    stops it first: an in-process cluster beside it confuses the job agent lookup. The next module that
    needs it starts it again."""

    def __init__(self) -> None:
        self.tmp: str | None = None

    def start(self) -> None:
        if self.tmp is not None and ray.is_initialized():
            return
        self.stop()  # a connection another test left (to a cluster it stopped) is dropped first
        self.tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        os.environ["RAY_TMPDIR"] = self.tmp
        init_ray(RayConfig(num_cpus=4))
        ray.data.DataContext.get_current().enable_progress_bars = False

    def stop(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


LOCAL_RAY = LocalRay()


@pytest.fixture(scope="session")
def _local_ray_session() -> Iterator[LocalRay]:
    yield LOCAL_RAY
    LOCAL_RAY.stop()


@pytest.fixture(scope="module")
def ray_local(moto_s3: str, _local_ray_session: LocalRay) -> Iterator[None]:
    """The session's local Ray cluster (:class:`LocalRay`), running for this module's tests."""
    _local_ray_session.start()
    yield


@pytest.fixture
def synthetic_cfg(tmp_path: Path):
    """The shipped synthetic config, writing under this test's tmp folder."""

    return load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [f"storage.root={tmp_path / 'store'}"])


@pytest.fixture(scope="session")
def tiny_pretrained_lm(tmp_path_factory) -> str:
    """One small pretrained LM per test session (tests/test_guard_drift.py, tests/test_frozen_lm.py)."""
    return pretrain_tiny_lm(tmp_path_factory.mktemp("tiny-lm") / "lm")


def pretrain_tiny_lm(folder: Path, steps: int = 50, seed: int = 0) -> str:
    """A 2-layer GPT-2 LM trained briefly on the replay corpus, saved with save_pretrained (safetensors)."""
    # lazy: only the tests that pretrain an LM build one (torch and transformers stay out of the others)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from recsys_core.data.text import load_tokenizer
    from recsys_core.train.guard import corpus_ids, read_corpus

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    ids = torch.tensor(corpus_ids(read_corpus("builtin", "replay"), load_tokenizer("gpt2-offline")))
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_layer=2, n_embd=64, n_head=2,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    opt = torch.optim.AdamW(lm.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - 48, (8,), generator=gen).tolist()
        x = torch.stack([ids[s:s + 48] for s in starts])  # (8, 48)
        loss = lm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.save_pretrained(folder)
    return str(folder)


def assert_id_types(out: dict, id_type: pa.DataType) -> None:
    """A nightly's users, recommendations and holdout lists keep the input's id type (issue 13)."""
    users = storage.read_table(storage.join(out["prepare"]["prepared"], "users"))
    recs, _ = read_recommendations(out["infer"]["recommendations"])
    holdout = storage.read_table(storage.join(out["evaluate"]["eval_dir"], "holdout_recs.parquet"))
    for name, table in (("users", users), ("recommendations", recs), ("holdout_recs", holdout)):
        assert table.schema.field("user_id").type == id_type, (name, table.schema)
    for name, table in (("recommendations", recs), ("holdout_recs", holdout)):
        assert table.schema.field("item_ids").type == pa.list_(id_type), (name, table.schema)
