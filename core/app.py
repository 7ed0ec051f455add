"""The running suite: the broker, its listeners, the gateways and their periodic duties, started and stopped
as one."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from typing import Protocol

from core.broker.broker import Broker
from core.broker.embedded import EmbeddedBroker
from core.clock import LoopClock
from core.config import Config, SerialLinkConfig, parse_bind
from core.errors import ConfigError
from core.listeners.tcp import MqttTcpListener
from gateways.base import Broker as GatewayBroker
from gateways.upstream import UpstreamBroker

__all__ = ["App", "Listener"]

log = logging.getLogger("mqgate")

TICK_SECONDS = 1.0


class Listener(Protocol):
    """A started listener or gateway socket."""

    name: str

    @property
    def address(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class App:
    """Owns the broker, the listeners and the gateways; ``start`` binds every address, ``stop`` closes all."""

    def __init__(self, config: Config, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.broker: Broker | None = None
        self.listeners: dict[str, Listener] = {}
        self.upstream: UpstreamBroker | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the broker, listeners and gateways; ConfigError names an address that cannot be bound."""
        _check_serial_devices(self.config)
        loop = asyncio.get_running_loop()
        broker = self.broker = Broker(
            self.config.broker,
            rng=self.rng,
            node_name=f"mqgate@{socket.gethostname()}",
            started_at=loop.time(),
        )
        gateway_broker: GatewayBroker = EmbeddedBroker(broker, LoopClock(loop))
        upstream_config = self.config.upstream
        tcp = self.config.listeners.tcp
        mqttsn = self.config.gateways.mqttsn
        coap = self.config.gateways.coap
        lwm2m = self.config.gateways.lwm2m
        try:
            if upstream_config.url:
                upstream = self.upstream = UpstreamBroker(upstream_config, LoopClock(loop), rng=self.rng)
                await upstream.start()
                gateway_broker = upstream
            if tcp.enabled and (not upstream_config.url or upstream_config.embedded_listeners):
                host, port = parse_bind(tcp.bind, "listeners.tcp.bind")
                await self._start(
                    MqttTcpListener(
                        broker, host, port, max_connections=tcp.max_connections, backlog=tcp.backlog
                    ),
                    "listeners.tcp.bind",
                    tcp.bind,
                )
            if mqttsn.enabled:
                from gateways.mqttsn.adapter import MqttSnUdpGateway

                sn_gateway = MqttSnUdpGateway(mqttsn, gateway_broker)
                await self._start(sn_gateway, "gateways.mqttsn.bind", mqttsn.bind)
            if coap.enabled:
                from gateways.coap.adapter import CoapUdpGateway

                await self._start(CoapUdpGateway(coap, gateway_broker), "gateways.coap.bind", coap.bind)
            if lwm2m.enabled:
                from gateways.lwm2m.adapter import LwM2mUdpGateway

                await self._start(LwM2mUdpGateway(lwm2m, gateway_broker), "gateways.lwm2m.bind", lwm2m.bind)
            for link in self.config.hardware.serial:
                await self._start_serial(link, gateway_broker)
        except BaseException:
            await self.stop()
            raise
        self._ticker = asyncio.create_task(self._tick(), name="mqgate-tick")

    async def _start(self, listener: Listener, key: str, bind: str) -> None:
        try:
            await listener.start()
        except OSError as exc:
            await listener.stop()
            raise ConfigError(f"{key}: cannot listen on {bind}: {exc.strerror or exc}") from None
        self.listeners[listener.name] = listener
        log.info("%s listening on %s", listener.name, listener.address)

    async def _start_serial(self, config: SerialLinkConfig, broker: GatewayBroker) -> None:
        """One gateway per serial link. A device that cannot be opened is not fatal: its link logs it and
        keeps reopening it with backoff."""
        from hardware.gateway import MqttSnLinkGateway
        from hardware.serial import SerialLink

        gateway = MqttSnLinkGateway(self.config.gateways.mqttsn, broker, SerialLink(config, rng=self.rng))
        self.listeners[gateway.name] = gateway
        await gateway.start()

    async def _tick(self) -> None:
        """Will delays, session expiry and $SYS, once a second (their units are seconds)."""
        broker = self.broker
        assert broker is not None
        loop = asyncio.get_running_loop()
        interval = self.config.broker.sys_interval
        next_sys = loop.time()
        while True:
            now = loop.time()
            broker.handle_timeouts(now)
            if interval and now >= next_sys:
                broker.publish_sys(now)
                next_sys = now + interval
            await asyncio.sleep(TICK_SECONDS)

    async def stop(self) -> None:
        """Close gateways, listeners, connections (v5 clients get DISCONNECT 0x8B); publish pending wills."""
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        for listener in reversed(list(self.listeners.values())):
            await listener.stop()
        self.listeners.clear()
        if self.upstream is not None:
            await self.upstream.stop()
            self.upstream = None
        if self.broker is not None:
            self.broker.shutdown(asyncio.get_running_loop().time())


def _check_serial_devices(config: Config) -> None:
    """Each serial device once: two gateways cannot share one port."""
    seen: dict[str, int] = {}
    for index, link in enumerate(config.hardware.serial):
        first = seen.get(link.device)
        if first is not None:
            raise ConfigError(
                f"hardware.serial[{index}].device: {link.device} is already hardware.serial[{first}]"
            )
        seen[link.device] = index
