"""The run report and the metrics history across run dates.

- ``history/metrics.parquet``: one row per run date (re-running a date replaces its row), rewritten
  in one atomic write. Columns: the new model's holdout metrics, the production model's NDCG@10 on the
  same holdout, the baselines', the promotion decision, what was published, perplexity before/after,
  data counts.
- ``evaluation/run_date=D/report.html``: self-contained (plots are inline base64 PNGs): promotion
  decision, learning curve, metrics vs baselines and vs the production model, the generation guard's
  perplexity before/after, data and quarantine counts, and the history plot.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_core import storage
from recsys_core.model.prior import RecencyPrior
from recsys_core.serve.publish import read_recommendations

HEADLINE = ("ndcg@10", "recall@10")
SAMPLE_HISTORY, SAMPLE_TOP = 5, 5  # items shown per sample user: most recent history, top recommendations


def history_uri(root: str) -> str:
    return storage.join(root, "history", "metrics.parquet")


def point_metrics(m: dict[str, Any] | None) -> dict[str, float]:
    """Point estimates only (no CI bounds)."""
    return {k: v for k, v in (m or {}).items() if "_ci_" not in k}


def history_row(run_date: str, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run as one flat row, from the stage records (prepare, train, evaluate, promote, infer)."""
    stats, trained = records["prepare"]["stats"], records["train"]
    metrics, promoted, inferred = records["evaluate"]["metrics"], records["promote"], records["infer"]
    guard = trained.get("guard") or {}
    prod = promoted.get("production_eval") or {}
    row: dict[str, Any] = {
        "run_date": run_date,
        "model_version": trained["model_version"],
        "parent_version": trained.get("parent"),
        "promoted": bool(promoted["decision"]["promote"]),
        "decision_reason": promoted["decision"]["reason"],
        "production_version": promoted.get("production"),
        "published_version": (inferred.get("manifest") or {}).get("model_version"),
        "epochs": len(trained["history"]),
        "best_val_ndcg10": trained["best"].get("val_ndcg10"),
        "ppl_general_before": guard.get("ppl_general_before"),
        "ppl_general_after": guard.get("ppl_general_after"),
        "rows_read": stats["rows_read"],
        "rows_rejected": stats["rows_rejected"],
        "users_kept": stats["users_kept"],
        "items": stats["items"],
        "compared_version": prod.get("model_version"),
        "compared_ndcg@10": point_metrics(prod.get("metrics")).get("ndcg@10"),
    }
    row["protocol"] = (metrics.get("protocol") or {}).get("protocol", "loo")  # of the holdout metrics below
    row.update(online_columns(metrics.get("online")))
    row.update({f"model_{k}": v for k, v in point_metrics(metrics["model"]).items()})
    prior_test = (metrics.get("recency_prior") or {}).get("test")
    row.update({f"model_prior_{k}": (point_metrics(prior_test).get(k) if prior_test else None) for k in HEADLINE})
    for name, m in metrics["baselines"].items():
        row.update({f"{name}_{k}": v for k, v in point_metrics(m).items() if k in HEADLINE})
    return row


def online_columns(online: dict[str, Any] | None) -> dict[str, Any]:
    """The online proxy as history columns: ``online_<metric>`` (point values), the date whose published
    recommendations were scored and the active users; nothing on a date with no earlier publication."""
    if not online:
        return {}
    cols = {f"online_{k}": v for k, v in point_metrics(online).items()
            if k not in ("from_run_date", "model_version", "since_ts", "k")}
    cols.update({"online_from_run_date": online.get("from_run_date"), "online_model_version": online.get("model_version")})
    return cols


def upsert(rows: list[dict[str, Any]], row: dict[str, Any]) -> list[dict[str, Any]]:
    """Replace the row of the same run date (or add it); sorted by run date."""
    return sorted([r for r in rows if r["run_date"] != row["run_date"]] + [row], key=lambda r: r["run_date"])


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Columns are the union of the rows' keys (a metric added later is null for older dates)."""
    keys = ["run_date"] + sorted({k for r in rows for k in r} - {"run_date"})
    return pa.table({k: pa.array([r.get(k) for r in rows]) for k in keys})


