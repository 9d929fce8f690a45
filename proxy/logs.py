"""Structured logs: one JSON object per line, or readable text on a terminal.

Every line is an *event* (``session.open``, ``session.close``, ``handshake.rejected``...) with flat fields.
Callers pass only values that are safe to log: tokens never reach this module, only their fingerprints.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from proxy.policy.model import LogSettings

LOGGER = logging.getLogger("wsgate")

LogFormat = Literal["auto", "json", "text"]


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "event": ..., <fields>}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``2026-11-24T10:00:00.123Z INFO session.close route=/chat code=1000`` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        parts = [_timestamp(record.created), record.levelname, record.getMessage()]
        parts.extend(f"{key}={_text_value(value)}" for key, value in fields.items())
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def _text_value(value: object) -> str:
    text = str(value)
    return json.dumps(text) if (not text or " " in text or '"' in text) else text


def configure(log_format: LogFormat = "auto", level: str = "info", error_file: Path | None = None) -> None:
    """Send wsgate's events to stdout: JSON lines unless ``auto`` finds a terminal. With ``error_file``,
    warnings and errors are also appended there as JSON lines (whatever the stdout format)."""
    use_text = log_format == "text" or (log_format == "auto" and sys.stdout.isatty())
    handler: logging.Handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(TextFormatter() if use_text else JsonFormatter())
    handlers = [handler]
    if error_file is not None:
        errors = logging.FileHandler(error_file, encoding="utf-8")
        errors.setLevel(logging.WARNING)
        errors.setFormatter(JsonFormatter())
        handlers.append(errors)
    for old in LOGGER.handlers:
        old.close()
    LOGGER.handlers[:] = handlers
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False


def apply_settings(
    settings: LogSettings, log_format: LogFormat | None = None, level: str | None = None
) -> None:
    """Configure logging from a policy's ``log`` section; ``log_format``/``level`` (the command line's)
    win when given."""
    configure(log_format or settings.format, level or settings.level, settings.error_file)


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with its fields (skipped cheaply when the level is off)."""
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, name, extra={"fields": fields})
