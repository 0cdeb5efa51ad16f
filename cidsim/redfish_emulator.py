"""A Redfish BMC for tests and benchmarks: OpenStack's sushy-emulator (sushy-tools) with its fake driver.

    python -m cidsim.redfish_emulator --port 8443 --cert C --key K --users FILE --systems 'node[07-12]' ...

The Redfish service is sushy-emulator's own Flask application and fake systems driver, unchanged, on 127.0.0.1.
Around it this launcher adds what the tests need and the emulator (2.2) does not have:

- **Sessions.** sushy-emulator has no SessionService. ``POST /redfish/v1/SessionService/Sessions`` checks the
  user and password with the emulator's own user file (its bcrypt htpasswd check) and answers an
  ``X-Auth-Token`` and a ``Location``; ``DELETE`` of that location logs out. A request with a live token goes
  on to the emulator as that user; a dead token gets 401.
- **A journal** (``--journal``): one JSON line per request with its time, method, path, status, how it
  authenticated (session, basic, none), the session id and the JSON body with any ``Password`` masked. This is
  "what the BMC recorded", read by the tests beside the emulator's own state (GET of the system).
- **Fault injection.** ``--stall NAME=S`` holds every request for system NAME for S seconds before the emulator
  sees it (a BMC that does not answer in time). ``--broken NAMES`` declares systems without a power state: the
  emulator's fake driver then fails with its own HTTP 500 on them.
- **HttpBootUri on fake systems.** The fake driver does not record it (the emulator answered 400 to every
  UefiHttp override with a URI); the launcher keeps it on the system, as the libvirt driver does.
- **The simulated hardware's timing.** The fake driver applies a power change 1-11 s (random) after it was asked,
  and only when someone reads the system; ``--power-delay S`` fixes that delay (at most S s), a thread reads every
  system four times a second so that pending changes are applied (and notified) when due, and
  ``--ignore-graceful NAMES`` makes systems ignore GracefulShutdown (a hung OS).
- **Notifications** (``--notify URL``): the fake driver's external notifier PUTs each changed system to URL; the
  simulated fleet listens there (``cid-simfleet --redfish-hw-port``) and powers its nodes off and on.

Users: ``--users FILE`` holds ``user:password`` lines (mode 0600); the launcher writes the emulator's bcrypt
htpasswd file from it. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import secrets
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cidcommon.hostlists import expand

SESSIONS = "/redfish/v1/SessionService/Sessions"


class _FixedDelay(random.Random):
    """The fake driver's ``random``: ``randint`` returns the fixed power delay (seconds, at least 1)."""

    def __init__(self, seconds: int) -> None:
        super().__init__()
        self.seconds = max(1, seconds)

    def randint(self, a: int, b: int) -> int:
        """Return the fixed delay whatever the bounds."""
        return self.seconds


