"""The HTTP management API and /metrics over real HTTP, while real clients of every protocol are connected:
paho (MQTT 5), a raw MQTT-SN device that goes to sleep, a raw CoAP observer and a simulated LwM2M device.
Every JSON answer is validated against ``core/openapi.json``; /metrics is parsed with prometheus_client.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from gateways.coap.numbers import Code
from gateways.mqttsn import codec
from gateways.mqttsn.channel import ChannelState
from tests.integration.coap_helpers import RawCoap, coap_port
from tests.integration.helpers import TIMEOUT, Clients, paho_props, wait_for
from tests.integration.lwm2m_device import SimulatedDevice
from tests.integration.mqttsn_helpers import SnClients, gateway_of, sn_port
from tests.integration.test_cli import Mqgate, run_env

SPEC: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[2] / "core" / "openapi.json").read_text(encoding="utf-8")
)


# --- an HTTP client that checks every answer against the OpenAPI document


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _operation(path: str, method: str) -> dict[str, Any]:
    """The OpenAPI operation whose path template matches ``path``."""
    for template, item in SPEC["paths"].items():
        pattern = re.escape(template).replace(r"\{clientid\}", ".+").replace(r"\{topic\}", ".+")
        pattern = re.sub(r"\\\{[a-z]+\\\}", "[^/]+", pattern)
        if re.fullmatch(pattern, path.split("?")[0]) and method.lower() in item:
            operation: dict[str, Any] = item[method.lower()]
            return operation
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def check_against_spec(method: str, path: str, reply: Reply) -> None:
    responses = _operation(path, method)["responses"]
    assert str(reply.status) in responses, f"{method} {path}: status {reply.status} is not documented"
    content = responses[str(reply.status)].get("content")
    if content is None:
        assert reply.body == b""
        return
    media = reply.headers.get("Content-Type", "").split(";")[0]
    assert media in content, f"{method} {path}: {media} is not documented"
    if media == "application/json":
        schema = {**content[media]["schema"], "components": SPEC["components"]}
        jsonschema.Draft202012Validator(schema).validate(reply.json())


class Api:
    """Requests to the API of a running mqgate (``base`` is ``http://host:port``)."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        self.base = base
        self.headers = headers or {}

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        check: bool = True,
    ) -> Reply:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        all_headers = {**self.headers, **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = content_type
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                reply = Reply(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                reply = Reply(exc.code, dict(exc.headers), exc.read())
        assert reply.status < 500, f"{method} {path}: {reply.status} {reply.body!r}"
        if check:
            check_against_spec(method, path, reply)
        return reply

    def get(self, path: str, **kwargs: Any) -> Any:
        reply = self.request("GET", path, **kwargs)
        assert reply.status == 200, f"GET {path}: {reply.status} {reply.body!r}"
        return reply.json()


def api_of(running: Any, headers: dict[str, str] | None = None) -> Api:
    return Api(running.app.api.url, headers)


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def sn(mqgate: Any) -> Iterator[SnClients]:
    owned = SnClients(sn_port(mqgate))
    yield owned
    owned.close()


@pytest.fixture
def coap(mqgate: Any) -> Iterator[RawCoap]:
    raw = RawCoap(coap_port(mqgate))
    yield raw
    raw.close()


@pytest.fixture
def device(mqgate: Any) -> Iterator[SimulatedDevice]:
    simulated = SimulatedDevice("api-ep", mqgate.app.listeners["lwm2m:udp"].port)
    yield simulated
    simulated.close()


def metrics_of(api: Api) -> dict[str, Any]:
    """The scraped families by name, every one with its HELP text."""
    reply = api.request("GET", "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    for family in families.values():
        assert family.documentation, f"{family.name} has no # HELP"
    return families


def sample(families: dict[str, Any], family: str, name: str | None = None, **labels: str) -> float:
    for s in families[family].samples:
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {family} {labels}")


# --- every protocol at once


def test_clients_of_every_protocol_are_listed_with_their_state_and_figures(
    mqgate: Any, clients: Clients, sn: SnClients, coap: RawCoap, device: SimulatedDevice
) -> None:
    api = api_of(mqgate)
    paho = clients.paho(mqgate.port, "api-paho", version=5, keepalive=45)
    assert paho.subscribe("room/#", 1) == 1
    sleeper = sn.raw()
    sleeper.connect("api-sleeper", duration=30)
    sleeper.subscribe("sn/inbox", 1)
    sleeper.disconnect(60)
    observed = coap.request(Code.GET, "mqtt/room/temp", {"c": "api-coap"}, observe=0)
    assert observed.code == Code.CONTENT
    device.register()

    def everyone_there() -> bool:
        ids = {c["clientid"] for c in api.get("/api/v5/clients?limit=100")["data"]}
        return {"api-paho", "api-sleeper", "api-coap", "api-ep"} <= ids

    wait_for(everyone_there)
    by_protocol = {
        protocol: {c["clientid"] for c in api.get(f"/api/v5/clients?protocol={protocol}")["data"]}
        for protocol in ("mqtt", "mqttsn", "coap", "lwm2m")
    }
    assert by_protocol["mqtt"] == {"api-paho"}
    assert "api-sleeper" in by_protocol["mqttsn"]
    assert by_protocol["coap"] == {"api-coap"} and by_protocol["lwm2m"] == {"api-ep"}
    asleep = api.get("/api/v5/clients?state=asleep")["data"]
    assert [c["clientid"] for c in asleep] == ["api-sleeper"]

    mqtt = api.get("/api/v5/clients/api-paho")
    assert (mqtt["protocol"], mqtt["state"], mqtt["keepalive"], mqtt["proto_ver"]) == (
        "mqtt",
        "connected",
        45,
        5,
    )
    assert mqtt["subscriptions"] == [{"topic": "room/#", "qos": 1, "no_local": False}]
    assert mqtt["peer"].startswith("127.0.0.1:")

    # two API publishes: one reaches paho and the CoAP observer, one waits in the sleeper's queue
    assert api.get("/api/v5/topics")["meta"]["count"] >= 3
    sent = api.request("POST", "/api/v5/publish", {"topic": "room/temp", "payload": "21.5", "qos": 1})
    assert sent.json() == {"topic": "room/temp", "delivered": 2}
    assert paho.expect().payload == b"21.5"
    assert coap.notification(observed.token).payload == b"21.5"
    raw = base64.b64encode(b"\x00\x01").decode()
    sent = api.request(
        "POST", "/api/v5/publish", {"topic": "sn/inbox", "payload": raw, "encoding": "base64", "qos": 1}
    )
    assert sent.json()["delivered"] == 1
    sleeping = api.get("/api/v5/clients/api-sleeper")
    assert (sleeping["state"], sleeping["mqueue_len"], sleeping["link_state"]) == ("asleep", 1, "asleep")
    assert sleeping["keepalive"] == 30

    subscriptions = api.get("/api/v5/subscriptions?clientid=api-coap")["data"]
    assert subscriptions == [{"clientid": "api-coap", "protocol": "coap", "topic": "room/temp", "qos": 1}]

    gateways = {g["name"]: g for g in api.get("/api/v5/gateways")}
    assert set(gateways) == {"mqttsn", "coap", "lwm2m"}
    assert gateways["mqttsn"]["listeners"] == [
        {"id": "mqttsn:udp", "address": mqgate.app.listeners["mqttsn:udp"].address}
    ]
    assert gateways["mqttsn"]["counters"]["datagrams_in"] >= 3
    assert "api-coap" in api.get("/api/v5/gateways/coap")["clients"]
    assert api.get("/api/v5/gateways/lwm2m")["clients"] == ["api-ep"]

    lwm2m = api.get("/api/v5/lwm2m/api-ep")
    assert lwm2m["endpoint"] == "api-ep" and lwm2m["lifetime"] == 60
    assert {"/1", "/1/0", "/3/0", "/3303/0"} <= set(lwm2m["objects"])

    families = metrics_of(api)
    assert sample(families, "mqgate_connections", protocol="mqtt") == 1
    assert sample(families, "mqgate_connections", protocol="coap") == 1
    assert sample(families, "mqgate_connections", protocol="lwm2m") == 1
    assert sample(families, "mqgate_sleeping_devices", protocol="mqttsn") == 1
    assert sample(families, "mqgate_queued_messages", protocol="mqttsn") == 1
    assert sample(families, "mqgate_messages_published") >= 2
    assert sample(families, "mqgate_gateway_events", listener="mqttsn:udp", event="datagrams_in") >= 3
    assert families["mqgate_messages_dropped"].type == "counter"
    assert sample(families, "process_resident_memory_bytes") > 0
    assert sample(families, "process_cpu_seconds") > 0


def test_metrics_count_what_an_mqtt_client_did(mqgate: Any, clients: Clients) -> None:
    api = api_of(mqgate)
    before = metrics_of(api)
    publisher = clients.paho(mqgate.port, "metrics-pub", version=5)
    for index in range(5):
        publisher.publish("nobody/listens", f"m{index}".encode(), 1)
    families = metrics_of(api)
    received = sample(families, "mqgate_messages_received", protocol="mqtt", qos="1") - sample(
        before, "mqgate_messages_received", protocol="mqtt", qos="1"
    )
    assert received == 5
    dropped = sample(families, "mqgate_messages_dropped", reason="no_subscribers") - sample(
        before, "mqgate_messages_dropped", reason="no_subscribers"
    )
    assert dropped == 5
    assert sample(families, "mqgate_bytes_received") > sample(before, "mqgate_bytes_received")
    assert sample(families, "mqgate_sessions", protocol="mqtt") == 1


def test_metrics_count_refused_authentications(start_broker: Any, clients: Clients) -> None:
    running = start_broker(auth={"allow_anonymous": False})
    refused = clients.paho(running.port, "anonymous", version=5, check=False)
    assert refused.connack is not None and refused.connack.reason_code == 0x87
    families = metrics_of(api_of(running))
    assert sample(families, "mqgate_auth", result="failure") == 1
    assert sample(families, "mqgate_auth", result="success") == 0


def test_acl_cache_delete_is_204(mqgate: Any) -> None:
    assert api_of(mqgate).request("DELETE", "/api/v5/acl-cache").status == 204


def test_delete_client_kicks_the_connection_with_administrative_action(mqgate: Any, clients: Clients) -> None:
    api = api_of(mqgate)
    paho = clients.paho(mqgate.port, "to-kick", version=5)
    assert api.request("DELETE", "/api/v5/clients/to-kick").status == 204
    assert paho.expect_disconnect().reason_code == 0x98
    assert api.request("GET", "/api/v5/clients/to-kick").status == 404
    assert mqgate.call(lambda: "to-kick" in mqgate.broker.sessions) is False


def test_client_ids_with_slashes_and_unicode_are_found(mqgate: Any, clients: Clients) -> None:
    api = api_of(mqgate)
    clients.paho(mqgate.port, "site/ä/1", version=5)
    assert api.get("/api/v5/clients/site%2F%C3%A4%2F1")["clientid"] == "site/ä/1"


def test_retained_messages_are_listed_and_deleted(mqgate: Any, clients: Clients) -> None:
    api = api_of(mqgate)
    body = {"topic": "state/lamp", "payload": "on", "retain": True}
    assert api.request("POST", "/api/v5/publish", body).json()["delivered"] == 0
    listed = api.get("/api/v5/retained")["data"]
    assert {
        "topic": "state/lamp",
        "qos": 0,
        "payload": "b24=",
        "payload_size": 2,
        "from_clientid": "",
    } in listed
    assert api.get("/api/v5/retained/state/lamp")["payload"] == "b24="
    watcher = clients.paho(mqgate.port, "retained-watcher", version=5)
    watcher.subscribe("state/#", 0)
    assert watcher.expect().payload == b"on"
    assert api.request("DELETE", "/api/v5/retained/state/lamp").status == 204
    assert api.request("DELETE", "/api/v5/retained/state/lamp").status == 404
    assert api.request("GET", "/api/v5/retained/state/lamp").status == 404


# --- listeners


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_listener_restarts_on_a_new_port_while_the_gateway_client_stays_connected(
    mqgate: Any, clients: Clients, sn: SnClients
) -> None:
    api = api_of(mqgate)
    device = sn.raw()
    device.connect("stays-connected", duration=60)
    old_port = mqgate.port
    new_port = free_port()
    app = mqgate.app
    tcp = dataclasses.replace(app.config.listeners.tcp, bind=f"127.0.0.1:{new_port}")
    changed = dataclasses.replace(app.config, listeners=dataclasses.replace(app.config.listeners, tcp=tcp))

    def change() -> None:
        app.config = changed

    mqgate.call(change)
    reply = api.request("POST", "/api/v5/listeners/mqtt:tcp/restart")
    assert reply.status == 200
    assert reply.json()["address"] == f"127.0.0.1:{new_port}"
    listeners = {item["id"]: item["address"] for item in api.get("/api/v5/listeners")}
    assert listeners["mqtt:tcp"] == f"127.0.0.1:{new_port}"
    assert listeners["mqttsn:udp"] == app.listeners["mqttsn:udp"].address

    paho = clients.paho(new_port, "on-the-new-port", version=5)
    assert paho.subscribe("after/restart", 0) == 0
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", old_port), TIMEOUT):
        pass
    # the MQTT-SN device kept its session and its channel: it publishes to the new paho subscriber
    topic_id = device.register("after/restart")
    device.publish(topic_id, b"still here", 0)
    assert paho.expect().payload == b"still here"
    device.send(codec.Pingreq(None))
    device.expect(codec.Pingresp)
    state = mqgate.call(lambda: gateway_of(mqgate).by_client["stays-connected"].state)
    assert state is ChannelState.ACTIVE


def test_listeners_show_the_failed_handshakes_of_a_websocket_listener(start_broker: Any) -> None:
    ws = {"enabled": True, "bind": "127.0.0.1:0", "allowed_origins": ["https://app.example.com"]}
    running = start_broker(listeners={"ws": ws})
    api = api_of(running)
    address = running.app.listeners["mqtt:ws"].address
    with pytest.raises(InvalidStatus):
        connect(f"ws://{address}/mqtt", origin=Origin("https://evil.example.net"), open_timeout=TIMEOUT)
    listeners = {item["id"]: item for item in api.get("/api/v5/listeners")}
    assert listeners["mqtt:ws"]["handshake_failures"] == 1
    assert "handshake_failures" not in listeners["mqtt:tcp"]  # plain TCP has no handshake
    assert "handshake_failures" not in listeners["coap:udp"]


def test_restart_of_an_unknown_listener_is_404(mqgate: Any) -> None:
    reply = api_of(mqgate).request("POST", "/api/v5/listeners/nope:tcp/restart")
    assert reply.status == 404 and reply.json()["code"] == "LISTENER_NOT_FOUND"


def test_restart_on_a_port_in_use_is_409_and_names_the_address(mqgate: Any) -> None:
    app = mqgate.app
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f"127.0.0.1:{taken.getsockname()[1]}"
        tcp = dataclasses.replace(app.config.listeners.tcp, bind=bind)
        changed = dataclasses.replace(
            app.config, listeners=dataclasses.replace(app.config.listeners, tcp=tcp)
        )

        def change() -> None:
            app.config = changed

        mqgate.call(change)
        reply = api_of(mqgate).request("POST", "/api/v5/listeners/mqtt:tcp/restart")
    assert reply.status == 409
    assert bind in reply.json()["message"]


# --- bad input


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/api/v5/publish", b'{"topic": ', 400),
        ("POST", "/api/v5/publish", b"[1, 2]", 400),
        ("POST", "/api/v5/publish", b'{"topic": "a", "colour": "red"}', 400),
        ("POST", "/api/v5/publish", b'{"topic": 5}', 400),
        ("POST", "/api/v5/publish", b'{"topic": "a", "qos": "1"}', 400),
        ("POST", "/api/v5/publish", b'{"topic": "a", "qos": true}', 400),
        ("POST", "/api/v5/publish", b'{"topic": "a", "retain": 1}', 400),
        ("POST", "/api/v5/publish", b'{"topic": "a/+"}', 400),
        ("POST", "/api/v5/publish", b'{"topic": "$SYS/x"}', 400),
        ("POST", "/api/v5/publish", b'{"topic": "a", "payload": "***", "encoding": "base64"}', 400),
        ("POST", "/api/v5/publish", b'{"topic": "a", "payload": "\\ud800"}', 400),
        ("POST", "/api/v5/publish", b"\xff\xfe", 400),
        ("GET", "/api/v5/clients?page=0", None, 400),
        ("GET", "/api/v5/clients?limit=x", None, 400),
        ("GET", "/api/v5/clients?protocol=http", None, 400),
        ("GET", "/api/v5/clients?state=dead", None, 400),
        ("GET", "/api/v5/clients/nobody", None, 404),
        ("DELETE", "/api/v5/clients/nobody", None, 404),
        ("GET", "/api/v5/gateways/smtp", None, 404),
        ("GET", "/api/v5/lwm2m/nobody", None, 404),
    ],
)
def test_bad_requests_get_a_json_4xx(
    mqgate: Any, method: str, path: str, body: bytes | None, status: int
) -> None:
    reply = api_of(mqgate).request(method, path, raw=body)
    assert reply.status == status, reply.body
    error = reply.json()
    assert set(error) == {"code", "message"} and error["message"]
    assert "Traceback" not in error["message"]


def test_unknown_paths_wrong_methods_and_media_types_get_a_json_4xx(mqgate: Any) -> None:
    api = api_of(mqgate)
    for method, path, status in (("GET", "/api/v5/nothing", 404), ("PUT", "/api/v5/clients", 405)):
        reply = api.request(method, path, check=False)
        assert reply.status == status
        assert set(reply.json()) == {"code", "message"}
    reply = api.request("POST", "/api/v5/publish", raw=b"topic=a", content_type="text/plain")
    assert (reply.status, reply.json()["code"]) == (415, "UNSUPPORTED_MEDIA_TYPE")


def test_an_oversized_body_is_413(start_broker: Any) -> None:
    running = start_broker(api={"max_body_size": 1024})
    body = {"topic": "big", "payload": "x" * 4096}
    reply = api_of(running).request("POST", "/api/v5/publish", body)
    assert reply.status == 413
    assert reply.json()["code"] == "REQUEST_TOO_LARGE"


def test_configured_keys_are_required_as_bearer_or_basic(start_broker: Any) -> None:
    running = start_broker(api={"keys": ["s3cret-token", "admin:pa55"]})
    anonymous = api_of(running).request("GET", "/api/v5/clients")
    assert anonymous.status == 401 and anonymous.json()["code"] == "UNAUTHORIZED"
    assert api_of(running).request("GET", "/metrics").status == 401
    bearer = api_of(running, {"Authorization": "Bearer s3cret-token"})
    assert bearer.get("/api/v5/clients")["meta"]["count"] >= 0
    basic = base64.b64encode(b"admin:pa55").decode()
    assert api_of(running, {"Authorization": f"Basic {basic}"}).get("/api/v5/listeners")
    for header in (
        "Bearer wrong",
        "Basic " + base64.b64encode(b"admin:nope").decode(),
        "Basic !!!",
        "Digest x",
    ):
        assert api_of(running, {"Authorization": header}).request("GET", "/api/v5/clients").status == 401


def test_the_openapi_document_is_served(mqgate: Any) -> None:
    assert api_of(mqgate).get("/api/v5/openapi.json") == SPEC


# --- JSON logs of a real mqgate process


def test_json_logs_are_one_object_per_line_with_rfc3339_times_and_whole_client_ids(clients: Clients) -> None:
    env = run_env(MQGATE_LOG__FORMAT="json", MQGATE_LOG__LEVEL="info")
    process = Mqgate(env=env)
    try:
        started = process.wait_line(r"api:http listening on ([0-9.]+:[0-9]+)")
        api = Api("http://" + started.group(1))
        listeners = {item["id"]: item["address"] for item in api.get("/api/v5/listeners")}
        port = int(listeners["mqtt:tcp"].rsplit(":", 1)[1])
        long_id = "device-" + "x" * 300
        paho = clients.paho(port, long_id, version=5)
        assert api.request("DELETE", "/api/v5/clients/" + long_id).status == 204
        paho.expect_disconnect()
        process.wait_line("kicked")
        process.process.send_signal(signal.SIGTERM)
        assert process.wait_exit() == 0
    finally:
        process.stop()
    entries = [json.loads(line) for line in process.seen]
    assert entries
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)
        assert datetime.fromisoformat(entry["time"]).utcoffset() is not None
        assert entry["level"] in ("debug", "info", "warning", "error", "critical")
    kicked = [e for e in entries if "kicked" in e["message"]]
    assert kicked and long_id in kicked[0]["message"]
    assert (kicked[0]["clientid"], kicked[0]["protocol"]) == (long_id, "mqtt")
    assert kicked[0]["peer"].startswith("127.0.0.1:")
    assert any(e["message"] == "mqgate stopped" for e in entries)


