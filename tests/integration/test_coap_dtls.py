"""CoAP over DTLS (``gateways.coap.dtls``, ``coaps://``): libcoap's ``coap-client-openssl`` and
``coap-client-gnutls`` against the Mbed TLS server side, with pre-shared keys and with X.509 certificates
generated here; and the DTLS wrapper driven in memory by a python-mbedtls client."""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from mbedtls import tls

from core.auth.access import AccessControl
from core.auth.hashing import hash_password
from core.clock import FakeClock
from core.config import AuthConfig
from core.errors import ConfigError
from gateways.coap.dtls import MTU, DtlsDatagramCore, _datagrams
from tests.conftest import RunningBroker
from tests.integration.helpers import TIMEOUT, Clients
from tests.integration.test_api import api_of, metrics_of, sample
from tests.integration.tls_helpers import issue, write_pair

StartBroker = Callable[..., RunningBroker]

PSK = {"sensor-1": "s3cret-key"}
DTLS_PSK = {"enabled": True, "bind": "127.0.0.1:0", "psk": PSK}


@dataclass(frozen=True)
class DtlsPki:
    """Certificates made for this run: a CA, the server's, a device's, and a device of an unknown CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    rogue_ca: Path


@pytest.fixture(scope="session")
def dtls_pki(tmp_path_factory: pytest.TempPathFactory) -> DtlsPki:
    directory = tmp_path_factory.mktemp("dtls-pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("dtls test CA", ca_key, "dtls test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    localhost = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = issue("127.0.0.1", server_key, "dtls test CA", ca_key, sans=localhost)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue("device-7", client_key, "dtls test CA", ca_key)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = issue("unknown CA", rogue_ca_key, "unknown CA", rogue_ca_key, ca=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = issue("device-7", rogue_key, "unknown CA", rogue_ca_key)
    for stem, cert, key in (
        ("ca", ca, ca_key),
        ("server", server, server_key),
        ("client", client, client_key),
        ("rogue-ca", rogue_ca, rogue_ca_key),
        ("rogue", rogue, rogue_key),
    ):
        write_pair(directory, stem, cert, key)
    return DtlsPki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        rogue_cert=directory / "rogue.pem",
        rogue_key=directory / "rogue.key",
        rogue_ca=directory / "rogue-ca.pem",
    )


def dtls_options(pki: DtlsPki, **extra: Any) -> dict[str, Any]:
    """A ``[gateways.*.dtls]`` section with the PSK table and certificates that require a client one."""
    return {
        "enabled": True,
        "bind": "127.0.0.1:0",
        "psk": PSK,
        "certfile": str(pki.server_cert),
        "keyfile": str(pki.server_key),
        "cacertfile": str(pki.ca),
        "verify": "verify_peer",
        "fail_if_no_peer_cert": True,
        **extra,
    }


def coaps(
    port: int,
    method: str,
    path: str,
    *,
    tool: str = "coap-client-openssl",
    credentials: list[str],
    payload: str = "",
    wait: int = 3,
    source: str = "127.0.0.1",
) -> subprocess.CompletedProcess[str]:
    """One libcoap request over DTLS with ``credentials`` (``-u ID -k KEY`` or ``-c CERT -j KEY -C CA``),
    sent from the local address ``source``."""
    args = [tool, "-a", source, "-B", str(wait), *credentials, "-m", method]
    if payload:
        args += ["-e", payload]
    return subprocess.run(
        [*args, f"coaps://127.0.0.1:{port}/{path}"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 10,
        check=False,
    )


def psk_credentials(key: str = "s3cret-key", identity: str = "sensor-1") -> list[str]:
    return ["-u", identity, "-k", key]


def cert_credentials(cert: Path, key: Path, ca: Path) -> list[str]:
    return ["-c", str(cert), "-j", str(key), "-C", str(ca)]


def dtls_core(broker: RunningBroker, name: str) -> DtlsDatagramCore:
    core = broker.app.listeners[name].dtls  # type: ignore[attr-defined]
    assert isinstance(core, DtlsDatagramCore)
    return core


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def broker(start_broker: StartBroker, dtls_pki: DtlsPki) -> RunningBroker:
    return start_broker(gateways={"coap": {"dtls": dtls_options(dtls_pki)}})


def _mqtt_port(broker: RunningBroker) -> int:
    port = broker.port
    assert port is not None
    return port


def _port(broker: RunningBroker) -> int:
    port: int = broker.app.listeners["coap:dtls"].port  # type: ignore[attr-defined]
    return port


@pytest.mark.parametrize("tool", ["coap-client-openssl", "coap-client-gnutls"])
def test_coaps_put_with_the_right_psk_publishes_to_mqtt(
    broker: RunningBroker, clients: Clients, tool: str
) -> None:
    mqtt = clients.paho(_mqtt_port(broker), "watcher", version=5)
    assert mqtt.subscribe("dtls/#", 1) == 1
    result = coaps(
        _port(broker),
        "put",
        "mqtt/dtls/temp?c=sensor-1",
        tool=tool,
        credentials=psk_credentials(),
        payload="21.5",
    )
    assert result.returncode == 0, result.stderr
    message = mqtt.messages.get(timeout=TIMEOUT)
    assert (message.topic, message.payload) == ("dtls/temp", b"21.5")


@pytest.mark.parametrize("tool", ["coap-client-openssl", "coap-client-gnutls"])
def test_coaps_put_with_a_client_certificate_publishes_to_mqtt(
    broker: RunningBroker, clients: Clients, dtls_pki: DtlsPki, tool: str
) -> None:
    mqtt = clients.paho(_mqtt_port(broker), "watcher", version=5)
    assert mqtt.subscribe("dtls/#", 1) == 1
    credentials = cert_credentials(dtls_pki.client_cert, dtls_pki.client_key, dtls_pki.ca)
    result = coaps(
        _port(broker), "put", "mqtt/dtls/cert?c=device-7", tool=tool, credentials=credentials, payload="7"
    )
    assert result.returncode == 0, result.stderr
    message = mqtt.messages.get(timeout=TIMEOUT)
    assert (message.topic, message.payload) == ("dtls/cert", b"7")


def test_coaps_get_reads_a_retained_message_over_dtls(broker: RunningBroker, clients: Clients) -> None:
    mqtt = clients.paho(_mqtt_port(broker), "writer", version=5)
    mqtt.publish("dtls/state", b"on", qos=1, retain=True)
    result = coaps(_port(broker), "get", "mqtt/dtls/state?c=reader", credentials=psk_credentials())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "on"


def test_coaps_with_a_wrong_psk_is_refused_logged_and_counted(
    broker: RunningBroker, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    mqtt = clients.paho(_mqtt_port(broker), "watcher", version=5)
    assert mqtt.subscribe("dtls/#", 1) == 1
    with caplog.at_level(logging.WARNING, logger="mqgate.coap"):
        result = coaps(
            _port(broker),
            "put",
            "mqtt/dtls/x?c=intruder",
            credentials=psk_credentials("wrong"),
            payload="x",
            wait=1,
        )
    assert "2.04" not in result.stdout
    assert broker.call(lambda: dtls_core(broker, "coap:dtls").handshake_failures) == 1
    assert any("dtls 127.0.0.1:" in r.message and "MAC" in r.message for r in caplog.records)
    # the same gateway still serves the right key, and only that message arrives
    result = coaps(_port(broker), "put", "mqtt/dtls/y?c=sensor-1", credentials=psk_credentials(), payload="y")
    assert result.returncode == 0, result.stderr
    message = mqtt.messages.get(timeout=TIMEOUT)
    assert (message.topic, message.payload) == ("dtls/y", b"y")
    assert mqtt.messages.empty()


def test_coaps_with_a_certificate_of_an_unknown_ca_is_refused_and_others_go_on(
    broker: RunningBroker, clients: Clients, dtls_pki: DtlsPki, caplog: pytest.LogCaptureFixture
) -> None:
    mqtt = clients.paho(_mqtt_port(broker), "watcher", version=5)
    assert mqtt.subscribe("dtls/#", 1) == 1
    rogue = ["-n", *cert_credentials(dtls_pki.rogue_cert, dtls_pki.rogue_key, dtls_pki.rogue_ca)]
    with caplog.at_level(logging.WARNING, logger="mqgate.coap"):
        result = coaps(_port(broker), "put", "mqtt/dtls/x?c=rogue", credentials=rogue, payload="x", wait=1)
    assert "2.04" not in result.stdout
    assert broker.call(lambda: dtls_core(broker, "coap:dtls").handshake_failures) == 1
    assert any("Certificate verification failed" in r.message for r in caplog.records)
    good = cert_credentials(dtls_pki.client_cert, dtls_pki.client_key, dtls_pki.ca)
    assert (
        coaps(_port(broker), "put", "mqtt/dtls/z?c=device-7", credentials=good, payload="z").returncode == 0
    )
    message = mqtt.messages.get(timeout=TIMEOUT)
    assert (message.topic, message.payload) == ("dtls/z", b"z")
    assert mqtt.messages.empty()


def test_coaps_without_a_client_certificate_is_refused_when_one_is_required(
    broker: RunningBroker, dtls_pki: DtlsPki
) -> None:
    result = coaps(_port(broker), "put", "mqtt/dtls/x?c=anon", credentials=["-C", str(dtls_pki.ca)], wait=1)
    assert "2.04" not in result.stdout
    assert broker.call(lambda: dtls_core(broker, "coap:dtls").handshake_failures) == 1


def test_an_address_whose_dtls_handshakes_keep_failing_is_banned_and_others_go_on(
    start_broker: StartBroker, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    broker = start_broker(auth={"max_failures_per_min": 2}, gateways={"coap": {"dtls": {**DTLS_PSK}}})
    mqtt = clients.paho(_mqtt_port(broker), "watcher", version=5)
    assert mqtt.subscribe("dtls/#", 1) == 1
    port = _port(broker)
    for attempt in range(2):
        wrong = coaps(
            port, "put", "mqtt/dtls/x?c=x", credentials=psk_credentials("wrong"), payload="x", wait=1
        )
        assert "2.04" not in wrong.stdout
        assert broker.call(lambda: dtls_core(broker, "coap:dtls").handshake_failures) == attempt + 1
    with caplog.at_level(logging.WARNING, logger="mqgate.coap"):
        for _ in range(2):  # banned: even the right key gets no answer, not even a HelloVerifyRequest
            refused = coaps(port, "put", "mqtt/dtls/b?c=sensor-1", credentials=psk_credentials(), wait=1)
            assert "2.04" not in refused.stdout
    core = dtls_core(broker, "coap:dtls")
    assert broker.call(lambda: (core.handshake_failures, core.peers)) == (2, 0)
    assert broker.call(lambda: core.banned_handshakes) >= 2  # every ClientHello of both tries (retransmitted)
    banned_logs = [r for r in caplog.records if "too many authentication failures" in r.message]
    assert len(banned_logs) == 2 and "dtls 127.0.0.1:" in banned_logs[0].message  # once per peer (port)
    stats = broker.call(lambda: broker.broker.access.stats)
    assert stats.handshake_failure == 2 and stats.auth_banned == core.banned_handshakes
    # another address is not affected
    good = coaps(
        port, "put", "mqtt/dtls/g?c=sensor-1", credentials=psk_credentials(), payload="g", source="127.0.0.2"
    )
    assert good.returncode == 0, good.stderr
    message = mqtt.messages.get(timeout=TIMEOUT)
    assert (message.topic, message.payload) == ("dtls/g", b"g")
    assert mqtt.messages.empty()
    # the DTLS counters in the API and /metrics; coap's wire bytes are the DTLS records
    api = api_of(broker)
    counters = api.get("/api/v5/gateways/coap")["counters"]
    banned = broker.call(lambda: core.banned_handshakes)
    assert (counters["dtls_handshakes"], counters["dtls_handshake_failures"]) == (1, 2)
    assert counters["dtls_banned_handshakes"] == banned
    listeners = {item["id"]: item for item in api.get("/api/v5/listeners")}
    assert listeners["coap:dtls"]["handshake_failures"] == 2
    families = metrics_of(api)
    events = {"listener": "coap:dtls", "event": "dtls_banned_handshakes"}
    assert sample(families, "mqgate_gateway_events", **events) == banned
    assert sample(families, "mqgate_auth", result="handshake_failure") == 2
    wire = broker.call(lambda: (core.bytes_in, core.bytes_out))
    assert wire[0] > counters["bytes_in"] > 0  # the records, not the decrypted CoAP messages
    assert sample(families, "mqgate_bytes_received", protocol="coap") == wire[0]
    assert sample(families, "mqgate_bytes_sent", protocol="coap") == wire[1]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "gateways.lwm2m.dtls: set psk"),
        ({"psk": PSK, "verify": "verify_peer"}, "gateways.lwm2m.dtls.cacertfile"),
        ({"certfile": "/nonexistent.pem"}, "gateways.lwm2m.dtls: cannot load"),
    ],
)
def test_dtls_settings_that_cannot_work_stop_start_up_naming_the_key(
    start_broker: StartBroker, options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        start_broker(gateways={"lwm2m": {"dtls": {"enabled": True, "bind": "127.0.0.1:0", **options}}})


def test_verify_none_accepts_a_certificate_of_any_ca_and_none(
    start_broker: StartBroker, clients: Clients, dtls_pki: DtlsPki
) -> None:
    options = {"enabled": True, "bind": "127.0.0.1:0"}
    options |= {"certfile": str(dtls_pki.server_cert), "keyfile": str(dtls_pki.server_key)}
    broker = start_broker(gateways={"coap": {"dtls": options}})
    mqtt = clients.paho(_mqtt_port(broker), "watcher", version=5)
    assert mqtt.subscribe("dtls/#", 1) == 1
    rogue = ["-n", *cert_credentials(dtls_pki.rogue_cert, dtls_pki.rogue_key, dtls_pki.rogue_ca)]
    assert coaps(_port(broker), "put", "mqtt/dtls/a?c=a", credentials=rogue, payload="a").returncode == 0
    assert (
        coaps(
            _port(broker), "put", "mqtt/dtls/b?c=b", credentials=["-C", str(dtls_pki.ca)], payload="b"
        ).returncode
        == 0
    )
    received = [mqtt.messages.get(timeout=TIMEOUT) for _ in range(2)]
    assert [(m.topic, m.payload) for m in received] == [("dtls/a", b"a"), ("dtls/b", b"b")]


def test_certificate_common_name_is_the_username_with_peer_cert_as_username(
    start_broker: StartBroker, dtls_pki: DtlsPki
) -> None:
    rule = {"permission": "allow", "username": "device-7", "action": "publish", "topics": ["#"]}
    broker = start_broker(
        auth={"allow_anonymous": False, "peer_cert_as_username": "cn"},
        acl={"no_match": "deny", "rules": [rule]},
        gateways={"coap": {"dtls": dtls_options(dtls_pki)}},
    )
    refused = coaps(
        _port(broker), "put", "mqtt/dtls/psk?c=sensor-1", credentials=psk_credentials(), payload="p"
    )
    assert "4.01" in refused.stdout + refused.stderr
    good = cert_credentials(dtls_pki.client_cert, dtls_pki.client_key, dtls_pki.ca)
    allowed = coaps(_port(broker), "put", "mqtt/dtls/cn?c=device-7", credentials=good, payload="c")
    assert allowed.returncode == 0, allowed.stderr
    assert "4." not in allowed.stdout + allowed.stderr


def test_psk_identity_is_the_username_with_psk_identity_as_username(
    start_broker: StartBroker, clients: Clients, tmp_path: Path
) -> None:
    passwords = tmp_path / "passwords"
    passwords.write_text(f"watcher:{hash_password('pw', iterations=1000)}\n")
    rules = [
        {"permission": "allow", "username": "sensor-1", "action": "publish", "topics": ["sensors/sensor-1"]},
        {"permission": "allow", "username": "watcher", "action": "subscribe", "topics": ["#"]},
    ]
    broker = start_broker(
        auth={"allow_anonymous": False, "password_file": str(passwords)},
        acl={"no_match": "deny", "rules": rules},
        gateways={
            "coap": {
                "dtls": {
                    **DTLS_PSK,
                    "psk": {**PSK, "sensor-2": "other-key"},
                    "psk_identity_as_username": True,
                }
            }
        },
    )
    mqtt = clients.paho(_mqtt_port(broker), "watcher", version=5, username="watcher", password="pw")
    assert mqtt.subscribe("sensors/#", 1) == 1
    own = coaps(
        _port(broker), "put", "mqtt/sensors/sensor-1?c=s1", credentials=psk_credentials(), payload="1"
    )
    assert own.returncode == 0, own.stderr
    assert "4." not in own.stdout + own.stderr  # no password: the handshake proved the identity
    message = mqtt.messages.get(timeout=TIMEOUT)
    assert (message.topic, message.payload) == ("sensors/sensor-1", b"1")
    # sensor-2 is authenticated too, as sensor-2: a u= naming sensor-1 does not change its user name
    other = psk_credentials("other-key", "sensor-2")
    for query in ("c=s2", "c=s2&u=sensor-1"):
        refused = coaps(
            _port(broker), "put", f"mqtt/sensors/sensor-1?{query}", credentials=other, payload="2"
        )
        assert "4.03" in refused.stdout + refused.stderr
    assert mqtt.messages.empty()


# --- the DTLS wrapper in memory


class _EchoCore:
    """A DatagramCore that answers every datagram with ``b"echo:" + data``; its timer is at ``deadline``."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Hashable]] = []
        self.out: list[tuple[Hashable, bytes]] = []
        self.deadline: float | None = None
        self.timers = 0

    def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> None:
        self.received.append((data, peer))
        self.out.append((peer, b"echo:" + data))

    def datagrams_to_send(self) -> list[tuple[Hashable, bytes]]:
        out, self.out = self.out, []
        return out

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        self.timers += 1
        self.deadline = None


