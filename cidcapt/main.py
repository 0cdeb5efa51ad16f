"""cidcapt's command line: parse arguments, run a capture or an admin view, and map the end to an exit code.

``main(argv, stdout=..., stderr=..., env=...)`` is the console script and the entry point for tests;
``exit_code`` is the one place that turns an outcome or an error into the exit-code contract below.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pwd
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, TextIO

from cidcapt import __version__, slurm
from cidcapt.capture import CaptureRequest, CaptureRunner, Endpoint, Outcome
from cidcapt.connection import Clock, Sleep, Timing, open_session, parse_server, simple_request
from cidcapt.render import CAPTURES_HEADERS, STATUS_HEADERS, Renderer, captures_rows, counts, status_rows
from cidcommon.errors import BAD_REQUEST_CODES, REFUSED_CODES, CidError
from cidcommon.hostlists import collect, expand
from cidcommon.paths import default_state_dir, read_token, token_path
from cidcommon.tlsfiles import ClientTls, client_tls
from cidcommon.wire import CLIENT_ROLES, DEFAULT_PORT

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_REQUEST = 2
EXIT_DEADLINE = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5

EXIT_CODES_HELP = f"""\
exit codes:
  0  all nodes are ready in the image
  1  some nodes failed (each is listed with its reason)
  2  bad request: usage, unknown image, bad hostlist, unknown node (nothing was started)
  3  deadline passed (the nodes still pending are listed with their step)
  4  cidd unreachable, authentication failed, or the head node's user database did not answer (retry)
  5  refused: no right to do this (role, rights rules, a private image), or a conflict with another job
With --slurm the same codes; on 1 and 3 the failed and pending nodes are first drained (scontrol, reason
"cid: ..."), so that Slurm requeues the job onto other nodes. --release exits 0 except for bad usage (2).

A capture that cidd's rights rules refuse (the user may not put this image on one of the nodes, or the image
is private to another user) exits 5 with the rule set that failed; nothing was started.

environment: CID_SERVER (default 127.0.0.1:{DEFAULT_PORT}), CID_SOCKET (the local socket, no token), CID_ROLE
(default admin; on the socket the role comes from your uid, a lower one may be asked), CID_TOKEN_FILE,
CID_STATE_DIR (tokens in <state_dir>/secrets/<role>.token, the socket <state_dir>/cidd.sock),
SLURM_JOB_USER or USER (the --user default), CID_CA_FILE (default <state_dir>/tls/ca.pem), CID_CERT_FILE and
CID_KEY_FILE, CID_PLAIN_TCP=1 (no TLS).
The TCP session with cidd runs over TLS: cidd's certificate must be signed by the CA file and name --server's
host; a server the CA does not vouch for is refused with exit code 4.
"""


def exit_code(result: Outcome | BaseException) -> int:
    """Return the exit code of the contract for how a run ended (an Outcome, or the error that ended it)."""
    if isinstance(result, Outcome):
        return {"ok": EXIT_OK, "failed": EXIT_FAILED}.get(result.state, EXIT_DEADLINE)
    if isinstance(result, CidError):
        if result.code in BAD_REQUEST_CODES:
            return EXIT_BAD_REQUEST
        if result.code in REFUSED_CODES:
            return EXIT_REFUSED
    return EXIT_UNREACHABLE  # auth, internal, superseded, unreachable, connection lost, a bad peer


class _Parser(argparse.ArgumentParser):
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


def _server(text: str) -> tuple[str, int]:
    """argparse type: return (host, port); raises ArgumentTypeError with the reason."""
    try:
        return parse_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(minimum: float) -> Any:
    """Return an argparse type accepting a number of seconds >= ``minimum`` (> 0 when minimum is 0+)."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not value >= minimum or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= {minimum:g}")
        return value
    return convert


