"""``wsgate demo`` as a newcomer runs it: the real process, and every shell line it prints pasted into a
shell, each showing the answer it promises (101, 401, 403, 429, close 1008, close 1009); and ``wsgate
client``, the command those lines use, reporting refusals and closes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from conftest import WsgateProcess, free_port

WSGATE = Path(sys.executable).with_name("wsgate")
#: What each printed line must show, by the words its comment starts with.
EXPECTED = {
    "101": r"^HTTP/1\.1 101 Switching Protocols",
    "401": r'^HTTP/1\.1 401 Unauthorized.*"error":"auth_missing"',
    "403": r'^HTTP/1\.1 403 Forbidden.*"error":"origin"',
    "close 1008": r"^closed by the server: 1008 rate limit exceeded$",
    "close 1009": r"^closed by the server: 1009 ",
    # the handshake-rate loop comes last: every handshake before it spent from the same bucket
    "429": r"^(?:(?:401|429) )*429 (?:(?:401|429) )*$",
}


@dataclass
class Demo:
    process: WsgateProcess
    port: int
    admin_port: int
    #: Where the printed lines run: a directory holding ``.venv/bin/wsgate``, as README's set-up shell does.
    shell_directory: Path

    @property
    def output(self) -> list[str]:
        return self.process.lines

    def tries(self) -> dict[str, str]:
        """The printed shell lines, by what their comment line says they show."""
        found = {}
        for comment, line in zip(self.output, self.output[1:], strict=False):
            if comment.startswith("  # ") and not line.startswith("  # "):
                found[comment[4:]] = line.strip()
        return found

    def line_showing(self, answer: str) -> str:
        matches = [
            line for shows, line in self.tries().items() if shows.startswith((answer + " ", answer + ":"))
        ]
        assert len(matches) == 1, f"no single printed line shows {answer!r}: {self.tries()}"
        return matches[0]

    def token(self) -> str:
        for line in self.output:
            match = re.match(r"^  token \(.*\): (\S+)$", line)
            if match:
                return match.group(1)
        raise AssertionError(f"no token printed: {self.output}")

    def paste(self, line: str) -> subprocess.CompletedProcess[str]:
        """Run one printed line in a POSIX shell, as pasting it would."""
        return subprocess.run(
            line,
            shell=True,
            cwd=self.shell_directory,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )


def _wait_until_serving(process: WsgateProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.events("gateway.listening") and any(line == "Stop with Ctrl-C." for line in process.lines):
            return
        if process.process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"wsgate demo is not serving: stdout={process.lines} stderr={process.stderr}")


@pytest.fixture
def demo(wsgate_process, tmp_path) -> Iterator[Demo]:
    port, admin_port = free_port(), free_port()
    process = wsgate_process(
        "demo", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin_port}", "--log-format", "json"
    )
    _wait_until_serving(process)
    bin_directory = tmp_path / ".venv" / "bin"
    bin_directory.mkdir(parents=True)
    (bin_directory / "wsgate").symlink_to(WSGATE)
    yield Demo(process, port, admin_port, tmp_path)


def test_every_printed_line_shows_the_answer_it_promises(demo):
    token = demo.token()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60
    outputs = {}
    for answer, expected in EXPECTED.items():
        line = demo.line_showing(answer)
        assert f"127.0.0.1:{demo.port}/secure" in line
        result = demo.paste(line)
        outputs[answer] = result.stdout
        flat = result.stdout.replace("\r\n", "\n")
        assert re.search(expected, flat, re.M | re.S), f"{answer}: {line}\n{result.stdout}{result.stderr}"
        assert "Traceback" not in result.stderr
    # the printed token is what admits the 101 line; the 401 line, without it, is refused
    assert token in demo.line_showing("101")
    assert token not in demo.line_showing("401")
    assert "< hello" in outputs["close 1008"]
    assert outputs["close 1008"].count("< hello") < 10


def test_the_handshake_rate_loop_trips_the_rate_on_its_own(demo):
    result = demo.paste(demo.line_showing("429"))
    codes = result.stdout.split()
    assert len(codes) == 10, result.stdout + result.stderr
    # the burst of 5 is refused for its missing token, then the rate refuses before the token is read
    assert codes[:5] == ["401"] * 5 and "429" in codes[5:], codes
    assert set(codes) == {"401", "429"}


def test_the_open_route_lines_echo_and_refuse_plain_http(demo):
    comment = demo.output.index(
        "  # the open route: a WebSocket client, and a plain HTTP request refused with 426"
    )
    client_line, curl_line = demo.output[comment + 1].strip(), demo.output[comment + 2].strip()
    echoed = demo.paste(client_line)
    assert "< hello" in echoed.stdout.splitlines()
    assert echoed.stdout.splitlines()[-1] == "closed by the server: 4000 bye", echoed.stdout + echoed.stderr
    refused = demo.paste(curl_line)
    assert refused.stdout.startswith("HTTP/1.1 426 Upgrade Required"), refused.stdout


def test_the_printed_policy_and_admin_address_are_the_ones_serving(demo):
    assert any(
        line.startswith(f"  admin:         http://127.0.0.1:{demo.admin_port}/ ") for line in demo.output
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{demo.admin_port}/healthz", timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read()) == {"status": "ok"}
    with urllib.request.urlopen(f"http://127.0.0.1:{demo.admin_port}/policy", timeout=10) as response:
        assert json.loads(response.read())["routes"] == ["/echo", "/secure"]
    policy_lines = [line[4:] for line in demo.output if line.startswith("  | ")]
    assert f'listen: {{address: "127.0.0.1:{demo.port}"}}' in policy_lines
    assert any(line.strip().startswith("secret_env: WSGATE_DEMO_SECRET") for line in policy_lines)
    listening = demo.process.events("gateway.listening")[0]
    assert listening["admin"] == f"127.0.0.1:{demo.admin_port}"
    assert listening["routes"] == ["/echo", "/secure"]


def test_the_admin_listener_defaults_to_a_fixed_printed_address():
    from proxy.cli import build_parser

    assert build_parser().parse_args(["demo"]).admin == "127.0.0.1:9090"


def test_client_reports_refusals_closes_and_unreachable_addresses(demo):
    secure = f"ws://127.0.0.1:{demo.port}/secure"

    def client(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(WSGATE), "client", *args], capture_output=True, text=True, timeout=60, input=stdin or ""
        )

    missing = client(secure)
    assert missing.stdout == (
        "refused: HTTP 401 auth_missing: a bearer token is required"
        ' (WWW-Authenticate: Bearer realm="wsgate")\n'
    )
    assert missing.returncode == 2
    wrong_origin = client(secure, "--token", demo.token(), "--origin", "https://evil.example")
    assert wrong_origin.stdout == "refused: HTTP 403 origin: origin not allowed\n"
    assert wrong_origin.returncode == 2
    admitted = client(
        secure, "--token", demo.token(), "--origin", "https://app.example.com", stdin="one\ntwo\n"
    )
    lines = admitted.stdout.splitlines()
    assert lines[0] == f"connected: HTTP 101 {secure} (subprotocol: none)", admitted.stdout
    assert sorted(lines[1:-1]) == ["< one", "< two", "> one", "> two"], admitted.stdout
    assert lines.index("> one") < lines.index("< one") and lines.index("< one") < lines.index("< two")
    assert lines[-1] == "closed: 1000 (by this client)"
    assert admitted.returncode == 0, admitted.stdout + admitted.stderr
    unreachable = client(f"ws://127.0.0.1:{free_port()}/x")
    assert unreachable.stdout.startswith("error: cannot connect to ws://127.0.0.1:")
    assert unreachable.returncode == 1
    assert "Traceback" not in missing.stderr + wrong_origin.stderr + admitted.stderr + unreachable.stderr


def test_ctrl_c_stops_the_demo(demo):
    demo.process.signal(signal.SIGINT)
    assert demo.process.process.wait(timeout=30) == 0


def test_client_sends_stdin_lines_as_they_come_and_waits_after_the_last(demo):
    """A line typed long after the previous echo still gets its answer: the quiet time counts from the
    last message sent, not the last one received."""
    client = subprocess.Popen(
        [str(WSGATE), "client", f"ws://127.0.0.1:{demo.port}/echo"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdin is not None and client.stdout is not None
        assert client.stdout.readline().startswith("connected: HTTP 101")
        client.stdin.write("first\n")
        client.stdin.flush()
        assert client.stdout.readline() == "> first\n"
        assert client.stdout.readline() == "< first\n"
        time.sleep(1.5)  # longer than --wait's default of 1 s
        client.stdin.write("close:4001\n")
        client.stdin.close()
        client.wait(timeout=60)
        rest = client.stdout.read()
        errors = client.stderr.read() if client.stderr is not None else ""
    finally:
        client.kill()
    assert rest.splitlines() == ["> close:4001", "closed by the server: 4001 bye"], rest + errors
    assert client.returncode == 2


def test_a_second_demo_on_the_same_ports_refuses_to_start(demo):
    """The listeners share ports with SO_REUSEPORT (for restarts), so a second demo would silently take
    half the connections, and its token would fail on the other half: it exits 1 saying what to pass."""
    for argv in (
        ["--listen", f"127.0.0.1:{demo.port}", "--admin", f"127.0.0.1:{free_port()}"],
        ["--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{demo.admin_port}"],
    ):
        second = subprocess.run(
            [str(WSGATE), "demo", *argv], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
        assert second.returncode == 1, second
        assert "is in use" in second.stderr and ("--listen" in second.stderr or "--admin" in second.stderr)
    # the first demo still answers alone
    result = demo.paste(demo.line_showing("101"))
    assert re.search(EXPECTED["101"], result.stdout, re.MULTILINE), result
