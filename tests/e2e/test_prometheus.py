"""A real Prometheus server scrapes wsgate's admin listener and its query API returns wsgate's metrics."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import aiohttp
import pytest
from conftest import free_port

PROMETHEUS = shutil.which("prometheus")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is not installed (apt-get install -y prometheus; .ci/run installs it)",
)


async def query(session: aiohttp.ClientSession, port: int, expression: str) -> list[dict]:
    """The query's result vector; empty while Prometheus is still starting or has no sample yet."""
    url = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        async with session.get(url, params={"query": expression}) as response:
            if response.status != 200:
                return []
            body = await response.json()
    except aiohttp.ClientConnectionError:
        return []
    return body["data"]["result"] if body.get("status") == "success" else []


async def test_prometheus_scrapes_wsgate(gateway, upstream, tmp_path, client):
    gw = await gateway(
        f"""
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    admin_port = gw.gateway.admin_address.port
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: wsgate\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{admin_port}']}}]\n"
    )
    port = free_port()
    assert PROMETHEUS is not None
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        async with client.ws_connect(gw.url()) as ws:
            await ws.send_str("hello")
            await ws.receive(timeout=5)
            result: list[dict] = []
            deadline = time.monotonic() + 45
            async with aiohttp.ClientSession() as session:
                while time.monotonic() < deadline:
                    result = await query(session, port, 'wsgate_connections_active{route="/echo"}')
                    if result:
                        break
                    assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
                    await asyncio.sleep(0.5)
                assert result, "Prometheus never returned wsgate_connections_active"
                assert result[0]["metric"]["job"] == "wsgate"
                assert float(result[0]["value"][1]) == 1
                up = await query(session, port, 'up{job="wsgate"}')
                assert up and float(up[0]["value"][1]) == 1
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
