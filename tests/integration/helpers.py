"""Small shared helpers for the integration tests: paho-mqtt clients, a raw-socket MQTT client, waits.

Import them as ``from tests.integration.helpers import Clients, PahoClient, RawClient, ...``.

* :class:`Clients` is a context manager that owns every client and subprocess a test starts and closes them
  all at the end; use it through a fixture::

      @pytest.fixture
      def clients() -> Iterator[Clients]:
          with Clients() as owned:
              yield owned

* :class:`PahoClient` is a paho-mqtt 2.x client (``CallbackAPIVersion.VERSION2``) connected and running its
  network loop in a background thread: ``connack``, ``messages`` (a ``queue.Queue`` of paho ``MQTTMessage``),
  ``disconnects``; ``subscribe``/``unsubscribe``/``publish`` wait for their acknowledgement and return the
  reason codes as plain ints.
* :class:`RawClient` speaks MQTT over a plain socket with the project's own codec, for what paho cannot
  express (not acknowledging a QoS 1 message, a will-delay CONNECT dropped abruptly, reading DUP flags or
  topic aliases on the wire).
* :func:`paho_props` builds paho ``Properties``; :func:`wait_for` polls a condition with a deadline.

Nothing here sleeps for a fixed time: every wait is on an event, a queue or a polled condition with a
deadline.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode as PahoReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from core.mqtt.codec import (
    EMPTY_PROPERTIES,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Properties,
    Publish,
    StreamDecoder,
    Suback,
    Subscribe,
    SubscriptionRequest,
    Unsuback,
    Unsubscribe,
    WillSpec,
    encode,
)

__all__ = [
    "TIMEOUT",
    "Clients",
    "ConnackInfo",
    "ConnectionClosed",
    "DisconnectInfo",
    "PahoClient",
    "RawClient",
    "Will",
    "paho_props",
    "wait_for",
]

TIMEOUT = 5.0
"""Default seconds to wait for anything the broker should do promptly."""

P = TypeVar("P")


def wait_for(condition: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 0.01) -> Any:
    """Poll ``condition()`` until it returns something truthy and return it; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


def paho_props(packet_type: str, **values: Any) -> PahoProperties:
    """paho ``Properties`` for a packet type name, e.g. ``paho_props("PUBLISH", MessageExpiryInterval=10)``.

    Names are paho's (the spec's, CamelCase): SessionExpiryInterval, ReceiveMaximum, TopicAliasMaximum,
    MaximumPacketSize, TopicAlias, MessageExpiryInterval, ResponseTopic, CorrelationData,
    SubscriptionIdentifier, WillDelayInterval, AuthenticationMethod, UserProperty=[("k", "v"), ...].
    ``packet_type`` is one of CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, DISCONNECT, WILLMESSAGE, AUTH.
    """
    props = PahoProperties(getattr(PacketTypes, packet_type))  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


@dataclass(frozen=True)
class Will:
    """A will for :class:`PahoClient` (``properties`` from ``paho_props("WILLMESSAGE", ...)`` for v5)."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: PahoProperties | None = None


@dataclass(frozen=True)
class ConnackInfo:
    """What paho's on_connect reported."""

    reason_code: int
    session_present: bool
    properties: PahoProperties | None


@dataclass(frozen=True)
class DisconnectInfo:
    """What on_disconnect reported: a server DISCONNECT's reason code, or paho's own on a lost socket."""

    reason_code: int
    properties: PahoProperties | None


def _code(rc: Any) -> int:
    return int(rc.value) if isinstance(rc, PahoReasonCode) else int(rc)


