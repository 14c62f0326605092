"""Tomorrow on MovieLens-100k (issue 13): the nightly runs on every event before a cutoff (the log as it
stood that night) and its published top-10 is scored against what the users did after the cutoff.

The cutoff sits ``--fraction`` of the log's time span before its newest event (the temporal protocol's
rule, ``split.temporal_cutoff``), and for ``--nights`` > 1 also 2, 3, ... times that before it: each night is
a fresh first run on the log as it stood then, and the nights' scored users are pooled (one night of
MovieLens-100k scores 83 users: intervals about +-0.06 on NDCG@10). The nightly sees only the events before
its cutoff, and selects its model on
its own leave-one-out validation (its test split is read by its evaluate stage, as every night). Two
variants of the shipped config run on the same past:

- ``refit``: ``train.refit=true`` (the default): after selection the model is trained again on every
  event, held-out ones included, for the selected epochs; that model publishes;
- ``selection``: ``train.refit=false``: the selection model publishes (it never saw each user's last two
  events).

Beside them, from the same past, the baselines a practitioner would ship, with the window and lambda the
nightly's evaluate stage chose on its validation split: popularity of the last N days, EASE, item-kNN,
all-time popularity. And popularity of the last N days with N chosen the way someone shipping tomorrow's
list would: on the validation fitting log cut the same fraction of its span earlier
(``recency.tomorrow_popularity_window``, on the recency prior's queries: ``eval.prior.n_cuts`` cuts; the test
period is never read). Users scored: prepared users
(3+ events before the cutoff) with an event after it.
Metrics: next item (the first event after the cutoff) Recall@10 / NDCG@10, and the hit rate of the top 10
on any event after the cutoff (the online proxy's rule), with bootstrap 95% intervals over those users; the
ratio to the best baseline with a paired bootstrap interval (``metrics.ratio_ci``).

    python benchmarks/ml100k_tomorrow.py --root outputs/ml100k-tomorrow --nights 3 --json benchmarks/results/ml100k_tomorrow.json
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import benchlib
import jobs.nightly
from recsys_core import storage
from recsys_core.config import load_config
from recsys_core.data.prepare import PreparedPaths, catalog_ids
from recsys_core.data.sources import movielens_tables
from recsys_core.data.split import temporal_cutoff
from recsys_core.eval.baselines import baseline_options, rank_baseline, train_log
from recsys_core.eval.metrics import per_user_metrics, ratio_ci, summarize_values
from recsys_core.eval.recency import tomorrow_popularity_window
from recsys_core.eval.online import per_user_online
from recsys_core.serve.publish import read_recommendations

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"refit": ["train.refit=true"], "selection": ["train.refit=false"]}
K = 10


def future_targets(future: pa.Table) -> tuple[dict, dict]:
    """Per user: the first item after the cutoff (ties by item id, as prepare sorts) and every item after it."""
    f = future.sort_by([("user_id", "ascending"), ("ts", "ascending"), ("item_id", "ascending")])
    first, every = {}, {}
    for u, i in zip(f["user_id"].to_pylist(), f["item_id"].to_pylist()):
        first.setdefault(u, i)
        every.setdefault(u, set()).add(i)
    return first, every


METRICS = (f"next_recall@{K}", f"next_ndcg@{K}", f"any_hit_rate@{K}")


def per_user_scores(lists: dict, first: dict, every: dict, users: list) -> dict[str, np.ndarray]:
    """(U,) next-item and any-event values of top-10 lists (item ids) for ``users`` (a missing list misses)."""
    rows = [list(lists.get(u, []))[:K] for u in users]
    ranked = np.array([r + [-1] * (K - len(r)) for r in rows], dtype=np.int64).reshape(len(users), K)  # -1 = none
    nxt = per_user_metrics(ranked, np.array([first[u] for u in users], dtype=np.int64), ks=(K,))
    anyev = per_user_online(rows, [every[u] for u in users], K)
    return dict(zip(METRICS, (nxt[f"recall@{K}"], nxt[f"ndcg@{K}"], anyev[f"hit_rate@{K}"])))


def compare(per_user: dict[str, dict[str, np.ndarray]], variants: list[str], n_boot: int) -> dict:
    """Summaries with intervals of every ranker, the best baseline by next-item NDCG@10, and each variant's
    ratio to it with a paired bootstrap interval (the same users resampled for both)."""
    summ = {name: summarize_values(v, len(v[METRICS[0]]), n_boot) for name, v in per_user.items()}
    bases = [b for b in per_user if b not in variants]
    best = max(bases, key=lambda b: summ[b][METRICS[1]])
    ratios = {}
    for name in variants:
        ratios[name] = {}
        for m in METRICS:
            r, low, high = ratio_ci(per_user[name][m], per_user[best][m], n_boot)
            ratios[name] |= {m: r, f"{m}_ci_low": low, f"{m}_ci_high": high}
    return {"model": {n: summ[n] for n in variants}, "baselines": {b: summ[b] for b in bases}, "best_baseline": best,
            "ratio_to_best_baseline": ratios}


def night(a, root: Path, inter: pa.Table, items: pa.Table, fraction: float) -> tuple[dict, dict]:
    """One night: the nightly on every event before the cutoff ``fraction`` of the span before the log's
    newest event, its published lists and the baselines' scored on the users' events after it. Returns the
    night's record and the per-user values of every ranker."""
    ts = inter["ts"].to_numpy()
    cutoff = temporal_cutoff(int(ts.min()), int(ts.max()), fraction)
    past, future = inter.filter(pc.less(inter["ts"], cutoff)), inter.filter(pc.greater_equal(inter["ts"], cutoff))
    run_date = time.strftime("%Y-%m-%d", time.gmtime(cutoff))
    here = root / run_date
    src = here / "src"
    storage.write_table(past, str(src / "interactions" / "part-0.parquet"))
    storage.write_table(items, str(src / "items.parquet"))
    first, every = future_targets(future)

    runs, lists_of, prepared = {}, {}, None
    for name in a.variants.split(","):
        shutil.rmtree(here / name, ignore_errors=True)  # a first night: no production model from an earlier run
        for source in (Path(a.features_from), root):  # the LM pass, once per catalog
            benchlib.share_features(here, name, source)
        cfg = load_config(a.config, [f"storage.root={here / name}", "data.source=parquet",
                                     f"data.interactions={src / 'interactions'}", f"data.items={src / 'items.parquet'}",
                                     "explain.n_users=0", *VARIANTS[name], *a.overrides])
        t0 = time.time()
        out = jobs.nightly.main(cfg=cfg, run_date=run_date, force=True)
        if not out["infer"]["published"]:
            raise SystemExit(f"{run_date} {name}: nothing published ({out['infer']['reason']})")
        recs, manifest = read_recommendations(out["infer"]["recommendations"])
        lists_of[name] = dict(zip(recs["user_id"].to_pylist(), recs["item_ids"].to_pylist()))
        prepared = PreparedPaths(out["prepare"]["prepared"])
        m = out["evaluate"]["metrics"]
        prior = m.get("recency_prior") or {}
        runs[name] = {"wall_s": round(time.time() - t0, 1), "stage_s": {s: out[s]["wall_s"] for s in out},
                      "kept_epoch": out["train"]["best"]["epoch"], "refit": out["train"].get("refit") and {
                          k: v for k, v in out["train"]["refit"].items() if k != "history"},
                      "trained_on": manifest["metrics"]["trained_on"],
                      "own_holdout_ndcg@10": m["model"]["ndcg@10"], "baseline_selection": m["baseline_selection"],
                      "recency_prior": {k: v for k, v in prior.items() if k != "test"} or None,
                      "own_holdout_with_prior_ndcg@10": prior.get("test", {}).get("ndcg@10"),
                      "published_prior": manifest["metrics"].get("recency_prior")}

    users_t = storage.read_table(prepared.users)
    ids = catalog_ids(prepared.items).to_pylist()
    user_ids = users_t["user_id"].to_pylist()
    known = set(user_ids)
    scored = [u for u in user_ids if u in first]  # history before and an event after
    hist = [np.asarray(h, np.int64) for h in users_t["items"].to_pylist()]
    log = train_log(hist, [np.asarray(t, np.int64) for t in users_t["ts"].to_pylist()], len(ids))
    opts = baseline_options(cfg.eval)
    chosen = next(iter(runs.values()))["baseline_selection"]
    def as_lists(top: np.ndarray) -> dict:  # (U, K) item_idx -> item ids per user id
        return {u: [ids[i] for i in row] for u, row in zip(user_ids, top.tolist())}

    base_lists = {}
    for name in [b for b in ("popularity", "recent_popularity", "itemknn", "ease") if b in chosen]:  # the run's eval.baselines
        param = chosen[name].get("param")
        top = rank_baseline(name, log, hist, K, opts, param)  # (U, K) item_idx, seen excluded
        base_lists[name] = as_lists(top)
    n_cuts = cfg.eval.prior.n_cuts  # the prior's tomorrow-like validation: the same queries choose the window
    window, curve = tomorrow_popularity_window(users_t, len(ids), opts.pop_windows_days, fraction, n_cuts)
    base_lists["recent_popularity_tomorrow_val"] = as_lists(rank_baseline("recent_popularity", log, hist, K, opts,
                                                                           window))
    print(f"{run_date}: tomorrow-like validation: popularity window {window} d; NDCG@10 per window {curve}")
    per_user = {name: per_user_scores(l, first, every, scored) for name, l in {**lists_of, **base_lists}.items()}
    record = {"cutoff": cutoff, "run_date": run_date, "fraction": fraction, "events_before": past.num_rows,
              "events_after": future.num_rows, "users_scored": len(scored),
              "users_after_without_history": len([u for u in first if u not in known]), "runs": runs,
              **compare(per_user, list(lists_of), a.n_boot),
              "tomorrow_validation_popularity": {"window_days": window, "ndcg@10_per_window": curve, "n_cuts": n_cuts}}
    print_table(f"ML-100k tomorrow: cutoff {run_date} ({fraction:.0%} of the span), {len(scored)} users", record)
    return record, per_user


