"""An asyncio MQTT 3.1.1 / 5.0 client on our codec: the upstream side of edge mode and of MQTT bridges.

One :class:`MqttClient` is one MQTT connection to a remote broker, kept up by :meth:`MqttClient.start` with
exponential backoff and full jitter, its subscriptions restored on every reconnect. The hot path takes no task
or future per message: ``publish`` encodes and appends to a write batch flushed once per loop iteration, the
incoming stream is decoded in bulk, and keepalive is one ``loop.call_at`` timer (DESIGN §6).

Delivery contract of :meth:`MqttClient.publish` for QoS 1/2 (MQTT 5.0 §4.3, §4.4):

* ``on_done(code)`` when the server has answered: PUBACK (QoS 1) or PUBCOMP (QoS 2), or a PUBREC carrying a
  failure. ``code`` is the v5 reason code (0 for v3.1.1; for QoS 2 PUBREC's, e.g. 0x10 no matching
  subscribers, unless PUBCOMP fails); ``>= 0x80`` means the server refused the message.
* ``on_done(None)``: **not delivered, resend it** (as a new publish). With a session that cannot outlive the
  connection (``clean_start=True``, or v5 with ``session_expiry=0``) this happens for every unacknowledged
  publish as soon as the connection is lost. With a persistent session the client keeps them and
  retransmits them itself after the reconnect as §4.4 requires (PUBLISH with DUP set, PUBREL for those
  already PUBREC'd), so nothing is delivered twice; ``on_done(None)`` comes only if the server then reports
  no session, or on :meth:`MqttClient.stop`.

Retransmission within a connection (``retry_interval`` > 0, for MQTT bridges; EMQX's and mosquitto's bridge
setting): a QoS 1/2 PUBLISH, or the PUBREL of a QoS 2 flow, not acknowledged within ``retry_interval``
seconds is handled by protocol version. MQTT 3.1.1 resends it on the same connection, PUBLISH with DUP set and
the same packet identifier (§4.3.2, §4.4 allows it). MQTT 5.0 forbids resending other than on reconnect
(§4.4, [MQTT-4.4.0-1]), so the client closes the connection (DISCONNECT 0x83) and the reconnect resends it
as above. ``retry_interval`` is in seconds and used as given, never converted (the unit bug of EMQX 4.3's
bridge, which multiplied it twice).

Bad input from the server (§4.13): undecodable bytes or a packet not allowed from a server closes the
connection (with a v5 DISCONNECT carrying the reason code), is logged with the decoder's reason and, under
``start()``, is retried with backoff like any other failure.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from collections.abc import Callable
from enum import Enum
from ssl import SSLContext
from typing import Any, Final, cast

from core.errors import MalformedPacket, MqgateError, ProtocolError
from core.mqtt.codec import (
    EMPTY_PROPERTIES,
    Connack,
    Connect,
    Disconnect,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    StreamDecoder,
    Suback,
    Subscribe,
    SubscriptionRequest,
    Unsuback,
    Unsubscribe,
    WillSpec,
    encode,
    encode_properties,
    encode_publish,
)
from core.mqtt.numbers import MAX_PACKET_ID, MAX_REMAINING_LENGTH, ReasonCode
from core.topics import validate_filter, validate_topic

__all__ = ["ClientState", "MqttClient", "UpstreamRefused", "tls_context"]

log = logging.getLogger("mqgate.client")

WRITE_HIGH_WATER: Final = 4 * 1024 * 1024
CLOSE_TIMEOUT: Final = 5.0
"""Seconds :meth:`MqttClient.stop` waits for a graceful close (TLS shutdown) before aborting."""
SUBSCRIBE_CHUNK: Final = 256
"""Filters per SUBSCRIBE/UNSUBSCRIBE packet when many are restored at once."""
_DEFAULT_MAX_PACKET: Final = MAX_REMAINING_LENGTH + 5

_PINGREQ: Final = b"\xc0\x00"
_PUBACK: Final = 0x4002
_PUBREC: Final = 0x5002
_PUBREL: Final = 0x6202
_PUBCOMP: Final = 0x7002


def _ack(kind: int, packet_id: int) -> bytes:
    """A success acknowledgement with the reason code omitted (valid in v3.1.1 and v5, §3.4.2.1)."""
    return ((kind << 16) | packet_id).to_bytes(4, "big")


def _code_name(code: int) -> str:
    try:
        return ReasonCode(code).name.lower().replace("_", " ")
    except ValueError:
        return "unknown reason"


def tls_context(
    ca_file: str = "", cert_file: str = "", key_file: str = "", verify: bool = True
) -> SSLContext:
    """The client TLS context of ``mqtts://``: CA bundle (the system's when empty), optional client
    certificate, and server verification (hostname and chain) unless ``verify`` is false."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class UpstreamRefused(MqgateError):
    """The server answered CONNECT with a failure CONNACK (MQTT 5.0 §3.2.2.2).

    ``reason_code`` is on the v5 scale for both versions: the codec maps v3.1.1 return codes
    (1 → 0x84, 2 → 0x85, 3 → 0x88, 4 → 0x86, 5 → 0x87, §3.2.2.3 of 3.1.1).
    """

    def __init__(self, reason_code: int, text: str) -> None:
        super().__init__(f"connection refused: {text} (reason 0x{reason_code:02x})")
        self.reason_code = reason_code
        self.text = text


