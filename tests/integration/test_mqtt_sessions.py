"""Sessions over real sockets: clean start, persistence, expiry, the bounded offline queue, takeover and
redelivery of unacknowledged messages (MQTT 5.0 §3.1.2.4, §3.1.2.11, §4.1, §4.4, §4.9)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core.mqtt.codec import Disconnect, Properties, Puback, Pubcomp, Publish, Pubrec, Pubrel
from core.mqtt.numbers import ReasonCode
from tests.conftest import RunningBroker
from tests.integration.helpers import Clients, paho_props, wait_for

VERSIONS = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])


@pytest.fixture
def clients(start_broker: Callable[..., RunningBroker]) -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


def _persistent(version: int) -> dict[str, Any]:
    """Connect arguments for a session that outlives the connection, in either protocol version."""
    if version == 5:
        return {"clean_start": False, "properties": paho_props("CONNECT", SessionExpiryInterval=3600)}
    return {"clean_start": False}


def _raw_persistent(version: int) -> Properties:
    return Properties(session_expiry_interval=3600) if version == 5 else Properties()


def _offline(mqgate: RunningBroker, client_id: str) -> None:
    """Wait until the broker has detached ``client_id``'s session from its connection."""
    wait_for(lambda: mqgate.call(lambda: mqgate.broker.sessions[client_id].sink is None))


def _has_session(mqgate: RunningBroker, client_id: str) -> bool:
    return mqgate.call(lambda: client_id in mqgate.broker.sessions)


# --- clean start and persistent sessions


