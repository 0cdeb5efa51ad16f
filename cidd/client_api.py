"""Client requests (docs/protocol.md): ``capture`` (with watching), ``cancel``, ``status``, ``captures``, ``images``
and the admin requests.

Called by cidd.sessions for sessions whose hello named a client role; raises CidError subclasses, which the
session turns into error replies.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import structlog
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from cidcatalog.catalog import CatalogError
from cidcommon import hostlists, wire
from cidcommon.errors import BadRequest, CidError, Forbidden, UnknownNode
from cidd.client_session import ClientSession
from cidd.core import captures as caps
from cidd.core.rights import ImageFacts, check_cancel, may_see
from cidd.core.rights import check as check_rights
from cidd.engine import Engine
from cidd.history import history_of, parse_query
from cidd.images_http import image_dir_of
from cidd.user_directory import UserDirectory

log = structlog.get_logger(__name__)

KEEPALIVE_S = 15.0
#: Roles allowed to start captures; every client role may read.
CAPTURE_ROLES = frozenset({"admin", "scheduler"})
POWER_ACTIONS = ("status", "on", "off", "cycle", "reset")


class ClientAPI:
    """Handles the requests of client sessions."""

    def __init__(self, engine: Engine, clock: IReactorTime, directory: UserDirectory) -> None:
        self.engine = engine
        self.clock = clock
        self.directory = directory  # users' groups, looked up off the reactor thread
        self.consoles: dict[int, Any] = {}  # id(session) -> its open ConsoleRelay (docs/power.md)

    def handle(self, session: ClientSession, message: wire.Message) -> None:
        """Answer one client request on ``session``. Raises CidError for a bad or refused request."""
        handlers = {"capture": self.capture, "status": self.status, "captures": self.captures,
                    "reload": self.reload, "features": self.features, "power": self.power,
                    "console": self.console, "console_data": self.console_data,
                    "console_close": self.console_close, "stats": self.stats, "cancel": self.cancel,
                    "images": self.images}
        handler = handlers.get(message["type"])
        if handler is None:
            raise CidError(f"unknown request type {message['type']!r}; known: {', '.join(handlers)}",
                           code="unknown_type")
        handler(session, message)

    def capture(self, session: ClientSession, message: wire.Message) -> None:
        """Start or re-attach to a capture; with ``watch``, stream its events until it ends."""
        if session.role not in CAPTURE_ROLES:
            raise Forbidden(f"role {session.role!r} may not start captures; use an admin or scheduler token")
        job = wire.get_str(message, "job")
        image = wire.get_str(message, "image")
        names = hostlists.expand(wire.get_str(message, "nodes"))
        timeout = wire.get_number(message, "timeout")
        user = message.get("user") if isinstance(message.get("user"), str) else session.user
        if not self.needs_groups(session, user, image, names):
            self.start_capture(session, message, job, image, names, timeout, user, frozenset())
            return
        assert user is not None
        self.directory.groups(user).addCallback(
            lambda groups: self.start_capture(session, message, job, image, names, timeout, user, groups)
        ).addErrback(session.request_failed, message)

    def start_capture(self, session: ClientSession, message: wire.Message, job: str, image: str, names: list[str],
                      timeout: float | None, user: str | None, groups: frozenset[str]) -> None:
        """Check the rights of ``user`` (in ``groups``), start or re-attach to the capture and answer.

        Raises CidError (RightsRefused, BadRequest...) for the session to answer.
        """
        if session.closed:
            return  # the client left while its user's groups were looked up: nothing is started
        self.check_rights(session, user, image, names, groups)
        plan = self.engine.capture(job, names, image, user, session.role or "?", timeout,
                                   reattach=message.get("reattach") is True)
        view = self.engine.describe(plan.capture)
        session.send(wire.reply(message.get("id"), capture={**view, "attached": plan.attached}))
        log.info("client.capture", job=job, image=image, nodes=len(names), attached=plan.attached,
                 session=session.session_id)
        if not message.get("watch"):
            return
        if not plan.capture.running:
            session.send({"type": "done", **view})
            return
        keepalive = LoopingCall(session.send, {"type": "keepalive"})
        keepalive.clock = self.clock

        def stop() -> None:
            unwatch()
            if keepalive.running:
                keepalive.stop()

        def forward(event: dict[str, Any]) -> None:
            session.send(event)
            if event["type"] == "done":
                stop()

        unwatch = self.engine.watch(job, forward)
        keepalive.start(KEEPALIVE_S, now=False)
        session.cleanups.append(stop)

    def cancel(self, session: ClientSession, message: wire.Message) -> None:
        """Cancel the running capture of ``job`` and reply with it as it ended (``already``: it was cancelled before).

        Only the admin role, or the scheduler role for the capture's own user (cidd/core/rights.py), may. Raises
        CancelRefused (exit 5), NothingToCancel (an unknown job, or a capture that ended otherwise: exit 2).
        """
        job = str(wire.get_str(message, "job"))
        user = _user_of(session, message)
        if session.role not in CAPTURE_ROLES:
            check_cancel(session.role, user, job, None)  # refused before saying anything about the job
        capture = caps.cancellable(job, self.engine.latest_capture(job))
        check_cancel(session.role, user, job, capture.user)
        by = user or session.role or "?"
        capture, already = self.engine.cancel(job, by)
        log.info("client.cancel", job=job, by=by, role=session.role, already=already, session=session.session_id)
        session.send(wire.reply(message.get("id"), capture=self.engine.describe(capture), already=already))

    def images(self, session: ClientSession, message: wire.Message) -> None:
        """Reply with the catalog's images this client may see (every client role), and how many it may not.

        A private image is listed only for the admin role and its owner (cidd/core/rights.py ``may_see``): the
        owner is the user the local socket proved, else the user a scheduler names; a reader's token proves no
        user, so it sees the shared images only. The admin role also gets the entries left out as uninstallable.
        """
        viewer = session.user or (_user_of(session, message) if session.role == "scheduler" else None)
        catalog = self.engine.catalog
        directory = image_dir_of(self.engine.config)
        rows: list[dict[str, Any]] = []
        hidden = 0
        for image_id in catalog:
            entry = catalog.images[image_id]
            if not may_see(session.role, viewer, ImageFacts(entry.id, entry.name, entry.owner, entry.visibility)):
                hidden += 1
                continue
            size, date = _file_facts(os.path.join(directory, entry.file))
            rows.append({"id": entry.id, "name": entry.name, "version": entry.version,
                         "subversion": entry.subversion, "os": entry.os, "owner": entry.owner,
                         "visibility": entry.visibility, "size": entry.size if entry.size is not None else size,
                         "date": date, "description": entry.description})
        extra: dict[str, Any] = {}
        if session.role == "admin":
            extra["unavailable"] = [{"id": image_id, "reason": reason}
                                    for image_id, reason in sorted(catalog.unavailable.items())]
        log.info("client.images", session=session.session_id, role=session.role, shown=len(rows), hidden=hidden)
        session.send(wire.reply(message.get("id"), images=rows, hidden=hidden, **extra))

    def needs_groups(self, session: ClientSession, user: str | None, image: str, names: list[str]) -> bool:
        """Return whether the rights check of this capture needs the groups of ``user`` (a rule names groups)."""
        rules = self.engine.config.rights
        return bool(user) and rules is not None and any(rule.groups for rule in rules) \
            and self._rights_facts(session, image, names) is not None

    def check_rights(self, session: ClientSession, user: str | None, image: str, names: list[str],
                     groups: frozenset[str]) -> None:
        """Return when ``user`` (member of ``groups``) may put ``image`` on ``names`` (cidd/core/rights.py); the admin
        role bypasses rights.

        Unknown images and nodes are left to the engine (a bad request, exit 2). Raises RightsRefused.
        """
        facts = self._rights_facts(session, image, names)
        if facts is not None:
            check_rights(self.engine.config.rights, user, facts, names, lambda _user: groups)

    def _rights_facts(self, session: ClientSession, image: str, names: list[str]) -> ImageFacts | None:
        """Return what the rights check needs of ``image``, or None when rights do not apply to this request.

        They do not for the admin role, nor for an unknown image or node (left to the engine: a bad request).
        """
        entry = self.engine.catalog.get(image)
        if session.role == "admin" or entry is None or not all(self.engine.known(n) for n in names):
            return None
        return ImageFacts(entry.id, entry.name, entry.owner, entry.visibility)

    def status(self, session: ClientSession, message: wire.Message) -> None:
        """Reply with the state of the requested nodes (every node when none is named)."""
        spec = message.get("nodes")
        if spec is None:
            names = sorted(self.engine.nodes)
        else:
            names = hostlists.expand(wire.get_str(message, "nodes") or "")
        unknown = [n for n in names if not self.engine.known(n)]
        rows = [self.engine.node_status(n) for n in names if self.engine.known(n)]
        session.send(wire.reply(message.get("id"), nodes=rows, unknown=hostlists.collect(unknown)))

    def captures(self, session: ClientSession, message: wire.Message) -> None:
        """Reply with the running captures and the most recent ended ones."""
        rows: list[dict[str, Any]] = []
        for capture in self.engine.store.recent_captures(50):
            live = self.engine.captures.get(capture.job)
            current = live if live is not None and live.id == capture.id else capture
            rows.append({"job": current.job, "image": current.image, "state": current.state.value,
                         "user": current.user, "created": current.created, "deadline": current.deadline,
                         "ended": current.ended, "nodes": hostlists.collect(list(current.nodes)),
                         "cancelled_by": current.cancelled_by, **current.counts()})
        session.send(wire.reply(message.get("id"), captures=rows))

    def stats(self, session: ClientSession, message: wire.Message) -> None:
        """Reply with the statistics of the event history (every client role; docs/protocol.md, ``stats``).

        Computed off the reactor thread. Raises BadRequest for a wrong field, CidError(unavailable) when cidd
        keeps no statistics.
        """
        history = history_of(self.engine)
        if history is None:
            raise CidError("cidd keeps no statistics (no history service)", code="unavailable")
        query = parse_query(message)
        history.stats(query).addCallback(
            lambda report: session.send(wire.reply(message.get("id"), stats=report))
        ).addErrback(session.request_failed, message)
        log.info("client.stats", session=session.session_id, role=session.role)

    def reload(self, session: ClientSession, message: wire.Message) -> None:
        """Reload the image catalog (admin only); reply with the number of images, or every problem."""
        if session.role != "admin":
            raise Forbidden(f"role {session.role!r} may not reload the catalog; use the admin token")
        try:
            catalog = self.engine.reload_catalog()
        except CatalogError as exc:
            raise BadRequest(f"{exc}") from None
        session.send(wire.reply(message.get("id"), images=len(catalog), catalog=str(self.engine.config.catalog)))

    def features(self, session: ClientSession, message: wire.Message) -> None:
        """Reply with the scheduler feature -> image map and the default image (every client role)."""
        config = self.engine.config
        session.send(wire.reply(message.get("id"), features=dict(config.features),
                                default_image=config.default_image, release_to_default=config.release_to_default))

    def power(self, session: ClientSession, message: wire.Message) -> None:
        """Run a BMC power action on nodes (admin only); reply with one result per node once all ended.

        ``action`` is status, on, off, cycle or reset. Each node's result is ``{"ok": true, "state": ...}`` or
        ``{"ok": false, "error": "<sentence naming the BMC>"}``; one silent BMC does not hold up the others
        beyond the configured BMC timeout.
        """
        if session.role != "admin":
            raise Forbidden(f"role {session.role!r} may not drive node power; use the admin token")
        action = wire.get_str(message, "action")
        if action not in POWER_ACTIONS:
            raise BadRequest(f"unknown power action {action!r}; use one of {', '.join(POWER_ACTIONS)}")
        engine = self.engine
        if engine.power is None or engine.config.bmc is None:
            raise BadRequest("cidd has no BMC access: configure the 'bmc' section of cidd.yaml")
        names = hostlists.expand(wire.get_str(message, "nodes") or "")
        unknown = [n for n in names if not engine.known(n)]
        if unknown:
            raise UnknownNode(f"unknown node(s) {hostlists.collect(unknown)}; check the hostlist")
        results: dict[str, dict[str, Any]] = {}

        def one(name: str) -> Deferred[None]:
            call = getattr(engine.power, action)  # the node's BMC (IPMI or Redfish) from its group's settings
            d = call(name)
            d.addCallback(lambda state: results.__setitem__(name, {"ok": True, "state": state or action}))
            d.addErrback(lambda f: results.__setitem__(name, {"ok": False, "error": f.getErrorMessage()}))
            return d

        log.info("client.power", action=action, nodes=len(names), session=session.session_id)
        done = DeferredList([one(name) for name in names])
        done.addCallback(lambda _: session.send(wire.reply(message.get("id"), action=action,
                                                           results={n: results[n] for n in names})))

    # --- serial-over-LAN console (docs/power.md) ---

    def console(self, session: ClientSession, message: wire.Message) -> None:
        """Open the SOL console of one node (admin only) and relay it on this session.

        The reply comes at once; then ``console_data`` messages (base64 ``data``) flow both ways until either
        side sends ``console_close`` or cidd sends ``console_closed`` (with a ``reason`` when it failed).
        """
        if session.role != "admin":
            raise Forbidden(f"role {session.role!r} may not open node consoles; use the admin token")
        node = str(wire.get_str(message, "node"))
        engine = self.engine
        if not engine.known(node):
            raise UnknownNode(f"unknown node {node}; check the name or the 'nodes' section of cidd.yaml")
        if engine.power is None or engine.config.bmc is None:
            raise BadRequest("cidd has no BMC access: configure the 'bmc' section of cidd.yaml")
        if id(session) in self.consoles:
            raise BadRequest("this session already has a console open; close it first (console_close)")
        target = engine.power.target(node)  # its group's BMC; raises PowerError (a CidError)
        address = target.address

        def on_data(chunk: bytes) -> None:
            session.send({"type": "console_data", "data": base64.b64encode(chunk).decode("ascii")})

        def on_close(reason: str | None) -> None:
            self.consoles.pop(id(session), None)
            session.send({"type": "console_closed", "node": node, "reason": reason})

        relay = engine.power.console(node, target, on_data, on_close)
        self.consoles[id(session)] = relay

        def cleanup() -> None:
            closing = self.consoles.pop(id(session), None)
            if closing is not None:
                closing.close()

        session.cleanups.append(cleanup)
        log.info("client.console", node=node, bmc=address, session=session.session_id)
        session.send(wire.reply(message.get("id"), node=node, bmc=address))

    def console_data(self, session: ClientSession, message: wire.Message) -> None:
        """Pass what the admin typed (base64 ``data``) to the session's open console."""
        relay = self.consoles.get(id(session))
        if relay is None:
            raise BadRequest("no console is open on this session; send 'console' first")
        try:
            data = base64.b64decode(str(wire.get_str(message, "data")), validate=True)
        except (ValueError, TypeError):
            raise BadRequest("'data' must be base64") from None
        relay.write(data)

    def console_close(self, session: ClientSession, message: wire.Message) -> None:
        """Close the session's console; reply with ``closed`` saying whether one was open."""
        relay = self.consoles.pop(id(session), None)
        if relay is not None:
            relay.close()
            log.info("client.console_closed", node=relay.node, session=session.session_id)
        if message.get("id") is not None:
            session.send(wire.reply(message.get("id"), closed=relay is not None))


def _user_of(session: ClientSession, message: wire.Message) -> str | None:
    """Return the user a request speaks for: its ``user`` field (a scheduler names the job's user), else the
    user the local socket proved, else None."""
    user = message.get("user")
    return user if isinstance(user, str) and user else session.user


def _file_facts(path: str) -> tuple[int | None, float | None]:
    """Return the size and modification time of the image file at ``path`` ((None, None) when it is missing)."""
    try:
        found = os.stat(path)
    except OSError:
        return None, None
    return found.st_size, found.st_mtime
