"""The background task that fetches ``auth.jwt.jwks_url`` (started by the App; the hot path never waits)."""

from __future__ import annotations

import asyncio
import http.client
import logging
import urllib.request

from core.auth.jwtauth import JwtAuthenticator

__all__ = ["refresh_jwks"]

log = logging.getLogger("mqgate.auth")

_MAX_JWKS_BYTES = 1 << 20


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        data: bytes = response.read(_MAX_JWKS_BYTES + 1)
    if len(data) > _MAX_JWKS_BYTES:
        raise ValueError("JWKS document over 1 MiB")
    return data


async def refresh_jwks(authenticator: JwtAuthenticator) -> None:
    """Fetch the JWKS URL now and every ``jwks_refresh_interval`` seconds; a failure (unreachable, an HTTP
    error, a document that is not a JWKS with a usable key) is logged and keeps the last good key set."""
    config = authenticator.config
    url = config.jwks_url
    while True:
        try:
            authenticator.load_jwks(await asyncio.to_thread(_fetch, url))
            log.debug("JWKS refreshed from %s", url)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            log.warning("cannot refresh the JWKS from %s (the last key set is kept): %s", url, exc)
        await asyncio.sleep(config.jwks_refresh_interval)
