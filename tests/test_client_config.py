"""How every client finds cidd (cidcommon/client_config.py, docs/configuration.md "How clients find cidd"):
options > environment > $CID_CONFIG or /etc/cid/cidd.yaml > the default socket; one address, never a second.

The head-node tests run a real cidd and reach it through its configuration file alone.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cidcapt import slurm_helper
from cidcapt.main import main as cidcapt
from cidcommon.client_config import ClientConfig, ClientConfigError, ClientOptions, agent_server, resolve
from cidsim.fake_cidd import FakeCidd, FakeSession, test_ca_file
from tests.procs import REPO, Cluster, wait_port

TOKEN = "sched-t0ken"


def write_config(path: Path, data: dict) -> Path:
    """Write ``data`` as YAML to ``path``; return the path."""
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def etc(tmp_path: Path) -> Path:
    """An empty stand-in for /etc/cid."""
    path = tmp_path / "etc-cid"
    path.mkdir()
    return path


def test_without_any_file_the_default_is_the_state_directorys_socket(tmp_path: Path, etc: Path) -> None:
    client = resolve(env={"CID_STATE_DIR": str(tmp_path / "st")}, config_dir=etc)
    assert (client.socket, client.server, client.origin) == (tmp_path / "st" / "cidd.sock", None, "$CID_STATE_DIR")
    assert client.token_file is None and client.ca is None and client.role == "admin"
    assert client.where == f"{tmp_path / 'st' / 'cidd.sock'} (from $CID_STATE_DIR)"
    tcp = resolve(ClientOptions(token_file=tmp_path / "t"), {"CID_STATE_DIR": str(tmp_path)}, config_dir=etc)
    assert (tcp.server, tcp.origin, tcp.token_file) == (("127.0.0.1", 38008), "the built-in default", tmp_path / "t")
    with pytest.raises(ValueError):
        ClientConfig(socket=None, server=None, origin="x", role="admin", state_dir=tmp_path)


def test_the_file_in_the_configuration_directory_gives_cidds_socket_or_listen_address(tmp_path: Path,
                                                                                     etc: Path) -> None:
    config = write_config(etc / "cidd.yaml", {"state_dir": str(tmp_path / "st"), "listen": {"port": 4000}})
    client = resolve(env={}, config_dir=etc)
    assert (client.socket, client.origin, client.config_file) == (tmp_path / "st" / "cidd.sock",
                                                                  f"{config}, state_dir", config)
    write_config(config, {"state_dir": "/srv/cid", "socket": {"path": "/run/cid/cidd.sock"}})
    assert resolve(env={}, config_dir=etc).socket == Path("/run/cid/cidd.sock")
    write_config(config, {"state_dir": "/srv/cid", "socket": False, "listen": {"host": "0.0.0.0", "port": 4000},
                          "tls": {"ca": "/etc/cid/ca.pem"}})
    client = resolve(env={}, config_dir=etc, default_role="scheduler")
    assert (client.server, client.origin) == (("127.0.0.1", 4000), f"{config}, listen")
    assert (client.token_file, client.ca, client.plain) == (Path("/srv/cid/secrets/scheduler.token"),
                                                            Path("/etc/cid/ca.pem"), False)
    write_config(config, {"socket": {"enabled": False}, "tls": {"mode": "plain"}})
    client = resolve(env={}, config_dir=etc)
    assert (client.server, client.plain, client.ca) == (("127.0.0.1", 38008), True, None)


def test_the_client_section_names_cidd_for_other_hosts(tmp_path: Path, etc: Path) -> None:
    config = write_config(etc / "cidd.yaml", {"client": {"server": "head01:4000", "token_file": "/etc/cid/s.token",
                                                         "ca": "/etc/cid/ca.pem", "role": "scheduler"}})
    client = resolve(env={}, config_dir=etc)
    assert (client.server, client.origin, client.role) == (("head01", 4000), f"{config}, client.server", "scheduler")
    assert (client.token_file, client.ca) == (Path("/etc/cid/s.token"), Path("/etc/cid/ca.pem"))
    assert agent_server({}, config_dir=etc) == ("head01:4000", f"{config}, client.server")


def test_environment_beats_the_file_and_options_beat_the_environment(tmp_path: Path, etc: Path) -> None:
    write_config(etc / "cidd.yaml", {"state_dir": "/srv/cid", "listen": {"port": 4000},
                                     "client": {"role": "reader", "ca": "/etc/cid/ca.pem"}})
    env = {"CID_SERVER": "envhost:5000", "CID_STATE_DIR": str(tmp_path), "CID_ROLE": "scheduler",
           "CID_CA_FILE": "/env/ca.pem"}
    client = resolve(env=env, config_dir=etc)
    assert (client.server, client.origin, client.role) == (("envhost", 5000), "$CID_SERVER", "scheduler")
    assert (client.token_file, client.ca) == (tmp_path / "secrets" / "scheduler.token", Path("/env/ca.pem"))
    assert resolve(env={**env, "CID_SOCKET": "/env/sock"}, config_dir=etc).socket == Path("/env/sock")
    options = ClientOptions(socket=Path("/opt/sock"))
    assert (resolve(options, env, config_dir=etc).socket, resolve(options, env, config_dir=etc).label) == \
        (Path("/opt/sock"), "")  # typed on the command line: named as is
    client = resolve(ClientOptions(server="opt:1", role="admin", ca=Path("/opt/ca.pem")), env, config_dir=etc)
    assert (client.server, client.role, client.ca) == (("opt", 1), "admin", Path("/opt/ca.pem"))
    # a token file asks for TCP: to the file's own address, never "the socket if it is there, else TCP"
    client = resolve(env={"CID_TOKEN_FILE": "/t"}, config_dir=etc)
    assert (client.server, client.role, client.ca) == (("127.0.0.1", 4000), "reader", Path("/etc/cid/ca.pem"))
    with pytest.raises(ClientConfigError, match="use either --socket"):
        resolve(ClientOptions(socket=Path("/s"), server="h:1"), {}, config_dir=etc)


def test_cid_config_beats_the_configuration_directory(tmp_path: Path, etc: Path) -> None:
    write_config(etc / "cidd.yaml", {"state_dir": "/etc-state"})
    mine = write_config(tmp_path / "mine.yaml", {"state_dir": "/mine"})
    assert resolve(env={"CID_CONFIG": str(mine)}, config_dir=etc).socket == Path("/mine/cidd.sock")
    with pytest.raises(ClientConfigError, match=r"\$CID_CONFIG names .*nothing.yaml, which is not a file"):
        resolve(env={"CID_CONFIG": str(tmp_path / "nothing.yaml")}, config_dir=etc)


@pytest.mark.parametrize("text, words", [
    ("listen: [1]\n", ["listen: must be a mapping"]),
    ("listen: {port: x}\nclient: {role: root, colour: red}\n",
     ["listen: 'port' must be a TCP port", "client: 'role' must be one of admin, scheduler, reader",
      "client: unknown key(s) colour"]),
    ("client: {server: 'head:http'}\n", ["client: bad port in client.server address 'head:http'"]),
    ("socket: {path: run/cidd.sock}\n", ["socket: 'path' must be an absolute path"]),
    ("tls: {mode: clear}\n", ["tls: 'mode' must be tls or plain"]),
    ("state_dir: [\n", ["not valid YAML"]),
    ("- a list\n", ["must be a mapping of keys to values"]),
    ("socket: false\nlisten: {port: 0}\n", ["listen: port 0 (any free port) cannot be found by clients"]),
])
def test_a_bad_file_is_an_error_naming_the_file_and_the_key(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "cidd.yaml"
    path.write_text(text)
    with pytest.raises(ClientConfigError) as err:
        resolve(env={"CID_CONFIG": str(path)})
    assert err.value.code == "bad_request"
    for word in words:
        assert word in err.value.message
    assert str(path) in err.value.message


def run_cidcapt(args: list[str], env: dict[str, str], config_dir: Path) -> tuple[int, str, str]:
    """Run cidcapt's main in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = cidcapt(args, stdout=out, stderr=err, env=env, config_dir=config_dir)
    return code, out.getvalue(), err.getvalue()


