"""The access control the broker owns: one authentication and authorisation path for every protocol.

``authenticate`` runs at connect (MQTT CONNECT, gateway session open); ``check_publish`` and
``check_subscribe`` rewrite the topic (``[[rewrite]]``) and then apply the ACL. With nothing configured the
checks return at once (no allocation); otherwise decisions are cached per client for ``acl.cache_ttl``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from core.auth.acl import (
    PUBLISH,
    SUBSCRIBE,
    AclFile,
    AclRule,
    Rewriter,
    Who,
    load_acl_file,
    rules_from_config,
    topic_applies,
)
from core.auth.certs import cert_identity
from core.auth.hashing import verify_password
from core.auth.jwtauth import JwtAuthenticator, TokenAcl
from core.auth.passwd import load_password_file
from core.auth.userdb import UserDb
from core.broker.types import ClientInfo, Credentials
from core.clock import MonotonicClock
from core.config import AclConfig, AuthConfig, RewriteRuleConfig
from core.logging import client_fields
from core.mqtt.numbers import ReasonCode
from core.topics import parse_shared

__all__ = ["AccessControl", "AuthStats", "peer_host", "warn_if_anonymous_exposed"]

log = logging.getLogger("mqgate.auth")

_MAX_TRACKED_ADDRESSES = 100_000
_ALLOW = 1
_DENY = 0
_IGNORE = -1


def peer_host(peer: str) -> str:
    """The host of a peer string: ``h:p``, ``[v6]:p`` or ``('h', p)`` (the gateways' tuples)."""
    if peer.startswith("("):
        return peer[1:].split(",", 1)[0].strip().strip("'\"")
    if peer.startswith("["):
        return peer[1:].split("]", 1)[0]
    if peer.count(":") == 1:
        return peer.rsplit(":", 1)[0]
    return peer


@dataclass(frozen=True, slots=True)
class _Grant:
    client: ClientInfo
    superuser: bool
    acl: TokenAcl | None


@dataclass(slots=True)
class AuthStats:
    """Counters for the ops API and $SYS."""

    auth_success: int = 0
    auth_failure: int = 0
    auth_banned: int = 0
    acl_denied_publish: int = 0
    acl_denied_subscribe: int = 0
    acl_cache_hits: int = 0
    wills_denied: int = 0
    handshake_failure: int = 0  # TLS and WebSocket handshakes that failed, timed out or were refused


class AccessControl:
    """Authentication chain, ACL, rewrite and their caches. Build it with :meth:`from_config`."""

    def __init__(
        self,
        auth: AuthConfig | None = None,
        acl: AclConfig | None = None,
        rewrite: list[RewriteRuleConfig] | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.auth_config = auth = auth or AuthConfig()
        self.acl_config = acl = acl or AclConfig()
        self.clock = clock if clock is not None else MonotonicClock().now
        self.stats = AuthStats()
        self.passwords: dict[str, str] | None = (
            load_password_file(auth.password_file) if auth.password_file else None
        )
        self.userdb: UserDb | None = UserDb(auth.database) if auth.database else None
        jwt_config = auth.jwt
        self.jwt: JwtAuthenticator | None = (
            JwtAuthenticator(jwt_config)
            if jwt_config.secret or jwt_config.public_key or jwt_config.jwks_file or jwt_config.jwks_url
            else None
        )
        available = {
            "password_file": self.passwords is not None,
            "database": self.userdb is not None,
            "jwt": self.jwt is not None,
        }
        if auth.chain:
            for name in auth.chain:
                if not available[name]:
                    from core.errors import ConfigError

                    key = {"password_file": "auth.password_file", "database": "auth.database"}.get(
                        name, "auth.jwt"
                    )
                    raise ConfigError(f"auth.chain: {name} is listed but {key} is not configured")
            self.chain: list[str] = list(auth.chain)
        else:
            self.chain = [name for name, on in available.items() if on]
        self.rules: list[AclRule] = rules_from_config(acl.rules)
        self.acl_file: AclFile | None = load_acl_file(acl.file) if acl.file else None
        self.rewriter: Rewriter | None = Rewriter(rewrite) if rewrite else None
        self._no_match = acl.no_match == "allow"
        self._acl_on = (
            bool(self.rules) or self.acl_file is not None or not self._no_match or self.jwt is not None
        )
        self._open_checks = not self._acl_on and self.rewriter is None
        self.checks_enabled = not self._open_checks  # callers on hot paths may skip the calls when False
        self._open_auth = (
            auth.allow_anonymous
            and not self.chain
            and not auth.max_failures_per_min
            and not (auth.peer_cert_as_username or auth.peer_cert_as_clientid)
        )
        self._cache_ttl = acl.cache_ttl
        self._cache: dict[str, dict[tuple[str, str], tuple[float, str, bool]]] = {}
        self._grants: dict[str, _Grant] = {}  # what authentication granted beyond the ACL, by client id
        self._failures: dict[str, deque[float]] = {}

    @property
    def enabled(self) -> bool:
        """Whether anything beyond anonymous allow-all is configured."""
        return not (self._open_auth and self._open_checks)

    # --- authentication

    def identify(self, client: ClientInfo) -> ClientInfo:
        """Apply ``peer_cert_as_username`` / ``peer_cert_as_clientid`` to a client with a certificate."""
        cert = client.peer_cert
        auth = self.auth_config
        if cert is None or not (auth.peer_cert_as_username or auth.peer_cert_as_clientid):
            return client
        username, client_id = client.username, client.client_id
        if auth.peer_cert_as_username:
            username = cert_identity(cert, auth.peer_cert_as_username) or username
        if auth.peer_cert_as_clientid:
            client_id = cert_identity(cert, auth.peer_cert_as_clientid) or client_id
        return replace(client, username=username, client_id=client_id)

    def authenticate(self, client: ClientInfo, credentials: Credentials) -> int:
        """0 (allowed) or the MQTT 5 CONNACK reason code: 0x86 bad credentials, 0x87 not authorised (an
        anonymous client when anonymous access is off, a certificate without the configured field), 0x8A
        banned (too many failures from the address).

        With ``peer_cert_as_username`` a verified client certificate is the credential (mosquitto's
        ``use_identity_as_username``): the sources of the chain are not consulted for that client. The same
        holds for a DTLS client whose PSK identity the gateway made its user name (``psk_identity``, with
        ``gateways.*.dtls.psk_identity_as_username``): the handshake proved it holds that identity's key."""
        client_id = client.client_id
        self._forget(client_id)
        if self._open_auth:
            return 0
        auth = self.auth_config
        host = peer_host(client.peer)
        if self._banned(host):
            self.stats.auth_banned += 1
            log.warning(
                "refused %s (%s): too many authentication failures",
                client_id,
                client.peer,
                extra=client_fields(client_id, client.peer, client.protocol),
            )
            return ReasonCode.BANNED
        if client.psk_identity is not None and client.psk_identity == client.username:
            return self._proven(client, "its PSK identity")
        if client.peer_cert is not None and (auth.peer_cert_as_username or auth.peer_cert_as_clientid):
            refusal = self._certificate_refusal(client, client.peer_cert)
            if refusal:
                return self._failed(client, host, ReasonCode.NOT_AUTHORIZED, refusal)
            if auth.peer_cert_as_username:
                return self._proven(client, "its certificate")
        password = credentials.password
        username = credentials.username if credentials.username is not None else client.username
        if password is not None and len(password) > auth.max_credential_size:
            return self._failed(client, host, ReasonCode.BAD_USER_NAME_OR_PASSWORD, "oversized password")
        for source in self.chain:
            verdict, reason = self._ask(source, client, username, password)
            if verdict == _ALLOW:
                self.stats.auth_success += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "client %s (%s) authenticated by %s",
                        client_id,
                        client.peer,
                        source,
                        extra=client_fields(client_id, client.peer, client.protocol),
                    )
                return 0
            if verdict == _DENY:
                return self._failed(client, host, ReasonCode.BAD_USER_NAME_OR_PASSWORD, f"{source}: {reason}")
        if auth.allow_anonymous:
            self.stats.auth_success += 1
            return 0
        if username is None and password is None:
            return self._failed(client, host, ReasonCode.NOT_AUTHORIZED, "anonymous access is disabled")
        return self._failed(client, host, ReasonCode.BAD_USER_NAME_OR_PASSWORD, "unknown user")

    def _proven(self, client: ClientInfo, proof: str) -> int:
        """Allow a client whose user name the (D)TLS handshake proved; ``proof`` says how, for the log."""
        self.stats.auth_success += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "client %s (%s) authenticated by %s",
                client.client_id,
                client.peer,
                proof,
                extra=client_fields(client.client_id, client.peer, client.protocol),
            )
        return 0

    def _certificate_refusal(self, client: ClientInfo, cert: bytes) -> str:
        """Why the certificate does not give the user name and client id that :meth:`identify` set ("" when
        it does): a certificate without the configured field must not let the client choose its identity."""
        auth = self.auth_config
        for field, value, what in (
            (auth.peer_cert_as_username, client.username, "user name"),
            (auth.peer_cert_as_clientid, client.client_id, "client id"),
        ):
            if field and cert_identity(cert, field) != value:
                return f"the client certificate gives no {field} for the {what}"
        return ""

    def _banned(self, host: str) -> bool:
        """Whether ``host`` reached ``auth.max_failures_per_min`` failures in the last 60 seconds."""
        limit = self.auth_config.max_failures_per_min
        failures = self._failures.get(host) if limit else None
        if failures is None:
            return False
        cutoff = self.clock() - 60.0
        while failures and failures[0] <= cutoff:
            failures.popleft()
        return len(failures) >= limit

    def refuses_address(self, peer: str) -> bool:
        """Whether a new connection from ``peer`` is refused before its TLS or WebSocket handshake because
        its address is banned (``auth.max_failures_per_min``); counted as ``auth_banned``."""
        if not self._banned(peer_host(peer)):
            return False
        self.stats.auth_banned += 1
        return True

    def handshake_failed(self, peer: str) -> None:
        """A TLS or WebSocket handshake from ``peer`` failed (the listener logs why): it counts as an
        authentication failure of the address towards ``auth.max_failures_per_min``."""
        self.stats.handshake_failure += 1
        self._record_failure(peer_host(peer))

    def _ask(
        self, source: str, client: ClientInfo, username: str | None, password: bytes | None
    ) -> tuple[int, str]:
        client_id = client.client_id
        if source == "password_file":
            assert self.passwords is not None
            stored = self.passwords.get(username) if username else None
            if stored is None:
                return _IGNORE, ""
            if password is not None and verify_password(password, stored):
                return _ALLOW, ""
            return _DENY, "wrong password"
        if source == "database":
            assert self.userdb is not None
            decision, superuser = self.userdb.check(client_id, username, password)
            if decision is None:
                return _IGNORE, ""
            if decision:
                if superuser:
                    self._grants[client_id] = _Grant(client, True, None)
                return _ALLOW, ""
            return _DENY, "wrong password"
        assert self.jwt is not None
        if password is None:
            return _IGNORE, ""
        result = self.jwt.verify(password, username, client_id)
        if result.allowed is None:
            return _IGNORE, ""
        if not result.allowed:
            return _DENY, result.reason
        if result.acl is not None:
            self._grants[client_id] = _Grant(client, False, result.acl)
        return _ALLOW, ""

    def _failed(self, client: ClientInfo, host: str, code: int, reason: str) -> int:
        self.stats.auth_failure += 1
        log.warning(
            "authentication of %r (%s, %s) failed: %s",
            client.client_id,
            client.protocol,
            client.peer,
            reason,
            extra=client_fields(client.client_id, client.peer, client.protocol),
        )
        self._record_failure(host)
        return code

    def _record_failure(self, host: str) -> None:
        if self.auth_config.max_failures_per_min:
            failures = self._failures.get(host)
            if failures is None:
                if len(self._failures) >= _MAX_TRACKED_ADDRESSES:
                    self._failures.pop(next(iter(self._failures)))
                failures = self._failures[host] = deque()
            failures.append(self.clock())

    def _forget(self, client_id: str) -> None:
        if self._grants or self._cache:
            self._grants.pop(client_id, None)
            self._cache.pop(client_id, None)

    # --- authorisation

    def check_publish(self, client: ClientInfo, topic: str) -> tuple[str, bool]:
        """The topic after ``[[rewrite]]`` and whether ``client`` may publish to it."""
        if self._open_checks:
            return topic, True
        return self._check(client, PUBLISH, topic)

    def check_subscribe(self, client: ClientInfo, topic_filter: str) -> tuple[str, bool]:
        """The filter after ``[[rewrite]]`` and whether ``client`` may subscribe to it (a shared
        subscription is checked by its filter without the ``$share/group/`` prefix)."""
        if self._open_checks:
            return topic_filter, True
        return self._check(client, SUBSCRIBE, topic_filter)

    def rewrite_filter(self, topic_filter: str) -> str:
        """A filter rewritten as for subscribe (UNSUBSCRIBE names the filter the client sent)."""
        return topic_filter if self.rewriter is None else self.rewriter.rewrite(SUBSCRIBE, topic_filter)

    def _check(self, client: ClientInfo, action: str, topic: str) -> tuple[str, bool]:
        ttl = self._cache_ttl
        client_id = client.client_id
        now = 0.0
        if ttl:
            now = self.clock()
            entries = self._cache.get(client_id)
            if entries is not None:
                hit = entries.get((action, topic))
                if hit is not None and hit[0] > now:
                    self.stats.acl_cache_hits += 1
                    return hit[1], hit[2]
        target = topic if self.rewriter is None else self.rewriter.rewrite(action, topic)
        allowed = self._authorise(client, action, target)
        if not allowed:
            if action == PUBLISH:
                self.stats.acl_denied_publish += 1
            else:
                self.stats.acl_denied_subscribe += 1
        if ttl:
            entries = self._cache.get(client_id)
            if entries is None:
                entries = self._cache[client_id] = {}
            elif len(entries) >= self.acl_config.cache_max_entries:
                entries.clear()
            entries[(action, topic)] = (now + ttl, target, allowed)
        return target, allowed

    def _authorise(self, client: ClientInfo, action: str, target: str) -> bool:
        if not self._acl_on:
            return True
        grant = self._grants.get(client.client_id)
        if grant is not None and grant.superuser:
            return True
        requested = target
        if action == SUBSCRIBE:
            shared = parse_shared(target)
            if shared is not None and not isinstance(shared, str):
                requested = shared.topic_filter
        who = Who(client.client_id, client.username, peer_host(client.peer))
        token_acl = grant.acl if grant is not None else None
        if token_acl is not None:
            lists = token_acl.all + (token_acl.pub if action == PUBLISH else token_acl.sub)
            return any(topic_applies(t, who, requested, action) for t in lists)
        for rule in self.rules:
            decision = rule.decide(who, action, requested)
            if decision is not None:
                return decision
        if self.acl_file is not None:
            decision = self.acl_file.decide(who, action, requested)
            if decision is not None:
                return decision
        return self._no_match

    def clear_cache(self, client_id: str | None = None) -> None:
        """Drop the cached ACL decisions of one client, or of every client (the ops API)."""
        if client_id is None:
            self._cache.clear()
        else:
            self._cache.pop(client_id, None)

    def client_gone(self, client: ClientInfo) -> None:
        """The session of ``client`` ended: forget its cache, token ACL and superuser flag, unless a newer
        authentication of the same client id replaced them."""
        grant = self._grants.get(client.client_id)
        if grant is None or grant.client is client:
            self._forget(client.client_id)

    def reload(self) -> None:
        """Re-read the password and ACL files (and clear the caches)."""
        if self.auth_config.password_file:
            self.passwords = load_password_file(self.auth_config.password_file)
        if self.acl_config.file:
            self.acl_file = load_acl_file(self.acl_config.file)
        self._cache.clear()

    def close(self) -> None:
        if self.userdb is not None:
            self.userdb.close()


def warn_if_anonymous_exposed(access: AccessControl, addresses: list[str]) -> bool:
    """Log a warning when anonymous clients are allowed and a listener is reachable beyond loopback."""
    if not access.auth_config.allow_anonymous:
        return False
    exposed = []
    for address in addresses:
        try:
            if not ipaddress.ip_address(peer_host(address)).is_loopback:
                exposed.append(address)
        except ValueError:
            continue  # a serial device, not a network address
    if exposed:
        log.warning(
            "anonymous access is allowed (auth.allow_anonymous) on non-loopback listeners: %s",
            ", ".join(exposed),
        )
    return bool(exposed)