# --- mqgate ctl


def ctl(running: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.cli", "ctl", "--url", running.app.api.url, *args],
        cwd=Path(__file__).resolve().parents[2],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_ctl_lists_clients_kicks_one_and_restarts_a_listener(
    mqgate: Any, clients: Clients, sn: SnClients
) -> None:
    paho = clients.paho(mqgate.port, "ctl-paho", version=5)
    sleeper = sn.raw()
    sleeper.connect("ctl-sleeper")
    sleeper.disconnect(60)
    listed = ctl(mqgate, "clients", "--state", "asleep")
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[:3] for line in listed.stdout.splitlines()] == [
        ["ctl-sleeper", "mqttsn", "asleep"]
    ]
    as_json = json.loads(ctl(mqgate, "--json", "clients", "--protocol", "mqtt").stdout)
    assert [c["clientid"] for c in as_json["data"]] == ["ctl-paho"]

    kicked = ctl(mqgate, "kick", "ctl-paho")
    assert (kicked.returncode, kicked.stdout) == (0, "kicked ctl-paho\n")
    assert paho.expect_disconnect().reason_code == 0x98
    again = ctl(mqgate, "kick", "ctl-paho")
    assert again.returncode == 1 and "404" in again.stderr and "ctl-paho" in again.stderr

    restarted = ctl(mqgate, "listeners", "restart", "coap:udp")
    assert restarted.returncode == 0, restarted.stderr
    address = mqgate.call(lambda: mqgate.app.listeners["coap:udp"].address)
    assert restarted.stdout == f"restarted coap:udp on {address}\n"
    assert f"coap:udp\t{address}" in ctl(mqgate, "listeners").stdout.splitlines()


