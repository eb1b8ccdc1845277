"""TLS for the device listeners: the project's own certificate authority (``fishchat-iot
certs``), certificates issued by it, and the server-side ``ssl`` contexts.

Layout under ``{data_dir}/certs/`` (``tls.cert``, ``tls.key`` and ``tls.ca`` may point
elsewhere): ``ca.pem`` + ``ca.key`` (the CA), ``server.pem`` + ``server.key``, and
``devices/ID.pem`` + ``devices/ID.key``. Keys are written mode 0600.

A client certificate is optional on the TLS listeners; when one is presented it must
chain to the CA and be within its validity, else the handshake fails. Its subject CN is
then the device id it may log in as without a token (docs/security.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fishchat_iot.files import PRIVATE, PUBLIC, write_atomic

CA_DAYS = 3650
CERT_DAYS = 825


class TlsError(Exception):
    """A TLS file problem, phrased for the operator (one line)."""


@dataclass
class TlsPaths:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path
    devices: Path


def paths(certs_dir: Path, cert: str = "", key: str = "", ca: str = "") -> TlsPaths:
    return TlsPaths(
        ca_cert=Path(ca) if ca else certs_dir / "ca.pem",
        ca_key=certs_dir / "ca.key",
        cert=Path(cert) if cert else certs_dir / "server.pem",
        key=Path(key) if key else certs_dir / "server.key",
        devices=certs_dir / "devices",
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(p: TlsPaths, name: str = "FishChat IoT CA", days: int = CA_DAYS) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(p.ca_key, _key_pem(key), PRIVATE, sync=True)
    write_atomic(p.ca_cert, _cert_pem(cert), PUBLIC, sync=True)
    return cert


def load_ca(p: TlsPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(p.ca_key.read_bytes(), None)
    except FileNotFoundError as exc:
        raise TlsError(
            f"no CA at {exc.filename}: create one with 'fishchat-iot certs init'"
        ) from None
    except ValueError as exc:
        raise TlsError(f"cannot read the CA in {p.ca_cert.parent}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{p.ca_key}: not an EC private key")
    return cert, key


def issue(
    p: TlsPaths,
    common_name: str,
    *,
    server: bool,
    hosts: list[str] | None = None,
    not_before: datetime.datetime | None = None,
    days: int = CERT_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate signed by the CA (server: with SANs for ``hosts``; device: client
    auth, CN = the device id). ``not_before``/``days`` let tests make expired ones."""
    ca_cert, ca_key = load_ca(p)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - datetime.timedelta(minutes=5))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        names: list[x509.GeneralName] = []
        for h in hosts or ["localhost", "127.0.0.1"]:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert, key


def write_pair(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path
) -> None:
    write_atomic(key_path, _key_pem(key), PRIVATE, sync=True)
    write_atomic(cert_path, _cert_pem(cert), PUBLIC, sync=True)


def server_context(p: TlsPaths) -> ssl.SSLContext:
    """Server side: our certificate, TLS 1.2+, client certificates optional and verified
    against the CA when presented."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for what, path in (("certificate", p.cert), ("key", p.key), ("CA certificate", p.ca_cert)):
        if not path.exists():
            raise TlsError(
                f"TLS {what} {path} does not exist: run 'fishchat-iot certs init' and "
                "'fishchat-iot certs issue server', or set tls.cert / tls.key / tls.ca"
            )
    try:
        ctx.load_cert_chain(p.cert, p.key)
        ctx.load_verify_locations(cafile=str(p.ca_cert))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"cannot load the TLS files ({p.cert}, {p.key}, {p.ca_cert}): {exc}"
        ) from None
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def peer_cn(extra: Any) -> str | None:
    """The subject CN of a verified peer certificate (``get_extra_info("peercert")``)."""
    if not extra:
        return None
    for rdn in extra.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
