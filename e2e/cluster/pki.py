"""The local cluster's PKI: one CA, the API server's serving cert, client certs, the service-account key.

ECDSA P-256 keys keep generation in the milliseconds; the service-account signing key is RSA because every
client library verifies RS256 tokens.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Names a pod may use to reach the API server; the first address of the service range is the `kubernetes`
# Service's ClusterIP.
APISERVER_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
APISERVER_IPS = ("127.0.0.1", "10.0.0.1")
VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate: file stem, user name (CN) and groups (O)."""

    stem: str
    user: str
    groups: tuple[str, ...] = ()


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    lifetime: dt.timedelta,
    *,
    ca: bool,
) -> x509.CertificateBuilder:
    """A certificate for ``key``, valid from five minutes ago (clock skew) for ``lifetime``: a CA signs
    certificates; any other one signs only TLS handshakes."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=ca,
                crl_sign=ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


class PKI:
    """Creates (once) and locates the cluster's certificates under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def ca_cert(self) -> Path:
        return self.path("ca.crt")

    @property
    def ca_key(self) -> Path:
        return self.path("ca.key")

    def cert(self, stem: str) -> Path:
        return self.path(f"{stem}.crt")

    def key(self, stem: str) -> Path:
        return self.path(f"{stem}.key")

    def ensure(self, clients: list[ClientIdentity]) -> None:
        """Create what is missing: CA, serving cert, SA key pair and each client cert."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.ca_cert.exists() and self.ca_key.exists()):
            self._create_ca()
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        if not self.cert("apiserver").exists():
            self._issue(ca_cert, ca_key, "apiserver", "kube-apiserver", (), server=True)
        for client in clients:
            if not self.cert(client.stem).exists():
                self._issue(ca_cert, ca_key, client.stem, client.user, client.groups, server=False)
        if not self.path("sa.key").exists():
            sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_key(self.path("sa.key"), sa_key)
            self.path("sa.pub").write_bytes(
                sa_key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )

    def serving_cert(self, stem: str, common_name: str) -> tuple[Path, Path]:
        """(certificate, key) of a serving certificate for a local server (SANs: 127.0.0.1, localhost and the
        API server's names), signed by the cluster's CA; created once."""
        if not self.cert(stem).exists():
            ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
            assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
            ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
            self._issue(ca_cert, ca_key, stem, common_name, (), server=True)
        return self.cert(stem), self.key(stem)

    def _create_ca(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-local-ca")])
        cert = (
            _builder(name, name, key, 10 * VALIDITY, ca=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_key(self.ca_key, key)
        _write_cert(self.ca_cert, cert)

    def _issue(
        self,
        ca_cert: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
        stem: str,
        common_name: str,
        groups: tuple[str, ...],
        *,
        server: bool,
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        builder = (
            _builder(x509.Name(attrs), ca_cert.subject, key, VALIDITY, ca=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if server:
            sans: list[x509.GeneralName] = [x509.DNSName(n) for n in APISERVER_DNS_NAMES]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in APISERVER_IPS]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_key(self.key(stem), key)
        _write_cert(self.cert(stem), cert)
