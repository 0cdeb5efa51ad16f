"""cid-mkimg: a real root filesystem survives capture + GNU tar extraction, catalog edits touch one entry only,
excludes (user patterns and the --live defaults), errors with their exit codes, and --reload against a fake cidd.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from cidcatalog.catalog import Image, load_catalog, render_entry
from cidmkimg import main as mkimg
from cidmkimg import pack as pack_module
from cidmkimg.main import main
from cidmkimg.pack import default_excludes, tar_pattern
from cidsim.fake_cidd import FakeCidd, FakeSession, test_ca_file
from tests.rootfs import MissingTool, build_rootfs, compare_trees

REPO = Path(__file__).resolve().parent.parent
TOKEN = "admin-t0ken"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="owners and device nodes need root")


def run(tmp: Path, root: Path, *extra: str, name: str = "test", version: str = "1", sub: str = "1") -> int:
    """Run cid-mkimg on ``root`` into ``tmp/img`` with catalog ``tmp/images.yaml``; return the exit code."""
    (tmp / "img").mkdir(exist_ok=True)
    return main(["--root", str(root), "--name", name, "--version", version, "--subversion", sub,
                 "--image-dir", str(tmp / "img"), "--catalog", str(tmp / "images.yaml"), "--threads", "2", *extra])


def members(image: Path) -> set[str]:
    """Return the member names of a ``.tar.zst`` as GNU tar lists them (``./etc/``, ``./etc/hostname``)."""
    data = zstandard.ZstdDecompressor().stream_reader(image.open("rb")).read()
    return set(subprocess.run(["tar", "-t", "-f", "-"], input=data, capture_output=True, check=True)
               .stdout.decode().splitlines())


def small_tree(root: Path) -> Path:
    """Return ``root`` holding a few plain files (for the tests that are not about fidelity)."""
    for rel in ("etc/hostname", "usr/bin/tool", "home/a/.cache/x", "home/a/notes.txt", "var/log/old.gz",
                "var/log/new.log"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel + "\n")
    return root


@needs_root
def test_capture_keeps_everything_and_writes_the_entry(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    try:
        src = build_rootfs(tmp_path / "src")
    except MissingTool as exc:
        pytest.fail(str(exc))  # make test installs the tools: a missing one is a broken set-up, not a skip
    assert run(tmp_path, src, "--kernel", "/boot/vmlinuz-test", "--description", "fixture") == 0
    image = tmp_path / "img/test-1-1.tar.zst"
    # the kernel named by --kernel is stored next to the image, for cidd to serve (docs/boot.md)
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["test-1-1.tar.zst", "test-1-1.vmlinuz"]
    assert (tmp_path / "img/test-1-1.vmlinuz").read_bytes() == (src / "boot/vmlinuz-test").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    tar = subprocess.Popen(["tar", "-x", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "-p",
                            "-f", "-", "-C", str(out)], stdin=subprocess.PIPE)
    with image.open("rb") as handle:
        zstandard.ZstdDecompressor().copy_stream(handle, tar.stdin)
    tar.stdin.close()
    assert tar.wait() == 0
    assert compare_trees(src, out) == []
    entry = load_catalog(tmp_path / "images.yaml").get("test-1-1")
    data = image.read_bytes()
    assert entry == Image("test", "1", "1", "test-1-1.tar.zst", size=len(data),
                          sha256=hashlib.sha256(data).hexdigest(), boot=entry.boot, description="fixture")
    assert entry.boot.kernel == "/boot/vmlinuz-test"
    printed = capsys.readouterr().out
    assert f"sha256 {entry.sha256}" in printed and "ratio" in printed and "added test-1-1" in printed


def test_catalog_edits_touch_only_the_entry(tmp_path: Path) -> None:
    root = small_tree(tmp_path / "root")
    catalog = tmp_path / "images.yaml"
    shutil.copy(REPO / "images.yaml", catalog)  # comments and three entries
    catalog.chmod(0o640)
    before = catalog.read_text()
    assert run(tmp_path, root) == 0
    after = catalog.read_text()
    assert after == before + render_entry(load_catalog(catalog).get("test-1-1"))  # appended, nothing else
    assert catalog.stat().st_mode & 0o777 == 0o640
    assert len(load_catalog(catalog)) == 4

    # the same id again (the middle entry of the sample): only its lines change
    assert run(tmp_path, root, "--description", "rebuilt", name="debian", version="12", sub="2") == 0
    again = catalog.read_text()
    start = after.index('  - name: debian\n    version: "12"\n    subversion: "2"\n')
    end = after.index('point release 2"\n') + len('point release 2"\n')
    head, tail = after[:start], after[end:]
    assert again.startswith(head) and again.endswith(tail) and tail.startswith("\n  # Rocky Linux 9")
    middle = again[len(head):len(again) - len(tail)]
    assert middle == render_entry(load_catalog(catalog).get("debian-12-2"))
    assert "description: rebuilt\n" in middle and "sha256: " in middle
    rebuilt = load_catalog(catalog).get("debian-12-2")
    assert rebuilt.size == (tmp_path / "img/debian-12-2.tar.zst").stat().st_size
    assert rebuilt.description == "rebuilt" and len(load_catalog(catalog)) == 4


def test_missing_catalog_is_created(tmp_path: Path) -> None:
    assert run(tmp_path, small_tree(tmp_path / "root")) == 0
    assert list(load_catalog(tmp_path / "images.yaml")) == ["test-1-1"]


def test_broken_catalog_is_refused_before_capturing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    catalog = tmp_path / "images.yaml"
    broken = "images:\n  - name: debian\n    version: \"12\"\n    subversion: \"1\"\n    file: x.iso\n"
    catalog.write_text(broken)
    assert run(tmp_path, small_tree(tmp_path / "root")) == 2
    assert catalog.read_text() == broken
    assert list((tmp_path / "img").iterdir()) == []
    err = capsys.readouterr().err
    assert err.startswith("cid-mkimg: error: the catalog cannot take the new entry") and "images.yaml:5:" in err


def test_catalog_broken_during_capture_keeps_the_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    catalog = tmp_path / "images.yaml"
    pack = mkimg.pack

    def pack_then_break(*args: object, **kwargs: object) -> pack_module.Packed:
        result = pack(*args, **kwargs)
        catalog.write_text("images: [\n")  # someone saves a broken catalog meanwhile
        return result

    monkeypatch.setattr(mkimg, "pack", pack_then_break)
    assert run(tmp_path, small_tree(tmp_path / "root")) == 1
    assert catalog.read_text() == "images: [\n"
    err = capsys.readouterr().err
    assert f"the image is kept at {tmp_path / 'img/test-1-1.tar.zst'}" in err and "  - name: test" in err
    assert (tmp_path / "img/test-1-1.tar.zst").exists()


def test_a_closed_stdout_does_not_stop_the_catalog_update(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    argv = ["--root", str(small_tree(tmp_path / "root")), "--name", "x", "--version", "1", "--subversion", "1",
            "--image-dir", str(tmp_path / "img"), "--catalog", str(tmp_path / "images.yaml")]
    proc = subprocess.Popen([sys.executable, "-m", "cidmkimg.main", *argv], cwd=REPO, stdout=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"capturing ")
    proc.stdout.close()  # like `cid-mkimg ... | head -1`
    assert proc.wait(timeout=30) == 0
    assert "x-1-1" in load_catalog(tmp_path / "images.yaml")


def test_default_excludes() -> None:
    root, images = Path("/srv/node"), Path("/srv/images")
    assert default_excludes(root, images, live=False) == []
    assert default_excludes(root, root / "var/lib/cid/images", live=False) == ["var/lib/cid/images"]
    swaps = ("Filename\tType\tSize\tUsed\tPriority\n/srv/node/swapfile2 file 1024 0 -2\n"
             "/dev/vda2 partition 4096 0 -1\n/other/swap file 10 0 -3\n/srv/node/my\\040swap file 10 0 -4\n")
    live = default_excludes(root, root / "images", live=True, swaps=swaps)
    assert live == ["proc/*", "sys/*", "dev/*", "run/*", "tmp/*", "var/tmp/*", "mnt/*", "media/*", "lost+found/*",
                    "var/cache/apt/archives/*.deb", "swapfile", "swap.img",
                    "etc/cid-image", "etc/cid-image.tmp", ".cid-incomplete", ".cid-incomplete.tmp",
                    "etc/cid/agent.token", "etc/cid/agent.token.tmp", "var/lib/cid/secrets",
                    "swapfile2", "my swap", "images"]
    assert [tar_pattern(p) for p in ("proc/*", "/var/log/*.gz", "./home/*/.cache", "//x")] == \
        ["./proc/*", "./var/log/*.gz", "./home/*/.cache", "./x"]


def test_live_capture_empties_the_runtime_directories(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = small_tree(tmp_path / "live")
    for rel in ("proc/1/status", "sys/kernel/uevent", "dev/pts/0", "run/lock/x", "tmp/junk", "var/tmp/junk",
                "mnt/usb/file", "media/cd/file", "lost+found/#123", "var/cache/apt/archives/a_1.0.deb",
                "var/cache/apt/archives/partial/keep", "swapfile", "srv/images/old.tar.zst"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    code = main(["--root", str(root), "--live", "--name", "node", "--version", "1", "--subversion", "1",
                 "--image-dir", str(root / "srv/images"), "--catalog", str(tmp_path / "images.yaml")])
    assert code == 0, capsys.readouterr().err
    names = members(root / "srv/images/node-1-1.tar.zst")
    for kept in ("./proc/", "./sys/", "./dev/", "./run/", "./tmp/", "./var/tmp/", "./mnt/", "./media/", "./srv/",
                 "./lost+found/", "./var/cache/apt/archives/partial/keep", "./etc/hostname", "./home/a/.cache/x"):
        assert kept in names
    for gone in ("./proc/1/", "./sys/kernel/", "./dev/pts/", "./run/lock/", "./tmp/junk", "./var/tmp/junk",
                 "./mnt/usb/", "./media/cd/", "./lost+found/#123", "./var/cache/apt/archives/a_1.0.deb",
                 "./swapfile", "./srv/images/", "./srv/images/old.tar.zst"):
        assert gone not in names


def test_live_capture_leaves_out_cids_marker_flag_and_secrets(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A node captured live holds cid's marker of the image it runs, maybe the flag of an unfinished install, its
    own agent token and cid's secrets: none of them may travel in an image (a marker would make a half-written
    disk look installed, a token would let every node of the image speak as this one)."""
    root = small_tree(tmp_path / "live")
    state = root / "srv/cid-state"
    monkeypatch.setenv("CID_STATE_DIR", str(state))
    files = {"etc/cid-image": "compute-1-1\nsha256=" + "ab" * 32 + "\n", ".cid-incomplete": "install of x\n",
             "etc/cid/agent.token": "node-secret\n", "etc/cid/ca.pem": "public\n",
             "var/lib/cid/secrets/agent.key": "key\n", "var/lib/cid/secrets/agent.token": "master\n",
             "var/lib/cid/tls/ca.pem": "public\n", "srv/cid-state/secrets/admin.token": "admin\n",
             "srv/cid-state/cidd.sqlite": "db\n", "home/a/etc/cid-image": "a user's file\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "img").mkdir()
    code = main(["--root", str(root), "--live", "--name", "node", "--version", "1", "--subversion", "1",
                 "--image-dir", str(tmp_path / "img"), "--catalog", str(tmp_path / "images.yaml")])
    assert code == 0, capsys.readouterr().err
    names = members(tmp_path / "img/node-1-1.tar.zst")
    for kept in ("./etc/cid/", "./etc/cid/ca.pem", "./var/lib/cid/", "./var/lib/cid/tls/ca.pem", "./etc/hostname",
                 "./srv/cid-state/cidd.sqlite", "./home/a/etc/cid-image"):
        assert kept in names
    for gone in ("./etc/cid-image", "./.cid-incomplete", "./etc/cid/agent.token", "./var/lib/cid/secrets/",
                 "./var/lib/cid/secrets/agent.key", "./var/lib/cid/secrets/agent.token", "./srv/cid-state/secrets/",
                 "./srv/cid-state/secrets/admin.token"):
        assert gone not in names


def test_exclude_patterns(tmp_path: Path) -> None:
    root = small_tree(tmp_path / "root")
    patterns = tmp_path / "excludes"
    patterns.write_text("# caches\n\nhome/*/.cache\n  /var/log/*.gz  \n")
    assert run(tmp_path, root, "--exclude", "usr/bin/tool", "--exclude-from", str(patterns)) == 0
    names = members(tmp_path / "img/test-1-1.tar.zst")
    assert {"./etc/hostname", "./home/a/notes.txt", "./var/log/new.log", "./usr/bin/"} <= names
    assert not names & {"./home/a/.cache/", "./home/a/.cache/x", "./var/log/old.gz", "./usr/bin/tool"}


@pytest.mark.parametrize("override, extra, message", [
    ({"--name": "deb-ian"}, [], "invalid image: name must match"),
    ({"--version": "1-2"}, [], "invalid image: version must match"),
    ({"--root": "/nonexistent/root"}, [], "--root /nonexistent/root is not a directory"),
    ({"--root": "/"}, [], "--root / is the running system: add --live"),
    ({}, ["--threads", "-5"], "--threads must be"),
    ({}, ["--reload", "127.0.0.1:1", "--token-file", "/nonexistent/admin.token"], "--reload: token file"),
    ({}, ["--visibility", "public"], None),  # refused by argparse
    ({}, ["--level", "30"], None),
])
def test_usage_errors_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture, override: dict[str, str],
                                   extra: list[str], message: str | None) -> None:
    options = {"--root": str(small_tree(tmp_path / "root")), "--name": "ok", "--version": "1", "--subversion": "1",
               "--image-dir": str(tmp_path / "img"), "--catalog": str(tmp_path / "images.yaml"), **override}
    argv = [*(part for pair in options.items() for part in pair), *extra]
    (tmp_path / "img").mkdir()
    if message is None:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    else:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("cid-mkimg: error: ") and message in err, err
    assert list((tmp_path / "img").iterdir()) == [] and not (tmp_path / "images.yaml").exists()


