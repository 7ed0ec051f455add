"""Bad input to the live CoAP gateway over real UDP sockets (issue 4, "Bad input").

A datagram with a message format error is answered with RST when it is a CON whose message id could be read
and ignored otherwise (RFC 7252 §4.2, §4.3), counted in the endpoint's ``malformed``; a bad request gets the
right response code (4.00, 4.01, 4.02, 4.04, 4.05, 4.13); a CoAP ping gets RST. None of it disturbs a healthy
client. A hypothesis test fuzzes the mapping layer over the live socket: every CON gets exactly one answer.

"Nothing came back" is checked without waiting for silence: a CoAP ping sent after the datagram under test is
answered with a RST, and UDP on loopback to one socket served by one event loop keeps the order, so anything
the gateway sent for the earlier datagram arrives before that RST.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateways.coap import codec
from gateways.coap.codec import CoapFormatError, CoapMessage
from gateways.coap.numbers import Code, OptionNumber
from tests.integration.coap_helpers import (
    ACK,
    CON,
    NON,
    RST,
    CoapClients,
    RawCoap,
    coap_client,
    coap_fixture,  # noqa: F401  (the "coap" fixture)
    coap_port,
    coap_uri,
    code_of,
    endpoint_metric,
    gateway_counter,
)
from tests.integration.helpers import Clients, PahoClient

MAX_BODY = 1024


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def gw(start_broker: Any) -> Any:
    """mqgate with a small ``max_body_size`` so that an oversize body fits in one datagram."""
    return start_broker(gateways={"coap": {"max_body_size": MAX_BODY}})


def _empty(mtype: int, mid: int) -> bytes:
    return codec.encode(CoapMessage(mtype, 0, mid))


class Healthy:
    """A CoAP device publishing with CON to a paho subscriber: proof that service goes on."""

    def __init__(self, mqgate: Any, coap: CoapClients, clients: Clients) -> None:
        self.raw = coap.raw(mqgate)
        self.mqgate = mqgate
        self.mqtt: PahoClient = clients.paho(mqgate.port, "healthy-watcher", version=5)
        assert self.mqtt.subscribe("healthy/#", 1) == 1
        self.count = 0

    def check(self) -> None:
        self.count += 1
        payload = b"still fine %d" % self.count
        response = self.raw.request(Code.PUT, "mqtt/healthy/raw", {"c": "healthy"}, payload)
        assert code_of(response) == "2.04"
        message = self.mqtt.expect()
        assert (message.topic, message.payload, message.qos) == ("healthy/raw", payload, 1)
        uri = coap_uri(self.mqgate, "mqtt/healthy/cli", {"c": "healthy-cli"})
        assert coap_client(uri, "put", payload=payload).code == "2.04"
        assert self.mqtt.expect().payload == payload


# --- message format errors


def _short(mtype: int, mid: int) -> bytes:
    return bytes((0x40 | mtype << 4, 0x01))


def _version2(mtype: int, mid: int) -> bytes:
    return bytes((0x80 | mtype << 4, 0x01)) + mid.to_bytes(2, "big")


def _token_length_9(mtype: int, mid: int) -> bytes:
    return bytes((0x49 | mtype << 4, 0x01)) + mid.to_bytes(2, "big") + bytes(9)


def _option_past_end(mtype: int, mid: int) -> bytes:
    # Uri-Path (delta 11) announcing 5 bytes, 2 present
    return bytes((0x41 | mtype << 4, 0x03)) + mid.to_bytes(2, "big") + b"\x07\xb5ab"


def _marker_without_payload(mtype: int, mid: int) -> bytes:
    return bytes((0x40 | mtype << 4, 0x03)) + mid.to_bytes(2, "big") + b"\xb4mqtt\xff"


def _option_nibble_15(mtype: int, mid: int) -> bytes:
    return bytes((0x40 | mtype << 4, 0x01)) + mid.to_bytes(2, "big") + b"\xf1x"


def _empty_with_token(mtype: int, mid: int) -> bytes:
    return bytes((0x41 | mtype << 4, 0x00)) + mid.to_bytes(2, "big") + b"\x01"


# (builder, whether a CON gets RST: a message id must have been readable and the version 1)
FORMAT_ERRORS = {
    "short header": (_short, False),
    "version 2": (_version2, False),
    "token length 9": (_token_length_9, True),
    "option past the end": (_option_past_end, True),
    "payload marker without payload": (_marker_without_payload, True),
    "option nibble 15": (_option_nibble_15, True),
    "empty message with a token": (_empty_with_token, True),
}


@pytest.mark.parametrize("name", list(FORMAT_ERRORS))
def test_format_error_in_a_con_gets_rst_and_in_a_non_is_ignored_both_counted(
    name: str, mqgate: Any, coap: CoapClients, clients: Clients
) -> None:
    build, rst_for_con = FORMAT_ERRORS[name]
    raw = coap.raw(mqgate)
    malformed = endpoint_metric(mqgate, "malformed")

    con_mid = raw.next_mid()
    datagram = build(CON, con_mid)
    with pytest.raises(CoapFormatError):
        codec.decode(datagram)
    raw.send_bytes(datagram)
    answers = raw.ping()
    if rst_for_con:
        assert [(m.mtype, m.code, m.mid) for m in answers] == [(RST, 0, con_mid)]
    else:
        assert answers == []

    raw.send_bytes(build(NON, raw.next_mid()))
    assert raw.ping() == []
    assert endpoint_metric(mqgate, "malformed") == malformed + 2
    Healthy(mqgate, coap, clients).check()


def test_coap_ping_gets_rst(mqgate: Any, coap: CoapClients) -> None:
    raw = coap.raw(mqgate)
    mid = raw.next_mid()
    raw.send_bytes(_empty(CON, mid))
    answer = raw.recv()
    assert (answer.mtype, answer.code, answer.mid, answer.token, answer.payload) == (RST, 0, mid, b"", b"")
    raw.send_bytes(_empty(NON, raw.next_mid()))
    assert raw.ping() == []


def test_reserved_class_code_in_a_con_gets_rst(mqgate: Any, coap: CoapClients) -> None:
    raw = coap.raw(mqgate)
    message = raw.build(0xE1, "mqtt/x", {"c": "reserved"})  # class 7
    raw.send(message)
    answer = raw.recv()
    assert (answer.mtype, answer.mid) == (RST, message.mid)


# --- bad requests


def test_unknown_critical_option_in_a_con_request_is_4_02_and_elective_one_is_ignored(
    mqgate: Any, coap: CoapClients
) -> None:
    raw = coap.raw(mqgate)
    for critical in (9, 2049, 65001):
        response = raw.request(Code.PUT, "mqtt/opt/t", {"c": "opt"}, b"x", options=[(critical, b"\x01")])
        assert (response.mtype, code_of(response)) == (ACK, "4.02"), critical
    response = raw.request(Code.PUT, "mqtt/opt/t", {"c": "opt"}, b"x", options=[(2050, b"\x01")])
    assert code_of(response) == "2.04"
    assert gateway_counter(mqgate, "responses_4.02") == 3


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        (Code.PUT, ["mqtt", "t"], {}, "4.00"),
        (Code.GET, ["mqtt", "t"], {"u": "user"}, "4.00"),
        (Code.POST, ["mqtt", "connection"], {"username": "x"}, "4.00"),
        (Code.POST, ["ps", "t"], {"token": "abc"}, "4.00"),
        (Code.PUT, ["mqtt", "a", "+"], {"c": "bad"}, "4.00"),
        (Code.PUT, ["mqtt", "a", "#"], {"c": "bad"}, "4.00"),
        (Code.POST, ["mqtt", "a", "%2B", "b"], {"c": "bad"}, "4.00"),
        (Code.PUT, ["mqtt", ""], {"c": "bad"}, "4.00"),
        (Code.GET, ["mqtt", "a", "+"], {"c": "bad"}, "4.00"),
        (Code.PUT, ["mqtt", "t"], {"c": "bad", "qos": "3"}, "4.00"),
        (Code.PUT, ["mqtt"], {"c": "bad"}, "4.04"),
        (Code.GET, ["nothing", "here"], {"c": "bad"}, "4.04"),
        (Code.GET, [], {}, "4.04"),
        (Code.DELETE, ["mqtt", "t"], {"c": "bad"}, "4.05"),
        (Code.POST, [".well-known", "core"], {}, "4.05"),
        (Code.PUT, ["ps", "t"], {"c": "bad"}, "4.05"),
        (Code.FETCH, ["mqtt", "t"], {"c": "bad"}, "4.05"),
        (Code.POST, ["ps", "t"], {"c": "bad", "token": "forged"}, "4.01"),
        (Code.PUT, ["mqtt", "connection"], {"c": "bad", "token": "forged"}, "4.01"),
    ],
)
def test_bad_request_gets_its_response_code(
    method: int, path: list[str], query: dict[str, str], expected: str, mqgate: Any, coap: CoapClients
) -> None:
    raw = coap.raw(mqgate)
    response = raw.request(method, path, query, b"payload")
    assert (response.mtype, code_of(response)) == (ACK, expected), response.payload
    assert gateway_counter(mqgate, f"responses_{expected}") == 1


def test_wrong_token_for_an_open_connection_is_4_01(mqgate: Any, coap: CoapClients) -> None:
    raw = coap.raw(mqgate)
    created = raw.request(Code.POST, "mqtt/connection", {"clientid": "tok"})
    assert code_of(created) == "2.01"
    token = created.payload.decode()
    wrong = token[::-1] if token[::-1] != token else token + "x"
    for method, path in (
        (Code.PUT, "mqtt/connection"),
        (Code.POST, "ps/t"),
        (Code.DELETE, "mqtt/connection"),
    ):
        response = raw.request(method, path, {"clientid": "tok", "token": wrong}, b"x")
        assert code_of(response) == "4.01", (method, path)
    assert code_of(raw.request(Code.PUT, "mqtt/connection", {"clientid": "tok", "token": token})) == "2.04"


def test_oversize_body_is_4_13_whole_or_block_wise(gw: Any, coap: CoapClients, clients: Clients) -> None:
    mqtt = clients.paho(gw.port, "watcher", version=5)
    assert mqtt.subscribe("big/#", 1) == 1
    raw = coap.raw(gw)
    whole = raw.request(Code.PUT, "mqtt/big/whole", {"c": "big"}, bytes(MAX_BODY + 1))
    assert code_of(whole) == "4.13"

    block1 = int(OptionNumber.BLOCK1)
    blocks = [bytes([n]) * 256 for n in range(5)]  # 1280 bytes in 256-byte blocks
    codes = []
    for num, block in enumerate(blocks):
        more = num < len(blocks) - 1
        option = (block1, codec.encode_block(num, more, 4))
        codes.append(code_of(raw.request(Code.PUT, "mqtt/big/blocks", {"c": "big"}, block, options=[option])))
        if codes[-1] != "2.31":
            break
    assert codes == ["2.31", "2.31", "2.31", "2.31", "4.13"]
    mqtt.expect_none()
    assert code_of(raw.request(Code.PUT, "mqtt/big/ok", {"c": "big"}, bytes(MAX_BODY))) == "2.04"
    assert mqtt.expect().payload == bytes(MAX_BODY)


def test_block1_out_of_sequence_is_4_08(mqgate: Any, coap: CoapClients) -> None:
    raw = coap.raw(mqgate)
    option = (int(OptionNumber.BLOCK1), codec.encode_block(3, True, 2))
    assert code_of(raw.request(Code.PUT, "mqtt/seq", {"c": "seq"}, bytes(64), options=[option])) == "4.08"


def test_non_utf8_uri_path_is_4_00(mqgate: Any, coap: CoapClients) -> None:
    raw = coap.raw(mqgate)
    message = raw.build(Code.PUT, [], {"c": "utf"}, b"x", options=[(int(OptionNumber.URI_PATH), b"\xff\xfe")])
    assert code_of(raw.exchange(message)) == "4.00"


def test_bad_input_does_not_disturb_a_healthy_client(
    gw: Any, coap: CoapClients, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    healthy = Healthy(gw, coap, clients)
    healthy.check()
    raw = coap.raw(gw)
    for build, _ in FORMAT_ERRORS.values():
        raw.send_bytes(build(CON, raw.next_mid()))
        raw.send_bytes(build(NON, raw.next_mid()))
    raw.send_bytes(_empty(CON, raw.next_mid()))
    raw.request(Code.PUT, "mqtt/t", {"c": "healthy"}, b"x", options=[(9, b"")])
    raw.request(Code.PUT, "mqtt/t", {}, b"x")
    raw.request(Code.PUT, "mqtt/+", {"c": "x"}, b"x")
    raw.request(Code.GET, "unknown", {"c": "x"})
    raw.request(Code.DELETE, "mqtt/t", {"c": "x"})
    raw.request(Code.PUT, "mqtt/connection", {"c": "x", "t": "nope"})
    raw.request(Code.PUT, "mqtt/t", {"c": "x"}, bytes(MAX_BODY + 1))
    healthy.check()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- fuzzing the mapping layer


SEGMENTS = st.one_of(
    st.sampled_from(["mqtt", "ps", "connection", ".well-known", "core", "t", "+", "#", "%2B", "%23", ""]),
    st.text(max_size=12),
)
TOPICS = st.lists(
    st.sampled_from(["fz", "t", "+", "#", "%2B", "%23", "", "a b", "\u00e9"]), min_size=1, max_size=3
)
CLIENT_IDS = st.sampled_from(["fz1", "fz2", "fz3"])
QUERY_KEYS = ["c", "clientid", "t", "token", "u", "username", "p", "password", "q", "qos", "r", "retain", "x"]
QUERY_VALUES = st.one_of(
    st.sampled_from(["fz1", "0", "1", "2", "3", "true", "false", ""]), st.text(max_size=8)
)
OPTION_NUMBERS = st.one_of(
    st.sampled_from([int(n) for n in OptionNumber] + [9, 2049, 2050]), st.integers(0, 65535)
)
METHODS = st.sampled_from([Code.GET, Code.POST, Code.PUT, Code.DELETE, Code.FETCH])
OBSERVE = st.sampled_from([0, 1, 2, 0xFFFFFF])
BLOCKS = st.one_of(
    st.builds(codec.encode_block, st.integers(0, 3), st.booleans(), st.integers(0, 6)), st.binary(max_size=4)
)


def _maybe(draw: st.DrawFn, chance: int) -> bool:
    """True about once in ``chance`` draws (hypothesis leans to the first element of a sample)."""
    return bool(draw(st.sampled_from([False] * (chance - 1) + [True])))


@st.composite
def requests(draw: st.DrawFn) -> CoapMessage:
    """A message built with the codec: mostly plausible requests to the gateway's resources (a client id, a
    known path, a few of the query arguments it reads), sometimes anything at all."""
    mtype = draw(st.sampled_from([CON, CON, CON, CON, NON, NON, ACK, RST]))
    code = draw(METHODS) if not _maybe(draw, 8) else draw(st.integers(0, 255))
    path = draw(
        st.one_of(
            st.builds(lambda rest: ["mqtt", *rest], TOPICS),
            st.builds(lambda rest: ["ps", *rest], TOPICS),
            st.just(["mqtt", "connection"]),
            st.just([".well-known", "core"]),
            st.lists(SEGMENTS, max_size=4),
        )
    )
    query = [("c", draw(CLIENT_IDS))] if not _maybe(draw, 5) else []
    if _maybe(draw, 3):
        query += draw(st.lists(st.tuples(st.sampled_from(QUERY_KEYS), QUERY_VALUES), max_size=3))
    options = [(int(OptionNumber.URI_PATH), s.encode()) for s in path]
    options += [(int(OptionNumber.URI_QUERY), f"{k}={v}".encode()) for k, v in query]
    if (code == Code.GET and not _maybe(draw, 3)) or _maybe(draw, 8):
        options.append((int(OptionNumber.OBSERVE), codec.encode_uint(draw(OBSERVE))))
    if _maybe(draw, 4):
        number = draw(st.sampled_from([int(OptionNumber.BLOCK1), int(OptionNumber.BLOCK2)]))
        options.append((number, draw(BLOCKS)))
    if _maybe(draw, 4):
        options += draw(st.lists(st.tuples(OPTION_NUMBERS, st.binary(max_size=6)), min_size=1, max_size=3))
    if _maybe(draw, 6):
        options.append((int(OptionNumber.CONTENT_FORMAT), codec.encode_uint(draw(st.integers(0, 11544)))))
    token = draw(st.binary(min_size=0 if _maybe(draw, 5) else 1, max_size=8))
    payload = draw(st.one_of(st.just(b""), st.binary(max_size=64), st.binary(min_size=1000, max_size=1100)))
    mid = draw(st.integers(0, 0xFFFF))
    return CoapMessage(mtype, int(code), mid, token, options, payload)


DATAGRAMS = st.one_of(requests().map(codec.encode), requests().map(codec.encode), st.binary(max_size=64))


def expected_answer(datagram: bytes) -> bool:
    """Whether the gateway must answer this datagram with one ACK or RST carrying its message id."""
    try:
        message = codec.decode(datagram)
    except CoapFormatError as exc:
        return exc.mtype == CON and exc.mid is not None
    return message.mtype == CON


def check_fuzzed(port: int, datagram: bytes) -> None:
    """Send one fuzzed datagram from a fresh socket (so message ids never collide with earlier examples);
    a CON must get one ACK or RST with its message id, anything else none."""
    raw = RawCoap(port, timeout=3.0)
    try:
        mid = int.from_bytes(datagram[2:4], "big") if len(datagram) >= 4 else -1
        raw.send_bytes(datagram)
        answers = []
        if expected_answer(datagram):
            # a request may wait for its session to open: its answer can come after the ping's RST
            answers.append(raw.recv(match=lambda m: m.mtype in (ACK, RST) and m.mid == mid))
        answers += [m for m in raw.ping((mid + 1) & 0xFFFF) if m.mtype in (ACK, RST) and m.mid == mid]
        assert len(answers) == (1 if expected_answer(datagram) else 0), (datagram, answers)
    finally:
        raw.close()


def test_fuzzed_datagrams_get_exactly_one_answer_per_con_and_the_gateway_keeps_serving(
    gw: Any, coap: CoapClients, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = coap_port(gw)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(datagram=DATAGRAMS)
    def fuzz(datagram: bytes) -> None:
        check_fuzzed(port, datagram)

    fuzz()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    Healthy(gw, coap, clients).check()
