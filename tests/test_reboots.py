"""Agent-side reboot methods: the exact commands LinuxPlatform runs for each method, and the real tools.

The runner is injected to record argv (nothing here reboots this machine); where a real tool can run without
harm it does: grub-reboot writes a grubenv under tmp_path (read back with grub-editenv), efibootmgr meets a
machine without EFI variables (the reboot must then stop), kexec's files are fetched over real HTTP.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.web.server import Site
from twisted.web.static import File

from cidcommon.errors import BadRequest
from cidkid.platform import LinuxPlatform
from cidkid.reboots import RebootSpec, parse_spec, plan

REBOOT = (("systemctl", "reboot"), ("/sbin/reboot",))


class Recorder:
    """An injected runner: records argv and environment, answers with the exit status the test chooses."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.envs: list[dict[str, str]] = []
        self.fail = fail or set()

    def __call__(self, argv: list[str], env: dict[str, str]) -> Deferred[tuple[bytes, bytes, int]]:
        self.calls.append([Path(argv[0]).name, *argv[1:]])
        self.envs.append(env)
        code = 1 if Path(argv[0]).name in self.fail else 0
        return defer.succeed((b"", b"refused" if code else b"", code))


def fake_fetch(fetched: list[tuple[str, Path]]):
    def fetch(url: str, path: Path) -> Deferred[None]:
        fetched.append((url, path))
        path.write_bytes(b"x")
        return defer.succeed(None)
    return fetch


def platform(tmp_path: Path, runner: Recorder, mode: str = "system", **kw) -> LinuxPlatform:
    # /bin/true stands for every program so that the PATH lookup finds it; the recorder names the argv.
    return LinuxPlatform(reactor, node="n1", mode=mode, runner=runner, kexec_dir=tmp_path / "kexec",
                         reboot_commands=(("/bin/true",),), **kw)


@pytest.fixture(autouse=True)
def tools_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put a directory on PATH where kexec, systemctl, grub-reboot and efibootmgr exist (as /bin/true links)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("kexec", "systemctl", "grub-reboot", "efibootmgr"):
        (bin_dir / name).symlink_to("/bin/true")
    monkeypatch.setenv("PATH", f"{bin_dir}")


def test_ordinary_reboot_runs_the_reboot_command(tmp_path: Path) -> None:
    runner = Recorder()
    p = platform(tmp_path, runner)
    p.reboot("installer", "reboot")
    assert runner.calls == [["true"]]
    assert runner.envs[0]["CID_BOOT"] == "installer" and runner.envs[0]["CID_METHOD"] == "reboot"
    assert p.last_reboot is not None and p.last_reboot.result == ["/bin/true"]


def test_kexec_in_a_system_fetches_loads_then_shuts_down_through_systemd(tmp_path: Path) -> None:
    runner, fetched = Recorder(), []
    p = platform(tmp_path, runner, fetcher=fake_fetch(fetched))
    spec = RebootSpec(kernel="http://10.0.0.1:38080/boot/files/vmlinuz",
                      initrd="http://10.0.0.1:38080/boot/files/initrd.img", cmdline="cid.node=n1 cid.token=T q")
    p.reboot("installer", "kexec", spec)
    k, i = tmp_path / "kexec" / "vmlinuz", tmp_path / "kexec" / "initrd.img"
    assert fetched == [(spec.kernel, k), (spec.initrd, i)]
    assert runner.calls == [["kexec", "-l", str(k), f"--initrd={i}", "--command-line=cid.node=n1 cid.token=T q"],
                            ["systemctl", "kexec"]]


def test_kexec_in_the_installer_jumps_at_once_and_falls_back(tmp_path: Path) -> None:
    runner = Recorder()
    p = platform(tmp_path, runner, mode="installer", fetcher=fake_fetch([]))
    p.reboot("disk", "kexec", RebootSpec(kernel="http://h/k", cmdline="root=LABEL=cid-root ro"))
    k = tmp_path / "kexec" / "vmlinuz"
    assert runner.calls == [["kexec", "-l", str(k), "--command-line=root=LABEL=cid-root ro"], ["kexec", "-e"]]
    # an installed system whose systemd refuses falls back to kexec -e
    runner = Recorder(fail={"systemctl"})
    p = platform(tmp_path, runner, fetcher=fake_fetch([]))
    p.reboot("disk", "kexec", RebootSpec(kernel="http://h/k"))
    assert [c[:2] for c in runner.calls] == [["kexec", "-l"], ["systemctl", "kexec"], ["kexec", "-e"]]


