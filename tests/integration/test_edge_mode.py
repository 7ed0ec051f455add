"""Gateway-only edge mode against a real mosquitto (issue 7, "Behaviour", "Bad input", "Done when").

mqgate runs with ``upstream.url`` pointing at a mosquitto the test starts on a free loopback port with its
own config (stopped by PID at the end): no embedded MQTT listener, every gateway session goes upstream.
Devices are the ``mqtt-sn-12`` client and raw MQTT-SN datagrams, ``coap-client-notls`` and the simulated
LwM2M device; paho-mqtt clients connected to mosquitto check both directions. Both ``upstream.mode`` values
run wherever the behaviour applies to both.

Store-and-forward with a subscriber that can actually receive: mosquitto runs with persistence, the
subscriber opens a persistent session (clean session off, QoS 1 subscription) before the outage and
disconnects; mosquitto is stopped with SIGTERM, which saves that session; the device publishes into mqgate's
buffer meanwhile; after mosquitto restarts on the same port with the saved session, whatever mqgate forwards
is queued for the subscriber (or delivered live once it is back), so the subscriber's reconnect cannot race
the gateway's. ``max_queued_messages`` is raised above mosquitto's default of 1,000.

Every wait is bounded (an event, a queue, a polled condition with a deadline); nothing sleeps to pass. Every
mqgate, mosquitto, client, subprocess and socket a test starts is closed by a fixture.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.mqtt.client import MqttClient
from core.store import message_size
from gateways.base import SessionRefused
from gateways.mqttsn import codec
from gateways.mqttsn.numbers import ReturnCode
from gateways.upstream import UpstreamBroker
from tests.conftest import RunningBroker
from tests.integration.coap_helpers import (
    CoapClients,
    coap_client,
    coap_fixture,  # noqa: F401  (the "coap" fixture)
    coap_uri,
)
from tests.integration.helpers import TIMEOUT, Clients, PahoClient, wait_for
from tests.integration.lwm2m_device import DeviceFactory, device_fixture
from tests.integration.mosquitto import Mosquitto, free_port, mosquittos_fixture
from tests.integration.mqttsn_helpers import Collector, SnClient, SnClients, sn_port

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto not installed")

MODES = pytest.mark.parametrize("mode", ["transparent", "aggregating"])

NO_QOS3_SESSION = {"mqttsn": {"enable_qos3": False}}
"""Transparent mode opens an upstream connection for the MQTT-SN QoS -1 session at start; a refused one stops
mqgate from starting (see the xfail test below), so tests of refusals turn it off."""

DRAIN_TIMEOUT = 30.0
"""Seconds for a thousand buffered messages to reach the subscriber after mosquitto is back."""


# --- fixtures


@pytest.fixture
def mosquittos(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    yield from mosquittos_fixture(tmp_path)


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def devices() -> Iterator[DeviceFactory]:
    yield from device_fixture()


class Edges:
    """Starts mqgate in edge mode (a :class:`RunningBroker`, as the ``start_broker`` fixture makes it) and
    stops every one still running at the end; :meth:`stop` ends one mid-test (mqgate restarted)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[RunningBroker] = []

    def start(
        self,
        url: str,
        mode: str,
        *,
        buffer: str = "buffer",
        gateways: dict[str, Any] | None = None,
        linked: bool = True,
        **upstream: Any,
    ) -> RunningBroker:
        """mqgate forwarding to ``url``; with ``linked``, once its upstream connections are up (aggregating:
        the shared one, which starts in the background; a device's QoS 0 before it would be dropped)."""
        overrides: dict[str, Any] = {
            "upstream": {
                "url": url,
                "mode": mode,
                "buffer_dir": str(self.tmp_path / buffer),
                "backoff_min": 0.05,
                "backoff_max": 0.5,
                **upstream,
            }
        }
        if gateways:
            overrides["gateways"] = gateways
        running = RunningBroker(overrides)
        self.running.append(running)
        assert running.port is None, "edge mode must not start the embedded MQTT listener"
        if linked:
            wait_linked(running)
        return running

    def stop(self, running: RunningBroker) -> None:
        self.running.remove(running)
        running.stop()

    def close(self) -> None:
        while self.running:
            self.running.pop().stop()


@pytest.fixture
def edges(tmp_path: Path) -> Iterator[Edges]:
    owned = Edges(tmp_path)
    try:
        yield owned
    finally:
        owned.close()


@pytest.fixture
def sn() -> Iterator[Callable[[RunningBroker], SnClients]]:
    """``sn(running)``: MQTT-SN clients of a running gateway, all closed after the test."""
    opened: list[SnClients] = []

    def make(running: RunningBroker) -> SnClients:
        owned = SnClients(sn_port(running))
        opened.append(owned)
        return owned

    yield make
    for owned in opened:
        owned.close()


