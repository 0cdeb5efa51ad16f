"""The cid image catalog: parse, validate and edit ``images.yaml``.

Images are named ``<name>-<version>-<subversion>`` (notP naming), e.g. ``debian-12-1``; each points at a
zstd-compressed tar of a root filesystem.  Parsing works on YAML *nodes* (``yaml.compose`` with the safe
loader, never object construction) so that every problem carries the line it comes from, and all problems
are reported at once.  Pure logic: no Twisted, no sockets.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType

import yaml

from cidcommon.errors import CidError

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.]*")
PART_RE = re.compile(r"[A-Za-z0-9_.]+")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
FILE_SUFFIXES = (".tar.zst", ".tar.gz", ".gz")
VISIBILITIES = ("shared", "private")
REQUIRED_KEYS = ("name", "version", "subversion", "file")
KNOWN_KEYS = (*REQUIRED_KEYS, "size", "sha256", "os", "boot", "owner", "visibility", "description")
BOOT_KEYS = ("kernel", "initrd", "cmdline")
RELOAD_HINT = "fix these and reload; the previous catalog stays active"

_TAG = "tag:yaml.org,2002:"
_TEXT_TAGS = {_TAG + "str", _TAG + "int", _TAG + "float"}  # taken as written: version 12 -> "12"
_NULL_TAG = _TAG + "null"


@dataclass(frozen=True)
class BootHints:
    """Where the kernel and initrd live inside the image, and extra kernel arguments."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class Image:
    """One catalog entry; construction raises ValueError if a field is invalid."""

    name: str
    version: str
    subversion: str
    file: str
    size: int | None = None
    sha256: str | None = None
    os: str = "linux"
    boot: BootHints = BootHints()
    owner: str = "root"
    visibility: str = "shared"
    description: str = ""

    def __post_init__(self) -> None:
        problems = [msg for key in KNOWN_KEYS if (msg := _check(key, getattr(self, key)))]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def id(self) -> str:
        """Return the image id ``name-version-subversion``."""
        return f"{self.name}-{self.version}-{self.subversion}"

    def to_dict(self) -> dict:
        """Return a JSON-friendly dict of every field, plus ``"id"``."""
        boot = {"kernel": self.boot.kernel, "initrd": self.boot.initrd, "cmdline": self.boot.cmdline}
        values = {key: getattr(self, key) for key in KNOWN_KEYS if key != "boot"}
        return {"id": self.id, **values, "boot": boot}


def _check(key: str, value: object) -> str | None:
    """Return what is wrong with ``value`` as the field ``key`` (boot hints included), or None if valid."""
    if key == "boot":
        if not isinstance(value, BootHints):
            return "boot must be a mapping of kernel, initrd, cmdline"
        return next((m for k in BOOT_KEYS if (m := _check("boot." + k, getattr(value, k)))), None)
    if key == "size":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        return None if ok else f"size must be an integer >= 0 (bytes), got {value!r}"
    if value is None and key in ("sha256", "boot.kernel", "boot.initrd"):
        return None
    if not isinstance(value, str):
        return f"{key} must be a string, got {value!r}"
    if key == "name" and not NAME_RE.fullmatch(value):
        return f"name must match [a-z0-9][a-z0-9_.]* (lowercase, no '-'), got {value!r}"
    if key in ("version", "subversion") and not PART_RE.fullmatch(value):
        return f"{key} must match [A-Za-z0-9_.]+ (no '-'), got {value!r}"
    if key == "file":
        if not value.endswith(FILE_SUFFIXES):
            return f"file must end with {', '.join(FILE_SUFFIXES)}, got {value!r}"
        if value.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", value) or "\0" in value:
            return f"file must be a path relative to the image directory, without '..', got {value!r}"
    if key == "sha256" and not SHA256_RE.fullmatch(value):
        return "sha256 must be 64 lowercase hex characters"
    if key in ("boot.kernel", "boot.initrd") and not value.startswith("/"):
        return f"{key} must be an absolute path inside the image, got {value!r}"
    if key == "boot.cmdline" and "\n" in value:
        return "boot.cmdline must be a single line"
    if key == "owner" and value.split() != [value]:
        return f"owner must be a user name (one word), got {value!r}"
    if key == "visibility" and value not in VISIBILITIES:
        return f"visibility must be one of {', '.join(VISIBILITIES)}, got {value!r}"
    return None


