"""The cidkid command line (exit codes, real processes against a blocking fake cidd) and LinuxPlatform."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import structlog
from twisted.internet import reactor

from cidinstall.types import InstallRequest
from cidkid.main import build_parser, default_server, main
from cidkid.platform import LinuxPlatform
from cidsim.fake_cidd import test_ca_file, test_server_context
from cidsim.main import main as simfleet_main

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "main-test-token"


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """main() configures structlog to write to the (captured) stderr of the moment; undo that afterwards."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "agent.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


# -- argument handling, without a reactor -------------------------------------------------------------------------

def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--server", "--node", "--mode", "--marker", "--target", "--token-file", "--log-format",
                   "--boot-token", "--kernel-cmdline", "--install-device"):
        assert option in text
    assert "--sim" not in text  # the simulated fleet is cid-simfleet's (cidsim), never the agent's
    assert "CID_SERVER" in text and "exit status" in text


def test_missing_token_file_exits_4_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--token-file", str(tmp_path / "nope.token")]) == 4
    err = capsys.readouterr().err
    assert "nope.token does not exist" in err and "--token-file" in err


def test_unsafe_token_file_exits_4(token_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token_file.chmod(0o644)
    assert main(["--token-file", str(token_file)]) == 4
    assert "chmod 600" in capsys.readouterr().err


def test_token_file_defaults_to_env_then_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CID_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("CID_TOKEN_FILE", raising=False)
    assert main([]) == 4
    assert str(tmp_path / "state" / "secrets" / "agent.token") in capsys.readouterr().err
    monkeypatch.setenv("CID_TOKEN_FILE", str(tmp_path / "env.token"))
    assert main([]) == 4
    assert "env.token" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--server", "head:http"], "bad port"),
    (["--mode", "system", "--install-device", "/dev/vdb"], "--install-device only applies"),
])
def test_bad_command_line_exits_2(argv: list[str], words: str, token_file: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--token-file", str(token_file)]) == 2
    assert words in capsys.readouterr().err


def test_server_defaults_to_environment_then_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CID_SERVER", "head07:4000")
    args = build_parser().parse_args([])
    assert (default_server(args), args.server) == ("$CID_SERVER", "head07:4000")
    monkeypatch.delenv("CID_SERVER")
    config = tmp_path / "cidd.yaml"
    config.write_text("listen: {host: 0.0.0.0, port: 4100}\n")  # the head node: cidd's own listen address
    monkeypatch.setenv("CID_CONFIG", str(config))
    args = build_parser().parse_args([])
    assert (default_server(args), args.server) == (f"{config}, listen", "127.0.0.1:4100")
    config.write_text("listen: {port: 4100}\nclient: {server: head07:4200}\n")
    args = build_parser().parse_args(["--server", "other:1"])
    assert (default_server(args), args.server) == ("--server", "other:1")  # --server wins over everything
    args = build_parser().parse_args([])
    assert (default_server(args), args.server) == (f"{config}, client.server", "head07:4200")
    monkeypatch.setenv("CID_CONFIG", str(tmp_path / "nothing.yaml"))
    args = build_parser().parse_args([])
    assert args.server is None
    assert main(["--token-file", str(tmp_path / "x.token")]) == 2  # a named file that is missing: usage error


# -- real processes against a blocking fake cidd -------------------------------------------------------------------

@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(15)
    yield sock
    sock.close()


def spawn(args: list[str], tmp_path: Path, module: str = "cidkid") -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CID_STATE_DIR": str(tmp_path / "state"),
           "CID_CA_FILE": test_ca_file()}
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


class Peer:
    """One accepted agent connection (TLS, the test CA's server certificate), read line by line with a timeout."""

    def __init__(self, conn: socket.socket) -> None:
        conn.settimeout(15)
        conn = test_server_context().wrap_socket(conn, server_side=True)
        self.conn = conn
        self.file = conn.makefile("rb")

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "the agent closed the connection"
        return json.loads(line)

    def send(self, message: dict[str, Any]) -> None:
        self.conn.sendall(json.dumps(message).encode() + b"\n")


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, list[dict[str, Any]]]:
    """SIGTERM the process; return its exit status and its JSON log events."""
    proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    return proc.returncode, events


