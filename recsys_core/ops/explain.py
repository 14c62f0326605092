"""Using the protected language model: a one-line description of a user's taste, generated greedily by
the item tower's LM from the user's most recent items (``python -m jobs.explain``).

The prompt names the user's last ``explain.max_history`` items (their catalog text) through the
``explain.prompt`` template; the continuation up to the first line break or sentence end is the
description. Written as ``explanations/run_date=D/explanations.parquet`` (its own folder, beside ``recommendations/``).
"""
from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from recsys_core import storage
from recsys_core.config import ExplainConfig
from recsys_core.data.text import load_tokenizer
from recsys_core.model.checkpoint import load_checkpoint
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


def sample_users(n_rows: int, n: int, seed: int) -> np.ndarray:
    """Sorted row indices of a reproducible sample of users."""
    if n >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, n, replace=False))


@torch.no_grad()
def describe_users(model_dir: str, users_uri: str, items_uri: str, tokenizer: str, ecfg: ExplainConfig,
                   model_version: str) -> pa.Table:
    """(user_id, prompt, description, model_version) for a sample of users."""
    tok = load_tokenizer(tokenizer)
    model, _ = load_checkpoint(model_dir)
    lm = item_causal_lm(model.item_tower)
    texts = storage.read_table(items_uri, columns=["text"])["text"].to_pylist()
    users = storage.read_table(users_uri, columns=["user_id", "items"])
    users = users.take(pa.array(sample_users(users.num_rows, ecfg.n_users, ecfg.seed)))
    rows: dict[str, list[Any]] = {"user_id": [], "prompt": [], "description": []}
    for uid, hist in zip(users["user_id"].to_pylist(), users["items"].to_pylist()):
        prompt = build_prompt(ecfg.prompt, [texts[i] for i in hist[-ecfg.max_history:]])
        rows["user_id"].append(uid)
        rows["prompt"].append(prompt)
        rows["description"].append(first_sentence(greedy_continuation(lm, tok, prompt, ecfg.max_new_tokens)))
    table = pa.table({"user_id": pa.array(rows["user_id"], users.schema.field("user_id").type),
                      "prompt": pa.array(rows["prompt"], pa.string()),
                      "description": pa.array(rows["description"], pa.string()),
                      "model_version": pa.array([model_version] * len(rows["user_id"]), pa.string())})
    log.info("described %d users' taste with the protected LM, e.g. %r", table.num_rows,
             rows["description"][0] if rows["description"] else "")
    return table
