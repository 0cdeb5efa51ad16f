"""``cidd``: the cid head-node daemon. The only module that touches the global reactor.

Exit codes: 0 stopped normally · 1 could not start (port in use, database) · 2 bad configuration or catalog,
or TLS files missing or unusable · 4 unsafe secrets or key file. ``cidd init`` / ``cidd issue-cert`` (cidd/init_cli.py)
use the same codes.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
from dataclasses import replace
from pathlib import Path

import structlog

from cidcatalog.catalog import CatalogError
from cidcommon import __version__, logs, twisted_logs
from cidcommon.client_config import ClientConfigError
from cidcommon.errors import BadHostlist, CidError, TokenFileError
from cidcommon.hostport import parse_hostport
from cidd.config import Config, ConfigError, load_config
from cidd.core.boot import EthersError
from cidd.engine import Engine
from cidd.pki import PkiError
from cidd.service import build_service

log = structlog.get_logger(__name__)

EPILOG = """\
With no --config, cidd reads $CID_CONFIG, else /etc/cid/cidd.yaml when it exists (the file cidcapt,
cid-mkimg and cid-slurm-helper read to find it). With neither it starts on working defaults: state (SQLite
database, tokens) under $CID_STATE_DIR, else /var/lib/cid for root, else ~/.local/state/cid; it listens on
127.0.0.1:38008 and creates one token file per role under <state>/secrets (mode 0600), where cidkid and
cidcapt on the same machine find them.
SIGHUP reloads the image catalog; a catalog with errors is refused and the previous one stays active.

Clients on the head node may use the local Unix socket (socket.path, default <state>/cidd.sock) without a
token: root and cidd's own user are admin, socket.roles names the others (docs/security.md).
'cidd agent-token NODE [--out FILE]' writes a node's own agent token (docs/security.md).

The agent/client port speaks TLS only. At first start cidd creates a cluster CA (<state>/tls/ca.pem, key in
<state>/secrets/ca.key) and its server certificate, unless the 'tls' section names other files; copy ca.pem
to every node and client. Plain TCP only with 'tls: {mode: plain}' in cidd.yaml (logged as a warning).

  cidd check-config [--config FILE]                            check configuration, catalog and image files
                                                               (exit 0, or 2 with every problem); starts nothing;
                                                               default FILE: $CID_CONFIG, else /etc/cid/cidd.yaml
                                                               when it exists (the file clients read)
  cidd init [--san NAME]... [--agent-cert NODE]... [--force]   create the CA and certificates now
  cidd issue-cert NODE...                                      agent certificates for mutual TLS

exit codes: 0 stopped · 1 could not start · 2 bad configuration or catalog, TLS files missing or unusable ·
4 unsafe secrets or key file (readable by group or others)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line."""
    parser = argparse.ArgumentParser(prog="cidd", description="cid head-node daemon: switches node images "
                                     "on demand for batch jobs.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", "-c", help="YAML configuration file (default: $CID_CONFIG, else /etc/cid/cidd.yaml "
                        "when it exists, else built-in defaults: the file the clients read)")
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
        try:
            listen = "0.0.0.0" + args.listen if args.listen.startswith(":") else args.listen  # ":PORT": every address
            host, port = parse_hostport(listen, config.listen_port, what="--listen address")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        config = replace(config, listen_host=host, listen_port=port)
    if args.log_format:
        config = replace(config, log_format=args.log_format)
    return config


def raise_file_limit() -> None:
    """Raise the open-file limit to its hard maximum (one descriptor per agent session)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def reload_catalog(engine: Engine) -> None:
    """Swap in a freshly read catalog (SIGHUP); on errors the old one stays and every problem is logged."""
    try:
        engine.reload_catalog()
    except CatalogError:
        pass  # logged by the engine with every problem


def exit_code(exc: BaseException) -> int:
    """Return the exit code for an error that stopped cidd (or ``cidd init``) before it served (see EPILOG)."""
    if isinstance(exc, ConfigError | CatalogError | EthersError | PkiError | BadHostlist | ClientConfigError):
        return 2
    if isinstance(exc, TokenFileError):
        return 4
    return 1  # StateDirBusy, StoreError, a port in use, ...


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
    if argv[:1] == ["check-config"]:
        from cidd import check_config

        return check_config.run(parse_args(argv[1:]), build_config, print,
                                lambda text: print(f"cidd: {text}", file=sys.stderr))
    args = parse_args(argv)
    from cidd.check_config import config_file

    try:
        source = config_file(args, os.environ)  # the file clients read too: --config, $CID_CONFIG, /etc/cid/cidd.yaml
        config = build_config(args)
    except (ConfigError, ClientConfigError) as exc:
        return _fail(exc)
    logs.configure(json=config.log_format == "json", level=config.log_level)
    log.info("cidd.configuration", source=source)
    twisted_logs.route_twisted_logs()
    from twisted.internet import reactor

    raise_file_limit()
    top, cidd = build_service(config, reactor)
    try:
        top.startService()  # ordered: lock, store, power, engine, ports, sd_notify (cidd/service.py)
    except Exception as exc:  # noqa: BLE001 - exit_code maps start failures; started children were stopped
        return _fail(exc)
    engine = cidd.engine
    assert engine is not None
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload_catalog, engine))
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    log.info("cidd.stopped")
    return 0

if __name__ == "__main__":
    sys.exit(main())
