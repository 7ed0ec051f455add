"""CoAP over DTLS with pre-shared keys (``gateways.coap.dtls``, ``coaps://``): libcoap's
``coap-client-openssl`` and ``coap-client-gnutls`` against the tinydtls server side, and the DTLS wrapper
driven in memory by a tinydtls client."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest

pytest.importorskip("DTLSSocket")

from DTLSSocket import dtls  # type: ignore[import-untyped]

from gateways.coap.dtls import DtlsDatagramCore
from tests.conftest import RunningBroker
from tests.integration.helpers import TIMEOUT, Clients

StartBroker = Callable[..., RunningBroker]

PSK = {"sensor-1": "s3cret-key"}


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def broker(start_broker: StartBroker) -> RunningBroker:
    return start_broker(gateways={"coap": {"dtls": {"enabled": True, "bind": "127.0.0.1:0", "psk": PSK}}})


def _mqtt_port(broker: RunningBroker) -> int:
    port = broker.port
    assert port is not None
    return port


def _coaps(
    broker: RunningBroker,
    tool: str,
    method: str,
    path: str,
    *,
    key: str = "s3cret-key",
    payload: str = "",
    wait: int = 3,
) -> subprocess.CompletedProcess[str]:
    port = broker.app.listeners["coap:dtls"].port  # type: ignore[attr-defined]
    args = [tool, "-B", str(wait), "-u", "sensor-1", "-k", key, "-m", method]
    if payload:
        args += ["-e", payload]
    return subprocess.run(
        [*args, f"coaps://127.0.0.1:{port}/{path}"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 10,
        check=False,
    )


@pytest.mark.parametrize("tool", ["coap-client-openssl", "coap-client-gnutls"])
def test_coaps_put_with_the_right_psk_publishes_to_mqtt(
    broker: RunningBroker, clients: Clients, tool: str
) -> None:
    mqtt = clients.paho(_mqtt_port(broker), "watcher", version=5)
    assert mqtt.subscribe("dtls/#", 1) == 1
    result = _coaps(broker, tool, "put", "mqtt/dtls/temp?c=sensor-1", payload="21.5")
    assert result.returncode == 0, result.stderr
    message = mqtt.messages.get(timeout=TIMEOUT)
    assert (message.topic, message.payload) == ("dtls/temp", b"21.5")


def test_coaps_get_reads_a_retained_message_over_dtls(broker: RunningBroker, clients: Clients) -> None:
    mqtt = clients.paho(_mqtt_port(broker), "writer", version=5)
    mqtt.publish("dtls/state", b"on", qos=1, retain=True)
    result = _coaps(broker, "coap-client-openssl", "get", "mqtt/dtls/state?c=reader")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "on"


def test_coaps_with_a_wrong_psk_publishes_nothing(broker: RunningBroker, clients: Clients) -> None:
    mqtt = clients.paho(_mqtt_port(broker), "watcher", version=5)
    assert mqtt.subscribe("dtls/#", 1) == 1
    result = _coaps(
        broker, "coap-client-openssl", "put", "mqtt/dtls/x?c=intruder", key="wrong", payload="x", wait=1
    )
    assert "2.04" not in result.stdout
    # the same broker still serves the right key, and only that message arrives
    assert _coaps(broker, "coap-client-openssl", "put", "mqtt/dtls/y?c=sensor-1", payload="y").returncode == 0
    message = mqtt.messages.get(timeout=TIMEOUT)
    assert (message.topic, message.payload) == ("dtls/y", b"y")
    assert mqtt.messages.empty()


# --- the DTLS wrapper in memory


class _EchoCore:
    """A DatagramCore that answers every datagram with ``b"echo:" + data``; its timer is at ``deadline``."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Hashable]] = []
        self.out: list[tuple[Hashable, bytes]] = []
        self.deadline: float | None = None
        self.timers = 0

    def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> None:
        self.received.append((data, peer))
        self.out.append((peer, b"echo:" + data))

    def datagrams_to_send(self) -> list[tuple[Hashable, bytes]]:
        out, self.out = self.out, []
        return out

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        self.timers += 1
        self.deadline = None


class _Client:
    """A tinydtls PSK client whose records are carried by hand to and from a DtlsDatagramCore."""

    def __init__(self, server: DtlsDatagramCore, peer: tuple[str, int], key: bytes = b"s3cret-key") -> None:
        self.server = server
        self.peer = peer
        self.to_server: list[bytes] = []
        self.plain: list[bytes] = []
        self.dtls: Any = dtls.DTLS(
            read=self._read,
            write=self._write,
            event=lambda level, code: None,
            pskId=b"sensor-1",
            pskStore={b"sensor-1": key},
        )
        self.session = self.dtls.connect("::1", 5684)
        self.pump(0.0)

    def _read(self, address: object, data: bytes) -> int:
        self.plain.append(bytes(data))
        return len(data)

    def _write(self, address: object, data: bytes) -> int:
        self.to_server.append(bytes(data))
        return len(data)

    def pump(self, now: float) -> None:
        for _ in range(20):
            if not self.to_server:
                return
            records, self.to_server = self.to_server, []
            for record in records:
                self.server.receive_datagram(record, self.peer, now)
            for peer, data in self.server.datagrams_to_send():
                assert peer == self.peer
                self.dtls.handleMessageAddr("::1", 5684, data)

    def send(self, data: bytes, now: float) -> None:
        self.dtls.write(self.session, data)
        self.pump(now)


def test_dtls_core_hands_decrypted_datagrams_to_the_inner_core_and_encrypts_the_answers() -> None:
    inner = _EchoCore()
    core = DtlsDatagramCore(inner, {b"sensor-1": b"s3cret-key"})
    client = _Client(core, ("127.0.0.1", 40001))
    client.send(b"hello", 1.0)
    assert inner.received == [(b"hello", ("127.0.0.1", 40001))]
    assert client.plain == [b"echo:hello"]


def test_dtls_core_with_a_wrong_key_delivers_nothing() -> None:
    inner = _EchoCore()
    core = DtlsDatagramCore(inner, {b"sensor-1": b"s3cret-key"})
    client = _Client(core, ("127.0.0.1", 40002), key=b"wrong")
    client.send(b"hello", 1.0)
    assert inner.received == []
    assert client.plain == []


def test_dtls_core_bounds_peers_and_forgets_idle_ones() -> None:
    inner = _EchoCore()
    core = DtlsDatagramCore(inner, {b"sensor-1": b"s3cret-key"}, max_peers=1, idle_timeout=10.0)
    first = _Client(core, ("127.0.0.1", 40003))
    _Client(core, ("127.0.0.1", 40004))  # refused: max_peers
    assert core.peers == 1
    assert core.dropped_peers >= 1
    first.send(b"a", 1.0)
    assert first.plain == [b"echo:a"]
    inner.deadline = 5.0
    assert core.get_timer() == 1.0  # the peer sweep (1 s after the first datagram) comes first
    core.handle_timer(5.0)
    assert inner.timers == 1
    assert core.peers == 1
    core.handle_timer(20.0)  # 19 s after its last datagram: forgotten
    assert core.peers == 0
    second = _Client(core, ("127.0.0.1", 40004))
    second.send(b"b", 21.0)
    assert second.plain == [b"echo:b"]
