"""LwM2M object definitions: the OMA object XML (OMA-TS-LightweightM2M_Core 1.1 Appendix D, schema LWM2M.xsd).

The gateway types the values it decodes and encodes from these definitions: a resource's Type (Appendix C)
decides how a TLV or text payload is read. Definitions of objects 0-7 (Appendix E) and common IPSO objects
ship in ``fixtures/lwm2m/``; more are loaded from a directory of registry XML files. An object without a
definition still works: :meth:`ObjectRegistry.type_of` answers None and values stay untyped.

:func:`parse_object_xml` is pure (bytes in, definitions out) and raises ``ValueError`` naming the problem for
a file that is not an object definition. :meth:`ObjectRegistry.load_dir` is the only code here that reads
files; it skips a bad file with a warning naming it.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path as FsPath

from gateways.lwm2m.model import Path, ResourceType

__all__ = ["DEFAULT_DIR", "ObjectDef", "ObjectRegistry", "ResourceDef", "parse_object_xml"]

log = logging.getLogger("mqgate.lwm2m")

DEFAULT_DIR = FsPath(__file__).resolve().parents[2] / "fixtures" / "lwm2m"
"""Where the shipped definitions live (a source checkout or an editable install)."""

_OPERATIONS = frozenset({"", "R", "W", "RW", "E"})
_MAX_ID = 65535


@dataclass(frozen=True, slots=True)
class ResourceDef:
    """One ``<Item>`` of an object definition (Appendix D.1)."""

    id: int
    name: str
    operations: str  # "R", "W", "RW", "E" or "" (none: the Security object's resources)
    multiple: bool
    mandatory: bool
    type: ResourceType

    @property
    def readable(self) -> bool:
        return "R" in self.operations

    @property
    def writable(self) -> bool:
        return "W" in self.operations

    @property
    def executable(self) -> bool:
        return self.operations == "E"


@dataclass(frozen=True, slots=True)
class ObjectDef:
    """One ``<Object ObjectType="MODefinition">`` (Appendix D.1); ``resources`` is keyed by resource id."""

    id: int
    name: str
    urn: str
    version: str
    lwm2m_version: str
    multiple: bool
    mandatory: bool
    resources: dict[int, ResourceDef] = field(hash=False)


def _local(tag: object) -> str:
    """An element's name without its ``{namespace}``; comments and processing instructions give ``""``."""
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _children(element: ET.Element) -> dict[str, ET.Element]:
    children: dict[str, ET.Element] = {}
    for child in element:
        children.setdefault(_local(child.tag), child)
    return children


def _text(children: dict[str, ET.Element], name: str, where: str, *, default: str | None = None) -> str:
    element = children.get(name)
    if element is None:
        if default is None:
            raise ValueError(f"{where}: missing <{name}>")
        return default
    return (element.text or "").strip()


