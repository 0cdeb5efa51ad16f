"""Control-plane benchmark: N simulated agents on loopback against one real cidd process.

    python bench/control_plane.py [--nodes 2000] [--hb-window 20] [--repeat 5] [--compare-plain]

Real processes: cidd, one `cid-simfleet` fleet holding N sessions, and cidcapt as a prolog runs it.
Figures (medians where repeated), with a baseline measured in the same run (the machines are noisy):

- sessions, rss_mib, heartbeat_cpu_pct: cidd's resident memory and CPU while N agents heartbeat every 10 s;
- capture_ready_s: a capture of all N nodes that already run the image (cidcapt start to exit), against
  baseline_status1_s, a `cidcapt --status` of one node (same process start-up, one round trip);
- switch_s: a full switch of all N nodes with zero reboot delay and zero install time.

Sessions run over TLS (cidd's default). With --compare-plain the same figures are first measured over plain
TCP (``tls: {mode: plain}``) and the TLS/plain ratios printed: the cost of TLS.

Targets on the 2-core reference machine at N=2,000: capture_ready under 0.5 s, switch under 40 s.
Not part of the test suite: it prints figures, it does not pass or fail.
"""

from __future__ import annotations

import argparse
import json
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

from tests.procs import free_port  # noqa: E402


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run argv; return (seconds, finished process)."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def online(server: str, env: dict[str, str]) -> int:
    """Return how many nodes cidd reports online."""
    done = subprocess.run([sys.executable, "-m", "cidcapt.main", "--server", server, "--status", "--json"],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return 0
    return sum(1 for row in json.loads(done.stdout) if row["online"])


def measure(args: argparse.Namespace, root: Path, plain: bool) -> dict[str, float]:
    """Run cidd, a fleet of ``args.nodes`` agents and the cidcapt measurements; return the figures.

    ``plain``: cidd with ``tls: {mode: plain}`` and clients with CID_PLAIN_TCP=1; else TLS (the default).
    """
    root.mkdir(parents=True)
    port = free_port()
    server = f"127.0.0.1:{port}"
    env = {**os.environ, "CID_STATE_DIR": str(root / "state"), "PYTHONPATH": str(REPO)}
    if plain:
        env["CID_PLAIN_TCP"] = "1"
    config = {"state_dir": str(root / "state"), "catalog": str(REPO / "images.yaml"),
              "listen": {"host": "127.0.0.1", "port": port}, "http": {"host": "127.0.0.1", "port": free_port()},
              "heartbeat": 10, "log": {"level": "warning"},
              "groups": {"default": {"ladder": [{"method": "reboot", "timeout": 600}]}},
              "tls": {"mode": "plain" if plain else "tls"}}
    (root / "cidd.yaml").write_text(yaml.safe_dump(config))
    hosts = f"sim[0001-{args.nodes:04d}]"
    label = "plain" if plain else "tls"
    procs: list[subprocess.Popen] = []
    try:
        cidd = subprocess.Popen([sys.executable, "-m", "cidd.main", "--config", str(root / "cidd.yaml")], env=env,
                                stdout=subprocess.DEVNULL, stderr=open(root / "cidd.log", "wb"))  # noqa: SIM115
        procs.append(cidd)
        time.sleep(1.5)
        start = time.perf_counter()
        fleet = subprocess.Popen(
            [sys.executable, "-m", "cidsim.main", hosts, "--server", server, "--sim-dir", str(root / "sim"),
             "--reboot-delay", "0", "--install-time", "0", "--initial-image", "debian-12-1", "--log-level",
             "warning"], env=env, stdout=subprocess.DEVNULL, stderr=open(root / "fleet.log", "wb"))  # noqa: SIM115
        procs.append(fleet)
        count = 0
        while time.perf_counter() - start < 300:
            count = online(server, env)
            if count >= args.nodes:
                break
            time.sleep(1.0)
        connect_s = time.perf_counter() - start
        print(f"[{label}] connected {count}/{args.nodes} agents in {connect_s:.1f}s", flush=True)
        cidd_ps = psutil.Process(cidd.pid)
        time.sleep(12)  # let every agent send its first heartbeats
        cpu0 = sum(cidd_ps.cpu_times()[:2])
        time.sleep(args.hb_window)
        heartbeat_cpu = (sum(cidd_ps.cpu_times()[:2]) - cpu0) / args.hb_window * 100
        rss_mib = cidd_ps.memory_info().rss / 2**20
        fleet_rss_mib = psutil.Process(fleet.pid).memory_info().rss / 2**20
        capt = [sys.executable, "-m", "cidcapt.main", "--server", server]
        baseline = [timed([*capt, "--status", "sim0001"], env)[0] for _ in range(args.repeat)]
        ready_runs = []
        for i in range(args.repeat):
            seconds, done = timed([*capt, "-j", f"ready{i}", "-n", hosts, "-i", "debian-12-1", "--quiet"], env)
            assert done.returncode == 0, done.stderr[-2000:]
            ready_runs.append(seconds)
        switch_runs = []
        for i, image in enumerate(("debian-12-2", "rocky-9-3")):
            seconds, done = timed([*capt, "-j", f"switch{i}", "-n", hosts, "-i", image, "--quiet", "--timeout",
                                   "600"], env)
            assert done.returncode == 0, done.stderr[-2000:]
            switch_runs.append(seconds)
            print(f"[{label}] switch {i + 1}: {seconds:.1f}s", flush=True)
        figures = {"connect_s": connect_s, "sessions": count, "rss_mib": rss_mib, "fleet_rss_mib": fleet_rss_mib,
                   "heartbeat_cpu_pct": heartbeat_cpu, "baseline_status1_s": statistics.median(baseline),
                   "capture_ready_s": statistics.median(ready_runs), "switch_s": statistics.median(switch_runs)}
        print(f"[{label}] capture_ready_runs={[round(r, 3) for r in ready_runs]}")
        ratio = figures["capture_ready_s"] / figures["baseline_status1_s"]
        print(f"[{label}] capture_ready_ratio_to_baseline={ratio:.2f}")
        print(f"[{label}] " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in figures.items()), flush=True)
        return figures
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--hb-window", type=float, default=20.0, help="seconds of heartbeat CPU measurement")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of the short measurements")
    parser.add_argument("--compare-plain", action="store_true",
                        help="also run everything over plain TCP first (the baseline) and print TLS/plain ratios")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cid-bench-"))
    plain = measure(args, root / "plain", plain=True) if args.compare_plain else None
    tls = measure(args, root / "tls", plain=False)
    if plain is not None:
        print("TLS / plain ratios (same run): " + " ".join(
            f"{key}={tls[key] / plain[key]:.2f}" for key in tls if plain[key]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