@pytest.mark.parametrize("image_dir", ["missing/dir", "a-file/dir"])
def test_unwritable_image_dir(tmp_path: Path, capsys: pytest.CaptureFixture, image_dir: str) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    code = main(["--root", str(small_tree(tmp_path / "root")), "--name", "x", "--version", "1", "--subversion", "1",
                 "--image-dir", str(tmp_path / image_dir), "--catalog", str(tmp_path / "images.yaml")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cid-mkimg: error: cannot write {tmp_path / image_dir}/x-1-1.tar.zst.part: ")
    assert "check that --image-dir exists and is writable" in err
    assert not (tmp_path / "images.yaml").exists()


def test_a_second_run_of_the_same_image_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "img").mkdir()
    part = tmp_path / "img/test-1-1.tar.zst.part"
    with part.open("wb") as other:
        other.write(b"another run's bytes")
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX)
        assert run(tmp_path, small_tree(tmp_path / "root")) == 1
    assert f"another cid-mkimg is writing {part}" in capsys.readouterr().err
    assert part.read_bytes() == b"another run's bytes" and not (tmp_path / "images.yaml").exists()


def fake_tar(monkeypatch: pytest.MonkeyPatch, status: int, message: str) -> None:
    """Make cid-mkimg run a fake tar that writes some bytes, ``message`` on stderr, and exits with ``status``."""
    script = f"printf 'some archive bytes'; echo '{message}' >&2; exit {status}"
    monkeypatch.setattr(pack_module, "tar_command", lambda *args, **kwargs: ["sh", "-c", script])


