"""The README's "Running it for real" block, run as written on one machine (issue 12).

tests/test_packages.py builds the Debian packages and installs them with apt into a clean debootstrap'd Debian
root; its test ``test_readme_running_it_for_real_switches_a_node`` hands that root to ``run_readme`` here, which
reads the shell block of README.md's "Running it for real" section and runs its commands in order, each with
``bash -c`` in the root (``chroot``), in a network namespace of its own (so 38008 and 38080 are free, and nothing
leaves the machine). The head node is its own node: node001, whose "disk" is the directory /srv/node001.

Only the rules below adapt what cannot run as written on one machine; every other command runs exactly as the
README has it. Every rule must be used (a README change that makes one useless fails the test, so the table stays
as small as the README allows):

README text → what runs instead (why):

1. ``make deb`` → nothing (the fixture ran packaging/build-debs.sh, what ``make deb`` runs, once per run).
2. ``apt install ./build/deb/...`` → nothing (the fixture installed the same .debs with ``apt-get install``).
3. ``apt install ./cid-node_*.deb`` → nothing (the node is the head node: cid-node is installed).
4. ``cp /etc/cid/cidd.yaml.example /etc/cid/cidd.yaml`` → as written, then the edit it asks for: ``10.0.0.1`` →
   ``127.0.0.1`` (one machine has no provisioning network).
5. ``systemctl enable --now cidd`` → the unit's ExecStart, ``cidd --config /etc/cid/cidd.yaml`` with its
   CID_STATE_DIR, in the background, until it sends READY=1 to $NOTIFY_SOCKET (no systemd in a chroot).
6. In the ``cidkid`` lines: ``/etc/cid/`` → ``/srv/node001/etc/cid/``, ``/proc/cmdline`` →
   ``/srv/node001.cmdline``, ``--install-device /dev/sda1`` → ``--target /srv/node001`` (node001's root file
   system is a directory; its firmware writes its kernel command line).
7. The ``cidkid`` lines get ``--reboot-command`` (the node's firmware, below); the system agent also
   ``--node node001 --marker /srv/node001/etc/cid-image`` (the head node's host name is not node001; the marker
   is on node001's "disk").
8. ``'node[001-016]'`` → ``node001`` (one node).

The node's firmware: the system agent line starts when the README reaches it; the installer line starts only when
cidd reboots node001 into the installer. The reboot command appends ``$CID_BOOT`` to /srv/node001.boots and ends
the agent (``kill -TERM $PPID``, as tests/test_image_path.py); the test then "boots" the next agent: the installer
line (its kernel command line ``cid.server=head:38008 cid.node=node001``, what cidd's boot script would give, the
one-time token aside: on the head node the installer derives node001's token from the master secret), or, from
the disk, the system agent line again, which now reads the marker, the CA and the token the install left there.

Set-up that is not a README command (a real site has it): the name ``head`` resolves to 127.0.0.1 (/etc/hosts of
the root); /srv/chroots/deb12 is a tiny tree (a few files) instead of a Debian chroot; /srv/node001 holds the
system node001 ran before the switch, set up as docs/install.md section 2 says (its /etc/cid/ca.pem and the token
from ``cidd agent-token node001``); the test waits for node001 to be online before going on (an administrator
would look at ``cidcapt --status``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Running it for real"
NODE = "node001"
NODE_ROOT = f"/srv/{NODE}"
CMDLINE = f"/srv/{NODE}.cmdline"
BOOTS = f"/srv/{NODE}.boots"
REBOOT = f"echo $CID_BOOT >> {BOOTS}; kill -TERM $PPID"
IMAGE_TREE = "/srv/chroots/deb12"
NOTIFY = "/run/cidd-notify.sock"

# The substitution table of the docstring, as data. Commands starting with one of these keys:
SKIPPED = {
    "make deb": "the fixture ran packaging/build-debs.sh",
    "apt install ./build/deb/": "the fixture installed these .debs with apt-get install",
    "apt install ./cid-node_": "the node is the head node: cid-node is installed",
}
EDITS = {"cp /etc/cid/cidd.yaml.example /etc/cid/cidd.yaml": r"sed -i 's/10\.0\.0\.1/127.0.0.1/g' /etc/cid/cidd.yaml"}
SERVICES = {"systemctl enable --now cidd": (["cidd", "--config", "/etc/cid/cidd.yaml"],
                                           {"CID_STATE_DIR": "/var/lib/cid"})}
# Text replaced in the cidkid lines (node001's root file system is NODE_ROOT), and in every line:
NODE_TEXT = {"/etc/cid/": f"{NODE_ROOT}/etc/cid/", "/proc/cmdline": CMDLINE,
             "--install-device /dev/sda1": f"--target {NODE_ROOT}"}
TEXT = {"'node[001-016]'": NODE}
NODE_ADDED = {"system": ["--node", NODE, "--marker", f"{NODE_ROOT}/etc/cid-image", "--reboot-command", REBOOT],
              "installer": ["--reboot-command", REBOOT]}


def readme_commands(text: str) -> list[str]:
    """Return the commands of the section's first ``sh`` block: continuation lines joined, comment lines left out."""
    assert SECTION in text, f"README.md has no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found, f"README.md's '{SECTION}' section has no ```sh block"
    joined = re.sub(r"\s*\\\n\s*", " ", found.group(1))
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def node_argv(line: str, used: set[str]) -> tuple[str, list[str]]:
    """Return (mode, argv) of a README cidkid line, adapted by NODE_TEXT and NODE_ADDED."""
    for old, new in NODE_TEXT.items():
        if old in line:
            used.add(old)
            line = line.replace(old, new)
    argv = shlex.split(line, comments=True)
    mode = argv[argv.index("--mode") + 1] if "--mode" in argv else "system"
    return mode, argv + NODE_ADDED[mode]


