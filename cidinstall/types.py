"""The installer's request, result and progress types: what the agent hands the installer and gets back.

Pure data, no I/O: the agent (``cidkid``), the installer (``cidinstall.stream``) and the simulated fleet share
these without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: ``progress(step, done, total)``: bytes done so far of ``total`` (None when unknown) in step ``step``.
ProgressCallback = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class InstallRequest:
    """An ``install`` command: stream ``url`` (``size`` bytes, ``format``) onto the target, check ``sha256``.

    ``resume_for``: seconds a dropped download is resumed from the byte where it stopped (None: the installer's
    default, ``cidinstall.download.DEFAULT_RESUME_FOR``); cidd sends it in the ``install`` message.
    """

    image: str
    url: str
    sha256: str | None = None
    size: int | None = None
    format: str = "tar.zst"
    agent_token: str | None = None  # the node's own agent token, for the installed system (never logged)
    resume_for: float | None = None


@dataclass(frozen=True)
class InstallResult:
    """The outcome of an install: ``reason`` is a sentence when not ``ok``; ``retry`` whether trying again may help."""

    ok: bool
    reason: str | None = None
    retry: bool = False
