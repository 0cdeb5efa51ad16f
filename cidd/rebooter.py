"""Carrying out the machine's Reboot and PowerOn actions: reboot windows, agent reboot requests, BMC power.

The engine owns one ``Rebooter``. A node holds a reboot slot (cidd.core.windows) from the issue of its rung's
reboot until it leaves that step; a queued reboot has no deadline (``SetDeadline(None)``) and its rung's
timeout, grown by ``windows.timeout_per_node`` per node in flight, counts from the real issue. BMC actions
hold a power slot while their calls run. See docs/power.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog
from twisted.internet.interfaces import IReactorTime

from cidcatalog.catalog import Catalog
from cidcommon.errors import CidError
from cidcommon.vocabulary import RebootMethod
from cidd.config import Config
from cidd.core.machine import Node, State
from cidd.core.machine_types import POWER_METHODS, Event, Policy, Reboot, RungFailed, SetDeadline
from cidd.core.windows import Window
from cidd.images_http import image_dir_of
from cidd.netboot import Netboot, image_boot, uefi_boot_uri
from cidd.power import BmcTarget, PowerController
from cidd.reboots import reboot_message

log = structlog.get_logger(__name__)


class RebootHost(Protocol):
    """The small view of the engine that the Rebooter works through (the engine passes itself).

    ``handle`` queues an event for a node's machine: the engine applies it after the step it is acting on,
    never in the middle of it. ``send_command`` sends an agent command and reports a refusal as the step's
    failure; ``step_failed`` returns such a reporter for later use.
    """

    config: Config
    clock: IReactorTime
    nodes: Mapping[str, Node]
    groups: Mapping[str, str]
    netboot: Netboot
    catalog: Catalog
    power: PowerController | None

    def handle(self, name: str, event: Event) -> None: ...

    def send_command(self, name: str, message: dict[str, Any], what: str) -> None: ...

    def step_failed(self, name: str, reason: str) -> Callable[[str], None]: ...



class Rebooter:
    """The reboot and power windows of one engine, and the actions that go through them."""

    def __init__(self, engine: RebootHost) -> None:
        self.engine = engine
        self.window = Window("reboots", engine.config.windows.reboots)
        self.power_window = Window("power", engine.config.windows.power)
        self._reboot_step: dict[str, tuple[str, int]] = {}  # node -> (state, rung) its reboot slot is for
        self._issued: set[str] = set()  # nodes whose current step's reboot was issued (deadline set)
        self._power_seq = 0

    def requeue(self) -> None:
        """Rebuild the windows after a restart (called by Engine.start).

        Nodes whose reboot was issued hold their slot again; those whose reboot waited for a window (no
        deadline) get it back: a power rung is queued again, an agent rung gets its timeout and is sent when
        the agent says hello.
        """
        for name, node in list(self.engine.nodes.items()):
            if node.state not in (State.TO_INSTALLER, State.TO_IMAGE):
                continue
            if node.deadline is not None:
                if node.reboot_from is not None:
                    self._reboot_step[name] = (node.state.value, node.rung)
                    self._issued.add(name)
                    self.window.request(name, lambda: None)
                continue
            policy = self._policy(name)
            rung = policy.ladder[min(node.rung, len(policy.ladder) - 1)]
            boot = "installer" if node.state is State.TO_INSTALLER else "disk"
            if rung.method in POWER_METHODS:
                self.reboot(name, Reboot(boot, rung.method))
            else:  # an agent rung: sent again when the agent connects; meanwhile the rung's timeout runs
                deadline = self.engine.clock.seconds() + rung.timeout
                self.engine.handle(name, SetDeadline(node.state.value, node.rung, deadline))

    def _policy(self, name: str) -> Policy:
        """Return the policy of ``name``'s group."""
        return self.engine.config.policy(self.engine.groups.get(name, "default"))

    def leave(self, name: str, node: Node) -> None:
        """Free ``name``'s reboot slot (or queued reboot) once the node left the step it was for."""
        held = self._reboot_step.get(name)
        if held is not None and held != (node.state.value, node.rung):
            del self._reboot_step[name]
            self._issued.discard(name)
            self.window.release(name)

    def reboot(self, name: str, action: Reboot) -> None:
        """Issue ``action`` through the reboot window: now if a slot is free, else when one frees up.

        A queued reboot has no deadline (SetDeadline None); the rung's timeout counts from the real issue.
        """
        node = self.engine.nodes[name]
        step = (node.state.value, node.rung)
        self._reboot_step[name] = step
        if not self.window.request(name, lambda: self._issue(name, step, action)):
            log.info("node.reboot_queued", node=name, method=action.method, boot=action.boot,
                     in_flight=self.window.in_flight, waiting=self.window.waiting)
            self.engine.handle(name, SetDeadline(step[0], step[1], None))

    def _issue(self, name: str, step: tuple[str, int], action: Reboot) -> None:
        """Carry out a reboot that got its slot; the first issue of a step (re)starts its deadline."""
        node = self.engine.nodes[name]
        if (node.state.value, node.rung) != step:
            self.leave(name, node)
            return
        first = name not in self._issued
        self._issued.add(name)
        in_flight = self.window.in_flight
        if action.method in POWER_METHODS:
            self._power_rung(name, action.boot, action.method, step, first)
            return
        if first:
            self._start_deadline(name, step, in_flight)
        if not node.online:  # it went away while queued: sent when its agent says hello again (same boot)
            log.info("node.reboot_waits_for_agent", node=name, method=action.method, boot=action.boot)
            return
        log.info("node.reboot_issued", node=name, method=action.method, boot=action.boot, in_flight=in_flight,
                 window=self.window.limit)
        token = self.engine.netboot.tokens.get(name, (None, 0.0))[0]
        image = None
        if action.boot != "installer":
            image = image_boot(self.engine.config, self.engine.catalog, image_dir_of(self.engine.config),
                               node.target if node.state is State.TO_IMAGE else node.image)
        message, note = reboot_message(self.engine.config, self._policy(name), name, action.boot, action.method,
                                       token, image)
        if note:
            log.info("node.reboot_method_replaced", node=name, method=action.method, reason=note)
        self.engine.send_command(name, message, f"agent refused {message['method']} into {action.boot}")

    def _start_deadline(self, name: str, step: tuple[str, int], in_flight: int) -> None:
        """Set the step's deadline: the rung's timeout plus ``windows.timeout_per_node`` per node in flight."""
        node = self.engine.nodes[name]
        policy = self._policy(name)
        timeout = policy.ladder[node.rung].timeout + self.engine.config.windows.timeout_per_node * in_flight
        deadline = self.engine.clock.seconds() + timeout
        if node.deadline != deadline:
            self.engine.handle(name, SetDeadline(step[0], step[1], deadline))

    def _power_slot(self, name: str, start: Callable[[Callable[[], None]], None]) -> bool:
        """Run ``start(done)`` when a power slot is free; ``done`` frees it. Returns whether it started now."""
        self._power_seq += 1
        key = (name, self._power_seq)
        return self.power_window.request(key, lambda: start(lambda: self.power_window.release(key)))

    def _power_rung(self, name: str, boot: str, method: str, step: tuple[str, int] | None = None,
                    first: bool = True) -> None:
        """Carry out power rung ``method`` on ``name`` through a power slot; the step's deadline starts when the BMC
        call does."""
        if step is None:
            node = self.engine.nodes[name]
            step = (node.state.value, node.rung)

        def start(done: Callable[[], None]) -> None:
            if (self.engine.nodes[name].state.value, self.engine.nodes[name].rung) != step:
                done()
                return
            if first:
                self._start_deadline(name, step, self.window.in_flight)
            log.info("node.reboot_issued", node=name, method=method, boot=boot,
                     in_flight=self.window.in_flight, window=self.window.limit,
                     power_in_flight=self.power_window.in_flight)
            self._bmc_rung(name, boot, method, done)

        if not self._power_slot(name, start):
            log.info("node.power_queued", node=name, waiting=self.power_window.waiting)
            if first:
                self.engine.handle(name, SetDeadline(step[0], step[1], None))

    def _bmc_rung(self, name: str, boot: str, method: str, done: Callable[[], None]) -> None:
        """Make ``name`` boot ``boot`` through its BMC (IPMI or Redfish); a failure climbs the ladder.

        ``power_cycle``: set the next boot device (network for the installer, default for the disk), then
        power-cycle (on when off). ``redfish_boot_installer``: one call that sets a one-time boot override
        (UefiHttp with cidd's UEFI HTTP boot URI where the BMC offers it, else Pxe; Hdd for the disk) and resets.
        """
        power = self.engine.power
        if power is None:
            done()
            self.engine.handle(name, RungFailed(f"{method} needs BMC access; configure the 'bmc' section"))
            return
        try:
            target = power.target(name)
        except CidError as exc:
            done()
            self.engine.handle(name, RungFailed(exc.message))
            return
        report = self.engine.step_failed(name, f"{method} failed")
        if method == RebootMethod.REDFISH_BOOT_INSTALLER:
            if target.protocol != "redfish":
                done()
                self.engine.handle(name, RungFailed(f"{method} needs a Redfish BMC; {name}'s BMC "
                                                    f"({target.address}) is {target.protocol}"))
                return
            uri = uefi_boot_uri(self.engine.config, name) if boot == "installer" else None
            log.info("node.redfish_boot", node=name, bmc=target.address, boot=boot, http_boot_uri=uri)
            d = power.boot_once(name, target, boot, uri)
            d.addCallback(lambda chosen: log.info("node.redfish_boot_set", node=name, bmc=target.address, boot=boot,
                                                  override=chosen))
        else:
            device = "network" if boot == "installer" else "default"
            log.info("node.power_cycle", node=name, bmc=target.address, boot=boot)
            d = power.set_next_boot(name, target, device)
            d.addCallback(lambda _: power.cycle(name, target))

        def failed(failure: Any) -> None:
            log.warning("node.power_failed", node=name, bmc=target.address, method=method,
                        reason=failure.getErrorMessage())
            report(failure.getErrorMessage())

        d.addErrback(failed)
        d.addBoth(lambda _: done())

    def power_on(self, name: str, boot: str) -> None:
        """Power on a node that is off, booting ``boot`` next; without BMC access, only wait for its agent."""
        power = self.engine.power
        if power is None:
            return
        try:
            target = power.target(name)
        except CidError as exc:
            log.warning("node.power_on_failed", node=name, reason=exc.message)
            return
        self._power_slot(name, lambda done: self._bmc_power_on(name, boot, target, power, done))

    def _bmc_power_on(self, name: str, boot: str, target: BmcTarget, power: PowerController,
                      done: Callable[[], None]) -> None:
        """Ask the BMC of ``name`` for its power state and power it on if it is off; ``done`` frees the slot."""

        def on_if_off(state: str) -> Any:
            if state != "off":
                return None  # on but silent: the ladder's timeout and its power rung deal with it
            log.info("node.power_on", node=name, bmc=target.address, boot=boot)
            d = power.set_next_boot(name, target, "network" if boot == "installer" else "default")
            return d.addCallback(lambda _: power.on(name, target))

        d = power.status(name, target).addCallback(on_if_off)
        d.addErrback(lambda f: log.warning("node.power_on_failed", node=name, bmc=target.address,
                                           reason=f.getErrorMessage()))
        d.addBoth(lambda _: done())

    def state(self, name: str) -> str | None:
        """Return "queued" (waiting for a reboot slot), "issued" (holding one) or None."""
        if self.window.queued(name):
            return "queued"
        return "issued" if self.window.holds(name) else None
