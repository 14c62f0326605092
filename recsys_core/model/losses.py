"""Retrieval losses: full softmax over the catalog, and sampled softmax with logQ correction.

Both take user states ``(M, D)``, a candidate item table ``(C, D)`` and the index of each positive
in that table ``(M,)``. Candidates are unique items, so a positive never appears among its own
negatives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def logits(states: torch.Tensor, table: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """(M, D) user states x (C, D) candidates -> (M, C) scores / tau, in float32 for the softmax."""
    return (states @ table.T / temperature).float()


def full_softmax_loss(states: torch.Tensor, table: torch.Tensor, pos: torch.Tensor,
                      temperature: torch.Tensor | float, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over every candidate: mean_m -log softmax(s_m . T / tau)[pos_m]. ``log_q`` is
    ignored: the candidates are the whole catalog, an unbiased set."""
    return F.cross_entropy(logits(states, table, temperature), pos)


def sampled_softmax_loss(states: torch.Tensor, table: torch.Tensor, pos: torch.Tensor,
                         temperature: torch.Tensor | float, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax (in-batch + uniform negatives) with logQ correction (Yi et al., 2019).

    ``log_q`` (C,) is the log of each candidate's expected count in the sample; subtracting it
    removes the bias toward popular items that in-batch negatives introduce.
    """
    scores = logits(states, table, temperature)  # (M, C)
    if log_q is not None:
        scores = scores - log_q.unsqueeze(0).float()
    return F.cross_entropy(scores, pos)


LossFn = Callable[..., torch.Tensor]


def expected_log_q(candidates: torch.Tensor, item_prob: torch.Tensor, n_in_batch: int, n_uniform: int) -> torch.Tensor:
    """(C,) log expected number of draws of each candidate: n_in_batch * p_pop + n_uniform / N."""
    n = item_prob.numel()
    q = n_in_batch * item_prob[candidates] + n_uniform / n
    return q.clamp_min(1e-12).log()


def all_items(step_items: torch.Tensor, n_items: int, num_negatives: int) -> torch.Tensor:
    """(N,) every catalog item is a candidate."""
    return torch.arange(n_items, device=step_items.device)


def step_and_uniform(step_items: torch.Tensor, n_items: int, num_negatives: int) -> torch.Tensor:
    """(C,) the step's own items (in-batch negatives) plus ``num_negatives`` uniform draws, unique."""
    neg = torch.randint(0, n_items, (num_negatives,), device=step_items.device)
    return torch.unique(torch.cat([step_items, neg]))


def no_correction(candidates: torch.Tensor, item_prob: torch.Tensor, n_in_batch: int,
                  n_uniform: int) -> torch.Tensor | None:
    return None


@dataclass(frozen=True)
class Loss:
    """One registry entry carries everything the objective needs from a loss: which items are a step's
    candidates, the sampling correction for them, and the loss on the candidate table."""

    fn: LossFn  # (states (M, D), table (C, D), pos (M,), temperature, log_q (C,) | None) -> scalar
    candidates: Callable[[torch.Tensor, int, int], torch.Tensor]  # (step items, N, num_negatives) -> (C,)
    log_q: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor | None]  # (C,) or None


LOSSES: dict[str, Loss] = {
    "full_softmax": Loss(full_softmax_loss, all_items, no_correction),
    "sampled_softmax": Loss(sampled_softmax_loss, step_and_uniform, expected_log_q),
}


def get_loss(name: str) -> Loss:
    if name not in LOSSES:
        raise ValueError(f"train.loss={name!r} unknown; choose one of {sorted(LOSSES)}")
    return LOSSES[name]
