"""LwM2M management through MQTT JSON commands, pure: a command becomes a CoAP request to the device and its
answer a JSON response (OMA-TS-LightweightM2M-1.1 Core §6.3, §6.4; the EMQX LwM2M gateway's JSON format).

A command is ``{"reqID": ..., "msgType": ..., "data": {...}}`` on ``lwm2m/{ep}/dn``. The response echoes every
top-level field of the command and replaces ``data`` with ``{"reqPath", "code", "codeMsg", "content"?}``;
``code`` is the CoAP code (``"2.05"``) and ``codeMsg`` its name (``"content"``). Errors in the command itself
are answered the same way with ``code`` 4.00 and an ``error`` text naming the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from core.errors import MalformedPacket
from gateways.coap.blockwise import Block2Download
from gateways.coap.codec import CoapMessage, encode_uint
from gateways.coap.numbers import Code, ContentFormat, OptionNumber
from gateways.lwm2m.content import TypeLookup, decode_content, encode_content, value_from_json, value_to_json
from gateways.lwm2m.model import Entry, Path, ResourceType, format_path, parse_path

__all__ = [
    "COMMAND_TYPES",
    "Command",
    "CommandError",
    "code_message",
    "error_response",
    "parse_command",
    "response_for",
    "timeout_response",
]

COMMAND_TYPES = (
    "read",
    "discover",
    "write",
    "write-attr",
    "execute",
    "create",
    "delete",
    "observe",
    "cancel-observe",
)
_BAD_REQUEST = int(Code.BAD_REQUEST)
_TLV = int(ContentFormat.LWM2M_TLV)
_LINK_FORMAT = int(ContentFormat.LINK_FORMAT)
_WRITE_FORMATS = (
    int(ContentFormat.LWM2M_TLV),
    int(ContentFormat.SENML_JSON),
    int(ContentFormat.SENML_CBOR),
    int(ContentFormat.LWM2M_JSON),
)
_ATTRIBUTES = ("pmin", "pmax", "gt", "lt", "st", "epmin", "epmax")


class CommandError(Exception):
    """A command that cannot be carried out; answered on up/resp with 4.00 and the reason."""


@dataclass(slots=True)
class Command:
    """A parsed command: the original JSON object, its path, and the CoAP request it becomes."""

    fields: dict[str, Any]
    msg_type: str
    path: Path
    request: CoapMessage
    accept: int | None = None
    answered: bool = False  # an observe's first response came: what follows are notifications
    download: Block2Download | None = None  # a response coming in Block2 blocks (RFC 7959 §2.3)
    notification: Block2Download | None = None  # a notification coming in blocks (§2.6), being fetched

    @property
    def req_path(self) -> str:
        return format_path(self.path)


def code_message(code: int) -> str:
    """``"content"`` for 2.05, ``"not_found"`` for 4.04, ... (the EMQX codeMsg)."""
    try:
        return Code(code).name.lower()
    except ValueError:
        return "unknown"


def _path(data: dict[str, Any], key: str) -> Path:
    value = data.get(key)
    if not isinstance(value, str):
        raise CommandError(f'data.{key} must be a path string like "/3/0/1"')
    try:
        return parse_path(value)
    except MalformedPacket as exc:
        raise CommandError(str(exc)) from None


def _uri(path: Path, alternate_path: str) -> list[tuple[int, bytes]]:
    segments = [s for s in alternate_path.split("/") if s] + [str(p) for p in path]
    return [(int(OptionNumber.URI_PATH), s.encode()) for s in segments]


def _typed_entries(base: Path, items: Any, types: TypeLookup, *, relative: bool) -> list[Entry]:
    if not isinstance(items, list) or not items:
        raise CommandError("data.content must be a non-empty list of {path, type?, value}")
    entries = []
    for item in items:
        if not isinstance(item, dict) or "path" not in item or "value" not in item:
            raise CommandError("every content item needs a path and a value")
        text = str(item["path"])
        try:
            path = base + parse_path(text) if relative and not text.startswith("/") else parse_path(text)
        except MalformedPacket as exc:
            raise CommandError(str(exc)) from None
        entries.append(Entry(path, _typed_value(path, item, types)))
    return entries


def _typed_value(path: Path, item: dict[str, Any], types: TypeLookup) -> Any:
    rtype: ResourceType | None = None
    if "type" in item:
        try:
            rtype = ResourceType.parse(str(item["type"]))
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    else:
        rtype = types.type_of(path)
    try:
        return value_from_json(item["value"], rtype, path)
    except MalformedPacket as exc:
        raise CommandError(f"{format_path(path)}: {exc}") from None


def parse_command(
    payload: bytes,
    types: TypeLookup,
    *,
    alternate_path: str = "/",
    preferred_format: int | None = None,
) -> Command:
    """Parse a command and build its CoAP request (without message id and token)."""
    try:
        fields = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CommandError(f"not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise CommandError("a command is a JSON object")
    msg_type = fields.get("msgType")
    if msg_type not in COMMAND_TYPES:
        raise CommandError(f"msgType must be one of {', '.join(COMMAND_TYPES)}")
    data = fields.get("data")
    if not isinstance(data, dict):
        raise CommandError("data must be an object")
    accept = preferred_format if preferred_format in _WRITE_FORMATS else None
    write_format = preferred_format if preferred_format in _WRITE_FORMATS else _TLV
    options: list[tuple[int, bytes]] = []
    payload_out = b""
    code: int
    if msg_type in ("write", "create") and "basePath" in data:
        path = _path(data, "basePath")
        entries = _typed_entries(path, data.get("content"), types, relative=True)
        # create and partial writes of an instance are POST; a resource write replaces it with PUT (§6.3.3)
        code = int(Code.PUT) if msg_type == "write" and len(path) >= 3 else int(Code.POST)
        payload_out = _encode(write_format, entries, path)
        options.append((int(OptionNumber.CONTENT_FORMAT), encode_uint(write_format)))
    else:
        path = _path(data, "path")
        if msg_type == "read" or msg_type in ("observe", "cancel-observe"):
            code = int(Code.GET)
            if msg_type != "read":
                options.append((int(OptionNumber.OBSERVE), encode_uint(0 if msg_type == "observe" else 1)))
            if accept is not None:
                options.append((int(OptionNumber.ACCEPT), encode_uint(accept)))
        elif msg_type == "discover":
            code = int(Code.GET)
            accept = _LINK_FORMAT
            options.append((int(OptionNumber.ACCEPT), encode_uint(_LINK_FORMAT)))
        elif msg_type == "write":
            if "value" not in data:
                raise CommandError("data.value is missing")
            entry = Entry(path, _typed_value(path, data, types))
            code = int(Code.PUT)
            payload_out = _encode(write_format, [entry], path)
            options.append((int(OptionNumber.CONTENT_FORMAT), encode_uint(write_format)))
        elif msg_type == "write-attr":
            code = int(Code.PUT)
            queries = []
            for name in _ATTRIBUTES:
                if name in data:
                    value = data[name]
                    if isinstance(value, bool) or not isinstance(value, int | float | str):
                        raise CommandError(f"data.{name} must be a number")
                    queries.append(f"{name}={value}")
            if not queries:
                raise CommandError("write-attr needs at least one of " + ", ".join(_ATTRIBUTES))
            query = int(OptionNumber.URI_QUERY)
            options.extend((query, _utf8(q, "data." + q.partition("=")[0])) for q in queries)
        elif msg_type == "execute":
            code = int(Code.POST)
            args = data.get("args", "")
            if not isinstance(args, str):
                raise CommandError("data.args must be a string")
            payload_out = _utf8(args, "data.args")
            if payload_out:
                options.append((int(OptionNumber.CONTENT_FORMAT), encode_uint(int(ContentFormat.TEXT_PLAIN))))
        else:  # delete, or create without basePath
            if msg_type == "create":
                raise CommandError("create needs data.basePath and data.content")
            code = int(Code.DELETE)
    request = CoapMessage(0, code, 0, b"", _uri(path, alternate_path) + options, payload_out)
    return Command(fields, msg_type, path, request, accept)


def _encode(content_format: int, entries: list[Entry], base: Path) -> bytes:
    try:
        return encode_content(content_format, entries, base)
    except MalformedPacket as exc:
        raise CommandError(f"cannot encode the value: {exc}") from None


def _envelope(command_fields: dict[str, Any], msg_type: str, data: dict[str, Any]) -> bytes:
    body = {**command_fields, "msgType": msg_type, "data": data}
    return _dumps(body)


def _utf8(text: str, what: str) -> bytes:
    """``text`` in UTF-8; a lone surrogate (JSON's ``"\\ud800"`` escapes decode to one) is a CommandError."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise CommandError(f"{what} is not valid Unicode text (lone surrogate)") from None


def _dumps(body: dict[str, Any], **kwargs: Any) -> bytes:
    """Compact JSON in UTF-8. Echoed fields may hold lone surrogates (from ``"\\ud800"`` escapes in the
    command): those are escaped again (ASCII JSON) instead of failing to encode."""
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False, **kwargs).encode()
    except UnicodeEncodeError:
        return json.dumps(body, separators=(",", ":"), **kwargs).encode()


