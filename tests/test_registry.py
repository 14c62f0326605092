"""Registry functions and the promotion gate, against hand-computed values (local folders, no Ray)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys_core import storage
from recsys_core.config import ModelConfig, TowerConfig
from recsys_core.data.text import load_tokenizer
from recsys_core.model.checkpoint import (
    MARKER,
    ModelSpec,
    load_checkpoint,
    save_checkpoint,
)
from recsys_core.model.towers import build_two_tower, encode_items
from recsys_core.ops import gate, registry, report
from recsys_core.ops.gate import ON_REJECT
from recsys_core.records import ModelSource

pytestmark = pytest.mark.unit


def make_version(root: str, version: str, complete: bool = True, lineage: dict | None = None) -> str:
    d = registry.version_dir(root, version)
    storage.write_bytes(storage.join(d, "model.safetensors"), b"w")
    if lineage is not None:
        storage.write_json(storage.join(d, registry.LINEAGE), lineage)
    if complete:
        storage.write_bytes(storage.join(d, MARKER), b"ok\n")
    return d


# ----------------------------------------------------------------------------- versions, pointer, retention


def test_version_ids_are_validated_before_becoming_paths(tmp_path):
    for bad in ("../x", "20260101", "20260101-120000/..", "user-42", "20260101-120000-UPPER", ""):
        with pytest.raises(ValueError, match="YYYYMMDD-HHMMSS"):
            registry.version_dir(str(tmp_path), bad)
    assert registry.version_dir(str(tmp_path), "20260101-120000-ab12cd").endswith("models/20260101-120000-ab12cd")


def test_new_version_from_run_date_and_clock_gets_a_suffix_when_taken(tmp_path):
    root = str(tmp_path)
    now = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
    v = registry.new_version(root, "2026-11-27", now=now)
    assert v == "20261127-221320"
    make_version(root, v, complete=False)  # even a partial folder takes the name
    v2 = registry.new_version(root, "2026-11-27", now=now)
    assert v2.startswith("20261127-221320-") and len(v2) == len("20261127-221320-") + 6


def test_list_versions_only_complete_ones_sorted(tmp_path):
    root = str(tmp_path)
    make_version(root, "20261128-010000")
    make_version(root, "20261127-235959")
    make_version(root, "20261129-000000", complete=False)
    storage.write_bytes(storage.join(root, "models", "not-a-version", MARKER), b"ok\n")
    assert registry.list_versions(root) == ["20261127-235959", "20261128-010000"]
    assert registry.incomplete_versions(root, "2026-11-29") == ["20261129-000000"]
    assert registry.incomplete_versions(root, "2026-11-28") == []


def test_versions_in_parses_marker_paths():
    paths = ["s3://b/p/models/20260101-000000/_COMPLETE", "s3://b/p/models/20260101-000000/model.safetensors",
             "/x/models/20260102-000000-abc/_COMPLETE", "/x/models/PRODUCTION", "/x/models/bad/_COMPLETE"]
    assert registry.versions_in(paths, "_COMPLETE") == ["20260101-000000", "20260102-000000-abc"]


def test_promote_writes_pointer_only_for_complete_versions(tmp_path):
    root = str(tmp_path)
    assert registry.production(root) is None and registry.production_version(root) is None
    make_version(root, "20261127-000000", complete=False)
    with pytest.raises(FileNotFoundError, match="not complete"):
        registry.promote(root, "20261127-000000", "2026-11-27", "test")
    assert not storage.exists(storage.join(root, "models", registry.POINTER))
    make_version(root, "20261128-000000")
    p = registry.promote(root, "20261128-000000", "2026-11-28", "first", previous=None)
    assert registry.production_version(root) == "20261128-000000"
    stored = json.loads((tmp_path / "models" / "PRODUCTION").read_text())
    assert stored == p and set(p) == {"version", "run_date", "reason", "previous", "promoted_at"}


def test_pointer_to_a_missing_version_is_an_error_naming_the_file(tmp_path):
    root = str(tmp_path)
    storage.write_json(storage.join(root, "models", "PRODUCTION"), {"version": "20261128-000000"})
    with pytest.raises(FileNotFoundError, match="PRODUCTION names version"):
        registry.production(root)


def test_retention_plan_keeps_newest_and_protected():
    vs = ["20260101-000000", "20260102-000000", "20260103-000000", "20260104-000000"]
    assert registry.retention_plan(vs, 2, []) == ["20260101-000000", "20260102-000000"]
    assert registry.retention_plan(vs, 1, ["20260101-000000", None]) == ["20260102-000000", "20260103-000000"]
    assert registry.retention_plan(vs, 10, []) == []
    with pytest.raises(ValueError, match="keep_versions"):
        registry.retention_plan(vs, 0, [])


def test_apply_retention_deletes_folders_but_never_production(tmp_path):
    root = str(tmp_path)
    for v in ("20260101-000000", "20260102-000000", "20260103-000000"):
        make_version(root, v)
    registry.promote(root, "20260101-000000", "2026-01-01", "oldest is production")
    deleted = registry.apply_retention(root, 1, protect=[registry.production_version(root)])
    assert deleted == ["20260102-000000"]
    assert registry.list_versions(root) == ["20260101-000000", "20260103-000000"]
    assert not (tmp_path / "models" / "20260102-000000").exists()


# ----------------------------------------------------------------------------- catalog and lineage


def test_catalog_hash_depends_on_ids_and_order():
    a = registry.catalog_hash(pa.array([3, 1, 2]))
    assert a == registry.catalog_hash(pa.chunked_array([[3], [1, 2]]).combine_chunks())
    assert a != registry.catalog_hash(pa.array([1, 2, 3]))
    assert a != registry.catalog_hash(pa.array(["3", "1", "2"]))
    assert registry.catalog_hash(pa.array(["a", "b"])) != registry.catalog_hash(pa.array(["ab"]))


def test_id_map_and_reindexed_rows_by_hand():
    mapping = registry.id_map(pa.array(["a", "b", "c"]), pa.array(["c", "z", "a"]))
    assert mapping.tolist() == [2, -1, 0]
    weight = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=np.float32)
    known = np.array([1.0, 0.0, 1.0], dtype=np.float32)
    w, k = registry.reindex_item_rows(weight, known, mapping)
    assert w.tolist() == [[3.0, 3.0], [0.0, 0.0], [1.0, 1.0]] and w.dtype == np.float32
    assert k.tolist() == [1.0, 0.0, 1.0]
    w, k = registry.reindex_item_rows(None, known, np.array([1, -1]))
    assert w is None and k.tolist() == [0.0, 0.0]


def test_warm_start_and_comparability_checks():
    cfg = {"model": {"embed_dim": 32, "tokenizer": "gpt2-offline", "max_text_tokens": 16},
           "guard": {"lora": {"enabled": False}}, "train": {"lr": 0.001}}
    same_arch = {"config": {**cfg, "train": {"lr": 0.5}}}
    assert registry.warm_start_check(same_arch, cfg) == (True, "same architecture")
    other = {"config": {**cfg, "model": {**cfg["model"], "embed_dim": 64}}}
    ok, why = registry.warm_start_check(other, cfg)
    assert not ok and "model.embed_dim" in why
    assert registry.warm_start_check(None, cfg)[0] is False
    assert registry.comparable_check(other, cfg)[0] is True  # a different size still scores today's data
    longer = {"config": {**cfg, "model": {**cfg["model"], "max_text_tokens": 8}}}
    ok, why = registry.comparable_check(longer, cfg)
    assert not ok and "max_text_tokens 16 > 8" in why
    tok = {"config": {**cfg, "model": {**cfg["model"], "tokenizer": "other"}}}
    assert registry.comparable_check(tok, cfg)[0] is False


def test_config_diff_nested_and_list_vs_tuple():
    assert registry.config_diff({"a": {"b": (1, 2), "c": 1}}, {"a": {"b": [1, 2], "c": 2}, "d": 0}) == ["a.c", "d"]


def test_save_tokenizer_copies_a_loadable_tokenizer_into_the_version(tmp_path):
    d = registry.version_dir(str(tmp_path), "20260101-000000")
    rec = registry.save_tokenizer("gpt2-offline", d)
    assert rec["name"] == "gpt2-offline" and rec["vocab_size"] == 50257 and rec["folder"] == "tokenizer"
    copy = load_tokenizer(storage.join(d, "tokenizer"))
    assert copy("The rocket and the orbit")["input_ids"] == load_tokenizer("gpt2-offline")("The rocket and the orbit")["input_ids"]
    missing = registry.save_tokenizer(str(tmp_path / "no-such-tokenizer"), str(tmp_path / "v2"))
    assert "load_error" in missing and not (tmp_path / "v2").exists()


def test_on_catalog_reindexes_a_real_checkpoint(tmp_path):
    """Known items keep their vectors; an item the production model never had is embedded from text alone."""

    torch.manual_seed(0)
    cfg = ModelConfig(item_tower=TowerConfig(size="tiny", dropout=0.0), user_tower=TowerConfig(size="tiny", dropout=0.0),
                      embed_dim=8, max_seq_len=4, max_text_tokens=8)
    model = build_two_tower(cfg, n_items=3).eval()
    root = str(tmp_path)
    d = registry.version_dir(root, "20260101-000000")
    save_checkpoint(model, ModelSpec.of(model), d)
    old_ids = pa.array([10, 20, 30])
    registry.write_version_files(d, {"catalog": {"sha256": registry.catalog_hash(old_ids)}}, old_ids)
    same, note = registry.on_catalog(root, "20260101-000000", old_ids, registry.catalog_hash(old_ids), str(tmp_path / "w"))
    assert same == d and note == "same catalog"

    new_ids = pa.array([30, 99, 10, 20])
    dest, note = registry.on_catalog(root, "20260101-000000", new_ids, registry.catalog_hash(new_ids),
                                     str(tmp_path / "w"))
    assert dest != d and "3 of 4" in note
    moved, meta = load_checkpoint(dest)
    assert moved.n_items == 4 and meta["reindexed_from"] == "20260101-000000"
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50257, (3, 6), generator=g)
    mask = torch.ones_like(tokens)
    old = encode_items(model, tokens, mask)  # rows: items 10, 20, 30
    new_tokens = torch.stack([tokens[2], tokens[0], tokens[0], tokens[1]])  # 30, 99 (text of 10), 10, 20
    new = encode_items(moved, new_tokens, torch.ones_like(new_tokens))
    torch.testing.assert_close(new[[0, 2, 3]], old[[2, 0, 1]])
    text_only = model.item_tower.text_embed(tokens[:1], mask[:1])[0]
    torch.testing.assert_close(new[1], text_only)


def test_published_dir_is_the_refit_and_it_is_reindexed_on_its_own(tmp_path):
    """A version with a refit publishes the refit (re-indexed from its own weights, the version's catalog);
    without one, its own weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(item_tower=TowerConfig(size="tiny", dropout=0.0), user_tower=TowerConfig(size="tiny", dropout=0.0),
                      embed_dim=8, max_seq_len=4, max_text_tokens=8)
    selection, refit = build_two_tower(cfg, n_items=3).eval(), build_two_tower(cfg, n_items=3).eval()
    root, version = str(tmp_path / "root"), "20260101-000000"
    ids = pa.array([10, 20, 30])
    for model, folder in ((selection, "a"), (refit, "b")):
        save_checkpoint(model, ModelSpec.of(model), str(tmp_path / folder))
    registry.register_version(root, version, str(tmp_path / "a"), metrics={}, item_ids=ids, tokenizer="gpt2-offline",
                              lineage={"catalog": {"sha256": registry.catalog_hash(ids)}})
    d = registry.version_dir(root, version)
    assert registry.published_dir(root, version) == d  # no refit: the selection weights publish
    other = "20260102-000000"
    registry.register_version(root, other, str(tmp_path / "a"), metrics={}, item_ids=ids, tokenizer="gpt2-offline",
                              lineage={"catalog": {"sha256": registry.catalog_hash(ids)}}, refit=str(tmp_path / "b"))
    pub = registry.published_dir(root, other)
    assert pub == storage.join(registry.version_dir(root, other), registry.REFIT) and registry.is_complete(root, other)
    assert registry.on_catalog(root, other, ids, registry.catalog_hash(ids), str(tmp_path / "w"), published=True)[0] == pub
    new_ids = pa.array([30, 10, 20])
    dest, _ = registry.on_catalog(root, other, new_ids, registry.catalog_hash(new_ids), str(tmp_path / "w"),
                                  published=True)
    sel_dest, _ = registry.on_catalog(root, other, new_ids, registry.catalog_hash(new_ids), str(tmp_path / "w"))
    assert dest != sel_dest
    tokens = torch.randint(0, 50257, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    moved, _ = load_checkpoint(dest)
    torch.testing.assert_close(encode_items(moved, tokens[[2, 0, 1]], mask), encode_items(refit, tokens, mask)[[2, 0, 1]])
    assert not torch.allclose(encode_items(load_checkpoint(sel_dest)[0], tokens[[2, 0, 1]], mask),
                              encode_items(refit, tokens, mask)[[2, 0, 1]])


# ----------------------------------------------------------------------------- the gate


GUARD_OK = {"passed": True, "enforced": True, "message": "generation guard passed: ..."}
GUARD_FAIL = {"passed": False, "enforced": True, "message": "generation guard FAILED: 10.00 -> 12.00"}


@pytest.mark.parametrize("new, prod, tol, guard, promote, words", [
    (0.30, None, 0.01, None, True, "no production model yet"),  # first run
    (0.30, None, 0.01, GUARD_FAIL, False, "FAILED"),  # first run, guard enforced and failed
    (0.295, 0.30, 0.01, GUARD_OK, True, "0.2950 >= production 0.3000"),  # within tolerance
    (0.29, 0.30, 0.01, GUARD_OK, True, ">="),  # exactly at the floor 0.30 - 0.01
    (0.2899, 0.30, 0.01, GUARD_OK, False, "0.2899 < production 0.3000 - tolerance 0.0100 = 0.2900"),
    (0.40, 0.30, 0.0, GUARD_FAIL, False, "FAILED"),  # better NDCG does not outvote the guard
    (0.40, 0.30, 0.0, {**GUARD_FAIL, "enforced": False}, True, "(not enforced)"),
    (0.10, 0.30, 0.5, None, True, "no generation-guard record"),
])
def test_gate_decision_by_hand(new, prod, tol, guard, promote, words):
    d = gate.gate_decision(new, prod, tol, guard)
    assert d.promote is promote, d.reason
    assert words in d.reason
    assert d.to_dict()["production_ndcg"] == prod


@pytest.mark.parametrize("policy, has_prod, published", [
    ("production", True, True), ("production", False, False), ("none", True, False)])
def test_on_reject_policies(policy, has_prod, published):
    prod = ModelSource(model_version="20261201-000000", model_dir="m", role="production", item_embeddings="e.npy",
                       max_seq_len=5, metrics={}) if has_prod else None
    src, why = ON_REJECT[policy](prod, prod and prod.model_version)
    assert (src is not None) is published and why


# ----------------------------------------------------------------------------- history rows


def test_history_upsert_replaces_the_same_date_and_unions_columns(tmp_path):
    rows = report.upsert([], {"run_date": "2026-01-02", "model_ndcg@10": 0.2})
    rows = report.upsert(rows, {"run_date": "2026-01-01", "model_ndcg@10": 0.1})
    rows = report.upsert(rows, {"run_date": "2026-01-02", "model_ndcg@10": 0.3, "extra": 1})
    assert [(r["run_date"], r["model_ndcg@10"]) for r in rows] == [("2026-01-01", 0.1), ("2026-01-02", 0.3)]
    t = report.rows_to_table(rows)
    assert t.column_names == ["run_date", "extra", "model_ndcg@10"] and t["extra"].to_pylist() == [None, 1]


def fake_records(promote: bool) -> dict:
    m = {"ndcg@10": 0.3, "ndcg@10_ci_low": 0.25, "ndcg@10_ci_high": 0.35, "recall@10": 0.4, "n_users": 10}
    base = {"popularity": {"ndcg@10": 0.05, "recall@10": 0.1, "n_users": 10}}
    guard = {"ppl_general_before": 20.0, "ppl_general_after": 21.0, "ppl_items_before": 30.0, "ppl_items_after": 25.0,
             "passed": True, "enforced": True, "message": "generation guard passed", "prompts": ["<b>p</b>"],
             "generations_before": ["<script>x</script>"], "generations_after": ["ok"]}
    return {
        "prepare": {"stats": {"rows_read": 100, "rows_good": 98, "rows_rejected": 2, "users_kept": 10, "items": 5,
                              "rejected_by_reason": {"duplicate": 2}, "source": "test"}},
        "train": {"model_version": "20260102-000000", "parent": "20260101-000000", "guard": guard,
                  "warm_start": {"used": True, "reason": "same catalog"}, "best": {"val_ndcg10": 0.31},
                  "history": [{"epoch": 0, "train_loss": 2.0, "val_ndcg10": 0.2},
                              {"epoch": 1, "train_loss": 1.5, "val_ndcg10": 0.31}]},
        "evaluate": {"metrics": {"model": m, "baselines": base}},
        "promote": {"decision": gate.gate_decision(0.3, 0.35 if not promote else 0.29, 0.01, guard).to_dict(),
                    "production_before": "20260101-000000", "production": "20260101-000000",
                    "production_eval": {"model_version": "20260101-000000", "metrics": {"ndcg@10": 0.35}},
                    "publish_reason": "recommendations from the production model", "retention_deleted": []},
        "infer": {"published": True, "recommendations": "/x/recommendations/run_date=2026-01-02",
                  "manifest": {"rows": 10, "model_version": "20260101-000000"}},
    }


def test_history_row_and_report_sections_escaped():
    recs = fake_records(promote=False)
    row = report.history_row("2026-01-02", recs)
    assert row["promoted"] is False and row["published_version"] == "20260101-000000"
    assert row["model_ndcg@10"] == 0.3 and "model_ndcg@10_ci_low" not in row and row["popularity_ndcg@10"] == 0.05
    assert row["compared_ndcg@10"] == 0.35 and row["ppl_general_after"] == 21.0 and row["rows_rejected"] == 2
    page = report.render("2026-01-02", recs, [row])
    for key in ("decision", "training", "metrics", "guard", "data", "history"):
        assert f'id="{key}"' in page
    assert "NOT PROMOTED" in page and "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("data:image/png;base64,") == 4
