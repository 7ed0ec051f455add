"""Tests for core.config: defaults, file, environment overrides, errors and the TOML round trip."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from core.config import (
    BrokerConfig,
    Config,
    ListenersConfig,
    LogConfig,
    TcpListenerConfig,
    apply_env,
    build_section,
    dump_toml,
    load_config,
    parse_bind,
)
from core.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "fixtures" / "mqgate.example.toml"


@dataclass(slots=True, frozen=True)
class _Route:
    name: str
    ports: list[int] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class _Gateway:
    predefined: dict[int, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    topics: list[str] = field(default_factory=list)
    ratio: float = 0.5
    note: str | None = None
    routes: list[_Route] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class _Root:
    gateway: _Gateway = field(default_factory=_Gateway)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mqgate.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(excinfo: pytest.ExceptionInfo[ConfigError], *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_defaults_run_out_of_the_box() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert config.listeners.tcp.bind == "0.0.0.0:1883"
    assert config.broker.max_inflight == 32
    assert config.broker.sys_interval == 60.0
    assert config.log == LogConfig(level="info", format="text")


def test_example_fixture_lists_every_key_with_its_default() -> None:
    assert load_config(EXAMPLE, environ={}) == Config()
    assert tomllib.loads(EXAMPLE.read_text(encoding="utf-8")) == tomllib.loads(dump_toml(Config()))


def test_file_values_are_loaded(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        [listeners.tcp]
        bind = "[::1]:0"
        enabled = false
        [broker]
        max_inflight = 64
        shared_subscription_strategy = "hash_topic"
        sys_interval = 5
        [log]
        format = "json"
        """,
    )
    config = load_config(path, environ={})
    assert config.listeners.tcp == TcpListenerConfig(enabled=False, bind="[::1]:0")
    assert config.broker == BrokerConfig(
        max_inflight=64, shared_subscription_strategy="hash_topic", sys_interval=5.0
    )
    assert isinstance(config.broker.sys_interval, float)
    assert config.log.format == "json"


def test_env_overrides_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[broker]\nmax_inflight = 64\nretain_available = true\n")
    environ = {
        "MQGATE_BROKER__MAX_INFLIGHT": "128",
        "MQGATE_BROKER__RETAIN_AVAILABLE": "off",
        "MQGATE_LISTENERS__TCP__BIND": "127.0.0.1:21883",
        "MQGATE_BROKER__SYS_INTERVAL": "2",
        "MQGATE_LOG__LEVEL": "debug",
    }
    config = load_config(path, environ=environ)
    assert config.broker.max_inflight == 128
    assert config.broker.retain_available is False
    assert config.broker.sys_interval == 2.0
    assert config.listeners.tcp.bind == "127.0.0.1:21883"
    assert config.log.level == "debug"


def test_env_names_are_case_insensitive() -> None:
    config = load_config(environ={"mqgate_Broker__Max_Inflight": "7", "Mqgate_log__FORMAT": "json"})
    assert config.broker.max_inflight == 7
    assert config.log.format == "json"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *((word, True) for word in ("true", "1", "YES", "on")),
        *((word, False) for word in ("false", "0", "no", "Off")),
    ],
)
def test_env_bool_words(text: str, expected: bool) -> None:
    config = load_config(environ={"MQGATE_BROKER__SHARED_SUBSCRIPTION": text})
    assert config.broker.shared_subscription is expected


