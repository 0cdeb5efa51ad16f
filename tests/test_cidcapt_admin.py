"""cidcapt --status and --captures against a scripted fake cidd, and the pieces under them.

The blocking Connection is tested on a real socket pair; the exit-code mapping over every wire code.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cidcapt.capture import Outcome
from cidcapt.connection import Connection, Timing, parse_server
from cidcapt.errors import BadServerReply, ConnectionLost, Unreachable, error_from_wire
from cidcapt.exit_codes import exit_code
from cidcapt.main import main
from cidcapt.render import format_age, summary_rows
from cidcommon.errors import CidError, Conflict, UnknownImage
from cidcommon.wire import encode
from cidsim.fake_cidd import FakeCidd, FakeSession, test_ca_file

TOKEN = "admin-t0ken"
NOW = 1_700_000_100.0
ROOT = Path(__file__).resolve().parent.parent
FAST = Timing(request_timeout=1.0, silence_timeout=1.0, grace=0.2, backoff_first=0.02, backoff_max=0.1)
NODES = [
    {"node": "node01", "state": "ready", "image": "debian-12-1", "target": None, "job": None, "online": True,
     "last_seen": NOW - 3, "reason": None, "health": {"load1": 0.1}},
    {"node": "node02", "state": "failed", "image": "debian-12-2", "target": "debian-12-1", "job": "1234",
     "online": False, "last_seen": NOW - 7200, "reason": "no hello from the image after 3 reboots"},
    {"node": "node03", "state": "offline", "image": None, "target": None, "job": None, "online": False,
     "last_seen": None, "reason": None},
]


@pytest.fixture()
def token_file(tmp_path: Path) -> Path:
    """Return a private token file holding TOKEN."""
    path = tmp_path / "reader.token"
    path.write_text(TOKEN)
    path.chmod(0o600)
    return path


def run(args: list[str], token_file: Path, cidd: FakeCidd | None = None) -> tuple[int, str, str]:
    """Run cidcapt's main with a fixed wall clock; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = args + ["--token-file", str(token_file)] + (["--server", cidd.address] if cidd else [])
    code = main(argv, stdout=out, stderr=err, env={"CID_CA_FILE": test_ca_file()}, timing=FAST, now=lambda: NOW)
    return code, out.getvalue(), err.getvalue()


def status_script(session: FakeSession) -> None:
    """Script: answer one ``status`` with the nodes it names (all of NODES without ``nodes``)."""
    session.hello(expect_role="reader")
    request = session.expect("status")
    wanted = request.get("nodes")
    session.reply(request, nodes=[n for n in NODES if wanted is None or n["node"] in ("node01", "node02")])


def test_status_prints_a_table_with_ages(token_file: Path) -> None:
    with FakeCidd(status_script, token=TOKEN) as cidd:
        code, out, err = run(["--status", "--role", "reader"], token_file, cidd)
    assert code == 0, err
    assert "nodes" not in cidd.messages("status")[0]
    lines = out.splitlines()
    assert lines[0].split() == ["NODE", "STATE", "IMAGE", "TARGET", "JOB", "ONLINE", "LAST-SEEN", "REASON"]
    assert lines[1].split() == ["node01", "ready", "debian-12-1", "-", "-", "yes", "3s", "ago", "-"]
    assert lines[2].split()[:8] == ["node02", "failed", "debian-12-2", "debian-12-1", "1234", "no", "2h", "ago"]
    assert lines[2].endswith("no hello from the image after 3 reboots")
    assert lines[3].split() == ["node03", "offline", "-", "-", "-", "no", "-", "-"]
    assert lines[0].index("LAST-SEEN") == lines[1].index("3s ago")  # columns line up


def test_status_of_a_hostlist_sends_it_compact_and_prints_json(token_file: Path) -> None:
    with FakeCidd(status_script, token=TOKEN) as cidd:
        code, out, _ = run(["--status", "node02,node01", "--role", "reader", "--json"], token_file, cidd)
    assert code == 0
    assert cidd.messages("status")[0]["nodes"] == "node[01-02]"
    assert [n["node"] for n in json.loads(out)] == ["node01", "node02"]


