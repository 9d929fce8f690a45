"""Listening sockets and an accept loop that survives running out of file descriptors.

wsgate accepts connections itself (on the client and the admin listener) instead of leaving it to
``loop.create_server``, because neither loop handles a full file table well:

* asyncio keeps calling ``accept()`` after ``EMFILE`` for the rest of its batch of ``backlog`` tries, and
  every try calls the exception handler and schedules another retry in 1 s (CPython gh-151615, fixed in
  2026): the retries multiply, the loop spins, and each try logs a traceback;
* uvloop (libuv) accepts and closes every waiting connection with a spare descriptor, silently; when that
  spare is gone, uvloop closes the listening socket for good, also silently.

Here, an accept that fails for want of descriptors or memory stops accepting on that socket for
:data:`ACCEPT_RETRY_SECONDS` (the kernel keeps the clients in its backlog meanwhile) and then tries again:
no busy loop, and it resumes by itself. One warning is logged when an episode starts and one line when
accepting works again; every failed ``accept()`` is counted through ``on_error``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass

from proxy import logs
from proxy.policy.model import Address

#: Connections accepted per readable event, so that one busy listener cannot starve the rest of the loop.
ACCEPT_BATCH = 128
#: How long accepting pauses after it failed for want of descriptors or memory.
ACCEPT_RETRY_SECONDS = 0.5

#: ``reason`` label of accept errors that pause accepting.
FD_EXHAUSTED = "fd_exhausted"
OUT_OF_MEMORY = "out_of_memory"
OTHER_ERROR = "error"
_PAUSING = {
    errno.EMFILE: FD_EXHAUSTED,
    errno.ENFILE: FD_EXHAUSTED,
    errno.ENOBUFS: OUT_OF_MEMORY,
    errno.ENOMEM: OUT_OF_MEMORY,
}
#: Errors Linux's accept(2) passes on from the connection being accepted: that one is gone, the next is not.
_CONNECTION_GONE = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        getattr(errno, "ENONET", errno.ENETDOWN),
    }
)


async def bind_sockets(address: Address, backlog: int, listen: bool = True) -> list[socket.socket]:
    """Listening, non-blocking sockets for every address ``address.host`` resolves to, as
    ``loop.create_server`` would bind them (``SO_REUSEADDR``; IPv6 sockets IPv6 only), plus
    ``SO_REUSEPORT``: a second wsgate (the next one, during a restart, or a sibling worker) can listen on
    the same address while this one runs, and the kernel spreads new connections over all of them. A
    socket that holds the address without ``SO_REUSEPORT`` still makes the bind fail.

    With ``listen=False`` the sockets are bound only: they hold the address (and the port chosen for
    port 0) for processes that will listen on it, and receive no connections themselves.

    Raises:
        OSError: the name does not resolve, or an address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):  # not on every platform; Linux and the BSDs have it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            if listen:
                sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass(slots=True)
class _Episode:
    """Accepting has been failing since ``started`` (loop time)."""

    reason: str
    started: float
    failures: int = 0


class Acceptor:
    """Accepts connections on the listening sockets of the listener ``name`` (``client``, ``admin``) and
    hands each new, non-blocking socket to ``on_accept``.

    ``on_error(name, reason)`` is called for every ``accept()`` that failed and paused accepting
    (``reason``: :data:`FD_EXHAUSTED`, :data:`OUT_OF_MEMORY` or :data:`OTHER_ERROR`).
    """

    def __init__(
        self,
        name: str,
        sockets: list[socket.socket],
        on_accept: Callable[[socket.socket], None],
        on_error: Callable[[str, str], None],
    ) -> None:
        self.name = name
        self.sockets = sockets
        self._on_accept = on_accept
        self._on_error = on_error
        self._loop = asyncio.get_running_loop()
        self._retries: dict[socket.socket, asyncio.TimerHandle] = {}
        self._episode: _Episode | None = None
        self._serving = False

    @property
    def serving(self) -> bool:
        """Whether it accepts (or will again, after a pause)."""
        return self._serving

    @property
    def address(self) -> tuple[str, int]:
        """The first socket's host and port (the port chosen for port 0)."""
        host, port = self.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._serving = True
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and close the listening sockets (accepted connections are not touched)."""
        if not self._serving:
            return
        self._serving = False
        for sock in self.sockets:
            retry = self._retries.pop(sock, None)
            if retry is not None:
                retry.cancel()
            else:
                self._loop.remove_reader(sock.fileno())
            sock.close()

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _CONNECTION_GONE:
                    continue
                self._pause(sock, error)
                return
            if self._episode is not None:
                self._resumed(self._episode)
            connection.setblocking(False)
            try:
                self._on_accept(connection)
            except BaseException:
                connection.close()  # the connection is refused, not leaked; the error goes on
                raise

    def _pause(self, sock: socket.socket, error: OSError) -> None:
        self._loop.remove_reader(sock.fileno())
        self._retries[sock] = self._loop.call_later(ACCEPT_RETRY_SECONDS, self._retry, sock)
        reason = _PAUSING.get(error.errno or 0, OTHER_ERROR)
        self._on_error(self.name, reason)
        if self._episode is None:
            self._episode = _Episode(reason, self._loop.time())
            fields = {
                "listener": self.name,
                "error": (error.strerror or str(error)).lower(),
                "errno": errno.errorcode.get(error.errno or 0, str(error.errno)),
                "retry_every_s": ACCEPT_RETRY_SECONDS,
            }
            if reason == FD_EXHAUSTED:
                logs.event(
                    "listener.fd_exhausted",
                    logging.WARNING,
                    **fields,
                    nofile_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                )
            else:
                logs.event("listener.accept_failed", logging.WARNING, reason=reason, **fields)
        self._episode.failures += 1

    def _retry(self, sock: socket.socket) -> None:
        del self._retries[sock]
        self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _resumed(self, episode: _Episode) -> None:
        self._episode = None
        logs.event(
            "listener.accept_resumed",
            listener=self.name,
            reason=episode.reason,
            paused_s=round(self._loop.time() - episode.started, 3),
            failed_accepts=episode.failures,
        )
