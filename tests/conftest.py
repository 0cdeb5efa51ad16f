"""Suite-wide rules.

In CI (``CI=true``) a test never skips: a skip there would hide that the real path (root, a loop device, a
mount, a tool such as qemu or debootstrap) was never exercised, so it is reported as a failure naming what was
missing. The only exception is a test marked ``machine_safety``, whose skip protects the machine itself (e.g.
efibootmgr on a machine with real EFI variables).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

# sushy (the Redfish client) builds its resource classes by walking dir() of its field classes, which derive from
# collections.abc.Mapping. Once zope.interface.common.collections has declared interfaces on the collections.abc
# classes (twisted.internet.testing imports it, and tests import that), the walk meets '__provides__' and fails.
# cidd never imports twisted.internet.testing; the tests import sushy first, as cidd effectively does.
import sushy.resources.system.system  # noqa: E402, F401


def in_ci() -> bool:
    """Return whether this run is CI's (``CI=true``)."""
    return os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """Turn a skip into a failure in CI, with the skip's reason, unless the test is marked machine_safety."""
    outcome = yield
    report = outcome.get_result()
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker("machine_safety") is not None:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"in CI a test must not skip (CI=true): {reason}. Install or enable what is missing "
                       "through the project's own files (Makefile TEST_DEBS, setup.cfg), or run as root.")
