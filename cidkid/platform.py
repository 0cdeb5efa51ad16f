"""The seam between the agent and the machine it runs on.

``Platform`` is what ``AgentProtocol`` needs from a node: who it is (``identity``), how it is doing (``health``),
and the two commands cidd can give it (``reboot``, ``install``). ``LinuxPlatform`` is the real node (its installs
go through the streaming installer, ``cidkid.installer``, onto a ``cidkid.target`` target); ``cidkid.sim.SimNode``
a simulated one. Later work (kexec, IPMI-less next-boot) plugs in here without touching the wire protocol.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil
import structlog
from twisted.internet import defer, threads, utils
from twisted.internet.defer import Deferred

log = structlog.get_logger(__name__)

MODES = ("system", "installer")
BOOT_TARGETS = ("installer", "disk")
DEFAULT_MARKER = Path("/etc/cid-image")
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
REBOOT_COMMANDS: tuple[tuple[str, ...], ...] = (("systemctl", "reboot"), ("/sbin/reboot",))
DEFAULT_INSTALL_TARGET = Path("/mnt/cid-target")
SYSTEM_MODE_REASON = ("this node runs its installed system, not the installer: it installs images only in "
                      "installer mode (reboot it with boot=installer)")

#: ``progress(step, done, total)``: bytes done so far of ``total`` (None when unknown) in step ``step``.
ProgressCallback = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class Identity:
    """What the agent says about itself in ``hello``.

    ``mode`` is ``"system"`` (an installed image runs) or ``"installer"``; ``image`` is the image id named by the
    marker in system mode, else None; ``boot_id`` changes at every boot.
    """

    node: str
    mode: str
    image: str | None
    boot_id: str


@dataclass(frozen=True)
class InstallRequest:
    """An ``install`` command: stream ``url`` (``size`` bytes, ``format``) onto the target, check ``sha256``."""

    image: str
    url: str
    sha256: str | None = None
    size: int | None = None
    format: str = "tar.zst"
    agent_token: str | None = None  # the node's own agent token, for the installed system (never logged)


@dataclass(frozen=True)
class InstallResult:
    """The outcome of an install: ``reason`` is a sentence when not ``ok``; ``retry`` whether trying again may help."""

    ok: bool
    reason: str | None = None
    retry: bool = False


class Platform(Protocol):
    """What the agent needs from a node (real or simulated).

    ``reboot_methods`` names the ``method`` values ``reboot`` accepts; others are refused with ``bad_request``.
    """

    reboot_methods: frozenset[str] = frozenset({"reboot"})

    def identity(self) -> Identity:
        """Return who this node is right now (read at every session start)."""
        ...

    def health(self) -> dict[str, Any]:
        """Return the heartbeat figures: ``load1``, ``mem_used_pct``, ``disk_free`` (bytes), ``uptime`` (s)."""
        ...

    def reboot(self, boot: str, method: str) -> None:
        """Leave the running system and boot ``boot`` (``installer`` or ``disk``) using ``method``.

        Called after the reply to cidd was written; it must not block the reactor.
        """
        ...

    def install(self, request: InstallRequest, progress: ProgressCallback) -> Deferred[InstallResult]:
        """Install ``request.image`` onto the target, calling ``progress`` along the way.

        Returns a Deferred firing with the InstallResult; failures are results (``ok=False``), not errbacks.
        """
        ...


def read_marker(path: Path) -> str | None:
    """Return the image id on the first line of the marker file ``path``, or None when absent, empty or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("agent.marker_unreadable", path=str(path), error=str(exc))
        return None
    return first or None


def write_marker(path: Path, image: str) -> None:
    """Write ``image`` as the marker file ``path`` (creating its directory), atomically through a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(image + "\n", encoding="utf-8")
    os.replace(tmp, path)


def short_hostname() -> str:
    """Return this machine's host name without its domain."""
    return socket.gethostname().split(".", 1)[0]


def host_health(target: Path) -> dict[str, Any]:
    """Return the health figures of this machine, with ``disk_free`` measured on the file system of ``target``."""
    try:
        disk_free: int | None = psutil.disk_usage(str(target)).free
    except OSError:
        disk_free = None
    return {
        "load1": round(os.getloadavg()[0], 2),
        "mem_used_pct": round(psutil.virtual_memory().percent, 1),
        "disk_free": disk_free,
        "uptime": round(max(0.0, time.time() - psutil.boot_time()), 1),
    }


