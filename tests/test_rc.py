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
