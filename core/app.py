"""The running suite: the broker, its listeners, the gateways and their periodic duties, started and stopped
as one."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from typing import TYPE_CHECKING, Protocol

from core.auth.access import AccessControl, warn_if_anonymous_exposed
from core.bridge import Bridge
from core.broker.broker import Broker
from core.broker.embedded import EmbeddedBroker
from core.clock import LoopClock
from core.config import Config, SerialLinkConfig, parse_bind
from core.errors import ConfigError
from core.listeners.tcp import MqttTcpListener
from gateways.base import Broker as GatewayBroker
from gateways.upstream import UpstreamBroker

if TYPE_CHECKING:
    from core.api import ApiServer

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
        self.bridges: list[Bridge] = []
        self.api: ApiServer | None = None
        self._gateway_broker: GatewayBroker | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._jwks_refresh: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the broker, listeners and gateways; ConfigError names an address that cannot be bound."""
        _check_serial_devices(self.config)
        _check_bridges(self.config)
        loop = asyncio.get_running_loop()
        access = AccessControl(self.config.auth, self.config.acl, self.config.rewrite, clock=loop.time)
        broker = self.broker = Broker(
            self.config.broker,
            rng=self.rng,
            node_name=f"mqgate@{socket.gethostname()}",
            started_at=loop.time(),
            access=access,
        )
        gateway_broker: GatewayBroker = EmbeddedBroker(broker, LoopClock(loop))
        self._gateway_broker = gateway_broker
        upstream_config = self.config.upstream
        tcp = self.config.listeners.tcp
        mqttsn = self.config.gateways.mqttsn
        coap = self.config.gateways.coap
        lwm2m = self.config.gateways.lwm2m
        try:
            if self.config.bridges:
                await self._start_bridges(broker)
            if upstream_config.url:
                upstream = self.upstream = UpstreamBroker(upstream_config, LoopClock(loop), rng=self.rng)
                await upstream.start()
                gateway_broker = self._gateway_broker = upstream
            if tcp.enabled and (not upstream_config.url or upstream_config.embedded_listeners):
                host, port = parse_bind(tcp.bind, "listeners.tcp.bind")
                await self._start(
                    MqttTcpListener(
                        broker, host, port, max_connections=tcp.max_connections, backlog=tcp.backlog
                    ),
                    "listeners.tcp.bind",
                    tcp.bind,
                )
            if not upstream_config.url or upstream_config.embedded_listeners:
                for name in ("mqtt:tls", "mqtt:ws", "mqtt:wss"):
                    await self._start_secure_listener(name, broker)
            if mqttsn.enabled:
                from gateways.mqttsn.adapter import MqttSnUdpGateway

                sn_gateway = MqttSnUdpGateway(mqttsn, gateway_broker)
                await self._start(sn_gateway, "gateways.mqttsn.bind", mqttsn.bind)
            if coap.enabled:
                from gateways.coap.adapter import CoapUdpGateway

                await self._start(CoapUdpGateway(coap, gateway_broker), "gateways.coap.bind", coap.bind)
            if coap.dtls.enabled:
                from gateways.coap.adapter import CoapDtlsGateway

                dtls = CoapDtlsGateway(coap, gateway_broker, broker.access)
                await self._start(dtls, "gateways.coap.dtls.bind", coap.dtls.bind)
            if lwm2m.enabled:
                from gateways.lwm2m.adapter import LwM2mUdpGateway

                await self._start(LwM2mUdpGateway(lwm2m, gateway_broker), "gateways.lwm2m.bind", lwm2m.bind)
            if lwm2m.dtls.enabled:
                from gateways.lwm2m.adapter import LwM2mDtlsGateway

                lwm2m_dtls = LwM2mDtlsGateway(lwm2m, gateway_broker, broker.access)
                await self._start(lwm2m_dtls, "gateways.lwm2m.dtls.bind", lwm2m.dtls.bind)
            for link in self.config.hardware.serial:
                await self._start_serial(link, gateway_broker)
            if self.config.api.enabled:
                from core.api import ApiServer

                api = self.api = ApiServer(self)
                try:
                    await api.start()
                except OSError as exc:
                    raise ConfigError(
                        f"api.bind: cannot listen on {self.config.api.bind}: {exc.strerror or exc}"
                    ) from None
                log.info("%s listening on %s", api.name, api.address)
        except BaseException:
            await self.stop()
            raise
        self._ticker = asyncio.create_task(self._tick(), name="mqgate-tick")
        warn_if_anonymous_exposed(access, [listener.address for listener in self.listeners.values()])
        if access.jwt is not None and self.config.auth.jwt.jwks_url:
            from core.auth.jwks_refresh import refresh_jwks

            self._jwks_refresh = asyncio.create_task(refresh_jwks(access.jwt), name="mqgate-jwks")

    async def _start_bridges(self, broker: Broker) -> None:
        """One :class:`Bridge` per ``[[bridges]]`` entry, before the listeners: nothing published by the first
        clients is missed. Each connects to its remote in the background."""
        if self.config.upstream.url and not self.config.upstream.embedded_listeners:
            log.warning(
                "bridges: edge mode (upstream.url) without embedded_listeners: nothing publishes to the "
                "embedded broker the bridges forward from"
            )
        embedded = EmbeddedBroker(broker, LoopClock(asyncio.get_running_loop()))
        for config in self.config.bridges:
            bridge = Bridge(config, embedded, rng=self.rng)
            self.bridges.append(bridge)
            await bridge.start()

    async def _start_secure_listener(self, name: str, broker: Broker) -> Listener | None:
        """Start ``mqtt:tls``, ``mqtt:ws`` or ``mqtt:wss`` when enabled; ConfigError names a bad TLS file."""
        from core.listeners.tls import build_tls_settings
        from core.listeners.websocket import MqttWsListener

        listeners = self.config.listeners
        section = {"mqtt:tls": "tls", "mqtt:ws": "ws", "mqtt:wss": "wss"}[name]
        config = getattr(listeners, section)
        if not config.enabled:
            return None
        key = f"listeners.{section}"
        host, port = parse_bind(config.bind, f"{key}.bind")
        listener: MqttTcpListener
        if section == "tls":
            tls = build_tls_settings(listeners.tls, key)
            listener = MqttTcpListener(
                broker,
                host,
                port,
                name=name,
                max_connections=config.max_connections,
                backlog=config.backlog,
                tls=tls,
            )
        elif section == "ws":
            listener = MqttWsListener(broker, host, port, listeners.ws, name=name)
        else:
            tls = build_tls_settings(listeners.wss, key)
            listener = MqttWsListener(broker, host, port, listeners.wss, name=name, tls=tls)
        await self._start(listener, f"{key}.bind", config.bind)
        return listener

    async def _start(self, listener: Listener, key: str, bind: str) -> None:
        try:
            await listener.start()
        except OSError as exc:
            await listener.stop()
            raise ConfigError(f"{key}: cannot listen on {bind}: {exc.strerror or exc}") from None
        except BaseException:
            await listener.stop()
            raise
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

    async def restart_listener(self, name: str, config: Config | None = None) -> Listener:
        """Stop the listener ``name`` and start it again from the configuration, replaced by ``config`` first
        when given; other listeners and their connections are untouched. KeyError names an unknown listener;
        ConfigError an address that cannot be bound (the listener then stays stopped)."""
        old = self.listeners[name]
        if config is not None:
            self.config = config
        broker, gateway_broker = self.broker, self._gateway_broker
        assert broker is not None and gateway_broker is not None
        await old.stop()
        del self.listeners[name]
        log.info("%s stopped for a restart", name)
        tcp = self.config.listeners.tcp
        new: Listener
        if name == "mqtt:tcp":
            host, port = parse_bind(tcp.bind, "listeners.tcp.bind")
            new = MqttTcpListener(
                broker, host, port, max_connections=tcp.max_connections, backlog=tcp.backlog
            )
            await self._start(new, "listeners.tcp.bind", tcp.bind)
        elif name in ("mqtt:tls", "mqtt:ws", "mqtt:wss"):
            started = await self._start_secure_listener(name, broker)
            if started is None:
                raise KeyError(name)
            new = started
        elif name == "mqttsn:udp":
            from gateways.mqttsn.adapter import MqttSnUdpGateway

            mqttsn = self.config.gateways.mqttsn
            new = MqttSnUdpGateway(mqttsn, gateway_broker)
            await self._start(new, "gateways.mqttsn.bind", mqttsn.bind)
        elif name == "coap:udp":
            from gateways.coap.adapter import CoapUdpGateway

            coap = self.config.gateways.coap
            new = CoapUdpGateway(coap, gateway_broker)
            await self._start(new, "gateways.coap.bind", coap.bind)
        elif name == "coap:dtls":
            from gateways.coap.adapter import CoapDtlsGateway

            coap = self.config.gateways.coap
            new = CoapDtlsGateway(coap, gateway_broker, broker.access)
            await self._start(new, "gateways.coap.dtls.bind", coap.dtls.bind)
        elif name == "lwm2m:udp":
            from gateways.lwm2m.adapter import LwM2mUdpGateway

            lwm2m = self.config.gateways.lwm2m
            new = LwM2mUdpGateway(lwm2m, gateway_broker)
            await self._start(new, "gateways.lwm2m.bind", lwm2m.bind)
        elif name == "lwm2m:dtls":
            from gateways.lwm2m.adapter import LwM2mDtlsGateway

            lwm2m = self.config.gateways.lwm2m
            new = LwM2mDtlsGateway(lwm2m, gateway_broker, broker.access)
            await self._start(new, "gateways.lwm2m.dtls.bind", lwm2m.dtls.bind)
        else:
            serial = self.config.hardware.serial
            links = [link for link in serial if f"mqttsn:serial:{link.device}" == name]
            if not links:
                raise KeyError(name)
            await self._start_serial(links[0], gateway_broker)
            new = self.listeners[name]
        return new

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
        if self._jwks_refresh is not None:
            self._jwks_refresh.cancel()
            await asyncio.gather(self._jwks_refresh, return_exceptions=True)
            self._jwks_refresh = None
        if self.api is not None:
            await self.api.stop()
            self.api = None
        for listener in reversed(list(self.listeners.values())):
            await listener.stop()
        self.listeners.clear()
        if self.upstream is not None:
            await self.upstream.stop()
            self.upstream = None
        if self.broker is not None:
            self.broker.shutdown(asyncio.get_running_loop().time())
        for bridge in reversed(self.bridges):  # after the wills of the shutdown, which they may forward
            await bridge.stop()
        self.bridges.clear()
        if self.broker is not None:
            self.broker.access.close()


def _check_bridges(config: Config) -> None:
    """Each bridge name once: it names the bridge's session and buffer file."""
    seen: dict[str, int] = {}
    for index, bridge in enumerate(config.bridges):
        first = seen.get(bridge.name)
        if first is not None:
            raise ConfigError(f"bridges[{index}].name: {bridge.name!r} is already bridges[{first}]")
        seen[bridge.name] = index


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
