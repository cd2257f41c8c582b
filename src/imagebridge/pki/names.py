"""How a certificate names a gateway: the institution code and the gateway's name.

A gateway certificate's subject is ``O=<institution code>, OU=ImageBridge gateway,
CN=<gateway name>``: the same pair the hub's directory knows the gateway's token by, so the
hub can check that a token is used only with its own gateway's certificate.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

GATEWAY_UNIT = "ImageBridge gateway"


@dataclass(frozen=True)
class GatewayName:
    institution: str
    name: str

    def __str__(self) -> str:
        return f"{self.institution}/{self.name}"


def gateway_subject(gateway: GatewayName) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, gateway.institution),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, GATEWAY_UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, gateway.name),
        ]
    )


def gateway_of(certificate: x509.Certificate) -> GatewayName | None:
    """The gateway a certificate names, or None if it is no gateway certificate."""
    subject = certificate.subject

    def one(oid: x509.ObjectIdentifier) -> str | None:
        values = subject.get_attributes_for_oid(oid)
        return str(values[0].value) if len(values) == 1 else None

    institution = one(NameOID.ORGANIZATION_NAME)
    name = one(NameOID.COMMON_NAME)
    if one(NameOID.ORGANIZATIONAL_UNIT_NAME) != GATEWAY_UNIT or not institution or not name:
        return None
    return GatewayName(institution, name)
