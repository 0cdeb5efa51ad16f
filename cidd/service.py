"""cidd as a Twisted service tree: one ``MultiService`` whose named children start in order and stop in reverse.

    lock → store → power → engine → history → agent port → local socket → http → sd_notify

``lock`` takes ``<state_dir>/cidd.lock`` before anything opens the database, so a second cidd on the same state
can never touch a live one. ``store`` opens SQLite and closes it last, after every step was committed.
``history`` creates the metrics, attaches the engine's observers (metrics, statistics: cidd/observe.py,
cidd/history.py) and starts the retention timer. Stopping (SIGTERM) first tells systemd, then closes the HTTP
port, the socket and the agent/client port (no new sessions), stops the retention timer (a batch is one
transaction: none is left half done), stops the engine (no step after that: the sessions the reactor closes at
shutdown change nothing, since a restart collapses live states anyway), stops the BMC thread pool, and only then
closes the database.
Children stop one after the other, each waiting for the previous one. Each child logs
``cidd.service_started`` / ``cidd.service_stopped`` with its name.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall

from cidcatalog.catalog import Catalog
from cidcommon import __version__, wire
from cidcommon.errors import CidError
from cidcommon.paths import ensure_token, token_path
from cidd.bmc import BmcDirectory
from cidd.boot_http import BootResource
from cidd.config import Config
from cidd.engine import Engine, read_catalog
from cidd.history import History, thread_pool_runner
from cidd.images_http import listen_http
from cidd.local_socket import count_refusals, listen_unix
from cidd.metrics import Metrics
from cidd.observe import Observer
from cidd.power import PowerController
from cidd.sdnotify import Notifier
from cidd.sessions import CiddFactory, Sessions
from cidd.status_http import EngineCollector, StatsResource, StatusResource, page_resources
from cidd.store import Store
from cidd.tls import ensure_pki, server_options
from cidd.user_directory import UserDirectory, thread_runner

log = structlog.get_logger(__name__)

#: The children of the tree, in start order (they stop in the reverse order).
CHILDREN = ("lock", "store", "power", "engine", "history", "agent port", "local socket", "http", "sd_notify")


class StateDirBusy(CidError):
    """Another cidd holds the state directory's lock."""


class Step(Service):
    """One named child: ``start()`` when the tree starts, ``stop()`` (may return a Deferred) when it stops.

    A child whose start failed, or that never started, is not stopped.
    """

    def __init__(self, name: str, start: Callable[[], None], stop: Callable[[], Any] | None = None) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop
        self._started = False

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        """Run the start step; raises what it raises (the tree then stops the children already started)."""
        self._start()
        self._started = True
        Service.startService(self)
        log.info("cidd.service_started", service=self.name)

    def stopService(self) -> Deferred[None] | None:  # noqa: N802
        """Run the stop step once; return its Deferred (or None)."""
        Service.stopService(self)
        if not self._started:
            return None
        self._started = False
        d = maybeDeferred(self._stop) if self._stop is not None else maybeDeferred(lambda: None)
        return d.addBoth(self._stopped)

    def _stopped(self, result: Any) -> Any:
        log.info("cidd.service_stopped", service=self.name)
        return result


