"""A simulated node fleet in one process: fake disks, fake reboots, fake installs, real agent sessions.

Each ``SimNode`` is a ``Platform`` whose disk is the directory ``<sim_dir>/<node>/`` (the image marker is
``<sim_dir>/<node>/etc/cid-image``) and which runs a real ``AgentService`` against cidd. A reboot drops the
session and, after ``reboot_delay``, boots a new one with a new boot id. ``SimFleet`` holds thousands of them:
one shared health sample, no per-node timer but the heartbeat, connections started over a short ramp.
Failures (hung reboots, failed installs) are injected by name or by a seeded probability.
"""

from __future__ import annotations

import random
import resource
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure

from cidcommon.hostlists import expand
from cidcommon.paths import node_token
from cidcommon.wire import Message
from cidinstall.marker import read_marker, write_install_marker
from cidinstall.types import InstallRequest, InstallResult, ProgressCallback
from cidkid.platform import Identity, Platform, host_health
from cidkid.protocol import REQUEST_TIMEOUT, AgentProtocol
from cidkid.reboots import REBOOT_METHODS, RebootSpec, redact
from cidkid.service import AgentService, Backoff, client_endpoint

log = structlog.get_logger(__name__)

FAKE_IMAGE_SIZE = 100_000_000
FAILED_INSTALL_REASON = "simulated install failure"


@dataclass(frozen=True)
class SimConfig:
    """How simulated nodes behave: timings, injected failures and their seed."""

    reboot_delay: float = 5.0
    install_time: float = 10.0
    install_steps: int = 5
    hang_reboot_nodes: frozenset[str] = frozenset()
    hang_reboot_rate: float = 0.0
    fail_install_nodes: frozenset[str] = frozenset()
    fail_install_rate: float = 0.0
    initial_image: str | None = None
    seed: int | None = None
    request_timeout: float = REQUEST_TIMEOUT
    reboot_methods: frozenset[str] = REBOOT_METHODS


class SharedHealth:
    """One psutil sample for the whole fleet, refreshed at most every ``refresh`` seconds of ``clock``."""

    def __init__(self, clock: IReactorTime, disk_path: Path, refresh: float = 1.0) -> None:
        self._clock = clock
        self._path = disk_path
        self._refresh = refresh
        self._at: float | None = None
        self._sample: dict[str, Any] = {}

    def sample(self) -> dict[str, Any]:
        """Return load1, mem_used_pct and disk_free of this machine (the same dict for up to ``refresh`` s)."""
        now = self._clock.seconds()
        if self._at is None or now - self._at >= self._refresh:
            self._sample = host_health(self._path)
            self._at = now
        return self._sample


