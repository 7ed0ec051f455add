"""The live CoAP gateway over real UDP (issue 4, "Behaviour"): libcoap's ``coap-client-notls``, an aiocoap
client and a raw codec client drive it; paho-mqtt checks what the broker sees.

EMQX 4.3 style ``/mqtt/{topic}?c=`` publish, observe, unobserve and retained read; EMQX 5.x style connections
with tokens, heartbeats and ``/ps/{topic}``; ``connection_required``; NON, CON and QoS-driven notifications
with RST and give-up cancelling the observation, and at most one CON notification outstanding per observation;
duplicate CON requests; one session per client id; content
formats carried as MQTT 5 content types; block-wise transfer both ways bounded by ``max_body_size``;
``/.well-known/core``.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.contentformat import ContentFormat as AioContentFormat

from gateways.coap import codec
from gateways.coap.numbers import Code, ContentFormat, Timing
from tests.integration.coap_helpers import (
    ACK,
    CON,
    HOST,
    NON,
    RST,
    AioCoap,
    CoapClients,
    RawCoap,
    aio_code,
    aio_fixture,  # noqa: F401  (the "aio" fixture)
    coap_client,
    coap_fixture,  # noqa: F401  (the "coap" fixture)
    coap_gateway,
    coap_port,
    coap_uri,
    code_of,
    endpoint_metric,
    gateway_counter,
    observe_seq,
)
from tests.integration.helpers import TIMEOUT, Clients, paho_props, wait_for

JSON = int(ContentFormat.JSON)


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


def subscriptions(mqgate: Any, client_id: str) -> set[str]:
    """The topic filters of ``client_id``'s broker session (empty when it has none or no session)."""

    def read() -> set[str]:
        session = mqgate.broker.sessions.get(client_id)
        return set() if session is None else set(session.subscriptions)

    result: set[str] = mqgate.call(read)
    return result


def has_session(mqgate: Any, client_id: str) -> bool:
    result: bool = mqgate.call(lambda: client_id in mqgate.broker.sessions)
    return result


def connect(mqgate: Any, client_id: str, **query: str) -> str:
    """POST /mqtt/connection (EMQX 5.x) with coap-client; returns the token."""
    result = coap_client(coap_uri(mqgate, "mqtt/connection", {"clientid": client_id, **query}), "post")
    assert result.code == "2.01", result.stdout
    token = result.body.decode()
    assert token
    return token


# --- EMQX 4.3 style: publish


def test_coap_client_put_and_post_publish_unchanged_payload_with_qos_by_message_type(
    mqgate: Any, clients: Clients
) -> None:
    mqtt = clients.paho(mqgate.port, "watcher", version=5)
    assert mqtt.subscribe("pub/#", 2) == 2
    payload = bytes(range(256))
    cases = [
        ("put", [], "pub/con/put", 1),
        ("post", [], "pub/con/post", 1),
        ("put", ["-N"], "pub/non/put", 0),
        ("post", ["-N"], "pub/non/post", 0),
    ]
    for method, args, topic, qos in cases:
        result = coap_client(coap_uri(mqgate, f"mqtt/{topic}", {"c": "dev1"}), method, *args, payload=payload)
        assert result.code == "2.04", (method, args, result.stdout)
        response = result.responses[-1]
        assert response.mtype == ("NON" if args else "ACK")
        message = mqtt.expect()
        assert (message.topic, message.payload, message.qos, message.retain) == (topic, payload, qos, False)


def test_qos_query_overrides_the_message_type(mqgate: Any, clients: Clients) -> None:
    mqtt = clients.paho(mqgate.port, "watcher", version=5)
    assert mqtt.subscribe("q/#", 2) == 2
    for args, qos in ((["-N"], "2"), ([], "2"), ([], "0"), (["-N"], "1")):
        uri = coap_uri(mqgate, "mqtt/q/x", {"c": "dev1", "qos": qos})
        assert coap_client(uri, "put", *args, payload=b"v").code == "2.04"
        assert mqtt.expect().qos == int(qos)