def test_tar_failure_removes_the_part_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    fake_tar(monkeypatch, 2, "tar: ./etc: Cannot open: Permission denied")
    assert run(tmp_path, small_tree(tmp_path / "root")) == 1
    err = capsys.readouterr().err
    assert "tar failed (exit 2)" in err and "Cannot open: Permission denied" in err
    assert list((tmp_path / "img").iterdir()) == [] and not (tmp_path / "images.yaml").exists()


def test_file_changed_is_an_error_on_a_directory_and_a_warning_when_live(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    fake_tar(monkeypatch, 1, "tar: ./var/log/syslog: file changed as we read it")
    root = small_tree(tmp_path / "root")
    assert run(tmp_path, root) == 1
    assert "use --live for a running system" in capsys.readouterr().err
    assert list((tmp_path / "img").iterdir()) == []
    assert run(tmp_path, root, "--live") == 0
    assert "cid-mkimg: warning: tar: ./var/log/syslog: file changed as we read it" in capsys.readouterr().err
    assert zstandard.ZstdDecompressor().stream_reader((tmp_path / "img/test-1-1.tar.zst").open("rb")).read() == \
        b"some archive bytes"


def test_write_failure_removes_the_part_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    def full(self: object, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pack_module.CompressedSink, "write", full)
    assert run(tmp_path, small_tree(tmp_path / "root")) == 1
    assert "No space left on device; check the space left in --image-dir" in capsys.readouterr().err
    assert list((tmp_path / "img").iterdir()) == [] and not (tmp_path / "images.yaml").exists()


@pytest.fixture()
def token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Return a private admin token file holding TOKEN (and trust the FakeCidd CA for --reload)."""
    monkeypatch.setenv("CID_CA_FILE", test_ca_file())
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def test_reload_asks_cidd(tmp_path: Path, token_file: Path, capsys: pytest.CaptureFixture,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    def script(session: FakeSession) -> None:
        session.hello(expect_role="admin")
        request = session.expect("reload")
        session.reply(request, images=4, catalog="/etc/cid/images.yaml")

    with FakeCidd(script, token=TOKEN) as cidd:
        monkeypatch.setenv("CID_SERVER", cidd.address)  # the default of a bare --reload
        monkeypatch.setenv("CID_TOKEN_FILE", str(token_file))
        code = run(tmp_path, small_tree(tmp_path / "root"), "--reload")
    assert code == 0
    assert f"cidd at {cidd.address} reloaded its catalog: 4 images" in capsys.readouterr().out
    assert len(cidd.messages("reload")) == 1


def test_failed_reload_keeps_image_and_catalog(tmp_path: Path, token_file: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    def script(session: FakeSession) -> None:
        session.hello(expect_role="admin")
        session.error(session.expect("reload"), "bad_request", "images.yaml:3: image 'x': file has no value")

    with FakeCidd(script, token=TOKEN) as cidd:
        code = run(tmp_path, small_tree(tmp_path / "root"), "--reload", cidd.address, "--token-file", str(token_file))
    assert code == 4
    err = capsys.readouterr().err
    assert err.startswith("cid-mkimg: error: image and catalog are written, but cidd did not reload") and \
        "file has no value" in err and "cidcapt --reload" in err and "pidof" not in err
    assert (tmp_path / "img/test-1-1.tar.zst").exists() and "test-1-1" in load_catalog(tmp_path / "images.yaml")


def test_boot_files_are_found_inside_the_tree_even_through_absolute_symlinks(tmp_path: Path) -> None:
    from cidmkimg.main import _in_tree

    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "vmlinuz-1").write_text("k")
    os.symlink("boot/vmlinuz-1", tmp_path / "vmlinuz")  # Debian's relative link
    os.symlink("/boot/vmlinuz-1", tmp_path / "abs")  # an absolute one means the tree's /boot, not the host's
    os.symlink("/etc/passwd", tmp_path / "host")
    os.symlink("../../../../etc/shadow", tmp_path / "boot" / "up")
    os.symlink("loop", tmp_path / "loop")
    assert _in_tree(tmp_path, "/vmlinuz") == str(tmp_path / "boot" / "vmlinuz-1")
    assert _in_tree(tmp_path, "/abs") == str(tmp_path / "boot" / "vmlinuz-1")
    assert _in_tree(tmp_path, "/host") == str(tmp_path / "etc" / "passwd")  # absent there: nothing is copied
    assert _in_tree(tmp_path, "/boot/up") == str(tmp_path / "etc" / "shadow")
    assert _in_tree(tmp_path, "/loop") is None
