"""Our MQTT client (core/mqtt/client.py) against real brokers, a mosquitto started by the test and mqgate, and
against scripted fake servers for what a real broker will not do: garbage, silence, retransmissions
(MQTT 5.0 §3.1-§3.2, §3.1.2.10, §3.14, §4.3, §4.4, §4.13).

Our client runs on the test's event loop; paho-mqtt's blocking calls are moved to a thread so the loop keeps
running. Every wait is bounded; every client, fake server and mosquitto process is stopped by the fixtures,
and the harness fails a test that leaves a task running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import signal
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from core.errors import MalformedPacket
from core.mqtt.client import MqttClient, UpstreamRefused
from core.mqtt.codec import (
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    StreamDecoder,
    SubscriptionRequest,
    WillSpec,
    encode,
)
from core.mqtt.numbers import ReasonCode
from tests.conftest import RunningBroker
from tests.integration.helpers import TIMEOUT, Clients
from tests.integration.mosquitto import POLL_INTERVAL, Mosquitto, free_port, mosquittos_fixture

T = TypeVar("T")

VERSIONS = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
needs_mosquitto = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto not installed")


async def eventually(condition: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll ``condition()`` on the loop until it is truthy; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(POLL_INTERVAL)  # polling, bounded by the deadline


async def next_of(queue: asyncio.Queue[T], timeout: float = TIMEOUT) -> T:
    try:
        return await asyncio.wait_for(queue.get(), timeout)
    except TimeoutError:
        raise AssertionError("nothing arrived in time") from None


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking paho or subprocess call without blocking the client's loop."""
    return await asyncio.to_thread(fn, *args)


# --- mosquitto


@pytest.fixture
def mosquittos(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """``mosquittos(users={...})``: a started mosquitto, stopped by PID at the end of the test."""
    yield from mosquittos_fixture(tmp_path)


@pytest.fixture
def mosquitto(mosquittos: Callable[..., Mosquitto]) -> Mosquitto:
    return mosquittos()


@pytest.fixture(params=["mosquitto", "mqgate"])
def server(request: pytest.FixtureRequest) -> Mosquitto | RunningBroker:
    """Each real broker in turn (mosquitto skipped when it is not installed)."""
    if request.param == "mosquitto":
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto not installed")
        broker: Mosquitto | RunningBroker = request.getfixturevalue("mosquitto")
        return broker
    running: RunningBroker = request.getfixturevalue("mqgate")
    return running


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


# --- fake servers


class FakeConnection:
    """One accepted connection of a :class:`FakeServer`: packets in through our decoder, bytes out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = StreamDecoder(version=5)  # switched by the client's CONNECT
        self.pending: deque[Packet] = deque()

    @property
    def version(self) -> int:
        return self.decoder.version

    async def recv(self, timeout: float = TIMEOUT) -> Packet:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise ConnectionError("client closed the connection")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.popleft()

    async def expect(self, kind: type[T], timeout: float = TIMEOUT) -> T:
        packet = await self.recv(timeout)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    def send(self, *packets: Packet) -> None:
        for packet in packets:
            self.writer.write(encode(packet, self.version))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def until_closed(self, timeout: float = TIMEOUT) -> None:
        """Read (and decode) until the client closes."""
        while await asyncio.wait_for(self.reader.read(65536), timeout):
            pass


Script = Callable[[FakeConnection, int], Awaitable[None]]


class FakeServer:
    """A plain asyncio server on an ephemeral loopback port running ``script(conn, index)`` per connection;
    ``accepted`` counts connections, ``errors`` collects script failures (assertions included)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> FakeServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        index = self.accepted
        self.accepted += 1
        try:
            await self.script(FakeConnection(reader, writer), index)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except BaseException as exc:  # reported by the test through `errors`
            self.errors.append(exc)
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=TIMEOUT)
        for writer in list(self._writers):
            writer.close()

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]


async def park(conn: FakeConnection) -> None:
    """Keep the connection open, reading, until the client closes it (or the test ends)."""
    await conn.until_closed(timeout=60)


# --- the harness: our clients with recorded callbacks, fake servers, no leaked tasks


