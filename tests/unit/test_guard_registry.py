"""The guard registry is the one list of guards: the handshake pipeline, reload enforcement and ``wsgate
explain`` all walk it, and every entry declares what each of them needs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from proxy.errors import Rejection
from proxy.explain import explain
from proxy.guards.base import LiveSession, OfflineGuard, TrafficGuard, rejudges, undeclared
from proxy.guards.context import HandshakeContext, Identity
from proxy.guards.registry import GUARDS, checked
from proxy.policy.load import parse_policy
from proxy.policy.model import Policy, Route
from proxy.reload import refusal_for
from proxy.request import ClientCertificate

SECRET = "registry-test-secret-0123456789-abcdefghij"

POLICY = """\
version: 1
listen: {address: "127.0.0.1:0"}
firewall: {default: allow, rules: [{deny: 203.0.113.0/24}]}
auth:
  main: {algorithms: [HS256], secret_env: WSGATE_REGISTRY_SECRET, required_claims: {scope: chat}}
  other: {algorithms: [HS256], secret_env: WSGATE_REGISTRY_SECRET}
revoked: {subjects: [mallory]}
limits: {handshakes_per_ip: 5/s, connections_per_ip: 3, connections_per_subject: 2}
routes:
  - path: /chat
    upstream: ws://chat.internal:8000/
    auth: main
    origins: ["https://app.test"]
  - path: /open
    upstream: ws://open.internal:8000/
    auth: none
"""


@pytest.fixture
def policy(monkeypatch: pytest.MonkeyPatch) -> Policy:
    monkeypatch.setenv("WSGATE_REGISTRY_SECRET", SECRET)
    return parse_policy(POLICY)


@dataclass
class Live:
    """What a live session proved at its handshake."""

    request_path: str = "/chat"
    client_ip: str = "198.51.100.7"
    origin: str | None = "https://app.test"
    identity: Identity | None = None
    host: str | None = None
    client_certificate: ClientCertificate | None = None


def identity(subject: str = "alice", provider: str = "main", **claims: object) -> Identity:
    return Identity(provider, subject, None, None, "fingerprint", "header", {"scope": "chat", **claims})


def test_every_guard_declares_its_name_its_reload_verdict_and_its_explain_text() -> None:
    assert len({guard.name for guard in GUARDS}) == len(GUARDS)
    for guard in GUARDS:
        assert undeclared(guard) == [], guard
        # exactly one of: it judges live sessions again, or it says why it does not
        assert rejudges(guard) != bool(guard.not_rejudged), guard
        # its explain text: what a pass means, or the configured values of a limit explain cannot judge
        assert isinstance(guard, OfflineGuard | TrafficGuard), guard


def test_a_guard_that_does_not_say_what_reload_does_with_it_is_refused() -> None:
    class Silent(OfflineGuard):
        name = "silent"

        def check(self, context: HandshakeContext) -> Rejection | None:
            return None

        def passed(self, context: HandshakeContext) -> str:
            return ""

    with pytest.raises(TypeError, match="Silent: must either override rejudge or say in not_rejudged"):
        checked((*GUARDS, Silent()))

    class Both(Silent):
        name = "both"
        not_rejudged = "no reason"

        def rejudge(self, session: LiveSession, route: Route, policy: Policy) -> str | None:
            return None

    with pytest.raises(TypeError, match="Both: must either"):
        checked((Both(),))

    class Declared(Silent):
        name = "declared"
        not_rejudged = "judged once"

    assert checked((*GUARDS, Declared()))[-1].name == "declared"
    with pytest.raises(TypeError, match="another guard is named 'firewall'"):
        checked((*GUARDS, type("Twin", (Declared,), {"name": "firewall"})()))


def test_a_guard_without_explain_text_cannot_be_made() -> None:
    class Mute(OfflineGuard):
        name = "mute"
        not_rejudged = "judged once"

        def check(self, context: HandshakeContext) -> Rejection | None:
            return None

    class Unmeasured(TrafficGuard):
        name = "unmeasured"
        not_rejudged = "judged once"

        def check(self, context: HandshakeContext) -> Rejection | None:
            return None

    for guard_class in (Mute, Unmeasured):
        with pytest.raises(TypeError, match="abstract"):
            guard_class()


async def test_explain_prints_one_step_per_guard_in_registry_order(policy: Policy) -> None:
    names = [guard.name for guard in GUARDS]
    admitted = await explain(policy, "/open", "198.51.100.7")
    assert admitted.admitted
    assert [step.guard for step in admitted.steps] == names
    rendered = [line.split(". ", 1)[1] for line in admitted.render().splitlines() if line.startswith("  ")]
    assert [line[:24].rstrip() for line in rendered] == names
    refused = await explain(policy, "/chat", "203.0.113.9")
    assert (refused.status, refused.reason) == (403, "firewall")
    assert [step.guard for step in refused.steps] == names
    assert [step.verdict for step in refused.steps[names.index("firewall") + 1 :]] == ["not reached"] * (
        len(names) - names.index("firewall") - 1
    )


def test_reload_asks_every_guard_that_rejudges_in_registry_order(policy: Policy) -> None:
    class Refuses(OfflineGuard):
        name = "refuses"

        def check(self, context: HandshakeContext) -> Rejection | None:
            return None

        def rejudge(self, session: LiveSession, route: Route, policy: Policy) -> str | None:
            return "refuses"

        def passed(self, context: HandshakeContext) -> str:
            return ""

    class NeverAsked(Refuses):
        name = "never asked"
        not_rejudged = "judged once"

        def rejudge(self, session: LiveSession, route: Route, policy: Policy) -> str | None:
            raise AssertionError("a guard that does not rejudge is not asked")

    session = Live(identity=identity())
    assert refusal_for(session, policy) is None
    assert refusal_for(session, policy, (NeverAsked(), *GUARDS)) is None
    assert refusal_for(session, policy, (*GUARDS, Refuses())) == "refuses"
    # registry order: the firewall is asked before the appended guard
    assert refusal_for(Live(client_ip="203.0.113.1"), policy, (*GUARDS, Refuses())) == "firewall"


@pytest.mark.parametrize(
    ("session", "why"),
    [
        (Live(request_path="/gone", identity=identity()), "route removed"),
        (Live(client_ip="203.0.113.1", identity=identity()), "firewall"),
        (Live(origin="https://evil.test", identity=identity()), "origin"),
        (Live(identity=None), "auth"),
        (Live(identity=identity(provider="other")), "auth"),
        (Live(identity=identity(scope="read")), "claims"),
        (Live(identity=identity("mallory")), "revoked"),
        (Live(request_path="/open", identity=identity("mallory", "other")), "revoked"),
        (Live(request_path="/open", origin=None), None),
    ],
)
def test_why_the_policy_refuses_a_live_session(policy: Policy, session: Live, why: str | None) -> None:
    assert refusal_for(session, policy) == why


def test_a_route_of_several_providers_judges_each_session_by_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGATE_REGISTRY_SECRET", SECRET)
    policy = parse_policy(
        """\
