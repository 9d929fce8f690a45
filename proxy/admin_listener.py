"""How an admin listener accepts its connections, for the gateway's admin and the supervisor's.

aiohttp bounds neither the number of connections nor the time a client takes to send its request's
headers: a client trickling headers on many connections (a slowloris) would hold them, and their file
descriptors, for ever, and the process would then have none left for client sessions. Here an admin
listener holds at most :data:`ADMIN_MAX_CONNECTIONS` connections at once, each open at most
:data:`ADMIN_CONNECTION_SECONDS` (a scraper or a probe needs far less; keep-alive ones reconnect), and
its connections are accepted by :class:`~proxy.accept.Acceptor`, so running out of descriptors pauses
accepting instead of spinning the loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import cast

from aiohttp import web

from proxy import logs
from proxy.accept import Acceptor, bind_sockets
from proxy.policy.model import Address

#: Admin connections the kernel may queue (scrapers and probes, a few at a time).
ADMIN_BACKLOG = 128
#: Admin connections open at once, and how long one may stay open.
ADMIN_MAX_CONNECTIONS = 64
ADMIN_CONNECTION_SECONDS = 30.0


def _uncounted(listener: str, reason: str) -> None:
    """For a listener whose failed accepts no metric counts (the supervisor's)."""


class AdminListener:
    """Serves an aiohttp ``runner`` (set up) on an address, with the bounds above."""

    def __init__(
        self,
        runner: web.AppRunner,
        name: str = "admin",
        on_accept_error: Callable[[str, str], None] = _uncounted,
    ) -> None:
        self._runner = runner
        self._name = name
        self._on_accept_error = on_accept_error
        self._acceptor: Acceptor | None = None
        self._connecting: set[asyncio.Task[object]] = set()
        #: Connections open, with when each must be closed by; whether accepting is at its cap.
        self._open: dict[asyncio.Transport, float] = {}
        self._full = False
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, address: Address) -> Address:
        """Listen on ``address``; the address bound (useful with port 0).

        Raises:
            OSError: the address cannot be bound.
        """
        sockets = await bind_sockets(address, ADMIN_BACKLOG)
        self._acceptor = Acceptor(self._name, sockets, self._accepted, self._on_accept_error)
        self._acceptor.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_periodically())
        return Address(*self._acceptor.address)

    def close(self) -> None:
        """Stop accepting, and drop the connections still being set up (the runner's cleanup closes the
        others)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        for task in list(self._connecting):
            task.cancel()

    def _accepted(self, sock: socket.socket) -> None:
        server = self._runner.server
        if server is None:  # stopping
            sock.close()
            return
        if len(self._open) + len(self._connecting) >= ADMIN_MAX_CONNECTIONS:
            self._sweep(time.monotonic())
            if len(self._open) + len(self._connecting) >= ADMIN_MAX_CONNECTIONS:
                if not self._full:
                    self._full = True
                    logs.event(
                        "admin.connections_full",
                        logging.WARNING,
                        listener=self._name,
                        limit=ADMIN_MAX_CONNECTIONS,
                    )
                sock.close()
                return
        self._full = False
        loop = asyncio.get_running_loop()
        task: asyncio.Task[object] = loop.create_task(loop.connect_accepted_socket(server, sock))
        self._connecting.add(task)
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[object]) -> None:
        self._connecting.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, OSError):  # OSError: the scraper left at once
            logs.LOGGER.error("admin.error", exc_info=error)
        if not task.cancelled() and error is None:
            transport = cast("tuple[asyncio.Transport, object]", task.result())[0]
            self._open[transport] = time.monotonic() + ADMIN_CONNECTION_SECONDS

    def _sweep(self, now: float) -> None:
        """Forget closed connections; cut those open past their lifetime."""
        for transport, deadline in list(self._open.items()):
            if transport.is_closing():
                del self._open[transport]
            elif now >= deadline:
                transport.abort()
                del self._open[transport]

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(ADMIN_CONNECTION_SECONDS / 6)
            self._sweep(time.monotonic())
