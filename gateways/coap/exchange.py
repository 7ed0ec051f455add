"""The CoAP message layer, pure: deduplication, confirmable retransmission and token matching (RFC 7252 §4).

One :class:`CoapEndpoint` serves one UDP socket for the CoAP and LwM2M gateways. It turns datagrams into
events (a new request, a response to a request we sent, an acknowledgement or reset of a confirmable message
we sent, a give-up after MAX_RETRANSMIT) and the application's answers into datagrams:

- An incoming CON is remembered by (peer, message id) with its response for EXCHANGE_LIFETIME, so that a
  duplicate is answered again without reaching the application (§4.5); NON duplicates are dropped for
  NON_LIFETIME. The cache is bounded in entries and bytes (the oldest entry goes first) whatever the request
  rate: this is what kept aiocoap's server growing without bound in our measurements.
- Outgoing CON messages are retransmitted after ACK_TIMEOUT x a random factor, doubling each time, up to
  MAX_RETRANSMIT times (§4.2); the ACK or RST, or giving up, comes back as an event with the caller's context.
- Requests we send are matched to their responses by (peer, token), piggybacked or separate (§5.2); a
  separate CON response is acknowledged here.

Malformed datagrams: a CON with a format error gets a RST (§4.2), anything else malformed is ignored (§4.3);
both are counted.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from core.logging import PeerLog
from gateways.coap import codec
from gateways.coap.codec import CoapFormatError, CoapMessage
from gateways.coap.numbers import Code, Timing, Type

__all__ = [
    "Acknowledged",
    "CoapEndpoint",
    "EndpointMetrics",
    "Event",
    "GaveUp",
    "Rejected",
    "RequestReceived",
    "ResponseReceived",
]

CON, NON, ACK, RST = int(Type.CON), int(Type.NON), int(Type.ACK), int(Type.RST)

log = logging.getLogger("mqgate.coap")


@dataclass(slots=True)
class RequestReceived:
    """A new request (not a duplicate) from ``peer``; answer it with :meth:`CoapEndpoint.respond`."""

    peer: Hashable
    message: CoapMessage


@dataclass(slots=True)
class ResponseReceived:
    """The response to a request we sent with :meth:`CoapEndpoint.request`."""

    peer: Hashable
    message: CoapMessage
    context: object


@dataclass(slots=True)
class Acknowledged:
    """The peer acknowledged a confirmable message we sent with :meth:`CoapEndpoint.send_con`."""

    peer: Hashable
    context: object


@dataclass(slots=True)
class Rejected:
    """The peer answered a message we sent with RST (for a notification: it cancels the observation)."""

    peer: Hashable
    context: object


@dataclass(slots=True)
class GaveUp:
    """No ACK after MAX_RETRANSMIT retransmissions, or no response to a request in time."""

    peer: Hashable
    context: object


Event = RequestReceived | ResponseReceived | Acknowledged | Rejected | GaveUp


@dataclass(slots=True)
class EndpointMetrics:
    """Counters of the message layer."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0  # the datagrams' bytes (over DTLS: the decrypted CoAP messages)
    bytes_out: int = 0
    malformed: int = 0
    duplicates: int = 0
    retransmissions: int = 0
    gave_up: int = 0
    dedup_evicted: int = 0
    unmatched: int = 0


@dataclass(slots=True)
class _Seen:
    """A request we received: when to forget it and the response to repeat for a duplicate."""

    expires_at: float
    response: bytes | None = None


@dataclass(slots=True)
class _Outgoing:
    """A confirmable message we sent and its retransmission state."""

    peer: Hashable
    data: bytes
    context: object
    timeout: float
    next_at: float
    retransmissions: int = 0
    expects_response: bool = False
    token: bytes = b""


@dataclass(slots=True)
class _Request:
    """A request we sent that waits for its response; an observe request keeps receiving notifications."""

    context: object
    deadline: float
    mid: int
    acknowledged: bool = False
    observe: bool = False


