"""Slurm integration of cidcapt: the job from a PrologSlurmctld/EpilogSlurmctld environment, the image from the
job's constraint expression, and what the prolog does when the capture did not end well: drain the nodes a
failed switch leaves behind, drain the nodes cidd does not know, or end a job whose request can never succeed.

Pure functions except ``run_scontrol``/``run_drains`` (run scontrol), ``after_capture`` (runs them, and asks
cidd through a callable) and ``release`` (requests through a callable). cidcapt.main wires them to the command
line; exit codes stay in cidcapt.exit_codes.exit_code.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from cidcapt.progress import ProgressOptions
from cidcapt.render import Renderer
from cidcommon.errors import BAD_REQUEST_CODES, BadRequest, CidError
from cidcommon.hostlists import collect, expand

#: Longest drain reason we hand to scontrol. Slurm 22.05 itself stored 5,000 characters without complaint, but
#: ``sinfo -R`` and ``scontrol show node`` are read by people: keep the reason one readable line.
MAX_REASON = 200
#: Seconds one scontrol call may take before it is abandoned (a prolog must not hang on a dead slurmctld).
SCONTROL_TIMEOUT = 30.0
SCONTROL = "scontrol"
#: --release never blocks an epilog for long: seconds to reach cidd, and for each of its two answers.
RELEASE_CONNECT_S = 5.0
RELEASE_REQUEST_S = 5.0
#: Wire codes of a request that can never succeed for this job, whatever nodes it gets: a bad request (two
#: images, a bad constraint, an unknown image) or a refusal by the rights rules. Requeueing such a job would
#: only retry it every two minutes forever, so the prolog ends it instead. Left out: ``unknown_node`` (the job
#: is fine, the node is not cid's: it is drained and the job requeued) and ``conflict`` (another job holds a
#: node for a while: requeueing is right).
JOB_ERROR_CODES = (BAD_REQUEST_CODES - {"unknown_node"}) | {"forbidden"}
#: Longest reason written into a job's AdminComment (``scontrol show job``, ``sacct -o AdminComment``).
MAX_JOB_REASON = 400


class SlurmUsageError(BadRequest):
    """The Slurm environment lacks what the mode needs (no SLURM_JOB_ID, no SLURM_JOB_NODELIST)."""


class ConstraintError(BadRequest):
    """SLURM_JOB_CONSTRAINTS is not a constraint expression Slurm could have accepted."""


class ImageChoiceError(BadRequest):
    """The job's constraint asks for two different images."""


@dataclass(frozen=True)
class SlurmJob:
    """What a Slurm prolog or epilog tells about its job (from the environment Slurm gives it)."""

    job_id: str
    nodes: str  # hostlist, e.g. node[01-04]
    user: str | None = None
    constraints: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SlurmJob:
        """Return the job described by ``env``; raises SlurmUsageError when SLURM_JOB_ID or the nodelist is missing."""
        job_id = (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "").strip()
        nodes = (env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "").strip()
        missing = [name for name, value in (("SLURM_JOB_ID", job_id), ("SLURM_JOB_NODELIST", nodes)) if not value]
        if missing:
            raise SlurmUsageError(f"--slurm needs {' and '.join(missing)} in the environment: run it as "
                                  "PrologSlurmctld/EpilogSlurmctld, or use -j JOB -n HOSTLIST instead")
        return cls(job_id=job_id, nodes=nodes, user=env.get("SLURM_JOB_USER") or None,
                   constraints=(env.get("SLURM_JOB_CONSTRAINTS") or "").strip())


# Constraint expressions -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """One feature word of a constraint expression; ``negated`` when under a ``!``."""

    name: str
    negated: bool = False


_TOKEN = re.compile(r"\s*(?:(?P<op>[&|,()\[\]!])|\*(?P<count>\d+)|(?P<word>[^\s&|,()\[\]*]+)|(?P<bad>\S))")


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """Return (kind, text, position) tokens: kind is op, count or word; raises ConstraintError on a stray char."""
    tokens = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup or "bad"
        if kind == "bad":
            raise ConstraintError(f"bad constraint {text!r}: unexpected {match.group(kind)!r} at character "
                                  f"{match.start(kind) + 1} ('*' must be followed by a count, e.g. rack1*2)")
        tokens.append((kind, match.group(kind), match.start(kind)))
    return tokens


