"""TLS material for the coordinator: a private CA and a server certificate it signs.

Made with `cryptography` (https://cryptography.io/en/latest/x509/tutorial/) as Flower's
SuperLink wants it (FLOWER_NOTES "TLS and node authentication", Flower docs "Enable TLS
connections"): EC P-384 keys; the CA with BasicConstraints(ca=True) and keyCertSign; the
server certificate with SubjectAlternativeName DNS/IP entries for every name clients dial,
ExtendedKeyUsage serverAuth, keys in PKCS#8 PEM (mode 0600). The same files serve the
SuperLink (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`) and our gRPC service; nodes
trust `ca.crt`.
"""

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the CA certificate and the server's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_folder(cls, folder: str | Path) -> "TlsFiles":
        """The file names `make_tls` writes in `folder`."""
        folder = Path(folder)
        return cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")

    def missing(self) -> list[Path]:
        """Files that do not exist."""
        return [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.exists()]


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_tls(
    folder: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 825
) -> TlsFiles:
    """Write ca.crt, ca.key, server.pem and server.key into `folder`; refuse to overwrite."""
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or IP address")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles.in_folder(folder)
    if existing := [p for p in (files.ca_cert, folder / "ca.key") if p.exists()]:
        raise FileExistsError(f"{existing[0]} exists; remove the folder's TLS files first")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ruvdllm coordinator CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(folder / "ca.key", _pem_key(ca_key), 0o600)
    _write(files.server_key, _pem_key(server_key), 0o600)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files
