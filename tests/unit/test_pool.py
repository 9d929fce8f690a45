"""Pool arithmetic without sockets: rendezvous hashing moves only a leaving endpoint's keys, the order a
session tries endpoints in, passive backoff, and rise/fall counting."""

from __future__ import annotations

import time
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from proxy.metrics_merge import merge_rule
from proxy.policy.load import parse_policy
from proxy.policy.model import HealthCheck
from proxy.pool import PASSIVE_BACKOFF, PASSIVE_BACKOFF_MAX, Pools, RoutePool, rendezvous_order

LABELS = [f"ws://10.0.0.{index}:8000/ws" for index in range(1, 6)]
KEYS = [f"user-{index}" for index in range(2000)]


def owner(key: str, labels: list[str]) -> str:
    return rendezvous_order(key, labels)[0]


def test_an_endpoint_leaving_moves_only_its_own_keys_and_coming_back_takes_exactly_those():
    before = {key: owner(key, LABELS) for key in KEYS}
    for leaving in LABELS:
        rest = [label for label in LABELS if label != leaving]
        after = {key: owner(key, rest) for key in KEYS}
        moved = {key for key in KEYS if after[key] != before[key]}
        assert moved == {key for key in KEYS if before[key] == leaving}
        # its keys spread over the others rather than all landing on one
        assert len({after[key] for key in moved}) == len(rest)
    # and the order of the labels in the pool does not matter
    assert all(owner(key, list(reversed(LABELS))) == before[key] for key in KEYS)


def test_keys_spread_evenly():
    counts = Counter(owner(key, LABELS) for key in KEYS)
    assert set(counts) == set(LABELS)
    assert max(counts.values()) < 1.25 * len(KEYS) / len(LABELS)


@given(st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=6, unique=True), st.text(max_size=20))
def test_adding_an_endpoint_moves_keys_only_to_it(labels: list[str], key: str):
    old, new = owner(key, labels[:-1]), owner(key, labels)
    assert new in (old, labels[-1])


def _pool(balance: str = "round_robin", auth: str = "none") -> RoutePool:
    policy = parse_policy(
        "version: 1\n"
        "auth: {p: {algorithms: [HS256], secret_env: WSGATE_UNIT_POOL_SECRET}}\n"
        "routes:\n"
        f"  - {{path: /a, auth: {auth}, upstream: {{balance: {balance}, endpoints: [ws://a/, ws://b/, ws://c/]}}}}\n",
        require_secrets=False,
    )
    return Pools().pool(policy.routes[0])


def _labels(order) -> list[str]:
    return [endpoint.label for endpoint in order]


def test_round_robin_turns_and_puts_endpoints_that_are_out_last():
    pool = _pool()
    firsts = [pool.order("192.0.2.1", None)[0].label for _ in range(6)]
    assert firsts == ["ws://a:80/", "ws://b:80/", "ws://c:80/"] * 2
    a, b, _c = pool.endpoints
    b.connect_failed("refused")
    order = _labels(pool.order("192.0.2.1", None))
    assert order[-1] == b.label and len(order) == 3, "still tried, after the others"
    a.connect_failed("refused")
    assert _labels(pool.order("192.0.2.1", None))[1:] == [b.label, a.label], "soonest to retry first"


def test_least_connections_picks_the_lightest():
    pool = _pool("least_connections")
    a, b, c = pool.endpoints
    a.sessions, b.sessions, c.sessions = 3, 1, 2
    assert _labels(pool.order("192.0.2.1", None)) == [b.label, c.label, a.label]
    b.connecting = 5
    assert pool.order("192.0.2.1", None)[0] is c


def test_hash_subject_follows_the_subject_and_falls_back_to_the_next_heaviest():
    pool = _pool("hash_subject", auth="p")
    labels = [endpoint.label for endpoint in pool.endpoints]
    assert _labels(pool.order("192.0.2.1", "alice")) == rendezvous_order("alice", labels)
    home = next(endpoint for endpoint in pool.endpoints if endpoint.label == owner("alice", labels))
    home.connect_failed("refused")
    order = _labels(pool.order("192.0.2.1", "alice"))
    assert order == [label for label in rendezvous_order("alice", labels) if label != home.label] + [
        home.label
    ]
    home.connect_succeeded()
    assert pool.order("192.0.2.9", "alice")[0] is home


def test_passive_backoff_doubles_to_its_cap_and_a_success_clears_it():
    endpoint = _pool().endpoints[0]
    waits = []
    for _ in range(6):
        endpoint.connect_failed("refused")
        waits.append(round(endpoint.retry_at - time.monotonic()))
    assert waits == [2, 4, 8, 16, PASSIVE_BACKOFF_MAX, PASSIVE_BACKOFF_MAX] and PASSIVE_BACKOFF == 2
    assert not endpoint.up and not endpoint.may_try(time.monotonic())
    assert endpoint.may_try(time.monotonic() + PASSIVE_BACKOFF_MAX)  # tried again when its time is over
    endpoint.connect_succeeded()
    assert endpoint.up and endpoint.failures == 0 and endpoint.connect_failures == 6


def test_rise_and_fall_count_checks_in_a_row():
    endpoint = _pool().endpoints[0]
    check = HealthCheck(interval=1.0, timeout=1.0, rise=2, fall=3)
    for failure in ("x", "x", None, "x", "x"):
        endpoint.checked(failure, check)
    assert endpoint.up, "a pass in between restarts the count"
    endpoint.checked("x", check)
    assert not endpoint.up
    endpoint.checked(None, check)
    assert not endpoint.up
    endpoint.checked(None, check)
    assert endpoint.up


def test_workers_merge_endpoint_health_by_minimum_and_sessions_by_sum():
    assert merge_rule("wsgate_upstream_up", "wsgate_upstream_up") == "min"
    assert merge_rule("wsgate_upstream_sessions", "wsgate_upstream_sessions") == "sum"
    assert merge_rule("wsgate_upstream_connect_failures", "wsgate_upstream_connect_failures_total") == "sum"