class PahoClient:
    """A paho-mqtt client connected to ``host:port`` with its network loop in a background thread.

    ``version`` is 5 (MQTTv5), 4 (MQTTv311) or 3 (MQTTv31). ``clean_start`` is the v5 Clean Start flag or the
    v3 Clean Session flag. ``properties`` are the v5 CONNECT properties (``paho_props("CONNECT", ...)``).
    paho's automatic reconnect is off, so a client the broker closes stays closed (takeover tests rely on it).
    With ``check=True`` (default) the constructor asserts a successful CONNACK; with ``check=False`` a refused
    connection is returned with ``connack`` holding the reason code.
    """

    def __init__(
        self,
        port: int,
        client_id: str = "",
        *,
        version: int = 5,
        clean_start: bool = True,
        keepalive: int = 60,
        properties: PahoProperties | None = None,
        will: Will | None = None,
        username: str | None = None,
        password: str | None = None,
        host: str = "127.0.0.1",
        check: bool = True,
        timeout: float = TIMEOUT,
    ) -> None:
        protocol = {5: paho.MQTTv5, 4: paho.MQTTv311, 3: paho.MQTTv31}[version]
        self.version = version
        self.timeout = timeout
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.disconnects: queue.Queue[DisconnectInfo] = queue.Queue()
        self.connack: ConnackInfo | None = None
        self._connected = threading.Event()
        self._acks: dict[int, tuple[list[int], PahoProperties | None]] = {}
        self._acks_cond = threading.Condition()
        self._closed = False
        kwargs: dict[str, Any] = {}
        if version != 5:
            kwargs["clean_session"] = clean_start
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            **kwargs,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_ack
        self.client.on_unsubscribe = self._on_ack
        self.client.on_publish = self._on_publish
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will.topic, will.payload, will.qos, will.retain, will.properties)
        connect_kwargs: dict[str, Any] = {"keepalive": keepalive}
        if version == 5:
            connect_kwargs["clean_start"] = clean_start
            connect_kwargs["properties"] = properties
        self.client.connect(host, port, **connect_kwargs)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise AssertionError(f"no CONNACK for {client_id!r} within {timeout} s")
        connack = self._reported_connack()
        if check and connack is not None and connack.reason_code != 0:
            code = connack.reason_code
            self.close()
            raise AssertionError(f"connection of {client_id!r} refused with reason 0x{code:02X}")

    def _reported_connack(self) -> ConnackInfo | None:
        return self.connack  # set by the network thread

    # --- paho callbacks (network thread)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = ConnackInfo(_code(rc), bool(flags.session_present), props)
        self._connected.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.disconnects.put(DisconnectInfo(_code(rc), props))

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_ack(self, client: paho.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._acks_cond:
            self._acks[mid] = ([_code(c) for c in codes], props)
            self._acks_cond.notify_all()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._acks_cond:
            self._acks[mid] = ([_code(rc)], props)
            self._acks_cond.notify_all()

    def _wait_ack(self, mid: int, what: str) -> tuple[list[int], PahoProperties | None]:
        with self._acks_cond:
            if not self._acks_cond.wait_for(lambda: mid in self._acks, self.timeout):
                raise AssertionError(f"no acknowledgement of {what} (mid {mid}) within {self.timeout} s")
            return self._acks.pop(mid)

    # --- operations

    def subscribe(
        self,
        topic: str,
        qos: int = 0,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        properties: PahoProperties | None = None,
    ) -> int:
        """SUBSCRIBE to one filter, wait for SUBACK and return its reason code (granted QoS or error)."""
        return self.subscribe_many(
            [(topic, qos)], no_local, retain_as_published, retain_handling, properties
        )[0]

    def subscribe_many(
        self,
        filters: Sequence[tuple[str, int]],
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        properties: PahoProperties | None = None,
    ) -> list[int]:
        """SUBSCRIBE to several ``(filter, qos)`` in one packet and return SUBACK's reason codes."""
        if self.version == 5:
            options = [
                (
                    topic,
                    SubscribeOptions(
                        qos=qos,
                        noLocal=no_local,
                        retainAsPublished=retain_as_published,
                        retainHandling=retain_handling,
                    ),
                )
                for topic, qos in filters
            ]
            rc, mid = self.client.subscribe(options, properties=properties)
        else:
            rc, mid = self.client.subscribe(list(filters))
        assert rc == paho.MQTT_ERR_SUCCESS, f"subscribe failed locally: {rc}"
        assert mid is not None
        return self._wait_ack(mid, f"SUBSCRIBE {filters}")[0]

    def unsubscribe(self, *topics: str, properties: PahoProperties | None = None) -> list[int]:
        """UNSUBSCRIBE and return UNSUBACK's reason codes (v5; an empty list for v3)."""
        rc, mid = self.client.unsubscribe(list(topics), properties=properties)
        assert rc == paho.MQTT_ERR_SUCCESS, f"unsubscribe failed locally: {rc}"
        assert mid is not None
        return self._wait_ack(mid, f"UNSUBSCRIBE {topics}")[0]

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        properties: PahoProperties | None = None,
        *,
        wait: bool = True,
    ) -> int:
        """PUBLISH; with ``wait``, wait until sent (QoS 0) or acknowledged (PUBACK/PUBCOMP) and return its
        reason code (v5: 0, or 0x10 no matching subscribers, ...). Without ``wait`` return the paho mid."""
        info = self.client.publish(topic, payload, qos, retain, properties)
        assert info.rc == paho.MQTT_ERR_SUCCESS, f"publish failed locally: {info.rc}"
        if not wait:
            return info.mid
        return self._wait_ack(info.mid, f"PUBLISH {topic}")[0][0]

    def expect(self, timeout: float | None = None) -> paho.MQTTMessage:
        """The next received message; AssertionError if none arrives in time."""
        try:
            return self.messages.get(timeout=self.timeout if timeout is None else timeout)
        except queue.Empty:
            raise AssertionError("no message received") from None

    def expect_many(self, count: int, timeout: float | None = None) -> list[paho.MQTTMessage]:
        """The next ``count`` received messages, in arrival order."""
        return [self.expect(timeout) for _ in range(count)]

    def expect_none(self, timeout: float = 0.3) -> None:
        """Assert that no message arrives within ``timeout`` (a negative wait: keep it short)."""
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message on {message.topic!r}: {message.payload!r}")

    def expect_disconnect(self, timeout: float | None = None) -> DisconnectInfo:
        """The next on_disconnect report (e.g. reason 0x8E when the session is taken over)."""
        try:
            return self.disconnects.get(timeout=self.timeout if timeout is None else timeout)
        except queue.Empty:
            raise AssertionError("client was not disconnected") from None

    def disconnect(self, reason_code: int = 0, properties: PahoProperties | None = None) -> None:
        """A normal DISCONNECT (v5 with ``reason_code``, e.g. 0x04 to publish the will), then close."""
        if self._closed:
            return
        if self.version == 5:
            rc = PahoReasonCode(PacketTypes.DISCONNECT, identifier=reason_code)
            self.client.disconnect(reasoncode=rc, properties=properties)
        else:
            self.client.disconnect()
        self.expect_disconnect()
        self.close()

    def stop_loop(self) -> None:
        """Stop the network loop without DISCONNECT: the socket stays open but silent (no PINGREQ)."""
        self.client.loop_stop()

    def close(self) -> None:
        """Stop the loop and close every socket, without waiting for anything (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()  # paho keeps a socket pair for its loop; close it too


class ConnectionClosed(AssertionError):
    """The broker closed the raw client's connection; ``packets`` came just before (e.g. DISCONNECT)."""

    def __init__(self, packets: list[Packet]) -> None:
        super().__init__(f"connection closed by the broker after {packets!r}")
        self.packets = packets


