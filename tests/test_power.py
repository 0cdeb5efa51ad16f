"""BMC power against real endpoints: OpenIPMI's ipmi_sim, dead UDP ports, and the simulated fleet's pyghmi BMCs.

Needs the Debian packages ``openipmi`` (ipmi_sim) and ``ipmitool``; without them these tests fail saying that
``make test`` installs them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import defer, reactor, task, threads
from twisted.internet.protocol import Factory, Protocol

from cidcommon.wire import LineBuffer, decode, encode
from cidd.power import BmcCredentials, CredentialsError, PowerController, PowerError, bmc_address
from cidsim.bmc import SimBmcs
from cidsim.fleet import SimConfig, SimFleet
from tests.ipmisim import PASSWORD, USER, IpmiSim, free_udp_port, run_ipmitool
from tests.procs import free_udp_block

CREDS = BmcCredentials(USER, PASSWORD)
TOKEN = "power-token"


@pytest.fixture
def ipmisim(tmp_path: Path) -> Iterator[IpmiSim]:
    """A running ipmi_sim on 127.0.0.1 (stopped by PID afterwards)."""
    sim = IpmiSim(tmp_path / "bmc").start()
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def controller() -> Iterator[PowerController]:
    power = PowerController(CREDS, reactor, max_concurrent=4, call_timeout=10)
    try:
        yield power
    finally:
        power.stop()


def dead_udp_port() -> tuple[socket.socket, int]:
    """Return a bound UDP socket that never answers, and its port (close it when done)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


# -- credentials and addresses -------------------------------------------------------------------------------------

def test_credentials_file_readable_by_others_is_refused_with_the_chmod_fix(tmp_path: Path) -> None:
    path = tmp_path / "bmc.cred"
    path.write_text("admin:hunter2\n")
    path.chmod(0o644)
    with pytest.raises(CredentialsError) as err:
        BmcCredentials.load(path)
    assert str(path) in err.value.message and f"chmod 600 {path}" in err.value.message
    assert "hunter2" not in err.value.message


