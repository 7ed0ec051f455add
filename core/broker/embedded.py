"""The embedded implementation of the gateway broker interface (:mod:`gateways.base`): in-process calls into
the core :class:`Broker`, no sockets and no re-encoding."""

from __future__ import annotations

import logging
from collections.abc import Callable

from core.broker.broker import Broker
from core.broker.session import Session
from core.broker.types import AuthResult, ClientInfo, Credentials, DeliverySink, Message, Subscription, Will
from core.clock import Clock
from core.logging import client_fields
from core.mqtt.numbers import ReasonCode
from core.topics import validate_topic

log = logging.getLogger("mqgate.broker")

__all__ = ["EmbeddedBroker", "EmbeddedSession"]


class EmbeddedSession:
    """A gateway device's session on the embedded broker."""

    __slots__ = ("_broker", "_clock", "_closed", "_present", "_session")

    def __init__(self, broker: Broker, session: Session, present: bool, clock: Clock) -> None:
        self._broker = broker
        self._session = session
        self._present = present
        self._clock = clock
        self._closed = False

    @property
    def present(self) -> bool:
        return self._present

    @property
    def session(self) -> Session:
        return self._session

    def publish(self, message: Message) -> int:
        why = validate_topic(message.topic, self._broker.config.max_topic_levels)
        if why is not None:
            return ReasonCode.TOPIC_NAME_INVALID
        if message.retain and not self._broker.config.retain_available:
            return ReasonCode.RETAIN_NOT_SUPPORTED
        access = self._broker.access
        if access.checks_enabled:
            topic, allowed = access.check_publish(self._session.client, message.topic)
            if not allowed:
                log.info(
                    "client %s may not publish to %s",
                    self._session.client_id,
                    message.topic,
                    extra=client_fields(
                        self._session.client_id, self._session.client.peer, self._session.client.protocol
                    ),
                )
                return ReasonCode.NOT_AUTHORIZED
            if topic != message.topic:
                if validate_topic(topic, self._broker.config.max_topic_levels) is not None:
                    return ReasonCode.TOPIC_NAME_INVALID
                message.topic = topic
        message.sender = self._session.client_id
        matched = self._broker.publish(message, self._clock.now())
        return 0 if matched else ReasonCode.NO_MATCHING_SUBSCRIBERS

    def subscribe(self, subscriptions: list[Subscription]) -> list[int]:
        now = self._clock.now()
        codes = []
        retained: list[tuple[Message, Subscription]] = []
        for sub in subscriptions:
            code, messages = self._broker.subscribe(self._session, sub, now)
            codes.append(code)
            retained.extend((m, sub) for m in messages)
        for message, sub in retained:
            self._session.deliver_retained(message, sub)
        return codes

    def unsubscribe(self, filters: list[str]) -> list[int]:
        return [
            0 if self._broker.unsubscribe(self._session, f) else ReasonCode.NO_SUBSCRIPTION_EXISTED
            for f in filters
        ]

    def ack(self, packet_id: int) -> None:
        session = self._session
        entry = session.inflight.get(packet_id)
        if entry is None:
            return
        if entry.qos == 1:
            session.puback(packet_id, self._clock.now())
        else:
            session.pubcomp(packet_id, self._clock.now())

    def received(self, packet_id: int) -> None:
        self._session.pubrec(packet_id)

    def set_will(self, will: Will | None) -> None:
        self._session.will = will

    def read_retained(self, topic: str) -> Message | None:
        access = self._broker.access
        if access.checks_enabled:  # reading a retained message is subscribing to its topic once
            topic, allowed = access.check_subscribe(self._session.client, topic)
            if not allowed:
                log.info(
                    "client %s may not read %s",
                    self._session.client_id,
                    topic,
                    extra=client_fields(
                        self._session.client_id, self._session.client.peer, self._session.client.protocol
                    ),
                )
                return None
        message = self._broker.retained.get(topic)
        if message is not None and message.expires_at is not None and message.expires_at <= self._clock.now():
            return None
        return message

    def pending(self) -> int:
        return len(self._session.queue) + len(self._session.inflight)

    def park(self) -> None:
        self._session.parked = True

    def resume(self) -> None:
        session = self._session
        session.parked = False
        session.resend_inflight()
        session.drain(self._clock.now())

    def close(self, *, publish_will: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._session.sink is not None:
            self._broker.connection_lost(self._session, publish_will=publish_will, now=self._clock.now())


class EmbeddedBroker:
    """Serves :class:`gateways.base.Broker` from the in-process core broker."""

    def __init__(self, broker: Broker, clock: Clock) -> None:
        self.broker = broker
        self.clock = clock

    def settle(self, then: Callable[[bool], None]) -> None:
        """Settled at once: a publish is routed when it is accepted."""
        then(True)

    async def authenticate(self, client: ClientInfo, credentials: Credentials) -> AuthResult:
        """The broker's authentication chain (``[auth]``), as for MQTT clients (a DTLS client certificate
        gives the user name or client id with ``peer_cert_as_username``/``peer_cert_as_clientid``)."""
        access = self.broker.access
        return AuthResult(access.authenticate(access.identify(client), credentials))

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
    ) -> EmbeddedSession:
        session, present = self.broker.open_session(
            self.broker.access.identify(client),
            clean_start=clean_start,
            expiry=expiry,
            will=will,
            sink=sink,
            max_inflight=max_inflight,
            now=self.clock.now(),
        )
        return EmbeddedSession(self.broker, session, present, self.clock)
