"""Test certificates (the `cryptography` package): a CA, a server certificate for 127.0.0.1
and localhost, a client certificate, and an unrelated CA, as PEM files."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name: str, issuer=None, issuer_key=None, ca: bool = False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        return cert, key

    def write(stem: str, cert, key) -> None:
        (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))

    ca, ca_key = make("test CA", ca=True)
    write("ca", ca, ca_key)
    write("server", *make("127.0.0.1", ca.subject, ca_key,
                          san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]))
    write("client", *make("baichuan-audio", ca.subject, ca_key))
    other, other_key = make("another CA", ca=True)
    write("other-ca", other, other_key)
    return {n: folder / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key", "other-ca.crt")}
