"""CoAP and LwM2M over DTLS 1.2 (``coaps://``, RFC 7252 §9.1; RFC 6347), through Mbed TLS (python-mbedtls).

Each peer has an Mbed TLS context driven without sockets (``TLSWrappedBuffer``): a datagram goes in with
``receive_from_network``, handshake steps run with ``do_handshake``, decrypted application data comes out of
``readinto`` and the records to send out of ``peek_outgoing``/``consume_outgoing``. :class:`DtlsDatagramCore`
wraps any :class:`gateways.udp.DatagramCore` that way, so the CoAP engine sees plain CoAP datagrams from
authenticated peers only; :class:`gateways.coap.adapter.CoapDtlsGateway` is the CoAP gateway on such a socket.

Credentials: pre-shared keys (RFC 7252 §9.1.3.1, ``psk`` identity -> key) and X.509 certificates
(§9.1.3.3, ``certfile``/``keyfile``, client certificates checked against ``cacertfile`` with
``verify = "verify_peer"``; ``fail_if_no_peer_cert`` refuses clients without one). Both may be configured at
once: the client's cipher suites choose. The identity a peer authenticated with is kept for the gateways:
:meth:`DtlsDatagramCore.peer_certificate` (a verified certificate) and :meth:`DtlsDatagramCore.psk_identity`
(the PSK identity, RFC 4279 §2, whose key the handshake proved the client holds).

Bounds and bad input: a new peer must open with a ClientHello (RFC 6347 §4.2.1), anything else is ignored and
counted; the first ClientHello is answered statelessly with a HelloVerifyRequest cookie (§4.2.1), so no state
is kept for a spoofed address; at most ``max_peers`` peers hold state (further new ones are dropped and
counted); a handshake not finished within ``handshake_timeout`` and a peer silent for ``idle_timeout``
seconds are forgotten (their state freed). A failed handshake is logged once with the peer and the cause,
counted, and its state freed; other peers are not affected. Records leave in datagrams of at most
:data:`MTU` bytes (handshake messages are fragmented by Mbed TLS, §4.2.3).

Repeated failures: each failed handshake also counts towards its address's ban (``auth.max_failures_per_min``,
the :class:`AddressGuard`, as a failed TLS handshake does). A banned address's ClientHellos are dropped before
any DTLS state exists (not even a HelloVerifyRequest), counted in ``banned_handshakes`` and logged once per
peer. A spoofed address cannot be banned this way: state, and so a failure, needs the cookie round trip.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from mbedtls import pk, tls, x509
from mbedtls.exceptions import TLSError

from core.config import DtlsConfig
from core.errors import ConfigError
from core.logging import PeerLog, format_peer
from gateways.udp import DatagramCore

if TYPE_CHECKING:
    from core.trace import DatagramTrace

__all__ = ["MTU", "AddressGuard", "DtlsDatagramCore", "server_context"]

log = logging.getLogger("mqgate.coap")

MTU = 1280  # bytes per datagram sent: the IPv6 minimum link MTU, safe on any path
_SWEEP_INTERVAL = 1.0
_RING = 32 * 1024  # python-mbedtls' buffer capacity each way; a larger datagram is not a DTLS record
_HEADER = 13  # RFC 6347 §4.1: type, version, epoch, sequence number, length
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_CLOSE_NOTIFY = 0x7880  # MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY


class _PskKeys(Mapping[str, bytes]):
    """The PSK table (identity -> key) as the server context's ``pre_shared_key_store``, remembering the
    identity Mbed TLS looked up: python-mbedtls has no getter for the peer's identity, but its PSK callback
    reads this mapping with the ClientKeyExchange's identity (RFC 4279 §2) inside ``do_handshake``."""

    __slots__ = ("_keys", "_looked_up")

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._keys = keys
        self._looked_up: str | None = None

    def __getitem__(self, identity: str) -> bytes:
        key = self._keys[identity]
        self._looked_up = identity
        return key

    def take_looked_up(self) -> str | None:
        """The identity found since the last call, if any."""
        identity, self._looked_up = self._looked_up, None
        return identity

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class AddressGuard(Protocol):
    """Bans addresses with too many failures (:class:`core.auth.access.AccessControl`); peers are
    ``host:port`` strings."""

    def refuses_address(self, peer: str) -> bool: ...

    def handshake_failed(self, peer: str) -> None: ...


