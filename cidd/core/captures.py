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
    """A capture runs until every node is ready or failed, or until its deadline."""

    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    DEADLINE = "deadline"


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
         running: Mapping[str, Capture] | None = None) -> Plan:
    """Return the Plan for a capture request.

    ``latest`` is the job's most recent capture, if any; ``nodes`` holds every requested node's record;
    ``running`` holds the running captures by job (a node in one of them is held by that job).
    Raises Conflict when the job id is in use with another image, or when another job holds a node for a
    different image; raises BadRequest when a running capture of the job names other nodes.
    """
    ended = latest.ended if latest is not None and latest.ended is not None else now
    if latest is not None and latest.image != image and (latest.running or now - ended < JOB_MEMORY_S):
        raise Conflict(f"job {job} already asked for image {latest.image}; a job runs one image "
                       f"(use another job id, or wait for capture of {latest.image} to end)")
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
    one failed, and ``deadline`` when ``now`` passed its deadline with nodes still pending.
    """
    if not capture.running:
        return capture
    results = dict(capture.nodes)
    for name, node in changed.items():
        if name in results and results[name].result is Result.PENDING:
            results[name] = node_outcome(capture.image, node)
    updated = replace(capture, nodes=results)
    counts = updated.counts()
    if counts[Result.PENDING] == 0:
        state = CaptureState.FAILED if counts[Result.FAILED] else CaptureState.OK
        return replace(updated, state=state, ended=now)
    if now >= capture.deadline:
        return replace(updated, state=CaptureState.DEADLINE, ended=now)
    return updated
