"""Firewall rules, origin patterns, the limiter arithmetic, claim rules and message rules."""

from ipaddress import ip_address, ip_network

import pytest

from proxy.guards.origin import origin_allowed
from proxy.guards.token import claims_allowed, fingerprint
from proxy.limiter.memory import MemoryLimiter
from proxy.policy.model import ClaimRule, Firewall, FirewallRule, MessageRate, MessageRules, OriginPattern
from proxy.rules import MessageChecker, Violation


def test_firewall_first_match_wins_then_default() -> None:
    firewall = Firewall(
        (FirewallRule(False, ip_network("203.0.113.0/24")), FirewallRule(True, ip_network("203.0.0.0/8"))),
        default_allow=False,
    )
    assert not firewall.allows(ip_address("203.0.113.5"))
    assert firewall.allows(ip_address("203.1.1.1"))
    assert not firewall.allows(ip_address("198.51.100.1"))
    assert not firewall.allows(ip_address("2001:db8::1"))


def test_firewall_ipv6_rules() -> None:
    firewall = Firewall((FirewallRule(False, ip_network("2001:db8::/32")),), default_allow=True)
    assert not firewall.allows(ip_address("2001:db8::1"))
    assert firewall.allows(ip_address("2001:db9::1"))
    assert firewall.allows(ip_address("192.0.2.1"))


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("https://APP.example.com", True),
        ("https://app.example.com:443", True),
        ("http://app.example.com", False),
        ("https://app.example.com:8443", False),
        ("https://a.tenant.example.com", True),
        ("https://tenant.example.com", False),
        ("https://evil-tenant.example.com", False),
        ("https://tenant.example.com.evil.org", False),
        ("null", False),
        ("", False),
    ],
)
def test_origin_patterns(origin: str, allowed: bool) -> None:
    patterns = (
        OriginPattern.parse("https://app.example.com"),
        OriginPattern.parse("https://*.tenant.example.com"),
    )
    assert origin_allowed(origin, patterns) is allowed


@pytest.mark.parametrize("bad", ["app.example.com", "ftp://x.com", "https://x.com/path", "https://*"])
def test_origin_pattern_refuses_non_origins(bad: str) -> None:
    with pytest.raises(ValueError):
        OriginPattern.parse(bad)


def test_gcra_allows_the_burst_then_paces() -> None:
    limiter = MemoryLimiter()
    results = [limiter.hit_now("ip:1", rate=10.0, burst=5, now=100.0) for _ in range(6)]
    assert results[:5] == [0.0] * 5
    assert results[5] == pytest.approx(0.1)
    assert limiter.hit_now("ip:1", rate=10.0, burst=5, now=100.1) == 0.0


def test_limiter_state_for_idle_addresses_is_evicted() -> None:
    limiter = MemoryLimiter(sweep_interval=1.0)
    for number in range(10_000):
        limiter.hit_now(f"ip:{number}", rate=10.0, burst=2, now=0.0)
    assert limiter.tracked_keys == 10_000
    limiter.hit_now("ip:late", rate=10.0, burst=2, now=5.0)
    assert limiter.tracked_keys == 1


async def test_connection_slots_are_capped_and_released() -> None:
    limiter = MemoryLimiter()
    assert await limiter.acquire("ip:1", 2)
    assert await limiter.acquire("ip:1", 2)
    assert not await limiter.acquire("ip:1", 2)
    await limiter.release("ip:1")
    assert await limiter.acquire("ip:1", 2)
    await limiter.release("ip:1")
    await limiter.release("ip:1")
    assert limiter.tracked_keys == 0


def test_claim_rules_exact_list_and_scope_string() -> None:
    rules = (ClaimRule("scope", ("chat",)), ClaimRule("tier", ("gold", "silver")))
    assert claims_allowed({"scope": "read chat", "tier": "gold"}, rules) is None
    assert claims_allowed({"scope": ["chat"], "tier": "silver"}, rules) is None
    assert claims_allowed({"scope": "read", "tier": "gold"}, rules) == rules[0]
    assert claims_allowed({"scope": "chat"}, rules) == rules[1]


