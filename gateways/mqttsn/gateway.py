"""The MQTT-SN gateway, pure: datagrams in, datagrams out, channels found by client id (MQTT-SN 1.2 §5-§7).

:class:`MqttSnGateway` decodes each datagram, unwraps forwarder encapsulation (§5.5), finds the client's
:class:`MqttSnChannel` by address or, for CONNECT and a waking PINGREQ, by client id (so a device that comes
back from another address or port keeps its session), answers SEARCHGW (§6.1), publishes QoS -1 messages
(§6.8), and runs every channel's timers from one heap. The adapter feeds it, sends :meth:`datagrams_to_send`,
opens the sessions it asks for (:meth:`take_session_requests`) and wakes it at :meth:`get_timer`.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields

from core.broker.types import Message
from core.clock import Clock
from core.config import MqttSnConfig
from core.errors import MalformedPacket
from core.logging import PeerLog
from gateways.base import SessionHandle
from gateways.mqttsn import codec
from gateways.mqttsn.channel import ChannelState, MqttSnChannel
from gateways.mqttsn.numbers import TopicIdType

__all__ = ["ForwardedPeer", "MqttSnGateway", "MqttSnMetrics"]

log = logging.getLogger("mqgate.mqttsn")


@dataclass(frozen=True, slots=True)
class ForwardedPeer:
    """A wireless node behind a forwarder (§5.5): answers go back through ``forwarder`` with ``node_id``."""

    forwarder: Hashable
    node_id: bytes
    radius: int = 0

    def __str__(self) -> str:
        return f"fwd:{self.forwarder}/{self.node_id.hex()}"


@dataclass(slots=True)
class MqttSnMetrics:
    """Counters of the MQTT-SN gateway; every drop is counted by reason."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0  # wire bytes of the datagrams (forwarder encapsulation included)
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    malformed: int = 0
    invalid_in_state: int = 0
    unknown_peer: int = 0
    connect_refused: int = 0
    publish_unknown_topic_id: int = 0
    registry_full: int = 0
    dropped_pending_full: int = 0
    dropped_register_refused: int = 0
    retransmissions: int = 0
    clients_lost: int = 0
    qos3_published: int = 0
    qos3_dropped: int = 0
    too_many_clients: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class MqttSnGateway:
    """All MQTT-SN clients of one link (a UDP socket, a serial port), as channels."""

    def __init__(self, config: MqttSnConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.metrics = MqttSnMetrics()
        self.by_peer: dict[Hashable, MqttSnChannel] = {}
        self.by_client: dict[str, MqttSnChannel] = {}
        self.qos3_session: SessionHandle | None = None
        self.on_output: Callable[[], None] | None = None
        self._outbox: list[tuple[Hashable, bytes]] = []
        self._timers: list[tuple[float, int, MqttSnChannel]] = []
        self._timer_seq = 0
        self._session_requests: list[MqttSnChannel] = []
        self._bad_input = PeerLog(log, "mqttsn")

    # --- what channels use (channel.Gateway)

    def now(self) -> float:
        return self.clock.now()

    def send(self, peer: object, message: codec.Message | bytes) -> None:
        data = message if isinstance(message, bytes) else codec.encode(message)
        if isinstance(peer, ForwardedPeer):
            data = bytes((len(peer.node_id) + 3, 0xFE, peer.radius & 0x03)) + peer.node_id + data
            peer = peer.forwarder
        if not self._outbox and self.on_output is not None:
            self.on_output()
        self._outbox.append((peer, data))
        metrics = self.metrics
        metrics.datagrams_out += 1
        metrics.bytes_out += len(data)

    def schedule(self, channel: MqttSnChannel, deadline: float) -> None:
        if channel.scheduled is None or deadline < channel.scheduled:
            channel.scheduled = deadline
            self._timer_seq += 1
            heapq.heappush(self._timers, (deadline, self._timer_seq, channel))
            if self.on_output is not None and self._timers[0][2] is channel:
                self.on_output()

    def request_session(self, channel: MqttSnChannel) -> None:
        if not self._session_requests and self.on_output is not None:
            self.on_output()
        self._session_requests.append(channel)

    def count(self, name: str) -> None:
        setattr(self.metrics, name, getattr(self.metrics, name) + 1)

    def channel_gone(self, channel: MqttSnChannel) -> None:
        if self.by_client.get(channel.client_id) is channel:
            del self.by_client[channel.client_id]
        peer = channel.peer
        if isinstance(peer, Hashable) and self.by_peer.get(peer) is channel:
            del self.by_peer[peer]

    # --- what the adapter uses

    def datagrams_to_send(self) -> list[tuple[Hashable, bytes]]:
        out, self._outbox = self._outbox, []
        return out

    def take_session_requests(self) -> list[MqttSnChannel]:
        requests, self._session_requests = self._session_requests, []
        return requests

    def get_timer(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> None:
        timers = self._timers
        again: list[tuple[MqttSnChannel, float]] = []
        while timers and timers[0][0] <= now:
            deadline, _, channel = heapq.heappop(timers)
            if channel.scheduled != deadline:
                continue  # superseded by an earlier deadline
            channel.scheduled = None
            following = channel.handle_timeout(now)
            if following is not None and self._is_current(channel):
                again.append((channel, following))
        for channel, following in again:  # after the loop: a deadline already past waits for the next call
            self.schedule(channel, following)

    def _is_current(self, channel: MqttSnChannel) -> bool:
        return self.by_client.get(channel.client_id) is channel

    def advertise(self) -> bytes:
        """ADVERTISE with the gateway id and the seconds until the next one (§5.4.1), counted as sent: the
        adapter broadcasts it."""
        data = codec.encode(codec.Advertise(self.config.gateway_id, self.config.advertise_interval))
        self.metrics.datagrams_out += 1
        self.metrics.bytes_out += len(data)
        return data

    def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> None:
        """Handle one datagram from ``peer``; bad input is dropped, counted and logged once per peer."""
        metrics = self.metrics
        metrics.datagrams_in += 1
        metrics.bytes_in += len(data)
        try:
            message = codec.decode(data)
            if isinstance(message, codec.Encapsulated):
                peer = ForwardedPeer(peer, message.node_id, message.radius)
                message = message.message
                if isinstance(message, codec.Encapsulated):
                    raise MalformedPacket("nested encapsulation", 0x03)
        except MalformedPacket as exc:
            self.metrics.malformed += 1
            self._bad_input.warning(peer, "dropped a malformed datagram: %s", exc)
            return
        channel = self.by_peer.get(peer)
        if channel is not None and not isinstance(message, codec.Connect | codec.Pingreq):
            channel.handle(message, now)
            return
        self._dispatch_new(message, peer, channel, now)

    def _dispatch_new(
        self, message: codec.Message, peer: Hashable, channel: MqttSnChannel | None, now: float
    ) -> None:
        """CONNECT, PINGREQ and messages from addresses without a channel."""
        if isinstance(message, codec.Connect):
            self._on_connect(message, peer, channel, now)
        elif isinstance(message, codec.Pingreq):
            owner = self.by_client.get(message.client_id) if message.client_id else channel
            if owner is None:
                self.metrics.unknown_peer += 1
                self._bad_input.warning(
                    peer, "PINGREQ from an unknown client %r", message.client_id, clientid=message.client_id
                )
                return
            if owner.peer != peer:
                self._rebind(owner, peer)
            owner.handle(message, now)
        elif isinstance(message, codec.SearchGw):
            self.send(peer, codec.GwInfo(self.config.gateway_id))
        elif isinstance(message, codec.Publish) and message.qos == -1:
            self._publish_qos3(message, peer)
        elif isinstance(message, codec.Advertise | codec.GwInfo):
            pass  # another gateway, or a client answering a SEARCHGW for one: nothing for us
        else:
            self.metrics.unknown_peer += 1
            self._bad_input.warning(
                peer, "dropped %s from a peer without a connection", type(message).__name__.upper()
            )

    def _on_connect(
        self, message: codec.Connect, peer: Hashable, channel: MqttSnChannel | None, now: float
    ) -> None:
        owner = self.by_client.get(message.client_id)
        if channel is not None and channel is not owner and channel.client_id != message.client_id:
            # This address had another client: that one is gone from here.
            if channel.connected:
                channel.take_over(now, peer)
            self.channel_gone(channel)
        if owner is None:
            if len(self.by_client) >= self.config.max_clients:
                self.metrics.too_many_clients += 1
                self._bad_input.warning(
                    peer,
                    "refused CONNECT of %r: max_clients reached",
                    message.client_id,
                    clientid=message.client_id,
                )
                self.send(peer, codec.Connack(0x01))
                return
            owner = MqttSnChannel(self, peer, message.client_id, now)
            self.by_client[message.client_id] = owner
        if owner.peer != peer:
            if owner.state is not ChannelState.ASLEEP:
                owner.take_over(now, peer)
            self._rebind(owner, peer)
        self.by_peer[peer] = owner
        owner.handle(message, now)

    def _rebind(self, channel: MqttSnChannel, peer: Hashable) -> None:
        old = channel.peer
        if isinstance(old, Hashable) and self.by_peer.get(old) is channel:
            del self.by_peer[old]
        channel.peer = peer
        self.by_peer[peer] = channel

    def _publish_qos3(self, message: codec.Publish, peer: Hashable) -> None:
        """QoS -1: a PUBLISH without a connection, on a predefined id or a short name (§6.8)."""
        session = self.qos3_session
        topic = None
        if message.topic_id_type == TopicIdType.PREDEFINED:
            topic = self.config.predefined.get(message.topic_id)
        elif message.topic_id_type == TopicIdType.SHORT:
            try:
                topic = codec.short_topic_name(message.topic_id)
            except MalformedPacket:
                topic = None
        if not self.config.enable_qos3 or session is None or topic is None or "+" in topic or "#" in topic:
            self.metrics.qos3_dropped += 1
            self._bad_input.warning(
                peer, "dropped a QoS -1 PUBLISH (enabled: %s, topic: %r)", self.config.enable_qos3, topic
            )
            return
        if session.publish(Message(topic, message.data, 0, message.retain)) < 0x80:
            self.metrics.qos3_published += 1
        else:
            self.metrics.qos3_dropped += 1

    def lose_all(self, now: float, why: str) -> int:
        """The link under every client went away: each connected or sleeping client is lost now (its will is
        published), unfinished CONNECTs are dropped, queued datagrams are discarded. Returns how many were
        lost."""
        lost = 0
        for channel in list(self.by_client.values()):
            lost += channel.connected
            channel.link_lost(now, why)
        self._outbox.clear()
        return lost

    def shutdown(self) -> None:
        """Detach every channel from the broker (no wills: the gateway goes away, not the devices)."""
        for channel in list(self.by_client.values()):
            channel.shutdown()
        self.by_client.clear()
        self.by_peer.clear()
        self._timers.clear()