version: 1
listen: {address: "127.0.0.1:0"}
auth:
  staff:
    {algorithms: [HS256], issuer: https://staff.test, audiences: [app], secret_env: WSGATE_REGISTRY_SECRET}
  partners:
    algorithms: [HS256]
    issuer: https://partners.test
    secret_env: WSGATE_REGISTRY_SECRET
    revoked: {token_ids: [t1]}
  former: {algorithms: [HS256], issuer: https://former.test, secret_env: WSGATE_REGISTRY_SECRET}
routes:
  - {path: /chat, upstream: "ws://chat.internal:8000/", auth: [staff, partners]}
"""
    )

    def session(provider: str, token_id: str = "t1", **claims: object) -> Live:
        issuer = {"staff": "https://staff.test", "partners": "https://partners.test"}.get(provider)
        given = {"iss": issuer, "aud": "app", **claims}
        return Live(identity=Identity(provider, "42", token_id, None, "fingerprint", "header", given))

    assert refusal_for(session("staff"), policy) is None  # t1 is revoked on partners only
    assert refusal_for(session("partners"), policy) == "revoked"
    assert refusal_for(session("partners", "t2"), policy) is None
    assert refusal_for(session("former", "t2"), policy) == "auth"  # not one of the route's providers
    assert refusal_for(session("staff", aud="other"), policy) == "auth"  # staff wants aud app
    assert refusal_for(session("staff", iss="https://partners.test"), policy) == "auth"
