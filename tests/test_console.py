"""Serial-over-LAN console through cidd, against a real SOL endpoint.

OpenIPMI's ipmi_sim offers SOL on its LAN channel and connects its serial side to a TCP address
(``sol "tcp:127.0.0.1:PORT"`` in lan.conf): the test holds that socket as the node's serial port. A real cidd
opens pyghmi's SOL console to ipmi_sim and relays it to a real ``cidcapt --console`` process: bytes typed
into cidcapt reach the serial port, bytes written on the serial port come out of cidcapt, ``~.`` detaches.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cidcapt.console import EscapeScanner
from tests.ipmisim import PASSWORD, USER, IpmiSim
from tests.procs import Cluster, _env

pytestmark = pytest.mark.slow


def test_escape_scanner_detaches_on_tilde_dot_at_a_line_start_only() -> None:
    scanner = EscapeScanner()
    assert scanner.feed(b"ls ~/x\r") == (b"ls ~/x\r", False)  # ~ inside a line is data
    assert scanner.feed(b"~~") == (b"~", False)  # ~~ sends one ~
    scanner = EscapeScanner()
    assert scanner.feed(b"a\r~") == (b"a\r", False)  # a lone ~ waits for the next byte
    assert scanner.feed(b"x") == (b"~x", False)
    scanner = EscapeScanner()
    assert scanner.feed(b"echo\n~.rest") == (b"echo\n", True)
    assert EscapeScanner().feed(b"~.") == (b"", True)  # the very first byte is a line start


class Serial:
    """The node's serial port: the TCP socket ipmi_sim's SOL connects to."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.received = b""

    def accept(self, timeout: float = 20.0) -> None:
        self.listener.settimeout(timeout)
        self.conn, _ = self.listener.accept()

    def read_until(self, wanted: bytes, timeout: float = 20.0) -> bytes:
        assert self.conn is not None
        end = time.monotonic() + timeout
        while wanted not in self.received and time.monotonic() < end:
            self.conn.settimeout(0.2)
            try:
                chunk = self.conn.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                break
            self.received += chunk
        return self.received

    def close(self) -> None:
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()


class Output:
    """Collects a process's stdout in a thread."""

    def __init__(self, stream) -> None:
        self.data = b""
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        while chunk := os.read(stream.fileno(), 4096):
            self.data += chunk

    def wait_for(self, wanted: bytes, timeout: float = 20.0) -> bytes:
        end = time.monotonic() + timeout
        while wanted not in self.data and time.monotonic() < end:
            time.sleep(0.05)
        return self.data


@contextlib.contextmanager
def console_process(cluster: Cluster, node: str, stdin: Any = subprocess.PIPE,
                    stdout: Any = subprocess.PIPE) -> Iterator[subprocess.Popen]:
    """Run ``cidcapt --console NODE`` against ``cluster``; kill it (by PID) if a test leaves it running."""
    proc = subprocess.Popen([sys.executable, "-m", "cidcapt.main", "--server", cluster.server, "--console", node],
                            stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=_env(cluster.state_dir))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def type_until_received(write: Callable[[bytes], object], serial: Serial, data: bytes) -> None:
    """Type ``data`` into the console until it shows up on the serial side (SOL may take a moment to open)."""
    deadline = time.monotonic() + 30
    while data not in serial.received and time.monotonic() < deadline:
        write(data)
        serial.read_until(data, timeout=2)
    assert data in serial.received, f"{data!r} typed into cidcapt did not reach the serial port"


