"""Tests for gateways.coap.codec and gateways.coap.numbers: round trips, RFC and scapy vectors, a differential
test against aiocoap, a malformed corpus, properties.

Byte vectors come from three independent sources: hand-written hex following RFC 7252 §3 and in the style of
the examples of RFC 7252 Appendix A, RFC 7641 and RFC 7959; scapy's ``contrib.coap`` (fields ``type``,
``code``, ``msg_id``, ``token``, ``options`` as ``(name or number, value)``, ``paymark``); and aiocoap, which
must decode every message our encoder builds to the same fields, and whose encoded messages ours must decode
identically. aiocoap warns when a message is constructed with a type, id or token, so the tests set those
attributes after construction, as its own decoder does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import aiocoap
import aiocoap.optiontypes as aiocoap_types
import pytest
from aiocoap.numbers.codes import Code as AioCode
from aiocoap.numbers.optionnumbers import OptionNumber as AioOptionNumber
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.contrib.coap import CoAP

from core.errors import MalformedPacket
from gateways.coap.codec import (
    Block,
    CoapFormatError,
    CoapMessage,
    decode,
    empty_ack,
    encode,
    encode_block,
    encode_uint,
    reset,
)
from gateways.coap.numbers import (
    Code,
    ContentFormat,
    OptionNumber,
    Timing,
    Type,
    code_class,
    code_name,
    is_critical,
    is_no_cache_key,
    is_request,
    is_response,
    is_unsafe,
    make_code,
)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RESERVED_CLASS_CODES = [make_code(1, 0), make_code(3, 1), make_code(6, 5), make_code(7, 31)]
"""Codes of reserved classes (1, 6, 7; 3 is unassigned): decoded, left to the caller (RFC 7252 §3, §4.2)."""


def _message(
    mtype: int = Type.CON,
    code: int = Code.GET,
    mid: int = 0x1234,
    token: bytes = b"",
    options: list[tuple[int, bytes]] | None = None,
    payload: bytes = b"",
) -> CoapMessage:
    return CoapMessage(mtype, code, mid, token, options or [], payload)


# --- numbers


def test_code_names_and_classes() -> None:
    assert code_name(Code.NOT_FOUND) == "4.04"
    assert code_name(Code.CONTINUE) == "2.31"
    assert code_name(Code.EMPTY) == "0.00"
    assert code_name(Code.GET) == "0.01"
    assert code_name(Code.PROXYING_NOT_SUPPORTED) == "5.05"
    assert make_code(4, 13) == Code.REQUEST_ENTITY_TOO_LARGE
    assert code_class(Code.CONTENT) == 2
    assert is_request(Code.IPATCH) and not is_request(Code.EMPTY) and not is_request(Code.CREATED)
    assert is_response(Code.GATEWAY_TIMEOUT) and is_response(Code.CREATED)
    assert not any(
        is_request(c) or is_response(c) for c in (make_code(1, 0), make_code(6, 5), make_code(7, 31))
    )


@pytest.mark.parametrize("code", list(Code), ids=lambda c: c.name)
def test_codes_match_aiocoap_registry(code: Code) -> None:
    name = {"IPATCH": "iPATCH", "EMPTY": "EMPTY"}.get(code.name, code.name)
    assert int(AioCode[name]) == code
    assert code_name(code) == AioCode(code).dotted


@pytest.mark.parametrize("number", list(OptionNumber), ids=lambda n: n.name)
def test_option_numbers_match_aiocoap_registry(number: OptionNumber) -> None:
    assert int(AioOptionNumber[number.name]) == number
    assert is_critical(number) == AioOptionNumber(number).is_critical()
    assert is_unsafe(number) == AioOptionNumber(number).is_unsafe()
    if not is_unsafe(number):  # NoCacheKey is only meaningful for safe options (RFC 7252 §5.4.6)
        assert is_no_cache_key(number) == AioOptionNumber(number).is_nocachekey()


def test_option_classes_rfc7252_5_4_6() -> None:
    assert [n.name for n in OptionNumber if is_critical(n)] == [
        "IF_MATCH",
        "URI_HOST",
        "IF_NONE_MATCH",
        "URI_PORT",
        "URI_PATH",
        "URI_QUERY",
        "ACCEPT",
        "BLOCK2",
        "BLOCK1",
        "PROXY_URI",
        "PROXY_SCHEME",
    ]
    assert is_no_cache_key(OptionNumber.SIZE1) and is_no_cache_key(OptionNumber.SIZE2)
    assert not is_no_cache_key(OptionNumber.URI_PATH)


@pytest.mark.parametrize(
    ("cf", "media_type"),
    [
        (ContentFormat.TEXT_PLAIN, "text/plain; charset=utf-8"),
        (ContentFormat.LINK_FORMAT, "application/link-format"),
        (ContentFormat.XML, "application/xml"),
        (ContentFormat.OCTET_STREAM, "application/octet-stream"),
        (ContentFormat.EXI, "application/exi"),
        (ContentFormat.JSON, "application/json"),
        (ContentFormat.CBOR, "application/cbor"),
        (ContentFormat.SENML_JSON, "application/senml+json"),
        (ContentFormat.SENML_CBOR, "application/senml+cbor"),
        (ContentFormat.LWM2M_TLV, "application/vnd.oma.lwm2m+tlv"),
        (ContentFormat.LWM2M_JSON, "application/vnd.oma.lwm2m+json"),
        (ContentFormat.LWM2M_CBOR, "application/vnd.oma.lwm2m+cbor"),
    ],
)
def test_content_formats_match_aiocoap_registry(cf: ContentFormat, media_type: str) -> None:
    assert aiocoap.ContentFormat(cf).media_type == media_type


def test_timing_defaults_rfc7252_4_8() -> None:
    t = Timing()
    assert (t.ack_timeout, t.ack_random_factor, t.max_retransmit, t.nstart) == (2.0, 1.5, 4, 1)
    assert (t.default_leisure, t.probing_rate, t.max_latency) == (5.0, 1.0, 100.0)
    assert (t.max_transmit_span, t.max_transmit_wait, t.processing_delay, t.max_rtt) == (45, 93, 2, 202)
    assert (t.exchange_lifetime, t.non_lifetime) == (247, 145)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.ack_timeout = 3.0  # type: ignore[misc]
    assert Timing(ack_timeout=1.0, max_retransmit=2).max_transmit_span == 4.5


# --- round trips


@pytest.mark.parametrize("mtype", list(Type), ids=lambda t: t.name)
@pytest.mark.parametrize("code", [*Code, *RESERVED_CLASS_CODES], ids=code_name)
def test_round_trip_every_type_and_code(mtype: Type, code: int) -> None:
    if code == Code.EMPTY:
        msg = _message(mtype, code, 0xBEEF)
    else:
        msg = _message(
            mtype,
            code,
            0xBEEF,
            b"\x0a\x0b",
            [(OptionNumber.URI_PATH, b"mqtt"), (OptionNumber.OBSERVE, b"")],
            b"hi",
        )
    data = encode(msg)
    assert data[0] >> 6 == 1 and (data[0] >> 4) & 3 == mtype and data[1] == code
    decoded = decode(data)
    msg.options.sort(key=lambda o: o[0])
    assert decoded == msg


@pytest.mark.parametrize("size", range(9))
def test_tokens_of_every_length(size: int) -> None:
    token = bytes(range(1, size + 1))
    data = encode(_message(token=token))
    assert data[0] == 0x40 | size
    assert data[4 : 4 + size] == token
    assert decode(data).token == token


def test_token_longer_than_8_is_refused_by_encode() -> None:
    with pytest.raises(ValueError, match="token"):
        encode(_message(token=b"123456789"))


@pytest.mark.parametrize(
    ("number", "header"),
    [
        (0, "00"),
        (12, "c0"),
        (13, "d000"),
        (14, "d001"),
        (268, "d0ff"),
        (269, "e00000"),
        (270, "e00001"),
        (1000, "e002db"),
        (65535, "e0fef2"),
    ],
)
def test_option_delta_extended_forms(number: int, header: str) -> None:
    data = encode(_message(options=[(number, b"")]))
    assert data.hex() == "40011234" + header
    assert decode(data).options == [(number, b"")]


@pytest.mark.parametrize(
    ("length", "header"),
    [(0, "b0"), (12, "bc"), (13, "bd00"), (14, "bd01"), (268, "bdff"), (269, "be0000"), (270, "be0001")],
)
def test_option_length_extended_forms(length: int, header: str) -> None:
    value = bytes(i & 0xFF for i in range(length))
    data = encode(_message(options=[(OptionNumber.URI_PATH, value)]))
    assert data.hex() == "40011234" + header + value.hex()
    assert decode(data).options == [(OptionNumber.URI_PATH, value)]


def test_both_extended_forms_in_one_option() -> None:
    value = b"v" * 300
    data = encode(_message(options=[(20, b"a"), (1000, value)]))
    # delta 20: 13 + 7, length 1; then delta 980: 14 + (980 - 269), length 300: 14 + (300 - 269)
    assert data[4:12].hex() == "d10761" + "ee02c7001f"
    assert decode(data).options == [(20, b"a"), (1000, value)]


def test_repeated_options_keep_their_order_and_unsorted_options_are_sorted_stably() -> None:
    options = [(15, b"c=1"), (11, b"a"), (15, b"u=x"), (11, b"b"), (11, b"c"), (6, b"")]
    data = encode(_message(options=options))
    decoded = decode(data)
    assert decoded.options == [(6, b""), (11, b"a"), (11, b"b"), (11, b"c"), (15, b"c=1"), (15, b"u=x")]
    assert decoded.uri_path() == ["a", "b", "c"]
    assert decoded.uri_query() == ["c=1", "u=x"]
    assert options[0] == (15, b"c=1"), "encode must not reorder the caller's list"


def test_payload_marker_only_with_a_payload() -> None:
    assert encode(_message(payload=b"")).hex() == "40011234"
    assert encode(_message(payload=b"x")).hex() == "40011234ff78"
    assert decode(bytes.fromhex("40011234")).payload == b""
    assert decode(bytes.fromhex("40011234b16dff78")) == _message(options=[(11, b"m")], payload=b"x")


@pytest.mark.parametrize(
    "bad",
    [
        _message(mid=0x10000),
        _message(mid=-1),
        _message(code=256),
        _message(mtype=4),
        _message(options=[(0x10000, b"")]),
        _message(options=[(-1, b"")]),
        _message(options=[(11, b"x" * (65535 + 270))]),
    ],
    ids=["mid", "negative-mid", "code", "type", "option-number", "negative-option", "option-length"],
)
def test_encode_refuses_values_that_cannot_be_sent(bad: CoapMessage) -> None:
    with pytest.raises(ValueError):
        encode(bad)


def test_empty_ack_and_reset() -> None:
    assert empty_ack(0x7D34).hex() == "60007d34"
    assert reset(0x7D34).hex() == "70007d34"
    assert decode(empty_ack(7)) == _message(Type.ACK, Code.EMPTY, 7)
    assert decode(reset(7)) == _message(Type.RST, Code.EMPTY, 7)


# --- accessors and builders


def test_uint_encoding_is_minimal_rfc7252_3_2() -> None:
    assert encode_uint(0) == b""
    assert encode_uint(1) == b"\x01"
    assert encode_uint(255) == b"\xff"
    assert encode_uint(256) == b"\x01\x00"
    assert encode_uint(0xFFFFFF) == b"\xff\xff\xff"
    assert encode_uint(2**32 - 1) == b"\xff\xff\xff\xff"
    with pytest.raises(ValueError):
        encode_uint(-1)


def test_block_encoding_rfc7959_2_2() -> None:
    assert encode_block(0, False, 0) == b""
    assert encode_block(0, False, 2) == b"\x02"
    assert encode_block(1, True, 2) == b"\x1a"
    assert encode_block(15, True, 6) == b"\xfe"
    assert encode_block(16, False, 6) == b"\x01\x06"
    assert encode_block(2**20 - 1, True, 6) == b"\xff\xff\xfe"
    for bad in ((2**20, False, 0), (-1, False, 0), (0, False, 7), (0, False, -1)):
        with pytest.raises(ValueError):
            encode_block(*bad)


def test_accessors() -> None:
    msg = _message(
        options=[
            (OptionNumber.OBSERVE, encode_uint(0x123456)),
            (OptionNumber.URI_PATH, b"mqtt"),
            (OptionNumber.URI_PATH, "t\u00e9".encode()),
            (OptionNumber.CONTENT_FORMAT, encode_uint(ContentFormat.SENML_JSON)),
            (OptionNumber.URI_QUERY, b"c=c1"),
            (OptionNumber.ACCEPT, encode_uint(ContentFormat.LWM2M_TLV)),
            (OptionNumber.BLOCK2, encode_block(3, False, 6)),
            (OptionNumber.BLOCK1, encode_block(2**20 - 1, True, 0)),
            (OptionNumber.SIZE2, encode_uint(100_000)),
            (OptionNumber.SIZE1, encode_uint(0)),
            (OptionNumber.NO_RESPONSE, encode_uint(26)),
        ]
    )
    msg = decode(encode(msg))
    assert msg.option(OptionNumber.URI_PATH) == b"mqtt"
    assert msg.option(OptionNumber.ETAG) is None
    assert msg.option_values(OptionNumber.URI_PATH) == [b"mqtt", "t\u00e9".encode()]
    assert msg.option_values(OptionNumber.ETAG) == []
    assert msg.uri_path() == ["mqtt", "t\u00e9"]
    assert msg.uri_query() == ["c=c1"]
    assert msg.observe() == 0x123456
    assert msg.content_format() == ContentFormat.SENML_JSON
    assert msg.accept() == ContentFormat.LWM2M_TLV
    block2 = msg.block2()
    assert block2 == Block(3, False, 6)
    assert block2.size == 1024
    assert msg.block1() == Block(2**20 - 1, True, 0)
    assert Block(0, False, 0).size == 16
    assert msg.size2() == 100_000
    assert msg.size1() == 0
    assert msg.no_response() == 26
    assert msg.uint_option(OptionNumber.MAX_AGE) is None
    empty = _message()
    assert (empty.observe(), empty.block1(), empty.block2(), empty.uri_path(), empty.uri_query()) == (
        None,
        None,
        None,
        [],
        [],
    )


def test_observe_zero_is_the_empty_value_rfc7641_2() -> None:
    msg = decode(bytes.fromhex("4001123460"))
    assert msg.options == [(OptionNumber.OBSERVE, b"")]
    assert msg.observe() == 0


@pytest.mark.parametrize("number", [OptionNumber.URI_PATH, OptionNumber.URI_QUERY])
def test_bad_utf8_is_raised_only_by_the_accessor(number: int) -> None:
    msg = decode(encode(_message(options=[(number, b"\xff\xfe")])))
    with pytest.raises(MalformedPacket) as info:
        msg.uri_path() if number == OptionNumber.URI_PATH else msg.uri_query()
    assert info.value.code == Code.BAD_REQUEST
    assert not isinstance(info.value, CoapFormatError)


@pytest.mark.parametrize(
    ("value", "code"),
    [(b"\x07", Code.BAD_REQUEST), (b"\x12\x3f", Code.BAD_REQUEST), (b"\x00\x00\x00\x01", Code.BAD_OPTION)],
    ids=["szx7", "szx7-two-bytes", "four-bytes"],
)
@pytest.mark.parametrize("number", [OptionNumber.BLOCK1, OptionNumber.BLOCK2])
def test_bad_block_options_rfc7959_2_2(number: int, value: bytes, code: Code) -> None:
    msg = decode(encode(_message(options=[(number, value)])))
    with pytest.raises(MalformedPacket) as info:
        msg.block1() if number == OptionNumber.BLOCK1 else msg.block2()
    assert info.value.code == code


def test_reserved_classes_and_unknown_options_are_decoded_for_the_caller() -> None:
    for code in RESERVED_CLASS_CODES:
        assert decode(encode(_message(code=code))).code == code
    msg = decode(bytes.fromhex("40011234") + bytes.fromhex("e0fef2") + b"")  # option 65535: odd, critical
    assert msg.options == [(65535, b"")]
    assert is_critical(msg.options[0][0])


# --- RFC vectors (RFC 7252 Appendix A, RFC 7641, RFC 7959), hand-written


RFC_VECTORS = [
    # RFC 7252 Appendix A style: CON [0x7d34] GET /temperature, answered by a piggy-backed ACK 2.05 "22.3 C".
    ("40017d34bb74656d7065726174757265", _message(Type.CON, Code.GET, 0x7D34, b"", [(11, b"temperature")])),
    ("60457d34ff32322e332043", _message(Type.ACK, Code.CONTENT, 0x7D34, payload=b"22.3 C")),
    # The same with token 0x20, echoed in the response.
    (
        "41017d3520bb74656d7065726174757265",
        _message(Type.CON, Code.GET, 0x7D35, b"\x20", [(11, b"temperature")]),
    ),
    ("61457d3520ff32322e332043", _message(Type.ACK, Code.CONTENT, 0x7D35, b"\x20", payload=b"22.3 C")),
    # A separate response: an Empty ACK, then a CON 2.05 with the request's token 0x71.
    ("60007d36", _message(Type.ACK, Code.EMPTY, 0x7D36)),
    ("4145a1b271ff32322e332043", _message(Type.CON, Code.CONTENT, 0xA1B2, b"\x71", payload=b"22.3 C")),
    # A NON request.
    (
        "51017d3774bb74656d7065726174757265",
        _message(Type.NON, Code.GET, 0x7D37, b"\x74", [(11, b"temperature")]),
    ),
    # RFC 7641 §2: GET with Observe 0 (the empty uint), then a notification with sequence number 12.
    (
        "42011234cafe605474656d70",
        _message(Type.CON, Code.GET, 0x1234, b"\xca\xfe", [(6, b""), (11, b"temp")]),
    ),
    (
        "52451235cafe610cff32322e33",
        _message(Type.NON, Code.CONTENT, 0x1235, b"\xca\xfe", [(6, b"\x0c")], b"22.3"),
    ),
    # RFC 7959 §2.2, §4: Block2 0x0a (NUM 0, M 1, SZX 2: 64-byte blocks) with Size2 1280.
    (
        "61450001aa6112d1040a520500",
        _message(Type.ACK, Code.CONTENT, 1, b"\xaa", [(6, b"\x12"), (23, b"\x0a"), (28, b"\x05\x00")]),
    ),
]


@pytest.mark.parametrize(("hexdata", "msg"), RFC_VECTORS)
def test_rfc_vectors_both_ways(hexdata: str, msg: CoapMessage) -> None:
    data = bytes.fromhex(hexdata)
    assert encode(msg) == data
    assert decode(data) == msg


def test_rfc7959_block2_vector_accessors() -> None:
    msg = decode(bytes.fromhex(RFC_VECTORS[-1][0]))
    assert msg.block2() == Block(0, True, 2)
    assert msg.size2() == 1280
    assert msg.observe() == 0x12


# --- scapy contrib.coap oracle


def _scapy(**fields: Any) -> bytes:
    payload = fields.pop("load", b"")
    packet = CoAP(**fields)
    return bytes(packet / payload) if payload else bytes(packet)


SCAPY_CASES = [
    (
        dict(
            type=0,
            code=3,
            msg_id=0x1234,
            token=b"\x01\x02\x03\x04",
            options=[("Uri-Path", b"mqtt"), ("Uri-Path", b"t"), ("Uri-Query", b"c=c1")],
            paymark=b"\xff",
            load=b"0123456789abcdef",
        ),
        _message(
            Type.CON,
            Code.PUT,
            0x1234,
            b"\x01\x02\x03\x04",
            [(11, b"mqtt"), (11, b"t"), (15, b"c=c1")],
            b"0123456789abcdef",
        ),
    ),
    (
        dict(type=1, code=1, msg_id=1, token=b"", options=[("Uri-Path", b"ps"), (6, b"")]),
        _message(Type.NON, Code.GET, 1, b"", [(6, b""), (11, b"ps")]),
    ),
    (dict(type=2, code=0, msg_id=0xFFFF), _message(Type.ACK, Code.EMPTY, 0xFFFF)),
    (dict(type=3, code=0, msg_id=0), _message(Type.RST, Code.EMPTY, 0)),
    (
        dict(
            type=2,
            code=0x45,
            msg_id=77,
            token=b"\xde\xad\xbe\xef\x00\x11\x22\x33",
            options=[("Content-Format", b"\x2d\x16"), (23, b"\x16"), ("Size1", b"\x04\x00")],
            paymark=b"\xff",
            load=b"\x00" * 64,
        ),
        _message(
            Type.ACK,
            Code.CONTENT,
            77,
            b"\xde\xad\xbe\xef\x00\x11\x22\x33",
            [(12, b"\x2d\x16"), (23, b"\x16"), (60, b"\x04\x00")],
            b"\x00" * 64,
        ),
    ),
    (
        dict(
            type=0,
            code=2,
            msg_id=9,
            token=b"t",
            options=[("Uri-Path", b"x" * 13), ("Uri-Query", b"q" * 300), (2000, b""), (258, b"\x1a")],
        ),
        _message(
            Type.CON, Code.POST, 9, b"t", [(11, b"x" * 13), (15, b"q" * 300), (258, b"\x1a"), (2000, b"")]
        ),
    ),
]


@pytest.mark.parametrize(("fields", "msg"), SCAPY_CASES)
def test_scapy_vectors_both_ways(fields: dict[str, object], msg: CoapMessage) -> None:
    data = _scapy(**dict(fields))
    assert encode(msg) == data
    assert decode(data) == msg
    dissected = CoAP(encode(msg))
    assert (dissected.type, dissected.code, dissected.msg_id, dissected.token) == (
        msg.mtype,
        msg.code,
        msg.mid,
        msg.token,
    )


# --- malformed corpus (RFC 7252 §3, §3.1, §4.1); the expected mtype/mid/token are what could be recovered


MALFORMED = [
    ("", None, None, None, "shorter"),
    ("40", None, None, None, "shorter"),
    ("400112", None, None, None, "shorter"),
    ("80011234", None, None, None, "version"),
    ("00011234", None, None, None, "version"),
    ("c0011234b16d", None, None, None, "version"),
    ("4901123401020304050607080900", Type.CON, 0x1234, None, "reserved token length"),
    ("5f011234", Type.NON, 0x1234, None, "reserved token length"),
    ("480112340102", Type.CON, 0x1234, None, "token runs past"),
    ("6100123401", Type.ACK, 0x1234, b"\x01", "Empty message"),
    ("40001234b0", Type.CON, 0x1234, b"", "Empty message"),
    ("70001234ff00", Type.RST, 0x1234, b"", "Empty message"),
    ("40011234ff", Type.CON, 0x1234, b"", "payload marker without"),
    ("41011234aab16dff", Type.CON, 0x1234, b"\xaa", "payload marker without"),
    ("40011234f0", Type.CON, 0x1234, b"", "nibble 15"),
    ("400112340f", Type.CON, 0x1234, b"", "nibble 15"),
    ("50011234b16dfe", Type.NON, 0x1234, b"", "nibble 15"),
    ("40011234d0", Type.CON, 0x1234, b"", "truncated extended"),
    ("40011234e001", Type.CON, 0x1234, b"", "truncated extended"),
    ("400112340d", Type.CON, 0x1234, b"", "truncated extended"),
    ("40011234de00", Type.CON, 0x1234, b"", "truncated extended"),
    ("40011234b46d71", Type.CON, 0x1234, b"", "option runs past"),
    ("40011234bd05" + "61" * 17, Type.CON, 0x1234, b"", "option runs past"),
    ("60451234e0fff3", Type.ACK, 0x1234, b"", "above 65535"),
    ("40011234e0fef210", Type.CON, 0x1234, b"", "above 65535"),
    ("40011234e0fef2e0ffff", Type.CON, 0x1234, b"", "above 65535"),
]


@pytest.mark.parametrize(("hexdata", "mtype", "mid", "token", "match"), MALFORMED)
def test_malformed_corpus(
    hexdata: str, mtype: int | None, mid: int | None, token: bytes | None, match: str
) -> None:
    with pytest.raises(CoapFormatError, match=match) as info:
        decode(bytes.fromhex(hexdata))
    error = info.value
    assert isinstance(error, MalformedPacket)
    assert error.code == Code.BAD_REQUEST
    assert (error.mtype, error.mid, error.token) == (mtype, mid, token)


@pytest.mark.parametrize(
    "hexdata",
    [
        "40011234e0fef2",  # option 65535, the largest number
        "40011234d0ff" + "d000",  # delta 268, then delta 13: option 281
        "4001123400ff00",  # option 0 (reserved, left to the caller) and a one-byte payload
        "70001234",  # a bare RST
    ],
)
def test_boundary_cases_that_decode(hexdata: str) -> None:
    data = bytes.fromhex(hexdata)
    assert encode(decode(data)) == data


# --- differential against aiocoap


def _aiocoap_fields(data: bytes) -> tuple[int, int, int, bytes, list[tuple[int, bytes]], bytes]:
    theirs = aiocoap.Message.decode(data)
    options = [(int(o.number), o.encode()) for o in theirs.opt.option_list()]
    return int(theirs.mtype), int(theirs.code), theirs.mid, theirs.token, options, theirs.payload


def _fields(msg: CoapMessage) -> tuple[int, int, int, bytes, list[tuple[int, bytes]], bytes]:
    return msg.mtype, msg.code, msg.mid, msg.token, msg.options, msg.payload


_NUMBERS = st.one_of(
    st.sampled_from([int(n) for n in OptionNumber] + [9, 13, 16, 252, 292]), st.integers(0, 65535)
)


@st.composite
def _option(draw: st.DrawFn) -> tuple[int, bytes]:
    """An option whose value is in aiocoap's canonical form for its number (it re-encodes what it decodes)."""
    number = draw(_NUMBERS)
    kind = AioOptionNumber(number).format
    if kind in (aiocoap_types.UintOption, aiocoap_types.ContentFormatOption):
        top = 0xFFFF if kind is aiocoap_types.ContentFormatOption else 2**32 - 1
        return number, encode_uint(draw(st.integers(0, top)))
    if kind is aiocoap_types.BlockOption:
        return number, encode_uint(draw(st.integers(0, 2**24 - 1)))
    if kind is aiocoap_types.StringOption:
        return number, draw(st.text(max_size=20)).encode()
    return number, draw(st.binary(max_size=draw(st.sampled_from([12, 20, 300]))))