def test_real_agent_says_hello_heartbeats_and_stops_on_sigterm(tmp_path: Path, token_file: Path,
                                                              listener: socket.socket) -> None:
    marker = tmp_path / "cid-image"
    marker.write_text("debian-12-1\nbuilt by mkimg\n")
    port = listener.getsockname()[1]
    proc = spawn(["--server", f"127.0.0.1:{port}", "--token-file", str(token_file), "--node", "node42",
                  "--marker", str(marker), "--target", str(tmp_path)], tmp_path)
    try:
        peer = Peer(listener.accept()[0])
        hello = peer.read()
        assert {k: hello[k] for k in ("type", "proto", "role", "token", "node", "mode", "image")} == {
            "type": "hello", "proto": 1, "role": "agent", "token": TOKEN, "node": "node42", "mode": "system",
            "image": "debian-12-1"}
        assert hello["boot_id"]
        peer.send({"type": "reply", "id": hello["id"], "proto": 1, "heartbeat": 0.2, "session": "s-1"})
        beat = peer.read()
        assert beat["type"] == "heartbeat" and beat["disk_free"] > 0 and beat["uptime"] > 0
        peer.send({"type": "reply", "id": beat["id"]})
        peer.send({"type": "install", "id": "c-1", "image": "x-1-1", "url": "http://h/x"})
        answer = peer.read()
        while answer["type"] == "heartbeat":
            answer = peer.read()
        assert answer["type"] == "error" and answer["code"] == "bad_request" and answer["id"] == "c-1"
    finally:
        status, events = stop(proc)
    assert status == 0
    names = [e["event"] for e in events]
    assert "agent.connected" in names and "agent.stopped" in names
    assert TOKEN not in json.dumps(events)


# -- cid-simfleet (cidsim.main): the simulated fleet's own command ------------------------------------------------

def test_simfleet_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        simfleet_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("HOSTLIST", "--server", "--token-file", "--sim-dir", "--reboot-delay", "--install-time",
                   "--hang-reboot-rate", "--hang-reboot", "--fail-install-rate", "--fail-install", "--initial-image",
                   "--bmc-base-port", "--bmc-credentials", "--bmc-dead", "--seed", "--cert-dir"):
        assert option in text


