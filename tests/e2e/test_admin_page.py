"""The admin page (``/``) in a real headless Chromium, and ``/status.json``, which it polls.

The browser is the system's Chromium (Debian's ``chromium`` package) driven by Playwright; Playwright's own
browser downloads are never used. Without that browser, or without Playwright, the browser test is skipped
and says why.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from wsraw import RawClient

from proxy.admin_page import StatusHistory, status


def admin_url(gw: Any, path: str = "/") -> str:
    return f"http://127.0.0.1:{gw.gateway.admin_address.port}{path}"


def two_routes(upstream: Any, admin: str = "") -> str:
    return f"""
    {admin}
    limits: {{close_timeout: 1s}}
    routes:
      - path: /echo
        upstream: {upstream.url("/echo")}
        auth: none
      - path: /other
        upstream: {upstream.url("/echo")}
        auth: none
    """


CHROMIUM = shutil.which("chromium")


async def test_the_page_renders_routes_and_live_sessions_in_a_browser(gateway, upstream, client):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
    gw = await gateway(two_routes(upstream))
    origin = admin_url(gw, "")
    errors: list[str] = []
    foreign: list[str] = []

    def on_console(message: Any) -> None:
        if message.type == "error":
            errors.append(f"console: {message.text}")

    def on_request(request: Any) -> None:
        if not request.url.startswith(origin + "/"):
            foreign.append(request.url)

    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda error: errors.append(f"pageerror: {error}"))
            page.on("console", on_console)
            page.on("request", on_request)
            response = await page.goto(admin_url(gw, "/"))
            assert response is not None and response.status == 200
            assert "script-src 'sha256-" in response.headers["content-security-policy"]
            rows = page.locator("#routes tbody tr")
            await playwright_api.expect(rows).to_have_count(2, timeout=10_000)
            await playwright_api.expect(page.locator("#routes td.path")).to_have_text(["/echo", "/other"])
            await playwright_api.expect(page.locator("#routes td.live")).to_have_text(["0", "0"])
            async with client.ws_connect(gw.url("/echo")) as ws:
                live = page.locator("#routes tr", has=page.locator("td.path", has_text="/echo"))
                await playwright_api.expect(live.locator("td.live")).to_have_text("1", timeout=10_000)
                await playwright_api.expect(page.locator("#policy-hash")).to_have_text(
                    gw.gateway.policy.sha256
                )
                await ws.close()
            await playwright_api.expect(page.locator("#state")).to_contain_text("updated")
        finally:
            await browser.close()
    assert errors == []
    assert foreign == []


async def test_status_json_has_routes_refusals_rates_and_the_policy(gateway, upstream, client):
    gw = await gateway(two_routes(upstream))
    await RawClient.connect(gw.port, "/nowhere")
    async with client.ws_connect(gw.url("/echo")) as ws:
        await ws.send_str("one")
        await ws.receive(timeout=5)
        async with client.get(admin_url(gw, "/status.json")) as response:
            assert response.status == 200
            assert response.headers["Cache-Control"] == "no-store"
            document = await response.json()
    assert document["routes"] == [
        {"path": "/echo", "live_sessions": 1},
        {"path": "/other", "live_sessions": 0},
    ]
    assert document["live_sessions"] == 1
    refusals = document["refusals"]
    assert refusals["minutes"] == 10
    assert refusals["total"] == {"no_route": 1}
    assert all(len(counts) == 10 for counts in refusals["per_minute"].values())
    # one sample so far (taken at start): rates need two
    assert document["messages_per_second"] is None
    policy = document["policy"]
    assert policy["sha256"] == gw.gateway.policy.sha256
    assert policy["hash"] == gw.gateway.policy.sha256[:12]
    assert policy["reloads"] == {"success": 0, "error": 0}
    assert policy["last_reload"] is None
    assert policy["loaded_at"].endswith("Z")
    assert isinstance(document["refresh_ms"], int)
    text = repr(document)
    assert "127.0.0.1" not in text  # counts only, never who


async def test_the_page_needs_no_token_and_names_no_external_asset(gateway, upstream, client, monkeypatch):
    monkeypatch.setenv("WSGATE_TEST_ADMIN_TOKEN", "t" * 32)
    gw = await gateway(
        two_routes(upstream, 'admin: {address: "127.0.0.1:0", token_env: WSGATE_TEST_ADMIN_TOKEN}')
    )
    async with client.get(admin_url(gw, "/")) as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        html = await response.text()
        csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    assert "http://" not in html and "https://" not in html and "src=" not in html
    async with client.get(admin_url(gw, "/status.json")) as response:
        assert response.status == 200


# -- the status from metric families (what a supervisor of several workers computes) --------------------

EXPOSITION = """\
# TYPE wsgate_connections_active gauge
wsgate_connections_active{{route="/echo"}} {live}
# TYPE wsgate_handshake_rejections counter
wsgate_handshake_rejections_total{{route="/echo",reason="firewall"}} {firewall}
wsgate_handshake_rejections_total{{route="",reason="no_route"}} 1
# TYPE wsgate_messages counter
wsgate_messages_total{{route="/echo",direction="client_to_upstream"}} {sent}
wsgate_messages_total{{route="/echo",direction="upstream_to_client"}} {received}
# TYPE wsgate_policy_reloads counter
wsgate_policy_reloads_total{{result="success"}} {ok}
wsgate_policy_reloads_total{{result="error"}} {failed}
# TYPE wsgate_policy_info gauge
wsgate_policy_info{{version="1",hash="0123456789ab"}} 1
# TYPE wsgate_policy_loaded_timestamp_seconds gauge
wsgate_policy_loaded_timestamp_seconds 1700000000
"""


def families(**values: float) -> list[Any]:
    defaults = {"live": 0, "firewall": 0, "sent": 0, "received": 0, "ok": 0, "failed": 0}
    return list(text_string_to_metric_families(EXPOSITION.format(**{**defaults, **values})))


def test_history_gives_rates_refusals_per_minute_and_the_last_reload():
    history = StatusHistory(interval=10, window=600)
    start = 1_000_000.0
    history.sample(families(), start)
    history.sample(families(firewall=2, sent=100, received=50), start + 10)
    history.sample(families(firewall=2, sent=100, received=50, ok=1), start + 70)
    history.sample(families(live=3, firewall=7, sent=300, received=50, ok=1, failed=1), start + 80)
    document = status(families(live=3, firewall=7), history)
    assert document["routes"] == [{"path": "/echo", "live_sessions": 3}]
    assert document["messages_per_second"] == {"client_to_upstream": 20.0, "upstream_to_client": 0.0}
    per_minute = document["refusals"]["per_minute"]
    assert per_minute["firewall"][-2:] == [2, 5] and sum(per_minute["firewall"]) == 7
    assert document["refusals"]["total"] == {"firewall": 7, "no_route": 1}
    assert document["policy"]["last_reload"]["result"] == "error"
    assert document["policy"]["reloads"] == {"success": 0, "error": 0}  # from the families given
    assert document["policy"]["hash"] == "0123456789ab"
    assert document["policy"]["loaded_at"] == "2023-11-14T22:13:20Z"


def test_history_is_bounded_ignores_eager_samples_and_survives_a_reset():
    history = StatusHistory(interval=10, window=60)
    for step in range(100):
        history.sample(families(sent=step * 10), 1000.0 + step * 10)
    assert len(history.samples) == 7
    history.sample(families(sent=5000), 1000.0 + 99 * 10 + 1)  # too soon after the last: ignored
    assert len(history.samples) == 7
    history.sample(families(sent=30), 1000.0 + 100 * 10)  # a worker restarted: its counter starts over
    assert history.message_rates() == {"client_to_upstream": 3.0, "upstream_to_client": 0.0}


def test_the_families_of_several_workers_add_up():
    both = families(live=2, sent=10) + families(live=1, sent=5)
    history = StatusHistory()
    history.sample(both, 0.0)
    document = status(both, history)
    assert document["routes"] == [{"path": "/echo", "live_sessions": 3}]
    assert history.samples[-1].messages["client_to_upstream"] == 15


async def test_the_server_samples_its_registry_on_a_timer(gateway, upstream):
    gw = await gateway(two_routes(upstream))
    history = gw.gateway.admin.history
    deadline = time.monotonic() + 2
    while not history.samples and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(history.samples) == 1  # taken at start, from registry.collect(); the next in 10 s
    sampler = gw.gateway.admin._sampler
    assert sampler is not None and not sampler.done()
    await gw.gateway.stop()
    assert sampler.cancelled() or sampler.done()


async def test_status_json_from_aggregated_scrapes_matches_the_workers(gateway, upstream):
    gw = await gateway(two_routes(upstream))
    async with aiohttp.ClientSession() as session, session.get(admin_url(gw, "/metrics")) as response:
        text = await response.text()
    parsed = list(text_string_to_metric_families(text))
    history = StatusHistory()
    history.sample(parsed, 0.0)
    from_text = status(parsed, history)
    from_collect = status(gw.gateway.registry.collect(), gw.gateway.admin.history)
    for key in ("routes", "live_sessions"):
        assert from_text[key] == from_collect[key]
    assert from_text["policy"]["hash"] == from_collect["policy"]["hash"]
