"""The CoAP gateway on a UDP socket: the thin asyncio adapter around :class:`CoapGateway`."""

from __future__ import annotations

import asyncio
import logging

from core.broker.types import ClientInfo, Credentials
from core.clock import LoopClock
from core.config import CoapConfig, parse_bind
from gateways.base import Broker, SessionRefused
from gateways.coap.gateway import CoapGateway, SessionRequest
from gateways.udp import UdpGatewayAdapter

__all__ = ["CoapUdpGateway"]

log = logging.getLogger("mqgate.coap")


class CoapUdpGateway(UdpGatewayAdapter):
    """``gateways.coap.bind``: CoAP clients publish, observe-subscribe and read through the broker."""

    name = "coap:udp"

    def __init__(self, config: CoapConfig, broker: Broker) -> None:
        self.gateway = CoapGateway(config, LoopClock(asyncio.get_running_loop()))
        super().__init__(self.gateway, *parse_bind(config.bind, "gateways.coap.bind"))
        self.gateway.on_output = self.schedule_flush
        self.config = config
        self.broker = broker

    def _start_work(self) -> None:
        for request in self.gateway.take_session_requests():
            self.spawn(self._open_session(request))

    async def _open_session(self, request: SessionRequest) -> None:
        gateway = self.gateway
        client_id = request.client_id
        client = ClientInfo(
            self.config.clientid_prefix + client_id, "coap", _peer(request.peer), request.username
        )
        credentials = Credentials(request.username, request.password.encode() if request.password else None)
        try:
            auth = await self.broker.authenticate(client, credentials)
            if not auth.allowed:
                gateway.session_refused(request, auth.reason_code, self.loop.time())
                return
            session = await self.broker.open_session(
                client,
                clean_start=True,
                expiry=0,
                will=None,
                sink=request.client,
                max_inflight=self.config.max_inflight,
                credentials=credentials,
            )
            gateway.session_opened(request, session, self.loop.time())
        except SessionRefused as exc:
            gateway.session_refused(request, exc.reason_code, self.loop.time())
        except Exception:
            log.exception("coap %s: opening the broker session failed", client_id)
            gateway.session_refused(request, 0x88, self.loop.time())
        finally:
            self.flush()

    async def stop(self) -> None:
        await super().stop()
        self.gateway.shutdown()


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