def url_of(broker: Mosquitto) -> str:
    return f"mqtt://{broker.host}:{broker.port}"


# --- the upstream side of a running mqgate (read on its loop)


def upstream_of(running: RunningBroker) -> UpstreamBroker:
    upstream = running.app.upstream
    assert upstream is not None, "mqgate is not in edge mode"
    return upstream


def _links(upstream: UpstreamBroker) -> list[MqttClient]:
    """Every upstream connection: the devices' (transparent), the shared one, orphaned streams'."""
    links = [s.connection for s in upstream.sessions.values() if s.connection is not None]
    if upstream._shared is not None:
        links.append(upstream._shared)
    links += [forwarder.client for forwarder in upstream._orphans.values()]
    return links


def wait_linked(running: RunningBroker, timeout: float = TIMEOUT) -> None:
    """Until every upstream connection is up and the upstream broker acknowledged every subscription."""

    def check() -> bool:
        links = _links(upstream_of(running))
        return bool(links) and all(link.connected and link.subscriptions_synced for link in links)

    wait_for(lambda: running.call(check), timeout)


def wait_unlinked(running: RunningBroker, timeout: float = TIMEOUT) -> None:
    """Until mqgate has noticed that the upstream broker is gone (no connection is up)."""

    def check() -> bool:
        return not any(link.connected for link in _links(upstream_of(running)))

    wait_for(lambda: running.call(check), timeout)


def buffered(running: RunningBroker) -> int:
    count: int = running.call(lambda: upstream_of(running).store.count())
    return count


def upstream_attr(running: RunningBroker, name: str) -> int:
    value: int = running.call(lambda: getattr(upstream_of(running), name))
    return value


# --- devices and subscribers


def publish_windowed(device: SnClient, topic_id: int, payloads: list[bytes], window: int) -> None:
    """QoS 1 PUBLISHes with up to ``window`` awaiting their PUBACK; each must be accepted (rc 0)."""
    pending: dict[int, bytes] = {}
    index = 0
    while index < len(payloads) or pending:
        while index < len(payloads) and len(pending) < window:
            msg_id = device.publish(topic_id, payloads[index], 1)
            pending[msg_id] = payloads[index]
            index += 1
        puback = device.expect(codec.Puback)
        assert puback.msg_id in pending, f"PUBACK for an unknown message: {puback!r}"
        assert puback.return_code == ReturnCode.ACCEPTED, f"publish refused: {puback!r}"
        del pending[puback.msg_id]


def persistent_sink(broker: Mosquitto, topic_filter: str) -> None:
    """A persistent session on mosquitto with a QoS 1 subscription, left disconnected: mosquitto queues what
    matches for it (kept across a SIGTERM restart with persistence on)."""
    sink = PahoClient(broker.port, "edge-sink", version=4, clean_start=False)
    try:
        assert sink.subscribe(topic_filter, 1) == 1
        sink.disconnect()  # a normal DISCONNECT: the session stays
    finally:
        sink.close()


def sink_back(clients: Clients, broker: Mosquitto) -> PahoClient:
    sink = clients.paho(broker.port, "edge-sink", version=4, clean_start=False)
    assert sink.connack is not None and sink.connack.session_present, "mosquitto lost the sink's session"
    return sink


def receive(sink: PahoClient, count: int, timeout: float = DRAIN_TIMEOUT) -> list[tuple[str, bytes]]:
    """The next ``count`` messages (topic, payload) within ``timeout`` overall."""
    deadline = time.monotonic() + timeout
    received: list[tuple[str, bytes]] = []
    while len(received) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{len(received)} of {count} messages within {timeout} s")
        try:
            message = sink.messages.get(timeout=remaining)
        except queue.Empty:
            continue
        received.append((message.topic, message.payload))
    return received


def numbered(count: int, start: int = 0) -> list[bytes]:
    return [b"%04d" % i for i in range(start, start + count)]


# --- devices publish and subscribe through mosquitto


@MODES
@pytest.mark.parametrize("version", [4, 5], ids=["upstream-v311", "upstream-v5"])
def test_mqttsn_device_publishes_and_subscribes_through_mosquitto(
    mode: str, version: int, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), mode, protocol_version=version)
    watcher = clients.paho(broker.port, "watcher", version=5)
    assert watcher.subscribe("sn/up/#", 2) == 2
    device = sn(running).sn12("sn-dev")
    device.send_connect()
    collector = Collector()
    device.send_subscribe("sn/down", 1, collector)
    wait_linked(running)

    for qos in (0, 1, 2):
        device.send_publish("sn/up/t", b"qos %d" % qos, qos)  # QoS 1/2: returns on PUBACK / PUBCOMP
    received = sorted((m.payload, m.qos) for m in watcher.expect_many(3))
    assert received == [(b"qos 0", 0), (b"qos 1", 1), (b"qos 2", 2)]

    watcher.publish("sn/down", b"from mosquitto", 1)
    device.poll_until(lambda: not collector.messages.empty())
    message = collector.messages.get_nowait()
    assert (message.get_topic_name(), message.get_payload()) == ("sn/down", b"from mosquitto")


