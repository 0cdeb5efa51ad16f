"""A real Slurm (Debian's slurmctld, one slurmd per node name, munged) started on loopback by the tests.

Everything lives under one directory: munge key and socket, slurm.conf, state, spool, logs and pid files.
Every daemon and client gets ``SLURM_CONF`` (and munged an explicit ``--origin``) so that nothing asks DNS:
without it Slurm's clients fall back to DNS SRV discovery, which would send traffic off loopback.
Processes are started here and stopped by PID in ``stop``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.procs import Cluster, free_port

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "srun", "scancel", "scontrol", "munged", "mungekey")
DEBS = "slurmctld slurmd slurm-client munge"


def require_slurm() -> None:
    """Fail the test (never skip it) when Slurm or munge is not installed, saying how to get them."""
    missing = [p for p in PROGRAMS if shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        pytest.fail(f"the real-Slurm tests need {', '.join(missing)}: run 'make test', which installs the "
                    f"Debian packages of TEST_DEBS ({DEBS}), or apt-get install -y {DEBS}", pytrace=False)


def _which(program: str) -> str:
    """Return the absolute path of ``program`` (Debian puts the daemons in /usr/sbin)."""
    found = shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found, program
    return found


@dataclass
class CidCluster(Cluster):
    """A tests.procs.Cluster whose cidd.yaml also has a ``scheduler`` section."""

    scheduler: dict[str, Any] = field(default_factory=dict)

    def write_config(self) -> Path:
        """Write cidd.yaml with the ``scheduler`` section added; return its path."""
        path = super().write_config()
        if self.scheduler:
            config = yaml.safe_load(path.read_text())
            config["scheduler"] = self.scheduler
            path.write_text(yaml.safe_dump(config))
        return path


@dataclass
class Slurm:
    """slurmctld + one slurmd per node + munged, all under ``root``.

    ``node_lines`` adds words to every NodeName line (e.g. ``Features=a,b``); ``conf`` adds whole lines to
    slurm.conf (a key given there replaces the fixture's own line for it, e.g. ``ReturnToService=``);
    ``node_env`` adds variables to the environment of every slurmd (``{node}`` is replaced).
    """

    root: Path
    nodes: list[str]
    node_lines: str = ""
    conf: list[str] = field(default_factory=list)
    node_env: dict[str, str] = field(default_factory=dict)
    ctld_port: int = field(default_factory=free_port)
    node_ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf_path(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def env(self, **extra: str) -> dict[str, str]:
        """Return the environment for Slurm daemons and clients (SLURM_CONF always set)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf_path)
        env["PATH"] = f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        env.update(extra)
        return env

    # Set-up
    def write_conf(self) -> None:
        """Write slurm.conf (and the directories it names)."""
        for sub in ("state", "spool", "log", "run", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            self.node_ports.setdefault(node, free_port())
            (self.root / "spool" / node).mkdir(exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=cidtest", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.node_ports[self.nodes[0]]}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            "CommunicationParameters=NoInAddrAny", "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
            "SchedulerType=sched/builtin", "SchedulerParameters=sched_interval=2", "SelectType=select/linear",
            "ReturnToService=2", "SlurmctldTimeout=30", "SlurmdTimeout=60", "InactiveLimit=0", "KillWait=2",
            "MinJobAge=600", "MailProg=/bin/true", "SlurmctldDebug=info", "SlurmdDebug=info",
        ]
        overridden = {line.split("=", 1)[0].lower() for line in self.conf if "=" in line}
        lines = [line for line in lines if line.split("=", 1)[0].lower() not in overridden] + self.conf
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={self.node_ports[node]} "
                         f"CPUs=1 RealMemory=100 State=UNKNOWN {self.node_lines}".rstrip())
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start_munge(self) -> None:
        """Create a key and start munged on its own socket (its directory mode 0755, as munged requires)."""
        mdir = self.root / "munge"
        mdir.mkdir(parents=True, exist_ok=True)
        mdir.chmod(0o755)
        key = mdir / "munge.key"
        subprocess.run([_which("mungekey"), "--create", "--force", f"--keyfile={key}"], check=True,
                       capture_output=True)
        key.chmod(0o600)
        self.procs["munged"] = subprocess.Popen(
            [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munged.seed",
             "--origin=127.0.0.1", "--num-threads=2"],
            stdout=subprocess.DEVNULL, stderr=open(mdir / "munged.stderr", "ab"), env=self.env())  # noqa: SIM115
        _wait_for(lambda: self.munge_socket.exists(), 10, "munged did not create its socket", self.procs["munged"])

    def start(self) -> Slurm:
        """Start munged, slurmctld and every slurmd; return once every node is idle."""
        require_slurm()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.write_conf()
        self.start_munge()
        self.procs["slurmctld"] = subprocess.Popen(
            [_which("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf_path)],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "log" / "slurmctld.stderr", "ab"),  # noqa: SIM115
            env=self.env(), cwd=self.root)
        _wait_for(lambda: self.run("scontrol", "ping", check=False).returncode == 0, 20,
                  "slurmctld does not answer 'scontrol ping'", self.procs["slurmctld"])
        for node in self.nodes:
            self.start_slurmd(node)
        self.wait_nodes(self.nodes, "idle", 30)
        return self

    def start_slurmd(self, node: str, *, rebooted: bool = False) -> None:
        """Start the slurmd of ``node`` (with -b, it reports that the node has just booted)."""
        env = self.env(**{k: v.replace("{node}", node) for k, v in self.node_env.items()})
        self.procs[f"slurmd-{node}"] = subprocess.Popen(
            [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf_path), *(["-b"] if rebooted else [])],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "log" / f"slurmd-{node}.stderr", "ab"),  # noqa: SIM115
            env=env, cwd=self.root)

    def stop_slurmd(self, node: str) -> None:
        """Stop the slurmd of ``node`` (by its PID) and wait for it."""
        _stop(self.procs.pop(f"slurmd-{node}", None))

    def stop(self) -> None:
        """Stop every process started here, slurmd first, by PID."""
        for name in [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]:
            _stop(self.procs.pop(name, None))

    # Clients
    def run(self, *argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
        """Run a Slurm client (scontrol, sbatch, sinfo...) with SLURM_CONF; return the finished process."""
        result = subprocess.run([_which(argv[0]), *argv[1:]], capture_output=True, text=True, env=self.env(),
                                timeout=timeout, cwd=self.root / "jobs")
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, *args: str) -> str:
        """Submit a batch job; return its id."""
        out = self.run("sbatch", "--parsable", "-o", str(self.root / "jobs" / "%j.out"), *args).stdout
        return out.strip().split(";")[0]

    def show(self, kind: str, name: str) -> dict[str, str]:
        """Return ``scontrol show -o KIND NAME`` as a dict (``kind`` is node or job)."""
        text = self.run("scontrol", "show", "-o", kind, name).stdout.strip()
        return parse_show(text, last="Reason" if kind == "node" else None)

    def node_state(self, node: str) -> str:
        """Return a node's state in lower case, e.g. ``idle``, ``allocated``, ``idle+drain``."""
        return self.show("node", node)["State"].lower()

    def wait_nodes(self, nodes: list[str], state: str, timeout: float) -> None:
        """Return once every node's state starts with ``state``; raise AssertionError otherwise."""
        def ready() -> bool:
            return all(self.node_state(n).startswith(state) for n in nodes)
        _wait_for(ready, timeout, f"nodes {', '.join(nodes)} not {state}")

    def wait_job(self, job: str, states: tuple[str, ...], timeout: float = 60) -> dict[str, str]:
        """Return the job's fields once its JobState is one of ``states``; raise AssertionError otherwise."""
        end = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < end:
            info = self.show("job", job)
            if info.get("JobState") in states:
                return info
            time.sleep(0.2)
        raise AssertionError(f"job {job} not in {states} after {timeout} s: {info}")


