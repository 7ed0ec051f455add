"""Packet traces over real HTTP: ``POST /api/v5/trace`` for a client id writes every packet that client
sends and receives, whatever its protocol (paho over MQTT 5, a raw MQTT-SN device, libcoap's coap-client, a
simulated LwM2M device on aiocoap, an MQTT-SN node behind a serial pty), until the trace is deleted or its
time is up; other clients stay out.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from core.listeners.tcp import MqttTcpListener
from gateways.mqttsn import codec
from tests.integration.coap_helpers import coap_client, coap_uri
from tests.integration.helpers import TIMEOUT, Clients, wait_for
from tests.integration.lwm2m_device import SimulatedDevice
from tests.integration.mqttsn_helpers import SnClients, sn_port
from tests.integration.test_api import Api, api_of, trace_lines
from tests.integration.test_coap_dtls import DTLS_PSK, coaps, psk_credentials
from tests.integration.test_hardware_serial import Node, PtyPair, serial_link
from tests.integration.tls_helpers import TlsClient


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def traced(start_broker: Any, tmp_path: Path) -> Any:
    return start_broker(api={"trace_dir": str(tmp_path)})


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[PtyPair]:
    pair = PtyPair(tmp_path, "radio").start()
    yield pair
    pair.stop()


def start_trace(api: Api, name: str, client_id: str, duration: float = 600) -> None:
    body = {"name": name, "type": "clientid", "clientid": client_id, "duration": duration}
    reply = api.request("POST", "/api/v5/trace", body)
    assert reply.status == 200, reply.body


def packets(api: Api, name: str) -> list[tuple[str, str]]:
    """``(direction, packet)`` of every packet line of trace ``name``, each line checked for its fields."""
    found = []
    for line in trace_lines(api, name):
        if line["event"] != "packet":
            continue
        assert datetime.fromisoformat(line["time"]).utcoffset() is not None
        assert len(bytes.fromhex(line["hex"])) == min(line["size"], 1024)
        assert line["peer"].startswith(("127.0.0.1:", "serial:"))
        found.append((line["direction"], line["packet"]))
    return found


def kinds(found: list[tuple[str, str]], direction: str) -> list[str]:
    """The packet types seen in one direction (a CoAP line's type and code)."""
    return [" ".join(packet.split()[:2]) for way, packet in found if way == direction]


def hooks_of(running: Any) -> list[object]:
    """Every packet-trace hook of the running listeners, gateways and connections (all None: no cost)."""

    def collect() -> list[object]:
        hooks: list[object] = []
        for listener in running.app.listeners.values():
            if isinstance(listener, MqttTcpListener):
                hooks.append(listener.tracer)
                hooks.extend(protocol.trace for protocol in listener.connections)
            else:
                hooks.append(getattr(listener, "packet_trace", None))
        return hooks

    hooks: list[object] = running.call(collect)
    return hooks


def test_a_client_id_trace_writes_every_packet_of_its_client_in_every_protocol(
    traced: Any, clients: Clients
) -> None:
    api = api_of(traced)
    assert all(hook is None for hook in hooks_of(traced))
    for name, client_id in (("mqtt", "tr-mqtt"), ("sn", "tr-sn"), ("coap", "tr-coap"), ("ep", "tr-ep")):
        start_trace(api, name, client_id)

    paho = clients.paho(traced.port, "tr-mqtt", version=5)
    other = clients.paho(traced.port, "tr-other", version=5)
    assert paho.subscribe("t/mqtt", 1) == 1
    other.publish("t/mqtt", b"from other", 1)
    assert paho.expect().payload == b"from other"
    paho.publish("t/up", b"hello", 1)
    paho.disconnect()

    sn = SnClients(sn_port(traced))
    try:
        device = sn.raw()
        device.connect("tr-sn")
        topic_id = device.register("t/sn")
        device.publish_acked(topic_id, b"21.5", 1)
        device.disconnect()
        sn.raw().connect("tr-sn-other")
    finally:
        sn.close()

    posted = coap_client(
        coap_uri(traced, "mqtt/t/coap", {"c": "tr-coap", "p": "secret"}), "post", payload=b"7"
    )
    assert posted.returncode == 0, posted.stderr

    endpoint = SimulatedDevice("tr-ep", traced.app.listeners["lwm2m:udp"].port)
    try:
        endpoint.register()
        endpoint.deregister()
    finally:
        endpoint.close()

    def mqtt_done() -> list[tuple[str, str]] | None:
        found = packets(api, "mqtt")
        return found if any(p.startswith("DISCONNECT") for _, p in found) else None

    mqtt = wait_for(mqtt_done)
    assert kinds(mqtt, "in")[:2] == ["CONNECT client_id=tr-mqtt", "SUBSCRIBE id=1"]
    assert sorted(kinds(mqtt, "in")[2:]) == ["DISCONNECT reason_code=0", "PUBACK id=1", "PUBLISH topic=t/up"]
    assert kinds(mqtt, "out")[:2] == ["CONNACK session_present=0", "SUBACK id=1"]
    publish_in = next(p for way, p in mqtt if way == "in" and p.startswith("PUBLISH"))
    assert "qos=1" in publish_in and "retain=0" in publish_in and "payload_size=5" in publish_in
    delivered = next(p for way, p in mqtt if way == "out" and p.startswith("PUBLISH"))
    assert "topic=t/mqtt" in delivered and "payload_size=10" in delivered
    assert any(way == "out" and p.startswith("PUBACK") for way, p in mqtt)
    assert not any("tr-other" in str(line) for line in trace_lines(api, "mqtt") if line["event"] == "packet")

    sn_found = wait_for(lambda: (found := packets(api, "sn")) and len(kinds(found, "out")) >= 4 and found)
    assert [k.split()[0] for k in kinds(sn_found, "in")] == ["CONNECT", "REGISTER", "PUBLISH", "DISCONNECT"]
    assert [k.split()[0] for k in kinds(sn_found, "out")] == ["CONNACK", "REGACK", "PUBACK", "DISCONNECT"]
    assert "client_id=tr-sn " in sn_found[0][1] and "tr-sn-other" not in str(sn_found)
    assert all(line["protocol"] == "mqttsn" for line in trace_lines(api, "sn") if line["event"] == "packet")

    coap = wait_for(lambda: packets(api, "coap"))
    assert coap[0][0] == "in" and coap[0][1].startswith("CON POST mid=")
    assert "uri=/mqtt/t/coap?c=tr-coap&p=***" in coap[0][1] and "payload_size=1" in coap[0][1]
    assert "secret" not in str(trace_lines(api, "coap"))
    assert wait_for(lambda: kinds(packets(api, "coap"), "out")) == ["ACK 2.04"]

    lwm2m = wait_for(lambda: (found := packets(api, "ep")) and len(found) >= 4 and found)
    assert kinds(lwm2m, "in")[0] == "CON POST" and "CON DELETE" in kinds(lwm2m, "in")
    assert {"ACK 2.01", "ACK 2.02"} <= set(kinds(lwm2m, "out"))
    assert "uri=/rd?ep=tr-ep" in lwm2m[0][1]

    for name in ("mqtt", "sn", "coap", "ep"):
        assert api.request("DELETE", f"/api/v5/trace/{name}").status == 204
    assert all(hook is None for hook in hooks_of(traced))
    again = clients.paho(traced.port, "tr-mqtt", version=5)
    again.publish("t/up", b"after", 0)
    assert api.request("GET", "/api/v5/trace/mqtt/download").status == 404


def test_a_trace_of_a_connected_client_starts_with_its_next_packet(traced: Any, clients: Clients) -> None:
    api = api_of(traced)
    paho = clients.paho(traced.port, "tr-live", version=5)
    start_trace(api, "live", "tr-live")
    paho.publish("t/live", b"x", 1)
    found = wait_for(lambda: kinds(packets(api, "live"), "out"))
    assert found == ["PUBACK id=1"]
    assert kinds(packets(api, "live"), "in") == ["PUBLISH topic=t/live"]


def test_a_packet_trace_stops_at_its_end_time(traced: Any, clients: Clients) -> None:
    api = api_of(traced)
    start_trace(api, "timed", "tr-timed", duration=2)
    paho = clients.paho(traced.port, "tr-timed", version=5)
    wait_for(lambda: api.get("/api/v5/trace/timed")["status"] == "stopped", timeout=TIMEOUT)
    assert all(hook is None for hook in hooks_of(traced))
    before = trace_lines(api, "timed")
    assert kinds(packets(api, "timed"), "in") == ["CONNECT client_id=tr-timed"]
    paho.publish("t/late", b"late", 1)
    paho.disconnect()
    assert trace_lines(api, "timed") == before
    assert not any("t/late" in str(line) for line in before)


def test_the_packets_of_a_node_on_a_serial_link_are_traced(
    pty_pair: PtyPair, start_broker: Any, tmp_path: Path
) -> None:
    link = serial_link(pty_pair.gateway_end, "slip")
    running = start_broker(api={"trace_dir": str(tmp_path / "traces")}, hardware={"serial": [link]})
    api = api_of(running)
    start_trace(api, "radio", "tr-radio")
    node = Node(pty_pair.node_end, "slip")
    try:
        node.connect("tr-radio")
        node.publish(node.register("radio/up", 1), b"21.5", 2)
        node.send(codec.Disconnect())
        node.expect(codec.Disconnect)
    finally:
        node.close()
    found = wait_for(lambda: (found := packets(api, "radio")) and len(kinds(found, "out")) >= 4 and found)
    assert [k.split()[0] for k in kinds(found, "in")] == ["CONNECT", "REGISTER", "PUBLISH", "DISCONNECT"]
    assert [k.split()[0] for k in kinds(found, "out")] == ["CONNACK", "REGACK", "PUBACK", "DISCONNECT"]
    line = next(line for line in trace_lines(api, "radio") if line["event"] == "packet")
    assert (line["peer"], line["listener"]) == (
        f"serial:{pty_pair.gateway_end}",
        f"mqttsn:serial:{link['device']}",
    )


def test_the_packets_of_a_websocket_client_are_traced(start_broker: Any, tmp_path: Path) -> None:
    running = start_broker(
        api={"trace_dir": str(tmp_path)}, listeners={"ws": {"enabled": True, "bind": "127.0.0.1:0"}}
    )
    api = api_of(running)
    start_trace(api, "ws", "tr-ws")
    client = TlsClient(running.app.listeners["mqtt:ws"].port, "tr-ws", version=5, transport="websockets")
    try:
        client.wait_connected()
        client.publish("t/ws", b"over ws", 1)
    finally:
        client.close()
    found = wait_for(lambda: (found := packets(api, "ws")) and len(kinds(found, "out")) >= 2 and found)
    assert kinds(found, "in")[:2] == ["CONNECT client_id=tr-ws", "PUBLISH topic=t/ws"]
    assert kinds(found, "out")[:2] == ["CONNACK session_present=0", "PUBACK id=1"]
    assert {line["listener"] for line in trace_lines(api, "ws") if line["event"] == "packet"} == {"mqtt:ws"}


def test_the_packets_of_a_coap_client_over_dtls_are_traced_in_plaintext(
    start_broker: Any, tmp_path: Path
) -> None:
    """The trace sits in the DTLS layer: the CoAP messages are written decoded, not the encrypted records,
    and the handshake is not traced."""
    running = start_broker(api={"trace_dir": str(tmp_path)}, gateways={"coap": {"dtls": DTLS_PSK}})
    api = api_of(running)
    start_trace(api, "dtls", "tr-dtls")
    port = running.app.listeners["coap:dtls"].port
    result = coaps(port, "put", "mqtt/t/dtls?c=tr-dtls", credentials=psk_credentials(), payload="21.5")
    assert result.returncode == 0, result.stderr
    found = wait_for(lambda: (found := packets(api, "dtls")) and kinds(found, "out") and found)
    ((_, request),) = [(way, p) for way, p in found if way == "in"]
    assert request.startswith("CON PUT") and "uri=/mqtt/t/dtls?c=tr-dtls" in request, request
    assert "payload_size=4" in request
    assert kinds(found, "out") == ["ACK 2.04"]
    listeners = {line["listener"] for line in trace_lines(api, "dtls") if line["event"] == "packet"}
    assert listeners == {"coap:dtls"}