def pipe_writer(proc: subprocess.Popen) -> Callable[[bytes], object]:
    """Return a function writing bytes to ``proc``'s stdin at once."""
    assert proc.stdin is not None
    stdin = proc.stdin

    def write(data: bytes) -> None:
        stdin.write(data)
        stdin.flush()

    return write


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    serial = Serial()
    sim = IpmiSim(root / "bmc", sol=f"tcp:127.0.0.1:{serial.port}")
    sim.start()
    creds = root / "bmc.cred"
    creds.write_text(f"{USER}:{PASSWORD}\n")
    creds.chmod(0o600)
    # n01's BMC is ipmi_sim; n02's address is the next UDP port, where nothing answers
    cluster = Cluster(root / "cid", nodes=[{"hosts": "n[01-02]"}], extra_config={
        "bmc": {"address": f"127.0.0.1:{{index+{sim.port - 1}}}", "credentials": str(creds), "timeout": 5}})
    try:
        serial.accept()
        cluster.start_cidd()
        yield cluster, serial, sim
    finally:
        cluster.stop()
        sim.stop()
        serial.close()


def test_console_bytes_flow_both_ways_and_tilde_dot_detaches(setup) -> None:
    cluster, serial, _sim = setup
    with console_process(cluster, "n01") as proc:
        out = Output(proc.stdout)
        time.sleep(0.5)
        write = pipe_writer(proc)
        type_until_received(write, serial, b"root\r")
        assert serial.conn is not None
        serial.conn.sendall(b"\r\nnode01 login: ")
        assert b"node01 login: " in out.wait_for(b"node01 login: "), "serial output did not reach cidcapt"
        write(b"\r~.")
        assert proc.wait(timeout=20) == 0
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "console of n01" in err and "closed" in err
    assert PASSWORD not in err and PASSWORD.encode() not in out.data
    assert b"~." not in serial.read_until(b"~.", timeout=1)  # the escape is not sent to the node
    events = [e.get("event") for e in cluster.log_events()]
    assert "client.console" in events and "console.closed" in events


def test_console_is_for_admins_only(setup) -> None:
    cluster, _serial, _sim = setup
    result = cluster.cidcapt("--console", "n01", "--role", "reader")
    assert result.returncode == 5, result.stderr
    assert "may not open node consoles" in result.stderr
    result = cluster.cidcapt("--console", "n99")
    assert result.returncode == 2 and "unknown node n99" in result.stderr


def test_a_console_to_a_silent_bmc_fails_with_a_reason_naming_it(setup) -> None:
    cluster, _serial, sim = setup
    with console_process(cluster, "n02") as proc:
        code = proc.wait(timeout=60)  # stdin stays open: only the console's failure ends it
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 1, err
    assert f"SOL console of n02 (BMC 127.0.0.1:{sim.port + 1}) failed" in err


def test_in_a_terminal_keys_go_out_one_by_one_and_the_terminal_is_restored(setup) -> None:
    import pty
    import termios

    cluster, serial, _sim = setup
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    try:
        with console_process(cluster, "n01", stdin=slave, stdout=slave) as proc:
            serial.received = b""
            # no Enter: only a raw terminal lets these through at once
            type_until_received(lambda data: os.write(master, data), serial, b"xyz")
            assert not termios.tcgetattr(slave)[3] & termios.ICANON  # raw while attached
            os.write(master, b"\r~.")
            assert proc.wait(timeout=20) == 0
            assert termios.tcgetattr(slave)[3] == before[3], "the terminal's modes were not restored"
    finally:
        os.close(master)
        os.close(slave)


def test_power_calls_to_the_same_bmc_work_while_its_console_is_open(setup) -> None:
    cluster, serial, _sim = setup
    with console_process(cluster, "n01") as proc:
        write = pipe_writer(proc)
        serial.received = b""
        type_until_received(write, serial, b"1")
        for _ in range(3):  # cidd's BMC pool and the console's SOL session share the BMC (and pyghmi)
            result = cluster.cidcapt("--power", "status", "n01", timeout=60)
            assert result.returncode == 0 and "ok" in result.stdout, result.stderr
        write(b"2")
        assert b"2" in serial.read_until(b"2", timeout=10), "the console stopped relaying after the power calls"
        write(b"\r~.")
        assert proc.wait(timeout=20) == 0
