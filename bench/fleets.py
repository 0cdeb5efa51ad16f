"""Helpers of bench/control_plane.py: cidd and several cid-simfleet processes, CPU pinning, cidd's gauges.

A fleet of N simulated nodes is split into K ``cid-simfleet`` processes, each holding a contiguous slice of
the names (``slices``). With pinning (``Pinning``), cidd runs alone on CPU 0 (``taskset -c 0``) and the fleets
and clients on the other CPUs, so that the CPU cidd spends is measured without the simulator's handshakes,
heartbeats and reports taking turns on the same core. Other people's work on the machine is not pinned away:
the benchmark prints ``os.getloadavg()`` next to its figures.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

#: Nodes per cid-simfleet process by default (one Python process handles about this many TLS agents well).
NODES_PER_FLEET = 2500
_GAUGE = re.compile(r"^(?P<name>[a-z_]+)(?:\{[^}]*\})? (?P<value>[0-9.e+-]+)$", re.MULTILINE)


def name_width(nodes: int) -> int:
    """Return the digits of the simulated node names (``sim0001`` up to 9,999 nodes, ``sim10000`` beyond)."""
    return max(4, len(str(nodes)))


def hostlist(first: int, last: int, width: int) -> str:
    """Return the hostlist of nodes ``first``..``last`` (1-based, inclusive), e.g. ``sim[0001-2000]``."""
    return f"sim[{first:0{width}d}-{last:0{width}d}]"


def default_fleets(nodes: int) -> int:
    """Return the number of fleet processes used for ``nodes`` nodes when none is given (at least 1)."""
    return max(1, math.ceil(nodes / NODES_PER_FLEET))


def slices(nodes: int, fleets: int) -> list[str]:
    """Return ``fleets`` hostlists of nearly equal size covering nodes 1..``nodes`` in order.

    Raises ValueError when ``fleets`` is below 1 or above ``nodes``.
    """
    if not 1 <= fleets <= nodes:
        raise ValueError(f"--fleets must be between 1 and the number of nodes ({nodes}), not {fleets}")
    width = name_width(nodes)
    bounds = [round(i * nodes / fleets) for i in range(fleets + 1)]
    return [hostlist(bounds[i] + 1, bounds[i + 1], width) for i in range(fleets)]


@dataclass(frozen=True)
class Pinning:
    """Command prefixes pinning cidd and the rest (fleets, cidcapt) to disjoint CPUs, or nothing."""

    cidd: tuple[str, ...] = ()
    others: tuple[str, ...] = ()

    @classmethod
    def choose(cls, wanted: bool) -> Pinning:
        """Return cidd on CPU 0 and the others on CPUs 1.. when ``wanted``, 2 CPUs or more and taskset exist.

        Otherwise return no pinning (every process wherever the kernel puts it).
        """
        cpus = sorted(os.sched_getaffinity(0))
        taskset = shutil.which("taskset")
        if not wanted or len(cpus) < 2 or taskset is None:
            return cls()
        rest = ",".join(str(cpu) for cpu in cpus[1:])
        return cls((taskset, "-c", str(cpus[0])), (taskset, "-c", rest))

    def describe(self) -> str:
        """Return how the processes are pinned, as the benchmark prints it."""
        if not self.cidd:
            return "not pinned"
        return f"cidd on CPU {self.cidd[-1]}, fleets and cidcapt on CPU {self.others[-1]}"


def gauges(http_port: int, timeout: float = 10.0) -> dict[str, float]:
    """Return the unlabelled and summed labelled samples of cidd's ``/metrics`` by metric name.

    Raises OSError (urllib.error.URLError) when cidd does not answer.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=timeout) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for match in _GAUGE.finditer(text):
        values[match["name"]] = values.get(match["name"], 0.0) + float(match["value"])
    return values


def online(http_port: int) -> int:
    """Return how many nodes cidd counts online (``cid_nodes_online``), 0 when it does not answer."""
    try:
        return int(gauges(http_port).get("cid_nodes_online", 0))
    except OSError:
        return 0


def wait_online(http_port: int, count: int, timeout: float, start: float | None = None,
                every: float = 1.0) -> tuple[float, int]:
    """Poll until ``count`` nodes are online or ``timeout`` s passed since ``start`` (default: now).

    Return (seconds since ``start``, nodes online at the end).
    """
    start = time.perf_counter() if start is None else start
    seen = 0
    while time.perf_counter() - start < timeout:
        seen = online(http_port)
        if seen >= count:
            break
        time.sleep(every)
    return time.perf_counter() - start, seen


def start_cidd(config: Path, env: dict[str, str], log: Path, pin: Pinning) -> subprocess.Popen[bytes]:
    """Start cidd with ``config`` (stderr appended to ``log``); return its process."""
    with open(log, "ab") as err:
        return subprocess.Popen([*pin.cidd, sys.executable, "-m", "cidd.main", "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def start_fleets(hostlists: list[str], server: str, root: Path, env: dict[str, str], pin: Pinning,
                 log_level: str = "warning") -> list[subprocess.Popen[bytes]]:
    """Start one cid-simfleet per hostlist (zero reboot delay and install time; logs in ``root/fleetK.log``).

    Return the processes in the order of ``hostlists``.
    """
    procs = []
    for number, hosts in enumerate(hostlists):
        with open(root / f"fleet{number}.log", "ab") as err:
            procs.append(subprocess.Popen(
                [*pin.others, sys.executable, "-m", "cidsim.main", hosts, "--server", server, "--sim-dir",
                 str(root / "sim"), "--reboot-delay", "0", "--install-time", "0", "--initial-image", "debian-12-1",
                 "--log-level", log_level], env=env, stdout=subprocess.DEVNULL, stderr=err))
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process still running (last started first), wait up to 30 s each, then SIGKILL."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_events(log: Path, events: tuple[str, ...], since: int = 0) -> dict[str, int]:
    """Return how many lines of ``log`` after byte ``since`` name each of ``events``."""
    try:
        with open(log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return {event: 0 for event in events}
    return {event: text.count(event) for event in events}
