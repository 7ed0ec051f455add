"""Shared subscriptions, $SYS topics and bad input, over real sockets against a running mqgate.

Clients are paho-mqtt 2.x (v3.1.1 and v5) and a raw-socket client built on the project's codec for what
paho cannot do (never acknowledge, send malformed bytes, read the broker's DISCONNECT before the close).
"""

from __future__ import annotations

import itertools
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.mqtt.codec import (
    Connect,
    Disconnect,
    Packet,
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
    Unsubscribe,
    encode,
    encode_varint,
)
from core.mqtt.numbers import ReasonCode
from tests.conftest import RunningBroker
from tests.integration.helpers import TIMEOUT, Clients, PahoClient, RawClient

StartBroker = Callable[..., RunningBroker]


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


def read_until_closed(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Every byte the broker sends until it closes the connection; fails if it stays open."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"connection still open after {timeout} s; received {bytes(data)!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


# --- shared subscriptions


class Group:
    """Members of a shared subscription, each also subscribed to an ordinary sentinel topic.

    Deliveries to one connection keep their order, and the sentinel is published (QoS 1, like the shared
    messages) after everything else: once every member has seen it, nothing is still on its way, so
    "exactly one member received each message" can be checked without waiting for silence.
    """

    def __init__(
        self, clients: Clients, port: int, shared_filter: str, count: int = 3, *, version: int = 5
    ) -> None:
        self.port = port
        self.members: dict[str, PahoClient] = {}
        self.sentinel = "sentinel/" + re.sub(r"[^a-z0-9]", "_", shared_filter)
        for i in range(count):
            client = clients.paho(port, f"member-{i}", version=version)
            assert client.subscribe(shared_filter, 1) == 1
            assert client.subscribe(self.sentinel, 1) == 1
            self.members[f"member-{i}"] = client
        self.received: dict[str, list[tuple[str, bytes]]] = {name: [] for name in self.members}

    def collect(self, publisher: PahoClient) -> dict[str, list[tuple[str, bytes]]]:
        """Publish the sentinel and return what each member received before it (since the last call)."""
        assert publisher.publish(self.sentinel, b"end", 1) == 0
        got: dict[str, list[tuple[str, bytes]]] = {}
        for name, client in self.members.items():
            got[name] = []
            while True:
                message = client.expect()
                if message.topic == self.sentinel:
                    break
                got[name].append((message.topic, message.payload))
            self.received[name].extend(got[name])
        return got

    def who_got(self, got: dict[str, list[tuple[str, bytes]]]) -> dict[bytes, list[str]]:
        """payload -> the members that received it."""
        by_payload: dict[bytes, list[str]] = {}
        for name, messages in got.items():
            for _, payload in messages:
                by_payload.setdefault(payload, []).append(name)
        return by_payload


def publish_numbered(publisher: PahoClient, topic: str, count: int, prefix: str = "") -> list[bytes]:
    payloads = [f"{prefix}{i}".encode() for i in range(count)]
    for payload in payloads:
        assert publisher.publish(topic, payload, 1) == 0
    return payloads


def assert_each_to_exactly_one(
    group: Group, got: dict[str, list[tuple[str, bytes]]], payloads: list[bytes]
) -> None:
    who = group.who_got(got)
    assert sorted(who) == sorted(payloads)
    assert all(len(members) == 1 for members in who.values()), who


@pytest.mark.parametrize(
    ("shared_filter", "topic"), [("$share/g/jobs/+", "jobs/a"), ("$queue/jobs/+", "jobs/b")]
)
@pytest.mark.parametrize("version", [4, 5])
def test_shared_subscription_delivers_each_message_to_exactly_one_member(
    mqgate: RunningBroker, clients: Clients, shared_filter: str, topic: str, version: int
) -> None:
    group = Group(clients, mqgate.port, shared_filter, version=version)
    publisher = clients.paho(mqgate.port, "publisher", version=version)
    payloads = publish_numbered(publisher, topic, 30)
    got = group.collect(publisher)
    assert_each_to_exactly_one(group, got, payloads)
    assert sum(1 for messages in got.values() if messages) >= 2  # random: 30 messages, 3 members


def test_shared_round_robin_delivers_in_rotation(start_broker: StartBroker, clients: Clients) -> None:
    broker = start_broker(broker={"shared_subscription_strategy": "round_robin"})
    group = Group(clients, broker.port, "$share/g/rr")
    publisher = clients.paho(broker.port, "publisher")
    payloads = publish_numbered(publisher, "rr", 12)
    got = group.collect(publisher)
    assert_each_to_exactly_one(group, got, payloads)
    order = [group.who_got(got)[p][0] for p in payloads]
    assert len(set(order[:3])) == 3, order
    assert all(order[i] == order[i + 3] for i in range(len(order) - 3)), order


def test_shared_sticky_sends_everything_to_one_member_while_it_is_connected(
    start_broker: StartBroker, clients: Clients
) -> None:
    broker = start_broker(broker={"shared_subscription_strategy": "sticky"})
    group = Group(clients, broker.port, "$share/g/st")
    publisher = clients.paho(broker.port, "publisher")
    payloads = publish_numbered(publisher, "st", 10, "a")
    got = group.collect(publisher)
    assert_each_to_exactly_one(group, got, payloads)
    (chosen,) = [name for name, messages in got.items() if messages]
    group.members.pop(chosen).disconnect()
    payloads = publish_numbered(publisher, "st", 10, "b")
    got = group.collect(publisher)
    assert_each_to_exactly_one(group, got, payloads)
    assert sorted(len(messages) for messages in got.values()) == [0, 10]


def test_shared_hash_clientid_sends_one_publishers_messages_to_one_member(
    start_broker: StartBroker, clients: Clients
) -> None:
    broker = start_broker(broker={"shared_subscription_strategy": "hash_clientid"})
    group = Group(clients, broker.port, "$share/g/hc")
    publishers = [clients.paho(broker.port, f"pub-{i}") for i in range(4)]
    payloads: list[bytes] = []
    for round_ in range(3):
        for i, publisher in enumerate(publishers):
            payloads += publish_numbered(publisher, "hc", 2, f"pub-{i}:{round_}:")
    got = group.collect(publishers[0])
    assert_each_to_exactly_one(group, got, payloads)
    members_of: dict[str, set[str]] = {}
    for payload, (member,) in group.who_got(got).items():
        members_of.setdefault(payload.split(b":")[0].decode(), set()).add(member)
    assert len(members_of) == 4
    assert all(len(members) == 1 for members in members_of.values()), members_of
    assert len(set().union(*members_of.values())) > 1


def test_shared_hash_topic_sends_one_topic_to_one_member_and_spreads_topics(
    start_broker: StartBroker, clients: Clients
) -> None:
    broker = start_broker(broker={"shared_subscription_strategy": "hash_topic"})
    group = Group(clients, broker.port, "$share/g/ht/+")
    publisher = clients.paho(broker.port, "publisher")
    payloads: list[bytes] = []
    for round_ in range(3):
        for i in range(10):
            payloads += publish_numbered(publisher, f"ht/{i}", 1, f"{round_}:{i}:")
    got = group.collect(publisher)
    assert_each_to_exactly_one(group, got, payloads)
    members_of: dict[str, set[str]] = {}
    for name, messages in got.items():
        for topic, _ in messages:
            members_of.setdefault(topic, set()).add(name)
    assert len(members_of) == 10
    assert all(len(members) == 1 for members in members_of.values()), members_of
    assert len(set().union(*members_of.values())) > 1


@pytest.mark.parametrize("shared_filter", ["$share/g/redo", "$queue/redo"])
def test_unacked_shared_qos1_message_is_redelivered_to_another_member_when_its_member_drops(
    mqgate: RunningBroker, clients: Clients, shared_filter: str
) -> None:
    silent = clients.raw(mqgate.port, version=5)
    silent.connect("silent-member")
    assert silent.subscribe(shared_filter, 1).reason_codes == (1,)
    publisher = clients.paho(mqgate.port, "publisher")
    assert publisher.publish("redo", b"must-arrive", 1) == 0
    first = silent.expect(Publish)  # the only member gets it and never sends PUBACK
    assert (first.topic, first.payload, first.qos) == ("redo", b"must-arrive", 1)
    other = clients.paho(mqgate.port, "other-member")
    assert other.subscribe(shared_filter, 1) == 1
    silent.drop()
    message = other.expect()
    assert (message.topic, message.payload, message.qos) == ("redo", b"must-arrive", 1)
    assert publisher.publish("redo", b"next", 1) == 0
    assert other.expect().payload == b"next"  # delivered once: the next message follows directly


def test_shared_and_ordinary_subscriptions_on_one_topic_both_receive(
    mqgate: RunningBroker, clients: Clients
) -> None:
    group = Group(clients, mqgate.port, "$share/g/both", count=2)
    plain = clients.paho(mqgate.port, "plain", version=4)
    assert plain.subscribe("both", 1) == 1
    publisher = clients.paho(mqgate.port, "publisher")
    payloads = publish_numbered(publisher, "both", 8)
    got = group.collect(publisher)
    assert_each_to_exactly_one(group, got, payloads)
    assert [m.payload for m in plain.expect_many(8)] == payloads


# --- $SYS

_SYS = re.compile(r"^\$SYS/brokers/[^/]+/(.+)$")


def test_sys_topics_report_version_uptime_clients_subscriptions_and_counters(
    start_broker: StartBroker, clients: Clients
) -> None:
    broker = start_broker(broker={"sys_interval": 1})
    watcher = clients.paho(broker.port, "sys-watcher", version=4)
    assert watcher.subscribe("$SYS/#", 0) == 0
    values: dict[str, str] = {}
    deadline = time.monotonic() + TIMEOUT
    while True:  # the retained copies first, then a whole publication by the periodic tick
        assert time.monotonic() < deadline, f"no live $SYS publication; got {values}"
        message = watcher.expect()
        match = _SYS.match(message.topic)
        assert match, message.topic
        if not message.retain:
            values[match.group(1)] = message.payload.decode()
            if match.group(1) == "packets/sent":  # the last one of a publication
                break
    assert values["version"].startswith("mqgate ")
    assert int(values["uptime"]) >= 0
    assert int(values["clients/connected"]) >= 1
    assert int(values["subscriptions/count"]) >= 1
    for counter in ("messages/received", "messages/sent", "bytes/received", "bytes/sent"):
        assert int(values[counter]) >= 0
    assert int(values["bytes/received"]) > 0


def test_publish_sys_reflects_traffic(mqgate: RunningBroker, clients: Clients) -> None:
    watcher = clients.paho(mqgate.port, "sys-watcher")
    assert watcher.subscribe("$SYS/#", 0) == 0
    publisher = clients.paho(mqgate.port, "publisher", version=4)
    assert publisher.subscribe("traffic", 0) == 0
    for _ in range(3):
        publisher.publish("traffic", b"12345678", 1)
    publisher.expect_many(3)

    def snapshot_and_publish() -> tuple[int, int]:
        broker = mqgate.broker
        connected = sum(1 for session in broker.sessions.values() if session.sink is not None)
        expected = (connected, broker.subscription_count())
        broker.publish_sys(mqgate.loop.time())
        return expected

    connected, subscriptions = mqgate.call(snapshot_and_publish)
    assert connected >= 2
    assert subscriptions >= 2
    values: dict[str, str] = {}
    while "packets/sent" not in values:
        message = watcher.expect()
        match = _SYS.match(message.topic)
        assert match
        values[match.group(1)] = message.payload.decode()
    assert int(values["clients/connected"]) == connected
    assert int(values["subscriptions/count"]) == subscriptions
    assert int(values["messages/received"]) >= 3
    assert int(values["messages/sent"]) >= 3
    assert int(values["bytes/received"]) > 3 * 8


def test_hash_and_leading_plus_do_not_match_sys_topics(mqgate: RunningBroker, clients: Clients) -> None:
    everything = clients.paho(mqgate.port, "everything")
    assert everything.subscribe("#", 0) == 0
    assert everything.subscribe("+/brokers/#", 0) == 0
    mqgate.call(lambda: mqgate.broker.publish_sys(mqgate.loop.time()))
    publisher = clients.paho(mqgate.port, "publisher")
    publisher.publish("after/sys", b"x", 1)
    assert everything.expect().topic == "after/sys"  # the $SYS messages came first and were not delivered


@pytest.mark.parametrize("version", [4, 5])
def test_client_cannot_publish_into_sys(mqgate: RunningBroker, clients: Clients, version: int) -> None:
    watcher = clients.paho(mqgate.port, "sys-watcher")
    assert watcher.subscribe("$SYS/#", 0) == 0
    assert watcher.subscribe("sentinel", 0) == 0
    raw = clients.raw(mqgate.port, version=version)
    raw.connect("intruder")
    pid = raw.publish("$SYS/brokers/fake/uptime", b"999", 1, retain=True)
    ack = raw.expect(Puback)
    assert ack.packet_id == pid
    assert ack.reason_code == (ReasonCode.NOT_AUTHORIZED if version == 5 else 0)
    raw.publish("sentinel", b"end", 0)
    assert watcher.expect().topic == "sentinel"
    assert mqgate.call(lambda: mqgate.broker.retained.get("$SYS/brokers/fake/uptime")) is None


# --- bad input


class Bystander:
    """A client connected before the bad input; it must keep receiving afterwards."""

    def __init__(self, clients: Clients, port: int) -> None:
        self.subscriber = clients.paho(port, "bystander-sub", version=5)
        assert self.subscriber.subscribe("watch/#", 1) == 1
        self.publisher = clients.paho(port, "bystander-pub", version=4)
        self._n = 0

    def check(self) -> None:
        self._n += 1
        payload = f"still-here-{self._n}".encode()
        assert self.publisher.publish("watch/x", payload, 1) == 0
        assert self.subscriber.expect().payload == payload


@pytest.fixture
def bystander(mqgate: RunningBroker, clients: Clients) -> Bystander:
    return Bystander(clients, mqgate.port)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="mqgate")
    return caplog


def counters(broker: RunningBroker) -> dict[str, int]:
    return broker.call(broker.broker.metrics.as_dict)


def one_warning(logs: pytest.LogCaptureFixture, who: str, cause: str) -> str:
    """The single warning naming ``who`` (client id or peer address); it must contain ``cause``."""
    lines = [
        r.getMessage()
        for r in logs.records
        if r.name.startswith("mqgate") and r.levelno >= logging.WARNING and who in r.getMessage()
    ]
    assert len(lines) == 1, lines
    assert cause in lines[0], lines[0]
    return lines[0]


def peer_of(raw: RawClient) -> str:
    host, port = raw.sock.getsockname()[:2]
    return f"{host}:{port}"


def close_reason(packets: list[Packet]) -> int | None:
    """The reason code of the DISCONNECT before the close (None: closed without one)."""
    if not packets:
        return None
    (packet,) = packets
    assert isinstance(packet, Disconnect), packets
    return packet.reason_code


VIOLATIONS: dict[str, tuple[Callable[[RawClient], None], int, str, str]] = {
    # name: (send the bad input, v5 reason code, log text, counter)
    "second_connect": (
        lambda raw: raw.send(Connect("again", raw.version)),
        ReasonCode.PROTOCOL_ERROR,
        "second CONNECT",
        "protocol_errors",
    ),
    "invalid_utf8_topic": (
        lambda raw: raw.send_bytes(
            b"\x30"
            + bytes([6 + (raw.version == 5)])
            + b"\x00\x02\xff\xfe"
            + b"\x00" * (raw.version == 5)
            + b"pl"
        ),
        ReasonCode.MALFORMED_PACKET,
        "invalid UTF-8",
        "malformed_packets",
    ),
    "plus_in_publish_topic": (
        lambda raw: raw.publish("a/+/b", b"x"),
        ReasonCode.TOPIC_NAME_INVALID,
        "invalid topic name",
        "protocol_errors",
    ),
    "hash_in_publish_topic": (
        lambda raw: raw.publish("a/#", b"x", 1),
        ReasonCode.TOPIC_NAME_INVALID,
        "invalid topic name",
        "protocol_errors",
    ),
    "qos3_publish": (
        lambda raw: raw.send_bytes(b"\x36\x05\x00\x01t\x00\x01"),
        ReasonCode.MALFORMED_PACKET,
        "QoS 3",
        "malformed_packets",
    ),
    "subscribe_with_bad_flags": (
        lambda raw: raw.send_bytes(b"\x80\x06\x00\x01\x00\x01t\x00"),
        ReasonCode.MALFORMED_PACKET,
        "flags",
        "malformed_packets",
    ),
}


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_protocol_violation_closes_only_the_offender_with_its_reason_code(
    mqgate: RunningBroker,
    clients: Clients,
    bystander: Bystander,
    logs: pytest.LogCaptureFixture,
    case: str,
    version: int,
) -> None:
    send, code, cause, counter = VIOLATIONS[case]
    client_id = f"offender-{case}-v{version}"
    raw = clients.raw(mqgate.port, version=version)
    raw.connect(client_id)
    before = counters(mqgate)
    send(raw)
    packets = raw.expect_closed()
    assert close_reason(packets) == (code if version == 5 else None)
    line = one_warning(logs, client_id, cause)
    assert f"0x{code:02x}" in line
    assert counters(mqgate)[counter] == before[counter] + 1
    bystander.check()


@pytest.mark.parametrize("version", [4, 5])
def test_publish_before_connect_closes_without_connack(
    mqgate: RunningBroker,
    clients: Clients,
    bystander: Bystander,
    logs: pytest.LogCaptureFixture,
    version: int,
) -> None:
    raw = clients.raw(mqgate.port, version=version)
    before = counters(mqgate)
    raw.send(Publish("watch/x", b"sneaky"))
    assert read_until_closed(raw.sock) == b""
    one_warning(logs, peer_of(raw), "did not start with CONNECT")
    after = counters(mqgate)
    assert after["protocol_errors"] + after["malformed_packets"] == (
        before["protocol_errors"] + before["malformed_packets"] + 1
    )
    bystander.check()  # and the sneaky message was not routed: the next one is the bystander's own


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G\x02ab",
        b"\x00\x00",
        b"\xff" * 16,
        b"\x16\x03\x01\x02\x00\x01",
    ],
)
def test_garbage_as_the_first_packet_closes_without_a_reply(
    mqgate: RunningBroker,
    clients: Clients,
    bystander: Bystander,
    logs: pytest.LogCaptureFixture,
    garbage: bytes,
) -> None:
    raw = clients.raw(mqgate.port, version=4)
    before = counters(mqgate)
    raw.send_bytes(garbage)
    assert read_until_closed(raw.sock, timeout=1.0) == b""  # at once, not at the CONNECT timeout
    one_warning(logs, peer_of(raw), "closing")
    assert counters(mqgate)["malformed_packets"] == before["malformed_packets"] + 1
    bystander.check()


