"""Header parsing shared by the token guard and the upstream request: values in, values out."""

from __future__ import annotations

import jwt
from hypothesis import given
from hypothesis import strategies as st

from proxy.algorithms import ALGORITHMS, HMAC_ALGORITHMS, KEY_TYPE_ALGORITHMS
from proxy.guards.token import find_token
from proxy.handshake import Admission
from proxy.headers import (
    comma_list,
    cookie_pairs,
    cookie_value,
    header_list,
    header_value,
    header_values,
    subprotocol_list,
    without_cookie,
)
from proxy.policy.model import AuthProvider, Limits, Route, Upstream, UpstreamPool
from proxy.request import HandshakeRequest
from proxy.upstream import offered_subprotocols, upstream_query, upstream_request_headers

HEADERS = [
    ("host", "gateway.test"),
    ("x-forwarded-for", "198.51.100.1, 10.0.0.1"),
    ("sec-websocket-protocol", "chat, bearer.abc"),
    ("x-forwarded-for", "10.0.0.2"),
    ("sec-websocket-protocol", " , v2 ,"),
]


def test_header_value_is_the_first_occurrence() -> None:
    assert header_value(HEADERS, "x-forwarded-for") == "198.51.100.1, 10.0.0.1"
    assert header_value(HEADERS, "origin") is None


def test_header_values_are_every_occurrence_in_order() -> None:
    assert header_values(HEADERS, "x-forwarded-for") == ["198.51.100.1, 10.0.0.1", "10.0.0.2"]
    assert header_values(HEADERS, "origin") == []


def test_comma_lists_are_stripped_and_skip_empty_entries() -> None:
    assert comma_list(" a ,b,, c ") == ["a", "b", "c"]
    assert comma_list("") == []
    assert header_list(HEADERS, "x-forwarded-for") == ["198.51.100.1", "10.0.0.1", "10.0.0.2"]


def test_subprotocols_of_every_occurrence_form_one_list() -> None:
    assert subprotocol_list(HEADERS) == ["chat", "bearer.abc", "v2"]


def test_cookie_pairs_split_on_semicolons_only() -> None:
    assert cookie_pairs('a=1; b="two words"; c = 3 ;flag; d=x=y, e=5') == [
        ("a", "1"),
        ("b", "two words"),
        ("c", "3"),
        ("d", "x=y, e=5"),
    ]


def test_cookie_value_is_the_first_non_empty_one_of_any_cookie_header() -> None:
    headers = [("cookie", "access_token=; theme=dark"), ("cookie", "access_token=abc; access_token=def")]
    assert cookie_value(headers, "access_token") == "abc"
    assert cookie_value(headers, "theme") == "dark"
    assert cookie_value(headers, "missing") is None


def test_without_cookie_removes_every_pair_of_that_name_and_keeps_the_rest_as_sent() -> None:
    assert without_cookie("a=1; access_token=abc; b=2", "access_token") == "a=1; b=2"
    assert without_cookie(' access_token = "abc" ;b=2', "access_token") == "b=2"
    assert without_cookie("access_token=abc", "access_token") == ""
    assert without_cookie("a=1; access_token", "access_token") == "a=1"


#: Cookie headers: pairs built from names and values near the edge cases, or any text of their characters.
_COOKIE_PAIRS = st.lists(
    st.tuples(
        st.sampled_from(["at", " at", "at ", "a", "x", "", "at_1"]),
        st.sampled_from(["=", "", " = "]),
        st.sampled_from(["tok", '"tok"', "", '"', "t=k", " t,k ", '"t;"']),
    ),
    max_size=4,
).map(lambda pairs: ";".join(name + separator + value for name, separator, value in pairs))
_COOKIE_TEXT = st.one_of(_COOKIE_PAIRS, st.text(alphabet=st.sampled_from(list('at=; ,"x_1\t')), max_size=40))


