"""What a handshake guard is: a name, a check, a verdict on live sessions at reload, and its explain text.

The handshake pipeline, reload enforcement and ``wsgate explain`` all walk the one ordered registry
(:data:`proxy.guards.registry.GUARDS`) and call only the hooks declared here, so a guard is in all three or
in none. What a guard must declare, and how that is enforced:

- ``name``, ``check``: a class attribute and an abstract method;
- its explain text: abstract too, through one of the two kinds below -- :class:`OfflineGuard` (judged from
  the request and the policy alone; says what a pass means) or :class:`TrafficGuard` (depends on live
  traffic; says which values are configured, since it cannot be judged offline);
- what it does with a live session when the policy changes: it overrides :meth:`Guard.rejudge`, or it sets
  :attr:`Guard.not_rejudged` to the reason it does not. :func:`undeclared` names what is missing; the
  registry refuses, at import, a guard for which it finds anything.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from proxy.errors import Rejection
from proxy.guards.context import HandshakeContext, Identity
from proxy.policy.model import Policy, Route
from proxy.request import ClientCertificate

#: What a guard's check gives: None to pass, or the refusal (possibly after an await).
Verdict = Rejection | None


class LiveSession(Protocol):
    """What a live session proved at its handshake: all a guard may judge again on reload."""

    @property
    def request_path(self) -> str: ...

    @property
    def client_ip(self) -> str: ...

    @property
    def origin(self) -> str | None: ...

    @property
    def identity(self) -> Identity | None: ...

    @property
    def host(self) -> str | None: ...

    @property
    def client_certificate(self) -> ClientCertificate | None: ...


@dataclass(frozen=True, slots=True)
class ExplainInput:
    """What ``wsgate explain`` was given besides the request itself."""

    #: Claims to judge as a verified token's would be, instead of a token (None: judge the token, if any).
    claims: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Explained:
    """One guard's line in ``wsgate explain``."""

    #: "pass", "refuse" or "not evaluated" (depends on live traffic).
    verdict: str
    detail: str = ""
    #: The refusal, when the verdict is "refuse": the answer explain reports.
    rejection: Rejection | None = None
    #: The line's name when it is not the guard's own (e.g. how the step was judged).
    name: str | None = None
    #: The step cannot be judged here (a secret that ``check`` and ``explain`` run without): the answer
    #: is undecided, and the steps after it are not reached.
    undecided: bool = False

    @classmethod
    def of(cls, verdict: Verdict, passed: str, name: str | None = None) -> Explained:
        """The line for a check's verdict: pass with ``passed`` as detail, or the refusal."""
        if verdict is None:
            return cls("pass", passed, None, name)
        return cls("refuse", f"{verdict.status} {verdict.reason}: {verdict.detail}", verdict, name)


async def run_check(guard: Guard, context: HandshakeContext) -> Verdict:
    """The guard's check, awaited when it is asynchronous."""
    outcome = guard.check(context)
    if inspect.isawaitable(outcome):
        return await outcome
    return outcome


class Guard(ABC):
    """One step of the handshake guard chain. Guards keep no state: what they share across handshakes
    (limiter, token verifiers) travels in the :class:`~proxy.guards.context.HandshakeContext`."""

    #: What ``wsgate explain`` calls the step (and what a reader of the policy calls the concern).
    name: ClassVar[str]
    #: Why the guard does not judge live sessions again when the policy changes; None when it does, by
    #: overriding :meth:`rejudge`.
    not_rejudged: ClassVar[str | None] = None

    @abstractmethod
    def check(self, context: HandshakeContext) -> Verdict | Awaitable[Verdict]:
        """Judge one handshake: None to let it go on, or the :class:`~proxy.errors.Rejection` to answer.
        A guard may record what it learnt on ``context`` (identity, limiter slots)."""

    def rejudge(self, session: LiveSession, route: Route, policy: Policy) -> str | None:
        """Why ``policy`` refuses this live session now (a short word for the log line), or None.
        ``route`` is the route ``policy`` matches for the session's path."""
        return None

    @abstractmethod
    async def explain(self, context: HandshakeContext, given: ExplainInput) -> Explained:
        """The step as ``wsgate explain`` prints it, judged without a server."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class OfflineGuard(Guard):
    """A guard that depends only on the request and the policy: ``wsgate explain`` runs its check."""

    async def explain(self, context: HandshakeContext, given: ExplainInput) -> Explained:
        verdict = await run_check(self, context)
        return Explained.of(verdict, self.passed(context) if verdict is None else "")

    @abstractmethod
    def passed(self, context: HandshakeContext) -> str:
        """What ``wsgate explain`` adds after "pass" ("" for nothing)."""


class TrafficGuard(Guard):
    """A guard that depends on live traffic (rates, connection caps): ``wsgate explain`` cannot judge it and
    reports the values configured for the route instead."""

    async def explain(self, context: HandshakeContext, given: ExplainInput) -> Explained:
        return Explained("not evaluated", self.configured(context.route, context.policy))

    @abstractmethod
    def configured(self, route: Route, policy: Policy) -> str:
        """The limits that apply to ``route``, as ``wsgate explain`` prints them."""


def rejudges(guard: Guard) -> bool:
    """Whether the guard judges live sessions again on reload (it overrides :meth:`Guard.rejudge`)."""
    return type(guard).rejudge is not Guard.rejudge


def undeclared(guard: Guard) -> list[str]:
    """What ``guard`` leaves undeclared; empty for a guard fit for the registry."""
    problems = []
    if not getattr(guard, "name", ""):
        problems.append("no name")
    if rejudges(guard) == bool(guard.not_rejudged):
        problems.append(
            "must either override rejudge or say in not_rejudged why live sessions are not judged again"
        )
    return problems
