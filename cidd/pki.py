"""The cluster CA: create it, issue server and agent certificates, write keys safely (``cryptography`` only).

Keys are EC P-256 (fast handshakes for 10,000 agents, small certificates). The CA is valid 10 years, the
certificates it issues 5 years (renew with ``cidd init --force`` / ``cidd issue-cert``). Private keys are written
with mode 0600 under a 0700 directory and never replaced unless asked (``force``). No reactor, no sockets.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cidcommon.errors import CidError
from cidcommon.paths import check_private
from cidcommon.tlsfiles import PkiPaths, default_pki_paths

__all__ = ["PkiPaths", "default_pki_paths", "PkiError", "init_pki", "issue_agent"]

CA_DAYS = 3650
CERT_DAYS = 1825


class PkiError(CidError):
    """A CA or certificate file is missing, unreadable or not what it should be; the message names the file."""

    code = "bad_request"


@dataclass
class InitReport:
    """What ``init_pki`` did: files created, files kept as they were."""

    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def not_valid_after(cert: x509.Certificate) -> datetime.datetime:
    """Return the end of ``cert``'s validity as an aware UTC time (cryptography 42 has ``not_valid_after_utc``;
    Debian 12's 38 only the naive ``not_valid_after``)."""
    aware = getattr(cert, "not_valid_after_utc", None)
    if aware is not None:
        return aware
    return cert.not_valid_after.replace(tzinfo=datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cid"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    """Return a SubjectAlternativeName with IP entries for addresses and DNS entries for the rest."""
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(n.strip() for n in names if n and n.strip()):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(common_name: str = "cid cluster CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a new CA key and its self-signed certificate (valid CA_DAYS days, may sign leaves only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, *,
          sans: Sequence[str] = (), server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a new key and a certificate for it signed by the CA.

    ``server`` certificates carry ``sans`` (IP addresses and DNS names) and serverAuth; agent (client)
    certificates carry clientAuth and the node name as CN and DNS SAN.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(min(now + datetime.timedelta(CERT_DAYS), not_valid_after(ca_cert)))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    names = list(sans) if server else [common_name, *sans]
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return the unencrypted PKCS#8 PEM of ``key``."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    """Return the PEM of ``cert``."""
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """Return the SHA-256 fingerprint of ``cert`` as lower-case hex (what ``openssl x509 -fingerprint`` shows)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def write_file(path: Path, data: bytes, *, private: bool, force: bool = False) -> None:
    """Write ``data`` to ``path`` (0600 when ``private``, in a 0700 directory if it has to be created; else 0644).

    Never follows an existing file: the new file is written beside it and renamed over it (only with ``force``).
    Raises FileExistsError when ``path`` exists and ``force`` is false.
    """
    path = Path(path)
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if private:
            os.chmod(path.parent, 0o700)  # a directory we create for keys; an existing one is left as it is
    if path.exists() and not force:
        raise FileExistsError(path)
    temp = path.with_name(f".{path.name}.new")
    temp.unlink(missing_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temp, path)


def load_cert(path: Path) -> x509.Certificate:
    """Return the certificate in ``path``. Raises PkiError naming the file when it is missing or not a PEM."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise PkiError(f"certificate {path} does not exist; create the cluster CA with 'cidd init'") from None
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read certificate {path}: {exc}; recreate it with 'cidd init --force'") from None


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Return the private key in ``path``.

    Raises TokenFileError when the file is readable by group or others (with the chmod fix), PkiError when it
    is missing or not a private key.
    """
    try:
        check_private(Path(path))
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(f"private key {path} does not exist; create it with 'cidd init'") from None
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"cannot read private key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an EC private key; recreate it with 'cidd init --force'")
    return key


def init_pki(paths: PkiPaths, sans: Sequence[str], *, force: bool = False, server_name: str = "cidd") -> InitReport:
    """Create the CA (unless it exists) and the server certificate (unless it exists); return what was done.

    With ``force`` both are created again (every agent certificate must then be issued again). Raises
    TokenFileError for an existing CA key readable by others, PkiError for unreadable files.
    """
    report = InitReport()
    if force or not (paths.ca.exists() and paths.ca_key.exists()):
        ca_key, ca_cert = create_ca()
        write_file(paths.ca_key, key_pem(ca_key), private=True, force=True)
        write_file(paths.ca, cert_pem(ca_cert), private=False, force=True)
        report.created += [paths.ca_key, paths.ca]
        force = True  # a new CA needs a new server certificate
    else:
        ca_key, ca_cert = load_key(paths.ca_key), load_cert(paths.ca)
        report.kept += [paths.ca_key, paths.ca]
    if force or not (paths.cert.exists() and paths.key.exists()):
        key, cert = issue(ca_key, ca_cert, server_name, sans=sans, server=True)
        write_file(paths.key, key_pem(key), private=True, force=True)
        write_file(paths.cert, cert_pem(cert), private=False, force=True)
        report.created += [paths.key, paths.cert]
    else:
        report.kept += [paths.key, paths.cert]
    return report


def issue_agent(paths: PkiPaths, node: str, *, out_dir: Path | None = None, force: bool = False) -> tuple[Path, Path]:
    """Write an agent certificate for ``node`` (CN = node) and its key into ``out_dir`` (default paths.agents).

    Returns (certificate path, key path). Raises FileExistsError when they exist and ``force`` is false,
    PkiError/TokenFileError when the CA cannot be used.
    """
    directory = Path(out_dir) if out_dir is not None else paths.agents
    cert_path, key_path = directory / f"{node}.pem", directory / f"{node}.key"
    if not force and (cert_path.exists() or key_path.exists()):
        raise FileExistsError(cert_path)
    key, cert = issue(load_key(paths.ca_key), load_cert(paths.ca), node, server=False)
    write_file(key_path, key_pem(key), private=True, force=True)
    write_file(cert_path, cert_pem(cert), private=False, force=True)
    return cert_path, key_path


def san_entries(cert: x509.Certificate) -> list[str]:
    """Return the DNS names and IP addresses of ``cert``'s SubjectAlternativeName, as text."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*ext.get_values_for_type(x509.DNSName), *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))]
