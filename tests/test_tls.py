"""TLS on the agent/client port with real processes and real sockets on 127.0.0.1 (docs/security.md).

cidd init and its files; cidcapt trusting the right CA, refusing another; a plain-TCP peer on the TLS port;
an unsafe key; mutual TLS for agents (no cert, a cert for another node, the right cert); explicit plain mode.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from cidcommon.paths import node_token
from cidd.config import ConfigError, parse_config
from cidd.pki import cert_pem, create_ca, fingerprint, issue, key_pem, load_cert, san_entries, write_file
from tests.procs import Cluster, _env, free_port

pytestmark = pytest.mark.slow

FAST = ["--reboot-delay", "0.2", "--install-time", "0.3", "--initial-image", "debian-12-1"]


def cidd(*args: str, state: Path) -> subprocess.CompletedProcess:
    """Run a cidd command (init, issue-cert, or the daemon expected to fail at start) to its end."""
    return subprocess.run([sys.executable, "-m", "cidd.main", *args], env=_env(state), capture_output=True,
                          text=True, timeout=60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def wait_event(cluster: Cluster, name: str, timeout: float = 30.0) -> dict:
    """Return the first event ``name`` of cidd's log, waiting for it; raise AssertionError otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for event in cluster.log_events():
            if event.get("event") == name:
                return event
        time.sleep(0.1)
    raise AssertionError(f"no {name} event in cidd's log after {timeout:g} s")


def other_ca(directory: Path) -> Path:
    """Write the certificate of a CA that signed nothing cidd has; return its path."""
    _key, cert = create_ca("someone else's CA")
    path = directory / "other-ca.pem"
    write_file(path, cert_pem(cert), private=False)
    return path


# -- cidd init --------------------------------------------------------------------------------------------------------

def test_cidd_init_creates_a_ca_and_a_server_certificate_with_private_keys(tmp_path: Path) -> None:
    state = tmp_path / "state"
    made = cidd("init", "--state-dir", str(state), "--san", "10.9.8.7", "--san", "head01", "--agent-cert", "node01",
                state=state)
    assert made.returncode == 0, made.stderr
    ca, server = state / "tls" / "ca.pem", state / "tls" / "server.pem"
    keys = [state / "secrets" / "ca.key", state / "secrets" / "server.key", state / "secrets" / "agents" / "node01.key"]
    for key in keys:
        assert mode(key) == 0o600, key
    assert mode(state / "secrets") == 0o700 and mode(state / "secrets" / "agents") == 0o700
    assert mode(ca) & 0o044 == 0o044  # public: copied to every node
    cert = load_cert(server)
    assert {"10.9.8.7", "head01", "127.0.0.1", "localhost"} <= set(san_entries(cert))
    ca_cert = load_cert(ca)
    assert cert.issuer == ca_cert.subject
    cert.verify_directly_issued_by(ca_cert)  # raises when the CA did not sign it
    agent = load_cert(state / "secrets" / "agents" / "node01.pem")
    agent.verify_directly_issued_by(ca_cert)
    assert agent.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "node01"
    assert fingerprint(ca_cert) in made.stdout

    again = cidd("init", "--state-dir", str(state), state=state)  # idempotent: nothing replaced
    assert again.returncode == 0 and "kept" in again.stdout and "created" not in again.stdout
    assert load_cert(ca) == ca_cert
    refused = cidd("issue-cert", "node01", "--state-dir", str(state), state=state)
    assert refused.returncode == 2 and "--force" in refused.stderr
    forced = cidd("init", "--state-dir", str(state), "--force", state=state)
    assert forced.returncode == 0 and load_cert(ca) != ca_cert


def test_cidd_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert cidd("init", "--state-dir", str(state), state=state).returncode == 0
    key = state / "secrets" / "server.key"
    os.chmod(key, 0o644)
    result = cidd("--state-dir", str(state), "--listen", f"127.0.0.1:{free_port()}", state=state)
    assert result.returncode == 4, result.stderr
    assert str(key) in result.stderr and f"chmod 600 {key}" in result.stderr
    assert "PRIVATE KEY" not in result.stderr
    assert not (state / "cidd.sqlite").exists(), "nothing was started"


def test_tls_section_is_checked() -> None:
    with pytest.raises(ConfigError) as bad:
        parse_config({"tls": {"mode": "none", "cert": "/x.pem", "client_certs": "sometimes", "san": "head01"}})
    text = bad.value.message
    assert "'mode' must be one of tls, plain" in text and "'cert' and 'key'" in text
    assert "'client_certs' must be one of optional, required, none" in text and "'san'" in text
    config = parse_config({"state_dir": "/s", "tls": {"client_certs": "required", "san": ["head01"]}})
    assert config.tls.paths(config.state_dir).ca == Path("/s/tls/ca.pem") and config.tls.san == ("head01",)


# -- a cluster with TLS by default -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    cluster = Cluster(tmp_path_factory.mktemp("tls"))
    cluster.start_cidd()  # creates the CA at its first start
    try:
        cluster.start_fleet("node[01-04]", *FAST)
        cluster.wait_online(4)
        yield cluster
    finally:
        cluster.stop()


def test_capture_over_tls_with_the_cluster_ca(cluster: Cluster) -> None:
    assert cluster.ca_file.exists()
    result = cluster.cidcapt("-j", "tls1", "-n", "node[01-02]", "-i", "debian-12-2", "--ca", str(cluster.ca_file))
    assert result.returncode == 0, result.stderr
    assert {row["image"] for row in cluster.status("node[01-02]").values()} == {"debian-12-2"}
    assert any(e.get("event") == "cidd.listening" and e.get("tls") is True for e in cluster.log_events())


