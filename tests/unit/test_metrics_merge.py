"""Merging workers' expositions: sums by name and labels, and the documented exceptions."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from proxy.metrics_merge import MergedMetrics, merge_expositions, merge_rule

WORKER_0 = """\
# TYPE wsgate_connections_total counter
wsgate_connections_total{route="/a"} 3.0
# TYPE wsgate_connections_active gauge
wsgate_connections_active{route="/a"} 2.0
# TYPE wsgate_handshake_duration_seconds histogram
wsgate_handshake_duration_seconds_bucket{le="0.1",route="/a"} 1.0
wsgate_handshake_duration_seconds_bucket{le="+Inf",route="/a"} 3.0
wsgate_handshake_duration_seconds_sum{route="/a"} 0.5
wsgate_handshake_duration_seconds_count{route="/a"} 3.0
# TYPE wsgate_policy_info gauge
wsgate_policy_info{hash="aaa",version="1"} 1.0
# TYPE wsgate_policy_loaded_timestamp_seconds gauge
wsgate_policy_loaded_timestamp_seconds 100.0
# TYPE process_start_time_seconds gauge
process_start_time_seconds 50.0
# TYPE wsgate_limiter_up gauge
wsgate_limiter_up 1.0
"""

WORKER_1 = """\
# TYPE wsgate_connections_total counter
wsgate_connections_total{route="/a"} 4.0
wsgate_connections_total{route="/b"} 1.0
# TYPE wsgate_connections_active gauge
wsgate_connections_active{route="/a"} 1.0
# TYPE wsgate_handshake_duration_seconds histogram
wsgate_handshake_duration_seconds_bucket{le="0.1",route="/a"} 2.0
wsgate_handshake_duration_seconds_bucket{le="+Inf",route="/a"} 4.0
wsgate_handshake_duration_seconds_sum{route="/a"} 1.0
wsgate_handshake_duration_seconds_count{route="/a"} 4.0
# TYPE wsgate_policy_info gauge
wsgate_policy_info{hash="bbb",version="1"} 1.0
# TYPE wsgate_policy_loaded_timestamp_seconds gauge
wsgate_policy_loaded_timestamp_seconds 200.0
# TYPE process_start_time_seconds gauge
process_start_time_seconds 40.0
# TYPE wsgate_limiter_up gauge
wsgate_limiter_up 0.0
"""


def exposition(merged: MergedMetrics) -> set[str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(merged)
    return {line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")}


def test_samples_with_the_same_name_and_labels_are_summed_and_the_exceptions_hold():
    lines = exposition(merge_expositions([WORKER_0, WORKER_1]))
    assert lines == {
        'wsgate_connections_total{route="/a"} 7.0',
        'wsgate_connections_total{route="/b"} 1.0',
        'wsgate_connections_active{route="/a"} 3.0',
        'wsgate_handshake_duration_seconds_bucket{le="0.1",route="/a"} 3.0',
        'wsgate_handshake_duration_seconds_bucket{le="+Inf",route="/a"} 7.0',
        'wsgate_handshake_duration_seconds_sum{route="/a"} 1.5',
        'wsgate_handshake_duration_seconds_count{route="/a"} 7.0',
        'wsgate_policy_info{hash="aaa",version="1"} 1.0',
        'wsgate_policy_info{hash="bbb",version="1"} 1.0',
        "wsgate_policy_loaded_timestamp_seconds 200.0",
        "process_start_time_seconds 40.0",
        "wsgate_limiter_up 0.0",
    }


def test_a_gone_worker_keeps_its_counters_and_histograms_but_not_its_gauges():
    merged = MergedMetrics.parse(WORKER_1)
    merged.merge(MergedMetrics.parse(WORKER_0), monotonic_only=True)
    lines = exposition(merged)
    assert 'wsgate_connections_total{route="/a"} 7.0' in lines
    assert 'wsgate_handshake_duration_seconds_count{route="/a"} 7.0' in lines
    assert 'wsgate_connections_active{route="/a"} 1.0' in lines
    assert 'wsgate_policy_info{hash="aaa",version="1"} 1.0' not in lines


def test_merge_rules():
    assert merge_rule("wsgate_bytes", "wsgate_bytes_total") == "sum"
    assert merge_rule("python_info", "python_info") == "one"
    assert merge_rule("process_max_fds", "process_max_fds") == "max"
    assert merge_rule("wsgate_draining", "wsgate_draining") == "max"
