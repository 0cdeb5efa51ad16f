"""Tests for cidd.config: defaults, a full file, every problem reported together with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from cidd.config import Config, ConfigError, NodeSpec, load_config, parse_config
from cidd.core.machine_types import Policy, Rung

FULL = """\
# a complete cidd.yaml
state_dir: {state}
catalog: /etc/cid/images.yaml
image_dir: /srv/cid/images
listen: {{host: 0.0.0.0, port: 38018}}
http: {{host: 10.0.0.1, port: 8080, public_url: "http://head:8080"}}
heartbeat: 5
request_timeout: 12.5
capture_timeout: 7200
max_line: 131072
log: {{format: console, level: debug}}
groups:
  default:
    install_timeout: 1800
  gpu:
    ladder:
      - {{method: kexec, timeout: 120}}
      - {{method: reboot, timeout: 600}}
    install_timeout: 5400
    install_attempts: 3
nodes:
  - hosts: "node[01-03]"
  - hosts: "gpu[1-2],gpu7"
    group: gpu
"""


def problems(err: pytest.ExceptionInfo) -> list[str]:
    """Return the problem lines of a ConfigError (without the closing hint)."""
    lines = str(err.value).splitlines()
    assert lines[-1] == "fix these and start cidd again"
    return lines[:-1]


def parse(data, tmp_path: Path) -> Config:
    return parse_config(data, "cidd.yaml", env_state_dir=tmp_path)




# --- defaults ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [{}, None], ids=["empty", "null"])
def test_defaults(data, tmp_path):
    config = parse(data, tmp_path)
    assert config.state_dir == tmp_path
    assert (config.catalog, config.catalog_required, config.image_dir) == (tmp_path / "images.yaml", False, None)
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 38008)
    assert (config.http_host, config.http_port, config.public_http_url) == ("127.0.0.1", 38080, None)
    assert config.http_base == "http://127.0.0.1:38080"
    assert (config.heartbeat, config.request_timeout, config.capture_timeout) == (10.0, 30.0, 3600.0)
    assert config.max_line == 65536
    assert config.auto_register is True  # no inventory: nodes register themselves
    assert (config.log_format, config.log_level) == ("json", "info")
    assert dict(config.groups) == {"default": Policy()}
    assert Policy().ladder == (Rung("reboot", 300.0), Rung("reboot", 600.0))
    assert config.nodes == () and config.inventory() == {}
    assert config.db_path == tmp_path / "cidd.sqlite"


def test_load_config_without_a_file_uses_the_defaults_under_cid_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CID_STATE_DIR", str(tmp_path / "env-state"))
    config = load_config(None)
    assert config.state_dir == tmp_path / "env-state"
    assert config.listen_port == 38008


# --- a full file ----------------------------------------------------------------------------------------------


def test_full_config(tmp_path):
    path = tmp_path / "cidd.yaml"
    path.write_text(FULL.format(state=tmp_path / "st"), encoding="utf-8")
    config = load_config(path)
    assert config.state_dir == tmp_path / "st"
    assert (config.catalog, config.catalog_required) == (Path("/etc/cid/images.yaml"), True)
    assert config.image_dir == Path("/srv/cid/images")
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 38018)
    assert (config.http_host, config.http_port, config.http_base) == ("10.0.0.1", 8080, "http://head:8080")
    assert (config.heartbeat, config.request_timeout, config.capture_timeout) == (5.0, 12.5, 7200.0)
    assert config.max_line == 131072
    assert (config.log_format, config.log_level) == ("console", "debug")
    assert config.groups["default"] == Policy(install_timeout=1800.0)
    assert config.groups["gpu"] == Policy(ladder=(Rung("kexec", 120.0), Rung("reboot", 600.0)),
                                          install_timeout=5400.0, install_attempts=3)
    assert config.auto_register is False  # an inventory is given: unknown nodes are refused


def test_nodes_hostlists_are_expanded_into_the_inventory_with_their_groups(tmp_path):
    path = tmp_path / "cidd.yaml"
    path.write_text(FULL.format(state=tmp_path), encoding="utf-8")
    config = load_config(path)
    assert config.nodes == (NodeSpec(("node01", "node02", "node03"), "default"),
                            NodeSpec(("gpu1", "gpu2", "gpu7"), "gpu"))
    assert config.inventory() == {"node01": "default", "node02": "default", "node03": "default",
                                  "gpu1": "gpu", "gpu2": "gpu", "gpu7": "gpu"}
    assert config.policy("gpu").ladder[0] == Rung("kexec", 120.0)
    assert config.policy("default").install_timeout == 1800.0
    assert config.policy("nosuchgroup") is config.groups["default"]


def test_moab_style_hosts_and_explicit_auto_register(tmp_path):
    config = parse({"nodes": [{"hosts": "n1:ppn=8+n2:ppn=8"}], "auto_register": True}, tmp_path)
    assert config.inventory() == {"n1": "default", "n2": "default"}
    assert config.auto_register is True


def test_an_empty_ladder_keeps_the_default_ladder(tmp_path):
    config = parse({"groups": {"small": {"ladder": [], "install_attempts": 1}}}, tmp_path)
    assert config.groups["small"] == Policy(install_attempts=1)


# --- problems -------------------------------------------------------------------------------------------------


def test_every_problem_is_reported_together_with_its_key_path(tmp_path):
    data = {
        "state_dir": 7,
        "listen": {"port": "x"},
        "http": {"host": 5},
        "heartbeat": True,
        "request_timeout": 0.0,
        "max_line": 100,
        "log": {"format": "xml", "level": "loud"},
        "groups": {"gpu": {"install_timeout": -1, "install_attempts": 0,
                           "ladder": [{"method": "reboot", "timeout": 0.5}, "reboot"]}},
        "nodes": [{"hosts": "n[1-2]", "group": "gpu"}, {"group": "gpu"}],
    }
    with pytest.raises(ConfigError) as err:
        parse(data, tmp_path)
    assert err.value.code == "bad_request"
    assert problems(err) == [
        "cidd.yaml: top level: 'state_dir' must be a string (got 7)",
        "cidd.yaml: groups.gpu.ladder[0]: 'timeout' must be a number >= 1 (got 0.5)",
        "cidd.yaml: groups.gpu.ladder[1]: a rung is a mapping like {method: reboot, timeout: 300}",
        "cidd.yaml: groups.gpu: 'install_timeout' must be a number >= 1 (got -1)",
        "cidd.yaml: groups.gpu: 'install_attempts' must be a number >= 1 (got 0)",
        "cidd.yaml: nodes[1]: each entry needs 'hosts' (a hostlist) and optionally 'group'",
        "cidd.yaml: listen: 'port' must be a TCP port number from 0 to 65535 (got 'x')",
        "cidd.yaml: http: 'host' must be a string (got 5)",
        "cidd.yaml: top level: 'heartbeat' must be a number >= 0.1 (got True)",
        "cidd.yaml: top level: 'request_timeout' must be a number >= 0.1 (got 0.0)",
        "cidd.yaml: top level: 'max_line' must be a number >= 1024 (got 100)",
        "cidd.yaml: log: 'format' must be one of json, console (got 'xml')",
        "cidd.yaml: log: 'level' must be one of debug, info, warning, error (got 'loud')",
    ]


def test_unknown_keys_are_reported_at_every_level(tmp_path):
    data = {
        "listne": {},
        "listen": {"hots": "x"},
        "http": {"url": "x"},
        "log": {"colour": True},
        "groups": {"gpu": {"timeout": 3}},
        "nodes": [{"hosts": "n1", "grp": "gpu"}],
    }
    with pytest.raises(ConfigError) as err:
        parse(data, tmp_path)
    lines = problems(err)
    assert len(lines) == 6
    assert lines[0].startswith("cidd.yaml: top level: unknown key 'listne' (known: auto_register, bmc, boot, "
                               "capture_timeout,")
    assert "cidd.yaml: listen: unknown key 'hots' (known: host, port)" in lines
    assert "cidd.yaml: http: unknown key 'url' (known: host, port, public_url)" in lines
    assert "cidd.yaml: log: unknown key 'colour' (known: format, level)" in lines
    assert ("cidd.yaml: groups.gpu: unknown key 'timeout' (known: bmc, boot_entries, distribution, "
            "install_attempts, install_timeout, ladder, resume_for)" in lines)
    assert "cidd.yaml: nodes[0]: unknown key 'grp' (known: group, hosts)" in lines


def test_bad_ladder_method(tmp_path):
    data = {"groups": {"gpu": {"ladder": [{"method": "reboot", "timeout": 60}, {"method": "ipmi", "timeout": 60},
                                          {"method": 3}]}}}
    with pytest.raises(ConfigError) as err:
        parse(data, tmp_path)
    assert problems(err) == [
        "cidd.yaml: groups.gpu.ladder[1]: unknown method 'ipmi' (known: efi_bootnext, grub_reboot, kexec, power_cycle, "
        "reboot, redfish_boot_installer)",
        "cidd.yaml: groups.gpu.ladder[2]: 'method' must be a string (got 3)",
    ]


def test_unknown_group_and_bad_hostlist(tmp_path):
    data = {"groups": {"gpu": {}}, "nodes": [{"hosts": "n[1-4]", "group": "gpus"}, {"hosts": "n[1-"}]}
    with pytest.raises(ConfigError) as err:
        parse(data, tmp_path)
    lines = problems(err)
    assert lines[0] == "cidd.yaml: nodes[0]: group 'gpus' is not defined under 'groups'"
    assert lines[1].startswith("cidd.yaml: nodes[1]: bad hostlist 'n[1-'")
    assert len(lines) == 2


def test_sections_of_the_wrong_kind(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse({"listen": "0.0.0.0:1", "groups": {"gpu": 5}}, tmp_path)
    assert problems(err) == [
        "cidd.yaml: top level: 'listen' must be a mapping",
        "cidd.yaml: groups.gpu: a group must be a mapping",
    ]


def test_a_config_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse(["listen"], tmp_path)
    assert str(err.value) == "cidd.yaml: the configuration must be a mapping of keys to values"


def test_load_config_reports_unreadable_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "missing.yaml")
    assert f"cannot read configuration {tmp_path / 'missing.yaml'}" in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {host: [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value).startswith(f"{bad}: not valid YAML")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("heartbeat: soon\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(wrong)
    assert problems(err) == [f"{wrong}: top level: 'heartbeat' must be a number >= 0.1 (got 'soon')"]


# --- values checked for their kind, not only present ------------------------------------------------------


@pytest.mark.parametrize("key", ["catalog", "image_dir"])
def test_a_non_string_path_is_a_problem_not_a_crash(key, tmp_path):
    with pytest.raises(ConfigError) as err:
        parse({key: 5, "heartbeat": "x"}, tmp_path)
    assert problems(err) == [
        f"cidd.yaml: top level: '{key}' must be a non-empty string (got 5)",
        "cidd.yaml: top level: 'heartbeat' must be a number >= 0.1 (got 'x')",
    ]


def test_auto_register_must_be_a_boolean(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse({"auto_register": "false"}, tmp_path)
    assert problems(err) == ["cidd.yaml: top level: 'auto_register' must be true or false (got 'false')"]
    assert parse({"auto_register": False}, tmp_path).auto_register is False


@pytest.mark.parametrize("port", [99999, -1, 80.5, True])
def test_ports_outside_0_to_65535_are_a_problem(port, tmp_path):
    with pytest.raises(ConfigError) as err:
        parse({"listen": {"port": port}, "http": {"port": port}}, tmp_path)
    assert problems(err) == [
        f"cidd.yaml: listen: 'port' must be a TCP port number from 0 to 65535 (got {port!r})",
        f"cidd.yaml: http: 'port' must be a TCP port number from 0 to 65535 (got {port!r})",
    ]


def test_public_url_must_be_a_string(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse({"http": {"public_url": 8080}}, tmp_path)
    assert problems(err) == ["cidd.yaml: http: 'public_url' must be a non-empty string (got 8080)"]


def test_nodes_given_as_a_string_is_one_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse({"nodes": "n[1-4]"}, tmp_path)
    assert problems(err) == ["cidd.yaml: nodes: 'nodes' must be a list of {hosts: HOSTLIST, group: NAME} entries"]


def test_scheduler_features_map_and_bad_feature_names():
    from cidd.config import ConfigError, parse_config

    config = parse_config({"scheduler": {"features": {"img_deb12.1": "debian-12-1"}, "default_image": "debian-12-1"}})
    assert config.features == {"img_deb12.1": "debian-12-1"} and config.default_image == "debian-12-1"
    with pytest.raises(ConfigError) as err:
        parse_config({"scheduler": {"features": {"bad-name": "x-1-1", "9lives": "x-1-1", "ok": ""}, "extra": 1}},
                     "c.yaml")
    text = str(err.value)
    assert "'bad-name' must start with a letter" in text and "'9lives' must start with a letter" in text
    assert "scheduler.features.ok" in text and "'extra'" in text


def test_power_cycle_rungs_need_a_bmc_section():
    from cidd.config import ConfigError, parse_config

    ladder = {"groups": {"hard": {"ladder": [{"method": "reboot", "timeout": 60},
                                             {"method": "power_cycle", "timeout": 300}]}}}
    with pytest.raises(ConfigError) as err:
        parse_config(ladder, "c.yaml")
    assert "group(s) hard use power_cycle, which needs a 'bmc' section" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config({**ladder, "bmc": {"address": "{name}-bmc"}}, "c.yaml")
    assert "'credentials'" in str(err.value)
    config = parse_config({**ladder, "bmc": {"address": "127.0.0.1:{index+9000}", "credentials": "/etc/cid/bmc"}})
    assert config.bmc.address == "127.0.0.1:{index+9000}" and config.bmc.max_concurrent == 8


def test_next_boot_methods_need_boot_entries_and_windows_are_read(tmp_path):
    data = {"groups": {
        "grub": {"ladder": [{"method": "grub_reboot", "timeout": 60}],
                 "boot_entries": {"installer": "cid-installer", "disk": "debian"}},
        "efi": {"ladder": [{"method": "efi_bootnext", "timeout": 60}], "boot_entries": {"installer": "0003",
                                                                                      "disk": "0001"}}},
        "windows": {"reboots": 64, "power": 16, "timeout_per_node": 0.5}}
    config = parse(data, tmp_path)
    assert config.policy("grub").boot_entries == {"installer": "cid-installer", "disk": "debian"}
    assert config.policy("efi").ladder[0].method == "efi_bootnext"
    assert (config.windows.reboots, config.windows.power, config.windows.timeout_per_node) == (64, 16, 0.5)
    assert parse({}, tmp_path).windows.reboots is None  # no bound by default


def test_bad_boot_entries_and_windows_are_reported(tmp_path):
    data = {"groups": {
        "grub": {"ladder": [{"method": "grub_reboot", "timeout": 60}], "boot_entries": {"installer": "x"}},
        "efi": {"ladder": [{"method": "efi_bootnext", "timeout": 60}],
                "boot_entries": {"installer": "Boot0003", "disk": "1", "floppy": "a"}}},
        "windows": {"reboots": 0, "power": "many"}}
    with pytest.raises(ConfigError) as err:
        parse(data, tmp_path)
    text = "\n".join(problems(err))
    assert "groups.grub: method(s) grub_reboot need 'boot_entries' with both 'installer' and 'disk'" in text
    assert "groups.efi.boot_entries: unknown boot 'floppy'" in text
    assert "groups.efi.boot_entries: 'installer': efi_bootnext needs a hexadecimal EFI boot number" in text
    assert "windows: 'reboots' must be a whole number >= 1" in text and "'power' must be a whole number" in text


def test_user_database_lookups_are_tunable_and_checked(tmp_path):
    config = parse_config({"state_dir": str(tmp_path), "users": {"timeout": 2, "ttl": 60, "stale_for": 600,
                                                                 "max_lookups": 4}})
    assert (config.users.timeout, config.users.ttl, config.users.stale_for, config.users.max_lookups) == \
        (2.0, 60.0, 600.0, 4)
    defaults = parse_config({"state_dir": str(tmp_path)}).users
    assert (defaults.timeout, defaults.ttl, defaults.stale_for, defaults.max_lookups) == (5.0, 300.0, 3600.0, 16)
    with pytest.raises(ConfigError) as caught:
        parse_config({"state_dir": str(tmp_path),
                      "users": {"timeout": 30, "ttl": 100, "stale_for": 10, "max_lookups": 0, "cache": 1}})
    text = str(caught.value)
    for words in ("users: unknown key 'cache'", "'timeout' must be under 10 seconds",
                  "'stale_for' (10) must be at least 'ttl' (100)", "'max_lookups' must be a whole number >= 1"):
        assert words in text


def test_a_group_may_set_the_installer_resume_time_and_cidd_sends_it() -> None:
    from cidcatalog.catalog import Catalog, Image
    from cidd.agent_messages import install_command

    config = parse_config({"groups": {"big": {"resume_for": 900}}}, "test.yaml")
    assert config.policy("big").resume_for == 900.0 and config.policy("default").resume_for is None
    catalog = Catalog({"alma-9-1": Image("alma", "9", "1", "alma-9-1.tar.zst", sha256="ab" * 32, size=3)})
    message = install_command(catalog, "http://h:1", "alma-9-1", 2, lambda image: "/images/" + image.file, 900.0)
    assert (message["resume_for"], message["attempt"]) == (900.0, 2)
    assert "resume_for" not in install_command(catalog, "http://h:1", "alma-9-1", 1, lambda image: "/x")
    with pytest.raises(ConfigError, match="resume_for"):
        parse_config({"groups": {"big": {"resume_for": -1}}}, "test.yaml")
