"""``cidd init`` and ``cidd issue-cert``: create the cluster CA, the server certificate and agent certificates.

Parsing and actions only; cidd/main.py runs them and maps their errors to exit codes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from cidcommon.hostlists import expand
from cidd.config import Config, ConfigError, load_config
from cidd.pki import PkiError, fingerprint, init_pki, issue_agent, load_cert, san_entries

COMMANDS = ("init", "issue-cert")

INIT_EPILOG = """\
Files (defaults, under the state directory; the 'tls' section of cidd.yaml may name others):
  <state>/tls/ca.pem          cluster CA certificate: copy it to every node and client (--ca, $CID_CA_FILE)
  <state>/secrets/ca.key      CA private key (0600): keep it on the head node
  <state>/tls/server.pem      cidd's certificate, with --san names and addresses
  <state>/secrets/server.key  its key (0600)
  <state>/secrets/agents/NODE.pem, NODE.key   agent certificates for mutual TLS (--agent-cert, issue-cert)
An existing CA and server certificate are kept unless --force (a new CA invalidates every agent certificate).
cidd also creates the CA and server certificate by itself at first start when none exists.

exit codes: 0 done · 2 bad configuration or unreadable files · 4 unsafe key file
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Return the parsed ``init`` or ``issue-cert`` command line (``argv[0]`` is the command)."""
    parser = argparse.ArgumentParser(prog="cidd", description="cidd's TLS set-up commands.", epilog=INIT_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="create the cluster CA and cidd's server certificate",
                               epilog=INIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                               allow_abbrev=False)
    init.add_argument("--san", action="append", default=[], metavar="NAME",
                      help="a host name or IP address clients use to reach cidd (repeat); loopback, this host's "
                      "name, listen.host, boot.server and tls.san are always included")
    init.add_argument("--agent-cert", action="append", default=[], metavar="NODE",
                      help="also issue an agent certificate for NODE (repeat)")
    init.add_argument("--force", action="store_true", help="create a new CA and server certificate even if they exist")
    issue = commands.add_parser("issue-cert", help="issue agent certificates (CN = node name) for mutual TLS",
                                allow_abbrev=False)
    issue.add_argument("nodes", nargs="+", metavar="HOSTLIST", help="node names or hostlists, e.g. node[001-128]")
    issue.add_argument("--out", type=Path, help="directory for NODE.pem and NODE.key (default <state>/secrets/agents)")
    issue.add_argument("--force", action="store_true", help="replace an existing certificate of the node")
    for sub in (init, issue):
        sub.add_argument("--config", "-c", help="YAML configuration file (for state_dir and the tls section)")
        sub.add_argument("--state-dir", help="override state_dir")
    return parser.parse_args(argv)


def config_of(args: argparse.Namespace) -> Config:
    """Return the configuration the command works on. Raises ConfigError."""
    from dataclasses import replace

    config = load_config(args.config)
    if args.state_dir:
        config = replace(config, state_dir=Path(args.state_dir))
    return config


def run(args: argparse.Namespace, say: Callable[[str], None]) -> None:
    """Carry out ``init`` or ``issue-cert``, telling what was done through ``say``.

    Raises ConfigError, BadHostlist, PkiError (an existing agent certificate without --force, unreadable files)
    and TokenFileError (an unsafe key).
    """
    from cidd.tls import default_sans

    config = config_of(args)
    paths = config.tls.paths(config.state_dir)
    if args.command == "init":
        if config.tls.mode == "plain":
            say("note: cidd.yaml has tls mode plain: the files are created but not used until mode is tls")
        report = init_pki(paths, [*default_sans(config), *args.san], force=args.force)
        for path in report.created:
            say(f"created {path}")
        for path in report.kept:
            say(f"kept {path} (exists; --force to replace)")
        cert = load_cert(paths.cert)
        say(f"server certificate names: {', '.join(san_entries(cert))}")
        say(f"CA fingerprint (sha256): {fingerprint(load_cert(paths.ca))}")
        nodes = args.agent_cert
    else:
        nodes = [name for text in args.nodes for name in expand(text)]
    for node in nodes:
        try:
            cert_path, key_path = issue_agent(paths, node, out_dir=getattr(args, "out", None),
                                              force=args.force)
        except FileExistsError as exc:
            raise PkiError(f"an agent certificate for {node} exists ({exc}); add --force to replace it") from None
        say(f"issued {cert_path} and {key_path} for node {node}: install them on the node and run cidkid "
            f"with --cert {cert_path.name} --key {key_path.name}")


__all__ = ["COMMANDS", "ConfigError", "parse_args", "run"]
