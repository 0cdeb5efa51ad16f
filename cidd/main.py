"""``cidd``: the cid head-node daemon. The only module that touches the global reactor.

Exit codes: 0 stopped normally · 1 could not start (port in use, database) · 2 bad configuration or catalog,
or TLS files missing or unusable · 4 unsafe secrets or key file. ``cidd init`` / ``cidd issue-cert`` (cidd/init_cli.py)
use the same codes.
"""

from __future__ import annotations

import argparse
import resource
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
from twisted.internet.task import LoopingCall

from cidcatalog.catalog import CatalogError
from cidcommon import __version__, logs, twisted_logs, wire
from cidcommon.errors import BadHostlist, CidError, TokenFileError
from cidcommon.paths import ensure_token, token_path
from cidd.boot_http import BootResource
from cidd.config import Config, ConfigError, load_config
from cidd.core.boot import EthersError
from cidd.engine import Engine, read_catalog
from cidd.images_http import listen_http
from cidd.local_socket import count_refusals, listen_unix
from cidd.metrics import Metrics
from cidd.pki import PkiError
from cidd.power import BmcCredentials, PowerController
from cidd.sdnotify import Notifier
from cidd.sessions import CiddFactory, Sessions
from cidd.status_http import EngineCollector, StatusResource
from cidd.store import Store, StoreError
from cidd.tls import ensure_pki, server_options
from cidd.user_directory import UserDirectory, thread_runner

log = structlog.get_logger("cidd")

EPILOG = """\
With no --config, cidd starts on working defaults: state (SQLite database, tokens) under $CID_STATE_DIR,
else /var/lib/cid for root, else ~/.local/state/cid; it listens on 127.0.0.1:38008 and creates one token
file per role under <state>/secrets (mode 0600), where cidkid and cidcapt on the same machine find them.
SIGHUP reloads the image catalog; a catalog with errors is refused and the previous one stays active.

Clients on the head node may use the local Unix socket (socket.path, default <state>/cidd.sock) without a
token: root and cidd's own user are admin, socket.roles names the others (docs/security.md).
'cidd agent-token NODE [--out FILE]' writes a node's own agent token (docs/security.md).

The agent/client port speaks TLS only. At first start cidd creates a cluster CA (<state>/tls/ca.pem, key in
<state>/secrets/ca.key) and its server certificate, unless the 'tls' section names other files; copy ca.pem
to every node and client. Plain TCP only with 'tls: {mode: plain}' in cidd.yaml (logged as a warning).

  cidd init [--san NAME]... [--agent-cert NODE]... [--force]   create the CA and certificates now
  cidd issue-cert NODE...                                      agent certificates for mutual TLS

exit codes: 0 stopped · 1 could not start · 2 bad configuration or catalog, TLS files missing or unusable ·
4 unsafe secrets or key file (readable by group or others)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line."""
    parser = argparse.ArgumentParser(prog="cidd", description="cid head-node daemon: switches node images "
                                     "on demand for batch jobs.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", help="YAML configuration file (default: built-in defaults)")
    parser.add_argument("--state-dir", help="override state_dir (database, tokens)")
    parser.add_argument("--catalog", help="override the image catalog path (images.yaml)")
    parser.add_argument("--listen", help="override the agent/client listen address HOST:PORT")
    parser.add_argument("--log-format", choices=("json", "console"), help="override log.format")
    parser.add_argument("--version", action="version", version=f"cidd {__version__}")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """Return the configuration with the command-line overrides applied. Raises ConfigError."""
    config = load_config(args.config)
    if args.state_dir:
        state_dir = Path(args.state_dir)
        catalog = config.catalog if config.catalog_required else state_dir / "images.yaml"
        config = replace(config, state_dir=state_dir, catalog=catalog)
    if args.catalog:
        config = replace(config, catalog=Path(args.catalog), catalog_required=True)
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        if not port.isdigit():
            raise ConfigError(f"--listen {args.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:38008")
        config = replace(config, listen_host=host.strip("[]") or "0.0.0.0", listen_port=int(port))
    if args.log_format:
        config = replace(config, log_format=args.log_format)
    return config


def ensure_tokens(config: Config) -> dict[str, str]:
    """Return {role: token}, creating missing token files (0600). Raises TokenFileError if one is unsafe."""
    return {role: ensure_token(token_path(config.state_dir, role)) for role in wire.ROLES}


