"""Security (issue 6): who gets in and who does not, against a real cidd with a simulated fleet.

Each refused attempt gets a clear error and leaves no trace in the state (the SQLite tables are compared
before and after) except a logged, rate-limited security event. The pure parts (rate limiter, rights rules,
socket roles) are tested with injected clocks and user databases.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from cidcatalog.catalog import Image, upsert_entry_text
from cidcommon.errors import Forbidden
from cidcommon.paths import node_token, read_token, token_path
from cidd.config import ConfigError, parse_config
from cidd.core.rights import ImageFacts, RightsRefused, check, parse_rules
from cidd.security_events import SecurityEvents
from cidd.unix_peers import PeerIdentity, granted_role, socket_role
from tests.procs import CATALOG, Cluster, _env, free_port

# --- pure parts --------------------------------------------------------------------------------------


class Recorder:
    """A logger that keeps (event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def test_security_events_are_rate_limited_per_kind_and_peer_then_summarised() -> None:
    clock = Clock()
    counted: list[str] = []
    logger = Recorder()
    security = SecurityEvents(clock.seconds, per_window=3, window=60, count=counted.append, logger=logger)
    logged = [security.refused("auth_failed", "10.0.0.9", role="admin") for _ in range(50)]
    assert logged == [True] * 3 + [False] * 47
    assert security.refused("auth_failed", "10.0.0.8")  # another peer has its own budget
    assert security.refused("forbidden", "10.0.0.9")  # and another kind
    assert len(counted) == 52 and counted.count("auth_failed") == 51  # the metric counts every refusal
    clock.advance(30)
    security.flush()
    assert not [e for e, _ in logger.events if e == "security.suppressed"]  # the window is still open
    clock.advance(31)
    security.flush()
    summaries = [f for e, f in logger.events if e == "security.suppressed"]
    assert summaries == [{"kind": "auth_failed", "peer": "10.0.0.9", "count": 47, "window": 60}]
    assert security.windows == {}  # nothing kept once the windows ended
    assert security.refused("auth_failed", "10.0.0.9")  # a new window, a new budget


GROUPS = {"carol": frozenset({"physics"}), "alice": frozenset({"users"}), "bob": frozenset({"users"})}
RULES = parse_rules([
    {"name": "alice-debian", "users": ["alice"], "images": ["debian-*"], "nodes": "node[01-04]"},
    {"name": "physics", "groups": ["physics"], "images": ["rocky-*", "debian"], "nodes": "node[03-08]"},
    {"name": "everyone-test", "users": ["*"], "images": ["test-*"], "nodes": "*"},
], lambda where, message: pytest.fail(f"{where}: {message}"))


def facts(image_id: str, owner: str = "root", visibility: str = "shared") -> ImageFacts:
    return ImageFacts(image_id, image_id.split("-")[0], owner, visibility)


def rights(user: str | None, image: ImageFacts, nodes: str, rules: Any = RULES) -> None:
    from cidcommon.hostlists import expand

    check(rules, user, image, expand(nodes), lambda name: GROUPS.get(name, frozenset()))


def test_rights_are_a_union_of_rules_by_user_group_image_glob_and_hostlist() -> None:
    rights("alice", facts("debian-12-1"), "node[01-04]")
    rights("carol", facts("rocky-9-3"), "node[03-08]")  # through her group
    rights("carol", facts("debian-12-1"), "node03")  # the glob 'debian' matches the image name
    rights("bob", facts("test-1-1"), "node[01-99]")  # '*' users and nodes
    with pytest.raises(RightsRefused, match="node05: the rules allowing this user this image do not cover it"):
        rights("alice", facts("debian-12-1"), "node[03-06]")
    with pytest.raises(RightsRefused, match="user bob may not put image debian-12-1 on node node01: no rule "
                       r"allows this user this image \(rules checked: alice-debian, physics, everyone-test\)"):
        rights("bob", facts("debian-12-1"), "node01")
    with pytest.raises(RightsRefused, match="names no user"):
        rights(None, facts("debian-12-1"), "node01")
    assert issubclass(RightsRefused, Forbidden)  # wire code 'forbidden': cidcapt exit 5


def test_private_images_are_only_for_their_owner_with_or_without_rules() -> None:
    private = facts("test-1-1", owner="alice", visibility="private")
    rights("alice", private, "node01")
    for rules in (RULES, None):
        with pytest.raises(RightsRefused, match="private to alice; user bob may not use it"):
            rights("bob", private, "node01", rules)
    rights("bob", facts("rocky-9-3"), "node[01-99]", None)  # no rights section: shared images for everyone
    with pytest.raises(RightsRefused, match="no rule allows"):
        rights("bob", facts("rocky-9-3"), "node01", ())  # an empty section allows nothing


def test_bad_rights_and_socket_sections_list_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"state_dir": str(tmp_path), "rights": [
            {"users": ["a"], "images": ["x-*"]},
            {"images": ["x"], "nodes": "n[1-"},
            "nope",
        ], "socket": {"mode": "0644", "roles": {"root": ["x"]}, "path": "relative"}})
    text = str(err.value)
    for words in ("rights[0]: a rule needs 'nodes'", "rights[1]: a rule needs 'users' and/or 'groups'",
                  "rights[1]: bad hostlist", "rights[2]: a rule is a mapping", "'mode' must be 0600, 0660 or 0666",
                  "unknown role 'root'", "'path' must be an absolute path"):
        assert words in text
    config = parse_config({"state_dir": str(tmp_path)})
    assert config.rights is None and config.socket_path == tmp_path / "cidd.sock"
    assert parse_config({"state_dir": str(tmp_path), "socket": False}).socket_path is None