def test_credentials_file_user_password_line_and_yaml(tmp_path: Path) -> None:
    line = tmp_path / "line"
    line.write_text("admin:pa:ss\n")
    line.chmod(0o600)
    assert BmcCredentials.load(line) == BmcCredentials("admin", "pa:ss")
    doc = tmp_path / "doc.yaml"
    doc.write_text("user: root\npassword: 'x y'\n")
    doc.chmod(0o600)
    creds = BmcCredentials.load(doc)
    assert creds == BmcCredentials("root", "x y") and "x y" not in repr(creds)
    with pytest.raises(CredentialsError, match="does not exist"):
        BmcCredentials.load(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_text("just-a-user\n")
    bad.chmod(0o600)
    with pytest.raises(CredentialsError, match=str(bad)):
        BmcCredentials.load(bad)


def test_bmc_address_patterns() -> None:
    assert bmc_address("node03", "{name}-bmc") == "node03-bmc"
    assert bmc_address("node03", "10.1.0.{index}") == "10.1.0.3"
    assert bmc_address("node03", "127.0.0.1:{index+9000}") == "127.0.0.1:9003"
    assert bmc_address("node03", "bmc{index:04d}.ipmi:6230") == "bmc0003.ipmi:6230"
    with pytest.raises(PowerError, match="does not end with a number"):
        bmc_address("login", "10.1.0.{index}")
    with pytest.raises(PowerError, match="unknown field"):
        bmc_address("node03", "{rack}-bmc")


# -- ipmi_sim ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_controller_drives_ipmi_sim_status_on_off_cycle_reset_and_next_boot(
        ipmisim: IpmiSim, controller: PowerController) -> None:
    address = ipmisim.address
    with capture_logs() as logs:
        assert await controller.status("node01", address) == "off"
        await controller.on("node01", address)
        assert ipmisim.power == "on"
        assert await controller.status("node01", address) == "on"
        # cross-check with a client nobody here wrote
        out = await threads.deferToThread(ipmisim.ipmitool, "chassis", "power", "status")
        assert out.stdout.strip() == "Chassis Power is on"
        await controller.off("node01", address)
        assert ipmisim.power == "off"
        out = await threads.deferToThread(ipmisim.ipmitool, "chassis", "power", "status")
        assert out.stdout.strip() == "Chassis Power is off"
        await controller.cycle("node01", address)  # from off: just on
        assert ipmisim.power == "on"
        await controller.cycle("node01", address)  # from on: chassis power cycle
        await controller.reset("node01", address)
        assert ipmisim.power == "on"
        await controller.set_next_boot("node01", address, "network")
        assert ipmisim.boot == "pxe"
        await controller.set_next_boot("node01", address, "default")
        assert ipmisim.boot == "none"
        with pytest.raises(PowerError, match="unknown boot device 'cdrom' for node01"):
            await controller.set_next_boot("node01", address, "cdrom")
    calls = ipmisim.calls()
    assert "set power 1" in calls and "set power 0" in calls and "set boot pxe" in calls
    assert any(c.startswith("set reset") or c == "set power 0" for c in calls)
    assert not any(PASSWORD in repr(event) for event in logs)
    assert {e["event"] for e in logs} == {"power.done"}
    assert all(e["node"] == "node01" and e["bmc"] == address for e in logs)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_bmc_that_restarted_between_two_calls_answers_the_next_one(ipmisim: IpmiSim) -> None:
    """Each call logs in and out: a BMC reset (firmware update, watchdog) or an expired idle session between two
    calls costs nothing. With a session kept open between calls, the next call spent ~20 s in pyghmi's
    retransmits before logging in again, so it failed any shorter call limit."""
    power = PowerController(CREDS, reactor, call_timeout=5)
    try:
        assert await power.status("node01", ipmisim.address) == "off"
        await threads.deferToThread(ipmisim.stop)
        ipmisim.start()  # same port, no sessions: a BMC that rebooted
        ipmisim.power = "on"
        assert await power.status("node01", ipmisim.address) == "on"
        await power.off("node01", ipmisim.address)
        assert ipmisim.power == "off"
    finally:
        power.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_bmc_reset_in_the_middle_of_a_call_answers_the_next_call_at_once(ipmisim: IpmiSim) -> None:
    """A BMC that dies while a call waits for its answer (power loss, BMC watchdog) and comes back: pyghmi kept
    the dead session registered as logged in for ~30 s, the stuck call's thread with it, and handed that session
    to the next ``Command``; every call to the restarted BMC in that time went unanswered (bench/chaos.py: 24
    healthy nodes of a restarted fleet failed "did not answer within 6 s"). Now the give-up ends the stuck
    call's session, and the next call logs in afresh."""
    power = PowerController(CREDS, reactor, call_timeout=4)
    try:
        assert await power.status("node01", ipmisim.address) == "off"
        (ipmisim.root / "delay").write_text("3\n")  # the chassis program answers in 3 s: the call is in flight
        pending = power.status("node01", ipmisim.address)
        await task.deferLater(reactor, 1.0, lambda: None)
        assert ipmisim.process is not None
        os.kill(ipmisim.process.pid, signal.SIGKILL)  # the BMC dies mid-call
        ipmisim.process.wait(5)
        ipmisim.process = None
        (ipmisim.root / "delay").unlink()
        await threads.deferToThread(ipmisim.start)  # same port, no memory of the session
        ipmisim.power = "on"
        with pytest.raises(PowerError, match="did not answer"):
            await pending
        assert await power.status("node01", ipmisim.address) == "on"  # within call_timeout, or PowerError
    finally:
        power.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_wrong_password_fails_with_a_power_error_naming_the_bmc(ipmisim: IpmiSim) -> None:
    power = PowerController(BmcCredentials(USER, "wrong-password"), reactor, call_timeout=15)
    try:
        with pytest.raises(PowerError) as err:
            await power.status("node07", ipmisim.address)
    finally:
        power.stop()
    assert err.value.message.startswith(f"BMC of node07 ({ipmisim.address}) failed: Incorrect password")
    assert "wrong-password" not in err.value.message


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_unanswering_bmc_fails_in_time_and_does_not_hold_up_other_bmcs(ipmisim: IpmiSim,
                                                                               tmp_path: Path) -> None:
    """A dead BMC fails with its own message at the timeout; the other BMCs' calls go on meanwhile.

    Found here first: with pyghmi as shipped, a *first* login to another BMC while a login to a dead BMC is
    retrying was delayed by about a second per step (lost wake-ups in pyghmi's I/O loop); cidd applies
    cidd.pyghmi_io, which bounds that delay (tests/test_pyghmi_io.py, bench/bmc_logins.py).
    """
    other = IpmiSim(tmp_path / "cold").start()
    dead, port = dead_udp_port()
    power = PowerController(CREDS, reactor, max_concurrent=4, call_timeout=4)
    try:
        assert await power.status("node01", ipmisim.address) == "off"  # node01's session exists already
        started = time.monotonic()
        stuck = power.status("node03", f"127.0.0.1:{port}")
        cold = power.status("node02", other.address)  # a first login, racing node03's
        for _ in range(5):
            assert await power.status("node01", ipmisim.address) == "off"
        assert not stuck.called  # the other BMC's calls went on while the dead one was still being tried
        assert await cold == "off"
        assert not stuck.called
        with pytest.raises(PowerError) as err:
            await stuck
        assert time.monotonic() - started >= 3.9  # not given up before its call_timeout (no upper bound: noisy CI)
        assert err.value.message == (f"BMC of node03 (127.0.0.1:{port}) did not answer within 4 s; "
                                     "check its network and credentials")
    finally:
        dead.close()
        other.stop()
        await threads.deferToThread(power.stop)  # waits for pyghmi to give up on the dead BMC (about 5 s)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_at_most_max_concurrent_bmc_calls_at_once(tmp_path: Path) -> None:
    sims = [IpmiSim(tmp_path / f"bmc{i}") for i in range(4)]
    active = 0
    peak = 0
    lock = threading.Lock()

    class Counting(PowerController):
        def _in_thread(self, *args: Any) -> Any:
            nonlocal active, peak
            with lock:
                active += 1
                peak = max(peak, active)
            try:
                return super()._in_thread(*args)
            finally:
                with lock:
                    active -= 1

    power = Counting(CREDS, reactor, max_concurrent=2, call_timeout=20, yield_after=None)  # no call gives up its slot
    try:
        for sim in sims:
            sim.start()
            (sim.root / "delay").write_text("0.3\n")  # each chassis script call takes 0.3 s
        started = time.monotonic()
        results = await defer.gatherResults(
            [power.status(f"node{i:02d}", sims[i % 4].address) for i in range(8)], consumeErrors=True)
        elapsed = time.monotonic() - started
    finally:
        power.stop()
        for sim in sims:
            sim.stop()
    assert results == ["off"] * 8
    assert peak == 2
    assert elapsed >= 4 * 0.3  # 8 calls, 2 at a time, 0.3 s or more each


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_dead_bmcs_asked_first_fail_only_their_own_nodes(tmp_path: Path) -> None:
    """The report: dead BMCs' calls held every slot for pyghmi's ~5 s each, the healthy BMCs' calls queued behind
    them timed out unsent, and healthy nodes failed with "did not answer". Four dead BMCs (closed UDP ports), each
    asked twice, then two healthy ipmi_sim BMCs, with two slots: the healthy calls answer, each dead call fails
    with a reason naming its own node and BMC."""
    healthy = [IpmiSim(tmp_path / f"ok{i}") for i in range(2)]
    dead_ports = []
    for _ in range(4):
        sock, port = dead_udp_port()
        sock.close()  # nothing listens there any more
        dead_ports.append(port)
    power = PowerController(CREDS, reactor, max_concurrent=2, call_timeout=8)
    try:
        for sim in healthy:
            await threads.deferToThread(sim.start)
        healthy[1].power = "on"
        started = time.monotonic()
        dead = {f"dead{i}{round_}": power.status(f"dead{i}{round_}", f"127.0.0.1:{port}")
                for i, port in enumerate(dead_ports) for round_ in "ab"}
        live = [power.status(f"ok{i}", sim.address) for i, sim in enumerate(healthy)]
        answers = await defer.gatherResults(live, consumeErrors=True)
        answered_after = time.monotonic() - started
        assert answers == ["off", "on"]
        reasons = {}
        for node, d in dead.items():
            with pytest.raises(PowerError) as err:
                await d
            reasons[node] = err.value.message
        print(f"healthy BMCs answered after {answered_after:.2f} s; dead: {reasons}")
        for i, port in enumerate(dead_ports):
            for round_ in "ab":
                assert reasons[f"dead{i}{round_}"].startswith(f"BMC of dead{i}{round_} (127.0.0.1:{port}) did not "
                                                              "answer"), reasons
    finally:
        await threads.deferToThread(power.stop)  # waits for pyghmi to give up on the dead BMCs
        for sim in healthy:
            sim.stop()


