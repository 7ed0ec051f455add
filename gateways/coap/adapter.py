"""The CoAP gateway on a UDP or DTLS socket: the thin asyncio adapter around :class:`CoapGateway`, and the
adapter base it shares with the LwM2M gateway."""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections.abc import Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

from core.broker.types import ClientInfo, Credentials
from core.clock import LoopClock
from core.config import CoapConfig, DtlsConfig, parse_bind
from core.errors import MalformedPacket
from core.logging import client_fields, format_peer
from gateways.base import Broker, SessionRefused
from gateways.coap.application import CoapApplication
from gateways.coap.codec import decode
from gateways.coap.dtls import AddressGuard, DtlsDatagramCore
from gateways.coap.gateway import CoapGateway, SessionRequest
from gateways.coap.numbers import Code, Type, code_name, is_request
from gateways.udp import UdpGatewayAdapter

if TYPE_CHECKING:
    from core.trace import DatagramTrace

__all__ = ["CoapDtlsGateway", "CoapFamilyAdapter", "CoapUdpGateway", "describe_coap"]

log = logging.getLogger("mqgate.coap")

R = TypeVar("R")


class CoapFamilyAdapter(UdpGatewayAdapter, Generic[R]):
    """What the CoAP and LwM2M adapters share: a :class:`CoapApplication` whose session requests each get one
    task, packet tracing of its clients' datagrams, and the optional DTLS layer (:meth:`use_dtls`)."""

    gateway: CoapApplication[R]
    clientid_prefix: str
    trace_protocol: str  # also the protocol of its clients' sessions: "coap" or "lwm2m"
    dtls: DtlsDatagramCore | None = None
    psk_identity_as_username = False

    def _start_work(self) -> None:
        for request in self.gateway.take_session_requests():
            self.spawn(self._open_session(request))

    @abstractmethod
    async def _open_session(self, request: R) -> None: ...

    @abstractmethod
    def _peer_of(self, local_id: str) -> Hashable | None:
        """The address of the gateway's client (CoAP client id, LwM2M endpoint name) ``local_id``."""

    def use_dtls(
        self, settings: DtlsConfig, key: str, logger: logging.Logger, guard: AddressGuard | None
    ) -> None:
        """Serve on the ``[key]`` DTLS socket instead: the application sees authenticated peers' plaintext."""
        self.host, self.port = parse_bind(settings.bind, f"{key}.bind")
        self.dtls = DtlsDatagramCore.from_config(self.gateway, settings, key, logger, guard)
        self.core = self.dtls
        self.psk_identity_as_username = settings.psk_identity_as_username

    @property
    def packet_trace(self) -> DatagramTrace | None:
        """Over DTLS the trace sits in the DTLS layer, which hands it the CoAP messages in plaintext; the
        adapter's own datagrams are then ciphertext and not traced."""
        return self._wire_trace if self.dtls is None else self.dtls.packet_trace

    @packet_trace.setter
    def packet_trace(self, trace: DatagramTrace | None) -> None:
        if self.dtls is None:
            self._wire_trace = trace
        else:
            self.dtls.packet_trace = trace

    def trace_peer(self, client_id: str) -> Hashable | None:
        """The peer of broker client id ``client_id``."""
        prefix = self.clientid_prefix
        if not client_id.startswith(prefix):
            return None
        return self._peer_of(client_id[len(prefix) :])

    def describe_datagram(self, data: bytes) -> str:
        return describe_coap(data)

    def peer_certificate(self, peer: Hashable) -> bytes | None:
        """The verified DER client certificate of ``peer`` (over DTLS), for ``auth.peer_cert_as_username``."""
        return None if self.dtls is None else self.dtls.peer_certificate(peer)

    def psk_identity(self, peer: Hashable) -> str | None:
        """The PSK identity ``peer`` completed its DTLS handshake with."""
        return None if self.dtls is None else self.dtls.psk_identity(peer)

    def client_info(self, local_id: str, peer: Hashable, username: str | None) -> ClientInfo:
        """The broker's view of the gateway's client ``local_id`` at ``peer``: its verified DTLS certificate
        (for ``auth.peer_cert_as_username``) and, with ``psk_identity_as_username``, its PSK identity as the
        user name instead of ``username`` (authentication accepts it without a password)."""
        identity = self.psk_identity(peer) if self.psk_identity_as_username else None
        return ClientInfo(
            self.clientid_prefix + local_id,
            self.trace_protocol,
            format_peer(peer),
            username if identity is None else identity,
            peer_cert=self.peer_certificate(peer),
            psk_identity=identity,
        )

    async def stop(self) -> None:
        await super().stop()
        self.gateway.shutdown()


