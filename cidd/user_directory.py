"""Users and groups from the head node's user database, looked up off the reactor thread and cached.

At 3 a.m. the user database may be LDAP behind sssd, and slow or down: one ``getpwuid`` or ``getgrouplist``
can then block for many seconds. Done on the reactor thread, that would stall every agent session of the
cluster. So each lookup runs in a thread of its own and is waited for at most ``timeout`` seconds; its answer
is kept ``ttl`` seconds, and after that it is still served (for up to ``stale_for`` seconds) while a fresh
lookup runs in the background, so a directory outage does not refuse users cidd knew a minute earlier. One
lookup runs per key however many requests wait for it, and at most ``max_running`` run at once.

The cache logic is pure: the thread runner (``run``) and the clock are injected; ``thread_runner`` is the
real one.
"""

from __future__ import annotations

import ctypes
import grp
import pwd
import threading
from collections.abc import Callable
from typing import Any

import structlog
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure

from cidcommon.errors import CidError
from cidd.config_sections import UsersConfig
from cidd.core.rights import GroupsOf
from cidd.unix_peers import PeerIdentity

log = structlog.get_logger(__name__)

#: ``run(function, *args)`` returns a Deferred that fires with ``function(*args)`` computed in another thread.
Run = Callable[..., "Deferred[Any]"]


_libc = ctypes.CDLL(None, use_errno=True)  # the process's own getgrouplist (glibc's, or one preloaded)
_libc.getgrouplist.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint),
                               ctypes.POINTER(ctypes.c_int)]
_libc.getgrouplist.restype = ctypes.c_int


def getgrouplist(user: str, gid: int) -> list[int]:
    """Return the gids of ``user`` (``gid`` included), like ``os.getgrouplist``, without holding the GIL.

    ``os.getgrouplist`` keeps the GIL while glibc asks NSS (LDAP, sssd), so a slow directory would stop the
    reactor thread even with the lookup in another thread; a ctypes call releases the GIL. Raises OSError.
    """
    count = 64
    while True:
        groups = (ctypes.c_uint * count)()
        wanted = ctypes.c_int(count)
        if _libc.getgrouplist(user.encode(), gid, groups, ctypes.byref(wanted)) >= 0:
            return list(groups[:wanted.value])
        if wanted.value <= count:  # failed without asking for more room
            raise OSError(ctypes.get_errno(), f"getgrouplist({user}) failed")
        count = wanted.value


def system_groups_of(user: str) -> frozenset[str]:
    """Return the groups of ``user`` from the head node's user database (empty for an unknown user).

    Blocking (NSS): call it through a UserDirectory, in a thread. pwd and grp release the GIL while they wait.
    """
    try:
        entry = pwd.getpwnam(user)
        gids = getgrouplist(user, entry.pw_gid)
    except (KeyError, OSError):
        return frozenset()
    names = set()
    for gid in gids:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return frozenset(names)


def lookup_peer(uid: int, gid: int, groups_of: Callable[[str], frozenset[str]]) -> PeerIdentity:
    """Return the identity of ``uid``/``gid`` from the user database (a uid without a name keeps its number).

    Blocking (NSS): call it through a UserDirectory, in a thread.
    """
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return PeerIdentity(uid, gid, str(uid), frozenset())
    groups = set(groups_of(user))
    try:
        groups.add(grp.getgrgid(gid).gr_name)
    except KeyError:
        pass
    return PeerIdentity(uid, gid, user, frozenset(groups))


#: The ``users:`` defaults of cidd.yaml (5 s timeout, 5 min ttl, 1 h stale, 16 lookups at once).
DEFAULT_LIMITS = UsersConfig()


class UserDatabaseUnavailable(CidError):
    """The user database did not answer in time, failed, or has too many lookups pending (try again)."""

    code = "unavailable"


