"""The MQTT-over-TCP listener: a thin asyncio adapter around the pure :class:`MqttConnection`.

Writes are gathered per connection and flushed once per loop iteration (one ``writelines`` per connection
however many messages a batch of input produced), and a paused transport (the peer is not reading) turns
QoS 0 deliveries into counted drops instead of growing an unbounded buffer (DESIGN §6).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, cast

from core.broker.broker import Broker
from core.listeners.tls import TlsSettings, chain_too_deep, peer_certificate
from core.logging import client_fields, format_peer
from core.mqtt.connection import ConnectionState, MqttConnection
from core.mqtt.numbers import ReasonCode

if TYPE_CHECKING:
    from core.trace import StreamTrace, TraceManager

__all__ = ["MqttProtocol", "MqttTcpListener"]

log = logging.getLogger("mqgate.listener")

WRITE_HIGH_WATER = 4 * 1024 * 1024


class MqttProtocol(asyncio.Protocol):
    """One TCP (or TLS) connection; also the :class:`core.mqtt.connection.Transport` of its MqttConnection.

    Subclasses (WebSocket) override :meth:`_start`, :meth:`data_received`, :meth:`_send` and
    :meth:`_close_transport`, and call :meth:`_open` and :meth:`_feed`.
    """

    __slots__ = ("_out", "_paused", "_timer", "_transport", "connection", "listener", "peer", "trace")

    def __init__(self, listener: MqttTcpListener) -> None:
        self.listener = listener
        self._out: list[bytes] = []
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self.connection: MqttConnection | None = None
        self.peer = ""
        self.trace: StreamTrace | None = None  # set by core.trace while a client-id trace concerns this

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._transport = transport
        listener = self.listener
        self.peer = format_peer(transport.get_extra_info("peername"))
        if len(listener.connections) >= listener.max_connections:
            log.warning(
                "%s: refusing %s: max_connections reached",
                listener.name,
                self.peer,
                extra=client_fields(None, self.peer, "mqtt"),
            )
            transport.abort()
            return
        if listener.tls is not None and chain_too_deep(transport, listener.tls.depth):
            listener.handshake_failed(self.peer)
            log.warning(
                "%s: refusing %s: client certificate chain longer than depth %d",
                listener.name,
                self.peer,
                listener.tls.depth,
                extra=client_fields(None, self.peer, "mqtt"),
            )
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        listener.connections.add(self)
        self._start(transport)

    def _start(self, transport: asyncio.Transport) -> None:
        """The transport is ready: plain MQTT starts at once."""
        self._open(self.peer)

    def _open(self, peer: str) -> None:
        """Bind the stream to a new MqttConnection; ``peer`` is the client's address as logged and shown."""
        assert self._transport is not None
        now = self.listener.loop.time()
        cert = peer_certificate(self._transport) if self.listener.tls is not None else None
        self.peer = peer
        self.connection = MqttConnection(self.listener.broker, self, peer, now, cert)
        if self.listener.tracer is not None:
            self.listener.tracer.tap(self)
        self._arm(self.connection.check_keepalive(now))

    def _feed(self, data: bytes) -> None:
        connection = self.connection
        if connection is not None:
            if self.trace is not None:
                self.trace.received(data)
            now = self.listener.loop.time()
            awaiting = connection.state is ConnectionState.AWAITING_CONNECT
            connection.data_received(data, now)
            if awaiting and connection.state is ConnectionState.CONNECTED:
                # The CONNECT timeout is over: from now on the keepalive deadline applies (§3.1.2.10).
                if self._timer is not None:
                    self._timer.cancel()
                self._arm(connection.check_keepalive(now))

    data_received = _feed  # plain MQTT: no indirection on the hot path

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        listener = self.listener
        listener.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.connection is not None:
            self.connection.connection_lost(listener.loop.time())
        self._out.clear()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    # --- keepalive timer

    def _arm(self, deadline: float | None) -> None:
        self._timer = None if deadline is None else self.listener.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        if self.connection is not None:
            self._arm(self.connection.check_keepalive(self.listener.loop.time()))

    # --- Transport for MqttConnection

    def write(self, data: bytes) -> None:
        out = self._out
        if not out:
            self.listener.mark_dirty(self)
        out.append(data)

    def flush(self) -> None:
        out = self._out
        transport = self._transport
        if out and transport is not None and not transport.is_closing():
            data = out[0] if len(out) == 1 else b"".join(out)
            if self.trace is not None:
                self.trace.sent(data)
            self._send(transport, data)
        out.clear()

    def _send(self, transport: asyncio.Transport, data: bytes) -> None:
        transport.write(data)

    def close(self) -> None:
        self.flush()
        if self._transport is not None:
            self._close_transport(self._transport)

    def _close_transport(self, transport: asyncio.Transport) -> None:
        transport.close()

    def abort(self) -> None:
        """Drop a connection that has no MqttConnection yet (listener shutdown)."""
        if self._transport is not None:
            self._transport.abort()

    @property
    def congested(self) -> bool:
        return self._paused


