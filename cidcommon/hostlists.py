"""Hostlist handling through python-hostlist: Slurm ranges and Moab comma lists with ``:ppn`` suffixes.

Pure functions: ``expand`` turns any accepted form into an ordered list of unique names, ``collect`` does
the reverse for display and for the wire.
"""

from __future__ import annotations

import re

import hostlist

from cidcommon.errors import BadHostlist

_PPN = re.compile(r":[^,\[\]]*(?=,|$)")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NODES = 100_000


def expand(text: str) -> list[str]:
    """Return the node names of ``text`` in order, without duplicates.

    Accepts Slurm's ``node[01-16,20]``, Moab's ``n1:ppn=8,n2:ppn=8`` or ``n1+n2`` lists, and white space as a
    separator. Raises BadHostlist, with the reason and an example of the accepted syntax, when it does not parse.
    """
    if not isinstance(text, str) or not text.strip():
        raise BadHostlist("empty hostlist; give node names like 'node[01-16,20]' or 'n1,n2'")
    cleaned = _PPN.sub("", text.strip().replace("+", ",").replace(" ", ","))
    cleaned = re.sub(r",+", ",", cleaned).strip(",")
    try:
        names: list[str] = hostlist.expand_hostlist(cleaned, allow_duplicates=False, sort=False)
    except hostlist.BadHostlist as exc:
        raise BadHostlist(f"bad hostlist {text!r}: {exc}; expected e.g. 'node[01-16,20]' or 'n1,n2'") from None
    if len(names) > MAX_NODES:
        raise BadHostlist(f"hostlist {text!r} names {len(names)} nodes; the limit is {MAX_NODES}")
    bad = [name for name in names if not _NAME.match(name)]
    if bad:
        raise BadHostlist(f"bad node name {bad[0]!r} in hostlist {text!r}; names use letters, digits, '.', '_', '-'")
    return names


def collect(names: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return the compact hostlist (``node[01-03,07]``) naming ``names``; empty string for none."""
    if not names:
        return ""
    return str(hostlist.collect_hostlist(list(names)))
