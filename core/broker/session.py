"""A broker session: subscriptions, the QoS 1/2 inflight window and the bounded message queue (MQTT 5.0 §4.1).

The session outlives connections when its expiry interval allows, and is the one place where messages wait
for a client that is offline, asleep (a parked gateway device) or whose inflight window is full.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from core.broker.metrics import BrokerMetrics, protocol_slot
from core.broker.types import ClientInfo, DeliverySink, Message, Subscription, Will

__all__ = ["Inflight", "Queued", "Session"]

NEVER_EXPIRES = 0xFFFFFFFF


@dataclass(slots=True)
class Queued:
    """A delivery waiting in the session queue."""

    message: Message
    qos: int
    retain: bool
    sub_ids: tuple[int, ...]
    share_group: object | None


@dataclass(slots=True)
class Inflight:
    """An unacknowledged QoS 1/2 delivery; ``released`` once PUBREC arrived (QoS 2 second half)."""

    message: Message
    qos: int
    retain: bool
    sub_ids: tuple[int, ...]
    share_group: object | None
    released: bool = False


class Session:
    """The state of one client id (MQTT 5.0 §4.1); ``sink`` is None while no connection is attached."""

    __slots__ = (
        "_next_packet_id",
        "awaiting_rel",
        "client",
        "expires_at",
        "expiry_interval",
        "inflight",
        "max_inflight",
        "max_queue",
        "metric_slot",
        "metrics",
        "parked",
        "queue",
        "queue_qos0",
        "sink",
        "subscriptions",
        "will",
        "will_at",
    )

    def __init__(
        self,
        client: ClientInfo,
        *,
        max_inflight: int,
        max_queue: int,
        queue_qos0: bool,
        metrics: BrokerMetrics,
    ) -> None:
        self.client = client
        self.subscriptions: dict[str, Subscription] = {}
        self.sink: DeliverySink | None = None
        self.parked = False
        self.inflight: dict[int, Inflight] = {}
        self.queue: deque[Queued] = deque()
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.queue_qos0 = queue_qos0
        self.awaiting_rel: set[int] = set()
        self.expiry_interval = 0
        self.expires_at: float | None = None
        self.will: Will | None = None
        self.will_at: float | None = None
        self.metrics = metrics
        self.metric_slot = protocol_slot(client.protocol)
        self._next_packet_id = 1

    @property
    def client_id(self) -> str:
        return self.client.client_id

    @property
    def online(self) -> bool:
        """A connection is attached and the device is not asleep."""
        return self.sink is not None and not self.parked

    # --- delivery

    def deliver(self, message: Message, sub: Subscription, share_group: object | None = None) -> None:
        """Deliver ``message`` matched by ``sub``: now, or into the queue (bounded, drop oldest)."""
        qos = message.qos if message.qos < sub.qos else sub.qos
        retain = message.retain and sub.retain_as_published
        sub_ids = (sub.subscription_id,) if sub.subscription_id else ()
        sink = self.sink
        if sink is not None and not self.parked and (qos == 0 or not self.queue):
            packet_id = 0
            if qos:
                if len(self.inflight) >= self.max_inflight:
                    self.enqueue(Queued(message, qos, retain, sub_ids, share_group))
                    return
                packet_id = self._allocate_packet_id()
                self.inflight[packet_id] = Inflight(message, qos, retain, sub_ids, share_group)
            metrics = self.metrics
            slot = self.metric_slot + qos
            metrics.sent[slot] += 1
            metrics.sent_bytes[slot] += len(message.payload)
            sink.deliver(message, qos, packet_id, False, retain, sub_ids)
            return
        self.enqueue(Queued(message, qos, retain, sub_ids, share_group))

    def count_received(self, message: Message) -> None:
        """Count a message this session's client published, by its protocol and the message's QoS."""
        metrics = self.metrics
        slot = self.metric_slot + message.qos
        metrics.received[slot] += 1
        metrics.received_bytes[slot] += len(message.payload)

    def deliver_retained(self, message: Message, sub: Subscription) -> None:
        """A retained message sent because of a new subscription keeps its retain flag (§3.3.1.3)."""
        self.deliver(
            message,
            Subscription(
                sub.topic_filter, sub.qos, retain_as_published=True, subscription_id=sub.subscription_id
            ),
        )

    def enqueue(self, item: Queued) -> None:
        if item.qos == 0 and not self.queue_qos0:
            self.metrics.dropped_qos0_offline += 1
            return
        if self.max_queue <= 0:
            self.metrics.dropped_queue_full += 1
            return
        if len(self.queue) >= self.max_queue:
            self.queue.popleft()
            self.metrics.dropped_queue_full += 1
        self.queue.append(item)

    def _allocate_packet_id(self) -> int:
        packet_id = self._next_packet_id
        inflight = self.inflight
        while packet_id in inflight:
            packet_id = packet_id % 65535 + 1
        self._next_packet_id = packet_id % 65535 + 1
        return packet_id

    def drain(self, now: float) -> None:
        """Send queued messages while the client is online and its window has room."""
        sink = self.sink
        queue = self.queue
        metrics = self.metrics
        while queue and sink is not None and not self.parked:
            item = queue[0]
            if item.qos and len(self.inflight) >= self.max_inflight:
                return
            queue.popleft()
            expires_at = item.message.expires_at
            if expires_at is not None and expires_at <= now:
                metrics.dropped_expired += 1
                continue
            packet_id = 0
            if item.qos:
                packet_id = self._allocate_packet_id()
                self.inflight[packet_id] = Inflight(
                    item.message, item.qos, item.retain, item.sub_ids, item.share_group
                )
            slot = self.metric_slot + item.qos
            metrics.sent[slot] += 1
            metrics.sent_bytes[slot] += len(item.message.payload)
            sink.deliver(item.message, item.qos, packet_id, False, item.retain, item.sub_ids)
            sink = self.sink

    # --- acknowledgements

    def puback(self, packet_id: int, now: float) -> bool:
        """PUBACK of a QoS 1 delivery; False when the id is unknown."""
        entry = self.inflight.get(packet_id)
        if entry is None or entry.qos != 1:
            return False
        del self.inflight[packet_id]
        if self.queue:
            self.drain(now)
        return True

    def pubrec(self, packet_id: int) -> bool:
        """PUBREC of a QoS 2 delivery: the message is now the client's; PUBREL follows (§4.3.3)."""
        entry = self.inflight.get(packet_id)
        if entry is None or entry.qos != 2:
            return False
        entry.released = True
        return True

    def pubcomp(self, packet_id: int, now: float) -> bool:
        entry = self.inflight.get(packet_id)
        if entry is None or not entry.released:
            return False
        del self.inflight[packet_id]
        if self.queue:
            self.drain(now)
        return True

    def drop_failed(self, packet_id: int, now: float) -> None:
        """The client refused a delivery (v5 PUBACK/PUBREC reason >= 0x80): it is done with it (§4.3)."""
        if self.inflight.pop(packet_id, None) is not None and self.queue:
            self.drain(now)

    # --- connections

    def attach(self, sink: DeliverySink, max_inflight: int, now: float) -> None:
        """A connection takes the session: resend unacknowledged deliveries (DUP, §4.4), then the queue."""
        self.sink = sink
        self.parked = False
        self.metric_slot = protocol_slot(self.client.protocol)
        self.max_inflight = max_inflight
        self.expires_at = None
        self.will_at = None
        self.resend_inflight()
        self.drain(now)

    def resend_inflight(self) -> None:
        sink = self.sink
        for packet_id, entry in list(self.inflight.items()):
            if sink is None:
                return
            if entry.released:
                sink.deliver_pubrel(packet_id)
            else:
                self.metrics.redelivered[self.metric_slot + entry.qos] += 1
                sink.deliver(entry.message, entry.qos, packet_id, True, entry.retain, entry.sub_ids)

    def detach(self) -> None:
        self.sink = None
        self.parked = False

    def take_shared_unacked(self) -> list[tuple[object, Message]]:
        """Remove and return the QoS 1/2 messages received through shared subscriptions and not yet
        acknowledged, so that the broker can hand them to another member of their group."""
        taken: list[tuple[object, Message]] = []
        for packet_id, entry in list(self.inflight.items()):
            if entry.share_group is not None and not entry.released:
                del self.inflight[packet_id]
                taken.append((entry.share_group, entry.message))
        kept: deque[Queued] = deque()
        for item in self.queue:
            if item.share_group is not None and item.qos:
                taken.append((item.share_group, item.message))
            else:
                kept.append(item)
        self.queue = kept
        return taken
