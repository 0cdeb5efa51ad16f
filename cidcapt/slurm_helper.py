"""cid-slurm-helper: the helper program of Slurm's ``node_features/helpers`` plugin, and a RebootProgram.

Slurm (slurmd, on the node) calls the program named by ``Helper=`` in helpers.conf:

- with no argument (``get_state``): print the node's active features, one per line. We ask cidd which image
  the node runs and print every feature of cidd's ``scheduler.features`` that maps to it;
- with one argument, a feature (``set_state``), before it reboots the node for a job that needs that feature:
  we ask cidd to switch the node to the feature's image (a capture ``helper.<node>.<time>``, not waited for);
  cid then reboots the node itself, into the installer and into the image.

With ``--reboot`` it is a RebootProgram that reboots the node only when cid is not already doing so.
Exit codes are cidcapt's (cidcapt.exit_codes.exit_code); Slurm only looks at zero or not.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from cidcapt.connection import Timing, parse_server, simple_request
from cidcapt.exit_codes import EXIT_BAD_REQUEST, EXIT_OK, exit_code
from cidcommon.errors import BadRequest, CidError, UnknownNode
from cidcommon.paths import read_token, token_path
from cidcommon.tlsfiles import client_tls, state_dir_from
from cidcommon.wire import DEFAULT_PORT

#: A helper runs under slurmd's ExecTime limit (10 s by default): keep every wait short.
QUICK = Timing(request_timeout=4.0, attempt_timeout=2.0, backoff_first=0.2, backoff_max=1.0)
CONNECT_TIMEOUT = 4.0
SWITCHING = frozenset({"to_installer", "installing", "to_image"})


class UnknownFeature(BadRequest):
    """Slurm asked for a feature that is not in cidd's ``scheduler.features``."""


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """Return the argument parser; defaults come from ``env`` (CID_SERVER, CID_ROLE, CID_NODE, ...)."""
    parser = argparse.ArgumentParser(
        prog="cid-slurm-helper", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Slurm node_features/helpers helper for cid (see docs/slurm.md).\n"
                    "  cid-slurm-helper            print the node's active cid features (get_state)\n"
                    "  cid-slurm-helper FEATURE    switch the node to FEATURE's image at its reboot (set_state)\n"
                    "  cid-slurm-helper --reboot   RebootProgram: reboot unless cid is switching the node",
        epilog="exit codes (cidcapt's): 0 done, 2 bad request (unknown feature or node), 4 cidd unreachable, "
               "authentication failed, or the head node's user database did not answer, 5 refused (another job "
               "holds the node); --reboot: the reboot command's code")
    parser.add_argument("feature", nargs="*", help="the feature to activate (set_state); ignored with --reboot")
    parser.add_argument("--reboot", action="store_true",
                        help="reboot the node with --reboot-command unless cid is switching it (cid reboots it then)")
    parser.add_argument("--node", default=env.get("CID_NODE") or socket.gethostname().split(".")[0],
                        help="node name as cidd knows it (default $CID_NODE, else the short host name)")
    parser.add_argument("--server", default=env.get("CID_SERVER") or f"127.0.0.1:{DEFAULT_PORT}",
                        help="cidd's address (default $CID_SERVER or %(default)s)")
    parser.add_argument("--role", default=env.get("CID_ROLE") or "scheduler",
                        help="role of the token: scheduler (default $CID_ROLE or scheduler) or admin")
    parser.add_argument("--token-file", type=Path, default=env.get("CID_TOKEN_FILE") or None,
                        help="the role's token file (default $CID_TOKEN_FILE or <state_dir>/secrets/ROLE.token)")
    parser.add_argument("--ca", type=Path, default=None,
                        help="cluster CA certificate that signed cidd's (default $CID_CA_FILE or "
                        "<state_dir>/tls/ca.pem); $CID_PLAIN_TCP=1 talks without TLS to a cidd in tls mode plain")
    parser.add_argument("--timeout", type=float, default=3600.0, help="deadline of the switch in seconds")
    parser.add_argument("--reboot-command", default=env.get("CID_REBOOT_COMMAND") or "/sbin/reboot",
                        help="what --reboot runs (default $CID_REBOOT_COMMAND or %(default)s)")
    return parser


