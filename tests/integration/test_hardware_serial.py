"""Serial radio bridges over real pseudo-terminal pairs (issue 6).

Each test starts ``socat`` with two linked ptys under the test's own directory: mqgate opens one end as
``[[hardware.serial]] device``, a simulated bridge (:class:`Node`) opens the other and writes MQTT-SN messages
built with :mod:`gateways.mqttsn.codec` in the link's framing. The node wraps and unwraps frames with its own
hand-written framing code (XBee frames built byte by byte), independent of :mod:`hardware.framing`. paho-mqtt
clients stand on the MQTT side. The device paths stay the same across a socat restart, so killing socat is an
unplugged dongle and starting it again plugs it back in.

Nothing here sleeps for a fixed time: every wait is a serial read timeout, a queue or a polled condition with
a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import serial  # type: ignore[import-untyped]

from core.app import App
from core.config import Config, build_section
from core.errors import ConfigError
from gateways.mqttsn import codec
from tests.integration.helpers import TIMEOUT, Clients, PahoClient, wait_for

SOCAT = shutil.which("socat")
pytestmark = pytest.mark.skipif(SOCAT is None, reason="needs socat (apt-get install socat)")

M = TypeVar("M")

FRAMINGS = ("length", "slip", "xbee1", "xbee2")
NODE64 = bytes.fromhex("0013A20040A1B2C3")
OTHER64 = bytes.fromhex("0013A20040FFEE01")
AWKWARD = b"\x7e\x7d\x11\x13\xc0\xdb\xdc\xdd\x00\x01"
"""Payload bytes every framing has to escape or must not mistake for a delimiter."""

SLIP_END, SLIP_ESC = 0xC0, 0xDB
XBEE_START = 0x7E
XBEE_SPECIAL = frozenset((0x7E, 0x7D, 0x11, 0x13))


# --- the node side of each framing, written out by hand


def _slip(frame: bytes) -> bytes:
    body = bytearray()
    for octet in frame:
        if octet == SLIP_END:
            body += b"\xdb\xdc"
        elif octet == SLIP_ESC:
            body += b"\xdb\xdd"
        else:
            body.append(octet)
    return bytes((SLIP_END,)) + bytes(body) + bytes((SLIP_END,))


def _xbee(frame_data: bytes, escaped: bool) -> bytes:
    body = len(frame_data).to_bytes(2, "big") + frame_data + bytes((0xFF - (sum(frame_data) & 0xFF),))
    if escaped:
        body = b"".join(bytes((0x7D, o ^ 0x20)) if o in XBEE_SPECIAL else bytes((o,)) for o in body)
    return bytes((XBEE_START,)) + body


def _xbee_receive(data: bytes, source64: bytes, escaped: bool) -> bytes:
    """What a module in API mode hands its host for a radio packet: mode 2 (escaped) as a Receive Packet 0x90
    (64-bit source, 16-bit source 0xFFFE, options 0x01 acknowledged); mode 1 as the 802.15.4 64-bit Receive
    Packet 0x80 (64-bit source, RSSI, options), so both receive layouts are exercised."""
    if escaped:
        return _xbee(b"\x90" + source64 + b"\xff\xfe\x01" + data, escaped)
    return _xbee(b"\x80" + source64 + b"\x28\x00" + data, escaped)


def wrap(framing: str, frame: bytes, source64: bytes = NODE64) -> bytes:
    """The bytes a bridge in ``framing`` sends to carry one MQTT-SN message."""
    if framing == "length":
        return frame
    if framing == "slip":
        return _slip(frame)
    return _xbee_receive(frame, source64, escaped=framing == "xbee2")


class _Unframer:
    """Splits what the gateway writes into ``(XBee destination or None, MQTT-SN message bytes)``."""

    def __init__(self, framing: str) -> None:
        self.framing = framing
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes | None, bytes]]:
        self.buf += data
        if self.framing == "length":
            return self._length()
        if self.framing == "slip":
            return self._slip()
        return self._xbee(self.framing == "xbee2")

    def _length(self) -> list[tuple[bytes | None, bytes]]:
        out: list[tuple[bytes | None, bytes]] = []
        buf = self.buf
        while len(buf) >= 2:
            size = int.from_bytes(buf[1:3]) if buf[0] == 1 else buf[0]
            assert size >= 2, f"gateway wrote a bad MQTT-SN length: {bytes(buf[:4]).hex()}"
            if len(buf) < size:
                break
            out.append((None, bytes(buf[:size])))
            del buf[:size]
        return out

    def _slip(self) -> list[tuple[bytes | None, bytes]]:
        out: list[tuple[bytes | None, bytes]] = []
        while (end := self.buf.find(SLIP_END)) >= 0:
            raw, self.buf = bytes(self.buf[:end]), self.buf[end + 1 :]
            if raw:
                frame = raw.replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")
                out.append((None, frame))
        return out

    def _xbee(self, escaped: bool) -> list[tuple[bytes | None, bytes]]:
        out: list[tuple[bytes | None, bytes]] = []
        while True:
            start = self.buf.find(XBEE_START)
            if start < 0:
                return out
            assert start == 0, f"gateway wrote bytes outside an API frame: {bytes(self.buf[:start]).hex()}"
            raw = bytearray()
            i = 1
            while i < len(self.buf) and (len(raw) < 3 or len(raw) < 3 + int.from_bytes(raw[:2])):
                octet = self.buf[i]
                if escaped and octet == 0x7D:
                    if i + 1 >= len(self.buf):
                        break
                    octet = self.buf[i + 1] ^ 0x20
                    i += 1
                else:
                    assert not escaped or octet not in XBEE_SPECIAL, "unescaped special byte in mode 2"
                raw.append(octet)
                i += 1
            if len(raw) < 3 or len(raw) < 3 + int.from_bytes(raw[:2]):
                return out
            length = int.from_bytes(raw[:2])
            frame_data, check = bytes(raw[2 : 2 + length]), raw[2 + length]
            assert (sum(frame_data) + check) & 0xFF == 0xFF, "bad checksum from the gateway"
            assert frame_data[0] == 0x10, f"expected a Transmit Request, got frame type {frame_data[0]:#x}"
            # 0x10, frame id, 64-bit destination, 16-bit destination, radius, options, RF data
            out.append((frame_data[2:10], frame_data[14:]))
            del self.buf[:i]


class Node:
    """A simulated serial bridge at the node end of the pty: MQTT-SN messages out in ``framing``, the
    gateway's frames in (decoded, with their XBee destination and forwarder node id)."""

    def __init__(self, path: Path, framing: str, source64: bytes = NODE64) -> None:
        self.path = path
        self.framing = framing
        self.source64 = source64
        self.port = serial.Serial(str(path), 115200, timeout=0.05)
        self._unframer = _Unframer(framing)
        self._inbox: list[tuple[bytes | None, bytes | None, codec.Message]] = []

    def write(self, data: bytes) -> None:
        self.port.write(data)
        self.port.flush()

    def send(self, message: codec.Message, *, node_id: bytes | None = None) -> None:
        if node_id is not None:
            message = codec.Encapsulated(node_id, message)
        self.write(wrap(self.framing, codec.encode(message), self.source64))

    def _pump(self) -> None:
        data = self.port.read(max(1, self.port.in_waiting))
        for destination, frame in self._unframer.feed(data):
            message = codec.decode(frame)
            node_id = None
            if isinstance(message, codec.Encapsulated):
                node_id, message = message.node_id, message.message
            self._inbox.append((destination, node_id, message))

    def receive(
        self, kind: type[M], *, node_id: bytes | None = None, timeout: float = TIMEOUT
    ) -> tuple[bytes | None, M]:
        """The next message of type ``kind`` for ``node_id`` (None: not encapsulated), with its XBee
        destination; other messages stay queued."""
        deadline = time.monotonic() + timeout
        while True:
            for index, (destination, nid, message) in enumerate(self._inbox):
                if isinstance(message, kind) and nid == node_id:
                    del self._inbox[index]
                    return destination, message
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {kind.__name__} for node {node_id!r}; queued: {self._inbox}")
            self._pump()

    def expect(self, kind: type[M], *, node_id: bytes | None = None, timeout: float = TIMEOUT) -> M:
        destination, message = self.receive(kind, node_id=node_id, timeout=timeout)
        if self.framing.startswith("xbee"):
            assert destination == self.source64, f"sent to {destination!r}, not to the node"
        return message

    def connect(self, client_id: str, *, node_id: bytes | None = None, duration: int = 60) -> None:
        self.send(codec.Connect(client_id, duration), node_id=node_id)
        assert self.expect(codec.Connack, node_id=node_id).return_code == 0

    def register(self, topic: str, msg_id: int, *, node_id: bytes | None = None) -> int:
        self.send(codec.Register(0, msg_id, topic), node_id=node_id)
        regack = self.expect(codec.Regack, node_id=node_id)
        assert (regack.msg_id, regack.return_code) == (msg_id, 0)
        return regack.topic_id

    def publish(
        self, topic_id: int, data: bytes, msg_id: int, *, node_id: bytes | None = None, qos: int = 1
    ) -> None:
        self.send(codec.Publish(topic_id, data, qos, msg_id), node_id=node_id)
        if qos:
            puback = self.expect(codec.Puback, node_id=node_id)
            assert (puback.msg_id, puback.return_code) == (msg_id, 0)

    def close(self) -> None:
        self.port.close()


