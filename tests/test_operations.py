"""Operations with a real cidd and simulated fleets (docs/operations.md): the status page in a real headless
browser (Debian's chromium driven by Selenium through chromium-driver), ``/metrics`` names and labels as
documented, the Grafana dashboard's and the alert rules' queries against what cidd really exposes, ``promtool``
on the rules, and ``cidcapt --stats`` and ``/stats`` after a real switch.

One cidd serves the whole module: twelve nodes in two groups switch once to rocky-9-3, n09-n12 slower, n11's
installs fail and n12's reboots never come back (the ladder climbs, then gives up).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import REPO, Cluster

pytestmark = pytest.mark.slow

NODES = "n[01-12]"
JOB = "101"
IMAGE = "rocky-9-3"
SWITCHING = {"to_installer", "installing", "to_image"}
DOCS = REPO / "docs" / "operations.md"
DASHBOARD = REPO / "rc" / "grafana" / "cid-dashboard.json"
RULES = REPO / "rc" / "prometheus" / "cid-alerts.yml"
RULE_TESTS = REPO / "rc" / "prometheus" / "cid-alerts.test.yml"
#: Set CID_UPDATE_SCREENSHOT=1 to refresh the screenshot the README and docs/operations.md show.
SCREENSHOT = REPO / "docs" / "status-page.png"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("ops")
    ladder = [{"method": "reboot", "timeout": 4}, {"method": "reboot", "timeout": 4}]
    c = Cluster(root, heartbeat=1.0, groups={"default": {"ladder": ladder, "install_timeout": 60},
                                             "gpu": {"ladder": ladder, "install_timeout": 60}},
                nodes=[{"hosts": "n[01-06]", "group": "default"}, {"hosts": "n[07-12]", "group": "gpu"}])
    c.start_cidd()
    try:
        c.start_fleet("n[01-08]", "--reboot-delay", "1.5", "--install-time", "3", "--initial-image", "debian-12-1")
        c.start_fleet("n[09-12]", "--reboot-delay", "1.5", "--install-time", "8", "--initial-image", "debian-12-1",
                      "--fail-install", "n11", "--hang-reboot", "n12")
        c.wait_online(12)
        yield c
    finally:
        c.stop()


def capture_done(cluster: Cluster) -> bool:
    """Return whether job 101's capture has ended."""
    result = cluster.cidcapt("--captures", "--json")
    assert result.returncode == 0, result.stderr
    return any(row["job"] == JOB and row["state"] != "running" for row in json.loads(result.stdout))


def ensure_switched(cluster: Cluster) -> None:
    """Run job 101's capture to its end, unless a test already did."""
    if not capture_done(cluster):
        cluster.cidcapt("-j", JOB, "-n", NODES, "-i", IMAGE, "--timeout", "120", timeout=150)
    assert capture_done(cluster)


def http(cluster: Cluster, path: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.http_port}{path}", timeout=10) as response:
        return response.status, dict(response.headers), response.read()


# --- the status page in a real browser --------------------------------------------------------------------------

def chromium_driver() -> Any:
    """Return a headless Selenium driver of Debian's chromium (skips when chromium or its driver is missing)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (setup.cfg test extra) is missing")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    if browser is None or not os.path.exists(driver):
        pytest.skip("Debian's chromium and chromium-driver are needed (Makefile TEST_DEBS)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    """Return the first true result of ``check()``, polling; fail naming ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


def when(value: Any, test: Any) -> Any:
    """Return ``value`` when ``test(value)`` holds, else None (for wait_for)."""
    return value if test(value) else None


def cells(driver: Any) -> dict[str, str]:
    """Return {node: state} as the page's grid shows it."""
    return driver.execute_script(
        "const out = {}; document.querySelectorAll('#grid .node').forEach(c => out[c.dataset.node] = "
        "c.dataset.state); return out;")


