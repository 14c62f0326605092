"""GPT-2 two-tower model.

- Item tower: GPT-2 over the item's text (BPE tokens), pooled and projected to ``embed_dim``; a learned
  item-ID embedding is added when ``id_embedding`` is on (text alone still embeds new items).
- User tower: a causal GPT-2 over the sequence of the user's item embeddings (``inputs_embeds``),
  whose output at position t scores the item at t+1 (SASRec/HSTU style).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
)

from recsys_core.config import ModelConfig, TowerConfig
from recsys_core.data.text import PAD, pad_token_lists
from recsys_core.model.pretrained import load_causal_lm

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


def load_backbone(tower: TowerConfig, n_positions: int, vocab_size: int = GPT2_VOCAB) -> tuple[nn.Module, nn.Module | None]:
    """A transformer body and its untied LM head (None when the head is tied to the token embedding):
    pretrained (hub name, folder, s3:// prefix, GGUF) or built from a named size."""
    if tower.pretrained:
        lm = load_causal_lm(tower.pretrained)
        tied = bool(getattr(lm.config, "tie_word_embeddings", True))
        return lm.base_model, None if tied else lm.get_output_embeddings()
    return GPT2Model(gpt2_config(tower, n_positions, vocab_size)), None


def backbone_from_config(d: dict[str, Any]) -> nn.Module:
    """Rebuild a body from its saved config dict (any transformers architecture), weights to be loaded."""
    d = dict(d)
    conf = AutoConfig.for_model(d.pop("model_type"), **d)
    return AutoModel.from_config(conf, attn_implementation="sdpa")


def hidden_size(backbone: nn.Module) -> int:
    return int(backbone.config.hidden_size)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, T, H), (N, T) -> (N, H): mean over real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def last_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, T, H), (N, T) -> (N, H): the last real token (right padding)."""
    last = mask.sum(1).long().clamp_min(1) - 1  # (N,)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


POOLING: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"mean": mean_pool, "last": last_pool}
# Output map of both towers: dot product on raw vectors, or cosine (L2-normalised vectors).
SIMILARITY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"dot": lambda x: x,
                                                                  "cosine": lambda x: F.normalize(x, dim=-1)}


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(N, T, H), (N, T) -> (N, H) with the ``POOLING`` rule named ``how``."""
    if how not in POOLING:
        raise ValueError(f"pooling {how!r} unknown; choose from {sorted(POOLING)}")
    return POOLING[how](hidden, mask)


def head_logits(backbone: nn.Module, lm_head: nn.Module | None, hidden: torch.Tensor) -> torch.Tensor:
    """(N, T, H) -> (N, T, V): the untied head, or the tied token embedding."""
    if lm_head is not None:
        return lm_head(hidden)
    return F.linear(hidden, backbone.get_input_embeddings().weight)


def decoder_blocks(body: nn.Module) -> tuple[nn.Module, str]:
    """The module that holds a body's transformer blocks and that list's attribute name (GPT-2 ``h``, Llama
    ``layers``): its ``nn.ModuleList`` child of ``config.num_hidden_layers`` blocks (under LoRA, the wrapped
    base model's)."""
    base = body.get_base_model() if is_lora(body) else body
    n = int(base.config.num_hidden_layers)
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            return base, name
    raise ValueError(f"{type(base).__name__}: no list of {n} transformer blocks found")


class _Stop(Exception):
    """Ends a forward pass once the hidden states entering a block are captured."""


def _replace_hidden(h: torch.Tensor):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}
    return hook


@torch.no_grad()
def hidden_entering(body: nn.Module, block: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) tokens -> (N, T, H): the hidden states entering transformer block ``block`` (0: the embedding
    output); the pass stops there, so blocks ``block`` and above never run."""
    holder, name = decoder_blocks(body)
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = getattr(holder, name)[block].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        body(input_ids=input_ids, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def forward_from(body: nn.Module, block: int, hidden: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T, H) hidden states entering block ``block`` (from :func:`hidden_entering`) -> (N, T, H) last hidden
    states: only blocks ``block`` and above (and the final norm) run. The body's own forward runs with its
    block list cut to those blocks, so positions, masks and rotary embeddings are its own; the tokens are
    embedded (a lookup) and that output replaced by ``hidden`` where block ``block`` starts."""
    holder, name = decoder_blocks(body)
    blocks = getattr(holder, name)
    handle = blocks[block].register_forward_pre_hook(_replace_hidden(hidden), with_kwargs=True)
    holder._modules[name] = nn.ModuleList(list(blocks)[block:])
    try:
        return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    finally:
        holder._modules[name] = blocks
        handle.remove()


