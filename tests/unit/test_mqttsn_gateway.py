"""Pure tests of the MQTT-SN gateway: :class:`MqttSnGateway` and its channels on the embedded core broker.

No sockets and no sleeps. :class:`Harness` is ``tests/unit/harness.py``'s :class:`GatewayHarness` with an
:class:`MqttSnGateway`: its ``pump`` does what ``gateways/mqttsn/adapter.py`` does after every datagram and
timer (open the broker sessions channels asked for, collect the datagrams to send). Peers are plain tuples;
the MQTT side is a broker session with a recording :class:`DeliverySink`.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pytest

from core.broker.embedded import EmbeddedSession
from core.broker.types import ClientInfo, Credentials, Subscription, Will
from core.config import MqttSnConfig
from gateways.mqttsn import codec
from gateways.mqttsn.channel import ChannelState, MqttSnChannel
from gateways.mqttsn.gateway import ForwardedPeer, MqttSnGateway
from gateways.mqttsn.numbers import ReturnCode, TopicIdType
from gateways.mqttsn.registry import TopicRegistry
from tests.unit.harness import GatewayHarness, RecordingSink, run_now

T = TypeVar("T")

A: Hashable = ("10.0.0.1", 5000)
B: Hashable = ("10.0.0.2", 5000)
C: Hashable = ("10.0.0.3", 5000)


class Harness(GatewayHarness[MqttSnChannel, codec.Message]):
    """An MQTT-SN gateway on the embedded broker with a fake clock, pumped synchronously like the adapter."""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config = MqttSnConfig(**{"advertise_interval": 0, **config})
        self.gateway: MqttSnGateway = MqttSnGateway(self.config, self.clock)

    def _decode(self, data: bytes) -> codec.Message:
        return codec.decode(data)

    def _open_session(self, channel: MqttSnChannel) -> None:
        """What MqttSnUdpGateway._open_session does."""
        config = self.config
        client = ClientInfo(
            config.clientid_prefix + channel.client_id, "mqttsn", str(channel.peer), config.username or None
        )
        credentials = Credentials(
            config.username or None, config.password.encode() if config.password else None
        )
        session = self.open_broker_session(
            client,
            credentials,
            clean_start=channel.clean_session,
            expiry=0 if channel.clean_session else config.session_expiry,
            will=channel.will,
            sink=channel,
            max_inflight=config.max_inflight,
        )
        if isinstance(session, int):
            channel.session_refused(session, self.clock.now())
        else:
            channel.session_opened(session, self.clock.now())

    # --- the device side

    def send(self, peer: Hashable, message: codec.Message | bytes) -> list[codec.Message]:
        """One datagram from ``peer``; returns what the gateway answered to ``peer``."""
        data = message if isinstance(message, bytes) else codec.encode(message)
        self.gateway.receive_datagram(data, peer, self.clock.now())
        self.pump()
        return self.take(peer)

    def connect(
        self,
        peer: Hashable,
        client_id: str,
        *,
        keepalive: int = 0,
        clean: bool = True,
        will: tuple[str, bytes] | None = None,
    ) -> MqttSnChannel:
        out = self.send(peer, codec.Connect(client_id, keepalive, clean, will is not None))
        if will is not None:
            assert out == [codec.WillTopicReq()]
            assert self.send(peer, codec.WillTopic(will[0], 1)) == [codec.WillMsgReq()]
            out = self.send(peer, codec.WillMsg(will[1]))
        assert out == [codec.Connack(ReturnCode.ACCEPTED)]
        channel = self.gateway.by_client[client_id]
        assert state(channel) is ChannelState.ACTIVE
        return channel

    def subscribe(self, peer: Hashable, topic: str, qos: int = 1, msg_id: int = 1) -> codec.Suback:
        (suback,) = self.send(peer, codec.Subscribe(msg_id, TopicIdType.NORMAL, topic, qos=qos))
        assert isinstance(suback, codec.Suback)
        assert suback.return_code == ReturnCode.ACCEPTED
        return suback

    def register(self, peer: Hashable, topic: str, msg_id: int = 1) -> int:
        (regack,) = self.send(peer, codec.Register(0, msg_id, topic))
        assert isinstance(regack, codec.Regack)
        assert regack.return_code == ReturnCode.ACCEPTED
        return regack.topic_id

    def sleep(self, peer: Hashable, duration: int) -> None:
        assert self.send(peer, codec.Disconnect(duration)) == [codec.Disconnect()]

    def session_of(self, client_id: str) -> EmbeddedSession:
        return cast(EmbeddedSession, self.gateway.by_client[client_id].session)


def only(messages: list[codec.Message], kind: type[T]) -> T:
    assert len(messages) == 1, messages
    assert isinstance(messages[0], kind), messages
    return messages[0]


def state(channel: MqttSnChannel) -> ChannelState:
    """The channel's state, read through a call so that type checkers do not narrow it between steps."""
    return channel.state


def publishes(messages: list[codec.Message]) -> list[codec.Publish]:
    assert all(isinstance(m, codec.Publish) for m in messages), messages
    return cast(list[codec.Publish], messages)


# --- connecting


def test_connect_opens_a_broker_session_with_the_prefixed_client_id() -> None:
    h = Harness(clientid_prefix="sn-")
    channel = h.connect(A, "dev1")
    assert "sn-dev1" in h.broker.sessions
    assert h.broker.sessions["sn-dev1"].client.protocol == "mqttsn"
    assert h.gateway.by_peer[A] is channel


def test_log_lines_about_a_client_carry_its_prefixed_broker_client_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness(clientid_prefix="sn-")
    h.connect(A, "dev1")
    with caplog.at_level(logging.INFO, logger="mqgate.mqttsn"):
        h.send(A, codec.Regack(1, 1, ReturnCode.ACCEPTED))  # a REGACK nobody asked for
    (record,) = [r for r in caplog.records if "dropped REGACK" in r.getMessage()]
    assert (record.clientid, record.protocol) == ("sn-dev1", "mqttsn")


