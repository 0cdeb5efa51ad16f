"""Redfish BMCs through cidd's PowerController, against a real Redfish service: sushy-tools' sushy-emulator.

Every check looks at both sides: what cidd reports (the Deferred's value or its PowerError, cidd's log events)
and what the emulator recorded (its request journal, and the system's state as the emulator reports it).
The emulator runs in its own process on 127.0.0.1 with HTTPS (a test CA made here), per-call X-Auth-Token
sessions, power changes applied 1 s after they are asked (its fake driver draws 1-11 s), rf04 ignoring
GracefulShutdown (a hung OS), rf09 without a power state (the emulator answers HTTP 500) and rf10's requests
held 4 s (a BMC that does not answer in time).
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater

from cidd.bmc import BmcDirectory
from cidd.config import ConfigError, parse_config
from cidd.power import PowerController, PowerError
from tests.redfishemu import PASSWORD, USER, BmcPki, RedfishEmulator, make_pki, write_credentials

pytestmark = pytest.mark.timeout(120)

STALL_S = 4.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> BmcPki:
    return make_pki(tmp_path_factory.mktemp("bmc-pki"))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory, pki: BmcPki) -> Iterator[RedfishEmulator]:
    emu = RedfishEmulator(tmp_path_factory.mktemp("redfish"), "rf[01-10]", pki,
                          extra=["--power-delay", "1", "--ignore-graceful", "rf04,rf08", "--broken", "rf09",
                                 "--stall", f"rf10={STALL_S}"])
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture(scope="module")
def efi_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain HTTP server with a stand-in EFI binary, for HttpBootUri (the emulator downloads what it names)."""
    root = tmp_path_factory.mktemp("efi")
    (root / "ipxe.efi").write_bytes(b"MZ stand-in EFI binary")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ipxe.efi"
    finally:
        server.shutdown()


def controller(tmp_path: Path, emulator: RedfishEmulator, **bmc: Any) -> PowerController:
    """Return a PowerController whose group ``rf`` (nodes rf01-rf10) has a Redfish BMC on ``emulator``."""
    creds = write_credentials(tmp_path / "redfish.cred", USER, bmc.pop("password", PASSWORD))
    settings = {"type": "redfish", "address": emulator.address(), "credentials": str(creds),
                "ca_bundle": str(emulator.pki.ca), "timeout": 10, **bmc}
    if settings.get("verify") is False:
        settings.pop("ca_bundle")
    config = parse_config({"groups": {"rf": {"bmc": settings}}, "nodes": [{"hosts": "rf[01-10]", "group": "rf"}]},
                          "c.yaml")
    directory = BmcDirectory.load(config.bmc, config.inventory())
    return PowerController.from_config(None, reactor, config.bmc, directory)


def requests_for(emulator: RedfishEmulator, since: int, name: str) -> list[dict[str, Any]]:
    """Return the journal entries after ``since`` that touched system ``name``."""
    return [e for e in emulator.journal()[since:] if f"/Systems/{name}" in e["path"]]


def resets(entries: list[dict[str, Any]]) -> list[str]:
    return [e["body"]["ResetType"] for e in entries if e["method"] == "POST" and "Reset" in e["path"]]


def assert_logged_out(emulator: RedfishEmulator, since: int) -> None:
    """Every session opened after ``since`` was deleted (logged out) by cidd."""
    entries = emulator.journal()[since:]
    opened = {e["session"] for e in entries if e.get("auth") == "login" and e.get("status") == 201}
    closed = {e["session"] for e in entries if e.get("logout")}
    assert opened and opened == closed, (opened, closed)