# --- pty pairs, logs, fixtures


class PtyPair:
    """``socat`` joining two ptys reachable at stable paths (``gateway_end`` for mqgate, ``node_end`` for the
    simulated bridge); :meth:`stop` ends socat (the device vanishes), :meth:`start` brings it back."""

    def __init__(self, directory: Path, name: str) -> None:
        self.gateway_end = directory / f"{name}-gw"
        self.node_end = directory / f"{name}-node"
        self._log = directory / f"{name}-socat.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PtyPair:
        assert SOCAT is not None and self.proc is None
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    SOCAT,
                    "-d",
                    "-d",
                    f"pty,raw,echo=0,link={self.gateway_end}",
                    f"pty,raw,echo=0,link={self.node_end}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or (self.gateway_end.exists() and self.node_end.exists()))
        assert proc.poll() is None, f"socat exited: {self._log.read_text()}"
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT)


class LogWatch(logging.Handler):
    """Collects the messages of the ``mqgate`` loggers (emitted on the App's thread)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._lock_messages = threading.Lock()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_messages:
            self.messages.append(record.getMessage())

    def matching(self, fragment: str) -> list[str]:
        with self._lock_messages:
            return [m for m in self.messages if fragment in m]

    def wait(self, fragment: str, timeout: float = TIMEOUT) -> str:
        found: list[str] = wait_for(lambda: self.matching(fragment), timeout)
        return found[0]


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def ptys(tmp_path: Path) -> Iterator[Callable[[str], PtyPair]]:
    """``ptys("a")`` starts a socat pty pair under the test's directory; all are stopped at the end."""
    started: list[PtyPair] = []

    def start(name: str) -> PtyPair:
        pair = PtyPair(tmp_path, name)
        started.append(pair)
        return pair.start()

    yield start
    for pair in started:
        pair.stop()


