"""Helpers for the MQTT-SN integration tests: raw UDP clients, a forwarder, and the ``mqtt-sn-12`` client.

* :class:`SnClient` speaks MQTT-SN over its own UDP socket (bound to 127.0.0.1:0, so each client has its own
  source port), sending messages built with :mod:`gateways.mqttsn.codec` or with scapy's ``contrib.mqttsn``
  (anything ``bytes()`` accepts) and decoding what comes back with the project codec. It does only what it is
  told: it never acknowledges, pings or retries by itself.
* :class:`Forwarder` is one UDP socket carrying several wireless nodes (MQTT-SN 1.2 §5.5): ``node(b"\\x01")``
  returns an :class:`SnClient` whose datagrams are encapsulated with that node id; answers are checked to come
  back encapsulated with the same id.
* :class:`Sn12Client` is the third-party ``mqttsn12`` client with bounded socket timeouts (the library blocks
  forever in ``receive_packet``) and :meth:`Sn12Client.poll_until` to run its receive loop until a condition.
* :func:`gateway_of` gives the live :class:`~gateways.mqttsn.gateway.MqttSnGateway` of a ``mqgate`` fixture
  (read it only through ``mqgate.call``).

Nothing here sleeps for a fixed time: every wait is a socket timeout or a polled condition with a deadline.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from mqttsn12.client.MqttSnClient import MqttSnClient, MqttSnListener, MqttSnMessage
from mqttsn12.client.MqttSnClientException import MqttSnClientException

from gateways.mqttsn import codec
from gateways.mqttsn.gateway import MqttSnGateway
from gateways.mqttsn.numbers import TopicIdType
from tests.integration.helpers import TIMEOUT

__all__ = [
    "Collector",
    "Forwarder",
    "Sn12Client",
    "SnClient",
    "SnClients",
    "gateway_of",
    "metric",
    "sn_clients",
    "sn_port",
]

M = TypeVar("M")

HOST = "127.0.0.1"


def sn_port(mqgate: Any) -> int:
    """The UDP port of the fixture's MQTT-SN gateway."""
    port: int = mqgate.app.listeners["mqttsn:udp"].port
    return port


def gateway_of(mqgate: Any) -> MqttSnGateway:
    """The pure gateway behind the fixture's UDP adapter (touch it only inside ``mqgate.call``)."""
    gateway: MqttSnGateway = mqgate.app.listeners["mqttsn:udp"].gateway
    return gateway


def metric(mqgate: Any, name: str) -> int:
    """One counter of the gateway's :class:`MqttSnMetrics`, read on the broker's loop."""
    value: int = mqgate.call(lambda: getattr(gateway_of(mqgate).metrics, name))
    return value


class _Link:
    """A UDP socket with a queue of decoded datagrams per wireless node id (None: not encapsulated)."""

    def __init__(self, port: int, timeout: float) -> None:
        self.gateway = (HOST, port)
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.inbox: dict[bytes | None, list[codec.Message]] = {}
        self.closed = False

    @property
    def address(self) -> tuple[str, int]:
        address: tuple[str, int] = self.sock.getsockname()
        return address

    def sendto(self, data: bytes) -> None:
        self.sock.sendto(data, self.gateway)

    def recv(self, node_id: bytes | None, timeout: float) -> codec.Message:
        """The next message for ``node_id``; TimeoutError when none arrives in time."""
        deadline = time.monotonic() + timeout
        while not self.inbox.get(node_id):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no datagram from the gateway for node {node_id!r}")
            self.sock.settimeout(remaining)
            try:
                data, sender = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            assert sender == self.gateway, f"datagram from {sender}, not the gateway"
            message = codec.decode(data)
            if isinstance(message, codec.Encapsulated):
                self.inbox.setdefault(message.node_id, []).append(message.message)
            else:
                self.inbox.setdefault(None, []).append(message)
        return self.inbox[node_id].pop(0)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


