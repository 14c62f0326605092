"""The online proxy: yesterday's published recommendations scored against what users did since.

Each nightly takes the newest earlier date with published recommendations (read through their
manifest, :func:`recsys_core.serve.publish.read_recommendations`) and the events that arrived after
that run's newest event (``input_snapshot.newest_event_ts`` of its manifest). Over the users active
since who had a published list: hit rate, recall and NDCG at k of each user's top-k against the set of
items they interacted with since. This is the number an operator watches: it is what the published
lists did, not a held-out event.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_core import storage
from recsys_core.data.prepare import catalog_ids
from recsys_core.eval.metrics import summarize_values
from recsys_core.serve.publish import MANIFEST, read_recommendations

log = logging.getLogger(__name__)
_DATE_DIR = re.compile(r"run_date=(\d{4}-\d{2}-\d{2})/" + re.escape(MANIFEST) + "$")


def newest_event_ts(users_uri: str) -> int | None:
    """The newest event timestamp (epoch seconds) in a prepared users table, None when empty."""
    newest = None
    for t in storage.iter_batches(users_uri, columns=["ts"]):  # a batch at a time
        flat = pc.list_flatten(t["ts"])
        if len(flat):
            m = int(pc.max(flat).as_py())
            newest = m if newest is None else max(newest, m)
    return newest


def events_since(users: pa.Table, item_ids: pa.Array, since_ts: int) -> dict[Any, set[Any]]:
    """user_id -> the item ids of that user's events with ts > ``since_ts`` (prepared users: user_id,
    items as item_idx, ts); users without such events are absent."""
    out: dict[Any, set[Any]] = {}
    lists = users["items"].combine_chunks()  # one array: parent indices count rows from the table's start
    items = pc.list_flatten(lists).to_numpy().astype(np.int64)  # (E,)
    ts = pc.list_flatten(users["ts"].combine_chunks()).to_numpy().astype(np.int64)  # (E,)
    owner = pc.list_parent_indices(lists).to_numpy().astype(np.int64)  # (E,) row of each event
    new = np.flatnonzero(ts > since_ts)  # (M,) only the events since are touched in Python
    uids = users["user_id"].take(pa.array(owner[new])).to_pylist()
    for uid, iid in zip(uids, item_ids.take(pa.array(items[new])).to_pylist()):
        out.setdefault(uid, set()).add(iid)
    return out


def per_user_online(lists: Sequence[Sequence[Any]], events: Sequence[set[Any]], k: int) -> dict[str, np.ndarray]:
    """Per user (U,): hit@k (any of the top k among the new items), recall@k (|top k & new| / |new|) and
    NDCG@k (binary gains 1/log2(rank+2), ideal = min(|new|, k) hits at the top)."""
    disc = 1.0 / np.log2(np.arange(k) + 2.0)  # (k,)
    hit, recall, ndcg = (np.zeros(len(lists)) for _ in range(3))
    for u, (ranked, new) in enumerate(zip(lists, events)):
        gains = np.array([1.0 if i in new else 0.0 for i in list(ranked)[:k]])  # (<=k,)
        found = gains.sum()
        hit[u] = float(found > 0)
        recall[u] = found / len(new)
        ndcg[u] = float(gains @ disc[:len(gains)]) / float(disc[:min(len(new), k)].sum())
    return {f"hit_rate@{k}": hit, f"recall@{k}": recall, f"ndcg@{k}": ndcg}


def score_published(recs: pa.Table, events: dict[Any, set[Any]], k: int, n_boot: int) -> dict[str, Any]:
    """Metrics (with bootstrap CIs) over the active users who had a published list, and the counts."""
    lists = dict(zip(recs["user_id"].to_pylist(), recs["item_ids"].to_pylist()))
    scored = [u for u in events if u in lists]
    per_user = per_user_online([lists[u] for u in scored], [events[u] for u in scored], k)
    out: dict[str, Any] = summarize_values(per_user, len(scored), n_boot) if scored else {}
    out.update({"n_users": len(scored), "users_active": len(events),
                "coverage": len(scored) / len(events) if events else 0.0})
    return out


def previous_published(root: str, run_date: str) -> str | None:
    """The newest run date before ``run_date`` with published recommendations (a manifest), or None."""
    dates = [m.group(1) for f in storage.list_files(storage.join(root, "recommendations"), MANIFEST)
             if (m := _DATE_DIR.search(f)) and m.group(1) < run_date]
    return max(dates) if dates else None


def online_proxy(root: str, run_date: str, users_uri: str, items_uri: str, k: int, n_boot: int) -> dict[str, Any] | None:
    """Score the previous date's published top-``k`` against today's events since that run's newest
    event (None when no earlier date published anything)."""
    prev = previous_published(root, run_date)
    if prev is None:
        return None
    folder = storage.join(root, "recommendations", f"run_date={prev}")
    recs, manifest = read_recommendations(folder)
    since = (manifest.get("input_snapshot") or {}).get("newest_event_ts")
    if since is None:  # published before the manifest carried it: that run's prepared users
        prev_users = storage.join(root, "runs", f"run_date={prev}", "prepared", "users")
        since = newest_event_ts(prev_users) if storage.exists(prev_users) else None
    if since is None:  # nothing says where "since" starts: no proxy rather than a wrong one
        log.warning("online proxy skipped: %s's publication names no newest event and its prepared users are "
                    "gone", prev)
        return None
    ids = catalog_ids(items_uri)
    events: dict[Any, set[Any]] = {}
    for t in storage.iter_batches(users_uri, columns=["user_id", "items", "ts"]):  # a user is in one batch
        events.update(events_since(t, ids, int(since)))
    out = {"from_run_date": prev, "model_version": manifest.get("model_version"), "since_ts": int(since), "k": k,
           **score_published(recs, events, k, n_boot)}
    log.info("online proxy: %s's recommendations vs %d active users' events since: %s", prev, out["users_active"],
             {m: round(out[m], 4) for m in (f"hit_rate@{k}", f"recall@{k}", f"ndcg@{k}") if m in out})
    return out
