"""The errors users can see, and the WebSocket close codes wsgate sends.

One error type per failure a user can see:

* :class:`PolicyError` -- a policy file was refused (``wsgate check``, start-up, reload);
* :class:`Rejection` -- a handshake was refused; becomes an HTTP status and a JSON body;
* :class:`UpstreamError` -- the upstream could not be reached or did not accept the WebSocket (502).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path


class CloseCode(IntEnum):
    """Close codes of RFC 6455 section 7.4.1 (and the IANA registry) that wsgate sends itself."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015


class PolicyError(Exception):
    """A policy file was refused.

    ``str(error)`` is the one line an operator needs: ``file:line: key.path: message``.
    """

    def __init__(self, file: Path | str | None, line: int | None, key_path: str, message: str) -> None:
        self.file = str(file) if file is not None else "<policy>"
        self.line = line
        self.key_path = key_path
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key_path}: {self.message}" if self.key_path else f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class Rejection(Exception):
    """A handshake refused before any byte reached the upstream.

    ``reason`` is a short, stable, low-cardinality word (``no_route``, ``bad_request``...) used in the JSON
    body, the log line and metrics labels; ``detail`` is a human sentence for the body and the log.
    """

    status: int
    reason: str
    detail: str = ""
    headers: tuple[tuple[str, str], ...] = field(default=())

    def __str__(self) -> str:
        return (
            f"{self.status} {self.reason}: {self.detail}" if self.detail else f"{self.status} {self.reason}"
        )


class StartupError(Exception):
    """The gateway could not start serving (an address in use, a permission denied); exit 1 with this."""


class UpstreamError(Exception):
    """The upstream could not be connected or refused the WebSocket upgrade; the client gets 502."""