class RawClient:
    """A minimal MQTT client over a plain socket using ``core.mqtt.codec`` (encode / StreamDecoder).

    It does only what it is told: it never acknowledges, pings or retries by itself. ``recv`` returns the
    next packet from the broker; ``expect(Type)`` asserts its type. ``drop()`` closes the socket abruptly
    (TCP RST), as a crashed client would.
    """

    def __init__(
        self, port: int, *, version: int = 4, host: str = "127.0.0.1", timeout: float = TIMEOUT
    ) -> None:
        self.version = version
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.decoder = StreamDecoder(version=version)
        self._pending: deque[Packet] = deque()
        self._next_id = 0
        self.closed = False

    def packet_id(self) -> int:
        """A fresh packet identifier (1, 2, ...)."""
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    # --- bytes

    def send(self, *packets: Packet) -> None:
        """Encode ``packets`` for this client's protocol version and send them."""
        self.sock.sendall(b"".join(encode(p, self.version) for p in packets))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float | None = None) -> Packet:
        """The next packet from the broker; TimeoutError if none in time, ConnectionClosed if closed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no packet from the broker")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no packet from the broker") from None
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                raise ConnectionClosed([])
            self._pending.extend(self.decoder.feed(data))
            if self.decoder.error is not None:
                raise AssertionError(f"broker sent a malformed packet: {self.decoder.error}")
        return self._pending.popleft()

    def expect(self, kind: type[P], timeout: float | None = None) -> P:
        """The next packet, asserted to be a ``kind`` (e.g. ``Publish``, ``Suback``)."""
        packet = self.recv(timeout)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    def expect_nothing(self, timeout: float = 0.3) -> None:
        """Assert that no packet arrives within ``timeout`` (a negative wait: keep it short)."""
        try:
            packet = self.recv(timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected packet {packet!r}")

    def expect_closed(self, timeout: float | None = None) -> list[Packet]:
        """Wait until the broker closes the connection; return the packets received before it."""
        seen: list[Packet] = []
        try:
            while True:
                seen.append(self.recv(timeout))
        except ConnectionClosed:
            return seen
        except TimeoutError:
            raise AssertionError(f"connection still open; received {seen!r}") from None

    # --- packets

    def connect(
        self,
        client_id: str = "",
        *,
        clean_start: bool = True,
        keepalive: int = 60,
        will: WillSpec | None = None,
        properties: Properties = EMPTY_PROPERTIES,
        username: str | None = None,
        password: bytes | None = None,
        check: bool = True,
    ) -> Connack:
        """Send CONNECT and return the CONNACK (asserting success unless ``check=False``)."""
        self.send(
            Connect(
                client_id,
                protocol_version=self.version,
                clean_start=clean_start,
                keepalive=keepalive,
                will=will,
                username=username,
                password=password,
                properties=properties,
                protocol_name="MQIsdp" if self.version == 3 else "MQTT",
            )
        )
        connack = self.expect(Connack)
        if check:
            assert connack.reason_code == 0, f"CONNACK refused: {connack!r}"
        return connack

    def subscribe(
        self,
        topic_filter: str,
        qos: int = 0,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        properties: Properties = EMPTY_PROPERTIES,
    ) -> Suback:
        """SUBSCRIBE to one filter and return the SUBACK (the next packet must be it)."""
        request = SubscriptionRequest(topic_filter, qos, no_local, retain_as_published, retain_handling)
        pid = self.packet_id()
        self.send(Subscribe(pid, (request,), properties))
        suback = self.expect(Suback)
        assert suback.packet_id == pid, f"SUBACK for {suback.packet_id}, expected {pid}"
        return suback

    def unsubscribe(self, *topic_filters: str) -> Unsuback:
        """UNSUBSCRIBE and return the UNSUBACK (the next packet must be it)."""
        pid = self.packet_id()
        self.send(Unsubscribe(pid, tuple(topic_filters)))
        return self.expect(Unsuback)

    def publish(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        *,
        retain: bool = False,
        dup: bool = False,
        packet_id: int | None = None,
        properties: Properties = EMPTY_PROPERTIES,
    ) -> int:
        """Send PUBLISH (nothing is awaited); return its packet id (0 for QoS 0)."""
        pid = (self.packet_id() if packet_id is None else packet_id) if qos else 0
        self.send(Publish(topic, payload, qos, retain, dup, pid, properties))
        return pid

    def disconnect(self, reason_code: int = 0, properties: Properties = EMPTY_PROPERTIES) -> None:
        """Send DISCONNECT and close the socket."""
        if not self.closed:
            with contextlib.suppress(OSError):
                self.send(Disconnect(reason_code, properties))
        self.close()

    def drop(self) -> None:
        """Close abruptly with a TCP RST and no DISCONNECT, as a crashed client or a network failure would."""
        if not self.closed:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.closed = True
        self.sock.close()


@dataclass
class Clients:
    """Owns the clients and subprocesses a test starts and closes them all on exit (a context manager)."""

    _owned: list[Any] = field(default_factory=list)

    def paho(self, port: int, client_id: str = "", **kwargs: Any) -> PahoClient:
        """A connected :class:`PahoClient` (same arguments), closed at the end of the test."""
        client = PahoClient(port, client_id, **kwargs)
        self._owned.append(client)
        return client

    def raw(self, port: int, **kwargs: Any) -> RawClient:
        """An unconnected :class:`RawClient` (call ``.connect(...)``), closed at the end of the test."""
        client = RawClient(port, **kwargs)
        self._owned.append(client)
        return client

    def popen(self, args: Iterable[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a subprocess (stdout/stderr piped) that is killed and reaped at the end of the test."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        process: subprocess.Popen[bytes] = subprocess.Popen(list(args), **kwargs)
        self._owned.append(process)
        return process

    def close(self) -> None:
        errors: list[BaseException] = []
        for owned in reversed(self._owned):
            try:
                if isinstance(owned, subprocess.Popen):
                    if owned.poll() is None:
                        owned.kill()
                    owned.communicate(timeout=TIMEOUT)
                else:
                    owned.close()
            except BaseException as exc:  # close everything, then report the first failure
                errors.append(exc)
        self._owned.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
