"""The previous prepare (one Python call per user, per history and per event), kept only so tests can
compare the vectorised stage against it: same histories, windows, duplicates and counts."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from recsys_core.data.prepare import QUARANTINE_SCHEMA, build_user
from recsys_core.data.split import train_part, training_windows


def reference_histories(good: pa.Table, max_history: int) -> pa.Table:
    """What ``groupby("user_id").map_groups(build_user)`` returned: one build_user call per user."""
    users = good["user_id"].to_pylist()
    rows: dict[str, list[int]] = {}
    for i, u in enumerate(users):
        rows.setdefault(u, []).append(i)
    parts = [build_user(good.take(pa.array(rows[u])), max_history) for u in sorted(rows)]
    return pa.concat_tables(parts)


def reference_examples(histories: pa.Table, seq_len: int) -> pa.Table:
    inputs, targets = [], []
    for seq in histories["items"].to_pylist():
        train = np.asarray(train_part(seq), dtype=np.int32)
        for x, y in training_windows(train, seq_len):
            inputs.append(x)
            targets.append(y)
    return pa.table({"input": pa.array(inputs, pa.list_(pa.int32())),
                     "target": pa.array(targets, pa.list_(pa.int32()))})


def reference_duplicates(histories: pa.Table, catalog_ids: pa.Array) -> pa.Table:
    users, items, ts = [], [], []
    for u, di, dt_ in zip(histories["user_id"].to_pylist(), histories["dup_items"].to_pylist(),
                          histories["dup_ts"].to_pylist()):
        for i, t in zip(di, dt_):
            users.append(None if u is None else str(u))
            items.append(str(catalog_ids[i].as_py()))
            ts.append(str(t))
    return pa.table({"user_id": users, "item_id": items, "ts": ts, "reason": ["duplicate"] * len(users),
                     "file": [None] * len(users)}, schema=QUARANTINE_SCHEMA)


def reference_train_counts(histories: pa.Table, n_items: int) -> np.ndarray:
    counts = np.zeros(n_items, dtype=np.int64)
    for seq in histories["items"].to_pylist():
        np.add.at(counts, np.asarray(train_part(seq), dtype=np.int64), 1)
    return counts