@dataclass
class Step:
    """One README command and what the test ran for it."""

    readme: str
    ran: str
    returncode: int | None = None
    seconds: float = 0.0
    output: str = ""


@dataclass
class Machine:
    """The clean root, entered in a network namespace of its own."""

    root: Path
    env: Mapping[str, str]
    logs: Path
    netns: subprocess.Popen[bytes] | None = None
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        """Create the network namespace (kept by a sleeping process) with its loopback up."""
        self.netns = subprocess.Popen(["unshare", "--net", "sleep", "3600"], env=dict(self.env))
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.netns.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "unshare --net made no network namespace"
            time.sleep(0.05)
        subprocess.run(self.enter(["ip", "link", "set", "lo", "up"], chroot=False), check=True, env=dict(self.env))

    def enter(self, argv: list[str], chroot: bool = True) -> list[str]:
        assert self.netns is not None
        return ["nsenter", f"--net=/proc/{self.netns.pid}/ns/net",
                *(["chroot", str(self.root)] if chroot else []), *argv]

    def popen(self, argv: list[str], log: str, extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the root, in the background, its output appended to ``log`` (under ``logs``)."""
        with open(self.logs / log, "ab") as out:
            proc = subprocess.Popen(self.enter(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={**self.env, **(extra_env or {})})
        self.daemons.append(proc)
        return proc

    def sh(self, script: str, timeout: float = 120, while_waiting: Callable[[], None] | None = None,
           ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with bash in the root; call ``while_waiting`` every 0.1 s until it ends."""
        out = self.logs / "sh.out"
        with open(out, "wb") as handle:  # a file, not a pipe: nobody reads a pipe while waiting
            proc = subprocess.Popen(self.enter(["/bin/bash", "-c", script]), stdin=subprocess.DEVNULL,
                                    stdout=handle, stderr=subprocess.STDOUT, env=dict(self.env))
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if while_waiting is not None:
                    while_waiting()
                if time.monotonic() > deadline:
                    raise AssertionError(f"'{script}' still running after {timeout} s")
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        return subprocess.CompletedProcess(script, proc.returncode, out.read_text(errors="replace"), "")

    def stop(self) -> None:
        """Stop every process started here (SIGTERM, then SIGKILL after 10 s), the namespace last."""
        for proc in [*reversed(self.daemons), *([self.netns] if self.netns else [])]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


@dataclass
class Firmware:
    """node001's firmware: boots the agent cidd's last reboot asked for, once the running one has ended."""

    machine: Machine
    system: list[str] | None = None
    installer: list[str] | None = None
    agent: subprocess.Popen[bytes] | None = None
    boots: list[str] = field(default_factory=list)

    def power_on(self) -> None:
        assert self.system is not None
        self.agent = self.machine.popen(self.system, f"{NODE}.log")

    def step(self) -> None:
        """Boot the next agent when the running one ended after a reboot; fail when it ended without one."""
        if self.agent is None or self.agent.poll() is None:
            return
        boots = self.machine.root / BOOTS.lstrip("/")
        asked = boots.read_text().split() if boots.exists() else []
        log = (self.machine.logs / f"{NODE}.log").read_text(errors="replace")[-3000:]
        assert len(asked) > len(self.boots), f"{NODE}'s agent exited {self.agent.returncode} without a reboot:\n{log}"
        boot = asked[len(self.boots)]
        self.boots.append(boot)
        if boot == "installer":
            assert self.installer is not None, "cidd rebooted node001 into the installer before the README named it"
            (self.machine.root / CMDLINE.lstrip("/")).write_text(f"cid.server=head:38008 cid.node={NODE}\n")
            self.agent = self.machine.popen(self.installer, f"{NODE}.log")
        else:
            assert boot == "disk", f"unknown boot {boot!r}"
            self.agent = self.machine.popen(self.system or [], f"{NODE}.log")


def wait_ready(notify: socket.socket, cidd: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Return once cidd sent READY=1 (what ``systemctl enable --now`` waits for with Type=notify)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert cidd.poll() is None, f"cidd exited {cidd.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
        try:
            if b"READY=1" in notify.recv(4096):
                return
        except TimeoutError:
            pass
    raise AssertionError(f"cidd sent no READY=1 in {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


def node_status(machine: Machine) -> dict[str, object]:
    """Return node001's row of ``cidcapt --status --json`` (cidd found through /etc/cid/cidd.yaml)."""
    done = machine.sh(f"cidcapt --status {NODE} --json", timeout=60)
    assert done.returncode == 0, done.stdout
    rows = json.loads(done.stdout)
    return next(row for row in rows if row["node"] == NODE)


def prepare(machine: Machine) -> None:
    """The set-up that is no README command: the head's name, the tiny image tree."""
    hosts = machine.root / "etc" / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n127.0.0.1\thead\n")
    tree = machine.root / IMAGE_TREE.lstrip("/")
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("deb12\n")
    (tree / "etc" / "os-release").write_text('PRETTY_NAME="a tiny tree standing for Debian 12"\n')
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "hello").write_text("#!/bin/sh\necho hello from debian-12-1\n")
    (tree / "usr" / "bin" / "hello").chmod(0o755)


def node_before_the_switch(machine: Machine) -> None:
    """node001's disk before the switch: installed as docs/install.md section 2 says, with no cid image yet."""
    done = machine.sh(f"install -d -m 700 {NODE_ROOT}/etc/cid && "
                      f"install -m 644 /var/lib/cid/tls/ca.pem {NODE_ROOT}/etc/cid/ca.pem && "
                      f"cidd agent-token {NODE} --out {NODE_ROOT}/etc/cid/agent.token")
    assert done.returncode == 0, done.stdout


def run_readme(root: Path, env: Mapping[str, str], logs: Path, readme: Path = REPO / "README.md") -> list[Step]:
    """Run the README block in ``root`` as the docstring says; return the steps (every one succeeded)."""
    commands = readme_commands(readme.read_text(encoding="utf-8"))
    machine = Machine(root, env, logs)
    firmware = Firmware(machine)
    steps: list[Step] = []
    used: set[str] = set()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(root / NOTIFY.lstrip("/")))
    notify.settimeout(0.5)

    def transcript() -> str:
        return "\n".join(f"$ {s.readme}\n  ran: {s.ran} -> {s.returncode} in {s.seconds:.1f} s"
                         + (f"\n  {s.output.strip()[-1500:]}" if s.output.strip() else "") for s in steps)

    prepare(machine)
    machine.start()
    try:
        for readme_line in commands:
            started = time.monotonic()
            line = readme_line
            for old, new in TEXT.items():
                if old in line:
                    used.add(old)
                    line = line.replace(old, new)
            step = Step(readme_line, line)
            steps.append(step)
            skipped = next((key for key in SKIPPED if line.startswith(key)), None)
            service = next((key for key in SERVICES if line.startswith(key)), None)
            if skipped:
                used.add(skipped)
                step.ran, step.returncode = f"nothing: {SKIPPED[skipped]}", 0
            elif service:
                used.add(service)
                argv, extra = SERVICES[service]
                step.ran = f"{shlex.join(argv)} & (until READY=1)"
                cidd = machine.popen(argv, "cidd.log", {**extra, "NOTIFY_SOCKET": NOTIFY})
                wait_ready(notify, cidd, logs / "cidd.log")
                step.returncode = 0
            elif line.startswith("cidkid "):
                mode, argv = node_argv(line, used)
                step.ran = shlex.join(argv)
                if mode == "installer":  # the firmware starts it when cidd reboots the node into the installer
                    firmware.installer = argv
                    step.ran = f"when {NODE} boots the installer: {step.ran}"
                else:
                    firmware.system = argv
                    node_before_the_switch(machine)
                    firmware.power_on()
                    deadline = time.monotonic() + 30
                    while not node_status(machine).get("online"):
                        firmware.step()
                        assert time.monotonic() < deadline, f"{NODE} not online in 30 s\n{transcript()}"
                        time.sleep(0.2)
                step.returncode = 0
            else:
                done = machine.sh(line, while_waiting=firmware.step)
                step.returncode, step.output = done.returncode, done.stdout
                assert done.returncode == 0, f"README command failed:\n{transcript()}\n\nlogs in {logs}"
                edit = next((key for key in EDITS if line.startswith(key)), None)
                if edit:
                    used.add(edit)
                    edited = machine.sh(EDITS[edit])
                    assert edited.returncode == 0, edited.stdout
                    step.ran += f" && {EDITS[edit]}"
            step.seconds = time.monotonic() - started
        unused = {*SKIPPED, *EDITS, *SERVICES, *NODE_TEXT, *TEXT} - used
        assert not unused, f"substitution rules the README no longer needs (remove them): {sorted(unused)}"
        assert firmware.boots == ["installer", "disk"], f"{NODE} booted {firmware.boots}\n{transcript()}"
        status = node_status(machine)
        assert (status["state"], status["image"], status["online"]) == ("ready", "debian-12-1", True), status
        print(transcript())
        return steps
    finally:
        machine.stop()
        notify.close()
        (root / NOTIFY.lstrip("/")).unlink(missing_ok=True)
        # The clients of the module's other tests would find cidd through this file: leave the root as it was.
        (root / "etc/cid/cidd.yaml").unlink(missing_ok=True)
