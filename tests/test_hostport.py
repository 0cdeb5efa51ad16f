"""The one HOST:PORT parser (cidcommon/hostport.py) shared by cidd, cidkid, cidcapt and the BMC addresses."""

from __future__ import annotations

import pytest

from cidcommon.hostport import format_hostport, parse_hostport


@pytest.mark.parametrize("text, expected", [
    ("head01", ("head01", 38008)),
    ("head01:4000", ("head01", 4000)),
    (" 10.0.0.1:1 ", ("10.0.0.1", 1)),
    ("[fe80::1]", ("fe80::1", 38008)),
    ("[fe80::1]:623", ("fe80::1", 623)),
    ("fe80::1", ("fe80::1", 38008)),  # a bare IPv6 address: no port
])
def test_accepted_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, 38008) == expected


@pytest.mark.parametrize("text, words", [
    ("head:http", "bad port in server address 'head:http': 'http' is not a number from 1 to 65535"),
    ("head:0", "bad port"),
    ("head:65536", "bad port"),
    (":38008", "no host"),
    ("[fe80::1", "write an IPv6 address as '[::1]:38008'"),
    ("[fe80::1]x", "write an IPv6 address"),
    ("two words:1", "no host"),
])
def test_refused_forms_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="") as err:
        parse_hostport(text, 38008)
    assert words in str(err.value)


def test_the_address_is_named_in_the_message_and_formatted_back() -> None:
    with pytest.raises(ValueError, match="bad port in BMC address"):
        parse_hostport("bmc01:x", 623, what="BMC address")
    assert format_hostport("fe80::1", 623) == "[fe80::1]:623"
    assert format_hostport("head", 1) == "head:1" and format_hostport("/run/cid.sock", 0) == "/run/cid.sock"