@dataclass(frozen=True)
class CatalogProblem:
    """One thing wrong with a catalog file; ``line`` is 1-based, None when not tied to a line."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        """Return ``path:line: message`` (or ``path: message`` without a line)."""
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


class CatalogError(CidError):
    """Raised with every problem found at once; ``.problems`` is a tuple of CatalogProblem.

    ``str()`` (and ``message``) lists the problems one per line and ends with a hint on what to do.
    """

    code = "bad_catalog"

    def __init__(self, problems: Iterable[CatalogProblem]) -> None:
        self.problems: tuple[CatalogProblem, ...] = tuple(problems)
        super().__init__("\n".join([*(str(p) for p in self.problems), RELOAD_HINT]))

    def __str__(self) -> str:
        """Return the problems, one per line, then the reload hint."""
        return "\n".join([*(str(p) for p in self.problems), RELOAD_HINT])


@dataclass(frozen=True)
class Catalog:
    """An immutable set of images keyed by id (iteration yields ids in sorted order).

    ``unavailable`` maps the ids of entries left out because they cannot be installed (their file is missing
    or of the wrong size) to the reason, so that a request for one says why.
    """

    images: Mapping[str, Image] = field(default_factory=dict)
    unavailable: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for key, image in self.images.items():
            if key != image.id:
                raise ValueError(f"catalog key {key!r} does not match image id {image.id!r}")
        object.__setattr__(self, "images", MappingProxyType(dict(sorted(self.images.items()))))

    def __hash__(self) -> int:
        return hash(tuple(self.images.items()))

    def get(self, image_id: str) -> Image | None:
        """Return the image with that id, or None."""
        return self.images.get(image_id)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.images

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.images))

    def suggestions(self, image_id: str, limit: int = 5) -> list[str]:
        """Return up to ``limit`` ids to suggest for an unknown ``image_id``.

        Close matches (difflib ratio >= 0.6, best first) come first, then the other ids sharing its name.
        """
        if limit <= 0:
            return []
        ids = sorted(self.images)
        ratio = {i: difflib.SequenceMatcher(None, image_id, i).ratio() for i in ids}
        close = sorted((i for i in ids if ratio[i] >= 0.6), key=lambda i: (-ratio[i], i))
        name = image_id.split("-", 1)[0]
        found: list[str] = []
        for candidate in close + [i for i in ids if self.images[i].name == name]:
            if candidate != image_id and candidate not in found:
                found.append(candidate)
        return found[:limit]

    def with_image(self, image: Image) -> Catalog:
        """Return a new catalog with ``image`` added, or replacing the entry with the same id."""
        return Catalog({**self.images, image.id: image})


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _compose(text: str, path: str) -> yaml.Node | None:
    """Return the root node of ``text`` (None if empty); raise CatalogError on a YAML syntax error."""
    try:
        return yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = f"{exc.context}: {exc.problem}" if exc.context else str(exc.problem)
        line = mark.line + 1 if mark else None
        raise CatalogError([CatalogProblem(path, line, f"YAML syntax error: {detail}")]) from exc
    except yaml.YAMLError as exc:  # e.g. a ReaderError for a control character
        position = getattr(exc, "position", None)
        line = None if position is None else text.count("\n", 0, position) + 1
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CatalogError([CatalogProblem(path, line, f"YAML error: {detail}")]) from exc


def _text(node: yaml.Node) -> str | None:
    """Return a scalar's text as written (strings and numbers), or None for anything else."""
    return node.value if isinstance(node, yaml.ScalarNode) and node.tag in _TEXT_TAGS else None


def _kind(node: yaml.Node) -> str:
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _pairs(node: yaml.MappingNode, known: tuple[str, ...], errors: list) -> dict[str, tuple]:
    """Return ``{key: (key_node, value_node)}``, adding (line, message) for unknown or duplicate keys."""
    pairs: dict[str, tuple] = {}
    for key, value in node.value:
        name = key.value if isinstance(key, yaml.ScalarNode) else f"<{_kind(key)}>"
        if name in pairs:
            errors.append((_line(key), f"duplicate key '{name}' (first on line {_line(pairs[name][0])})"))
        elif name not in known:
            errors.append((_line(key), f"unknown key '{name}' (known: {', '.join(known)})"))
        else:
            pairs[name] = (key, value)
    return pairs


def _value(key: str, node: yaml.Node, errors: list) -> object:
    """Return the Python value of field ``key`` (boot hints included), adding (line, message) on error."""
    if key == "boot":
        if not isinstance(node, yaml.MappingNode):
            errors.append((_line(node), "boot must be a mapping of kernel, initrd, cmdline"))
            return BootHints()
        pairs = _pairs(node, BOOT_KEYS, errors).items()
        hints = {k: _value("boot." + k, v, errors) for k, (_, v) in pairs if not _is_null(v)}
        return BootHints(**{k: v for k, v in hints.items() if v is not None})
    if key == "size" and isinstance(node, yaml.ScalarNode) and node.tag == _TAG + "int":
        value: object = yaml.constructor.SafeConstructor().construct_yaml_int(node)
    elif key == "size":
        value = node.value if isinstance(node, yaml.ScalarNode) else _kind(node)
    else:
        value = _text(node)
        if value is None:
            kind = f"{node.value} (quote it)" if isinstance(node, yaml.ScalarNode) else _kind(node)
            errors.append((_line(node), f"{key} must be a string, got {kind}"))
            return None
    if (msg := _check(key, value)) is not None:
        errors.append((_line(node), msg))
        return None
    return value