def server_context(settings: DtlsConfig, key: str) -> tls.ServerContext:
    """The Mbed TLS server context for ``settings``; ConfigError names ``key`` (``gateways.coap.dtls``)."""
    if not settings.psk and not settings.certfile:
        raise ConfigError(f"{key}: set psk, or certfile and keyfile, to enable DTLS")
    if settings.verify == "verify_peer" and not settings.cacertfile:
        raise ConfigError(f'{key}.cacertfile: required with verify = "verify_peer"')
    chain: tuple[tuple[x509.CRT, ...], pk.ECC | pk.RSA] | None = None
    trust: tls.TrustStore | None = None
    try:
        if settings.certfile:
            chain = (
                _certificates(settings.certfile, key),
                _private_key(settings.keyfile or settings.certfile, settings.key_password),
            )
        if settings.cacertfile:
            trust = tls.TrustStore.from_pem_file(settings.cacertfile)
    except (OSError, TLSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load the certificates or key: {exc}") from None
    configuration = tls.DTLSConfiguration(
        # True: a client certificate is required and checked (MBEDTLS_SSL_VERIFY_REQUIRED); False: one is
        # asked for and checked, but the handshake goes on without it (OPTIONAL; DtlsDatagramCore decides)
        validate_certificates=settings.verify == "verify_peer" and settings.fail_if_no_peer_cert,
        certificate_chain=chain,
        trust_store=trust,
        lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
        pre_shared_key_store={identity: secret.encode() for identity, secret in settings.psk.items()},
    )
    return tls.ServerContext(configuration)


def _certificates(path: str, key: str) -> tuple[x509.CRT, ...]:
    """The PEM certificates of ``path``, leaf first."""
    with open(path) as file:
        text = file.read()
    end = "-----END CERTIFICATE-----"
    blocks = [block + end for block in text.split(end) if "-----BEGIN CERTIFICATE-----" in block]
    if not blocks:
        raise ConfigError(f"{key}.certfile: no PEM certificate in {path}")
    return tuple(x509.CRT.from_PEM(block[block.index("-----BEGIN") :]) for block in blocks)


def _private_key(path: str, password: str) -> pk.ECC | pk.RSA:
    """An EC or RSA private key from a PEM file."""
    with open(path, "rb") as file:
        pem = file.read()
    secret = password.encode() if password else None
    try:
        return pk.ECC.from_buffer(pem, secret)
    except (TLSError, ValueError):
        return pk.RSA.from_buffer(pem, secret)


def _is_client_hello(data: bytes) -> bool:
    """A handshake record of epoch 0 carrying a ClientHello (RFC 6347 §4.1, §4.2.2)."""
    return (
        len(data) > _HEADER
        and data[0] == _HANDSHAKE
        and data[3:5] == b"\0\0"
        and data[_HEADER] == _CLIENT_HELLO
    )


def _handshake_over(context: tls.TLSWrappedBuffer) -> bool:
    return context._handshake_state.name == "HANDSHAKE_OVER"  # the stubs type the enum's members as int


def _verified(context: tls.TLSWrappedBuffer) -> bool:
    """Whether the peer's certificate chain verified: ``mbedtls_ssl_get_verify_result() == 0``, which the
    binding exposes only as this attribute."""
    return bool(context._verified)  # type: ignore[attr-defined]


def _datagrams(records: bytes) -> list[bytes]:
    """Records packed into datagrams of at most :data:`MTU` bytes; a record is never split (§4.1.1)."""
    out: list[bytes] = []
    start = end = 0
    size = len(records)
    while end < size:
        length = _HEADER + int.from_bytes(records[end + 11 : end + 13], "big")
        if end > start and end + length - start > MTU:
            out.append(records[start:end])
            start = end
        end += length
    if start < size:
        out.append(records[start:])
    return out


class _Peer:
    """One DTLS peer: its Mbed TLS context and timestamps."""

    __slots__ = ("address", "context", "established", "last_seen", "psk_identity", "started")

    def __init__(self, address: Hashable, context: tls.TLSWrappedBuffer, now: float) -> None:
        self.address = address
        self.context = context
        self.established = False
        self.psk_identity: str | None = None
        self.started = now
        self.last_seen = now


class DtlsDatagramCore:
    """A :class:`DatagramCore` that decrypts datagrams for ``inner`` and encrypts what it sends.

    ``context``'s PSK table is wrapped so the identity each peer's handshake used is recorded: the handshakes
    of one core run one at a time (``do_handshake`` is synchronous), so a lookup belongs to the peer whose
    handshake step is running."""

    def __init__(
        self,
        inner: DatagramCore,
        context: tls.ServerContext,
        *,
        verify_peer: bool = False,
        max_peers: int = 10_000,
        handshake_timeout: float = 30.0,
        idle_timeout: float = 300.0,
        logger: logging.Logger = log,
        guard: AddressGuard | None = None,
    ) -> None:
        self.inner = inner
        self._psk_keys = _PskKeys(context.configuration.pre_shared_key_store)
        self.context = tls.ServerContext(context.configuration.update(pre_shared_key_store=self._psk_keys))
        self.verify_peer = verify_peer  # a client certificate, when given, must verify (OPTIONAL mode)
        self.max_peers = max_peers
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.log = logger
        self.guard = guard
        self.dropped_peers = 0  # new peers refused because max_peers was reached
        self.ignored_datagrams = 0  # datagrams from unknown peers that do not open a handshake
        self.handshakes = 0  # completed
        self.handshake_failures = 0  # wrong key, unknown CA, missing certificate, timeout, bad records
        self.unsent_datagrams = 0  # the inner core's datagrams to peers without a DTLS session (forgotten)
        self.banned_handshakes = 0  # ClientHellos dropped: the address is banned (auth.max_failures_per_min)
        self.bytes_in = 0  # wire bytes: every datagram received, every record sent
        self.bytes_out = 0
        self._banned_log = PeerLog(logger, "dtls")
        self._peers: dict[Hashable, _Peer] = {}
        self._out: list[tuple[Hashable, bytes]] = []
        self._scratch = bytearray(_RING)
        self._next_sweep: float | None = None
        self.packet_trace: DatagramTrace | None = None  # the adapter's, over DTLS: sees the plaintext

    @classmethod
    def from_config(
        cls,
        inner: DatagramCore,
        settings: DtlsConfig,
        key: str,
        logger: logging.Logger = log,
        guard: AddressGuard | None = None,
    ) -> DtlsDatagramCore:
        """The core for a ``[gateways.*.dtls]`` section named ``key``; ``guard`` bans failing addresses."""
        return cls(
            inner,
            server_context(settings, key),
            verify_peer=settings.verify == "verify_peer",
            max_peers=settings.max_peers,
            handshake_timeout=settings.handshake_timeout,
            idle_timeout=settings.idle_timeout,
            logger=logger,
            guard=guard,
        )

    # --- DatagramCore

    def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> None:
        self.bytes_in += len(data)
        if len(data) > _RING:
            self.ignored_datagrams += 1
            return
        state = self._peers.get(peer)
        if state is not None and state.established and _is_client_hello(data):
            self._forget(peer)  # the client restarted (a reboot on the same port): a new handshake
            state = None
        if state is None:
            self._new_peer(data, peer, now)
            return
        state.last_seen = now
        state.context.receive_from_network(data)
        if not state.established:
            self._handshake(state, now)
        if state.established:
            self._read(state, now)

    def datagrams_to_send(self) -> list[tuple[Hashable, bytes]]:
        for peer, message in self.inner.datagrams_to_send():
            state = self._peers.get(peer)
            if state is None or not state.established:  # a DTLS server never starts a handshake
                self.unsent_datagrams += 1
                continue
            if self.packet_trace is not None:
                self.packet_trace.sent(peer, message)
            try:
                state.context.write(message)
            except TLSError as exc:
                self.log.info(
                    "dtls %s: %d-byte datagram not sent: %s", format_peer(peer), len(message), exc.msg
                )
                continue
            self._drain(state)
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
            self._sweep(now)
            self._next_sweep = now + _SWEEP_INTERVAL if self._peers else None

    # --- peers

    @property
    def peers(self) -> int:
        return len(self._peers)

    def peer_certificate(self, peer: Hashable) -> bytes | None:
        """The DER certificate ``peer`` presented, when it was verified against ``cacertfile``."""
        state = self._peers.get(peer)
        if state is None or not state.established or not self.verify_peer:
            return None
        certificate = state.context.getpeercert(binary_form=True)
        return certificate if certificate and _verified(state.context) else None

    def psk_identity(self, peer: Hashable) -> str | None:
        """The PSK identity ``peer`` completed its handshake with (None for a certificate handshake)."""
        state = self._peers.get(peer)
        return None if state is None or not state.established else state.psk_identity

    def _new_peer(self, data: bytes, peer: Hashable, now: float) -> None:
        if not _is_client_hello(data):
            self.ignored_datagrams += 1
            return
        if self.guard is not None:
            address = format_peer(peer)
            if self.guard.refuses_address(address):
                self.banned_handshakes += 1
                self._banned_log.warning(address, "ClientHello dropped: too many authentication failures")
                return
        if len(self._peers) >= self.max_peers:
            self.dropped_peers += 1
            return
        context = self.context.wrap_buffers()
        context.setmtu(MTU)
        context.setcookieparam(format_peer(peer).encode())
        state = _Peer(peer, context, now)
        context.receive_from_network(data)
        if self._handshake(state, now):
            self._peers[peer] = state
            if self._next_sweep is None:
                self._next_sweep = now + _SWEEP_INTERVAL
            if state.established:
                self._read(state, now)

    def _handshake(self, state: _Peer, now: float) -> bool:
        """Run the handshake as far as the input allows; False when the peer has no state to keep (a
        HelloVerifyRequest was sent, or the handshake failed)."""
        context = state.context
        while not _handshake_over(context):
            try:
                self._handshake_step(state)
            except tls.WantReadError:
                break
            except tls.WantWriteError:
                self._drain(state)
            except tls.HelloVerifyRequest:
                self._drain(state)
                return False
            except TLSError as exc:
                self._drain(state)  # the fatal alert, when Mbed TLS wrote one
                self._fail(state, exc.msg)
                return False
        self._drain(state)
        if _handshake_over(context):
            if self.verify_peer and context.getpeercert(binary_form=True) and not _verified(context):
                self._fail(state, "client certificate verification failed")
                return False
            state.established = True
            self.handshakes += 1
            self.log.debug("dtls %s: handshake done, %s", format_peer(state.address), context.cipher())
        return True

    def _handshake_step(self, state: _Peer) -> None:
        """One ``do_handshake``; a PSK identity looked up during it is ``state``'s."""
        try:
            state.context.do_handshake()
        finally:
            identity = self._psk_keys.take_looked_up()
            if identity is not None:
                state.psk_identity = identity

    def _read(self, state: _Peer, now: float) -> None:
        scratch = self._scratch
        while True:
            try:
                size = state.context.readinto(scratch, len(scratch))  # type: ignore[arg-type]
            except tls.WantReadError:
                return
            except TLSError as exc:
                self._drain(state)
                if getattr(exc, "err", None) == _CLOSE_NOTIFY:
                    self.log.debug("dtls %s: closed by the peer", format_peer(state.address))
                    self._forget(state.address)
                else:
                    self._fail(state, exc.msg)
                return
            trace = self.packet_trace
            if trace is None:
                self.inner.receive_datagram(bytes(scratch[:size]), state.address, now)
            else:
                trace.receive(self.inner.receive_datagram, bytes(scratch[:size]), state.address, now)

    def _drain(self, state: _Peer) -> None:
        records = state.context.peek_outgoing(_RING)
        if records:
            state.context.consume_outgoing(len(records))
            self.bytes_out += len(records)
            self._out.extend((state.address, datagram) for datagram in _datagrams(records))

    def _fail(self, state: _Peer, cause: str) -> None:
        self.handshake_failures += 1
        self.log.warning("dtls %s: refused: %s", format_peer(state.address), cause)
        self._forget(state.address)
        if self.guard is not None:
            self.guard.handshake_failed(format_peer(state.address))

    def _forget(self, peer: Hashable) -> None:
        self._peers.pop(peer, None)

    def _sweep(self, now: float) -> None:
        """Retransmit handshake flights whose Mbed TLS timer ran out (§4.2.4); forget stale peers."""
        idle = now - self.idle_timeout
        late = now - self.handshake_timeout
        for state in list(self._peers.values()):
            if state.established:
                if state.last_seen < idle:
                    self._forget(state.address)
            elif state.started < late:
                self._fail(state, "handshake not finished in time")
            else:
                self._handshake(state, now)
