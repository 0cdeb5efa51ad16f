"""cidcapt's command line: the argument parser, its checks, and where the server, token and TLS come from."""

from __future__ import annotations

import argparse
import os
import pwd
import re
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

from cidcapt import __version__
from cidcapt.connection import parse_server
from cidcapt.exit_codes import EXIT_BAD_REQUEST, EXIT_CODES_HELP
from cidcommon.client_config import DEFAULT_CONFIG_DIR, ClientConfig, ClientOptions, resolve
from cidcommon.paths import read_token
from cidcommon.tlsfiles import ClientTls
from cidcommon.wire import CLIENT_ROLES


class Parser(argparse.ArgumentParser):
    """An ArgumentParser writing to the streams given to ``main`` instead of the process's."""

    def __init__(self, *args: Any, out: TextIO, err: TextIO, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._out = out
        self._err = err

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            (self._err if file is sys.stderr else self._out).write(message)

    def error(self, message: str) -> NoReturn:
        """Print the usage and ``message`` to the error stream, then exit with code 2 (SystemExit)."""
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_REQUEST, f"{self.prog}: error: {message}\n")


def _server(text: str) -> str:
    """argparse type: return the HOST:PORT text once it parses; raises ArgumentTypeError with the reason."""
    try:
        parse_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _seconds(minimum: float) -> Any:
    """Return an argparse type accepting a finite number of seconds >= ``minimum`` (NaN and inf are rejected)."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not value >= minimum or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= {minimum:g}")
        return value
    return convert


_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def when_arg(text: str) -> tuple[str, float]:
    """argparse type of --since/--until: return ("ago", seconds) for ``7d``/``12h``/``30m``/``90s``/``2w``,
    ("at", Unix time) for ``@1700000000`` or an ISO date/time (local time unless it names a zone).

    Raises ArgumentTypeError with the forms accepted.
    """
    value = text.strip()
    match = _AGO.match(value)
    if match:
        return "ago", float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        if value.startswith("@"):
            return "at", float(value[1:])
        return "at", datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: use 7d, 12h, 30m (ago), 2026-11-21, "
                                         "'2026-11-21 08:00' or @UNIXTIME") from None


def resolve_when(spec: tuple[str, float] | None, now: float) -> float | None:
    """Return the Unix time of a --since/--until value (None stays None)."""
    if spec is None:
        return None
    kind, value = spec
    return now - value if kind == "ago" else value


def _positive(text: str) -> int:
    """argparse type: a whole number >= 1; raises ArgumentTypeError."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 1")
    return int(text)