# -- simulated fleet BMCs ------------------------------------------------------------------------------------------

class TinyCidd(Protocol):
    """Just enough of cidd: answers hello and heartbeats; tells the factory about hellos and closed sessions."""

    def connectionMade(self) -> None:
        self.buffer = LineBuffer()
        self.node: str | None = None

    def dataReceived(self, data: bytes) -> None:
        for line in self.buffer.feed(data):
            message = decode(line)
            if message["type"] == "hello":
                self.node = message["node"]
                self.transport.write(encode({"type": "reply", "id": message["id"], "proto": 1, "heartbeat": 5.0,
                                             "session": "s"}))
                self.factory.event(message)
            elif message["type"] == "heartbeat":
                self.transport.write(encode({"type": "reply", "id": message["id"]}))

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.event({"type": "closed", "node": self.node})


class TinyCiddFactory(Factory):
    protocol = TinyCidd

    def __init__(self) -> None:
        self.waiters: list[tuple[Any, defer.Deferred[dict[str, Any]]]] = []

    def event(self, message: dict[str, Any]) -> None:
        for waiter in list(self.waiters):
            predicate, d = waiter
            if predicate(message):
                self.waiters.remove(waiter)
                d.callback(message)

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> defer.Deferred[dict[str, Any]]:
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.waiters.append((predicate, d))
        return d.addTimeout(timeout, reactor)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_simulated_bmc_power_drops_and_restores_the_agent_session(tmp_path: Path) -> None:
    require_ipmitool()
    factory = TinyCiddFactory()
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    fleet = SimFleet(["sim01", "sim02"], "127.0.0.1", listening.getHost().port, TOKEN, tmp_path, reactor,
                     config=SimConfig(reboot_delay=0.1))
    bmcs = SimBmcs(fleet.nodes, free_udp_port(), "admin", "simpw")
    port = bmcs.ports["sim01"]

    def ipmitool(*args: str) -> defer.Deferred[str]:
        d = threads.deferToThread(run_ipmitool, port, "admin", "simpw", *args)
        return d.addCallback(lambda result: result.stdout.strip())

    try:
        fleet.startService()
        await fleet.when_announced().addTimeout(10, reactor)
        bmcs.start()
        assert await ipmitool("chassis", "power", "status") == "Chassis Power is on"

        closed = factory.wait_for(lambda m: m["type"] == "closed" and m["node"] == "sim01")
        assert await ipmitool("chassis", "power", "off") == "Chassis Power Control: Down/Off"
        await closed
        assert fleet.nodes["sim01"].state == "off" and fleet.nodes["sim02"].state == "up"
        assert await ipmitool("chassis", "power", "status") == "Chassis Power is off"

        back = factory.wait_for(lambda m: m["type"] == "hello" and m["node"] == "sim01")
        assert await ipmitool("chassis", "power", "on") == "Chassis Power Control: Up/On"
        assert (await back)["mode"] == "system"
        assert await ipmitool("chassis", "power", "status") == "Chassis Power is on"

        installer = factory.wait_for(lambda m: m["type"] == "hello" and m["node"] == "sim01")
        await ipmitool("chassis", "bootdev", "pxe")
        await ipmitool("chassis", "power", "cycle")
        assert (await installer)["mode"] == "installer"  # network boot once ...
        disk = factory.wait_for(lambda m: m["type"] == "hello" and m["node"] == "sim01")
        await ipmitool("chassis", "power", "reset")
        assert (await disk)["mode"] == "system"  # ... then the disk again
    finally:
        await threads.deferToThread(bmcs.stop)
        await fleet.stopService().addTimeout(10, reactor)
        await listening.stopListening()