class CoapUdpGateway(CoapFamilyAdapter[SessionRequest]):
    """``gateways.coap.bind``: CoAP clients publish, observe-subscribe and read through the broker."""

    name = "coap:udp"
    trace_protocol = "coap"
    gateway: CoapGateway

    def __init__(self, config: CoapConfig, broker: Broker) -> None:
        self.gateway = CoapGateway(config, LoopClock(asyncio.get_running_loop()))
        super().__init__(self.gateway, *parse_bind(config.bind, "gateways.coap.bind"))
        self.gateway.on_output = self.schedule_flush
        self.config = config
        self.clientid_prefix = config.clientid_prefix
        self.broker = broker

    async def _open_session(self, request: SessionRequest) -> None:
        gateway = self.gateway
        client_id = request.client_id
        client = self.client_info(client_id, request.peer, request.username)
        credentials = Credentials(client.username, request.password.encode() if request.password else None)
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
            log.exception(
                "coap %s: opening the broker session failed",
                client_id,
                extra=client_fields(client_id, request.peer, "coap"),
            )
            gateway.session_refused(request, 0x88, self.loop.time())
        finally:
            self.flush()

    def _peer_of(self, local_id: str) -> Hashable | None:
        client = self.gateway.clients.get(local_id)
        return None if client is None else client.peer


class CoapDtlsGateway(CoapUdpGateway):
    """``gateways.coap.dtls``: the CoAP gateway on a DTLS socket, ``coaps://`` (RFC 7252 §9.1)."""

    name = "coap:dtls"

    def __init__(self, config: CoapConfig, broker: Broker, guard: AddressGuard | None = None) -> None:
        super().__init__(config, broker)
        self.use_dtls(config.dtls, "gateways.coap.dtls", log, guard)


def describe_coap(data: bytes) -> str:
    """``TYPE METHOD-or-code mid= token= uri= ...`` of a CoAP message (RFC 7252 §3), for traces; the
    password query argument (``password=``, ``p=``) is masked."""
    try:
        message = decode(data)
        path = message.uri_path()
        query = [_masked(argument) for argument in message.uri_query()]
        observe, block1, block2 = message.observe(), message.block1(), message.block2()
    except MalformedPacket as exc:
        return f"MALFORMED {exc}"
    parts = [
        Type(message.mtype).name,
        _code_text(message.code),
        f"mid={message.mid}",
        f"token={message.token.hex()}",
    ]
    if path or query:
        parts.append("uri=/" + "/".join(path) + ("?" + "&".join(query) if query else ""))
    if observe is not None:
        parts.append(f"observe={observe}")
    for name, block in (("block1", block1), ("block2", block2)):
        if block is not None:
            parts.append(f"{name}={block.num}/{int(block.more)}/{block.size}")
    if message.payload:
        parts.append(f"payload_size={len(message.payload)}")
    return " ".join(parts)


def _code_text(code: int) -> str:
    """A method by its name (``POST``), an empty message as ``EMPTY``, a response as ``c.dd``."""
    if code == 0 or is_request(code):
        try:
            return Code(code).name
        except ValueError:
            return code_name(code)
    return code_name(code)


def _masked(argument: str) -> str:
    key, sep, _ = argument.partition("=")
    return f"{key}=***" if sep and key in ("password", "p") else argument