def upsert_history(root: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    uri = history_uri(root)
    rows = storage.read_table(uri).to_pylist() if storage.exists(uri) else []
    rows = upsert(rows, row)
    storage.write_table(rows_to_table(rows), uri)  # one atomic write
    return rows


def figure_png(fig: Any) -> bytes:
    plt = pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend (imported here: it costs ~1 s and only the
    report and benchmark plots need it)."""
    import matplotlib  # lazy: see the docstring

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    return plt


def comparison_png(rows: dict[str, dict[str, float]]) -> bytes:
    """Grouped bars: each model's headline metrics on today's holdout."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(rows), 1)
    for i, (name, m) in enumerate(rows.items()):
        xs = [j + i * width for j in range(len(HEADLINE))]
        ax.bar(xs, [m.get(k, 0.0) or 0.0 for k in HEADLINE], width=width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(HEADLINE))], list(HEADLINE))
    ax.set(title="today's holdout")
    ax.legend(fontsize=8)
    return figure_png(fig)


def perplexity_png(guard: dict[str, Any]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    labels, before, after = [], [], []
    for name in ("general", "items"):
        b, a = guard.get(f"ppl_{name}_before"), guard.get(f"ppl_{name}_after")
        if b is not None and a is not None:
            labels.append(name)
            before.append(b)
            after.append(a)
    xs = list(range(len(labels)))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before fine-tuning")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after")
    ax.set_xticks(xs, labels)
    ax.set(title="language-model perplexity (lower is better)")
    ax.legend(fontsize=8)
    return figure_png(fig)


def history_png(rows: list[dict[str, Any]]) -> bytes:
    """NDCG@10 per run date: the new model, the model it was compared with, the baselines; promoted dates marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    dates = [r["run_date"] for r in rows]
    xs = list(range(len(dates)))
    ax.plot(xs, [r.get("model_ndcg@10") for r in rows], marker="o", label="new model")
    ax.plot(xs, [r.get("compared_ndcg@10") for r in rows], marker="s", linestyle=":", label="production (same holdout)")
    for col in sorted(k for k in {k for r in rows for k in r} if k.endswith("_ndcg@10")
                      and not k.startswith(("model_", "compared_"))):
        ax.plot(xs, [r.get(col) for r in rows], linestyle="--", marker="x", label=col.removesuffix("_ndcg@10"))
    promoted = [(x, r.get("model_ndcg@10")) for x, r in zip(xs, rows) if r.get("promoted")]
    if promoted:
        ax.scatter(*zip(*promoted), s=120, facecolors="none", edgecolors="tab:green", label="promoted")
    ax.set_xticks(xs, dates, rotation=30, fontsize=8)
    ax.set(title="holdout NDCG@10 by run date")
    ax.legend(fontsize=8)
    return figure_png(fig)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _cell(c: Any) -> str:
    if isinstance(c, list):  # a list of texts: one per line
        return "<ol>" + "".join(f"<li>{html.escape(str(x))}</li>" for x in c) + "</ol>"
    return html.escape(_fmt(c))


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return (f"<div class='scroll'><table class='{cls}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{html.escape(title)}</h2>{body}</section>'


def sample_rows(user_ids: list[Any], histories: list[list[int]], item_ids: list[Any], texts: list[str],
                recs: dict[Any, list[Any]], descriptions: dict[Any, str]) -> list[dict[str, Any]]:
    """Per sample user: the texts of their last SAMPLE_HISTORY items (oldest first; histories hold
    item rows), of their top SAMPLE_TOP recommendations (item ids) and their description, if any."""
    text_of_id = dict(zip(item_ids, texts))
    return [{"user_id": u, "history": [texts[i] for i in h[-SAMPLE_HISTORY:]],
             "top": [text_of_id.get(i, f"item {i}") for i in recs.get(u, [])[:SAMPLE_TOP]],
             "description": descriptions.get(u)} for u, h in zip(user_ids, histories)]


def load_samples(users_uri: str, items_uri: str, recs_dir: str | None, explanations_uri: str | None,
                 n: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` users for the report: those with a description first, then a seeded sample."""
    items = storage.read_table(items_uri, columns=["item_id", "text"])
    described: dict[Any, str] = {}
    if explanations_uri and storage.exists(explanations_uri):
        ex = storage.read_table(explanations_uri, columns=["user_id", "description"])
        described = dict(zip(ex["user_id"].to_pylist(), ex["description"].to_pylist()))
    # Only the user id column is read whole (vectorised); the sampled rows are taken a batch at a time.
    uids = pa.chunked_array([t["user_id"] for t in storage.iter_batches(users_uri, ["user_id"])])
    is_described = pc.is_in(uids, value_set=pa.array(list(described), uids.type)).to_numpy(zero_copy_only=False)
    chosen = np.flatnonzero(is_described)[:n]  # (<=n,)
    order = np.random.default_rng(seed).permutation(len(uids))  # (U,)
    rest = order[~is_described[order]][: n - len(chosen)]
    rows = storage.take_rows(users_uri, np.sort(np.concatenate([chosen, rest]))).select(["user_id", "items"])
    recs: dict[Any, list[Any]] = {}
    if recs_dir:
        table, _ = read_recommendations(recs_dir, users=rows["user_id"])
        recs = dict(zip(table["user_id"].to_pylist(), table["item_ids"].to_pylist()))
    return sample_rows(rows["user_id"].to_pylist(), rows["items"].to_pylist(), items["item_id"].to_pylist(),
                       items["text"].to_pylist(), recs, described)