def test_aiocoap_put_and_post_publish_with_qos_by_message_type(
    mqgate: Any, clients: Clients, aio: AioCoap
) -> None:
    mqtt = clients.paho(mqgate.port, "watcher", version=4)
    assert mqtt.subscribe("aio/#", 2) == 2
    for method, confirmable, qos in (
        (aiocoap.PUT, True, 1),
        (aiocoap.POST, True, 1),
        (aiocoap.PUT, False, 0),
        (aiocoap.POST, False, 0),
    ):
        payload = f"{method} {confirmable}".encode()
        uri = coap_uri(mqgate, "mqtt/aio/t", {"c": "aio1"})
        response = aio.request(method, uri, payload, confirmable=confirmable)
        assert aio_code(response) == "2.04"
        message = mqtt.expect()
        assert (message.topic, message.payload, message.qos) == ("aio/t", payload, qos)


def test_retain_true_stores_a_retained_message_that_get_reads_back(
    mqgate: Any, clients: Clients, aio: AioCoap
) -> None:
    uri = coap_uri(mqgate, "mqtt/state/lamp", {"c": "dev1", "retain": "true"})
    assert coap_client(uri, "put", payload=b"on").code == "2.04"
    late = clients.paho(mqgate.port, "late", version=5)
    assert late.subscribe("state/lamp", 1) == 1
    message = late.expect()
    assert (message.payload, message.retain) == (b"on", True)

    read = coap_client(coap_uri(mqgate, "mqtt/state/lamp", {"c": "reader"}))
    assert (read.code, read.body) == ("2.05", b"on")
    response = aio.request(aiocoap.GET, coap_uri(mqgate, "mqtt/state/lamp", {"c": "aio-reader"}))
    assert (aio_code(response), response.payload) == ("2.05", b"on")


def test_get_without_observe_on_a_topic_without_retained_message_is_4_04(
    mqgate: Any, clients: Clients, aio: AioCoap
) -> None:
    mqtt = clients.paho(mqgate.port, "pub", version=5)
    mqtt.publish("plain/t", b"not retained", 1)
    assert coap_client(coap_uri(mqgate, "mqtt/plain/t", {"c": "reader"})).code == "4.04"
    response = aio.request(aiocoap.GET, coap_uri(mqgate, "mqtt/nothing/here", {"c": "aio-reader"}))
    assert aio_code(response) == "4.04"


# --- EMQX 4.3 style: observe


def test_coap_client_observe_with_encoded_wildcard_gets_every_message_with_increasing_sequence(
    mqgate: Any, clients: Clients, coap: CoapClients
) -> None:
    observer = coap.observer(coap_uri(mqgate, "mqtt/room/%2B/temp", {"c": "obs1"}))
    observer.established()
    assert subscriptions(mqgate, "obs1") == {"room/+/temp"}
    mqtt = clients.paho(mqgate.port, "pub", version=5)
    sent = [(f"room/{i}/temp", f"{20 + i}C") for i in range(4)]
    for topic, text in sent:
        mqtt.publish(topic, text.encode(), 1)
    mqtt.publish("room/1/humidity", b"ignored", 1)
    notifications = [observer.expect() for _ in sent]
    assert [n.code for n in notifications] == ["2.05"] * len(sent)
    assert [n.text for n in notifications] == [text for _, text in sent]
    sequence = [n.observe for n in notifications]
    assert all(isinstance(s, int) for s in sequence)
    assert sequence == sorted(sequence) and len(set(sequence)) == len(sequence)
    observer.expect_none()


def test_aiocoap_observe_with_encoded_multilevel_wildcard(
    mqgate: Any, clients: Clients, aio: AioCoap
) -> None:
    observation = aio.observe(coap_uri(mqgate, "mqtt/farm/%23", {"c": "aio-obs"}))
    assert aio_code(observation.first) == "2.05"
    assert observation.first.opt.observe is not None
    assert subscriptions(mqgate, "aio-obs") == {"farm/#"}
    mqtt = clients.paho(mqgate.port, "pub", version=4)
    for i, topic in enumerate(("farm/a", "farm/b/c", "farm/d/e/f")):
        mqtt.publish(topic, b"m%d" % i, 0)
    received = [observation.expect() for _ in range(3)]
    assert [m.payload for m in received] == [b"m0", b"m1", b"m2"]
    sequence = [m.opt.observe for m in received]
    assert sequence == sorted(sequence) and len(set(sequence)) == 3