def test_unknown_protocol_level_gets_a_v3_connack_refusal(
    mqgate: RunningBroker, clients: Clients, bystander: Bystander, logs: pytest.LogCaptureFixture
) -> None:
    raw = clients.raw(mqgate.port, version=4)
    raw.send_bytes(encode(Connect("future-client", protocol_version=6)))
    assert read_until_closed(raw.sock) == b"\x20\x02\x00\x01"  # CONNACK, return code 1
    one_warning(logs, peer_of(raw), "level 6")
    bystander.check()


@pytest.mark.parametrize("version", [4, 5])
def test_remaining_length_over_max_packet_size_closes_with_0x95(
    start_broker: StartBroker, clients: Clients, logs: pytest.LogCaptureFixture, version: int
) -> None:
    broker = start_broker(broker={"max_packet_size": 1024})
    watcher = Bystander(clients, broker.port)
    raw = clients.raw(broker.port, version=version)
    connack = raw.connect("too-big")
    if version == 5:
        assert connack.properties.maximum_packet_size == 1024
    before = counters(broker)
    raw.send_bytes(b"\x30" + encode_varint(4096))  # the header alone is enough to refuse it
    packets = raw.expect_closed()
    assert close_reason(packets) == (ReasonCode.PACKET_TOO_LARGE if version == 5 else None)
    one_warning(logs, "too-big", "over the maximum 1024")
    assert counters(broker)["malformed_packets"] == before["malformed_packets"] + 1
    watcher.check()


