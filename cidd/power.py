"""BMC power for cidd: status, on, off, cycle, reset and next boot device over IPMI (pyghmi), off the reactor.

Every BMC call runs on a small dedicated thread pool (never the reactor thread, never Twisted's shared pool), at
most ``max_concurrent`` at once (a DeferredSemaphore), and the caller's Deferred fails after ``call_timeout``
seconds whatever the BMC does. A BMC that hangs keeps its pool thread (and its slot) until pyghmi itself gives
up, so one dead BMC costs one slot, never the other BMCs' calls. Calls to the same BMC run one at a time. A call
still waiting for a slot when its Deferred fails (timed out or cancelled) is never sent: a power cycle the
ladder has given up on must not reach the node later. (A call already sent cannot be taken back: IPMI has no
cancel.)

Every call logs in, does its work and logs out (as ipmitool does). A session kept open between calls goes
stale when the BMC restarts or expires idle sessions (pyghmi only keeps a session alive while some thread is
inside its I/O loop, which cidd is not between calls): the next call then spent about 20 s in pyghmi's
retransmits before it logged in again, longer than a typical ``bmc.timeout``. A login costs a few round trips
(5-10 ms to ``ipmi_sim``), and no BMC session slot (BMCs have only a handful) stays taken by cidd.

pyghmi trap (see notes/real-components.md): a second ``Command`` to the same BMC in one process blocks forever
when user and password are ``str``. Here credentials are always ``bytes``, and the previous session to that BMC
is logged out before the next one starts (calls to the same BMC run one at a time).

pyghmi's shared I/O loop loses wake-ups when several threads wait at once (up to about a second per login step)
and can stall on a socket left blocking; ``cidd.pyghmi_io.apply()`` fixes both before the first call.

The password never appears in a log event, an error message or a ``repr``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog
import yaml
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, TimeoutError
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from cidcommon.errors import CidError, TokenFileError
from cidcommon.paths import check_private
from cidd import pyghmi_io

log = structlog.get_logger("cidd.power")

T = TypeVar("T")

DEFAULT_IPMI_PORT = 623
BOOT_DEVICES = ("network", "default")


class PowerError(CidError):
    """A BMC call failed or did not answer; the message names the node and the BMC address."""

    code = "power"


class CredentialsError(CidError):
    """The BMC credentials file is missing, unreadable, not private or malformed."""

    code = "config"


@dataclass(frozen=True)
class BmcCredentials:
    """The IPMI user and password shared by the BMCs (``repr`` hides the password)."""

    user: str
    password: str = field(repr=False)

    @classmethod
    def load(cls, path: Path | str) -> BmcCredentials:
        """Return the credentials in ``path``.

        The file is either YAML (``user: admin`` and ``password: ...``) or one line ``user:password`` (the
        password may itself contain ``:``). It must not be readable or writable by group or others.

        Raises CredentialsError (a message naming the file, and ``chmod 600`` when it is not private).
        """
        path = Path(path)
        try:
            check_private(path)
            text = path.read_text(encoding="utf-8")
        except TokenFileError as exc:
            raise CredentialsError(f"BMC credentials file {exc.message}") from None
        except FileNotFoundError:
            raise CredentialsError(f"BMC credentials file {path} does not exist") from None
        except OSError as exc:
            raise CredentialsError(f"cannot read BMC credentials file {path}: {exc.strerror}; "
                                   "check its owner and mode") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str = "BMC credentials") -> BmcCredentials:
        """Return the credentials in ``text`` (YAML mapping or ``user:password``); raise CredentialsError."""
        data: Any = None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict):
            user, password = data.get("user", data.get("username")), data.get("password")
            if not isinstance(user, str) or not user or password is None:
                raise CredentialsError(f"{source} needs both 'user' and 'password'")
            return cls(user, str(password))
        line = text.strip()
        if "\n" in line or ":" not in line:
            raise CredentialsError(f"{source} must hold 'user:password' on one line, "
                                   "or YAML with 'user' and 'password'")
        user, _, password = line.partition(":")
        if not user:
            raise CredentialsError(f"{source} names no user before ':'")
        return cls(user, password)


_FIELD = re.compile(r"\{([^{}]*)\}")


def node_index(node: str) -> int | None:
    """Return the number at the end of ``node`` (``node03`` -> 3), or None when it ends in no digit."""
    match = re.search(r"(\d+)$", node)
    return int(match.group(1)) if match else None


def bmc_address(node: str, pattern: str) -> str:
    """Return the BMC address of ``node`` from an inventory ``pattern``, as ``host`` or ``host:port``.

    Fields: ``{name}`` is the node name, ``{index}`` the number its name ends with (``node03`` -> ``3``; a format
    spec works: ``{index:02d}``), ``{port}`` is an alias of ``{index}`` for ports (``"127.0.0.1:{port}"`` gives
    ``127.0.0.1:3``), and arithmetic is allowed only as ``{index+9000}`` / ``{port+9000}``. Examples:
    ``"{name}-bmc"`` -> ``node03-bmc``; ``"10.1.0.{index}"`` -> ``10.1.0.3``; ``"127.0.0.1:{index+9000}"`` ->
    ``127.0.0.1:9003``. A ``:port`` suffix is optional (default 623).

    Raises PowerError when the pattern uses an unknown field or ``{index}`` for a name without a number.
    """

    def field_value(match: re.Match[str]) -> str:
        spec = match.group(1)
        key, _, fmt = spec.partition(":")
        key = key.strip()
        if key == "name":
            return format(node, fmt)
        base, plus, offset = key.partition("+")
        if base.strip() in ("index", "port"):
            index = node_index(node)
            if index is None:
                raise PowerError(f"BMC address pattern {pattern!r} uses {{{base.strip()}}} but node name "
                                 f"{node!r} does not end with a number")
            if plus:
                try:
                    index += int(offset)
                except ValueError:
                    raise PowerError(f"BMC address pattern {pattern!r}: {{{spec}}} must be "
                                     f"{{{base.strip()}+NUMBER}}") from None
            return format(index, fmt)
        raise PowerError(f"BMC address pattern {pattern!r} uses unknown field {{{spec}}}; "
                         "use {name}, {index} or {index+N}")

    return _FIELD.sub(field_value, pattern)


def split_address(address: str) -> tuple[str, int]:
    """Return (host, port) of ``host``, ``host:port`` or ``[v6]:port``; raise PowerError on a bad port."""
    host, port = address, DEFAULT_IPMI_PORT
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        if rest.startswith(":"):
            port = _port(address, rest[1:])
    elif address.count(":") == 1:
        host, _, text = address.partition(":")
        port = _port(address, text)
    return host, port


def _port(address: str, text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise PowerError(f"BMC address {address!r} has an invalid port {text!r}")
    return port


class PowerController:
    """BMC calls for cidd on a dedicated thread pool; every method returns a Deferred and never blocks.

    ``credentials`` are used for every BMC; ``reactor`` provides the clock and the thread hand-off. Failures
    (no answer within ``call_timeout`` s, login refused, IPMI error) fail the Deferred with PowerError.
    ``command_factory(host, port, user, password)`` makes the pyghmi ``Command`` (tests may pass another).
    ``in_flight`` is the number of BMC calls running now (never more than ``max_concurrent``).
    """

    def __init__(self, credentials: BmcCredentials, reactor: Any, *, max_concurrent: int = 8,
                 call_timeout: float = 20, command_factory: Callable[[str, int, bytes, bytes], Any] | None = None
                 ) -> None:
        self._credentials = credentials
        self._reactor = reactor
        self.max_concurrent = max(1, max_concurrent)
        self.call_timeout = call_timeout
        self._factory = command_factory or _pyghmi_command
        self._semaphore = DeferredSemaphore(self.max_concurrent)
        self._pool = _DaemonThreadPool(minthreads=0, maxthreads=self.max_concurrent, name="cidd-power")
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._guard = threading.Lock()
        self._started = False
        self.in_flight = 0

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
            log.warning("power.stop_abandoned", in_flight=self.in_flight, waited=wait)

    # -- public calls -------------------------------------------------------------------------------------------

    def status(self, node: str, address: str) -> Deferred[str]:
        """Return a Deferred firing with ``'on'`` or ``'off'``; fails with PowerError."""
        return self._call(node, address, "status", lambda c: str(c.get_power()["powerstate"]))

    def on(self, node: str, address: str) -> Deferred[None]:
        """Power ``node`` on (no-op when on); the Deferred fires when the BMC accepted it, or fails with PowerError."""
        return self._call(node, address, "on", lambda c: _none(c.set_power("on", wait=False)))

    def off(self, node: str, address: str) -> Deferred[None]:
        """Power ``node`` off hard (no OS shutdown); fires when the BMC accepted it; fails with PowerError."""
        return self._call(node, address, "off", lambda c: _none(c.set_power("off", wait=False)))

    def cycle(self, node: str, address: str) -> Deferred[None]:
        """Power cycle ``node`` (off, then on; just on when off); fires when accepted; fails with PowerError."""
        return self._call(node, address, "cycle", _cycle)

    def reset(self, node: str, address: str) -> Deferred[None]:
        """Hard reset ``node`` (on when off); fires when the BMC accepted it; fails with PowerError."""
        return self._call(node, address, "reset", lambda c: _none(c.set_power("boot", wait=False)))

    def set_next_boot(self, node: str, address: str, device: str) -> Deferred[None]:
        """Set ``node``'s next boot (once) to ``'network'`` or ``'default'``; fails with PowerError.

        Raises PowerError at once (a failed Deferred) for any other device.
        """
        if device not in BOOT_DEVICES:
            return _failed(PowerError(f"unknown boot device {device!r} for {node}; use 'network' or 'default'"))
        return self._call(node, address, f"next_boot_{device}",
                          lambda c: _none(c.set_bootdev(device, persist=False)))

    def console(self, node: str, address: str, on_data: Callable[[bytes], None],
                on_close: Callable[[str | None], None], factory: Any = None) -> Any:
        """Return a started ``cidd.console.ConsoleRelay`` to the SOL console of ``node``'s BMC at ``address``.

        It runs on a thread of its own (not the pool: a console lasts as long as the admin stays). Raises
        PowerError for a malformed address.
        """
        from cidd.console import ConsoleRelay

        host, port = split_address(address)
        relay = ConsoleRelay(self._reactor, node, host, port, self._credentials.user.encode(),
                             self._credentials.password.encode(), on_data, on_close, factory=factory)
        relay.start()
        return relay

    # -- machinery ----------------------------------------------------------------------------------------------

    def _call(self, node: str, address: str, action: str, body: Callable[[Any], T]) -> Deferred[T]:
        """Run ``body(command)`` for ``address`` on the pool under the semaphore; return its bounded Deferred."""
        try:
            key = split_address(address)
        except PowerError as exc:
            return _failed(PowerError(f"{exc.message} for {node}; fix the BMC address pattern"))
        self.start()
        result: Deferred[T] = Deferred()
        started = self._reactor.seconds()

        def run(_: object) -> Deferred[T] | None:
            if result.called:  # the caller gave up (timeout, cancel) while this call waited for a slot
                log.info("power.skipped", node=node, bmc=address, action=action,
                         reason="the caller gave up before a BMC slot was free")
                self._semaphore.release()
                return None
            self.in_flight += 1
            d = deferToThreadPool(self._reactor, self._pool, self._in_thread, key, body)

            def done(outcome: Any) -> None:
                self.in_flight -= 1
                self._semaphore.release()
                if result.called:
                    return
                if isinstance(outcome, Failure):
                    err = self._as_power_error(node, address, outcome)
                    log.warning("power.failed", node=node, bmc=address, action=action, error=err.message)
                    result.errback(err)
                else:
                    log.info("power.done", node=node, bmc=address, action=action,
                             seconds=round(self._reactor.seconds() - started, 3))
                    result.callback(outcome)

            d.addBoth(done)
            return d

        self._semaphore.acquire().addCallback(run)

        def timed_out() -> None:
            if not result.called:
                err = PowerError(f"BMC of {node} ({address}) did not answer within {self.call_timeout:g} s; "
                                 "check its network and credentials")
                log.warning("power.timeout", node=node, bmc=address, action=action, timeout=self.call_timeout)
                result.errback(err)

        timer = self._reactor.callLater(self.call_timeout, timed_out)

        def cancel_timer(value: Any) -> Any:
            if timer.active():
                timer.cancel()
            return value

        result.addBoth(cancel_timer)
        return result

    def _in_thread(self, key: tuple[str, int], body: Callable[[Any], T]) -> T:
        """In a pool thread: log in to the BMC at ``key``, return ``body(command)``, log out (always)."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            command = self._factory(key[0], key[1], self._credentials.user.encode(),
                                    self._credentials.password.encode())
            try:
                return body(command)
            finally:
                _logout(command)

    def _as_power_error(self, node: str, address: str, failure: Failure) -> PowerError:
        """Return the PowerError for a failed BMC call (the password never appears in it)."""
        if failure.check(CancelledError, TimeoutError):
            detail = None
        else:
            detail = str(failure.value) if str(failure.value) not in ("", "None") else None
            if detail is not None:
                detail = detail.replace(self._credentials.password, "***") if self._credentials.password else detail
        if detail is None or "timeout" in detail.lower() or "no longer connected" in detail.lower():
            return PowerError(f"BMC of {node} ({address}) did not answer; check its network and credentials")
        return PowerError(f"BMC of {node} ({address}) failed: {detail}; check the BMC credentials and its state")


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

    return Command(bmc=host, userid=user, password=password, port=port)


def _logout(command: Any) -> None:
    """Close ``command``'s IPMI session (one round trip, not retried) unless a console shares it; never raise."""
    session = getattr(command, "ipmi_session", None)
    if session is None or getattr(session, "sol_handler", None) is not None:
        return  # pyghmi shares one session per BMC in a process: this one carries an open console, keep it
    try:
        session.logout()
    except Exception as exc:  # noqa: BLE001 - a failed logout only leaves a session for the BMC to expire
        log.debug("power.logout_failed", error=type(exc).__name__)


def _cycle(command: Any) -> None:
    """Power cycle through ``command``: chassis control 'power cycle' when on, 'on' when off."""
    if command.get_power()["powerstate"] == "off":
        command.set_power("on", wait=False)
        return
    response = command.raw_command(netfn=0, command=2, data=[2])
    if "error" in response:
        raise RuntimeError(f"power cycle refused: {response['error']}")


def _none(_: object) -> None:
    return None


def _failed(err: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(err)
    return d
