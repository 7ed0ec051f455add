"""MQTT over WebSocket and secure WebSocket (``listeners.ws``, ``listeners.wss``; MQTT 5.0 §6).

The WebSocket protocol is the sans-I/O :class:`websockets.server.ServerProtocol`, driven from the same
asyncio protocol as plain MQTT (:class:`core.listeners.tcp.MqttProtocol`), so writes stay synchronous and
batched (one binary message per flush) and back-pressure works as over TCP.

The upgrade request must ask for ``path``, offer the ``mqtt`` (or ``mqttv3.1``) subprotocol and, when it
carries an ``Origin`` (browsers always do), name one of ``allowed_origins`` (empty: any): a refusal is an
HTTP error (400, 403, 404), one log line and a count in ``handshake_failures``. The client address shown
and logged is the socket's peer, or, for connections from ``trusted_proxies``, the PROXY protocol header
(``proxy_protocol``) or ``X-Forwarded-For``/``X-Forwarded-Port``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from websockets.exceptions import InvalidState, NegotiationError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Origin, Subprotocol

from core.listeners.tcp import MqttProtocol, MqttTcpListener
from core.logging import client_fields, format_peer

if TYPE_CHECKING:
    from core.broker.broker import Broker
    from core.config import WsListenerConfig, WssListenerConfig
    from core.listeners.tls import TlsSettings

__all__ = ["MQTT_SUBPROTOCOLS", "MqttWsListener", "parse_proxy_header"]

log = logging.getLogger("mqgate.listener")
_ws_log = logging.getLogger("mqgate.listener.websocket")

MQTT_SUBPROTOCOLS = (Subprotocol("mqtt"), Subprotocol("mqttv3.1"))
_PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY_V1_MAX = 107  # the longest v1 line, CRLF included (PROXY protocol §2.1)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_proxy_header(data: bytes) -> tuple[int, tuple[str, int] | None] | None:
    """Parse a PROXY protocol v1 or v2 header at the start of ``data``.

    Returns ``(length, (client ip, client port))``, ``(length, None)`` for a header without an address
    (``UNKNOWN``, ``LOCAL``, a non-IP family), or None when more bytes are needed. Raises ValueError for
    anything that is not a PROXY header.
    """
    if data.startswith(_PROXY_V2_SIGNATURE[: len(data)]) and len(data) < 16:
        return None
    if data.startswith(_PROXY_V2_SIGNATURE):
        version_command, family = data[12], data[13]
        length = 16 + int.from_bytes(data[14:16], "big")
        if version_command >> 4 != 2:
            raise ValueError("PROXY v2: bad version")
        if len(data) < length:
            return None
        if version_command & 0x0F == 0:  # LOCAL: the proxy's own connection
            return length, None
        if family >> 4 == 1 and length >= 16 + 12:
            return length, (str(ipaddress.IPv4Address(data[16:20])), int.from_bytes(data[24:26], "big"))
        if family >> 4 == 2 and length >= 16 + 36:
            return length, (str(ipaddress.IPv6Address(data[16:32])), int.from_bytes(data[48:50], "big"))
        return length, None
    if not b"PROXY "[: len(data)] == data[:6]:
        raise ValueError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, _PROXY_V1_MAX)
    if end < 0:
        if len(data) >= _PROXY_V1_MAX:
            raise ValueError("PROXY v1: header line too long")
        return None
    parts = data[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return end + 2, None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ValueError("PROXY v1: malformed header")
    try:
        address = ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError:
        raise ValueError("PROXY v1: malformed address") from None
    if not 0 <= port <= 65535:
        raise ValueError("PROXY v1: bad port")
    return end + 2, (str(address), port)


def _in(networks: Sequence[IpNetwork], host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


class _WsProtocol(MqttProtocol):
    """One WebSocket connection: the HTTP upgrade, then binary frames carrying the MQTT stream."""

    __slots__ = ("_proxied", "_proxy_buffer", "_ws", "ws_listener")

    def __init__(self, listener: MqttWsListener) -> None:
        super().__init__(listener)
        self.ws_listener = listener
        self._ws: ServerProtocol | None = None
        self._proxy_buffer: bytes | None = None
        self._proxied = False  # the peer came from a PROXY protocol header (X-Forwarded-For is then ignored)

    def _start(self, transport: asyncio.Transport) -> None:
        listener = self.ws_listener
        self._ws = ServerProtocol(
            origins=listener.origins,
            subprotocols=MQTT_SUBPROTOCOLS,
            select_subprotocol=listener.subprotocol_selector,
            max_size=listener.max_frame_size,
            logger=_ws_log,
        )
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else ""
        if listener.proxy_protocol and (not listener.trusted_proxies or _in(listener.trusted_proxies, host)):
            self._proxy_buffer = b""
        self._timer = listener.loop.call_later(listener.handshake_timeout, self._upgrade_timeout)

    def _upgrade_timeout(self) -> None:
        self._timer = None
        if self.connection is None and self._transport is not None:
            self._refuse(f"no WebSocket upgrade within {self.ws_listener.handshake_timeout:g} s")
            self._transport.abort()

    def _refuse(self, reason: str) -> None:
        listener = self.ws_listener
        listener.handshake_failed(self.peer)
        log.warning(
            "%s: refusing %s: %s",
            listener.name,
            self.peer,
            reason,
            extra=client_fields(None, self.peer, "mqtt"),
        )

    def data_received(self, data: bytes) -> None:
        ws = self._ws
        if ws is None:
            return
        if self._proxy_buffer is not None:
            data = self._proxy_header(data)
            if not data:
                return
        ws.receive_data(data)
        self._handle_events(ws)

    def _proxy_header(self, data: bytes) -> bytes:
        """Consume the PROXY protocol header; returns the bytes after it (b"" while incomplete)."""
        assert self._proxy_buffer is not None
        buffer = self._proxy_buffer + data
        try:
            parsed = parse_proxy_header(buffer)
        except ValueError as exc:
            self._refuse(f"expected a PROXY protocol header: {exc}")
            self._proxy_buffer = None
            if self._transport is not None:
                self._transport.abort()
            return b""
        if parsed is None:
            self._proxy_buffer = buffer
            return b""
        length, address = parsed
        self._proxy_buffer = None
        if address is not None:
            self.peer = format_peer(address)
            self._proxied = True
        return buffer[length:]

    def eof_received(self) -> bool:
        if self._ws is not None:
            self._ws.receive_eof()
            self._handle_events(self._ws)
        return False

    def _handle_events(self, ws: ServerProtocol) -> None:
        for event in ws.events_received():
            if isinstance(event, Request):
                self._on_request(ws, event)
            elif not isinstance(event, Frame):
                continue
            elif event.opcode is Opcode.BINARY or event.opcode is Opcode.CONT:
                if self.connection is not None:
                    self._feed(bytes(event.data))
            elif event.opcode is Opcode.TEXT:
                # MQTT 5.0 §6.0: a data frame other than binary closes the network connection.
                log.warning(
                    "%s: %s sent a text frame, closing",
                    self.ws_listener.name,
                    self.peer,
                    extra=client_fields(
                        self.connection.client_id if self.connection is not None else None, self.peer, "mqtt"
                    ),
                )
                ws.fail(1003, "MQTT needs binary frames")
                if self.connection is not None:
                    self.connection.connection_lost(self.listener.loop.time())
                break
        self._push(ws)

    def _push(self, ws: ServerProtocol) -> None:
        transport = self._transport
        if transport is None:
            return
        for chunk in ws.data_to_send():
            if chunk:
                if not transport.is_closing():
                    transport.write(chunk)
            else:
                transport.close()

    def _on_request(self, ws: ServerProtocol, request: Request) -> None:
        listener = self.ws_listener
        if not self._proxied:
            self.peer = self._real_peer(request)
        if urlsplit(request.path).path != listener.path:
            response = ws.reject(404, f"No MQTT endpoint at this path; use {listener.path}\n")
            self._refuse(f"WebSocket upgrade for path {request.path!r}")
        else:
            response = ws.accept(request)
            if response.status_code != 101:
                reason = ws.handshake_exc
                self._refuse(f"WebSocket upgrade refused ({response.status_code}): {reason}")
        ws.send_response(response)
        if response.status_code == 101:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._open(self.peer)

    def _real_peer(self, request: Request) -> str:
        """The client address: X-Forwarded-For/-Port when the connection comes from a trusted proxy."""
        listener = self.ws_listener
        transport = self._transport
        direct = transport.get_extra_info("peername") if transport is not None else None
        host = direct[0] if isinstance(direct, tuple) else ""
        if not listener.trusted_proxies or not _in(listener.trusted_proxies, host):
            return self.peer
        forwarded = ",".join(request.headers.get_all("X-Forwarded-For"))
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        client = None
        for hop in reversed(hops):  # the nearest hop that is not itself a trusted proxy
            client = hop
            if not _in(listener.trusted_proxies, hop):
                break
        if client is None:
            return self.peer
        try:
            client = str(ipaddress.ip_address(client))
        except ValueError:
            return self.peer
        port_header = request.headers.get("X-Forwarded-Port", "").strip()
        port = int(port_header) if port_header.isdigit() and int(port_header) <= 65535 else 0
        return format_peer((client, port))

    # --- Transport for MqttConnection

    def _send(self, transport: asyncio.Transport, data: bytes) -> None:
        ws = self._ws
        if ws is None or ws.state is not State.OPEN:
            return
        try:
            ws.send_binary(data)
        except InvalidState:  # pragma: no cover - checked above
            return
        for chunk in ws.data_to_send():
            if chunk:
                transport.write(chunk)

    def _close_transport(self, transport: asyncio.Transport) -> None:
        ws = self._ws
        if ws is not None and ws.state is State.OPEN:
            ws.send_close(1000)
            for chunk in ws.data_to_send():
                if chunk and not transport.is_closing():
                    transport.write(chunk)
        transport.close()


class MqttWsListener(MqttTcpListener):
    """Accepts MQTT-over-WebSocket connections (secure with ``tls``) on one address."""

    def __init__(
        self,
        broker: Broker,
        host: str,
        port: int,
        config: WsListenerConfig | WssListenerConfig,
        *,
        name: str = "mqtt:ws",
        tls: TlsSettings | None = None,
    ) -> None:
        super().__init__(
            broker,
            host,
            port,
            name=name,
            max_connections=config.max_connections,
            backlog=config.backlog,
            tls=tls,
        )
        self.path = config.path
        self.handshake_timeout = config.handshake_timeout
        self.max_frame_size = config.max_frame_size
        # Origin is checked when present: browsers always send it, other clients need not (RFC 6455 §10.2).
        self.origins: list[Origin | None] | None = (
            [None, *(Origin(origin) for origin in config.allowed_origins)] if config.allowed_origins else None
        )
        self.trusted_proxies: list[IpNetwork] = [
            ipaddress.ip_network(cidr, strict=False) for cidr in config.trusted_proxies
        ]
        self.proxy_protocol = bool(getattr(config, "proxy_protocol", False))

        fail_if_none = config.fail_if_no_subprotocol

        def select(_: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
            """The first of the client's offered subprotocols that is MQTT's (MQTT 5.0 §6.0)."""
            for subprotocol in offered:
                if subprotocol in MQTT_SUBPROTOCOLS:
                    return subprotocol
            if not offered and not fail_if_none:
                return None
            raise NegotiationError(
                "no mqtt subprotocol offered"
                if not offered
                else f"unsupported subprotocols {', '.join(offered)}"
            )

        self.subprotocol_selector = select

    def _make_protocol(self) -> MqttProtocol:
        return _WsProtocol(self)
