"""MQTT-SN 1.2 codec: one datagram to one message and back (MQTT-SN 1.2 §5), forwarder encapsulation (§5.5).

Hand-written ``struct`` code: it reads untrusted radio input at high rates.

Malformed-input policy: :func:`decode` raises :class:`MalformedPacket` (code 0x03, "not supported") for a
datagram whose Length field disagrees with its size, a reserved message type, a truncated or over-long body,
invalid UTF-8, or a forwarder encapsulation with a 3-octet Length (§5.5 gives it one octet) or a nested one
(which would recurse without bound). The gateway drops such a datagram, counts it, and logs it once per peer;
a datagram carries one message, so nothing else is lost. Semantic checks (client id length, reserved topic
ids, states) belong to the channel, which answers them with return codes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from core.errors import MalformedPacket
from gateways.mqttsn.numbers import PROTOCOL_ID, MsgType, ReturnCode, TopicIdType

__all__ = [
    "Advertise",
    "Connack",
    "Connect",
    "Disconnect",
    "Encapsulated",
    "GwInfo",
    "Message",
    "Pingreq",
    "Pingresp",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "Regack",
    "Register",
    "SearchGw",
    "Suback",
    "Subscribe",
    "Unsuback",
    "Unsubscribe",
    "WillMsg",
    "WillMsgReq",
    "WillMsgResp",
    "WillMsgUpd",
    "WillTopic",
    "WillTopicReq",
    "WillTopicResp",
    "WillTopicUpd",
    "decode",
    "encode",
    "encode_publish",
    "short_topic_id",
    "short_topic_name",
]

_BAD = ReturnCode.NOT_SUPPORTED
_H = struct.Struct(">H")
_HH = struct.Struct(">HH")
_BHH = struct.Struct(">BHH")
_HHB = struct.Struct(">HHB")
_BHHB = struct.Struct(">BHHB")


# Messages are slotted and not frozen (construction cost on the hot path); treat them as immutable.


@dataclass(slots=True)
class Advertise:
    """ADVERTISE (§5.4.1): gateway id and seconds until the next one."""

    gw_id: int
    duration: int


@dataclass(slots=True)
class SearchGw:
    """SEARCHGW (§5.4.2)."""

    radius: int = 0


@dataclass(slots=True)
class GwInfo:
    """GWINFO (§5.4.3); ``gw_addr`` only when a client answers for a gateway."""

    gw_id: int
    gw_addr: bytes = b""


@dataclass(slots=True)
class Connect:
    """CONNECT (§5.4.4); ``duration`` is the keep-alive in seconds."""

    client_id: str
    duration: int = 0
    clean_session: bool = True
    will: bool = False
    protocol_id: int = PROTOCOL_ID


@dataclass(slots=True)
class Connack:
    """CONNACK (§5.4.5)."""

    return_code: int = 0


@dataclass(slots=True)
class WillTopicReq:
    """WILLTOPICREQ (§5.4.6)."""


@dataclass(slots=True)
class WillTopic:
    """WILLTOPIC (§5.4.7); ``topic`` None is the empty form that means no will (§6.3)."""

    topic: str | None
    qos: int = 0
    retain: bool = False


@dataclass(slots=True)
class WillMsgReq:
    """WILLMSGREQ (§5.4.8)."""


@dataclass(slots=True)
class WillMsg:
    """WILLMSG (§5.4.9)."""

    message: bytes


@dataclass(slots=True)
class Register:
    """REGISTER (§5.4.10); a client sends topic id 0."""

    topic_id: int
    msg_id: int
    topic_name: str


@dataclass(slots=True)
class Regack:
    """REGACK (§5.4.11)."""

    topic_id: int
    msg_id: int
    return_code: int = 0


@dataclass(slots=True)
class Publish:
    """PUBLISH (§5.4.12). ``qos`` -1 is the connectionless QoS of §6.8 (flag value 0b11)."""

    topic_id: int
    data: bytes
    qos: int = 0
    msg_id: int = 0
    topic_id_type: int = TopicIdType.NORMAL
    retain: bool = False
    dup: bool = False


@dataclass(slots=True)
class Puback:
    """PUBACK (§5.4.13), also used to reject a PUBLISH of any QoS."""

    topic_id: int
    msg_id: int
    return_code: int = 0


@dataclass(slots=True)
class Pubrec:
    """PUBREC (§5.4.14)."""

    msg_id: int


@dataclass(slots=True)
class Pubrel:
    """PUBREL (§5.4.14)."""

    msg_id: int


@dataclass(slots=True)
class Pubcomp:
    """PUBCOMP (§5.4.14)."""

    msg_id: int


@dataclass(slots=True)
class Subscribe:
    """SUBSCRIBE (§5.4.15): ``topic_name`` for types NORMAL and SHORT, ``topic_id`` for PREDEFINED."""

    msg_id: int
    topic_id_type: int = TopicIdType.NORMAL
    topic_name: str = ""
    topic_id: int = 0
    qos: int = 0
    dup: bool = False


@dataclass(slots=True)
class Suback:
    """SUBACK (§5.4.16); topic id 0 for wildcard filters (§6.9)."""

    topic_id: int
    msg_id: int
    return_code: int = 0
    qos: int = 0


@dataclass(slots=True)
class Unsubscribe:
    """UNSUBSCRIBE (§5.4.17), with the topic as in SUBSCRIBE."""

    msg_id: int
    topic_id_type: int = TopicIdType.NORMAL
    topic_name: str = ""
    topic_id: int = 0


@dataclass(slots=True)
class Unsuback:
    """UNSUBACK (§5.4.18)."""

    msg_id: int


@dataclass(slots=True)
class Pingreq:
    """PINGREQ (§5.4.19); a sleeping client names itself to wake up."""

    client_id: str | None = None


@dataclass(slots=True)
class Pingresp:
    """PINGRESP (§5.4.20)."""


@dataclass(slots=True)
class Disconnect:
    """DISCONNECT (§5.4.21); a duration asks to sleep that many seconds."""

    duration: int | None = None


@dataclass(slots=True)
class WillTopicUpd:
    """WILLTOPICUPD (§5.4.22); ``topic`` None (the empty form) deletes the will."""

    topic: str | None
    qos: int = 0
    retain: bool = False


@dataclass(slots=True)
class WillTopicResp:
    """WILLTOPICRESP (§5.4.23)."""

    return_code: int = 0


@dataclass(slots=True)
class WillMsgUpd:
    """WILLMSGUPD (§5.4.24)."""

    message: bytes


@dataclass(slots=True)
class WillMsgResp:
    """WILLMSGRESP (§5.4.25)."""

    return_code: int = 0


@dataclass(slots=True)
class Encapsulated:
    """A message relayed by a forwarder (§5.5): its radius, the wireless node id and the inner message."""

    node_id: bytes
    message: Message
    radius: int = 0


Message: TypeAlias = (
    Advertise
    | SearchGw
    | GwInfo
    | Connect
    | Connack
    | WillTopicReq
    | WillTopic
    | WillMsgReq
    | WillMsg
    | Register
    | Regack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | WillTopicUpd
    | WillTopicResp
    | WillMsgUpd
    | WillMsgResp
    | Encapsulated
)


def short_topic_name(topic_id: int) -> str:
    """The two-character topic name a SHORT topic id stands for (§3 "short topic name")."""
    try:
        return topic_id.to_bytes(2, "big").decode()
    except UnicodeDecodeError:
        raise MalformedPacket("short topic name is not UTF-8", ReturnCode.INVALID_TOPIC_ID) from None


def short_topic_id(name: str) -> int:
    """The topic id field carrying a two-byte short topic name."""
    raw = name.encode()
    if len(raw) != 2:
        raise ValueError("a short topic name is two bytes")
    return (raw[0] << 8) | raw[1]


# --- decoding


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not UTF-8", _BAD) from None


def _qos(flags: int) -> int:
    qos = (flags >> 5) & 0x03
    return -1 if qos == 3 else qos


def _need(body: bytes, size: int, name: str) -> None:
    if len(body) != size:
        raise MalformedPacket(f"{name} body of {len(body)} bytes, expected {size}", _BAD)


def _at_least(body: bytes, size: int, name: str) -> None:
    if len(body) < size:
        raise MalformedPacket(f"{name} body of {len(body)} bytes, expected at least {size}", _BAD)


def _split(data: bytes) -> tuple[int, int, int]:
    """Length, header size and message type of the datagram (§5.2)."""
    size = len(data)
    if size < 2:
        raise MalformedPacket("datagram shorter than a header", _BAD)
    if data[0] == 0x01:
        if size < 4:
            raise MalformedPacket("truncated 3-byte length", _BAD)
        return (data[1] << 8) | data[2], 3, data[3]
    return data[0], 1, data[1]


def decode(data: bytes) -> Message:
    """Decode one datagram; raises :class:`MalformedPacket` (see the module's policy)."""
    length, header, msg_type = _split(data)
    if msg_type == MsgType.ENCAPSULATED:
        if header != 1 or length < 3 or length > len(data):
            raise MalformedPacket("bad encapsulation length", _BAD)
        inner = data[length:]
        if not inner:
            raise MalformedPacket("encapsulation without a message", _BAD)
        if _split(inner)[2] == MsgType.ENCAPSULATED:
            raise MalformedPacket("nested encapsulation", _BAD)
        return Encapsulated(data[header + 2 : length], decode(inner), data[header + 1] & 0x03)
    if length != len(data):
        raise MalformedPacket(f"Length field {length} but datagram of {len(data)} bytes", _BAD)
    body = data[header + 1 :]
    if msg_type == MsgType.PUBLISH:
        _at_least(body, 5, "PUBLISH")
        flags, topic_id, msg_id = _BHH.unpack_from(body)
        return Publish(
            topic_id, body[5:], _qos(flags), msg_id, flags & 0x03, bool(flags & 0x10), bool(flags & 0x80)
        )
    decoder = _DECODERS.get(msg_type)
    if decoder is None:
        raise MalformedPacket(f"reserved message type 0x{msg_type:02x}", _BAD)
    return decoder(body)


def _decode_connect(body: bytes) -> Connect:
    _at_least(body, 5, "CONNECT")
    flags, protocol_id, duration = body[0], body[1], _H.unpack_from(body, 2)[0]
    return Connect(
        _text(body[4:], "client id"), duration, bool(flags & 0x04), bool(flags & 0x08), protocol_id
    )


def _decode_will_topic(body: bytes, cls: type[WillTopic] | type[WillTopicUpd]) -> WillTopic | WillTopicUpd:
    if not body:
        return cls(None)
    _at_least(body, 1, "WILLTOPIC")
    flags = body[0]
    qos = _qos(flags)
    if qos < 0:
        raise MalformedPacket("will QoS -1", _BAD)
    return cls(_text(body[1:], "will topic"), qos, bool(flags & 0x10))


def _decode_register(body: bytes) -> Register:
    _at_least(body, 4, "REGISTER")
    topic_id, msg_id = _HH.unpack_from(body)
    return Register(topic_id, msg_id, _text(body[4:], "topic name"))


def _decode_subscription(body: bytes, name: str) -> tuple[int, int, int, str, int]:
    _at_least(body, 3, name)
    flags, msg_id = body[0], _H.unpack_from(body, 1)[0]
    kind = flags & 0x03
    rest = body[3:]
    if kind == TopicIdType.PREDEFINED:
        _need(rest, 2, f"{name} topic id")
        return flags, msg_id, kind, "", _H.unpack_from(rest)[0]
    if kind == TopicIdType.SHORT:
        _need(rest, 2, f"{name} short topic")
        return flags, msg_id, kind, _text(rest, "short topic name"), _H.unpack_from(rest)[0]
    return flags, msg_id, kind, _text(rest, "topic name"), 0


def _decode_subscribe(body: bytes) -> Subscribe:
    flags, msg_id, kind, name, topic_id = _decode_subscription(body, "SUBSCRIBE")
    return Subscribe(msg_id, kind, name, topic_id, _qos(flags), bool(flags & 0x80))


def _decode_unsubscribe(body: bytes) -> Unsubscribe:
    _, msg_id, kind, name, topic_id = _decode_subscription(body, "UNSUBSCRIBE")
    return Unsubscribe(msg_id, kind, name, topic_id)


def _msg_id(body: bytes, name: str) -> int:
    _need(body, 2, name)
    value: int = _H.unpack_from(body)[0]
    return value


def _decode_disconnect(body: bytes) -> Disconnect:
    if not body:
        return Disconnect(None)
    _need(body, 2, "DISCONNECT")
    return Disconnect(_H.unpack_from(body)[0])


def _decode_advertise(body: bytes) -> Advertise:
    _need(body, 3, "ADVERTISE")
    return Advertise(body[0], _H.unpack_from(body, 1)[0])


def _decode_gwinfo(body: bytes) -> GwInfo:
    _at_least(body, 1, "GWINFO")
    return GwInfo(body[0], body[1:])


def _empty(cls: Callable[[], Message], name: str) -> Callable[[bytes], Message]:
    def decoder(body: bytes) -> Message:
        _need(body, 0, name)
        return cls()

    return decoder


def _code(cls: Callable[[int], Message], name: str) -> Callable[[bytes], Message]:
    def decoder(body: bytes) -> Message:
        _need(body, 1, name)
        return cls(body[0])

    return decoder


def _decode_regack(body: bytes) -> Regack:
    _need(body, 5, "REGACK")
    return Regack(*_HHB.unpack(body))


def _decode_puback(body: bytes) -> Puback:
    _need(body, 5, "PUBACK")
    return Puback(*_HHB.unpack(body))


def _decode_suback(body: bytes) -> Suback:
    _need(body, 6, "SUBACK")
    flags, topic_id, msg_id, code = _BHHB.unpack(body)
    return Suback(topic_id, msg_id, code, _qos(flags))


def _decode_searchgw(body: bytes) -> SearchGw:
    _need(body, 1, "SEARCHGW")
    return SearchGw(body[0])


def _decode_pingreq(body: bytes) -> Pingreq:
    return Pingreq(_text(body, "client id") if body else None)


_DECODERS: dict[int, Callable[[bytes], Message]] = {
    MsgType.ADVERTISE: _decode_advertise,
    MsgType.SEARCHGW: _decode_searchgw,
    MsgType.GWINFO: _decode_gwinfo,
    MsgType.CONNECT: _decode_connect,
    MsgType.CONNACK: _code(Connack, "CONNACK"),
    MsgType.WILLTOPICREQ: _empty(WillTopicReq, "WILLTOPICREQ"),
    MsgType.WILLTOPIC: lambda body: _decode_will_topic(body, WillTopic),
    MsgType.WILLMSGREQ: _empty(WillMsgReq, "WILLMSGREQ"),
    MsgType.WILLMSG: lambda body: WillMsg(body),
    MsgType.REGISTER: _decode_register,
    MsgType.REGACK: _decode_regack,
    MsgType.PUBACK: _decode_puback,
    MsgType.PUBREC: lambda body: Pubrec(_msg_id(body, "PUBREC")),
    MsgType.PUBREL: lambda body: Pubrel(_msg_id(body, "PUBREL")),
    MsgType.PUBCOMP: lambda body: Pubcomp(_msg_id(body, "PUBCOMP")),
    MsgType.SUBSCRIBE: _decode_subscribe,
    MsgType.SUBACK: _decode_suback,
    MsgType.UNSUBSCRIBE: _decode_unsubscribe,
    MsgType.UNSUBACK: lambda body: Unsuback(_msg_id(body, "UNSUBACK")),
    MsgType.PINGREQ: _decode_pingreq,
    MsgType.PINGRESP: _empty(Pingresp, "PINGRESP"),
    MsgType.DISCONNECT: _decode_disconnect,
    MsgType.WILLTOPICUPD: lambda body: _decode_will_topic(body, WillTopicUpd),
    MsgType.WILLTOPICRESP: _code(WillTopicResp, "WILLTOPICRESP"),
    MsgType.WILLMSGUPD: lambda body: WillMsgUpd(body),
    MsgType.WILLMSGRESP: _code(WillMsgResp, "WILLMSGRESP"),
}


# --- encoding


def _frame(msg_type: int, body: bytes) -> bytes:
    """Header with the short length form under 256 bytes, else 0x01 + 2 bytes (§5.2.1)."""
    size = len(body) + 2
    if size < 256:
        return bytes((size, msg_type)) + body
    size += 2
    if size > 0xFFFF:
        raise ValueError("MQTT-SN message longer than 65535 bytes")
    return bytes((0x01, size >> 8, size & 0xFF, msg_type)) + body


def _flags(qos: int = 0, retain: bool = False, dup: bool = False, kind: int = 0) -> int:
    return (dup << 7) | ((3 if qos < 0 else qos) << 5) | (retain << 4) | kind


def encode_publish(
    topic_id: int, data: bytes, qos: int, msg_id: int, topic_id_type: int, retain: bool, dup: bool
) -> bytes:
    """PUBLISH without building a message object (the delivery hot path)."""
    return _frame(
        MsgType.PUBLISH, _BHH.pack(_flags(qos, retain, dup, topic_id_type), topic_id, msg_id) + data
    )


_TYPE_OF: dict[type, int] = {
    Pubrec: MsgType.PUBREC,
    Pubrel: MsgType.PUBREL,
    Pubcomp: MsgType.PUBCOMP,
    Unsuback: MsgType.UNSUBACK,
    Connack: MsgType.CONNACK,
    WillTopicResp: MsgType.WILLTOPICRESP,
    WillMsgResp: MsgType.WILLMSGRESP,
    WillTopicReq: MsgType.WILLTOPICREQ,
    WillMsgReq: MsgType.WILLMSGREQ,
    Pingresp: MsgType.PINGRESP,
}


def _encode_body(m: Message) -> tuple[int, bytes]:
    if isinstance(m, Puback):
        return MsgType.PUBACK, _HHB.pack(m.topic_id, m.msg_id, m.return_code)
    if isinstance(m, Pubrec | Pubrel | Pubcomp | Unsuback):
        return _TYPE_OF[type(m)], _H.pack(m.msg_id)
    if isinstance(m, Register):
        return MsgType.REGISTER, _HH.pack(m.topic_id, m.msg_id) + m.topic_name.encode()
    if isinstance(m, Regack):
        return MsgType.REGACK, _HHB.pack(m.topic_id, m.msg_id, m.return_code)
    if isinstance(m, Connect):
        flags = _flags() | (m.will << 3) | (m.clean_session << 2)
        return MsgType.CONNECT, bytes((flags, m.protocol_id)) + _H.pack(m.duration) + m.client_id.encode()
    if isinstance(m, Subscribe | Unsubscribe):
        if isinstance(m, Subscribe):
            msg_type, flags = MsgType.SUBSCRIBE, _flags(m.qos, False, m.dup, m.topic_id_type)
        else:
            msg_type, flags = MsgType.UNSUBSCRIBE, m.topic_id_type
        topic = _H.pack(m.topic_id) if m.topic_id_type == TopicIdType.PREDEFINED else m.topic_name.encode()
        return msg_type, bytes((flags,)) + _H.pack(m.msg_id) + topic
    if isinstance(m, Suback):
        return MsgType.SUBACK, _BHHB.pack(_flags(m.qos), m.topic_id, m.msg_id, m.return_code)
    if isinstance(m, WillTopic | WillTopicUpd):
        msg_type = MsgType.WILLTOPIC if isinstance(m, WillTopic) else MsgType.WILLTOPICUPD
        if m.topic is None:
            return msg_type, b""
        return msg_type, bytes((_flags(m.qos, m.retain),)) + m.topic.encode()
    if isinstance(m, WillMsg | WillMsgUpd):
        return (MsgType.WILLMSG if isinstance(m, WillMsg) else MsgType.WILLMSGUPD), m.message
    if isinstance(m, Connack | WillTopicResp | WillMsgResp):
        return _TYPE_OF[type(m)], bytes((m.return_code,))
    if isinstance(m, Pingreq):
        return MsgType.PINGREQ, m.client_id.encode() if m.client_id else b""
    if isinstance(m, Disconnect):
        return MsgType.DISCONNECT, b"" if m.duration is None else _H.pack(m.duration)
    if isinstance(m, Advertise):
        return MsgType.ADVERTISE, bytes((m.gw_id,)) + _H.pack(m.duration)
    if isinstance(m, SearchGw):
        return MsgType.SEARCHGW, bytes((m.radius,))
    if isinstance(m, GwInfo):
        return MsgType.GWINFO, bytes((m.gw_id,)) + m.gw_addr
    if isinstance(m, WillTopicReq | WillMsgReq | Pingresp):
        return _TYPE_OF[type(m)], b""
    raise TypeError(f"not an MQTT-SN message: {m!r}")


def encode(message: Message) -> bytes:
    """Encode one message as a datagram."""
    if isinstance(message, Publish):
        m = message
        return encode_publish(m.topic_id, m.data, m.qos, m.msg_id, m.topic_id_type, m.retain, m.dup)
    if isinstance(message, Encapsulated):
        header = bytes((len(message.node_id) + 3, MsgType.ENCAPSULATED, message.radius & 0x03))
        return header + message.node_id + encode(message.message)
    msg_type, body = _encode_body(message)
    return _frame(msg_type, body)
