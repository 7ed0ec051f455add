"""The LwM2M gateway on a UDP socket: the thin asyncio adapter around :class:`LwM2mGateway`."""

from __future__ import annotations

import asyncio
import logging

from core.broker.types import ClientInfo, Credentials
from core.clock import LoopClock
from core.config import LwM2mConfig, parse_bind
from gateways.base import Broker, SessionRefused
from gateways.lwm2m.gateway import LwM2mGateway, SessionRequest
from gateways.lwm2m.objects import ObjectRegistry
from gateways.udp import UdpGatewayAdapter

__all__ = ["LwM2mUdpGateway"]

log = logging.getLogger("mqgate.lwm2m")


class LwM2mUdpGateway(UdpGatewayAdapter):
    """``gateways.lwm2m.bind``: LwM2M devices register here and are managed through MQTT."""

    name = "lwm2m:udp"

    def __init__(self, config: LwM2mConfig, broker: Broker) -> None:
        registry = ObjectRegistry.default()
        if config.xml_dir:
            loaded = registry.load_dir(config.xml_dir)
            log.info("lwm2m: %d object definitions loaded from %s", loaded, config.xml_dir)
        self.gateway = LwM2mGateway(config, LoopClock(asyncio.get_running_loop()), registry)
        super().__init__(self.gateway, *parse_bind(config.bind, "gateways.lwm2m.bind"))
        self.gateway.on_output = self.schedule_flush
        self.config = config
        self.broker = broker

    def _start_work(self) -> None:
        for request in self.gateway.take_session_requests():
            self.spawn(self._open_session(request))

    async def _open_session(self, request: SessionRequest) -> None:
        device = request.device
        peer = device.peer
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        client = ClientInfo(
            self.config.clientid_prefix + device.endpoint, "lwm2m", peer_text, device.endpoint
        )
        try:
            credentials = Credentials(device.endpoint, None)
            auth = await self.broker.authenticate(client, credentials)
            if not auth.allowed:
                self.gateway.session_refused(device, auth.reason_code, self.loop.time())
                return
            session = await self.broker.open_session(
                client,
                clean_start=True,
                expiry=0,
                will=None,
                sink=device,
                max_inflight=32,
                credentials=credentials,
            )
            self.gateway.session_opened(device, session, self.loop.time())
        except SessionRefused as exc:
            self.gateway.session_refused(device, exc.reason_code, self.loop.time())
        except Exception:
            log.exception("lwm2m %s: opening the broker session failed", device.endpoint)
            self.gateway.session_refused(device, 0x88, self.loop.time())
        finally:
            self.flush()

    async def stop(self) -> None:
        await super().stop()
        self.gateway.shutdown()
