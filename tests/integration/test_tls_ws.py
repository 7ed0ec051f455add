"""MQTT over TLS, WebSocket and secure WebSocket (``listeners.tls``, ``listeners.ws``, ``listeners.wss``).

Real paho-mqtt clients (``transport="websockets"`` for WebSocket) and the ``websockets`` client against a
running mqgate on ephemeral loopback ports. Every certificate is generated here (the ``cryptography``
package): a CA, a server certificate for 127.0.0.1/localhost, a second one for the SNI name, and a client
certificate; nothing is committed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

from core.listeners.websocket import parse_proxy_header
from tests.conftest import RunningBroker
from tests.integration.helpers import TIMEOUT, wait_for
from tests.integration.tls_helpers import TlsClient, issue, write_pair

StartBroker = Callable[..., RunningBroker]

SNI_NAME = "sni.mqgate.test"
MQTT = [Subprotocol("mqtt")]


# --- certificates


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    sni_cert: Path
    sni_key: Path
    client_cert: Path
    client_key: Path
    client_der: bytes
    chained_cert: Path  # a client certificate issued by an intermediate CA, followed by that CA
    chained_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    import ipaddress

    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("mqgate test CA", ca_key, "mqgate test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = issue(
        "mqgate-test-server",
        server_key,
        "mqgate test CA",
        ca_key,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    sni_key = ec.generate_private_key(ec.SECP256R1())
    sni = issue(SNI_NAME, sni_key, "mqgate test CA", ca_key, sans=[x509.DNSName(SNI_NAME)])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue("device-42", client_key, "mqgate test CA", ca_key)
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = issue("mqgate test intermediate", intermediate_key, "mqgate test CA", ca_key, ca=True)
    chained_key = ec.generate_private_key(ec.SECP256R1())
    chained = issue("device-chained", chained_key, "mqgate test intermediate", intermediate_key)
    write_pair(directory, "chained", chained, chained_key)
    with (directory / "chained.pem").open("ab") as chain:
        chain.write(intermediate.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_pair(directory, "server", server, server_key)
    write_pair(directory, "sni", sni, sni_key)
    write_pair(directory, "client", client, client_key)
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        sni_cert=directory / "sni.pem",
        sni_key=directory / "sni.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        client_der=client.public_bytes(serialization.Encoding.DER),
        chained_cert=directory / "chained.pem",
        chained_key=directory / "chained.key",
    )


def _tls_options(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "bind": "127.0.0.1:0",
        "certfile": str(pki.server_cert),
        "keyfile": str(pki.server_key),
        **extra,
    }


def _client_context(pki: Pki, *, with_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if with_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


# --- paho clients over TLS and WebSocket


@pytest.fixture
def clients() -> Iterator[Callable[..., TlsClient]]:
    owned: list[TlsClient] = []

    def make(port: int, client_id: str, **kwargs: Any) -> TlsClient:
        client = TlsClient(port, client_id, **kwargs)
        owned.append(client)
        client.wait_connected()
        return client

    yield make
    for client in owned:
        client.close()


def _port(broker: RunningBroker, name: str) -> int:
    port: int = broker.app.listeners[name].port  # type: ignore[attr-defined]
    return port


def _handshake_failures(broker: RunningBroker, name: str) -> int:
    failures: int = broker.call(lambda: broker.app.listeners[name].handshake_failures)  # type: ignore[attr-defined]
    return failures


def _session_peer(broker: RunningBroker, client_id: str) -> str | None:
    def peer() -> str | None:
        session = broker.broker.sessions.get(client_id)
        return None if session is None else session.client.peer

    return broker.call(peer)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Wait (up to the socket's timeout) for the broker to close the connection."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _connect_packet(client_id: str) -> bytes:
    """A minimal MQTT 3.1.1 CONNECT (clean session, keepalive 60)."""
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id.encode()
    return b"\x10" + bytes([len(body)]) + body


def _mqtt_over(ws: ClientConnection, client_id: str) -> bytes:
    """Send CONNECT as one binary message and return the CONNACK bytes."""
    ws.send(_connect_packet(client_id))
    reply = ws.recv(timeout=TIMEOUT)
    assert isinstance(reply, bytes)
    return reply


# --- TLS


@pytest.mark.parametrize("version", [4, 5])
def test_tls_verify_none_carries_paho_publish_and_subscribe(
    start_broker: StartBroker, clients: Callable[..., TlsClient], pki: Pki, version: int
) -> None:
    broker = start_broker(listeners={"tls": _tls_options(pki)})
    port = _port(broker, "mqtt:tls")
    client = clients(port, "tls-client", version=version, context=_client_context(pki))
    client.subscribe("tls/topic")
    client.publish("tls/topic", b"over tls")
    assert client.receive().payload == b"over tls"
    assert _session_peer(broker, "tls-client") is not None
    assert broker.call(lambda: broker.broker.sessions["tls-client"].client.peer_cert) is None


def test_tls_verify_peer_hands_the_client_certificate_to_the_session(
    start_broker: StartBroker, clients: Callable[..., TlsClient], pki: Pki
) -> None:
    broker = start_broker(listeners={"tls": _tls_options(pki, verify="verify_peer", cacertfile=str(pki.ca))})
    port = _port(broker, "mqtt:tls")
    client = clients(port, "with-cert", context=_client_context(pki, with_cert=True))
    client.subscribe("t")
    client.publish("t", b"x")
    assert client.receive().payload == b"x"
    cert = broker.call(lambda: broker.broker.sessions["with-cert"].client.peer_cert)
    assert cert == pki.client_der
    # verify_peer without fail_if_no_peer_cert: a client without a certificate still gets in
    clients(port, "without-cert", context=_client_context(pki))
    assert broker.call(lambda: broker.broker.sessions["without-cert"].client.peer_cert) is None


def test_tls_fail_if_no_peer_cert_refuses_a_client_without_certificate(
    start_broker: StartBroker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mqgate.listener")
    broker = start_broker(
        listeners={
            "tls": _tls_options(pki, verify="verify_peer", cacertfile=str(pki.ca), fail_if_no_peer_cert=True)
        }
    )
    port = _port(broker, "mqtt:tls")
    context = _client_context(pki)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        # TLS 1.3: the client finishes its side first and learns of the refusal on the next read
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(_connect_packet("no-cert"))
        if not tls.recv(16):
            raise ConnectionResetError("closed without CONNACK")
    wait_for(lambda: _handshake_failures(broker, "mqtt:tls") == 1)
    assert "TLS handshake with 127.0.0.1:" in caplog.text
    assert "no-cert" not in broker.call(lambda: list(broker.broker.sessions))
    # and the same listener accepts a client with a certificate
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        _client_context(pki, with_cert=True).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(_connect_packet("has-cert"))
        assert tls.recv(4) == b"\x20\x02\x00\x00"


@pytest.mark.parametrize(("depth", "accepted"), [(0, False), (1, True)])
def test_tls_depth_limits_the_intermediates_of_a_client_chain(
    start_broker: StartBroker, pki: Pki, depth: int, accepted: bool
) -> None:
    broker = start_broker(
        listeners={"tls": _tls_options(pki, verify="verify_peer", cacertfile=str(pki.ca), depth=depth)}
    )
    context = _client_context(pki)
    context.load_cert_chain(str(pki.chained_cert), str(pki.chained_key))
    with (
        socket.create_connection(("127.0.0.1", _port(broker, "mqtt:tls")), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(_connect_packet(f"chained-{depth}"))
        try:
            reply = tls.recv(4)
        except (ssl.SSLError, ConnectionError):
            reply = b""
    assert (reply == b"\x20\x02\x00\x00") is accepted
    assert (_handshake_failures(broker, "mqtt:tls") == 0) is accepted


def test_tls_sni_chooses_the_certificate_by_server_hostname(start_broker: StartBroker, pki: Pki) -> None:
    sni = [{"server_name": SNI_NAME, "certfile": str(pki.sni_cert), "keyfile": str(pki.sni_key)}]
    broker = start_broker(listeners={"tls": _tls_options(pki, sni=sni)})
    port = _port(broker, "mqtt:tls")

    def served_common_name(server_hostname: str) -> str:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            _client_context(pki).wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            tls.sendall(_connect_packet(f"sni-{server_hostname}"))
            assert tls.recv(4) == b"\x20\x02\x00\x00"
        name = x509.load_der_x509_certificate(der).subject
        return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    assert served_common_name(SNI_NAME) == SNI_NAME
    assert served_common_name("localhost") == "mqgate-test-server"
    assert served_common_name("127.0.0.1") == "mqgate-test-server"


def test_tls_handshake_that_never_completes_is_closed_by_the_timeout(
    start_broker: StartBroker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mqgate.listener")
    broker = start_broker(listeners={"tls": _tls_options(pki, handshake_timeout=0.3)})
    port = _port(broker, "mqtt:tls")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        # send nothing: the broker gives up after handshake_timeout and closes the socket
        assert _closed_by_peer(raw)
    wait_for(lambda: _handshake_failures(broker, "mqtt:tls") == 1)
    wait_for(lambda: "TLS handshake with 127.0.0.1:" in caplog.text)
    assert broker.call(lambda: len(broker.app.listeners["mqtt:tls"].connections)) == 0  # type: ignore[attr-defined]


def _metric(broker: RunningBroker, name: str, **labels: str) -> float:
    """One sample of ``GET /metrics`` on the broker's API."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{broker.app.api.url}/metrics", timeout=TIMEOUT) as response:  # type: ignore[union-attr]
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_failed_tls_handshakes_count_towards_the_address_ban(
    start_broker: StartBroker, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage instead of a ClientHello, a certificate from an unknown CA and a handshake that never
    completes each count as a failure of the address (``auth.max_failures_per_min``); once over the limit,
    the TLS listener closes the address's connections before any handshake and the TCP listener answers
    CONNACK 0x8A (banned)."""
    caplog.set_level(logging.WARNING, "mqgate.listener")
    broker = start_broker(
        auth={"max_failures_per_min": 3},
        listeners={
            "tls": _tls_options(
                pki,
                verify="verify_peer",
                cacertfile=str(pki.ca),
                fail_if_no_peer_cert=True,
                handshake_timeout=0.3,
            )
        },
    )
    port = _port(broker, "mqtt:tls")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        raw.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")  # plain MQTT CONNECT
        assert _closed_by_peer(raw)
    wait_for(lambda: _handshake_failures(broker, "mqtt:tls") == 1)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    write_pair(tmp_path, "stranger", issue("alice", stranger_key, "rogue CA", rogue_key), stranger_key)
    context = _client_context(pki)
    context.load_cert_chain(str(tmp_path / "stranger.pem"), str(tmp_path / "stranger.key"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(_connect_packet("stranger"))
        if not tls.recv(16):
            raise ConnectionResetError("closed without CONNACK")
    wait_for(lambda: _handshake_failures(broker, "mqtt:tls") == 2)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        assert _closed_by_peer(raw)  # silent: closed after handshake_timeout
    wait_for(lambda: _handshake_failures(broker, "mqtt:tls") == 3)
    failures = [r.getMessage() for r in caplog.records if "TLS handshake with 127.0.0.1:" in r.getMessage()]
    assert len(failures) == 3, failures  # one line per failure, naming the peer and the cause
    assert _metric(broker, "mqgate_auth_total", result="handshake_failure") == 3
    # over the limit: a client with a good certificate is closed before its handshake
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        _client_context(pki, with_cert=True).wrap_socket(raw, server_hostname="127.0.0.1")
    wait_for(lambda: "refusing 127.0.0.1:" in caplog.text)
    assert _handshake_failures(broker, "mqtt:tls") == 3
    assert broker.call(lambda: broker.broker.access.stats.auth_banned) == 1
    with socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT) as plain:
        plain.sendall(_connect_packet("plain"))
        assert plain.recv(4) == b"\x20\x02\x00\x05"  # v3.1.1: 0x8A is sent as 5, not authorised


def test_tls_and_wss_accept_clients_on_uvloop(
    start_broker: StartBroker, clients: Callable[..., TlsClient], pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop starts reading as soon as a plain connection is made, so a TLS layer added afterwards
    (``start_tls``) would lose the ClientHello; the listeners must work on uvloop as on asyncio."""
    uvloop = pytest.importorskip("uvloop")
    with monkeypatch.context() as patch:
        patch.setattr(asyncio, "new_event_loop", uvloop.new_event_loop)
        broker = start_broker(
            listeners={"tls": _tls_options(pki, handshake_timeout=0.3), "wss": _tls_options(pki)}
        )
    assert type(broker.loop).__module__.startswith("uvloop")
    tls_client = clients(_port(broker, "mqtt:tls"), "uv-tls", context=_client_context(pki))
    wss_client = clients(
        _port(broker, "mqtt:wss"), "uv-wss", transport="websockets", context=_client_context(pki)
    )
    tls_client.subscribe("uv/t")
    wss_client.publish("uv/t", b"on uvloop")
    assert tls_client.receive().payload == b"on uvloop"
    with socket.create_connection(("127.0.0.1", _port(broker, "mqtt:tls")), timeout=TIMEOUT) as raw:
        assert _closed_by_peer(raw)
    wait_for(lambda: _handshake_failures(broker, "mqtt:tls") == 1)


def test_tls_listener_with_a_missing_certificate_is_a_config_error(
    start_broker: StartBroker, pki: Pki
) -> None:
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"listeners\.tls\.certfile"):
        start_broker(listeners={"tls": _tls_options(pki, certfile=str(pki.ca.parent / "missing.pem"))})