class LinuxPlatform(Platform):
    """A real Linux node.

    ``node`` defaults to the short host name; ``mode`` is what the command line says (the installer initramfs
    starts cidkid with ``--mode installer``); the image comes from the ``marker`` file; ``reactor`` must provide
    IReactorProcess (the reboot command) and IReactorThreads (installs run in its thread pool).

    ``target`` is the directory whose free space heartbeats report and, in installer mode, the directory images
    are installed into (emptied first); with ``install_device`` that block device is formatted and mounted on
    ``target`` for each install, and unmounted after it.
    """

    def __init__(self, reactor: Any, *, node: str | None = None, mode: str = "system",
                 marker: Path = DEFAULT_MARKER, target: Path = Path("/"),
                 boot_id_path: Path = BOOT_ID_PATH,
                 reboot_commands: tuple[tuple[str, ...], ...] = REBOOT_COMMANDS,
                 install_device: Path | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self._reactor = reactor
        self.node = node or short_hostname()
        self.mode = mode
        self.marker = Path(marker)
        self.target = Path(target)
        self.install_device = Path(install_device) if install_device is not None else None
        self._boot_id_path = Path(boot_id_path)
        self._fallback_boot_id = str(uuid.uuid4())
        self._reboot_commands = reboot_commands
        self.last_reboot: Deferred[list[str] | None] | None = None

    def identity(self) -> Identity:
        """Return the node name, mode, marker image (system mode only) and kernel boot id."""
        image = read_marker(self.marker) if self.mode == "system" else None
        return Identity(node=self.node, mode=self.mode, image=image, boot_id=self._boot_id())

    def _boot_id(self) -> str:
        """Return the kernel's boot id, or a per-process uuid where the kernel has none."""
        try:
            return self._boot_id_path.read_text(encoding="ascii").strip() or self._fallback_boot_id
        except OSError:
            return self._fallback_boot_id

    def health(self) -> dict[str, Any]:
        """Return load, memory use, free bytes on the install target and uptime."""
        return host_health(self.target)

    def reboot(self, boot: str, method: str) -> None:
        """Run the first of ``reboot_commands`` that works (``systemctl reboot``, else ``/sbin/reboot``).

        The commands run in child processes, one after the other until one exits 0; failures are logged.
        ``last_reboot`` is a Deferred firing with the command that worked (None if none did). ``boot`` is only
        logged and passed to the commands as ``$CID_BOOT`` (and ``$CID_METHOD``): with netboot, which system
        comes up next is decided by cidd's boot profile; a site's own command may use them (grub-reboot ...).
        """
        log.warning("agent.rebooting", node=self.node, boot=boot, method=method)
        self._reboot_env = {**os.environ, "CID_BOOT": boot, "CID_METHOD": method}
        commands = []
        for program, *args in self._reboot_commands:
            path = program if os.path.isabs(program) else shutil.which(program)
            if path and os.access(path, os.X_OK):
                commands.append([path, *args])
        self.last_reboot = self._run_first(commands)

    def _run_first(self, commands: list[list[str]]) -> Deferred[list[str] | None]:
        """Run ``commands`` in turn until one exits 0; return a Deferred firing with it (None: all failed)."""
        if not commands:
            log.error("agent.reboot_failed", node=self.node, reason="no reboot command worked")
            return defer.succeed(None)
        argv, rest = commands[0], commands[1:]
        env = getattr(self, "_reboot_env", None) or dict(os.environ)
        d = utils.getProcessOutputAndValue(argv[0], argv[1:], env=env, reactor=self._reactor)

        def done(result: tuple[bytes, bytes, int]) -> Deferred[list[str] | None] | list[str]:
            _out, err, code = result
            if code == 0:
                return argv
            log.error("agent.reboot_command_failed", node=self.node, command=" ".join(argv), exit=code,
                      stderr=err.decode("utf-8", "replace").strip()[-500:])
            return self._run_first(rest)

        def failed(failure: Any) -> Deferred[list[str] | None]:
            log.error("agent.reboot_command_failed", node=self.node, command=" ".join(argv),
                      error=failure.getErrorMessage())
            return self._run_first(rest)

        return d.addCallbacks(done, failed)

    def install(self, request: InstallRequest, progress: ProgressCallback) -> Deferred[InstallResult]:
        """Prepare the target and stream the image onto it in a thread of the reactor's pool.

        ``progress`` is called on the reactor thread; a reactor shutdown cancels the install (a failed, retryable
        result) instead of waiting for it. Returns a Deferred firing with the InstallResult: a failure
        to prepare or finish the target (mkfs, mount, unmount, emptying) is a failed result with its reason,
        and outside installer mode the install is refused (the running system is never overwritten).
        """
        if self.mode != "installer":
            log.error("agent.install_refused", node=self.node, image=request.image, reason=SYSTEM_MODE_REASON)
            return defer.succeed(InstallResult(ok=False, reason=SYSTEM_MODE_REASON, retry=False))
        from cidkid.installer import stream_install
        from cidkid.target import DeviceTarget, DirectoryTarget, Target

        target: Target = (DeviceTarget(self.install_device, self.target) if self.install_device is not None
                          else DirectoryTarget(self.target))
        reactor = self._reactor
        cancel = threading.Event()  # set when the reactor stops, so that shutdown never waits for a whole image
        trigger = reactor.addSystemEventTrigger("before", "shutdown", cancel.set)

        def report(step: str, done: int, total: int | None) -> None:
            reactor.callFromThread(progress, step, done, total)

        def stream(req: InstallRequest, path: Path, prog: ProgressCallback) -> InstallResult:
            return stream_install(req, path, prog, cancel=cancel)

        def work() -> InstallResult:
            return install_onto(target, request, report, stream)

        def done(result: InstallResult) -> InstallResult:
            with contextlib.suppress(ValueError, KeyError):
                reactor.removeSystemEventTrigger(trigger)
            return result

        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), work).addBoth(done)


def install_onto(target: Any, request: InstallRequest, progress: ProgressCallback,
                 stream: Callable[[InstallRequest, Path, ProgressCallback], InstallResult]) -> InstallResult:
    """Prepare ``target``, run ``stream`` into it, then finish the target; return the InstallResult (blocking).

    Errors of ``prepare``/``finish`` (``cidcommon.errors.CidError``) become failed, non-retryable results; a
    failing ``finish`` turns a success into a failure, since the data may not have reached the disk.
    """
    from cidcommon.errors import CidError

    try:
        path = target.prepare()
    except CidError as exc:
        log.error("agent.target_failed", target=repr(target), step="prepare", reason=exc.message)
        return InstallResult(ok=False, reason=exc.message, retry=False)
    result = InstallResult(ok=False, reason="the installer stopped unexpectedly", retry=False)
    try:
        result = stream(request, path, progress)
    finally:
        try:
            target.finish()
        except CidError as exc:
            log.error("agent.target_failed", target=repr(target), step="finish", reason=exc.message)
            if result.ok:
                result = InstallResult(ok=False, reason=exc.message, retry=False)
    return result
