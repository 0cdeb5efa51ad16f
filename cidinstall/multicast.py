"""The multicast source of an install: udpcast's ``udp-receiver`` as a child process, its output read in order
and checked piece by piece before any byte reaches the installer (docs/distribution.md).

``MulticastSource`` looks like the HTTP response ``stream_install`` reads (``readinto``, ``getheader``,
``close``): it starts ``udp-receiver --portbase PORT`` (cidd's session), reads the image from its stdout one
piece at a time, and hands a piece on only once the first PIECE_DIGEST bytes of its sha256 match the list cidd
sent. Anything that goes wrong -- the receiver missing, no sender within ``start_timeout``, no data for
``stall`` seconds, the stream ending early, a piece that fails its check -- raises MulticastFailed (an OSError
whose ``strerror`` is the reason) at a piece boundary, so every byte handed on was checked and the installer
continues over HTTP from exactly there. The whole file's sha256 is still checked by the installer at the end.

Blocking code for the installer's download thread; no Twisted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any

import structlog

from cidinstall.types import PIECE_DIGEST, MulticastSpec

log = structlog.get_logger(__name__)

RECEIVER = "udp-receiver"
#: Lines of udp-receiver's stderr kept for a failure's reason.
STDERR_LINES = 4
#: Seconds the receiver gets after the last byte to acknowledge it to the sender and exit by itself.
EXIT_WAIT = 5.0
_SIOCGIFADDR = 0x8915


class MulticastFailed(OSError):
    """The multicast cannot deliver (more of) the image; ``strerror`` says why. Bytes already handed on are good."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, reason)


