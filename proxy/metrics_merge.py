"""One scrape's worth of metrics from several workers, merged into the totals of the whole gateway.

Each worker exposes its own counters; the supervisor's ``/metrics`` parses every worker's text exposition
and merges samples that have the same name and labels:

* counters, histogram buckets, ``_sum`` and ``_count``, and gauges: **summed** (sessions active, bytes,
  open file descriptors and memory are totals over the processes);
* ``*_timestamp_seconds`` (when a policy was loaded), ``process_max_fds`` and ``wsgate_draining``: the
  **maximum** (the latest reload; a limit per process, not a total; draining if any worker is);
* ``process_start_time_seconds``, ``wsgate_limiter_up`` and ``wsgate_upstream_up``: the **minimum** (the
  oldest process; the limiter, or an upstream endpoint, is up only if it is up in every worker: each
  worker judges its endpoints' health on its own);
* ``*_info`` gauges (``wsgate_policy_info``, ``python_info``): **one series per distinct labels, value 1**:
  two hashes side by side mean the workers do not all run the same policy (a reload under way, or one
  refused by some).

Families keep their type and help text and the order the first worker gave; a series only some workers
have is merged from those that have it.

Counters stay monotonic across a worker's restart: the supervisor keeps each worker's last scrape, and
when a worker is gone (dead, being restarted, or replaced by a new process) its last counters and
histograms stay in the totals (its gauges do not: its sessions are gone). Increments between that last
scrape and its death are lost, so the totals never go down, but may miss a few events of a killed worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

_MAXIMUM = frozenset({"process_max_fds", "wsgate_draining"})
_MINIMUM = frozenset({"process_start_time_seconds", "wsgate_limiter_up", "wsgate_upstream_up"})

_Labels = tuple[tuple[str, str], ...]


def merge_rule(family: str, sample: str) -> str:
    """How samples named ``sample`` (of the family ``family``) from several workers become one:
    ``sum``, ``max``, ``min`` or ``one``."""
    if family.endswith("_info"):
        return "one"
    if sample in _MINIMUM:
        return "min"
    if sample in _MAXIMUM or sample.endswith("_timestamp_seconds"):
        return "max"
    return "sum"


@dataclass(slots=True)
class _Family:
    name: str
    documentation: str
    kind: str
    samples: dict[tuple[str, _Labels], float] = field(default_factory=dict)


def _combine(rule: str, old: float, new: float) -> float:
    if rule == "sum":
        return old + new
    if rule == "max":
        return max(old, new)
    if rule == "min":
        return min(old, new)
    return 1.0


#: Metric types whose samples only grow during a process's life (until it restarts).
MONOTONIC = frozenset({"counter", "histogram", "summary"})


class MergedMetrics(Collector):
    """The merge of several workers' expositions, as a collector the supervisor's registry exports."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    @classmethod
    def parse(cls, text: str) -> MergedMetrics:
        """One worker's ``/metrics`` (Prometheus text format).

        Raises:
            ValueError: the text is not a valid exposition.
        """
        parsed = cls()
        for metric in text_string_to_metric_families(text):
            parsed.add_metric(metric)
        return parsed

    def add_exposition(self, text: str) -> None:
        """Merge one worker's ``/metrics`` into these.

        Raises:
            ValueError: the text is not a valid exposition.
        """
        self.merge(MergedMetrics.parse(text))

    def merge(self, other: MergedMetrics, monotonic_only: bool = False) -> None:
        """Merge ``other``'s samples into these (by the rules of the module docstring); with
        ``monotonic_only``, only its counters and histograms (what a worker that is gone still counts)."""
        for name, theirs in other._families.items():
            if monotonic_only and theirs.kind not in MONOTONIC:
                continue
            family = self._families.get(name)
            if family is None:
                family = self._families[name] = _Family(name, theirs.documentation, theirs.kind)
            for key, value in theirs.samples.items():
                rule = merge_rule(name, key[0])
                old = family.samples.get(key)
                family.samples[key] = (
                    (1.0 if rule == "one" else value) if old is None else _combine(rule, old, value)
                )

    def add_metric(self, metric: Metric) -> None:
        """Add one family as it is (the supervisor's own, or one parsed from a worker)."""
        family = self._families.get(metric.name)
        if family is None:
            family = self._families[metric.name] = _Family(metric.name, metric.documentation, metric.type)
        for sample in metric.samples:
            family.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def collect(self) -> Iterator[Metric]:
        for family in self._families.values():
            metric = Metric(family.name, family.documentation, family.kind)
            for (name, labels), value in family.samples.items():
                metric.add_sample(name, dict(labels), value)
            yield metric


def merge_expositions(texts: Iterable[str]) -> MergedMetrics:
    """The merge of several expositions (see the module docstring for the rules)."""
    merged = MergedMetrics()
    for text in texts:
        merged.add_exposition(text)
    return merged
