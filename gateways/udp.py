"""The asyncio side shared by the UDP gateways: feed datagrams to a pure gateway, send what it queued, open
the broker sessions it asks for, and wake it at its earliest deadline (aioquic's ``transmit()`` pattern)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine, Hashable
from typing import TYPE_CHECKING, Any, Protocol, cast

from gateways.base import SettledOutbox

if TYPE_CHECKING:
    from core.trace import DatagramTrace
    from gateways.base import Broker

__all__ = ["DatagramCore", "UdpGatewayAdapter"]

log = logging.getLogger("mqgate.udp")


RECEIVE_BUFFER = 4 * 1024 * 1024


def _grow_receive_buffer(sock: socket.socket | None) -> None:
    """Give the socket a 4 MiB receive buffer: the kernel default (about 200 KiB, a few hundred small
    datagrams) overflows under bursts from thousands of devices, and those drops are invisible to us."""
    if sock is None:
        return
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        sock.setsockopt(socket.SOL_SOCKET, force or socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError:  # SO_RCVBUFFORCE needs CAP_NET_ADMIN; the plain option is capped by net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


class DatagramCore(Protocol):
    """A pure datagram protocol engine (DESIGN §1)."""

    def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> None: ...

    def datagrams_to_send(self) -> list[tuple[Hashable, bytes]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


class UdpGatewayAdapter(asyncio.DatagramProtocol):
    """Runs a :class:`DatagramCore` on one UDP socket. Subclasses set :attr:`broker` and open broker
    sessions in :meth:`_start_work` (one task per session opening, none per message)."""

    name = "udp"
    broker: Broker

    def __init__(self, core: DatagramCore, host: str, port: int) -> None:
        self.core = core
        self.host = host
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._outbox: SettledOutbox | None = None  # made at the first flush: subclasses set the broker
        self._wire_trace: DatagramTrace | None = None  # set by core.trace while a client-id trace runs

    @property
    def packet_trace(self) -> DatagramTrace | None:
        """The trace of the datagrams of traced clients (:mod:`core.trace`), None when nobody is traced."""
        return self._wire_trace

    @packet_trace.setter
    def packet_trace(self, trace: DatagramTrace | None) -> None:
        self._wire_trace = trace

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind the socket; raises OSError when the address cannot be bound."""
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: self, local_addr=(self.host, self.port), allow_broadcast=True
        )
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        _grow_receive_buffer(transport.get_extra_info("socket"))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # once for every datagram read in this loop iteration; scheduled first, so that answers that need
        # not wait leave ahead of what handling the datagram writes elsewhere (an upstream PUBLISH)
        self.schedule_flush()
        trace = self._wire_trace
        if trace is None:
            self.core.receive_datagram(data, addr, self.loop.time())
        else:
            trace.receive(self.core.receive_datagram, data, addr, self.loop.time())

    def error_received(self, exc: Exception) -> None:
        log.info("%s socket error: %s", self.name, exc)

    def schedule_flush(self) -> None:
        """Output appeared outside a datagram or timer callback (a broker delivery): flush soon."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what the core queued once the broker has settled the publishes it acknowledges
        (:meth:`gateways.base.Broker.settle`), start the work it asked for and re-arm the timer."""
        self._flush_scheduled = False
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = SettledOutbox(self.name, self.broker, self._send)
        outbox.push(self.core.datagrams_to_send())
        self._start_work()
        deadline = self.core.get_timer()
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = None if deadline is None else self.loop.call_at(deadline, self._on_timer)

    def _send(self, peer: Hashable, data: bytes) -> None:
        if self._wire_trace is not None:
            self._wire_trace.sent(peer, data)
        if self.transport is not None:  # gone once the adapter stopped
            self.transport.sendto(data, cast(tuple[str, int], peer))

    def _start_work(self) -> None:
        """Start the tasks the core asked for (session openings)."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.core.handle_timer(self.loop.time())
        self.flush()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()
            self.transport = None