# --- WebSocket


def _ws_options(**extra: Any) -> dict[str, Any]:
    return {"enabled": True, "bind": "127.0.0.1:0", **extra}


@pytest.mark.parametrize("version", [4, 5])
def test_ws_paho_publishes_to_a_tcp_subscriber_and_back(
    start_broker: StartBroker, clients: Callable[..., TlsClient], version: int
) -> None:
    broker = start_broker(listeners={"ws": _ws_options()})
    ws_client = clients(_port(broker, "mqtt:ws"), "ws-client", version=version, transport="websockets")
    tcp_client = clients(broker.port, "tcp-client", version=version)
    tcp_client.subscribe("from/ws")
    ws_client.subscribe("from/tcp")
    ws_client.publish("from/ws", b"hello from ws")
    assert tcp_client.receive().payload == b"hello from ws"
    tcp_client.publish("from/tcp", b"hello from tcp" * 1000)
    assert ws_client.receive().payload == b"hello from tcp" * 1000


def test_wss_paho_publishes_to_a_tcp_subscriber_and_back(
    start_broker: StartBroker, clients: Callable[..., TlsClient], pki: Pki
) -> None:
    broker = start_broker(listeners={"wss": _tls_options(pki)})
    wss_client = clients(
        _port(broker, "mqtt:wss"), "wss-client", transport="websockets", context=_client_context(pki)
    )
    tcp_client = clients(broker.port, "tcp-client")
    tcp_client.subscribe("from/wss")
    wss_client.subscribe("from/tcp")
    wss_client.publish("from/wss", b"secure")
    assert tcp_client.receive().payload == b"secure"
    tcp_client.publish("from/tcp", b"back")
    assert wss_client.receive().payload == b"back"


