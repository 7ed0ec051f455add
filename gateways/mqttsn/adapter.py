"""The MQTT-SN gateway on a UDP socket: the thin asyncio adapter around :class:`MqttSnGateway`.

It feeds datagrams in, sends what the gateway queued, opens the broker sessions channels ask for (one task per
CONNECT, none per message), re-arms one timer at the gateway's earliest deadline, and sends ADVERTISE every
``advertise_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from core.broker.types import ClientInfo, Credentials
from core.clock import LoopClock
from core.config import MqttSnConfig, parse_bind
from gateways.base import Broker
from gateways.mqttsn.channel import MqttSnChannel
from gateways.mqttsn.gateway import MqttSnGateway

__all__ = ["MqttSnUdpGateway"]

log = logging.getLogger("mqgate.mqttsn")


class MqttSnUdpGateway(asyncio.DatagramProtocol):
    """``gateways.mqttsn.bind``: every MQTT-SN client on this socket becomes a broker session."""

    name = "mqttsn:udp"

    def __init__(self, config: MqttSnConfig, broker: Broker) -> None:
        self.config = config
        self.broker = broker
        self.loop = asyncio.get_running_loop()
        self.gateway = MqttSnGateway(config, LoopClock(self.loop))
        self.gateway.on_output = self._schedule_flush
        self.host, self.port = parse_bind(config.bind, "gateways.mqttsn.bind")
        self._transport: asyncio.DatagramTransport | None = None
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._advertiser: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind the socket (OSError if it cannot be bound) and start advertising."""
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: self, local_addr=(self.host, self.port), allow_broadcast=True
        )
        self._transport = transport
        self.port = self._transport.get_extra_info("sockname")[1]
        if self.config.enable_qos3:
            client = ClientInfo(self.config.qos3_clientid, "mqttsn", self.address)
            self.gateway.qos3_session = await self.broker.open_session(
                client, clean_start=True, expiry=0, will=None, sink=_NoDeliveries(), max_inflight=1
            )
        if self.config.advertise_interval:
            self._advertise()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.gateway.receive_datagram(data, addr, self.loop.time())
        self._flush()

    def error_received(self, exc: Exception) -> None:
        log.info("mqttsn socket error: %s", exc)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        gateway = self.gateway
        for peer, data in gateway.datagrams_to_send():
            if transport is not None:
                transport.sendto(data, cast(tuple[str, int], peer))
        for channel in gateway.take_session_requests():
            task = self.loop.create_task(self._open_session(channel))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        deadline = gateway.get_timer()
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = None if deadline is None else self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.gateway.handle_timer(self.loop.time())
        self._flush()

    async def _open_session(self, channel: MqttSnChannel) -> None:
        config = self.config
        client = ClientInfo(
            config.clientid_prefix + channel.client_id, "mqttsn", str(channel.peer), config.username or None
        )
        credentials = Credentials(
            config.username or None, config.password.encode() if config.password else None
        )
        try:
            auth = await self.broker.authenticate(client, credentials)
            if not auth.allowed:
                channel.session_refused(auth.reason_code, self.loop.time())
                return
            session = await self.broker.open_session(
                client,
                clean_start=channel.clean_session,
                expiry=0 if channel.clean_session else config.session_expiry,
                will=channel.will,
                sink=channel,
                max_inflight=config.max_inflight,
            )
            channel.session_opened(session, self.loop.time())
        except Exception:
            log.exception("mqttsn %s: opening the broker session failed", channel.client_id)
            channel.session_refused(0x88, self.loop.time())
        finally:
            self._flush()

    def _advertise(self) -> None:
        host, port = parse_bind(self.config.advertise_address, "gateways.mqttsn.advertise_address")
        if self._transport is not None:
            self._transport.sendto(self.gateway.advertise(), (host, port))
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
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class _NoDeliveries:
    """The QoS -1 session subscribes to nothing; anything delivered to it is dropped."""

    def deliver(self, *args: object) -> None:
        pass

    def deliver_pubrel(self, packet_id: int) -> None:
        pass

    def kick(self, reason_code: int) -> None:
        pass
