"""Pure tests of the CoAP message layer (:class:`CoapEndpoint`) and of the CoAP gateway (:class:`CoapGateway`)
on the embedded core broker.

No sockets and no sleeps. The endpoint tests feed datagrams with explicit ``now`` floats and a seeded
``random.Random``, so the retransmission times can be computed from the same seed. The gateway tests use
``tests/unit/harness.py``'s :class:`GatewayHarness` (shared with ``test_mqttsn_gateway.py``) with a
:class:`CoapGateway`: ``pump`` does what ``gateways/coap/adapter.py`` does (open the sessions the gateway
asked for by driving the embedded broker's coroutines to completion, then collect the datagrams to send).
Requests are built with the codec and responses decoded with it.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable
from typing import Any, TypeVar, cast

import pytest

from core.broker.broker import Broker
from core.broker.embedded import EmbeddedBroker, EmbeddedSession
from core.broker.session import Session
from core.broker.types import AuthResult, ClientInfo, Credentials, Message, Subscription
from core.clock import FakeClock
from core.config import CoapConfig
from core.mqtt.codec import Properties
from gateways.coap import codec
from gateways.coap.codec import CoapMessage, decode, encode, encode_block, encode_uint
from gateways.coap.exchange import (
    Acknowledged,
    CoapEndpoint,
    Event,
    GaveUp,
    Rejected,
    RequestReceived,
    ResponseReceived,
)
from gateways.coap.gateway import CoapGateway, SessionRequest
from gateways.coap.numbers import Code, ContentFormat, OptionNumber, Timing, Type, code_name
from tests.unit.harness import GatewayHarness, RecordingSink

T = TypeVar("T")

CON, NON, ACK, RST = int(Type.CON), int(Type.NON), int(Type.ACK), int(Type.RST)
GET, POST, PUT, DELETE = int(Code.GET), int(Code.POST), int(Code.PUT), int(Code.DELETE)
URI_PATH = int(OptionNumber.URI_PATH)
URI_QUERY = int(OptionNumber.URI_QUERY)
OBSERVE = int(OptionNumber.OBSERVE)
CONTENT_FORMAT = int(OptionNumber.CONTENT_FORMAT)
BLOCK1 = int(OptionNumber.BLOCK1)
BLOCK2 = int(OptionNumber.BLOCK2)

A: Hashable = ("10.0.0.1", 5683)
B: Hashable = ("10.0.0.2", 5683)


def message(
    mtype: int,
    code: int,
    mid: int,
    token: bytes = b"",
    options: Iterable[tuple[int, bytes]] = (),
    payload: bytes = b"",
) -> CoapMessage:
    return CoapMessage(mtype, int(code), mid, token, list(options), payload)


def datagram(
    mtype: int,
    code: int,
    mid: int,
    token: bytes = b"",
    options: Iterable[tuple[int, bytes]] = (),
    payload: bytes = b"",
) -> bytes:
    return encode(message(mtype, code, mid, token, options, payload))


def endpoint(seed: int = 1, **kwargs: Any) -> CoapEndpoint:
    return CoapEndpoint(Timing(), random.Random(seed), **kwargs)


def sent(ep: CoapEndpoint) -> list[tuple[Hashable, CoapMessage]]:
    return [(peer, decode(data)) for peer, data in ep.datagrams_to_send()]


def first_timeout(seed: int) -> float:
    """The first retransmission timeout an endpoint seeded with ``seed`` draws for its first CON: the
    endpoint draws its first message id, then ACK_TIMEOUT x uniform(1, ACK_RANDOM_FACTOR) (RFC 7252 §4.2)."""
    rng = random.Random(seed)
    rng.randrange(0x10000)
    return 2.0 * rng.uniform(1.0, 1.5)


def next_timer(ep: CoapEndpoint) -> float:
    deadline = ep.get_timer()
    assert deadline is not None
    return deadline


def run_timers(ep: CoapEndpoint, until: float) -> list[Event]:
    """Call ``handle_timer`` at every deadline up to ``until``, as the adapter's timer does."""
    events: list[Event] = []
    while (deadline := ep.get_timer()) is not None and deadline <= until:
        events += ep.handle_timer(deadline)
    return events


def request_event(event: object) -> RequestReceived:
    assert isinstance(event, RequestReceived), event
    return event


# === CoapEndpoint: requests we receive (RFC 7252 §4.2, §4.5, §5.2.1)


def test_a_new_con_request_is_a_request_received_event() -> None:
    ep = endpoint()
    event = ep.receive_datagram(datagram(CON, GET, 0x1234, b"tok", [(URI_PATH, b"x")]), A, 100.0)
    event = request_event(event)
    assert event.peer == A
    assert (event.message.mtype, event.message.code, event.message.mid) == (CON, GET, 0x1234)
    assert event.message.token == b"tok"
    assert event.message.uri_path() == ["x"]
    assert ep.datagrams_to_send() == []
    assert ep.metrics.datagrams_in == 1


def test_respond_piggybacks_the_response_in_an_ack_with_the_request_mid_and_token() -> None:
    ep = endpoint()
    event = request_event(ep.receive_datagram(datagram(CON, GET, 0x1234, b"tok"), A, 100.0))
    ep.respond(event, message(0, Code.CONTENT, 0, payload=b"hello"))
    ((peer, response),) = sent(ep)
    assert peer == A
    assert response == message(ACK, Code.CONTENT, 0x1234, b"tok", payload=b"hello")


def test_respond_to_a_non_request_is_a_non_response_with_a_fresh_message_id() -> None:
    ep = endpoint(seed=3)
    expected_mid = random.Random(3).randrange(0x10000)
    event = request_event(ep.receive_datagram(datagram(NON, GET, 0x0042, b"nn"), A, 1.0))
    ep.respond(event, message(0, Code.CONTENT, 0, payload=b"v"))
    ((_, response),) = sent(ep)
    assert response == message(NON, Code.CONTENT, expected_mid, b"nn", payload=b"v")


def test_duplicate_con_within_exchange_lifetime_is_answered_from_the_cache_without_an_event() -> None:
    ep = endpoint()  # the RFC's EXCHANGE_LIFETIME, 247 s
    request = datagram(CON, PUT, 7, b"t", [(URI_PATH, b"x")], b"body")
    event = request_event(ep.receive_datagram(request, A, 100.0))
    ep.respond(event, message(0, Code.CHANGED, 0))
    ((_, first),) = ep.datagrams_to_send()
    for now in (100.5, 200.0, 346.99):
        assert ep.receive_datagram(request, A, now) is None
        assert ep.datagrams_to_send() == [(A, first)]
    assert ep.metrics.duplicates == 3
    # EXCHANGE_LIFETIME later the message id may be reused: a new request.
    assert isinstance(ep.receive_datagram(request, A, 347.0), RequestReceived)


def test_exchange_lifetime_is_configurable() -> None:
    ep = endpoint(exchange_lifetime=10.0)
    request = datagram(CON, GET, 7)
    ep.respond(request_event(ep.receive_datagram(request, A, 0.0)), message(0, Code.CONTENT, 0))
    ep.datagrams_to_send()
    assert ep.receive_datagram(request, A, 9.9) is None
    assert isinstance(ep.receive_datagram(request, A, 10.0), RequestReceived)


def test_duplicate_con_before_the_response_is_ready_is_dropped_then_answered_once_it_is() -> None:
    ep = endpoint()
    request = datagram(CON, GET, 9, b"t")
    event = request_event(ep.receive_datagram(request, A, 0.0))
    assert ep.receive_datagram(request, A, 2.5) is None
    assert ep.datagrams_to_send() == []
    ep.respond(event, message(0, Code.CONTENT, 0, payload=b"late"))
    ((_, response),) = ep.datagrams_to_send()
    assert ep.receive_datagram(request, A, 5.0) is None
    assert ep.datagrams_to_send() == [(A, response)]


def test_the_same_message_id_from_another_peer_is_another_request() -> None:
    ep = endpoint()
    request = datagram(CON, GET, 9)
    assert isinstance(ep.receive_datagram(request, A, 0.0), RequestReceived)
    assert isinstance(ep.receive_datagram(request, B, 0.0), RequestReceived)
    assert ep.metrics.duplicates == 0


def test_non_duplicates_are_dropped_within_non_lifetime() -> None:
    ep = endpoint()
    assert Timing().non_lifetime == 145.0
    request = datagram(NON, PUT, 11, b"n", payload=b"v")
    event = request_event(ep.receive_datagram(request, A, 0.0))
    ep.respond(event, message(0, Code.CHANGED, 0))
    ep.datagrams_to_send()
    for now in (0.1, 144.99):
        assert ep.receive_datagram(request, A, now) is None
    assert ep.datagrams_to_send() == []  # a NON duplicate is not answered again
    assert ep.metrics.duplicates == 2
    assert isinstance(ep.receive_datagram(request, A, 145.0), RequestReceived)


