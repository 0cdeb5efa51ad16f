"""User database lookups off the reactor thread (cidd/user_directory.py): the cache with a Clock, real threads
with the real reactor, and the session layer going on while a lookup is slow (StringTransport and a Clock).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from cidcatalog.catalog import load_catalog
from cidcommon.wire import MAX_LINE
from cidd.config import parse_config
from cidd.config_sections import UsersConfig
from cidd.engine import Engine
from cidd.sessions import CiddFactory, PeerProtocol, Sessions
from cidd.store import Store
from cidd.user_directory import UserDatabaseUnavailable, UserDirectory, thread_runner
from tests.fakes import TOKENS, Peer, agent_hello, client

REPO = Path(__file__).resolve().parent.parent


class ManualRun:
    """A ``run`` whose lookups answer when the test says so; ``calls`` lists (function name, args)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.pending: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def __call__(self, function: Any, *args: Any) -> Deferred[Any]:
        self.calls.append((function.__name__, args))
        deferred: Deferred[Any] = Deferred()
        self.pending.append((deferred, function, args))
        return deferred

    def answer(self) -> None:
        """Answer the oldest pending lookup by calling its function now."""
        deferred, function, args = self.pending.pop(0)
        deferred.callback(function(*args))

    def fail(self, error: Exception) -> None:
        deferred, _function, _args = self.pending.pop(0)
        deferred.errback(Failure(error))


GROUPS = {"carol": frozenset({"physics"}), "dave": frozenset()}


def groups_of(user: str) -> frozenset[str]:
    return GROUPS.get(user, frozenset())


def results(deferred: Deferred[Any]) -> list[Any]:
    """Return [value] or [Failure] once ``deferred`` fired, [] while it has not."""
    out: list[Any] = []
    deferred.addBoth(out.append)
    return out


def directory(max_entries: int = 20000, **limits: Any) -> tuple[Clock, ManualRun, UserDirectory]:
    clock, run = Clock(), ManualRun()
    return clock, run, UserDirectory(clock, run, groups_of=groups_of, limits=UsersConfig(**limits),
                                     max_entries=max_entries)


def test_one_lookup_serves_every_waiter_and_is_cached_for_its_ttl() -> None:
    clock, run, users = directory(ttl=300)
    first, second = results(users.groups("carol")), results(users.groups("carol"))
    assert first == [] and second == [] and len(run.calls) == 1  # one lookup for both
    run.answer()
    assert first == second == [frozenset({"physics"})]
    clock.advance(299)
    assert results(users.groups("carol")) == [frozenset({"physics"})] and len(run.calls) == 1


def test_after_the_ttl_the_old_answer_is_served_while_one_refresh_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, run, users = directory(ttl=300, stale_for=3600)
    users.groups("carol")
    run.answer()
    monkeypatch.setitem(GROUPS, "carol", frozenset({"physics", "chemistry"}))
    clock.advance(301)
    assert results(users.groups("carol")) == [frozenset({"physics"})]  # at once, from the cache
    assert results(users.groups("carol")) == [frozenset({"physics"})]
    assert len(run.calls) == 2  # one refresh behind both answers
    run.answer()
    assert results(users.groups("carol")) == [frozenset({"physics", "chemistry"})]


def test_past_stale_for_a_request_waits_for_a_fresh_answer() -> None:
    clock, run, users = directory(ttl=300, stale_for=3600)
    users.groups("dave")
    run.answer()
    clock.advance(3601)
    waiting = results(users.groups("dave"))
    assert waiting == [] and len(run.calls) == 2
    run.answer()
    assert waiting == [frozenset()]


