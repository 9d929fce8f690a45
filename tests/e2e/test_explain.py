"""``wsgate explain``: the route, each guard's verdict in order, and the answer, without a server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

WSGATE = str(Path(sys.executable).with_name("wsgate"))
SECRET = "explain-test-secret-0123456789-abcdefghij"

POLICY = """\
version: 1
listen: {address: "127.0.0.1:0"}
trusted_proxies: [10.0.0.0/8]
firewall:
  default: allow
  rules:
    - deny: 203.0.113.0/24
auth:
  main:
    algorithms: [HS256]
    secret_env: WSGATE_EXPLAIN_SECRET
    issuer: https://id.test/
    required_claims: {scope: chat}
revoked: {subjects: [mallory]}
limits: {handshakes_per_ip: 5/s, handshake_burst: 10, connections_per_ip: 3}
routes:
  - path: /chat
    match: prefix
    upstream: ws://chat.internal:8000/ws
    auth: main
    origins: ["https://app.test"]
  - path: /open
    upstream: ws://open.internal:8000/
    auth: none
"""


@pytest.fixture
def policy(tmp_path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def explain(policy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [WSGATE, "explain", "-c", str(policy), *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={"WSGATE_EXPLAIN_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
    )


def token(**claims) -> str:
    base = {"sub": "alice", "iss": "https://id.test/", "scope": "read chat", "exp": int(time.time()) + 600}
    return jwt.encode({**base, **claims}, SECRET, algorithm="HS256")


def verdicts(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        if line.startswith("  ") and ". " in line:
            _, _, rest = line.partition(". ")
            name, _, verdict = rest.partition("  ")
            found[name.strip()] = verdict.strip()
    return found


def test_allowed_with_a_token(policy):
    result = explain(
        policy, "--ip", "198.51.100.7", "--origin", "https://app.test", "--token", token(), "/chat/r1"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "route     /chat (prefix) -> ws://chat.internal:8000/ws, auth: main" in result.stdout
    steps = verdicts(result.stdout)
    assert list(steps) == [
        "websocket upgrade",
        "firewall",
        "origin",
        "handshakes per IP",
        "connections per IP",
        "client certificate",
        "token",
        "revocation",
        "connections per subject",
    ]
    assert steps["firewall"] == "pass"
    assert steps["token"].startswith("pass: subject 'alice' via header")
    assert steps["handshakes per IP"].startswith("not evaluated: 5/s, burst 10")
    assert steps["connections per IP"].startswith("not evaluated: at most 3")
    assert "answer    101" in result.stdout


def test_firewall_deny_stops_before_the_token(policy):
    result = explain(policy, "--ip", "203.0.113.9", "--token", "garbage", "/chat")
    assert result.returncode == 2
    steps = verdicts(result.stdout)
    assert steps["firewall"] == "refuse: 403 firewall: client address not allowed"
    assert steps["token"] == "not reached"
    assert "answer    403 firewall" in result.stdout


@pytest.mark.parametrize(
    ("credentials", "expected"),
    [
        ([], "401 auth_missing"),
        (["--token", "not.a.jwt"], "401 auth_invalid"),
        (["--token", "TOKEN_WRONG_KEY"], "401 auth_invalid: token signature does not verify"),
        (["--token", "TOKEN_EXPIRED"], "401 auth_expired"),
        (["--token", "TOKEN_NO_SCOPE"], "403 claims"),
        (["--token", "TOKEN_REVOKED"], "401 revoked"),
    ],
)
def test_bad_tokens(policy, credentials, expected):
    replacements = {
        "TOKEN_WRONG_KEY": jwt.encode(
            {"sub": "a", "iss": "https://id.test/", "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256"
        ),
        "TOKEN_EXPIRED": token(exp=int(time.time()) - 60),
        "TOKEN_NO_SCOPE": token(scope="read"),
        "TOKEN_REVOKED": token(sub="mallory"),
    }
    args = [replacements.get(arg, arg) for arg in credentials]
    result = explain(policy, "--ip", "198.51.100.7", "--origin", "https://app.test", *args, "/chat")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"answer    {expected}" in result.stdout


def test_claims_instead_of_a_token(policy):
    claims = json.dumps({"sub": "bob", "iss": "https://id.test/", "scope": ["chat"], "exp": 9999999999})
    result = explain(
        policy, "--ip", "198.51.100.7", "--origin", "https://app.test", "--claims", claims, "/chat"
    )
    assert result.returncode == 0, result.stdout
    assert (
        verdicts(result.stdout)["token (claims given)"] == "pass: subject 'bob' via claims, provider 'main'"
    )
    claims = json.dumps({"sub": "bob", "iss": "https://id.test/", "scope": "read", "exp": 9999999999})
    result = explain(
        policy, "--ip", "198.51.100.7", "--origin", "https://app.test", "--claims", claims, "/chat"
    )
    assert result.returncode == 2
    assert "answer    403 claims" in result.stdout


def test_origin_and_open_route_and_no_route(policy):
    result = explain(policy, "--ip", "198.51.100.7", "--origin", "https://evil.test", "/chat")
    assert result.returncode == 2
    assert "answer    403 origin" in result.stdout
    result = explain(policy, "--ip", "198.51.100.7", "/open")
    assert result.returncode == 0
    assert verdicts(result.stdout)["token"] == "pass: open route (auth: none)"
    result = explain(policy, "--ip", "198.51.100.7", "/nowhere")
    assert result.returncode == 2
    assert "answer    404 no_route" in result.stdout


def test_bad_arguments_and_bad_policy(policy, tmp_path):
    result = explain(policy, "--ip", "not-an-ip", "/chat")
    assert (result.returncode, result.stderr.strip()) == (1, "error: --ip: not an IP address: 'not-an-ip'")
    result = explain(policy, "--ip", "1.2.3.4", "--claims", "[1]", "/chat")
    assert result.returncode == 1 and "expected a JSON object" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(POLICY.replace("ws://open.internal", "http://open.internal"))
    result = explain(broken, "--ip", "1.2.3.4", "/open")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {broken}:")


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"nbf": 9999999999}, "401 auth_invalid: token not yet valid"),
        ({"exp": "tomorrow"}, "401 auth_invalid"),
        ({"iss": None}, "401 auth_invalid"),
        ({"aud": [["nested"]]}, "answer    "),  # no audience configured: accepted or refused, never a crash
    ],
)
def test_claims_are_judged_by_the_same_checks_as_tokens(policy, claims, expected):
    base = {"sub": "bob", "iss": "https://id.test/", "scope": "chat", "exp": 9999999999}
    merged = {key: value for key, value in {**base, **claims}.items() if value is not None}
    result = explain(
        policy,
        "--ip",
        "198.51.100.7",
        "--origin",
        "https://app.test",
        "--claims",
        json.dumps(merged),
        "/chat",
    )
    assert "Traceback" not in result.stderr
    assert expected in result.stdout, result.stdout
