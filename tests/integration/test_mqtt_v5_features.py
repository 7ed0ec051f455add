"""MQTT 5.0 features over real sockets with paho-mqtt v5 and the raw client: server keep alive, receive
maximum, maximum packet size, topic aliases, message expiry, subscription identifiers, no local, request and
response properties, assigned client identifiers, reason strings and reason codes (MQTT 5.0 §3.1-§3.11)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from core.mqtt.codec import (
    Connack,
    Disconnect,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    SubscriptionRequest,
)
from core.mqtt.numbers import ReasonCode
from tests.conftest import RunningBroker
from tests.integration.helpers import TIMEOUT, Clients, paho_props, wait_for


@pytest.fixture
def clients(start_broker: Callable[..., RunningBroker]) -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


def _closed_with(packets: list[object]) -> list[int]:
    """The reason codes of the DISCONNECTs among ``packets`` (what the broker sent before closing)."""
    return [p.reason_code for p in packets if isinstance(p, Disconnect)]


def _offline(mqgate: RunningBroker, client_id: str) -> None:
    """Wait until the broker has detached ``client_id``'s session from its connection."""
    wait_for(lambda: mqgate.call(lambda: mqgate.broker.sessions[client_id].sink is None))


# --- CONNACK properties, keep alive


def test_connack_announces_server_keep_alive_and_limits(
    start_broker: Callable[..., RunningBroker], clients: Clients
) -> None:
    mqgate = start_broker(broker={"server_keepalive": 5, "max_packet_size": 4096, "max_topic_alias": 10})
    client = clients.paho(mqgate.port, "announced", keepalive=60)
    assert client.connack is not None
    props = client.connack.properties
    assert props is not None
    assert props.ServerKeepAlive == 5
    assert props.MaximumPacketSize == 4096
    assert props.TopicAliasMaximum == 10


def test_server_keep_alive_replaces_the_client_keepalive(
    start_broker: Callable[..., RunningBroker], clients: Clients
) -> None:
    mqgate = start_broker(broker={"server_keepalive": 1})
    raw = clients.raw(mqgate.port, version=5)
    connack = raw.connect("lazy", keepalive=600)
    assert connack.properties.server_keep_alive == 1
    assert _closed_with(raw.expect_closed(timeout=TIMEOUT)) == [ReasonCode.KEEP_ALIVE_TIMEOUT]


def test_keepalive_deadline_is_one_and_a_half_times_the_keepalive_after_the_last_packet(
    mqgate: RunningBroker, clients: Clients
) -> None:
    # A raw client rather than paho: paho's 1 s loop granularity makes its own keepalive=1 pings racy.
    def broker_time() -> float:
        return mqgate.call(mqgate.loop.time)

    raw = clients.raw(mqgate.port, version=5)
    raw.connect("pinger", keepalive=1)
    connected_at = broker_time()
    wait_for(lambda: broker_time() > connected_at + 0.8)  # well before 1.5x the keepalive
    raw.send(Pingreq())
    raw.expect(Pingresp)
    wait_for(lambda: broker_time() > connected_at + 1.7)  # past 1.5x from CONNECT, not from the ping
    assert mqgate.call(lambda: mqgate.broker.sessions["pinger"].sink is not None)
    packets = raw.expect_closed(timeout=TIMEOUT)  # 1.5 s after the ping
    assert broker_time() >= connected_at + 2.2
    assert _closed_with(packets) == [ReasonCode.KEEP_ALIVE_TIMEOUT]


# --- receive maximum, maximum packet size


def test_client_receive_maximum_limits_unacknowledged_deliveries(
    mqgate: RunningBroker, clients: Clients
) -> None:
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("one-at-a-time", properties=Properties(receive_maximum=1))
    raw.subscribe("rm/#", 1)
    pub = clients.paho(mqgate.port, "pub")
    for i in range(3):
        pub.publish("rm/t", str(i).encode(), 1)
    first = raw.expect(Publish)
    assert first.payload == b"0"
    raw.expect_nothing()
    raw.send(Puback(first.packet_id))
    second = raw.expect(Publish)
    assert second.payload == b"1"
    raw.expect_nothing()
    raw.send(Puback(second.packet_id))
    assert raw.expect(Publish).payload == b"2"


