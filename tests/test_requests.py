"""Request/response correlation (cidcommon/requests.py, cidcommon/twisted_requests.py), used by every side."""

from __future__ import annotations

from twisted.internet.task import Clock

from cidcommon.requests import PendingRequests
from cidcommon.twisted_requests import DeferredRequests


def test_ids_count_up_with_or_without_a_prefix_and_answers_find_their_request() -> None:
    plain: PendingRequests[str] = PendingRequests()
    assert [plain.add("hello", "w1").id, plain.add("heartbeat", "w2").id] == [1, 2]
    assert plain.take(2).waiter == "w2" and plain.take(2) is None  # answered once only
    assert plain.take("1").waiter == "w1"  # an id echoed as a string still matches
    prefixed: PendingRequests[None] = PendingRequests("c-")
    assert prefixed.add("install", None).id == "c-1" and prefixed.new_id() == "c-2"
    assert prefixed.waits_for("c-1") and not prefixed.waits_for("c-2") and not prefixed.waits_for(None)


def test_deadlines_expire_oldest_first_and_drain_empties_the_table() -> None:
    table: PendingRequests[str] = PendingRequests()
    table.add("a", "a", 10.0)
    table.add("b", "b", 5.0)
    table.add("c", "c", None)
    assert table.next_deadline() == 5.0
    assert [p.waiter for p in table.expired(9.0)] == ["b"]
    assert [p.waiter for p in table.expired(10.0)] == ["a"] and table.next_deadline() is None
    assert [p.kind for p in table.drain()] == ["c"] and len(table) == 0


def test_deferred_requests_answer_fail_time_out_and_end_with_the_session() -> None:
    clock = Clock()
    timed_out: list[str] = []

    def on_timeout(pending: object) -> BaseException:
        timed_out.append(pending.kind)  # type: ignore[attr-defined]
        return TimeoutError("late")

    requests = DeferredRequests(clock, on_timeout, prefix="c-")
    first, d1 = requests.start("reboot", 30.0)
    second, d2 = requests.start("install", 30.0)
    third, d3 = requests.start("install", 30.0)
    results: list[object] = []
    d1.addCallback(results.append)
    d2.addErrback(lambda f: results.append(type(f.value).__name__))
    d3.addErrback(lambda f: results.append(str(f.value)))
    assert requests.answer(first, {"type": "reply"}) and not requests.answer(first, {"type": "reply"})
    assert requests.fail(second, ValueError("refused")) is not None
    clock.advance(30.0)
    assert timed_out == ["install"] and results == [{"type": "reply"}, "ValueError", "late"]
    _, d4 = requests.start("reboot", None)
    d4.addErrback(lambda f: results.append(str(f.value)))
    requests.fail_all(lambda pending: RuntimeError(f"closed before {pending.kind}"))
    assert results[-1] == "closed before reboot" and len(requests) == 0 and not clock.getDelayedCalls()
