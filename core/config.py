"""Configuration: one TOML file mapped to typed dataclasses, every key overridable from the environment.

Precedence: dataclass defaults, then the TOML file, then ``MQGATE_*`` environment variables: the prefix,
then one name per level joined by ``__``, case-insensitive (``MQGATE_BROKER__MAX_INFLIGHT=64`` sets
``broker.max_inflight``). ``MQGATE_CONFIG`` is reserved for the path of the file (read by the caller).

The mapping is generic and the schema declarative: a section is a ``@dataclass(slots=True, frozen=True)``
whose fields are bool, int, float, str, ``X | None``, ``list[X]``, ``dict[int, X]``, ``dict[str, X]``, nested
sections or ``list[Section]`` (a TOML array of tables). ``field(metadata=...)`` declares constraints checked
for the file and the environment alike: ``min``, ``max``, ``choices`` and ``check`` (a callable
``(value, key)`` raising :class:`ConfigError`). Adding a section is adding a dataclass and a field that holds
it. ``None`` cannot be written in TOML (it is left out of :func:`dump_toml`) and is set from the environment
by an empty value, so optional fields should default to ``None``.

Every error is a :class:`ConfigError` whose one-line message starts with the dotted key, the environment
variable or the file path, then says what is wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import ipaddress
import math
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from core.errors import ConfigError
from core.topics import validate_filter, validate_topic

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "ENV_CONFIG_FILE",
    "ENV_PREFIX",
    "AclConfig",
    "AclRuleConfig",
    "ApiConfig",
    "AuthConfig",
    "BridgeConfig",
    "BrokerConfig",
    "CoapConfig",
    "CoapDtlsConfig",
    "Config",
    "DtlsConfig",
    "GatewaysConfig",
    "HardwareConfig",
    "JwtConfig",
    "ListenersConfig",
    "LogConfig",
    "LwM2mConfig",
    "LwM2mDtlsConfig",
    "MqttSnConfig",
    "RewriteRuleConfig",
    "SerialLinkConfig",
    "SniCertConfig",
    "TcpListenerConfig",
    "TlsListenerConfig",
    "UpstreamConfig",
    "WsListenerConfig",
    "WssListenerConfig",
    "apply_env",
    "build_section",
    "dump_toml",
    "load_config",
    "parse_bind",
    "parse_url",
]

ENV_PREFIX = "MQGATE_"
ENV_CONFIG_FILE = "MQGATE_CONFIG"

_T = TypeVar("_T", bound="DataclassInstance")


def parse_bind(value: str, key: str) -> tuple[str, int]:
    """Split a listen address: ``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` or ``PORT`` (host ``0.0.0.0``).

    HOST is an IP address literal, IPv6 in brackets; PORT is 0..65535 (0: an ephemeral port).
    """
    host, _, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host or "0.0.0.0"
    try:
        valid = ipaddress.ip_address(host).version == (6 if bracketed else 4)
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(
            f"{key}: invalid bind address {value!r}: expected IPV4:PORT, [IPV6]:PORT, :PORT or PORT"
        )
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ConfigError(f"{key}: invalid port in bind address {value!r}: expected 0..65535")
    return host, int(port)


@dataclass(slots=True, frozen=True)
class TcpListenerConfig:
    """The plain MQTT-over-TCP listener (MQTT 5.0 §4.2; IANA port 1883)."""

    enabled: bool = True
    bind: str = field(default="0.0.0.0:1883", metadata={"check": parse_bind})
    max_connections: int = field(default=1_000_000, metadata={"min": 1})
    backlog: int = 1024


def _check_cidrs(value: list[str], key: str) -> None:
    for index, item in enumerate(value):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{key}[{index}]: {item!r} is not an IP address or CIDR range") from None


def _check_ws_path(value: str, key: str) -> None:
    if not value.startswith("/"):
        raise ConfigError(f"{key}: {value!r} must start with '/'")


@dataclass(slots=True, frozen=True)
class SniCertConfig:
    """One ``[[listeners.tls.sni]]`` entry (server_name_indication): the certificate served to clients that
    ask for ``server_name``."""

    server_name: str  # required: the host name the client sends in its TLS ClientHello
    certfile: str  # required: PEM certificate chain
    keyfile: str = ""  # "" = the key is in certfile
    key_password: str = ""


@dataclass(slots=True, frozen=True)
class TlsListenerConfig:
    """MQTT over TLS (MQTT 5.0 §4.2; IANA port 8883). ``verify = "verify_peer"`` asks for a client certificate
    signed by ``cacertfile``; ``fail_if_no_peer_cert`` refuses clients without one. The verified certificate
    is available to authentication (``auth.peer_cert_as_username``)."""

    enabled: bool = False
    bind: str = field(default="0.0.0.0:8883", metadata={"check": parse_bind})
    max_connections: int = field(default=1_000_000, metadata={"min": 1})
    backlog: int = 1024
    handshake_timeout: float = field(default=15.0, metadata={"min": 0.01})  # seconds; then the socket closes
    certfile: str = ""  # required when enabled: PEM certificate chain
    keyfile: str = ""  # "" = the key is in certfile
    key_password: str = ""
    cacertfile: str = ""  # CAs that sign client certificates (verify_peer)
    verify: str = field(default="verify_none", metadata={"choices": ("verify_none", "verify_peer")})
    fail_if_no_peer_cert: bool = False  # with verify_peer: refuse a client without a certificate
    depth: int = field(default=10, metadata={"min": 0, "max": 100})  # intermediate CAs allowed in a chain
    min_version: str = field(default="1.2", metadata={"choices": ("1.2", "1.3")})
    ciphers: str = ""  # OpenSSL cipher list for TLS 1.2; "" = OpenSSL's defaults
    sni: list[SniCertConfig] = field(default_factory=list)  # per-name certificates


@dataclass(slots=True, frozen=True)
class WsListenerConfig:
    """MQTT over WebSocket (MQTT 5.0 §6): binary frames on ``path``, subprotocol ``mqtt`` or ``mqttv3.1``.
    A browser's ``Origin`` must be in ``allowed_origins`` (empty: any) against cross-site WebSocket
    hijacking; ``X-Forwarded-For``/``X-Forwarded-Port`` and, with ``proxy_protocol``, a PROXY protocol v1/v2
    header give the client's address only when the connection comes from ``trusted_proxies``."""

    enabled: bool = False
    bind: str = field(default="0.0.0.0:8083", metadata={"check": parse_bind})
    max_connections: int = field(default=1_000_000, metadata={"min": 1})
    backlog: int = 1024
    handshake_timeout: float = field(default=15.0, metadata={"min": 0.01})  # seconds for the HTTP upgrade
    path: str = field(default="/mqtt", metadata={"check": _check_ws_path})
    fail_if_no_subprotocol: bool = True  # refuse (400) a client that offers no mqtt subprotocol
    allowed_origins: list[str] = field(default_factory=list)  # e.g. ["https://app.example.com"]
    trusted_proxies: list[str] = field(default_factory=list, metadata={"check": _check_cidrs})
    proxy_protocol: bool = False  # trusted proxies send a PROXY protocol v1/v2 header first
    max_frame_size: int = field(default=2_097_152, metadata={"min": 1024})  # bytes per WebSocket message


@dataclass(slots=True, frozen=True)
class WssListenerConfig(TlsListenerConfig):
    """MQTT over secure WebSocket: the TLS options of ``[listeners.tls]`` and the WebSocket ones of
    ``[listeners.ws]`` (the PROXY protocol is not available here: it would precede the TLS handshake)."""

    bind: str = field(default="0.0.0.0:8084", metadata={"check": parse_bind})
    path: str = field(default="/mqtt", metadata={"check": _check_ws_path})
    fail_if_no_subprotocol: bool = True
    allowed_origins: list[str] = field(default_factory=list)
    trusted_proxies: list[str] = field(default_factory=list, metadata={"check": _check_cidrs})
    max_frame_size: int = field(default=2_097_152, metadata={"min": 1024})


@dataclass(slots=True, frozen=True)
class ListenersConfig:
    """The network listeners the broker accepts MQTT connections on."""

    tcp: TcpListenerConfig = field(default_factory=TcpListenerConfig)
    tls: TlsListenerConfig = field(default_factory=TlsListenerConfig)
    ws: WsListenerConfig = field(default_factory=WsListenerConfig)
    wss: WssListenerConfig = field(default_factory=WssListenerConfig)


@dataclass(slots=True, frozen=True)
class BrokerConfig:
    """Broker limits and features; the v5 ones are announced in CONNACK properties (MQTT 5.0 §3.2.2.3)."""

    max_inflight: int = field(default=32, metadata={"min": 1, "max": 65535})  # outgoing QoS 1/2 window
    max_mqueue_len: int = field(default=1000, metadata={"min": 0})  # pending queue per session, drop oldest
    mqueue_store_qos0: bool = True
    shared_subscription_strategy: str = field(
        default="random",
        metadata={"choices": ("random", "round_robin", "sticky", "hash_clientid", "hash_topic")},
    )
    max_packet_size: int = field(default=1_048_576, metadata={"min": 64, "max": 268_435_455})  # §3.1.2.11.4
    max_clientid_len: int = field(default=65535, metadata={"min": 23})  # §3.1.3.1
    max_topic_alias: int = field(default=65535, metadata={"min": 0, "max": 65535})  # §3.2.2.3.8
    max_topic_levels: int = field(default=128, metadata={"min": 1})
    server_keepalive: int = field(
        default=0, metadata={"min": 0, "max": 65535}
    )  # 0: the client's; §3.2.2.3.14
    max_session_expiry: int = field(
        default=0xFFFF_FFFF, metadata={"min": 0, "max": 0xFFFF_FFFF}
    )  # §3.1.2.11.2
    retain_available: bool = True
    max_retained_messages: int = field(default=1_000_000, metadata={"min": 0})  # 0: unlimited
    max_awaiting_rel: int = field(default=100, metadata={"min": 0})  # QoS 2 PUBRECs awaiting PUBREL
    wildcard_subscription: bool = True
    shared_subscription: bool = True
    sys_interval: float = field(default=60.0, metadata={"min": 0})  # $SYS publish period, 0 disables $SYS


@dataclass(slots=True, frozen=True)
class LogConfig:
    """Logging: the minimum level, plain text or JSON lines, to stderr or to a size-rotated file (DESIGN §4
    item 11)."""

    level: str = field(default="info", metadata={"choices": ("debug", "info", "warning", "error")})
    format: str = field(default="text", metadata={"choices": ("text", "json")})
    to: str = field(default="console", metadata={"choices": ("console", "file")})  # console: stderr
    file: str = "mqgate.log"  # with to = "file"; rotated to mqgate.log.1 ... mqgate.log.<backups>
    max_bytes: int = field(default=10 * 1024 * 1024, metadata={"min": 1024})  # rotate before exceeding
    backups: int = field(default=5, metadata={"min": 1})  # rotated files kept


def _check_api_keys(value: list[str], key: str) -> None:
    for index, item in enumerate(value):
        if not item or any(c.isspace() for c in item) or item.startswith(":") or item.endswith(":"):
            raise ConfigError(
                f'{key}[{index}]: an API key is a bearer token or "user:pass", without whitespace'
            )


@dataclass(slots=True, frozen=True)
class ApiConfig:
    """The HTTP management API and ``/metrics`` (``[api]``). ``keys`` are bearer tokens, or ``user:pass`` for
    basic authentication; with no keys only loopback callers are served."""

    enabled: bool = True
    bind: str = field(default="127.0.0.1:18083", metadata={"check": parse_bind})
    keys: list[str] = field(default_factory=list, metadata={"check": _check_api_keys})
    max_body_size: int = field(default=1_048_576, metadata={"min": 1024})  # larger request bodies get 413
    trace_dir: str = "mqgate-trace"  # trace files (POST /api/v5/trace), one JSON line per event
    alarm_memory_bytes: int = field(default=0, metadata={"min": 0})  # RSS over it: high_memory alarm; 0 = off


def _check_predefined(value: dict[int, str], key: str) -> None:
    for topic_id, name in value.items():
        if not 1 <= topic_id <= 0xFFFE:
            raise ConfigError(f"{key}: topic id {topic_id} outside 1..65534")
        if not name or "+" in name or "#" in name:
            raise ConfigError(f"{key}: {name!r} is not a topic name")


@dataclass(slots=True, frozen=True)
class MqttSnConfig:
    """The MQTT-SN 1.2 gateway (``[gateways.mqttsn]``). Timer defaults follow MQTT-SN 1.2 §6.13 and §7.2."""

    enabled: bool = True
    bind: str = field(default="0.0.0.0:1884", metadata={"check": parse_bind})
    gateway_id: int = field(default=1, metadata={"min": 0, "max": 255})
    advertise_interval: int = field(default=900, metadata={"min": 0, "max": 65535})  # s, 0 = no ADVERTISE
    advertise_address: str = field(default="255.255.255.255:1884", metadata={"check": parse_bind})
    enable_qos3: bool = True  # QoS -1 PUBLISH without a connection (§6.8)
    qos3_clientid: str = "mqttsn-qos3"  # the broker session QoS -1 messages are published from
    predefined: dict[int, str] = field(default_factory=dict, metadata={"check": _check_predefined})
    clientid_prefix: str = ""  # broker client id = prefix + MQTT-SN client id
    username: str = ""  # credentials added to every device's authentication ("" = none)
    password: str = ""
    max_inflight: int = field(default=1, metadata={"min": 1, "max": 65535})  # §6.6: one QoS 1/2 at a time
    t_retry: float = field(default=10.0, metadata={"min": 0.1})  # §6.13 T_retry
    n_retry: int = field(default=3, metadata={"min": 0})  # §6.13 N_retry
    keepalive_tolerance_long: float = field(default=1.1, metadata={"min": 1.0})  # §7.2: +10 % over 60 s
    keepalive_tolerance_short: float = field(default=1.5, metadata={"min": 1.0})  # §7.2: +50 % below
    idle_timeout: float = field(default=30.0, metadata={"min": 0.1})  # unfinished will handshake
    session_expiry: int = field(default=7200, metadata={"min": 0})  # clean session 0 sessions, seconds
    max_topics: int = field(
        default=1024, metadata={"min": 1, "max": 65534}
    )  # registered topic ids per client
    max_pending: int = field(default=100, metadata={"min": 1})  # deliveries waiting for a REGACK per client
    max_clients: int = field(default=100_000, metadata={"min": 1})


@dataclass(slots=True, frozen=True)
class DtlsConfig:
    """DTLS 1.2 for a CoAP-based gateway (RFC 7252 §9.1; RFC 6347) through Mbed TLS: pre-shared keys (``psk``)
    and/or X.509 certificates (``certfile``/``keyfile``; ``verify = "verify_peer"`` checks client certificates
    against ``cacertfile``, ``fail_if_no_peer_cert`` refuses clients without one). A verified client
    certificate is available to authentication (``auth.peer_cert_as_username``); with
    ``psk_identity_as_username`` a PSK client's identity is its user name, proven by the handshake."""

    enabled: bool = False
    bind: str = field(default="0.0.0.0:5684", metadata={"check": parse_bind})
    psk: dict[str, str] = field(default_factory=dict)  # PSK identity -> key, e.g. { "sensor-1" = "secret" }
    certfile: str = ""  # PEM certificate chain of the server
    keyfile: str = ""  # PEM key (EC or RSA); "" = the key is in certfile
    key_password: str = ""
    cacertfile: str = ""  # CAs that sign client certificates (required with verify_peer)
    verify: str = field(default="verify_none", metadata={"choices": ("verify_none", "verify_peer")})
    fail_if_no_peer_cert: bool = False  # with verify_peer: refuse a client without a certificate
    max_peers: int = field(default=10_000, metadata={"min": 1})  # DTLS peers; more new addresses are dropped
    handshake_timeout: float = field(default=30.0, metadata={"min": 1.0})  # seconds; then the peer is dropped
    idle_timeout: float = field(default=300.0, metadata={"min": 1.0})  # seconds; a silent peer is dropped
    psk_identity_as_username: bool = False  # a PSK client's identity is its user name (no password needed)


@dataclass(slots=True, frozen=True)
class CoapDtlsConfig(DtlsConfig):
    """CoAP over DTLS (``[gateways.coap.dtls]``, ``coaps://``; IANA port 5684)."""


@dataclass(slots=True, frozen=True)
class LwM2mDtlsConfig(DtlsConfig):
    """LwM2M over DTLS (``[gateways.lwm2m.dtls]``) on port 5784, EMQX 4.3's ``lwm2m.bind.dtls`` (5684 is
    CoAP's). ``check_endpoint_name``: a registration's endpoint name must be the identity the device
    authenticated with, its PSK identity or certificate common name (LwM2M 1.1 Transport §5.2.8)."""

    bind: str = field(default="0.0.0.0:5784", metadata={"check": parse_bind})
    check_endpoint_name: bool = True  # refuse (4.03) a registration whose ep is not the DTLS identity


@dataclass(slots=True, frozen=True)
class CoapConfig:
    """The CoAP gateway (``[gateways.coap]``): RFC 7252 with observe (RFC 7641) and block-wise (RFC 7959)."""

    enabled: bool = True
    bind: str = field(default="0.0.0.0:5683", metadata={"check": parse_bind})
    connection_required: bool = False  # only /mqtt/connection clients may publish and subscribe
    heartbeat: float = field(default=30.0, metadata={"min": 1.0})  # connections silent 1.5x this are closed
    notify_type: str = field(default="qos", metadata={"choices": ("non", "con", "qos")})
    max_inflight: int = field(default=1, metadata={"min": 1, "max": 65535})  # QoS 1/2 deliveries per client
    exchange_lifetime: float = field(default=247.0, metadata={"min": 1.0})  # RFC 7252 §4.8.2
    max_dedup_entries: int = field(default=100_000, metadata={"min": 1})
    max_dedup_bytes: int = field(default=16 * 1024 * 1024, metadata={"min": 1024})
    max_body_size: int = field(default=4 * 1024 * 1024, metadata={"min": 16})  # block-wise bodies
    block_size: int = field(default=1024, metadata={"choices": (16, 32, 64, 128, 256, 512, 1024)})
    clientid_prefix: str = ""
    dtls: CoapDtlsConfig = field(default_factory=CoapDtlsConfig)


@dataclass(slots=True, frozen=True)
class LwM2mConfig:
    """The LwM2M gateway (``[gateways.lwm2m]``), OMA LwM2M 1.0-1.2 over the project's CoAP engine, managed
    through MQTT JSON commands with EMQX's topic convention."""

    enabled: bool = True
    bind: str = field(default="0.0.0.0:5783", metadata={"check": parse_bind})
    clientid_prefix: str = ""  # broker client id = prefix + endpoint name
    mountpoint: str = "lwm2m/{ep}/"  # topic prefix; {ep} is the endpoint name
    topic_command: str = "dn/#"
    topic_response: str = "up/resp"
    topic_notify: str = "up/notify"
    topic_register: str = "up/register"
    topic_update: str = "up/update"
    qos: int = field(default=0, metadata={"min": 0, "max": 2})  # of uplink publishes
    lifetime_grace: float = field(default=5.0, metadata={"min": 0})  # seconds past the lifetime
    auto_observe: list[str] = field(default_factory=list)  # paths, or ["all"] for every registered instance
    queue_window: float = field(default=93.0, metadata={"min": 0})  # awake after an uplink: MAX_TRANSMIT_WAIT
    max_queued_commands: int = field(default=100, metadata={"min": 1})
    command_ttl: float = field(default=300.0, metadata={"min": 1})  # queued commands older get a timeout
    request_timeout: float = field(default=60.0, metadata={"min": 0.1})  # the device's answer
    xml_dir: str = ""  # more OMA object definitions (*.xml) beside the shipped ones
    exchange_lifetime: float = field(default=247.0, metadata={"min": 1.0})
    max_dedup_entries: int = field(default=100_000, metadata={"min": 1})
    max_dedup_bytes: int = field(default=16 * 1024 * 1024, metadata={"min": 1024})
    max_response_size: int = field(default=1_048_576, metadata={"min": 1024})  # block-wise bodies; over: 4.13
    dtls: LwM2mDtlsConfig = field(default_factory=LwM2mDtlsConfig)


@dataclass(slots=True, frozen=True)
class GatewaysConfig:
    """The protocol gateways (``[gateways.*]``)."""

    mqttsn: MqttSnConfig = field(default_factory=MqttSnConfig)
    coap: CoapConfig = field(default_factory=CoapConfig)
    lwm2m: LwM2mConfig = field(default_factory=LwM2mConfig)


@dataclass(slots=True, frozen=True)
class SerialLinkConfig:
    """One serial radio bridge (``[[hardware.serial]]``): every node behind it is a client of a gateway of its
    own, configured as ``[gateways.mqttsn]``."""

    device: str  # /dev/ttyUSB0, /dev/serial/by-id/...
    baudrate: int = field(default=115200, metadata={"min": 1})
    framing: str = field(default="length", metadata={"choices": ("length", "slip", "xbee1", "xbee2")})
    protocol: str = field(default="mqttsn", metadata={"choices": ("mqttsn",)})
    max_frame: int = field(default=1024, metadata={"min": 2, "max": 65535})  # longer frames are dropped
    reopen_min: float = field(default=0.5, metadata={"min": 0.01})  # seconds, first reopen delay
    reopen_max: float = field(default=30.0, metadata={"min": 0.01})  # seconds, backoff ceiling


@dataclass(slots=True, frozen=True)
class HardwareConfig:
    """Serial and radio links (``[hardware]``) whose nodes appear as gateway clients."""

    serial: list[SerialLinkConfig] = field(default_factory=list)


def parse_url(url: str, key: str = "upstream.url") -> tuple[str, int, bool]:
    """(host, port, tls) of ``mqtt://host[:1883]`` or ``mqtts://host[:8883]``; ConfigError names ``key``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"{key}: {url!r} must be mqtt://host:port or mqtts://host:port")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"{key}: bad port in {url!r}") from None
    return parts.hostname, port, tls


def _check_upstream_url(value: str, key: str) -> None:
    if value and not (value.startswith("mqtt://") or value.startswith("mqtts://")):
        raise ConfigError(f"{key}: {value!r} must be mqtt://host:port or mqtts://host:port (or empty)")


def _check_url(value: str, key: str) -> None:
    parse_url(value, key)


@dataclass(slots=True, frozen=True)
class UpstreamConfig:
    """Gateway-only edge mode (``[upstream]``): with a url, every gateway session goes to that broker and the
    embedded broker's MQTT listeners stay off unless ``embedded_listeners`` is true."""

    url: str = field(default="", metadata={"check": _check_upstream_url})  # "" = the embedded broker
    mode: str = field(default="transparent", metadata={"choices": ("transparent", "aggregating")})
    protocol_version: int = field(default=4, metadata={"choices": (4, 5)})
    credentials: str = field(default="gateway", metadata={"choices": ("gateway", "device")})
    username: str = ""  # the gateway's own credentials upstream (credentials = "gateway", and aggregating)
    password: str = ""
    clientid_prefix: str = ""  # upstream client id = prefix + device client id (transparent)
    client_id: str = ""  # of the shared connection in aggregating mode; "" = mqgate-edge-{hostname}
    keepalive: int = field(default=60, metadata={"min": 0, "max": 65535})
    ca_file: str = ""  # mqtts: trust these CAs (system CAs when empty)
    cert_file: str = ""  # mqtts: client certificate
    key_file: str = ""
    server_name: str = ""  # mqtts: SNI and the name checked in the certificate; "" = the url's host
    verify: bool = True
    buffer_dir: str = "mqgate-buffer"  # store-and-forward queue of QoS 1/2 messages (sqlite)
    max_buffer_bytes: int = field(default=64 * 1024 * 1024, metadata={"min": 1024})
    # seconds a device's QoS 1/2 publish waits for the upstream PUBACK before it is committed to the buffer
    # and acknowledged anyway; 0 = commit before every acknowledgement
    commit_delay: float = field(default=0.01, metadata={"min": 0.0, "max": 5.0})
    max_inflight: int = field(default=32, metadata={"min": 1, "max": 65000})
    backoff_min: float = field(default=0.5, metadata={"min": 0.01})
    backoff_max: float = field(default=30.0, metadata={"min": 0.01})
    embedded_listeners: bool = False


_AUTH_SOURCES = ("password_file", "database", "jwt")
_CERT_FIELDS = ("", "cn", "dn", "md5", "base64")


def _check_chain(value: list[str], key: str) -> None:
    for name in value:
        if name not in _AUTH_SOURCES:
            raise ConfigError(f"{key}: unknown source {name!r}; expected {', '.join(_AUTH_SOURCES)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}: a source is listed twice")


def _check_regex(value: str, key: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ConfigError(f"{key}: invalid regular expression: {exc}") from None


def _check_cidr(value: str, key: str) -> None:
    if value:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not an IP address or CIDR range") from None


@dataclass(slots=True, frozen=True)
class JwtConfig:
    """JWT in the password field (``[auth.jwt]``): one key source (HMAC secret, public key PEM, JWKS file or
    JWKS URL). ``exp``/``nbf`` are checked; ``verify_claims`` values may use ``%u`` (user name) and ``%c``
    (client id); an ``acl`` claim ``{"pub": [...], "sub": [...], "all": [...]}`` replaces the ACL."""

    secret: str = ""  # HS256/384/512
    public_key: str = ""  # PEM file: RS*, PS*, ES*, EdDSA
    jwks_file: str = ""
    jwks_url: str = ""
    jwks_refresh_interval: float = field(default=300.0, metadata={"min": 0.05})  # seconds
    algorithms: list[str] = field(default_factory=list)  # empty: every algorithm of the configured key kind
    leeway: float = field(default=0.0, metadata={"min": 0})  # seconds of clock skew allowed for exp/nbf
    verify_claims: dict[str, str] = field(default_factory=dict)  # e.g. { sub = "%u" }
    acl_claim: str = "acl"


@dataclass(slots=True, frozen=True)
class AuthConfig:
    """Authentication (``[auth]``): an ordered chain of sources, each answering allow, deny or ignore; when
    all ignore, ``allow_anonymous`` decides."""

    allow_anonymous: bool = True
    chain: list[str] = field(default_factory=list, metadata={"check": _check_chain})  # [] = each configured
    password_file: str = ""
    database: str = ""  # sqlite user db (``mqgate users``)
    jwt: JwtConfig = field(default_factory=JwtConfig)
    peer_cert_as_username: str = field(default="", metadata={"choices": _CERT_FIELDS})
    peer_cert_as_clientid: str = field(default="", metadata={"choices": _CERT_FIELDS})
    max_failures_per_min: int = field(default=0, metadata={"min": 0})  # per address; 0 = no limit
    max_credential_size: int = field(default=8192, metadata={"min": 16})  # longer passwords are refused


@dataclass(slots=True, frozen=True)
class AclRuleConfig:
    """One ``[[acl.rules]]`` entry: who (every given field must match; none = everybody), what, which topics
    (``eq F`` for an exact filter, ``%u``/``%c`` placeholders)."""

    permission: str = field(metadata={"choices": ("allow", "deny")})
    action: str = field(default="all", metadata={"choices": ("publish", "subscribe", "all")})
    topics: list[str] = field(default_factory=list)
    username: str = ""
    clientid: str = ""
    ipaddress: str = field(default="", metadata={"check": _check_cidr})


@dataclass(slots=True, frozen=True)
class AclConfig:
    """Authorisation (``[acl]``): the rules first (first match wins), then the mosquitto-format file."""

    file: str = ""
    rules: list[AclRuleConfig] = field(default_factory=list)
    no_match: str = field(default="allow", metadata={"choices": ("allow", "deny")})
    cache_ttl: float = field(default=60.0, metadata={"min": 0})  # per-client decision cache; 0 = off
    cache_max_entries: int = field(default=64, metadata={"min": 1})  # per client


@dataclass(slots=True, frozen=True)
class RewriteRuleConfig:
    """One ``[[rewrite]]`` rule, applied before the ACL: for a topic matching ``source``, ``regex`` is matched
    against the whole topic and ``dest`` (with ``$1``..``$9``) is the new topic; the first rule whose source
    matches decides."""

    source: str
    regex: str = field(metadata={"check": _check_regex})
    dest: str
    action: str = field(default="all", metadata={"choices": ("publish", "subscribe", "all")})


_BRIDGE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_bridge_name(value: str, key: str) -> None:
    if not _BRIDGE_NAME.fullmatch(value) or value.startswith("."):
        raise ConfigError(
            f"{key}: {value!r} must be 1-64 letters, digits, '_', '-' or '.' (it names the buffer file)"
        )


def _check_filters(value: list[str], key: str) -> None:
    for index, topic_filter in enumerate(value):
        why = validate_filter(topic_filter)
        if why is not None:
            raise ConfigError(f"{key}[{index}]: {topic_filter!r} is not a topic filter: {why}")


def _check_prefix(value: str, key: str) -> None:
    if value and validate_topic(value + "x") is not None:
        raise ConfigError(f"{key}: {value!r} cannot start a topic name (no '+', '#' or U+0000)")


@dataclass(slots=True, frozen=True)
class BridgeConfig:
    """One MQTT bridge (``[[bridges]]``) between the embedded broker and a remote broker: local messages
    matching ``forwards`` are sent to the remote (topic ``remote_prefix + topic``), remote messages matching
    ``subscriptions`` are published locally (topic ``local_prefix + topic``). QoS 1/2 forwards go through an
    on-disk buffer, so a remote outage loses nothing; at most ``max_inflight`` wait for the remote's
    acknowledgement, and one not acknowledged within ``retry_interval`` seconds is sent again."""

    name: str = field(metadata={"check": _check_bridge_name})  # required: the client id and buffer file
    url: str = field(metadata={"check": _check_url})  # required: mqtt://host:port or mqtts://host:port
    protocol_version: int = field(default=4, metadata={"choices": (4, 5)})
    client_id: str = ""  # "" = mqgate-bridge-{name}
    username: str = ""
    password: str = ""
    keepalive: int = field(default=60, metadata={"min": 0, "max": 65535})
    ca_file: str = ""  # mqtts: trust these CAs (system CAs when empty)
    cert_file: str = ""  # mqtts: client certificate
    key_file: str = ""
    server_name: str = ""  # mqtts: SNI and the name checked in the certificate; "" = the url's host
    verify: bool = True
    forwards: list[str] = field(default_factory=list, metadata={"check": _check_filters})  # local -> remote
    subscriptions: list[str] = field(
        default_factory=list, metadata={"check": _check_filters}
    )  # remote -> local
    local_prefix: str = field(default="", metadata={"check": _check_prefix})  # prepended to remote topics
    remote_prefix: str = field(default="", metadata={"check": _check_prefix})  # prepended to local topics
    qos: int = field(default=1, metadata={"min": 0, "max": 2})  # highest QoS of forwards and subscriptions
    max_inflight: int = field(default=32, metadata={"min": 1, "max": 65000})  # unacknowledged at the remote
    retry_interval: float = field(default=30.0, metadata={"min": 0.01})  # seconds before an unacked resend
    buffer_dir: str = "mqgate-bridge-buffer"  # QoS 1/2 forwards waiting for the remote (sqlite)
    max_buffer_bytes: int = field(default=64 * 1024 * 1024, metadata={"min": 1024})
    backoff_min: float = field(default=0.5, metadata={"min": 0.01})  # reconnect backoff, seconds
    backoff_max: float = field(default=30.0, metadata={"min": 0.01})


@dataclass(slots=True, frozen=True)
class Config:
    """The whole configuration: one field per top-level TOML table."""

    listeners: ListenersConfig = field(default_factory=ListenersConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    gateways: GatewaysConfig = field(default_factory=GatewaysConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    bridges: list[BridgeConfig] = field(default_factory=list)
    log: LogConfig = field(default_factory=LogConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    acl: AclConfig = field(default_factory=AclConfig)
    rewrite: list[RewriteRuleConfig] = field(default_factory=list)
    api: ApiConfig = field(default_factory=ApiConfig)


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Load the configuration: defaults, then the TOML file at ``path`` if given, then the ``MQGATE_*``
    variables of ``environ`` (``os.environ`` by default). Raises :class:`ConfigError`."""
    data = {} if path is None else _read_toml(path)
    return build_section(Config, apply_env(Config, data, os.environ if environ is None else environ))


def build_section(cls: type[_T], data: Mapping[str, object], prefix: str = "") -> _T:
    """Build the dataclass ``cls`` from a table as parsed by tomllib; missing keys keep their defaults.

    ``prefix`` is the dotted name of the table, for error messages.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, object] = {}
    for name, raw in data.items():
        key = _join(prefix, name)
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            raise ConfigError(f"{key}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))
        values[name] = _convert(_hints(cls)[name], raw, key)
        _check(fields[name].metadata, values[name], key)
    for name, f in fields.items():
        if (
            name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"{_join(prefix, name)}: required key is missing")
    return cls(**values)


def apply_env(
    cls: type[DataclassInstance], data: Mapping[str, object], environ: Mapping[str, str]
) -> dict[str, object]:
    """Return a copy of ``data`` (a TOML document for ``cls``) with the ``MQGATE_*`` overrides applied.

    Each value is converted by the type of its field (bool: true/false/1/0/yes/no/on/off; lists and
    tables: a TOML inline value) and checked here, so that errors name the variable.
    """
    merged = copy.deepcopy(dict(data))
    seen: dict[tuple[str, ...], str] = {}
    for name, text in sorted(environ.items()):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == ENV_CONFIG_FILE:
            continue
        path = tuple(upper.removeprefix(ENV_PREFIX).lower().split("__"))
        if path in seen:
            raise ConfigError(f"{name}: sets the same key as {seen[path]}")
        seen[path] = name
        tp, metadata = _resolve_env(cls, path, name)
        label = f"{name} ({'.'.join(path)})"
        raw = _parse_env(tp, text, label)
        _check(metadata, _convert(tp, raw, label), label)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = raw
    return merged


def dump_toml(config: DataclassInstance) -> str:
    """The effective configuration as a TOML document that loads back to an equal configuration."""
    lines: list[str] = []
    _dump_table(config, "", False, lines)
    return "\n".join(lines).lstrip("\n") + "\n"


_EXPECTED = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_TOML_NAMES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {c: f"\\u{c:04x}" for c in (*range(0x20), 0x7F)} | {
    ord('"'): '\\"',
    ord("\\"): "\\\\",
    ord("\b"): "\\b",
    ord("\t"): "\\t",
    ord("\n"): "\\n",
    ord("\f"): "\\f",
    ord("\r"): "\\r",
}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, ``(tp, False)`` otherwise."""
    if get_origin(tp) not in (Union, types.UnionType):
        return tp, False
    args = [a for a in get_args(tp) if a is not type(None)]
    if len(args) != 1:
        raise TypeError(f"unsupported configuration type {tp!r}")
    return args[0], True


def _is_table_array(tp: Any) -> bool:
    return get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0])


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _mismatch(key: str, expected: str, raw: object) -> ConfigError:
    got = _TOML_NAMES.get(type(raw), type(raw).__name__)
    if isinstance(raw, bool | int | float | str):
        got += f" {raw!r}"
    return ConfigError(f"{key}: expected {expected}, got {got}")


def _convert(tp: Any, raw: object, key: str) -> object:
    """Check ``raw`` (as parsed by tomllib) against the type ``tp`` and convert it."""
    tp, optional = _unwrap_optional(tp)
    if optional and raw is None:
        return None
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp) or origin is dict:
        if not isinstance(raw, dict):
            raise _mismatch(key, "a table", raw)
        if origin is dict:
            return {_dict_key(args[0], k, key): _convert(args[1], v, f"{key}.{k}") for k, v in raw.items()}
        return build_section(tp, raw, key)
    if origin is list:
        if not isinstance(raw, list):
            raise _mismatch(key, "an array", raw)
        return [_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(raw)]
    if tp not in _EXPECTED:
        raise TypeError(f"unsupported configuration type {tp!r} for {key}")
    if tp is float and type(raw) is int:
        raw = float(raw)
    if type(raw) is not tp:
        raise _mismatch(key, _EXPECTED[tp], raw)
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ConfigError(f"{key}: expected a finite number, got {raw!r}")
    return raw


def _dict_key(tp: Any, key: str, table: str) -> object:
    if tp is str:
        return key
    if tp is not int:
        raise TypeError(f"unsupported configuration key type {tp!r} for {table}")
    if not re.fullmatch(r"-?[0-9]+", key):
        raise ConfigError(f"{table}: expected integer keys, got {key!r}")
    return int(key)


def _check(metadata: Mapping[str, Any], value: Any, key: str) -> None:
    """Apply the ``min``, ``max``, ``choices`` and ``check`` constraints of a field's metadata."""
    if value is None:
        return
    if "min" in metadata and value < metadata["min"]:
        raise ConfigError(f"{key}: must be >= {metadata['min']}, got {value!r}")
    if "max" in metadata and value > metadata["max"]:
        raise ConfigError(f"{key}: must be <= {metadata['max']}, got {value!r}")
    if "choices" in metadata and value not in metadata["choices"]:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, metadata['choices']))}; got {value!r}")
    if "check" in metadata:
        metadata["check"](value, key)


def _resolve_env(
    cls: type[DataclassInstance], path: tuple[str, ...], name: str
) -> tuple[Any, Mapping[str, Any]]:
    """The type and field metadata of the key that the variable ``name`` (split into ``path``) sets."""
    tp: Any = cls
    metadata: Mapping[str, Any] = {}
    dotted = ".".join(path)
    for part in path:
        fields = {f.name: f for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else {}
        if part not in fields:
            raise ConfigError(f"{name}: matches no configuration key ({dotted} does not exist)")
        tp, metadata = _hints(tp)[part], fields[part].metadata
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{name}: {dotted} is a section; set its keys one by one")
    if _is_table_array(tp):
        raise ConfigError(f"{name}: {dotted} is an array of tables, which cannot be set from the environment")
    return tp, metadata


def _parse_env(tp: Any, text: str, label: str) -> object:
    """The value of an environment variable as tomllib would have parsed it for a field of type ``tp``."""
    tp, optional = _unwrap_optional(tp)
    if optional and text == "":
        return None
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ConfigError(f"{label}: expected a boolean (true/false, 1/0, yes/no, on/off), got {text!r}")
    if tp is int or tp is float:
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{label}: expected {_EXPECTED[tp]}, got {text!r}") from None
    if tp is str:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            f"{label}: expected a TOML inline value such as [1, 2] or {{ a = 1 }}: {e}"
        ) from None


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as e:
        raise ConfigError(f"{os.fsdecode(path)}: cannot read the config file: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{os.fsdecode(path)}: invalid TOML: {e}") from e


def _dump_table(section: DataclassInstance, name: str, array: bool, out: list[str]) -> None:
    """Append ``section`` as the table ``name`` (an element of an array of tables if ``array``)."""
    scalars: list[str] = []
    tables: list[tuple[str, DataclassInstance, bool]] = []
    for f in dataclasses.fields(section):
        value, tp = getattr(section, f.name), _unwrap_optional(_hints(type(section))[f.name])[0]
        full = _join(name, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(tp):
            tables.append((full, value, False))
        elif _is_table_array(tp) and value:
            tables.extend((full, v, True) for v in value)
        else:
            scalars.append(f"{f.name} = {_toml_value(value)}")
    if array or (name and scalars):
        out += ["", f"[[{name}]]" if array else f"[{name}]"]
    out += scalars
    for full, table, is_array in tables:
        _dump_table(table, full, is_array, out)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return f'"{value.translate(_ESCAPES)}"'
    if isinstance(value, list):
        return f"[{', '.join(map(_toml_value, value))}]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_value(key)