def test_publish_over_the_broker_maximum_packet_size_is_refused_with_0x95(
    start_broker: Callable[..., RunningBroker], clients: Clients
) -> None:
    mqgate = start_broker(broker={"max_packet_size": 128})
    watcher = clients.paho(mqgate.port, "watcher")
    watcher.subscribe("big/#", 0)
    raw = clients.raw(mqgate.port, version=5)
    assert raw.connect("big").properties.maximum_packet_size == 128
    raw.publish("big/ok", b"x" * 50)
    assert watcher.expect().payload == b"x" * 50
    raw.publish("big/too", b"x" * 200)
    assert _closed_with(raw.expect_closed()) == [ReasonCode.PACKET_TOO_LARGE]
    watcher.expect_none()


def test_paho_publish_over_the_broker_maximum_packet_size_ends_the_connection(
    start_broker: Callable[..., RunningBroker], clients: Clients
) -> None:
    mqgate = start_broker(broker={"max_packet_size": 128})
    client = clients.paho(mqgate.port, "big")
    client.publish("big/too", b"x" * 200, wait=False)  # paho does not check the CONNACK's limit itself
    assert client.expect_disconnect().reason_code == ReasonCode.PACKET_TOO_LARGE
    assert mqgate.call(lambda: mqgate.broker.metrics.malformed_packets) == 1


def test_messages_over_the_client_maximum_packet_size_are_not_sent_to_it(
    mqgate: RunningBroker, clients: Clients
) -> None:
    small = clients.paho(mqgate.port, "small", properties=paho_props("CONNECT", MaximumPacketSize=100))
    small.subscribe("mps/#", 1)
    pub = clients.paho(mqgate.port, "pub")
    pub.publish("mps/t", b"small 1", 1)
    pub.publish("mps/t", b"y" * 200, 1)
    pub.publish("mps/t", b"z" * 200, 0)
    pub.publish("mps/t", b"small 2", 1)
    assert [m.payload for m in small.expect_many(2)] == [b"small 1", b"small 2"]
    small.expect_none()
    assert mqgate.call(lambda: mqgate.broker.metrics.dropped_too_large) == 2
    assert mqgate.call(lambda: mqgate.broker.sessions["small"].inflight) == {}


# --- topic aliases


def test_client_topic_alias_stands_for_the_topic_of_later_publishes(
    mqgate: RunningBroker, clients: Clients
) -> None:
    sub = clients.paho(mqgate.port, "sub")
    sub.subscribe("alias/#", 1)
    pub = clients.paho(mqgate.port, "pub")
    pub.publish("alias/long/topic", b"first", 1, properties=paho_props("PUBLISH", TopicAlias=3))
    pub.publish("", b"second", 1, properties=paho_props("PUBLISH", TopicAlias=3))
    pub.publish("alias/other", b"third", 1, properties=paho_props("PUBLISH", TopicAlias=3))  # remapped
    pub.publish("", b"fourth", 1, properties=paho_props("PUBLISH", TopicAlias=3))
    received = sub.expect_many(4)
    assert [(m.topic, m.payload) for m in received] == [
        ("alias/long/topic", b"first"),
        ("alias/long/topic", b"second"),
        ("alias/other", b"third"),
        ("alias/other", b"fourth"),
    ]
    assert all(getattr(m.properties, "TopicAlias", None) is None for m in received)


def test_unknown_client_topic_alias_is_a_protocol_error(mqgate: RunningBroker, clients: Clients) -> None:
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("confused")
    raw.publish("", b"?", 0, properties=Properties(topic_alias=5))
    assert _closed_with(raw.expect_closed()) == [ReasonCode.PROTOCOL_ERROR]


def test_client_topic_alias_over_the_maximum_is_refused_with_0x94(
    start_broker: Callable[..., RunningBroker], clients: Clients
) -> None:
    mqgate = start_broker(broker={"max_topic_alias": 2})
    raw = clients.raw(mqgate.port, version=5)
    assert raw.connect("greedy").properties.topic_alias_maximum == 2
    raw.publish("a/b", b"?", 0, properties=Properties(topic_alias=3))
    assert _closed_with(raw.expect_closed()) == [ReasonCode.TOPIC_ALIAS_INVALID]


def test_broker_uses_topic_aliases_towards_a_client_that_allows_them(
    mqgate: RunningBroker, clients: Clients
) -> None:
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("aliased", properties=Properties(topic_alias_maximum=1))
    raw.subscribe("out/#", 0)
    pub = clients.paho(mqgate.port, "pub")
    for topic in ("out/one", "out/one", "out/two", "out/one"):
        pub.publish(topic, topic.encode(), 0)
    first, second, third, fourth = (raw.expect(Publish) for _ in range(4))
    assert (first.topic, first.properties.topic_alias, first.payload) == ("out/one", 1, b"out/one")
    assert (second.topic, second.properties.topic_alias, second.payload) == ("", 1, b"out/one")
    # The only alias is taken: another topic goes out in full, without an alias.
    assert (third.topic, third.properties.topic_alias, third.payload) == ("out/two", None, b"out/two")
    assert (fourth.topic, fourth.properties.topic_alias) == ("", 1)


