"""The live LwM2M gateway over real UDP (issue 5, "Behaviour", "Bad input" and "Done when").

A simulated device (``tests/integration/lwm2m_device.py``: aiocoap client and server on one context, objects
1, 3 and 3303) registers, updates and de-registers; paho-mqtt plays the application on ``lwm2m/{ep}/dn`` and
``lwm2m/{ep}/up/...``. Covered: the registration interface (versions, bad queries and payloads, the Wakaama
payload, alternate paths, update, de-register, lifetime expiry, re-registration), every command with its
response (read in TLV, SenML JSON, SenML CBOR, LwM2M JSON, LwM2M CBOR, text and opaque with the Accept
following the registered ct; discover, write single and batch, write-attr, execute, create, delete, observe
and cancel-observe), signed integers of every width both ways, timeouts for a silent or vanished device,
queue mode with its time-to-live, auto_observe, and bad commands answered on ``up/resp``.
"""

from __future__ import annotations

import base64
import json
import queue
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiocoap.numbers.codes import Code as AioCode

from gateways.coap.numbers import Timing
from gateways.lwm2m.gateway import LwM2mGateway
from gateways.lwm2m.model import Time
from tests.integration.helpers import TIMEOUT, Clients, PahoClient, wait_for
from tests.integration.lwm2m_device import (
    LINK_FORMAT,
    LWM2M_CBOR,
    LWM2M_JSON,
    OPAQUE,
    SENML_CBOR,
    SENML_JSON,
    SIGNED_INTEGERS,
    TEXT,
    TLV,
    DeviceFactory,
    Received,
    SimulatedDevice,
    device_fixture,
)

WAKAAMA_LINKS = (
    '</>;rt="oma.lwm2m";ct=110,</1>;ver=1.1,</1/0>,</2/0>,</3/0>,</4/0>,</5/0>,</6/0>,</7/0>,'
    "</31024>;ver=1.0,</31024/10>,</31024/11>,</31024/12>"
)
"""What Eclipse Wakaama's lwm2mclient registers with (../shared/reference/peers.md), in full."""

FORMATS = {TLV: "TLV", SENML_JSON: "SenML JSON", SENML_CBOR: "SenML CBOR", LWM2M_JSON: "LwM2M JSON"}
"""The formats a registered ``ct`` makes the gateway ask for (Accept) and write in."""


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def devices() -> Iterator[DeviceFactory]:
    yield from device_fixture()


# --- reaching the live gateway


def lwm2m_port(running: Any) -> int:
    port: int = running.app.listeners["lwm2m:udp"].port
    return port


def lwm2m_gateway(running: Any) -> LwM2mGateway:
    gateway: LwM2mGateway = running.app.listeners["lwm2m:udp"].gateway
    return gateway


def counter(running: Any, name: str) -> int:
    gateway = lwm2m_gateway(running)
    result: int = running.call(lambda: gateway.counters.get(name, 0))
    return result


def has_session(running: Any, client_id: str) -> bool:
    result: bool = running.call(lambda: client_id in running.broker.sessions)
    return result


def subscriptions(running: Any, client_id: str) -> set[str]:
    def read() -> set[str]:
        session = running.broker.sessions.get(client_id)
        return set() if session is None else set(session.subscriptions)

    result: set[str] = running.call(read)
    return result


def registered_endpoints(running: Any) -> set[str]:
    gateway = lwm2m_gateway(running)
    result: set[str] = running.call(lambda: set(gateway.devices))
    return result


# --- the application side