@given(values=st.lists(_COOKIE_TEXT, min_size=1, max_size=3), name=st.sampled_from(["at", "a", "at_1", "x"]))
def test_the_cookie_accepted_as_a_token_is_exactly_the_one_removed(values: list[str], name: str) -> None:
    """Whatever the Cookie headers, a cookie the token finder reads is gone from what goes upstream, and
    nothing else is."""
    headers = [("cookie", value) for value in values]
    stripped = [without_cookie(value, name) for value in values]
    assert cookie_value([("cookie", value) for value in stripped], name) is None
    for value, left in zip(values, stripped, strict=True):
        assert all(cookie != name for cookie, _ in cookie_pairs(left))
        assert cookie_pairs(left) == [pair for pair in cookie_pairs(value) if pair[0] != name]
    found = cookie_value(headers, name)
    if found is not None:
        assert (name, found) in [pair for value in values for pair in cookie_pairs(value)]


def test_algorithm_families_cover_every_algorithm_once_and_pyjwt_knows_them() -> None:
    families = [HMAC_ALGORITHMS, *KEY_TYPE_ALGORITHMS.values()]
    named = [algorithm for family in families for algorithm in family]
    assert len(named) == len(set(named)) and set(named) == ALGORITHMS
    assert "none" not in ALGORITHMS
    assert ALGORITHMS.issubset(jwt.algorithms.get_default_algorithms())


def _request(headers: list[tuple[str, str]]) -> HandshakeRequest:
    return HandshakeRequest.build("id", "GET", "/chat", "1.1", headers, "192.0.2.1", "192.0.2.1", False)


def _admission(provider: AuthProvider) -> Admission:
    upstream = Upstream(url="ws://127.0.0.1:9/", secure=False, host="127.0.0.1", port=9, path="", query="")
    route = Route(
        path="/chat",
        match="prefix",
        upstream=UpstreamPool(endpoints=(upstream,)),
        auth=(provider.name,),
        limits=Limits(),
    )
    return Admission(route=route, client_ip="192.0.2.1", forwarded_for="192.0.2.1", providers=(provider,))


_SUBPROTOCOL_TEXT = st.lists(
    st.sampled_from(["bearer.abc", "bearer.", " bearer.x ", "chat", "", "bearer", "v2 ", "xbearer.y"]),
    max_size=4,
).map(",".join)


@given(
    cookies=st.lists(_COOKIE_TEXT, max_size=3),
    subprotocols=st.lists(_SUBPROTOCOL_TEXT, max_size=3),
    cookie_name=st.sampled_from(["at", "a"]),
)
def test_a_token_the_guard_finds_never_reaches_the_upstream(
    cookies: list[str], subprotocols: list[str], cookie_name: str
) -> None:
    """The token guard and the upstream request builder, each through its own entry point: a token found
    in a cookie or a subprotocol is in none of the upstream's headers."""
    for source in ("cookie", "subprotocol"):
        provider = AuthProvider(
            name="p", algorithms=("HS256",), token_sources=(source,), cookie_name=cookie_name
        )
        headers = [("cookie", value) for value in cookies]
        headers += [("sec-websocket-protocol", value) for value in subprotocols]
        request = _request(headers)
        found = find_token(request, provider)
        offered = offered_subprotocols(request, (provider,))
        sent = upstream_request_headers(request, _admission(provider), "127.0.0.1:9", "key", offered)
        if found is None:
            continue
        token, _source = found
        if source == "cookie":
            sent_cookies = [pair for name, value in sent if name == "cookie" for pair in cookie_pairs(value)]
            assert (cookie_name, token) not in sent_cookies
            assert all(name != cookie_name for name, _value in sent_cookies)
        else:
            assert provider.subprotocol_prefix + token not in offered
            assert not any(entry.startswith(provider.subprotocol_prefix) for entry in offered)


def test_a_token_parameter_after_a_semicolon_is_stripped_too() -> None:
    """The guard reads the query split on '&'; an upstream that also splits on ';' must not find a token
    parameter there either."""
    provider = AuthProvider(name="p", algorithms=("HS256",), token_sources=("query",))
    target = "/chat?x=1;access_token=T1&access%5Ftoken=T2&y=2;z=3&access_token=T3;keep=1"
    request = HandshakeRequest.build("id", "GET", target, "1.1", [], "192.0.2.1", "192.0.2.1", False)
    assert upstream_query(request, (provider,)) == "x=1&y=2;z=3&keep=1"
