"""BMC power for cidd: status, on, off, cycle, reset, next boot device and one-time boots, off the reactor.

The BMC of a node is IPMI (pyghmi) or Redfish (sushy, cidd/redfish.py), per node group (cidd/bmc.py: the
targets, the session interface). The callers (the ladder, the power windows, ``cidcapt --power``, the console)
name a node; what is below is the same for both protocols.

Every BMC call runs on a small dedicated thread pool (never the reactor thread, never Twisted's shared pool), and
the caller's Deferred fails after ``call_timeout`` seconds whatever the BMC does. A scheduler on the reactor thread
decides which call goes next, so that dead BMCs fail only their own nodes (docs/power.md):

- at most ``max_concurrent`` calls hold a slot, and at most one call per BMC runs at a time (pyghmi's trap below
  needs that too); BMCs take turns (round robin), and BMCs whose last call got no answer come after the others;
- a running call gives up its slot when its caller gives up, or after ``YIELD_AFTER`` s without an answer (a
  live BMC answers in milliseconds, a dead one keeps pyghmi busy for about 5 s): it goes on in its thread, as IPMI
  has no cancel, and ``OVERDUE_FACTOR × max_concurrent`` such calls at most run at once;
- a per-BMC circuit breaker: after ``breaker_after`` calls in a row without an answer, calls to that BMC fail at
  once for ``breaker_cooldown`` s; then one call is tried (half-open) and its answer closes the breaker;
- a call still waiting when its caller gives up (timed out or cancelled) is never sent (a power cycle the ladder
  has given up on must not reach the node later), and its reason says it was never contacted and what it waited
  for, apart from "did not answer within S s" for a call that was sent.

Every call logs in, does its work and logs out (as ipmitool does). A session kept open between calls goes
stale when the BMC restarts or expires idle sessions (pyghmi only keeps a session alive while some thread is
inside its I/O loop, which cidd is not between calls): the next call then spent about 20 s in pyghmi's
retransmits before it logged in again, longer than a typical ``bmc.timeout``. A login costs a few round trips
(5-10 ms to ``ipmi_sim``), and no BMC session slot (BMCs have only a handful) stays taken by cidd.

pyghmi trap (see notes/real-components.md): a second ``Command`` to the same BMC in one process blocks forever
when user and password are ``str``. Here credentials are always ``bytes``, and the previous session to that BMC
is logged out before the next one starts (calls to the same BMC run one at a time).

pyghmi's shared I/O loop dies at the first socket numbered 1024 or more (``select()``), stays dead, loses wake-ups
when several threads wait at once (up to about a second per login step) and can stall on a socket left blocking;
``cidd.pyghmi_io.apply()`` replaces it before the first call.

The password never appears in a log event, an error message or a ``repr``.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import structlog
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from cidd import pyghmi_io
from cidd.bmc import (
    BOOT_DEVICES,
    DEFAULT_IPMI_PORT,
    REDFISH,
    BmcCredentials,
    BmcDirectory,
    BmcNoAnswer,
    BmcSession,
    BmcTarget,
    CallAbandoned,
    CredentialsError,
    IpmiSession,
    PowerError,
    bmc_address,
    ipmi_target,
    node_index,
    split_address,
)
from cidd.config_sections import BmcConfig

#: Re-exported: the BMC names callers and tests know from here (cidd/bmc.py defines them).
__all__ = ["BOOT_DEVICES", "DEFAULT_IPMI_PORT", "BmcCredentials", "BmcDirectory", "BmcTarget", "CredentialsError",
           "PowerController", "PowerError", "bmc_address", "node_index", "open_session", "split_address"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

BREAKER_AFTER = BmcConfig.breaker_after  # calls in a row without an answer that open a BMC's breaker
BREAKER_COOLDOWN = BmcConfig.breaker_cooldown  # seconds an open breaker refuses calls, then one is tried again
YIELD_AFTER = 2.0  # seconds after which a running call that has not answered stops holding its slot
OVERDUE_FACTOR = 3  # calls that gave up their slot and still run: at most this many times max_concurrent


@dataclass(eq=False)
class _Call:
    """One BMC call, from the moment it is asked for until its thread returns (reactor thread only)."""

    node: str
    target: BmcTarget
    action: str
    body: Callable[[BmcSession], Any]
    asked: float
    timeout: float  # the caller gives up at asked + timeout
    result: Deferred[Any] = field(init=False)
    abandoned: threading.Event = field(default_factory=threading.Event)  # set when the caller gave up
    state: str = "queued"  # queued -> running -> ended; dropped: its caller gave up before it was sent
    holds_slot: bool = False
    timer: Any = None  # the caller's deadline
    slot_timer: Any = None  # when a running call stops holding its slot (yield_after)

    @property
    def address(self) -> str:
        """Return the BMC address messages show."""
        return self.target.address

    @property
    def key(self) -> tuple[str, int]:
        """Return the scheduler key of the call's BMC."""
        return self.target.key


