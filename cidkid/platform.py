"""The seam between the agent and the machine it runs on.

``Platform`` is what ``AgentProtocol`` needs from a node: who it is (``identity``), how it is doing (``health``),
and the two commands cidd can give it (``reboot``, ``install``). ``LinuxPlatform`` is the real node (its installs
go through the streaming installer, ``cidinstall.stream``, onto a ``cidinstall.target`` target);
``cidsim.fleet.SimNode`` a simulated one. The reboot methods (ordinary reboot, kexec, grub-reboot,
efibootmgr --bootnext) are built in ``cidkid.reboots`` and run here.
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

from cidcommon.vocabulary import BootTarget, Mode
from cidinstall.marker import marker_root, read_marker
from cidinstall.types import InstallRequest, InstallResult, ProgressCallback
from cidkid.reboots import REBOOT_METHODS, RebootSpec, Stage, plan, redact

log = structlog.get_logger(__name__)

MODES = tuple(Mode)  # "system", "installer"
BOOT_TARGETS = tuple(BootTarget)  # "installer", "disk"
DEFAULT_MARKER = Path("/etc/cid-image")
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
REBOOT_COMMANDS: tuple[tuple[str, ...], ...] = (("systemctl", "reboot"), ("/sbin/reboot",))
DEFAULT_INSTALL_TARGET = Path("/mnt/cid-target")
SYSTEM_MODE_REASON = ("this node runs its installed system, not the installer: it installs images only in "
                      "installer mode (reboot it with boot=installer)")

DEFAULT_KEXEC_DIR = Path("/run/cid-kexec")

#: ``runner(argv, env)``: run a command; a Deferred firing with (stdout, stderr, exit status).
Runner = Callable[[list[str], dict[str, str]], Deferred[tuple[bytes, bytes, int]]]
#: ``fetcher(url, path)``: download ``url`` into ``path``; a Deferred firing when done (failing on error).
Fetcher = Callable[[str, Path], Deferred[None]]

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

    def reboot(self, boot: str, method: str, spec: RebootSpec | None = None) -> None:
        """Leave the running system and boot ``boot`` (``installer`` or ``disk``) using ``method``.

        ``spec`` holds what cidd named to boot (kexec's kernel, a next-boot entry; cidkid.reboots). Called after
        the reply to cidd was written; it must not block the reactor.
        """
        ...

    def install(self, request: InstallRequest, progress: ProgressCallback) -> Deferred[InstallResult]:
        """Install ``request.image`` onto the target, calling ``progress`` along the way.

        Returns a Deferred firing with the InstallResult; failures are results (``ok=False``), not errbacks.
        """
        ...


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

    reboot_methods = REBOOT_METHODS

    def __init__(self, reactor: Any, *, node: str | None = None, mode: str = "system",
                 marker: Path = DEFAULT_MARKER, target: Path = Path("/"),
                 boot_id_path: Path = BOOT_ID_PATH,
                 reboot_commands: tuple[tuple[str, ...], ...] = REBOOT_COMMANDS,
                 install_device: Path | None = None, kexec_dir: Path = DEFAULT_KEXEC_DIR,
                 grub_boot_dir: Path | None = None, runner: Runner | None = None,
                 fetcher: Fetcher | None = None) -> None:
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
        self.kexec_dir = Path(kexec_dir)
        self.grub_boot_dir = grub_boot_dir
        self._runner: Runner = runner or self._run_process
        self._fetcher: Fetcher = fetcher or self._fetch_http
        self._reboot_env: dict[str, str] = dict(os.environ)
        self.last_reboot: Deferred[list[str] | None] | None = None

    @property
    def root(self) -> Path:
        """Return the root file system whose image ``identity`` reports: the marker is ``<root>/etc/cid-image``
        (``/`` for the default ``/etc/cid-image``); a ``<root>/.cid-incomplete`` there means no image."""
        return marker_root(self.marker)

    def identity(self) -> Identity:
        """Return the node name, mode, marker image (system mode only) and kernel boot id.

        The image is None when the marker is absent, or when ``.cid-incomplete`` lies in ``root`` beside it (an
        install was cut short there: the disk only looks installed).
        """
        image = read_marker(self.marker, root=self.root) if self.mode == "system" else None
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

    def reboot(self, boot: str, method: str, spec: RebootSpec | None = None) -> None:
        """Reboot with ``method`` (cidkid.reboots): fetch kexec's files if needed, then run the method's stages.

        Each stage runs its commands in child processes, one after the other until one exits 0 (a program that
        is not installed counts as failed); a stage where none works stops the reboot, logged as
        ``agent.reboot_failed`` (cidd's rung deadline then climbs its ladder). ``last_reboot`` is a Deferred
        firing with the last command that worked (None if the reboot stopped). The commands see ``$CID_BOOT``
        and ``$CID_METHOD`` (a site's own --reboot-command may use them).
        """
        spec = spec or RebootSpec()
        log.warning("agent.rebooting", node=self.node, boot=boot, method=method, kernel=spec.kernel,
                    entry=spec.entry)
        self._reboot_env = {**os.environ, "CID_BOOT": boot, "CID_METHOD": method}
        if method == "kexec":
            def run(paths: tuple[Path, Path | None]) -> Deferred[list[str] | None]:
                return self._run_stages(plan(method, spec, mode=self.mode, reboot_commands=self._reboot_commands,
                                             kernel_path=paths[0], initrd_path=paths[1]))

            self.last_reboot = self._fetch_kexec(spec).addCallback(run).addErrback(self._reboot_error, method)
            return
        stages = plan(method, spec, mode=self.mode, reboot_commands=self._reboot_commands,
                      grub_boot_dir=self.grub_boot_dir)
        self.last_reboot = self._run_stages(stages)

    def _reboot_error(self, failure: Any, method: str) -> None:
        """Log a reboot that could not start (kexec's files not fetched); return None (no command worked)."""
        log.error("agent.reboot_failed", node=self.node, method=method, reason=failure.getErrorMessage())
        return None

    def _fetch_kexec(self, spec: RebootSpec) -> Deferred[tuple[Path, Path | None]]:
        """Download kexec's kernel (and initramfs) into ``kexec_dir``; fire with their paths."""
        self.kexec_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        kernel, initrd = self.kexec_dir / "vmlinuz", self.kexec_dir / "initrd.img"
        d = self._fetcher(str(spec.kernel), kernel)
        if spec.initrd:
            initrd_url = spec.initrd
            d.addCallback(lambda _: self._fetcher(initrd_url, initrd))
        return d.addCallback(lambda _: (kernel, initrd if spec.initrd else None))

    def _run_stages(self, stages: tuple[Stage, ...]) -> Deferred[list[str] | None]:
        """Run ``stages`` in order; fire with the last command that worked, None when a stage failed."""
        if not stages:
            return defer.succeed(None)
        stage, rest = stages[0], stages[1:]
        commands = []
        for program, *args in stage.commands:
            path = program if os.path.isabs(program) else shutil.which(program)
            if path and os.access(path, os.X_OK):
                commands.append([path, *args])
            else:
                log.error("agent.reboot_command_missing", node=self.node, stage=stage.what, program=program)

        def next_stage(worked: list[str] | None) -> Deferred[list[str] | None] | list[str] | None:
            if worked is None:
                log.error("agent.reboot_failed", node=self.node, stage=stage.what,
                          reason=f"no command of stage '{stage.what}' worked")
                return None
            log.info("agent.reboot_stage_done", node=self.node, stage=stage.what, command=redact(" ".join(worked)))
            return self._run_stages(rest) if rest else worked

        return self._run_first(commands).addCallback(next_stage)

    def _run_first(self, commands: list[list[str]]) -> Deferred[list[str] | None]:
        """Run ``commands`` in turn until one exits 0; return a Deferred firing with it (None: all failed)."""
        if not commands:
            return defer.succeed(None)
        argv, rest = commands[0], commands[1:]
        d = self._runner(argv, self._reboot_env)

        def done(result: tuple[bytes, bytes, int]) -> Deferred[list[str] | None] | list[str]:
            _out, err, code = result
            if code == 0:
                return argv
            log.error("agent.reboot_command_failed", node=self.node, command=redact(" ".join(argv)), exit=code,
                      stderr=redact(err.decode("utf-8", "replace").strip()[-500:]))
            return self._run_first(rest)

        def failed(failure: Any) -> Deferred[list[str] | None]:
            log.error("agent.reboot_command_failed", node=self.node, command=redact(" ".join(argv)),
                      error=redact(failure.getErrorMessage()))
            return self._run_first(rest)

        return d.addCallbacks(done, failed)

    def _run_process(self, argv: list[str], env: dict[str, str]) -> Deferred[tuple[bytes, bytes, int]]:
        """Run ``argv`` as a child process of the reactor; fire with (stdout, stderr, exit status)."""
        return utils.getProcessOutputAndValue(argv[0], argv[1:], env=env, reactor=self._reactor)

    def _fetch_http(self, url: str, path: Path) -> Deferred[None]:
        """Download ``url`` into ``path`` in a thread of the reactor's pool (renamed into place when complete)."""
        import urllib.request

        def work() -> None:
            tmp = path.with_name(path.name + ".part")
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:  # noqa: S310
                shutil.copyfileobj(response, out, 1 << 20)
            os.replace(tmp, path)

        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), work)

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
        from cidinstall.stream import stream_install
        from cidinstall.target import DeviceTarget, DirectoryTarget, Target

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
