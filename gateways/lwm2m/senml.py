"""The name/value LwM2M content formats: SenML JSON (110) and SenML CBOR (112) of RFC 8428 with the LwM2M
fields of OMA-TS-LightweightM2M-1.1 Core §7.4 (``vlo`` object links), LwM2M JSON (11543, the ``{"bn", "e"}``
format of OMA-TS-LightweightM2M-1.0 §6.4.4), LwM2M CBOR (11544, OMA-TS-LightweightM2M-1.2 Core §7.4: nested
maps keyed by path ids or arrays of ids) and plain CBOR (60, one value, LwM2M 1.1 Core §7.4).

Names resolve to absolute paths: ``bn`` + ``n`` (a ``/`` is put between them when ``bn`` lacks one, as some
encoders write ``"bn": "/3303/0"``); a name without a leading ``/`` is relative to the request path ``base``.
Every resolved path must be a resource or resource instance under ``base``. Values are typed by the resource
definitions (``types``, Appendix C): numbers stay ints when they have no fraction (64-bit exact) and become
floats for Float resources, Time resources take integer seconds, Opaque is base64 (``vd`` is base64url in
SenML JSON, a byte string in CBOR, and base64 in ``sv`` for LwM2M JSON), object links are ``"obj:inst"``.
Unknown resources keep the value as the format gives it. The SenML base time ``bt`` and times ``t`` are
accepted and ignored, so a Send of several timestamped values yields every value, in order.

Malformed-input policy: every decoder raises :class:`MalformedPacket` with code 0x80 (4.00 Bad Request) for
bytes that do not parse (bad UTF-8 or JSON, NaN, CBOR garbage or trailing bytes), a wrong structure (not an
array of records, a record that is not a map, ``e`` missing), a record with no name, no value or two values,
a name that is not a path of numeric ids, a path outside ``base`` or above resource level, a value of the
wrong JSON/CBOR type for its field or its resource (a string for an Integer, 1.5 for an Integer, bad base64 or
object link), a SenML base value ``bv`` (unsupported) and a must-understand label (ending in ``_``).
Encoders raise the same error (naming the path) for entries outside ``base``, a float JSON cannot carry
(NaN, infinity) and values they cannot represent.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Final

import cbor2

from core.errors import MalformedPacket
from gateways.lwm2m.model import Entry, ObjLink, Path, ResourceType, Time, Value, format_path

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gateways.lwm2m.content import TypeLookup

__all__ = [
    "b64decode_lenient",
    "decode_cbor_value",
    "decode_lwm2m_cbor",
    "decode_lwm2m_json",
    "decode_senml_cbor",
    "decode_senml_json",
    "encode_cbor_value",
    "encode_lwm2m_cbor",
    "encode_lwm2m_json",
    "encode_senml_cbor",
    "encode_senml_json",
    "parse_objlnk",
]

_BAD_REQUEST: Final = 0x80

_NUMBER: Final = "number"
_STRING: Final = "string"
_BOOLEAN: Final = "boolean"
_DATA: Final = "data"
_OBJLNK: Final = "objlnk"

_SENML_FIELDS: Final = {"v": _NUMBER, "vs": _STRING, "vb": _BOOLEAN, "vd": _DATA, "vlo": _OBJLNK}
_LWM2M_JSON_FIELDS: Final = {"v": _NUMBER, "sv": _STRING, "bv": _BOOLEAN, "ov": _OBJLNK}
_SENML_CBOR_LABELS: Final[dict[object, str]] = {
    -1: "bver",
    -2: "bn",
    -3: "bt",
    -4: "bu",
    -5: "bv",
    -6: "bs",
    0: "n",
    1: "u",
    2: "v",
    3: "vs",
    4: "vb",
    5: "s",
    6: "t",
    7: "ut",
    8: "vd",
}
_SENML_CBOR_KEYS: Final = {name: label for label, name in _SENML_CBOR_LABELS.items()}

_ID = re.compile(r"[0-9]{1,5}", re.ASCII)
_OBJLNK_TEXT = re.compile(r"([0-9]{1,5}):([0-9]{1,5})", re.ASCII)
_INTEGERS: Final = (ResourceType.INTEGER, ResourceType.UNSIGNED_INTEGER, ResourceType.TIME)
_UNTYPED: Final = (None, ResourceType.NONE)


def _bad(message: str) -> MalformedPacket:
    return MalformedPacket(message, _BAD_REQUEST)


def _kind_of(raw: object) -> str:
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return "boolean"
    if isinstance(raw, int | float | Decimal):
        return "number"
    if isinstance(raw, str):
        return "string"
    if isinstance(raw, bytes):
        return "byte string"
    if isinstance(raw, list | tuple):
        return "array"
    if isinstance(raw, dict):
        return "map"
    return type(raw).__name__


# --- shared value helpers


def parse_objlnk(text: str, where: str) -> ObjLink:
    """``"3:0"`` to ObjLink(3, 0): two decimal ids of 0..65535, nothing else (Appendix C)."""
    match = _OBJLNK_TEXT.fullmatch(text)
    if match is None or int(match[1]) > 0xFFFF or int(match[2]) > 0xFFFF:
        raise _bad(f"{where}: object link {text!r} is not obj:inst")
    return ObjLink(int(match[1]), int(match[2]))


def b64decode_lenient(text: str, where: str) -> bytes:
    """Base64 in either alphabet (RFC 4648 §4 or base64url §5), padding optional; anything else is 4.00."""
    stripped = text.rstrip("=")
    normal = stripped.replace("-", "+").replace("_", "/") + "=" * (-len(stripped) % 4)
    try:
        return base64.b64decode(normal, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{where}: {text[:40]!r} is not base64") from None


def _typed(kind: str, raw: object, rtype: ResourceType | None, where: str) -> Value:
    """A field's raw value typed by the resource's definition; ``kind`` is what the field carries."""
    if kind == _NUMBER:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _bad(f"{where}: a number field holding a {_kind_of(raw)}")
        if rtype in _INTEGERS:
            if isinstance(raw, float):
                if not raw.is_integer():
                    raise _bad(f"{where}: {raw!r} is not an integer ({rtype.value})")
                raw = int(raw)
            if rtype is ResourceType.UNSIGNED_INTEGER and raw < 0:
                raise _bad(f"{where}: {raw} is negative (Unsigned Integer)")
            return Time(raw) if rtype is ResourceType.TIME else raw
        if rtype is ResourceType.FLOAT:
            try:
                return float(raw)
            except OverflowError:
                raise _bad(f"{where}: {raw} does not fit a float") from None
        if rtype in _UNTYPED:
            return raw
    elif kind == _STRING:
        if not isinstance(raw, str):
            raise _bad(f"{where}: a string field holding a {_kind_of(raw)}")
        if rtype in (ResourceType.STRING, ResourceType.CORELNK, *_UNTYPED):
            return raw
        if rtype is ResourceType.OPAQUE:
            return b64decode_lenient(raw, where)
        if rtype is ResourceType.OBJLNK:
            return parse_objlnk(raw, where)
    elif kind == _BOOLEAN:
        if not isinstance(raw, bool):
            raise _bad(f"{where}: a boolean field holding a {_kind_of(raw)}")
        if rtype in (ResourceType.BOOLEAN, *_UNTYPED):
            return raw
    elif kind == _DATA:
        if isinstance(raw, str):
            raw = b64decode_lenient(raw, where)
        if not isinstance(raw, bytes):
            raise _bad(f"{where}: a data field holding a {_kind_of(raw)}")
        if rtype in (ResourceType.OPAQUE, *_UNTYPED):
            return raw
    elif kind == _OBJLNK:
        if not isinstance(raw, str):
            raise _bad(f"{where}: an object link field holding a {_kind_of(raw)}")
        if rtype in (ResourceType.OBJLNK, *_UNTYPED):
            return parse_objlnk(raw, where)
    raise _bad(f"{where}: a {kind} value for a {rtype.value if rtype else 'untyped'} resource")


def _join(bn: str, n: str) -> str:
    if bn and n and not bn.endswith("/") and not n.startswith("/"):
        return f"{bn}/{n}"
    return bn + n


def _resolve(name: str, base: Path, where: str) -> Path:
    """An absolute resource or resource-instance path under ``base`` from a record's full name."""
    if not name:
        raise _bad(f"{where}: a record without a name")
    prefix, text = ((), name[1:]) if name.startswith("/") else (base, name)
    text = text.removesuffix("/")
    parts = text.split("/") if text else []
    if not all(_ID.fullmatch(part) and int(part) <= 0xFFFF for part in parts):
        raise _bad(f"{where}: name {name!r} is not a path of ids 0..65535")
    path = (*prefix, *(int(part) for part in parts))
    if not 3 <= len(path) <= 4:
        raise _bad(f"{where}: {name!r} names {format_path(path)}, not a resource or resource instance")
    if path[: len(base)] != base:
        raise _bad(f"{where}: {format_path(path)} is outside the requested {format_path(base)}")
    return path