def test_dedup_cache_is_bounded_in_entries_and_evicts_the_oldest_first() -> None:
    ep = endpoint(max_dedup_entries=10)
    for mid in range(15):
        event = request_event(ep.receive_datagram(datagram(CON, GET, mid), A, 1.0))
        ep.respond(event, message(0, Code.CONTENT, 0))
        assert ep.dedup_entries <= 10
    ep.datagrams_to_send()
    assert ep.dedup_entries == 10
    assert ep.metrics.dedup_evicted == 5
    # The newest are still remembered, the oldest are forgotten (a retransmission would be new again).
    assert ep.receive_datagram(datagram(CON, GET, 14), A, 2.0) is None
    assert len(ep.datagrams_to_send()) == 1
    assert ep.receive_datagram(datagram(CON, GET, 5), A, 2.0) is None
    assert isinstance(ep.receive_datagram(datagram(CON, GET, 4), A, 2.0), RequestReceived)


def test_dedup_cache_is_bounded_in_bytes_and_evicts_the_oldest_first() -> None:
    ep = endpoint(max_dedup_bytes=1000)
    response_size = 0
    for mid in range(50):
        event = request_event(ep.receive_datagram(datagram(CON, GET, mid, b"tk"), A, 1.0))
        ep.respond(event, message(0, Code.CONTENT, 0, payload=bytes(100)))
        ((_, data),) = ep.datagrams_to_send()
        response_size = len(data)
        # Bounded by the limit plus the response just stored (eviction happens on the next insertion).
        assert ep.dedup_bytes <= 1000 + response_size
    assert ep.metrics.dedup_evicted > 0
    assert ep.dedup_entries <= 1000 // response_size + 1
    assert ep.receive_datagram(datagram(CON, GET, 49, b"tk"), A, 2.0) is None  # newest kept
    assert isinstance(ep.receive_datagram(datagram(CON, GET, 0, b"tk"), A, 2.0), RequestReceived)


def test_expired_dedup_entries_are_dropped_without_counting_as_evictions() -> None:
    ep = endpoint(exchange_lifetime=10.0, max_dedup_entries=100)
    for mid in range(5):
        ep.receive_datagram(datagram(CON, GET, mid), A, 0.0)
    ep.receive_datagram(datagram(CON, GET, 99), A, 20.0)
    assert ep.dedup_entries == 1
    assert ep.metrics.dedup_evicted == 0


