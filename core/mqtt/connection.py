"""The server side of one MQTT connection, pure: bytes in, broker calls and bytes out (MQTT 5.0 §3, §4).

The adapter (TCP, TLS or WebSocket) feeds :meth:`MqttConnection.data_received`, reports
:meth:`MqttConnection.connection_lost`, and arms a timer at the deadline :meth:`check_keepalive` returns.
The connection writes through the injected :class:`Transport`; it never touches a socket or the clock.

Bad input (§4.13): a malformed packet or a protocol violation closes the connection, with a DISCONNECT
carrying the reason code for v5 clients (a CONNACK when it happens before the session exists), one log line
naming the client, peer and cause, a counter, and the will published as for any abnormal loss.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import replace
from enum import Enum
from typing import Protocol

from core.broker.broker import Broker
from core.broker.session import NEVER_EXPIRES, Session
from core.broker.types import ClientInfo, Credentials, Message, Subscription, Will
from core.logging import client_fields
from core.mqtt.codec import (
    EMPTY_PROPERTIES,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    StreamDecoder,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    encode,
    encode_properties,
    encode_publish,
)
from core.mqtt.numbers import ReasonCode
from core.topics import validate_topic

__all__ = ["ConnectionState", "MqttConnection", "Transport"]

log = logging.getLogger("mqgate.mqtt")

CONNECT_TIMEOUT = 30.0
_PINGRESP = b"\xd0\x00"
_PUBACK = 0x4002
_PUBREC = 0x5002
_PUBREL = 0x6202
_PUBCOMP = 0x7002


class ConnectionState(Enum):
    """Where a connection is in its life (MQTT 5.0 §3.1.4, §4.1)."""

    AWAITING_CONNECT = "awaiting CONNECT"
    CONNECTED = "connected"
    CLOSED = "closed"


class Transport(Protocol):
    """What the adapter gives the connection to write with."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    @property
    def congested(self) -> bool:
        """The peer is not reading: its write buffer is over the high-water mark."""
        ...


def _packet_id_offset(data: bytes) -> int:
    """Where the packet id of an encoded QoS 1/2 PUBLISH starts (after the fixed header and topic)."""
    pos = 1
    while data[pos] & 0x80:
        pos += 1
    pos += 1
    return pos + 2 + ((data[pos] << 8) | data[pos + 1])


def _ack(kind: int, packet_id: int) -> bytes:
    return ((kind << 16) | packet_id).to_bytes(4, "big")