def render(run_date: str, records: dict[str, dict[str, Any]], history: list[dict[str, Any]],
           samples: list[dict[str, Any]] | None = None, explained: dict[str, Any] | None = None) -> str:
    """report.html from the stage records, the history rows, the sample users (``load_samples``) and the
    explain stage's record (its description quality and why descriptions were or were not published)."""

    stats, trained = records["prepare"]["stats"], records["train"]
    metrics, promoted, inferred = records["evaluate"]["metrics"], records["promote"], records["infer"]
    d = promoted["decision"]
    prod = promoted.get("production_eval")
    verdict = "PROMOTED" if d["promote"] else "NOT PROMOTED"
    published = (f"{inferred['manifest']['rows']:,} users' recommendations from model "
                 f"{inferred['manifest']['model_version']} at {inferred['recommendations']}"
                 if inferred.get("published") else "nothing published")
    warm = trained.get("warm_start") or {}
    parts = [_section("decision", "Promotion decision", (
        f"<p class='verdict {'ok' if d['promote'] else 'bad'}'>{verdict}: model {html.escape(trained['model_version'])}"
        f"</p><p>{html.escape(d['reason'])}</p>"
        + _table(["", "value"], [
            ["new model NDCG@10", d["new_ndcg"]], ["production model", promoted.get("production_before")],
            ["production NDCG@10 (today's holdout)", d["production_ndcg"]], ["tolerance", d["tolerance"]],
            ["generation guard", guard_sentence(trained.get("guard"))],
            ["PRODUCTION now", promoted.get("production")],
            ["published", published], ["why", promoted["publish_reason"]],
            ["retention deleted", ", ".join(promoted.get("retention_deleted") or []) or None]])))]
    outcome = training_outcome(trained["history"], trained.get("epochs_max"), trained.get("patience"))
    val_base = metrics.get("validation_baselines") or {}
    parts.append(_section("training", "Training", (
        f"<p class='kept'>{html.escape(training_sentence(outcome))}.</p>"
        f"<p class='refit'>{html.escape(refit_sentence(trained.get('refit')))}.</p>"
        f"<p class='prior'>Recency prior: {html.escape(prior_sentence(metrics.get('recency_prior'), promoted.get('publish')))}."
        "</p>"
        f"<p>Warm start: {html.escape(_fmt(warm.get('used')))} ({html.escape(str(warm.get('reason', '')))}); "
        f"parent model: {html.escape(_fmt(trained.get('parent')))}. The validation curve is drawn against "
        "the baselines on the same validation users; the test-set baselines are in the next section.</p>"
        + _img(learning_curve_png(trained["history"], val_base, outcome["kept_epoch"]),
               "loss and validation NDCG@10 per epoch"))))
    rows = {"new model": point_metrics(metrics["model"])}
    if (metrics.get("recency_prior") or {}).get("test"):
        rows["new model + recency prior"] = point_metrics(metrics["recency_prior"]["test"])
    if prod:
        rows[f"production {prod['model_version']}"] = point_metrics(prod["metrics"])
    rows.update({name: point_metrics(m) for name, m in metrics["baselines"].items()})
    cols = sorted(rows["new model"], key=lambda c: (c == "n_users", metric_order(c)))
    parts.append(_section("metrics", "Holdout metrics vs baselines and the production model", (
        _table(["model", *cols], [[name, *(m.get(c) for c in cols)] for name, m in rows.items()])
        + "<p>95% bootstrap interval of the new model's NDCG@10: "
        + html.escape(f"[{_fmt(metrics['model'].get('ndcg@10_ci_low'))}, {_fmt(metrics['model'].get('ndcg@10_ci_high'))}]")
        + "</p>" + _img(comparison_png(rows), "metrics vs baselines and production"))))
    parts.append(online_section(metrics.get("online")))
    guard = trained.get("guard")
    if guard:
        gens = list(zip(guard.get("prompts") or [], guard.get("generations_before") or [],
                        guard.get("generations_after") or []))
        body = (f"<p class='verdict {'ok' if guard.get('passed') and guard.get('enforced') else 'muted'}'>"
                f"{html.escape(guard_sentence(guard))}</p>"
                + _table(["", "before", "after"], [
            ["general-English perplexity", guard.get("ppl_general_before"), guard.get("ppl_general_after")],
            ["item-text perplexity", guard.get("ppl_items_before"), guard.get("ppl_items_after")]])
            + _img(perplexity_png(guard), "perplexity before and after"))
        body += strength_table(guard.get("strength"))
        if gens:
            body += "<h3>Greedy generations</h3>" + _table(["prompt", "before", "after"], [list(g) for g in gens])
    else:
        body = "<p>No generation-guard record for this model.</p>"
    parts.append(_section("guard", "Generation guard: perplexity before/after", body))
    if samples:
        parts.append(_section("samples", f"{len(samples)} sample users", (
            "<p>Their most recent items (oldest first), the top recommendations published for them, and the "
            "taste description generated by the protected language model (when the explain stage ran).</p>"
            + explain_paragraph(explained)
            + _table(["user", f"last {SAMPLE_HISTORY} items", f"top {SAMPLE_TOP} recommended", "description"],
                     [[s["user_id"], s["history"], s["top"], s["description"] or "–"] for s in samples],
                     cls="samples"))))
    reasons = [[r, n] for r, n in (stats.get("rejected_by_reason") or {}).items()]
    parts.append(_section("data", "Data and quarantine", (
        _table(["", "count"], [[k, stats.get(k)] for k in ("rows_read", "rows_good", "rows_rejected", "users_seen",
                                                            "users_kept", "items", "train_interactions",
                                                            "train_examples")])
        + "<h3>Quarantined rows by reason</h3>" + _table(["reason", "rows"], reasons)
        + f"<p>Source: {html.escape(str(stats.get('source', '')))}</p>")))
    hist_cols = ["run_date", "model_version", "promoted", "published_version", "model_ndcg@10", "compared_ndcg@10",
                 "ppl_general_after", "rows_read", "rows_rejected"]
    parts.append(_section("history", "History across run dates", (
        _img(history_png(history), "NDCG@10 by run date")
        + _table(hist_cols, [[r.get(c) for c in hist_cols] for r in history], cls="compact"))))
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
             ".scroll{overflow-x:auto;max-width:100%}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:left;vertical-align:top}td{overflow-wrap:anywhere}th{white-space:nowrap}"
             "table.compact{font-size:.8em}table.samples{font-size:.85em;width:100%}"
             "table.samples td{max-width:22em}ol{margin:0;padding-left:1.3em}"
             ".verdict{font-size:1.3em;font-weight:bold}.ok{color:#17702b}.bad{color:#b00020}"
             ".muted{color:#8a6d00}.kept{font-weight:bold}"
             "img{max-width:100%}pre{white-space:pre-wrap;margin:0}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>recsys-core report {html.escape(run_date)}"
            f"</title><style>{style}</style></head><body><h1>Nightly run {html.escape(run_date)}</h1>"
            + "".join(parts) + "</body></html>")