def test_dedup_memory_stays_flat_under_100000_distinct_requests_from_1000_peers() -> None:
    bound = 2000
    ep = endpoint(max_dedup_entries=bound, max_dedup_bytes=64 * 1024)
    peers = [(f"10.1.{p >> 8}.{p & 0xFF}", 5683) for p in range(1000)]
    requests = [datagram(CON, PUT, mid, b"tk", [(URI_PATH, b"t")], b"v") for mid in range(100)]
    peak = 0
    for i in range(100_000):
        event = ep.receive_datagram(requests[i // 1000], peers[i % 1000], i * 0.001)
        assert event is not None
        ep.respond(cast(RequestReceived, event), CoapMessage(0, 0x44, 0))
        ep.datagrams_to_send()
        if ep.dedup_entries > peak:
            peak = ep.dedup_entries
    assert peak <= bound
    assert ep.dedup_entries == bound
    assert ep.dedup_bytes <= 64 * 1024
    assert ep.metrics.dedup_evicted == 100_000 - bound
    assert ep.metrics.duplicates == 0
    assert ep.get_timer() is None  # nothing else was kept per request


# === CoapEndpoint: confirmable messages we send (RFC 7252 §4.2, §4.8)


@pytest.mark.parametrize("seed", [0, 1, 7, 42, 1234])
def test_send_con_retransmits_at_ack_timeout_times_random_factor_then_doubling_then_gives_up(
    seed: int,
) -> None:
    ep = endpoint(seed=seed)
    t0 = first_timeout(seed)
    assert 2.0 <= t0 < 3.0
    notification = message(0, Code.CONTENT, 0, b"ob", [(OBSERVE, b"\x02")], b"v")
    ep.send_con(A, notification, "ctx", 10.0)
    ((peer, first),) = ep.datagrams_to_send()
    assert peer == A
    assert decode(first).mtype == CON
    assert decode(first).mid == notification.mid
    # Retransmissions at t0, 3 t0, 7 t0, 15 t0; the give-up 16 t0 after the last one (31 t0 in all).
    deadlines = [10.0 + t0 * k for k in (1, 3, 7, 15, 31)]
    for expected in deadlines[:4]:
        deadline = next_timer(ep)
        assert deadline == pytest.approx(expected)
        assert ep.handle_timer(deadline - 1e-6) == []
        assert ep.datagrams_to_send() == []
        assert ep.handle_timer(deadline) == []
        assert ep.datagrams_to_send() == [(A, first)]
    give_up = next_timer(ep)
    assert give_up == pytest.approx(deadlines[4])
    assert ep.handle_timer(give_up - 1e-6) == []
    assert ep.handle_timer(give_up) == [GaveUp(A, "ctx")]
    assert ep.datagrams_to_send() == []
    assert ep.metrics.retransmissions == 4
    assert ep.metrics.gave_up == 1
    assert deadlines[4] - 10.0 <= Timing().max_transmit_wait
    assert ep.get_timer() is None


def test_ack_of_a_con_is_acknowledged_with_its_context_and_stops_retransmission() -> None:
    ep = endpoint()
    msg = message(0, Code.CONTENT, 0, b"ob")
    ep.send_con(A, msg, ("ctx", 1), 0.0)
    ep.datagrams_to_send()
    assert ep.receive_datagram(codec.empty_ack(msg.mid), A, 1.0) == Acknowledged(A, ("ctx", 1))
    assert ep.handle_timer(1000.0) == []
    assert ep.datagrams_to_send() == []
    assert ep.metrics.retransmissions == 0
    # A duplicate ACK matches nothing.
    assert ep.receive_datagram(codec.empty_ack(msg.mid), A, 2.0) is None
    assert ep.metrics.unmatched == 1


def test_rst_of_a_con_is_rejected_with_its_context() -> None:
    ep = endpoint()
    msg = message(0, Code.CONTENT, 0, b"ob")
    ep.send_con(A, msg, "ctx", 0.0)
    ep.datagrams_to_send()
    assert ep.receive_datagram(codec.reset(msg.mid), A, 1.0) == Rejected(A, "ctx")
    assert ep.handle_timer(1000.0) == []
    assert ep.datagrams_to_send() == []


def test_ack_from_another_peer_does_not_acknowledge() -> None:
    ep = endpoint(seed=2)
    msg = message(0, Code.CONTENT, 0, b"ob")
    ep.send_con(A, msg, "ctx", 0.0)
    ep.datagrams_to_send()
    assert ep.receive_datagram(codec.empty_ack(msg.mid), B, 1.0) is None
    assert ep.metrics.unmatched == 1
    assert ep.handle_timer(first_timeout(2)) == []
    assert len(ep.datagrams_to_send()) == 1  # still retransmitted


def test_send_non_uses_consecutive_fresh_message_ids() -> None:
    ep = endpoint(seed=9)
    mid = random.Random(9).randrange(0x10000)
    ep.send_non(A, message(0, Code.CONTENT, 0, b"a"))
    ep.send_non(A, message(0, Code.CONTENT, 0, b"b"))
    out = sent(ep)
    assert [(m.mtype, m.mid) for _, m in out] == [(NON, mid), (NON, (mid + 1) & 0xFFFF)]
    assert ep.get_timer() is None


# === CoapEndpoint: requests we send and their responses (RFC 7252 §5.2, §5.3.2)


def test_request_matched_with_a_piggybacked_response() -> None:
    ep = endpoint()
    req = message(0, GET, 0, b"rq1", [(URI_PATH, b"3")])
    ep.request(A, req, "read", 0.0)
    ((_, out),) = sent(ep)
    assert (out.mtype, out.code, out.token) == (CON, GET, b"rq1")
    response = datagram(ACK, Code.CONTENT, out.mid, b"rq1", payload=b"42")
    event = ep.receive_datagram(response, A, 0.5)
    assert isinstance(event, ResponseReceived)
    assert (event.peer, event.context, event.message.payload) == (A, "read", b"42")
    assert ep.handle_timer(1000.0) == []  # neither retransmission nor give-up
    assert ep.datagrams_to_send() == []


def test_request_with_an_empty_ack_then_a_separate_con_response_which_the_endpoint_acks() -> None:
    ep = endpoint(seed=4)
    req = message(0, GET, 0, b"rq2")
    ep.request(A, req, "read", 0.0)
    ep.datagrams_to_send()
    assert ep.receive_datagram(codec.empty_ack(req.mid), A, 0.5) is None
    assert ep.handle_timer(50.0) == []
    assert ep.datagrams_to_send() == []  # the empty ACK stopped the retransmissions
    event = ep.receive_datagram(datagram(CON, Code.CONTENT, 0x7777, b"rq2", payload=b"v"), A, 51.0)
    assert isinstance(event, ResponseReceived)
    assert (event.context, event.message.payload) == ("read", b"v")
    assert sent(ep) == [(A, message(ACK, 0, 0x7777))]
    assert ep.handle_timer(1000.0) == []


def test_separate_response_before_the_ack_also_stops_retransmission() -> None:
    ep = endpoint()
    req = message(0, GET, 0, b"rq3")
    ep.request(A, req, "ctx", 0.0)
    ep.datagrams_to_send()
    event = ep.receive_datagram(datagram(NON, Code.CONTENT, 0x0101, b"rq3"), A, 0.5)
    assert isinstance(event, ResponseReceived)
    assert ep.handle_timer(1000.0) == []
    assert ep.datagrams_to_send() == []


def test_request_gives_up_after_request_timeout_once_acknowledged() -> None:
    ep = endpoint(request_timeout=30.0)
    req = message(0, GET, 0, b"rq4")
    ep.request(A, req, "ctx", 0.0)
    ep.datagrams_to_send()
    assert ep.receive_datagram(codec.empty_ack(req.mid), A, 1.0) is None
    assert ep.handle_timer(29.99) == []
    assert ep.handle_timer(30.0) == [GaveUp(A, "ctx")]
    assert ep.metrics.gave_up == 1
    # A response after the give-up is unmatched (and, being CON, still acknowledged).
    assert ep.receive_datagram(datagram(CON, Code.CONTENT, 0x0202, b"rq4"), A, 31.0) is None
    assert ep.metrics.unmatched == 1


def test_request_without_any_answer_gives_up_exactly_once() -> None:
    # request_timeout shorter than the retransmission span: the deadline wins, retransmissions stop.
    ep = endpoint(request_timeout=10.0)
    ep.request(A, message(0, GET, 0, b"q1"), "short", 0.0)
    assert ep.handle_timer(9.99) == []
    assert ep.handle_timer(10.0) == [GaveUp(A, "short")]
    ep.datagrams_to_send()
    assert ep.handle_timer(1000.0) == []
    assert ep.datagrams_to_send() == []
    # request_timeout longer: MAX_RETRANSMIT wins, and the later deadline adds nothing.
    ep = endpoint(seed=6, request_timeout=500.0)
    ep.request(A, message(0, GET, 0, b"q2"), "long", 0.0)
    give_up = 31 * first_timeout(6)
    assert run_timers(ep, give_up - 1e-6) == []
    assert run_timers(ep, give_up + 1e-9) == [GaveUp(A, "long")]
    assert len(ep.datagrams_to_send()) == 1 + 4
    assert run_timers(ep, 1000.0) == []
    assert ep.metrics.gave_up == 1


def test_rst_to_a_request_is_rejected_and_a_later_response_is_unmatched() -> None:
    ep = endpoint()
    req = message(0, GET, 0, b"rq5")
    ep.request(A, req, "ctx", 0.0)
    ep.datagrams_to_send()
    assert ep.receive_datagram(codec.reset(req.mid), A, 0.5) == Rejected(A, "ctx")
    assert ep.receive_datagram(datagram(NON, Code.CONTENT, 0x0303, b"rq5"), A, 1.0) is None
    assert ep.metrics.unmatched == 1
    assert ep.handle_timer(1000.0) == []


def test_non_request_is_sent_as_non_and_matched_by_token() -> None:
    ep = endpoint()
    ep.request(A, message(0, GET, 0, b"nq"), "ctx", 0.0, confirmable=False)
    ((_, out),) = sent(ep)
    assert out.mtype == NON
    event = ep.receive_datagram(datagram(NON, Code.CONTENT, 0x0404, b"nq"), A, 0.5)
    assert isinstance(event, ResponseReceived)
    assert event.context == "ctx"


def test_cancelled_request_ignores_its_response_and_neither_retransmits_nor_gives_up() -> None:
    ep = endpoint()
    req = message(0, GET, 0, b"cq")
    ep.request(A, req, "ctx", 0.0)
    ep.datagrams_to_send()
    ep.cancel(A, b"cq")
    assert ep.handle_timer(1000.0) == []
    assert ep.datagrams_to_send() == []
    assert ep.receive_datagram(datagram(ACK, Code.CONTENT, req.mid, b"cq"), A, 1001.0) is None
    assert ep.metrics.unmatched == 1


def test_responses_with_an_unknown_token_are_counted_unmatched() -> None:
    ep = endpoint()
    ep.request(A, message(0, GET, 0, b"known"), "ctx", 0.0)
    ep.datagrams_to_send()
    assert ep.receive_datagram(datagram(NON, Code.CONTENT, 0x0505, b"other"), A, 0.1) is None
    assert ep.receive_datagram(datagram(ACK, Code.CONTENT, 0x0506, b"other"), A, 0.2) is None
    assert ep.receive_datagram(datagram(CON, Code.CONTENT, 0x0507, b"other"), A, 0.3) is None
    assert ep.receive_datagram(datagram(NON, Code.CONTENT, 0x0508, b"known"), B, 0.4) is None  # wrong peer
    assert ep.metrics.unmatched == 4


def test_unmatched_con_response_is_rejected_with_rst() -> None:
    ep = endpoint()
    assert ep.receive_datagram(datagram(CON, Code.CONTENT, 0x0507, b"other"), A, 0.3) is None
    assert sent(ep) == [(A, message(RST, 0, 0x0507))]


def test_unmatched_empty_ack_and_rst_are_counted() -> None:
    ep = endpoint()
    assert ep.receive_datagram(codec.empty_ack(1), A, 0.0) is None
    assert ep.receive_datagram(codec.reset(2), A, 0.0) is None
    assert ep.metrics.unmatched == 2
    assert ep.datagrams_to_send() == []


# === CoapEndpoint: bad input (RFC 7252 §3, §4.2, §4.3)


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x49, 0x01, 0x12, 0x34]) + bytes(9),  # token length 9
        bytes([0x44, 0x01, 0x12, 0x34, 0xAA]),  # token runs past the datagram
        bytes([0x40, 0x01, 0x12, 0x34, 0xF0]),  # option nibble 15
        bytes([0x40, 0x01, 0x12, 0x34, 0xFF]),  # payload marker without payload
        bytes([0x40, 0x00, 0x12, 0x34, 0x00]),  # an Empty message with content
    ],
    ids=["tkl9", "short-token", "nibble15", "bare-marker", "empty-with-content"],
)
def test_malformed_con_gets_a_rst_and_no_event(data: bytes) -> None:
    ep = endpoint()
    assert ep.receive_datagram(data, A, 0.0) is None
    assert sent(ep) == [(A, message(RST, 0, 0x1234))]
    assert ep.metrics.malformed == 1


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x59, 0x01, 0x12, 0x34]) + bytes(9),  # NON, token length 9
        bytes([0x50, 0x01, 0x12, 0x34, 0xF0]),  # NON, option nibble 15
        bytes([0x60, 0x45, 0x12, 0x34, 0xFF]),  # ACK, payload marker without payload
        bytes([0x70, 0x00, 0x12, 0x34, 0x01]),  # RST with content
        bytes([0x80, 0x01, 0x12, 0x34]),  # CON of version 2
        bytes([0x40, 0x01, 0x12]),  # shorter than the header
        b"",
    ],
    ids=["non-tkl9", "non-nibble15", "ack-marker", "rst-content", "version2", "short", "empty"],
)
def test_malformed_non_ack_rst_or_unreadable_datagrams_are_ignored_and_counted(data: bytes) -> None:
    ep = endpoint()
    assert ep.receive_datagram(data, A, 0.0) is None
    assert ep.datagrams_to_send() == []
    assert ep.metrics.malformed == 1


def test_coap_ping_empty_con_gets_a_rst() -> None:
    ep = endpoint()
    assert ep.receive_datagram(bytes([0x40, 0x00, 0xAB, 0xCD]), A, 0.0) is None
    assert sent(ep) == [(A, message(RST, 0, 0xABCD))]
    assert ep.metrics.malformed == 0


def test_empty_non_is_ignored() -> None:
    ep = endpoint()
    assert ep.receive_datagram(bytes([0x50, 0x00, 0xAB, 0xCD]), A, 0.0) is None
    assert ep.datagrams_to_send() == []


@pytest.mark.parametrize("code", [0xC0, 0xC1, 0xE0, 0xFF], ids=["6.00", "6.01", "7.00", "7.31"])
def test_con_with_a_reserved_class_6_or_7_code_gets_a_rst_and_non_is_ignored(code: int) -> None:
    ep = endpoint()
    assert ep.receive_datagram(datagram(CON, code, 0x2222, b"t"), A, 0.0) is None
    assert sent(ep) == [(A, message(RST, 0, 0x2222))]
    assert ep.receive_datagram(datagram(NON, code, 0x2223, b"t"), A, 0.0) is None
    assert ep.datagrams_to_send() == []


