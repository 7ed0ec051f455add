"""MQTT bridges (``[[bridges]]``, issue 7) between mqgate's embedded broker and a real mosquitto, and against
scripted fake servers for what mosquitto will not do (never acknowledge, so that the window and the
retransmission timer show).

mqgate runs as the ``start_broker`` fixture runs it (an App in a thread); mosquitto is started by the test on
a free loopback port with its own config and stopped by PID (:mod:`tests.integration.mosquitto`); paho-mqtt
clients publish and subscribe on both sides. A fake server runs on the test's event loop; blocking paho calls
are moved to a thread so that it keeps answering.

Every wait is bounded (an event, a queue, a polled condition with a deadline); nothing sleeps to pass. Every
mqgate, mosquitto, client and server a test starts is closed by a fixture.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.bridge import Bridge
from core.mqtt.codec import Connack, Connect, Disconnect, Puback, Publish, Subscribe
from core.mqtt.numbers import ReasonCode
from tests.conftest import RunningBroker
from tests.integration.helpers import TIMEOUT, Clients, PahoClient, wait_for
from tests.integration.mosquitto import Mosquitto, mosquittos_fixture
from tests.integration.test_mqtt_client import FakeConnection, FakeServer

needs_mosquitto = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto not installed")
VERSIONS = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])

DRAIN_TIMEOUT = 30.0
"""Seconds for a thousand buffered messages to reach the subscriber once mosquitto is back."""


# --- fixtures


@pytest.fixture
def mosquittos(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    yield from mosquittos_fixture(tmp_path)


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


class Mqgates:
    """Starts mqgate with one bridge (a :class:`RunningBroker`) and stops every one still running at the end;
    :meth:`stop` ends one mid-test (mqgate restarted with the same buffer)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[RunningBroker] = []

    def start(self, url: str, **bridge: Any) -> RunningBroker:
        settings: dict[str, Any] = {
            "name": "cloud",
            "url": url,
            "buffer_dir": str(self.tmp_path / "bridge-buffer"),
            "backoff_min": 0.05,
            "backoff_max": 0.5,
            **bridge,
        }
        running = RunningBroker({"bridges": [settings]})
        self.running.append(running)
        return running

    def stop(self, running: RunningBroker) -> None:
        self.running.remove(running)
        running.stop()

    def close(self) -> None:
        while self.running:
            self.running.pop().stop()


@pytest.fixture
def mqgates(tmp_path: Path) -> Iterator[Mqgates]:
    owned = Mqgates(tmp_path)
    try:
        yield owned
    finally:
        owned.close()


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., Any]]:
    """``await fakes(script)``: a started :class:`FakeServer`, closed at the end."""
    servers: list[FakeServer] = []

    async def start(script: Callable[[FakeConnection, int], Any]) -> FakeServer:
        server = await FakeServer(script).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


def url_of(broker: Mosquitto | FakeServer) -> str:
    return f"mqtt://127.0.0.1:{broker.port}"


def local_port(running: RunningBroker) -> int:
    assert running.port is not None
    return running.port


def bridge_of(running: RunningBroker) -> Bridge:
    (bridge,) = running.app.bridges
    return bridge


def on_loop(running: RunningBroker, fn: Callable[[Bridge], Any]) -> Any:
    """``fn(bridge)`` evaluated on mqgate's loop (the bridge is not thread-safe)."""
    return running.call(lambda: fn(bridge_of(running)))


def wait_bridged(running: RunningBroker, timeout: float = TIMEOUT) -> None:
    """Until the bridge is connected and the remote acknowledged its subscriptions."""
    wait_for(lambda: on_loop(running, lambda b: b.connected and b.client.subscriptions_synced), timeout)


def drain(subscriber: PahoClient, count: int, timeout: float = TIMEOUT) -> list[tuple[str, bytes]]:
    return [(m.topic, bytes(m.payload)) for m in subscriber.expect_many(count, timeout)]


# --- both directions with prefixes