def online_section(online: dict[str, Any] | None) -> str:
    """Yesterday's published recommendations vs the events since (the operator's number)."""
    if not online:
        return _section("online", "Online proxy", "<p>No earlier date published recommendations.</p>")
    k = online.get("k", 10)
    names = [f"hit_rate@{k}", f"recall@{k}", f"ndcg@{k}"]
    return _section("online", "Online proxy: the previous publication vs the events since", (
        f"<p>Recommendations published on {html.escape(str(online.get('from_run_date')))} by model "
        f"{html.escape(str(online.get('model_version')))}, scored on the items each user interacted with after "
        f"that run's newest event; {_fmt(online.get('n_users'))} of {_fmt(online.get('users_active'))} active "
        "users had a list.</p>"
        + _table(["metric", "value", "95% interval"],
                 [[m, online.get(m), f"[{_fmt(online.get(m + '_ci_low'))}, {_fmt(online.get(m + '_ci_high'))}]"]
                  for m in names])))


def learning_curve_png(history: list[dict[str, Any]], val_baselines: dict[str, dict[str, float]],
                       kept_epoch: int | None = None) -> bytes:
    """PNG: training loss and validation NDCG@10 per epoch, with the baselines' NDCG@10 on the same
    validation users for scale, and the kept epoch marked."""

    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [h["train_loss"] for h in history], marker="o")
    a.set(title="training loss", xlabel="epoch", ylabel="loss")
    b.plot(epochs, [h["val_ndcg10"] for h in history], marker="o", label="model (validation)")
    for (name, m), color in zip(val_baselines.items(), ["tab:gray", "tab:orange", "tab:green", "tab:red"]):
        b.axhline(m["ndcg@10"], linestyle="--", color=color, label=f"{name} (validation)")
    if kept_epoch is not None:
        b.axvline(kept_epoch, color="tab:green", linestyle=":", label=f"kept epoch {kept_epoch}")
    b.set(title="validation NDCG@10", xlabel="epoch")
    b.legend(fontsize=8)
    return figure_png(fig)