def test_ctl_without_a_reachable_api_exits_2(mqgate: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "core.cli", "ctl", "--url", f"http://127.0.0.1:{free_port()}", "clients"],
        cwd=Path(__file__).resolve().parents[2],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and "cannot reach" in result.stderr


# --- traces


def trace_lines(api: Api, name: str) -> list[dict[str, Any]]:
    reply = api.request("GET", f"/api/v5/trace/{name}/download")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in reply.body.decode().splitlines()]


def test_a_client_trace_and_a_topic_trace_record_what_happened(
    start_broker: Any, clients: Clients, tmp_path: Path
) -> None:
    running = start_broker(api={"trace_dir": str(tmp_path)})
    api = api_of(running)
    started = api.request("POST", "/api/v5/trace", {"name": "who", "type": "clientid", "clientid": "traced"})
    assert started.status == 200 and started.json()["status"] == "running"
    api.request("POST", "/api/v5/trace", {"name": "what", "type": "topic", "topic": "sensors/#"})
    traced = clients.paho(running.port, "traced", version=5)
    assert traced.subscribe("cmd/#", 1) == 1
    clients.paho(running.port, "other", version=5).publish("cmd/lamp", b"on", 1)
    assert traced.expect().payload == b"on"
    traced.publish("sensors/temp", b"21", 1)
    traced.publish("elsewhere", b"x", 0)

    who = [e for e in trace_lines(api, "who") if e["event"] != "packet"]  # packets: see test_trace.py
    assert [e["event"] for e in who] == ["connected", "subscribe", "deliver", "publish", "publish"]
    assert who[2]["topic"] == "cmd/lamp" and base64.b64decode(who[2]["payload"]) == b"on"
    assert all(datetime.fromisoformat(e["time"]).utcoffset() is not None for e in who)
    what = trace_lines(api, "what")
    assert [(e["event"], e["clientid"], e["topic"]) for e in what] == [("publish", "traced", "sensors/temp")]
    assert {t["name"] for t in api.get("/api/v5/trace")} == {"who", "what"}

    assert api.request("DELETE", "/api/v5/trace/who").status == 204
    assert api.request("GET", "/api/v5/trace/who").status == 404
    assert not (tmp_path / "who.jsonl").exists()
    assert api.request("POST", "/api/v5/trace", {"name": "what", "type": "topic", "topic": "a"}).status == 409