def _psk_server(inner: _EchoCore, **bounds: Any) -> DtlsDatagramCore:
    configuration = tls.DTLSConfiguration(
        validate_certificates=False,
        pre_shared_key_store={"sensor-1": b"s3cret-key", "sensor-2": b"other-key"},
    )
    return DtlsDatagramCore(inner, tls.ServerContext(configuration), **bounds)


class _Client:
    """A python-mbedtls PSK client whose datagrams are carried by hand to and from a DtlsDatagramCore."""

    def __init__(
        self,
        server: DtlsDatagramCore,
        peer: tuple[str, int],
        key: bytes = b"s3cret-key",
        identity: str = "sensor-1",
    ) -> None:
        self.server = server
        self.peer = peer
        self.plain: list[bytes] = []
        configuration = tls.DTLSConfiguration(validate_certificates=False, pre_shared_key=(identity, key))
        self.tls = tls.ClientContext(configuration).wrap_buffers(None)
        self.failed = False
        self.bytes_sent = self.bytes_received = 0  # the datagrams carried by _exchange

    def flight(self) -> bytes:
        """Run the handshake as far as the input allows; the records to send."""
        for _ in range(20):
            if self.failed or self.tls._handshake_state.name == "HANDSHAKE_OVER":
                break
            try:
                self.tls.do_handshake()
            except tls.WantWriteError:
                continue
            except tls.WantReadError:
                break
            except Exception:
                self.failed = True
        records = self.tls.peek_outgoing(32768)
        self.tls.consume_outgoing(len(records))
        return records

    def handshake(self, now: float) -> bool:
        """Run the handshake to its end or failure; True when done."""
        for _ in range(10):
            self._exchange(self.flight(), now)
            if self.failed or self.tls._handshake_state.name == "HANDSHAKE_OVER":
                break
        return not self.failed and self.tls._handshake_state.name == "HANDSHAKE_OVER"

    def _exchange(self, records: bytes, now: float) -> None:
        if records:
            self.bytes_sent += len(records)
            self.server.receive_datagram(records, self.peer, now)
        for peer, data in self.server.datagrams_to_send():
            assert peer == self.peer
            assert len(data) <= MTU
            self.bytes_received += len(data)
            self.tls.receive_from_network(data)
            self._exchange(self.flight(), now)
            self._read()

    def _read(self) -> None:
        if self.tls._handshake_state.name != "HANDSHAKE_OVER":
            return
        buffer = bytearray(2048)
        while True:
            try:
                size = self.tls.readinto(buffer, len(buffer))  # type: ignore[arg-type]
            except tls.WantReadError:
                return
            self.plain.append(bytes(buffer[:size]))

    def send(self, data: bytes, now: float) -> None:
        self.tls.write(data)
        records = self.tls.peek_outgoing(32768)
        self.tls.consume_outgoing(len(records))
        self._exchange(records, now)


