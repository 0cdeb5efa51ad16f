"""Statistics of the event history (cidd/core/stats.py, cidd/history.py, the queries of cidd/store.py), retention
and its roll-ups, the ``stats`` request and ``cidcapt --stats``.

The hand-built history below has its medians and 95th percentiles worked out by hand in the comments: the
percentiles interpolate linearly between ranked values (rank (n - 1) * q).
"""

from __future__ import annotations

import io
import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from cidcapt.main import main as cidcapt_main
from cidcatalog.catalog import Catalog, Image
from cidcommon.errors import BadRequest, CidError
from cidd.config import ConfigError, parse_config
from cidd.core.machine import Node, State, Transition, apply
from cidd.core.machine_types import Connected, Installed, Policy, Rung, RungFailed, Tick
from cidd.core.stats import (
    ALL,
    FAILURE_KINDS,
    TOTAL,
    Figures,
    Report,
    Row,
    bucket_of,
    bucket_value,
    failure_kind,
    quantile,
    render,
    roll_up,
)
from cidd.engine import Engine
from cidd.history import History, StatsQuery, compute_stats, parse_query, query_from_args
from cidd.store import _UPGRADES, SCHEMA_VERSION, Store
from cidsim.fake_cidd import FakeCidd, FakeSession, test_ca_file

A, B = "alma-9-1", "debian-12-1"
DAY = 86400.0
T0 = 1_700_000_000.0
SIZES = {A: 1000, B: None}
LADDER = "no answer 600s after rung 1 (reboot); node did not boot into image alma-9-1 after every rung of the ladder " \
         "(reboot, reboot)"
CHECKSUM = "install of debian-12-1 failed after 2 attempt(s): checksum mismatch: expected 3a, got 9c"
WRONG = "node booted image debian-12-1 instead of alma-9-1; check its boot order and the installed boot loader"


def t(node: str, image: str, frm: str, to: str, elapsed: float, rung: int = 0, detail: str = "",
      job: str = "j1") -> Transition:
    return Transition(node=node, job=job, image=image, from_state=frm, to_state=to, attempt=1, rung=rung,
                      elapsed=elapsed, detail=detail)


# n1 (group gpu, image A, 1000 bytes): 4 switches, 3 ok, the 4th fails after climbing the to_image ladder.
#   to_installer 10, 330 (climbed to rung 1), 20, 12 -> sorted 10 12 20 330: median (12+20)/2 = 16,
#                p95 at rank 2.85: 20 + 0.85 * 310 = 283.5
#   installing   100, 120, 200 (after a retry), 110 -> 100 110 120 200: median 115, p95 120 + 0.85 * 80 = 188
#   to_image     20, 30, 40 (the failed one is not timed): median 30, p95 at rank 1.9: 30 + 0.9 * 10 = 39
#   rungs: six waits left at rung 0, one at rung 1 (a fallback save); climbs: 2; 4 installs ok, 1 retried;
#   4000 bytes in 530 s of installing: 7.5 B/s.
# n2 (group default, image B, size unknown): an install that fails on its checksum, then "already runs B".
#   to_installer 15, 5: median 10, p95 5 + 0.95 * 10 = 14.5
# n3 (group default, image A): boots the wrong image.
HISTORY = [
    t("n1", A, "ready", "to_installer", 500), t("n1", A, "to_installer", "installing", 10),
    t("n1", A, "installing", "to_image", 100), t("n1", A, "to_image", "ready", 20),
    t("n1", A, "ready", "to_installer", 3000), t("n1", A, "to_installer", "to_installer", 300, rung=1),
    t("n1", A, "to_installer", "installing", 330, rung=1), t("n1", A, "installing", "to_image", 120),
    t("n1", A, "to_image", "ready", 30),
    t("n1", A, "ready", "to_installer", 3000), t("n1", A, "to_installer", "installing", 20),
    t("n1", A, "installing", "installing", 50, detail="install failed (dropped); trying again"),
    t("n1", A, "installing", "to_image", 200), t("n1", A, "to_image", "ready", 40),
    t("n1", A, "ready", "to_installer", 3000), t("n1", A, "to_installer", "installing", 12),
    t("n1", A, "installing", "to_image", 110), t("n1", A, "to_image", "to_image", 300, rung=1),
    t("n1", A, "to_image", "failed", 900, rung=1, detail=LADDER, job="j9"),
    t("n2", B, "ready", "to_installer", 100), t("n2", B, "to_installer", "installing", 15),
    t("n2", B, "installing", "failed", 60, detail=CHECKSUM),
    t("n2", B, "failed", "to_installer", 100), t("n2", B, "to_installer", "ready", 5, detail="already runs B"),
    t("n3", A, "ready", "to_installer", 100), t("n3", A, "to_installer", "installing", 8),
    t("n3", A, "installing", "to_image", 90), t("n3", A, "to_image", "failed", 40, detail=WRONG),
]
GROUPS = {"n1": "gpu", "n2": "default", "n3": "default"}