def test_a_trace_stops_by_itself_at_its_end_time(start_broker: Any, clients: Clients, tmp_path: Path) -> None:
    running = start_broker(api={"trace_dir": str(tmp_path)})
    api = api_of(running)
    api.request("POST", "/api/v5/trace", {"name": "short", "type": "topic", "topic": "#", "duration": 1})
    wait_for(lambda: api.get("/api/v5/trace/short")["status"] == "stopped", timeout=TIMEOUT)
    clients.paho(running.port, "late", version=5).publish("after/end", b"x", 1)
    assert trace_lines(api, "short") == []
    assert api.get("/api/v5/trace/short")["events"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "type": "peer", "clientid": "c"},
        {"name": "x", "type": "clientid"},
        {"name": "x", "type": "clientid", "clientid": "c", "topic": "t"},
        {"name": "../x", "type": "clientid", "clientid": "c"},
        {"name": "x", "type": "topic", "topic": "a/#/b"},
        {"name": "x", "type": "clientid", "clientid": "c", "duration": 0},
        {"name": "x", "type": "clientid", "clientid": "c", "duration": "long"},
        {"name": "x", "type": "clientid", "clientid": "c", "colour": "red"},
    ],
)
def test_bad_trace_requests_are_400(start_broker: Any, tmp_path: Path, body: dict[str, Any]) -> None:
    running = start_broker(api={"trace_dir": str(tmp_path)})
    reply = api_of(running).request("POST", "/api/v5/trace", body)
    assert reply.status == 400, reply.body
    assert list(tmp_path.iterdir()) == []


