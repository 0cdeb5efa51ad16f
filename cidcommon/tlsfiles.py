"""Where the TLS files are, and the client side of TLS with the standard ``ssl`` module (cidcapt, helpers).

No reactor and no ``cryptography`` import here, so that cidcapt starts fast. The defaults follow the state
directory (cidcommon.paths): public files in ``<state>/tls/``, private keys in ``<state>/secrets/``.
A client uses TLS unless told ``--plain-tcp`` (or ``CID_PLAIN_TCP=1``): a missing CA file is an error,
never a silent fallback to clear text. Which CA file a client uses is chosen with its address, in
cidcommon.client_config.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cidcommon.errors import CidError
from cidcommon.paths import check_private

CA_ENV = "CID_CA_FILE"
CERT_ENV = "CID_CERT_FILE"
KEY_ENV = "CID_KEY_FILE"
PLAIN_ENV = "CID_PLAIN_TCP"


class TlsError(CidError):
    """TLS could not be set up or the server is not trusted; the message names the file and the fix."""

    code = "tls"


@dataclass(frozen=True)
class PkiPaths:
    """Where the CA, the server certificate and the agent certificates live (see ``default_pki_paths``)."""

    ca: Path  # CA certificate (public: copy it to every node and client)
    ca_key: Path  # CA private key (0600; only `cidd init` / `cidd issue-cert` read it)
    cert: Path  # server certificate
    key: Path  # server private key (0600)
    agents: Path  # directory of agent certificates: NODE.pem and NODE.key (0700)


def default_pki_paths(state_dir: Path) -> PkiPaths:
    """Return the default locations under ``state_dir``: public files in tls/, keys in secrets/."""
    state_dir = Path(state_dir)
    return PkiPaths(ca=state_dir / "tls" / "ca.pem", ca_key=state_dir / "secrets" / "ca.key",
                    cert=state_dir / "tls" / "server.pem", key=state_dir / "secrets" / "server.key",
                    agents=state_dir / "secrets" / "agents")


def plain_requested(env: Mapping[str, str]) -> bool:
    """Return whether ``env`` asks for plain TCP ($CID_PLAIN_TCP set to 1, yes or true)."""
    return env.get(PLAIN_ENV, "").strip().lower() in ("1", "yes", "true")


@dataclass(frozen=True)
class ClientTls:
    """The TLS settings of a client: the CA that must have signed cidd's certificate, an optional own cert."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @functools.cached_property
    def context(self) -> ssl.SSLContext:
        """Return the SSLContext (verifies the server's certificate and its name). Raises TlsError."""
        if not self.ca.is_file():
            raise TlsError(f"CA file {self.ca} does not exist; copy the cluster CA certificate from the head node "
                           "(<cidd state dir>/tls/ca.pem) here, or pass --ca FILE or set CID_CA_FILE "
                           "(--plain-tcp only when cidd is configured with tls mode plain)")
        try:
            context = ssl.create_default_context(cafile=str(self.ca))
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot use CA file {self.ca}: {exc}; it must hold the PEM certificate of the "
                           "cluster CA (<cidd state dir>/tls/ca.pem)") from None
        if self.cert is not None:
            key = self.key or self.cert
            check_private(key)
            try:
                context.load_cert_chain(str(self.cert), str(key))
            except (OSError, ssl.SSLError) as exc:
                raise TlsError(f"cannot use client certificate {self.cert} with key {key}: {exc}") from None
        return context


def untrusted_message(address: str, ca: Path, reason: str) -> str:
    """Return the sentence for a server certificate that the CA file does not vouch for."""
    return (f"the server's certificate at {address} is not trusted by CA file {ca} ({reason}); pass the CA that "
            "signed cidd's certificate with --ca or CID_CA_FILE (cidd's <state dir>/tls/ca.pem), or re-issue "
            "cidd's certificate for this address with 'cidd init --force --san ADDRESS'")
