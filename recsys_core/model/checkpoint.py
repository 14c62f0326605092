"""Checkpoints: a folder of safetensors weights, a config JSON and a marker written last.

The marker (``_COMPLETE``) lists the files it vouches for with their sizes and sha256, so a folder
whose files were cut short after the marker was written (a full disk, a partial copy) is refused on
loading (sizes and hashes) and before registering or promoting it (:func:`verify_checkpoint`). A
marker from before this format (``ok``) names no files and is accepted as it always was.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file
from torch import nn

from recsys_core import storage
from recsys_core.config import ModelConfig, from_dict
from recsys_core.model.towers import TwoTower, backbone_from_config, is_lora, unwrap

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
MARKER = "_COMPLETE"
FROZEN_FEATURES = "frozen_features"  # item_backbone of a frozen item tower: {"frozen_features": H}


class CheckpointError(FileNotFoundError):
    """A checkpoint folder is incomplete or its files do not match its marker; the message names the file."""


def file_entry(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def marker_bytes(files: dict[str, bytes]) -> bytes:
    """The ``_COMPLETE`` marker for these files (relative name -> content)."""
    return json.dumps({"files": {name: file_entry(data) for name, data in sorted(files.items())}},
                      indent=2, sort_keys=True).encode()


def read_marker(folder: str) -> dict[str, dict[str, Any]] | None:
    """The files the marker lists (name -> size, sha256); None for a legacy marker that lists none.
    :class:`CheckpointError` when there is no marker."""
    uri = storage.join(folder, MARKER)
    if not storage.exists(uri):
        raise CheckpointError(f"{folder}: no {MARKER} marker; the checkpoint is incomplete")
    try:
        body = json.loads(storage.read_bytes(uri))
    except ValueError:
        return None
    return body.get("files") if isinstance(body, dict) else None


def check_file(folder: str, name: str, listed: dict[str, Any], data: bytes | None = None) -> None:
    """Raise :class:`CheckpointError` when a listed file is missing, of another size, or (given its bytes)
    of another sha256 than the marker says."""
    uri = storage.join(folder, name)
    if data is None:
        if not storage.exists(uri):
            raise CheckpointError(f"{uri}: missing, but {MARKER} lists it; the checkpoint is incomplete")
        fs, path = storage.filesystem(uri)
        size = fs.get_file_info(path).size
    else:
        size = len(data)
    if size != listed["size"]:
        raise CheckpointError(f"{uri}: {size} bytes but {MARKER} lists {listed['size']} (truncated or changed); "
                              f"the checkpoint is incomplete")
    if data is not None and hashlib.sha256(data).hexdigest() != listed["sha256"]:
        raise CheckpointError(f"{uri}: sha256 differs from the one {MARKER} lists; the checkpoint is corrupt")


def verify_checkpoint(folder: str, hashes: bool = True) -> None:
    """Every file the marker lists is there with its size (and, with ``hashes``, its sha256)."""
    listed = read_marker(folder)
    if listed is None:
        log.warning("%s: legacy %s marker lists no files; sizes and hashes not checked", folder, MARKER)
        return
    for name, entry in listed.items():
        check_file(folder, name, entry, storage.read_bytes(storage.join(folder, name)) if hashes else None)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model without any hub: stored beside the weights as JSON."""

    model: dict[str, Any]
    n_items: int
    temperature: float
    item_backbone: dict[str, Any]
    user_backbone: dict[str, Any]

    @staticmethod
    def of(model: TwoTower) -> ModelSpec:
        m = unwrap(model)
        it = m.item_tower
        item = ({FROZEN_FEATURES: int(it.text_features.size(1))} if it.frozen else it.backbone.config.to_dict())
        return ModelSpec(model=asdict(m.cfg), n_items=m.n_items, temperature=float(m.temperature),
                         item_backbone=item, user_backbone=m.user_tower.backbone.config.to_dict())

    def build(self) -> TwoTower:
        cfg = from_dict(ModelConfig, self.model)
        if FROZEN_FEATURES in self.item_backbone:  # the frozen LM's features are in the weights, not its body
            return TwoTower(cfg, self.n_items, None, backbone_from_config(self.user_backbone), self.temperature,
                            features_dim=int(self.item_backbone[FROZEN_FEATURES]))
        item_bb = backbone_from_config(self.item_backbone)
        head = None
        if not self.item_backbone.get("tie_word_embeddings", True):
            emb = item_bb.get_input_embeddings().weight
            head = nn.Linear(emb.size(1), emb.size(0), bias=False)
        return TwoTower(cfg, self.n_items, item_bb, backbone_from_config(self.user_backbone), self.temperature,
                        item_lm_head=head)