class Recorder:
    """Callbacks of one client, as asyncio queues (and a count of on_writable calls)."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[Publish] = asyncio.Queue()
        self.connects: asyncio.Queue[bool] = asyncio.Queue()
        self.disconnects: asyncio.Queue[str] = asyncio.Queue()
        self.subacks: asyncio.Queue[tuple[tuple[str, ...], tuple[int, ...]]] = asyncio.Queue()
        self.writable = 0

    def on_writable(self) -> None:
        self.writable += 1

    def on_suback(self, requests: tuple[SubscriptionRequest, ...], codes: tuple[int, ...]) -> None:
        self.subacks.put_nowait((tuple(r.topic_filter for r in requests), codes))

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_message": self.messages.put_nowait,
            "on_connect": self.connects.put_nowait,
            "on_disconnect": self.disconnects.put_nowait,
            "on_suback": self.on_suback,
            "on_writable": self.on_writable,
        }


class Harness:
    def __init__(self) -> None:
        self.clients: list[MqttClient] = []
        self.servers: list[FakeServer] = []

    def client(self, port: int, **options: Any) -> tuple[MqttClient, Recorder]:
        recorder = Recorder()
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port,
            "connect_timeout": 2.0,
            "backoff_min": 0.05,
            "backoff_max": 0.3,
            "rng": random.Random(7),
            **recorder.callbacks(),
            **options,
        }
        client = MqttClient(**settings)
        self.clients.append(client)
        return client, recorder

    async def fake(self, script: Script) -> FakeServer:
        server = await FakeServer(script).start()
        self.servers.append(server)
        return server

    async def close(self) -> None:
        for client in self.clients:
            await client.stop()
        for server in self.servers:
            await server.close()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    owned = Harness()
    try:
        yield owned
    finally:
        await owned.close()
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not leaked, f"tasks left running: {leaked}"


def port_of(server: Mosquitto | RunningBroker) -> int:
    return server.port


# --- connecting


@VERSIONS
async def test_connect_and_stop_against_real_brokers(
    server: Mosquitto | RunningBroker, harness: Harness, version: int
) -> None:
    client, events = harness.client(port_of(server), client_id=f"edge-{version}", protocol_version=version)
    connack = await client.connect()
    assert (connack.reason_code, connack.session_present) == (0, False)
    assert (client.connected, client.connects) == (True, 1)
    assert await next_of(events.connects) is False
    assert events.writable == 1  # the connection coming up invites buffered publishes
    await client.stop()
    assert (client.connected, client.disconnects) == (False, 1)
    assert await next_of(events.disconnects) == "stopped by the client"


async def test_connection_refused_at_tcp_level_raises_oserror(harness: Harness) -> None:
    client, _ = harness.client(free_port())
    with pytest.raises(OSError):
        await client.connect()
    assert not client.connected and client.connects == 0


@needs_mosquitto
@VERSIONS
async def test_refused_credentials_raise_upstream_refused_and_are_retried(
    mosquittos: Callable[..., Mosquitto], harness: Harness, version: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqgate.client")
    broker = mosquittos(users={"edge": "secret"})
    bad, _ = harness.client(broker.port, protocol_version=version, username="edge", password=b"wrong")
    with pytest.raises(UpstreamRefused) as refused:
        await bad.connect()
    # mosquitto answers 5 "not authorised" in 3.1.1 (mapped to 0x87 by the codec) and 0x87 in v5.
    assert refused.value.reason_code == ReasonCode.NOT_AUTHORIZED
    assert not bad.connected

    bad.start()
    await eventually(lambda: sum("refused by the server" in r.getMessage() for r in caplog.records) >= 2)
    assert "reason 0x87" in next(r.getMessage() for r in caplog.records if "refused" in r.getMessage())
    assert bad.connects == 0

    good, _ = harness.client(broker.port, protocol_version=version, username="edge", password=b"secret")
    assert (await good.connect()).reason_code == 0


@needs_mosquitto
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_tls_connection_verifies_the_server_name_given_for_sni(
    mosquittos: Callable[..., Mosquitto], harness: Harness, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=broker.test"),
            *("-addext", "subjectAltName=DNS:broker.test"),
        ],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    broker = mosquittos(tls=(cert, key))
    context = ssl.create_default_context(cafile=str(cert))
    client, _ = harness.client(broker.port, ssl=context, server_hostname="broker.test", protocol_version=5)
    assert (await client.connect()).reason_code == 0
    assert client.publish("tls/x", b"secret", 1)
    await eventually(lambda: client.acked == 1)
    wrong, _ = harness.client(broker.port, ssl=context, server_hostname="other.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        await wrong.connect()


# --- publishing


@VERSIONS
async def test_published_qos_0_1_2_reach_a_paho_subscriber(
    server: Mosquitto | RunningBroker, harness: Harness, clients: Clients, version: int
) -> None:
    port = port_of(server)
    sub = clients.paho(port, "paho-sub", version=version)
    assert sub.subscribe("up/#", 2) == 2
    client, _ = harness.client(port, client_id="edge-pub", protocol_version=version)
    await client.connect()
    done: asyncio.Queue[int | None] = asyncio.Queue()
    for qos in range(3):
        assert client.publish(f"up/{qos}", f"m{qos}".encode(), qos, on_done=done.put_nowait)
    assert [await next_of(done), await next_of(done)] == [0, 0]
    received = [await in_thread(sub.expect) for _ in range(3)]
    assert [(m.topic, m.payload, m.qos) for m in received] == [
        ("up/0", b"m0", 0),
        ("up/1", b"m1", 1),
        ("up/2", b"m2", 2),
    ]
    assert (client.publishes_sent, client.acked, client.refused, client.inflight) == (3, 2, 0, 0)


@VERSIONS
async def test_max_inflight_is_enforced_and_on_writable_follows(
    server: Mosquitto | RunningBroker, harness: Harness, clients: Clients, version: int
) -> None:
    port = port_of(server)
    sub = clients.paho(port, "paho-sub", version=version)
    assert sub.subscribe("win/#", 1) == 1
    client, events = harness.client(port, protocol_version=version, max_inflight=2)
    await client.connect()
    writable = events.writable
    assert client.publish("win/1", b"1", 1)
    assert client.publish("win/2", b"2", 1)
    assert client.publish("win/0", b"qos 0 is not windowed", 0)
    assert not client.publish("win/3", b"3", 1)  # window full: nothing sent
    assert client.inflight == 2 and client.publishes_sent == 3
    await eventually(lambda: events.writable > writable)
    assert client.inflight < 2
    assert client.publish("win/3", b"3", 1)
    received = [await in_thread(sub.expect) for _ in range(4)]
    assert [m.payload for m in received] == [b"1", b"2", b"qos 0 is not windowed", b"3"]
    await eventually(lambda: client.acked == 3)


async def test_server_receive_maximum_lowers_the_window(
    start_broker: Callable[..., RunningBroker], harness: Harness
) -> None:
    broker = start_broker(broker={"max_awaiting_rel": 1})  # mqgate announces Receive Maximum 1
    client, events = harness.client(broker.port, protocol_version=5, max_inflight=10)
    await client.connect()
    assert client.window == 1
    done: asyncio.Queue[int | None] = asyncio.Queue()
    assert client.publish("rm/1", b"1", 2, on_done=done.put_nowait)
    assert not client.publish("rm/2", b"2", 1, on_done=done.put_nowait)
    assert await next_of(done) == ReasonCode.NO_MATCHING_SUBSCRIBERS
    assert events.writable >= 2
    assert client.publish("rm/2", b"2", 1, on_done=done.put_nowait)
    assert await next_of(done) == ReasonCode.NO_MATCHING_SUBSCRIBERS


@needs_mosquitto
async def test_a_paused_transport_refuses_publishes_until_it_drains(
    mosquitto: Mosquitto, harness: Harness
) -> None:
    client, events = harness.client(mosquitto.port, keepalive=0)
    await client.connect()
    payload = bytes(256 * 1024)
    assert mosquitto.process is not None
    os.kill(mosquitto.process.pid, signal.SIGSTOP)  # the broker stops reading
    try:
        for _ in range(400):  # at most 100 MiB: kernel buffers plus the 4 MiB high-water mark fill first
            if not client.publish("bulk", payload, 0):
                break
            await asyncio.sleep(0)  # let the batch flush
        else:
            raise AssertionError("the transport never paused")
        writable = events.writable
        assert not client.publish("bulk", b"small", 0)
    finally:
        os.kill(mosquitto.process.pid, signal.SIGCONT)
    await eventually(lambda: events.writable > writable)
    assert client.connected and client.publish("bulk", b"small", 0)


async def test_publish_returns_false_when_not_connected(harness: Harness) -> None:
    client, _ = harness.client(free_port())
    assert not client.publish("t", b"x", 0)
    assert not client.publish("t", b"x", 1)
    assert client.publishes_sent == 0 and client.inflight == 0


# --- subscribing


@VERSIONS
async def test_subscriptions_receive_qos_0_1_2_and_qos2_exactly_once(
    server: Mosquitto | RunningBroker, harness: Harness, clients: Clients, version: int
) -> None:
    port = port_of(server)
    client, events = harness.client(port, client_id="edge-sub", protocol_version=version)
    client.subscribe([SubscriptionRequest(f"down/{qos}", qos) for qos in range(3)])  # sent on connect
    await client.connect()
    assert await next_of(events.subacks) == (("down/0", "down/1", "down/2"), (0, 1, 2))
    pub = clients.paho(port, "paho-pub", version=version)
    for qos in range(3):
        await in_thread(pub.publish, f"down/{qos}", f"m{qos}".encode(), qos)  # waits for PUBACK/PUBCOMP
    await in_thread(pub.publish, "down/0", b"marker", 0)
    received = [await next_of(events.messages) for _ in range(4)]
    assert [(m.topic, m.payload, m.qos) for m in received] == [
        ("down/0", b"m0", 0),
        ("down/1", b"m1", 1),
        ("down/2", b"m2", 2),
        ("down/0", b"marker", 0),
    ]
    assert events.messages.empty() and client.messages_received == 4


@VERSIONS
async def test_unsubscribe_stops_delivery(
    server: Mosquitto | RunningBroker, harness: Harness, clients: Clients, version: int
) -> None:
    port = port_of(server)
    client, events = harness.client(port, protocol_version=version)
    await client.connect()
    client.subscribe([SubscriptionRequest("u/a", 1), SubscriptionRequest("u/b", 1)])
    await next_of(events.subacks)
    client.unsubscribe(["u/a"])
    assert list(client.subscriptions) == ["u/b"]
    pub = clients.paho(port, "paho-pub", version=version)
    await eventually(lambda: client.subscriptions_synced)  # UNSUBACK arrived
    await in_thread(pub.publish, "u/a", b"gone", 1)
    await in_thread(pub.publish, "u/b", b"kept", 1)
    assert (await next_of(events.messages)).payload == b"kept"
    assert events.messages.empty()


async def test_qos2_resend_with_dup_is_delivered_once(harness: Harness) -> None:
    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        conn.send(Connack())
        message = Publish("q2/x", b"once", 2, packet_id=7)
        conn.send(message)
        assert await conn.expect(Pubrec) == Pubrec(7)
        conn.send(Publish("q2/x", b"once", 2, dup=True, packet_id=7))  # our PUBREC "lost": resent
        assert await conn.expect(Pubrec) == Pubrec(7)
        conn.send(Pubrel(7))
        assert await conn.expect(Pubcomp) == Pubcomp(7)
        conn.send(Publish("q2/x", b"next", 2, packet_id=7))  # the id is free again: a new message
        assert await conn.expect(Pubrec) == Pubrec(7)
        conn.send(Pubrel(7), Pubrel(8))  # PUBREL for an unknown id is still completed
        assert await conn.expect(Pubcomp) == Pubcomp(7)
        assert (await conn.expect(Pubcomp)).packet_id == 8
        finished.set()
        await park(conn)

    finished = asyncio.Event()

    fake = await harness.fake(script)
    client, events = harness.client(fake.port, protocol_version=5)
    await client.connect()
    assert (await next_of(events.messages)).payload == b"once"
    assert (await next_of(events.messages)).payload == b"next"
    await eventually(lambda: fake.errors or finished.is_set())
    fake.check()
    assert events.messages.empty() and client.messages_received == 2


# --- reconnecting


@needs_mosquitto
@VERSIONS
async def test_reconnects_after_the_broker_restarts_and_restores_subscriptions(
    mosquitto: Mosquitto, harness: Harness, clients: Clients, version: int
) -> None:
    client, events = harness.client(mosquitto.port, client_id="edge-re", protocol_version=version)
    client.subscribe([SubscriptionRequest("re/#", 1)])
    client.start()
    assert await next_of(events.connects) is False
    assert await next_of(events.subacks) == (("re/#",), (1,))

    done: list[int | None] = []
    for i in range(3):  # queued for the next loop iteration: the broker dies before it reads them
        assert client.publish(f"re/{i}", b"lost", 1, on_done=done.append)
    mosquitto.kill()  # on the loop's thread, on purpose: the loop must not run (and flush) before it
    reason = await next_of(events.disconnects)
    assert reason.startswith("connection lost: "), reason
    assert done == [None, None, None] and client.undelivered == 3 and client.inflight == 0
    assert not client.publish("re/x", b"offline", 1)

    await in_thread(mosquitto.start)
    assert await next_of(events.connects) is False  # mosquitto keeps no sessions across a restart
    assert await next_of(events.subacks) == (("re/#",), (1,))  # restored
    assert (client.connects, client.disconnects) == (2, 1)
    pub = clients.paho(mosquitto.port, "paho-pub", version=version)
    await in_thread(pub.publish, "re/back", b"again", 1)
    assert (await next_of(events.messages)).payload == b"again"
    assert client.publish("re/x", b"online", 1)


@pytest.mark.parametrize("present", [True, False], ids=["session-present", "session-gone"])
async def test_persistent_session_retransmits_unacked_publishes_after_reconnect(
    harness: Harness, present: bool
) -> None:
    """§4.4: with a session present the client resends unacknowledged PUBLISHes with DUP and the PUBRELs of
    PUBREC'd ones, with their packet ids; without it they are reported undelivered (on_done(None))."""

    async def script(conn: FakeConnection, index: int) -> None:
        connect = await conn.expect(Connect)
        assert not connect.clean_start
        if index == 0:
            conn.send(Connack())
            first = await conn.expect(Publish)
            second = await conn.expect(Publish)
            assert (first.qos, first.dup, second.qos, second.dup) == (1, False, 2, False)
            ids.extend([first.packet_id, second.packet_id])
            conn.send(Pubrec(second.packet_id))
            assert await conn.expect(Pubrel) == Pubrel(second.packet_id)
            return  # the connection drops with both unfinished
        conn.send(Connack(session_present=present))
        if present:
            resent = await conn.expect(Publish)
            assert (resent.packet_id, resent.dup, resent.payload) == (ids[0], True, b"one")
            assert await conn.expect(Pubrel) == Pubrel(ids[1])
            conn.send(Puback(ids[0]), Pubcomp(ids[1]))
        await park(conn)

    ids: list[int] = []
    fake = await harness.fake(script)
    client, events = harness.client(fake.port, client_id="persist", clean_start=False)
    client.start()
    await next_of(events.connects)
    done: list[tuple[str, int | None]] = []
    assert client.publish("p/1", b"one", 1, on_done=lambda code: done.append(("one", code)))
    assert client.publish("p/2", b"two", 2, on_done=lambda code: done.append(("two", code)))
    await next_of(events.disconnects)
    assert done == [] and client.inflight == 2  # kept for the session
    assert await next_of(events.connects) is present
    await eventually(lambda: len(done) == 2 or fake.errors)
    fake.check()
    expected = 0 if present else None
    assert done == [("one", expected), ("two", expected)]
    assert client.undelivered == (0 if present else 2)