def test_a_bad_configuration_file_exits_2_naming_it(tmp_path: Path, etc: Path) -> None:
    path = write_config(etc / "cidd.yaml", {"client": {"role": "root"}})
    code, _, err = run_cidcapt(["--status"], {}, etc)
    assert code == 2
    assert f"cidcapt: error: {path}: client: 'role' must be one of" in err
    code, _, err = run_cidcapt(["--status", "--server", "127.0.0.1:1"], {}, etc)
    assert code == 2 and str(path) in err  # the file is read whatever else is given: it is never ignored silently
    path.unlink()
    code, _, err = run_cidcapt(["--status"], {"CID_SERVER": "head:http"}, etc)
    assert code == 2 and "$CID_SERVER: bad port in server address 'head:http'" in err


def test_abbreviated_options_are_refused() -> None:
    code, _, err = run_cidcapt(["--tim", "5", "--status", "--server", "127.0.0.1:1"], {}, Path("/nonexistent"))
    assert code == 2 and "unrecognized arguments: --tim" in err  # never taken for --timeout
    assert slurm_helper.main(["--serv", "127.0.0.1:1"], stdout=io.StringIO(), stderr=io.StringIO(), env={}) == 2
    from cidd.init_cli import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["init", "--sa", "head"])  # a subcommand's parser too
    assert exit_.value.code == 2