def save_checkpoint(model: nn.Module, spec: ModelSpec, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
    """A checkpoint is a folder: safetensors weights, config JSON, and a marker written last."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({**asdict(spec), **(extra or {})}, indent=2, default=str))
    (folder / MARKER).write_bytes(marker_bytes({n: (folder / n).read_bytes() for n in (WEIGHTS, CONFIG)}))


def load_checkpoint(folder: str, map_location: str = "cpu") -> tuple[TwoTower, dict[str, Any]]:
    """Rebuild a :class:`TwoTower` from a checkpoint folder (local or s3://); only safetensors are read."""

    listed = read_marker(folder)
    raw_meta = storage.read_bytes(storage.join(folder, CONFIG))
    weights = storage.read_bytes(storage.join(folder, WEIGHTS))
    for name, data in ((CONFIG, raw_meta), (WEIGHTS, weights)):
        if listed is not None and name in listed:
            check_file(folder, name, listed[name], data)
    meta = json.loads(raw_meta)
    spec = ModelSpec(**{k: meta[k] for k in ("model", "n_items", "temperature", "item_backbone", "user_backbone")})
    model = spec.build()
    state = load(weights)
    model.load_state_dict(state)
    return model.to(map_location).eval(), meta


LORA_DIR = "lora_item"  # peft adapters of the item tower, saved beside the merged weights


def export_model(model: nn.Module) -> TwoTower:
    """The model as served: LoRA adapters merged into a copy (plain architecture, no peft needed)."""

    m = unwrap(model)
    if m.item_tower.frozen or not is_lora(m.item_tower.backbone):
        return m
    served = copy.deepcopy(m)
    served.item_tower.backbone = served.item_tower.backbone.merge_and_unload()
    return served


def save_model_folder(model: nn.Module, folder: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merged weights + config + marker (a loadable checkpoint); under LoRA also the adapters alone
    (``lora_item/``, peft format). Returns what resuming needs beyond the folder (unmerged weights)."""
    m = unwrap(model)
    lora = not m.item_tower.frozen and is_lora(m.item_tower.backbone)
    if lora:
        m.item_tower.backbone.save_pretrained(str(Path(folder) / LORA_DIR))
    served = export_model(m)
    save_checkpoint(served, ModelSpec.of(served), folder, extra={"metrics": metrics, "lora": lora})
    return {"model": cpu_state(m)} if lora else {}


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's state dict (what the training state stores to resume from)."""
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def copy_model_folder(src: str, dest: str) -> None:
    """Copy model files (weights, config, LoRA adapters; not optimizer state) from a checkpoint into a
    registry folder, marker last. The source is verified against its marker first (sizes, sha256), and
    the new marker lists what was written, so a truncated checkpoint is never registered."""
    listed = read_marker(src)
    written: dict[str, bytes] = {}
    for name in (WEIGHTS, CONFIG):
        data = storage.read_bytes(storage.join(src, name))
        if listed is not None and name in listed:
            check_file(src, name, listed[name], data)
        storage.write_bytes(storage.join(dest, name), data)
        written[name] = data
    lora = storage.join(src, LORA_DIR)
    for f in storage.list_files(lora) if storage.exists(storage.join(lora, "adapter_config.json")) else []:
        name = f"{LORA_DIR}/{f.rsplit('/', 1)[-1]}"
        data = storage.read_bytes(f)
        storage.write_bytes(storage.join(dest, LORA_DIR, f.rsplit("/", 1)[-1]), data)
        written[name] = data
    storage.write_bytes(storage.join(dest, MARKER), marker_bytes(written))