@pytest.mark.parametrize("code", [0x20, 0x21, 0x3F], ids=["1.00", "1.01", "1.31"])
def test_con_with_a_reserved_class_1_code_gets_a_rst(code: int) -> None:
    ep = endpoint()
    assert ep.receive_datagram(datagram(CON, code, 0x3333, b"t"), A, 0.0) is None
    assert sent(ep) == [(A, message(RST, 0, 0x3333))]
    assert ep.receive_datagram(datagram(NON, code, 0x3334, b"t"), A, 0.0) is None
    assert ep.datagrams_to_send() == []


# === CoapGateway on the embedded broker


class RefusingBroker(EmbeddedBroker):
    """Refuses every client whose password is not ``good`` with ``reason_code``."""

    def __init__(self, broker: Broker, clock: FakeClock, reason_code: int = 0x86) -> None:
        super().__init__(broker, clock)
        self.reason_code = reason_code

    async def authenticate(self, client: ClientInfo, credentials: Credentials) -> AuthResult:
        return AuthResult(0 if credentials.password == b"good" else self.reason_code)


class AclSession:
    """An embedded session whose ACL denies everything under ``secret/`` (reason 0x87); publishes under
    ``quota/`` and ``odd/`` are refused with quota exceeded (0x97) and payload format invalid (0x99)."""

    def __init__(self, inner: EmbeddedSession) -> None:
        self.inner = inner

    REFUSALS = {"secret/": 0x87, "quota/": 0x97, "odd/": 0x99}

    def publish(self, message: Message) -> int:
        for prefix, reason_code in self.REFUSALS.items():
            if message.topic.startswith(prefix):
                return reason_code
        return self.inner.publish(message)

    def subscribe(self, subscriptions: list[Subscription]) -> list[int]:
        if any(s.topic_filter.startswith("secret/") for s in subscriptions):
            return [0x87] * len(subscriptions)
        return self.inner.subscribe(subscriptions)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class AclBroker(EmbeddedBroker):
    async def open_session(self, client: ClientInfo, **kwargs: Any) -> Any:
        return AclSession(await super().open_session(client, **kwargs))


def req(
    code: int,
    path: str,
    *query: str,
    mtype: int = CON,
    token: bytes = b"",
    options: Iterable[tuple[int, bytes]] = (),
    payload: bytes = b"",
) -> CoapMessage:
    """A request for ``path`` (segments split on ``/``) with ``query`` items ``key=value``."""
    opts = [(URI_PATH, segment.encode()) for segment in path.strip("/").split("/") if segment]
    opts += [(URI_QUERY, item.encode()) for item in query]
    opts += list(options)
    return CoapMessage(mtype, code, 0, token, opts, payload)


def observe_option(value: int) -> tuple[int, bytes]:
    return (OBSERVE, encode_uint(value))


class Harness(GatewayHarness[SessionRequest, CoapMessage]):
    """A CoAP gateway on the embedded broker with a fake clock, pumped synchronously like the UDP adapter."""

    def __init__(self, broker_class: type[EmbeddedBroker] = EmbeddedBroker, **config: Any) -> None:
        super().__init__(broker_class)
        self.config = CoapConfig(**config)
        self.endpoint = CoapEndpoint(
            Timing(),
            random.Random(7),
            max_dedup_entries=self.config.max_dedup_entries,
            max_dedup_bytes=self.config.max_dedup_bytes,
            exchange_lifetime=self.config.exchange_lifetime,
        )
        self.gateway: CoapGateway = CoapGateway(self.config, self.clock, self.endpoint)
        self.raw: list[tuple[Hashable, bytes]] = []
        self._mid = 0x100

    def session(self, client_id: str) -> Session:
        return self.broker.sessions[client_id]

    # --- the adapter's job

    def _decode(self, data: bytes) -> CoapMessage:
        return decode(data)

    def _sent(self, peer: Hashable, data: bytes) -> None:
        self.raw.append((peer, data))
        super()._sent(peer, data)

    def _open_session(self, request: SessionRequest) -> None:
        """What CoapUdpGateway does for a session request."""
        now = self.clock.now()
        client = ClientInfo(
            self.config.clientid_prefix + request.client_id, "coap", str(request.peer), request.username
        )
        credentials = Credentials(request.username, request.password.encode() if request.password else None)
        session = self.open_broker_session(
            client,
            credentials,
            clean_start=True,
            expiry=0,
            will=None,
            sink=request.client,
            max_inflight=self.config.max_inflight,
        )
        if isinstance(session, int):
            self.gateway.session_refused(request, session, now)
        else:
            self.gateway.session_opened(request, session, now)

    # --- the device side

    def feed(self, peer: Hashable, msg: CoapMessage) -> CoapMessage:
        """Hand one request to the gateway without pumping; a fresh message id unless one is set."""
        if not msg.mid:
            self._mid += 1
            msg.mid = self._mid
        self.gateway.receive_datagram(encode(msg), peer, self.clock.now())
        return msg

    def send(self, peer: Hashable, msg: CoapMessage) -> list[CoapMessage]:
        """One datagram from ``peer``; returns what the gateway sent to ``peer``."""
        self.feed(peer, msg)
        self.pump()
        return self.take(peer)

    def send_bytes(self, peer: Hashable, data: bytes) -> list[CoapMessage]:
        self.gateway.receive_datagram(data, peer, self.clock.now())
        self.pump()
        return self.take(peer)

    def ask(self, peer: Hashable, msg: CoapMessage) -> CoapMessage:
        """Send a request and return its one response, checked to belong to the request."""
        out = self.send(peer, msg)
        assert len(out) == 1, out
        (response,) = out
        assert response.token == msg.token
        if msg.mtype == CON:
            assert (response.mtype, response.mid) == (ACK, msg.mid)
        else:
            assert response.mtype == NON
        return response

    # --- common exchanges

    def observe(self, peer: Hashable, topic_filter: str, client_id: str, token: bytes, *query: str) -> None:
        response = self.ask(
            peer,
            req(
                GET,
                f"mqtt/{topic_filter}",
                f"c={client_id}",
                *query,
                token=token,
                options=[observe_option(0)],
            ),
        )
        assert code_name(response.code) == "2.05"
        assert response.observe() == 0

    def connect(self, peer: Hashable, client_id: str, *query: str) -> str:
        response = self.ask(peer, req(POST, "mqtt/connection", f"clientid={client_id}", *query, token=b"c"))
        assert code_name(response.code) == "2.01", response
        return response.payload.decode()


def codes(messages: list[CoapMessage]) -> list[str]:
    return [code_name(m.code) for m in messages]


# --- publish (EMQX 4.3 /mqtt/{topic} and 5.x /ps/{topic})


def test_con_put_publishes_at_qos1_and_answers_2_04_piggybacked() -> None:
    h = Harness()
    watcher = h.watch()
    response = h.ask(A, req(PUT, "mqtt/sensors/t1", "c=dev1", token=b"p1", payload=b"21.5"))
    assert code_name(response.code) == "2.04"
    assert watcher.messages_with_qos() == [("sensors/t1", b"21.5", 1)]
    assert not watcher.deliveries[0].message.retain
    assert h.session("dev1").client.protocol == "coap"
    assert h.gateway.counters["publishes"] == 1


def test_non_put_publishes_at_qos0_and_answers_with_a_non() -> None:
    h = Harness()
    watcher = h.watch()
    response = h.ask(A, req(PUT, "mqtt/sensors/t1", "c=dev1", mtype=NON, token=b"n", payload=b"v"))
    assert code_name(response.code) == "2.04"
    assert watcher.messages_with_qos() == [("sensors/t1", b"v", 0)]


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_qos_query_overrides_the_message_type(qos: int) -> None:
    h = Harness()
    watcher = h.watch()
    h.ask(A, req(POST, "mqtt/q", "c=dev1", f"qos={qos}", mtype=NON, payload=b"v"))
    assert watcher.messages_with_qos() == [("q", b"v", qos)]


def test_retain_true_publishes_a_retained_message() -> None:
    h = Harness()
    watcher = h.watch()
    h.ask(A, req(PUT, "mqtt/state/door", "c=dev1", "retain=true", payload=b"open"))
    assert watcher.deliveries[0].message.retain
    retained = h.broker.retained.get("state/door")
    assert retained is not None
    assert retained.payload == b"open"


def test_content_format_of_a_publish_becomes_the_mqtt5_content_type() -> None:
    h = Harness()
    watcher = h.watch()
    cf = (CONTENT_FORMAT, encode_uint(int(ContentFormat.JSON)))
    h.ask(A, req(PUT, "mqtt/j", "c=dev1", options=[cf], payload=b"{}"))
    assert watcher.deliveries[0].message.properties.content_type == "application/json"


def test_ps_post_publishes_and_ps_put_is_method_not_allowed() -> None:
    h = Harness()
    watcher = h.watch()
    assert code_name(h.ask(A, req(POST, "ps/a/b", "clientid=dev1", payload=b"x")).code) == "2.04"
    assert watcher.messages_with_qos() == [("a/b", b"x", 1)]
    assert code_name(h.ask(A, req(PUT, "ps/a/b", "clientid=dev1", payload=b"y")).code) == "4.05"
    assert len(watcher.deliveries) == 1


