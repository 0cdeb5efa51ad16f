"""Tests for cidcatalog.catalog: parsing, problems with their lines, the Catalog object and text editing."""

from __future__ import annotations

from pathlib import Path

import pytest

from cidcatalog.catalog import (
    RELOAD_HINT,
    BootHints,
    Catalog,
    CatalogError,
    CatalogProblem,
    Image,
    load_catalog,
    parse_catalog,
    render_entry,
    upsert_entry_text,
)

ROOT = Path(__file__).resolve().parents[1]

SHA = "0123456789abcdef" * 4
BAD_SHA = "sha256 must be 64 lowercase hex characters"
KNOWN = "name, version, subversion, file, size, sha256, os, boot, owner, visibility, description"
BASE = [  # lines 2-5 of every text built by cat()
    "  - name: debian",
    '    version: "12"',
    '    subversion: "1"',
    "    file: debian-12-1.tar.zst",
]


def cat(*lines: str) -> str:
    """Return a catalog text: line 1 is ``images:``, then the given lines."""
    return "images:\n" + "".join(line + "\n" for line in lines)


def problems_of(text: str) -> tuple[CatalogProblem, ...]:
    with pytest.raises(CatalogError) as info:
        parse_catalog(text)
    return info.value.problems


def only_problem(text: str) -> CatalogProblem:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


def debian(subversion: str = "1", **kwargs) -> Image:
    return Image("debian", "12", subversion, f"debian-12-{subversion}.tar.zst", **kwargs)


# --- valid catalogs ---------------------------------------------------------------------------------------


def test_parse_every_field():
    text = cat(
        *BASE,
        "    size: 123456",
        f'    sha256: "{SHA}"',
        "    os: linux",
        "    boot:",
        "      kernel: /boot/vmlinuz",
        "      initrd: /boot/initrd.img",
        '      cmdline: "console=ttyS0"',
        "    owner: alice",
        "    visibility: private",
        '    description: "Debian 12, first build"',
    )
    catalog = parse_catalog(text)
    image = catalog.get("debian-12-1")
    assert image == Image(
        name="debian", version="12", subversion="1", file="debian-12-1.tar.zst", size=123456, sha256=SHA,
        os="linux", boot=BootHints("/boot/vmlinuz", "/boot/initrd.img", "console=ttyS0"), owner="alice",
        visibility="private", description="Debian 12, first build",
    )
    assert image.id == "debian-12-1"
    assert image.to_dict() == {
        "id": "debian-12-1", "name": "debian", "version": "12", "subversion": "1",
        "file": "debian-12-1.tar.zst", "size": 123456, "sha256": SHA, "os": "linux",
        "boot": {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img", "cmdline": "console=ttyS0"},
        "owner": "alice", "visibility": "private", "description": "Debian 12, first build",
    }


def test_defaults_and_null_optional_fields():
    catalog = parse_catalog(cat(*BASE, "    size:", "    boot:", "    description:"))
    image = catalog.get("debian-12-1")
    assert image == debian()
    assert (image.size, image.sha256, image.os, image.owner, image.visibility) == (
        None, None, "linux", "root", "shared")
    assert image.boot == BootHints(kernel=None, initrd=None, cmdline="")
    assert image.description == ""


def test_numbers_are_taken_as_written():
    text = cat("  - name: centos", "    version: 7.10", "    subversion: 01", "    file: c.gz")
    image = parse_catalog(text).get("centos-7.10-01")
    assert (image.version, image.subversion, image.file) == ("7.10", "01", "c.gz")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "images: []\n", "images:\n", "images: ~\n"])
def test_empty_catalogs_are_valid(text):
    catalog = parse_catalog(text)
    assert len(catalog) == 0
    assert list(catalog) == []


# --- problems, one at a time, with their exact line ---------------------------------------------------------