@pytest.mark.parametrize("argv, words", [
    (["node[01-"], "bad hostlist"),
    (["n1", "--hang-reboot", "x[1-"], "bad hostlist"),
    (["n1", "--server", "head:http"], "bad port"),
])
def test_simfleet_bad_command_line_exits_2(argv: list[str], words: str, token_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert simfleet_main([*argv, "--token-file", str(token_file)]) == 2
    assert words in capsys.readouterr().err


def test_simfleet_rates_must_be_probabilities(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        simfleet_main(["n1", "--hang-reboot-rate", "1.5"])
    assert exit_.value.code == 2
    assert "between 0 and 1" in capsys.readouterr().err


def test_sim_fleet_process_connects_every_node(tmp_path: Path, token_file: Path, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    proc = spawn(["sim[1-3]", "--server", f"127.0.0.1:{port}", "--token-file", str(token_file),
                  "--sim-dir", str(tmp_path / "sim"), "--initial-image", "rocky-9-1", "--seed", "5"], tmp_path,
                 module="cidsim.main")
    try:
        peers = [Peer(listener.accept()[0]) for _ in range(3)]
        hellos = [peer.read() for peer in peers]
        assert sorted(h["node"] for h in hellos) == ["sim1", "sim2", "sim3"]
        assert {h["image"] for h in hellos} == {"rocky-9-1"}
        for peer, hello in zip(peers, hellos, strict=True):
            peer.send({"type": "reply", "id": hello["id"], "heartbeat": 0.2})
        for peer in peers:  # a heartbeat proves the reply was taken in
            assert peer.read()["type"] == "heartbeat"
    finally:
        status, events = stop(proc)
    assert status == 0
    assert sum(e["event"] == "agent.connected" for e in events) == 3
    assert (tmp_path / "sim" / "sim2" / "etc" / "cid-image").read_text() == "rocky-9-1\n"


# -- LinuxPlatform --------------------------------------------------------------------------------------------------

def test_linux_identity_reads_marker_and_boot_id(tmp_path: Path) -> None:
    marker, boot_id = tmp_path / "cid-image", tmp_path / "boot_id"
    boot_id.write_text("6f1c0000-aaaa-bbbb-cccc-000000000001\n")
    platform = LinuxPlatform(None, node="n7", marker=marker, boot_id_path=boot_id)
    assert platform.identity().image is None  # no marker yet
    marker.write_text("debian-12-2\n")
    ident = platform.identity()
    assert (ident.node, ident.mode, ident.image, ident.boot_id) == (
        "n7", "system", "debian-12-2", "6f1c0000-aaaa-bbbb-cccc-000000000001")
    installer = LinuxPlatform(None, node="n7", mode="installer", marker=marker, boot_id_path=boot_id)
    assert installer.identity().mode == "installer" and installer.identity().image is None


def test_linux_identity_is_no_image_while_an_install_is_unfinished(tmp_path: Path) -> None:
    """A root holding .cid-incomplete was cut short in the middle of an install: the marker beside it (one the
    image carried, captured live from a cid node) does not make it installed."""
    root = tmp_path / "disk"
    (root / "etc").mkdir(parents=True)
    (root / "etc/cid-image").write_text("captured-1-1\nsha256=" + "ab" * 32 + "\n")
    (root / ".cid-incomplete").write_text("install of debian-12-2 from http://h/i in progress\n")
    platform = LinuxPlatform(None, node="n7", marker=root / "etc/cid-image", boot_id_path=tmp_path / "boot_id")
    with structlog.testing.capture_logs() as logs:
        assert platform.identity().image is None
    assert platform.root == root  # the root whose flag is checked: the marker is <root>/etc/cid-image
    assert LinuxPlatform(None, node="n7").root == Path("/")
    assert [(e["event"], e["root"], e["flag"]) for e in logs] == [
        ("agent.install_incomplete", str(root), "install of debian-12-2 from http://h/i in progress")]
    (root / ".cid-incomplete").unlink()
    (root / ".cid-incomplete").symlink_to(tmp_path / "nowhere")  # a dangling symlink is still the flag
    assert platform.identity().image is None
    (root / ".cid-incomplete").unlink()
    assert platform.identity().image == "captured-1-1"


def test_install_messages_may_carry_the_resume_time() -> None:
    from cidcommon.errors import BadRequest
    from cidkid.protocol import parse_install

    base = {"type": "install", "id": "c-1", "image": "x-1-1", "url": "http://h/x", "sha256": "ab" * 32}
    assert parse_install(base).resume_for is None  # the installer's own default then
    assert parse_install({**base, "resume_for": 900}) == InstallRequest("x-1-1", "http://h/x", "ab" * 32,
                                                                        resume_for=900.0)
    for bad in (-1, "600", True, float("inf")):
        with pytest.raises(BadRequest, match="resume_for"):
            parse_install({**base, "resume_for": bad})


def test_linux_identity_defaults_to_short_hostname_and_kernel_boot_id() -> None:
    ident = LinuxPlatform(None).identity()
    assert ident.node == socket.gethostname().split(".")[0]
    if Path("/proc/sys/kernel/random/boot_id").exists():
        assert ident.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_linux_health_figures(tmp_path: Path) -> None:
    health = LinuxPlatform(None, target=tmp_path).health()
    assert set(health) == {"load1", "mem_used_pct", "disk_free", "uptime"}
    assert health["load1"] >= 0 and 0 < health["mem_used_pct"] <= 100
    assert health["disk_free"] > 0 and health["uptime"] > 0


def test_linux_install_refuses_outside_installer_mode() -> None:
    d = LinuxPlatform(None, node="n1").install(InstallRequest(image="a-1-1", url="http://h/a"), lambda *a: None)
    result = d.result
    assert result.ok is False and result.retry is False and "installer mode" in result.reason


@pytest_twisted.ensureDeferred
async def test_linux_reboot_falls_back_to_the_next_command(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    platform = LinuxPlatform(reactor, node="n1", reboot_commands=(
        ("/bin/sh", "-c", f"touch {first}; exit 3"),
        ("no-such-reboot-command",),
        ("/bin/sh", "-c", f"touch {second}"),
    ))
    platform.reboot("installer", "reboot")
    assert platform.last_reboot is not None
    worked = await platform.last_reboot.addTimeout(15, reactor)
    assert worked is not None and worked[-1] == f"touch {second}"
    assert first.exists() and second.exists()