def test_socket_roles_come_from_uid_user_and_groups() -> None:
    roles = {"scheduler": ("slurm",), "reader": ("@hpc",)}
    assert socket_role(PeerIdentity(0, 0, "root", frozenset()), roles, own_uid=999) == "admin"
    assert socket_role(PeerIdentity(999, 9, "cid", frozenset()), roles, own_uid=999) == "admin"  # cidd's user
    assert socket_role(PeerIdentity(64, 64, "slurm", frozenset({"hpc"})), roles, own_uid=999) == "scheduler"
    assert socket_role(PeerIdentity(1000, 100, "alice", frozenset({"hpc"})), roles, own_uid=999) == "reader"
    assert socket_role(PeerIdentity(1001, 100, "mallory", frozenset()), roles, own_uid=999) is None
    assert granted_role("admin", "reader") == "reader" and granted_role("reader", "admin") == "reader"


# --- a real cidd -------------------------------------------------------------------------------------

NODES = "node[01-08]"
FAST = ["--reboot-delay", "0.2", "--install-time", "0.3", "--initial-image", "debian-12-1"]
NOBODY = 65534
NAMELESS_UID = 4242  # no entry in the user database: no role on the socket


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("sec")
    sockdir = Path(tempfile.mkdtemp(prefix="cid-sec-", dir="/tmp"))  # reachable by other uids (pytest's is 0700)
    sockdir.chmod(0o755)
    cluster = Cluster(root, extra_config={
        "request_timeout": 60,
        "groups": {"default": {"ladder": [{"method": "reboot", "timeout": 900}], "install_timeout": 900}},
        "rights": [
            {"name": "alice-debian", "users": ["alice"], "images": ["debian-*", "alicefs-*"], "nodes": "node[01-04]"},
            {"name": "daemon-rocky", "groups": ["daemon"], "images": ["rocky-*"], "nodes": "node[03-04]"},
        ],
        "socket": {"path": str(sockdir / "cidd.sock"), "roles": {"reader": ["nobody"]}},
    })
    root.mkdir(parents=True, exist_ok=True)
    cluster.catalog.write_text(upsert_entry_text(CATALOG.read_text(), Image(
        "alicefs", "1", "1", "alicefs-1-1.tar.zst", owner="alice", visibility="private")))
    cluster.socket = sockdir / "cidd.sock"  # type: ignore[attr-defined]
    cluster.start_cidd()
    try:
        cluster.start_fleet(NODES, *FAST, "--hang-reboot", "node08")
        cluster.wait_online(8)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def snapshot(cluster: Cluster) -> dict[str, list[tuple[Any, ...]]]:
    """Return every row of the state tables (nodes, captures, capture_nodes, events, boot_profiles)."""
    with sqlite3.connect(cluster.db) as db:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()  # noqa: S608 - fixed names
                for table in ("nodes", "captures", "capture_nodes", "events", "boot_profiles")}