@pytest.fixture
def nodes() -> Iterator[Callable[..., Node]]:
    """``nodes(path, framing)`` opens a simulated bridge; all are closed at the end."""
    opened: list[Node] = []

    def open_node(path: Path, framing: str, source64: bytes = NODE64) -> Node:
        node = Node(path, framing, source64)
        opened.append(node)
        return node

    yield open_node
    for node in opened:
        node.close()


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    logger = logging.getLogger("mqgate")
    watch = LogWatch()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


def serial_link(device: Path, framing: str, **extra: Any) -> dict[str, Any]:
    return {"device": str(device), "framing": framing, **extra}


def runner(mqgate: Any, device: Path) -> Any:
    """The link gateway of ``device`` (touch its state only inside ``mqgate.call``)."""
    return mqgate.app.listeners[f"mqttsn:serial:{device}"]


def peer_of(mqgate: Any, client_id: str) -> str:
    peer: str = mqgate.call(lambda: mqgate.broker.sessions[client_id].client.peer)
    return peer


def online(mqgate: Any, client_id: str) -> bool:
    def check() -> bool:
        session = mqgate.broker.sessions.get(client_id)
        return session is not None and session.online

    result: bool = mqgate.call(check)
    return result


# --- tests


@pytest.mark.parametrize("framing", FRAMINGS)
def test_node_publishes_reach_mqtt_and_messages_come_back_through_the_pty(
    framing: str,
    ptys: Callable[[str], PtyPair],
    start_broker: Callable[..., Any],
    nodes: Callable[..., Node],
    clients: Clients,
) -> None:
    pair = ptys("bridge")
    mqgate = start_broker(hardware={"serial": [serial_link(pair.gateway_end, framing)]})
    node = nodes(pair.node_end, framing)
    watcher: PahoClient = clients.paho(mqgate.port, "watcher")
    assert watcher.subscribe(f"radio/{framing}/#", 1) == 1

    node.connect(f"node-{framing}")
    expected_peer = (
        f"xbee:{NODE64.hex().upper()}" if framing.startswith("xbee") else f"serial:{pair.gateway_end}"
    )
    assert peer_of(mqgate, f"node-{framing}") == expected_peer

    topic_id = node.register(f"radio/{framing}/up", 1)
    node.publish(topic_id, b"21.5" + AWKWARD, 2)
    message = watcher.expect()
    assert (message.topic, message.payload, message.qos) == (f"radio/{framing}/up", b"21.5" + AWKWARD, 1)

    node.send(codec.Subscribe(3, topic_name=f"radio/{framing}/down", qos=1))
    suback = node.expect(codec.Suback)
    assert (suback.msg_id, suback.return_code, suback.qos) == (3, 0, 1)

    watcher.publish(f"radio/{framing}/down", b"on" + AWKWARD, qos=1)
    delivery = node.expect(codec.Publish)
    assert (delivery.topic_id, delivery.data, delivery.qos) == (suback.topic_id, b"on" + AWKWARD, 1)
    node.send(codec.Puback(delivery.topic_id, delivery.msg_id, 0))

    node.send(codec.Disconnect())
    node.expect(codec.Disconnect)