def test_duplicate_publish_is_answered_again_without_publishing_twice() -> None:
    h = Harness()
    watcher = h.watch()
    request = req(PUT, "mqtt/d", "c=dev1", token=b"d", payload=b"once")
    h.send(A, request)
    first = h.raw[-1][1]
    assert h.send(A, request) == [decode(first)]
    assert h.raw[-1][1] == first
    assert len(watcher.deliveries) == 1
    assert h.endpoint.metrics.duplicates == 1


def test_ping_gets_a_rst_from_the_gateway() -> None:
    h = Harness()
    assert h.send_bytes(A, bytes([0x40, 0x00, 0x12, 0x34])) == [message(RST, 0, 0x1234)]


# --- observe (RFC 7641)


def test_observe_subscribes_and_notifications_carry_increasing_sequence_numbers() -> None:
    h = Harness()
    h.observe(A, "room/+/temp", "obs", b"o1")
    assert "room/+/temp" in h.session("obs").subscriptions
    h.publish("room/1/temp", b"20")
    h.publish("room/2/temp", b"21")
    h.publish("room/2/humidity", b"50")
    notes = h.take(A)
    assert [(n.mtype, n.code, n.token, n.payload) for n in notes] == [
        (NON, int(Code.CONTENT), b"o1", b"20"),
        (NON, int(Code.CONTENT), b"o1", b"21"),
    ]
    sequence = [n.observe() or 0 for n in notes]
    assert 0 < sequence[0] < sequence[1]
    assert notes[0].mid != notes[1].mid


def test_observe_with_ps_style_and_content_format_given_back_on_notifications() -> None:
    h = Harness()
    response = h.ask(A, req(GET, "ps/j", "clientid=obs", token=b"o", options=[observe_option(0)]))
    assert code_name(response.code) == "2.05"
    cf = (CONTENT_FORMAT, encode_uint(int(ContentFormat.JSON)))
    h.ask(B, req(PUT, "mqtt/j", "c=pub", options=[cf], payload=b"{}"))
    (note,) = h.take(A)
    assert note.content_format() == int(ContentFormat.JSON)
    assert note.payload == b"{}"


def test_retained_message_at_registration_then_a_live_one_keep_increasing_sequence_numbers() -> None:
    h = Harness()
    h.publish("st/door", b"closed", retain=True)
    out = h.send(A, req(GET, "mqtt/st/door", "c=obs", token=b"o", options=[observe_option(0)]))
    h.publish("st/door", b"open")
    out += h.take(A)
    # the registration response carries the current (retained) value, RFC 7641 §4.1
    (registration,) = [m for m in out if m.mtype == ACK]
    (live,) = [m for m in out if m.mtype != ACK]
    assert (registration.payload, live.payload) == (b"closed", b"open")
    first, second = registration.observe(), live.observe()
    assert first is not None and second is not None
    assert second > first


def test_re_registration_with_the_same_token_keeps_the_sequence_increasing() -> None:
    h = Harness()
    h.observe(A, "re/t", "obs", b"o1")
    for payload in (b"1", b"2", b"3"):
        h.publish("re/t", payload)
    before = [n.observe() for n in h.take(A)]
    h.observe(A, "re/t", "obs", b"o1")
    h.publish("re/t", b"4")
    (after,) = h.take(A)
    last, new = before[-1], after.observe()
    assert last is not None and new is not None
    assert new > last


def test_unobserve_ends_the_observation_and_unsubscribes() -> None:
    h = Harness()
    h.observe(A, "u/t", "obs", b"o1")
    response = h.ask(A, req(GET, "mqtt/u/t", "c=obs", token=b"o1", options=[observe_option(1)]))
    assert code_name(response.code) == "2.05"
    assert "u/t" not in h.session("obs").subscriptions
    h.publish("u/t", b"x")
    assert h.take(A) == []


def test_observe_without_a_token_is_a_bad_request() -> None:
    h = Harness()
    response = h.ask(A, req(GET, "mqtt/t", "c=obs", options=[observe_option(0)]))
    assert code_name(response.code) == "4.00"


def test_qos1_delivery_with_notify_type_qos_is_a_con_acked_to_the_broker_only_after_the_ack() -> None:
    h = Harness()  # notify_type "qos", max_inflight 1
    h.observe(A, "q/t", "obs", b"o1")
    session = h.session("obs")
    h.publish("q/t", b"one", qos=1)
    h.publish("q/t", b"two", qos=1)
    (first,) = h.take(A)
    assert (first.mtype, first.payload) == (CON, b"one")
    assert len(session.inflight) == 1
    assert len(session.queue) == 1  # the window of 1 holds the second message back
    (second,) = h.send_bytes(A, codec.empty_ack(first.mid))
    assert (second.mtype, second.payload) == (CON, b"two")
    assert len(session.inflight) == 1
    assert not session.queue
    assert h.send_bytes(A, codec.empty_ack(second.mid)) == []
    assert not session.inflight
    second_seq, first_seq = second.observe(), first.observe()
    assert second_seq is not None and first_seq is not None and second_seq > first_seq


def test_qos2_delivery_with_notify_type_qos_completes_on_the_ack() -> None:
    h = Harness()
    h.observe(A, "q/t", "obs", b"o2", "qos=2")
    assert h.session("obs").subscriptions["q/t"].qos == 2
    h.publish("q/t", b"two", qos=2)
    (note,) = h.take(A)
    assert note.mtype == CON
    assert len(h.session("obs").inflight) == 1
    assert h.send_bytes(A, codec.empty_ack(note.mid)) == []
    assert not h.session("obs").inflight


def test_qos2_delivery_with_notify_type_non_is_completed_at_once() -> None:
    h = Harness(notify_type="non")
    h.observe(A, "q/t", "obs", b"o2", "qos=2")
    h.publish("q/t", b"two", qos=2)
    assert [n.mtype for n in h.take(A)] == [NON]
    assert not h.session("obs").inflight


def test_notifications_and_takeovers_ask_the_adapter_to_flush() -> None:
    h = Harness()
    flushes: list[None] = []
    h.gateway.on_output = lambda: flushes.append(None)
    h.observe(A, "t", "dup", b"o")
    h.publish("t", b"x")
    assert len(flushes) == 1
    h.broker.open_session(
        ClientInfo("dup"),
        clean_start=True,
        expiry=0,
        will=None,
        sink=RecordingSink(),
        max_inflight=10,
        now=h.clock.now(),
    )
    assert len(flushes) == 2


def test_qos0_delivery_with_notify_type_qos_is_a_non() -> None:
    h = Harness(notify_type="qos")
    h.observe(A, "q/t", "obs", b"o1")
    h.publish("q/t", b"zero", qos=0)
    (note,) = h.take(A)
    assert note.mtype == NON


def test_notify_type_non_sends_qos1_deliveries_as_non_and_acks_them_at_once() -> None:
    h = Harness(notify_type="non")
    h.observe(A, "q/t", "obs", b"o1")
    h.publish("q/t", b"one", qos=1)
    h.publish("q/t", b"two", qos=1)
    assert [(n.mtype, n.payload) for n in h.take(A)] == [(NON, b"one"), (NON, b"two")]
    assert not h.session("obs").inflight


def test_notify_type_con_sends_qos0_deliveries_as_con_and_the_ack_is_consumed() -> None:
    h = Harness(notify_type="con")
    h.observe(A, "c/t", "obs", b"o1")
    h.publish("c/t", b"zero")
    (note,) = h.take(A)
    assert note.mtype == CON
    assert h.send_bytes(A, codec.empty_ack(note.mid)) == []
    assert h.gateway.counters.get("observations_cancelled", 0) == 0
    h.publish("c/t", b"again")
    (again,) = h.take(A)
    assert again.mtype == CON


def test_rst_to_a_con_notification_cancels_the_observation_and_unsubscribes() -> None:
    h = Harness(notify_type="con")
    h.observe(A, "r/t", "obs", b"o1")
    h.publish("r/t", b"x", qos=1)
    (note,) = h.take(A)
    assert h.send_bytes(A, codec.reset(note.mid)) == []
    assert "r/t" not in h.session("obs").subscriptions
    assert not h.session("obs").inflight  # the delivery is settled, not left in the window
    assert h.gateway.counters["observations_cancelled"] == 1
    h.publish("r/t", b"y")
    assert h.take(A) == []


