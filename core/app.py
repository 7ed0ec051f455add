"""The running suite: the broker, its listeners and its periodic duties, started and stopped as one."""

from __future__ import annotations

import asyncio
import logging
import random
import socket

from core.broker.broker import Broker
from core.config import Config, parse_bind
from core.errors import ConfigError
from core.listeners.tcp import MqttTcpListener
from core.mqtt.numbers import ReasonCode

__all__ = ["App"]

log = logging.getLogger("mqgate")

TICK_SECONDS = 1.0


class App:
    """Owns the broker and the listeners; ``start`` binds every address, ``stop`` closes them all."""

    def __init__(self, config: Config, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.broker: Broker | None = None
        self.listeners: dict[str, MqttTcpListener] = {}
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the broker and listeners; raises ConfigError naming the address that cannot be bound."""
        loop = asyncio.get_running_loop()
        self.broker = Broker(
            self.config.broker,
            rng=self.rng,
            node_name=f"mqgate@{socket.gethostname()}",
            started_at=loop.time(),
        )
        tcp = self.config.listeners.tcp
        try:
            if tcp.enabled:
                host, port = parse_bind(tcp.bind, "listeners.tcp.bind")
                listener = MqttTcpListener(
                    self.broker, host, port, max_connections=tcp.max_connections, backlog=tcp.backlog
                )
                try:
                    await listener.start()
                except OSError as exc:
                    raise ConfigError(
                        f"listeners.tcp.bind: cannot listen on {tcp.bind}: {exc.strerror}"
                    ) from None
                self.listeners[listener.name] = listener
                log.info("%s listening on %s", listener.name, listener.address)
        except BaseException:
            await self.stop()
            raise
        self._ticker = asyncio.create_task(self._tick(), name="mqgate-tick")

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
        """Close listeners and connections (v5 clients get DISCONNECT 0x8B), publish pending wills."""
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        for listener in self.listeners.values():
            await listener.stop(ReasonCode.SERVER_SHUTTING_DOWN)
        self.listeners.clear()
        if self.broker is not None:
            self.broker.shutdown(asyncio.get_running_loop().time())