class MqttTcpListener:
    """Accepts MQTT connections on one address and binds each to the broker."""

    def __init__(
        self,
        broker: Broker,
        host: str,
        port: int,
        *,
        name: str = "mqtt:tcp",
        max_connections: int = 1_000_000,
        backlog: int = 1024,
        tls: TlsSettings | None = None,
    ) -> None:
        self.broker = broker
        self.host = host
        self.port = port
        self.name = name
        self.max_connections = max_connections
        self.backlog = backlog
        self.tls = tls
        self.connections: set[MqttProtocol] = set()
        self.handshakes: set[asyncio.Task[None]] = set()
        self.handshake_failures = 0  # TLS (and WebSocket upgrade) handshakes that failed or timed out
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._socket: socket.socket | None = None  # TLS: the listening socket of the accept loop
        self._accepting: asyncio.Task[None] | None = None
        self._dirty: list[MqttProtocol] = []
        self.tracer: TraceManager | None = None  # while a client-id trace runs: new connections are tapped

    def _make_protocol(self) -> MqttProtocol:
        return MqttProtocol(self)

    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        if self.tls is None:
            self._server = await self.loop.create_server(
                self._make_protocol, self.host, self.port, backlog=self.backlog, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._accepting = self.loop.create_task(self._accept_loop(sock), name=f"{self.name}-accept")

    async def _accept_loop(self, sock: socket.socket) -> None:
        """Accept TLS connections; each handshake runs in a task of its own (``handshakes``)."""
        while True:
            try:
                conn, address = await self.loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: keep the listener, let the peer retry
                log.warning("%s: accept failed: %s", self.name, exc)
                await asyncio.sleep(0.1)
                continue
            peer = format_peer(address)
            if self.broker.access.refuses_address(peer):
                log.warning(
                    "%s: refusing %s: too many authentication failures",
                    self.name,
                    peer,
                    extra=client_fields(None, peer, "mqtt"),
                )
                conn.close()
                continue
            task = self.loop.create_task(self._handshake(conn, peer))
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)

    async def _handshake(self, conn: socket.socket, peer: str) -> None:
        tls = self.tls
        assert tls is not None
        try:
            await self.loop.connect_accepted_socket(
                self._make_protocol, conn, ssl=tls.context, ssl_handshake_timeout=tls.handshake_timeout
            )
        except asyncio.CancelledError:
            conn.close()
            raise
        except OSError as exc:  # ssl.SSLError and the handshake timeout included
            self.handshake_failed(peer)
            log.warning(
                "%s: TLS handshake with %s failed: %s",
                self.name,
                peer,
                str(exc) or type(exc).__name__,
                extra=client_fields(None, peer, "mqtt"),
            )
            conn.close()

    def handshake_failed(self, peer: str) -> None:
        """Count a failed TLS or WebSocket handshake (the caller logs why); it also counts towards the
        address's ban (``auth.max_failures_per_min``)."""
        self.handshake_failures += 1
        self.broker.access.handshake_failed(peer)

    @property
    def address(self) -> str:
        return format_peer((self.host, self.port))

    def mark_dirty(self, protocol: MqttProtocol) -> None:
        if not self._dirty:
            self.loop.call_soon(self._flush)
        self._dirty.append(protocol)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for protocol in dirty:
            protocol.flush()

    async def stop(self, reason_code: int = ReasonCode.SERVER_SHUTTING_DOWN) -> None:
        """Stop accepting, and close every connection with ``reason_code`` (v5 DISCONNECT)."""
        if self._server is not None:
            self._server.close()
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        for task in list(self.handshakes):
            task.cancel()
        if self.handshakes:
            await asyncio.gather(*self.handshakes, return_exceptions=True)
        now = self.loop.time()
        for protocol in list(self.connections):
            if protocol.connection is not None:
                protocol.connection.shutdown(reason_code, now)
            else:
                protocol.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