def interface_towards(host: str) -> str | None:
    """Return the name of the local interface whose address reaches ``host`` (an IPv4 address or name), or None.

    Sends nothing: a UDP socket is only connected, and each interface's address is read with SIOCGIFADDR.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            local = probe.getsockname()[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _index, name in socket.if_nameindex():
                with contextlib.suppress(OSError):
                    packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                    if socket.inet_ntoa(packed[20:24]) == local:
                        return name
    except OSError:
        return None
    return None


def digest(piece: bytes | bytearray | memoryview) -> bytes:
    """Return the digest a MulticastSpec lists for ``piece``: the first PIECE_DIGEST bytes of its sha256."""
    return hashlib.sha256(piece).digest()[:PIECE_DIGEST]


class MulticastSource:
    """The image bytes of one multicast session, checked piece by piece (see the module docstring).

    ``server`` is cidd's host (the interface towards it is the one the receiver listens on). ``popen`` and
    ``which`` are replaced by tests. Raises MulticastFailed when the receiver cannot be started.
    """

    status = 200
    reason = "OK"

    def __init__(self, spec: MulticastSpec, server: str, image: str, *,
                 popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
                 which: Callable[[str], str | None] = shutil.which) -> None:
        if spec.piece_size <= 0 or len(spec.pieces) != PIECE_DIGEST * -(-spec.size // spec.piece_size):
            raise MulticastFailed(f"the multicast piece list does not fit a file of {spec.size} bytes")
        self.spec = spec
        self.image = image
        self.offset = 0  # bytes handed on (all of them checked)
        self._piece = bytearray(spec.piece_size)
        self._view = memoryview(self._piece)
        self._have = 0  # bytes of the current piece held
        self._given = 0  # bytes of the current piece handed on
        self._index = 0
        self._stderr: deque[str] = deque(maxlen=STDERR_LINES)
        executable = which(RECEIVER)
        if executable is None:
            raise MulticastFailed(f"{RECEIVER} (Debian package udpcast) is not installed in the installer")
        argv = [RECEIVER, "--nokbd", "--portbase", str(spec.port), "--start-timeout",
                str(max(1, round(spec.start_timeout))), "--receive-timeout", str(max(1, round(spec.stall)))]
        interface = interface_towards(server)
        if interface is not None:
            argv += ["--interface", interface]
        self.argv = argv
        try:
            self.proc = popen(argv, executable=executable, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            raise MulticastFailed(f"cannot start {RECEIVER}: {exc.strerror or exc}") from None
        self._reader = threading.Thread(target=self._read_stderr, name="cid-multicast-stderr", daemon=True)
        self._reader.start()
        log.info("installer.multicast_started", image=image, port=spec.port, session=spec.session,
                 interface=interface, pieces=len(spec.pieces) // PIECE_DIGEST, piece_size=spec.piece_size)

    # --- what stream_install reads ------------------------------------------------------------------

    def getheader(self, name: str, default: str | None = None) -> str | None:
        """Return Content-Length (the file's size) for that name, else ``default``."""
        return str(self.spec.size) if name.lower() == "content-length" else default

    def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` with checked bytes; return their number (0 at the end of the file).

        Raises MulticastFailed at a piece boundary when the next piece cannot be had or fails its check.
        """
        if self._given >= self._have:
            if self.offset >= self.spec.size:
                self._finish()
                return 0
            self._next_piece()
        n = min(len(buffer), self._have - self._given)
        buffer[:n] = self._view[self._given:self._given + n]
        self._given += n
        self.offset += n
        return n

    def close(self) -> None:
        """Stop the receiver (when it still runs) and wait for it."""
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.wait(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    # --- inside -------------------------------------------------------------------------------------

    def _next_piece(self) -> None:
        """Read and check the next piece. Raises MulticastFailed."""
        start = self._index * self.spec.piece_size
        want = min(self.spec.piece_size, self.spec.size - start)
        got = self._read_exactly(want)
        if got < want:
            raise MulticastFailed(f"the multicast stream stopped at byte {start + got} of {self.spec.size} "
                                  f"({self._said()})")
        expected = self.spec.pieces[self._index * PIECE_DIGEST:(self._index + 1) * PIECE_DIGEST]
        if digest(self._view[:want]) != expected:
            log.error("installer.multicast_bad_piece", image=self.image, piece=self._index, offset=start,
                      length=want)
            raise MulticastFailed(f"piece {self._index} (bytes {start}-{start + want - 1}) of the multicast "
                                  "stream failed its check: corrupt data from the network or a rogue sender")
        self._have, self._given = want, 0
        self._index += 1

    def _read_exactly(self, want: int) -> int:
        """Read ``want`` bytes of the receiver's output into the piece buffer; return how many came."""
        stdout = self.proc.stdout
        assert stdout is not None
        got = 0
        while got < want:
            n = stdout.readinto(self._view[got:want])  # type: ignore[attr-defined]
            if not n:
                break
            got += n
        return got

    def _finish(self) -> None:
        """After the last byte: let the receiver acknowledge and exit by itself (so the sender does not wait)."""
        try:
            self.proc.wait(timeout=EXIT_WAIT)
        except subprocess.TimeoutExpired:
            log.warning("installer.multicast_receiver_lingers", image=self.image, said=self._said())

    def _read_stderr(self) -> None:
        """Keep the receiver's last lines (thread body; progress lines end in carriage returns)."""
        stream: IO[bytes] | Any = self.proc.stderr
        if stream is None:
            return
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                for part in raw.replace(b"\r", b"\n").decode("utf-8", "replace").splitlines():
                    text = part.strip()
                    if text and not text.startswith("bytes="):
                        self._stderr.append(text[:200])

    def _said(self) -> str:
        """Return the receiver's exit status and last words, for a reason."""
        deadline = time.monotonic() + 1.0
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        code = self.proc.poll()
        status = "still running" if code is None else f"{RECEIVER} exit status {code}"
        words = "; ".join(self._stderr)
        return f"{status}: {words}" if words else status


def fallback_header(reason: str) -> str:
    """Return ``reason`` fit for an HTTP header value (printable ASCII, at most 300 characters)."""
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in reason)
    return text[:300]


def pieces_needed(size: int, piece_size: int) -> int:
    """Return the number of pieces of a ``size``-byte file cut in ``piece_size`` pieces."""
    return -(-size // piece_size) if size else 0


__all__ = ["MulticastFailed", "MulticastSource", "digest", "fallback_header", "interface_towards", "pieces_needed"]
