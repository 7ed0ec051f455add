"""The MQTT-SN gateway on a UDP socket: the thin asyncio adapter around :class:`MqttSnGateway`.

It feeds datagrams in, sends what the gateway queued, opens the broker sessions channels ask for (one task per
CONNECT, none per message), re-arms one timer at the gateway's earliest deadline, and sends ADVERTISE every
``advertise_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable

from core.broker.types import ClientInfo, Credentials
from core.clock import LoopClock
from core.config import MqttSnConfig, parse_bind
from core.errors import MalformedPacket
from core.logging import client_fields, format_peer
from core.trace import describe_fields
from gateways.base import Broker, SessionHandle, SessionRefused
from gateways.mqttsn.channel import MqttSnChannel
from gateways.mqttsn.codec import Encapsulated, decode
from gateways.mqttsn.gateway import MqttSnGateway
from gateways.udp import UdpGatewayAdapter

__all__ = [
    "MqttSnUdpGateway",
    "channel_peer",
    "describe_mqttsn",
    "open_channel_session",
    "open_qos3_session",
]

log = logging.getLogger("mqgate.mqttsn")


class MqttSnUdpGateway(UdpGatewayAdapter):
    """``gateways.mqttsn.bind``: every MQTT-SN client on this socket becomes a broker session."""

    name = "mqttsn:udp"
    trace_protocol = "mqttsn"

    def __init__(self, config: MqttSnConfig, broker: Broker) -> None:
        loop = asyncio.get_running_loop()
        self.gateway = MqttSnGateway(config, LoopClock(loop))
        super().__init__(self.gateway, *parse_bind(config.bind, "gateways.mqttsn.bind"))
        self.gateway.on_output = self.schedule_flush
        self.config = config
        self.broker = broker
        self._advertiser: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Bind the socket (OSError if it cannot be bound) and start advertising."""
        await super().start()
        if self.config.enable_qos3:
            self.gateway.qos3_session = await open_qos3_session(
                self.broker, self.config.qos3_clientid, self.address
            )
        if self.config.advertise_interval:
            self._advertise()

    def _start_work(self) -> None:
        for channel in self.gateway.take_session_requests():
            self.spawn(self._open_session(channel))

    async def _open_session(self, channel: MqttSnChannel) -> None:
        try:
            await open_channel_session(self.broker, self.config, channel, self.loop.time)
        finally:
            self.flush()

    def _advertise(self) -> None:
        host, port = parse_bind(self.config.advertise_address, "gateways.mqttsn.advertise_address")
        if self.transport is not None:
            self.transport.sendto(self.gateway.advertise(), (host, port))
        self._advertiser = self.loop.call_later(self.config.advertise_interval, self._advertise)

    def trace_peer(self, client_id: str) -> Hashable | None:
        return channel_peer(self.gateway, self.config, client_id)

    def describe_datagram(self, data: bytes) -> str:
        return describe_mqttsn(data)

    async def stop(self) -> None:
        if self._advertiser is not None:
            self._advertiser.cancel()
        await super().stop()
        self.gateway.shutdown()
        if self.gateway.qos3_session is not None:
            self.gateway.qos3_session.close(publish_will=False)


def channel_peer(gateway: MqttSnGateway, config: MqttSnConfig, client_id: str) -> Hashable | None:
    """The peer of the client whose broker client id (``clientid_prefix`` included) is ``client_id``."""
    prefix = config.clientid_prefix
    if not client_id.startswith(prefix):
        return None
    channel = gateway.by_client.get(client_id[len(prefix) :])
    return None if channel is None else channel.peer


def describe_mqttsn(data: bytes) -> str:
    """The message type and main fields of an MQTT-SN datagram (§5.4), for traces."""
    try:
        message = decode(data)
    except MalformedPacket as exc:
        return f"MALFORMED {exc}"
    if isinstance(message, Encapsulated):  # §5.5
        inner = describe_fields(message.message)
        return f"ENCAPSULATED node_id={message.node_id.hex()} radius={message.radius} {inner}"
    return describe_fields(message)


async def open_channel_session(
    broker: Broker, config: MqttSnConfig, channel: MqttSnChannel, now: Callable[[], float]
) -> None:
    """Authenticate the client of a CONNECT and open its broker session, then tell the channel (which queues
    the CONNACK); shared by every link the gateway runs on. The caller flushes the gateway afterwards."""
    client = ClientInfo(
        config.clientid_prefix + channel.client_id,
        "mqttsn",
        format_peer(channel.peer),
        config.username or None,
        keepalive=channel.keepalive,
    )
    credentials = Credentials(config.username or None, config.password.encode() if config.password else None)
    try:
        auth = await broker.authenticate(client, credentials)
        if not auth.allowed:
            channel.session_refused(auth.reason_code, now())
            return
        session = await broker.open_session(
            client,
            clean_start=channel.clean_session,
            expiry=0 if channel.clean_session else config.session_expiry,
            will=channel.will,
            sink=channel,
            max_inflight=config.max_inflight,
            credentials=credentials,
        )
        channel.session_opened(session, now())
    except SessionRefused as exc:
        channel.session_refused(exc.reason_code, now())
    except Exception:
        log.exception(
            "mqttsn %s: opening the broker session failed",
            channel.client_id,
            extra=client_fields(channel.client_id, channel.peer, "mqttsn"),
        )
        channel.session_refused(0x88, now())


async def open_qos3_session(broker: Broker, client_id: str, address: str) -> SessionHandle | None:
    """The session QoS -1 PUBLISHes (§6.8) are published from; it subscribes to nothing. A broker that
    refuses it (edge mode: the upstream's credentials) does not stop the gateway: QoS -1 publishes are then
    dropped and counted, and the refusal is logged."""
    client = ClientInfo(client_id, "mqttsn", address)
    try:
        return await broker.open_session(
            client, clean_start=True, expiry=0, will=None, sink=_NoDeliveries(), max_inflight=1
        )
    except SessionRefused as exc:
        log.warning(
            "mqttsn: the QoS -1 session %s was refused (reason 0x%02x): QoS -1 is off",
            client_id,
            exc.reason_code,
            extra=client_fields(client_id, address, "mqttsn"),
        )
        return None


class _NoDeliveries:
    """The QoS -1 session subscribes to nothing; anything delivered to it is dropped."""

    def deliver(self, *args: object) -> None:
        pass

    def deliver_pubrel(self, packet_id: int) -> None:
        pass

    def kick(self, reason_code: int) -> None:
        pass