@VERSIONS
def test_persistent_session_keeps_subscriptions_and_queues_qos1_messages_in_order(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    sub = clients.paho(mqgate.port, "keeper", version=version, **_persistent(version))
    assert sub.connack is not None and not sub.connack.session_present
    sub.subscribe("queued/#", 1)
    sub.disconnect()
    _offline(mqgate, "keeper")
    pub = clients.paho(mqgate.port, "pub", version=version)
    for i in range(5):
        pub.publish(f"queued/{i}", f"m{i}".encode(), 1)
    assert mqgate.call(lambda: len(mqgate.broker.sessions["keeper"].queue)) == 5
    back = clients.paho(mqgate.port, "keeper", version=version, **_persistent(version))
    assert back.connack is not None and back.connack.session_present
    received = back.expect_many(5)
    assert [(m.topic, m.payload, m.qos) for m in received] == [
        (f"queued/{i}", f"m{i}".encode(), 1) for i in range(5)
    ]
    pub.publish("queued/live", b"live", 1)  # the subscription is still there without subscribing again
    assert back.expect().payload == b"live"


@VERSIONS
def test_clean_start_discards_the_previous_session(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    sub = clients.paho(mqgate.port, "cleaned", version=version, **_persistent(version))
    sub.subscribe("queued/#", 1)
    sub.disconnect()
    _offline(mqgate, "cleaned")
    pub = clients.paho(mqgate.port, "pub", version=version)
    pub.publish("queued/x", b"lost", 1)
    back = clients.paho(mqgate.port, "cleaned", version=version, clean_start=True)
    assert back.connack is not None and not back.connack.session_present
    back.expect_none()
    assert mqgate.call(lambda: mqgate.broker.sessions["cleaned"].subscriptions) == {}
    no_match = 0 if version == 4 else ReasonCode.NO_MATCHING_SUBSCRIBERS
    assert pub.publish("queued/y", b"nobody", 1) == no_match


def test_v3_clean_session_ends_the_session_at_disconnect(mqgate: RunningBroker, clients: Clients) -> None:
    client = clients.paho(mqgate.port, "transient", version=4, clean_start=True)
    client.subscribe("t/#", 1)
    client.disconnect()
    wait_for(lambda: not _has_session(mqgate, "transient"))
    back = clients.paho(mqgate.port, "transient", version=4, clean_start=False)
    assert back.connack is not None and not back.connack.session_present


# --- v5 session expiry


def test_v5_session_expiry_0_ends_the_session_at_disconnect(mqgate: RunningBroker, clients: Clients) -> None:
    client = clients.paho(mqgate.port, "brief", clean_start=False)  # no SessionExpiryInterval: 0
    client.subscribe("t/#", 1)
    client.disconnect()
    wait_for(lambda: not _has_session(mqgate, "brief"))
    back = clients.paho(mqgate.port, "brief", clean_start=False)
    assert back.connack is not None and not back.connack.session_present


def test_v5_session_is_kept_until_its_expiry_interval_passes(mqgate: RunningBroker, clients: Clients) -> None:
    props = paho_props("CONNECT", SessionExpiryInterval=10)
    client = clients.paho(mqgate.port, "expiring", clean_start=False, properties=props)
    client.subscribe("t/#", 1)
    client.disconnect()
    _offline(mqgate, "expiring")
    mqgate.call(lambda: mqgate.broker.handle_timeouts(mqgate.loop.time() + 9))
    assert _has_session(mqgate, "expiring")
    mqgate.call(lambda: mqgate.broker.handle_timeouts(mqgate.loop.time() + 11))
    assert not _has_session(mqgate, "expiring")
    back = clients.paho(mqgate.port, "expiring", clean_start=False, properties=props)
    assert back.connack is not None and not back.connack.session_present


def test_v5_reconnect_before_expiry_resumes_the_session(mqgate: RunningBroker, clients: Clients) -> None:
    props = paho_props("CONNECT", SessionExpiryInterval=10)
    client = clients.paho(mqgate.port, "resumed", clean_start=False, properties=props)
    client.subscribe("t/#", 1)
    client.disconnect()
    _offline(mqgate, "resumed")
    mqgate.call(lambda: mqgate.broker.handle_timeouts(mqgate.loop.time() + 5))
    back = clients.paho(mqgate.port, "resumed", clean_start=False, properties=props)
    assert back.connack is not None and back.connack.session_present
    mqgate.call(lambda: mqgate.broker.handle_timeouts(mqgate.loop.time() + 100))  # online: never expires
    assert _has_session(mqgate, "resumed")
    clients.paho(mqgate.port, "pub").publish("t/x", b"still subscribed", 1)
    assert back.expect().payload == b"still subscribed"


def test_v5_disconnect_can_shorten_the_session_expiry_to_0(mqgate: RunningBroker, clients: Clients) -> None:
    props = paho_props("CONNECT", SessionExpiryInterval=3600)
    client = clients.paho(mqgate.port, "shortened", clean_start=False, properties=props)
    client.subscribe("t/#", 1)
    client.disconnect(properties=paho_props("DISCONNECT", SessionExpiryInterval=0))
    wait_for(lambda: not _has_session(mqgate, "shortened"))


def test_v5_disconnect_may_not_set_an_expiry_when_connect_had_0(
    mqgate: RunningBroker, clients: Clients
) -> None:
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("zero", clean_start=False)
    raw.send(Disconnect(0, Properties(session_expiry_interval=60)))
    packets = raw.expect_closed()
    assert [(type(p), getattr(p, "reason_code", None)) for p in packets] == [
        (Disconnect, ReasonCode.PROTOCOL_ERROR)
    ]


def test_v5_clean_start_with_expiry_starts_fresh_but_persists(
    mqgate: RunningBroker, clients: Clients
) -> None:
    props = paho_props("CONNECT", SessionExpiryInterval=60)
    first = clients.paho(mqgate.port, "fresh", clean_start=False, properties=props)
    first.subscribe("old/#", 1)
    first.disconnect()
    _offline(mqgate, "fresh")
    second = clients.paho(mqgate.port, "fresh", clean_start=True, properties=props)
    assert second.connack is not None and not second.connack.session_present
    second.subscribe("new/#", 1)
    second.disconnect()
    _offline(mqgate, "fresh")
    third = clients.paho(mqgate.port, "fresh", clean_start=False, properties=props)
    assert third.connack is not None and third.connack.session_present
    assert set(mqgate.call(lambda: mqgate.broker.sessions["fresh"].subscriptions)) == {"new/#"}


# --- the offline queue


@VERSIONS
def test_offline_queue_keeps_the_newest_messages_and_counts_the_dropped(
    start_broker: Callable[..., RunningBroker], clients: Clients, version: int
) -> None:
    mqgate = start_broker(broker={"max_mqueue_len": 3})
    sub = clients.paho(mqgate.port, "bounded", version=version, **_persistent(version))
    sub.subscribe("bound/#", 1)
    sub.disconnect()
    _offline(mqgate, "bounded")
    pub = clients.paho(mqgate.port, "pub", version=version)
    for i in range(5):
        pub.publish("bound/t", f"m{i}".encode(), 1)
    back = clients.paho(mqgate.port, "bounded", version=version, **_persistent(version))
    assert [m.payload for m in back.expect_many(3)] == [b"m2", b"m3", b"m4"]
    back.expect_none()
    assert mqgate.call(lambda: mqgate.broker.metrics.dropped_queue_full) == 2


@pytest.mark.parametrize("store_qos0", [True, False])
def test_qos0_messages_are_queued_for_an_offline_session_only_when_configured(
    start_broker: Callable[..., RunningBroker], clients: Clients, store_qos0: bool
) -> None:
    mqgate = start_broker(broker={"mqueue_store_qos0": store_qos0})
    sub = clients.paho(mqgate.port, "q0", version=4, clean_start=False)
    sub.subscribe("q0/#", 1)
    sub.disconnect()
    _offline(mqgate, "q0")
    pub = clients.paho(mqgate.port, "pub", version=4)
    pub.publish("q0/a", b"qos0", 0)
    pub.publish("q0/b", b"qos1", 1)
    wait_for(lambda: mqgate.call(lambda: mqgate.broker.metrics.messages_published) == 2)
    back = clients.paho(mqgate.port, "q0", version=4, clean_start=False)
    expected = [(b"qos0", 0), (b"qos1", 1)] if store_qos0 else [(b"qos1", 1)]
    assert [(m.payload, m.qos) for m in back.expect_many(len(expected))] == expected
    back.expect_none()
    assert mqgate.call(lambda: mqgate.broker.metrics.dropped_qos0_offline) == (0 if store_qos0 else 1)


# --- takeover


def test_v5_takeover_disconnects_the_first_client_with_0x8e_and_moves_the_session(
    mqgate: RunningBroker, clients: Clients
) -> None:
    props = paho_props("CONNECT", SessionExpiryInterval=60)
    first = clients.paho(mqgate.port, "twin", clean_start=False, properties=props)
    first.subscribe("twin/#", 1)
    second = clients.paho(mqgate.port, "twin", clean_start=False, properties=props)
    assert second.connack is not None and second.connack.session_present
    assert first.expect_disconnect().reason_code == ReasonCode.SESSION_TAKEN_OVER
    clients.paho(mqgate.port, "pub").publish("twin/x", b"to the new one", 1)
    assert second.expect().payload == b"to the new one"
    first.expect_none()
    assert mqgate.call(lambda: mqgate.broker.metrics.sessions_taken_over) == 1


def test_v3_takeover_closes_the_first_connection_and_moves_the_session(
    mqgate: RunningBroker, clients: Clients
) -> None:
    first = clients.paho(mqgate.port, "twin", version=4, clean_start=False)
    first.subscribe("twin/#", 1)
    second = clients.paho(mqgate.port, "twin", version=4, clean_start=False)
    assert second.connack is not None and second.connack.session_present
    first.expect_disconnect()
    clients.paho(mqgate.port, "pub", version=4).publish("twin/x", b"to the new one", 1)
    assert second.expect().payload == b"to the new one"
    first.expect_none()


@VERSIONS
def test_takeover_resends_messages_the_first_connection_did_not_acknowledge(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    first = clients.raw(mqgate.port, version=version)
    first.connect("twin", clean_start=False, properties=_raw_persistent(version))
    first.subscribe("twin/#", 1)
    clients.paho(mqgate.port, "pub", version=version).publish("twin/x", b"unacked", 1)
    original = first.expect(Publish)
    second = clients.raw(mqgate.port, version=version)
    assert second.connect("twin", clean_start=False, properties=_raw_persistent(version)).session_present
    again = second.expect(Publish)
    assert (again.topic, again.payload, again.packet_id, again.dup) == (
        "twin/x",
        b"unacked",
        original.packet_id,
        True,
    )
    first.expect_closed()


# --- redelivery of unacknowledged messages


@VERSIONS
def test_unacknowledged_qos1_message_is_redelivered_with_dup_on_reconnect(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    raw = clients.raw(mqgate.port, version=version)
    raw.connect("forgetful", clean_start=False, properties=_raw_persistent(version))
    assert raw.subscribe("redo/#", 1).reason_codes == (1,)
    clients.paho(mqgate.port, "pub", version=version).publish("redo/a", b"again", 1)
    first = raw.expect(Publish)
    assert (first.topic, first.payload, first.qos, first.dup) == ("redo/a", b"again", 1, False)
    raw.drop()  # no PUBACK
    _offline(mqgate, "forgetful")
    back = clients.raw(mqgate.port, version=version)
    assert back.connect("forgetful", clean_start=False, properties=_raw_persistent(version)).session_present
    redelivered = back.expect(Publish)
    assert (redelivered.topic, redelivered.payload, redelivered.qos, redelivered.dup) == (
        "redo/a",
        b"again",
        1,
        True,
    )
    assert redelivered.packet_id == first.packet_id
    back.send(Puback(redelivered.packet_id))
    wait_for(lambda: not mqgate.call(lambda: mqgate.broker.sessions["forgetful"].inflight))
    back.expect_nothing()


@VERSIONS
def test_unacknowledged_messages_are_redelivered_before_the_queued_ones(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    raw = clients.raw(mqgate.port, version=version)
    raw.connect("ordered", clean_start=False, properties=_raw_persistent(version))
    raw.subscribe("ord/#", 1)
    pub = clients.paho(mqgate.port, "pub", version=version)
    pub.publish("ord/t", b"1", 1)
    assert raw.expect(Publish).payload == b"1"
    raw.drop()
    _offline(mqgate, "ordered")
    pub.publish("ord/t", b"2", 1)
    pub.publish("ord/t", b"3", 1)
    back = clients.raw(mqgate.port, version=version)
    back.connect("ordered", clean_start=False, properties=_raw_persistent(version))
    received = [back.expect(Publish) for _ in range(3)]
    assert [(p.payload, p.dup) for p in received] == [(b"1", True), (b"2", False), (b"3", False)]
    assert len({p.packet_id for p in received}) == 3


def test_qos2_delivery_acknowledged_with_pubrec_gets_pubrel_again_after_reconnect(
    mqgate: RunningBroker, clients: Clients
) -> None:
    raw = clients.raw(mqgate.port, version=4)
    raw.connect("half-done", clean_start=False)
    raw.subscribe("q2/#", 2)
    clients.paho(mqgate.port, "pub", version=4).publish("q2/t", b"two", 2)
    publish = raw.expect(Publish)
    assert publish.qos == 2
    raw.send(Pubrec(publish.packet_id))
    assert raw.expect(Pubrel).packet_id == publish.packet_id
    raw.drop()  # no PUBCOMP
    _offline(mqgate, "half-done")
    back = clients.raw(mqgate.port, version=4)
    assert back.connect("half-done", clean_start=False).session_present
    assert back.expect(Pubrel).packet_id == publish.packet_id  # PUBREL, not the PUBLISH again
    back.send(Pubcomp(publish.packet_id))
    wait_for(lambda: not mqgate.call(lambda: mqgate.broker.sessions["half-done"].inflight))
    back.expect_nothing()


def test_qos2_delivery_without_pubrec_is_resent_as_publish_with_dup(
    mqgate: RunningBroker, clients: Clients
) -> None:
    raw = clients.raw(mqgate.port, version=4)
    raw.connect("no-rec", clean_start=False)
    raw.subscribe("q2/#", 2)
    clients.paho(mqgate.port, "pub", version=4).publish("q2/t", b"two", 2)
    publish = raw.expect(Publish)
    raw.drop()
    _offline(mqgate, "no-rec")
    back = clients.raw(mqgate.port, version=4)
    back.connect("no-rec", clean_start=False)
    again = back.expect(Publish)
    assert (again.payload, again.qos, again.dup, again.packet_id) == (b"two", 2, True, publish.packet_id)


# --- the inflight window


@VERSIONS
def test_inflight_window_holds_back_messages_until_one_is_acknowledged(
    start_broker: Callable[..., RunningBroker], clients: Clients, version: int
) -> None:
    mqgate = start_broker(broker={"max_inflight": 2})
    raw = clients.raw(mqgate.port, version=version)
    raw.connect("slow")
    raw.subscribe("win/#", 1)
    pub = clients.paho(mqgate.port, "pub", version=version)
    for i in range(4):
        pub.publish("win/t", str(i).encode(), 1)
    first, second = raw.expect(Publish), raw.expect(Publish)
    assert [first.payload, second.payload] == [b"0", b"1"]
    raw.expect_nothing()  # the window of 2 is full
    assert mqgate.call(lambda: len(mqgate.broker.sessions["slow"].queue)) == 2
    raw.send(Puback(first.packet_id))
    assert raw.expect(Publish).payload == b"2"
    raw.expect_nothing()
    raw.send(Puback(second.packet_id))
    assert raw.expect(Publish).payload == b"3"


def test_qos0_messages_are_not_held_back_by_a_full_inflight_window(
    start_broker: Callable[..., RunningBroker], clients: Clients
) -> None:
    mqgate = start_broker(broker={"max_inflight": 1})
    raw = clients.raw(mqgate.port, version=4)
    raw.connect("mixed")
    raw.subscribe("mix/#", 1)
    pub = clients.paho(mqgate.port, "pub", version=4)
    pub.publish("mix/t", b"q1", 1)
    assert raw.expect(Publish).payload == b"q1"
    pub.publish("mix/t", b"q0", 0)
    unheld = raw.expect(Publish)
    assert (unheld.payload, unheld.qos) == (b"q0", 0)
