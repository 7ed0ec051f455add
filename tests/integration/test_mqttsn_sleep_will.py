"""MQTT-SN 1.2 wills (§6.3, §6.4) and sleeping clients (§6.14) through the live gateway over real UDP sockets.

Timers are made small through the configuration (keep-alive and sleep durations of 1 s, tolerance x1.5) and
every wait is bounded: a will is waited for on the paho side, and its absence is shown with a barrier message
published on the will topic after the point where the will would have been published.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateways.mqttsn import codec
from gateways.mqttsn.channel import ChannelState
from tests.integration.helpers import Clients, PahoClient, wait_for
from tests.integration.mqttsn_helpers import SnClient, SnClients, gateway_of, metric, sn_port

WILL_TOPIC = "will/dev"


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


def will_watcher(clients: Clients, mqgate: Any) -> PahoClient:
    watcher = clients.paho(mqgate.port, "will-watcher", version=5)
    assert watcher.subscribe("will/#", 1) == 1
    return watcher


def assert_no_will(clients: Clients, mqgate: Any, watcher: PahoClient) -> None:
    """Publish a barrier on the will topic: it must be the first message the watcher gets."""
    clients.paho(mqgate.port, "barrier-pub").publish(WILL_TOPIC, b"barrier", 1)
    message = watcher.expect()
    assert (message.topic, message.payload) == (WILL_TOPIC, b"barrier"), "a will was published"


def state_of(mqgate: Any, client_id: str) -> ChannelState | None:
    def read() -> ChannelState | None:
        channel = gateway_of(mqgate).by_client.get(client_id)
        return None if channel is None else channel.state

    state: ChannelState | None = mqgate.call(read)
    return state


def sleeper(sn: SnClients, client_id: str, topic: str, *, clean_session: bool = True) -> tuple[SnClient, int]:
    """A raw device subscribed to ``topic`` at QoS 1, then asleep for 60 s; returns it and the SUBACK id."""
    device = sn.raw()
    device.connect(client_id, clean_session=clean_session)
    topic_id = device.subscribe(topic, 1).topic_id
    device.disconnect(60)
    return device, topic_id


# --- wills


def test_will_handshake_then_will_published_on_keepalive_timeout(mqgate, sn, clients):
    watcher = will_watcher(clients, mqgate)
    device = sn(mqgate).sn12("will-sn12", keep_alive=1)
    device.set_will(WILL_TOPIC, "sn12 lost", 1, False)
    device.send_connect()  # WILLTOPICREQ, WILLTOPIC, WILLMSGREQ, WILLMSG, CONNACK
    message = watcher.expect(timeout=5)  # keep-alive 1 s x 1.5 tolerance, then lost
    assert (message.topic, message.payload, message.qos) == (WILL_TOPIC, b"sn12 lost", 1)
    assert metric(mqgate, "clients_lost") == 1


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
def test_raw_will_handshake_then_will_published_on_keepalive_timeout(mqgate, sn, clients, clean_session):
    watcher = will_watcher(clients, mqgate)
    device = sn(mqgate).raw()
    device.send(codec.Connect("will-raw", 1, clean_session, True))
    device.expect(codec.WillTopicReq)
    device.send(codec.WillTopic(WILL_TOPIC, 0, False))
    device.expect(codec.WillMsgReq)
    device.send(codec.WillMsg(b"raw lost"))
    assert device.expect(codec.Connack).return_code == 0
    message = watcher.expect(timeout=5)
    assert (message.topic, message.payload) == (WILL_TOPIC, b"raw lost")


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
def test_no_will_after_a_normal_disconnect(mqgate, sn, clients, clean_session):
    watcher = will_watcher(clients, mqgate)
    device = sn(mqgate).raw()
    device.connect(
        "will-normal",
        duration=1,
        clean_session=clean_session,
        will=(WILL_TOPIC, b"must not appear", 1, False),
    )
    device.disconnect()
    assert state_of(mqgate, "will-normal") in (None, ChannelState.DISCONNECTED)
    assert_no_will(clients, mqgate, watcher)


def test_willtopicupd_and_willmsgupd_change_the_published_will(mqgate, sn, clients):
    watcher = will_watcher(clients, mqgate)
    device = sn(mqgate).raw()
    device.connect("will-upd", duration=1, will=("will/old", b"old message", 0, False))
    device.send(codec.WillTopicUpd(WILL_TOPIC, 1, False))
    assert device.expect(codec.WillTopicResp).return_code == 0
    device.send(codec.WillMsgUpd(b"new message"))
    assert device.expect(codec.WillMsgResp).return_code == 0
    message = watcher.expect(timeout=5)
    assert (message.topic, message.payload, message.qos) == (WILL_TOPIC, b"new message", 1)


def test_sn12_will_updates_change_the_published_will(mqgate, sn, clients):
    watcher = will_watcher(clients, mqgate)
    device = sn(mqgate).sn12("will-upd-sn12", keep_alive=1)
    device.set_will("will/old", "old", 0, False)
    device.send_connect()
    device.send_will_topic_update(WILL_TOPIC)
    device.send_will_message_update("updated by sn12")
    message = watcher.expect(timeout=5)
    assert (message.topic, message.payload) == (WILL_TOPIC, b"updated by sn12")


def test_willtopicupd_alone_keeps_the_will_message(mqgate, sn, clients):
    watcher = will_watcher(clients, mqgate)
    device = sn(mqgate).raw()
    device.connect("will-topic-only", duration=1, will=("will/old", b"kept message", 0, False))
    device.send(codec.WillTopicUpd(WILL_TOPIC, 0, False))
    assert device.expect(codec.WillTopicResp).return_code == 0
    message = watcher.expect(timeout=5)
    assert (message.topic, message.payload) == (WILL_TOPIC, b"kept message")


def test_empty_willtopicupd_deletes_the_will(mqgate, sn, clients):
    watcher = will_watcher(clients, mqgate)
    device = sn(mqgate).raw()
    device.connect("will-deleted", duration=1, will=(WILL_TOPIC, b"deleted", 1, False))
    device.send(bytes((2, codec.MsgType.WILLTOPICUPD)))  # the 2-octet empty form
    assert device.expect(codec.WillTopicResp).return_code == 0
    wait_for(lambda: metric(mqgate, "clients_lost") == 1)  # keep-alive expired: lost, with no will left
    assert_no_will(clients, mqgate, watcher)


def test_takeover_by_connect_from_another_address_publishes_the_old_will(mqgate, sn, clients):
    watcher = will_watcher(clients, mqgate)
    owned = sn(mqgate)
    old = owned.raw()
    old.connect("taken", will=(WILL_TOPIC, b"old link lost", 1, False))
    new = owned.raw()
    assert new.address != old.address
    new.connect("taken")
    message = watcher.expect()
    assert (message.topic, message.payload) == (WILL_TOPIC, b"old link lost")
    new.ping()  # the client id now lives at the new address


# --- sleep


def test_disconnect_with_duration_is_acknowledged_by_disconnect_and_sleeps(mqgate, sn):
    device = sn(mqgate).raw()
    device.connect("sleepy")
    device.send(codec.Disconnect(60))
    assert device.expect(codec.Disconnect).duration is None
    assert state_of(mqgate, "sleepy") is ChannelState.ASLEEP
    sn12 = sn(mqgate).sn12("sleepy-sn12")
    sn12.send_connect()
    sn12.send_disconnect(60)  # raises unless the gateway answers DISCONNECT
    assert state_of(mqgate, "sleepy-sn12") is ChannelState.ASLEEP


@pytest.mark.parametrize("wildcard", [False, True], ids=["known-topic-id", "register-first"])
def test_qos1_message_queued_while_asleep_delivered_after_pingreq_before_pingresp(
    mqgate, sn, clients, wildcard
):
    device, topic_id = sleeper(sn(mqgate), "sleeper", "nap/#" if wildcard else "nap/t")
    clients.paho(mqgate.port, "paho-pub").publish("nap/t", b"queued", 1)  # acknowledged: queued by the broker
    device.send(codec.Pingreq("sleeper"))
    if wildcard:
        register = device.expect(codec.Register)
        assert register.topic_name == "nap/t"
        device.send(codec.Regack(register.topic_id, register.msg_id, 0))
        topic_id = register.topic_id
    publish = device.expect(codec.Publish)
    assert (publish.topic_id, publish.data, publish.qos) == (topic_id, b"queued", 1)
    device.expect_nothing(0.3)  # no PINGRESP while the delivery is unacknowledged
    device.ack(publish)
    device.expect(codec.Pingresp)
    assert state_of(mqgate, "sleeper") is ChannelState.ASLEEP


def test_several_queued_messages_arrive_one_at_a_time_then_pingresp(mqgate, sn, clients):
    device, _ = sleeper(sn(mqgate), "sleeper-many", "nap/t")
    publisher = clients.paho(mqgate.port, "paho-pub")
    for i in range(3):
        publisher.publish("nap/t", b"queued %d" % i, 1)
    device.send(codec.Pingreq("sleeper-many"))
    received = []
    for i in range(3):
        publish = device.expect(codec.Publish)  # not PINGRESP: more is queued
        if i == 0:
            device.expect_nothing(0.3)  # one QoS 1 delivery outstanding at a time
        received.append(publish.data)
        device.ack(publish)
    device.expect(codec.Pingresp)
    assert received == [b"queued 0", b"queued 1", b"queued 2"]


def test_wake_from_a_new_source_port_gets_the_queued_messages_there(mqgate, sn, clients):
    owned = sn(mqgate)
    device, topic_id = sleeper(owned, "roamer", "roam/t")
    clients.paho(mqgate.port, "paho-pub").publish("roam/t", b"follow me", 1)
    moved = owned.raw()  # a new UDP socket, so a new source port
    assert moved.address != device.address
    moved.send(codec.Pingreq("roamer"))
    publish = moved.expect(codec.Publish)
    assert (publish.topic_id, publish.data) == (topic_id, b"follow me")
    moved.ack(publish)
    moved.expect(codec.Pingresp)
    device.expect_nothing(0.1)  # the old port hears nothing


def test_disconnect_with_duration_while_asleep_rearms_the_sleep_timer(mqgate, sn, clients):
    watcher = will_watcher(clients, mqgate)
    device = sn(mqgate).raw()
    device.connect("rearm", will=(WILL_TOPIC, b"must not appear", 1, False))
    device.disconnect(1)  # asleep for 1 s (x1.5 tolerance)
    first_deadline = mqgate.call(lambda: gateway_of(mqgate).by_client["rearm"].sleep_until)
    device.disconnect(60)  # asleep again: the timer is re-armed
    assert mqgate.call(lambda: gateway_of(mqgate).by_client["rearm"].sleep_until) > first_deadline + 30
    loop = mqgate.loop
    wait_for(lambda: mqgate.call(loop.time) > first_deadline + 0.2)  # the first deadline has passed
    device.ping("rearm")  # still known and asleep: nothing queued, so PINGRESP at once
    assert state_of(mqgate, "rearm") is ChannelState.ASLEEP
    assert metric(mqgate, "clients_lost") == 0
    assert_no_will(clients, mqgate, watcher)


def test_keepalive_does_not_expire_while_asleep(mqgate, sn, clients):
    watcher = will_watcher(clients, mqgate)
    device = sn(mqgate).raw()
    device.connect("deep-sleeper", duration=1, will=(WILL_TOPIC, b"must not appear", 1, False))
    device.disconnect(60)  # the sleep timer replaces the keep-alive of 1 s (x1.5)
    loop = mqgate.loop
    keepalive_deadline = mqgate.call(loop.time) + 1.5
    wait_for(lambda: mqgate.call(loop.time) > keepalive_deadline + 0.2)
    assert state_of(mqgate, "deep-sleeper") is ChannelState.ASLEEP
    device.ping("deep-sleeper")
    assert metric(mqgate, "clients_lost") == 0
    assert_no_will(clients, mqgate, watcher)


def test_disconnect_without_duration_while_asleep_ends_normally_without_will(mqgate, sn, clients):
    watcher = will_watcher(clients, mqgate)
    device = sn(mqgate).raw()
    device.connect("sleep-then-leave", will=(WILL_TOPIC, b"must not appear", 1, False))
    device.disconnect(60)
    device.disconnect()
    wait_for(lambda: "sleep-then-leave" not in mqgate.call(lambda: set(mqgate.broker.sessions)))
    assert state_of(mqgate, "sleep-then-leave") is None
    assert_no_will(clients, mqgate, watcher)


def test_connect_while_asleep_makes_the_client_active_again(mqgate, sn, clients):
    device, topic_id = sleeper(sn(mqgate), "back-active", "act/t", clean_session=False)
    publisher = clients.paho(mqgate.port, "paho-pub")
    publisher.publish("act/t", b"queued while asleep", 1)
    device.connect("back-active", clean_session=False)  # CONNACK first, then the queue flows
    publish = device.expect(codec.Publish)
    assert (publish.topic_id, publish.data) == (topic_id, b"queued while asleep")
    device.ack(publish)
    assert state_of(mqgate, "back-active") is ChannelState.ACTIVE
    publisher.publish("act/t", b"live", 1)
    assert device.expect(codec.Publish).data == b"live"  # delivered at once, no PINGREQ needed


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
def test_sleep_timer_expiry_loses_the_client_and_publishes_its_will(mqgate, sn, clients, clean_session):
    watcher = will_watcher(clients, mqgate)
    device = sn(mqgate).raw()
    device.connect("dreamer", clean_session=clean_session, will=(WILL_TOPIC, b"never woke", 1, False))
    device.disconnect(1)
    message = watcher.expect(timeout=5)  # 1 s x 1.5 tolerance
    assert (message.topic, message.payload) == (WILL_TOPIC, b"never woke")
    assert metric(mqgate, "clients_lost") == 1
    assert state_of(mqgate, "dreamer") in (None, ChannelState.DISCONNECTED)