def thread_runner(reactor: IReactorFromThreads) -> Run:
    """Return a ``Run`` that calls the function in a new daemon thread and fires its Deferred in the reactor.

    A thread per lookup (lookups are rare: answers are cached), a daemon so that a lookup stuck in NSS never
    keeps cidd from exiting; no pool whose workers a stuck lookup could all take.
    """
    def run(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        deferred: Deferred[Any] = Deferred()

        def body() -> None:
            try:
                value = function(*args)
            except BaseException:  # noqa: BLE001 (delivered as the Deferred's failure)
                reactor.callFromThread(deferred.errback, Failure())
            else:
                reactor.callFromThread(deferred.callback, value)

        threading.Thread(target=body, name="cidd-user-lookup", daemon=True).start()
        return deferred

    return run


class UserDirectory:
    """Cached, non-blocking lookups of a user's groups and of a local peer's identity."""

    def __init__(self, clock: IReactorTime, run: Run, *, groups_of: GroupsOf = system_groups_of,
                 limits: UsersConfig = DEFAULT_LIMITS, max_entries: int = 20000) -> None:
        self.clock = clock
        self.run = run
        self.groups_of = groups_of
        self.ttl = limits.ttl
        self.stale_for = limits.stale_for
        self.timeout = limits.timeout
        self.max_running = limits.max_lookups
        self.max_entries = max_entries
        self._entries: dict[tuple[Any, ...], tuple[Any, float]] = {}
        self._running: dict[tuple[Any, ...], list[tuple[Deferred[Any], IDelayedCall]]] = {}

    def groups(self, user: str) -> Deferred[frozenset[str]]:
        """Return a Deferred firing with the group names of ``user`` (empty for an unknown user).

        It fails with UserDatabaseUnavailable when the database does not answer in ``timeout`` seconds.
        """
        return self._get(("groups", user), f"the groups of user {user}", self.groups_of, user)

    def peer(self, uid: int, gid: int) -> Deferred[PeerIdentity]:
        """Return a Deferred firing with the identity (name, groups) of a local peer's ``uid``/``gid``.

        It fails with UserDatabaseUnavailable like ``groups``.
        """
        return self._get(("peer", uid, gid), f"uid {uid}", lookup_peer, uid, gid, self.groups_of)

    def _get(self, key: tuple[Any, ...], what: str, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        hit = self._entries.get(key)
        if hit is not None:
            value, fetched = hit
            age = self.clock.seconds() - fetched
            if age < self.ttl:
                return succeed(value)
            if age < self.stale_for:
                if key not in self._running and len(self._running) < self.max_running:
                    self._start(key, what, function, args)  # refresh behind the answer already known
                return succeed(value)
        if key not in self._running:
            if len(self._running) >= self.max_running:
                log.warning("user_directory.busy", looking_up=what, running=len(self._running))
                return fail(UserDatabaseUnavailable(
                    f"cidd could not look up {what}: {len(self._running)} lookups are already waiting on the "
                    "head node's user database; try again, and check sssd/LDAP/nscd"))
            self._start(key, what, function, args)
        waiter: Deferred[Any] = Deferred()
        timer = self.clock.callLater(self.timeout, self._expire, key, what, waiter)
        self._running[key].append((waiter, timer))
        return waiter

    def _start(self, key: tuple[Any, ...], what: str, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._running[key] = []
        started = self.clock.seconds()
        self.run(function, *args).addCallbacks(self._answered, self._failed, callbackArgs=(key, what, started),
                                               errbackArgs=(key, what))

    def _answered(self, value: Any, key: tuple[Any, ...], what: str, started: float) -> None:
        self._entries.pop(key, None)  # re-inserted last: the oldest entries are dropped first
        self._entries[key] = (value, self.clock.seconds())
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]
        seconds = self.clock.seconds() - started
        if seconds > self.timeout:
            log.warning("user_directory.late_answer", looking_up=what, seconds=round(seconds, 1))
        for waiter, timer in self._running.pop(key, []):
            timer.cancel()
            waiter.callback(value)

    def _failed(self, failure: Failure, key: tuple[Any, ...], what: str) -> None:
        log.error("user_directory.lookup_failed", looking_up=what, error=failure.getErrorMessage(),
                  traceback=failure.getTraceback())
        for waiter, timer in self._running.pop(key, []):
            timer.cancel()
            waiter.errback(UserDatabaseUnavailable(
                f"cidd could not look up {what} in the head node's user database: {failure.getErrorMessage()}; "
                "try again, and check sssd/LDAP/nscd"))

    def _expire(self, key: tuple[Any, ...], what: str, waiter: Deferred[Any]) -> None:
        if key in self._running:  # the lookup goes on: its answer, when it comes, is cached
            self._running[key] = [(w, t) for w, t in self._running[key] if w is not waiter]
        log.warning("user_directory.slow", looking_up=what, timeout=self.timeout)
        waiter.errback(UserDatabaseUnavailable(
            f"the head node's user database did not answer within {self.timeout:g} s looking up {what}; cidd "
            "keeps the answer when it comes: try again, and check sssd/LDAP/nscd"))
