"""Structured logs: one JSON object per line, or readable text on a terminal.

Every line is an *event* (``session.open``, ``session.close``, ``handshake.rejected``...) with flat fields.
Callers pass only values that are safe to log: tokens never reach this module, only their fingerprints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

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


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines of one event-loop iteration together, at the end of the iteration.

    A busy gateway logs two lines per session (``session.open``, ``session.close``); written one by one,
    each costs a system call and a wakeup of whatever reads the stream. Lines are never held longer than
    the loop iteration that logged them and keep their order; they are written at once when no event loop
    runs in the logging thread (start-up, shut-down, other threads) or when the handler is flushed (as
    ``logging.shutdown`` does at exit). Each write is at most :data:`PIPE_BUF` bytes of whole lines, so
    that on a pipe shared by several workers no other process's write lands inside a line; a line that
    cannot be written (one the stream cannot encode) is reported alone, and the others are written.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own contract: report and carry on
            self.handleError(record)
            return
        self._pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs in this thread: nothing would flush later
            self.flush()
            return
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            lines, self._pending = self._pending, []
            for chunk in _chunks(lines):
                try:
                    self.stream.write(chunk)
                except (OSError, ValueError):  # a broken stream, or a line it cannot encode
                    self._write_one_by_one(chunk)
            if lines:
                self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: as StreamHandler, never raise
            logging.Handler.handleError(self, _flush_record)
        finally:
            self.release()

    def _write_one_by_one(self, chunk: str) -> None:
        for line in chunk.splitlines(keepends=True):
            try:
                self.stream.write(line)
            except (OSError, ValueError):
                logging.Handler.handleError(self, _flush_record)


#: The bytes a write to a pipe may carry and still never interleave with another process's (POSIX).
PIPE_BUF = 4096


def _chunks(lines: list[str]) -> Iterator[str]:
    """Whole lines joined into pieces of at most :data:`PIPE_BUF` bytes (a longer line is one piece)."""
    piece: list[str] = []
    size = 0
    for line in lines:
        length = (len(line) if line.isascii() else len(line.encode("utf-8", "replace"))) + 1
        if piece and size + length > PIPE_BUF:
            yield "\n".join(piece) + "\n"
            piece, size = [], 0
        piece.append(line)
        size += length
    if piece:
        yield "\n".join(piece) + "\n"


#: What a failed write reports through ``handleError`` (the line it lost is no single record).
_flush_record = logging.LogRecord("wsgate", logging.ERROR, __file__, 0, "log line lost", None, None)


def _timestamp(created: float) -> str:
    """``2026-11-24T10:00:00.123Z``; the part up to the seconds is made once per second."""
    return f"{_to_the_second(int(created))}.{int(created % 1 * 1000):03d}Z"


@lru_cache(maxsize=4)
def _to_the_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _text_value(value: object) -> str:
    text = str(value)
    return json.dumps(text) if (not text or " " in text or '"' in text) else text


def configure(log_format: LogFormat = "auto", level: str = "info", error_file: Path | None = None) -> None:
    """Send wsgate's events to stdout: JSON lines unless ``auto`` finds a terminal. With ``error_file``,
    warnings and errors are also appended there as JSON lines (whatever the stdout format)."""
    use_text = log_format == "text" or (log_format == "auto" and sys.stdout.isatty())
    handler: logging.Handler = BatchingStreamHandler(sys.stdout)
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