@st.composite
def messages(draw: st.DrawFn) -> CoapMessage:
    code = draw(st.one_of(st.sampled_from(list(Code)), st.integers(0, 255)))
    mtype = draw(st.sampled_from(list(Type)))
    mid = draw(st.integers(0, 0xFFFF))
    if code == 0:
        return CoapMessage(mtype, code, mid)
    options = draw(st.lists(_option(), max_size=8))
    return CoapMessage(mtype, code, mid, draw(st.binary(max_size=8)), options, draw(st.binary(max_size=40)))


@PROPERTY
@given(messages())
def test_differential_ours_encoded_aiocoap_decodes_identically(msg: CoapMessage) -> None:
    data = encode(msg)
    ours = decode(data)
    msg.options.sort(key=lambda o: o[0])
    assert ours == msg
    assert _aiocoap_fields(data) == _fields(ours)


@st.composite
def aiocoap_messages(draw: st.DrawFn) -> aiocoap.Message:
    code = draw(st.sampled_from([c for c in Code if c != Code.EMPTY]))
    kwargs: dict[str, object] = {
        "uri_path": draw(st.lists(st.text(max_size=15), max_size=4)),
        "uri_query": draw(st.lists(st.text(max_size=300), max_size=3)),
        "payload": draw(st.binary(max_size=100)),
    }
    if draw(st.booleans()):
        kwargs["observe"] = draw(st.integers(0, 2**24 - 1))
    if draw(st.booleans()):
        kwargs["content_format"] = draw(st.sampled_from(list(ContentFormat)))
    if draw(st.booleans()):
        kwargs["block2"] = (draw(st.integers(0, 2**20 - 1)), draw(st.booleans()), draw(st.integers(0, 6)))
    if draw(st.booleans()):
        kwargs["block1"] = (draw(st.integers(0, 2**20 - 1)), draw(st.booleans()), draw(st.integers(0, 6)))
    if draw(st.booleans()):
        kwargs["size2"] = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        kwargs["etag"] = draw(st.binary(min_size=1, max_size=8))
    message = aiocoap.Message(code=code, **kwargs)
    message.mtype = aiocoap.Type(draw(st.sampled_from(list(Type))))
    message.mid = draw(st.integers(0, 0xFFFF))
    message.token = draw(st.binary(max_size=8))
    return message