def test_packet_of_exactly_max_packet_size_is_accepted(start_broker: StartBroker, clients: Clients) -> None:
    broker = start_broker(broker={"max_packet_size": 1024})
    sub = clients.raw(broker.port, version=4)
    sub.connect("sub")
    sub.subscribe("big", 0)
    raw = clients.raw(broker.port, version=4)
    raw.connect("fits")
    payload = b"x" * 1016  # 1 + 2 (remaining length 1021) + 2 + 3 ("big") + 1016 = 1024 bytes
    data = encode(Publish("big", payload))
    assert len(data) == 1024
    raw.send_bytes(data)
    assert sub.expect(Publish).payload == payload


def test_qos2_packet_id_in_use_without_dup_is_answered_with_pubrec_0x91_and_not_delivered_twice(
    mqgate: RunningBroker, clients: Clients
) -> None:
    sub = clients.paho(mqgate.port, "q2-sub")
    assert sub.subscribe("q2/#", 2) == 2
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("q2-pub")
    raw.publish("q2/a", b"first", 2, packet_id=7)
    assert raw.expect(Pubrec) == Pubrec(7)
    raw.publish("q2/a", b"reuse", 2, packet_id=7)
    assert raw.expect(Pubrec) == Pubrec(7, ReasonCode.PACKET_IDENTIFIER_IN_USE)
    raw.publish("q2/a", b"first", 2, packet_id=7, dup=True)  # a genuine resend is acknowledged again
    assert raw.expect(Pubrec) == Pubrec(7)
    raw.send(Pubrel(7))
    assert raw.expect(Pubcomp) == Pubcomp(7)
    raw.publish("q2/a", b"after", 2, packet_id=7)  # the id is free again
    assert raw.expect(Pubrec) == Pubrec(7)
    raw.send(Pubrel(7))
    assert raw.expect(Pubcomp) == Pubcomp(7)
    assert [m.payload for m in sub.expect_many(2)] == [b"first", b"after"]
    sub.expect_none(0.2)


