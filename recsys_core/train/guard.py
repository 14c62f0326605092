"""Measuring and protecting the language model's generation ability: pure functions.

- :func:`perplexity`: sliding-window perplexity of a causal LM over one long token stream
  ("Perplexity of fixed-length models", transformers docs): each token is scored once, with up to
  ``window`` tokens of context, windows advancing by ``stride``.
- :func:`lm_loss`: next-token cross-entropy on padded batches (the LM-replay term).
- :func:`kl_to_reference`: KL(reference || model) of next-token distributions on real tokens
  (the term that keeps the fine-tuned model close to a frozen reference).

Mechanisms (each a switch in ``GuardConfig``, combinable): LoRA adapters on the item tower's body
(:func:`apply_lora`; the base stays frozen and is the KL reference with adapters disabled), LM replay
on general text and item text, KL to a frozen reference. Measurement (:func:`measure`) and the gate
(:func:`verdict`) run before and after training on held-out general English and held-out item text.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys_core import storage
from recsys_core.config import GuardConfig, LoraConfig, NightlyConfig
from recsys_core.data.text import load_tokenizer
from recsys_core.model.checkpoint import load_checkpoint
from recsys_core.model.pretrained import load_causal_lm
from recsys_core.model.towers import (
    ItemTower,
    build_two_tower,
    decoder_blocks,
    is_lora,
    item_causal_lm,
    max_positions,
)


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


CORPUS_DIR = Path(__file__).resolve().parents[1] / "assets" / "corpus"  # recsys_core/assets/corpus
BUILTIN = {"replay": CORPUS_DIR / "replay.txt", "heldout": CORPUS_DIR / "heldout.txt"}


def read_corpus(uri: str, which: str) -> str:
    """Text of a corpus: ``builtin`` (shipped public-domain English, see assets/corpus/SOURCES.md),
    or a UTF-8 text file, local or s3://."""
    if uri == "builtin":
        return BUILTIN[which].read_text(encoding="utf-8")
    try:
        return storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"guard.{which}_corpus {uri}: not UTF-8 text ({e})") from None


def corpus_ids(text: str, tokenizer: Any) -> list[int]:
    """One token stream for the whole corpus (paragraphs joined by blank lines)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def lora_target_modules(lcfg: LoraConfig) -> str | list[str]:
    return "all-linear" if tuple(lcfg.target_modules) == ("all-linear",) else list(lcfg.target_modules)


def apply_lora(backbone: nn.Module, lcfg: LoraConfig, top_layers: int = 0) -> nn.Module:
    """Wrap a body with peft LoRA adapters; its own weights are frozen (only adapters train). ``top_layers`` k > 0:
    adapters on the top k transformer blocks only (``model.item_tower.train_top_layers``)."""
    # lazy: peft (and its transformers integrations) loads only when LoRA is on
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    conv1d = getattr(backbone.config, "model_type", "") == "gpt2"  # GPT-2's Conv1D stores weights (in, out)
    targets, extra = lora_target_modules(lcfg), {}
    if top_layers > 0:
        holder, name = decoder_blocks(backbone)
        blocks = getattr(holder, name)
        if targets == "all-linear":  # peft takes a layer subset only with named modules: the blocks' linears
            targets = sorted({n.rsplit(".", 1)[-1] for n, m in blocks[-1].named_modules()
                              if type(m).__name__ in ("Linear", "Conv1D")})
        extra = {"layers_to_transform": list(range(max(0, len(blocks) - top_layers), len(blocks))),
                 "layers_pattern": name}
    pc = PeftLoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                        target_modules=targets, fan_in_fan_out=conv1d, **extra)
    return get_peft_model(backbone, pc)


def frozen_reference(lm: nn.Module) -> nn.Module | None:
    """The KL reference: a frozen copy of the LM at the start of training; ``None`` under LoRA,
    where the frozen base itself (adapters disabled) is the reference and no copy is needed."""
    if is_lora(lm.backbone):
        return None
    ref = copy.deepcopy(lm).eval()
    ref.requires_grad_(False)
    return ref


@torch.no_grad()
def reference_logits(lm: nn.Module, ref: nn.Module | None, ids: torch.Tensor) -> torch.Tensor:
    """(R, T) ids -> (R, T, V) logits of the reference (dropout off)."""
    if ref is not None:
        return ref(input_ids=ids).logits
    was = lm.training
    lm.eval()
    with lm.backbone.disable_adapter():
        out = lm(input_ids=ids).logits
    lm.train(was)
    return out


def replay_windows(stream: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(n, L) random contiguous windows of a token stream (T,); L is at most T."""
    length = min(length, stream.numel())
    starts = torch.randint(0, stream.numel() - length + 1, (n,), generator=gen)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def heldout_items(n_items: int, every: int) -> np.ndarray:
    """(N,) bool: items whose text is never in the LM loss (their perplexity is measured)."""
    return np.arange(n_items) % max(every, 1) == 0


