"""The ``cid-simfleet`` command: a whole simulated fleet of agents in one process (tests, benchmarks, demo).

Every node has a fake disk under --sim-dir, fake reboots and installs, optionally a simulated IPMI BMC, and a
real session with cidd. Exit codes as cidkid's: 0 stopped by SIGTERM/SIGINT, 2 bad command line, 4 token, key
or CA file missing or unsafe, 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cidcommon.client_config import ClientConfigError, agent_server
from cidcommon.errors import BadHostlist, TokenFileError
from cidcommon.hostlists import expand
from cidcommon.logs import configure
from cidcommon.paths import check_private, default_state_dir, read_token, token_path
from cidcommon.tlsfiles import TlsError
from cidkid.main import EXIT_AUTH, EXIT_USAGE, add_session_options, seconds_arg, serve, tls_files
from cidkid.service import client_endpoint, parse_server, tls_options
from cidsim.fleet import SimConfig, SimFleet

DESCRIPTION = """\
A simulated cid fleet in one process, for tests, benchmarks and the demo: one agent session per name of
HOSTLIST, each node with a fake disk under --sim-dir (its image marker at <sim dir>/<node>/etc/cid-image),
fake reboots and installs that take the times given, and, with --bmc-base-port, a simulated IPMI BMC.
The token file holds cidd's agent master secret; every simulated node derives its own token from it.
"""


def _rate(text: str) -> float:
    """Return ``text`` as a probability in [0, 1] (argparse type)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of cid-simfleet."""
    p = argparse.ArgumentParser(prog="cid-simfleet", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_session_options(p)
    sim = p.add_argument_group("simulated fleet")
    sim.add_argument("hostlist", metavar="HOSTLIST", help="the simulated nodes, e.g. 'sim[0001-2000]'")
    sim.add_argument("--sim-dir", metavar="DIR", type=Path,
                     help="directory holding the fake disks, one subdirectory per node (default: <state dir>/sim)")
    sim.add_argument("--reboot-delay", metavar="S", type=seconds_arg, default=5.0,
                     help="seconds a simulated reboot keeps a node away (default: %(default)g)")
    sim.add_argument("--install-time", metavar="S", type=seconds_arg, default=10.0,
                     help="seconds a simulated install takes (default: %(default)g)")
    sim.add_argument("--hang-reboot-rate", metavar="P", type=_rate, default=0.0,
                     help="probability that a reboot never comes back (default: %(default)g)")
    sim.add_argument("--hang-reboot", metavar="HOSTLIST", help="nodes whose reboots never come back")
    sim.add_argument("--fail-install-rate", metavar="P", type=_rate, default=0.0,
                     help="probability that an install fails with 'simulated install failure' (default: %(default)g)")
    sim.add_argument("--fail-install", metavar="HOSTLIST", help="nodes whose installs always fail")
    sim.add_argument("--initial-image", metavar="IMAGE",
                     help="image marker written on every fake disk that has none yet, so the fleet starts in it")
    sim.add_argument("--bmc-base-port", metavar="PORT", type=int,
                     help="give every simulated node a real IPMI BMC on 127.0.0.1, on ports PORT, PORT+1, ... "
                     "in name order (pyghmi's BMC server; needs --bmc-credentials)")
    sim.add_argument("--bmc-credentials", metavar="FILE", type=Path,
                     help="file holding 'user:password' for the simulated BMCs (mode 0600)")
    sim.add_argument("--bmc-dead", metavar="HOSTLIST", help="nodes whose simulated BMC never answers")
    sim.add_argument("--bmc-slow", metavar="HOSTLIST",
                     help="nodes whose simulated BMC handles every IPMI packet late (logins too)")
    sim.add_argument("--bmc-slow-delay", metavar="S", type=seconds_arg, default=3.0,
                     help="how late a --bmc-slow BMC handles each packet (default %(default)g s; pyghmi retransmits "
                     "a packet unanswered for 0.5-1 s, so a delay above that also brings repeated requests)")
    sim.add_argument("--redfish-hw-port", metavar="PORT", type=int,
                     help="listen on 127.0.0.1:PORT for sushy-emulator's notifications (python -m "
                     "cidsim.redfish_emulator --notify): its fake systems then power the nodes off and on")
    sim.add_argument("--redfish-nodes", metavar="HOSTLIST",
                     help="the nodes whose power the Redfish notifications drive (default: every node)")
    sim.add_argument("--seed", metavar="N", type=int, help="seed of the injected failures and backoff jitter")
    sim.add_argument("--cert-dir", metavar="DIR", type=Path,
                     help="mutual TLS for the fleet: every node uses DIR/NODE.pem and DIR/NODE.key "
                     "('cidd issue-cert' writes them into <state dir>/secrets/agents)")
    return p


def _names(text: str | None) -> frozenset[str]:
    """Return the node names of an optional hostlist (raises BadHostlist)."""
    return frozenset(expand(text)) if text else frozenset()


def build_fleet(args: argparse.Namespace, reactor: Any, token: str) -> SimFleet:
    """Return the SimFleet the command line asks for.

    Raises ValueError (bad address), BadHostlist, TlsError and TokenFileError (TLS files).
    """
    host, port = parse_server(args.server)
    files = tls_files(args, own_cert=False)
    tls = None if files is None else tls_options(host, *files)
    config = SimConfig(
        reboot_delay=args.reboot_delay, install_time=args.install_time,
        hang_reboot_nodes=_names(args.hang_reboot), hang_reboot_rate=args.hang_reboot_rate,
        fail_install_nodes=_names(args.fail_install), fail_install_rate=args.fail_install_rate,
        initial_image=args.initial_image, seed=args.seed, request_timeout=args.request_timeout)
    sim_dir = args.sim_dir or default_state_dir() / "sim"
    endpoint_for = None
    if files is not None and args.cert_dir is not None:
        cert_dir, ca = args.cert_dir, files[0]

        def endpoint_for(name: str) -> Any:
            return client_endpoint(reactor, host, port,
                                   tls=tls_options(host, ca, cert_dir / f"{name}.pem", cert_dir / f"{name}.key"))
    return SimFleet(args.hostlist, host, port, token, sim_dir, reactor, config=config, master=True,
                    endpoint=client_endpoint(reactor, host, port, tls=tls), endpoint_for=endpoint_for)


def start_bmcs(args: argparse.Namespace, fleet: Any, reactor: Any) -> None:
    """Start one simulated IPMI BMC per fleet node (ports from --bmc-base-port); stop them at shutdown.

    Raises TokenFileError for a missing or unsafe credentials file, ValueError for one without 'user:password'.
    """
    from cidsim.bmc import SimBmcs

    if args.bmc_credentials is None:
        raise ValueError("--bmc-base-port needs --bmc-credentials FILE ('user:password', mode 0600)")
    check_private(args.bmc_credentials)
    user, sep, password = args.bmc_credentials.read_text(encoding="utf-8").strip().partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{args.bmc_credentials}: expected one line 'user:password'")
    bmcs = SimBmcs(fleet.nodes, args.bmc_base_port, user, password, reactor=reactor)
    bmcs.start()
    bmcs.drop(_names(args.bmc_dead))  # their ports close: calls to these BMCs go unanswered
    bmcs.slow_down(_names(args.bmc_slow), args.bmc_slow_delay)
    reactor.addSystemEventTrigger("before", "shutdown", bmcs.stop)


def main(argv: list[str] | None = None) -> int:
    """Run cid-simfleet with ``argv`` (default: sys.argv[1:]); return the exit status."""
    args = build_parser().parse_args(argv)
    configure(json=args.log_format == "json", level=args.log_level)
    try:
        if not args.server:
            args.server = agent_server(os.environ)[0]  # $CID_SERVER, the configuration file, 127.0.0.1:38008
        parse_server(args.server)
        for hostlist in (args.hostlist, args.hang_reboot, args.fail_install, args.bmc_dead, args.bmc_slow,
                         args.redfish_nodes):
            _names(hostlist)
    except (ValueError, BadHostlist, ClientConfigError) as exc:
        print(f"cid-simfleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    token_file = args.token_file or (Path(os.environ["CID_TOKEN_FILE"]) if os.environ.get("CID_TOKEN_FILE")
                                     else token_path(default_state_dir(), "agent"))
    try:
        token = read_token(token_file)
    except TokenFileError as exc:
        print(f"cid-simfleet: {exc.message}", file=sys.stderr)
        return EXIT_AUTH
    from twisted.internet import reactor

    try:
        fleet = build_fleet(args, reactor, token)
    except (TlsError, TokenFileError) as exc:
        print(f"cid-simfleet: {exc.message}", file=sys.stderr)
        return EXIT_AUTH

    def on_start() -> None:
        if args.bmc_base_port:
            start_bmcs(args, fleet, reactor)
        if args.redfish_hw_port:
            from cidsim.redfish_hw import RedfishHardware

            names = _names(args.redfish_nodes) or set(fleet.nodes)
            RedfishHardware({n: node for n, node in fleet.nodes.items() if n in names}).listen(
                reactor, args.redfish_hw_port)

    return serve(reactor, fleet, on_start=on_start, server=args.server, sim=args.hostlist)


if __name__ == "__main__":
    sys.exit(main())