def test_the_status_page_shows_a_fleet_mid_switch_and_updates_without_a_reload(cluster: Cluster,
                                                                               tmp_path: Path) -> None:
    status, headers, body = http(cluster, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"/ui/status.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert b"token" not in body.lower()
    driver = chromium_driver()
    capture = None
    try:
        driver.get(f"http://127.0.0.1:{cluster.http_port}/?interval=0.5&stats_interval=1")
        wait_for("the grid of 12 nodes", lambda: len(cells(driver)) == 12, 30)
        assert set(cells(driver).values()) == {"ready"}
        driver.execute_script("window.cidMarker = 'same page';")
        updates = int(driver.execute_script("return document.body.dataset.updates"))
        capture = cluster.cidcapt_background("-j", JOB, "-n", NODES, "-i", IMAGE, "--timeout", "120")
        # mid-switch: nodes in switching states, shown with their target image
        mid = wait_for("nodes switching", lambda: when(cells(driver), lambda s: SWITCHING & set(s.values())))
        chip = driver.execute_script("return [...document.querySelectorAll('#counts .chip')].map(c => c.textContent)")
        assert any(text.split()[0] in SWITCHING for text in chip), chip
        assert "\u2192 rocky-9-3" in driver.execute_script(
            "return [...document.querySelectorAll('#grid .node')].find(c => c.dataset.state !== 'ready')"
            ".querySelector('span').textContent")
        wait_for("the capture in the captures table", lambda: driver.execute_script(
            f"return !!document.querySelector('#captures tr[data-job=\"{JOB}\"]')"))
        # a failure while the others still switch makes the picture the docs show
        wait_for("a failure with nodes still switching", lambda: when(
            cells(driver), lambda s: "failed" in s.values() and SWITCHING & set(s.values())), 40)
        time.sleep(0.6)  # one more redraw, so that the failures table is filled too
        driver.save_screenshot(str(tmp_path / "mid-switch.png"))
        if os.environ.get("CID_UPDATE_SCREENSHOT"):
            shutil.copyfile(tmp_path / "mid-switch.png", SCREENSHOT)
        # the end, with no reload of the page
        final = wait_for("every node ready or failed", lambda: when(cells(driver), lambda s: set(s.values()) <= {
            "ready", "failed"} and "failed" in s.values() and len(s) == 12), 60)
        assert final == {**{f"n{i:02d}": "ready" for i in range(1, 13)}, "n11": "failed", "n12": "failed"}
        assert driver.execute_script("return window.cidMarker") == "same page"
        assert int(driver.execute_script("return document.body.dataset.updates")) > updates + 5
        assert mid != final
        failures = wait_for("both failures listed", lambda: when(driver.execute_script(
            "return [...document.querySelectorAll('#failures tbody tr')].map(r => [r.dataset.node, "
            "r.children[4].textContent])"), lambda rows: {r[0] for r in rows} >= {"n11", "n12"}), 20)
        kinds = dict(failures)
        assert kinds["n11"] == "install_failed" and kinds["n12"] == "ladder_exhausted"
        worst = wait_for("the statistics' worst nodes", lambda: driver.execute_script(
            "return [...document.querySelectorAll('#worst tbody tr')].map(r => r.dataset.node)") or None, 20)
        assert set(worst) >= {"n11", "n12"}
        assert wait_for("the phase table", lambda: driver.execute_script(
            f"return !!document.querySelector('#images tr[data-image=\"{IMAGE}\"]')"), 20)
        wait_for("no capture left", lambda: driver.execute_script(
            "return !document.querySelector('#captures tbody tr')"), 20)
        driver.save_screenshot(str(tmp_path / "after.png"))
        console = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert console == [], console
    finally:
        driver.quit()
        if capture is not None:
            capture.wait(timeout=120)
    assert (tmp_path / "mid-switch.png").stat().st_size > 10_000
    assert SCREENSHOT.exists(), "docs/status-page.png: run with CID_UPDATE_SCREENSHOT=1 once"


# --- /metrics as documented ------------------------------------------------------------------------------------

def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """Return {name: (type, label names)} from the metrics table of docs/operations.md."""
    found = {}
    for line in DOCS.read_text().splitlines():
        match = re.match(r"^\| `(cid_[a-z_]+)` \| (gauge|counter|histogram) \| ([^|]*) \|", line)
        if match:
            labels = set(re.findall(r"`([a-z_]+)`", match.group(3)))
            found[match.group(1)] = (match.group(2), labels)
    assert len(found) > 15, "the metrics table of docs/operations.md was not found"
    return found


def exposed(text: str) -> dict[str, tuple[str, list[set[str]]]]:
    """Return {PromQL name: (type, label sets of its samples)} of an exposition (counters as name_total)."""
    out: dict[str, tuple[str, list[set[str]]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created") and family.type in ("gauge", "unknown"):
            continue  # prometheus_client's creation times of counters and histograms, not metrics of their own
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = (family.type, [set(s.labels) for s in family.samples if not s.name.endswith("_created")])
    return out


def promql_names(expr: str) -> set[str]:
    """Return the metric names a PromQL expression reads."""
    text = re.sub(r"label_values\(([^,]*),\s*[a-zA-Z_]+\)", r"\1", expr)  # Grafana's: (metric, label)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text))
    keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan", "le"}
    return {n for n in names if n not in keywords and not n.startswith("$") and not n.startswith("__")}


def promql_matchers(expr: str) -> list[tuple[str, set[str]]]:
    """Return (metric, label names) of each ``metric{...}`` selector in ``expr``."""
    return [(name, set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body)))
            for name, body in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr)]


def base_name(name: str, names: dict[str, Any]) -> str | None:
    """Return the exposed metric a PromQL name belongs to (a histogram's _bucket/_sum/_count too), or None."""
    if name in names:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in names and names[name[: -len(suffix)]][0] == "histogram":
            return name[: -len(suffix)]
    return None


