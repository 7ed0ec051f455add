"""Password hashes: PBKDF2-SHA256 (standard library) and bcrypt (when the ``bcrypt`` package is installed).

The PBKDF2 format is ``$pbkdf2-sha256$ITERATIONS$SALT$HASH`` with SALT and HASH in unpadded standard base64
(the passlib/mosquitto-style modular crypt layout). bcrypt hashes are the usual ``$2b$COST$...`` strings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

__all__ = ["DEFAULT_ITERATIONS", "HashError", "check_hash", "hash_password", "verify_password"]

DEFAULT_ITERATIONS = 100_000
_MAX_ITERATIONS = 10_000_000
_PBKDF2 = "$pbkdf2-sha256$"


class HashError(ValueError):
    """A hash string this module cannot read."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(
    password: str | bytes, *, scheme: str = "pbkdf2-sha256", iterations: int = DEFAULT_ITERATIONS
) -> str:
    """A new salted hash of ``password`` in the given scheme (``pbkdf2-sha256`` or ``bcrypt``)."""
    secret = password.encode() if isinstance(password, str) else password
    if scheme == "bcrypt":
        import bcrypt

        return bcrypt.hashpw(secret, bcrypt.gensalt()).decode()
    if scheme != "pbkdf2-sha256":
        raise HashError(f"unknown hash scheme {scheme!r}")
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret, salt, iterations)
    return f"{_PBKDF2}{iterations}${_b64(salt)}${_b64(digest)}"


def check_hash(stored: str) -> None:
    """Raise :class:`HashError` unless ``stored`` is a hash :func:`verify_password` can check."""
    if stored.startswith(_PBKDF2):
        _parse_pbkdf2(stored)
    elif stored.startswith(("$2a$", "$2b$", "$2y$")):
        if len(stored) != 60:
            raise HashError("malformed bcrypt hash")
    else:
        raise HashError("unknown hash format (expected $pbkdf2-sha256$... or $2b$...)")


def _parse_pbkdf2(stored: str) -> tuple[int, bytes, bytes]:
    parts = stored[len(_PBKDF2) :].split("$")
    if len(parts) != 3 or not parts[0].isdigit():
        raise HashError("malformed pbkdf2-sha256 hash")
    iterations = int(parts[0])
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise HashError("pbkdf2-sha256 iterations out of range")
    try:
        salt, digest = _unb64(parts[1]), _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise HashError("malformed base64 in pbkdf2-sha256 hash") from None
    if not digest:
        raise HashError("empty pbkdf2-sha256 digest")
    return iterations, salt, digest


def verify_password(password: bytes, stored: str) -> bool:
    """Whether ``password`` matches ``stored``; False for a hash in an unknown or malformed format."""
    if stored.startswith(_PBKDF2):
        try:
            iterations, salt, digest = _parse_pbkdf2(stored)
        except HashError:
            return False
        computed = hashlib.pbkdf2_hmac("sha256", password, salt, iterations, len(digest))
        return hmac.compare_digest(computed, digest)
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        try:
            import bcrypt
        except ImportError:
            return False
        try:
            return bool(bcrypt.checkpw(password, stored.encode()))
        except ValueError:
            return False
    return False
