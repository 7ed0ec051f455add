"""CoAP over DTLS with pre-shared keys (``coaps://``, RFC 7252 §9.1; DTLS 1.2, RFC 6347), through tinydtls.

tinydtls is reached through the ``DTLSSocket`` binding (the one aiocoap uses). Its ``DTLS`` object is
driven without sockets: datagrams go in with ``handleMessageAddr``, decrypted application data comes out of
the ``read`` callback, and records to send come out of the ``write`` callback. :class:`DtlsDatagramCore`
wraps any :class:`gateways.udp.DatagramCore` that way, so the CoAP engine sees plain CoAP datagrams from
authenticated peers only; :class:`CoapDtlsGateway` is the CoAP gateway on such a socket.

Bounds: at most ``max_peers`` DTLS peers (datagrams from further unknown addresses are dropped and
counted), and a peer silent for ``idle_timeout`` seconds is forgotten (its DTLS state freed; the client
handshakes again). Only PSK cipher suites (TLS_PSK_WITH_AES_128_CCM_8) are offered: tinydtls' ECDSA
certificate mode needs raw keys the binding does not expose.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Hashable
from typing import Any

from DTLSSocket import dtls  # type: ignore[import-untyped]

from core.config import CoapConfig, parse_bind
from gateways.base import Broker
from gateways.coap.adapter import CoapUdpGateway
from gateways.udp import DatagramCore

__all__ = ["CoapDtlsGateway", "DtlsDatagramCore"]

log = logging.getLogger("mqgate.coap")

_CONNECTED = 0x1DE  # DTLS_EVENT_CONNECTED
_SWEEP_INTERVAL = 1.0

_Key = tuple[str, int]


def _key(host: str, port: int) -> _Key:
    """The peer's address as tinydtls reports it back (IPv4 as ``::ffff:a.b.c.d``), normalised."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), port


class DtlsDatagramCore:
    """A :class:`DatagramCore` that decrypts datagrams for ``inner`` and encrypts what it sends."""

    def __init__(
        self,
        inner: DatagramCore,
        psk: dict[bytes, bytes],
        *,
        max_peers: int = 10_000,
        idle_timeout: float = 300.0,
    ) -> None:
        self.inner = inner
        self.max_peers = max_peers
        self.idle_timeout = idle_timeout
        self.dropped_peers = 0  # datagrams from new addresses refused because max_peers was reached
        self._dtls: Any = dtls.DTLS(
            read=self._on_read, write=self._on_write, event=self._on_event, pskId=b"", pskStore=psk
        )
        self._peers: dict[_Key, Hashable] = {}  # tinydtls address -> the socket's peer
        self._last_seen: dict[_Key, float] = {}
        self._established: dict[_Key, Any] = {}  # peers that sent application data: their dtls.Session
        self._plain: list[tuple[_Key, bytes]] = []
        self._out: list[tuple[Hashable, bytes]] = []
        self._next_sweep: float | None = None

    # --- tinydtls callbacks

    def _on_read(self, address: tuple[Any, ...], data: bytes) -> int:
        self._plain.append((_key(address[0], address[1]), bytes(data)))
        return len(data)

    def _on_write(self, address: tuple[Any, ...], data: bytes) -> int:
        peer = self._peers.get(_key(address[0], address[1]))
        if peer is not None:
            self._out.append((peer, bytes(data)))
        return len(data)

    def _on_event(self, level: int, code: int) -> None:
        if code != _CONNECTED:
            log.debug("dtls event 0x%x (level %d)", code, level)

    # --- DatagramCore

    def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> None:
        assert isinstance(peer, tuple)
        host, port = peer[0], peer[1]
        key = _key(host, port)
        if key not in self._peers:
            if len(self._peers) >= self.max_peers:
                self.dropped_peers += 1
                return
            self._peers[key] = peer
        self._last_seen[key] = now
        if self._next_sweep is None:
            self._next_sweep = now + _SWEEP_INTERVAL
        self._dtls.handleMessageAddr(_tinydtls_host(host), port, data)
        plain, self._plain = self._plain, []
        for source, message in plain:
            if source not in self._established:
                self._established[source] = dtls.Session(_tinydtls_host(source[0]), source[1], 0, 0)
            self.inner.receive_datagram(message, self._peers.get(source, peer), now)

    def datagrams_to_send(self) -> list[tuple[Hashable, bytes]]:
        for peer, message in self.inner.datagrams_to_send():
            assert isinstance(peer, tuple)
            session = self._established.get(_key(peer[0], peer[1]))
            if session is not None:  # never start a handshake towards a client
                self._dtls.write(session, message)
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        inner = self.inner.get_timer()
        sweep = self._next_sweep
        if inner is None or (sweep is not None and sweep < inner):
            return sweep
        return inner

    def handle_timer(self, now: float) -> None:
        inner = self.inner.get_timer()
        if inner is not None and inner <= now:
            self.inner.handle_timer(now)
        if self._next_sweep is not None and now >= self._next_sweep:
            self._dtls.checkRetransmit()
            self._forget_idle(now)
            self._next_sweep = now + _SWEEP_INTERVAL if self._peers else None

    def _forget_idle(self, now: float) -> None:
        limit = now - self.idle_timeout
        for key in [key for key, seen in self._last_seen.items() if seen < limit]:
            del self._last_seen[key]
            del self._peers[key]
            self._established.pop(key, None)
            self._dtls.resetPeer(dtls.Session(_tinydtls_host(key[0]), key[1], 0, 0))

    @property
    def peers(self) -> int:
        return len(self._peers)


def _tinydtls_host(host: str) -> str:
    """tinydtls sessions are IPv6: an IPv4 address goes in as ``::ffff:a.b.c.d``."""
    return f"::ffff:{host}" if ":" not in host else host


class CoapDtlsGateway(CoapUdpGateway):
    """``gateways.coap.dtls``: the CoAP gateway on a DTLS (PSK) socket, ``coaps://``."""

    name = "coap:dtls"

    def __init__(self, config: CoapConfig, broker: Broker) -> None:
        super().__init__(config, broker)
        settings = config.dtls
        self.host, self.port = parse_bind(settings.bind, "gateways.coap.dtls.bind")
        psk = {identity.encode(): key.encode() for identity, key in settings.psk.items()}
        self.core = DtlsDatagramCore(
            self.gateway, psk, max_peers=settings.max_peers, idle_timeout=settings.idle_timeout
        )
