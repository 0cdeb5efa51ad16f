"""Rights (Kadeploy's karights): who may put which image on which nodes. Pure: no reactor, no socket.

Rules come from the ``rights:`` section of cidd.yaml (docs/configuration.md). Each rule names users and/or
groups (``*``: everyone), image globs (matched against the image id ``debian-12-1`` and its name ``debian``)
and nodes (a hostlist, or ``*`` for every node). The rules are a union: a capture is allowed when every node
is covered by at least one rule that matches the user and the image; otherwise it is refused, naming the
first uncovered node and the rules that were checked. Whatever the rules say, a private image goes only onto
the nodes of its owner's jobs. With no ``rights:`` section at all, every user may capture every shared image
(as before rights existed). The admin role bypasses all of this; the caller (cidd.client_api) decides that.

Two more rules live here: who may cancel a running capture (``check_cancel``: the admin role, or the scheduler
role for the capture's own user) and who may see an image in the image list (``may_see``: a private image
only its owner, as only its owner may use it, whatever the rules say; the admin role every image).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cidcommon import hostlists
from cidcommon.errors import CidError, Forbidden

#: ``groups_of(user)``: the groups of a user on the head node (primary and supplementary).
GroupsOf = Callable[[str], frozenset[str]]


class RightsRefused(Forbidden):
    """A capture that no rights rule allows (wire code ``forbidden``: cidcapt exit code 5)."""


class CancelRefused(Forbidden):
    """A cancel by a role or user that may not cancel that capture (wire code ``forbidden``: exit code 5)."""


@dataclass(frozen=True)
class Rule:
    """One rights rule; ``nodes`` is None for every node, ``users``/``groups`` may hold ``*``."""

    name: str
    users: frozenset[str]
    groups: frozenset[str]
    images: tuple[str, ...]
    nodes: frozenset[str] | None

    def matches_user(self, user: str, groups_of: GroupsOf) -> bool:
        """Return whether the rule applies to ``user`` (by name, by group, or through ``*``)."""
        if "*" in self.users or "*" in self.groups or user in self.users:
            return True
        return bool(self.groups) and bool(self.groups & groups_of(user))

    def matches_image(self, image_id: str, image_name: str) -> bool:
        """Return whether one of the rule's globs matches the image id or name."""
        return any(fnmatch.fnmatchcase(image_id, pattern) or fnmatch.fnmatchcase(image_name, pattern)
                   for pattern in self.images)

    def covers(self, node: str) -> bool:
        """Return whether the rule covers ``node``."""
        return self.nodes is None or node in self.nodes


@dataclass(frozen=True)
class ImageFacts:
    """What rights need to know about an image (from cidcatalog.catalog.Image)."""

    id: str
    name: str
    owner: str
    visibility: str


def check(rules: tuple[Rule, ...] | None, user: str | None, image: ImageFacts, nodes: Iterable[str],
          groups_of: GroupsOf) -> None:
    """Return when ``user`` may put ``image`` on every node of ``nodes``.

    ``rules`` None means "no rights section": every shared image is allowed. Raises RightsRefused, with a
    sentence naming the private image's owner, or the first node no rule covers and the rules checked.
    """
    if image.visibility == "private" and user != image.owner:
        raise RightsRefused(f"image {image.id} is private to {image.owner}; user {user or '(none)'} may not "
                            "use it: ask its owner, or have the catalog make it shared")
    if rules is None:
        return
    if not user:
        raise RightsRefused("rights rules apply but the request names no user; the scheduler must pass the "
                            "job's user (cidcapt --user)")
    usable = [rule for rule in rules if rule.matches_user(user, groups_of) and rule.matches_image(image.id, image.name)]
    for node in nodes:
        if not any(rule.covers(node) for rule in usable):
            checked = ", ".join(rule.name for rule in rules) or "none configured"
            why = ("no rule allows this user this image" if not usable
                   else "the rules allowing this user this image do not cover it")
            raise RightsRefused(f"rights: user {user} may not put image {image.id} on node {node}: {why} "
                                f"(rules checked: {checked}); ask the administrators to extend cidd's 'rights'")


def parse_rules(data: Any, problem: Callable[[str, str], None]) -> tuple[Rule, ...] | None:
    """Return the rules of a ``rights:`` section (None when ``data`` is None: no section).

    Reports each mistake through ``problem(where, message)`` and leaves that rule out.
    """
    if data is None:
        return None
    if not isinstance(data, list):
        problem("rights", "'rights' must be a list of rules like {users: [alice], images: ['debian-*'], "
                "nodes: 'node[001-064]'}")
        return ()
    rules: list[Rule] = []
    for index, item in enumerate(data):
        where = f"rights[{index}]"
        if not isinstance(item, Mapping):
            problem(where, "a rule is a mapping with users and/or groups, images and nodes")
            continue
        unknown = sorted(set(item) - {"name", "users", "groups", "images", "nodes"})
        if unknown:
            problem(where, f"unknown key(s) {', '.join(map(str, unknown))} (known: name, users, groups, images, nodes)")
        users, groups, images = (_words(item.get(key), key, where, problem) for key in ("users", "groups", "images"))
        if not users and not groups:
            problem(where, "a rule needs 'users' and/or 'groups' (use ['*'] for everyone)")
        if not images:
            problem(where, "a rule needs 'images', a list of globs like ['debian-*'] (['*'] for all)")
        spec = item.get("nodes")
        nodes: frozenset[str] | None = None
        if not isinstance(spec, str) or not spec.strip():
            problem(where, "a rule needs 'nodes', a hostlist like 'node[001-064]' ('*' for every node)")
            continue
        if spec.strip() != "*":
            try:
                nodes = frozenset(hostlists.expand(spec))
            except CidError as exc:
                problem(where, exc.message)
                continue
        given = item.get("name")
        name = given if isinstance(given, str) and given else where
        rules.append(Rule(name, frozenset(users), frozenset(groups), tuple(images), nodes))
    return tuple(rules)


def _words(value: Any, key: str, where: str, problem: Callable[[str, str], None]) -> list[str]:
    """Return a list of non-empty strings (a single string counts as one); report anything else."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problem(where, f"'{key}' must be a list of names")
        return []
    return list(value)


def check_cancel(role: str | None, user: str | None, job: str, owner: str | None) -> None:
    """Return when a client of ``role``, speaking for ``user``, may cancel the capture of ``job`` whose user is
    ``owner``.

    The admin role may cancel any capture; the scheduler role a capture whose user is the user it names (the
    user who started it, as the scheduler vouches for the job's user when it starts one); nobody else (the
    reader role never changes anything). Raises CancelRefused saying who may.
    """
    if role == "admin":
        return
    if role != "scheduler":
        raise CancelRefused(f"role {role!r} may not cancel captures; use the admin token, or the scheduler's "
                            "for the job's own user")
    if not user or owner is None or user != owner:
        started = f"by user {owner}" if owner else "without a user (only the admin role may cancel it)"
        raise CancelRefused(f"user {user or '(none)'} may not cancel the capture of job {job}: it was started "
                            f"{started}; only that user (through the scheduler role) or an admin may cancel it")


def may_see(role: str | None, user: str | None, image: ImageFacts) -> bool:
    """Return whether a client of ``role`` speaking for ``user`` may see ``image`` in the image list.

    Shared images are seen by every client role; a private image only by the admin role and by its owner (no
    rights rule gives a private image to another user, so nobody else learns its name, size or date).
    """
    return role == "admin" or image.visibility != "private" or (bool(user) and user == image.owner)