ENTRY_PROBLEMS = [
    ([BASE[0].replace("debian", "deb-ian"), *BASE[1:]], 2,
     "image 'deb-ian-12-1': name must match [a-z0-9][a-z0-9_.]* (lowercase, no '-'), got 'deb-ian'"),
    ([BASE[0].replace("debian", "Debian"), *BASE[1:]], 2,
     "image 'Debian-12-1': name must match [a-z0-9][a-z0-9_.]* (lowercase, no '-'), got 'Debian'"),
    ([BASE[0], '    version: "1-2"', *BASE[2:]], 3,
     "image 'debian-1-2-1': version must match [A-Za-z0-9_.]+ (no '-'), got '1-2'"),
    ([*BASE[:2], '    subversion: ""', BASE[3]], 4,
     "image 'debian-12-': subversion must match [A-Za-z0-9_.]+ (no '-'), got ''"),
    ([*BASE[:3], "    file: debian.tar.xz"], 5,
     "image 'debian-12-1': file must end with .tar.zst, .tar.gz, .gz, got 'debian.tar.xz'"),
    ([*BASE, "    size: -1"], 6, "image 'debian-12-1': size must be an integer >= 0 (bytes), got -1"),
    ([*BASE, '    size: "12"'], 6, "image 'debian-12-1': size must be an integer >= 0 (bytes), got '12'"),
    ([*BASE, "    size: true"], 6, "image 'debian-12-1': size must be an integer >= 0 (bytes), got 'true'"),
    ([*BASE, f"    sha256: {SHA.upper()}"], 6, f"image 'debian-12-1': {BAD_SHA}"),
    ([*BASE, f"    sha256: {SHA[:-1]}"], 6, f"image 'debian-12-1': {BAD_SHA}"),
    ([*BASE, "    visibility: public"], 6,
     "image 'debian-12-1': visibility must be one of shared, private, got 'public'"),
    ([*BASE, '    owner: "two words"'], 6,
     "image 'debian-12-1': owner must be a user name (one word), got 'two words'"),
    ([*BASE, '    owner: ""'], 6, "image 'debian-12-1': owner must be a user name (one word), got ''"),
    ([*BASE, "    [a]: 1"], 6, f"image 'debian-12-1': unknown key '<a list>' (known: {KNOWN})"),
    ([*BASE, "    sha: abc"], 6, f"image 'debian-12-1': unknown key 'sha' (known: {KNOWN})"),
    ([*BASE, "    boot:", "      kernel: vmlinuz"], 7,
     "image 'debian-12-1': boot.kernel must be an absolute path inside the image, got 'vmlinuz'"),
    ([*BASE, "    boot:", "      kernal: /boot/vmlinuz"], 7,
     "image 'debian-12-1': unknown key 'kernal' (known: kernel, initrd, cmdline)"),
    ([*BASE, "    boot: /boot/vmlinuz"], 6,
     "image 'debian-12-1': boot must be a mapping of kernel, initrd, cmdline"),
    ([BASE[0], "    version: [12]", *BASE[2:]], 3, "image #1: version must be a string, got a list"),
    ([BASE[0], "    version: yes", *BASE[2:]], 3, "image #1: version must be a string, got yes (quote it)"),
    ([*BASE[:3], "    file:"], 5, "image 'debian-12-1': file has no value"),
    (BASE[:3], 2, "image 'debian-12-1': missing required key 'file'"),
    ([*BASE, "    name: ubuntu"], 6, "image 'debian-12-1': duplicate key 'name' (first on line 2)"),
    (["  - debian-12-1"], 2, "image #1: must be a mapping of keys"),
]


@pytest.mark.parametrize(("lines", "line", "message"), ENTRY_PROBLEMS)
def test_entry_problem_with_line(lines, line, message):
    problem = only_problem(cat(*lines))
    assert (problem.path, problem.line, problem.message) == ("images.yaml", line, message)
    assert str(problem) == f"images.yaml:{line}: {message}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", [(1, "the top level must be a mapping with 'images'")]),
        ("images: debian\n", [(1, "'images' must be a list of image entries")]),
        ("images: []\nextra: 1\n", [(2, "top level: unknown key 'extra' (known: images)")]),
        ("# header\nimgs: []\n", [(2, "top level: unknown key 'imgs' (known: images)"),
                                  (2, "missing top-level key 'images'")]),
    ],
)
def test_top_level_problems(text, expected):
    assert [(p.line, p.message) for p in problems_of(text)] == expected