def raise_nofile_limit() -> int:
    """Raise this process's open-file limit to its hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("sim.nofile_limit_unchanged", soft=soft, hard=hard, error=str(exc))
        return soft
    return target


class SimNode(Platform):
    """One simulated node: a Platform with a fake disk, plus the AgentService of its current boot.

    ``state`` is ``off``, ``up``, ``rebooting`` or ``hung`` (a reboot that never came back). ``announced`` says
    whether cidd answered the hello of the current boot; ``boots`` counts boots.
    """

    def __init__(self, name: str, sim_dir: Path, clock: IReactorTime, endpoint: IStreamClientEndpoint, token: str,
                 *, config: SimConfig | None = None, rng: random.Random | None = None,
                 health: SharedHealth | None = None, server: str = "",
                 on_ready: Callable[[SimNode], None] | None = None) -> None:
        self.name = name
        self.config = config or SimConfig()
        self.reboot_methods = self.config.reboot_methods
        self.disk = Path(sim_dir) / name
        self.marker = self.disk / "etc" / "cid-image"
        self._clock = clock
        self._endpoint = endpoint
        self._token = token
        seed = self.config.seed
        # Per-node generators: a node's k-th reboot or install has the same fate whatever the others do.
        self._rng = rng or random.Random(None if seed is None else f"{seed}:{name}")
        self._backoff_rng = random.Random(None if seed is None else f"{seed}:{name}:backoff")
        self._health = health or SharedHealth(clock, Path(sim_dir))
        self._server = server
        self._on_ready = on_ready
        self.state = "off"
        self.mode = "system"
        self.image: str | None = None
        self.boot_id = ""
        self.booted_at = 0.0
        self.boots = 0
        self.announced = False
        self.service: AgentService | None = None
        self._pending_boot: Deferred[Any] | None = None
        self._install: tuple[IDelayedCall | None, Deferred[InstallResult]] | None = None

    # -- Platform ----------------------------------------------------------------------------------------------

    def identity(self) -> Identity:
        """Return the name, the mode and image of the current boot, and its boot id."""
        return Identity(node=self.name, mode=self.mode, image=self.image, boot_id=self.boot_id)

    def health(self) -> dict[str, Any]:
        """Return the fleet's shared host figures with this node's own uptime."""
        figures = dict(self._health.sample())
        figures["uptime"] = round(self._clock.seconds() - self.booted_at, 1)
        return figures

    def reboot(self, boot: str, method: str, spec: RebootSpec | None = None) -> None:
        """Drop the session, then after ``reboot_delay`` boot ``boot`` (unless this reboot is set to hang).

        ``method`` and ``spec`` (what a real node would kexec or set as its next boot) are only logged.
        """
        if self.state != "up":
            log.info("sim.reboot_ignored", node=self.name, state=self.state)
            return
        hang = self.name in self.config.hang_reboot_nodes or (
            self.config.hang_reboot_rate > 0 and self._rng.random() < self.config.hang_reboot_rate)
        spec = spec or RebootSpec()
        log.info("sim.reboot", node=self.name, boot=boot, method=method, hang=hang, kernel=spec.kernel,
                 cmdline=redact(spec.cmdline) or None, entry=spec.entry)
        stopped = self._shut_down()
        if hang:
            self.state = "hung"
            return
        self.state = "rebooting"
        mode = "installer" if boot == "installer" else "system"
        waited = gatherResults([stopped, task.deferLater(self._clock, self.config.reboot_delay, lambda: None)],
                               consumeErrors=True)
        self._pending_boot = waited
        waited.addCallback(lambda _: self._boot(mode))
        waited.addErrback(self._boot_cancelled)

    def install(self, request: InstallRequest, progress: ProgressCallback) -> Deferred[InstallResult]:
        """Pretend to write ``request.image`` over ``install_time`` s; on success write the marker."""
        d: Deferred[InstallResult] = Deferred()
        steps = max(1, self.config.install_steps)
        fail = self.name in self.config.fail_install_nodes or (
            self.config.fail_install_rate > 0 and self._rng.random() < self.config.fail_install_rate)
        total = FAKE_IMAGE_SIZE

        def step(i: int) -> None:
            while True:
                progress("writing", total * i // steps, total)
                if fail and i >= steps // 2:
                    self._install = None
                    d.callback(InstallResult(ok=False, reason=FAILED_INSTALL_REASON, retry=True))
                    return
                if i >= steps:
                    self._install = None
                    self.disk.mkdir(parents=True, exist_ok=True)
                    write_install_marker(self.disk, request.image)
                    d.callback(InstallResult(ok=True))
                    return
                i += 1
                if self.config.install_time > 0:
                    self._install = (self._clock.callLater(self.config.install_time / steps, step, i), d)
                    return

        self._install = (None, d)
        step(0)
        return d

    # -- power -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Power on: boot the installed system (mode ``system``) and connect to cidd."""
        if self.state in ("up", "rebooting"):
            return
        self._boot("system")

    def stop(self) -> Deferred[None]:
        """Power off: cancel a pending boot or install and close the session; the Deferred fires when closed."""
        self.state = "off"
        return self._shut_down()

    def power_cycle(self, boot: str = "disk") -> Deferred[None]:
        """Power off then on into ``boot`` (``installer`` or ``disk``), even when hung (a BMC's cycle).

        As on real hardware, an install running at that moment ends without a word: the agent dies with it.
        """
        self.state = "off"
        d = self._shut_down(report=False)
        d.addCallback(lambda _: self._boot("installer" if boot == "installer" else "system"))
        return d

    def _shut_down(self, report: bool = True) -> Deferred[None]:
        """Cancel a pending boot and a running install (reporting it as interrupted when ``report``: an orderly
        reboot), stop the service; return its stop Deferred."""
        if self._pending_boot is not None:
            pending, self._pending_boot = self._pending_boot, None
            pending.cancel()
        if self._install is not None:
            call, result = self._install
            self._install = None
            if call is not None and call.active():
                call.cancel()
            if report and not result.called:
                result.callback(InstallResult(ok=False, reason="the node rebooted during the install", retry=True))
        self.announced = False
        service, self.service = self.service, None
        if service is None or not service.running:
            return succeed(None)
        return service.stopService()

    def _boot_cancelled(self, failure: Failure) -> None:
        """Swallow the cancellation of a pending boot (power off); log anything else."""
        if failure.check(FirstError):
            failure = failure.value.subFailure
        if not failure.check(CancelledError):
            log.error("sim.boot_failed", node=self.name, error=failure.getErrorMessage())

    def _boot(self, mode: str) -> None:
        """Boot in ``mode``: new boot id, image read from the marker (system mode), new AgentService started."""
        self._pending_boot = None
        self.mode = mode
        self.image = read_marker(self.marker) if mode == "system" else None
        self.boot_id = str(uuid.uuid4())
        self.booted_at = self._clock.seconds()
        self.boots += 1
        self.state = "up"
        self.announced = False
        log.debug("sim.booted", node=self.name, mode=mode, image=self.image, boot_id=self.boot_id)
        self.service = AgentService(self, self._endpoint, self._token, self._clock, node=self.name,
                                    server=self._server, request_timeout=self.config.request_timeout,
                                    backoff=Backoff(rng=self._backoff_rng), on_ready=self._ready)
        self.service.startService()

    def _ready(self, _protocol: AgentProtocol, _answer: Message) -> None:
        """Note that cidd answered this boot's hello and tell the fleet."""
        self.announced = True
        if self._on_ready is not None:
            self._on_ready(self)