def plot_learning_curve(history: list[dict[str, Any]], val_baselines: dict[str, dict[str, float]],
                        out_uri: str) -> None:
    kept = training_outcome(history, None, None)["kept_epoch"]
    storage.write_bytes(out_uri, learning_curve_png(history, val_baselines, kept))


def training_outcome(history: list[dict[str, Any]], epochs_max: int | None, patience: int | None) -> dict[str, Any]:
    """Which epoch was kept (the best validation NDCG@10, the earliest on ties) and whether training
    stopped early; epochs count from 0, as in the training log."""
    if not history:
        return {"epochs_run": 0, "kept_epoch": None, "kept_val_ndcg10": None, "stopped_early": None}
    best = max(history, key=lambda h: (h["val_ndcg10"], -h["epoch"]))
    stopped = None if epochs_max is None else history[-1]["epoch"] + 1 < epochs_max
    return {"epochs_run": len(history), "first_epoch": history[0]["epoch"], "last_epoch": history[-1]["epoch"],
            "epochs_max": epochs_max, "patience": patience, "kept_epoch": best["epoch"],
            "kept_val_ndcg10": best["val_ndcg10"], "stopped_early": stopped}


def training_sentence(outcome: dict[str, Any]) -> str:
    """'ran epochs 0-11 of at most 50; stopped early (...); kept epoch 3 (val NDCG@10 0.0512)'."""
    if outcome["kept_epoch"] is None:
        return "no epoch completed"
    span = (f"epoch {outcome['first_epoch']}" if outcome["first_epoch"] == outcome["last_epoch"]
            else f"epochs {outcome['first_epoch']}-{outcome['last_epoch']}")
    text = f"ran {span}" + (f" of at most {outcome['epochs_max']}" if outcome.get("epochs_max") else "")
    if outcome["stopped_early"]:
        text += f"; stopped early: no validation NDCG@10 gain for {outcome['patience']} epochs"
    elif outcome["stopped_early"] is False:
        text += "; did not stop early"
    return text + f"; kept epoch {outcome['kept_epoch']} (validation NDCG@10 {outcome['kept_val_ndcg10']:.4f})"