class _Parser:
    """Recursive descent over Slurm's syntax: terms joined by & | , ; groups in () or []; ``!`` and ``*N``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0
        self.terms: list[Term] = []

    def _peek(self) -> tuple[str, str, int] | None:
        """Return the next token, or None at the end."""
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _fail(self, what: str) -> ConstraintError:
        """Return the error for ``what`` went wrong at the current position."""
        token = self._peek()
        where = f"at character {token[2] + 1}" if token else "at the end"
        return ConstraintError(f"bad constraint {self.text!r}: {what} {where}; Slurm's syntax is e.g. "
                               "'img_a&gpu', '[rack1*2&rack2*4]', '(a|b)&c'")

    def parse(self) -> list[Term]:
        """Return the words of the whole expression; raises ConstraintError."""
        if self.tokens:
            self._expr(negated=False, closer=None)
        return self.terms

    def _expr(self, negated: bool, closer: str | None) -> None:
        """Parse terms joined by operators, then ``closer`` (or the end when None)."""
        self._term(negated)
        while (token := self._peek()) is not None and token[0] == "op" and token[1] in "&|,":
            self.pos += 1
            self._term(negated)
        token = self._peek()
        if closer is None and token is not None:
            raise self._fail(f"unexpected {token[1]!r}")
        if closer is not None:
            if token is None or token[1] != closer:
                raise self._fail(f"missing {closer!r}")
            self.pos += 1

    def _term(self, negated: bool) -> None:
        """Parse one ``!``-prefixed or plain word or group, with its optional ``*count``."""
        token = self._peek()
        if token is not None and token[1] == "!":
            self.pos += 1
            negated, token = True, self._peek()
        if token is None:
            raise self._fail("a feature is missing")
        kind, text, _ = token
        self.pos += 1
        if kind == "word":
            self.terms.append(Term(text, negated))
        elif kind == "op" and text in "([":
            self._expr(negated, ")" if text == "(" else "]")
        else:
            self.pos -= 1
            raise self._fail(f"expected a feature, found {text!r}")
        if (after := self._peek()) is not None and after[0] == "count":
            self.pos += 1


def parse_constraint(text: str) -> list[Term]:
    """Return the feature words of a Slurm constraint expression, in order (empty for an empty expression).

    Raises ConstraintError, naming the position, when the expression does not parse.
    """
    return _Parser(text or "").parse()


def choose_image(constraints: str, features: Mapping[str, str], default_image: str | None) -> str | None:
    """Return the image the job's constraint asks for, ``default_image`` when it names no cid feature.

    Only words that are keys of ``features`` (cidd's ``scheduler.features``) count, and not under ``!``.
    Raises ConstraintError for a bad expression, ImageChoiceError when two different images are asked for.
    """
    images: dict[str, list[str]] = {}
    for term in parse_constraint(constraints):
        if not term.negated and term.name in features:
            images.setdefault(features[term.name], []).append(term.name)
    if len(images) > 1:
        named = "; ".join(f"{', '.join(sorted(set(words)))} -> {image}" for image, words in sorted(images.items()))
        raise ImageChoiceError(f"the constraint {constraints!r} asks for {len(images)} different images ({named}); "
                               "a job runs one image: ask for one of these features")
    return next(iter(images), default_image)


# Draining ---------------------------------------------------------------------------------------------------

def clean_reason(text: str, limit: int = MAX_REASON) -> str:
    """Return ``text`` as one line (control characters as spaces, runs of space collapsed), at most ``limit``."""
    line = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


def drain_reasons(job: str, image: str, nodes: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Return {reason: [node, ...]} for the nodes to drain: those that failed or were still pending.

    Nodes ready in ``image`` (or ready with no image said) are left out. Reasons start with ``cid:``.
    """
    reasons: dict[str, list[str]] = {}
    for name, info in nodes.items():
        state = info.get("state")
        if state == "ready" and info.get("image") in (image, None):
            continue
        if state == "failed":
            text = f"cid: job {job}: switch to {image} failed: {info.get('reason') or 'no reason given'}"
        else:
            text = f"cid: job {job}: {image} not ready by the deadline (node still {state or 'unknown'})"
        reasons.setdefault(clean_reason(text), []).append(name)
    return reasons


def drain_commands(job: str, image: str, nodes: Mapping[str, Mapping[str, Any]],
                   scontrol: str = SCONTROL) -> list[list[str]]:
    """Return one scontrol argv per distinct reason draining exactly the failed and pending nodes.

    No shell is involved: the reason is one argument, so quotes and ``$`` in it are harmless.
    """
    return [[scontrol, "update", f"NodeName={collect(names)}", "State=DRAIN", f"Reason={reason}"]
            for reason, names in drain_reasons(job, image, nodes).items()]


Runner = Callable[..., subprocess.CompletedProcess]


def run_drains(commands: list[list[str]], env: Mapping[str, str], say: Callable[[str], None],
               runner: Runner = subprocess.run) -> int:
    """Run the drain commands with ``env`` (SLURM_CONF passes through); return how many failed.

    Each outcome is told through ``say``; a failing or missing scontrol is reported, never raised.
    """
    failures = 0
    for argv in commands:
        problem = run_scontrol(argv, env, runner)
        if problem:
            failures += 1
            say(f"warning: could not drain {argv[2][9:]}: {problem}")
        else:
            say(f"drained {argv[2][9:]}: {argv[4][7:]}")
    return failures


def run_scontrol(argv: list[str], env: Mapping[str, str], runner: Runner = subprocess.run) -> str | None:
    """Run one scontrol command with ``env``; return None when it worked, else why it did not (never raises)."""
    try:
        result = runner(argv, env=dict(env), capture_output=True, text=True, timeout=SCONTROL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if result.returncode != 0:
        return f"scontrol exited {result.returncode}: {(result.stderr or '').strip()}"
    return None


# A job whose request can never succeed -----------------------------------------------------------------------

def ends_job(failure: CidError) -> bool:
    """Return whether ``failure`` means the job can never run as asked (see JOB_ERROR_CODES)."""
    return failure.code in JOB_ERROR_CODES


def end_job_command(job: str, message: str, scontrol: str = SCONTROL) -> list[str]:
    """Return the scontrol argv that turns requeueing off for ``job`` and says why in its AdminComment.

    Slurm cannot requeue the job when the prolog then exits non-zero, so it ends it (CANCELLED); the
    comment is what ``scontrol show job`` and ``sacct -o AdminComment`` show the user.
    """
    reason = clean_reason(f"cid: job not run: {message}", MAX_JOB_REASON)
    return [scontrol, "update", f"JobId={job}", "Requeue=0", f"AdminComment={reason}"]


def unknown_node_drains(job: str, nodes: str, known: set[str], scontrol: str = SCONTROL) -> list[list[str]]:
    """Return the scontrol argv draining the nodes of ``nodes`` (a hostlist) that cidd does not know, if any."""
    unknown = [name for name in expand(nodes) if name not in known]
    if not unknown:
        return []
    reason = clean_reason(f"cid: job {job}: cidd does not know this node (not in cidd.yaml's nodes, and its agent "
                          "never connected)")
    return [[scontrol, "update", f"NodeName={collect(unknown)}", "State=DRAIN", f"Reason={reason}"]]


class SummaryRecorder(Renderer):
    """A Renderer that also keeps how the capture ended: the final summary (state and node states) for the drain
    decision, and the error that stopped the prolog, if any (``failure``)."""

    def __init__(self, stdout: TextIO, stderr: TextIO, *, quiet: bool = False, json_lines: bool = False,
                 progress: ProgressOptions | None = None) -> None:
        super().__init__(stdout, stderr, quiet=quiet, json_lines=json_lines, progress=progress)
        self.state: str | None = None
        self.nodes: dict[str, dict[str, Any]] = {}
        self.failure: CidError | None = None

    def summary(self, job: str, image: str, state: str, nodes: dict[str, dict[str, Any]], note: str = "") -> None:
        """Remember the end of the capture, then write it like Renderer.summary."""
        self.state, self.nodes = state, {name: dict(info) for name, info in nodes.items()}
        super().summary(job, image, state, nodes, note=note)

    def error(self, message: str) -> None:
        """Write ``message`` like Renderer.error, and keep the CidError being handled, if any, as ``failure``.

        cidcapt.main reports every CidError from inside the ``except`` block that caught it, so the error in
        flight is the one ``message`` describes; the prolog needs its wire code, not only its text.
        """
        handled = sys.exc_info()[1]
        if isinstance(handled, CidError):
            self.failure = handled
        super().error(message)


Request = Callable[[dict[str, Any]], dict[str, Any]]


def image_from_features(job: SlurmJob, reply: Mapping[str, Any]) -> str | None:
    """Return the image of ``job`` from cidd's ``features`` reply (see choose_image); raises its errors."""
    features = reply.get("features") if isinstance(reply.get("features"), dict) else {}
    default = reply.get("default_image") if isinstance(reply.get("default_image"), str) else None
    return choose_image(job.constraints, features or {}, default)


def after_capture(job: SlurmJob, image: str, recorder: SummaryRecorder, env: Mapping[str, str], ask: Request,
                  runner: Runner = subprocess.run) -> None:
    """Do what the prolog owes Slurm once the capture (or the request before it) ended badly.

    - nodes failed, or were still pending at the deadline: drain exactly those (the job is requeued elsewhere);
    - the request can never succeed (ends_job): end the job, saying why in its AdminComment;
    - cidd does not know some of the job's nodes: drain those (the job is requeued elsewhere).
    Every outcome is written to the recorder's stream; nothing here raises.
    """
    def say(text: str) -> None:
        recorder.say(text, always=True)

    failure = recorder.failure
    if recorder.state in ("failed", "deadline"):
        run_drains(drain_commands(job.job_id, image, recorder.nodes), env, say, runner)
    elif failure is not None and ends_job(failure):
        command = end_job_command(job.job_id, failure.message)
        problem = run_scontrol(command, env, runner)
        if problem:
            say(f"warning: could not end job {job.job_id} (Slurm will requeue it): {problem}")
        else:
            say(f"job {job.job_id} ended, not requeued: this request can never succeed; the reason is in its "
                f"AdminComment (scontrol show job {job.job_id}; sacct -j {job.job_id} -o JobID,State,AdminComment)")
    elif failure is not None and failure.code == "unknown_node":
        try:
            rows = ask({"type": "status"}).get("nodes") or []
        except CidError as exc:
            say(f"warning: could not find which of {job.nodes} cidd does not know: {exc.message}")
            return
        known = {str(row.get("node")) for row in rows if isinstance(row, dict)}
        run_drains(unknown_node_drains(job.job_id, job.nodes, known), env, say, runner)


# Release (epilog) -------------------------------------------------------------------------------------------

def release(job: str, nodes: str, user: str | None, request: Request, timeout: float = 3600.0) -> str:
    """Start the switch of the job's nodes back to cidd's default image, without waiting; return what was done.

    Does nothing unless cidd's ``release_to_default`` is true. Raises CidError subclasses (the caller turns
    them into a warning: an epilog must not fail for a cid problem).
    """
    reply = request({"type": "features"})
    default = reply.get("default_image")
    if not reply.get("release_to_default") or not isinstance(default, str) or not default:
        return f"job {job}: release_to_default is off in cidd; nodes {nodes} left as they are"
    release_job = f"{job}.release"
    answer = request({"type": "capture", "job": release_job, "nodes": nodes, "image": default,
                      "timeout": int(timeout), "user": user or "slurm", "watch": False})
    capture = answer.get("capture")
    if not isinstance(capture, dict):
        raise CidError("cidd answered the release capture without a 'capture' object", code="bad_reply")
    return f"job {job}: switching {nodes} back to {default} as job {release_job} (state {capture.get('state')})"
