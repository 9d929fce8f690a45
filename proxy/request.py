"""The parsed upgrade request, as the listener hands it to the handshake pipeline and its guards."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from proxy.headers import header_list, header_value, header_values
from proxy.policy.values import routing_host


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A client certificate the TLS handshake verified against ``listen.tls.client_ca``: what routes
    judge (``client_certificate``, ``client_subjects``), forward and log."""

    #: The subject as RFC 4514 text, most specific first (``CN=alice,O=Example``).
    subject: str
    common_names: tuple[str, ...]
    #: Hex of the sha256 of the certificate's DER.
    sha256: str

    @classmethod
    def from_der(cls, der: bytes) -> ClientCertificate:
        """Raises ValueError for bytes that are not a DER certificate."""
        certificate = x509.load_der_x509_certificate(der)
        return cls._of(certificate, der)

    @classmethod
    def from_pem(cls, pem: bytes) -> ClientCertificate:
        """The first certificate of a PEM file (``wsgate explain --client-cert``). Raises ValueError."""
        certificate = x509.load_pem_x509_certificate(pem)
        return cls._of(certificate, certificate.public_bytes(Encoding.DER))

    @classmethod
    def _of(cls, certificate: x509.Certificate, der: bytes) -> ClientCertificate:
        names = tuple(
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        )
        return cls(certificate.subject.rfc4514_string(), names, hashlib.sha256(der).hexdigest())


@dataclass(slots=True)
class HandshakeRequest:
    """An HTTP upgrade request as the guards see it. Header names are lower case."""

    request_id: str
    method: str
    target: str
    path: str
    query: str
    http_version: str
    headers: list[tuple[str, str]]
    peer_ip: str
    client_ip: str
    tls: bool
    #: Fingerprint of the token a guard refused, for the rejection's log line (never the token).
    token_fingerprint: str | None = None
    #: The auth provider chosen for its token, for the rejection's log line (None before one was).
    token_provider: str | None = None
    #: The client's certificate, when the TLS handshake verified one.
    client_certificate: ClientCertificate | None = None
    #: The host as routes match it (no port, lower case, no trailing dot): an absolute-form target's,
    #: else the Host header's. None when there is none, or (for a request the reader did not check) when
    #: it is not valid: only routes without a host match then. Read once, here: routing, the limits'
    #: keys and every log line of the request use it.
    host: str | None = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.host = routing_host(self.target, header_value(self.headers, "host"))
        except ValueError:
            self.host = None

    @classmethod
    def build(
        cls,
        request_id: str,
        method: str,
        target: str,
        http_version: str,
        headers: Iterable[tuple[str, str]],
        peer_ip: str,
        client_ip: str,
        tls: bool,
    ) -> HandshakeRequest:
        """Split the target into path and query; the path is matched as sent, never percent-decoded."""
        split = urlsplit(target)
        return cls(
            request_id=request_id,
            method=method,
            target=target,
            path=split.path or "/",
            query=split.query,
            http_version=http_version,
            headers=list(headers),
            peer_ip=peer_ip,
            client_ip=client_ip,
            tls=tls,
        )

    def header(self, name: str) -> str | None:
        """The first value of a header, or None."""
        return header_value(self.headers, name)

    def header_values(self, name: str) -> list[str]:
        """Every value of a header, in order."""
        return header_values(self.headers, name)

    def header_tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of every occurrence of a header, stripped and lower case."""
        return [token.lower() for token in header_list(self.headers, name)]