@pytest.mark.parametrize(
    "file", ["../etc/x.tar.zst", "a/../../x.gz", "images/..", "/srv/x.tar.zst", "..\\x.gz", "a/..\\..\\x.gz"]
)
def test_path_traversal_in_file_is_refused(file):
    problem = only_problem(cat(*BASE[:3], f"    file: '{file}'"))
    assert problem.line == 5
    assert "file must" in problem.message and repr(file) in problem.message


@pytest.mark.parametrize("file", ["sub/dir/debian.tar.zst", "x..y.tar.gz", "debian-12-1.gz", "./a.tar.zst"])
def test_relative_files_are_accepted(file):
    assert parse_catalog(cat(*BASE[:3], f"    file: {file}")).get("debian-12-1").file == file


def test_several_problems_are_reported_together():
    text = cat(
        *BASE[:3],
        "    file: /etc/passwd.gz",  # 5
        "    sha: abc",  # 6
        "  - name: rocky",  # 7
        '    version: "9"',
        '    subversion: "3"',
        "    file: rocky-9-3.tar.zst",
        "    size: big",  # 11
        "  - name: alma",  # 12
        '    version: "9"',
    )
    with pytest.raises(CatalogError) as info:
        parse_catalog(text, path="/etc/cid/images.yaml")
    problems = info.value.problems
    assert isinstance(problems, tuple)
    assert [(p.line, p.message.split(":")[0]) for p in problems] == [
        (5, "image 'debian-12-1'"),
        (6, "image 'debian-12-1'"),
        (11, "image 'rocky-9-3'"),
        (12, "image #3"),
        (12, "image #3"),
    ]
    assert problems[3].message == "image #3: missing required key 'subversion'"
    assert problems[4].message == "image #3: missing required key 'file'"
    lines = str(info.value).splitlines()
    assert lines == [str(p) for p in problems] + [RELOAD_HINT]
    assert lines[2] == (
        "/etc/cid/images.yaml:11: image 'rocky-9-3': size must be an integer >= 0 (bytes), got 'big'")
    assert lines[-1] == "fix these and reload; the previous catalog stays active"


def test_yaml_syntax_error_has_its_line():
    problem = only_problem(cat(*BASE[:3], "    file: a: b.tar.zst", "    size: 1"))
    assert problem.line == 5
    assert problem.message.startswith("YAML syntax error: mapping values are not allowed")


def test_yaml_syntax_error_unclosed_flow():
    problem = only_problem("images: [\n  {name: a\n")
    assert problem.line == 3 and problem.message.startswith("YAML syntax error:")


def test_control_character_has_its_line():
    problem = only_problem(cat(*BASE[:3], "    file: a\x07.gz"))
    assert problem.line == 5 and problem.message.startswith("YAML error: unacceptable character #x0007")


def test_duplicate_ids_name_both_lines():
    text = cat(*BASE, "  - name: debian", "    version: 12", "    subversion: 1", "    file: other.tar.zst")
    problem = only_problem(text)
    assert problem.line == 6
    assert problem.message == "image 'debian-12-1': duplicate id (first defined on line 2)"


def test_error_is_raised_even_when_only_duplicates_are_bad():
    text = cat(*BASE, *BASE, *BASE)
    assert [p.line for p in problems_of(text)] == [6, 10]


def test_unsafe_tags_are_refused_not_constructed():
    problem = only_problem(cat(*BASE[:3], "    file: !!python/object/apply:os.system [echo]"))
    assert problem.line == 5 and "file must be a string" in problem.message


# --- Image and Catalog objects -----------------------------------------------------------------------------


def test_image_validates_its_fields():
    with pytest.raises(ValueError, match="sha256 must be 64 lowercase hex"):
        debian(sha256="xyz")
    with pytest.raises(ValueError, match="file must be a path relative"):
        Image("debian", "12", "1", "../debian.tar.zst")
    with pytest.raises(ValueError, match="name must match"):
        Image("deb-ian", "12", "1", "d.tar.zst")


