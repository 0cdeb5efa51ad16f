"""Simulated BMCs for the simulated fleet: one IPMI 2.0 LAN endpoint per SimNode on 127.0.0.1, one UDP port each.

Each ``SimBmc`` is a ``pyghmi.ipmi.bmc.Bmc`` whose chassis is a ``SimNode``: power ``off`` stops the node (its
agent session is dropped and it stays down), ``on`` boots it, ``cycle`` and ``reset`` stop it then boot it; the
boot device ``network`` makes the next boot (only) the installer, anything else boots the disk. Power status is
``off`` when the node is off and ``on`` otherwise (up, rebooting or hung).

pyghmi answers IPMI in its own threads; every change to a SimNode is handed to the reactor thread with
``reactor.callFromThread``. Until the reactor has applied a power change the BMC reports the requested state, so
``set power off`` followed at once by ``get power`` answers ``off``.

``ipmitool -I lanplus -C 3 -H 127.0.0.1 -p PORT -U USER -P PASSWORD chassis power status`` works against these
BMCs, and so does pyghmi's own client (cidd's PowerController): pyghmi 1.6's server as shipped never refuses
cipher suite 17, which its client asks for first, and the client then fails to log in; ``SimBmc`` refuses
authentication algorithms other than HMAC-SHA1 at session open, so the client falls back to cipher suite 3.

A thousand BMCs and more in one process work: ``cidd.pyghmi_io.apply()`` (called by ``SimBmcs.start``) replaces
pyghmi's ``select()`` loop, which died at the first socket numbered 1024 or more, by a ``poll()`` loop that reads
only the sockets with data; ``close_bmcs`` takes any number of BMCs out of that loop in one hand-over.
"""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from pyghmi.ipmi import bmc as pyghmi_bmc
from pyghmi.ipmi.private import serversession
from pyghmi.ipmi.private import session as ipmisession

from cidcommon.errors import CidError
from cidd import pyghmi_io

if TYPE_CHECKING:
    from cidsim.fleet import SimNode

log = structlog.get_logger("cidsim.bmc")

IPMI_OK = 0
IPMI_INVALID_DATA = 0xCC
RMCP_INVALID_AUTH_ALGORITHM = 0x11
RMCP_OPEN_SESSION_REQUEST = 0x10
SHA1_AUTH = 1


class _Sha1OnlySession(serversession.ServerSession):  # type: ignore[misc]
    """pyghmi's server session, but refusing RMCP+ auth algorithms other than HMAC-SHA1 (cipher suite 3 only).

    pyghmi's server always answers "cipher suite 3" whatever was asked; pyghmi's client asks for suite 17 first
    and only falls back to suite 3 when refused, so without this refusal it cannot log in.
    """

    def create_open_session_response(self, request: bytearray) -> bytearray:
        """Return the open-session response: a refusal unless the request asks for HMAC-SHA1 authentication."""
        if len(request) > 12 and request[12] != SHA1_AUTH:
            return bytearray([request[0], RMCP_INVALID_AUTH_ALGORITHM, 0, 0]) + bytearray(request[4:8])
        return super().create_open_session_response(request)

    def _handle_ipmi_packet(self, data: bytearray, sockaddr: Any = None, qent: Any = None) -> Any:
        """Handle a packet of this session; a new login from the same client address goes to this BMC afresh.

        pyghmi keys server sessions by client address, then BMC port, for every BMC of the process. When a new
        login (an IPMI 1.5 packet with sequence and session 0) reaches an old session, pyghmi drops the entry
        of that client address for *every* BMC, which loses the other BMCs' sessions and logins in flight from
        the same client (cidd talks to all BMCs from one socket). Only this BMC's entry is dropped here.
        """
        if (qent is not None and len(data) >= 13 and data[4] in (0, 2)
                and struct.unpack("<II", bytes(data[5:13])) == (0, 0)
                and qent[2] in ipmisession.Session.bmc_handlers):
            handlers = ipmisession.Session.bmc_handlers.get(sockaddr, {})
            if handlers.get(self.bmc.port) is self:
                del handlers[self.bmc.port]
            if not handlers:
                ipmisession.Session.bmc_handlers.pop(sockaddr, None)
            self.bmc.sessionless_data(data, sockaddr)
            return None
        delay = getattr(self.bmc, "answer_delay", 0.0)
        if delay > 0:  # a slow BMC: handle (and answer) the packet later, on a timer thread, so that the other
            # BMCs of this process, which share one I/O thread, keep answering at once
            timer = threading.Timer(delay, super()._handle_ipmi_packet, (data,), {"sockaddr": sockaddr, "qent": qent})
            timer.daemon = True
            timer.start()
            return None
        return super()._handle_ipmi_packet(data, sockaddr=sockaddr, qent=qent)

    def sessionless_data(self, data: bytes, sockaddr: Any) -> Any:
        """A packet queued for this session after its entry was dropped: this session's BMC handles it."""
        return self.bmc.sessionless_data(data, sockaddr)


