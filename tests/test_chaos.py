"""bench/chaos.py at a smaller size, as part of make test: captures through kill -9 of cidd (once for longer
than cidcapt's connect timeout), a fleet process killed mid-switch, hung reboots and dead BMCs; every invariant
is checked from cidd's history and from what the agents logged and wrote (see the bench's docstring)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import chaos  # noqa: E402

pytestmark = pytest.mark.slow


def test_captures_keep_every_promise_through_injected_faults(capsys: pytest.CaptureFixture[str]) -> None:
    code = chaos.main(["--nodes", "60", "--fleets", "3", "--captures", "3", "--hang-pct", "10",
                       "--rung-timeout", "15", "--capture-timeout", "200", "--seed", "11"])
    out = capsys.readouterr().out
    assert "down=6.0s" in out, "the seed must include a cidd restart longer than the connect timeout"
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "chaos_captures=3 violations=0 seed=11"
