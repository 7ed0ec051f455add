"""XBee API frames (framings ``"xbee1"`` and ``"xbee2"``): the serial protocol of Digi XBee modules in API
mode (AP = 1 and AP = 2), with the 64-bit source address of each received packet as the node's radio address.

An API frame (Digi XBee API frame format) is the start delimiter 0x7E, a 16-bit big-endian Length, the frame
data (a frame type octet, then the type's fields) and a checksum, 0xFF minus the low octet of the sum of the
frame data octets. In mode 2 every 0x7E, 0x7D, 0x11 or 0x13 after the start delimiter (in the Length, the
frame data and the checksum) is sent as 0x7D followed by the octet XOR 0x20, so 0x7E only ever starts a frame.

The frame data layouts are declared with ``construct`` (interpreted, never compiled; DESIGN.md §4.5): the
stream decoder has already checked the Length against the bytes and the checksum, each layout checks its
minimum size and ends with ``Terminated``. Received frames:

- Receive Packet 0x90 (Zigbee, DigiMesh and 802.15.4 with AO = 0): 64-bit source, 16-bit source, receive
  options, RF data;
- 64-bit Receive Packet 0x80 (802.15.4 legacy output, AO = 2): 64-bit source, RSSI, options, RF data.

Each yields ``(64-bit source address, RF data)``. Every other frame type (Transmit Status 0x8B, Modem Status
0x8A, AT Command Response 0x88, ...) is consumed and counted as ``ignored``. Outgoing frames are Transmit
Requests 0x10 (frame id 0: the module sends no Transmit Status back; 16-bit destination 0xFFFE, "unknown";
radius 0, the network maximum; options 0); a broadcast goes to 0x000000000000FFFF.

Bad input, and how each mode resynchronises:

- ``max_frame`` bounds the RF data; a Length over ``max_frame`` plus the largest header we parse or build
  (:data:`MAX_OVERHEAD`) is counted as ``oversize`` and the frame skipped; a Length of 0 is skipped as
  garbage.
- A wrong checksum drops the frame (``bad_checksums``).
- A checksum-valid 0x90 or 0x80 frame too short for its layout, or without RF data, is ``malformed``.
- Mode 2: 0x7E always starts a frame, so a frame cut short by the next 0x7E is counted as ``truncated`` and
  the new frame is read; after a dropped frame, everything up to the next 0x7E is garbage. Garbage between
  frames never costs a valid frame.
- Mode 1: 0x7E may occur inside a frame, so after a rejected Length or a wrong checksum the framer looks for
  the next 0x7E from the octet after the rejected start delimiter, not after the rejected frame: a bogus start
  delimiter in line noise cannot swallow the frame after it unless its 8-bit checksum matches by chance (1 in
  256). A truncated frame shows up as a wrong checksum once enough bytes have arrived to cover its Length.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from construct import (  # type: ignore[import-untyped]
    Bytes,
    Const,
    ConstructError,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Struct,
    Terminated,
)

from hardware.link import FramerMetrics

__all__ = [
    "BROADCAST64",
    "ESCAPE",
    "MAX_OVERHEAD",
    "START",
    "UNKNOWN16",
    "FrameType",
    "XBeeFramer",
    "api_frame",
    "build_receive_packet",
    "build_transmit_request",
    "checksum",
]

START = 0x7E
ESCAPE = 0x7D
_XON, _XOFF = 0x11, 0x13
_ESCAPED = frozenset((START, ESCAPE, _XON, _XOFF))
BROADCAST64 = bytes.fromhex("000000000000FFFF")
UNKNOWN16 = 0xFFFE


class FrameType(IntEnum):
    """API frame types this module names (Digi XBee API frame reference)."""

    TRANSMIT_REQUEST = 0x10
    RX_64 = 0x80
    AT_RESPONSE = 0x88
    MODEM_STATUS = 0x8A
    TRANSMIT_STATUS = 0x8B
    RECEIVE_PACKET = 0x90


_RECEIVE_PACKET = Struct(
    "frame_type" / Const(FrameType.RECEIVE_PACKET.value, Int8ub),
    "source64" / Bytes(8),
    "source16" / Int16ub,
    "options" / Int8ub,
    "data" / GreedyBytes,
    Terminated,
)
_RECEIVE_PACKET_HEADER = 12
_RX_64 = Struct(
    "frame_type" / Const(FrameType.RX_64.value, Int8ub),
    "source64" / Bytes(8),
    "rssi" / Int8ub,
    "options" / Int8ub,
    "data" / GreedyBytes,
    Terminated,
)
_RX_64_HEADER = 11
_TRANSMIT_REQUEST = Struct(
    "frame_type" / Const(FrameType.TRANSMIT_REQUEST.value, Int8ub),
    "frame_id" / Int8ub,
    "dest64" / Bytes(8),
    "dest16" / Int16ub,
    "radius" / Int8ub,
    "options" / Int8ub,
    "data" / GreedyBytes,
    Terminated,
)
_TRANSMIT_REQUEST_HEADER = 14
MAX_OVERHEAD = _TRANSMIT_REQUEST_HEADER
"""Frame data octets around the RF data in the largest layout here (Transmit Request)."""
_MAX_LENGTH = 0xFFFF


def checksum(frame_data: bytes) -> int:
    """0xFF minus the low octet of the sum of the frame data octets (Digi API frame format)."""
    return 0xFF - (sum(frame_data) & 0xFF)


def _escape(body: bytes) -> bytes:
    if not any(octet in body for octet in _ESCAPED):
        return body
    return (
        body.replace(b"\x7d", b"\x7d\x5d")
        .replace(b"\x7e", b"\x7d\x5e")
        .replace(b"\x11", b"\x7d\x31")
        .replace(b"\x13", b"\x7d\x33")
    )


def api_frame(frame_data: bytes, escaped: bool) -> bytes:
    """The API frame carrying ``frame_data``: start delimiter, Length, frame data, checksum; in mode 2
    (``escaped``) everything after the start delimiter escaped."""
    if not 0 < len(frame_data) <= _MAX_LENGTH:
        raise ValueError(f"frame data of {len(frame_data)} octets: an API frame carries 1 to 65535")
    body = len(frame_data).to_bytes(2, "big") + frame_data + bytes((checksum(frame_data),))
    return bytes((START,)) + (_escape(body) if escaped else body)


def _address64(address: bytes) -> bytes:
    if len(address) != 8:
        raise ValueError(f"an XBee 64-bit address has 8 octets, not {len(address)}: {address.hex()}")
    return bytes(address)


def build_transmit_request(
    data: bytes,
    dest64: bytes,
    *,
    frame_id: int = 0,
    dest16: int = UNKNOWN16,
    radius: int = 0,
    options: int = 0,
) -> bytes:
    """Frame data of a Transmit Request 0x10: frame type, frame id (0: no Transmit Status), 64-bit and 16-bit
    destination, broadcast radius, transmit options, RF data."""
    built: Any = _TRANSMIT_REQUEST.build(
        {
            "frame_id": frame_id,
            "dest64": _address64(dest64),
            "dest16": dest16,
            "radius": radius,
            "options": options,
            "data": bytes(data),
        }
    )
    return bytes(built)


def build_receive_packet(
    data: bytes, source64: bytes, *, source16: int = UNKNOWN16, options: int = 0
) -> bytes:
    """Frame data of a Receive Packet 0x90 as a module emits it (for simulated nodes in tests, benchmarks)."""
    built: Any = _RECEIVE_PACKET.build(
        {"source64": _address64(source64), "source16": source16, "options": options, "data": bytes(data)}
    )
    return bytes(built)


def _parse(layout: Any, header: int, frame_data: bytes) -> tuple[bytes, bytes] | None:
    """``(source64, data)`` from a receive frame, or None if it is too short or does not match ``layout``."""
    if len(frame_data) <= header:
        return None
    try:
        parsed: Any = layout.parse(frame_data)
    except ConstructError:
        return None
    source: bytes = parsed.source64
    data: bytes = parsed.data
    return source, data


class XBeeFramer:
    """XBee API framer, mode 1 (``escaped=False``) or mode 2 (``escaped=True``); see the module docstring."""

    __slots__ = (
        "_buf",
        "_escape",
        "_escaped",
        "_hunting",
        "_in_frame",
        "_limit",
        "_rest",
        "buffer_limit",
        "metrics",
    )

    def __init__(self, escaped: bool, max_frame: int = 1024) -> None:
        if max_frame < 1:
            raise ValueError(f"max_frame must be at least 1, not {max_frame}")
        self.metrics = FramerMetrics()
        self._escaped = escaped
        self._limit = min(max_frame + MAX_OVERHEAD, _MAX_LENGTH)
        """The largest Length accepted."""
        self.buffer_limit = self._limit + 3
        """The most bytes the framer holds between calls to :meth:`feed`."""
        self._hunting = False
        self._rest = b""
        """Mode 1: raw bytes from a candidate start delimiter on."""
        self._buf = bytearray()
        """Mode 2: unescaped bytes after the start delimiter of the frame being received."""
        self._in_frame = False
        self._escape = False

    @property
    def buffered(self) -> int:
        """Bytes of a partial frame held until more arrive."""
        return len(self._rest) + len(self._buf)

    def feed(self, data: bytes) -> list[tuple[bytes | None, bytes]]:
        out: list[tuple[bytes | None, bytes]] = []
        if self._escaped:
            self._feed_escaped(data, out)
        else:
            self._feed_plain(data, out)
        return out

    # --- mode 1

    def _feed_plain(self, data: bytes, out: list[tuple[bytes | None, bytes]]) -> None:
        buf = self._rest + data if self._rest else bytes(data)
        size = len(buf)
        limit = self._limit
        metrics = self.metrics
        i = 0
        while i < size:
            start = buf.find(START, i)
            if start < 0:
                self._lose_sync(size - i)
                i = size
                break
            if start > i:
                self._lose_sync(start - i)
                i = start
            if size - i < 3:
                break
            length = (buf[i + 1] << 8) | buf[i + 2]
            if length == 0 or length > limit:
                if length:
                    metrics.oversize += 1
                self._lose_sync(1)
                i += 1
                continue
            end = i + 3 + length
            if size <= end:
                break
            frame_data = buf[i + 3 : end]
            if (sum(frame_data) + buf[end]) & 0xFF != 0xFF:
                metrics.bad_checksums += 1
                self._lose_sync(1)
                i += 1
                continue
            self._dispatch(frame_data, out)
            i = end + 1
        self._rest = buf[i:]

    # --- mode 2

    def _feed_escaped(self, data: bytes, out: list[tuple[bytes | None, bytes]]) -> None:
        size = len(data)
        pos = 0
        while pos < size:
            start = data.find(START, pos)
            stop = size if start < 0 else start
            if stop > pos:
                if self._in_frame:
                    self._collect(data[pos:stop], out)
                else:
                    self._lose_sync(stop - pos)
            if start < 0:
                break
            if self._in_frame and (self._buf or self._escape):
                self.metrics.truncated += 1
                self._lose_sync(len(self._buf) + 1)
            self._in_frame = True
            self._buf.clear()
            self._escape = False
            pos = start + 1

    def _collect(self, segment: bytes, out: list[tuple[bytes | None, bytes]]) -> None:
        """Unescape ``segment`` (no 0x7E in it) onto the frame being received; deliver or drop the frame once
        its Length and checksum are in."""
        if self._escape:
            self._escape = False
            self._buf.append(segment[0] ^ 0x20)
            segment = segment[1:]
        if ESCAPE in segment:
            segment = self._unescape(segment)
        buf = self._buf
        buf += segment
        if len(buf) < 2:
            return
        length = (buf[0] << 8) | buf[1]
        if length == 0 or length > self._limit:
            if length:
                self.metrics.oversize += 1
            self._abandon(len(buf) + 1)
            return
        end = 2 + length
        if len(buf) <= end:
            return
        frame_data = bytes(buf[2:end])
        good = (sum(frame_data) + buf[end]) & 0xFF == 0xFF
        extra = len(buf) - end - 1
        if not good:
            self.metrics.bad_checksums += 1
            self._abandon(len(buf) + 1)
            return
        self._in_frame = False
        self._escape = False
        buf.clear()
        self._dispatch(frame_data, out)
        if extra:
            self._lose_sync(extra)

    def _unescape(self, segment: bytes) -> bytes:
        """``segment`` with each 0x7D X replaced by X ^ 0x20; a trailing 0x7D waits for its partner."""
        parts: list[bytes] = []
        i = 0
        while True:
            j = segment.find(ESCAPE, i)
            if j < 0:
                parts.append(segment[i:])
                break
            parts.append(segment[i:j])
            if j + 1 == len(segment):
                self._escape = True
                break
            parts.append(bytes((segment[j + 1] ^ 0x20,)))
            i = j + 2
        return b"".join(parts)

    def _abandon(self, garbage: int) -> None:
        """Drop the frame being received; the bytes up to the next start delimiter are garbage."""
        self._in_frame = False
        self._escape = False
        self._buf.clear()
        self._lose_sync(garbage)

    # --- both modes

    def _dispatch(self, frame_data: bytes, out: list[tuple[bytes | None, bytes]]) -> None:
        """Deliver a checksum-valid frame's RF data, or count it as ignored or malformed."""
        self._hunting = False
        kind = frame_data[0]
        if kind == FrameType.RECEIVE_PACKET:
            parsed = _parse(_RECEIVE_PACKET, _RECEIVE_PACKET_HEADER, frame_data)
        elif kind == FrameType.RX_64:
            parsed = _parse(_RX_64, _RX_64_HEADER, frame_data)
        else:
            self.metrics.ignored += 1
            return
        if parsed is None:
            self.metrics.malformed += 1
            return
        out.append(parsed)
        self.metrics.frames += 1

    def _lose_sync(self, garbage: int) -> None:
        self.metrics.garbage_bytes += garbage
        if not self._hunting:
            self._hunting = True
            self.metrics.resyncs += 1

    def encode(self, frame: bytes, address: bytes | None = None) -> bytes:
        """A Transmit Request 0x10 carrying ``frame`` to the 8-octet 64-bit ``address``."""
        if address is None:
            raise ValueError("an XBee frame needs the destination's 64-bit address")
        return api_frame(build_transmit_request(frame, address), self._escaped)

    def broadcast(self, frame: bytes) -> bytes:
        """A Transmit Request 0x10 carrying ``frame`` to the broadcast address 0x000000000000FFFF."""
        return api_frame(build_transmit_request(frame, BROADCAST64), self._escaped)

    def reset(self) -> None:
        if self._rest or (self._in_frame and (self._buf or self._escape)):
            self.metrics.truncated += 1
        self._rest = b""
        self._buf.clear()
        self._in_frame = False
        self._escape = False
        self._hunting = False