@pytest_twisted.ensureDeferred
async def test_power_on_off_cycle_reset_and_status(tmp_path: Path, emulator: RedfishEmulator) -> None:
    power = controller(tmp_path, emulator, off_timeout=6)
    start = len(emulator.journal())
    try:
        assert await power.status("rf01") == "on"
        assert await power.off("rf01") == "graceful"  # GracefulShutdown, and the system went off within 6 s
        emulator.wait_power("rf01", "Off")
        assert await power.status("rf01") == "off"
        await power.on("rf01")
        emulator.wait_power("rf01", "On")
        await power.cycle("rf01")  # on: ForceRestart; the fake system is off, then on again 1 s later
        emulator.wait_power("rf01", "On")
        await power.reset("rf01")
        assert await power.off("rf04", None) == "forced"  # rf04 ignores GracefulShutdown: ForceOff after 6 s
        emulator.wait_power("rf04", "Off")
        assert await power.off("rf04") == "already off"
        await power.cycle("rf04")  # from off: On
        emulator.wait_power("rf04", "On")
    finally:
        await threads.deferToThread(power.stop)
    assert resets(requests_for(emulator, start, "rf01")) == ["GracefulShutdown", "On", "ForceRestart", "ForceRestart"]
    assert resets(requests_for(emulator, start, "rf04")) == ["GracefulShutdown", "ForceOff", "On"]
    assert_logged_out(emulator, start)
    actions = [e for e in emulator.journal()[start:]
               if e["method"] in ("POST", "PATCH") and "Sessions" not in e["path"]]
    assert actions and all(e["auth"] == "session" for e in actions)  # cidd's own requests carried its X-Auth-Token


@pytest_twisted.ensureDeferred
async def test_one_time_boot_override_and_mac_addresses(tmp_path: Path, emulator: RedfishEmulator,
                                                        efi_server: str) -> None:
    power = controller(tmp_path, emulator)
    (tmp_path / "pxe").mkdir()
    pxe_only = controller(tmp_path / "pxe", emulator, installer_boot="pxe")
    start = len(emulator.journal())
    try:
        assert await power.set_next_boot("rf02", None, "network") == "Pxe"
        assert emulator.system("rf02")["Boot"]["BootSourceOverrideTarget"] == "Pxe"
        assert await power.set_next_boot("rf02", None, "default") == "Hdd"
        assert emulator.system("rf02")["Boot"]["BootSourceOverrideTarget"] == "Hdd"
        assert await power.boot_once("rf03", None, "installer", efi_server) == f"UefiHttp {efi_server}"
        assert await pxe_only.boot_once("rf05", None, "installer", efi_server) == "Pxe"
        assert await power.mac_addresses("rf02") == ["52:54:00:cd:00:01"]
    finally:
        await threads.deferToThread(power.stop)
        await threads.deferToThread(pxe_only.stop)
    patches = [e["body"]["Boot"] for e in emulator.journal()[start:] if e["method"] == "PATCH"]
    assert [(p["BootSourceOverrideTarget"], p["BootSourceOverrideEnabled"]) for p in patches] == [
        ("Pxe", "Once"), ("Hdd", "Once"), ("UefiHttp", "Once"), ("Pxe", "Once")]
    assert patches[2]["HttpBootUri"] == efi_server
    rf03 = emulator.system("rf03")["Boot"]
    # the emulator attaches what HttpBootUri names as a virtual CD and reports that (its stand-in for HTTP boot)
    assert rf03["HttpBootUri"] == efi_server and rf03["BootSourceOverrideTarget"] == "Cd"
    assert resets(requests_for(emulator, start, "rf03")) == ["ForceRestart"]  # the override, then the reset
    assert_logged_out(emulator, start)


@pytest_twisted.ensureDeferred
async def test_a_bmc_answering_500_fails_its_call_with_the_answer_and_is_not_taken_for_silence(
        tmp_path: Path, emulator: RedfishEmulator) -> None:
    power = controller(tmp_path, emulator)
    start = len(emulator.journal())
    try:
        for _ in range(4):  # more than breaker_after (3): an answer, even an error, never opens the breaker
            with pytest.raises(PowerError) as err:
                await power.cycle("rf09")
            assert err.value.message.startswith(f"BMC of rf09 ({emulator.address('rf09')}) failed: HTTP 500 to GET "
                                                "/redfish/v1/Systems/rf09")
        assert not power.breaker_open(power.target("rf09"))
    finally:
        await threads.deferToThread(power.stop)
    mine = requests_for(emulator, start, "rf09")
    assert [e["status"] for e in mine] == [500] * 4 and not resets(mine)  # no retry, and no reset sent
    assert_logged_out(emulator, start)