def test_dtls_core_hands_decrypted_datagrams_to_the_inner_core_and_encrypts_the_answers() -> None:
    inner = _EchoCore()
    core = _psk_server(inner)
    client = _Client(core, ("127.0.0.1", 40001))
    assert client.handshake(0.0)
    client.send(b"hello", 1.0)
    assert inner.received == [(b"hello", ("127.0.0.1", 40001))]
    assert client.plain == [b"echo:hello"]
    assert core.handshakes == 1


def test_dtls_core_records_the_psk_identity_of_each_peer_once_its_handshake_is_done() -> None:
    core = _psk_server(_EchoCore())
    first = _Client(core, ("127.0.0.1", 40020))
    second = _Client(core, ("127.0.0.1", 40021), b"other-key", "sensor-2")
    for client in (first, second):  # both past the cookie exchange: two handshakes under way at once
        core.receive_datagram(client.flight(), client.peer, 0.0)
        (answer,) = core.datagrams_to_send()
        client.tls.receive_from_network(answer[1])
        core.receive_datagram(client.flight(), client.peer, 0.0)
        for _peer, data in core.datagrams_to_send():
            client.tls.receive_from_network(data)
    assert (core.peers, core.psk_identity(first.peer), core.psk_identity(second.peer)) == (2, None, None)
    assert second.handshake(0.0)
    assert first.handshake(0.0)
    assert core.psk_identity(first.peer) == "sensor-1"
    assert core.psk_identity(second.peer) == "sensor-2"
    assert core.peer_certificate(first.peer) is None
    # a wrong key: the identity is looked up, but the peer is forgotten with it
    intruder = _Client(core, ("127.0.0.1", 40022), b"wrong", "sensor-2")
    assert not intruder.handshake(0.0)
    assert core.psk_identity(intruder.peer) is None
    assert not _Client(core, ("127.0.0.1", 40023), identity="nobody").handshake(0.0)
    assert (core.handshakes, core.handshake_failures) == (2, 2)


