"""The Debian packages (issue 12): build them, install them into a clean Debian root, use them, purge them.

`packaging/build-debs.sh` builds cid-head, cid-node and python3-hostlist (debian/, docs/install.md). The clean root
is a minbase debootstrap of this machine's Debian release from the mirror of its apt sources, with the packages'
Debian dependencies (read from the built .debs) plus systemd, man-db and bash-completion; it is cached under
build/test-cache by that package list and copied for each run, so later runs need no network. In the root:
``apt-get install ./*.deb`` (the README's way), ``systemd-analyze verify`` on the installed units, ``cidd --help``,
``man cidcapt``, bash completion of ``cidcapt``, and a purge that removes every file the packages installed
but keeps cid's state under /var/lib/cid.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blancmange.build import apt_mirror

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "test-cache"
TOOLS = ["dpkg-buildpackage", "dh", "pybuild", "dh_python3", "debootstrap", "chroot", "mount", "umount", "dpkg-deb",
         "unshare", "nsenter", "ip"]
BUILD_MODULES = ["build_manpages", "shtab", "build", "installer", "wheel"]
# python3-cffi-backend: debootstrap does not resolve virtual packages (python3-cryptography needs its cffi API).
EXTRA_IN_ROOT = ["systemd", "man-db", "bash-completion", "python3-cffi-backend"]
OURS = {"cid-head", "cid-node", "python3-hostlist"}
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb",
       "DEBIAN_FRONTEND": "noninteractive"}


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "building a Debian root needs root (debootstrap, chroot)"
    absent = [tool for tool in TOOLS if shutil.which(tool, path=ENV["PATH"]) is None]
    for module in BUILD_MODULES:
        if subprocess.run(["/usr/bin/python3", "-c", f"import {module}"], capture_output=True).returncode:
            absent.append(f"python3 module {module}")
    if absent:
        return f"missing: {', '.join(absent)} (make sysdeps installs them: Makefile TEST_DEBS)"
    return None


def run(args: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}\nstdout:\n{done.stdout[-4000:]}\n"
                             f"stderr:\n{done.stderr[-4000:]}")
    return done


@dataclass
class Root:
    path: Path
    debs: dict[str, Path]
    timings: dict[str, float]

    def sh(self, script: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(["chroot", str(self.path), "/bin/bash", "-c", script], check=check, timeout=timeout)


def suite() -> str:
    text = Path("/etc/os-release").read_text(encoding="utf-8")
    found = re.search(r"^VERSION_CODENAME=\"?(\w+)", text, re.M)
    assert found, "no VERSION_CODENAME in /etc/os-release"
    return found.group(1)


def dependencies(debs: list[Path]) -> list[str]:
    """Return the Debian packages the .debs depend on (first alternative), ours left out."""
    names = set(EXTRA_IN_ROOT)
    for deb in debs:
        depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
        for item in depends.split(","):
            name = item.split("|")[0].split("(")[0].strip().split(":")[0]
            if name and name not in OURS:
                names.add(name)
    return sorted(names)


def clean_root(packages: list[str], dest: Path) -> None:
    """Copy a minbase debootstrap holding ``packages`` to ``dest`` (made once, cached by the package list)."""
    release = suite()
    key = hashlib.sha256(" ".join([release, *packages]).encode()).hexdigest()[:12]
    cached = CACHE / f"debroot-{release}-{key}"
    if not (cached / "complete").exists():
        work = cached.with_name(cached.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", release, str(work / "root"),
             apt_mirror(release)], timeout=900)
        shutil.rmtree(work / "root" / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        (work / "root" / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True)
        (work / "complete").write_text("\n".join(packages) + "\n")
        shutil.rmtree(cached, ignore_errors=True)
        work.rename(cached)
        for stale in CACHE.glob(f"debroot-{release}-*"):  # roots for older package lists
            if stale != cached and not stale.name.endswith(".partial"):
                shutil.rmtree(stale, ignore_errors=True)
    run(["cp", "-a", str(cached / "root"), str(dest)])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    timings: dict[str, float] = {}
    base = tmp_path_factory.mktemp("packages")
    started = time.monotonic()
    run([str(REPO / "packaging" / "build-debs.sh"), str(base / "debs")], timeout=400)
    timings["build"] = time.monotonic() - started
    debs = {path.name.split("_")[0]: path for path in (base / "debs").glob("*.deb")}
    assert set(debs) == OURS, f"built {sorted(debs)}"
    started = time.monotonic()
    clean_root(dependencies(list(debs.values())), base / "root")
    timings["root"] = time.monotonic() - started
    chroot = base / "root"
    proc = chroot / "proc"
    run(["mount", "-t", "proc", "proc", str(proc)])
    try:
        for deb in debs.values():
            shutil.copy(deb, chroot / "tmp" / deb.name)
        started = time.monotonic()
        # The README's way; offline, as every dependency is in the root already (Recommends are left out).
        run(["chroot", str(chroot), "apt-get", "install", "-y", "--no-install-recommends",
             *(f"/tmp/{deb.name}" for deb in debs.values())])
        timings["install"] = time.monotonic() - started
        yield Root(chroot, debs, timings)
    finally:
        run(["umount", "-l", str(proc)], check=False)
        print(f"package test timings: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}")


def test_packages_split_head_and_node_and_never_ship_the_simulator(root: Root) -> None:
    contents = {name: run(["dpkg-deb", "-c", str(deb)]).stdout for name, deb in root.debs.items()}
    assert "cidsim" not in contents["cid-head"] + contents["cid-node"]
    assert "cid-simfleet" not in contents["cid-head"] + contents["cid-node"]
    for path in ("./usr/bin/cidkid", "/dist-packages/cidinstall/", "/dist-packages/cidcommon/",
                 "./lib/systemd/system/cidkid.service", "./usr/share/man/man1/cidkid.1.gz"):
        assert path in contents["cid-node"], path
        assert path not in contents["cid-head"], path
    for path in ("./usr/bin/cidd", "./usr/bin/cidcapt", "./usr/bin/cid-mkimg", "./usr/bin/blancmange",
                 "./lib/systemd/system/cidd.service", "./etc/cid/cidd.yaml.example",
                 "./usr/share/bash-completion/completions/cidcapt", "./usr/share/man/man1/cidcapt.1.gz"):
        assert path in contents["cid-head"], path
    assert "/usr/local" not in contents["cid-head"] + contents["cid-node"]


def test_installed_units_verify_and_use_usr_bin(root: Root) -> None:
    for unit in ("cidd.service", "cidkid.service"):
        text = (root.path / "lib" / "systemd" / "system" / unit).read_text()
        assert "/usr/local" not in text
        assert re.search(r"^ExecStart=/usr/bin/cid", text, re.M), text
    done = root.sh("systemd-analyze verify /lib/systemd/system/cidd.service /lib/systemd/system/cidkid.service",
                   check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # Neither is enabled at install (cidd needs /etc/cid/cidd.yaml, cidkid its token): nothing starts by itself.
    assert not list((root.path / "etc" / "systemd" / "system").glob("*.wants/cid*.service"))


def test_cidd_help_and_cidkid_help_run_from_usr_bin(root: Root) -> None:
    done = root.sh("cidd --help")
    assert done.stdout.startswith("usage: cidd"), done.stdout
    assert "exit codes" in done.stdout
    assert root.sh("cidkid --help").stdout.startswith("usage: cidkid")
    assert "exit codes" in root.sh("cidcapt --help").stdout.lower()


def test_man_pages_are_generated_from_the_parsers(root: Root) -> None:
    page = root.sh("MANPAGER=cat man cidcapt").stdout
    assert "put the nodes of a job into an image" in page, page[:2000]  # NAME
    assert "JOB" in page.split("SYNOPSIS", 1)[1].split("DESCRIPTION", 1)[0], page[:2000]
    assert "--json" in page.replace("\u2010", "-")
    assert "cidd init" in root.sh("MANPAGER=cat man cidd").stdout


def test_bash_completion_completes_options(root: Root) -> None:
    script = """