def _item_id(item: yaml.Node) -> str | None:
    """Return the id spelled by a list item's name, version and subversion, or None if one is missing."""
    if not isinstance(item, yaml.MappingNode):
        return None
    found = {k.value: _text(v) for k, v in reversed(item.value) if isinstance(k, yaml.ScalarNode)}
    parts = [found.get(key) for key in ("name", "version", "subversion")]
    return None if None in parts else "-".join(parts)


def _entry(item: yaml.Node, index: int, path: str, problems: list) -> tuple[str | None, Image | None]:
    """Return (id, image) for one list item; either is None when it cannot be built (problems added)."""
    if not isinstance(item, yaml.MappingNode):
        problems.append(CatalogProblem(path, _line(item), f"image #{index}: must be a mapping of keys"))
        return None, None
    errors: list[tuple[int, str]] = []
    pairs = _pairs(item, KNOWN_KEYS, errors)
    image_id = _item_id(item)
    values: dict[str, object] = {}
    for key, (_, node) in pairs.items():
        if _is_null(node):
            if key in REQUIRED_KEYS:
                errors.append((_line(node), f"{key} has no value"))
            continue
        values[key] = _value(key, node, errors)
    errors += [(_line(item), f"missing required key '{k}'") for k in REQUIRED_KEYS if k not in pairs]
    label = f"image '{image_id}'" if image_id else f"image #{index}"
    problems += [CatalogProblem(path, line, f"{label}: {msg}") for line, msg in errors]
    return image_id, (None if errors else Image(**values))


def _images_node(root: yaml.Node | None, path: str, problems: list) -> yaml.Node | None:
    """Return the node under the top-level ``images`` key (None when empty or broken; problems added)."""
    if root is None:
        return None
    if not isinstance(root, yaml.MappingNode):
        problems.append(CatalogProblem(path, _line(root), "the top level must be a mapping with 'images'"))
        return None
    errors: list[tuple[int, str]] = []
    pairs = _pairs(root, ("images",), errors)
    problems += [CatalogProblem(path, line, f"top level: {msg}") for line, msg in errors]
    if "images" not in pairs:
        problems.append(CatalogProblem(path, _line(root), "missing top-level key 'images'"))
        return None
    node = pairs["images"][1]
    if _is_null(node):
        return None
    if not isinstance(node, yaml.SequenceNode):
        problems.append(CatalogProblem(path, _line(node), "'images' must be a list of image entries"))
        return None
    return node


def parse_catalog(text: str, path: str = "images.yaml") -> Catalog:
    """Return the catalog described by ``text``; raise CatalogError listing every problem (line, what)."""
    problems: list[CatalogProblem] = []
    seq = _images_node(_compose(text, path), path, problems)
    images: dict[str, Image] = {}
    first_line: dict[str, int] = {}
    for index, item in enumerate(seq.value if seq is not None else (), 1):
        image_id, image = _entry(item, index, path, problems)
        if image_id is not None and image_id in first_line:
            message = f"image '{image_id}': duplicate id (first defined on line {first_line[image_id]})"
            problems.append(CatalogProblem(path, _line(item), message))
        elif image_id is not None:
            first_line[image_id] = _line(item)
            if image is not None:
                images[image_id] = image
    if problems:
        raise CatalogError(sorted(problems, key=lambda p: p.line or 0))
    return Catalog(images)


def file_issue(image: Image, image_dir: Path) -> str | None:
    """Return why ``image`` cannot be installed from ``image_dir`` (its file missing, unreadable, not a regular
    file, or of another size than its entry says), or None when its file is there."""
    path = image_dir / image.file
    try:
        info = path.stat()
    except OSError as exc:
        reason = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror})"
        return f"its file {path} {reason}; copy it there (cid-mkimg writes it) or remove the entry"
    if not path.is_file():
        return f"{path} is not a regular file"
    if image.size is not None and info.st_size != image.size:
        return f"{path} holds {info.st_size} bytes, the entry says {image.size}; copy the right file or fix 'size'"
    return None


def file_problems(catalog: Catalog, image_dir: Path, source: str) -> list[CatalogProblem]:
    """Return a problem (against the catalog file ``source``) for every image that ``file_issue`` finds."""
    issues = ((image_id, file_issue(catalog.images[image_id], image_dir)) for image_id in catalog)
    return [CatalogProblem(source, None, f"image {image_id}: {issue}") for image_id, issue in issues if issue]


