"""`make demo`: cidd on its SQLite defaults, 16 simulated nodes, two switches with cidcapt, then stop.

Every command is printed before it runs, so the demo doubles as a walk-through. State lives in .demo/
(removed at the start of each run). Exits 0 only when every step gave the expected exit code.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cidsim import placeholder_images

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / ".demo"
PY = sys.executable


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1 (38008 itself may be taken by a real cidd)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def show(argv: list[str]) -> None:
    """Print a command as a person would type it."""
    names = {PY: "python"}
    print("\n$ " + " ".join(shlex.quote(names.get(a, a)) for a in argv), flush=True)


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Return once cidd accepts connections; raise SystemExit with the reason from cidd's log when it exited or
    did not start within ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    lines = (DEMO / "cidd.log").read_text(errors="replace").splitlines()
    reason = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "no log")
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"did not start within {timeout:g}s"
    raise SystemExit(f"demo: cidd {state}: {reason}\n(whole log: {DEMO / 'cidd.log'})")


def run(argv: list[str], env: dict[str, str], expect: int = 0) -> None:
    """Run a cidcapt step in the foreground (its progress goes to the terminal); check its exit code."""
    show(argv)
    code = subprocess.run(argv, env=env).returncode
    print(f"(exit code {code})", flush=True)
    if code != expect:
        raise SystemExit(f"demo: expected exit code {expect}, got {code}; logs are in {DEMO}")


def main() -> int:
    """Run the demo; return 0 when every step behaved."""
    subprocess.run(["rm", "-rf", str(DEMO)], check=True)
    DEMO.mkdir()
    port = free_port()
    server = f"127.0.0.1:{port}"
    env = {**os.environ, "CID_STATE_DIR": str(DEMO / "state"), "CID_SERVER": server}
    procs: list[subprocess.Popen] = []
    started = time.monotonic()
    try:
        print("== cid demo: one cidd, 16 simulated nodes, two image switches ==")
        placeholder_images(REPO / "images.yaml", DEMO / "state" / "images")  # the simulated images' files
        config = DEMO / "cidd.yaml"  # free ports, so that the demo runs beside a real cidd or another demo
        config.write_text(yaml.safe_dump({"state_dir": str(DEMO / "state"), "catalog": str(REPO / "images.yaml"),
                                          "listen": {"host": "127.0.0.1", "port": port},
                                          "http": {"host": "127.0.0.1", "port": free_port()}}))
        cidd = [PY, "-m", "cidd.main", "--config", str(config)]
        show(cidd + [f"2> {DEMO / 'cidd.log'}", "&"])
        with open(DEMO / "cidd.log", "wb") as log:
            procs.append(subprocess.Popen(cidd, env=env, stderr=log, stdout=log))
        wait_port(port, procs[-1])
        fleet = [PY, "-m", "cidsim.main", "node[01-16]", "--sim-dir", str(DEMO / "sim"),
                 "--reboot-delay", "1", "--install-time", "2"]
        show(fleet + [f"2> {DEMO / 'fleet.log'}", "&"])
        with open(DEMO / "fleet.log", "wb") as log:
            procs.append(subprocess.Popen(fleet, env=env, stderr=log, stdout=log))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = subprocess.run([PY, "-m", "cidcapt.main", "--status"], env=env, capture_output=True, text=True)
            if out.stdout.count("ready") >= 16:
                break
            time.sleep(0.3)
        run([PY, "-m", "cidcapt.main", "--status"], env)
        print("\n-- 1. the scheduler's prolog asks for debian-12-1 on all 16 nodes --")
        run([PY, "-m", "cidcapt.main", "-j", "1001", "-n", "node[01-16]", "-i", "debian-12-1"], env)
        print("\n-- 2. a second job wants rocky-9-3 on half of them --")
        run([PY, "-m", "cidcapt.main", "-j", "1002", "-n", "node[01-08]", "-i", "rocky-9-3"], env)
        print("\n-- 3. the prolog is retried: nodes already run the image, it returns at once --")
        run([PY, "-m", "cidcapt.main", "-j", "1002", "-n", "node[01-08]", "-i", "rocky-9-3", "--quiet"], env)
        print("\n-- 4. an image that is not in the catalog: refused, nothing started --")
        run([PY, "-m", "cidcapt.main", "-j", "1003", "-n", "node[09-16]", "-i", "rocky-10-1"], env, expect=2)
        print("\n-- summary --")
        run([PY, "-m", "cidcapt.main", "--status"], env)
        run([PY, "-m", "cidcapt.main", "--captures"], env)
        print(f"\ndemo finished in {time.monotonic() - started:.1f}s; cidd's log: {DEMO / 'cidd.log'}")
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        print("stopped cidd and the simulated fleet", flush=True)


if __name__ == "__main__":
    sys.exit(main())