def test_nodes_behind_a_forwarder_on_one_serial_link_are_separate_clients(
    ptys: Callable[[str], PtyPair],
    start_broker: Callable[..., Any],
    nodes: Callable[..., Node],
    clients: Clients,
) -> None:
    pair = ptys("forwarder")
    mqgate = start_broker(hardware={"serial": [serial_link(pair.gateway_end, "slip")]})
    forwarder = nodes(pair.node_end, "slip")
    watcher = clients.paho(mqgate.port, "watcher")
    assert watcher.subscribe("field/#", 1) == 1
    first, second = b"\x00\x07", b"\x00\x09"

    forwarder.connect("sensor-7", node_id=first)
    forwarder.connect("sensor-9", node_id=second)
    assert peer_of(mqgate, "sensor-7") == f"fwd:serial:{pair.gateway_end}/0007"
    assert peer_of(mqgate, "sensor-9") == f"fwd:serial:{pair.gateway_end}/0009"

    for node_id, name in ((first, "7"), (second, "9")):
        topic_id = forwarder.register(f"field/{name}/temp", 1, node_id=node_id)
        forwarder.publish(topic_id, name.encode(), 2, node_id=node_id)
    received = {(m.topic, m.payload) for m in watcher.expect_many(2)}
    assert received == {("field/7/temp", b"7"), ("field/9/temp", b"9")}

    forwarder.send(codec.Subscribe(3, topic_name="field/9/cmd", qos=0), node_id=second)
    suback = forwarder.expect(codec.Suback, node_id=second)
    watcher.publish("field/9/cmd", b"blink", qos=1)
    delivery = forwarder.expect(codec.Publish, node_id=second)
    assert (delivery.topic_id, delivery.data) == (suback.topic_id, b"blink")

    # Each node id is a client of its own: one disconnecting leaves the other connected.
    forwarder.send(codec.Disconnect(), node_id=first)
    forwarder.expect(codec.Disconnect, node_id=first)
    wait_for(lambda: not online(mqgate, "sensor-7"))
    assert online(mqgate, "sensor-9")
    forwarder.send(codec.Pingreq(), node_id=second)
    forwarder.expect(codec.Pingresp, node_id=second)