def test_raw_percent_encoded_uri_path_is_decoded_into_wildcards(mqgate: Any, coap: CoapClients) -> None:
    raw = coap.raw(mqgate)
    plus = raw.request(Code.GET, ["mqtt", "a", "%2B", "b"], {"c": "pct"}, observe=0)
    hash_ = raw.request(Code.GET, ["mqtt", "x", "%23"], {"c": "pct"}, observe=0)
    assert (code_of(plus), code_of(hash_)) == ("2.05", "2.05")
    assert subscriptions(mqgate, "pct") == {"a/+/b", "x/#"}


def test_observe_1_unsubscribes_and_notifications_stop(
    mqgate: Any, clients: Clients, coap: CoapClients
) -> None:
    raw = coap.raw(mqgate)
    token = raw.new_token()
    first = raw.request(Code.GET, "mqtt/stop/me", {"c": "unobs"}, observe=0, token=token)
    assert code_of(first) == "2.05" and observe_seq(first) == 0
    mqtt = clients.paho(mqgate.port, "pub", version=5)
    mqtt.publish("stop/me", b"one", 0)
    notification = raw.notification(token)
    assert (notification.mtype, notification.payload) == (NON, b"one")
    assert observe_seq(notification) > 0

    done = raw.request(Code.GET, "mqtt/stop/me", {"c": "unobs"}, observe=1, token=token)
    assert code_of(done) == "2.05"
    assert subscriptions(mqgate, "unobs") == set()
    mqtt.publish("stop/me", b"two", 0)
    raw.expect_nothing(match=lambda m: m.token == token)


def test_coap_client_deregisters_with_observe_1_when_its_observation_ends(
    mqgate: Any, coap: CoapClients
) -> None:
    observer = coap.observer(coap_uri(mqgate, "mqtt/brief", {"c": "brief"}), duration=1)
    observer.established()
    assert subscriptions(mqgate, "brief") == {"brief"}
    assert observer.process.wait(10) == 0
    wait_for(lambda: subscriptions(mqgate, "brief") == set())


# --- EMQX 5.x style: connections


def test_connection_post_heartbeat_publish_observe_and_delete(
    mqgate: Any, clients: Clients, aio: AioCoap
) -> None:
    token = connect(mqgate, "conn1", username="user", password="secret")
    auth = {"clientid": "conn1", "token": token}
    assert coap_client(coap_uri(mqgate, "mqtt/connection", auth), "put").code == "2.04"

    mqtt = clients.paho(mqgate.port, "watcher", version=5)
    assert mqtt.subscribe("ps/#", 1) == 1
    published = coap_client(coap_uri(mqgate, "ps/ps/up", auth), "post", payload=b"up!")
    assert published.code == "2.04"
    message = mqtt.expect()
    assert (message.topic, message.payload, message.qos) == ("ps/up", b"up!", 1)

    observation = aio.observe(coap_uri(mqgate, "ps/down/%2B", auth))
    assert aio_code(observation.first) == "2.05"
    assert subscriptions(mqgate, "conn1") == {"down/+"}
    mqtt.publish("down/cmd", b"reboot", 1)
    assert observation.expect().payload == b"reboot"

    assert coap_client(coap_uri(mqgate, "mqtt/connection", auth), "delete").code == "2.02"
    final = observation.expect()
    assert aio_code(final).startswith("4.") and final.opt.observe is None
    wait_for(lambda: not has_session(mqgate, "conn1"))
    assert coap_client(coap_uri(mqgate, "mqtt/connection", auth), "put").code == "4.01"
    assert coap_client(coap_uri(mqgate, "ps/ps/up", auth), "post", payload=b"x").code == "4.01"


def test_ps_put_is_not_a_publish(mqgate: Any) -> None:
    token = connect(mqgate, "conn2")
    uri = coap_uri(mqgate, "ps/t", {"clientid": "conn2", "token": token})
    assert coap_client(uri, "put", payload=b"x").code == "4.05"