def test_wss_with_verify_peer_hands_the_client_certificate_to_the_session(
    start_broker: StartBroker, pki: Pki
) -> None:
    broker = start_broker(listeners={"wss": _tls_options(pki, verify="verify_peer", cacertfile=str(pki.ca))})
    uri = f"wss://127.0.0.1:{_port(broker, 'mqtt:wss')}/mqtt"
    context = _client_context(pki, with_cert=True)
    with connect(uri, subprotocols=MQTT, ssl=context, open_timeout=TIMEOUT) as ws:
        assert _mqtt_over(ws, "wss-cert") == b"\x20\x02\x00\x00"
        assert broker.call(lambda: broker.broker.sessions["wss-cert"].client.peer_cert) == pki.client_der


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [(["mqtt"], "mqtt"), (["mqttv3.1"], "mqttv3.1"), (["chat", "mqttv3.1", "mqtt"], "mqttv3.1")],
)
def test_ws_chooses_the_mqtt_subprotocol_from_the_clients_offer(
    start_broker: StartBroker, offered: list[str], chosen: str
) -> None:
    broker = start_broker(listeners={"ws": _ws_options()})
    uri = f"ws://127.0.0.1:{_port(broker, 'mqtt:ws')}/mqtt"
    with connect(uri, subprotocols=[Subprotocol(name) for name in offered], open_timeout=TIMEOUT) as ws:
        assert ws.subprotocol == chosen
        assert _mqtt_over(ws, "subprotocol") == b"\x20\x02\x00\x00"


