"""LwM2M payloads in every content format, both ways (OMA-TS-LightweightM2M-1.1 Core §7.4, Appendix C), and
the JSON values of the MQTT command layer (the EMQX LwM2M conventions).

:func:`decode_content` turns a payload answering a request on ``base`` into entries with absolute paths,
typed through a :class:`TypeLookup` (the object registry, or :data:`UNTYPED` for unknown objects);
:func:`encode_content` builds the payload of a Write, Create or Write-Composite. Formats:

- text/plain (0, also a missing Content-Format) and plain CBOR (60): one value at ``base``. Text is typed by
  the resource: ``"129"`` is the Integer 129, ``"21.5"`` a Float, ``"1"``/``"0"`` a Boolean (``true``/
  ``false`` are read too), Time integer seconds, Objlnk ``"3:0"``, Opaque base64 (Appendix C); an unknown
  resource stays a string.
- opaque (42): the bytes of one resource.
- TLV (11542) in :mod:`gateways.lwm2m.tlv`; LwM2M JSON (11543), SenML JSON (110), SenML CBOR (112) and LwM2M
  CBOR (11544) in :mod:`gateways.lwm2m.senml`. The pre-registration numbers 1542 (TLV) and 1543 (JSON) of
  LwM2M 1.0 clients are read as 11542 and 11543.

Errors are :class:`MalformedPacket` with the CoAP code to answer: 0x80 (4.00) for a payload that does not
decode or a value that does not fit its resource; 0x86 (4.06 Not Acceptable) when a single-value format
(text, opaque, CBOR) is asked to carry anything but one value at the request path, or opaque a value that is
not bytes; 0x8F (4.15 Unsupported Content-Format) for a format that carries no resource values, link-format
(40) included: Discover answers are parsed as links elsewhere.
"""

from __future__ import annotations

import base64
import math
import re
from typing import Final, Protocol

from core.errors import MalformedPacket
from gateways.coap.numbers import ContentFormat
from gateways.lwm2m import senml, tlv
from gateways.lwm2m.model import Entry, Path, ResourceType, Time, Value, format_path

__all__ = [
    "DECODABLE",
    "ENCODABLE",
    "UNTYPED",
    "TypeLookup",
    "decode_content",
    "encode_content",
    "value_from_json",
    "value_from_text",
    "value_to_json",
    "value_to_text",
]

_BAD_REQUEST: Final = 0x80
_NOT_ACCEPTABLE: Final = 0x86
_UNSUPPORTED_FORMAT: Final = 0x8F

LEGACY_TLV: Final = 1542
LEGACY_JSON: Final = 1543


class TypeLookup(Protocol):
    """Where the codecs learn a resource's type: the object registry (``ObjectRegistry.type_of``).

    The codecs ask with the resource path ``(obj, inst, res)``, also for resource instances; None means the
    object or resource is not defined, and its values stay as the format gives them (bytes for TLV).
    """

    def type_of(self, path: Path) -> ResourceType | None: ...


class _Untyped:
    def type_of(self, path: Path) -> ResourceType | None:
        return None


UNTYPED: Final[TypeLookup] = _Untyped()
"""A lookup that knows no resource."""

_ENTRY_FORMATS: Final = frozenset(
    {
        ContentFormat.LWM2M_TLV,
        ContentFormat.LWM2M_JSON,
        ContentFormat.SENML_JSON,
        ContentFormat.SENML_CBOR,
        ContentFormat.LWM2M_CBOR,
    }
)
_SINGLE_FORMATS: Final = frozenset({ContentFormat.TEXT_PLAIN, ContentFormat.OCTET_STREAM, ContentFormat.CBOR})
DECODABLE: Final[frozenset[int]] = frozenset({*_ENTRY_FORMATS, *_SINGLE_FORMATS, LEGACY_TLV, LEGACY_JSON})
"""Content-Formats :func:`decode_content` reads."""
ENCODABLE: Final[frozenset[int]] = frozenset({*_ENTRY_FORMATS, *_SINGLE_FORMATS})
"""Content-Formats :func:`encode_content` writes (11544 included)."""

_INTEGERS: Final = (ResourceType.INTEGER, ResourceType.TIME)
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,20}", re.ASCII)
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_INT64: Final = range(-(1 << 63), 1 << 63)
_UINT64: Final = range(1 << 64)


def _bad(message: str, code: int = _BAD_REQUEST) -> MalformedPacket:
    return MalformedPacket(message, code)


def _where(path: Path) -> str:
    return format_path(path) if path else "value"


# --- text/plain values (Appendix C)


