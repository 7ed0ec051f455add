"""Tests for hardware.framing: round trips, XBee documentation vectors, bad input, and hypothesis properties.

Wire bytes are built here by independent per-octet helpers that restate the specs (MQTT-SN 1.2 §5.2.1 and
§5.5, RFC 1055, the Digi XBee API frame format), not by the framers' own encoders. XBee vectors are the
examples printed in Digi's XBee user guides (Zigbee Transmit Request and Receive Packet, 802.15.4 64-bit
Receive Packet, Modem Status, Transmit Status), written there in API mode 1.

What the garbage properties guarantee, per framing (garbage is inserted only between complete frames):

- ``length``: no checksum and no delimiter, so only garbage that no header can start with, whatever follows
  it, is guaranteed to be skipped: 0x00 always, and with ``max_frame`` = 64 also 0x01 and 0x41-0xFF. With
  such garbage the output is exactly the valid frames.
- ``slip``: any garbage. Every valid frame is delivered, in order; extra frames come only from garbage
  (whatever it holds between two ENDs that is itself valid SLIP). The output always equals a per-octet
  RFC 1055 reference decoder's.
- ``xbee1``: garbage without 0x7E. The output is exactly the valid frames. (Garbage holding 0x7E can start a
  bogus frame, which costs the valid frames it spans only if its 8-bit checksum matches by chance.)
- ``xbee2``: any garbage. Every valid frame is delivered, in order; extras come only from complete,
  checksum-valid receive frames inside the garbage. The output always equals a per-octet reference decoder's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeAlias

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateways.mqttsn import codec
from gateways.mqttsn.numbers import MsgType
from hardware.framing import FRAMINGS, LengthFramer, SlipFramer, XBeeFramer, make_framer
from hardware.framing.xbee import (
    BROADCAST64,
    MAX_OVERHEAD,
    api_frame,
    build_receive_packet,
    build_transmit_request,
    checksum,
)

HYPOTHESIS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

AnyFramer: TypeAlias = LengthFramer | SlipFramer | XBeeFramer
Frame: TypeAlias = tuple[bytes | None, bytes]

END, ESC, ESC_END, ESC_ESC = 0xC0, 0xDB, 0xDC, 0xDD
START, ESCAPE = 0x7E, 0x7D
XBEE_SPECIAL = (0x7E, 0x7D, 0x11, 0x13)
NODE = bytes.fromhex("0013A20040A1B2C3")
PINGREQ = b"\x02\x16"


# --- independent wire builders


def _sn(msg_type: int, body: bytes, long: bool = False) -> bytes:
    """An MQTT-SN message with the one-octet Length, or the three-octet one if ``long`` or needed (§5.2.1)."""
    size = len(body) + 2
    if long or size > 0xFF:
        return bytes((0x01, (size + 2) >> 8, (size + 2) & 0xFF, msg_type)) + body
    return bytes((size, msg_type)) + body


def _encapsulated(node_id: bytes, message: bytes, ctrl: int = 0) -> bytes:
    """A forwarder encapsulation (§5.5): its Length covers Length, MsgType, Ctrl and the node id only."""
    return bytes((3 + len(node_id), 0xFE, ctrl)) + node_id + message


def _slip(frame: bytes) -> bytes:
    """RFC 1055 send_packet, octet by octet: END, the escaped frame, END."""
    out = bytearray((END,))
    for octet in frame:
        if octet == END:
            out += bytes((ESC, ESC_END))
        elif octet == ESC:
            out += bytes((ESC, ESC_ESC))
        else:
            out.append(octet)
    out.append(END)
    return bytes(out)


def _xbee(frame_data: bytes, escaped: bool) -> bytes:
    """An XBee API frame, octet by octet: 0x7E, Length, frame data, checksum; mode 2 escapes after 0x7E."""
    body = len(frame_data).to_bytes(2, "big") + frame_data + bytes(((0xFF - sum(frame_data)) & 0xFF,))
    out = bytearray((START,))
    for octet in body:
        if escaped and octet in XBEE_SPECIAL:
            out += bytes((ESCAPE, octet ^ 0x20))
        else:
            out.append(octet)
    return bytes(out)


def _rx90(source64: bytes, data: bytes, source16: int = 0xFFFE, options: int = 0x01) -> bytes:
    """Frame data of a Receive Packet 0x90: type, 64-bit source, 16-bit source, options, RF data."""
    return b"\x90" + source64 + source16.to_bytes(2, "big") + bytes((options,)) + data


def _rx80(source64: bytes, data: bytes, rssi: int = 0x28, options: int = 0x00) -> bytes:
    """Frame data of a 64-bit Receive Packet 0x80: type, 64-bit source, RSSI, options, RF data."""
    return b"\x80" + source64 + bytes((rssi, options)) + data


def _feed(framer: AnyFramer, stream: bytes, cuts: Iterable[int] = ()) -> list[Frame]:
    """Feed ``stream`` split at ``cuts``, checking the buffer bound after every chunk."""
    out: list[Frame] = []
    previous = 0
    for cut in [*sorted(c for c in cuts if 0 < c < len(stream)), len(stream)]:
        out += framer.feed(stream[previous:cut])
        previous = cut
        assert framer.buffered <= framer.buffer_limit
    return out


def _bytewise(framer: AnyFramer, stream: bytes) -> list[Frame]:
    return _feed(framer, stream, range(len(stream)))


def _framer(name: str, max_frame: int = 1024) -> AnyFramer:
    framer = make_framer(name, max_frame)
    assert isinstance(framer, LengthFramer | SlipFramer | XBeeFramer)
    return framer


# --- make_framer


def test_make_framer_builds_each_named_framing() -> None:
    assert FRAMINGS == ("length", "slip", "xbee1", "xbee2")
    assert isinstance(make_framer("length"), LengthFramer)
    assert isinstance(make_framer("slip"), SlipFramer)
    plain, escaped = make_framer("xbee1"), make_framer("xbee2")
    assert isinstance(plain, XBeeFramer)
    assert isinstance(escaped, XBeeFramer)
    frame_data = _rx90(bytes.fromhex("0013A20040111313"), b"\x11")
    assert plain.feed(_xbee(frame_data, escaped=False)) == [(bytes.fromhex("0013A20040111313"), b"\x11")]
    assert escaped.feed(_xbee(frame_data, escaped=True)) == [(bytes.fromhex("0013A20040111313"), b"\x11")]


@pytest.mark.parametrize(("name", "max_frame"), [("kiss", 1024), ("", 1024), ("length", 1), ("slip", 0)])
def test_make_framer_rejects_unknown_names_and_impossible_bounds(name: str, max_frame: int) -> None:
    with pytest.raises(ValueError):
        make_framer(name, max_frame)


# --- length: the raw MQTT-SN stream (MQTT-SN 1.2 §5.2.1)

LENGTH_FRAMES = [
    PINGREQ,
    _sn(MsgType.PUBLISH, b"\x00\x00\x01\x00\x00" + b"x" * 248),  # 255 octets: the longest short form
    _sn(MsgType.PUBLISH, b"\x00\x00\x01\x00\x00" + b"y" * 247, long=True),  # 256: the shortest long form
    _sn(MsgType.PUBLISH, b"\x20\x00\x01\x00\x07" + bytes(range(256)) * 3),
    _sn(MsgType.SEARCHGW, b"\x00"),
    _encapsulated(b"\x00\x07", _sn(MsgType.CONNECT, b"\x04\x01\x00\x3cnode7")),
    _encapsulated(b"\x01", _sn(MsgType.PUBLISH, b"\x00\x00\x01\x00\x00" + b"z" * 400)),
]


def test_length_delivers_both_length_forms_and_encapsulations_whole() -> None:
    stream = b"".join(LENGTH_FRAMES)
    assert [len(frame) for frame in LENGTH_FRAMES][1:3] == [255, 256]
    assert LENGTH_FRAMES[2][:3] == b"\x01\x01\x00"
    for frames in (_feed(LengthFramer(), stream), _bytewise(LengthFramer(), stream)):
        assert frames == [(None, frame) for frame in LENGTH_FRAMES]
    framer = LengthFramer()
    framer.feed(stream)
    assert framer.metrics.frames == len(LENGTH_FRAMES)
    assert framer.metrics.garbage_bytes == framer.metrics.resyncs == 0


def test_length_frames_are_what_the_mqttsn_codec_encodes_and_decodes() -> None:
    messages: list[codec.Message] = [
        codec.Publish(1, b"p" * size, 1, 7, 0, False, False) for size in (0, 10, 248, 249, 600)
    ]
    messages += [codec.Pingreq(None), codec.Encapsulated(b"\x09", codec.Pingreq(None), 0)]
    framer = LengthFramer()
    wire = b"".join(framer.encode(codec.encode(message)) for message in messages)
    assert [codec.decode(frame) for _, frame in _bytewise(framer, wire)] == messages


def test_length_encode_is_the_identity_on_a_self_delimiting_frame() -> None:
    framer = LengthFramer()
    for frame in LENGTH_FRAMES:
        assert framer.encode(frame) == frame
        assert framer.encode(frame, NODE) == framer.broadcast(frame) == frame


@pytest.mark.parametrize(
    "frame",
    [b"", b"\x02", b"\x03\x16", b"\x02\x16\x00", b"\x01\x00\x05\x16\x00", b"\x01\x00\x06\x0c\x00\x00"],
    ids=["empty", "one octet", "length too big", "length too small", "long form under 256", "long short"],
)
def test_length_encode_refuses_a_frame_that_would_desynchronise_the_peer(frame: bytes) -> None:
    with pytest.raises(ValueError):
        LengthFramer().encode(frame)


def test_length_skips_line_break_zeros_and_headers_with_a_reserved_msg_type() -> None:
    publish32 = _sn(MsgType.PUBLISH, b"\x00\x00\x01\x00\x00" + b"q" * 25)
    assert publish32[0] == 0x20  # not a MsgType: nothing before it can take it as one
    noise = (
        b"\x00\x00\x00"  # a line break reads as zero octets: Length 0
        + b"\x01\x00\xff\x1e"  # three-octet Length under 256
        + b"\x1e\x1f"  # 0x1E and 0x1F are reserved MsgTypes (§5.2.2)
    )
    framer = LengthFramer()
    frames = _bytewise(framer, PINGREQ + noise + publish32 + noise + publish32)
    assert frames == [(None, PINGREQ), (None, publish32), (None, publish32)]
    assert framer.metrics.garbage_bytes == 2 * len(noise)
    assert framer.metrics.resyncs == 2
    assert framer.metrics.oversize == 0


def test_length_counts_a_header_over_max_frame_and_skips_it() -> None:
    framer = LengthFramer(max_frame=64)
    oversize = _sn(MsgType.PUBLISH, b"\xee" * 78)  # 80 octets
    frames = _feed(framer, PINGREQ + oversize + PINGREQ, range(0, 100, 7))
    assert frames == [(None, PINGREQ), (None, PINGREQ)]
    assert framer.metrics.oversize == 2  # 0x50 PUBLISH, then the body's last 0xEE before PINGREQ's 0x02
    assert framer.metrics.garbage_bytes == len(oversize)
    assert framer.metrics.resyncs == 1


def test_length_oversize_long_form_is_skipped_and_the_stream_recovers() -> None:
    """A three-octet Length over max_frame always holds a plausible one-octet header in its own octets (the
    heuristic's known weakness): here 0xD9 0x0C reads as a 217-octet PUBLISH of zeros, which even decodes;
    the frames after the oversize message arrive intact."""
    framer = LengthFramer(max_frame=1024)
    oversize = _sn(MsgType.PUBLISH, b"\x00\x00\x01\x00\x00" + bytes(2000))
    assert oversize[:4] == b"\x01\x07\xd9\x0c"
    follow = _sn(MsgType.PUBLISH, b"\x00\x00\x01\x00\x00hello")
    frames = _feed(framer, oversize + PINGREQ + follow, range(0, 2100, 64))
    assert frames == [(None, oversize[2:219]), (None, PINGREQ), (None, follow)]
    assert framer.metrics.oversize == 1


def test_length_resynchronises_after_a_plausible_garbage_header_swallows_a_frame() -> None:
    framer = LengthFramer()
    follow = _sn(MsgType.PUBLISH, b"\x00\x00\x01\x00\x00hello")
    # 0x0A then PINGREQ's 0x02 reads as a 10-octet GWINFO: it takes the PINGREQ and the next 7 octets
    frames = _feed(framer, b"\x0a" + PINGREQ + bytes(7) + follow)
    assert frames == [(None, b"\x0a" + PINGREQ + bytes(7)), (None, follow)]


def test_length_rejects_nested_or_long_form_encapsulations() -> None:
    nested = _encapsulated(b"\x01", _encapsulated(b"\x02", PINGREQ))
    long_form = b"\x01\x00\x05\xfe\x00\x01" + PINGREQ  # §5.5 gives the encapsulation a one-octet Length
    framer = LengthFramer()
    frames = _feed(framer, nested + long_form + bytes(300) + PINGREQ)  # 0xFE 0x00 reads as 254 octets
    assert (None, nested) not in frames
    assert (None, long_form) not in frames
    assert frames[-1] == (None, PINGREQ)
    assert framer.metrics.garbage_bytes > 0


# --- SLIP (RFC 1055)

SLIP_FRAMES = [
    b"\x01",
    bytes((END,)),
    bytes((ESC,)),
    bytes((ESC, ESC_END)),
    bytes((ESC, ESC_ESC, END, END, ESC)),
    bytes(range(256)),
    PINGREQ,
]


def test_slip_escapes_end_and_esc_as_rfc1055_says() -> None:
    framer = SlipFramer()
    assert framer.encode(b"\x01\xc0\x02\xdb\x03") == bytes.fromhex("C0 01 DBDC 02 DBDD 03 C0")
    for frame in SLIP_FRAMES:
        assert framer.encode(frame) == framer.broadcast(frame) == _slip(frame)
        assert framer.encode(frame, NODE) == _slip(frame)


def test_slip_round_trips_frames_holding_end_and_esc() -> None:
    stream = b"".join(_slip(frame) for frame in SLIP_FRAMES)
    for frames in (_feed(SlipFramer(), stream), _bytewise(SlipFramer(), stream)):
        assert frames == [(None, frame) for frame in SLIP_FRAMES]


def test_slip_ignores_empty_frames_and_needs_no_leading_end() -> None:
    framer = SlipFramer()
    assert framer.feed(b"abc\xc0\xc0\xc0\xc0def\xc0\xc0") == [(None, b"abc"), (None, b"def")]
    assert framer.metrics.frames == 2
    assert framer.metrics.garbage_bytes == framer.metrics.malformed == 0


@pytest.mark.parametrize(
    ("bad", "after"),
    [(b"\xdb\x41", []), (b"\xdb\xdb\xdc", []), (b"\xdb\xdb", []), (b"\xdb\xc0", [(None, b"cd")])],
    ids=["ESC A", "ESC ESC ESC_END", "ESC ESC", "ESC END"],
)
def test_slip_drops_a_frame_with_a_bad_escape_and_keeps_the_next(bad: bytes, after: list[Frame]) -> None:
    """END always ends a frame, even after an ESC: the bad frame ends there and what follows is a new one."""
    stream = _slip(b"one") + b"\xc0ab" + bad + b"cd\xc0" + _slip(b"two")
    for cuts in ((), range(len(stream))):
        framer = SlipFramer()
        assert _feed(framer, stream, cuts) == [(None, b"one"), *after, (None, b"two")]
        assert framer.metrics.malformed == 1
        assert framer.metrics.resyncs == 1
        assert framer.metrics.garbage_bytes > 0


def test_slip_escape_split_across_chunks_is_joined() -> None:
    framer = SlipFramer()
    assert framer.feed(b"\xc0a\xdb") == []
    assert framer.buffered == 1
    assert framer.feed(b"\xdcb\xdb") == []
    assert framer.feed(b"\xdd\xc0") == [(None, b"a\xc0b\xdb")]


def test_slip_drops_an_oversize_frame_without_buffering_it() -> None:
    framer = SlipFramer(max_frame=16)
    stream = _slip(b"x" * 100) + _slip(bytes((END,)) * 16) + _slip(b"y" * 17) + _slip(b"ok")
    frames = _feed(framer, stream, range(0, len(stream), 5))
    assert frames == [(None, bytes((END,)) * 16), (None, b"ok")]  # the bound is on unescaped octets
    assert framer.metrics.oversize == 2
    assert framer.metrics.garbage_bytes == 117


# --- XBee API frames

DOC_TRANSMIT_REQUEST = bytes.fromhex(
    "7E 00 16 10 01 00 13 A2 00 40 0A 01 27 FF FE 00 00 54 78 44 61 74 61 30 41 13"
)
"""Zigbee Transmit Request example: frame id 1 to 0013A200400A0127, 16-bit 0xFFFE, payload "TxData0A"."""
DOC_RECEIVE_PACKETS = [
    # Zigbee Receive Packet examples: "TxData" from 0013A20087654321, "RxData" from 0013A20040522BAA (0x7D84)
    (
        bytes.fromhex("7E 00 12 90 00 13 A2 00 87 65 43 21 56 14 01 54 78 44 61 74 61 B9"),
        (bytes.fromhex("0013A20087654321"), b"TxData"),
    ),
    (
        bytes.fromhex("7E 00 12 90 00 13 A2 00 40 52 2B AA 7D 84 01 52 78 44 61 74 61 0D"),
        (bytes.fromhex("0013A20040522BAA"), b"RxData"),
    ),
    # 802.15.4 64-bit Receive Packet example: "TxData", RSSI 0x5E, checksum 0x11 (escaped in mode 2)
    (
        bytes.fromhex("7E 00 11 80 00 13 A2 00 12 34 56 78 5E 01 54 78 44 61 74 61 11"),
        (bytes.fromhex("0013A20012345678"), b"TxData"),
    ),
]
DOC_MODEM_STATUS = bytes.fromhex("7E 00 02 8A 06 6F")  # coordinator started
DOC_TRANSMIT_STATUS = bytes.fromhex("7E 00 07 8B 01 7D 84 00 00 01 71")  # frame 1 delivered to 0x7D84
DOC_AT_RESPONSE = _xbee(bytes.fromhex("88 01 42 44 00 00 00 00 03"), escaped=False)  # BD (baud rate) = 3


def _mode2(frame: bytes) -> bytes:
    """A mode 1 frame escaped for mode 2, octet by octet (a wrong checksum stays wrong)."""
    assert frame[0] == START
    escaped = (
        bytes((ESCAPE, octet ^ 0x20)) if octet in XBEE_SPECIAL else bytes((octet,)) for octet in frame[1:]
    )
    return bytes((START,)) + b"".join(escaped)


def test_xbee_checksum_matches_the_documented_transmit_request() -> None:
    frame_data = DOC_TRANSMIT_REQUEST[3:-1]
    assert checksum(frame_data) == 0x13 == DOC_TRANSMIT_REQUEST[-1]
    built = build_transmit_request(b"TxData0A", bytes.fromhex("0013A200400A0127"), frame_id=1)
    assert built == frame_data
    assert api_frame(built, escaped=False) == DOC_TRANSMIT_REQUEST
    assert api_frame(built, escaped=True) == bytes.fromhex(
        "7E 00 16 10 01 00 7D33 A2 00 40 0A 01 27 FF FE 00 00 54 78 44 61 74 61 30 41 7D33"
    )


@pytest.mark.parametrize("escaped", [False, True], ids=["xbee1", "xbee2"])
def test_xbee_encode_sends_a_transmit_request_without_status(escaped: bool) -> None:
    framer = XBeeFramer(escaped)
    # the documented request with frame id 0 (no Transmit Status back): checksum 0x13 + 1
    expected = DOC_TRANSMIT_REQUEST[:4] + b"\x00" + DOC_TRANSMIT_REQUEST[5:-1] + b"\x14"
    assert framer.encode(b"TxData0A", bytes.fromhex("0013A200400A0127")) == (
        _mode2(expected) if escaped else expected
    )
    broadcast = framer.broadcast(b"hello")
    assert broadcast == _xbee(b"\x10\x00" + BROADCAST64 + b"\xff\xfe\x00\x00hello", escaped)
    assert bytes.fromhex("000000000000FFFF") == BROADCAST64


@pytest.mark.parametrize("address", [None, b"", bytes(7), bytes(9)], ids=repr)
def test_xbee_encode_requires_a_64_bit_address(address: bytes | None) -> None:
    with pytest.raises(ValueError):
        XBeeFramer(escaped=False).encode(b"x", address)


@pytest.mark.parametrize("escaped", [False, True], ids=["xbee1", "xbee2"])
def test_xbee_decodes_the_documented_receive_packets(escaped: bool) -> None:
    stream = b"".join(_mode2(vector) if escaped else vector for vector, _ in DOC_RECEIVE_PACKETS)
    if escaped:
        assert b"\x7d\x5d\x84" in stream and stream.endswith(b"\x7d\x31")
    expected = [frame for _, frame in DOC_RECEIVE_PACKETS]
    for frames in (_feed(XBeeFramer(escaped), stream), _bytewise(XBeeFramer(escaped), stream)):
        assert frames == expected


def test_xbee_receive_packet_builder_matches_the_documentation() -> None:
    vector, (source, data) = DOC_RECEIVE_PACKETS[1]
    assert api_frame(build_receive_packet(data, source, source16=0x7D84, options=0x01), False) == vector


@pytest.mark.parametrize("escaped", [False, True], ids=["xbee1", "xbee2"])
@pytest.mark.parametrize("special", XBEE_SPECIAL, ids=lambda value: f"{value:#04x}")
@pytest.mark.parametrize("field", ["address", "length msb", "length lsb", "data", "checksum"])
def test_xbee_round_trips_every_escaped_octet_in_every_field(escaped: bool, special: int, field: str) -> None:
    source = NODE
    data = b"mqtt-sn"
    if field == "address":
        source = bytes((special,)) * 8
    elif field == "data":
        data = bytes((special, 0x20, special, special))
    elif field == "length lsb":
        data = bytes(range(special - 12))
    elif field == "length msb":
        data = b"d" * ((special << 8) + 1 - 12)
    frame_data = _rx90(source, data)
    if field == "checksum":
        data += bytes(((0xFF - special - sum(frame_data)) & 0xFF,))
        frame_data = _rx90(source, data)
        assert checksum(frame_data) == special
    wire = _xbee(frame_data, escaped)
    assert api_frame(frame_data, escaped) == wire
    if escaped:
        assert not any(octet in wire[1:] for octet in (START, 0x11, 0x13))
    for max_frame in (len(data), len(data) + 1):
        framer = XBeeFramer(escaped, max_frame=max_frame)
        assert _feed(framer, wire + wire, range(0, len(wire) * 2, 3)) == [(source, data)] * 2


@pytest.mark.parametrize("escaped", [False, True], ids=["xbee1", "xbee2"])
def test_xbee_ignores_status_and_at_response_frames(escaped: bool) -> None:
    vector, frame = DOC_RECEIVE_PACKETS[0]
    tx_request = DOC_TRANSMIT_REQUEST
    others = [DOC_MODEM_STATUS, DOC_TRANSMIT_STATUS, DOC_AT_RESPONSE, tx_request]
    stream = b"".join(_mode2(f) if escaped else f for f in [*others, vector])
    framer = XBeeFramer(escaped)
    assert _bytewise(framer, stream) == [frame]
    assert framer.metrics.ignored == 4
    assert framer.metrics.frames == 1
    assert framer.metrics.garbage_bytes == framer.metrics.resyncs == framer.metrics.bad_checksums == 0


@pytest.mark.parametrize("escaped", [False, True], ids=["xbee1", "xbee2"])
@pytest.mark.parametrize("corrupt", ["checksum", "data", "address", "length"])
def test_xbee_drops_a_corrupted_frame_and_keeps_the_next(escaped: bool, corrupt: str) -> None:
    good = _xbee(_rx90(NODE, b"first"), escaped=False)
    index = {"checksum": len(good) - 1, "data": len(good) - 3, "address": 6, "length": 2}[corrupt]
    bad = bytearray(good)
    bad[index] ^= 0x04 if corrupt == "length" else 0x40
    bad_wire = _mode2(bytes(bad)) if escaped else bytes(bad)
    following = [_xbee(_rx90(NODE, b"second" * 8), escaped), _xbee(_rx80(NODE, b"third"), escaped)]
    framer = XBeeFramer(escaped)
    frames = _feed(framer, bad_wire + b"".join(following), range(0, 200, 9))
    assert frames == [(NODE, b"second" * 8), (NODE, b"third")]
    if escaped and corrupt == "length":  # Length 0x15 instead of 0x11: the next 0x7E comes first
        assert (framer.metrics.truncated, framer.metrics.bad_checksums) == (1, 0)
    else:
        assert (framer.metrics.truncated, framer.metrics.bad_checksums) == (0, 1)
    assert framer.metrics.resyncs == 1
    assert framer.metrics.garbage_bytes > 0


@pytest.mark.parametrize("escaped", [False, True], ids=["xbee1", "xbee2"])
def test_xbee_counts_receive_frames_too_short_for_their_layout_as_malformed(escaped: bool) -> None:
    short = [_rx90(NODE, b"")[:-1], _rx90(NODE, b""), _rx80(NODE, b""), b"\x90"]
    stream = b"".join(_xbee(frame_data, escaped) for frame_data in short)
    framer = XBeeFramer(escaped)
    assert framer.feed(stream + _xbee(_rx90(NODE, b"x"), escaped)) == [(NODE, b"x")]
    assert framer.metrics.malformed == len(short)
    assert framer.metrics.garbage_bytes == framer.metrics.bad_checksums == 0


def test_xbee2_counts_a_frame_cut_short_by_the_next_start_delimiter() -> None:
    whole = _xbee(_rx90(NODE, b"payload"), escaped=True)
    framer = XBeeFramer(escaped=True)
    assert framer.feed(whole[:10] + whole + whole[:1] + whole) == [(NODE, b"payload")] * 2
    assert framer.metrics.truncated == 1  # a lone 0x7E starts nothing worth counting
    assert framer.metrics.resyncs == 1


def test_xbee1_recovers_the_frames_a_bogus_start_delimiter_spans() -> None:
    frames = [_xbee(_rx90(NODE, b"A" * 20), escaped=False), _xbee(_rx90(NODE, b"B" * 20), escaped=False)]
    bogus = b"\x7e\x00\x30"  # announces 48 octets: covers the first frame and part of the second
    framer = XBeeFramer(escaped=False)
    assert _feed(framer, b"noise" + bogus + b"".join(frames)) == [(NODE, b"A" * 20), (NODE, b"B" * 20)]
    assert framer.metrics.bad_checksums == 1
    assert framer.metrics.garbage_bytes == len(b"noise" + bogus)


@pytest.mark.parametrize("escaped", [False, True], ids=["xbee1", "xbee2"])
def test_xbee_skips_a_frame_over_max_frame_without_buffering_it(escaped: bool) -> None:
    framer = XBeeFramer(escaped, max_frame=32)
    big = _xbee(_rx90(NODE, b"z" * 100), escaped)
    fits = _xbee(_rx90(NODE, b"f" * 32), escaped)
    zero = b"\x7e\x00\x00\xff"
    assert _feed(framer, zero + big + fits, range(0, 300, 4)) == [(NODE, b"f" * 32)]
    assert framer.metrics.oversize == 1
    assert framer.buffer_limit == 32 + MAX_OVERHEAD + 3


# --- every framing: reset, bounds, properties


def _valid_wire(name: str, index: int) -> tuple[Frame, bytes]:
    data = _sn(MsgType.PUBLISH, b"\x00\x00\x01\x00\x00" + bytes((index,)) * 40)
    if name == "length":
        return (None, data), data
    if name == "slip":
        return (None, data), _slip(data)
    return (NODE, data), _xbee(_rx90(NODE, data), escaped=name == "xbee2")


@pytest.mark.parametrize("name", FRAMINGS)
def test_a_stream_that_ends_mid_frame_is_forgotten_on_reset(name: str) -> None:
    framer = _framer(name)
    first, first_wire = _valid_wire(name, 1)
    second, second_wire = _valid_wire(name, 2)
    assert framer.feed(first_wire[: len(first_wire) // 2]) == []
    assert framer.buffered > 0
    framer.reset()
    assert framer.buffered == 0
    assert framer.metrics.truncated == 1
    assert framer.feed(second_wire) == [second]
    framer.reset()
    assert framer.metrics.truncated == 1  # nothing partial the second time
    assert _bytewise(framer, first_wire) == [first]


@pytest.mark.parametrize("name", FRAMINGS)
def test_frames_split_at_every_octet_arrive_whole(name: str) -> None:
    pairs = [_valid_wire(name, index) for index in range(3)]
    stream = b"".join(wire for _, wire in pairs)
    assert _bytewise(_framer(name), stream) == [frame for frame, _ in pairs]


# --- properties
#
# Hypothesis draws a few flat byte strings per example and the helpers below carve them into frames,
# garbage runs and split points: drawing lists of small objects costs ten times more, and the file must
# stay fast.

SPECIAL_OCTETS = [
    0x00,
    0x01,
    0x02,
    0x0C,
    0x11,
    0x13,
    0x7D,
    0x7E,
    0x80,
    0x90,
    0xC0,
    0xDB,
    0xDC,
    0xDD,
    0xFE,
    0xFF,
]
SN_TYPES = [t.value for t in MsgType if t != MsgType.ENCAPSULATED]


def _biased(pairs: bytes) -> bytes:
    """One octet per pair of random octets: a quarter of them drawn from SPECIAL_OCTETS."""
    return bytes(
        SPECIAL_OCTETS[b & 15] if a < 64 else b for a, b in zip(pairs[::2], pairs[1::2], strict=False)
    )


def _pieces(blob: bytes, max_size: int) -> list[bytes]:
    """``blob`` carved into non-empty pieces of at most ``max_size`` octets, each size read from the blob."""
    pieces: list[bytes] = []
    i = 0
    while i < len(blob):
        size = 1 + blob[i] * max_size // 256
        piece = blob[i + 1 : i + 1 + size]
        if piece:
            pieces.append(piece)
        i += 1 + size
    return pieces


def _cuts(gaps: bytes) -> list[int]:
    """Split points: the running sums of ``gaps``."""
    cuts, position = [], 0
    for gap in gaps:
        position += gap
        cuts.append(position)
    return cuts


def _sn_message(piece: bytes, max_frame: int) -> bytes:
    """A valid MQTT-SN message of at most ``max_frame`` octets made from ``piece``: mostly one-octet Length,
    sometimes three-octet Length (when max_frame allows), sometimes a forwarder encapsulation."""
    selector, msg_type, body = piece[0], SN_TYPES[piece[-1] % len(SN_TYPES)], piece[1:]
    if selector % 4 == 0 and max_frame >= 256:
        body = (body or b"-") * (252 // len(body or b"-") + 1)
        return _sn(msg_type, body[: min(max_frame - 4, 252 + selector)], long=True)
    message = _sn(msg_type, body[: min(max_frame, 255) - 2])
    if selector % 4 == 1 and len(message) + 4 <= max_frame:
        return _encapsulated(bytes((selector,)), message, selector & 0x03)
    return message


def _valid(name: str, blob: bytes, max_frame: int = 1024) -> list[tuple[Frame, bytes]]:
    """(expected frame, wire bytes) pairs for ``name``, carved from ``blob``."""
    pairs: list[tuple[Frame, bytes]] = []
    for piece in _pieces(blob, min(max_frame, 160)):
        if name == "length":
            message = _sn_message(piece, max_frame)
            pairs.append(((None, message), message))
        elif name == "slip":
            pairs.append(((None, piece), _slip(piece)))
        else:
            source, data = (piece * 8)[:8], piece
            frame_data = (_rx90 if piece[0] & 1 else _rx80)(source, data)
            pairs.append(((source, data), _xbee(frame_data, escaped=name == "xbee2")))
    return pairs


def _interleave(pairs: list[tuple[Frame, bytes]], garbage: list[bytes]) -> bytes:
    """The frames' wire bytes with garbage runs before, between and after them."""
    runs = iter(garbage * (len(pairs) + 1))
    return b"".join([*(next(runs, b"") + wire for _, wire in pairs), next(runs, b"")])


blobs = st.binary(max_size=1200)
gaps = st.binary(max_size=24)
noisy_bytes = st.binary(max_size=800).map(_biased)
"""Random streams (up to 400 octets) biased towards the octets the framings give a meaning to."""


def _is_subsequence(needles: Sequence[Frame], haystack: Sequence[Frame]) -> bool:
    rest = iter(haystack)
    return all(any(needle == candidate for candidate in rest) for needle in needles)


def _slip_reference(stream: bytes, max_frame: int) -> list[Frame]:
    """RFC 1055 recv_packet, octet by octet, with this project's policy: a bad escape or a frame over
    max_frame drops the frame, END always ends one, empty frames are ignored."""
    frames: list[Frame] = []
    current = bytearray()
    bad = escape = False
    for octet in stream:
        if octet == END:
            if current and not bad and not escape:
                frames.append((None, bytes(current)))
            current, bad, escape = bytearray(), False, False
            continue
        if bad:
            continue
        if escape:
            escape = False
            if octet == ESC_END:
                current.append(END)
            elif octet == ESC_ESC:
                current.append(ESC)
            else:
                bad = True
        elif octet == ESC:
            escape = True
        else:
            current.append(octet)
        bad = bad or len(current) > max_frame
    return frames


def _xbee2_reference(stream: bytes, max_frame: int) -> list[Frame]:
    """Mode 2 API frames, octet by octet: 0x7E starts a frame, 0x7D X is X ^ 0x20, Length and checksum
    checked, 0x90 and 0x80 receive frames with RF data delivered."""
    frames: list[Frame] = []
    current: bytearray | None = None
    escape = False
    for octet in stream:
        if octet == START:
            current, escape = bytearray(), False
            continue
        if current is None:
            continue
        if escape:
            current.append(octet ^ 0x20)
            escape = False
        elif octet == ESCAPE:
            escape = True
            continue
        else:
            current.append(octet)
        if len(current) < 2:
            continue
        length = (current[0] << 8) | current[1]
        if not 0 < length <= max_frame + MAX_OVERHEAD:
            current = None
        elif len(current) == length + 3:
            frame_data = bytes(current[2:-1])
            if (sum(frame_data) + current[-1]) & 0xFF == 0xFF:
                if frame_data[0] == 0x90 and len(frame_data) > 12:
                    frames.append((frame_data[1:9], frame_data[12:]))
                elif frame_data[0] == 0x80 and len(frame_data) > 11:
                    frames.append((frame_data[1:9], frame_data[11:]))
            current = None
    return frames


@pytest.mark.parametrize("name", FRAMINGS)
@HYPOTHESIS
@given(stream=noisy_bytes, split=gaps)
def test_random_streams_never_raise_stay_bounded_and_ignore_chunking(
    name: str, stream: bytes, split: bytes
) -> None:
    whole = _framer(name, max_frame=64)
    frames = _feed(whole, stream)
    assert all(len(frame) <= 64 for _, frame in frames)
    assert _feed(_framer(name, max_frame=64), stream, _cuts(split)) == frames
    assert _feed(_framer(name, max_frame=64), stream, range(0, len(stream), 3)) == frames
    whole.reset()
    assert whole.buffered == 0


@pytest.mark.parametrize("name", FRAMINGS)
@HYPOTHESIS
@given(blob=blobs, split=gaps)
def test_valid_streams_split_at_random_points_give_every_frame(name: str, blob: bytes, split: bytes) -> None:
    pairs = _valid(name, blob)
    framer = _framer(name)
    assert _feed(framer, b"".join(wire for _, wire in pairs), _cuts(split)) == [frame for frame, _ in pairs]
    assert framer.metrics.garbage_bytes == framer.metrics.resyncs == 0


@HYPOTHESIS
@given(blob=blobs, noise=st.binary(max_size=200), split=gaps)
def test_length_frames_survive_garbage_that_no_header_can_start_with(
    blob: bytes, noise: bytes, split: bytes
) -> None:
    unstartable = bytes([0x00, 0x01, *range(65, 256)])  # with max_frame = 64
    pairs = _valid("length", blob, max_frame=64)
    garbage = _pieces(bytes(unstartable[octet % len(unstartable)] for octet in noise), 40)
    framer = LengthFramer(max_frame=64)
    assert _feed(framer, _interleave(pairs, garbage), _cuts(split)) == [frame for frame, _ in pairs]
    assert framer.metrics.frames == len(pairs)


@HYPOTHESIS
@given(blob=blobs, zeros=st.binary(max_size=8), split=gaps)
def test_length_long_frames_survive_line_break_zeros(blob: bytes, zeros: bytes, split: bytes) -> None:
    pairs = _valid("length", blob)
    garbage = [bytes(size % 40) for size in zeros]
    stream = _interleave(pairs, garbage)
    framer = LengthFramer()
    assert _feed(framer, stream, _cuts(split)) == [frame for frame, _ in pairs]
    assert framer.metrics.garbage_bytes + framer.buffered == len(stream) - sum(len(w) for _, w in pairs)


@HYPOTHESIS
@given(blob=blobs, noise=noisy_bytes, split=gaps)
def test_slip_frames_survive_any_garbage_between_them(blob: bytes, noise: bytes, split: bytes) -> None:
    pairs = _valid("slip", blob, max_frame=128)
    stream = _interleave(pairs, _pieces(noise, 60))
    frames = _feed(SlipFramer(max_frame=128), stream, _cuts(split))
    assert _is_subsequence([frame for frame, _ in pairs], frames)
    assert frames == _slip_reference(stream, 128)


@HYPOTHESIS
@given(stream=noisy_bytes, split=gaps)
def test_slip_decodes_any_stream_as_the_reference_does(stream: bytes, split: bytes) -> None:
    assert _feed(SlipFramer(max_frame=64), stream, _cuts(split)) == _slip_reference(stream, 64)


@HYPOTHESIS
@given(blob=blobs, noise=noisy_bytes, split=gaps)
def test_xbee1_frames_survive_garbage_without_a_start_delimiter(
    blob: bytes, noise: bytes, split: bytes
) -> None:
    pairs = _valid("xbee1", blob)
    garbage = _pieces(noise.replace(b"\x7e", b""), 60)
    framer = XBeeFramer(escaped=False)
    assert _feed(framer, _interleave(pairs, garbage), _cuts(split)) == [frame for frame, _ in pairs]


@HYPOTHESIS
@given(blob=blobs, noise=noisy_bytes, split=gaps)
def test_xbee2_frames_survive_any_garbage_between_them(blob: bytes, noise: bytes, split: bytes) -> None:
    pairs = _valid("xbee2", blob, max_frame=128)
    stream = _interleave(pairs, _pieces(noise, 60))
    frames = _feed(XBeeFramer(escaped=True, max_frame=128), stream, _cuts(split))
    assert _is_subsequence([frame for frame, _ in pairs], frames)
    assert frames == _xbee2_reference(stream, 128)


@HYPOTHESIS
@given(stream=noisy_bytes, split=gaps)
def test_xbee2_decodes_any_stream_as_the_reference_does(stream: bytes, split: bytes) -> None:
    assert _feed(XBeeFramer(escaped=True, max_frame=64), stream, _cuts(split)) == _xbee2_reference(stream, 64)
