"""The CoAP gateway, pure: CoAP requests become broker publishes, subscriptions and reads; deliveries become
observe notifications (RFC 7252, RFC 7641, RFC 7959).

Two URL styles, so that devices written for EMQX 4.3 and 5.x both work unchanged:

- EMQX 4.3: ``/mqtt/{topic}?c={clientid}&u={username}&p={password}``. PUT or POST publishes (QoS 0 for NON,
  1 for CON unless ``qos=`` says otherwise, ``retain=true``), GET with Observe 0 subscribes, Observe 1
  unsubscribes, a plain GET reads the topic's retained message.
- EMQX 5.x: ``POST /mqtt/connection?clientid=&username=&password=`` opens a connection and returns its token
  (2.01); PUT on it is a heartbeat, DELETE closes it; ``/ps/{topic}?clientid=&token=`` publishes (POST) and
  observe-subscribes (GET). Short aliases c, t, u, p, q, r are accepted everywhere.

Notifications of one observation go out one confirmable at a time (RFC 7252 §4.7, RFC 7641 §4.5.1): while
a CON notification awaits its ACK, newer ones wait; a waiting QoS 0 message is replaced by the next one
(RFC 7641 §4.5.2: only the latest state matters), QoS 1/2 messages wait in order, bounded by the session's
inflight window, because their delivery is acknowledged to the broker once every observation has had it.

One client id is one session: a request for a client id held by another peer, or a broker-level takeover by
any client with that id, ends the old peer's observations with a final 4.09 notification (RFC 7641 §3.2).
Sessions are opened asynchronously by the adapter (:meth:`CoapGateway.take_session_requests`); requests for a
client id whose session is opening wait for it (bounded).
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from urllib.parse import unquote

from core.broker.types import Message, Subscription
from core.clock import Clock
from core.config import CoapConfig
from core.errors import MalformedPacket
from core.logging import client_fields
from core.mqtt.codec import EMPTY_PROPERTIES, Properties
from core.topics import filter_matches, validate_filter, validate_topic
from gateways.base import SessionHandle
from gateways.coap import codec
from gateways.coap.application import CoapApplication
from gateways.coap.codec import CoapMessage
from gateways.coap.exchange import (
    Acknowledged,
    CoapEndpoint,
    Event,
    GaveUp,
    Rejected,
    RequestReceived,
    ResponseReceived,
)
from gateways.coap.numbers import CoapError, Code, ContentFormat, OptionNumber, Timing, Type

__all__ = ["CoapClient", "CoapGateway", "SessionRequest"]

log = logging.getLogger("mqgate.coap")

GET, POST, PUT, DELETE = int(Code.GET), int(Code.POST), int(Code.PUT), int(Code.DELETE)
_OBSERVE = int(OptionNumber.OBSERVE)
_CONTENT_FORMAT = int(OptionNumber.CONTENT_FORMAT)
_LOCATION_PATH = int(OptionNumber.LOCATION_PATH)
_BLOCK1 = int(OptionNumber.BLOCK1)
_BLOCK2 = int(OptionNumber.BLOCK2)
_SIZE1 = int(OptionNumber.SIZE1)
_SIZE2 = int(OptionNumber.SIZE2)
_KNOWN_OPTIONS = frozenset(int(n) for n in OptionNumber)
_ALIASES = {"c": "clientid", "t": "token", "u": "username", "p": "password", "q": "qos", "r": "retain"}
_MIME_OF = {
    int(ContentFormat.TEXT_PLAIN): "text/plain;charset=utf-8",
    int(ContentFormat.LINK_FORMAT): "application/link-format",
    int(ContentFormat.XML): "application/xml",
    int(ContentFormat.OCTET_STREAM): "application/octet-stream",
    int(ContentFormat.EXI): "application/exi",
    int(ContentFormat.JSON): "application/json",
    int(ContentFormat.CBOR): "application/cbor",
    int(ContentFormat.SENML_JSON): "application/senml+json",
    int(ContentFormat.SENML_CBOR): "application/senml+cbor",
}
_FORMAT_OF = {mime: number for number, mime in _MIME_OF.items()}
_WELL_KNOWN = b'</mqtt>;rt="mqtt",</mqtt/connection>,</ps>;rt="core.ps"'
_MAX_WAITING = 16  # requests parked per client id while its session opens


@dataclass(slots=True)
class _Delivery:
    """A QoS 1/2 delivery notified by CON to ``owed`` observations: its packet is acknowledged to the session
    when the last of them is acknowledged, reset, given up or dropped."""

    packet_id: int
    qos: int
    owed: int


@dataclass(slots=True)
class _Waiting:
    """A notification waiting for its observation's outstanding CON to be acknowledged."""

    message: Message
    qos: int
    delivery: _Delivery | None


