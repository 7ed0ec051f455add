"""MQTT bridges (``[[bridges]]``): the embedded broker and a remote broker exchanging messages both ways.

One :class:`Bridge` is two ends joined:

- **local**: a session of its own on the embedded broker (client id ``$bridge/{name}``, a
  :class:`~core.broker.types.DeliverySink`) subscribed to ``forwards``. Its QoS 1/2 deliveries are
  committed to a bounded sqlite queue (:class:`core.store.MessageStore`, one file per bridge in
  ``buffer_dir``) before the local session is acknowledged, in batches of one loop iteration; QoS 0
  deliveries go out at once or, while the remote is unreachable, are dropped and counted. A full buffer is
  back-pressure, not loss: deliveries wait unacknowledged in the bridge's broker session (its inflight
  window, then its bounded queue, ``broker.max_mqueue_len``) until acknowledgements make room.
- **remote**: one :class:`core.mqtt.client.MqttClient` connection, kept up with exponential backoff and jitter
  (every transition logged), which sends the buffer in order with at most ``max_inflight`` publishes awaiting
  their acknowledgement, resends one not acknowledged within ``retry_interval`` **seconds** (MQTT 3.1.1: on
  the same connection with DUP set; MQTT 5: by reconnecting, §4.4; the value is used as given, where EMQX
  4.3's bridge converted it twice), deletes a message once acknowledged, and subscribes to
  ``subscriptions``; what arrives is published into the embedded broker from the bridge's session. Topics
  get ``remote_prefix`` on the way out and ``local_prefix`` on the way in.

Loops, when ``forwards`` and ``subscriptions`` overlap, are cut at both brokers:

- locally, the ``forwards`` subscriptions are *no local* (MQTT 5.0 §3.8.3.1) and messages from the remote are
  published with the bridge's session as their sender, so the embedded broker never hands them back;
- remotely, MQTT 5 connections subscribe with *no local* too; MQTT 3.1.1 has no such option, so the bridge
  drops an incoming message whose topic and payload equal those of a message it sent, to a topic its
  subscriptions match, within the last :data:`ECHO_TTL` seconds (once per message sent). A remote client
  publishing the very same payload to the very same topic within that time is taken for the echo: use
  protocol version 5 where that matters.

Nothing in the buffer is lost when the remote is down or mqgate restarts (it is on disk and sent first when
the bridge starts again; a stop commits what the session had handed over). Deliveries still waiting in the
bridge's broker session (a full buffer) live in memory like every session of the embedded broker. QoS 1 may
deliver a message twice across a lost acknowledgement, as MQTT allows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Final

from core.broker.embedded import EmbeddedBroker, EmbeddedSession
from core.broker.types import ClientInfo, Message, Subscription
from core.config import BridgeConfig, parse_url
from core.mqtt.client import MqttClient, tls_context
from core.mqtt.codec import (
    EMPTY_PROPERTIES,
    Publish,
    SubscriptionRequest,
    decode_publish_properties,
    encode_properties,
)
from core.store import MessageStore, NewMessage, StoreError, message_size
from core.topics import SharedFilter, filter_matches, parse_shared, validate_topic

__all__ = ["ECHO_TTL", "LOCAL_WINDOW", "Bridge", "BridgeMetrics"]

log = logging.getLogger("mqgate.bridge")

LOCAL_WINDOW: Final = 512
"""QoS 1/2 deliveries the bridge's broker session hands over before the buffer has committed them."""
ECHO_TTL: Final = 30.0
"""Seconds an MQTT 3.1.1 bridge waits for the remote's echo of a message it sent (module docstring)."""
ECHO_MAX: Final = 100_000
"""Echoes awaited at most; the oldest expectation is forgotten first."""
STORE_RETRY_S: Final = 1.0
"""Seconds before a failed buffer write (disk full, I/O error) is tried again."""
_PEEK: Final = 64