@dataclass(eq=False)
class _Bmc:
    """What the scheduler knows about one BMC address (reactor thread only)."""

    queue: deque[_Call] = field(default_factory=deque)  # calls not sent yet, in order
    busy: bool = False  # one of its calls runs in a thread (never more than one)
    has_turn: bool = False  # it is in one of the turn queues
    silent: int = 0  # calls in a row that got no answer
    open_until: float | None = None  # breaker open (calls refused) until then; None: closed


class PowerController:
    """BMC calls for cidd on a dedicated thread pool; every method returns a Deferred and never blocks.

    A node's BMC comes from ``directory`` (its group's settings: IPMI or Redfish, address pattern, credentials,
    timeout); an IPMI address given as a string uses ``credentials`` and ``call_timeout``. ``reactor`` provides
    the clock and the thread hand-off. Failures fail the
    Deferred with PowerError, whose message tells them apart: the BMC was never contacted (every slot busy, or an
    earlier call to it still running, until ``call_timeout``), it did not answer within ``call_timeout`` s, it is not
    called (its last ``breaker_after`` calls got no answer; for ``breaker_cooldown`` s), or it answered with an error
    (login refused, IPMI error).

    Scheduling: at most ``max_concurrent`` calls hold a slot, at most one call per BMC runs at a time, and BMCs take
    turns (round robin), those whose last call got no answer after the others. A running call gives up its slot when
    its caller gives up or after ``yield_after`` s without an answer; it goes on in its thread (IPMI has no cancel;
    a Redfish call sends no further request once its caller gave up), with at most ``OVERDUE_FACTOR ×
    max_concurrent`` such calls at once. ``command_factory(host, port, user, password)`` makes the pyghmi
    ``Command``; ``runner(key, work)`` runs one call's ``work()`` and returns its Deferred (default: in a pool
    thread); tests may pass either. ``in_flight`` is the number of calls holding a slot,
    ``running`` the number running in a thread, ``waiting`` the number not sent yet.
    """

    def __init__(self, credentials: BmcCredentials | None, reactor: Any, *, max_concurrent: int = 8,
                 call_timeout: float = 20, breaker_after: int = BREAKER_AFTER,
                 breaker_cooldown: float = BREAKER_COOLDOWN, yield_after: float | None = YIELD_AFTER,
                 command_factory: Callable[[str, int, bytes, bytes], Any] | None = None,
                 runner: Callable[[tuple[str, int], Callable[[], Any]], Deferred[Any]] | None = None,
                 directory: BmcDirectory | None = None) -> None:
        self._credentials = credentials
        self.directory = directory
        self._reactor = reactor
        self.max_concurrent = max(1, max_concurrent)
        self.call_timeout = call_timeout
        self.breaker_after = max(1, breaker_after)
        self.breaker_cooldown = breaker_cooldown
        self.yield_after = yield_after
        self.max_threads = self.max_concurrent * (1 + OVERDUE_FACTOR)
        self._factory = command_factory or _pyghmi_command
        self._runner = runner or self._run_on_pool
        self._pool = _DaemonThreadPool(minthreads=0, maxthreads=self.max_threads, name="cidd-power")
        self._bmcs: dict[tuple[str, int], _Bmc] = {}
        self._turns: deque[tuple[str, int]] = deque()  # BMCs with a call waiting and none running, in turn
        self._late_turns: deque[tuple[str, int]] = deque()  # the same, for BMCs whose last call got no answer
        self._dispatching = False
        self._again = False
        self._started = False
        self.in_flight = 0
        self.running = 0
        self.waiting = 0

    @classmethod
    def from_config(cls, credentials: BmcCredentials | None, reactor: Any, bmc: BmcConfig,
                    directory: BmcDirectory | None = None) -> PowerController:
        """Return a PowerController with the bounds of cidd.yaml's ``bmc`` section (docs/configuration.md) and the
        nodes' BMCs from ``directory`` (cidd.bmc.BmcDirectory.load)."""
        return cls(credentials, reactor, max_concurrent=bmc.max_concurrent, call_timeout=bmc.timeout,
                   breaker_after=bmc.breaker_after, breaker_cooldown=bmc.breaker_cooldown, directory=directory)

    # -- life cycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread pool (done on first use too)."""
        if not self._started:
            self._pool.start()
            self._started = True

    def stop(self, wait: float = 10.0) -> None:
        """Stop the thread pool, waiting at most ``wait`` s for running BMC calls to end.

        A call stuck inside pyghmi beyond that is abandoned (its thread is a daemon thread, so it never holds
        up the process's exit) and logged as ``power.stop_abandoned``.
        """
        if not self._started:
            return
        self._started = False
        stopper = threading.Thread(target=self._pool.stop, name="cidd-power-stop", daemon=True)
        stopper.start()
        stopper.join(wait)
        if stopper.is_alive():
            log.warning("power.stop_abandoned", in_flight=self.in_flight, running=self.running, waited=wait)

    # -- public calls -------------------------------------------------------------------------------------------

    def target(self, node: str, address: str | BmcTarget | None = None) -> BmcTarget:
        """Return the BMC of ``node``: ``address`` itself (a target, or an IPMI address with the controller's own
        credentials), else the one its group's settings name. Raises PowerError (no BMC, bad address pattern)."""
        if isinstance(address, BmcTarget):
            return address
        if address is not None:
            if self._credentials is None:
                raise PowerError(f"no BMC credentials for {node} at {address}")
            return ipmi_target(node, address, self._credentials)
        if self.directory is None:
            raise PowerError(f"{node} has no BMC: cidd has no 'bmc' section")
        return self.directory.target(node)

    def status(self, node: str, address: str | BmcTarget | None = None) -> Deferred[str]:
        """Return a Deferred firing with ``'on'`` or ``'off'`` (Redfish: also ``'powering on'``, ...); fails with
        PowerError."""
        return self._call(node, address, "status", lambda s: s.power_state())

    def on(self, node: str, address: str | BmcTarget | None = None) -> Deferred[None]:
        """Power ``node`` on (no-op when on); the Deferred fires when the BMC accepted it, or fails with PowerError."""
        return self._call(node, address, "on", lambda s: s.power_on())

    def off(self, node: str, address: str | BmcTarget | None = None) -> Deferred[str]:
        """Power ``node`` off; fires with how (IPMI ``off``: hard; Redfish ``graceful``, ``forced`` after
        ``off_timeout`` s, or ``already off``); fails with PowerError. A Redfish off has ``timeout + off_timeout``."""
        return self._call(node, address, "off", lambda s: s.power_off(), extra=_off_time)

    def cycle(self, node: str, address: str | BmcTarget | None = None) -> Deferred[None]:
        """Power cycle ``node`` (off, then on; just on when off); fires when accepted; fails with PowerError."""
        return self._call(node, address, "cycle", lambda s: s.power_cycle())

    def reset(self, node: str, address: str | BmcTarget | None = None) -> Deferred[None]:
        """Hard reset ``node`` (on when off); fires when the BMC accepted it; fails with PowerError."""
        return self._call(node, address, "reset", lambda s: s.reset())

    def set_next_boot(self, node: str, address: str | BmcTarget | None = None,
                      device: str = "network") -> Deferred[str]:
        """Set ``node``'s next boot (once) to ``'network'`` or ``'default'``; fires with what the BMC was told
        (IPMI: the device; Redfish: ``Pxe`` or ``Hdd``); fails with PowerError (at once for another device)."""
        if device not in BOOT_DEVICES:
            return _failed(PowerError(f"unknown boot device {device!r} for {node}; use 'network' or 'default'"))
        return self._call(node, address, f"next_boot_{device}", lambda s: s.set_next_boot(device))

    def boot_once(self, node: str, address: str | BmcTarget | None = None, boot: str = "installer",
                  http_uri: str | None = None) -> Deferred[str]:
        """Set a one-time boot into ``boot`` (``installer`` or ``disk``) and reset ``node``, in one call.

        Redfish: ``UefiHttp`` with ``http_uri`` where the BMC offers it (and the group allows it), else ``Pxe``;
        ``Hdd`` for the disk; ``BootSourceOverrideEnabled: Once``. IPMI: network (or default) boot, power cycle.
        Fires with what was set; fails with PowerError. Nothing is sent after the caller gave up, not even the
        reset once the override is set (Redfish).
        """
        return self._call(node, address, f"boot_once_{boot}", lambda s: s.boot_once(boot, http_uri))

    def mac_addresses(self, node: str, address: str | BmcTarget | None = None) -> Deferred[list[str]]:
        """Return a Deferred firing with the MAC addresses of ``node``'s NICs as its BMC lists them (Redfish
        EthernetInterfaces; IPMI has none: PowerError)."""
        return self._call(node, address, "mac_addresses", lambda s: s.mac_addresses())

    def console(self, node: str, address: str | BmcTarget | None, on_data: Callable[[bytes], None],
                on_close: Callable[[str | None], None], factory: Any = None) -> Any:
        """Return a started ``cidd.console.ConsoleRelay`` to the serial console of ``node``'s BMC.

        It runs on a thread of its own (not the pool: a console lasts as long as the admin stays). IPMI BMCs
        only (SOL): Redfish has no standard serial console. Raises PowerError for a malformed address, a node
        without BMC, or a Redfish BMC.
        """
        from cidd.console import ConsoleRelay

        target = self.target(node, address)
        if target.protocol == REDFISH:
            raise PowerError(f"BMC of {node} ({target.address}) is Redfish, which has no standard serial console; "
                             "use the BMC's own web or SSH console, or give the node's group an IPMI BMC for SOL")
        relay = ConsoleRelay(self._reactor, node, target.host, target.port, target.credentials.user.encode(),
                             target.credentials.password.encode(), on_data, on_close, factory=factory)
        relay.start()
        return relay

    def breaker_open(self, address: str | BmcTarget) -> bool:
        """Return True while calls to the BMC at ``address`` are refused (its breaker is open, not cooled down).

        Raises PowerError for a malformed address.
        """
        bmc = self._bmcs.get(address.key if isinstance(address, BmcTarget) else split_address(address))
        return bmc is not None and bmc.open_until is not None and self._reactor.seconds() < bmc.open_until

    # -- scheduling (reactor thread) ----------------------------------------------------------------------------

    def _call(self, node: str, address: str | BmcTarget | None, action: str, body: Callable[[BmcSession], T],
              extra: Callable[[BmcTarget], float] | None = None) -> Deferred[T]:
        """Queue ``body(session)`` for ``node``'s BMC; return its Deferred, bounded by the BMC's timeout (plus
        ``extra(target)`` s)."""
        try:
            target = self.target(node, address)
        except PowerError as exc:
            message = exc.message if address is None else f"{exc.message} for {node}; fix the BMC address pattern"
            return _failed(PowerError(message))
        address, key = target.address, target.key
        timeout = self.call_timeout if target.settings is None else target.settings.timeout
        timeout += extra(target) if extra is not None else 0.0
        self.start()
        now = self._reactor.seconds()
        bmc = self._bmcs.setdefault(key, _Bmc())
        if bmc.open_until is not None and now < bmc.open_until:
            log.info("power.refused", node=node, bmc=address, action=action, silent=bmc.silent,
                     retry_in=round(bmc.open_until - now, 1))
            return _failed(self._refusal(node, address, bmc, now))
        call = _Call(node, target, action, body, now, timeout)
        call.result = Deferred(lambda _: self._gave_up(call, "the caller cancelled it before it was sent"))
        call.timer = self._reactor.callLater(self.call_timeout, self._timed_out, call)
        bmc.queue.append(call)
        self.waiting += 1
        self._offer_turn(key, bmc)
        self._dispatch()
        return call.result

    def _offer_turn(self, key: tuple[str, int], bmc: _Bmc) -> None:
        """Put ``bmc`` at the end of its turn queue if it has a call waiting and none running."""
        if bmc.queue and not bmc.busy and not bmc.has_turn:
            bmc.has_turn = True
            (self._late_turns if bmc.silent else self._turns).append(key)

    def _next_turn(self) -> _Bmc | None:
        """Return the next BMC whose call may start (answering BMCs first), or None; forget idle ones met."""
        for turns in (self._turns, self._late_turns):
            while turns:
                key = turns.popleft()
                bmc = self._bmcs.get(key)
                if bmc is None or not bmc.has_turn:
                    continue
                bmc.has_turn = False
                if bmc.queue and not bmc.busy:
                    return bmc
                self._forget_if_idle(key, bmc)
        return None

    def _dispatch(self) -> None:
        """Start waiting calls while a slot and a thread are free (never re-entered: a nested call loops again)."""
        if self._dispatching:
            self._again = True
            return
        self._dispatching = True
        try:
            self._again = True
            while self._again:
                self._again = False
                while self.in_flight < self.max_concurrent and self.running < self.max_threads:
                    bmc = self._next_turn()
                    if bmc is None:
                        break
                    call = bmc.queue[0]
                    if self._reactor.seconds() >= call.asked + call.timeout:  # its deadline is now: not sent
                        self._timed_out(call)
                        self._offer_turn(call.key, bmc)
                        self._forget_if_idle(call.key, bmc)
                        continue
                    self._start(bmc, bmc.queue.popleft())
        finally:
            self._dispatching = False

    def _start(self, bmc: _Bmc, call: _Call) -> None:
        """Send ``call`` (its BMC's turn came and a slot is free): run it with the runner."""
        self.waiting -= 1
        self.in_flight += 1
        self.running += 1
        bmc.busy = True
        call.state = "running"
        call.holds_slot = True
        if bmc.open_until is not None:
            log.info("power.breaker_probe", node=call.node, bmc=call.address, action=call.action, silent=bmc.silent)
        if self.yield_after is not None:
            call.slot_timer = self._reactor.callLater(self.yield_after, self._overdue, call)
        seconds = max(0.1, call.asked + call.timeout - self._reactor.seconds())
        try:
            d = self._runner(call.key, lambda: self._in_thread(call.target, call.body, call.abandoned, seconds))
        except Exception:  # noqa: BLE001 - a runner that raises fails this call, never the scheduler
            d = fail(Failure())
        d.addBoth(self._finished, call)

    def _overdue(self, call: _Call) -> None:
        """``yield_after`` s passed without an answer: ``call`` runs on but gives its slot to the next call."""
        call.slot_timer = None
        if call.state == "running" and call.holds_slot:
            self._release_slot(call)
            log.info("power.slow", node=call.node, bmc=call.address, action=call.action, seconds=self.yield_after,
                     running=self.running)
            self._dispatch()

    def _release_slot(self, call: _Call) -> None:
        """Free the slot ``call`` holds, if it holds one."""
        if call.slot_timer is not None and call.slot_timer.active():
            call.slot_timer.cancel()
        call.slot_timer = None
        if call.holds_slot:
            call.holds_slot = False
            self.in_flight -= 1

    def _timed_out(self, call: _Call) -> None:
        """The caller's ``call_timeout`` passed: fail ``call`` with why (never sent, or sent and unanswered)."""
        call.timer = None
        if call.result.called:
            return
        if call.state == "queued":
            err = self._never_contacted(call)
            self._gave_up(call, err.message)
        else:
            err = PowerError(f"BMC of {call.node} ({call.address}) did not answer within {call.timeout:g} s; "
                             "check its network and credentials")
            log.warning("power.timeout", node=call.node, bmc=call.address, action=call.action, timeout=call.timeout)
            self._gave_up(call, err.message)
        call.result.errback(err)

    def _gave_up(self, call: _Call, reason: str) -> None:
        """The caller gave up on ``call`` (deadline or cancel): drop it if not sent yet, else free its slot."""
        call.abandoned.set()
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        call.timer = None
        if call.state == "queued":
            call.state = "dropped"
            bmc = self._bmcs[call.key]
            bmc.queue.remove(call)
            self.waiting -= 1
            log.info("power.skipped", node=call.node, bmc=call.address, action=call.action, reason=reason)
            self._forget_if_idle(call.key, bmc)
        elif call.state == "running":
            if call.target.protocol != REDFISH:  # end the pyghmi session its thread waits in (~30 s otherwise)
                pyghmi_io.discard_sessions_of(call.target.host, call.target.port)
            if call.holds_slot:
                self._release_slot(call)
                self._dispatch()

    def _never_contacted(self, call: _Call) -> PowerError:
        """Return the PowerError of a call still waiting at its deadline: what it waited for."""
        where = f"BMC of {call.node} ({call.address}) was never contacted"
        bmc = self._bmcs[call.key]
        if bmc.busy:
            return PowerError(f"{where}: an earlier call to this BMC had not ended after {call.timeout:g} s "
                              f"({_count(len(bmc.queue), 'call')} waiting for it); check the BMC's network")
        waiting = _count(self.waiting, "call")
        if self.running >= self.max_threads:
            return PowerError(f"{where}: BMC queue full ({waiting} waiting) for {call.timeout:g} s; all "
                              f"{self.running} BMC threads held by calls to BMCs that did not answer")
        return PowerError(f"{where}: BMC queue full ({waiting} waiting for {_count(self.max_concurrent, 'slot')}) "
                          f"for {call.timeout:g} s; raise bmc.max_concurrent or bmc.timeout")

    def _refusal(self, node: str, address: str, bmc: _Bmc, now: float) -> PowerError:
        """Return the PowerError of a call refused by ``bmc``'s open breaker."""
        left = (bmc.open_until or now) - now
        return PowerError(f"BMC of {node} ({address}) was not called: its last {bmc.silent} calls got no answer, "
                          f"so it is left alone for {self.breaker_cooldown:g} s (next try in {left:.0f} s); "
                          "check its network and power")

    def _finished(self, outcome: Any, call: _Call) -> None:
        """``call``'s thread returned ``outcome`` (a value or a Failure): settle the breaker, the caller, the queue."""
        now = self._reactor.seconds()
        seconds = round(now - call.asked, 3)
        call.state = "ended"
        self.running -= 1
        self._release_slot(call)
        bmc = self._bmcs[call.key]
        bmc.busy = False
        answered = not (isinstance(outcome, Failure) and _no_answer(outcome))
        abandoned = isinstance(outcome, Failure) and outcome.check(CallAbandoned) is not None
        refused = [] if abandoned else self._record(call, bmc, answered, now)
        self._offer_turn(call.key, bmc)
        self._forget_if_idle(call.key, bmc)
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        call.timer = None
        if abandoned:  # a Redfish call whose caller gave up: its next request was never sent
            log.info("power.abandoned", node=call.node, bmc=call.address, action=call.action, seconds=seconds,
                     unsent=str(outcome.value))
        elif call.result.called:
            log.info("power.late_answer", node=call.node, bmc=call.address, action=call.action, answered=answered,
                     seconds=seconds)
        elif isinstance(outcome, Failure):
            err = self._as_power_error(call, outcome, seconds)
            log.warning("power.failed", node=call.node, bmc=call.address, action=call.action, error=err.message)
            call.result.errback(err)
        else:
            log.info("power.done", node=call.node, bmc=call.address, action=call.action, seconds=seconds)
            call.result.callback(outcome)
        for waiting in refused:
            waiting.result.errback(self._refusal(waiting.node, waiting.address, bmc, now))
        self._dispatch()

    def _record(self, call: _Call, bmc: _Bmc, answered: bool, now: float) -> list[_Call]:
        """Count ``call``'s outcome for its BMC's breaker; return the waiting calls to refuse when it opened."""
        if answered:
            if bmc.open_until is not None:
                log.info("power.breaker_closed", node=call.node, bmc=call.address, silent=bmc.silent)
            bmc.silent = 0
            bmc.open_until = None
            return []
        bmc.silent += 1
        if bmc.silent < self.breaker_after:
            return []
        bmc.open_until = now + self.breaker_cooldown
        log.warning("power.breaker_open", node=call.node, bmc=call.address, silent=bmc.silent,
                    cooldown=self.breaker_cooldown, refused=len(bmc.queue))
        refused = list(bmc.queue)
        bmc.queue.clear()
        for waiting in refused:
            waiting.state = "dropped"
            self.waiting -= 1
            if waiting.timer is not None and waiting.timer.active():
                waiting.timer.cancel()
            waiting.timer = None
            log.info("power.refused", node=waiting.node, bmc=waiting.address, action=waiting.action,
                     silent=bmc.silent, retry_in=self.breaker_cooldown)
        return refused

    def _forget_if_idle(self, key: tuple[str, int], bmc: _Bmc) -> None:
        """Drop what is known of a BMC with nothing waiting, nothing running and a clean record."""
        if not (bmc.queue or bmc.busy or bmc.has_turn or bmc.silent or bmc.open_until is not None):
            self._bmcs.pop(key, None)

    # -- in the pool --------------------------------------------------------------------------------------------

    def _run_on_pool(self, key: tuple[str, int], work: Callable[[], T]) -> Deferred[T]:
        """Return the Deferred of ``work()`` (one call to the BMC at ``key``), run in a pool thread."""
        return deferToThreadPool(self._reactor, self._pool, work)

    def _in_thread(self, target: BmcTarget, body: Callable[[BmcSession], T], abandoned: threading.Event,
                   seconds: float) -> T:
        """In a pool thread: log in to ``target``, return ``body(session)``, log out (always).

        ``seconds`` is what is left of the call's time (it bounds each Redfish request); once ``abandoned`` is
        set a Redfish session sends nothing but its logout. The scheduler runs one call per BMC at a time, which
        also keeps clear of pyghmi's trap of two ``Command`` objects for one BMC at once.
        """
        if abandoned.is_set():
            raise CallAbandoned("before login")
        session = open_session(target, seconds, abandoned, self._factory)
        try:
            return body(session)
        finally:
            session.close()

    def _as_power_error(self, call: _Call, failure: Failure, seconds: float) -> PowerError:
        """Return the PowerError for a BMC call that failed after ``seconds`` (the password never appears in it)."""
        node, address = call.node, call.address
        if _no_answer(failure):
            return PowerError(f"BMC of {node} ({address}) did not answer (no reply in {seconds:.1f} s); "
                              "check its network and credentials")
        return PowerError(f"BMC of {node} ({address}) failed: {_detail(call.target, failure)}; "
                          "check the BMC credentials and its state")