def refit_sentence(refit: dict[str, Any] | None) -> str:
    """What the published weights were trained on."""
    if not refit:
        return ("the selection model is published (train.refit off): trained on each history without its "
                "held-out events")
    return (f"published weights refit on every event ({refit['examples']} examples, held-out events included; "
            f"selection trained on {refit['selection_examples']}) for the selected {refit['epochs']} epoch(s)")


def _gap_names(edges: list[int]) -> list[str]:
    def dur(x: int) -> str:
        for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("min", 60)):
            if x >= size and x % size == 0:
                return f"{x // size}{unit}"
        return f"{x}s"
    names = [dur(e) for e in edges]
    return [f"<{names[0]}", *(f"{a}-{b}" for a, b in zip(names, names[1:])), f">={names[-1]}"]


def prior_sentence(prior: dict[str, Any] | None, published: dict[str, Any] | None = None) -> str:
    """The recency prior chosen on validation, its test figure and whether the published lists use it."""
    if not prior:
        return "off (eval.prior.enabled is false): the published score is the model's alone"
    sel = prior["selected"]
    val = prior["validation"]
    weights = ", ".join(f"{g} {b:g}" for g, b in zip(_gap_names(sel["gap_edges_s"]), sel["betas"]))
    q = val["queries"]
    text = (f"window {sel['window_days']} d, weight by time since the user's last event: {weights}; chosen on "
            f"{q['holdout']} holdout + {q['tomorrow']} tomorrow validation queries (NDCG@10 "
            f"{val['per_window'][str(sel['window_days'])]['ndcg@10']:.4f} vs the model alone "
            f"{val['model_alone_ndcg@10']:.4f}); test NDCG@10 with it {prior['test']['ndcg@10']:.4f}")
    if RecencyPrior.from_dict(sel).off:
        return text + "; every weight is 0, so the model alone publishes"
    if published is not None and not published.get("prior"):
        return text + "; not used: the published model is not the one it was chosen for"
    return text


