"""Shape checks of the vectorised production-like log generator (data.sources.write_scale_log)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from recsys_core import storage
from recsys_core.data.sources import LogShape, scale_log_tables, write_scale_log

pytestmark = pytest.mark.unit
SHAPE = LogShape(n_events=200_000, n_users=8_000, n_items=3_000, n_days=7, start="2026-11-24",
                 dup_fraction=0.002, unknown_fraction=0.001, seed=3)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("log")
    src = write_scale_log(SHAPE, str(folder))
    return src, folder


def test_rows_partitions_and_types(written):
    src, folder = written
    days = sorted(p.name for p in (folder / "interactions").iterdir())
    assert days == [f"dt=2026-11-{d}" for d in range(24, 31)]
    ds = pads.dataset(src.interactions, format="parquet", partitioning="hive")
    t = ds.to_table()
    assert t.num_rows == SHAPE.n_events
    assert [t.schema.field(c).type for c in ("user_id", "item_id", "ts")] == [pa.int64()] * 3
    # every row sits in the partition of its own UTC day
    row_day = (t["ts"].to_numpy() // 86_400).astype("datetime64[D]").astype(str)
    assert (row_day == np.array(t["dt"].to_pylist())).all()
    per_day = np.unique(row_day, return_counts=True)[1]
    assert per_day.min() > 0.9 * SHAPE.n_events / SHAPE.n_days  # days about equally full


def test_item_ids_are_in_the_catalog_except_the_unknown_fraction(written):
    src, _ = written
    items = storage.read_table(src.items)
    assert items.num_rows == SHAPE.n_items and items["item_id"].type == pa.int64()
    assert len(set(items["item_id"].to_pylist())) == SHAPE.n_items
    assert all(t.startswith("The ") and t.endswith(str(i)) for t, i in
               zip(items["title"].to_pylist()[:50], items["item_id"].to_pylist()[:50]))
    ev = pads.dataset(src.interactions, format="parquet", partitioning="hive").to_table()
    known = np.isin(ev["item_id"].to_numpy(), items["item_id"].to_numpy())
    # unknown rows: exactly the configured count, plus duplicates that copied one of them (few)
    assert SHAPE.n_events * SHAPE.unknown_fraction <= (~known).sum() <= SHAPE.n_events * SHAPE.unknown_fraction * 1.1


def test_zipf_items_heavy_tailed_users_and_duplicates():
    events, _ = scale_log_tables(SHAPE)
    counts = np.sort(np.unique(events["item_id"].to_numpy(), return_counts=True)[1])[::-1]  # by rank
    ranks = np.arange(1, 201)
    slope = np.polyfit(np.log(ranks), np.log(counts[:200]), 1)[0]
    assert -1.15 < slope < -0.85  # Zipf exponent zipf_a = 1.0 over the top 200 ranks
    assert counts[0] / counts[9] == pytest.approx(10, rel=0.15)  # rank 1 vs rank 10: 10x
    users = np.sort(np.unique(events["user_id"].to_numpy(), return_counts=True)[1])[::-1]
    top1 = users[: len(users) // 100].sum() / users.sum()
    assert top1 > 0.1  # the top 1% of users hold over 10% of events (uniform: 1%)
    assert users[0] > 30 * np.median(users)
    rows = np.stack([events[c].to_numpy() for c in ("user_id", "item_id", "ts")], axis=1)  # (E, 3)
    repeats = len(rows) - len(np.unique(rows, axis=0))
    assert repeats >= SHAPE.n_events * SHAPE.dup_fraction  # the exact copies (and rare natural collisions)
    again, _ = scale_log_tables(SHAPE)
    assert again.equals(events)  # deterministic for a seed