def default_user(env: Mapping[str, str]) -> str:
    """Return the requester: $SLURM_JOB_USER, else $USER, else $LOGNAME, else the name of the process's user id."""
    for key in ("SLURM_JOB_USER", "USER", "LOGNAME"):
        if env.get(key):
            return env[key]
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def build_parser(env: Mapping[str, str], out: TextIO, err: TextIO) -> argparse.ArgumentParser:
    """Return the argument parser (no abbreviated options: ``--tim`` is refused, never taken for --timeout)."""
    parser = Parser(
        prog="cidcapt", out=out, err=err, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description="Put the nodes of a job into an image and wait until they run it (cid client).\n"
                    "  cidcapt -j JOB -n HOSTLIST -i IMAGE     switch nodes, wait, exit 0 when all are ready\n"
                    "  cidcapt --status [HOSTLIST]             show cidd's view of the nodes\n"
                    "  cidcapt --captures                      list running and recent captures\n"
                    "  cidcapt --cancel -j JOB                 cancel a running capture (admin, or the job's user)\n"
                    "  cidcapt --images                        list the image catalog (name, size, date, owner...)\n"
                    "  cidcapt --stats [HOSTLIST] [--worst N]  switch statistics from cidd's event history\n"
                    "  cidcapt --console NODE                  the node's serial console (admin; ~. detaches)\n"
                    "  cidcapt --slurm [-i IMAGE]              PrologSlurmctld: switch the job's nodes, or drain them\n"
                    "  cidcapt --release --slurm               EpilogSlurmctld: back to cidd's default image, no wait",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("-j", "--job", help="job id (a capture is re-attached by job id)")
    parser.add_argument("-n", "--nodes", nargs="+", action="extend", metavar="HOSTLIST",
                        help="nodes: Slurm 'node[01-16]' or Moab 'n1:ppn=8,n2:ppn=8' lists")
    parser.add_argument("-i", "--image", help="image id, e.g. debian-12-1")
    parser.add_argument("--status", nargs="?", const="", metavar="HOSTLIST",
                        help="show the state of the nodes (all of them without HOSTLIST)")
    parser.add_argument("--captures", action="store_true", help="list running and recently ended captures")
    parser.add_argument("--cancel", action="store_true",
                        help="cancel the running capture of -j JOB (the admin role, or the scheduler role for the "
                        "job's own user: --user). Nodes not rebooted yet stay as they are (ready in their image), "
                        "nodes on their way to the installer are sent back to their image, installs under way "
                        "finish and the node boots the new image (a disk is never left half-written). A cidcapt "
                        "waiting on the job exits 6; --captures shows it cancelled. Exit 0 (also when it was "
                        "already cancelled), 2 for a job with no running capture, 5 when not allowed")
    parser.add_argument("--images", action="store_true",
                        help="list the catalog's images: id, OS, size, date (of the image file), owner, visibility "
                        "(shared or private), description; a private image is shown only to its owner (the user "
                        "the local socket proves, or the one the scheduler role names with --user) and to the "
                        "admin role; --json for machines")
    parser.add_argument("--stats", nargs="?", const="", metavar="HOSTLIST",
                        help="statistics of the switches in cidd's event history (every node, or HOSTLIST's): "
                        "switches, success rate, failures by kind, ladder rungs, median and 95th percentile of "
                        "each phase, per node, image and group; select with --since, --until, -i IMAGE, -j JOB; "
                        "--json for the whole report")
    parser.add_argument("--since", type=when_arg, default=None, metavar="WHEN",
                        help="--stats: from this time (7d, 12h, 30m ago; 2026-11-21; '2026-11-21 08:00'; @UNIXTIME)")
    parser.add_argument("--until", type=when_arg, default=None, metavar="WHEN",
                        help="--stats: up to this time (same forms as --since)")
    parser.add_argument("--worst", type=_positive, default=None, metavar="N",
                        help="--stats: only the N nodes with the highest failure rate (candidates to pull out "
                        "of the pool)")
    parser.add_argument("--power", nargs=2, metavar=("ACTION", "HOSTLIST"),
                        help="BMC power for nodes (admin): ACTION is status, on, off, cycle or reset; exit 1 when "
                        "some node's BMC failed (each listed with the reason)")
    parser.add_argument("--console", metavar="NODE",
                        help="attach the terminal to NODE's serial-over-LAN console, relayed by cidd (admin; the BMC "
                        "credentials stay with cidd); ~. at the start of a line detaches; exit 1 when the console "
                        "failed (the reason is printed)")
    parser.add_argument("--reload", action="store_true",
                        help="ask cidd to reload its image catalog (admin); a catalog with errors is refused "
                        "with every error listed, and the previous one stays active")
    parser.add_argument("--slurm", action="store_true",
                        help="PrologSlurmctld mode: job, nodes and user from SLURM_JOB_ID, SLURM_JOB_NODELIST and "
                        "SLURM_JOB_USER; the image from -i, else from the cid features named in SLURM_JOB_CONSTRAINTS "
                        "(cidd's scheduler.features), else cidd's default_image (none: exit 0, nodes untouched); "
                        "on exit 1 or 3 the failed and pending nodes are drained with scontrol")
    parser.add_argument("--release", action="store_true",
                        help="epilog helper: when cidd's release_to_default is on, start switching the job's nodes "
                        "(--slurm, or -j/-n) back to the default image as job JOB.release, without waiting; "
                        "short timeouts; a cid problem is a warning and exit 0")
    parser.add_argument("--server", type=_server, default=None, metavar="HOST:PORT",
                        help="cidd's address, TCP with a token (default $CID_SERVER; see 'how cidcapt finds cidd' "
                        "below)")
    parser.add_argument("--socket", type=Path, default=None, metavar="PATH",
                        help="cidd's local Unix socket on the head node: no token, cidd gives the role of your uid "
                        "(default $CID_SOCKET; see 'how cidcapt finds cidd' below)")
    parser.add_argument("--timeout", type=_seconds(0.001), default=3600.0, metavar="SECONDS",
                        help="give up on the nodes after this long (default %(default)g)")
    parser.add_argument("--connect-timeout", type=_seconds(0.0), default=10.0, metavar="SECONDS",
                        help="keep trying to reach cidd for this long (default %(default)g)")
    parser.add_argument("--json", action="store_true",
                        help="write events and a final result as JSON lines on stdout")
    parser.add_argument("--quiet", action="store_true", help="show only the summary and errors")
    parser.add_argument("--summary-every", type=_seconds(0.1), default=30.0, metavar="SECONDS",
                        help="progress on stderr when it is not a terminal (a prolog's log): a line for each failure "
                        "and ladder climb, and a summary line every SECONDS: ready count, nodes per state, install "
                        "bytes and rate, time left, nodes not moving (default %(default)g); on a terminal a live "
                        "view instead")
    parser.add_argument("--stall-after", type=_seconds(0.1), default=180.0, metavar="SECONDS",
                        help="name a node as not moving when it neither changed state nor wrote bytes for SECONDS "
                        "(default %(default)g)")
    parser.add_argument("--user", default=None,
                        help="the job's user (default $SLURM_JOB_USER, $USER or $LOGNAME, else the name of your uid)")
    parser.add_argument("--role", default=None,
                        help="role to authenticate as: admin, scheduler, reader (default $CID_ROLE, else the "
                        "configuration's client.role, else admin)")
    parser.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                        help="the role's token file; asks for TCP (default $CID_TOKEN_FILE, else the "
                        "configuration's client.token_file, else <state_dir>/secrets/ROLE.token)")
    parser.add_argument("--ca", type=Path, default=None, metavar="FILE",
                        help="the cluster CA certificate that signed cidd's (default $CID_CA_FILE, else the "
                        "configuration's client.ca or tls.ca, else <state_dir>/tls/ca.pem)")
    parser.add_argument("--cert", type=Path, default=None, metavar="FILE",
                        help="client certificate for mutual TLS (default $CID_CERT_FILE; not needed: the token "
                        "authenticates clients)")
    parser.add_argument("--key", type=Path, default=None, metavar="FILE",
                        help="private key of --cert, mode 0600 (default $CID_KEY_FILE, else --cert)")
    parser.add_argument("--plain-tcp", action="store_true",
                        help="talk to cidd without TLS (only for a cidd configured with tls mode plain; "
                        "default $CID_PLAIN_TCP)")
    parser.add_argument("--version", action="version", version=f"cidcapt {__version__}")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` (code 2) when the options do not make one valid command."""
    if args.role is not None and args.role not in CLIENT_ROLES:
        parser.error(f"unknown role {args.role!r}; use one of {', '.join(CLIENT_ROLES)}")
    if sum((args.status is not None, args.captures, args.reload, args.power is not None,
            args.console is not None, args.stats is not None, args.cancel, args.images)) > 1:
        parser.error("use only one of --status, --captures, --stats, --reload, --power, --console, --cancel and "
                     "--images")
    if args.stats is None and (args.since is not None or args.until is not None or args.worst is not None):
        parser.error("--since, --until and --worst go with --stats")
    if args.stats is not None:
        if args.slurm or args.release:
            parser.error("--stats does not go with --slurm or --release")
        return
    if args.cancel:
        if not args.job or args.image or args.nodes or args.slurm or args.release:
            parser.error("--cancel needs -j JOB and takes no -n, -i, --slurm or --release")
        return
    if args.images:
        if args.job or args.image or args.nodes or args.slurm or args.release:
            parser.error("--images takes no -j, -n, -i, --slurm or --release")
        return
    if args.console is not None:
        if args.job or args.image or args.nodes or args.slurm or args.release:
            parser.error("--console NODE takes no -j, -n, -i, --slurm or --release")
        return
    if args.power is not None:
        if args.job or args.image or args.nodes:
            parser.error("--power takes no -j, -n or -i: give the hostlist after the action")
        return
    if args.slurm or args.release:
        _check_slurm_args(parser, args)
        return
    if args.reload and (args.job or args.image or args.nodes):
        parser.error("--reload takes no -j, -n or -i")
    if args.reload:
        return
    if args.status is not None or args.captures:
        if args.job or args.image:
            parser.error("-j/--job and -i/--image start a capture; they do not go with --status or --captures")
        if args.captures and args.nodes:
            parser.error("--captures lists every capture; it takes no -n/--nodes")
        return
    missing = [opt for opt, value in (("-j/--job", args.job), ("-n/--nodes", args.nodes), ("-i/--image", args.image))
               if not value]
    if missing:
        parser.error(f"missing {', '.join(missing)}: a capture needs -j JOB -n HOSTLIST -i IMAGE "
                     "(or use --status / --captures)")


def _check_slurm_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` (code 2) when --slurm/--release are combined with options they exclude."""
    if args.status is not None or args.captures or args.reload:
        parser.error("--slurm and --release do not go with --status, --captures or --reload")
    if args.slurm and (args.job or args.nodes):
        parser.error("--slurm reads the job and its nodes from SLURM_JOB_ID and SLURM_JOB_NODELIST; drop -j/-n")
    if args.release and not args.slurm and not (args.job and args.nodes):
        parser.error("--release needs --slurm, or -j JOB -n HOSTLIST")
    if args.release and args.image:
        parser.error("--release switches the nodes to cidd's default_image; it takes no -i")


def choose_transport(args: argparse.Namespace, env: Mapping[str, str],
                     config_dir: Path = DEFAULT_CONFIG_DIR) -> ClientConfig:
    """Return how to reach cidd (cidcommon.client_config: options, then environment, then $CID_CONFIG or
    /etc/cid/cidd.yaml, then the default socket); set ``args.client``, ``args.role``, ``args.socket`` and
    ``args.server`` (host, port), or (socket path, 0) on the socket.

    Raises ClientConfigError (exit 2) for --socket with --server, a bad $CID_SERVER or an unusable file.
    """
    options = ClientOptions(socket=args.socket, server=args.server, token_file=args.token_file, ca=args.ca,
                            cert=args.cert, key=args.key, role=args.role, plain=args.plain_tcp)
    client = resolve(options, env, config_dir=config_dir)
    args.client, args.role, args.socket, args.server = client, client.role, client.socket, client.host_port
    return client


def role_token(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    """Return the role's token ("" on the local socket); raises TokenFileError when the file is unusable."""
    client: ClientConfig = args.client
    return "" if client.token_file is None else read_token(client.token_file)


def tls_settings(args: argparse.Namespace, env: Mapping[str, str]) -> ClientTls | None:
    """Return the TLS settings (None on the socket or in plain TCP); the CA file is checked when the session opens."""
    client: ClientConfig = args.client
    return None if client.ca is None else ClientTls(client.ca, client.cert, client.key)
