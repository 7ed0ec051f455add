"""/metrics and $SYS count messages and payload bytes per protocol and QoS: real clients of every protocol
(paho MQTT 5, raw MQTT-SN including a QoS -1 datagram, raw CoAP, a simulated LwM2M device) publish known
numbers of messages of known sizes, /metrics is scraped over HTTP and parsed with prometheus_client, and the
$SYS mirror is read by an MQTT subscriber. Edge mode counts the devices' traffic the same way.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from gateways.coap import codec as coap_codec
from gateways.coap.codec import CoapMessage
from gateways.coap.numbers import Code, OptionNumber
from gateways.mqttsn import codec
from gateways.mqttsn.numbers import TopicIdType
from tests.integration.coap_helpers import ACK, CON, RST, RawCoap, coap_port, path_options, query_options
from tests.integration.helpers import TIMEOUT, Clients, wait_for
from tests.integration.lwm2m_device import SimulatedDevice
from tests.integration.mqttsn_helpers import SnClients, sn_port
from tests.integration.test_api import api_of, metrics_of, sample
from tests.integration.test_edge_mode import Edges

PROTOCOLS = ("mqtt", "mqttsn", "coap", "lwm2m")
Figures = dict[tuple[str, int], tuple[int, int]]
"""(protocol, QoS) -> (messages, payload bytes)."""


@pytest.fixture
def owned() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def traffic(families: dict[str, Any], direction: str) -> Figures:
    """The scraped messages and payload bytes ``received`` or ``sent``, by (protocol, QoS), zeros left out."""
    figures: Figures = {}
    for protocol in PROTOCOLS:
        for qos in range(3):
            labels = {"protocol": protocol, "qos": str(qos)}
            count = int(sample(families, f"mqgate_messages_{direction}", **labels))
            size = int(sample(families, f"mqgate_payload_bytes_{direction}", **labels))
            if count or size:
                figures[protocol, qos] = (count, size)
    return figures


def add(figures: Figures, protocol: str, qos: int, payload: bytes | bytearray) -> None:
    count, size = figures.get((protocol, qos), (0, 0))
    figures[protocol, qos] = (count + 1, size + len(payload))


def test_messages_and_payload_bytes_are_counted_per_protocol_and_qos(
    start_broker: Any, owned: ExitStack
) -> None:
    running = start_broker(gateways={"mqttsn": {"predefined": {"1": "metrics/sn-q3"}}, "lwm2m": {"qos": 1}})
    clients = owned.enter_context(Clients())
    received: Figures = {}
    sent: Figures = {}
    watch = clients.paho(running.port, "m-watch", version=5)
    assert watch.subscribe("#", 2) == 2
    sn = SnClients(sn_port(running))
    owned.callback(sn.close)
    device = sn.raw()
    device.connect("m-sn")
    device.subscribe("metrics/to-sn", 1)
    topic_id = device.register("metrics/sn")
    coap = RawCoap(coap_port(running))
    owned.callback(coap.close)
    observe = coap.request(Code.GET, "mqtt/metrics/to-coap", {"c": "m-coap", "qos": "1"}, observe=0)
    assert observe.code == Code.CONTENT
    lwm2m = SimulatedDevice("m-ep", running.app.listeners["lwm2m:udp"].port)
    owned.callback(lwm2m.close)
    lwm2m.register()

    publisher = clients.paho(running.port, "m-pub", version=5)
    for qos, payload, times in ((0, b"a" * 10, 3), (1, b"b" * 20, 2), (2, b"c" * 30, 1)):
        for _ in range(times):
            publisher.publish("metrics/mqtt", payload, qos)
            add(received, "mqtt", qos, payload)
    publisher.publish("metrics/to-sn", b"d" * 12, 2)  # the MQTT-SN device subscribed at QoS 1
    add(received, "mqtt", 2, b"d" * 12)
    add(sent, "mqttsn", 1, b"d" * 12)
    publisher.publish("metrics/to-coap", b"e" * 14, 1)
    add(received, "mqtt", 1, b"e" * 14)
    add(sent, "coap", 1, b"e" * 14)
    command = json.dumps({"reqID": 7, "msgType": "read", "data": {"path": "/3/0/0"}}).encode()
    publisher.publish("lwm2m/m-ep/dn", command, 1)  # the gateway subscribes to commands at QoS 0
    add(received, "mqtt", 1, command)
    add(sent, "lwm2m", 0, command)

    assert device.receive_publish().data == b"d" * 12

    for qos, payload in ((0, b"f" * 5), (0, b"f" * 5), (1, b"g" * 7), (2, b"h" * 9)):
        if qos:
            device.publish_acked(topic_id, payload, qos)
        else:
            device.publish(topic_id, payload)
        add(received, "mqttsn", qos, payload)
    sn.raw().send(codec.Publish(1, b"i" * 3, -1, 0, TopicIdType.PREDEFINED))
    add(received, "mqttsn", 0, b"i" * 3)  # QoS -1 is a QoS 0 message in the broker
    for qos, payload in ((0, b"j" * 4), (1, b"k" * 6), (2, b"l" * 8)):
        answer = coap.request(Code.PUT, "mqtt/metrics/coap", {"c": "m-coap", "qos": str(qos)}, payload)
        assert answer.code == Code.CHANGED
        add(received, "coap", qos, payload)
    notification = coap.notification(observe.token)
    assert notification.payload == b"e" * 14
    coap_datagrams = 4  # the observe GET and three PUTs
    if notification.mtype == CON:
        coap.ack(notification)
        coap_datagrams += 1

    # the watcher sees everything: the LwM2M uplinks (register, the read response) are counted as it saw them
    mqtt, to_others, mqttsn, coap_puts, lwm2m_uplinks = 6, 3, 5, 3, 2
    seen: list[paho.MQTTMessage] = watch.expect_many(mqtt + to_others + mqttsn + coap_puts + lwm2m_uplinks)
    for message in seen:
        if message.topic.startswith("lwm2m/m-ep/up/"):
            add(received, "lwm2m", message.qos, message.payload)
    assert Counter(m.topic for m in seen if m.topic.startswith("lwm2m/")) == {
        "lwm2m/m-ep/up/register": 1,
        "lwm2m/m-ep/dn": 1,
        "lwm2m/m-ep/up/resp": 1,
    }
    for message in seen:
        add(sent, "mqtt", message.qos, message.payload)
    watch.expect_none(0.1)

    api = api_of(running)
    families = metrics_of(api)
    assert traffic(families, "received") == received
    assert traffic(families, "sent") == sent
    assert received["lwm2m", 1][0] == 2 and received["mqttsn", 0] == (3, 13)
    assert sample(families, "mqgate_messages_redelivered", protocol="mqttsn", qos="1") == 0
    assert sample(families, "mqgate_bytes_received", protocol="mqtt") > received["mqtt", 0][1]
    coap_events = {"listener": "coap:udp", "event": "datagrams_in"}
    wait_for(lambda: sample(metrics_of(api), "mqgate_gateway_events", **coap_events) == coap_datagrams)
    assert sample(families, "mqgate_retransmissions", protocol="coap", listener="coap:udp") == 0
    published = sample(families, "mqgate_messages_published")
    assert published == sum(count for count, _ in received.values())
    dropped = sample(families, "mqgate_messages_dropped", reason="no_subscribers")

    # $SYS mirrors the totals per protocol; publishing it counts as neither published nor dropped
    running.call(lambda: running.broker.publish_sys(running.loop.time()))
    system = clients.paho(running.port, "m-sys", version=5)
    assert system.subscribe("$SYS/brokers/+/messages/#", 0) == 0
    values: dict[str, str] = {}
    needed = {f"messages/{d}/{p}" for d in ("received", "sent", "redelivered") for p in PROTOCOLS}
    while not needed | {"messages/received", "messages/sent"} <= values.keys():
        message = system.expect()
        values[message.topic.split("/", 3)[3]] = message.payload.decode()
    for protocol in PROTOCOLS:
        total = sum(received.get((protocol, qos), (0, 0))[0] for qos in range(3))
        assert values[f"messages/received/{protocol}"] == str(total)
        total = sum(sent.get((protocol, qos), (0, 0))[0] for qos in range(3))
        assert values[f"messages/sent/{protocol}"] == str(total)
    assert values["messages/received"] == str(sum(count for count, _ in received.values()))
    assert values["messages/sent"] == str(sum(count for count, _ in sent.values()))
    after = metrics_of(api)
    assert sample(after, "mqgate_messages_published") == published
    assert sample(after, "mqgate_messages_dropped", reason="no_subscribers") == dropped


def test_edge_mode_counts_the_devices_traffic(start_broker: Any, owned: ExitStack, tmp_path: Path) -> None:
    upstream = start_broker()
    edges = Edges(tmp_path)
    owned.callback(edges.close)
    edge = edges.start(f"mqtt://127.0.0.1:{upstream.port}", "aggregating")
    clients = owned.enter_context(Clients())
    watch = clients.paho(upstream.port, "edge-watch", version=5)
    assert watch.subscribe("edge/up", 1) == 1
    sn = SnClients(sn_port(edge))
    owned.callback(sn.close)
    device = sn.raw()
    device.connect("edge-sn")
    device.subscribe("edge/down", 1)
    topic_id = device.register("edge/up")
    device.publish(topic_id, b"x" * 5)
    for _ in range(2):
        device.publish_acked(topic_id, b"y" * 11, 1)
    assert sorted(m.payload for m in watch.expect_many(3)) == [b"x" * 5, b"y" * 11, b"y" * 11]

    def subscribed_upstream() -> bool:
        return any("edge/down" in s.subscriptions for s in upstream.broker.sessions.values())

    wait_for(lambda: upstream.call(subscribed_upstream))
    clients.paho(upstream.port, "edge-app", version=5).publish("edge/down", b"z" * 13, 1)
    assert device.receive_publish().data == b"z" * 13

    at_edge = metrics_of(api_of(edge))
    assert traffic(at_edge, "received") == {("mqttsn", 0): (1, 5), ("mqttsn", 1): (2, 22)}
    assert traffic(at_edge, "sent") == {("mqttsn", 1): (1, 13)}
    assert sample(at_edge, "mqgate_connections", protocol="mqttsn") >= 1
    assert sample(at_edge, "mqgate_upstream_connected") == 1
    at_upstream = metrics_of(api_of(upstream))
    assert traffic(at_upstream, "received") == {("mqtt", 0): (1, 5), ("mqtt", 1): (3, 35)}


class WireTally:
    """A UDP peer that adds up the bytes of every datagram it sends and receives."""

    def __init__(self, port: int) -> None:
        self.server = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)
        self.sent = self.received = 0

    def exchange(self, data: bytes) -> bytes:
        """Send ``data``; the first datagram that comes back."""
        self.sock.sendto(data, self.server)
        self.sent += len(data)
        answer, _ = self.sock.recvfrom(65535)
        self.received += len(answer)
        return answer

    def coap(self, message: CoapMessage) -> CoapMessage:
        """A CON exchange: every datagram up to the ACK or RST of ``message`` (a CoAP ping included)."""
        answer = coap_codec.decode(self.exchange(coap_codec.encode(message)))
        while answer.mtype not in (ACK, RST) or answer.mid != message.mid:
            data, _ = self.sock.recvfrom(65535)
            self.received += len(data)
            answer = coap_codec.decode(data)
        return answer

    def close(self) -> None:
        self.sock.close()


def wire_bytes(families: dict[str, Any], protocol: str) -> tuple[int, int]:
    return (
        int(sample(families, "mqgate_bytes_received", protocol=protocol)),
        int(sample(families, "mqgate_bytes_sent", protocol=protocol)),
    )


def test_wire_bytes_of_the_udp_gateways_are_the_datagrams_sizes(mqgate: Any, owned: ExitStack) -> None:
    api = api_of(mqgate)
    before = {p: wire_bytes(metrics_of(api), p) for p in ("mqttsn", "coap", "lwm2m")}
    assert before == dict.fromkeys(before, (0, 0))
    sn = WireTally(sn_port(mqgate))
    owned.callback(sn.close)
    assert isinstance(codec.decode(sn.exchange(codec.encode(codec.Connect("w-sn", 60)))), codec.Connack)
    assert isinstance(codec.decode(sn.exchange(codec.encode(codec.Pingreq()))), codec.Pingresp)
    assert isinstance(codec.decode(sn.exchange(codec.encode(codec.Disconnect()))), codec.Disconnect)
    sn.sock.sendto(b"\x02", sn.server)  # malformed: dropped, but its byte came in over the wire
    sn.sent += 1

    coap = WireTally(coap_port(mqgate))
    owned.callback(coap.close)
    options = path_options("mqtt/wire/coap") + query_options({"c": "w-coap"})
    put = CoapMessage(CON, int(Code.PUT), 0x1201, b"tk01", options, b"21.5")
    assert coap.coap(put).code == Code.CHANGED
    assert coap.coap(CoapMessage(CON, 0, 0x1202)).mtype == RST  # a CoAP ping

    lwm2m = WireTally(mqgate.app.listeners["lwm2m:udp"].port)
    owned.callback(lwm2m.close)
    format_link = (int(OptionNumber.CONTENT_FORMAT), coap_codec.encode_uint(40))
    options = path_options("rd") + query_options({"ep": "w-ep", "lt": "60"}) + [format_link]
    created = lwm2m.coap(CoapMessage(CON, int(Code.POST), 0x2201, b"tk02", options, b"</3/0>"))
    assert created.code == Code.CREATED
    location = [
        (int(OptionNumber.URI_PATH), value) for n, value in created.options if n == OptionNumber.LOCATION_PATH
    ]
    deleted = lwm2m.coap(CoapMessage(CON, int(Code.DELETE), 0x2202, b"tk03", location))  # de-register
    assert deleted.code == Code.DELETED
    assert lwm2m.coap(CoapMessage(CON, 0, 0x2203)).mtype == RST

    expected = {
        "mqttsn": (sn.sent, sn.received),
        "coap": (coap.sent, coap.received),
        "lwm2m": (lwm2m.sent, lwm2m.received),
    }
    wait_for(lambda: {p: wire_bytes(metrics_of(api), p) for p in expected} == expected)
    families = metrics_of(api)
    assert sample(families, "mqgate_gateway_events", listener="coap:udp", event="bytes_in") == coap.sent
    assert sample(families, "mqgate_gateway_events", listener="mqttsn:udp", event="bytes_out") == sn.received
