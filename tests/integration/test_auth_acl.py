"""Authentication and authorisation over real sockets, for every protocol: MQTT (paho), MQTT-SN (raw
datagrams with the project codec), CoAP (coap-client-notls) and LwM2M (the simulated device)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiocoap
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from core.auth.hashing import hash_password
from gateways.mqttsn import codec
from gateways.mqttsn.numbers import ReturnCode
from tests.integration.coap_helpers import coap_client, coap_uri
from tests.integration.helpers import TIMEOUT, Clients, wait_for
from tests.integration.lwm2m_device import DeviceFactory, device_fixture
from tests.integration.mqttsn_helpers import sn_clients, sn_port

NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86
BANNED = 0x8A


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def devices() -> Iterator[DeviceFactory]:
    yield from device_fixture()


def _password_file(tmp_path: Path, **users: str) -> str:
    path = tmp_path / "passwd"
    path.write_text("".join(f"{u}:{hash_password(p, iterations=1000)}\n" for u, p in users.items()))
    return str(path)


def _rule(permission: str, action: str, *topics: str, **who: str) -> dict[str, Any]:
    return {"permission": permission, "action": action, "topics": list(topics), **who}


# --- MQTT: authentication


@pytest.mark.parametrize("version", [4, 5])
def test_mqtt_password_file_allows_good_and_refuses_bad_or_anonymous(
    start_broker: Any, clients: Clients, tmp_path: Path, version: int
) -> None:
    running = start_broker(
        auth={"allow_anonymous": False, "password_file": _password_file(tmp_path, alice="pw")}
    )
    good = clients.paho(running.port, "good", version=version, username="alice", password="pw")
    assert good.connack is not None and good.connack.reason_code == 0
    bad = clients.paho(running.port, "bad", version=version, username="alice", password="nope", check=False)
    assert bad.connack is not None and bad.connack.reason_code == BAD_CREDENTIALS
    anonymous = clients.paho(running.port, "anon", version=version, check=False)
    assert anonymous.connack is not None and anonymous.connack.reason_code == NOT_AUTHORIZED
    assert running.call(lambda: running.broker.access.stats.auth_failure) == 2


def test_mqtt_repeated_failures_from_one_address_are_banned(
    start_broker: Any, clients: Clients, tmp_path: Path
) -> None:
    running = start_broker(
        auth={"password_file": _password_file(tmp_path, alice="pw"), "max_failures_per_min": 2}
    )
    for attempt in range(2):
        bad = clients.paho(running.port, f"b{attempt}", username="alice", password="x", check=False)
        assert bad.connack is not None and bad.connack.reason_code == BAD_CREDENTIALS
    banned = clients.paho(running.port, "b3", username="alice", password="pw", check=False)
    assert banned.connack is not None and banned.connack.reason_code == BANNED


def test_mqtt_user_database_client_id_rule(start_broker: Any, clients: Clients, tmp_path: Path) -> None:
    from core.auth.userdb import UserDb

    path = str(tmp_path / "users.db")
    db = UserDb(path)
    db.add("clientid", "sensor-1", "s3")
    db.close()
    running = start_broker(auth={"allow_anonymous": False, "database": path})
    clients.paho(running.port, "sensor-1", username="any", password="s3")
    refused = clients.paho(running.port, "sensor-1", username="any", password="bad", check=False)
    assert refused.connack is not None and refused.connack.reason_code == BAD_CREDENTIALS


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_mqtt_jwt_verified_with_a_local_jwks_file_and_its_acl_claim(
    start_broker: Any, clients: Clients, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwk.update(kid="k1", alg="RS256")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    running = start_broker(
        auth={"allow_anonymous": False, "jwt": {"jwks_file": str(jwks), "verify_claims": {"sub": "%u"}}}
    )
    now = int(time.time())

    def token(**claims: Any) -> str:
        return jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "k1"})

    watcher = clients.paho(running.port, "watcher", username="w", password=token(sub="w", exp=now + 60))
    assert watcher.subscribe("t/#", 1) == 1
    limited = token(sub="dev", exp=now + 60, acl={"pub": ["t/%c"]})
    device = clients.paho(running.port, "dev1", username="dev", password=limited)
    assert device.publish("t/dev1", b"ok", 1) == 0
    assert watcher.expect().topic == "t/dev1"
    assert device.publish("t/other", b"no", 1) == NOT_AUTHORIZED
    assert device.subscribe("t/#") == NOT_AUTHORIZED
    watcher.expect_none()
    expired = clients.paho(
        running.port, "late", username="w", password=token(sub="w", exp=now - 5), check=False
    )
    assert expired.connack is not None and expired.connack.reason_code == BAD_CREDENTIALS
    wrong_sub = clients.paho(
        running.port, "x", username="w", password=token(sub="v", exp=now + 60), check=False
    )
    assert wrong_sub.connack is not None and wrong_sub.connack.reason_code == BAD_CREDENTIALS


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 (``http.server`` in a thread): ``serve`` changes what it answers and
    ``wait_refreshed`` waits (with a deadline) until the broker loaded that answer, by counting fetches."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b""
        self.requests = 0
        self._served_from = 0  # the fetches after this one get the current answer
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                    status, body = server.status, server.body
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="jwks-server", daemon=True)
        self._thread.start()

    def serve(self, body: bytes, status: int = 200) -> None:
        with self._lock:
            self.status, self.body = status, body
            self._served_from = self.requests

    def wait_refreshed(self) -> None:
        """The broker fetches one at a time: once it asks a second time after ``serve``, the first answer
        with the new content has been loaded (or refused)."""
        wait_for(lambda: self.requests >= self._served_from + 2)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(TIMEOUT)


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


def _jwks(**keys: ec.EllipticCurvePrivateKey) -> bytes:
    """A JWKS document with the public half of each key, under its kid."""
    entries = []
    for kid, key in keys.items():
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk.update(kid=kid, alg="ES256", use="sig")
        entries.append(jwk)
    return json.dumps({"keys": entries}).encode()


def _es256(key: ec.EllipticCurvePrivateKey, kid: str, subject: str) -> str:
    claims = {"sub": subject, "exp": int(time.time()) + 300}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def _jwt_broker(start_broker: Any, server: JwksServer) -> Any:
    jwt_config = {"jwks_url": server.url, "jwks_refresh_interval": 0.05, "verify_claims": {"sub": "%u"}}
    return start_broker(auth={"allow_anonymous": False, "jwt": jwt_config})


def test_mqtt_jwt_keys_follow_a_rotation_of_the_jwks_url(
    start_broker: Any, clients: Clients, jwks_server: JwksServer
) -> None:
    key1, key2 = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks_server.serve(_jwks(k1=key1))
    running = _jwt_broker(start_broker, jwks_server)
    jwks_server.wait_refreshed()

    def connack(client_id: str, key: ec.EllipticCurvePrivateKey, kid: str) -> int:
        token = _es256(key, kid, "dev")
        client = clients.paho(running.port, client_id, username="dev", password=token, check=False)
        assert client.connack is not None
        return client.connack.reason_code

    assert connack("before-1", key1, "k1") == 0
    assert connack("before-2", key2, "k2") == BAD_CREDENTIALS
    jwks_server.serve(_jwks(k2=key2))
    jwks_server.wait_refreshed()
    assert connack("after-2", key2, "k2") == 0
    assert connack("after-1", key1, "k1") == BAD_CREDENTIALS
    assert running.call(lambda: running.broker.access.stats.auth_failure) == 2


def test_mqtt_jwks_url_failures_keep_the_last_good_keys(
    start_broker: Any, clients: Clients, jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage, an HTTP error, JSON that is not a key set and an unreachable URL are each logged; the key
    set loaded before stays in use and the refresh goes on."""
    caplog.set_level(logging.WARNING, "mqgate.auth")
    key = ec.generate_private_key(ec.SECP256R1())
    jwks_server.serve(_jwks(k1=key))
    running = _jwt_broker(start_broker, jwks_server)
    jwks_server.wait_refreshed()
    for number, (body, status) in enumerate(
        [(b"<html>not json", 200), (b"{}", 500), (b"[1, 2]", 200), (b'{"keys": [{"kty": "EC"}]}', 200)]
    ):
        caplog.clear()
        jwks_server.serve(body, status)
        jwks_server.wait_refreshed()
        assert f"cannot refresh the JWKS from {jwks_server.url}" in caplog.text
        clients.paho(running.port, f"still-{number}", username="dev", password=_es256(key, "k1", "dev"))
    caplog.clear()
    jwks_server.close()
    wait_for(lambda: "Connection refused" in caplog.text)
    clients.paho(running.port, "unreachable", username="dev", password=_es256(key, "k1", "dev"))


