"""Gateways over links: the MQTT-SN gateway run over any :class:`~hardware.link.Link` exactly as
:class:`~gateways.mqttsn.adapter.MqttSnUdpGateway` runs it over UDP.

:class:`MqttSnLinkGateway` feeds every frame the link receives to its own pure
:class:`~gateways.mqttsn.gateway.MqttSnGateway` with the frame's link address as the peer (forwarder
encapsulation is the gateway's business: a node behind a forwarder is ``fwd:{link address}/{node id}``),
sends what the gateway queued back through the link, opens the broker sessions channels ask for (the same
function as the UDP adapter), and re-arms one timer at the gateway's earliest deadline. When the link reports
that its device went away, every client of that link is lost at once (wills published); they come back by
reconnecting once the link is open again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Hashable
from typing import TYPE_CHECKING, Any, Protocol

from core.clock import LoopClock
from core.config import MqttSnConfig
from gateways.base import Broker, SettledOutbox
from gateways.mqttsn.adapter import channel_peer, describe_mqttsn, open_channel_session, open_qos3_session
from gateways.mqttsn.channel import MqttSnChannel
from gateways.mqttsn.gateway import MqttSnGateway
from hardware.link import Link, LinkAddress

if TYPE_CHECKING:
    from core.trace import DatagramTrace

__all__ = ["LossReportingLink", "MqttSnLinkGateway"]

log = logging.getLogger("mqgate.hardware")


class LossReportingLink(Link, Protocol):
    """A link whose device can go away and come back (a serial port): it calls :attr:`on_lost` once per
    loss, with the reason, and reopens by itself."""

    on_lost: Callable[[str], None]


class MqttSnLinkGateway:
    """Every MQTT-SN node reachable through one link becomes a broker session (``mqttsn:{link name}``)."""

    trace_protocol = "mqttsn"

    def __init__(self, config: MqttSnConfig, broker: Broker, link: LossReportingLink) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.broker = broker
        self.link = link
        self.name = f"mqttsn:{link.name}"
        self.gateway = MqttSnGateway(config, LoopClock(self.loop))
        self.gateway.on_output = self.schedule_flush
        link.on_frame = self._frame_received
        link.on_lost = self._link_lost
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._advertiser: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.packet_trace: DatagramTrace | None = None  # set by core.trace while a client-id trace runs
        self._outbox = SettledOutbox(self.name, broker, self._send)

    @property
    def address(self) -> str:
        return self.link.name

    def trace_peer(self, client_id: str) -> Hashable | None:
        return channel_peer(self.gateway, self.config, client_id)

    def describe_datagram(self, data: bytes) -> str:
        return describe_mqttsn(data)

    async def start(self) -> None:
        """Open the link (a device that is not there yet is retried by the link) and the QoS -1 session."""
        if self.config.enable_qos3:
            # One per link: the UDP gateway holds ``qos3_clientid`` itself.
            self.gateway.qos3_session = await open_qos3_session(
                self.broker, f"{self.config.qos3_clientid}@{self.link.name}", self.link.name
            )
        await self.link.open()
        if self.config.advertise_interval:
            self._advertiser = self.loop.call_later(self.config.advertise_interval, self._advertise)

    async def stop(self) -> None:
        if self._advertiser is not None:
            self._advertiser.cancel()
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.gateway.shutdown()
        if self.gateway.qos3_session is not None:
            self.gateway.qos3_session.close(publish_will=False)
            self.gateway.qos3_session = None
        await self.link.close()

    # --- link callbacks

    def _frame_received(self, address: LinkAddress, frame: bytes) -> None:
        if self.packet_trace is None:
            self.gateway.receive_datagram(frame, address, self.loop.time())
        else:
            self.packet_trace.receive(self.gateway.receive_datagram, frame, address, self.loop.time())
        self.flush()

    def _link_lost(self, reason: str) -> None:
        lost = self.gateway.lose_all(self.loop.time(), f"link {self.link.name} lost")  # the link logs why
        if lost:
            log.info("%s: %d client(s) lost with the link", self.name, lost)
        self.flush()

    def _advertise(self) -> None:
        self.link.broadcast(self.gateway.advertise())
        self._advertiser = self.loop.call_later(self.config.advertise_interval, self._advertise)

    # --- the transmit() pattern of gateways/udp.py

    def schedule_flush(self) -> None:
        """Output appeared outside a frame or timer callback (a broker delivery): flush soon."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        self._outbox.push(self.gateway.datagrams_to_send())  # sent once the broker settled what they answer
        for channel in self.gateway.take_session_requests():
            self._spawn(self._open_session(channel))
        deadline = self.gateway.get_timer()
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = None if deadline is None else self.loop.call_at(deadline, self._on_timer)

    def _send(self, peer: Hashable, data: bytes) -> None:
        if self.packet_trace is not None:
            self.packet_trace.sent(peer, data)
        self.link.send(str(peer), data)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.gateway.handle_timer(self.loop.time())
        self.flush()

    async def _open_session(self, channel: MqttSnChannel) -> None:
        try:
            await open_channel_session(self.broker, self.config, channel, self.loop.time)
        finally:
            self.flush()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
