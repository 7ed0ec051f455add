"""Log lines (core.logging): one line per record whatever a client sends, client fields whole, rotation."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from core.config import LogConfig, load_config
from core.errors import ConfigError
from core.logging import (
    JsonFormatter,
    PeerLog,
    TextFormatter,
    client_fields,
    format_peer,
    log_handler,
    one_line,
    setup_logging,
)

NASTY = "a\nb\rc\td\x1be\x85f\u2028g\u2029h\x00i"
"""Every kind of character that ends a line for some reader (str.splitlines, a terminal) or hides text."""


def record(message: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord("mqgate.test", logging.WARNING, __file__, 1, message, args or ("you",), None)
    entry.__dict__.update(extra)
    return entry


# --- fields


def test_client_fields_format_socket_addresses_and_leave_out_what_is_unknown() -> None:
    assert client_fields("dev", ("127.0.0.1", 5000), "mqttsn") == {
        "clientid": "dev",
        "peer": "127.0.0.1:5000",
        "protocol": "mqttsn",
    }
    assert client_fields(None, ("::1", 5683, 0, 0), "coap") == {"peer": "[::1]:5683", "protocol": "coap"}
    assert client_fields("", "", "mqtt") == {"protocol": "mqtt"}
    assert client_fields("x", None, "lwm2m") == {"clientid": "x", "protocol": "lwm2m"}
    assert format_peer("/dev/ttyUSB0") == "/dev/ttyUSB0"


def test_one_line_escapes_every_line_break_and_control_character() -> None:
    escaped = one_line(NASTY)
    assert escaped == "a\\nb\\rc\\td\\x1be\\x85f\\u2028g\\u2029h\\x00i"
    assert len(escaped.splitlines()) == 1


# --- text


def test_text_line_shows_time_level_logger_and_message() -> None:
    line = TextFormatter().format(record())
    time, level, rest = line.split(" ", 2)
    assert datetime.fromisoformat(time).utcoffset() is not None
    assert (level, rest) == ("warning", "mqgate.test: hello you")


def test_text_line_shows_the_client_fields_before_the_message() -> None:
    line = TextFormatter().format(record(**client_fields("abc", ("127.0.0.1", 5000), "mqttsn")))
    assert line.endswith(" warning mqgate.test: clientid=abc peer=127.0.0.1:5000 protocol=mqttsn: hello you")


def test_text_line_quotes_field_values_with_spaces_quotes_or_equals_signs() -> None:
    line = TextFormatter().format(record(**client_fields('a b="c"', "p", "mqtt")))
    assert 'clientid="a b=\\"c\\"" peer=p protocol=mqtt: hello you' in line


def test_text_line_escapes_line_breaks_in_the_message_and_the_client_id() -> None:
    line = TextFormatter().format(record("got %s", NASTY, **client_fields(NASTY, "p", "mqtt")))
    assert len(line.splitlines()) == 1
    assert line.count(one_line(NASTY)) == 1  # the message's copy
    assert 'clientid="a\\nb\\rc\\td\\u001be\\x85f\\u2028g\\u2029h\\u0000i"' in line  # the quoted field


def test_text_line_keeps_a_traceback_on_the_same_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        entry = record()
        entry.exc_info = sys.exc_info()
    line = TextFormatter().format(entry)
    assert len(line.splitlines()) == 1
    assert "ValueError: boom\\nsecond line" in line


# --- JSON


def test_json_line_has_time_level_logger_message_and_client_fields() -> None:
    line = JsonFormatter().format(record(**client_fields("abc", ("10.0.0.1", 1), "coap")))
    entry = json.loads(line)
    assert datetime.fromisoformat(entry.pop("time")).utcoffset() is not None
    assert entry == {
        "level": "warning",
        "logger": "mqgate.test",
        "message": "hello you",
        "clientid": "abc",
        "peer": "10.0.0.1:1",
        "protocol": "coap",
    }


def test_json_line_is_one_line_and_gives_back_the_exact_strings() -> None:
    line = JsonFormatter().format(record("got %s", NASTY, **client_fields(NASTY, "p", "mqtt")))
    assert len(line.splitlines()) == 1
    entry = json.loads(line)
    assert entry["message"] == "got " + NASTY
    assert entry["clientid"] == NASTY


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_a_1000_character_client_id_is_printed_whole(formatter: logging.Formatter) -> None:
    client_id = "".join(chr(ord("a") + i % 26) for i in range(1000))
    line = formatter.format(record(**client_fields(client_id, ("127.0.0.1", 9), "mqtt")))
    assert client_id in line
    assert len(line.splitlines()) == 1


def test_peer_log_names_the_peer_and_protocol_once_per_peer() -> None:
    logger = logging.Logger("mqgate.test")
    records: list[logging.LogRecord] = []
    logger.addHandler(CollectingHandler(records))
    bad_input = PeerLog(logger, "mqttsn")
    bad_input.warning(("127.0.0.1", 7), "dropped %s", "junk", clientid="dev")
    bad_input.warning(("127.0.0.1", 7), "dropped %s", "more junk")
    [entry] = records
    assert json.loads(JsonFormatter().format(entry)) | {"time": ""} == {
        "time": "",
        "level": "warning",
        "logger": "mqgate.test",
        "message": "mqttsn ('127.0.0.1', 7): dropped junk",
        "clientid": "dev",
        "peer": "127.0.0.1:7",
        "protocol": "mqttsn",
    }


class CollectingHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# --- handlers


@pytest.fixture
def file_logger() -> Iterator[logging.Logger]:
    """A logger outside the hierarchy (pytest's capture is untouched); its handlers are closed after."""
    logger = logging.Logger("mqgate.test")
    yield logger
    for handler in logger.handlers:
        handler.close()


def test_file_log_rotates_at_max_bytes_and_keeps_backups_files(
    tmp_path: Path, file_logger: logging.Logger
) -> None:
    path = tmp_path / "mqgate.log"
    file_logger.addHandler(
        log_handler(LogConfig(format="json", to="file", file=str(path), max_bytes=1024, backups=2))
    )
    for index in range(100):
        file_logger.warning(
            "line %d", index, extra=client_fields(f"client-{index}", ("127.0.0.1", index), "mqtt")
        )
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["mqgate.log", "mqgate.log.1", "mqgate.log.2"]
    kept = []
    for file in (path.with_suffix(".log.2"), path.with_suffix(".log.1"), path):
        assert 0 < file.stat().st_size <= 1024
        kept += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
    indexes = [int(entry["message"].split()[1]) for entry in kept]
    assert indexes == list(range(indexes[0], 100))  # the newest lines, in order, none cut
    assert all(entry["clientid"] == f"client-{i}" for entry, i in zip(kept, indexes, strict=True))


def test_console_log_goes_to_stderr() -> None:
    handler = log_handler(LogConfig())
    assert isinstance(handler, logging.StreamHandler)
    assert handler.stream is sys.stderr
    assert isinstance(handler.formatter, TextFormatter)


def test_unwritable_log_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "mqgate.log"
    root = logging.getLogger()
    before = list(root.handlers)
    with pytest.raises(
        ConfigError, match=r"^log\.file: cannot open .*no-such-dir.*: No such file or directory$"
    ):
        setup_logging(LogConfig(to="file", file=str(missing)))
    assert root.handlers == before


def test_log_destination_and_rotation_are_configured_and_checked() -> None:
    config = load_config(
        environ={
            "MQGATE_LOG__TO": "file",
            "MQGATE_LOG__FILE": "/var/log/mqgate.log",
            "MQGATE_LOG__BACKUPS": "3",
        }
    )
    assert (config.log.to, config.log.file, config.log.backups) == ("file", "/var/log/mqgate.log", 3)
    assert config.log.max_bytes == 10 * 1024 * 1024
    with pytest.raises(ConfigError, match=r"^MQGATE_LOG__TO \(log\.to\)"):
        load_config(environ={"MQGATE_LOG__TO": "syslog"})
    with pytest.raises(ConfigError, match=r"log\.max_bytes"):
        load_config(environ={"MQGATE_LOG__MAX_BYTES": "10"})
    with pytest.raises(ConfigError, match=r"log\.backups"):
        load_config(environ={"MQGATE_LOG__BACKUPS": "0"})
