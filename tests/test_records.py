"""Stage records round-trip through their stored JSON, nested records typed again."""
from __future__ import annotations

import json

import pytest

from recsys_core.records import STAGE_RECORDS, ModelSource, PromoteRecord, TrainRecord

pytestmark = pytest.mark.unit


def test_promote_record_round_trips_with_nested_sources():
    src = ModelSource(model_version="v1", model_dir="/m/v1", role="new", item_embeddings="/m/v1/e.npy",
                      max_seq_len=50, metrics={"ndcg@10": 0.1})
    rec = PromoteRecord(decision={"promote": True}, model_version="v1", production_before=None, production="v1",
                        production_eval=None, publish=src, publish_reason="passed", retention_deleted=[])
    stored = json.loads(json.dumps({**rec.to_json(), "stage": "promote", "wall_s": 1.0}))  # bookkeeping keys too
    back = PromoteRecord.from_json(stored)
    assert back == rec
    assert isinstance(back.publish, ModelSource) and back.publish.item_embeddings == "/m/v1/e.npy"
    assert back.production_eval is None


def test_every_stage_has_a_record_type():
    assert set(STAGE_RECORDS) == {"prepare", "train", "evaluate", "promote", "infer", "report", "explain"}
    t = TrainRecord(model_version="v", model_dir="d", best={}, history=[], guard=None, parent=None, warm_start={})
    assert STAGE_RECORDS["train"].from_json(t.to_json()) == t
