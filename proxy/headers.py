"""Reading HTTP header values, written once for every module that reads them.

Header lists are ``(name, value)`` pairs with lower-case names, as the listener and the upstream handshake
decode them. The token finder and the upstream request builder in particular must split a header the same
way: the builder removes the client's token before forwarding, so a cookie or a subprotocol accepted as a
token must be exactly the one removed. Both use the splits here.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = Iterable[tuple[str, str]]

#: The bytes of an HTTP token (RFC 9110 5.6.2 tchar, h11's ``token``): what a method and a header name
#: are made of. ``not name.translate(None, TOKEN_BYTES)`` says a non-empty name is a token.
TOKEN_BYTES = b"-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def header_value(headers: Headers, name: str) -> str | None:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def header_values(headers: Headers, name: str) -> list[str]:
    """Every value of header ``name`` (lower case), in order."""
    return [value for key, value in headers if key == name]


def comma_list(value: str) -> list[str]:
    """The entries of a comma-separated header value, stripped; empty entries are skipped."""
    return [entry for entry in (part.strip() for part in value.split(",")) if entry]


def header_list(headers: Headers, name: str) -> list[str]:
    """The comma-separated entries of every occurrence of header ``name``, in order (RFC 9110 5.3: several
    occurrences of a list header are one list)."""
    return [entry for key, value in headers if key == name for entry in comma_list(value)]


def subprotocol_list(headers: Headers) -> list[str]:
    """The subprotocols a client offered in ``Sec-WebSocket-Protocol``, in its order of preference."""
    return header_list(headers, "sec-websocket-protocol")


def _cookie_pair(part: str) -> tuple[str, str | None]:
    """One ``;``-separated part of a Cookie header: its name, and its value (None without ``=``)."""
    name, separator, value = part.partition("=")
    if not separator:
        return name.strip(), None
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return name.strip(), value


def cookie_pairs(value: str) -> list[tuple[str, str]]:
    """``name=value`` pairs of a Cookie header, split on ``;`` only (RFC 6265 section 5.4).

    :func:`without_cookie` removes a cookie by the same split, so a cookie is accepted as a token exactly
    when it would be removed before forwarding; lenient parsers that also split on spaces or commas would
    find tokens the stripping does not see.
    """
    pairs = []
    for part in value.split(";"):
        name, cookie_value = _cookie_pair(part)
        if cookie_value is not None:
            pairs.append((name, cookie_value))
    return pairs


def cookie_value(headers: Headers, name: str) -> str | None:
    """The first non-empty value of cookie ``name`` in the Cookie headers, or None."""
    for key, value in headers:
        if key != "cookie":
            continue
        for cookie_name, found in cookie_pairs(value):
            if cookie_name == name and found:
                return found
    return None


def without_cookie(value: str, name: str) -> str:
    """A Cookie header value without any cookie named ``name`` (empty when nothing else is left)."""
    kept = [part for part in value.split(";") if _cookie_pair(part)[0] != name]
    return ";".join(kept).strip()