source /usr/share/bash-completion/bash_completion
_completion_loader cidcapt
func=$(complete -p cidcapt | sed -n 's/.*-F \\([^ ]*\\) .*/\\1/p')
COMP_LINE='cidcapt --jso'; COMP_POINT=${#COMP_LINE}; COMP_WORDS=(cidcapt --jso); COMP_CWORD=1
$func cidcapt --jso cidcapt
printf '%s\\n' "${COMPREPLY[@]}"
"""
    done = root.sh(script)
    assert "--json" in done.stdout.split(), done.stdout + done.stderr


def test_cidd_starts_on_debians_libraries_and_answers_cidcapt(root: Root) -> None:
    # In a network namespace of its own: cidd's default ports (38008, 38080) may be in use on this machine.
    isolated = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    daemon = subprocess.Popen([*isolated, "chroot", str(root.path), "/usr/bin/cidd"],
                              env={**ENV, "CID_STATE_DIR": "/tmp/st"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (root.path / "tmp/st/cidd.sock").exists():
            assert daemon.poll() is None, f"cidd exited {daemon.returncode}: {daemon.stderr.read()[-2000:]}"  # type: ignore
            assert time.monotonic() < deadline, "cidd made no socket in 30 s"
            time.sleep(0.2)
        done = root.sh("CID_STATE_DIR=/tmp/st cidcapt --status")
        assert done.stdout.startswith("NODE"), done.stdout
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def test_readme_running_it_for_real_switches_a_node(root: Root, tmp_path: Path) -> None:
    """The README's "Running it for real" block, run as written (tests/readme_run.py: the substitution table)."""
    from tests.readme_run import NODE_ROOT, run_readme

    started = time.monotonic()
    steps = run_readme(root.path, ENV, tmp_path)
    root.timings["readme"] = time.monotonic() - started
    capture = next(step for step in steps if step.readme.startswith("cidcapt -j"))
    assert capture.returncode == 0 and "node001" in capture.ran, capture
    status = next(step for step in steps if step.readme.startswith("cidcapt --status"))
    assert re.search(r"^node001 +ready +debian-12-1 ", status.output, re.M), status.output
    disk = root.path / NODE_ROOT.lstrip("/")
    assert (disk / "etc/cid-image").read_text().splitlines()[0] == "debian-12-1"  # the installed node's marker
    assert (disk / "usr/bin/hello").read_text().startswith("#!/bin/sh")  # the image's tree, on node001's disk
    assert (disk / "etc/cid/ca.pem").read_bytes() == (root.path / "var/lib/cid/tls/ca.pem").read_bytes()
    assert (disk / "etc/cid/agent.token").read_text().strip() == root.sh("cidd agent-token node001").stdout.strip()


def test_purge_removes_what_was_installed_but_keeps_state(root: Root) -> None:
    # cid's state, as cidd leaves it (the SQLite database, the CA, the token files under /var/lib/cid).
    root.sh("install -d -m 700 /var/lib/cid/tls /var/lib/cid/secrets && echo state > /var/lib/cid/cid.sqlite3 && "
            "echo ca > /var/lib/cid/tls/ca.pem && echo token > /var/lib/cid/secrets/admin.token")
    (root.path / "etc/cid/cidd.yaml").write_text("heartbeat: 10\n")  # the admin's own configuration
    installed = [line for name in OURS for line in root.sh(f"dpkg -L {name}").stdout.splitlines()]
    files = [path for path in installed if (root.path / path.lstrip("/")).is_file()]
    assert "/etc/cid/cidd.yaml.example" in files and "/usr/bin/cidd" in files
    root.sh("apt-get purge -y cid-head cid-node python3-hostlist")
    left = [path for path in files if (root.path / path.lstrip("/")).exists()]
    assert not left, f"left after purge: {left}"
    assert not root.sh("dpkg -l 'cid-*' 2>/dev/null | grep '^.[^n]'", check=False).stdout
    for state in ("cid.sqlite3", "tls/ca.pem", "secrets/admin.token"):
        assert (root.path / "var/lib/cid" / state).exists(), f"purge removed cid's state: /var/lib/cid/{state}"
    assert (root.path / "etc/cid/cidd.yaml").exists(), "purge removed a file the admin wrote"
