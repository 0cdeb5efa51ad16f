"""The per-node image-switch state machine: pure logic, events in, actions out.

No sockets, no SQLite, no reactor: ``apply(node, event, policy, now)`` returns a ``Step`` holding the node's
new record, the actions to carry out (after the new record has been persisted) and the transition to write to
the event history. See docs/state-machine.md for the diagram and the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from cidcommon.errors import CidError
from cidcommon.vocabulary import BootTarget, Mode
from cidd.core.machine_types import (
    AGENT_METHODS,
    Action,
    Cancel,
    Connected,
    Disconnected,
    Event,
    Installed,
    InstallReport,
    Policy,
    PowerOn,
    Reboot,
    RungFailed,
    SendInstall,
    SetBoot,
    SetDeadline,
    Switch,
    Tick,
)

__all__ = ["State", "Node", "Step", "Transition", "apply", "restore", "SWITCHING", "CANCELLED", "AlreadySwitching"]


class State(StrEnum):
    """Node states (DESIGN.md §2). The three switching states have a deadline, except while a reboot waits
    for the reboot window (``SetDeadline(None)``; the capture's deadline still bounds it)."""

    OFFLINE = "offline"  # no agent session
    READY = "ready"  # agent connected from an installed system, running ``image``
    IN_INSTALLER = "in_installer"  # agent connected from the installer, nothing to do
    TO_INSTALLER = "to_installer"  # next boot is the installer; waiting for the installer's hello
    INSTALLING = "installing"  # the installer is writing ``target``
    TO_IMAGE = "to_image"  # ``target`` written and verified; waiting for the installed system's hello
    FAILED = "failed"  # out of retries or unrecoverable; ``reason`` says why


SWITCHING = frozenset({State.TO_INSTALLER, State.INSTALLING, State.TO_IMAGE})

#: The ``to_state`` of the history row that ends a switch because its capture was cancelled. Not a node state:
#: the row's detail says where the node went (its idle state, or ``to_image`` back to its old image), and the
#: node's next row starts from there. The statistics count such a row as neither a success nor a failure.
CANCELLED = "cancelled"


class AlreadySwitching(CidError):
    """Raised by ``apply`` for a Switch to another image while the node is switching (a caller bug)."""

    code = "conflict"


@dataclass(frozen=True)
class Node:
    """Everything the machine knows about one node; persisted as one row."""

    name: str
    state: State = State.OFFLINE
    image: str | None = None  # image last verified running (from the agent's marker)
    target: str | None = None  # image being (or last) switched to
    job: str | None = None  # job whose capture started the current switch
    online: bool = False
    mode: Mode | None = None  # the agent's mode while online
    boot_id: str | None = None  # boot id of the latest agent session
    reboot_from: str | None = None  # boot id when the current rung's reboot was sent; None = not sent yet
    attempt: int = 0  # install attempts in the current switch
    rung: int = 0  # ladder rung of the current waiting step
    deadline: float | None = None
    since: float = 0.0  # when the current state was entered
    reason: str | None = None


@dataclass(frozen=True)
class Transition:
    """One row of the event history."""

    node: str
    job: str | None
    image: str | None
    from_state: str
    to_state: str
    attempt: int
    rung: int
    elapsed: float  # seconds spent in from_state
    detail: str


@dataclass(frozen=True)
class Step:
    """What ``apply`` returns: the new record, the actions to run after persisting it, the history row."""

    node: Node
    actions: tuple[Action, ...] = ()
    transition: Transition | None = None


def restore(node: Node, now: float | None = None, grace: float = 0.0) -> Node:
    """Return ``node`` as loaded after a cidd restart at ``now``: sessions are gone, so live-only states collapse,
    and a waiting node's deadline is at least ``now + grace``.

    The grace lets the agents that did what they were told while cidd was down reconnect and say so (their
    reconnect pause grows to about 90 s) before a deadline that passed meanwhile climbs the ladder.
    """
    state = node.state
    if state in (State.READY, State.IN_INSTALLER):
        state = State.OFFLINE
    deadline = node.deadline
    if now is not None and deadline is not None and state in SWITCHING:
        deadline = max(deadline, now + grace)
    return replace(node, state=state, online=False, mode=None, deadline=deadline)


def apply(node: Node, event: Event, policy: Policy, now: float) -> Step:
    """Return the Step that ``event`` causes for ``node`` at time ``now`` under ``policy``.

    Raises AlreadySwitching when asked to switch a switching node to a different image.
    """
    handler = _HANDLERS[type(event)]
    return handler(node, event, policy, now)


# --- helpers -----------------------------------------------------------------------------------------


def _step(old: Node, new: Node, actions: tuple[Action, ...], now: float, detail: str) -> Step:
    """Return a Step, with a history row when the state, rung or attempt changed."""
    if old.state != new.state:
        new = replace(new, since=now)
    moved = (old.state, old.rung, old.attempt) != (new.state, new.rung, new.attempt)
    transition = None
    if moved:
        # Leaving a state: the rung that ended it (which rung worked, for the statistics). A climb: the new rung.
        rung = old.rung if old.state != new.state and old.state in SWITCHING else new.rung
        transition = Transition(
            node=new.name, job=new.job, image=new.target, from_state=old.state.value,
            to_state=new.state.value, attempt=new.attempt, rung=rung,
            elapsed=max(0.0, now - old.since), detail=detail,
        )
    return Step(new, actions, transition)


def _idle_state(node: Node) -> State:
    """Return the non-switching state matching the node's session."""
    if not node.online:
        return State.OFFLINE
    return State.IN_INSTALLER if node.mode == Mode.INSTALLER else State.READY


def _fail(node: Node, now: float, reason: str) -> Step:
    """Return the Step that puts ``node`` in FAILED with ``reason``."""
    new = replace(node, state=State.FAILED, deadline=None, reason=reason)
    return _step(node, new, (), now, reason)


def _begin_wait(node: Node, state: State, rung: int, policy: Policy, now: float, detail: str,
                old: Node | None = None) -> Step:
    """Return the Step entering waiting ``state`` at ``rung``: the rung's reboot when it can be sent now.

    ``old`` is the record before the event (default ``node``), against which the history row is written.
    """
    boot = BootTarget.INSTALLER if state is State.TO_INSTALLER else BootTarget.DISK
    rung_cfg = policy.ladder[rung]
    new = replace(node, state=state, rung=rung, deadline=now + rung_cfg.timeout, reason=None, reboot_from=None)
    actions: list[Action] = [SetBoot(boot)] if rung == 0 else []
    if rung_cfg.method not in AGENT_METHODS or node.online:
        actions.append(Reboot(boot, rung_cfg.method))
        new = replace(new, reboot_from=node.boot_id or "")
        detail = f"{detail}; rung {rung}: {rung_cfg.method}"
    else:
        actions.append(PowerOn(boot))  # a node that is off gets powered on (when cidd has BMC access)
        detail = f"{detail}; rung {rung}: {rung_cfg.method} when the agent connects"
    return _step(old or node, new, tuple(actions), now, detail)


def _climb(node: Node, policy: Policy, now: float, why: str) -> Step:
    """Return the Step for the next rung of the ladder, or FAILED when the ladder is exhausted."""
    if node.rung + 1 < len(policy.ladder):
        return _begin_wait(node, node.state, node.rung + 1, policy, now, why)
    target = "the installer" if node.state is State.TO_INSTALLER else f"image {node.target}"
    methods = ", ".join(r.method for r in policy.ladder)
    return _fail(node, now, f"{why}; node did not boot into {target} after every rung of the ladder ({methods})")


def _start_install(node: Node, policy: Policy, now: float, detail: str) -> Step:
    """Return the Step that asks the connected installer to write the target image (a new attempt).

    When every attempt of ``policy.install_attempts`` was used, the node fails instead.
    """
    if node.attempt >= policy.install_attempts:
        return _fail(node, now, f"{detail}, but all {policy.install_attempts} install attempt(s) of "
                                f"{node.target} were used; check the node's console and the image")
    new = replace(node, state=State.INSTALLING, attempt=node.attempt + 1, rung=0,
                  deadline=now + policy.install_timeout, reason=None, reboot_from=None)
    return _step(node, new, (SendInstall(node.target or "", new.attempt),), now, detail)


def _ready(node: Node, now: float, detail: str) -> Step:
    """Return the Step that ends a switch with the node ready in its target image."""
    new = replace(node, state=State.READY, deadline=None, reason=None, reboot_from=None)
    return _step(node, new, (), now, detail)


# --- handlers ----------------------------------------------------------------------------------------


def _on_switch(node: Node, event: Switch, policy: Policy, now: float) -> Step:
    if node.state in SWITCHING:
        if node.target != event.image:
            raise AlreadySwitching(f"{node.name} is switching to {node.target} for job {node.job}")
        return Step(node)  # join
    if node.state is State.READY and node.image == event.image:
        return Step(node)  # already there, agent-verified
    fresh = replace(node, target=event.image, job=event.job, attempt=0, rung=0, reason=None)
    if node.online and node.mode == Mode.SYSTEM and node.image == event.image:  # a failed node, now fine
        return _ready(fresh, now, f"already runs {event.image}")
    if node.online and node.mode == Mode.INSTALLER:
        return _start_install(fresh, policy, now, f"switch to {event.image} for job {event.job}")
    return _begin_wait(fresh, State.TO_INSTALLER, 0, policy, now, f"switch to {event.image} for job {event.job}")


def _on_connected(node: Node, event: Connected, policy: Policy, now: float) -> Step:
    same_boot = node.reboot_from is not None and event.boot_id == node.reboot_from
    fresh = replace(node, online=True, mode=event.mode, boot_id=event.boot_id,
                    image=event.image if event.mode == Mode.SYSTEM else node.image)
    state = node.state
    if state not in SWITCHING:
        if state is State.FAILED:
            return Step(fresh)
        return _step(node, replace(fresh, state=_idle_state(fresh)), (), now, f"agent connected ({event.mode})")
    if state is State.TO_INSTALLER:
        if event.mode == Mode.INSTALLER:
            return _start_install(fresh, policy, now, "installer connected")
        if event.image == node.target:
            return _ready(fresh, now, f"already runs {node.target}")
        if node.reboot_from is None or same_boot:
            return _resend(node, fresh, BootTarget.INSTALLER, policy, now)
        return _climb(fresh, policy, now, f"node booted its disk ({event.image}) instead of the installer")
    if state is State.INSTALLING:
        if event.mode == Mode.INSTALLER:
            if event.boot_id == node.boot_id:  # same installer boot: same attempt and deadline
                return _same_installer_boot(node, fresh, event.install, policy, now)
            return _start_install(fresh, policy, now, "installer restarted")
        if event.image == node.target:  # the install ended (the marker is written only once verified), then the
            # node booted it before cidd heard the result (cidd or the link was down): it runs the target
            return _ready(fresh, now, f"booted {node.target}, installed while cidd was not told")
        return _begin_wait(fresh, State.TO_INSTALLER, 0, policy, now,
                           "node left the installer before the install ended", old=node)
    # TO_IMAGE
    if event.mode == Mode.SYSTEM and event.image == node.target:
        return _ready(fresh, now, f"booted {node.target}")
    if node.reboot_from is None or same_boot:
        return _resend(node, fresh, BootTarget.DISK, policy, now)
    if event.mode == Mode.SYSTEM:
        return _fail(fresh, now, f"node booted image {event.image or 'unknown'} instead of {node.target}; "
                                 "check its boot order and the installed boot loader")
    return _climb(fresh, policy, now, "node booted the installer again instead of its disk")


def _same_installer_boot(node: Node, fresh: Node, report: InstallReport | None, policy: Policy,
                         now: float) -> Step:
    """Return the Step for an installer that reconnected in the boot it was installing in.

    What its hello reports is read first, so an install is never sent again over one that is running or has
    finished (a second run empties the target the first one wrote): still running, wait; finished, take its
    result; nothing about this attempt (the ``install`` never arrived), send it.
    """
    if report is not None and report.image == node.target and report.attempt in (None, node.attempt):
        if report.state == "running":
            return Step(fresh)
        result = Installed(report.image, report.state == "ok", report.reason, report.retry, report.attempt)
        return _on_installed(fresh, result, policy, now)
    return Step(fresh, (SendInstall(node.target or "", node.attempt),))


def _resend(old: Node, fresh: Node, boot: BootTarget, policy: Policy, now: float) -> Step:
    """Return the Step that (re)sends the current rung's agent reboot to a node that just connected."""
    method = policy.ladder[old.rung].method
    if method not in AGENT_METHODS:
        return Step(fresh)  # a power rung is under way; wait for it
    new = replace(fresh, reboot_from=fresh.boot_id or "")
    return Step(new, (Reboot(boot, method),))


def _on_disconnected(node: Node, event: Disconnected, policy: Policy, now: float) -> Step:
    fresh = replace(node, online=False, mode=None)
    if node.state in SWITCHING or node.state is State.FAILED:
        return Step(fresh)
    return _step(node, replace(fresh, state=State.OFFLINE), (), now, "agent session closed")


def _on_installed(node: Node, event: Installed, policy: Policy, now: float) -> Step:
    if node.state is not State.INSTALLING or event.image != node.target:
        return Step(node)  # a late report from an abandoned install
    if event.attempt is not None and event.attempt != node.attempt:
        return Step(node)  # a report of an earlier attempt, already read (or superseded)
    if event.ok:
        return _begin_wait(node, State.TO_IMAGE, 0, policy, now, f"{event.image} written and verified")
    if event.retry and node.attempt < policy.install_attempts:
        return _start_install(node, policy, now, f"install failed ({event.reason}); trying again")
    return _fail(node, now, f"install of {event.image} failed after {node.attempt} attempt(s): {event.reason}")


def _on_rung_failed(node: Node, event: RungFailed, policy: Policy, now: float) -> Step:
    if (event.state is not None and event.state != node.state.value) or (
            event.rung is not None and event.rung != node.rung):
        return Step(node)  # a late failure of a step the node has already left
    if node.state not in (State.TO_INSTALLER, State.TO_IMAGE):
        if node.state is State.INSTALLING:
            return _fail(node, now, f"the installer refused to install {node.target}: {event.reason}")
        return Step(node)
    return _climb(node, policy, now, event.reason)


def _on_cancel(node: Node, event: Cancel, policy: Policy, now: float) -> Step:
    """Return the Step that takes ``node`` out of its switch, if nothing of the target can be on its disk yet.

    - ``to_installer`` at rung 0 whose reboot was not issued (no agent to send it to, or queued behind the
      reboot window): the node was never touched; it goes back to its idle state (offline, or ready in its
      image), next boot from the disk.
    - ``to_installer`` otherwise (the node is on its way to the installer, or there): nothing was written; it
      is sent back to the image it ran (``to_image`` with that image as target, rung 0: the reboot into the
      disk goes to the agent's next hello, or out at once for a power rung), or, when cidd never verified an
      image on it, goes back to its idle state with the disk as next boot.
    - ``installing``, ``to_image``, or ``to_installer`` after an install attempt began (the node left the
      installer mid-install): the disk may hold part of the target, so the switch goes on to its end (ready in
      the target, or failed); nothing changes here and no row is written.
    Any other state: nothing. A node that leaves its switch gets one history row to ``CANCELLED``.
    """
    if node.state is not State.TO_INSTALLER or node.attempt > 0:
        return Step(node)
    who = f"cancelled by {event.by}"
    if node.rung == 0 and (node.reboot_from is None or node.deadline is None):
        idle = _idle_state(node)
        where = f"ready in {node.image}" if idle is State.READY else f"{idle.value}, next boot from its disk"
        new = replace(node, state=idle, deadline=None, reason=None, reboot_from=None, since=now)
        return _cancel_step(node, new, (SetBoot(BootTarget.DISK),), event, now,
                            f"{who}: the node was not rebooted yet; it stays {where}")
    if node.image is None:
        idle = _idle_state(node)
        new = replace(node, state=idle, deadline=None, reason=None, reboot_from=None, since=now)
        return _cancel_step(node, new, (SetBoot(BootTarget.DISK),), event, now,
                            f"{who}: nothing written yet, and cidd never verified an image on this node to send it "
                            "back to; next boot from its disk")
    # Its reboot into the installer was issued: it is on its way there (or already there). An agent rung's
    # reboot into the disk goes to the agent's next hello (the installer's); a power rung is issued now.
    rung = policy.ladder[0]
    back = replace(node, state=State.TO_IMAGE, target=node.image, job=event.job, attempt=0, rung=0,
                   deadline=now + rung.timeout, reason=None, reboot_from=None, since=now)
    detail = f"{who}: nothing written yet; the node goes back to {node.image} on its disk; rung 0: {rung.method}"
    actions: tuple[Action, ...] = (SetBoot(BootTarget.DISK),)
    if rung.method in AGENT_METHODS:
        detail += " when the agent connects"
    else:
        actions += (Reboot(BootTarget.DISK, rung.method),)
        back = replace(back, reboot_from=node.boot_id or "")
    return _cancel_step(node, back, actions, event, now, detail)


def _cancel_step(old: Node, new: Node, actions: tuple[Action, ...], event: Cancel, now: float,
                 detail: str) -> Step:
    """Return a Step whose history row ends ``old``'s switch as cancelled (job and image of the cancelled switch)."""
    transition = Transition(node=old.name, job=event.job, image=old.target, from_state=old.state.value,
                            to_state=CANCELLED, attempt=old.attempt, rung=old.rung,
                            elapsed=max(0.0, now - old.since), detail=detail)
    return Step(new, actions, transition)


def _on_set_deadline(node: Node, event: SetDeadline, policy: Policy, now: float) -> Step:
    if node.state not in (State.TO_INSTALLER, State.TO_IMAGE) or event.state != node.state.value or \
            event.rung != node.rung:
        return Step(node)  # the step the reboot belonged to is over
    return Step(replace(node, deadline=event.deadline))


def _on_tick(node: Node, event: Tick, policy: Policy, now: float) -> Step:
    if node.state not in SWITCHING or node.deadline is None or now < node.deadline:
        return Step(node)
    if node.state is State.INSTALLING:
        if node.online and node.attempt < policy.install_attempts:
            return _start_install(node, policy, now, f"install did not finish within {policy.install_timeout:g}s")
        return _fail(node, now, f"install of {node.target} did not finish within {policy.install_timeout:g}s "
                                f"({node.attempt} attempt(s))")
    rung = policy.ladder[node.rung]
    return _climb(node, policy, now, f"no answer {rung.timeout:g}s after rung {node.rung} ({rung.method})")


_HANDLERS: dict[type, Callable[[Node, Any, Policy, float], Step]] = {
    Switch: _on_switch,
    Connected: _on_connected,
    Disconnected: _on_disconnected,
    Installed: _on_installed,
    RungFailed: _on_rung_failed,
    SetDeadline: _on_set_deadline,
    Tick: _on_tick,
    Cancel: _on_cancel,
}
