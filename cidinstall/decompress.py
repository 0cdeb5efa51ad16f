"""Decompression for the installer: compressed chunks from the download queue, out to tar's stdin pipe.

zstd (python-zstandard, any number of frames) and gzip (zlib, any number of members); memory stays bounded
whatever the compression ratio.
"""

from __future__ import annotations

import os
import queue
import zlib
from collections import deque

import zstandard

from cidinstall.errors import ArchiveError

#: Size of the pieces the decompressor hands to tar (also the most it holds at once).
WRITE_SIZE = 1 << 20
#: What the decompressors raise for a corrupt stream (the installer catches these).
DECODE_ERRORS = (zstandard.ZstdError, zlib.error)


class PipeWriter:
    """A file-like ``write`` into a pipe file descriptor that writes everything it is given."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | memoryview) -> int:
        """Write all of ``data``; return its length. Raises BrokenPipeError when the reader went away."""
        view = memoryview(data)
        size = len(view)
        while view:
            view = view[os.write(self.fd, view):]
        return size


class QueueSource:
    """The compressed chunks queued by the download thread, as a file-like ``read`` (for the decompressors).

    A chunk's buffer goes back to the free list two reads later (the zstd reader may still look at the input
    it was last given); ``fed`` counts the compressed bytes handed out, ``ended`` says the end marker was seen.
    """

    def __init__(self, full: queue.Queue[tuple[memoryview, int] | None], free: queue.SimpleQueue[memoryview]) -> None:
        self._full = full
        self._free = free
        self._held: deque[memoryview] = deque()
        self.fed = 0
        self.ended = False

    def read(self, size: int = -1) -> memoryview | bytes:
        """Return the next chunk (whatever ``size``), or b"" at the end of the download."""
        while len(self._held) >= 2:
            self._free.put(self._held.popleft())
        if self.ended:
            return b""
        item = self._full.get()
        if item is None:
            self.ended = True
            return b""
        view, n = item
        self._held.append(view)
        self.fed += n
        return view[:n]

    def drain(self) -> None:
        """Recycle every held and queued chunk up to the end marker (the download thread must never block)."""
        while not self.ended:
            self.read()
        while self._held:
            self._free.put(self._held.popleft())


def unzstd(source: QueueSource, writer: PipeWriter, read_size: int) -> None:
    """Decompress zstd (any number of frames) from ``source`` into ``writer``, WRITE_SIZE bytes at a time.

    Memory stays bounded whatever the ratio (a GiB of zeros is 33 KB of zstd). Raises zstandard.ZstdError for
    a corrupt stream and BrokenPipeError. A stream cut short inside a frame is not detected here (zstandard's
    streaming readers do not tell): the size and sha256 checks and tar's "Unexpected EOF" catch it.
    """
    reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=read_size, read_across_frames=True,
                                                        closefd=False)
    out = memoryview(bytearray(WRITE_SIZE))
    while n := reader.readinto(out):
        writer.write(out[:n])


class GzipDecoder:
    """Decompresses gzip (any number of members) into ``writer``, never holding more than WRITE_SIZE out."""

    def __init__(self, writer: PipeWriter) -> None:
        self._writer = writer
        self._z = zlib.decompressobj(wbits=31)

    def feed(self, data: memoryview | bytes) -> None:
        """Decompress ``data``; raises zlib.error for a corrupt stream, BrokenPipeError."""
        while data:
            if self._z.eof:
                self._z = zlib.decompressobj(wbits=31)
            out = self._z.decompress(data, WRITE_SIZE)
            if out:
                self._writer.write(out)
            if self._z.eof:
                data = self._z.unused_data
            else:
                data = self._z.unconsumed_tail
                while not data and not self._z.eof:  # output was capped: drain what zlib still holds
                    out = self._z.decompress(b"", WRITE_SIZE)
                    if not out:
                        break
                    self._writer.write(out)

    def finish(self) -> None:
        """Raise ArchiveError when the last gzip member is incomplete."""
        if not self._z.eof:
            raise ArchiveError("truncated compressed stream: the gzip data ends in the middle of a member")


def ungzip(source: QueueSource, writer: PipeWriter) -> None:
    """Decompress gzip from ``source`` into ``writer``; raises zlib.error, ArchiveError (truncated), BrokenPipeError."""
    decoder = GzipDecoder(writer)
    while data := source.read():
        decoder.feed(data)
    decoder.finish()
