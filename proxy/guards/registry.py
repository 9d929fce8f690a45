"""The guard registry: every handshake guard, once, in the order a request is judged (cheapest first).

The handshake pipeline runs these checks in this order; reload enforcement asks each of them about every
live session; ``wsgate explain`` prints one step per entry. Adding a guard is adding its object here.
"""

from __future__ import annotations

from proxy.guards.auth import RevocationGuard, TokenGuard
from proxy.guards.base import Guard, undeclared
from proxy.guards.client_cert import ClientCertificateGuard
from proxy.guards.firewall import FirewallGuard
from proxy.guards.limits import ConnectionsPerIpGuard, ConnectionsPerSubjectGuard, HandshakeRateGuard
from proxy.guards.origin import OriginGuard
from proxy.guards.upgrade import UpgradeGuard

__all__ = ["GUARDS", "Guard", "checked"]


def checked(guards: tuple[Guard, ...]) -> tuple[Guard, ...]:
    """``guards``, after making sure each declares everything the registry's users rely on.

    Raises:
        TypeError: a guard leaves something undeclared, or two guards share a name.
    """
    names: set[str] = set()
    for guard in guards:
        problems = undeclared(guard)
        if problems:
            raise TypeError(f"{type(guard).__name__}: {'; '.join(problems)}")
        if guard.name in names:
            raise TypeError(f"{type(guard).__name__}: another guard is named {guard.name!r}")
        names.add(guard.name)
    return guards


#: Status and reason each guard refuses with, in order: upgrade 400/426 ``bad_request``; firewall 403
#: ``firewall``; origin 403 ``origin``; handshakes per IP 429 ``rate_limited`` + Retry-After; connections
#: per IP 429 ``conn_limit``; client certificate 403 ``client_certificate``; token 401
#: ``auth_missing``/``auth_invalid``/``auth_expired``, 403 ``claims`` (400 ``bad_request`` for two
#: different tokens on a route of several providers); revocation 401 ``revoked``; connections per
#: subject 429 ``conn_limit``.
GUARDS: tuple[Guard, ...] = checked(
    (
        UpgradeGuard(),
        FirewallGuard(),
        OriginGuard(),
        HandshakeRateGuard(),
        ConnectionsPerIpGuard(),
        ClientCertificateGuard(),
        TokenGuard(),
        RevocationGuard(),
        ConnectionsPerSubjectGuard(),
    )
)