def strength_table(strength: dict[str, Any] | None) -> str:
    """The WiSE-FT scan (recsys_core.train.strength): perplexity and validation NDCG@10 per alpha, the kept one."""
    if not strength:
        return ""
    rows = [[f"{p['alpha']:g}" + (" (kept)" if p["alpha"] == strength["alpha"] else ""), p.get("ppl_general"),
             f"{p['ppl_general'] / p['ppl_general_base'] - 1.0:+.1%}" if p.get("ppl_general_base") else "",
             p.get("ppl_items"), p.get("val_ndcg10"), "yes" if p.get("within_bound") else "no"]
            for p in strength.get("curve") or []]
    return ("<h3>Fine-tuning strength (alpha 0: the base LM, 1: as fine-tuned)</h3>"
            + f"<p>{html.escape(str(strength.get('rule', '')))}; kept alpha {strength['alpha']:g}.</p>"
            + _table(["alpha", "general-English perplexity", "rise", "item-text perplexity", "validation NDCG@10",
                      f"within {strength.get('max_increase', 0):+.0%}"], rows))


def guard_sentence(guard: dict[str, Any] | None) -> str:
    """The guard's verdict in words: an unenforced guard (a random-init LM) is reported as such, not as 'passed'."""
    if not guard:
        return "no generation-guard record"
    change = guard.get("change")
    ppl = (f"general-English perplexity {guard['ppl_general_before']:.2f} -> {guard['ppl_general_after']:.2f}"
           + (f" ({change:+.1%}, limit {guard.get('max_increase', 0):+.0%})" if change is not None else ""))
    if guard.get("applicable") is False:
        return f"not applicable: the item tower was not pretrained (no language to protect); measured {ppl}"
    if not guard.get("enforced"):
        msg = str(guard.get("message", ""))
        why = msg[msg.index("not enforced"):].rstrip(")") if "not enforced" in msg else "not enforced"
        return f"{why}; measured {ppl}"
    kept = (guard.get("strength") or {}).get("alpha")
    return (("passed: " if guard.get("passed") else "FAILED (blocks promotion): ") + ppl
            + (f"; fine-tuning strength alpha {kept:g} kept on validation" if kept is not None else ""))