@PROPERTY
@given(aiocoap_messages())
def test_differential_aiocoap_encoded_ours_decodes_identically(theirs: aiocoap.Message) -> None:
    data = theirs.encode()
    ours = decode(data)
    assert _fields(ours) == _aiocoap_fields(data)
    assert encode(ours) == data
    assert ours.uri_path() == list(theirs.opt.uri_path)
    assert ours.uri_query() == list(theirs.opt.uri_query)
    assert ours.observe() == theirs.opt.observe
    assert ours.content_format() == (
        None if theirs.opt.content_format is None else int(theirs.opt.content_format)
    )
    assert ours.size2() == theirs.opt.size2
    assert ours.option(OptionNumber.ETAG) == theirs.opt.etag
    for mine, other in ((ours.block1(), theirs.opt.block1), (ours.block2(), theirs.opt.block2)):
        expected = None if other is None else Block(other.block_number, bool(other.more), other.size_exponent)
        assert mine == expected


# --- properties: decode raises only CoapFormatError


def _decode_or_format_error(data: bytes) -> CoapMessage | None:
    try:
        msg = decode(data)
    except CoapFormatError as error:
        assert error.code == Code.BAD_REQUEST
        return None
    for accessor in (msg.uri_path, msg.uri_query, msg.block1, msg.block2):
        try:
            accessor()
        except MalformedPacket as error:
            assert error.code in (Code.BAD_REQUEST, Code.BAD_OPTION)
    return msg


