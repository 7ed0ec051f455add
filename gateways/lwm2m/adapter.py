"""The LwM2M gateway on a UDP socket: the thin asyncio adapter around :class:`LwM2mGateway`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable

from core.auth.certs import cert_identity
from core.broker.types import Credentials
from core.clock import LoopClock
from core.config import LwM2mConfig, parse_bind
from core.logging import client_fields
from gateways.base import Broker, SessionRefused
from gateways.coap.adapter import CoapFamilyAdapter
from gateways.coap.dtls import AddressGuard
from gateways.lwm2m.gateway import LwM2mGateway, SessionRequest
from gateways.lwm2m.objects import ObjectRegistry

__all__ = ["LwM2mDtlsGateway", "LwM2mUdpGateway"]

log = logging.getLogger("mqgate.lwm2m")


class LwM2mUdpGateway(CoapFamilyAdapter[SessionRequest]):
    """``gateways.lwm2m.bind``: LwM2M devices register here and are managed through MQTT."""

    name = "lwm2m:udp"
    trace_protocol = "lwm2m"
    gateway: LwM2mGateway

    def __init__(self, config: LwM2mConfig, broker: Broker) -> None:
        registry = ObjectRegistry.default()
        if config.xml_dir:
            loaded = registry.load_dir(config.xml_dir)
            log.info("lwm2m: %d object definitions loaded from %s", loaded, config.xml_dir)
        self.gateway = LwM2mGateway(config, LoopClock(asyncio.get_running_loop()), registry)
        super().__init__(self.gateway, *parse_bind(config.bind, "gateways.lwm2m.bind"))
        self.gateway.on_output = self.schedule_flush
        self.config = config
        self.clientid_prefix = config.clientid_prefix
        self.broker = broker

    async def _open_session(self, request: SessionRequest) -> None:
        device = request.device
        client = self.client_info(device.endpoint, device.peer, device.endpoint)
        try:
            credentials = Credentials(client.username, None)
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
            log.exception(
                "lwm2m %s: opening the broker session failed",
                device.endpoint,
                extra=client_fields(device.endpoint, device.peer, "lwm2m"),
            )
            self.gateway.session_refused(device, 0x88, self.loop.time())
        finally:
            self.flush()

    def _peer_of(self, local_id: str) -> Hashable | None:
        device = self.gateway.devices.get(local_id)
        return None if device is None else device.peer


class LwM2mDtlsGateway(LwM2mUdpGateway):
    """``gateways.lwm2m.dtls``: the LwM2M gateway on a DTLS socket (LwM2M 1.1 transport §5.2, PSK and
    certificate modes). With ``check_endpoint_name`` a registration must name the endpoint the device
    authenticated as (Transport §5.2.8, Core §7.1), so one device's credentials cannot register another."""

    name = "lwm2m:dtls"

    def __init__(self, config: LwM2mConfig, broker: Broker, guard: AddressGuard | None = None) -> None:
        super().__init__(config, broker)
        self.use_dtls(config.dtls, "gateways.lwm2m.dtls", log, guard)
        if config.dtls.check_endpoint_name:
            self.gateway.peer_identity = self.authenticated_name

    def authenticated_name(self, peer: Hashable) -> str | None:
        """The name ``peer`` authenticated with: its PSK identity, or the common name of its verified
        certificate ("" when it has none); None when it proved neither (``verify = "verify_none"``)."""
        identity = self.psk_identity(peer)
        if identity is not None:
            return identity
        certificate = self.peer_certificate(peer)
        return None if certificate is None else cert_identity(certificate, "cn") or ""