def _no_answer(failure: Failure) -> bool:
    """Return True when ``failure`` means the BMC did not answer (pyghmi gave up), not that it answered an error."""
    if failure.check(CancelledError, TimeoutError, BmcNoAnswer):
        return True
    if failure.check(CallAbandoned):
        return False
    detail = str(failure.value)
    return detail in ("", "None") or "timeout" in detail.lower() or "no longer connected" in detail.lower()


class _DaemonThreadPool(ThreadPool):
    """A ThreadPool of daemon threads: a BMC call stuck in pyghmi never keeps cidd from exiting."""

    @staticmethod
    def threadFactory(*args: Any, **kwargs: Any) -> threading.Thread:  # noqa: N802 (Twisted's name)
        """Return a daemon Thread (ThreadPool calls this to make its workers)."""
        return threading.Thread(*args, daemon=True, **kwargs)


def _pyghmi_command(host: str, port: int, user: bytes, password: bytes) -> Any:
    """Return a logged-in pyghmi Command (user and password as bytes: see the module docstring)."""
    from pyghmi.ipmi.command import Command

    pyghmi_io.apply()
    pyghmi_io.discard_sessions_of(host, port)  # left by a call the BMC dropped mid-way: log in afresh
    return Command(bmc=host, userid=user, password=password, port=port)


