"""The installer's request, result and progress types: what the agent hands the installer and gets back.

Pure data, no I/O: the agent (``cidkid``), the installer (``cidinstall.stream``) and the simulated fleet share
these without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

#: ``progress(step, done, total)``: bytes done so far of ``total`` (None when unknown) in step ``step``.
ProgressCallback = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class MulticastSpec:
    """Where an install's bytes come from when cidd sends the image by multicast (docs/distribution.md).

    ``port``: the UDP port base of cidd's udpcast session (``udp-receiver --portbase``). ``size``: the file's
    bytes. ``pieces``: the first PIECE_DIGEST bytes of the sha256 of each ``piece_size`` piece of the file, in
    order (each piece is checked before any of it reaches tar). ``start_timeout``: seconds to wait for the
    sender; ``stall``: seconds without data after which the multicast is given up (then HTTP goes on from the
    last good piece). ``node``: this node's name, told to cidd with a fallback; ``session``: cidd's session id.
    """

    port: int
    size: int
    piece_size: int
    pieces: bytes
    start_timeout: float = 60.0
    stall: float = 10.0
    node: str | None = None
    session: int | None = None


#: Bytes of each piece's sha256 that a MulticastSpec carries (128 bits: the whole file's sha256 stays the last word).
PIECE_DIGEST = 16


@dataclass(frozen=True)
class InstallRequest:
    """An ``install`` command: stream ``url`` (``size`` bytes, ``format``) onto the target, check ``sha256``.

    ``resume_for``: seconds a dropped download is resumed from the byte where it stopped (None: the installer's
    default, ``cidinstall.download.DEFAULT_RESUME_FOR``); cidd sends it in the ``install`` message.
    ``multicast``: the bytes come from cidd's multicast session first, ``url`` being the fallback.
    """

    image: str
    url: str
    sha256: str | None = None
    size: int | None = None
    format: str = "tar.zst"
    agent_token: str | None = field(default=None, repr=False)  # the node's own token, for the installed system
    resume_for: float | None = None
    multicast: MulticastSpec | None = None  # cidd sends the bytes by multicast; ``url`` stays the fallback


@dataclass(frozen=True)
class InstallResult:
    """The outcome of an install: ``reason`` is a sentence when not ``ok``; ``retry`` whether trying again may help."""

    ok: bool
    reason: str | None = None
    retry: bool = False
