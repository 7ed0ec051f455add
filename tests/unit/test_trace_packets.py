"""The packet side of traces (core/trace.py) as plain functions: packet descriptions, MQTT stream cutting,
a connection's trace deciding on its client id, and a gateway's trace finding its peers."""

from __future__ import annotations

from collections.abc import Hashable
from types import SimpleNamespace
from typing import Any, cast

from core.mqtt import codec
from core.trace import DatagramEndpoint, DatagramTrace, StreamTrace, TraceManager, describe_fields
from gateways.coap.adapter import describe_coap
from gateways.coap.codec import CoapMessage
from gateways.coap.codec import encode as coap_encode
from gateways.coap.numbers import Code, OptionNumber, Type
from gateways.mqttsn import codec as sn
from gateways.mqttsn.adapter import describe_mqttsn


class Written:
    """A TraceManager stand-in: the client ids traced and the packet lines written."""

    def __init__(self, *traced: str) -> None:
        self.traced = {client_id: [] for client_id in traced}
        self.lines: list[dict[str, Any]] = []

    def write_packet(self, client_id: str, entry: dict[str, Any]) -> None:
        self.lines.append({**entry, "clientid": client_id})


def stream(written: Written, client_id: str | None, connection_id: str = "") -> tuple[StreamTrace, Any]:
    protocol = SimpleNamespace(
        connection=SimpleNamespace(client_id=connection_id),
        peer="127.0.0.1:1000",
        listener=SimpleNamespace(name="mqtt:tcp"),
        trace=None,
    )
    trace = StreamTrace(cast(TraceManager, written), cast(Any, protocol), client_id, 5)
    protocol.trace = trace
    return trace, protocol


def test_a_publish_is_described_by_its_main_fields_and_a_password_never() -> None:
    publish = codec.Publish("a/b", b"x" * 12, 1, False, False, 5)
    assert describe_fields(publish) == "PUBLISH topic=a/b qos=1 retain=0 dup=0 id=5 payload_size=12"
    connect = codec.Connect("dev", 5, True, 30, codec.WillSpec("gone", b"!"), "user", b"secret")
    assert describe_fields(connect) == (
        "CONNECT client_id=dev protocol_version=5 clean_start=1 keepalive=30 will_topic=gone username=user "
        "protocol_name=MQTT"
    )
    subscribe = codec.Subscribe(7, (codec.SubscriptionRequest("a/#", 1), codec.SubscriptionRequest("b", 0)))
    assert describe_fields(subscribe) == "SUBSCRIBE id=7 subscriptions=a/#:1,b:0"


def test_packets_split_across_reads_are_traced_once_whole() -> None:
    written = Written("dev")
    trace, _ = stream(written, "dev")
    data = codec.encode(codec.Publish("t", b"p" * 200, 1, packet_id=3), 5) + codec.encode(codec.PINGREQ, 5)
    for chunk in (data[:1], data[1:2], data[2:150], data[150:]):  # the remaining length split too
        trace.received(chunk)
    assert [(line["direction"], line["packet"]) for line in written.lines] == [
        ("in", "PUBLISH topic=t qos=1 retain=0 dup=0 id=3 payload_size=200"),
        ("in", "PINGREQ"),
    ]
    assert written.lines[0]["size"] == len(data) - 2 and bytes.fromhex(written.lines[0]["hex"]) == data[:-2]


def test_a_connection_awaiting_connect_is_traced_once_its_client_id_is_traced() -> None:
    written = Written("dev")
    trace, protocol = stream(written, None, "dev")
    trace.received(codec.encode(codec.Connect("", 5), 5))
    assert written.lines == []  # held until the connection knows its (assigned) client id
    trace.sent(codec.encode(codec.Connack(), 5))
    assert [(line["clientid"], line["packet"].split()[0]) for line in written.lines] == [
        ("dev", "CONNECT"),
        ("dev", "CONNACK"),
    ]
    assert protocol.trace is trace


