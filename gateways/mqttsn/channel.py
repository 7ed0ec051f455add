"""One MQTT-SN client as a broker session: the pure per-client state machine (MQTT-SN 1.2 §6).

The channel turns decoded messages into calls on its broker :class:`~gateways.base.SessionHandle` and its
session's deliveries into datagrams, through the :class:`Gateway` it belongs to (which owns the outbox, the
timers and the configuration). It never reads a clock: every entry point takes ``now``.

States are those of §6.14 plus the CONNECT handshake (§6.2, §6.3). Deliveries go out one QoS 1/2 message at a
time (the session's window, §6.6), after a REGISTER when the client does not know the topic yet (§6.10); the
channel retransmits after T_retry and counts the client lost after N_retry attempts (§6.13). A lost client's
will is published whatever its clean-session flag, also while it sleeps (the EMQX 4.3 fixes).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from core.broker.types import Message, Subscription, Will
from core.errors import MalformedPacket
from core.logging import client_fields
from core.topics import validate_filter, validate_topic
from gateways.base import SessionHandle
from gateways.mqttsn import codec
from gateways.mqttsn.numbers import MAX_CLIENT_ID, PROTOCOL_ID, ReturnCode, TopicIdType
from gateways.mqttsn.registry import TopicRegistry

if TYPE_CHECKING:
    from core.config import MqttSnConfig

__all__ = ["ChannelState", "Gateway", "MqttSnChannel"]

log = logging.getLogger("mqgate.mqttsn")

_REJECTED = ReturnCode.NOT_SUPPORTED
_CONGESTION_CODES = (0x97, 0x89, 0x88, 0x8A)  # quota exceeded, server busy, unavailable, banned: retry later


class ChannelState(Enum):
    """Client states of MQTT-SN 1.2 §6.14, with the CONNECT handshake of §6.2 split out."""

    DISCONNECTED = "disconnected"
    AWAITING_WILL_TOPIC = "awaiting WILLTOPIC"
    AWAITING_WILL_MESSAGE = "awaiting WILLMSG"
    CONNECTING = "connecting"  # waiting for the broker to open the session
    ACTIVE = "active"
    ASLEEP = "asleep"
    AWAKE = "awake"
    LOST = "lost"


class Gateway(Protocol):
    """What a channel needs from the gateway that holds it."""

    config: MqttSnConfig

    def now(self) -> float:
        """The gateway's clock (deliveries arrive from the broker without a time)."""
        ...

    def send(self, peer: object, message: codec.Message | bytes) -> None: ...

    def schedule(self, channel: MqttSnChannel, deadline: float) -> None: ...

    def request_session(self, channel: MqttSnChannel) -> None: ...

    def count(self, name: str) -> None: ...

    def channel_gone(self, channel: MqttSnChannel) -> None: ...


@dataclass(slots=True)
class _Outgoing:
    """A QoS 1/2 delivery sent and not yet acknowledged (or its PUBREL, once PUBREC arrived)."""

    message: Message | None  # None for a PUBREL resent after a reconnect
    qos: int
    retain: bool
    topic_id: int
    topic_id_type: int
    sent_at: float
    attempts: int = 1
    released: bool = False


@dataclass(slots=True)
class _Pending:
    """A delivery waiting for its topic's REGACK (§6.10)."""

    message: Message
    qos: int
    packet_id: int
    dup: bool
    retain: bool


@dataclass(slots=True)
class _Registration:
    """The one REGISTER the gateway has outstanding to this client (§6.5)."""

    msg_id: int
    topic_id: int
    name: str
    sent_at: float
    attempts: int = 1