@pytest_twisted.ensureDeferred
async def test_a_bmc_that_does_not_answer_in_time_fails_and_its_reset_is_never_sent(
        tmp_path: Path, emulator: RedfishEmulator) -> None:
    power = controller(tmp_path, emulator, timeout=1.5)
    start = len(emulator.journal())
    began = time.monotonic()
    try:
        with pytest.raises(PowerError) as err:
            await power.cycle("rf10")
        assert time.monotonic() - began < 3
        assert err.value.message.startswith(f"BMC of rf10 ({emulator.address('rf10')}) did not answer")
        assert await power.status("rf01") == "on"  # the other systems answer meanwhile
    finally:
        await threads.deferToThread(power.stop)
    time.sleep(STALL_S + 1)  # the held request reaches the emulator: nothing after it ever does
    mine = requests_for(emulator, start, "rf10")
    assert [e["method"] for e in mine] == ["GET"] and mine[0]["stalled"] == STALL_S and not resets(mine)


@pytest_twisted.ensureDeferred
async def test_a_call_whose_caller_gave_up_sends_nothing_more_not_even_half_way(
        tmp_path: Path, emulator: RedfishEmulator) -> None:
    """rf08 ignores GracefulShutdown: cidd waits for it to go off before ForceOff; its caller gives up meanwhile."""
    power = controller(tmp_path, emulator, off_timeout=5)
    start = len(emulator.journal())
    try:
        with capture_logs() as logs:
            off = power.off("rf08")
            reactor.callLater(1.0, off.cancel)
            with pytest.raises(defer.CancelledError):
                await off
            end = time.monotonic() + 5
            while not any(e["event"] == "power.abandoned" for e in logs) and time.monotonic() < end:
                await deferLater(reactor, 0.1, lambda: None)
    finally:
        await threads.deferToThread(power.stop)
    abandoned = [e for e in logs if e["event"] == "power.abandoned"]
    assert abandoned and abandoned[0]["node"] == "rf08" and "ForceOff" in abandoned[0]["unsent"]
    assert resets(requests_for(emulator, start, "rf08")) == ["GracefulShutdown"]  # no ForceOff ever came
    assert_logged_out(emulator, start)  # the logout still went out
    assert emulator.system("rf08")["PowerState"] == "On"


def test_the_console_of_a_redfish_node_is_refused_with_a_reason(tmp_path: Path, emulator: RedfishEmulator) -> None:
    power = controller(tmp_path, emulator)
    with pytest.raises(PowerError, match=r"BMC of rf01 \(https://.*\) is Redfish, which has no standard serial "
                                         "console"):
        power.console("rf01", None, lambda data: None, lambda reason: None)


@pytest_twisted.ensureDeferred
async def test_a_bad_certificate_is_refused_unless_verify_false_which_warns_at_every_start(
        tmp_path: Path, pki: BmcPki) -> None:
    rogue = RedfishEmulator(tmp_path / "rogue", "rf[01-02]", pki, rogue=True).start()
    try:
        power = controller(tmp_path, rogue)
        try:
            with pytest.raises(PowerError) as err:
                await power.status("rf01")
        finally:
            await threads.deferToThread(power.stop)
        assert err.value.message.startswith(f"BMC of rf01 ({rogue.address('rf01')}) failed: its TLS certificate is "
                                            "not trusted (certificate verify failed")
        assert not power.breaker_open(power.target("rf01"))
        assert rogue.journal() == []  # refused at the handshake: no request reached the BMC
        with capture_logs() as logs:
            unverified = controller(tmp_path, rogue, verify=False)
        warnings = [e for e in logs if e["event"] == "power.tls_unverified"]
        assert warnings and warnings[0]["log_level"] == "warning" and warnings[0]["settings"] == "groups.rf.bmc"
        try:
            assert await unverified.status("rf01") == "on"
        finally:
            await threads.deferToThread(unverified.stop)
        assert [e["path"] for e in rogue.journal() if e["method"] == "GET"][-1] == "/redfish/v1/Systems/rf01"
    finally:
        rogue.stop()


@pytest_twisted.ensureDeferred
async def test_wrong_credentials_name_the_node_and_the_bmc_never_the_password(
        tmp_path: Path, emulator: RedfishEmulator) -> None:
    wrong = "not-the-Password-42"
    start = len(emulator.journal())
    with capture_logs() as logs:
        power = controller(tmp_path, emulator, password=wrong)
        try:
            with pytest.raises(PowerError) as err:
                await power.off("rf06")
        finally:
            await threads.deferToThread(power.stop)
    message = err.value.message
    assert message.startswith(f"BMC of rf06 ({emulator.address('rf06')}) failed: HTTP 401 to POST "
                              "/redfish/v1/SessionService/Sessions")
    assert "the user or password was refused" in message and wrong not in message and PASSWORD not in message
    assert wrong not in repr(logs) and PASSWORD not in repr(logs)
    mine = emulator.journal()[start:]
    logins = [e for e in mine if e.get("auth") == "login"]
    assert logins == [{**logins[0], "refused": True, "status": 401}] and logins[0]["body"]["Password"] == "***"
    assert not any("/Systems/" in e["path"] for e in mine)  # nothing was asked of the system
    assert emulator.system("rf06")["PowerState"] == "On"


