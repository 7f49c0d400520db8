"""Where ctprofd's log goes and how it reads: the journal under systemd, else stderr as
text, logfmt or JSON lines (`--log.format`, as Prometheus exporters spell it), each with a
UTC timestamp (the journal keeps its own)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

FORMATS = ("text", "logfmt", "json")
DAEMON_TEXT = "%(utc)s ctprofd: %(levelname)s: %(message)s"
_BARE = re.compile(r"^[^\s\"=\\\x00-\x1f]+$")


def _utc(record: logging.LogRecord) -> str:
    """The record's time in UTC, RFC 3339 with milliseconds (as the toolkit's logs)."""
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z")


class TextFormatter(logging.Formatter):
    """A %-style format that may name %(utc)s, the time as `_utc` writes it."""

    def format(self, record: logging.LogRecord) -> str:
        record.utc = _utc(record)
        return super().format(record)


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, str]:
    fields = {"time": _utc(record),
              "level": record.levelname.lower(),
              "source": record.name,
              "msg": record.getMessage()}
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    return fields


class LogfmtFormatter(logging.Formatter):
    """`time=… level=info source=ctprofd.service.daemon msg="…"`: values quoted when needed."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={value if _BARE.match(value) else json.dumps(value)}"
                        for key, value in _fields(record, self).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the same fields as logfmt."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record, self))


def setup_logging(level: str, fmt: str = "text", text: str = DAEMON_TEXT,
                  journal: bool = True) -> None:
    """Replace the root handlers: the journal when started by systemd with the text format
    (and systemd-python is there), else stderr in `fmt`."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    handler: logging.Handler | None = None
    if journal and fmt == "text" and (os.environ.get("JOURNAL_STREAM")
                                      or os.environ.get("INVOCATION_ID")):
        try:
            from systemd.journal import JournalHandler
            handler = JournalHandler(SYSLOG_IDENTIFIER="ctprofd")
        except ImportError:
            pass
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter({"logfmt": LogfmtFormatter(), "json": JsonFormatter()}.get(
            fmt, TextFormatter(text)))
    root.addHandler(handler)
    root.setLevel(level.upper())