def test_short_aliases_are_accepted_in_connection_mode(mqgate: Any, clients: Clients) -> None:
    token = connect(mqgate, "short", u="user", p="pw")
    mqtt = clients.paho(mqgate.port, "watcher", version=5)
    assert mqtt.subscribe("alias/#", 2) == 2
    uri = coap_uri(mqgate, "ps/alias/t", {"c": "short", "t": token, "q": "2", "r": "true"})
    assert coap_client(uri, "post", payload=b"aliased").code == "2.04"
    message = mqtt.expect()
    assert (message.topic, message.payload, message.qos) == ("alias/t", b"aliased", 2)
    late = clients.paho(mqgate.port, "late", version=5)
    assert late.subscribe("alias/t", 0) == 0
    assert (late.expect().retain, late.messages.qsize()) == (True, 0)
    heartbeat = coap_client(coap_uri(mqgate, "mqtt/connection", {"c": "short", "t": token}), "put")
    assert heartbeat.code == "2.04"


def test_new_connection_from_another_peer_with_the_same_client_id_replaces_the_old_one(
    mqgate: Any, coap: CoapClients
) -> None:
    old = coap.raw(mqgate)
    created = old.request(Code.POST, "mqtt/connection", {"clientid": "moved"})
    assert code_of(created) == "2.01"
    old_auth = {"clientid": "moved", "token": created.payload.decode()}
    token = old.new_token()
    assert code_of(old.request(Code.GET, "ps/moved/t", old_auth, observe=0, token=token)) == "2.05"

    new = coap.raw(mqgate)
    recreated = new.request(Code.POST, "mqtt/connection", {"clientid": "moved"})
    assert code_of(recreated) == "2.01"
    final = old.notification(token)
    assert code_of(final).startswith("4.") and final.observe() is None
    assert code_of(old.request(Code.PUT, "mqtt/connection", old_auth)) == "4.01"
    new_auth = {"clientid": "moved", "token": recreated.payload.decode()}
    assert code_of(new.request(Code.PUT, "mqtt/connection", new_auth)) == "2.04"
    assert subscriptions(mqgate, "moved") == set()


def test_connection_without_heartbeat_is_closed_after_one_and_a_half_heartbeats(
    start_broker: Any, coap: CoapClients
) -> None:
    mqgate = start_broker(gateways={"coap": {"heartbeat": 1}})
    token = connect(mqgate, "silent")
    auth = {"clientid": "silent", "token": token}
    raw = coap.raw(mqgate)
    observe_token = raw.new_token()
    first = raw.request(Code.GET, "ps/quiet", auth, observe=0, token=observe_token)
    last_seen = time.monotonic()
    assert code_of(first) == "2.05"
    assert has_session(mqgate, "silent")
    final = raw.notification(observe_token, timeout=5)
    assert code_of(final).startswith("4.")
    assert time.monotonic() - last_seen >= 1.4  # closed after 1.5 heartbeats (a sweep each half), not before
    wait_for(lambda: not has_session(mqgate, "silent"))
    assert coap_client(coap_uri(mqgate, "mqtt/connection", auth), "put").code == "4.01"


def test_heartbeats_keep_a_connection_open(start_broker: Any, coap: CoapClients) -> None:
    mqgate = start_broker(gateways={"coap": {"heartbeat": 1}})
    token = connect(mqgate, "beating")
    raw = coap.raw(mqgate)
    gateway = coap_gateway(mqgate)

    def next_sweep() -> float:
        return mqgate.call(lambda: gateway._next_sweep)

    # The gateway sweeps every half heartbeat; a heartbeat after each sweep outlives 1.5 heartbeats.
    for _ in range(4):
        swept = next_sweep()
        heartbeat = raw.request(Code.PUT, "mqtt/connection", {"clientid": "beating", "token": token})
        assert code_of(heartbeat) == "2.04"
        wait_for(lambda swept=swept: next_sweep() > swept)
    assert has_session(mqgate, "beating")


def test_connection_required_refuses_connectionless_requests(start_broker: Any, clients: Clients) -> None:
    mqgate = start_broker(gateways={"coap": {"connection_required": True}})
    mqtt = clients.paho(mqgate.port, "watcher", version=5)
    assert mqtt.subscribe("req/#", 1) == 1
    assert coap_client(coap_uri(mqgate, "mqtt/req/t", {"c": "nocon"}), "put", payload=b"x").code == "4.01"
    assert coap_client(coap_uri(mqgate, "mqtt/req/t", {"c": "nocon"}), "get", "-s", "1").code == "4.01"
    assert not has_session(mqgate, "nocon")
    token = connect(mqgate, "withcon")
    uri = coap_uri(mqgate, "mqtt/req/t", {"c": "withcon", "t": token})
    assert coap_client(uri, "put", payload=b"ok").code == "2.04"
    assert mqtt.expect().payload == b"ok"
    mqtt.expect_none()