def test_dtls_core_keeps_no_state_before_the_cookie_exchange() -> None:
    core = _psk_server(_EchoCore())
    client = _Client(core, ("127.0.0.1", 40005))
    core.receive_datagram(client.flight(), client.peer, 0.0)  # the first ClientHello
    answers = core.datagrams_to_send()
    assert [data[0] for _peer, data in answers] == [22]  # a HelloVerifyRequest only
    assert core.peers == 0
    client.tls.receive_from_network(answers[0][1])
    assert client.handshake(0.0)
    assert core.peers == 1


def test_dtls_core_with_a_wrong_key_delivers_nothing_and_counts_the_failure() -> None:
    inner = _EchoCore()
    core = _psk_server(inner)
    client = _Client(core, ("127.0.0.1", 40002), key=b"wrong")
    assert not client.handshake(0.0)
    assert inner.received == []
    assert core.handshake_failures == 1
    assert core.peers == 0


def test_dtls_core_failed_handshake_leaves_an_established_peer_working() -> None:
    inner = _EchoCore()
    core = _psk_server(inner)
    good = _Client(core, ("127.0.0.1", 40008))
    assert good.handshake(0.0)
    assert not _Client(core, ("127.0.0.1", 40009), key=b"wrong").handshake(0.5)
    good.send(b"still here", 1.0)
    assert good.plain == [b"echo:still here"]
    assert (core.peers, core.handshake_failures) == (1, 1)


