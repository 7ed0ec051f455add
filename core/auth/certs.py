"""A TLS client certificate as identity (``auth.peer_cert_as_username`` / ``peer_cert_as_clientid``)."""

from __future__ import annotations

import base64
import hashlib

__all__ = ["CERT_FIELDS", "cert_identity"]

CERT_FIELDS = ("", "cn", "dn", "md5", "base64")


def cert_identity(der: bytes, what: str) -> str | None:
    """The ``cn`` (common name), ``dn`` (RFC 4514 subject), ``md5`` (hex of the DER) or ``base64`` (of the
    DER) of a certificate; None when it cannot be read or has no common name."""
    if what == "md5":
        return hashlib.md5(der, usedforsecurity=False).hexdigest()
    if what == "base64":
        return base64.b64encode(der).decode()
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_der_x509_certificate(der)
        if what == "dn":
            return cert.subject.rfc4514_string()
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode(errors="replace")