@VERSIONS
async def test_subscription_changes_made_offline_are_sent_when_the_session_is_back(
    server: Mosquitto | RunningBroker, harness: Harness, clients: Clients, version: int
) -> None:
    port = port_of(server)
    client, events = harness.client(
        port, client_id="edge-offline", protocol_version=version, clean_start=False, session_expiry=60
    )
    await client.connect()
    client.subscribe([SubscriptionRequest("off/a", 1)])
    await next_of(events.subacks)
    await client.stop(disconnect=False)
    client.subscribe([SubscriptionRequest("off/b", 1)])
    client.unsubscribe(["off/a"])
    assert (await client.connect()).session_present
    assert await next_of(events.subacks) == (("off/b",), (1,))  # only the change
    await eventually(lambda: client.subscriptions_synced)
    pub = clients.paho(port, "paho-pub", version=version)
    await in_thread(pub.publish, "off/a", b"unsubscribed", 1)
    await in_thread(pub.publish, "off/b", b"subscribed", 1)
    assert (await next_of(events.messages)).payload == b"subscribed"
    assert events.messages.empty()


async def test_server_disconnect_is_reported_with_its_reason(
    mqgate: RunningBroker, harness: Harness, clients: Clients
) -> None:
    client, events = harness.client(mqgate.port, client_id="taken", protocol_version=5)
    await client.connect()
    clients.paho(mqgate.port, "taken", version=5)  # takes the session over
    reason = await next_of(events.disconnects)
    assert reason.startswith("disconnected by the server: session taken over (reason 0x8e)"), reason
    assert not client.connected