@dataclass
class Cidd:
    """The parts of one cidd, built by its service tree in start order (``None`` before their step ran)."""

    config: Config
    reactor: Any
    notifier: Notifier = field(default_factory=Notifier)
    lock_fd: int | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    tls_options: Any = None
    catalog: Catalog | None = None
    store: Store | None = None
    power: PowerController | None = None
    sessions: Sessions = field(default_factory=Sessions)
    engine: Engine | None = None
    factory: CiddFactory | None = None
    ports: dict[str, Any] = field(default_factory=dict)
    loops: list[LoopingCall] = field(default_factory=list)
    metrics: Metrics | None = None
    observer: Observer | None = None
    history: History | None = None

    # --- lock ---

    def take_lock(self) -> None:
        """Create the state directory and lock ``cidd.lock`` in it. Raises StateDirBusy when another cidd has it."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.config.state_dir / "cidd.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateDirBusy(f"another cidd (pid {holder}) is running on {self.config.state_dir}; stop it first, "
                               "or give this one another state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd

    def release_lock(self) -> None:
        """Release the state directory's lock (closing the descriptor releases it)."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    # --- store, power, engine ---

    def open_store(self) -> None:
        """Check every file cidd needs, then open the database: role tokens (created if missing), TLS
        certificate and key, the catalog; nothing is opened when one is wrong (raises TokenFileError, PkiError,
        CatalogError, StoreError)."""
        self.tokens = {role: ensure_token(token_path(self.config.state_dir, role)) for role in wire.ROLES}
        if self.config.tls.mode == "tls":
            self.tls_options = server_options(ensure_pki(self.config), self.config.tls.client_certs)
        self.catalog = read_catalog(self.config)
        self.store = Store(self.config.db_path, synchronous=self.config.db_synchronous)

    def close_store(self) -> None:
        """Close the database: every step is committed by now (the engine stopped first)."""
        if self.store is not None:
            self.store.close()

    def start_power(self) -> None:
        """Start the BMC thread pool when the configuration has BMC settings (top level or groups).

        Reads every credentials file first (CredentialsError stops the start) and logs a warning for each
        Redfish setting with ``verify: false`` (cidd.bmc.BmcDirectory.load).
        """
        bmc = self.config.bmc
        if bmc is not None:
            directory = BmcDirectory.load(bmc, self.config.inventory())
            default = directory.credentials.get(bmc.credentials) if bmc.credentials is not None else None
            self.power = PowerController.from_config(default, self.reactor, bmc, directory)
            self.power.start()

    def stop_power(self) -> None:
        """Stop the BMC thread pool (running calls get a few seconds)."""
        if self.power is not None:
            self.power.stop()

    def start_engine(self) -> None:
        """Load the nodes and captures and re-arm their deadlines."""
        assert self.store is not None and self.catalog is not None
        self.engine = Engine(self.config, self.catalog, self.store, self.reactor, self.sessions, self.power)
        self.engine.start()

    def stop_engine(self) -> None:
        """Cancel the engine's timers: no step is taken after this."""
        if self.engine is not None:
            self.engine.stop()

    # --- history: metrics, observers, statistics, retention ---

    def start_history(self) -> None:
        """Create the metrics, attach the observers to the engine and start the retention timer."""
        engine, store = self.engine, self.store
        assert engine is not None and store is not None
        self.metrics = metrics = Metrics()
        metrics.registry.register(EngineCollector(engine))
        self.observer = Observer(engine, metrics, store)
        self.history = History(engine, store, thread_pool_runner(self.reactor), self.reactor, metrics)
        engine.observers.extend([self.observer, self.history])
        self.history.start()

    def stop_history(self) -> None:
        """Stop the retention timer and detach the observers."""
        if self.history is not None:
            self.history.stop()
        if self.engine is not None:
            self.engine.observers[:] = [o for o in self.engine.observers if o not in (self.observer, self.history)]

    # --- listeners ---

    def listen_agents(self) -> None:
        """Listen for agents and clients on the TCP port (TLS unless configured plain)."""
        config, engine = self.config, self.engine
        assert engine is not None
        tls_options = self.tls_options
        directory = UserDirectory(self.reactor, thread_runner(self.reactor), limits=config.users)
        self.factory = factory = CiddFactory(engine, self.sessions, self.tokens, self.reactor,
                                             tls=tls_options is not None, client_certs=config.tls.client_certs,
                                             directory=directory)
        if tls_options is None:
            port = self.reactor.listenTCP(config.listen_port, factory, backlog=4096, interface=config.listen_host)
            log.warning("security.plain_tcp", host=config.listen_host, port=port.getHost().port,
                        hint="tokens travel in clear text; remove 'mode: plain' from the tls section to use TLS")
        else:
            port = self.reactor.listenSSL(config.listen_port, factory, tls_options, backlog=4096,
                                          interface=config.listen_host)
        self.ports["agent port"] = port
        log.info("cidd.listening", host=config.listen_host, port=port.getHost().port,
                 state_dir=str(config.state_dir), catalog=str(config.catalog), images=len(engine.catalog),
                 version=__version__, tls=config.tls.mode == "tls", client_certs=config.tls.client_certs)

    def listen_socket(self) -> None:
        """Listen on the local Unix socket for clients on the head node (when configured and possible)."""
        assert self.engine is not None and self.factory is not None
        port = listen_unix(self.engine, self.sessions, self.tokens, self.reactor, self.factory.security,
                           self.factory.directory)
        if port is not None:
            self.ports["local socket"] = port

    def listen_http(self) -> None:
        """Serve images, boot scripts, /status, /stats, /metrics and the status page (/) on the HTTP port."""
        engine, metrics, history = self.engine, self.metrics, self.history
        assert engine is not None and self.factory is not None and metrics is not None and history is not None
        self.loops.append(count_refusals(metrics, self.factory.security, self.reactor))
        extra = {b"status": StatusResource(engine, self.observer), b"stats": StatsResource(history),
                 b"boot": BootResource(engine), **page_resources()}
        self.ports["http"] = listen_http(self.config, lambda: engine.catalog, metrics, self.reactor, extra=extra)

    def stop_port(self, name: str) -> Callable[[], Deferred[None] | None]:
        """Return a stop step that closes the listening port ``name`` (if it was opened)."""
        def stop() -> Deferred[None] | None:
            port = self.ports.pop(name, None)
            return port.stopListening() if port is not None else None
        return stop

    def stop_http(self) -> Deferred[None] | None:
        """Stop the refusal counter's flushes and close the HTTP port."""
        for loop in self.loops:
            if loop.running:
                loop.stop()
        self.loops.clear()
        return self.stop_port("http")()

    # --- systemd ---

    def notify_ready(self) -> None:
        """Tell systemd cidd is ready (once the reactor runs) and start the watchdog keep-alive."""
        engine = self.engine
        assert engine is not None
        self.reactor.callWhenRunning(self.notifier.ready, f"serving {len(engine.nodes)} nodes")
        if self.notifier.watchdog_interval:
            # The keep-alive runs on the reactor: a blocked reactor misses it and systemd restarts cidd.
            loop = LoopingCall(self.notifier.watchdog)
            loop.clock = self.reactor
            loop.start(self.notifier.watchdog_interval, now=False)
            self.loops.append(loop)

    def notify_stopping(self) -> None:
        """Tell systemd cidd is stopping."""
        log.info("cidd.stopping")
        self.notifier.stopping()


