"""Counters as plain integers, exported through a custom prometheus-client collector.

Nothing here runs per relayed message. Message and byte counts live on the relay's legs as plain integer
attributes (the relay bumps them anyway); this module reads them from live sessions at scrape time and folds
them into per-route totals when a session ends. Everything else counted here happens once per handshake,
session or reload. Labels stay low-cardinality: route (the policy's route path), reason, direction, code,
initiator, rule, provider, result, and the upstream endpoints the policy names; never a client's IP, a
user or a token.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.rules import Rule

if TYPE_CHECKING:
    from proxy.policy.model import Policy
    from proxy.pool import Endpoint
    from proxy.sessions import Session

#: Route label for what happened before a route was known (no route matched, unreadable request).
NO_ROUTE = ""

HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SESSION_BUCKETS = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 24 * 3600.0)

#: ``direction`` label values: which way the messages went.
FROM_CLIENT = "client_to_upstream"
FROM_UPSTREAM = "upstream_to_client"


class Histogram:
    """A fixed-bucket histogram of plain numbers (what ``HistogramMetricFamily`` wants at scrape time)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, ending with ``+Inf``."""
        cumulative, result = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            result.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
        return result


class RouteCounters:
    """Everything counted for one route (or for :data:`NO_ROUTE`)."""

    __slots__ = (
        "bytes",
        "closes",
        "compressed",
        "connections",
        "handshake_seconds",
        "messages",
        "rejections",
        "session_seconds",
        "upstream_connect_seconds",
        "violations",
    )

    def __init__(self) -> None:
        self.connections = 0
        #: Totals of finished sessions, by direction; live sessions are added at scrape time.
        self.messages = {FROM_CLIENT: 0, FROM_UPSTREAM: 0}
        self.bytes = {FROM_CLIENT: 0, FROM_UPSTREAM: 0}
        #: permessage-deflate messages by (direction, hop): "received" compressed from the sender,
        #: "sent" compressed by the gateway for the receiver, "passed" on compressed as they came.
        self.compressed: dict[tuple[str, str], int] = {}
        self.violations: dict[Rule, int] = {}
        self.rejections: dict[str, int] = {}
        self.closes: dict[tuple[str, str], int] = {}
        self.handshake_seconds = Histogram(HANDSHAKE_BUCKETS)
        self.upstream_connect_seconds = Histogram(HANDSHAKE_BUCKETS)
        self.session_seconds = Histogram(SESSION_BUCKETS)


_Key = TypeVar("_Key")


def _add(counts: dict[_Key, int], other: dict[_Key, int]) -> None:
    for key, value in other.items():
        counts[key] = counts.get(key, 0) + value


def close_code_label(code: int | None, initiator: str | None) -> str:
    """The ``code`` label of a close. Clients choose any code in 3000-4999, so theirs are grouped
    (``3xxx``, ``4xxx``) to keep one client from creating thousands of series; upstream and gateway codes
    come from software the operator runs and are kept exact."""
    if code is None:
        return "none"
    if initiator == "client" and 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return str(code)


def session_compressed(session: Session) -> dict[tuple[str, str], int]:
    """A session's compressed messages, keyed as :attr:`RouteCounters.compressed` (none: empty)."""
    counts: dict[tuple[str, str], int] = {}
    for direction, reader in ((FROM_CLIENT, session.client.reader), (FROM_UPSTREAM, session.upstream.reader)):
        if reader.inflated:
            counts[(direction, "received")] = reader.inflated
        if reader.deflated:
            counts[(direction, "sent")] = reader.deflated
        if reader.passed:
            counts[(direction, "passed")] = reader.passed
    return counts


def session_violations(session: Session) -> dict[Rule, int]:
    """Rule violations seen so far on a session, by rule, both directions together."""
    found: dict[Rule, int] = {}
    for leg in (session.client, session.upstream):
        checker = leg.checker
        if checker is not None:
            _add(found, checker.violations)
        if leg.oversized:
            found[Rule.SIZE] = found.get(Rule.SIZE, 0) + 1
    return found


