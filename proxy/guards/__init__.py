"""Handshake guards: one object per concern, each with its check, its verdict on live sessions at reload
and its ``wsgate explain`` text (:mod:`proxy.guards.base`), in one ordered registry
(:mod:`proxy.guards.registry`). The other modules here are their building blocks: token verification and
JWKS, firewall and origin rules, limits, and the owner of a handshake's limiter slots."""