class OrderedService(MultiService):
    """A MultiService that starts its children in order and stops them one after the other in reverse, each
    waiting for the one before it (a port's ``stopListening``, closed sessions) to finish."""

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        """Start the children in order; when one fails, stop those already started (in reverse) and re-raise."""
        started: list[Service] = []
        try:
            for child in self:
                child.startService()
                started.append(child)
        except BaseException:
            for child in reversed(started):
                child.stopService()
            raise
        Service.startService(self)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        """Stop the children in reverse order, one at a time; return a Deferred firing when all stopped.

        A child whose stop fails is logged and the others still stop.
        """
        Service.stopService(self)
        d: Deferred[None] = Deferred()
        for child in reversed(list(self)):
            d.addCallback(lambda _, child=child: maybeDeferred(child.stopService))
            d.addErrback(lambda failure, child=child: log.error("cidd.service_stop_failed", service=child.name,
                                                                 error=failure.getErrorMessage()))
        d.addCallback(lambda _: None)
        d.callback(None)
        return d


def build_service(config: Config, reactor: Any) -> tuple[OrderedService, Cidd]:
    """Return cidd's service tree (not started) and the parts it builds as it starts."""
    cidd = Cidd(config, reactor)
    top = OrderedService()
    top.setName("cidd")
    steps = (
        Step("lock", cidd.take_lock, cidd.release_lock),
        Step("store", cidd.open_store, cidd.close_store),
        Step("power", cidd.start_power, cidd.stop_power),
        Step("engine", cidd.start_engine, cidd.stop_engine),
        Step("history", cidd.start_history, cidd.stop_history),
        Step("agent port", cidd.listen_agents, cidd.stop_port("agent port")),
        Step("local socket", cidd.listen_socket, cidd.stop_port("local socket")),
        Step("http", cidd.listen_http, cidd.stop_http),
        Step("sd_notify", cidd.notify_ready, cidd.notify_stopping),
    )
    assert tuple(step.name for step in steps) == CHILDREN
    for step in steps:
        step.setServiceParent(top)
    return top, cidd
