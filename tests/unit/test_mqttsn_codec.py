"""Tests for gateways.mqttsn.codec: round trips, scapy oracle vectors, a malformed corpus, properties.

Byte vectors come from two independent sources: hand-written hex following the layouts of MQTT-SN 1.2 §5, and
scapy's ``contrib.mqttsn`` (never imported by the codec). Scapy spells the fields ``tid`` (topic id), ``mid``
(msg id), ``tid_type``, ``cleansess``, ``prot_id``, ``w_node_id``, and QoS -1 as ``qos=3`` (flag bits 0b11,
§5.3.4). Two scapy quirks are worked around where noted: it builds DISCONNECT without a duration as four
bytes, and it always writes a flags octet in WILLTOPIC/WILLTOPICUPD (it has no two-octet empty form).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.contrib.mqttsn import (
    MQTTSN,
    MQTTSNAdvertise,
    MQTTSNConnack,
    MQTTSNConnect,
    MQTTSNDisconnect,
    MQTTSNEncaps,
    MQTTSNGwInfo,
    MQTTSNPingReq,
    MQTTSNPingResp,
    MQTTSNPuback,
    MQTTSNPubcomp,
    MQTTSNPublish,
    MQTTSNPubrec,
    MQTTSNPubrel,
    MQTTSNRegack,
    MQTTSNRegister,
    MQTTSNSearchGW,
    MQTTSNSuback,
    MQTTSNSubscribe,
    MQTTSNUnsuback,
    MQTTSNUnsubscribe,
    MQTTSNWillMsg,
    MQTTSNWillMsgReq,
    MQTTSNWillMsgResp,
    MQTTSNWillMsgUpd,
    MQTTSNWillTopic,
    MQTTSNWillTopicReq,
    MQTTSNWillTopicResp,
    MQTTSNWillTopicUpd,
)
from scapy.packet import Packet as ScapyPacket

from core.errors import MalformedPacket
from gateways.mqttsn.codec import (
    Advertise,
    Connack,
    Connect,
    Disconnect,
    Encapsulated,
    GwInfo,
    Message,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Regack,
    Register,
    SearchGw,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    WillMsg,
    WillMsgReq,
    WillMsgResp,
    WillMsgUpd,
    WillTopic,
    WillTopicReq,
    WillTopicResp,
    WillTopicUpd,
    decode,
    encode,
    encode_publish,
    short_topic_id,
    short_topic_name,
)
from gateways.mqttsn.numbers import MsgType, ReturnCode, TopicIdType

ALL_TYPES = set(typing.get_args(Message))
NORMAL, PREDEFINED, SHORT, RESERVED = TopicIdType.NORMAL, TopicIdType.PREDEFINED, TopicIdType.SHORT, 3
MALFORMED = 0x03
HYPOTHESIS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _flags(qos: int = 0, retain: bool = False, dup: bool = False, kind: int = 0) -> int:
    """The flags octet of §5.3.4, restated here rather than taken from the codec."""
    return (dup << 7) | ((0b11 if qos == -1 else qos) << 5) | (retain << 4) | kind


def _long_form(datagram: bytes) -> bytes:
    """The same message with the 3-octet Length form (§5.2.1), for a datagram in the short form."""
    assert datagram[0] != 0x01
    return b"\x01" + (len(datagram) + 2).to_bytes(2, "big") + datagram[1:]


def _assert_malformed(datagram: bytes) -> None:
    with pytest.raises(MalformedPacket) as info:
        decode(datagram)
    assert info.value.code == MALFORMED == ReturnCode.NOT_SUPPORTED


def _decodes_cleanly(datagram: bytes) -> None:
    """The policy for any input: MalformedPacket (code 0x03), or a message that survives a round trip."""
    try:
        message = decode(datagram)
    except MalformedPacket as exc:
        assert exc.code == MALFORMED
        return
    assert type(message) in ALL_TYPES
    assert decode(encode(message)) == message


# --- 1. round trips: every message type, hand-written bytes (§5.4)


ROUND_TRIP: list[tuple[str, Message, str]] = [
    ("advertise", Advertise(gw_id=5, duration=900), "0500050384"),
    ("searchgw", SearchGw(radius=2), "030102"),
    ("gwinfo", GwInfo(gw_id=7), "030207"),
    ("gwinfo-addr", GwInfo(gw_id=7, gw_addr=b"\x0a\x00\x00\x01"), "0702070a000001"),
    ("connect-clean", Connect("c1", duration=10), "08040401000a6331"),
    ("connect-will", Connect("dev", 60, clean_session=False, will=True), "09040801003c646576"),
    ("connect-clean-will", Connect("d", 0xFFFF, clean_session=True, will=True), "07040c01ffff64"),
    ("connect-neither", Connect("d", 1, clean_session=False), "07040001000164"),
    ("connect-protocol-id", Connect("d", 1, protocol_id=2), "07040402000164"),
    ("connect-utf8", Connect("é", 5), "080404010005c3a9"),
    ("connack", Connack(), "030500"),
    ("connack-congestion", Connack(ReturnCode.CONGESTION), "030501"),
    ("willtopicreq", WillTopicReq(), "0206"),
    ("willtopic-empty", WillTopic(None), "0207"),
    ("willtopic-flags-no-topic", WillTopic("", qos=0), "030700"),
    ("willtopic-qos1-retain", WillTopic("w/t", qos=1, retain=True), "060730772f74"),
    ("willtopic-qos2", WillTopic("w", qos=2), "04074077"),
    ("willmsgreq", WillMsgReq(), "0208"),
    ("willmsg", WillMsg(b"bye"), "0509627965"),
    ("willmsg-empty", WillMsg(b""), "0209"),
    ("register", Register(0, 1, "a/b"), "090a00000001612f62"),
    ("register-from-gateway", Register(0x1234, 0xFFFF, "x"), "070a1234ffff78"),
    ("regack", Regack(0x0101, 1), "070b0101000100"),
    ("regack-invalid", Regack(0, 1, ReturnCode.INVALID_TOPIC_ID), "070b0000000102"),
    ("publish-qos0", Publish(1, b"hi"), "090c00000100006869"),
    ("publish-qos1-dup-retain", Publish(1, b"", qos=1, msg_id=9, retain=True, dup=True), "070cb000010009"),
    ("publish-qos2", Publish(0xFFFE, b"\x00", qos=2, msg_id=0xFFFF), "080c40fffeffff00"),
    ("publish-qos-1-predefined", Publish(7, b"v", qos=-1, topic_id_type=PREDEFINED), "080c610007000076"),
    ("publish-qos-1-short", Publish(0x6162, b"", qos=-1, topic_id_type=SHORT), "070c6261620000"),
    ("publish-reserved-kind", Publish(3, b"", topic_id_type=RESERVED), "070c0300030000"),
    ("puback", Puback(1, 2), "070d0001000200"),
    ("puback-congestion", Puback(1, 2, ReturnCode.CONGESTION), "070d0001000201"),
    ("pubrec", Pubrec(7), "040f0007"),
    ("pubrel", Pubrel(7), "04100007"),
    ("pubcomp", Pubcomp(7), "040e0007"),
    ("subscribe-name-qos1", Subscribe(3, NORMAL, "a/#", qos=1), "0812200003612f23"),
    (
        "subscribe-predefined-qos2-dup",
        Subscribe(3, PREDEFINED, topic_id=7, qos=2, dup=True),
        "0712c100030007",
    ),
    ("subscribe-short", Subscribe(3, SHORT, "ab", topic_id=0x6162), "07120200036162"),
    ("subscribe-qos-1", Subscribe(4, NORMAL, "t", qos=-1), "061260000474"),
    ("subscribe-empty-name", Subscribe(4), "0512000004"),
    ("suback", Suback(0, 3, qos=1), "0813200000000300"),
    ("suback-rejected", Suback(5, 3, ReturnCode.NOT_SUPPORTED, qos=2), "0813400005000303"),
    ("unsubscribe-name", Unsubscribe(4, NORMAL, "a/b"), "0814000004612f62"),
    ("unsubscribe-predefined", Unsubscribe(4, PREDEFINED, topic_id=9), "07140100040009"),
    ("unsubscribe-short", Unsubscribe(4, SHORT, "ab", topic_id=0x6162), "07140200046162"),
    ("unsuback", Unsuback(4), "04150004"),
    ("pingreq", Pingreq(), "0216"),
    ("pingreq-client-id", Pingreq("c1"), "04166331"),
    ("pingresp", Pingresp(), "0217"),
    ("disconnect", Disconnect(), "0218"),
    ("disconnect-sleep", Disconnect(60), "0418003c"),
    ("disconnect-sleep-0", Disconnect(0), "04180000"),
    ("willtopicupd-empty", WillTopicUpd(None), "021a"),
    ("willtopicupd", WillTopicUpd("w/t", qos=1, retain=True), "061a30772f74"),
    ("willtopicresp", WillTopicResp(), "031b00"),
    ("willmsgupd", WillMsgUpd(b"m"), "031c6d"),
    ("willmsgresp", WillMsgResp(ReturnCode.CONGESTION), "031d01"),
    ("encapsulated", Encapsulated(b"\x00\x07", Connect("c1", 10)), "05fe000007" + "08040401000a6331"),
    ("encapsulated-radius", Encapsulated(b"\xaa", Pingresp(), radius=3), "04fe03aa" + "0217"),
]


def test_round_trip_table_covers_every_message_type() -> None:
    assert len(ALL_TYPES) == 28
    assert {type(message) for _, message, _ in ROUND_TRIP} == ALL_TYPES


@pytest.mark.parametrize(("message", "wire"), [c[1:] for c in ROUND_TRIP], ids=[c[0] for c in ROUND_TRIP])
def test_round_trip(message: Message, wire: str) -> None:
    assert encode(message).hex() == wire
    assert decode(bytes.fromhex(wire)) == message


# §5.5 gives the encapsulation header a 1-octet Length only (see the malformed corpus).
_PLAIN_ROUND_TRIP = [c for c in ROUND_TRIP if not isinstance(c[1], Encapsulated)]


@pytest.mark.parametrize(
    ("message", "wire"), [c[1:] for c in _PLAIN_ROUND_TRIP], ids=[c[0] for c in _PLAIN_ROUND_TRIP]
)
def test_decode_accepts_the_long_length_form_for_small_messages(message: Message, wire: str) -> None:
    assert decode(_long_form(bytes.fromhex(wire))) == message


def test_decode_accepts_a_long_length_form_inner_message_in_an_encapsulation() -> None:
    wire = bytes.fromhex("04fe0001") + _long_form(bytes.fromhex("04166331"))
    assert decode(wire) == Encapsulated(b"\x01", Pingreq("c1"))


@pytest.mark.parametrize("dup", [False, True])
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("kind", [NORMAL, PREDEFINED, SHORT])
@pytest.mark.parametrize("qos", [-1, 0, 1, 2])
def test_publish_flags(qos: int, kind: int, retain: bool, dup: bool) -> None:
    message = Publish(0x0102, b"p", qos=qos, msg_id=0x0304, topic_id_type=kind, retain=retain, dup=dup)
    wire = encode(message)
    assert wire == bytes((8, MsgType.PUBLISH, _flags(qos, retain, dup, kind), 1, 2, 3, 4)) + b"p"
    assert decode(wire) == message
    assert encode_publish(0x0102, b"p", qos, 0x0304, kind, retain, dup) == wire


@pytest.mark.parametrize("dup", [False, True])
@pytest.mark.parametrize("kind", [NORMAL, PREDEFINED, SHORT])
@pytest.mark.parametrize("qos", [-1, 0, 1, 2])
def test_subscribe_and_unsubscribe_flags(qos: int, kind: int, dup: bool) -> None:
    name, topic_id, topic = {
        NORMAL: ("a/+", 0, b"a/+"),
        PREDEFINED: ("", 0x0A0B, b"\x0a\x0b"),
        SHORT: ("zz", 0x7A7A, b"zz"),
    }[kind]
    subscribe = Subscribe(0x0102, kind, name, topic_id, qos, dup)
    wire = encode(subscribe)
    assert wire == bytes((5 + len(topic), MsgType.SUBSCRIBE, _flags(qos, False, dup, kind), 1, 2)) + topic
    assert decode(wire) == subscribe
    unsubscribe = Unsubscribe(0x0102, kind, name, topic_id)
    wire = encode(unsubscribe)
    assert wire == bytes((5 + len(topic), MsgType.UNSUBSCRIBE, kind, 1, 2)) + topic
    assert decode(wire) == unsubscribe


@pytest.mark.parametrize("qos", [-1, 0, 1, 2])
def test_suback_flags(qos: int) -> None:
    message = Suback(0x0102, 0x0304, ReturnCode.ACCEPTED, qos)
    wire = encode(message)
    assert wire == bytes((8, MsgType.SUBACK, _flags(qos), 1, 2, 3, 4, 0))
    assert decode(wire) == message


@pytest.mark.parametrize("will", [False, True])
@pytest.mark.parametrize("clean_session", [False, True])
def test_connect_flags(clean_session: bool, will: bool) -> None:
    message = Connect("id", 30, clean_session, will)
    wire = encode(message)
    assert wire == bytes((8, MsgType.CONNECT, (will << 3) | (clean_session << 2), 1, 0, 30)) + b"id"
    assert decode(wire) == message


@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("cls", [WillTopic, WillTopicUpd])
def test_will_topic_flags(cls: type[WillTopic] | type[WillTopicUpd], qos: int, retain: bool) -> None:
    message = cls("will/t", qos, retain)
    wire = encode(message)
    msg_type = MsgType.WILLTOPIC if cls is WillTopic else MsgType.WILLTOPICUPD
    assert wire == bytes((9, msg_type, _flags(qos, retain))) + b"will/t"
    assert decode(wire) == message


@pytest.mark.parametrize("cls", [WillTopic, WillTopicUpd])
def test_will_topic_two_octet_form_is_the_empty_will(cls: type[WillTopic] | type[WillTopicUpd]) -> None:
    msg_type = MsgType.WILLTOPIC if cls is WillTopic else MsgType.WILLTOPICUPD
    assert encode(cls(None)) == bytes((2, msg_type))
    decoded = decode(bytes((2, msg_type)))
    assert type(decoded) is cls
    assert decoded.topic is None


@pytest.mark.parametrize("radius", [0, 1, 2, 3])
@pytest.mark.parametrize("size", range(1, 9))
def test_encapsulation_node_ids_and_radius(size: int, radius: int) -> None:
    node_id = bytes(range(0xA0, 0xA0 + size))
    inner = Publish(5, b"data", qos=1, msg_id=6)
    message = Encapsulated(node_id, inner, radius)
    wire = encode(message)
    assert wire == bytes((size + 3, MsgType.ENCAPSULATED, radius)) + node_id + encode(inner)
    assert decode(wire) == message


def test_encapsulation_ignores_the_reserved_ctrl_bits() -> None:
    assert decode(bytes.fromhex("04fefd070217")) == Encapsulated(b"\x07", Pingresp(), radius=1)


def test_encapsulation_carries_a_long_form_inner_message() -> None:
    message = Encapsulated(b"\x01", Publish(1, b"z" * 300))
    wire = encode(message)
    assert wire[:8].hex() == "04fe00010101350c"
    assert decode(wire) == message


@pytest.mark.parametrize(
    ("size", "total", "header"),
    [
        (0, 7, "070c"),
        (248, 255, "ff0c"),
        (249, 258, "0101020c"),
        (250, 259, "0101030c"),
        (65526, 65535, "01ffff0c"),
    ],
)
def test_publish_length_forms(size: int, total: int, header: str) -> None:
    """Under 256 octets the Length is 1 octet; a message that would be 256 takes 0x01 + 2 octets (§5.2.1)."""
    message = Publish(1, b"d" * size, qos=1, msg_id=2)
    wire = encode(message)
    assert len(wire) == total
    assert wire.hex().startswith(header)
    assert decode(wire) == message


def test_length_boundary_holds_for_other_variable_messages() -> None:
    assert encode(WillMsg(b"m" * 253))[:2].hex() == "ff09"
    assert encode(WillMsg(b"m" * 254))[:4].hex() == "01010209"
    assert encode(Register(1, 2, "t" * 249))[:2].hex() == "ff0a"
    assert encode(Register(1, 2, "t" * 250))[:4].hex() == "0101020a"
    for message in (WillMsg(b"m" * 254), Register(1, 2, "t" * 250), GwInfo(1, b"a" * 300)):
        assert decode(encode(message)) == message


def test_encode_refuses_a_message_over_65535_octets() -> None:
    with pytest.raises(ValueError, match="65535"):
        encode(Publish(1, b"d" * 65527))


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(TypeError):
        encode(object())  # type: ignore[arg-type]


def test_short_topic_helpers() -> None:
    assert short_topic_id("ab") == 0x6162
    assert short_topic_name(0x6162) == "ab"
    assert short_topic_name(short_topic_id("é")) == "é"
    with pytest.raises(ValueError):
        short_topic_id("abc")
    with pytest.raises(MalformedPacket) as info:
        short_topic_name(0xFFFE)
    assert info.value.code == ReturnCode.INVALID_TOPIC_ID


# --- 2. byte vectors from scapy's contrib.mqttsn


def test_scapy_known_vectors() -> None:
    publish = bytes(MQTTSN() / MQTTSNPublish(qos=1, tid=1, mid=2, data=b"x" * 16))
    assert publish.hex() == "170c2000010002" + "78" * 16
    assert decode(publish) == Publish(1, b"x" * 16, qos=1, msg_id=2)

    long_publish = bytes(MQTTSN() / MQTTSNPublish(tid=5, data=b"y" * 300))
    assert long_publish.hex().startswith("0101350c")
    assert decode(long_publish) == Publish(5, b"y" * 300)
    assert encode(Publish(5, b"y" * 300)) == long_publish

    encapsulated = bytes(
        MQTTSN()
        / MQTTSNEncaps(w_node_id=b"\x00\x07")
        / MQTTSN()
        / MQTTSNConnect(cleansess=1, duration=10, client_id=b"c1")
    )
    assert encapsulated.hex() == "05fe00000708040401000a6331"
    assert decode(encapsulated) == Encapsulated(b"\x00\x07", Connect("c1", 10))


ORACLE: list[tuple[str, ScapyPacket, Message]] = [
    ("advertise", MQTTSN() / MQTTSNAdvertise(gw_id=9, duration=1000), Advertise(9, 1000)),
    ("searchgw", MQTTSN() / MQTTSNSearchGW(radius=3), SearchGw(3)),
    ("gwinfo", MQTTSN() / MQTTSNGwInfo(gw_id=1), GwInfo(1)),
    ("gwinfo-addr", MQTTSN() / MQTTSNGwInfo(gw_id=1, gw_addr=b"\x7f\x00\x00\x01"), GwInfo(1, b"\x7f\0\0\1")),
    (
        "connect-will-unclean",
        MQTTSN() / MQTTSNConnect(will=1, cleansess=0, duration=300, client_id=b"sensor-1"),
        Connect("sensor-1", 300, clean_session=False, will=True),
    ),
    (
        "connect-clean",
        MQTTSN() / MQTTSNConnect(cleansess=1, prot_id=1, duration=0, client_id=b"x"),
        Connect("x", 0),
    ),
    ("connack", MQTTSN() / MQTTSNConnack(return_code=3), Connack(3)),
    ("willtopicreq", MQTTSN() / MQTTSNWillTopicReq(), WillTopicReq()),
    ("willtopic-empty", MQTTSN(type=MsgType.WILLTOPIC), WillTopic(None)),
    (
        "willtopic",
        MQTTSN() / MQTTSNWillTopic(qos=2, retain=1, will_topic=b"d/1/lost"),
        WillTopic("d/1/lost", 2, True),
    ),
    ("willmsgreq", MQTTSN() / MQTTSNWillMsgReq(), WillMsgReq()),
    ("willmsg", MQTTSN() / MQTTSNWillMsg(will_msg=b"gone"), WillMsg(b"gone")),
    ("register", MQTTSN() / MQTTSNRegister(tid=0, mid=17, topic_name=b"a/b/c"), Register(0, 17, "a/b/c")),
    ("regack", MQTTSN() / MQTTSNRegack(tid=33, mid=17, return_code=2), Regack(33, 17, 2)),
    (
        "publish-dup-qos2-retain",
        MQTTSN() / MQTTSNPublish(dup=1, qos=2, retain=1, tid=33, mid=18, data=b"\x00\xff"),
        Publish(33, b"\x00\xff", qos=2, msg_id=18, retain=True, dup=True),
    ),
    (
        "publish-qos-1-short",
        MQTTSN() / MQTTSNPublish(qos=3, tid_type=2, tid=0x6162, data=b"21.5"),
        Publish(0x6162, b"21.5", qos=-1, topic_id_type=SHORT),
    ),
    (
        "publish-qos-1-predefined",
        MQTTSN() / MQTTSNPublish(qos=3, tid_type=1, tid=4, data=b""),
        Publish(4, b"", qos=-1, topic_id_type=PREDEFINED),
    ),
    ("puback", MQTTSN() / MQTTSNPuback(tid=33, mid=18, return_code=1), Puback(33, 18, 1)),
    ("pubrec", MQTTSN() / MQTTSNPubrec(mid=19), Pubrec(19)),
    ("pubrel", MQTTSN() / MQTTSNPubrel(mid=19), Pubrel(19)),
    ("pubcomp", MQTTSN() / MQTTSNPubcomp(mid=19), Pubcomp(19)),
    (
        "subscribe-name",
        MQTTSN() / MQTTSNSubscribe(qos=1, mid=20, topic_name=b"a/+/c"),
        Subscribe(20, NORMAL, "a/+/c", qos=1),
    ),
    (
        "subscribe-predefined",
        MQTTSN() / MQTTSNSubscribe(dup=1, qos=2, tid_type=1, mid=21, tid=77),
        Subscribe(21, PREDEFINED, topic_id=77, qos=2, dup=True),
    ),
    (
        "subscribe-short",
        MQTTSN() / MQTTSNSubscribe(qos=3, tid_type=2, mid=22, short_topic=b"ab"),
        Subscribe(22, SHORT, "ab", topic_id=0x6162, qos=-1),
    ),
    ("suback", MQTTSN() / MQTTSNSuback(qos=1, tid=0, mid=20, return_code=0), Suback(0, 20, 0, qos=1)),
    (
        "unsubscribe-name",
        MQTTSN() / MQTTSNUnsubscribe(mid=23, topic_name=b"a/#"),
        Unsubscribe(23, NORMAL, "a/#"),
    ),
    (
        "unsubscribe-predefined",
        MQTTSN() / MQTTSNUnsubscribe(tid_type=1, mid=24, tid=77),
        Unsubscribe(24, PREDEFINED, topic_id=77),
    ),
    (
        "unsubscribe-short",
        MQTTSN() / MQTTSNUnsubscribe(tid_type=2, mid=25, short_topic=b"ab"),
        Unsubscribe(25, SHORT, "ab", topic_id=0x6162),
    ),
    ("unsuback", MQTTSN() / MQTTSNUnsuback(mid=25), Unsuback(25)),
    ("pingreq", MQTTSN() / MQTTSNPingReq(), Pingreq()),
    ("pingreq-client-id", MQTTSN() / MQTTSNPingReq(client_id=b"sleepy"), Pingreq("sleepy")),
    ("pingresp", MQTTSN() / MQTTSNPingResp(), Pingresp()),
    # scapy's MQTTSN()/MQTTSNDisconnect() writes Length 2 and a duration of 0: four octets.
    ("disconnect", MQTTSN(len=2, type=MsgType.DISCONNECT), Disconnect()),
    ("disconnect-sleep", MQTTSN() / MQTTSNDisconnect(duration=600), Disconnect(600)),
    ("willtopicupd-empty", MQTTSN(type=MsgType.WILLTOPICUPD), WillTopicUpd(None)),
    (
        "willtopicupd",
        MQTTSN() / MQTTSNWillTopicUpd(qos=1, will_topic=b"d/1/lost"),
        WillTopicUpd("d/1/lost", 1),
    ),
    ("willtopicresp", MQTTSN() / MQTTSNWillTopicResp(return_code=0), WillTopicResp(0)),
    ("willmsgupd", MQTTSN() / MQTTSNWillMsgUpd(will_msg=b"gone!"), WillMsgUpd(b"gone!")),
    ("willmsgresp", MQTTSN() / MQTTSNWillMsgResp(return_code=1), WillMsgResp(1)),
    (
        "encapsulated-8-byte-node",
        MQTTSN() / MQTTSNEncaps(radius=2, w_node_id=bytes(range(8))) / MQTTSN() / MQTTSNPubrec(mid=1),
        Encapsulated(bytes(range(8)), Pubrec(1), radius=2),
    ),
    (
        "encapsulated-long-inner",
        MQTTSN() / MQTTSNEncaps(w_node_id=b"\x42") / MQTTSN() / MQTTSNWillMsg(will_msg=b"w" * 400),
        Encapsulated(b"\x42", WillMsg(b"w" * 400)),
    ),
]


def test_oracle_table_covers_every_message_type() -> None:
    assert {type(message) for _, _, message in ORACLE} == ALL_TYPES


@pytest.mark.parametrize(("packet", "message"), [c[1:] for c in ORACLE], ids=[c[0] for c in ORACLE])
def test_decode_scapy_bytes(packet: ScapyPacket, message: Message) -> None:
    assert decode(bytes(packet)) == message


@pytest.mark.parametrize(("packet", "message"), [c[1:] for c in ORACLE], ids=[c[0] for c in ORACLE])
def test_encode_matches_scapy(packet: ScapyPacket, message: Message) -> None:
    assert encode(message).hex() == bytes(packet).hex()


def test_scapy_dissects_what_we_encode() -> None:
    dissected = MQTTSN(encode(Subscribe(9, SHORT, "ab", 0x6162, qos=-1, dup=True)))
    sub = dissected[MQTTSNSubscribe]
    assert (sub.dup, sub.qos, sub.tid_type, sub.mid, sub.short_topic) == (1, 3, 2, 9, b"ab")
    dissected = MQTTSN(encode(Encapsulated(b"\x00\x09", Publish(3, b"v" * 300, qos=1, msg_id=4), radius=1)))
    assert dissected[MQTTSNEncaps].w_node_id == b"\x00\x09"
    assert dissected[MQTTSNEncaps].radius == 1
    publish = dissected[MQTTSNPublish]
    assert (publish.qos, publish.tid, publish.mid, publish.data) == (1, 3, 4, b"v" * 300)


def _scapy_qos(qos: int) -> int:
    return 0b11 if qos == -1 else qos


_TO_SCAPY: dict[type, Callable[[Any], ScapyPacket]] = {
    Advertise: lambda m: MQTTSNAdvertise(gw_id=m.gw_id, duration=m.duration),
    SearchGw: lambda m: MQTTSNSearchGW(radius=m.radius),
    GwInfo: lambda m: MQTTSNGwInfo(gw_id=m.gw_id, gw_addr=m.gw_addr),
    Connect: lambda m: MQTTSNConnect(
        will=int(m.will),
        cleansess=int(m.clean_session),
        prot_id=m.protocol_id,
        duration=m.duration,
        client_id=m.client_id.encode(),
    ),
    Connack: lambda m: MQTTSNConnack(return_code=m.return_code),
    WillTopicReq: lambda m: MQTTSNWillTopicReq(),
    WillTopic: lambda m: MQTTSNWillTopic(qos=m.qos, retain=int(m.retain), will_topic=m.topic.encode()),
    WillMsgReq: lambda m: MQTTSNWillMsgReq(),
    WillMsg: lambda m: MQTTSNWillMsg(will_msg=m.message),
    Register: lambda m: MQTTSNRegister(tid=m.topic_id, mid=m.msg_id, topic_name=m.topic_name.encode()),
    Regack: lambda m: MQTTSNRegack(tid=m.topic_id, mid=m.msg_id, return_code=m.return_code),
    Publish: lambda m: MQTTSNPublish(
        dup=int(m.dup),
        qos=_scapy_qos(m.qos),
        retain=int(m.retain),
        tid_type=m.topic_id_type,
        tid=m.topic_id,
        mid=m.msg_id,
        data=m.data,
    ),
    Puback: lambda m: MQTTSNPuback(tid=m.topic_id, mid=m.msg_id, return_code=m.return_code),
    Pubrec: lambda m: MQTTSNPubrec(mid=m.msg_id),
    Pubrel: lambda m: MQTTSNPubrel(mid=m.msg_id),
    Pubcomp: lambda m: MQTTSNPubcomp(mid=m.msg_id),
    Subscribe: lambda m: MQTTSNSubscribe(
        dup=int(m.dup), qos=_scapy_qos(m.qos), tid_type=m.topic_id_type, mid=m.msg_id, **_scapy_topic(m)
    ),
    Suback: lambda m: MQTTSNSuback(
        qos=_scapy_qos(m.qos), tid=m.topic_id, mid=m.msg_id, return_code=m.return_code
    ),
    Unsubscribe: lambda m: MQTTSNUnsubscribe(tid_type=m.topic_id_type, mid=m.msg_id, **_scapy_topic(m)),
    Unsuback: lambda m: MQTTSNUnsuback(mid=m.msg_id),
    Pingreq: lambda m: MQTTSNPingReq(client_id=(m.client_id or "").encode()),
    Pingresp: lambda m: MQTTSNPingResp(),
    Disconnect: lambda m: MQTTSNDisconnect(duration=m.duration),
    WillTopicUpd: lambda m: MQTTSNWillTopicUpd(qos=m.qos, retain=int(m.retain), will_topic=m.topic.encode()),
    WillTopicResp: lambda m: MQTTSNWillTopicResp(return_code=m.return_code),
    WillMsgUpd: lambda m: MQTTSNWillMsgUpd(will_msg=m.message),
    WillMsgResp: lambda m: MQTTSNWillMsgResp(return_code=m.return_code),
}


def _scapy_topic(m: Subscribe | Unsubscribe) -> dict[str, Any]:
    if m.topic_id_type == PREDEFINED:
        return {"tid": m.topic_id}
    if m.topic_id_type == SHORT:
        return {"short_topic": m.topic_name.encode()}
    return {"topic_name": m.topic_name.encode()}


def _to_scapy(m: Message) -> ScapyPacket:
    """The scapy packet for a message, field by field (independent of the codec's encoder)."""
    if isinstance(m, Encapsulated):
        return MQTTSN() / MQTTSNEncaps(radius=m.radius, w_node_id=m.node_id) / _to_scapy(m.message)
    if isinstance(m, Disconnect) and m.duration is None:
        return MQTTSN(len=2, type=MsgType.DISCONNECT)
    if isinstance(m, WillTopic | WillTopicUpd) and m.topic is None:
        return MQTTSN(type=MsgType.WILLTOPIC if isinstance(m, WillTopic) else MsgType.WILLTOPICUPD)
    return MQTTSN() / _TO_SCAPY[type(m)](m)


def test_to_scapy_covers_every_plain_message_type() -> None:
    assert set(_TO_SCAPY) == ALL_TYPES - {Encapsulated}


# --- 3. malformed corpus: every entry is dropped with MalformedPacket code 0x03 (the module's policy)


MALFORMED_CORPUS: list[tuple[str, str]] = [
    ("", "empty"),
    ("02", "one-byte"),
    ("01", "one-byte-0x01"),
    ("0317", "length-larger-than-datagram"),
    ("ff0c00000100", "length-255-on-6-bytes"),
    ("021700", "length-smaller-than-datagram"),
    ("0017", "length-zero"),
    ("0100", "long-length-truncated-2"),
    ("010004", "long-length-truncated-3"),
    ("0100061700", "long-length-larger"),
    ("01000417ff", "long-length-smaller"),
    ("01000017", "long-length-zero"),
    ("0203", "reserved-0x03"),
    ("0211", "reserved-0x11"),
    ("0219", "reserved-0x19"),
    ("021e", "reserved-0x1e"),
    ("0220", "reserved-0x20"),
    ("02fd", "reserved-0xfd"),
    ("02ff", "reserved-0xff"),
    ("0303ff", "reserved-0x03-with-body"),
    ("04000100", "advertise-2"),
    ("0600010384ff", "advertise-4"),
    ("0201", "searchgw-empty"),
    ("04010102", "searchgw-2"),
    ("0202", "gwinfo-empty"),
    ("0204", "connect-empty"),
    ("06040401000a", "connect-without-client-id"),
    ("050404010a", "connect-3"),
    ("0205", "connack-empty"),
    ("04050000", "connack-2"),
    ("030600", "willtopicreq-with-body"),
    ("030800", "willmsgreq-with-body"),
    ("050a000000", "register-3"),
    ("020a", "register-empty"),
    ("060b00010002", "regack-4"),
    ("080b000100020000", "regack-6"),
    ("020c", "publish-empty"),
    ("060c00000100", "publish-4"),
    ("060d00010002", "puback-4"),
    ("080d000100020000", "puback-6"),
    ("030e00", "pubcomp-1"),
    ("050e000100", "pubcomp-3"),
    ("030f00", "pubrec-1"),
    ("050f000100", "pubrec-3"),
    ("031000", "pubrel-1"),
    ("05100001ff", "pubrel-3"),
    ("031500", "unsuback-1"),
    ("0515000100", "unsuback-3"),
    ("04120000", "subscribe-2"),
    ("061201000107", "subscribe-predefined-1-byte-id"),
    ("0812010001000700", "subscribe-predefined-3-byte-id"),
    ("0512010001", "subscribe-predefined-no-id"),
    ("061202000161", "subscribe-short-1-byte"),
    ("0812020001616263", "subscribe-short-3-bytes"),
    ("07132000010002", "suback-5"),
    ("091320000100020000", "suback-7"),
    ("061401000107", "unsubscribe-predefined-1-byte-id"),
    ("0814020001616263", "unsubscribe-short-3-bytes"),
    ("031700", "pingresp-with-body"),
    ("031800", "disconnect-1"),
    ("0518000100", "disconnect-3"),
    ("021b", "willtopicresp-empty"),
    ("041b0000", "willtopicresp-2"),
    ("021d", "willmsgresp-empty"),
    ("041d0000", "willmsgresp-2"),
    ("07040401000aff", "connect-client-id-invalid-utf8"),
    ("09040401000aeda080", "connect-client-id-surrogate"),
    ("0816ffc0c1c2f5f8", "pingreq-client-id-invalid-utf8"),
    ("070a00000001c3", "register-topic-truncated-utf8"),
    ("0612200001ff", "subscribe-topic-invalid-utf8"),
    ("0712020001fffe", "subscribe-short-topic-invalid-utf8"),
    ("0714000001c0af", "unsubscribe-topic-overlong-utf8"),
    ("040700ff", "willtopic-invalid-utf8"),
    ("051a20e282", "willtopicupd-truncated-utf8"),
    ("04076077", "willtopic-qos-1"),
    ("041a7077", "willtopicupd-qos-1-retain"),
    ("02fe", "encapsulation-length-2"),
    ("03fe00", "encapsulation-without-message"),
    ("05fe000007", "encapsulation-node-without-message"),
    ("09fe0000070217", "encapsulation-length-beyond-datagram"),
    ("03fe0001", "encapsulation-inner-1-byte"),
    ("05fe0000070317", "encapsulation-inner-bad-length"),
    ("03fe000203", "encapsulation-inner-reserved-type"),
    ("03fe000205", "encapsulation-inner-connack-empty"),
    ("03fe0007040401000aff", "encapsulation-inner-invalid-utf8"),
    ("03fe0003fe000217", "encapsulation-nested"),
    ("010006fe00070217", "encapsulation-long-length-form"),
]


def test_malformed_corpus_ids_are_unique() -> None:
    assert len({name for _, name in MALFORMED_CORPUS}) == len(MALFORMED_CORPUS)


@pytest.mark.parametrize("wire", [c[0] for c in MALFORMED_CORPUS], ids=[c[1] for c in MALFORMED_CORPUS])
def test_malformed_corpus(wire: str) -> None:
    _assert_malformed(bytes.fromhex(wire))


def test_deeply_nested_encapsulation_is_malformed_not_a_recursion_error() -> None:
    _assert_malformed(bytes.fromhex("03fe00") * 2000 + bytes.fromhex("0217"))


def test_encapsulation_with_a_node_id_too_long_to_answer_is_malformed() -> None:
    node_id = b"\x07" * 260
    wire = b"\x01" + (len(node_id) + 5).to_bytes(2, "big") + b"\xfe\x00" + node_id + bytes.fromhex("0217")
    _assert_malformed(wire)


# --- 4. properties

_u8 = st.integers(0, 0xFF)
_u16 = st.integers(0, 0xFFFF)
_qos = st.sampled_from([-1, 0, 1, 2])
_will_qos = st.sampled_from([0, 1, 2])
_text = st.text(max_size=40)
_client_id = st.text(min_size=1, max_size=23)
_short_name = st.text(min_size=1, max_size=2).filter(lambda s: len(s.encode()) == 2)
_data = st.binary(max_size=300)


@st.composite
def _subscription(draw: st.DrawFn, cls: type[Subscribe] | type[Unsubscribe]) -> Subscribe | Unsubscribe:
    kind = draw(st.sampled_from([NORMAL, PREDEFINED, SHORT, RESERVED]))
    msg_id = draw(_u16)
    if kind == PREDEFINED:
        name, topic_id = "", draw(_u16)
    elif kind == SHORT:
        name = draw(_short_name)
        topic_id = short_topic_id(name)
    else:
        name, topic_id = draw(_text), 0
    if cls is Subscribe:
        return Subscribe(msg_id, kind, name, topic_id, draw(_qos), draw(st.booleans()))
    return Unsubscribe(msg_id, kind, name, topic_id)


PLAIN_MESSAGES: dict[type, st.SearchStrategy[Message]] = {
    Advertise: st.builds(Advertise, _u8, _u16),
    SearchGw: st.builds(SearchGw, _u8),
    GwInfo: st.builds(GwInfo, _u8, st.binary(max_size=16)),
    Connect: st.builds(Connect, _client_id, _u16, st.booleans(), st.booleans(), _u8),
    Connack: st.builds(Connack, _u8),
    WillTopicReq: st.just(WillTopicReq()),
    WillTopic: st.builds(WillTopic, st.none() | _text, _will_qos, st.booleans()).map(
        lambda m: m if m.topic is not None else WillTopic(None)
    ),
    WillMsgReq: st.just(WillMsgReq()),
    WillMsg: st.builds(WillMsg, _data),
    Register: st.builds(Register, _u16, _u16, _text),
    Regack: st.builds(Regack, _u16, _u16, _u8),
    Publish: st.builds(
        Publish, _u16, _data, _qos, _u16, st.sampled_from([0, 1, 2, 3]), st.booleans(), st.booleans()
    ),
    Puback: st.builds(Puback, _u16, _u16, _u8),
    Pubrec: st.builds(Pubrec, _u16),
    Pubrel: st.builds(Pubrel, _u16),
    Pubcomp: st.builds(Pubcomp, _u16),
    Subscribe: _subscription(Subscribe),
    Suback: st.builds(Suback, _u16, _u16, _u8, _qos),
    Unsubscribe: _subscription(Unsubscribe),
    Unsuback: st.builds(Unsuback, _u16),
    Pingreq: st.builds(Pingreq, st.none() | _client_id),
    Pingresp: st.just(Pingresp()),
    Disconnect: st.builds(Disconnect, st.none() | _u16),
    WillTopicUpd: st.builds(WillTopicUpd, st.none() | _text, _will_qos, st.booleans()).map(
        lambda m: m if m.topic is not None else WillTopicUpd(None)
    ),
    WillTopicResp: st.builds(WillTopicResp, _u8),
    WillMsgUpd: st.builds(WillMsgUpd, _data),
    WillMsgResp: st.builds(WillMsgResp, _u8),
}
_plain = st.one_of(*PLAIN_MESSAGES.values())
MESSAGES = _plain | st.builds(Encapsulated, st.binary(min_size=1, max_size=8), _plain, st.integers(0, 3))


def test_strategies_cover_every_message_type() -> None:
    assert set(PLAIN_MESSAGES) | {Encapsulated} == ALL_TYPES


@HYPOTHESIS
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_malformed(data: bytes) -> None:
    _decodes_cleanly(data)


@HYPOTHESIS
@given(st.sampled_from(sorted(MsgType)) | _u8, st.binary(max_size=300), st.booleans())
def test_random_bodies_with_a_right_length_only_raise_malformed(
    msg_type: int, body: bytes, long: bool
) -> None:
    size = len(body) + 2
    if long or size > 0xFF:
        datagram = b"\x01" + (size + 2).to_bytes(2, "big") + bytes((msg_type,)) + body
    else:
        datagram = bytes((size, msg_type)) + body
    _decodes_cleanly(datagram)


@HYPOTHESIS
@given(MESSAGES)
def test_every_valid_message_round_trips(message: Message) -> None:
    wire = encode(message)
    assert decode(wire) == message
    assert encode(decode(wire)) == wire
    if isinstance(message, Publish):
        m = message
        assert encode_publish(m.topic_id, m.data, m.qos, m.msg_id, m.topic_id_type, m.retain, m.dup) == wire


@HYPOTHESIS
@given(MESSAGES)
def test_every_valid_message_matches_scapy(message: Message) -> None:
    wire = bytes(_to_scapy(message))
    assert encode(message).hex() == wire.hex()
    assert decode(wire) == message


@HYPOTHESIS
@given(MESSAGES, st.integers(0, 0xFFFF), st.integers(1, 0xFF))
def test_mutated_datagrams_only_raise_malformed(message: Message, position: int, delta: int) -> None:
    wire = bytearray(encode(message))
    index = position % len(wire)
    wire[index] = (wire[index] + delta) & 0xFF
    _decodes_cleanly(bytes(wire))


@HYPOTHESIS
@given(MESSAGES, st.integers(0, 0xFFFF))
def test_truncated_datagrams_only_raise_malformed(message: Message, position: int) -> None:
    wire = encode(message)
    _decodes_cleanly(wire[: position % len(wire)])