def test_connect_beyond_max_clients_is_refused_with_congestion() -> None:
    h = Harness(max_clients=1)
    h.connect(A, "one")
    assert h.send(B, codec.Connect("two")) == [codec.Connack(ReturnCode.CONGESTION)]
    assert "two" not in h.gateway.by_client
    assert B not in h.gateway.by_peer
    assert h.gateway.metrics.too_many_clients == 1
    # The same client id reconnecting is not a new client.
    assert h.send(A, codec.Connect("one")) == [codec.Connack(ReturnCode.ACCEPTED)]


def test_connect_with_a_client_id_over_23_bytes_is_refused() -> None:
    h = Harness()
    assert h.send(A, codec.Connect("x" * 24)) == [codec.Connack(ReturnCode.NOT_SUPPORTED)]
    assert h.gateway.metrics.connect_refused == 1
    assert "x" * 24 not in h.broker.sessions


# --- keep-alive (§6.11, §7.2 tolerance)


def test_keepalive_30_is_lost_after_45_seconds_not_at_44_and_the_will_is_published() -> None:
    h = Harness()
    watcher = h.watch("will/#")
    h.connect(A, "k30", keepalive=30, will=("will/k30", b"gone"))
    h.advance(44)
    assert state(h.gateway.by_client["k30"]) is ChannelState.ACTIVE
    assert watcher.deliveries == []
    h.advance(1)
    assert "k30" not in h.gateway.by_client
    (will,) = watcher.deliveries
    assert (will.topic, will.payload, will.qos, will.retain, will.dup) == (
        "will/k30",
        b"gone",
        1,
        False,
        False,
    )
    assert h.gateway.metrics.clients_lost == 1
    assert "k30" not in h.broker.sessions


def test_keepalive_120_is_lost_after_132_seconds() -> None:
    h = Harness()
    watcher = h.watch("will/#")
    h.connect(A, "k120", keepalive=120, will=("will/k120", b"gone"))
    h.advance(131.9)
    assert state(h.gateway.by_client["k120"]) is ChannelState.ACTIVE
    assert watcher.deliveries == []
    h.advance(0.2)
    assert "k120" not in h.gateway.by_client
    assert watcher.messages() == [("will/k120", b"gone")]


def test_traffic_restarts_the_keepalive_deadline() -> None:
    h = Harness()
    h.connect(A, "alive", keepalive=30)
    h.advance(40)
    assert h.send(A, codec.Pingreq()) == [codec.Pingresp()]
    h.advance(44)  # 84 s after CONNECT, 44 s after the PINGREQ
    assert state(h.gateway.by_client["alive"]) is ChannelState.ACTIVE
    h.advance(1)
    assert "alive" not in h.gateway.by_client


def test_normal_disconnect_does_not_publish_the_will() -> None:
    h = Harness()
    watcher = h.watch("will/#")
    h.connect(A, "polite", keepalive=30, will=("will/polite", b"gone"))
    assert h.send(A, codec.Disconnect()) == [codec.Disconnect()]
    h.advance(100)
    assert watcher.deliveries == []
    assert "polite" not in h.gateway.by_client


# --- QoS 1 deliveries: retransmission and loss (§6.13)


def test_qos1_delivery_is_retransmitted_with_dup_n_retry_times_then_the_client_is_lost() -> None:
    h = Harness(t_retry=5.0, n_retry=2)
    watcher = h.watch("will/#")
    h.connect(A, "slow", will=("will/slow", b"lost"))
    topic_id = h.subscribe(A, "data/x", qos=1).topic_id
    h.publish("data/x", b"v1", qos=1)
    first = only(h.take(A), codec.Publish)
    assert (first.topic_id, first.qos, first.dup, first.data) == (topic_id, 1, False, b"v1")
    for _ in range(2):
        h.advance(4.9)
        assert h.take(A) == []
        h.advance(0.1)
        again = only(h.take(A), codec.Publish)
        assert (again.msg_id, again.dup, again.data) == (first.msg_id, True, b"v1")
    assert h.gateway.metrics.retransmissions == 2
    h.advance(4.9)
    assert state(h.gateway.by_client["slow"]) is ChannelState.ACTIVE
    h.advance(0.1)
    assert h.take(A) == []
    assert "slow" not in h.gateway.by_client
    assert h.gateway.metrics.clients_lost == 1
    assert watcher.messages() == [("will/slow", b"lost")]


def test_puback_moves_the_window_to_the_next_message() -> None:
    h = Harness()
    h.connect(A, "win")
    topic_id = h.subscribe(A, "data/x", qos=1).topic_id
    h.publish("data/x", b"1", qos=1)
    h.publish("data/x", b"2", qos=1)
    first = only(h.take(A), codec.Publish)
    assert first.data == b"1"
    assert h.session_of("win").pending() == 2
    second = only(h.send(A, codec.Puback(topic_id, first.msg_id)), codec.Publish)
    assert second.data == b"2"
    assert h.send(A, codec.Puback(topic_id, second.msg_id)) == []
    assert h.session_of("win").pending() == 0
    h.advance(60)
    assert h.take(A) == []  # nothing left to retransmit


def test_puback_congestion_resends_after_t_retry() -> None:
    h = Harness(t_retry=5.0)
    h.connect(A, "busy")
    topic_id = h.subscribe(A, "data/x", qos=1).topic_id
    h.advance(3)
    h.publish("data/x", b"v", qos=1)
    first = only(h.take(A), codec.Publish)
    h.advance(4)
    assert h.send(A, codec.Puback(topic_id, first.msg_id, ReturnCode.CONGESTION)) == []
    h.advance(4.9)  # 8.9 s after the PUBLISH, 4.9 s after the congestion PUBACK
    assert h.take(A) == []
    h.advance(0.1)
    again = only(h.take(A), codec.Publish)
    assert (again.msg_id, again.dup, again.data) == (first.msg_id, True, b"v")
    assert h.send(A, codec.Puback(topic_id, again.msg_id)) == []
    assert h.session_of("busy").pending() == 0


