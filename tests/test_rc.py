"""The shipped service files and example configuration stay consistent with the code."""

from __future__ import annotations

import configparser
from pathlib import Path

from cidd.config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_example_config_parses_with_its_inventory() -> None:
    config = load_config(REPO / "rc" / "cidd.yaml.example")
    assert len(config.inventory()) == 128 and config.auto_register is False
    assert config.listen_port == 38008


def test_units_start_console_scripts_that_setup_cfg_installs() -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    scripts = {line.split("=")[0].strip() for line in setup["options.entry_points"]["console_scripts"].splitlines()
               if line.strip()}
    for unit in ("cidd.service", "cidkid.service"):
        text = (REPO / "rc" / unit).read_text()
        exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
        program = Path(exec_start.split("=", 1)[1].split()[0]).name
        assert program in scripts, f"{unit} starts {program}, which setup.cfg does not install"


def test_systemd_accepts_the_units(tmp_path) -> None:
    import shutil
    import subprocess

    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install Debian's systemd (make test does it)"
    for unit in ("cidd.service", "cidkid.service"):
        text = (REPO / "rc" / unit).read_text().replace("/usr/local/bin/cidd ", "/bin/true ")
        text = text.replace("/usr/local/bin/cidkid ", "/bin/true ")
        (tmp_path / unit).write_text(text)
        result = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True)
        assert result.returncode == 0 and not result.stderr.strip(), f"{unit}: {result.stderr}"


def test_bare_cidd_creates_private_tokens_and_serves(tmp_path) -> None:
    import signal
    import stat
    import subprocess
    import sys

    from tests.procs import _env, free_port, wait_port

    port = free_port()
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "cidd.main", "--listen", f"127.0.0.1:{port}"],
                            env=_env(state), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_port(port)
        assert stat.S_IMODE((state / "secrets").stat().st_mode) == 0o700
        for role in ("agent", "admin", "scheduler", "reader"):
            token = state / "secrets" / f"{role}.token"
            assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) >= 40
        status = subprocess.run([sys.executable, "-m", "cidcapt.main", "--server", f"127.0.0.1:{port}", "--status"],
                                env=_env(state), capture_output=True, text=True)
        assert status.returncode == 0, status.stderr
        assert (state / "cidd.sqlite").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    for role in ("agent", "admin"):
        assert (state / "secrets" / f"{role}.token").read_text() not in proc.stderr.read()  # no secret in logs
