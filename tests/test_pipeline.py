"""The nightly job end to end on synthetic data with local Ray: quality and the published outputs."""
from __future__ import annotations

import html

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray

import jobs.nightly
from recsys_core import storage
from recsys_core.config import load_config, replace
from recsys_core.data.prepare import PreparedPaths, catalog_ids, examples_dataset
from recsys_core.ops import registry, report
from recsys_core.pipeline import NOT_PRETRAINED, Run, StageNotDone, train_stage
from recsys_core.serve.infer import score_users
from recsys_core.serve.publish import publish, read_recommendations

pytestmark = pytest.mark.integration
RUN_DATE = "2026-11-27"


@pytest.fixture(scope="module")
def nightly(ray_local, tmp_path_factory):
    from tests.conftest import REPO

    root = tmp_path_factory.mktemp("nightly") / "store"
    cfg = load_config(REPO / "jobs" / "configs" / "synthetic.yaml", [f"storage.root={root}"])
    return cfg, jobs.nightly.main(cfg=cfg, run_date=RUN_DATE)


def test_ddp_training_learns_planted_structure(nightly):
    _, out = nightly
    m = out["evaluate"]["metrics"]
    model, pop = m["model"], m["baselines"]["popularity"]
    assert m["model"]["n_users"] == 400
    assert model["recall@10"] > 2 * pop["recall@10"], (model, pop)
    assert model["ndcg@10"] > 2 * pop["ndcg@10"]
    # two DDP workers trained for at least two epochs and validation improved on the first one
    hist = out["train"]["history"]
    assert len(hist) >= 2 and max(h["val_ndcg10"] for h in hist) > hist[0]["val_ndcg10"]


def test_refit_on_a_date_prepared_without_it_names_the_prepare_command(nightly):
    cfg, out = nightly  # synthetic.yaml: train.refit off, so prepare wrote no full_examples/
    run = Run(replace(cfg, **{"train.refit": True}), RUN_DATE, invocation="--config synthetic")
    with pytest.raises(StageNotDone, match=r"train.refit is on but .*full_examples is missing .* run `python -m "
                                           r"jobs.prepare --config synthetic --run-date 2026-11-27 --force` first"):
        train_stage(run)
    assert registry.list_versions(cfg.storage.root) == [out["train"]["model_version"]]  # nothing trained


def test_recommendations_schema_k_unseen_every_user(nightly):
    cfg, out = nightly
    recs, manifest = read_recommendations(out["infer"]["recommendations"])
    users = storage.read_table(storage.join(out["prepare"]["prepared"], "users"))
    items = storage.read_table(storage.join(out["prepare"]["prepared"], "items.parquet"))
    assert recs.schema.field("item_ids").type == pa.list_(pa.int64())
    assert recs.schema.field("scores").type == pa.list_(pa.float32())
    assert set(recs.column_names) == {"user_id", "item_ids", "scores", "model_version"}
    assert sorted(recs["user_id"].to_pylist()) == sorted(users["user_id"].to_pylist())
    assert manifest["rows"] == recs.num_rows == users.num_rows
    assert manifest["k"] == cfg.infer.k and manifest["model_version"] == out["train"]["model_version"]
    some = recs["user_id"].take(pa.array([0, 3, 5]))  # a reader's few users, filtered batch by batch
    part, same = read_recommendations(out["infer"]["recommendations"], users=some)
    assert same == manifest and part.to_pylist() == recs.filter(pc.is_in(recs["user_id"], value_set=some)).to_pylist()
    item_id_of = np.asarray(items["item_id"].to_pylist())
    seen = {u: set(item_id_of[s].tolist()) for u, s in zip(users["user_id"].to_pylist(), users["items"].to_pylist())}
    for u, rec, sc in zip(recs["user_id"].to_pylist(), recs["item_ids"].to_pylist(), recs["scores"].to_pylist()):
        assert len(rec) == cfg.infer.k == len(set(rec))
        assert not (set(rec) & seen[u]), f"user {u} was recommended an item they already had"
        assert sc == sorted(sc, reverse=True)
    assert set(recs["model_version"].to_pylist()) == {out["train"]["model_version"]}