class Application:
    """A paho-mqtt client subscribed to ``lwm2m/+/up/#`` that sends commands and reads uplinks as JSON.

    Uplinks it was not asked for yet wait in a backlog, so a test can take them in any order."""

    def __init__(self, client: PahoClient) -> None:
        self.client = client
        self.backlog: list[tuple[str, dict[str, Any]]] = []
        assert client.subscribe("lwm2m/+/up/#", 0) == 0

    def next(
        self, topic: str, match: Callable[[dict[str, Any]], bool] | None = None, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """The next uplink on ``topic`` (that ``match`` accepts) as JSON; AssertionError when none comes."""
        for index, (seen_topic, body) in enumerate(self.backlog):
            if seen_topic == topic and (match is None or match(body)):
                del self.backlog[index]
                return body
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"nothing on {topic} within {timeout} s; backlog {self.backlog}")
            try:
                message = self.client.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            body = json.loads(message.payload)
            if message.topic == topic and (match is None or match(body)):
                return body
            self.backlog.append((message.topic, body))

    def nothing_more(self, topic: str, timeout: float = 0.2) -> None:
        """Assert that no uplink on ``topic`` is waiting or arrives within ``timeout`` (a short negative
        wait)."""
        try:
            body = self.next(topic, timeout=timeout)
        except AssertionError:
            return
        raise AssertionError(f"unexpected uplink on {topic}: {body}")

    def send(self, ep: str, payload: bytes | str, suffix: str = "dn") -> None:
        self.client.publish(f"lwm2m/{ep}/{suffix}", payload)

    def command(self, ep: str, body: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        """Publish ``body`` on ``lwm2m/{ep}/dn`` and return the up/resp JSON echoing its reqID."""
        self.send(ep, json.dumps(body))
        return self.response(ep, body.get("reqID"), timeout)

    def response(self, ep: str, req_id: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self.next(f"lwm2m/{ep}/up/resp", lambda b: b.get("reqID") == req_id, timeout)


@pytest.fixture
def app(mqgate: Any, clients: Clients) -> Application:
    return Application(clients.paho(mqgate.port, "lwm2m-app", version=5))


def application(running: Any, clients: Clients) -> Application:
    return Application(clients.paho(running.port, "lwm2m-app", version=5))


def register(
    running: Any, devices: DeviceFactory, app: Application, ep: str, **kwargs: Any
) -> tuple[SimulatedDevice, dict[str, Any]]:
    """A device ``ep`` registered with the gateway, and the register JSON the application saw."""
    alternate_path = kwargs.pop("alternate_path", "")
    device = devices(ep, lwm2m_port(running), alternate_path=alternate_path)
    device.register(**kwargs)
    body = app.next(f"lwm2m/{ep}/up/register", lambda b: b["msgType"] == "register")
    return device, body


def links_with_ct(ct: int) -> str:
    return f'</>;rt="oma.lwm2m";ct={ct},</1>;ver=1.1,</1/0>,</3/0>,</3303/0>'


def read(app: Application, ep: str, path: str, req_id: Any = 1) -> dict[str, Any]:
    return app.command(ep, {"reqID": req_id, "msgType": "read", "data": {"path": path}})


def content_map(response: dict[str, Any]) -> dict[str, Any]:
    """``{path: value}`` of a read response (asserting 2.05)."""
    data = response["data"]
    assert (data["code"], data["codeMsg"]) == ("2.05", "content"), response
    return {item["path"]: item["value"] for item in data["content"]}


def gets(device: SimulatedDevice) -> list[Received]:
    return [r for r in device.received() if r.method == "GET"]


# --- registration interface (§6.2)


def test_register_answers_created_with_location_publishes_register_json_and_subscribes_dn(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, body = register(mqgate, devices, app, "dev-reg", lifetime=120, version="1.1", binding="U")
    assert len(device.location) == 2 and device.location[0] == "rd" and device.location[1]
    assert body == {
        "msgType": "register",
        "data": {
            "ep": "dev-reg",
            "lt": 120,
            "lwm2m": "1.1",
            "b": "U",
            "alternatePath": "/",
            "objectList": ["/1", "/1/0", "/3/0", "/3303/0"],
            "location": f"/rd/{device.location[1]}",
        },
    }
    assert has_session(mqgate, "dev-reg")
    assert subscriptions(mqgate, "dev-reg") == {"lwm2m/dev-reg/dn/#"}
    assert counter(mqgate, "registrations") == 1


def test_wakaama_registration_payload_is_accepted_and_reads_ask_for_its_ct(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device = devices("waka-ep", lwm2m_port(mqgate))
    response = device.send(
        AioCode.POST, ["rd"], ["lwm2m=1.1", "ep=waka-ep", "b=U", "lt=60"], WAKAAMA_LINKS.encode()
    )
    assert response.code == AioCode.CREATED, response.payload
    assert response.opt.location_path[0] == "rd"
    data = app.next("lwm2m/waka-ep/up/register")["data"]
    assert (data["ep"], data["lt"], data["lwm2m"], data["b"], data["ct"]) == ("waka-ep", 60, "1.1", "U", 110)
    assert data["alternatePath"] == "/"
    assert data["objectList"] == [
        "/1",
        "/1/0",
        "/2/0",
        "/3/0",
        "/4/0",
        "/5/0",
        "/6/0",
        "/7/0",
        "/31024",
        "/31024/10",
        "/31024/11",
        "/31024/12",
    ]
    values = content_map(read(app, "waka-ep", "/3/0"))
    assert values["/3/0/0"] == "Open Mobile Alliance"
    (request,) = gets(device)
    assert (request.path, request.accept) == ((3, 0), SENML_JSON)


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_lwm2m_versions_1_0_to_1_2_are_accepted(
    mqgate: Any, devices: DeviceFactory, app: Application, version: str
) -> None:
    _, body = register(mqgate, devices, app, f"dev-v{version}", version=version)
    assert body["data"]["lwm2m"] == version


def test_lwm2m_version_2_0_is_refused_with_precondition_failed(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device = devices("dev-v2", lwm2m_port(mqgate))
    response = device.register(version="2.0", check=False)
    assert response.code == AioCode.PRECONDITION_FAILED
    assert b"2.0" in response.payload
    assert not has_session(mqgate, "dev-v2")
    app.nothing_more("lwm2m/dev-v2/up/register")


def test_missing_lifetime_defaults_to_86400_and_missing_version_to_1_0(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    _, body = register(mqgate, devices, app, "dev-defaults", lifetime=None, version=None, binding=None)
    data = body["data"]
    assert (data["lt"], data["lwm2m"], data["b"]) == (86400, "1.0", "U")


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        (["lt=60", "lwm2m=1.1"], b"ep"),
        (["ep=", "lt=60"], b"ep"),
        (["ep=bad-lt", "lt=abc"], b"lifetime"),
        (["ep=bad-lt", "lt=0"], b"lifetime"),
        (["ep=bad-lt", "lt=-5"], b"lifetime"),
        (["ep=bad-b", "b=X"], b"binding"),
        (["ep=bad-q", "=oops"], b"query"),
    ],
)
def test_bad_registration_queries_are_refused_with_bad_request(
    mqgate: Any, devices: DeviceFactory, app: Application, query: list[str], problem: bytes
) -> None:
    device = devices("dev-bad", lwm2m_port(mqgate))
    response = device.send(AioCode.POST, ["rd"], query, b"</1/0>")
    assert response.code == AioCode.BAD_REQUEST
    assert problem in response.payload
    assert registered_endpoints(mqgate) == set()
    assert counter(mqgate, "registrations_refused") == 1
    register(mqgate, devices, app, "dev-healthy")
    assert content_map(read(app, "dev-healthy", "/3/0/0")) == {"/3/0/0": "Open Mobile Alliance"}


@pytest.mark.parametrize("ep", ["dev+1", "dev#", "a/#"])
def test_endpoint_names_that_make_no_valid_topic_are_refused_with_bad_request(
    mqgate: Any, devices: DeviceFactory, app: Application, ep: str
) -> None:
    device = devices(ep, lwm2m_port(mqgate))
    response = device.register(check=False)
    assert response.code == AioCode.BAD_REQUEST
    assert b"wildcard" in response.payload
    assert registered_endpoints(mqgate) == set()
    assert not has_session(mqgate, ep)
    assert app.client.subscribe("lwm2m/a/b/up/#") == 0
    register(mqgate, devices, app, "a/b")  # "/" only adds a level: allowed
    assert content_map(read(app, "a/b", "/3/0/9")) == {"/3/0/9": 100}


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe</1/0>",
        b"</3/a>",
        b"</1/2/3>",
        b'</>;rt="oma.lwm2m";ct=abc,</1/0>',
        b"<3/0",
        b'</1/0>;ver="1',
        b"</1/0>,,</3/0>",
        b"garbage",
    ],
    ids=[
        "not-utf8",
        "non-numeric",
        "too-deep",
        "bad-ct",
        "unterminated",
        "open-quote",
        "empty-link",
        "garbage",
    ],
)
def test_malformed_registration_payloads_are_refused_with_bad_request(
    mqgate: Any, devices: DeviceFactory, app: Application, payload: bytes
) -> None:
    device = devices("dev-badlinks", lwm2m_port(mqgate))
    response = device.send(AioCode.POST, ["rd"], ["ep=dev-badlinks", "lt=60"], payload)
    assert response.code == AioCode.BAD_REQUEST, response
    assert response.payload
    assert registered_endpoints(mqgate) == set()
    register(mqgate, devices, app, "dev-after-badlinks")
    assert content_map(read(app, "dev-after-badlinks", "/3/0/9")) == {"/3/0/9": 100}


def test_requests_outside_the_registration_interface_get_error_codes(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device = devices("dev-stray", lwm2m_port(mqgate))
    assert device.send(AioCode.GET, ["rd"]).code == AioCode.METHOD_NOT_ALLOWED
    assert device.send(AioCode.GET, ["elsewhere"]).code == AioCode.NOT_FOUND
    assert device.send(AioCode.POST, ["rd", "nosuchid"]).code == AioCode.NOT_FOUND
    assert device.send(AioCode.DELETE, ["rd", "nosuchid"]).code == AioCode.NOT_FOUND
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:  # not CoAP at all
        raw.sendto(b"\x00garbage", ("127.0.0.1", lwm2m_port(mqgate)))
    device, _ = register(mqgate, devices, app, "dev-stray")
    assert device.send(AioCode.PUT, list(device.location)).code == AioCode.METHOD_NOT_ALLOWED
    assert content_map(read(app, "dev-stray", "/3/0/9")) == {"/3/0/9": 100}


def test_alternate_path_is_reported_and_prefixes_every_request(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    links = '</lwm2m>;rt="oma.lwm2m",</lwm2m/1/0>,</lwm2m/3/0>,</lwm2m/3303/0>'
    device, body = register(mqgate, devices, app, "dev-alt", links=links, alternate_path="/lwm2m")
    assert body["data"]["alternatePath"] == "/lwm2m"
    assert body["data"]["objectList"] == ["/1/0", "/3/0", "/3303/0"]
    response = read(app, "dev-alt", "/3/0/0")
    assert response["data"]["reqPath"] == "/3/0/0"
    assert content_map(response) == {"/3/0/0": "Open Mobile Alliance"}
    assert [r.path for r in gets(device)] == [(3, 0, 0)]  # the device served it under /lwm2m only


def test_update_answers_changed_and_publishes_new_lifetime_binding_and_object_list(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-upd", lifetime=60)
    response = device.update(lifetime=300, binding="UQ", links="</1/0>,</3/0>,</3303/0>,</3303/1>")
    assert response.code == AioCode.CHANGED
    data = app.next("lwm2m/dev-upd/up/update")
    assert data["msgType"] == "update"
    assert (data["data"]["lt"], data["data"]["b"]) == (300, "UQ")
    assert data["data"]["objectList"] == ["/1/0", "/3/0", "/3303/0", "/3303/1"]
    assert data["data"]["location"] == f"/rd/{device.location[1]}"
    assert device.update().code == AioCode.CHANGED  # an empty update keeps everything
    data = app.next("lwm2m/dev-upd/up/update")["data"]
    assert (data["lt"], data["b"], data["objectList"][-1]) == (300, "UQ", "/3303/1")
    assert counter(mqgate, "updates") == 2


def test_deregister_answers_deleted_publishes_deregister_and_ends_the_session(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-dereg")
    assert has_session(mqgate, "dev-dereg")
    assert device.deregister().code == AioCode.DELETED
    body = app.next("lwm2m/dev-dereg/up/register", lambda b: b["msgType"] == "deregister")
    assert body == {"msgType": "deregister", "data": {"ep": "dev-dereg"}}
    wait_for(lambda: not has_session(mqgate, "dev-dereg"))
    assert registered_endpoints(mqgate) == set()
    assert device.update().code == AioCode.NOT_FOUND  # the location is gone


def test_registration_expires_after_its_lifetime_plus_grace(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients
) -> None:
    running = start_broker(gateways={"lwm2m": {"lifetime_grace": 0.5}})
    app = application(running, clients)
    started = time.monotonic()
    device, _ = register(running, devices, app, "dev-expire", lifetime=1)
    body = app.next("lwm2m/dev-expire/up/register", lambda b: b["msgType"] == "expired", timeout=5)
    assert time.monotonic() - started >= 1.5
    assert body["data"]["ep"] == "dev-expire"
    wait_for(lambda: not has_session(running, "dev-expire"))
    assert registered_endpoints(running) == set()
    assert device.update().code == AioCode.NOT_FOUND


def test_update_refreshes_the_lifetime(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients
) -> None:
    running = start_broker(gateways={"lwm2m": {"lifetime_grace": 0.5}})
    gateway = lwm2m_gateway(running)
    app = application(running, clients)
    device, _ = register(running, devices, app, "dev-refresh", lifetime=1)
    first: float = running.call(lambda: gateway.devices["dev-refresh"].expires_at)
    wait_for(lambda: running.call(gateway.clock.now) > first - 1.0)
    assert device.update().code == AioCode.CHANGED
    refreshed: float = running.call(lambda: gateway.devices["dev-refresh"].expires_at)
    assert refreshed > first
    assert app.next("lwm2m/dev-refresh/up/update")["data"]["lt"] == 1


def test_reregistration_with_the_same_endpoint_replaces_the_old_registration(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    old, first = register(mqgate, devices, app, "dev-again")
    new, second = register(mqgate, devices, app, "dev-again", lifetime=90)  # rebooted: a new port
    assert old.port != new.port
    assert old.location != new.location
    assert second["data"]["lt"] == 90 and second["data"]["location"] != first["data"]["location"]
    assert registered_endpoints(mqgate) == {"dev-again"}
    assert has_session(mqgate, "dev-again")
    assert subscriptions(mqgate, "dev-again") == {"lwm2m/dev-again/dn/#"}
    assert old.update().code == AioCode.NOT_FOUND
    assert new.update().code == AioCode.CHANGED
    assert content_map(read(app, "dev-again", "/3/0/9")) == {"/3/0/9": 100}
    assert [r.path for r in gets(new)] == [(3, 0, 9)]
    assert gets(old) == []


def test_mountpoint_topics_and_uplink_qos_are_configurable(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients
) -> None:
    running = start_broker(
        gateways={
            "lwm2m": {
                "mountpoint": "dm/{ep}/",
                "topic_command": "cmd/#",
                "topic_response": "out/r",
                "topic_register": "out/reg",
                "topic_update": "out/upd",
                "qos": 1,
            }
        }
    )
    mqtt = clients.paho(running.port, "dm-app", version=5)
    assert mqtt.subscribe("dm/#", 1) == 1
    device = devices("dev-dm", lwm2m_port(running))
    device.register()
    message = mqtt.expect()
    assert (message.topic, message.qos, json.loads(message.payload)["msgType"]) == (
        "dm/dev-dm/out/reg",
        1,
        "register",
    )
    assert subscriptions(running, "dev-dm") == {"dm/dev-dm/cmd/#"}
    mqtt.publish("dm/dev-dm/cmd/x", json.dumps({"reqID": 1, "msgType": "read", "data": {"path": "/3/0/9"}}))
    assert mqtt.expect().topic == "dm/dev-dm/cmd/x"  # our own command, echoed by the dm/# subscription
    message = mqtt.expect()
    assert (message.topic, message.qos) == ("dm/dev-dm/out/r", 1)
    assert json.loads(message.payload)["data"]["content"] == [{"path": "/3/0/9", "value": 100}]
    assert device.update(lifetime=30).code == AioCode.CHANGED
    assert mqtt.expect().topic == "dm/dev-dm/out/upd"


def test_two_devices_each_get_their_own_commands(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    one, _ = register(mqgate, devices, app, "dev-one")
    two, _ = register(mqgate, devices, app, "dev-two")
    two.set_value((3, 0, 9), 42)
    assert content_map(read(app, "dev-one", "/3/0/9")) == {"/3/0/9": 100}
    assert content_map(read(app, "dev-two", "/3/0/9")) == {"/3/0/9": 42}
    assert [r.path for r in gets(one)] == [(3, 0, 9)]
    assert [r.path for r in gets(two)] == [(3, 0, 9)]


def test_a_burst_of_commands_gets_every_response_with_its_reqid(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-burst")
    paths = [f"/3/0/7/{i % 4}" for i in range(24)]
    for req_id, path in enumerate(paths):
        app.send("dev-burst", json.dumps({"reqID": req_id, "msgType": "read", "data": {"path": path}}))
    for req_id, path in enumerate(paths):
        assert content_map(app.response("dev-burst", req_id)) == {path: SIGNED_INTEGERS[req_id % 4]}
    assert len(gets(device)) == len(paths)


# --- reads in every format, the Accept following the registered ct (§6.3.1, §7.4)


@pytest.mark.parametrize("ct", list(FORMATS), ids=list(FORMATS.values()))
def test_read_of_resource_instance_and_object_in_the_registered_ct(
    mqgate: Any, devices: DeviceFactory, app: Application, ct: int
) -> None:
    device, body = register(mqgate, devices, app, "dev-read", links=links_with_ct(ct))
    assert body["data"]["ct"] == ct
    resource = read(app, "dev-read", "/3/0/0", "r1")
    assert content_map(resource) == {"/3/0/0": "Open Mobile Alliance"}
    assert resource["msgType"] == "read" and resource["data"]["reqPath"] == "/3/0/0"
    instance = content_map(read(app, "dev-read", "/3303/0", "r2"))
    assert instance == {
        "/3303/0/5601": 21.5,
        "/3303/0/5602": 21.5,
        "/3303/0/5700": 21.5,
        "/3303/0/5701": "Cel",
    }
    obj = content_map(read(app, "dev-read", "/3", "r3"))
    assert obj["/3/0/13"] == 1_700_000_000
    assert obj["/3/0/6/1"] == 5
    assert obj["/3/0/9"] == 100
    requests = gets(device)
    assert [(r.path, r.accept) for r in requests] == [((3, 0, 0), ct), ((3303, 0), ct), ((3,), ct)]


def test_read_answered_in_lwm2m_cbor_is_decoded(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-cbor")
    device.answer_format = LWM2M_CBOR
    values = content_map(read(app, "dev-cbor", "/3303/0"))
    assert values["/3303/0/5700"] == 21.5 and values["/3303/0/5701"] == "Cel"


def test_read_without_registered_ct_sends_no_accept_and_decodes_text_values(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, body = register(mqgate, devices, app, "dev-text")
    assert "ct" not in body["data"]
    cases = {
        "/3/0/0": "Open Mobile Alliance",
        "/3/0/9": 100,
        "/3/0/13": 1_700_000_000,
        "/3303/0/5700": 21.5,
        "/1/0/6": False,
    }
    for path, expected in cases.items():
        value = content_map(read(app, "dev-text", path, path))[path]
        assert value == expected and type(value) is type(expected), (path, value)
    assert {(r.accept, r.method) for r in gets(device)} == {(None, "GET")}


def test_read_in_opaque_is_base64_in_json(mqgate: Any, devices: DeviceFactory, app: Application) -> None:
    device, _ = register(mqgate, devices, app, "dev-opaque", links="</1/0>,</3/0>,</31024/10>")
    blob = bytes([0, 1, 0x7F, 0x80, 0xFE, 0xFF])
    device.call(lambda: device.state.instances.add((31024, 10)))
    device.set_value((31024, 10, 1), blob)
    response = read(app, "dev-opaque", "/31024/10/1")
    assert content_map(response) == {"/31024/10/1": base64.b64encode(blob).decode()}
    assert [(r.path, r.accept) for r in gets(device)] == [((31024, 10, 1), None)]
    device.canned = (OPAQUE, b"\x00\xffraw")  # an opaque answer for a String resource: its bytes, base64
    assert content_map(read(app, "dev-opaque", "/3/0/1", 2)) == {
        "/3/0/1": base64.b64encode(b"\x00\xffraw").decode()
    }


def test_unknown_object_values_stay_untyped(mqgate: Any, devices: DeviceFactory, app: Application) -> None:
    device, _ = register(mqgate, devices, app, "dev-untyped", links="</1/0>,</3/0>,</31024/10>")
    device.call(lambda: device.state.instances.add((31024, 10)))
    device.set_value((31024, 10, 2), "plain text")
    values = content_map(read(app, "dev-untyped", "/31024/10/2"))  # text/plain: stays a string
    assert values == {"/31024/10/2": "plain text"}
    device.answer_format = SENML_JSON  # SenML keeps its own value kinds
    assert content_map(read(app, "dev-untyped", "/31024/10", 2)) == {"/31024/10/2": "plain text"}
    device.answer_format = TLV  # TLV has no types: bytes, base64
    assert content_map(read(app, "dev-untyped", "/31024/10", 3)) == {
        "/31024/10/2": base64.b64encode(b"plain text").decode()
    }


def test_response_echoes_every_top_level_field_of_the_command(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    register(mqgate, devices, app, "dev-echo")
    command = {
        "reqID": "abc-1",
        "requestID": 77,
        "cacheID": [1, 2],
        "note": {"k": "v"},
        "msgType": "read",
        "data": {"path": "/3/0/2"},
    }
    response = app.command("dev-echo", command)
    assert {k: response[k] for k in ("reqID", "requestID", "cacheID", "note", "msgType")} == {
        "reqID": "abc-1",
        "requestID": 77,
        "cacheID": [1, 2],
        "note": {"k": "v"},
        "msgType": "read",
    }
    assert response["data"] == {
        "reqPath": "/3/0/2",
        "code": "2.05",
        "codeMsg": "content",
        "content": [{"path": "/3/0/2", "value": "345000123"}],
    }


def test_read_of_a_path_the_device_lacks_reports_not_found(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    register(mqgate, devices, app, "dev-404")
    for path in ("/9999/0", "/3303/7", "/3/0/42"):
        data = read(app, "dev-404", path, path)["data"]
        assert (data["reqPath"], data["code"], data["codeMsg"]) == (path, "4.04", "not_found")
        assert "content" not in data


def test_read_of_a_value_larger_than_one_block_is_complete(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-block")
    device.set_value((3, 0, 15), "z" * 3000)  # aiocoap answers in 1024-byte Block2 blocks
    data = read(app, "dev-block", "/3/0/15")["data"]
    assert data["code"] == "2.05"
    assert data["content"] == [{"path": "/3/0/15", "value": "z" * 3000}]


def test_read_of_a_block_wise_value_over_max_response_size_is_4_13(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients
) -> None:
    running = start_broker(gateways={"lwm2m": {"max_response_size": 2048}})
    app = application(running, clients)
    device, _ = register(running, devices, app, "dev-huge")
    device.set_value((3, 0, 15), "z" * 3000)
    data = read(app, "dev-huge", "/3/0/15")["data"]
    assert (data["code"], data["codeMsg"]) == ("4.13", "request_entity_too_large")
    assert "exceeds 2048 bytes" in data["error"]
    assert counter(running, "responses_incomplete") == 1


def test_observe_answer_and_notifications_larger_than_one_block_are_published_whole(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    """aiocoap sends a large observe answer and each large notification as a first Block2 block; the
    gateway fetches the rest without Observe (RFC 7959 §2.6) and the observation stays."""
    device, _ = register(mqgate, devices, app, "dev-big-obs")
    device.set_value((3, 0, 15), "a" * 3000)
    first = app.command("dev-big-obs", {"reqID": "b", "msgType": "observe", "data": {"path": "/3/0/15"}})
    assert first["data"]["content"] == [{"path": "/3/0/15", "value": "a" * 3000}]
    for letter in "bc":
        device.set_value((3, 0, 15), letter * 3000)
        notify = app.next("lwm2m/dev-big-obs/up/notify")
        assert (notify["msgType"], notify["reqID"]) == ("notify", "b")
        assert notify["data"]["content"] == [{"path": "/3/0/15", "value": letter * 3000}]
    assert device.observers((3, 0, 15)) == 1  # the follow-up GETs registered no other observation
    assert counter(mqgate, "notifications") == 2


# --- signed integers of every width (EMQX #4499, #4989)


@pytest.mark.parametrize("fmt", [*FORMATS, LWM2M_CBOR], ids=[*FORMATS.values(), "LwM2M CBOR"])
def test_signed_integers_read_back_exactly_in_every_format(
    mqgate: Any, devices: DeviceFactory, app: Application, fmt: int
) -> None:
    device, _ = register(mqgate, devices, app, "dev-int")
    device.answer_format = fmt
    expected = {f"/3/0/7/{ri}": number for ri, number in enumerate(SIGNED_INTEGERS)}
    assert content_map(read(app, "dev-int", "/3/0/7", 1)) == expected
    values = content_map(read(app, "dev-int", "/3/0", 2))
    assert {k: v for k, v in values.items() if k.startswith("/3/0/7/")} == expected
    assert [r.path for r in gets(device)] == [(3, 0, 7), (3, 0)]


def test_signed_integers_read_back_exactly_as_text(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-int-text")
    for ri, number in enumerate(SIGNED_INTEGERS):
        path = f"/3/0/7/{ri}"
        assert content_map(read(app, "dev-int-text", path, ri)) == {path: number}
    assert [(r.path, r.accept) for r in gets(device)] == [((3, 0, 7, ri), None) for ri in range(4)]


@pytest.mark.parametrize("ct", [None, *FORMATS], ids=["TLV-default", *FORMATS.values()])
def test_write_of_129_and_minus_1_reaches_the_device_exactly(
    mqgate: Any, devices: DeviceFactory, app: Application, ct: int | None
) -> None:
    links = links_with_ct(ct) if ct is not None else "</1/0>,</3/0>,</3303/0>"
    device, _ = register(mqgate, devices, app, "dev-wint", links=links)
    tlv_bytes = {129: bytes.fromhex("c2020081"), -1: bytes.fromhex("c103ff")}  # 129 is 0x0081, not 0x81
    for req_id, (path, number) in enumerate((((1, 0, 2), 129), ((1, 0, 3), -1)), 1):
        text = "/" + "/".join(map(str, path))
        response = app.command(
            "dev-wint", {"reqID": req_id, "msgType": "write", "data": {"path": text, "value": number}}
        )
        assert (response["data"]["code"], response["data"]["codeMsg"]) == ("2.04", "changed"), response
        request = device.expect_request(lambda r: r.method == "PUT")
        assert (request.path, request.content_format) == (path, ct or TLV)
        if ct is None:
            assert request.payload == tlv_bytes[number]
        stored = device.value(path)
        assert stored == number and type(stored) is int
    assert content_map(read(app, "dev-wint", "/1/0/2", 9)) == {"/1/0/2": 129}
    assert content_map(read(app, "dev-wint", "/1/0/3", 10)) == {"/1/0/3": -1}


# --- the other commands


def test_write_typed_values_of_every_kind(mqgate: Any, devices: DeviceFactory, app: Application) -> None:
    device, _ = register(mqgate, devices, app, "dev-write")
    cases: list[tuple[dict[str, Any], tuple[int, ...], Any]] = [
        ({"path": "/3/0/13", "type": "Time", "value": 1_800_000_000}, (3, 0, 13), Time(1_800_000_000)),
        ({"path": "/3/0/14", "type": "String", "value": "-05:00"}, (3, 0, 14), "-05:00"),
        ({"path": "/3/0/15", "value": "Europe/Paris"}, (3, 0, 15), "Europe/Paris"),
        ({"path": "/1/0/6", "type": "Boolean", "value": True}, (1, 0, 6), True),
        ({"path": "/1/0/1", "type": "Integer", "value": "3600"}, (1, 0, 1), 3600),
        ({"path": "/1/0/10", "type": "Objlnk", "value": "11:0"}, (1, 0, 10), None),
    ]
    for req_id, (data, path, expected) in enumerate(cases):
        response = app.command("dev-write", {"reqID": req_id, "msgType": "write", "data": data})
        assert response["data"]["code"] == "2.04", response
        stored = device.value(path)
        if expected is None:
            assert str(stored) == "11:0"
        else:
            assert stored == expected and type(stored) is type(expected), (path, stored)


def test_write_to_a_read_only_resource_reports_the_device_code(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-ro")
    response = app.command("dev-ro", {"reqID": 1, "msgType": "write", "data": {"path": "/3/0/9", "value": 5}})
    data = response["data"]
    assert (data["code"], data["codeMsg"]) == ("4.05", "method_not_allowed")
    assert "not writable" in data["error"]
    assert device.value((3, 0, 9)) == 100


def test_batch_write_with_base_path_updates_an_instance(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-batch", links=links_with_ct(SENML_CBOR))
    command = {
        "reqID": "b1",
        "msgType": "write",
        "data": {
            "basePath": "/1/0",
            "content": [
                {"path": "2", "value": 129},
                {"path": "3", "type": "Integer", "value": -1},
                {"path": "/1/0/7", "value": "UQ"},
            ],
        },
    }
    response = app.command("dev-batch", command)
    assert (response["data"]["code"], response["data"]["reqPath"]) == ("2.04", "/1/0")
    request = device.expect_request(lambda r: r.method != "GET")
    assert (request.method, request.path, request.content_format) == ("POST", (1, 0), SENML_CBOR)
    assert [device.value(p) for p in ((1, 0, 2), (1, 0, 3), (1, 0, 7))] == [129, -1, "UQ"]


def test_batch_write_on_a_resource_replaces_it(mqgate: Any, devices: DeviceFactory, app: Application) -> None:
    device, _ = register(mqgate, devices, app, "dev-batch-res")
    command = {
        "reqID": "b2",
        "msgType": "write",
        "data": {"basePath": "/3/0/13", "content": [{"path": "/3/0/13", "value": 42}]},
    }
    assert app.command("dev-batch-res", command)["data"]["code"] == "2.04"
    request = device.expect_request(lambda r: r.method != "GET")
    assert (request.method, request.path, request.content_format) == ("PUT", (3, 0, 13), TLV)
    assert device.value((3, 0, 13)) == Time(42)


def test_write_attributes_arrive_as_query_and_show_in_discover(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-attr")
    command = {
        "reqID": "wa",
        "msgType": "write-attr",
        "data": {"path": "/3303/0/5700", "pmin": 1, "pmax": 5, "gt": 30.5, "lt": 10, "st": 0.5},
    }
    response = app.command("dev-attr", command)
    assert (response["data"]["code"], response["data"]["codeMsg"]) == ("2.04", "changed")
    request = device.expect_request()
    assert (request.method, request.path, request.payload) == ("PUT", (3303, 0, 5700), b"")
    assert sorted(request.query) == sorted(["pmin=1", "pmax=5", "gt=30.5", "lt=10", "st=0.5"])
    discover = app.command("dev-attr", {"reqID": "d", "msgType": "discover", "data": {"path": "/3303/0"}})
    data = discover["data"]
    assert (data["code"], data["reqPath"]) == ("2.05", "/3303/0")
    assert data["content"][0] == "</3303/0>"
    assert "</3303/0/5700>;pmin=1;pmax=5;gt=30.5;lt=10;st=0.5" in data["content"]
    assert "</3303/0/5701>" in data["content"]
    discover_request = device.expect_request()
    assert (discover_request.method, discover_request.accept) == ("GET", LINK_FORMAT)


def test_execute_carries_its_arguments(mqgate: Any, devices: DeviceFactory, app: Application) -> None:
    device, _ = register(mqgate, devices, app, "dev-exec")
    command = {"reqID": 5, "msgType": "execute", "data": {"path": "/3/0/4", "args": "0='now',1"}}
    response = app.command("dev-exec", command)
    assert (response["data"]["code"], response["data"]["reqPath"]) == ("2.04", "/3/0/4")
    request = device.expect_request()
    assert (request.method, request.content_format, request.payload) == ("POST", TEXT, b"0='now',1")
    no_args = app.command("dev-exec", {"reqID": 6, "msgType": "execute", "data": {"path": "/3303/0/5605"}})
    assert no_args["data"]["code"] == "2.04"
    assert device.call(lambda: list(device.state.executed)) == [
        ((3, 0, 4), b"0='now',1"),
        ((3303, 0, 5605), b""),
    ]
    refused = app.command("dev-exec", {"reqID": 7, "msgType": "execute", "data": {"path": "/3/0/0"}})
    assert (refused["data"]["code"], refused["data"]["codeMsg"]) == ("4.05", "method_not_allowed")


def test_create_then_delete_an_instance(mqgate: Any, devices: DeviceFactory, app: Application) -> None:
    device, _ = register(mqgate, devices, app, "dev-create")
    command = {
        "reqID": "c",
        "msgType": "create",
        "data": {
            "basePath": "/3303",
            "content": [{"path": "/3303/1/5700", "value": -12.25}, {"path": "/3303/1/5701", "value": "Cel"}],
        },
    }
    response = app.command("dev-create", command)
    assert (response["data"]["code"], response["data"]["codeMsg"], response["data"]["reqPath"]) == (
        "2.01",
        "created",
        "/3303",
    )
    request = device.expect_request()
    assert (request.method, request.path, request.content_format) == ("POST", (3303,), TLV)
    assert content_map(read(app, "dev-create", "/3303/1", "r")) == {
        "/3303/1/5700": -12.25,
        "/3303/1/5701": "Cel",
    }
    deleted = app.command("dev-create", {"reqID": "d", "msgType": "delete", "data": {"path": "/3303/1"}})
    assert (deleted["data"]["code"], deleted["data"]["codeMsg"]) == ("2.02", "deleted")
    assert read(app, "dev-create", "/3303/1", "r2")["data"]["code"] == "4.04"
    assert device.call(lambda: sorted(device.state.instances)) == [(1, 0), (3, 0), (3303, 0)]


def test_observe_sends_notifications_with_increasing_seqnum_until_cancelled(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-obs", links=links_with_ct(SENML_JSON))
    first = app.command("dev-obs", {"reqID": "o", "msgType": "observe", "data": {"path": "/3303/0/5700"}})
    assert content_map(first) == {"/3303/0/5700": 21.5}
    assert first["msgType"] == "observe"
    request = device.expect_request()
    assert (request.observe, request.accept) == (0, SENML_JSON)
    assert device.observers((3303, 0, 5700)) == 1
    seqs = []
    for value in (22.0, 23.5, -4.0):
        device.set_value((3303, 0, 5700), value)
        notify = app.next("lwm2m/dev-obs/up/notify")
        assert (notify["msgType"], notify["reqID"]) == ("notify", "o")
        assert notify["data"]["reqPath"] == "/3303/0/5700"
        assert content_map(notify) == {"/3303/0/5700": value}
        seqs.append(notify["seqNum"])
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    cancel = app.command(
        "dev-obs", {"reqID": "x", "msgType": "cancel-observe", "data": {"path": "/3303/0/5700"}}
    )
    assert (cancel["msgType"], cancel["data"]["code"]) == ("cancel-observe", "2.05")
    cancel_request = device.expect_request(lambda r: r.observe is not None)
    assert (cancel_request.path, cancel_request.observe) == ((3303, 0, 5700), 1)
    device.set_value((3303, 0, 5700), 30.0)  # the gateway rejects it: the device's observation ends
    wait_for(lambda: device.observers((3303, 0, 5700)) == 0)
    app.nothing_more("lwm2m/dev-obs/up/notify")
    assert counter(mqgate, "notifications") == 3


def test_cancel_observe_ends_an_observation_notified_with_non(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    """A device notifying with NON gets no RST to stop it: the cancel must use the observation's token."""
    device, _ = register(mqgate, devices, app, "dev-obs-non")
    device.non_notifications = True
    observe = {"reqID": "o", "msgType": "observe", "data": {"path": "/3303/0/5700"}}
    assert app.command("dev-obs-non", observe)["data"]["code"] == "2.05"
    device.set_value((3303, 0, 5700), 1.0)
    assert app.next("lwm2m/dev-obs-non/up/notify")["seqNum"] == 1
    cancel = {"reqID": "x", "msgType": "cancel-observe", "data": {"path": "/3303/0/5700"}}
    assert app.command("dev-obs-non", cancel)["data"]["code"] == "2.05"
    wait_for(lambda: device.observers((3303, 0, 5700)) == 0)
    device.set_value((3303, 0, 5700), 2.0)
    app.nothing_more("lwm2m/dev-obs-non/up/notify")


def test_observe_of_an_instance_notifies_changes_below_it(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-obs-inst")
    first = app.command("dev-obs-inst", {"reqID": 1, "msgType": "observe", "data": {"path": "/3303/0"}})
    assert content_map(first)["/3303/0/5700"] == 21.5
    wait_for(lambda: device.observers((3303, 0)) == 1)
    device.set_value((3303, 0, 5602), 40.0)
    notify = app.next("lwm2m/dev-obs-inst/up/notify")
    assert content_map(notify)["/3303/0/5602"] == 40.0
    assert notify["seqNum"] >= 1


def test_observe_of_a_missing_path_reports_the_error_and_keeps_nothing(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    register(mqgate, devices, app, "dev-obs-404")
    response = app.command(
        "dev-obs-404", {"reqID": 1, "msgType": "observe", "data": {"path": "/3303/9/5700"}}
    )
    assert response["data"]["code"] == "4.04"
    gateway = lwm2m_gateway(mqgate)
    assert mqgate.call(lambda: len(gateway.devices["dev-obs-404"].observations)) == 0


def test_an_observation_ended_by_the_device_is_reported_and_forgotten(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-obs-end")
    create = {
        "reqID": "c",
        "msgType": "create",
        "data": {"basePath": "/3303", "content": [{"path": "/3303/2/5700", "value": 1.5}]},
    }
    assert app.command("dev-obs-end", create)["data"]["code"] == "2.01"
    assert (
        app.command("dev-obs-end", {"reqID": "o", "msgType": "observe", "data": {"path": "/3303/2"}})["data"][
            "code"
        ]
        == "2.05"
    )
    wait_for(lambda: device.observers((3303, 2)) == 1)
    deleted = app.command("dev-obs-end", {"reqID": "d", "msgType": "delete", "data": {"path": "/3303/2"}})
    assert deleted["data"]["code"] == "2.02"
    final = app.next("lwm2m/dev-obs-end/up/notify")
    assert (final["reqID"], final["data"]["code"], final["data"]["codeMsg"]) == ("o", "4.04", "not_found")
    gateway = lwm2m_gateway(mqgate)
    wait_for(lambda: mqgate.call(lambda: len(gateway.devices["dev-obs-end"].observations)) == 0)


def test_deregistration_ends_the_devices_observations(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-obs-dereg")
    observe = {"reqID": "o", "msgType": "observe", "data": {"path": "/3303/0/5700"}}
    assert app.command("dev-obs-dereg", observe)["data"]["code"] == "2.05"
    wait_for(lambda: device.observers((3303, 0, 5700)) == 1)
    assert device.deregister().code == AioCode.DELETED
    device.set_value((3303, 0, 5700), 50.0)  # the gateway no longer knows the token: RST
    wait_for(lambda: device.observers((3303, 0, 5700)) == 0)
    app.nothing_more("lwm2m/dev-obs-dereg/up/notify")


def test_an_mqtt_client_taking_the_endpoints_client_id_ends_the_registration(
    mqgate: Any, devices: DeviceFactory, app: Application, clients: Clients
) -> None:
    device, _ = register(mqgate, devices, app, "dev-taken")
    clients.paho(mqgate.port, "dev-taken", version=5)
    wait_for(lambda: registered_endpoints(mqgate) == set())
    assert device.update().code == AioCode.NOT_FOUND
    device.register()  # registering again takes the client id back
    app.next("lwm2m/dev-taken/up/register", lambda b: b["msgType"] == "register")
    assert content_map(read(app, "dev-taken", "/3/0/9")) == {"/3/0/9": 100}


# --- a device that does not answer


def test_device_that_stops_answering_gets_a_timeout_response(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients
) -> None:
    running = start_broker(gateways={"lwm2m": {"request_timeout": 0.5}})
    app = application(running, clients)
    device, _ = register(running, devices, app, "dev-silent")
    device.silent = True
    started = time.monotonic()
    response = app.command(
        "dev-silent", {"reqID": "t", "extra": 1, "msgType": "read", "data": {"path": "/3/0/0"}}
    )
    assert time.monotonic() - started >= 0.4
    assert response["extra"] == 1 and response["msgType"] == "read"
    assert response["data"] == {
        "reqPath": "/3/0/0",
        "code": "5.04",
        "codeMsg": "timeout",
        "error": "no answer from the device",
    }
    assert device.expect_request().path == (3, 0, 0)  # it got the request and acknowledged it
    assert counter(running, "commands_timed_out") == 1


def test_device_whose_socket_is_gone_gets_a_timeout_after_retransmissions(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    gateway = lwm2m_gateway(mqgate)
    mqgate.call(lambda: setattr(gateway.endpoint, "timing", Timing(ack_timeout=0.05, max_retransmit=2)))
    device, _ = register(mqgate, devices, app, "dev-gone")
    device.drop_socket()
    response = app.command(
        "dev-gone", {"reqID": "g", "msgType": "write", "data": {"path": "/1/0/2", "value": 1}}
    )
    assert (response["data"]["code"], response["data"]["codeMsg"]) == ("5.04", "timeout")
    assert mqgate.call(lambda: gateway.endpoint.metrics.retransmissions) == 2
    assert mqgate.call(lambda: gateway.endpoint.metrics.gave_up) == 1


# --- queue mode (§6.5)


def asleep(running: Any, ep: str) -> bool:
    gateway = lwm2m_gateway(running)
    result: bool = running.call(lambda: not gateway.devices[ep].awake(gateway.clock.now()))
    return result


@pytest.mark.parametrize(("binding", "extra"), [("UQ", []), ("U", ["Q"])], ids=["b=UQ", "lwm2m-1.1-Q"])
def test_queue_mode_holds_commands_until_the_device_updates(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients, binding: str, extra: list[str]
) -> None:
    running = start_broker(gateways={"lwm2m": {"queue_window": 0.5}})
    app = application(running, clients)
    device, body = register(running, devices, app, "dev-queue", binding=binding, extra=extra)
    assert body["data"]["b"] == binding
    awake = read(app, "dev-queue", "/3/0/9", "awake")  # within the window: sent at once
    assert content_map(awake) == {"/3/0/9": 100}
    wait_for(lambda: asleep(running, "dev-queue"))
    app.send("dev-queue", json.dumps({"reqID": "q1", "msgType": "read", "data": {"path": "/3/0/0"}}))
    app.send(
        "dev-queue", json.dumps({"reqID": "q2", "msgType": "write", "data": {"path": "/1/0/2", "value": 129}})
    )
    wait_for(lambda: counter(running, "commands_queued") == 2)
    assert [r.path for r in device.received()] == [(3, 0, 9)]
    app.nothing_more("lwm2m/dev-queue/up/resp")
    assert device.update().code == AioCode.CHANGED
    assert content_map(app.response("dev-queue", "q1")) == {"/3/0/0": "Open Mobile Alliance"}
    assert app.response("dev-queue", "q2")["data"]["code"] == "2.04"
    assert device.value((1, 0, 2)) == 129
    assert [r.path for r in device.received()] == [(3, 0, 0), (1, 0, 2)]


def test_queue_mode_sends_queued_commands_when_a_notification_shows_the_device_awake(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients
) -> None:
    running = start_broker(gateways={"lwm2m": {"queue_window": 0.5}})
    app = application(running, clients)
    device, _ = register(running, devices, app, "dev-qnotify", binding="UQ")
    first = app.command("dev-qnotify", {"reqID": "o", "msgType": "observe", "data": {"path": "/3303/0/5700"}})
    assert first["data"]["code"] == "2.05"
    wait_for(lambda: asleep(running, "dev-qnotify"))
    app.send("dev-qnotify", json.dumps({"reqID": "q", "msgType": "read", "data": {"path": "/3/0/1"}}))
    wait_for(lambda: counter(running, "commands_queued") == 1)
    assert [r.path for r in device.received()] == [(3303, 0, 5700)]
    device.set_value((3303, 0, 5700), 19.0)  # any uplink wakes it, not only an update
    assert content_map(app.next("lwm2m/dev-qnotify/up/notify")) == {"/3303/0/5700": 19.0}
    assert content_map(app.response("dev-qnotify", "q")) == {"/3/0/1": "Lightweight M2M Client"}


def test_deregistration_answers_queued_commands_with_a_timeout(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients
) -> None:
    running = start_broker(gateways={"lwm2m": {"queue_window": 0.2}})
    app = application(running, clients)
    device, _ = register(running, devices, app, "dev-qdereg", binding="UQ")
    wait_for(lambda: asleep(running, "dev-qdereg"))
    app.send("dev-qdereg", json.dumps({"reqID": "lost", "msgType": "read", "data": {"path": "/3/0/1"}}))
    wait_for(lambda: counter(running, "commands_queued") == 1)
    assert device.deregister().code == AioCode.DELETED
    assert app.response("dev-qdereg", "lost")["data"]["code"] == "5.04"
    app.next("lwm2m/dev-qdereg/up/register", lambda b: b["msgType"] == "deregister")
    assert device.received() == []


def test_queued_commands_past_their_ttl_get_a_timeout_response(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients
) -> None:
    running = start_broker(gateways={"lwm2m": {"queue_window": 0.2, "command_ttl": 1}})
    app = application(running, clients)
    device, _ = register(running, devices, app, "dev-ttl", binding="UQ")
    wait_for(lambda: asleep(running, "dev-ttl"))
    started = time.monotonic()
    app.send(
        "dev-ttl", json.dumps({"reqID": "late", "tag": "x", "msgType": "read", "data": {"path": "/3/0/0"}})
    )
    response = app.response("dev-ttl", "late", timeout=5)
    assert time.monotonic() - started >= 0.9
    assert response["tag"] == "x"
    assert (response["data"]["code"], response["data"]["codeMsg"]) == ("5.04", "timeout")
    assert counter(running, "commands_expired") == 1
    assert device.update().code == AioCode.CHANGED  # nothing is left to deliver
    app.next("lwm2m/dev-ttl/up/update")
    assert device.received() == []


def test_queue_mode_bounds_the_queue(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients
) -> None:
    running = start_broker(gateways={"lwm2m": {"queue_window": 0.2, "max_queued_commands": 1}})
    app = application(running, clients)
    device, _ = register(running, devices, app, "dev-full", binding="UQ")
    wait_for(lambda: asleep(running, "dev-full"))
    app.send("dev-full", json.dumps({"reqID": 1, "msgType": "read", "data": {"path": "/3/0/0"}}))
    full = app.command("dev-full", {"reqID": 2, "msgType": "read", "data": {"path": "/3/0/1"}})
    assert (full["data"]["code"], full["data"]["error"]) == ("4.00", "command queue full")
    device.update()
    assert content_map(app.response("dev-full", 1)) == {"/3/0/0": "Open Mobile Alliance"}


# --- auto_observe


def test_auto_observe_observes_listed_paths_after_registration(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients
) -> None:
    running = start_broker(gateways={"lwm2m": {"auto_observe": ["/3303/0"]}})
    app = application(running, clients)
    device, _ = register(running, devices, app, "dev-auto")
    request = device.expect_request()
    assert (request.method, request.path, request.observe) == ("GET", (3303, 0), 0)
    first = app.response("dev-auto", "auto-observe")
    assert (first["msgType"], first["data"]["code"]) == ("observe", "2.05")
    wait_for(lambda: device.observers((3303, 0)) == 1)
    device.set_value((3303, 0, 5700), 25.25)
    notify = app.next("lwm2m/dev-auto/up/notify")
    assert content_map(notify)["/3303/0/5700"] == 25.25


def test_auto_observe_all_observes_every_registered_instance_but_the_server_object(
    start_broker: Callable[..., Any], devices: DeviceFactory, clients: Clients
) -> None:
    running = start_broker(gateways={"lwm2m": {"auto_observe": ["all"]}})
    app = application(running, clients)
    device, _ = register(running, devices, app, "dev-auto-all")
    observed = {device.expect_request().path, device.expect_request().path}
    assert observed == {(3, 0), (3303, 0)}
    for _ in range(2):
        assert app.response("dev-auto-all", "auto-observe")["data"]["code"] == "2.05"
    wait_for(lambda: device.observers((3, 0)) == 1 and device.observers((3303, 0)) == 1)
    assert device.received() == []


# --- bad commands (issue 5, "Bad input")

BAD_COMMANDS: list[tuple[str, bytes, str]] = [
    ("not-json", b"{not json", "not JSON"),
    ("not-utf8", b"\xff\xfe", "not JSON"),
    ("json-array", b'[{"msgType":"read"}]', "JSON object"),
    ("no-msgtype", b'{"reqID":1,"data":{"path":"/3/0"}}', "msgType"),
    ("unknown-msgtype", b'{"reqID":1,"msgType":"reboot","data":{"path":"/3/0"}}', "msgType"),
    ("no-data", b'{"reqID":1,"msgType":"read"}', "data"),
    ("data-not-object", b'{"reqID":1,"msgType":"read","data":"/3/0"}', "data"),
    ("no-path", b'{"reqID":1,"msgType":"read","data":{}}', "path"),
    ("path-not-string", b'{"reqID":1,"msgType":"read","data":{"path":3}}', "path"),
    ("path-not-numeric", b'{"reqID":1,"msgType":"read","data":{"path":"/a/b"}}', "not numeric"),
    ("path-too-deep", b'{"reqID":1,"msgType":"read","data":{"path":"/1/2/3/4/5"}}', "1 to 4 levels"),
    ("path-out-of-range", b'{"reqID":1,"msgType":"read","data":{"path":"/70000"}}', "0..65535"),
    ("write-no-value", b'{"reqID":1,"msgType":"write","data":{"path":"/1/0/2"}}', "value"),
    (
        "write-wrong-type",
        b'{"reqID":1,"msgType":"write","data":{"path":"/1/0/2","value":true}}',
        "/1/0/2: expected Integer",
    ),
    (
        "write-not-integer-text",
        b'{"reqID":1,"msgType":"write","data":{"path":"/1/0/2","value":"12x"}}',
        "/1/0/2",
    ),
    (
        "write-integer-too-big",
        b'{"reqID":1,"msgType":"write","data":{"path":"/1/0/2","value":9223372036854775808}}',
        "outside the range",
    ),
    (
        "write-unknown-type",
        b'{"reqID":1,"msgType":"write","data":{"path":"/9/0/1","type":"Quaternion","value":1}}',
        "Quaternion",
    ),
    (
        "write-bad-objlnk",
        b'{"reqID":1,"msgType":"write","data":{"path":"/1/0/10","value":"11-0"}}',
        "/1/0/10",
    ),
    (
        "write-value-object",
        b'{"reqID":1,"msgType":"write","data":{"path":"/9999/0/1","value":{"a":1}}}',
        "/9999/0/1",
    ),
    (
        "batch-empty",
        b'{"reqID":1,"msgType":"write","data":{"basePath":"/1/0","content":[]}}',
        "content",
    ),
    (
        "batch-item-without-value",
        b'{"reqID":1,"msgType":"write","data":{"basePath":"/1/0","content":[{"path":"2"}]}}',
        "path and a value",
    ),
    ("write-attr-none", b'{"reqID":1,"msgType":"write-attr","data":{"path":"/3/0/9"}}', "write-attr needs"),
    (
        "write-attr-not-number",
        b'{"reqID":1,"msgType":"write-attr","data":{"path":"/3/0/9","pmin":[1]}}',
        "data.pmin",
    ),
    ("execute-args-number", b'{"reqID":1,"msgType":"execute","data":{"path":"/3/0/4","args":5}}', "args"),
    (
        "execute-args-lone-surrogate",
        b'{"reqID":1,"msgType":"execute","data":{"path":"/3/0/4","args":"\\ud800"}}',
        "args",
    ),
    (
        "write-attr-lone-surrogate",
        b'{"reqID":1,"msgType":"write-attr","data":{"path":"/3/0/9","pmin":"\\udfff"}}',
        "pmin",
    ),
    ("create-no-base-path", b'{"reqID":1,"msgType":"create","data":{"path":"/3303"}}', "basePath"),
]


@pytest.mark.parametrize(
    ("payload", "problem"), [c[1:] for c in BAD_COMMANDS], ids=[c[0] for c in BAD_COMMANDS]
)
def test_bad_command_gets_an_error_response_naming_the_problem(
    mqgate: Any, devices: DeviceFactory, app: Application, payload: bytes, problem: str
) -> None:
    device, _ = register(mqgate, devices, app, "dev-badcmd")
    app.send("dev-badcmd", payload)
    response = app.next("lwm2m/dev-badcmd/up/resp")
    data = response["data"]
    assert (data["code"], data["codeMsg"]) == ("4.00", "bad_request"), response
    assert problem in data["error"], data["error"]
    if payload.startswith(b'{"reqID":1'):
        assert response["reqID"] == 1
    assert counter(mqgate, "commands_invalid") == 1
    assert device.received() == []
    assert content_map(read(app, "dev-badcmd", "/3/0/9", "after")) == {"/3/0/9": 100}


def test_echoed_fields_with_lone_surrogates_come_back_as_escaped_json(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    """JSON may spell a lone surrogate (``"\\ud800"``); echoing it must not kill the gateway or the
    publisher's connection."""
    register(mqgate, devices, app, "dev-surrogate")
    app.send("dev-surrogate", b'{"reqID":"\\ud800","msgType":"read","data":{"path":"/3/0/9"}}')
    response = app.response("dev-surrogate", "\ud800")
    assert content_map(response) == {"/3/0/9": 100}
    app.send("dev-surrogate", b'{"reqID":"\\udfff","msgType":"read","data":{"path":"/3/x"}}')
    assert "not numeric" in app.response("dev-surrogate", "\udfff")["data"]["error"]
    assert content_map(read(app, "dev-surrogate", "/3/0/9", "after")) == {"/3/0/9": 100}


def test_commands_to_undefined_objects_reach_the_device_untyped_and_report_its_code(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-undef")
    write = app.command(
        "dev-undef", {"reqID": 1, "msgType": "write", "data": {"path": "/9999/0/1", "value": "x"}}
    )
    assert (write["data"]["code"], write["data"]["codeMsg"]) == ("4.04", "not_found")
    for req_id, msg_type in enumerate(("discover", "observe", "delete", "execute"), 2):
        response = app.command(
            "dev-undef", {"reqID": req_id, "msgType": msg_type, "data": {"path": "/9999/0"}}
        )
        assert response["data"]["code"] in ("4.04", "4.05"), response
    assert {r.path for r in device.received()} == {(9999, 0, 1), (9999, 0)}
    assert content_map(read(app, "dev-undef", "/3/0/9", "ok")) == {"/3/0/9": 100}


def test_device_answers_in_an_unknown_or_broken_format_are_reported_in_the_response(
    mqgate: Any, devices: DeviceFactory, app: Application
) -> None:
    device, _ = register(mqgate, devices, app, "dev-badfmt")
    device.canned = (1234, b"\x01\x02")
    content = read(app, "dev-badfmt", "/3/0/0", 1)["data"]["content"]
    assert "1234" in content["error"] and content["raw"] == "0102"
    for fmt, payload in (
        (TLV, b"\xc8\x00"),
        (SENML_JSON, b'[{"n":'),
        (SENML_CBOR, b"\xff\xff"),
        (LWM2M_JSON, b'{"e":5}'),
        (TEXT, b"\xff"),
    ):
        device.canned = (fmt, payload)
        data = read(app, "dev-badfmt", "/3/0/9", fmt)["data"]
        assert data["code"] == "2.05"
        assert set(data["content"]) == {"error", "raw"} and data["content"]["raw"] == payload.hex(), data
    device.canned = None
    assert content_map(read(app, "dev-badfmt", "/3/0/9", "ok")) == {"/3/0/9": 100}
