"""cid on the network bed (tests/netbed.py): the real cidd in the head namespace, one real installer per node
namespace (``cidkid --mode installer`` into a directory target), and cidcapt as a prolog runs it.

A node's "reboot" is its reboot command ending the installer (``kill -TERM $PPID``); the harness then plays the
firmware and starts the node's system-mode agent on the installed tree, so that captures end as they do on a
real cluster. Every process is started through the bed (``NetBed.popen``) and so stopped by PID when it closes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.netbed import Host, NetBed

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
AGENT_PORT = 38008
HTTP_PORT = 38080
IMAGE_ID = "bedimg-1-0"


def make_image(directory: Path, mib: int, seed: int = 1, name: str = "bedimg") -> tuple[Path, str, int]:
    """Write ``<name>-1-0.tar.zst`` of about ``mib`` MiB (a small tree of random, so incompressible, files) into
    ``directory``; return (path, sha256, size). The same ``seed`` gives the same bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-1-0.tar.zst"
    rng = random.Random(seed)
    tree = directory / f".{name}-tree"
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "hostname").write_text("bed\n")
    (tree / "data").mkdir(exist_ok=True)
    left = mib << 20
    index = 0
    while left > 0:
        size = min(left, 4 << 20)
        (tree / "data" / f"blob{index:03d}").write_bytes(rng.randbytes(size))
        left -= size
        index += 1
    tar_path = directory / f".{name}.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(tree, arcname=".")
    subprocess.run(["zstd", "-q", "-f", "-1", "-T0", str(tar_path), "-o", str(path)], check=True)
    tar_path.unlink()
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, digest, path.stat().st_size


@dataclass
class Node:
    """One node of the bed: its installer, then its system agent."""

    host: Host
    target: Path
    log: Path
    installer: subprocess.Popen[Any] | None = None
    system: subprocess.Popen[Any] | None = None
    installer_exit: int | None = None


