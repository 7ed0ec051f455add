"""QoS 0/1/2, retained messages and wills over real sockets, with paho-mqtt (v3.1.1 and v5), the raw client
and the mosquitto command-line clients (MQTT 5.0 §3.1.2.5, §3.1.3.2, §3.3.1.3, §4.3)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from core.mqtt.codec import Disconnect, Properties, Pubcomp, Publish, Pubrec, Pubrel, WillSpec
from core.mqtt.numbers import ReasonCode
from tests.conftest import RunningBroker
from tests.integration.helpers import TIMEOUT, Clients, Will, paho_props, wait_for

VERSIONS = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])


@pytest.fixture
def clients(start_broker: Callable[..., RunningBroker]) -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


def _sessions(mqgate: RunningBroker) -> set[str]:
    return mqgate.call(lambda: set(mqgate.broker.sessions))


# --- QoS


@VERSIONS
def test_delivered_qos_is_the_minimum_of_publish_and_subscription_qos(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    sub = clients.paho(mqgate.port, "sub", version=version)
    assert sub.subscribe_many([("q/0", 0), ("q/1", 1), ("q/2", 2)]) == [0, 1, 2]
    pub = clients.paho(mqgate.port, "pub", version=version)
    for pub_qos in range(3):
        for sub_qos in range(3):
            payload = f"{pub_qos}{sub_qos}".encode()
            assert pub.publish(f"q/{sub_qos}", payload, pub_qos) == 0
            message = sub.expect()
            assert (message.topic, message.payload) == (f"q/{sub_qos}", payload)
            assert message.qos == min(pub_qos, sub_qos)
    sub.expect_none()


@VERSIONS
def test_qos2_messages_are_delivered_exactly_once(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    sub = clients.paho(mqgate.port, "sub", version=version)
    assert sub.subscribe("exact/#", 2) == 2
    pub = clients.paho(mqgate.port, "pub", version=version)
    for i in range(10):
        assert pub.publish(f"exact/{i}", str(i).encode(), 2) == 0
    received = sub.expect_many(10)
    expected = [(f"exact/{i}", str(i).encode(), 2) for i in range(10)]
    assert [(m.topic, m.payload, m.qos) for m in received] == expected
    sub.expect_none()


@VERSIONS
def test_resent_qos2_publish_before_pubrel_is_not_delivered_twice(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    sub = clients.paho(mqgate.port, "sub", version=version)
    sub.subscribe("once", 2)
    pub = clients.raw(mqgate.port, version=version)
    pub.connect("raw-pub")
    pub.publish("once", b"payload", 2, packet_id=7)
    assert pub.expect(Pubrec).packet_id == 7
    pub.publish("once", b"payload", 2, packet_id=7, dup=True)
    assert pub.expect(Pubrec).packet_id == 7
    pub.send(Pubrel(7))
    assert pub.expect(Pubcomp).packet_id == 7
    message = sub.expect()
    assert (message.topic, message.payload, message.qos) == ("once", b"payload", 2)
    sub.expect_none()


@VERSIONS
def test_qos2_delivery_to_a_raw_subscriber_follows_pubrec_pubrel_pubcomp(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    sub = clients.raw(mqgate.port, version=version)
    sub.connect("raw-sub")
    assert sub.subscribe("flow", 2).reason_codes == (2,)
    pub = clients.paho(mqgate.port, "pub", version=version)
    pub.publish("flow", b"x", 2)
    publish = sub.expect(Publish)
    assert (publish.topic, publish.payload, publish.qos, publish.dup) == ("flow", b"x", 2, False)
    sub.send(Pubrec(publish.packet_id))
    assert sub.expect(Pubrel).packet_id == publish.packet_id
    sub.send(Pubcomp(publish.packet_id))
    wait_for(lambda: not mqgate.call(lambda: mqgate.broker.sessions["raw-sub"].inflight))
    sub.expect_nothing()


# --- retained messages


@VERSIONS
def test_retained_message_is_delivered_on_subscribe_with_the_retain_flag(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    pub = clients.paho(mqgate.port, "pub", version=version)
    pub.publish("ret/a", b"first", 1, retain=True)
    pub.publish("ret/a", b"second", 1, retain=True)  # replaces the first
    assert mqgate.call(lambda: len(mqgate.broker.retained)) == 1
    sub = clients.paho(mqgate.port, "sub", version=version)
    sub.subscribe("ret/a", 1)
    message = sub.expect()
    assert (message.topic, message.payload, message.retain, message.qos) == ("ret/a", b"second", True, 1)
    sub.expect_none()


@VERSIONS
def test_retained_message_is_sent_at_the_lower_of_its_qos_and_the_subscription_qos(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    pub = clients.paho(mqgate.port, "pub", version=version)
    pub.publish("ret/q2", b"two", 2, retain=True)
    pub.publish("ret/q0", b"zero", 0, retain=True)
    wait_for(lambda: mqgate.call(lambda: len(mqgate.broker.retained)) == 2)
    sub = clients.paho(mqgate.port, "sub", version=version)
    sub.subscribe_many([("ret/q2", 1), ("ret/q0", 2)])
    got = {m.topic: (m.payload, m.qos, m.retain) for m in sub.expect_many(2)}
    assert got == {"ret/q2": (b"two", 1, True), "ret/q0": (b"zero", 0, True)}


@VERSIONS
def test_message_to_an_existing_subscription_is_sent_without_the_retain_flag(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    sub = clients.paho(mqgate.port, "sub", version=version)
    sub.subscribe("live/x", 1)
    pub = clients.paho(mqgate.port, "pub", version=version)
    pub.publish("live/x", b"now", 1, retain=True)
    message = sub.expect()
    assert (message.payload, message.retain) == (b"now", False)


@VERSIONS
def test_empty_retained_payload_deletes_the_retained_message(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    pub = clients.paho(mqgate.port, "pub", version=version)
    pub.publish("gone/t", b"kept", 1, retain=True)
    assert mqgate.call(lambda: len(mqgate.broker.retained)) == 1
    pub.publish("gone/t", b"", 1, retain=True)
    assert mqgate.call(lambda: len(mqgate.broker.retained)) == 0
    sub = clients.paho(mqgate.port, "sub", version=version)
    sub.subscribe("gone/#", 1)
    sub.expect_none()


@VERSIONS
def test_wildcard_subscription_receives_every_matching_retained_message(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    pub = clients.paho(mqgate.port, "pub", version=version)
    for topic in ("w/a/1", "w/b/1", "w/b/2", "w", "other/1", "w/a/1/deep"):
        pub.publish(topic, topic.encode(), 1, retain=True)
    sub = clients.paho(mqgate.port, "sub-plus", version=version)
    sub.subscribe("w/+/1", 0)
    assert sorted(m.topic for m in sub.expect_many(2)) == ["w/a/1", "w/b/1"]
    sub.expect_none()
    hash_sub = clients.paho(mqgate.port, "sub-hash", version=version)
    hash_sub.subscribe("w/#", 0)
    received = hash_sub.expect_many(5)
    assert sorted(m.topic for m in received) == ["w", "w/a/1", "w/a/1/deep", "w/b/1", "w/b/2"]
    assert all(m.retain for m in received)
    hash_sub.expect_none()


def test_leading_wildcard_does_not_receive_retained_dollar_topics(
    start_broker: Callable[..., RunningBroker], clients: Clients
) -> None:
    mqgate = start_broker(broker={"sys_interval": 3600})  # $SYS is published (retained) once at start
    wait_for(lambda: mqgate.call(lambda: len(mqgate.broker.retained)) > 0)
    pub = clients.paho(mqgate.port, "pub")
    pub.publish("plain", b"p", 1, retain=True)
    sub = clients.paho(mqgate.port, "sub")
    sub.subscribe("#", 0)
    assert sub.expect().topic == "plain"
    sub.expect_none()
    sys_sub = clients.paho(mqgate.port, "sys")
    sys_sub.subscribe("$SYS/#", 0)
    assert sys_sub.expect().topic.startswith("$SYS/brokers/")


@pytest.mark.parametrize("handling", [0, 1, 2])
def test_v5_retain_handling_decides_when_retained_messages_are_sent(
    mqgate: RunningBroker, clients: Clients, handling: int
) -> None:
    pub = clients.paho(mqgate.port, "pub")
    pub.publish("rh/t", b"retained", 1, retain=True)
    sub = clients.paho(mqgate.port, "sub")
    expected_first, expected_again = {0: (1, 1), 1: (1, 0), 2: (0, 0)}[handling]
    sub.subscribe("rh/t", 1, retain_handling=handling)
    received = [sub.expect() for _ in range(expected_first)]
    assert all((m.payload, m.retain) == (b"retained", True) for m in received)
    sub.expect_none()
    sub.subscribe("rh/t", 1, retain_handling=handling)  # the subscription exists now
    received = [sub.expect() for _ in range(expected_again)]
    assert all((m.payload, m.retain) == (b"retained", True) for m in received)
    sub.expect_none()


@pytest.mark.parametrize("as_published", [False, True])
def test_v5_retain_as_published_keeps_the_retain_flag_of_live_messages(
    mqgate: RunningBroker, clients: Clients, as_published: bool
) -> None:
    sub = clients.paho(mqgate.port, "sub")
    sub.subscribe("rap/t", 1, retain_as_published=as_published)
    pub = clients.paho(mqgate.port, "pub")
    pub.publish("rap/t", b"retained", 1, retain=True)
    pub.publish("rap/t", b"plain", 1, retain=False)
    first, second = sub.expect_many(2)
    assert (first.payload, first.retain) == (b"retained", as_published)
    assert (second.payload, second.retain) == (b"plain", False)


# --- mosquitto_pub / mosquitto_sub

needs_mosquitto = pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None,
    reason="mosquitto-clients not installed",
)
MOSQUITTO_VERSIONS = pytest.mark.parametrize("protocol", ["mqttv311", "mqttv5"])


def _mosquitto_pub(port: int, protocol: str, *args: str) -> None:
    result = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", protocol, *args],
        capture_output=True,
        timeout=TIMEOUT * 2,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()


def _sub_args(port: int, protocol: str) -> list[str]:
    return ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", protocol]


def _wait_subscribed(mqgate: RunningBroker, count: int = 1) -> None:
    wait_for(lambda: mqgate.call(mqgate.broker.subscription_count) >= count)


@needs_mosquitto
@MOSQUITTO_VERSIONS
def test_mosquitto_sub_receives_what_mosquitto_pub_publishes(
    mqgate: RunningBroker, clients: Clients, protocol: str
) -> None:
    sub = clients.popen(
        [*_sub_args(mqgate.port, protocol), "-t", "cli/#", "-q", "2", "-C", "3", "-W", "10", "-v"]
    )
    _wait_subscribed(mqgate)
    for qos in range(3):
        _mosquitto_pub(mqgate.port, protocol, "-t", f"cli/{qos}", "-m", f"hello {qos}", "-q", str(qos))
    out, err = sub.communicate(timeout=TIMEOUT * 2)
    assert sub.returncode == 0, err.decode()
    assert out.decode().splitlines() == ["cli/0 hello 0", "cli/1 hello 1", "cli/2 hello 2"]


@needs_mosquitto
@MOSQUITTO_VERSIONS
def test_mosquitto_sub_gets_a_retained_message_from_mosquitto_pub(
    mqgate: RunningBroker, clients: Clients, protocol: str
) -> None:
    _mosquitto_pub(mqgate.port, protocol, "-t", "cli/retained", "-m", "kept", "-q", "1", "-r")
    result = subprocess.run(
        [*_sub_args(mqgate.port, protocol), "-t", "cli/retained", "-C", "1", "-W", "10", "-F", "%r %t %p"],
        capture_output=True,
        timeout=TIMEOUT * 3,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().splitlines() == ["1 cli/retained kept"]


@needs_mosquitto
@MOSQUITTO_VERSIONS
def test_paho_and_mosquitto_clients_exchange_messages(
    mqgate: RunningBroker, clients: Clients, protocol: str
) -> None:
    version = 5 if protocol == "mqttv5" else 4
    paho_sub = clients.paho(mqgate.port, "paho-sub", version=version)
    paho_sub.subscribe("mix/to-paho", 1)
    _mosquitto_pub(mqgate.port, protocol, "-t", "mix/to-paho", "-m", "from mosquitto", "-q", "1")
    message = paho_sub.expect()
    assert (message.topic, message.payload, message.qos) == ("mix/to-paho", b"from mosquitto", 1)

    sub = clients.popen(
        [*_sub_args(mqgate.port, protocol), "-t", "mix/to-mosquitto", "-q", "1", "-C", "1", "-W", "10"]
    )
    _wait_subscribed(mqgate, 2)
    paho_pub = clients.paho(mqgate.port, "paho-pub", version=version)
    paho_pub.publish("mix/to-mosquitto", b"from paho", 1)
    out, err = sub.communicate(timeout=TIMEOUT * 2)
    assert sub.returncode == 0, err.decode()
    assert out.decode().splitlines() == ["from paho"]


@needs_mosquitto
def test_mosquitto_v5_user_properties_reach_a_mosquitto_v5_subscriber(
    mqgate: RunningBroker, clients: Clients
) -> None:
    sub = clients.popen(
        [*_sub_args(mqgate.port, "mqttv5"), "-t", "props/t", "-C", "1", "-W", "10", "-F", "%P %p"]
    )
    _wait_subscribed(mqgate)
    _mosquitto_pub(
        mqgate.port, "mqttv5", "-t", "props/t", "-m", "body", "-D", "publish", "user-property", "k", "v"
    )
    out, err = sub.communicate(timeout=TIMEOUT * 2)
    assert sub.returncode == 0, err.decode()
    assert out.decode().splitlines() == ["k:v body"]


# --- wills


@VERSIONS
def test_will_is_published_when_the_socket_closes_without_disconnect(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    watcher = clients.paho(mqgate.port, "watcher", version=version)
    watcher.subscribe("will/#", 1)
    raw = clients.raw(mqgate.port, version=version)
    raw.connect("dying", will=WillSpec("will/dying", b"gone", qos=1))
    raw.drop()
    message = watcher.expect()
    assert (message.topic, message.payload, message.qos) == ("will/dying", b"gone", 1)
    watcher.expect_none()


@VERSIONS
def test_retained_will_is_stored_as_the_retained_message(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    raw = clients.raw(mqgate.port, version=version)
    raw.connect("dying", will=WillSpec("will/status", b"offline", qos=1, retain=True))
    raw.drop()
    wait_for(lambda: mqgate.call(lambda: len(mqgate.broker.retained)) == 1)
    late = clients.paho(mqgate.port, "late", version=version)
    late.subscribe("will/status", 1)
    message = late.expect()
    assert (message.payload, message.retain) == (b"offline", True)


@VERSIONS
def test_will_is_published_on_keepalive_timeout(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    watcher = clients.paho(mqgate.port, "watcher", version=version)
    watcher.subscribe("will/#", 1)
    silent = clients.paho(
        mqgate.port, "silent", version=version, keepalive=1, will=Will("will/silent", b"timeout", 1)
    )
    silent.stop_loop()  # the socket stays open but no PINGREQ is sent any more
    message = watcher.expect(timeout=TIMEOUT)
    assert (message.topic, message.payload) == ("will/silent", b"timeout")
    assert mqgate.call(lambda: mqgate.broker.metrics.keepalive_timeouts) == 1


def test_v5_client_gets_disconnect_0x8d_on_keepalive_timeout(mqgate: RunningBroker, clients: Clients) -> None:
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("quiet", keepalive=1)
    packets = raw.expect_closed(timeout=TIMEOUT)
    assert [type(p) for p in packets] == [Disconnect]
    assert packets[0].reason_code == ReasonCode.KEEP_ALIVE_TIMEOUT  # type: ignore[union-attr]


@VERSIONS
def test_will_is_published_when_another_connection_takes_the_session_over(
    mqgate: RunningBroker, clients: Clients, version: int
) -> None:
    watcher = clients.paho(mqgate.port, "watcher", version=version)
    watcher.subscribe("will/#", 1)
    first = clients.raw(mqgate.port, version=version)
    first.connect("same-id", will=WillSpec("will/same-id", b"taken over", qos=1))
    second = clients.raw(mqgate.port, version=version)
    second.connect("same-id")
    message = watcher.expect()
    assert (message.topic, message.payload) == ("will/same-id", b"taken over")
    first.expect_closed()
    watcher.expect_none()


@VERSIONS
def test_no_will_after_a_normal_disconnect(mqgate: RunningBroker, clients: Clients, version: int) -> None:
    watcher = clients.paho(mqgate.port, "watcher", version=version)
    watcher.subscribe("will/#", 1)
    polite = clients.paho(mqgate.port, "polite", version=version, will=Will("will/polite", b"never", 1))
    polite.disconnect()
    wait_for(lambda: "polite" not in _sessions(mqgate))
    watcher.expect_none()
    assert mqgate.call(lambda: mqgate.broker.metrics.wills_published) == 0


def test_v5_disconnect_with_reason_0x04_publishes_the_will(mqgate: RunningBroker, clients: Clients) -> None:
    watcher = clients.paho(mqgate.port, "watcher")
    watcher.subscribe("will/#", 1)
    leaving = clients.paho(mqgate.port, "leaving", will=Will("will/leaving", b"asked for", 1))
    leaving.disconnect(reason_code=ReasonCode.DISCONNECT_WITH_WILL)
    message = watcher.expect()
    assert (message.topic, message.payload) == ("will/leaving", b"asked for")


def test_v5_will_properties_travel_with_the_will(mqgate: RunningBroker, clients: Clients) -> None:
    watcher = clients.paho(mqgate.port, "watcher")
    watcher.subscribe("will/#", 1)
    props = Properties(
        content_type="text/plain", user_properties=(("why", "crash"),), response_topic="reply/here"
    )
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("dying", will=WillSpec("will/props", b"bye", qos=1, properties=props))
    raw.drop()
    message = watcher.expect()
    assert message.payload == b"bye"
    assert message.properties.ContentType == "text/plain"
    assert message.properties.UserProperty == [("why", "crash")]
    assert message.properties.ResponseTopic == "reply/here"


def _will_with_delay(delay: int, expiry: int) -> tuple[WillSpec, Properties]:
    will = WillSpec("will/delayed", b"late", qos=1, properties=Properties(will_delay_interval=delay))
    return will, Properties(session_expiry_interval=expiry)


def test_v5_delayed_will_is_published_only_after_the_will_delay(
    mqgate: RunningBroker, clients: Clients
) -> None:
    watcher = clients.paho(mqgate.port, "watcher")
    watcher.subscribe("will/#", 1)
    will, props = _will_with_delay(1, 60)
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("delayed", will=will, properties=props)
    raw.drop()
    watcher.expect_none(timeout=0.8)  # not before the delay
    message = watcher.expect(timeout=TIMEOUT)
    assert (message.topic, message.payload) == ("will/delayed", b"late")
    assert "delayed" in _sessions(mqgate)  # the session outlives its will


def test_v5_delayed_will_is_not_published_when_the_client_reconnects_within_the_delay(
    mqgate: RunningBroker, clients: Clients
) -> None:
    watcher = clients.paho(mqgate.port, "watcher")
    watcher.subscribe("will/#", 1)
    will, props = _will_with_delay(30, 60)
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("delayed", will=will, properties=props)
    raw.drop()
    wait_for(lambda: mqgate.call(lambda: mqgate.broker.sessions["delayed"].sink is None))
    back = clients.raw(mqgate.port, version=5)
    assert back.connect("delayed", clean_start=False, properties=props).session_present
    mqgate.call(lambda: mqgate.broker.handle_timeouts(mqgate.loop.time() + 100))  # far past the delay
    watcher.expect_none()
    assert mqgate.call(lambda: mqgate.broker.metrics.wills_published) == 0


def test_v5_delayed_will_is_published_when_the_session_expires_first(
    mqgate: RunningBroker, clients: Clients
) -> None:
    watcher = clients.paho(mqgate.port, "watcher")
    watcher.subscribe("will/#", 1)
    will, props = _will_with_delay(300, 10)
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("delayed", will=will, properties=props)
    raw.drop()
    wait_for(lambda: mqgate.call(lambda: mqgate.broker.sessions["delayed"].sink is None))
    watcher.expect_none(timeout=0.1)
    mqgate.call(lambda: mqgate.broker.handle_timeouts(mqgate.loop.time() + 11))
    message = watcher.expect()
    assert (message.topic, message.payload) == ("will/delayed", b"late")
    assert "delayed" not in _sessions(mqgate)


def test_v5_delayed_will_is_published_at_once_when_the_session_ends_at_disconnect(
    mqgate: RunningBroker, clients: Clients
) -> None:
    watcher = clients.paho(mqgate.port, "watcher")
    watcher.subscribe("will/#", 1)
    will, props = _will_with_delay(300, 0)
    raw = clients.raw(mqgate.port, version=5)
    raw.connect("delayed", will=will, properties=props)
    raw.drop()
    message = watcher.expect()
    assert (message.topic, message.payload) == ("will/delayed", b"late")


def test_v5_delayed_will_is_published_when_a_clean_start_connection_takes_over(
    mqgate: RunningBroker, clients: Clients
) -> None:
    # §3.1.3.2: the will of the existing connection is sent unless the new one has Clean Start 0 and the
    # will delay is over zero; a clean start ends the session, and the will with it.
    watcher = clients.paho(mqgate.port, "watcher")
    watcher.subscribe("will/#", 1)
    will, props = _will_with_delay(300, 60)
    first = clients.raw(mqgate.port, version=5)
    first.connect("delayed", will=will, properties=props)
    second = clients.raw(mqgate.port, version=5)
    second.connect("delayed", clean_start=True)
    message = watcher.expect()
    assert (message.topic, message.payload) == ("will/delayed", b"late")


def test_v5_delayed_will_is_dropped_when_a_clean_start_0_connection_takes_over(
    mqgate: RunningBroker, clients: Clients
) -> None:
    watcher = clients.paho(mqgate.port, "watcher")
    watcher.subscribe("will/#", 1)
    will, props = _will_with_delay(300, 60)
    first = clients.raw(mqgate.port, version=5)
    first.connect("delayed", will=will, properties=props)
    second = clients.raw(mqgate.port, version=5)
    assert second.connect("delayed", clean_start=False, properties=props).session_present
    mqgate.call(lambda: mqgate.broker.handle_timeouts(mqgate.loop.time() + 1000))
    watcher.expect_none()
    packets = first.expect_closed()
    assert [(type(p), getattr(p, "reason_code", None)) for p in packets] == [
        (Disconnect, ReasonCode.SESSION_TAKEN_OVER)
    ]


def test_v5_no_delayed_will_after_a_normal_disconnect(mqgate: RunningBroker, clients: Clients) -> None:
    watcher = clients.paho(mqgate.port, "watcher")
    watcher.subscribe("will/#", 1)
    client = clients.paho(
        mqgate.port,
        "paho-delayed",
        clean_start=False,
        properties=paho_props("CONNECT", SessionExpiryInterval=60),
        will=Will("will/paho", b"delayed", 1, properties=paho_props("WILLMESSAGE", WillDelayInterval=1)),
    )
    client.close()  # paho's disconnect() sends DISCONNECT 0x00: no will at all
    wait_for(lambda: mqgate.call(lambda: mqgate.broker.sessions["paho-delayed"].sink is None))
    mqgate.call(lambda: mqgate.broker.handle_timeouts(mqgate.loop.time() + 10))
    watcher.expect_none()
