"""One cluster, two BMC protocols: half the simulated fleet behind IPMI BMCs, half behind a Redfish service.

Real processes: cidd; a ``cid-simfleet`` fleet of 12 nodes whose IPMI BMCs (pyghmi's BMC server, one UDP port
each, as in tests/test_ladder_power.py) serve node01-06, and which listens for sushy-emulator's notifications
for node07-12; sushy-emulator (fake driver, HTTPS, sessions, cidsim.redfish_emulator) with one system per
Redfish node. Group ``ipmi``: agent reboot, then IPMI power cycle (node03's reboots hang). Group ``redfish``:
redfish_boot_installer first (a one-time UEFI HTTP boot through Redfish, no agent needed), then power_cycle.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.procs import Cluster, free_port, free_udp_block
from tests.redfishemu import PASSWORD, USER, RedfishEmulator, make_pki, write_credentials
from tests.test_ladder_power import bmc_trail

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, RedfishEmulator]]:
    root = tmp_path_factory.mktemp("mixed")
    pki = make_pki(root / "pki")
    hw_port = free_port()
    emulator = RedfishEmulator(root / "redfish", "node[07-12]", pki,
                               extra=["--power-delay", "1", "--notify", f"http://127.0.0.1:{hw_port}/"])
    ipmi_creds = root / "ipmi.cred"
    ipmi_creds.write_text("cidadmin:s3cret-bmc-pass\n")
    ipmi_creds.chmod(0o600)
    redfish_creds = write_credentials(root / "redfish.cred", USER, PASSWORD)
    efi = root / "ipxe.efi"
    efi.write_bytes(b"MZ stand-in for iPXE's ipxe.efi")
    base = free_udp_block(12)
    cluster = Cluster(root / "cid", extra_config={
        "bmc": {"address": f"127.0.0.1:{{index+{base - 1}}}", "credentials": str(ipmi_creds), "timeout": 6},
        "boot": {"uefi_binary": str(efi)},
    }, groups={
        "ipmi": {"ladder": [{"method": "reboot", "timeout": 3}, {"method": "power_cycle", "timeout": 20}],
                 "install_timeout": 30},
        "redfish": {"bmc": {"type": "redfish", "address": emulator.address(), "credentials": str(redfish_creds),
                            "ca_bundle": str(pki.ca), "timeout": 10, "off_timeout": 10},
                    "ladder": [{"method": "redfish_boot_installer", "timeout": 20},
                               {"method": "power_cycle", "timeout": 20}],
                    "install_timeout": 30},
    }, nodes=[{"hosts": "node[01-06]", "group": "ipmi"}, {"hosts": "node[07-12]", "group": "redfish"}])
    try:
        emulator.start()
        cluster.start_cidd()
        cluster.start_fleet("node[01-12]", "--reboot-delay", "0.3", "--install-time", "0.3", "--initial-image",
                            "debian-12-1", "--hang-reboot", "node03", "--bmc-base-port", str(base),
                            "--bmc-credentials", str(ipmi_creds), "--redfish-hw-port", str(hw_port),
                            "--redfish-nodes", "node[07-12]")
        cluster.wait_online(12)
        yield cluster, emulator
    finally:
        cluster.stop()
        emulator.stop()


def test_a_mixed_ipmi_and_redfish_fleet_ends_with_every_node_ready(mixed: tuple[Cluster, RedfishEmulator]) -> None:
    cluster, emulator = mixed
    status = cluster.cidcapt("--power", "status", "node[05-08]", timeout=60)
    assert status.returncode == 0, status.stderr + bmc_trail(cluster)
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
    assert all("ok" in rows[n] and " on" in rows[n] for n in ("node05", "node06", "node07", "node08")), status.stdout
    off = cluster.cidcapt("--power", "off", "node12", timeout=60)  # Redfish: graceful shutdown
    assert off.returncode == 0 and "graceful" in off.stdout, off.stdout + off.stderr
    emulator.wait_power("node12", "Off")
    end = time.monotonic() + 15
    while cluster.status("node12")["node12"]["online"]:
        assert time.monotonic() < end, "the emulator's power-off did not stop the simulated node"
        time.sleep(0.2)
    journal_start = len(emulator.journal())

    result = cluster.cidcapt("-j", "mixed1", "-n", "node[01-12]", "-i", "rocky-9-3", "--timeout", "150",
                             timeout=200)
    assert result.returncode == 0, result.stderr[-3000:] + "\n" + bmc_trail(cluster)
    status_rows = cluster.status("node[01-12]")
    assert {(r["state"], r["image"]) for r in status_rows.values()} == {("ready", "rocky-9-3")}, status_rows

    # cidd's side: which rung ended each node's steps, and through which BMC
    with sqlite3.connect(cluster.db) as db:
        rows = db.execute("SELECT node, from_state, to_state, rung, detail FROM events WHERE job = 'mixed1' "
                          "ORDER BY id").fetchall()
    redfish_nodes = [f"node{n:02d}" for n in range(7, 13)]
    for node in redfish_nodes:
        entered = [r for r in rows if r[0] == node and r[2] in ("to_installer", "to_image")]
        assert entered and all("redfish_boot_installer" in r[4] for r in entered), (node, entered)
    assert any(r[0] == "node03" and "power_cycle" in r[4] for r in rows), "node03's hung reboot was power-cycled"
    events = cluster.log_events()
    set_by_redfish = {(e["node"], e["boot"]): e["override"] for e in events
                      if e.get("event") == "node.redfish_boot_set"}
    http_base = f"http://127.0.0.1:{cluster.http_port}"
    for node in redfish_nodes:
        assert set_by_redfish[(node, "installer")] == f"UefiHttp {http_base}/boot/uefi/{node}/ipxe.efi"
        assert set_by_redfish[(node, "disk")] == "Hdd"
    cycled = {e["node"] for e in events if e.get("event") == "node.power_cycle"}
    assert "node03" in cycled and not cycled & set(redfish_nodes)
    served = {e["node"] for e in events if e.get("event") == "boot.uefi_binary"}
    assert served >= set(redfish_nodes), "the emulator fetched each node's HttpBootUri from cidd"

    # the emulator's side: one-time overrides, then resets, each in a session that was logged out
    journal = emulator.journal()[journal_start:]
    for node in redfish_nodes:
        mine = [e for e in journal if f"/Systems/{node}" in e["path"] and e["method"] in ("PATCH", "POST")]
        sent = [(e["body"]["Boot"]["BootSourceOverrideTarget"], e["body"]["Boot"]["BootSourceOverrideEnabled"])
                if e["method"] == "PATCH" else e["body"]["ResetType"] for e in mine if e["status"] in (200, 204)]
        expected_reset = "On" if node == "node12" else "ForceRestart"  # node12 was off: the reset powers it on
        assert sent[:4] == [("UefiHttp", "Once"), expected_reset, ("Hdd", "Once"), "ForceRestart"], (node, sent)
        assert emulator.system(node)["PowerState"] == "On"
    opened = {e["session"] for e in journal if e.get("auth") == "login" and e.get("status") == 201}
    closed = {e["session"] for e in journal if e.get("logout")}
    assert opened and opened == closed
    log_text = (cluster.root / "cidd.log").read_text()
    assert PASSWORD not in log_text and "s3cret-bmc-pass" not in log_text


def test_cidd_serves_the_uefi_http_boot_files(mixed: tuple[Cluster, RedfishEmulator]) -> None:
    cluster, _ = mixed
    base = f"http://127.0.0.1:{cluster.http_port}/boot/uefi"

    def get(path: str) -> bytes:
        with urllib.request.urlopen(f"{base}/{path}", timeout=10) as response:
            return response.read()

    binary = (cluster.root.parent / "ipxe.efi").read_bytes()
    assert get("ipxe.efi") == binary and get("node07/ipxe.efi") == binary
    assert get("autoexec.ipxe").decode() == (f"#!ipxe\nchain http://127.0.0.1:{cluster.http_port}"
                                             "/boot/${net0/mac:hexhyp}\n")
    own = get("node07/autoexec.ipxe").decode()
    assert own.startswith("#!ipxe\n") and "node07" in own and "cid.token" not in own  # node07 boots its disk now
    assert "sanboot" in get("nobody/autoexec.ipxe").decode()  # a name cidd does not know boots its disk
    with pytest.raises(urllib.error.HTTPError):
        get("node07/other.efi")
