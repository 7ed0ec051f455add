"""Log set-up: one line per record, plain text or JSON, RFC 3339 timestamps with offset."""

from __future__ import annotations

import json
import logging
import sys
from collections import OrderedDict
from collections.abc import Hashable
from datetime import datetime

__all__ = ["JsonFormatter", "PeerLog", "TextFormatter", "setup_logging"]


def _rfc3339(created: float) -> str:
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class TextFormatter(logging.Formatter):
    """``2026-11-28T00:00:00.000+00:00 info mqgate.broker message`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " | " + self.formatException(record.exc_info)
        return f"{_rfc3339(record.created)} {record.levelname.lower()} {record.name}: {_one_line(message)}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and ``clientid``, ``peer`` and ``protocol``
    when the record carries them (``log.info(..., extra={"clientid": ...})``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("clientid", "peer", "protocol"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    """Log to stderr at ``level`` in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class PeerLog:
    """Log bad input once per peer, remembering a bounded number of peers, so that a noisy or hostile device
    cannot flood the log (the counters still count every event)."""

    __slots__ = ("_logger", "_peers", "_prefix", "max_peers")

    def __init__(self, logger: logging.Logger, prefix: str, max_peers: int = 1024) -> None:
        self._logger = logger
        self._prefix = prefix
        self._peers: OrderedDict[Hashable, None] = OrderedDict()
        self.max_peers = max_peers

    def warning(self, peer: Hashable, text: str, *args: object) -> None:
        if peer in self._peers:
            return
        self._peers[peer] = None
        if len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        self._logger.warning("%s %s: " + text, self._prefix, peer, *args)
