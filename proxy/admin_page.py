"""The admin page's data: ``/status.json`` computed from metric families alone, and the page itself.

Everything here is read from metric families, never from the gateway's objects, so that a supervisor that
scrapes several workers' ``/metrics`` can compute the same JSON: it parses each text with
``prometheus_client.parser.text_string_to_metric_families``, passes the families of every worker together
(samples with the same name and labels are added up), and gets the totals of the fleet. A worker passes
``registry.collect()`` instead; both yield :class:`prometheus_client.metrics_core.Metric` objects whose
samples carry the exposition's names (``wsgate_handshake_rejections_total``, ``wsgate_connections_active``),
which is all that is read.

Like ``/metrics``, the status holds counts only: no IP, subject or token, so it needs no admin token.

Memory bound: :class:`StatusHistory` keeps at most ``window / interval + 1`` samples (61 with the defaults,
one per 10 s over 10 minutes), each a handful of numbers per refusal reason and per direction; reasons
are a fixed vocabulary of the gateway, so a sample stays well under a few KiB.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from base64 import b64encode
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from prometheus_client.metrics_core import Metric

from proxy.metrics import FROM_CLIENT, FROM_UPSTREAM, NO_ROUTE

#: One sample per this many seconds, over this window: what the refusal history and rates are made of.
SAMPLE_INTERVAL = 10.0
HISTORY_WINDOW = 600.0
#: How often the page asks for ``/status.json`` again (milliseconds; the page reads it from the status).
PAGE_REFRESH_MS = 3000

DIRECTIONS = (FROM_CLIENT, FROM_UPSTREAM)
RELOAD_RESULTS = ("success", "error")

Labels = frozenset[tuple[str, str]]


class SampleIndex:
    """Samples by name, then by labels, added up across the families given (one worker or several)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._values: dict[str, dict[Labels, float]] = {}
        for family in families:
            for sample in family.samples:
                by_labels = self._values.setdefault(sample.name, {})
                labels = frozenset(sample.labels.items())
                by_labels[labels] = by_labels.get(labels, 0.0) + sample.value

    def series(self, name: str) -> Iterable[tuple[dict[str, str], float]]:
        for labels, value in self._values.get(name, {}).items():
            yield dict(labels), value

    def total_by(self, name: str, label: str) -> dict[str, float]:
        """The samples of ``name`` added up by the value of one label."""
        totals: dict[str, float] = {}
        for labels, value in self.series(name):
            key = labels.get(label, "")
            totals[key] = totals.get(key, 0.0) + value
        return totals

    def maximum(self, name: str) -> float | None:
        values = [value for _, value in self.series(name)]
        return max(values) if values else None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one sample keeps: monotonic counters the history needs, at one wall-clock time."""

    at: float
    rejections: dict[str, float]
    messages: dict[str, float]
    reloads: dict[str, float]

    @classmethod
    def of(cls, index: SampleIndex, at: float) -> Snapshot:
        messages = index.total_by("wsgate_messages_total", "direction")
        reloads = index.total_by("wsgate_policy_reloads_total", "result")
        return cls(
            at=at,
            rejections=index.total_by("wsgate_handshake_rejections_total", "reason"),
            messages={direction: messages.get(direction, 0.0) for direction in DIRECTIONS},
            reloads={result: reloads.get(result, 0.0) for result in RELOAD_RESULTS},
        )


def _increase(new: float, old: float) -> float:
    """How much a counter grew; a counter that went down was reset (a worker restarted): all of it."""
    return new - old if new >= old else new


@dataclass(slots=True)
class StatusHistory:
    """A bounded ring of samples (see the module's memory bound) and the last reload result seen.

    ``sample`` is meant to be called every ``interval`` seconds; calls closer together than half an
    interval are ignored, so a caller that samples too eagerly cannot shorten the window.
    """

    interval: float = SAMPLE_INTERVAL
    window: float = HISTORY_WINDOW
    samples: deque[Snapshot] = field(init=False)
    #: The result of the latest reload seen happening between two samples, and when (the later
    #: sample's time); None until one is seen. A success and an error within one interval read "error":
    #: their order is unknown, and the logs say more.
    last_reload: tuple[str, float] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.window < self.interval:
            raise ValueError("StatusHistory needs 0 < interval <= window")
        self.samples = deque(maxlen=int(self.window // self.interval) + 1)

    def sample(self, families: Iterable[Metric], now: float | None = None) -> None:
        """Keep one sample of ``families`` (``registry.collect()`` or parsed exposition text)."""
        at = time.time() if now is None else now
        if self.samples and at - self.samples[-1].at < self.interval / 2:
            return
        snapshot = Snapshot.of(SampleIndex(families), at)
        if self.samples:
            previous = self.samples[-1]
            grew = [
                result
                for result in RELOAD_RESULTS
                if _increase(snapshot.reloads[result], previous.reloads[result]) > 0
            ]
            if grew:
                self.last_reload = ("error" if "error" in grew else "success", at)
        elif snapshot.reloads["error"] == 0 and snapshot.reloads["success"] > 0:
            self.last_reload = ("success", at)
        elif snapshot.reloads["success"] == 0 and snapshot.reloads["error"] > 0:
            self.last_reload = ("error", at)
        self.samples.append(snapshot)

    def refusals_per_minute(self) -> tuple[int, dict[str, list[int]]]:
        """Refusals by reason in each whole minute of the window, oldest first, ending at the last sample.

        A minute the history does not reach back to counts 0.
        """
        minutes = max(1, int(self.window // 60))
        if len(self.samples) < 2:
            return minutes, {}
        newest = self.samples[-1].at
        reasons = sorted({reason for snapshot in self.samples for reason in snapshot.rejections})
        per_reason: dict[str, list[int]] = {reason: [0] * minutes for reason in reasons}
        for earlier, later in itertools.pairwise(self.samples):
            slot = minutes - 1 - int((newest - later.at) // 60)
            if slot < 0:
                continue
            for reason in reasons:
                grown = _increase(later.rejections.get(reason, 0.0), earlier.rejections.get(reason, 0.0))
                per_reason[reason][slot] += int(grown)
        return minutes, per_reason

    def message_rates(self) -> dict[str, float] | None:
        """Messages per second by direction between the last two samples; None before there are two."""
        if len(self.samples) < 2:
            return None
        earlier, later = self.samples[-2], self.samples[-1]
        elapsed = later.at - earlier.at
        if elapsed <= 0:
            return None
        return {
            direction: round(_increase(later.messages[direction], earlier.messages[direction]) / elapsed, 3)
            for direction in DIRECTIONS
        }


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """What the caller knows of the active policy beyond its metrics (a supervisor may know nothing)."""

    #: The whole sha256 (the metrics carry its first 12 hex digits).
    sha256: str | None = None
    #: The routes of the active policy, in its order: routes a reload removed are left out.
    routes: tuple[str, ...] | None = None


def status(
    families: Iterable[Metric], history: StatusHistory, policy_info: PolicyInfo | None = None
) -> dict[str, Any]:
    """The ``/status.json`` document: live sessions per route (from ``families``, the current scrape),
    refusals per minute and message rates (from ``history``), the policy and its last reload."""
    info = policy_info or PolicyInfo()
    index = SampleIndex(families)
    live = {path: value for path, value in index.total_by("wsgate_connections_active", "route").items()}
    paths = list(info.routes) if info.routes is not None else sorted(p for p in live if p != NO_ROUTE)
    minutes, per_minute = history.refusals_per_minute()
    reloads = index.total_by("wsgate_policy_reloads_total", "result")
    hashes = sorted({labels.get("hash", "") for labels, value in index.series("wsgate_policy_info") if value})
    versions = sorted(
        {labels.get("version", "") for labels, value in index.series("wsgate_policy_info") if value}
    )
    loaded_at = index.maximum("wsgate_policy_loaded_timestamp_seconds")
    last = history.last_reload
    now = time.time()
    return {
        "generated_at": _iso(now),
        "generated_at_unix": round(now, 3),
        "refresh_ms": PAGE_REFRESH_MS,
        "routes": [{"path": path, "live_sessions": int(live.get(path, 0))} for path in paths],
        "live_sessions": int(sum(live.get(path, 0) for path in paths)),
        "refusals": {
            "minutes": minutes,
            "per_minute": per_minute,
            "total": {
                reason: int(count)
                for reason, count in sorted(
                    index.total_by("wsgate_handshake_rejections_total", "reason").items()
                )
            },
        },
        "messages_per_second": history.message_rates(),
        "policy": {
            "sha256": info.sha256,
            "hash": hashes[0] if len(hashes) == 1 else None,
            "hashes": hashes,
            "version": versions[0] if len(versions) == 1 else None,
            "loaded_at": _iso(loaded_at) if loaded_at else None,
            "loaded_at_unix": loaded_at or None,
            "reloads": {result: int(reloads.get(result, 0)) for result in RELOAD_RESULTS},
            "last_reload": None
            if last is None
            else {"result": last[0], "seen_at": _iso(last[1]), "seen_at_unix": round(last[1], 3)},
        },
    }


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


# -- the page -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminPage:
    """The HTML page and the Content-Security-Policy that lets exactly its inline script and style run."""

    html: bytes
    content_security_policy: str


def _csp_hash(text: str) -> str:
    return "'sha256-" + b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def load_page() -> AdminPage:
    """The page shipped beside this module, with hashes of its one ``<script>`` and one ``<style>``.

    Raises:
        ValueError: the shipped page does not hold exactly one of each (a packaging mistake).
    """
    html = resources.files("proxy").joinpath("admin_page.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, re.S)
    if len(scripts) != 1 or len(styles) != 1:
        raise ValueError("admin_page.html must hold exactly one inline <script> and one <style>")
    policy = "; ".join(
        (
            "default-src 'none'",
            f"script-src {_csp_hash(scripts[0])}",
            f"style-src {_csp_hash(styles[0])}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return AdminPage(html.encode("utf-8"), policy)
