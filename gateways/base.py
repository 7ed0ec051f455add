"""The broker interface every gateway uses (DESIGN §2): served by the embedded core broker
(:class:`core.broker.embedded.EmbeddedBroker`) or, in edge mode, by an upstream MQTT broker.

Gateways never import broker internals; they open a session per device and act on it through
:class:`SessionHandle`. Deliveries come back through the :class:`DeliverySink` they pass in, at most
``max_inflight`` QoS 1/2 messages unacknowledged at a time, so a gateway can hold MQTT-SN's one-in-flight
rule without dropping anything: the rest waits in the broker session's bounded queue.

Only the per-connection calls (``authenticate``, ``open_session``) are coroutines: they may wait for an
upstream broker's CONNACK. The per-message calls are synchronous and answer at once (the embedded broker
routes in-process; the upstream one accepts a QoS 1/2 publish into its store-and-forward buffer), so a
gateway's hot path creates no task or future per message (DESIGN §6). What acknowledges a publish to a
device leaves only once :meth:`Broker.settle` says the publishes so far are safe: at once on the embedded
broker; in edge mode when the upstream broker has acknowledged them or they are committed to the buffer,
whichever comes first. :class:`SettledOutbox` holds a gateway's datagrams until then, in order.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol

from core.broker.types import AuthResult, ClientInfo, Credentials, DeliverySink, Message, Subscription, Will
from core.errors import MqgateError

__all__ = [
    "AuthResult",
    "Broker",
    "ClientInfo",
    "Credentials",
    "DeliverySink",
    "Message",
    "SessionHandle",
    "SessionRefused",
    "SettledOutbox",
    "Subscription",
    "Will",
]


class SessionRefused(MqgateError):
    """The broker refused to open a session; ``reason_code`` is the MQTT 5 reason code."""

    def __init__(self, reason_code: int) -> None:
        super().__init__(f"session refused: reason 0x{reason_code:02x}")
        self.reason_code = reason_code


class SessionHandle(Protocol):
    """One device's broker session. Reason codes are MQTT 5 codes (0 success, >= 0x80 failure)."""

    @property
    def present(self) -> bool:
        """The session existed before (clean start false and state kept)."""
        ...

    def publish(self, message: Message) -> int:
        """Publish from the device; 0 or 0x10 (no subscribers) on success."""
        ...

    def subscribe(self, subscriptions: list[Subscription]) -> list[int]:
        """Granted QoS per subscription, or a failure reason code; retained messages follow as deliveries."""
        ...

    def unsubscribe(self, filters: list[str]) -> list[int]: ...

    def ack(self, packet_id: int) -> None:
        """The device acknowledged a QoS 1 delivery (PUBACK) or completed a QoS 2 one (PUBCOMP)."""
        ...

    def received(self, packet_id: int) -> None:
        """The device sent PUBREC for a QoS 2 delivery."""
        ...

    def set_will(self, will: Will | None) -> None:
        """Replace or delete the will (MQTT-SN WILLTOPICUPD/WILLMSGUPD)."""
        ...

    def read_retained(self, topic: str) -> Message | None:
        """The retained message of ``topic`` if the session may read it (CoAP GET)."""
        ...

    def pending(self) -> int:
        """Deliveries not yet acknowledged by the device: queued plus in flight."""
        ...

    def park(self) -> None:
        """The device sleeps: the broker queues its deliveries (bounded)."""
        ...

    def resume(self) -> None:
        """The device is awake: queued deliveries flow again through the sink."""
        ...

    def close(self, *, publish_will: bool) -> None:
        """The device is gone: normally (no will) or lost (will published)."""
        ...


class Broker(Protocol):
    """What a gateway needs from a broker."""

    async def authenticate(self, client: ClientInfo, credentials: Credentials) -> AuthResult: ...

    async def open_session(
        self,
        client: ClientInfo,
        *,
        clean_start: bool,
        expiry: int,
        will: Will | None,
        sink: DeliverySink,
        max_inflight: int,
        credentials: Credentials | None = None,
    ) -> SessionHandle:
        """Open (or take over) the session of ``client``; raises :class:`SessionRefused` when the broker
        refuses it (edge mode: the upstream broker's CONNACK code). ``credentials`` are what the device
        presented, for a broker that authenticates per session."""
        ...

    def settle(self, then: Callable[[bool], None]) -> None:
        """Call ``then(True)`` once every publish accepted so far is safe: routed (embedded broker, at once),
        acknowledged by the upstream broker or committed to the buffer (edge mode). ``then(False)`` when
        they could not be stored: what acknowledges them must not be sent. Callbacks run in the order
        given; ``then`` may run before this returns."""
        ...


log = logging.getLogger("mqgate.gateway")


class SettledOutbox:
    """A gateway adapter's datagrams, sent once :meth:`Broker.settle` has settled the publishes they
    acknowledge; batches leave in the order they were queued (a device sees its answers in order)."""

    __slots__ = ("_batches", "_release", "broker", "name", "send")

    def __init__(self, name: str, broker: Broker, send: Callable[[Hashable, bytes], None]) -> None:
        self.name = name
        self.broker = broker
        self.send = send  # one datagram to one peer; the adapter traces it
        self._batches: deque[list[tuple[Hashable, bytes]]] = deque()
        self._release = self._released  # one bound method for every batch

    def push(self, datagrams: list[tuple[Hashable, bytes]]) -> None:
        """Send ``datagrams`` when what is published so far is settled (now, on the embedded broker)."""
        if datagrams:
            self._batches.append(datagrams)
            self.broker.settle(self._release)

    def _released(self, settled: bool) -> None:
        datagrams = self._batches.popleft()
        if not settled:
            log.warning(
                "%s: %d datagram(s) not sent: the publishes they answer could not be stored",
                self.name,
                len(datagrams),
            )
            return
        send = self.send
        for peer, data in datagrams:
            send(peer, data)
