"""The blancmange configuration file (``top_config.yaml``): what goes into the installer. Pure parsing."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cidcommon.errors import CidError

KEYS = {"suite", "kernel_package", "packages", "python_modules", "modules", "strip", "ssh_keys", "ca", "files",
        "compression_level"}


#: Seconds the Debian mirror has to answer before debootstrap runs (``blancmange --mirror-timeout``).
MIRROR_TIMEOUT = 15.0


class BlancmangeError(CidError):
    """A build that cannot go on: bad configuration, a failing tool; the message says what to fix."""

    code = "blancmange"


class MirrorUnreachable(BlancmangeError):
    """The Debian mirror refused, did not answer within the probe's timeout, or has no release of the suite;
    the message names the mirror and what to check."""

    code = "blancmange_mirror"


@dataclass(frozen=True)
class BuildConfig:
    """One blancmange configuration; relative paths are resolved against ``base`` (the file's directory)."""

    base: Path
    suite: str = "bookworm"
    kernel_package: str = "linux-image-amd64"
    packages: tuple[str, ...] = ()
    python_modules: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    strip: tuple[str, ...] = ()
    ssh_keys: tuple[str, ...] = ()
    ca: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    compression_level: int = 12
    #: Not keys of the file (it names no host): the command line's --mirror (None: the apt sources' mirror)
    #: and --mirror-timeout.
    mirror: str | None = None
    mirror_timeout: float = MIRROR_TIMEOUT

    def tree_key(self) -> str:
        """Return the cache key of the debootstrap tree: a hash of the suite and the sorted package list."""
        text = json.dumps({"suite": self.suite, "packages": sorted(self.packages)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _strings(data: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise BlancmangeError(f"{path}: {key} must be a list of strings")
    return tuple(value)


def load_config(path: Path) -> BuildConfig:
    """Return the configuration in ``path``. Raises BlancmangeError naming the file and the bad key."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BlancmangeError(f"cannot read the blancmange config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BlancmangeError(f"{path}: expected a mapping of {', '.join(sorted(KEYS))}")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise BlancmangeError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}")
    base = path.resolve().parent
    files = data.get("files") or {}
    if not isinstance(files, dict):
        raise BlancmangeError(f"{path}: files must be a mapping of source: destination")
    level = data.get("compression_level", 12)
    if not isinstance(level, int) or not 1 <= level <= 19:
        raise BlancmangeError(f"{path}: compression_level must be an integer from 1 to 19")
    packages = _strings(data, "packages", path)
    if "python3" not in packages or "busybox" not in packages:
        raise BlancmangeError(f"{path}: packages must include python3 and busybox (cidkid and /init need them)")
    return BuildConfig(
        base=base, suite=str(data.get("suite") or "bookworm"),
        kernel_package=str(data.get("kernel_package") or "linux-image-amd64"), packages=packages,
        python_modules=_strings(data, "python_modules", path), modules=_strings(data, "modules", path),
        strip=_strings(data, "strip", path), ssh_keys=_strings(data, "ssh_keys", path),
        ca=(base / data["ca"]) if data.get("ca") else None,
        files={str(k): str(v) for k, v in files.items()}, compression_level=level)
