"""Request reader micro-benchmark: µs per reading of a browser's upgrade request, h11 alone against the
httptools path (llhttp's split, checked against h11's grammar).

Not collected by pytest. Run:  .venv/bin/python tests/bench/request_reader_bench.py [--rounds 9]

Rows: ``h11`` (the reference, alone), ``httptools`` (the path the reader takes), ``declined`` (a head
the httptools path hands to h11: its attempt, then h11). The request is Chromium's upgrade request with
an ``Authorization: Bearer`` token of about 300 characters and a cookie, about 1 KB, read from one piece
as it usually arrives. Each reading is a new :class:`~proxy.request_reader.RequestReader` fed the whole
request, as the listener does per connection. Time is this process's CPU time (``time.process_time``),
so that waiting for a core shared with other work is not counted; the rows run in alternating rounds
(A B A B) so that what noise remains (caches, clock speed) falls on all alike. The figures printed are
the median and the best round, in µs of CPU per reading.
"""

from __future__ import annotations

import argparse
import statistics
import time

from proxy.request_reader import Parser, RequestHead, RequestReader

TOKEN = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiJ1c2VyLTEyMzQ1Njc4OTAiLCJuYW1lIjoiSmFuZSBEb2UiLCJpc3MiOiJodHRwczovL2lkcC5leGFtcGxlLmNvbSIs"
    "ImF1ZCI6IndzZ2F0ZSIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjoxNzAwMDAzNjAwLCJzY29wZSI6ImNoYXQ6cmVhZCBjaGF0OndyaXRlIn0."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c-dGhlIHNhbXBsZSBub25jZQ"
)
REQUEST = (
    "GET /chat?room=lobby HTTP/1.1\r\n"
    "Host: gateway.example.com\r\n"
    "Connection: Upgrade\r\n"
    "Pragma: no-cache\r\n"
    "Cache-Control: no-cache\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36\r\n"
    "Upgrade: websocket\r\n"
    "Origin: https://app.example.com\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "Accept-Encoding: gzip, deflate, br, zstd\r\n"
    "Accept-Language: en-US,en;q=0.9\r\n"
    f"Authorization: Bearer {TOKEN}\r\n"
    "Cookie: session=5f2b8c1e9a7d4e3b; theme=dark; _ga=GA1.2.1234567890.1700000000\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    "\r\n"
).encode()


#: The same request with two spaces after one colon: llhttp trims them, so h11 must read it (the
#: httptools path's cost when it declines: its attempt, then h11).
DECLINED = REQUEST.replace(b"Pragma: ", b"Pragma:  ", 1)

#: Each row: its name, the reader's parser, the request.
ROWS: tuple[tuple[str, Parser, bytes], ...] = (
    ("h11", "h11", REQUEST),
    ("httptools", "httptools", REQUEST),
    ("declined", "httptools", DECLINED),
)


def per_reading(parser: Parser, request: bytes, number: int) -> float:
    """µs of CPU per reading, over ``number`` readings."""
    start = time.process_time()
    for _ in range(number):
        RequestReader(8192, parser=parser).receive_data(request)
    return (time.process_time() - start) / number * 1e6


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--rounds", type=int, default=9, help="rounds per path, alternating")
    arguments.add_argument("--number", type=int, default=5000, help="readings per round")
    options = arguments.parse_args()

    reader = RequestReader(8192)
    head = reader.receive_data(REQUEST)
    assert isinstance(head, RequestHead) and reader.parsed_by == "httptools"
    assert head == RequestReader(8192, parser="h11").receive_data(REQUEST)

    declined = RequestReader(8192)
    assert declined.receive_data(DECLINED) == head and declined.parsed_by == "h11"

    for _, parser, request in ROWS:  # warm up
        per_reading(parser, request, options.number // 10)
    rounds: dict[str, list[float]] = {name: [] for name, _, _ in ROWS}
    for _ in range(options.rounds):
        for name, parser, request in ROWS:
            rounds[name].append(per_reading(parser, request, options.number))

    print(f"request: {len(REQUEST)} bytes, {len(head.headers)} headers")
    print(f"{options.rounds} rounds of {options.number} readings per row, alternating")
    print(f"{'path':<12}{'median µs CPU':>16}{'best µs CPU':>14}")
    for name, _, _ in ROWS:
        print(f"{name:<12}{statistics.median(rounds[name]):>16.1f}{min(rounds[name]):>14.1f}")
    ratio = statistics.median(rounds["h11"]) / statistics.median(rounds["httptools"])
    print(f"h11 / httptools (medians): {ratio:.1f}x")


if __name__ == "__main__":
    main()