@MODES
def test_coap_client_publishes_and_observes_through_mosquitto(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, coap: CoapClients, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    watcher = clients.paho(broker.port, "watcher", version=5)
    assert watcher.subscribe("coap/up/#", 2) == 2

    con = coap_client(coap_uri(running, "mqtt/coap/up/con", {"c": "coap-con"}), "put", payload=b"con")
    assert con.code == "2.04", con.stdout
    non = coap_client(coap_uri(running, "mqtt/coap/up/non", {"c": "coap-non"}), "put", "-N", payload=b"non")
    assert non.code == "2.04", non.stdout
    received = sorted((m.topic, m.payload, m.qos) for m in watcher.expect_many(2))
    assert received == [("coap/up/con", b"con", 1), ("coap/up/non", b"non", 0)]

    observer = coap.observer(coap_uri(running, "mqtt/coap/down/%2B", {"c": "coap-obs"}))
    observer.established()
    wait_linked(running)
    watcher.publish("coap/down/a", b"first", 1)
    watcher.publish("coap/down/b", b"second", 0)
    assert [observer.expect().text for _ in range(2)] == ["first", "second"]


class Application:
    """A paho client on mosquitto that sends LwM2M JSON commands and reads the uplinks of one endpoint."""

    def __init__(self, client: PahoClient, ep: str) -> None:
        self.client = client
        self.ep = ep
        assert client.subscribe(f"lwm2m/{ep}/up/#", 1) == 1

    def next(self, suffix: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.client.expect(max(0.01, deadline - time.monotonic()))
            if message.topic == f"lwm2m/{self.ep}/up/{suffix}":
                body: dict[str, Any] = json.loads(message.payload)
                return body


@MODES
def test_lwm2m_device_registers_and_answers_a_read_through_mosquitto(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, devices: DeviceFactory, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    app = Application(clients.paho(broker.port, "lwm2m-app", version=5), "edge-ep")
    port: int = running.app.listeners["lwm2m:udp"].port
    device = devices("edge-ep", port)
    device.register(lifetime=60)
    register = app.next("register")
    assert (register["msgType"], register["data"]["ep"]) == ("register", "edge-ep")
    wait_linked(running)  # the gateway's subscription to lwm2m/edge-ep/dn/# is in place upstream

    command = {"reqID": 7, "msgType": "read", "data": {"path": "/3/0"}}
    app.client.publish("lwm2m/edge-ep/dn", json.dumps(command), 1)
    response = app.next("resp")
    assert (response["reqID"], response["msgType"]) == (7, "read")
    assert (response["data"]["code"], response["data"]["reqPath"]) == ("2.05", "/3/0")
    assert {item["path"] for item in response["data"]["content"]} >= {"/3/0/0", "/3/0/1"}
    assert [r.path for r in device.received() if r.method == "GET"] == [(3, 0)]


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}"),
            *("-addext", f"subjectAltName=DNS:{name}"),
        ],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    return cert, key


@MODES
def test_mqtts_upstream_verified_with_ca_file_and_server_name(
    mode: str,
    tmp_path: Path,
    mosquittos: Callable[..., Mosquitto],
    edges: Edges,
    sn: Any,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mqgate")
    cert, key = self_signed(tmp_path, "broker.test")
    broker = mosquittos(tls=(cert, key))
    url = f"mqtts://127.0.0.1:{broker.port}"
    running = edges.start(url, mode, ca_file=str(cert), server_name="broker.test")
    device = sn(running).raw()
    device.connect("tls-dev")
    topic_id = device.subscribe("tls/down", 1).topic_id
    wait_linked(running)
    publisher = clients.popen(
        [
            *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(cert)),
            *("--insecure", "-q", "1", "-t", "tls/down", "-m", "over tls"),  # --insecure: no name check
        ]
    )
    assert publisher.wait(TIMEOUT) == 0
    delivery = device.receive_publish()
    assert (delivery.topic_id, delivery.data) == (topic_id, b"over tls")
    device.publish_acked(device.register("tls/up"), b"up over tls", 1)
    wait_for(lambda: buffered(running) == 0)  # acknowledged by mosquitto over TLS

    wrong = edges.start(url, mode, ca_file=str(cert), server_name="other.test", buffer="wrong", linked=False)
    wait_for(lambda: "certificate verify failed" in caplog.text)
    assert sn(wrong).raw().connect("tls-wrong").return_code == ReturnCode.ACCEPTED  # buffering meanwhile


# --- transparent mode: the device's own upstream connection


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
def test_transparent_connection_uses_the_prefixed_device_client_id_and_clean_flag(
    clean_session: bool, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), "transparent", clientid_prefix="edge-")
    holder = clients.paho(broker.port, "edge-sn-id", version=4)  # the id the device will take over
    device = sn(running).raw()
    device.connect("sn-id", clean_session=clean_session)
    holder.expect_disconnect()  # mosquitto ended it: the gateway connected with the same client id
    wait_linked(running)
    flag = "c1" if clean_session else "c0"
    wait_for(lambda: f" as edge-sn-id (p2, {flag}," in broker.log_text())