class ClientState(Enum):
    """Where the client's network connection is (MQTT 5.0 §3.1.4, §3.2, §4.1)."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"  # TCP/TLS up or coming, CONNECT sent, waiting for CONNACK
    CONNECTED = "connected"


class _Outgoing:
    """An unacknowledged QoS 1/2 PUBLISH: its encoded bytes (for a §4.4 resend), where its QoS 2 flow is,
    and when its PUBLISH or PUBREL was last written (loop time, for ``retry_interval``)."""

    __slots__ = ("code", "data", "on_done", "qos", "released", "sent_at")

    def __init__(
        self, data: bytes, qos: int, on_done: Callable[[int | None], None] | None, sent_at: float = 0.0
    ) -> None:
        self.data = data
        self.qos = qos
        self.on_done = on_done
        self.released = False  # PUBREC received, PUBREL sent (§4.3.3)
        self.code = 0  # PUBREC's reason code (0x10: no matching subscribers)
        self.sent_at = sent_at


class _Protocol(asyncio.Protocol):
    """One TCP/TLS connection of the client; forwards everything to it, which ignores stale connections."""

    __slots__ = ("client", "closed", "transport")

    def __init__(self, client: MqttClient, closed: asyncio.Future[None]) -> None:
        self.client = client
        self.closed = closed
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.client._open.add(self)

    def data_received(self, data: bytes) -> None:
        self.client._data_received(self, data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._open.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)
        self.client._transport_lost(self, exc)

    def pause_writing(self) -> None:
        if self.client._protocol is self:
            self.client._paused = True

    def resume_writing(self) -> None:
        self.client._resume_writing(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class MqttClient:
    """An MQTT client connection to one server, kept up by :meth:`start` or driven by :meth:`connect` (one
    or the other), ended by :meth:`stop`.

    Callbacks run on the event loop and must not block: ``on_message(Publish)`` for every incoming PUBLISH
    (acknowledged by the client itself; QoS 2 delivered once, on PUBLISH, §4.3.3 method A on the receiving
    side), ``on_connect(session_present)``, ``on_disconnect(reason)``, ``on_suback(requests, codes)``, and
    ``on_writable()`` after :meth:`publish` returned False once the window frees, the transport drains or the
    connection comes up (always called on connect). Metrics are plain attributes.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str = "",
        protocol_version: int = 4,
        username: str | None = None,
        password: bytes | None = None,
        keepalive: int = 60,
        clean_start: bool = True,
        session_expiry: int = 0,
        will: WillSpec | None = None,
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
        max_inflight: int = 32,
        max_packet_size: int = _DEFAULT_MAX_PACKET,
        connect_timeout: float = 10.0,
        retry_interval: float = 0.0,
        reconnect: bool = True,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        rng: random.Random | None = None,
        name: str | None = None,
        on_message: Callable[[Publish], None] | None = None,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        on_suback: Callable[[tuple[SubscriptionRequest, ...], tuple[int, ...]], None] | None = None,
        on_writable: Callable[[], None] | None = None,
    ) -> None:
        if protocol_version not in (4, 5):
            raise ValueError(f"protocol_version must be 4 (3.1.1) or 5, not {protocol_version}")
        if not 1 <= max_inflight <= MAX_PACKET_ID - SUBSCRIBE_CHUNK:
            raise ValueError(f"max_inflight must be between 1 and {MAX_PACKET_ID - SUBSCRIBE_CHUNK}")
        if not 0 <= keepalive <= 65535:
            raise ValueError("keepalive must be between 0 and 65535 seconds")
        if not 0 <= retry_interval < float("inf"):
            raise ValueError("retry_interval must be 0 (off) or a positive number of seconds")
        if not 0 < backoff_min <= backoff_max:
            raise ValueError("backoff needs 0 < backoff_min <= backoff_max")
        if protocol_version == 4 and password is not None and username is None:
            raise ValueError("MQTT 3.1.1 sends no password without a user name (§3.1.2.9)")
        self.host = host
        self.port = port
        self.client_id = client_id
        self.protocol_version = protocol_version
        self.username = username
        self.password = password
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.will = will
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.max_inflight = max_inflight
        self.max_packet_size = max_packet_size
        self.connect_timeout = connect_timeout
        self.retry_interval = retry_interval
        """Seconds before an unacknowledged QoS 1/2 publish is sent again (module docstring); 0: only on
        reconnect."""
        self.reconnect = reconnect
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.rng = rng if rng is not None else random.Random()
        self.name = name or f"{client_id or '-'}@{host}:{port}"
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_suback = on_suback
        self.on_writable = on_writable
        # metrics
        self.connects = 0
        self.disconnects = 0
        self.publishes_sent = 0
        self.acked = 0
        self.refused = 0
        self.undelivered = 0  # on_done(None) reports
        self.messages_received = 0
        self.pings_sent = 0
        self.retransmitted = 0  # PUBLISH (DUP) and PUBREL resent after retry_interval, v3.1.1
        # connection state
        self.state = ClientState.DISCONNECTED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._protocol: _Protocol | None = None
        self._open: set[_Protocol] = set()
        self._decoder = StreamDecoder(max_packet_size, protocol_version)
        self._connack: asyncio.Future[Connack] | None = None
        self._stream_started = False
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._paused = False
        self._blocked = False
        self._timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._keepalive = keepalive
        self._last_sent = 0.0
        self._last_received = 0.0
        self._ping_sent_at = 0.0
        # server limits from CONNACK (§3.2.2.3)
        self._window = max_inflight
        self._max_qos = 2
        self._retain_available = True
        self._server_max_packet = _DEFAULT_MAX_PACKET
        # session state
        self._session_id = client_id
        self._next_id = 0
        self._inflight: dict[int, _Outgoing] = {}
        self._awaiting_rel: set[int] = set()
        self._subs: dict[str, SubscriptionRequest] = {}
        self._unsynced: dict[str, SubscriptionRequest | None] = {}  # changes the server has not acknowledged
        self._pending_subs: dict[int, tuple[SubscriptionRequest, ...]] = {}
        self._pending_unsubs: dict[int, tuple[str, ...]] = {}
        self._sent_will: WillSpec | None = None  # the will in the CONNECT of the current connection
        # supervisor
        self._task: asyncio.Task[None] | None = None
        self._reconnect_now = False
        self._lost = asyncio.Event()
        self._handlers: dict[type, Callable[[Any], None]] = {
            Publish: self._on_publish,
            Puback: self._on_puback,
            Pubrec: self._on_pubrec,
            Pubrel: self._on_pubrel,
            Pubcomp: self._on_pubcomp,
            Suback: self._on_suback,
            Unsuback: self._on_unsuback,
            Pingresp: self._on_pingresp,
            Disconnect: self._on_disconnect,
        }

    # --- public surface

    @property
    def connected(self) -> bool:
        return self.state is ClientState.CONNECTED

    @property
    def inflight(self) -> int:
        """Unacknowledged QoS 1/2 publishes."""
        return len(self._inflight)

    @property
    def window(self) -> int:
        """The send window: ``max_inflight``, lowered to the server's Receive Maximum (§3.2.2.3.3)."""
        return self._window

    @property
    def subscriptions(self) -> dict[str, SubscriptionRequest]:
        """The active filters, restored on every reconnect."""
        return dict(self._subs)

    @property
    def subscriptions_synced(self) -> bool:
        """Every subscribe and unsubscribe so far has been acknowledged by the server (SUBACK, UNSUBACK)."""
        return not self._unsynced

    async def connect(self) -> Connack:
        """One connection attempt: TCP (TLS), CONNECT, CONNACK (§3.1, §3.2), within ``connect_timeout``.

        Raises :class:`UpstreamRefused` for a failure CONNACK, ``ProtocolError`` (``MalformedPacket`` for
        undecodable bytes) when the server answers with something else, ``TimeoutError`` when the whole
        exchange takes longer than ``connect_timeout``, ``OSError``/``ConnectionError`` for network failures.
        """
        if self.state is not ClientState.DISCONNECTED:
            raise RuntimeError(f"connect() while {self.state.value}")
        if self._task is not None and self._task is not asyncio.current_task():
            raise RuntimeError("connect() on a started client: start() connects by itself")
        loop = self._loop = asyncio.get_running_loop()
        self.state = ClientState.CONNECTING
        self._decoder = StreamDecoder(self.max_packet_size, self.protocol_version)
        self._stream_started = False
        waiter: asyncio.Future[Connack] = loop.create_future()
        self._connack = waiter
        protocol = _Protocol(self, loop.create_future())
        self._protocol = protocol
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: protocol,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=(self.server_hostname or self.host) if self.ssl is not None else None,
                )
                if self._protocol is protocol and protocol.transport is not None and not waiter.done():
                    protocol.transport.write(encode(self._connect_packet(), self.protocol_version))
                    self._last_sent = loop.time()
                return await waiter
        except BaseException:
            if self.state is ClientState.CONNECTED and self._protocol is protocol:
                # CONNACK arrived as the timeout or a cancellation hit: undo the connection.
                protocol.abort()
                self._connection_lost("connect cancelled")
            elif self._protocol is protocol:
                self._protocol = None
                self.state = ClientState.DISCONNECTED
            protocol.abort()
            raise
        finally:
            self._connack = None

    def start(self) -> None:
        """Connect in a background task and keep reconnecting, with backoff, until :meth:`stop`."""
        if (self._task is not None and not self._task.done()) or self.state is not ClientState.DISCONNECTED:
            raise RuntimeError("already started or connected")
        self._loop = asyncio.get_running_loop()
        self._reconnect_now = False
        self._task = self._loop.create_task(self._run(), name=f"mqtt-client {self.name}")

    async def stop(self, *, disconnect: bool = True) -> None:
        """End the connection and the background task; nothing is left running.

        With ``disconnect`` a DISCONNECT (reason 0: the server discards the will, §3.14.4) is sent before
        closing; without it the socket is dropped, so the server publishes the will (§3.1.2.5). Unacknowledged
        publishes are reported with ``on_done(None)``.
        """
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])
        protocol = self._protocol
        if self.state is ClientState.CONNECTED and protocol is not None and protocol.transport is not None:
            if disconnect:
                self._write(encode(Disconnect(), self.protocol_version))
                self._flush()
                protocol.transport.close()
            else:
                protocol.abort()
            why = "stopped by the client" if disconnect else "stopped by the client without DISCONNECT"
            self._connection_lost(why, level=logging.INFO)
        self._abandon_inflight()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._out.clear()
        closing = [p.closed for p in self._open]
        if closing:
            _, pending = await asyncio.wait(closing, timeout=CLOSE_TIMEOUT)
            if pending:
                for p in list(self._open):
                    p.abort()
                await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)
        self._lost.clear()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties = EMPTY_PROPERTIES,
        on_done: Callable[[int | None], None] | None = None,
    ) -> bool:
        """Send a PUBLISH (§3.3) now; False (and nothing done) when not connected, the transport is paused or
        ``window`` QoS 1/2 publishes await their acknowledgement: retry on ``on_writable``.

        ``on_done`` (QoS 1/2 only) follows the contract in the module docstring. ``properties`` are sent to
        v5 servers only. A QoS above the server's Maximum QoS is lowered to it (§3.2.2.3.4); lowered to 0,
        ``on_done(0)`` follows from the loop once it is written. A message the server declared it cannot
        take (over its Maximum Packet Size, or retained where retain is unavailable) is not sent: counted as
        refused and reported as ``on_done(0x95)`` / ``on_done(0x9A)`` from the loop. Raises ValueError for an
        invalid topic name.
        """
        if self.state is not ClientState.CONNECTED or self._paused or self.will is not self._sent_will:
            self._blocked = True  # (a changed will: not until the connection is replaced)
            return False
        inflight = self._inflight
        if qos and len(inflight) >= self._window:
            self._blocked = True
            return False
        why = validate_topic(topic)
        if why is not None:
            raise ValueError(why)
        if qos > self._max_qos:
            qos = self._max_qos
        v5 = self.protocol_version == 5
        packet_id = self._new_packet_id() if qos else 0
        data = encode_publish(
            topic.encode(),
            payload,
            qos,
            retain,
            False,
            packet_id,
            encode_properties(properties) if v5 else None,
        )
        if len(data) > self._server_max_packet or (retain and not self._retain_available):
            code = (
                ReasonCode.PACKET_TOO_LARGE
                if len(data) > self._server_max_packet
                else ReasonCode.RETAIN_NOT_SUPPORTED
            )
            log.warning("%s: not publishing to %s: %s", self.name, topic, _code_name(code))
            self.refused += 1
            if qos and on_done is not None:
                assert self._loop is not None
                self._loop.call_soon(on_done, int(code))
            return True
        if qos:
            if self.retry_interval:
                assert self._loop is not None
                inflight[packet_id] = _Outgoing(data, qos, on_done, self._loop.time())
                if self._retry_timer is None:
                    self._arm_retry()
            else:
                inflight[packet_id] = _Outgoing(data, qos, on_done)
        elif on_done is not None:  # asked for QoS 1/2, lowered to the server's maximum of 0
            assert self._loop is not None
            self._loop.call_soon(on_done, 0)
        self._write(data)
        self.publishes_sent += 1
        return True

    def set_will(self, will: WillSpec | None) -> None:
        """Replace or remove the will. MQTT carries it only in CONNECT (§3.1.2.5), so a connected client
        stops publishing, waits for the acknowledgements of what it sent (nothing is sent twice), ends the
        connection with DISCONNECT (reason 0: the server discards the old will, §3.14.4) and connects again
        with the new will: at once under :meth:`start`; a client driven by :meth:`connect` is left
        disconnected for its owner to connect again (``on_disconnect`` tells it). A client waiting for CONNACK
        does so once connected. Subscriptions, and publishes left unacknowledged if the connection is lost
        meanwhile, follow the rules of any reconnect (module docstring)."""
        self.will = will
        if self.state is ClientState.CONNECTED:
            self._replace_when_drained()

    def _replace_when_drained(self) -> None:
        if self.will is not self._sent_will and not self._inflight:
            self._replace_connection()

    def _replace_connection(self) -> None:
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return
        self._write(encode(Disconnect(), self.protocol_version))
        self._flush()
        protocol.transport.close()
        self._reconnect_now = True
        self._connection_lost("reconnecting to carry a changed will (§3.1.2.5)", level=logging.INFO)

    def subscribe(self, filters: list[SubscriptionRequest]) -> None:
        """Add or change subscriptions (§3.8): remembered for every reconnect, sent now if connected.

        SUBACK's codes go to ``on_suback``; refusals (``>= 0x80``) are logged. Raises ValueError for an
        invalid filter.
        """
        for request in filters:
            why = validate_filter(request.topic_filter)
            if why is not None:
                raise ValueError(f"{request.topic_filter!r}: {why}")
        for request in filters:
            self._subs[request.topic_filter] = request
            self._unsynced[request.topic_filter] = request
        if self.state is ClientState.CONNECTED and filters:
            self._send_subscribe(filters)

    def unsubscribe(self, filters: list[str]) -> None:
        """Remove subscriptions (§3.10): forgotten at once, UNSUBSCRIBE sent now if connected."""
        for topic_filter in filters:
            self._subs.pop(topic_filter, None)
            self._unsynced[topic_filter] = None
        if self.state is ClientState.CONNECTED and filters:
            self._send_unsubscribe(filters)

    # --- the supervisor

    async def _run(self) -> None:
        """Connect, wait for the loss, back off (full jitter: uniform(0, min(max, min * 2**n))), repeat."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            self._lost.clear()
            why: str | None
            try:
                await self.connect()
            except UpstreamRefused as exc:
                why = f"refused by the server: {exc.text} (reason 0x{exc.reason_code:02x})"
            except MalformedPacket as exc:
                why = f"garbage from the server: {exc} (reason 0x{exc.code:02x})"
            except ProtocolError as exc:
                why = f"protocol error by the server: {exc}"
            except TimeoutError:
                why = f"timed out: no CONNACK within {self.connect_timeout:g} s"
            except OSError as exc:
                why = f"cannot connect: {exc}"
            except Exception as exc:  # a bug must not end the reconnect loop
                log.error("%s: connection attempt failed", self.name, exc_info=exc)
                why = f"unexpected error: {exc!r}"
            else:
                connected_at = loop.time()
                await self._lost.wait()
                if self._reconnect_now:  # set_will: connect again without a backoff
                    self._reconnect_now = False
                    continue
                if loop.time() - connected_at >= self.backoff_max:
                    attempt = 0
                why = None
            if not self.reconnect:
                if why is not None:
                    log.warning("%s: %s; not retrying (reconnect is off)", self.name, why)
                self._abandon_inflight()
                return
            delay = self.rng.uniform(0.0, min(self.backoff_max, self.backoff_min * 2.0 ** min(attempt, 40)))
            attempt += 1
            if why is not None:
                log.warning("%s: %s; retrying in %.2f s", self.name, why, delay)
            else:
                log.debug("%s: reconnecting in %.2f s", self.name, delay)
            await asyncio.sleep(delay)

    # --- connection events

    def _connect_packet(self) -> Connect:
        props = EMPTY_PROPERTIES
        if self.protocol_version == 5:
            props = Properties(
                session_expiry_interval=self.session_expiry or None,
                maximum_packet_size=self.max_packet_size
                if self.max_packet_size < _DEFAULT_MAX_PACKET
                else None,
            )
            if props == EMPTY_PROPERTIES:
                props = EMPTY_PROPERTIES
        self._sent_will = self.will
        return Connect(
            self._session_id,
            self.protocol_version,
            self.clean_start,
            self.keepalive,
            self.will,
            self.username,
            self.password,
            props,
        )

    def _on_connack(self, connack: Connack) -> None:
        """CONNACK (§3.2): a refusal fails :meth:`connect`; success sets up the session and restores it."""
        waiter = self._connack
        code = connack.reason_code
        if code >= 0x80:
            text = connack.properties.reason_string or _code_name(code)
            self._fail_attempt(UpstreamRefused(code, text))
            return
        if connack.session_present and self.clean_start:
            self._violation("session present after a clean start (§3.2.2.1.1)", ReasonCode.PROTOCOL_ERROR)
            return
        assert self._loop is not None
        self.state = ClientState.CONNECTED
        self.connects += 1
        props = connack.properties
        self._window = min(self.max_inflight, props.receive_maximum or 65535)
        self._max_qos = 2 if props.maximum_qos is None else props.maximum_qos
        self._retain_available = props.retain_available != 0
        self._server_max_packet = props.maximum_packet_size or _DEFAULT_MAX_PACKET
        self._keepalive = self.keepalive if props.server_keep_alive is None else props.server_keep_alive
        if props.assigned_client_identifier:
            self._session_id = props.assigned_client_identifier
        now = self._loop.time()
        self._last_sent = self._last_received = self._ping_sent_at = now
        present = connack.session_present
        if present:
            self._resume_session()
        else:
            self._awaiting_rel.clear()
            self._abandon_inflight()
            self._unsynced = dict(self._subs)
            if self._subs:
                self._send_subscribe(list(self._subs.values()))
        if self._keepalive:
            self._timer = self._loop.call_at(now + self._keepalive, self._on_timer)
        if self.retry_interval and self._inflight:
            self._arm_retry()
        log.info(
            "%s: connected (MQTT %s, session present: %s)",
            self.name,
            "5" if self.protocol_version == 5 else "3.1.1",
            present,
        )
        if waiter is not None and not waiter.done():
            waiter.set_result(connack)
        if self.on_connect is not None:
            self._call(self.on_connect, present)
        if self.will is not self._sent_will:  # set_will while CONNECT was on its way
            self._replace_when_drained()
            return
        self._notify_writable()

    def _resume_session(self) -> None:
        """Session present (§4.4): resend unacknowledged PUBLISHes with DUP and PUBRELs, in their order, then
        the subscription changes the server has not acknowledged."""
        assert self._loop is not None
        now = self._loop.time()
        for packet_id, entry in self._inflight.items():
            entry.sent_at = now
            if entry.released:
                self._write(_ack(_PUBREL, packet_id))
            else:
                data = entry.data
                self._write(bytes((data[0] | 0x08,)) + data[1:])
        subs = [r for r in self._unsynced.values() if r is not None]
        unsubs = [f for f, r in self._unsynced.items() if r is None]
        if subs:
            self._send_subscribe(subs)
        if unsubs:
            self._send_unsubscribe(unsubs)

    def _fail_attempt(self, exc: BaseException) -> None:
        """Before CONNACK: drop the connection and make :meth:`connect` raise ``exc``."""
        protocol, self._protocol = self._protocol, None
        self.state = ClientState.DISCONNECTED
        if protocol is not None:
            protocol.abort()
        waiter = self._connack
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _transport_lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return
        if self.state is ClientState.CONNECTING:
            detail = f": {exc}" if exc else ""
            self._fail_attempt(ConnectionError(f"connection closed before CONNACK{detail}"))
        elif self.state is ClientState.CONNECTED:
            self._connection_lost(f"connection lost: {exc or 'closed by the server'}")

    def _connection_lost(self, reason: str, *, level: int = logging.WARNING) -> None:
        """The connection after CONNACK is over: timers off, window reported, callbacks, supervisor woken."""
        self.state = ClientState.DISCONNECTED
        self._protocol = None
        self._paused = False
        self._out.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        self.disconnects += 1
        self._pending_subs.clear()
        self._pending_unsubs.clear()
        if not self._session_persists():
            self._abandon_inflight()
        log.log(level, "%s: %s", self.name, reason)
        if self.on_disconnect is not None:
            self._call(self.on_disconnect, reason)
        self._lost.set()

    def _session_persists(self) -> bool:
        """Whether the server may keep the session for the next connection (§3.1.2.4, §3.1.2.11.2)."""
        return not self.clean_start and (self.protocol_version == 4 or self.session_expiry > 0)

    def _abandon_inflight(self) -> None:
        """Report every unacknowledged publish as not delivered (``on_done(None)``)."""
        inflight, self._inflight = self._inflight, {}
        for entry in inflight.values():
            self.undelivered += 1
            if entry.on_done is not None:
                self._call(entry.on_done, None)

    def _drop(self, reason: str, exc: ProtocolError) -> None:
        """Close on a server's protocol violation or silence (§4.13): v5 DISCONNECT with ``exc.code`` first.
        Before CONNACK :meth:`connect` raises ``exc``; after it, ``reason`` is the loss reason."""
        protocol = self._protocol
        if protocol is None:
            return
        if self.state is ClientState.CONNECTING:
            self._fail_attempt(exc)
            return
        if self.protocol_version == 5 and exc.code != ReasonCode.KEEP_ALIVE_TIMEOUT:
            self._write(encode(Disconnect(exc.code), 5))
            self._flush()
            if protocol.transport is not None:
                protocol.transport.close()
        else:
            protocol.abort()
        self._connection_lost(reason)

    def _violation(self, detail: str, code: int) -> None:
        self._drop(f"protocol error by the server: {detail}", ProtocolError(detail, code))

    def _resume_writing(self, protocol: _Protocol) -> None:
        if protocol is self._protocol:
            self._paused = False
            if self._blocked and len(self._inflight) < self._window:
                self._notify_writable()

    def _notify_writable(self) -> None:
        self._blocked = False
        if self.on_writable is not None:
            self._call(self.on_writable)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s: callback %r failed", self.name, fn)

    # --- input

    def _data_received(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        assert self._loop is not None
        self._last_received = self._loop.time()
        if self.state is ClientState.CONNECTING and not self._stream_started and data:
            self._stream_started = True
            if data[0] != 0x20:  # the first packet must be CONNACK (§3.2): no need to wait for its body
                bad = MalformedPacket(
                    f"the stream does not start with CONNACK (first byte 0x{data[0]:02x})",
                    ReasonCode.MALFORMED_PACKET,
                )
                self._drop(f"garbage from the server: {bad}", bad)
                return
        decoder = self._decoder
        packets = decoder.feed(data)
        handlers = self._handlers
        for packet in packets:
            if self.state is ClientState.CONNECTING:
                if type(packet) is not Connack:
                    self._violation(f"{type(packet).__name__} before CONNACK", ReasonCode.PROTOCOL_ERROR)
                    return
                self._on_connack(packet)
            else:
                handler = handlers.get(type(packet))
                if handler is None:
                    self._violation(f"unexpected {type(packet).__name__}", ReasonCode.PROTOCOL_ERROR)
                    return
                handler(packet)
            if self._protocol is not protocol:
                return
        error = decoder.error
        if error is not None:
            self._drop(f"garbage from the server: {error} (reason 0x{error.code:02x})", error)

    def _on_publish(self, p: Publish) -> None:
        """Incoming PUBLISH (§4.3): QoS 1 answered with PUBACK, QoS 2 delivered once and its packet id kept
        until PUBREL (§4.3.3), so a resend with DUP is answered again but not delivered again."""
        if p.properties is not EMPTY_PROPERTIES and p.properties.topic_alias is not None:
            self._violation("topic alias in a PUBLISH (we allow none)", ReasonCode.TOPIC_ALIAS_INVALID)
            return
        qos = p.qos
        if qos == 2:
            awaiting = self._awaiting_rel
            packet_id = p.packet_id
            if packet_id not in awaiting:
                awaiting.add(packet_id)
                self._deliver(p)
            self._write(_ack(_PUBREC, packet_id))
            return
        self._deliver(p)
        if qos:
            self._write(_ack(_PUBACK, p.packet_id))

    def _deliver(self, p: Publish) -> None:
        self.messages_received += 1
        on_message = self.on_message
        if on_message is not None:
            try:
                on_message(p)
            except Exception:
                log.exception("%s: on_message failed for %s", self.name, p.topic)

    def _on_pubrel(self, p: Pubrel) -> None:
        if p.packet_id in self._awaiting_rel:
            self._awaiting_rel.discard(p.packet_id)
            self._write(_ack(_PUBCOMP, p.packet_id))
        elif self.protocol_version == 5:
            self._write(encode(Pubcomp(p.packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND), 5))
        else:
            self._write(_ack(_PUBCOMP, p.packet_id))

    def _on_puback(self, p: Puback) -> None:
        entry = self._inflight.get(p.packet_id)
        if entry is None or entry.qos != 1:
            return  # late or unknown: nothing waits for it
        del self._inflight[p.packet_id]
        self._complete(entry, p.reason_code)

    def _on_pubrec(self, p: Pubrec) -> None:
        """PUBREC (§4.3.3): answer PUBREL, unless it carries a failure, which ends the flow."""
        packet_id = p.packet_id
        entry = self._inflight.get(packet_id)
        if entry is None or entry.qos != 2:
            if self.protocol_version == 5:
                self._write(encode(Pubrel(packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND), 5))
            else:
                self._write(_ack(_PUBREL, packet_id))
            return
        if p.reason_code >= 0x80:
            del self._inflight[packet_id]
            self._complete(entry, p.reason_code)
            return
        entry.released = True
        entry.code = p.reason_code
        if self.retry_interval:
            assert self._loop is not None
            entry.sent_at = self._loop.time()
        self._write(_ack(_PUBREL, packet_id))

    def _on_pubcomp(self, p: Pubcomp) -> None:
        entry = self._inflight.get(p.packet_id)
        if entry is None or entry.qos != 2:
            return
        del self._inflight[p.packet_id]
        self._complete(entry, p.reason_code if p.reason_code >= 0x80 else entry.code)

    def _complete(self, entry: _Outgoing, code: int) -> None:
        if code >= 0x80:
            self.refused += 1
        else:
            self.acked += 1
        if entry.on_done is not None:
            self._call(entry.on_done, code)
        if self.will is not self._sent_will:
            self._replace_when_drained()
        elif self._blocked and not self._paused and len(self._inflight) < self._window:
            self._notify_writable()

    def _on_suback(self, p: Suback) -> None:
        sent = self._pending_subs.pop(p.packet_id, None)
        if sent is None:
            return
        unsynced = self._unsynced
        for request, code in zip(sent, p.reason_codes, strict=False):
            if unsynced.get(request.topic_filter) is request:
                del unsynced[request.topic_filter]
            if code >= 0x80:
                log.warning(
                    "%s: subscription to %s refused: %s (reason 0x%02x)",
                    self.name,
                    request.topic_filter,
                    _code_name(code),
                    code,
                )
        if self.on_suback is not None:
            self._call(self.on_suback, sent, p.reason_codes)

    def _on_unsuback(self, p: Unsuback) -> None:
        sent = self._pending_unsubs.pop(p.packet_id, None)
        if sent is None:
            return
        unsynced = self._unsynced
        for topic_filter in sent:
            if topic_filter in unsynced and unsynced[topic_filter] is None:
                del unsynced[topic_filter]
        for topic_filter, code in zip(sent, p.reason_codes, strict=False):
            if code >= 0x80:
                log.info("%s: unsubscribe from %s: %s", self.name, topic_filter, _code_name(code))

    def _on_pingresp(self, p: Pingresp) -> None:
        """PINGRESP (§3.13): any packet already refreshed ``_last_received``."""

    def _on_disconnect(self, p: Disconnect) -> None:
        """DISCONNECT from a v5 server (§3.14): log its reason and treat the connection as lost."""
        code = p.reason_code
        text = p.properties.reason_string
        why = f"disconnected by the server: {_code_name(code)} (reason 0x{code:02x})"
        if text:
            why += f": {text}"
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._connection_lost(why)

    # --- keepalive (§3.1.2.10, §3.12)

    def _on_timer(self) -> None:
        """PINGREQ when nothing was sent or received for keepalive seconds; lost when nothing at all came
        back for 1.5 times keepalive."""
        self._timer = None
        loop = self._loop
        if self.state is not ClientState.CONNECTED or loop is None:
            return
        now = loop.time()
        keepalive = self._keepalive
        dead_at = self._last_received + keepalive * 1.5
        if now >= dead_at:
            why = f"keepalive timeout: nothing from the server for {now - self._last_received:.1f} s"
            self._drop(why, ProtocolError(why, ReasonCode.KEEP_ALIVE_TIMEOUT))
            return
        outstanding = self._ping_sent_at > self._last_received
        if not outstanding and now >= min(self._last_sent, self._last_received) + keepalive:
            self._write(_PINGREQ)
            self.pings_sent += 1
            self._ping_sent_at = now
            outstanding = True
        if outstanding:
            deadline = dead_at
        else:
            deadline = min(min(self._last_sent, self._last_received) + keepalive, dead_at)
        self._timer = loop.call_at(deadline, self._on_timer)

    # --- retransmission (retry_interval; see the module docstring)

    def _arm_retry(self) -> None:
        """Wake up when the oldest unacknowledged PUBLISH or PUBREL is due again."""
        assert self._loop is not None
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        oldest = min(entry.sent_at for entry in self._inflight.values())
        self._retry_timer = self._loop.call_at(oldest + self.retry_interval, self._on_retry)

    def _on_retry(self) -> None:
        self._retry_timer = None
        loop = self._loop
        if self.state is not ClientState.CONNECTED or loop is None or not self._inflight:
            return
        now = loop.time()
        due = now - self.retry_interval
        expired = [(packet_id, e) for packet_id, e in self._inflight.items() if e.sent_at <= due]
        if expired and self.protocol_version == 5:
            why = f"{len(expired)} publishes not acknowledged within retry_interval {self.retry_interval:g} s"
            self._drop(
                f"{why}: reconnecting to resend them (MQTT 5 §4.4)",
                ProtocolError(why, ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR),
            )
            return
        if expired:
            log.info(
                "%s: resending %d publishes not acknowledged within %g s",
                self.name,
                len(expired),
                self.retry_interval,
            )
        for packet_id, entry in expired:
            entry.sent_at = now
            self.retransmitted += 1
            if entry.released:
                self._write(_ack(_PUBREL, packet_id))
            else:
                data = entry.data
                self._write(bytes((data[0] | 0x08,)) + data[1:])
        self._arm_retry()

    # --- output

    def _new_packet_id(self) -> int:
        """A packet identifier not in use by a publish or a (un)subscribe awaiting its answer (§2.2.1)."""
        inflight = self._inflight
        packet_id = self._next_id
        for _ in range(MAX_PACKET_ID):
            packet_id = packet_id % MAX_PACKET_ID + 1
            if (
                packet_id not in inflight
                and packet_id not in self._pending_subs
                and packet_id not in self._pending_unsubs
            ):
                self._next_id = packet_id
                return packet_id
        raise RuntimeError("every packet identifier is in use")

    def _send_subscribe(self, requests: list[SubscriptionRequest]) -> None:
        for start in range(0, len(requests), SUBSCRIBE_CHUNK):
            chunk = tuple(requests[start : start + SUBSCRIBE_CHUNK])
            packet_id = self._new_packet_id()
            self._pending_subs[packet_id] = chunk
            self._write(encode(Subscribe(packet_id, chunk), self.protocol_version))

    def _send_unsubscribe(self, filters: list[str]) -> None:
        for start in range(0, len(filters), SUBSCRIBE_CHUNK):
            chunk = tuple(filters[start : start + SUBSCRIBE_CHUNK])
            packet_id = self._new_packet_id()
            self._pending_unsubs[packet_id] = chunk
            self._write(encode(Unsubscribe(packet_id, chunk), self.protocol_version))

    def _write(self, data: bytes) -> None:
        out = self._out
        if not out and self._flush_handle is None:
            assert self._loop is not None
            self._flush_handle = self._loop.call_soon(self._flush)
        out.append(data)

    def _flush(self) -> None:
        """One ``transport.write`` for everything written in this loop iteration."""
        self._flush_handle = None
        out = self._out
        if not out:
            return
        protocol = self._protocol
        transport = protocol.transport if protocol is not None else None
        if transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            assert self._loop is not None
            self._last_sent = self._loop.time()
        out.clear()