def test_catalog_mapping_is_immutable_and_sorted():
    catalog = Catalog({i.id: i for i in (debian("2"), Image("alma", "9", "1", "a.gz"), debian("1"))})
    assert list(catalog) == ["alma-9-1", "debian-12-1", "debian-12-2"]
    assert len(catalog) == 3 and "debian-12-2" in catalog and "debian-12-3" not in catalog
    assert catalog.get("debian-12-3") is None
    with pytest.raises(TypeError):
        catalog.images["x"] = debian()  # type: ignore[index]
    with pytest.raises(ValueError, match="does not match"):
        Catalog({"wrong-1-1": debian()})
    assert hash(catalog) == hash(Catalog(dict(catalog.images)))


def test_with_image_returns_a_new_catalog():
    catalog = Catalog({"debian-12-1": debian()})
    added = catalog.with_image(debian("2"))
    assert list(added) == ["debian-12-1", "debian-12-2"]
    assert list(catalog) == ["debian-12-1"]
    replaced = added.with_image(debian("1", size=10))
    assert replaced.get("debian-12-1").size == 10
    assert added.get("debian-12-1").size is None
    assert len(replaced) == 2


def test_suggestions():
    images = [debian("1"), debian("2"), debian("10"), Image("rocky", "9", "3", "r.gz"),
              Image("alma", "9", "3", "a.gz")]
    catalog = Catalog({i.id: i for i in images})
    assert catalog.suggestions("debian-12-3") == ["debian-12-1", "debian-12-2", "debian-12-10"]
    assert catalog.suggestions("rocky-9-2") == ["rocky-9-3"]
    assert catalog.suggestions("debian") == ["debian-12-1", "debian-12-2", "debian-12-10"]
    assert catalog.suggestions("debian-99-99") == ["debian-12-1", "debian-12-2", "debian-12-10"]
    assert catalog.suggestions("debian-12-1") == ["debian-12-10", "debian-12-2"]  # never itself
    assert catalog.suggestions("zzz") == []
    assert catalog.suggestions("debian-12-3", limit=1) == ["debian-12-1"]
    assert catalog.suggestions("debian-12-3", limit=0) == []


# --- rendering and incremental editing ---------------------------------------------------------------------


def test_render_entry_round_trips():
    image = debian("7", size=5, sha256="1" * 64, boot=BootHints(kernel="/vmlinuz", cmdline="quiet a=b # c"),
                   owner="bob", visibility="private", description="two\n\nlines: 'quoted' \"x\" #")
    text = render_entry(image)
    assert text.startswith("  - name: debian\n    version: '12'\n") and text.endswith("\n")
    assert parse_catalog("images:\n" + text).get("debian-12-7") == image
    assert render_entry(debian()) == (
        "  - name: debian\n    version: '12'\n    subversion: '1'\n    file: debian-12-1.tar.zst\n")
    assert render_entry(debian(), indent=0).startswith("- name: debian\n  version:")


SAMPLE = """\
# top comment
images:
  # first entry
  - name: debian
    version: "12"   # quoted
    subversion: "1"
    file: debian-12-1.tar.zst
    description: |
      a block
      scalar

  # second entry, the one replaced
  - name: debian
    version: "12"
    subversion: "2"
    file: debian-12-2.tar.zst
    boot:
      kernel: /boot/vmlinuz
  # third entry
  - {name: rocky, version: "9", subversion: "3", file: rocky-9-3.tar.zst}  # flow entry
# trailing comment
"""


def test_upsert_replaces_only_that_entry():
    new = debian("2", size=42, description="rebuilt")
    result = upsert_entry_text(SAMPLE, new)
    before, _, after = SAMPLE.partition(SAMPLE[SAMPLE.index("  - name: debian\n    version: \"12\"\n    sub"
                                                                "version: \"2\""):SAMPLE.index("  # third")])
    assert result == before + render_entry(new) + after
    catalog = parse_catalog(result)
    assert catalog.get("debian-12-2") == new
    assert catalog.get("debian-12-1") == parse_catalog(SAMPLE).get("debian-12-1")
    assert list(catalog) == ["debian-12-1", "debian-12-2", "rocky-9-3"]


