"""wsgate: a security-enforcing WebSocket reverse proxy."""

__version__ = "0.1.0"
