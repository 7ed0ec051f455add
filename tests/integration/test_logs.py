"""``log.format = "json"`` with ``log.to = "file"``: a running ``mqgate`` (``python -m core.cli``) writes one
JSON object per line to its log file, naming the client id, peer and protocol of every line about a client."""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateways.mqttsn import codec
from tests.integration.helpers import TIMEOUT, PahoClient, wait_for
from tests.integration.mqttsn_helpers import SnClient
from tests.integration.test_cli import STARTUP_TIMEOUT, Mqgate, run_env

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)$")
LONG_CLIENT_ID = "paho-" + "".join(chr(ord("a") + i % 26) for i in range(995))  # 1,000 characters
BAD_SN_CLIENT_ID = "sn\nline-" + "x" * 40  # a line break, and longer than MQTT-SN's 23 bytes: refused


class LogFile:
    """The JSON lines of a log file as written so far."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").split("\n")
        return [json.loads(line) for line in lines[:-1]]  # the last one may be half-written

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first entry for which ``match`` is true; fails after ``timeout``."""
        found: dict[str, Any] = wait_for(lambda: next(filter(match, self.entries()), None), timeout)
        return found

    def port(self, listener: str) -> int:
        pattern = re.compile(rf"^{re.escape(listener)} listening on 127\.0\.0\.1:(\d+)$")
        entry = self.wait(lambda e: bool(pattern.match(e["message"])), STARTUP_TIMEOUT)
        match = pattern.match(entry["message"])
        assert match is not None
        return int(match.group(1))


@pytest.fixture
def logging_to_file(tmp_path: Path) -> Iterator[tuple[Mqgate, LogFile]]:
    path = tmp_path / "mqgate.log"
    mqgate = Mqgate(
        env=run_env(
            MQGATE_LOG__FORMAT="json",
            MQGATE_LOG__TO="file",
            MQGATE_LOG__FILE=str(path),
            MQGATE_LOG__LEVEL="debug",
        )
    )
    try:
        yield mqgate, LogFile(path)
    finally:
        mqgate.stop()


def test_json_log_file_names_the_client_id_peer_and_protocol(logging_to_file: tuple[Mqgate, LogFile]) -> None:
    mqgate, log = logging_to_file
    mqtt_port, sn_port = log.port("mqtt:tcp"), log.port("mqttsn:udp")

    paho = PahoClient(mqtt_port, LONG_CLIENT_ID, version=5)
    try:
        sock = paho.client.socket()
        assert isinstance(sock, socket.socket)
        paho_port = sock.getsockname()[1]
        connected = log.wait(lambda e: e.get("clientid") == LONG_CLIENT_ID)
    finally:
        paho.close()
    assert (connected["peer"], connected["protocol"]) == (f"127.0.0.1:{paho_port}", "mqtt")
    assert LONG_CLIENT_ID in connected["message"]

    sn = SnClient(sn_port)
    try:
        sn.send(codec.Connect(BAD_SN_CLIENT_ID, duration=60))
        assert sn.expect(codec.Connack).return_code != 0
        sn.send(b"\x05\x04")  # a length field longer than the datagram: dropped
        refused = log.wait(lambda e: e.get("clientid") == BAD_SN_CLIENT_ID)
        malformed = log.wait(lambda e: "malformed" in e["message"] and e.get("protocol") == "mqttsn")
        sn_peer = f"127.0.0.1:{sn.address[1]}"
    finally:
        sn.close()
    assert (refused["peer"], refused["protocol"], refused["level"]) == (sn_peer, "mqttsn", "info")
    assert (malformed["peer"], malformed["level"], "clientid" in malformed) == (sn_peer, "warning", False)

    mqgate.process.send_signal(signal.SIGTERM)
    assert mqgate.wait_exit(TIMEOUT) == 0
    assert mqgate.seen == []  # everything went to the file
    raw = log.path.read_text(encoding="utf-8")
    assert raw.endswith("\n")
    entries = [json.loads(line) for line in raw.splitlines()]  # splitlines: no line break inside an entry
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        assert RFC3339.match(entry["time"]), entry["time"]
        assert datetime.fromisoformat(entry["time"]).utcoffset() is not None
        assert entry["logger"].startswith("mqgate"), entry
    assert entries[-1]["message"] == "mqgate stopped"


def test_unwritable_log_file_exits_2_with_one_line_naming_log_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "mqgate.log"
    mqgate = Mqgate(env=run_env(MQGATE_LOG__TO="file", MQGATE_LOG__FILE=str(missing)))
    try:
        assert mqgate.wait_exit() == 2
    finally:
        mqgate.stop()
    assert len(mqgate.seen) == 1, mqgate.seen
    assert mqgate.seen[0].startswith("mqgate: log.file: cannot open ")
    assert str(missing) in mqgate.seen[0]
