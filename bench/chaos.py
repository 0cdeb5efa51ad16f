"""Fault injection at cluster scale: captures through kill -9 of cidd, dying fleets, dead BMCs and hung reboots.

    python bench/chaos.py [--nodes 1000] [--fleets 10] [--captures 4] [--seed N]

Real processes on loopback: cidd (BMC calls through pyghmi), ``--fleets`` cid-simfleet processes sharing
``--nodes`` simulated nodes, each node with its own simulated IPMI BMC, and cidcapt as a prolog runs it. For every
capture, from a seed it prints, it chooses:

- nodes whose reboots hang (only a power cycle through the BMC brings them back), and among them nodes whose
  BMC is dead (they must fail, and their reason must name the BMC) and nodes whose BMC is slow (it answers each
  IPMI packet 0.4 s late, a call takes seconds: they must still end ready);
- a moment to ``kill -9`` cidd and how long it stays down (sometimes longer than cidcapt's --connect-timeout);
- a fleet process to ``kill -9`` in the middle of the switch (its nodes lose power, installs are cut mid-way) and
  start again a little later.

After each capture it checks, from cidd's event history *and* from what the agents logged and wrote on their
disks: no node finished two installs in one capture, no node reported ready in an image its disk does not hold,
the capture ended by its deadline, every failed node is one whose BMC is dead and its reason names the BMC, and
every other node (healthy, or hung with a working BMC) ended ready. It prints each violation with the node and
its events, then ``chaos_captures=N violations=M seed=S``. tests/test_chaos.py runs it small in ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cidcommon.hostlists import collect  # noqa: E402
from tests.procs import Cluster, _env, free_udp_block  # noqa: E402

IMAGES = ("rocky-9-3", "debian-12-2", "debian-12-1")
CONNECT_TIMEOUT = 3.0
# how long cidd stays down, capture after capture: the first is longer than cidcapt's connect timeout
CIDD_DOWN_FOR = (CONNECT_TIMEOUT + 3, 2.0, 0.5)
SLOW_BMC_DELAY = 0.4  # seconds per IPMI packet (pyghmi retransmits after 0.5-1 s): a call takes ~4 s, not 0.05


@dataclass
class Plan:
    """The faults of one capture."""

    image: str
    hang: set[str]
    dead: set[str]
    slow: set[str]
    cidd_kill_at: float
    cidd_down_for: float
    fleet_kill: int
    fleet_kill_at: float
    fleet_down_for: float


@dataclass
class Chaos:
    """The cluster under test and what the checks found."""

    args: argparse.Namespace
    root: Path
    rng: random.Random
    nodes: list[str] = field(default_factory=list)
    slices: list[list[str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    cluster: Cluster | None = None
    fleet_procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    base: int = 0
    creds: Path | None = None
    faulty: set[str] = field(default_factory=set)  # the nodes started with faults by the last capture

    # --- set-up -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start cidd and the fleets (every node in debian-12-1, nothing broken)."""
        args = self.args
        width = max(4, len(str(args.nodes)))
        self.nodes = [f"sim{i:0{width}d}" for i in range(1, args.nodes + 1)]
        size = -(-len(self.nodes) // args.fleets)
        self.slices = [self.nodes[i:i + size] for i in range(0, len(self.nodes), size)]
        self.creds = self.root / "bmc.cred"
        self.creds.write_text("chaos:not-a-real-password\n")
        self.creds.chmod(0o600)
        self.base = free_udp_block(len(self.nodes), random.Random())  # not from the seed: it depends on the machine
        ladder = [{"method": "reboot", "timeout": args.rung_timeout},
                  {"method": "power_cycle", "timeout": args.rung_timeout}]
        self.cluster = Cluster(self.root / "cid", heartbeat=2.0, extra_config={
            "bmc": {"address": f"127.0.0.1:{{index+{self.base - 1}}}", "credentials": str(self.creds),
                    "timeout": 6, "max_concurrent": 8, "breaker_after": 2, "breaker_cooldown": 30},
            "windows": {"reboots": 200, "power": 16},
            "restart_grace": 20,  # agents back within seconds here; a real cluster keeps the 90 s default
        }, groups={"default": {"ladder": ladder, "install_timeout": 60, "install_attempts": 2}})
        self.cluster.start_cidd()
        for index in range(len(self.slices)):
            self.start_fleet(index, set(), set(), set())
        self.wait_online()

    def start_fleet(self, index: int, hang: set[str], dead: set[str], slow: set[str]) -> None:
        """Start fleet process ``index`` (its slice of nodes) with the given hung, dead-BMC and slow-BMC nodes."""
        assert self.cluster is not None and self.creds is not None
        names = self.slices[index]
        first = self.nodes.index(names[0])
        extra = ["--reboot-delay", str(self.args.reboot_delay), "--install-time", str(self.args.install_time),
                 "--initial-image", "debian-12-1", "--seed", str(self.rng.randrange(1 << 30)),
                 "--bmc-base-port", str(self.base + first), "--bmc-credentials", str(self.creds)]
        mine_hang = sorted(hang & set(names))
        mine_dead = sorted(dead & set(names))
        if mine_hang:
            extra += ["--hang-reboot", collect(mine_hang)]
        if mine_dead:
            extra += ["--bmc-dead", collect(mine_dead)]
        mine_slow = sorted(slow & set(names))
        if mine_slow:
            extra += ["--bmc-slow", collect(mine_slow), "--bmc-slow-delay", str(SLOW_BMC_DELAY)]
        self.fleet_procs[index] = self.cluster.start_fleet(collect(names), *extra)

    def wait_online(self, timeout: float = 360.0) -> None:
        """Return once every node is online (status calls that time out while agents reconnect are retried)."""
        assert self.cluster is not None
        end = time.monotonic() + timeout
        online = 0
        while time.monotonic() < end:
            try:
                online = sum(1 for row in self.cluster.status().values() if row["online"])
            except AssertionError:  # cidd busy with a reconnect storm: ask again
                online = 0
            if online >= len(self.nodes):
                return
            time.sleep(0.5)
        raise TimeoutError(f"only {online} of {len(self.nodes)} nodes online after {timeout:g} s")

    def kill_fleet(self, index: int) -> None:
        """kill -9 fleet process ``index`` (its nodes lose power at once)."""
        proc = self.fleet_procs.pop(index, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=20)

    def stop(self) -> None:
        """Stop every process started here, by PID."""
        for index in list(self.fleet_procs):
            self.kill_fleet(index)
        if self.cluster is not None:
            self.cluster.stop()

    # --- one capture ----------------------------------------------------------------------------------------

    def plan(self, number: int) -> Plan:
        """Return the faults of capture ``number`` (drawn from the seeded generator); hung reboots and dead BMCs
        fall in two fleets, so that only those (and last capture's) are restarted with them."""
        rng = self.rng
        fault_fleets = rng.sample(range(len(self.slices)), min(2, len(self.slices)))
        pool = [name for index in fault_fleets for name in self.slices[index]]
        count = max(1, len(self.nodes) * self.args.hang_pct // 100)
        hang = set(rng.sample(pool, min(len(pool), count)))
        dead = set(rng.sample(sorted(hang), max(1, len(hang) // 4)))
        working = sorted(hang - dead)
        slow = set(rng.sample(working, len(working) // 2))
        return Plan(image=IMAGES[number % len(IMAGES)], hang=hang, dead=dead, slow=slow,
                    cidd_kill_at=rng.uniform(1.0, 6.0), cidd_down_for=CIDD_DOWN_FOR[number % len(CIDD_DOWN_FOR)],
                    fleet_kill=rng.randrange(len(self.slices)), fleet_kill_at=rng.uniform(1.0, 8.0),
                    fleet_down_for=rng.uniform(0.5, 3.0))

    def capture(self, number: int) -> None:
        """Run capture ``number`` through its faults, then check every invariant."""
        assert self.cluster is not None
        plan = self.plan(number)
        job = f"chaos{number}"
        print(f"capture {job}: image={plan.image} hang={len(plan.hang)} dead_bmc={len(plan.dead)} "
              f"slow_bmc={len(plan.slow)} "
              f"cidd_kill_at={plan.cidd_kill_at:.1f}s down={plan.cidd_down_for:.1f}s "
              f"fleet_kill={plan.fleet_kill} at={plan.fleet_kill_at:.1f}s down={plan.fleet_down_for:.1f}s", flush=True)
        touched = {index for index, names in enumerate(self.slices)
                   if set(names) & (plan.hang | plan.dead | self.faulty)}
        for index in sorted(touched):  # the fleets with this (or last) capture's faults boot again with them
            self.kill_fleet(index)
            self.start_fleet(index, plan.hang, plan.dead, plan.slow)
        self.faulty = plan.hang | plan.dead
        self.wait_online()
        start_wall = time.time()
        timeout = self.args.capture_timeout
        prolog = subprocess.Popen(
            [sys.executable, "-m", "cidcapt.main", "--server", self.cluster.server, "-j", job, "-n",
             collect(self.nodes), "-i", plan.image, "--timeout", str(timeout), "--connect-timeout",
             str(CONNECT_TIMEOUT), "--json", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(self.cluster.state_dir))
        begun = time.monotonic()
        events = sorted([(plan.cidd_kill_at, "kill_cidd"), (plan.fleet_kill_at, "kill_fleet")])
        for at, what in events:
            time.sleep(max(0.0, begun + at - time.monotonic()))
            if what == "kill_cidd":
                self.cluster.kill_cidd()
                time.sleep(plan.cidd_down_for)
                self.cluster.start_cidd()
            else:
                self.kill_fleet(plan.fleet_kill)
                time.sleep(plan.fleet_down_for)
                self.start_fleet(plan.fleet_kill, plan.hang, plan.dead, plan.slow)
        argv = list(prolog.args)
        try:
            out, err = prolog.communicate(timeout=timeout + 120)
        except subprocess.TimeoutExpired:
            prolog.kill()
            out, err = prolog.communicate()
            self.violation(job, "-", f"cidcapt did not return within {timeout + 120} s")
        code = prolog.returncode
        for _ in range(5):
            if code != 4 or "re-attach" in err:
                break
            # cidd died before cidcapt saw the capture accepted (or was still too busy to answer within the
            # connect timeout): exit 4 ("unreachable, retry") is the contract, and Slurm runs the prolog again
            # after a pause; the same job id re-attaches to the capture cidd may have started.
            print(f"capture {job}: cidcapt exited 4 ({err.strip()[-160:]}); run again in 5 s", flush=True)
            time.sleep(5)
            again = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 120,
                                   env=_env(self.cluster.state_dir))
            code, out, err = again.returncode, again.stdout, again.stderr
        elapsed = time.monotonic() - begun
        self.check(job, plan, code, out, err, elapsed, start_wall)

    # --- checks -----------------------------------------------------------------------------------------------

    def violation(self, job: str, node: str, what: str) -> None:
        """Record one broken invariant."""
        line = f"VIOLATION {job} node={node}: {what}"
        self.violations.append(line)
        print(line, flush=True)

    def node_history(self, job: str, node: str) -> str:
        """Return the node's rows of the capture's history, for a violation's report."""
        assert self.cluster is not None
        with sqlite3.connect(self.cluster.db, timeout=10) as db:
            rows = db.execute("SELECT from_state, to_state, rung, detail FROM events WHERE job = ? AND node = ? "
                              "ORDER BY id", (job, node)).fetchall()
        return "; ".join(f"{a}->{b} r{r} ({d})" for a, b, r, d in rows)

    def agent_events(self, name: str, since: float) -> list[dict[str, Any]]:
        """Return the fleets' events named ``name`` logged at or after wall time ``since``."""
        assert self.cluster is not None
        found = []
        for log in sorted(self.cluster.root.glob("fleet-*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if not line.startswith("{") or f'"{name}"' not in line:
                    continue
                event = json.loads(line)
                stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
                if event.get("event") == name and stamp >= since - 1:
                    found.append(event)
        return found

    def check(self, job: str, plan: Plan, code: int, out: str, err: str, elapsed: float, since: float) -> None:
        """Check the invariants of one finished capture (see the module docstring)."""
        assert self.cluster is not None
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        result = next((line for line in reversed(lines) if line.get("type") == "result"), None)
        if result is None:
            self.violation(job, "-", f"no result from cidcapt (exit {code}): {err[-500:]}")
            return
        expected_code = 1 if plan.dead else 0
        if code != expected_code:
            self.violation(job, "-", f"cidcapt exited {code}, expected {expected_code}: {err[-800:]}")
        if elapsed > self.args.capture_timeout + 35:
            self.violation(job, "-", f"the capture ended {elapsed:.0f} s after it began, past its deadline")
        with sqlite3.connect(self.cluster.db, timeout=10) as db:
            row = db.execute("SELECT state, deadline, ended FROM captures WHERE job = ?", (job,)).fetchone()
        if row is None or row[2] is None or row[2] > row[1] + 1.0:
            self.violation(job, "-", f"capture row {row}: not ended by its deadline")
        nodes = result.get("nodes", {})
        disks = self.cluster.root / "sim"
        for name in self.nodes:
            info = nodes.get(name, {})
            state, reason = info.get("state"), info.get("reason") or ""
            if name in plan.dead:
                if state != "failed":
                    self.violation(job, name, f"dead BMC but {state}; history: {self.node_history(job, name)}")
                elif "BMC" not in reason:
                    self.violation(job, name, f"failed without naming its BMC: {reason!r}")
                continue
            if state != "ready" or info.get("image") != plan.image:
                self.violation(job, name, f"healthy BMC but {state} in {info.get('image')} ({reason}); "
                                          f"history: {self.node_history(job, name)}")
                continue
            marker = disks / name / "etc" / "cid-image"
            on_disk = marker.read_text().splitlines()[0] if marker.exists() else None
            if on_disk != plan.image:
                self.violation(job, name, f"reported ready in {plan.image} but its disk holds {on_disk}")
        finished: dict[str, int] = {}
        for event in self.agent_events("agent.install_finished", since):
            if event.get("ok") and event.get("image") == plan.image:
                finished[event["node"]] = finished.get(event["node"], 0) + 1
        for name, count in sorted(finished.items()):
            if count > 1:
                self.violation(job, name, f"finished {count} installs of {plan.image} in one capture; "
                                          f"history: {self.node_history(job, name)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--fleets", type=int, default=10)
    parser.add_argument("--captures", type=int, default=4)
    parser.add_argument("--seed", type=int, help="seed of every random choice (default: a new one, printed)")
    parser.add_argument("--hang-pct", type=int, default=2, help="percent of nodes whose reboots hang")
    parser.add_argument("--reboot-delay", type=float, default=1.0)
    parser.add_argument("--install-time", type=float, default=2.0)
    parser.add_argument("--rung-timeout", type=float, default=15.0)
    parser.add_argument("--capture-timeout", type=float, default=240.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    print(f"seed={seed} nodes={args.nodes} fleets={args.fleets} captures={args.captures}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped bench still stops what it started
    work = Path(tempfile.mkdtemp(prefix="cid-chaos-"))
    chaos = Chaos(args, work, random.Random(seed))
    try:
        chaos.start()
        for number in range(args.captures):
            chaos.capture(number)
    finally:
        chaos.stop()
        if not args.keep and not chaos.violations:
            subprocess.run(["rm", "-rf", str(work)], check=False)
        else:
            print(f"work directory kept: {work}")
    print(f"chaos_captures={args.captures} violations={len(chaos.violations)} seed={seed}")
    return 1 if chaos.violations else 0


if __name__ == "__main__":
    sys.exit(main())
