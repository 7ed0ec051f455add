"""TLS for the MQTT listeners (``listeners.tls``, ``listeners.wss``): the server context built from the
configuration, and the handshake in front of the connection's protocol.

The listener accepts sockets itself and runs each handshake with :meth:`asyncio.loop.connect_accepted_socket`
(``ssl_handshake_timeout``) rather than ``create_server(ssl=...)``, so that a failed or never-completed
handshake is seen: one log line naming the peer and the cause, a counter on the listener and in
``mqgate_auth{result="handshake_failure"}``, instead of asyncio's debug-only report. Each failure counts
towards the address's ban (``auth.max_failures_per_min``, as bad passwords do); a banned address's
connections are closed before any handshake. (``start_tls`` on an accepted connection loses the ClientHello
on uvloop, which starts reading as soon as the plain connection is made.)
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import cast

from core.config import SniCertConfig, TlsListenerConfig
from core.errors import ConfigError

__all__ = ["TlsSettings", "build_tls_settings", "chain_too_deep", "peer_certificate"]


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """What a listener needs to run TLS handshakes."""

    context: ssl.SSLContext
    handshake_timeout: float
    depth: int  # most intermediate CA certificates allowed between a client certificate and its root


def _load_chain(context: ssl.SSLContext, certfile: str, keyfile: str, password: str, key: str) -> None:
    try:
        context.load_cert_chain(certfile, keyfile or None, password or None)
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: cannot read {exc.filename or certfile}: {exc.strerror}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}: cannot load the certificate {certfile!r} and its key: {exc}") from None


def _context(
    config: TlsListenerConfig, certfile: str, keyfile: str, password: str, key: str
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if config.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, certfile, keyfile, password, key)
    if config.ciphers:
        try:
            context.set_ciphers(config.ciphers)
        except ssl.SSLError:
            raise ConfigError(
                f"{key.rpartition('.')[0]}.ciphers: no usable cipher in {config.ciphers!r}"
            ) from None
    if config.verify == "verify_peer":
        cafile_key = f"{key.rpartition('.')[0]}.cacertfile"
        if not config.cacertfile:
            raise ConfigError(f'{cafile_key}: required with verify = "verify_peer"')
        try:
            context.load_verify_locations(config.cacertfile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{cafile_key}: cannot load {config.cacertfile!r}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED if config.fail_if_no_peer_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def build_tls_settings(config: TlsListenerConfig, section: str) -> TlsSettings:
    """The server context of a TLS listener configured at ``section`` (``listeners.tls``); ConfigError names
    the key of a missing or unreadable file, a bad key password or an empty cipher list."""
    if not config.certfile:
        raise ConfigError(f"{section}.certfile: required when the listener is enabled")
    context = _context(config, config.certfile, config.keyfile, config.key_password, f"{section}.certfile")
    by_name: dict[str, ssl.SSLContext] = {}
    for index, entry in enumerate(config.sni):
        by_name[entry.server_name.lower()] = _sni_context(config, entry, f"{section}.sni[{index}]")
    if by_name:

        def choose(sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
            chosen = by_name.get(server_name.lower()) if server_name else None
            if chosen is not None:
                sslobj.context = chosen

        context.sni_callback = choose
    return TlsSettings(context, config.handshake_timeout, config.depth)


def _sni_context(config: TlsListenerConfig, entry: SniCertConfig, key: str) -> ssl.SSLContext:
    return _context(config, entry.certfile, entry.keyfile, entry.key_password, f"{key}.certfile")


def peer_certificate(transport: asyncio.BaseTransport) -> bytes | None:
    """The client certificate (DER) of a TLS transport, when the client sent one and it was verified."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    return cast(bytes | None, ssl_object.getpeercert(binary_form=True))


def chain_too_deep(transport: asyncio.BaseTransport, depth: int) -> bool:
    """More than ``depth`` intermediates between the client certificate and the trusted root."""
    ssl_object = transport.get_extra_info("ssl_object")
    sslobj = getattr(ssl_object, "_sslobj", None)
    get_chain = getattr(sslobj, "get_verified_chain", None)  # public from Python 3.13
    if get_chain is None:
        return False
    chain = get_chain()
    return bool(chain) and len(chain) - 2 > depth