def test_client_that_does_not_trust_the_ca_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    ca = other_ca(tmp_path)
    result = cluster.cidcapt("-j", "tls2", "-n", "node03", "-i", "debian-12-2", "--ca", str(ca))
    assert result.returncode == 4, result.stderr
    assert f"the server's certificate at {cluster.server} is not trusted by CA file {ca}" in result.stderr
    assert "--ca" in result.stderr  # what to do
    missing = cluster.cidcapt("--status", "--ca", str(tmp_path / "nowhere.pem"))
    assert missing.returncode == 4 and "does not exist" in missing.stderr
    with sqlite3.connect(cluster.db) as db:
        assert db.execute("SELECT node FROM events WHERE job = 'tls2'").fetchall() == []  # nothing was started


def test_plain_tcp_on_the_tls_port_is_refused_and_cidd_keeps_serving(cluster: Cluster) -> None:
    token = (cluster.state_dir / "secrets" / "admin.token").read_text().strip()
    hello = json.dumps({"type": "hello", "id": 1, "proto": 1, "role": "admin", "token": token}).encode() + b"\n"
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as sock:
            sock.sendall(hello)
            received = b""
            try:
                while chunk := sock.recv(4096):
                    received += chunk
            except ConnectionResetError:
                pass
        assert b'"type"' not in received  # no protocol answer in clear text: at most a TLS alert
    event = wait_event(cluster, "security.tls_refused")
    assert event["peer"] == "127.0.0.1" and token not in json.dumps(event)
    plain = cluster.cidcapt("--status", "--plain-tcp", "--connect-timeout", "1")
    assert plain.returncode == 4 and "drop --plain-tcp" in plain.stderr
    assert cluster.cidd.poll() is None
    result = cluster.cidcapt("-j", "tls3", "-n", "node04", "-i", "debian-12-2")
    assert result.returncode == 0, result.stderr


def test_server_certificate_must_name_the_address(tmp_path: Path) -> None:
    ca_key, ca_cert = create_ca()
    key, cert = issue(ca_key, ca_cert, "head01", sans=["head01"], server=True)  # no 127.0.0.1
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "server.pem", "key": tmp_path / "server.key"}
    write_file(files["ca"], cert_pem(ca_cert), private=False)
    write_file(files["cert"], cert_pem(cert), private=False)
    write_file(files["key"], key_pem(key), private=True)
    cluster = Cluster(tmp_path / "c", extra_config={"tls": {k: str(v) for k, v in files.items()}})
    cluster.start_cidd()
    try:
        result = cluster.cidcapt("--status", "--ca", str(files["ca"]))
        assert result.returncode == 4, result.stderr
        assert "not trusted by CA file" in result.stderr and "mismatch" in result.stderr.lower()
        assert not cluster.ca_file.exists(), "cidd made no CA of its own: the configured files are used"
    finally:
        cluster.stop()


# -- mutual TLS for agents ---------------------------------------------------------------------------------------------

def test_mutual_tls_required_for_agents(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, extra_config={"tls": {"client_certs": "required"}})
    state = cluster.state_dir
    made = cidd("init", "--state-dir", str(state), "--agent-cert", "node01", "--agent-cert", "node02", state=state)
    assert made.returncode == 0, made.stderr
    agents = state / "secrets" / "agents"
    cluster.start_cidd()
    try:
        cluster.start_fleet("node[01-02]", *FAST, "--cert-dir", str(agents))
        cluster.start_fleet("node03", *FAST)  # no certificate
        cluster.wait_online(2)
        refused = wait_event(cluster, "security.agent_without_cert")
        assert refused["node"] == "node03"
        # A certificate for node01 whose hello claims node02.
        context = ssl.create_default_context(cafile=str(cluster.ca_file))
        context.load_cert_chain(str(agents / "node01.pem"), str(agents / "node01.key"))
        token = node_token((state / "secrets" / "agent.token").read_text().strip(), "node02")  # node02's own
        with context.wrap_socket(socket.create_connection(("127.0.0.1", cluster.port), timeout=5),
                                 server_hostname="127.0.0.1") as sock:
            sock.sendall(json.dumps({"type": "hello", "id": 1, "proto": 1, "role": "agent", "token": token,
                                     "node": "node02", "mode": "system", "boot_id": "b", "image": None}).encode()
                         + b"\n")
            answer = json.loads(sock.makefile("rb").readline())
        assert answer["type"] == "error" and answer["code"] == "auth"
        assert "certificate is for node 'node01'" in answer["message"]
        mismatch = wait_event(cluster, "security.node_mismatch")
        assert mismatch["cert_node"] == "node01" and mismatch["node"] == "node02"
        status = cluster.status()
        assert status["node02"]["online"] and not status.get("node03", {}).get("online")
        # The agents with the right certificates work: a whole switch.
        result = cluster.cidcapt("-j", "mtls1", "-n", "node[01-02]", "-i", "debian-12-2")
        assert result.returncode == 0, result.stderr
    finally:
        cluster.stop()


# -- explicit plain TCP ------------------------------------------------------------------------------------------------

def test_explicit_plain_mode_works_and_warns(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, extra_config={"tls": {"mode": "plain"}}, extra_env={"CID_PLAIN_TCP": "1"})
    cluster.start_cidd()
    try:
        warning = wait_event(cluster, "security.plain_tcp")
        assert warning["level"] == "warning"
        assert not cluster.ca_file.exists()
        cluster.start_fleet("node01", *FAST)
        cluster.wait_online(1)
        result = cluster.cidcapt("-j", "plain1", "-n", "node01", "-i", "debian-12-2", "--plain-tcp")
        assert result.returncode == 0, result.stderr
    finally:
        cluster.stop()
