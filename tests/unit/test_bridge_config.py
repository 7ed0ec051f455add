"""``[[bridges]]`` configuration and the unit of ``retry_interval`` (issue 7: EMQX 4.3 converted it twice).

The retransmission timer is checked on :class:`core.mqtt.client.MqttClient` with a fake event loop: time is a
number the test moves, ``call_at`` records its deadline, nothing touches a socket.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.bridge import Bridge
from core.broker.broker import Broker
from core.broker.embedded import EmbeddedBroker
from core.clock import FakeClock
from core.config import BridgeConfig, BrokerConfig, Config, build_section, load_config
from core.errors import ConfigError
from core.mqtt.client import ClientState, MqttClient
from core.mqtt.codec import Publish, StreamDecoder


class _Handle:
    def __init__(self, loop: FakeLoop, when: float, callback: Callable[..., None], args: tuple[Any, ...]):
        self.loop = loop
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The part of an event loop the client's timers and write batching use; time moves by :meth:`advance`."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.handles: list[_Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> _Handle:
        handle = _Handle(self, when, callback, args)
        self.handles.append(handle)
        return handle

    def call_soon(self, callback: Callable[..., None], *args: Any) -> _Handle:
        return self.call_at(self.now, callback, *args)

    def timers(self) -> list[float]:
        """Deadlines of the pending timers (call_soon excluded)."""
        return sorted(h.when for h in self.handles if not h.cancelled and h.when > self.now)

    def advance(self, seconds: float) -> None:
        """Move time on and run, in order, every callback that is due."""
        self.now += seconds
        while True:
            due = [h for h in self.handles if not h.cancelled and h.when <= self.now]
            if not due:
                return
            handle = min(due, key=lambda h: h.when)
            self.handles.remove(handle)
            handle.callback(*handle.args)


class _Transport:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False


class _Protocol:
    def __init__(self) -> None:
        self.transport = _Transport()


def connected_client(client: MqttClient, loop: FakeLoop) -> _Protocol:
    """Put ``client`` in the state CONNACK leaves it in, writing to a recording transport."""
    protocol = _Protocol()
    client._loop = loop  # type: ignore[assignment]
    client._protocol = protocol  # type: ignore[assignment]
    client.state = ClientState.CONNECTED
    return protocol


def publishes(data: bytes, version: int = 4) -> list[tuple[int, bool, bytes]]:
    """(packet id, dup, payload) of the PUBLISHes in ``data``."""
    packets = StreamDecoder(version=version).feed(data)
    return [(p.packet_id, p.dup, p.payload) for p in packets if isinstance(p, Publish)]


def bridge_config(tmp_path: Path, **values: Any) -> BridgeConfig:
    data = {"name": "cloud", "url": "mqtt://127.0.0.1:1883", "buffer_dir": str(tmp_path), **values}
    return build_section(BridgeConfig, data, "bridges[0]")


# --- retry_interval is seconds, used once


def test_retry_interval_2_in_the_file_resends_after_2_seconds_not_2000(tmp_path: Path) -> None:
    config_file = tmp_path / "mqgate.toml"
    config_file.write_text(
        f'[[bridges]]\nname = "cloud"\nurl = "mqtt://127.0.0.1:1883"\nretry_interval = 2\n'
        f'buffer_dir = "{tmp_path}"\n'
    )
    config = load_config(config_file, environ={})
    assert config.bridges[0].retry_interval == 2.0
    bridge = Bridge(config.bridges[0], EmbeddedBroker(Broker(BrokerConfig()), FakeClock()))
    try:
        client = bridge.client
        assert client.retry_interval == 2.0
        loop = FakeLoop(now=100.0)
        protocol = connected_client(client, loop)
        assert client.publish("up/a", b"0", qos=1)
        assert loop.timers() == [102.0]  # the resend deadline: 2 s after the PUBLISH
        loop.advance(0)
        assert publishes(bytes(protocol.transport.written)) == [(1, False, b"0")]
        protocol.transport.written.clear()
        loop.advance(1.999)
        assert protocol.transport.written == b""  # not before 2 s
        loop.advance(0.001)
        assert publishes(bytes(protocol.transport.written)) == [(1, True, b"0")]  # same id, DUP set
        assert client.retransmitted == 1
        assert loop.timers() == [104.0]  # and again 2 s after the resend
    finally:
        bridge.store.close()


def test_retry_interval_from_the_environment_is_seconds_too(tmp_path: Path) -> None:
    environ = {"MQGATE_BRIDGES": "x"}  # arrays of tables cannot be set from the environment...
    with pytest.raises(ConfigError, match="array of tables"):
        load_config(environ=environ)
    config = bridge_config(tmp_path, retry_interval=0.5)  # ...but each publish waits 0.5 s, not 500
    bridge = Bridge(config, EmbeddedBroker(Broker(BrokerConfig()), FakeClock()))
    try:
        client = bridge.client
        loop = FakeLoop(now=10.0)
        protocol = connected_client(client, loop)
        client.publish("t", b"a", qos=1)
        loop.advance(0.2)
        client.publish("t", b"b", qos=1)
        loop.advance(0)
        protocol.transport.written.clear()
        loop.advance(0.3)  # t = 10.5: only the first is due
        assert publishes(bytes(protocol.transport.written)) == [(1, True, b"a")]
        protocol.transport.written.clear()
        loop.advance(0.2)  # t = 10.7: the second
        assert publishes(bytes(protocol.transport.written)) == [(2, True, b"b")]
    finally:
        bridge.store.close()


def test_an_acknowledged_publish_is_not_resent() -> None:
    client = MqttClient(host="127.0.0.1", port=1, retry_interval=1.0)
    loop = FakeLoop()
    protocol = connected_client(client, loop)
    done: list[int | None] = []
    client.publish("t", b"a", qos=1, on_done=done.append)
    client._data_received(protocol, b"\x40\x02\x00\x01")  # type: ignore[arg-type]  # PUBACK 1
    assert done == [0]
    loop.advance(0)
    protocol.transport.written.clear()
    loop.advance(5.0)
    assert protocol.transport.written == b""


def test_without_retry_interval_no_timer_is_armed() -> None:
    client = MqttClient(host="127.0.0.1", port=1)
    loop = FakeLoop()
    connected_client(client, loop)
    client.publish("t", b"a", qos=1)
    assert loop.timers() == []


def test_mqtt5_reconnects_instead_of_resending_on_the_connection() -> None:
    """MQTT 5.0 §4.4 [MQTT-4.4.0-1]: no resend but on reconnect; the unacknowledged publish comes back to the
    caller (clean start) to be sent on the next connection."""
    client = MqttClient(host="127.0.0.1", port=1, protocol_version=5, retry_interval=1.0)
    loop = FakeLoop()
    protocol = connected_client(client, loop)
    done: list[int | None] = []
    client.publish("t", b"a", qos=1, on_done=done.append)
    loop.advance(0)
    protocol.transport.written.clear()
    protocol.transport.close = lambda: None  # type: ignore[attr-defined]
    loop.advance(1.0)
    assert client.state is ClientState.DISCONNECTED
    assert protocol.transport.written[:1] == b"\xe0"  # DISCONNECT
    assert done == [None]  # handed back: not delivered, send it again


# --- configuration


def test_bridges_default_to_none() -> None:
    assert Config().bridges == []


def test_a_bridge_needs_a_name_and_a_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bridges\[0\]\.url: required key is missing"):
        build_section(Config, {"bridges": [{"name": "x"}]})
    with pytest.raises(ConfigError, match=r"bridges\[0\]\.name: required key is missing"):
        build_section(Config, {"bridges": [{"url": "mqtt://h"}]})


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"url": "http://h:1"}, "bridges[0].url: 'http://h:1' must be mqtt://host:port"),
        ({"url": "mqtt://h:99999"}, "bridges[0].url: bad port"),
        ({"url": "mqtt://"}, "must be mqtt://host:port or mqtts://host:port"),
        ({"name": "a/b"}, "bridges[0].name: 'a/b' must be 1-64 letters"),
        ({"forwards": ["a/#/b"]}, "bridges[0].forwards[0]: 'a/#/b' is not a topic filter"),
        ({"subscriptions": ["ok", "x+"]}, "bridges[0].subscriptions[1]: 'x+' is not a topic filter"),
        ({"remote_prefix": "a/+/"}, "bridges[0].remote_prefix: 'a/+/' cannot start a topic name"),
        ({"qos": 3}, "bridges[0].qos: must be <= 2"),
        ({"max_inflight": 0}, "bridges[0].max_inflight: must be >= 1"),
        ({"retry_interval": 0}, "bridges[0].retry_interval: must be >= 0.01"),
        ({"protocol_version": 3}, "bridges[0].protocol_version: must be one of 4, 5"),
    ],
)
def test_bad_bridge_settings_are_rejected_naming_the_key(values: dict[str, Any], fragment: str) -> None:
    bridge = {"name": "cloud", "url": "mqtt://h:1883", **values}
    with pytest.raises(ConfigError) as excinfo:
        build_section(Config, {"bridges": [bridge]})
    assert fragment in str(excinfo.value)


def test_mqtts_url_defaults_to_port_8883(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, url="mqtts://broker.example", verify=False)
    bridge = Bridge(config, EmbeddedBroker(Broker(BrokerConfig()), FakeClock()))
    try:
        assert (bridge.client.host, bridge.client.port) == ("broker.example", 8883)
        assert bridge.client.ssl is not None
        assert bridge.client.client_id == "mqgate-bridge-cloud"
        assert bridge.client.max_inflight == 32
    finally:
        bridge.store.close()
