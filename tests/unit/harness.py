"""What the pure gateway tests share: a gateway on the embedded core broker with a fake clock, pumped
synchronously the way its UDP adapter does it.

:class:`GatewayHarness` wires a core :class:`Broker` and an :class:`EmbeddedBroker` to one :class:`FakeClock`,
with an MQTT publisher session and a recording MQTT subscriber. ``pump`` does what the adapters do after
every datagram and timer (open the broker sessions the gateway asked for, then collect the datagrams to send),
driving the embedded broker's coroutines with ``send(None)`` since they never suspend; ``advance`` runs the
gateway's timers at each ``get_timer`` deadline. A subclass builds its gateway and says how a session request
is opened and how a datagram is decoded.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

from core.broker.broker import Broker
from core.broker.embedded import EmbeddedBroker, EmbeddedSession
from core.broker.types import ClientInfo, Credentials, Message, Subscription, Will
from core.clock import FakeClock
from core.config import BrokerConfig

T = TypeVar("T")
M = TypeVar("M")
R = TypeVar("R")


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (the embedded broker's) to completion, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise AssertionError("the embedded broker suspended")


@dataclass
class Delivery:
    message: Message
    qos: int
    packet_id: int
    dup: bool
    retain: bool

    @property
    def topic(self) -> str:
        return self.message.topic

    @property
    def payload(self) -> bytes:
        return self.message.payload


@dataclass
class RecordingSink:
    """A DeliverySink that records what the broker delivers (the MQTT subscriber, or a bare session)."""

    deliveries: list[Delivery] = field(default_factory=list)
    packet_ids: list[int] = field(default_factory=list)
    pubrels: list[int] = field(default_factory=list)
    kicked: list[int] = field(default_factory=list)

    def deliver(
        self, message: Message, qos: int, packet_id: int, dup: bool, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        self.deliveries.append(Delivery(message, qos, packet_id, dup, retain))
        self.packet_ids.append(packet_id)

    def deliver_pubrel(self, packet_id: int) -> None:
        self.pubrels.append(packet_id)

    def kick(self, reason_code: int) -> None:
        self.kicked.append(reason_code)

    def messages(self) -> list[tuple[str, bytes]]:
        return [(d.topic, d.payload) for d in self.deliveries]

    def messages_with_qos(self) -> list[tuple[str, bytes, int]]:
        return [(d.topic, d.payload, d.qos) for d in self.deliveries]


class PumpedGateway(Protocol[R]):
    """The part of a pure gateway its adapter drives: session requests, datagrams and one timer."""

    def take_session_requests(self) -> list[R]: ...
    def datagrams_to_send(self) -> list[tuple[Hashable, bytes]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> None: ...


class GatewayHarness(ABC, Generic[R, M]):
    """A gateway on the embedded broker with a fake clock; ``R`` is its session request, ``M`` a decoded
    datagram. Subclasses set ``gateway`` and implement ``_open_session`` and ``_decode``."""

    gateway: PumpedGateway[R]

    def __init__(self, broker_class: type[EmbeddedBroker] = EmbeddedBroker) -> None:
        self.clock = FakeClock()
        self.broker = Broker(BrokerConfig(), rng=random.Random(1))
        self.embedded = broker_class(self.broker, self.clock)
        self.outbox: list[tuple[Hashable, M]] = []
        self.watcher = RecordingSink()
        self.publisher = run_now(
            self.embedded.open_session(
                ClientInfo("mqtt-pub"),
                clean_start=True,
                expiry=0,
                will=None,
                sink=RecordingSink(),
                max_inflight=16,
            )
        )
        self._watch_session, _ = self.broker.open_session(
            ClientInfo("mqtt-sub"),
            clean_start=True,
            expiry=0,
            will=None,
            sink=self.watcher,
            max_inflight=65535,
            now=self.clock.now(),
        )

    # --- the MQTT side

    def watch(self, topic_filter: str = "#", qos: int = 2) -> RecordingSink:
        """Subscribe the recording MQTT subscriber (at QoS 2 it sees the QoS each message arrives at)."""
        code, _ = self.broker.subscribe(
            self._watch_session, Subscription(topic_filter, qos), self.clock.now()
        )
        assert code == qos
        return self.watcher

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Publish from an MQTT client; what it causes at the gateway is collected at once."""
        assert self.publisher.publish(Message(topic, payload, qos, retain)) < 0x80
        self.pump()

    # --- the adapter's job

    def pump(self) -> None:
        """What the UDP adapter does after every datagram and timer: open sessions, then flush datagrams."""
        while True:
            requests = self.gateway.take_session_requests()
            for request in requests:
                self._open_session(request)
            for peer, data in self.gateway.datagrams_to_send():
                self._sent(peer, data)
            if not requests:
                return

    def open_broker_session(
        self,
        client: ClientInfo,
        credentials: Credentials,
        *,
        clean_start: bool,
        expiry: int,
        will: Will | None,
        sink: Any,
        max_inflight: int,
    ) -> EmbeddedSession | int:
        """Authenticate ``client`` and open its session, as the adapters do; the reason code if refused."""
        auth = run_now(self.embedded.authenticate(client, credentials))
        if not auth.allowed:
            return auth.reason_code
        return run_now(
            self.embedded.open_session(
                client,
                clean_start=clean_start,
                expiry=expiry,
                will=will,
                sink=sink,
                max_inflight=max_inflight,
            )
        )

    @abstractmethod
    def _open_session(self, request: R) -> None:
        """Open the broker session ``request`` asks for and tell the gateway how it went."""

    @abstractmethod
    def _decode(self, data: bytes) -> M:
        """A datagram the gateway sent, decoded."""

    def _sent(self, peer: Hashable, data: bytes) -> None:
        self.outbox.append((peer, self._decode(data)))

    # --- the device side

    def take(self, peer: Hashable) -> list[M]:
        """The datagrams sent to ``peer`` since the last take, decoded; others stay in the outbox."""
        mine = [m for p, m in self.outbox if p == peer]
        self.outbox = [(p, m) for p, m in self.outbox if p != peer]
        return mine

    def advance(self, seconds: float) -> None:
        """Move the clock, running the gateway's timers at each deadline on the way (as the adapter does)."""
        target = self.clock.now() + seconds
        for _ in range(10_000):
            deadline = self.gateway.get_timer()
            if deadline is None or deadline > target:
                break
            if deadline > self.clock.now():
                self.clock.advance(deadline - self.clock.now())
            self.gateway.handle_timer(self.clock.now())
            self.pump()
        else:
            raise AssertionError("the gateway's timer does not move forward")
        self.clock.advance(target - self.clock.now())
        self.broker.handle_timeouts(self.clock.now())