class SimBmcError(CidError):
    """A simulated BMC could not be started (for instance its UDP port is taken)."""

    code = "sim"


class SimBmc(pyghmi_bmc.Bmc):  # type: ignore[misc]
    """The BMC of one SimNode on ``127.0.0.1:port`` (methods below run in pyghmi's threads)."""

    def __init__(self, node: SimNode, port: int, user: str, password: str, reactor: Any) -> None:
        try:
            super().__init__({user: password}, port=port, address="127.0.0.1")
        except OSError as exc:
            hint = ("raise the open-file limit (ulimit -n): each simulated node needs two descriptors"
                    if exc.errno in (errno.EMFILE, errno.ENFILE) else "choose another base port")
            raise SimBmcError(f"cannot start the simulated BMC of {node.name} on 127.0.0.1:{port}: "
                              f"{exc.strerror}; {hint}") from None
        self.node = node
        self.reactor = reactor
        self.answer_delay = 0.0  # seconds before each packet of a session is handled: a slow BMC
        self.boot_device = "default"
        self._expected: str | None = None
        self._lock = threading.Lock()

    # -- pyghmi Bmc interface (IPMI threads) --------------------------------------------------------------------

    def get_power_state(self) -> str:
        """Return ``'on'`` or ``'off'``: the requested state until the reactor applied it, else the node's."""
        with self._lock:
            if self._expected is not None:
                return self._expected
        return "off" if self.node.state == "off" else "on"

    def power_off(self) -> int:
        """Hard power off: stop the node (its agent session drops); return the IPMI completion code."""
        return self._request("off", "off")

    def power_shutdown(self) -> int:
        """Soft power off; the simulated OS shuts down at once, as ``power_off``."""
        return self._request("off", "off")

    def power_on(self) -> int:
        """Power on: boot the node (installer when the next boot is ``network``) unless it is on."""
        return self._request("on", "on")

    def power_cycle(self) -> int:
        """Power cycle: stop the node, then boot it (installer when the next boot is ``network``)."""
        return self._request("on", "cycle")

    def power_reset(self) -> int:
        """Hard reset: as ``power_cycle`` (a hung node boots again too)."""
        return self._request("on", "cycle")

    def get_boot_device(self) -> str:
        """Return the next boot device: ``'network'`` or ``'default'``."""
        return self.boot_device

    def set_boot_device(self, bootdevice: str) -> None:
        """Set the next boot device; ``network`` (also ``pxe``) means the installer, anything else the disk."""
        self.boot_device = "network" if bootdevice in ("network", "net", "pxe") else "default"
        log.info("simbmc.boot_device", node=self.node.name, device=self.boot_device)

    def sessionless_data(self, data: bytes, sockaddr: Any) -> Any:
        """Start RMCP+ sessions with ``_Sha1OnlySession`` (so pyghmi's client can log in); else as pyghmi."""
        raw = bytearray(data)
        if (len(raw) >= 22 and raw[0] == 6 and raw[2:4] == b"\xff\x07" and raw[4] == 6
                and raw[5] == RMCP_OPEN_SESSION_REQUEST):
            _Sha1OnlySession(self.authdata, self.kg, sockaddr, self.serversocket, raw[16:], self.uuid, bmc=self)
            return None
        return super().sessionless_data(data, sockaddr)

    def set_system_boot_options(self, request: dict[str, Any], session: Any) -> Any:
        """Answer 'set system boot options' (parameter 5: boot flags); ignore flag clearing (0, 3, 4)."""
        data = request["data"]
        if data and data[0] == 5 and len(data) > 2:
            device = (data[2] >> 2) & 0b1111
            self.set_boot_device("network" if device == 1 else "default")
            return session.send_ipmi_response()
        if data and data[0] in (0, 3, 4):
            return session.send_ipmi_response()
        return session.send_ipmi_response(code=IPMI_INVALID_DATA)

    # -- hand-off to the reactor ----------------------------------------------------------------------------------

    def _request(self, power: str, action: str) -> int:
        """Note ``power`` as the state to report, apply ``action`` on the reactor thread; return 0 (OK)."""
        with self._lock:
            self._expected = power
        log.info("simbmc.power", node=self.node.name, action=action, port=self.port)
        self.reactor.callFromThread(self._apply, action)
        return IPMI_OK

    def _apply(self, action: str) -> None:
        """On the reactor thread: power the node off, on, or cycle it; then report its real state again."""
        node = self.node
        try:
            if action == "off":
                node.stop()
            elif action == "on":
                if node.state == "off":
                    self._boot_on()
            else:
                boot = self._next_boot()
                node.power_cycle(boot)
        finally:
            with self._lock:
                self._expected = None

    def _boot_on(self) -> None:
        """Boot an off node: into the installer once when the next boot is ``network``, else from disk."""
        boot = self._next_boot()
        if boot == "installer":
            self.node.power_cycle("installer")
        else:
            self.node.start()

    def _next_boot(self) -> str:
        """Return ``installer`` or ``disk`` for this boot, and reset the one-time boot device."""
        boot = "installer" if self.boot_device == "network" else "disk"
        self.boot_device = "default"
        return boot

    # -- shutting down -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop answering: take the UDP socket out of pyghmi's I/O loop, then close it."""
        close_bmcs([self])


