"""cidd.pyghmi_io: the two fixes to pyghmi's shared I/O loop (bounded waits, sends that never block).

The effect on real BMCs is measured by ``bench/bmc_logins.py`` (concurrent logins to ``ipmi_sim``) and exercised
by ``tests/test_ladder_power.py`` (cidd's power pool against a fleet of pyghmi BMCs, with a dead one).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pyghmi.ipmi.private import session
from twisted.internet import defer, reactor

from cidd import pyghmi_io
from cidd.power import BmcCredentials, PowerController
from tests.ipmisim import PASSWORD, USER, IpmiSim


def test_apply_replaces_pyghmis_wait_and_send_once() -> None:
    assert pyghmi_io.apply() is True
    patched_wait = session._io_wait
    assert session._io_sendto is pyghmi_io.send_nonblocking
    assert getattr(patched_wait, "__wrapped__", None) is not None, "the original wait is kept underneath"
    assert pyghmi_io.apply() is True
    assert session._io_wait is patched_wait, "a second apply() must not wrap the wait twice"
    assert pyghmi_io.is_applied()


@pytest.mark.parametrize(("asked", "expected"), [(None, pyghmi_io.MAX_WAIT), (300.0, pyghmi_io.MAX_WAIT),
                                                 (0.001, 0.001), (-2.0, 0.0)])
def test_every_wait_is_capped_so_a_lost_wake_up_costs_at_most_max_wait(asked: float | None,
                                                                        expected: float) -> None:
    calls: list[tuple[Any, ...]] = []
    wait = pyghmi_io._bounded_wait(lambda *args: calls.append(args))
    wait(asked, ("127.0.0.1", 623), "queue")
    assert calls == [(expected, ("127.0.0.1", 623), "queue")]


def test_a_send_leaves_the_shared_socket_non_blocking() -> None:
    """pyghmi's I/O thread reads with the socket non-blocking; a send must not switch it back under the reader."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as shared:
        receiver.bind(("127.0.0.1", 0))
        shared.bind(("127.0.0.1", 0))
        shared.setblocking(False)  # what pyghmi's reader does before every recvfrom
        pyghmi_io.apply()
        session._io_sendto(shared, b"ipmi", receiver.getsockname())
        assert shared.getblocking() is False
        assert receiver.recvfrom(16)[0] == b"ipmi"
        with pytest.raises(BlockingIOError):  # the reader's next recvfrom returns at once instead of hanging
            shared.recvfrom(16)


class FullSocket:
    """A UDP socket whose first ``failures`` sends fail with ``error``; ``sent`` records what went out."""

    def __init__(self, writable: socket.socket, error: type[OSError] = BlockingIOError, failures: int = 1) -> None:
        self.writable = writable  # select() waits on its descriptor, which is writable
        self.sent: list[bytes] = []
        self.error = error
        self.failures = failures

    def fileno(self) -> int:
        return self.writable.fileno()

    def sendto(self, packet: bytes, address: Any) -> int:
        if self.failures:
            self.failures -= 1
            raise self.error("full")
        self.sent.append(packet)
        return len(packet)


def test_a_full_send_buffer_is_waited_for_then_retried() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as writable:
        full = FullSocket(writable)
        pyghmi_io.send_nonblocking(full, b"rakp", ("127.0.0.1", 623))
    assert full.sent == [b"rakp"]


@pytest.mark.parametrize("error", [BlockingIOError, ConnectionRefusedError])
def test_a_send_that_cannot_be_done_is_dropped_without_raising(error: type[OSError]) -> None:
    """As pyghmi's own send: a lost datagram is the IPMI session's retransmit to handle, never an exception."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as writable:
        full = FullSocket(writable, error=error, failures=2)
        assert pyghmi_io.send_nonblocking(full, b"rakp", ("127.0.0.1", 623)) is None
    assert full.sent == []


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_cidds_power_pool_applies_the_fixes_and_reads_several_bmcs_at_once(tmp_path: Path) -> None:
    sims = [IpmiSim(tmp_path / f"bmc{i}") for i in range(3)]
    controller = PowerController(BmcCredentials(USER, PASSWORD), reactor, max_concurrent=4, call_timeout=20)
    try:
        for sim in sims:
            sim.start()
        sims[1].power = "on"
        states = await defer.gatherResults([controller.status(f"n{i}", sim.address) for i, sim in enumerate(sims)],
                                           consumeErrors=True)
        assert states == ["off", "on", "off"]
        assert pyghmi_io.is_applied()
        assert session._io_sendto is pyghmi_io.send_nonblocking
    finally:
        controller.stop()
        for sim in sims:
            sim.stop()
