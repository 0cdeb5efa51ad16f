"""What cidcapt shows: progress lines and the summary on stderr, JSON lines on stdout, and the admin tables.

Human lines start with ``cidcapt:``; ``--quiet`` keeps only the summary and errors. With ``--json`` every
reply and event received for the capture (keepalives left out) is written to stdout as one JSON line, and
the last line is the result object (``{"type": "result", ..., "exit": N}``).
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from cidcapt.capture import CaptureRequest
from cidcommon.hostlists import collect

#: With more nodes than this, summary rows that differ only by node name are merged into one hostlist row.
GROUP_ABOVE = 8


def format_age(seconds: float) -> str:
    """Return a short duration such as ``42s``, ``5m``, ``3h`` or ``2d`` (rounded down, never negative)."""
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds // 60:.0f}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600:.0f}h"
    return f"{seconds // 86400:.0f}d"


def format_when(timestamp: Any, now: float) -> str:
    """Return ``3s ago`` / ``in 5m`` for a Unix time, or ``-`` when there is none."""
    if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
        return "-"
    delta = now - float(timestamp)
    return f"{format_age(delta)} ago" if delta >= 0 else f"in {format_age(-delta)}"


def cell(value: Any) -> str:
    """Return a table cell: ``-`` for None or empty, yes/no for booleans, the text otherwise."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_table(headers: list[str] | None, rows: list[list[str]], indent: str = "") -> list[str]:
    """Return the lines of a table whose columns are aligned (two spaces apart, trailing space removed)."""
    all_rows = ([headers] if headers else []) + rows
    if not all_rows:
        return []
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(all_rows[0]))]
    return [(indent + "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True))).rstrip()
            for row in all_rows]


def counts(nodes: dict[str, dict[str, Any]], image: str) -> tuple[int, int, int]:
    """Return ``(ready, failed, pending)``: ready means ready in ``image``; pending is everything else."""
    ready = sum(1 for info in nodes.values() if info.get("state") == "ready" and info.get("image") in (image, None))
    failed = sum(1 for info in nodes.values() if info.get("state") == "failed")
    return ready, failed, len(nodes) - ready - failed


def _pending_reason(info: dict[str, Any]) -> str:
    """Return what a node that is neither ready nor failed was doing last."""
    state = info.get("state") or "unknown"
    if state == "ready":
        return f"runs {cell(info.get('image'))}, not switched yet"
    doing = info.get("step") or info.get("detail")
    return f"still {state}" + (f" ({doing})" if doing else "")


def summary_rows(nodes: dict[str, dict[str, Any]], image: str, group_above: int = GROUP_ABOVE) -> list[list[str]]:
    """Return the summary rows ``[node, state, image, reason]``, one per node or one per group of same rows.

    Nodes that are not ready in ``image`` and have no reason get one (``still installing (writing 40%)``).
    With more than ``group_above`` nodes, rows equal but for the node are merged into one hostlist row.
    """
    rows: list[tuple[str, tuple[str, str, str]]] = []
    for name, info in nodes.items():
        state = info.get("state")
        reason = info.get("reason")
        if not reason and not (state == "ready" and info.get("image") in (image, None)) and state != "failed":
            reason = _pending_reason(info)
        rows.append((name, (cell(state), cell(info.get("image")), reason or "")))
    if len(rows) <= group_above:
        return [[name, *rest] for name, rest in rows]
    groups: dict[tuple[str, str, str], list[str]] = {}
    for name, rest in rows:
        groups.setdefault(rest, []).append(name)
    return [[collect(names), *rest] for rest, names in groups.items()]


def status_rows(nodes: list[dict[str, Any]], now: float) -> list[list[str]]:
    """Return the ``--status`` rows: NODE STATE IMAGE TARGET JOB ONLINE LAST-SEEN REASON."""
    return [[cell(n.get("node")), cell(n.get("state")), cell(n.get("image")), cell(n.get("target")),
             cell(n.get("job")), cell(n.get("online")), format_when(n.get("last_seen"), now), cell(n.get("reason"))]
            for n in nodes if isinstance(n, dict)]


STATUS_HEADERS = ["NODE", "STATE", "IMAGE", "TARGET", "JOB", "ONLINE", "LAST-SEEN", "REASON"]
CAPTURES_HEADERS = ["JOB", "IMAGE", "STATE", "NODES", "USER", "CREATED", "DEADLINE", "ENDED"]


def captures_rows(captures: list[dict[str, Any]], now: float) -> list[list[str]]:
    """Return the ``--captures`` rows: JOB IMAGE STATE NODES USER CREATED DEADLINE ENDED."""
    rows = []
    for cap in captures:
        if not isinstance(cap, dict):
            continue
        nodes = cap.get("nodes")
        if isinstance(nodes, dict | list):
            nodes = collect(list(nodes)) if nodes else ""
        rows.append([cell(cap.get("job")), cell(cap.get("image")), cell(cap.get("state")), cell(nodes),
                     cell(cap.get("user")), format_when(cap.get("created"), now),
                     format_when(cap.get("deadline"), now), format_when(cap.get("ended"), now)])
    return rows


class Renderer:
    """Writes cidcapt's output; implements cidcapt.capture.Listener."""

    def __init__(self, stdout: TextIO, stderr: TextIO, *, quiet: bool = False, json_lines: bool = False) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.quiet = quiet
        self.json_lines = json_lines

    def say(self, text: str, *, always: bool = False) -> None:
        """Write ``cidcapt: text`` to stderr (unless quiet and not ``always``)."""
        if always or not self.quiet:
            self.stderr.write(f"cidcapt: {text}\n")
            self.stderr.flush()

    def error(self, message: str) -> None:
        """Write ``cidcapt: error: message`` to stderr, even when quiet."""
        self.say(f"error: {message}", always=True)

    def json(self, obj: Any) -> None:
        """Write one JSON line to stdout and flush it (machines follow it live)."""
        self.stdout.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")
        self.stdout.flush()

    # Listener
    def message(self, message: dict[str, Any]) -> None:
        """Pass a received reply or event to stdout in --json mode."""
        if self.json_lines:
            self.json(message)

    def accepted(self, request: CaptureRequest, capture: dict[str, Any], nodes: dict[str, dict[str, Any]],
                 reattach: bool) -> None:
        """Say that cidd accepted (or re-attached) the capture, with how many nodes are already done."""
        ready, failed, pending = counts(nodes, request.image)
        total = ready + failed + pending
        already = f"{ready} already in the image" + (f", {failed} failed" if failed else "")
        if reattach:
            head = f"job {request.job}: re-attached to the capture of {total} nodes to {request.image}"
        elif capture.get("attached"):
            head = f"job {request.job}: joined the running capture of {total} nodes to {request.image}"
        else:
            head = f"job {request.job}: capture of {total} nodes to {request.image} accepted"
        self.say(f"{head} ({already}, {pending} to switch)")

    def node_changed(self, event: dict[str, Any]) -> None:
        """Say one node state change: ``node03  installing -> to_image  (image written)``."""
        detail = event.get("reason") or event.get("detail")
        text = f"{event.get('node')}  {event.get('from') or '-'} -> {event.get('to')}"
        self.say(text + (f"  ({detail})" if detail else ""))

    def lost(self, request: CaptureRequest, address: str, reason: str, accepted: bool) -> None:
        """Say that the session was lost and that cidcapt reconnects."""
        if accepted:
            self.say(f"lost the connection to cidd at {address} ({reason}); re-attaching to job {request.job}")
        else:
            self.say(f"connection to cidd at {address} failed before the capture was accepted ({reason}); retrying")

    # End of a capture
    def summary(self, job: str, image: str, state: str, nodes: dict[str, dict[str, Any]], note: str = "") -> None:
        """Write the final per-node summary and the totals line to stderr (even when quiet)."""
        ready, failed, pending = counts(nodes, image)
        heads = {"ok": f"all {ready} nodes run {image}" if ready != 1 else f"the node runs {image}",
                 "failed": f"{failed} of {len(nodes)} nodes failed",
                 "deadline": f"deadline passed with {pending} of {len(nodes)} nodes pending",
                 "error": f"stopped with {pending} of {len(nodes)} nodes pending (last known states)"}
        self.say(f"job {job}: {heads.get(state, state)}" + (f"; {note}" if note else ""), always=True)
        for line in format_table(None, summary_rows(nodes, image), indent="  "):
            self.stderr.write(line + "\n")
        self.say(f"job {job}: {ready} ready, {failed} failed, {pending} pending", always=True)

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        """Write a table to stdout."""
        for line in format_table(headers, rows):
            self.stdout.write(line + "\n")
        self.stdout.flush()
