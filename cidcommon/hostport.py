"""The one parser of ``HOST:PORT`` addresses (cidd's listen address, cidkid's and cidcapt's --server, a BMC).

Pure: no socket, no name lookup.
"""

from __future__ import annotations


def parse_hostport(text: str, default_port: int, *, what: str = "server address") -> tuple[str, int]:
    """Return ``(host, port)`` from ``HOST``, ``HOST:PORT``, ``[V6]``, ``[V6]:PORT`` or a bare IPv6 address;
    ``default_port`` when none is given. ``what`` names the address in error messages.

    Raises ValueError with a sentence saying what is accepted when ``text`` is none of these.
    """
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or (close + 1 < len(text) and text[close + 1] != ":"):
            raise ValueError(f"bad {what} {text!r}; write an IPv6 address as '[::1]:{default_port}'")
        host, port_text = text[1:close], text[close + 2:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"bad {what} {text!r}: no host; expected HOST, HOST:PORT or [IPv6]:PORT, "
                         f"e.g. head01:{default_port}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {what} {text!r}: {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def format_hostport(host: str, port: int) -> str:
    """Return ``host:port`` as a person writes it (an IPv6 host in brackets; a Unix socket path as it is)."""
    if host.startswith("/"):
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
