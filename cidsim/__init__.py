"""cidsim: simulators and test doubles, for the test suite, the benchmarks and ``make demo`` only.

``fleet`` is a simulated node fleet (fake disks, reboots and installs, real agent sessions), ``bmc`` simulated
IPMI BMCs, ``main`` the ``cid-simfleet`` command, ``agent_doubles`` and ``fake_cidd`` doubles for unit tests.
No product package imports cidsim (``make lint`` checks it) and blancmange never copies it into an installer.
"""

from pathlib import Path

import yaml


def placeholder_images(catalog: Path, image_dir: Path) -> list[Path]:
    """Create a sparse placeholder file in ``image_dir`` for every entry of ``catalog`` whose file is missing
    (of the entry's size, else 1 MiB), so that cidd offers the simulated images; return the files created.

    Simulated nodes never download an image; real installers would refuse a placeholder (its sha256 differs).
    """
    data = yaml.safe_load(catalog.read_text()) or {}
    made = []
    for entry in data.get("images") or []:
        path = image_dir / str(entry["file"])
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                handle.truncate(int(entry.get("size") or 1 << 20))
            made.append(path)
    return made