def require_ipmitool() -> None:
    """Fail (saying ``make test`` installs it) when ipmitool is missing."""
    from tests.ipmisim import require

    require("ipmitool")


class FleetWithBmcs:
    """A ``cid-simfleet HOSTLIST`` process (default ``sim[01-02]``) whose nodes have BMCs on ``base``, ``base + 1``,
    ... (user ``admin``, password ``simpw``), connected to a TinyCidd (``factory``) over plain TCP: these tests are
    about the BMCs."""

    def __init__(self, tmp_path: Path, hostlist: str = "sim[01-02]", count: int = 2) -> None:
        self.tmp_path = tmp_path
        self.hostlist = hostlist
        self.factory = TinyCiddFactory()
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.token_file = tmp_path / "agent.token"
        self.token_file.write_text(TOKEN + "\n")
        self.token_file.chmod(0o600)
        self.creds = tmp_path / "bmc.cred"
        self.creds.write_text("admin:simpw\n")
        self.creds.chmod(0o600)
        self.base = free_udp_port() if count <= 2 else free_udp_block(count)
        self.log_path = tmp_path / "fleet.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        """Start the fleet process (register ``factory.wait_for`` waiters first)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cidsim.main", self.hostlist, "--server",
                 f"127.0.0.1:{self.listening.getHost().port}", "--token-file", str(self.token_file),
                 "--sim-dir", str(self.tmp_path / "sim"), "--bmc-base-port", str(self.base),
                 "--bmc-credentials", str(self.creds), "--plain-tcp", *extra],
                stdout=log, stderr=subprocess.STDOUT)

    async def stop(self) -> None:
        """Stop the fleet process by PID (TERM, then KILL after 10 s) and the TinyCidd."""
        if self.process is not None:
            self.process.terminate()
            try:
                await threads.deferToThread(self.process.wait, 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        await self.listening.stopListening()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_power_controller_drives_the_simulated_fleet(tmp_path: Path) -> None:
    """cidd's PowerController (pyghmi client) against a ``cid-simfleet`` fleet's BMCs in their own process.

    Client and BMC servers run in separate processes, as in production: pyghmi keeps process-wide session
    state, and a client and a server sharing one process can wait on each other.
    """
    require_ipmitool()
    fleet = FleetWithBmcs(tmp_path)
    factory, base = fleet.factory, fleet.base
    announced = [factory.wait_for(lambda m, n=n: m["type"] == "hello" and m["node"] == n, timeout=30)
                 for n in ("sim01", "sim02")]
    fleet.start("--reboot-delay", "0.1")
    power = PowerController(BmcCredentials("admin", "simpw"), reactor, call_timeout=10)
    address = f"127.0.0.1:{base + 1}"  # sim02
    try:
        await defer.gatherResults(announced)
        assert await power.status("sim02", address) == "on"
        closed = factory.wait_for(lambda m: m["type"] == "closed" and m["node"] == "sim02")
        await power.off("sim02", address)
        await closed
        assert await power.status("sim02", address) == "off"
        out = await threads.deferToThread(run_ipmitool, base + 1, "admin", "simpw", "chassis", "power", "status")
        assert out.stdout.strip() == "Chassis Power is off"
        out = await threads.deferToThread(run_ipmitool, base, "admin", "simpw", "chassis", "power", "status")
        assert out.stdout.strip() == "Chassis Power is on"  # sim01 untouched
        back = factory.wait_for(lambda m: m["type"] == "hello" and m["node"] == "sim02")
        await power.set_next_boot("sim02", address, "network")
        await power.on("sim02", address)
        assert (await back)["mode"] == "installer"
        again = factory.wait_for(lambda m: m["type"] == "hello" and m["node"] == "sim02")
        await power.cycle("sim02", address)
        assert (await again)["mode"] == "system"
    finally:
        await threads.deferToThread(power.stop)
        await fleet.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_new_login_to_one_simulated_bmc_keeps_the_sessions_of_the_others(tmp_path: Path) -> None:
    """cidd talks to every BMC from one socket; pyghmi's BMC server keys sessions by client address for all the
    BMCs of its process, and a new login to one BMC used to drop the open sessions of all the others."""
    from pyghmi.ipmi.command import Command

    require_ipmitool()
    fleet = FleetWithBmcs(tmp_path)
    base = fleet.base
    announced = fleet.factory.wait_for(lambda m: m["type"] == "hello" and m["node"] == "sim02", timeout=30)
    fleet.start()

    def login(port: int) -> Any:
        return Command(bmc="127.0.0.1", userid=b"admin", password=b"simpw", port=port)

    def scenario() -> tuple[str, int, int]:
        first, second = login(base), login(base + 1)
        assert second.get_power()["powerstate"] == "on"
        session_before = second.ipmi_session.sessionid
        first.ipmi_session.logout()
        assert login(base).get_power()["powerstate"] == "on"  # a new login from the same client address
        state = second.get_power()["powerstate"]  # over the session opened before that login
        return state, session_before, second.ipmi_session.sessionid

    try:
        await announced
        state, before, after = await threads.deferToThread(scenario)
        assert state == "on"
        assert after == before, "sim02's session was lost and pyghmi had to log in again"
        assert b"simbmc.loop_error" not in fleet.log_path.read_bytes()
    finally:
        await fleet.stop()


def udp_descriptor(pid: int, port: int) -> int:
    """Return the descriptor number, in process ``pid``, of its UDP socket bound to 127.0.0.1:``port`` (Linux)."""
    inodes = set()
    for line in Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}":
            inodes.add(fields[9])
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return int(entry.name)
    raise LookupError(f"process {pid} has no UDP socket on 127.0.0.1:{port}")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_more_than_a_thousand_simulated_bmcs_in_one_fleet_process_all_answer(tmp_path: Path) -> None:
    """``cid-simfleet`` with 1,100 nodes: their BMC sockets go past descriptor 1024, where pyghmi's select() loop
    died and no simulated BMC answered any more. The first, a middle and the last BMC answer ipmitool and pyghmi."""
    require_ipmitool()
    count = 1100
    fleet = FleetWithBmcs(tmp_path, hostlist=f"sim[0001-{count}]", count=count)
    power = PowerController(BmcCredentials("admin", "simpw"), reactor, call_timeout=15)
    sample = {"sim0001": 0, f"sim{count // 2:04d}": count // 2 - 1, f"sim{count}": count - 1}
    try:
        started = time.monotonic()
        fleet.start("--log-format", "json")
        assert fleet.process is not None
        while b'"simbmc.started"' not in fleet.log_path.read_bytes():
            assert fleet.process.poll() is None, fleet.log_path.read_text()[-3000:]
            assert time.monotonic() - started < 120, "the simulated BMCs did not start within 120 s"
            await task.deferLater(reactor, 0.2, lambda: None)
        print(f"{count} simulated BMCs started in {time.monotonic() - started:.1f} s")
        last_fd = udp_descriptor(fleet.process.pid, fleet.base + count - 1)
        assert last_fd > 1024, f"the last BMC's socket is descriptor {last_fd}: not the situation of the report"
        print(f"the last BMC's socket is descriptor {last_fd}")
        for name, offset in sample.items():
            out = await threads.deferToThread(run_ipmitool, fleet.base + offset, "admin", "simpw", "chassis",
                                              "power", "status", timeout=30)
            # on, or off while the fleet's start-up ramp has not reached the node yet
            assert out.stdout.strip() in ("Chassis Power is on", "Chassis Power is off"), (name, out.stderr)
        answers = await defer.gatherResults(
            [power.status(name, f"127.0.0.1:{fleet.base + offset}") for name, offset in sample.items()],
            consumeErrors=True)
        assert set(answers) <= {"on", "off"}, answers
        assert b"simbmc.loop_error" not in fleet.log_path.read_bytes()
    finally:
        await threads.deferToThread(power.stop)
        stopping = time.monotonic()
        await fleet.stop()
        print(f"fleet stopped in {time.monotonic() - stopping:.1f} s")
    assert fleet.process.returncode == 0, fleet.log_path.read_text()[-3000:]  # stopped by TERM, not killed


@pytest_twisted.ensureDeferred
async def test_stop_abandons_a_call_stuck_in_pyghmi_and_its_thread_is_a_daemon() -> None:
    release = threading.Event()

    def stuck_factory(host: str, port: int, user: bytes, password: bytes) -> Any:
        release.wait(60)
        raise OSError("released")

    power = PowerController(CREDS, reactor, call_timeout=0.2, command_factory=stuck_factory)
    with pytest.raises(PowerError, match=r"did not answer within 0.2 s"):
        await power.status("node01", "127.0.0.1:9")
    workers = [t for t in threading.enumerate() if "cidd-power" in t.name]
    assert workers and all(t.daemon for t in workers)
    with capture_logs() as logs:
        power.stop(wait=0.3)
    assert [e["event"] for e in logs] == ["power.stop_abandoned"]
    release.set()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_call_whose_caller_gave_up_while_queued_is_never_sent(tmp_path: Path) -> None:
    """A power cycle still waiting for a BMC slot when the ladder gives up on it must not reach the node later.

    Two real ipmi_sim BMCs: the first answers slowly (its chassis takes 1 s) and holds the only slot; calls to
    the second queue behind it, and their callers give up (a timeout, a cancel) before the slot frees.
    """
    slow_bmc, other = IpmiSim(tmp_path / "slow"), IpmiSim(tmp_path / "other")
    power = PowerController(CREDS, reactor, max_concurrent=1, call_timeout=10)
    try:
        slow_bmc.start()
        other.start()
        (slow_bmc.root / "delay").write_text("1\n")
        seen_slow, seen_other = len(slow_bmc.calls()), len(other.calls())  # start() checked each with ipmitool
        slow = power.status("node01", slow_bmc.address)  # its caller waits up to 10 s: it keeps the slot
        power.call_timeout = 0.3
        with capture_logs() as logs:
            with pytest.raises(PowerError) as err:
                await power.on("node02", other.address)  # queued behind node01, then timed out
            assert err.value.message.startswith(f"BMC of node02 ({other.address}) was never contacted: BMC queue "
                                                "full (1 call waiting for 1 slot) for 0.3 s")
            cancelled = power.on("node03", other.address)
            cancelled.cancel()
            with pytest.raises(defer.CancelledError):
                await cancelled
            assert await slow == "off"  # it held the slot until it answered
            power.call_timeout = 20
            assert await power.status("node04", other.address) == "off"  # the slot is free again
    finally:
        power.stop()
        slow_bmc.stop()
        other.stop()
    assert set(slow_bmc.calls()[seen_slow:]) == {"get power"}  # pyghmi may resend to a slow BMC
    assert other.calls()[seen_other:] == ["get power"] and other.power == "off"  # neither "on" reached it
    skipped = [(e["node"], e["action"]) for e in logs if e["event"] == "power.skipped"]
    assert skipped == [("node02", "on"), ("node03", "on")]