# --- alarms


def test_a_full_queue_raises_an_alarm_cleared_when_the_client_drains_it(
    start_broker: Any, clients: Clients
) -> None:
    running = start_broker(broker={"max_mqueue_len": 2})
    api = api_of(running)
    watcher = clients.paho(running.port, "alarm-watcher", version=5)
    assert watcher.subscribe("$SYS/brokers/+/alarms/#", 0) == 0
    expiry = paho_props("CONNECT", SessionExpiryInterval=300)
    sleepy = clients.paho(running.port, "sleepy", version=5, clean_start=False, properties=expiry)
    assert sleepy.subscribe("queue/#", 1) == 1
    sleepy.disconnect()
    wait_for(lambda: api.get("/api/v5/clients/sleepy")["state"] == "offline")
    publisher = clients.paho(running.port, "filler", version=5)
    publisher.publish("queue/a", b"1", 1)
    publisher.publish("queue/b", b"2", 1)

    active = api.get("/api/v5/alarms?activated=true")["data"]
    assert [a["name"] for a in active] == ["queue_full/sleepy"]
    assert (
        active[0]["details"] == {"clientid": "sleepy", "protocol": "mqtt"}
        and active[0]["deactivate_at"] is None
    )
    raised = watcher.expect()
    assert (
        raised.topic.endswith("/alarms/activate")
        and json.loads(raised.payload)["name"] == "queue_full/sleepy"
    )

    back = clients.paho(running.port, "sleepy", version=5, clean_start=False, properties=expiry)
    assert [back.expect().payload for _ in range(2)] == [b"1", b"2"]
    wait_for(lambda: api.get("/api/v5/alarms?activated=true")["data"] == [])
    cleared = api.get("/api/v5/alarms?activated=false")["data"]
    assert [a["name"] for a in cleared] == ["queue_full/sleepy"]
    start = datetime.fromisoformat(cleared[0]["activate_at"])
    end = datetime.fromisoformat(cleared[0]["deactivate_at"])
    assert abs((end - start).total_seconds() - cleared[0]["duration"]) < 0.01
    lowered = watcher.expect()
    assert lowered.topic.endswith("/alarms/deactivate") and json.loads(lowered.payload)["activated"] is False


