"""Gateway-only edge mode: the broker interface of :mod:`gateways.base` served by an upstream MQTT broker
(mosquitto, EMQX, a cluster) instead of the embedded one.

Two modes (``upstream.mode``):

- ``transparent``: one upstream MQTT connection per device session, with the device's client id (plus
  ``clientid_prefix``), clean session, keepalive and will, so that the upstream broker publishes the will when
  the device is lost (the gateway drops that connection without DISCONNECT).
- ``aggregating``: one shared upstream connection for every device; deliveries are demultiplexed to devices
  through a local topic trie of their subscriptions, and the gateway publishes wills itself. Every device's
  SUBSCRIBE goes upstream, also for a filter the connection already has: the upstream broker then replaces
  the subscription and sends the filter's retained messages again (MQTT 3.1.1 §3.8.4, 5.0 §3.8.4 with
  Retain Handling 0). Those arrive after its SUBACK with the retain flag set (only retained messages sent
  for a subscription carry it, §3.3.1.3), and go only to the device whose SUBSCRIBE that SUBACK answered,
  so each subscribing device gets the retained messages once and the others none again.

Store-and-forward: every QoS 1/2 message from a device goes into a bounded sqlite queue
(:class:`core.store.MessageStore`, ``upstream.buffer_dir``, ``upstream.max_buffer_bytes``); a forwarder sends
each stream upstream in order within the connection's window and discards a message once the upstream
broker acknowledged it. The device is acknowledged once its message is *settled*
(:meth:`UpstreamBroker.settle`): acknowledged by the upstream broker, or committed to the buffer, whichever
comes first. The commit waits ``upstream.commit_delay`` seconds (10 ms by default): with the upstream up, the
upstream PUBACK nearly always comes first and the message is never written to the file (the store writes
nothing before a commit, and a message discarded before it is dropped from memory); with the upstream slow or
down, one commit makes every message of those milliseconds durable (one ``executemany``, see
:mod:`core.store`). ``commit_delay = 0`` commits before every answer. Either way an outage, or mqgate
restarting, loses nothing that was acknowledged to a device. Deletions of committed messages ride on the next
commit (or one within :data:`DELETE_COMMIT_DELAY`). The guarantee is against the process dying (crash,
``SIGKILL``, restart): the store runs sqlite in WAL mode with ``synchronous=NORMAL``, so a commit is written
to the OS but not fsync'ed; a power loss or OS crash may lose the last commits (see :mod:`core.store`). A
full buffer answers new QoS 1/2 publishes with 0x97 (quota exceeded: MQTT-SN rc 0x01, CoAP 5.03). QoS 0
during an outage is dropped and counted.

Each device keeps a local :class:`core.broker.session.Session` for deliveries (inflight window, bounded
queue, sleep), exactly as on the embedded broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial

from core.broker.metrics import BrokerMetrics
from core.broker.session import Session
from core.broker.types import AuthResult, ClientInfo, Credentials, DeliverySink, Message, Subscription, Will
from core.clock import Clock
from core.config import UpstreamConfig, parse_url
from core.errors import ProtocolError
from core.logging import client_fields
from core.mqtt.client import ClientState, MqttClient, UpstreamRefused, tls_context
from core.mqtt.codec import (
    EMPTY_PROPERTIES,
    Publish,
    SubscriptionRequest,
    WillSpec,
    decode_publish_properties,
    encode_properties,
)
from core.mqtt.numbers import ReasonCode
from core.store import MessageStore, StoreError
from core.topics import TopicTrie, filter_matches, validate_topic
from gateways.base import SessionRefused

__all__ = ["Forwarder", "UpstreamBroker", "UpstreamSession"]

log = logging.getLogger("mqgate.upstream")

_PEEK = 64
DELETE_COMMIT_DELAY = 1.0
"""Seconds the deletion of delivered messages may wait for a commit when no append comes to carry it: a
crash within them brings those messages back at the next start (sent twice: QoS 1 allows it)."""
_AGGREGATE_STREAM = "*"
_TIMER_SLACK = 0.001
"""A commit due within this many seconds is made now: loop timers (uvloop's in whole milliseconds) may fire
that much early."""


class Forwarder:
    """Sends one stream of the store upstream through one client, in order, within the client's window;
    ``delivered(id)`` is told of each message the upstream broker has acknowledged (or refused)."""

    __slots__ = ("_cursor", "_unacked", "client", "delivered", "metrics", "store", "stream")

    def __init__(
        self,
        store: MessageStore,
        stream: str,
        client: MqttClient,
        metrics: BrokerMetrics,
        delivered: Callable[[int], None],
    ) -> None:
        self.store = store
        self.stream = stream
        self.client = client
        self.metrics = metrics
        self.delivered = delivered
        self._cursor = 0  # the last id handed to the client
        self._unacked: set[int] = set()

    def pump(self) -> None:
        """Hand the client what it can take now (it calls ``on_writable`` when it can take more)."""
        client = self.client
        while client.connected:
            room = min(_PEEK, client.window - client.inflight)  # read no more rows than can be sent now
            if room <= 0 or self.store.count(self.stream) <= len(self._unacked):  # all of them in flight
                return
            batch = self.store.peek(self.stream, room, after_id=self._cursor)
            if not batch:
                return
            for stored in batch:
                sent = client.publish(
                    stored.topic,
                    stored.payload,
                    stored.qos,
                    stored.retain,
                    decode_publish_properties(stored.properties),
                    on_done=partial(self._done, stored.id),
                )
                if not sent:
                    return
                self._cursor = stored.id
                self._unacked.add(stored.id)

    def _done(self, stored_id: int, code: int | None) -> None:
        self._unacked.discard(stored_id)
        if code is None:  # not delivered: resend from there, in order
            self._cursor = min(self._cursor, stored_id - 1)
            return
        if code >= 0x80:
            self.metrics.dropped_too_large += 1  # refused upstream: counted and not retried
            log.warning("upstream refused a buffered message of %s: reason 0x%02x", self.stream, code)
        self.delivered(stored_id)
        self.pump()


class UpstreamSession:
    """A device's session in edge mode (:class:`gateways.base.SessionHandle`)."""

    def __init__(
        self,
        broker: UpstreamBroker,
        client: ClientInfo,
        local: Session,
        will: Will | None,
        stream: str,
        connection: MqttClient | None,
        present: bool = False,
    ) -> None:
        self.broker = broker
        self.client = client
        self.local = local
        self.will = will
        self.stream = stream
        self.connection = connection  # transparent mode: the device's own upstream connection
        self.forwarder: Forwarder | None = None
        self.retained_filters: set[str] = set()
        """Aggregating: the filters whose retained messages arriving now are this device's (see the module
        docstring)."""
        self._present = present
        self.closed = False

    @property
    def present(self) -> bool:
        return self._present

    def publish(self, message: Message) -> int:
        if validate_topic(message.topic) is not None:
            return ReasonCode.TOPIC_NAME_INVALID
        message.sender = self.client.client_id
        self.local.count_received(message)
        return self.broker.forward(self, message)

    def subscribe(self, subscriptions: list[Subscription]) -> list[int]:
        codes = []
        for sub in subscriptions:
            self.local.subscriptions[sub.topic_filter] = sub
            self.broker.subscribed(self, sub)
            codes.append(sub.qos)
        return codes

    def unsubscribe(self, filters: list[str]) -> list[int]:
        codes: list[int] = []
        for topic_filter in filters:
            if self.local.subscriptions.pop(topic_filter, None) is None:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
                continue
            self.broker.unsubscribed(self, topic_filter)
            codes.append(0)
        return codes

    def ack(self, packet_id: int) -> None:
        entry = self.local.inflight.get(packet_id)
        now = self.broker.clock.now()
        if entry is not None and entry.qos == 2:
            self.local.pubrec(packet_id)
            self.local.pubcomp(packet_id, now)
        else:
            self.local.puback(packet_id, now)

    def received(self, packet_id: int) -> None:
        self.local.pubrec(packet_id)

    def set_will(self, will: Will | None) -> None:
        """Transparent: the upstream connection is replaced by one carrying the new will (MQTT sets a will
        only in CONNECT, §3.1.2.5; see :meth:`MqttClient.set_will`). The device's buffered messages go on
        in order from the forwarder's cursor; a device with a clean session is subscribed again, so its
        retained messages come again."""
        self.will = will
        if self.connection is not None:
            self.connection.set_will(_will_spec(will))

    def read_retained(self, topic: str) -> Message | None:
        """The upstream broker's retained messages are not readable without subscribing: none here."""
        return None

    def pending(self) -> int:
        return len(self.local.queue) + len(self.local.inflight)

    def park(self) -> None:
        self.local.parked = True

    def resume(self) -> None:
        self.local.parked = False
        self.local.resend_inflight()
        self.local.drain(self.broker.clock.now())

    def close(self, *, publish_will: bool) -> None:
        self.broker.closed(self, publish_will=publish_will)

    def deliver(self, message: Message) -> None:
        """A message from upstream for this device: through its local session, per matching subscription.
        The upstream broker sets retain only on a retained message sent for a new subscription (§3.3.1.3),
        so the flag is kept."""
        for sub in self.local.subscriptions.values():
            if filter_matches(sub.topic_filter, message.topic):
                if message.retain:
                    self.local.deliver_retained(message, sub)
                else:
                    self.local.deliver(message, sub)
                return


class UpstreamBroker:
    """Serves the gateways from an upstream broker; ``start``/``stop`` around the gateways' lifetime."""

    def __init__(self, config: UpstreamConfig, clock: Clock, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.host, self.port, tls = parse_url(config.url)
        self.ssl = (
            tls_context(config.ca_file, config.cert_file, config.key_file, config.verify) if tls else None
        )
        self.metrics = BrokerMetrics()
        self.dropped_qos0_outage = 0
        self.buffer_full = 0
        self.store = MessageStore(os.path.join(config.buffer_dir, "buffer.sqlite3"), config.max_buffer_bytes)
        self.sessions: dict[str, UpstreamSession] = {}
        self._routes: TopicTrie[UpstreamSession] = TopicTrie()
        self._subscribing: dict[int, tuple[SubscriptionRequest, UpstreamSession]] = {}
        self._shared: MqttClient | None = None
        self._shared_forwarder: Forwarder | None = None
        self._orphans: dict[str, Forwarder] = {}  # transparent streams left from before a restart
        self._closing: set[asyncio.Task[None]] = set()
        self._unsettled: dict[int, float] = {}  # accepted, neither committed nor acknowledged upstream: when
        self._settling: deque[tuple[int, Callable[[bool], None]]] = deque()  # (last id to settle, then)
        self._commit_timer: asyncio.TimerHandle | None = None  # runs _due
        self._commit_at = 0.0
        self._deletes_due: float | None = None  # deletes of committed messages wait for a commit until then

    @property
    def name(self) -> str:
        return f"upstream {'mqtts' if self.ssl else 'mqtt'}://{self.host}:{self.port}"

    # --- lifetime

    async def start(self) -> None:
        """Aggregating: open the shared connection (in the background, with backoff) and resume the buffer."""
        log.info(
            "%s, %s mode, %d buffered messages (%d bytes)",
            self.name,
            self.config.mode,
            self.store.count(),
            self.store.bytes(),
        )
        if self.config.mode == "aggregating":
            client_id = self.config.client_id or f"mqgate-edge-{socket.gethostname()}"
            shared = self._shared = self._client(client_id, clean_start=True, will=None, credentials=None)
            shared.on_message = self._route
            shared.on_suback = self._suback
            forwarder = self._shared_forwarder = Forwarder(
                self.store, _AGGREGATE_STREAM, shared, self.metrics, self._delivered_upstream
            )
            shared.on_writable = forwarder.pump
            shared.on_connect = lambda present: self._shared_connected(forwarder)
            shared.start()
        else:
            for stream in self.store.streams():
                self._resume_orphan(stream)

    def _connected(self, forwarder: Forwarder) -> None:
        """Unacknowledged messages came back through ``on_done(None)`` (clean session) or are resent by the
        client itself (persistent session, §4.4): the forwarder goes on from its cursor."""
        log.info(
            "%s: connected; %d messages buffered", forwarder.client.name, self.store.count(forwarder.stream)
        )
        forwarder.pump()

    def _shared_connected(self, forwarder: Forwarder) -> None:
        """Subscriptions not answered on the lost connection are restored with the rest: their retained
        messages go to every device on the filter (see :meth:`_suback`)."""
        self._subscribing.clear()
        self._connected(forwarder)

    def _resume_orphan(self, stream: str) -> None:
        """A transparent device's messages buffered before a restart go out on a connection of their own
        (with the device's client id) until the device comes back."""
        client = self._client(stream, clean_start=True, will=None, credentials=None)
        forwarder = Forwarder(self.store, stream, client, self.metrics, self._delivered_upstream)
        client.on_writable = forwarder.pump
        client.on_connect = lambda present: self._connected(forwarder)
        self._orphans[stream] = forwarder
        client.start()

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            self.closed(session, publish_will=False)
        clients = [f.client for f in self._orphans.values()]
        if self._shared is not None:
            clients.append(self._shared)
        for session_client in clients:
            await session_client.stop()
        await asyncio.gather(*self._closing, return_exceptions=True)
        self.commit()
        self.store.close()

    def _client(
        self,
        client_id: str,
        *,
        clean_start: bool,
        will: WillSpec | None,
        credentials: Credentials | None,
        keepalive: int = 0,
    ) -> MqttClient:
        config = self.config
        username = config.username or None
        password = config.password.encode() if config.password else None
        if credentials is not None and config.credentials == "device":
            username, password = credentials.username, credentials.password
        return MqttClient(
            host=self.host,
            port=self.port,
            client_id=client_id,
            protocol_version=config.protocol_version,
            username=username,
            password=password if username is not None or config.protocol_version == 5 else None,
            keepalive=keepalive or config.keepalive,
            clean_start=clean_start,
            will=will,
            ssl=self.ssl,
            server_hostname=(config.server_name or self.host) if self.ssl else None,
            max_inflight=config.max_inflight,
            backoff_min=config.backoff_min,
            backoff_max=config.backoff_max,
            rng=self.rng,
        )

    # --- the Broker interface

    async def authenticate(self, client: ClientInfo, credentials: Credentials) -> AuthResult:
        """The upstream broker authenticates (transparent mode, at open_session); the gateway allows."""
        return AuthResult(0)

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
    ) -> UpstreamSession:
        """Open a device session; transparent mode connects upstream first (a refusal raises
        :class:`SessionRefused` with the upstream's reason; an unreachable upstream is retried in the
        background while the device publishes into the buffer)."""
        old = self.sessions.get(client.client_id)
        if old is not None:
            old_sink = old.local.sink
            self.closed(old, publish_will=True)
            if old_sink is not None:
                old_sink.kick(ReasonCode.SESSION_TAKEN_OVER)
        local = Session(
            client,
            max_inflight=max_inflight,
            max_queue=1000,
            queue_qos0=True,
            metrics=self.metrics,
        )
        now = self.clock.now()
        connection = None
        present = False
        stream = _AGGREGATE_STREAM
        if self.config.mode == "transparent":
            stream = self.config.clientid_prefix + client.client_id
            orphan = self._orphans.pop(stream, None)
            if orphan is not None:
                await orphan.client.stop()
            connection = self._client(  # the device's keepalive, clean session and will carried over
                stream,
                clean_start=clean_start,
                will=_will_spec(will),
                credentials=credentials,
                keepalive=min(client.keepalive, 65535),
            )
            try:
                connack = await connection.connect()
                present = connack.session_present
            except UpstreamRefused as exc:
                log.info(
                    "upstream refused %s: %s",
                    stream,
                    exc,
                    extra=client_fields(client.client_id, client.peer, client.protocol),
                )
                raise SessionRefused(exc.reason_code) from None
            except (OSError, TimeoutError, ConnectionError, ProtocolError) as exc:  # garbage too
                log.info(
                    "upstream unreachable for %s (%s): buffering, reconnecting",
                    stream,
                    exc,
                    extra=client_fields(client.client_id, client.peer, client.protocol),
                )
                connection.start()
        session = UpstreamSession(self, client, local, will, stream, connection, present)
        local.attach(sink, max_inflight, now)
        self.sessions[client.client_id] = session
        if connection is not None:
            forwarder = session.forwarder = Forwarder(
                self.store, stream, connection, self.metrics, self._delivered_upstream
            )
            connection.on_writable = forwarder.pump
            connection.on_message = lambda p: session.deliver(_message_of(p))
            connection.on_connect = lambda present: self._connected(forwarder)
            connection.on_disconnect = partial(self._transparent_lost, session)
            forwarder.pump()
        return session

    def _transparent_lost(self, session: UpstreamSession, reason: str) -> None:
        """Keep the device's upstream connection up for as long as the device is there."""
        connection = session.connection
        if not session.closed and connection is not None and connection.state is ClientState.DISCONNECTED:
            asyncio.get_running_loop().call_soon(self._restart, session)

    def _restart(self, session: UpstreamSession) -> None:
        connection = session.connection
        if session.closed or connection is None:
            return
        with contextlib.suppress(RuntimeError):  # already reconnecting
            connection.start()

    # --- messages

    def forward(self, session: UpstreamSession, message: Message) -> int:
        """Send a device's message (or, aggregating, its will) upstream: QoS 0 now or never, QoS 1/2
        through the buffer."""
        client = session.connection or self._shared
        if message.qos == 0:
            if client is None or not client.publish(
                message.topic, message.payload, 0, message.retain, message.properties
            ):
                self.dropped_qos0_outage += 1
            return 0
        stored = self.store.append(
            session.stream,
            message.topic,
            message.payload,
            message.qos,
            message.retain,
            encode_properties(message.properties) if message.properties is not EMPTY_PROPERTIES else b"",
            self.clock.wall(),
            commit=False,  # settled by the upstream PUBACK or the commit, whichever comes first
        )
        if stored is None:
            self.buffer_full += 1
            log.warning(
                "upstream buffer full (%d bytes): refusing a QoS %d publish of %s",
                self.store.bytes(),
                message.qos,
                session.client.client_id,
                extra=client_fields(session.client.client_id, session.client.peer, session.client.protocol),
            )
            return ReasonCode.QUOTA_EXCEEDED
        self._accepted(stored)
        forwarder = session.forwarder or self._shared_forwarder
        if forwarder is not None:
            forwarder.pump()
        return 0

    def settle(self, then: Callable[[bool], None]) -> None:
        """:meth:`gateways.base.Broker.settle`: ``then`` runs when the messages accepted so far are
        acknowledged upstream or committed (at the latest ``upstream.commit_delay`` seconds from now)."""
        unsettled = self._unsettled
        if not unsettled:
            then(True)
            return
        self._settling.append((next(reversed(unsettled)), then))
        if not self.config.commit_delay:
            self.commit()

    def _settled(self, settled: bool) -> None:
        """Run the waiting ``settle`` callbacks whose messages are all settled now (all of them, with
        ``settled`` false, when a commit failed)."""
        settling = self._settling
        unsettled = self._unsettled
        while settling and (not settled or not unsettled or next(iter(unsettled)) > settling[0][0]):
            settling.popleft()[1](settled)

    def _delivered_upstream(self, stored_id: int) -> None:
        """Acknowledged (or refused) upstream: gone from the store (the delete of a committed message is
        written with the next commit or within :data:`DELETE_COMMIT_DELAY`; it need not be durable at
        once, QoS 1), and settled for the device if it was not yet."""
        store = self.store
        if store.closed:
            return
        store.discard((stored_id,))
        if self._unsettled.pop(stored_id, None) is not None and self._settling:
            self._settled(True)
        if self._deletes_due is None and store.pending_deletes:
            self._deletes_due = self.clock.now() + DELETE_COMMIT_DELAY
            self._commit_by(self._deletes_due)

    def _accepted(self, stored_id: int) -> None:
        """A message waits to be settled: committed ``commit_delay`` seconds from now unless acknowledged
        upstream before."""
        now = self.clock.now()
        self._unsettled[stored_id] = now
        self._commit_by(now + self.config.commit_delay)

    def _commit_by(self, at: float) -> None:
        """Have :meth:`_due` run at ``at`` or earlier (one timer; ``clock`` is the loop's, see
        :class:`core.clock.LoopClock`)."""
        timer = self._commit_timer
        if timer is not None:
            if self._commit_at <= at:
                return
            timer.cancel()
        self._commit_at = at
        self._commit_timer = asyncio.get_running_loop().call_at(at, self._due)

    def _due(self) -> None:
        """Commit once the oldest message still unsettled has waited ``commit_delay``, or deletes have
        waited :data:`DELETE_COMMIT_DELAY`; until then the timer follows the earlier of the two. Under a
        steady flow that the upstream acknowledges in time, nothing is ever written."""
        self._commit_timer = None
        unsettled = self._unsettled
        due = next(iter(unsettled.values())) + self.config.commit_delay if unsettled else None
        if self._deletes_due is not None and (due is None or self._deletes_due < due):
            due = self._deletes_due
        if due is not None and due > self.clock.now() + _TIMER_SLACK:
            self._commit_by(due)
            return
        self.commit()

    def commit(self) -> None:
        """Make the messages accepted so far survive a restart of mqgate: one sqlite commit for all of
        them (nothing to do when nothing is pending); their ``settle`` callbacks run. A failed commit is
        logged and answered with ``then(False)``: the devices are not acknowledged and send again."""
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        self._deletes_due = None
        settled = True
        if self.store.uncommitted:
            try:
                self.store.commit()
            except StoreError as exc:
                log.error("%s: %d messages not acknowledged: %s", self.name, len(self._unsettled), exc)
                settled = False
        self._unsettled.clear()
        self._settled(settled)

    def _route(self, publish: Publish) -> None:
        """Aggregating: a message from the shared connection goes to every device whose filter matches; a
        retained one sent for a subscription only to the devices it was sent for."""
        message = _message_of(publish)
        topic = publish.topic
        seen: set[int] = set()
        for values in self._routes.match(topic):
            for session in values.values():
                if id(session) in seen:
                    continue
                seen.add(id(session))
                if message.retain and not any(filter_matches(f, topic) for f in session.retained_filters):
                    continue
                session.deliver(message)

    def _suback(self, requests: tuple[SubscriptionRequest, ...], codes: tuple[int, ...]) -> None:
        """The retained messages following this SUBACK belong to the device whose SUBSCRIBE it answers; a
        SUBACK of subscriptions restored after a reconnect brings them to every device on the filter."""
        for request in requests:
            topic_filter = request.topic_filter
            subscribers = self._routes.get(topic_filter).values()
            entry = self._subscribing.pop(id(request), None)
            if entry is None or entry[0] is not request:
                for session in subscribers:
                    session.retained_filters.add(topic_filter)
                continue
            for session in subscribers:
                session.retained_filters.discard(topic_filter)
            owner = entry[1]
            if not owner.closed and topic_filter in owner.local.subscriptions:
                owner.retained_filters.add(topic_filter)

    def subscribed(self, session: UpstreamSession, sub: Subscription) -> None:
        if session.connection is not None:
            session.connection.subscribe([SubscriptionRequest(sub.topic_filter, sub.qos)])
            return
        self._routes.add(sub.topic_filter, session.client.client_id, session)
        if self._shared is not None:  # again for a known filter: its retained messages come for this device
            request = SubscriptionRequest(sub.topic_filter, 2)
            self._subscribing[id(request)] = (request, session)
            self._shared.subscribe([request])

    def unsubscribed(self, session: UpstreamSession, topic_filter: str) -> None:
        if session.connection is not None:
            session.connection.unsubscribe([topic_filter])
            return
        session.retained_filters.discard(topic_filter)
        self._routes.remove(topic_filter, session.client.client_id)
        if self._shared is not None and not self._routes.get(topic_filter):  # the last device on it
            self._shared.unsubscribe([topic_filter])

    def closed(self, session: UpstreamSession, *, publish_will: bool) -> None:
        """The device is gone: normally, or lost (its will goes out)."""
        if session.closed:
            return
        session.closed = True
        if self.sessions.get(session.client.client_id) is session:
            del self.sessions[session.client.client_id]
        session.local.detach()
        for topic_filter in list(session.local.subscriptions):
            if session.connection is None:
                self.unsubscribed(session, topic_filter)
        connection = session.connection
        if connection is not None:
            # transparent: dropping the connection without DISCONNECT makes the upstream publish the will
            self._spawn(connection.stop(disconnect=not publish_will))
            if self.store.count(session.stream):
                self._resume_orphan(session.stream)
        elif publish_will and session.will is not None:
            will = session.will
            self.metrics.wills_published += 1
            self.forward(
                session, Message(will.topic, will.payload, will.qos, will.retain, "", will.properties)
            )

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _will_spec(will: Will | None) -> WillSpec | None:
    return WillSpec(will.topic, will.payload, will.qos, will.retain, will.properties) if will else None


def _message_of(publish: Publish) -> Message:
    return Message(publish.topic, publish.payload, publish.qos, publish.retain, "", publish.properties)
