"""What the Redis limiter logs about its server: never the user or the password of its URL."""

from __future__ import annotations

import pytest

from proxy.limiter.redis import redacted_url


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@redis.internal:6380/2", "redis://redis.internal:6380/2"),
        ("rediss://wsgate:s3cret@[::1]:6379/0?ssl_cert_reqs=none", "rediss://[::1]:6379/0"),
        ("redis://redis", "redis://redis"),
    ],
)
def test_the_url_is_logged_without_its_credentials(url, logged):
    assert redacted_url(url) == logged