@pytest.fixture(scope="module")
def scraped(cluster: Cluster) -> dict[str, tuple[str, list[set[str]]]]:
    ensure_switched(cluster)
    status, headers, body = http(cluster, "/metrics")
    assert status == 200
    return exposed(body.decode())


def test_metric_names_and_labels_are_as_documented(scraped: dict[str, tuple[str, list[set[str]]]]) -> None:
    documented = documented_metrics()
    ours = {name for name in scraped if name.startswith("cid_")}
    assert ours == set(documented), f"exposed but not documented: {ours - set(documented)}; " \
                                    f"documented but not exposed: {set(documented) - ours}"
    for name, (kind, labels) in documented.items():
        exposed_kind, samples = scraped[name]
        assert exposed_kind == kind, name
        extra = {"le"} if kind == "histogram" else set()
        for sample in samples:
            assert sample - extra == labels, f"{name}: labels {sorted(sample)}, documented {sorted(labels)}"
        assert "node" not in labels, f"{name}: a node label would make one series per node"
    # the switch left its mark in the metrics it should have
    for name in ("cid_phase_duration_seconds", "cid_capture_duration_seconds", "cid_transitions_total",
                 "cid_failures_total", "cid_ladder_rungs_total", "cid_ladder_climbs_total", "cid_installs_total",
                 "cid_captures_total", "cid_nodes_image", "cid_agent_sessions", "cid_heartbeat_age_seconds",
                 "cid_failure_streak_nodes"):
        assert scraped[name][1], f"{name} has no sample after the switch"


def test_the_dashboard_and_the_alert_rules_read_metrics_cidd_exposes(
        scraped: dict[str, tuple[str, list[set[str]]]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [variable["definition"] for variable in dashboard["templating"]["list"]]
    rules = [rule["expr"] for group in __import__("yaml").safe_load(RULES.read_text())["groups"]
             for rule in group["rules"]]
    assert len(exprs) > 20 and len(rules) >= 5
    prometheus_own = {"up"}  # written by Prometheus for each target, not by cidd
    used = set()
    for expr in exprs + rules:
        for name in promql_names(expr) - prometheus_own:
            metric = base_name(name, scraped)
            assert metric is not None, f"{name} (in {expr!r}) is not a metric cidd exposes"
            used.add(metric)
        for name, labels in promql_matchers(expr):
            metric = base_name(name, scraped)
            if metric is None:
                continue
            known = set().union(*scraped[metric][1]) if scraped[metric][1] else documented_metrics()[metric][1]
            known |= {"instance", "job"}  # added by Prometheus
            assert labels <= known, f"{expr!r}: {name} has no label {labels - known}"
    assert {"cid_phase_duration_seconds", "cid_failures_total", "cid_ladder_rungs_total", "cid_nodes",
            "cid_captures_total", "cid_failure_streak_nodes"} <= used


def test_promtool_checks_and_tests_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package, Makefile TEST_DEBS) is missing")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    tested = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], capture_output=True, text=True,
                            timeout=60, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


# --- statistics after a real switch ------------------------------------------------------------------------------

def test_cidcapt_stats_and_http_stats_after_a_real_switch(cluster: Cluster) -> None:
    ensure_switched(cluster)
    result = cluster.cidcapt("--stats", "--json", role="reader")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    nodes = {row["node"]: row for row in report["nodes"]}
    assert set(nodes) == {f"n{i:02d}" for i in range(1, 13)} and report["source"] == "totals"
    assert nodes["n11"]["failures"] == {"install_failed": 1} and nodes["n12"]["failures"] == {"ladder_exhausted": 1}
    assert nodes["n12"]["climbs"] == 1 and nodes["n01"]["success_rate"] == 1.0
    installing = nodes["n01"]["phases"]["installing"]
    assert installing["count"] == 1 and 2.5 < installing["median"] < 6
    groups = {row["group"]: row for row in report["groups"]}
    assert groups["default"]["switches"] == 6 and groups["gpu"]["failed"] == 2
    table = cluster.cidcapt("--stats", "n[09-12]", "--worst", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("statistics: 4 switches, 50.0% ok, 2 failed")
    assert [line.split()[0] for line in lines[4:6]] == ["n11", "n12"] or [line.split()[0] for line in lines[4:6]] \
        == ["n12", "n11"]
    status, headers, body = http(cluster, f"/stats?nodes=n01&image={IMAGE}")
    one = json.loads(body)
    assert status == 200 and [n["node"] for n in one["nodes"]] == ["n01"] and one["total"]["switches"] == 1
    with pytest.raises(urllib.error.HTTPError) as err:
        http(cluster, "/stats?worst=0")
    assert err.value.code == 400 and "worst" in json.loads(err.value.read())["error"]
    status, _, body = http(cluster, "/status")
    view = json.loads(body)
    assert {f["node"] for f in view["failures"]} >= {"n11", "n12"} and view["time"] > 0
