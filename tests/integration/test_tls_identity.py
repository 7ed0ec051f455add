"""A TLS client certificate as identity (``auth.peer_cert_as_username``, ``auth.peer_cert_as_clientid``) over
real TLS connections: paho-mqtt presents a certificate generated here (CN=alice, CN=bob, one without a CN),
the ``verify_peer`` listener verifies it, and the broker's sessions, the API and the ACL see the identity the
certificate gives."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
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

from tests.conftest import RunningBroker
from tests.integration.helpers import TIMEOUT
from tests.integration.tls_helpers import TlsClient, issue, name, write_pair

StartBroker = Callable[..., RunningBroker]
NOT_AUTHORIZED = 0x87
ORGANISATION = "mqgate tests"


@dataclass(frozen=True)
class Identities:
    directory: Path
    ca: Path
    der: dict[str, bytes]  # client certificate stem -> DER

    def context(self, stem: str | None) -> ssl.SSLContext:
        """A client context trusting the test CA, presenting the certificate ``stem`` (None: none)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if stem is not None:
            context.load_cert_chain(str(self.directory / f"{stem}.pem"), str(self.directory / f"{stem}.key"))
        return context


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    import ipaddress

    directory = tmp_path_factory.mktemp("identity-pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("identity CA", ca_key, "identity CA", ca_key, ca=True)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP256R1())
    localhost = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write_pair(
        directory, "server", issue("server", server_key, "identity CA", ca_key, sans=localhost), server_key
    )
    der = {}
    for stem, subject in (
        ("alice", name("alice", ORGANISATION)),
        ("bob", name("bob", ORGANISATION)),
        ("nameless", name(None, ORGANISATION)),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(subject, key, "identity CA", ca_key)
        write_pair(directory, stem, cert, key)
        der[stem] = cert.public_bytes(serialization.Encoding.DER)
    return Identities(directory, directory / "ca.pem", der)


@pytest.fixture
def connect(identities: Identities) -> Iterator[Callable[..., TlsClient]]:
    """``connect(broker, client_id, certificate)``: a v5 paho client over TLS; CONNACK read, not checked."""
    owned: list[TlsClient] = []

    def make(broker: RunningBroker, client_id: str, stem: str | None, **kwargs: Any) -> TlsClient:
        port: int = broker.app.listeners["mqtt:tls"].port  # type: ignore[attr-defined]
        client = TlsClient(port, client_id, version=5, context=identities.context(stem), **kwargs)
        owned.append(client)
        client.wait_connack()
        return client

    yield make
    for client in owned:
        client.close()


def _broker(start_broker: StartBroker, identities: Identities, **overrides: Any) -> RunningBroker:
    tls = {
        "enabled": True,
        "bind": "127.0.0.1:0",
        "certfile": str(identities.directory / "server.pem"),
        "keyfile": str(identities.directory / "server.key"),
        "cacertfile": str(identities.ca),
        "verify": "verify_peer",
        "fail_if_no_peer_cert": True,
    }
    return start_broker(listeners={"tls": tls}, **overrides)


def _rule(permission: str, action: str, *topics: str, **who: str) -> dict[str, Any]:
    return {"permission": permission, "action": action, "topics": list(topics), **who}


def _mqtt_sessions(broker: RunningBroker) -> list[str]:
    """The client ids of the MQTT sessions (the gateways keep sessions of their own)."""
    sessions = broker.broker.sessions
    return broker.call(lambda: sorted(k for k, s in sessions.items() if s.client.protocol == "mqtt"))


def _api_client(broker: RunningBroker, client_id: str) -> dict[str, Any]:
    url = f"{broker.app.api.url}/api/v5/clients/{client_id}"  # type: ignore[union-attr]
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        detail: dict[str, Any] = json.loads(response.read())
    return detail


def test_certificate_cn_is_the_user_name_the_acl_sees(
    start_broker: StartBroker, identities: Identities, connect: Callable[..., TlsClient]
) -> None:
    """The CONNECT user name is replaced by the certificate's CN, which is also the credential (anonymous
    access is off and no password is sent); the ACL's ``%u`` is the CN."""
    broker = _broker(
        start_broker,
        identities,
        auth={"allow_anonymous": False, "peer_cert_as_username": "cn"},
        acl={"no_match": "deny", "rules": [_rule("allow", "all", "devices/%u/#")]},
    )
    alice = connect(broker, "dev-a", "alice", username="mallory")
    assert alice.reason_code == 0
    assert _api_client(broker, "dev-a")["username"] == "alice"
    assert alice.subscribe("devices/alice/#") == 1
    assert alice.publish("devices/alice/temp", b"21.5") == 0
    assert alice.receive().payload == b"21.5"
    assert alice.publish("devices/bob/temp", b"forged") == NOT_AUTHORIZED
    bob = connect(broker, "dev-b", "bob")
    assert broker.call(lambda: broker.broker.sessions["dev-b"].client.username) == "bob"
    assert bob.publish("devices/alice/temp", b"forged") == NOT_AUTHORIZED
    assert bob.subscribe("devices/alice/#") == NOT_AUTHORIZED
    assert bob.publish("devices/bob/temp", b"20") == 0x10  # allowed; no subscriber
    assert alice.messages.empty()
    stats = broker.call(lambda: broker.broker.access.stats)
    assert (stats.auth_success, stats.auth_failure, stats.acl_denied_publish) == (2, 0, 2)


@pytest.mark.parametrize("field", ["cn", "dn", "md5", "base64"])
def test_each_certificate_field_can_be_the_user_name(
    start_broker: StartBroker, identities: Identities, connect: Callable[..., TlsClient], field: str
) -> None:
    der = identities.der["alice"]
    expected = {
        "cn": "alice",
        "dn": f"CN=alice,O={ORGANISATION}",
        "md5": hashlib.md5(der).hexdigest(),
        "base64": base64.b64encode(der).decode(),
    }[field]
    broker = _broker(
        start_broker, identities, auth={"allow_anonymous": False, "peer_cert_as_username": field}
    )
    assert connect(broker, f"by-{field}", "alice").reason_code == 0
    assert broker.call(lambda: broker.broker.sessions[f"by-{field}"].client.username) == expected


def test_certificate_cn_is_the_client_id_the_acl_sees(
    start_broker: StartBroker, identities: Identities, connect: Callable[..., TlsClient]
) -> None:
    """``peer_cert_as_clientid``: the session is named by the CN whatever client id the client sent, and
    the ACL's client-id rules apply to it."""
    broker = _broker(
        start_broker,
        identities,
        auth={"peer_cert_as_clientid": "cn"},
        acl={"no_match": "deny", "rules": [_rule("allow", "all", "up/%c/#", clientid="alice")]},
    )
    alice = connect(broker, "chosen-by-client", "alice")
    assert alice.reason_code == 0
    assert _mqtt_sessions(broker) == ["alice"]
    assert _api_client(broker, "alice")["clientid"] == "alice"
    assert alice.publish("up/alice/x", b"1") == 0x10
    bob = connect(broker, "alice", "bob")  # asks for alice's id, gets its own
    assert _mqtt_sessions(broker) == ["alice", "bob"]
    assert bob.publish("up/alice/x", b"1") == NOT_AUTHORIZED
    assert bob.publish("up/bob/x", b"1") == NOT_AUTHORIZED


@pytest.mark.parametrize("setting", ["peer_cert_as_username", "peer_cert_as_clientid"])
def test_certificate_without_the_configured_field_is_refused(
    start_broker: StartBroker,
    identities: Identities,
    connect: Callable[..., TlsClient],
    caplog: pytest.LogCaptureFixture,
    setting: str,
) -> None:
    """A verified certificate with no CN must not let the client choose its own identity: CONNACK 0x87
    and one log line naming the client and the cause, even with anonymous access allowed."""
    caplog.set_level(logging.WARNING, "mqgate.auth")
    broker = _broker(start_broker, identities, auth={setting: "cn"})
    refused = connect(broker, "alice", "nameless", username="alice")
    assert refused.reason_code == NOT_AUTHORIZED
    assert "the client certificate gives no cn" in caplog.text
    assert "'alice' (mqtt, 127.0.0.1:" in caplog.text
    assert _mqtt_sessions(broker) == []
    assert broker.call(lambda: broker.broker.access.stats.auth_failure) == 1
