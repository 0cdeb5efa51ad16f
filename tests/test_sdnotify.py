"""cidd speaks systemd's notify protocol: READY once it listens, WATCHDOG keep-alives, STOPPING at exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cidd.sdnotify import Notifier
from tests.procs import Cluster, _env


def test_notifier_without_socket_does_nothing() -> None:
    assert Notifier({}).ready("x") is False and Notifier({}).watchdog_interval is None


def test_watchdog_interval_is_half_the_timeout_and_only_for_our_pid() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


@pytest.mark.slow
def test_cidd_notifies_ready_watchdog_and_stopping(tmp_path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(20)
        cluster = Cluster(tmp_path / "c")
        cluster.root.mkdir()
        config = cluster.write_config()
        env = {**_env(cluster.state_dir), "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
        proc = subprocess.Popen([sys.executable, "-m", "cidd.main", "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            messages = []
            started = time.monotonic()
            while time.monotonic() - started < 20 and sum("WATCHDOG=1" in m for m in messages) < 3:
                messages.append(sock.recv(4096).decode())
            assert "READY=1" in messages[0] and "STATUS=serving" in messages[0]
            assert sum("WATCHDOG=1" in m for m in messages) >= 3
            socket.create_connection(("127.0.0.1", cluster.port), timeout=5).close()  # READY meant listening
            proc.send_signal(signal.SIGTERM)
            while True:
                message = sock.recv(4096).decode()
                if "STOPPING=1" in message:
                    break
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
