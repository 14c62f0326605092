"""Checkpoints: a folder of safetensors weights, a config JSON and a marker written last."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load, save_file
from torch import nn

from recsys_core import storage
from recsys_core.config import ModelConfig, from_dict
from recsys_core.model.towers import TwoTower, backbone_from_config, is_lora, unwrap

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
MARKER = "_COMPLETE"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model without any hub: stored beside the weights as JSON."""

    model: dict[str, Any]
    n_items: int
    temperature: float
    item_backbone: dict[str, Any]
    user_backbone: dict[str, Any]

    @staticmethod
    def of(model: TwoTower) -> "ModelSpec":
        m = unwrap(model)
        return ModelSpec(model=asdict(m.cfg), n_items=m.n_items, temperature=float(m.temperature),
                         item_backbone=m.item_tower.backbone.config.to_dict(),
                         user_backbone=m.user_tower.backbone.config.to_dict())

    def build(self) -> TwoTower:
        cfg = from_dict(ModelConfig, self.model)
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
    (folder / MARKER).write_text("ok\n")


def load_checkpoint(folder: str, map_location: str = "cpu") -> tuple[TwoTower, dict[str, Any]]:
    """Rebuild a :class:`TwoTower` from a checkpoint folder (local or s3://); only safetensors are read."""

    if not storage.exists(storage.join(folder, MARKER)):
        raise FileNotFoundError(f"{folder}: no {MARKER} marker; the checkpoint is incomplete")
    meta = json.loads(storage.read_bytes(storage.join(folder, CONFIG)))
    spec = ModelSpec(**{k: meta[k] for k in ("model", "n_items", "temperature", "item_backbone", "user_backbone")})
    model = spec.build()
    state = load(storage.read_bytes(storage.join(folder, WEIGHTS)))
    model.load_state_dict(state)
    return model.to(map_location).eval(), meta


LORA_DIR = "lora_item"  # peft adapters of the item tower, saved beside the merged weights


def export_model(model: nn.Module) -> TwoTower:
    """The model as served: LoRA adapters merged into a copy (plain architecture, no peft needed)."""

    m = unwrap(model)
    if not is_lora(m.item_tower.backbone):
        return m
    served = copy.deepcopy(m)
    served.item_tower.backbone = served.item_tower.backbone.merge_and_unload()
    return served


def save_model_folder(model: nn.Module, folder: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merged weights + config + marker (a loadable checkpoint); under LoRA also the adapters alone
    (``lora_item/``, peft format). Returns what resuming needs beyond the folder (unmerged weights)."""
    m = unwrap(model)
    lora = is_lora(m.item_tower.backbone)
    if lora:
        m.item_tower.backbone.save_pretrained(str(Path(folder) / LORA_DIR))
    served = export_model(m)
    save_checkpoint(served, ModelSpec.of(served), folder, extra={"metrics": metrics, "lora": lora})
    return {"model": {k: v.detach().cpu() for k, v in m.state_dict().items()}} if lora else {}


def copy_model_folder(src: str, dest: str) -> None:
    """Copy model files (weights, config, LoRA adapters; not optimizer state) from a checkpoint into a
    registry folder, marker last."""
    for name in (WEIGHTS, CONFIG):
        storage.write_bytes(storage.join(dest, name), storage.read_bytes(storage.join(src, name)))
    lora = storage.join(src, LORA_DIR)
    for f in storage.list_files(lora) if storage.exists(storage.join(lora, "adapter_config.json")) else []:
        storage.write_bytes(storage.join(dest, LORA_DIR, f.rsplit("/", 1)[-1]), storage.read_bytes(f))
    storage.write_bytes(storage.join(dest, MARKER), b"ok\n")
