"""Real-process helpers for end-to-end tests: cidd, a simulated cidkid fleet and cidcapt on loopback.

Every process is started by the test and stopped by PID; servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cidsim import placeholder_images

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "images.yaml"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_udp_block(count: int, rng: random.Random | None = None) -> int:
    """Return a base port such that base .. base+count-1 were free UDP ports on 127.0.0.1 a moment ago.

    The search starts at a random port (from ``rng`` when given, for a seeded bench): pyghmi's client in a test
    process keeps the sessions other tests left open, keyed by address, and a new BMC on an old address would
    be spoken to through a stale session. Raises RuntimeError when no block is free.
    """
    start = (rng or random).randrange(20000, 40000)
    for base in range(start, 60000 - count, 97):
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no free block of {count} UDP ports on 127.0.0.1")


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Return once 127.0.0.1:port accepts connections; raise TimeoutError otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _env(state_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CID_STATE_DIR"] = str(state_dir)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CID_SERVER", None)
    return env


@dataclass
class Cluster:
    """A cidd process (and optionally simulated fleets) under ``root``."""

    root: Path
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    groups: dict[str, Any] = field(default_factory=dict)
    nodes: list[dict[str, str]] = field(default_factory=list)
    heartbeat: float = 1.0
    extra_config: dict[str, Any] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)  # for every cidkid and cidcapt (e.g. CID_PLAIN_TCP)
    cidd: subprocess.Popen | None = None
    fleets: list[subprocess.Popen] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The cluster CA certificate cidd created at its first start."""
        return self.state_dir / "tls" / "ca.pem"

    def tls_connect(self, timeout: float = 5.0) -> ssl.SSLSocket:
        """Return a TLS connection to cidd's agent/client port, cidd's certificate verified with the cluster CA."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            return context.wrap_socket(sock, server_hostname="127.0.0.1")
        except BaseException:
            sock.close()
            raise

    @property
    def db(self) -> Path:
        return self.state_dir / "cidd.sqlite"

    @property
    def catalog(self) -> Path:
        """This cluster's own copy of the sample catalog (tests may change it)."""
        return self.root / "images.yaml"

    def write_config(self) -> Path:
        """Write cidd.yaml (and the catalog copy, once) for this cluster and return its path."""
        if not self.catalog.exists():
            self.catalog.write_text(CATALOG.read_text())
        image_dir = Path(self.extra_config.get("image_dir") or self.state_dir / "images")
        placeholder_images(self.catalog, image_dir)  # cidd offers only the images whose file it has
        config = {
            "state_dir": str(self.state_dir), "catalog": str(self.catalog),
            "listen": {"host": "127.0.0.1", "port": self.port},
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "heartbeat": self.heartbeat, "request_timeout": 5,
            "groups": self.groups, "log": {"format": "json"},
        }
        config.update(self.extra_config)
        if self.nodes:
            config["nodes"] = self.nodes
            config["auto_register"] = True
        path = self.root / "cidd.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start_cidd(self) -> subprocess.Popen:
        """Start cidd and wait until it listens."""
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        log = open(self.root / "cidd.log", "ab")  # noqa: SIM115 - closed with the process
        self.cidd = subprocess.Popen([sys.executable, "-m", "cidd.main", "--config", str(config)],
                                     stdout=log, stderr=subprocess.STDOUT, env=_env(self.state_dir))
        wait_port(self.port)
        return self.cidd

    def start_fleet(self, hostlist: str, *extra: str) -> subprocess.Popen:
        """Start ``cid-simfleet HOSTLIST`` against this cidd."""
        log = open(self.root / f"fleet-{len(self.fleets)}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "cidsim.main", hostlist, "--server", self.server,
             "--sim-dir", str(self.root / "sim"), *extra],
            stdout=log, stderr=subprocess.STDOUT, env={**_env(self.state_dir), **self.extra_env})
        self.fleets.append(proc)
        return proc

    def cidcapt(self, *args: str, timeout: float = 120.0, role: str | None = None) -> subprocess.CompletedProcess:
        """Run cidcapt against this cidd and return the finished process (text output)."""
        env = {**_env(self.state_dir), **self.extra_env}
        if role:
            env["CID_ROLE"] = role
        return subprocess.run([sys.executable, "-m", "cidcapt.main", "--server", self.server, *args],
                              capture_output=True, text=True, timeout=timeout, env=env)

    def cidcapt_background(self, *args: str) -> subprocess.Popen:
        """Start cidcapt against this cidd without waiting; return the process (output discarded)."""
        return subprocess.Popen([sys.executable, "-m", "cidcapt.main", "--server", self.server, *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**_env(self.state_dir), **self.extra_env})

    def status(self, hostlist: str | None = None) -> dict[str, dict[str, Any]]:
        """Return {node: status row} from ``cidcapt --status --json``."""
        args = ["--status", *([hostlist] if hostlist else []), "--json"]
        result = self.cidcapt(*args)
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)
        return {row["node"]: row for row in rows}

    def wait_online(self, count: int, timeout: float = 60.0) -> None:
        """Return once ``count`` nodes are online; raise TimeoutError otherwise."""
        end = time.monotonic() + timeout
        online = 0
        while time.monotonic() < end:
            online = sum(1 for row in self.status().values() if row["online"])
            if online >= count:
                return
            time.sleep(0.2)
        raise TimeoutError(f"only {online} of {count} nodes online after {timeout}s")

    def kill_cidd(self, sig: int = signal.SIGKILL) -> None:
        """Stop cidd with ``sig`` and wait for it."""
        if self.cidd is not None and self.cidd.poll() is None:
            self.cidd.send_signal(sig)
            self.cidd.wait(timeout=20)

    def stop(self) -> None:
        """Stop every process this cluster started (by PID)."""
        for proc in [*self.fleets, self.cidd]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.fleets, self.cidd]:
            if proc is None:
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_events(self) -> list[dict[str, Any]]:
        """Return cidd's JSON log events."""
        events = []
        for line in (self.root / "cidd.log").read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
        return events