def rows_of(history: list[Transition], start: float = T0, step: float = 60.0) -> list[Row]:
    """Return the history as stats rows at times start, start + step, ..."""
    return [Row(start + i * step, x.node, x.job, x.image, x.from_state, x.to_state, x.rung, x.elapsed,
                x.detail if x.to_state == "failed" else None) for i, x in enumerate(history)]


def report_of(rows: list[Row]) -> dict[str, Any]:
    report = Report()
    report.add_rows(rows, GROUPS, SIZES)
    return render(report.finish())


def by(items: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {item[key]: item for item in items}


# --- the pure statistics -------------------------------------------------------------------------------------

def test_statistics_of_a_known_history_match_the_figures_worked_out_by_hand() -> None:
    report = report_of(rows_of(HISTORY))
    nodes = by(report["nodes"], "node")
    n1, n2, n3 = nodes["n1"], nodes["n2"], nodes["n3"]
    assert (n1["switches"], n1["ok"], n1["failed"], n1["success_rate"]) == (4, 3, 1, 0.75)
    assert n1["phases"]["to_installer"] == {"count": 4, "median": 16.0, "p95": 283.5}
    assert n1["phases"]["installing"] == {"count": 4, "median": 115.0, "p95": 188.0}
    assert n1["phases"]["to_image"] == {"count": 3, "median": 30.0, "p95": 39.0}
    assert n1["rungs"] == {"0": 6, "1": 1} and n1["fallback_saves"] == 1 and n1["climbs"] == 2
    assert n1["installs"] == {"ok": 4, "failed": 0, "retried": 1, "abandoned": 0}
    assert n1["bytes"] == 4000 and n1["install_rate"] == 7.5
    assert n1["failures"] == {"ladder_exhausted": 1}
    assert n1["last_failure"] == {"ts": T0 + 18 * 60, "reason": LADDER, "kind": "ladder_exhausted"}
    assert (n2["switches"], n2["ok"], n2["failed"]) == (2, 1, 1)
    assert n2["phases"]["to_installer"] == {"count": 2, "median": 10.0, "p95": 14.5}
    assert n2["failures"] == {"install_checksum": 1} and n2["installs"]["failed"] == 1
    assert n2["bytes"] == 0 and n2["install_rate"] is None  # the catalog gives no size for B
    assert n3["failures"] == {"wrong_image": 1} and n3["success_rate"] == 0.0
    # by image: A is n1 and n3. to_installer 10 12 20 330 + 8 -> 8 10 12 20 330: median 12;
    # installing 90 100 110 120 200: median 110, p95 at rank 3.8: 120 + 0.8 * 80 = 184; 5000 B in 620 s.
    image_a = by(report["images"], "image")[A]
    assert image_a["switches"] == 5 and image_a["phases"]["to_installer"]["median"] == 12.0
    assert image_a["phases"]["installing"] == {"count": 5, "median": 110.0, "p95": 184.0}
    assert image_a["bytes"] == 5000 and image_a["install_rate"] == round(5000 / 620, 1)
    groups = by(report["groups"], "group")
    assert groups["gpu"]["switches"] == 4 and groups["default"]["switches"] == 3
    assert groups["default"]["failures"] == {"install_checksum": 1, "wrong_image": 1}
    total = report["total"]
    assert (total["switches"], total["ok"], total["failed"]) == (7, 4, 3)


def test_worst_nodes_come_by_failure_rate_then_failures() -> None:
    report = Report()
    report.add_rows(rows_of(HISTORY), GROUPS, SIZES)
    worst = render(report.finish(), worst=2)
    assert [n["node"] for n in worst["nodes"]] == ["n3", "n2"]  # rates 1.0, 0.5 (n1: 0.25)
    assert len(worst["images"]) == 2  # images and groups are not cut


def test_quantile_interpolates_between_ranked_values_and_buckets_stay_within_one_percent() -> None:
    assert quantile([(v, 1) for v in (1, 2, 3, 4)], 0.5) == 2.5
    assert quantile([(v, 1) for v in range(1, 21)], 0.95) == pytest.approx(19.05)
    assert quantile([(5.0, 3), (1.0, 1)], 0.5) == 5.0  # weights: 1 5 5 5
    assert quantile([], 0.5) is None
    for value in (0.004, 0.5, 7.0, 61.3, 3599.0, 86400.0):
        assert bucket_value(bucket_of(value)) == pytest.approx(value, rel=0.01)
    assert bucket_value(bucket_of(0.0)) == 0.0


@pytest.mark.parametrize("make, kind", [
    ("ladder", "ladder_exhausted"), ("wrong", "wrong_image"), ("install", "install_failed"),
    ("refused", "install_refused"), ("timeout", "install_timeout"), ("attempts", "install_attempts_used"),
])
def test_failure_kinds_match_the_sentences_the_machine_writes(make: str, kind: str) -> None:
    policy = Policy(ladder=(Rung("reboot", 60.0),), install_timeout=100.0, install_attempts=1)
    base = Node("n1", state=State.TO_INSTALLER, image=B, target=A, job="j", online=True, mode="system",
                boot_id="b0", reboot_from="b0", deadline=60.0)
    installing = Node("n1", state=State.INSTALLING, image=B, target=A, job="j", online=True, mode="installer",
                      boot_id="b1", attempt=1, deadline=100.0)
    steps = {
        "ladder": lambda: apply(base, Tick(), policy, 61.0),
        "wrong": lambda: apply(Node("n1", state=State.TO_IMAGE, image=B, target=A, job="j", boot_id="b1",
                                    reboot_from="b1", deadline=60.0), Connected("b2", "system", B), policy, 5.0),
        "install": lambda: apply(installing, Installed(A, ok=False, reason="disk on fire"), policy, 5.0),
        "refused": lambda: apply(installing, RungFailed("bad request"), policy, 5.0),
        "timeout": lambda: apply(installing, Tick(), policy, 101.0),
        "attempts": lambda: apply(Node("n1", state=State.INSTALLING, image=B, target=A, job="j", online=True,
                                       mode="installer", boot_id="b1", attempt=1, deadline=100.0),
                                  Connected("b2", "installer", None), policy, 5.0),
    }
    step = steps[make]()
    assert step.node.state is State.FAILED, step
    assert failure_kind(step.transition.detail) == kind
    assert kind in FAILURE_KINDS


def test_rolled_up_figures_add_up_to_the_figures_of_the_rows() -> None:
    rows = rows_of(HISTORY, step=DAY / 2)  # spread over two weeks
    whole = Figures()
    for row in rows:
        whole.add(row, SIZES.get(row.image or ""))
    rolled = roll_up(rows, 7 * DAY, SIZES, GROUPS)
    assert len({period for period, *_ in rolled} - {TOTAL}) >= 2  # two weeks or more
    merged = Figures()  # the periods' rows per node and image add up to everything (through their stored form)
    for (period, node, image, _), figures in rolled.items():
        if period != TOTAL and ALL not in (node, image):
            merged.merge(Figures.from_row(figures.to_row()))
    levels: dict[tuple[bool, str, str], Figures] = {}  # so do the rows per node, and per image, of each level
    for (period, node, image, _), figures in rolled.items():
        if ALL in (node, image):
            _total = levels.setdefault((period == TOTAL, node == ALL, image == ALL), Figures())
            _total.merge(figures)
    assert len(levels) == 4 and all(f.summary() == whole.summary() for f in levels.values())
    a, b = whole.summary(), merged.summary()
    for key in ("switches", "ok", "failed", "failures", "rungs", "fallback_saves", "climbs", "installs", "bytes",
                "install_rate", "last_failure"):
        assert a[key] == b[key], key
    for phase, figures in a["phases"].items():
        assert b["phases"][phase]["count"] == figures["count"]
        assert b["phases"][phase]["median"] == pytest.approx(figures["median"], rel=0.01)


# --- the store, the query layer and retention ------------------------------------------------------------------

def make_engine(tmp_path: Path, clock: Clock, retention: dict[str, Any] | None = None) -> tuple[Engine, Store]:
    config = parse_config({"state_dir": str(tmp_path), "groups": {"gpu": {}},
                           "nodes": [{"hosts": "n1", "group": "gpu"}, {"hosts": "n[2-3]"}],
                           "retention": retention or {}}, "test.yaml")
    catalog = Catalog({A: Image("alma", "9", "1", f"{A}.tar.zst", sha256="ab" * 32, size=1000),
                       B: Image("debian", "12", "1", f"{B}.tar.zst", sha256="cd" * 32)})
    store = Store(tmp_path / "cidd.sqlite", synchronous="normal")
    return Engine(config, catalog, store, clock, link=None), store  # type: ignore[arg-type]


def sync_run(function: Any, *args: Any) -> Deferred:
    return maybeDeferred(function, *args)


def result(d: Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def write(store: Store, history: list[Transition], start: float, step: float) -> None:
    with store.transaction():
        for i, x in enumerate(history):
            store.add_event(start + i * step, x)


def test_stats_read_from_the_database_match_and_filters_select(tmp_path: Path) -> None:
    clock = Clock()
    engine, store = make_engine(tmp_path, clock)
    write(store, HISTORY, T0, 60.0)
    path, groups = store.path, engine.groups

    def stats(**query: Any) -> dict[str, Any]:
        return compute_stats(path, StatsQuery(**query), groups, SIZES, 7 * DAY)

    assert stats()["nodes"] == report_of(rows_of(HISTORY))["nodes"]
    assert [n["node"] for n in stats(nodes=("n2", "n3"))["nodes"]] == ["n2", "n3"]
    assert [i["image"] for i in stats(image=B)["images"]] == [B]
    only_j9 = stats(job="j9")
    assert only_j9["total"]["switches"] == 1 and only_j9["total"]["failures"] == {"ladder_exhausted": 1}
    first_switch = stats(until=T0 + 4 * 60)  # the first four rows: n1's first switch
    assert first_switch["total"]["switches"] == 1 and first_switch["total"]["ok"] == 1
    late = stats(since=T0 + 19 * 60)  # n2 and n3 only
    assert {n["node"] for n in late["nodes"]} == {"n2", "n3"}
    assert stats(worst=1)["nodes"][0]["node"] == "n3"
    assert stats()["events_since"] == T0
    many = tuple(f"x{i}" for i in range(600)) + ("n1",)  # more names than go into SQL: filtered after reading
    assert [n["node"] for n in stats(nodes=many)["nodes"]] == ["n1"]
    store.close()


def test_retention_rolls_up_old_events_and_keeps_the_statistics(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(T0 + 70 * DAY)
    engine, store = make_engine(tmp_path, clock, {"events_days": 30, "period_days": 7, "batch": 7,
                                                  "rollups_days": 365})
    rng = random.Random(7)
    for day in range(70):  # n1-n3 switch every day; about one switch in six fails somewhere
        for node in ("n1", "n2", "n3"):
            image = A if day % 2 else B
            base = [t(node, image, "ready", "to_installer", 3000, job=f"d{day}"),
                    t(node, image, "to_installer", "installing", rng.uniform(30, 300), job=f"d{day}")]
            if rng.random() < 0.15:
                base.append(t(node, image, "installing", "failed", 60, detail=CHECKSUM, job=f"d{day}"))
            else:
                base += [t(node, image, "installing", "to_image", rng.uniform(100, 900), job=f"d{day}"),
                         t(node, image, "to_image", "ready", rng.uniform(20, 120), rung=rng.choice((0, 0, 1)),
                           job=f"d{day}")]
            write(store, base, T0 + day * DAY + 3600, 60.0)
    history = History(engine, store, sync_run, clock)
    before = result(history.stats(StatsQuery()))
    rows_before = store.history_size()[0]

    done = history.retain()
    while not done.called:  # one batch of 7 rows per reactor turn
        clock.advance(0)
    kept, rollups = store.history_size()
    assert 0 < kept < rows_before and rollups > 0
    oldest = store.db.execute("SELECT MIN(ts) FROM events").fetchone()[0]
    assert oldest >= clock.seconds() - 30 * DAY

    clock.advance(STALE := 61)  # past the cache
    after = result(history.stats(StatsQuery()))
    assert after["events_since"] == oldest
    compare(before, after)
    history.retain()  # nothing more to roll up: nothing counted twice
    while history._next is not None:
        clock.advance(0)
    clock.advance(STALE)
    compare(before, result(history.stats(StatsQuery())))
    # a node's figures and a range that only roll-ups cover still add up
    clock.advance(STALE)
    n1 = result(history.stats(StatsQuery(nodes=("n1",))))
    assert n1["nodes"] == [n for n in after["nodes"] if n["node"] == "n1"]
    early = result(history.stats(StatsQuery(until=T0 + 14 * DAY)))
    assert early["source"] == "periods"
    assert 0 < early["total"]["switches"] <= 3 * 21  # whole periods that overlap the range: days 0-20 at most
    recent = result(history.stats(StatsQuery(since=oldest)))  # within the kept events: exact, from them alone
    assert recent["source"] == "events"
    raw = compute_stats(store.path, StatsQuery(since=oldest), engine.groups, SIZES, 7 * DAY)
    assert recent["nodes"] == raw["nodes"] and 0 < recent["total"]["switches"] < after["total"]["switches"]

    # by count: at most max_events rows stay; then roll-ups past rollups_days go
    engine.config = parse_config({"state_dir": str(tmp_path), "retention": {"max_events": 40, "events_days": 30,
                                                                          "rollups_days": 40}}, "t.yaml")
    history.settings = engine.config.retention
    result(drain(history, clock))
    assert store.history_size()[0] == 40
    left = store.db.execute("SELECT MIN(period) FROM rollups WHERE period >= 0").fetchone()[0]
    assert left >= clock.seconds() - 40 * DAY - 7 * DAY
    store.close()


def drain(history: History, clock: Clock) -> Deferred:
    done = history.retain()
    while not done.called:
        clock.advance(0)
    return done


def compare(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Counts are exact after a roll-up; medians and percentiles within a bucket (1 %)."""
    for table, key in (("nodes", "node"), ("images", "image"), ("groups", "group")):
        old, new = by(before[table], key), by(after[table], key)
        assert set(old) == set(new)
        for name in old:
            a, b = old[name], new[name]
            for field in ("switches", "ok", "failed", "failures", "rungs", "fallback_saves", "installs", "bytes",
                          "last_failure"):
                assert a[field] == b[field], (table, name, field)
            for phase, figures in a["phases"].items():
                assert b["phases"][phase]["count"] == figures["count"]
                for q in ("median", "p95"):
                    assert b["phases"][phase][q] == pytest.approx(figures[q], rel=0.01), (name, phase, q)
            if a["install_rate"] is None:
                assert b["install_rate"] is None
            else:
                assert b["install_rate"] == pytest.approx(a["install_rate"], abs=0.11)


def test_a_version_2_database_is_upgraded_with_its_history_kept(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite"
    old = sqlite3.connect(path)
    old.executescript(_UPGRADES[1] + ";" + _UPGRADES[2] + "; PRAGMA user_version=2;")
    old.execute("INSERT INTO events (ts, node, job, image, from_state, to_state, attempt, rung, elapsed, detail)"
                " VALUES (5.0, 'n1', 'j', 'x', 'to_image', 'ready', 1, 0, 12.0, 'booted x')")
    old.commit()
    old.close()
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION  # 3, then 4 (cancels)
    assert store.history_size() == (1, 0)
    figures = compute_stats(path, StatsQuery(), {}, {}, 7 * DAY)
    assert figures["total"]["switches"] == 1 and figures["total"]["phases"]["to_image"]["median"] == 12.0
    store.close()


def test_query_fields_are_checked() -> None:
    assert parse_query({"nodes": "n[1-3]", "since": 5, "worst": 2}) == StatsQuery(since=5.0, nodes=("n1", "n2", "n3"),
                                                                                 worst=2)
    for bad in ({"since": "yesterday"}, {"worst": 0}, {"worst": True}, {"image": ""}, {"since": 10, "until": 5}):
        with pytest.raises(BadRequest):
            parse_query(bad)
    with pytest.raises(CidError):
        parse_query({"nodes": "n[1-"})
    assert query_from_args({b"worst": [b"3"], b"image": [A.encode()]}) == StatsQuery(image=A, worst=3)
    with pytest.raises(BadRequest):
        query_from_args({b"since": [b"x"]})


def test_the_retention_section_is_read_and_checked() -> None:
    config = parse_config({"retention": {"events_days": 10, "max_events": 5000, "period_days": 1}}, "c.yaml")
    assert (config.retention.events_days, config.retention.max_events, config.retention.period_days) == (10, 5000, 1)
    with pytest.raises(ConfigError) as err:
        parse_config({"retention": {"events_days": 0, "max_events": -1, "rollups_days": 5, "nope": 1}}, "c.yaml")
    text = str(err.value)
    assert "'events_days' must be a number" in text and "'max_events' must be a whole number" in text
    assert "unknown key 'nope'" in text


# --- cidcapt --stats -------------------------------------------------------------------------------------------

def test_cidcapt_stats_sends_the_filters_and_prints_aligned_tables(tmp_path: Path) -> None:
    token = tmp_path / "reader.token"
    token.write_text("tok")
    token.chmod(0o600)
    report = report_of(rows_of(HISTORY))
    report.update(events_since=T0, rollup_days=7.0)
    worst = render(_finished(rows_of(HISTORY)), worst=2)

    def script(session: FakeSession) -> None:
        session.hello(expect_role="reader")
        request = session.expect("stats")
        session.reply(request, stats=worst if request.get("worst") else report)

    now = T0 + 3600
    for args in (["--stats"], ["--stats", "n[1-3]", "--since", "7d", "-i", A, "-j", "j9", "--worst", "2"]):
        with FakeCidd(script, token="tok") as cidd:
            out, err = io.StringIO(), io.StringIO()
            code = cidcapt_main(args + ["--role", "reader", "--token-file", str(token), "--server", cidd.address],
                                stdout=out, stderr=err, env={"CID_CA_FILE": test_ca_file()}, now=lambda: now)
        assert code == 0, err.getvalue()
        sent = cidd.messages("stats")[0]
        lines = out.getvalue().splitlines()
        if "--worst" in args:
            assert sent["nodes"] == "n[1-3]" and sent["since"] == now - 7 * DAY and sent["image"] == A
            assert sent["job"] == "j9" and sent["worst"] == 2
            assert lines[2].startswith("NODES (the 2 with the highest failure rate)")
            assert [line.split()[0] for line in lines[4:6]] == ["n3", "n2"]
            continue
        assert "nodes" not in sent and "since" not in sent
        assert lines[0].startswith("statistics: 7 switches, 57.1% ok, 3 failed")
        head = lines[3]
        assert head.split() == ["NODE", "SWITCHES", "OK%", "FAILED", "FAILURES", "RUNGS", "TO_INSTALLER",
                                "INSTALLING", "TO_IMAGE", "LAST-FAILURE"]
        n1 = lines[4]
        assert n1.split()[:6] == ["n1", "4", "75.0%", "1", "ladder_exhausted", "1"]
        assert "16s/4m44s" in n1 and "1m55s/3m08s" in n1  # 16/283.5 and 115/188 seconds
        assert n1.index("16s/") == head.index("TO_INSTALLER")  # the columns line up
        assert any(line.startswith("IMAGES") for line in lines) and any(line.startswith("GROUPS") for line in lines)


def _finished(rows: list[Row]) -> Report:
    report = Report()
    report.add_rows(rows, GROUPS, SIZES)
    return report.finish()


def test_cidcapt_stats_json_and_usage_errors(tmp_path: Path) -> None:
    token = tmp_path / "reader.token"
    token.write_text("tok")
    token.chmod(0o600)
    report = report_of(rows_of(HISTORY))

    def script(session: FakeSession) -> None:
        session.hello(expect_role="reader")
        session.reply(session.expect("stats"), stats=report)

    with FakeCidd(script, token="tok") as cidd:
        out, err = io.StringIO(), io.StringIO()
        code = cidcapt_main(["--stats", "--json", "--role", "reader", "--token-file", str(token), "--server",
                             cidd.address], stdout=out, stderr=err, env={"CID_CA_FILE": test_ca_file()})
    assert code == 0 and json.loads(out.getvalue()) == report
    for bad in (["--stats", "--status"], ["--worst", "3"], ["--stats", "--since", "yesterday"],
                ["--stats", "--worst", "0"]):
        code = cidcapt_main(bad, stdout=io.StringIO(), stderr=io.StringIO(), env={})
        assert code == 2, bad


# --- the stats request of the wire protocol --------------------------------------------------------------------

class ApiSession:
    """The ClientSession the client API answers on: what it sent, what failed."""

    role, user, session_id, closed = "reader", None, "s-1", False

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.failed: list[Any] = []
        self.cleanups: list[Any] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def request_failed(self, failure: Any, message: dict[str, Any]) -> None:
        self.failed.append(failure)


def test_the_stats_request_answers_from_the_history_off_the_event_loop(tmp_path: Path) -> None:
    from cidd.client_api import ClientAPI

    clock = Clock()
    engine, store = make_engine(tmp_path, clock)
    write(store, HISTORY, T0, 60.0)
    api = ClientAPI(engine, clock, directory=None)  # type: ignore[arg-type]
    session = ApiSession()
    with pytest.raises(CidError) as err:
        api.handle(session, {"type": "stats", "id": 1})
    assert err.value.code == "unavailable"  # no history service: nothing to answer from
    ran: list[Any] = []

    def run(function: Any, *args: Any) -> Deferred:
        ran.append(function)
        return maybeDeferred(function, *args)

    engine.observers.append(History(engine, store, run, clock))
    api.handle(session, {"type": "stats", "id": 2, "nodes": "n[1-2]", "worst": 1})
    assert ran and session.failed == []
    reply = session.sent[-1]
    assert reply["type"] == "reply" and reply["id"] == 2
    assert [n["node"] for n in reply["stats"]["nodes"]] == ["n2"] and reply["stats"]["source"] == "totals"
    with pytest.raises(BadRequest):
        api.handle(session, {"type": "stats", "id": 3, "worst": "all"})
    store.close()


def test_retention_runs_on_its_timer_in_batches_and_stops_between_them(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(T0)
    engine, store = make_engine(tmp_path, clock, {"batch": 10, "interval": 600})
    write(store, HISTORY, T0 - 60 * DAY, 60.0)
    history = History(engine, store, sync_run, clock)
    history.start()  # the first run starts at once: one batch now, the next one on a later turn of the loop
    assert store.db.execute("SELECT value FROM history_marks").fetchone() == (10,)
    assert history._next is not None and history._next.getTime() == clock.seconds()
    history.stop()  # between two batches: the next never runs, nothing is half done
    clock.advance(0)
    assert store.db.execute("SELECT value FROM history_marks").fetchone() == (10,)
    assert store.history_size()[0] == len(HISTORY)  # nothing deleted before it is rolled up
    history.start()
    clock.advance(0)  # (task.Clock runs the batches that each batch schedules at once; a reactor turns between)
    assert store.history_size()[0] == 0  # all rolled up, then deleted: 60 days old
    write(store, HISTORY[:4], T0 + 10, 1.0)
    clock.advance(600)  # the timer's next run folds the new rows
    assert store.db.execute("SELECT value FROM history_marks").fetchone() == (len(HISTORY) + 4,)
    history.stop()
    report = result(history.stats(StatsQuery()))
    assert report["total"]["switches"] == 7 + 1 and report["source"] == "totals"
    store.close()