def test_puback_invalid_topic_id_registers_the_topic_again_and_resends() -> None:
    h = Harness()
    h.connect(A, "forgetful")
    topic_id = h.subscribe(A, "data/x", qos=1).topic_id
    h.publish("data/x", b"v", qos=1)
    first = only(h.take(A), codec.Publish)
    register = only(
        h.send(A, codec.Puback(topic_id, first.msg_id, ReturnCode.INVALID_TOPIC_ID)), codec.Register
    )
    assert register.topic_name == "data/x"
    again = only(h.send(A, codec.Regack(register.topic_id, register.msg_id)), codec.Publish)
    assert (again.topic_id, again.msg_id, again.data) == (register.topic_id, first.msg_id, b"v")


# --- REGISTER from the gateway (§6.10)


def test_wildcard_delivery_registers_the_topic_first_and_retransmits_the_register() -> None:
    h = Harness(t_retry=5.0, n_retry=2)
    h.connect(A, "wild")
    assert h.subscribe(A, "s/+", qos=1).topic_id == 0
    h.publish("s/temp", b"21", qos=1)
    register = only(h.take(A), codec.Register)
    assert register.topic_name == "s/temp"
    h.advance(5)
    resent = only(h.take(A), codec.Register)
    assert resent == register
    assert h.gateway.metrics.retransmissions == 1
    publish = only(h.send(A, codec.Regack(register.topic_id, register.msg_id)), codec.Publish)
    assert (publish.topic_id, publish.topic_id_type, publish.data) == (
        register.topic_id,
        TopicIdType.NORMAL,
        b"21",
    )
    # Known now: the next message on that topic needs no REGISTER.
    assert h.send(A, codec.Puback(publish.topic_id, publish.msg_id)) == []
    h.publish("s/temp", b"22", qos=1)
    assert only(h.take(A), codec.Publish).data == b"22"


def test_unanswered_register_makes_the_client_lost_after_n_retry() -> None:
    h = Harness(t_retry=5.0, n_retry=1)
    watcher = h.watch("will/#")
    h.connect(A, "mute", will=("will/mute", b"x"))
    h.subscribe(A, "s/#", qos=0)
    h.publish("s/a", b"1")
    only(h.take(A), codec.Register)
    h.advance(5)
    only(h.take(A), codec.Register)
    h.advance(5)
    assert "mute" not in h.gateway.by_client
    assert watcher.messages() == [("will/mute", b"x")]


def test_register_refused_by_the_client_drops_the_deliveries_for_that_topic() -> None:
    h = Harness()
    h.connect(A, "picky")
    h.subscribe(A, "s/#", qos=0)
    h.publish("s/a", b"1")
    register = only(h.take(A), codec.Register)
    h.publish("s/a", b"2")
    h.publish("s/b", b"3")
    assert h.take(A) == []
    out = h.send(A, codec.Regack(0, register.msg_id, ReturnCode.NOT_SUPPORTED))
    assert h.gateway.metrics.dropped_register_refused == 2  # both messages on s/a
    # s/b gets its own REGISTER; nothing on s/a is sent.
    assert only(out, codec.Register).topic_name == "s/b"


# --- registry and pending bounds (DESIGN §4.8)


def test_register_from_the_client_beyond_max_topics_gets_rc_not_supported() -> None:
    h = Harness(max_topics=2)
    h.connect(A, "full")
    first = h.register(A, "t/1", msg_id=1)
    second = h.register(A, "t/2", msg_id=2)
    assert first != second
    assert h.register(A, "t/1", msg_id=3) == first  # known names do not take room
    regack = only(h.send(A, codec.Register(0, 4, "t/3")), codec.Regack)
    assert (regack.topic_id, regack.msg_id, regack.return_code) == (0, 4, ReturnCode.NOT_SUPPORTED)
    assert h.gateway.metrics.registry_full == 1


def test_delivery_needing_a_registration_when_the_table_is_full_is_dropped_and_counted() -> None:
    h = Harness(max_topics=1)
    h.connect(A, "tiny")
    h.register(A, "t/1")
    h.subscribe(A, "w/#", qos=1)
    h.publish("w/1", b"a", qos=1)
    assert h.take(A) == []
    assert h.gateway.metrics.registry_full == 1
    # Acknowledged to the session, so the window is free and nothing waits.
    assert h.session_of("tiny").pending() == 0
    # A topic the client knows still flows.
    h.subscribe(A, "t/1", qos=1, msg_id=2)
    h.publish("t/1", b"b", qos=1)
    assert only(h.take(A), codec.Publish).data == b"b"


def test_subscribe_needing_a_topic_id_when_the_table_is_full_is_refused() -> None:
    h = Harness(max_topics=1)
    h.connect(A, "tiny")
    h.register(A, "t/1")
    suback = only(h.send(A, codec.Subscribe(5, TopicIdType.NORMAL, "t/2", qos=1)), codec.Suback)
    assert (suback.topic_id, suback.msg_id, suback.return_code) == (0, 5, ReturnCode.NOT_SUPPORTED)


def test_deliveries_waiting_for_a_regack_are_bounded_by_max_pending() -> None:
    h = Harness(max_pending=2)
    h.connect(A, "queue")
    h.subscribe(A, "w/#", qos=0)
    for i in range(4):
        h.publish("w/1", str(i).encode())
    register = only(h.take(A), codec.Register)
    assert h.gateway.metrics.dropped_pending_full == 2
    out = publishes(h.send(A, codec.Regack(register.topic_id, register.msg_id)))
    assert [p.data for p in out] == [b"0", b"1"]


def test_topic_registry_ids_start_above_predefined_and_are_bounded() -> None:
    registry = TopicRegistry({5: "pre/five"}, max_topics=2)
    assert registry.register("a") == 6
    assert registry.register("b") == 7
    assert registry.register("c") is None
    assert registry.name_of(5) == "pre/five"
    registry.forget(6)
    assert registry.registered_id("a") is None
    assert registry.register("c") == 8
    registry.clear()
    assert len(registry) == 0
    assert registry.register("d") == 6


# --- QoS 2 (§6.8)


