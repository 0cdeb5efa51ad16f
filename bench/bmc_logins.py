"""BMC call latency with several calls at once: pyghmi as shipped against cidd's patched I/O loop, same run.

    python bench/bmc_logins.py [--bmcs 4] [--dead 1] [--rounds 15]     (IPMI and Redfish, same run)

Starts --bmcs real BMC simulators (OpenIPMI's ``ipmi_sim``, one process and UDP port each, on 127.0.0.1) and
reserves --dead UDP ports where nothing answers (a BMC that is down). Each round runs two fresh processes, in
alternating order: one with pyghmi as shipped and one through cidd's ``cidd.power`` factory, which applies
``cidd.pyghmi_io`` first. Each process logs in to every BMC at once (one thread per BMC, as cidd's power pool
does) and reads the chassis power state. A round's figure is the time until the slowest live BMC answered; the
dead ports only have to fail (they keep pyghmi's retransmit timers running, as a dead BMC does in production).

Then the cost of the fix: a process whose 8 threads (cidd's default ``bmc.max_concurrent``) all log in to dead
BMCs at once, until pyghmi gives up (about 5 s); its CPU time as a share of one core, shipped and patched.

Then Redfish, beside it: one sushy-emulator (sushy-tools, fake driver, HTTPS with a test CA, X-Auth-Token
sessions: cidsim.redfish_emulator) serving --bmcs systems; each round a fresh process runs cidd's own
``RedfishSession`` (cidd/redfish.py) for every system at once, one thread each: log in, read the power state,
log out. A round's figure is the time until the slowest of them was done.

Prints the median and maximum of each variant, the CPU shares, the Redfish figures and
``redfish_ipmi_ratio=`` (Redfish median / patched IPMI median), then ``bmc_batch_ratio=`` (patched median /
shipped median) as its last line. Needs ``ipmi_sim`` and ``ipmitool`` (``make test`` installs them) and
sushy-tools (the ``test`` extra). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.ipmisim import PASSWORD, USER, IpmiSim  # noqa: E402


def child(ports: list[int], dead: list[int], patched: bool) -> None:
    """In a fresh process: log in to every port at once and print one JSON line of per-port seconds."""
    make_command = _factory(patched)
    results: dict[int, float | str] = {}
    start = time.monotonic()

    def call(port: int) -> None:
        try:
            state = make_command("127.0.0.1", port, USER.encode(), PASSWORD.encode()).get_power()["powerstate"]
            results[port] = time.monotonic() - start if state in ("on", "off") else f"odd state {state}"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            results[port] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=call, args=(port,), daemon=True) for port in ports + dead]
    for thread in threads:
        thread.start()
    for thread in threads[: len(ports)]:
        thread.join(30)
    live = [results.get(port, "no answer within 30 s") for port in ports]
    print(json.dumps({"live": live}), flush=True)


def redfish_child(url: str, ca: str, names: list[str]) -> None:
    """In a fresh process: a Redfish session to every system at once (login, power state, logout); print the
    per-system seconds as one JSON line."""
    from cidd.bmc import BmcCredentials, redfish_target
    from cidd.config_sections import BmcConfig
    from cidd.redfish import RedfishSession
    from tests.redfishemu import PASSWORD as RF_PASSWORD
    from tests.redfishemu import USER as RF_USER

    settings = BmcConfig(type="redfish", ca_bundle=Path(ca), timeout=30)
    results: dict[str, float | str] = {}
    start = time.monotonic()

    def call(name: str) -> None:
        target = redfish_target(name, f"{url}/redfish/v1/Systems/{name}", BmcCredentials(RF_USER, RF_PASSWORD),
                                settings)
        try:
            session = RedfishSession(target, 30, threading.Event())
            try:
                state = session.power_state()
            finally:
                session.close()
            results[name] = time.monotonic() - start if state in ("on", "off") else f"odd state {state}"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            results[name] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=call, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    print(json.dumps({"live": [results.get(name, "no answer within 60 s") for name in names]}), flush=True)


def redfish_round(url: str, ca: Path, names: list[str]) -> float:
    """Run one Redfish child; return the seconds until its slowest system answered (raise on any failure)."""
    args = [sys.executable, __file__, "--child-redfish", "--url", url, "--ca", str(ca), "--ports", ",".join(names)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
    live = json.loads(out.stdout.strip().splitlines()[-1])["live"]
    failures = [value for value in live if isinstance(value, str)]
    if failures:
        raise RuntimeError(f"redfish: {failures}")
    return max(live)


def dead_cpu_child(patched: bool, threads: int = 8) -> None:
    """In a fresh process: ``threads`` logins to dead ports at once; print the CPU share of one core (JSON)."""
    make_command = _factory(patched)
    dead = []
    for _ in range(threads):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))  # bound, never answering: a BMC that is down
        dead.append(sock)

    def call(port: int) -> None:
        try:
            make_command("127.0.0.1", port, USER.encode(), PASSWORD.encode())
        except Exception:  # noqa: BLE001 - failing is what a dead BMC does
            pass

    before, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    workers = [threading.Thread(target=call, args=(sock.getsockname()[1],)) for sock in dead]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - start
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(json.dumps({"cpu_share": cpu / wall, "wall": wall}), flush=True)


def _factory(patched: bool):  # type: ignore[no-untyped-def]
    """Return the Command factory: cidd's (fixes applied) or pyghmi's as shipped."""
    if patched:
        from cidd.power import _pyghmi_command

        return _pyghmi_command
    from pyghmi.ipmi.command import Command

    def make_command(host: str, port: int, user: bytes, password: bytes):  # type: ignore[no-untyped-def]
        return Command(bmc=host, userid=user, password=password, port=port)

    return make_command


def dead_cpu(patched: bool) -> float:
    """Return the CPU share of one core used by 8 concurrent logins to dead BMCs (one fresh process)."""
    args = [sys.executable, __file__, "--child-dead-cpu"] + (["--patched"] if patched else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["cpu_share"])


def free_dead_ports(count: int) -> list[int]:
    """Return ``count`` UDP ports on 127.0.0.1 with nothing bound (a moment ago)."""
    ports = []
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    return ports


def one_round(ports: list[int], dead: list[int], patched: bool) -> float:
    """Run one child; return the seconds until its slowest live BMC answered (raise on any failure)."""
    args = [sys.executable, __file__, "--child", "--ports", ",".join(map(str, ports)),
            "--dead-ports", ",".join(map(str, dead))] + (["--patched"] if patched else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
    live = json.loads(out.stdout.strip().splitlines()[-1])["live"]
    failures = [value for value in live if isinstance(value, str)]
    if failures:
        raise RuntimeError(f"{'patched' if patched else 'shipped'} pyghmi: {failures}")
    return max(live)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bmcs", type=int, default=4, help="live ipmi_sim BMCs (default 4)")
    parser.add_argument("--dead", type=int, default=1, help="dead BMC ports (default 1)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per variant (default 15)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-dead-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-redfish", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ca", default="", help=argparse.SUPPRESS)
    parser.add_argument("--patched", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ports", default="", help=argparse.SUPPRESS)
    parser.add_argument("--dead-ports", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_dead_cpu:
        dead_cpu_child(args.patched)
        return 0
    if args.child_redfish:
        redfish_child(args.url, args.ca, [n for n in args.ports.split(",") if n])
        return 0
    if args.child:
        child([int(p) for p in args.ports.split(",") if p], [int(p) for p in args.dead_ports.split(",") if p],
              args.patched)
        return 0
    from tests.redfishemu import RedfishEmulator, make_pki

    with tempfile.TemporaryDirectory(prefix="cid-bench-bmc-") as tmp:
        sims = [IpmiSim(Path(tmp) / f"bmc{i}") for i in range(args.bmcs)]
        names = [f"rf{i:02d}" for i in range(1, args.bmcs + 1)]
        emulator = RedfishEmulator(Path(tmp) / "redfish", ",".join(names), make_pki(Path(tmp) / "pki"))
        try:
            for sim in sims:
                sim.start()
            emulator.start()
            ports = [sim.port for sim in sims]
            dead = free_dead_ports(args.dead)
            times: dict[bool, list[float]] = {False: [], True: []}
            redfish: list[float] = []
            for n in range(args.rounds):
                order = (False, True) if n % 2 == 0 else (True, False)
                for patched in order:
                    times[patched].append(one_round(ports, dead, patched))
                redfish.append(redfish_round(emulator.url, emulator.pki.ca, names))
        finally:
            for sim in sims:
                sim.stop()
            emulator.stop()
    for patched, label in ((False, "shipped"), (True, "patched")):
        values = times[patched]
        print(f"{label}: slowest of {args.bmcs} concurrent logins+status, {args.dead} dead BMC(s): "
              f"median {statistics.median(values):.3f} s, max {max(values):.3f} s over {len(values)} rounds")
    shares: dict[bool, list[float]] = {False: [], True: []}
    for n in range(3):
        for patched in ((False, True) if n % 2 == 0 else (True, False)):
            shares[patched].append(dead_cpu(patched))
    print(f"8 logins to dead BMCs at once, CPU share of one core (median of 3): shipped "
          f"{100 * statistics.median(shares[False]):.1f} %, patched {100 * statistics.median(shares[True]):.1f} %")
    print(f"redfish: slowest of {args.bmcs} concurrent sessions (login, power state, logout) to one "
          f"sushy-emulator: median {statistics.median(redfish):.3f} s, max {max(redfish):.3f} s over "
          f"{len(redfish)} rounds")
    print(f"redfish_ipmi_ratio={statistics.median(redfish) / statistics.median(times[True]):.3f}")
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(f"bmc_batch_ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