def test_users_are_scored_in_capped_blocks_with_the_same_results(nightly):
    """infer.block_mib splits the (small) users file into several blocks; top-k rows are unchanged."""

    cfg, out = nightly
    promoted = out["promote"]["publish"]
    prepared = storage.join(out["prepare"]["prepared"])
    args = (promoted["model_dir"], promoted["item_embeddings"], storage.join(prepared, "users"),
            catalog_ids(storage.join(prepared, "items.parquet")), cfg.infer.k, cfg.model.max_seq_len, "v", 64, 2)
    one = score_users(*args, block_mib=0).materialize()  # as read: one block per users file
    capped = score_users(*args, block_mib=0.002).materialize()  # 2 KiB: 400 users' histories span many
    assert capped.num_blocks() > 2 * one.num_blocks(), (one.num_blocks(), capped.num_blocks())
    a, b = (ds.to_arrow_refs() for ds in (one, capped))

    ta, tb = (pa.concat_tables(ray.get(r)).sort_by("user_id") for r in (a, b))
    assert ta.num_rows == tb.num_rows == 400
    assert ta["item_ids"].to_pylist() == tb["item_ids"].to_pylist()


def test_small_training_examples_are_materialized_once_large_ones_stream(nightly):
    from ray.data.dataset import MaterializedDataset


    cfg, out = nightly
    uri = PreparedPaths(out["prepare"]["prepared"]).train_examples
    held, n_held = examples_dataset(uri, cfg.train)
    streamed, n_streamed = examples_dataset(uri, replace(cfg, **{"train.materialize_mib": 0}).train)
    assert isinstance(held, MaterializedDataset) and not isinstance(streamed, MaterializedDataset)
    assert held.count() == streamed.count() == n_held == n_streamed == out["prepare"]["stats"]["train_examples"] > 0


