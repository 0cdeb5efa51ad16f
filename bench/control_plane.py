"""Control-plane benchmark: N simulated agents on loopback against one real cidd process.

    python bench/control_plane.py [--nodes 2000] [--fleets K] [--no-pin] [--hb-window 20] [--repeat 5]
                                  [--switch-timeout 1200] [--compare-plain]

Real processes: cidd, K `cid-simfleet` processes each holding a slice of the N sessions (bench/fleets.py), and
cidcapt as a prolog runs it. With 2 CPUs or more, cidd is pinned to CPU 0 and the fleets and cidcapt to the
others (taskset), so that the simulator does not take turns with cidd on its core (--no-pin: no pinning).
Figures (medians where repeated), with a baseline measured in the same run (the machines are noisy):

- sessions, rss_mib, heartbeat_cpu_pct: cidd's resident memory and CPU while N agents heartbeat at the
  interval cidd gives them (heartbeat_interval_s, docs/protocol.md);
- capture_ready_s: a capture of all N nodes that already run the image (cidcapt start to exit), against
  baseline_status1_s, a `cidcapt --status` of one node (same process start-up, one round trip);
- reconnect_s: from a ``kill -9`` of cidd, restarted at once, until all N agents are online again; then every
  one must stay online (reconnect_dropped counts the sessions cidd dropped or timed out meanwhile);
- switch_s: a full switch of all N nodes with zero reboot delay and zero install time (median of 2).

The last lines printed are the load average, capture_ready_s, rss_mib, heartbeat_cpu_pct, reconnect_s and
switch_s.

Sessions run over TLS (cidd's default). With --compare-plain the same figures are first measured over plain
TCP (``tls: {mode: plain}``) and the TLS/plain ratios printed: the cost of TLS.

Targets on the 2-core reference machine at N=2,000: capture_ready under 0.5 s, switch under 40 s.
Not part of the test suite: it prints figures, it does not pass or fail.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.fleets import (  # noqa: E402
    Pinning,
    default_fleets,
    gauges,
    hostlist,
    log_events,
    name_width,
    online,
    slices,
    start_cidd,
    start_fleets,
    stop,
    wait_online,
)
from cidsim import placeholder_images  # noqa: E402
from tests.procs import free_port  # noqa: E402

#: cidd's log events that mean a session was dropped during the reconnect measurement.
DROP_EVENTS = ("session.hello_timeout", "agent.silent", "agent.request_timeout", "agent.session_superseded")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run argv; return (seconds, finished process)."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def measure(args: argparse.Namespace, root: Path, plain: bool) -> dict[str, float]:
    """Run cidd, ``args.fleets`` fleets of ``args.nodes`` agents in all and the measurements; return the figures.

    ``plain``: cidd with ``tls: {mode: plain}`` and clients with CID_PLAIN_TCP=1; else TLS (the default).
    Raises AssertionError when a capture fails or times out (its cidcapt output is shown).
    """
    root.mkdir(parents=True)
    port, http_port = free_port(), free_port()
    server = f"127.0.0.1:{port}"
    env = {**os.environ, "CID_STATE_DIR": str(root / "state"), "PYTHONPATH": str(REPO)}
    if plain:
        env["CID_PLAIN_TCP"] = "1"
    config = {"state_dir": str(root / "state"), "catalog": str(REPO / "images.yaml"),
              "listen": {"host": "127.0.0.1", "port": port}, "http": {"host": "127.0.0.1", "port": http_port},
              "heartbeat": 10, "log": {"level": args.log_level},
              "groups": {"default": {"ladder": [{"method": "reboot", "timeout": args.switch_timeout}]}},
              "tls": {"mode": "plain" if plain else "tls"}}
    (root / "cidd.yaml").write_text(yaml.safe_dump(config))
    placeholder_images(REPO / "images.yaml", root / "state" / "images")  # cidd offers only images it has
    hosts = hostlist(1, args.nodes, name_width(args.nodes))
    label = "plain" if plain else "tls"
    pin = Pinning.choose(args.pin)
    cidd_log = root / "cidd.log"
    print(f"[{label}] {args.nodes} nodes in {args.fleets} fleet processes; {pin.describe()}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; logs in {root}", flush=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cidd = start_cidd(root / "cidd.yaml", env, cidd_log, pin)
        procs.append(cidd)
        time.sleep(1.5)
        start = time.perf_counter()
        fleets = start_fleets(slices(args.nodes, args.fleets), server, root, env, pin, args.log_level)
        procs.extend(fleets)
        connect_s, count = wait_online(http_port, args.nodes, 600, start)
        print(f"[{label}] connected {count}/{args.nodes} agents in {connect_s:.1f}s", flush=True)
        cidd_ps = psutil.Process(cidd.pid)
        time.sleep(args.settle)  # let every agent send its first heartbeats (and adopt cidd's interval)
        hb_interval = gauges(http_port).get("cid_heartbeat_interval_seconds", 10.0)
        window = max(args.hb_window, 2 * hb_interval)  # whole intervals: every agent beats as often in it
        cpu0 = sum(cidd_ps.cpu_times()[:2])
        time.sleep(window)
        heartbeat_cpu = (sum(cidd_ps.cpu_times()[:2]) - cpu0) / window * 100
        rss_mib = cidd_ps.memory_info().rss / 2**20
        fleet_rss_mib = sum(psutil.Process(fleet.pid).memory_info().rss for fleet in fleets) / 2**20
        print(f"[{label}] heartbeats every {hb_interval:g}s: cidd used {heartbeat_cpu:.1f}% of a core over "
              f"{window:g}s; rss {rss_mib:.0f} MiB", flush=True)
        capt = [*pin.others, sys.executable, "-m", "cidcapt.main", "--server", server]
        baseline = [timed([*capt, "--status", "sim" + "1".zfill(name_width(args.nodes))], env)[0]
                    for _ in range(args.repeat)]
        ready_runs = []
        for i in range(args.repeat):
            seconds, done = timed([*capt, "-j", f"ready{i}", "-n", hosts, "-i", "debian-12-1", "--quiet"], env)
            assert done.returncode == 0, done.stderr[-2000:]
            ready_runs.append(seconds)
        reconnect_s, dropped = kill_and_restart(args, root, env, pin, http_port, procs, label)
        switch_runs = []
        for i, image in enumerate(("debian-12-2", "rocky-9-3")):
            cpu = cpu_seconds(procs)
            seconds, done = timed([*capt, "-j", f"switch{i}", "-n", hosts, "-i", image, "--quiet", "--timeout",
                                   str(args.switch_timeout)], env)
            assert done.returncode == 0, f"switch {i + 1} failed after {seconds:.1f}s: {done.stderr[-2000:]}"
            switch_runs.append(seconds)
            used = [after - before for before, after in zip(cpu, cpu_seconds(procs), strict=True)]
            print(f"[{label}] switch {i + 1}: {seconds:.1f}s; CPU seconds used meanwhile: cidd {used[0]:.0f}, "
                  f"fleets {sum(used[1:]):.0f}", flush=True)
        figures = {"connect_s": connect_s, "sessions": count, "rss_mib": rss_mib, "fleet_rss_mib": fleet_rss_mib,
                   "heartbeat_interval_s": hb_interval, "heartbeat_cpu_pct": heartbeat_cpu,
                   "baseline_status1_s": statistics.median(baseline),
                   "capture_ready_s": statistics.median(ready_runs), "reconnect_s": reconnect_s,
                   "reconnect_dropped": dropped, "switch_s": statistics.median(switch_runs)}
        print(f"[{label}] capture_ready_runs={[round(r, 3) for r in ready_runs]} "
              f"switch_runs={[round(r, 1) for r in switch_runs]}")
        ratio = figures["capture_ready_s"] / figures["baseline_status1_s"]
        print(f"[{label}] capture_ready_ratio_to_baseline={ratio:.2f}")
        print(f"[{label}] " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in figures.items()), flush=True)
        return figures
    finally:
        stop(procs)


def cpu_seconds(procs: list[subprocess.Popen[bytes]]) -> list[float]:
    """Return the user + system CPU seconds each of ``procs`` has used so far (0 for one that ended)."""
    used = []
    for proc in procs:
        try:
            used.append(sum(psutil.Process(proc.pid).cpu_times()[:2]))
        except psutil.NoSuchProcess:
            used.append(0.0)
    return used


def kill_and_restart(args: argparse.Namespace, root: Path, env: dict[str, str], pin: Pinning, http_port: int,
                     procs: list[subprocess.Popen[bytes]], label: str) -> tuple[float, int]:
    """``kill -9`` the running cidd (``procs[0]``), start it again at once, wait for every agent to be back.

    Return (seconds from the kill until all ``args.nodes`` nodes were online again, sessions dropped): the
    dropped sessions are those cidd timed out or closed during the reconnect and the hold that follows
    (``args.hold`` s, after which every node must still be online), counted from cidd's log.
    """
    cidd_log = root / "cidd.log"
    since = cidd_log.stat().st_size
    fleets_cpu = sum(cpu_seconds(procs[1:]))
    killed_at = time.perf_counter()
    procs[0].kill()
    procs[0].wait()
    procs[0] = start_cidd(root / "cidd.yaml", env, cidd_log, pin)
    reconnect_s, back = wait_online(http_port, args.nodes, args.reconnect_timeout, killed_at, every=0.5)
    cidd_cpu, *fleet_cpu = cpu_seconds(procs)
    print(f"[{label}] kill -9 of cidd: {back}/{args.nodes} agents back in {reconnect_s:.1f}s; CPU seconds used "
          f"meanwhile: cidd {cidd_cpu:.0f}, fleets {sum(fleet_cpu) - fleets_cpu:.0f}", flush=True)
    time.sleep(args.hold)
    still = online(http_port)
    events = log_events(cidd_log, DROP_EVENTS, since)
    dropped = sum(events.values()) + max(0, args.nodes - still)
    print(f"[{label}] {args.hold:g}s later: {still}/{args.nodes} online; "
          + " ".join(f"{event}={n}" for event, n in events.items()), flush=True)
    return reconnect_s, dropped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--fleets", type=int, help="cid-simfleet processes sharing the nodes (default: one per "
                        "2,500 nodes)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin cidd to CPU 0 and the fleets and cidcapt to the other CPUs (taskset)")
    parser.add_argument("--hb-window", type=float, default=20.0,
                        help="seconds of heartbeat CPU measurement (at least two heartbeat intervals)")
    parser.add_argument("--settle", type=float, default=25.0,
                        help="seconds between the last agent's hello and the heartbeat measurement")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of the short measurements")
    parser.add_argument("--switch-timeout", type=int, default=1200,
                        help="seconds a full switch may take (capture timeout and ladder rung timeout)")
    parser.add_argument("--reconnect-timeout", type=float, default=600.0,
                        help="seconds every agent has to come back after the kill -9 of cidd")
    parser.add_argument("--hold", type=float, default=15.0,
                        help="seconds every agent must stay online after the reconnect")
    parser.add_argument("--log-level", default="warning", help="log level of cidd and the fleets")
    parser.add_argument("--compare-plain", action="store_true",
                        help="also run everything over plain TCP first (the baseline) and print TLS/plain ratios")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop cidd and the fleets (finally) on SIGTERM too
    args.fleets = args.fleets or default_fleets(args.nodes)
    slices(args.nodes, args.fleets)  # refuse a bad --fleets before starting anything
    root = Path(tempfile.mkdtemp(prefix="cid-bench-"))
    plain = measure(args, root / "plain", plain=True) if args.compare_plain else None
    tls = measure(args, root / "tls", plain=False)
    if plain is not None:
        print("TLS / plain ratios (same run): " + " ".join(
            f"{key}={tls[key] / plain[key]:.2f}" for key in tls if plain[key]), flush=True)
    print(f"load_average={' '.join(f'{x:.2f}' for x in os.getloadavg())} fleets={args.fleets} "
          f"pinned={'yes' if Pinning.choose(args.pin).cidd else 'no'}")
    print(f"capture_ready_s={tls['capture_ready_s']:.3f}")
    print(f"sessions={tls['sessions']} rss_mib={tls['rss_mib']:.0f}")
    print(f"heartbeat_cpu_pct={tls['heartbeat_cpu_pct']:.1f} heartbeat_interval_s={tls['heartbeat_interval_s']:g}")
    print(f"reconnect_s={tls['reconnect_s']:.1f} reconnect_dropped={tls['reconnect_dropped']}")
    print(f"switch_s={tls['switch_s']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
