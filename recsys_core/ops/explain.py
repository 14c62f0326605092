"""Using the protected language model: a one-line description of a user's taste, generated greedily by
the item tower's LM from the user's most recent items (``python -m jobs.explain``).

- The prompt names the user's last ``explain.max_history`` items (their catalog text: title, year, genres).
  An instruct LM (its tokenizer has a chat template, e.g. SmolLM2-Instruct) gets ``explain.instruction`` as
  the user turn; any other LM continues ``explain.prompt``. The continuation up to the first line break or
  sentence end is the description.
- Every run measures two shares (:func:`description_quality`): descriptions free of degenerate repetition
  (no word 3-gram three or more times) and descriptions grounded in the user's history (naming a genre or
  title word of it). Below ``explain.min_clean_share`` / ``min_grounded_share`` nothing is published
  (:func:`description_bar`), and an item LM that was never pretrained is not asked at all.
- Written as ``explanations/run_date=D/explanations.parquet`` (its own folder, beside ``recommendations/``).
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from recsys_core import storage
from recsys_core.config import ExplainConfig
from recsys_core.data.text import load_tokenizer
from recsys_core.model.checkpoint import load_checkpoint
from recsys_core.model.pretrained import load_causal_lm
from recsys_core.model.towers import item_causal_lm
from recsys_core.train.guard import greedy_continuation

log = logging.getLogger(__name__)
_END = re.compile(r"[\n.!?]")


def first_sentence(text: str) -> str:
    """The continuation up to (and including) its first sentence end, or its first line."""
    m = _END.search(text)
    if m is None:
        return text.strip()
    return text[: m.end()].strip() if m.group() != "\n" else text[: m.start()].strip()


def build_prompt(template: str, item_texts: list[str]) -> str:
    return template.format(items="; ".join(t.strip().rstrip(".") for t in item_texts))


def chat_prompt(tokenizer: Any, instruction: str, item_texts: list[str]) -> str:
    """The instruct LM's own chat template around the instruction (one user turn, generation prompt open)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": build_prompt(instruction, item_texts)}],
                                         add_generation_prompt=True, tokenize=False)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_WORD = re.compile(r"[a-z]+")
# Words that never ground a description: function words and the catalog template's own fixed words.
STOPWORDS = frozenset(["a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "genres", "has", "have", "he", "her", "his", "i", "in", "is", "it", "its", "me", "my", "of", "on", "or", "she", "that", "the", "their", "them", "they", "this", "to", "was", "were", "with", "you", "your", "film", "films", "movie", "movies", "viewer", "viewers", "taste"])


def words(text: str) -> list[str]:
    """Lower-case alphabetic words."""
    return _WORD.findall(text.lower())


def repetitive(text: str, n: int = 3, times: int = 3) -> bool:
    """Degenerate repetition: some word n-gram occurs ``times`` or more times."""
    w = words(text)
    grams = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return any(c >= times for c in grams.values())


def stem(word: str) -> str:
    """A crude stem that lets "dramas"/"dramatic" meet "Drama" and "comedies" meet "Comedy": the first five letters."""
    return word[:5]


def grounding_stems(item_texts: Sequence[str]) -> set[str]:
    """Stems of the genre and title words of a history (three letters or more, stopwords out)."""
    return {stem(w) for t in item_texts for w in words(t) if len(w) >= 3 and w not in STOPWORDS}


def grounded(description: str, item_texts: Sequence[str]) -> bool:
    """Whether the description names at least one genre or title word of the items it describes."""
    return bool(grounding_stems([description]) & grounding_stems(item_texts))


def description_quality(descriptions: Sequence[str], histories: Sequence[Sequence[str]]) -> dict[str, float]:
    """Shares over the described users: ``clean_share`` (no degenerate repetition, not empty) and
    ``grounded_share`` (names a genre or title word of that user's history)."""
    n = len(descriptions)
    if n == 0:
        return {"n": 0, "clean_share": 0.0, "grounded_share": 0.0}
    clean = sum(bool(d.strip()) and not repetitive(d) for d in descriptions)
    ground = sum(grounded(d, h) for d, h in zip(descriptions, histories))
    return {"n": n, "clean_share": clean / n, "grounded_share": ground / n}


def description_bar(quality: dict[str, float], ecfg: ExplainConfig) -> tuple[bool, str]:
    """Whether descriptions of this quality are published; the sentence says why (not)."""
    got = (f"{quality['clean_share']:.0%} of {quality['n']} descriptions free of degenerate repetition "
           f"(bar {ecfg.min_clean_share:.0%}), {quality['grounded_share']:.0%} grounded in the user's history "
           f"(bar {ecfg.min_grounded_share:.0%})")
    ok = quality["n"] > 0 and (quality["clean_share"] >= ecfg.min_clean_share
                               and quality["grounded_share"] >= ecfg.min_grounded_share)
    return ok, ("published: " if ok else "withheld, below the bar: ") + got


def sample_users(n_rows: int, n: int, seed: int) -> np.ndarray:
    """Sorted row indices of a reproducible sample of users."""
    if n >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, n, replace=False))


@torch.no_grad()
def describe_users(model_dir: str, users_uri: str, items_uri: str, tokenizer: str, ecfg: ExplainConfig,
                   model_version: str, frozen_lm: str | None = None) -> tuple[pa.Table, dict[str, float]]:
    """(user_id, prompt, description, model_version) for a sample of users, and the descriptions' quality.
    The LM is the checkpoint's item tower, or ``frozen_lm`` (by name) when the tower reads a frozen LM's features."""
    tok = load_tokenizer(tokenizer)
    if frozen_lm:
        lm = load_causal_lm(frozen_lm).eval()
    else:
        model, _ = load_checkpoint(model_dir)
        lm = item_causal_lm(model.item_tower)
    chat = has_chat_template(tok)
    texts = storage.read_table(items_uri, columns=["text"])["text"].to_pylist()
    n_rows = storage.parquet_totals(users_uri)[0]
    users = storage.take_rows(users_uri, sample_users(n_rows, ecfg.n_users, ecfg.seed)).select(["user_id", "items"])
    rows: dict[str, list[Any]] = {"user_id": [], "prompt": [], "description": []}
    histories: list[list[str]] = []
    for uid, hist in zip(users["user_id"].to_pylist(), users["items"].to_pylist()):
        recent = [texts[i] for i in hist[-ecfg.max_history:]]
        prompt = chat_prompt(tok, ecfg.instruction, recent) if chat else build_prompt(ecfg.prompt, recent)
        rows["user_id"].append(uid)
        rows["prompt"].append(prompt)
        rows["description"].append(first_sentence(greedy_continuation(lm, tok, prompt, ecfg.max_new_tokens)))
        histories.append(recent)
    table = pa.table({"user_id": pa.array(rows["user_id"], users.schema.field("user_id").type),
                      "prompt": pa.array(rows["prompt"], pa.string()),
                      "description": pa.array(rows["description"], pa.string()),
                      "model_version": pa.array([model_version] * len(rows["user_id"]), pa.string())})
    quality = description_quality(rows["description"], histories)
    log.info("described %d users' taste with the protected LM (%.0f%% clean, %.0f%% grounded), e.g. %r",
             table.num_rows, 100 * quality["clean_share"], 100 * quality["grounded_share"],
             rows["description"][0] if rows["description"] else "")
    return table, quality
