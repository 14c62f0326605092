"""Publishing that cannot go wrong (issues 14 and 15), with real Ray Data writes, locally and on moto S3:
overlapping publishes, publishes killed at each step, count checks, and plain folder readers."""
from __future__ import annotations

import json
import threading
import time

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import ray

from recsys_core import storage
from recsys_core.serve import publish as pub
from recsys_core.serve.publish import (DATA_FILE, MANIFEST, PublishError, count_check, publish,
                                       read_recommendations)

pytestmark = pytest.mark.integration


def recs(n_users: int, model: str, offset: int = 0) -> pa.Table:
    return pa.table({"user_id": [f"u{offset + i}" for i in range(n_users)],
                     "item_ids": [[i % 7, (i + 1) % 7] for i in range(n_users)],
                     "scores": [[0.9, 0.1]] * n_users, "model_version": [model] * n_users})


def dataset(table: pa.Table, blocks: int = 3) -> ray.data.Dataset:
    return ray.data.from_arrow(table).repartition(blocks)


def plain_reads(folder: str) -> dict[str, pa.Table]:
    """The folder as readers that know nothing of the manifest read it."""
    fs, path = storage.filesystem(folder)
    out = {"pyarrow.dataset": pads.dataset(path, filesystem=fs, format="parquet").to_table()}
    if not storage.is_s3(folder):
        out["pandas"] = pa.Table.from_pandas(pd.read_parquet(folder), preserve_index=False)
        out["duckdb"] = duckdb.sql(f"SELECT * FROM read_parquet('{folder}/*.parquet')").arrow().read_all()
    return out


def same_rows(a: pa.Table, b: pa.Table) -> bool:
    key = lambda t: sorted(zip(t["user_id"].to_pylist(), t["model_version"].to_pylist()))  # noqa: E731
    return key(a) == key(b)


def test_count_check_by_hand():
    assert count_check(4, 4, 4, 4) is None and count_check(4, 4, 4, None) is None
    assert "footers sum to 5" in count_check(4, 4, 5, 4)
    assert "3 distinct users" in count_check(4, 3, 4, 4)
    assert "expects users=400" in count_check(350, 350, 350, 400)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_overlapping_publishes_leave_a_manifest_matching_its_data(ray_local, moto_s3, tmp_path, where):
    """Two publishes of one date started together (400 and 350 users, different models) while a reader
    reads through the manifest the whole time: every read matches its manifest; the final manifest,
    data file and plain reads are one generation; nothing of the loser's is left behind."""
    root = str(tmp_path) if where == "local" else f"s3://recsys-test/overlap-{tmp_path.name}"
    folder = storage.join(root, "recommendations", "run_date=2026-11-27")
    publish(dataset(recs(10, "v0")), folder, {"users": 10, "model_version": "v0"})
    tables = {"A": recs(400, "A"), "B": recs(350, "B", offset=1000)}
    results: dict[str, dict] = {}
    errors: list[str] = []
    reads: list[tuple[int, int, str, str]] = []
    stop = threading.Event()

    def run(name: str) -> None:
        try:
            results[name] = publish(dataset(tables[name]), folder, {"users": tables[name].num_rows,
                                                                    "model_version": name})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {e!r}")

    def read() -> None:
        while not stop.is_set():
            try:
                t, m = read_recommendations(folder)
                reads.append((t.num_rows, m["users"], set(t["model_version"].to_pylist()).pop(), m["model_version"]))
            except Exception as e:  # noqa: BLE001
                errors.append(f"reader: {e!r}")
            time.sleep(0.05)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=run, args=(n,)) for n in tables]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()

    assert not errors, errors
    assert set(results) == {"A", "B"}
    assert reads and all(rows == users and data_model == man_model for rows, users, data_model, man_model in reads)
    table, manifest = read_recommendations(folder)
    winner = manifest["model_version"]
    loser = "A" if winner == "B" else "B"
    assert table.num_rows == manifest["rows"] == manifest["users"] == tables[winner].num_rows
    assert manifest["previous_attempt"] == results[loser]["attempt"]  # the switches were serialised
    for name, t in plain_reads(folder).items():
        assert same_rows(t, tables[winner]), name
    assert not storage.list_files(pub.staging_dir(folder))
    print(f"{where}: {len(reads)} manifest reads during two overlapping publishes, all matching; "
          f"final {winner} ({manifest['rows']} rows)")


class Killed(BaseException):
    """Stands for the process dying at that point (not caught by any except Exception)."""