def test_ws_without_an_mqtt_subprotocol_is_refused_unless_configured(start_broker: StartBroker) -> None:
    broker = start_broker(listeners={"ws": _ws_options()})
    uri = f"ws://127.0.0.1:{_port(broker, 'mqtt:ws')}/mqtt"
    for offered in ([], ["chat"]):
        with pytest.raises(InvalidStatus) as refused:
            connect(uri, subprotocols=[Subprotocol(name) for name in offered], open_timeout=TIMEOUT)
        assert refused.value.response.status_code == 400
    lenient = start_broker(listeners={"ws": _ws_options(fail_if_no_subprotocol=False)})
    with connect(f"ws://127.0.0.1:{_port(lenient, 'mqtt:ws')}/mqtt", open_timeout=TIMEOUT) as ws:
        assert ws.subprotocol is None
        assert _mqtt_over(ws, "no-subprotocol") == b"\x20\x02\x00\x00"


def test_ws_text_frame_closes_the_connection(start_broker: StartBroker) -> None:
    broker = start_broker(listeners={"ws": _ws_options()})
    uri = f"ws://127.0.0.1:{_port(broker, 'mqtt:ws')}/mqtt"
    with connect(uri, subprotocols=MQTT, open_timeout=TIMEOUT) as ws:
        assert _mqtt_over(ws, "texter") == b"\x20\x02\x00\x00"
        ws.send("not binary")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
    wait_for(lambda: "texter" not in broker.call(lambda: list(broker.broker.sessions)))