def test_a_slow_database_fails_the_request_after_the_timeout_and_its_late_answer_is_kept() -> None:
    clock, run, users = directory(timeout=5)
    waiting = results(users.groups("carol"))
    clock.advance(4.9)
    assert waiting == []
    clock.advance(0.1)
    [failure] = waiting
    assert failure.check(UserDatabaseUnavailable)
    assert "did not answer within 5 s looking up the groups of user carol" in failure.value.message
    assert failure.value.code == "unavailable"
    again = results(users.groups("carol"))  # joins the lookup still running: no second thread
    assert again == [] and len(run.calls) == 1
    run.answer()  # the late answer serves the waiter and the cache
    assert again == [frozenset({"physics"})]
    assert results(users.groups("carol")) == [frozenset({"physics"})] and len(run.calls) == 1
    assert clock.getDelayedCalls() == []  # no timer left behind


def test_a_failed_lookup_is_an_unavailable_error_and_is_not_cached() -> None:
    _clock, run, users = directory()
    waiting = results(users.groups("carol"))
    run.fail(OSError("sss_nss: Connection refused"))
    [failure] = waiting
    assert failure.check(UserDatabaseUnavailable) and "Connection refused" in failure.value.message
    results(users.groups("carol"))
    assert len(run.calls) == 2  # asked again, not answered from a cache


def test_too_many_pending_lookups_fail_at_once() -> None:
    _clock, run, users = directory(max_lookups=2)
    users.groups("u1")
    users.groups("u2")
    [failure] = results(users.groups("u3"))
    assert failure.check(UserDatabaseUnavailable) and "2 lookups are already waiting" in failure.value.message
    assert len(run.calls) == 2


def test_the_cache_is_bounded_oldest_first() -> None:
    _clock, run, users = directory(max_entries=2)
    for user in ("u1", "u2", "u3"):
        users.groups(user)
        run.answer()
    results(users.groups("u1"))  # dropped: looked up again
    results(users.groups("u3"))  # kept
    assert [args for _name, args in run.calls] == [("u1",), ("u2",), ("u3",), ("u1",)]


def test_a_peer_lookup_gives_its_name_and_groups() -> None:
    _clock, run, users = directory()
    waiting = results(users.peer(0, 0))
    run.answer()
    [peer] = waiting
    assert peer.uid == 0 and peer.user == "root" and "root" in peer.groups


@pytest_twisted.ensureDeferred
async def test_lookups_run_in_another_thread_and_the_reactor_goes_on_meanwhile() -> None:
    release, seen = threading.Event(), []

    def slow_groups(user: str) -> frozenset[str]:
        seen.append(threading.current_thread() is threading.main_thread())
        release.wait(10)
        return frozenset({"physics"})

    users = UserDirectory(reactor, thread_runner(reactor), groups_of=slow_groups, limits=UsersConfig(timeout=10))
    waiting = users.groups("carol")
    ticks = 0
    for _ in range(5):  # the reactor keeps running timed calls while the lookup blocks its thread
        await deferLater(reactor, 0.02, lambda: None)
        ticks += 1
    assert ticks == 5 and not waiting.called
    release.set()
    assert await waiting == frozenset({"physics"})
    assert seen == [False]


# --- a real slow user database: glibc's NSS calls slowed by an LD_PRELOAD shim ------------------------------