_FIELD = re.compile(r"(?:^| )(\w+(?:/\w+)?)=")


def parse_show(text: str, last: str | None = None) -> dict[str, str]:
    """Return the ``Key=Value`` pairs of one ``scontrol show -o`` line.

    A value ends at the next `` Key=``, except the value of ``last`` (a node's ``Reason``, which comes last and
    may hold anything), taken whole.
    """
    reason = None
    if last and f" {last}=" in text:
        text, reason = text.split(f" {last}=", 1)
    matches = list(_FIELD.finditer(text))
    fields = {}
    for match, after in zip(matches, [*matches[1:], None], strict=True):
        end = after.start() if after is not None else len(text)
        fields.setdefault(match.group(1), text[match.end():end].strip())
    if reason is not None:
        fields[str(last)] = reason.strip()
    return fields


def write_shims(bindir: Path) -> Path:
    """Write ``cidcapt`` and ``cid-slurm-helper`` into ``bindir``, running this tree's code; return ``bindir``.

    The rc/ hook scripts find the programs through CID_BIN: the shims make them independent of what the
    virtualenv has installed as console scripts.
    """
    bindir.mkdir(parents=True, exist_ok=True)
    for name, module in (("cidcapt", "cidcapt.main"), ("cid-slurm-helper", "cidcapt.slurm_helper")):
        shim = bindir / name
        shim.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m {module} "$@"\n')
        shim.chmod(0o755)
    return bindir