class SimFleet(Service):
    """Many SimNodes in one process, each with its own AgentService against ``server_host:server_port``.

    ``names`` is a hostlist (``"sim[0001-2000]"``, raises BadHostlist) or a sequence of node names.
    ``reactor`` is the clock and (unless ``endpoint`` is given) the TCP reactor; ``endpoint_for(name)``, when
    given, makes each node's own endpoint (TLS with a per-node agent certificate). ``startService`` powers the nodes
    on over a ramp of ``ramp_batch`` nodes per ``ramp_interval`` s; ``stopService`` returns a Deferred that fires
    when every session is closed; ``when_announced(n)`` fires once ``n`` nodes (default all) were greeted by cidd.
    """

    def __init__(self, names: str | Sequence[str], server_host: str, server_port: int, token: str, sim_dir: Path,
                 reactor: Any, *, config: SimConfig | None = None, endpoint: IStreamClientEndpoint | None = None,
                 endpoint_for: Callable[[str], IStreamClientEndpoint] | None = None,
                 ramp_batch: int = 200, ramp_interval: float = 0.1, master: bool = False) -> None:
        """``master``: ``token`` is the agent master secret and each node says hello with its own derived token
        (cidcommon.paths.node_token), as real nodes do; otherwise every node sends ``token`` as it is."""
        if isinstance(names, str):
            names = expand(names)
        self.config = config or SimConfig()
        self.sim_dir = Path(sim_dir)
        self._clock: IReactorTime = reactor
        self._ramp_batch = max(1, ramp_batch)
        self._ramp_interval = ramp_interval
        self._ramp: list[IDelayedCall] = []
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self.server = f"{server_host}:{server_port}"
        self.endpoint = endpoint or client_endpoint(reactor, server_host, server_port)
        health = SharedHealth(reactor, self.sim_dir)
        self.nodes: dict[str, SimNode] = {
            name: SimNode(name, self.sim_dir, reactor, endpoint_for(name) if endpoint_for else self.endpoint,
                          node_token(token, name) if master else token,
                          config=self.config,
                          health=health, server=self.server, on_ready=self._node_ready)
            for name in names
        }

    def announced(self) -> int:
        """Return how many nodes were greeted by cidd in their current boot."""
        return sum(1 for node in self.nodes.values() if node.announced)

    def when_announced(self, count: int | None = None) -> Deferred[None]:
        """Return a Deferred firing once ``count`` nodes (default: all) are announced at the same time."""
        wanted = len(self.nodes) if count is None else count
        d: Deferred[None] = Deferred()
        if self.announced() >= wanted:
            d.callback(None)
        else:
            self._waiters.append((wanted, d))
        return d

    def _node_ready(self, _node: SimNode) -> None:
        """Fire the waiters whose count is reached."""
        if not self._waiters:
            return
        count = self.announced()
        still = []
        for wanted, d in self._waiters:
            if count >= wanted:
                d.callback(None)
            else:
                still.append((wanted, d))
        self._waiters = still

    def startService(self) -> None:
        """Raise the open-file limit, write initial markers, then power the nodes on over the ramp."""
        super().startService()
        limit = raise_nofile_limit()
        if limit < len(self.nodes) + 64:
            log.warning("sim.nofile_limit_low", limit=limit, nodes=len(self.nodes))
        self.sim_dir.mkdir(parents=True, exist_ok=True)
        if self.config.initial_image:
            for node in self.nodes.values():
                if read_marker(node.marker) is None:
                    node.disk.mkdir(parents=True, exist_ok=True)
                    write_install_marker(node.disk, self.config.initial_image)
        log.info("sim.fleet_starting", nodes=len(self.nodes), server=self.server, sim_dir=str(self.sim_dir))
        nodes = list(self.nodes.values())
        batches = [nodes[i:i + self._ramp_batch] for i in range(0, len(nodes), self._ramp_batch)]
        for number, batch in enumerate(batches[1:], start=1):
            self._ramp.append(self._clock.callLater(number * self._ramp_interval, self._power_on, batch))
        if batches:
            self._power_on(batches[0])

    def _power_on(self, batch: Iterable[SimNode]) -> None:
        """Start every node of ``batch``."""
        for node in batch:
            node.start()

    def stopService(self) -> Deferred[None]:
        """Cancel the ramp and power every node off; the Deferred fires when every session is closed."""
        super().stopService()
        for call in self._ramp:
            if call.active():
                call.cancel()
        self._ramp = []
        d = gatherResults([node.stop() for node in self.nodes.values()], consumeErrors=True)
        d.addCallback(lambda _: log.info("sim.fleet_stopped", nodes=len(self.nodes)))
        return d.addCallback(lambda _: None)
