"""Run-time TLS material for the emulators: a throwaway CA and a server certificate for ``127.0.0.1``/``localhost``.

Nothing here is ever committed: :func:`ensure_tls` writes ``ca.pem`` (the file clients trust through
``REQUESTS_CA_BUNDLE``), ``server.pem`` and ``server-key.pem`` into a state directory at run time.
:func:`make_client_certificate` makes an RSA key + self-signed certificate for ``CertificateCredential`` tests.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files :func:`ensure_tls` wrote."""

    ca_pem: Path            # the CA certificate: point REQUESTS_CA_BUNDLE here
    cert_pem: Path          # server certificate followed by the CA certificate (chain)
    key_pem: Path           # server private key (unencrypted, file mode 0600)


@dataclass(frozen=True)
class ClientCertificate:
    """An app-registration certificate: PEM private key + certificate and its thumbprints (hex)."""

    key_pem: bytes
    cert_pem: bytes
    sha1_thumbprint: str
    sha256_thumbprint: str

    @property
    def combined_pem(self) -> bytes:
        """Key and certificate in one PEM, the form ``CertificateCredential(certificate_data=...)`` takes."""
        return self.key_pem + self.cert_pem


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "defender-sentinel-sync emulators")])


def ensure_tls(directory: str | os.PathLike[str], hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """Create (or reuse, if all three files exist) a CA and a server certificate for ``hosts`` in ``directory``."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(root / "ca.pem", root / "server.pem", root / "server-key.pem")
    if files.ca_pem.exists() and files.cert_pem.exists() and files.key_pem.exists():
        return files

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Emulator Test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = []
    for host in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            san.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    ca_bytes = ca_cert.public_bytes(serialization.Encoding.PEM)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    _write(files.key_pem, key_bytes, 0o600)
    _write(files.cert_pem, cert.public_bytes(serialization.Encoding.PEM) + ca_bytes, 0o644)
    _write(files.ca_pem, ca_bytes, 0o644)   # last: its presence marks a complete set
    return files


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def make_client_certificate(common_name: str = "defender-sync-app", key_size: int = 2048) -> ClientCertificate:
    """A self-signed RSA certificate for an app registration (``CertificateCredential`` signs RS256/PS256 with it)."""
    now = dt.datetime.now(dt.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return ClientCertificate(
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        sha1_thumbprint=cert.fingerprint(hashes.SHA1()).hex(),
        sha256_thumbprint=cert.fingerprint(hashes.SHA256()).hex(),
    )
