"""Run an agent's installs, one at a time, and report them on whichever session is current.

An install outlives the session that asked for it: if the link to cidd drops while the image is being written,
the work goes on, and the ``installed`` event is sent as soon as a new session has said ``hello``, so that a node
is never left installed (or failed) without cidd hearing about it.

Installs are idempotent within one boot: an ``install`` of an image that already finished here answers with its
result and never runs again (a second run would empty the target that the first one wrote), unless cidd asks
for a later ``attempt`` after a failure. The ``hello`` of every session says what the runner holds
(``install``: the image, attempt and state), so that cidd reads it before deciding to send anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from cidcommon.errors import BadRequest
from cidcommon.wire import Message
from cidinstall.types import InstallRequest, InstallResult
from cidkid.platform import Platform

log = structlog.get_logger(__name__)

Send = Callable[[Message], None]

#: Least time between two ``progress`` events of one node (at most ~2 a second).
PROGRESS_INTERVAL = 0.5


class InstallRunner:
    """Starts ``platform.install`` for ``install`` commands and turns its progress into wire events.

    ``attach(send)`` names the function that writes to the current session; ``detach`` forgets it.
    """

    def __init__(self, platform: Platform, clock: IReactorTime, *, node: str = "",
                 progress_interval: float = PROGRESS_INTERVAL) -> None:
        self._platform = platform
        self._clock = clock
        self._node = node
        self._interval = progress_interval
        self._send: Send | None = None
        self._undelivered: Message | None = None
        self._last_at: float | None = None
        self._last_done = 0
        self.running: InstallRequest | None = None
        self._attempt: int | None = None  # cidd's attempt number of the running (or last) install
        self.finished: tuple[InstallRequest, int | None, InstallResult] | None = None  # the last one, this boot

    def attach(self, send: Send) -> None:
        """Send events through ``send`` from now on, starting with an ``installed`` event nobody received yet."""
        self._send = send
        if self._undelivered is not None:
            event, self._undelivered = self._undelivered, None
            log.info("agent.install_result_delivered", node=self._node, image=event.get("image"))
            send(event)

    def detach(self, send: Send) -> None:
        """Stop sending through ``send`` (the session ended); events wait for the next ``attach``."""
        if self._send == send:
            self._send = None

    def status(self) -> Message | None:
        """Return what the ``hello`` says about installs: the running or last finished one of this boot, or None.

        ``{"image", "state": "running" | "ok" | "failed", "attempt"?, "reason"?, "retry"?}``.
        """
        if self.running is not None:
            status: Message = {"image": self.running.image, "state": "running"}
            if self._attempt is not None:
                status["attempt"] = self._attempt
            return status
        if self.finished is None:
            return None
        request, attempt, result = self.finished
        status = {"image": request.image, "state": "ok" if result.ok else "failed"}
        if attempt is not None:
            status["attempt"] = attempt
        if not result.ok:
            status.update(reason=result.reason or "the install failed for an unknown reason", retry=result.retry)
        return status

    def decide(self, request: InstallRequest, attempt: int | None = None) -> str:
        """Return what to do with an ``install`` of ``request``: ``"start"``, ``"running"`` (that very image is
        being installed) or ``"done"`` (it already finished in this boot: answer with its result, never run it
        again). A failed install runs again only for a later ``attempt`` than the one that failed.

        Raises BadRequest when another image is being installed.
        """
        if self.running is not None:
            if self.running.image == request.image:
                return "running"
            raise BadRequest(f"an install of {self.running.image} is already running; "
                             f"wait for its 'installed' event before asking for {request.image}")
        if self.finished is not None and self.finished[0].image == request.image:
            _, done_attempt, result = self.finished
            if result.ok or attempt is None or done_attempt is None or attempt <= done_attempt:
                return "done"
        return "start"

    def accepts(self, request: InstallRequest) -> bool:
        """Return True when ``request`` may start now (see ``decide``). Raises BadRequest as ``decide``."""
        return self.decide(request) == "start"

    def redeliver(self) -> None:
        """Send the ``installed`` event of the last finished install again (asked for an image already done)."""
        if self.finished is not None and self._send is not None:
            request, attempt, result = self.finished
            log.info("agent.install_not_repeated", node=self._node, image=request.image, ok=result.ok)
            self._send(self._event(request, attempt, result))

    def start(self, request: InstallRequest, attempt: int | None = None) -> None:
        """Start installing ``request`` (``decide`` said start); its events go to the attached session."""
        self.running = request
        self._attempt = attempt
        self.finished = None
        self._undelivered = None
        self._last_at = None
        self._last_done = 0
        log.info("agent.install_started", node=self._node, image=request.image, url=request.url)
        d = maybeDeferred(self._platform.install, request, self._progress)
        d.addErrback(self._crashed, request)
        d.addCallback(self._finished, request)

    def _progress(self, step: str, done: int, total: int | None) -> None:
        """Send a ``progress`` event unless one was sent less than ``progress_interval`` ago (the last one always)."""
        if self.running is None:
            return
        now = self._clock.seconds()
        final = total is not None and done >= total
        if self._last_at is not None and now - self._last_at < self._interval and not final:
            return
        event: Message = {"type": "progress", "image": self.running.image, "step": step, "done": int(done)}
        if total is not None:
            event["total"] = int(total)
        if self._last_at is not None and now > self._last_at:
            event["rate"] = round(max(0, done - self._last_done) / (now - self._last_at), 1)
        self._last_at, self._last_done = now, done
        if self._send is not None:
            self._send(event)

    def _crashed(self, failure: Failure, request: InstallRequest) -> InstallResult:
        """Turn an exception raised by the platform into a failed result (a bug: retrying will not help)."""
        log.error("agent.install_crashed", node=self._node, image=request.image,
                  error=failure.getErrorMessage(), traceback=failure.getTraceback())
        return InstallResult(ok=False, reason=f"the installer crashed ({failure.getErrorMessage()}); "
                             "see the cidkid log on the node", retry=False)

    @staticmethod
    def _event(request: InstallRequest, attempt: int | None, result: InstallResult) -> Message:
        """Return the ``installed`` event of ``result`` (with cidd's ``attempt`` when the request had one)."""
        event: Message = {"type": "installed", "image": request.image, "ok": bool(result.ok)}
        if not result.ok:
            event["reason"] = result.reason or "the install failed for an unknown reason"
            event["retry"] = bool(result.retry)
        if attempt is not None:
            event["attempt"] = attempt
        return event

    def _finished(self, result: InstallResult, request: InstallRequest) -> None:
        """Send (or keep for the next session) the ``installed`` event for ``result``."""
        self.running = None
        self.finished = (request, self._attempt, result)
        event = self._event(request, self._attempt, result)
        fields: dict[str, Any] = {"node": self._node, "image": request.image, "ok": result.ok}
        if not result.ok:
            fields.update(reason=event["reason"], retry=event["retry"])
        log.info("agent.install_finished", **fields)
        if self._send is not None:
            self._send(event)
        else:
            self._undelivered = event
            log.warning("agent.install_result_pending", node=self._node, image=request.image)
