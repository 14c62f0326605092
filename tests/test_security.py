"""Security: nothing is unpickled from storage, ids from the data stay data, every write stays under the root.

(Credentials never reaching any output is checked on S3, in tests/test_s3.py.)
"""
from __future__ import annotations

import ast
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import jobs.nightly
from recsys_core import storage
from recsys_core.config import load_config
from recsys_core.data.sources import synthetic_tables
from recsys_core.serve.publish import read_recommendations
from tests.conftest import REPO, assert_id_types

CODE = sorted([*(REPO / "recsys_core").rglob("*.py"), *(REPO / "jobs").rglob("*.py")])
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


# ----------------------------------------------------------------------------- weights: never unpickled


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _callee(call: ast.Call) -> str:
    """Dotted name of what is called: torch.load, np.load, AutoModel.from_pretrained, ..."""
    parts, node = [], call.func
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def unpickling_sites(source: str) -> list[str]:
    """Lines of ``source`` that could unpickle data (each as 'line: reason')."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for n in names:
                if n.split(".")[0] in UNPICKLING_MODULES:
                    found.append(f"{node.lineno}: imports {n}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in {a.name for a in node.names}:
                found.append(f"{node.lineno}: imports torch.load under another name")
        if not isinstance(node, ast.Call):
            continue
        name = _callee(node)
        if name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        allow = _kw(node, "allow_pickle")
        if name in ("np.load", "numpy.load") and allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
            found.append(f"{node.lineno}: {name} with allow_pickle")
        if name.endswith(".from_pretrained") and "Tokenizer" not in name \
                and not (_is_true(_kw(node, "use_safetensors")) or _kw(node, "gguf_file") is not None):
            found.append(f"{node.lineno}: {name} without use_safetensors=True (or a GGUF file)")
    return sorted(found, key=lambda s: int(s.split(":")[0]))


@pytest.mark.unit
def test_unpickling_sites_detector_on_hand_written_code():
    bad = ("import pickle\nfrom joblib import load\nimport torch, numpy as np\n"
           "torch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n"
           "AutoModelForCausalLM.from_pretrained(p)\nfrom torch import load\n")
    assert [s.split(":")[0] for s in unpickling_sites(bad)] == ["1", "2", "4", "5", "6", "7", "8"]
    good = ("import torch, numpy as np\ntorch.load(f, weights_only=True, map_location='cpu')\nnp.load(f)\n"
            "AutoModelForCausalLM.from_pretrained(p, use_safetensors=True)\n"
            "AutoModelForCausalLM.from_pretrained(d, gguf_file=n)\nAutoTokenizer.from_pretrained(p)\n")
    assert unpickling_sites(good) == []


@pytest.mark.unit
def test_code_never_unpickles_weights():
    assert len(CODE) > 10
    found = {str(p.relative_to(REPO)): s for p in CODE if (s := unpickling_sites(p.read_text()))}
    assert not found, f"weights must load from safetensors or torch.load(weights_only=True): {found}"


# ----------------------------------------------------------------------------- paths: ids stay data


@pytest.mark.unit
def test_join_refuses_parts_that_leave_the_base(tmp_path):
    for base in ("s3://bucket/root", str(tmp_path)):
        for part in ("..", "../x", "a/../../x", "/etc/passwd", "\\\\host\\share"):
            with pytest.raises(ValueError, match="refusing"):
                storage.join(base, "ok", part)
        assert storage.join(base, "a", "b.json").endswith("a/b.json")


def hostile(ids: list[int], kind: str, tmp: Path) -> list[str]:
    """Ids a careless path join would turn into writes outside the root (all land inside ``tmp``)."""
    shapes = [f"../../../escape-{kind}{{}}", f"a/b/escape-{kind}{{}}", f"{tmp}/abs-escape-{kind}{{}}",
              f"..\\escape-{kind}{{}}", f"escape-{kind}{{}}/..", f"run_date=2026-01-01/escape-{kind}{{}}"]
    return [shapes[i % len(shapes)].format(i) for i in ids]


@pytest.mark.integration
def test_ids_from_the_data_never_become_paths(ray_local, tmp_path):
    inputs, root = tmp_path / "input", tmp_path / "x" / "y" / "z" / "store"
    base = load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [])
    interactions, items = synthetic_tables(base.data.synthetic)
    users = hostile(interactions["user_id"].to_pylist(), "u", tmp_path)
    item_ids = hostile(items["item_id"].to_pylist(), "i", tmp_path)
    interactions = interactions.set_column(0, "user_id", pa.array(users)).set_column(
        1, "item_id", pa.array([item_ids[i] for i in interactions["item_id"].to_pylist()]))
    items = items.set_column(0, "item_id", pa.array(item_ids))
    storage.write_table(interactions, str(inputs / "interactions" / "part-0.parquet"))
    storage.write_table(items, str(inputs / "items.parquet"))
    before = {p for p in tmp_path.rglob("*")}

    cfg = load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [
        f"storage.root={root}", "data.source=parquet", f"data.interactions={inputs / 'interactions'}",
        f"data.items={inputs / 'items.parquet'}", "train.epochs=1", "eval.baselines=[popularity]", "eval.n_boot=50",
        "guard.eval_tokens=512", "guard.generate_tokens=4"])
    out = jobs.nightly.main(cfg=cfg, run_date="2026-11-27")

    # Every new file is under storage.root, and no path below it holds an id.
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert new and all(p.is_relative_to(root) for p in new), sorted(str(p) for p in new if not p.is_relative_to(root))
    leaked = [p for p in root.rglob("*") if "escape-" in p.name]
    assert not leaked, leaked

    # The ids came through as data: the recommendations name the hostile users and items verbatim.
    recs, manifest = read_recommendations(str(root / "recommendations" / "run_date=2026-11-27"))
    assert set(recs["user_id"].to_pylist()) == set(users)
    assert set(pc.list_flatten(recs["item_ids"]).to_pylist()) <= set(item_ids)
    assert manifest["rows"] == len(set(users))
    assert_id_types(out, pa.string())  # string ids stay strings in every output (issue 13)