@dataclass(slots=True)
class _Observation:
    """One observe subscription (RFC 7641 §4.1): who, with which token, on which filter; whether a CON
    notification is outstanding, and the notifications waiting for it (RFC 7641 §4.5.2)."""

    peer: Hashable
    token: bytes
    topic_filter: str
    path: list[str]
    seq: int = 1
    last_payload: bytes = b""
    outstanding: bool = False
    waiting: deque[_Waiting] = field(default_factory=deque)


@dataclass(slots=True)
class _SentNotification:
    """The context of a CON notification in the endpoint: whose, and the delivery it settles."""

    client: CoapClient
    observation: _Observation
    delivery: _Delivery | None


@dataclass(slots=True)
class _Upload:
    """A Block1 body being received (RFC 7959 §2.5)."""

    body: bytearray
    expires_at: float


@dataclass(slots=True)
class SessionRequest:
    """A client whose broker session the adapter must open (authenticate, then open_session with ``client``
    as the sink) and report with :meth:`CoapGateway.session_opened` or :meth:`CoapGateway.session_refused`."""

    client: CoapClient

    @property
    def client_id(self) -> str:
        return self.client.client_id

    @property
    def username(self) -> str | None:
        return self.client.username

    @property
    def password(self) -> str | None:
        return self.client.password

    @property
    def peer(self) -> Hashable:
        return self.client.peer