@dataclass
class CidBed:
    """cidd + installers on ``bed``; files under ``root``. ``distribution`` is the default group's section."""

    bed: NetBed
    root: Path
    distribution: Mapping[str, Any] = field(default_factory=lambda: {"method": "http"})
    images: Sequence[tuple[str, Path, str, int, Mapping[str, Any]]] = ()  # (id, path, sha256, size, extra keys)
    install_timeout: float = 300.0
    cidd_env: dict[str, str] = field(default_factory=dict)  # extra environment of cidd (e.g. a PATH)
    cidd: subprocess.Popen[Any] | None = None
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def image_dir(self) -> Path:
        return self.root / "images"

    @property
    def server(self) -> str:
        return f"{self.bed.head.address}:{AGENT_PORT}"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["CID_STATE_DIR"] = str(self.state_dir)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("CID_SERVER", None)
        env.update(extra or {})
        return env

    def write_config(self) -> Path:
        """Write cidd.yaml and the catalog; return cidd.yaml's path."""
        self.root.mkdir(parents=True, exist_ok=True)
        entries = []
        for image_id, path, sha256, size, extra in self.images:
            name, version, sub = image_id.split("-")
            entries.append({"name": name, "version": version, "subversion": sub, "file": path.name,
                            "sha256": sha256, "size": size, **extra})
        (self.root / "images.yaml").write_text(yaml.safe_dump({"images": entries}))
        head = self.bed.head.address
        config = {
            "state_dir": str(self.state_dir), "catalog": str(self.root / "images.yaml"),
            "image_dir": str(self.image_dir),
            "listen": {"host": head, "port": AGENT_PORT}, "http": {"host": head, "port": HTTP_PORT},
            "tls": {"san": [head]}, "heartbeat": 2.0, "request_timeout": 10, "log": {"format": "json"},
            "socket": {"enabled": False},
            "groups": {"default": {"ladder": [{"method": "reboot", "timeout": 60}],
                                   "install_timeout": self.install_timeout, "install_attempts": 1,
                                   "distribution": dict(self.distribution)}},
            "auto_register": True,
        }
        path = self.root / "cidd.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    # --- processes ------------------------------------------------------------------------------------

    def start_cidd(self) -> None:
        """Start cidd in the head namespace; return once its agent port answers."""
        config = self.write_config()
        log = open(self.root / "cidd.log", "ab")  # noqa: SIM115 - closed with the process
        self.cidd = self.bed.popen(self.bed.head, [PYTHON, "-m", "cidd.main", "--config", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT, env=self.env(self.cidd_env))
        end = time.monotonic() + 30
        while time.monotonic() < end:
            done = self.bed.run(self.bed.head, [PYTHON, "-c", "import socket,sys; socket.create_connection("
                                                f"('{self.bed.head.address}', {AGENT_PORT}), timeout=1).close()"],
                                timeout=10)
            if done.returncode == 0:
                return
            if self.cidd.poll() is not None:
                raise RuntimeError(f"cidd exited {self.cidd.returncode}: "
                                   + (self.root / "cidd.log").read_text()[-2000:])
            time.sleep(0.2)
        raise TimeoutError("cidd did not listen")

    def start_installer(self, host: Host, env: Mapping[str, str] | None = None) -> Node:
        """Start the installer of ``host`` (its directory target emptied); the system agent follows its exit 0."""
        target = self.root / "targets" / host.name
        target.mkdir(parents=True, exist_ok=True)
        node = Node(host, target, self.root / f"{host.name}.log")
        self.nodes[host.name] = node
        log = open(node.log, "ab")  # noqa: SIM115 - closed with the process
        argv = [PYTHON, "-m", "cidkid.main", "--server", self.server, "--node", host.name, "--mode", "installer",
                "--target", str(target), "--reboot-command", "kill -TERM $PPID"]
        node.installer = self.bed.popen(host, argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(env))
        threading.Thread(target=self._boot_when_installed, args=(node,), daemon=True).start()
        return node

    def _boot_when_installed(self, node: Node) -> None:
        """Play the firmware: once the installer ended after a good install, start the system agent."""
        assert node.installer is not None
        node.installer_exit = node.installer.wait()
        marker = node.target / "etc" / "cid-image"
        if node.installer_exit != 0 or not marker.exists():
            return
        log = open(node.log, "ab")  # noqa: SIM115
        argv = [PYTHON, "-m", "cidkid.main", "--server", self.server, "--node", node.host.name, "--mode", "system",
                "--marker", str(marker), "--target", str(node.target),
                "--token-file", str(node.target / "etc" / "cid" / "agent.token")]
        node.system = self.bed.popen(node.host, argv, stdout=log, stderr=subprocess.STDOUT, env=self.env())

    def cidcapt(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run cidcapt in the head namespace; return it finished."""
        return self.bed.run(self.bed.head, [PYTHON, "-m", "cidcapt.main", "--server", self.server, *args],
                            timeout=timeout, env=self.env())

    def status(self) -> dict[str, dict[str, Any]]:
        """Return {node: status row} from ``cidcapt --status --json``."""
        done = self.cidcapt("--status", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        return {row["node"]: row for row in json.loads(done.stdout)}

    def wait_online(self, count: int, timeout: float = 90) -> None:
        """Return once ``count`` nodes are online; raise TimeoutError otherwise."""
        end = time.monotonic() + timeout
        online = 0
        while time.monotonic() < end:
            online = sum(1 for row in self.status().values() if row.get("online"))
            if online >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"only {online} of {count} nodes online after {timeout} s")

    def events(self) -> list[dict[str, Any]]:
        """Return cidd's JSON log events so far."""
        found = []
        for line in (self.root / "cidd.log").read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    pass
        return found

    def node_events(self, name: str) -> list[dict[str, Any]]:
        """Return node ``name``'s JSON log events (installer and system agent)."""
        found = []
        for line in self.nodes[name].log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    pass
        return found

    def installed_times(self) -> dict[str, float]:
        """Return {node: wall time of its ``installing -> to_image`` transition} from cidd's log."""
        times = {}
        for event in self.events():
            if event.get("event") == "node.transition" and event.get("from") == "installing" \
                    and event.get("to") == "to_image":
                times[event["node"]] = _when(event)
        return times


def _when(event: Mapping[str, Any]) -> float:
    """Return the wall time (seconds since the epoch) of a structlog event's ISO timestamp."""
    from datetime import datetime

    stamp = str(event.get("timestamp", ""))
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