def test_ctl_starts_downloads_and_stops_a_trace(start_broker: Any, clients: Clients, tmp_path: Path) -> None:
    running = start_broker(api={"trace_dir": str(tmp_path)})
    started = ctl(running, "trace", "start", "t1", "--topic", "ctl/#", "--duration", "60")
    assert started.returncode == 0 and started.stdout.startswith("trace t1 running until "), started.stderr
    clients.paho(running.port, "ctl-pub", version=5).publish("ctl/x", b"hi", 1)
    listed = ctl(running, "trace", "list")
    assert listed.stdout.split("\t")[:4] == ["t1", "topic", "ctl/#", "running"]
    downloaded = ctl(running, "trace", "download", "t1")
    events = [json.loads(line) for line in downloaded.stdout.splitlines()]
    assert [(e["event"], e["clientid"], e["topic"]) for e in events] == [("publish", "ctl-pub", "ctl/x")]
    assert ctl(running, "trace", "stop", "t1").stdout == "trace t1 stopped and deleted\n"
    assert ctl(running, "trace", "download", "t1").returncode == 1


def test_lwm2m_read_and_write_through_the_api_answer_with_the_device_response(
    mqgate: Any, device: SimulatedDevice
) -> None:
    api = api_of(mqgate)
    device.register()
    wait_for(lambda: api.request("GET", "/api/v5/lwm2m/api-ep", check=False).status == 200)
    read = api.request("POST", "/api/v5/lwm2m/api-ep/read", {"path": "/3/0/0"})
    assert read.status == 200, read.body
    answer = read.json()
    assert answer["msgType"] == "read" and answer["data"]["code"] == "2.05"
    assert answer["data"]["content"] == [{"path": "/3/0/0", "value": "Open Mobile Alliance"}]
    written = api.request("POST", "/api/v5/lwm2m/api-ep/write", {"path": "/3303/0/5750", "value": "kitchen"})
    assert written.json()["data"]["code"] == "2.04"
    assert device.value((3303, 0, 5750)) == "kitchen"
    refused = api.request("POST", "/api/v5/lwm2m/api-ep/read", {"nopath": 1}).json()
    assert refused["data"]["code"] == "4.00"
    assert api.request("POST", "/api/v5/lwm2m/nobody/read", {"path": "/3/0/0"}).status == 404
    assert api.request("POST", "/api/v5/lwm2m/api-ep/reboot", {"path": "/3/0/4"}, check=False).status == 404
    assert mqgate.call(lambda: [c for c in mqgate.broker.sessions if c.startswith("$api/")]) == []