def _int_id(text: str, what: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an integer") from None
    if not 0 <= value <= _MAX_ID:
        raise ValueError(f"{what} {value} is outside 0..{_MAX_ID}")
    return value


def _multiple(text: str, where: str) -> bool:
    match text.lower():
        case "multiple":
            return True
        case "single":
            return False
    raise ValueError(f"{where}: <MultipleInstances> is {text!r}, not Single or Multiple")


def _mandatory(text: str, where: str) -> bool:
    match text.lower():
        case "mandatory":
            return True
        case "optional":
            return False
    raise ValueError(f"{where}: <Mandatory> is {text!r}, not Mandatory or Optional")


def _resource(item: ET.Element, where: str) -> ResourceDef:
    raw_id = item.get("ID")
    if raw_id is None:
        raise ValueError(f"{where}: <Item> without an ID attribute")
    rid = _int_id(raw_id, f"{where}: resource ID")
    where = f"{where} resource {rid}"
    children = _children(item)
    name = _text(children, "Name", where)
    operations = _text(children, "Operations", where, default="").upper()
    if operations not in _OPERATIONS:
        raise ValueError(f"{where}: <Operations> is {operations!r}, not one of R, W, RW, E or empty")
    type_text = _text(children, "Type", where, default="")
    try:
        rtype = ResourceType.parse(type_text)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return ResourceDef(
        id=rid,
        name=name,
        operations=operations,
        multiple=_multiple(_text(children, "MultipleInstances", where, default="Single"), where),
        mandatory=_mandatory(_text(children, "Mandatory", where, default="Optional"), where),
        type=rtype,
    )


def _object(element: ET.Element) -> ObjectDef:
    children = _children(element)
    oid = _int_id(_text(children, "ObjectID", "<Object>"), "ObjectID")
    where = f"object {oid}"
    resources: dict[int, ResourceDef] = {}
    container = children.get("Resources")
    if container is not None:
        for item in container:
            if _local(item.tag) != "Item":
                continue
            resource = _resource(item, where)
            if resource.id in resources:
                raise ValueError(f"{where}: resource {resource.id} is defined twice")
            resources[resource.id] = resource
    return ObjectDef(
        id=oid,
        name=_text(children, "Name", where),
        urn=_text(children, "ObjectURN", where, default=""),
        version=_text(children, "ObjectVersion", where, default="") or "1.0",
        lwm2m_version=_text(children, "LWM2MVersion", where, default="") or "1.0",
        multiple=_multiple(_text(children, "MultipleInstances", where, default="Single"), where),
        mandatory=_mandatory(_text(children, "Mandatory", where, default="Optional"), where),
        resources=resources,
    )


def parse_object_xml(data: bytes | str) -> list[ObjectDef]:
    """Every ``<Object>`` in an object definition file (Appendix D; usually one per file).

    Namespaces and ``xsi:`` attributes are ignored. Entity declarations are refused: registry files have
    none and they are the way to make a small XML file expand without bound.
    """
    probe = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    if b"<!ENTITY" in probe:
        raise ValueError("entity declarations are not allowed in an object definition")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"not well-formed XML: {exc}") from None
    elements = [e for e in root.iter() if _local(e.tag) == "Object"]
    if not elements:
        raise ValueError(f"no <Object> element (root element is <{_local(root.tag)}>)")
    return [_object(e) for e in elements]


class ObjectRegistry:
    """Object definitions by object id; a later definition of an id replaces the earlier one."""

    __slots__ = ("_objects",)

    def __init__(self, objects: Iterable[ObjectDef] = ()) -> None:
        self._objects: dict[int, ObjectDef] = {}
        for obj in objects:
            self.add(obj)

    def add(self, obj: ObjectDef) -> None:
        self._objects[obj.id] = obj

    def get(self, object_id: int) -> ObjectDef | None:
        return self._objects.get(object_id)

    def resource(self, object_id: int, resource_id: int) -> ResourceDef | None:
        obj = self._objects.get(object_id)
        return None if obj is None else obj.resources.get(resource_id)

    def type_of(self, path: Path) -> ResourceType | None:
        """The type of the resource a path names (``/o/i/r`` or ``/o/i/r/ri``); None for an object or
        instance path and for a resource without a definition."""
        if len(path) < 3:
            return None
        resource = self.resource(path[0], path[2])
        return None if resource is None else resource.type

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._objects

    def __iter__(self) -> Iterator[ObjectDef]:
        return iter(self._objects.values())

    def load_dir(self, path: str | os.PathLike[str]) -> int:
        """Load every ``*.xml`` in ``path`` in file-name order; returns the number of objects loaded.

        A file that cannot be read or is not an object definition is skipped with a warning naming it.
        A directory that does not exist raises ``FileNotFoundError``.
        """
        directory = FsPath(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"LwM2M object definition directory {str(directory)!r} does not exist")
        loaded = 0
        for file in sorted(directory.glob("*.xml")):
            try:
                objects = parse_object_xml(file.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("skipping LwM2M object definition %s: %s", file, exc)
                continue
            for obj in objects:
                self.add(obj)
            loaded += len(objects)
        return loaded

    @classmethod
    def default(cls) -> ObjectRegistry:
        """A registry of the shipped definitions (objects 0-7 and common IPSO objects)."""
        registry = cls()
        try:
            registry.load_dir(DEFAULT_DIR)
        except FileNotFoundError:
            log.warning("shipped LwM2M object definitions missing at %s: values will be untyped", DEFAULT_DIR)
        return registry
