"""Log set-up: one line per record, plain text or JSON, RFC 3339 timestamps with offset (DESIGN §4 item 11).

A record about one client carries its ``clientid``, ``peer`` and ``protocol`` as extras
(``log.info("...", extra=client_fields(client_id, peer, "mqttsn"))``); both formatters print them whole.
Nothing a client sends can start a new line: line breaks and other control characters are escaped.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
from collections import OrderedDict
from collections.abc import Hashable
from datetime import datetime
from typing import TYPE_CHECKING

from core.errors import ConfigError

if TYPE_CHECKING:
    from core.config import LogConfig

__all__ = [
    "JsonFormatter",
    "PeerLog",
    "TextFormatter",
    "client_fields",
    "format_peer",
    "log_handler",
    "one_line",
    "setup_logging",
]

CLIENT_FIELDS = ("clientid", "peer", "protocol")
"""The record extras naming the client a line is about, in the order the text format prints them."""

# Characters that end a line for some reader (str.splitlines, terminals, editors) or hide text.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# What json.dumps(ensure_ascii=False) leaves raw but str.splitlines breaks at, or a terminal interprets.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")
_NEEDS_QUOTES = re.compile(r'[\s"=]')
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def one_line(text: str) -> str:
    """``text`` with line breaks and control characters escaped (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _UNSAFE.sub(_escape, text)


def format_peer(peer: object) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6) of a socket address; anything else (a serial port) as ``str``."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


def client_fields(clientid: str | None, peer: object, protocol: str) -> dict[str, str]:
    """The ``extra`` of a log call about one client; an unknown (None or "") client id or peer is omitted."""
    fields = {"clientid": clientid} if clientid else {}
    address = format_peer(peer) if peer is not None else ""
    if address:
        fields["peer"] = address
    fields["protocol"] = protocol
    return fields


def _rfc3339(created: float) -> str:
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


def _text_value(value: str) -> str:
    """A field value for the text format: bare, or JSON-quoted if empty or holding a space, quote or ``=``."""
    if not value or _NEEDS_QUOTES.search(value):
        value = json.dumps(value, ensure_ascii=False)
    return one_line(value)


class TextFormatter(logging.Formatter):
    """``2026-11-28T00:00:00.000+00:00 info mqgate.mqttsn: clientid=abc peer=127.0.0.1:5000 protocol=mqttsn:
    message`` on one line; the client fields appear when the record carries them."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " | " + self.formatException(record.exc_info)
        fields = "".join(
            f"{key}={_text_value(str(value))} "
            for key in CLIENT_FIELDS
            if (value := getattr(record, key, None)) is not None
        )
        prefix = f"{_rfc3339(record.created)} {record.levelname.lower()} {record.name}: "
        return prefix + (fields[:-1] + ": " if fields else "") + one_line(message)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and ``clientid``, ``peer`` and ``protocol``
    when the record carries them."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CLIENT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _JSON_UNSAFE.sub(_json_escape, json.dumps(entry, ensure_ascii=False))


def log_handler(config: LogConfig) -> logging.Handler:
    """The handler ``config`` asks for: stderr, or ``log.file`` renamed to ``.1`` ... ``.<log.backups>``
    when it would exceed ``log.max_bytes``; its formatter is ``log.format``.

    Raises :class:`ConfigError` naming ``log.file`` when the file cannot be opened.
    """
    handler: logging.Handler
    if config.to == "file":
        try:
            handler = logging.handlers.RotatingFileHandler(
                config.file, maxBytes=config.max_bytes, backupCount=config.backups, encoding="utf-8"
            )
        except OSError as exc:
            raise ConfigError(f"log.file: cannot open {config.file!r}: {exc.strerror or exc}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    return handler


def setup_logging(config: LogConfig) -> None:
    """Route every record at ``log.level`` and above to :func:`log_handler`; raises :class:`ConfigError`."""
    handler = log_handler(config)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(config.level.upper())


class PeerLog:
    """Log bad input once per peer, remembering a bounded number of peers, so that a noisy or hostile device
    cannot flood the log (the counters still count every event). ``prefix`` is the protocol (``mqttsn``,
    ``coap``), logged as the ``protocol`` field too."""

    __slots__ = ("_logger", "_peers", "_prefix", "max_peers")

    def __init__(self, logger: logging.Logger, prefix: str, max_peers: int = 1024) -> None:
        self._logger = logger
        self._prefix = prefix
        self._peers: OrderedDict[Hashable, None] = OrderedDict()
        self.max_peers = max_peers

    def warning(self, peer: Hashable, text: str, *args: object, clientid: str | None = None) -> None:
        if peer in self._peers:
            return
        self._peers[peer] = None
        if len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        self._logger.warning(
            "%s %s: " + text, self._prefix, peer, *args, extra=client_fields(clientid, peer, self._prefix)
        )