def test_qos2_inbound_duplicate_publish_is_answered_with_pubrec_and_published_once() -> None:
    h = Harness()
    watcher = h.watch("in/#")
    h.connect(A, "q2")
    topic_id = h.register(A, "in/x")
    publish = codec.Publish(topic_id, b"once", 2, 7)
    assert h.send(A, publish) == [codec.Pubrec(7)]
    dup = codec.Publish(topic_id, b"once", 2, 7, dup=True)
    assert h.send(A, dup) == [codec.Pubrec(7)]
    assert watcher.messages() == [("in/x", b"once")]
    assert h.send(A, codec.Pubrel(7)) == [codec.Pubcomp(7)]
    # The id is free again: a new message with it is a new publish.
    assert h.send(A, codec.Publish(topic_id, b"twice", 2, 7)) == [codec.Pubrec(7)]
    assert watcher.messages() == [("in/x", b"once"), ("in/x", b"twice")]
    assert h.gateway.metrics.messages_in == 2


def test_qos2_outbound_pubrec_pubrel_pubcomp_with_pubrel_retransmission() -> None:
    h = Harness(t_retry=5.0)
    h.connect(A, "q2out")
    topic_id = h.subscribe(A, "out/x", qos=2).topic_id
    h.publish("out/x", b"exactly", qos=2)
    publish = only(h.take(A), codec.Publish)
    assert (publish.qos, publish.topic_id) == (2, topic_id)
    assert h.send(A, codec.Pubrec(publish.msg_id)) == [codec.Pubrel(publish.msg_id)]
    assert h.session_of("q2out").session.inflight[publish.msg_id].released
    h.advance(5)
    assert h.take(A) == [codec.Pubrel(publish.msg_id)]  # PUBREL again, not the PUBLISH
    assert h.send(A, codec.Pubcomp(publish.msg_id)) == []
    assert h.session_of("q2out").pending() == 0
    h.advance(60)
    assert h.take(A) == []


def test_inbound_publish_on_an_unknown_topic_id_gets_rc_invalid_topic_id() -> None:
    h = Harness()
    h.connect(A, "lost-ids")
    assert h.send(A, codec.Publish(42, b"x", 1, 3)) == [codec.Puback(42, 3, ReturnCode.INVALID_TOPIC_ID)]
    assert h.gateway.metrics.publish_unknown_topic_id == 1


# --- sleep (§6.14)


@pytest.mark.parametrize("clean", [True, False])
def test_sleep_timer_expiry_makes_the_client_lost_and_publishes_the_will(clean: bool) -> None:
    h = Harness()
    watcher = h.watch("will/#")
    h.connect(A, "sleepy", keepalive=30, clean=clean, will=("will/sleepy", b"zzz"))
    h.sleep(A, 100)  # over a minute: +10 %, lost after 110 s
    channel = h.gateway.by_client["sleepy"]
    assert state(channel) is ChannelState.ASLEEP
    h.advance(109)  # long past the keep-alive: asleep clients are not held to it
    assert state(channel) is ChannelState.ASLEEP
    assert watcher.deliveries == []
    h.advance(1)
    assert watcher.messages() == [("will/sleepy", b"zzz")]
    assert h.gateway.metrics.clients_lost == 1
    assert state(channel) is ChannelState.DISCONNECTED
    if clean:
        assert "sleepy" not in h.gateway.by_client
        assert "sleepy" not in h.broker.sessions
    else:
        assert h.gateway.by_client["sleepy"] is channel  # kept until session_expiry
        assert h.broker.sessions["sleepy"].sink is None


def test_awake_client_gets_queued_qos1_one_at_a_time_then_pingresp_then_sleeps_again() -> None:
    h = Harness()
    h.connect(A, "nap")
    topic_id = h.subscribe(A, "cmd/nap", qos=1).topic_id
    h.sleep(A, 600)
    for i in range(3):
        h.publish("cmd/nap", f"m{i}".encode(), qos=1)
    assert h.take(A) == []
    assert h.session_of("nap").pending() == 3
    out = h.send(A, codec.Pingreq("nap"))
    received = []
    while True:
        publish = only(out, codec.Publish)
        assert not publish.dup
        received.append(publish.data)
        out = h.send(A, codec.Puback(topic_id, publish.msg_id))
        if out == [codec.Pingresp()]:
            break
    assert received == [b"m0", b"m1", b"m2"]
    channel = h.gateway.by_client["nap"]
    assert state(channel) is ChannelState.ASLEEP
    h.publish("cmd/nap", b"later", qos=1)
    assert h.take(A) == []
    assert h.session_of("nap").pending() == 1


def test_qos0_and_qos2_messages_are_queued_while_asleep_and_delivered_on_wake() -> None:
    h = Harness()
    h.connect(A, "nap2")
    topic_id = h.subscribe(A, "cmd/nap2", qos=2).topic_id
    h.sleep(A, 600)
    h.publish("cmd/nap2", b"zero", qos=0)
    h.publish("cmd/nap2", b"two", qos=2)
    assert h.take(A) == []
    out = publishes(h.send(A, codec.Pingreq("nap2")))
    assert [(p.data, p.qos, p.topic_id) for p in out] == [(b"zero", 0, topic_id), (b"two", 2, topic_id)]
    assert h.send(A, codec.Pubrec(out[1].msg_id)) == [codec.Pubrel(out[1].msg_id)]
    assert h.send(A, codec.Pubcomp(out[1].msg_id)) == [codec.Pingresp()]
    assert state(h.gateway.by_client["nap2"]) is ChannelState.ASLEEP


def test_waking_with_nothing_queued_answers_pingresp_at_once() -> None:
    h = Harness()
    h.connect(A, "idle")
    h.sleep(A, 600)
    assert h.send(A, codec.Pingreq("idle")) == [codec.Pingresp()]
    assert state(h.gateway.by_client["idle"]) is ChannelState.ASLEEP


def test_waking_registers_a_wildcard_topic_before_delivering_the_queued_message() -> None:
    h = Harness()
    h.connect(A, "wsleep")
    h.subscribe(A, "cmd/#", qos=1)
    h.sleep(A, 600)
    h.publish("cmd/x", b"go", qos=1)
    register = only(h.send(A, codec.Pingreq("wsleep")), codec.Register)
    publish = only(h.send(A, codec.Regack(register.topic_id, register.msg_id)), codec.Publish)
    assert (publish.topic_id, publish.data) == (register.topic_id, b"go")
    assert h.send(A, codec.Puback(publish.topic_id, publish.msg_id)) == [codec.Pingresp()]