def test_upsert_replaces_first_and_last_entries():
    first = upsert_entry_text(SAMPLE, debian("1", size=1))
    old_entry = SAMPLE[SAMPLE.index("  - name: debian"):SAMPLE.index("  scalar\n") + len("  scalar\n")]
    assert first == SAMPLE.replace(old_entry, render_entry(debian("1", size=1)))
    assert "      scalar\n\n  # second entry" not in first and "\n\n  # second entry" in first
    rocky = Image("rocky", "9", "3", "rocky-9-3.tar.zst", size=3)
    last = upsert_entry_text(SAMPLE, rocky)
    assert last == SAMPLE.replace(SAMPLE.splitlines(keepends=True)[-2], render_entry(rocky))
    assert parse_catalog(last).get("rocky-9-3") == rocky


def test_upsert_appends_after_the_last_entry():
    new = Image("alma", "9", "1", "alma-9-1.tar.zst")
    result = upsert_entry_text(SAMPLE, new)
    assert result == SAMPLE.replace("# trailing comment\n", render_entry(new) + "# trailing comment\n")
    assert list(parse_catalog(result)) == ["alma-9-1", "debian-12-1", "debian-12-2", "rocky-9-3"]


def test_upsert_keeps_the_list_indentation():
    text = "images:\n- name: a\n  version: '1'\n  subversion: '1'\n  file: a.gz\n"
    result = upsert_entry_text(text, Image("b", "1", "1", "b.gz"))
    assert result == text + render_entry(Image("b", "1", "1", "b.gz"), indent=0)


@pytest.mark.parametrize(
    ("text", "expected_head"),
    [
        ("", "images:\n"),
        ("# comments only\n", "# comments only\nimages:\n"),
        ("# no newline", "# no newline\nimages:\n"),
        ("images:\n", "images:\n"),
        ("images: []  # none yet\n", "images:  # none yet\n"),
        ("images: ~\n", "images:\n"),
    ],
)
def test_upsert_into_an_empty_catalog(text, expected_head):
    result = upsert_entry_text(text, debian())
    assert result == expected_head + render_entry(debian())
    assert list(parse_catalog(result)) == ["debian-12-1"]


def test_upsert_without_final_newline():
    text = cat(*BASE).rstrip("\n")
    result = upsert_entry_text(text, debian("2"))
    assert result == text + "\n" + render_entry(debian("2"))


@pytest.mark.parametrize("text", ["images: [{name: a}]\n", "{images: []}\n", "images: 3\n", "images: [\n"])
def test_upsert_refuses_what_it_cannot_edit(text):
    with pytest.raises(CatalogError):
        upsert_entry_text(text, debian())


# --- files -----------------------------------------------------------------------------------------------


def test_sample_catalog_in_the_repo():
    catalog = load_catalog(ROOT / "images.yaml")
    assert {"debian-12-1", "debian-12-2", "rocky-9-3"} <= set(catalog)
    for image_id in ("debian-12-1", "debian-12-2", "rocky-9-3"):
        image = catalog.get(image_id)
        assert image.file == f"{image_id}.tar.zst"
        assert image.size is None and image.sha256 is None
    assert catalog.suggestions("debian-12-9")[:2] == ["debian-12-1", "debian-12-2"]


def test_sample_catalog_upsert_keeps_its_comments():
    text = (ROOT / "images.yaml").read_text(encoding="utf-8")
    new = debian("1", size=99)
    result = upsert_entry_text(text, new)
    kept = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert [line for line in result.splitlines() if line.lstrip().startswith("#")] == kept
    assert parse_catalog(result).get("debian-12-1") == new
    assert len(parse_catalog(result)) == len(parse_catalog(text))


def test_load_catalog_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert len(load_catalog(empty)) == 0
    broken = tmp_path / "broken.yaml"
    broken.write_text(cat(*BASE, "    sha: 1"))
    with pytest.raises(CatalogError) as info:
        load_catalog(broken)
    assert str(info.value.problems[0]).startswith(f"{broken}:6: image 'debian-12-1': unknown key 'sha'")


def test_load_catalog_unreadable(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(CatalogError) as info:
        load_catalog(missing)
    (problem,) = info.value.problems
    assert problem.path == str(missing) and problem.line is None
    assert "cannot read the catalog" in problem.message
    assert str(problem) == f"{missing}: {problem.message}"
    assert str(info.value).endswith(RELOAD_HINT)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"images:\n  - name: \xff\n")
    with pytest.raises(CatalogError, match="not UTF-8"):
        load_catalog(binary)