def test_ws_wrong_path_is_refused_with_404(start_broker: StartBroker) -> None:
    broker = start_broker(listeners={"ws": _ws_options()})
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{_port(broker, 'mqtt:ws')}/other", subprotocols=MQTT, open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 404


def test_ws_origin_not_allowed_is_refused_with_403(
    start_broker: StartBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mqgate.listener")
    broker = start_broker(listeners={"ws": _ws_options(allowed_origins=["https://app.example.com"])})
    uri = f"ws://127.0.0.1:{_port(broker, 'mqtt:ws')}/mqtt"
    with pytest.raises(InvalidStatus) as refused:
        connect(uri, subprotocols=MQTT, origin=Origin("https://evil.example.net"), open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 403
    assert _handshake_failures(broker, "mqtt:ws") == 1
    assert "evil.example.net" in caplog.text
    with connect(
        uri, subprotocols=MQTT, origin=Origin("https://app.example.com"), open_timeout=TIMEOUT
    ) as ws:
        assert _mqtt_over(ws, "allowed-origin") == b"\x20\x02\x00\x00"
    with connect(uri, subprotocols=MQTT, open_timeout=TIMEOUT) as ws:
        assert _mqtt_over(ws, "no-origin") == b"\x20\x02\x00\x00"  # not a browser


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [(["127.0.0.0/8"], "203.0.113.7:40123"), (["10.0.0.0/8"], None), ([], None)],
)
def test_ws_x_forwarded_for_is_honoured_only_from_trusted_proxies(
    start_broker: StartBroker, trusted: list[str], expected: str | None
) -> None:
    broker = start_broker(listeners={"ws": _ws_options(trusted_proxies=trusted)})
    uri = f"ws://127.0.0.1:{_port(broker, 'mqtt:ws')}/mqtt"
    headers = {"X-Forwarded-For": "203.0.113.7, 127.0.0.1", "X-Forwarded-Port": "40123"}
    with connect(uri, subprotocols=MQTT, additional_headers=headers, open_timeout=TIMEOUT) as ws:
        assert _mqtt_over(ws, "behind-proxy") == b"\x20\x02\x00\x00"
        local_port = ws.local_address[1]
        peer = _session_peer(broker, "behind-proxy")
    assert peer == (expected or f"127.0.0.1:{local_port}")


def test_ws_proxy_protocol_header_gives_the_client_address(start_broker: StartBroker) -> None:
    broker = start_broker(listeners={"ws": _ws_options(proxy_protocol=True, trusted_proxies=["127.0.0.1"])})
    port = _port(broker, "mqtt:ws")
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(b"PROXY TCP4 198.51.100.9 127.0.0.1 5555 8083\r\n")
    with connect(f"ws://127.0.0.1:{port}/mqtt", sock=sock, subprotocols=MQTT, open_timeout=TIMEOUT) as ws:
        assert _mqtt_over(ws, "proxied") == b"\x20\x02\x00\x00"
        assert _session_peer(broker, "proxied") == "198.51.100.9:5555"


def test_ws_proxy_protocol_is_required_from_trusted_proxies_only(start_broker: StartBroker) -> None:
    from_proxy = start_broker(
        listeners={"ws": _ws_options(proxy_protocol=True, trusted_proxies=["127.0.0.1"])}
    )
    uri = f"ws://127.0.0.1:{_port(from_proxy, 'mqtt:ws')}/mqtt"
    with pytest.raises((InvalidMessage, ConnectionError)):
        connect(uri, subprotocols=MQTT, open_timeout=TIMEOUT)  # no PROXY header: refused
    wait_for(lambda: _handshake_failures(from_proxy, "mqtt:ws") == 1)
    direct = start_broker(listeners={"ws": _ws_options(proxy_protocol=True, trusted_proxies=["10.0.0.0/8"])})
    port = _port(direct, "mqtt:ws")
    with connect(f"ws://127.0.0.1:{port}/mqtt", subprotocols=MQTT, open_timeout=TIMEOUT) as ws:
        assert _mqtt_over(ws, "direct") == b"\x20\x02\x00\x00"
        assert _session_peer(direct, "direct") == f"127.0.0.1:{ws.local_address[1]}"


def test_ws_upgrade_that_never_completes_is_closed_by_the_timeout(start_broker: StartBroker) -> None:
    broker = start_broker(listeners={"ws": _ws_options(handshake_timeout=0.3)})
    with socket.create_connection(("127.0.0.1", _port(broker, "mqtt:ws")), timeout=TIMEOUT) as raw:
        raw.sendall(b"GET /mqtt HTTP/1.1\r\n")  # and never the rest
        assert _closed_by_peer(raw)
    wait_for(lambda: _handshake_failures(broker, "mqtt:ws") == 1)


# --- the PROXY protocol header, pure


def test_proxy_header_v1_and_v2_are_parsed() -> None:
    v1 = b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\nGET"
    assert parse_proxy_header(v1) == (len(v1) - 3, ("192.0.2.1", 1234))
    assert parse_proxy_header(b"PROXY TCP6 ") is None
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == (15, None)
    body = bytes([192, 0, 2, 9, 192, 0, 2, 10]) + (4321).to_bytes(2, "big") + (80).to_bytes(2, "big")
    v2 = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + len(body).to_bytes(2, "big") + body
    assert parse_proxy_header(v2 + b"rest") == (len(v2), ("192.0.2.9", 4321))
    assert parse_proxy_header(v2[:10]) is None
    assert parse_proxy_header(v2[:20]) is None
    local = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"
    assert parse_proxy_header(local) == (16, None)


@pytest.mark.parametrize(
    "data",
    [
        b"GET /mqtt HTTP/1.1\r\n",
        b"PROXY TCP4 nonsense\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n",
        b"PROXY " + b"x" * 200,
    ],
)
def test_proxy_header_garbage_is_rejected(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_proxy_header(data)
