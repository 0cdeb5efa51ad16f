"""Capture rules (DESIGN.md §3): pure logic, no reactor, no SQLite.

A capture is (job id, node set, image, requester) with a deadline. ``plan`` decides what a capture request
does given the job's latest capture and the nodes' records; ``settle`` records node outcomes and decides
whether the capture has ended.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from cidcommon.errors import BadRequest, Conflict
from cidcommon.hostlists import collect
from cidd.core.machine import SWITCHING, Node, State

#: An ended capture whose job id is asked for again with another image within this time is a conflict.
JOB_MEMORY_S = 24 * 3600.0


class CaptureState(StrEnum):
    """A capture runs until every node is ready or failed, until its deadline, or until someone cancels it."""

    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    DEADLINE = "deadline"
    CANCELLED = "cancelled"


class NothingToCancel(BadRequest):
    """A cancel names a job that has no capture, or whose capture ended otherwise than by a cancel (exit 2)."""


class Result(StrEnum):
    """What a capture knows of one of its nodes. Once ready or failed, it stays so for that capture."""

    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class NodeResult:
    """A node's outcome within one capture."""

    result: Result = Result.PENDING
    reason: str | None = None


class Outcomes(dict[str, NodeResult]):
    """The node outcomes of a capture that also know how many are pending (``settle`` builds them and keeps the
    count), so that settling one node's step of a 10,000-node capture does not look at every node. Never
    changed once in a Capture, as any ``nodes`` mapping."""

    __slots__ = ("pending",)

    def __init__(self, outcomes: Mapping[str, NodeResult], pending: int) -> None:
        super().__init__(outcomes)
        self.pending = pending


def pending_count(outcomes: Mapping[str, NodeResult]) -> int:
    """Return how many of ``outcomes`` are pending (kept by ``Outcomes``, else counted)."""
    if isinstance(outcomes, Outcomes):
        return outcomes.pending
    return sum(1 for outcome in outcomes.values() if outcome.result is Result.PENDING)


@dataclass(frozen=True)
class Capture:
    """One capture. ``nodes`` maps node names (in request order) to their outcome in this capture."""

    job: str
    image: str
    nodes: Mapping[str, NodeResult]
    user: str | None
    requester: str
    created: float
    deadline: float
    state: CaptureState = CaptureState.RUNNING
    ended: float | None = None
    id: int | None = None  # the store's row id
    cancelled_by: str | None = None  # who cancelled it (state CANCELLED)

    @property
    def running(self) -> bool:
        """Return whether the capture has not ended."""
        return self.state is CaptureState.RUNNING

    def counts(self) -> dict[str, int]:
        """Return how many nodes are ready, failed and pending."""
        counts = {r.value: 0 for r in Result}
        for outcome in self.nodes.values():
            counts[outcome.result.value] += 1
        return counts


@dataclass(frozen=True)
class Plan:
    """What a capture request does: the capture to keep, whether it re-attached, the nodes to switch."""

    capture: Capture
    attached: bool
    to_switch: tuple[str, ...]


def node_outcome(image: str, node: Node) -> NodeResult:
    """Return what ``node``'s record says about a capture of ``image``: ready, failed or pending."""
    if node.state is State.READY and node.image == image:
        return NodeResult(Result.READY)
    if node.state is State.FAILED and node.target == image:
        return NodeResult(Result.FAILED, node.reason)
    return NodeResult(Result.PENDING)


def plan(job: str, image: str, names: list[str], user: str | None, requester: str, timeout: float,
         latest: Capture | None, nodes: Mapping[str, Node], now: float,
         running: Mapping[str, Capture] | None = None, reattach: bool = False) -> Plan:
    """Return the Plan for a capture request.

    ``latest`` is the job's most recent capture, if any; ``nodes`` holds every requested node's record;
    ``running`` holds the running captures by job (a node in one of them is held by that job). ``reattach``
    says the client re-sends a request it made before (its session was lost): when the job's capture was
    cancelled meanwhile, the cancelled capture is returned (attached) instead of starting a new one.
    Raises Conflict when the job id is in use with another image, or when another job holds a node for a
    different image; raises BadRequest when a running capture of the job names other nodes.
    """
    ended = latest.ended if latest is not None and latest.ended is not None else now
    if latest is not None and latest.image != image and (latest.running or now - ended < JOB_MEMORY_S):
        raise Conflict(f"job {job} already asked for image {latest.image}; a job runs one image "
                       f"(use another job id, or wait for capture of {latest.image} to end)")
    if reattach and latest is not None and latest.state is CaptureState.CANCELLED and set(latest.nodes) == set(names):
        return Plan(latest, attached=True, to_switch=())
    if latest is not None and latest.running:
        if set(latest.nodes) != set(names):
            raise BadRequest(f"job {job} is already capturing {collect(list(latest.nodes))}, not "
                             f"{collect(names)}; re-run with the same nodes to re-attach")
        return Plan(latest, attached=True, to_switch=())
    holders = {(n.job or "?", n.target or "?", name) for name, n in nodes.items()
               if n.state in SWITCHING and n.target != image}
    for other in (running or {}).values():
        if other.job != job and other.image != image:
            holders.update((other.job, other.image, name) for name in names if name in other.nodes)
    if holders:
        by_job: dict[tuple[str, str], list[str]] = {}
        for holder, target, name in sorted(holders):
            by_job.setdefault((holder, target), []).append(name)
        held = "; ".join(f"{collect(ns)} held by job {j} for image {t}" for (j, t), ns in by_job.items())
        raise Conflict(f"nodes are held for another image by another job: {held}; "
                       "wait for that job's capture to end")
    results: dict[str, NodeResult] = {}
    to_switch: list[str] = []
    for name in names:
        node = nodes[name]
        outcome = node_outcome(image, node) if node.state is not State.FAILED else NodeResult()
        results[name] = outcome
        if outcome.result is Result.PENDING and not (node.state in SWITCHING and node.target == image):
            to_switch.append(name)
    capture = Capture(job=job, image=image, nodes=results, user=user, requester=requester,
                      created=now, deadline=now + timeout)
    return Plan(settle(capture, {}, now), attached=False, to_switch=tuple(to_switch))