def response_for(command: Command, response: CoapMessage, types: TypeLookup) -> bytes:
    """The up/resp JSON for the device's answer to ``command``."""
    data: dict[str, Any] = {
        "reqPath": command.req_path,
        "code": f"{response.code >> 5}.{response.code & 0x1F:02d}",
        "codeMsg": code_message(response.code),
    }
    if response.code == int(Code.CONTENT) and command.msg_type != "cancel-observe":
        data["content"] = content_of(command, response, types)
    elif response.payload and response.code >= 128:
        data["error"] = response.payload.decode(errors="replace")
    return _envelope(command.fields, command.msg_type, data)


def notify_message(command: Command, response: CoapMessage, types: TypeLookup) -> bytes:
    """The up/notify JSON of one notification (RFC 7641 §4.2); ``seqNum`` is its Observe number."""
    data: dict[str, Any] = {
        "reqPath": command.req_path,
        "code": f"{response.code >> 5}.{response.code & 0x1F:02d}",
        "codeMsg": code_message(response.code),
    }
    if response.code == int(Code.CONTENT):
        data["content"] = content_of(command, response, types)
    body = {**command.fields, "msgType": "notify", "seqNum": response.observe(), "data": data}
    return _dumps(body)


def content_of(command: Command, response: CoapMessage, types: TypeLookup) -> Any:
    """Decoded content: link strings for discover, else ``[{"path", "value"}]`` typed by the definitions."""
    content_format = response.content_format()
    if command.msg_type == "discover" or content_format == _LINK_FORMAT:
        return [link for link in response.payload.decode(errors="replace").split(",") if link]
    try:
        entries = decode_content(content_format, response.payload, command.path, types)
    except MalformedPacket as exc:
        return {"error": str(exc), "raw": response.payload.hex()}
    return [
        {"path": format_path(e.path), "value": value_to_json(e.value, types.type_of(e.path))} for e in entries
    ]


def timeout_response(command: Command) -> bytes:
    """What up/resp says when the device never answered (EMQX 5's coap_timeout), or stopped answering in the
    middle of a block-wise response."""
    error = "no answer from the device"
    if command.download is not None:
        error += f" to the request for block {command.download.blocks} of its response"
    data = {"reqPath": command.req_path, "code": "5.04", "codeMsg": "timeout", "error": error}
    return _envelope(command.fields, command.msg_type, data)


def error_response(payload: bytes, reason: str) -> bytes:
    """The up/resp JSON for a command that could not be parsed or carried out."""
    try:
        fields = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        fields = {}
    if not isinstance(fields, dict):
        fields = {}
    data = fields.get("data")
    req_path = data.get("path") or data.get("basePath") if isinstance(data, dict) else None
    body = {
        **fields,
        "data": {"reqPath": req_path, "code": "4.00", "codeMsg": "bad_request", "error": reason},
    }
    return _dumps(body, default=str)
