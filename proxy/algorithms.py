"""The JWS signature algorithms (RFC 7518, RFC 8037) wsgate verifies, by family, in one place.

The policy loader checks a provider's ``algorithms`` against these families and its key, and the JWKS
client picks the keys that may verify a token by them: both must agree on which key verifies what.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: Shared-secret algorithms (a ``secret_env`` key).
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = ("ES256", "ES384", "ES512", "ES256K")
OKP_ALGORITHMS = ("EdDSA",)

#: The algorithms a public key of each type may verify (the JWK ``kty``, or the type of a PEM key): the
#: key decides, never the token.
KEY_TYPE_ALGORITHMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"RSA": RSA_ALGORITHMS, "EC": EC_ALGORITHMS, "OKP": OKP_ALGORITHMS}
)

#: Every algorithm a policy may name (``none`` is never one).
ALGORITHMS = frozenset((*HMAC_ALGORITHMS, *RSA_ALGORITHMS, *EC_ALGORITHMS, *OKP_ALGORITHMS))