def test_waking_pingreq_from_another_address_rebinds_the_channel() -> None:
    h = Harness()
    h.connect(A, "mover")
    topic_id = h.subscribe(A, "cmd/mover", qos=1).topic_id
    h.sleep(A, 600)
    h.publish("cmd/mover", b"here", qos=1)
    publish = only(h.send(B, codec.Pingreq("mover")), codec.Publish)
    assert (publish.topic_id, publish.data) == (topic_id, b"here")
    channel = h.gateway.by_client["mover"]
    assert channel.peer == B
    assert h.gateway.by_peer[B] is channel
    assert A not in h.gateway.by_peer
    assert h.send(B, codec.Puback(topic_id, publish.msg_id)) == [codec.Pingresp()]
    assert h.take(A) == []


def test_a_client_that_keeps_waking_within_its_sleep_duration_is_not_lost() -> None:
    h = Harness()
    h.connect(A, "cycler")
    h.sleep(A, 10)  # lost if silent for 15 s
    for _ in range(4):
        h.advance(10)
        assert h.send(A, codec.Pingreq("cycler")) == [codec.Pingresp()]
    assert state(h.gateway.by_client["cycler"]) is ChannelState.ASLEEP
    assert h.gateway.metrics.clients_lost == 0
    h.advance(15)
    assert "cycler" not in h.gateway.by_client


def test_awake_client_past_its_sleep_deadline_is_supervised_by_retransmission() -> None:
    h = Harness(t_retry=5.0, n_retry=1)
    h.connect(A, "late")
    topic_id = h.subscribe(A, "cmd/late", qos=1).topic_id
    h.sleep(A, 10)  # sleep deadline 15 s from now
    h.publish("cmd/late", b"x", qos=1)
    h.advance(14)
    publish = only(h.send(A, codec.Pingreq("late")), codec.Publish)
    h.advance(2)  # the sleep deadline passes while the client is awake
    assert state(h.gateway.by_client["late"]) is ChannelState.AWAKE
    h.advance(3)
    assert only(h.take(A), codec.Publish).dup
    assert h.send(A, codec.Puback(topic_id, publish.msg_id)) == [codec.Pingresp()]
    assert state(h.gateway.by_client["late"]) is ChannelState.ASLEEP


def test_connect_while_asleep_makes_the_client_active_and_delivers_the_queue() -> None:
    h = Harness()
    h.connect(A, "riser", clean=False)
    h.subscribe(A, "cmd/riser", qos=1)
    h.sleep(A, 600)
    h.publish("cmd/riser", b"q", qos=1)
    out = h.send(A, codec.Connect("riser", 0, False))
    assert out[0] == codec.Connack(ReturnCode.ACCEPTED)
    assert [p.data for p in publishes(out[1:])] == [b"q"]
    assert state(h.gateway.by_client["riser"]) is ChannelState.ACTIVE


# --- clean session false: resume and expiry


def test_clean_session_false_reconnect_resumes_subscriptions_and_topic_ids() -> None:
    h = Harness()
    h.connect(A, "keeper", clean=False)
    topic_id = h.subscribe(A, "cfg/x", qos=1).topic_id
    assert h.send(A, codec.Disconnect()) == [codec.Disconnect()]
    h.publish("cfg/x", b"while away", qos=1)
    out = h.send(B, codec.Connect("keeper", 0, False))
    assert out[0] == codec.Connack(ReturnCode.ACCEPTED)
    publish = only(out[1:], codec.Publish)
    assert (publish.topic_id, publish.topic_id_type, publish.data) == (
        topic_id,
        TopicIdType.NORMAL,
        b"while away",
    )


def test_disconnected_clean_session_false_channel_is_removed_after_session_expiry() -> None:
    h = Harness(session_expiry=100)
    h.connect(A, "expiring", clean=False, keepalive=30)
    assert h.send(A, codec.Disconnect()) == [codec.Disconnect()]
    channel = h.gateway.by_client["expiring"]
    assert state(channel) is ChannelState.DISCONNECTED
    h.advance(99)
    assert h.gateway.by_client.get("expiring") is channel
    assert "expiring" in h.broker.sessions
    h.advance(1)
    assert "expiring" not in h.gateway.by_client
    assert A not in h.gateway.by_peer
    assert "expiring" not in h.broker.sessions


# --- the will handshake (§6.2)


def test_unfinished_will_handshake_is_dropped_after_idle_timeout() -> None:
    h = Harness(idle_timeout=20.0)
    assert h.send(A, codec.Connect("halfway", 0, True, True)) == [codec.WillTopicReq()]
    assert h.send(A, codec.WillTopic("will/halfway")) == [codec.WillMsgReq()]
    h.advance(19.9)
    assert state(h.gateway.by_client["halfway"]) is ChannelState.AWAITING_WILL_MESSAGE
    h.advance(0.1)
    assert "halfway" not in h.gateway.by_client
    assert A not in h.gateway.by_peer
    assert "halfway" not in h.broker.sessions
    assert h.send(A, codec.WillMsg(b"too late")) == []
    assert h.gateway.metrics.unknown_peer == 1


def test_willmsg_before_willtopic_is_dropped_and_counted() -> None:
    h = Harness()
    assert h.send(A, codec.Connect("eager", 0, True, True)) == [codec.WillTopicReq()]
    assert h.send(A, codec.WillMsg(b"early")) == []
    assert h.gateway.metrics.invalid_in_state == 1
    assert h.send(A, codec.WillTopic(None)) == [codec.Connack(ReturnCode.ACCEPTED)]


# --- takeover


def test_connect_from_another_address_takes_over_and_publishes_the_old_will() -> None:
    h = Harness()
    watcher = h.watch("will/#")
    h.connect(A, "twin", will=("will/twin", b"old link"))
    assert h.send(B, codec.Connect("twin")) == [codec.Connack(ReturnCode.ACCEPTED)]
    assert watcher.messages() == [("will/twin", b"old link")]
    channel = h.gateway.by_client["twin"]
    assert channel.peer == B
    assert A not in h.gateway.by_peer


