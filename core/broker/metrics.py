"""Broker counters: plain integers incremented on the hot path, read by $SYS and the metrics export.

Messages and their payload bytes are counted per protocol and QoS in flat preallocated lists indexed by
``protocol_slot(protocol) + qos`` (no dict, tuple or string made per message). A session computes its slot
once, from its client's protocol. MQTT-SN QoS -1 messages are QoS 0 messages in the broker and count as
QoS 0 (the MQTT-SN gateway counts them apart as ``qos3_published``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields

__all__ = ["DEVICE_PROTOCOLS", "PROTOCOLS", "QOS_LEVELS", "BrokerMetrics", "protocol_slot"]

DEVICE_PROTOCOLS = ("mqtt", "mqttsn", "coap", "lwm2m")
"""The protocols devices speak: always reported, with zeros before any traffic."""
PROTOCOLS = (*DEVICE_PROTOCOLS, "bridge", "api", "other")
"""Every protocol counted; ``bridge`` is an MQTT bridge's local session, ``api`` the HTTP API's LwM2M command
session and ``other`` any protocol name not listed here."""
QOS_LEVELS = 3

_SLOTS = {name: index * QOS_LEVELS for index, name in enumerate(PROTOCOLS)}
_OTHER = _SLOTS["other"]


def protocol_slot(protocol: str) -> int:
    """The index of ``protocol``'s QoS 0 counter in the per-protocol tables (add the QoS for 1 and 2)."""
    return _SLOTS.get(protocol, _OTHER)


def _table() -> list[int]:
    return [0] * (len(PROTOCOLS) * QOS_LEVELS)


@dataclass(slots=True)
class BrokerMetrics:
    """Counters since start. Dropped messages are counted by reason.

    ``received``/``received_bytes``: application messages from clients, accepted for routing, and their
    payload bytes (a will counts in ``wills_published``). ``sent``/``sent_bytes``: first deliveries handed
    to a client's connection or gateway (drops after that are ``dropped_slow_consumer`` and
    ``dropped_too_large``). ``redelivered``: QoS 1/2 deliveries sent again with DUP after a reconnect or a
    wake-up (MQTT 5.0 §4.4). ``bytes_*`` and ``packets_*`` are MQTT wire figures.
    """

    messages_published: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    packets_sent: int = 0
    connections_total: int = 0
    malformed_packets: int = 0
    protocol_errors: int = 0
    keepalive_timeouts: int = 0
    sessions_taken_over: int = 0
    wills_published: int = 0
    dropped_no_subscribers: int = 0
    dropped_queue_full: int = 0
    dropped_qos0_offline: int = 0
    dropped_expired: int = 0
    dropped_too_large: int = 0
    dropped_slow_consumer: int = 0
    retained_rejected_full: int = 0
    received: list[int] = field(default_factory=_table)
    received_bytes: list[int] = field(default_factory=_table)
    sent: list[int] = field(default_factory=_table)
    sent_bytes: list[int] = field(default_factory=_table)
    redelivered: list[int] = field(default_factory=_table)

    @property
    def messages_received(self) -> int:
        return sum(self.received)

    @property
    def messages_sent(self) -> int:
        return sum(self.sent)

    @property
    def messages_dropped(self) -> int:
        return (
            self.dropped_no_subscribers
            + self.dropped_queue_full
            + self.dropped_qos0_offline
            + self.dropped_expired
            + self.dropped_too_large
            + self.dropped_slow_consumer
        )

    def as_dict(self) -> dict[str, int]:
        """The scalar counters and the message totals (the per-protocol tables summed)."""
        values = ((f.name, getattr(self, f.name)) for f in fields(self))
        counters = {name: value for name, value in values if isinstance(value, int)}
        counters["messages_received"] = self.messages_received
        counters["messages_sent"] = self.messages_sent
        return counters

    def reported_protocols(self) -> Iterator[tuple[str, int]]:
        """(protocol, slot) of the device protocols and of every other protocol that has traffic."""
        tables = (self.received, self.sent, self.redelivered)
        for name, slot in _SLOTS.items():
            if name in DEVICE_PROTOCOLS or any(any(t[slot : slot + QOS_LEVELS]) for t in tables):
                yield name, slot

    def by_protocol(self, table: list[int]) -> dict[str, int]:
        """The totals of one table (all QoS levels) per reported protocol."""
        return {name: sum(table[slot : slot + QOS_LEVELS]) for name, slot in self.reported_protocols()}

    def add(self, other: BrokerMetrics) -> BrokerMetrics:
        """The sum of two sets of counters (the embedded broker's and edge mode's)."""
        total = BrokerMetrics()
        for counter in fields(BrokerMetrics):
            name = counter.name
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, list):
                setattr(total, name, [a + b for a, b in zip(mine, theirs, strict=True)])
            else:
                setattr(total, name, mine + theirs)
        return total
