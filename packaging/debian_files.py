"""Generate the files the Debian packages ship besides the Python modules (run by debian/rules at build time).

    python3 packaging/debian_files.py OUT

writes, from the real argparse parsers of the installed programs (so they never drift from ``--help``):

- ``OUT/man/PROG.1``: man pages, through argparse-manpage (python3-argparse-manpage);
- ``OUT/bash-completion/PROG`` and ``OUT/zsh/_PROG``: shell completion, through shtab (python3-shtab);
- ``OUT/systemd/cidd.service`` and ``cidkid.service``: the units of ``rc/`` with the Debian paths
  (``/usr/bin`` instead of pip's ``/usr/local/bin``, the docs under ``/usr/share/doc/cid-head``).

A parser is captured by running the program's ``main`` with ``parse_args`` patched to hand the parser back
instead of parsing, so no program has to export a ``build_parser`` for this. Modules missing on the build host
are stubbed only when they are not needed to build a parser (python-hostlist is not in Debian 12; it is packaged
separately by packaging/python3-hostlist).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# program -> (module, the argv that makes its main parse with its main parser)
PROGRAMS: dict[str, tuple[str, list[str]]] = {
    "cidd": ("cidd.main", []),
    "cidcapt": ("cidcapt.main", []),
    "cid-mkimg": ("cidmkimg.main", []),
    "cid-slurm-helper": ("cidcapt.slurm_helper", []),
    "blancmange": ("blancmange.main", []),
    "cidkid": ("cidkid.main", []),
}
# cidd's set-up commands are dispatched on argv[0] before its main parser: (name, argv) for each.
CIDD_COMMANDS: list[tuple[str, list[str]]] = [
    ("init", ["init"]),
    ("issue-cert", ["issue-cert"]),
    ("agent-token", ["agent-token"]),
    ("check-config", ["check-config"]),
]
# The one-line summaries of the man pages' NAME sections.
SUMMARIES = {
    "cidd": "cid head-node daemon: switches node images on demand for batch jobs",
    "cidcapt": "put the nodes of a job into an image and wait until they run it",
    "cid-mkimg": "pack a root file system into a cid image and its catalog entry",
    "cid-slurm-helper": "Slurm node_features/helpers program reporting and switching a node's cid image",
    "blancmange": "build the cid installer (kernel and initramfs) and small bootable test images",
    "cidkid": "cid node agent: reports the node's image and carries out image switches",
}
UNITS = {"cidd.service": "cid-head", "cidkid.service": "cid-node"}


class _Captured(BaseException):
    """Raised by the patched parse_args with the parser (a BaseException: mains that catch Exception let it by)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def _stub_missing(names: list[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)


def capture(module: str, argv: list[str]) -> argparse.ArgumentParser:
    """Return the parser ``module.main(argv)`` parses its command line with."""
    main: Callable[..., object] = importlib.import_module(module).main

    def grab(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> object:
        raise _Captured(self)

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = grab  # type: ignore[method-assign,assignment]
    argparse.ArgumentParser.parse_known_args = grab  # type: ignore[method-assign,assignment]
    try:
        main(list(argv))
    except _Captured as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    raise SystemExit(f"{module}.main({argv}) returned without parsing its command line")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            found: argparse.ArgumentParser = action.choices[name]
            return found
    return None


def cidd_commands() -> list[tuple[str, argparse.ArgumentParser]]:
    """Return cidd's set-up commands with their parsers."""
    found = []
    for name, argv in CIDD_COMMANDS:
        parser = capture("cidd.main", argv)
        found.append((name, _subparser(parser, name) or parser))
    return found


def completion_parser(prog: str, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Return the parser to complete ``prog`` with: cidd's gets its set-up commands as subcommands."""
    if prog != "cidd":
        return parser
    whole = argparse.ArgumentParser(prog="cidd", parents=[parser], add_help=False, allow_abbrev=False)
    commands = whole.add_subparsers(dest="command", required=False)
    for name, sub in cidd_commands():
        commands.add_parser(name, parents=[sub], add_help=False, conflict_handler="resolve", help=sub.description)
    return whole


def man_page(prog: str, parser: argparse.ArgumentParser) -> str:
    """Return the man page of ``prog`` in roff."""
    from build_manpages.manpage import Manpage

    parser.man_short_description = SUMMARIES[prog]  # type: ignore[attr-defined]  # argparse-manpage's NAME line
    manpage = Manpage(parser)
    # argparse-manpage 1.2 cuts the usage at its last ':' (a HOST:PORT metavar loses the start): cut after "usage:".
    manpage.synopsis = parser.format_usage().split(":", 1)[1].split()
    page = str(manpage)
    if prog == "cidd":
        extra = [".SH COMMANDS", "Set-up commands, given as the first argument instead of the daemon's options:"]
        for name, sub in cidd_commands():
            text = sub.format_help().replace("\\", "\\\\").replace("\n.", "\n\\&.").replace("\n'", "\n\\&'")
            extra += [".TP", f".B cidd {name}", ".nf", text.rstrip(), ".fi"]
        page = page.rstrip("\n") + "\n" + "\n".join(extra) + "\n"
    return page


def unit(name: str, package: str) -> str:
    """Return the packaged text of the systemd unit ``rc/name``."""
    text = (ROOT / "rc" / name).read_text(encoding="utf-8")
    text = text.replace("/usr/local/bin/", "/usr/bin/")
    text = text.replace("file:///usr/share/doc/cid/", f"file:///usr/share/doc/{package}/")
    text = re.sub(r"^# Install: cp rc/.*\n", f"# Installed by the {package} Debian package.\n", text, flags=re.M)
    return text


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "build" / "debian-gen"
    sys.path.insert(0, str(ROOT))
    _stub_missing(["hostlist"])
    import shtab

    for sub in ("man", "bash-completion", "zsh", "systemd"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for prog, (module, args) in PROGRAMS.items():
        parser = capture(module, args)
        parser.prog = prog
        (out / "man" / f"{prog}.1").write_text(man_page(prog, parser), encoding="utf-8")
        whole = completion_parser(prog, parser)
        (out / "bash-completion" / prog).write_text(shtab.complete(whole, "bash"), encoding="utf-8")
        (out / "zsh" / f"_{prog}").write_text(shtab.complete(whole, "zsh"), encoding="utf-8")
    for name, package in UNITS.items():
        (out / "systemd" / name).write_text(unit(name, package), encoding="utf-8")
    print(f"wrote man pages, completion and units for {len(PROGRAMS)} programs into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