def test_status_bad_hostlist_exits_2(token_file: Path) -> None:
    code, out, err = run(["--status", "node[1-", "--server", "127.0.0.1:1"], token_file)
    assert code == 2 and out == ""
    assert "cidcapt: error: bad hostlist" in err


def test_captures_table(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        request = session.expect("captures")
        session.reply(request, captures=[
            {"job": "1234", "image": "debian-12-1", "state": "running", "nodes": 16, "user": "alice",
             "created": NOW - 300, "deadline": NOW + 1500},
            {"job": "1200", "image": "centos-7-1", "state": "failed", "nodes": {"n1": {}, "n2": {}},
             "created": NOW - 7200, "deadline": NOW - 3000, "ended": NOW - 4000},
            {"job": "1200", "image": "centos-7-1", "state": "ok", "nodes": {"n1": {}, "n2": {}},
             "created": NOW - 9000, "deadline": NOW - 5000, "ended": NOW - 8000}])

    with FakeCidd(script, token=TOKEN) as cidd:
        code, out, _ = run(["--captures"], token_file, cidd)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["JOB", "IMAGE", "STATE", "NODES", "USER", "CREATED", "DEADLINE", "ENDED", "RUNS"]
    assert lines[1].split() == ["1234", "debian-12-1", "running", "16", "alice", "5m", "ago", "in", "25m", "-", "1"]
    # one row per job: its latest run, and how many there were; an ended capture shows no deadline
    assert lines[2].split() == ["1200", "centos-7-1", "failed", "n[1-2]", "-", "2h", "ago", "-", "66m", "ago", "2"]
    assert len(lines) == 3


def test_status_of_unknown_nodes_exits_2_naming_them(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        request = session.expect("status")
        session.reply(request, nodes=[{"node": "n1", "state": "ready", "image": "debian-12-1"}], unknown="n99")

    with FakeCidd(script, token=TOKEN) as cidd:
        code, out, err = run(["--status", "n1,n99"], token_file, cidd)
    assert code == 2
    assert "n1" in out and "unknown node(s) n99" in err


def test_a_closed_pipe_ends_quietly(token_file: Path, tmp_path: Path) -> None:
    """``cidcapt --captures | head -1`` must not end in a BrokenPipeError traceback."""
    def script(session: FakeSession) -> None:
        session.hello()
        session.reply(session.expect("captures"), captures=[
            {"job": str(i), "image": "debian-12-1", "state": "ok", "nodes": 1, "created": NOW} for i in range(3000)])

    with FakeCidd(script, token=TOKEN) as cidd:
        env = {**os.environ, "CID_CA_FILE": test_ca_file(), "PYTHONPATH": str(ROOT)}
        pipeline = (f"{sys.executable} -m cidcapt.main --captures --server {cidd.address} "
                    f"--token-file {token_file} | head -1")
        done = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, text=True, env=env,
                              timeout=60)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stdout.startswith("JOB") and done.returncode == 0, (done.returncode, done.stderr)


def test_a_peer_that_is_not_cidd_exits_4(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.recv()
        session.send_raw(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["--captures"], token_file, cidd)
    assert code == 4
    assert "is not a cid message" in err and "--server" in err


def test_forbidden_status_exits_5(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        session.error(session.expect("status"), "forbidden", "role reader may not see node07")

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["--status", "node07"], token_file, cidd)
    assert code == 5 and "cidcapt: error: role reader may not see node07" in err


@pytest.mark.parametrize(("text", "expected"), [
    ("head", ("head", 38008)), ("head:4000", ("head", 4000)), ("127.0.0.1:38009", ("127.0.0.1", 38009)),
    ("[::1]:4000", ("::1", 4000)), ("[::1]", ("::1", 38008)), ("::1", ("::1", 38008)),
])
def test_parse_server(text: str, expected: tuple[str, int]) -> None:
    assert parse_server(text) == expected


@pytest.mark.parametrize("text", ["", "head:0", "head:70000", "head:http", "[::1", "[::1]x", ":4000"])
def test_parse_server_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="server address|port"):
        parse_server(text)


@pytest.mark.parametrize(("code", "expected"), [
    ("bad_message", 2), ("bad_request", 2), ("unknown_type", 2), ("unknown_image", 2), ("bad_hostlist", 2),
    ("unknown_node", 2), ("too_long", 2), ("out_of_order", 2), ("conflict", 5), ("forbidden", 5), ("auth", 4),
    ("internal", 4), ("superseded", 4), ("unavailable", 4), ("something_new", 4),
])
def test_every_wire_code_maps_to_the_documented_exit_code(code: str, expected: int) -> None:
    err = error_from_wire({"type": "error", "id": 2, "code": code, "message": "text"})
    assert err.code == code and err.message == ("authentication failed: text" if code == "auth" else "text")
    assert exit_code(err) == expected


def test_exit_codes_of_outcomes_and_client_errors() -> None:
    def outcome(state: str) -> Outcome:
        return Outcome(job="1", image="i", state=state, nodes={})

    assert [exit_code(outcome(s)) for s in ("ok", "failed", "deadline")] == [0, 1, 3]
    assert exit_code(Unreachable("x")) == 4 and exit_code(ConnectionLost("x")) == 4
    assert exit_code(BadServerReply("x")) == 4
    assert isinstance(error_from_wire({"code": "unknown_image", "message": "m"}), UnknownImage)
    assert isinstance(error_from_wire({"code": "conflict", "message": "m"}), Conflict)


@pytest.fixture()
def pair() -> tuple[Connection, socket.socket]:
    """Return a Connection on one end of a socket pair, and the other end (playing cidd)."""
    ours, theirs = socket.socketpair()
    conn = Connection(ours, address="pair", request_timeout=0.3)
    yield conn, theirs
    conn.close()
    theirs.close()


def test_request_returns_its_reply_and_keeps_earlier_events(pair: tuple[Connection, socket.socket]) -> None:
    conn, peer = pair
    peer.sendall(encode({"type": "keepalive"}) + encode({"type": "reply", "id": 99}) +
                 encode({"type": "node", "node": "n1"}) + encode({"type": "reply", "id": 1, "ok": True}) +
                 encode({"type": "done", "state": "ok"}))
    assert conn.request({"type": "status"}) == {"type": "reply", "id": 1, "ok": True}
    sent = json.loads(peer.recv(65536))
    assert sent == {"type": "status", "id": 1}
    assert [conn.next_message(0.1)["type"] for _ in range(3)] == ["keepalive", "node", "done"]
    assert conn.next_message(0.05) is None


def test_error_answers_raise_their_class(pair: tuple[Connection, socket.socket]) -> None:
    conn, peer = pair
    peer.sendall(encode({"type": "error", "code": "unknown_image", "message": "no such image"}))
    with pytest.raises(UnknownImage, match="no such image"):
        conn.request({"type": "capture"})


def test_request_timeout_and_close_raise_connection_lost(pair: tuple[Connection, socket.socket]) -> None:
    conn, peer = pair
    with pytest.raises(ConnectionLost, match="did not answer 'status' within 0.3 s"):
        conn.request({"type": "status"})
    ours, theirs = socket.socketpair()
    theirs.close()
    with pytest.raises(ConnectionLost, match="closed the connection"):
        Connection(ours, address="pair").next_message(1.0)
    ours.close()


@pytest.mark.parametrize("data", [b"not json\n", b"[1, 2]\n", b'{"no": "type"}\n', b"x" * 70_000 + b"\n"])
def test_garbage_from_the_peer_raises_bad_server_reply(pair: tuple[Connection, socket.socket], data: bytes) -> None:
    conn, peer = pair
    peer.sendall(data)
    with pytest.raises(BadServerReply):
        conn.next_message(1.0)


def test_summary_rows_group_only_large_node_sets() -> None:
    few = {f"n{i}": {"state": "ready", "image": "img"} for i in range(1, 4)}
    assert summary_rows(few, "img") == [[f"n{i}", "ready", "img", ""] for i in range(1, 4)]
    many = {f"n{i:02d}": {"state": "ready", "image": "img"} for i in range(1, 21)}
    many["n05"] = {"state": "to_image", "image": "old", "step": None, "detail": "image written"}
    assert summary_rows(many, "img") == [["n[01-04,06-20]", "ready", "img", ""],
                                         ["n05", "to_image", "old", "still to_image (image written)"]]


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (3.4, "3s"), (89, "89s"), (300, "5m"),
                                               (7200, "2h"), (3 * 86400, "3d"), (-5, "0s")])
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


