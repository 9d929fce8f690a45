"""Handshake guards: small checks that each pass a request or return a :class:`~proxy.errors.Rejection`."""