def _with_ci(m: dict[str, Any], k: str) -> str:
    lo, hi = m.get(f"{k}_ci_low"), m.get(f"{k}_ci_high")
    return f"{m[k]:.4f}" + (f" [{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else "")


_METRIC_ORDER = {"recall": 0, "ndcg": 1, "mrr": 2}


def metric_order(name: str) -> tuple[int, int, str]:
    """recall@10, ndcg@10, recall@50, ndcg@50, mrr@50: by cutoff, then kind (stable whatever the dict
    order: a record read back from JSON has its keys sorted)."""
    kind, _, k = name.partition("@")
    return (int(k) if k.isdigit() else 0, _METRIC_ORDER.get(kind, len(_METRIC_ORDER)), kind)


def holdout_lines(metrics: dict[str, Any]) -> list[str]:
    """The holdout table: model and baselines (by name), each metric with its 95% bootstrap interval."""
    model = metrics["model"]
    cols = sorted((k for k in model if "_ci_" not in k and k != "n_users"), key=metric_order)
    rows = [("model", model)]
    if (metrics.get("recency_prior") or {}).get("test"):
        rows.append(("model+prior", metrics["recency_prior"]["test"]))
    rows += sorted(metrics.get("baselines", {}).items())
    cells = [[_with_ci(m, c) if c in m else "–" for c in cols] for _, m in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    name_w = max(len(n) for n, _ in rows)
    out = [f"holdout, {model.get('n_users', 0):,} users (95% bootstrap intervals):",
           ("  " + " " * name_w + "  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths))).rstrip()]
    out += ["  " + n.ljust(name_w) + "  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
            for (n, _), r in zip(rows, cells)]
    return out


def explain_paragraph(explained: dict[str, Any] | None) -> str:
    """The explain stage's outcome: the two description-quality shares and why they were (not) published."""
    if not explained:
        return ""
    q = explained.get("quality") or {}
    shares = (f" Degenerate-repetition-free: {q['clean_share']:.0%}; grounded in the history: "
              f"{q['grounded_share']:.0%} (of {q['n']})." if q else "")
    return f"<p class='verdict muted'>Descriptions {html.escape(str(explained.get('reason', '')) + shares)}</p>"


def output_locations(records: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(what, where, detail) for every output the stage records name."""
    out: list[tuple[str, str, str]] = []
    if "prepare" in records:
        out.append(("prepared data", records["prepare"]["prepared"], ""))
    if "train" in records:
        out.append(("model", records["train"]["model_dir"], f"version {records['train']['model_version']}"))
    if "evaluate" in records:
        out.append(("evaluation", records["evaluate"]["eval_dir"], "metrics.json, holdout_recs.parquet, plots"))
    inferred = records.get("infer") or {}
    if inferred.get("published"):
        man = inferred["manifest"]
        out.append(("recommendations", inferred["recommendations"],
                    f"{man['rows']:,} users, top-{man['k']}, model {man['model_version']}"))
    elif inferred:
        out.append(("recommendations", "none published", str(inferred.get("reason"))))
    if "report" in records:
        out += [("report", records["report"]["report"], "open in a browser"),
                ("metrics history", records["report"]["history"], "one row per run date")]
    if (records.get("explain") or {}).get("explanations"):
        out.append(("explanations", records["explain"]["explanations"], f"{records['explain']['users']} users"))
    return out


def _reason(decision: dict[str, Any]) -> str:
    """The gate's reason without its verdict word and without the guard's message (it has its own line)."""
    text = str(decision["reason"]).split("; generation guard", 1)[0]
    return text.split(": ", 1)[1] if text.startswith(("promoted: ", "rejected: ")) else text


def summary_text(job: str, run_date: str, records: dict[str, dict[str, Any]], skipped: list[str],
                 wall_s: float) -> str:
    """The block printed at the end of a job, from its stage records alone (so a rerun that skips
    every stage prints the same block)."""
    lines = [f"=== recsys-core {job}, run_date {run_date} " + "=" * 40]
    if skipped and len(skipped) == len(records):
        lines.append(f"every stage was already complete for {run_date}: nothing ran (--force reruns them); "
                     "below is what the earlier run recorded")
    elif skipped:
        lines.append(f"already complete, skipped: {', '.join(skipped)}")
    if "evaluate" in records:
        lines += holdout_lines(records["evaluate"]["metrics"])
    if "train" in records:
        t = records["train"]
        outcome = training_outcome(t["history"], t.get("epochs_max"), t.get("patience"))
        lines.append(f"training:  {training_sentence(outcome)}")
        lines.append(f"refit:     {refit_sentence(t.get('refit'))}")
        lines.append(f"guard:     {guard_sentence(t.get('guard'))}")
    if "evaluate" in records:
        publish = (records.get("promote") or {}).get("publish")
        lines.append(f"prior:     {prior_sentence(records['evaluate']['metrics'].get('recency_prior'), publish)}")
    if "promote" in records:
        p = records["promote"]
        verdict = "PROMOTED" if p["decision"]["promote"] else "NOT PROMOTED"
        lines.append(f"promotion: {verdict} model {p['model_version']} ({_reason(p['decision'])})")
        lines.append(f"published: {p['publish_reason']}")
    if "explain" in records and records["explain"].get("reason"):
        lines.append(f"explain:   {records['explain']['reason']}")
    lines.append("outputs:")
    locs = output_locations(records)
    w = max((len(k) for k, _, _ in locs), default=0)
    lines += [f"  {k.ljust(w)}  {v}" + (f"  ({d})" if d else "") for k, v, d in locs]
    times = "  ".join(f"{s} {records[s].get('wall_s', 0):.1f}s" for s in records)
    ran = [s for s in records if s not in skipped]
    total = (f"this run {wall_s:.1f}s" if ran else f"this check {wall_s:.1f}s; the times are the earlier run's")
    lines.append(f"stages:    {times}  ({total})")
    return "\n".join(lines)