# --- forwarder encapsulation (§5.5)


def test_forwarder_answers_are_wrapped_with_the_same_node_id_and_radius() -> None:
    h = Harness()
    forwarder = ("10.0.0.9", 6000)

    def via(node: bytes, message: codec.Message) -> list[codec.Message]:
        return h.send(forwarder, codec.Encapsulated(node, message, 2))

    (connack,) = via(b"\x01\x02", codec.Connect("node-a"))
    assert connack == codec.Encapsulated(b"\x01\x02", codec.Connack(ReturnCode.ACCEPTED), 2)
    (connack,) = via(b"\x07", codec.Connect("node-b"))
    assert connack == codec.Encapsulated(b"\x07", codec.Connack(ReturnCode.ACCEPTED), 2)
    assert h.gateway.by_client["node-a"].peer == ForwardedPeer(forwarder, b"\x01\x02", 2)
    (pingresp,) = via(b"\x07", codec.Pingreq())
    assert pingresp == codec.Encapsulated(b"\x07", codec.Pingresp(), 2)
    # A delivery to a node goes out through its forwarder too.
    (suback,) = via(b"\x01\x02", codec.Subscribe(1, TopicIdType.NORMAL, "fw/x", qos=0))
    assert isinstance(suback, codec.Encapsulated)
    h.publish("fw/x", b"hop")
    (wrapped,) = h.take(forwarder)
    assert isinstance(wrapped, codec.Encapsulated)
    assert wrapped.node_id == b"\x01\x02"
    assert isinstance(wrapped.message, codec.Publish)
    assert wrapped.message.data == b"hop"


# --- QoS -1 (§6.8)


def _qos3_harness(**config: Any) -> Harness:
    h = Harness(predefined={1: "sensors/temp"}, **config)
    h.gateway.qos3_session = run_now(
        h.embedded.open_session(
            ClientInfo(h.config.qos3_clientid, "mqttsn"),
            clean_start=True,
            expiry=0,
            will=None,
            sink=RecordingSink(),
            max_inflight=1,
        )
    )
    return h


def test_qos_minus_one_on_a_predefined_topic_is_published_without_a_connection() -> None:
    h = _qos3_harness()
    watcher = h.watch("sensors/#")
    assert h.send(C, codec.Publish(1, b"20.5", -1, 0, TopicIdType.PREDEFINED)) == []
    assert watcher.messages() == [("sensors/temp", b"20.5")]
    assert h.gateway.metrics.qos3_published == 1
    assert h.send(C, codec.Publish(9, b"?", -1, 0, TopicIdType.PREDEFINED)) == []
    assert h.gateway.metrics.qos3_dropped == 1


def test_qos_minus_one_is_dropped_and_counted_when_disabled() -> None:
    h = _qos3_harness(enable_qos3=False)
    watcher = h.watch("sensors/#")
    h.send(C, codec.Publish(1, b"20.5", -1, 0, TopicIdType.PREDEFINED))
    assert watcher.deliveries == []
    assert h.gateway.metrics.qos3_dropped == 1


# --- the timer heap


@dataclass
class _TimedChannel:
    """Just what MqttSnGateway.handle_timer touches on a channel."""

    client_id: str
    following: list[float | None]
    scheduled: float | None = None
    fired: list[float] = field(default_factory=list)

    def handle_timeout(self, now: float) -> float | None:
        self.fired.append(now)
        return self.following.pop(0) if self.following else None


def test_timer_heap_returns_the_earliest_deadline_and_skips_superseded_entries() -> None:
    h = Harness()
    gateway = h.gateway
    assert gateway.get_timer() is None
    one = _TimedChannel("one", [None])
    two = _TimedChannel("two", [400.0, None])
    for timed in (one, two):
        gateway.by_client[timed.client_id] = cast(MqttSnChannel, timed)
    gateway.schedule(cast(MqttSnChannel, one), 300.0)
    gateway.schedule(cast(MqttSnChannel, two), 200.0)
    assert gateway.get_timer() == 200.0
    gateway.schedule(cast(MqttSnChannel, one), 100.0)  # earlier: supersedes 300
    gateway.schedule(cast(MqttSnChannel, two), 250.0)  # later: ignored, 200 stands
    assert gateway.get_timer() == 100.0
    gateway.handle_timer(99.0)
    assert one.fired == [] and two.fired == []
    gateway.handle_timer(100.0)
    assert one.fired == [100.0]
    assert gateway.get_timer() == 200.0
    gateway.handle_timer(200.0)
    assert two.fired == [200.0]  # and asked for 400
    assert gateway.get_timer() == 300.0  # one's superseded entry is still in the heap...
    gateway.handle_timer(300.0)
    assert one.fired == [100.0]  # ...and skipped
    assert gateway.get_timer() == 400.0
    gateway.handle_timer(1000.0)
    assert two.fired == [200.0, 1000.0]
    assert gateway.get_timer() is None


def test_timer_of_a_channel_that_is_gone_is_not_rescheduled() -> None:
    h = Harness()
    gone = _TimedChannel("gone", [500.0])
    h.gateway.schedule(cast(MqttSnChannel, gone), 100.0)
    h.gateway.handle_timer(100.0)
    assert gone.fired == [100.0]
    assert h.gateway.get_timer() is None


# --- bad input and metrics


def test_metrics_count_datagrams_messages_and_drops_by_reason() -> None:
    h = Harness()
    h.connect(A, "counted")
    topic_id = h.register(A, "m/x")
    h.subscribe(A, "m/x", qos=0, msg_id=2)
    looped = only(h.send(A, codec.Publish(topic_id, b"loop", 0, 0)), codec.Publish)  # subscribed to itself
    assert looped.data == b"loop"
    h.send(A, b"\x03\x0c")  # malformed
    h.send(B, codec.Pingreq())  # unknown peer
    h.send(B, codec.SearchGw(0))
    metrics = h.gateway.metrics.as_dict()
    assert metrics["datagrams_in"] == 7
    assert metrics["messages_in"] == 1
    assert metrics["messages_out"] == 1
    assert metrics["malformed"] == 1
    assert metrics["unknown_peer"] == 1
    # CONNACK, REGACK, SUBACK, PUBLISH, GWINFO
    assert metrics["datagrams_out"] == 5
    assert set(metrics) >= {"retransmissions", "clients_lost", "registry_full", "dropped_pending_full"}


