"""Broker counters: plain integers incremented on the hot path, read by $SYS and the metrics export."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["BrokerMetrics"]


@dataclass(slots=True)
class BrokerMetrics:
    """Counters since start. Dropped messages are counted by reason."""

    messages_received: int = 0
    messages_sent: int = 0
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

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