@needs_mosquitto
@VERSIONS
def test_local_publish_reaches_a_mosquitto_subscriber_with_the_remote_prefix(
    mosquittos: Callable[..., Mosquitto], mqgates: Mqgates, clients: Clients, version: int
) -> None:
    remote = mosquittos()
    remote_sub = clients.paho(remote.port, "remote-sub", version=version)
    remote_sub.subscribe("site1/#", 2)
    running = mqgates.start(
        url_of(remote), protocol_version=version, forwards=["sensors/#"], remote_prefix="site1/", qos=2
    )
    wait_bridged(running)
    publisher = clients.paho(local_port(running), "local-pub", version=version)
    publisher.publish("sensors/t", b"q0", 0)
    publisher.publish("sensors/t", b"q1", 1)
    publisher.publish("sensors/t", b"q2", 2)
    publisher.publish("other/t", b"not forwarded", 1)
    received = sorted(drain(remote_sub, 3))
    assert received == [("site1/sensors/t", b"q0"), ("site1/sensors/t", b"q1"), ("site1/sensors/t", b"q2")]
    wait_for(lambda: on_loop(running, lambda b: b.buffered == 0 and b.metrics.forwarded == 3))
    remote_sub.expect_none()


@needs_mosquitto
@VERSIONS
def test_remote_publish_reaches_a_local_subscriber_with_the_local_prefix(
    mosquittos: Callable[..., Mosquitto], mqgates: Mqgates, clients: Clients, version: int
) -> None:
    remote = mosquittos()
    running = mqgates.start(
        url_of(remote), protocol_version=version, subscriptions=["commands/#"], local_prefix="cloud/"
    )
    wait_bridged(running)
    local_sub = clients.paho(local_port(running), "local-sub", version=version)
    local_sub.subscribe("cloud/#", 1)
    remote_pub = clients.paho(remote.port, "remote-pub", version=version)
    remote_pub.publish("commands/valve", b"open", 1)
    remote_pub.publish("elsewhere/x", b"not subscribed", 1)
    message = local_sub.expect()
    assert (message.topic, message.payload, message.qos) == ("cloud/commands/valve", b"open", 1)
    assert on_loop(running, lambda b: b.metrics.received) == 1


@needs_mosquitto
def test_remote_retained_messages_arrive_retained_locally(
    mosquittos: Callable[..., Mosquitto], mqgates: Mqgates, clients: Clients
) -> None:
    remote = mosquittos()
    clients.paho(remote.port, "remote-pub", version=4).publish("config/rate", b"10", 1, retain=True)
    running = mqgates.start(url_of(remote), subscriptions=["config/#"], local_prefix="remote/")
    wait_bridged(running)
    wait_for(lambda: running.call(lambda: running.broker.retained.get("remote/config/rate") is not None))
    late = clients.paho(local_port(running), "late", version=4)
    late.subscribe("remote/config/#", 1)
    message = late.expect()
    assert (message.topic, message.payload, message.retain) == ("remote/config/rate", b"10", True)


# --- store and forward


@needs_mosquitto
def test_qos1_forwards_survive_mosquitto_stopped_and_restarted_nothing_lost_in_order(
    mosquittos: Callable[..., Mosquitto], mqgates: Mqgates, clients: Clients
) -> None:
    """1,000 QoS 1 messages, mosquitto stopped while the bridge forwards them: the subscriber on mosquitto
    receives every one, first occurrences in publish order (QoS 1 may repeat one whose PUBACK was lost)."""
    remote = mosquittos(persistence=True, extra=["max_queued_messages 0"])
    remote_sub = clients.paho(remote.port, "remote-sub", version=4, clean_start=False)
    remote_sub.subscribe("edge/#", 1)
    running = mqgates.start(url_of(remote), forwards=["data/#"], remote_prefix="edge/", max_inflight=16)
    wait_bridged(running)
    publisher = clients.paho(local_port(running), "local-pub", version=4)
    total, before_stop = 1000, 300
    for seq in range(before_stop):
        publisher.publish("data/seq", str(seq).encode(), 1)
    received = [int(m.payload) for m in remote_sub.expect_many(100, TIMEOUT)]
    remote.stop()  # while the bridge is still forwarding the first 300
    wait_for(lambda: not on_loop(running, lambda b: b.connected))
    for seq in range(before_stop, total):
        assert publisher.publish("data/seq", str(seq).encode(), 1) == 0  # accepted into the buffer
    assert on_loop(running, lambda b: b.buffered + b.waiting) >= total - before_stop
    while not remote_sub.messages.empty():  # what it got before mosquitto went away
        received.append(int(remote_sub.messages.get_nowait().payload))
    remote.start()
    remote_sub = clients.paho(remote.port, "remote-sub", version=4, clean_start=False)
    seen = set(received)
    while len(seen) < total:
        seq = int(remote_sub.expect(DRAIN_TIMEOUT).payload)
        received.append(seq)
        seen.add(seq)
    first_occurrences = list(dict.fromkeys(received))
    assert first_occurrences == list(range(total))
    wait_for(lambda: on_loop(running, lambda b: b.buffered) == 0)