class Helper:
    """One run of the helper: talks to cidd about ``node``."""

    def __init__(self, args: argparse.Namespace, env: Mapping[str, str], out: TextIO, err: TextIO) -> None:
        self.args = args
        self.env = env
        self.out = out
        self.err = err
        self.node = args.node

    def say(self, text: str) -> None:
        """Write a timestamped line to stderr (slurmd drops it; rc/slurm/cid-slurm-helper.sh appends it to a log)."""
        self.err.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} cid-slurm-helper: {self.node}: {text}\n")

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Return cidd's reply to ``message``; raises CidError subclasses (unreachable, auth, ...)."""
        if self.args.token_file is not None:
            path = Path(self.args.token_file)
        else:
            state = state_dir_from(self.env)
            path = token_path(state, self.args.role)
        try:
            host, port = parse_server(self.args.server)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        tls = client_tls(self.args.ca, None, None, plain=False, env=self.env)
        return simple_request(host, port, self.args.role, read_token(path), message,
                              connect_timeout=CONNECT_TIMEOUT, timing=QUICK, tls=tls)

    def node_row(self) -> dict[str, Any]:
        """Return cidd's status row of the node; raises UnknownNode when cidd does not know it."""
        rows = self.request({"type": "status", "nodes": self.node}).get("nodes") or []
        for row in rows:
            if isinstance(row, dict) and row.get("node") == self.node:
                return row
        raise UnknownNode(f"cidd does not know node {self.node!r}; pass --node or set CID_NODE")

    def features(self) -> dict[str, str]:
        """Return cidd's feature -> image map."""
        features = self.request({"type": "features"}).get("features")
        return {str(k): str(v) for k, v in features.items()} if isinstance(features, dict) else {}

    def report(self) -> int:
        """get_state: print the features whose image the node runs; return 0."""
        features = self.features()
        image = self.node_row().get("image")
        for feature in sorted(f for f, img in features.items() if img == image):
            self.out.write(feature + "\n")
        return EXIT_OK

    def activate(self, feature: str) -> int:
        """set_state: start switching the node to ``feature``'s image (not waited for); return 0."""
        features = self.features()
        if feature not in features:
            raise UnknownFeature(f"feature {feature!r} is not in cidd's scheduler.features "
                                 f"({', '.join(sorted(features)) or 'empty'}); check helpers.conf")
        image = features[feature]
        row = self.node_row()
        if row.get("state") == "ready" and row.get("image") == image:
            self.say(f"already runs {image} ({feature})")
            return EXIT_OK
        job = f"helper.{self.node}.{int(time.time())}"
        reply = self.request({"type": "capture", "job": job, "nodes": self.node, "image": image,
                              "timeout": int(self.args.timeout), "user": "slurm", "watch": False})
        state = (reply.get("capture") or {}).get("state")
        self.say(f"switching to {image} ({feature}) as job {job} (capture {state}); cid reboots the node")
        return EXIT_OK

    def reboot(self) -> int:
        """RebootProgram: reboot unless cid is switching the node; return the reboot command's exit code or 0."""
        try:
            row = self.node_row()
        except CidError as exc:
            self.say(f"cannot ask cidd ({exc.message}); rebooting anyway")
            row = {}
        if row.get("state") in SWITCHING:
            self.say(f"cid is switching the node to {row.get('target')} (job {row.get('job')}) and reboots it; "
                     "not rebooting a second time")
            return EXIT_OK
        self.say(f"rebooting: {self.args.reboot_command}")
        self.err.flush()
        return subprocess.run(shlex.split(self.args.reboot_command), check=False).returncode


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None,
         env: Mapping[str, str] | None = None) -> int:
    """Run the helper with ``argv``; return its exit code (cidcapt's codes). Never raises for expected failures."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    env = os.environ if env is None else env
    parser = build_parser(env)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_REQUEST
    if len(args.feature) > 1 and not args.reboot:
        err.write(f"cid-slurm-helper: one feature at a time, not {' '.join(args.feature)}\n")
        return EXIT_BAD_REQUEST
    helper = Helper(args, env, out, err)
    try:
        if args.reboot:  # a RebootProgram may be given the features being activated: they change nothing here
            return helper.reboot()
        return helper.activate(args.feature[0]) if args.feature else helper.report()
    except CidError as exc:
        helper.say(f"error: {exc.message}")
        return exit_code(exc)
    except OSError as exc:
        helper.say(f"error: {exc}")
        return EXIT_BAD_REQUEST


if __name__ == "__main__":
    sys.exit(main())