def test_cid_errors_have_user_text() -> None:
    err = CidError("cidd is gone", code="internal")
    assert exit_code(err) == 4 and err.message == "cidd is gone"


# --- cidcapt --images and --cancel, and a waiting capture that gets cancelled ----------------------------------

IMAGES = [
    {"id": "debian-12-1", "name": "debian", "version": "12", "subversion": "1", "os": "linux", "owner": "root",
     "visibility": "shared", "size": 3 * 1024 ** 3, "date": NOW - 86400, "description": "Debian 12 compute image"},
    {"id": "alicefs-1-1", "name": "alicefs", "version": "1", "subversion": "1", "os": "debian 12",
     "owner": "alice", "visibility": "private", "size": None, "date": None, "description": ""},
]


def test_images_lists_the_catalog_and_says_how_many_private_images_are_hidden(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello(expect_role="scheduler")
        session.reply(session.expect("images"), images=IMAGES, hidden=2)

    with FakeCidd(script, token=TOKEN) as cidd:
        code, out, err = run(["--images", "--role", "scheduler", "--user", "alice"], token_file, cidd)
    assert code == 0, err
    assert cidd.messages("images")[0]["user"] == "alice"  # the scheduler names the user whose images it may see
    lines = out.splitlines()
    assert lines[0].split() == ["IMAGE", "OS", "SIZE", "DATE", "OWNER", "VISIBILITY", "DESCRIPTION"]
    assert lines[1].split()[:4] == ["debian-12-1", "linux", "3.0", "GiB"]
    assert lines[1].split()[6:9] == ["root", "shared", "Debian"]
    assert lines[2].split() == ["alicefs-1-1", "debian", "12", "-", "-", "alice", "private", "-"]
    assert "cidcapt: 2 private image(s) of other users not shown" in err


def test_images_json_is_the_reply(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        session.reply(session.expect("images"), images=IMAGES[:1], hidden=0, unavailable=[])

    with FakeCidd(script, token=TOKEN) as cidd:
        code, out, _ = run(["--images", "--json"], token_file, cidd)
    assert code == 0 and json.loads(out) == {"images": IMAGES[:1], "hidden": 0, "unavailable": []}


CANCELLED_NODES = {
    "node01": {"state": "installing", "image": "debian-12-1",
               "reason": "cancelled by bob while installing: the switch to debian-12-2 goes on to its end"},
    "node02": {"state": "ready", "image": "debian-12-1",
               "reason": "cancelled by bob: the node was not rebooted yet; it stays ready in debian-12-1"},
}


def test_cancel_sends_the_job_and_user_and_prints_what_becomes_of_each_node(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        request = session.expect("cancel")
        session.reply(request, already=False, capture={"job": "1234", "image": "debian-12-2", "state": "cancelled",
                                                       "cancelled_by": "bob", "nodes": CANCELLED_NODES})

    with FakeCidd(script, token=TOKEN) as cidd:
        code, out, err = run(["--cancel", "-j", "1234", "--user", "bob"], token_file, cidd)
    assert code == 0, err
    assert {k: v for k, v in cidd.messages("cancel")[0].items() if k != "id"} == {
        "type": "cancel", "job": "1234", "user": "bob"}
    assert "cidcapt: job 1234: capture of 2 node(s) to debian-12-2 cancelled by bob" in err
    lines = out.splitlines()
    assert lines[0].split() == ["NODE", "STATE", "IMAGE", "WHAT", "BECOMES", "OF", "IT"]
    assert lines[1].startswith("node01") and "goes on to its end" in lines[1]
    assert lines[2].startswith("node02") and "it stays ready in debian-12-1" in lines[2]


@pytest.mark.parametrize(("code", "message", "exit"), [
    ("bad_request", "job 99 has no capture; nothing to cancel (see 'cidcapt --captures')", 2),
    ("bad_request", "the capture of job 99 already ended (ok); nothing to cancel", 2),
    ("forbidden", "user eve may not cancel the capture of job 99: it was started by user alice", 5),
])
def test_cancel_errors_exit_with_their_code_and_message(token_file: Path, code: str, message: str,
                                                         exit: int) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        session.error(session.expect("cancel"), code, message)

    with FakeCidd(script, token=TOKEN) as cidd:
        status, _, err = run(["--cancel", "-j", "99"], token_file, cidd)
    assert status == exit and f"cidcapt: error: {message}" in err


@pytest.mark.parametrize("args", [
    ["--cancel"], ["--cancel", "-j", "1", "-i", "debian-12-1"], ["--cancel", "-j", "1", "-n", "n1"],
    ["--cancel", "-j", "1", "--captures"], ["--images", "-j", "1"], ["--images", "--status"],
])
def test_cancel_and_images_usage_errors_exit_2(token_file: Path, args: list[str]) -> None:
    code, out, err = run(args + ["--server", "127.0.0.1:1"], token_file)
    assert code == 2 and out == "" and "cidcapt: error:" in err


def test_a_waiting_capture_that_gets_cancelled_exits_6_saying_by_whom(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        cap = session.expect("capture")
        session.accept(cap, {"node01": "to_installer", "node02": "to_installer"})
        session.node(cap, "node02", "to_installer", "cancelled", detail=CANCELLED_NODES["node02"]["reason"])
        session.send({"type": "done", "job": cap["job"], "state": "cancelled", "cancelled_by": "bob",
                      "nodes": CANCELLED_NODES})

    with FakeCidd(script, token=TOKEN) as cidd:
        code, out, err = run(["-j", "1234", "-n", "node[01-02]", "-i", "debian-12-2", "--json"], token_file, cidd)
    assert code == 6, err
    assert "cidcapt: job 1234: the capture was cancelled by bob (cidcapt --cancel)" in err
    assert "job 1234: cancelled with 2 of 2 nodes not in debian-12-2" in err
    assert "goes on to its end" in err and "it stays ready in debian-12-1" in err
    result = json.loads(out.splitlines()[-1])
    assert (result["state"], result["cancelled_by"], result["exit"]) == ("cancelled", "bob", 6)


def test_a_reattach_says_so_and_a_capture_cancelled_meanwhile_ends_it_with_6(token_file: Path) -> None:
    def script(session: FakeSession) -> None:
        session.hello()
        cap = session.expect("capture")
        if session.index == 0:
            session.accept(cap, {"node01": "to_installer"})
            session.drop()  # cidd restarts; meanwhile the capture is cancelled
            return
        session.accept(cap, {"node01": CANCELLED_NODES["node01"]}, state="cancelled", attached=True)

    with FakeCidd(script, token=TOKEN) as cidd:
        code, _, err = run(["-j", "1234", "-n", "node01", "-i", "debian-12-2"], token_file, cidd)
    first, second = cidd.messages("capture")
    assert "reattach" not in first and second["reattach"] is True
    assert code == 6, err
    assert "the capture was cancelled (cidcapt --cancel)" in err


def test_the_exit_code_of_a_cancelled_capture_is_6() -> None:
    assert exit_code(Outcome(job="1", image="i", state="cancelled", nodes={})) == 6


def test_help_documents_cancel_images_and_exit_code_6(token_file: Path) -> None:
    code, out, _ = run(["--help"], token_file)
    assert code == 0
    for text in ("cidcapt --cancel -j JOB", "cidcapt --images", "6  the capture was cancelled",
                 "installs under way finish and the node boots the new image", "on 6 nothing is drained"):
        assert text in " ".join(out.split()) or text in out, text
