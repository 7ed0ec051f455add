"""MQTT-SN 1.2 numbers: message types, return codes and flags (MQTT-SN 1.2 §5.2-§5.3). The timers of §6.13 and
§7.2 are configuration (:class:`core.config.MqttSnConfig`)."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["MAX_CLIENT_ID", "PROTOCOL_ID", "MsgType", "ReturnCode", "TopicIdType"]

PROTOCOL_ID = 0x01
MAX_CLIENT_ID = 23


class MsgType(IntEnum):
    """MsgType field (§5.2.2)."""

    ADVERTISE = 0x00
    SEARCHGW = 0x01
    GWINFO = 0x02
    CONNECT = 0x04
    CONNACK = 0x05
    WILLTOPICREQ = 0x06
    WILLTOPIC = 0x07
    WILLMSGREQ = 0x08
    WILLMSG = 0x09
    REGISTER = 0x0A
    REGACK = 0x0B
    PUBLISH = 0x0C
    PUBACK = 0x0D
    PUBCOMP = 0x0E
    PUBREC = 0x0F
    PUBREL = 0x10
    SUBSCRIBE = 0x12
    SUBACK = 0x13
    UNSUBSCRIBE = 0x14
    UNSUBACK = 0x15
    PINGREQ = 0x16
    PINGRESP = 0x17
    DISCONNECT = 0x18
    WILLTOPICUPD = 0x1A
    WILLTOPICRESP = 0x1B
    WILLMSGUPD = 0x1C
    WILLMSGRESP = 0x1D
    ENCAPSULATED = 0xFE


class ReturnCode(IntEnum):
    """ReturnCode field (§5.3.10)."""

    ACCEPTED = 0x00
    CONGESTION = 0x01
    INVALID_TOPIC_ID = 0x02
    NOT_SUPPORTED = 0x03


class TopicIdType(IntEnum):
    """TopicIdType flag bits 1-0 (§5.3.4)."""

    NORMAL = 0b00
    PREDEFINED = 0b01
    SHORT = 0b10
    RESERVED = 0b11