class SnClient:
    """A raw MQTT-SN client on its own UDP socket (or a node behind a :class:`Forwarder`)."""

    def __init__(
        self, port: int, *, timeout: float = TIMEOUT, link: _Link | None = None, node_id: bytes | None = None
    ) -> None:
        self.link = link if link is not None else _Link(port, timeout)
        self.node_id = node_id
        self.timeout = timeout
        self._next_id = 0

    @property
    def address(self) -> tuple[str, int]:
        """The client's source address (host, port)."""
        return self.link.address

    def msg_id(self) -> int:
        """A fresh message id (1, 2, ...)."""
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    # --- datagrams

    def send(self, *messages: codec.Message | bytes | Any) -> None:
        """Send each message: a codec message, raw bytes, or a scapy packet (encapsulated for a node)."""
        for message in messages:
            if isinstance(message, bytes):
                data = message
            elif type(message).__module__ == codec.__name__:
                data = codec.encode(message)
            else:
                data = bytes(message)  # a scapy packet
            if self.node_id is not None:
                data = bytes((len(self.node_id) + 3, 0xFE, 0)) + self.node_id + data
            self.link.sendto(data)

    def recv(self, timeout: float | None = None) -> codec.Message:
        """The next message from the gateway (TimeoutError if none in time)."""
        return self.link.recv(self.node_id, self.timeout if timeout is None else timeout)

    def recv_datagram(self, timeout: float | None = None) -> bytes:
        """The next datagram from the gateway as bytes, undecoded (only on a client's own socket)."""
        assert self.node_id is None and not self.link.inbox.get(None), "decoded messages are waiting"
        sock = self.link.sock
        sock.settimeout(self.timeout if timeout is None else timeout)
        data, sender = sock.recvfrom(65535)
        assert sender == self.link.gateway, f"datagram from {sender}, not the gateway"
        received: bytes = data
        return received

    def expect(self, kind: type[M], timeout: float | None = None) -> M:
        """The next message, asserted to be a ``kind``."""
        try:
            message = self.recv(timeout)
        except TimeoutError:
            raise AssertionError(f"no {kind.__name__} from the gateway") from None
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    def expect_nothing(self, timeout: float = 0.3) -> None:
        """Assert that nothing arrives within ``timeout`` (a negative wait: keep it short)."""
        try:
            message = self.recv(timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected {message!r}")

    # --- exchanges

    def connect(
        self,
        client_id: str,
        *,
        duration: int = 60,
        clean_session: bool = True,
        will: tuple[str, bytes, int, bool] | None = None,
        check: bool = True,
    ) -> codec.Connack:
        """CONNECT (with the will handshake of §6.2 when ``will`` = (topic, message, qos, retain))."""
        self.send(codec.Connect(client_id, duration, clean_session, will is not None))
        if will is not None:
            self.expect(codec.WillTopicReq)
            topic, message, qos, retain = will
            self.send(codec.WillTopic(topic, qos, retain))
            self.expect(codec.WillMsgReq)
            self.send(codec.WillMsg(message))
        connack = self.expect(codec.Connack)
        if check:
            assert connack.return_code == 0, f"CONNACK refused: {connack!r}"
        return connack

    def register(self, topic: str) -> int:
        """REGISTER ``topic`` and return the topic id of an accepted REGACK."""
        msg_id = self.msg_id()
        self.send(codec.Register(0, msg_id, topic))
        regack = self.expect(codec.Regack)
        assert (regack.msg_id, regack.return_code) == (msg_id, 0), f"REGISTER {topic!r}: {regack!r}"
        return regack.topic_id

    def subscribe(
        self, topic: str | int, qos: int = 0, *, kind: int = TopicIdType.NORMAL, check: bool = True
    ) -> codec.Suback:
        """SUBSCRIBE to a name (NORMAL or SHORT) or a predefined id; return the SUBACK."""
        msg_id = self.msg_id()
        if isinstance(topic, int):
            self.send(codec.Subscribe(msg_id, kind, "", topic, qos))
        else:
            self.send(codec.Subscribe(msg_id, kind, topic, 0, qos))
        suback = self.expect(codec.Suback)
        assert suback.msg_id == msg_id, f"SUBACK for {suback.msg_id}, expected {msg_id}"
        if check:
            assert suback.return_code == 0, f"SUBSCRIBE {topic!r} refused: {suback!r}"
        return suback

    def unsubscribe(self, topic: str, *, kind: int = TopicIdType.NORMAL) -> None:
        msg_id = self.msg_id()
        self.send(codec.Unsubscribe(msg_id, kind, topic))
        assert self.expect(codec.Unsuback).msg_id == msg_id

    def publish(
        self,
        topic_id: int,
        data: bytes,
        qos: int = 0,
        *,
        kind: int = TopicIdType.NORMAL,
        retain: bool = False,
        msg_id: int | None = None,
    ) -> int:
        """Send PUBLISH (nothing is awaited); return its message id."""
        mid = (self.msg_id() if msg_id is None else msg_id) if qos > 0 else 0
        self.send(codec.Publish(topic_id, data, qos, mid, kind, retain))
        return mid

    def publish_acked(self, topic_id: int, data: bytes, qos: int, *, kind: int = TopicIdType.NORMAL) -> None:
        """PUBLISH at QoS 1 or 2 and complete its handshake (PUBACK, or PUBREC/PUBREL/PUBCOMP)."""
        mid = self.publish(topic_id, data, qos, kind=kind)
        if qos == 1:
            puback = self.expect(codec.Puback)
            assert (puback.msg_id, puback.return_code) == (mid, 0), f"PUBACK {puback!r}"
        elif qos == 2:
            assert self.expect(codec.Pubrec).msg_id == mid
            self.send(codec.Pubrel(mid))
            assert self.expect(codec.Pubcomp).msg_id == mid

    def ping(self, client_id: str | None = None) -> None:
        self.send(codec.Pingreq(client_id))
        self.expect(codec.Pingresp)

    def disconnect(self, duration: int | None = None) -> None:
        """DISCONNECT (a duration asks to sleep) and wait for the gateway's DISCONNECT."""
        self.send(codec.Disconnect(duration))
        ack = self.expect(codec.Disconnect)
        assert ack.duration is None, f"the gateway's DISCONNECT carries a duration: {ack!r}"

    def receive_publish(self, *, ack: bool = True, timeout: float | None = None) -> codec.Publish:
        """The next PUBLISH, answering REGISTERs before it with REGACK; QoS 1/2 acknowledged if ``ack``."""
        while True:
            message = self.recv(timeout)
            if isinstance(message, codec.Register):
                self.send(codec.Regack(message.topic_id, message.msg_id, 0))
                continue
            assert isinstance(message, codec.Publish), f"expected PUBLISH, got {message!r}"
            if ack:
                self.ack(message)
            return message

    def ack(self, publish: codec.Publish) -> None:
        """Acknowledge a delivery: PUBACK (QoS 1) or PUBREC, PUBREL, PUBCOMP (QoS 2)."""
        if publish.qos == 1:
            self.send(codec.Puback(publish.topic_id, publish.msg_id, 0))
        elif publish.qos == 2:
            self.send(codec.Pubrec(publish.msg_id))
            assert self.expect(codec.Pubrel).msg_id == publish.msg_id
            self.send(codec.Pubcomp(publish.msg_id))

    def close(self) -> None:
        if self.node_id is None and not self.link.closed:
            self.link.close()


class Forwarder:
    """One UDP socket relaying several wireless nodes with forwarder encapsulation (§5.5)."""

    def __init__(self, port: int, *, timeout: float = TIMEOUT) -> None:
        self.port = port
        self.timeout = timeout
        self.link = _Link(port, timeout)

    @property
    def address(self) -> tuple[str, int]:
        return self.link.address

    def node(self, node_id: bytes) -> SnClient:
        """A client behind this forwarder with wireless node id ``node_id``."""
        return SnClient(self.port, timeout=self.timeout, link=self.link, node_id=node_id)

    def close(self) -> None:
        if not self.link.closed:
            self.link.close()


class Collector(MqttSnListener):
    """An ``mqttsn12`` listener that queues the messages it is given."""

    def __init__(self) -> None:
        self.messages: queue.Queue[MqttSnMessage] = queue.Queue()

    def message_arrived(self, msg: MqttSnMessage) -> None:
        self.messages.put(msg)


class Sn12Client(MqttSnClient):  # type: ignore[misc]
    """The ``mqtt-sn-12`` client, opened on the gateway, with socket waits bounded by ``timeout``.

    The library's ``receive_packet(blocking=True)`` calls ``setblocking(True)``, which removes the socket
    timeout, so a missing answer would hang the test; this override keeps the timeout and turns a non-blocking
    read into a short wait, so :meth:`poll_until` can drive ``polling()`` without spinning.
    """

    def __init__(
        self, port: int, client_id: str, *, timeout: int = int(TIMEOUT), keep_alive: int = 60
    ) -> None:
        super().__init__()
        self.set_client_id(client_id)
        self.set_timeout(timeout)
        self.set_keep_alive(keep_alive)
        self.open(HOST, port)

    def receive_packet(self, blocking: bool) -> bytes | None:
        sock = self.datagram_socket
        sock.settimeout(self.timeout if blocking else 0.05)
        try:
            data, _ = sock.recvfrom(65535)
        except (TimeoutError, BlockingIOError):
            if blocking:
                raise MqttSnClientException("timed out waiting for the gateway") from None
            return None
        self.last_receive = int(time.time())
        received: bytes = data
        return received

    def poll_until(self, condition: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
        """Run ``polling()`` (which answers REGISTER and PUBACKs QoS 1) until ``condition()`` is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(f"condition not met within {timeout} s while polling")
            self.polling()


class SnClients:
    """Owns every raw client, forwarder and ``mqttsn12`` client a test opens; closes them all at the end."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._owned: list[SnClient | Forwarder | Sn12Client] = []
        self._lock = threading.Lock()

    def raw(self, **kwargs: Any) -> SnClient:
        """A raw client on a fresh UDP socket (a new source port)."""
        client = SnClient(self.port, **kwargs)
        with self._lock:
            self._owned.append(client)
        return client

    def forwarder(self, **kwargs: Any) -> Forwarder:
        forwarder = Forwarder(self.port, **kwargs)
        with self._lock:
            self._owned.append(forwarder)
        return forwarder

    def sn12(self, client_id: str, **kwargs: Any) -> Sn12Client:
        """An opened (not yet connected) ``mqtt-sn-12`` client."""
        client = Sn12Client(self.port, client_id, **kwargs)
        with self._lock:
            self._owned.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            owned, self._owned = self._owned, []
        for item in reversed(owned):
            item.close()


@contextmanager
def sn_clients(port: int) -> Iterator[SnClients]:
    """``with sn_clients(port) as sn:`` every client opened through ``sn`` is closed on exit."""
    owned = SnClients(port)
    try:
        yield owned
    finally:
        owned.close()
