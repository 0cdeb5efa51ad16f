"""Tests for cidd.core.captures: the capture rules of DESIGN.md §3 (plan, settle, node_outcome).

``plan`` and ``settle`` are pure; node records are built by hand. One test at the end drives the engine
(with an in-memory store and a fake clock) because the rule it checks needs every running capture, which
``plan`` is not given.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from cidcatalog.catalog import Catalog, Image
from cidcommon.errors import BadRequest, Conflict
from cidd.config import parse_config
from cidd.core.captures import (
    JOB_MEMORY_S,
    Capture,
    CaptureState,
    NodeResult,
    NothingToCancel,
    Result,
    cancel,
    cancellable,
    node_outcome,
    plan,
    settle,
    to_cancel,
)
from cidd.core.machine import SWITCHING, Node, State
from cidd.core.machine_types import Installed
from tests.fakes import SilentLink

A, B, C = "alma-9-1", "debian-12-1", "rocky-9-2"
NOW = 10_000.0


def offline(name: str, image: str | None = None) -> Node:
    return Node(name, state=State.OFFLINE, image=image)


def ready(name: str, image: str) -> Node:
    return Node(name, state=State.READY, image=image, online=True, mode="system", boot_id="b1")


def switching(name: str, target: str, job: str, state: State = State.TO_INSTALLER) -> Node:
    return Node(name, state=state, image=C, target=target, job=job, deadline=NOW + 100)


def failed(name: str, target: str, reason: str = "boom") -> Node:
    return Node(name, state=State.FAILED, image=C, target=target, job="old", reason=reason)


def new_plan(names, nodes, image=A, job="j1", latest=None, now=NOW, timeout=600.0, running=()):
    """Return plan() for ``names`` with ``nodes`` (a list of Node records) and ``running`` captures."""
    return plan(job, image, list(names), "alice", "slurm", timeout, latest, {n.name: n for n in nodes}, now,
                {c.job: c for c in running})


def running_capture(names=("n1", "n2"), image=A, job="j1", created=NOW - 50, deadline=NOW + 550,
                    results=None) -> Capture:
    nodes = {name: NodeResult() for name in names}
    nodes.update(results or {})
    return Capture(job=job, image=image, nodes=nodes, user="alice", requester="slurm", created=created,
                   deadline=deadline, id=7)


# --- plan: a new capture -----------------------------------------------------------------------------------


def test_new_capture_switches_every_node_that_is_not_there():
    p = new_plan(["n1", "n2"], [offline("n1", C), ready("n2", B)])
    assert p.attached is False
    assert p.to_switch == ("n1", "n2")
    cap = p.capture
    assert (cap.job, cap.image, cap.user, cap.requester) == ("j1", A, "alice", "slurm")
    assert (cap.created, cap.deadline, cap.state, cap.ended, cap.id) == (NOW, NOW + 600.0, CaptureState.RUNNING,
                                                                         None, None)
    assert list(cap.nodes) == ["n1", "n2"]  # request order
    assert all(r == NodeResult(Result.PENDING) for r in cap.nodes.values())


def test_nodes_already_ready_in_the_image_are_skipped_and_recorded_ready():
    p = new_plan(["n1", "n2"], [ready("n1", A), offline("n2", A)])
    assert p.to_switch == ("n2",)  # offline with A last seen is not agent-verified: switched
    assert p.capture.nodes["n1"] == NodeResult(Result.READY)
    assert p.capture.nodes["n2"].result is Result.PENDING
    assert p.capture.running


def test_capture_of_nodes_all_ready_ends_ok_at_once():
    p = new_plan(["n1", "n2"], [ready("n1", A), ready("n2", A)])
    assert p.to_switch == ()
    assert (p.capture.state, p.capture.ended) == (CaptureState.OK, NOW)


def test_failed_nodes_are_switched_again():
    p = new_plan(["n1"], [failed("n1", A, "wrong image booted")])
    assert p.to_switch == ("n1",)
    assert p.capture.nodes["n1"] == NodeResult(Result.PENDING)  # not the old failure
    assert p.capture.running


def test_joining_a_node_already_switching_to_the_same_image_does_not_switch_it_again():
    p = new_plan(["n1", "n2"], [switching("n1", A, "j0", State.INSTALLING), offline("n2")])
    assert p.to_switch == ("n2",)
    assert p.capture.nodes["n1"].result is Result.PENDING


def test_conflict_with_another_job_s_switching_nodes_names_the_holder_job_and_image():
    nodes = [switching("n1", B, "j9"), switching("n2", B, "j9", State.TO_IMAGE), switching("n3", C, "j8"),
             offline("n4")]
    with pytest.raises(Conflict) as err:
        new_plan(["n1", "n2", "n3", "n4"], nodes)
    message = str(err.value)
    assert err.value.code == "conflict"
    assert f"n[1-2] held by job j9 for image {B}" in message
    assert f"n3 held by job j8 for image {C}" in message
    assert "n4" not in message


def test_a_node_held_by_another_job_s_running_capture_for_another_image_is_a_conflict():
    # n1 is ready in B for job j9, whose capture still runs (waiting for n2): it holds n1, whatever n1's state.
    other = running_capture(("n1", "n2"), image=B, job="j9", results={"n1": NodeResult(Result.READY)})
    with pytest.raises(Conflict) as err:
        new_plan(["n1", "n3"], [ready("n1", B), offline("n3")], running=[other])
    assert f"n1 held by job j9 for image {B}" in str(err.value)
    assert "n3" not in str(err.value)


def test_running_captures_of_the_same_image_or_other_nodes_are_no_conflict():
    same_image = running_capture(("n1",), image=A, job="j8")
    other_nodes = running_capture(("n5",), image=B, job="j9")
    p = new_plan(["n1", "n2"], [switching("n1", A, "j8"), offline("n2")], running=[same_image, other_nodes])
    assert p.to_switch == ("n2",)  # n1 joins j8's switch


def test_failed_or_ready_nodes_of_another_image_are_no_conflict():
    p = new_plan(["n1", "n2"], [failed("n1", B), ready("n2", B)])
    assert p.to_switch == ("n1", "n2")


# --- plan: the same job again ------------------------------------------------------------------------------


def test_same_request_reattaches_to_the_running_capture():
    latest = running_capture(("n1", "n2"), results={"n1": NodeResult(Result.READY)})
    # the nodes moved on meanwhile; re-attaching switches nothing whatever their state
    p = new_plan(["n2", "n1"], [offline("n1"), failed("n2", A)], latest=latest)
    assert p.attached is True
    assert p.to_switch == ()
    assert p.capture is latest


def test_running_job_with_other_nodes_is_a_bad_request():
    latest = running_capture(("n1", "n2"))
    with pytest.raises(BadRequest) as err:
        new_plan(["n1", "n3"], [offline("n1"), offline("n3")], latest=latest)
    assert "n[1-2]" in str(err.value) and "n[1,3]" in str(err.value)
    assert err.value.code == "bad_request"


def test_another_image_for_a_running_job_is_a_conflict():
    latest = running_capture(image=A)
    with pytest.raises(Conflict) as err:
        new_plan(["n1", "n2"], [offline("n1"), offline("n2")], image=B, latest=latest)
    assert f"job j1 already asked for image {A}" in str(err.value)


def test_another_image_for_a_recently_ended_job_is_a_conflict():
    latest = settle(running_capture(image=A, deadline=NOW - 100), {}, NOW - 100)
    assert latest.state is CaptureState.DEADLINE
    with pytest.raises(Conflict):
        new_plan(["n1", "n2"], [offline("n1"), offline("n2")], image=B, latest=latest, now=NOW + JOB_MEMORY_S - 101)


def test_another_image_for_a_job_ended_long_ago_starts_a_new_capture():
    latest = settle(running_capture(image=A, deadline=NOW - 100), {}, NOW - 100)
    p = new_plan(["n1"], [offline("n1")], image=B, latest=latest, now=NOW - 100 + JOB_MEMORY_S)
    assert (p.attached, p.to_switch, p.capture.image) == (False, ("n1",), B)


def test_same_image_for_an_ended_job_starts_a_new_capture():
    latest = settle(running_capture(image=A, deadline=NOW - 1), {}, NOW)
    p = new_plan(["n1", "n2"], [offline("n1"), ready("n2", A)], latest=latest)
    assert p.attached is False
    assert p.to_switch == ("n1",)
    assert p.capture.created == NOW and p.capture.id is None


# --- settle ---------------------------------------------------------------------------------------------------


def test_settle_records_ready_nodes_and_ends_ok_when_all_are_ready():
    cap = running_capture(("n1", "n2"))
    cap = settle(cap, {"n1": ready("n1", A)}, NOW + 10)
    assert cap.running
    assert cap.nodes["n1"].result is Result.READY and cap.nodes["n2"].result is Result.PENDING
    cap = settle(cap, {"n2": ready("n2", A)}, NOW + 20)
    assert (cap.state, cap.ended) == (CaptureState.OK, NOW + 20)
    assert cap.counts() == {"pending": 0, "ready": 2, "failed": 0}


def test_a_node_ready_in_another_image_stays_pending():
    cap = settle(running_capture(("n1",)), {"n1": ready("n1", B)}, NOW)
    assert cap.nodes["n1"].result is Result.PENDING
    assert cap.running


def test_settle_ends_failed_once_every_node_is_ready_or_failed():
    cap = running_capture(("n1", "n2"))
    cap = settle(cap, {"n1": failed("n1", A, "install of alma failed")}, NOW)
    assert cap.nodes["n1"] == NodeResult(Result.FAILED, "install of alma failed")
    assert cap.running  # n2 still pending
    cap = settle(cap, {"n2": ready("n2", A)}, NOW + 5)
    assert (cap.state, cap.ended) == (CaptureState.FAILED, NOW + 5)


def test_a_node_failed_for_another_image_is_not_a_failure_of_this_capture():
    cap = settle(running_capture(("n1",)), {"n1": failed("n1", B)}, NOW)
    assert cap.nodes["n1"].result is Result.PENDING


def test_settle_ends_at_the_deadline_with_nodes_pending():
    cap = running_capture(("n1", "n2"), deadline=NOW + 100, results={"n1": NodeResult(Result.READY)})
    assert settle(cap, {}, NOW + 99.9).running
    ended = settle(cap, {}, NOW + 100)
    assert (ended.state, ended.ended) == (CaptureState.DEADLINE, NOW + 100)
    assert ended.nodes["n1"].result is Result.READY and ended.nodes["n2"].result is Result.PENDING


def test_settle_prefers_the_outcome_when_the_last_node_resolves_after_the_deadline():
    cap = running_capture(("n1",), deadline=NOW)
    ended = settle(cap, {"n1": ready("n1", A)}, NOW + 50)
    assert ended.state is CaptureState.OK


def test_results_are_sticky():
    cap = running_capture(("n1", "n2", "n3"))
    cap = settle(cap, {"n1": ready("n1", A), "n2": failed("n2", A, "first reason")}, NOW)
    # n1 goes offline, n2 is repaired and ready: this capture keeps what it recorded
    cap = settle(cap, {"n1": offline("n1", A), "n2": ready("n2", A), "n3": switching("n3", A, "j1")}, NOW + 1)
    assert cap.nodes["n1"].result is Result.READY
    assert cap.nodes["n2"] == NodeResult(Result.FAILED, "first reason")
    assert cap.nodes["n3"].result is Result.PENDING


def test_settle_ignores_nodes_outside_the_capture_and_ended_captures():
    cap = running_capture(("n1",))
    assert settle(cap, {"n9": ready("n9", A)}, NOW) == cap
    ended = settle(cap, {}, cap.deadline)
    assert settle(ended, {"n1": ready("n1", A)}, cap.deadline + 10) is ended


def test_node_outcome():
    assert node_outcome(A, ready("n1", A)) == NodeResult(Result.READY)
    assert node_outcome(A, ready("n1", B)) == NodeResult(Result.PENDING)
    assert node_outcome(A, failed("n1", A, "why")) == NodeResult(Result.FAILED, "why")
    assert node_outcome(A, failed("n1", B, "why")) == NodeResult(Result.PENDING)
    assert node_outcome(A, offline("n1", A)) == NodeResult(Result.PENDING)
    assert node_outcome(A, switching("n1", A, "j1", State.TO_IMAGE)) == NodeResult(Result.PENDING)


# --- through the engine: a node recorded ready by one running capture, taken by another ----------------------


@pytest.fixture
def engine(tmp_path):
    """Return an engine with nodes n1 (running A) and n2 (running B) online, and job jX capturing A on both."""
    from cidd.engine import Engine
    from cidd.store import Store

    config = parse_config({"state_dir": str(tmp_path), "nodes": [{"hosts": "n[1-2]"}]}, "test.yaml")
    images = [Image("alma", "9", "1", "alma-9-1.tar.zst"), Image("debian", "12", "1", "debian-12-1.tar.zst")]
    catalog = Catalog({image.id: image for image in images})
    store = Store(":memory:")
    clock = Clock()
    clock.advance(1000)
    engine = Engine(config, catalog, store, clock, SilentLink())
    engine.start()
    engine.agent_connected("n1", "b1", "system", A)
    engine.agent_connected("n2", "b2", "system", B)
    engine.capture("jX", ["n1", "n2"], A, "alice", "slurm", 600.0)
    yield engine
    store.close()


def test_engine_scenario_a_running_capture_holds_a_ready_node(engine):
    cap = engine.captures["jX"]
    assert cap.running
    assert cap.nodes["n1"].result is Result.READY and cap.nodes["n2"].result is Result.PENDING
    assert engine.nodes["n1"].state is State.READY and engine.nodes["n2"].state is State.TO_INSTALLER


def test_another_job_cannot_take_a_node_a_running_capture_holds_ready(engine):
    with pytest.raises(Conflict) as err:
        engine.capture("jY", ["n1"], B, "bob", "slurm", 600.0)
    assert f"n1 held by job jX for image {A}" in str(err.value)
    assert engine.nodes["n1"].state is State.READY  # nothing was started
    assert "jY" not in engine.captures


# --- cancel (cidcapt --cancel): which capture, which nodes, what each becomes --------------------------------


def test_cancellable_is_the_running_or_already_cancelled_capture_of_the_job():
    running = running_capture()
    assert cancellable("j1", running) is running
    cancelled = Capture(**{**running.__dict__, "state": CaptureState.CANCELLED, "ended": NOW, "cancelled_by": "bob"})
    assert cancellable("j1", cancelled) is cancelled  # a second cancel is fine


def test_cancelling_an_unknown_job_or_a_capture_that_ended_otherwise_is_a_bad_request():
    with pytest.raises(NothingToCancel) as unknown:
        cancellable("j404", None)
    assert unknown.value.code == "bad_request"
    assert "job j404 has no capture; nothing to cancel" in unknown.value.message
    for state in (CaptureState.OK, CaptureState.FAILED, CaptureState.DEADLINE):
        ended = Capture(**{**running_capture().__dict__, "state": state, "ended": NOW})
        with pytest.raises(NothingToCancel) as err:
            cancellable("j1", ended)
        assert f"the capture of job j1 already ended ({state.value}); nothing to cancel" == err.value.message


def test_to_cancel_names_the_pending_switching_nodes_only_this_capture_wants():
    cap = running_capture(("n1", "n2", "n3", "n4", "n5"), results={"n5": NodeResult(Result.READY)})
    nodes = {"n1": switching("n1", A, "j1"), "n2": switching("n2", A, "j1", State.INSTALLING),
             "n3": switching("n3", A, "j1"), "n4": offline("n4", C), "n5": ready("n5", A)}
    other = running_capture(("n3",), job="j2")  # joined n3's switch: it goes on for j2
    assert to_cancel(cap, nodes, {"j1": cap, "j2": other}) == ("n1", "n2")
    other_image = running_capture(("n1",), image=B, job="j3")
    assert to_cancel(cap, nodes, {"j1": cap, "j3": other_image}) == ("n1", "n2", "n3")


def test_cancel_ends_the_capture_with_who_and_what_becomes_of_each_pending_node():
    cap = running_capture(("n1", "n2", "n3", "n4", "n5"),
                          results={"n4": NodeResult(Result.READY), "n5": NodeResult(Result.FAILED, "boom")})
    after = {"n1": ready("n1", C), "n2": switching("n2", A, "j1", State.INSTALLING), "n3": switching("n3", A, "j1"),
             "n4": ready("n4", A), "n5": failed("n5", A)}
    left = {"n1": "cancelled by bob: the node was not rebooted yet; it stays ready in " + C}
    ended = cancel(cap, "bob", after, left, {"j2": running_capture(("n3",), job="j2")}, NOW + 5)
    assert (ended.state, ended.ended, ended.cancelled_by, ended.running) == (CaptureState.CANCELLED, NOW + 5, "bob",
                                                                            False)
    assert ended.nodes["n1"] == NodeResult(Result.PENDING, left["n1"])
    going_on = f"cancelled by bob while installing: the switch to {A} goes on to its end, as the disk may already " \
               "hold part of it"
    assert ended.nodes["n2"] == NodeResult(Result.PENDING, going_on)
    assert ended.nodes["n3"] == NodeResult(Result.PENDING, f"cancelled by bob; the switch to {A} goes on for job j2")
    assert ended.nodes["n4"] == NodeResult(Result.READY) and ended.nodes["n5"] == NodeResult(Result.FAILED, "boom")
    assert settle(ended, {"n2": ready("n2", A)}, NOW + 100) is ended  # an ended capture never changes


def test_a_reattach_after_a_cancel_gets_the_cancelled_capture_and_a_new_request_starts_again():
    cancelled = Capture(**{**running_capture(("n1",)).__dict__, "state": CaptureState.CANCELLED, "ended": NOW - 5,
                           "cancelled_by": "bob"})
    nodes = [offline("n1", C)]
    again = plan("j1", A, ["n1"], "alice", "slurm", 600.0, cancelled, {"n1": nodes[0]}, NOW, {}, reattach=True)
    assert again.attached and again.capture is cancelled and again.to_switch == ()
    fresh = new_plan(["n1"], nodes, latest=cancelled)  # a new prolog run: a new capture
    assert not fresh.attached and fresh.capture.running and fresh.to_switch == ("n1",)


# --- through the engine: a cancel with nodes in every step, its history rows, a restart ----------------------


@pytest.fixture
def fleet(tmp_path):
    """Return (engine, link, store path): n1-n5 online running C, n6 online running A, n7 never seen; the reboot
    window lets 2 nodes reboot at once."""
    from cidd.engine import Engine
    from cidd.store import Store

    config = parse_config({"state_dir": str(tmp_path), "nodes": [{"hosts": "n[1-7]"}], "windows": {"reboots": 2}},
                          "test.yaml")
    images = [Image("alma", "9", "1", "alma-9-1.tar.zst"), Image("rocky", "9", "2", "rocky-9-2.tar.zst")]
    catalog = Catalog({image.id: image for image in images})
    path = tmp_path / "cidd.sqlite"
    store = Store(path)
    clock = Clock()
    clock.advance(1000)
    link = SilentLink()
    engine = Engine(config, catalog, store, clock, link)
    engine.start()
    for n in range(1, 6):
        engine.agent_connected(f"n{n}", f"b{n}", "system", C)
    engine.agent_connected("n6", "b6", "system", A)
    yield engine, link, path
    engine.stop()
    store.close()


def test_engine_cancel_leaves_untouched_nodes_sends_back_rebooting_ones_and_lets_installs_finish(fleet):
    engine, link, path = fleet
    heard: list[dict] = []
    engine.capture("jC", [f"n{n}" for n in range(1, 8)], A, "alice", "scheduler", 600.0)
    engine.watch("jC", heard.append)
    assert link.reboots() == ["n1", "n2"]  # n3, n4 wait for the window; n7 has no agent; n6 runs A
    engine.agent_connected("n1", "i1", "installer", None)  # n1 installs; its slot goes to n3
    engine.agent_lost("n2")  # n2 and n3 are on their way to the installer
    engine.agent_lost("n3")
    assert link.reboots() == ["n1", "n2", "n3"]
    assert engine.reboots.state("n4") == "queued"
    engine.clock.advance(7)

    capture, already = engine.cancel("jC", "bob")
    engine.clock.advance(0)  # the done event goes out on the next reactor turn

    assert not already and capture.state is CaptureState.CANCELLED and capture.cancelled_by == "bob"
    assert "jC" not in engine.captures and engine.store.running_captures() == []
    states = {name: (node.state, node.target if node.state in SWITCHING else node.image)
              for name, node in engine.nodes.items()}
    assert states == {"n1": (State.INSTALLING, A),  # goes on: the disk is being written
                      "n2": (State.TO_IMAGE, C), "n3": (State.TO_IMAGE, C),  # sent back to what they ran
                      "n4": (State.READY, C),  # never rebooted: stays as it was
                      "n5": (State.READY, C),  # same (queued behind n4)
                      "n6": (State.READY, A), "n7": (State.OFFLINE, None)}
    assert engine.reboots.state("n4") is None and engine.reboots.state("n5") is None  # dropped from the window
    rows = {row["node"]: row for row in engine.store.events(job="jC") if row["to"] == "cancelled"}
    assert sorted(rows) == ["n2", "n3", "n4", "n5", "n7"]
    assert all(row["detail"].startswith("cancelled by bob: ") and row["image"] == A for row in rows.values())
    assert rows["n4"]["detail"] == f"cancelled by bob: the node was not rebooted yet; it stays ready in {C}"
    assert capture.nodes["n1"].reason.startswith("cancelled by bob while installing: the switch to alma-9-1 goes on")
    assert capture.nodes["n6"] == NodeResult(Result.READY)
    assert [e["node"] for e in heard if e["type"] == "node" and e["to"] == "cancelled"] == ["n2", "n3", "n4", "n5",
                                                                                           "n7"]
    assert heard[-1]["type"] == "done" and heard[-1]["state"] == "cancelled" and heard[-1]["cancelled_by"] == "bob"

    # the install finishes and n1 boots the new image; n2 and n3 go back to C at their installer's hello
    engine.installed("n1", Installed(A, True, attempt=1))
    engine.agent_connected("n1", "b9", "system", A)
    engine.agent_connected("n2", "i2", "installer", None)
    node, message = link.sent[-1]
    assert (node, message["type"], message["boot"], message["method"]) == ("n2", "reboot", "disk", "reboot")
    engine.agent_connected("n2", "b12", "system", C)
    assert engine.nodes["n1"].state is State.READY and engine.nodes["n1"].image == A
    assert (engine.nodes["n2"].state, engine.nodes["n2"].image) == (State.READY, C)
    assert "n4" not in link.reboots()  # n4 and n5 were never told anything
    assert engine.latest_capture("jC").state is CaptureState.CANCELLED  # the ended capture does not change

    again, already = engine.cancel("jC", "carol")  # idempotent: nothing more happens
    assert already and again.cancelled_by == "bob"
    assert len([r for r in engine.store.events(job="jC") if r["to"] == "cancelled"]) == 5


def test_a_cancel_survives_a_restart_and_a_reattach_gets_it(fleet):
    from cidd.engine import Engine
    from cidd.store import Store

    engine, link, path = fleet
    engine.capture("jR", ["n1", "n2"], A, "alice", "scheduler", 600.0)
    engine.cancel("jR", "bob")
    engine.stop()
    engine.store.close()

    store = Store(path)
    restarted = Engine(engine.config, engine.catalog, store, Clock(), SilentLink())
    restarted.clock.advance(2000)
    restarted.start()
    try:
        latest = restarted.latest_capture("jR")
        assert (latest.state, latest.cancelled_by) == (CaptureState.CANCELLED, "bob")
        assert "jR" not in restarted.captures
        assert {restarted.nodes[n].state for n in ("n1", "n2")} == {State.TO_IMAGE}  # still on their way back
        reattached = restarted.capture("jR", ["n1", "n2"], A, "alice", "scheduler", 600.0, reattach=True)
        assert reattached.attached and reattached.capture.state is CaptureState.CANCELLED
        assert restarted.cancel("jR", "carol")[1] is True
    finally:
        restarted.stop()
        store.close()