def listen(port: int) -> socket.socket:
    """Return a TCP listener on 127.0.0.1:``port`` (0: any free port). Raises OSError when the port is taken."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    sock.listen(8)
    sock.setblocking(False)
    return sock


@pytest.fixture()
def tcp_listener() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 standing for whatever a client might wrongly fall back to."""
    sock = listen(0)
    yield sock
    sock.close()


@pytest.fixture()
def default_port_listener() -> Iterator[socket.socket | None]:
    """A listener on 127.0.0.1:38008, the old silent fallback, when that port is free here (else None)."""
    try:
        sock = listen(38008)
    except OSError:
        yield None
        return
    yield sock
    sock.close()


def no_connection(listener: socket.socket) -> bool:
    """Return whether nobody connected to ``listener`` (the kernel queues even connections never accepted)."""
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    return False


@pytest.mark.parametrize("stale", [False, True], ids=["missing", "refusing"])
def test_a_dead_configured_socket_exits_4_naming_it_and_tries_no_tcp(tmp_path: Path, etc: Path,
                                                                     tcp_listener: socket.socket, stale: bool,
                                                                     default_port_listener: socket.socket | None
                                                                     ) -> None:
    state = tmp_path / "st"
    (state / "secrets").mkdir(parents=True)
    (state / "secrets" / "admin.token").write_text("t0ken\n")  # a TCP fallback would have all it needs
    (state / "secrets" / "admin.token").chmod(0o600)
    port = tcp_listener.getsockname()[1]
    config = write_config(etc / "cidd.yaml", {"state_dir": str(state), "listen": {"port": port}})
    sock_path = state / "cidd.sock"
    if stale:  # a socket file nobody listens on: connect() is refused
        stale_sock = socket.socket(socket.AF_UNIX)
        stale_sock.bind(str(sock_path))
    started = time.monotonic()
    code, _, err = run_cidcapt(["--status", "--connect-timeout", "0.3"], {}, etc)
    assert code == 4, err
    assert time.monotonic() - started < 5
    assert f"cannot reach cidd at {sock_path} (from {config}, state_dir)" in err
    assert "no other address is tried" in err
    assert no_connection(tcp_listener)
    assert default_port_listener is None or no_connection(default_port_listener)
    if stale:
        stale_sock.close()


def test_the_laptop_default_socket_fails_naming_it(tmp_path: Path, etc: Path) -> None:
    code, _, err = run_cidcapt(["--captures", "--connect-timeout", "0.2"], {"CID_STATE_DIR": str(tmp_path)}, etc)
    assert code == 4
    assert f"cidcapt: error: cannot reach cidd at {tmp_path / 'cidd.sock'} (from $CID_STATE_DIR)" in err


