"""Process logging: one handler on the root logger, text or JSON lines, secrets redacted.

Every logger of the process (ours, aiohttp's, litellm's once it is imported) writes through the
root handler configured here, so each line appears once and in one format. A record may carry
structured fields (``extra={"fields": {...}}``): JSON lines hold them as keys, text lines append
them as ``key=value``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import sys
from typing import Any, Iterator

import orjson

from proxy.errors import redact

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The loggers litellm gives a stream handler of its own at import: with ours on the root logger
# each of their lines was written twice.
LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


class _Redacting(logging.Formatter):
    """Removes the configured upstream keys (and anything shaped like a key) from each line."""

    secrets: tuple[str, ...] = ()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._format(record), _Redacting.secrets)

    def _format(self, record: logging.LogRecord) -> str:
        return super().format(record)


class TextFormatter(_Redacting):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def _format(self, record: logging.LogRecord) -> str:
        line = super()._format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return line


class JsonFormatter(_Redacting):
    def _format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update((k, v) for k, v in fields.items() if k not in entry)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Install the one root handler (stderr). ``level`` and ``fmt`` are validated by the caller."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def set_secrets(secrets: tuple[str, ...]) -> None:
    """The upstream keys to redact from every line (set at start and on each reload)."""
    _Redacting.secrets = tuple(s for s in secrets if s)


@contextlib.contextmanager
def importing_litellm() -> Iterator[None]:
    """Around ``import litellm``: its loggers get a stream handler of their own at import, and
    write a few DEBUG lines through it before any caller could remove it. They are muted for the
    import, then sent through the root handler only."""
    loggers = [logging.getLogger(name) for name in LITELLM_LOGGERS]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger in loggers:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
            logger.disabled = False
