"""Checkpoint completeness (issue 15): the marker lists sizes and sha256; a truncated or altered
checkpoint is refused on loading, registering and promoting, and the next run of its date removes it."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from recsys_core import storage
from recsys_core.config import ModelConfig, TowerConfig
from recsys_core.model.checkpoint import (CONFIG, MARKER, WEIGHTS, CheckpointError, ModelSpec, copy_model_folder,
                                          load_checkpoint, save_checkpoint, verify_checkpoint)
from recsys_core.model.towers import build_two_tower
from recsys_core.ops import registry

pytestmark = pytest.mark.unit


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(item_tower=TowerConfig(size="tiny", dropout=0.0), user_tower=TowerConfig(size="tiny", dropout=0.0),
                      embed_dim=8, max_seq_len=4, max_text_tokens=8)
    model = build_two_tower(cfg, n_items=3).eval()
    d = tmp_path / "ckpt"
    save_checkpoint(model, ModelSpec.of(model), d)
    return d


def truncate(path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_marker_lists_each_file_with_size_and_sha256(ckpt):
    files = json.loads((ckpt / MARKER).read_text())["files"]
    assert set(files) == {WEIGHTS, CONFIG}
    data = (ckpt / WEIGHTS).read_bytes()
    assert files[WEIGHTS] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    load_checkpoint(str(ckpt))
    verify_checkpoint(str(ckpt))


def test_truncated_weights_with_a_marker_are_refused_on_loading_and_registering(ckpt, tmp_path):
    size = (ckpt / WEIGHTS).stat().st_size
    truncate(ckpt / WEIGHTS)
    msg = rf"model.safetensors: 100 bytes but _COMPLETE lists {size} \(truncated or changed\)"
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(str(ckpt))
    dest = tmp_path / "models" / "20261127-000000"
    with pytest.raises(CheckpointError, match=msg):
        copy_model_folder(str(ckpt), str(dest))
    assert not (dest / MARKER).exists()  # never registered


def test_same_size_but_altered_weights_are_refused_by_hash(ckpt):
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    verify_checkpoint(str(ckpt), hashes=False)  # sizes alone cannot tell
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 differs"):
        load_checkpoint(str(ckpt))


def test_registered_copy_lists_what_was_written_and_loads(ckpt, tmp_path):
    dest = tmp_path / "models" / "20261127-000000"
    copy_model_folder(str(ckpt), str(dest))
    assert json.loads((dest / MARKER).read_text())["files"] == json.loads((ckpt / MARKER).read_text())["files"]
    load_checkpoint(str(dest))


def test_next_run_of_the_date_finds_a_truncated_version_and_promote_refuses_it(ckpt, tmp_path):
    root = str(tmp_path / "store")
    good, bad = "20261127-010000", "20261127-020000"
    for v in (good, bad):
        copy_model_folder(str(ckpt), registry.version_dir(root, v))
    truncate(tmp_path / "store" / "models" / bad / WEIGHTS)  # e.g. a full disk after the marker
    assert registry.incomplete_versions(root, "2026-11-27") == [bad]
    assert registry.incomplete_versions(root, "2026-11-28") == []
    with pytest.raises(CheckpointError, match="truncated"):
        registry.promote(root, bad, "2026-11-27", "test")
    registry.promote(root, good, "2026-11-27", "test")
    # the train stage deletes what incomplete_versions names; production is never among them
    truncate(tmp_path / "store" / "models" / good / WEIGHTS)
    assert registry.incomplete_versions(root, "2026-11-27") == [bad]


def test_legacy_marker_is_accepted_without_checks(ckpt):
    (ckpt / MARKER).write_text("ok\n")
    verify_checkpoint(str(ckpt))
    load_checkpoint(str(ckpt))
    assert storage.exists(str(ckpt / MARKER))
