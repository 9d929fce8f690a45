"""Per-message rules in the relay: rate and byte limits, frame types, UTF-8, JSON, JSON Schema; each either
closes the offender with its code and reason or drops the message and counts it, per policy."""

from __future__ import annotations

import asyncio
import json

from wsraw import BINARY, TEXT, RawClient


def route(upstream_url: str, extra: str, limits: str = "") -> str:
    return f"""
    limits: {{close_timeout: 1s{limits}}}
    routes:
      - path: /echo
        upstream: {upstream_url}
        auth: none
{extra}"""


async def test_message_flood_closes_1008_rate_limit_exceeded(gateway, upstream, log_events):
    gw = await gateway(route(upstream.url(), "", ", messages_per_connection: 5/s, message_burst: 10"))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    for index in range(10):  # the burst passes
        ws.send_frame(TEXT, f"m{index}".encode())
    for index in range(10):
        assert await ws.recv_message() == (TEXT, f"m{index}".encode())
    for index in range(50):  # the flood does not
        ws.send_frame(TEXT, f"flood{index}".encode())
    frame = await ws.recv_close()
    assert (frame.close_code, frame.close_reason) == (1008, "rate limit exceeded")
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 5)
    assert record.close_code == 1001
    assert len(record.messages) <= 11
    closed = await log_events.wait_for("session.close")
    assert (closed["initiator"], closed["code"], closed["reason"]) == ("gateway", 1008, "rate limit exceeded")


async def test_message_flood_in_drop_mode_drops_and_counts(gateway, upstream, log_events):
    limits = ", messages_per_connection: 2/s, message_burst: 3, on_rate_limit: drop"
    gw = await gateway(route(upstream.url(), "", limits))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    for index in range(20):
        ws.send_frame(TEXT, f"m{index}".encode())
    assert await ws.recv_message() == (TEXT, b"m0")
    await asyncio.sleep(0.3)
    ws.send_close(1000)
    await ws.recv_close()
    closed = await log_events.wait_for("session.close")
    assert closed["dropped"] >= 16
    assert len(upstream.records[0].messages) <= 4


async def test_byte_rate_limit(gateway, upstream):
    limits = ", bytes_per_connection: 10KiB/s, byte_burst: 20KiB"
    gw = await gateway(route(upstream.url(), "", limits))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    ws.send_frame(BINARY, b"x" * 15000)
    assert await ws.recv_message() == (BINARY, b"x" * 15000)
    ws.send_frame(BINARY, b"y" * 15000)  # 30 KB inside the same instant: over the 20 KiB burst
    frame = await ws.recv_close()
    assert (frame.close_code, frame.close_reason) == (1008, "rate limit exceeded")


async def test_invalid_utf8_text_closes_1007(gateway, upstream):
    gw = await gateway(route(upstream.url(), ""))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    ws.send_frame(TEXT, "ok ✓".encode())
    assert await ws.recv_message() == (TEXT, "ok ✓".encode())
    ws.send_frame(TEXT, b"bad \xff\xfe bytes")
    frame = await ws.recv_close()
    assert frame.close_code == 1007
    assert "UTF-8" in frame.close_reason
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 5)
    assert record.messages == ["ok ✓"]


async def test_binary_only_route_closes_text_with_1003(gateway, upstream):
    extra = "        messages: {client: {types: [binary]}}"
    gw = await gateway(route(upstream.url(), extra))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    ws.send_frame(BINARY, b"\x01")
    assert await ws.recv_message() == (BINARY, b"\x01")
    ws.send_frame(TEXT, b"text")
    frame = await ws.recv_close()
    assert (frame.close_code, frame.close_reason) == (1003, "text messages not allowed")