def test_reserved_and_foreign_variables_are_ignored() -> None:
    environ = {"MQGATE_CONFIG": "/etc/mqgate.toml", "mqgate_config": "x", "PATH": "/bin", "MQGATEWAY": "1"}
    assert load_config(environ=environ) == Config()


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[mqttsn]\nport = 1885\n", ["mqttsn: unknown key"]),
        ("[broker]\nmax_inflght = 3\n", ["broker.max_inflght: unknown key", "did you mean 'max_inflight'"]),
        ("[listeners.tcp]\nport = 1\n", ["listeners.tcp.port: unknown key"]),
        ("broker = 3\n", ["broker: expected a table, got integer 3"]),
        ('[broker]\nmax_inflight = "64"\n', ["broker.max_inflight: expected an integer, got string '64'"]),
        ("[broker]\nmax_inflight = true\n", ["broker.max_inflight: expected an integer, got boolean True"]),
        ("[broker]\nmax_inflight = 1.5\n", ["broker.max_inflight: expected an integer, got float 1.5"]),
        ("[broker]\nsys_interval = true\n", ["broker.sys_interval: expected a number, got boolean True"]),
        ("[broker]\nsys_interval = nan\n", ["broker.sys_interval: expected a finite number"]),
        ("[broker]\nretain_available = 1\n", ["broker.retain_available: expected a boolean, got integer 1"]),
        ("[log]\nlevel = []\n", ["log.level: expected a string, got array"]),
        ("[broker]\nmax_inflight = 0\n", ["broker.max_inflight: must be >= 1, got 0"]),
        ("[broker]\nmax_inflight = 65536\n", ["broker.max_inflight: must be <= 65535, got 65536"]),
        ("[broker]\nsys_interval = -1\n", ["broker.sys_interval: must be >= 0, got -1.0"]),
        ('[log]\nlevel = "loud"\n', ["log.level: must be one of debug, info, warning, error; got 'loud'"]),
        ('[listeners.tcp]\nbind = "localhost:1883"\n', ["listeners.tcp.bind: invalid bind address"]),
        ('[listeners.tcp]\nbind = "0.0.0.0:70000"\n', ["listeners.tcp.bind: invalid port", "0..65535"]),
    ],
)
def test_file_errors_name_the_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, text), environ={})
    _error(excinfo, *fragments)


