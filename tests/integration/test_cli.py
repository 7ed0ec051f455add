"""The ``mqgate`` command as a user runs it: ``python -m core.cli`` in a subprocess from the repository root.

Every process is killed (if still running) and reaped in a fixture's teardown; its stderr is read by a
thread into a queue, so waiting for a log line is waiting on that queue with a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from core.config import Config, build_section
from core.mqtt.codec import Disconnect, Publish
from core.mqtt.numbers import ReasonCode
from tests.integration.helpers import TIMEOUT, RawClient

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 15.0
LISTENING = re.compile(r"mqtt:tcp listening on 127\.0\.0\.1:(\d+)")


def clean_env(**overrides: str) -> dict[str, str]:
    """The test's environment without any MQGATE_* variable, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MQGATE_")}
    env.update(overrides)
    return env


def run_env(**overrides: str) -> dict[str, str]:
    """:func:`clean_env` for a running mqgate: every socket on an ephemeral loopback port, no broadcasts."""
    defaults = {
        "MQGATE_LISTENERS__TCP__BIND": "127.0.0.1:0",
        "MQGATE_GATEWAYS__MQTTSN__BIND": "127.0.0.1:0",
        "MQGATE_GATEWAYS__MQTTSN__ADVERTISE_INTERVAL": "0",
        "MQGATE_GATEWAYS__COAP__BIND": "127.0.0.1:0",
        "MQGATE_GATEWAYS__LWM2M__BIND": "127.0.0.1:0",
        "MQGATE_API__BIND": "127.0.0.1:0",
    }
    return clean_env(**{**defaults, **overrides})


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command that exits by itself (--print-config, a bad configuration)."""
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        cwd=ROOT,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
        check=False,
    )


class Mqgate:
    """A running ``mqgate`` process whose stderr lines arrive in ``lines``."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "core.cli", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, name="mqgate-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, pattern: str | re.Pattern[str], timeout: float = STARTUP_TIMEOUT) -> re.Match[str]:
        """The first new stderr line matching ``pattern``; fails at EOF or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; got {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"mqgate exited ({self.process.poll()}) without {pattern!r}: {self.seen}"
                )
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def wait_exit(self, timeout: float = STARTUP_TIMEOUT) -> int:
        """Wait for the process to end and for all of its stderr; returns the exit code."""
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        while True:
            line = self.lines.get_nowait() if not self.lines.empty() else None
            if line is None:
                return code
            self.seen.append(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def spawn() -> Iterator[type[Mqgate]]:
    started: list[Mqgate] = []

    class Owned(Mqgate):
        def __init__(self, *args: str, env: dict[str, str]) -> None:
            super().__init__(*args, env=env)
            started.append(self)

    yield Owned
    for process in started:
        process.stop()


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mqgate.toml"
    path.write_text(text)
    return path


# --- configuration


def test_print_config_prints_the_defaults_as_toml() -> None:
    result = run_cli("--print-config")
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(result.stdout)
    assert data["listeners"]["tcp"]["bind"] == "0.0.0.0:1883"  # the printed default; nothing binds it
    assert data["broker"]["max_inflight"] == 32
    assert data["broker"]["max_mqueue_len"] == 1000
    assert build_section(Config, data) == Config()
    assert result.stderr == ""


def test_environment_override_shows_in_print_config() -> None:
    result = run_cli("--print-config", env=clean_env(MQGATE_LISTENERS__TCP__BIND="127.0.0.1:0"))
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["listeners"]["tcp"]["bind"] == "127.0.0.1:0"


def test_config_file_and_environment_combine_with_environment_winning(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[broker]\nmax_inflight = 7\nmax_mqueue_len = 5\n[log]\nformat = "json"\n')
    result = run_cli(
        "--config", str(path), "--print-config", env=clean_env(MQGATE_BROKER__MAX_MQUEUE_LEN="9")
    )
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(result.stdout)
    assert data["broker"]["max_inflight"] == 7
    assert data["broker"]["max_mqueue_len"] == 9
    assert data["log"]["format"] == "json"


def test_mqgate_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[listeners.tcp]\nbind = "127.0.0.1:0"\n[broker]\nmax_inflight = 11\n')
    result = run_cli("--print-config", env=clean_env(MQGATE_CONFIG=str(path)))
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(result.stdout)
    assert data["broker"]["max_inflight"] == 11
    assert data["listeners"]["tcp"]["bind"] == "127.0.0.1:0"


def test_config_option_takes_precedence_over_mqgate_config(tmp_path: Path) -> None:
    env_file = tmp_path / "env.toml"
    env_file.write_text("[broker]\nmax_inflight = 11\n")
    arg_file = write_config(tmp_path, "[broker]\nmax_inflight = 12\n")
    result = run_cli("--config", str(arg_file), "--print-config", env=clean_env(MQGATE_CONFIG=str(env_file)))
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["broker"]["max_inflight"] == 12


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        ("[broker]\nmax_inflite = 3\n", "broker.max_inflite"),
        ("[listeners.tcp]\nbindd = '127.0.0.1:0'\n", "listeners.tcp.bindd"),
        ("[brokr]\nmax_inflight = 3\n", "brokr"),
    ],
)
def test_unknown_key_in_the_config_file_exits_2_with_one_line_naming_it(
    tmp_path: Path, toml: str, names: str
) -> None:
    result = run_cli("--config", str(write_config(tmp_path, toml)))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert names in lines[0]
    assert "unknown key" in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        ('[broker]\nmax_inflight = "many"\n', "broker.max_inflight"),
        ("[listeners.tcp]\nbind = 1883\n", "listeners.tcp.bind"),  # an int: refused before anything binds
        ("[broker]\nmqueue_store_qos0 = 1\n", "broker.mqueue_store_qos0"),
        ('[broker]\nshared_subscription_strategy = "fastest"\n', "broker.shared_subscription_strategy"),
        ('[listeners.tcp]\nbind = "localhost:x"\n', "listeners.tcp.bind"),
    ],
)
def test_wrong_type_or_value_in_the_config_file_exits_2_naming_the_key(
    tmp_path: Path, toml: str, names: str
) -> None:
    result = run_cli("--config", str(write_config(tmp_path, toml)), "--print-config")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert names in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("variable", "value"),
    [("MQGATE_BROKER__MAX_INFLIGHT", "lots"), ("MQGATE_BROKER__NO_SUCH_KEY", "1")],
)
def test_bad_environment_override_exits_2_naming_the_variable(variable: str, value: str) -> None:
    result = run_cli("--print-config", env=clean_env(**{variable: value}))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert variable in lines[0]


def test_missing_config_file_exits_2_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = run_cli("--config", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr


def test_version_option() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"mqgate \d+\.\d+\.\d+\S*\n", result.stdout)


# --- running


def test_port_in_use_exits_non_zero_with_one_line_naming_the_address(spawn: type[Mqgate]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mqgate = spawn(env=run_env(MQGATE_LISTENERS__TCP__BIND=f"127.0.0.1:{port}"))
        code = mqgate.wait_exit()
    assert code != 0
    assert len(mqgate.seen) == 1, mqgate.seen
    assert f"127.0.0.1:{port}" in mqgate.seen[0]
    assert "listeners.tcp.bind" in mqgate.seen[0]


def start_on_ephemeral_port(spawn: type[Mqgate], **env: str) -> tuple[Mqgate, int]:
    mqgate = spawn(env=run_env(**env))
    port = int(mqgate.wait_line(LISTENING).group(1))
    mqgate.wait_line(r"mqgate \S+ started")
    return mqgate, port


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_starts_logs_its_listener_serves_clients_and_stops_cleanly_on_signal(
    spawn: type[Mqgate], sig: signal.Signals
) -> None:
    mqgate, port = start_on_ephemeral_port(spawn)
    listening = [re.search(r" (\S+) listening on (\S+)$", line) for line in mqgate.seen]
    names = [m.group(1) for m in listening if m]
    assert "mqtt:tcp" in names
    assert len(names) == len(set(names)), mqgate.seen  # one line per listener, each with its address
    assert all(re.fullmatch(r"127\.0\.0\.1:[1-9]\d*", m.group(2)) for m in listening if m), mqgate.seen
    subscriber = RawClient(port, version=5)
    try:
        subscriber.connect("cli-watcher")
        subscriber.subscribe("cli/#", 1)
        published = subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", "cli/hello", "-m", "hi", "-q", "1"],
            capture_output=True,
            timeout=STARTUP_TIMEOUT,
            check=False,
        )
        assert published.returncode == 0, published.stderr
        message = subscriber.expect(Publish)
        assert (message.topic, message.payload) == ("cli/hello", b"hi")
        mqgate.process.send_signal(sig)
        before_close = subscriber.expect_closed()
        assert before_close == [Disconnect(ReasonCode.SERVER_SHUTTING_DOWN, before_close[0].properties)]
        assert mqgate.wait_exit(TIMEOUT) == 0
    finally:
        subscriber.close()
    assert any("mqgate stopped" in line for line in mqgate.seen), mqgate.seen
    assert not any("Traceback" in line for line in mqgate.seen), mqgate.seen


def test_mqgate_config_file_is_used_to_start(spawn: type[Mqgate], tmp_path: Path) -> None:
    path = write_config(tmp_path, '[listeners.tcp]\nbind = "127.0.0.1:0"\n')
    env = run_env(MQGATE_CONFIG=str(path))
    del env["MQGATE_LISTENERS__TCP__BIND"]  # from the file
    mqgate = spawn(env=env)
    port = int(mqgate.wait_line(LISTENING).group(1))
    client = RawClient(port, version=4)
    try:
        client.connect("via-config-file")
    finally:
        client.close()
    mqgate.process.send_signal(signal.SIGTERM)
    assert mqgate.wait_exit(TIMEOUT) == 0


_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)$")


def test_json_log_format_writes_one_object_per_line(spawn: type[Mqgate]) -> None:
    mqgate, port = start_on_ephemeral_port(spawn, MQGATE_LOG__FORMAT="json")
    client = RawClient(port, version=4)
    try:
        client.connect("json-logger")
        client.send_bytes(b"\x00\x00")  # a logged protocol error, with the client's name in it
        client.expect_closed()
    finally:
        client.close()
    mqgate.process.send_signal(signal.SIGTERM)
    assert mqgate.wait_exit(TIMEOUT) == 0
    entries = [json.loads(line) for line in mqgate.seen]
    assert len(entries) >= 4
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        assert _RFC3339.match(entry["time"]), entry["time"]
        assert datetime.fromisoformat(entry["time"]).utcoffset() is not None
        assert entry["level"] in {"debug", "info", "warning", "error"}
        assert entry["logger"].startswith("mqgate")
    messages = [e["message"] for e in entries]
    assert any(LISTENING.search(m) for m in messages)
    assert any("json-logger" in m and e["level"] == "warning" for m, e in zip(messages, entries, strict=True))
    assert messages[-1] == "mqgate stopped"