# --- will


@VERSIONS
@pytest.mark.parametrize("disconnect", [False, True], ids=["dropped", "disconnected"])
async def test_will_is_published_only_after_stop_without_disconnect(
    server: Mosquitto | RunningBroker, harness: Harness, clients: Clients, version: int, disconnect: bool
) -> None:
    port = port_of(server)
    sub = clients.paho(port, "paho-will", version=version)
    assert sub.subscribe("will/#", 1) == 1
    will = WillSpec("will/edge", b"device lost", 1)
    client, _ = harness.client(port, client_id="edge-will", protocol_version=version, will=will)
    await client.connect()
    await client.stop(disconnect=disconnect)
    if disconnect:
        await in_thread(sub.expect_none)
    else:
        message = await in_thread(sub.expect)
        assert (message.topic, message.payload, message.qos) == ("will/edge", b"device lost", 1)


# --- keepalive


async def test_keepalive_pings_keep_the_connection_up(
    server: Mosquitto | RunningBroker, harness: Harness
) -> None:
    client, _ = harness.client(port_of(server), keepalive=1)
    await client.connect()
    await eventually(lambda: client.pings_sent >= 2, timeout=10)
    # The server would have closed a silent client after 1.5 s: two pings answered mean it stayed up.
    assert client.connected and client.disconnects == 0


