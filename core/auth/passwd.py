"""The password file (``auth.password_file``): one ``username:hash`` line per user, like mosquitto_passwd.

Blank lines and lines starting with ``#`` are ignored. The hash formats are those of :mod:`core.auth.hashing`.
"""

from __future__ import annotations

import logging
import os
import tempfile

from core.auth.hashing import HashError, check_hash, hash_password
from core.errors import ConfigError

__all__ = ["load_password_file", "parse_password_file", "remove_user", "set_password"]

log = logging.getLogger("mqgate.auth")


def parse_password_file(text: str, source: str = "password file") -> dict[str, str]:
    """``{username: hash}``; a line without ``:``, an empty user name or an unreadable hash is a
    :class:`ConfigError` naming the line."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, stored = line.partition(":")
        if not sep or not username:
            raise ConfigError(f"{source}:{number}: expected username:hash")
        try:
            check_hash(stored)
        except HashError as exc:
            raise ConfigError(f"{source}:{number}: user {username!r}: {exc}") from None
        users[username] = stored
    return users


def load_password_file(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(f"auth.password_file: cannot read {path}: {exc.strerror or exc}") from None
    return parse_password_file(text, path)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().splitlines()
    except FileNotFoundError:
        return []


def _write_lines(path: str, lines: list[str]) -> None:
    """Replace the file atomically, readable by its owner only."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".passwd-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write("".join(line + "\n" for line in lines))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def set_password(path: str, username: str, password: str, *, scheme: str = "pbkdf2-sha256") -> None:
    """Add ``username`` to the file, or replace its hash (the file is created if missing)."""
    if not username or ":" in username or "\n" in username:
        raise ValueError("a user name must be non-empty and contain no ':' or newline")
    entry = f"{username}:{hash_password(password, scheme=scheme)}"
    lines = _read_lines(path)
    for index, line in enumerate(lines):
        if line.partition(":")[0].strip() == username and not line.lstrip().startswith("#"):
            lines[index] = entry
            break
    else:
        lines.append(entry)
    _write_lines(path, lines)


def remove_user(path: str, username: str) -> bool:
    lines = _read_lines(path)
    kept = [line for line in lines if line.partition(":")[0].strip() != username or line.startswith("#")]
    if len(kept) == len(lines):
        return False
    _write_lines(path, kept)
    return True