def test_fingerprint_is_short_and_not_the_token() -> None:
    print_ = fingerprint("eyJhbGciOi.secret.sig")
    assert len(print_) == 12 and "secret" not in print_


def verdict(violation: Violation | None) -> tuple[int, str] | None:
    return None if violation is None else (violation.code, violation.reason)


def test_message_rules_utf8_json_schema_and_types() -> None:
    rules = MessageRules(
        max_message_bytes=1024,
        types=frozenset({1}),
        json=True,
        schema={"type": "object", "required": ["op"]},
    )
    checker = MessageChecker(rules, None, now=0.0)
    assert verdict(checker.start(2, 10, 0.0)) == (1003, "binary messages not allowed")
    assert checker.gathers_text  # JSON and schema rules read whole messages
    assert checker.content(1, b'{"op": "x"}') is None
    assert verdict(checker.content(1, b"\xff")) == (1007, "text message is not valid UTF-8")
    assert verdict(checker.content(1, b"{")) == (1007, "text message is not valid JSON")
    code, reason = verdict(checker.content(1, b"{}")) or (0, "")
    assert code == 1008 and reason.startswith("message does not match the schema")
    assert checker.violations == {"type": 1, "utf8": 1, "json": 1, "schema": 1}


def test_message_rate_bucket() -> None:
    checker = MessageChecker(
        MessageRules(max_message_bytes=0, utf8=False),
        MessageRate(messages_per_second=10, message_burst=3),
        0.0,
    )
    verdicts = [verdict(checker.start(2, 1, 0.0)) for _ in range(4)]
    assert verdicts[:3] == [None, None, None]
    assert verdicts[3] == (1008, "rate limit exceeded")
    assert checker.start(2, 1, 0.2) is None


def test_control_frames_count_against_the_message_rate_and_a_close_is_never_refused() -> None:
    checker = MessageChecker(
        MessageRules(max_message_bytes=0, utf8=False),
        MessageRate(messages_per_second=1, message_burst=2),
        0.0,
    )
    assert checker.control(0.0) is None
    assert checker.start(2, 1, 0.0) is None
    assert verdict(checker.control(0.0)) == (1008, "rate limit exceeded")
    assert checker.control(0.0, refuse=False) is None


def test_byte_rate_bucket() -> None:
    checker = MessageChecker(
        MessageRules(max_message_bytes=0, utf8=False), MessageRate(bytes_per_second=100, byte_burst=150), 0.0
    )
    assert checker.start(2, 100, 0.0) is None
    assert verdict(checker.start(2, 100, 0.0)) == (1008, "rate limit exceeded")
    assert checker.start(2, 100, 1.0) is None


def test_continuation_bytes_refuse_in_close_mode_and_go_into_debt_in_drop_mode() -> None:
    rate = MessageRate(bytes_per_second=100, byte_burst=150)
    closing = MessageChecker(MessageRules(max_message_bytes=0, utf8=False), rate, 0.0)
    assert closing.start(2, 100, 0.0) is None
    assert verdict(closing.more(100, 0.0)) == (1008, "rate limit exceeded")
    dropping = MessageChecker(
        MessageRules(max_message_bytes=0, utf8=False),
        MessageRate(bytes_per_second=100, byte_burst=150, on_limit="drop"),
        0.0,
    )
    assert dropping.start(2, 100, 0.0) is None
    assert dropping.more(100, 0.0) is None  # half a message cannot be dropped: the bucket owes 50 bytes
    violation = dropping.start(2, 100, 1.0)
    assert violation is not None and violation.drop


def test_close_code_labels_group_only_client_chosen_codes() -> None:
    from proxy.metrics import close_code_label

    assert close_code_label(4321, "client") == "4xxx"
    assert close_code_label(3001, "client") == "3xxx"
    assert close_code_label(1000, "client") == "1000"
    assert close_code_label(4000, "upstream") == "4000"
    assert close_code_label(1008, "gateway") == "1008"
    assert close_code_label(None, None) == "none"