def _checked_int(number: int, rtype: ResourceType, where: str) -> int | Time:
    allowed = _UINT64 if rtype is ResourceType.UNSIGNED_INTEGER else _INT64
    if number not in allowed:
        raise _bad(f"{where}: {number} is outside the range of {rtype.value}")
    return Time(number) if rtype is ResourceType.TIME else number


def value_from_text(text: str, rtype: ResourceType | None, path: Path = ()) -> Value:
    """A text/plain value typed by its resource (Appendix C); surrounding blanks are ignored for numbers."""
    where = _where(path)
    if rtype is not None and rtype in (*_INTEGERS, ResourceType.UNSIGNED_INTEGER):
        stripped = text.strip()
        if not _INT_TEXT.fullmatch(stripped):
            raise _bad(f"{where}: {text[:40]!r} is not an integer ({rtype.value})")
        return _checked_int(int(stripped), rtype, where)
    if rtype is ResourceType.FLOAT:
        stripped = text.strip()
        if not _FLOAT_TEXT.fullmatch(stripped):
            raise _bad(f"{where}: {text[:40]!r} is not a number (Float)")
        return float(stripped)
    if rtype is ResourceType.BOOLEAN:
        flag = text.strip().lower()
        if flag not in ("0", "1", "true", "false"):
            raise _bad(f"{where}: {text[:40]!r} is not a Boolean (0 or 1)")
        return flag in ("1", "true")
    if rtype is ResourceType.OBJLNK:
        return senml.parse_objlnk(text.strip(), where)
    if rtype is ResourceType.OPAQUE:
        return senml.b64decode_lenient(text.strip(), where)
    return text


def value_to_text(value: Value, path: Path = ()) -> str:
    """A value as text/plain: Boolean ``1``/``0``, Time seconds, Objlnk ``obj:inst``, Opaque base64."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(f"{_where(path)}: {value} has no text form")
        return repr(value)
    if isinstance(value, Time):
        return str(value.seconds)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


# --- dispatch


def _single_path(base: Path, name: str) -> None:
    if not 3 <= len(base) <= 4:
        raise _bad(f"{name} carries one resource value, not {format_path(base)}")


def decode_content(content_format: int | None, data: bytes, base: Path, types: TypeLookup) -> list[Entry]:
    """The entries of a payload in ``content_format`` (None: text/plain) answering a request on ``base``."""
    if content_format is None or content_format == ContentFormat.TEXT_PLAIN:
        _single_path(base, "text/plain")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"text/plain {format_path(base)}: the payload is not UTF-8") from None
        return [Entry(base, value_from_text(text, types.type_of(base[:3]), base))]
    if content_format == ContentFormat.OCTET_STREAM:
        _single_path(base, "opaque")
        return [Entry(base, bytes(data))]
    if content_format == ContentFormat.CBOR:
        _single_path(base, "CBOR")
        return [Entry(base, senml.decode_cbor_value(data, base, types))]
    if content_format in (ContentFormat.LWM2M_TLV, LEGACY_TLV):
        return tlv.decode_tlv(data, base, types)
    if content_format in (ContentFormat.LWM2M_JSON, LEGACY_JSON):
        return senml.decode_lwm2m_json(data, base, types)
    if content_format == ContentFormat.SENML_JSON:
        return senml.decode_senml_json(data, base, types)
    if content_format == ContentFormat.SENML_CBOR:
        return senml.decode_senml_cbor(data, base, types)
    if content_format == ContentFormat.LWM2M_CBOR:
        return senml.decode_lwm2m_cbor(data, base, types)
    if content_format == ContentFormat.LINK_FORMAT:
        raise _bad("link-format (40) carries links, not resource values", _UNSUPPORTED_FORMAT)
    raise _bad(f"Content-Format {content_format} is not supported", _UNSUPPORTED_FORMAT)


def _single_value(entries: list[Entry], base: Path, name: str) -> Value:
    if len(entries) != 1 or entries[0].path != base or not 3 <= len(base) <= 4:
        paths = ", ".join(format_path(e.path) for e in entries[:4]) or "nothing"
        raise _bad(f"{name} carries one value at {format_path(base)}, not {paths}", _NOT_ACCEPTABLE)
    return entries[0].value


def encode_content(content_format: int | None, entries: list[Entry], base: Path) -> bytes:
    """The payload of ``entries`` (absolute paths under ``base``) in ``content_format`` (None: text/plain)."""
    if content_format is None or content_format == ContentFormat.TEXT_PLAIN:
        text = value_to_text(_single_value(entries, base, "text/plain"), base)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(f"text/plain {format_path(base)}: the string cannot be encoded as UTF-8") from None
    if content_format == ContentFormat.OCTET_STREAM:
        value = _single_value(entries, base, "opaque")
        if not isinstance(value, bytes):
            raise _bad(f"opaque carries bytes, not a {type(value).__name__}", _NOT_ACCEPTABLE)
        return value
    if content_format == ContentFormat.CBOR:
        return senml.encode_cbor_value(_single_value(entries, base, "CBOR"), base)
    if content_format == ContentFormat.LWM2M_TLV:
        return tlv.encode_tlv(entries, base)
    if content_format == ContentFormat.LWM2M_JSON:
        return senml.encode_lwm2m_json(entries, base)
    if content_format == ContentFormat.SENML_JSON:
        return senml.encode_senml_json(entries, base)
    if content_format == ContentFormat.SENML_CBOR:
        return senml.encode_senml_cbor(entries, base)
    if content_format == ContentFormat.LWM2M_CBOR:
        return senml.encode_lwm2m_cbor(entries, base)
    raise _bad(f"Content-Format {content_format} cannot carry resource values", _UNSUPPORTED_FORMAT)


# --- JSON values of the MQTT command layer (EMQX conventions)


def value_to_json(value: Value, rtype: ResourceType | None = None, *, encoding: str = "base64") -> object:
    """A decoded value for the ``up/resp`` JSON: Opaque base64 (or hex), Objlnk ``"obj:inst"``, Time
    integer seconds; an integer read from a Float resource becomes a float. JSON has no NaN or infinity:
    those floats become the strings ``"nan"``, ``"inf"`` and ``"-inf"``."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return float(value) if rtype is ResourceType.FLOAT else value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Time):
        return value.seconds
    if isinstance(value, bytes):
        return value.hex() if encoding == "hex" else base64.b64encode(value).decode("ascii")
    return str(value)