def test_two_serial_links_run_side_by_side(
    ptys: Callable[[str], PtyPair],
    start_broker: Callable[..., Any],
    nodes: Callable[..., Node],
    clients: Clients,
) -> None:
    left, right = ptys("left"), ptys("right")
    mqgate = start_broker(
        hardware={
            "serial": [serial_link(left.gateway_end, "length"), serial_link(right.gateway_end, "xbee2")]
        }
    )
    a = nodes(left.node_end, "length")
    b = nodes(right.node_end, "xbee2", OTHER64)
    watcher = clients.paho(mqgate.port, "watcher")
    assert watcher.subscribe("links/+/up", 0) == 0

    a.connect("left-node")
    b.connect("right-node")
    for node, name in ((a, "left"), (b, "right")):
        topic_id = node.register(f"links/{name}/up", 1)
        node.publish(topic_id, name.encode(), 2)
    received = {(m.topic, m.payload) for m in watcher.expect_many(2)}
    assert received == {("links/left/up", b"left"), ("links/right/up", b"right")}

    for node, name in ((a, "left"), (b, "right")):
        node.send(codec.Subscribe(3, topic_name=f"links/{name}/down", qos=0))
        node.expect(codec.Suback)
    watcher.publish("links/right/down", b"only right", qos=1)
    assert b.expect(codec.Publish).data == b"only right"
    watcher.publish("links/left/down", b"only left", qos=1)
    assert a.expect(codec.Publish).data == b"only left"
    with pytest.raises(AssertionError):
        b.receive(codec.Publish, timeout=0.3)


def test_unplugged_device_loses_its_clients_and_they_come_back_when_it_returns(
    ptys: Callable[[str], PtyPair],
    start_broker: Callable[..., Any],
    nodes: Callable[..., Node],
    clients: Clients,
    logs: LogWatch,
) -> None:
    pair = ptys("dongle")
    device = pair.gateway_end
    mqgate = start_broker(
        hardware={"serial": [serial_link(device, "xbee1", reopen_min=0.02, reopen_max=0.1)]}
    )
    node = nodes(pair.node_end, "xbee1")
    watcher = clients.paho(mqgate.port, "watcher")
    assert watcher.subscribe("plant/#", 1) == 1

    node.send(codec.Connect("pump", 60, will=True))
    node.expect(codec.WillTopicReq)
    node.send(codec.WillTopic("plant/pump/status", 1))
    node.expect(codec.WillMsgReq)
    node.send(codec.WillMsg(b"offline"))
    assert node.expect(codec.Connack).return_code == 0
    topic_id = node.register("plant/pump/flow", 1)
    node.publish(topic_id, b"3.2", 2)
    assert watcher.expect().payload == b"3.2"
    # The device vanishes in the middle of a frame.
    node.write(wrap("xbee1", codec.encode(codec.Publish(topic_id, b"never", 1, 3)))[:9])

    pair.stop()
    will = watcher.expect()
    assert (will.topic, will.payload) == ("plant/pump/status", b"offline")
    logs.wait(f"serial {device} lost:")
    link = runner(mqgate, device).link
    wait_for(lambda: mqgate.call(lambda: link.metrics.open_failures) >= 3)  # reopening with backoff
    assert len(logs.matching(f"serial {device} lost")) == 1  # once per transition, not per attempt
    assert mqgate.call(lambda: runner(mqgate, device).gateway.metrics.clients_lost) == 1
    node.close()

    pair.start()
    logs.wait(f"serial {device} open again")
    node = nodes(pair.node_end, "xbee1")
    node.connect("pump")
    topic_id = node.register("plant/pump/flow", 1)
    node.publish(topic_id, b"3.4", 2)
    assert watcher.expect().payload == b"3.4"
    assert len(logs.matching(f"serial {device} open again")) == 1