# --- MQTT: authorisation


ACL_RULES = {
    "no_match": "allow",
    "rules": [
        _rule("deny", "publish", "secret/#"),
        _rule("deny", "subscribe", "secret/#", "eq #"),
        _rule("allow", "all", "private/%u/#", username="alice"),
        _rule("deny", "all", "private/#"),
    ],
}


@pytest.mark.parametrize("version", [4, 5])
def test_mqtt_acl_denies_publish_and_subscribe(start_broker: Any, clients: Clients, version: int) -> None:
    running = start_broker(acl=ACL_RULES)
    watcher = clients.paho(running.port, "watcher", version=5, username="alice")
    assert watcher.subscribe("+/#", 1) == 1
    client = clients.paho(running.port, "c", version=version, username="bob")
    code = client.publish("secret/x", b"1", 1)
    assert code == (NOT_AUTHORIZED if version == 5 else 0)  # v3: acknowledged and dropped, as mosquitto
    assert client.subscribe("secret/x") == (NOT_AUTHORIZED if version == 5 else 0x80)
    assert client.subscribe("#") == (NOT_AUTHORIZED if version == 5 else 0x80)
    assert client.subscribe("private/bob/#") == (NOT_AUTHORIZED if version == 5 else 0x80)
    assert client.publish("open/x", b"2", 1) == 0
    assert watcher.expect().topic == "open/x"
    assert watcher.publish("private/alice/x", b"3", 1) == 0
    assert watcher.expect().topic == "private/alice/x"
    watcher.expect_none()