def write_defaults(path: Path, cluster: Cluster, slurm_conf: Path, bindir: Path, **extra: str) -> Path:
    """Write the /etc/default/cid-slurm of a test (settings of the rc/slurm hooks); return its path."""
    settings = {"SLURM_CONF": str(slurm_conf), "CID_SERVER": cluster.server, "CID_ROLE": "scheduler",
                "CID_TOKEN_FILE": str(cluster.state_dir / "secrets" / "scheduler.token"), "CID_BIN": str(bindir),
                "CID_CA_FILE": str(cluster.ca_file), **extra}
    path.write_text("".join(f"{key}={shlex.quote(value)}\n" for key, value in settings.items()))
    return path


def write_hook(path: Path, script: str, defaults: Path, *args: str) -> Path:
    """Write an executable that runs ``rc/slurm/<script>`` with ``defaults`` as its /etc/default/cid-slurm."""
    extra = "".join(f" {shlex.quote(a)}" for a in args)
    path.write_text(f'#!/bin/sh\nCID_SLURM_DEFAULTS={shlex.quote(str(defaults))} '
                    f'exec {REPO}/rc/slurm/{script}{extra} "$@"\n')
    path.chmod(0o755)
    return path


def capture_ends(cluster: Cluster, job_prefix: str) -> list[tuple[float, dict[str, Any]]]:
    """Return (Unix time, event) of cidd's ``capture.ended`` log events whose job starts with ``job_prefix``."""
    ends = []
    for event in cluster.log_events():
        if event.get("event") == "capture.ended" and str(event.get("job", "")).startswith(job_prefix):
            ends.append((datetime.fromisoformat(event["timestamp"]).timestamp(), event))
    return ends


def captures(cluster: Cluster, job: str | None) -> list[dict[str, Any]]:
    """Return cidd's records of the captures of ``job`` (of every job for None) (``cidcapt --captures --json``),
    oldest first.

    A capture that is over at once (every node already runs the image) has an ``ended`` time here but no
    ``capture.ended`` log event.
    """
    result = cluster.cidcapt("--captures", "--json")
    assert result.returncode == 0, result.stderr
    return sorted((c for c in json.loads(result.stdout) if job is None or c["job"] == job),
                  key=lambda c: c["created"])


def job_transitions(cluster: Cluster, job: str) -> list[tuple[str, str, str]]:
    """Return cidd's history rows (node, from, to) of the capture ``job``."""
    with sqlite3.connect(cluster.db) as db:
        return db.execute("SELECT node, from_state, to_state FROM events WHERE job = ? ORDER BY id",
                          (job,)).fetchall()


def _wait_for(predicate: Any, timeout: float, message: str, proc: subprocess.Popen | None = None) -> None:
    """Return once ``predicate()`` is true; raise AssertionError(message) on timeout or if ``proc`` died."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{message}: the process exited with {proc.returncode}")
        time.sleep(0.1)
    raise AssertionError(f"{message} (after {timeout} s)")


def _stop(proc: subprocess.Popen | None) -> None:
    """Stop one process by PID: SIGTERM, then SIGKILL after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