def _check_entries(entries: Iterable[Entry], base: Path, fmt: str, *, finite: bool = False) -> None:
    for entry in entries:
        if entry.path[: len(base)] != base or not 3 <= len(entry.path) <= 4:
            raise _bad(f"{fmt}: entry {format_path(entry.path)} is not a resource under {format_path(base)}")
        if finite and isinstance(entry.value, float) and not math.isfinite(entry.value):
            raise _bad(f"{fmt}: {format_path(entry.path)} = {entry.value} cannot be carried in JSON")


def _names(entries: list[Entry], base: Path) -> tuple[str, list[str]]:
    """A base name ending in ``/`` and each entry's name relative to it (the base itself when no entry
    sits at ``base``, else its parent, so that every name is non-empty)."""
    root = base if all(len(e.path) > len(base) for e in entries) else base[:-1]
    bn = format_path(root).rstrip("/") + "/"
    return bn, ["/".join(str(i) for i in e.path[len(root) :]) for e in entries]


# --- JSON and CBOR parsing


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _load_json(data: bytes, fmt: str) -> object:
    try:
        return json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise _bad(f"{fmt}: the payload is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise _bad(f"{fmt}: the payload is not JSON ({exc})") from None


def _dump_json(obj: object, fmt: str) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise _bad(f"{fmt}: cannot encode ({exc})") from None


def _load_cbor(data: bytes, fmt: str) -> object:
    """One CBOR data item taking the whole payload (RFC 8949); cbor2 raises assorted errors on garbage."""
    stream = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # any failure of the third-party decoder means a bad payload
        raise _bad(f"{fmt}: the payload is not CBOR ({type(exc).__name__}: {exc})") from None
    if stream.tell() != len(data):
        raise _bad(f"{fmt}: {len(data) - stream.tell()} bytes after the CBOR data item")
    return obj


def _dump_cbor(obj: object, fmt: str) -> bytes:
    try:
        return cbor2.dumps(obj, canonical=True)
    except Exception as exc:
        raise _bad(f"{fmt}: cannot encode ({exc})") from None


def _cbor_leaf(raw: object, rtype: ResourceType | None, where: str) -> Value:
    """A CBOR value typed by its resource: tag 4 decimal fractions are numbers, tag 0/1 times are Time."""
    if isinstance(raw, datetime):
        aware = raw if raw.tzinfo is not None else raw.replace(tzinfo=UTC)
        seconds = math.floor(aware.timestamp())
        if rtype in (ResourceType.TIME, *_UNTYPED):
            return Time(seconds)
        if rtype in (ResourceType.INTEGER, ResourceType.UNSIGNED_INTEGER):
            return _typed(_NUMBER, seconds, rtype, where)
        raise _bad(f"{where}: a time value for a {rtype.value if rtype else 'untyped'} resource")
    if isinstance(raw, bool):
        return _typed(_BOOLEAN, raw, rtype, where)
    if isinstance(raw, Decimal):
        raw = float(raw)
    if isinstance(raw, int | float):
        return _typed(_NUMBER, raw, rtype, where)
    if isinstance(raw, str):
        return _typed(_STRING, raw, rtype, where)
    if isinstance(raw, bytes):
        return _typed(_DATA, raw, rtype, where)
    raise _bad(f"{where}: unsupported CBOR value ({_kind_of(raw)})")


def _cbor_native(value: Value) -> object:
    if isinstance(value, Time):
        return value.seconds
    if isinstance(value, ObjLink):
        return str(value)
    return value


# --- SenML JSON (110) and SenML CBOR (112)


def _senml_records(records: object, base: Path, types: TypeLookup, fmt: str, cbor: bool) -> list[Entry]:
    if not isinstance(records, list):
        raise _bad(f"{fmt}: expects an array of records, got a {_kind_of(records)}")
    out: list[Entry] = []
    bn = ""
    for index, raw_record in enumerate(records):
        where = f"{fmt} record {index}"
        if not isinstance(raw_record, dict):
            raise _bad(f"{where}: not a map but a {_kind_of(raw_record)}")
        record = {_SENML_CBOR_LABELS.get(k, k): v for k, v in raw_record.items()} if cbor else raw_record
        for key in record:
            if isinstance(key, str) and key.endswith("_"):
                raise _bad(f"{where}: must-understand label {key!r} is not supported (RFC 8428 §4.4)")
        if "bv" in record:
            raise _bad(f"{where}: base values (bv) are not supported")
        if "bn" in record:
            if not isinstance(record["bn"], str):
                raise _bad(f"{where}: bn is a {_kind_of(record['bn'])}, not a string")
            bn = record["bn"]
        n = record.get("n", "")
        if not isinstance(n, str):
            raise _bad(f"{where}: n is a {_kind_of(n)}, not a string")
        fields = [key for key in _SENML_FIELDS if key in record]
        path = _resolve(_join(bn, n), base, where)
        where = f"{fmt} {format_path(path)}"
        if len(fields) != 1:
            raise _bad(f"{where}: a record needs exactly one of v, vs, vb, vd, vlo (has {fields or 'none'})")
        key = fields[0]
        out.append(Entry(path, _typed(_SENML_FIELDS[key], record[key], types.type_of(path[:3]), where)))
    return out


def _senml_value(value: Value) -> tuple[str, object]:
    if isinstance(value, bool):
        return "vb", value
    if isinstance(value, int | float):
        return "v", value
    if isinstance(value, Time):
        return "v", value.seconds
    if isinstance(value, str):
        return "vs", value
    if isinstance(value, bytes):
        return "vd", value
    return "vlo", str(value)


def decode_senml_json(data: bytes, base: Path, types: TypeLookup) -> list[Entry]:
    """The entries of a SenML JSON pack (RFC 8428 §5, LwM2M 1.1 Core §7.4)."""
    return _senml_records(_load_json(data, "SenML JSON"), base, types, "SenML JSON", cbor=False)


def encode_senml_json(entries: list[Entry], base: Path) -> bytes:
    """A SenML JSON pack: ``bn`` on the first record, names relative to it, ``vd`` base64url unpadded."""
    _check_entries(entries, base, "SenML JSON", finite=True)
    bn, names = _names(entries, base)
    records: list[dict[str, object]] = []
    for entry, name in zip(entries, names, strict=True):
        field, raw = _senml_value(entry.value)
        if isinstance(raw, bytes):
            raw = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
        record: dict[str, object] = {"bn": bn} if not records else {}
        record["n"] = name
        record[field] = raw
        records.append(record)
    return _dump_json(records, "SenML JSON")


def decode_senml_cbor(data: bytes, base: Path, types: TypeLookup) -> list[Entry]:
    """The entries of a SenML CBOR pack (RFC 8428 §6: integer labels, ``vd`` a byte string)."""
    return _senml_records(_load_cbor(data, "SenML CBOR"), base, types, "SenML CBOR", cbor=True)


def encode_senml_cbor(entries: list[Entry], base: Path) -> bytes:
    """A SenML CBOR pack with the integer labels of RFC 8428 §6 (``"vlo"`` stays a text label)."""
    _check_entries(entries, base, "SenML CBOR")
    bn, names = _names(entries, base)
    records: list[dict[object, object]] = []
    for entry, name in zip(entries, names, strict=True):
        field, raw = _senml_value(entry.value)
        record: dict[object, object] = {_SENML_CBOR_KEYS["bn"]: bn} if not records else {}
        record[_SENML_CBOR_KEYS["n"]] = name
        record[_SENML_CBOR_KEYS.get(field, field)] = raw
        records.append(record)
    return _dump_cbor(records, "SenML CBOR")


# --- LwM2M JSON (11543)


def decode_lwm2m_json(data: bytes, base: Path, types: TypeLookup) -> list[Entry]:
    """The entries of a LwM2M JSON payload ``{"bn": "/3/0/", "e": [{"n": "0", "sv": ...}, ...]}``
    (LwM2M 1.0 §6.4.4): ``v`` numbers, ``sv`` strings (base64 for Opaque), ``bv`` booleans, ``ov`` links."""
    fmt = "LwM2M JSON"
    obj = _load_json(data, fmt)
    if not isinstance(obj, dict):
        raise _bad(f"{fmt}: expects an object with bn and e, got a {_kind_of(obj)}")
    bn = obj.get("bn", "")
    if not isinstance(bn, str):
        raise _bad(f"{fmt}: bn is a {_kind_of(bn)}, not a string")
    records = obj.get("e")
    if not isinstance(records, list):
        raise _bad(f"{fmt}: e must be an array of records, got a {_kind_of(records)}")
    out: list[Entry] = []
    for index, record in enumerate(records):
        where = f"{fmt} record {index}"
        if not isinstance(record, dict):
            raise _bad(f"{where}: not an object but a {_kind_of(record)}")
        n = record.get("n", "")
        if not isinstance(n, str):
            raise _bad(f"{where}: n is a {_kind_of(n)}, not a string")
        path = _resolve(_join(bn, n), base, where)
        where = f"{fmt} {format_path(path)}"
        fields = [key for key in _LWM2M_JSON_FIELDS if key in record]
        if len(fields) != 1:
            raise _bad(f"{where}: a record needs exactly one of v, sv, bv, ov (has {fields or 'none'})")
        key = fields[0]
        out.append(Entry(path, _typed(_LWM2M_JSON_FIELDS[key], record[key], types.type_of(path[:3]), where)))
    return out


def encode_lwm2m_json(entries: list[Entry], base: Path) -> bytes:
    """A LwM2M JSON payload; Opaque goes base64 in ``sv`` and Time as ``v`` seconds (LwM2M 1.0 §6.4.4)."""
    fmt = "LwM2M JSON"
    _check_entries(entries, base, fmt, finite=True)
    bn, names = _names(entries, base)
    records: list[dict[str, object]] = []
    for entry, name in zip(entries, names, strict=True):
        value = entry.value
        record: dict[str, object] = {"n": name}
        if isinstance(value, bool):
            record["bv"] = value
        elif isinstance(value, int | float):
            record["v"] = value
        elif isinstance(value, Time):
            record["v"] = value.seconds
        elif isinstance(value, str):
            record["sv"] = value
        elif isinstance(value, bytes):
            record["sv"] = base64.b64encode(value).decode("ascii")
        else:
            record["ov"] = str(value)
        records.append(record)
    return _dump_json({"bn": bn, "e": records}, fmt)


# --- LwM2M CBOR (11544) and plain CBOR (60)


def _lwm2m_cbor_walk(
    node: dict[object, object], prefix: Path, base: Path, types: TypeLookup, out: list[Entry]
) -> None:
    for key, value in node.items():
        ids: list[int] = []
        for part in key if isinstance(key, tuple) and key else (key,):
            if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part <= 0xFFFF:
                where = f"LwM2M CBOR: key {key!r} under {format_path(prefix)}"
                raise _bad(f"{where} is not an id or an array of ids")
            ids.append(part)
        path = (*prefix, *ids)
        if len(path) > 4:
            raise _bad(f"LwM2M CBOR: {format_path(path)} is deeper than a resource instance")
        if isinstance(value, dict):
            _lwm2m_cbor_walk(value, path, base, types, out)
            continue
        if value is None:
            continue  # no value (LwM2M 1.2 uses null to mean "none" in composite operations)
        where = f"LwM2M CBOR {format_path(path)}"
        if len(path) < 3:
            raise _bad(f"{where}: a value above resource level")
        if path[: len(base)] != base:
            raise _bad(f"{where}: outside the requested {format_path(base)}")
        out.append(Entry(path, _cbor_leaf(value, types.type_of(path[:3]), where)))


def decode_lwm2m_cbor(data: bytes, base: Path, types: TypeLookup) -> list[Entry]:
    """The entries of a LwM2M CBOR payload: nested maps from the root, ``{3: {0: {0: "x", 6: {0: 1}}}}``,
    whose keys are ids or arrays of ids (``{[3, 0, 9]: 100}``); null values are skipped."""
    obj = _load_cbor(data, "LwM2M CBOR")
    if not isinstance(obj, dict):
        raise _bad(f"LwM2M CBOR: expects a map, got a {_kind_of(obj)}")
    out: list[Entry] = []
    _lwm2m_cbor_walk(obj, (), base, types, out)
    return out


def encode_lwm2m_cbor(entries: list[Entry], base: Path) -> bytes:
    """A LwM2M CBOR payload of nested maps keyed by single ids from the root."""
    fmt = "LwM2M CBOR"
    _check_entries(entries, base, fmt)
    tree: dict[int, object] = {}
    for entry in entries:
        node = tree
        for part in entry.path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise _bad(f"{fmt}: {format_path(entry.path[:3])} is given both a value and instances")
            node = child
        if entry.path[-1] in node:
            raise _bad(f"{fmt}: {format_path(entry.path)} is given twice or with instances")
        node[entry.path[-1]] = _cbor_native(entry.value)
    return _dump_cbor(tree, fmt)


def decode_cbor_value(data: bytes, path: Path, types: TypeLookup) -> Value:
    """One CBOR-encoded value (Content-Format 60) of the resource at ``path``."""
    return _cbor_leaf(_load_cbor(data, "CBOR"), types.type_of(path[:3]), f"CBOR {format_path(path)}")


def encode_cbor_value(value: Value, path: Path) -> bytes:
    """One value as CBOR (Content-Format 60): Time as integer seconds, Objlnk as ``"obj:inst"``."""
    return _dump_cbor(_cbor_native(value), f"CBOR {format_path(path)}")
