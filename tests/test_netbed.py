"""The network bed itself (tests/netbed.py): isolation, shaping, loss, and that nothing is left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.netbed import NetBed, bed_namespaces, missing_tools

pytestmark = pytest.mark.slow

SERVE = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9100)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); c.sendall(b"x" * int(sys.argv[2])); c.close()
"""
FETCH = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 9100), timeout=30); t = time.monotonic(); n = 0
while (b := s.recv(1 << 16)):
    n += len(b)
print(n, time.monotonic() - t)
"""


def need_bed() -> None:
    """Skip when the bed cannot be built here, except in CI (CI=true), where a missing tool fails the test."""
    missing = missing_tools()
    if missing:
        message = f"the network bed needs {', '.join(missing)} (make sysdeps installs the tools; run as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def timed_transfer(bed: NetBed, nbytes: int) -> float:
    """Return the seconds node02 takes to receive ``nbytes`` from node01 over TCP."""
    server = bed.popen(bed.nodes[0], [sys.executable, "-c", SERVE, bed.nodes[0].address, str(nbytes)],
                       stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    done = bed.run(bed.nodes[1], [sys.executable, "-c", FETCH, bed.nodes[0].address], timeout=60)
    assert done.returncode == 0, done.stderr
    received, seconds = done.stdout.split()
    assert int(received) == nbytes
    return float(seconds)


def test_the_bed_is_isolated_shaped_and_removed() -> None:
    need_bed()
    before = set(bed_namespaces())
    with NetBed(2, rate_mbit=20) as bed:
        names = {h.netns for h in bed.hosts} | {bed.switch}
        assert names <= set(bed_namespaces())
        # Only the bed's own /24 is routable inside it: no default route, so nothing can leave (checked with
        # `ip route get`, which sends nothing).
        for host in bed.hosts:
            routes = bed.run(host, ["ip", "-4", "route", "show"]).stdout
            assert "default" not in routes and f"{bed.subnet}.0/24" in routes
            outside = bed.run(host, ["ip", "route", "get", "192.0.2.1"])
            assert outside.returncode != 0 and "unreachable" in outside.stderr.lower()
            links = bed.run(host, ["ip", "-o", "link", "show"]).stdout
            assert {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()} == {"lo", "eth0"}
        # The machine's own namespace got no interface of the bed.
        assert "cidnb" not in subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        # 20 Mbit/s: 5 MB take about 2 s (tbf lets a 64 KiB burst through at once).
        seconds = timed_transfer(bed, 5_000_000)
        assert 1.6 < seconds < 4.0, seconds
        sent = bed.tx_bytes(bed.nodes[0])
        assert sent >= 5_000_000
        # Loss: 5 % of the packets of every link are dropped (and counted), the transfer still completes.
        bed.set_loss(5)
        started = time.monotonic()
        timed_transfer(bed, 200_000)
        assert bed.dropped(bed.nodes[0]) + bed.dropped(bed.nodes[1]) > 0
        assert time.monotonic() - started < 60
    assert set(bed_namespaces()) == before
    assert "cidnb" not in subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


def test_processes_of_the_bed_are_stopped_with_it() -> None:
    need_bed()
    with NetBed(1, rate_mbit=None) as bed:
        proc = bed.popen(bed.nodes[0], ["sleep", "300"])
        assert proc.poll() is None
    assert proc.returncode is not None