def test_rst_of_one_observation_keeps_the_subscription_of_another_on_the_same_filter() -> None:
    h = Harness(notify_type="con")
    h.observe(A, "s/t", "obs", b"o1")
    h.observe(A, "s/t", "obs", b"o2")
    h.publish("s/t", b"x")
    notes = h.take(A)
    assert sorted(n.token for n in notes) == [b"o1", b"o2"]
    by_token = {n.token: n for n in notes}
    h.send_bytes(A, codec.reset(by_token[b"o1"].mid))
    h.send_bytes(A, codec.empty_ack(by_token[b"o2"].mid))
    assert "s/t" in h.session("obs").subscriptions
    h.publish("s/t", b"y")
    assert [n.token for n in h.take(A)] == [b"o2"]


def test_con_notification_never_acknowledged_is_retransmitted_then_cancels_the_observation() -> None:
    h = Harness(notify_type="con", heartbeat=1000)  # no idle sweep in the way
    h.observe(A, "g/t", "obs", b"o1")
    h.publish("g/t", b"x", qos=1)
    (note,) = h.take(A)
    h.advance(Timing().max_transmit_wait)
    resent = h.take(A)
    assert resent == [note] * 4  # MAX_RETRANSMIT retransmissions of the same message
    assert "g/t" not in h.session("obs").subscriptions
    assert not h.session("obs").inflight
    assert h.gateway.counters["observations_cancelled"] == 1
    assert h.endpoint.metrics.gave_up == 1


# --- one outstanding CON notification per observation (RFC 7252 §4.7, RFC 7641 §4.5.1, §4.5.2)


def test_qos0_con_notifications_wait_for_the_ack_and_only_the_latest_goes_out() -> None:
    h = Harness(notify_type="con")
    h.observe(A, "fast/t", "obs", b"o1")
    for i in range(100):
        h.publish("fast/t", b"%d" % i)
    (first,) = h.take(A)
    assert (first.mtype, first.payload) == (CON, b"0")
    assert h.gateway.counters["notifications_superseded"] == 98
    (latest,) = h.send_bytes(A, codec.empty_ack(first.mid))
    assert (latest.mtype, latest.token, latest.payload) == (CON, b"o1", b"99")
    first_seq, latest_seq = first.observe(), latest.observe()
    assert first_seq is not None and latest_seq == first_seq + 1  # numbered when sent, not when queued
    assert h.send_bytes(A, codec.empty_ack(latest.mid)) == []
    assert h.gateway.counters["notifications"] == 2


def test_qos1_con_notifications_wait_in_order_and_none_is_lost() -> None:
    h = Harness(notify_type="con", max_inflight=4)
    h.observe(A, "ord/t", "obs", b"o1")
    session = h.session("obs")
    payloads = [b"m%d" % i for i in range(10)]
    for payload in payloads:
        h.publish("ord/t", payload, qos=1)
    (note,) = h.take(A)
    assert (len(session.inflight), len(session.queue)) == (4, 6)  # 1 sent, 3 waiting here, 6 in the session
    received = [note.payload]
    while True:
        out = h.send_bytes(A, codec.empty_ack(note.mid))
        if not out:
            break
        (note,) = out
        assert note.mtype == CON
        received.append(note.payload)
    assert received == payloads
    assert not session.inflight and not session.queue
    assert h.gateway.counters.get("notifications_superseded", 0) == 0


def test_waiting_qos0_notification_is_superseded_but_qos1_ones_keep_their_place() -> None:
    h = Harness(max_inflight=2)  # notify_type "qos": QoS 1 by CON, QoS 0 by NON
    h.observe(A, "mix/t", "obs", b"o1", "qos=1")
    for payload, qos in ((b"one", 1), (b"a", 0), (b"two", 1), (b"b", 0), (b"c", 0)):
        h.publish("mix/t", payload, qos=qos)
    (one,) = h.take(A)  # the NON ones wait too: sent now, they would overtake "two"
    (two,) = h.send_bytes(A, codec.empty_ack(one.mid))
    assert (two.mtype, two.payload) == (CON, b"two")
    (c,) = h.send_bytes(A, codec.empty_ack(two.mid))
    assert (c.mtype, c.payload) == (NON, b"c")
    assert h.gateway.counters["notifications_superseded"] == 2
    assert not h.session("obs").inflight
    h.publish("mix/t", b"d")
    assert [n.payload for n in h.take(A)] == [b"d"]  # nothing outstanding: at once


def test_rst_of_the_outstanding_con_drops_the_waiting_notifications_and_settles_their_deliveries() -> None:
    h = Harness(notify_type="con", max_inflight=3)
    h.observe(A, "rw/t", "obs", b"o1")
    session = h.session("obs")
    for i in range(5):
        h.publish("rw/t", b"%d" % i, qos=1)
    (note,) = h.take(A)
    assert h.send_bytes(A, codec.reset(note.mid)) == []
    assert h.gateway.counters["observations_cancelled"] == 1
    assert h.gateway.counters["notifications_dropped"] == 2
    assert not session.inflight and not session.queue  # the rest found no observer and were acknowledged
    assert "rw/t" not in session.subscriptions


def test_give_up_on_the_outstanding_con_drops_the_waiting_one() -> None:
    h = Harness(notify_type="con", heartbeat=1000)
    h.observe(A, "gw/t", "obs", b"o1")
    h.publish("gw/t", b"x")
    h.publish("gw/t", b"y")
    h.advance(Timing().max_transmit_wait)
    assert {n.payload for n in h.take(A)} == {b"x"}
    assert h.gateway.counters["observations_cancelled"] == 1
    assert h.gateway.counters["notifications_dropped"] == 1


def test_unobserve_drops_the_waiting_notifications_and_a_late_ack_sends_nothing() -> None:
    h = Harness(notify_type="con", max_inflight=2)
    h.observe(A, "uw/t", "obs", b"o1")
    h.publish("uw/t", b"1", qos=1)
    h.publish("uw/t", b"2", qos=1)
    (note,) = h.take(A)
    h.ask(A, req(GET, "mqtt/uw/t", "c=obs", token=b"o1", options=[observe_option(1)]))
    assert h.gateway.counters["notifications_dropped"] == 1
    assert h.send_bytes(A, codec.empty_ack(note.mid)) == []
    assert not h.session("obs").inflight


def test_a_qos1_delivery_to_two_observations_is_acknowledged_once_both_acked() -> None:
    h = Harness(notify_type="con")
    h.observe(A, "two/t", "obs", b"o1")
    h.observe(A, "two/t", "obs", b"o2")
    session = h.session("obs")
    h.publish("two/t", b"x", qos=1)
    by_token = {n.token: n for n in h.take(A)}
    assert sorted(by_token) == [b"o1", b"o2"]
    h.send_bytes(A, codec.empty_ack(by_token[b"o1"].mid))
    assert len(session.inflight) == 1
    h.send_bytes(A, codec.empty_ack(by_token[b"o2"].mid))
    assert not session.inflight


# --- read of the retained message, Block2 (RFC 7959 §2.4)


def test_get_without_observe_reads_the_retained_message_or_4_04() -> None:
    h = Harness()
    h.publish("r/t", b"value", retain=True)
    response = h.ask(A, req(GET, "mqtt/r/t", "c=rd", token=b"g"))
    assert (code_name(response.code), response.payload) == ("2.05", b"value")
    assert response.option(BLOCK2) is None
    assert code_name(h.ask(A, req(GET, "mqtt/r/none", "c=rd", token=b"g")).code) == "4.04"


def test_read_gives_back_the_content_format_of_the_retained_message() -> None:
    h = Harness()
    h.publisher.publish(
        Message("r/j", b"{}", 0, True, properties=Properties(content_type="application/json"))
    )
    response = h.ask(A, req(GET, "mqtt/r/j", "c=rd"))
    assert response.content_format() == int(ContentFormat.JSON)


def test_read_of_a_large_retained_message_is_sent_in_block2_parts() -> None:
    h = Harness(block_size=16)
    payload = bytes(range(40))
    h.publish("big", payload, retain=True)
    first = h.ask(A, req(GET, "mqtt/big", "c=rd", token=b"b"))
    block = first.block2()
    assert block is not None
    assert (block.num, block.more, block.size) == (0, True, 16)
    assert first.size2() == 40
    assert first.payload == payload[:16]
    second = h.ask(A, req(GET, "mqtt/big", "c=rd", token=b"b", options=[(BLOCK2, encode_block(1, False, 0))]))
    block = second.block2()
    assert block is not None
    assert (block.num, block.more, block.size) == (1, True, 16)
    assert second.size2() is None
    assert second.payload == payload[16:32]
    last = h.ask(A, req(GET, "mqtt/big", "c=rd", token=b"b", options=[(BLOCK2, encode_block(2, False, 0))]))
    block = last.block2()
    assert block is not None
    assert (block.num, block.more) == (2, False)
    assert last.payload == payload[32:]
    beyond = h.ask(A, req(GET, "mqtt/big", "c=rd", token=b"b", options=[(BLOCK2, encode_block(3, False, 0))]))
    assert code_name(beyond.code) == "4.02"