@pytest.mark.parametrize(
    ("environ", "fragments"),
    [
        ({"MQGATE_BROKER__NOPE": "1"}, ["MQGATE_BROKER__NOPE: matches no configuration key"]),
        ({"MQGATE_MQTTSN__PORT": "1885"}, ["MQGATE_MQTTSN__PORT: matches no configuration key"]),
        ({"MQGATE_BROKER_MAX_INFLIGHT": "1"}, ["MQGATE_BROKER_MAX_INFLIGHT: matches no configuration key"]),
        ({"MQGATE_BROKER__MAX_INFLIGHT__X": "1"}, ["MQGATE_BROKER__MAX_INFLIGHT__X: matches no"]),
        ({"MQGATE_BROKER": "1"}, ["MQGATE_BROKER: broker is a section"]),
        (
            {"MQGATE_BROKER__MAX_INFLIGHT": "many"},
            ["MQGATE_BROKER__MAX_INFLIGHT (broker.max_inflight): expected an integer, got 'many'"],
        ),
        ({"MQGATE_BROKER__MAX_INFLIGHT": "true"}, ["MQGATE_BROKER__MAX_INFLIGHT", "expected an integer"]),
        ({"MQGATE_BROKER__SYS_INTERVAL": "soon"}, ["MQGATE_BROKER__SYS_INTERVAL", "expected a number"]),
        ({"MQGATE_BROKER__SYS_INTERVAL": "inf"}, ["MQGATE_BROKER__SYS_INTERVAL", "finite"]),
        ({"MQGATE_BROKER__RETAIN_AVAILABLE": "maybe"}, ["MQGATE_BROKER__RETAIN_AVAILABLE", "a boolean"]),
        ({"MQGATE_BROKER__MAX_INFLIGHT": "0"}, ["MQGATE_BROKER__MAX_INFLIGHT", "must be >= 1, got 0"]),
        ({"MQGATE_LOG__FORMAT": "xml"}, ["MQGATE_LOG__FORMAT (log.format): must be one of text, json"]),
        ({"MQGATE_LISTENERS__TCP__BIND": "::1:1883"}, ["MQGATE_LISTENERS__TCP__BIND", "invalid bind"]),
        (
            {"MQGATE_LOG__LEVEL": "debug", "mqgate_log__level": "info"},
            ["mqgate_log__level: sets the same key as MQGATE_LOG__LEVEL"],
        ),
    ],
)
def test_env_errors_name_the_variable(environ: dict[str, str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(environ=environ)
    _error(excinfo, *fragments)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, environ={})
    _error(excinfo, str(path), "No such file")


def test_bad_toml_gives_the_parser_message(tmp_path: Path) -> None:
    path = _write(tmp_path, "[broker]\nmax_inflight = = 3\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, environ={})
    _error(excinfo, str(path), "invalid TOML", "line 2")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:1883", ("0.0.0.0", 1883)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::]:1883", ("::", 1883)),
        ("[::1]:65535", ("::1", 65535)),
        (":1883", ("0.0.0.0", 1883)),
        ("1883", ("0.0.0.0", 1883)),
    ],
)
def test_parse_bind_accepts(value: str, expected: tuple[str, int]) -> None:
    assert parse_bind(value, "x.bind") == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "1883:",
        "host:1883",
        "::1:1883",
        "[127.0.0.1]:1883",
        "[::1]",
        "1.2.3.4:65536",
        "1.2.3.4:-1",
        "1.2.3.4:a",
    ],
)
def test_parse_bind_rejects(value: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_bind(value, "x.bind")
    _error(excinfo, "x.bind: invalid", repr(value))


def _reload(config: Config) -> Config:
    return build_section(Config, tomllib.loads(dump_toml(config)))


def test_dump_round_trips_defaults() -> None:
    assert _reload(Config()) == Config()


def test_dump_round_trips_changed_values(tmp_path: Path) -> None:
    config = Config(
        listeners=ListenersConfig(tcp=TcpListenerConfig(enabled=False, bind="[::]:0", backlog=5)),
        broker=replace(
            BrokerConfig(), max_inflight=7, sys_interval=0.25, shared_subscription_strategy="sticky"
        ),
        log=LogConfig(level="error", format="json"),
    )
    assert _reload(config) == config
    assert load_config(_write(tmp_path, dump_toml(config)), environ={}) == config


def test_generic_mapper_round_trips_collections_and_arrays_of_tables() -> None:
    root = _Root(
        _Gateway(
            predefined={1: "a/b", -2: "c"},
            labels={"plain": "x", "needs quoting/é": 'quote " back\\slash\n\ttab\x7f'},
            topics=["a", "b/#"],
            ratio=3.0,
            note="hi",
            routes=[_Route("first", [1, 2]), _Route("second")],
        )
    )
    text = dump_toml(root)
    assert 'predefined = { 1 = "a/b", -2 = "c" }' in text
    assert "[[gateway.routes]]" in text
    assert build_section(_Root, tomllib.loads(text)) == root
    assert build_section(_Root, tomllib.loads(dump_toml(_Root()))) == _Root()


def test_generic_mapper_errors_name_nested_keys() -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"gateway": {"predefined": {"x": "a"}}}, "gateway.predefined: expected integer keys, got 'x'"),
        ({"gateway": {"predefined": {"1": 2}}}, "gateway.predefined.1: expected a string, got integer 2"),
        ({"gateway": {"topics": ["a", 1]}}, "gateway.topics[1]: expected a string, got integer 1"),
        ({"gateway": {"routes": [{"name": "a"}, {"ports": [1]}]}}, "gateway.routes[1].name: required key"),
        ({"gateway": {"routes": [{"name": "a", "x": 1}]}}, "gateway.routes[0].x: unknown key"),
        ({"gateway": {"routes": {"name": "a"}}}, "gateway.routes: expected an array, got table"),
    ]
    for data, fragment in cases:
        with pytest.raises(ConfigError) as excinfo:
            build_section(_Root, data)
        _error(excinfo, fragment)


def test_env_sets_lists_dicts_and_optionals_as_toml_inline_values() -> None:
    environ = {
        "MQGATE_GATEWAY__TOPICS": '["a", "b"]',
        "MQGATE_GATEWAY__PREDEFINED": '{ 1 = "a/b" }',
        "MQGATE_GATEWAY__NOTE": "",
        "MQGATE_GATEWAY__RATIO": "2",
    }
    data = apply_env(_Root, {"gateway": {"note": "from file"}}, environ)
    assert build_section(_Root, data) == _Root(
        _Gateway(predefined={1: "a/b"}, topics=["a", "b"], ratio=2.0, note=None)
    )


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        (
            {"MQGATE_GATEWAY__TOPICS": "a,b"},
            "MQGATE_GATEWAY__TOPICS (gateway.topics): expected a TOML inline",
        ),
        ({"MQGATE_GATEWAY__TOPICS": "[1]"}, "MQGATE_GATEWAY__TOPICS (gateway.topics)[0]: expected a string"),
        ({"MQGATE_GATEWAY__ROUTES": "[]"}, "MQGATE_GATEWAY__ROUTES: gateway.routes is an array of tables"),
    ],
)
def test_env_collection_errors_name_the_variable(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        apply_env(_Root, {}, environ)
    _error(excinfo, fragment)
