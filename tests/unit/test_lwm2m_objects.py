"""LwM2M object definitions: the shipped XML, the parser and the registry (OMA-TS-LightweightM2M_Core 1.1
Appendix D and E, IPSO objects of the OMA registry).

The shipped definitions were written from the specification; they are checked against the OMA XML files
that the ``emqxlwm2m`` PyPI package ships (objects 0, 1, 2, 3, 5, 6, 7 at their 1.0.x versions) as an
independent source.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from gateways.lwm2m import objects
from gateways.lwm2m.model import ResourceType
from gateways.lwm2m.objects import DEFAULT_DIR, ObjectDef, ObjectRegistry, ResourceDef, parse_object_xml

T = ResourceType
SHIPPED_IDS = {0, 1, 2, 3, 4, 5, 6, 7, 3300, 3301, 3302, 3303, 3304, 3306, 3311, 3316, 3323, 3336, 3342}
SHIPPED_FILES = sorted(DEFAULT_DIR.glob("*.xml"))


@pytest.fixture(scope="module")
def registry() -> ObjectRegistry:
    return ObjectRegistry.default()


def _norm(name: str) -> str:
    return " ".join(name.lower().split())


# --- the shipped files ------------------------------------------------------------------------------------


def test_shipped_directory_holds_one_file_per_expected_object() -> None:
    assert {int(p.stem) for p in SHIPPED_FILES} == SHIPPED_IDS


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.name)
def test_every_shipped_file_parses_to_the_object_its_name_says(path: Path) -> None:
    (obj,) = parse_object_xml(path.read_bytes())
    assert obj.id == int(path.stem)
    assert obj.name and obj.resources
    assert obj.urn.startswith("urn:oma:lwm2m:")
    expected_urn = f":{obj.id}" if obj.version == "1.0" else f":{obj.id}:{obj.version}"
    assert obj.urn.endswith(expected_urn)
    for resource in obj.resources.values():
        # an executable has no type; anything else has one (Appendix D.1)
        assert (resource.type is T.NONE) == resource.executable, resource


def test_default_registry_loads_every_shipped_object(registry: ObjectRegistry) -> None:
    assert {obj.id for obj in registry} == SHIPPED_IDS
    assert len(registry) == len(SHIPPED_IDS)


@pytest.mark.parametrize(
    ("object_id", "multiple", "mandatory"),
    [
        (0, True, True),
        (1, True, True),
        (2, True, False),
        (3, False, True),
        (4, False, False),
        (5, False, False),
        (6, False, False),
        (7, False, False),
        (3303, True, False),
        (3311, True, False),
        (3336, True, False),
    ],
)
def test_object_multiplicity_and_mandatory_flag(
    registry: ObjectRegistry, object_id: int, multiple: bool, mandatory: bool
) -> None:
    obj = registry.get(object_id)
    assert obj is not None
    assert (obj.multiple, obj.mandatory) == (multiple, mandatory)


SPOT_CHECKS: list[tuple[int, int, str, str, bool, bool, ResourceType]] = [
    # (object, resource, name, operations, multiple, mandatory, type)
    (0, 0, "LWM2M Server URI", "", False, True, T.STRING),
    (0, 1, "Bootstrap-Server", "", False, True, T.BOOLEAN),
    (0, 2, "Security Mode", "", False, True, T.INTEGER),
    (0, 3, "Public Key or Identity", "", False, True, T.OPAQUE),
    (0, 10, "Short Server ID", "", False, False, T.INTEGER),
    (0, 16, "DTLS/TLS Ciphersuite", "", True, False, T.UNSIGNED_INTEGER),
    (0, 17, "OSCORE Security Mode", "", False, False, T.OBJLNK),
    (1, 0, "Short Server ID", "R", False, True, T.INTEGER),
    (1, 1, "Lifetime", "RW", False, True, T.INTEGER),
    (1, 4, "Disable", "E", False, False, T.NONE),
    (1, 6, "Notification Storing When Disabled or Offline", "RW", False, True, T.BOOLEAN),
    (1, 7, "Binding", "RW", False, True, T.STRING),
    (1, 8, "Registration Update Trigger", "E", False, True, T.NONE),
    (1, 10, "APN Link", "RW", False, False, T.OBJLNK),
    (1, 12, "Last Bootstrapped", "R", False, False, T.TIME),
    (1, 23, "Mute Send", "RW", False, False, T.BOOLEAN),
    (2, 2, "ACL", "RW", True, False, T.INTEGER),
    (2, 3, "Access Control Owner", "RW", False, True, T.INTEGER),
    (3, 0, "Manufacturer", "R", False, False, T.STRING),
    (3, 4, "Reboot", "E", False, True, T.NONE),
    (3, 5, "Factory Reset", "E", False, False, T.NONE),
    (3, 6, "Available Power Sources", "R", True, False, T.INTEGER),
    (3, 7, "Power Source Voltage", "R", True, False, T.INTEGER),
    (3, 9, "Battery Level", "R", False, False, T.INTEGER),
    (3, 11, "Error Code", "R", True, True, T.INTEGER),
    (3, 13, "Current Time", "RW", False, False, T.TIME),
    (3, 14, "UTC Offset", "RW", False, False, T.STRING),
    (3, 15, "Timezone", "RW", False, False, T.STRING),
    (3, 16, "Supported Binding and Modes", "R", False, True, T.STRING),
    (3, 22, "ExtDevInfo", "R", True, False, T.OBJLNK),
    (4, 0, "Network Bearer", "R", False, True, T.INTEGER),
    (4, 1, "Available Network Bearer", "R", True, True, T.INTEGER),
    (4, 4, "IP Addresses", "R", True, True, T.STRING),
    (4, 7, "APN", "R", True, False, T.STRING),
    (5, 0, "Package", "W", False, True, T.OPAQUE),
    (5, 1, "Package URI", "RW", False, True, T.STRING),
    (5, 2, "Update", "E", False, True, T.NONE),
    (5, 3, "State", "R", False, True, T.INTEGER),
    (5, 8, "Firmware Update Protocol Support", "R", True, False, T.INTEGER),
    (6, 0, "Latitude", "R", False, True, T.FLOAT),
    (6, 4, "Velocity", "R", False, False, T.OPAQUE),
    (6, 5, "Timestamp", "R", False, True, T.TIME),
    (7, 6, "Start", "E", False, True, T.NONE),
    (7, 8, "Collection Period", "RW", False, False, T.INTEGER),
    (3303, 5700, "Sensor Value", "R", False, True, T.FLOAT),
    (3303, 5701, "Sensor Units", "R", False, False, T.STRING),
    (3303, 5601, "Min Measured Value", "R", False, False, T.FLOAT),
    (3303, 5602, "Max Measured Value", "R", False, False, T.FLOAT),
    (3303, 5603, "Min Range Value", "R", False, False, T.FLOAT),
    (3303, 5604, "Max Range Value", "R", False, False, T.FLOAT),
    (3303, 5605, "Reset Min and Max Measured Values", "E", False, False, T.NONE),
    (3303, 5750, "Application Type", "RW", False, False, T.STRING),
    (3303, 5518, "Timestamp", "R", False, False, T.TIME),
    (3304, 5700, "Sensor Value", "R", False, True, T.FLOAT),
    (3300, 5751, "Sensor Type", "R", False, False, T.STRING),
    (3301, 5700, "Sensor Value", "R", False, True, T.FLOAT),
    (3302, 5500, "Digital Input State", "R", False, True, T.BOOLEAN),
    (3302, 5505, "Digital Input Counter Reset", "E", False, False, T.NONE),
    (3306, 5850, "On/Off", "RW", False, True, T.BOOLEAN),
    (3306, 5853, "Muti-state Output", "RW", False, False, T.STRING),
    (3311, 5850, "On/Off", "RW", False, True, T.BOOLEAN),
    (3311, 5851, "Dimmer", "RW", False, False, T.INTEGER),
    (3311, 5852, "On time", "RW", False, False, T.INTEGER),
    (3311, 5805, "Cumulative active power", "R", False, False, T.FLOAT),
    (3311, 5820, "Power factor", "R", False, False, T.FLOAT),
    (3311, 5706, "Colour", "RW", False, False, T.STRING),
    (3311, 5701, "Sensor Units", "R", False, False, T.STRING),
    (3316, 5821, "Current Calibration", "RW", False, False, T.FLOAT),
    (3323, 5700, "Sensor Value", "R", False, True, T.FLOAT),
    (3336, 5514, "Latitude", "R", False, True, T.STRING),
    (3336, 5515, "Longitude", "R", False, True, T.STRING),
    (3336, 5516, "Uncertainty", "R", False, False, T.STRING),
    (3336, 5705, "Compass Direction", "R", False, False, T.FLOAT),
    (3336, 5517, "Velocity", "R", False, False, T.OPAQUE),
    (3336, 5518, "Timestamp", "R", False, False, T.TIME),
    (3336, 5750, "Application Type", "RW", False, False, T.STRING),
    (3342, 5500, "Digital Input State", "R", False, True, T.BOOLEAN),
    (3342, 5854, "Off Time", "RW", False, False, T.INTEGER),
]


@pytest.mark.parametrize(
    ("object_id", "resource_id", "name", "operations", "multiple", "mandatory", "rtype"),
    SPOT_CHECKS,
    ids=[f"{o}/{r}" for o, r, *_ in SPOT_CHECKS],
)
def test_shipped_resource_matches_the_specification(
    registry: ObjectRegistry,
    object_id: int,
    resource_id: int,
    name: str,
    operations: str,
    multiple: bool,
    mandatory: bool,
    rtype: ResourceType,
) -> None:
    resource = registry.resource(object_id, resource_id)
    assert resource is not None
    assert _norm(resource.name) == _norm(name)
    assert (resource.operations, resource.multiple, resource.mandatory, resource.type) == (
        operations,
        multiple,
        mandatory,
        rtype,
    )


@pytest.mark.parametrize(
    ("object_id", "resource_ids"),
    [
        (0, range(18)),
        (1, range(24)),
        (2, range(4)),
        (3, range(23)),
        (4, range(11)),
        (5, [0, 1, 2, 3, 5, 6, 7, 8, 9]),
        (6, range(7)),
        (7, range(9)),
        (3303, [5518, 5601, 5602, 5603, 5604, 5605, 5700, 5701, 5750, 6042, 6049, 6050]),
        (3311, [5701, 5706, 5750, 5805, 5820, 5850, 5851, 5852]),
        (3336, [5514, 5515, 5516, 5517, 5518, 5705, 5750]),
    ],
)
def test_shipped_object_defines_exactly_these_resources(
    registry: ObjectRegistry, object_id: int, resource_ids: range | list[int]
) -> None:
    obj = registry.get(object_id)
    assert obj is not None
    assert sorted(obj.resources) == list(resource_ids)


# --- resource and registry lookups ------------------------------------------------------------------------


def test_resource_def_properties_follow_its_operations() -> None:
    def make(ops: str) -> ResourceDef:
        return ResourceDef(0, "x", ops, False, False, T.NONE if ops == "E" else T.INTEGER)

    assert [(r.readable, r.writable, r.executable) for r in map(make, ["R", "W", "RW", "E", ""])] == [
        (True, False, False),
        (False, True, False),
        (True, True, False),
        (False, False, True),
        (False, False, False),
    ]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ((3,), None),
        ((3, 0), None),
        ((3, 0, 0), T.STRING),
        ((3, 0, 4), T.NONE),
        ((3, 0, 13), T.TIME),
        ((3, 0, 7, 1), T.INTEGER),
        ((3, 0, 22, 0), T.OBJLNK),
        ((1, 0, 1), T.INTEGER),
        ((3303, 2, 5700), T.FLOAT),
        ((3311, 0, 5850), T.BOOLEAN),
        ((3, 0, 99), None),
        ((3, 0, 99, 0), None),
        ((32769, 0, 1), None),
        ((32769,), None),
    ],
)
def test_type_of_a_path(
    registry: ObjectRegistry, path: tuple[int, ...], expected: ResourceType | None
) -> None:
    assert registry.type_of(path) is expected


def test_unknown_object_and_resource_give_none(registry: ObjectRegistry) -> None:
    assert registry.get(32769) is None
    assert 32769 not in registry
    assert registry.resource(32769, 0) is None
    assert registry.resource(3, 9999) is None
    assert 3 in registry


def test_add_replaces_a_definition_with_the_same_id() -> None:
    first = ObjectDef(9000, "A", "", "1.0", "1.0", False, False, {})
    second = ObjectDef(9000, "B", "", "1.0", "1.0", False, False, {})
    reg = ObjectRegistry([first])
    reg.add(second)
    assert reg.get(9000) is second
    assert len(reg) == 1


def test_default_without_the_shipped_directory_warns_and_is_empty(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(objects, "DEFAULT_DIR", tmp_path / "missing")
    with caplog.at_level(logging.WARNING, logger="mqgate.lwm2m"):
        reg = ObjectRegistry.default()
    assert len(reg) == 0
    assert "missing" in caplog.text


# --- the parser -------------------------------------------------------------------------------------------


def _item(rid: str = "0", ops: str = "R", rtype: str = "Integer", multi: str = "Single") -> str:
    return (
        f'<Item ID="{rid}"><Name>R{rid}</Name><Operations>{ops}</Operations>'
        f"<MultipleInstances>{multi}</MultipleInstances><Mandatory>Optional</Mandatory>"
        f"<Type>{rtype}</Type><RangeEnumeration/><Units/><Description/></Item>"
    )


def _object(oid: str = "9000", items: str | None = None, extra: str = "", multi: str = "Multiple") -> str:
    return (
        f'<Object ObjectType="MODefinition"><Name>Obj {oid}</Name><Description1/>'
        f"<ObjectID>{oid}</ObjectID><ObjectURN>urn:oma:lwm2m:x:{oid}</ObjectURN>{extra}"
        f"<MultipleInstances>{multi}</MultipleInstances><Mandatory>Optional</Mandatory>"
        f"<Resources>{_item() if items is None else items}</Resources></Object>"
    )


def _doc(*objects_xml: str) -> bytes:
    return ("<LWM2M>" + "".join(objects_xml) + "</LWM2M>").encode()


def test_parse_reads_several_objects_from_one_file() -> None:
    parsed = parse_object_xml(_doc(_object("9000"), _object("9001", _item("1", "RW", "Float"))))
    assert [o.id for o in parsed] == [9000, 9001]
    assert parsed[1].resources[1] == ResourceDef(1, "R1", "RW", False, False, T.FLOAT)


def test_parse_defaults_versions_to_1_0_when_absent() -> None:
    (obj,) = parse_object_xml(_doc(_object()))
    assert (obj.version, obj.lwm2m_version) == ("1.0", "1.0")
    versions = "<LWM2MVersion>1.1</LWM2MVersion><ObjectVersion>2.0</ObjectVersion>"
    (obj,) = parse_object_xml(_doc(_object(extra=versions)))
    assert (obj.version, obj.lwm2m_version) == ("2.0", "1.1")


def test_parse_ignores_namespaces_and_xsi_attributes() -> None:
    xml = (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<LWM2M xmlns="urn:example:ns" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:noNamespaceSchemaLocation="http://openmobilealliance.org/tech/profiles/LWM2M.xsd">'
        + _object(items=_item("5", "E", ""))
        + "<!-- a comment --></LWM2M>"
    )
    (obj,) = parse_object_xml(xml.encode())
    assert obj.id == 9000
    assert obj.resources[5].executable
    assert obj.resources[5].type is T.NONE


def test_parse_accepts_text_and_sloppy_whitespace_and_case() -> None:
    item = (
        '<Item ID=" 7 "><Name> Level </Name><Operations> rw </Operations>'
        "<MultipleInstances>multiple</MultipleInstances><Mandatory>MANDATORY</Mandatory>"
        "<Type> unsigned integer </Type></Item>"
    )
    (obj,) = parse_object_xml("<LWM2M>" + _object(items=item) + "</LWM2M>")
    assert obj.resources[7] == ResourceDef(7, "Level", "RW", True, True, T.UNSIGNED_INTEGER)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"<LWM2M><Object>", "not well-formed XML"),
        (b"", "not well-formed XML"),
        (b"<LWM2M></LWM2M>", "no <Object> element"),
        (b"<html><body/></html>", "no <Object> element (root element is <html>)"),
        (_doc(_object("abc")), "ObjectID 'abc' is not an integer"),
        (_doc(_object("70000")), "ObjectID 70000 is outside 0..65535"),
        (_doc("<Object><Name>x</Name></Object>"), "missing <ObjectID>"),
        (_doc(_object(items="<Item><Name>x</Name></Item>")), "object 9000: <Item> without an ID attribute"),
        (_doc(_object(items=_item("-1"))), "resource ID -1 is outside"),
        (_doc(_object(items=_item(ops="RWE"))), "object 9000 resource 0: <Operations> is 'RWE'"),
        (_doc(_object(items=_item(rtype="Double"))), "resource 0: unknown resource type 'Double'"),
        (_doc(_object(items=_item(multi="Many"))), "<MultipleInstances> is 'Many'"),
        (_doc(_object(multi="Several")), "object 9000: <MultipleInstances> is 'Several'"),
        (_doc(_object(items=_item("3") + _item("3"))), "object 9000: resource 3 is defined twice"),
        (_doc(_object(items='<Item ID="1"><Operations>R</Operations></Item>')), "resource 1: missing <Name>"),
        (
            b'<!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><LWM2M>&b;</LWM2M>',
            "entity declarations are not allowed",
        ),
    ],
)
def test_parse_rejects_a_bad_definition_with_a_message_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_object_xml(data)


# --- load_dir ---------------------------------------------------------------------------------------------


def test_load_dir_skips_a_bad_file_with_a_warning_and_loads_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a.xml").write_bytes(_doc(_object("9000")))
    (tmp_path / "b.xml").write_bytes(b"<LWM2M><Object><ObjectID>oops")
    (tmp_path / "c.xml").write_bytes(_doc(_object("9001"), _object("9002")))
    (tmp_path / "notes.txt").write_text("not a definition")
    reg = ObjectRegistry()
    with caplog.at_level(logging.WARNING, logger="mqgate.lwm2m"):
        assert reg.load_dir(tmp_path) == 3
    assert sorted(o.id for o in reg) == [9000, 9001, 9002]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "b.xml" in warnings[0].getMessage()
    assert "not well-formed XML" in warnings[0].getMessage()


def test_load_dir_later_file_overrides_an_earlier_id_and_a_shipped_one(tmp_path: Path) -> None:
    custom_device = _object("3", _item("0", "RW", "Opaque"), multi="Single")
    (tmp_path / "10-first.xml").write_bytes(_doc(_object("9000", _item("1", "R", "String"))))
    (tmp_path / "20-second.xml").write_bytes(_doc(_object("9000", _item("1", "R", "Float"))))
    (tmp_path / "30-device.xml").write_bytes(_doc(custom_device))
    reg = ObjectRegistry.default()
    assert reg.type_of((3, 0, 0)) is T.STRING
    assert reg.load_dir(str(tmp_path)) == 3
    assert reg.type_of((9000, 0, 1)) is T.FLOAT
    assert reg.type_of((3, 0, 0)) is T.OPAQUE
    assert reg.type_of((3, 0, 13)) is None  # replaced as a whole, not merged
    assert reg.type_of((3303, 0, 5700)) is T.FLOAT  # the other shipped objects stay


def test_load_dir_of_a_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ObjectRegistry().load_dir(tmp_path / "nope")


# --- independent check against the OMA XML shipped by emqxlwm2m -------------------------------------------

EMQX_OMA_FILES = {
    0: "LWM2M_Security-v1_0.xml",
    1: "LWM2M_Server-v1_0.xml",
    2: "LWM2M_Access_Control-v1_0_1.xml",
    3: "LWM2M_Device-v1_0_1.xml",
    5: "LWM2M_Firmware_Update-v1_0_1.xml",
    6: "LWM2M_Location-v1_0.xml",
    7: "LWM2M_Connectivity_Statistics-v1_0_1.xml",
}


@pytest.mark.parametrize(("object_id", "filename"), sorted(EMQX_OMA_FILES.items()))
def test_shipped_definition_agrees_with_the_oma_xml_shipped_by_emqxlwm2m(
    registry: ObjectRegistry, object_id: int, filename: str
) -> None:
    """Every resource of OMA's 1.0.x file exists in ours with the same name, operations, multiplicity,
    mandatory flag and type. Ours may define more: objects 0, 1 and 3 ship at version 1.1 (1.1 Appendix E)."""
    emqxlwm2m = pytest.importorskip(
        "emqxlwm2m", reason="the independent check needs the OMA XML of `pip install emqxlwm2m==0.6.0`"
    )
    path = Path(emqxlwm2m.__file__).resolve().parent / "oma" / filename
    (oma,) = parse_object_xml(path.read_bytes())
    ours = registry.get(object_id)
    assert oma.id == object_id
    assert ours is not None
    assert _norm(ours.name) == _norm(oma.name)
    assert (ours.multiple, ours.mandatory) == (oma.multiple, oma.mandatory)
    assert set(oma.resources) <= set(ours.resources)
    disagreements = []
    for rid, theirs in sorted(oma.resources.items()):
        mine = ours.resources[rid]
        a = (_norm(mine.name), mine.operations, mine.multiple, mine.mandatory, mine.type)
        b = (_norm(theirs.name), theirs.operations, theirs.multiple, theirs.mandatory, theirs.type)
        if a != b:
            disagreements.append(f"{object_id}/{rid}: ours {a} OMA {b}")
    assert disagreements == []
    if ours.version == oma.version:
        assert set(ours.resources) == set(oma.resources)
