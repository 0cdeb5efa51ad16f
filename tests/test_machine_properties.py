"""Property tests: random event sequences through the node machine and the capture rules.

A hypothesis state machine drives three nodes with every kind of event (captures asking for one of three
images, raw switches, agent hellos with random mode/image/boot id and install reports, disconnects, install
results of this or an earlier attempt, failed rungs, the engine's SetDeadline for queued and issued reboots,
time passing with ticks), under a ladder drawn from every rung kind (agent reboots, kexec, the next-boot
methods, BMC power cycles), through ``cidd.core.machine.apply``, and a few jobs through
``cidd.core.captures.plan``/``settle`` the way the engine does: plan, then Switch the nodes to switch, then
settle the running captures after every step. After every step it checks the invariants of DESIGN.md §2-§3;
at the end it lets time run past every deadline without agent activity (a queued reboot gets its window slot)
and checks that no node is left waiting.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cidcommon.errors import BadRequest, Conflict
from cidd.core.captures import JOB_MEMORY_S, Capture, Result, plan, settle
from cidd.core.machine import SWITCHING, AlreadySwitching, Node, State, Step, apply, restore
from cidd.core.machine_types import (
    AGENT_METHODS,
    LADDER_METHODS,
    NEXT_BOOT_METHODS,
    Connected,
    Disconnected,
    Installed,
    InstallReport,
    Policy,
    PowerOn,
    Reboot,
    Rung,
    RungFailed,
    SendInstall,
    SetBoot,
    SetDeadline,
    Switch,
    Tick,
)

NAMES = ("n0", "n1", "n2")
IMAGES = ("img-a-1", "img-b-1", "img-c-1")
JOBS = ("j0", "j1", "j2", "j3")
BOOTS = ("b0", "b1", "b2", "b3")  # few boot ids, so that same-boot reconnects happen often
BOOT_OF = {State.TO_INSTALLER: "installer", State.TO_IMAGE: "disk"}
WAITING = (State.TO_INSTALLER, State.TO_IMAGE)  # the states whose reboot may wait for a window (no deadline)
#: Ladders of one to three rungs, each of any kind cidd knows (agent, next-boot and BMC methods).
LADDERS = st.lists(st.tuples(st.sampled_from(sorted(LADDER_METHODS)), st.sampled_from([50.0, 120.0])),
                   min_size=1, max_size=3)


def policy_of(ladder: list[tuple[str, float]]) -> Policy:
    """Return the group policy with ``ladder`` (next-boot methods get their boot entries)."""
    entries = {"installer": "cid-installer", "disk": "0003"} if {m for m, _ in ladder} & NEXT_BOOT_METHODS else {}
    return Policy(ladder=tuple(Rung(m, s) for m, s in ladder), install_timeout=200.0, install_attempts=2,
                  boot_entries=entries)


class Fleet(RuleBasedStateMachine):
    """Three nodes, a few jobs, and the clock."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.nodes = {name: Node(name) for name in NAMES}
        self.hello: dict[str, tuple[str, str | None] | None] = dict.fromkeys(NAMES)  # (mode, image) while online
        self.captures: dict[str, list[Capture]] = {}
        self.policy = policy_of([("reboot", 50.0), ("kexec", 120.0)])

    @initialize(ladder=LADDERS)
    def choose_ladder(self, ladder: list[tuple[str, float]]) -> None:
        self.policy = policy_of(ladder)

    @property
    def drain_rounds(self) -> int:
        return 2 * (len(self.policy.ladder) + self.policy.install_attempts) + 2

    # --- helpers ------------------------------------------------------------------------------------------

    def _apply(self, name: str, event) -> Step:
        old = self.nodes[name]
        s = apply(old, event, self.policy, self.now)
        self._check_step(old, s)
        self.nodes[name] = s.node
        self._settle_all()
        return s

    def _check_step(self, old: Node, s: Step) -> None:
        new = s.node
        assert new.name == old.name
        if old.state != new.state:
            assert s.transition is not None, f"{old.state} -> {new.state} without a history row"
            assert new.since == self.now
        if old.state in SWITCHING and new.state is State.READY:
            assert new.image == new.target == old.target, f"switch to {old.target} ended ready in {new.image}"
        if s.transition is not None:
            t = s.transition
            assert (t.node, t.from_state, t.to_state) == (old.name, old.state.value, new.state.value)
            # Leaving a switching state the row names the rung that ended it; a climb names the new rung.
            ended = old.rung if old.state != new.state and old.state in SWITCHING else new.rung
            assert (t.attempt, t.rung, t.job, t.image) == (new.attempt, ended, new.job, new.target)
            assert t.elapsed == max(0.0, self.now - old.since)
            assert t.detail
        for action in s.actions:
            if isinstance(action, SendInstall):
                assert new.state is State.INSTALLING and action.image == new.target
                assert action.attempt == new.attempt, "an install sent as another attempt than the node's"
            elif isinstance(action, SetBoot):
                assert new.state in BOOT_OF and action.boot == BOOT_OF[new.state] and new.rung == 0
            elif isinstance(action, Reboot):
                assert new.state in BOOT_OF and action.boot == BOOT_OF[new.state]
                assert action.method == self.policy.ladder[new.rung].method
                assert new.online or action.method not in AGENT_METHODS, "agent reboot sent to an offline node"
                assert new.reboot_from is not None
            elif isinstance(action, PowerOn):
                assert new.state in BOOT_OF and action.boot == BOOT_OF[new.state]
                assert not new.online and new.reboot_from is None, "power-on asked for a node with an agent"
            else:  # pragma: no cover - an unknown action kind
                raise AssertionError(f"unknown action {action!r}")

    def _running(self) -> list[Capture]:
        return [caps[-1] for caps in self.captures.values() if caps[-1].running]

    def _settle_all(self) -> None:
        for caps in self.captures.values():
            old = caps[-1]
            new = settle(old, {name: self.nodes[name] for name in old.nodes}, self.now)
            self._check_settled(old, new)
            caps[-1] = new

    def _check_settled(self, old: Capture, new: Capture) -> None:
        assert list(new.nodes) == list(old.nodes)
        if not old.running:
            assert new is old, "an ended capture changed"
            return
        for name, before in old.nodes.items():
            after = new.nodes[name]
            if before.result is not Result.PENDING:
                assert after == before, f"sticky result of {name} changed"
            elif after.result is Result.READY:
                node = self.nodes[name]
                assert node.state is State.READY and node.image == new.image, f"{name} recorded ready: {node}"
            elif after.result is Result.FAILED:
                assert self.nodes[name].state is State.FAILED
        if not new.running:
            assert new.ended == self.now

    # --- rules ----------------------------------------------------------------------------------------------

    @rule(job=st.sampled_from(JOBS), image=st.sampled_from(IMAGES),
          names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True),
          timeout=st.sampled_from([30.0, 300.0, 1000.0]))
    def capture(self, job: str, image: str, names: list[str], timeout: float) -> None:
        latest = self.captures[job][-1] if job in self.captures else None
        nodes = {name: self.nodes[name] for name in names}
        running = {c.job: c for c in self._running()}
        held = [n.name for n in nodes.values() if n.state in SWITCHING and n.target != image]
        held += [name for c in running.values() if c.job != job and c.image != image
                 for name in names if name in c.nodes]
        try:
            p = plan(job, image, names, "user", "test", timeout, latest, nodes, self.now, running)
        except Conflict:
            job_reused = latest is not None and latest.image != image and (
                latest.running or self.now - latest.ended < JOB_MEMORY_S)
            assert job_reused or held, "Conflict without a reason"
            return
        except BadRequest:
            assert latest is not None and latest.running and set(latest.nodes) != set(names)
            return
        if p.attached:
            assert latest is not None and latest.running and latest.image == image
            assert p.capture is latest and p.to_switch == ()
            return
        assert not held, f"plan accepted nodes held for another image: {held}"
        assert not (latest is not None and latest.running), "a second capture for a running job"
        for name, outcome in p.capture.nodes.items():
            node = self.nodes[name]
            if outcome.result is Result.READY:
                assert node.state is State.READY and node.image == image
            joined = node.state in SWITCHING and node.target == image
            assert (name in p.to_switch) == (outcome.result is Result.PENDING and not joined)
        for name in p.to_switch:
            self._apply(name, Switch(image, job))  # AlreadySwitching here would be a plan bug
        self.captures.setdefault(job, []).append(p.capture)
        self._settle_all()

    @rule(name=st.sampled_from(NAMES), image=st.sampled_from(IMAGES))
    def raw_switch(self, name: str, image: str) -> None:
        node = self.nodes[name]
        if node.state in SWITCHING and node.target != image:
            with pytest.raises(AlreadySwitching):
                apply(node, Switch(image, "raw"), self.policy, self.now)
            return
        s = self._apply(name, Switch(image, "raw"))
        if node.state in SWITCHING or (node.state is State.READY and node.image == image):
            assert s == Step(node)  # join / already there
        elif node.online and node.mode == "system" and node.image == image:
            assert s.node.state is State.READY and s.actions == ()  # a failed node that runs the image
        else:
            assert s.node.state in SWITCHING and s.node.target == image

    @rule(name=st.sampled_from(NAMES), boot=st.sampled_from(BOOTS), mode=st.sampled_from(["system", "installer"]),
          image=st.sampled_from((*IMAGES, None)))
    def connect(self, name: str, boot: str, mode: str, image: str | None) -> None:
        if mode == "installer":
            image = None
        self.hello[name] = (mode, image)
        self._apply(name, Connected(boot, mode, image))

    @rule(name=st.sampled_from(NAMES), boot=st.sampled_from(BOOTS))
    def agent_follows(self, name: str, boot: str) -> None:
        """The node does what it was asked (the happy path, to reach the deep states often)."""
        node = self.nodes[name]
        if node.state is State.TO_INSTALLER:
            self.hello[name] = ("installer", None)
            self._apply(name, Connected(boot, "installer", None))
        elif node.state is State.INSTALLING:
            self._apply(name, Installed(node.target, True))
        elif node.state is State.TO_IMAGE:
            self.hello[name] = ("system", node.target)
            self._apply(name, Connected(boot, "system", node.target))

    @rule(name=st.sampled_from(NAMES), boot=st.sampled_from(BOOTS), image=st.sampled_from((*IMAGES, None)),
          installer=st.booleans())
    def agent_strays(self, name: str, boot: str, image: str | None, installer: bool) -> None:
        """A switching node boots something else than what it was asked (its old disk, another image...)."""
        node = self.nodes[name]
        if node.state not in SWITCHING:
            return
        if installer and node.state is not State.TO_INSTALLER:
            self.hello[name] = ("installer", None)
            self._apply(name, Connected(boot, "installer", None))
        elif image != node.target:
            self.hello[name] = ("system", image)
            self._apply(name, Connected(boot, "system", image))

    @rule(name=st.sampled_from(NAMES), boot=st.sampled_from(BOOTS), same_boot=st.booleans(),
          state=st.sampled_from(["running", "ok", "failed"]), attempt_delta=st.sampled_from([0, -1, None]),
          right_image=st.booleans(), other=st.sampled_from(IMAGES))
    def installer_reconnects_with_a_report(self, name: str, boot: str, same_boot: bool, state: str,
                                           attempt_delta: int | None, right_image: bool, other: str) -> None:
        """An installer says hello with what it holds in its boot (running, finished, of this or an older
        attempt, of this image or another): an install is never sent over one it reports for this attempt."""
        node = self.nodes[name]
        image = node.target if right_image and node.target else other
        attempt = None if attempt_delta is None else max(0, node.attempt + attempt_delta)
        report = InstallReport(image, state, attempt, None if state != "failed" else "disk error", True)
        boot_id = node.boot_id if same_boot and node.boot_id else boot
        self.hello[name] = ("installer", None)
        s = self._apply(name, Connected(boot_id, "installer", None, report))
        current = attempt in (None, node.attempt) and image == node.target
        if node.state is State.INSTALLING and boot_id == node.boot_id and current and state == "running":
            assert not any(isinstance(a, SendInstall) for a in s.actions), "install sent over a running one"
        if node.state is State.INSTALLING and boot_id == node.boot_id and current and state == "ok":
            assert s.node.state is not State.INSTALLING and not any(isinstance(a, SendInstall) for a in s.actions)

    @rule(name=st.sampled_from(NAMES), current=st.booleans(), queued=st.booleans(),
          delay=st.sampled_from([0.0, 10.0, 200.0]))
    def set_deadline(self, name: str, current: bool, queued: bool, delay: float) -> None:
        """The engine's reboot window: a reboot queued (no deadline) or issued (the rung's timeout from now),
        for the node's current step or for a step it has already left."""
        node = self.nodes[name]
        state = node.state.value if current else State.TO_IMAGE.value
        rung = node.rung if current else node.rung + 1
        s = self._apply(name, SetDeadline(state, rung, None if queued else self.now + delay))
        applies = node.state in WAITING and state == node.state.value and rung == node.rung
        assert s.transition is None and s.actions == ()
        if not applies:
            assert s.node == node, "a SetDeadline for another step changed the node"

    @rule(name=st.sampled_from(NAMES))
    def disconnect(self, name: str) -> None:
        self.hello[name] = None
        self._apply(name, Disconnected())

    @rule(name=st.sampled_from(NAMES), ok=st.booleans(), retry=st.booleans(), right_image=st.booleans(),
          other=st.sampled_from(IMAGES))
    def installed(self, name: str, ok: bool, retry: bool, right_image: bool, other: str) -> None:
        image = self.nodes[name].target if right_image and self.nodes[name].target else other
        self._apply(name, Installed(image, ok, None if ok else "disk error", retry))

    @rule(name=st.sampled_from(NAMES), ok=st.booleans())
    def late_installed_of_an_earlier_attempt(self, name: str, ok: bool) -> None:
        node = self.nodes[name]
        if node.target is None or node.attempt < 1:
            return
        s = self._apply(name, Installed(node.target, ok, None if ok else "disk error", True, node.attempt - 1))
        assert s == Step(node), "a report of an earlier attempt changed the node"

    @rule(name=st.sampled_from(NAMES))
    def rung_failed(self, name: str) -> None:
        self._apply(name, RungFailed("agent refused"))

    @rule()
    def cidd_restarts(self) -> None:
        """cidd restarts: records are loaded back through restore(); every agent session is gone."""
        for name, node in self.nodes.items():
            restored = restore(node)
            assert restored.state is (State.OFFLINE if node.state in (State.READY, State.IN_INSTALLER) else node.state)
            assert (restored.deadline, restored.target, restored.rung, restored.attempt) == (
                node.deadline, node.target, node.rung, node.attempt)
            self.nodes[name] = restored
            self.hello[name] = None
        self._settle_all()

    @rule(dt=st.sampled_from([0.0, 1.0, 20.0, 60.0, 130.0, 250.0, 2 * JOB_MEMORY_S]))
    def tick(self, dt: float) -> None:
        self.now += dt
        for name in NAMES:
            self._apply(name, Tick())
        self._settle_all()

    @precondition(lambda self: bool(self._running()))
    @rule()
    def tick_to_a_capture_deadline(self) -> None:
        self.now = min(c.deadline for c in self._running())
        for name in NAMES:
            self._apply(name, Tick())
        self._settle_all()

    @precondition(lambda self: any(n.state in SWITCHING for n in self.nodes.values()))
    @rule()
    def drain_now(self) -> None:
        self.drain()

    def drain(self) -> None:
        """Let time run past every deadline with no agent activity; every switch must end. A reboot that waits
        for the window (no deadline) gets its slot first, as the engine's window would give it."""
        for _ in range(self.drain_rounds):
            for name, node in self.nodes.items():
                if node.state in WAITING and node.deadline is None:
                    timeout = self.policy.ladder[node.rung].timeout
                    self._apply(name, SetDeadline(node.state.value, node.rung, self.now + timeout))
            deadlines = [n.deadline for n in self.nodes.values() if n.deadline is not None]
            if not deadlines:
                break
            self.now = max(self.now, max(deadlines))
            for name in NAMES:
                self._apply(name, Tick())
        stuck = {n.name: n.state.value for n in self.nodes.values() if n.state in SWITCHING}
        assert not stuck, f"nodes still switching after {self.drain_rounds} rounds of ticks: {stuck}"
        self._settle_all()
        assert not self._running(), "a capture still runs though none of its nodes is switching"

    def teardown(self) -> None:
        self.drain()

    # --- invariants -----------------------------------------------------------------------------------------

    @invariant()
    def nodes_are_consistent(self) -> None:
        for name, node in self.nodes.items():
            hello = self.hello[name]
            assert node.online == (hello is not None)
            if node.state in SWITCHING:
                assert node.target is not None
                assert node.deadline is not None or node.state in WAITING, (
                    f"{name} {node.state.value} without a deadline (only a reboot queued for a window may be)")
            else:
                assert node.deadline is None
            if node.state is State.READY:
                assert hello == ("system", node.image), f"{name} ready in {node.image}, agent said {hello}"
            if node.state is State.IN_INSTALLER:
                assert hello is not None and hello[0] == "installer"
            if node.state is State.FAILED:
                assert node.reason
            if node.online:
                assert node.mode == hello[0]

    @invariant()
    def captures_are_consistent(self) -> None:
        switching_for: dict[str, set[str]] = {}
        held_for: dict[str, set[str]] = {}
        for capture in self._running():
            assert self.now < capture.deadline, "a running capture outlived its deadline"
            for name, outcome in capture.nodes.items():
                held_for.setdefault(name, set()).add(capture.image)
                if outcome.result is Result.PENDING:
                    node = self.nodes[name]
                    assert node.state in SWITCHING and node.target == capture.image, (
                        f"{name} pending in {capture.job} ({capture.image}) but {node.state} to {node.target}")
                    switching_for.setdefault(name, set()).add(capture.image)
        for name, images in switching_for.items():
            assert len(images) == 1, f"{name} switching for {images} by running captures at once"
        for name, images in held_for.items():
            assert len(images) == 1, f"{name} held for {images} by running captures at once"


Fleet.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
TestFleet = Fleet.TestCase
