"""The agent messages cidd builds and reads (docs/protocol.md), kept out of the engine and the transport.

``install_command`` builds an ``install`` request from the catalog; ``with_agent_token`` adds the node's own
agent token to it (the security rule of what an install may carry, and to whom); ``install_report`` and
``installed_event`` turn what an installer says (its hello's ``install`` field, its ``installed`` event) into
machine events. Pure: no reactor, no socket.
"""

from __future__ import annotations

from typing import Any

from cidcatalog.catalog import Catalog
from cidcommon import wire
from cidcommon.errors import BadRequest
from cidcommon.paths import node_token
from cidd.core.machine_types import Installed, InstallReport

INSTALL_STATES = ("running", "ok", "failed")


def install_command(catalog: Catalog, http_base: str, image_id: str, attempt: int, image_path: Any,
                    resume_for: float | None = None) -> dict[str, Any]:
    """Return the ``install`` request for attempt ``attempt`` of ``image_id`` (``url`` None when the catalog has
    no such image any more: the installer refuses it with a reason). ``image_path(image)`` is the image's path
    on cidd's HTTP port; ``resume_for`` (the group's) how long the installer resumes a dropped download."""
    image = catalog.get(image_id)
    extra: dict[str, Any] = {"attempt": attempt}
    if resume_for is not None:
        extra["resume_for"] = resume_for
    if image is None:
        return {"type": "install", "image": image_id, "url": None, **extra}
    fmt = "tar.zst" if image.file.endswith(".zst") else "tar.gz"
    return {"type": "install", "image": image_id, "url": http_base + image_path(image), "sha256": image.sha256,
            "size": image.size, "format": fmt, **extra}


def with_agent_token(message: dict[str, Any], master: str | None, node: str) -> dict[str, Any]:
    """Return ``message`` with ``node``'s own agent token when it is an ``install`` (the installer writes the
    token into the installed system, so the image's agent can log in); other messages never carry it."""
    if message.get("type") != "install" or not master:
        return message
    return {**message, "agent_token": node_token(master, node)}


def _attempt(message: wire.Message) -> int | None:
    """Return the whole-number ``attempt`` of ``message``, or None. Raises BadRequest for a wrong type."""
    value = message.get("attempt")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest("'attempt' must be a whole number >= 0")
    return value


def install_report(hello: wire.Message) -> InstallReport | None:
    """Return the ``install`` field of an installer's hello as an InstallReport (None when absent).

    Raises BadRequest naming the wrong field.
    """
    field = hello.get("install")
    if field is None:
        return None
    if not isinstance(field, dict):
        raise BadRequest("'install' must be an object")
    image = wire.get_str(field, "image")
    state = field.get("state")
    if state not in INSTALL_STATES:
        raise BadRequest(f"'install.state' must be one of {', '.join(INSTALL_STATES)}")
    reason = field.get("reason") if isinstance(field.get("reason"), str) else None
    return InstallReport(str(image), str(state), _attempt(field), reason, bool(field.get("retry")))


def installed_event(message: wire.Message) -> Installed:
    """Return the Installed event of an agent's ``installed`` message. Raises BadRequest for a wrong field."""
    image = wire.get_str(message, "image")
    reason = message.get("reason") if isinstance(message.get("reason"), str) else None
    return Installed(str(image), bool(message.get("ok")), reason, bool(message.get("retry")), _attempt(message))