def without_missing_files(catalog: Catalog, image_dir: Path, source: str) -> tuple[Catalog, list[CatalogProblem]]:
    """Return ``catalog`` without the images ``file_issue`` finds (kept in ``unavailable`` with the reason), and
    the problems found (see ``file_problems``)."""
    bad = {image_id: issue for image_id in catalog if (issue := file_issue(catalog.images[image_id], image_dir))}
    if not bad:
        return catalog, []
    kept = {key: image for key, image in catalog.images.items() if key not in bad}
    problems = [CatalogProblem(source, None, f"image {image_id}: {issue}") for image_id, issue in bad.items()]
    return Catalog(kept, unavailable=bad), problems


def load_catalog(path: str | os.PathLike) -> Catalog:
    """Read and parse the catalog file; raise CatalogError (one problem if the file cannot be read)."""
    name = os.fsdecode(path)
    try:
        with open(name, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CatalogError([CatalogProblem(name, None, f"cannot read the catalog: {reason}")]) from exc
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise CatalogError([CatalogProblem(name, None, f"cannot read the catalog: {reason}")]) from exc
    return parse_catalog(text, name)


def render_entry(image: Image, indent: int = 2) -> str:
    """Return one list entry as YAML (``- name: ...``), indented by ``indent`` spaces, ending in a newline.

    Required fields always appear; the others only when they differ from their default.
    """
    default = {f.name: f.default for f in fields(Image)}
    data = {k: getattr(image, k) for k in KNOWN_KEYS if k in REQUIRED_KEYS or getattr(image, k) != default[k]}
    if "boot" in data:
        data["boot"] = {k: getattr(image.boot, k) for k in BOOT_KEYS if getattr(image.boot, k)}
    dumped = yaml.safe_dump([data], sort_keys=False, width=1 << 30, allow_unicode=True)
    return "\n".join(" " * indent + line if line else line for line in dumped.split("\n"))


def _walk(node: yaml.Node) -> Iterator[yaml.Node]:
    yield node
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from (*_walk(key), *_walk(value))
    elif isinstance(node, yaml.SequenceNode):
        for value in node.value:
            yield from _walk(value)


def _item_span(text: str, item: yaml.Node) -> tuple[int, int]:
    """Return (start, end) indexes of the whole lines of a list item, from its '-' line to its last line."""
    dash = item.start_mark.index - 1
    while dash >= 0 and text[dash] in " \t\r\n":
        dash -= 1
    begin = dash if dash >= 0 and text[dash] == "-" else item.start_mark.index
    ends = [n.end_mark.index for n in _walk(item) if n.start_mark.index >= item.start_mark.index
            and (isinstance(n, yaml.ScalarNode) or n.flow_style)]  # block collections end at the next token
    end = max(ends, default=item.start_mark.index)
    while end > begin and text[end - 1].isspace():
        end -= 1
    newline = text.find("\n", end)
    return text.rfind("\n", 0, begin) + 1, len(text) if newline < 0 else newline + 1


def _splice(text: str, start: int, end: int, new: str) -> str:
    """Return ``text`` with ``[start:end]`` replaced by ``new``, adding a newline before it if needed."""
    head = text[:start]
    return head + ("\n" if head and not head.endswith("\n") else "") + new + text[end:]


def upsert_entry_text(text: str, image: Image, path: str = "images.yaml") -> str:
    """Return the catalog text with ``image``'s entry replaced (same id) or appended; other lines untouched.

    Only the lines of the replaced entry change (comments inside it are lost, comments around it stay).
    Raises CatalogError on a YAML syntax error or when the file has no block list under ``images``.
    """
    root = _compose(text, path)
    if root is None:
        return _splice(text, len(text), len(text), "images:\n" + render_entry(image))
    problems: list[CatalogProblem] = []
    seq = _images_node(root, path, problems)
    if problems:
        raise CatalogError(problems)
    if root.flow_style or (seq is not None and seq.flow_style and seq.value):
        raise CatalogError([CatalogProblem(path, _line(root), "cannot edit a flow-style catalog")])
    if seq is None or not seq.value:  # `images:`, `images: ~` or `images: []`: drop the value, add the entry
        key, value = next((k, v) for k, v in root.value if k.value == "images")
        end = text.find("\n", value.end_mark.index)
        end = len(text) if end < 0 else end
        head = text[:value.start_mark.index].rstrip() + text[value.end_mark.index:end].rstrip()
        return head + "\n" + render_entry(image) + text[end + 1:]
    spans = [_item_span(text, item) for item in seq.value]
    first_start = spans[0][0]
    indent = len(text[first_start:]) - len(text[first_start:].lstrip(" "))
    for item, (start, end) in zip(seq.value, spans, strict=True):
        if _item_id(item) == image.id:
            return _splice(text, start, end, render_entry(image, indent))
    end = spans[-1][1]
    return _splice(text, end, end, render_entry(image, indent))
