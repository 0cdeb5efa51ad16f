"""The engine: feeds events to the node machines, persists each step, then acts (journal pattern).

It owns the node records, the running captures, the per-node deadline timers and the capture watchers.
It never touches sockets: agent commands go through an ``AgentLink`` (cidd.sessions), and time comes from
an injected ``IReactorTime`` so tests drive it with ``twisted.internet.task.Clock``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

import structlog
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from cidcatalog.catalog import Catalog, load_catalog, without_missing_files
from cidcommon.errors import CidError, UnknownImage, UnknownNode
from cidcommon.hostlists import collect
from cidcommon.vocabulary import Mode
from cidd.agent_messages import install_command
from cidd.config import Config
from cidd.core import captures as caps
from cidd.core.captures import Capture, Plan
from cidd.core.machine import Node, State, Step, apply, restore
from cidd.core.machine_types import (
    Cancel,
    Connected,
    Disconnected,
    Event,
    Installed,
    InstallReport,
    PowerOn,
    Reboot,
    RungFailed,
    SendInstall,
    SetBoot,
    Switch,
    Tick,
)
from cidd.distribution import Distributor
from cidd.images_http import image_dir_of, image_path
from cidd.netboot import Netboot
from cidd.power import PowerController
from cidd.rebooter import Rebooter
from cidd.store import Store

log = structlog.get_logger(__name__)

Watcher = Callable[[dict[str, Any]], None]


class SessionClosed(CidError):
    """A command's session closed before the agent answered; not a failure of the command by itself."""

    code = "session_closed"


class CommandTimeout(SessionClosed):
    """An agent did not answer a command in time; its session was dropped as half-open. Not a refusal: the
    agent's next hello says what it holds (an install running or done), and the step's deadline still applies."""

    code = "command_timeout"


