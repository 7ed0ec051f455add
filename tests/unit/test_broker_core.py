"""Pure tests of the core broker: Broker and Session with a recording sink, MqttConnection driven with bytes
and a fake transport, and the EmbeddedBroker gateway interface on a FakeClock. No sockets, no sleeps: time is
a ``now`` float (or a FakeClock) that the test moves."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest

from core import __version__
from core.broker.broker import Broker
from core.broker.embedded import EmbeddedBroker
from core.broker.metrics import BrokerMetrics, protocol_slot
from core.broker.session import NEVER_EXPIRES, Session
from core.broker.types import ClientInfo, Credentials, Message, Subscription, Will
from core.clock import FakeClock
from core.config import BrokerConfig
from core.mqtt.codec import (
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    StreamDecoder,
    WillSpec,
    encode,
)
from core.mqtt.connection import CONNECT_TIMEOUT, MqttConnection
from core.mqtt.numbers import ReasonCode

# --- fakes


class Delivery(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    packet_id: int
    dup: bool
    retain: bool
    sub_ids: tuple[int, ...]


@dataclass
class FakeSink:
    """A DeliverySink that records every call."""

    delivered: list[Delivery] = field(default_factory=list)
    pubrels: list[int] = field(default_factory=list)
    kicks: list[int] = field(default_factory=list)

    def deliver(
        self, message: Message, qos: int, packet_id: int, dup: bool, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        self.delivered.append(Delivery(message.topic, message.payload, qos, packet_id, dup, retain, sub_ids))

    def deliver_pubrel(self, packet_id: int) -> None:
        self.pubrels.append(packet_id)

    def kick(self, reason_code: int) -> None:
        self.kicks.append(reason_code)

    @property
    def topics(self) -> list[str]:
        return [d.topic for d in self.delivered]

    @property
    def payloads(self) -> list[bytes]:
        return [d.payload for d in self.delivered]


@dataclass
class FakeTransport:
    """The Transport of an MqttConnection: bytes written, closed or not."""

    written: bytearray = field(default_factory=bytearray)
    closed: bool = False
    congested: bool = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def packets(self, version: int = 5) -> list[Packet]:
        decoder = StreamDecoder(version=version)
        packets = decoder.feed(bytes(self.written))
        assert decoder.error is None
        self.written.clear()
        return packets


def make_broker(seed: int = 7, started_at: float = 0.0, **config: Any) -> Broker:
    return Broker(BrokerConfig(**config), rng=random.Random(seed), started_at=started_at)


def connect(
    broker: Broker,
    client_id: str,
    *,
    clean_start: bool = True,
    expiry: int = 0,
    will: Will | None = None,
    max_inflight: int = 32,
    now: float = 0.0,
    sink: FakeSink | None = None,
    protocol: str = "mqtt",
) -> tuple[Session, FakeSink]:
    sink = sink or FakeSink()
    session, _ = broker.open_session(
        ClientInfo(client_id, protocol),
        clean_start=clean_start,
        expiry=expiry,
        will=will,
        sink=sink,
        max_inflight=max_inflight,
        now=now,
    )
    return session, sink


def subscribe(
    broker: Broker, session: Session, topic_filter: str, qos: int = 0, now: float = 0.0, **opts: Any
) -> int:
    sub = Subscription(topic_filter, qos, **opts)
    code, retained = broker.subscribe(session, sub, now)
    for message in retained:
        session.deliver_retained(message, sub)
    return code


def publish(
    broker: Broker,
    topic: str,
    payload: bytes = b"x",
    qos: int = 0,
    *,
    retain: bool = False,
    sender: str = "pub",
    now: float = 0.0,
    expires_at: float | None = None,
) -> int:
    return broker.publish(Message(topic, payload, qos, retain, sender, expires_at=expires_at), now)


# --- routing


def test_routing_matches_wildcards_and_leading_wildcards_skip_dollar_topics() -> None:
    broker = make_broker()
    filters = ["a/b/c", "a/+/c", "a/#", "#", "+/b/+", "a/b", "+", "$SYS/#", "$SYS/+/x", "b/#"]
    sinks = {}
    for f in filters:
        session, sinks[f] = connect(broker, f"c-{f}")
        assert subscribe(broker, session, f) == 0
    publish(broker, "a/b/c")
    publish(broker, "$SYS/y/x")
    publish(broker, "a")
    got = {f: s.topics for f, s in sinks.items()}
    assert got == {
        "a/b/c": ["a/b/c"],
        "a/+/c": ["a/b/c"],
        "a/#": ["a/b/c", "a"],  # '#' matches the parent level too
        "#": ["a/b/c", "a"],  # never the $SYS topic
        "+/b/+": ["a/b/c"],
        "a/b": [],
        "+": ["a"],
        "$SYS/#": ["$SYS/y/x"],
        "$SYS/+/x": ["$SYS/y/x"],
        "b/#": [],
    }


def test_publish_without_subscribers_is_counted_as_dropped() -> None:
    broker = make_broker()
    assert publish(broker, "nobody/here") == 0
    assert broker.metrics.dropped_no_subscribers == 1


def test_no_local_skips_the_senders_own_messages_only() -> None:
    broker = make_broker()
    session, sink = connect(broker, "me")
    subscribe(broker, session, "t", no_local=True)
    publish(broker, "t", b"mine", sender="me")
    publish(broker, "t", b"theirs", sender="other")
    assert sink.payloads == [b"theirs"]


@pytest.mark.parametrize(
    ("sub_qos", "msg_qos", "granted"), [(1, 2, 1), (2, 1, 1), (0, 2, 0), (2, 0, 0), (2, 2, 2)]
)
def test_delivery_qos_is_the_minimum_of_message_and_subscription(
    sub_qos: int, msg_qos: int, granted: int
) -> None:
    broker = make_broker()
    session, sink = connect(broker, "s")
    subscribe(broker, session, "t", sub_qos)
    publish(broker, "t", qos=msg_qos)
    (delivery,) = sink.delivered
    assert delivery.qos == granted
    assert (delivery.packet_id != 0) == (granted > 0)


def test_subscription_identifier_travels_with_the_delivery() -> None:
    broker = make_broker()
    session, sink = connect(broker, "s")
    subscribe(broker, session, "t/#", subscription_id=42)
    publish(broker, "t/1")
    assert sink.delivered[0].sub_ids == (42,)


def test_unsubscribe_stops_delivery_and_reports_a_missing_subscription() -> None:
    broker = make_broker()
    session, sink = connect(broker, "s")
    subscribe(broker, session, "t")
    assert broker.unsubscribe(session, "t") is True
    assert broker.unsubscribe(session, "t") is False
    publish(broker, "t")
    assert sink.delivered == []


def test_invalid_filters_are_refused_with_reason_codes() -> None:
    broker = make_broker(wildcard_subscription=False, shared_subscription=False)
    session, _ = connect(broker, "s")
    assert subscribe(broker, session, "a/#/b") == ReasonCode.TOPIC_FILTER_INVALID
    assert subscribe(broker, session, "a/b+") == ReasonCode.TOPIC_FILTER_INVALID
    assert subscribe(broker, session, "") == ReasonCode.TOPIC_FILTER_INVALID
    assert subscribe(broker, session, "$share/g") == ReasonCode.TOPIC_FILTER_INVALID
    assert subscribe(broker, session, "a/+") == ReasonCode.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED
    assert subscribe(broker, session, "$share/g/t") == ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
    assert session.subscriptions == {}


# --- retained messages


def test_retained_message_is_stored_sent_to_new_subscribers_and_deleted_by_empty_payload() -> None:
    broker = make_broker()
    publish(broker, "home/temp", b"21", retain=True)
    publish(broker, "home/temp", b"22", retain=True)  # replaces
    session, sink = connect(broker, "s")
    subscribe(broker, session, "home/+", 1)
    assert sink.delivered == [Delivery("home/temp", b"22", 0, 0, False, True, ())]
    publish(broker, "home/temp", b"", retain=True)
    assert len(broker.retained) == 0
    session2, sink2 = connect(broker, "s2")
    subscribe(broker, session2, "home/#")
    assert sink2.delivered == []


def test_retained_live_delivery_clears_retain_unless_retain_as_published() -> None:
    broker = make_broker()
    s1, plain = connect(broker, "plain")
    s2, rap = connect(broker, "rap")
    subscribe(broker, s1, "t")
    subscribe(broker, s2, "t", retain_as_published=True)
    publish(broker, "t", b"v", retain=True)
    assert plain.delivered[0].retain is False
    assert rap.delivered[0].retain is True


def test_retained_hash_matches_parent_level_but_not_dollar_topics() -> None:
    broker = make_broker()
    for topic in ("a", "a/b", "a/b/c", "$SYS/uptime", "$other/a"):
        publish(broker, topic, topic.encode(), retain=True)
    assert sorted(m.topic for m in broker.retained.match("a/#", 0.0)) == ["a", "a/b", "a/b/c"]
    assert sorted(m.topic for m in broker.retained.match("#", 0.0)) == ["a", "a/b", "a/b/c"]
    assert [m.topic for m in broker.retained.match("+/a", 0.0)] == []
    assert [m.topic for m in broker.retained.match("$SYS/#", 0.0)] == ["$SYS/uptime"]
    assert [m.topic for m in broker.retained.match("$other/+", 0.0)] == ["$other/a"]


@pytest.mark.parametrize("retain_handling", [0, 1, 2])
def test_retain_handling_decides_whether_retained_messages_follow_a_subscribe(retain_handling: int) -> None:
    broker = make_broker()
    publish(broker, "t", b"r", retain=True)
    session, sink = connect(broker, "s")
    subscribe(broker, session, "t", retain_handling=retain_handling)
    subscribe(broker, session, "t", retain_handling=retain_handling)  # the same filter again
    assert len(sink.delivered) == {0: 2, 1: 1, 2: 0}[retain_handling]


def test_retained_store_is_bounded_and_counts_rejections() -> None:
    broker = make_broker(max_retained_messages=2)
    publish(broker, "r/1", b"1", retain=True)
    publish(broker, "r/2", b"2", retain=True)
    publish(broker, "r/3", b"3", retain=True)  # a new topic over the bound: refused
    publish(broker, "r/1", b"1b", retain=True)  # replacing an existing one is fine
    assert broker.metrics.retained_rejected_full == 1
    assert sorted((m.topic, m.payload) for m in broker.retained.all()) == [("r/1", b"1b"), ("r/2", b"2")]
    publish(broker, "r/2", b"", retain=True)
    publish(broker, "r/3", b"3", retain=True)  # room again after a delete
    assert broker.retained.get("r/3") is not None


def test_expired_retained_message_is_not_delivered() -> None:
    broker = make_broker()
    publish(broker, "t", b"old", retain=True, expires_at=10.0)
    session, sink = connect(broker, "s", now=11.0)
    subscribe(broker, session, "t", now=11.0)
    assert sink.delivered == []
    assert len(broker.retained) == 0


# --- sessions: queue, window, acknowledgements


def offline_session(broker: Broker, client_id: str, topic_filter: str, qos: int = 1, **kw: Any) -> Session:
    """A persistent session subscribed to ``topic_filter`` whose connection is gone."""
    session, _ = connect(broker, client_id, expiry=NEVER_EXPIRES, **kw)
    subscribe(broker, session, topic_filter, qos)
    broker.connection_lost(session, publish_will=True, now=0.0)
    assert session.sink is None
    return session


def test_offline_queue_is_bounded_drop_oldest_and_counted() -> None:
    broker = make_broker(max_mqueue_len=3)
    offline_session(broker, "away", "t")
    for i in range(5):
        publish(broker, "t", str(i).encode(), 1, now=1.0)
    assert broker.metrics.dropped_queue_full == 2
    _, sink = connect(broker, "away", clean_start=False, expiry=NEVER_EXPIRES, now=2.0)
    assert sink.payloads == [b"2", b"3", b"4"]
    assert [d.dup for d in sink.delivered] == [False] * 3


def test_qos0_is_dropped_while_offline_when_mqueue_store_qos0_is_false() -> None:
    broker = make_broker(mqueue_store_qos0=False)
    session = offline_session(broker, "away", "t")
    publish(broker, "t", b"q0", 0)
    publish(broker, "t", b"q1", 1)
    assert broker.metrics.dropped_qos0_offline == 1
    assert [item.message.payload for item in session.queue] == [b"q1"]


def test_qos0_is_queued_while_offline_by_default() -> None:
    broker = make_broker()
    session = offline_session(broker, "away", "t")
    publish(broker, "t", b"q0", 0)
    assert [item.message.payload for item in session.queue] == [b"q0"]
    assert broker.metrics.dropped_qos0_offline == 0


def test_inflight_window_holds_further_deliveries_until_puback() -> None:
    broker = make_broker()
    session, sink = connect(broker, "s", max_inflight=2)
    subscribe(broker, session, "t", 1)
    for i in range(4):
        publish(broker, "t", str(i).encode(), 1)
    assert sink.payloads == [b"0", b"1"]
    assert len(session.queue) == 2
    assert session.puback(sink.delivered[0].packet_id, 1.0) is True
    assert sink.payloads == [b"0", b"1", b"2"]
    assert session.puback(sink.delivered[0].packet_id, 1.0) is False  # already acknowledged
    assert session.puback(sink.delivered[1].packet_id, 1.0) is True
    assert sink.payloads == [b"0", b"1", b"2", b"3"]
    assert len({d.packet_id for d in sink.delivered}) == 4


def test_qos0_passes_a_full_inflight_window() -> None:
    broker = make_broker()
    session, sink = connect(broker, "s", max_inflight=1)
    subscribe(broker, session, "t", 1)
    publish(broker, "t", b"a", 1)
    publish(broker, "t", b"b", 0)
    assert sink.payloads == [b"a", b"b"]


def test_qos2_delivery_needs_pubrec_then_pubcomp_to_free_the_window() -> None:
    broker = make_broker()
    session, sink = connect(broker, "s", max_inflight=1)
    subscribe(broker, session, "t", 2)
    publish(broker, "t", b"a", 2)
    publish(broker, "t", b"b", 2)
    pid = sink.delivered[0].packet_id
    assert session.puback(pid, 0.0) is False  # wrong acknowledgement for QoS 2
    assert session.pubcomp(pid, 0.0) is False  # PUBCOMP before PUBREC
    assert session.pubrec(pid) is True
    assert sink.payloads == [b"a"]  # still in flight until PUBCOMP
    assert session.pubcomp(pid, 0.0) is True
    assert sink.payloads == [b"a", b"b"]
    assert session.pubrec(999) is False


def test_refused_delivery_frees_the_window() -> None:
    broker = make_broker()
    session, sink = connect(broker, "s", max_inflight=1)
    subscribe(broker, session, "t", 1)
    publish(broker, "t", b"a", 1)
    publish(broker, "t", b"b", 1)
    session.drop_failed(sink.delivered[0].packet_id, 0.0)
    assert sink.payloads == [b"a", b"b"]


def test_reconnect_resends_unacknowledged_deliveries_with_dup_and_pubrel_for_released_ones() -> None:
    broker = make_broker()
    session, sink = connect(broker, "s", expiry=NEVER_EXPIRES)
    subscribe(broker, session, "t", 2)
    publish(broker, "t", b"one", 1)
    publish(broker, "t", b"two", 2)
    publish(broker, "t", b"three", 2)
    first, second, third = sink.delivered
    assert session.pubrec(third.packet_id)
    broker.connection_lost(session, publish_will=True, now=1.0)
    publish(broker, "t", b"four", 1, now=2.0)  # queued while away
    session2, sink2 = connect(broker, "s", clean_start=False, expiry=NEVER_EXPIRES, now=3.0)
    assert session2 is session
    assert sink2.delivered[:2] == [
        Delivery("t", b"one", 1, first.packet_id, True, False, ()),
        Delivery("t", b"two", 2, second.packet_id, True, False, ()),
    ]
    assert sink2.pubrels == [third.packet_id]
    assert sink2.delivered[2].payload == b"four"
    assert sink2.delivered[2].dup is False
    assert sink2.delivered[2].packet_id not in {first.packet_id, second.packet_id, third.packet_id}


def test_clean_start_discards_the_previous_session() -> None:
    broker = make_broker()
    offline_session(broker, "s", "t")
    publish(broker, "t", b"queued", 1)
    session, sink = connect(broker, "s", clean_start=True)
    assert sink.delivered == []
    assert session.subscriptions == {}
    assert publish(broker, "t") == 0


def test_message_expiry_drops_expired_queued_messages() -> None:
    broker = make_broker()
    offline_session(broker, "away", "t")
    publish(broker, "t", b"short", 1, now=1.0, expires_at=5.0)
    publish(broker, "t", b"long", 1, now=1.0, expires_at=50.0)
    publish(broker, "t", b"forever", 1, now=1.0)
    _, sink = connect(broker, "away", clean_start=False, expiry=NEVER_EXPIRES, now=10.0)
    assert sink.payloads == [b"long", b"forever"]
    assert broker.metrics.dropped_expired == 1


# --- wills and session expiry


def test_will_is_published_at_once_without_delay_on_abnormal_loss() -> None:
    broker = make_broker()
    watcher, wsink = connect(broker, "watcher")
    subscribe(broker, watcher, "wills/#")
    session, _ = connect(broker, "dev", will=Will("wills/dev", b"gone", 1))
    broker.connection_lost(session, publish_will=True, now=5.0)
    assert wsink.payloads == [b"gone"]
    assert broker.metrics.wills_published == 1


def test_no_will_after_a_normal_disconnect() -> None:
    broker = make_broker()
    watcher, wsink = connect(broker, "watcher")
    subscribe(broker, watcher, "wills/#")
    session, _ = connect(broker, "dev", expiry=60, will=Will("wills/dev", b"gone", delay=5))
    broker.connection_lost(session, publish_will=False, now=0.0)
    broker.handle_timeouts(100.0)
    assert wsink.delivered == []


def test_will_delay_is_published_by_handle_timeouts_at_the_deadline_and_not_before() -> None:
    broker = make_broker()
    watcher, wsink = connect(broker, "watcher")
    subscribe(broker, watcher, "wills/#")
    session, _ = connect(broker, "dev", expiry=3600, will=Will("wills/dev", b"gone", 0, delay=10), now=0.0)
    broker.connection_lost(session, publish_will=True, now=100.0)
    assert wsink.delivered == []
    broker.handle_timeouts(109.9)
    assert wsink.delivered == []
    broker.handle_timeouts(110.0)
    assert wsink.payloads == [b"gone"]
    broker.handle_timeouts(200.0)
    assert wsink.payloads == [b"gone"]  # once
    assert "dev" in broker.sessions  # the session outlives its will


def test_will_delay_is_capped_by_the_session_expiry() -> None:
    broker = make_broker()
    watcher, wsink = connect(broker, "watcher")
    subscribe(broker, watcher, "wills/#")
    session, _ = connect(broker, "dev", expiry=5, will=Will("wills/dev", b"gone", delay=60))
    broker.connection_lost(session, publish_will=True, now=0.0)
    broker.handle_timeouts(4.9)
    assert wsink.delivered == []
    broker.handle_timeouts(5.0)
    assert wsink.payloads == [b"gone"]
    assert "dev" not in broker.sessions


def test_reconnect_within_the_will_delay_cancels_the_will() -> None:
    broker = make_broker()
    watcher, wsink = connect(broker, "watcher")
    subscribe(broker, watcher, "wills/#")
    session, _ = connect(broker, "dev", expiry=3600, will=Will("wills/dev", b"gone", delay=10))
    broker.connection_lost(session, publish_will=True, now=0.0)
    connect(broker, "dev", clean_start=False, expiry=3600, now=5.0)
    broker.handle_timeouts(10.0)
    broker.handle_timeouts(1000.0)
    assert wsink.delivered == []


def test_session_expiry_is_ended_by_handle_timeouts() -> None:
    broker = make_broker()
    session, _ = connect(broker, "dev", expiry=30)
    subscribe(broker, session, "t", 1)
    broker.connection_lost(session, publish_will=True, now=100.0)
    broker.handle_timeouts(129.9)
    assert "dev" in broker.sessions
    assert publish(broker, "t", qos=1, now=129.9) == 1  # queued for the absent client
    broker.handle_timeouts(130.0)
    assert "dev" not in broker.sessions
    assert publish(broker, "t", now=130.0) == 0
    _, sink = connect(broker, "dev", clean_start=False, expiry=30, now=131.0)
    assert sink.delivered == []


def test_session_with_zero_expiry_ends_with_its_connection() -> None:
    broker = make_broker()
    session, _ = connect(broker, "dev", expiry=0)
    subscribe(broker, session, "t")
    broker.connection_lost(session, publish_will=True, now=0.0)
    assert "dev" not in broker.sessions
    assert publish(broker, "t") == 0


def test_takeover_kicks_the_old_connection_with_0x8e_and_keeps_the_session() -> None:
    broker = make_broker()
    watcher, wsink = connect(broker, "watcher")
    subscribe(broker, watcher, "wills/#")
    old, old_sink = connect(broker, "dev", expiry=60, will=Will("wills/dev", b"gone"))
    subscribe(broker, old, "t", 1)
    new_sink = FakeSink()
    session, present = broker.open_session(
        ClientInfo("dev"), clean_start=False, expiry=60, will=None, sink=new_sink, max_inflight=32, now=1.0
    )
    assert old_sink.kicks == [ReasonCode.SESSION_TAKEN_OVER]
    assert present is True
    assert session is old
    assert broker.metrics.sessions_taken_over == 1
    assert wsink.payloads == [b"gone"]  # the old connection's will (no delay) is published
    publish(broker, "t", b"after", 1)
    assert new_sink.payloads == [b"after"]
    assert old_sink.delivered == []


def test_takeover_within_will_delay_publishes_no_will() -> None:
    broker = make_broker()
    watcher, wsink = connect(broker, "watcher")
    subscribe(broker, watcher, "wills/#")
    connect(broker, "dev", expiry=60, will=Will("wills/dev", b"gone", delay=5))
    connect(broker, "dev", clean_start=False, expiry=60, now=1.0)
    broker.handle_timeouts(100.0)
    assert wsink.delivered == []


def test_discard_session_kicks_with_administrative_action() -> None:
    broker = make_broker()
    _, sink = connect(broker, "dev", expiry=60)
    assert broker.discard_session("dev", 0.0) is True
    assert sink.kicks == [ReasonCode.ADMINISTRATIVE_ACTION]
    assert "dev" not in broker.sessions
    assert broker.discard_session("dev", 0.0) is False


def test_shutdown_publishes_wills_still_waiting_for_their_delay() -> None:
    broker = make_broker()
    watcher, wsink = connect(broker, "watcher")
    subscribe(broker, watcher, "wills/#")
    session, _ = connect(broker, "dev", expiry=3600, will=Will("wills/dev", b"gone", delay=600))
    broker.connection_lost(session, publish_will=True, now=0.0)
    broker.shutdown(1.0)
    assert wsink.payloads == [b"gone"]


# --- shared subscriptions


def shared_receivers(
    strategy: str,
    seed: int,
    messages: list[tuple[str, str]],
    members: int = 3,
    group_filter: str = "$share/g/t/#",
) -> list[str]:
    """Who of ``members`` group members receives each (topic, sender) message, in order."""
    broker = make_broker(seed=seed, shared_subscription_strategy=strategy)
    sinks: dict[str, FakeSink] = {}
    for i in range(members):
        session, sinks[f"m{i}"] = connect(broker, f"m{i}", max_inflight=65535)
        assert subscribe(broker, session, group_filter, 1) == 1
    receivers = []
    for topic, sender in messages:
        before = {name: len(s.delivered) for name, s in sinks.items()}
        assert publish(broker, topic, b"p", 1, sender=sender) == 1
        got = [name for name, s in sinks.items() if len(s.delivered) == before[name] + 1]
        assert len(got) == 1, "a shared message goes to exactly one member"
        receivers.append(got[0])
    return receivers


ONE_TOPIC = [("t/a", "pub")] * 12


@pytest.mark.parametrize("strategy", ["random", "round_robin", "sticky", "hash_clientid", "hash_topic"])
def test_shared_strategies_are_deterministic_with_a_seeded_rng(strategy: str) -> None:
    assert shared_receivers(strategy, 3, ONE_TOPIC) == shared_receivers(strategy, 3, ONE_TOPIC)


def test_shared_random_spreads_over_members() -> None:
    assert len(set(shared_receivers("random", 1, ONE_TOPIC * 3))) == 3


def test_shared_round_robin_rotates_through_members_from_a_random_start() -> None:
    starts = set()
    for seed in range(8):
        receivers = shared_receivers("round_robin", seed, ONE_TOPIC)
        assert len(set(receivers[:3])) == 3
        assert all(receivers[i] == receivers[i + 3] for i in range(len(receivers) - 3))
        starts.add(receivers[0])
    assert len(starts) > 1


def test_shared_sticky_keeps_one_member_until_it_leaves() -> None:
    broker = make_broker(seed=5, shared_subscription_strategy="sticky")
    sessions: dict[str, tuple[Session, FakeSink]] = {}
    for name in ("m0", "m1", "m2"):
        sessions[name] = connect(broker, name)
        subscribe(broker, sessions[name][0], "$queue/t", 0)
    for _ in range(6):
        publish(broker, "t")
    (first,) = [name for name, (_, sink) in sessions.items() if sink.delivered]
    assert len(sessions[first][1].delivered) == 6
    broker.connection_lost(sessions[first][0], publish_will=True, now=1.0)
    for _ in range(6):
        publish(broker, "t")
    counts = {name: len(sink.delivered) for name, (_, sink) in sessions.items() if name != first}
    assert sorted(counts.values()) == [0, 6]


def test_shared_hash_clientid_sends_each_publishers_messages_to_one_member() -> None:
    messages = [("t/a", f"pub{i % 6}") for i in range(60)]
    receivers = shared_receivers("hash_clientid", 1, messages)
    by_sender: dict[str, set[str]] = {}
    for (_, sender), receiver in zip(messages, receivers, strict=True):
        by_sender.setdefault(sender, set()).add(receiver)
    assert all(len(r) == 1 for r in by_sender.values())
    assert len(set(receivers)) > 1


def test_shared_hash_topic_sends_each_topic_to_one_member_and_spreads_topics() -> None:
    messages = [(f"t/{i % 10}", "pub") for i in range(60)]
    receivers = shared_receivers("hash_topic", 1, messages)
    by_topic: dict[str, set[str]] = {}
    for (topic, _), receiver in zip(messages, receivers, strict=True):
        by_topic.setdefault(topic, set()).add(receiver)
    assert all(len(r) == 1 for r in by_topic.values())
    assert len(set(receivers)) > 1


def test_shared_and_ordinary_subscriptions_both_receive() -> None:
    broker = make_broker()
    plain, plain_sink = connect(broker, "plain")
    subscribe(broker, plain, "t")
    members = [connect(broker, f"m{i}") for i in range(2)]
    for session, _ in members:
        subscribe(broker, session, "$share/g/t")
    other, other_sink = connect(broker, "other-group")
    subscribe(broker, other, "$share/h/t")
    assert publish(broker, "t") == 3
    assert plain_sink.payloads == [b"x"]
    assert other_sink.payloads == [b"x"]
    assert sum(len(sink.delivered) for _, sink in members) == 1


def test_shared_subscription_does_not_get_retained_messages() -> None:
    broker = make_broker()
    publish(broker, "t", b"r", retain=True)
    session, sink = connect(broker, "m")
    subscribe(broker, session, "$share/g/t")
    assert sink.delivered == []


def test_unacked_shared_message_is_redispatched_when_its_member_is_lost() -> None:
    broker = make_broker(seed=2, shared_subscription_strategy="sticky")
    members = {name: connect(broker, name) for name in ("m0", "m1")}
    for session, _ in members.values():
        subscribe(broker, session, "$share/g/t", 1)
    publish(broker, "t", b"important", 1)
    (holder,) = [name for name, (_, sink) in members.items() if sink.delivered]
    (other,) = [name for name in members if name != holder]
    broker.connection_lost(members[holder][0], publish_will=True, now=1.0)
    assert members[other][1].payloads == [b"important"]
    assert members[other][1].delivered[0].qos == 1


def test_acknowledged_shared_message_is_not_redispatched() -> None:
    broker = make_broker(seed=2, shared_subscription_strategy="sticky")
    members = {name: connect(broker, name) for name in ("m0", "m1")}
    for session, _ in members.values():
        subscribe(broker, session, "$share/g/t", 1)
    publish(broker, "t", b"done", 1)
    (holder,) = [name for name, (_, sink) in members.items() if sink.delivered]
    session, sink = members[holder]
    assert session.puback(sink.delivered[0].packet_id, 0.0)
    broker.connection_lost(session, publish_will=True, now=1.0)
    assert sum(len(s.delivered) for _, s in members.values()) == 1


# --- $SYS


def test_publish_sys_publishes_retained_broker_figures() -> None:
    broker = make_broker(started_at=100.0)
    sys_sub, sys_sink = connect(broker, "sys")
    subscribe(broker, sys_sub, "$SYS/#")
    all_sub, all_sink = connect(broker, "all")
    subscribe(broker, all_sub, "#")
    publish(broker, "x/y", b"12345")
    broker.publish_sys(160.0)
    base = f"$SYS/brokers/{broker.node_name}/"
    values = {d.topic.removeprefix(base): d.payload.decode() for d in sys_sink.delivered}
    assert values["version"] == f"mqgate {__version__}"
    assert values["uptime"] == "60"
    assert values["clients/connected"] == "2"
    assert values["clients/total"] == "2"
    assert values["subscriptions/count"] == "2"
    for name in ("messages/received", "messages/sent", "bytes/received", "bytes/sent", "messages/dropped"):
        assert values[name].isdigit()
    assert all_sink.topics == ["x/y"]  # '#' does not match $SYS topics
    assert broker.retained.get(base + "uptime") is not None


def test_publish_sys_mirrors_message_totals_per_protocol_and_is_not_counted_itself() -> None:
    broker = make_broker()
    connect(broker, "sensor", protocol="coap")
    app, _ = connect(broker, "app")
    subscribe(broker, app, "up/#", 1)
    publish(broker, "up/1", b"abc", 1, sender="sensor")
    publish(broker, "up/2", b"d", 0, sender="sensor")
    published, dropped = broker.metrics.messages_published, broker.metrics.dropped_no_subscribers
    sys_sub, sys_sink = connect(broker, "sys")
    subscribe(broker, sys_sub, "$SYS/#")
    broker.publish_sys(1.0)
    base = f"$SYS/brokers/{broker.node_name}/"
    values = {d.topic.removeprefix(base): d.payload.decode() for d in sys_sink.delivered}
    assert values["messages/received/coap"] == "2" and values["messages/received/mqtt"] == "0"
    assert values["messages/sent/mqtt"] == "2" and values["messages/received"] == "2"
    assert values["messages/redelivered/mqttsn"] == "0"
    assert "messages/received/bridge" not in values  # other protocols only once they have traffic
    assert (broker.metrics.messages_published, broker.metrics.dropped_no_subscribers) == (published, dropped)


# --- per-protocol, per-QoS counters


def test_messages_and_payload_bytes_are_counted_by_the_sender_protocol_and_qos() -> None:
    broker = make_broker()
    connect(broker, "sn", protocol="mqttsn")
    connect(broker, "dev", protocol="lwm2m")
    reader, _ = connect(broker, "reader")
    subscribe(broker, reader, "#", 2)
    publish(broker, "a", b"12345", 2, sender="sn")
    publish(broker, "a", b"12", 2, sender="sn")
    publish(broker, "b", b"1", 0, sender="dev")
    publish(broker, "c", b"api", 1, sender="")  # mqgate's own (the HTTP API): routed, not received
    m = broker.metrics
    sn, lwm2m, mqtt = protocol_slot("mqttsn"), protocol_slot("lwm2m"), protocol_slot("mqtt")
    assert (m.received[sn + 2], m.received_bytes[sn + 2]) == (2, 7)
    assert (m.received[lwm2m], m.received_bytes[lwm2m]) == (1, 1)
    assert m.messages_received == 3 and m.messages_published == 4
    assert [m.sent[mqtt + q] for q in range(3)] == [1, 1, 2]
    assert [m.sent_bytes[mqtt + q] for q in range(3)] == [1, 3, 7]


def test_deliveries_count_at_the_granted_qos_when_sent_not_when_queued() -> None:
    broker = make_broker()
    device, sink = connect(broker, "dev", protocol="mqttsn", max_inflight=1)
    subscribe(broker, device, "t", 1)
    for payload in (b"one", b"two"):
        publish(broker, "t", payload, 2)
    slot = protocol_slot("mqttsn")
    assert (broker.metrics.sent[slot + 1], broker.metrics.sent[slot + 2]) == (1, 0)  # the second waits
    assert device.puback(sink.delivered[0].packet_id, 0.0)
    assert (broker.metrics.sent[slot + 1], broker.metrics.sent_bytes[slot + 1]) == (2, 6)


def test_a_resent_delivery_counts_as_redelivered_not_sent() -> None:
    broker = make_broker()
    session, _ = connect(broker, "c", clean_start=False, expiry=60)
    subscribe(broker, session, "t", 1)
    publish(broker, "t", b"x", 1)
    broker.connection_lost(session, publish_will=False, now=1.0)
    _, sink = connect(broker, "c", clean_start=False, expiry=60, now=2.0)
    assert sink.delivered[0].dup
    slot = protocol_slot("mqtt")
    assert (broker.metrics.sent[slot + 1], broker.metrics.redelivered[slot + 1]) == (1, 1)


def test_a_will_is_published_but_not_counted_as_received() -> None:
    broker = make_broker()
    session, _ = connect(broker, "c", will=Will("w", b"gone"))
    broker.connection_lost(session, publish_will=True, now=1.0)
    m = broker.metrics
    assert (m.wills_published, m.messages_published, m.messages_received) == (1, 1, 0)
    assert m.dropped_no_subscribers == 1


def test_a_session_counts_under_the_protocol_of_its_latest_connection() -> None:
    broker = make_broker()
    session, _ = connect(broker, "c", clean_start=False, expiry=60, protocol="mqttsn")
    broker.connection_lost(session, publish_will=False, now=1.0)
    connect(broker, "c", clean_start=False, expiry=60, protocol="coap")
    publish(broker, "t", b"x", 0, sender="c")
    assert broker.metrics.received[protocol_slot("coap")] == 1
    assert broker.metrics.received[protocol_slot("mqttsn")] == 0


def test_unknown_protocols_count_as_other_and_are_reported_once_they_have_traffic() -> None:
    assert protocol_slot("zigbee") == protocol_slot("other") != protocol_slot("mqtt")
    metrics = BrokerMetrics()
    assert [name for name, _ in metrics.reported_protocols()] == ["mqtt", "mqttsn", "coap", "lwm2m"]
    metrics.sent[protocol_slot("bridge") + 1] += 3
    assert metrics.by_protocol(metrics.sent) == {"mqtt": 0, "mqttsn": 0, "coap": 0, "lwm2m": 0, "bridge": 3}


def test_metrics_add_sums_counters_and_tables() -> None:
    edge, embedded = BrokerMetrics(), BrokerMetrics()
    edge.received[protocol_slot("mqttsn") + 1] = 2
    embedded.received[protocol_slot("mqttsn") + 1] = 3
    embedded.dropped_queue_full = 4
    total = edge.add(embedded)
    assert total.received[protocol_slot("mqttsn") + 1] == 5 and total.dropped_queue_full == 4
    assert edge.messages_received == 2  # the operands are unchanged


# --- MqttConnection driven with bytes


def mqtt_connection(broker: Broker, now: float = 0.0) -> tuple[MqttConnection, FakeTransport]:
    transport = FakeTransport()
    return MqttConnection(broker, transport, "127.0.0.1:50000", now), transport


def test_keepalive_closes_at_one_and_a_half_times_with_0x8d_and_publishes_the_will() -> None:
    broker = make_broker()
    watcher, wsink = connect(broker, "watcher")
    subscribe(broker, watcher, "wills/#")
    conn, transport = mqtt_connection(broker, now=0.0)
    will = WillSpec("wills/dev", b"lost", 1)
    conn.data_received(encode(Connect("dev", 5, keepalive=10, will=will), 5), 0.0)
    (connack,) = transport.packets()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    assert conn.check_keepalive(0.0) == 15.0
    conn.data_received(encode(Pingreq(), 5), 4.0)
    assert transport.packets() == [Pingresp()]
    assert conn.check_keepalive(10.0) == 19.0  # last_seen + 1.5 * keepalive
    assert conn.check_keepalive(18.99) == 19.0
    assert not transport.closed
    assert wsink.delivered == []
    assert conn.check_keepalive(19.0) is None
    assert transport.closed
    (disconnect,) = transport.packets()
    assert isinstance(disconnect, Disconnect)
    assert disconnect.reason_code == ReasonCode.KEEP_ALIVE_TIMEOUT
    assert wsink.payloads == [b"lost"]
    assert broker.metrics.keepalive_timeouts == 1
    assert "dev" not in broker.sessions


def test_keepalive_zero_never_times_out() -> None:
    broker = make_broker()
    conn, transport = mqtt_connection(broker)
    conn.data_received(encode(Connect("dev", 4, keepalive=0)), 0.0)
    assert conn.check_keepalive(1e9) is None
    assert not transport.closed


def test_v3_keepalive_timeout_closes_without_disconnect() -> None:
    broker = make_broker()
    conn, transport = mqtt_connection(broker)
    conn.data_received(encode(Connect("dev", 4, keepalive=2)), 0.0)
    transport.packets(4)
    assert conn.check_keepalive(3.0) is None
    assert transport.closed
    assert transport.written == b""


def test_connection_without_connect_is_closed_after_the_connect_timeout() -> None:
    broker = make_broker()
    conn, transport = mqtt_connection(broker, now=50.0)
    assert conn.check_keepalive(50.0) == 50.0 + CONNECT_TIMEOUT
    assert conn.check_keepalive(50.0 + CONNECT_TIMEOUT - 0.1) == 50.0 + CONNECT_TIMEOUT
    assert not transport.closed
    assert conn.check_keepalive(50.0 + CONNECT_TIMEOUT) is None
    assert transport.closed
    assert transport.written == b""


def test_v5_connack_carries_the_server_limits_and_assigned_client_id() -> None:
    broker = make_broker(
        server_keepalive=20,
        max_session_expiry=100,
        max_awaiting_rel=50,
        max_topic_alias=10,
        max_packet_size=4096,
        retain_available=False,
        shared_subscription=False,
    )
    conn, transport = mqtt_connection(broker)
    props = Properties(session_expiry_interval=1000)
    conn.data_received(encode(Connect("", 5, keepalive=60, properties=props), 5), 0.0)
    (connack,) = transport.packets()
    assert isinstance(connack, Connack)
    assert connack.reason_code == 0
    p = connack.properties
    assert p.assigned_client_identifier is not None and p.assigned_client_identifier.startswith("mqgate-")
    assert conn.client_id == p.assigned_client_identifier
    assert p.server_keep_alive == 20
    assert p.session_expiry_interval == 100
    assert p.receive_maximum == 50
    assert p.topic_alias_maximum == 10
    assert p.maximum_packet_size == 4096
    assert p.retain_available == 0
    assert p.shared_subscription_available == 0
    assert p.wildcard_subscription_available is None
    assert conn.keepalive == 20
    assert conn.check_keepalive(0.0) == 30.0


def test_v311_connack_is_four_bytes_and_reports_session_present() -> None:
    broker = make_broker()
    conn, transport = mqtt_connection(broker)
    conn.data_received(encode(Connect("dev", 4, clean_start=False)), 0.0)
    assert bytes(transport.written) == b"\x20\x02\x00\x00"
    conn.data_received(encode(Disconnect()), 1.0)
    assert transport.closed
    conn2, transport2 = mqtt_connection(broker, now=2.0)
    conn2.data_received(encode(Connect("dev", 4, clean_start=False)), 2.0)
    assert bytes(transport2.written) == b"\x20\x02\x01\x00"


# --- EmbeddedBroker (the gateway interface)


def embedded() -> tuple[Broker, EmbeddedBroker, FakeClock]:
    clock = FakeClock()
    broker = make_broker(started_at=clock.now())
    return broker, EmbeddedBroker(broker, clock), clock


def test_embedded_publish_subscribe_and_retained_after_subscribe() -> None:
    async def scenario() -> None:
        broker, eb, _ = embedded()
        assert (await eb.authenticate(ClientInfo("dev"), Credentials("u", b"p"))).allowed
        sink = FakeSink()
        dev = await eb.open_session(
            ClientInfo("sn-1", "mqttsn"), clean_start=True, expiry=0, will=None, sink=sink, max_inflight=1
        )
        assert dev.present is False
        assert dev.publish(Message("sensors/1", b"21.5", 0, True)) == ReasonCode.NO_MATCHING_SUBSCRIBERS
        assert dev.publish(Message("bad/+", b"x")) == ReasonCode.TOPIC_NAME_INVALID
        assert dev.subscribe([Subscription("sensors/+", 1), Subscription("a/#/b")]) == [
            1,
            ReasonCode.TOPIC_FILTER_INVALID,
        ]
        assert sink.delivered == [Delivery("sensors/1", b"21.5", 0, 0, False, True, ())]
        other = FakeSink()
        peer = await eb.open_session(
            ClientInfo("peer"), clean_start=True, expiry=0, will=None, sink=other, max_inflight=32
        )
        assert peer.publish(Message("sensors/2", b"x", 1)) == 0
        assert sink.delivered[-1].topic == "sensors/2"
        assert broker.metrics.messages_received == 2  # the refused one is not counted
        assert dev.unsubscribe(["sensors/+", "nope"]) == [0, ReasonCode.NO_SUBSCRIPTION_EXISTED]

    asyncio.run(scenario())


def test_embedded_ack_opens_the_window_for_the_next_delivery() -> None:
    async def scenario() -> None:
        broker, eb, _ = embedded()
        sink = FakeSink()
        dev = await eb.open_session(
            ClientInfo("dev", "mqttsn"), clean_start=True, expiry=0, will=None, sink=sink, max_inflight=1
        )
        dev.subscribe([Subscription("t", 2)])
        for payload, qos in ((b"a", 1), (b"b", 2), (b"c", 1)):
            broker.publish(Message("t", payload, qos), 0.0)
        assert sink.payloads == [b"a"]
        dev.ack(sink.delivered[0].packet_id)
        assert sink.payloads == [b"a", b"b"]
        dev.received(sink.delivered[1].packet_id)
        dev.ack(sink.delivered[1].packet_id)  # PUBCOMP of the QoS 2 delivery
        assert sink.payloads == [b"a", b"b", b"c"]
        dev.ack(12345)  # unknown: ignored

    asyncio.run(scenario())


def test_embedded_park_queues_deliveries_and_resume_delivers_them() -> None:
    async def scenario() -> None:
        broker, eb, clock = embedded()
        sink = FakeSink()
        dev = await eb.open_session(
            ClientInfo("sleepy", "mqttsn"),
            clean_start=True,
            expiry=3600,
            will=None,
            sink=sink,
            max_inflight=4,
        )
        dev.subscribe([Subscription("cmd/#", 1)])
        dev.park()
        broker.publish(Message("cmd/1", b"on", 1), clock.now())
        broker.publish(Message("cmd/2", b"off", 0), clock.now())
        assert sink.delivered == []
        assert len(dev.session.queue) == 2
        clock.advance(30)
        dev.resume()
        assert sink.payloads == [b"on", b"off"]
        assert dev.session.queue == type(dev.session.queue)()

    asyncio.run(scenario())


@pytest.mark.parametrize("publish_will", [True, False])
def test_embedded_close_publishes_the_will_only_when_asked(publish_will: bool) -> None:
    async def scenario() -> None:
        broker, eb, _ = embedded()
        watcher = FakeSink()
        w = await eb.open_session(
            ClientInfo("watcher"), clean_start=True, expiry=0, will=None, sink=watcher, max_inflight=32
        )
        w.subscribe([Subscription("wills/#")])
        dev = await eb.open_session(
            ClientInfo("dev", "mqttsn"),
            clean_start=True,
            expiry=0,
            will=Will("wills/dev", b"gone"),
            sink=FakeSink(),
            max_inflight=1,
        )
        dev.close(publish_will=publish_will)
        dev.close(publish_will=True)  # idempotent
        assert watcher.payloads == ([b"gone"] if publish_will else [])
        assert "dev" not in broker.sessions

    asyncio.run(scenario())


def test_embedded_session_persists_across_close_with_expiry() -> None:
    async def scenario() -> None:
        broker, eb, clock = embedded()
        dev = await eb.open_session(
            ClientInfo("dev", "mqttsn"),
            clean_start=True,
            expiry=60,
            will=None,
            sink=FakeSink(),
            max_inflight=1,
        )
        dev.subscribe([Subscription("t", 1)])
        dev.close(publish_will=False)
        broker.publish(Message("t", b"while-away", 1), clock.now())
        sink = FakeSink()
        again = await eb.open_session(
            ClientInfo("dev", "mqttsn"), clean_start=False, expiry=60, will=None, sink=sink, max_inflight=1
        )
        assert again.present is True
        assert sink.payloads == [b"while-away"]
        again.close(publish_will=False)
        clock.advance(61)
        broker.handle_timeouts(clock.now())
        assert "dev" not in broker.sessions

    asyncio.run(scenario())


def test_queue_counts_share_one_counter_object() -> None:
    broker = make_broker(max_mqueue_len=1)
    offline_session(broker, "a", "t")
    offline_session(broker, "b", "t")
    for _ in range(3):
        publish(broker, "t", qos=1)
    assert broker.metrics.dropped_queue_full == 4
    assert Counter(len(s.queue) for s in broker.sessions.values()) == Counter({1: 2})


def test_takeover_with_clean_start_ends_the_session_and_publishes_its_delayed_will() -> None:
    broker = make_broker()
    watcher, wsink = connect(broker, "watcher")
    subscribe(broker, watcher, "wills/#")
    connect(broker, "dev", expiry=60, will=Will("wills/dev", b"gone", delay=30))
    connect(broker, "dev", clean_start=True, now=1.0)
    broker.handle_timeouts(100.0)
    assert wsink.payloads == [b"gone"]