def open_session(target: BmcTarget, seconds: float, abandoned: threading.Event,
                 command_factory: Callable[[str, int, bytes, bytes], Any] = _pyghmi_command) -> BmcSession:
    """Return a logged-in session to ``target`` (cidd.bmc.BmcSession): Redfish (requests bounded by ``seconds``,
    nothing sent once ``abandoned`` is set) or IPMI (``command_factory`` makes the pyghmi Command). Raises as
    the BMC fails: BmcNoAnswer, CallAbandoned, or the error it answered."""
    if target.protocol == REDFISH:
        from cidd.redfish import RedfishSession

        return RedfishSession(target, seconds, abandoned)
    return IpmiSession(command_factory(target.host, target.port, target.credentials.user.encode(),
                                       target.credentials.password.encode()))


def _off_time(target: BmcTarget) -> float:
    """Return the extra seconds of an ``off`` call: a Redfish BMC's graceful shutdown time (``off_timeout``)."""
    return target.settings.off_timeout if target.protocol == REDFISH and target.settings is not None else 0.0


def _detail(target: BmcTarget, failure: Failure) -> str:
    """Return what the BMC answered, as a phrase without the password (HTTP errors: status, request, its words)."""
    value = failure.value
    status = getattr(value, "status_code", None)
    if isinstance(status, int):
        words = getattr(value, "detail", None) or ""
        asked = _HTTP_ERROR.match(str(value))
        detail = f"HTTP {status}" + (f" to {asked.group(1)} {urlsplit(asked.group(2)).path}" if asked else "")
        detail += f" ({words})" if words else ""
        if status == 401:
            detail += ": the user or password was refused"
    else:
        detail = str(value) or type(value).__name__
    if target.credentials.password:
        detail = detail.replace(target.credentials.password, "***")
    return detail


_HTTP_ERROR = re.compile(r"HTTP (\w+) (\S+) returned")


def _count(number: int, noun: str) -> str:
    """Return ``'1 call'``, ``'3 calls'``: ``number`` and ``noun``, plural when it is not 1."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _failed(err: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(err)
    return d