def test_dtls_core_bans_an_address_whose_handshakes_fail_until_the_minute_passes() -> None:
    clock = FakeClock()
    access = AccessControl(AuthConfig(max_failures_per_min=3), clock=clock.now)
    inner = _EchoCore()
    core = _psk_server(inner, guard=access)
    for port in range(40010, 40013):
        assert not _Client(core, ("127.0.0.1", port), key=b"wrong").handshake(clock.now())
    assert (core.handshake_failures, access.stats.handshake_failure) == (3, 3)
    clock.advance(30.0)
    banned = _Client(core, ("127.0.0.1", 40013))
    core.receive_datagram(banned.flight(), banned.peer, clock.now())
    assert core.datagrams_to_send() == []  # no HelloVerifyRequest: nothing at all is kept or sent
    assert (core.banned_handshakes, access.stats.auth_banned, core.peers) == (1, 1, 0)
    assert _Client(core, ("127.0.0.2", 40013)).handshake(clock.now())  # another address
    clock.advance(30.0)  # a minute after the failures: the ban is over
    late = _Client(core, ("127.0.0.1", 40014))
    assert late.handshake(clock.now())
    late.send(b"back", clock.now())
    assert late.plain == [b"echo:back"]
    assert (core.handshakes, core.banned_handshakes) == (2, 1)