def test_broker_sends_no_topic_alias_to_a_client_that_did_not_allow_them(
    mqgate: RunningBroker, clients: Clients
) -> None:
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("plain")
    raw.subscribe("out/#", 0)
    pub = clients.paho(mqgate.port, "pub")
    pub.publish("out/one", b"1", 0)
    pub.publish("out/one", b"2", 0)
    for _ in range(2):
        publish = raw.expect(Publish)
        assert (publish.topic, publish.properties.topic_alias) == ("out/one", None)


def test_paho_subscriber_with_topic_alias_maximum_receives_every_message(
    mqgate: RunningBroker, clients: Clients
) -> None:
    sub = clients.paho(mqgate.port, "sub", properties=paho_props("CONNECT", TopicAliasMaximum=5))
    sub.subscribe("pa/#", 1)
    pub = clients.paho(mqgate.port, "pub")
    for i in range(3):
        pub.publish("pa/t", str(i).encode(), 1)
    received = sub.expect_many(3)
    assert [m.payload for m in received] == [b"0", b"1", b"2"]
    # paho does not resolve aliases itself: the first carries the topic, later ones the alias only.
    assert received[0].topic == "pa/t"
    assert {m.properties.TopicAlias for m in received} == {1}


# --- message expiry


def test_delivered_message_expiry_is_the_remaining_time(mqgate: RunningBroker, clients: Clients) -> None:
    sub = clients.paho(
        mqgate.port, "late", clean_start=False, properties=paho_props("CONNECT", SessionExpiryInterval=60)
    )
    sub.subscribe("exp/#", 1)
    sub.disconnect()
    _offline(mqgate, "late")
    pub = clients.paho(mqgate.port, "pub")
    pub.publish("exp/t", b"kept", 1, properties=paho_props("PUBLISH", MessageExpiryInterval=100))
    pub.publish("exp/t", b"forever", 1)
    back = clients.paho(
        mqgate.port, "late", clean_start=False, properties=paho_props("CONNECT", SessionExpiryInterval=60)
    )
    kept, forever = back.expect_many(2)
    assert kept.payload == b"kept"
    assert 95 <= kept.properties.MessageExpiryInterval <= 100
    assert forever.payload == b"forever"
    assert not hasattr(forever.properties, "MessageExpiryInterval")


def test_live_delivery_never_announces_more_than_the_original_expiry(
    mqgate: RunningBroker, clients: Clients
) -> None:
    sub = clients.paho(mqgate.port, "idle", keepalive=60)
    sub.subscribe("exp/#", 1)
    # Let the subscriber stay silent for a while (on the broker's clock) before the message is published.
    start = mqgate.call(mqgate.loop.time)
    wait_for(lambda: mqgate.call(mqgate.loop.time) > start + 1.2, timeout=TIMEOUT)
    pub = clients.paho(mqgate.port, "pub")
    pub.publish("exp/t", b"fresh", 1, properties=paho_props("PUBLISH", MessageExpiryInterval=10))
    message = sub.expect()
    assert 9 <= message.properties.MessageExpiryInterval <= 10


def test_expired_messages_are_neither_delivered_from_the_queue_nor_retained(
    mqgate: RunningBroker, clients: Clients
) -> None:
    props = paho_props("CONNECT", SessionExpiryInterval=60)
    sub = clients.paho(mqgate.port, "away", clean_start=False, properties=props)
    sub.subscribe("exp/#", 1)
    sub.disconnect()
    _offline(mqgate, "away")
    pub = clients.paho(mqgate.port, "pub")
    short = paho_props("PUBLISH", MessageExpiryInterval=1)
    pub.publish("exp/queued", b"stale", 1, properties=short)
    pub.publish("exp/retained", b"stale", 1, retain=True, properties=short)
    pub.publish("exp/queued", b"fresh", 1)
    deadline = mqgate.call(lambda: mqgate.broker.sessions["away"].queue[0].message.expires_at)
    assert deadline is not None
    # Poll the broker's clock past the 1 s expiry (the broker works in monotonic time, no fake clock here).
    wait_for(lambda: mqgate.call(mqgate.loop.time) > deadline, timeout=TIMEOUT)
    back = clients.paho(mqgate.port, "away", clean_start=False, properties=props)
    assert back.expect().payload == b"fresh"
    back.expect_none()
    assert mqgate.call(lambda: mqgate.broker.metrics.dropped_expired) == 2  # both stale queued copies
    late = clients.paho(mqgate.port, "late")
    late.subscribe("exp/#", 1)
    late.expect_none()
    assert mqgate.call(lambda: len(mqgate.broker.retained)) == 0