class Metrics:
    """The gateway's counters. Methods are called once per event (handshake, session end, reload)."""

    def __init__(self, live_sessions: Callable[[], Iterable[Session]]) -> None:
        self._live_sessions = live_sessions
        self.routes: dict[str, RouteCounters] = {}
        self.reloads: dict[str, int] = {}
        self.jwks_refreshes: dict[tuple[str, str], int] = {}
        #: Failed ``accept()`` calls, by listener (``client``, ``admin``) and reason (``fd_exhausted``...).
        self.accept_errors: dict[tuple[str, str], int] = {}
        #: Client TLS handshakes that failed, by reason (``client_certificate``, ``timeout``, ``error``).
        self.tls_handshake_failures: dict[str, int] = {}
        self.policy_version = ""
        self.policy_hash = ""
        self.policy_loaded_at = 0.0
        self.draining = False
        #: Where the limiter counts (``memory`` or ``redis``) and whether it can decide now.
        self.limiter_state: Callable[[], tuple[str, bool]] = lambda: ("memory", True)
        #: Every route's upstream endpoints with their health and sessions (:mod:`proxy.pool`).
        self.upstream_endpoints: Callable[[], Iterable[Endpoint]] = lambda: ()

    def route(self, path: str) -> RouteCounters:
        counters = self.routes.get(path)
        if counters is None:
            counters = self.routes[path] = RouteCounters()
        return counters

    def policy_loaded(self, policy: Policy) -> None:
        """A policy became active (at start, or by a reload): its routes appear with zeroes."""
        self.policy_version = str(policy.version)
        self.policy_hash = policy.sha256[:12]
        self.policy_loaded_at = time.time()
        for route in policy.routes:
            self.route(route.path)

    def rejected(self, route: str, reason: str, seconds: float | None = None) -> None:
        counters = self.route(route)
        counters.rejections[reason] = counters.rejections.get(reason, 0) + 1
        if seconds is not None:
            counters.handshake_seconds.observe(seconds)

    def upstream_connected(self, route: str, seconds: float) -> None:
        self.route(route).upstream_connect_seconds.observe(seconds)

    def session_opened(self, route: str, handshake_seconds: float) -> None:
        counters = self.route(route)
        counters.connections += 1
        counters.handshake_seconds.observe(handshake_seconds)

    def session_closed(self, session: Session) -> None:
        """Fold a finished session's counts into its route's totals."""
        counters = self.route(session.route.path)
        counters.messages[FROM_CLIENT] += session.client.messages
        counters.messages[FROM_UPSTREAM] += session.upstream.messages
        counters.bytes[FROM_CLIENT] += session.client.bytes
        counters.bytes[FROM_UPSTREAM] += session.upstream.bytes
        _add(counters.violations, session_violations(session))
        _add(counters.compressed, session_compressed(session))
        key = (close_code_label(session.close_code, session.initiator), session.initiator or "")
        counters.closes[key] = counters.closes.get(key, 0) + 1
        counters.session_seconds.observe(session.duration)

    def reload_result(self, result: str) -> None:
        self.reloads[result] = self.reloads.get(result, 0) + 1

    def jwks_refreshed(self, provider: str, result: str) -> None:
        key = (provider, result)
        self.jwks_refreshes[key] = self.jwks_refreshes.get(key, 0) + 1

    def accept_failed(self, listener: str, reason: str) -> None:
        key = (listener, reason)
        self.accept_errors[key] = self.accept_errors.get(key, 0) + 1

    def tls_handshake_failed(self, reason: str) -> None:
        self.tls_handshake_failures[reason] = self.tls_handshake_failures.get(reason, 0) + 1

    def live(self) -> Iterator[Session]:
        return iter(self._live_sessions())


