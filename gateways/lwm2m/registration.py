"""LwM2M registration interface, pure: Register, Update and De-register requests parsed and checked
(OMA-TS-LightweightM2M-1.1 Core §6.2.1-§6.2.3, Transport §5.3 / 1.0 TS §5.3).

``POST /rd?ep=&lt=&lwm2m=&b=&sms=&Q`` carries a link-format object list (RFC 6690) that may start with the
root ``</>;rt="oma.lwm2m";ct=...`` naming an alternate path and the device's preferred content format, and
lists objects with ``;ver=`` when they are not version 1.0. Link-format is parsed by aiocoap's parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from aiocoap.util import linkformat  # type: ignore[import-untyped]

from core.errors import MalformedPacket

__all__ = [
    "ObjectLink",
    "RegisterRequest",
    "UpdateRequest",
    "parse_object_links",
    "parse_register",
    "parse_update",
]

BAD_REQUEST = 0x80  # 4.00
PRECONDITION_FAILED = 0x8C  # 4.12
SUPPORTED_VERSIONS = ("1.0", "1.1", "1.2")
DEFAULT_LIFETIME = 86400
_BINDING_LETTERS = frozenset("UTSNQ")


@dataclass(frozen=True, slots=True)
class ObjectLink:
    """One entry of the object list: ``/3`` or ``/3/0``, with its version when stated."""

    path: tuple[int, ...]
    version: str | None = None

    def __str__(self) -> str:
        return "/" + "/".join(str(p) for p in self.path)


@dataclass(slots=True)
class RegisterRequest:
    """A checked Register request (§6.2.1)."""

    endpoint: str
    lifetime: int = DEFAULT_LIFETIME
    version: str = "1.0"
    binding: str = "U"
    sms: str | None = None
    queue_mode: bool = False
    alternate_path: str = "/"
    content_format: int | None = None
    objects: list[ObjectLink] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class UpdateRequest:
    """A checked Update request (§6.2.2): only what changed is present."""

    lifetime: int | None = None
    binding: str | None = None
    sms: str | None = None
    queue_mode: bool | None = None
    objects: list[ObjectLink] | None = None
    alternate_path: str | None = None
    content_format: int | None = None


def _query(items: list[str]) -> dict[str, str]:
    query: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not name:
            raise MalformedPacket(f"malformed query option {item!r}", BAD_REQUEST)
        query[name] = unquote(value) if eq else ""
    return query


def _lifetime(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise MalformedPacket(f"lifetime {text!r} is not an integer", BAD_REQUEST) from None
    if value <= 0:
        raise MalformedPacket(f"lifetime {value} must be positive", BAD_REQUEST)
    return value


def _binding(text: str) -> str:
    if not text or not set(text) <= _BINDING_LETTERS:
        raise MalformedPacket(f"binding {text!r} is not made of U, T, S, N, Q", BAD_REQUEST)
    return text


def parse_object_links(payload: bytes) -> tuple[list[ObjectLink], str | None, int | None]:
    """The object list, the alternate path (from ``rt="oma.lwm2m"``) and the root's ``ct``, if any."""
    if not payload.strip():
        return [], None, None
    try:
        text = payload.decode()
        links = linkformat.parse(text).links
    except (UnicodeDecodeError, ValueError, linkformat.link_header.ParseException) as exc:
        # aiocoap's link-format parser raises its own ParseException (not a ValueError) for bad syntax
        raise MalformedPacket(f"object list is not link-format: {exc}", BAD_REQUEST) from None
    objects: list[ObjectLink] = []
    alternate: str | None = None
    content_format: int | None = None
    for link in links:
        attrs = {name: value for name, value in link.attr_pairs}
        href = link.href
        if attrs.get("rt") == "oma.lwm2m":
            alternate = href.rstrip("/") or "/"
            if "ct" in attrs:
                try:
                    content_format = int(attrs["ct"].split()[0].strip('"'))
                except ValueError:
                    raise MalformedPacket(f"ct {attrs['ct']!r} is not a number", BAD_REQUEST) from None
            continue
        relative = href
        if alternate not in (None, "/") and href.startswith(alternate + "/"):
            relative = href[len(alternate) :]
        parts = [p for p in relative.split("/") if p]
        try:
            path = tuple(int(p) for p in parts)
        except ValueError:
            raise MalformedPacket(f"object link {href!r} is not /object[/instance]", BAD_REQUEST) from None
        if not 1 <= len(path) <= 2:
            raise MalformedPacket(f"object link {href!r} is not /object[/instance]", BAD_REQUEST)
        objects.append(ObjectLink(path, attrs.get("ver")))
    return objects, alternate, content_format


def parse_register(query_items: list[str], payload: bytes) -> RegisterRequest:
    """Check a Register request: 4.00 for a missing endpoint or bad values, 4.12 for another version."""
    query = _query(query_items)
    endpoint = query.pop("ep", "")
    if not endpoint:
        raise MalformedPacket("missing endpoint name (ep)", BAD_REQUEST)
    version = query.pop("lwm2m", "1.0")
    if version == "1":
        version = "1.0"
    if version not in SUPPORTED_VERSIONS:
        raise MalformedPacket(f"LwM2M version {version!r} not supported", PRECONDITION_FAILED)
    request = RegisterRequest(endpoint, version=version)
    if "lt" in query:
        request.lifetime = _lifetime(query.pop("lt"))
    if "b" in query:
        request.binding = _binding(query.pop("b"))
    request.sms = query.pop("sms", None)
    request.queue_mode = "Q" in request.binding or "Q" in query
    query.pop("Q", None)
    objects, alternate, content_format = parse_object_links(payload)
    request.objects = objects
    request.alternate_path = alternate or "/"
    request.content_format = content_format
    request.extra = query
    return request


def parse_update(query_items: list[str], payload: bytes) -> UpdateRequest:
    """Check an Update request (§6.2.2); unknown parameters are ignored."""
    query = _query(query_items)
    update = UpdateRequest()
    if "lt" in query:
        update.lifetime = _lifetime(query["lt"])
    if "b" in query:
        update.binding = _binding(query["b"])
        update.queue_mode = "Q" in update.binding
    if "Q" in query:
        update.queue_mode = True
    update.sms = query.get("sms")
    if payload.strip():
        objects, alternate, content_format = parse_object_links(payload)
        update.objects = objects
        update.alternate_path = alternate
        update.content_format = content_format
    return update