class Journal:
    """JSON lines of every request (thread-safe); ``None`` path: nothing written."""

    def __init__(self, path: Path | None) -> None:
        self._file = path.open("a", encoding="utf-8") if path else None
        self._lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` as one line, flushed."""
        if self._file is None:
            return
        with self._lock:
            self._file.write(json.dumps(entry, sort_keys=True) + "\n")
            self._file.flush()


class SessionLayer:
    """WSGI middleware in front of sushy-emulator: Redfish sessions, the journal, stalls (see the module doc)."""

    def __init__(self, app: Callable[..., Any], check: Callable[[str, str], bool], journal: Journal,
                 stalls: dict[str, float]) -> None:
        self.app = app
        self.check = check
        self.journal = journal
        self.stalls = stalls
        self.sessions: dict[str, tuple[str, str, str]] = {}  # token -> (session id, user, password)
        self._lock = threading.Lock()

    def __call__(self, env: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method, path = env.get("REQUEST_METHOD", "GET"), env.get("PATH_INFO", "")
        body = self._read_body(env)
        entry: dict[str, Any] = {"t": round(time.time(), 3), "method": method, "path": path,
                                 "body": _masked(body)}
        for name, seconds in self.stalls.items():
            if f"/Systems/{name}" in path:
                entry["stalled"] = seconds
                time.sleep(seconds)
        status_box: list[str] = []

        def recording_start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status_box.append(status)
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        try:
            if path.rstrip("/") == SESSIONS and method == "POST":
                return self._login(body, entry, recording_start)
            token = env.get("HTTP_X_AUTH_TOKEN")
            if token is not None:
                with self._lock:
                    known = self.sessions.get(token)
                if known is None:
                    entry["auth"] = "dead session"
                    return _json(recording_start, "401 Unauthorized", {"error": {"message": "session ended"}})
                session_id, user, password = known
                entry.update(auth="session", session=session_id, user=user)
                if method == "DELETE" and path.rstrip("/") == f"{SESSIONS}/{session_id}":
                    with self._lock:
                        self.sessions.pop(token, None)
                    entry["logout"] = True
                    return _json(recording_start, "204 No Content", None)
                basic = base64.b64encode(f"{user}:{password}".encode()).decode()
                env["HTTP_AUTHORIZATION"] = f"Basic {basic}"
            elif env.get("HTTP_AUTHORIZATION", "").startswith("Basic "):
                entry["auth"] = "basic"
            else:
                entry["auth"] = "none"
                if method == "GET" and path.rstrip("/") == "/redfish/v1":
                    return self._service_root(env, recording_start)
            return self.app(env, recording_start)
        finally:
            entry["status"] = int(status_box[0].split()[0]) if status_box else None
            self.journal.write(entry)

    def _service_root(self, env: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """The emulator's service root, with the session service this layer adds (``Links.Sessions``)."""
        captured: list[Any] = []
        body = b"".join(self.app(env, lambda status, headers, exc_info=None: captured.append((status, headers))))
        status, headers = captured[0]
        try:
            doc = json.loads(body)
        except ValueError:
            start_response(status, headers)
            return [body]
        doc["SessionService"] = {"@odata.id": "/redfish/v1/SessionService"}
        doc.setdefault("Links", {})["Sessions"] = {"@odata.id": SESSIONS}
        return _json(start_response, status, doc)

    def _login(self, body: Any, entry: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """Create a session when UserName and Password are right (the emulator's own user file says)."""
        user = body.get("UserName") if isinstance(body, dict) else None
        password = body.get("Password") if isinstance(body, dict) else None
        entry.update(auth="login", user=user)
        if not isinstance(user, str) or not isinstance(password, str) or not self.check(user, password):
            entry["refused"] = True
            return _json(start_response, "401 Unauthorized",
                         {"error": {"code": "Base.1.0.InvalidCredentials",
                                    "message": "The user name or password is not valid."}})
        token, session_id = secrets.token_hex(16), secrets.token_hex(4)
        with self._lock:
            self.sessions[token] = (session_id, user, password)
        entry["session"] = session_id
        location = f"{SESSIONS}/{session_id}"
        return _json(start_response, "201 Created",
                     {"@odata.id": location, "Id": session_id, "UserName": user},
                     [("X-Auth-Token", token), ("Location", location)])

    @staticmethod
    def _read_body(env: dict[str, Any]) -> Any:
        """Read the request body (JSON or None) and put it back for the application."""
        import io

        try:
            length = int(env.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        raw = env["wsgi.input"].read(length) if length > 0 else b""
        env["wsgi.input"] = io.BytesIO(raw)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None


def _masked(body: Any) -> Any:
    """Return ``body`` with any Password value replaced by ``***``."""
    if isinstance(body, dict):
        return {k: ("***" if k.lower() == "password" else _masked(v)) for k, v in body.items()}
    return body


def _json(start_response: Callable[..., Any], status: str, doc: Any,
          headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    """Answer ``doc`` as JSON with ``status``."""
    data = b"" if doc is None else json.dumps(doc).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers])
    return [data]


def fake_systems(names: Iterable[str], broken: set[str], ignore_graceful: set[str], notify: bool,
                 macs: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Return the fake driver's systems: one per name, powered on, one NIC each (MAC 52:54:00:cd:XX:YY)."""
    systems = []
    for number, name in enumerate(names):
        mac = (macs or {}).get(name) or f"52:54:00:cd:{number // 256:02x}:{number % 256:02x}"
        system: dict[str, Any] = {"uuid": name, "name": name,  # the system id is the node name: no alias redirects
                                  "external_notifier": notify, "nics": [{"mac": mac, "ip": "127.0.0.1"}],
                                  "boot_mode": "UEFI"}
        if name not in broken:
            system["power_state"] = "On"
        if name in ignore_graceful:
            system["ignores_graceful"] = True
        systems.append(system)
    return systems


def _patch_driver(delay: int | None) -> None:
    """Fix the fake driver's power delay and let systems marked ``ignores_graceful`` ignore GracefulShutdown."""
    from sushy_tools.emulator.resources.systems import fakedriver

    if delay is not None:
        fakedriver.random = _FixedDelay(delay)  # type: ignore[attr-defined]
    original = fakedriver.FakeDriver.set_power_state

    def set_power_state(self: Any, identity: str, state: str) -> None:
        if state == "GracefulShutdown" and self._get(identity).get("ignores_graceful"):
            self._logger.info("system %s ignores GracefulShutdown (simulated hung OS)", identity)
            return
        original(self, identity, state)

    fakedriver.FakeDriver.set_power_state = set_power_state

    # The fake driver records no HttpBootUri ("Not implemented": the emulator then answers 400 to a UefiHttp
    # override). The emulator calls set_boot_image(system, "Cd", ...) and then set_http_boot_uri(uri), without
    # the system, in the same request thread: remember the system there and keep the URI on it.
    local = threading.local()
    set_boot_image = fakedriver.FakeDriver.set_boot_image

    def remembering_set_boot_image(self: Any, identity: str, device: str, *args: Any, **kwargs: Any) -> None:
        local.identity = identity
        set_boot_image(self, identity, device, *args, **kwargs)

    def set_http_boot_uri(self: Any, uri: str | None) -> None:
        self._update(local.identity, http_boot_uri=uri)

    def get_http_boot_uri(self: Any, identity: str) -> str | None:
        return self._get(identity).get("http_boot_uri")  # type: ignore[no-any-return]

    fakedriver.FakeDriver.set_boot_image = remembering_set_boot_image
    fakedriver.FakeDriver.set_http_boot_uri = set_http_boot_uri
    fakedriver.FakeDriver.get_http_boot_uri = get_http_boot_uri


def _applier(app: Any, stop: threading.Event) -> None:
    """Read every system's power state four times a second, so that pending power changes apply when due."""
    while not stop.wait(0.25):
        try:
            driver = app.systems
            for identity in list(driver.systems):
                system = driver._systems.get(identity) or {}
                if system.get("pending_power"):
                    driver.get_power_state(identity)
        except Exception as exc:  # noqa: BLE001 - the emulator goes on; the next turn tries again
            print(f"redfish-emulator: applier: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _names(hostlist: str) -> set[str]:
    """Return the names of an optional hostlist."""
    return set(expand(hostlist)) if hostlist else set()


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(prog="python -m cidsim.redfish_emulator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    p.add_argument("--cert", type=Path, help="TLS certificate (PEM); with --key: HTTPS, else plain HTTP")
    p.add_argument("--key", type=Path, help="TLS private key (PEM)")
    p.add_argument("--users", type=Path, required=True, help="file of user:password lines (mode 0600)")
    p.add_argument("--systems", required=True, help="hostlist of the fake systems (one per node)")
    p.add_argument("--broken", default="", help="hostlist of systems without a power state (HTTP 500)")
    p.add_argument("--ignore-graceful", default="", help="hostlist of systems that ignore GracefulShutdown")
    p.add_argument("--stall", action="append", default=[], metavar="NAME=S", help="hold NAME's requests S s")
    p.add_argument("--notify", help="URL the fake driver PUTs changed systems to (the simulated hardware)")
    p.add_argument("--journal", type=Path, help="append one JSON line per request to this file")
    p.add_argument("--power-delay", type=int, help="seconds before a power change applies (default: 1-11 random)")
    p.add_argument("--state-dir", type=Path, help="the fake driver's state directory (default: a temporary one)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the emulator until SIGTERM/SIGINT; return the exit status."""
    args = build_parser().parse_args(argv)
    import bcrypt
    from sushy_tools.emulator import auth_basic
    from sushy_tools.emulator import main as emulator

    state = args.state_dir or Path(tempfile.mkdtemp(prefix="cid-redfish-"))
    state.mkdir(parents=True, exist_ok=True)
    htpasswd = state / "htpasswd"
    lines = []
    for line in args.users.read_text(encoding="utf-8").splitlines():
        user, sep, password = line.strip().partition(":")
        if sep:
            lines.append(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}")
    htpasswd.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.chmod(htpasswd, 0o600)
    stalls = {}
    for item in args.stall:
        name, _, seconds = item.partition("=")
        stalls[name] = float(seconds)
    _patch_driver(args.power_delay)
    app = emulator.app
    app.configure(extra_config={
        "SUSHY_EMULATOR_FAKE_DRIVER": True,
        "SUSHY_EMULATOR_FAKE_SYSTEMS": fake_systems(expand(args.systems), _names(args.broken),
                                                    _names(args.ignore_graceful), bool(args.notify)),
        "EXTERNAL_NOTIFICATION_URL": args.notify or "http://127.0.0.1:9/",
        "SUSHY_EMULATOR_AUTH_FILE": str(htpasswd),
        "SUSHY_EMULATOR_STATE_DIR": str(state),
        "SUSHY_EMULATOR_VMEDIA_DEVICES": {"Cd": {"Name": "Virtual CD", "MediaTypes": ["CD", "DVD"]}},
    })

    def check(user: str, password: str) -> bool:
        try:
            auth_basic.authenticate(str(htpasswd), user, password.encode())
        except Exception:  # noqa: BLE001 - the emulator's Unauthorized (or a malformed entry): refused
            return False
        return True

    app.wsgi_app = SessionLayer(app.wsgi_app, check, Journal(args.journal), stalls)  # type: ignore[method-assign]
    context = None
    if args.cert and args.key:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(args.cert), str(args.key))
    stop = threading.Event()
    threading.Thread(target=_applier, args=(app, stop), name="applier", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(f"redfish-emulator: listening on 127.0.0.1:{args.port} ({'https' if context else 'http'})",
          file=sys.stderr, flush=True)
    try:
        app.run(host="127.0.0.1", port=args.port, ssl_context=context, threaded=True)
    except KeyboardInterrupt:
        pass
    stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
