"""Measuring and protecting the language model's generation ability: pure functions.

- :func:`perplexity`: sliding-window perplexity of a causal LM over one long token stream
  ("Perplexity of fixed-length models", transformers docs): each token is scored once, with up to
  ``window`` tokens of context, windows advancing by ``stride``.
- :func:`lm_loss`: next-token cross-entropy on padded batches (the LM-replay term).
- :func:`kl_to_reference`: KL(reference || model) of next-token distributions on real tokens
  (the term that keeps the fine-tuned model close to a frozen reference).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F


class CausalLM(Protocol):
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None): ...


@torch.no_grad()
def perplexity(model: CausalLM, ids: torch.Tensor, window: int, stride: int) -> float:
    """exp(mean NLL) of ``ids`` (T,), each token after the first scored exactly once."""
    if stride < 1 or window < 2 or stride > window:
        raise ValueError(f"need 1 <= stride <= window and window >= 2, got window={window} stride={stride}")
    total, count, scored_to = 0.0, 0, 1  # tokens [1, scored_to) are already scored
    n = ids.numel()
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + window, n)
        logits = model(input_ids=ids[begin:end].unsqueeze(0)).logits[0].float()  # (w, V)
        nll = F.cross_entropy(logits[:-1], ids[begin + 1:end], reduction="none")  # (w-1,) for tokens begin+1..end-1
        new = torch.arange(begin + 1, end) >= scored_to
        total += float(nll[new].sum())
        count += int(new.sum())
        scored_to = end
        if end == n:
            break
    return math.exp(total / max(count, 1))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL: logits (B, T, V), ids (B, T), mask (B, T); padded targets ignored."""
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), tgt.reshape(-1), ignore_index=-100)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(p_ref || p_model); logits (B, T, V), mask (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(ref_logits.float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)  # (B, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def ppl_gate(before: float, after: float, max_increase: float) -> tuple[bool, str]:
    """Pass when perplexity rose by at most ``max_increase`` (0.05 = +5%); the message says why."""
    change = after / before - 1.0
    ok = change <= max_increase
    verdict = "passed" if ok else "FAILED"
    return ok, (f"generation guard {verdict}: general-English perplexity {before:.2f} -> {after:.2f} "
                f"({change:+.1%}, limit {max_increase:+.1%})")