def test_v311_qos2_resend_is_acknowledged_and_not_delivered_twice(
    mqgate: RunningBroker, clients: Clients
) -> None:
    sub = clients.paho(mqgate.port, "q2-sub", version=4)
    assert sub.subscribe("q2/#", 1) == 1  # paho hands QoS 2 over at PUBREL: the QoS 0 sentinel could pass it
    raw = clients.raw(mqgate.port, version=4)
    raw.connect("q2-pub")
    raw.publish("q2/a", b"once", 2, packet_id=9)
    raw.expect(Pubrec)
    raw.publish("q2/a", b"once", 2, packet_id=9)
    assert raw.expect(Pubrec).packet_id == 9
    raw.send(Pubrel(9))
    raw.expect(Pubcomp)
    raw.publish("q2/a", b"sentinel", 0)
    assert [m.payload for m in sub.expect_many(2)] == [b"once", b"sentinel"]


def test_unknown_topic_alias_is_a_protocol_error(
    mqgate: RunningBroker, clients: Clients, bystander: Bystander, logs: pytest.LogCaptureFixture
) -> None:
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("alias-user")
    raw.publish("", b"x", 0, properties=Properties(topic_alias=3))
    assert close_reason(raw.expect_closed()) == ReasonCode.PROTOCOL_ERROR
    one_warning(logs, "alias-user", "unknown topic alias 3")
    bystander.check()


