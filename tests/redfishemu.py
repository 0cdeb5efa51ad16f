"""A real Redfish service for tests: sushy-tools' sushy-emulator with its fake driver, through cidsim.redfish_emulator.

One process per ``RedfishEmulator``, HTTPS on 127.0.0.1 with a certificate signed by a test CA made here (or an
untrusted one), started and stopped by PID. ``journal()`` is what the BMC recorded (one entry per request),
``system(name)`` its state as the emulator reports it (a GET with its own credentials, outside the journal's
sessions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from cidd.pki import cert_pem, create_ca, issue, key_pem
from tests.procs import REPO, free_port, wait_port

USER, PASSWORD = "cidredfish", "r3dfish-s3cret"


@dataclass(frozen=True)
class BmcPki:
    """A CA cidd trusts (``ca``) and the emulator's certificate signed by it, plus an unrelated CA's."""

    ca: Path
    cert: Path
    key: Path
    rogue_cert: Path  # signed by a CA nobody configured
    rogue_key: Path


def make_pki(root: Path) -> BmcPki:
    """Write a test CA and certificates for 127.0.0.1 under ``root``; return their paths."""
    root.mkdir(parents=True, exist_ok=True)
    ca_key, ca = create_ca("cid test BMC CA")
    key, cert = issue(ca_key, ca, "bmc", sans=["127.0.0.1", "localhost"], server=True)
    rogue_ca_key, rogue_ca = create_ca("some other CA")
    rogue_key, rogue = issue(rogue_ca_key, rogue_ca, "bmc", sans=["127.0.0.1"], server=True)
    paths = BmcPki(root / "ca.pem", root / "bmc.pem", root / "bmc.key", root / "rogue.pem", root / "rogue.key")
    paths.ca.write_bytes(cert_pem(ca))
    paths.cert.write_bytes(cert_pem(cert))
    paths.key.write_bytes(key_pem(key))
    paths.rogue_cert.write_bytes(cert_pem(rogue))
    paths.rogue_key.write_bytes(key_pem(rogue_key))
    return paths


def write_credentials(path: Path, user: str = USER, password: str = PASSWORD) -> Path:
    """Write ``user:password`` to ``path`` with mode 0600; return it."""
    path.write_text(f"{user}:{password}\n")
    path.chmod(0o600)
    return path


@dataclass
class RedfishEmulator:
    """One sushy-emulator process serving the fake systems ``systems`` (a hostlist) on 127.0.0.1."""

    root: Path
    systems: str
    pki: BmcPki
    rogue: bool = False  # serve the certificate of the CA nobody trusts
    extra: list[str] = field(default_factory=list)  # --broken, --stall, --notify, --power-delay, ...
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def journal_path(self) -> Path:
        return self.root / "journal.jsonl"

    @property
    def log_path(self) -> Path:
        return self.root / "emulator.log"

    def address(self, name: str = "{name}") -> str:
        """Return the BMC address of system ``name`` (default: the pattern cidd expands per node)."""
        return f"{self.url}/redfish/v1/Systems/{name}"

    def start(self) -> RedfishEmulator:
        """Start the emulator and wait until it accepts connections; raise with its log otherwise."""
        self.root.mkdir(parents=True, exist_ok=True)
        users = write_credentials(self.root / "users")
        cert, key = (self.pki.rogue_cert, self.pki.rogue_key) if self.rogue else (self.pki.cert, self.pki.key)
        cmd = [sys.executable, "-m", "cidsim.redfish_emulator", "--port", str(self.port), "--cert", str(cert),
               "--key", str(key), "--users", str(users), "--systems", self.systems,
               "--journal", str(self.journal_path), "--state-dir", str(self.root / "state"), *self.extra]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        try:
            wait_port(self.port, timeout=30)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"sushy-emulator did not start:\n{self.log_path.read_text()[-3000:]}") from None
        return self

    def stop(self) -> None:
        """Stop the emulator (SIGTERM, then SIGKILL) by its PID."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def journal(self) -> list[dict[str, Any]]:
        """Return every request the emulator recorded, in order."""
        if not self.journal_path.exists():
            return []
        return [json.loads(line) for line in self.journal_path.read_text().splitlines() if line.strip()]

    def system(self, name: str) -> dict[str, Any]:
        """Return the emulator's view of system ``name`` (GET with basic auth, trusting the test CA)."""
        response = requests.get(f"{self.address(name)}", auth=(USER, PASSWORD), timeout=10,
                                verify=str(self.pki.ca) if not self.rogue else False)
        response.raise_for_status()
        return response.json()

    def wait_power(self, name: str, state: str, timeout: float = 15.0) -> dict[str, Any]:
        """Return the system once its PowerState is ``state`` (``On``/``Off``); raise AssertionError otherwise."""
        end = time.monotonic() + timeout
        while True:
            system = self.system(name)
            if system.get("PowerState") == state:
                return system
            if time.monotonic() > end:
                raise AssertionError(f"{name} is {system.get('PowerState')}, not {state}, after {timeout} s")
            time.sleep(0.2)