# --- subscription identifiers, no local


def test_subscription_identifiers_are_delivered_with_matching_messages(
    mqgate: RunningBroker, clients: Clients
) -> None:
    sub = clients.paho(mqgate.port, "sid")
    sub.subscribe("sid/+", 1, properties=paho_props("SUBSCRIBE", SubscriptionIdentifier=7))
    sub.subscribe("sid/#", 1, properties=paho_props("SUBSCRIBE", SubscriptionIdentifier=268_435_455))
    sub.subscribe("other/#", 1)  # no identifier
    pub = clients.paho(mqgate.port, "pub")
    pub.publish("sid/a", b"both", 1)
    ids = sorted(i for m in sub.expect_many(2) for i in m.properties.SubscriptionIdentifier)
    assert ids == [7, 268_435_455]
    pub.publish("sid/a/b", b"one", 1)
    assert sub.expect().properties.SubscriptionIdentifier == [268_435_455]
    pub.publish("other/x", b"none", 1)
    assert not hasattr(sub.expect().properties, "SubscriptionIdentifier")
    sub.expect_none()


def test_subscription_identifier_comes_with_retained_messages(
    mqgate: RunningBroker, clients: Clients
) -> None:
    pub = clients.paho(mqgate.port, "pub")
    pub.publish("sid/r", b"retained", 1, retain=True)
    sub = clients.paho(mqgate.port, "sid")
    sub.subscribe("sid/#", 1, properties=paho_props("SUBSCRIBE", SubscriptionIdentifier=42))
    message = sub.expect()
    assert (message.payload, message.retain) == (b"retained", True)
    assert message.properties.SubscriptionIdentifier == [42]


@pytest.mark.parametrize("no_local", [True, False])
def test_no_local_keeps_a_client_own_messages_from_it(
    mqgate: RunningBroker, clients: Clients, no_local: bool
) -> None:
    client = clients.paho(mqgate.port, "talker")
    client.subscribe("chat/#", 1, no_local=no_local)
    other = clients.paho(mqgate.port, "other")
    client.publish("chat/room", b"mine", 1)
    other.publish("chat/room", b"theirs", 1)
    expected = [b"theirs"] if no_local else [b"mine", b"theirs"]
    assert sorted(m.payload for m in client.expect_many(len(expected))) == expected
    client.expect_none()


# --- properties passed through


def test_request_response_and_user_properties_reach_the_subscriber(
    mqgate: RunningBroker, clients: Clients
) -> None:
    sub = clients.paho(mqgate.port, "responder")
    sub.subscribe("req/#", 1)
    pub = clients.paho(mqgate.port, "requester")
    props = paho_props(
        "PUBLISH",
        ResponseTopic="resp/requester",
        CorrelationData=b"\x00\x01corr",
        UserProperty=[("a", "1"), ("b", "2"), ("a", "3")],
        ContentType="application/json",
        PayloadFormatIndicator=1,
    )
    pub.publish("req/x", b'{"q": 1}', 1, properties=props)
    message = sub.expect()
    assert message.properties.ResponseTopic == "resp/requester"
    assert message.properties.CorrelationData == b"\x00\x01corr"
    assert message.properties.UserProperty == [("a", "1"), ("b", "2"), ("a", "3")]
    assert message.properties.ContentType == "application/json"
    assert message.properties.PayloadFormatIndicator == 1
    pub.subscribe("resp/requester", 1)
    sub.publish(
        message.properties.ResponseTopic,
        b"answer",
        1,
        properties=paho_props("PUBLISH", CorrelationData=message.properties.CorrelationData),
    )
    answer = pub.expect()
    assert (answer.payload, answer.properties.CorrelationData) == (b"answer", b"\x00\x01corr")


def test_v5_properties_are_not_sent_to_a_v3_subscriber(mqgate: RunningBroker, clients: Clients) -> None:
    sub = clients.raw(mqgate.port, version=4)
    sub.connect("old")
    sub.subscribe("mixed/#", 1)
    pub = clients.paho(mqgate.port, "new")
    pub.publish("mixed/t", b"body", 1, properties=paho_props("PUBLISH", UserProperty=[("k", "v")]))
    publish = sub.expect(Publish)  # decoded as v3.1.1: any property bytes would corrupt topic or payload
    assert (publish.topic, publish.payload) == ("mixed/t", b"body")