def default_user(env: Mapping[str, str]) -> str:
    """Return the requester: $SLURM_JOB_USER, else $USER, else the name of the process's user id."""
    for key in ("SLURM_JOB_USER", "USER", "LOGNAME"):
        if env.get(key):
            return env[key]
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def build_parser(env: Mapping[str, str], out: TextIO, err: TextIO) -> argparse.ArgumentParser:
    """Return the argument parser; defaults come from ``env`` (CID_SERVER, CID_ROLE)."""
    parser = _Parser(
        prog="cidcapt", out=out, err=err, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Put the nodes of a job into an image and wait until they run it (cid client).\n"
                    "  cidcapt -j JOB -n HOSTLIST -i IMAGE     switch nodes, wait, exit 0 when all are ready\n"
                    "  cidcapt --status [HOSTLIST]             show cidd's view of the nodes\n"
                    "  cidcapt --captures                      list running and recent captures\n"
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
    parser.add_argument("--server", type=_server, default=None,
                        metavar="HOST:PORT", help=f"cidd's address (default $CID_SERVER or 127.0.0.1:{DEFAULT_PORT})")
    parser.add_argument("--socket", type=Path, default=None, metavar="PATH",
                        help="cidd's local Unix socket on the head node: no token, cidd gives the role of your uid "
                        "(default $CID_SOCKET, else <state_dir>/cidd.sock when it exists and neither a server "
                        "($CID_SERVER) nor a token file (--token-file, $CID_TOKEN_FILE) is given)")
    parser.add_argument("--timeout", type=_seconds(0.001), default=3600.0, metavar="SECONDS",
                        help="give up on the nodes after this long (default %(default)g)")
    parser.add_argument("--connect-timeout", type=_seconds(0.0), default=10.0, metavar="SECONDS",
                        help="keep trying to reach cidd for this long (default %(default)g)")
    parser.add_argument("--json", action="store_true",
                        help="write events and a final result as JSON lines on stdout")
    parser.add_argument("--quiet", action="store_true", help="show only the summary and errors")
    parser.add_argument("--user", default=None, help="the job's user (default $SLURM_JOB_USER or $USER)")
    parser.add_argument("--role", default=env.get("CID_ROLE") or "admin",
                        help="role to authenticate as: admin, scheduler, reader (default $CID_ROLE or admin)")
    parser.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                        help="the role's token file (default $CID_TOKEN_FILE or <state_dir>/secrets/ROLE.token)")
    parser.add_argument("--ca", type=Path, default=None, metavar="FILE",
                        help="the cluster CA certificate that signed cidd's (default $CID_CA_FILE or "
                        "<state_dir>/tls/ca.pem)")
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


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` (code 2) when the options do not make one valid command."""
    if args.role not in CLIENT_ROLES:
        parser.error(f"unknown role {args.role!r}; use one of {', '.join(CLIENT_ROLES)}")
    if sum((args.status is not None, args.captures, args.reload, args.power is not None,
            args.console is not None)) > 1:
        parser.error("use only one of --status, --captures, --reload, --power and --console")
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


def _choose_transport(parser: argparse.ArgumentParser, args: argparse.Namespace, env: Mapping[str, str]) -> None:
    """Set ``args.server`` to (host, port), or to (socket path, 0) and ``args.socket`` when the socket is used.

    Order: --socket, --server, $CID_SOCKET, $CID_SERVER, then the default socket <state_dir>/cidd.sock when it
    exists and no token file was given (--token-file, $CID_TOKEN_FILE), else 127.0.0.1:38008 with a token.
    Exits through ``parser.error`` (code 2) for --socket with --server or a bad $CID_SERVER.
    """
    if args.socket is not None and args.server is not None:
        parser.error("use either --socket (local, no token) or --server (TCP, with a token)")
    if args.socket is None and args.server is None:
        if env.get("CID_SOCKET"):
            args.socket = Path(env["CID_SOCKET"])
        elif env.get("CID_SERVER"):
            try:
                args.server = parse_server(env["CID_SERVER"])
            except ValueError as exc:
                parser.error(f"$CID_SERVER: {exc}")
        elif args.token_file is None and not env.get("CID_TOKEN_FILE"):
            state_dir = Path(env["CID_STATE_DIR"]) if env.get("CID_STATE_DIR") else default_state_dir()
            if (state_dir / "cidd.sock").is_socket():
                args.socket = state_dir / "cidd.sock"
    if args.socket is not None:
        args.server = (str(args.socket), 0)
    elif args.server is None:
        args.server = ("127.0.0.1", DEFAULT_PORT)


def _token(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    """Return the role's token ("" on the local socket); raises TokenFileError when the file is unusable."""
    if args.socket is not None:
        return ""
    if args.token_file is not None:
        path = args.token_file
    elif env.get("CID_TOKEN_FILE"):
        path = Path(env["CID_TOKEN_FILE"])
    else:
        state_dir = Path(env["CID_STATE_DIR"]) if env.get("CID_STATE_DIR") else default_state_dir()
        path = token_path(state_dir, args.role)
    return read_token(path)


def _tls(args: argparse.Namespace, env: Mapping[str, str]) -> ClientTls | None:
    """Return the TLS settings (None for --plain-tcp); the CA file is checked when the session opens."""
    return client_tls(args.ca, args.cert, args.key, plain=args.plain_tcp, env=env)


def _compact(text: str) -> tuple[str, tuple[str, ...]]:
    """Return (compact hostlist, names) of a hostlist; raises BadHostlist."""
    names = expand(text)
    return collect(names), tuple(names)


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None,
         env: Mapping[str, str] | None = None, timing: Timing | None = None, clock: Clock = time.monotonic,
         sleep: Sleep = time.sleep, now: Clock = time.time) -> int:
    """Run cidcapt with ``argv`` (default sys.argv[1:]); return the exit code (see EXIT_CODES_HELP).

    ``stdout``/``stderr``/``env`` default to the process's; ``timing``, ``clock``, ``sleep`` and ``now``
    (wall clock, for ages) let tests shrink the waits. Never raises for expected failures.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    env = os.environ if env is None else env
    parser = build_parser(env, out, err)
    try:
        args = parser.parse_args(argv)  # a string default (from $CID_SERVER) goes through type= too
        _check_args(parser, args)
        _choose_transport(parser, args, env)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_REQUEST
    renderer_class = slurm.SummaryRecorder if args.slurm and not args.release else Renderer
    renderer = renderer_class(out, err, quiet=args.quiet, json_lines=args.json)
    timing = timing or Timing()
    try:
        if args.release:
            return _release(args, env, renderer, timing, clock, sleep)
        if isinstance(renderer, slurm.SummaryRecorder):
            return _slurm_prolog(args, env, renderer, timing, clock, sleep)
        if args.reload:
            return _reload(args, env, renderer, timing, clock, sleep)
        if args.power is not None:
            return _power(args, env, renderer, timing, clock, sleep)
        if args.console is not None:
            return _console(args, env, timing, clock, sleep, err)
        if args.status is not None or args.captures:
            return _admin_view(args, env, renderer, timing, clock, sleep, now)
    except CidError as exc:
        renderer.error(exc.message)
        return exit_code(exc)
    return _capture(args, env, renderer, timing, clock, sleep)


def _admin_view(args: argparse.Namespace, env: Mapping[str, str], renderer: Renderer, timing: Timing,
                clock: Clock, sleep: Sleep, now: Clock) -> int:
    """Run --status or --captures; return 0. Raises CidError subclasses (mapped by the caller)."""
    hostlist = args.status or (" ".join(args.nodes) if args.nodes else "")
    message: dict[str, Any] = {"type": "captures"} if args.captures else {"type": "status"}
    if hostlist:
        message["nodes"] = _compact(hostlist)[0]
    token = _token(args, env)
    host, port = args.server
    reply = simple_request(host, port, args.role, token, message, connect_timeout=args.connect_timeout,
                           timing=timing, clock=clock, sleep=sleep, tls=_tls(args, env))
    key = "captures" if args.captures else "nodes"
    items = reply.get(key)
    items = items if isinstance(items, list) else []
    if args.json:
        renderer.json(items)
    elif args.captures:
        renderer.table(CAPTURES_HEADERS, captures_rows(items, now()))
    else:
        renderer.table(STATUS_HEADERS, status_rows(items, now()))
    return EXIT_OK


def _reload(args: argparse.Namespace, env: Mapping[str, str], renderer: Renderer, timing: Timing,
            clock: Clock, sleep: Sleep) -> int:
    """Ask cidd to reload its catalog; return 0. Raises CidError subclasses (mapped by the caller)."""
    host, port = args.server
    reply = simple_request(host, port, args.role, _token(args, env), {"type": "reload"},
                           connect_timeout=args.connect_timeout, timing=timing, clock=clock, sleep=sleep,
                           tls=_tls(args, env))
    if args.json:
        renderer.json({"images": reply.get("images"), "catalog": reply.get("catalog")})
    else:
        renderer.say(f"catalog {reply.get('catalog')} reloaded: {reply.get('images')} images", always=True)
    return EXIT_OK


def _slurm_prolog(args: argparse.Namespace, env: Mapping[str, str], renderer: slurm.SummaryRecorder,
                  timing: Timing, clock: Clock, sleep: Sleep) -> int:
    """--slurm: run the capture a PrologSlurmctld needs, drain the nodes that failed or stayed pending.

    Returns the exit code of the capture (0 also when the job asks for no cid image). Raises CidError
    subclasses for problems before the capture (environment, constraint, cidd's feature map); the caller maps them.
    """
    job = slurm.SlurmJob.from_env(env)
    image = (args.image or "").strip()
    if not image:
        host, port = args.server
        reply = simple_request(host, port, args.role, _token(args, env), {"type": "features"},
                               connect_timeout=args.connect_timeout, timing=timing, clock=clock, sleep=sleep,
                               tls=_tls(args, env))
        features = reply.get("features") if isinstance(reply.get("features"), dict) else {}
        default = reply.get("default_image") if isinstance(reply.get("default_image"), str) else None
        image = slurm.choose_image(job.constraints, features, default) or ""
        if not image:
            asked = f"constraint {job.constraints!r} names no cid feature" if job.constraints else "no constraint"
            renderer.say(f"job {job.job_id}: {asked}, and cidd has no default_image: nodes {job.nodes} left as "
                         "they are", always=True)
            return EXIT_OK
    args.job, args.nodes, args.image = job.job_id, [job.nodes], image
    args.user = args.user or job.user
    code = _capture(args, env, renderer, timing, clock, sleep)
    if renderer.state in ("failed", "deadline"):
        commands = slurm.drain_commands(job.job_id, image, renderer.nodes)
        slurm.run_drains(commands, env, lambda text: renderer.say(text, always=True))
    return code


def _release(args: argparse.Namespace, env: Mapping[str, str], renderer: Renderer, timing: Timing,
             clock: Clock, sleep: Sleep) -> int:
    """--release: start switching the job's nodes back to cidd's default image, without waiting; return 0.

    Raises SlurmUsageError or BadHostlist (exit 2) for bad usage only; a cid problem is printed as a warning.
    """
    if args.slurm:
        job = slurm.SlurmJob.from_env(env)
        job_id, nodes, user = job.job_id, job.nodes, job.user
    else:
        job_id, nodes, user = args.job.strip(), ",".join(args.nodes), None
    compact = _compact(nodes)[0]
    quick = replace(timing, request_timeout=min(timing.request_timeout, slurm.RELEASE_REQUEST_S),
                    attempt_timeout=min(timing.attempt_timeout, slurm.RELEASE_CONNECT_S))
    host, port = args.server
    try:
        token = _token(args, env)

        def ask(message: dict[str, Any]) -> dict[str, Any]:
            return simple_request(host, port, args.role, token, message, timing=quick, clock=clock, sleep=sleep,
                                  connect_timeout=min(args.connect_timeout, slurm.RELEASE_CONNECT_S),
                                  tls=_tls(args, env))

        done = slurm.release(job_id, compact, args.user or user or default_user(env), ask, timeout=args.timeout)
        renderer.say(done, always=True)
    except CidError as exc:
        renderer.say(f"warning: job {job_id}: nodes {compact} not released: {exc.message}", always=True)
    return EXIT_OK


def _power(args: argparse.Namespace, env: Mapping[str, str], renderer: Renderer, timing: Timing,
           clock: Clock, sleep: Sleep) -> int:
    """Run a BMC power action; print one row per node; return 0, or 1 when some node failed."""
    action, hostlist = args.power
    host, port = args.server
    slow = dataclasses.replace(timing, request_timeout=max(timing.request_timeout, 120.0))  # BMCs are slow
    reply = simple_request(host, port, args.role, _token(args, env),
                           {"type": "power", "action": action, "nodes": _compact(hostlist)[0]},
                           connect_timeout=args.connect_timeout, timing=slow, clock=clock, sleep=sleep,
                           tls=_tls(args, env))
    results = reply.get("results") if isinstance(reply.get("results"), dict) else {}
    if args.json:
        renderer.json(results)
    else:
        rows = [[name, "ok" if r.get("ok") else "FAILED", str(r.get("state") or r.get("error") or "")]
                for name, r in results.items()]
        renderer.table(["NODE", action.upper(), "DETAIL"], rows)
    return EXIT_OK if all(r.get("ok") for r in results.values()) else EXIT_FAILED


def _console(args: argparse.Namespace, env: Mapping[str, str], timing: Timing, clock: Clock, sleep: Sleep,
             err: TextIO) -> int:
    """Relay a node's SOL console through cidd; return 0 when detached or closed, 1 when it failed."""
    from cidcapt import console

    host, port = args.server
    deadline = clock() + args.connect_timeout
    with open_session(host, port, args.role, _token(args, env), deadline=deadline, timing=timing, clock=clock,
                      sleep=sleep, tls=_tls(args, env)) as conn:
        reason = console.run(conn, args.console, err=err)
    return EXIT_FAILED if reason else EXIT_OK


def _capture(args: argparse.Namespace, env: Mapping[str, str], renderer: Renderer, timing: Timing,
             clock: Clock, sleep: Sleep) -> int:
    """Run a capture; print its progress, summary and result; return the exit code."""
    job, image = args.job.strip(), args.image.strip()
    runner: CaptureRunner | None = None
    try:
        nodes, names = _compact(",".join(args.nodes))
        token = _token(args, env)
        host, port = args.server
        request = CaptureRequest(job=job, nodes=nodes, names=names, image=image, timeout=args.timeout,
                                 user=args.user or default_user(env))
        runner = CaptureRunner(request, Endpoint(host, port, args.role, token, _tls(args, env)), renderer,
                               connect_timeout=args.connect_timeout, timing=timing, clock=clock, sleep=sleep)
        outcome = runner.run()
    except CidError as exc:
        code = exit_code(exc)
        if runner is not None and runner.accepted:
            renderer.summary(job, image, "error", runner.nodes)
        renderer.error(exc.message)
        if args.json:
            renderer.json({"type": "result", "job": job, "image": image, "state": "error", "code": exc.code,
                           "message": exc.message, "exit": code})
        return code
    except KeyboardInterrupt:
        renderer.error(f"interrupted; if cidd accepted the capture it goes on: run the same command again to "
                       f"re-attach to job {job}")
        return 130
    code = exit_code(outcome)
    note = "cidd sent no result before the deadline" if outcome.local_deadline else ""
    renderer.summary(outcome.job, image, outcome.state, outcome.nodes, note=note)
    if args.json:
        ready, failed, pending = counts(outcome.nodes, image)
        renderer.json({"type": "result", "job": outcome.job, "image": image, "state": outcome.state,
                       "ready": ready, "failed": failed, "pending": pending, "nodes": outcome.nodes,
                       "local_deadline": outcome.local_deadline, "reattached": outcome.reattached,
                       "exit": code})
    return code


if __name__ == "__main__":
    sys.exit(main())
