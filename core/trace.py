"""Traces (``POST /api/v5/trace``): every broker event of one client id, or of the topics matching one filter,
written as JSON lines to a file that the API serves, until the trace's end time or its deletion.

Every protocol goes through the broker (the gateways are broker sessions), so the trace sees the client's
connection and session events, subscriptions and every message it publishes or receives, whatever its
protocol. While a trace runs, :class:`TraceManager` wraps the broker's entry points on the broker instance;
with none running the broker is back to its own methods, so tracing costs nothing when unused.

A client-id trace also writes every packet the client sends or receives (``"event": "packet"``): MQTT over
TCP, TLS and WebSocket (:class:`StreamTrace`), MQTT-SN over UDP or a serial link, CoAP and LwM2M
(:class:`DatagramTrace`; CoAP over DTLS is not traced: its datagrams are ciphertext). Each line names the
client, protocol, direction, peer, the packet decoded (type and main fields) and its first ``MAX_RAW`` bytes
in hex. The hooks are one attribute per connection or gateway, None unless a client-id trace runs: a
connection whose CONNECT arrives while one runs is watched until its client id is known, its CONNECT traced
with it. A topic trace writes events only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, Protocol, runtime_checkable

from core.broker.broker import Broker
from core.broker.session import Session
from core.broker.types import ClientInfo, Message, Subscription
from core.errors import MalformedPacket
from core.listeners.tcp import MqttProtocol, MqttTcpListener
from core.logging import format_peer
from core.mqtt.codec import Connect, decode_packet
from core.mqtt.connection import ConnectionState
from core.mqtt.numbers import ProtocolVersion
from core.topics import filter_matches, validate_filter

__all__ = [
    "DatagramEndpoint",
    "DatagramTrace",
    "StreamTrace",
    "Trace",
    "TraceError",
    "TraceManager",
    "describe_fields",
]

log = logging.getLogger("mqgate.trace")

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_PAYLOAD = 1024  # bytes of payload written per message
MAX_TRACES = 32
MAX_RAW = 1024  # bytes of a packet written as hex
MAX_HELD = 16  # packets of a connection held until its client id is known
_WRAPPED = ("publish", "open_session", "connection_lost", "subscribe", "unsubscribe", "discard_session")


class TraceError(Exception):
    """A trace request that cannot be honoured: ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(slots=True, eq=False)
