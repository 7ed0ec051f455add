"""LwM2M TLV, Content-Format 11542 (OMA-TS-LightweightM2M-1.1 Core §7.4.3, value encodings in Appendix C).

One TLV is a type byte, an identifier of 8 or 16 bits and a length of 0 to 3 bytes, then the value:

- type bits 7-6: 00 Object Instance (holds resources), 01 Resource Instance (a value), 10 Multiple Resource
  (holds resource instances), 11 Resource with a value;
- bit 5: identifier of 16 bits (else 8); bits 4-3: width of the length field in bytes (0 = the length is in
  bits 2-0).

:func:`decode_tlv` turns a payload into :class:`~gateways.lwm2m.model.Entry` values with absolute paths,
typed by the resource definitions (``types``): Integer and Time are signed big-endian of 1, 2, 4 or 8 bytes
(one byte 0x81 is -127), Unsigned Integer the same unsigned, Float 4 or 8 bytes IEEE 754, Boolean one byte 0
or 1, Objlnk two 16-bit ids, String and Corelnk UTF-8; Opaque, executable and unknown resources stay
``bytes``. The payload sits at the request path ``base``: an object read answers Object Instance TLVs, an
instance read Resource and Multiple Resource TLVs, a resource read one Resource or Multiple Resource TLV.
Read leniently, as clients do send them: an Object Instance wrapper around an instance read, and bare
Resource Instance TLVs for a multiple resource read.

Malformed-input policy: :func:`decode_tlv` raises :class:`MalformedPacket` with code 0x80 (4.00 Bad Request)
for a header or a length running past its container, a TLV kind out of place (a resource inside a multiple
resource, an instance inside an instance, a resource directly under an object), an id other than the requested
one, and a value that does not fit its type (an Integer of 3 bytes, a Boolean of 2, bad UTF-8).

Encoding (:func:`encode_tlv`): integers and Time take the smallest of 1, 2, 4 or 8 bytes that holds the
*signed* value, so 129 is 0x0081, never 0x81 (the EMQX 4.3 sign bug, emqx#4989), and 2**63..2**64-1 (Unsigned
Integer only) take 8 unsigned bytes. A float takes 4 bytes when float32 holds it exactly, else 8. Entries are
grouped under Object Instance and Multiple Resource headers relative to ``base``; an entry outside ``base``,
a path that is not a resource or resource instance, a resource given both a value and instances, a repeated
path or a value that cannot be encoded raises :class:`MalformedPacket` (0x80) naming the path.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final, TypeAlias

from core.errors import MalformedPacket
from gateways.lwm2m.model import Entry, ObjLink, Path, ResourceType, Time, Value, format_path

if TYPE_CHECKING:
    from gateways.lwm2m.content import TypeLookup

__all__ = ["decode_tlv", "encode_tlv"]

_BAD_REQUEST: Final = 0x80

OBJECT_INSTANCE: Final = 0
RESOURCE_INSTANCE: Final = 1
MULTIPLE_RESOURCE: Final = 2
RESOURCE: Final = 3

_NAMES: Final = ("Object Instance", "Resource Instance", "Multiple Resource", "Resource")
_DEPTH: Final = (2, 4, 3, 3)
"""Length of the path a TLV kind names: an object instance /o/i, a resource /o/i/r, an instance /o/i/r/ri."""
_INSIDE: Final[dict[int, tuple[int, ...]]] = {
    OBJECT_INSTANCE: (RESOURCE, MULTIPLE_RESOURCE),
    MULTIPLE_RESOURCE: (RESOURCE_INSTANCE,),
}

_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
_OBJLNK = struct.Struct(">HH")
_INT_TYPES: Final = (ResourceType.INTEGER, ResourceType.TIME, ResourceType.UNSIGNED_INTEGER)
_TEXT_TYPES: Final = (ResourceType.STRING, ResourceType.CORELNK)


def _bad(message: str) -> MalformedPacket:
    return MalformedPacket(f"TLV: {message}", _BAD_REQUEST)


# --- decoding


def _split(data: bytes, pos: int, end: int) -> list[tuple[int, int, int, int]]:
    """The TLVs in ``data[pos:end]`` as ``(kind, id, value_start, value_end)``."""
    found: list[tuple[int, int, int, int]] = []
    while pos < end:
        head = pos
        kind_byte = data[pos]
        id_width = 2 if kind_byte & 0x20 else 1
        length_width = (kind_byte >> 3) & 0x03
        pos += 1
        if pos + id_width + length_width > end:
            raise _bad(f"header at offset {head} is truncated")
        ident = int.from_bytes(data[pos : pos + id_width], "big")
        pos += id_width
        if length_width:
            length = int.from_bytes(data[pos : pos + length_width], "big")
            pos += length_width
        else:
            length = kind_byte & 0x07
        if pos + length > end:
            raise _bad(f"length {length} at offset {head} runs past the end ({end - pos} bytes left)")
        found.append((kind_byte >> 6, ident, pos, pos + length))
        pos += length
    return found


def _walk(
    data: bytes,
    start: int,
    end: int,
    prefix: Path,
    base: Path,
    types: TypeLookup,
    allowed: tuple[int, ...] | None,
    out: list[Entry],
) -> None:
    for kind, ident, value_start, value_end in _split(data, start, end):
        name = _NAMES[kind]
        if allowed is not None and kind not in allowed:
            raise _bad(f"{name} TLV {ident} inside {format_path(prefix)} is out of place")
        depth = _DEPTH[kind]
        if len(prefix) < depth - 1:
            raise _bad(f"{name} TLV {ident} directly under {format_path(prefix)}: a level is missing")
        path = (*prefix[: depth - 1], ident)
        if len(prefix) >= depth and prefix[depth - 1] != ident:
            raise _bad(f"{name} TLV {format_path(path)} is not the requested {format_path(base)}")
        if kind in _INSIDE:
            inner = prefix if len(prefix) >= depth else path
            _walk(data, value_start, value_end, inner, base, types, _INSIDE[kind], out)
            continue
        if len(path) < len(base):
            raise _bad(f"{name} TLV {format_path(path)} is not the requested {format_path(base)}")
        rtype = types.type_of(path[:3])
        out.append(Entry(path, _decode_value(data[value_start:value_end], rtype, path)))


def _decode_value(raw: bytes, rtype: ResourceType | None, path: Path) -> Value:
    """A value typed by its resource definition (Appendix C); unknown types stay bytes."""
    size = len(raw)
    if rtype in _INT_TYPES:
        if size not in (1, 2, 4, 8):
            raise _bad(f"{format_path(path)}: an integer of {size} bytes (1, 2, 4 or 8)")
        number = int.from_bytes(raw, "big", signed=rtype is not ResourceType.UNSIGNED_INTEGER)
        return Time(number) if rtype is ResourceType.TIME else number
    if rtype is ResourceType.FLOAT:
        if size == 4:
            return float(_F32.unpack(raw)[0])
        if size == 8:
            return float(_F64.unpack(raw)[0])
        raise _bad(f"{format_path(path)}: a float of {size} bytes (4 or 8)")
    if rtype is ResourceType.BOOLEAN:
        if size != 1 or raw[0] > 1:
            raise _bad(f"{format_path(path)}: a boolean must be one byte 0 or 1, got {raw.hex()}")
        return raw[0] == 1
    if rtype is ResourceType.OBJLNK:
        if size != 4:
            raise _bad(f"{format_path(path)}: an object link of {size} bytes (4)")
        return ObjLink(*_OBJLNK.unpack(raw))
    if rtype in _TEXT_TYPES:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"{format_path(path)}: a string that is not UTF-8") from None
    return bytes(raw)


def decode_tlv(data: bytes, base: Path, types: TypeLookup) -> list[Entry]:
    """The entries of a TLV payload answering a request on ``base`` (an object, instance, resource or
    resource instance path), in wire order, with absolute paths."""
    if not 1 <= len(base) <= 4:
        raise _bad(f"request path {format_path(base)} must have 1 to 4 levels")
    out: list[Entry] = []
    _walk(bytes(data), 0, len(data), base, base, types, None, out)
    return out


# --- encoding


def _header(kind: int, ident: int, length: int, path: Path) -> bytes:
    if not 0 <= ident <= 0xFFFF:
        raise _bad(f"{format_path(path)}: id {ident} is outside 0..65535")
    kind_byte = kind << 6
    if ident > 0xFF:
        kind_byte |= 0x20
        id_bytes = ident.to_bytes(2, "big")
    else:
        id_bytes = bytes((ident,))
    if length < 8:
        return bytes((kind_byte | length,)) + id_bytes
    for width in (1, 2, 3):
        if length < 1 << (8 * width):
            return bytes((kind_byte | width << 3,)) + id_bytes + length.to_bytes(width, "big")
    raise _bad(f"{format_path(path)}: {length} bytes do not fit a TLV (16 MiB at most)")


def _tlv(kind: int, ident: int, value: bytes, path: Path) -> bytes:
    return _header(kind, ident, len(value), path) + value


def _int_bytes(number: int, path: Path) -> bytes:
    for width in (1, 2, 4, 8):
        limit = 1 << (8 * width - 1)
        if -limit <= number < limit:
            return number.to_bytes(width, "big", signed=True)
    if 0 <= number < 1 << 64:
        return number.to_bytes(8, "big")
    raise _bad(f"{format_path(path)}: {number} does not fit 64 bits")


def _encode_value(value: Value, path: Path) -> bytes:
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        return _int_bytes(value, path)
    if isinstance(value, float):
        try:
            packed = _F32.pack(value)
        except OverflowError:
            return _F64.pack(value)
        return packed if _F32.unpack(packed)[0] == value else _F64.pack(value)
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(f"{format_path(path)}: the string cannot be encoded as UTF-8") from None
    if isinstance(value, bytes):
        return value
    if isinstance(value, Time):
        return _int_bytes(value.seconds, path)
    if isinstance(value, ObjLink):
        if not (0 <= value.object_id <= 0xFFFF and 0 <= value.instance_id <= 0xFFFF):
            raise _bad(f"{format_path(path)}: object link {value} has an id outside 0..65535")
        return _OBJLNK.pack(value.object_id, value.instance_id)
    raise _bad(f"{format_path(path)}: cannot encode a {type(value).__name__}")


_Resource: TypeAlias = Value | dict[int, Value]


def _resource(rid: int, item: _Resource, path: Path) -> bytes:
    if isinstance(item, dict):
        body = b"".join(
            _tlv(RESOURCE_INSTANCE, riid, _encode_value(v, (*path, riid)), (*path, riid))
            for riid, v in item.items()
        )
        return _tlv(MULTIPLE_RESOURCE, rid, body, path)
    return _tlv(RESOURCE, rid, _encode_value(item, path), path)


def encode_tlv(entries: list[Entry], base: Path) -> bytes:
    """The TLV payload of ``entries`` (absolute resource or resource-instance paths) for a request on
    ``base``: Object Instance TLVs for an object, resources for an instance, one resource (or multiple
    resource) for a resource, one Resource Instance for a resource instance."""
    if not 1 <= len(base) <= 4:
        raise _bad(f"request path {format_path(base)} must have 1 to 4 levels")
    tree: dict[int, dict[int, _Resource]] = {}
    for entry in entries:
        path = entry.path
        if path[: len(base)] != base or not 3 <= len(path) <= 4:
            raise _bad(f"entry {format_path(path)} is not a resource under {format_path(base)}")
        resources = tree.setdefault(path[1], {})
        rid = path[2]
        if len(path) == 3:
            if rid in resources:
                raise _bad(f"{format_path(path)} is given twice")
            resources[rid] = entry.value
            continue
        instances = resources.setdefault(rid, {})
        if not isinstance(instances, dict):
            raise _bad(f"{format_path(path[:3])} is given both a value and instances")
        if path[3] in instances:
            raise _bad(f"{format_path(path)} is given twice")
        instances[path[3]] = entry.value
    if len(base) == 1:
        return b"".join(
            _tlv(
                OBJECT_INSTANCE,
                iid,
                b"".join(_resource(rid, item, (*base, iid, rid)) for rid, item in resources.items()),
                (*base, iid),
            )
            for iid, resources in tree.items()
        )
    resources = tree.get(base[1], {})
    if len(base) == 2:
        return b"".join(_resource(rid, item, (*base, rid)) for rid, item in resources.items())
    if len(base) == 3:
        return b"".join(_resource(rid, item, base) for rid, item in resources.items())
    item = resources.get(base[2], {})  # a dict: a 4-level base only admits 4-level entries
    members = list(item.items()) if isinstance(item, dict) else []
    return b"".join(_tlv(RESOURCE_INSTANCE, riid, _encode_value(v, base), base) for riid, v in members)