def _json_kind(obj: object) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "boolean"
    if isinstance(obj, int | float):
        return "number"
    if isinstance(obj, str):
        return "string"
    return "array" if isinstance(obj, list) else "object" if isinstance(obj, dict) else type(obj).__name__


def value_from_json(
    obj: object, rtype: ResourceType | None, path: Path = (), *, encoding: str = "base64"
) -> Value:
    """A command's JSON value typed by its resource: numbers (or their text, as EMQX clients send) for
    Integer, Unsigned Integer, Float and Time; ``true``/``false`` (or 0/1, ``"true"``) for Boolean; a string
    for String and Corelnk; ``"obj:inst"`` for Objlnk; base64 (``encoding="hex"``: hex) for Opaque. Untyped
    resources take any JSON scalar as it is. Anything else raises MalformedPacket 0x80 naming ``path``."""
    where = _where(path)
    kind = _json_kind(obj)
    if rtype is None or rtype is ResourceType.NONE:
        if isinstance(obj, bool | int | float | str):
            return obj
    elif rtype in (ResourceType.STRING, ResourceType.CORELNK):
        if isinstance(obj, str):
            return obj
    elif rtype in (*_INTEGERS, ResourceType.UNSIGNED_INTEGER):
        if isinstance(obj, str):
            return value_from_text(obj, rtype, path)
        if isinstance(obj, float) and obj.is_integer():
            obj = int(obj)
        if isinstance(obj, int) and not isinstance(obj, bool):
            return _checked_int(obj, rtype, where)
    elif rtype is ResourceType.FLOAT:
        if isinstance(obj, str):
            return value_from_text(obj, rtype, path)
        if isinstance(obj, int | float) and not isinstance(obj, bool):
            try:
                return float(obj)
            except OverflowError:
                raise _bad(f"{where}: {obj} does not fit a Float") from None
    elif rtype is ResourceType.BOOLEAN:
        if isinstance(obj, bool):
            return obj
        if isinstance(obj, str) or (isinstance(obj, int) and obj in (0, 1)):
            return value_from_text(str(obj), rtype, path)
    elif rtype is ResourceType.OBJLNK:
        if isinstance(obj, str):
            return senml.parse_objlnk(obj, where)
    elif rtype is ResourceType.OPAQUE and isinstance(obj, str):
        if encoding != "hex":
            return senml.b64decode_lenient(obj, where)
        try:
            return bytes.fromhex(obj)
        except ValueError:
            raise _bad(f"{where}: {obj[:40]!r} is not hex") from None
    shown = repr(obj)[:40]
    raise _bad(f"{where}: expected {rtype.value if rtype else 'a JSON scalar'}, got {kind} {shown}")