@dataclass(eq=False)
class CoapClient:
    """The gateway side of one client id: its broker session, observations and connection token.
    It is the :class:`DeliverySink` of its session."""

    gateway: CoapGateway
    client_id: str
    peer: Hashable
    username: str | None = None
    password: str | None = None
    session: SessionHandle | None = None
    token: str | None = None
    last_seen: float = 0.0
    observations: dict[bytes, _Observation] = field(default_factory=dict)
    waiting: list[RequestReceived] = field(default_factory=list)
    opening: bool = False
    held: list[tuple[Message, int, int]] | None = None  # deliveries during a subscribe (retained messages)

    def deliver(
        self, message: Message, qos: int, packet_id: int, dup: bool, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        if self.held is not None:
            self.held.append((message, qos, packet_id))
            return
        self.gateway.notify(self, message, qos, packet_id)

    def deliver_pubrel(self, packet_id: int) -> None:
        session = self.session
        if session is not None:
            session.ack(packet_id)

    def kick(self, reason_code: int) -> None:
        gateway = self.gateway
        gateway.end_client(self, "taken over by another client", publish_will=False, detached=True)
        if gateway.on_output is not None:  # called by the broker, outside any datagram or timer callback
            gateway.on_output()


class CoapGateway(CoapApplication[SessionRequest]):
    """Every CoAP client of one socket."""

    def __init__(self, config: CoapConfig, clock: Clock, endpoint: CoapEndpoint | None = None) -> None:
        endpoint = endpoint or CoapEndpoint(
            Timing(),
            max_dedup_entries=config.max_dedup_entries,
            max_dedup_bytes=config.max_dedup_bytes,
            exchange_lifetime=config.exchange_lifetime,
        )
        super().__init__(endpoint, clock.now(), config.heartbeat / 2)
        self.config = config
        self.clock = clock
        self.clients: dict[str, CoapClient] = {}
        self._uploads: dict[tuple[Hashable, str], _Upload] = {}

    def _sweep(self, now: float) -> None:
        """Every half heartbeat: close connections silent for 1.5 heartbeats (their will is published), and
        forget connectionless clients that observe nothing and were idle as long (EMQX's check_alive)."""
        limit = self.config.heartbeat * 1.5
        for client in [c for c in self.clients.values() if c.last_seen + limit <= now]:
            if client.token:
                self.end_client(client, "no heartbeat", publish_will=True)
            elif not client.observations and not client.waiting:
                self.end_client(client, "idle", publish_will=False)
        for key in [k for k, u in self._uploads.items() if u.expires_at <= now]:
            del self._uploads[key]

    def _handle_event(self, event: Event, now: float) -> None:
        if isinstance(event, RequestReceived):
            self._on_request(event, now)
        elif isinstance(event, Acknowledged):
            self._notification_done(event.context, now, cancel=False)
        elif isinstance(event, Rejected | GaveUp):
            self._notification_done(event.context, now, cancel=True)
        elif isinstance(event, ResponseReceived):
            self.count("unexpected_responses")

    # --- requests

    def _on_request(self, request: RequestReceived, now: float) -> None:
        msg = request.message
        try:
            for number, _ in msg.options:
                if number & 1 and number not in _KNOWN_OPTIONS:
                    raise CoapError(Code.BAD_OPTION, f"unrecognised critical option {number}")
            path = [unquote(segment) for segment in msg.uri_path()]
            query = self._query(msg)
            self._route(request, path, query, now)
        except CoapError as exc:
            self.count(f"responses_{codec_name(exc.code)}")
            log.info(
                "coap %s: %s refused with %s: %s",
                request.peer,
                _method(msg.code),
                codec_name(exc.code),
                exc.text,
                extra=client_fields(None, request.peer, "coap"),
            )
            self._reply(request, exc.code, exc.text.encode())
        except MalformedPacket as exc:
            self._reply(request, exc.code, str(exc).encode())

    @staticmethod
    def _query(msg: CoapMessage) -> dict[str, str]:
        query: dict[str, str] = {}
        for item in msg.uri_query():
            name, _, value = item.partition("=")
            query[_ALIASES.get(name, name)] = unquote(value)
        return query

    def _reply(
        self,
        request: RequestReceived,
        code: int,
        payload: bytes = b"",
        options: list[tuple[int, bytes]] | None = None,
    ) -> None:
        self.endpoint.respond(request, CoapMessage(0, int(code), 0, b"", options or [], payload))

    def _route(self, request: RequestReceived, path: list[str], query: dict[str, str], now: float) -> None:
        code = request.message.code
        if path == [".well-known", "core"]:
            if code != GET:
                raise CoapError(Code.METHOD_NOT_ALLOWED, "only GET")
            self._reply(request, Code.CONTENT, _WELL_KNOWN, [(_CONTENT_FORMAT, codec.encode_uint(40))])
            return
        if path[:2] == ["mqtt", "connection"] and len(path) == 2:
            self._connection(request, query, now)
            return
        if len(path) >= 2 and path[0] in ("mqtt", "ps"):
            self._pubsub(request, path, query, now)
            return
        if path and path[0] in ("mqtt", "ps"):
            raise CoapError(Code.NOT_FOUND, "no topic in the path")
        raise CoapError(Code.NOT_FOUND, "unknown resource")

    # --- connection mode (EMQX 5.x)

    def _connection(self, request: RequestReceived, query: dict[str, str], now: float) -> None:
        code = request.message.code
        client_id = query.get("clientid")
        if not client_id:
            raise CoapError(Code.BAD_REQUEST, "missing clientid")
        client = self.clients.get(client_id)
        if code == POST:
            if client is not None and client.peer != request.peer:
                self.end_client(client, "a new connection with the same client id", publish_will=False)
                client = None
            if client is not None and client.session is not None and client.token:
                self._reply(request, Code.CREATED, client.token.encode())
                return
            client = self._client_for(request, client_id, query, now)
            if client is None:
                return
            if client.token is None:
                client.token = secrets.token_hex(8)
            self._reply(request, Code.CREATED, client.token.encode())
            return
        if client is None or client.token is None or query.get("token") != client.token:
            raise CoapError(Code.UNAUTHORIZED, "unknown connection or wrong token")
        client.last_seen = now
        if code == PUT:
            self._reply(request, Code.CHANGED)
        elif code == DELETE:
            self.end_client(client, "closed by the client", publish_will=False)
            self._reply(request, Code.DELETED)
        else:
            raise CoapError(Code.METHOD_NOT_ALLOWED, "POST, PUT or DELETE")

    def _client_for(
        self, request: RequestReceived, client_id: str, query: dict[str, str], now: float
    ) -> CoapClient | None:
        """The client with a session for this request, or None when the request waits for it to open."""
        client = self.clients.get(client_id)
        if client is not None and client.peer != request.peer and not client.token:
            self.end_client(client, f"the client id is now used from {request.peer}", publish_will=False)
            client = None
        if client is None:
            client = CoapClient(self, client_id, request.peer, query.get("username"), query.get("password"))
            self.clients[client_id] = client
        client.last_seen = now
        if client.session is not None:
            return client
        if len(client.waiting) >= _MAX_WAITING:
            raise CoapError(Code.SERVICE_UNAVAILABLE, "too many requests while the session opens")
        client.waiting.append(request)
        if not client.opening:
            client.opening = True
            self._session_requests.append(SessionRequest(client))
        return None

    def session_opened(self, request: SessionRequest, session: SessionHandle, now: float) -> None:
        client = request.client
        if self.clients.get(client.client_id) is not client:  # ended while its session opened
            session.close(publish_will=False)
            return
        client.session = session
        client.opening = False
        waiting, client.waiting = client.waiting, []
        for waiter in waiting:
            self._on_request(waiter, now)

    def session_refused(self, request: SessionRequest, reason_code: int, now: float) -> None:
        client = request.client
        client_id = client.client_id
        if self.clients.get(client_id) is not client:
            return
        del self.clients[client_id]
        code = Code.UNAUTHORIZED if reason_code in (0x86, 0x87, 0x8C) else Code.SERVICE_UNAVAILABLE
        if reason_code == 0x8A:  # banned: too many failures from the address; Max-Age defaults to 60 s
            code = Code.TOO_MANY_REQUESTS  # RFC 8516 §3-§4
        log.info(
            "coap %s (%s) refused by the broker: reason 0x%02x",
            client_id,
            client.peer,
            reason_code,
            extra=client_fields(client_id, client.peer, "coap"),
        )
        waiting, client.waiting = client.waiting, []
        for waiter in waiting:
            self._reply(
                waiter, code, b"authentication failed" if code == Code.UNAUTHORIZED else b"unavailable"
            )

    # --- publish, subscribe, read

    def _pubsub(self, request: RequestReceived, path: list[str], query: dict[str, str], now: float) -> None:
        msg = request.message
        style = path[0]
        topic = "/".join(path[1:])
        client_id = query.get("clientid")
        if not client_id:
            raise CoapError(Code.BAD_REQUEST, "missing clientid")
        existing = self.clients.get(client_id)
        token = query.get("token")
        if existing is not None and existing.token:
            if token != existing.token:  # a connection's session is only reachable with its token
                raise CoapError(Code.UNAUTHORIZED, "missing or wrong token for this connection")
        elif token or self.config.connection_required:
            raise CoapError(Code.UNAUTHORIZED, "no connection for this client id")
        code = msg.code
        if code in (PUT, POST) and not (style == "ps" and code == PUT):
            why = validate_topic(topic)
            if why is not None:
                raise CoapError(Code.BAD_REQUEST, f"invalid topic: {why}")
            client = self._client_for(request, client_id, query, now)
            if client is None:  # parked until the session opens, then handled again from the start
                return
            body = self._body(request, topic, now)
            if body is not None:
                self._publish(request, client, topic, query, body)
        elif code == GET:
            observe = msg.observe()
            if observe is None:
                self._read(request, client_id, topic, query, now)
                return
            why = validate_filter(topic)
            if why is not None:
                raise CoapError(Code.BAD_REQUEST, f"invalid topic filter: {why}")
            if not msg.token and observe == 0:
                raise CoapError(Code.BAD_REQUEST, "observe needs a token")
            client = self._client_for(request, client_id, query, now)
            if client is None:
                return
            if observe == 0:
                self._observe(request, client, topic, path, query)
            else:
                self._unobserve(request, client, topic)
        else:
            raise CoapError(Code.METHOD_NOT_ALLOWED, f"{_method(code)} not allowed here")

    def _body(self, request: RequestReceived, topic: str, now: float) -> bytes | None:
        """The whole request body, reassembled from Block1 transfers (RFC 7959 §2.5); None until complete."""
        msg = request.message
        block = msg.block1()
        limit = self.config.max_body_size
        if block is None:
            if len(msg.payload) > limit:
                raise CoapError(Code.REQUEST_ENTITY_TOO_LARGE, f"body over {limit} bytes")
            return msg.payload
        key = (request.peer, topic)
        upload = self._uploads.get(key)
        if block.num == 0:
            upload = self._uploads[key] = _Upload(bytearray(), now + self.config.exchange_lifetime)
        if upload is None or len(upload.body) != block.num * block.size:
            self._uploads.pop(key, None)
            raise CoapError(Code.REQUEST_ENTITY_INCOMPLETE, "block out of sequence")
        upload.body += msg.payload
        if len(upload.body) > limit:
            del self._uploads[key]
            self._reply(
                request,
                Code.REQUEST_ENTITY_TOO_LARGE,
                b"body too large",
                [(_SIZE1, codec.encode_uint(limit))],
            )
            return None
        if block.more:
            self._reply(
                request, Code.CONTINUE, b"", [(_BLOCK1, codec.encode_block(block.num, True, block.szx))]
            )
            return None
        del self._uploads[key]
        return bytes(upload.body)

    def _publish(
        self, request: RequestReceived, client: CoapClient, topic: str, query: dict[str, str], body: bytes
    ) -> None:
        msg = request.message
        qos = self._qos(query, msg)
        retain = query.get("retain", "false").lower() in ("true", "1")
        content_format = msg.content_format()
        props = EMPTY_PROPERTIES
        if content_format is not None and content_format in _MIME_OF:
            props = Properties(content_type=_MIME_OF[content_format])
        session = client.session
        assert session is not None
        code = session.publish(Message(topic, body, qos, retain, "", props))
        if code >= 0x80:
            self.count("publish_refused")
            raise CoapError(_coap_code_of(code), f"publish refused: reason 0x{code:02x}")
        self.count("publishes")
        options = []
        block = msg.block1()
        if block is not None:
            options.append((_BLOCK1, codec.encode_block(block.num, False, block.szx)))
        self._reply(request, Code.CHANGED, b"", options)

    def _qos(self, query: dict[str, str], msg: CoapMessage) -> int:
        text = query.get("qos")
        if text is not None:
            if text not in ("0", "1", "2"):
                raise CoapError(Code.BAD_REQUEST, "qos must be 0, 1 or 2")
            return int(text)
        return 1 if msg.mtype == int(Type.CON) else 0

    def _observe(
        self,
        request: RequestReceived,
        client: CoapClient,
        topic_filter: str,
        path: list[str],
        query: dict[str, str],
    ) -> None:
        session = client.session
        assert session is not None
        qos = self._qos(query, request.message) if "qos" in query else 1
        token = request.message.token
        previous = client.observations.get(token)
        if previous is None or previous.topic_filter != topic_filter or previous.peer != request.peer:
            if previous is not None:
                self._drop_waiting(client, previous)
            client.observations[token] = _Observation(request.peer, token, topic_filter, path)
        # else a re-registration (RFC 7641 §3.3.1): the sequence goes on
        client.held = []
        try:
            granted = session.subscribe([Subscription(topic_filter, qos)])[0]
        finally:
            held, client.held = client.held, None
        if granted >= 0x80:
            del client.observations[token]
            raise CoapError(_coap_code_of(granted), f"subscription refused: reason 0x{granted:02x}")
        self.count("observations")
        # The registration response carries the current value, a retained message if there is one (RFC 7641
        # §3.2, §4.1); other retained matches of a wildcard follow as notifications.
        options = [(_OBSERVE, codec.encode_uint(0))]
        payload = b""
        if held:
            message, held_qos, packet_id = held.pop(0)
            payload = message.payload
            content_type = message.properties.content_type
            if content_type in _FORMAT_OF:
                options.append((_CONTENT_FORMAT, codec.encode_uint(_FORMAT_OF[content_type])))
            if held_qos:
                self._ack(client, packet_id, held_qos)
        self._reply(request, Code.CONTENT, payload, options)
        for message, held_qos, packet_id in held:
            self.notify(client, message, held_qos, packet_id)

    def _unobserve(self, request: RequestReceived, client: CoapClient, topic_filter: str) -> None:
        session = client.session
        assert session is not None
        observation = client.observations.pop(request.message.token, None)
        if observation is not None:
            self._drop_waiting(client, observation)
        if not any(o.topic_filter == topic_filter for o in client.observations.values()):
            session.unsubscribe([topic_filter])
        self._reply(request, Code.CONTENT)

    def _read(
        self, request: RequestReceived, client_id: str, topic: str, query: dict[str, str], now: float
    ) -> None:
        """A GET without Observe reads the topic's retained message (2.05 or 4.04), in Block2 parts if big."""
        why = validate_topic(topic)
        if why is not None:
            raise CoapError(Code.BAD_REQUEST, f"invalid topic: {why}")
        client = self._client_for(request, client_id, query, now)
        if client is None:
            return
        session = client.session
        assert session is not None
        message = session.read_retained(topic)
        if message is None:
            raise CoapError(Code.NOT_FOUND, "no retained message")
        options: list[tuple[int, bytes]] = []
        content_type = message.properties.content_type
        if content_type in _FORMAT_OF:
            options.append((_CONTENT_FORMAT, codec.encode_uint(_FORMAT_OF[content_type])))
        payload = self._block2(request.message, message.payload, options)
        self._reply(request, Code.CONTENT, payload, options)

    def _block2(self, msg: CoapMessage, payload: bytes, options: list[tuple[int, bytes]]) -> bytes:
        """The part of ``payload`` the request asked for (RFC 7959 §2.4), adding Block2 and Size2 options."""
        block = msg.block2()
        size = self.config.block_size
        szx = size.bit_length() - 5
        num = 0
        if block is not None:
            szx = min(szx, block.szx)
            size = 1 << (szx + 4)
            num = block.num
        if block is None and len(payload) <= size:
            return payload
        start = num * size
        if start >= len(payload) and num:
            raise CoapError(Code.BAD_OPTION, "block beyond the end")
        more = start + size < len(payload)
        options.append((_BLOCK2, codec.encode_block(num, more, szx)))
        if num == 0:
            options.append((_SIZE2, codec.encode_uint(len(payload))))
        return payload[start : start + size]

    # --- notifications

    def notify(self, client: CoapClient, message: Message, qos: int, packet_id: int) -> None:
        """Send ``message`` to every observation of ``client`` whose filter matches it (RFC 7641 §4.2), or
        queue it behind the observation's outstanding CON notification (RFC 7641 §4.5.2)."""
        if self.on_output is not None:
            self.on_output()
        targets = [o for o in client.observations.values() if filter_matches(o.topic_filter, message.topic)]
        delivery = None
        if targets and packet_id and self._confirmable(qos):
            delivery = _Delivery(packet_id, qos, len(targets))
        now = self.clock.now()
        for observation in targets:
            if not observation.outstanding:
                self._send_notification(client, observation, message, qos, delivery, now)
                continue
            waiting = observation.waiting
            if waiting and waiting[-1].qos == 0:  # only the latest state matters (RFC 7641 §4.5.2)
                waiting.pop()
                self.count("notifications_superseded")
            waiting.append(_Waiting(message, qos, delivery))
        if not targets:
            self.count("deliveries_without_observer")
        if qos and delivery is None:  # after the sends: the session may deliver its next message at once
            self._ack(client, packet_id, qos)

    def _confirmable(self, qos: int) -> bool:
        notify_type = self.config.notify_type
        return notify_type == "con" or (notify_type == "qos" and qos > 0)

    def _send_notification(
        self,
        client: CoapClient,
        observation: _Observation,
        message: Message,
        qos: int,
        delivery: _Delivery | None,
        now: float,
    ) -> None:
        """One notification with the next sequence number (RFC 7641 §4.4); a CON one is outstanding until
        its ACK, RST or give-up."""
        observation.seq = (observation.seq + 1) & 0xFFFFFF
        options = [(_OBSERVE, codec.encode_uint(observation.seq))]
        content_type = message.properties.content_type
        if content_type in _FORMAT_OF:
            options.append((_CONTENT_FORMAT, codec.encode_uint(_FORMAT_OF[content_type])))
        notification = CoapMessage(0, int(Code.CONTENT), 0, observation.token, options, message.payload)
        observation.last_payload = message.payload
        self.count("notifications")
        if self._confirmable(qos):
            observation.outstanding = True
            context = _SentNotification(client, observation, delivery)
            self.endpoint.send_con(observation.peer, notification, context, now)
        else:
            self.endpoint.send_non(observation.peer, notification)

    def _notification_done(self, context: object, now: float, *, cancel: bool) -> None:
        """A CON notification was acknowledged (the next waiting one goes out), or reset or never
        acknowledged (the observation is cancelled, RFC 7641 §4.5, and what waited is dropped)."""
        if not isinstance(context, _SentNotification):
            return
        client, observation = context.client, context.observation
        observation.outstanding = False
        current = client.observations.get(observation.token) is observation
        if cancel:
            if current:
                self._cancel(client, observation)
            self._drop_waiting(client, observation)
        else:
            waiting = observation.waiting
            while current and waiting and not observation.outstanding:
                item = waiting.popleft()
                self._send_notification(client, observation, item.message, item.qos, item.delivery, now)
        # last: settling lets the session deliver its next message, which must queue behind these
        self._settle(client, context.delivery)

    def _cancel(self, client: CoapClient, observation: _Observation) -> None:
        """End an observation the client reset or never acknowledged, unsubscribing its filter unless another
        observation uses it."""
        del client.observations[observation.token]
        self.count("observations_cancelled")
        log.info(
            "coap %s: observation of %s cancelled by the client",
            client.client_id,
            observation.topic_filter,
            extra=client_fields(client.client_id, client.peer, "coap"),
        )
        session = client.session
        if session is not None and not any(
            o.topic_filter == observation.topic_filter for o in client.observations.values()
        ):
            session.unsubscribe([observation.topic_filter])

    def _drop_waiting(self, client: CoapClient, observation: _Observation) -> None:
        """Drop the notifications waiting on an observation that ends, settling their deliveries."""
        waiting = observation.waiting
        while waiting:
            self._settle(client, waiting.popleft().delivery)
            self.count("notifications_dropped")

    def _settle(self, client: CoapClient, delivery: _Delivery | None) -> None:
        """One observation is done with ``delivery``; the last one acknowledges it to the session."""
        if delivery is None:
            return
        delivery.owed -= 1
        if delivery.owed == 0:
            self._ack(client, delivery.packet_id, delivery.qos)

    @staticmethod
    def _ack(client: CoapClient, packet_id: int, qos: int) -> None:
        session = client.session
        if session is not None:
            if qos == 2:
                session.received(packet_id)
            session.ack(packet_id)

    # --- endings

    def end_client(self, client: CoapClient, why: str, *, publish_will: bool, detached: bool = False) -> None:
        """End ``client``: observations get a final 4.09 notification (RFC 7641 §3.2), the session closes."""
        if self.clients.get(client.client_id) is client:
            del self.clients[client.client_id]
        log.log(
            logging.DEBUG if why == "idle" else logging.INFO,
            "coap %s (%s): %s",
            client.client_id,
            client.peer,
            why,
            extra=client_fields(client.client_id, client.peer, "coap"),
        )
        session, client.session = client.session, None  # the deliveries end with it, unacknowledged
        for observation in client.observations.values():
            self._drop_waiting(client, observation)
            final = CoapMessage(0, int(Code.CONFLICT), 0, observation.token, [], why.encode())
            self.endpoint.send_non(observation.peer, final)
        client.observations.clear()
        waiting, client.waiting = client.waiting, []
        for request in waiting:  # never leave an exchange unanswered
            self._reply(request, Code.CONFLICT, why.encode())
        if session is not None and not detached:
            session.close(publish_will=publish_will)

    def shutdown(self) -> None:
        for client in list(self.clients.values()):
            session, client.session = client.session, None
            if session is not None:
                session.close(publish_will=False)
        self.clients.clear()


def codec_name(code: int) -> str:
    return f"{code >> 5}.{code & 0x1F:02d}"


def _method(code: int) -> str:
    return {GET: "GET", POST: "POST", PUT: "PUT", DELETE: "DELETE"}.get(code, codec_name(code))


def _coap_code_of(reason_code: int) -> int:
    """The CoAP response for a broker refusal: ACL 4.03, authentication 4.01, congestion 5.03, else 4.00."""
    if reason_code == 0x87:
        return int(Code.FORBIDDEN)
    if reason_code in (0x86, 0x8C):
        return int(Code.UNAUTHORIZED)
    if reason_code in (0x97, 0x89, 0x88):
        return int(Code.SERVICE_UNAVAILABLE)
    return int(Code.BAD_REQUEST)
