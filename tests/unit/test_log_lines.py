"""Log lines are batched per event-loop iteration: one write, every line whole, in order, never held
past the iteration that logged them."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from proxy import logs


class CountingStream(io.StringIO):
    """A stream that counts the writes it gets (each would be one system call on stdout)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def handler_on(stream: CountingStream) -> logs.BatchingStreamHandler:
    handler = logs.BatchingStreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    return handler


def record(number: int) -> logging.LogRecord:
    entry = logging.LogRecord("wsgate", logging.INFO, __file__, 0, "session.close", None, None)
    entry.fields = {"n": number}
    return entry


async def test_the_lines_of_one_iteration_are_written_together_and_in_order() -> None:
    stream = CountingStream()
    handler = handler_on(stream)
    for number in range(50):
        handler.handle(record(number))
    assert stream.getvalue() == ""  # still this iteration
    await asyncio.sleep(0)
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["n"] for line in lines] == list(range(50))
    assert stream.writes == 1
    handler.handle(record(50))
    await asyncio.sleep(0)
    assert json.loads(stream.getvalue().splitlines()[-1])["n"] == 50
    assert stream.writes == 2


def test_without_a_running_loop_each_line_is_written_at_once() -> None:
    stream = CountingStream()
    handler = handler_on(stream)
    handler.handle(record(1))
    assert json.loads(stream.getvalue())["n"] == 1


async def test_a_flush_writes_what_waits() -> None:
    stream = CountingStream()
    handler = handler_on(stream)
    handler.handle(record(7))
    handler.flush()  # logging.shutdown does this at exit
    assert json.loads(stream.getvalue())["n"] == 7
    await asyncio.sleep(0)
    assert stream.writes == 1


def test_timestamps_keep_their_milliseconds_within_one_second() -> None:
    assert logs._timestamp(1796000000.5) == "2026-11-30T00:53:20.500Z"
    assert logs._timestamp(1796000000.25) == "2026-11-30T00:53:20.250Z"
    assert logs._timestamp(1796000001.0) == "2026-11-30T00:53:21.000Z"


async def test_a_line_the_stream_cannot_write_costs_only_itself() -> None:
    stream = CountingStream()
    handler = handler_on(stream)
    bad = record(2)
    bad.fields = {"n": 2, "subject": "\ud800"}  # a lone surrogate, as a JSON claim may carry
    original = stream.write

    def strict_write(text: str) -> int:
        text.encode("utf-8")  # what a UTF-8 stdout does
        return original(text)

    stream.write = strict_write  # type: ignore[method-assign]
    for entry in (record(1), bad, record(3)):
        handler.handle(entry)
    await asyncio.sleep(0)
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == [1, 3]


async def test_writes_of_many_lines_stay_within_pipe_buf_and_end_at_line_ends() -> None:
    stream = CountingStream()
    pieces: list[str] = []
    original = stream.write

    def recording_write(text: str) -> int:
        pieces.append(text)
        return original(text)

    stream.write = recording_write  # type: ignore[method-assign]
    handler = handler_on(stream)
    for number in range(200):
        entry = record(number)
        entry.fields = {"n": number, "detail": "é" * 100}
        handler.handle(entry)
    await asyncio.sleep(0)
    assert len(pieces) > 1
    assert all(len(piece.encode()) <= logs.PIPE_BUF and piece.endswith("\n") for piece in pieces)
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == list(range(200))