def test_a_failed_kexec_load_does_not_jump_and_the_log_hides_the_token(tmp_path: Path) -> None:
    runner = Recorder(fail={"kexec"})
    p = platform(tmp_path, runner, fetcher=fake_fetch([]))
    with capture_logs() as logs:
        p.reboot("installer", "kexec", RebootSpec(kernel="http://h/k", cmdline="cid.node=n1 cid.token=S3cr3t q"))
    assert "S3cr3t" in " ".join(runner.calls[0])  # the real command gets the token ...
    assert "S3cr3t" not in repr(logs) and "cid.token=*** q" in repr(logs)  # ... the log does not
    assert len(runner.calls) == 1 and runner.calls[0][:2] == ["kexec", "-l"]
    assert p.last_reboot is not None and p.last_reboot.result is None


def test_a_failed_kexec_download_stops_the_reboot(tmp_path: Path) -> None:
    runner = Recorder()

    def fetch(url: str, path: Path) -> Deferred[None]:
        return defer.fail(OSError("HTTP Error 404: Not Found"))

    p = platform(tmp_path, runner, fetcher=fetch)
    p.reboot("installer", "kexec", RebootSpec(kernel="http://h/k"))
    assert runner.calls == [] and p.last_reboot is not None and p.last_reboot.result is None


def test_grub_reboot_sets_the_entry_then_reboots(tmp_path: Path) -> None:
    runner = Recorder()
    platform(tmp_path, runner).reboot("installer", "grub_reboot", RebootSpec(entry="cid-installer"))
    assert runner.calls == [["grub-reboot", "cid-installer"], ["true"]]
    runner = Recorder()
    platform(tmp_path, runner, grub_boot_dir=Path("/mnt/cid-target/boot")).reboot(
        "disk", "grub_reboot", RebootSpec(entry="debian"))
    assert runner.calls == [["grub-reboot", "--boot-directory=/mnt/cid-target/boot", "debian"], ["true"]]


def test_efi_bootnext_sets_the_number_then_reboots_and_a_failure_stops_it(tmp_path: Path) -> None:
    runner = Recorder()
    platform(tmp_path, runner).reboot("installer", "efi_bootnext", RebootSpec(entry="0003"))
    assert runner.calls == [["efibootmgr", "--bootnext", "0003"], ["true"]]
    runner = Recorder(fail={"efibootmgr"})
    p = platform(tmp_path, runner)
    p.reboot("installer", "efi_bootnext", RebootSpec(entry="0003"))
    assert runner.calls == [["efibootmgr", "--bootnext", "0003"]]  # no reboot into the wrong system
    assert p.last_reboot is not None and p.last_reboot.result is None


def test_specs_missing_what_the_method_needs_are_refused() -> None:
    with pytest.raises(BadRequest, match="needs 'kernel'"):
        parse_spec("kexec", {"type": "reboot"})
    with pytest.raises(BadRequest, match="needs 'entry'"):
        parse_spec("grub_reboot", {"type": "reboot"})
    with pytest.raises(BadRequest, match="hexadecimal"):
        parse_spec("efi_bootnext", {"type": "reboot", "entry": "0003; reboot"})
    assert parse_spec("reboot", {"type": "reboot"}) == RebootSpec()
    with pytest.raises(BadRequest, match="unknown reboot method"):
        plan("warp", RebootSpec(), mode="system", reboot_commands=REBOOT)


# --- the real tools ------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_real_grub_reboot_writes_the_next_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grub_reboot = shutil.which("grub-reboot", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert grub_reboot, "grub-reboot is missing: make sysdeps (Debian grub2-common)"
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    boot_dir = tmp_path / "boot"
    (boot_dir / "grub").mkdir(parents=True)
    flag = tmp_path / "rebooted"
    p = LinuxPlatform(reactor, node="n1", grub_boot_dir=boot_dir,
                      reboot_commands=(("/bin/sh", "-c", f'echo "$CID_METHOD $CID_BOOT" > {flag}'),))
    p.reboot("installer", "grub_reboot", RebootSpec(entry="cid-installer"))
    assert p.last_reboot is not None
    worked = await p.last_reboot.addTimeout(30, reactor)
    assert worked is not None and flag.read_text() == "grub_reboot installer\n"
    env = subprocess.run(["grub-editenv", str(boot_dir / "grub" / "grubenv"), "list"], capture_output=True,
                         text=True, check=True).stdout
    assert "next_entry=cid-installer" in env