def test_evaluation_outputs(nightly):
    cfg, out = nightly
    ev = out["evaluate"]["eval_dir"]
    holdout = storage.read_table(storage.join(ev, "holdout_recs.parquet"))
    assert holdout.num_rows == 400 and set(holdout.column_names) == {"user_id", "item_ids"}
    assert all(len(x) == max(cfg.eval.ks) for x in holdout["item_ids"].to_pylist())
    assert storage.read_bytes(storage.join(ev, "learning_curve.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    m = storage.read_json(storage.join(ev, "metrics.json"))["model"]
    assert m["ndcg@10_ci_low"] <= m["ndcg@10"] <= m["ndcg@10_ci_high"]
    _, manifest = read_recommendations(out["infer"]["recommendations"])
    assert manifest["metrics"]["holdout"]["ndcg@10"] == pytest.approx(m["ndcg@10"])


def test_first_model_is_registered_promoted_and_reported(nightly):
    cfg, out = nightly
    version = out["train"]["model_version"]
    assert registry.list_versions(cfg.storage.root) == [version]
    assert registry.production_version(cfg.storage.root) == version
    assert out["promote"]["decision"]["promote"] is True and out["promote"]["production_before"] is None
    lineage = storage.read_json(storage.join(out["train"]["model_dir"], "lineage.json"))
    assert lineage["parent"] is None and lineage["warm_start"]["reason"] == "no production model yet"
    assert lineage["input"]["interactions_uri"] == out["prepare"]["stats"]["interactions_uri"]
    _, manifest = read_recommendations(out["infer"]["recommendations"])
    assert manifest["metrics"]["promotion"]["promote"] is True
    assert {"ppl_general_before", "ppl_general_after"} <= set(manifest["metrics"])
    page = storage.read_bytes(out["report"]["report"]).decode()
    assert "PROMOTED" in page and RUN_DATE in page
    assert storage.read_table(out["report"]["history"])["run_date"].to_pylist() == [RUN_DATE]


def test_report_shows_kept_epoch_sample_users_and_validation_baselines(nightly):
    cfg, out = nightly
    page = storage.read_bytes(out["report"]["report"]).decode()
    outcome = report.training_outcome(out["train"]["history"], cfg.train.epochs, cfg.train.patience)
    assert html.escape(report.training_sentence(outcome)) in page
    assert "not applicable: the item tower was not pretrained" in page  # not shown as "passed"
    assert html.escape(NOT_PRETRAINED) in page  # and no descriptions, with the reason
    prepared = out["prepare"]["prepared"]
    samples = report.load_samples(storage.join(prepared, "users"), storage.join(prepared, "items.parquet"),
                                  out["infer"]["recommendations"], out["explain"]["explanations"], n=10,
                                  seed=cfg.explain.seed)
    assert 'id="samples"' in page and len(samples) == 10 and len({s["user_id"] for s in samples}) == 10
    users = storage.read_table(storage.join(prepared, "users")).to_pylist()
    items = storage.read_table(storage.join(prepared, "items.parquet")).to_pylist()
    recs, _ = read_recommendations(out["infer"]["recommendations"])
    top_of = dict(zip(recs["user_id"].to_pylist(), recs["item_ids"].to_pylist()))
    text_of = {it["item_id"]: it["text"] for it in items}
    for s in samples:
        hist = next(u["items"] for u in users if u["user_id"] == s["user_id"])
        assert s["history"] == [items[i]["text"] for i in hist[-5:]]
        assert s["top"] == [text_of[i] for i in top_of[s["user_id"]][:5]]
        assert s["description"] is None  # random-init towers: nothing described
        for text in (*s["history"], *s["top"]):
            assert html.escape(text) in page
    val = out["evaluate"]["metrics"]["validation_baselines"]["popularity"]
    assert 0 < val["ndcg@10"] <= val["recall@10"] <= 1
    assert val["ndcg@10"] < max(h["val_ndcg10"] for h in out["train"]["history"])  # planted tastes beat it
    assert "overflow-x:auto" in page and page.count("<div class='scroll'>") >= 6


def test_random_init_lm_publishes_no_descriptions_and_says_why(nightly):
    cfg, out = nightly
    ex = out["explain"]
    assert ex["explanations"] is None and ex["reason"] == NOT_PRETRAINED
    assert not storage.exists(storage.join(cfg.storage.root, "explanations", f"run_date={RUN_DATE}",
                                           "explanations.parquet"))
    # the guard measured the model before and after training and its record travels with the model
    guard = out["train"]["guard"]
    assert guard["ppl_general_before"] > 1 and guard["ppl_general_after"] > 1 and not guard["enforced"]
    assert guard["applicable"] is False
    assert len(guard["generations_after"]) == len(cfg.guard.prompts)


def test_summary_block_from_the_stage_records(nightly):
    """The block printed at the end: holdout metrics with intervals beside the baselines, the kept epoch,
    the promotion decision, the guard verdict, every output's location and each stage's wall time."""
    cfg, out = nightly
    text = report.summary_text("nightly", RUN_DATE, out, [], 12.5)
    lines = text.splitlines()
    m = out["evaluate"]["metrics"]
    rows = lines[lines.index("holdout, 400 users (95% bootstrap intervals):") + 2:]
    table = {ln.split()[0]: ln for ln in rows[:len(cfg.eval.baselines) + 2]}
    assert set(table) == {"model", "model+prior", *cfg.eval.baselines}
    prior = m["recency_prior"]  # chosen on validation queries of both kinds, its test figure in the table
    assert prior["validation"]["queries"]["holdout"] > 0 and prior["validation"]["queries"]["tomorrow"] > 0
    assert f"{prior['test']['ndcg@10']:.4f}" in table["model+prior"]
    assert "prior:     window " in text
    for name, metrics in [("model", m["model"]), *m["baselines"].items()]:
        for k in ("ndcg@10", "recall@10", "ndcg@50", "recall@50"):
            cell = f"{metrics[k]:.4f} [{metrics[k + '_ci_low']:.4f}, {metrics[k + '_ci_high']:.4f}]"
            assert cell in table[name], (name, k, table[name])
    hist = out["train"]["history"]
    best = max(hist, key=lambda h: h["val_ndcg10"])
    assert f"kept epoch {best['epoch']} (validation NDCG@10 {best['val_ndcg10']:.4f})" in text
    assert f"ran epochs 0-{hist[-1]['epoch']} of at most {cfg.train.epochs}" in text
    assert ("stopped early" in text) == (len(hist) < cfg.train.epochs)
    assert f"promotion: PROMOTED model {out['train']['model_version']} (no production model yet" in text
    # the synthetic towers are random-init: the guard measured but is not applicable, and says so
    assert ("guard:     not applicable: the item tower was not pretrained (no language to protect); measured "
            "general-English perplexity") in text
    assert f"explain:   {NOT_PRETRAINED}" in text
    for where in (out["infer"]["recommendations"], out["report"]["report"], out["report"]["history"],
                  out["train"]["model_dir"], out["evaluate"]["eval_dir"]):
        assert any(f"  {where}" in ln for ln in lines), where
    assert (f"{out['infer']['recommendations']}  (400 users, top-{cfg.infer.k}, model "
            f"{out['train']['model_version']})") in text
    stages = next(ln for ln in lines if ln.startswith("stages:"))
    for stage, rec in out.items():
        assert f"{stage} {rec['wall_s']:.1f}s" in stages
    assert "(this run 12.5s)" in stages


def test_rerun_same_date_skips_completed_stages(nightly, capsys):
    cfg, out = nightly
    capsys.readouterr()
    again = jobs.nightly.main(cfg=cfg, run_date=RUN_DATE)  # its log handler writes to the captured stderr
    err = capsys.readouterr().err.splitlines()
    for stage in ("prepare", "train", "evaluate", "promote", "infer", "report", "explain"):
        assert again[stage] == out[stage]
    recs, manifest = read_recommendations(out["infer"]["recommendations"])
    assert manifest["attempt"] == out["infer"]["manifest"]["attempt"]
    assert not any("finished in" in ln for ln in err), err
    assert any("every stage was already complete; nothing ran" in ln for ln in err), err
    start = next(i for i, ln in enumerate(err) if ln.endswith(" summary"))
    end = next(i for i in range(start, len(err)) if err[i].startswith("stages:"))
    summary = err[start + 1:end + 1]
    first = report.summary_text("nightly", RUN_DATE, out, [], 0.0).splitlines()
    assert "nothing ran (--force reruns them)" in summary[1]
    # the same block as the first run's, from the stored records (only the time of this check differs)
    assert summary[2:-1] == first[1:-1]
    assert summary[-1].startswith(first[-1].split("  (")[0]) and "the times are the earlier run's" in summary[-1]


def test_forced_republish_switches_manifest_and_retires_old_generations(nightly):
    """Each publish adds a generation; the manifest switches to it; the one before last is deleted;
    the folder holds one data file (the current generation) and no staging is left."""

    cfg, out = nightly
    folder = out["infer"]["recommendations"]
    first = out["infer"]["manifest"]
    recs, _ = read_recommendations(folder)
    ds = ray_data_of(recs)
    second = publish(ds, folder, {"run_date": RUN_DATE})
    third = publish(ds, folder, {"run_date": RUN_DATE})
    assert len({first["attempt"], second["attempt"], third["attempt"]}) == 3
    rel = sorted(f[len(folder) + 1:] for f in storage.list_files(folder, ".parquet"))
    assert rel == sorted(["recommendations.parquet"] + third["files"] + second["files"])  # first generation gone
    assert third["previous_attempt"] == second["attempt"]
    assert not storage.list_files(storage.join(cfg.storage.root, "recommendations", "_staging"))
    again, manifest = read_recommendations(folder)
    assert again.num_rows == first["rows"] and manifest["attempt"] == third["attempt"]


def ray_data_of(table: pa.Table):
    return ray.data.from_arrow(table)


def test_redone_upstream_stage_makes_downstream_records_stale(nightly):
    """After prepare is redone, train/evaluate/infer records no longer count as complete."""

    cfg, out = nightly
    run = Run(cfg, RUN_DATE)
    assert run.done("infer") is not None
    rec = dict(run.done("prepare"), finished_at="2099-01-01T00:00:00Z-redo")
    storage.write_json(run.marker("prepare"), rec)
    assert run.done("prepare") is not None
    assert all(run.done(s) is None for s in ("train", "evaluate", "promote", "infer", "report"))
    with pytest.raises(RuntimeError, match="jobs.train"):
        run.require("train")
