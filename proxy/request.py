"""The parsed upgrade request, as the listener hands it to the handshake pipeline and its guards."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy.headers import header_list, header_value, header_values


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