# --- notifications: NON, CON, QoS-driven; RST and give-up cancel


def observe_raw(raw: RawCoap, mqgate: Any, topic: str, client_id: str, **query: str) -> bytes:
    token = raw.new_token()
    first = raw.request(Code.GET, f"mqtt/{topic}", {"c": client_id, **query}, observe=0, token=token)
    assert code_of(first) == "2.05", first
    assert subscriptions(mqgate, client_id) == {topic}
    return token


@pytest.mark.parametrize(
    ("notify_type", "qos_types"),
    [("non", {0: NON, 1: NON, 2: NON}), ("con", {0: CON, 1: CON, 2: CON}), ("qos", {0: NON, 1: CON, 2: CON})],
)
def test_notify_type_decides_the_notification_message_type(
    start_broker: Any, clients: Clients, coap: CoapClients, notify_type: str, qos_types: dict[int, int]
) -> None:
    mqgate = start_broker(gateways={"coap": {"notify_type": notify_type}})
    raw = coap.raw(mqgate)
    token = observe_raw(raw, mqgate, "nt/t", "nt", qos="2")  # deliveries keep the publisher's QoS
    mqtt = clients.paho(mqgate.port, "pub", version=5)
    for qos, mtype in qos_types.items():
        mqtt.publish("nt/t", b"q%d" % qos, qos)
        notification = raw.notification(token)
        assert (notification.mtype, notification.payload) == (mtype, b"q%d" % qos)
        if notification.mtype == CON:
            raw.ack(notification)
    # every QoS 1/2 delivery was acknowledged to the broker: by the gateway for NON, by our ACK for CON
    wait_for(lambda: mqgate.call(lambda: len(mqgate.broker.sessions["nt"].inflight)) == 0)


def test_rst_to_a_con_notification_cancels_the_observation_and_unsubscribes(
    start_broker: Any, clients: Clients, coap: CoapClients
) -> None:
    mqgate = start_broker(gateways={"coap": {"notify_type": "con"}})
    raw = coap.raw(mqgate)
    token = observe_raw(raw, mqgate, "rst/t", "rst")
    mqtt = clients.paho(mqgate.port, "pub", version=5)
    mqtt.publish("rst/t", b"first", 0)
    notification = raw.notification(token)
    assert notification.mtype == CON
    raw.rst(notification)
    wait_for(lambda: subscriptions(mqgate, "rst") == set())
    assert gateway_counter(mqgate, "observations_cancelled") == 1
    mqtt.publish("rst/t", b"second", 0)
    raw.expect_nothing(match=lambda m: m.token == token)


def test_unacknowledged_con_notification_is_retransmitted_then_cancels_the_observation(
    start_broker: Any, clients: Clients, coap: CoapClients
) -> None:
    mqgate = start_broker(gateways={"coap": {"notify_type": "con"}})
    gateway = coap_gateway(mqgate)

    def fast() -> None:
        gateway.endpoint.timing = Timing(ack_timeout=0.2, max_retransmit=1)

    mqgate.call(fast)
    raw = coap.raw(mqgate)
    token = observe_raw(raw, mqgate, "lost/t", "lost")
    mqtt = clients.paho(mqgate.port, "pub", version=5)
    mqtt.publish("lost/t", b"hello?", 1)
    first = raw.notification(token)
    again = raw.notification(token)
    assert first.mtype == CON
    assert (again.mid, again.payload, again.token) == (first.mid, first.payload, first.token)
    wait_for(lambda: subscriptions(mqgate, "lost") == set())
    assert endpoint_metric(mqgate, "retransmissions") == 1
    assert endpoint_metric(mqgate, "gave_up") == 1
    mqtt.publish("lost/t", b"anyone?", 1)
    raw.expect_nothing(match=lambda m: m.token == token)


