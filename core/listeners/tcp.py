"""The MQTT-over-TCP listener: a thin asyncio adapter around the pure :class:`MqttConnection`.

Writes are gathered per connection and flushed once per loop iteration (one ``writelines`` per connection
however many messages a batch of input produced), and a paused transport (the peer is not reading) turns
QoS 0 deliveries into counted drops instead of growing an unbounded buffer (DESIGN §6).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import cast

from core.broker.broker import Broker
from core.mqtt.connection import ConnectionState, MqttConnection
from core.mqtt.numbers import ReasonCode

__all__ = ["MqttTcpListener"]

log = logging.getLogger("mqgate.listener")

WRITE_HIGH_WATER = 4 * 1024 * 1024


def format_peer(peer: object) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6) of a socket address."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


class _MqttProtocol(asyncio.Protocol):
    """One TCP connection; also the :class:`core.mqtt.connection.Transport` of its MqttConnection."""

    __slots__ = ("_out", "_paused", "_timer", "_transport", "connection", "listener")

    def __init__(self, listener: MqttTcpListener) -> None:
        self.listener = listener
        self._out: list[bytes] = []
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self.connection: MqttConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._transport = transport
        listener = self.listener
        if len(listener.connections) >= listener.max_connections:
            log.warning(
                "%s: refusing %s: max_connections reached",
                listener.name,
                format_peer(transport.get_extra_info("peername")),
            )
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        now = listener.loop.time()
        self.connection = MqttConnection(
            listener.broker, self, format_peer(transport.get_extra_info("peername")), now
        )
        listener.connections.add(self)
        self._arm(self.connection.check_keepalive(now))

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        if connection is not None:
            now = self.listener.loop.time()
            awaiting = connection.state is ConnectionState.AWAITING_CONNECT
            connection.data_received(data, now)
            if awaiting and connection.state is ConnectionState.CONNECTED:
                # The CONNECT timeout is over: from now on the keepalive deadline applies (§3.1.2.10).
                if self._timer is not None:
                    self._timer.cancel()
                self._arm(connection.check_keepalive(now))

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
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def close(self) -> None:
        self.flush()
        if self._transport is not None:
            self._transport.close()

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
    ) -> None:
        self.broker = broker
        self.host = host
        self.port = port
        self.name = name
        self.max_connections = max_connections
        self.backlog = backlog
        self.connections: set[_MqttProtocol] = set()
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._dirty: list[_MqttProtocol] = []

    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        self._server = await self.loop.create_server(
            lambda: _MqttProtocol(self), self.host, self.port, backlog=self.backlog, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return format_peer((self.host, self.port))

    def mark_dirty(self, protocol: _MqttProtocol) -> None:
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
        now = self.loop.time()
        for protocol in list(self.connections):
            if protocol.connection is not None:
                protocol.connection.shutdown(reason_code, now)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
