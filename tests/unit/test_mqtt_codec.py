"""Tests for core.mqtt.codec: round trips, oracle vectors (scapy), split streams, malformed input, properties.

Byte vectors come from two independent sources: hand-written hex following the layouts of MQTT 3.1.1 §2-§3 and
MQTT 5.0 §1.5, §2-§3, and scapy's ``contrib.mqtt`` (v3.1/v3.1.1 only: it has no v5 properties). The MQTT 5.0
property table (§2.2.2.2) is restated here from the spec rather than imported from the codec, so the codec's
own table is checked against it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.contrib.mqtt import (
    MQTT,
    MQTTConnack,
    MQTTConnect,
    MQTTDisconnect,
    MQTTPuback,
    MQTTPubcomp,
    MQTTPublish,
    MQTTPubrec,
    MQTTPubrel,
    MQTTSuback,
    MQTTSubscribe,
    MQTTTopic,
    MQTTTopicQOS,
    MQTTUnsuback,
    MQTTUnsubscribe,
)
from scapy.packet import NoPayload
from scapy.packet import Packet as ScapyPacket

from core.errors import MalformedPacket
from core.mqtt.codec import (
    EMPTY_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
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
    encode_all,
    encode_properties,
    encode_varint,
)
from core.mqtt.numbers import ReasonCode

V31, V311, V5 = 3, 4, 5
HYPOTHESIS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HYPOTHESIS_STREAMS = settings(HYPOTHESIS, max_examples=80)  # several packets per example: slower to draw


# --- helpers


def _frame(first: int, body: bytes) -> bytes:
    """A packet built by hand: fixed header byte, Remaining Length (§2.1.4), body."""
    return bytes((first,)) + encode_varint(len(body)) + body


def _s(text: str | bytes) -> bytes:
    """A UTF-8 string or binary data with its two-byte length (§1.5.4, §1.5.6)."""
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def decode_all(data: bytes, version: int) -> list[Packet]:
    decoder = StreamDecoder(version=version)
    packets = decoder.feed(data)
    assert decoder.error is None, f"{decoder.error!r} (code 0x{decoder.error.code:02x})"
    return packets


def decode_one(data: bytes, version: int) -> Packet:
    packets = decode_all(data, version)
    assert len(packets) == 1, packets
    return packets[0]


def assert_error(decoder: StreamDecoder, code: int) -> None:
    error = decoder.error
    assert isinstance(error, MalformedPacket), f"expected error 0x{code:02x}, decoder has none"
    assert error.code == code, f"expected 0x{code:02x}, got 0x{error.code:02x}: {error}"


# --- the MQTT 5.0 property table (§2.2.2.2), restated from the spec

_PUB_ACKS = {"PUBACK", "PUBREC", "PUBREL", "PUBCOMP"}
_ACKS = {*_PUB_ACKS, "SUBACK", "UNSUBACK"}
SPEC_ALLOWED: dict[str, frozenset[str]] = {
    "payload_format_indicator": frozenset({"PUBLISH", "WILL"}),
    "message_expiry_interval": frozenset({"PUBLISH", "WILL"}),
    "content_type": frozenset({"PUBLISH", "WILL"}),
    "response_topic": frozenset({"PUBLISH", "WILL"}),
    "correlation_data": frozenset({"PUBLISH", "WILL"}),
    "subscription_identifiers": frozenset({"PUBLISH", "SUBSCRIBE"}),
    "session_expiry_interval": frozenset({"CONNECT", "CONNACK", "DISCONNECT"}),
    "assigned_client_identifier": frozenset({"CONNACK"}),
    "server_keep_alive": frozenset({"CONNACK"}),
    "authentication_method": frozenset({"CONNECT", "CONNACK", "AUTH"}),
    "authentication_data": frozenset({"CONNECT", "CONNACK", "AUTH"}),
    "request_problem_information": frozenset({"CONNECT"}),
    "will_delay_interval": frozenset({"WILL"}),
    "request_response_information": frozenset({"CONNECT"}),
    "response_information": frozenset({"CONNACK"}),
    "server_reference": frozenset({"CONNACK", "DISCONNECT"}),
    "reason_string": frozenset({"CONNACK", *_ACKS, "DISCONNECT", "AUTH"}),
    "receive_maximum": frozenset({"CONNECT", "CONNACK"}),
    "topic_alias_maximum": frozenset({"CONNECT", "CONNACK"}),
    "topic_alias": frozenset({"PUBLISH"}),
    "maximum_qos": frozenset({"CONNACK"}),
    "retain_available": frozenset({"CONNACK"}),
    "user_properties": frozenset(
        {"CONNECT", "CONNACK", "PUBLISH", "WILL", *_ACKS, "SUBSCRIBE", "UNSUBSCRIBE", "DISCONNECT", "AUTH"}
    ),
    "maximum_packet_size": frozenset({"CONNECT", "CONNACK"}),
    "wildcard_subscription_available": frozenset({"CONNACK"}),
    "subscription_identifier_available": frozenset({"CONNACK"}),
    "shared_subscription_available": frozenset({"CONNACK"}),
}
KINDS = (
    "CONNECT",
    "WILL",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "PUBREC",
    "PUBREL",
    "PUBCOMP",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "DISCONNECT",
    "AUTH",
)
SAMPLE: dict[str, Any] = {
    "payload_format_indicator": 1,
    "message_expiry_interval": 3600,
    "content_type": "text/plain; charset=utf-8",
    "response_topic": "reply/to/me",
    "correlation_data": b"\x00\x01corr\xff",
    "subscription_identifiers": (1, 268_435_455),
    "session_expiry_interval": 0xFFFFFFFF,
    "assigned_client_identifier": "auto-7f3a",
    "server_keep_alive": 30,
    "authentication_method": "SCRAM-SHA-256",
    "authentication_data": b"\x01\x02\x03",
    "request_problem_information": 0,
    "will_delay_interval": 10,
    "request_response_information": 1,
    "response_information": "resp/",
    "server_reference": "other.example:8883",
    "reason_string": "because \u00e9\u6f22\U0001f600",
    "receive_maximum": 65535,
    "topic_alias_maximum": 10,
    "topic_alias": 5,
    "maximum_qos": 1,
    "retain_available": 0,
    "user_properties": (("k", "v"), ("k", "v2"), ("k", "v"), ("", "")),
    "maximum_packet_size": 1024,
    "wildcard_subscription_available": 1,
    "subscription_identifier_available": 0,
    "shared_subscription_available": 1,
}


def test_spec_property_table_names_every_property_field() -> None:
    assert set(SPEC_ALLOWED) == set(Properties.__dataclass_fields__) == set(SAMPLE)


def full_properties(kind: str) -> Properties:
    """Every property the spec allows in ``kind``, user properties repeated."""
    values = {name: SAMPLE[name] for name, kinds in SPEC_ALLOWED.items() if kind in kinds}
    if kind == "SUBSCRIBE":
        values["subscription_identifiers"] = (268_435_455,)  # at most one in SUBSCRIBE (§3.8.2.1.2)
    return Properties(**values)


def with_properties(kind: str, props: bytes) -> bytes:
    """A v5 packet of ``kind`` built by hand around already-encoded properties (length included)."""
    if kind == "CONNECT":
        return _frame(0x10, _s("MQTT") + b"\x05\x02\x00\x3c" + props + _s("c"))
    if kind == "WILL":
        return _frame(0x10, _s("MQTT") + b"\x05\x06\x00\x3c\x00" + _s("c") + props + _s("w") + _s("x"))
    if kind == "CONNACK":
        return _frame(0x20, b"\x00\x00" + props)
    if kind == "PUBLISH":
        return _frame(0x32, _s("t") + b"\x00\x01" + props + b"payload")
    if kind in _PUB_ACKS:
        first = {"PUBACK": 0x40, "PUBREC": 0x50, "PUBREL": 0x62, "PUBCOMP": 0x70}[kind]
        return _frame(first, b"\x00\x01\x00" + props)
    if kind == "SUBSCRIBE":
        return _frame(0x82, b"\x00\x01" + props + _s("t") + b"\x00")
    if kind == "SUBACK":
        return _frame(0x90, b"\x00\x01" + props + b"\x00")
    if kind == "UNSUBSCRIBE":
        return _frame(0xA2, b"\x00\x01" + props + _s("t"))
    if kind == "UNSUBACK":
        return _frame(0xB0, b"\x00\x01" + props + b"\x00")
    if kind == "DISCONNECT":
        return _frame(0xE0, b"\x00" + props)
    assert kind == "AUTH"
    return _frame(0xF0, b"\x18" + props)


def _properties_of(packet: Packet, kind: str) -> Properties:
    if kind == "WILL":
        assert isinstance(packet, Connect) and packet.will is not None
        return packet.will.properties
    props = getattr(packet, "properties", None)
    assert isinstance(props, Properties)
    return props


@pytest.mark.parametrize("kind", KINDS)
def test_every_allowed_property_decodes_from_handmade_bytes(kind: str) -> None:
    props = full_properties(kind)
    packet = decode_one(with_properties(kind, encode_properties(props)), V5)
    assert _properties_of(packet, kind) == props


@pytest.mark.parametrize("kind", KINDS)
def test_every_property_not_allowed_in_the_packet_is_malformed(kind: str) -> None:
    wrong = []
    for name, kinds in SPEC_ALLOWED.items():
        if kind in kinds:
            continue
        value = SAMPLE[name][:1] if name == "subscription_identifiers" else SAMPLE[name]
        decoder = StreamDecoder(version=V5)
        packets = decoder.feed(with_properties(kind, encode_properties(Properties(**{name: value}))))
        code = decoder.error.code if decoder.error is not None else None
        if packets or code != ReasonCode.MALFORMED_PACKET:
            wrong.append((name, packets, code))
    assert not wrong


def test_properties_encode_in_identifier_order_with_repeats_kept_in_order() -> None:
    props = Properties(user_properties=(("b", "2"), ("a", "1")), message_expiry_interval=60, content_type="x")
    assert encode_properties(props) == (
        b"\x17"  # 5 + 4 + 7 + 7
        + b"\x02\x00\x00\x00\x3c"
        + b"\x03"
        + _s("x")
        + b"\x26"
        + _s("b")
        + _s("2")
        + b"\x26"
        + _s("a")
        + _s("1")
    )
    assert encode_properties(EMPTY_PROPERTIES) == encode_properties(Properties()) == b"\x00"


# --- round trips of every packet type


_WILL5 = WillSpec("will/topic", b"\x00gone\xff", 2, True, full_properties("WILL"))
ROUND_TRIPS: list[tuple[str, int, Packet]] = [
    # MQTT 3.1 (MQIsdp, level 3)
    ("v31-connect", V31, Connect("c31", V31, True, 10, None, None, None, protocol_name="MQIsdp")),
    (
        "v31-connect-will-user-password",
        V31,
        Connect("c31", V31, False, 0, WillSpec("w", b"x", 1, False), "user", b"pw", protocol_name="MQIsdp"),
    ),
    # MQTT 3.1.1
    ("v311-connect-minimal", V311, Connect("", V311, True, 0)),
    (
        "v311-connect-full",
        V311,
        Connect("client-\u00e9", V311, False, 65535, WillSpec("w/t", b"bye", 2, True), "u", b"\x00p"),
    ),
    ("v311-connect-user-only", V311, Connect("c", V311, True, 60, None, "u", None)),
    ("v311-connack", V311, Connack(True, ReasonCode.SUCCESS)),
    ("v311-connack-refused", V311, Connack(False, ReasonCode.NOT_AUTHORIZED)),
    ("v311-connack-bad-version", V311, Connack(False, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION)),
    ("v311-connack-bad-id", V311, Connack(False, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID)),
    ("v311-connack-unavailable", V311, Connack(False, ReasonCode.SERVER_UNAVAILABLE)),
    ("v311-connack-bad-password", V311, Connack(False, ReasonCode.BAD_USER_NAME_OR_PASSWORD)),
    ("v311-publish-qos0", V311, Publish("a/b", b"hello", 0, True)),
    ("v311-publish-qos0-empty", V311, Publish("a", b"")),
    ("v311-publish-qos1", V311, Publish("a/b", b"\x00" * 10, 1, False, False, 1)),
    ("v311-publish-qos2-dup", V311, Publish("\u6f22/\u5b57", b"x", 2, True, True, 65535)),
    ("v311-puback", V311, Puback(1)),
    ("v311-pubrec", V311, Pubrec(2)),
    ("v311-pubrel", V311, Pubrel(3)),
    ("v311-pubcomp", V311, Pubcomp(65535)),
    (
        "v311-subscribe",
        V311,
        Subscribe(
            7, (SubscriptionRequest("a/+", 0), SubscriptionRequest("#", 1), SubscriptionRequest("$SYS/#", 2))
        ),
    ),
    ("v311-suback", V311, Suback(7, (0, 1, 2, 0x80))),
    ("v311-unsubscribe", V311, Unsubscribe(8, ("a/+", "#"))),
    ("v311-unsuback", V311, Unsuback(8)),
    ("v311-pingreq", V311, Pingreq()),
    ("v311-pingresp", V311, Pingresp()),
    ("v311-disconnect", V311, Disconnect()),
    # MQTT 5.0, every allowed property
    ("v5-connect-minimal", V5, Connect("", V5, True, 0)),
    (
        "v5-connect-full",
        V5,
        Connect("c5", V5, False, 120, _WILL5, "user", b"secret", full_properties("CONNECT")),
    ),
    ("v5-connect-password-without-user", V5, Connect("c5", V5, True, 60, None, None, b"token")),
    ("v5-connect-will-without-properties", V5, Connect("c5", V5, True, 60, WillSpec("w", b"", 0, False))),
    ("v5-connack", V5, Connack(True, ReasonCode.SUCCESS, full_properties("CONNACK"))),
    ("v5-connack-refused", V5, Connack(False, ReasonCode.BANNED)),
    ("v5-publish-qos0", V5, Publish("a/b", b"p", 0, False, False, 0, full_properties("PUBLISH"))),
    ("v5-publish-qos1", V5, Publish("a/b", b"p", 1, True, False, 9, full_properties("PUBLISH"))),
    ("v5-publish-qos2-dup", V5, Publish("a/b", b"", 2, False, True, 10, EMPTY_PROPERTIES)),
    ("v5-publish-alias-only", V5, Publish("", b"p", 1, False, False, 11, Properties(topic_alias=3))),
    ("v5-puback-short", V5, Puback(1)),
    ("v5-puback-code", V5, Puback(1, ReasonCode.NO_MATCHING_SUBSCRIBERS)),
    ("v5-puback-props", V5, Puback(1, ReasonCode.SUCCESS, full_properties("PUBACK"))),
    ("v5-pubrec", V5, Pubrec(2, ReasonCode.QUOTA_EXCEEDED, full_properties("PUBREC"))),
    ("v5-pubrel", V5, Pubrel(3, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND, full_properties("PUBREL"))),
    ("v5-pubcomp", V5, Pubcomp(4, ReasonCode.SUCCESS, full_properties("PUBCOMP"))),
    (
        "v5-subscribe",
        V5,
        Subscribe(
            5,
            (
                SubscriptionRequest("a/+", 0, False, False, 0),
                SubscriptionRequest("b/#", 1, True, False, 1),
                SubscriptionRequest("$share/g/c", 2, False, True, 2),
                SubscriptionRequest("d", 2, True, True, 2),
            ),
            full_properties("SUBSCRIBE"),
        ),
    ),
    ("v5-suback", V5, Suback(5, (0, 1, 2, 0x80, 0x8F, 0xA2), full_properties("SUBACK"))),
    ("v5-unsubscribe", V5, Unsubscribe(6, ("a/+", "b/#"), full_properties("UNSUBSCRIBE"))),
    ("v5-unsuback", V5, Unsuback(6, (0x00, 0x11), full_properties("UNSUBACK"))),
    ("v5-pingreq", V5, Pingreq()),
    ("v5-pingresp", V5, Pingresp()),
    ("v5-disconnect-short", V5, Disconnect()),
    ("v5-disconnect-with-will", V5, Disconnect(ReasonCode.DISCONNECT_WITH_WILL)),
    ("v5-disconnect-props", V5, Disconnect(ReasonCode.SESSION_TAKEN_OVER, full_properties("DISCONNECT"))),
    ("v5-auth-short", V5, Auth()),
    ("v5-auth", V5, Auth(ReasonCode.CONTINUE_AUTHENTICATION, full_properties("AUTH"))),
]


@pytest.mark.parametrize(("version", "packet"), [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_round_trip(version: int, packet: Packet) -> None:
    assert decode_one(encode(packet, version), version) == packet


def test_round_trip_covers_every_packet_type_in_each_version() -> None:
    for version, types in (
        (V31, {Connect}),
        (
            V311,
            {
                Connect,
                Connack,
                Publish,
                Puback,
                Pubrec,
                Pubrel,
                Pubcomp,
                Subscribe,
                Suback,
                Unsubscribe,
                Unsuback,
                Pingreq,
                Pingresp,
                Disconnect,
            },
        ),
        (
            V5,
            {
                Connect,
                Connack,
                Publish,
                Puback,
                Pubrec,
                Pubrel,
                Pubcomp,
                Subscribe,
                Suback,
                Unsubscribe,
                Unsuback,
                Pingreq,
                Pingresp,
                Disconnect,
                Auth,
            },
        ),
    ):
        assert {type(p) for _, v, p in ROUND_TRIPS if v == version} == types


def test_round_trip_of_all_packets_as_one_stream() -> None:
    for version in (V311, V5):
        packets = [p for _, v, p in ROUND_TRIPS if v == version and not isinstance(p, Connect)]
        assert decode_all(encode_all(packets, version), version) == packets


def test_v5_connect_switches_the_decoder_to_v5_properties() -> None:
    connect = Connect("c", V5, True, 60)
    publish = Publish("t", b"x", 1, False, False, 1, Properties(user_properties=(("a", "b"),)))
    decoder = StreamDecoder(version=V311)
    assert decoder.feed(encode(connect, V5) + encode(publish, V5)) == [connect, publish]
    assert decoder.version == V5


def test_v311_connect_switches_the_decoder_to_v3_bodies() -> None:
    decoder = StreamDecoder(version=V5)
    packets = decoder.feed(encode(Connect("c", V311), V311) + bytes.fromhex("40020001"))
    assert packets == [Connect("c", V311), Puback(1)]
    assert decoder.version == V311


@pytest.mark.parametrize(
    ("body_length", "header"),
    [
        (127, "7f"),
        (128, "8001"),
        (16383, "ff7f"),
        (16384, "808001"),
        (2_097_151, "ffff7f"),
        (2_097_152, "80808001"),
    ],
)
def test_remaining_length_in_one_to_four_bytes(body_length: int, header: str) -> None:
    packet = Publish("t", b"p" * (body_length - 3), 0)
    data = encode(packet, V311)
    assert data[: 1 + len(header) // 2] == bytes.fromhex("30" + header)
    assert len(data) == 1 + len(header) // 2 + body_length
    assert decode_one(data, V311) == packet
    decoder = StreamDecoder(version=V311)
    out: list[Packet] = []
    pos = 0
    for cut in (1, 2, 3, len(data) // 2, len(data) - 1, len(data)):
        out += decoder.feed(data[pos:cut])
        assert out == ([] if cut < len(data) else [packet])
        pos = cut
    assert decoder.error is None


@pytest.mark.parametrize(
    ("value", "hex_bytes"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "8001"),
        (16383, "ff7f"),
        (16384, "808001"),
        (2_097_151, "ffff7f"),
        (2_097_152, "80808001"),
        (268_435_455, "ffffff7f"),
    ],
)
def test_variable_byte_integer_matches_the_spec_table(value: int, hex_bytes: str) -> None:
    """MQTT 5.0 §1.5.5, Table 1-1."""
    assert encode_varint(value) == bytes.fromhex(hex_bytes)
    props = Properties(subscription_identifiers=(value,)) if value else None
    if props is not None:
        raw = b"\x0b" + bytes.fromhex(hex_bytes)
        assert encode_properties(props) == bytes((len(raw),)) + raw


def test_packet_exactly_at_max_packet_size_is_accepted() -> None:
    data = encode(Publish("t", b"x" * 100), V311)
    decoder = StreamDecoder(max_packet_size=len(data), version=V311)
    assert decoder.feed(data) == [Publish("t", b"x" * 100)]
    assert decoder.error is None


def test_packet_over_max_packet_size_fails_from_its_header_before_the_body_arrives() -> None:
    decoder = StreamDecoder(max_packet_size=1024, version=V5)
    assert decoder.feed(b"\xc0\x00") == [Pingreq()]
    assert decoder.feed(b"\x30\x82") == []
    assert decoder.error is None  # the length is still arriving
    assert decoder.feed(b"\x08") == []  # 1 + 2 + 1026 bytes announced: over by 5
    assert_error(decoder, ReasonCode.PACKET_TOO_LARGE)
    assert decoder.feed(b"\xc0\x00") == []


# --- literal vectors, written by hand from the spec's byte layouts


LITERALS: list[tuple[str, int, str, Packet]] = [
    ("pingreq", V311, "c000", Pingreq()),
    ("pingresp", V311, "d000", Pingresp()),
    ("disconnect-v3", V311, "e000", Disconnect()),
    ("connect-v311", V311, "100f 00044d515454 04 02 003c 0003616263", Connect("abc", V311, True, 60)),
    (
        "connect-v31",
        V31,
        "100f 00064d5149736470 03 00 000a 0001 63",
        Connect("c", V31, False, 10, protocol_name="MQIsdp"),
    ),
    ("connect-v5", V5, "1010 00044d515454 05 02 003c 00 0003616263", Connect("abc", V5, True, 60)),
    (
        "connect-v5-will",
        V5,
        "101e 00044d515454 05 2e 0000 03 21000a 000163 05 1800000005 000177 00026279",
        Connect(
            "c",
            V5,
            True,
            0,
            WillSpec("w", b"by", 1, True, Properties(will_delay_interval=5)),
            properties=Properties(receive_maximum=10),
        ),
    ),
    ("connack-v311", V311, "2002 01 00", Connack(True, 0)),
    ("connack-v311-not-authorized", V311, "2002 00 05", Connack(False, ReasonCode.NOT_AUTHORIZED)),
    ("connack-v5", V5, "2006 00 00 03 2200 0a", Connack(False, 0, Properties(topic_alias_maximum=10))),
    (
        "publish-v5-props",
        V5,
        "3216 0003612f62 000a 0c 020000003c 2600016b000176 6869",
        Publish(
            "a/b",
            b"hi",
            1,
            False,
            False,
            10,
            Properties(message_expiry_interval=60, user_properties=(("k", "v"),)),
        ),
    ),
    ("publish-v311-qos0-retain", V311, "3108 0003612f62 6869 7a", Publish("a/b", b"hiz", 0, True)),
    ("puback-v5-short", V5, "4002000a", Puback(10)),
    ("puback-v5-code", V5, "4003000a10", Puback(10, ReasonCode.NO_MATCHING_SUBSCRIBERS)),
    ("pubrel-v311", V311, "62020001", Pubrel(1)),
    (
        "subscribe-v5-options",
        V5,
        "820e 0001 05 0bffffff7f 0003612f23 2e",
        Subscribe(
            1,
            (SubscriptionRequest("a/#", 2, True, True, 2),),
            Properties(subscription_identifiers=(268_435_455,)),
        ),
    ),
    ("suback-v5", V5, "9007 0001 00 00010280", Suback(1, (0, 1, 2, 0x80))),
    ("unsuback-v5", V5, "b005 0001 00 0011", Unsuback(1, (0, 0x11))),
    ("unsubscribe-v311", V311, "a207 0002 0003612f62", Unsubscribe(2, ("a/b",))),
    (
        "disconnect-v5-session-expiry",
        V5,
        "e007 00 05 1100000000",
        Disconnect(0, Properties(session_expiry_interval=0)),
    ),
    ("auth-v5", V5, "f000", Auth()),
]

# Vectors the encoder writes differently (the spec lets the sender omit a trailing part): decode only.
DECODE_ONLY: list[tuple[str, int, str, Packet]] = [
    ("disconnect-v5-code-without-property-length", V5, "e00104", Disconnect(ReasonCode.DISCONNECT_WITH_WILL)),
    ("disconnect-v5-empty-means-success", V5, "e000", Disconnect()),
    ("puback-v5-code-without-property-length", V5, "4003000a00", Puback(10)),
    ("auth-v5-code-without-property-length", V5, "f00118", Auth(ReasonCode.CONTINUE_AUTHENTICATION)),
    ("publish-v5-empty-properties", V5, "3005 0001 74 00 78", Publish("t", b"x")),
]


@pytest.mark.parametrize(
    ("version", "hex_bytes", "packet"), [c[1:] for c in LITERALS], ids=[c[0] for c in LITERALS]
)
def test_literal_vector_encodes_and_decodes(version: int, hex_bytes: str, packet: Packet) -> None:
    data = bytes.fromhex(hex_bytes)
    assert encode(packet, version) == data
    assert decode_one(data, version) == packet


@pytest.mark.parametrize(
    ("version", "hex_bytes", "packet"), [c[1:] for c in DECODE_ONLY], ids=[c[0] for c in DECODE_ONLY]
)
def test_literal_vector_decodes(version: int, hex_bytes: str, packet: Packet) -> None:
    assert decode_one(bytes.fromhex(hex_bytes), version) == packet


# --- the scapy oracle (MQTT 3.1/3.1.1)


def _scapy_fields(pkt: ScapyPacket) -> dict[str, Any]:
    """Every field of every layer, lists of sub-packets as tuples of their field values."""
    out: dict[str, Any] = {}
    layer: Any = pkt
    while not isinstance(layer, NoPayload):
        for f in layer.fields_desc:
            value = layer.getfieldval(f.name)
            if isinstance(value, list):
                value = [
                    tuple(v.getfieldval(g.name) for g in v.fields_desc) if isinstance(v, ScapyPacket) else v
                    for v in value
                ]
            out.setdefault(f.name, value)
        layer = layer.payload
    return out


ScapyCase = tuple[str, int, Callable[[], ScapyPacket], Packet, dict[str, Any]]
SCAPY_CASES: list[ScapyCase] = [
    (
        "connect-will-user-password",
        V311,
        lambda: (
            MQTT(type=1)
            / MQTTConnect(
                protoname=b"MQTT",
                protolevel=4,
                cleansess=1,
                klive=60,
                clientId=b"client-1",
                willflag=1,
                willQOSflag=1,
                willretainflag=1,
                willtopic=b"will/t",
                willmsg=b"bye",
                usernameflag=1,
                passwordflag=1,
                username=b"user",
                password=b"pass",
            )
        ),
        Connect("client-1", V311, True, 60, WillSpec("will/t", b"bye", 1, True), "user", b"pass"),
        {
            "protolevel": 4,
            "willflag": 1,
            "willQOSflag": 1,
            "willretainflag": 1,
            "clientId": b"client-1",
            "willtopic": b"will/t",
            "willmsg": b"bye",
            "username": b"user",
            "password": b"pass",
            "klive": 60,
        },
    ),
    (
        "connect-minimal",
        V311,
        lambda: (
            MQTT(type=1) / MQTTConnect(protoname=b"MQTT", protolevel=4, cleansess=0, klive=0, clientId=b"")
        ),
        Connect("", V311, False, 0),
        {
            "protolevel": 4,
            "cleansess": 0,
            "willflag": 0,
            "usernameflag": 0,
            "passwordflag": 0,
            "clientId": b"",
        },
    ),
    (
        "connect-v31-mqisdp",
        V31,
        lambda: (
            MQTT(type=1)
            / MQTTConnect(
                protoname=b"MQIsdp",
                protolevel=3,
                cleansess=1,
                klive=30,
                clientId=b"old",
                willflag=1,
                willQOSflag=2,
                willtopic=b"w",
                willmsg=b"",
                usernameflag=1,
                username=b"u",
            )
        ),
        Connect("old", V31, True, 30, WillSpec("w", b"", 2, False), "u", None, protocol_name="MQIsdp"),
        {"protoname": b"MQIsdp", "protolevel": 3, "willQOSflag": 2, "willmsg": b"", "username": b"u"},
    ),
    (
        "connack-session-present",
        V311,
        lambda: MQTT(type=2) / MQTTConnack(sessPresentFlag=1, retcode=0),
        Connack(True, ReasonCode.SUCCESS),
        {"type": 2, "sessPresentFlag": 1, "retcode": 0},
    ),
    (
        "connack-bad-credentials",
        V311,
        lambda: MQTT(type=2) / MQTTConnack(sessPresentFlag=0, retcode=4),
        Connack(False, ReasonCode.BAD_USER_NAME_OR_PASSWORD),
        {"sessPresentFlag": 0, "retcode": 4},
    ),
    (
        "publish-qos0-retain",
        V311,
        lambda: MQTT(type=3, QOS=0, RETAIN=1) / MQTTPublish(topic=b"sensors/t1", value=b"21.5"),
        Publish("sensors/t1", b"21.5", 0, True),
        {"type": 3, "QOS": 0, "RETAIN": 1, "DUP": 0, "topic": b"sensors/t1", "value": b"21.5"},
    ),
    (
        "publish-qos1",
        V311,
        lambda: MQTT(type=3, QOS=1) / MQTTPublish(topic=b"a/b", msgid=4660, value=b"\x00\xff"),
        Publish("a/b", b"\x00\xff", 1, False, False, 4660),
        {"QOS": 1, "RETAIN": 0, "msgid": 4660, "topic": b"a/b", "value": b"\x00\xff"},
    ),
    (
        "publish-qos2-dup",
        V311,
        lambda: MQTT(type=3, QOS=2, DUP=1) / MQTTPublish(topic=b"x", msgid=65535, value=b"payload" * 40),
        Publish("x", b"payload" * 40, 2, False, True, 65535),
        {"QOS": 2, "DUP": 1, "msgid": 65535, "value": b"payload" * 40, "len": 2 + 1 + 2 + 280},
    ),
    ("puback", V311, lambda: MQTT(type=4) / MQTTPuback(msgid=1), Puback(1), {"type": 4, "msgid": 1}),
    ("pubrec", V311, lambda: MQTT(type=5) / MQTTPubrec(msgid=2), Pubrec(2), {"type": 5, "msgid": 2}),
    (
        "pubrel",
        V311,
        lambda: MQTT(type=6, QOS=1) / MQTTPubrel(msgid=3),  # fixed-header flags 0010 (§3.6.1)
        Pubrel(3),
        {"type": 6, "QOS": 1, "msgid": 3},
    ),
    ("pubcomp", V311, lambda: MQTT(type=7) / MQTTPubcomp(msgid=4), Pubcomp(4), {"type": 7, "msgid": 4}),
    (
        "subscribe",
        V311,
        lambda: (
            MQTT(type=8, QOS=1)
            / MQTTSubscribe(
                msgid=7, topics=[MQTTTopicQOS(topic=b"a/+", QOS=0), MQTTTopicQOS(topic=b"b/#", QOS=2)]
            )
        ),
        Subscribe(7, (SubscriptionRequest("a/+", 0), SubscriptionRequest("b/#", 2))),
        {"type": 8, "QOS": 1, "msgid": 7, "topics": [(3, b"a/+", 0), (3, b"b/#", 2)]},
    ),
    (
        "suback",
        V311,
        lambda: MQTT(type=9) / MQTTSuback(msgid=7, retcodes=[0, 1, 2, 0x80]),
        Suback(7, (0, 1, 2, 0x80)),
        {"type": 9, "msgid": 7, "retcodes": [0, 1, 2, 0x80]},
    ),
    (
        "unsubscribe",
        V311,
        lambda: (
            MQTT(type=10, QOS=1)
            / MQTTUnsubscribe(msgid=8, topics=[MQTTTopic(topic=b"a/+"), MQTTTopic(topic=b"#")])
        ),
        Unsubscribe(8, ("a/+", "#")),
        {"type": 10, "QOS": 1, "msgid": 8, "topics": [(3, b"a/+"), (1, b"#")]},
    ),
    ("unsuback", V311, lambda: MQTT(type=11) / MQTTUnsuback(msgid=8), Unsuback(8), {"type": 11, "msgid": 8}),
    ("pingreq", V311, lambda: MQTT(type=12), Pingreq(), {"type": 12, "len": 0}),
    ("pingresp", V311, lambda: MQTT(type=13), Pingresp(), {"type": 13, "len": 0}),
    ("disconnect", V311, lambda: MQTT(type=14) / MQTTDisconnect(), Disconnect(), {"type": 14, "len": 0}),
    (
        "disconnect-v5-normal",  # scapy lacks v5 properties; a v5 DISCONNECT may be this short (§3.14.2.1)
        V5,
        lambda: MQTT(type=14) / MQTTDisconnect(),
        Disconnect(),
        {"type": 14, "len": 0},
    ),
    ("pingreq-v5", V5, lambda: MQTT(type=12), Pingreq(), {"type": 12}),
    ("puback-v5-short", V5, lambda: MQTT(type=4) / MQTTPuback(msgid=9), Puback(9), {"msgid": 9}),
]


@pytest.mark.parametrize(
    ("version", "build", "packet", "fields"), [c[1:] for c in SCAPY_CASES], ids=[c[0] for c in SCAPY_CASES]
)
def test_scapy_vector_decodes_and_our_encoding_parses_in_scapy(
    version: int, build: Callable[[], ScapyPacket], packet: Packet, fields: dict[str, Any]
) -> None:
    oracle = bytes(build())
    assert decode_one(oracle, version) == packet
    ours = encode(packet, version)
    assert ours == oracle
    parsed = _scapy_fields(MQTT(ours))
    assert {name: parsed.get(name) for name in fields} == fields


def test_scapy_parses_our_stream_of_v311_packets() -> None:
    packets = [
        Publish("a/b", b"one", 1, False, False, 1),
        Puback(1),
        Publish("c", b"two", 0, True),
        Subscribe(2, (SubscriptionRequest("x/#", 1),)),
    ]
    parsed = MQTT(encode_all(packets, V311))
    assert parsed[MQTTPublish].topic == b"a/b"
    assert parsed[MQTTPublish].msgid == 1
    assert parsed[MQTTPuback].msgid == 1
    assert parsed[MQTTPublish:2].value == b"two"
    assert parsed[MQTTPublish:2].underlayer.RETAIN == 1
    assert parsed[MQTTSubscribe].topics[0].topic == b"x/#"


# --- split streams


SPLIT_STREAMS: dict[int, list[Packet]] = {
    V311: [Connect("c", V311, True, 60, WillSpec("w", b"x", 1, False), "u", b"p")]
    + [p for _, v, p in ROUND_TRIPS if v == V311 and not isinstance(p, Connect)]
    + [Publish("big", b"B" * 20_000, 1, False, False, 77)],
    V5: [ROUND_TRIPS[[c[0] for c in ROUND_TRIPS].index("v5-connect-full")][2]]
    + [p for _, v, p in ROUND_TRIPS if v == V5 and not isinstance(p, Connect)]
    + [Publish("big", b"B" * 20_000, 2, False, False, 78, Properties(content_type="x"))],
}


@pytest.mark.parametrize("version", [V311, V5])
def test_stream_fed_one_byte_at_a_time_gives_the_same_packets(version: int) -> None:
    packets = SPLIT_STREAMS[version]
    data = encode_all(packets, version)
    decoder = StreamDecoder(version=V311)
    out: list[Packet] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert decoder.error is None
    assert out == packets


@pytest.mark.parametrize("version", [V311, V5])
@pytest.mark.parametrize("seed", range(20))
def test_stream_split_at_random_points_gives_the_same_packets(version: int, seed: int) -> None:
    packets = SPLIT_STREAMS[version]
    data = encode_all(packets, version)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 40)))
    decoder = StreamDecoder(version=V311)
    out: list[Packet] = []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        out += decoder.feed(data[start:end])
    assert decoder.error is None
    assert out == packets


def test_empty_feed_returns_nothing() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\xc0") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\x00") == [Pingreq()]


# --- malformed corpus


MALFORMED, PROTOCOL = ReasonCode.MALFORMED_PACKET, ReasonCode.PROTOCOL_ERROR


def _connect(level: int, flags: int, payload: bytes, props: bytes = b"", name: bytes = b"MQTT") -> str:
    return _frame(0x10, _s(name) + bytes((level, flags)) + b"\x00\x3c" + props + payload).hex()


def _props(raw: bytes) -> bytes:
    return encode_varint(len(raw)) + raw


def _pv5(kind: str, raw_properties: bytes) -> str:
    """Hex of a v5 ``kind`` packet carrying ``raw_properties`` (their length is added)."""
    return with_properties(kind, _props(raw_properties)).hex()


UNSUPPORTED = ReasonCode.UNSUPPORTED_PROTOCOL_VERSION


MALFORMED_CORPUS: list[tuple[str, int, int, str]] = [
    # fixed header (§2.1)
    ("0000", V311, MALFORMED, "reserved-packet-type-0"),
    ("00020001", V5, MALFORMED, "reserved-packet-type-0-v5"),
    ("80060001000161 00", V311, MALFORMED, "subscribe-flags-0000"),
    ("a0050001000161", V311, MALFORMED, "unsubscribe-flags-0000"),
    ("60020001", V311, MALFORMED, "pubrel-flags-0000"),
    ("c100", V311, MALFORMED, "pingreq-flags-0001"),
    ("42020001", V5, MALFORMED, "puback-flags-0010"),
    ("1f00", V311, MALFORMED, "connect-flags-1111"),
    ("360500016100 01", V311, MALFORMED, "publish-qos-3"),
    ("3803000161", V311, MALFORMED, "publish-dup-on-qos-0"),
    ("30ffffffff7f", V311, MALFORMED, "remaining-length-5-bytes"),
    ("30808080808001", V5, MALFORMED, "remaining-length-5-continuation-bytes"),
    # bodies shorter than their fields
    ("300100", V311, MALFORMED, "publish-truncated-topic-length"),
    ("3003000561", V311, MALFORMED, "publish-topic-length-past-the-end"),
    ("32030001 61", V311, MALFORMED, "publish-qos1-without-packet-id"),
    ("400100", V311, MALFORMED, "puback-truncated-packet-id"),
    ("2001 00", V311, MALFORMED, "connack-truncated"),
    ("40030001 00", V311, MALFORMED, "puback-v3-trailing-byte"),
    ("40050001 00 00 ff", V5, MALFORMED, "puback-v5-bytes-after-properties"),
    ("c00100", V311, MALFORMED, "pingreq-with-a-body"),
    ("d00100", V311, MALFORMED, "pingresp-with-a-body"),
    ("e00100", V311, MALFORMED, "disconnect-v3-with-a-body"),
    ("e003 00 00 ff", V5, MALFORMED, "disconnect-v5-bytes-after-properties"),
    ("20020200", V311, MALFORMED, "connack-reserved-flag"),
    # UTF-8 strings (§1.5.4)
    ("30040002c328", V311, MALFORMED, "topic-invalid-utf8"),
    ("30040002c0af", V311, MALFORMED, "topic-overlong-utf8"),
    ("30050003eda080", V311, MALFORMED, "topic-utf16-surrogate"),
    ("3005000361 00 62", V311, MALFORMED, "topic-with-u0000"),
    (_connect(4, 0x02, _s(b"\xc3\x28")), V311, MALFORMED, "client-id-invalid-utf8"),
    (_connect(4, 0x82, _s("c") + _s(b"u\x00")), V311, MALFORMED, "username-with-u0000"),
    ("82070001 0002c328 00", V311, MALFORMED, "subscribe-filter-invalid-utf8"),
    ("a2060001 0002c328", V311, MALFORMED, "unsubscribe-filter-invalid-utf8"),
    # packet identifiers (§2.2.1)
    ("32050001610000", V311, MALFORMED, "publish-packet-id-0"),
    ("82060000000161 00", V311, MALFORMED, "subscribe-packet-id-0"),
    ("a2050000000161", V311, MALFORMED, "unsubscribe-packet-id-0"),
    ("40020000", V311, MALFORMED, "puback-packet-id-0"),
    ("62020000", V5, MALFORMED, "pubrel-packet-id-0"),
    # CONNECT (§3.1)
    (_connect(4, 0x02, _s("c"), name=b"MQTX"), V311, UNSUPPORTED, "connect-unknown-name"),
    (_connect(6, 0x02, _s("c")), V311, UNSUPPORTED, "connect-unknown-level"),
    (_connect(4, 0x02, _s("c"), name=b"MQIsdp"), V311, UNSUPPORTED, "connect-mqisdp-level-4"),
    (_connect(3, 0x02, _s("c")), V311, UNSUPPORTED, "connect-mqtt-level-3"),
    (_connect(4, 0x03, _s("c")), V311, MALFORMED, "connect-reserved-flag"),
    (_connect(5, 0x03, _s("c"), b"\x00"), V5, MALFORMED, "connect-v5-reserved-flag"),
    (_connect(4, 0x1E, _s("c") + _s("w") + _s("x")), V311, MALFORMED, "connect-will-qos-3"),
    (_connect(4, 0x0A, _s("c")), V311, MALFORMED, "connect-will-qos-without-will-flag"),
    (_connect(4, 0x22, _s("c")), V311, MALFORMED, "connect-will-retain-without-will-flag"),
    (_connect(4, 0x42, _s("c") + _s("p")), V311, MALFORMED, "connect-v311-password-without-username"),
    (
        _connect(3, 0x42, _s("c") + _s("p"), name=b"MQIsdp"),
        V311,
        MALFORMED,
        "connect-v31-password-without-username",
    ),
    (_connect(4, 0x02, _s("c") + b"\x00"), V311, MALFORMED, "connect-trailing-bytes"),
    (_connect(5, 0x02, _s("c") + b"\x00", b"\x00"), V5, MALFORMED, "connect-v5-trailing-bytes"),
    (_connect(4, 0x06, _s("c") + _s("w")), V311, MALFORMED, "connect-will-without-payload"),
    (_connect(4, 0xC2, _s("c") + _s("u")), V311, MALFORMED, "connect-password-flag-without-password"),
    (_connect(5, 0x02, _s("c")), V5, MALFORMED, "connect-v5-without-property-length"),
    # SUBSCRIBE / UNSUBSCRIBE (§3.8, §3.10)
    ("82020001", V311, PROTOCOL, "subscribe-without-filters"),
    ("8203000100", V5, PROTOCOL, "subscribe-v5-without-filters"),
    ("a2020001", V311, PROTOCOL, "unsubscribe-without-filters"),
    ("a203000100", V5, PROTOCOL, "unsubscribe-v5-without-filters"),
    ("82060001000161 04", V311, MALFORMED, "subscribe-v311-reserved-option-bit-2"),
    ("82060001000161 03", V311, MALFORMED, "subscribe-v311-qos-3"),
    ("8207000100000161 40", V5, MALFORMED, "subscribe-v5-reserved-option-bit-6"),
    ("8207000100000161 80", V5, MALFORMED, "subscribe-v5-reserved-option-bit-7"),
    ("8207000100000161 30", V5, PROTOCOL, "subscribe-v5-retain-handling-3"),
    ("8207000100000161 03", V5, PROTOCOL, "subscribe-v5-qos-3"),
    ("820500010001 61", V311, MALFORMED, "subscribe-filter-without-options"),
    # v5 properties (§2.2.2)
    (_pv5("PUBLISH", b"\x11\x00\x00\x00\x01"), V5, MALFORMED, "property-not-allowed"),
    (_pv5("PUBLISH", b"\x7f\x00"), V5, MALFORMED, "property-unknown-id"),
    (_pv5("PUBLISH", b"\x02\x00\x00\x00\x01" * 2), V5, PROTOCOL, "property-duplicated"),
    (_pv5("CONNECT", b"\x21\x00\x01\x21\x00\x02"), V5, PROTOCOL, "receive-maximum-twice"),
    (_pv5("CONNECT", b"\x21\x00\x00"), V5, PROTOCOL, "receive-maximum-0"),
    (_pv5("CONNACK", b"\x21\x00\x00"), V5, PROTOCOL, "connack-receive-maximum-0"),
    (_pv5("CONNECT", b"\x27\x00\x00\x00\x00"), V5, PROTOCOL, "maximum-packet-size-0"),
    (_pv5("PUBLISH", b"\x23\x00\x00"), V5, ReasonCode.TOPIC_ALIAS_INVALID, "topic-alias-0"),
    (_pv5("PUBLISH", b"\x01\x02"), V5, PROTOCOL, "payload-format-indicator-2"),
    (_pv5("CONNECT", b"\x17\x02"), V5, PROTOCOL, "request-problem-information-2"),
    (_pv5("CONNECT", b"\x19\x02"), V5, PROTOCOL, "request-response-information-2"),
    (_pv5("PUBLISH", b"\x0b\x00"), V5, PROTOCOL, "subscription-identifier-0"),
    (_pv5("SUBSCRIBE", b"\x0b\x01\x0b\x02"), V5, PROTOCOL, "subscribe-two-subscription-ids"),
    (_pv5("PUBLISH", b"\x0b\xff\xff\xff\xff\x01"), V5, MALFORMED, "varint-property-5-bytes"),
    (_pv5("PUBLISH", b"\x0b\xff"), V5, MALFORMED, "varint-property-truncated"),
    (_pv5("PUBLISH", b"\x02\x00\x00"), V5, MALFORMED, "four-byte-property-truncated"),
    (_pv5("PUBLISH", b"\x03\x00\x05ab"), V5, MALFORMED, "string-property-past-its-block"),
    (_pv5("PUBLISH", b"\x03\x00\x02\xc3\x28"), V5, MALFORMED, "string-property-invalid-utf8"),
    (_pv5("PUBLISH", b"\x26\x00\x01a\x00\x01\x00"), V5, MALFORMED, "user-property-u0000"),
    (_pv5("PUBLISH", b"\x26\x00\x01a"), V5, MALFORMED, "user-property-without-value"),
    ("300400016105", V5, MALFORMED, "property-length-past-the-end"),
    ("30030001 61", V5, MALFORMED, "publish-v5-without-property-length"),
    (
        with_properties("DISCONNECT", b"\x06\x11\x00").hex(),
        V5,
        MALFORMED,
        "disconnect-property-length-past-the-end",
    ),
    (_pv5("WILL", b"\x11\x00\x00\x00\x01"), V5, MALFORMED, "will-property-not-allowed"),
    (_pv5("WILL", b"\x18\x00\x00\x00\x01" * 2), V5, PROTOCOL, "will-property-duplicated"),
    # AUTH (§3.15)
    ("f000", V311, PROTOCOL, "auth-in-v311"),
    ("f00118", V311, PROTOCOL, "auth-with-body-in-v311"),
    ("f200", V5, MALFORMED, "auth-flags-0010"),
]


@pytest.mark.parametrize(
    ("hex_bytes", "version", "code"), [c[:3] for c in MALFORMED_CORPUS], ids=[c[3] for c in MALFORMED_CORPUS]
)
def test_malformed_packet_stops_the_stream_with_its_reason_code(
    hex_bytes: str, version: int, code: int
) -> None:
    good = Publish("before", b"ok", 1, False, False, 1) if version == V5 else Pingreq()
    bad = bytes.fromhex(hex_bytes)
    decoder = StreamDecoder(version=version)
    assert decoder.feed(encode(good, version) + bad + b"\xc0\x00") == [good]
    assert_error(decoder, code)
    assert decoder.feed(b"\xc0\x00") == []
    assert decoder.feed(encode(good, version)) == []
    assert_error(decoder, code)


@pytest.mark.parametrize(
    ("hex_bytes", "version", "code"), [c[:3] for c in MALFORMED_CORPUS], ids=[c[3] for c in MALFORMED_CORPUS]
)
def test_malformed_packet_fed_one_byte_at_a_time_fails_the_same_way(
    hex_bytes: str, version: int, code: int
) -> None:
    decoder = StreamDecoder(version=version)
    for byte in bytes.fromhex(hex_bytes):
        assert decoder.feed(bytes((byte,))) == []
    assert_error(decoder, code)


def test_malformed_corpus_ids_are_unique() -> None:
    ids = [c[3] for c in MALFORMED_CORPUS]
    assert len(ids) == len(set(ids))


# --- hypothesis: random bytes, random valid packets, mutated streams

_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_BIN = st.binary(max_size=16)
_BOOL01 = st.integers(0, 1)
_U16 = st.integers(0, 0xFFFF)
_U32 = st.integers(0, 0xFFFF_FFFF)
_PACKET_ID = st.integers(1, 0xFFFF)
_PROPERTY_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "payload_format_indicator": _BOOL01,
    "message_expiry_interval": _U32,
    "content_type": _TEXT,
    "response_topic": _TEXT,
    "correlation_data": _BIN,
    "subscription_identifiers": st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3).map(tuple),
    "session_expiry_interval": _U32,
    "assigned_client_identifier": _TEXT,
    "server_keep_alive": _U16,
    "authentication_method": _TEXT,
    "authentication_data": _BIN,
    "request_problem_information": _BOOL01,
    "will_delay_interval": _U32,
    "request_response_information": _BOOL01,
    "response_information": _TEXT,
    "server_reference": _TEXT,
    "reason_string": _TEXT,
    "receive_maximum": st.integers(1, 0xFFFF),
    "topic_alias_maximum": _U16,
    "topic_alias": st.integers(1, 0xFFFF),
    "maximum_qos": _BOOL01,
    "retain_available": _BOOL01,
    "user_properties": st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=3).map(tuple),
    "maximum_packet_size": st.integers(1, 0xFFFF_FFFF),
    "wildcard_subscription_available": _BOOL01,
    "subscription_identifier_available": _BOOL01,
    "shared_subscription_available": _BOOL01,
}


def properties(kind: str, version: int) -> st.SearchStrategy[Properties]:
    if version != V5:
        return st.just(EMPTY_PROPERTIES)
    optional = {name: _PROPERTY_VALUES[name] for name, kinds in SPEC_ALLOWED.items() if kind in kinds}
    if kind == "SUBSCRIBE":
        optional["subscription_identifiers"] = st.tuples(st.integers(1, 268_435_455))
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: Properties(**values))


def _v5_code() -> st.SearchStrategy[int]:
    return st.sampled_from(list(ReasonCode))


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    protocol = draw(st.sampled_from([(V31, "MQIsdp"), (V311, "MQTT")])) if version != V5 else (V5, "MQTT")
    will = None
    if draw(st.booleans()):
        will = WillSpec(
            draw(_TEXT),
            draw(_BIN),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            draw(properties("WILL", version)),
        )
    username = draw(st.none() | _TEXT)
    password = draw(st.none() | _BIN) if username is not None or version == V5 else None
    return Connect(
        draw(_TEXT),
        protocol[0],
        draw(st.booleans()),
        draw(_U16),
        will,
        username,
        password,
        draw(properties("CONNECT", version)),
        protocol[1],
    )


def packets(version: int) -> st.SearchStrategy[Packet]:
    v5 = version == V5
    code = _v5_code() if v5 else st.just(0)
    connack_code = (
        _v5_code()
        if v5
        else st.sampled_from(
            [
                ReasonCode.SUCCESS,
                ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
                ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                ReasonCode.SERVER_UNAVAILABLE,
                ReasonCode.BAD_USER_NAME_OR_PASSWORD,
                ReasonCode.NOT_AUTHORIZED,
            ]
        )
    )
    publish = st.integers(0, 2).flatmap(
        lambda qos: st.builds(
            Publish,
            _TEXT,
            _BIN,
            st.just(qos),
            st.booleans(),
            st.booleans() if qos else st.just(False),
            _PACKET_ID if qos else st.just(0),
            properties("PUBLISH", version),
        )
    )
    option = (
        st.builds(
            SubscriptionRequest, _TEXT, st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 2)
        )
        if v5
        else st.builds(SubscriptionRequest, _TEXT, st.integers(0, 2))
    )
    suback_codes = st.sampled_from(list(ReasonCode)) if v5 else st.sampled_from([0, 1, 2, 0x80])
    choices: list[st.SearchStrategy[Any]] = [
        connects(version),
        st.builds(Connack, st.booleans(), connack_code, properties("CONNACK", version)),
        publish,
        *(
            st.builds(cls, _PACKET_ID, code, properties(cls.__name__.upper(), version))
            for cls in (Puback, Pubrec, Pubrel, Pubcomp)
        ),
        st.builds(
            Subscribe,
            _PACKET_ID,
            st.lists(option, min_size=1, max_size=4).map(tuple),
            properties("SUBSCRIBE", version),
        ),
        st.builds(
            Suback,
            _PACKET_ID,
            st.lists(suback_codes, min_size=1, max_size=4).map(tuple),
            properties("SUBACK", version),
        ),
        st.builds(
            Unsubscribe,
            _PACKET_ID,
            st.lists(_TEXT, min_size=1, max_size=4).map(tuple),
            properties("UNSUBSCRIBE", version),
        ),
        st.builds(
            Unsuback,
            _PACKET_ID,
            st.lists(suback_codes, min_size=1, max_size=4).map(tuple) if v5 else st.just(()),
            properties("UNSUBACK", version),
        ),
        st.just(Pingreq()),
        st.just(Pingresp()),
        st.builds(Disconnect, code, properties("DISCONNECT", version)),
    ]
    if v5:
        choices.append(st.builds(Auth, code, properties("AUTH", version)))
    return st.one_of(choices)


PACKETS = {version: packets(version) for version in (V311, V5)}
NON_CONNECT = {
    version: PACKETS[version].filter(lambda p: not isinstance(p, Connect)) for version in (V311, V5)
}
# Stream elements: half random packets, half the hand-picked ones above (all properties): cheaper to draw.
STREAM_ELEMENTS = {
    version: st.one_of(
        st.sampled_from([p for _, v, p in ROUND_TRIPS if v == version and not isinstance(p, Connect)]),
        NON_CONNECT[version],
    )
    for version in (V311, V5)
}


def _feed_in_chunks(decoder: StreamDecoder, data: bytes, cuts: list[int]) -> list[Packet]:
    out: list[Packet] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {len(data)})
    start = 0
    for end in points:
        out += decoder.feed(data[start:end])
        start = end
    return out


def _check_error_contract(decoder: StreamDecoder) -> None:
    error = decoder.error
    if error is None:
        return
    assert type(error) is MalformedPacket
    assert ReasonCode(error.code) >= ReasonCode.UNSPECIFIED_ERROR
    assert decoder.feed(b"\xc0\x00") == []


@pytest.mark.parametrize("version", [V311, V5])
@HYPOTHESIS
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_random_bytes_never_raise(version: int, data: bytes, cuts: list[int]) -> None:
    decoder = StreamDecoder(version=version)
    out = _feed_in_chunks(decoder, data, cuts)
    assert all(isinstance(p, Packet) for p in out)
    _check_error_contract(decoder)


@pytest.mark.parametrize("version", [V311, V5])
@HYPOTHESIS
@given(data=st.data())
def test_random_valid_packets_round_trip(version: int, data: st.DataObject) -> None:
    packet = data.draw(PACKETS[version])
    encoded = encode(packet, version)
    assert decode_one(encoded, version) == packet
    if version != V5:
        assert encode(packet, version) == encode(decode_one(encoded, version), version)


@pytest.mark.parametrize("version", [V311, V5])
@HYPOTHESIS_STREAMS
@given(data=st.data())
def test_random_valid_streams_split_anywhere_round_trip(version: int, data: st.DataObject) -> None:
    stream = data.draw(st.lists(STREAM_ELEMENTS[version], min_size=1, max_size=4))
    encoded = encode_all(stream, version)
    cuts = data.draw(st.lists(st.integers(0, len(encoded)), max_size=8))
    decoder = StreamDecoder(version=version)
    assert _feed_in_chunks(decoder, encoded, cuts) == stream
    assert decoder.error is None


@pytest.mark.parametrize("version", [V311, V5])
@HYPOTHESIS_STREAMS
@given(data=st.data())
def test_mutated_stream_keeps_the_packets_before_the_damage_and_never_raises(
    version: int, data: st.DataObject
) -> None:
    stream = data.draw(st.lists(STREAM_ELEMENTS[version], min_size=1, max_size=4))
    parts = [encode(p, version) for p in stream]
    encoded = b"".join(parts)
    index = data.draw(st.integers(0, len(encoded) - 1))
    mutated = bytearray(encoded)
    mutated[index] = data.draw(st.integers(0, 255).filter(lambda b: b != encoded[index]))
    cuts = data.draw(st.lists(st.integers(0, len(encoded)), max_size=6))
    decoder = StreamDecoder(version=version)
    out = _feed_in_chunks(decoder, bytes(mutated), cuts)
    _check_error_contract(decoder)
    intact = 0
    end = 0
    for part in parts:
        end += len(part)
        if end > index:
            break
        intact += 1
    assert out[:intact] == stream[:intact]


@pytest.mark.parametrize("version", [V311, V5])
@HYPOTHESIS_STREAMS
@given(data=st.data())
def test_truncated_stream_gives_the_complete_packets_and_waits_for_the_rest(
    version: int, data: st.DataObject
) -> None:
    stream = data.draw(st.lists(PACKETS[version], min_size=1, max_size=4))
    parts = [encode(p, version) for p in stream]
    encoded = b"".join(parts)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    decoder = StreamDecoder(version=version)
    out = _feed_in_chunks(decoder, encoded[:cut], data.draw(st.lists(st.integers(0, cut), max_size=4)))
    complete = 0
    end = 0
    for part in parts:
        end += len(part)
        if end > cut:
            break
        complete += 1
    assert decoder.error is None
    assert out == stream[:complete]
    assert decoder.feed(encoded[cut:]) == stream[complete:]
