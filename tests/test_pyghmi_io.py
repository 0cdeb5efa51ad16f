"""cidd.pyghmi_io: pyghmi's I/O loop replaced (poll() at any descriptor number, a watchdog that restarts a dead I/O
thread, bounded waits, sends that never block).

The effect on real BMCs is measured by ``bench/bmc_logins.py`` (concurrent logins to ``ipmi_sim``) and exercised
by ``tests/test_ladder_power.py`` (cidd's power pool against a fleet of pyghmi BMCs, with a dead one) and by
``tests/test_power.py`` (more than a thousand simulated BMCs in one process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pyghmi.ipmi.private import session
from structlog.testing import capture_logs
from twisted.internet import defer, reactor, threads

from cidd import pyghmi_io
from cidd.power import BmcCredentials, PowerController
from tests.ipmisim import PASSWORD, USER, IpmiSim

REPO = Path(__file__).resolve().parent.parent


def test_apply_replaces_pyghmis_loop_wait_and_send_once() -> None:
    assert pyghmi_io.apply() is True
    assert session._io_wait is pyghmi_io.io_wait
    assert session._io_sendto is pyghmi_io.send_nonblocking
    assert session.define_worker() is pyghmi_io.PollIOWorker, "pyghmi must start the poll() loop, not its select()"
    assert pyghmi_io.apply() is True
    assert session._io_wait is pyghmi_io.io_wait, "a second apply() changes nothing"
    assert pyghmi_io.is_applied()
    assert session.iothread is None or isinstance(session.iothread, pyghmi_io.PollIOWorker)


@pytest.mark.parametrize(("asked", "expected"), [(None, pyghmi_io.MAX_WAIT), (300.0, pyghmi_io.MAX_WAIT),
                                                 (0.001, 0.001), (-2.0, 0.0)])
def test_every_wait_is_capped_so_a_lost_wake_up_costs_at_most_max_wait(asked: float | None,
                                                                        expected: float) -> None:
    assert pyghmi_io.wait_time(asked) == expected


def test_a_wait_for_a_silent_bmc_ends_by_itself_and_unregisters() -> None:
    """A waiter times its own wait: it does not depend on the I/O thread (alive or not) to end it."""
    pyghmi_io.apply()
    started = time.monotonic()
    pyghmi_io.io_wait(300.0, ("::ffff:127.0.0.1", 9, 0, 0))
    assert time.monotonic() - started < 1.0
    assert ("::ffff:127.0.0.1", 9, 0, 0) not in pyghmi_io._directed


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

    def __init__(self, writable: Any, error: type[OSError] = BlockingIOError, failures: int = 1) -> None:
        self.writable = writable  # poll() waits on its descriptor, which is writable
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


def test_a_full_send_buffer_is_waited_for_at_a_descriptor_above_1024() -> None:
    """The wait for room used select(), which raises ValueError for a descriptor from 1024 up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as writable:
        high = os.dup2(writable.fileno(), _free_descriptor_above(1100))
        try:
            full = FullSocket(_Descriptor(high))
            pyghmi_io.send_nonblocking(full, b"rakp", ("127.0.0.1", 623))
        finally:
            os.close(high)
    assert full.sent == [b"rakp"]


class _Descriptor:
    """An object whose ``fileno()`` is a given descriptor number."""

    def __init__(self, fd: int) -> None:
        self.fd_number = fd

    def fileno(self) -> int:
        return self.fd_number


def _free_descriptor_above(low: int) -> int:
    """Return a descriptor number >= ``low`` that is not open (raising the soft open-file limit if needed)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft <= low + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(low + 1024, hard), hard))
    for fd in range(low, low + 64):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    raise RuntimeError(f"no free descriptor from {low}")


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
        assert isinstance(session.iothread, pyghmi_io.PollIOWorker) and session.iothread.is_alive()
    finally:
        controller.stop()
        for sim in sims:
            sim.stop()


# -- descriptors from 1024 up, and a dead I/O thread ----------------------------------------------------------------

#: Run in a fresh process (pyghmi opens its socket once per process): hold COUNT descriptors first, so that pyghmi's
#: socket gets a number above 1024, then ask the BMC at ADDRESS for its power state twice through cidd's
#: PowerController. Prints one JSON line: the answers (or the error) and the descriptor numbers of pyghmi's sockets.
CHILD = r"""
import json, os, resource, sys
from twisted.internet import defer, task
from cidd.power import BmcCredentials, PowerController

address, user, password, count, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < count + 256:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 256, hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]


def main(reactor):
    power = PowerController(BmcCredentials(user, password), reactor, call_timeout=limit)
    out = {"highest_held": max(held)}

    async def run():
        try:
            out["answers"] = [await power.status("node01", address), await power.status("node01", address)]
        except Exception as exc:
            out["error"] = getattr(exc, "message", repr(exc))
        from pyghmi.ipmi.private import session
        out["pyghmi_sockets"] = [s.fileno() for s in session.iosockets]
        print(json.dumps(out), flush=True)
        power.stop(wait=0.5)

    return defer.ensureDeferred(run())