@pytest.mark.machine_safety
@pytest_twisted.ensureDeferred
async def test_real_efibootmgr_without_efi_variables_stops_before_the_reboot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert shutil.which("efibootmgr", path="/usr/sbin:/usr/bin:/sbin:/bin"), "make sysdeps (Debian efibootmgr)"
    if Path("/sys/firmware/efi/efivars").exists():
        pytest.skip("this machine has EFI variables: efibootmgr would really change its next boot")
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    flag = tmp_path / "rebooted"
    p = LinuxPlatform(reactor, node="n1", reboot_commands=(("/bin/sh", "-c", f"touch {flag}"),))
    p.reboot("installer", "efi_bootnext", RebootSpec(entry="0003"))
    assert p.last_reboot is not None
    assert await p.last_reboot.addTimeout(30, reactor) is None
    assert not flag.exists()


@pytest_twisted.ensureDeferred
async def test_kexec_files_come_over_real_http(tmp_path: Path) -> None:
    served = tmp_path / "www"
    served.mkdir()
    (served / "vmlinuz").write_bytes(b"K" * 300_000)
    (served / "initrd.img").write_bytes(b"I" * 500_000)
    port = reactor.listenTCP(0, Site(File(str(served))), interface="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{port.getHost().port}"
        runner = Recorder()
        p = LinuxPlatform(reactor, node="n1", mode="installer", runner=runner, kexec_dir=tmp_path / "kexec")
        p.reboot("installer", "kexec", RebootSpec(kernel=f"{base}/vmlinuz", initrd=f"{base}/initrd.img",
                                                  cmdline="cid.node=n1"))
        assert p.last_reboot is not None
        await p.last_reboot.addTimeout(30, reactor)
    finally:
        await port.stopListening()
    assert (tmp_path / "kexec" / "vmlinuz").read_bytes() == b"K" * 300_000
    assert (tmp_path / "kexec" / "initrd.img").stat().st_size == 500_000
    assert runner.calls[0][0] == "kexec" and runner.calls[-1] == ["kexec", "-e"]


# -- what cidd tells the agent (cidd/reboots.py) -----------------------------------------------------------------------

def test_cidd_kexecs_into_the_installed_images_own_kernel_or_falls_back_to_a_reboot() -> None:
    from cidd.config import parse_config
    from cidd.core.boot import ImageBoot
    from cidd.core.machine_types import Policy
    from cidd.reboots import reboot_message

    config = parse_config({"state_dir": "/s", "http": {"host": "10.0.0.1", "port": 8080},
                           "listen": {"host": "10.0.0.1", "port": 38008},
                           "boot": {"kernel": "/k", "initrd": "/i", "cmdline": "quiet"}})
    image = ImageBoot("deb-1-0", "http://10.0.0.1:8080/boot/images/deb-1-0/vmlinuz",
                      "http://10.0.0.1:8080/boot/images/deb-1-0/initrd.img", "console=ttyS0")
    message, note = reboot_message(config, Policy(), "n01", "disk", "kexec", None, image)
    assert note is None and message["method"] == "kexec"
    assert (message["kernel"], message["initrd"]) == (image.kernel_url, image.initrd_url)
    assert message["cmdline"].split() == ["root=LABEL=cid-root", "rw", "cid.server=10.0.0.1:38008", "cid.node=n01",
                                          "console=ttyS0"]
    message, note = reboot_message(config, Policy(), "n01", "disk", "kexec", None, None)
    assert message == {"type": "reboot", "boot": "disk", "method": "reboot"} and "no kernel of the image" in note
    message, note = reboot_message(config, Policy(), "n01", "installer", "kexec", "tok", image)
    assert message["kernel"] == "http://10.0.0.1:8080/boot/files/vmlinuz" and "cid.token=tok" in message["cmdline"]
