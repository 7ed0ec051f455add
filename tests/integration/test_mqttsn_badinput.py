"""Bad input to the live MQTT-SN gateway over real UDP sockets (issue 3, "Bad input").

A malformed datagram is dropped, counted (``metrics.malformed``) and logged once per peer; a message invalid
in the client's state gets the spec's return code or is dropped and counted; none of it disturbs a healthy
client. A hypothesis test sends random and mutated datagrams from a few sockets; the gateway still serves.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.contrib.mqttsn import MQTTSN, MQTTSNConnect, MQTTSNRegister

from gateways.mqttsn import codec
from gateways.mqttsn.numbers import MsgType, ReturnCode, TopicIdType
from tests.integration.helpers import Clients, PahoClient, wait_for
from tests.integration.mqttsn_helpers import SnClient, SnClients, metric, sn_port

PREDEFINED = {"1": "sensors/temp"}


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def sn() -> Iterator[Callable[[Any], SnClients]]:
    """``sn(mqgate)``: the MQTT-SN clients of a running gateway, all closed after the test."""
    opened: list[SnClients] = []

    def make(running: Any) -> SnClients:
        owned = SnClients(sn_port(running))
        opened.append(owned)
        return owned

    yield make
    for owned in opened:
        owned.close()


class Healthy:
    """A connected device and a paho client exchanging QoS 1 messages: proof that service goes on."""

    def __init__(self, mqgate: Any, sn: SnClients, clients: Clients, client_id: str = "healthy") -> None:
        self.device = sn.raw()
        self.device.connect(client_id)
        self.topic = f"ok/{client_id}"
        self.topic_id = self.device.register(self.topic)
        self.back = f"back/{client_id}"
        self.back_id = self.device.subscribe(self.back, 1).topic_id
        self.mqtt: PahoClient = clients.paho(mqgate.port, f"paho-{client_id}", version=5)
        assert self.mqtt.subscribe("ok/+", 1) == 1
        self.count = 0

    def check(self) -> None:
        """A QoS 1 PUBLISH from the device reaches paho, and one from paho reaches the device."""
        self.count += 1
        payload = b"still fine %d" % self.count
        self.device.publish_acked(self.topic_id, payload, 1)
        message = self.mqtt.expect()
        assert (message.topic, message.payload) == (self.topic, payload)
        self.mqtt.publish(self.back, payload, 1)
        publish = self.device.expect(codec.Publish)
        assert (publish.topic_id, publish.data) == (self.back_id, payload)
        self.device.ack(publish)


def malformed_records(caplog: pytest.LogCaptureFixture, peer: tuple[str, int]) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "mqgate.mqttsn" and "malformed" in r.getMessage() and str(peer) in r.getMessage()
    ]


def _encaps(inner: bytes, node_id: bytes = b"\x01") -> bytes:
    return bytes((len(node_id) + 3, MsgType.ENCAPSULATED, 0)) + node_id + inner


MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "one byte": b"\x02",
    "length says 5, datagram of 2": b"\x05\x16",
    "length says 2, datagram of 3": b"\x02\x16\x00",
    "length 0": b"\x00\x16",
    "truncated 3-octet length": b"\x01\x00\x10",
    "3-octet length disagrees": b"\x01\x00\x10\x16",
    "reserved type 0x03": b"\x02\x03",
    "reserved type 0x11": b"\x02\x11",
    "reserved type 0x19": b"\x02\x19",
    "reserved type 0x1e": b"\x02\x1e",
    "reserved type 0xfd": b"\x02\xfd",
    "reserved type 0xff": b"\x02\xff",
    "truncated PUBLISH": b"\x05\x0c\x00\x00\x01",
    "truncated CONNECT": b"\x04\x04\x04\x01",
    "CONNECT without client id": b"\x06\x04\x04\x01\x00\x3c",
    "truncated REGISTER": b"\x05\x0a\x00\x00\x01",
    "truncated PUBACK": b"\x06\x0d\x00\x01\x00\x01",
    "truncated SUBSCRIBE to a predefined id": b"\x06\x12\x21\x00\x01\x00",
    "DISCONNECT with a 1-octet duration": b"\x03\x18\x00",
    "SEARCHGW without radius": b"\x02\x01",
    "PINGRESP with a body": b"\x03\x17\x00",
    "WILLTOPIC with QoS -1": b"\x05\x07\x60ab",
    "CONNECT client id not UTF-8": b"\x08\x04\x04\x01\x00\x3c\xff\xfe",
    "REGISTER topic not UTF-8": b"\x08\x0a\x00\x00\x00\x01\xc3\x28",
    "PINGREQ client id not UTF-8": b"\x03\x16\xff",
    "SUBSCRIBE topic not UTF-8": b"\x07\x12\x20\x00\x01\xed\xa0",
    "encapsulation without a message": b"\x04\xfe\x00\x01",
    "nested encapsulation": _encaps(_encaps(b"\x02\x16")),
    "encapsulation length past the datagram": b"\x09\xfe\x00\x01\x02\x16",
    "encapsulated malformed message": _encaps(b"\x05\x16"),
}


@pytest.mark.parametrize("datagram", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_datagram_is_dropped_and_counted_and_a_healthy_client_keeps_working(
    mqgate, sn, clients, datagram
):
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    bad = owned.raw()
    bad.send(datagram)
    wait_for(lambda: metric(mqgate, "malformed") == 1)
    bad.expect_nothing(0.1)  # dropped: no answer
    healthy.check()


def test_malformed_datagrams_are_logged_once_per_peer(mqgate, sn, clients, caplog):
    caplog.set_level(logging.WARNING, logger="mqgate.mqttsn")
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    first, second = owned.raw(), owned.raw()
    first.send(*MALFORMED.values())
    wait_for(lambda: metric(mqgate, "malformed") == len(MALFORMED))
    assert len(malformed_records(caplog, first.address)) == 1
    second.send(MALFORMED["reserved type 0xff"], MALFORMED["truncated PUBLISH"])
    wait_for(lambda: metric(mqgate, "malformed") == len(MALFORMED) + 2)
    assert len(malformed_records(caplog, second.address)) == 1
    assert len(malformed_records(caplog, first.address)) == 1
    first.expect_nothing(0.1)
    healthy.check()


# --- messages invalid in the client's state


def test_publish_from_a_peer_without_connection_is_dropped_and_counted(mqgate, sn, clients):
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    stranger = owned.raw()
    stranger.publish(healthy.topic_id, b"not connected", 1)
    wait_for(lambda: metric(mqgate, "unknown_peer") == 1)
    stranger.expect_nothing(0.1)
    healthy.mqtt.expect_none(0.1)
    healthy.check()


def test_publish_during_the_will_handshake_is_dropped_and_counted_invalid_in_state(mqgate, sn, clients):
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    device = owned.raw()
    device.send(codec.Connect("half-open", 60, True, True))
    device.expect(codec.WillTopicReq)
    device.publish(healthy.topic_id, b"before CONNACK", 1)
    wait_for(lambda: metric(mqgate, "invalid_in_state") == 1)
    device.expect_nothing(0.1)
    healthy.check()  # nothing of "before CONNACK" reached paho before this


def test_publish_after_disconnect_of_a_persistent_session_is_dropped_and_counted(mqgate, sn, clients):
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    device = owned.raw()
    device.connect("left", clean_session=False)
    topic_id = device.register("ok/left")
    device.disconnect()
    device.publish(topic_id, b"after DISCONNECT", 1)
    wait_for(lambda: metric(mqgate, "invalid_in_state") == 1)
    device.expect_nothing(0.1)
    healthy.check()


def test_willmsg_before_willtopic_is_dropped_and_the_handshake_goes_on(mqgate, sn, clients):
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    device = owned.raw()
    device.send(codec.Connect("will-order", 60, True, True))
    device.expect(codec.WillTopicReq)
    device.send(codec.WillMsg(b"too early"))
    wait_for(lambda: metric(mqgate, "invalid_in_state") == 1)
    device.expect_nothing(0.1)
    device.send(codec.WillTopic("will/order"))
    device.expect(codec.WillMsgReq)
    device.send(codec.WillMsg(b"in order"))
    assert device.expect(codec.Connack).return_code == 0
    stranger = owned.raw()
    stranger.send(codec.WillMsg(b"no handshake at all"))
    wait_for(lambda: metric(mqgate, "unknown_peer") == 1)
    stranger.expect_nothing(0.1)
    healthy.check()


@pytest.mark.parametrize("qos", [1, 2])
@pytest.mark.parametrize(
    ("kind", "topic_id"),
    [
        (TopicIdType.NORMAL, 0x1234),
        (TopicIdType.NORMAL, 0),
        (TopicIdType.NORMAL, 0xFFFF),
        (TopicIdType.PREDEFINED, 0),
        (TopicIdType.PREDEFINED, 0xFFFF),
        (TopicIdType.PREDEFINED, 77),
    ],
    ids=["unknown", "id-0", "id-ffff", "predefined-0", "predefined-ffff", "unknown-predefined"],
)
def test_publish_on_an_unknown_or_reserved_topic_id_gets_puback_invalid_topic_id(
    start_broker, sn, clients, kind, topic_id, qos
):
    mqgate = start_broker(gateways={"mqttsn": {"predefined": PREDEFINED}})
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    device = owned.raw()
    device.connect("bad-topic")
    mid = device.publish(topic_id, b"nowhere", qos, kind=kind)
    puback = device.expect(codec.Puback)
    assert (puback.topic_id, puback.msg_id, puback.return_code) == (
        topic_id,
        mid,
        ReturnCode.INVALID_TOPIC_ID,
    )
    assert metric(mqgate, "publish_unknown_topic_id") == 1
    healthy.check()


@pytest.mark.parametrize(
    "client_id",
    ["x" * 24, "é" * 12],
    ids=["24-chars", "24-bytes-utf8"],
)
def test_connect_with_a_bad_client_id_gets_connack_not_supported(mqgate, sn, clients, client_id):
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    device = owned.raw()
    assert device.connect(client_id, check=False).return_code == ReturnCode.NOT_SUPPORTED
    assert metric(mqgate, "connect_refused") == 1
    assert device.connect("y" * 23).return_code == 0  # 23 bytes is the limit (§5.3.1)
    healthy.check()


def test_connect_with_protocol_id_2_gets_connack_not_supported(mqgate, sn, clients):
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    device = owned.raw()
    device.send(MQTTSN() / MQTTSNConnect(prot_id=2, duration=60, client_id=b"v2-device"))
    assert device.expect(codec.Connack).return_code == ReturnCode.NOT_SUPPORTED
    assert "v2-device" not in mqgate.call(lambda: set(mqgate.broker.sessions))
    healthy.check()


def test_subscribe_to_an_unknown_predefined_id_gets_suback_invalid_topic_id(start_broker, sn, clients):
    mqgate = start_broker(gateways={"mqttsn": {"predefined": PREDEFINED}})
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    device = owned.raw()
    device.connect("sub-unknown")
    suback = device.subscribe(99, 1, kind=TopicIdType.PREDEFINED, check=False)
    assert suback.return_code == ReturnCode.INVALID_TOPIC_ID
    assert device.subscribe(1, 1, kind=TopicIdType.PREDEFINED).topic_id == 1  # a known one works
    healthy.check()


def test_subscribe_with_reserved_topic_id_type_is_refused(mqgate, sn, clients):
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    device = owned.raw()
    device.connect("sub-reserved")
    suback = device.subscribe("a/b", 1, kind=TopicIdType.RESERVED, check=False)
    assert suback.return_code != ReturnCode.ACCEPTED
    healthy.check()


@pytest.mark.parametrize("topic", ["w/+", "w/#", "+", "#"])
def test_register_of_a_wildcard_topic_gets_regack_not_supported(mqgate, sn, clients, topic):
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    device = owned.raw()
    device.connect("reg-wild")
    device.send(MQTTSN() / MQTTSNRegister(tid=0, mid=7, topic_name=topic.encode()))
    regack = device.expect(codec.Regack)
    assert (regack.topic_id, regack.msg_id, regack.return_code) == (0, 7, ReturnCode.NOT_SUPPORTED)
    healthy.check()


@pytest.mark.parametrize("short", ["+a", "a#", "#/"])
def test_publish_on_a_short_topic_with_a_wildcard_gets_puback_not_supported(mqgate, sn, clients, short):
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    device = owned.raw()
    device.connect("short-wild")
    mid = device.publish(codec.short_topic_id(short), b"wild", 1, kind=TopicIdType.SHORT)
    puback = device.expect(codec.Puback)
    assert (puback.msg_id, puback.return_code) == (mid, ReturnCode.NOT_SUPPORTED)
    healthy.check()


# --- hypothesis: random and mutated datagrams from a few sockets


_VALID: list[bytes] = [
    codec.encode(m)
    for m in (
        codec.Connect("fz-a", 30, True, False),
        codec.Connect("fz-b", 1, False, True),
        codec.WillTopic("fz/will", 1, True),
        codec.WillMsg(b"fz will"),
        codec.Register(0, 1, "fz/topic"),
        codec.Regack(5, 1, 0),
        codec.Publish(1, b"fz", 1, 2, TopicIdType.NORMAL),
        codec.Publish(1, b"fz", -1, 0, TopicIdType.PREDEFINED),
        codec.Publish(codec.short_topic_id("fz"), b"fz", 2, 3, TopicIdType.SHORT),
        codec.Puback(1, 2, 0),
        codec.Pubrec(2),
        codec.Pubrel(2),
        codec.Pubcomp(2),
        codec.Subscribe(4, TopicIdType.NORMAL, "fz/#", 0, 1),
        codec.Subscribe(4, TopicIdType.PREDEFINED, "", 1, 2),
        codec.Unsubscribe(5, TopicIdType.NORMAL, "fz/#"),
        codec.Pingreq("fz-b"),
        codec.Pingreq(),
        codec.Disconnect(5),
        codec.Disconnect(),
        codec.WillTopicUpd("fz/will2", 0, False),
        codec.WillMsgUpd(b"fz2"),
        codec.SearchGw(1),
        codec.Encapsulated(b"\x01\x02", codec.Connect("fz-c", 30)),
    )
]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["flip", "set", "truncate", "extend", "length"]))
        if action == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif action == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif action == "extend":
            data += draw(st.binary(min_size=1, max_size=8))
        elif action == "length" and data:
            data[0] = draw(st.integers(0, 255))
    return bytes(data)


_DATAGRAMS = st.one_of(st.binary(max_size=64), _mutated(), st.sampled_from(_VALID))


def _drain(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.recv(65535)
    except BlockingIOError:
        pass


def test_random_and_mutated_datagrams_leave_the_gateway_serving(mqgate, sn, clients):
    owned = sn(mqgate)
    healthy = Healthy(mqgate, owned, clients)
    fuzzers: list[SnClient] = [owned.raw() for _ in range(3)]
    examples: list[int] = []

    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(st.lists(st.tuples(st.integers(0, len(fuzzers) - 1), _DATAGRAMS), min_size=1, max_size=5))
    def feed(batch: list[tuple[int, bytes]]) -> None:
        examples.append(len(batch))
        for index, datagram in batch:
            fuzzers[index].send(datagram)
        healthy.device.ping()  # the gateway has handled the batch (same receive socket, in order)
        for fuzzer in fuzzers:
            _drain(fuzzer.link.sock)

    feed()
    assert len(examples) >= 50
    assert metric(mqgate, "malformed") > 0
    healthy.check()
    late = owned.raw()
    late.connect("late-comer")
    topic_id = late.register("ok/late-comer")
    late.publish_acked(topic_id, b"after the storm", 1)
    message = healthy.mqtt.expect()
    assert (message.topic, message.payload) == ("ok/late-comer", b"after the storm")