@needs_mosquitto
def test_buffered_forwards_survive_an_mqgate_restart(
    mosquittos: Callable[..., Mosquitto], mqgates: Mqgates, clients: Clients
) -> None:
    remote = mosquittos()
    remote.stop()
    running = mqgates.start(url_of(remote), forwards=["data/#"])
    publisher = clients.paho(local_port(running), "local-pub", version=4)
    for seq in range(50):
        publisher.publish("data/seq", str(seq).encode(), 1)
    wait_for(lambda: on_loop(running, lambda b: b.buffered) == 50)
    publisher.close()
    mqgates.stop(running)
    remote.start()
    remote_sub = clients.paho(remote.port, "remote-sub", version=4)
    remote_sub.subscribe("data/#", 1)
    running = mqgates.start(url_of(remote), forwards=["data/#"])
    assert [int(m.payload) for m in remote_sub.expect_many(50)] == list(range(50))
    wait_for(lambda: on_loop(running, lambda b: b.buffered) == 0)


@needs_mosquitto
def test_a_full_buffer_holds_forwards_in_the_broker_session_until_there_is_room(
    mosquittos: Callable[..., Mosquitto], mqgates: Mqgates, clients: Clients
) -> None:
    """The buffer (1 KiB: four of these messages) fills during the outage; the rest wait unacknowledged in
    the bridge's broker session and follow, in order, once the remote acknowledges the first ones."""
    remote = mosquittos(persistence=True)
    remote_sub = clients.paho(remote.port, "remote-sub", version=4, clean_start=False)
    remote_sub.subscribe("data/#", 1)
    remote.stop()  # the subscriber's session is saved, and restored with mosquitto
    running = mqgates.start(url_of(remote), forwards=["data/#"], max_buffer_bytes=1024)
    publisher = clients.paho(local_port(running), "local-pub", version=4)
    payloads = [f"{seq:03d}".encode() * 67 for seq in range(20)]  # 201 bytes: 241 counted per message
    for payload in payloads:
        assert publisher.publish("data/seq", payload, 1) == 0
    wait_for(lambda: on_loop(running, lambda b: (b.buffered, b.waiting)) == (4, 16))
    assert on_loop(running, lambda b: b.metrics.buffer_full) == 1
    remote.start()
    remote_sub = clients.paho(remote.port, "remote-sub", version=4, clean_start=False)
    assert [bytes(m.payload) for m in remote_sub.expect_many(20)] == payloads
    wait_for(lambda: on_loop(running, lambda b: b.buffered + b.waiting) == 0)
    assert on_loop(running, lambda b: b.metrics.forwarded) == 20


@needs_mosquitto
def test_a_client_taking_the_bridges_client_id_is_kicked_out_and_the_bridge_goes_on(
    mosquittos: Callable[..., Mosquitto], mqgates: Mqgates, clients: Clients
) -> None:
    remote = mosquittos()
    remote_sub = clients.paho(remote.port, "remote-sub", version=4)
    remote_sub.subscribe("data/#", 1)
    running = mqgates.start(url_of(remote), forwards=["data/#"])
    wait_bridged(running)
    intruder = clients.paho(local_port(running), "$bridge/cloud", version=5)  # takes the session over
    wait_for(lambda: not intruder.disconnects.empty())  # until the bridge takes it back
    wait_for(lambda: on_loop(running, lambda b: b.session is not None))
    clients.paho(local_port(running), "local-pub", version=4).publish("data/x", b"still bridged", 1)
    assert drain(remote_sub, 1) == [("data/x", b"still bridged")]