class TowerLM(nn.Module):
    """A body + head as a causal LM: ``(N, T)`` ids -> ``.logits`` (N, T, V) (the guard's interface)."""

    def __init__(self, backbone: nn.Module, lm_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.lm_head = lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
        return SimpleNamespace(logits=head_logits(self.backbone, self.lm_head, h))


class ItemTower(nn.Module):
    """Item text -> vector; its body is also a causal language model (``lm_logits``), the one the
    generation guard protects. The LM head is the token embedding (tied) unless ``lm_head`` is given.

    Frozen (``backbone=None``, ``features_dim=H``): the body is a frozen pretrained LM outside the model;
    its pooled text features of every item (``text_features``, (N, H), filled from the catalog's cached
    feature pass, ``model.features``) are what the tower reads, so a step costs no LM forward at all."""

    def __init__(self, cfg: ModelConfig, n_items: int, backbone: nn.Module | None, lm_head: nn.Module | None = None,
                 features_dim: int | None = None):
        super().__init__()
        if (backbone is None) == (features_dim is None):
            raise ValueError("an item tower has either a language-model body or frozen text features, not both")
        self.backbone = backbone
        self.lm_head = lm_head
        self.pooling = cfg.pooling
        if backbone is None:
            self.register_buffer("text_features", torch.zeros(n_items, int(features_dim)))  # (N, H)
        self.proj = nn.Linear(hidden_size(self.backbone) if backbone is not None else int(features_dim),
                              cfg.embed_dim)
        if backbone is None:  # standardised features (unit variance): start the text part at the ID part's scale
            nn.init.normal_(self.proj.weight, std=1.0 / int(features_dim))
            nn.init.zeros_(self.proj.bias)
        self.id_emb = nn.Embedding(n_items, cfg.embed_dim) if cfg.id_embedding else None
        if self.id_emb is not None:
            nn.init.normal_(self.id_emb.weight, std=0.02)
        # 1 for items seen in training; an item never trained has an untrained ID vector, so it is
        # embedded from its text alone (cold start). Saved with the weights.
        self.register_buffer("id_known", torch.ones(n_items))
        # Top-k-layer training (model.item_tower.train_top_layers): the first trained block, and the hidden
        # states entering it for every item's text (N, T, H), computed once (:meth:`cache_lower`). A plain
        # attribute, not a buffer: never saved, never broadcast by DDP.
        self.first_trained: int = 0
        self.lower: torch.Tensor | None = None

    def train_top_layers(self, k: int) -> None:
        """Only the top ``k`` transformer blocks (and what follows them: the final norm) train; the blocks
        below and the embeddings are frozen. 0: every layer trains."""
        if k <= 0:
            return
        holder, name = decoder_blocks(self.backbone)
        n = len(getattr(holder, name))
        if k > n:
            raise ValueError(f"model.item_tower.train_top_layers={k}: the item LM has {n} blocks")
        self.first_trained = n - k
        self.backbone.get_input_embeddings().requires_grad_(False)
        for block in list(getattr(holder, name))[: self.first_trained]:
            block.requires_grad_(False)
        for mod in holder.children():  # learned position embeddings (GPT-2 wpe) feed the frozen blocks too
            if isinstance(mod, nn.Embedding):
                mod.requires_grad_(False)

    @torch.no_grad()
    def cache_lower(self, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int = 64) -> None:
        """Compute the hidden states entering the first trained block for every item (N, T) once, dropout off:
        afterwards a step runs only the top blocks for the items it embeds (about k/L of a full pass)."""
        was = self.training
        self.eval()
        try:
            self.lower = torch.cat([hidden_entering(self.backbone, self.first_trained, tokens[a:a + batch_size],
                                                    mask[a:a + batch_size])
                                    for a in range(0, tokens.size(0), batch_size)])  # (N, T, H)
        finally:
            self.train(was)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               item_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) tokens -> (N, T, H) last hidden states of the language model body. Items (``item_idx`` (N,))
        whose lower-block states are cached run only the trained top blocks."""
        if self.lower is not None and item_idx is not None:
            return forward_from(self.backbone, self.first_trained, self.lower[item_idx], input_ids, attention_mask)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, T, H) -> (N, T, V) next-token logits."""
        return head_logits(self.backbone, self.lm_head, hidden)

    def lm(self) -> TowerLM:
        """A view of this tower's language model (shares its weights)."""
        return TowerLM(self.backbone, self.lm_head)

    @property
    def frozen(self) -> bool:
        return self.backbone is None

    def text_embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   item_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) tokens of items (N,) -> (N, D) text embedding (frozen: their cached features, projected)."""
        if self.frozen:
            if item_idx is None:
                raise ValueError("a frozen item tower embeds items by index (their cached features)")
            return self.proj(self.text_features[item_idx])
        return self.embed_hidden(self.hidden(input_ids, attention_mask, item_idx), attention_mask)

    def embed_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T, H) hidden states -> (N, D) text embedding."""
        return self.proj(pool(hidden, attention_mask, self.pooling))

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
    def __init__(self, cfg: ModelConfig, n_items: int, item_backbone: nn.Module | None, user_backbone: nn.Module,
                 temperature: float = 1.0, learn_temperature: bool = False, item_lm_head: nn.Module | None = None,
                 features_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        self.item_tower = ItemTower(cfg, n_items, item_backbone, item_lm_head, features_dim)
        self.user_tower = UserTower(cfg, user_backbone)
        log_t = torch.tensor(float(temperature)).log()
        self.log_temperature = nn.Parameter(log_t, requires_grad=learn_temperature)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return SIMILARITY[self.cfg.similarity](x)

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




def build_two_tower(cfg: ModelConfig, n_items: int, temperature: float = 1.0,
                    learn_temperature: bool = False, text_features: torch.Tensor | None = None) -> TwoTower:
    """A fresh model from config: backbones pretrained or built from named sizes. A frozen item tower
    takes the catalog's cached text features (N, H) instead of a body (``model.features``)."""
    if cfg.item_tower.frozen:
        if text_features is None or text_features.size(0) != n_items:
            raise ValueError(f"a frozen item tower needs the text features of all {n_items} items")
        item_bb, head, dim = None, None, text_features.size(1)
    else:
        (item_bb, head), dim = load_backbone(cfg.item_tower, n_positions=max(cfg.max_text_tokens, 8)), None
    # The user tower reads item embeddings, so its own token vocabulary is unused (size 1).
    user_bb, _ = load_backbone(cfg.user_tower, n_positions=cfg.max_seq_len, vocab_size=1)
    model = TwoTower(cfg, n_items, item_bb, user_bb, temperature, learn_temperature, head, dim)
    if text_features is not None and cfg.item_tower.frozen:
        model.item_tower.text_features.copy_(text_features)
    return model


def max_positions(backbone: nn.Module) -> int:
    """The longest token window the body accepts (GPT-2 ``n_positions``, Llama ``max_position_embeddings``)."""
    c = backbone.config
    return int(getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", 1024))


def build_lm(tower: TowerConfig, n_positions: int) -> GPT2LMHeadModel:
    """A GPT-2 LM (with head) of a named size, for the generation guard."""
    return GPT2LMHeadModel(gpt2_config(tower, n_positions))


def is_lora(backbone: nn.Module) -> bool:
    """Whether a body is wrapped with peft LoRA adapters."""
    return hasattr(backbone, "disable_adapter") and hasattr(backbone, "peft_config")


def merged_body(backbone: nn.Module) -> nn.Module:
    """The body with its LoRA adapters merged (into a copy), or the body itself without adapters."""
    return copy.deepcopy(backbone).merge_and_unload() if is_lora(backbone) else backbone


def item_causal_lm(tower: ItemTower) -> nn.Module:
    """The item tower's language model as a transformers ``*ForCausalLM`` (a copy; ``generate()`` works)."""
    body = merged_body(tower.backbone)
    lm = AutoModelForCausalLM.from_config(body.config, attn_implementation="sdpa")
    lm.base_model.load_state_dict(body.state_dict())
    if tower.lm_head is not None:
        lm.get_output_embeddings().load_state_dict(tower.lm_head.state_dict())
    else:
        lm.tie_weights()
    return lm.to(next(tower.parameters()).device).eval()




@torch.no_grad()
def eval_batches(model: nn.Module, n: int, batch_size: int, fn: Callable[[int, int], torch.Tensor],
                 empty: torch.Tensor) -> torch.Tensor:
    """``fn(start, stop)`` over rows ``[0, n)`` in batches with dropout off, concatenated on dim 0 (the
    model's train/eval mode is restored). The one "eval mode, batch, concatenate" of the package."""
    was = model.training
    model.eval()
    try:
        out = [fn(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    finally:
        model.train(was)
    return torch.cat(out) if out else empty


def text_table(model: TwoTower, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, T) item tokens -> (N, D) text embeddings of every item (no ID part), dropout off."""
    return eval_batches(model, tokens.size(0), batch_size,
                        lambda a, b: model.item_tower.text_embed(tokens[a:b], mask[a:b],
                                                                 torch.arange(a, b, device=tokens.device)),
                        torch.zeros(0, model.cfg.embed_dim, device=tokens.device))


def encode_items(model: TwoTower, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, T) item tokens -> (N, D) item vectors (text + ID embedding), dropout off."""
    dev = next(model.parameters()).device

    def batch(a: int, b: int) -> torch.Tensor:
        idx = torch.arange(a, b, device=dev)
        text = model.item_tower.text_embed(tokens[a:b].to(dev), mask[a:b].to(dev), idx)  # (b, D)
        return model.item_embeddings(text, idx)

    return eval_batches(model, tokens.size(0), batch_size, batch, torch.zeros(0, model.cfg.embed_dim, device=dev))


def user_vectors(model: TwoTower, table: torch.Tensor, histories: list[np.ndarray], max_len: int,
                 batch_size: int = 512) -> torch.Tensor:
    """(U, D) user vectors from the last ``max_len`` items of each history, dropout off."""
    dev = table.device

    def batch(a: int, b: int) -> torch.Tensor:
        seq, mask = pad_token_lists(histories[a:b], PAD, max_len)  # (b, L)
        return model.last_state(table, torch.from_numpy(seq).to(dev), torch.from_numpy(mask).to(dev))

    return eval_batches(model, len(histories), batch_size, batch, torch.zeros(0, table.size(1), device=dev))
