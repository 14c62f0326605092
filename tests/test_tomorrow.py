"""Issue 13 through the real pipeline (local Ray, tiny data, 1 epoch):

- the gate refuses, on the first run ever, a model that cannot learn (lr 0) because it does not beat
  the best baseline: nothing is promoted or published;
- a three-date run on a parquet log that grows by one day per date: day 2 and day 3 score the previous
  date's published recommendations against the events since (the online proxy) in
  history/metrics.parquet, metrics.json and the report;
- the published model of date 1 is a refit on every event (validation and test included) for the
  selected epochs, its windows checked by hand; warm start reads the selection weights; date 3
  (train.refit off) publishes its selection model;
- ids keep their type end to end: int64 in -> int64 out (the three-date run; strings stay strings in
  tests/test_security.py, whose hostile ids are strings).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import jobs.nightly
from recsys_core import storage
from recsys_core.config import SyntheticConfig, load_config
from recsys_core.data.prepare import PreparedPaths
from recsys_core.data.sources import synthetic_tables
from recsys_core.ops import registry
from recsys_core.serve.publish import read_recommendations
from tests.conftest import REPO, assert_id_types

pytestmark = pytest.mark.integration
DAYS = ("2026-12-01", "2026-12-02", "2026-12-03")
N_USERS, N_ITEMS, EVENTS = 60, 30, 10
T0, DAY = 1_700_000_000, 86_400
FAST = ["train.epochs=1", "eval.n_boot=20", "guard.generate_tokens=2", "guard.eval_tokens=256", "explain.n_users=3",
        "explain.max_new_tokens=3"]


def daily_log(kind: str, n_users: int = N_USERS, n_items: int = N_ITEMS) -> tuple[pa.Table, pa.Table]:
    """Synthetic tastes, re-timed so that every user has exactly one event per day (days 0..9, user u
    at +60u seconds): a cut at day d keeps d events of every user."""
    inter, items = synthetic_tables(SyntheticConfig(n_users=n_users, n_items=n_items, n_topics=3,
                                                    events_per_user=EVENTS))
    user = inter["user_id"].to_numpy()
    idx = np.arange(inter.num_rows) % EVENTS  # the generator writes each user's events in order
    inter = inter.set_column(2, "ts", pa.array(T0 + idx * DAY + user * 60, pa.int64()))
    if kind == "string":
        text = lambda col, p: pc.binary_join_element_wise(p, pc.cast(col, pa.string()), "")
        inter = inter.set_column(0, "user_id", text(inter["user_id"], "u")).set_column(1, "item_id",
                                                                                       text(inter["item_id"], "i"))
        items = items.set_column(0, "item_id", text(items["item_id"], "i"))
    return inter, items


def write_cut(folder: Path, inter: pa.Table, items: pa.Table, days: int) -> list[str]:
    """The log up to (not including) day ``days`` as a parquet source; its config overrides."""
    cut = inter.filter(pc.less(inter["ts"], T0 + days * DAY))
    storage.write_table(cut, str(folder / "interactions" / "part-0.parquet"))
    storage.write_table(items, str(folder / "items.parquet"))
    return ["data.source=parquet", f"data.interactions={folder / 'interactions'}", f"data.items={folder / 'items.parquet'}"]


def cfg_for(root: Path, extra: list[str]):
    return load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [f"storage.root={root}", *FAST, *extra])


@pytest.fixture(scope="module")
def first_run_lr0(ray_local, tmp_path_factory):
    """The first run ever, lr 0, under the temporal protocol (cutoff 10% of the span before the end:
    day 9 is after it, every user has history before and an event after)."""
    base = tmp_path_factory.mktemp("gate")
    src = write_cut(base / "src", *daily_log("int64", n_users=100, n_items=120), EVENTS)
    cfg = cfg_for(base / "store", [*src, "train.lr=0.0", "eval.protocol=temporal", "eval.temporal_fraction=0.1",
                                   "eval.baselines=[popularity,recent_popularity,itemknn,ease]"])
    return base / "store", jobs.nightly.main(cfg=cfg, run_date=DAYS[0])


@pytest.fixture(scope="module")
def three_dates(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("dates")
    inter, items = daily_log("int64")
    out = {}
    for d, day in enumerate(DAYS):
        src = write_cut(base / f"src{d}", inter, items, EVENTS - 2 + d)
        # every date promotes (no baselines, any NDCG within tolerance): this run is not about the gate;
        # date 1 publishes a refit (scored by the online proxy on date 2), dates 2 and 3 do not
        refit = "train.refit=" + ("true" if d == 0 else "false")
        out[day] = jobs.nightly.main(cfg=cfg_for(base / "store", [*src, "eval.baselines=[]", refit,
                                                                   "registry.ndcg_tolerance=1.0"]), run_date=day)
    return base / "store", inter, out


def test_first_model_below_the_best_baseline_is_not_promoted(first_run_lr0):
    root, out = first_run_lr0
    m, d = out["evaluate"]["metrics"], out["promote"]["decision"]
    best = max(m["baselines"], key=lambda b: m["baselines"][b]["ndcg@10"])
    assert set(m["baselines"]) == {"popularity", "recent_popularity", "itemknn", "ease"}
    assert m["model"]["ndcg@10"] < m["baselines"][best]["ndcg@10"]  # lr 0: the untrained model
    assert d["promote"] is False and out["promote"]["production_before"] is None
    assert d["baseline"] == best and d["baseline_ndcg"] == pytest.approx(m["baselines"][best]["ndcg@10"])
    assert f"does not beat the best baseline {best}" in d["reason"]
    assert registry.production_version(str(root)) is None
    assert out["infer"]["published"] is False and out["explain"]["explanations"] is None
    # the choices of window and lambda were made on validation and are recorded
    sel = m["baseline_selection"]
    assert sel["recent_popularity"]["param"] in (7, 14, 30, 90, 0) and len(sel["ease"]["validation"]) == 5
    hist = storage.read_table(str(root / "history" / "metrics.parquet")).to_pylist()
    assert [r["promoted"] for r in hist] == [False] and hist[0]["published_version"] is None


def test_temporal_protocol_through_the_pipeline(first_run_lr0):
    root, out = first_run_lr0
    split = out["prepare"]["stats"]["split"]
    newest = T0 + (EVENTS - 1) * DAY + 99 * 60
    assert split["protocol"] == "temporal" and split["cutoff"] == newest - int(0.1 * (newest - T0))
    assert split["users_no_history"] == 0 and split["val_users"] + split["test_users"] == 100
    assert 20 < split["test_users"] < 80  # a stable hash splits the users about half and half
    metrics = storage.read_json(str(root / "evaluation" / f"run_date={DAYS[0]}" / "metrics.json"))
    assert metrics["protocol"] == split
    assert metrics["model"]["n_users"] == split["test_users"] == out["evaluate"]["metrics"]["users_scored"]
    holdout = storage.read_table(storage.join(out["evaluate"]["eval_dir"], "holdout_recs.parquet"))
    assert holdout.num_rows == split["test_users"]
    # trained on the events before the cutoff only: days 0..8 of every user
    assert out["prepare"]["stats"]["train_interactions"] == 100 * (EVENTS - 1)


def _online_by_hand(recs: pa.Table, inter: pa.Table, since: int, until: int) -> float:
    """Hit rate of the published top 10 on the events in (since, until) of the source log."""
    new = inter.filter(pc.and_(pc.greater(inter["ts"], since), pc.less(inter["ts"], until)))
    items_of: dict[int, set[int]] = {}
    for u, i in zip(new["user_id"].to_pylist(), new["item_id"].to_pylist()):
        items_of.setdefault(u, set()).add(i)
    lists = dict(zip(recs["user_id"].to_pylist(), recs["item_ids"].to_pylist()))
    return float(np.mean([bool(set(lists[u][:10]) & s) for u, s in items_of.items()]))


def test_days_two_and_three_carry_the_online_proxy_row(three_dates):
    root, inter, out = three_dates
    hist = storage.read_table(str(root / "history" / "metrics.parquet")).to_pylist()
    assert [r["run_date"] for r in hist] == list(DAYS)
    assert hist[0].get("online_hit_rate@10") is None  # nothing was published before day 1
    for d in (1, 2):
        row, prev = hist[d], out[DAYS[d - 1]]
        on = out[DAYS[d]]["evaluate"]["metrics"]["online"]
        assert row["online_from_run_date"] == DAYS[d - 1] == on["from_run_date"]
        assert row["online_model_version"] == prev["infer"]["manifest"]["model_version"]
        # every user has exactly one event on the new day, and every user had a published list
        assert row["online_users_active"] == row["online_n_users"] == N_USERS and row["online_coverage"] == 1.0
        newest = prev["infer"]["manifest"]["input_snapshot"]["newest_event_ts"]
        assert newest == T0 + (EVENTS - 4 + d) * DAY + (N_USERS - 1) * 60 == on["since_ts"]
        recs, _ = read_recommendations(prev["infer"]["recommendations"])
        today = T0 + (EVENTS - 2 + d) * DAY  # the day-d source ends before this
        assert row["online_hit_rate@10"] == pytest.approx(_online_by_hand(recs, inter, newest, today))
        # one new item per user: recall = hit rate, NDCG <= hit rate
        assert row["online_recall@10"] == pytest.approx(row["online_hit_rate@10"])
        assert 0.0 <= row["online_ndcg@10"] <= row["online_hit_rate@10"]
    page = storage.read_bytes(out[DAYS[2]]["report"]["report"]).decode()
    assert 'id="online"' in page and f"published on {DAYS[1]}" in page


def test_published_model_was_refit_on_every_event(three_dates):
    root, inter, out = three_dates
    o, t = out[DAYS[0]], out[DAYS[0]]["train"]  # date 1: train.refit on
    refit, version = t["refit"], t["model_version"]
    assert refit["epochs"] == t["best"]["epoch"] + 1 == len(refit["history"])  # the selected budget
    assert all("val_ndcg10" not in h for h in refit["history"])  # no validation: its targets are trained on
    prepared = PreparedPaths(o["prepare"]["prepared"])
    seqs = storage.read_table(prepared.users)["items"].to_pylist()
    targets = {which: Counter(pc.list_flatten(storage.read_table(uri)["target"]).to_pylist())
               for which, uri in (("full", prepared.full_examples), ("selection", prepared.train_examples))}
    # one window per history (seq_len 20 > 10 events): every event but the first is a target; the
    # selection model's windows stop before the validation and test events
    assert targets["full"] == Counter(i for s in seqs for i in s[1:]) and refit["examples"] == len(seqs)
    assert targets["selection"] == Counter(i for s in seqs for i in s[1:-2])
    assert refit["model_dir"] == registry.published_dir(str(root), version) == storage.join(
        registry.version_dir(str(root), version), registry.REFIT)
    manifest = o["infer"]["manifest"]
    assert manifest["model_version"] == version and "train.refit" in manifest["metrics"]["trained_on"]
    summary = storage.read_bytes(o["report"]["report"]).decode()
    assert "published weights refit on every event" in summary
    # warm start reads the selection weights (they never saw today's held-out events); publishing reads the refit
    first = out[DAYS[0]]["train"]["model_version"]
    assert out[DAYS[1]]["train"]["warm_start"]["init_from"] == registry.version_dir(str(root), first)
    # train.refit off (date 3, warm-started from date 2's selection model): the selection model publishes
    last = out[DAYS[2]]
    v3 = last["train"]["model_version"]
    assert last["train"]["refit"] is None and registry.published_dir(str(root), v3) == registry.version_dir(str(root), v3)
    assert last["infer"]["manifest"]["metrics"]["trained_on"].startswith("the training part of each history")
    assert not storage.exists(PreparedPaths(last["prepare"]["prepared"]).full_examples)


def test_int64_ids_stay_int64_end_to_end(three_dates):
    out = three_dates[2][DAYS[2]]
    assert out["infer"]["published"], out["promote"]["publish_reason"]
    assert_id_types(out, pa.int64())  # (string ids stay strings: tests/test_security.py's hostile ids)
    recs, _ = read_recommendations(out["infer"]["recommendations"])
    assert set(recs["user_id"].to_pylist()) == set(range(N_USERS))
    assert {i for row in recs["item_ids"].to_pylist() for i in row} <= set(range(N_ITEMS))
