"""Boot profiles: which system each node boots next, as iPXE scripts and pxelinux files. Pure logic.

cidd publishes a node's next boot (``installer`` or ``disk``) whenever the state machine emits ``SetBoot``.
Nodes find their profile by MAC address: ``/etc/ethers``-style lines map MACs to node names. The installer
profile carries cidd's address and the node name on the kernel command line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cidcommon.errors import CidError

_MAC = re.compile(r"^([0-9a-f]{2})([:-]?)([0-9a-f]{2})(?:\2([0-9a-f]{2})){4}$")


class EthersError(CidError):
    """The ethers file has lines that are not ``MAC NODE``; the message lists every one."""

    code = "bad_request"


def normalize_mac(text: str) -> str | None:
    """Return ``text`` as a lowercase colon-separated MAC (``52:54:00:12:34:56``), or None if it is not one.

    Accepts colons, dashes (``52-54-00-…``, iPXE's ``${mac:hexhyp}``) or no separator.
    """
    mac = text.strip().lower()
    if not _MAC.match(mac):
        return None
    digits = mac.replace(":", "").replace("-", "")
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def parse_ethers(text: str, path: str = "ethers") -> dict[str, str]:
    """Return {mac: node} from ``/etc/ethers``-style text (``MAC NAME`` per line, ``#`` comments).

    Raises EthersError listing every bad line (file, line, what is wrong).
    """
    macs: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        mac = normalize_mac(fields[0]) if fields else None
        if len(fields) != 2 or mac is None:
            problems.append(f"{path}:{number}: expected 'MAC NODE' (e.g. 52:54:00:12:34:56 node01), got {raw!r}")
        elif mac in macs and macs[mac] != fields[1]:
            problems.append(f"{path}:{number}: MAC {mac} is already given to {macs[mac]}")
        else:
            macs[mac] = fields[1]
    if problems:
        raise EthersError("\n".join(problems) + "\nfix these lines; each node needs one 'MAC NAME' line")
    return macs


@dataclass(frozen=True)
class InstallerBoot:
    """The installer's kernel and initramfs as nodes fetch them, and its extra kernel arguments."""

    kernel_url: str
    initrd_url: str
    cmdline: str = ""


@dataclass(frozen=True)
class ImageBoot:
    """An installed image's own kernel and initrd as nodes fetch them (``/boot/images/<id>/...``), and its
    kernel arguments (the catalog's ``boot.cmdline``)."""

    image: str
    kernel_url: str
    initrd_url: str
    cmdline: str = ""


#: The root file system the installer creates (cidkid formats it with this label; docs/blancmange.md).
ROOT_ARG = "root=LABEL=cid-root"


def image_args(node: str, server: str, image: ImageBoot) -> str:
    """Return the kernel arguments of an installed image: its root (unless its cmdline names one), cidd's
    address and the node's name (cidkid in the image reads them with --kernel-cmdline), then its own cmdline."""
    words = image.cmdline.split()
    args = [] if any(w.startswith("root=") for w in words) else [ROOT_ARG, "rw"]
    args += [f"cid.server={server}", f"cid.node={node}", *words]
    return " ".join(args)


def kernel_args(node: str, server: str, token: str | None, extra: str) -> str:
    """Return the installer's kernel arguments: cidd's address, the node's name and its boot token."""
    args = [f"cid.server={server}", f"cid.node={node}"]
    if token:
        args.append(f"cid.token={token}")
    if extra:
        args.append(extra)
    return " ".join(args)


def ipxe_script(node: str | None, boot: str, installer: InstallerBoot | None, server: str,
                token: str | None = None, detail: str = "", image: ImageBoot | None = None) -> str:
    """Return the iPXE script for a node whose next boot is ``boot`` (``installer`` or ``disk``).

    An unknown node (``node`` None), or an installer profile without installer files, boots its local disk:
    a node cidd does not know must never be reinstalled. A disk boot with ``image`` (the installed image's
    kernel and initrd, served by cidd) loads that kernel with its root on the local disk; without, the
    script hands over to the disk's own boot loader (``sanboot``).
    """
    if node is None:
        return ("#!ipxe\necho cid: this MAC is not in cidd's ethers file; booting the local disk\n"
                "sanboot --no-describe --drive 0x80 || exit\n")
    if boot == "installer" and installer is not None:
        args = kernel_args(node, server, token, installer.cmdline)
        return (f"#!ipxe\n# cid: {node} -> installer{' (' + detail + ')' if detail else ''}\n"
                f"kernel {installer.kernel_url} initrd=initrd.img {args}\n"
                f"initrd --name initrd.img {installer.initrd_url}\nboot\n")
    if boot != "installer" and image is not None:
        return (f"#!ipxe\n# cid: {node} -> image {image.image} on the local disk\n"
                f"kernel {image.kernel_url} initrd=initrd.img {image_args(node, server, image)}\n"
                f"initrd --name initrd.img {image.initrd_url}\nboot\n")
    note = " (no installer configured)" if boot == "installer" else ""
    return f"#!ipxe\n# cid: {node} -> local disk{note}\nsanboot --no-describe --drive 0x80 || exit\n"


def pxelinux_name(mac: str) -> str:
    """Return the pxelinux.cfg file name for ``mac`` (``01-52-54-00-12-34-56``)."""
    return "01-" + mac.replace(":", "-")


def pxelinux_config(node: str, boot: str, kernel: str, initrd: str, server: str, token: str | None,
                    cmdline: str) -> str:
    """Return a pxelinux configuration booting the installer (paths relative to the TFTP root) or the disk."""
    if boot == "installer":
        return (f"# cid: {node} -> installer\nDEFAULT cid\nLABEL cid\n  KERNEL {kernel}\n  INITRD {initrd}\n"
                f"  APPEND {kernel_args(node, server, token, cmdline)}\n")
    return f"# cid: {node} -> local disk\nDEFAULT local\nLABEL local\n  LOCALBOOT 0\n"


def macs_of(ethers: Mapping[str, str], node: str) -> list[str]:
    """Return the MACs that ``ethers`` gives to ``node``, sorted."""
    return sorted(mac for mac, name in ethers.items() if name == node)
