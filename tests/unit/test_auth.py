"""Authentication and authorisation (core.auth): hashes, password file, user db, JWT, ACL, rewrite, caches."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from core.auth.access import AccessControl, peer_host, warn_if_anonymous_exposed
from core.auth.acl import PUBLISH, SUBSCRIBE, Who, covers, parse_acl_file
from core.auth.certs import cert_identity
from core.auth.cli import main as auth_cli
from core.auth.hashing import hash_password, verify_password
from core.auth.passwd import parse_password_file, set_password
from core.auth.userdb import UserDb
from core.broker.broker import Broker
from core.broker.types import ClientInfo, Credentials, Message, Subscription, Will
from core.config import AclConfig, AclRuleConfig, AuthConfig, BrokerConfig, JwtConfig, RewriteRuleConfig
from core.errors import ConfigError
from core.mqtt.numbers import ReasonCode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client(client_id: str = "c1", username: str | None = "alice", peer: str = "10.0.0.5:4000") -> ClientInfo:
    return ClientInfo(client_id, "mqtt", peer, username)


def creds(username: str | None, password: str | bytes | None) -> Credentials:
    return Credentials(username, password.encode() if isinstance(password, str) else password)


# --- hashes and the password file


def test_pbkdf2_hash_has_the_documented_layout_and_verifies() -> None:
    stored = hash_password("s3cret", iterations=1000)
    scheme, iterations, salt, digest = stored.split("$")[1:]
    assert (scheme, iterations) == ("pbkdf2-sha256", "1000")
    assert salt and digest and "=" not in salt + digest
    assert verify_password(b"s3cret", stored)
    assert not verify_password(b"S3cret", stored)


def test_bcrypt_hash_verifies() -> None:
    stored = hash_password("pw", scheme="bcrypt")
    assert stored.startswith("$2b$")
    assert verify_password(b"pw", stored)
    assert not verify_password(b"px", stored)


@pytest.mark.parametrize(
    "stored", ["plain", "$pbkdf2-sha256$x$aa$bb", "$pbkdf2-sha256$10$!!$bb", "$2b$short"]
)
def test_malformed_hashes_never_verify(stored: str) -> None:
    assert not verify_password(b"pw", stored)


def test_password_file_is_parsed_and_bad_lines_named() -> None:
    good = hash_password("a", iterations=1000)
    users = parse_password_file(f"# comment\n\nalice:{good}\n")
    assert users == {"alice": good}
    with pytest.raises(ConfigError, match=r"pw:2: expected username:hash"):
        parse_password_file(f"alice:{good}\nbob\n", "pw")
    with pytest.raises(ConfigError, match=r"pw:1: user 'bob'"):
        parse_password_file("bob:plaintext\n", "pw")


def test_set_password_adds_and_replaces_a_user(tmp_path: Path) -> None:
    path = str(tmp_path / "passwd")
    set_password(path, "alice", "one")
    set_password(path, "bob", "two")
    set_password(path, "alice", "three")
    users = parse_password_file(Path(path).read_text())
    assert sorted(users) == ["alice", "bob"]
    assert verify_password(b"three", users["alice"])


def test_passwd_command_batch_and_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "passwd")
    assert auth_cli(["passwd", "-b", path, "alice", "pw1"]) == 0
    answers = iter(["pw2", "pw2"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert auth_cli(["passwd", path, "bob"]) == 0
    mismatch = iter(["x", "y"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(mismatch))
    assert auth_cli(["passwd", path, "carol"]) == 1
    users = parse_password_file(Path(path).read_text())
    assert sorted(users) == ["alice", "bob"]
    assert verify_password(b"pw2", users["bob"])


# --- the user database


def test_user_db_username_and_clientid_rules(tmp_path: Path) -> None:
    db = UserDb(str(tmp_path / "users.db"))
    try:
        db.add("username", "alice", "pw")
        db.add("clientid", "dev-1", "devpw", superuser=True)
        assert db.check("x", "alice", b"pw") == (True, False)
        assert db.check("x", "alice", b"bad") == (False, False)
        assert db.check("dev-1", None, b"devpw") == (True, True)
        assert db.check("other", "nobody", b"pw") == (None, False)
        assert db.remove("username", "alice")
        assert not db.remove("username", "alice")
    finally:
        db.close()


def test_user_db_import_export_json_and_csv(tmp_path: Path) -> None:
    db = UserDb(str(tmp_path / "a.db"))
    try:
        count = db.import_records(
            json.dumps(
                [{"username": "u1", "password": "p1"}, {"kind": "clientid", "name": "c1", "password": "p2"}]
            ),
            "json",
        )
        assert count == 2
        exported_csv = db.export_csv()
        exported_json = db.export_json()
    finally:
        db.close()
    for fmt, text in (("csv", exported_csv), ("json", exported_json)):
        other = UserDb(str(tmp_path / f"b-{fmt}.db"))
        try:
            assert other.import_records(text, fmt) == 2
            assert other.check("c1", "u1", b"p1") == (True, False)
            assert other.check("c1", None, b"p2") == (True, False)
        finally:
            other.close()


def test_user_db_import_rejects_a_bad_record_and_imports_nothing(tmp_path: Path) -> None:
    db = UserDb(str(tmp_path / "a.db"))
    try:
        with pytest.raises(ValueError, match="record 2"):
            db.import_records(json.dumps([{"username": "u1", "password": "p"}, {"username": "u2"}]), "json")
        assert db.list() == []
    finally:
        db.close()


def test_users_command_add_list_export_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "u.db")
    assert auth_cli(["users", "--database", path, "add", "alice", "pw"]) == 0
    assert (
        auth_cli(["users", "--database", path, "add", "--kind", "clientid", "dev", "pw", "--superuser"]) == 0
    )
    assert auth_cli(["users", "--database", path, "list"]) == 0
    assert capsys.readouterr().out.splitlines() == ["clientid\tdev\tsuperuser", "username\talice"]
    out = str(tmp_path / "u.csv")
    assert auth_cli(["users", "--database", path, "export", out]) == 0
    assert auth_cli(["users", "--database", path, "remove", "alice"]) == 0
    assert auth_cli(["users", "--database", path, "remove", "alice"]) == 1
    assert auth_cli(["users", "--database", path, "import", out]) == 0
    db = UserDb(path)
    try:
        assert db.check("x", "alice", b"pw") == (True, False)
    finally:
        db.close()


# --- the authentication chain


def _passwd(tmp_path: Path, **users: str) -> str:
    path = tmp_path / "passwd"
    path.write_text("".join(f"{u}:{hash_password(p, iterations=1000)}\n" for u, p in users.items()))
    return str(path)


def test_anonymous_allowed_by_default_and_refused_when_disabled() -> None:
    assert AccessControl().authenticate(client(username=None), creds(None, None)) == 0
    closed = AccessControl(AuthConfig(allow_anonymous=False))
    assert closed.authenticate(client(username=None), creds(None, None)) == ReasonCode.NOT_AUTHORIZED
    assert closed.authenticate(client(), creds("alice", "x")) == ReasonCode.BAD_USER_NAME_OR_PASSWORD


def test_password_file_source_allows_denies_and_ignores(tmp_path: Path) -> None:
    access = AccessControl(AuthConfig(allow_anonymous=True, password_file=_passwd(tmp_path, alice="pw")))
    assert access.authenticate(client(), creds("alice", "pw")) == 0
    assert access.authenticate(client(), creds("alice", "bad")) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert access.authenticate(client(), creds("alice", None)) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert access.authenticate(client(username="bob"), creds("bob", "x")) == 0  # ignored, then anonymous
    strict = AccessControl(AuthConfig(allow_anonymous=False, password_file=_passwd(tmp_path, alice="pw")))
    assert (
        strict.authenticate(client(username="bob"), creds("bob", "x")) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    )


def test_chain_order_ignore_passes_to_the_next_source(tmp_path: Path) -> None:
    db_path = str(tmp_path / "u.db")
    db = UserDb(db_path)
    db.add("username", "bob", "dbpw")
    db.close()
    access = AccessControl(
        AuthConfig(
            allow_anonymous=False,
            chain=["password_file", "database"],
            password_file=_passwd(tmp_path, alice="filepw"),
            database=db_path,
        )
    )
    try:
        assert access.authenticate(client(), creds("alice", "filepw")) == 0
        assert access.authenticate(client(username="bob"), creds("bob", "dbpw")) == 0
        assert (
            access.authenticate(client(username="bob"), creds("bob", "no"))
            == ReasonCode.BAD_USER_NAME_OR_PASSWORD
        )
    finally:
        access.close()


def test_chain_naming_an_unconfigured_source_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"auth.chain: database is listed but auth.database"):
        AccessControl(AuthConfig(chain=["database"]))


def test_database_superuser_bypasses_the_acl(tmp_path: Path) -> None:
    db_path = str(tmp_path / "u.db")
    db = UserDb(db_path)
    db.add("username", "root", "pw", superuser=True)
    db.close()
    access = AccessControl(AuthConfig(database=db_path), AclConfig(no_match="deny"))
    try:
        root = client(username="root")
        assert access.authenticate(root, creds("root", "pw")) == 0
        assert access.check_publish(root, "any/topic") == ("any/topic", True)
        assert access.check_publish(client("c2", "x"), "any/topic") == ("any/topic", False)
    finally:
        access.close()


def test_failures_per_address_are_rate_limited_then_forgotten(tmp_path: Path) -> None:
    clock = Clock()
    access = AccessControl(
        AuthConfig(
            allow_anonymous=False, password_file=_passwd(tmp_path, alice="pw"), max_failures_per_min=2
        ),
        clock=clock,
    )
    bad = creds("alice", "wrong")
    assert access.authenticate(client(), bad) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert access.authenticate(client(), bad) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert access.authenticate(client(), creds("alice", "pw")) == ReasonCode.BANNED
    other_host = client(peer="10.0.0.6:1")
    assert access.authenticate(other_host, creds("alice", "pw")) == 0
    clock.now += 61
    assert access.authenticate(client(), creds("alice", "pw")) == 0
    assert access.stats.auth_banned == 1


def test_handshake_failures_count_towards_the_ban_and_refuse_the_address() -> None:
    clock = Clock()
    access = AccessControl(AuthConfig(max_failures_per_min=2), clock=clock)
    assert not access.refuses_address("10.0.0.5:1")
    access.handshake_failed("10.0.0.5:1")
    access.handshake_failed("10.0.0.5:2")
    assert access.stats.handshake_failure == 2
    assert access.refuses_address("10.0.0.5:3")
    assert not access.refuses_address("10.0.0.6:3")
    assert access.authenticate(client(), creds(None, None)) == ReasonCode.BANNED
    assert access.stats.auth_banned == 2
    clock.now += 61
    assert not access.refuses_address("10.0.0.5:4")
    unlimited = AccessControl(AuthConfig())
    unlimited.handshake_failed("10.0.0.5:1")
    assert not unlimited.refuses_address("10.0.0.5:1")
    assert unlimited.stats.handshake_failure == 1


def test_oversized_password_is_refused(tmp_path: Path) -> None:
    access = AccessControl(AuthConfig(password_file=_passwd(tmp_path, alice="pw"), max_credential_size=16))
    assert access.authenticate(client(), creds("alice", "x" * 17)) == ReasonCode.BAD_USER_NAME_OR_PASSWORD


@pytest.mark.parametrize(
    ("peer", "host"), [("1.2.3.4:5", "1.2.3.4"), ("[::1]:5", "::1"), ("('10.0.0.1', 99)", "10.0.0.1")]
)
def test_peer_host_reads_every_peer_format(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_anonymous_warning_only_for_non_loopback_listeners(caplog: pytest.LogCaptureFixture) -> None:
    access = AccessControl()
    # addresses as strings only (loopback check); nothing binds them
    assert not warn_if_anonymous_exposed(access, ["127.0.0.1:8000", "/dev/ttyUSB0"])
    assert warn_if_anonymous_exposed(access, ["0.0.0.0:8000"])
    assert "anonymous access is allowed" in caplog.text
    assert not warn_if_anonymous_exposed(AccessControl(AuthConfig(allow_anonymous=False)), ["0.0.0.0:1"])


# --- JWT


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwks(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, alg="RS256", use="sig")
    return {"keys": [jwk]}


def _token(key: Any, alg: str = "RS256", kid: str | None = "k1", **claims: Any) -> bytes:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=alg, headers=headers).encode()


def test_jwt_via_local_jwks_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(_jwks(rsa_key, "k1")))
    access = AccessControl(
        AuthConfig(allow_anonymous=False, jwt=JwtConfig(jwks_file=str(jwks), verify_claims={"sub": "%u"}))
    )
    now = int(time.time())
    good = _token(rsa_key, sub="alice", exp=now + 60)
    assert access.authenticate(client(), Credentials("alice", good)) == 0
    bad_claim = _token(rsa_key, sub="mallory", exp=now + 60)
    assert (
        access.authenticate(client(), Credentials("alice", bad_claim)) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    )
    expired = _token(rsa_key, sub="alice", exp=now - 10)
    assert (
        access.authenticate(client(), Credentials("alice", expired)) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    )
    not_yet = _token(rsa_key, sub="alice", nbf=now + 600)
    assert (
        access.authenticate(client(), Credentials("alice", not_yet)) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    )
    forged = _token(rsa.generate_private_key(public_exponent=65537, key_size=2048), sub="alice")
    assert access.authenticate(client(), Credentials("alice", forged)) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    unknown_kid = _token(rsa_key, kid="other", sub="alice")
    assert (
        access.authenticate(client(), Credentials("alice", unknown_kid))
        == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    )
    assert (
        access.authenticate(client(), creds("alice", "not-a-token")) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    )


def test_jwt_hmac_secret_and_alg_none_refused() -> None:
    access = AccessControl(AuthConfig(allow_anonymous=False, jwt=JwtConfig(secret="k" * 32)))
    assert access.authenticate(client(), Credentials("a", _token("k" * 32, "HS256", None, sub="a"))) == 0
    unsigned = jwt.encode({"sub": "a"}, None, algorithm="none").encode()  # type: ignore[arg-type]
    assert access.authenticate(client(), Credentials("a", unsigned)) == ReasonCode.BAD_USER_NAME_OR_PASSWORD


def test_jwt_acl_claim_replaces_the_acl(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(_jwks(rsa_key, "k1")))
    access = AccessControl(AuthConfig(jwt=JwtConfig(jwks_file=str(jwks))), AclConfig(no_match="allow"))
    token = _token(rsa_key, sub="alice", acl={"pub": ["up/%c"], "sub": ["down/#"], "all": ["both/+"]})
    who = client("dev7")
    assert access.authenticate(who, Credentials("alice", token)) == 0
    assert access.check_publish(who, "up/dev7") == ("up/dev7", True)
    assert access.check_publish(who, "up/dev8") == ("up/dev8", False)
    assert access.check_publish(who, "down/x") == ("down/x", False)
    assert access.check_subscribe(who, "down/#") == ("down/#", True)
    assert access.check_subscribe(who, "both/x") == ("both/x", True)
    assert access.check_subscribe(who, "up/dev7") == ("up/dev7", False)


def test_jwks_file_without_keys_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "jwks.json"
    bad.write_text('{"keys": []}')
    with pytest.raises(ConfigError, match=r"auth\.jwt\.jwks_file"):
        AccessControl(AuthConfig(jwt=JwtConfig(jwks_file=str(bad))))


@pytest.mark.parametrize("document", [b"[1, 2]", b"not json", b'{"keys": "x"}', b"\xff\xfe"])
def test_a_document_that_is_not_a_jwks_is_a_value_error(document: bytes) -> None:
    from core.auth.jwtauth import JwtAuthenticator

    with pytest.raises(ValueError, match="invalid JWKS"):
        JwtAuthenticator(JwtConfig(jwks_url="http://jwks.invalid/")).load_jwks(document)


# --- certificates


def _cert(common_name: str) -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_peer_cert_as_username_and_clientid() -> None:
    der = _cert("device-42")
    assert cert_identity(der, "cn") == "device-42"
    assert cert_identity(der, "dn") == "O=Org,CN=device-42"
    assert len(cert_identity(der, "md5") or "") == 32
    assert cert_identity(b"garbage", "cn") is None
    access = AccessControl(AuthConfig(peer_cert_as_username="cn", peer_cert_as_clientid="md5"))
    identified = access.identify(ClientInfo("orig", "mqtt", "1.2.3.4:5", "u", 4, der))
    assert identified.username == "device-42"
    assert identified.client_id == cert_identity(der, "md5")
    assert access.identify(client()) == client()


def test_certificate_user_name_is_the_credential_and_a_missing_field_is_refused(tmp_path: Path) -> None:
    named, nameless = _cert("device-42"), _cert_without_cn()
    access = AccessControl(
        AuthConfig(
            allow_anonymous=False,
            password_file=_passwd(tmp_path, other="pw"),
            peer_cert_as_username="cn",
        )
    )
    with_cert = access.identify(ClientInfo("c", "mqtt", "1.2.3.4:5", "mallory", 4, named))
    assert access.authenticate(with_cert, creds("mallory", None)) == 0
    claimed = access.identify(ClientInfo("c", "mqtt", "1.2.3.4:5", "device-42", 4, nameless))
    assert claimed.username == "device-42"  # the CONNECT name: the certificate has none
    assert access.authenticate(claimed, creds("device-42", None)) == ReasonCode.NOT_AUTHORIZED
    assert access.authenticate(client(username="other"), creds("other", "pw")) == 0  # no certificate
    by_id = AccessControl(AuthConfig(peer_cert_as_clientid="cn"))
    assert by_id.authenticate(by_id.identify(ClientInfo("c", peer_cert=named)), creds(None, None)) == 0
    refused = by_id.identify(ClientInfo("device-42", peer_cert=nameless))
    assert by_id.authenticate(refused, creds(None, None)) == ReasonCode.NOT_AUTHORIZED


def _cert_without_cn() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org")])
    now = datetime.datetime.now(datetime.UTC)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    cert = (
        builder.serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


# --- ACL


def test_subscription_filters_must_lie_inside_the_rule_filter() -> None:
    assert covers("a/#", "a/b/c", SUBSCRIBE)
    assert covers("a/+", "a/+", SUBSCRIBE)
    assert not covers("a/+", "a/#", SUBSCRIBE)
    assert not covers("a/b", "a/+", SUBSCRIBE)
    assert covers("a/+", "a/b", PUBLISH)
    assert not covers("#", "$SYS/x", PUBLISH)


def test_mosquitto_acl_file_users_patterns_and_deny() -> None:
    acl = parse_acl_file(
        """
        # anonymous clients
        topic read public/#
        user alice
        topic readwrite alice/#
        topic deny alice/secret
        topic write log
        pattern read devices/%c/cmd
        pattern write devices/%u/state
        """
    )
    alice = Who("c9", "alice", "1.2.3.4")
    anon = Who("c0", None, "1.2.3.4")
    assert acl.decide(alice, PUBLISH, "alice/x") is True
    assert acl.decide(alice, PUBLISH, "alice/secret") is False
    assert acl.decide(alice, SUBSCRIBE, "log") is None
    assert acl.decide(alice, PUBLISH, "log") is True
    assert acl.decide(alice, SUBSCRIBE, "devices/c9/cmd") is True
    assert acl.decide(alice, PUBLISH, "devices/alice/state") is True
    assert acl.decide(alice, PUBLISH, "devices/bob/state") is None
    assert acl.decide(anon, SUBSCRIBE, "public/news") is True
    assert acl.decide(anon, PUBLISH, "public/news") is None
    assert acl.decide(anon, PUBLISH, "devices/%u/state") is None  # no user name: the pattern does not apply
    with pytest.raises(ConfigError, match="acl:2"):
        parse_acl_file("user a\nbogus line\n", "acl")


def test_acl_rules_first_match_wins_by_user_clientid_and_ip() -> None:
    access = AccessControl(
        acl=AclConfig(
            no_match="deny",
            rules=[
                AclRuleConfig("deny", "all", ["eq #"]),
                AclRuleConfig("allow", "publish", ["sensors/%c/#"]),
                AclRuleConfig("allow", "subscribe", ["admin/#"], username="admin"),
                AclRuleConfig("allow", "all", ["lan/#"], ipaddress="192.168.0.0/16"),
                AclRuleConfig("deny", "all", ["private/#"]),
                AclRuleConfig("allow", "all", ["private/#", "#"], clientid="boss"),
            ],
            cache_ttl=0,
        )
    )
    dev = ClientInfo("dev1", "mqtt", "192.168.1.7:1000", "u")
    assert access.check_subscribe(dev, "#") == ("#", False)
    assert access.check_publish(dev, "sensors/dev1/t") == ("sensors/dev1/t", True)
    assert access.check_publish(dev, "sensors/dev2/t") == ("sensors/dev2/t", False)
    assert access.check_subscribe(dev, "admin/x")[1] is False
    assert access.check_subscribe(ClientInfo("a", "mqtt", "1.1.1.1:1", "admin"), "admin/x")[1] is True
    assert access.check_publish(dev, "lan/x")[1] is True
    assert access.check_publish(ClientInfo("x", "coap", "10.1.1.1:1"), "lan/x")[1] is False
    assert access.check_publish(ClientInfo("boss", "mqtt", "1.1.1.1:1"), "private/x")[1] is False
    assert access.check_publish(ClientInfo("boss", "mqtt", "1.1.1.1:1"), "other")[1] is True


def test_acl_file_is_consulted_after_the_rules(tmp_path: Path) -> None:
    path = tmp_path / "acl"
    path.write_text("user alice\ntopic write a/#\n")
    access = AccessControl(
        acl=AclConfig(
            file=str(path), no_match="deny", rules=[AclRuleConfig("deny", "publish", ["a/blocked"])]
        )
    )
    assert access.check_publish(client(), "a/ok")[1] is True
    assert access.check_publish(client(), "a/blocked")[1] is False
    assert access.check_publish(client(), "b")[1] is False


def test_rewrite_happens_before_the_acl_check() -> None:
    access = AccessControl(
        acl=AclConfig(no_match="deny", rules=[AclRuleConfig("allow", "all", ["y/#"])]),
        rewrite=[
            RewriteRuleConfig("x/#", r"^x/(.+)$", "y/$1"),
            RewriteRuleConfig("y/#", r"^y/never$", "z", action="publish"),
        ],
    )
    assert access.check_publish(client(), "x/a/b") == ("y/a/b", True)
    assert access.check_subscribe(client(), "x/+") == ("y/+", True)
    assert access.check_subscribe(client(), "$share/g/x/1") == ("$share/g/y/1", True)
    assert access.check_publish(client(), "y/ok") == ("y/ok", True)  # source matched, regex did not
    assert access.check_publish(client(), "w") == ("w", False)
    assert access.rewrite_filter("x/q") == "y/q"


def test_acl_cache_keeps_decisions_for_the_ttl_and_can_be_cleared(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "acl"
    path.write_text("topic write open/#\n")
    access = AccessControl(acl=AclConfig(file=str(path), no_match="deny", cache_ttl=10), clock=clock)
    anon = client(username=None)
    assert access.check_publish(anon, "open/1")[1] is True
    path.write_text("")
    access.acl_file = parse_acl_file("")
    assert access.check_publish(anon, "open/1")[1] is True  # cached
    assert access.stats.acl_cache_hits == 1
    clock.now += 11
    assert access.check_publish(anon, "open/1")[1] is False  # expired
    path.write_text("topic write open/#\n")
    access.reload()
    assert access.check_publish(anon, "open/1")[1] is True
    access.acl_file = parse_acl_file("")
    access.clear_cache()
    assert access.check_publish(anon, "open/1")[1] is False


def test_without_configuration_checks_take_the_fast_path() -> None:
    access = AccessControl()
    assert not access.enabled and not access.checks_enabled
    assert access.check_publish(client(), "t") == ("t", True)
    assert access._cache == {}


# --- the broker applies it


class Sink:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    def deliver(
        self, message: Message, qos: int, packet_id: int, dup: bool, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        self.messages.append(message)

    def deliver_pubrel(self, packet_id: int) -> None:
        pass

    def kick(self, reason_code: int) -> None:
        pass


def test_broker_refuses_subscriptions_and_wills_the_acl_denies() -> None:
    access = AccessControl(
        acl=AclConfig(
            no_match="allow",
            rules=[
                AclRuleConfig("deny", "subscribe", ["secret/#"]),
                AclRuleConfig("deny", "publish", ["wills/x"]),
            ],
        ),
        rewrite=[RewriteRuleConfig("old/#", "^old/(.*)$", "new/$1")],
    )
    broker = Broker(BrokerConfig(), access=access)
    sink = Sink()
    watcher, _ = broker.open_session(
        client("w"), clean_start=True, expiry=0, will=None, sink=sink, max_inflight=10, now=0
    )
    assert broker.subscribe(watcher, Subscription("secret/a"), 0) == (ReasonCode.NOT_AUTHORIZED, [])
    assert broker.subscribe(watcher, Subscription("old/#"), 0)[0] == 0
    assert "new/#" in watcher.subscriptions
    assert broker.subscribe(watcher, Subscription("wills/#"), 0)[0] == 0
    assert broker.unsubscribe(watcher, "old/#")
    will = Will("wills/x", b"gone")
    dying, _ = broker.open_session(
        client("d"), clean_start=True, expiry=0, will=will, sink=Sink(), max_inflight=10, now=0
    )
    broker.connection_lost(dying, publish_will=True, now=1)
    assert sink.messages == []
    assert access.stats.wills_denied == 1


def test_rewrite_to_a_wildcard_topic_for_publish_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"rewrite\[0\]\.dest"):
        AccessControl(rewrite=[RewriteRuleConfig("a/#", "^a/(.*)$", "b/#")])
    AccessControl(rewrite=[RewriteRuleConfig("a/#", "^a/(.*)$", "b/#", action="subscribe")])
