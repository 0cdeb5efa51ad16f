"""Twisted's own log events into structlog, for the daemons (cidd, cidkid); clients never import this."""

from __future__ import annotations

from typing import Any

import structlog
from twisted.logger import formatEvent, globalLogBeginner


def route_twisted_logs() -> None:
    """Send Twisted's own log events to structlog (errors as ``twisted.error``, the rest at debug level).

    Also stops Twisted's start-up buffer, which otherwise keeps up to 65,536 events (with their tracebacks) in
    memory when nobody begins logging.
    """
    log = structlog.get_logger("twisted")

    def observer(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        text = formatEvent(event)
        if failure is not None:
            log.error("twisted.error", message=text, traceback=failure.getTraceback()[-4000:])
        elif event.get("isError"):
            log.error("twisted.error", message=text)
        else:
            log.debug("twisted.log", message=text)

    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)
