"""Registry, warm start, promotion gate, retention, report and history across three run dates
(local Ray, registry on moto S3, tiny synthetic data).

- day 1: first model ever -> promoted (guard permitting), published.
- day 2: warm-starts from day 1's model, evaluates it on day 2's holdout, is promoted.
- day 3: a deliberately worse model (lr 0, from scratch) on a grown catalog: NOT promoted; the
  production model (re-indexed to the new catalog) publishes; retention (keep 1) deletes day 1's
  model but keeps PRODUCTION.
"""
from __future__ import annotations

import uuid

import pytest

import jobs.nightly
from recsys_core import storage
from recsys_core.config import load_config
from recsys_core.ops import registry
from recsys_core.serve.publish import read_recommendations
from tests.conftest import REPO, S3_ENV

pytestmark = pytest.mark.integration
DAYS = ("2026-12-01", "2026-12-02", "2026-12-03")
BASE = ["train.epochs=3", "train.patience=3", "eval.n_boot=50", "data.synthetic.n_users=300",
        "guard.generate_tokens=4", "guard.eval_tokens=512"]
PER_DAY = {
    DAYS[0]: [],
    DAYS[1]: ["train.epochs=1", "registry.ndcg_tolerance=0.05"],
    DAYS[2]: ["train.epochs=1", "train.lr=0.0", "registry.warm_start=false", "registry.keep_versions=1",
              "data.synthetic.n_items=126"],
}


def cfg_for(root: str, day: str):
    return load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [f"storage.root={root}", *BASE, *PER_DAY[day]])


@pytest.fixture(scope="module")
def runs(ray_local):
    root = f"s3://recsys-test/promotion-{uuid.uuid4().hex[:8]}"
    out = {}
    for day in DAYS:
        out[day] = jobs.nightly.main(cfg=cfg_for(root, day), run_date=day)
    return root, out


def test_first_run_promotes_and_publishes(runs):
    root, out = runs
    d1 = out[DAYS[0]]
    v1 = d1["train"]["model_version"]
    assert registry.VERSION_RE.match(v1) and v1.startswith("20261201-")
    assert d1["train"]["parent"] is None and d1["train"]["warm_start"]["used"] is False
    assert d1["promote"]["decision"]["promote"] is True and d1["promote"]["production_before"] is None
    assert d1["infer"]["manifest"]["model_version"] == v1 and d1["infer"]["manifest"]["metrics"]["source"] == "new"


def test_second_run_warm_starts_from_and_evaluates_against_the_first(runs):
    root, out = runs
    d1, d2 = out[DAYS[0]], out[DAYS[1]]
    v1, v2 = d1["train"]["model_version"], d2["train"]["model_version"]
    assert d2["train"]["warm_start"]["used"] is True and d2["train"]["parent"] == v1
    lineage = storage.read_json(storage.join(root, "models", v2, "lineage.json"))
    assert lineage["parent"] == v1 and lineage["version"] == v2 and lineage["run_date"] == DAYS[1]
    assert lineage["input"]["rows_read"] == d2["prepare"]["stats"]["rows_read"]
    assert lineage["catalog"]["n_items"] == 120 and len(lineage["catalog"]["sha256"]) == 64
    assert lineage["code"]["package"] and lineage["tokenizer"]["name"] == "gpt2-offline"
    from recsys_core.data.text import (
        load_tokenizer,  # the version's own tokenizer folder loads (from S3)
    )

    assert len(load_tokenizer(storage.join(root, "models", v2, "tokenizer"))) == lineage["tokenizer"]["vocab_size"]
    catalog = storage.read_table(storage.join(root, "models", v2, "catalog.parquet"))
    assert catalog["item_id"].to_pylist() == list(range(120))
    # same data on both days: the production model scores day 2's holdout exactly as it scored day 1's
    p = d2["promote"]
    assert p["production_before"] == v1 and p["production_eval"]["model_version"] == v1
    assert p["production_eval"]["note"] == "same catalog"
    assert p["production_eval"]["metrics"]["ndcg@10"] == pytest.approx(d1["evaluate"]["metrics"]["model"]["ndcg@10"])
    assert p["decision"]["promote"] is True, p["decision"]["reason"]
    assert d2["infer"]["manifest"]["model_version"] == v2