def close_bmcs(bmcs: Iterable[SimBmc]) -> None:
    """Stop ``bmcs`` answering: unregister their sockets from pyghmi's I/O loop all at once, then close them.

    One hand-over for the lot (``cidd.pyghmi_io.forget_sockets``), however many: closed one by one, each waiting
    50 ms for the I/O thread, a thousand simulated BMCs took about a minute to stop. Returns None.
    """
    sockets = [bmc.serversocket for bmc in bmcs]
    for sock in sockets:
        ipmisession.Session.bmc_handlers.pop(sock, None)
    pyghmi_io.forget_sockets(sockets)
    for sock in sockets:
        sock.close()


class SimBmcs:
    """One SimBmc per SimNode, on ports ``base_port``, ``base_port + 1``, ... (in name order), and their loop.

    ``nodes`` is a mapping of name to SimNode (``SimFleet.nodes``) or an iterable of SimNodes. ``start()`` opens
    every port and runs pyghmi's event loop in a daemon thread; ``stop()`` closes them and ends the thread.
    ``reactor`` (default: the global reactor) must be running for power changes to reach the nodes.
    """

    def __init__(self, nodes: Mapping[str, SimNode] | Iterable[SimNode], base_port: int, user: str, password: str,
                 *, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        members = list(nodes.values()) if isinstance(nodes, Mapping) else list(nodes)
        self._nodes = sorted(members, key=lambda n: n.name)
        self.ports = {node.name: base_port + i for i, node in enumerate(self._nodes)}
        self._user = user
        self._password = password
        self._reactor = reactor
        self.bmcs: dict[str, SimBmc] = {}
        self._thread: threading.Thread | None = None
        self._running = threading.Event()

    def address(self, name: str) -> str:
        """Return ``127.0.0.1:PORT``, the BMC address of node ``name`` (KeyError for an unknown node)."""
        return f"127.0.0.1:{self.ports[name]}"

    def start(self) -> None:
        """Open one UDP port per node and start the IPMI thread; raise SimBmcError when a port is taken."""
        if self._thread is not None:
            return
        pyghmi_io.apply()
        try:
            for node in self._nodes:
                self.bmcs[node.name] = SimBmc(node, self.ports[node.name], self._user, self._password,
                                              self._reactor)
        except SimBmcError:
            self._close_all()
            raise
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="simbmc", daemon=True)
        self._thread.start()
        log.info("simbmc.started", count=len(self.bmcs), first_port=min(self.ports.values(), default=None))

    def stop(self) -> None:
        """Close every simulated BMC and end the IPMI thread (waits up to 2 s for it)."""
        self._running.clear()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(2)
        self._close_all()
        log.info("simbmc.stopped")

    def slow_down(self, names: Iterable[str], delay: float) -> None:
        """Make the BMCs of ``names`` answer every command ``delay`` seconds late (unknown names are ignored)."""
        for name in names:
            if (bmc := self.bmcs.get(name)) is not None:
                bmc.answer_delay = delay

    def drop(self, names: Iterable[str]) -> None:
        """Close the BMCs of ``names`` (unknown names are ignored): calls to them go unanswered from now on."""
        close_bmcs([bmc for name in names if (bmc := self.bmcs.pop(name, None)) is not None])

    def _close_all(self) -> None:
        bmcs, self.bmcs = self.bmcs, {}
        close_bmcs(bmcs.values())

    def _loop(self) -> None:
        """pyghmi's event loop: answer IPMI packets until ``stop()``."""
        while self._running.is_set():
            try:
                ipmisession.Session.wait_for_rsp(0.2)
            except Exception as exc:  # noqa: BLE001 - a simulator must keep answering the other BMCs
                log.error("simbmc.loop_error", error=str(exc))