def settle(capture: Capture, changed: Mapping[str, Node], now: float) -> Capture:
    """Return ``capture`` with the outcomes of the ``changed`` nodes recorded and its state brought up to date.

    A running capture ends ``ok`` when every node is ready, ``failed`` when every node is ready or failed and
    one failed, and ``deadline`` when ``now`` passed its deadline with nodes still pending. Returns ``capture``
    itself when nothing changed; when ``changed`` names nodes and none of their outcomes changed, that is decided
    without looking at the other nodes (most steps of a switch leave the node pending: a capture of N nodes
    must not cost O(N) per step, docs/performance.md).
    """
    if not capture.running:
        return capture
    results: Outcomes | None = None
    for name, node in changed.items():
        old = capture.nodes.get(name)
        if old is not None and old.result is Result.PENDING:
            new = node_outcome(capture.image, node)
            if new != old:
                results = Outcomes(capture.nodes, pending_count(capture.nodes)) if results is None else results
                results[name] = new
                results.pending -= new.result is not Result.PENDING
    if results is None and changed and now < capture.deadline:
        return capture  # still running: it was settled after each earlier change, and nothing changed now
    updated = capture if results is None else replace(capture, nodes=results)
    if pending_count(updated.nodes) == 0:
        failed = any(outcome.result is Result.FAILED for outcome in updated.nodes.values())
        state = CaptureState.FAILED if failed else CaptureState.OK
        return replace(updated, state=state, ended=now)
    if now >= capture.deadline:
        return replace(updated, state=CaptureState.DEADLINE, ended=now)
    return updated


def cancellable(job: str, latest: Capture | None) -> Capture:
    """Return the capture of ``job`` that a cancel applies to: running, or already cancelled (a second cancel
    changes nothing).

    Raises NothingToCancel when the job has no capture, or when its latest capture ended ok, failed or at its
    deadline.
    """
    if latest is None:
        raise NothingToCancel(f"job {job} has no capture; nothing to cancel (see 'cidcapt --captures')")
    if latest.state not in (CaptureState.RUNNING, CaptureState.CANCELLED):
        raise NothingToCancel(f"the capture of job {job} already ended ({latest.state.value}); nothing to cancel")
    return latest


def to_cancel(capture: Capture, nodes: Mapping[str, Node], running: Mapping[str, Capture]) -> tuple[str, ...]:
    """Return the nodes of ``capture`` whose switch its cancel concerns (each gets the machine's Cancel event).

    Those are the nodes still pending in it and switching to its image, except a node that another running
    capture of the same image still waits for (that job joined the switch; it goes on for that job).
    """
    wanted = _wanted_elsewhere(capture, running)
    return tuple(name for name, outcome in capture.nodes.items()
                 if outcome.result is Result.PENDING and name in nodes and name not in wanted
                 and nodes[name].state in SWITCHING and nodes[name].target == capture.image)


def cancel(capture: Capture, by: str, nodes: Mapping[str, Node], left: Mapping[str, str],
           running: Mapping[str, Capture], now: float) -> Capture:
    """Return ``capture`` ended ``cancelled`` by ``by`` at ``now``; ready and failed nodes keep their result.

    Each pending node keeps the ``pending`` result with a reason saying what becomes of it: ``left[name]`` (the
    history row's detail) for the nodes that left their switch, else that their switch goes on, for another
    running capture (``running``) or because the disk may already hold part of the image (``nodes``: the
    records after the cancel).
    """
    joined = _wanted_elsewhere(capture, running)
    results: dict[str, NodeResult] = {}
    for name, outcome in capture.nodes.items():
        if outcome.result is not Result.PENDING:
            results[name] = outcome
            continue
        node = nodes.get(name)
        if name in left:
            reason = left[name]
        elif name in joined:
            reason = f"cancelled by {by}; the switch to {capture.image} goes on for job {joined[name]}"
        elif node is not None and node.state in SWITCHING and node.target == capture.image:
            reason = (f"cancelled by {by} while {node.state.value}: the switch to {capture.image} goes on to its "
                      "end, as the disk may already hold part of it")
        else:
            reason = f"cancelled by {by}; not switched"
        results[name] = NodeResult(Result.PENDING, reason)
    return replace(capture, nodes=results, state=CaptureState.CANCELLED, ended=now, cancelled_by=by)


def _wanted_elsewhere(capture: Capture, running: Mapping[str, Capture]) -> dict[str, str]:
    """Return {node: job} for the nodes another running capture of ``capture``'s image still waits for."""
    return {name: other.job for other in running.values()
            if other.job != capture.job and other.image == capture.image and other.running
            for name, outcome in other.nodes.items() if outcome.result is Result.PENDING}
