"""CoAP message codec: one datagram to one :class:`CoapMessage` and back (RFC 7252 §3, §3.1), with accessors
for the options of RFC 7252 §5.10, Observe (RFC 7641 §2), Block1/Block2/Size1/Size2 (RFC 7959 §2.2, §4) and
No-Response (RFC 7967 §2).

Hand-written code on the hot path of the UDP gateways: options stay raw ``(number, value)`` pairs in wire
order (repeatable options repeated) and are interpreted only when an accessor is called.

Malformed-input policy. :func:`decode` raises :class:`CoapFormatError` (a :class:`MalformedPacket` whose
``code`` is 4.00) for a message format error: a datagram shorter than the 4-byte header, a Token Length of
9-15 (§3), a token running past the datagram, an option delta or length nibble 15 outside the lone 0xFF
payload marker (§3.1), an extended delta or length, or an option value, running past the datagram, an
option number above 65535, a payload marker followed by no payload (§3), and an Empty message (0.00)
carrying a token, options or a payload (§4.1). The error carries ``mtype``, ``mid`` and ``token`` as far as
they could be read (else None), so the gateway can reject a bad CON with a RST (§4.2, §4.3) and ignore a bad
NON, ACK or RST. A version other than 1 is raised too, with ``mtype`` and ``mid`` None: such a message is
silently ignored (§3).

Decoded but left to the caller: codes of the reserved classes 1, 6 and 7 (§3; a CON carrying one is
rejected with a RST, §4.2), unknown method codes (4.05), unknown options (a critical one in a CON request is
answered 4.02, §5.4.1), repeated non-repeatable options and option values of a wrong length (§5.4.3,
§5.4.5). Accessors raise a plain :class:`MalformedPacket`, to be answered as a response with its code: 4.00
for a Uri-Path or Uri-Query that is not UTF-8 and for a block size exponent of 7 (RFC 7959 §2.2), 4.02 for a
block option longer than 3 bytes (RFC 7252 §5.4.3). Builders (:func:`encode`, :func:`encode_uint`,
:func:`encode_block`) raise ``ValueError`` on values that cannot be sent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Final

from core.errors import MalformedPacket
from gateways.coap.numbers import Code, OptionNumber

__all__ = [
    "Block",
    "CoapFormatError",
    "CoapMessage",
    "decode",
    "empty_ack",
    "encode",
    "encode_block",
    "encode_uint",
    "reset",
]

_HEADER = struct.Struct(">BBH")
_BAD: Final = int(Code.BAD_REQUEST)
_BAD_OPTION: Final = int(Code.BAD_OPTION)
_URI_PATH: Final = int(OptionNumber.URI_PATH)
_URI_QUERY: Final = int(OptionNumber.URI_QUERY)
_OBSERVE: Final = int(OptionNumber.OBSERVE)
_CONTENT_FORMAT: Final = int(OptionNumber.CONTENT_FORMAT)
_ACCEPT: Final = int(OptionNumber.ACCEPT)
_BLOCK1: Final = int(OptionNumber.BLOCK1)
_BLOCK2: Final = int(OptionNumber.BLOCK2)
_SIZE1: Final = int(OptionNumber.SIZE1)
_SIZE2: Final = int(OptionNumber.SIZE2)
_NO_RESPONSE: Final = int(OptionNumber.NO_RESPONSE)
_BYTE: Final = tuple(bytes((i,)) for i in range(256))
_NUMBER = itemgetter(0)


class CoapFormatError(MalformedPacket):
    """A message format error (RFC 7252 §3, §4.1); ``mtype``, ``mid`` and ``token`` are None when unread."""

    def __init__(
        self,
        message: str,
        code: int = _BAD,
        *,
        mtype: int | None = None,
        mid: int | None = None,
        token: bytes | None = None,
    ) -> None:
        super().__init__(message, code)
        self.mtype = mtype
        self.mid = mid
        self.token = token


@dataclass(frozen=True, slots=True)
class Block:
    """A Block1 or Block2 value (RFC 7959 §2.2): block number, more flag, size exponent (size 2**(szx+4))."""

    num: int
    more: bool
    szx: int

    @property
    def size(self) -> int:
        return 1 << (self.szx + 4)


# Slotted and not frozen (construction cost on the hot path); treat a decoded message as immutable.


@dataclass(slots=True)
class CoapMessage:
    """One CoAP message (RFC 7252 §3); ``options`` holds ``(number, raw value)`` pairs, repeatable ones
    repeated; :func:`encode` sorts them by number, keeping the order of equal numbers (§3.1)."""

    mtype: int
    code: int
    mid: int
    token: bytes = b""
    options: list[tuple[int, bytes]] = field(default_factory=list)
    payload: bytes = b""

    def option(self, number: int) -> bytes | None:
        """The raw value of the first option ``number``, or None."""
        for n, value in self.options:
            if n == number:
                return value
        return None

    def option_values(self, number: int) -> list[bytes]:
        """The raw values of every option ``number``, in order."""
        return [value for n, value in self.options if n == number]

    def _strings(self, number: int, what: str) -> list[str]:
        try:
            return [value.decode() for n, value in self.options if n == number]
        except UnicodeDecodeError:
            raise MalformedPacket(f"{what} is not UTF-8", _BAD) from None

    def uri_path(self) -> list[str]:
        """The Uri-Path segments (RFC 7252 §5.10.1); raises 4.00 on bad UTF-8."""
        return self._strings(_URI_PATH, "Uri-Path")

    def uri_query(self) -> list[str]:
        """The Uri-Query arguments, still ``key=value`` (RFC 7252 §5.10.1); raises 4.00 on bad UTF-8."""
        return self._strings(_URI_QUERY, "Uri-Query")

    def uint_option(self, number: int) -> int | None:
        """The first option ``number`` read as a big-endian uint (RFC 7252 §3.2), or None."""
        for n, value in self.options:
            if n == number:
                return int.from_bytes(value, "big")
        return None

    def observe(self) -> int | None:
        """Observe (RFC 7641 §2): 0 register, 1 deregister in a GET; a sequence number in a notification."""
        return self.uint_option(_OBSERVE)

    def content_format(self) -> int | None:
        """Content-Format (RFC 7252 §5.10.3)."""
        return self.uint_option(_CONTENT_FORMAT)

    def accept(self) -> int | None:
        """Accept (RFC 7252 §5.10.4)."""
        return self.uint_option(_ACCEPT)

    def size1(self) -> int | None:
        """Size1 (RFC 7252 §5.10.9, RFC 7959 §4)."""
        return self.uint_option(_SIZE1)

    def size2(self) -> int | None:
        """Size2 (RFC 7959 §4)."""
        return self.uint_option(_SIZE2)

    def no_response(self) -> int | None:
        """No-Response bit mask of suppressed classes (RFC 7967 §2)."""
        return self.uint_option(_NO_RESPONSE)

    def _block(self, number: int) -> Block | None:
        value = self.option(number)
        if value is None:
            return None
        if len(value) > 3:
            raise MalformedPacket("block option longer than 3 bytes", _BAD_OPTION)
        raw = int.from_bytes(value, "big")
        szx = raw & 0x07
        if szx == 7:
            raise MalformedPacket("block size exponent 7 is reserved", _BAD)
        return Block(raw >> 4, bool(raw & 0x08), szx)

    def block1(self) -> Block | None:
        """Block1 (RFC 7959 §2.2); raises 4.00 for SZX 7 and 4.02 for a value over 3 bytes."""
        return self._block(_BLOCK1)

    def block2(self) -> Block | None:
        """Block2 (RFC 7959 §2.2); raises 4.00 for SZX 7 and 4.02 for a value over 3 bytes."""
        return self._block(_BLOCK2)


def encode_uint(value: int) -> bytes:
    """A uint option value in the fewest bytes; 0 is empty (RFC 7252 §3.2)."""
    if value < 0:
        raise ValueError("negative uint option")
    return value.to_bytes((value.bit_length() + 7) >> 3, "big")


def encode_block(num: int, more: bool, szx: int) -> bytes:
    """A Block1 or Block2 option value (RFC 7959 §2.2): NUM up to 2**20 - 1, SZX 0-6."""
    if not 0 <= num < 1 << 20:
        raise ValueError(f"block number {num} out of range")
    if not 0 <= szx <= 6:
        raise ValueError(f"block size exponent {szx} out of range")
    return encode_uint((num << 4) | (more << 3) | szx)


def empty_ack(mid: int) -> bytes:
    """An Empty ACK for message id ``mid`` (RFC 7252 §4.2)."""
    return _HEADER.pack(0x60, 0, mid)


def reset(mid: int) -> bytes:
    """A RST for message id ``mid`` (RFC 7252 §4.2, §4.3)."""
    return _HEADER.pack(0x70, 0, mid)


# --- decoding


def decode(data: bytes) -> CoapMessage:
    """Decode one datagram; raises :class:`CoapFormatError` (see the module's policy)."""
    size = len(data)
    if size < 4:
        raise CoapFormatError("datagram shorter than the CoAP header")
    first, code, mid = _HEADER.unpack_from(data)
    if first >> 6 != 1:
        raise CoapFormatError(f"CoAP version {first >> 6}")
    mtype = (first >> 4) & 0x03
    pos = 4 + (first & 0x0F)
    if pos > 12:
        raise CoapFormatError("reserved token length", mtype=mtype, mid=mid)
    if pos > size:
        raise CoapFormatError("token runs past the datagram", mtype=mtype, mid=mid)
    token = data[4:pos]
    if code == 0 and size != 4:
        raise CoapFormatError("Empty message with content", mtype=mtype, mid=mid, token=token)
    options: list[tuple[int, bytes]] = []
    payload = b""
    number = 0
    while pos < size:
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            if pos == size:
                raise CoapFormatError("payload marker without a payload", mtype=mtype, mid=mid, token=token)
            payload = data[pos:]
            break
        delta = byte >> 4
        length = byte & 0x0F
        if delta > 12 or length > 12:
            delta, length, pos = _extended(data, pos, delta, length, mtype, mid, token)
        number += delta
        end = pos + length
        if end > size:
            raise CoapFormatError("option runs past the datagram", mtype=mtype, mid=mid, token=token)
        options.append((number, data[pos:end]))
        pos = end
    if number > 0xFFFF:
        raise CoapFormatError("option number above 65535", mtype=mtype, mid=mid, token=token)
    return CoapMessage(mtype, code, mid, token, options, payload)


def _extended(
    data: bytes, pos: int, delta: int, length: int, mtype: int, mid: int, token: bytes
) -> tuple[int, int, int]:
    """Read the extended delta, then the extended length, of one option (RFC 7252 §3.1)."""
    size = len(data)
    values = [delta, length]
    for i, nibble in enumerate(values):
        if nibble == 13:
            if pos + 1 > size:
                raise CoapFormatError("truncated extended option field", mtype=mtype, mid=mid, token=token)
            values[i] = data[pos] + 13
            pos += 1
        elif nibble == 14:
            if pos + 2 > size:
                raise CoapFormatError("truncated extended option field", mtype=mtype, mid=mid, token=token)
            values[i] = ((data[pos] << 8) | data[pos + 1]) + 269
            pos += 2
        elif nibble == 15:
            raise CoapFormatError(
                "option nibble 15 outside a payload marker", mtype=mtype, mid=mid, token=token
            )
    return values[0], values[1], pos


# --- encoding


def _nibble(value: int) -> tuple[int, bytes]:
    """The 4-bit field and extended bytes of an option delta or length (RFC 7252 §3.1)."""
    if value < 13:
        return value, b""
    if value < 269:
        return 13, _BYTE[value - 13]
    if value > 0xFFFF + 269:
        raise ValueError("option value longer than 65804 bytes")
    return 14, (value - 269).to_bytes(2, "big")


def _encode_options(out: bytearray, options: list[tuple[int, bytes]]) -> int:
    """Append ``options`` to ``out``; the last option number, or -1 at the first one out of order."""
    previous = 0
    for number, value in options:
        delta = number - previous
        if delta < 0:
            return -1
        previous = number
        length = len(value)
        if delta < 13 and length < 13:
            out += _BYTE[(delta << 4) | length]
        else:
            delta_nibble, delta_extra = _nibble(delta)
            length_nibble, length_extra = _nibble(length)
            out += _BYTE[(delta_nibble << 4) | length_nibble]
            out += delta_extra
            out += length_extra
        out += value
    return previous


def encode(msg: CoapMessage) -> bytes:
    """The datagram for ``msg``; options are sorted by number, stably (RFC 7252 §3, §3.1)."""
    token = msg.token
    mtype = msg.mtype
    if len(token) > 8:
        raise ValueError("token longer than 8 bytes")
    if not 0 <= mtype <= 3:
        raise ValueError(f"message type {mtype} out of range")
    try:
        out = bytearray(_HEADER.pack(0x40 | (mtype << 4) | len(token), msg.code, msg.mid))
    except struct.error:
        raise ValueError(f"code {msg.code} or message id {msg.mid} out of range") from None
    out += token
    options = msg.options
    if options:
        last = _encode_options(out, options)
        if last < 0:
            del out[4 + len(token) :]
            last = _encode_options(out, sorted(options, key=_NUMBER))
        if not 0 <= last <= 0xFFFF:
            raise ValueError("option number out of range")
    if msg.payload:
        out += b"\xff"
        out += msg.payload
    return bytes(out)