def test_block2_size_asked_by_the_client_is_used_when_smaller() -> None:
    h = Harness()  # block_size 1024
    payload = bytes(100)
    h.publish("big", payload, retain=True)
    response = h.ask(A, req(GET, "mqtt/big", "c=rd", options=[(BLOCK2, encode_block(0, False, 1))]))
    block = response.block2()
    assert block is not None
    assert (block.num, block.more, block.size) == (0, True, 32)
    assert response.size2() == 100
    assert len(response.payload) == 32


# --- Block1 (RFC 7959 §2.5)


def block1(num: int, more: bool, szx: int = 0) -> tuple[int, bytes]:
    return (BLOCK1, encode_block(num, more, szx))


def test_block1_upload_is_reassembled_and_published_once() -> None:
    h = Harness()
    watcher = h.watch()
    body = bytes(range(40))
    parts = [(0, True, body[:16]), (1, True, body[16:32]), (2, False, body[32:])]
    responses = [
        h.ask(A, req(PUT, "mqtt/up", "c=dev", token=b"u", options=[block1(n, m)], payload=p))
        for n, m, p in parts
    ]
    assert codes(responses) == ["2.31", "2.31", "2.04"]
    blocks = [r.block1() for r in responses]
    assert [(b.num, b.more, b.szx) for b in blocks if b is not None] == [
        (0, True, 0),
        (1, True, 0),
        (2, False, 0),
    ]
    assert watcher.messages_with_qos() == [("up", body, 1)]


def test_block1_out_of_order_is_4_08() -> None:
    h = Harness()
    watcher = h.watch()
    h.ask(A, req(PUT, "mqtt/up", "c=dev", options=[block1(0, True)], payload=bytes(16)))
    skipped = h.ask(A, req(PUT, "mqtt/up", "c=dev", options=[block1(2, False)], payload=bytes(4)))
    assert code_name(skipped.code) == "4.08"
    # Without a block 0 first, the transfer is incomplete too.
    orphan = h.ask(A, req(PUT, "mqtt/other", "c=dev", options=[block1(1, False)], payload=bytes(4)))
    assert code_name(orphan.code) == "4.08"
    assert watcher.deliveries == []


def test_block1_body_over_max_body_size_is_4_13_with_size1() -> None:
    h = Harness(max_body_size=32)
    watcher = h.watch()
    for num in (0, 1):
        response = h.ask(A, req(PUT, "mqtt/up", "c=dev", options=[block1(num, True)], payload=bytes(16)))
        assert code_name(response.code) == "2.31"
    too_big = h.ask(A, req(PUT, "mqtt/up", "c=dev", options=[block1(2, False)], payload=bytes(1)))
    assert code_name(too_big.code) == "4.13"
    assert too_big.size1() == 32
    assert watcher.deliveries == []


def test_block1_upload_abandoned_for_exchange_lifetime_is_forgotten() -> None:
    h = Harness(exchange_lifetime=60)
    h.ask(A, req(PUT, "mqtt/up", "c=dev", options=[block1(0, True)], payload=bytes(16)))
    h.advance(61)
    late = h.ask(A, req(PUT, "mqtt/up", "c=dev", options=[block1(1, False)], payload=bytes(4)))
    assert code_name(late.code) == "4.08"


def test_plain_body_over_max_body_size_is_4_13() -> None:
    h = Harness(max_body_size=32)
    watcher = h.watch()
    assert code_name(h.ask(A, req(PUT, "mqtt/up", "c=dev", payload=bytes(33))).code) == "4.13"
    assert code_name(h.ask(A, req(PUT, "mqtt/up", "c=dev", payload=bytes(32))).code) == "2.04"
    assert len(watcher.deliveries) == 1


# --- connection mode (EMQX 5.x)


def test_connection_returns_a_token_that_publish_heartbeat_and_delete_require() -> None:
    h = Harness()
    watcher = h.watch()
    token = h.connect(A, "cm", "username=u", "password=p")
    assert len(token) == 16
    assert h.session("cm").client.username == "u"
    ok = h.ask(A, req(POST, "ps/x", "clientid=cm", f"token={token}", payload=b"1"))
    assert code_name(ok.code) == "2.04"
    bad = h.ask(A, req(POST, "ps/x", "clientid=cm", "token=wrong", payload=b"2"))
    assert code_name(bad.code) == "4.01"
    assert watcher.messages_with_qos() == [("x", b"1", 1)]
    assert code_name(h.ask(A, req(PUT, "mqtt/connection", "clientid=cm", f"token={token}")).code) == "2.04"
    assert code_name(h.ask(A, req(PUT, "mqtt/connection", "clientid=cm", "token=nope")).code) == "4.01"
    assert code_name(h.ask(A, req(GET, "mqtt/connection", "clientid=cm", f"token={token}")).code) == "4.05"
    assert code_name(h.ask(A, req(DELETE, "mqtt/connection", "clientid=cm", f"token={token}")).code) == "2.02"
    assert "cm" not in h.gateway.clients
    assert "cm" not in h.broker.sessions


def test_connection_is_closed_after_one_and_a_half_heartbeats_of_silence() -> None:
    h = Harness(heartbeat=10)
    token = h.connect(A, "hb")
    response = h.ask(
        A, req(GET, "ps/hb/t", "clientid=hb", f"token={token}", token=b"o", options=[observe_option(0)])
    )
    assert code_name(response.code) == "2.05"
    h.advance(14.9)
    assert "hb" in h.gateway.clients
    assert "hb" in h.broker.sessions
    h.advance(0.1)  # 15 s = 1.5 x heartbeat
    assert "hb" not in h.gateway.clients
    assert "hb" not in h.broker.sessions
    (final,) = h.take(A)
    assert (code_name(final.code), final.token) == ("4.09", b"o")
    stale = h.ask(A, req(PUT, "mqtt/connection", "clientid=hb", f"token={token}"))
    assert code_name(stale.code) == "4.01"


def test_heartbeat_keeps_the_connection_open() -> None:
    h = Harness(heartbeat=10)
    token = h.connect(A, "hb")
    h.advance(10)
    assert code_name(h.ask(A, req(PUT, "mqtt/connection", "clientid=hb", f"token={token}")).code) == "2.04"
    h.advance(14.9)  # 24.9 s after the connection, 14.9 s after the heartbeat
    assert "hb" in h.gateway.clients
    h.advance(5.1)
    assert "hb" not in h.gateway.clients


def test_handle_timer_at_one_and_a_half_heartbeats_closes_a_silent_connection() -> None:
    h = Harness(heartbeat=10)
    start = h.clock.now()
    h.connect(A, "hb")
    h.gateway.handle_timer(start + 14.9)
    assert "hb" in h.gateway.clients
    h.gateway.handle_timer(start + 14.9 + 5)  # the next sweep, half a heartbeat later
    assert "hb" not in h.gateway.clients


def test_idle_connectionless_publisher_is_forgotten_but_an_observer_is_kept() -> None:
    h = Harness(heartbeat=10)
    h.ask(A, req(PUT, "mqtt/t", "c=pub", payload=b"v"))
    h.observe(B, "t", "obs", b"o")
    h.advance(20)
    assert "pub" not in h.gateway.clients
    assert "pub" not in h.broker.sessions
    assert "obs" in h.gateway.clients
    h.publish("t", b"still")
    assert [n.payload for n in h.take(B)] == [b"still"]


def test_connection_required_refuses_connectionless_requests_with_4_01() -> None:
    h = Harness(connection_required=True)
    assert code_name(h.ask(A, req(PUT, "mqtt/t", "c=dev", payload=b"v")).code) == "4.01"
    token = h.connect(A, "dev")
    assert code_name(h.ask(A, req(PUT, "mqtt/t", "c=dev", f"t={token}", payload=b"v")).code) == "2.04"


def test_connection_post_again_from_the_same_peer_returns_the_same_token() -> None:
    h = Harness()
    assert h.connect(A, "cm") == h.connect(A, "cm")


def test_shutdown_closes_every_session() -> None:
    h = Harness()
    h.connect(A, "cm")
    h.observe(B, "t", "obs", b"o")
    h.gateway.shutdown()
    assert h.gateway.clients == {}
    assert "cm" not in h.broker.sessions
    assert "obs" not in h.broker.sessions


# --- one client id, one session


def test_takeover_by_another_peer_ends_the_old_observations_with_a_final_4_09() -> None:
    h = Harness()
    h.observe(A, "news/#", "dup", b"oa")
    response = h.ask(B, req(PUT, "mqtt/news/x", "c=dup", payload=b"hello"))
    assert code_name(response.code) == "2.04"
    (final,) = h.take(A)  # no "hello" notification: the observation ended first
    assert (final.mtype, code_name(final.code), final.token) == (NON, "4.09", b"oa")
    assert h.gateway.clients["dup"].peer == B
    assert "news/#" not in h.session("dup").subscriptions