@pytest_twisted.ensureDeferred
async def test_basic_auth_for_bmcs_without_sessions(tmp_path: Path, emulator: RedfishEmulator) -> None:
    power = controller(tmp_path, emulator, auth="basic")
    start = len(emulator.journal())
    try:
        assert await power.status("rf07") == "on"
    finally:
        await threads.deferToThread(power.stop)
    assert {e["auth"] for e in emulator.journal()[start:]} <= {"basic", "none"}


# -- configuration ----------------------------------------------------------------------------------------------

def test_per_group_bmc_settings_override_the_top_level_and_every_problem_is_reported() -> None:
    base = {"bmc": {"address": "127.0.0.1:{index+9000}", "credentials": "/etc/cid/ipmi.cred", "max_concurrent": 4},
            "groups": {"new": {"bmc": {"type": "redfish", "address": "https://{name}-bmc",
                                       "credentials": "/etc/cid/redfish.cred", "ca_bundle": "/etc/cid/bmc-ca.pem"},
                               "ladder": [{"method": "redfish_boot_installer", "timeout": 300},
                                          {"method": "power_cycle", "timeout": 600}]},
                       "old": {"ladder": [{"method": "power_cycle", "timeout": 600}]}}}
    config = parse_config(base, "c.yaml")
    new, old = config.bmc.for_group("new"), config.bmc.for_group("old")
    assert (new.type, new.address, str(new.credentials), new.max_concurrent) == (
        "redfish", "https://{name}-bmc", "/etc/cid/redfish.cred", 4)
    assert (old.type, old.address) == ("ipmi", "127.0.0.1:{index+9000}") and old is config.bmc
    only_groups = parse_config({"groups": {"new": base["groups"]["new"]}}, "c.yaml")
    assert only_groups.bmc.for_group("default") is None and only_groups.bmc.for_group("new").type == "redfish"
    bad = {"bmc": {"address": "https://x", "credentials": "/c"},
           "groups": {"a": {"bmc": {"type": "serial", "max_concurrent": 2, "verify": "no"}},
                      "b": {"bmc": {"type": "redfish", "verify": False, "ca_bundle": "/ca.pem", "auth": "digest"}},
                      "c": {"bmc": {"type": "ipmi", "address": "10.0.0.{index}", "off_timeout": 5},
                            "ladder": [{"method": "redfish_boot_installer", "timeout": 60}]},
                      "d": {"ladder": [{"method": "power_cycle", "timeout": 60}]}}}
    with pytest.raises(ConfigError) as err:
        parse_config(bad, "c.yaml")
    text = str(err.value)
    for words in ("bmc: 'address' 'https://x' is a URL, but IPMI BMCs are reached at HOST or HOST:PORT",
                  "groups.a.bmc: 'type' must be one of ipmi, redfish (got 'serial')",
                  "groups.a.bmc: 'max_concurrent' bounds the one BMC scheduler of cidd",
                  "groups.a.bmc: 'verify' must be true or false (got 'no')",
                  "groups.b.bmc: 'auth' must be one of session, basic (got 'digest')",
                  "groups.b.bmc: 'ca_bundle' and 'verify: false' contradict each other",
                  "groups.c.bmc: 'off_timeout' applies to Redfish BMCs only",
                  "groups.c: method redfish_boot_installer needs a Redfish BMC"):
        assert words in text, (words, text)
    with pytest.raises(ConfigError, match="group\\(s\\) d use power_cycle, which needs a 'bmc' section"):
        parse_config({"groups": {"d": bad["groups"]["d"]}}, "c.yaml")
    with pytest.raises(ConfigError, match="groups.r.bmc: 'credentials' .* is required here or in the top-level"):
        parse_config({"groups": {"r": {"bmc": {"type": "redfish"}}}}, "c.yaml")