# --- client identifiers, reason strings, reason codes


def test_empty_client_id_gets_an_assigned_client_identifier(mqgate: RunningBroker, clients: Clients) -> None:
    client = clients.paho(mqgate.port, "")
    assert client.connack is not None and client.connack.properties is not None
    assigned = client.connack.properties.AssignedClientIdentifier
    assert assigned.startswith("mqgate-")
    assert mqgate.call(lambda: assigned in mqgate.broker.sessions)
    other = clients.paho(mqgate.port, "")
    assert other.connack is not None and other.connack.properties is not None
    assert other.connack.properties.AssignedClientIdentifier != assigned


def test_v3_empty_client_id_is_accepted_only_with_clean_session(
    mqgate: RunningBroker, clients: Clients
) -> None:
    clean = clients.raw(mqgate.port, version=4)
    assert clean.connect("", clean_start=True).reason_code == 0
    persistent = clients.raw(mqgate.port, version=4)
    refused = persistent.connect("", clean_start=False, check=False)
    assert refused.reason_code == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID  # v3 return code 2
    persistent.expect_closed()


def test_refused_connect_carries_a_reason_string(mqgate: RunningBroker, clients: Clients) -> None:
    client = clients.paho(
        mqgate.port,
        "scram",
        properties=paho_props("CONNECT", AuthenticationMethod="SCRAM-SHA-1"),
        check=False,
    )
    assert client.connack is not None and client.connack.properties is not None
    assert client.connack.reason_code == ReasonCode.BAD_AUTHENTICATION_METHOD
    assert "authentication" in client.connack.properties.ReasonString


def test_no_reason_string_when_the_client_asks_for_no_problem_information(
    mqgate: RunningBroker, clients: Clients
) -> None:
    raw = clients.raw(mqgate.port, version=5)
    connack = raw.connect(
        "quiet-scram",
        properties=Properties(authentication_method="SCRAM-SHA-1", request_problem_information=0),
        check=False,
    )
    assert isinstance(connack, Connack)
    assert connack.reason_code == ReasonCode.BAD_AUTHENTICATION_METHOD
    assert connack.properties.reason_string is None
    raw.expect_closed()


def test_unsubscribe_reports_0x11_for_a_filter_that_was_not_subscribed(
    mqgate: RunningBroker, clients: Clients
) -> None:
    client = clients.paho(mqgate.port, "unsub")
    client.subscribe("there/#", 1)
    assert client.unsubscribe("there/#", "not/there") == [0, ReasonCode.NO_SUBSCRIPTION_EXISTED]
    assert client.unsubscribe("there/#") == [ReasonCode.NO_SUBSCRIPTION_EXISTED]


def test_qos1_publish_without_subscribers_is_acknowledged_with_0x10(
    mqgate: RunningBroker, clients: Clients
) -> None:
    client = clients.paho(mqgate.port, "lonely")
    assert client.publish("nobody/listens", b"?", 1) == ReasonCode.NO_MATCHING_SUBSCRIBERS
    clients.paho(mqgate.port, "listener").subscribe("nobody/#", 0)
    assert client.publish("nobody/listens", b"!", 1) == 0


def test_qos2_publish_without_subscribers_gets_pubrec_0x10_and_completes(
    mqgate: RunningBroker, clients: Clients
) -> None:
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("lonely")
    pid = raw.publish("nobody/listens", b"?", 2)
    pubrec = raw.expect(Pubrec)
    assert (pubrec.packet_id, pubrec.reason_code) == (pid, ReasonCode.NO_MATCHING_SUBSCRIBERS)
    raw.send(Pubrel(pid))  # 0x10 is a success code: the QoS 2 exchange continues (§4.3.3)
    assert raw.expect(Pubcomp) == Pubcomp(pid)


def test_suback_reports_per_filter_reason_codes(mqgate: RunningBroker, clients: Clients) -> None:
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("subber")
    requests = (
        SubscriptionRequest("ok/#", 2),
        SubscriptionRequest("bad/#/x", 1),
        SubscriptionRequest("ok/+", 1),
    )
    raw.send(Subscribe(1, requests))
    suback = raw.expect(Suback)
    assert suback.reason_codes == (2, ReasonCode.TOPIC_FILTER_INVALID, 1)