async def test_json_rule_closes_non_json_with_1007(gateway, upstream):
    extra = "        messages: {client: {json: true}}"
    gw = await gateway(route(upstream.url(), extra))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    ws.send_frame(TEXT, b'{"a": 1}')
    assert await ws.recv_message() == (TEXT, b'{"a": 1}')
    ws.send_frame(TEXT, b"{not json")
    frame = await ws.recv_close()
    assert (frame.close_code, frame.close_reason) == (1007, "text message is not valid JSON")


async def test_schema_rule_closes_1008_or_drops(gateway, upstream, tmp_path, log_events):
    schema = tmp_path / "chat.schema.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "required": ["type", "text"],
                "properties": {"type": {"enum": ["say"]}, "text": {"type": "string", "maxLength": 20}},
            }
        )
    )
    gw = await gateway(
        f"""
    routes:
      - path: /strict
        upstream: {upstream.url()}
        auth: none
        messages: {{client: {{schema_file: {schema}}}}}
      - path: /lenient
        upstream: {upstream.url()}
        auth: none
        messages: {{client: {{schema_file: {schema}, on_violation: drop}}}}
    """
    )
    good = json.dumps({"type": "say", "text": "hi"}).encode()
    bad = json.dumps({"type": "shout", "text": "HI"}).encode()
    ws, _ = await RawClient.connect(gw.port, "/strict")
    ws.send_frame(TEXT, good)
    assert await ws.recv_message() == (TEXT, good)
    ws.send_frame(TEXT, bad)
    frame = await ws.recv_close()
    assert frame.close_code == 1008 and frame.close_reason.startswith("message does not match the schema")

    ws, _ = await RawClient.connect(gw.port, "/lenient")
    ws.send_frame(TEXT, bad)
    ws.send_frame(TEXT, good)
    assert await ws.recv_message() == (TEXT, good)  # the bad one was dropped, the session lives
    ws.send_close(1000)
    await ws.recv_close()
    closed = await log_events.wait_for("session.close", route="/lenient")
    assert closed["dropped"] == 1


async def test_upstream_direction_rules(gateway, upstream, client):
    extra = "        messages: {upstream: {max_message_size: 100B}}"
    gw = await gateway(route(upstream.url(), extra))
    async with client.ws_connect(gw.url()) as ws:
        await ws.send_bytes(b"a" * 100)
        assert (await ws.receive(timeout=5)).data == b"a" * 100
        await ws.send_bytes(b"b" * 101)  # fine from the client, too big when the upstream echoes it
        message = await ws.receive(timeout=5)
        assert message.data == 1001
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 5)
    assert record.close_code == 1009


async def test_violation_on_one_session_leaves_others_alone(gateway, upstream, client):
    gw = await gateway(route(upstream.url(), ""))
    async with client.ws_connect(gw.url()) as healthy:
        ws, _ = await RawClient.connect(gw.port, "/echo")
        ws.send_frame(TEXT, b"\xff")
        assert (await ws.recv_close()).close_code == 1007
        await healthy.send_str("fine")
        assert (await healthy.receive(timeout=5)).data == "fine"


async def test_deeply_nested_json_is_a_violation_not_a_crash(gateway, upstream, log_events):
    gw = await gateway(
        f"""
    routes:
      - path: /strict
        upstream: {upstream.url()}
        auth: none
        messages: {{client: {{json: true}}}}
      - path: /lenient
        upstream: {upstream.url()}
        auth: none
        messages: {{client: {{json: true, on_violation: drop}}}}
    """
    )
    deep = b"[" * 50000 + b"]" * 50000
    ws, _ = await RawClient.connect(gw.port, "/strict")
    ws.send_frame(TEXT, deep)
    frame = await ws.recv_close()
    assert (frame.close_code, frame.close_reason) == (1007, "text message is not valid JSON")
    ws, _ = await RawClient.connect(gw.port, "/lenient")
    ws.send_frame(TEXT, deep)
    ws.send_frame(TEXT, b"[1]")
    assert await ws.recv_message() == (TEXT, b"[1]")
    assert not [event for event in log_events.events if event["level"] == "error"]
