"""Newline-delimited JSON framing (docs/protocol.md), usable from Twisted and from blocking sockets.

Pure: no reactor, no sockets. ``LineBuffer`` turns received bytes into lines; ``decode`` turns a line into a
message dict; ``encode`` does the reverse.
"""

from __future__ import annotations

import json
from typing import Any

from cidcommon.errors import BadRequest, ProtocolError

PROTOCOL_VERSION = 1
DEFAULT_PORT = 38008
DEFAULT_HTTP_PORT = 38080
MAX_LINE = 65536
#: Clients accept longer lines from cidd: a status or capture of 10,000 nodes is a few MiB.
MAX_REPLY_LINE = 64 * 1024 * 1024
#: Seconds a new session has to send its hello before cidd closes it.
HELLO_TIMEOUT = 10.0
AGENT_ROLE = "agent"
CLIENT_ROLES = ("admin", "scheduler", "reader")
ROLES = (AGENT_ROLE, *CLIENT_ROLES)

Message = dict[str, Any]


class LineTooLong(ProtocolError):
    """A line longer than the configured maximum; the session must be closed."""

    code = "too_long"


def encode(message: Message) -> bytes:
    """Return ``message`` as one UTF-8 JSON line ending in ``\\n``."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def decode(line: bytes) -> Message:
    """Return the message dict held by one line (without its newline).

    Raises ProtocolError (code ``bad_message``) when the line is not UTF-8 JSON, not an object, or has no
    string ``type``, or when its ``id`` is neither an integer nor a string.
    """
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"the line is not valid UTF-8 JSON ({exc.__class__.__name__}); "
                            "send one JSON object per line") from None
    except RecursionError:
        raise ProtocolError("the line nests JSON too deeply; messages are flat objects") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object with a 'type'")
    if not isinstance(message.get("type"), str):
        raise ProtocolError("the message has no string 'type'")
    if "id" in message and (isinstance(message["id"], bool) or not isinstance(message["id"], int | str)):
        raise ProtocolError("'id' must be an integer or a string")
    return message


class LineBuffer:
    """Collects received bytes and returns complete lines, enforcing the maximum line length."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Return the complete lines (without ``\\n``/``\\r\\n``) that ``data`` finished.

        Raises LineTooLong when a line (finished or not) exceeds ``max_line``; the buffer is then unusable.
        """
        self._pending += data
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._pending.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_line:
                raise LineTooLong(f"line of {end - start} bytes is longer than the limit of {self.max_line}")
            line = bytes(self._pending[start:end])
            lines.append(line[:-1] if line.endswith(b"\r") else line)
            start = end + 1
        del self._pending[:start]
        if len(self._pending) > self.max_line:
            raise LineTooLong(f"line longer than the limit of {self.max_line} bytes")
        return lines


def reply(request_id: Any, **fields: Any) -> Message:
    """Return a ``reply`` message answering ``request_id``."""
    return {"type": "reply", "id": request_id, **fields}


def error(code: str, message: str, request_id: Any = None) -> Message:
    """Return an ``error`` message; ``request_id`` is left out when unknown."""
    msg: Message = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        msg["id"] = request_id
    return msg


def get_str(message: Message, key: str, *, required: bool = True, default: str | None = None) -> str | None:
    """Return ``message[key]`` as a non-empty string (or ``default`` when absent and not required).

    Raises BadRequest naming the field when it is missing (and required) or not a non-empty string.
    """
    value = message.get(key)
    if value is None:
        if required:
            raise BadRequest(f"'{message.get('type')}' needs a '{key}' field")
        return default
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{key}' must be a non-empty string")
    return value


def get_number(message: Message, key: str, default: float | None = None) -> float | None:
    """Return ``message[key]`` as a float >= 0, or ``default`` when absent; raise BadRequest otherwise."""
    value = message.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise BadRequest(f"'{key}' must be a number >= 0")
    return float(value)