class MqttConnection:
    """One client connection bound to a broker session once CONNECT succeeds."""

    def __init__(
        self, broker: Broker, transport: Transport, peer: str, now: float, peer_cert: bytes | None = None
    ) -> None:
        self.broker = broker
        self.transport = transport
        self.peer = peer
        self.peer_cert = peer_cert
        self.client: ClientInfo | None = None  # who authenticated, once CONNECT succeeds
        self.state = ConnectionState.AWAITING_CONNECT
        self.version = 4
        self.client_id = ""
        self.session: Session | None = None
        self.keepalive = 0
        self.last_seen = now
        self.opened_at = now
        self.decoder = StreamDecoder(broker.config.max_packet_size)
        self._problem_info = True
        self._client_max_packet = 0
        self._alias_max_out = 0
        self._aliases_in: dict[int, str] = {}
        self._aliases_out: dict[str, int] = {}
        self._early: list[bytes] | None = None
        self._stream_started = False
        self._handlers = {
            Publish: self._on_publish,
            Puback: self._on_puback,
            Pubrec: self._on_pubrec,
            Pubrel: self._on_pubrel,
            Pubcomp: self._on_pubcomp,
            Subscribe: self._on_subscribe,
            Unsubscribe: self._on_unsubscribe,
            Pingreq: self._on_pingreq,
            Disconnect: self._on_disconnect,
            Connect: self._on_connect,
        }

    # --- input

    def data_received(self, data: bytes, now: float) -> None:
        """Handle every complete packet in ``data``; a decoding error closes after the packets before it."""
        if self.state is ConnectionState.CLOSED:
            return
        self.last_seen = now
        metrics = self.broker.metrics
        if not self._stream_started and data:
            self._stream_started = True
            if data[0] != 0x10:  # the first packet must be CONNECT (§3.1): no need to wait for its body
                metrics.malformed_packets += 1
                log.warning(
                    "connection from %s did not start with CONNECT (first byte 0x%02x), closing",
                    self.peer,
                    data[0],
                    extra=client_fields(None, self.peer, "mqtt"),
                )
                self._close(now, publish_will=False)
                return
        metrics.bytes_received += len(data)
        decoder = self.decoder
        packets = decoder.feed(data)
        metrics.packets_received += len(packets)
        handlers = self._handlers
        closed = ConnectionState.CLOSED
        for packet in packets:
            handler = handlers.get(type(packet))
            if handler is None:
                self._violation(ReasonCode.PROTOCOL_ERROR, f"unexpected {type(packet).__name__}", now)
                return
            handler(packet, now)  # type: ignore[operator]
            if self.state is closed:
                return
        if decoder.error is not None:
            metrics.malformed_packets += 1
            self._violation(decoder.error.code, str(decoder.error), now, counted=True)

    def connection_lost(self, now: float) -> None:
        """The transport closed without DISCONNECT (or after we closed it): the will applies (§3.1.2.5)."""
        if self.state is ConnectionState.CLOSED:
            return
        self.state = ConnectionState.CLOSED
        if self.session is not None:
            log.info(
                "client %s (%s) connection lost",
                self.client_id,
                self.peer,
                extra=client_fields(self.client_id, self.peer, "mqtt"),
            )
            self.broker.connection_lost(self.session, publish_will=True, now=now)
            self.session = None

    def check_keepalive(self, now: float) -> float | None:
        """Close a connection silent for 1.5 times its keepalive (§3.1.2.10); returns the next deadline."""
        if self.state is ConnectionState.CLOSED:
            return None
        if self.state is ConnectionState.AWAITING_CONNECT:
            deadline = self.opened_at + CONNECT_TIMEOUT
            if now >= deadline:
                log.info(
                    "connection from %s sent no CONNECT in %.0f s, closing",
                    self.peer,
                    CONNECT_TIMEOUT,
                    extra=client_fields(None, self.peer, "mqtt"),
                )
                self._close(now, publish_will=False)
                return None
            return deadline
        if not self.keepalive:
            return None
        deadline = self.last_seen + self.keepalive * 1.5
        if now < deadline:
            return deadline
        self.broker.metrics.keepalive_timeouts += 1
        log.info(
            "client %s (%s) keepalive timeout after %d s",
            self.client_id,
            self.peer,
            self.keepalive,
            extra=client_fields(self.client_id, self.peer, "mqtt"),
        )
        self._send_disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT, "keepalive timeout")
        self._close(now, publish_will=True)
        return None

    # --- CONNECT

    def _on_connect(self, p: Connect, now: float) -> None:
        if self.state is not ConnectionState.AWAITING_CONNECT:
            self._violation(ReasonCode.PROTOCOL_ERROR, "second CONNECT", now)
            return
        config = self.broker.config
        self.version = p.protocol_version
        props = p.properties
        self._problem_info = props.request_problem_information != 0
        client_id = p.client_id
        assigned = None
        if props.authentication_method is not None:
            self._refuse(ReasonCode.BAD_AUTHENTICATION_METHOD, "enhanced authentication is not supported")
            return
        if not client_id:
            if self.version < 5 and not p.clean_start:
                self._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "empty client id with clean session 0")
                return
            client_id = assigned = "mqgate-" + secrets.token_hex(8)
        if len(client_id) > config.max_clientid_len:
            self._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "client id too long")
            return
        will = None
        if p.will is not None:
            why = validate_topic(p.will.topic, config.max_topic_levels)
            if why is not None:
                self._refuse(ReasonCode.TOPIC_NAME_INVALID, f"will topic: {why}")
                return
            if p.will.retain and not config.retain_available:
                self._refuse(ReasonCode.RETAIN_NOT_SUPPORTED, "retained will not supported")
                return
            will_props = p.will.properties
            will = Will(
                p.will.topic,
                p.will.payload,
                p.will.qos,
                p.will.retain,
                replace(will_props, will_delay_interval=None)
                if will_props.will_delay_interval is not None
                else will_props,
                will_props.will_delay_interval or 0,
            )
        self.client_id = client_id
        self.keepalive = config.server_keepalive or p.keepalive
        if self.version == 5:
            expiry = props.session_expiry_interval or 0
            self._client_max_packet = props.maximum_packet_size or 0
            self._alias_max_out = props.topic_alias_maximum or 0
        else:
            expiry = 0 if p.clean_start else NEVER_EXPIRES
        max_inflight = min(config.max_inflight, props.receive_maximum or 65535)
        self.decoder.version = self.version
        access = self.broker.access
        client = access.identify(
            ClientInfo(client_id, "mqtt", self.peer, p.username, self.version, peer_cert=self.peer_cert)
        )
        code = access.authenticate(client, Credentials(p.username, p.password))
        if code:
            self._refuse(code, "banned" if code == ReasonCode.BANNED else "not authorised")
            return
        self.client = client
        self.client_id = client_id = client.client_id
        self._early = []
        self.session, present = self.broker.open_session(
            client,
            clean_start=p.clean_start,
            expiry=expiry,
            will=will,
            sink=self,
            max_inflight=max_inflight,
            now=now,
        )
        self.state = ConnectionState.CONNECTED
        connack_props = EMPTY_PROPERTIES
        if self.version == 5:
            connack_props = Properties(
                session_expiry_interval=config.max_session_expiry
                if expiry > config.max_session_expiry
                else None,
                assigned_client_identifier=assigned,
                server_keep_alive=config.server_keepalive or None,
                receive_maximum=config.max_awaiting_rel if config.max_awaiting_rel < 65535 else None,
                topic_alias_maximum=config.max_topic_alias or None,
                maximum_packet_size=config.max_packet_size,
                retain_available=None if config.retain_available else 0,
                wildcard_subscription_available=None if config.wildcard_subscription else 0,
                shared_subscription_available=None if config.shared_subscription else 0,
            )
        early, self._early = self._early, None  # CONNACK first, then what the session resent (§3.2)
        self._write(encode(Connack(present, 0, connack_props), self.version))
        for data in early:
            self._write(data)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "client %s (%s) connected, v%d, clean_start=%s",
                client_id,
                self.peer,
                self.version,
                p.clean_start,
                extra=client_fields(client_id, self.peer, "mqtt"),
            )

    def _refuse(self, code: int, reason: str) -> None:
        """CONNACK with a failure code, then close (§3.2.2.2)."""
        log.warning(
            "refused CONNECT of %r from %s: %s",
            self.client_id or "-",
            self.peer,
            reason,
            extra=client_fields(self.client_id, self.peer, "mqtt"),
        )
        props = (
            Properties(reason_string=reason) if self.version == 5 and self._problem_info else EMPTY_PROPERTIES
        )
        self._write(encode(Connack(False, code, props), self.version))
        self.state = ConnectionState.CLOSED
        self.transport.close()

    # --- PUBLISH in

    def _on_publish(self, p: Publish, now: float) -> None:
        if self.state is not ConnectionState.CONNECTED:
            self._violation(ReasonCode.PROTOCOL_ERROR, "PUBLISH before CONNECT", now)
            return
        broker = self.broker
        topic = p.topic
        props = p.properties
        expires_at = None
        if props is not EMPTY_PROPERTIES:
            alias = props.topic_alias
            if alias is not None:
                if alias > broker.config.max_topic_alias:
                    self._violation(
                        ReasonCode.TOPIC_ALIAS_INVALID, f"topic alias {alias} over the maximum", now
                    )
                    return
                if topic:
                    self._aliases_in[alias] = topic
                else:
                    known = self._aliases_in.get(alias)
                    if known is None:
                        self._violation(ReasonCode.PROTOCOL_ERROR, f"unknown topic alias {alias}", now)
                        return
                    topic = known
            if alias is not None or props.subscription_identifiers:
                props = replace(props, topic_alias=None, subscription_identifiers=())
                if props == EMPTY_PROPERTIES:
                    props = EMPTY_PROPERTIES
            if props.message_expiry_interval is not None:
                expires_at = now + props.message_expiry_interval
        if "+" in topic or "#" in topic or not topic:
            self._violation(ReasonCode.TOPIC_NAME_INVALID, f"invalid topic name {topic!r}", now)
            return
        if p.retain and not broker.config.retain_available:
            self._violation(ReasonCode.RETAIN_NOT_SUPPORTED, "retain is not supported", now)
            return
        qos = p.qos
        if topic.startswith("$SYS"):
            log.info(
                "client %s (%s) may not publish to %s",
                self.client_id,
                self.peer,
                topic,
                extra=client_fields(self.client_id, self.peer, "mqtt"),
            )
            if qos:
                self._ack_publish(p, ReasonCode.NOT_AUTHORIZED)
            return
        access = broker.access
        if access.checks_enabled:
            assert self.client is not None
            original = topic
            topic, allowed = access.check_publish(self.client, topic)
            if not allowed:
                log.info(
                    "client %s (%s) may not publish to %s",
                    self.client_id,
                    self.peer,
                    original,
                    extra=client_fields(self.client_id, self.peer, "mqtt"),
                )
                if qos:  # v5: PUBACK/PUBREC 0x87; v3 has no code: acknowledged and dropped (as mosquitto)
                    self._ack_publish(p, ReasonCode.NOT_AUTHORIZED)
                return
            if topic != original and validate_topic(topic, broker.config.max_topic_levels) is not None:
                log.info(
                    "client %s (%s): %s rewritten to the invalid %r",
                    self.client_id,
                    self.peer,
                    original,
                    topic,
                    extra=client_fields(self.client_id, self.peer, "mqtt"),
                )
                if qos:
                    self._ack_publish(p, ReasonCode.TOPIC_NAME_INVALID)
                return
        if qos == 2:
            awaiting = self.session.awaiting_rel  # type: ignore[union-attr]
            if p.packet_id in awaiting:
                # A resend (DUP) is answered again without a second delivery (§4.3.3, method A).
                code = 0 if p.dup or self.version < 5 else ReasonCode.PACKET_IDENTIFIER_IN_USE
                self._write(_ack(_PUBREC, p.packet_id) if not code else encode(Pubrec(p.packet_id, code), 5))
                return
            if len(awaiting) >= broker.config.max_awaiting_rel:
                self._violation(
                    ReasonCode.RECEIVE_MAXIMUM_EXCEEDED, "too many QoS 2 messages awaiting PUBREL", now
                )
                return
            awaiting.add(p.packet_id)
        message = Message(topic, p.payload, qos, p.retain, self.client_id, props, expires_at)
        if p.wire is not None and p.properties is EMPTY_PROPERTIES and not p.dup and topic == p.topic:
            message.wire = {(self.version == 5, qos, p.retain, False): p.wire}  # forwarded as received
        matched = broker.publish(message, now)
        if qos:
            self._ack_publish(p, 0 if matched or self.version < 5 else ReasonCode.NO_MATCHING_SUBSCRIBERS)

    def _ack_publish(self, p: Publish, code: int) -> None:
        if not code:
            self._write(_ack(_PUBACK if p.qos == 1 else _PUBREC, p.packet_id))
        elif self.version == 5:
            ack = Puback(p.packet_id, code) if p.qos == 1 else Pubrec(p.packet_id, code)
            self._write(encode(ack, 5))
        else:
            self._write(_ack(_PUBACK if p.qos == 1 else _PUBREC, p.packet_id))

    def _on_pubrel(self, p: Pubrel, now: float) -> None:
        if self.session is None:
            self._violation(ReasonCode.PROTOCOL_ERROR, "PUBREL before CONNECT", now)
            return
        awaiting = self.session.awaiting_rel
        if p.packet_id in awaiting:
            awaiting.discard(p.packet_id)
            self._write(_ack(_PUBCOMP, p.packet_id))
        elif self.version == 5:
            self._write(encode(Pubcomp(p.packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND), 5))
        else:
            self._write(_ack(_PUBCOMP, p.packet_id))

    # --- acks of deliveries

    def _on_puback(self, p: Puback, now: float) -> None:
        session = self.session
        if session is None:
            self._violation(ReasonCode.PROTOCOL_ERROR, "PUBACK before CONNECT", now)
            return
        if not session.puback(p.packet_id, now):
            log.debug(
                "client %s acknowledged unknown packet id %d",
                self.client_id,
                p.packet_id,
                extra=client_fields(self.client_id, self.peer, "mqtt"),
            )

    def _on_pubrec(self, p: Pubrec, now: float) -> None:
        session = self.session
        if session is None:
            self._violation(ReasonCode.PROTOCOL_ERROR, "PUBREC before CONNECT", now)
            return
        if p.reason_code >= 0x80:
            session.drop_failed(p.packet_id, now)
        elif session.pubrec(p.packet_id):
            self._write(_ack(_PUBREL, p.packet_id))
        elif self.version == 5:
            self._write(encode(Pubrel(p.packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND), 5))
        else:
            self._write(_ack(_PUBREL, p.packet_id))

    def _on_pubcomp(self, p: Pubcomp, now: float) -> None:
        session = self.session
        if session is None:
            self._violation(ReasonCode.PROTOCOL_ERROR, "PUBCOMP before CONNECT", now)
            return
        session.pubcomp(p.packet_id, now)

    # --- subscriptions

    def _on_subscribe(self, p: Subscribe, now: float) -> None:
        session = self.session
        if session is None:
            self._violation(ReasonCode.PROTOCOL_ERROR, "SUBSCRIBE before CONNECT", now)
            return
        broker = self.broker
        sub_id = p.properties.subscription_identifiers[0] if p.properties.subscription_identifiers else 0
        codes: list[int] = []
        retained: list[tuple[Message, Subscription]] = []
        for request in p.subscriptions:
            if request.no_local and request.topic_filter.startswith(("$share/", "$queue/")):
                self._violation(ReasonCode.PROTOCOL_ERROR, "no local on a shared subscription", now)
                return
            sub = Subscription(
                request.topic_filter,
                request.qos,
                request.no_local,
                request.retain_as_published,
                request.retain_handling,
                sub_id,
            )
            code, messages = broker.subscribe(session, sub, now)
            if code >= 0x80:
                log.info(
                    "client %s (%s) subscription to %r refused: 0x%02x",
                    self.client_id,
                    self.peer,
                    request.topic_filter,
                    code,
                    extra=client_fields(self.client_id, self.peer, "mqtt"),
                )
            codes.append(code)
            retained.extend((m, sub) for m in messages)
        self._write(encode(Suback(p.packet_id, tuple(codes)), self.version))
        for message, sub in retained:
            session.deliver_retained(message, sub)

    def _on_unsubscribe(self, p: Unsubscribe, now: float) -> None:
        session = self.session
        if session is None:
            self._violation(ReasonCode.PROTOCOL_ERROR, "UNSUBSCRIBE before CONNECT", now)
            return
        codes = tuple(
            0 if self.broker.unsubscribe(session, f) else ReasonCode.NO_SUBSCRIPTION_EXISTED
            for f in p.topic_filters
        )
        self._write(encode(Unsuback(p.packet_id, codes), self.version))

    def _on_pingreq(self, p: Pingreq, now: float) -> None:
        if self.state is not ConnectionState.CONNECTED:
            self._violation(ReasonCode.PROTOCOL_ERROR, "PINGREQ before CONNECT", now)
            return
        self._write(_PINGRESP)

    def _on_disconnect(self, p: Disconnect, now: float) -> None:
        session = self.session
        if session is None:
            self._violation(ReasonCode.PROTOCOL_ERROR, "DISCONNECT before CONNECT", now)
            return
        expiry = p.properties.session_expiry_interval
        if expiry is not None:
            if session.expiry_interval == 0 and expiry:
                self._violation(ReasonCode.PROTOCOL_ERROR, "session expiry set on DISCONNECT after 0", now)
                return
            session.expiry_interval = min(expiry, self.broker.config.max_session_expiry)
        self._close(now, publish_will=p.reason_code == ReasonCode.DISCONNECT_WITH_WILL)

    # --- DeliverySink

    def deliver(
        self, message: Message, qos: int, packet_id: int, dup: bool, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        """Write one PUBLISH, encoded once per variant and shared by subscribers (DESIGN §6)."""
        if qos == 0 and self.transport.congested:
            self.broker.metrics.dropped_slow_consumer += 1
            return
        v5 = self.version == 5
        if v5 and (sub_ids or message.expires_at is not None or self._alias_max_out):
            data = self._encode_v5_publish(message, qos, packet_id, dup, retain, sub_ids)
        else:
            wire = message.wire
            if wire is None:
                wire = message.wire = {}
            key = (v5, qos, retain, dup)
            parts = wire.get(key)
            if parts is None:
                full = encode_publish(
                    message.topic.encode(),
                    message.payload,
                    qos,
                    retain,
                    dup,
                    0,
                    encode_properties(message.properties) if v5 else None,
                )
                if qos:
                    offset = _packet_id_offset(full)
                    parts = wire[key] = (full[:offset], full[offset + 2 :])
                else:
                    parts = wire[key] = (full, b"")
            data = parts[0] + packet_id.to_bytes(2, "big") + parts[1] if qos else parts[0]
        if self._client_max_packet and len(data) > self._client_max_packet:
            self.broker.metrics.dropped_too_large += 1
            if qos and self.session is not None:
                self.session.inflight.pop(packet_id, None)
            return
        self._write(data)

    def _encode_v5_publish(
        self, message: Message, qos: int, packet_id: int, dup: bool, retain: bool, sub_ids: tuple[int, ...]
    ) -> bytes:
        """A PUBLISH with per-subscriber properties: subscription ids, remaining expiry, topic alias."""
        topic = message.topic
        alias = None
        if self._alias_max_out:
            alias = self._aliases_out.get(topic)
            if alias is not None:
                topic = ""
            elif len(self._aliases_out) < self._alias_max_out:
                alias = self._aliases_out[topic] = len(self._aliases_out) + 1
        expiry = None
        if message.expires_at is not None and self.session is not None:
            expiry = max(0, int(message.expires_at - self.last_seen + 0.999))
            original = message.properties.message_expiry_interval
            if original is not None and expiry > original:  # last_seen is older than the message
                expiry = original
        props = message.properties
        if sub_ids or alias is not None or expiry is not None:
            props = replace(
                props,
                subscription_identifiers=sub_ids,
                topic_alias=alias,
                message_expiry_interval=expiry if expiry is not None else props.message_expiry_interval,
            )
        return encode_publish(
            topic.encode(), message.payload, qos, retain, dup, packet_id, encode_properties(props)
        )

    def deliver_pubrel(self, packet_id: int) -> None:
        self._write(_ack(_PUBREL, packet_id))

    def kick(self, reason_code: int) -> None:
        """The broker ends this connection (takeover, administrative action, shutdown)."""
        if self.state is ConnectionState.CLOSED:
            return
        log.info(
            "client %s (%s) disconnected by the broker: %s",
            self.client_id,
            self.peer,
            ReasonCode(reason_code).name.lower(),
            extra=client_fields(self.client_id, self.peer, "mqtt"),
        )
        self._send_disconnect(reason_code, ReasonCode(reason_code).name.lower().replace("_", " "))
        self.state = ConnectionState.CLOSED
        self.session = None
        self.transport.close()

    def shutdown(self, reason_code: int, now: float) -> None:
        """Close as the server stops: DISCONNECT 0x8B to v5 clients, sessions detached, no will."""
        if self.state is ConnectionState.CLOSED:
            return
        self._send_disconnect(reason_code, "server shutting down")
        self._close(now, publish_will=False)

    # --- output and closing

    def _write(self, data: bytes) -> None:
        early = self._early
        if early is not None:
            early.append(data)
            return
        metrics = self.broker.metrics
        metrics.packets_sent += 1
        metrics.bytes_sent += len(data)
        self.transport.write(data)

    def _send_disconnect(self, code: int, reason: str) -> None:
        if self.version == 5 and self.state is ConnectionState.CONNECTED:
            props = Properties(reason_string=reason) if self._problem_info else EMPTY_PROPERTIES
            self._write(encode(Disconnect(code, props), 5))

    def _violation(self, code: int, reason: str, now: float, *, counted: bool = False) -> None:
        """Close on a malformed packet or protocol violation, with the reason code for v5 (§4.13)."""
        if not counted:
            self.broker.metrics.protocol_errors += 1
        log.warning(
            "client %s (%s): %s (reason 0x%02x), closing",
            self.client_id or "-",
            self.peer,
            reason,
            code,
            extra=client_fields(self.client_id, self.peer, "mqtt"),
        )
        if self.state is ConnectionState.AWAITING_CONNECT:
            if code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
                self._write(encode(Connack(False, code), 4))
            elif self.version == 5:
                self._write(encode(Connack(False, code), 5))
        else:
            self._send_disconnect(code, reason)
        self._close(now, publish_will=True)

    def _close(self, now: float, *, publish_will: bool) -> None:
        self.state = ConnectionState.CLOSED
        session, self.session = self.session, None
        if session is not None:
            self.broker.connection_lost(session, publish_will=publish_will, now=now)
        self.transport.close()

    @property
    def is_closed(self) -> bool:
        return self.state is ConnectionState.CLOSED
