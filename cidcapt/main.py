"""cidcapt: parse the arguments (cidcapt/cli.py), run a capture or an admin view, and map the end to an exit
code (cidcapt/exit_codes.py).

``main(argv, stdout=..., stderr=..., env=...)`` is the console script and the entry point for tests;
``exit_codes.exit_code`` is the one place that turns an outcome or an error into the exit-code contract.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from cidcapt import slurm
from cidcapt.capture import CaptureRequest, CaptureRunner, Endpoint
from cidcapt.cli import (
    build_parser,
    check_args,
    choose_transport,
    default_user,
    resolve_when,
    role_token,
    tls_settings,
)
from cidcapt.connection import Clock, Sleep, Timing, open_session, simple_request
from cidcapt.exit_codes import EXIT_BAD_REQUEST, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, exit_code
from cidcapt.progress import ProgressOptions
from cidcapt.render import (
    CAPTURES_HEADERS,
    IMAGES_HEADERS,
    NODE_STATS_HEADERS,
    STATUS_HEADERS,
    Renderer,
    cancel_head,
    cancelled_line,
    captures_rows,
    counts,
    group_stats_headers,
    group_stats_rows,
    images_note,
    images_rows,
    node_stats_rows,
    stats_summary,
    status_rows,
    summary_rows,
)
from cidcommon.client_config import DEFAULT_CONFIG_DIR
from cidcommon.errors import CidError, UnknownNode
from cidcommon.hostlists import collect, expand


def _compact(text: str) -> tuple[str, tuple[str, ...]]:
    """Return (compact hostlist, names) of a hostlist; raises BadHostlist."""
    names = expand(text)
    return collect(names), tuple(names)


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None,
         env: Mapping[str, str] | None = None, timing: Timing | None = None, clock: Clock = time.monotonic,
         sleep: Sleep = time.sleep, now: Clock = time.time, config_dir: Path = DEFAULT_CONFIG_DIR) -> int:
    """Run cidcapt with ``argv`` (default sys.argv[1:]); return the exit code (see EXIT_CODES_HELP).

    ``stdout``/``stderr``/``env`` default to the process's; ``timing``, ``clock``, ``sleep`` and ``now``
    (wall clock, for ages) let tests shrink the waits; ``config_dir`` holds cidd.yaml when $CID_CONFIG is unset.
    Never raises: an unexpected exception is a bug, reported with its traceback on stderr and exit code 70
    (EXIT_BUG).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    env = os.environ if env is None else env
    try:
        return _main(argv, out, err, env, timing, clock, sleep, now, config_dir)
    except BrokenPipeError:  # the reader went away (``cidcapt --captures | head``): nothing more to say
        if stdout is None:  # the process's own stdout: keep Python from failing again when it flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # a bug: say so, with the traceback, and never "unreachable, retry"
        print("".join(traceback.format_exception(exc)).rstrip(), file=err)
        print(f"cidcapt: internal error (a bug in cidcapt, not in cidd or the nodes): {type(exc).__name__}: "
              f"{exc}; retrying will not help; please report it with the traceback above", file=err)
        return exit_code(exc)


