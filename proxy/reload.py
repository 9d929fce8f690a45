"""Live policy reload: watch the file (and SIGHUP), load, swap atomically, enforce on live sessions.

A reload either applies a whole valid policy or changes nothing: an invalid file is refused with the same
``file:line: key: message`` as ``wsgate check`` and the running policy stays; a change of a listener address
(or its TLS files) needs a restart and is refused as a whole rather than half-applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from proxy import logs
from proxy.errors import POLICY_CHANGED, PolicyError
from proxy.guards.base import Guard, LiveSession
from proxy.guards.registry import GUARDS
from proxy.metrics import Metrics
from proxy.policy.load import load_policy
from proxy.policy.model import Policy
from proxy.sessions import Session


def refusal_for(session: LiveSession, policy: Policy, guards: tuple[Guard, ...] = GUARDS) -> str | None:
    """Why ``policy`` would refuse this live session now (None: it may go on).

    The route must still exist; then every guard of the registry that judges live sessions again does,
    in registry order, from what the session proved at its handshake (its address, Origin, identity).
    The others say why they do not (:attr:`~proxy.guards.base.Guard.not_rejudged`): rates and caps bound
    future handshakes, and an upgraded session stays upgraded.
    """
    route = policy.match_route(session.request_path, session.host)
    if route is None:
        return "route removed"
    for guard in guards:
        if guard.not_rejudged is None:
            why = guard.rejudge(session, route, policy)
            if why is not None:
                return why
    return None


def enforce(sessions: Iterable[Session], policy: Policy) -> int:
    """Close every live session ``policy`` would refuse (1008 "policy changed", both sides).

    Returns:
        How many sessions were closed.
    """
    closed = 0
    for session in sessions:
        if session.finished:
            continue
        why = refusal_for(session, policy)
        if why is None:
            continue
        logs.event(
            "session.policy_refused",
            request_id=session.request_id,
            client_ip=session.client_ip,
            route=session.route.path,
            provider=session.identity.provider if session.identity is not None else None,
            why=why,
        )
        session.close(POLICY_CHANGED)
        closed += 1
    return closed


def referenced_files(policy: Policy) -> list[Path]:
    """Files the policy reads besides itself: a change to any of them is a change of the policy."""
    files: list[Path] = []
    if policy.listen.tls is not None:
        for pair in policy.listen.tls.pairs:
            files += [Path(pair.cert_file), Path(pair.key_file)]
        if policy.listen.tls.client_ca is not None:
            files.append(Path(policy.listen.tls.client_ca))
    files += [provider.public_key_file for provider in policy.auth if provider.public_key_file is not None]
    for route in policy.routes:
        tls = route.upstream_tls
        if tls is not None:
            files += [file for file in (tls.ca_file, tls.cert_file, tls.key_file) if file is not None]
        for rules in (route.client_rules, route.upstream_rules):
            if rules is not None and rules.schema_file is not None:
                files.append(rules.schema_file)
    return files


def same_policy(old: Policy, new: Policy) -> bool:
    """Whether ``new`` would change nothing: same content once loaded (referenced files included)."""
    return dataclasses.replace(new, sha256=old.sha256) == old


def restart_needed(old: Policy, new: Policy) -> str | None:
    """What in ``new`` cannot be applied to a running process, if anything."""
    if new.listen != old.listen:
        return "listen changed (address, TLS or PROXY protocol): restart wsgate to apply it"
    if new.admin != old.admin:
        return "admin.address changed: restart wsgate to apply it"
    return None


class Reloader:
    """Reloads one policy file when it, or a file it references, changes on disk (polled), or when asked
    (SIGHUP).

    ``apply`` swaps the new policy in and enforces it; it is called only with a valid policy whose
    listeners match the running ones, and that ``vet`` (when given) finds nothing against: ``vet`` says why
    this process refuses a policy that is valid in itself (a worker of several, limits it cannot share).
    """

    def __init__(
        self,
        path: Path,
        current: Callable[[], Policy],
        apply: Callable[[Policy], int],
        metrics: Metrics,
        interval: float = 1.0,
        files_changed: Callable[[], None] | None = None,
        vet: Callable[[Policy], str | None] | None = None,
    ) -> None:
        self.path = path
        self._vet = vet
        self._current = current
        self._apply = apply
        self._files_changed = files_changed
        self._metrics = metrics
        self.interval = interval
        self._signature = self._stat()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        """Modification time, size and inode of the policy file and of every file it references."""
        signature: list[tuple[int, int, int] | None] = []
        for file in (self.path, *referenced_files(self._current())):
            try:
                stat = os.stat(file)
            except OSError:
                signature.append(None)
            else:
                signature.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(signature)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            signature = self._stat()
            if signature != self._signature:
                await self.reload("file changed")

    async def reload(self, trigger: str) -> bool:
        """Load the file and apply it if valid and different; return whether a new policy is active."""
        async with self._lock:
            try:
                return self._reload(trigger)
            except Exception as error:  # noqa: BLE001 - whatever a file does, the running policy stays
                logs.LOGGER.exception("policy.reload_error", extra={"fields": {"trigger": trigger}})
                return self._refuse(trigger, f"{self.path}: {type(error).__name__}: {error}")
            finally:
                self._signature = self._stat()

    def _reload(self, trigger: str) -> bool:
        current = self._current()
        try:
            new = load_policy(self.path)
        except PolicyError as error:
            return self._refuse(trigger, str(error))
        if same_policy(current, new):
            # The same policy; its certificate files may still have new contents (rotated in place).
            if self._files_changed is not None:
                self._files_changed()
            logs.event("policy.unchanged", trigger=trigger, policy_sha256=current.sha256[:12])
            return False
        problem = restart_needed(current, new)
        if problem is not None:
            return self._refuse(trigger, f"{self.path}: {problem}", restart_required=True)
        refused = self._vet(new) if self._vet is not None else None
        if refused is not None:
            return self._refuse(trigger, refused)
        closed = self._apply(new)
        if self._files_changed is not None:
            self._files_changed()
        self._metrics.reload_result("success")
        logs.event(
            "policy.reloaded",
            trigger=trigger,
            policy_sha256=new.sha256[:12],
            previous_sha256=current.sha256[:12],
            routes=[route.path for route in new.routes],
            sessions_closed=closed,
        )
        return True

    def _refuse(self, trigger: str, error: str, restart_required: bool = False) -> bool:
        self._metrics.reload_result("error")
        logs.event(
            "policy.reload_failed",
            logging.ERROR,
            trigger=trigger,
            error=error,
            restart_required=restart_required,
            running_sha256=self._current().sha256[:12],
        )
        return False
