"""The config reference, generated from ``recsys_core/config.py`` itself so it cannot drift.

Each field's one-line doc is its trailing ``# comment``, or the comment block directly above it (its
first sentence); a section's doc is its field's comment, else its class docstring.
``recsys-core config show`` prints the resolved config as YAML with these docs beside the keys.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
from pathlib import Path
from typing import Any

import yaml

from recsys_core import config as config_module

Docs = dict[str, dict[str, str]]  # class name -> field name -> one-line doc


def _first_sentence(text: str) -> str:
    for end in (". ", "; "):
        if end in text:
            return text[: text.index(end) + 1].rstrip(";")
    return text


def parse_field_docs(source: str) -> Docs:
    """Field docs of every class in ``source`` (Python text), from comments found with tokenize."""
    comments: dict[int, str] = {}
    full_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                full_line.add(tok.start[0])
    docs: Docs = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, str] = {}
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            doc = comments.get(stmt.lineno) if stmt.lineno not in full_line else None
            if not doc:
                above, line = [], stmt.lineno - 1
                while line in full_line:
                    above.insert(0, comments[line])
                    line -= 1
                doc = _first_sentence(" ".join(above)) if above else ""
            fields[stmt.target.id] = doc
        docs[node.name] = fields
    return docs


def config_docs() -> Docs:
    """The docs of recsys_core/config.py as shipped."""
    return parse_field_docs(Path(config_module.__file__).read_text())


def _class_doc(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # dataclasses invent a signature docstring
        return ""
    return _first_sentence(" ".join(doc.split()))


def config_rows(cfg: Any, docs: Docs, prefix: str = "", depth: int = 0) -> list[tuple[int, str, Any, str, bool]]:
    """(depth, dotted key, value, doc, is_section) for every field of ``cfg``, sections before their keys."""
    rows: list[tuple[int, str, Any, str, bool]] = []
    own = docs.get(type(cfg).__name__, {})
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows.append((depth, key, None, own.get(f.name) or _class_doc(type(value)), True))
            rows.extend(config_rows(value, docs, f"{key}.", depth + 1))
        else:
            rows.append((depth, key, value, own.get(f.name, ""), False))
    return rows


def _yaml_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render_config(cfg: Any, docs: Docs | None = None, header: str = "") -> str:
    """The config as YAML (it loads back to the same config), each key followed by its doc."""
    docs = config_docs() if docs is None else docs
    body = []
    for depth, key, value, doc, section in config_rows(cfg, docs):
        name = key.rsplit(".", 1)[-1]
        body.append(("  " * depth + f"{name}:" + ("" if section else f" {_yaml_value(value)}"), doc))
    width = min(max(len(t) for t, _ in body) + 2, 56)
    lines = [f"# {h}" for h in header.splitlines()] if header else []
    lines += [f"{t.ljust(width - 2)}  # {d}" if d else t for t, d in body]
    return "\n".join(lines) + "\n"
