"""MQTT-SN 1.2 publish/subscribe through the live gateway over real UDP sockets (issue 3, "Behaviour").

Devices are the ``mqtt-sn-12`` client and raw datagrams (the project codec and scapy's ``contrib.mqttsn``);
every test asserts what a paho-mqtt subscriber or the device receives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from scapy.contrib.mqttsn import (
    MQTTSN,
    MQTTSNConnect,
    MQTTSNEncaps,
    MQTTSNPublish,
    MQTTSNRegack,
    MQTTSNSearchGW,
)

from gateways.mqttsn import codec
from gateways.mqttsn.numbers import TopicIdType
from tests.integration.helpers import Clients, PahoClient, wait_for
from tests.integration.mqttsn_helpers import Collector, SnClients, metric, sn_port

PREDEFINED = {"1": "sensors/temp", "2": "actuators/led"}


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


def subscriber(clients: Clients, mqgate: Any, topic_filter: str = "#", qos: int = 2) -> PahoClient:
    sub = clients.paho(mqgate.port, "paho-sub", version=5)
    assert sub.subscribe(topic_filter, qos) == qos
    return sub


def sessions(mqgate: Any) -> set[str]:
    return set(mqgate.call(lambda: set(mqgate.broker.sessions)))


# --- CONNECT


def test_sn12_client_connect_gets_connack_and_a_broker_session(mqgate, sn):
    device = sn(mqgate).sn12("sn12-dev")
    device.send_connect()  # raises unless CONNACK rc 0
    assert "sn12-dev" in sessions(mqgate)


def test_raw_connect_gets_connack_accepted(mqgate, sn):
    device = sn(mqgate).raw()
    device.send(MQTTSN() / MQTTSNConnect(cleansess=1, duration=30, client_id=b"raw-dev"))
    assert device.expect(codec.Connack).return_code == 0
    assert "raw-dev" in sessions(mqgate)


# --- PUBLISH from the device


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_device_publish_reaches_mqtt_subscriber_at_its_qos(mqgate, sn, clients, qos):
    sub = subscriber(clients, mqgate, "dev/#")
    device = sn(mqgate).sn12("pub-dev")
    device.send_connect()
    device.send_publish("dev/data", b"reading-%d" % qos, qos)  # REGISTER, PUBLISH, and its acks
    message = sub.expect()
    assert (message.topic, message.payload, message.qos) == ("dev/data", b"reading-%d" % qos, qos)


def test_device_qos2_publish_resent_before_pubrel_is_delivered_exactly_once(mqgate, sn, clients):
    sub = subscriber(
        clients, mqgate, "once/#", qos=1
    )  # QoS 2 is handed over at PUBREL: a barrier could pass it
    device = sn(mqgate).raw()
    device.connect("qos2-dev")
    topic_id = device.register("once/t")
    mid = device.publish(topic_id, b"exactly-once", 2)
    assert device.expect(codec.Pubrec).msg_id == mid
    device.send(codec.Publish(topic_id, b"exactly-once", 2, mid, TopicIdType.NORMAL, dup=True))
    assert device.expect(codec.Pubrec).msg_id == mid
    device.send(codec.Pubrel(mid))
    assert device.expect(codec.Pubcomp).msg_id == mid
    device.publish(topic_id, b"barrier", 0)
    assert [m.payload for m in sub.expect_many(2)] == [b"exactly-once", b"barrier"]


def test_register_by_client_then_publish_by_topic_id(mqgate, sn, clients):
    sub = subscriber(clients, mqgate, "reg/#")
    device = sn(mqgate).raw()
    device.connect("reg-dev")
    topic_id = device.register("reg/topic")
    assert topic_id not in (0, 0xFFFF)
    assert device.register("reg/topic") == topic_id  # the same name keeps its id
    other = device.register("reg/other")
    assert other != topic_id
    device.publish_acked(topic_id, b"one", 1)
    device.publish_acked(other, b"two", 1)
    assert [(m.topic, m.payload) for m in sub.expect_many(2)] == [
        ("reg/topic", b"one"),
        ("reg/other", b"two"),
    ]


def test_device_publishes_on_predefined_topic_id(start_broker, sn, clients):
    mqgate = start_broker(gateways={"mqttsn": {"predefined": PREDEFINED}})
    sub = subscriber(clients, mqgate, "sensors/#")
    device = sn(mqgate).raw()
    device.connect("predef-pub")
    device.publish_acked(1, b"21.5", 1, kind=TopicIdType.PREDEFINED)
    sn12 = sn(mqgate).sn12("predef-sn12")
    sn12.send_connect()
    sn12.send_publish_predefined(1, b"22.0", 1)
    assert [(m.topic, m.payload) for m in sub.expect_many(2)] == [
        ("sensors/temp", b"21.5"),
        ("sensors/temp", b"22.0"),
    ]


def test_device_subscribes_to_predefined_id_and_receives_on_it(start_broker, sn, clients):
    mqgate = start_broker(gateways={"mqttsn": {"predefined": PREDEFINED}})
    device = sn(mqgate).raw()
    device.connect("predef-sub")
    suback = device.subscribe(2, 1, kind=TopicIdType.PREDEFINED)
    assert (suback.topic_id, suback.return_code) == (2, 0)
    publisher = clients.paho(mqgate.port, "paho-pub")
    publisher.publish("actuators/led", b"on", 1)
    publish = device.receive_publish()  # a predefined id needs no REGISTER
    assert (publish.topic_id_type, publish.topic_id, publish.data, publish.qos) == (
        TopicIdType.PREDEFINED,
        2,
        b"on",
        1,
    )
    sn12 = sn(mqgate).sn12("predef-sn12-sub")
    sn12.send_connect()
    collector = Collector()
    sn12.send_subscribe_predefined(2, 1, collector)
    publisher.publish("actuators/led", b"off", 1)
    sn12.poll_until(lambda: not collector.messages.empty())
    message = collector.messages.get_nowait()
    assert (message.get_topic_id(), message.get_payload()) == (2, b"off")


def test_short_topic_names_both_ways(mqgate, sn, clients):
    sub = subscriber(clients, mqgate, "+")
    device = sn(mqgate).raw()
    device.connect("short-dev")
    device.publish_acked(codec.short_topic_id("ab"), b"from-device", 1, kind=TopicIdType.SHORT)
    message = sub.expect()
    assert (message.topic, message.payload) == ("ab", b"from-device")
    suback = device.subscribe("cd", 1, kind=TopicIdType.SHORT)
    assert suback.return_code == 0
    clients.paho(mqgate.port, "paho-pub").publish("cd", b"to-device", 1)
    publish = device.receive_publish()  # a short name needs no REGISTER
    assert (publish.topic_id_type, publish.topic_id, publish.data) == (
        TopicIdType.SHORT,
        codec.short_topic_id("cd"),
        b"to-device",
    )
    sn12 = sn(mqgate).sn12("short-sn12")
    sn12.send_connect()
    sn12.send_publish("ef", b"sn12-short", 0)  # a 2-character name goes out as a short topic
    assert [(m.topic, m.payload) for m in sub.expect_many(2)] == [("cd", b"to-device"), ("ef", b"sn12-short")]


def test_subscribe_to_topic_name_gets_its_id_in_suback_and_receives_on_it(mqgate, sn, clients):
    device = sn(mqgate).raw()
    device.connect("name-sub")
    suback = device.subscribe("room/1/temp", 1)
    assert suback.return_code == 0
    assert suback.topic_id not in (0, 0xFFFF)
    clients.paho(mqgate.port, "paho-pub").publish("room/1/temp", b"19", 1)
    publish = device.expect(codec.Publish)  # no REGISTER: the SUBACK gave the id
    assert (publish.topic_id_type, publish.topic_id, publish.data) == (
        TopicIdType.NORMAL,
        suback.topic_id,
        b"19",
    )
    device.ack(publish)


def test_sn12_subscribe_to_topic_name_receives_messages(mqgate, sn, clients):
    device = sn(mqgate).sn12("sn12-name-sub")
    device.send_connect()
    collector = Collector()
    device.send_subscribe("room/2/temp", 1, collector)
    clients.paho(mqgate.port, "paho-pub").publish("room/2/temp", b"20", 1)
    device.poll_until(lambda: not collector.messages.empty())
    message = collector.messages.get_nowait()
    assert (message.get_topic_name(), message.get_payload()) == ("room/2/temp", b"20")


def test_wildcard_subscription_gets_topic_id_0_then_register_before_each_new_topic(mqgate, sn, clients):
    device = sn(mqgate).raw()
    device.connect("wild-dev")
    suback = device.subscribe("w/#", 1)
    assert (suback.topic_id, suback.return_code) == (0, 0)
    publisher = clients.paho(mqgate.port, "paho-pub")
    ids = {}
    for topic in ("w/a", "w/b"):
        publisher.publish(topic, topic.encode(), 1)
        register = device.expect(codec.Register)
        assert register.topic_name == topic
        assert register.topic_id not in (0, 0xFFFF)
        device.send(MQTTSN() / MQTTSNRegack(tid=register.topic_id, mid=register.msg_id, return_code=0))
        publish = device.expect(codec.Publish)  # replayed after the REGACK
        assert (publish.topic_id, publish.data, publish.topic_id_type) == (
            register.topic_id,
            topic.encode(),
            TopicIdType.NORMAL,
        )
        device.ack(publish)
        ids[topic] = register.topic_id
    assert ids["w/a"] != ids["w/b"]
    publisher.publish("w/a", b"again", 1)
    publish = device.expect(codec.Publish)  # known now: no second REGISTER
    assert (publish.topic_id, publish.data) == (ids["w/a"], b"again")
    device.ack(publish)


def test_sn12_wildcard_subscription_receives_registered_topics(mqgate, sn, clients):
    device = sn(mqgate).sn12("sn12-wild")
    device.send_connect()
    collector = Collector()
    device.send_subscribe("sn12w/+", 1, collector)
    clients.paho(mqgate.port, "paho-pub").publish("sn12w/x", b"via-register", 1)
    device.poll_until(lambda: not collector.messages.empty())  # polling answers the REGISTER
    message = collector.messages.get_nowait()
    assert (message.get_topic_name(), message.get_payload()) == ("sn12w/x", b"via-register")


# --- deliveries from MQTT to the device


@pytest.mark.parametrize(
    ("sub_qos", "pub_qos", "expected"),
    [(0, 2, 0), (1, 2, 1), (2, 1, 1), (2, 0, 0), (2, 2, 2), (1, 1, 1)],
)
def test_mqtt_publish_reaches_device_at_the_lower_qos(mqgate, sn, clients, sub_qos, pub_qos, expected):
    device = sn(mqgate).raw()
    device.connect("down-dev")
    assert device.subscribe("down/t", sub_qos).qos == sub_qos
    clients.paho(mqgate.port, "paho-pub").publish("down/t", b"payload", pub_qos)
    publish = device.receive_publish(ack=False)
    assert (publish.qos, publish.data) == (expected, b"payload")
    device.ack(publish)  # QoS 2: PUBREC, PUBREL from the gateway, PUBCOMP
    wait_for(lambda: mqgate.call(lambda: not mqgate.broker.sessions["down-dev"].inflight))


def _publish_many(clients: Clients, mqgate: Any, topic: str, count: int) -> None:
    publisher = clients.paho(mqgate.port, "paho-pub")
    for i in range(count):
        publisher.publish(topic, b"m%d" % i, 1)  # waits for the broker's PUBACK


def test_one_qos1_delivery_outstanding_until_the_device_acks(mqgate, sn, clients):
    device = sn(mqgate).raw()
    device.connect("window-1")
    device.subscribe("win/t", 1)
    _publish_many(clients, mqgate, "win/t", 3)
    received = []
    for _ in range(3):
        publish = device.expect(codec.Publish)
        device.expect_nothing(0.3)  # the next one waits for this PUBACK
        received.append(publish.data)
        device.ack(publish)
    assert received == [b"m0", b"m1", b"m2"]


def test_max_inflight_two_lets_two_deliveries_out_unacknowledged(start_broker, sn, clients):
    mqgate = start_broker(gateways={"mqttsn": {"max_inflight": 2}})
    device = sn(mqgate).raw()
    device.connect("window-2")
    device.subscribe("win/t", 1)
    _publish_many(clients, mqgate, "win/t", 3)
    first, second = device.expect(codec.Publish), device.expect(codec.Publish)
    assert (first.data, second.data) == (b"m0", b"m1")
    device.expect_nothing(0.3)
    device.ack(first)
    third = device.expect(codec.Publish)
    assert third.data == b"m2"
    device.ack(second)
    device.ack(third)


def test_unacked_delivery_is_retransmitted_with_dup_then_client_lost_and_will_published(
    start_broker, sn, clients
):
    mqgate = start_broker(gateways={"mqttsn": {"t_retry": 0.3, "n_retry": 1}})
    wills = subscriber(clients, mqgate, "will/#")
    device = sn(mqgate).raw()
    device.connect("retry-dev", will=("will/retry-dev", b"gone", 1, False))
    device.subscribe("retry/t", 1)
    clients.paho(mqgate.port, "paho-pub").publish("retry/t", b"ack me", 1)
    first = device.expect(codec.Publish)
    sent_at = time.monotonic()
    assert not first.dup
    again = device.expect(codec.Publish)
    assert time.monotonic() - sent_at >= 0.2  # after T_retry, not at once
    assert (again.dup, again.msg_id, again.data) == (True, first.msg_id, b"ack me")
    will = wills.expect()  # N_retry retransmissions unanswered: the client is lost
    assert (will.topic, will.payload) == ("will/retry-dev", b"gone")
    assert metric(mqgate, "clients_lost") == 1
    assert metric(mqgate, "retransmissions") == 1


def test_puback_invalid_topic_id_makes_gateway_register_again_and_replay(mqgate, sn, clients):
    device = sn(mqgate).raw()
    device.connect("rereg-dev")
    suback = device.subscribe("rereg/topic", 1)
    clients.paho(mqgate.port, "paho-pub").publish("rereg/topic", b"replay me", 1)
    publish = device.expect(codec.Publish)
    assert publish.topic_id == suback.topic_id
    device.send(codec.Puback(publish.topic_id, publish.msg_id, codec.ReturnCode.INVALID_TOPIC_ID))
    register = device.expect(codec.Register)
    assert register.topic_name == "rereg/topic"
    device.send(codec.Regack(register.topic_id, register.msg_id, 0))
    replay = device.expect(codec.Publish)
    assert (replay.topic_id, replay.data, replay.msg_id) == (register.topic_id, b"replay me", publish.msg_id)
    device.ack(replay)
    wait_for(lambda: mqgate.call(lambda: not mqgate.broker.sessions["rereg-dev"].inflight))


def test_unsubscribe_stops_deliveries(mqgate, sn, clients):
    device = sn(mqgate).raw()
    device.connect("unsub-dev")
    device.subscribe("gone/t", 0)
    device.subscribe("kept/t", 0)
    publisher = clients.paho(mqgate.port, "paho-pub")
    publisher.publish("gone/t", b"before", 0)
    assert device.expect(codec.Publish).data == b"before"
    device.unsubscribe("gone/t")
    publisher.publish("gone/t", b"after", 0)
    publisher.publish("kept/t", b"barrier", 0)
    assert device.expect(codec.Publish).data == b"barrier"  # nothing on gone/t came first


def test_pingreq_gets_pingresp(mqgate, sn):
    device = sn(mqgate).raw()
    device.connect("ping-dev")
    device.ping()
    sn12 = sn(mqgate).sn12("ping-sn12")
    sn12.send_connect()
    sn12.send_ping_req()  # raises unless PINGRESP arrives


def test_clean_session_false_resumes_subscriptions_and_topic_ids_after_reconnect(mqgate, sn, clients):
    owned = sn(mqgate)
    device = owned.raw()
    device.connect("persist-dev", clean_session=False)
    named = device.subscribe("keep/t", 1).topic_id
    assert device.subscribe("keepw/#", 1).topic_id == 0
    publisher = clients.paho(mqgate.port, "paho-pub")
    publisher.publish("keepw/x", b"registers", 1)
    registered = device.receive_publish().topic_id
    device.disconnect()
    publisher.publish("keep/t", b"while away 1", 1)
    publisher.publish("keepw/x", b"while away 2", 1)
    device.close()
    back = owned.raw()  # back from another source port
    back.connect("persist-dev", clean_session=False)
    first = back.expect(codec.Publish)  # no REGISTER: the ids were kept
    assert (first.topic_id, first.data) == (named, b"while away 1")
    back.ack(first)
    second = back.expect(codec.Publish)
    assert (second.topic_id, second.data) == (registered, b"while away 2")
    back.ack(second)
    publisher.publish("keep/t", b"subscription kept", 1)
    assert back.expect(codec.Publish).data == b"subscription kept"


@pytest.mark.parametrize("version", [4, 5])
def test_device_with_same_client_id_takes_over_connected_mqtt_client(mqgate, sn, clients, version):
    paho = clients.paho(mqgate.port, "shared-id", version=version)
    device = sn(mqgate).raw()
    device.connect("shared-id")
    info = paho.expect_disconnect()
    if version == 5:
        assert info.reason_code == 0x8E  # session taken over
    assert mqgate.call(lambda: mqgate.broker.sessions["shared-id"].client.protocol) == "mqttsn"


def test_mqtt_client_with_the_device_client_id_takes_over_and_the_device_gets_disconnect(mqgate, sn, clients):
    device = sn(mqgate).raw()
    device.connect("taken-back")
    clients.paho(mqgate.port, "taken-back", version=5)
    device.expect(codec.Disconnect)
    assert mqgate.call(lambda: mqgate.broker.sessions["taken-back"].client.protocol) == "mqtt"


def test_searchgw_answered_with_gwinfo_carrying_gateway_id(start_broker, sn):
    mqgate = start_broker(gateways={"mqttsn": {"gateway_id": 42}})
    device = sn(mqgate).raw()
    device.send(MQTTSN() / MQTTSNSearchGW(radius=1))
    assert device.expect(codec.GwInfo).gw_id == 42
    sn(mqgate).sn12("searcher").send_search_gateway(1)  # raises unless GWINFO arrives


def test_forwarder_nodes_are_separate_clients_answered_with_their_node_id(mqgate, sn, clients):
    sub = subscriber(clients, mqgate, "fw/#")
    forwarder = sn(mqgate).forwarder()
    node_a, node_b = forwarder.node(b"\x00\x01"), forwarder.node(b"\x00\x02")
    node_a.connect("fw-node-a")  # answers come back encapsulated with the node's id (checked by the helper)
    node_b.connect("fw-node-b")
    assert {"fw-node-a", "fw-node-b"} <= sessions(mqgate)
    node_a.subscribe("fw/to-a", 1)
    topic_id = node_b.register("fw/to-a")
    node_b.publish_acked(topic_id, b"b to a", 1)
    publish = node_a.expect(codec.Publish)
    assert publish.data == b"b to a"
    node_a.ack(publish)
    message = sub.expect()
    assert (message.topic, message.payload) == ("fw/to-a", b"b to a")
    raw = sn(mqgate).raw()  # the wire format, built by scapy
    raw.send(MQTTSN(type=0xFE) / MQTTSNEncaps(w_node_id=b"\x07") / MQTTSN() / MQTTSNSearchGW())
    data = raw.recv_datagram()
    assert data[:4] == bytes((4, 0xFE, 0, 7))
    assert isinstance(codec.decode(data[4:]), codec.GwInfo)


def test_clientid_prefix_maps_device_client_ids(start_broker, sn, clients):
    mqgate = start_broker(gateways={"mqttsn": {"clientid_prefix": "sn-"}})
    paho = clients.paho(mqgate.port, "dev7", version=5)
    device = sn(mqgate).raw()
    device.connect("dev7")
    assert {"sn-dev7", "dev7"} <= sessions(mqgate)
    assert mqgate.call(lambda: mqgate.broker.sessions["sn-dev7"].client.protocol) == "mqttsn"
    assert paho.subscribe("pfx/#", 1) == 1  # the unprefixed MQTT client was not taken over
    device.publish_acked(device.register("pfx/t"), b"hello", 1)
    assert paho.expect().payload == b"hello"


def _qos3_datagrams() -> list[bytes]:
    predefined = MQTTSN() / MQTTSNPublish(qos=3, tid_type=TopicIdType.PREDEFINED, tid=1, data=b"predef-q3")
    short = MQTTSN() / MQTTSNPublish(
        qos=3, tid_type=TopicIdType.SHORT, tid=codec.short_topic_id("q3"), data=b"short-q3"
    )
    return [bytes(predefined), bytes(short)]


def test_qos_minus_one_publish_without_connection_reaches_subscriber(start_broker, sn, clients):
    mqgate = start_broker(gateways={"mqttsn": {"predefined": PREDEFINED, "enable_qos3": True}})
    sub = subscriber(clients, mqgate, "#", 1)
    device = sn(mqgate).raw()  # never connects
    device.send(*_qos3_datagrams())
    received = {(m.topic, m.payload, m.qos) for m in sub.expect_many(2)}
    assert received == {("sensors/temp", b"predef-q3", 0), ("q3", b"short-q3", 0)}
    assert metric(mqgate, "qos3_published") == 2
    device.expect_nothing(0.1)  # QoS -1 is never acknowledged


def test_qos_minus_one_publish_dropped_and_counted_when_disabled(start_broker, sn, clients):
    mqgate = start_broker(gateways={"mqttsn": {"predefined": PREDEFINED, "enable_qos3": False}})
    sub = subscriber(clients, mqgate, "#", 1)
    device = sn(mqgate).raw()
    device.send(*_qos3_datagrams())
    wait_for(lambda: metric(mqgate, "qos3_dropped") == 2)
    clients.paho(mqgate.port, "paho-pub").publish("sensors/temp", b"barrier", 1)
    assert sub.expect().payload == b"barrier"  # nothing from the device came first
    assert metric(mqgate, "qos3_published") == 0
