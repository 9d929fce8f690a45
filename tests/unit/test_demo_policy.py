"""The demo's policy and token, built in-process: the secret reaches the loader and nothing else."""

from __future__ import annotations

import os
import secrets
import time

import jwt

from proxy.demo import DEMO_POLICY, SECRET_ENV, banner, demo_token, load_demo_policy


def _policy_text() -> str:
    return DEMO_POLICY.format(
        listen="127.0.0.1:8080",
        admin="127.0.0.1:9090",
        upstream_port=9001,
        secret_env=SECRET_ENV,
        origin="https://app.example.com",
    )


def test_the_secret_is_the_providers_and_leaves_no_environment_variable_behind():
    secret = secrets.token_urlsafe(32)
    policy = load_demo_policy(_policy_text(), secret)
    assert policy.provider("demo").secret == secret.encode()
    assert SECRET_ENV not in os.environ
    assert secret not in repr(policy)


def test_the_printed_text_holds_a_token_of_that_secret_but_never_the_secret():
    secret = secrets.token_urlsafe(32)
    now = time.time()
    token = demo_token(secret, now)
    claims = jwt.decode(token, secret, algorithms=["HS256"], issuer="wsgate-demo")
    assert claims["exp"] == int(now) + 3600
    printed = banner(_policy_text(), "127.0.0.1:8080", "127.0.0.1:9090", token)
    assert token in printed
    assert secret not in printed
    assert "http://127.0.0.1:9090/" in printed