# --- no loops


@needs_mosquitto
@VERSIONS
def test_no_loop_when_forwards_and_subscriptions_overlap(
    mosquittos: Callable[..., Mosquitto], mqgates: Mqgates, clients: Clients, version: int
) -> None:
    """Each message crosses once: a local message is not brought back by the bridge (the remote's echo) and a
    remote message is not sent back to the remote. Markers sent after each message prove that nothing
    followed it: a loop would have delivered the copy before the marker, which takes the same path."""
    remote = mosquittos()
    running = mqgates.start(
        url_of(remote), protocol_version=version, forwards=["loop/#"], subscriptions=["loop/#"]
    )
    wait_bridged(running)
    local_sub = clients.paho(local_port(running), "local-sub", version=version)
    local_sub.subscribe("loop/#", 1)
    remote_sub = clients.paho(remote.port, "remote-sub", version=version)
    remote_sub.subscribe("loop/#", 1)
    local_pub = clients.paho(local_port(running), "local-pub", version=version)
    remote_pub = clients.paho(remote.port, "remote-pub", version=version)

    local_pub.publish("loop/x", b"from local", 1)
    assert drain(remote_sub, 1) == [("loop/x", b"from local")]
    assert drain(local_sub, 1) == [("loop/x", b"from local")]
    remote_pub.publish("loop/r", b"marker from remote", 1)  # after any echo of loop/x on the bridge's link
    assert drain(local_sub, 1) == [("loop/r", b"marker from remote")]
    assert drain(remote_sub, 1) == [("loop/r", b"marker from remote")]

    remote_pub.publish("loop/y", b"from remote", 1)
    assert drain(local_sub, 1) == [("loop/y", b"from remote")]
    assert drain(remote_sub, 1) == [("loop/y", b"from remote")]
    local_pub.publish("loop/l", b"marker from local", 1)  # after any copy of loop/y sent back by the bridge
    assert drain(remote_sub, 1) == [("loop/l", b"marker from local")]
    assert drain(local_sub, 1) == [("loop/l", b"marker from local")]

    echoes = 2 if version == 4 else 0  # v5: the remote honours no local and sends none
    counted = (2, echoes)  # forwarded: loop/x and loop/l; their echoes dropped (v3.1.1)
    wait_for(lambda: on_loop(running, lambda b: (b.metrics.forwarded, b.metrics.echoes_dropped)) == counted)
    assert on_loop(running, lambda b: b.metrics.received) == 2  # loop/r and loop/y, nothing else
    local_sub.expect_none()
    remote_sub.expect_none()


# --- the window and the retransmission timer, against a server that never acknowledges


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def connected(conn: FakeConnection) -> Connect:
    connect = await conn.expect(Connect)
    conn.decoder.version = connect.protocol_version
    conn.send(Connack(False, 0))
    return connect


async def next_publish(conn: FakeConnection, disconnects: list[int] | None = None) -> Publish:
    """The next PUBLISH (SUBSCRIBE skipped); a DISCONNECT ends the connection (its reason recorded)."""
    while True:
        packet = await conn.recv()
        if isinstance(packet, Publish):
            return packet
        if isinstance(packet, Disconnect) and disconnects is not None:
            disconnects.append(packet.reason_code)
            raise ConnectionError("the client disconnected")
        assert isinstance(packet, Subscribe), f"unexpected {packet!r}"


