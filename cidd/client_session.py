"""What the client API needs from the session that carries a request: the narrow interface between
``cidd.client_api`` (what a request does) and ``cidd.sessions`` (the connection), so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.python.failure import Failure

from cidcommon import wire


class ClientSession(Protocol):
    """A client's session as the client API sees it: who is asking, and a way to answer.

    ``role`` and ``user`` are what the hello proved; ``cleanups`` run when the session ends (a watch's
    keep-alive, an open console); ``closed`` is true once it has ended.
    """

    role: str | None
    user: str | None
    session_id: str
    closed: bool
    cleanups: list[Callable[[], Any]]

    def send(self, message: dict[str, Any]) -> None:
        """Write ``message`` to the client (dropped when the session has ended)."""
        ...

    def request_failed(self, failure: Failure, message: wire.Message) -> None:
        """Answer ``message`` with the error ``failure`` holds (a CidError's code and text, else internal)."""
        ...
