"""Test doubles for driving agents under a fake clock (``twisted.internet.task.Clock``), no sockets.

``MemoryEndpoint`` stands in for the TCP endpoint an ``AgentService`` or ``SimNode`` connects through: every
connection gets a ``LoopTransport`` that records what the agent wrote and, when closed, tells the protocol on
the next turn of the clock, as a real transport would. The test plays cidd by reading ``lines()`` and calling
``reply_to``/``send``.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from cidcommon.wire import Message, encode


class LoopTransport(StringTransport):
    """A StringTransport whose close reaches the protocol on the next clock turn; ``closed`` says it was closed."""

    def __init__(self, clock: IReactorTime, protocol: Any) -> None:
        super().__init__()
        self.clock = clock
        self.protocol = protocol
        self.closed = False

    def _close(self, reason: Failure) -> None:
        if not self.closed:
            self.closed = True
            self.clock.callLater(0, self.protocol.connectionLost, reason)

    def loseConnection(self) -> None:
        super().loseConnection()
        self._close(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        super().abortConnection()
        self._close(Failure(ConnectionLost()))

    def lines(self) -> list[Message]:
        """Return (and forget) the messages the agent wrote since the last call."""
        data = self.value()
        self.clear()
        return [json.loads(line) for line in data.splitlines()]

    def send(self, message: Message) -> None:
        """Deliver ``message`` to the agent as cidd would."""
        self.protocol.dataReceived(encode(message))

    def reply_to(self, request: Message, **fields: Any) -> None:
        """Answer ``request`` with a ``reply`` carrying ``fields``."""
        self.send({"type": "reply", "id": request["id"], **fields})


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects at once to a LoopTransport (or refuses while ``refuse`` is set), recording every attempt."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.refuse = False
        self.attempts: list[float] = []
        self.transports: list[LoopTransport] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        """Return a Deferred firing with the connected protocol, or failing with ConnectionRefusedError."""
        self.attempts.append(self.clock.seconds())
        if self.refuse:
            return fail(ConnectionRefusedError())
        proto = factory.buildProtocol(None)
        transport = LoopTransport(self.clock, proto)
        proto.makeConnection(transport)
        self.transports.append(transport)
        return succeed(proto)

    def open(self) -> list[LoopTransport]:
        """Return the transports not closed yet."""
        return [t for t in self.transports if not t.closed]
