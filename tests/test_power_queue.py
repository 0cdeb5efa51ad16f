"""cidd.power's scheduler with a fake clock: fair turns between BMCs, one call per BMC at a time, slots freed when
callers give up or calls stay unanswered, the per-BMC circuit breaker, and failure reasons that say what happened.

The calls themselves are faked (``FakeBmcs``, PowerController's ``runner``): a live BMC answers after
``live_s``, a dead one fails after ``dead_s`` as pyghmi does (``IpmiException`` whose text is ``None``).
``tests/test_power.py`` checks the same against real BMCs (ipmi_sim and closed UDP ports).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from structlog.testing import capture_logs
from twisted.internet import defer, task
from twisted.python.failure import Failure

from cidd.config import ConfigError, parse_config
from cidd.power import BmcCredentials, PowerController, PowerError

CREDS = BmcCredentials("admin", "pw")


class FakeBmcs:
    """A PowerController runner: ``live`` addresses answer ``'on'`` after ``live_s``, the others fail after
    ``dead_s`` as pyghmi fails for a BMC that does not answer. Records what was sent and how many ran at once."""

    def __init__(self, clock: task.Clock, dead: set[int], live_s: float = 0.01, dead_s: float = 5.0) -> None:
        self.clock = clock
        self.dead = dead  # ports
        self.live_s = live_s
        self.dead_s = dead_s
        self.sent: list[int] = []
        self.running: Counter[int] = Counter()
        self.peak_per_bmc = 0

    def __call__(self, key: tuple[str, int], body: Any) -> defer.Deferred[Any]:
        port = key[1]
        self.sent.append(port)
        self.running[port] += 1
        self.peak_per_bmc = max(self.peak_per_bmc, self.running[port])
        d: defer.Deferred[Any] = defer.Deferred()

        def end() -> None:
            self.running[port] -= 1
            if port in self.dead:
                d.errback(Failure(RuntimeError(None)))  # pyghmi: IpmiException(None) after its retransmits
            else:
                d.callback("on")

        self.clock.callLater(self.dead_s if port in self.dead else self.live_s, end)
        return d


def addr(port: int) -> str:
    return f"127.0.0.1:{port}"


def outcomes(deferreds: dict[str, defer.Deferred[Any]]) -> dict[str, str]:
    """Return node -> the value, or the PowerError message, of each fired Deferred (``pending`` if not fired)."""
    found: dict[str, str] = {}
    for node, d in deferreds.items():
        box: list[str] = []
        d.addCallbacks(lambda v, box=box: box.append(str(v)),
                       lambda f, box=box: box.append(f.value.message if f.check(PowerError) else repr(f.value)))
        found[node] = box[0] if box else "pending"
    return found


def advance(clock: task.Clock, seconds: float, step: float = 0.01) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


def controller(clock: task.Clock, bmcs: FakeBmcs, **kwargs: Any) -> PowerController:
    return PowerController(CREDS, clock, runner=bmcs, **kwargs)


def test_fifty_dead_bmcs_do_not_fail_the_healthy_nodes_queued_behind_them() -> None:
    """The report: 50 dead BMCs asked first held the 8 slots for pyghmi's ~5 s each; the healthy BMCs' calls timed
    out unsent and their nodes failed with "did not answer"."""
    clock = task.Clock()
    dead = set(range(1000, 1050))
    bmcs = FakeBmcs(clock, dead)
    power = controller(clock, bmcs, max_concurrent=8, call_timeout=20)
    calls = {f"dead{p}": power.set_next_boot(f"dead{p}", addr(p), "network") for p in sorted(dead)}
    calls.update({f"ok{p}": power.set_next_boot(f"ok{p}", addr(p), "network") for p in range(2000, 2010)})
    advance(clock, 25)
    result = outcomes(calls)
    assert {result[f"ok{p}"] for p in range(2000, 2010)} == {"on"}, result  # every healthy call answered
    for p in dead:
        assert result[f"dead{p}"].startswith(f"BMC of dead{p} (127.0.0.1:{p}) did not answer"), result[f"dead{p}"]
    assert power.in_flight == 0 and power.running == 0 and power.waiting == 0
    assert bmcs.peak_per_bmc == 1


def test_one_call_per_bmc_at_a_time_and_bmcs_take_turns() -> None:
    clock = task.Clock()
    bmcs = FakeBmcs(clock, set(), live_s=1.0)
    power = controller(clock, bmcs, max_concurrent=1, call_timeout=60)
    calls = {f"a{i}": power.status(f"a{i}", addr(1)) for i in range(4)}  # one BMC asked four times first
    calls["b"] = power.status("b", addr(2))
    calls["c"] = power.status("c", addr(3))
    advance(clock, 7)
    assert set(outcomes(calls).values()) == {"on"}
    assert bmcs.sent == [1, 2, 3, 1, 1, 1]  # b and c did not wait for all of a's calls
    assert bmcs.peak_per_bmc == 1


def test_a_slot_is_freed_when_the_caller_gives_up_and_the_call_runs_on() -> None:
    clock = task.Clock()
    bmcs = FakeBmcs(clock, {1}, dead_s=50.0)
    power = controller(clock, bmcs, max_concurrent=1, call_timeout=3, yield_after=None)
    stuck = power.status("n1", addr(1))
    clock.advance(1)
    live = power.status("n2", addr(2))
    clock.advance(1.99)
    assert bmcs.sent == [1] and power.in_flight == 1
    clock.advance(0.01)  # n1's caller gives up at 3 s: its slot goes to n2 (n1's thread runs on)
    assert bmcs.sent == [1, 2] and power.running == 2
    clock.advance(0.01)
    assert outcomes({"n1": stuck, "n2": live}) == {
        "n1": "BMC of n1 (127.0.0.1:1) did not answer within 3 s; check its network and credentials", "n2": "on"}
    with capture_logs() as logs:
        advance(clock, 50, step=1)
    assert power.running == 0
    assert [(e["event"], e["answered"]) for e in logs] == [("power.late_answer", False)]


def test_a_call_unanswered_after_yield_after_gives_its_slot_to_the_next() -> None:
    clock = task.Clock()
    bmcs = FakeBmcs(clock, {1}, dead_s=5.0)
    power = controller(clock, bmcs, max_concurrent=1, call_timeout=20, yield_after=2)
    with capture_logs() as logs:
        dead = power.status("n1", addr(1))
        live = power.status("n2", addr(2))
        clock.advance(1.99)
        assert bmcs.sent == [1]
        clock.advance(0.01)
        assert bmcs.sent == [1, 2] and power.in_flight == 1 and power.running == 2
        advance(clock, 4)
    assert outcomes({"n2": live})["n2"] == "on"
    assert outcomes({"n1": dead})["n1"].startswith("BMC of n1 (127.0.0.1:1) did not answer (no reply in 5.0 s)")
    assert [e["node"] for e in logs if e["event"] == "power.slow"] == ["n1"]


def test_calls_that_gave_up_their_slot_are_bounded_by_the_thread_cap() -> None:
    clock = task.Clock()
    bmcs = FakeBmcs(clock, set(range(1, 9)), dead_s=100.0)
    power = controller(clock, bmcs, max_concurrent=1, call_timeout=30, yield_after=1)
    assert power.max_threads == 4
    calls = {f"n{p}": power.status(f"n{p}", addr(p)) for p in range(1, 9)}
    advance(clock, 10, step=0.5)
    assert bmcs.sent == [1, 2, 3, 4] and power.running == 4 and power.in_flight == 0
    advance(clock, 20, step=0.5)
    assert outcomes(calls)["n5"] == ("BMC of n5 (127.0.0.1:5) was never contacted: BMC queue full (4 calls "
                                     "waiting) for 30 s; all 4 BMC threads held by calls to BMCs that did not answer")


def test_reasons_tell_never_contacted_apart_from_did_not_answer() -> None:
    clock = task.Clock()
    bmcs = FakeBmcs(clock, {1, 2}, dead_s=50.0)
    power = controller(clock, bmcs, max_concurrent=1, call_timeout=4, yield_after=None)
    calls = {"sent": power.cycle("n1", addr(1)), "same_bmc": power.status("n1b", addr(1)),
             "other_bmc": power.on("n2", addr(2))}
    advance(clock, 4.5)
    assert outcomes(calls) == {
        "sent": "BMC of n1 (127.0.0.1:1) did not answer within 4 s; check its network and credentials",
        "same_bmc": "BMC of n1b (127.0.0.1:1) was never contacted: an earlier call to this BMC had not ended after "
                    "4 s (1 call waiting for it); check the BMC's network",
        "other_bmc": "BMC of n2 (127.0.0.1:2) was never contacted: BMC queue full (2 calls waiting for 1 slot) "
                     "for 4 s; raise bmc.max_concurrent or bmc.timeout"}
    assert bmcs.sent == [1]  # nothing else was sent, even after the slot freed at 4 s


def test_the_breaker_opens_after_n_silent_calls_refuses_at_once_then_tries_one_call_after_the_cooldown() -> None:
    clock = task.Clock()
    bmcs = FakeBmcs(clock, {1}, dead_s=5.0)
    power = controller(clock, bmcs, call_timeout=20, breaker_after=3, breaker_cooldown=60)
    with capture_logs() as logs:
        for i in range(3):
            d = power.status(f"n{i}", addr(1))
            advance(clock, 5.5, step=0.5)
            assert outcomes({"x": d})["x"].startswith(f"BMC of n{i} (127.0.0.1:1) did not answer (no reply in")
        assert power.breaker_open(addr(1))
        refused = outcomes({"x": power.cycle("n9", addr(1))})["x"]  # at once, without a call
        assert refused == ("BMC of n9 (127.0.0.1:1) was not called: its last 3 calls got no answer, so it is left "
                           "alone for 60 s (next try in 60 s); check its network and power")
        assert bmcs.sent == [1, 1, 1]
        assert outcomes({"x": power.status("other", addr(2))})["x"] == "pending"  # other BMCs are not affected
        clock.advance(0.01)
        advance(clock, 60, step=1)
        assert not power.breaker_open(addr(1))
        probe = power.status("n10", addr(1))  # half-open: one call is tried; still silent: open again
        advance(clock, 5.5, step=0.5)
        assert outcomes({"x": probe})["x"].startswith("BMC of n10 (127.0.0.1:1) did not answer")
        assert power.breaker_open(addr(1))
        advance(clock, 61, step=1)
        bmcs.dead.clear()  # the BMC is back
        answer = power.status("n11", addr(1))
        clock.advance(0.01)
        assert outcomes({"x": answer})["x"] == "on"
        assert not power.breaker_open(addr(1))
    events = [e["event"] for e in logs if e["event"].startswith("power.breaker") or e["event"] == "power.refused"]
    assert events == ["power.breaker_open", "power.refused", "power.breaker_probe", "power.breaker_open",
                      "power.breaker_probe", "power.breaker_closed"]


def test_calls_waiting_for_a_bmc_fail_at_once_when_its_breaker_opens() -> None:
    clock = task.Clock()
    bmcs = FakeBmcs(clock, {1}, dead_s=5.0)
    power = controller(clock, bmcs, call_timeout=20, breaker_after=1, breaker_cooldown=30)
    calls = {f"n{i}": power.status(f"n{i}", addr(1)) for i in range(4)}
    advance(clock, 5.01)
    result = outcomes(calls)
    assert result["n0"].startswith("BMC of n0 (127.0.0.1:1) did not answer")
    assert all(result[f"n{i}"].startswith(f"BMC of n{i} (127.0.0.1:1) was not called: its last 1 calls")
               for i in (1, 2, 3)), result
    assert bmcs.sent == [1] and power.waiting == 0


def test_an_answer_with_an_error_is_not_silence_and_resets_the_breaker_count() -> None:
    clock = task.Clock()
    answers: list[Any] = [Failure(RuntimeError(None)), Failure(RuntimeError(None)),
                          Failure(RuntimeError("Incorrect password provided")), Failure(RuntimeError(None))]

    def runner(key: tuple[str, int], body: Any) -> defer.Deferred[Any]:
        return defer.fail(answers.pop(0))

    power = PowerController(CREDS, clock, runner=runner, breaker_after=3)
    results = [outcomes({"x": power.status("n", addr(1))})["x"] for _ in range(4)]
    assert results[2] == ("BMC of n (127.0.0.1:1) failed: Incorrect password provided; check the BMC credentials "
                          "and its state")
    assert not power.breaker_open(addr(1))  # 2 silent, an answer, 1 silent: never 3 in a row


def test_bmcs_whose_last_call_got_no_answer_wait_for_the_others() -> None:
    clock = task.Clock()
    bmcs = FakeBmcs(clock, {1}, live_s=1.0, dead_s=1.0)
    power = controller(clock, bmcs, max_concurrent=1, call_timeout=60, breaker_after=3)
    first = power.status("n1", addr(1))
    advance(clock, 1.01)
    assert outcomes({"x": first})["x"].startswith("BMC of n1 (127.0.0.1:1) did not answer")
    blocker = power.status("n3", addr(3))  # holds the only slot while the two below queue
    silent_again = power.status("n1", addr(1))
    live = power.status("n2", addr(2))
    advance(clock, 3.5)
    assert bmcs.sent == [1, 3, 2, 1]  # n2 went before n1's BMC, though asked after it
    assert outcomes({"b": blocker, "l": live}) == {"b": "on", "l": "on"}
    assert outcomes({"x": silent_again})["x"].startswith("BMC of n1 (127.0.0.1:1) did not answer")


def test_a_cancelled_call_waiting_for_a_slot_is_never_sent_and_logged_as_skipped() -> None:
    clock = task.Clock()
    bmcs = FakeBmcs(clock, set(), live_s=1.0)
    power = controller(clock, bmcs, max_concurrent=1, call_timeout=10)
    first = power.on("n1", addr(1))
    with capture_logs() as logs:
        second = power.on("n2", addr(2))
        second.cancel()
    advance(clock, 2)
    assert bmcs.sent == [1] and outcomes({"x": first})["x"] == "on"
    assert outcomes({"x": second})["x"] == "CancelledError()"
    assert [(e["event"], e["node"], e["reason"]) for e in logs] == [
        ("power.skipped", "n2", "the caller cancelled it before it was sent")]
    assert power.waiting == 0 and power.in_flight == 0


# -- configuration -----------------------------------------------------------------------------------------------

def test_bmc_breaker_settings_have_defaults_and_are_validated() -> None:
    base = {"address": "127.0.0.1:{index+9000}", "credentials": "/etc/cid/bmc"}
    config = parse_config({"bmc": base}, "c.yaml")
    assert (config.bmc.breaker_after, config.bmc.breaker_cooldown) == (3, 60.0)
    config = parse_config({"bmc": {**base, "breaker_after": 5, "breaker_cooldown": 120}}, "c.yaml")
    assert (config.bmc.breaker_after, config.bmc.breaker_cooldown) == (5, 120.0)
    power = PowerController.from_config(CREDS, task.Clock(), config.bmc)
    assert (power.breaker_after, power.breaker_cooldown, power.max_concurrent) == (5, 120.0, 8)
    with pytest.raises(ConfigError) as err:
        parse_config({"bmc": {**base, "breaker_after": 0, "breaker_cooldown": "soon"}}, "c.yaml")
    text = str(err.value)
    assert "c.yaml: bmc: 'breaker_after' must be a whole number >= 1 (got 0)" in text
    assert "c.yaml: bmc: 'breaker_cooldown' must be a number >= 1 (got 'soon')" in text
    with pytest.raises(ConfigError, match="unknown key 'breaker'"):
        parse_config({"bmc": {**base, "breaker": 3}}, "c.yaml")