def raise_file_limit() -> None:
    """Raise the open-file limit to its hard maximum (one descriptor per agent session)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start(config: Config, reactor: Any) -> tuple[Engine, Any]:
    """Open the state, start the engine and listen; return the engine and the listening port."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    tokens = ensure_tokens(config)
    tls_options = None
    if config.tls.mode == "tls":
        tls_options = server_options(ensure_pki(config), config.tls.client_certs)
    catalog = read_catalog(config)
    store = Store(config.db_path)
    sessions = Sessions()
    power = None
    if config.bmc is not None and config.bmc.credentials is not None:
        power = PowerController(BmcCredentials.load(config.bmc.credentials), reactor,
                                max_concurrent=config.bmc.max_concurrent, call_timeout=config.bmc.timeout)
        power.start()
        reactor.addSystemEventTrigger("during", "shutdown", power.stop)
    engine = Engine(config, catalog, store, reactor, sessions, power)
    engine.start()
    directory = UserDirectory(reactor, thread_runner(reactor), limits=config.users)  # TCP port and socket
    factory = CiddFactory(engine, sessions, tokens, reactor, tls=tls_options is not None,
                          client_certs=config.tls.client_certs, directory=directory)
    if tls_options is None:
        port = reactor.listenTCP(config.listen_port, factory, backlog=4096, interface=config.listen_host)
        log.warning("security.plain_tcp", host=config.listen_host, port=port.getHost().port,
                    hint="tokens travel in clear text; remove 'mode: plain' from the tls section to use TLS")
    else:
        port = reactor.listenSSL(config.listen_port, factory, tls_options, backlog=4096,
                                 interface=config.listen_host)
    metrics = Metrics()
    metrics.registry.register(EngineCollector(engine))
    count_refusals(metrics, factory.security, reactor)
    listen_unix(engine, sessions, tokens, reactor, factory.security, directory)
    listen_http(config, lambda: engine.catalog, metrics, reactor,
                extra={b"status": StatusResource(engine), b"boot": BootResource(engine)})
    log.info("cidd.listening", host=config.listen_host, port=port.getHost().port, state_dir=str(config.state_dir),
             catalog=str(config.catalog), images=len(catalog), version=__version__,
             tls=config.tls.mode == "tls", client_certs=config.tls.client_certs)
    return engine, port


def reload_catalog(engine: Engine) -> None:
    """Swap in a freshly read catalog (SIGHUP); on errors the old one stays and every problem is logged."""
    try:
        engine.reload_catalog()
    except CatalogError:
        pass  # logged by the engine with every problem


def exit_code(exc: BaseException) -> int:
    """Return the exit code for an error that stopped cidd (or ``cidd init``) before it served (see EPILOG)."""
    if isinstance(exc, ConfigError | CatalogError | EthersError | PkiError | BadHostlist):
        return 2
    if isinstance(exc, TokenFileError):
        return 4
    return 1


def _fail(exc: BaseException) -> int:
    """Print the error of ``exc`` for a person and return its exit code."""
    text = exc.message if isinstance(exc, CidError) else str(exc)
    prefix = "" if exit_code(exc) != 1 else "cannot start: "
    print(f"cidd: error: {prefix}{text}", file=sys.stderr)
    return exit_code(exc)


def run_init(argv: list[str]) -> int:
    """Run ``cidd init`` or ``cidd issue-cert``; return the exit code."""
    from cidd import init_cli

    args = init_cli.parse_args(argv)
    try:
        init_cli.run(args, print)
    except (CidError, OSError) as exc:
        return _fail(exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run cidd until SIGTERM/SIGINT (or a set-up command); return the exit code (see EPILOG)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent-token"]:
        from cidd import agent_tokens

        return agent_tokens.main(argv[1:])
    if argv and argv[0] in ("init", "issue-cert"):
        return run_init(argv)
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as exc:
        return _fail(exc)
    logs.configure(json=config.log_format == "json", level=config.log_level)
    twisted_logs.route_twisted_logs()
    from twisted.internet import reactor

    raise_file_limit()
    try:
        engine, _port = start(config, reactor)
    except (StoreError, CidError, OSError, Exception) as exc:  # noqa: BLE001 - exit_code maps start failures
        return _fail(exc)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload_catalog, engine))
    notifier = Notifier()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: (log.info("cidd.stopping"), notifier.stopping()))
    reactor.callWhenRunning(notifier.ready, f"serving {len(engine.nodes)} nodes")
    if notifier.watchdog_interval:
        # The keep-alive runs on the reactor: a blocked reactor misses it and systemd restarts cidd.
        LoopingCall(notifier.watchdog).start(notifier.watchdog_interval, now=False)
    reactor.run()
    engine.store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