def test_dtls_core_counts_the_wire_bytes_of_the_records() -> None:
    core = _psk_server(_EchoCore())
    client = _Client(core, ("127.0.0.1", 40015))
    assert client.handshake(0.0)
    client.send(b"x" * 100, 1.0)
    assert client.plain == [b"echo:" + b"x" * 100]
    assert core.bytes_in == client.bytes_sent > 100
    assert core.bytes_out == client.bytes_received > 105


def test_dtls_core_ignores_datagrams_that_open_no_handshake() -> None:
    inner = _EchoCore()
    core = _psk_server(inner)
    core.receive_datagram(b"\x17\xfe\xfd" + bytes(20), ("127.0.0.1", 40006), 0.0)  # application data
    core.receive_datagram(b"\x16\xfe\xfd", ("127.0.0.1", 40006), 0.0)  # a truncated record
    assert core.ignored_datagrams == 2
    assert core.peers == 0
    assert core.datagrams_to_send() == []


def test_dtls_core_bounds_peers_and_forgets_idle_and_unfinished_ones() -> None:
    inner = _EchoCore()
    core = _psk_server(inner, max_peers=1, idle_timeout=10.0, handshake_timeout=5.0)
    first = _Client(core, ("127.0.0.1", 40003))
    assert first.handshake(0.0)
    assert not _Client(core, ("127.0.0.1", 40004)).handshake(0.0)  # refused: max_peers
    assert core.peers == 1
    assert core.dropped_peers >= 1
    first.send(b"a", 1.0)
    assert first.plain == [b"echo:a"]
    inner.deadline = 5.0
    assert core.get_timer() == 1.0  # the peer sweep (1 s after the first handshake) comes first
    core.handle_timer(5.0)
    assert inner.timers == 1
    assert core.peers == 1
    core.handle_timer(20.0)  # 19 s after its last datagram: forgotten
    assert core.peers == 0
    inner.out.append((("127.0.0.1", 40003), b"late"))  # an answer to the forgotten peer is not sent
    assert core.datagrams_to_send() == []
    assert core.unsent_datagrams == 1
    second = _Client(core, ("127.0.0.1", 40004))
    assert second.handshake(21.0)
    second.send(b"b", 21.0)
    assert second.plain == [b"echo:b"]
    # a handshake left unfinished is dropped after handshake_timeout, and counted
    core.handle_timer(40.0)
    stalled = _Client(core, ("127.0.0.1", 40007))
    for _ in range(2):  # ClientHello, then the one with the cookie: the server's flight goes unanswered
        core.receive_datagram(stalled.flight(), stalled.peer, 41.0)
        for _peer, data in core.datagrams_to_send():
            stalled.tls.receive_from_network(data)
    assert core.peers == 1  # the idle second peer was forgotten at 40.0
    failures = core.handshake_failures
    core.handle_timer(47.0)
    assert core.peers == 0
    assert core.handshake_failures == failures + 1


def test_records_are_packed_into_datagrams_of_at_most_the_mtu() -> None:
    def record(size: int) -> bytes:
        return bytes([22, 0xFE, 0xFD]) + bytes(8) + size.to_bytes(2, "big") + bytes(size)

    small, large = record(100), record(MTU - 13)
    assert _datagrams(small + small) == [small + small]
    assert _datagrams(small + large + small) == [small, large, small]
    assert _datagrams(b"") == []
