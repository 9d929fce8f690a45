"""``wsgate schema``, and ``check``/``explain`` where the production secret is not set (a CI runner)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO

WSGATE = str(Path(sys.executable).with_name("wsgate"))
EXAMPLES = sorted((REPO / "policies").glob("*.yaml"))
SECRET_POLICY = """\
version: 1
firewall:
  rules:
    - deny: 192.0.2.0/24
auth:
  main:
    secret_env: WSGATE_TEST_UNSET_SECRET
    algorithms: [HS256]
routes:
  - path: /chat
    upstream: ws://127.0.0.1:9/
    auth: main
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "WSGATE_TEST_UNSET_SECRET"}
    environment.update(env or {})
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, env=environment
    )


def test_schema_prints_a_draft_2020_12_schema_every_example_policy_validates_against():
    result = run(WSGATE, "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in EXAMPLES:
        assert list(validator.iter_errors(yaml.safe_load(path.read_text()))) == [], path.name
    misspelt = yaml.safe_load((REPO / "policies" / "minimal.yaml").read_text())
    misspelt["routes"][0]["upstreams"] = misspelt["routes"][0].pop("upstream")
    assert not validator.is_valid(misspelt)


def test_schema_markdown_is_the_reference_table():
    result = run(WSGATE, "schema", "--format", "markdown")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("| key | kind | default | where | what it does |")
    assert "| `limits.handshakes_per_ip` | rate |  | policy-wide, per route |" in result.stdout


@pytest.fixture
def secret_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(SECRET_POLICY)
    return path


def test_check_without_the_secret_warns_and_passes(secret_policy):
    result = run(WSGATE, "check", "-c", str(secret_policy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {secret_policy}")
    assert result.stderr == (
        f"warning: {secret_policy}:7: auth.main.secret_env: environment variable WSGATE_TEST_UNSET_SECRET is "
        "not set; wsgate serve would refuse this policy\n"
    )


def test_check_with_the_secret_says_nothing_more(secret_policy):
    result = run(WSGATE, "check", "-c", str(secret_policy), env={"WSGATE_TEST_UNSET_SECRET": "s" * 32})
    assert (result.returncode, result.stderr) == (0, "")


def test_check_still_refuses_a_secret_that_is_set_but_short(secret_policy):
    result = run(WSGATE, "check", "-c", str(secret_policy), env={"WSGATE_TEST_UNSET_SECRET": "short"})
    assert result.returncode == 1
    assert "HMAC needs at least 32" in result.stderr


def test_serve_without_the_secret_exits_1_naming_the_variable(secret_policy):
    result = run(WSGATE, "serve", "-c", str(secret_policy))
    assert result.returncode == 1
    assert result.stderr == (
        f"error: {secret_policy}:7: auth.main.secret_env: "
        "environment variable WSGATE_TEST_UNSET_SECRET is not set\n"
    )


def test_explain_answers_a_firewall_question_without_the_secret(secret_policy):
    result = run(WSGATE, "explain", "-c", str(secret_policy), "--ip", "192.0.2.7", "/chat")
    assert result.returncode == 2, result.stderr
    assert "answer    403 firewall: client address not allowed" in result.stdout


def test_explain_answers_a_missing_token_and_given_claims_without_the_secret(secret_policy):
    result = run(WSGATE, "explain", "-c", str(secret_policy), "--ip", "198.51.100.1", "/chat")
    assert result.returncode == 2, result.stderr
    assert "answer    401 auth_missing" in result.stdout
    claims = json.dumps({"sub": "alice", "exp": 4_000_000_000})
    result = run(
        WSGATE, "explain", "-c", str(secret_policy), "--ip", "198.51.100.1", "--claims", claims, "/chat"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "answer    101" in result.stdout


def test_explain_with_a_token_it_cannot_verify_here_says_so_after_the_steps_it_can_judge(secret_policy):
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    result = run(
        WSGATE, "explain", "-c", str(secret_policy), "--ip", "198.51.100.1", "--token", token, "/chat"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "firewall                 pass" in result.stdout
    assert (
        "token                    not evaluated: the secret in WSGATE_TEST_UNSET_SECRET is not set"
        in result.stdout
    )
    assert "revocation               not reached" in result.stdout
    assert "answer    undecided: the secret in WSGATE_TEST_UNSET_SECRET is not set here" in result.stdout
    assert "Traceback" not in result.stderr
    refused = run(WSGATE, "explain", "-c", str(secret_policy), "--ip", "192.0.2.9", "--token", token, "/chat")
    assert refused.returncode == 2
    assert "answer    403 firewall" in refused.stdout


def test_check_warns_about_a_burst_that_does_nothing_without_its_rate(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\n"
        "limits:\n"
        "  handshake_burst: 5\n"
        "routes:\n"
        "  - path: /a\n"
        "    upstream: ws://127.0.0.1:9/\n"
        "    auth: none\n"
        "    limits: {messages_per_connection: 10/s, message_burst: 20, byte_burst: 1MiB}\n"
    )
    result = run(WSGATE, "check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: {path}:3: limits.handshake_burst: does nothing without handshakes_per_ip",
        f"warning: {path}:8: routes[0].limits.byte_burst: does nothing without bytes_per_connection",
    ]


async def test_serve_logs_the_policy_warnings_at_start(gateway, upstream, log_events):
    await gateway(
        f"""
    limits: {{message_burst: 5}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    warnings = log_events.named("policy.warning")
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert warnings[0]["warning"].endswith(
        "limits.message_burst: does nothing without messages_per_connection"
    )