class AgentLink(Protocol):
    """How the engine reaches agents (implemented by cidd.sessions.Sessions)."""

    def command(self, node: str, message: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Send a request to ``node``'s agent; the Deferred fires with the reply or fails with the reason.

        It fails with SessionClosed when the session closed before the answer.
        """


class EngineObserver(Protocol):
    """Told of what the engine did, after it was committed (metrics, statistics: cidd/observe.py, cidd/history.py).

    An observer must not call back into the engine; what it raises is logged and ignored.
    """

    def transition(self, step: Step, now: float) -> None:
        """A step with a history row was committed (and logged)."""

    def capture_ended(self, capture: Capture, now: float) -> None:
        """A capture ended (ok, failed or deadline)."""

    def progress(self, name: str, message: dict[str, Any]) -> None:
        """The installer on node ``name`` reported progress."""


class Engine:
    """Node machines, captures and timers of one cidd."""

    def __init__(self, config: Config, catalog: Catalog, store: Store, clock: IReactorTime, link: AgentLink,
                 power: PowerController | None = None) -> None:
        self.config = config
        self.catalog = catalog
        self.store = store
        self.clock = clock
        self.link = link
        self.power = power
        self.groups: dict[str, str] = config.inventory()
        self.nodes: dict[str, Node] = {}
        self.health: dict[str, tuple[float, dict[str, Any]]] = {}
        self.captures: dict[str, Capture] = {}  # running captures by job
        self._node_jobs: dict[str, set[str]] = {}
        self._watchers: dict[str, list[Watcher]] = {}
        self._timers: dict[str, IDelayedCall] = {}
        self._capture_timers: dict[str, IDelayedCall] = {}
        self.netboot = Netboot(config, store, clock)
        self._inbox: deque[tuple[str, Event]] = deque()  # events raised while a step acts (see handle)
        self._draining = False
        self._stopped = False
        self.reboots = Rebooter(self)  # reboot windows, agent reboots, BMC power (docs/power.md)
        self.reboot_window, self.power_window = self.reboots.window, self.reboots.power_window
        self.observers: list[EngineObserver] = []  # added by the service tree (cidd/service.py)
        # multicast image distribution of the groups that ask for it (docs/distribution.md)
        self.distributor = Distributor(config, clock, image_dir_of(config), self._send_distributed)

    # --- start-up ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Load nodes and running captures, collapse live-only states, re-arm every deadline."""
        stored = self.store.load_nodes()
        now = self.clock.seconds()
        with self.store.transaction():
            for name in self.groups:
                stored.setdefault(name, Node(name))
            for name, node in stored.items():
                self.nodes[name] = restore(node, now, self.config.restart_grace)
                self.store.save_node(self.nodes[name])
        for name, node in self.nodes.items():
            self._arm(name, node)
        for capture in self.store.running_captures():
            self._track(capture)
        self.netboot.load()
        now = self.clock.seconds()
        with self.store.transaction():
            for job in list(self.captures):
                self._settle(job, {}, now)
        self.reboots.requeue()
        log.info("engine.started", nodes=len(self.nodes), captures=len(self.captures))

    def stop(self) -> None:
        """Stop taking steps (cidd is stopping): cancel every deadline timer; later events are ignored.

        Every step taken so far was committed before its actions ran, so the database holds all of them.
        """
        self._stopped = True
        for timer in [*self._timers.values(), *self._capture_timers.values()]:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._capture_timers.clear()
        self.distributor.stop()
        log.info("engine.stopped", nodes=len(self.nodes), captures=len(self.captures), queued=len(self._inbox))

    # --- agents ------------------------------------------------------------------------------------

    def known(self, name: str) -> bool:
        """Return whether ``name`` is in the inventory (or registered itself)."""
        return name in self.nodes

    def register(self, name: str) -> bool:
        """Add ``name`` to the nodes if the inventory allows it; return whether the node is known now."""
        if name in self.nodes:
            return True
        if not self.config.auto_register:
            return False
        node = Node(name, since=self.clock.seconds())
        self.store.save_node(node)
        self.nodes[name] = node
        log.info("node.registered", node=name)
        return True

    def agent_connected(self, name: str, boot_id: str, mode: str, image: str | None,
                        install: InstallReport | None = None) -> None:
        """An agent's hello was accepted (``install``: what an installer holds in this boot)."""
        self.health[name] = (self.clock.seconds(), {})
        self.handle(name, Connected(boot_id, Mode(mode), image, install))

    def agent_lost(self, name: str) -> None:
        """The current session of ``name`` closed."""
        self.handle(name, Disconnected())

    def heartbeat(self, name: str, figures: dict[str, Any]) -> None:
        """Record a heartbeat's health figures."""
        self.health[name] = (self.clock.seconds(), figures)

    def installed(self, name: str, event: Installed) -> None:
        """The installer on ``name`` reported the end of an install."""
        self.handle(name, event)

    def progress(self, name: str, message: dict[str, Any]) -> None:
        """Pass an installer's progress report to the observers and to the watchers of the node's captures."""
        self._observe("progress", name, message)
        for job in self._node_jobs.get(name, ()):
            self._notify(job, {"type": "progress", "job": job, "node": name, "step": message.get("step"),
                               "done": message.get("done"), "total": message.get("total"),
                               "rate": message.get("rate")})

    # --- the machine loop --------------------------------------------------------------------------

    def handle(self, name: str, event: Event) -> None:
        """Apply ``event`` to node ``name``: persist the step, then run its actions.

        Never re-entrant: an event raised while a step's actions run (a reboot window setting a deadline, a
        refused command) is queued and applied once the current step has finished acting, in arrival order.
        """
        if self._stopped:
            log.debug("engine.event_after_stop", node=name, kind=type(event).__name__)  # event= is structlog's
            return
        self._inbox.append((name, event))
        self._drain()

    def _drain(self) -> None:
        """Apply the queued events one by one (each persisted, then acted on), unless a step is acting now."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._inbox:
                name, event = self._inbox.popleft()
                now = self.clock.seconds()
                step = apply(self.nodes[name], event, self.config.policy(self.groups.get(name, "default")), now)
                if live_only(self.nodes[name], step):
                    self.nodes[name] = step.node  # nothing a restart would read back: no transaction, no fsync
                    continue
                self._commit({name: step}, now)
        finally:
            self._draining = False

    def _commit(self, steps: Mapping[str, Step], now: float, capture: Capture | None = None,
                cancelled: Capture | None = None) -> None:
        """Persist ``steps`` (and ``capture``, or the ``cancelled`` end of a running capture) in one transaction,
        then arm timers, notify and act."""
        with self.store.transaction():
            if capture is not None:
                capture = self.store.save_capture(capture)
                self._track(capture)
            for name, step in steps.items():
                if step.node != self.nodes[name]:
                    self.store.save_node(step.node)
                if step.transition is not None:
                    self.store.add_event(now, step.transition)
            for name, step in steps.items():
                self.nodes[name] = step.node
            changed = {name: step.node for name, step in steps.items() if step.transition is not None}
            jobs_of = {name: tuple(self._node_jobs.get(name, ())) for name in changed}
            touched = {job for jobs in jobs_of.values() for job in jobs}
            if cancelled is not None:  # ended here, not settled; its watchers still get the rows of its nodes
                touched.discard(cancelled.job)
                self.store.save_capture(cancelled)
                self.captures[cancelled.job] = cancelled
                self._finish(cancelled)
            for job in touched:
                self._settle(job, changed, now)
        for name, step in steps.items():
            if step.transition is not None:
                self._log_transition(step, jobs_of[name])
                self._observe("transition", step, now)
        for name in steps:  # after the log: a freed slot may issue another node's reboot at once
            self.reboots.leave(name, self.nodes[name])
        outer = not self._draining  # a commit of its own (a capture's plan): drain what its actions raise
        self._draining = True
        try:
            # The actions' own writes (the boot profiles of a 10,000-node capture) share one commit; the commands
            # they send to agents leave after it (Twisted writes to sockets once this call has returned).
            with self.store.transaction():
                for name, step in steps.items():
                    self._arm(name, self.nodes[name])  # a window may have changed the node's deadline meanwhile
                    for action in step.actions:
                        self._act(name, action)
        finally:
            if outer:
                self._draining = False
        if outer:
            self._drain()

    def _log_transition(self, step: Step, jobs: tuple[str, ...]) -> None:
        """Log a history row and send it to the watchers of ``jobs``."""
        t = step.transition
        assert t is not None
        log.info("node.transition", node=t.node, job=t.job, image=t.image, **{"from": t.from_state},
                 to=t.to_state, attempt=t.attempt, rung=t.rung, elapsed=round(t.elapsed, 3), detail=t.detail)
        for job in jobs:
            self._notify(job, {"type": "node", "job": job, "node": t.node, "from": t.from_state,
                               "to": t.to_state, "image": t.image, "attempt": t.attempt, "rung": t.rung,
                               "detail": t.detail, "reason": step.node.reason})

    def _arm(self, name: str, node: Node) -> None:
        """(Re-)schedule the Tick for ``node``'s deadline, or cancel it when there is none."""
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()
        if node.deadline is not None:
            delay = max(0.0, node.deadline - self.clock.seconds())
            self._timers[name] = self.clock.callLater(delay, self.handle, name, Tick())

    def _act(self, name: str, action: object) -> None:
        """Carry out one action of a committed step."""
        if isinstance(action, Reboot):
            self.reboots.reboot(name, action)
        elif isinstance(action, SendInstall):
            policy = self.config.policy(self.groups.get(name, "default"))
            message = install_command(self.catalog, self.config.http_base, action.image, action.attempt, image_path,
                                      policy.resume_for)
            if not self.distributor.take(name, self.groups.get(name, "default"), message,
                                         self.catalog.get(action.image)):
                self.send_command(name, message, "installer refused the install")
        elif isinstance(action, SetBoot):
            self.netboot.set_boot(name, action.boot)
        elif isinstance(action, PowerOn):
            self.reboots.power_on(name, action.boot)

    def _send_distributed(self, name: str, message: dict[str, Any]) -> None:
        """Send an ``install`` the distributor held back, unless the node no longer waits for that attempt."""
        node = self.nodes.get(name)
        waiting = node is not None and node.state is State.INSTALLING and node.attempt == message.get("attempt")
        if self._stopped or not waiting:
            log.info("dist.install_dropped", node=name, image=message.get("image"),
                     state=node.state.value if node else None)
            return
        self.send_command(name, message, "installer refused the install")

    def step_failed(self, name: str, reason: str) -> Callable[[str], None]:
        """Return a function reporting a failure of the step ``name`` is in now (ignored once it moved on)."""
        node = self.nodes[name]
        state, rung = node.state.value, node.rung
        return lambda why: self.handle(name, RungFailed(f"{reason}: {why}", state, rung))

    def send_command(self, name: str, message: dict[str, Any], what: str) -> None:
        report = self.step_failed(name, what)

        def failed(failure: Any) -> None:
            if failure.check(CommandTimeout):  # not a refusal: the session was dropped; the agent's next hello
                log.warning("node.command_unanswered", node=name, command=message["type"],  # says where it is
                            reason=failure.getErrorMessage())
                return
            if failure.check(SessionClosed):
                return  # the node went down (to reboot, as asked); the step's deadline still applies
            log.warning("node.command_failed", node=name, command=message["type"], reason=failure.getErrorMessage())
            report(failure.getErrorMessage())

        self.link.command(name, message).addErrback(failed)

    # --- captures ----------------------------------------------------------------------------------

    def capture(self, job: str, names: list[str], image: str, user: str | None, requester: str,
                timeout: float | None, reattach: bool = False) -> Plan:
        """Create or re-attach to the capture of ``job``; return its Plan (``reattach``: the client re-sends its
        request after a lost session, so a capture of the job cancelled meanwhile is returned, not started anew).

        Raises UnknownImage, UnknownNode, Conflict or BadRequest (nothing was started in that case).
        """
        if image in self.catalog.unavailable:
            raise UnknownImage(f"image '{image}' cannot be installed: {self.catalog.unavailable[image]}; "
                               "nothing was started")
        if image not in self.catalog:
            hint = ", ".join(self.catalog.suggestions(image)) or "none"
            raise UnknownImage(f"unknown image '{image}'; close matches: {hint}; "
                               "see 'images.yaml' for the catalog")
        unknown = [name for name in names if name not in self.nodes]
        if unknown:
            raise UnknownNode(f"unknown node(s) {collect(unknown)}: not in the inventory and never connected; "
                              "check the hostlist or the 'nodes' section of cidd.yaml")
        now = self.clock.seconds()
        latest = self.latest_capture(job)
        plan = caps.plan(job, image, names, user, requester, timeout or self.config.capture_timeout, latest,
                         {name: self.nodes[name] for name in names}, now, self.captures, reattach)
        if plan.attached:
            return plan
        steps: dict[str, Step] = {}
        for name in plan.to_switch:
            policy = self.config.policy(self.groups.get(name, "default"))
            steps[name] = apply(self.nodes[name], Switch(image, job), policy, now)
        self._commit(steps, now, capture=plan.capture)
        capture = self.captures.get(job) or self.store.latest_capture(job)
        log.info("capture.started", job=job, image=image, nodes=len(names), user=user, requester=requester,
                 switching=len(plan.to_switch), ready=plan.capture.counts()["ready"])
        assert capture is not None
        if not capture.running:  # every node already ran the image: it ended as it began
            log.info("capture.ended", job=job, image=image, state=capture.state.value, elapsed=0.0,
                     **capture.counts())
            self._observe("capture_ended", capture, now)
        return replace(plan, capture=capture)

    def latest_capture(self, job: str) -> Capture | None:
        """Return the running capture of ``job``, else its most recent one from the store, else None."""
        return self.captures.get(job) or self.store.latest_capture(job)

    def cancel(self, job: str, by: str) -> tuple[Capture, bool]:
        """Cancel the running capture of ``job`` on behalf of ``by`` (docs/state-machine.md, "Cancelling a capture").

        Each node whose switch only this capture wants gets the machine's Cancel: it leaves its switch when nothing
        of the image can be on its disk yet, else the switch goes on to its end. The capture ends ``cancelled``,
        with what becomes of each pending node, in the same transaction as the nodes' steps. Returns (the
        capture, whether it was already cancelled: a second cancel changes nothing). Raises NothingToCancel when
        the job has no capture or its capture ended otherwise.
        """
        capture = caps.cancellable(job, self.latest_capture(job))
        if not capture.running:
            return capture, True
        now = self.clock.seconds()
        steps: dict[str, Step] = {}
        for name in caps.to_cancel(capture, self.nodes, self.captures):
            policy = self.config.policy(self.groups.get(name, "default"))
            steps[name] = apply(self.nodes[name], Cancel(job, by), policy, now)
        left = {name: step.transition.detail for name, step in steps.items() if step.transition is not None}
        after = {name: steps[name].node if name in steps else self.nodes.get(name, Node(name))
                 for name in capture.nodes}
        cancelled = caps.cancel(capture, by, after, left, self.captures, now)
        self._commit(steps, now, cancelled=cancelled)
        log.info("capture.cancelled", job=job, image=capture.image, by=by, nodes=len(capture.nodes),
                 left_switch=len(left), going_on=sum(1 for name in steps if name not in left),
                 **cancelled.counts())
        return cancelled, False

    def _track(self, capture: Capture) -> None:
        """Index a running capture by job and node, and arm its deadline."""
        if not capture.running:
            return
        self.captures[capture.job] = capture
        for name in capture.nodes:
            self._node_jobs.setdefault(name, set()).add(capture.job)
        timer = self._capture_timers.pop(capture.job, None)
        if timer is not None and timer.active():
            timer.cancel()
        delay = max(0.0, capture.deadline - self.clock.seconds())
        self._capture_timers[capture.job] = self.clock.callLater(delay, self._deadline, capture.job)

    def _deadline(self, job: str) -> None:
        with self.store.transaction():
            self._settle(job, {}, self.clock.seconds())

    def _settle(self, job: str, changed: Mapping[str, Node], now: float) -> None:
        """Record node outcomes in a running capture (inside a transaction); finish it when it ended."""
        capture = self.captures[job]
        relevant = {n: node for n, node in changed.items() if n in capture.nodes}
        updated = caps.settle(capture, relevant, now)
        if updated is capture:  # nothing changed (cheap: no comparison of every node's outcome)
            return
        self.store.save_node_results(updated, relevant)
        if updated.running:
            self.captures[job] = updated
            return
        self.store.save_capture(updated)
        self._finish(updated)

    def _finish(self, capture: Capture) -> None:
        """Forget a capture that ended and tell its watchers."""
        del self.captures[capture.job]
        timer = self._capture_timers.pop(capture.job, None)
        if timer is not None and timer.active():
            timer.cancel()
        for name in capture.nodes:
            jobs = self._node_jobs.get(name)
            if jobs:
                jobs.discard(capture.job)
        counts = capture.counts()
        log.info("capture.ended", job=capture.job, image=capture.image, state=capture.state.value,
                 elapsed=round((capture.ended or 0) - capture.created, 3), **counts)
        self._observe("capture_ended", capture, capture.ended or self.clock.seconds())
        self.clock.callLater(0, self._notify_done, capture)

    def _notify_done(self, capture: Capture) -> None:
        self._notify(capture.job, {"type": "done", **self.describe(capture)})
        self._watchers.pop(capture.job, None)

    def watch(self, job: str, watcher: Watcher) -> Callable[[], None]:
        """Send the events of ``job``'s capture to ``watcher``; return a function that stops it."""
        self._watchers.setdefault(job, []).append(watcher)

        def unwatch() -> None:
            watchers = self._watchers.get(job, [])
            if watcher in watchers:
                watchers.remove(watcher)

        return unwatch

    def _observe(self, hook: str, *args: Any) -> None:
        """Call ``hook`` of every observer with ``args``; log what one raises and go on."""
        for observer in self.observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                log.exception("engine.observer_failed", hook=hook, observer=type(observer).__name__)

    def _notify(self, job: str, message: dict[str, Any]) -> None:
        for watcher in list(self._watchers.get(job, ())):
            watcher(message)

    # --- catalog -----------------------------------------------------------------------------------

    def reload_catalog(self) -> Catalog:
        """Read the catalog again and make it active at once; return it.

        Raises CatalogError (listing every problem) and keeps the active catalog when the file is wrong.
        Running captures keep going: an image they use stays known to them by id.
        """
        try:
            catalog = read_catalog(self.config)
        except Exception as exc:
            log.error("catalog.reload_refused", path=str(self.config.catalog), problems=str(exc).splitlines())
            raise
        self.catalog = catalog
        log.info("catalog.reloaded", path=str(self.config.catalog), images=len(catalog))
        return catalog

    # --- views -------------------------------------------------------------------------------------

    def describe(self, capture: Capture) -> dict[str, Any]:
        """Return the JSON view of a capture with each node's state (docs/protocol.md)."""
        nodes = {}
        for name, outcome in capture.nodes.items():
            node = self.nodes.get(name, Node(name))
            state = node.state.value
            if outcome.result is caps.Result.READY:
                state = State.READY.value
            elif outcome.result is caps.Result.FAILED:
                state = State.FAILED.value
            nodes[name] = {"state": state, "image": node.image, "reason": outcome.reason or (
                node.reason if state == State.FAILED.value else None)}
        return {"job": capture.job, "image": capture.image, "state": capture.state.value, "user": capture.user,
                "created": capture.created, "deadline": capture.deadline, "ended": capture.ended,
                "cancelled_by": capture.cancelled_by, "nodes": nodes}

    def node_status(self, name: str) -> dict[str, Any]:
        """Return the JSON view of one node (docs/protocol.md, ``status``)."""
        node = self.nodes[name]
        seen, figures = self.health.get(name, (None, {}))
        return {"node": name, "state": node.state.value, "image": node.image, "target": node.target,
                "job": node.job, "online": node.online, "mode": node.mode, "last_seen": seen,
                "reason": node.reason, "attempt": node.attempt, "rung": node.rung, "deadline": node.deadline,
                "health": figures, "reboot": self.reboots.state(name), "distribution": self.distributor.view(name)}


def live_only(node: Node, step: Step) -> bool:
    """Return whether ``step`` only changes what a restart forgets anyway (``restore`` resets the session's
    ``online`` and ``mode``) and has no history row and no action: such a step needs no transaction (an agent
    that drops its session to reboot, twice per node in a switch, costs no fsync)."""
    return (step.transition is None and not step.actions
            and replace(step.node, online=node.online, mode=node.mode) == node)


def read_catalog(config: Config) -> Catalog:
    """Return the catalog named by ``config``: an absent one is empty (logged as a warning, so that cidd can
    start before the first image is made). An entry whose file is missing from the image directory, or has
    another size, is left out (logged as an error; ``catalog.unavailable`` says why), so that no node is ever
    told to install it; ``cidd check-config`` reports it as an error.

    Raises CatalogError with every problem when the file cannot be read or is wrong.
    """
    if not config.catalog.exists():
        log.warning("catalog.missing", path=str(config.catalog), configured=config.catalog_required,
                    hint="no images yet: cid-mkimg writes the catalog and its first image")
        return Catalog({})
    catalog, problems = without_missing_files(load_catalog(config.catalog), image_dir_of(config),
                                              str(config.catalog))
    for problem in problems:
        log.error("catalog.image_unavailable", path=str(config.catalog), problem=problem.message)
    return catalog
