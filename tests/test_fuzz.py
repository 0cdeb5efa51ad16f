"""Bounded protocol fuzzing of a real cidd on both ports, and unsafe secrets files refused at start.

Random and mutated lines go to the agent/client port and random requests to the HTTP port for a bounded
time; afterwards cidd must still serve a normal capture, and its memory must not have grown without bound.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.procs import Cluster, _env, free_port

pytestmark = pytest.mark.slow

VALID = [
    {"type": "hello", "id": 1, "proto": 1, "role": "admin", "token": "x"},
    {"type": "hello", "id": 1, "proto": 1, "role": "agent", "token": "x", "node": "n1", "mode": "system",
     "image": None, "boot_id": "b"},
    {"type": "capture", "id": 2, "job": "1", "nodes": "node[01-02]", "image": "debian-12-1", "watch": True},
    {"type": "status", "id": 3, "nodes": "node01"},
    {"type": "heartbeat", "id": 4, "load1": 0.1},
    {"type": "installed", "image": "debian-12-1", "ok": True},
]


def mutate(rng: random.Random) -> bytes:
    """Return one fuzzed line: mutated JSON, random bytes, deep nesting, huge numbers, or odd types."""
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 300)) + b"\n"
    if kind == 1:
        return b"[" * rng.randrange(1, 5000) + b"\n"
    if kind == 2:
        return json.dumps({"type": rng.choice(["capture", "hello", "status"]), "id": 10 ** rng.randrange(400),
                           "nodes": "n[" + "9" * rng.randrange(1, 40) + "]"}).encode() + b"\n"
    if kind == 3:
        message = dict(rng.choice(VALID))
        key = rng.choice(list(message))
        message[key] = rng.choice([None, [], {}, -1, 1e308, "", "x" * rng.randrange(1, 2000), True])
        return json.dumps(message).encode() + b"\n"
    if kind == 4:
        line = bytearray(json.dumps(rng.choice(VALID)).encode())
        for _ in range(rng.randrange(1, 6)):
            line[rng.randrange(len(line))] = rng.randrange(256)
        return bytes(line).replace(b"\n", b" ") + b"\n"
    if kind == 5:
        return b"x" * rng.randrange(60000, 70000) + b"\n"
    return b"\r\n" * rng.randrange(1, 50)


def test_fuzzing_both_ports_leaves_cidd_serving_with_bounded_memory(tmp_path) -> None:
    cluster = Cluster(tmp_path)
    cluster.start_cidd()
    rng = random.Random(20261121)
    try:
        cluster.start_fleet("node[01-02]", "--reboot-delay", "0.1", "--install-time", "0.1",
                            "--initial-image", "debian-12-1")
        cluster.wait_online(2)
        proc = psutil.Process(cluster.cidd.pid)
        rss_before = proc.memory_info().rss
        admin_token = (cluster.state_dir / "secrets" / "admin.token").read_text().strip()
        end = time.monotonic() + 20
        middle = end - 10
        rss_middle = None
        sessions = lines = 0
        while time.monotonic() < end:
            if rss_middle is None and time.monotonic() >= middle:
                rss_middle = proc.memory_info().rss
            plain = rng.random() < 0.1  # a tenth of the sessions speak clear text to the TLS port: refused
            with (socket.create_connection(("127.0.0.1", cluster.port), timeout=5) if plain
                  else cluster.tls_connect()) as sock:
                sessions += 1
                if rng.random() < 0.5:  # half of the sessions fuzz after a valid hello
                    hello = {"type": "hello", "id": 1, "proto": 1, "role": "admin", "token": admin_token}
                    try:
                        sock.sendall(json.dumps(hello).encode() + b"\n")
                    except OSError:
                        pass  # the TLS port already refused a clear-text session
                for _ in range(rng.randrange(1, 20)):
                    try:
                        sock.sendall(mutate(rng))
                        lines += 1
                    except OSError:
                        break  # cidd closed a session that misbehaved: that is allowed
            if rng.random() < 0.3:
                with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=5) as web:
                    path = rng.choice(["/images/", "/boot/", "/status", "/metrics", "/"]) + rng.randbytes(8).hex()
                    web.sendall(rng.choice([f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=9-1\r\n\r\n".encode(),
                                            rng.randbytes(200), b"GET /" + b"a" * 20000 + b" HTTP/1.0\r\n\r\n"]))
                    web.settimeout(0.3)
                    try:
                        web.recv(100)
                    except OSError:
                        pass
        assert cluster.cidd.poll() is None, "cidd died under fuzzing"
        assert any(e.get("event") == "security.tls_refused" for e in cluster.log_events())
        result = cluster.cidcapt("-j", "after-fuzz", "-n", "node[01-02]", "-i", "debian-12-2")
        assert result.returncode == 0, result.stderr
        rss_after = proc.memory_info().rss
        first, second = (rss_middle - rss_before) / 2**20, (rss_after - rss_middle) / 2**20
        print(f"fuzzed {sessions} sessions, {lines} lines in 20 s; cidd RSS grew {first:.1f} MiB in the first "
              f"10 s and {second:.1f} MiB in the next 10 s")
        # RSS is a coarse bound; tests/test_sessions.py checks with tracemalloc that no Python object is kept per
        # bad session. (Before Twisted's log buffer was disabled, this grew by 10-15 MiB every 10 s.)
        assert sessions > 100 and first + second < 32
        assert second < 8, "memory keeps growing under fuzzing"
    finally:
        cluster.stop()


def test_cidd_refuses_to_start_with_a_secrets_file_readable_by_others(tmp_path) -> None:
    state = tmp_path / "state"
    (state / "secrets").mkdir(parents=True)
    bad = state / "secrets" / "admin.token"
    bad.write_text("a-token-that-others-can-read\n")
    os.chmod(bad, 0o644)
    result = subprocess.run([sys.executable, "-m", "cidd.main", "--listen", f"127.0.0.1:{free_port()}"],
                            env=_env(state), capture_output=True, text=True, timeout=60)
    assert result.returncode == 4
    assert str(bad) in result.stderr and "chmod 600" in result.stderr
    assert "a-token-that-others-can-read" not in result.stderr
    assert not (state / "cidd.sqlite").exists(), "nothing was started"