class ConWatch:
    """A UDP relay between a CoAP client and the gateway that counts, per token, the CON messages the gateway
    sent and the client has not yet acknowledged or reset, keeping the highest count seen in ``most``."""

    def __init__(self, gateway_port: int) -> None:
        self.gateway = (HOST, gateway_port)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the client's side
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the gateway's side
        self.front.bind((HOST, 0))
        self.back.bind((HOST, 0))
        self.port: int = self.front.getsockname()[1]
        self.most: dict[bytes, int] = {}
        self._client: tuple[str, int] | None = None
        self._outstanding: dict[int, bytes] = {}  # message id -> token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._relay, name="con-watch", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.front, selectors.EVENT_READ)
            selector.register(self.back, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(0.05):
                    if key.fileobj is self.front:
                        data, self._client = self.front.recvfrom(65536)
                        message = codec.decode(data)
                        if message.mtype in (ACK, RST):
                            self._outstanding.pop(message.mid, None)
                        self.back.sendto(data, self.gateway)
                    else:
                        data, _ = self.back.recvfrom(65536)
                        message = codec.decode(data)
                        if message.mtype == CON:
                            self._outstanding[message.mid] = message.token
                            count = sum(t == message.token for t in self._outstanding.values())
                            self.most[message.token] = max(count, self.most.get(message.token, 0))
                        if self._client is not None:
                            self.front.sendto(data, self._client)

    def __enter__(self) -> ConWatch:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.front.close()
        self.back.close()


def test_con_notifications_to_a_fast_qos0_publisher_go_one_at_a_time_and_end_with_the_latest(
    start_broker: Any, clients: Clients, aio: AioCoap
) -> None:
    mqgate = start_broker(gateways={"coap": {"notify_type": "con"}})
    count = 500
    last = b"%d" % (count - 1)
    with ConWatch(coap_port(mqgate)) as watch:
        observation = aio.observe(f"coap://{HOST}:{watch.port}/mqtt/burst/t?c=burst")
        assert aio_code(observation.first) == "2.05"
        mqtt = clients.paho(mqgate.port, "pub", version=5)
        for i in range(count):
            mqtt.publish("burst/t", b"%d" % i, 0, wait=False)
        payloads = [observation.expect().payload]
        while payloads[-1] != last:
            payloads.append(observation.expect().payload)
    assert list(watch.most.values()) == [1]  # RFC 7252 §4.7 NSTART 1, RFC 7641 §4.5.1
    assert payloads == sorted(payloads, key=int)
    sent = gateway_counter(mqgate, "notifications")
    superseded = gateway_counter(mqgate, "notifications_superseded")
    assert sent == len(payloads)
    assert sent + superseded == count and superseded > 0


def test_duplicate_con_request_gets_the_cached_response_and_publishes_once(
    mqgate: Any, clients: Clients, coap: CoapClients
) -> None:
    mqtt = clients.paho(mqgate.port, "watcher", version=5)
    assert mqtt.subscribe("dup/t", 1) == 1
    raw = coap.raw(mqgate)
    request = raw.build(Code.PUT, "mqtt/dup/t", {"c": "dup"}, b"once")
    first = raw.exchange(request)
    second = raw.exchange(request)
    assert code_of(first) == "2.04"
    assert codec.encode(second) == codec.encode(first)
    assert mqtt.expect().payload == b"once"
    mqtt.expect_none()
    assert endpoint_metric(mqgate, "duplicates") == 1


# --- one client id, one session


def test_second_coap_client_with_the_same_client_id_takes_over_and_ends_the_first_observation(
    mqgate: Any, clients: Clients, coap: CoapClients
) -> None:
    observer = coap.observer(coap_uri(mqgate, "mqtt/shared/t", {"c": "same"}))
    observer.established()
    other = coap.raw(mqgate)
    assert code_of(other.request(Code.PUT, "mqtt/other/t", {"c": "same"}, b"mine now")) == "2.04"
    final = observer.expect()
    assert final.code.startswith("4."), final
    assert subscriptions(mqgate, "same") == set()
    mqtt = clients.paho(mqgate.port, "pub", version=5)
    mqtt.publish("shared/t", b"to nobody", 1)
    observer.expect_none()


def test_raw_observer_gets_a_final_4_xx_notification_when_another_coap_client_takes_over(
    mqgate: Any, coap: CoapClients
) -> None:
    first = coap.raw(mqgate)
    token = observe_raw(first, mqgate, "takeover/raw", "same-raw")
    second = coap.raw(mqgate)
    assert code_of(second.request(Code.GET, "mqtt/takeover/other", {"c": "same-raw"}, observe=0)) == "2.05"
    final = first.notification(token)
    assert code_of(final).startswith("4.")
    assert final.observe() is None
    assert subscriptions(mqgate, "same-raw") == {"takeover/other"}


def test_mqtt_client_with_the_same_client_id_takes_over_and_the_coap_observer_is_told(
    mqgate: Any, clients: Clients, aio: AioCoap, coap: CoapClients
) -> None:
    raw = coap.raw(mqgate)
    token = observe_raw(raw, mqgate, "kick/raw", "kicked")
    clients.paho(mqgate.port, "kicked", version=5)
    final = raw.notification(token)
    assert code_of(final).startswith("4.") and final.observe() is None
    assert subscriptions(mqgate, "kicked") == set()
    mqtt = clients.paho(mqgate.port, "pub", version=5)
    mqtt.publish("kick/raw", b"after", 1)
    raw.expect_nothing(match=lambda m: m.token == token)

    observation = aio.observe(coap_uri(mqgate, "mqtt/kick/aio", {"c": "kicked-aio"}))
    assert aio_code(observation.first) == "2.05"
    clients.paho(mqgate.port, "kicked-aio", version=4)
    final = observation.expect()
    assert aio_code(final).startswith("4.") and final.opt.observe is None
    assert isinstance(observation.expect_error(), aiocoap.error.ObservationCancelled)


# --- content format


def test_content_format_becomes_the_mqtt_5_content_type_and_comes_back_on_notifications(
    mqgate: Any, clients: Clients, aio: AioCoap, coap: CoapClients
) -> None:
    mqtt = clients.paho(mqgate.port, "watcher", version=5)
    assert mqtt.subscribe("ct/#", 1) == 1
    raw = coap.raw(mqgate)
    token = observe_raw(raw, mqgate, "ct/json", "ct-obs")

    body = b'{"t": 21.5}'
    uri = coap_uri(mqgate, "mqtt/ct/json", {"c": "ct-pub"})
    assert aio_code(aio.request(aiocoap.PUT, uri, body, content_format=AioContentFormat.JSON)) == "2.04"
    message = mqtt.expect()
    assert message.payload == body
    assert message.properties.ContentType == "application/json"
    notification = raw.notification(token)
    assert (notification.payload, notification.content_format()) == (body, JSON)
    raw.ack(notification)

    text = coap_client(coap_uri(mqgate, "mqtt/ct/json", {"c": "ct-cli"}), "put", "-t", "0", payload=b"plain")
    assert text.code == "2.04"
    assert mqtt.expect().properties.ContentType == "text/plain;charset=utf-8"
    notification = raw.notification(token)
    assert (notification.payload, notification.content_format()) == (b"plain", 0)
    raw.ack(notification)

    mqtt.publish("ct/json", b"[1]", 1, properties=paho_props("PUBLISH", ContentType="application/json"))
    assert mqtt.expect().payload == b"[1]"
    notification = raw.notification(token)
    assert (notification.payload, notification.content_format()) == (b"[1]", JSON)
    raw.ack(notification)

    mqtt.publish("ct/json", b"?", 1)
    assert mqtt.expect().payload == b"?"
    notification = raw.notification(token)
    assert (notification.payload, notification.content_format()) == (b"?", None)


# --- block-wise transfer


def big_payload(size: int = 3000) -> bytes:
    return bytes((i * 7 + i // 256) & 0xFF for i in range(size))


def test_block1_put_of_3000_bytes_arrives_whole_on_mqtt(mqgate: Any, clients: Clients, aio: AioCoap) -> None:
    mqtt = clients.paho(mqgate.port, "watcher", version=5)
    assert mqtt.subscribe("blk/#", 1) == 1
    payload = big_payload()
    before = endpoint_metric(mqgate, "datagrams_in")
    result = coap_client(coap_uri(mqgate, "mqtt/blk/cli", {"c": "blk"}), "put", "-b", "64", payload=payload)
    assert result.code == "2.04", result.stdout
    assert result.pdus[0].option("Block1") == "0/M/64"
    assert endpoint_metric(mqgate, "datagrams_in") - before == -(-len(payload) // 64)
    message = mqtt.expect()
    assert (message.topic, message.payload) == ("blk/cli", payload)
    mqtt.expect_none()

    response = aio.request(aiocoap.PUT, coap_uri(mqgate, "mqtt/blk/aio", {"c": "blk-aio"}), payload)
    assert aio_code(response) == "2.04"
    message = mqtt.expect()
    assert (message.topic, message.payload) == ("blk/aio", payload)


def test_retained_message_of_3000_bytes_is_read_with_block2(
    mqgate: Any, clients: Clients, aio: AioCoap
) -> None:
    payload = big_payload()
    mqtt = clients.paho(mqgate.port, "pub", version=5)
    mqtt.publish("blk/retained", payload, 1, retain=True)
    uri = coap_uri(mqgate, "mqtt/blk/retained", {"c": "reader"})
    before = endpoint_metric(mqgate, "datagrams_in")
    result = coap_client(uri)
    assert result.code == "2.05"
    assert result.responses[0].option("Block2") == "0/M/1024"
    assert result.body == payload
    assert endpoint_metric(mqgate, "datagrams_in") - before == -(-len(payload) // 1024)

    response = aio.request(aiocoap.GET, coap_uri(mqgate, "mqtt/blk/retained", {"c": "aio-reader"}))
    assert (aio_code(response), response.payload) == ("2.05", payload)

    before = endpoint_metric(mqgate, "datagrams_in")
    small = coap_client(uri, "get", "-b", "64")
    assert (small.code, small.body) == ("2.05", payload)
    assert endpoint_metric(mqgate, "datagrams_in") - before == -(-len(payload) // 64)


def test_body_over_max_body_size_gets_4_13(start_broker: Any, clients: Clients, aio: AioCoap) -> None:
    mqgate = start_broker(gateways={"coap": {"max_body_size": 1024}})
    mqtt = clients.paho(mqgate.port, "watcher", version=5)
    assert mqtt.subscribe("big/#", 1) == 1
    uri = coap_uri(mqgate, "mqtt/big/t", {"c": "big"})
    assert coap_client(uri, "put", "-b", "64", payload=big_payload(2000)).code == "4.13"
    assert coap_client(uri, "put", payload=big_payload(1025)).code == "4.13"
    assert aio_code(aio.request(aiocoap.PUT, uri, big_payload(3000))) == "4.13"
    mqtt.expect_none()
    assert coap_client(uri, "put", "-b", "64", payload=big_payload(1024)).code == "2.04"
    assert mqtt.expect().payload == big_payload(1024)


# --- discovery


def test_well_known_core_lists_the_resources_in_link_format(mqgate: Any, aio: AioCoap) -> None:
    result = coap_client(coap_uri(mqgate, ".well-known/core"))
    assert result.code == "2.05"
    assert result.responses[-1].option("Content-Format") == "application/link-format"
    response = aio.request(aiocoap.GET, coap_uri(mqgate, ".well-known/core"))
    assert response.opt.content_format == AioContentFormat.LINKFORMAT
    links = {link.split(";")[0] for link in response.payload.decode().split(",")}
    assert links >= {"</mqtt>", "</ps>", "</mqtt/connection>"}
    assert result.body == response.payload


def test_observing_a_topic_with_a_retained_message_gets_it_and_stays_registered(
    mqgate: Any, clients: Clients, aio: AioCoap, coap: CoapClients
) -> None:
    mqtt = clients.paho(mqgate.port, "pub", version=5)
    mqtt.publish("kept/t", b"retained", 1, retain=True)

    observer = coap.observer(coap_uri(mqgate, "mqtt/kept/t", {"c": "kept-cli"}))
    # the registration response carries the current value: the retained message (RFC 7641 §4.1)
    registration = observer.expect()
    assert (registration.code, registration.text) == ("2.05", "retained")
    assert registration.observe is not None

    observation = aio.observe(coap_uri(mqgate, "mqtt/kept/t", {"c": "kept-aio"}))
    assert observation.first.payload == b"retained"

    mqtt.publish("kept/t", b"live", 1)
    live = observer.expect()
    assert (live.text, live.code) == ("live", "2.05")
    assert live.observe is not None and live.observe > registration.observe
    assert observation.expect().payload == b"live"
    assert subscriptions(mqgate, "kept-cli") == subscriptions(mqgate, "kept-aio") == {"kept/t"}