def security_events(cluster: Cluster, kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in cluster.log_events() if str(e.get("event", "")).startswith("security.")
            and (kind is None or e.get("kind") == kind)]


def wait_events(cluster: Cluster, kind: str, count: int) -> list[dict[str, Any]]:
    """Return the security events of ``kind`` once there are ``count`` (cidd writes its log asynchronously)."""
    end = time.monotonic() + 10
    while len(found := security_events(cluster, kind)) < count and time.monotonic() < end:
        time.sleep(0.05)
    return found


def raw_session(address: Any, hello: dict[str, Any], family: int = socket.AF_INET,
                ca: Path | None = None) -> tuple[socket.socket, dict]:
    """Open a session (TLS with the cluster CA on the TCP port), send ``hello``; return the socket and cidd's
    first answer."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    if ca is not None:
        sock = ssl.create_default_context(cafile=str(ca)).wrap_socket(sock, server_hostname=address[0])
    sock.sendall(json.dumps(hello).encode() + b"\n")
    line = sock.makefile("rb").readline()
    return sock, json.loads(line)


def refused_without_trace(cluster: Cluster, attempt: Any, kind: str) -> Any:
    """Run ``attempt()``; check the state did not change and one more security event of ``kind`` was logged."""
    before, logged = snapshot(cluster), len(security_events(cluster, kind))
    result = attempt()
    assert len(wait_events(cluster, kind, logged + 1)) == logged + 1
    assert snapshot(cluster) == before, "a refused attempt changed the state"
    return result


def test_client_without_token_wrong_token_or_another_roles_token_is_refused(cluster: Cluster, tmp_path) -> None:
    address = ("127.0.0.1", cluster.port)
    hello = {"type": "hello", "id": 1, "proto": 1, "role": "admin"}
    sock, answer = refused_without_trace(cluster, lambda: raw_session(address, hello, ca=cluster.ca_file),
                                          "auth_failed")
    sock.close()
    assert answer["type"] == "error" and answer["code"] == "auth" and "missing token for role 'admin'" in answer[
        "message"]
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token\n")
    wrong.chmod(0o600)
    reader = token_path(cluster.state_dir, "reader")
    for token_file in (wrong, reader):  # a wrong token, then the reader's token presented as admin
        run = refused_without_trace(cluster, lambda f=token_file: cluster.cidcapt(
            "--token-file", str(f), "-j", "sec-tok", "-n", "node01", "-i", "debian-12-2"), "auth_failed")
        assert run.returncode == 4 and "authentication failed: wrong or missing token for role 'admin'" in run.stderr


def test_an_agent_may_not_claim_another_nodes_name(cluster: Cluster) -> None:
    master = read_token(token_path(cluster.state_dir, "agent"))
    hello = {"type": "hello", "id": 1, "proto": 1, "role": "agent", "node": "node01", "mode": "system",
             "image": "debian-12-1", "boot_id": "evil", "token": node_token(master, "node02")}
    sock, answer = refused_without_trace(cluster, lambda: raw_session(("127.0.0.1", cluster.port), hello,
                                                                              ca=cluster.ca_file),
                                         "auth_failed")
    sock.close()
    assert answer["code"] == "auth" and "not node node01's agent token" in answer["message"]
    assert "cidd agent-token node01" in answer["message"]
    assert cluster.status("node01")["node01"]["online"]  # the real node01 kept its session
    event = security_events(cluster, "auth_failed")[-1]
    assert event["node"] == "node01" and event["role"] == "agent" and master not in json.dumps(event)


def test_a_reader_may_not_capture(cluster: Cluster) -> None:
    run = refused_without_trace(cluster, lambda: cluster.cidcapt(
        "-j", "sec-read", "-n", "node01", "-i", "debian-12-2", role="reader"), "forbidden")
    assert run.returncode == 5 and "role 'reader' may not start captures" in run.stderr


def test_rights_rules_refuse_with_exit_5_naming_the_rules(cluster: Cluster) -> None:
    def capture(job: str, nodes: str, image: str, user: str) -> subprocess.CompletedProcess:
        return cluster.cidcapt("-j", job, "-n", nodes, "-i", image, "--user", user, role="scheduler")

    run = refused_without_trace(cluster, lambda: capture("sec-r1", "node01", "alicefs-1-1", "bob"),
                                "rights_refused")
    assert run.returncode == 5 and "image alicefs-1-1 is private to alice; user bob may not use it" in run.stderr
    run = refused_without_trace(cluster, lambda: capture("sec-r2", "node[04-05]", "debian-12-2", "alice"),
                                "rights_refused")
    assert run.returncode == 5 and "user alice may not put image debian-12-2 on node node05" in run.stderr
    assert "(rules checked: alice-debian, daemon-rocky)" in run.stderr
    run = refused_without_trace(cluster, lambda: capture("sec-r3", "node01", "debian-12-2", "bob"), "rights_refused")
    assert run.returncode == 5 and "no rule allows this user this image" in run.stderr
    event = security_events(cluster, "rights_refused")[-1]
    assert event["role"] == "scheduler" and "bob" in event["reason"]
    allowed = capture("sec-ok1", "node[01-02]", "debian-12-2", "alice")
    assert allowed.returncode == 0, allowed.stderr
    by_group = capture("sec-ok2", "node03", "rocky-9-3", "daemon")  # the daemon user is in group daemon
    assert by_group.returncode == 0, by_group.stderr
    admin = cluster.cidcapt("-j", "sec-ok3", "-n", "node05", "-i", "debian-12-2", "--user", "bob")
    assert admin.returncode == 0, admin.stderr  # the admin role bypasses rights


def test_a_replayed_boot_token_is_refused(cluster: Cluster) -> None:
    """node08 never comes back from its reboot: its installer boot token waits in the boot profile."""
    holder = cluster.cidcapt_background("-j", "sec-boot", "-n", "node08", "-i", "rocky-9-3")
    first = None
    try:
        end = time.monotonic() + 30
        token = None
        while token is None and time.monotonic() < end:
            with sqlite3.connect(cluster.db) as db:
                row = db.execute("SELECT token FROM boot_profiles WHERE node = 'node08'").fetchone()
            token = row[0] if row else None
            time.sleep(0.1)
        assert token, "node08 got no installer boot token"
        hello = {"type": "hello", "id": 1, "proto": 1, "role": "agent", "node": "node08", "mode": "installer",
                 "image": None, "boot_id": "inst-1", "boot_token": token}
        first, answer = raw_session(("127.0.0.1", cluster.port), hello, ca=cluster.ca_file)
        assert answer["type"] == "reply" and answer["resume_token"]  # the genuine installer, once
        replay, refused = refused_without_trace(
            cluster, lambda: raw_session(("127.0.0.1", cluster.port), {**hello, "boot_id": "inst-2"},
                                         ca=cluster.ca_file), "auth_failed")
        replay.close()
        assert refused["code"] == "auth" and "boot token of node08 is not valid: it was already used" in refused[
            "message"]
    finally:
        if first is not None:
            first.close()
        holder.kill()
        holder.wait()


def test_a_flood_of_bad_logins_is_counted_but_not_all_logged(cluster: Cluster) -> None:
    def refusals() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.http_port}/metrics", timeout=10).read().decode()
        wanted = 'cid_security_refusals_total{kind="auth_failed"}'
        lines = [line for line in text.splitlines() if line.startswith(wanted)]
        return float(lines[0].split()[-1]) if lines else 0.0

    counted, logged = refusals(), len(security_events(cluster, "auth_failed"))
    for _ in range(40):
        sock, answer = raw_session(("127.0.0.1", cluster.port), {"type": "hello", "id": 1, "proto": 1,
                                                                 "role": "admin", "token": "guess"},
                                   ca=cluster.ca_file)
        sock.close()
        assert answer["code"] == "auth"
    assert refusals() == counted + 40
    time.sleep(0.5)  # let cidd write whatever it logs
    flood = len(security_events(cluster, "auth_failed")) - logged
    assert flood <= 20, f"{flood} of 40 refusals were logged; at most 10 per minute and peer are"


def test_root_gets_admin_on_the_local_socket_others_their_role_or_nothing(cluster: Cluster) -> None:
    path = cluster.socket  # type: ignore[attr-defined]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666  # the peer check authorises, not the file mode
    env = _env(cluster.state_dir)
    status = subprocess.run([sys.executable, "-m", "cidcapt.main", "--socket", str(path), "--status", "--json"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert status.returncode == 0, status.stderr
    assert len(json.loads(status.stdout)) == 8
    env["CID_SOCKET"] = str(path)  # no token file anywhere: root is admin by its uid
    env["CID_TOKEN_FILE"] = "/nonexistent"
    power = subprocess.run([sys.executable, "-m", "cidcapt.main", "-j", "sec-sock", "-n", "node06", "-i",
                            "debian-12-2", "--user", "bob"], capture_output=True, text=True, timeout=120, env=env)
    assert power.returncode == 0, power.stderr  # admin: rights bypassed

    def as_uid(uid: int, *args: str) -> subprocess.CompletedProcess:
        """Run cidcapt's main in a forked child that dropped to ``uid`` (the venv's python is not theirs to run)."""
        import io

        from cidcapt.main import main

        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 99
            out, err = io.StringIO(), io.StringIO()
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                code = main(["--socket", str(path), *args], stdout=out, stderr=err, env={})
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                err.write(f"child failed: {exc!r}")
            finally:
                os.write(write_end, json.dumps([code, out.getvalue(), err.getvalue()]).encode())
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        os.waitpid(pid, 0)
        code, out, err = json.loads(data)
        return subprocess.CompletedProcess(args, code, out, err)

    reader = as_uid(NOBODY, "--status", "node01")
    assert reader.returncode == 0, reader.stderr  # socket.roles.reader: [nobody]
    run = refused_without_trace(cluster, lambda: as_uid(NOBODY, "-j", "sec-nobody", "-n", "node01", "-i",
                                                         "debian-12-2"), "forbidden")
    assert run.returncode == 5 and "role 'reader' may not start captures" in run.stderr
    run = refused_without_trace(cluster, lambda: as_uid(NAMELESS_UID, "--status"), "peer_refused")
    assert run.returncode == 4 and f"user {NAMELESS_UID} (uid {NAMELESS_UID}) has no role" in run.stderr
    assert security_events(cluster, "peer_refused")[-1]["peer"] == f"unix:uid={NAMELESS_UID}"


def test_agent_token_command_makes_a_private_per_node_token_that_a_real_agent_uses(cluster: Cluster,
                                                                                   tmp_path: Path) -> None:
    out = tmp_path / "agent.token"
    made = subprocess.run([sys.executable, "-m", "cidd.main", "agent-token", "real01", "--out", str(out),
                           "--state-dir", str(cluster.state_dir)], capture_output=True, text=True, timeout=60,
                          env=_env(cluster.state_dir))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    master = read_token(token_path(cluster.state_dir, "agent"))
    assert out.read_text().strip() == node_token(master, "real01") != master
    marker = tmp_path / "cid-image"
    marker.write_text("debian-12-1\n")

    def agent(node: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "cidkid.main", "--server", cluster.server, "--node", node,
                                 "--token-file", str(out), "--marker", str(marker), "--target", str(tmp_path)],
                                env=_env(cluster.state_dir), stdout=subprocess.DEVNULL,
                                stderr=(tmp_path / f"{node}.log").open("wb"))

    good, evil = agent("real01"), agent("real02")  # real02 has only real01's token
    try:
        end = time.monotonic() + 30
        while not cluster.status().get("real01", {}).get("online") and time.monotonic() < end:
            time.sleep(0.2)
        assert cluster.status()["real01"]["online"]
        end = time.monotonic() + 30
        while "agent.retry_after_auth_failure" not in (tmp_path / "real02.log").read_text() and time.monotonic() < end:
            time.sleep(0.2)
        assert "cidd agent-token NODE" in (tmp_path / "real02.log").read_text()
        assert "real02" not in cluster.status()
    finally:
        for proc in (good, evil):
            proc.terminate()
            proc.wait(timeout=20)


def test_cidd_refuses_to_start_with_an_agent_master_secret_readable_by_others(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "secrets").mkdir(parents=True)
    master = state / "secrets" / "agent.token"
    master.write_text("a-master-secret-others-can-read\n")
    master.chmod(0o644)
    result = subprocess.run([sys.executable, "-m", "cidd.main", "--listen", f"127.0.0.1:{free_port()}"],
                            env=_env(state), capture_output=True, text=True, timeout=60)
    assert result.returncode == 4
    assert str(master) in result.stderr and "chmod 600" in result.stderr
    assert "a-master-secret-others-can-read" not in result.stderr
    assert not (state / "cidd.sqlite").exists() and not (state / "cidd.sock").exists()
