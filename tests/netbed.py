"""A test bed of real network namespaces: one for the head node (cidd), N for nodes, on a Linux bridge.

Everything lives in namespaces this module creates and removes itself: a *switch* namespace holds the bridge
(``br0``, no address), and every host namespace (``head``, ``node01`` ...) has one veth (``eth0``) whose other end
is a port of that bridge. Addresses are private (``10.213.0.0/24`` by default) and exist only inside these
namespaces: no interface of the machine's own namespace is created or touched, no host namespace has a default
route, so nothing sent inside the bed can leave it.

Every link is shaped in both directions with ``tbf`` (``rate_mbit``): on ``eth0`` inside the host (what the host
sends) and on the bridge port (what the host receives), so that the head node's one link is as fast as a
node's. Packet loss (``loss_pct``, both directions of every link) is applied in the switch with nftables'
``numgen random`` on each bridge port's ingress and egress (the kernels here lack ``netem``; drops in the
switch look like loss on the wire to the hosts); delay needs ``netem`` and raises NetBedError where the kernel
has none.

Use::

    with NetBed(4, rate_mbit=50) as bed:
        proc = bed.popen(bed.head, ["python3", "-m", "http.server", "--bind", bed.head.address, "8000"])
        bed.run(bed.nodes[0], ["curl", "-s", f"http://{bed.head.address}:8000/"])
        print(bed.tx_bytes(bed.head))

``NetBed.__exit__`` stops every process started through ``popen`` (by PID: SIGTERM, then SIGKILL), deletes the
namespaces (which deletes their veths and the bridge) and checks that none is left. ``remove_stale()`` removes
beds a crashed run left behind (only names with this module's prefix). Needs root, ``ip``, ``tc`` and ``nft``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: Every namespace of a bed is named ``<PREFIX><tag>-<role>``; remove_stale() only ever touches these.
PREFIX = "cidnb"
#: The /24 the bed's hosts are numbered in (head .1, nodes .11 ...); it exists only inside the bed.
DEFAULT_SUBNET = "10.213.0"
TOOLS = ("ip", "tc", "nft")


class NetBedError(Exception):
    """The bed cannot be built here (not root, a tool or a kernel feature missing) or a command failed."""


@dataclass
class Host:
    """One host of the bed: its namespace, its address, and its port on the bridge (in the switch namespace)."""

    name: str
    netns: str
    address: str
    port: str

    def __str__(self) -> str:
        return f"{self.name}({self.address})"


def missing_tools() -> list[str]:
    """Return what the bed needs and this machine lacks (root, ``ip``, ``tc``, ``nft``), as words."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.insert(0, "root")
    return missing


