"""Errors of the client side, and the translation of cidd's ``error`` messages into error classes.

The shared classes (``cidcommon.errors``) carry the wire codes; cidcapt adds the ones that only a client
can see: cidd cannot be reached, the connection was lost, cidd said something that breaks the protocol.
"""

from __future__ import annotations

from typing import Any

from cidcommon.errors import (
    AuthError,
    BadHostlist,
    BadRequest,
    CidError,
    Conflict,
    Forbidden,
    ProtocolError,
    UnknownImage,
    UnknownNode,
)


class Unreachable(CidError):
    """cidd cannot be reached (nothing listens, the connection times out, the name does not resolve)."""

    code = "unreachable"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message  # the bare cause ("connection refused"), for wrapping messages


class ConnectionLost(Unreachable):
    """An established session ended: cidd closed it, the network dropped it, or cidd stopped answering."""

    code = "connection_lost"


class BadServerReply(CidError):
    """The peer sent something that is not a cid protocol message (is --server really cidd?)."""

    code = "bad_reply"


_WIRE_CLASSES: dict[str, type[CidError]] = {
    "bad_request": BadRequest,
    "bad_hostlist": BadHostlist,
    "unknown_node": UnknownNode,
    "unknown_image": UnknownImage,
    "conflict": Conflict,
    "forbidden": Forbidden,
    "auth": AuthError,
}


def error_from_wire(message: dict[str, Any]) -> CidError:
    """Return the error instance that matches an ``error`` message from cidd (its ``code`` kept as is).

    An ``auth`` message is prefixed with "authentication failed: ". Codes without a dedicated class
    (``bad_message``, ``too_long``, ``internal``, ``superseded``, codes added later) give a ProtocolError
    or a plain CidError carrying that code.
    """
    code = message.get("code")
    code = code if isinstance(code, str) and code else "internal"
    text = message.get("message")
    if not isinstance(text, str) or not text:
        text = f"cidd answered with error '{code}' and no explanation; look at cidd's log"
    if code == "auth" and not text.lower().startswith("authentication failed"):
        text = f"authentication failed: {text}"  # say which of the exit-4 causes it is
    cls = _WIRE_CLASSES.get(code)
    if cls is not None:
        return cls(text)
    if code in ("bad_message", "too_long", "out_of_order", "unknown_type"):
        return ProtocolError(text, code=code)
    return CidError(text, code=code)
