"""cid-slurm-helper: the helper program of Slurm's ``node_features/helpers`` plugin, and a RebootProgram.

What slurmd passes it (read in Slurm's sources: slurmd's ``_rpc_reboot`` and the helpers plugin, 22.05 to 25.11):

- ``HELPER`` (no argument): the plugin's get_state, at every slurmd start and ``scontrol reconfigure``, once per
  ``Feature=`` line. **Slurm 22.05 also runs RebootProgram with no argument after a feature change** (it drops
  RebootProgram's own arguments and clears the feature list), and 23.02/23.11 do so when the change failed.
  So without arguments the helper only prints the node's active features and never reboots: the features of
  the image cidd says the node runs, or ``cid_other`` when the node runs no image of ``scheduler.features`` or
  cid cannot say which (cidd unreachable, node switching): printing nothing would make slurmctld keep the
  feature it set when it asked for the reboot, however wrong;
- ``HELPER FEATURE`` (set_state), before slurmd reboots the node for a job: cid switches the node to the
  feature's image (a capture ``helper.<node>.<time>`` with CID_TIMEOUT as its deadline, not waited for) and
  reboots it itself. Slurm 23.02 and later then run RebootProgram as ``HELPER 'FEATURE[,FEATURE...]'``: the
  same request again, which changes nothing (the node is already switching). When the node already runs the
  image, the helper reboots it (CID_REBOOT_COMMAND), because slurmd waits for a reboot before the job starts;
- ``HELPER --reboot``: only ``scontrol reboot`` runs RebootProgram with its own arguments. The node is rebooted
  unless cid is switching it (cid reboots it then); when cidd cannot be reached it is rebooted all the same.

Exit codes are cidcapt's (cidcapt.exit_codes.exit_code); Slurm only looks at zero or not (and, from 24.05, a
failed set_state marks the node DOWN with "Failed to set node feature(s)").
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from cidcapt.connection import Timing, simple_request
from cidcapt.exit_codes import EXIT_BAD_REQUEST, EXIT_OK, exit_code
from cidcommon.client_config import DEFAULT_CONFIG_DIR, ClientConfig, ClientOptions, resolve
from cidcommon.errors import BadRequest, CidError, UnknownNode
from cidcommon.paths import read_token
from cidcommon.tlsfiles import ClientTls

#: A helper runs under slurmd's ExecTime limit (10 s by default): keep every wait short.
QUICK = Timing(request_timeout=4.0, attempt_timeout=2.0, backoff_first=0.2, backoff_max=1.0)
CONNECT_TIMEOUT = 4.0
SWITCHING = frozenset({"to_installer", "installing", "to_image"})
#: The feature reported when the node runs no image that a feature names, or cid cannot say which. Declare it
#: in helpers.conf (rc/slurm/helpers.conf.example); undeclared, slurmd drops it and keeps stale features.
OTHER_FEATURE = "cid_other"
#: States in which a booting node's agent may not have said hello yet: get_state waits this long for it.
SETTLE_STATES = frozenset({"offline", "to_image"})
SETTLE_S = 5.0
SETTLE_POLL_S = 0.5
#: The capture deadline when neither --timeout nor CID_TIMEOUT is given (the prolog's default too).
DEFAULT_TIMEOUT = 1800.0


class UnknownFeature(BadRequest):
    """Slurm asked for a feature that is not in cidd's ``scheduler.features``."""


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """Return the argument parser; defaults come from ``env`` (CID_NODE, CID_TIMEOUT, ...); cidd's address, the
    role, the token and the CA are resolved later (cidcommon.client_config). Abbreviated options are refused."""
    parser = argparse.ArgumentParser(
        prog="cid-slurm-helper", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description="Slurm node_features/helpers helper for cid (see docs/slurm.md).\n"
                    "  cid-slurm-helper            print the node's active cid features, or cid_other (get_state;\n"
                    "                              also Slurm 22.05's RebootProgram call after a feature change:\n"
                    "                              never reboots)\n"
                    "  cid-slurm-helper FEATURE    switch the node to FEATURE's image, cid reboots it (set_state;\n"
                    "                              FEATURE may be a comma list, as RebootProgram gets it from 23.02)\n"
                    "  cid-slurm-helper --reboot   RebootProgram for 'scontrol reboot': reboot unless cid is\n"
                    "                              switching the node",
        epilog="exit codes (cidcapt's): 0 done, 2 bad request (unknown feature or node, a bad configuration file), 4 "
               "cidd unreachable, authentication failed, or the head node's user database did not answer, 5 refused "
               "(another job holds the node); --reboot: the reboot command's code. cidd is found as cidcapt finds "
               "it: --server, $CID_SOCKET, $CID_SERVER, then $CID_CONFIG or /etc/cid/cidd.yaml (client.server, "
               "...), one address only (docs/configuration.md, 'How clients find cidd')")
    parser.add_argument("feature", nargs="*",
                        help="the feature to activate (set_state), or a comma list of features (RebootProgram from "
                        "Slurm 23.02); features that are not cid's are ignored; ignored with --reboot")
    parser.add_argument("--reboot", action="store_true",
                        help="reboot the node with --reboot-command unless cid is switching it (cid reboots it then)")
    parser.add_argument("--node", default=env.get("CID_NODE") or socket.gethostname().split(".")[0],
                        help="node name as cidd knows it (default $CID_NODE, else the short host name)")
    parser.add_argument("--server", default=None,
                        help="cidd's address HOST:PORT (default $CID_SERVER, else the configuration file's "
                        "client.server; see below)")
    parser.add_argument("--role", default=None,
                        help="role of the token: scheduler or admin (default $CID_ROLE, else the configuration "
                        "file's client.role, else scheduler)")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="the role's token file (default $CID_TOKEN_FILE, else client.token_file, else "
                        "<state_dir>/secrets/ROLE.token)")
    parser.add_argument("--ca", type=Path, default=None,
                        help="cluster CA certificate that signed cidd's (default $CID_CA_FILE, else client.ca or "
                        "tls.ca of the configuration file, else <state_dir>/tls/ca.pem); $CID_PLAIN_TCP=1 talks "
                        "without TLS to a cidd in tls mode plain")
    parser.add_argument("--timeout", type=float, default=env.get("CID_TIMEOUT") or DEFAULT_TIMEOUT,
                        help="deadline of the switch in seconds (default $CID_TIMEOUT or %(default)s); Slurm's "
                        "ResumeTimeout must be longer")
    parser.add_argument("--reboot-command", default=env.get("CID_REBOOT_COMMAND") or "/sbin/reboot",
                        help="how the helper reboots the node, for --reboot and for a feature the node already "
                        "runs (default $CID_REBOOT_COMMAND or %(default)s)")
    return parser