def _main(argv: list[str] | None, out: TextIO, err: TextIO, env: Mapping[str, str], timing: Timing | None,
          clock: Clock, sleep: Sleep, now: Clock, config_dir: Path) -> int:
    """The body of ``main``: parse, then run the command asked for; return its exit code."""
    parser = build_parser(env, out, err)
    try:
        args = parser.parse_args(argv)  # $CID_SERVER/$CID_SOCKET are read by choose_transport, not as defaults
        check_args(parser, args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_REQUEST
    renderer_class = slurm.SummaryRecorder if args.slurm and not args.release else Renderer
    renderer = renderer_class(out, err, quiet=args.quiet, json_lines=args.json, progress=ProgressOptions(
        summary_every=args.summary_every, stall_after=args.stall_after, clock=clock, wall=now))
    timing = timing or Timing()
    try:
        choose_transport(args, env, config_dir)  # one socket or one server: never a second address
    except CidError as exc:
        renderer.error(exc.message)
        return exit_code(exc)
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
        if args.stats is not None:
            return _stats(args, env, renderer, timing, clock, sleep, now)
        if args.status is not None or args.captures:
            return _admin_view(args, env, renderer, timing, clock, sleep, now)
        if args.cancel:
            return _cancel(args, env, renderer, timing, clock, sleep)
        if args.images:
            return _images(args, env, renderer, timing, clock, sleep)
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
    token = role_token(args, env)
    host, port = args.server
    reply = simple_request(host, port, args.role, token, message, connect_timeout=args.connect_timeout,
                           timing=timing, clock=clock, sleep=sleep, tls=tls_settings(args, env),
                           origin=args.client.label)
    key = "captures" if args.captures else "nodes"
    items = reply.get(key)
    items = items if isinstance(items, list) else []
    if args.json:
        renderer.json(items)
    elif args.captures:
        renderer.table(CAPTURES_HEADERS, captures_rows(items, now()))
    else:
        renderer.table(STATUS_HEADERS, status_rows(items, now()))
    unknown = reply.get("unknown") if not args.captures else None
    if unknown:
        raise UnknownNode(f"unknown node(s) {unknown}: not in cidd's inventory and never connected; check the "
                          "hostlist or the 'nodes' section of cidd.yaml")
    return EXIT_OK


def _cancel(args: argparse.Namespace, env: Mapping[str, str], renderer: Renderer, timing: Timing,
            clock: Clock, sleep: Sleep) -> int:
    """Run --cancel -j JOB: ask cidd to cancel the job's capture; print what becomes of each node; return 0.

    Raises CidError subclasses (mapped by the caller: a job with no running capture 2, not allowed 5).
    """
    host, port = args.server
    message = {"type": "cancel", "job": args.job.strip(), "user": args.user or default_user(env)}
    reply = simple_request(host, port, args.role, role_token(args, env), message,
                           connect_timeout=args.connect_timeout, timing=timing, clock=clock, sleep=sleep,
                           tls=tls_settings(args, env), origin=args.client.label)
    capture = reply.get("capture") if isinstance(reply.get("capture"), dict) else {}
    if args.json:
        renderer.json({"capture": capture, "already": reply.get("already") is True})
        return EXIT_OK
    renderer.say(cancel_head(capture, reply.get("already") is True), always=True)
    nodes = capture.get("nodes") if isinstance(capture.get("nodes"), dict) else {}
    renderer.table(["NODE", "STATE", "IMAGE", "WHAT BECOMES OF IT"], summary_rows(nodes, str(capture.get("image"))))
    return EXIT_OK


def _images(args: argparse.Namespace, env: Mapping[str, str], renderer: Renderer, timing: Timing,
            clock: Clock, sleep: Sleep) -> int:
    """Run --images: list the catalog's images this client may see (table or JSON); return 0.

    Raises CidError subclasses (mapped by the caller).
    """
    host, port = args.server
    message = {"type": "images", "user": args.user or default_user(env)}
    reply = simple_request(host, port, args.role, role_token(args, env), message,
                           connect_timeout=args.connect_timeout, timing=timing, clock=clock, sleep=sleep,
                           tls=tls_settings(args, env), origin=args.client.label)
    images = reply.get("images") if isinstance(reply.get("images"), list) else []
    if args.json:
        renderer.json({key: reply[key] for key in ("images", "hidden", "unavailable") if key in reply})
        return EXIT_OK
    renderer.table(IMAGES_HEADERS, images_rows(images))
    for line in images_note(reply.get("hidden"), reply.get("unavailable")):
        renderer.say(line, always=True)
    return EXIT_OK


def _stats(args: argparse.Namespace, env: Mapping[str, str], renderer: Renderer, timing: Timing,
           clock: Clock, sleep: Sleep, now: Clock) -> int:
    """Run --stats: ask cidd for the statistics and print them as tables (or JSON); return 0.

    Raises CidError subclasses (mapped by the caller).
    """
    hostlist = args.stats or (" ".join(args.nodes) if args.nodes else "")
    message: dict[str, Any] = {"type": "stats"}
    if hostlist:
        message["nodes"] = _compact(hostlist)[0]
    for key, value in (("since", resolve_when(args.since, now())), ("until", resolve_when(args.until, now())),
                       ("image", args.image), ("job", args.job), ("worst", args.worst)):
        if value is not None:
            message[key] = value
    host, port = args.server
    slow = replace(timing, request_timeout=max(timing.request_timeout, 120.0))  # a year of a large cluster
    reply = simple_request(host, port, args.role, role_token(args, env), message, connect_timeout=args.connect_timeout,
                           timing=slow, clock=clock, sleep=sleep, tls=tls_settings(args, env),
                           origin=args.client.label)
    report = reply.get("stats") if isinstance(reply.get("stats"), dict) else {}
    if args.json:
        renderer.json(report)
        return EXIT_OK
    renderer.stdout.write(f"statistics: {stats_summary(report)}\n")
    nodes = report.get("nodes") if isinstance(report.get("nodes"), list) else []
    title = f"NODES (the {args.worst} with the highest failure rate)" if args.worst else "NODES"
    renderer.stdout.write(f"\n{title}; phases as median/95th percentile\n")
    renderer.table(NODE_STATS_HEADERS, node_stats_rows(nodes, now()))
    for key, title in (("images", "IMAGES"), ("groups", "GROUPS")):
        items = report.get(key) if isinstance(report.get(key), list) else []
        renderer.stdout.write(f"\n{title}\n")
        renderer.table(group_stats_headers(key[:-1]), group_stats_rows(items, key[:-1]))
    return EXIT_OK


def _reload(args: argparse.Namespace, env: Mapping[str, str], renderer: Renderer, timing: Timing,
            clock: Clock, sleep: Sleep) -> int:
    """Ask cidd to reload its catalog; return 0. Raises CidError subclasses (mapped by the caller)."""
    host, port = args.server
    reply = simple_request(host, port, args.role, role_token(args, env), {"type": "reload"},
                           connect_timeout=args.connect_timeout, timing=timing, clock=clock, sleep=sleep,
                           tls=tls_settings(args, env), origin=args.client.label)
    if args.json:
        renderer.json({"images": reply.get("images"), "catalog": reply.get("catalog")})
    else:
        renderer.say(f"catalog {reply.get('catalog')} reloaded: {reply.get('images')} images", always=True)
    return EXIT_OK


def _slurm_prolog(args: argparse.Namespace, env: Mapping[str, str], renderer: slurm.SummaryRecorder,
                  timing: Timing, clock: Clock, sleep: Sleep) -> int:
    """--slurm: run the capture a PrologSlurmctld needs, then do what Slurm needs after a bad end
    (slurm.after_capture: drain failed, pending or unknown nodes, or end a job that can never run).

    Returns the exit code of the capture (0 also when the job asks for no cid image). Raises SlurmUsageError
    when the environment names no job; every other CidError is reported here, as the prolog must act on it.
    """
    job = slurm.SlurmJob.from_env(env)
    host, port = args.server

    def ask(message: dict[str, Any]) -> dict[str, Any]:
        return simple_request(host, port, args.role, role_token(args, env), message,
                              connect_timeout=args.connect_timeout, timing=timing, clock=clock, sleep=sleep,
                              tls=tls_settings(args, env), origin=args.client.label)

    image = (args.image or "").strip()
    try:
        image = image or slurm.image_from_features(job, ask({"type": "features"})) or ""
        if not image:
            asked = f"constraint {job.constraints!r} names no cid feature" if job.constraints else "no constraint"
            renderer.say(f"job {job.job_id}: {asked}, and cidd has no default_image: nodes {job.nodes} left as "
                         "they are", always=True)
            return EXIT_OK
        args.job, args.nodes, args.image = job.job_id, [job.nodes], image
        args.user = args.user or job.user
        code = _capture(args, env, renderer, timing, clock, sleep)
    except CidError as exc:
        renderer.error(exc.message)
        code = exit_code(exc)
    slurm.after_capture(job, image, renderer, env, ask)
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
        token = role_token(args, env)

        def ask(message: dict[str, Any]) -> dict[str, Any]:
            return simple_request(host, port, args.role, token, message, timing=quick, clock=clock, sleep=sleep,
                                  connect_timeout=min(args.connect_timeout, slurm.RELEASE_CONNECT_S),
                                  tls=tls_settings(args, env), origin=args.client.label)

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
    slow = replace(timing, request_timeout=max(timing.request_timeout, 120.0))  # BMCs are slow
    reply = simple_request(host, port, args.role, role_token(args, env),
                           {"type": "power", "action": action, "nodes": _compact(hostlist)[0]},
                           connect_timeout=args.connect_timeout, timing=slow, clock=clock, sleep=sleep,
                           tls=tls_settings(args, env), origin=args.client.label)
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
    with open_session(host, port, args.role, role_token(args, env), deadline=deadline, timing=timing, clock=clock,
                      sleep=sleep, tls=tls_settings(args, env), origin=args.client.label) as conn:
        reason = console.run(conn, args.console, err=err)
    return EXIT_FAILED if reason else EXIT_OK


def _capture(args: argparse.Namespace, env: Mapping[str, str], renderer: Renderer, timing: Timing,
             clock: Clock, sleep: Sleep) -> int:
    """Run a capture; print its progress, summary and result; return the exit code."""
    job, image = args.job.strip(), args.image.strip()
    runner: CaptureRunner | None = None
    try:
        nodes, names = _compact(",".join(args.nodes))
        token = role_token(args, env)
        host, port = args.server
        request = CaptureRequest(job=job, nodes=nodes, names=names, image=image, timeout=args.timeout,
                                 user=args.user or default_user(env))
        endpoint = Endpoint(host, port, args.role, token, tls_settings(args, env), origin=args.client.label)
        runner = CaptureRunner(request, endpoint, renderer,
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
        return EXIT_INTERRUPTED
    finally:
        renderer.close()  # the terminal view gives the terminal back, even when cidcapt has a bug
    code = exit_code(outcome)
    note = "cidd sent no result before the deadline" if outcome.local_deadline else ""
    if outcome.state == "cancelled":
        renderer.say(cancelled_line(outcome.job, outcome.cancelled_by), always=True)
    renderer.summary(outcome.job, image, outcome.state, outcome.nodes, note=note)
    if args.json:
        ready, failed, pending = counts(outcome.nodes, image)
        renderer.json({"type": "result", "job": outcome.job, "image": image, "state": outcome.state,
                       "ready": ready, "failed": failed, "pending": pending, "nodes": outcome.nodes,
                       "local_deadline": outcome.local_deadline, "reattached": outcome.reattached,
                       "cancelled_by": outcome.cancelled_by, "exit": code})
    return code


if __name__ == "__main__":
    sys.exit(main())
