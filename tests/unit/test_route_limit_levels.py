"""Per-route handshake limits in the policy model and in ``wsgate explain``."""

from __future__ import annotations

from proxy.explain import explain
from proxy.policy.load import parse_policy

POLICY = """\
version: 1
listen: {address: "127.0.0.1:0"}
limits: {handshakes_per_ip: 5/s, handshake_burst: 10, connections_per_ip: 3}
routes:
  - path: /both
    upstream: ws://a.internal/
    auth: none
    limits: {handshakes_per_ip: 1/s, connections_per_ip: 1, connections_per_subject: 2, idle_timeout: 1m}
  - path: /inherited
    upstream: ws://a.internal/
    auth: none
"""


def test_a_route_records_the_limits_its_own_section_set() -> None:
    both, inherited = parse_policy(POLICY).routes
    assert both.own_limits == {
        "handshakes_per_ip",
        "connections_per_ip",
        "connections_per_subject",
        "idle_timeout",
    }
    assert (both.limits.handshakes_per_ip, both.limits.handshake_burst) == (1, 10)  # the burst is inherited
    assert inherited.own_limits == frozenset()
    assert inherited.limits.handshakes_per_ip == 5


async def test_explain_shows_the_routes_own_limit_and_the_policy_wide_one() -> None:
    policy = parse_policy(POLICY)
    steps = {step.guard: step for step in (await explain(policy, "/both", "198.51.100.7")).steps}
    assert steps["handshakes per IP"].verdict == "not evaluated"
    assert steps["handshakes per IP"].detail == (
        "1/s, burst 10 on this route; 5/s, burst 10 policy-wide; depends on traffic"
    )
    assert steps["connections per IP"].detail == (
        "at most 1 on this route; at most 3 policy-wide; depends on live sessions"
    )
    assert steps["connections per subject"].detail == "at most 2 on this route; depends on live sessions"
    steps = {step.guard: step for step in (await explain(policy, "/inherited", "198.51.100.7")).steps}
    assert steps["handshakes per IP"].detail == "5/s, burst 10; depends on traffic"
    assert steps["connections per IP"].detail == "at most 3; depends on live sessions"
    assert steps["connections per subject"].detail == "no limit set"


async def test_a_route_setting_only_a_burst_has_its_own_bucket_at_the_policy_rate() -> None:
    policy = parse_policy(POLICY + "    limits: {handshake_burst: 2}\n")
    steps = {step.guard: step for step in (await explain(policy, "/inherited", "198.51.100.7")).steps}
    assert steps["handshakes per IP"].detail == (
        "5/s, burst 2 on this route; 5/s, burst 10 policy-wide; depends on traffic"
    )
