"""Client certificates (mTLS): a route that requires one, and the subjects it allows.

The TLS handshake already verified any certificate a client sent against ``listen.tls.client_ca`` (one
that does not verify ends the handshake), so this guard only asks whether the route needs a certificate
the connection lacks, or one whose subject is not on its ``client_subjects`` list. Both are 403
``client_certificate``. A route without these keys passes every connection, with a certificate or not.
"""

from __future__ import annotations

from proxy.errors import CLIENT_CERTIFICATE_MISSING, CLIENT_SUBJECT_REFUSED, Rejection
from proxy.guards.base import LiveSession, OfflineGuard
from proxy.guards.context import HandshakeContext
from proxy.policy.model import Policy, Route
from proxy.request import ClientCertificate


def certificate_refusal(route: Route, certificate: ClientCertificate | None) -> Rejection | None:
    """Why ``route`` refuses a connection with this verified certificate (or none); None: it passes.
    Used at the handshake and again for live sessions on reload."""
    if not route.requires_certificate:
        return None
    if certificate is None:
        return CLIENT_CERTIFICATE_MISSING()
    if route.client_subjects and not any(
        pattern.matches(certificate.subject, certificate.common_names) for pattern in route.client_subjects
    ):
        return CLIENT_SUBJECT_REFUSED()
    return None


class ClientCertificateGuard(OfflineGuard):
    name = "client certificate"

    def check(self, context: HandshakeContext) -> Rejection | None:
        """403 ``client_certificate``: the route needs a verified certificate and the connection has none,
        or its subject is not one the route allows."""
        return certificate_refusal(context.route, context.request.client_certificate)

    def rejudge(self, session: LiveSession, route: Route, policy: Policy) -> str | None:
        refused = certificate_refusal(route, session.client_certificate)
        return None if refused is None else "client certificate"

    def passed(self, context: HandshakeContext) -> str:
        certificate = context.request.client_certificate
        if certificate is None:
            return "no certificate required on this route"
        if not context.route.requires_certificate:
            return f"{certificate.subject} (none required on this route)"
        if context.route.client_subjects:
            return f"{certificate.subject} (an allowed subject)"
        return certificate.subject