def test_mqtt_retained_messages_of_a_denied_filter_are_not_delivered(
    start_broker: Any, clients: Clients
) -> None:
    running = start_broker(acl=ACL_RULES)
    alice = clients.paho(running.port, "alice", username="alice")
    assert alice.publish("private/alice/state", b"kept", 1, retain=True) == 0x10
    bob = clients.paho(running.port, "bob", username="bob")
    assert bob.subscribe("private/alice/state", 1) == NOT_AUTHORIZED
    bob.expect_none()


def test_mqtt_acl_file_in_mosquitto_format(start_broker: Any, clients: Clients, tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic read public/#\nuser alice\ntopic readwrite alice/#\npattern write devices/%c/up\n")
    running = start_broker(acl={"file": str(acl), "no_match": "deny"})
    anon = clients.paho(running.port, "anon")
    assert anon.subscribe("public/#", 1) == 1
    assert anon.subscribe("alice/#") == NOT_AUTHORIZED
    alice = clients.paho(running.port, "dev9", username="alice")
    assert alice.subscribe("alice/#", 1) == 1
    assert alice.publish("devices/dev9/up", b"x", 1) == 0x10
    assert alice.publish("devices/dev8/up", b"x", 1) == NOT_AUTHORIZED
    assert alice.publish("alice/note", b"n", 1) == 0
    assert alice.expect().topic == "alice/note"


def test_mqtt_topic_rewrite_happens_before_the_acl(start_broker: Any, clients: Clients) -> None:
    running = start_broker(
        acl={"no_match": "deny", "rules": [_rule("allow", "all", "new/#")]},
        rewrite=[{"source": "old/#", "regex": "^old/(.+)$", "dest": "new/$1"}],
    )
    subscriber = clients.paho(running.port, "sub")
    assert subscriber.subscribe("old/#", 1) == 1  # rewritten to new/#, which the ACL allows
    assert running.call(lambda: set(running.broker.sessions["sub"].subscriptions)) == {"new/#"}
    publisher = clients.paho(running.port, "pub")
    assert publisher.publish("old/a/b", b"v", 1) == 0
    message = subscriber.expect()
    assert (message.topic, message.payload) == ("new/a/b", b"v")
    assert publisher.publish("other", b"v", 1) == NOT_AUTHORIZED
    assert subscriber.unsubscribe("old/#") == [0]


def test_mqtt_will_to_a_denied_topic_is_not_published(start_broker: Any, clients: Clients) -> None:
    from tests.integration.helpers import Will

    running = start_broker(acl=ACL_RULES)
    watcher = clients.paho(running.port, "watcher", username="alice")
    assert watcher.subscribe("+/#", 1) == 1
    dying = clients.paho(running.port, "dying", will=Will("secret/will", b"bye", 1))
    allowed = clients.paho(running.port, "dying2", will=Will("open/will", b"bye", 1))
    dying.client.socket().close()  # type: ignore[union-attr]
    allowed.client.socket().close()  # type: ignore[union-attr]
    assert watcher.expect().topic == "open/will"
    watcher.expect_none()
    wait_for(lambda: running.call(lambda: running.broker.access.stats.wills_denied) == 1)


# --- MQTT-SN


def test_mqttsn_denied_publish_and_subscribe_get_return_code_3(start_broker: Any, clients: Clients) -> None:
    running = start_broker(acl=ACL_RULES)
    watcher = clients.paho(running.port, "watcher", username="alice")
    assert watcher.subscribe("+/#", 1) == 1
    with sn_clients(sn_port(running)) as sn:
        device = sn.raw()
        device.connect("sn-dev")
        suback = device.subscribe("secret/cmd", 1, check=False)
        assert suback.return_code == ReturnCode.NOT_SUPPORTED
        topic_id = device.register("secret/up")
        mid = device.publish(topic_id, b"x", 1)
        puback = device.expect(codec.Puback)
        assert (puback.msg_id, puback.return_code) == (mid, ReturnCode.NOT_SUPPORTED)
        ok = device.register("open/up")
        device.publish_acked(ok, b"fine", 1)
        assert watcher.expect().topic == "open/up"
        watcher.expect_none()


# --- CoAP


def test_coap_denied_publish_is_4_03_and_bad_password_4_01(start_broker: Any, tmp_path: Path) -> None:
    running = start_broker(
        auth={"password_file": _password_file(tmp_path, coapuser="pw")},
        acl={"rules": [_rule("deny", "publish", "secret/#")]},
    )
    denied = coap_client(coap_uri(running, "mqtt/secret/t", {"c": "dev1"}), "put", payload=b"x")
    assert denied.code == "4.03"
    assert coap_client(coap_uri(running, "mqtt/open/t", {"c": "dev1"}), "put", payload=b"x").code == "2.04"
    query = {"c": "dev2", "username": "coapuser", "password": "wrong"}
    assert coap_client(coap_uri(running, "mqtt/open/t", query), "put", payload=b"x").code == "4.01"
    query["password"] = "pw"
    assert coap_client(coap_uri(running, "mqtt/open/t", query), "put", payload=b"x").code == "2.04"


def test_banned_address_gets_coap_4_29_mqttsn_congestion_and_mqtt_0x8a(
    start_broker: Any, clients: Clients, devices: DeviceFactory, tmp_path: Path
) -> None:
    """Once an address is over ``auth.max_failures_per_min``, every protocol refuses it with its
    "too many requests, retry later" answer: CoAP and LwM2M 4.29 (RFC 8516; Max-Age defaults to the 60 s
    window), MQTT-SN CONNACK "rejected: congestion", MQTT CONNACK 0x8A (banned)."""
    running = start_broker(
        auth={"password_file": _password_file(tmp_path, coapuser="pw"), "max_failures_per_min": 2}
    )
    for attempt in range(2):
        query = {"c": f"bad{attempt}", "username": "coapuser", "password": "wrong"}
        assert coap_client(coap_uri(running, "mqtt/open/t", query), "put", payload=b"x").code == "4.01"
    query = {"c": "good", "username": "coapuser", "password": "pw"}
    assert coap_client(coap_uri(running, "mqtt/open/t", query), "put", payload=b"x").code == "4.29"
    with sn_clients(sn_port(running)) as sn:
        connack = sn.raw().connect("sn-banned", check=False)
        assert connack.return_code == ReturnCode.CONGESTION
    banned = clients.paho(running.port, "mqtt-banned", username="coapuser", password="pw", check=False)
    assert banned.connack is not None and banned.connack.reason_code == BANNED
    device = devices("lwm2m-banned", running.app.listeners["lwm2m:udp"].port)
    assert device.register(check=False).code == aiocoap.numbers.codes.Code.TOO_MANY_REQUESTS
    assert running.call(lambda: running.broker.access.stats.auth_banned) == 4


# --- LwM2M


def test_lwm2m_denied_uplink_is_not_published(
    start_broker: Any, clients: Clients, devices: DeviceFactory
) -> None:
    running = start_broker(acl={"rules": [_rule("deny", "publish", "lwm2m/+/up/#", clientid="dev-deny")]})
    app = clients.paho(running.port, "lwm2m-app")
    assert app.subscribe("lwm2m/#", 1) == 1
    port: int = running.app.listeners["lwm2m:udp"].port
    denied = devices("dev-deny", port)
    denied.register()
    allowed = devices("dev-ok", port)
    allowed.register()
    message = app.expect()
    assert message.topic == "lwm2m/dev-ok/up/register"
    app.expect_none()
    assert running.call(lambda: running.broker.access.stats.acl_denied_publish) >= 1