def test_device_missing_at_start_is_retried_until_it_appears(
    start_broker: Callable[..., Any],
    tmp_path: Path,
    nodes: Callable[..., Node],
    clients: Clients,
    logs: LogWatch,
) -> None:
    pair = PtyPair(tmp_path, "late")
    mqgate = start_broker(
        hardware={"serial": [serial_link(pair.gateway_end, "length", reopen_min=0.02, reopen_max=0.1)]}
    )
    logs.wait(f"serial {pair.gateway_end} lost:")
    try:
        pair.start()
        logs.wait(f"serial {pair.gateway_end} open again")
        node = nodes(pair.node_end, "length")
        watcher = clients.paho(mqgate.port, "watcher")
        assert watcher.subscribe("late/#", 0) == 0
        node.connect("late-node")
        topic_id = node.register("late/up", 1)
        node.publish(topic_id, b"here", 2)
        assert watcher.expect().payload == b"here"
    finally:
        pair.stop()


def test_the_same_device_configured_twice_is_refused_before_anything_starts(tmp_path: Path) -> None:
    device = str(tmp_path / "ttyUSB0")
    config = build_section(Config, {"hardware": {"serial": [{"device": device}, {"device": device}]}})
    app = App(config)
    with pytest.raises(
        ConfigError, match=r"hardware\.serial\[1\]\.device: .* is already hardware\.serial\[0\]"
    ):
        asyncio.run(app.start())
    assert app.broker is None and app.listeners == {}


NOISE = {
    "length": b"\x00\x00\x00\x00\x00\x00",  # a line break: no MQTT-SN length starts with 0x00
    "slip": b"\x55\xaa\xdb\x07\x13\xc0",  # a bad escape: the frame is dropped at its END
    "xbee1": b"\x55\xaa\x7e\x00\x05\x90\x01\x02",  # a start delimiter whose frame never completes
    "xbee2": b"\x55\xaa\x7e\x00\x05\x90\x01\x02",
}


@pytest.mark.parametrize("framing", FRAMINGS)
def test_line_noise_between_frames_is_skipped_and_the_next_frame_still_works(
    framing: str,
    ptys: Callable[[str], PtyPair],
    start_broker: Callable[..., Any],
    nodes: Callable[..., Node],
    clients: Clients,
    logs: LogWatch,
) -> None:
    pair = ptys("noisy")
    mqgate = start_broker(hardware={"serial": [serial_link(pair.gateway_end, framing)]})
    node = nodes(pair.node_end, framing)
    watcher = clients.paho(mqgate.port, "watcher")
    assert watcher.subscribe("noisy/#", 0) == 0
    node.write(NOISE[framing])
    node.connect("noisy-node")
    topic_id = node.register("noisy/up", 1)
    node.write(NOISE[framing])
    node.publish(topic_id, b"clean", 2)
    assert watcher.expect().payload == b"clean"

    framer = runner(mqgate, pair.gateway_end).link.framer
    assert mqgate.call(lambda: framer.metrics.garbage_bytes) > 0
    assert mqgate.call(lambda: runner(mqgate, pair.gateway_end).gateway.metrics.malformed) == 0
    logs.wait(f"serial {pair.gateway_end}: skipped line noise")