def _run(argv: Sequence[str], what: str, check: bool = True, timeout: float = 30,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; return it finished. Raises NetBedError naming ``what`` when it fails and ``check``."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and done.returncode != 0:
        raise NetBedError(f"{what}: {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def bed_namespaces(prefix: str = PREFIX) -> list[str]:
    """Return the names of the namespaces that belong to beds (``prefix`` names), live or stale."""
    out = _run(["ip", "netns", "list"], "listing namespaces", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [name for name in names if name.startswith(prefix)]


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace named like a bed's (left by a crashed run); return their names."""
    stale = bed_namespaces(prefix)
    for name in stale:
        _kill_namespace_processes(name)
        _run(["ip", "netns", "del", name], "removing a stale namespace", check=False)
    return stale


def _kill_namespace_processes(netns: str) -> None:
    """SIGKILL the processes still inside ``netns``, one of a bed's namespaces (only processes the bed started,
    or their children, are ever inside one)."""
    out = _run(["ip", "netns", "pids", netns], "listing a namespace's processes", check=False).stdout
    for word in out.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def netem_available() -> bool:
    """Return whether the kernel has ``netem`` (needed for delay; loss does not need it). An unreadable kernel
    configuration counts as yes (the tc command then says)."""
    config = _kernel_config()
    return not config or bool(re.search(r"CONFIG_NET_SCH_NETEM=[ym]", config))


@dataclass
class NetBed:
    """``nodes`` node namespaces and a head namespace on one bridge, each link shaped (see the module doc)."""

    nodes_wanted: int
    rate_mbit: float | None = 100.0
    loss_pct: float = 0.0
    delay_ms: float = 0.0
    subnet: str = DEFAULT_SUBNET
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000:05d}")
    head: Host = field(init=False)
    nodes: list[Host] = field(init=False, default_factory=list)
    procs: list[subprocess.Popen[Any]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.nodes_wanted <= 200:
            raise NetBedError("a bed has 0 to 200 nodes")
        if not re.fullmatch(r"10\.\d{1,3}\.\d{1,3}", self.subnet):
            raise NetBedError("the bed's subnet is a private 10.x.y (a /24 that exists only inside the bed)")
        self.switch = f"{PREFIX}{self.tag}-sw"
        self.head = Host("head", f"{PREFIX}{self.tag}-head", f"{self.subnet}.1", "ph")
        self.nodes = [Host(f"node{i:02d}", f"{PREFIX}{self.tag}-n{i:02d}", f"{self.subnet}.{10 + i}", f"p{i}")
                      for i in range(1, self.nodes_wanted + 1)]

    @property
    def hosts(self) -> list[Host]:
        """Return the head and every node."""
        return [self.head, *self.nodes]

    def by_address(self, address: str) -> Host:
        """Return the host that has ``address``; raise KeyError when none has."""
        for host in self.hosts:
            if host.address == address:
                return host
        raise KeyError(address)

    # --- building and removing -------------------------------------------------------------------------

    def __enter__(self) -> NetBed:
        missing = missing_tools()
        if missing:
            raise NetBedError(f"the network bed needs {', '.join(missing)}")
        if self.delay_ms and not netem_available():
            raise NetBedError("link delay needs the kernel's netem qdisc, which this kernel does not have")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        for netns in [self.switch, *(h.netns for h in self.hosts)]:
            if netns in bed_namespaces():
                _kill_namespace_processes(netns)
                _run(["ip", "netns", "del", netns], "removing an old namespace of the same name", check=False)
            _run(["ip", "netns", "add", netns], "creating a namespace")
        sw = self.switch
        batch = ["link add br0 type bridge", "link set br0 type bridge mcast_snooping 0 stp_state 0 forward_delay 0",
                 "link set br0 up", "link set lo up"]
        _run(["ip", "-n", sw, "-batch", "-"], "building the bridge", stdin="\n".join(batch) + "\n")
        for host in self.hosts:
            _run(["ip", "link", "add", "eth0", "netns", host.netns, "type", "veth", "peer", "name", host.port,
                  "netns", sw], f"creating the link of {host}")
            _run(["ip", "-n", sw, "link", "set", host.port, "master", "br0", "up"], f"plugging in {host}")
            batch = ["link set lo up", f"addr add {host.address}/24 brd + dev eth0", "link set eth0 up",
                     "route add 224.0.0.0/4 dev eth0"]  # multicast engines need a route for their groups
            _run(["ip", "-n", host.netns, "-batch", "-"], f"addressing {host}", stdin="\n".join(batch) + "\n")
            _run(["ip", "netns", "exec", host.netns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                  "net.ipv6.conf.default.disable_ipv6=1", "net.ipv4.ip_local_port_range=20000 60999"],
                 f"setting {host}'s sysctls")
            self._shape(host)
        self.set_loss(self.loss_pct)
        self._wait_ports_forwarding()

    def _shape(self, host: Host) -> None:
        """Shape ``host``'s link both ways with tbf (``rate_mbit``), netem first when a delay is asked."""
        for netns, dev in ((host.netns, "eth0"), (self.switch, host.port)):
            parent = ["root"]
            if self.delay_ms:
                _run(["tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay",
                      f"{self.delay_ms / 2:g}ms", "limit", "100000"], f"delaying {host}'s link")
                parent = ["parent", "1:1"]
            if self.rate_mbit:
                rate_bytes = self.rate_mbit * 1e6 / 8
                burst = max(64 * 1024, int(rate_bytes / 100))  # >= one GSO segment; 10 ms at the rate
                _run(["tc", "-n", netns, "qdisc", "add", "dev", dev, *parent, "tbf", "rate", f"{self.rate_mbit:g}mbit",
                      "burst", str(burst), "latency", "50ms"], f"shaping {host}'s link")

    def _wait_ports_forwarding(self, timeout: float = 10.0) -> None:
        """Return once every bridge port forwards (no STP: at once, but the state is read to be sure)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = _run(["ip", "-n", self.switch, "-j", "link", "show", "master", "br0"], "reading the bridge",
                       check=False).stdout
            try:
                ports = json.loads(out or "[]")
            except ValueError:
                ports = []
            if len(ports) == len(self.hosts) and all(p.get("operstate") in ("UP", "UNKNOWN") for p in ports):
                return
            time.sleep(0.05)
        raise NetBedError("the bridge's ports did not come up")

    def set_loss(self, loss_pct: float, hosts: Sequence[Host] | None = None) -> None:
        """Drop ``loss_pct`` % of the packets on the links of ``hosts`` (default: all), each direction (0: none).

        The drops happen in the switch (nftables netdev ingress and egress hooks of each bridge port), so that
        they look like loss on the wire: the hosts' own sockets never see an error.
        """
        if not 0 <= loss_pct < 100:
            raise NetBedError("loss is a percentage from 0 to under 100")
        for host in hosts or self.hosts:
            table = f"loss_{host.port}"
            _run(["ip", "netns", "exec", self.switch, "nft", "delete", "table", "netdev", table], "clearing loss",
                 check=False)
            if loss_pct:
                per_10k = round(loss_pct * 100)
                rule = f"numgen random mod 10000 < {per_10k} counter drop;"
                rules = (f"table netdev {table} {{\n"
                         f" chain up {{ type filter hook ingress device {host.port} priority 0; {rule} }}\n"
                         f" chain down {{ type filter hook egress device {host.port} priority 0; {rule} }}\n}}\n")
                _run(["ip", "netns", "exec", self.switch, "nft", "-f", "-"], f"setting loss on {host}", stdin=rules)
        if hosts is None:
            self.loss_pct = loss_pct

    def dropped(self, host: Host) -> int:
        """Return the packets the loss rules dropped on ``host``'s link so far (0 without loss)."""
        out = _run(["ip", "netns", "exec", self.switch, "nft", "-j", "list", "table", "netdev", f"loss_{host.port}"],
                   "reading loss counters", check=False).stdout
        total = 0
        with contextlib.suppress(ValueError):
            for item in json.loads(out or "{}").get("nftables", []):
                for expr in item.get("rule", {}).get("expr", []):
                    if "counter" in expr:
                        total += int(expr["counter"]["packets"])
        return total

    def close(self) -> None:
        """Stop the bed's processes (by PID), delete its namespaces and check they are gone (idempotent)."""
        self.stop_all()
        names = [h.netns for h in self.hosts] + [self.switch]
        for name in names:
            if name in bed_namespaces():
                # children of the processes started here (a shell's pipeline, an installer's udp-receiver) would
                # outlive a deleted namespace: every process still inside one of the bed's namespaces goes
                _kill_namespace_processes(name)
                _run(["ip", "netns", "del", name], "removing a namespace", check=False)
        end = time.monotonic() + 10
        while time.monotonic() < end and set(names) & set(bed_namespaces()):
            time.sleep(0.05)
        left = set(names) & set(bed_namespaces())
        if left:
            raise NetBedError(f"namespaces left behind: {', '.join(sorted(left))}")

    # --- processes ------------------------------------------------------------------------------------

    def command(self, host: Host, argv: Sequence[str]) -> list[str]:
        """Return ``argv`` wrapped to run inside ``host``'s namespace."""
        return [shutil.which("ip") or "ip", "netns", "exec", host.netns, *argv]  # found whatever PATH argv gets

    def popen(self, host: Host, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host``'s namespace; return the process (stopped by close())."""
        proc = subprocess.Popen(self.command(host, argv), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, host: Host, argv: Sequence[str], timeout: float = 60,
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside ``host``'s namespace; return it finished (output captured as text by default)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(host, argv), timeout=timeout, **kwargs)

    def stop(self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Stop ``proc`` (one this bed started) by its PID: ``sig``, then SIGKILL; return its exit status."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    def stop_all(self) -> None:
        """Stop every process started through popen (SIGTERM to all, then SIGKILL to those left)."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()

    # --- counters -------------------------------------------------------------------------------------

    def link_stats(self, host: Host) -> dict[str, int]:
        """Return ``{"tx_bytes", "rx_bytes", "tx_packets", "rx_packets"}`` of ``host``'s eth0."""
        out = _run(["ip", "-n", host.netns, "-j", "-s", "link", "show", "dev", "eth0"], "reading counters").stdout
        stats = json.loads(out)[0]["stats64"]
        return {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
                "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"]}

    def tx_bytes(self, host: Host) -> int:
        """Return the bytes ``host`` has sent through its link so far."""
        return self.link_stats(host)["tx_bytes"]


def _kernel_config() -> str:
    """Return the running kernel's configuration text (empty when the kernel does not expose it)."""
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as handle:
            return handle.read()
    except OSError:
        return ""


class CpuMeter:
    """Each CPU's utilisation, sampled from /proc/stat every ``interval`` seconds between ``start()`` and
    ``stop()`` (a thread). ``stop()`` returns {"cpu0": percent busy, ...} over the whole time;
    ``busy_between(t0, t1)`` the same over a window of wall-clock time (``time.time()``) inside it."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _read() -> dict[str, tuple[int, int]]:
        result = {}
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                if re.match(r"cpu\d+ ", line):
                    name, *values = line.split()
                    numbers = [int(v) for v in values]
                    idle = numbers[3] + (numbers[4] if len(numbers) > 4 else 0)
                    result[name] = (sum(numbers[:8]), idle)
        return result

    def start(self) -> None:
        self.samples = [(time.time(), self._read())]
        self._done.clear()
        self._thread = threading.Thread(target=self._sample, name="cpu-meter", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.samples.append((time.time(), self._read()))

    def stop(self) -> dict[str, float]:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append((time.time(), self._read()))
        return self.busy_between(self.samples[0][0], self.samples[-1][0])

    def busy_between(self, t0: float, t1: float) -> dict[str, float]:
        """Return each CPU's busy percentage between the samples nearest to ``t0`` and ``t1``."""
        first = min(self.samples, key=lambda sample: abs(sample[0] - t0))[1]
        last = min(self.samples, key=lambda sample: abs(sample[0] - t1))[1]
        busy = {}
        for name, (total, idle) in last.items():
            t_start, i_start = first.get(name, (0, 0))
            span = total - t_start
            busy[name] = round(100.0 * (span - (idle - i_start)) / span, 1) if span > 0 else 0.0
        return busy