async def test_silent_server_is_detected_by_keepalive(harness: Harness) -> None:
    pings: list[Packet] = []

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        conn.send(Connack())
        pings.append(await conn.expect(Pingreq))  # never answered
        await park(conn)

    fake = await harness.fake(script)
    client, events = harness.client(fake.port, keepalive=1)
    await client.connect()
    reason = await next_of(events.disconnects)
    assert reason.startswith("keepalive timeout"), reason
    assert pings == [Pingreq()] and client.pings_sent == 1
    fake.check()


# --- bad upstreams


@VERSIONS
async def test_garbage_instead_of_connack_is_logged_and_retried(
    harness: Harness, version: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqgate.client")

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        conn.send_raw(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await park(conn)

    fake = await harness.fake(script)
    client, _ = harness.client(fake.port, protocol_version=version)
    with pytest.raises(MalformedPacket):
        await client.connect()
    assert not client.connected
    client.start()
    await eventually(lambda: fake.accepted >= 3)
    garbage = [r.getMessage() for r in caplog.records if "garbage from the server" in r.getMessage()]
    assert garbage and "retrying in" in garbage[0]
    assert client.connects == 0
    fake.check()


async def test_garbage_after_connack_closes_with_disconnect_and_reconnects(harness: Harness) -> None:
    seen: list[Packet] = []

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        conn.send(Connack())
        if index == 0:
            conn.send_raw(b"\x00\x02ab")  # packet type 0 is reserved
            seen.append(await conn.recv())
        await park(conn)

    fake = await harness.fake(script)
    client, events = harness.client(fake.port, protocol_version=5)
    client.start()
    assert await next_of(events.connects) is False
    reason = await next_of(events.disconnects)
    assert reason.startswith("garbage from the server: reserved packet type 0 (reason 0x81)"), reason
    assert await next_of(events.connects) is False  # reconnected
    assert seen == [Disconnect(ReasonCode.MALFORMED_PACKET)]
    fake.check()


async def test_a_server_that_never_answers_connect_times_out(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqgate.client")

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        await park(conn)

    fake = await harness.fake(script)
    client, _ = harness.client(fake.port, connect_timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await client.connect()
    assert loop.time() - started < 2
    assert not client.connected
    client.start()
    await eventually(lambda: fake.accepted >= 3)
    assert any("timed out: no CONNACK within 0.2 s" in r.getMessage() for r in caplog.records)
    fake.check()


async def test_a_packet_other_than_connack_first_fails_at_its_first_byte(harness: Harness) -> None:
    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        conn.send(Publish("early", b"x"))
        await park(conn)

    fake = await harness.fake(script)
    client, _ = harness.client(fake.port)
    with pytest.raises(MalformedPacket, match=r"does not start with CONNACK \(first byte 0x30\)"):
        await client.connect()
    assert not client.connected