class WsgateCollector(Collector):
    """Turns :class:`Metrics` into metric families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        metrics = self.metrics
        active: dict[str, int] = dict.fromkeys(metrics.routes, 0)
        messages = {path: dict(c.messages) for path, c in metrics.routes.items()}
        sent = {path: dict(c.bytes) for path, c in metrics.routes.items()}
        violations = {path: dict(c.violations) for path, c in metrics.routes.items()}
        compressed = {path: dict(c.compressed) for path, c in metrics.routes.items()}
        for session in metrics.live():
            path = session.route.path
            active[path] = active.get(path, 0) + 1
            route_messages = messages.setdefault(path, {FROM_CLIENT: 0, FROM_UPSTREAM: 0})
            route_messages[FROM_CLIENT] += session.client.messages
            route_messages[FROM_UPSTREAM] += session.upstream.messages
            route_bytes = sent.setdefault(path, {FROM_CLIENT: 0, FROM_UPSTREAM: 0})
            route_bytes[FROM_CLIENT] += session.client.bytes
            route_bytes[FROM_UPSTREAM] += session.upstream.bytes
            _add(violations.setdefault(path, {}), session_violations(session))
            _add(compressed.setdefault(path, {}), session_compressed(session))

        gauge = GaugeMetricFamily("wsgate_connections_active", "Live WebSocket sessions.", labels=["route"])
        for path, count in sorted(active.items()):
            if path != NO_ROUTE:
                gauge.add_metric([path], count)
        yield gauge

        counter = CounterMetricFamily(
            "wsgate_connections", "WebSocket sessions opened (101 sent).", labels=["route"]
        )
        for path, counters in sorted(metrics.routes.items()):
            if path != NO_ROUTE:
                counter.add_metric([path], counters.connections)
        yield counter

        counter = CounterMetricFamily(
            "wsgate_handshake_rejections", "Handshakes refused, by reason.", labels=["route", "reason"]
        )
        for path, counters in sorted(metrics.routes.items()):
            for reason, count in sorted(counters.rejections.items()):
                counter.add_metric([path, reason], count)
        yield counter

        for name, attribute, documentation in (
            ("wsgate_handshake_duration_seconds", "handshake_seconds", "Upgrade request to answer."),
            (
                "wsgate_upstream_connect_duration_seconds",
                "upstream_connect_seconds",
                "TCP, TLS and WebSocket handshake with the upstream.",
            ),
            ("wsgate_session_duration_seconds", "session_seconds", "101 to the end of the session."),
        ):
            histogram = HistogramMetricFamily(name, documentation, labels=["route"])
            for path, counters in sorted(metrics.routes.items()):
                observed: Histogram = getattr(counters, attribute)
                if path != NO_ROUTE or observed.count:
                    histogram.add_metric([path], observed.buckets(), observed.total)
            yield histogram

        for name, documentation, by_route in (
            ("wsgate_messages", "Messages relayed, by direction.", messages),
            ("wsgate_bytes", "Payload bytes relayed, by direction.", sent),
        ):
            counter = CounterMetricFamily(name, documentation, labels=["route", "direction"])
            for path, by_direction in sorted(by_route.items()):
                for direction, count in sorted(by_direction.items()):
                    if path != NO_ROUTE:
                        counter.add_metric([path, direction], count)
            yield counter

        counter = CounterMetricFamily(
            "wsgate_compressed_messages",
            "permessage-deflate messages: received compressed, compressed by wsgate, passed as they came.",
            labels=["route", "direction", "hop"],
        )
        for path, by_key in sorted(compressed.items()):
            for (direction, hop), count in sorted(by_key.items()):
                counter.add_metric([path, direction, hop], count)
        yield counter

        counter = CounterMetricFamily(
            "wsgate_closes",
            "Sessions ended, by close code and who closed first.",
            labels=["route", "code", "initiator"],
        )
        for path, counters in sorted(metrics.routes.items()):
            for (code, initiator), count in sorted(counters.closes.items()):
                counter.add_metric([path, code, initiator], count)
        yield counter

        counter = CounterMetricFamily(
            "wsgate_message_violations",
            "Messages that broke a rule (closed or dropped).",
            labels=["route", "rule"],
        )
        for path, by_rule in sorted(violations.items()):
            for rule, count in sorted(by_rule.items()):
                counter.add_metric([path, rule.value], count)
        yield counter

        counter = CounterMetricFamily("wsgate_policy_reloads", "Policy reload attempts.", labels=["result"])
        for result in ("success", "error"):
            counter.add_metric([result], metrics.reloads.get(result, 0))
        yield counter

        gauge = GaugeMetricFamily(
            "wsgate_policy_info", "The active policy (value 1).", labels=["version", "hash"]
        )
        if metrics.policy_hash:
            gauge.add_metric([metrics.policy_version, metrics.policy_hash], 1)
        yield gauge

        yield GaugeMetricFamily(
            "wsgate_policy_loaded_timestamp_seconds",
            "When the active policy was loaded (UNIX time).",
            value=metrics.policy_loaded_at,
        )

        counter = CounterMetricFamily(
            "wsgate_jwks_refresh", "JWKS fetches, by provider and result.", labels=["provider", "result"]
        )
        for (provider, result), count in sorted(metrics.jwks_refreshes.items()):
            counter.add_metric([provider, result], count)
        yield counter

        counter = CounterMetricFamily(
            "wsgate_accept_errors",
            "Failed accept() calls, by listener and reason; each pauses that listener's accepting briefly.",
            labels=["listener", "reason"],
        )
        for listener in ("client", "admin"):
            for reason in ("fd_exhausted", "out_of_memory", "error"):
                counter.add_metric([listener, reason], metrics.accept_errors.get((listener, reason), 0))
        yield counter

        counter = CounterMetricFamily(
            "wsgate_tls_handshake_failures",
            "Client TLS handshakes that failed, by reason (client_certificate: missing or not verified).",
            labels=["reason"],
        )
        for reason in ("client_certificate", "timeout", "error"):
            counter.add_metric([reason], metrics.tls_handshake_failures.get(reason, 0))
        yield counter

        backend, up = metrics.limiter_state()
        gauge = GaugeMetricFamily(
            "wsgate_limiter_up",
            "1 while the limiter can decide (always 1 in process memory; 0 while Redis is unreachable).",
            labels=["backend"],
        )
        gauge.add_metric([backend], int(up))
        yield gauge

        yield from _endpoint_families(list(metrics.upstream_endpoints()))

        yield GaugeMetricFamily(
            "wsgate_draining", "1 while the gateway drains for shutdown.", value=int(metrics.draining)
        )


def _endpoint_families(endpoints: list[Endpoint]) -> Iterator[Metric]:
    labels = ["route", "endpoint"]
    up = GaugeMetricFamily(
        "wsgate_upstream_up",
        "1 while an upstream endpoint takes new sessions; 0 while failed connects or checks hold it out.",
        labels=labels,
    )
    sessions = GaugeMetricFamily(
        "wsgate_upstream_sessions", "Live sessions relayed to an upstream endpoint.", labels=labels
    )
    failures = CounterMetricFamily(
        "wsgate_upstream_connect_failures",
        "Connects to an upstream endpoint that failed (refused, timed out, TLS, closed, 5xx).",
        labels=labels,
    )
    for endpoint in endpoints:
        series = [endpoint.route, endpoint.label]
        up.add_metric(series, int(endpoint.up))
        sessions.add_metric(series, endpoint.sessions)
        failures.add_metric(series, endpoint.connect_failures)
    yield up
    yield sessions
    yield failures


def build_registry(metrics: Metrics) -> CollectorRegistry:
    """A registry of its own (not the global one) with wsgate's collector and the process collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WsgateCollector(metrics))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
