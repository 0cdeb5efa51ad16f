"""What cidcapt shows: progress lines and the summary on stderr, JSON lines on stdout, and the admin tables.

Human lines start with ``cidcapt:``; ``--quiet`` keeps only the summary and errors. While a capture runs, its
progress is followed by a cidcapt.progress model and shown by a follower: the live terminal view
(cidcapt.progress_live, rich) when stderr is a terminal, else plain lines (cidcapt.progress_text: notable node
events and a summary line every ``--summary-every`` seconds). With ``--json`` every reply and event received
for the capture (keepalives left out) is written to stdout as one JSON line, and the last line is the result
object (``{"type": "result", ..., "exit": N}``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any, TextIO

from cidcapt.capture import CaptureRequest
from cidcapt.progress import ProgressModel, ProgressOptions
from cidcapt.progress_text import Follower, PlainFollower, change_line, size
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
CAPTURES_HEADERS = ["JOB", "IMAGE", "STATE", "NODES", "USER", "CREATED", "DEADLINE", "ENDED", "RUNS"]


def captures_rows(captures: list[dict[str, Any]], now: float) -> list[list[str]]:
    """Return the ``--captures`` rows, one per job (its latest capture; RUNS counts them all: a retried prolog
    that re-attached is one run, a job id asked again after its capture ended is another): JOB IMAGE STATE
    NODES USER CREATED DEADLINE ENDED RUNS. An ended capture shows no deadline."""
    latest: dict[str, dict[str, Any]] = {}
    runs: dict[str, int] = {}
    for cap in captures:
        if not isinstance(cap, dict):
            continue
        job = str(cap.get("job"))
        runs[job] = runs.get(job, 0) + 1
        if job not in latest or (cap.get("created") or 0) > (latest[job].get("created") or 0):
            latest[job] = cap
    rows = []
    for job, cap in latest.items():
        nodes = cap.get("nodes")
        if isinstance(nodes, dict | list):
            nodes = collect(list(nodes)) if nodes else ""
        deadline = "-" if cap.get("ended") else format_when(cap.get("deadline"), now)
        rows.append([cell(cap.get("job")), cell(cap.get("image")), cell(cap.get("state")), cell(nodes),
                     cell(cap.get("user")), format_when(cap.get("created"), now), deadline,
                     format_when(cap.get("ended"), now), str(runs[job])])
    return rows


class Renderer:
    """Writes cidcapt's output; implements cidcapt.capture.Listener."""

    def __init__(self, stdout: TextIO, stderr: TextIO, *, quiet: bool = False, json_lines: bool = False,
                 progress: ProgressOptions | None = None) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.quiet = quiet
        self.json_lines = json_lines
        self.options = progress or ProgressOptions()
        self.follower: Follower | None = None  # from the first acceptance of a capture

    def say(self, text: str, *, always: bool = False) -> None:
        """Write ``cidcapt: text`` to stderr, above the terminal view when it runs (unless quiet and not ``always``)."""
        if always or not self.quiet:
            if self.follower is not None and self.follower.line(text):
                return
            self.stderr.write(f"cidcapt: {text}\n")
            self.stderr.flush()

    def error(self, message: str) -> None:
        """Close the terminal view, then write ``cidcapt: error: message`` to stderr, even when quiet."""
        self.close()
        self.say(f"error: {message}", always=True)

    def close(self) -> None:
        """Stop following the capture's progress (erase the terminal view); again: nothing happens."""
        if self.follower is not None:
            self.follower.close()

    def live_view(self) -> bool:
        """Return True when progress is shown as the live terminal view (ProgressOptions.live; by default when
        stderr is a terminal other than TERM=dumb, and neither --json nor --quiet is given)."""
        if self.options.live is not None:
            return self.options.live
        isatty = getattr(self.stderr, "isatty", None)
        return (not self.quiet and not self.json_lines and callable(isatty) and bool(isatty())
                and os.environ.get("TERM", "dumb") not in ("dumb", "unknown"))

    def _follow(self, request: CaptureRequest, capture: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> None:
        """Start following the capture (the first acceptance), or take its nodes again (a re-attach)."""
        deadline = capture.get("deadline")
        left = (float(deadline) - self.options.wall() if isinstance(deadline, int | float)
                and not isinstance(deadline, bool) else None)
        if self.follower is None:
            model = ProgressModel(request.image, self.options.clock, stall_after=self.options.stall_after)
            model.accepted(nodes, left if left is not None else request.timeout)
            if self.live_view():
                from cidcapt.progress_live import LiveFollower  # rich only on a terminal: a prolog starts fast

                self.follower = LiveFollower(request.job, request.image, model, self.stderr)
            else:
                self.follower = PlainFollower(request.job, model, self.say, self.options.summary_every, self.quiet)
        else:
            self.follower.model.accepted(nodes, left)

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
        self._follow(request, capture, nodes)

    def node_changed(self, event: dict[str, Any]) -> None:
        """Follow one node state change (a line only for notable ones: cidcapt.progress_text)."""
        if self.follower is not None:
            self.follower.node(event)
        else:
            self.say(change_line(event))

    def progress(self, event: Mapping[str, Any]) -> None:
        """Follow an install's progress (bytes written)."""
        if self.follower is not None:
            self.follower.progress(event)

    def tick(self) -> float | None:
        """Let the follower draw or say what is due; return the most seconds to wait before calling again."""
        return self.follower.tick() if self.follower is not None else None

    def lost(self, request: CaptureRequest, address: str, reason: str, accepted: bool) -> None:
        """Say that the session was lost and that cidcapt reconnects."""
        if accepted:
            self.say(f"lost the connection to cidd at {address} ({reason}); re-attaching to job {request.job}")
        else:
            self.say(f"connection to cidd at {address} failed before the capture was accepted ({reason}); retrying")

    # End of a capture
    def summary(self, job: str, image: str, state: str, nodes: dict[str, dict[str, Any]], note: str = "") -> None:
        """Close the terminal view, then write the final per-node summary and the totals line to stderr (even
        when quiet)."""
        self.close()
        ready, failed, pending = counts(nodes, image)
        heads = {"ok": f"all {ready} nodes run {image}" if ready != 1 else f"the node runs {image}",
                 "failed": f"{failed} of {len(nodes)} nodes failed",
                 "deadline": f"deadline passed with {pending} of {len(nodes)} nodes pending",
                 "cancelled": f"cancelled with {len(nodes) - ready} of {len(nodes)} nodes not in {image}",
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


# --- cidcapt --images and --cancel ---

IMAGES_HEADERS = ["IMAGE", "OS", "SIZE", "DATE", "OWNER", "VISIBILITY", "DESCRIPTION"]


def format_date(timestamp: Any) -> str:
    """Return a Unix time as local ``YYYY-MM-DD HH:MM``, or ``-`` when there is none."""
    if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def images_rows(images: list[dict[str, Any]]) -> list[list[str]]:
    """Return the ``--images`` rows: IMAGE OS SIZE DATE (the image file's) OWNER VISIBILITY DESCRIPTION."""
    return [[cell(i.get("id")), cell(i.get("os")), format_bytes(i.get("size")), format_date(i.get("date")),
             cell(i.get("owner")), cell(i.get("visibility")), cell(_short(str(i.get("description") or "")))]
            for i in images if isinstance(i, dict)]


def images_note(hidden: Any, unavailable: Any) -> list[str]:
    """Return the lines under the ``--images`` table: private images not shown, entries cidd cannot install."""
    lines = []
    if isinstance(hidden, int) and hidden > 0:
        lines.append(f"{hidden} private image(s) of other users not shown")
    for entry in unavailable if isinstance(unavailable, list) else []:
        if isinstance(entry, dict):
            lines.append(f"not installable: {entry.get('id')}: {entry.get('reason')}")
    return lines


def cancelled_line(job: str, by: Any) -> str:
    """Return the line a waiting cidcapt says when the capture of ``job`` was cancelled (by ``by``)."""
    who = f" by {by}" if by else ""
    return (f"job {job}: the capture was cancelled{who} (cidcapt --cancel); nodes not rebooted yet keep their "
            "image, nodes on their way to the installer go back to it, installs under way finish")


def cancel_head(capture: dict[str, Any], already: bool) -> str:
    """Return the line ``cidcapt --cancel`` says about the capture it cancelled (or found cancelled)."""
    nodes = capture.get("nodes") if isinstance(capture.get("nodes"), dict) else {}
    what = f"job {capture.get('job')}: capture of {len(nodes)} node(s) to {capture.get('image')}"
    if already:
        return f"{what} was already cancelled by {capture.get('cancelled_by') or '?'}; nothing more to do"
    return f"{what} cancelled by {capture.get('cancelled_by') or '?'}; what becomes of each node:"


# --- cidcapt --stats (docs/operations.md) ---

STATS_PHASES = ("to_installer", "installing", "to_image")
NODE_STATS_HEADERS = ["NODE", "SWITCHES", "OK%", "FAILED", "FAILURES", "RUNGS", "TO_INSTALLER", "INSTALLING",
                      "TO_IMAGE", "LAST-FAILURE"]
REASON_WIDTH = 60


def format_seconds(seconds: Any) -> str:
    """Return a duration for a statistics cell: ``4.2s``, ``42s``, ``12m05s``, ``3h20m``; ``-`` for none."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{int(seconds // 60)}m{int(round(seconds % 60)):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def format_bytes(count: Any) -> str:
    """Return a byte count such as ``512 B``, ``3.4 GiB``; ``-`` for none or zero."""
    if not isinstance(count, int | float) or isinstance(count, bool) or count <= 0:
        return "-"
    return size(count)


def _rate(figures: dict[str, Any]) -> str:
    rate = figures.get("success_rate")
    return f"{100 * rate:.1f}%" if isinstance(rate, int | float) else "-"


def _phase(figures: dict[str, Any], phase: str) -> str:
    """Return ``median/p95`` of a phase, or ``-`` when it was never timed."""
    found = (figures.get("phases") or {}).get(phase) or {}
    if not found.get("count"):
        return "-"
    return f"{format_seconds(found.get('median'))}/{format_seconds(found.get('p95'))}"


def _short(text: str, width: int = REASON_WIDTH) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def node_stats_rows(nodes: list[dict[str, Any]], now: float) -> list[list[str]]:
    """Return the per-node rows of ``--stats``: NODE SWITCHES OK% FAILED FAILURES RUNGS phases LAST-FAILURE."""
    rows = []
    for node in nodes:
        if not isinstance(node, dict):
            continue
        failures = ", ".join(f"{kind} {count}" for kind, count in (node.get("failures") or {}).items())
        rungs = " ".join(f"{rung}:{count}" for rung, count in (node.get("rungs") or {}).items())
        last = node.get("last_failure") or {}
        when = f"{format_when(last.get('ts'), now)}: {_short(str(last.get('reason') or ''))}" if last else ""
        rows.append([cell(node.get("node")), cell(node.get("switches")), _rate(node), cell(node.get("failed")),
                     cell(failures), cell(rungs), *(_phase(node, phase) for phase in STATS_PHASES), cell(when)])
    return rows


def group_stats_rows(items: list[dict[str, Any]], key: str) -> list[list[str]]:
    """Return the per-image or per-group rows of ``--stats`` (``key`` is ``image`` or ``group``)."""
    rows = []
    for item in items:
        if not isinstance(item, dict):
            continue
        rate = item.get("install_rate")
        rows.append([cell(item.get(key)), cell(item.get("switches")), _rate(item), cell(item.get("failed")),
                     *(_phase(item, phase) for phase in STATS_PHASES), format_bytes(item.get("bytes")),
                     f"{format_bytes(rate)}/s" if rate else "-"])
    return rows


def group_stats_headers(key: str) -> list[str]:
    """Return the headers of the per-image or per-group table of ``--stats``."""
    return [key.upper(), "SWITCHES", "OK%", "FAILED", "TO_INSTALLER", "INSTALLING", "TO_IMAGE", "INSTALLED", "RATE"]


def stats_summary(report: dict[str, Any]) -> str:
    """Return the one-line summary of a stats report (totals and what the history covers)."""
    total = report.get("total") or {}
    failures = ", ".join(f"{kind} {count}" for kind, count in (total.get("failures") or {}).items())
    text = (f"{total.get('switches', 0)} switches, {_rate(total)} ok, {total.get('failed', 0)} failed"
            + (f" ({failures})" if failures else "")
            + f", {total.get('fallback_saves', 0)} saved by a fallback rung")
    if total.get("bytes"):
        text += f", {format_bytes(total.get('bytes'))} installed"
    since, days = report.get("events_since"), report.get("rollup_days")
    if isinstance(since, int | float):
        text += f"; events kept since {time.strftime('%Y-%m-%d %H:%M', time.localtime(since))}"
        if isinstance(days, int | float):
            text += f", older history in roll-ups of {days:g} days"
    return text