class Trace:
    name: str
    kind: str  # "clientid" or "topic"
    target: str
    path: str
    started_at: float  # wall clock
    end_at: float  # wall clock
    file: IO[str] | None = None
    events: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.file is not None

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind,
            self.kind: self.target,
            "status": "running" if self.running else "stopped",
            "start_at": _rfc3339(self.started_at),
            "end_at": _rfc3339(self.end_at),
            "events": self.events,
            "size": os.path.getsize(self.path) if os.path.exists(self.path) else 0,
        }

    def concerns(self, client_id: str | None, topic: str | None) -> bool:
        if self.kind == "clientid":
            return client_id == self.target
        return topic is not None and filter_matches(self.target, topic)

    def write(self, entry: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.events += 1
        self.file.write(json.dumps({"time": _rfc3339(time.time()), **entry}, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.file is not None:
            self.file.close()
            self.file = None


def _rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall).astimezone().isoformat(timespec="milliseconds")


def _client(client: ClientInfo) -> dict[str, Any]:
    return {"clientid": client.client_id, "protocol": client.protocol, "peer": client.peer}


def _message(message: Message) -> dict[str, Any]:
    return {
        "topic": message.topic,
        "qos": message.qos,
        "retain": message.retain,
        "payload_size": len(message.payload),
        "payload": base64.b64encode(message.payload[:MAX_PAYLOAD]).decode(),
    }


_LEFT_OUT = frozenset({"password", "properties", "wire"})  # secrets, and no main fields
_FIELD_NAMES = {"packet_id": "id", "msg_id": "id", "data": "payload"}


def describe_fields(packet: object) -> str:
    """``NAME field=value ...`` of a decoded packet dataclass: flags as 0/1, byte strings as ``{name}_size``
    (last), a will by its topic, subscriptions as ``filter:qos``; passwords and properties left out."""
    parts = [type(packet).__name__.upper()]
    sizes = []
    for item in dataclasses.fields(packet):  # type: ignore[arg-type]
        if item.name in _LEFT_OUT:
            continue
        value = getattr(packet, item.name)
        key = _FIELD_NAMES.get(item.name, item.name)
        if value is None:
            continue
        if isinstance(value, bool):
            parts.append(f"{key}={int(value)}")
        elif isinstance(value, bytes):
            sizes.append(f"{key}_size={len(value)}")
        elif isinstance(value, tuple):
            parts.append(f"{key}=" + ",".join(_item(element) for element in value))
        elif dataclasses.is_dataclass(value):
            parts.append(f"{key}_topic={getattr(value, 'topic', '')}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts + sizes)


def _item(element: object) -> str:
    topic_filter = getattr(element, "topic_filter", None)
    return str(element) if topic_filter is None else f"{topic_filter}:{getattr(element, 'qos', 0)}"


def _mqtt_frames(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """``(start, body, end)`` of every complete MQTT packet in ``data`` (§2.1), and where the rest starts."""
    frames: list[tuple[int, int, int]] = []
    pos = 0
    size = len(data)
    while size - pos >= 2:
        length = 0
        shift = 0
        body = pos + 1
        while True:
            if body >= size or body - pos > 4:
                return frames, pos
            byte = data[body]
            body += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 128:
                break
        if body + length > size:
            break
        frames.append((pos, body, body + length))
        pos = body + length
    return frames, pos


@runtime_checkable
class DatagramEndpoint(Protocol):
    """A gateway whose datagrams can be traced (MQTT-SN over UDP or a link, CoAP, LwM2M): it calls its
    ``packet_trace`` for each datagram received and sent while that is not None."""

    name: str
    trace_protocol: str
    packet_trace: DatagramTrace | None

    def trace_peer(self, client_id: str) -> Hashable | None:
        """The peer the client of broker client id ``client_id`` talks from, if it is this gateway's."""
        ...

    def describe_datagram(self, data: bytes) -> str:
        """The datagram's message type and main fields."""
        ...


class StreamTrace:
    """The MQTT packets crossing one connection (TCP, TLS or WebSocket), cut from the byte stream.

    Attached to a connection while its CONNECT is awaited (``client_id`` None), it holds what it decodes
    until a CONNECT names a traced client id, or else until the connection's first answer, when the
    connection knows its client id (assigned ones included): a traced id has the held packets written, any
    other detaches the trace from the connection.
    """

    __slots__ = ("_held", "_pending", "client_id", "manager", "protocol", "version")

    def __init__(
        self, manager: TraceManager, protocol: MqttProtocol, client_id: str | None, version: int
    ) -> None:
        self.manager = manager
        self.protocol = protocol
        self.client_id = client_id
        self.version = version
        self._pending = b""
        self._held: list[dict[str, Any]] = []

    def received(self, data: bytes) -> None:
        """Bytes read from the client: every packet they complete."""
        if self._pending:
            data = self._pending + data
        frames, rest = _mqtt_frames(data)
        self._pending = data[rest:]
        for start, body, end in frames:
            self._packet("in", data, start, body, end)

    def sent(self, data: bytes) -> None:
        """Bytes written to the client: whole packets."""
        if self.client_id is None:
            connection = self.protocol.connection
            client_id = connection.client_id if connection is not None else ""
            if client_id not in self.manager.traced:
                self.protocol.trace = None
                return
            self._attach(client_id)
        frames, _ = _mqtt_frames(data)
        for start, body, end in frames:
            self._packet("out", data, start, body, end)

    def _packet(self, direction: str, data: bytes, start: int, body: int, end: int) -> None:
        try:
            packet = decode_packet(data, start, body, end, self.version)
        except MalformedPacket as exc:
            described = f"MALFORMED {exc}"
        else:
            described = describe_fields(packet)
            if isinstance(packet, Connect):
                self.version = packet.protocol_version
                if self.client_id is None and packet.client_id in self.manager.traced:
                    self._attach(packet.client_id)
        entry = _packet_entry(
            self.client_id, "mqtt", direction, self.protocol.peer, described, data[start:end]
        )
        entry["listener"] = self.protocol.listener.name
        if self.client_id is not None:
            self.manager.write_packet(self.client_id, entry)
        elif len(self._held) < MAX_HELD:
            self._held.append(entry)

    def _attach(self, client_id: str) -> None:
        self.client_id = client_id
        held, self._held = self._held, []
        for entry in held:
            self.manager.write_packet(client_id, {**entry, "clientid": client_id})


class DatagramTrace:
    """The datagrams of the traced clients of one gateway; ``peers`` maps the peers found so far to their
    client id (a datagram from another peer asks the gateway whose peer each traced client is)."""

    __slots__ = ("endpoint", "manager", "peers")

    def __init__(self, manager: TraceManager, endpoint: DatagramEndpoint) -> None:
        self.manager = manager
        self.endpoint = endpoint
        self.peers: dict[Hashable, str] = {}

    def receive(
        self, handle: Callable[[bytes, Hashable, float], None], data: bytes, peer: Hashable, now: float
    ) -> None:
        """Trace a datagram and ``handle`` it: a traced peer's is written first, a new peer's once handled
        (when its CONNECT or registration has named its client)."""
        client_id = self.peers.get(peer)
        if client_id is not None:
            self._write(client_id, "in", peer, data)
        handle(data, peer, now)
        if client_id is None:
            client_id = self._find(peer)
            if client_id is not None:
                self._write(client_id, "in", peer, data)

    def sent(self, peer: Hashable, data: bytes) -> None:
        client_id = self.peers.get(peer) or self._find(peer)
        if client_id is not None:
            self._write(client_id, "out", peer, data)

    def _write(self, client_id: str, direction: str, peer: Hashable, data: bytes) -> None:
        endpoint = self.endpoint
        described = endpoint.describe_datagram(data)
        entry = _packet_entry(
            client_id, endpoint.trace_protocol, direction, format_peer(peer), described, data
        )
        entry["listener"] = endpoint.name
        self.manager.write_packet(client_id, entry)

    def _find(self, peer: Hashable) -> str | None:
        for client_id in self.manager.traced:
            if self.endpoint.trace_peer(client_id) == peer:
                self.peers[peer] = client_id
                return client_id
        return None


def _packet_entry(
    client_id: str | None, protocol: str, direction: str, peer: str, described: str, raw: bytes
) -> dict[str, Any]:
    return {
        "event": "packet",
        "clientid": client_id,
        "protocol": protocol,
        "direction": direction,
        "peer": peer,
        "packet": described,
        "size": len(raw),
        "hex": raw[:MAX_RAW].hex(),
    }


class TraceManager:
    """The traces of one broker, their files under ``directory``."""

    def __init__(
        self, broker: Broker, directory: str, endpoints: Callable[[], Iterable[object]] = tuple
    ) -> None:
        self.broker = broker
        self.directory = directory
        self.endpoints = endpoints  # the listeners and gateways whose packets client-id traces write
        self.traces: dict[str, Trace] = {}
        self.traced: dict[str, list[Trace]] = {}  # client id -> its running traces
        self._installed = False

    # --- lifetime of traces

    def start(self, name: str, kind: str, target: str, duration: float) -> Trace:
        if not NAME.fullmatch(name) or name.startswith("."):
            raise TraceError(400, "BAD_REQUEST", "name: 1-64 letters, digits, '_', '-' or '.'")
        if name in self.traces:
            raise TraceError(409, "ALREADY_EXISTS", f"a trace named {name!r} exists")
        if len(self.traces) >= MAX_TRACES:
            raise TraceError(409, "TOO_MANY_TRACES", f"at most {MAX_TRACES} traces; delete one first")
        if kind == "topic" and validate_filter(target) is not None:
            raise TraceError(400, "BAD_REQUEST", f"topic: {validate_filter(target)}")
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{name}.jsonl")
        now = time.time()
        trace = Trace(name, kind, target, path, now, now + duration)
        trace.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by Trace.close
        trace.timer = asyncio.get_running_loop().call_later(duration, self.stop, name)
        self.traces[name] = trace
        self._install()
        self._retap()
        log.info("trace %s started: %s %s for %.0f s", name, kind, target, duration)
        return trace

    def stop(self, name: str) -> None:
        trace = self.traces.get(name)
        if trace is None or not trace.running:
            return
        trace.close()
        log.info("trace %s stopped after %d events", name, trace.events)
        self._retap()
        if not any(t.running for t in self.traces.values()):
            self._uninstall()

    def delete(self, name: str) -> bool:
        trace = self.traces.pop(name, None)
        if trace is None:
            return False
        trace.close()
        self._retap()
        if not any(t.running for t in self.traces.values()):
            self._uninstall()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trace.path)
        return True

    def close(self) -> None:
        for name in list(self.traces):
            self.stop(name)
        self._uninstall()

    # --- the packet hooks

    def write_packet(self, client_id: str, entry: dict[str, Any]) -> None:
        for trace in self.traced.get(client_id, ()):
            trace.write(entry)

    def tap(self, protocol: MqttProtocol) -> None:
        """Give an MQTT connection the trace it needs now: a pending one while its CONNECT is awaited, its
        client's while that is traced, none otherwise."""
        connection = protocol.connection
        current = protocol.trace
        if connection is None or not self.traced:
            protocol.trace = None
        elif connection.state is ConnectionState.AWAITING_CONNECT:
            if current is None:
                protocol.trace = StreamTrace(self, protocol, None, ProtocolVersion.V311)
        elif connection.client_id in self.traced:
            if current is None or current.client_id not in (None, connection.client_id):
                protocol.trace = StreamTrace(self, protocol, connection.client_id, connection.version)
        elif current is None or current.client_id is not None:
            protocol.trace = None

    def _retap(self) -> None:
        """Point every listener, connection and gateway at the client-id traces now running; with none
        running every hook is back to None."""
        traced: dict[str, list[Trace]] = {}
        for trace in self.traces.values():
            if trace.running and trace.kind == "clientid":
                traced.setdefault(trace.target, []).append(trace)
        self.traced = traced
        for endpoint in self.endpoints():
            if isinstance(endpoint, MqttTcpListener):
                endpoint.tracer = self if traced else None
                for protocol in endpoint.connections:
                    self.tap(protocol)
            elif isinstance(endpoint, DatagramEndpoint):  # the peers found so far stay known
                if not traced:
                    endpoint.packet_trace = None
                elif endpoint.packet_trace is None:
                    endpoint.packet_trace = DatagramTrace(self, endpoint)

    # --- the broker hooks

    def _emit(self, client_id: str | None, topic: str | None, entry: Callable[[], dict[str, Any]]) -> None:
        built: dict[str, Any] | None = None
        for trace in self.traces.values():
            if trace.running and trace.concerns(client_id, topic):
                if built is None:
                    built = entry()
                trace.write(built)

    def _receivers(self, topic: str) -> list[Session]:
        """Traced clients whose subscriptions match ``topic``."""
        found = []
        for trace in self.traces.values():
            if trace.running and trace.kind == "clientid":
                session = self.broker.sessions.get(trace.target)
                if session is not None and any(
                    filter_matches(sub.topic_filter.split("/", 2)[-1] if sub.share_group else f, topic)
                    for f, sub in session.subscriptions.items()
                ):
                    found.append(session)
        return found

    def _install(self) -> None:
        if self._installed:
            return
        self._installed = True
        broker = self.broker
        original = {name: getattr(broker, name) for name in _WRAPPED}

        def publish(message: Message, now: float) -> int:
            receivers = self._receivers(message.topic)
            count: int = original["publish"](message, now)
            sender = message.sender or None
            self._emit(
                sender, message.topic, lambda: {"event": "publish", "clientid": sender, **_message(message)}
            )
            for session in receivers:
                if session.client_id != sender:
                    delivered: dict[str, Any] = {
                        "event": "deliver",
                        **_client(session.client),
                        **_message(message),
                    }
                    for trace in self.traces.values():
                        if trace.running and trace.concerns(session.client_id, None):
                            trace.write(delivered)
            return count

        def open_session(client: ClientInfo, **kwargs: Any) -> tuple[Session, bool]:
            result: tuple[Session, bool] = original["open_session"](client, **kwargs)
            if client.client_id in self.traced:  # a listener or gateway started since the trace did
                self._retap()
            self._emit(
                client.client_id,
                None,
                lambda: {"event": "connected", **_client(client), "clean_start": kwargs.get("clean_start")},
            )
            return result

        def connection_lost(session: Session, **kwargs: Any) -> None:
            self._emit(session.client_id, None, lambda: {"event": "disconnected", **_client(session.client)})
            original["connection_lost"](session, **kwargs)

        def subscribe(session: Session, sub: Subscription, now: float) -> tuple[int, list[Message]]:
            result: tuple[int, list[Message]] = original["subscribe"](session, sub, now)
            self._emit(
                session.client_id,
                None,
                lambda: {
                    "event": "subscribe",
                    **_client(session.client),
                    "topic": sub.topic_filter,
                    "qos": sub.qos,
                    "result": result[0],
                },
            )
            return result

        def unsubscribe(session: Session, topic_filter: str) -> bool:
            removed: bool = original["unsubscribe"](session, topic_filter)
            self._emit(
                session.client_id,
                None,
                lambda: {"event": "unsubscribe", **_client(session.client), "topic": topic_filter},
            )
            return removed

        def discard_session(client_id: str, now: float) -> bool:
            self._emit(client_id, None, lambda: {"event": "kicked", "clientid": client_id})
            done: bool = original["discard_session"](client_id, now)
            return done

        for name, wrapper in (
            ("publish", publish),
            ("open_session", open_session),
            ("connection_lost", connection_lost),
            ("subscribe", subscribe),
            ("unsubscribe", unsubscribe),
            ("discard_session", discard_session),
        ):
            setattr(broker, name, wrapper)

    def _uninstall(self) -> None:
        if not self._installed:
            return
        self._installed = False
        for name in _WRAPPED:
            self.broker.__dict__.pop(name, None)
