"""GPT-2 two-tower model.

- Item tower: GPT-2 over the item's text (BPE tokens), pooled and projected to ``embed_dim``; a learned
  item-ID embedding is added when ``id_embedding`` is on (text alone still embeds new items).
- User tower: a causal GPT-2 over the sequence of the user's item embeddings (``inputs_embeds``),
  whose output at position t scores the item at t+1 (SASRec/HSTU style).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from recsys_core import storage
from recsys_core.config import ModelConfig, TowerConfig

# Named sizes (big_vision's ``mu`` style): everything but the vocabulary, built offline from GPT2Config.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "mini": {"n_layer": 2, "n_embd": 128, "n_head": 2},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12},  # GPT-2 small, 124M
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
}
GPT2_VOCAB = 50257


def gpt2_config(tower: TowerConfig, n_positions: int, vocab_size: int = GPT2_VOCAB) -> GPT2Config:
    if tower.size not in SIZES:
        raise ValueError(f"model size {tower.size!r} unknown; choose one of {sorted(SIZES)}")
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, resid_pdrop=tower.dropout,
                      embd_pdrop=tower.dropout, attn_pdrop=tower.dropout, attn_implementation="sdpa",
                      bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, **SIZES[tower.size])


def load_backbone(tower: TowerConfig, n_positions: int, vocab_size: int = GPT2_VOCAB) -> nn.Module:
    """A transformer body: pretrained (hub name, folder, s3:// prefix, GGUF) or built from a named size."""
    if tower.pretrained:
        from recsys_core.pretrained import load_causal_lm

        return load_causal_lm(tower.pretrained).base_model
    return GPT2Model(gpt2_config(tower, n_positions, vocab_size))


def backbone_from_config(d: dict[str, Any]) -> nn.Module:
    """Rebuild a body from its saved config dict (any transformers architecture), weights to be loaded."""
    from transformers import AutoConfig, AutoModel

    d = dict(d)
    conf = AutoConfig.for_model(d.pop("model_type"), **d)
    return AutoModel.from_config(conf, attn_implementation="sdpa")


def hidden_size(backbone: nn.Module) -> int:
    return int(backbone.config.hidden_size)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(N, T, H), (N, T) -> (N, H): mean over real tokens, or the last real token."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if how == "last":
        last = mask.sum(1).long().clamp_min(1) - 1  # (N,)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"pooling {how!r} unknown; use mean or last")


class ItemTower(nn.Module):
    def __init__(self, cfg: ModelConfig, n_items: int, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.pooling = cfg.pooling
        self.proj = nn.Linear(hidden_size(self.backbone), cfg.embed_dim)
        self.id_emb = nn.Embedding(n_items, cfg.embed_dim) if cfg.id_embedding else None
        if self.id_emb is not None:
            nn.init.normal_(self.id_emb.weight, std=0.02)
        # 1 for items seen in training; an item never trained has an untrained ID vector, so it is
        # embedded from its text alone (cold start). Saved with the weights.
        self.register_buffer("id_known", torch.ones(n_items))

    def text_embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) tokens -> (N, D) text embedding."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
        return self.proj(pool(h, attention_mask, self.pooling))  # (N, D)

    def combine(self, text: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """(N, D) text embedding + (N,) ids -> (N, D) item embedding."""
        if self.id_emb is None:
            return text
        return text + self.id_emb(item_idx) * self.id_known[item_idx].unsqueeze(-1).to(text.dtype)


class UserTower(nn.Module):
    def __init__(self, cfg: ModelConfig, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        # Inputs are item embeddings: the body's token embedding is never used, so it is frozen
        # (DDP requires every trainable parameter to take part in the loss).
        self.backbone.get_input_embeddings().requires_grad_(False)
        h = hidden_size(self.backbone)
        self.inp = nn.Linear(cfg.embed_dim, h) if h != cfg.embed_dim else nn.Identity()
        self.out = nn.Linear(h, cfg.embed_dim) if h != cfg.embed_dim else nn.Identity()
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, seq_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) item embeddings, (B, L) mask -> (B, L, D) user state after each position."""
        h = self.backbone(inputs_embeds=self.inp(seq_emb), attention_mask=mask).last_hidden_state  # (B, L, H)
        return self.norm(self.out(h))


class TwoTower(nn.Module):
    def __init__(self, cfg: ModelConfig, n_items: int, item_backbone: nn.Module, user_backbone: nn.Module,
                 temperature: float = 1.0, learn_temperature: bool = False):
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        self.item_tower = ItemTower(cfg, n_items, item_backbone)
        self.user_tower = UserTower(cfg, user_backbone)
        log_t = torch.tensor(float(temperature)).log()
        self.log_temperature = nn.Parameter(log_t, requires_grad=learn_temperature)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.cfg.similarity == "cosine" else x

    def item_embeddings(self, text: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """(N, D) text embeddings + (N,) ids -> (N, D) item vectors (normalised under cosine similarity)."""
        return self._out(self.item_tower.combine(text, item_idx))

    def user_states(self, table: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Item table (N, D), item-index sequences (B, L), mask (B, L) -> (B, L, D)."""
        return self._out(self.user_tower(table[seq], mask))

    def last_state(self, table: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, D): the user vector after the last real item of each (right-padded) sequence."""
        states = self.user_states(table, seq, mask)  # (B, L, D)
        last = mask.sum(1).long().clamp_min(1) - 1
        return states[torch.arange(seq.size(0), device=seq.device), last]

    def forward(self, table: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.user_states(table, seq, mask)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers before ``state_dict()``."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@torch.no_grad()
def encode_items(model: TwoTower, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 batch_size: int = 512) -> torch.Tensor:
    """All items' embeddings, (N, D), in eval mode, batched."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for s in range(0, input_ids.size(0), batch_size):
        ids = input_ids[s:s + batch_size].to(dev)
        m = attention_mask[s:s + batch_size].to(dev)
        text = model.item_tower.text_embed(ids, m)
        out.append(model.item_embeddings(text, torch.arange(s, s + ids.size(0), device=dev)))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.cfg.embed_dim)


# ----------------------------------------------------------------------------- checkpoints

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
MARKER = "_COMPLETE"


def build_two_tower(cfg: ModelConfig, n_items: int, temperature: float = 1.0,
                    learn_temperature: bool = False) -> TwoTower:
    """A fresh model from config: backbones pretrained or built from named sizes."""
    item_bb = load_backbone(cfg.item_tower, n_positions=max(cfg.max_text_tokens, 8))
    # The user tower reads item embeddings, so its own token vocabulary is unused (size 1).
    user_bb = load_backbone(cfg.user_tower, n_positions=cfg.max_seq_len, vocab_size=1)
    return TwoTower(cfg, n_items, item_bb, user_bb, temperature, learn_temperature)


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
        from recsys_core.config import from_dict

        cfg = from_dict(ModelConfig, self.model)
        return TwoTower(cfg, self.n_items, backbone_from_config(self.item_backbone),
                        backbone_from_config(self.user_backbone), self.temperature)


def save_checkpoint(model: nn.Module, spec: ModelSpec, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
    """A checkpoint is a folder: safetensors weights, config JSON, and a marker written last."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({**asdict(spec), **(extra or {})}, indent=2, default=str))
    (folder / MARKER).write_text("ok\n")


def load_checkpoint(folder: str, map_location: str = "cpu") -> tuple[TwoTower, dict[str, Any]]:
    """Rebuild a :class:`TwoTower` from a checkpoint folder (local or s3://); only safetensors are read."""
    from safetensors.torch import load

    if not storage.exists(storage.join(folder, MARKER)):
        raise FileNotFoundError(f"{folder}: no {MARKER} marker; the checkpoint is incomplete")
    meta = json.loads(storage.read_bytes(storage.join(folder, CONFIG)))
    spec = ModelSpec(**{k: meta[k] for k in ("model", "n_items", "temperature", "item_backbone", "user_backbone")})
    model = spec.build()
    state = load(storage.read_bytes(storage.join(folder, WEIGHTS)))
    model.load_state_dict(state)
    return model.to(map_location).eval(), meta


def build_lm(tower: TowerConfig, n_positions: int) -> GPT2LMHeadModel:
    """A GPT-2 LM (with head) of a named size, for the generation guard."""
    return GPT2LMHeadModel(gpt2_config(tower, n_positions))

