"""The training objective: one DDP forward per step (recommendation loss + guard terms)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from recsys_core import storage
from recsys_core.data.text import PAD, pad_token_lists
from recsys_core.model.losses import get_loss
from recsys_core.model.towers import TwoTower
from recsys_core.train.guard import GuardTerms


@dataclass
class ItemTensors:
    tokens: torch.Tensor  # (N, T)
    mask: torch.Tensor  # (N, T)
    prob: torch.Tensor  # (N,) training popularity, for logQ
    known: torch.Tensor  # (N,) bool: the item occurs in training

    @staticmethod
    def load(items_uri: str, count: str = "train_count") -> ItemTensors:
        """The prepared catalog; ``count`` is the column that says how often each item was trained on
        (``event_count`` for the refit on every event)."""
        t = storage.read_table(items_uri, columns=["input_ids", count])
        ids, mask = pad_token_lists(t["input_ids"].to_pylist(), pad_id=PAD)
        counts = t[count].to_numpy().astype(np.float64)
        prob = torch.from_numpy((counts + 1.0) / (counts + 1.0).sum()).float()
        return ItemTensors(torch.from_numpy(ids), torch.from_numpy(mask), prob, torch.from_numpy(counts > 0))

    def to(self, device: torch.device) -> ItemTensors:
        return ItemTensors(self.tokens.to(device), self.mask.to(device), self.prob.to(device), self.known.to(device))


def collate(batch: dict[str, np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seq, mask = pad_token_lists(list(batch["input"]), PAD, length)  # (B, L)
    tgt, _ = pad_token_lists(list(batch["target"]), PAD, length)
    return torch.from_numpy(seq), torch.from_numpy(tgt), torch.from_numpy(mask)


class Objective(nn.Module):
    """Wraps the model so DDP sees one forward per step: (sequences, targets, mask[, replay]) -> loss.

    Loss = recommendation loss + lm_weight * LM NLL on replay text + item_lm_weight * LM NLL on item text
    + kl_weight * KL(ref || model) on replay text."""

    def __init__(self, model: TwoTower, loss: str, num_negatives: int, text_items_per_step: int,
                 guard: GuardTerms | None = None):
        super().__init__()
        self.model = model
        self.loss = get_loss(loss)
        self.num_negatives = num_negatives
        self.text_items_per_step = text_items_per_step
        self.guard = guard or GuardTerms()
        self.parts: dict[str, torch.Tensor] = {}  # last step's loss terms, detached (for logging)

    def forward(self, seq: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor, items: ItemTensors,
                text_cache: torch.Tensor, replay: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        n = text_cache.size(0)
        valid = mask.bool()  # (B, L)
        cand = self.loss.candidates(torch.cat([seq[valid], tgt[valid]]), n, self.num_negatives)  # (C,)
        remap = torch.full((n,), -1, dtype=torch.long, device=seq.device)
        remap[cand] = torch.arange(cand.numel(), device=seq.device)

        fresh = torch.unique(tgt[valid])
        if fresh.numel() > self.text_items_per_step:
            fresh = fresh[torch.randperm(fresh.numel(), device=seq.device)[: self.text_items_per_step]]
        fresh_hidden = None
        if m.item_tower.frozen:  # a frozen LM's cached features: every candidate projected fresh, no LM terms
            text = m.item_tower.text_embed(items.tokens[cand], items.mask[cand], cand)  # (C, D)
        else:
            fresh_hidden = m.item_tower.hidden(items.tokens[fresh], items.mask[fresh], fresh)  # (F, T, H)
            fresh_text = m.item_tower.embed_hidden(fresh_hidden, items.mask[fresh])  # (F, D)
            text = text_cache[cand].index_put((remap[fresh],), fresh_text.to(text_cache.dtype))  # (C, D)
        table = m.item_embeddings(text, cand)  # (C, D)

        states = m.user_states(table, remap[seq].clamp_min(0), mask)  # (B, L, D)
        pos = remap[tgt[valid]]  # (M,)
        log_q = self.loss.log_q(cand, items.prob, int(valid.sum()), self.num_negatives)  # (C,) or None
        loss = self.loss.fn(states[valid], table, pos, m.temperature, log_q)
        self.parts = {"rec_loss": loss.detach()}
        if self.guard.active:
            extra, parts = self.guard.loss(m.item_tower, fresh, fresh_hidden, items.tokens, items.mask, replay)
            self.parts.update(parts)
            loss = loss + extra
        return loss
