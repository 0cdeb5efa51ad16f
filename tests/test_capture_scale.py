"""``captures.settle`` on large captures: a step that changes no outcome costs nothing, the pending count is
kept as outcomes change (cidd/core/captures.py, docs/performance.md)."""

from __future__ import annotations

import random

from cidd.core.captures import Capture, CaptureState, NodeResult, Outcomes, Result, pending_count, settle
from cidd.core.machine import Node, State


def capture_of(count: int) -> Capture:
    """Return a running capture of ``count`` pending nodes (a plain dict of outcomes, as the store loads it)."""
    return Capture(job="j", image="img-1-1", nodes={f"n{i:05d}": NodeResult() for i in range(count)}, user=None,
                   requester="admin", created=0.0, deadline=1000.0)


def test_a_step_that_leaves_every_outcome_pending_returns_the_same_capture():
    capture = capture_of(5)
    switching = Node("n00001", state=State.TO_IMAGE, target="img-1-1")
    assert settle(capture, {"n00001": switching}, 10.0) is capture
    assert settle(capture, {"elsewhere": switching}, 10.0) is capture
    assert settle(capture, {"n00001": switching}, 1000.0).state is CaptureState.DEADLINE


def test_the_pending_count_follows_the_outcomes_to_the_end_of_the_capture():
    capture = capture_of(2000)
    names = list(capture.nodes)
    random.Random(4).shuffle(names)
    for number, name in enumerate(names):
        node = (Node(name, state=State.FAILED, target="img-1-1", reason="disk")
                if number % 500 == 0 else Node(name, state=State.READY, image="img-1-1"))
        capture = settle(capture, {name: Node(name, state=State.INSTALLING, target="img-1-1")}, 1.0)
        capture = settle(capture, {name: node}, 1.0)
        if capture.running:
            assert isinstance(capture.nodes, Outcomes)
            assert pending_count(capture.nodes) == capture.counts()[Result.PENDING] == len(names) - number - 1
    assert capture.state is CaptureState.FAILED and capture.ended == 1.0
    assert capture.counts() == {"pending": 0, "ready": 1996, "failed": 4}


def test_a_capture_whose_nodes_are_all_ready_ends_ok_at_once():
    capture = capture_of(3)
    done = Capture(**{**capture.__dict__, "nodes": {name: NodeResult(Result.READY) for name in capture.nodes}})
    assert settle(done, {}, 5.0).state is CaptureState.OK