def test_topic_alias_over_the_maximum_is_0x94(start_broker: StartBroker, clients: Clients) -> None:
    broker = start_broker(broker={"max_topic_alias": 2})
    raw = clients.raw(broker.port, version=5)
    assert raw.connect("alias-user").properties.topic_alias_maximum == 2
    raw.publish("t", b"x", 0, properties=Properties(topic_alias=5))
    assert close_reason(raw.expect_closed()) == ReasonCode.TOPIC_ALIAS_INVALID


def test_known_topic_alias_is_resolved(mqgate: RunningBroker, clients: Clients) -> None:
    sub = clients.paho(mqgate.port, "alias-sub", version=4)
    assert sub.subscribe("aliased/topic", 0) == 0
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("alias-user")
    raw.publish("aliased/topic", b"1", 0, properties=Properties(topic_alias=1))
    raw.publish("", b"2", 0, properties=Properties(topic_alias=1))
    assert [(m.topic, m.payload) for m in sub.expect_many(2)] == [
        ("aliased/topic", b"1"),
        ("aliased/topic", b"2"),
    ]


@pytest.mark.parametrize(("version", "refused"), [(5, ReasonCode.TOPIC_FILTER_INVALID), (4, 0x80)])
def test_subscribe_with_an_invalid_filter_is_refused_in_suback_and_the_connection_stays_open(
    mqgate: RunningBroker, clients: Clients, version: int, refused: int
) -> None:
    raw = clients.raw(mqgate.port, version=version)
    raw.connect("picky")
    filters = ("ok/#", "bad/#/x", "bad+", "$share/g", "also/+/ok")
    raw.send(Subscribe(77, tuple(SubscriptionRequest(f, 1) for f in filters)))
    assert raw.expect(Suback) == Suback(77, (1, refused, refused, refused, 1))
    raw.send(Pingreq())
    assert raw.expect(Pingresp) == Pingresp()
    raw.publish("also/x/ok", b"works", 0)
    assert raw.expect(Publish).payload == b"works"