def test_worse_model_is_not_promoted_and_production_publishes(runs):
    root, out = runs
    v2 = out[DAYS[1]]["train"]["model_version"]
    d3 = out[DAYS[2]]
    v3 = d3["train"]["model_version"]
    p = d3["promote"]
    assert d3["train"]["warm_start"] == {"used": False, "from": v2, "reason": "registry.warm_start is off"}
    assert p["decision"]["promote"] is False and "rejected: holdout NDCG@10" in p["decision"]["reason"]
    assert p["decision"]["new_ndcg"] < p["decision"]["production_ndcg"] - 0.01
    assert registry.production_version(root) == v2 == p["production"]
    # the catalog grew by 6 items: production was re-indexed (new items embedded from text alone)
    assert p["production_eval"]["note"].startswith("catalog changed: 120 of 126")
    recs, manifest = read_recommendations(d3["infer"]["recommendations"])
    assert manifest["model_version"] == v2 and set(recs["model_version"].to_pylist()) == {v2}
    assert recs.num_rows == d3["prepare"]["stats"]["users_kept"]
    m = manifest["metrics"]
    assert m["source"] == "production" and m["promotion"]["promote"] is False
    assert m["promotion"]["new_version"] == v3 and "production model" in m["promotion"]["publish_reason"]
    assert m["holdout"]["ndcg@10"] == pytest.approx(p["production_eval"]["metrics"]["ndcg@10"])
    assert {"ppl_general_before", "ppl_general_after"} <= set(m)
    assert max(max(r) for r in recs["item_ids"].to_pylist()) <= 125


def test_retention_keeps_newest_and_production(runs):
    root, out = runs
    v1, v2, v3 = (out[d]["train"]["model_version"] for d in DAYS)
    assert out[DAYS[2]]["promote"]["retention_deleted"] == [v1]
    assert registry.list_versions(root) == [v2, v3]
    assert storage.list_files(storage.join(root, "models", v1)) == []


def test_history_and_report(runs):
    root, out = runs
    hist = storage.read_table(storage.join(root, "history", "metrics.parquet"))
    assert hist["run_date"].to_pylist() == list(DAYS)
    assert hist["promoted"].to_pylist() == [True, True, False]
    assert hist["published_version"].to_pylist() == [out[d]["infer"]["manifest"]["model_version"] for d in
                                                      (DAYS[0], DAYS[1], DAYS[1])]
    page = storage.read_bytes(out[DAYS[2]]["report"]["report"]).decode()
    for section in ('id="decision"', 'id="training"', 'id="metrics"', 'id="guard"', 'id="data"', 'id="history"'):
        assert section in page
    assert "NOT PROMOTED" in page and page.count("data:image/png;base64,") >= 3
    assert all(d in page for d in DAYS)
    for uri in (out[DAYS[2]]["report"]["report"], storage.join(root, "models", "PRODUCTION"),
                storage.join(root, "evaluation", f"run_date={DAYS[2]}", "promotion.json"),
                storage.join(root, "models", out[DAYS[2]]["train"]["model_version"], "lineage.json")):
        assert S3_ENV["AWS_SECRET_ACCESS_KEY"].encode() not in storage.read_bytes(uri)


def test_rerun_of_a_finished_date_is_a_no_op(runs):
    root, out = runs
    pointer = storage.read_json(storage.join(root, "models", "PRODUCTION"))
    again = jobs.nightly.main(cfg=cfg_for(root, DAYS[1]), run_date=DAYS[1])
    assert again == out[DAYS[1]]
    assert storage.read_json(storage.join(root, "models", "PRODUCTION")) == pointer
    assert storage.read_table(storage.join(root, "history", "metrics.parquet")).num_rows == 3
