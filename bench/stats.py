"""Statistics over a year of history: database size and query times with retention, against the same year kept raw.

Generates a year of daily switches for N nodes (default 2,000) the way cidd's engine writes them (one ``events``
row per transition: ready -> to_installer -> installing -> to_image -> ready, with ladder climbs, install retries
and failures, a few sick nodes failing often), day by day, and runs cidd's own retention (cidd.history.History,
default settings: 30 days of events, 7-day roll-ups) after each day, as the hourly timer would. Then it times:

- ``stats_query_s``: the whole-cluster statistics (every node, image and group; what ``cidcapt --stats`` asks),
- ``node_query_s``: the statistics of one node (``cidcapt --stats node0042``),
- ``image_query_s`` (``-i rocky-9-3``) and ``range_90d_query_s`` (``--since 90d``: read from the weekly roll-ups,
  as the range starts before the events kept),

each the median of --repeat runs, through the same function cidd runs in its thread (cidd.history.compute_stats),
and prints the database size after a WAL checkpoint. The baseline is the same year with no retention (every row
kept), generated in the same run (skip it with --no-baseline).

usage: python bench/stats.py [--nodes 2000] [--days 365] [--repeat 3] [--dir DIR] [--no-baseline]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog  # noqa: E402
from twisted.internet.defer import maybeDeferred  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from cidcatalog.catalog import Catalog, Image  # noqa: E402
from cidd.config import parse_config  # noqa: E402
from cidd.engine import Engine  # noqa: E402
from cidd.history import History, StatsQuery, compute_stats  # noqa: E402
from cidd.store import Store  # noqa: E402

DAY = 86400.0
START = 1_735_689_600.0  # 2025-01-01 00:00 UTC
IMAGES = {"debian-12-1": 2_100_000_000, "debian-12-2": 2_300_000_000, "rocky-9-3": 2_800_000_000}
INSERT = ("INSERT INTO events (ts, node, job, image, from_state, to_state, attempt, rung, elapsed, detail)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def one_switch(rng: random.Random, node: str, job: str, image: str, ts: float, fail_p: float) -> list[tuple]:
    """Return the events of one switch of ``node`` starting at ``ts`` (a failure with probability ``fail_p``)."""
    rows: list[tuple[Any, ...]] = []
    clock = [ts]

    def add(frm: str, to: str, elapsed: float, detail: str, attempt: int = 0, rung: int = 0) -> None:
        if frm != "ready":
            clock[0] += elapsed  # a row leaving a phase is written when the phase ends
        rows.append((clock[0], node, job, image, frm, to, attempt, rung, elapsed, detail))

    add("ready", "to_installer", DAY, f"switch to {image} for job {job}; rung 0: reboot")
    rung = 0
    if rng.random() < 0.03:
        add("to_installer", "to_installer", 300.0, "no answer 300s after rung 0 (reboot); rung 1: reboot", rung=1)
        rung = 1
    if rng.random() < fail_p / 3:
        add("to_installer", "failed", 900.0, "no answer 600s after rung 1 (reboot); node did not boot into the "
            "installer after every rung of the ladder (reboot, reboot)", rung=1)
        return rows
    add("to_installer", "installing", rng.lognormvariate(4.2, 0.3) + 300 * rung, "installer connected",
        attempt=1, rung=rung)
    if rng.random() < 0.02:
        add("installing", "installing", rng.lognormvariate(4.5, 0.4), "install failed (download dropped); trying "
            "again", attempt=2)
    if rng.random() < fail_p / 3:
        add("installing", "failed", rng.lognormvariate(5, 0.3), f"install of {image} failed after 2 attempt(s): "
            "checksum mismatch: expected 3af0..., got 9c12...", attempt=2)
        return rows
    add("installing", "to_image", rng.lognormvariate(5.4, 0.2), f"{image} written and verified; rung 0: reboot",
        attempt=1)
    if rng.random() < fail_p / 3:
        add("to_image", "failed", rng.lognormvariate(4.3, 0.3), f"node booted image debian-12-1 instead of {image};"
            " check its boot order and the installed boot loader", attempt=1)
        return rows
    add("to_image", "ready", rng.lognormvariate(4.3, 0.3), f"booted {image}", attempt=1)
    return rows


def day_rows(rng: random.Random, day: int, names: list[str], sick: set[str]) -> list[tuple[Any, ...]]:
    """Return the events of one day in time order: every node switches once, at a time of its own."""
    rows: list[tuple[Any, ...]] = []
    image = list(IMAGES)[day % len(IMAGES)]
    for index, node in enumerate(names):
        job = str(100_000 + day * 10 + index % 7)
        start = START + day * DAY + rng.uniform(0, 20 * 3600)
        rows.extend(one_switch(rng, node, job, image, start, 0.25 if node in sick else 0.01))
    rows.sort()
    return rows


def generate(path: Path, nodes: int, days: int, retention: bool) -> tuple[Engine, Store, float]:
    """Write ``days`` days of history for ``nodes`` nodes into a new database at ``path``; return the engine, the
    store and the seconds retention took in all."""
    names = [f"node{i:04d}" for i in range(nodes)]
    half = nodes // 2
    config = parse_config({"state_dir": str(path.parent), "groups": {"gpu": {}},
                           "nodes": [{"hosts": f"node[0000-{half - 1:04d}]", "group": "default"},
                                     {"hosts": f"node[{half:04d}-{nodes - 1:04d}]", "group": "gpu"}]}, "bench.yaml")
    catalog = Catalog({image: Image(*image.split("-"), f"{image}.tar.zst", sha256="ab" * 32, size=size)
                       for image, size in IMAGES.items()})
    store = Store(path, synchronous="normal")
    clock = Clock()
    engine = Engine(config, catalog, store, clock, link=None)  # type: ignore[arg-type]
    history = History(engine, store, maybeDeferred, clock)
    rng = random.Random(42)
    sick = set(rng.sample(names, max(1, nodes // 100)))
    spent = 0.0
    for day in range(days):
        with store.transaction():
            store.db.executemany(INSERT, day_rows(rng, day, names, sick))
        if retention:
            clock.advance(START + (day + 1) * DAY - clock.seconds())
            started = time.perf_counter()
            done = history.retain()
            while not done.called:
                clock.advance(0)
            spent += time.perf_counter() - started
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return engine, store, spent


def timed(function: Any, repeat: int) -> float:
    """Return the median seconds of ``repeat`` calls of ``function``."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(engine: Engine, store: Store, repeat: int) -> dict[str, float]:
    """Return the database size (MiB) and the median times of the whole-cluster and one-node statistics."""
    groups = dict(engine.groups)
    sizes = {image: engine.catalog.images[image].size for image in engine.catalog}
    period = engine.config.retention.period_days * DAY
    path = store.path
    end = store.db.execute("SELECT MAX(ts) FROM events").fetchone()[0]
    report = compute_stats(path, StatsQuery(worst=10), groups, sizes, period)
    assert report["total"]["switches"] > 0 and report["nodes"], "the history is empty"
    return {
        "db_mib": Path(path).stat().st_size / 2**20,
        "stats_query_s": timed(lambda: compute_stats(path, StatsQuery(), groups, sizes, period), repeat),
        "node_query_s": timed(lambda: compute_stats(path, StatsQuery(nodes=("node0042",)), groups, sizes, period),
                              repeat),
        "image_query_s": timed(lambda: compute_stats(path, StatsQuery(image="rocky-9-3"), groups, sizes, period),
                               repeat),
        "range_90d_query_s": timed(lambda: compute_stats(path, StatsQuery(since=end - 90 * DAY), groups, sizes,
                                                         period), repeat),
        "switches": report["total"]["switches"],
        "worst_rate": report["nodes"][0]["success_rate"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where the databases go (default: a temporary directory)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the year kept raw (no retention)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # quiet retention
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        started = time.perf_counter()
        engine, store, spent = generate(Path(tmp) / "kept" / "cidd.sqlite", args.nodes, args.days, retention=True)
        generated = time.perf_counter() - started
        kept, rollups = store.history_size()
        figures = measure(engine, store, args.repeat)
        store.close()
        print(f"nodes={args.nodes} days={args.days} switches={figures['switches']} events_kept={kept} "
              f"rollup_period_rows={rollups} generate_s={generated:.0f} retention_s={spent:.1f} "
              f"retention_s_per_day={spent / args.days:.3f}")
        print(f"image_query_s={figures['image_query_s']:.3f} range_90d_query_s={figures['range_90d_query_s']:.3f}")
        if not args.no_baseline:
            engine_raw, raw_store, _ = generate(Path(tmp) / "raw" / "cidd.sqlite", args.nodes, args.days,
                                               retention=False)
            raw = measure(engine_raw, raw_store, args.repeat)
            raw_store.close()
            print(f"baseline (no retention, every event kept): db_mib={raw['db_mib']:.1f} "
                  f"stats_query_s={raw['stats_query_s']:.3f} node_query_s={raw['node_query_s']:.4f}")
            print(f"db_ratio={figures['db_mib'] / raw['db_mib']:.3f} "
                  f"stats_ratio={figures['stats_query_s'] / raw['stats_query_s']:.3f}")
    print(f"db_mib={figures['db_mib']:.1f}")
    print(f"stats_query_s={figures['stats_query_s']:.3f}")
    print(f"node_query_s={figures['node_query_s']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