@pytest.mark.parametrize("step", ["merge", "upload_generation", "switch", "plain_copy"])
def test_publish_killed_at_each_step_never_exposes_a_mix(ray_local, tmp_path, monkeypatch, step):
    folder = str(tmp_path / "recommendations" / "run_date=2026-11-27")
    old, new = recs(30, "old"), recs(20, "new", offset=100)
    publish(dataset(old), folder, {"users": 30, "model_version": "old"})
    real = {"merge": pub.merge_parts, "upload_generation": storage.upload_file,
            "switch": storage.replace_if_match, "plain_copy": storage.copy_file}

    def die(*a, **k):
        raise Killed(step)

    target = {"merge": (pub, "merge_parts"), "upload_generation": (storage, "upload_file"),
              "switch": (storage, "replace_if_match"), "plain_copy": (storage, "copy_file")}[step]
    monkeypatch.setattr(*target, die)
    with pytest.raises(Killed):
        publish(dataset(new), folder, {"users": 20, "model_version": "new"})
    monkeypatch.setattr(*target, real[step])

    table, manifest = read_recommendations(folder)
    expected_manifest = new if step == "plain_copy" else old  # killed after the manifest switch
    assert same_rows(table, expected_manifest) and manifest["rows"] == expected_manifest.num_rows
    for name, t in plain_reads(folder).items():  # plain readers: the old generation, whole
        assert same_rows(t, old), (step, name)
    # the rerun publishes cleanly and is what both kinds of reader see
    again = publish(dataset(new), folder, {"users": 20, "model_version": "new"})
    table, manifest = read_recommendations(folder)
    assert manifest["attempt"] == again["attempt"] and same_rows(table, new)
    for name, t in plain_reads(folder).items():
        assert same_rows(t, new), (step, name)


def test_counts_are_checked_before_the_switch(ray_local, tmp_path):
    folder = str(tmp_path / "recommendations" / "run_date=2026-11-27")
    publish(dataset(recs(5, "v0")), folder, {"users": 5})
    with pytest.raises(PublishError, match="350 rows but the manifest expects users=400"):
        publish(dataset(recs(350, "x")), folder, {"users": 400})
    dup = pa.concat_tables([recs(3, "x"), recs(2, "x")])
    with pytest.raises(PublishError, match="5 rows but 3 distinct users"):
        publish(dataset(dup), folder, {})
    table, manifest = read_recommendations(folder)  # still the first generation
    assert table.num_rows == manifest["users"] == 5
    assert not storage.list_files(pub.staging_dir(folder))


def test_reader_raises_on_a_manifest_that_does_not_match(ray_local, tmp_path):
    folder = str(tmp_path / "recommendations" / "run_date=2026-11-27")
    publish(dataset(recs(5, "v0")), folder, {"users": 5})
    man = storage.read_json(storage.join(folder, MANIFEST))
    storage.write_json(storage.join(folder, MANIFEST), {**man, "users": 400, "rows": 400})
    with pytest.raises(PublishError, match="5 rows read, manifest says rows=400 users=400"):
        read_recommendations(folder)
    storage.write_json(storage.join(folder, MANIFEST), {**man, "attempt": "20260101T000000000000-abcdef"})
    with pytest.raises(PublishError, match="the data file is attempt"):
        read_recommendations(folder)


def test_stale_staging_of_killed_attempts_is_removed_fresh_is_kept(ray_local, tmp_path):
    folder = str(tmp_path / "recommendations" / "run_date=2026-11-27")
    stale = pub.new_attempt(pub.dt.datetime(2026, 1, 1, tzinfo=pub.dt.timezone.utc))
    fresh = pub.new_attempt()
    for a in (stale, fresh):
        storage.write_table(recs(2, "x"), storage.join(pub.staging_dir(folder, a), f"part-{a}-w-00000.parquet"))
        storage.write_table(recs(2, "x"), pub.generation(folder, a))
    published = publish(dataset(recs(4, "v")), folder, {"users": 4})
    left = {f.rsplit("/", 1)[-1] for f in storage.list_files(pub.staging_dir(folder))}
    assert left == {f"part-{fresh}-w-00000.parquet"}  # an attempt that may still be writing is kept
    gens = {f.rsplit("/", 1)[-1] for f in storage.list_files(storage.join(folder, pub.GENERATIONS))}
    assert gens == {f"{fresh}.parquet", f"{published['attempt']}.parquet"}
    assert json.loads(storage.read_bytes(storage.join(folder, MANIFEST)))["attempt"] == published["attempt"]
    assert DATA_FILE in {f.rsplit("/", 1)[-1] for f in storage.list_files(folder)}