@PROPERTY
@given(
    st.one_of(
        st.binary(max_size=64),
        st.builds(lambda h, rest: bytes([h]) + rest, st.integers(0x40, 0x7F), st.binary(max_size=64)),
    )
)
def test_random_bytes_raise_only_format_errors(data: bytes) -> None:
    msg = _decode_or_format_error(data)
    if msg is not None:
        # Anything we accept, aiocoap accepts with the same framing (its option values may be non-canonical).
        theirs = _aiocoap_fields_lenient(data)
        if theirs is not None:
            assert theirs == (
                msg.mtype,
                msg.code,
                msg.mid,
                msg.token,
                [n for n, _ in msg.options],
                msg.payload,
            )
        assert decode(encode(msg)) == msg


def _aiocoap_fields_lenient(data: bytes) -> tuple[int, int, int, bytes, list[int], bytes] | None:
    try:
        theirs = aiocoap.Message.decode(data)
    except (UnicodeDecodeError, ValueError):
        return None  # a string option that is not UTF-8, which we decode lazily
    numbers = [int(o.number) for o in theirs.opt.option_list()]
    return int(theirs.mtype), int(theirs.code), theirs.mid, theirs.token, numbers, theirs.payload


@PROPERTY
@given(messages(), st.data())
def test_valid_messages_with_one_mutated_byte_raise_only_format_errors(
    msg: CoapMessage, data: st.DataObject
) -> None:
    raw = bytearray(encode(msg))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] = data.draw(st.integers(0, 255))
    _decode_or_format_error(bytes(raw))
    _decode_or_format_error(bytes(raw[: data.draw(st.integers(0, len(raw)))]))