class MqttSnChannel:
    """The gateway side of one MQTT-SN client, also the :class:`DeliverySink` of its broker session."""

    def __init__(self, gateway: Gateway, peer: object, client_id: str, now: float) -> None:
        config = gateway.config
        self.gateway = gateway
        self.peer = peer
        self.client_id = client_id
        self.state = ChannelState.DISCONNECTED
        self.session: SessionHandle | None = None
        self.registry = TopicRegistry(config.predefined, config.max_topics)
        self.keepalive = 0
        self.last_seen = now
        self.clean_session = True
        self.sleep_until: float | None = None
        self._sleep_span = 0.0  # the sleep duration with its tolerance
        self.disconnected_at = now
        self.scheduled: float | None = None
        self.will: Will | None = None
        self.will_topic: codec.WillTopic | None = None
        self._awaiting_rel: set[int] = set()
        self._outgoing: dict[int, _Outgoing] = {}
        self._pending: deque[_Pending] = deque()
        self._registering: _Registration | None = None
        self._next_msg_id = 1
        self._held: list[_Pending] | None = None
        self._handshake_started = now

    def _log_fields(self) -> dict[str, str]:
        """A log line's client fields: the broker client id (``clientid_prefix`` included), peer, protocol."""
        return client_fields(self.gateway.config.clientid_prefix + self.client_id, self.peer, "mqttsn")

    def __repr__(self) -> str:
        return f"<MqttSnChannel {self.client_id!r} {self.state.value} at {self.peer}>"

    # --- input

    def handle(self, message: codec.Message, now: float) -> None:
        """Handle one message from the client; one invalid in the current state is dropped and logged."""
        self.last_seen = now
        handler = _HANDLERS.get(type(message))
        if handler is None:
            self._invalid(message, "not a message a client sends")
            return
        handler(self, message, now)

    def _invalid(self, message: codec.Message, why: str) -> None:
        self.gateway.count("invalid_in_state")
        log.info(
            "mqttsn %s (%s): dropped %s in state %s: %s",
            self.client_id,
            self.peer,
            type(message).__name__.upper(),
            self.state.value,
            why,
            extra=self._log_fields(),
        )

    @property
    def connected(self) -> bool:
        return self.state in (ChannelState.ACTIVE, ChannelState.ASLEEP, ChannelState.AWAKE)

    # --- CONNECT and the will handshake (§6.2, §6.3)

    def on_connect(self, m: codec.Connect, now: float) -> None:
        if m.protocol_id != PROTOCOL_ID or not m.client_id or len(m.client_id.encode()) > MAX_CLIENT_ID:
            log.info(
                "mqttsn CONNECT from %s refused: protocol id %d, client id %r",
                self.peer,
                m.protocol_id,
                m.client_id,
                extra=client_fields(self.gateway.config.clientid_prefix + m.client_id, self.peer, "mqttsn"),
            )
            self.gateway.count("connect_refused")
            self.gateway.send(self.peer, codec.Connack(_REJECTED))
            return
        if self.state in (ChannelState.CONNECTING,):
            return  # a retransmitted CONNECT while the broker opens the session
        self.keepalive = m.duration
        self.clean_session = m.clean_session
        self._handshake_started = now
        if m.will:
            self.state = ChannelState.AWAITING_WILL_TOPIC
            self.will_topic = None
            self.gateway.send(self.peer, codec.WillTopicReq())
            self.gateway.schedule(self, now + self.gateway.config.idle_timeout)
            return
        if self.session is None or m.clean_session:
            self.will = None
        self._open(now)

    def on_will_topic(self, m: codec.WillTopic, now: float) -> None:
        if self.state is not ChannelState.AWAITING_WILL_TOPIC:
            self._invalid(m, "no WILLTOPICREQ outstanding")
            return
        if m.topic is None:
            self.will = None  # the empty WILLTOPIC: no will (§6.3)
            self._open(now)
            return
        if validate_topic(m.topic) is not None:
            self._invalid(m, "invalid will topic")
            self.state = ChannelState.DISCONNECTED
            self.gateway.send(self.peer, codec.Connack(_REJECTED))
            return
        self.will_topic = m
        self.state = ChannelState.AWAITING_WILL_MESSAGE
        self.gateway.send(self.peer, codec.WillMsgReq())

    def on_will_message(self, m: codec.WillMsg, now: float) -> None:
        topic = self.will_topic
        if self.state is not ChannelState.AWAITING_WILL_MESSAGE or topic is None or topic.topic is None:
            self._invalid(m, "WILLMSG before WILLTOPIC")
            return
        self.will = Will(topic.topic, m.message, topic.qos, topic.retain)
        self._open(now)

    def _open(self, now: float) -> None:
        """Resume the session this channel holds, or ask the gateway to open one at the broker."""
        session = self.session
        if session is not None and not self.clean_session:
            session.set_will(self.will)
            self._resume_active(now)
            return
        if session is not None:
            self.session = None
            self._reset_deliveries()
            session.close(publish_will=False)
        if self.clean_session:
            self.registry.clear()
        self.state = ChannelState.CONNECTING
        self._held = []  # deliveries the session sends on attach wait for the CONNACK
        self.gateway.request_session(self)

    def session_opened(self, session: SessionHandle, now: float) -> None:
        """The broker opened the session: answer CONNACK and let deliveries flow."""
        held, self._held = self._held or [], None
        if self.state is not ChannelState.CONNECTING:
            session.close(publish_will=False)
            return
        self.session = session
        if not session.present:
            self.registry.clear()
        self._resume_active(now, resume=False)  # attaching already resent and drained
        for item in held:
            self.deliver(item.message, item.qos, item.packet_id, item.dup, item.retain, ())
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "mqttsn %s (%s) connected, keepalive %d s",
                self.client_id,
                self.peer,
                self.keepalive,
                extra=self._log_fields(),
            )

    def session_refused(self, reason_code: int, now: float) -> None:
        self._held = None
        if self.state is ChannelState.CONNECTING:
            log.info(
                "mqttsn %s (%s) refused by the broker: reason 0x%02x",
                self.client_id,
                self.peer,
                reason_code,
                extra=self._log_fields(),
            )
            self.state = ChannelState.DISCONNECTED
            self.gateway.send(
                self.peer,
                codec.Connack(ReturnCode.CONGESTION if reason_code in _CONGESTION_CODES else _REJECTED),
            )
            self.gateway.channel_gone(self)

    def _resume_active(self, now: float, *, resume: bool = True) -> None:
        self.state = ChannelState.ACTIVE
        self.sleep_until = None
        self.gateway.send(self.peer, codec.Connack(ReturnCode.ACCEPTED))
        self._arm_keepalive(now)
        session = self.session
        if session is not None and resume:
            session.resume()  # the broker resends unacknowledged deliveries, then the queue

    def _arm_keepalive(self, now: float) -> None:
        deadline = self.keepalive_deadline()
        if deadline is not None:
            self.gateway.schedule(self, deadline)

    def keepalive_deadline(self) -> float | None:
        """Keep-alive with the tolerance of §7.2: +10 % over a minute, +50 % below."""
        if not self.keepalive:
            return None
        config = self.gateway.config
        factor = config.keepalive_tolerance_long if self.keepalive > 60 else config.keepalive_tolerance_short
        return self.last_seen + self.keepalive * factor

    # --- PUBLISH from the client (§6.8)

    def topic_of(self, topic_id_type: int, topic_id: int) -> str | None:
        """The topic name a PUBLISH's topic id stands for, or None if unknown."""
        if topic_id_type == TopicIdType.SHORT:
            try:
                return codec.short_topic_name(topic_id)
            except MalformedPacket:
                return None
        if topic_id in (0, 0xFFFF):
            return None
        if topic_id_type == TopicIdType.PREDEFINED:
            return self.registry.predefined.get(topic_id)
        if topic_id_type == TopicIdType.NORMAL:
            return self.registry.name_of(topic_id)
        return None

    def on_publish(self, m: codec.Publish, now: float) -> None:
        session = self.session
        if session is None or not self.connected:
            self._invalid(m, "PUBLISH before CONNECT")
            return
        qos = 0 if m.qos < 0 else m.qos
        if qos == 2 and m.msg_id in self._awaiting_rel:
            self.gateway.send(
                self.peer, codec.Pubrec(m.msg_id)
            )  # a resend: answered again, not delivered twice
            return
        topic = self.topic_of(m.topic_id_type, m.topic_id)
        if topic is None:
            self.gateway.count("publish_unknown_topic_id")
            self.gateway.send(self.peer, codec.Puback(m.topic_id, m.msg_id, ReturnCode.INVALID_TOPIC_ID))
            return
        if "+" in topic or "#" in topic:
            self.gateway.send(self.peer, codec.Puback(m.topic_id, m.msg_id, _REJECTED))
            return
        self.gateway.count("messages_in")
        code = session.publish(Message(topic, m.data, qos, m.retain))
        if code >= 0x80:
            rc = ReturnCode.CONGESTION if code in _CONGESTION_CODES else _REJECTED
            log.info(
                "mqttsn %s (%s) publish to %s refused: reason 0x%02x",
                self.client_id,
                self.peer,
                topic,
                code,
                extra=self._log_fields(),
            )
            self.gateway.send(self.peer, codec.Puback(m.topic_id, m.msg_id, rc))
            return
        if qos == 1:
            self.gateway.send(self.peer, codec.Puback(m.topic_id, m.msg_id, ReturnCode.ACCEPTED))
        elif qos == 2:
            self._awaiting_rel.add(m.msg_id)
            self.gateway.send(self.peer, codec.Pubrec(m.msg_id))

    def on_pubrel(self, m: codec.Pubrel, now: float) -> None:
        if not self.connected:
            self._invalid(m, "not connected")
            return
        self._awaiting_rel.discard(m.msg_id)
        self.gateway.send(self.peer, codec.Pubcomp(m.msg_id))

    # --- REGISTER from the client (§6.5)

    def on_register(self, m: codec.Register, now: float) -> None:
        if not self.connected:
            self._invalid(m, "REGISTER before CONNECT")
            return
        name = m.topic_name
        predefined = self.registry.predefined_ids.get(name)
        if predefined is not None:
            self.gateway.send(self.peer, codec.Regack(predefined, m.msg_id, ReturnCode.ACCEPTED))
            return
        if validate_topic(name) is not None:
            self.gateway.send(self.peer, codec.Regack(0, m.msg_id, _REJECTED))
            return
        topic_id = self.registry.register(name)
        if topic_id is None:
            self.gateway.count("registry_full")
            self.gateway.send(self.peer, codec.Regack(0, m.msg_id, _REJECTED))
            return
        self.gateway.send(self.peer, codec.Regack(topic_id, m.msg_id, ReturnCode.ACCEPTED))

    def on_regack(self, m: codec.Regack, now: float) -> None:
        registration = self._registering
        if registration is None or registration.msg_id != m.msg_id:
            self._invalid(m, "no matching REGISTER outstanding")
            return
        self._registering = None
        if m.return_code == ReturnCode.CONGESTION:
            self._registering = registration  # try again after T_retry
            registration.sent_at = now
            self.gateway.schedule(self, now + self.gateway.config.t_retry)
            return
        if m.return_code != ReturnCode.ACCEPTED:
            self.registry.forget(registration.topic_id)
            log.info(
                "mqttsn %s refused REGISTER of %s: rc %d",
                self.client_id,
                registration.name,
                m.return_code,
                extra=self._log_fields(),
            )
            self._drop_pending_for(registration.name)
        self._flush_pending(now)

    # --- SUBSCRIBE / UNSUBSCRIBE (§6.9)

    def _filter_of(self, kind: int, name: str, topic_id: int) -> str | None:
        if kind == TopicIdType.PREDEFINED:
            return self.registry.predefined.get(topic_id)
        if kind in (TopicIdType.NORMAL, TopicIdType.SHORT):
            return name if validate_filter(name) is None else None
        return None

    def on_subscribe(self, m: codec.Subscribe, now: float) -> None:
        session = self.session
        if session is None or not self.connected:
            self._invalid(m, "SUBSCRIBE before CONNECT")
            return
        qos = 0 if m.qos < 0 else m.qos
        topic_filter = self._filter_of(m.topic_id_type, m.topic_name, m.topic_id)
        if topic_filter is None:
            rc = ReturnCode.INVALID_TOPIC_ID if m.topic_id_type == TopicIdType.PREDEFINED else _REJECTED
            self.gateway.send(self.peer, codec.Suback(0, m.msg_id, rc, qos))
            return
        topic_id = 0
        if m.topic_id_type == TopicIdType.PREDEFINED:
            topic_id = m.topic_id
        elif m.topic_id_type == TopicIdType.NORMAL and "+" not in topic_filter and "#" not in topic_filter:
            predefined = self.registry.predefined_ids.get(topic_filter)
            registered = predefined if predefined is not None else self.registry.register(topic_filter)
            if registered is None:
                self.gateway.count("registry_full")
                self.gateway.send(self.peer, codec.Suback(0, m.msg_id, _REJECTED, qos))
                return
            topic_id = registered
        self._held = []
        try:
            granted = session.subscribe([Subscription(topic_filter, qos)])[0]
        finally:
            held, self._held = self._held, None
        if granted >= 0x80:
            log.info(
                "mqttsn %s subscription to %s refused: reason 0x%02x",
                self.client_id,
                topic_filter,
                granted,
                extra=self._log_fields(),
            )
            self.gateway.send(self.peer, codec.Suback(0, m.msg_id, _REJECTED, qos))
        else:
            self.gateway.send(self.peer, codec.Suback(topic_id, m.msg_id, ReturnCode.ACCEPTED, granted))
        for item in held:
            self.deliver(item.message, item.qos, item.packet_id, item.dup, item.retain, ())

    def on_unsubscribe(self, m: codec.Unsubscribe, now: float) -> None:
        session = self.session
        if session is None or not self.connected:
            self._invalid(m, "UNSUBSCRIBE before CONNECT")
            return
        topic_filter = self._filter_of(m.topic_id_type, m.topic_name, m.topic_id)
        if topic_filter is not None:
            session.unsubscribe([topic_filter])
        self.gateway.send(self.peer, codec.Unsuback(m.msg_id))

    # --- PINGREQ, DISCONNECT and sleep (§6.11, §6.12, §6.14)

    def on_pingreq(self, m: codec.Pingreq, now: float) -> None:
        if self.state is ChannelState.ASLEEP and m.client_id:
            self._wake(now)
            return
        if self.state is ChannelState.AWAKE:
            return  # PINGRESP follows once everything queued is delivered
        if not self.connected:
            self._invalid(m, "PINGREQ before CONNECT")
            return
        self.gateway.send(self.peer, codec.Pingresp())

    def _wake(self, now: float) -> None:
        """PINGREQ(ClientId) from a sleeping client: deliver what is queued, then PINGRESP (§6.14)."""
        self.state = ChannelState.AWAKE
        session = self.session
        if session is not None:
            session.resume()  # the broker resends unacknowledged deliveries, then the queue
        self._maybe_back_to_sleep()

    def _maybe_back_to_sleep(self) -> None:
        session = self.session
        if self.state is not ChannelState.AWAKE or session is None:
            return
        if session.pending() or self._pending or self._registering is not None:
            return
        session.park()
        self.state = ChannelState.ASLEEP
        # §6.14: the sleep timer runs again from the client's last message, not from its DISCONNECT.
        self.sleep_until = self.last_seen + self._sleep_span
        self.gateway.schedule(self, self.sleep_until)
        self.gateway.send(self.peer, codec.Pingresp())

    def on_disconnect(self, m: codec.Disconnect, now: float) -> None:
        session = self.session
        if session is None or not self.connected:
            if self.state is ChannelState.DISCONNECTED:
                self.gateway.send(self.peer, codec.Disconnect())
            else:
                self._invalid(m, "not connected")
            return
        self.gateway.send(self.peer, codec.Disconnect())
        if m.duration:
            self.state = ChannelState.ASLEEP
            self._sleep_span = m.duration * self._sleep_tolerance(m.duration)
            self.sleep_until = now + self._sleep_span
            session.park()
            self.gateway.schedule(self, self.sleep_until)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "mqttsn %s asleep for %d s",
                    self.client_id,
                    m.duration,
                    extra=self._log_fields(),
                )
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "mqttsn %s disconnected",
                self.client_id,
                extra=self._log_fields(),
            )
        self._end(now, publish_will=False)

    def _sleep_tolerance(self, duration: int) -> float:
        config = self.gateway.config
        return config.keepalive_tolerance_long if duration > 60 else config.keepalive_tolerance_short

    # --- wills (§6.4)

    def on_will_topic_update(self, m: codec.WillTopicUpd, now: float) -> None:
        session = self.session
        if session is None or not self.connected:
            self._invalid(m, "not connected")
            return
        if m.topic is None:
            self.will = None
        elif validate_topic(m.topic) is not None:
            self.gateway.send(self.peer, codec.WillTopicResp(_REJECTED))
            return
        else:
            payload = self.will.payload if self.will is not None else b""
            self.will = Will(m.topic, payload, m.qos, m.retain)
        session.set_will(self.will)
        self.gateway.send(self.peer, codec.WillTopicResp(ReturnCode.ACCEPTED))

    def on_will_message_update(self, m: codec.WillMsgUpd, now: float) -> None:
        session = self.session
        if session is None or not self.connected:
            self._invalid(m, "not connected")
            return
        will = self.will
        if will is None:
            self.gateway.send(self.peer, codec.WillMsgResp(_REJECTED))
            return
        self.will = Will(will.topic, m.message, will.qos, will.retain)
        session.set_will(self.will)
        self.gateway.send(self.peer, codec.WillMsgResp(ReturnCode.ACCEPTED))

    # --- acknowledgements of deliveries

    def on_puback(self, m: codec.Puback, now: float) -> None:
        entry = self._outgoing.get(m.msg_id)
        session = self.session
        if entry is None or session is None or entry.qos != 1:
            self._invalid(m, "no matching QoS 1 PUBLISH outstanding")
            return
        if (
            m.return_code == ReturnCode.INVALID_TOPIC_ID
            and entry.topic_id_type == TopicIdType.NORMAL
            and entry.message is not None
        ):
            # The client lost the registration: register again, then resend (§6.10, EMQX 4.3.13).
            del self._outgoing[m.msg_id]
            self.registry.forget(entry.topic_id)
            self._pending.appendleft(_Pending(entry.message, 1, m.msg_id, True, entry.retain))
            self._flush_pending(now)
            return
        if m.return_code == ReturnCode.CONGESTION:
            entry.sent_at = now  # resent after T_retry (T_WAIT)
            self.gateway.schedule(self, now + self.gateway.config.t_retry)
            return
        del self._outgoing[m.msg_id]
        session.ack(m.msg_id)
        self._maybe_back_to_sleep()

    def on_pubrec(self, m: codec.Pubrec, now: float) -> None:
        entry = self._outgoing.get(m.msg_id)
        session = self.session
        if entry is None or session is None or entry.qos != 2:
            self._invalid(m, "no matching QoS 2 PUBLISH outstanding")
            return
        if not entry.released:
            entry.released = True
            session.received(m.msg_id)
        entry.sent_at = now
        entry.attempts = 1
        self.gateway.send(self.peer, codec.Pubrel(m.msg_id))

    def on_pubcomp(self, m: codec.Pubcomp, now: float) -> None:
        entry = self._outgoing.get(m.msg_id)
        session = self.session
        if entry is None or session is None or not entry.released:
            self._invalid(m, "no matching PUBREL outstanding")
            return
        del self._outgoing[m.msg_id]
        session.ack(m.msg_id)
        self._maybe_back_to_sleep()

    # --- DeliverySink: messages from the broker session

    def deliver(
        self, message: Message, qos: int, packet_id: int, dup: bool, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        """Send a delivery, registering its topic first when the client has no id for it (§6.10)."""
        item = _Pending(message, qos, packet_id, dup, retain)
        if self._held is not None:
            self._held.append(item)
            return
        if self._pending or self._registering is not None:
            self._queue_pending(item)
            return
        self._send_delivery(item, self.gateway.now())

    def _queue_pending(self, item: _Pending) -> None:
        if len(self._pending) >= self.gateway.config.max_pending:
            self.gateway.count("dropped_pending_full")
            if item.qos:
                self._reject_delivery(item)
            return
        self._pending.append(item)

    def _reject_delivery(self, item: _Pending) -> None:
        """A QoS 1/2 delivery that cannot be sent: acknowledge it to the session so its window moves."""
        if self.session is not None and item.qos:
            self.session.ack(item.packet_id)

    def _topic_for(self, name: str) -> tuple[int, int] | None:
        """(topic id type, topic id) the client knows ``name`` by, or None if it must be registered."""
        predefined = self.registry.predefined_ids.get(name)
        if predefined is not None:
            return TopicIdType.PREDEFINED, predefined
        registered = self.registry.registered_id(name)
        if registered is not None:
            return TopicIdType.NORMAL, registered
        if len(name) == 2 and len(name.encode()) == 2:
            return TopicIdType.SHORT, codec.short_topic_id(name)
        return None

    def _send_delivery(self, item: _Pending, now: float) -> None:
        message = item.message
        known = self._topic_for(message.topic)
        if known is None:
            topic_id = self.registry.register(message.topic)
            if topic_id is None:
                self.gateway.count("registry_full")
                self._reject_delivery(item)
                return
            msg_id = self._next_msg_id
            self._next_msg_id = msg_id % 0xFFFF + 1
            self._registering = _Registration(msg_id, topic_id, message.topic, now)
            self._pending.appendleft(item)
            self.gateway.send(self.peer, codec.Register(topic_id, msg_id, message.topic))
            self.gateway.schedule(self, now + self.gateway.config.t_retry)
            return
        kind, topic_id = known
        qos = item.qos
        self.gateway.send(
            self.peer,
            codec.encode_publish(topic_id, message.payload, qos, item.packet_id, kind, item.retain, item.dup),
        )
        self.gateway.count("messages_out")
        if qos:
            self._outgoing[item.packet_id] = _Outgoing(message, qos, item.retain, topic_id, kind, now)
            self.gateway.schedule(self, now + self.gateway.config.t_retry)

    def _flush_pending(self, now: float) -> None:
        while self._pending and self._registering is None:
            self._send_delivery(self._pending.popleft(), now)
        self._maybe_back_to_sleep()

    def _drop_pending_for(self, name: str) -> None:
        kept: deque[_Pending] = deque()
        for item in self._pending:
            if item.message.topic == name:
                self.gateway.count("dropped_register_refused")
                self._reject_delivery(item)
            else:
                kept.append(item)
        self._pending = kept

    def deliver_pubrel(self, packet_id: int) -> None:
        """Resend PUBREL for a QoS 2 delivery the client received before it reconnected."""
        now = self.gateway.now()
        self._outgoing[packet_id] = _Outgoing(None, 2, False, 0, TopicIdType.NORMAL, now, released=True)
        self.gateway.send(self.peer, codec.Pubrel(packet_id))
        self.gateway.schedule(self, now + self.gateway.config.t_retry)

    def kick(self, reason_code: int) -> None:
        """The broker ended the session's connection (another client took the client id over)."""
        log.info(
            "mqttsn %s (%s) disconnected by the broker: reason 0x%02x",
            self.client_id,
            self.peer,
            reason_code,
            extra=self._log_fields(),
        )
        self.session = None
        self.gateway.send(self.peer, codec.Disconnect())
        self._reset_deliveries()
        self.state = ChannelState.DISCONNECTED
        self.gateway.channel_gone(self)

    def _retransmit(self, msg_id: int, entry: _Outgoing, now: float) -> None:
        entry.sent_at = now
        if entry.released or entry.message is None:
            self.gateway.send(self.peer, codec.Pubrel(msg_id))
        else:
            self.gateway.send(
                self.peer,
                codec.encode_publish(
                    entry.topic_id,
                    entry.message.payload,
                    entry.qos,
                    msg_id,
                    entry.topic_id_type,
                    entry.retain,
                    True,
                ),
            )
        self.gateway.schedule(self, now + self.gateway.config.t_retry)

    def _reset_deliveries(self) -> None:
        self._outgoing.clear()
        self._pending.clear()
        self._registering = None
        self._awaiting_rel.clear()

    # --- timers

    def handle_timeout(self, now: float) -> float | None:
        """Retransmissions, keep-alive, sleep and handshake timers; returns the next deadline."""
        state = self.state
        config = self.gateway.config
        if state in (ChannelState.AWAITING_WILL_TOPIC, ChannelState.AWAITING_WILL_MESSAGE):
            deadline = self._handshake_started + config.idle_timeout
            if now >= deadline:
                log.info(
                    "mqttsn %s (%s): will handshake not finished, dropped",
                    self.client_id,
                    self.peer,
                    extra=self._log_fields(),
                )
                self.state = ChannelState.DISCONNECTED
                session, self.session = self.session, None  # a connected client that re-sent CONNECT
                self._reset_deliveries()
                if session is not None:
                    session.close(publish_will=True)
                self.gateway.channel_gone(self)
                return None
            return deadline
        if state is ChannelState.DISCONNECTED:
            deadline = self.disconnected_at + config.session_expiry
            if now >= deadline:
                self.gateway.channel_gone(self)
                return None
            return deadline
        if not self.connected:
            return None
        if state is ChannelState.ASLEEP:
            if self.sleep_until is not None and now >= self.sleep_until:
                self._lose(now, "sleep timer expired")
                return None
            return self.sleep_until
        deadlines: list[float] = []
        if state is ChannelState.ACTIVE:
            keepalive = self.keepalive_deadline()
            if keepalive is not None:
                if now >= keepalive:
                    self._lose(now, "keep-alive timeout")
                    return None
                deadlines.append(keepalive)
        for msg_id, entry in list(self._outgoing.items()):
            due = entry.sent_at + config.t_retry
            if now >= due:
                if entry.attempts > config.n_retry:
                    self._lose(now, f"no acknowledgement after {config.n_retry} retransmissions")
                    return None
                entry.attempts += 1
                self.gateway.count("retransmissions")
                self._retransmit(msg_id, entry, now)
                due = now + config.t_retry
            deadlines.append(due)
        registration = self._registering
        if registration is not None:
            due = registration.sent_at + config.t_retry
            if now >= due:
                if registration.attempts > config.n_retry:
                    self._lose(now, f"no REGACK after {config.n_retry} retransmissions")
                    return None
                registration.attempts += 1
                registration.sent_at = now
                self.gateway.count("retransmissions")
                self.gateway.send(
                    self.peer, codec.Register(registration.topic_id, registration.msg_id, registration.name)
                )
                due = now + config.t_retry
            deadlines.append(due)
        return min(deadlines) if deadlines else None

    # --- endings

    def _lose(self, now: float, why: str) -> None:
        """The client is lost (§6.14): its will is published whatever its clean-session flag."""
        log.info(
            "mqttsn %s (%s) lost: %s",
            self.client_id,
            self.peer,
            why,
            extra=self._log_fields(),
        )
        self.gateway.count("clients_lost")
        self._end(now, publish_will=True)

    def _end(self, now: float, *, publish_will: bool) -> None:
        session, self.session = self.session, None
        self._reset_deliveries()
        self.state = ChannelState.DISCONNECTED
        self.disconnected_at = now
        self.sleep_until = None
        if session is not None:
            session.close(publish_will=publish_will)
        if self.clean_session:
            self.gateway.channel_gone(self)
        else:
            self.gateway.schedule(self, now + self.gateway.config.session_expiry)

    def link_lost(self, now: float, why: str) -> None:
        """The link under the client went away (its serial device was unplugged): a connected or sleeping
        client is lost (§6.14: its will is published); an unfinished CONNECT is dropped."""
        if self.connected:
            self._lose(now, why)
        elif self.state in (
            ChannelState.AWAITING_WILL_TOPIC,
            ChannelState.AWAITING_WILL_MESSAGE,
            ChannelState.CONNECTING,
        ):
            session, self.session = self.session, None  # a connected client that re-sent CONNECT
            self._reset_deliveries()
            self._held = None
            self.state = ChannelState.DISCONNECTED  # a session opening in flight is closed when it lands
            if session is not None:
                session.close(publish_will=True)
            self.gateway.channel_gone(self)

    def take_over(self, now: float, new_peer: object) -> None:
        """Another address connects with this client id while it is active: the old link is lost (its will
        is published); the gateway then binds the channel to the new address."""
        if self.state in (ChannelState.ACTIVE, ChannelState.AWAKE):
            log.info(
                "mqttsn %s: taken over from %s by %s",
                self.client_id,
                self.peer,
                new_peer,
                extra=self._log_fields(),
            )
            self.gateway.count("clients_lost")
            session, self.session = self.session, None
            self._reset_deliveries()
            if session is not None:
                session.close(publish_will=True)
            self.state = ChannelState.DISCONNECTED

    def shutdown(self) -> None:
        """The gateway stops: tell the client, detach from the broker without publishing the will."""
        session, self.session = self.session, None
        if session is not None:
            session.close(publish_will=False)
        self.state = ChannelState.DISCONNECTED


_HANDLERS: dict[type, Callable[[MqttSnChannel, Any, float], None]] = {
    codec.Connect: MqttSnChannel.on_connect,
    codec.WillTopic: MqttSnChannel.on_will_topic,
    codec.WillMsg: MqttSnChannel.on_will_message,
    codec.Publish: MqttSnChannel.on_publish,
    codec.Pubrel: MqttSnChannel.on_pubrel,
    codec.Register: MqttSnChannel.on_register,
    codec.Regack: MqttSnChannel.on_regack,
    codec.Subscribe: MqttSnChannel.on_subscribe,
    codec.Unsubscribe: MqttSnChannel.on_unsubscribe,
    codec.Pingreq: MqttSnChannel.on_pingreq,
    codec.Disconnect: MqttSnChannel.on_disconnect,
    codec.WillTopicUpd: MqttSnChannel.on_will_topic_update,
    codec.WillMsgUpd: MqttSnChannel.on_will_message_update,
    codec.Puback: MqttSnChannel.on_puback,
    codec.Pubrec: MqttSnChannel.on_pubrec,
    codec.Pubcomp: MqttSnChannel.on_pubcomp,
}