def test_v5_second_connect_disconnect_bytes_on_the_wire(mqgate: RunningBroker, clients: Clients) -> None:
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("wire", properties=Properties(request_problem_information=0))
    raw.send(Connect("wire", 5))
    assert read_until_closed(raw.sock) == b"\xe0\x02\x82\x00"  # DISCONNECT 0x82, no properties


# --- hypothesis: random and mutated input on live connections

_FUZZ_IDS = itertools.count()


class Healthy:
    """A connection that must keep working while fuzzed connections come and go."""

    def __init__(self, clients: Clients, port: int) -> None:
        self.raw = clients.raw(port, version=4)
        self.raw.connect("healthy-client", keepalive=0)
        self.raw.subscribe("health/#", 0)
        self._n = 0

    def check(self) -> None:
        self._n += 1
        self.raw.send(Pingreq())
        assert self.raw.expect(Pingresp) == Pingresp()
        payload = f"ok-{self._n}".encode()
        self.raw.publish("health/ping", payload, 0)
        assert self.raw.expect(Publish).payload == payload


@pytest.fixture
def healthy(mqgate: RunningBroker, clients: Clients) -> Healthy:
    """Created once per test function, so shared by all the examples hypothesis runs in it."""
    return Healthy(clients, mqgate.port)


def send_and_expect_close(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh socket, end our side, and require the broker to close within the timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the broker may already have closed on the first bad byte
            return b""
        return read_until_closed(sock)


_TOPICS = st.text(alphabet="ab/+#$", max_size=8)
_PIDS = st.integers(min_value=1, max_value=65535)
_PROPS = st.builds(
    Properties,
    topic_alias=st.none() | st.integers(min_value=1, max_value=4),
    message_expiry_interval=st.none() | st.integers(min_value=0, max_value=10),
    user_properties=st.lists(st.tuples(st.text(max_size=3), st.text(max_size=3)), max_size=2).map(tuple),
)


@st.composite
def _publish(draw: st.DrawFn) -> Publish:
    qos = draw(st.integers(0, 2))
    return Publish(
        draw(_TOPICS),
        draw(st.binary(max_size=16)),
        qos,
        draw(st.booleans()),
        qos > 0 and draw(st.booleans()),
        draw(_PIDS) if qos else 0,
        draw(_PROPS),
    )


_PACKETS = st.one_of(
    _publish(),
    st.builds(
        Subscribe,
        _PIDS,
        st.lists(st.builds(SubscriptionRequest, _TOPICS, st.integers(0, 2)), min_size=1, max_size=3).map(
            tuple
        ),
    ),
    st.builds(Unsubscribe, _PIDS, st.lists(_TOPICS, min_size=1, max_size=2).map(tuple)),
    st.builds(Puback, _PIDS),
    st.builds(Pubrec, _PIDS),
    st.builds(Pubrel, _PIDS),
    st.builds(Pubcomp, _PIDS),
    st.just(Pingreq()),
    st.builds(Disconnect, st.sampled_from([0, 4, 0x80])),
    st.builds(Connect, st.text(alphabet="xyz", max_size=4), st.just(4)),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=300))
