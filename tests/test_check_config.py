"""``cidd check-config``: configuration, catalog and image files checked without starting anything; and the
daemon's own handling of a missing catalog and of entries whose file is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.procs import free_port

ROOT = Path(__file__).resolve().parent.parent


def cidd(*args: str, state: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CID_STATE_DIR": str(state), **extra_env}
    return subprocess.run([sys.executable, "-m", "cidd.main", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def write(tmp_path: Path, images: list[dict], sizes: dict[str, int]) -> Path:
    """Write cidd.yaml and a catalog of ``images``; create files of ``sizes`` in the image directory."""
    (tmp_path / "images").mkdir(exist_ok=True)
    for name, size in sizes.items():
        (tmp_path / "images" / name).write_bytes(b"x" * size)
    (tmp_path / "images.yaml").write_text(yaml.safe_dump({"images": images}))
    config = tmp_path / "cidd.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "catalog": str(tmp_path / "images.yaml"),
                                      "image_dir": str(tmp_path / "images"), "nodes": [{"hosts": "n[1-4]"}],
                                      "listen": {"port": free_port()}, "http": {"port": free_port()}}))
    return config


def entry(name: str, size: int | None = None) -> dict:
    data = {"name": name, "version": "1", "subversion": "1", "file": f"{name}-1-1.tar.zst"}
    if size is not None:
        data["size"] = size
    return data


def test_a_good_configuration_exits_0_with_a_summary_and_opens_nothing(tmp_path: Path) -> None:
    config = write(tmp_path, [entry("alma", 3)], {"alma-1-1.tar.zst": 3})
    result = cidd("check-config", "--config", str(config), state=tmp_path / "state")
    assert result.returncode == 0, result.stderr
    assert "configuration OK: 4 nodes in 1 group(s), 1 image(s)" in result.stdout
    assert not (tmp_path / "state" / "cidd.sqlite").exists()


def test_every_problem_is_listed_and_exits_2(tmp_path: Path) -> None:
    config = write(tmp_path, [entry("alma", 3), entry("rocky", 10), entry("debian")], {"alma-1-1.tar.zst": 5})
    result = cidd("check-config", "--config", str(config), state=tmp_path / "state")
    assert result.returncode == 2
    assert "image alma-1-1: " in result.stderr and "holds 5 bytes, the entry says 3" in result.stderr
    assert "image rocky-1-1: its file" in result.stderr and "does not exist" in result.stderr
    assert "image debian-1-1: its file" in result.stderr
    assert "3 problem(s)" in result.stderr


def test_a_bad_configuration_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "cidd.yaml"
    config.write_text("listne: {port: 1}\n")
    result = cidd("check-config", "--config", str(config), state=tmp_path / "state")
    assert result.returncode == 2 and "unknown key 'listne'" in result.stderr


def test_without_config_it_checks_the_file_clients_read_from_cid_config(tmp_path: Path) -> None:
    config = write(tmp_path, [entry("alma", 3)], {"alma-1-1.tar.zst": 3})
    result = cidd("check-config", state=tmp_path / "state", CID_CONFIG=str(config))
    assert result.returncode == 0, result.stderr
    assert f"checked {config} (from $CID_CONFIG)" in result.stdout
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "client": {"server": "head:http", "role": "root"}}))
    result = cidd("check-config", state=tmp_path / "state", CID_CONFIG=str(config))
    assert result.returncode == 2  # the clients' section is checked as the clients read it
    assert f"{config}: client: bad port in client.server address 'head:http'" in result.stderr
    assert f"{config}: client: 'role' must be one of admin, scheduler, reader" in result.stderr
    result = cidd("check-config", state=tmp_path / "state", CID_CONFIG=str(tmp_path / "nothing.yaml"))
    assert result.returncode == 2 and "$CID_CONFIG names" in result.stderr


def test_cidd_starts_with_a_configured_catalog_that_does_not_exist_yet(tmp_path: Path) -> None:
    config = write(tmp_path, [], {})
    (tmp_path / "images.yaml").unlink()
    proc = subprocess.Popen([sys.executable, "-m", "cidd.main", "--config", str(config)], stderr=subprocess.PIPE,
                            text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    try:
        line = ""
        for line in proc.stderr:  # type: ignore[union-attr]
            if "catalog.missing" in line or "cidd.listening" in line:
                break
        assert "catalog.missing" in line, line
        assert proc.poll() is None, "cidd stopped instead of starting with an empty catalog"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_an_entry_whose_file_is_missing_is_never_offered(tmp_path: Path) -> None:
    from cidd.config import load_config
    from cidd.engine import read_catalog

    config = load_config(str(write(tmp_path, [entry("alma", 3), entry("rocky")], {"alma-1-1.tar.zst": 3})))
    catalog = read_catalog(config)
    assert list(catalog) == ["alma-1-1"]
    assert "rocky-1-1" in catalog.unavailable and "does not exist" in catalog.unavailable["rocky-1-1"]