SLOW_NSS_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <grp.h>
#include <pwd.h>
#include <unistd.h>
/* Each user database call of glibc takes 0.3 s more, as with an LDAP server that answers slowly. */
#define SLOW(ret, name, params, args) ret name params { \
    ret (*real) params = dlsym(RTLD_NEXT, #name); usleep(300000); return real args; }
SLOW(int, getgrouplist, (const char *u, gid_t g, gid_t *gs, int *n), (u, g, gs, n))
SLOW(int, getpwnam_r, (const char *n, struct passwd *p, char *b, size_t l, struct passwd **r), (n, p, b, l, r))
SLOW(int, getgrgid_r, (gid_t g, struct group *p, char *b, size_t l, struct group **r), (g, p, b, l, r))
"""

#: Runs in a child process under the shim: how often does the reactor tick while one lookup runs?
REACTOR_TICKS = """
import json, os, sys, time
from twisted.internet import reactor, task
from cidd import user_directory
from cidd.config_sections import UsersConfig
from cidd.user_directory import UserDirectory, thread_runner
if sys.argv[1] == "stdlib":  # what cidd did before: os.getgrouplist keeps the GIL while NSS answers
    user_directory.getgrouplist = os.getgrouplist
ticks = []
loop = task.LoopingCall(lambda: ticks.append(time.monotonic()))
users = UserDirectory(reactor, thread_runner(reactor), limits=UsersConfig(timeout=30))
started = time.monotonic()
def done(groups):
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    print(json.dumps({"groups": sorted(groups), "seconds": time.monotonic() - started, "ticks": len(ticks),
                      "longest_gap": max(gaps)}))
    loop.stop()
    reactor.stop()
reactor.callWhenRunning(lambda: (loop.start(0.01), users.groups("root").addCallback(done)))
reactor.run()
"""


def reactor_ticks(tmp_path: Path, mode: str) -> dict[str, Any]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing: install Debian's gcc and libc6-dev (make test does it)")
    shim = tmp_path / "slow_nss.so"
    if not shim.exists():
        (tmp_path / "slow_nss.c").write_text(SLOW_NSS_C)
        subprocess.run([gcc, "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "slow_nss.c"), "-ldl"], check=True)
    env = {**os.environ, "LD_PRELOAD": str(shim), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", REACTOR_TICKS, mode], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_slow_user_database_does_not_stop_the_reactor(tmp_path: Path) -> None:
    ours = reactor_ticks(tmp_path, "cidd")
    assert ours["groups"] == ["root"] and ours["seconds"] >= 0.85  # getpwnam, getgrouplist, getgrgid: 0.3 s each
    assert ours["longest_gap"] < 0.15, ours  # the reactor ran its 10 ms timer all along
    stdlib = reactor_ticks(tmp_path, "stdlib")  # the check itself can fail: os.getgrouplist holds the GIL
    assert stdlib["groups"] == ["root"] and stdlib["longest_gap"] >= 0.29, stdlib


# --- the session layer while the database is slow ---------------------------------------------------------


@pytest.fixture
def rights_world(tmp_path: Path) -> Any:
    clock = Clock()
    clock.advance(1000)
    config = parse_config({"state_dir": str(tmp_path), "heartbeat": 5,
                           "groups": {"default": {"ladder": [{"method": "reboot", "timeout": 50}]}},
                           "rights": [{"name": "physics-rocky", "groups": ["physics"], "images": ["rocky-*"],
                                       "nodes": "n[1-2]"}]})
    sessions = Sessions()
    engine = Engine(config, load_catalog(REPO / "images.yaml"), Store(":memory:"), clock, sessions)
    engine.start()
    run = ManualRun()
    users = UserDirectory(clock, run, groups_of=groups_of)
    return clock, engine, run, CiddFactory(engine, sessions, TOKENS, clock, directory=users)


def test_a_capture_waits_for_its_users_groups_while_other_sessions_are_served(rights_world: Any) -> None:
    clock, engine, run, factory = rights_world
    agent = Peer(factory)
    agent.send(agent_hello(node="n1", image="rocky-9-3"))
    agent.received()
    prolog = client(factory, role="scheduler")
    prolog.send({"type": "capture", "id": 2, "job": "7", "nodes": "n1", "image": "rocky-9-3", "user": "carol"})
    assert prolog.received() == [] and run.calls == [("groups_of", ("carol",))]
    other = client(factory, role="reader")  # meanwhile cidd answers everybody else
    other.send({"type": "status", "id": 3, "nodes": "n1"})
    assert other.received()[0]["nodes"][0]["node"] == "n1"
    agent.send({"type": "heartbeat", "id": 9})
    assert agent.received()[0]["type"] == "reply"
    run.answer()
    [reply] = prolog.received()
    assert reply["type"] == "reply" and reply["capture"]["job"] == "7"
    assert [capture.job for capture in engine.store.recent_captures(10)] == ["7"]


def test_a_group_that_does_not_match_is_refused_after_the_lookup(rights_world: Any) -> None:
    _clock, engine, run, factory = rights_world
    Peer(factory).send(agent_hello(node="n1", image="rocky-9-3"))
    prolog = client(factory, role="scheduler")
    prolog.send({"type": "capture", "id": 2, "job": "8", "nodes": "n1", "image": "rocky-9-3", "user": "dave"})
    run.answer()
    [error] = prolog.received()
    assert error["code"] == "forbidden" and "no rule allows this user this image" in error["message"]
    assert engine.captures == {} and engine.store.recent_captures(10) == []


def test_a_database_that_does_not_answer_refuses_the_capture_with_unavailable(rights_world: Any) -> None:
    clock, engine, run, factory = rights_world
    Peer(factory).send(agent_hello(node="n1", image="rocky-9-3"))
    prolog = client(factory, role="scheduler")
    prolog.send({"type": "capture", "id": 2, "job": "9", "nodes": "n1", "image": "rocky-9-3", "user": "carol"})
    clock.advance(5)
    [error] = prolog.received()
    assert error["id"] == 2 and error["code"] == "unavailable" and "did not answer within 5 s" in error["message"]
    assert engine.captures == {} and engine.store.recent_captures(10) == []
    assert not prolog.closed  # the session stays usable


def test_admin_and_group_free_rules_need_no_lookup(rights_world: Any) -> None:
    _clock, _engine, run, factory = rights_world
    agent = Peer(factory)
    agent.send(agent_hello(node="n1", image="rocky-9-3"))
    admin = client(factory, role="admin")
    admin.send({"type": "capture", "id": 2, "job": "10", "nodes": "n1", "image": "rocky-9-3", "user": "dave"})
    assert admin.received()[0]["type"] == "reply" and run.calls == []


def local_peer(world: Any, monkeypatch: pytest.MonkeyPatch, ids: tuple[int, int]) -> tuple[Clock, ManualRun, Peer]:
    """Return (clock, run, peer): a session on the local socket whose peer has uid/gid ``ids``."""
    clock, engine, run, tcp_factory = world
    factory = CiddFactory(engine, engine.link, TOKENS, clock, unix=True, directory=tcp_factory.directory)
    monkeypatch.setattr(PeerProtocol, "_peer_ids", lambda self: ids)
    return clock, run, Peer(factory)


def test_a_local_peers_input_waits_for_its_identity(rights_world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _clock, run, peer = local_peer(rights_world, monkeypatch, (0, 0))
    peer.send({"type": "hello", "id": 1, "proto": 1, "role": "admin"})
    peer.send({"type": "status", "id": 2})
    assert peer.received() == [] and run.calls == [("lookup_peer", (0, 0, groups_of))]
    run.answer()
    hello, status = peer.received()
    assert hello["type"] == "reply" and status["id"] == 2


def test_a_local_peer_whose_lookup_does_not_answer_is_told_so_and_closed(rights_world: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    clock, _run, peer = local_peer(rights_world, monkeypatch, (4242, 4242))
    peer.send({"type": "hello", "id": 1, "proto": 1, "role": "admin"})
    clock.advance(5)
    [error] = peer.received()
    assert error["code"] == "unavailable" and "uid 4242" in error["message"] and peer.closed


def test_a_local_peer_sending_too_much_before_its_identity_is_known_is_closed(rights_world: Any,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _clock, _run, peer = local_peer(rights_world, monkeypatch, (0, 0))
    peer.send(b"x" * (MAX_LINE + 1))
    [error] = peer.received()
    assert error["code"] == "too_long" and "send the hello and wait for its reply" in error["message"]
    assert peer.closed