def test_random_bytes_on_a_fresh_connection_never_harm_the_broker(
    mqgate: RunningBroker, healthy: Healthy, data: bytes
) -> None:
    send_and_expect_close(mqgate.port, data)
    healthy.check()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    version=st.sampled_from([4, 5]),
    packets=st.lists(_PACKETS, max_size=6),
    mutations=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4),
    cut=st.none() | st.integers(min_value=0),
)
def test_valid_connect_then_mutated_packets_never_harm_the_broker(
    mqgate: RunningBroker,
    healthy: Healthy,
    version: int,
    packets: list[Packet],
    mutations: list[tuple[int, int]],
    cut: int | None,
) -> None:
    connect = encode(Connect(f"fuzz-{next(_FUZZ_IDS)}", version), version)
    body = bytearray(b"".join(encode(p, version) for p in packets))
    for position, value in mutations:
        if body:
            body[position % len(body)] = value
    if cut is not None and body:
        del body[cut % len(body) :]
    send_and_expect_close(mqgate.port, connect + bytes(body))
    healthy.check()


def test_no_session_is_left_behind_by_bad_input(mqgate: RunningBroker) -> None:
    def state() -> dict[str, Any]:
        return {"sessions": sorted(mqgate.broker.sessions), "subs": mqgate.broker.subscription_count()}

    before = mqgate.call(state)
    for data in (b"\x10\xff\xff\xff\xff\x01", b"\x30\x02\x00", b"\xe0\x00", b"\x82\x00"):
        send_and_expect_close(mqgate.port, data)
    connect = encode(Connect("left-behind?", 5), 5)
    send_and_expect_close(
        mqgate.port, connect + encode(Subscribe(1, (SubscriptionRequest("x/#"),)), 5) + b"\x00"
    )
    assert mqgate.call(state) == before