def test_takeover_by_an_mqtt_client_ends_the_coap_observations_with_a_final_4_09() -> None:
    h = Harness()
    h.observe(A, "t", "dup", b"oa")
    mqtt = RecordingSink()
    h.broker.open_session(
        ClientInfo("dup"),
        clean_start=True,
        expiry=0,
        will=None,
        sink=mqtt,
        max_inflight=10,
        now=h.clock.now(),
    )
    h.pump()
    (final,) = h.take(A)
    assert (code_name(final.code), final.token) == ("4.09", b"oa")
    assert "dup" not in h.gateway.clients
    assert h.session("dup").sink is mqtt


def test_a_second_connection_from_another_peer_takes_the_client_id_over() -> None:
    h = Harness()
    token = h.connect(A, "cm")
    h.ask(A, req(GET, "ps/t", "clientid=cm", f"token={token}", token=b"oa", options=[observe_option(0)]))
    new_token = h.connect(B, "cm")
    (final,) = h.take(A)
    assert (code_name(final.code), final.token) == ("4.09", b"oa")
    assert code_name(h.ask(A, req(PUT, "mqtt/connection", "clientid=cm", f"token={token}")).code) == "4.01"
    ok = h.ask(B, req(PUT, "mqtt/connection", "clientid=cm", f"token={new_token}"))
    assert code_name(ok.code) == "2.04"


def test_two_peers_racing_for_one_client_id_while_its_session_opens() -> None:
    h = Harness()
    request_a = h.feed(A, req(PUT, "mqtt/t", "c=race", token=b"a", payload=b"from A"))
    h.feed(B, req(GET, "mqtt/t", "c=race", token=b"ob", options=[observe_option(0)]))
    h.pump()
    out_a = h.take(A)
    assert [(m.mid, m.code >= 0x80) for m in out_a] == [(request_a.mid, True)]
    out_b = h.take(B)
    assert codes(out_b) == ["2.05"]
    assert "race" in h.gateway.clients


def test_mqtt_style_request_from_another_peer_cannot_use_a_connections_session_without_its_token() -> None:
    h = Harness(RefusingBroker)
    watcher = h.watch()
    h.connect(A, "cm", "password=good")
    spoof = h.ask(B, req(PUT, "mqtt/x", "c=cm", payload=b"spoof"))
    assert code_name(spoof.code) == "4.01"
    assert watcher.deliveries == []


# --- refused sessions, ACL


def test_refused_session_answers_4_01_to_every_waiting_request() -> None:
    h = Harness(RefusingBroker)
    requests = [
        h.feed(A, req(PUT, "mqtt/t", "c=bad", "p=wrong", token=b"1", payload=b"v")),
        h.feed(A, req(GET, "mqtt/t", "c=bad", "p=wrong", token=b"2", options=[observe_option(0)])),
        h.feed(A, req(PUT, "mqtt/t", "c=bad", "p=wrong", mtype=NON, token=b"3", payload=b"v")),
    ]
    assert h.take(A) == []
    h.pump()
    out = h.take(A)
    assert codes(out) == ["4.01", "4.01", "4.01"]
    assert [m.token for m in out] == [b"1", b"2", b"3"]
    assert [(m.mtype, m.mid) for m in out[:2]] == [(ACK, requests[0].mid), (ACK, requests[1].mid)]
    assert out[2].mtype == NON
    assert "bad" not in h.gateway.clients
    assert "bad" not in h.broker.sessions
    # The right password is tried afresh.
    response = h.ask(A, req(PUT, "mqtt/t", "c=bad", "p=good", payload=b"v"))
    assert code_name(response.code) == "2.04"


def test_session_refused_for_another_reason_is_5_03() -> None:
    class Unavailable(RefusingBroker):
        def __init__(self, broker: Broker, clock: FakeClock) -> None:
            super().__init__(broker, clock, reason_code=0x88)

    h = Harness(Unavailable)
    assert code_name(h.ask(A, req(PUT, "mqtt/t", "c=x", payload=b"v")).code) == "5.03"


def test_acl_denied_publish_and_subscribe_are_4_03() -> None:
    h = Harness(AclBroker)
    watcher = h.watch()
    assert code_name(h.ask(A, req(PUT, "mqtt/secret/a", "c=dev", payload=b"v")).code) == "4.03"
    denied = h.ask(A, req(GET, "mqtt/secret/#", "c=dev", token=b"o", options=[observe_option(0)]))
    assert code_name(denied.code) == "4.03"
    assert code_name(h.ask(A, req(PUT, "mqtt/open/a", "c=dev", payload=b"v")).code) == "2.04"
    assert watcher.messages_with_qos() == [("open/a", b"v", 1)]
    assert h.gateway.clients["dev"].observations == {}


def test_publish_refused_for_quota_is_5_03_and_for_another_reason_4_00() -> None:
    h = Harness(AclBroker)
    assert code_name(h.ask(A, req(PUT, "mqtt/quota/a", "c=dev", payload=b"v")).code) == "5.03"
    assert code_name(h.ask(A, req(PUT, "mqtt/odd/a", "c=dev", payload=b"v")).code) == "4.00"
    assert h.gateway.counters["publish_refused"] == 2


def test_requests_waiting_for_a_session_are_bounded() -> None:
    h = Harness()
    for i in range(16):
        h.feed(A, req(PUT, "mqtt/t", "c=slow", mtype=NON, token=bytes([i]), payload=b"v"))
    assert h.take(A) == []
    h.feed(A, req(PUT, "mqtt/t", "c=slow", mtype=NON, token=b"x", payload=b"v"))
    h.pump()
    out = h.take(A)
    assert codes(out[:1]) == ["5.03"]  # the 17th is refused at once
    assert out[0].token == b"x"
    assert codes(out[1:]) == ["2.04"] * 16


# --- bad requests


def test_unknown_critical_option_is_4_02_and_an_unknown_elective_one_is_ignored() -> None:
    h = Harness()
    watcher = h.watch()
    critical = h.ask(A, req(PUT, "mqtt/t", "c=dev", options=[(9, b"x")], payload=b"v"))
    assert code_name(critical.code) == "4.02"
    elective = h.ask(A, req(PUT, "mqtt/t", "c=dev", options=[(2, b"x")], payload=b"v"))
    assert code_name(elective.code) == "2.04"
    assert len(watcher.deliveries) == 1
    assert h.gateway.counters["responses_4.02"] == 1


@pytest.mark.parametrize(
    ("code", "path"),
    [(DELETE, "mqtt/t"), (int(Code.FETCH), "mqtt/t"), (POST, ".well-known/core"), (PUT, "ps/t")],
    ids=["delete-topic", "fetch-topic", "post-well-known", "put-ps"],
)
def test_method_not_allowed_is_4_05(code: int, path: str) -> None:
    h = Harness()
    assert code_name(h.ask(A, req(code, path, "c=dev", payload=b"v")).code) == "4.05"


@pytest.mark.parametrize("path", ["nothing", "mqtt", "ps", "", "mqttx/t"])
def test_unknown_path_is_4_04(path: str) -> None:
    h = Harness()
    assert code_name(h.ask(A, req(GET, path, "c=dev")).code) == "4.04"


@pytest.mark.parametrize(
    "request_",
    [
        req(PUT, "mqtt/t", payload=b"v"),  # no client id
        req(PUT, "mqtt/a/+", "c=dev", payload=b"v"),  # wildcard publish topic
        req(PUT, "mqtt/t", "c=dev", "qos=3", payload=b"v"),
        req(GET, "mqtt/a/#/b", "c=dev", token=b"o", options=[observe_option(0)]),  # bad filter
        req(POST, "mqtt/connection"),  # connection without a client id
        req(PUT, "mqtt/t", "c=dev", options=[(BLOCK1, bytes([0x07]))], payload=b"v"),  # SZX 7
        req(GET, "mqtt", "c=dev", options=[(URI_PATH, b"\xff")]),  # Uri-Path not UTF-8
        req(GET, "mqtt/a/+", "c=dev"),  # a read of a wildcard topic
    ],
    ids=[
        "no-clientid",
        "wildcard-topic",
        "qos3",
        "bad-filter",
        "connection-no-clientid",
        "szx7",
        "utf8",
        "read-wildcard",
    ],
)
def test_bad_requests_are_4_00(request_: CoapMessage) -> None:
    h = Harness()
    assert code_name(h.ask(A, request_).code) == "4.00"


def test_well_known_core_lists_the_resources_in_link_format() -> None:
    h = Harness()
    response = h.ask(A, req(GET, ".well-known/core"))
    assert code_name(response.code) == "2.05"
    assert response.content_format() == int(ContentFormat.LINK_FORMAT)
    assert b"</mqtt>" in response.payload
    assert b"</ps>" in response.payload


def test_malformed_datagrams_reach_the_gateway_as_rst_or_nothing() -> None:
    h = Harness()
    assert h.send_bytes(A, bytes([0x49, 0x01, 0x00, 0x07]) + bytes(9)) == [message(RST, 0, 7)]
    assert h.send_bytes(A, bytes([0x59, 0x01, 0x00, 0x08]) + bytes(9)) == []
    assert h.endpoint.metrics.malformed == 2
    assert h.gateway.clients == {}