def test_publish_before_connect_is_dropped_and_does_not_disturb_other_clients() -> None:
    h = Harness()
    watcher = h.watch("x/#")
    h.connect(A, "good")
    topic_id = h.register(A, "x/y")
    assert h.send(B, codec.Publish(topic_id, b"nope", 1, 1)) == []
    assert h.gateway.metrics.unknown_peer == 1
    assert h.send(A, codec.Publish(topic_id, b"yes", 1, 1)) == [codec.Puback(topic_id, 1)]
    assert watcher.messages() == [("x/y", b"yes")]


# --- the embedded session: pending, park, resume (what the channel relies on)


def _bare_session(h: Harness, client_id: str, max_inflight: int = 1) -> tuple[EmbeddedSession, RecordingSink]:
    sink = RecordingSink()
    session = run_now(
        h.embedded.open_session(
            ClientInfo(client_id, "mqttsn"),
            clean_start=True,
            expiry=0,
            will=None,
            sink=sink,
            max_inflight=max_inflight,
        )
    )
    assert session.subscribe([Subscription("e/#", 2)]) == [2]
    return session, sink


def test_embedded_session_pending_counts_queued_and_inflight_deliveries() -> None:
    h = Harness()
    session, sink = _bare_session(h, "bare")
    assert session.pending() == 0
    for i in range(3):
        h.publish("e/x", str(i).encode(), qos=1)
    assert [d.payload for d in sink.deliveries] == [b"0"]  # a window of one
    assert session.pending() == 3
    session.ack(sink.packet_ids[0])
    assert [d.payload for d in sink.deliveries] == [b"0", b"1"]
    assert session.pending() == 2
    session.ack(12345)  # unknown ids are ignored
    assert session.pending() == 2


def test_embedded_session_park_queues_everything_and_resume_resends_then_drains() -> None:
    h = Harness()
    session, sink = _bare_session(h, "parky")
    h.publish("e/x", b"inflight", qos=1)
    session.park()
    h.publish("e/x", b"zero", qos=0)
    h.publish("e/x", b"two", qos=2)
    assert [d.payload for d in sink.deliveries] == [b"inflight"]
    assert session.pending() == 3
    session.ack(sink.packet_ids[0])  # acknowledged while parked: nothing more flows
    assert len(sink.deliveries) == 1
    assert session.pending() == 2
    session.resume()
    assert [(d.payload, d.qos) for d in sink.deliveries[1:]] == [(b"zero", 0), (b"two", 2)]
    assert session.pending() == 1
    session.received(sink.packet_ids[-1])
    session.ack(sink.packet_ids[-1])
    assert session.pending() == 0


def test_embedded_session_resume_resends_unacknowledged_deliveries_with_dup() -> None:
    h = Harness()
    session, sink = _bare_session(h, "resender")
    h.publish("e/x", b"q1", qos=1)
    session.park()
    session.resume()
    assert [(d.payload, d.dup) for d in sink.deliveries] == [(b"q1", False), (b"q1", True)]
    assert sink.packet_ids[0] == sink.packet_ids[1]
    h.publish("e/y", b"q2", qos=2)
    session.ack(sink.packet_ids[0])
    session.received(sink.packet_ids[-1])
    session.park()
    session.resume()
    assert sink.pubrels == [sink.packet_ids[-1]]  # PUBREC seen: PUBREL resent, not the message


def test_embedded_session_close_publishes_the_will_only_when_asked() -> None:
    h = Harness()
    watcher = h.watch("will/#")
    session, _ = _bare_session(h, "closer")
    session.set_will(None)
    session.set_will(Will("will/closer", b"bye"))
    session.close(publish_will=False)
    session.close(publish_will=True)  # a second close does nothing
    assert watcher.deliveries == []
    other, _ = _bare_session(h, "loser")
    other.set_will(Will("will/loser", b"bye"))
    other.close(publish_will=True)
    assert watcher.messages() == [("will/loser", b"bye")]


# --- probes


def test_mqtt_client_taking_the_client_id_over_disconnects_the_device() -> None:
    h = Harness()
    watcher = h.watch("will/#")
    channel = h.connect(A, "shared-id", keepalive=30, will=("will/shared-id", b"kicked"))
    mqtt_sink = RecordingSink()
    h.broker.open_session(
        ClientInfo("shared-id"),
        clean_start=True,
        expiry=0,
        will=None,
        sink=mqtt_sink,
        max_inflight=10,
        now=h.clock.now(),
    )
    h.pump()
    assert h.take(A) == [codec.Disconnect()]
    assert watcher.messages() == [("will/shared-id", b"kicked")]
    assert "shared-id" not in h.gateway.by_client
    assert channel.session is None
    h.advance(100)  # its old timers do nothing
    assert h.take(A) == []
    assert h.broker.sessions["shared-id"].sink is mqtt_sink


def test_unacknowledged_delivery_before_sleeping_is_resent_with_dup_on_wake() -> None:
    h = Harness()
    h.connect(A, "dozer")
    topic_id = h.subscribe(A, "cmd/dozer", qos=1).topic_id
    h.publish("cmd/dozer", b"first", qos=1)
    first = only(h.take(A), codec.Publish)
    h.sleep(A, 600)
    resent = only(h.send(A, codec.Pingreq("dozer")), codec.Publish)
    assert (resent.msg_id, resent.dup, resent.data) == (first.msg_id, True, b"first")
    assert h.send(A, codec.Puback(topic_id, first.msg_id)) == [codec.Pingresp()]


