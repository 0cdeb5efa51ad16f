"""Error classes with user-facing text, shared by every cid program.

Each error has a wire ``code`` (see docs/protocol.md) and a message that says what was wrong and what to do.
"""

from __future__ import annotations


class CidError(Exception):
    """Base class: ``code`` is the wire error code, ``str(err)`` the sentence shown to a person."""

    code = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """Return the user-facing sentence."""
        return str(self.args[0]) if self.args else self.code


class ProtocolError(CidError):
    """A line that breaks the framing or the message rules (bad JSON, missing field, too long)."""

    code = "bad_message"


class BadRequest(CidError):
    """A well-formed request whose content is wrong (a missing or invalid field)."""

    code = "bad_request"


class BadHostlist(BadRequest):
    """A hostlist that does not parse."""

    code = "bad_hostlist"


class UnknownNode(BadRequest):
    """A node name that is not in the inventory."""

    code = "unknown_node"


class UnknownImage(BadRequest):
    """An image id that is not in the catalog."""

    code = "unknown_image"


class Conflict(CidError):
    """A request that collides with another job (a node held for another image, a job id reused)."""

    code = "conflict"


class Forbidden(CidError):
    """The peer's role or the rights rules do not allow the request."""

    code = "forbidden"


class AuthError(CidError):
    """Missing or wrong token, or an incompatible protocol version."""

    code = "auth"


class TokenFileError(CidError):
    """A secrets file that cannot be read, or whose permissions are unsafe."""

    code = "auth"


#: Wire codes that mean "the request was wrong, nothing was started" (cidcapt exit code 2).
BAD_REQUEST_CODES = frozenset(
    {"bad_message", "bad_request", "unknown_type", "unknown_image", "bad_hostlist", "unknown_node",
     "too_long", "out_of_order"}
)
#: Wire codes that mean "refused" (cidcapt exit code 5).
REFUSED_CODES = frozenset({"conflict", "forbidden"})