def print_table(title: str, r: dict) -> None:
    rows = [[n, *[f"{v[c]:.4f} [{v[c + '_ci_low']:.3f}, {v[c + '_ci_high']:.3f}]" for c in METRICS]]
            for n, v in {**r["model"], **r["baselines"]}.items()]
    rows += [[f"{n} / {r['best_baseline']}", *[f"{v[c]:.2f}x [{v[c + '_ci_low']:.2f}, {v[c + '_ci_high']:.2f}]"
                                               for c in METRICS]] for n, v in r["ratio_to_best_baseline"].items()]
    print(benchlib.table(title, ["", *METRICS], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", default="outputs/ml100k-tomorrow")
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "ml100k.yaml"))
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--nights", type=int, default=3,
                   help="nights at 1, 2, ... x --fraction of the span before the newest event, their users pooled")
    p.add_argument("--variants", default="refit,selection")
    p.add_argument("--features-from", default="outputs/ml100k-seeds",
                   help="a folder of earlier runs whose frozen-LM feature cache (same catalog and LM) is reused")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if not 0 < a.nights * a.fraction < 1:
        raise SystemExit(f"--nights {a.nights} x --fraction {a.fraction} must lie in (0, 1)")
    root = Path(a.root).resolve()
    benchlib.setup_env()

    inter, items = movielens_tables()
    nights, pooled = [], {}
    for k in range(1, a.nights + 1):
        record, per_user = night(a, root, inter, items, round(k * a.fraction, 6))
        nights.append(record)
        for name, vals in per_user.items():
            for m, v in vals.items():
                pooled.setdefault(name, {}).setdefault(m, []).append(v)
    pooled_vals = {n: {m: np.concatenate(v) for m, v in ms.items()} for n, ms in pooled.items()}
    variants = list(nights[0]["model"])
    result = compare(pooled_vals, variants, a.n_boot)
    print_table(f"ML-100k tomorrow, {a.nights} night(s) pooled: {sum(r['users_scored'] for r in nights)} "
                f"(night, user) questions", result)
    benchlib.write_json(a.json, {
        "dataset": "MovieLens-100k (recbole 1.2.1), every rating an interaction", "cpu": benchlib.cpu_model(),
        "config": a.config, "overrides": a.overrides, "fraction": a.fraction,
        "pooled": {"questions": sum(r["users_scored"] for r in nights), "nights": [r["run_date"] for r in nights],
                   **result,
                   "note": "each night's scored users (3+ events before its cutoff, one after) pooled; intervals "
                           "resample (night, user) questions, the ratios' paired (the same questions for both)"},
        "nights": nights,
        "command": "python benchmarks/ml100k_tomorrow.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v and k not in ("overrides",))})


if __name__ == "__main__":
    main()