def needs_replay(g: GuardConfig) -> bool:
    """Replay text is read only for the replay LM loss or the KL term."""
    return g.lm_weight > 0 or g.kl_weight > 0


@dataclass
class GuardTerms:
    """The generation guard's training terms (weights 0 = off): LM replay and KL to a reference."""

    lm_weight: float = 0.0
    kl_weight: float = 0.0
    item_lm_weight: float = 0.0
    item_lm_per_step: int = 0
    heldout: torch.Tensor | None = None  # (N,) bool: items never in the LM loss
    reference: nn.Module | None = None  # frozen copy; None under LoRA (adapters disabled instead)

    @property
    def active(self) -> bool:
        return self.lm_weight > 0 or self.kl_weight > 0 or self.item_lm_weight > 0

    def loss(self, tower: ItemTower, fresh: torch.Tensor, fresh_hidden: torch.Tensor, tokens: torch.Tensor,
             mask: torch.Tensor, replay: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """lm_weight * LM NLL on replay windows (R, T) + item_lm_weight * LM NLL on this step's (not held-out)
        item texts (rows ``fresh`` of ``tokens``/``mask``, hidden states (F, T, H) already computed)
        + kl_weight * KL(reference || model) on the replay windows. Returns the sum and its detached parts."""
        total, parts = fresh_hidden.new_zeros(()), {}
        replay_logits = tower.lm_logits(tower.hidden(replay)) if replay is not None else None  # (R, T, V)
        if self.lm_weight > 0 and replay_logits is not None:
            lm = lm_loss(replay_logits, replay, torch.ones_like(replay))
            parts["lm_loss"] = lm.detach()
            total = total + self.lm_weight * lm
        if self.item_lm_weight > 0:
            keep = torch.nonzero(~self.heldout[fresh]).squeeze(1)[: self.item_lm_per_step]  # rows of fresh
            if keep.numel():
                item_lm = lm_loss(tower.lm_logits(fresh_hidden[keep]), tokens[fresh[keep]], mask[fresh[keep]])
                parts["item_lm_loss"] = item_lm.detach()
                total = total + self.item_lm_weight * item_lm
        if self.kl_weight > 0 and replay_logits is not None:
            ref = reference_logits(tower.lm(), self.reference, replay)
            kl = kl_to_reference(replay_logits, ref, torch.ones_like(replay))
            parts["kl"] = kl.detach()
            total = total + self.kl_weight * kl
        return total, parts


def guard_terms(g: GuardConfig, tower: ItemTower, n_items: int, replay_ids: list[int] | None,
                device: torch.device) -> tuple[GuardTerms, torch.Tensor | None]:
    """The training terms for a worker and its replay token stream (None when no replay is needed)."""
    terms = GuardTerms(g.lm_weight, g.kl_weight, g.item_lm_weight, g.item_lm_per_step,
                       torch.from_numpy(heldout_items(n_items, g.heldout_item_every)).to(device))
    if not needs_replay(g):
        return terms, None
    if g.kl_weight > 0:
        ref = frozen_reference(tower.lm())
        terms.reference = ref.to(device) if ref is not None else None
    stream = torch.tensor(replay_ids or [], dtype=torch.long)
    return terms, (stream if stream.numel() >= 2 else None)


def replay_len(g: GuardConfig, tower: ItemTower) -> int:
    """Replay window length: ``guard.replay_seq_len``, at most the body's position window."""
    return min(g.replay_seq_len, max_positions(tower.backbone))


def measure(lm: nn.Module, general: list[int], item_texts: list[list[int]], window: int, stride: int,
            max_tokens: int) -> dict[str, float]:
    """Perplexity on held-out general English and on held-out item text (first ``max_tokens`` of each)."""
    was = lm.training
    lm.eval()
    dev = next(lm.parameters()).device
    items = [t for text in item_texts for t in text][:max_tokens]
    out = {"ppl_general": perplexity(lm, torch.tensor(general[:max_tokens], device=dev), window, stride)}
    if len(items) >= 2:
        out["ppl_items"] = perplexity(lm, torch.tensor(items, device=dev), window, stride)
    lm.train(was)
    return out


@torch.no_grad()
def greedy_continuation(causal_lm: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt``; the prompt is cut from the left so prompt + new tokens fit the
    LM's position window (new tokens at most half of it)."""
    window = max_positions(causal_lm)
    new = max(1, min(max_new_tokens, window // 2))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-(window - new):]
    x = torch.tensor([ids], device=next(causal_lm.parameters()).device)
    gen = causal_lm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(gen[0, x.size(1):], skip_special_tokens=True)


def generations(causal_lm: Any, tokenizer: Any, prompts: tuple[str, ...], max_new_tokens: int) -> list[str]:
    """Greedy continuations of fixed prompts (the same prompts before and after fine-tuning)."""
    return [greedy_continuation(causal_lm, tokenizer, p, max_new_tokens) for p in prompts]


ENFORCE: dict[str, Callable[[bool], bool]] = {
    "always": lambda pretrained: True,
    "pretrained": lambda pretrained: pretrained,  # a random-init LM has no language ability to protect
    "never": lambda pretrained: False,
}


def verdict(before: dict[str, float], after: dict[str, float], gcfg: GuardConfig, pretrained: bool) -> dict[str, Any]:
    """The guard's record: perplexities before/after, relative change, and whether promotion may go ahead."""
    if gcfg.enforce not in ENFORCE:
        raise ValueError(f"guard.enforce: {gcfg.enforce!r} unknown; choose from {sorted(ENFORCE)}")
    ok, message = ppl_gate(before["ppl_general"], after["ppl_general"], gcfg.max_ppl_increase)
    enforced = ENFORCE[gcfg.enforce](pretrained)
    if not pretrained and not enforced:  # a random-init LM has no language: nothing to protect, not a pass
        message = ("generation guard not applicable: the item tower was not pretrained (random init, no language "
                   f"to protect); general-English perplexity {before['ppl_general']:.2f} -> "
                   f"{after['ppl_general']:.2f} measured")
    elif not enforced:
        message += " (not enforced: guard.enforce=never)"
    rec: dict[str, Any] = {"applicable": pretrained, "ppl_general_before": before["ppl_general"], "ppl_general_after": after["ppl_general"],
                           "change": after["ppl_general"] / before["ppl_general"] - 1.0,
                           "max_increase": gcfg.max_ppl_increase, "passed": ok, "enforced": enforced,
                           "blocks_promotion": enforced and not ok, "message": message}
    if "ppl_items" in before and "ppl_items" in after:
        rec.update(ppl_items_before=before["ppl_items"], ppl_items_after=after["ppl_items"],
                   items_change=after["ppl_items"] / before["ppl_items"] - 1.0)
    return rec


def guard_inputs(cfg: NightlyConfig, items_uri: str) -> tuple[list[int], list[list[int]], int]:
    """The guard's measurement text: held-out general English and the held-out items' texts, as token ids;
    and the catalog's size."""
    g = cfg.guard
    general = corpus_ids(read_corpus(g.heldout_corpus, "heldout"), load_tokenizer(cfg.model.tokenizer))
    item_ids = storage.read_table(items_uri, columns=["input_ids"])["input_ids"].to_pylist()
    held = heldout_items(len(item_ids), g.heldout_item_every)
    return general, [t for t, h in zip(item_ids, held) if h], len(item_ids)


def measure_tower(g: GuardConfig, lm: nn.Module, general: list[int], held_texts: list[list[int]]) -> dict[str, float]:
    """:func:`measure` of a causal LM (an item tower's :meth:`ItemTower.lm`, or a transformers LM) with the
    guard's window, stride and token budget (the window at most the LM's positions)."""
    body = lm.backbone if hasattr(lm, "backbone") else lm
    window = min(g.eval_window, max_positions(body))
    return measure(lm, general, held_texts, window, min(g.eval_stride, max(1, window // 2)), g.eval_tokens)


def guard_report(cfg: NightlyConfig, items_uri: str, checkpoint: str) -> dict[str, Any]:
    """Perplexity of the item tower's LM before fine-tuning (the original pretrained or named-size
    weights, whatever the warm start) and after (the checkpoint), greedy generations, and the gate."""

    g, t0 = cfg.guard, time.time()
    tok = load_tokenizer(cfg.model.tokenizer)
    general, held_texts, n_items = guard_inputs(cfg, items_uri)
    out: dict[str, Any] = {}

    def measured(name: str, lm: nn.Module, causal_lm: Any) -> None:
        out[name] = measure_tower(g, lm, general, held_texts)
        out[f"generations_{name}"] = generations(causal_lm, tok, g.prompts, g.generate_tokens)

    frozen = cfg.model.item_tower.frozen
    if frozen:  # the model holds none of the LM's weights: one measurement is both before and after
        lm = load_causal_lm(cfg.model.item_tower.pretrained).eval()
        measured("before", lm, lm)
        out["after"], out["generations_after"] = out["before"], out["generations_before"]
    else:
        torch.manual_seed(cfg.train.seed)  # the same initial weights the workers started from
        for name, m in (("before", build_two_tower(cfg.model, n_items)), ("after", load_checkpoint(checkpoint)[0])):
            measured(name, m.item_tower.lm(), item_causal_lm(m.item_tower))
    rec = verdict(out["before"], out["after"], g, pretrained=bool(cfg.model.item_tower.pretrained))
    if frozen:
        rec["frozen"] = True
        rec["message"] += (" (the item LM is frozen: the model reads its cached text features and holds none of "
                           "its weights, so its language is unchanged by construction)")
    rec.update(prompts=list(g.prompts), generations_before=out["generations_before"],
               generations_after=out["generations_after"], heldout_tokens=min(len(general), g.eval_tokens),
               mechanisms={"lora": g.lora.enabled, "lm_weight": g.lm_weight, "item_lm_weight": g.item_lm_weight,
                           "kl_weight": g.kl_weight},
               measure_s=round(time.time() - t0, 1))
    return rec
