"""JWT in the password field (``[auth.jwt]``), verified with PyJWT.

Keys come from an HMAC secret, a PEM public key, a JWKS file or a JWKS URL. The URL is fetched by
:func:`core.auth.jwks_refresh.refresh_jwks`, a background task the App starts: verification never does I/O.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import jwt

from core.config import JwtConfig
from core.errors import ConfigError

__all__ = ["JwtAuthenticator", "JwtResult", "TokenAcl"]

log = logging.getLogger("mqgate.auth")

_HMAC_ALGORITHMS = ["HS256", "HS384", "HS512"]
_PUBLIC_ALGORITHMS = [
    *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
]


@dataclass(frozen=True, slots=True)
class TokenAcl:
    """The topic filters of a token's ``acl`` claim (EMQX 4.3 layout)."""

    pub: tuple[str, ...] = ()
    sub: tuple[str, ...] = ()
    all: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JwtResult:
    """``allowed`` None: not a token (the next source decides)."""

    allowed: bool | None
    reason: str = ""
    acl: TokenAcl | None = None


def looks_like_jwt(password: bytes) -> bool:
    return password.count(b".") == 2 and password[:2] == b"ey"


class JwtAuthenticator:
    def __init__(self, config: JwtConfig) -> None:
        self.config = config
        self._secret: str | None = config.secret or None
        self._public_key: Any = None
        self._jwks: dict[str, Any] = {}  # kid -> PyJWK
        self._jwks_keys: list[Any] = []
        if config.public_key:
            try:
                with open(config.public_key, "rb") as file:
                    pem = file.read()
                from cryptography.hazmat.primitives.serialization import load_pem_public_key

                self._public_key = load_pem_public_key(pem)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"auth.jwt.public_key: cannot load {config.public_key}: {exc}") from None
        if config.jwks_file:
            try:
                with open(config.jwks_file, "rb") as file:
                    self.load_jwks(file.read())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"auth.jwt.jwks_file: cannot load {config.jwks_file}: {exc}") from None
        if not (self._secret or self._public_key is not None or config.jwks_file or config.jwks_url):
            raise ConfigError("auth.jwt: needs secret, public_key, jwks_file or jwks_url")

    def load_jwks(self, data: bytes) -> None:
        """Replace the key set with a JWKS document; raises ValueError if it holds no usable key."""
        try:
            document = json.loads(data)
            if not isinstance(document, dict):
                raise TypeError("not a JSON object")
            key_set = jwt.PyJWKSet.from_dict(document)
        except (jwt.PyJWKSetError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise ValueError(f"invalid JWKS: {exc}") from None
        self._jwks_keys = list(key_set.keys)
        self._jwks = {k.key_id: k for k in key_set.keys if k.key_id}

    def _key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        alg = str(header.get("alg", ""))
        if alg in _HMAC_ALGORITHMS:
            if self._secret is None:
                raise jwt.InvalidKeyError("HMAC token but no secret configured")
            return self._secret, _HMAC_ALGORITHMS
        if self._jwks_keys:
            kid = header.get("kid")
            key = self._jwks.get(kid) if isinstance(kid, str) else None
            if key is None and kid is None and len(self._jwks_keys) == 1:
                key = self._jwks_keys[0]
            if key is not None:
                return key.key, _PUBLIC_ALGORITHMS
            if self._public_key is None:
                raise jwt.InvalidKeyError(f"no JWKS key with kid {kid!r}")
        if self._public_key is not None:
            return self._public_key, _PUBLIC_ALGORITHMS
        raise jwt.InvalidKeyError("no key for this token")

    def verify(self, password: bytes, username: str | None, client_id: str) -> JwtResult:
        if not looks_like_jwt(password):
            return JwtResult(None)
        token = password.decode("ascii", errors="replace")
        try:
            header = jwt.get_unverified_header(token)
            key, algorithms = self._key_for(header)
            if self.config.algorithms:
                algorithms = [a for a in algorithms if a in self.config.algorithms]
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                leeway=self.config.leeway,
                options={"verify_aud": False, "verify_iss": False},
            )
        except jwt.PyJWTError as exc:
            return JwtResult(False, f"invalid token: {exc}")
        for name, expected in self.config.verify_claims.items():
            want = expected.replace("%u", username or "").replace("%c", client_id)
            if str(claims.get(name)) != want:
                return JwtResult(False, f"claim {name!r} does not match")
        acl = None
        raw = claims.get(self.config.acl_claim)
        if isinstance(raw, dict):
            lists = (raw.get(k) for k in ("pub", "sub", "all"))
            acl = TokenAcl(
                *(tuple(t for t in v if isinstance(t, str)) if isinstance(v, list) else () for v in lists)
            )
        return JwtResult(True, acl=acl)