@dataclass
class CoapEndpoint:
    """The message layer of one socket. ``max_dedup_entries`` and ``max_dedup_bytes`` bound the duplicate
    cache; ``exchange_lifetime`` overrides the RFC's derived 247 s; ``request_timeout`` bounds how long a
    request we sent waits for a (separate) response."""

    timing: Timing = field(default_factory=Timing)
    rng: random.Random = field(default_factory=random.Random)
    max_dedup_entries: int = 100_000
    max_dedup_bytes: int = 16 * 1024 * 1024
    exchange_lifetime: float | None = None
    request_timeout: float = 60.0
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    protocol: str = "coap"  # of the log lines about bad input: "coap" or "lwm2m"

    def __post_init__(self) -> None:
        self._seen: OrderedDict[tuple[Hashable, int], _Seen] = OrderedDict()
        self._seen_bytes = 0
        self._outgoing: dict[tuple[Hashable, int], _Outgoing] = {}
        self._requests: dict[tuple[Hashable, bytes], _Request] = {}
        self._timers: list[tuple[float, int, tuple[Hashable, int] | tuple[Hashable, bytes]]] = []
        self._seq = 0
        self._next_mid = self.rng.randrange(0x10000)
        self._outbox: list[tuple[Hashable, bytes]] = []
        self._bad_input = PeerLog(log, self.protocol)
        self._lifetime = (
            self.exchange_lifetime if self.exchange_lifetime is not None else self.timing.exchange_lifetime
        )

    # --- output

    def datagrams_to_send(self) -> list[tuple[Hashable, bytes]]:
        out, self._outbox = self._outbox, []
        return out

    def _send(self, peer: Hashable, data: bytes) -> None:
        self._outbox.append((peer, data))
        metrics = self.metrics
        metrics.datagrams_out += 1
        metrics.bytes_out += len(data)

    def next_mid(self) -> int:
        mid = self._next_mid
        self._next_mid = (mid + 1) & 0xFFFF
        return mid

    # --- input

    def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> Event | None:
        """Decode one datagram and return what it means for the application, if anything."""
        metrics = self.metrics
        metrics.datagrams_in += 1
        metrics.bytes_in += len(data)
        try:
            msg = codec.decode(data)
        except CoapFormatError as exc:
            self.metrics.malformed += 1
            self._bad_input.warning(peer, "dropped a malformed datagram: %s", exc)
            if exc.mtype == CON and exc.mid is not None:
                self._send(peer, codec.reset(exc.mid))
            return None
        mtype = msg.mtype
        if mtype in (CON, NON):
            if msg.code == 0:
                if mtype == CON:  # a CoAP ping (§4.3)
                    self._send(peer, codec.reset(msg.mid))
                return None
            if msg.code < 64 or msg.code >= 192:
                return self._request_or_duplicate(msg, peer, now)
            return self._response(msg, peer, now)
        outgoing = self._outgoing.pop((peer, msg.mid), None)
        if outgoing is None:
            if mtype == ACK and msg.code >= 64:
                return self._response(msg, peer, now)
            self.metrics.unmatched += 1
            return None
        if mtype == RST:
            self._requests.pop((peer, outgoing.token), None)
            return Rejected(peer, outgoing.context)
        if outgoing.expects_response:
            if msg.code == 0:
                request = self._requests.get((peer, outgoing.token))
                if request is not None:
                    request.acknowledged = True
                return None
            return self._response(msg, peer, now)
        return Acknowledged(peer, outgoing.context)

    def _request_or_duplicate(self, msg: CoapMessage, peer: Hashable, now: float) -> Event | None:
        key = (peer, msg.mid)
        seen = self._seen.get(key)
        if seen is not None and seen.expires_at > now:
            self.metrics.duplicates += 1
            if msg.mtype == CON and seen.response is not None:
                self._send(peer, seen.response)
            return None
        lifetime = self._lifetime if msg.mtype == CON else self.timing.non_lifetime
        self._remember(key, _Seen(now + lifetime), now)
        if msg.code >= 32:  # reserved classes 1, 6 and 7 (§3): not a request we can serve
            if msg.mtype == CON:
                self._send(peer, codec.reset(msg.mid))
            return None
        return RequestReceived(peer, msg)

    def _remember(self, key: tuple[Hashable, int], seen: _Seen, now: float) -> None:
        cache = self._seen
        if key in cache:
            old = cache.pop(key)
            self._seen_bytes -= len(old.response or b"")
        cache[key] = seen
        while cache:
            oldest_key, oldest = next(iter(cache.items()))
            over = len(cache) > self.max_dedup_entries or self._seen_bytes > self.max_dedup_bytes
            if oldest.expires_at > now and not over:
                break
            del cache[oldest_key]
            self._seen_bytes -= len(oldest.response or b"")
            if over:
                self.metrics.dedup_evicted += 1

    def _response(self, msg: CoapMessage, peer: Hashable, now: float) -> Event | None:
        key = (peer, msg.token)
        request = self._requests.get(key)
        if request is None:
            self.metrics.unmatched += 1
            if msg.mtype == CON:  # an unexpected response is rejected (§5.3.2, RFC 7641 §3.6)
                self._send(peer, codec.reset(msg.mid))
            return None
        if msg.mtype == CON:
            self._send(peer, codec.empty_ack(msg.mid))
        if request.observe and msg.observe() is not None and msg.code < 128:
            request.deadline = float("inf")  # notifications follow until cancelled (RFC 7641 §3.3)
        else:
            del self._requests[key]
        self._outgoing.pop((peer, request.mid), None)
        return ResponseReceived(peer, msg, request.context)

    # --- answering requests

    def respond(self, request: RequestReceived, response: CoapMessage) -> None:
        """Answer ``request``: piggybacked in the ACK of a CON (§5.2.1), or a NON with a fresh message id."""
        req = request.message
        response.token = req.token
        if req.mtype == CON:
            response.mtype = ACK
            response.mid = req.mid
        else:
            response.mtype = NON
            response.mid = self.next_mid()
        data = codec.encode(response)
        seen = self._seen.get((request.peer, req.mid))
        if seen is not None and req.mtype == CON:
            seen.response = data
            self._seen_bytes += len(data)
        self._send(request.peer, data)

    # --- sending our own messages

    def send_non(self, peer: Hashable, message: CoapMessage) -> None:
        message.mtype = NON
        message.mid = self.next_mid()
        self._send(peer, codec.encode(message))

    def send_con(self, peer: Hashable, message: CoapMessage, context: object, now: float) -> None:
        """Send a confirmable message; its ACK, RST or the give-up comes back as an event with ``context``."""
        message.mtype = CON
        message.mid = self.next_mid()
        self._track(peer, message, context, now, expects_response=False)

    def request(
        self, peer: Hashable, message: CoapMessage, context: object, now: float, *, confirmable: bool = True
    ) -> None:
        """Send a request (its token must be unique towards ``peer``); the response comes back as
        :class:`ResponseReceived`, or :class:`GaveUp` after ``request_timeout``. For an observe request every
        notification comes back the same way until :meth:`cancel`."""
        message.mid = self.next_mid()
        observe = message.observe() == 0
        self._requests[(peer, message.token)] = _Request(
            context, now + self.request_timeout, message.mid, observe=observe
        )
        self._push(now + self.request_timeout, (peer, message.token))
        if confirmable:
            message.mtype = CON
            self._track(peer, message, context, now, expects_response=True)
        else:
            message.mtype = NON
            self._send(peer, codec.encode(message))

    def _track(
        self, peer: Hashable, message: CoapMessage, context: object, now: float, *, expects_response: bool
    ) -> None:
        data = codec.encode(message)
        timeout = self.timing.ack_timeout * self.rng.uniform(1.0, self.timing.ack_random_factor)
        outgoing = _Outgoing(peer, data, context, timeout, now + timeout, 0, expects_response, message.token)
        self._outgoing[(peer, message.mid)] = outgoing
        self._push(outgoing.next_at, (peer, message.mid))
        self._send(peer, data)

    def cancel(self, peer: Hashable, token: bytes) -> None:
        """Forget a request we sent (its response, if it comes, is ignored)."""
        request = self._requests.pop((peer, token), None)
        if request is not None:
            self._outgoing.pop((peer, request.mid), None)

    # --- timers

    def _push(self, at: float, key: tuple[Hashable, int] | tuple[Hashable, bytes]) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (at, self._seq, key))

    def get_timer(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> list[Event]:
        """Retransmit due CON messages; give up after MAX_RETRANSMIT or past a request's deadline."""
        events: list[Event] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, key = heapq.heappop(timers)
            if isinstance(key[1], bytes):
                request = self._requests.get(key)
                if request is not None and request.deadline <= now:
                    del self._requests[key]
                    self._outgoing.pop((key[0], request.mid), None)
                    self.metrics.gave_up += 1
                    events.append(GaveUp(key[0], request.context))
                continue
            outgoing = self._outgoing.get(key)
            if outgoing is None or outgoing.next_at > now:
                continue
            if outgoing.retransmissions >= self.timing.max_retransmit:
                del self._outgoing[key]
                self.metrics.gave_up += 1
                if outgoing.expects_response:
                    self._requests.pop((outgoing.peer, outgoing.token), None)
                events.append(GaveUp(outgoing.peer, outgoing.context))
                continue
            outgoing.retransmissions += 1
            outgoing.timeout *= 2
            outgoing.next_at = now + outgoing.timeout
            self.metrics.retransmissions += 1
            self._send(outgoing.peer, outgoing.data)
            self._push(outgoing.next_at, key)
        return events

    @property
    def dedup_entries(self) -> int:
        return len(self._seen)

    @property
    def dedup_bytes(self) -> int:
        return self._seen_bytes


def error_response(code: Code | int, text: str = "") -> CoapMessage:
    """A response with ``code`` and a diagnostic payload (RFC 7252 §5.5.2)."""
    return CoapMessage(ACK, int(code), 0, b"", [], text.encode())
