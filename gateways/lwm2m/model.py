"""The LwM2M data model shared by the codecs and the command layer (OMA LwM2M 1.1 TS Core §6, §7.4).

A value read from or written to a device is an :class:`Entry`: a path (object, instance, resource, resource
instance) and a typed value. Types follow the resource definitions of the object's XML (OMA-TS §C): integers
are signed 64-bit, unsigned integers up to 2**64-1, floats 32/64-bit, time is signed seconds since the epoch,
object links are ``obj:inst``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias

from core.errors import MalformedPacket

__all__ = ["Entry", "ObjLink", "Path", "ResourceType", "Time", "Value", "format_path", "parse_path"]

Path: TypeAlias = tuple[int, ...]

_BAD_REQUEST = 0x80  # CoAP 4.00


class ResourceType(Enum):
    """Resource data types (OMA LwM2M 1.1 TS Core Appendix C)."""

    STRING = "String"
    INTEGER = "Integer"
    UNSIGNED_INTEGER = "Unsigned Integer"
    FLOAT = "Float"
    BOOLEAN = "Boolean"
    OPAQUE = "Opaque"
    TIME = "Time"
    OBJLNK = "Objlnk"
    CORELNK = "Corelnk"
    NONE = "none"  # executable resources

    @classmethod
    def parse(cls, text: str) -> ResourceType:
        """The type named in an object definition (case-insensitive; empty for executables)."""
        wanted = text.strip().lower()
        for member in cls:
            if member.value.lower() == wanted:
                return member
        if not wanted:
            return cls.NONE
        raise ValueError(f"unknown resource type {text!r}")


@dataclass(frozen=True, slots=True)
class ObjLink:
    """An object link value ``obj:inst`` (Appendix C)."""

    object_id: int
    instance_id: int

    def __str__(self) -> str:
        return f"{self.object_id}:{self.instance_id}"

    @classmethod
    def parse(cls, text: str) -> ObjLink:
        try:
            obj, _, inst = text.partition(":")
            return cls(int(obj), int(inst))
        except ValueError:
            raise MalformedPacket(f"object link {text!r} is not obj:inst", _BAD_REQUEST) from None


@dataclass(frozen=True, slots=True)
class Time:
    """A Time value: signed seconds since 1970-01-01 (kept apart from Integer so it encodes as Time)."""

    seconds: int


Value: TypeAlias = int | float | bool | str | bytes | ObjLink | Time


@dataclass(frozen=True, slots=True)
class Entry:
    """One resource (or resource instance) value at ``path``."""

    path: Path
    value: Value


def parse_path(text: str) -> Path:
    """``"/3/0/1"`` to ``(3, 0, 1)``; raises MalformedPacket (4.00) for anything else."""
    parts = [p for p in text.strip().split("/") if p != ""]
    if not 1 <= len(parts) <= 4 and text.strip() != "/":
        raise MalformedPacket(f"path {text!r} must have 1 to 4 levels", _BAD_REQUEST)
    try:
        path = tuple(int(p) for p in parts)
    except ValueError:
        raise MalformedPacket(f"path {text!r} is not numeric", _BAD_REQUEST) from None
    if any(not 0 <= p <= 65535 for p in path):
        raise MalformedPacket(f"path {text!r} has an id outside 0..65535", _BAD_REQUEST)
    return path


def format_path(path: Path) -> str:
    return "/" + "/".join(str(p) for p in path)