def test_the_slurm_helper_on_another_host_finds_cidd_through_the_client_section(tmp_path: Path, etc: Path) -> None:
    token = tmp_path / "scheduler.token"
    token.write_text(TOKEN)
    token.chmod(0o600)

    def script(session: FakeSession) -> None:
        session.hello(expect_role="scheduler")
        request = session.recv()
        if request["type"] == "features":
            session.reply(request, features={"img_rocky93": "rocky-9-3"})
        else:
            session.reply(request, nodes=[{"node": "node01", "state": "ready", "image": "rocky-9-3"}])

    with FakeCidd(script, token=TOKEN) as cidd:
        write_config(etc / "cidd.yaml", {"client": {"server": cidd.address, "token_file": str(token),
                                                    "ca": test_ca_file(), "role": "scheduler"}})
        out, err = io.StringIO(), io.StringIO()
        code = slurm_helper.main(["--node", "node01"], stdout=out, stderr=err,
                                 env={"CID_CONFIG": str(etc / "cidd.yaml")})
    assert (code, out.getvalue()) == (0, "img_rocky93\n"), err.getvalue()


def cidcapt_process(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    """Run the cidcapt program with CID_CONFIG as its only cid setting."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "CID_CONFIG": str(config), "HOME": "/nonexistent"}
    return subprocess.run([sys.executable, "-m", "cidcapt.main", *args], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"socket": False, "client": {"role": "reader"}}],
                         ids=["socket", "listen-address"])
def test_a_head_node_reaches_cidd_through_its_configuration_alone(tmp_path: Path, extra: dict) -> None:
    cluster = Cluster(tmp_path, nodes=[{"hosts": "node[01-02]"}], extra_config=extra)
    cluster.start_cidd()
    try:
        config = tmp_path / "cidd.yaml"
        for _ in range(100):  # the socket follows the TCP port by a moment
            if extra or (cluster.state_dir / "cidd.sock").exists():
                break
            time.sleep(0.05)
        done = cidcapt_process("--status", "--json", config=config)
        assert done.returncode == 0, done.stderr
        assert sorted(row["node"] for row in json.loads(done.stdout)) == ["node01", "node02"]
        checked = subprocess.run([sys.executable, "-m", "cidd.main", "check-config"], capture_output=True, text=True,
                                 env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "CID_CONFIG": str(config)},
                                 timeout=60)
        assert checked.returncode == 0, checked.stderr
        assert f"checked {config} (from $CID_CONFIG)" in checked.stdout
    finally:
        assert cluster.cidd is not None
        cluster.cidd.terminate()
        cluster.cidd.wait(timeout=30)
    done = cidcapt_process("--status", "--connect-timeout", "0.3", config=config)
    assert done.returncode == 4  # cidd stopped: the same one address, named, and nothing else tried
    where = f"127.0.0.1:{cluster.port} (from {config}, listen)" if extra else \
        f"{cluster.state_dir / 'cidd.sock'} (from {config}, state_dir)"
    assert f"cannot reach cidd at {where}" in done.stderr


@pytest.mark.slow
def test_a_bare_cidd_reads_the_same_file_as_the_clients(tmp_path: Path) -> None:
    """`cidd` with no --config reads $CID_CONFIG (else /etc/cid/cidd.yaml): the daemon and its clients on the
    head node agree on one file, and no variable names a state directory or an address. Before, a bare cidd ran
    on its built-in defaults while the clients read the file, and they looked for it in two places."""
    cluster = Cluster(tmp_path, nodes=[{"hosts": "node[01-02]"}])
    config = cluster.write_config()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "CID_CONFIG": str(config), "HOME": "/nonexistent"}
    with open(tmp_path / "cidd.log", "wb") as log:
        cidd = subprocess.Popen([sys.executable, "-m", "cidd.main"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_port(cluster.port)
        for _ in range(100):  # the socket follows the TCP port by a moment
            if (cluster.state_dir / "cidd.sock").exists():
                break
            time.sleep(0.05)
        done = cidcapt_process("--status", "--json", config=config)
        assert done.returncode == 0, done.stderr
        assert sorted(row["node"] for row in json.loads(done.stdout)) == ["node01", "node02"]
    finally:
        cidd.terminate()
        cidd.wait(timeout=30)
    started = [json.loads(line) for line in (tmp_path / "cidd.log").read_text().splitlines()
               if '"cidd.configuration"' in line]
    assert [event["source"] for event in started] == [f"{config} (from $CID_CONFIG)"]