async def test_max_inflight_is_enforced_against_a_server_that_never_acknowledges(
    fakes: Callable[..., Any], mqgates: Mqgates, clients: Clients
) -> None:
    """Ten QoS 1 forwards, max_inflight 3: exactly three PUBLISHes reach the server before a QoS 0 marker
    (which no window holds back); one PUBACK lets exactly one more through."""
    arrived: asyncio.Queue[Publish] = asyncio.Queue()
    acks: asyncio.Queue[int] = asyncio.Queue()

    async def script(conn: FakeConnection, index: int) -> None:
        await connected(conn)

        async def ack() -> None:
            while True:
                conn.send(Puback(await acks.get()))

        acker = asyncio.create_task(ack())
        try:
            while True:
                arrived.put_nowait(await next_publish(conn))
        finally:
            acker.cancel()

    server = await fakes(script)
    running = await in_thread(
        lambda: mqgates.start(url_of(server), forwards=["m/#"], max_inflight=3, retry_interval=60.0)
    )
    await in_thread(wait_bridged, running)
    publisher = await in_thread(lambda: clients.paho(local_port(running), "local-pub", version=4))
    for seq in range(10):
        assert await in_thread(publisher.publish, "m/seq", str(seq).encode(), 1) == 0

    def window_full(buffered: int) -> Callable[[], bool]:
        return lambda: on_loop(running, lambda b: b.client.inflight == 3 and b.buffered == buffered)

    async def until_marker(marker: bytes) -> list[bytes]:
        payloads: list[bytes] = []
        while True:
            publish = await asyncio.wait_for(arrived.get(), TIMEOUT)
            if publish.payload == marker:
                assert publish.qos == 0
                return payloads
            assert publish.qos == 1 and not publish.dup
            payloads.append(publish.payload)

    await in_thread(wait_for, window_full(10))
    await in_thread(publisher.publish, "m/marker", b"marker 1", 0)
    assert await until_marker(b"marker 1") == [b"0", b"1", b"2"]

    assert arrived.empty()
    acks.put_nowait(1)  # the packet id of b"0"
    await in_thread(wait_for, window_full(9))
    await in_thread(publisher.publish, "m/marker", b"marker 2", 0)
    assert await until_marker(b"marker 2") == [b"3"]
    server.check()


@pytest.mark.parametrize(
    ("version", "retry_interval"), [(4, 1.0), (5, 1.0), (4, 2.0)], ids=["v311-1s", "v5-1s", "v311-2s"]
)
async def test_retry_interval_is_seconds_the_resend_comes_after_it_and_not_before(
    fakes: Callable[..., Any], mqgates: Mqgates, clients: Clients, version: int, retry_interval: float
) -> None:
    """A PUBLISH the server never acknowledges comes again ``retry_interval`` seconds later (as DUP on the
    same connection with MQTT 3.1.1; MQTT 5 reconnects and sends it again, §4.4), not milliseconds and not
    a thousand times later (EMQX 4.3 converted the value twice)."""
    loop = asyncio.get_running_loop()
    seen: asyncio.Queue[tuple[float, int, Publish]] = asyncio.Queue()
    disconnects: list[int] = []

    async def script(conn: FakeConnection, index: int) -> None:
        await connected(conn)
        while True:
            publish = await next_publish(conn, disconnects)
            seen.put_nowait((loop.time(), index, publish))

    server = await fakes(script)
    running = await in_thread(
        lambda: mqgates.start(
            url_of(server),
            protocol_version=version,
            forwards=["r/#"],
            retry_interval=retry_interval,
            backoff_min=0.01,
            backoff_max=0.02,
        )
    )
    await in_thread(wait_bridged, running)
    publisher = await in_thread(lambda: clients.paho(local_port(running), "local-pub", version=4))
    await in_thread(publisher.publish, "r/x", b"payload", 1)
    t0, index0, first = await asyncio.wait_for(seen.get(), TIMEOUT)
    t1, index1, again = await asyncio.wait_for(seen.get(), retry_interval + TIMEOUT)
    assert first.payload == again.payload == b"payload"
    elapsed = t1 - t0
    assert retry_interval - 0.05 <= elapsed <= retry_interval + 0.5, elapsed
    if version == 4:
        assert (index1, again.dup, again.packet_id) == (index0, True, first.packet_id)
    else:
        assert index1 == index0 + 1  # a new connection
        assert disconnects == [ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR]
    server.check()
