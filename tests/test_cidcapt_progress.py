"""cidcapt's progress model (cidcapt/progress.py) with a fake clock, and its two renderers: plain lines
(cidcapt/progress_text.py) and the rich terminal view (cidcapt/progress_live.py), drawn into a string."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from cidcapt.progress import Change, ProgressModel, ProgressOptions
from cidcapt.progress_live import LiveFollower, view
from cidcapt.progress_text import PlainFollower, duration, size, summary_line
from cidcapt.render import Renderer

IMAGE = "debian-12-1"
MIB = 1 << 20


class FakeClock:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def node(name: str, src: str, dst: str, rung: int = 0, attempt: int = 1, **extra: object) -> dict[str, object]:
    return {"type": "node", "job": "42", "node": name, "from": src, "to": dst, "image": IMAGE, "rung": rung,
            "attempt": attempt, **extra}


def progress(name: str, done: int, total: int = 100 * MIB, step: str = "writing") -> dict[str, object]:
    return {"type": "progress", "job": "42", "node": name, "step": step, "done": done, "total": total}


def model(clock: FakeClock, count: int = 4, stall_after: float = 120.0) -> ProgressModel:
    m = ProgressModel(IMAGE, clock, stall_after=stall_after)
    m.accepted({f"sim{i:02d}": {"state": "to_installer", "image": "debian-12-2"} for i in range(1, count + 1)},
               600.0)
    return m


def test_accepted_counts_states_and_the_time_left() -> None:
    clock = FakeClock()
    m = ProgressModel(IMAGE, clock)
    m.accepted({"a": {"state": "ready", "image": IMAGE}, "b": {"state": "ready", "image": "rocky-9-3"},
                "c": {"state": "to_installer"}, "d": {"state": "failed", "reason": "x"}}, 300.0)
    clock.advance(30)
    s = m.summary()
    assert (s.total, s.ready, s.failed) == (4, 1, 1)
    assert s.states == {"other_image": 1, "to_installer": 1}  # pipeline order
    assert s.deadline_left == 270.0 and s.elapsed == 30.0
    assert s.rate is None and s.installs == () and s.stalled == ()


def test_node_events_say_what_they_mean() -> None:
    clock = FakeClock()
    m = model(clock)
    assert m.node(node("sim01", "to_installer", "installing")) is Change.MOVED
    assert m.node(node("sim01", "installing", "installing", attempt=2, detail="retry")) is Change.RETRIED
    assert m.node(node("sim01", "installing", "to_image", attempt=2)) is Change.MOVED
    assert m.node(node("sim01", "to_image", "ready", attempt=2)) is Change.READY
    assert m.node(node("sim02", "to_installer", "to_installer", rung=1)) is Change.CLIMBED
    assert m.node(node("sim02", "to_installer", "to_installer", rung=1)) is Change.SAME
    assert m.node(node("sim03", "to_installer", "failed", detail="ladder exhausted")) is Change.FAILED
    assert m.node({"type": "node"}) is Change.SAME
    s = m.summary()
    assert (s.ready, s.failed, s.states) == (1, 1, {"to_installer": 2})


def test_bytes_and_rates_of_installs_slowest_first() -> None:
    clock = FakeClock()
    m = model(clock)
    for name in ("sim01", "sim02"):
        m.node(node(name, "to_installer", "installing"))
    for _ in range(5):
        m.progress(progress("sim01", int((clock.now - 1000) * 10 * MIB)))
        m.progress(progress("sim02", int((clock.now - 1000) * 2 * MIB)))
        clock.advance(1)
    clock.advance(-1)
    s = m.summary()
    assert s.states == {"to_installer": 2, "installing": 2}
    assert [i.node for i in s.installs] == ["sim02", "sim01"]  # slowest first
    assert s.installs[0].rate == pytest.approx(2 * MIB) and s.installs[1].rate == pytest.approx(10 * MIB)
    assert s.bytes_done == 48 * MIB and s.bytes_total == 200 * MIB
    assert s.rate == pytest.approx(12 * MIB)
    clock.advance(11)  # no progress for longer than the rate window: the rate falls to zero
    assert m.summary().rate == 0.0


def test_the_rate_is_measured_over_the_last_window_only() -> None:
    clock = FakeClock()
    m = model(clock)
    m.node(node("sim01", "to_installer", "installing"))
    for second in range(35):  # 1 MiB/s for 20 s, then 5 MiB/s (the last 10 s: the window)
        done = second * MIB if second <= 20 else 20 * MIB + (second - 20) * 5 * MIB
        m.progress(progress("sim01", done))
        clock.advance(1)
    clock.advance(-1)
    assert m.summary().installs[0].rate == pytest.approx(5 * MIB)


def test_a_node_that_neither_changes_state_nor_writes_is_stalled() -> None:
    clock = FakeClock()
    m = model(clock, count=3, stall_after=120)
    m.node(node("sim01", "to_installer", "installing"))
    clock.advance(100)
    m.progress(progress("sim01", 5 * MIB))  # bytes: it moves
    m.node(node("sim02", "to_installer", "to_installer", rung=1))  # a climb is not moving
    clock.advance(60)
    m.progress(progress("sim01", 5 * MIB))  # the same bytes again: not moving
    s = m.summary()
    assert [(w.node, w.state, w.seconds) for w in s.stalled] == [("sim02", "to_installer", 160.0),
                                                                ("sim03", "to_installer", 160.0)]
    assert [(w.node, w.rung, w.seconds) for w in s.ladder] == [("sim02", 1, 60.0)]
    assert s.longest["to_installer"].seconds == 160.0 and s.longest["installing"].node == "sim01"
    clock.advance(60)
    assert [w.node for w in m.summary().stalled] == ["sim02", "sim03", "sim01"]
    m.node(node("sim02", "to_installer", "installing", rung=0))
    assert "sim02" not in [w.node for w in m.summary().stalled]


def test_a_reattach_keeps_what_was_known() -> None:
    clock = FakeClock()
    m = model(clock, count=2)
    clock.advance(50)
    m.accepted({"sim01": {"state": "to_installer"}, "sim02": {"state": "installing"}}, 100.0)
    s = m.summary()
    assert s.longest["to_installer"].seconds == 50.0 and s.longest["installing"].seconds == 0.0
    assert s.deadline_left == 100.0 and s.elapsed == 50.0


def test_formats() -> None:
    assert [duration(x) for x in (-1, 0, 59.9, 60, 252, 3599, 3600, 3900)] == [
        "0s", "0s", "59s", "1m00s", "4m12s", "59m59s", "1h00m", "1h05m"]
    assert [size(x) for x in (0, 512, 1536, 12 * MIB, 1.25 * (1 << 30))] == [
        "0 B", "512 B", "1.5 KiB", "12 MiB", "1.2 GiB"]


def test_the_summary_line() -> None:
    clock = FakeClock()
    m = ProgressModel(IMAGE, clock, stall_after=120)
    names = [f"sim{i:04d}" for i in range(1, 51)]
    m.accepted({name: {"state": "to_installer"} for name in names}, 3600.0)
    for name in names[:12]:
        m.node(node(name, "to_installer", "installing"))
        m.node(node(name, "installing", "to_image"))
        m.node(node(name, "to_image", "ready"))
    for name in names[12:42]:
        m.node(node(name, "to_installer", "installing"))
        m.progress(progress(name, 0))
    clock.advance(150)
    m.node(node("sim0007", "to_image", "failed", detail="booted rocky-9-3"))
    m.node(node("sim0043", "to_installer", "to_installer", rung=1))
    for name in names[12:42]:
        m.progress(progress(name, 40 * MIB))
    assert summary_line("42", m.summary()) == (
        "job 42: 11/50 ready, 8 to_installer, 30 installing (1.2 GiB of 2.9 GiB, 8.0 MiB/s), 1 failed; "
        "2m30s elapsed, deadline in 57m30s; on ladder rung 1: sim0043; not moved for 2m30s+: sim[0043-0050]")


def test_plain_follower_says_notable_events_and_a_summary_line_on_time() -> None:
    clock = FakeClock()
    said: list[str] = []
    follower = PlainFollower("42", model(clock, count=2), said.append, every=30)
    assert follower.tick() == 30
    follower.node(node("sim01", "to_installer", "installing"))
    follower.node(node("sim02", "to_installer", "to_installer", rung=1, detail="no answer 300s after rung 0 (reboot)"))
    follower.node(node("sim01", "installing", "failed", reason="checksum mismatch"))
    assert said == ["sim02  to_installer -> to_installer  (no answer 300s after rung 0 (reboot))",
                    "sim01  installing -> failed  (checksum mismatch)"]
    clock.advance(29)
    assert follower.tick() == 1 and len(said) == 2
    clock.advance(1)
    assert follower.tick() == 30
    assert said[-1].startswith("job 42: 0/2 ready, 1 to_installer, 1 failed; 30s elapsed, deadline in 9m30s")
    clock.advance(95)  # a long wait between ticks: one line, then the next on the 30 s grid
    assert follower.tick() == 25 and len(said) == 4
    quiet: list[str] = []
    silent = PlainFollower("42", model(clock, count=1), quiet.append, every=30, quiet=True)
    silent.node(node("sim01", "to_installer", "failed"))
    clock.advance(60)
    assert silent.tick() is None and quiet == []


def test_the_terminal_view_draws_counts_installs_ladder_and_stalled_nodes() -> None:
    clock = FakeClock()
    m = model(clock, count=4, stall_after=120)
    m.node(node("sim01", "to_installer", "installing"))
    m.node(node("sim02", "to_installer", "installing"))
    m.node(node("sim03", "to_installer", "to_installer", rung=1))
    for _ in range(3):
        m.progress(progress("sim01", int((clock.now - 1000) * 4 * MIB)))
        m.progress(progress("sim02", int((clock.now - 1000) * MIB)))
        clock.advance(1)
    clock.advance(250)
    m.progress(progress("sim01", 99 * MIB))
    m.progress(progress("sim02", 60 * MIB))
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(view("42", IMAGE, m.summary()))
    text = console.file.getvalue()
    assert "job 42 -> debian-12-1" in text and "0/4 ready" in text and "  4m13s elapsed, deadline in 5m47s\n" in text
    assert "2 to_installer, 2 installing (159 MiB of 200 MiB" in text
    assert "slowest installs: sim02 60% 237 KiB/s, sim01 99% 371 KiB/s" in text  # since the sample before the gap
    assert "ladder: sim03 on rung 1 (to_installer) for 4m13s" in text
    assert "stalled: sim[03-04] in to_installer for 4m13s\n" in text
    m.node(node("sim04", "to_installer", "installing"))
    clock.advance(200)
    m.progress(progress("sim02", 61 * MIB))
    clock.advance(10)
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(view("42", IMAGE, m.summary()))
    text = console.file.getvalue()
    assert "stalled: sim03 in to_installer for 7m43s; sim[01,04] in installing for 3m30s\n" in text
    m.progress(progress("sim04", 0))
    clock.advance(120)
    console.print(view("42", IMAGE, m.summary()))
    assert "; sim[01-02,04] in installing for 2m00s-5m30s\n" in console.file.getvalue()


def test_live_follower_prints_lines_above_the_view_and_stops() -> None:
    clock = FakeClock()
    out = io.StringIO()
    follower = LiveFollower("42", IMAGE, model(clock, count=2), out)
    follower.node(node("sim01", "to_installer", "failed", detail="ladder exhausted"))
    assert follower.line("lost the connection") is True
    assert follower.tick() == pytest.approx(0.25)
    follower.close()
    follower.close()
    assert follower.line("after the view") is False
    text = out.getvalue()
    assert "cidcapt: sim01  to_installer -> failed  (ladder exhausted)" in text
    assert "cidcapt: lost the connection" in text


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, term, quiet, json_lines, live", [
    (io.StringIO(), "xterm", False, False, False),  # a pipe or a log file: plain lines
    (FakeTty(), "xterm", False, False, True),
    (FakeTty(), "dumb", False, False, False),
    (FakeTty(), "xterm", True, False, False),
    (FakeTty(), "xterm", False, True, False),
])
def test_the_live_view_only_on_a_real_terminal(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO, term: str,
                                               quiet: bool, json_lines: bool, live: bool) -> None:
    monkeypatch.setenv("TERM", term)
    assert Renderer(io.StringIO(), stream, quiet=quiet, json_lines=json_lines).live_view() is live
    forced = Renderer(io.StringIO(), stream, progress=ProgressOptions(live=not live))
    assert forced.live_view() is (not live)
