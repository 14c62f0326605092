"""Ids keep their type in every output (issue 13): int64 user and item ids come back as int64,
string ids as strings, in the published recommendations, holdout_recs.parquet and explanations.parquet.
Two tiny nightly runs (local Ray, 1 epoch) on a user-supplied parquet source written both ways."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import jobs.nightly
from recsys_core import storage
from recsys_core.config import SyntheticConfig, load_config
from recsys_core.data.sources import synthetic_tables
from recsys_core.serve.publish import read_recommendations
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _as_text(col: pa.ChunkedArray, prefix: str) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(prefix, pc.cast(col, pa.string()), "")


def write_source(folder: Path, kind: str) -> tuple[str, str]:
    inter, items = synthetic_tables(SyntheticConfig(n_users=40, n_items=30, n_topics=3, events_per_user=8))
    if kind == "string":
        inter = inter.set_column(0, "user_id", _as_text(inter["user_id"], "u"))
        inter = inter.set_column(1, "item_id", _as_text(inter["item_id"], "i"))
        items = items.set_column(0, "item_id", _as_text(items["item_id"], "i"))
    storage.write_table(inter, str(folder / "interactions" / "part-0.parquet"))
    storage.write_table(items, str(folder / "items.parquet"))
    return str(folder / "interactions"), str(folder / "items.parquet")


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    out = {}
    for kind in ("int64", "string"):
        base = tmp_path_factory.mktemp(kind)
        inter, items = write_source(base, kind)
        # no baselines: this run is about types; the gate then promotes the (guard-passing) first model
        cfg = load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [
            f"storage.root={base / 'store'}", "data.source=parquet", f"data.interactions={inter}",
            f"data.items={items}", "train.epochs=1", "eval.baselines=[]", "eval.n_boot=20",
            "guard.generate_tokens=2", "guard.eval_tokens=256", "explain.n_users=3", "explain.max_new_tokens=3"])
        out[kind] = jobs.nightly.main(cfg=cfg, run_date="2026-12-01")
    return out


@pytest.mark.parametrize("kind, id_type", [("int64", pa.int64()), ("string", pa.string())])
def test_ids_keep_their_type_end_to_end(runs, kind, id_type):
    out = runs[kind]
    assert out["infer"]["published"], out["promote"]["publish_reason"]
    users = storage.read_table(storage.join(out["prepare"]["prepared"], "users"))
    recs, _ = read_recommendations(out["infer"]["recommendations"])
    holdout = storage.read_table(storage.join(out["evaluate"]["eval_dir"], "holdout_recs.parquet"))
    expl = storage.read_table(out["explain"]["explanations"])
    for name, table in (("users", users), ("recommendations", recs), ("holdout_recs", holdout),
                        ("explanations", expl)):
        assert table.schema.field("user_id").type == id_type, (name, table.schema)
    for name, table in (("recommendations", recs), ("holdout_recs", holdout)):
        assert table.schema.field("item_ids").type == pa.list_(id_type), (name, table.schema)
    want = set(range(40)) if kind == "int64" else {f"u{u}" for u in range(40)}
    assert set(recs["user_id"].to_pylist()) == want
    items = {i for row in recs["item_ids"].to_pylist() for i in row}
    assert items <= (set(range(30)) if kind == "int64" else {f"i{i}" for i in range(30)})
