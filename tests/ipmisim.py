"""A real BMC on loopback for tests: OpenIPMI's ``ipmi_sim`` with a generated lan.conf, .emu and chassis script.

``IpmiSim(root)`` writes ``lan.conf`` (one LAN channel on ``127.0.0.1:port``, one admin user), a 4-line ``.emu``
and a ``chassis_control`` shell script whose power state lives in the file ``root/power`` (``1`` or ``0``) and
whose boot device lives in ``root/boot``; ``start()`` runs ``ipmi_sim`` and waits until it answers, ``stop()``
ends it by PID. Missing programs make ``start()`` call ``pytest.fail`` with a message saying ``make test``
installs them (Debian packages ``openipmi`` and ``ipmitool``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

USER = "admin"
PASSWORD = "s3cret-pw"
MISSING = "{program} is not installed; 'make test' installs it (Debian packages openipmi and ipmitool)"

CHASSIS_SCRIPT = """#!/bin/sh
# ipmi_sim chassis_control program: $1 is the MC name, then "get ITEM..." or "set ITEM VALUE...".
dir="$(dirname "$0")"
name="$1"; shift
op="$1"; shift
echo "$op $*" >> "$dir/calls"
[ -s "$dir/delay" ] && sleep "$(cat "$dir/delay")"
if [ "$op" = get ]; then
    out=""
    for item in "$@"; do
        case "$item" in
            power) out="$out power:$(cat "$dir/power")" ;;
            boot) out="$out boot:$(cat "$dir/boot")" ;;
        esac
    done
    echo $out
    exit 0
fi
while [ $# -ge 2 ]; do
    case "$1" in
        power) echo "$2" > "$dir/power" ;;
        reset) echo 1 > "$dir/power"; echo reset >> "$dir/resets" ;;
        boot) echo "$2" > "$dir/boot" ;;
    esac
    shift 2
done
exit 0
"""

LAN_CONF = """name "{name}"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "{script} 0x20"
  user 1 true  ""        "test"      user  10 none md2 md5 straight
  user 2 true  "{user}" "{password}" admin 10 none md2 md5 straight
"""

EMU = """mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
"""


def require(program: str) -> str:
    """Return the path of ``program``; fail the test (saying ``make test`` installs it) when it is missing."""
    path = shutil.which(program)
    if path is None:
        pytest.fail(MISSING.format(program=program), pytrace=False)
    return path


def free_udp_port() -> int:
    """Return a UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class IpmiSim:
    """One ``ipmi_sim`` process under ``root`` answering IPMI 2.0 LAN on ``127.0.0.1:port``."""

    root: Path
    port: int = field(default_factory=free_udp_port)
    user: str = USER
    password: str = PASSWORD
    name: str = "cidtest"
    sol: str | None = None  # SOL device of the MC, e.g. "tcp:127.0.0.1:PORT" (ipmi_sim connects to it)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """Return ``127.0.0.1:port``, the BMC address as cidd's inventory gives it."""
        return f"127.0.0.1:{self.port}"

    @property
    def power(self) -> str:
        """Return the chassis power as the chassis script holds it: ``on`` or ``off``."""
        return "on" if (self.root / "power").read_text().strip() == "1" else "off"

    @power.setter
    def power(self, value: str) -> None:
        (self.root / "power").write_text("1\n" if value == "on" else "0\n")

    @property
    def boot(self) -> str:
        """Return the last boot device the chassis script was told (``pxe``, ``default``, ...)."""
        return (self.root / "boot").read_text().strip()

    def calls(self) -> list[str]:
        """Return the chassis script's calls so far (``get power``, ``set power 0``, ...)."""
        path = self.root / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def start(self, timeout: float = 10.0) -> IpmiSim:
        """Write the configuration, start ``ipmi_sim`` and return self once it answers ``ipmitool``."""
        program = require("ipmi_sim")
        require("ipmitool")
        self.root.mkdir(parents=True, exist_ok=True)
        state = self.root / "state"
        state.mkdir(exist_ok=True)
        script = self.root / "chassis.sh"
        script.write_text(CHASSIS_SCRIPT)
        script.chmod(0o755)
        self.power = "off"
        (self.root / "boot").write_text("default\n")
        conf = self.root / "lan.conf"
        text = LAN_CONF.format(name=self.name, port=self.port, script=script, user=self.user, password=self.password)
        if self.sol:
            text += f'  sol "{self.sol}" 115200\n'
        conf.write_text(text)
        emu = self.root / "sim.emu"
        emu.write_text(EMU)
        log = (self.root / "ipmi_sim.log").open("wb")
        self.process = subprocess.Popen([program, "-c", str(conf), "-f", str(emu), "-s", str(state), "-n"],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"ipmi_sim exited with {self.process.returncode}: "
                                   f"{(self.root / 'ipmi_sim.log').read_text()[-2000:]}")
            result = self.ipmitool("chassis", "power", "status", check=False, timeout=3)
            if result.returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"ipmi_sim on {self.address} did not answer within {timeout} s")

    def ipmitool(self, *args: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """Run ``ipmitool -I lanplus -C 3`` against this BMC; return the completed process."""
        return run_ipmitool(self.port, self.user, self.password, *args, check=check, timeout=timeout)

    def stop(self) -> None:
        """Stop ``ipmi_sim`` by PID (TERM, then KILL after 5 s)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)


def run_ipmitool(port: int, user: str, password: str, *args: str, check: bool = True,
                 timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run ``ipmitool -I lanplus -C 3 -H 127.0.0.1 -p PORT -U USER -P PASSWORD ARGS``; return the result.

    Raises subprocess.CalledProcessError (with ``check``) or subprocess.TimeoutExpired.
    """
    program = require("ipmitool")
    return subprocess.run([program, "-I", "lanplus", "-C", "3", "-N", "1", "-R", "2", "-H", "127.0.0.1",
                           "-p", str(port), "-U", user, "-P", password, *args],
                          capture_output=True, text=True, check=check, timeout=timeout)
