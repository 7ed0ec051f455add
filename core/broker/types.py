"""Records shared by the broker and every user of it (the MQTT listener and the gateways).

They are slotted and plain: one :class:`Message` is created per publish and shared by every subscriber.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from core.mqtt.codec import EMPTY_PROPERTIES, Properties

__all__ = [
    "AuthResult",
    "ClientInfo",
    "Credentials",
    "DeliverySink",
    "Message",
    "Subscription",
    "Will",
]


@dataclass(slots=True, eq=False)
class Message:
    """An application message as routed by the broker.

    ``properties`` holds the MQTT 5 properties that travel with the message (payload format, content type,
    response topic, correlation data, user properties); ``expires_at`` is the monotonic deadline derived
    from the message expiry interval (§3.3.2.3.3). ``wire`` caches the encoded PUBLISH (the bytes before and
    after the packet id) per variant, so that a fan-out encodes once (DESIGN §6).
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    sender: str = ""
    properties: Properties = EMPTY_PROPERTIES
    expires_at: float | None = None
    wire: dict[object, tuple[bytes, bytes]] | None = None


@dataclass(frozen=True, slots=True)
class Subscription:
    """One subscription of a session with its options (MQTT 5.0 §3.8.3.1)."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int = 0
    share_group: str | None = None

    @property
    def sub_ids(self) -> tuple[int, ...]:
        return (self.subscription_id,) if self.subscription_id else ()


@dataclass(frozen=True, slots=True)
class Will:
    """A will message with its delay (MQTT 5.0 §3.1.3.2)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = EMPTY_PROPERTIES
    delay: int = 0


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who a session belongs to: its client id, protocol (mqtt, mqttsn, coap, lwm2m) and peer address."""

    client_id: str
    protocol: str = "mqtt"
    peer: str = ""
    username: str | None = None
    protocol_version: int = 4
    peer_cert: bytes | None = None  # the DER client certificate of a TLS/DTLS connection
    keepalive: int = 0  # seconds, as the device asked (carried to the upstream connection in edge mode)
    psk_identity: str | None = None  # the DTLS PSK identity that is the user name (psk_identity_as_username)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a client presented to authenticate."""

    username: str | None = None
    password: bytes | None = None


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The broker's answer to an authentication: ``reason_code`` is an MQTT 5 reason code (0 = allowed)."""

    reason_code: int = 0

    @property
    def allowed(self) -> bool:
        return self.reason_code == 0


class DeliverySink(Protocol):
    """What a session delivers to: the connection (MQTT) or gateway channel holding it.

    ``deliver`` hands over one message with the QoS granted for this subscriber, the packet id (0 for
    QoS 0), whether it is a redelivery, the retain flag to send and the subscription identifiers. The
    session keeps at most its inflight window of QoS 1/2 deliveries unacknowledged; the sink reports
    acknowledgements back through the session.
    """

    def deliver(
        self, message: Message, qos: int, packet_id: int, dup: bool, retain: bool, sub_ids: tuple[int, ...]
    ) -> None: ...

    def deliver_pubrel(self, packet_id: int) -> None:
        """Resend PUBREL for a QoS 2 delivery whose PUBREC arrived before a reconnect (§4.4)."""
        ...

    def kick(self, reason_code: int) -> None:
        """The broker ends this connection (takeover 0x8E, administrative action 0x98, shutdown 0x8B)."""
        ...
