"""TLS of cidd's agent/client port: the CA cidd creates at first start and the server's TLS options
(docs/security.md). ``ensure_pki`` and ``server_options`` run once at start; refused handshakes and
identities are security events (cidd/security_events.py).
"""

from __future__ import annotations

import socket
from typing import Any

import structlog
from twisted.internet import ssl

from cidcommon.paths import check_private
from cidcommon.tlsfiles import PkiPaths
from cidd.config import Config
from cidd.pki import PkiError, init_pki

log = structlog.get_logger(__name__)

WILDCARDS = ("", "0.0.0.0", "::", "*")


def default_sans(config: Config) -> list[str]:
    """Return the names and addresses cidd's own server certificate carries (no DNS lookup is made).

    Loopback, the host name, the listen address unless it is a wildcard, the host of ``boot.server``, and
    ``tls.san`` from the configuration.
    """
    names = ["127.0.0.1", "::1", "localhost", socket.gethostname()]
    if config.listen_host not in WILDCARDS:
        names.append(config.listen_host)
    if config.boot.server:
        names.append(config.boot.server.rpartition(":")[0].strip("[]") or config.boot.server)
    return [*names, *config.tls.san]


def ensure_pki(config: Config) -> PkiPaths:
    """Return the TLS file paths, creating the CA and server certificate at first start when none is configured.

    cidd only creates files at their default places (under state_dir) and only when no TLS file is configured
    and no CA exists yet; configured files must exist. Raises PkiError or TokenFileError (unsafe key).
    """
    paths = config.tls.paths(config.state_dir)
    if not config.tls.explicit_files and not paths.ca.exists():
        report = init_pki(paths, default_sans(config))
        log.info("tls.ca_created", ca=str(paths.ca), cert=str(paths.cert), created=[str(p) for p in report.created],
                 hint="copy the CA certificate to every node and client (cidkid/cidcapt --ca, $CID_CA_FILE)")
    return paths


def _read(path: Any, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} {path} does not exist; create the cluster CA and certificates with 'cidd init', "
                       "or fix the 'tls' section of cidd.yaml") from None
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror}; check its owner and mode") from None


def server_options(paths: PkiPaths, client_certs: str) -> ssl.CertificateOptions:
    """Return Twisted's TLS options for the agent/client port (TLS 1.2 at least).

    ``client_certs``: ``none`` asks no certificate; ``optional`` and ``required`` verify one when the peer
    sends it (its CN becomes the session's ``peer_cert_node``); ``required`` is enforced per agent at hello,
    because clients (cidcapt) authenticate with their token. Raises TokenFileError when the key is readable by
    group or others, PkiError when a file is missing or does not match.
    """
    check_private(paths.key)
    try:
        server = ssl.PrivateCertificate.loadPEM(_read(paths.cert, "server certificate")
                                                + b"\n" + _read(paths.key, "server key"))
    except PkiError:
        raise
    except Exception as exc:  # pyOpenSSL raises its own errors for bad PEM or a key that does not match
        raise PkiError(f"cannot use server certificate {paths.cert} with key {paths.key}: {exc}; "
                       "recreate them with 'cidd init --force'") from None
    extra: dict[str, Any] = {}
    if client_certs != "none":
        try:
            ca = ssl.Certificate.loadPEM(_read(paths.ca, "CA certificate"))
        except PkiError:
            raise
        except Exception as exc:
            raise PkiError(f"cannot read CA certificate {paths.ca}: {exc}") from None
        extra = {"verify": True, "caCerts": [ca.original], "requireCertificate": False}
    return ssl.CertificateOptions(privateKey=server.privateKey.original, certificate=server.original,
                                  raiseMinimumTo=ssl.TLSVersion.TLSv1_2, **extra)