@MODES
@pytest.mark.parametrize("lost_by", ["keepalive", "sleep"])
def test_will_of_a_lost_device_is_published_upstream(
    mode: str, lost_by: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    """Transparent: mosquitto publishes the will (the gateway drops the device's connection without
    DISCONNECT); aggregating: the gateway publishes it through the shared connection."""
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    watcher = clients.paho(broker.port, "will-watcher", version=5)
    assert watcher.subscribe("will/#", 1) == 1
    device = sn(running).raw()
    device.connect("will-dev", duration=1, will=("will/will-dev", b"lost", 1, False))
    wait_linked(running)
    received = running.call(lambda: upstream_of(running).metrics.messages_received)
    if lost_by == "sleep":
        device.disconnect(1)  # asleep for 1 s and never wakes
    # else the device falls silent: its keepalive (1 s, +50 %) expires at the gateway

    message = watcher.expect(timeout=TIMEOUT)
    will = (message.topic, message.payload, message.qos, message.retain)
    assert will == ("will/will-dev", b"lost", 1, False)
    metrics = running.call(lambda: upstream_of(running).metrics)
    assert metrics.wills_published == (0 if mode == "transparent" else 1)  # published by the gateway
    assert metrics.messages_received == received  # a will is not a message from the device


@MODES
def test_will_updated_by_the_device_is_the_one_published(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    watcher = clients.paho(broker.port, "will-watcher", version=5)
    assert watcher.subscribe("will/#", 1) == 1
    device = sn(running).raw()
    device.connect("will-upd", duration=1, will=("will/old", b"old message", 0, False))
    device.send(codec.WillTopicUpd("will/new", 1, False))
    assert device.expect(codec.WillTopicResp).return_code == 0
    device.send(codec.WillMsgUpd(b"new message"))
    assert device.expect(codec.WillMsgResp).return_code == 0
    message = watcher.expect(timeout=TIMEOUT)  # keepalive 1 s (+50 %) expires
    assert (message.topic, message.payload, message.qos) == ("will/new", b"new message", 1)


@MODES
def test_will_update_in_the_middle_of_a_stream_of_qos1_publishes_loses_and_reorders_none(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    """Transparent: the device's upstream connection is replaced to carry the new will while its messages are
    on their way; its subscription is restored on the new connection."""
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    watcher = clients.paho(broker.port, "upd-watcher", version=5)
    assert watcher.subscribe("upd/#", 1) == 1
    device = sn(running).raw()
    device.connect("upd-dev", will=("will/upd-dev", b"old", 1, False))
    topic_id = device.register("upd/t")
    assert device.subscribe("upd/down", 1).return_code == 0
    wait_linked(running)
    publish_windowed(device, topic_id, numbered(200), window=8)
    device.send(codec.WillTopicUpd("will/upd-dev", 1, False))
    assert device.expect(codec.WillTopicResp).return_code == 0
    publish_windowed(device, topic_id, numbered(200, 200), window=8)
    received = [m.payload for m in watcher.expect_many(400, timeout=DRAIN_TIMEOUT)]
    assert received == numbered(400)
    wait_linked(running)
    watcher.publish("upd/down", b"still subscribed", 1)
    assert device.receive_publish().data == b"still subscribed"


@MODES
def test_takeover_from_another_address_publishes_the_old_will_and_serves_the_new_one(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    watcher = clients.paho(broker.port, "will-watcher", version=5)
    assert watcher.subscribe("will/#", 1) == 1
    owned = sn(running)
    old = owned.raw()
    old.connect("taken", will=("will/taken", b"old link lost", 1, False))
    wait_linked(running)
    new = owned.raw()
    new.connect("taken")
    message = watcher.expect()
    assert (message.topic, message.payload) == ("will/taken", b"old link lost")
    new.ping()
    topic_id = new.register("will/taken")
    new.publish_acked(topic_id, b"new link", 1)
    assert watcher.expect().payload == b"new link"
    wait_linked(running)
    assert running.call(lambda: list(upstream_of(running).sessions)) == ["mqttsn-qos3", "taken"]


@MODES
def test_normal_disconnect_publishes_no_will(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    watcher = clients.paho(broker.port, "will-watcher", version=5)
    assert watcher.subscribe("will/#", 1) == 1
    device = sn(running).raw()
    device.connect("calm-dev", duration=1, will=("will/calm-dev", b"must not appear", 1, False))
    wait_linked(running)
    device.disconnect()

    def closed() -> bool:
        upstream = upstream_of(running)
        return "calm-dev" not in upstream.sessions and not upstream._closing

    wait_for(lambda: running.call(closed))  # transparent: the DISCONNECT upstream has been sent
    watcher.publish("will/calm-dev", b"barrier", 1)
    message = watcher.expect()
    assert message.payload == b"barrier", "a will was published"


@MODES
def test_sleeping_device_gets_what_mosquitto_delivered_meanwhile_when_it_wakes(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    device = sn(running).raw()
    device.connect("napper")
    topic_id = device.subscribe("nap/t", 1).topic_id
    wait_linked(running)
    device.disconnect(60)
    clients.paho(broker.port, "nap-pub", version=4).publish("nap/t", b"while asleep", 1)
    wait_for(lambda: running.call(lambda: upstream_of(running).sessions["napper"].pending()) == 1)
    device.send(codec.Pingreq("napper"))
    publish = device.expect(codec.Publish)
    assert (publish.topic_id, publish.data, publish.qos) == (topic_id, b"while asleep", 1)
    device.ack(publish)
    device.expect(codec.Pingresp)


@MODES
def test_devices_on_overlapping_filters_each_get_one_copy(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    owned = sn(running)
    wide, narrow = owned.raw(), owned.raw()
    wide.connect("ov-wide")
    narrow.connect("ov-narrow")
    assert wide.subscribe("ov/#", 1).return_code == 0
    assert narrow.subscribe("ov/+", 1).return_code == 0
    wait_linked(running)
    publisher = clients.paho(broker.port, "ov-pub", version=4)
    publisher.publish("ov/x", b"once", 1)
    publisher.publish("ov/barrier", b"barrier", 1)
    for device in (wide, narrow):
        received = [device.receive_publish().data, device.receive_publish().data]
        assert received == [b"once", b"barrier"], "a device got the message twice"


@MODES
def test_unsubscribe_of_one_device_leaves_the_others_subscription(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    owned = sn(running)
    leaving, staying = owned.raw(), owned.raw()
    leaving.connect("un-leaving")
    staying.connect("un-staying")
    for device in (leaving, staying):
        assert device.subscribe("un/t", 1).return_code == 0
    leaving.unsubscribe("un/t")
    wait_linked(running)
    clients.paho(broker.port, "un-pub", version=4).publish("un/t", b"still here", 1)
    assert staying.receive_publish().data == b"still here"
    leaving.expect_nothing(0.2)


@MODES
def test_every_device_subscribing_gets_the_retained_message(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    clients.paho(broker.port, "ret-pub", version=4).publish("ret/t", b"retained", 1, retain=True)
    owned = sn(running)
    first, second = owned.raw(), owned.raw()
    first.connect("ret-first")
    second.connect("ret-second")
    assert first.subscribe("ret/t", 1).return_code == 0
    publish = first.receive_publish()
    assert (publish.data, publish.retain) == (b"retained", True)
    assert second.subscribe("ret/t", 1).return_code == 0
    publish = second.receive_publish(timeout=2)
    assert (publish.data, publish.retain) == (b"retained", True)
    first.expect_nothing(0.2)


# --- store-and-forward


@MODES
def test_publishes_acknowledged_upstream_are_acknowledged_to_the_device_without_touching_the_buffer_file(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    """With the upstream up, a device's PUBACK follows mosquitto's: the commit (5 s away here) never comes
    and no message is written to the buffer file."""
    broker = mosquittos()
    running = edges.start(url_of(broker), mode, commit_delay=5.0)
    watcher = clients.paho(broker.port, "watcher", version=5)
    assert watcher.subscribe("direct/#", 1) == 1
    device = sn(running).raw()
    device.connect("direct-dev")
    topic_id = device.register("direct/t")
    wait_linked(running)

    payloads = numbered(200)
    publish_windowed(device, topic_id, payloads, window=8)
    assert [m.payload for m in watcher.expect_many(200)] == payloads
    assert running.call(lambda: upstream_of(running).store.written) == 0
    assert buffered(running) == 0


@MODES
def test_thousand_qos1_publishes_during_an_outage_all_arrive_in_order(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    broker = mosquittos(persistence=True, extra=["max_queued_messages 5000"])
    running = edges.start(url_of(broker), mode)
    persistent_sink(broker, "sf/#")
    device = sn(running).raw()
    device.connect("sf-dev")
    topic_id = device.register("sf/t")
    wait_linked(running)

    broker.stop()
    wait_unlinked(running)
    for _ in range(3):
        device.publish(topic_id, b"qos 0 in the outage", 0)
    wait_for(lambda: upstream_attr(running, "dropped_qos0_outage") == 3)
    payloads = numbered(1000)
    publish_windowed(device, topic_id, payloads, window=8)
    con = coap_client(coap_uri(running, "mqtt/sf/coap", {"c": "sf-coap"}), "put", payload=b"coap")
    assert con.code == "2.04", con.stdout  # buffered: the device sees no error
    assert buffered(running) == 1001

    broker.start()
    sink = sink_back(clients, broker)
    received = receive(sink, 1001)
    assert [p for t, p in received if t == "sf/t"] == payloads
    assert [p for t, p in received if t == "sf/coap"] == [b"coap"]
    wait_for(lambda: buffered(running) == 0)
    sink.expect_none(0.2)  # nothing twice, and no QoS 0 message of the outage


@MODES
def test_upstream_that_stalls_then_dies_with_messages_in_flight_loses_none(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    """mosquitto frozen (SIGSTOP: it answers nothing, slowly without end) while the device publishes, then
    killed with a window of publishes unacknowledged on the connection: they are resent after the restart.
    The sink's session is saved (a SIGTERM restart) before mqgate starts, so it survives the SIGKILL."""
    broker = mosquittos(persistence=True, extra=["max_queued_messages 5000"])
    persistent_sink(broker, "stall/#")
    broker.stop()
    broker.start()
    running = edges.start(url_of(broker), mode)
    device = sn(running).raw()
    device.connect("stall-dev")
    topic_id = device.register("stall/t")
    wait_linked(running)
    assert broker.process is not None
    os.kill(broker.process.pid, signal.SIGSTOP)
    try:
        payloads = numbered(1000)
        publish_windowed(device, topic_id, payloads, window=8)  # the device never waits for the upstream
        assert buffered(running) == 1000
        in_flight = running.call(lambda: sum(link.inflight for link in _links(upstream_of(running))))
        assert in_flight > 0
        broker.kill()
    finally:
        if broker.running:
            os.kill(broker.process.pid, signal.SIGCONT)
    wait_unlinked(running)
    assert buffered(running) == 1000

    broker.start()
    sink = sink_back(clients, broker)
    assert receive(sink, 1000) == [("stall/t", p) for p in payloads]
    wait_for(lambda: buffered(running) == 0)
    sink.expect_none(0.2)


@MODES
def test_mqgate_restarted_mid_outage_loses_no_buffered_message(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    """500 messages buffered, mqgate stopped and started on the same buffer, the device back with 500 more;
    a second device that never comes back has its 100 delivered too."""
    broker = mosquittos(persistence=True, extra=["max_queued_messages 5000"])
    first = edges.start(url_of(broker), mode)
    persistent_sink(broker, "sf/#")
    device = sn(first).raw()
    device.connect("sf-dev")
    gone = sn(first).raw()
    gone.connect("sf-gone")
    topic_id = device.register("sf/t")
    gone_topic = gone.register("sf/gone")
    wait_linked(first)

    broker.stop()
    wait_unlinked(first)
    publish_windowed(device, topic_id, numbered(500), window=8)
    publish_windowed(gone, gone_topic, numbered(100), window=1)
    edges.stop(first)

    second = edges.start(url_of(broker), mode, linked=False)  # mosquitto is still down
    assert buffered(second) == 600
    if mode == "transparent":  # each device's messages go out with its client id until it is back
        orphans = second.call(lambda: sorted(upstream_of(second)._orphans))
        assert orphans == ["sf-dev", "sf-gone"]
    device = sn(second).raw()
    device.connect("sf-dev")
    topic_id = device.register("sf/t")
    publish_windowed(device, topic_id, numbered(500, 500), window=8)
    assert buffered(second) == 1100

    broker.start()
    sink = sink_back(clients, broker)
    received = receive(sink, 1100)
    assert [p for t, p in received if t == "sf/t"] == numbered(1000)
    assert [p for t, p in received if t == "sf/gone"] == numbered(100)
    wait_for(lambda: buffered(second) == 0)
    sink.expect_none(0.2)


@MODES
def test_full_buffer_refuses_qos1_with_the_protocols_congestion_code(
    mode: str, mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, clients: Clients
) -> None:
    broker = mosquittos()
    running = edges.start(url_of(broker), mode, max_buffer_bytes=1024)
    device = sn(running).raw()
    device.connect("full-dev")
    topic_id = device.register("full/t")
    wait_linked(running)
    broker.stop()
    wait_unlinked(running)

    fits = 1024 // message_size("full/t", b"x" * 100)  # 7
    codes = []
    for _ in range(fits + 2):
        msg_id = device.publish(topic_id, b"x" * 100, 1)
        puback = device.expect(codec.Puback)
        assert puback.msg_id == msg_id
        codes.append(puback.return_code)
    assert codes == [ReturnCode.ACCEPTED] * fits + [ReturnCode.CONGESTION] * 2
    assert buffered(running) == fits

    con = coap_client(coap_uri(running, "mqtt/full/coap", {"c": "coap-full"}), "put", payload=b"x" * 100)
    assert con.code == "5.03", con.stdout
    dropped = upstream_attr(running, "dropped_qos0_outage")
    non = coap_client(coap_uri(running, "mqtt/full/coap", {"c": "coap-full"}), "put", "-N", payload=b"n")
    assert non.code == "2.04", non.stdout  # QoS 0 in an outage: accepted, dropped and counted
    assert upstream_attr(running, "dropped_qos0_outage") == dropped + 1
    assert upstream_attr(running, "buffer_full") == 3

    broker.start()
    wait_for(lambda: buffered(running) == 0)  # drained upstream: room again
    watcher = clients.paho(broker.port, "watcher", version=4)
    assert watcher.subscribe("full/#", 1) == 1
    device.publish_acked(topic_id, b"room again", 1)
    assert watcher.expect().payload == b"room again"


# --- reconnect


@MODES
def test_subscriptions_are_restored_after_mosquitto_restarts(
    mode: str,
    mosquittos: Callable[..., Mosquitto],
    edges: Edges,
    sn: Any,
    coap: CoapClients,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """mosquitto killed (the connection drops mid-stream, no session survives) and started again: mqgate
    reconnects, resubscribes for the MQTT-SN device and the CoAP observer, and forwards again."""
    caplog.set_level(logging.INFO, logger="mqgate")
    broker = mosquittos()
    running = edges.start(url_of(broker), mode)
    device = sn(running).raw()
    device.connect("rc-dev")
    assert device.subscribe("rc/down", 1).return_code == 0
    topic_id = device.register("rc/up")
    observer = coap.observer(coap_uri(running, "mqtt/rc/coap", {"c": "rc-obs"}))
    observer.established()
    wait_linked(running)

    broker.kill()
    wait_unlinked(running)
    assert device.subscribe("rc/late", 1).return_code == 0  # made during the outage
    broker.start()
    wait_linked(running)
    assert "connection lost" in caplog.text

    mqtt = clients.paho(broker.port, "rc-app", version=4)
    assert mqtt.subscribe("rc/up", 1) == 1
    mqtt.publish("rc/down", b"after the restart", 1)
    delivery = device.receive_publish()
    assert (delivery.data, delivery.qos) == (b"after the restart", 1)
    mqtt.publish("rc/late", b"late subscription", 1)
    assert device.receive_publish().data == b"late subscription"
    mqtt.publish("rc/coap", b"coap too", 0)
    assert observer.expect().text == "coap too"
    device.publish_acked(topic_id, b"and back", 1)
    assert mqtt.expect().payload == b"and back"


# --- bad upstreams


def test_refused_credentials_give_the_device_connack_rejected_and_are_logged(
    mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqgate")
    broker = mosquittos(users={"edge": "secret"})
    running = edges.start(
        url_of(broker),
        "transparent",
        username="edge",
        password="wrong",
        gateways=NO_QOS3_SESSION,
        linked=False,
    )
    device = sn(running).raw()
    connack = device.connect("bad-cred", check=False)
    assert connack.return_code == ReturnCode.NOT_SUPPORTED  # MQTT-SN 1.2 has no "not authorised"
    assert "upstream refused bad-cred: connection refused: not authorized (reason 0x87)" in caplog.text
    device.expect_nothing(0.2)


def test_mqgate_starts_while_the_upstream_refuses_its_credentials(
    mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any
) -> None:
    broker = mosquittos(users={"edge": "secret"})
    failure = None
    try:
        running = edges.start(url_of(broker), "transparent", username="edge", password="wrong", linked=False)
    except SessionRefused as exc:
        failure = repr(exc)
    # a failed start leaves the MQTT-SN socket it bound open (App._start stops a listener only on OSError):
    # collected, and its ResourceWarning reported, in this test rather than a later one
    gc.collect()
    assert failure is None, f"mqgate did not start: {failure}"
    device = sn(running).raw()
    assert device.connect("after-start", check=False).return_code == ReturnCode.NOT_SUPPORTED


def test_device_credentials_pass_through_to_the_upstream_broker(
    mosquittos: Callable[..., Mosquitto], edges: Edges, clients: Clients
) -> None:
    broker = mosquittos(users={"dev": "devpass", "watcher": "w"})
    running = edges.start(
        url_of(broker), "transparent", credentials="device", gateways=NO_QOS3_SESSION, linked=False
    )
    watcher = clients.paho(broker.port, "watcher", version=4, username="watcher", password="w")
    assert watcher.subscribe("cred/#", 1) == 1
    good = {"c": "cred-ok", "u": "dev", "p": "devpass"}
    assert coap_client(coap_uri(running, "mqtt/cred/t", good), "put", payload=b"ok").code == "2.04"
    assert watcher.expect().payload == b"ok"
    bad = {"c": "cred-bad", "u": "dev", "p": "nope"}
    assert coap_client(coap_uri(running, "mqtt/cred/t", bad), "put", payload=b"no").code == "4.01"


def test_aggregating_connection_refused_is_retried_while_devices_buffer(
    mosquittos: Callable[..., Mosquitto], edges: Edges, sn: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqgate")
    broker = mosquittos(users={"edge": "secret"})
    running = edges.start(url_of(broker), "aggregating", username="edge", password="wrong", linked=False)
    device = sn(running).raw()
    device.connect("agg-dev")
    topic_id = device.register("agg/t")
    device.publish_acked(topic_id, b"buffered", 1)
    assert buffered(running) == 1
    wait_for(lambda: caplog.text.count("not authorized (reason 0x87); retrying in") >= 3)
    device.ping()  # still serving


@MODES
def test_message_refused_upstream_is_logged_and_does_not_block_the_buffer(
    mode: str,
    tmp_path: Path,
    mosquittos: Callable[..., Mosquitto],
    edges: Edges,
    sn: Any,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """mosquitto's ACL refuses a topic: in MQTT 5 its PUBACK says 0x87; the buffered message is dropped
    with a warning and the ones behind it still go out."""
    caplog.set_level(logging.INFO, logger="mqgate")
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite ok/#\n")
    broker = mosquittos(extra=[f"acl_file {acl}"])
    running = edges.start(url_of(broker), mode, protocol_version=5)
    watcher = clients.paho(broker.port, "watcher", version=5)
    assert watcher.subscribe("ok/#", 1) == 1
    device = sn(running).raw()
    device.connect("acl-dev")
    denied, allowed = device.register("denied/t"), device.register("ok/t")
    device.publish_acked(denied, b"refused upstream", 1)  # buffered: accepted
    device.publish_acked(allowed, b"behind it", 1)
    assert watcher.expect().payload == b"behind it"
    wait_for(lambda: buffered(running) == 0)
    stream = "acl-dev" if mode == "transparent" else "*"
    assert f"upstream refused a buffered message of {stream}: reason 0x87" in caplog.text


class GarbageServer:
    """A TCP server on a loopback port that answers every connection with bytes that are not MQTT."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.05)
        self.port = port
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="garbage-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                self.accepted += 1
                conn.settimeout(TIMEOUT)
                try:
                    conn.recv(1024)  # the CONNECT
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.sock.close()


@MODES
def test_garbage_from_the_upstream_is_logged_and_retried_then_a_real_broker_gets_the_buffer(
    mode: str,
    tmp_path: Path,
    edges: Edges,
    sn: Any,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mqgate")
    port = free_port()
    garbage = GarbageServer(port)
    try:
        running = edges.start(f"mqtt://127.0.0.1:{port}", mode, linked=False)
        device = sn(running).raw()
        device.connect("junk-dev")
        topic_id = device.register("junk/t")
        device.send(codec.Publish(topic_id, b"kept", 1, 1, retain=True))
        puback = device.expect(codec.Puback)
        assert (puback.msg_id, puback.return_code) == (1, ReturnCode.ACCEPTED)
        wait_for(lambda: garbage.accepted >= 3)
        assert "garbage from the server" in caplog.text
        device.ping()
    finally:
        garbage.close()
    (tmp_path / "late").mkdir()
    broker = Mosquitto(tmp_path / "late", port=port)
    try:
        broker.start()
        wait_for(lambda: buffered(running) == 0)
        watcher = clients.paho(port, "watcher", version=4)
        assert watcher.subscribe("junk/#", 1) == 1
        message = watcher.expect()
        assert (message.topic, message.payload, message.retain) == ("junk/t", b"kept", True)
    finally:
        broker.stop()
