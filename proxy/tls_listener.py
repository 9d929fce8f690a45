"""The client listener's TLS: its certificates chosen by SNI, and client certificates (mTLS).

One server context per certificate, all configured alike (minimum version, client CA, verification
mode); the first is the listener's, and for a ClientHello whose SNI names another certificate's SAN
dNSName the handshake switches to that certificate's context (``SSLContext.sni_callback``). No SNI, or a
name no certificate holds, gets the first.

Guarantees:

- ``client_auth: required``: the TLS handshake fails without a certificate verified against
  ``client_ca``; ``optional``: a client may send none; in both, a certificate that does not verify
  fails the handshake (Python's ``ssl`` offers no way to accept an unverified one and judge it later);
- :func:`handshake_failure_reason` sorts a failed handshake into a low-cardinality word for the metric.
"""

from __future__ import annotations

import ssl
from functools import partial

from proxy.policy.model import CertificatePair, TlsListen
from proxy.policy.values import certificate_dns_names, host_matches

__all__ = ["handshake_failure_reason", "listener_tls_context"]

#: OpenSSL reasons that mean the client's certificate was missing or did not verify.
_CERTIFICATE_REASONS = frozenset(
    {
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "CERTIFICATE_VERIFY_FAILED",
        "NO_CERTIFICATE_RETURNED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)


def listener_tls_context(tls: TlsListen) -> ssl.SSLContext:
    """The server context the listener wraps each accepted connection with.

    Raises:
        OSError, ssl.SSLError, ValueError: a certificate, key or CA file that does not load (the loader
            checked them, so only a file changed since then).
    """
    contexts = [_context(tls, pair) for pair in tls.pairs]
    default = contexts[0]
    if len(contexts) > 1:
        # The names as the files say now: a certificate renewed in place may name other hosts.
        names = tuple(certificate_dns_names(pair.cert_file.read_bytes()) for pair in tls.pairs)
        default.sni_callback = partial(_choose, names, tuple(contexts))
    return default


def _context(tls: TlsListen, pair: CertificatePair) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(pair.cert_file, pair.key_file)
    if tls.client_auth != "none" and tls.client_ca is not None:
        context.load_verify_locations(cafile=str(tls.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED if tls.client_auth == "required" else ssl.CERT_OPTIONAL
    return context


def certificate_for(server_name: str | None, names: tuple[tuple[str, ...], ...]) -> int:
    """The index of the certificate for an SNI name, given each certificate's SAN dNSNames: the first
    holding it exactly, else the first whose wildcard covers it, else 0 (the default)."""
    if not server_name:
        return 0
    name = server_name.lower().rstrip(".")
    for index, held in enumerate(names):
        if name in held:
            return index
    for index, held in enumerate(names):
        if any(pattern.startswith("*.") and host_matches(pattern, name) for pattern in held):
            return index
    return 0


def _choose(
    names: tuple[tuple[str, ...], ...],
    contexts: tuple[ssl.SSLContext, ...],
    connection: ssl.SSLObject | ssl.SSLSocket,
    server_name: str | None,
    context: ssl.SSLContext,
) -> None:
    """The ``sni_callback``: switch the handshake to the certificate its SNI names (None: go on)."""
    index = certificate_for(server_name, names)
    if index:
        connection.context = contexts[index]


def handshake_failure_reason(error: BaseException) -> str:
    """``client_certificate`` (missing or not verified), ``timeout`` or ``error`` (anything else: a
    client that left, spoke plain HTTP, or offered nothing we accept)."""
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ssl.SSLError) and getattr(error, "reason", None) in _CERTIFICATE_REASONS:
        return "client_certificate"
    return "error"
