"""structlog set-up shared by the cid programs: one JSON object per line (or readable key=value lines).

Call ``configure`` once from an entry point; modules only do ``log = structlog.get_logger(__name__)`` and
``log.info("event.name", node=..., job=...)``. Keys named like secrets are masked before rendering.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_SECRET_KEYS = frozenset({"token", "password", "secret", "key", "passphrase"})


def _mask_secrets(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Return ``event`` with the values of secret-looking keys replaced by ``***``."""
    for key in event:
        if key.lower() in _SECRET_KEYS or key.lower().endswith("_token"):
            event[key] = "***"
    return event


def configure(*, json: bool = True, level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog to write events to ``stream`` (stderr by default), as JSON lines or console text."""
    renderer: Any = (structlog.processors.JSONRenderer() if json
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