@dataclass(slots=True)
class BridgeMetrics:
    """Counters of one bridge (plain integers, read by tests, logs and exporters)."""

    forwarded: int = 0  # messages the remote acknowledged (QoS 1/2) or that were written to it (QoS 0)
    refused_remote: int = 0  # QoS 1/2 messages the remote refused (v5 reason >= 0x80): not retried
    received: int = 0  # messages from the remote published locally
    refused_local: int = (
        0  # messages from the remote the embedded broker refused (topic invalid after prefix)
    )
    dropped_qos0: int = 0  # QoS 0 forwards while the remote was unreachable
    dropped_invalid: int = 0  # forwards whose remote topic is not a valid topic name, or too big to buffer
    echoes_dropped: int = 0  # MQTT 3.1.1: our own messages coming back from the remote
    buffer_full: int = 0  # times the buffer filled up and deliveries had to wait
    store_errors: int = 0  # failed buffer writes (retried)


class _LocalSink:
    """The bridge's end of its broker session (:class:`core.broker.types.DeliverySink`)."""

    __slots__ = ("_bridge",)

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def deliver(
        self, message: Message, qos: int, packet_id: int, dup: bool, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        self._bridge._local_delivery(message, qos, packet_id, retain)

    def deliver_pubrel(self, packet_id: int) -> None:
        self._bridge._local_pubrel(packet_id)

    def kick(self, reason_code: int) -> None:
        self._bridge._kicked(self, reason_code)


class _Pending:
    """A local QoS 1/2 delivery on its way into the buffer; acknowledged to its session once committed."""

    __slots__ = ("message", "packet_id", "qos", "retain", "session", "topic")

    def __init__(
        self, session: EmbeddedSession, packet_id: int, qos: int, topic: str, message: Message, retain: bool
    ) -> None:
        self.session = session
        self.packet_id = packet_id
        self.qos = qos
        self.topic = topic
        self.message = message
        self.retain = retain


class Bridge:
    """One ``[[bridges]]`` entry: :meth:`start` opens the local session and the remote connection (which
    keeps reconnecting in the background); :meth:`stop` ends both, keeping the buffer on disk."""

    def __init__(
        self,
        config: BridgeConfig,
        broker: EmbeddedBroker,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.broker = broker
        self.metrics = BridgeMetrics()
        self.client_id = f"$bridge/{config.name}"
        """The bridge's session on the embedded broker."""
        host, port, tls = parse_url(config.url, f"bridges[{config.name}].url")
        self.url = config.url
        self.store = MessageStore(
            os.path.join(config.buffer_dir, f"bridge-{config.name}.sqlite3"), config.max_buffer_bytes
        )
        self.stream = config.name
        password = config.password.encode() if config.password else None
        self.client = MqttClient(
            host=host,
            port=port,
            client_id=config.client_id or f"mqgate-bridge-{config.name}",
            protocol_version=config.protocol_version,
            username=config.username or None,
            password=password if config.username or config.protocol_version == 5 else None,
            keepalive=config.keepalive,
            clean_start=True,
            ssl=tls_context(config.ca_file, config.cert_file, config.key_file, config.verify)
            if tls
            else None,
            server_hostname=(config.server_name or host) if tls else None,
            max_inflight=config.max_inflight,
            retry_interval=config.retry_interval,
            backoff_min=config.backoff_min,
            backoff_max=config.backoff_max,
            rng=rng,
            name=f"bridge {config.name} ({config.url})",
            on_message=self._remote_message,
            on_connect=self._connected,
            on_writable=self._pump,
        )
        self._remote_filters = [_plain_filter(f) for f in config.subscriptions]
        self._sink = _LocalSink(self)
        self._session: EmbeddedSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Pending] = []
        self._held: deque[_Pending] = deque()  # waiting for room in the buffer, in order
        self._flush_handle: asyncio.Handle | None = None
        self._full = False
        self._cursor = 0  # the last buffered id handed to the client
        self._deleting: list[int] = []  # acknowledged by the remote, delete not yet committed
        self._deleted: set[int] = set()  # the same, for the pump to skip after a resend from the cursor
        self._delete_handle: asyncio.Handle | None = None
        self._echo_seq = 0
        self._echoes: dict[tuple[str, bytes], deque[int]] = {}
        self._echo_order: deque[tuple[float, int, tuple[str, bytes]]] = deque()
        self._reopen: asyncio.Task[None] | None = None
        self._started = False

    # --- state

    @property
    def connected(self) -> bool:
        """The remote connection is up."""
        return self.client.connected

    @property
    def buffered(self) -> int:
        """QoS 1/2 forwards in the buffer (sent and unacknowledged ones included)."""
        return self.store.count(self.stream)

    @property
    def buffered_bytes(self) -> int:
        return self.store.bytes(self.stream)

    @property
    def waiting(self) -> int:
        """Deliveries not yet in the buffer (committed at the next loop iteration, or waiting for room)."""
        return len(self._pending) + len(self._held)

    @property
    def session(self) -> EmbeddedSession | None:
        """The bridge's session on the embedded broker (None while it is being reopened)."""
        return self._session

    # --- lifetime

    async def start(self) -> None:
        """Open the local session (subscribed to ``forwards``), then connect to the remote in the
        background."""
        self._loop = asyncio.get_running_loop()
        self._started = True
        log.info(
            "bridge %s: %s, forwards %s, subscriptions %s, %d buffered messages (%d bytes)",
            self.name,
            self.url,
            self.config.forwards,
            self.config.subscriptions,
            self.buffered,
            self.buffered_bytes,
        )
        await self._open_local()
        qos = self.config.qos
        v5 = self.config.protocol_version == 5
        if self.config.subscriptions:
            self.client.subscribe(
                [
                    SubscriptionRequest(f, qos, no_local=v5, retain_as_published=v5)
                    for f in self.config.subscriptions
                ]
            )
        self.client.start()

    async def stop(self) -> None:
        """Close the local session, commit what it handed over, then close the remote connection and the
        buffer (which keeps every message not yet acknowledged by the remote for the next start)."""
        self._started = False
        if self._reopen is not None:
            self._reopen.cancel()
            await asyncio.gather(self._reopen, return_exceptions=True)
            self._reopen = None
        session, self._session = self._session, None
        if session is not None:
            session.close(publish_will=False)  # no more deliveries
        self._cancel_flush()
        self._flush_pending()
        self._cancel_flush()  # a failed write scheduled a retry: too late for it
        if self._held:
            log.warning(
                "bridge %s: stopping with %d forwards that found no room in the buffer: they are lost",
                self.name,
                len(self._held),
            )
            self._held.clear()
        await self.client.stop()
        if self._delete_handle is not None:
            self._delete_handle.cancel()
            self._delete_handle = None
        self._flush_deletes()
        log.info("bridge %s: stopped, %d messages left in the buffer", self.name, self.buffered)
        self.store.close()

    def _cancel_flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    async def _open_local(self) -> None:
        session = await self.broker.open_session(
            ClientInfo(self.client_id, protocol="bridge", peer=self.url),
            clean_start=True,
            expiry=0,
            will=None,
            sink=self._sink,
            max_inflight=LOCAL_WINDOW,
        )
        self._session = session
        qos = self.config.qos
        codes = session.subscribe(
            [Subscription(f, qos, no_local=True, retain_as_published=True) for f in self.config.forwards]
        )
        for topic_filter, code in zip(self.config.forwards, codes, strict=True):
            if code >= 0x80:
                log.error(
                    "bridge %s: the embedded broker refused forwards filter %r (reason 0x%02x)",
                    self.name,
                    topic_filter,
                    code,
                )

    def _kicked(self, sink: _LocalSink, reason_code: int) -> None:
        """Another connection took the bridge's client id: take the session back after a pause."""
        log.warning(
            "bridge %s: its broker session %s was ended (reason 0x%02x); reopening it",
            self.name,
            self.client_id,
            reason_code,
        )
        self._session = None
        if self._started and self._loop is not None and self._reopen is None:
            self._reopen = self._loop.create_task(self._reopen_local(), name=f"bridge {self.name} reopen")

    async def _reopen_local(self) -> None:
        await asyncio.sleep(self.config.backoff_max)
        self._reopen = None
        if self._started:
            await self._open_local()

    # --- local -> buffer

    def _local_delivery(self, message: Message, qos: int, packet_id: int, retain: bool) -> None:
        topic = self.config.remote_prefix + message.topic if self.config.remote_prefix else message.topic
        if qos == 0:
            if validate_topic(topic) is not None:
                self.metrics.dropped_invalid += 1
            elif self.client.publish(topic, message.payload, 0, retain, message.properties):
                self.metrics.forwarded += 1
                self._expect_echo(topic, message.payload)
            else:
                self.metrics.dropped_qos0 += 1
            return
        session = self._session
        if session is None:
            return
        self._pending.append(_Pending(session, packet_id, qos, topic, message, retain))
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush_pending)

    def _local_pubrel(self, packet_id: int) -> None:
        if self._session is not None:
            self._session.ack(packet_id)

    def _flush_pending(self) -> None:
        """Commit the deliveries of this loop iteration in one transaction, in order, as far as the buffer has
        room; acknowledge those to the broker session; hold the rest until deletes make room."""
        self._flush_handle = None
        if self._held:
            self._held.extend(self._pending)
            items: list[_Pending] = list(self._held)
            self._held.clear()
        else:
            items = self._pending
        self._pending = []
        if not items:
            return
        store = self.store
        room = store.max_bytes - store.bytes()
        rows: list[NewMessage] = []
        accepted: list[_Pending] = []
        dropped: list[_Pending] = []
        fit = 0
        for item in items:
            message = item.message
            props = (
                encode_properties(message.properties) if message.properties is not EMPTY_PROPERTIES else b""
            )
            size = message_size(item.topic, message.payload, props)
            if size > store.max_bytes or validate_topic(item.topic) is not None:
                log.warning(
                    "bridge %s: dropping a forward to %s: %s",
                    self.name,
                    item.topic,
                    "larger than the whole buffer" if size <= store.max_bytes else "not a valid topic name",
                )
                self.metrics.dropped_invalid += 1
                dropped.append(item)
                fit += 1
                continue
            if size > room:
                break
            room -= size
            rows.append(NewMessage(self.stream, item.topic, message.payload, item.qos, item.retain, props))
            accepted.append(item)
            fit += 1
        try:
            if rows:
                store.append_many(rows)
        except StoreError as exc:
            self.metrics.store_errors += 1
            log.error("bridge %s: %s; retrying in %g s", self.name, exc, STORE_RETRY_S)
            self._held.extend(items)
            if self._loop is not None:
                self._flush_handle = self._loop.call_later(STORE_RETRY_S, self._flush_pending)
            return
        for item in accepted:
            self._ack_local(item)
        for item in dropped:
            self._ack_local(item)
        if fit < len(items):
            self._held.extend(items[fit:])
            if not self._full:
                self._full = True
                self.metrics.buffer_full += 1
                log.warning(
                    "bridge %s: buffer full (%d bytes, %d messages): forwards wait in the broker session",
                    self.name,
                    store.bytes(),
                    store.count(),
                )
        elif self._full:
            self._full = False
            log.info("bridge %s: buffer has room again", self.name)
        if rows:
            self._pump()

    def _ack_local(self, item: _Pending) -> None:
        session = item.session
        if session is not self._session:
            return  # that session is gone; its deliveries went with it
        if item.qos == 2:
            session.received(item.packet_id)
        session.ack(item.packet_id)

    # --- buffer -> remote

    def _connected(self, session_present: bool) -> None:
        log.info("bridge %s: connected to %s; %d messages buffered", self.name, self.url, self.buffered)
        self._pump()

    def _pump(self) -> None:
        """Hand the client the buffered messages it can take now, in order. Called again when it can take
        more: acknowledgements freed window slots (once per loop iteration, after their deletes), the
        transport drained or a connection came up (``on_writable``)."""
        client = self.client
        store = self.store
        deleted = self._deleted
        while client.connected:
            room = client.window - client.inflight  # read no more rows than can be sent now
            if room <= 0:
                return
            batch = store.peek(self.stream, min(room, _PEEK), after_id=self._cursor)
            if not batch:
                return
            for stored in batch:
                if stored.id in deleted:
                    self._cursor = stored.id
                    continue
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
                self._expect_echo(stored.topic, stored.payload)

    def _done(self, stored_id: int, code: int | None) -> None:
        if code is None:  # not delivered (connection lost): sent again from there, in order
            self._cursor = min(self._cursor, stored_id - 1)
            return
        if code >= 0x80:
            self.metrics.refused_remote += 1
            log.warning("bridge %s: the remote refused a message: reason 0x%02x", self.name, code)
        else:
            self.metrics.forwarded += 1
        self._deleting.append(stored_id)
        self._deleted.add(stored_id)
        if self._delete_handle is None and self._loop is not None:
            self._delete_handle = self._loop.call_soon(self._flush_deletes)

    def _flush_deletes(self) -> None:
        """Delete what the remote acknowledged in this loop iteration, in one transaction."""
        self._delete_handle = None
        ids, self._deleting = self._deleting, []
        if not ids:
            return
        try:
            self.store.delete(ids)
        except StoreError as exc:
            self.metrics.store_errors += 1
            log.error("bridge %s: %s (those messages may be sent again)", self.name, exc)
        self._deleted.difference_update(ids)
        if self._held and self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush_pending)
        self._pump()  # the acknowledgements freed window slots

    # --- remote -> local

    def _remote_message(self, publish: Publish) -> None:
        if self._echoes and self._take_echo(publish.topic, publish.payload):
            self.metrics.echoes_dropped += 1
            return
        session = self._session
        if session is None:
            self.metrics.refused_local += 1
            return
        prefix = self.config.local_prefix
        code = session.publish(
            Message(
                prefix + publish.topic if prefix else publish.topic,
                publish.payload,
                publish.qos,
                publish.retain,
                "",
                publish.properties,
            )
        )
        if code >= 0x80:
            self.metrics.refused_local += 1
            log.warning(
                "bridge %s: the embedded broker refused %s%s: reason 0x%02x",
                self.name,
                prefix,
                publish.topic,
                code,
            )
        else:
            self.metrics.received += 1

    # --- MQTT 3.1.1 echo suppression (module docstring)

    def _expect_echo(self, topic: str, payload: bytes) -> None:
        if self.config.protocol_version == 5 or not any(
            filter_matches(f, topic) for f in self._remote_filters
        ):
            return
        assert self._loop is not None
        now = self._loop.time()
        self._sweep_echoes(now)
        key = (topic, payload)
        self._echo_seq += 1
        seqs = self._echoes.get(key)
        if seqs is None:
            seqs = self._echoes[key] = deque()
        seqs.append(self._echo_seq)
        self._echo_order.append((now + ECHO_TTL, self._echo_seq, key))

    def _take_echo(self, topic: str, payload: bytes) -> bool:
        assert self._loop is not None
        self._sweep_echoes(self._loop.time())
        key = (topic, payload)
        seqs = self._echoes.get(key)
        if not seqs:
            return False
        seqs.popleft()
        if not seqs:
            del self._echoes[key]
        return True

    def _sweep_echoes(self, now: float) -> None:
        order = self._echo_order
        echoes = self._echoes
        while order and (order[0][0] <= now or len(order) > ECHO_MAX):
            _, seq, key = order.popleft()
            seqs = echoes.get(key)
            if seqs and seqs[0] <= seq:
                seqs.popleft()
                if not seqs:
                    del echoes[key]

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<Bridge {self.name} {self.url} {state}, {self.buffered} buffered>"


def _plain_filter(topic_filter: str) -> str:
    """The filter a (possibly shared) subscription matches topics with."""
    shared = parse_shared(topic_filter)
    return shared.topic_filter if isinstance(shared, SharedFilter) else topic_filter