class Helper:
    """One run of the helper: talks to cidd about ``node``."""

    def __init__(self, args: argparse.Namespace, env: Mapping[str, str], out: TextIO, err: TextIO, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 config_dir: Path = DEFAULT_CONFIG_DIR) -> None:
        self.args = args
        self.config_dir = config_dir
        self._client: ClientConfig | None = None
        self.env = env
        self.out = out
        self.err = err
        self.node = args.node
        self.clock = clock
        self.sleep = sleep

    def say(self, text: str) -> None:
        """Write a timestamped line to stderr (slurmd drops it; rc/slurm/cid-slurm-helper.sh appends it to a log)."""
        self.err.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} cid-slurm-helper: {self.node}: {text}\n")
        self.err.flush()

    def client(self) -> ClientConfig:
        """Return how to reach cidd (cidcommon.client_config), resolved once; raises ClientConfigError."""
        if self._client is None:
            options = ClientOptions(server=self.args.server, token_file=self.args.token_file, ca=self.args.ca,
                                    role=self.args.role)
            self._client = resolve(options, self.env, config_dir=self.config_dir, default_role="scheduler")
        return self._client

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Return cidd's reply to ``message``; raises CidError subclasses (a bad configuration, unreachable,
        auth, ...). Only the one address of ``client`` is tried."""
        client = self.client()
        token = "" if client.token_file is None else read_token(client.token_file)
        tls = None if client.ca is None else ClientTls(client.ca, client.cert, client.key)
        return simple_request(*client.host_port, client.role, token, message, connect_timeout=CONNECT_TIMEOUT,
                              timing=QUICK, tls=tls, origin=client.label)

    def node_row(self) -> dict[str, Any]:
        """Return cidd's status row of the node; raises UnknownNode when cidd does not know it."""
        rows = self.request({"type": "status", "nodes": self.node}).get("nodes") or []
        for row in rows:
            if isinstance(row, dict) and row.get("node") == self.node:
                return row
        raise UnknownNode(f"cidd does not know node {self.node!r}; pass --node or set CID_NODE")

    def settled_row(self) -> dict[str, Any]:
        """Return the node's status row, after waiting up to SETTLE_S for a booting node's agent to say hello.

        slurmd and cidkid start together when a node boots: cidd may still say ``offline`` or ``to_image``
        when slurmd asks for the features.
        """
        end = self.clock() + SETTLE_S
        row = self.node_row()
        while row.get("state") in SETTLE_STATES and self.clock() < end:
            self.sleep(SETTLE_POLL_S)
            row = self.node_row()
        return row

    def features(self) -> dict[str, str]:
        """Return cidd's feature -> image map."""
        features = self.request({"type": "features"}).get("features")
        return {str(k): str(v) for k, v in features.items()} if isinstance(features, dict) else {}

    def report(self) -> int:
        """get_state: print the features of the image the node runs, else OTHER_FEATURE; return 0.

        Never fails and never reboots: with Slurm 22.05 this is also the RebootProgram call after a feature
        change, and a helper that exits non-zero or prints nothing leaves slurmctld with stale features.
        """
        active: list[str] = []
        try:
            features = self.features()
            row = self.settled_row()
        except CidError as exc:
            why = f"cannot tell which image the node runs ({exc.message})"
        else:
            state, image = row.get("state"), row.get("image")
            if state != "ready":
                why = f"the node is {state}" + (f" (to {row['target']})" if row.get("target") else "")
            else:
                active = sorted(f for f, img in features.items() if img == image)
                why = f"runs {image}, which no feature of cidd's scheduler.features names"
        if active:
            self.say(f"runs {image}: active {', '.join(active)}")
        else:
            self.say(f"{why}: reporting {OTHER_FEATURE}, so that Slurm keeps no stale image feature")
        for feature in active or [OTHER_FEATURE]:
            self.out.write(feature + "\n")
        self.out.flush()
        return EXIT_OK

    def activate(self, words: list[str]) -> int:
        """set_state: have cid switch the node to the image of the cid feature among ``words``; return 0.

        ``words`` may hold several features (comma lists included): the others are not cid's and are left to
        their own helpers. Raises UnknownFeature or BadRequest (no cid feature, two images, OTHER_FEATURE).
        """
        asked = [w for word in words for w in word.split(",") if w]
        features = self.features()
        mine = sorted({w for w in asked if w in features})
        if not mine:
            if OTHER_FEATURE in asked:
                raise BadRequest(f"{OTHER_FEATURE} means 'no image cid can name' and cannot be activated; ask for "
                                 f"one of {', '.join(sorted(features)) or '(none configured)'}")
            raise UnknownFeature(f"feature {','.join(asked)!r} is not in cidd's scheduler.features "
                                 f"({', '.join(sorted(features)) or 'empty'}); check helpers.conf")
        images = sorted({features[w] for w in mine})
        if len(images) > 1:
            raise BadRequest(f"features {', '.join(mine)} name {len(images)} images ({', '.join(images)}); a node "
                             "runs one image")
        if others := [w for w in asked if w not in features]:
            self.say(f"ignoring {', '.join(others)}: not cid features")
        image, feature = images[0], ",".join(mine)
        row = self.node_row()
        if row.get("state") == "ready" and row.get("image") == image:
            self.say(f"already runs {image} ({feature}); slurmd waits for a reboot before the job starts: "
                     "rebooting into it")
            return self.reboot_now()
        if row.get("state") in SWITCHING and row.get("target") == image:
            self.say(f"already switching to {image} ({feature}) as job {row.get('job')}; cid reboots the node")
            return EXIT_OK
        job = f"helper.{self.node}.{int(time.time())}"
        reply = self.request({"type": "capture", "job": job, "nodes": self.node, "image": image,
                              "timeout": int(self.args.timeout), "user": "slurm", "watch": False})
        state = (reply.get("capture") or {}).get("state")
        self.say(f"switching to {image} ({feature}) as job {job} (capture {state}, deadline "
                 f"{int(self.args.timeout)} s); cid reboots the node")
        return EXIT_OK

    def reboot(self) -> int:
        """RebootProgram of ``scontrol reboot``: reboot unless cid is switching the node; return 0 or the
        reboot command's exit code. When cidd cannot be reached the node is rebooted: an admin asked for it."""
        try:
            row = self.node_row()
        except CidError as exc:
            self.say(f"cannot ask cidd ({exc.message}); rebooting anyway")
            row = {}
        if row.get("state") in SWITCHING:
            self.say(f"cid is switching the node to {row.get('target')} (job {row.get('job')}) and reboots it; "
                     "not rebooting a second time")
            return EXIT_OK
        return self.reboot_now()

    def reboot_now(self) -> int:
        """Run the reboot command; return its exit code."""
        self.say(f"rebooting: {self.args.reboot_command}")
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
    helper = Helper(args, env, out, err)
    try:
        if args.reboot:  # only `scontrol reboot` passes RebootProgram's own arguments; extra words change nothing
            return helper.reboot()
        return helper.activate(args.feature) if args.feature else helper.report()
    except CidError as exc:
        helper.say(f"error: {exc.message}")
        return exit_code(exc)
    except OSError as exc:
        helper.say(f"error: {exc}")
        return EXIT_BAD_REQUEST


if __name__ == "__main__":
    sys.exit(main())