def test_a_connect_naming_a_traced_client_is_written_at_once() -> None:
    written = Written("dev")
    trace, protocol = stream(written, None)
    trace.received(codec.encode(codec.Connect("dev", 5), 5))
    assert [(line["clientid"], line["packet"].split()[0]) for line in written.lines] == [("dev", "CONNECT")]
    assert trace.client_id == "dev" and protocol.trace is trace


def test_a_connection_of_another_client_drops_its_trace() -> None:
    written = Written("dev")
    trace, protocol = stream(written, None, "other")
    trace.received(codec.encode(codec.Connect("other", 5), 5))
    trace.sent(codec.encode(codec.Connack(), 5))
    assert written.lines == [] and protocol.trace is None


def test_bytes_that_do_not_decode_are_traced_as_malformed() -> None:
    written = Written("dev")
    trace, _ = stream(written, "dev")
    trace.received(b"\x00\x00")
    assert written.lines[0]["packet"].startswith("MALFORMED ")


class Gateway:
    """A DatagramEndpoint whose core learns a client's peer when it handles that client's first datagram."""

    name = "mqttsn:udp"
    trace_protocol = "mqttsn"

    def __init__(self) -> None:
        self.packet_trace: DatagramTrace | None = None
        self.peers: dict[str, Hashable] = {}
        self.handled: list[bytes] = []

    def trace_peer(self, client_id: str) -> Hashable | None:
        return self.peers.get(client_id)

    def describe_datagram(self, data: bytes) -> str:
        return describe_mqttsn(data)

    def handle(self, data: bytes, peer: Hashable, now: float) -> None:
        message = sn.decode(data)
        if isinstance(message, sn.Connect):
            self.peers[message.client_id] = peer
        self.handled.append(data)


def test_a_gateway_trace_finds_a_new_client_by_its_connect_and_ignores_other_peers() -> None:
    written = Written("dev")
    gateway = Gateway()
    assert isinstance(gateway, DatagramEndpoint)
    trace = DatagramTrace(cast(TraceManager, written), gateway)
    connect = sn.encode(sn.Connect("dev", 60))
    trace.receive(gateway.handle, connect, ("127.0.0.1", 1), 0.0)
    trace.receive(gateway.handle, sn.encode(sn.Connect("other", 60)), ("127.0.0.1", 2), 0.0)
    trace.sent(("127.0.0.1", 1), sn.encode(sn.Connack(0)))
    trace.sent(("127.0.0.1", 2), sn.encode(sn.Connack(0)))
    assert len(gateway.handled) == 2
    assert [(line["direction"], line["peer"], line["packet"]) for line in written.lines] == [
        ("in", "127.0.0.1:1", "CONNECT client_id=dev duration=60 clean_session=1 will=0 protocol_id=1"),
        ("out", "127.0.0.1:1", "CONNACK return_code=0"),
    ]


def test_mqttsn_and_coap_datagrams_are_described() -> None:
    forwarded = sn.encode(sn.Encapsulated(b"\x01\x02", sn.Pingreq(None)))
    assert describe_mqttsn(forwarded) == "ENCAPSULATED node_id=0102 radius=0 PINGREQ"
    assert describe_mqttsn(b"\x05").startswith("MALFORMED ")
    options = [
        (int(OptionNumber.URI_PATH), b"mqtt"),
        (int(OptionNumber.URI_PATH), b"a"),
        (int(OptionNumber.URI_QUERY), b"c=dev"),
        (int(OptionNumber.URI_QUERY), b"password=secret"),
    ]
    request = CoapMessage(Type.CON, Code.POST, 17, b"\xab", options, b"21")
    assert describe_coap(coap_encode(request)) == (
        "CON POST mid=17 token=ab uri=/mqtt/a?c=dev&password=*** payload_size=2"
    )
    assert (
        describe_coap(coap_encode(CoapMessage(Type.ACK, Code.CHANGED, 17, b"\xab")))
        == "ACK 2.04 mid=17 token=ab"
    )
    assert describe_coap(b"\x40").startswith("MALFORMED ")