task.react(main)
"""


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_bmc_calls_answer_when_pyghmis_socket_is_numbered_above_1024(tmp_path: Path) -> None:
    """cidd with 1,100 agent sessions: pyghmi's select() loop died at its socket's descriptor 1125 and every BMC call
    "did not answer" until a restart. A child process holds 1,100 descriptors before its first BMC call."""
    sim = IpmiSim(tmp_path / "bmc")
    try:
        await threads.deferToThread(sim.start)
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        result = await threads.deferToThread(
            subprocess.run, [sys.executable, "-c", CHILD, sim.address, USER, PASSWORD, "1100", "8"],
            capture_output=True, text=True, timeout=90, env=env, cwd=str(tmp_path))
    finally:
        await threads.deferToThread(sim.stop)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-3000:]
    out = json.loads(lines[-1])
    assert min(out["pyghmi_sockets"]) > 1024, out  # the situation of the report
    assert out.get("answers") == ["off", "off"], (out, result.stderr[-3000:])


class BrokenSocket:
    """Not a socket: asking for its descriptor raises, which kills an I/O loop that polls it."""

    def fileno(self) -> int:
        raise RuntimeError("broken socket (test)")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_dead_io_thread_is_logged_and_restarted_and_bmc_calls_answer_again(tmp_path: Path,
                                                                                 monkeypatch: Any) -> None:
    """pyghmi starts its I/O thread once; when that thread died, every later BMC call of the process went
    unanswered until a restart."""
    monkeypatch.setattr(pyghmi_io, "RESTART_BACKOFF", 0.0, raising=False)
    sim = IpmiSim(tmp_path / "bmc")
    power = PowerController(BmcCredentials(USER, PASSWORD), reactor, call_timeout=8)
    broken = BrokenSocket()
    try:
        await threads.deferToThread(sim.start)
        assert await power.status("node01", sim.address) == "off"  # pyghmi's socket and I/O thread exist now
        thread = session.iothread
        with capture_logs() as logs:
            session.iosockets.append(broken)
            anchor = next(s for s in session.iosockets if s is not broken)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as poke:  # wakes the loop: it meets the broken one
                poke.sendto(b"\x00" * 8, ("127.0.0.1", anchor.getsockname()[1]))
            await threads.deferToThread(threading.Thread.join, thread, 5)  # Thread's join: pyghmi's logs out
            assert not thread.is_alive(), "the broken socket did not kill the I/O thread"
            session.iosockets.remove(broken)
            sim.power = "on"
            assert await power.status("node01", sim.address) == "on"
        assert session.iothread is not thread and session.iothread.is_alive()
        events = [e["event"] for e in logs]
        assert "pyghmi_io.io_thread_died" in events and "pyghmi_io.io_thread_restarted" in events, events
        died = next(e for e in logs if e["event"] == "pyghmi_io.io_thread_died")
        assert "broken socket (test)" in died["error"]
    finally:
        if broken in session.iosockets:
            session.iosockets.remove(broken)
        power.stop()
        await threads.deferToThread(sim.stop)


def test_forget_sockets_returns_once_the_io_thread_no_longer_polls_them() -> None:
    pyghmi_io.apply()
    if session.iothread is None:
        session.Session._assignsocket()  # pyghmi's first client socket starts its I/O thread (ours)
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        session.iosockets.extend(sockets)
        assert pyghmi_io.forget_sockets(sockets) is True
        assert not any(sock in session.iosockets for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


BMC_RESTART_SCRIPT = r'''
import json, os, random, signal, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor, wait
from cidd.bmc import IpmiSession
from cidd.power import _pyghmi_command
from tests.procs import free_udp_block

count, work = int(sys.argv[1]), sys.argv[2]
base = free_udp_block(count)
fleet_argv = [sys.executable, "-m", "cidsim.main", f"n[001-{count:03d}]", "--server", "127.0.0.1:9",
              "--sim-dir", f"{work}/sim", "--bmc-base-port", str(base), "--bmc-credentials", f"{work}/bmc.cred",
              "--token-file", f"{work}/agent.token", "--plain-tcp", "--log-level", "warning"]

def call(index, action):
    bmc = IpmiSession(_pyghmi_command("127.0.0.1", base + index, b"u", b"p"))
    try:
        return bmc.set_next_boot("network") if action == "boot" else bmc.power_cycle()
    finally:
        bmc.close()

def pair(index):
    try:
        call(index, "boot")
        call(index, "cycle")
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

def round_(pool):
    futures = [pool.submit(pair, index) for index in range(count)]
    done, pending = wait(futures, timeout=60)
    return {"ok": sum(1 for f in done if f.result() == "ok"), "hung": len(pending)}

fleet = subprocess.Popen(fleet_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(2)
pool = ThreadPoolExecutor(16)
before = round_(pool)
fleet.send_signal(signal.SIGKILL); fleet.wait()
fleet = subprocess.Popen(fleet_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # calls find ports closed
after = round_(pool)
fleet.send_signal(signal.SIGKILL); fleet.wait()
print(json.dumps({"before": before, "after": after}), flush=True)
os._exit(0)  # threads hung in pyghmi would keep the process alive
'''


@pytest.mark.slow
def test_bmcs_that_restart_under_concurrent_calls_never_deadlock_the_process(tmp_path: Path) -> None:
    """pyghmi takes its two session-table locks in both orders; sixteen threads calling BMCs whose ports were
    closed for a moment (a BMC or a simulated fleet restarting) retransmitted at once and deadlocked, and every
    later BMC call of the process hung (bench/chaos.py: all 32 of cidd's BMC threads held, healthy nodes failed
    "did not answer"). ``apply()`` makes them one lock. Real processes: cid-simfleet's BMCs, cidd's IPMI code."""
    (tmp_path / "bmc.cred").write_text("u:p\n")
    (tmp_path / "agent.token").write_text("t" * 32 + "\n")
    for name in ("bmc.cred", "agent.token"):
        (tmp_path / name).chmod(0o600)
    done = subprocess.run([sys.executable, "-c", BMC_RESTART_SCRIPT, "60", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=200,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] == {"ok": 60, "hung": 0}
    assert result["after"]["hung"] == 0, f"BMC calls deadlocked after the restart: {result}"
    assert result["after"]["ok"] == 60, result