def test_deliveries_on_short_and_predefined_topics_need_no_register() -> None:
    h = Harness(predefined={7: "pre/seven"})
    h.connect(A, "ids")
    h.send(A, codec.Subscribe(1, TopicIdType.SHORT, "ab", qos=0))
    suback = only(h.send(A, codec.Subscribe(2, TopicIdType.PREDEFINED, topic_id=7, qos=0)), codec.Suback)
    assert (suback.topic_id, suback.return_code) == (7, ReturnCode.ACCEPTED)
    h.publish("ab", b"short")
    h.publish("pre/seven", b"pre")
    out = publishes(h.take(A))
    assert [(p.topic_id_type, p.topic_id, p.data) for p in out] == [
        (TopicIdType.SHORT, codec.short_topic_id("ab"), b"short"),
        (TopicIdType.PREDEFINED, 7, b"pre"),
    ]


def test_abandoned_will_handshake_of_a_connected_client_ends_its_session_as_lost() -> None:
    h = Harness(idle_timeout=20.0)
    watcher = h.watch("will/#")
    h.connect(A, "again", will=("will/again", b"old"))
    assert h.send(A, codec.Connect("again", 0, True, True)) == [codec.WillTopicReq()]
    h.advance(20)
    assert "again" not in h.gateway.by_client
    assert "again" not in h.broker.sessions  # not left attached to a channel that is gone
    assert watcher.messages() == [("will/again", b"old")]


def test_disconnect_while_asleep_ends_the_session_without_the_will() -> None:
    h = Harness()
    watcher = h.watch("will/#")
    h.connect(A, "bedtime", will=("will/bedtime", b"x"))
    h.sleep(A, 10)
    assert h.send(A, codec.Disconnect()) == [codec.Disconnect()]
    h.advance(100)
    assert watcher.deliveries == []
    assert "bedtime" not in h.gateway.by_client
    assert h.gateway.metrics.clients_lost == 0


def test_a_new_sleep_duration_while_asleep_replaces_the_sleep_timer() -> None:
    h = Harness()
    h.connect(A, "resleep")
    h.sleep(A, 10)  # lost after 15 s
    h.advance(5)
    h.sleep(A, 100)  # now lost 110 s from here
    h.advance(105)
    assert state(h.gateway.by_client["resleep"]) is ChannelState.ASLEEP
    h.advance(5)
    assert "resleep" not in h.gateway.by_client


# --- wills, subscriptions and return codes


def test_will_topic_and_message_updates_change_the_published_will() -> None:
    h = Harness(keepalive_tolerance_short=1.0)
    watcher = h.watch("will/#")
    h.connect(A, "upd", keepalive=10, will=("will/old", b"old"))
    assert h.send(A, codec.WillTopicUpd("will/new", 0, False)) == [codec.WillTopicResp(ReturnCode.ACCEPTED)]
    assert h.send(A, codec.WillMsgUpd(b"new")) == [codec.WillMsgResp(ReturnCode.ACCEPTED)]
    assert h.send(A, codec.WillTopicUpd("bad/#")) == [codec.WillTopicResp(ReturnCode.NOT_SUPPORTED)]
    h.advance(10)
    assert watcher.messages() == [("will/new", b"new")]


def test_empty_will_topic_update_deletes_the_will() -> None:
    h = Harness()
    watcher = h.watch("will/#")
    h.connect(A, "nowill", keepalive=10, will=("will/nowill", b"x"))
    assert h.send(A, codec.WillTopicUpd(None)) == [codec.WillTopicResp(ReturnCode.ACCEPTED)]
    assert h.send(A, codec.WillMsgUpd(b"y")) == [codec.WillMsgResp(ReturnCode.NOT_SUPPORTED)]
    h.advance(15)
    assert "nowill" not in h.gateway.by_client
    assert watcher.deliveries == []


def test_empty_will_topic_in_the_handshake_connects_without_a_will() -> None:
    h = Harness()
    watcher = h.watch("will/#")
    assert h.send(A, codec.Connect("empty", 10, True, True)) == [codec.WillTopicReq()]
    assert h.send(A, codec.WillTopic(None)) == [codec.Connack(ReturnCode.ACCEPTED)]
    h.advance(15)
    assert "empty" not in h.gateway.by_client
    assert watcher.deliveries == []


def test_unsubscribe_stops_deliveries() -> None:
    h = Harness()
    h.connect(A, "unsub")
    h.subscribe(A, "u/x", qos=0)
    assert h.send(A, codec.Unsubscribe(9, TopicIdType.NORMAL, "u/x")) == [codec.Unsuback(9)]
    h.publish("u/x", b"gone")
    assert h.take(A) == []


@pytest.mark.parametrize(
    ("topic_id", "topic_id_type"),
    [(0, TopicIdType.NORMAL), (0xFFFF, TopicIdType.NORMAL), (3, TopicIdType.PREDEFINED)],
)
def test_publish_on_a_reserved_or_unknown_topic_id_gets_rc_invalid_topic_id(
    topic_id: int, topic_id_type: int
) -> None:
    h = Harness()
    h.connect(A, "ids")
    out = h.send(A, codec.Publish(topic_id, b"x", 1, 4, topic_id_type))
    assert out == [codec.Puback(topic_id, 4, ReturnCode.INVALID_TOPIC_ID)]


def test_subscribe_to_an_unknown_predefined_id_gets_rc_invalid_topic_id() -> None:
    h = Harness(predefined={1: "p/one"})
    h.connect(A, "pre")
    suback = only(h.send(A, codec.Subscribe(3, TopicIdType.PREDEFINED, topic_id=2, qos=1)), codec.Suback)
    assert (suback.msg_id, suback.return_code) == (3, ReturnCode.INVALID_TOPIC_ID)


def test_regack_congestion_sends_the_register_again_after_t_retry() -> None:
    h = Harness(t_retry=5.0)
    h.connect(A, "jam")
    h.subscribe(A, "j/#", qos=0)
    h.publish("j/1", b"x")
    register = only(h.take(A), codec.Register)
    h.advance(3)
    assert h.send(A, codec.Regack(register.topic_id, register.msg_id, ReturnCode.CONGESTION)) == []
    h.advance(4.9)
    assert h.take(A) == []
    h.advance(0.1)
    assert only(h.take(A), codec.Register) == register
    publish = only(h.send(A, codec.Regack(register.topic_id, register.msg_id)), codec.Publish)
    assert publish.data == b"x"
