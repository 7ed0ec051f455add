"""The built-in user database (``auth.database``, sqlite), like EMQX's ``auth_mnesia``: username rules and
client-id rules, each with a password hash and a superuser flag.

A client is checked against the rule of its client id and the rule of its user name: a matching password in
either allows it, rules that exist but do not match deny it, no rule at all lets the next source decide.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from core.auth.hashing import HashError, check_hash, hash_password, verify_password

__all__ = ["KINDS", "UserDb", "UserRecord"]

KINDS = ("username", "clientid")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS auth_rules (
    kind TEXT NOT NULL CHECK (kind IN ('username', 'clientid')),
    name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    is_superuser INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, name)
)
"""


@dataclass(frozen=True, slots=True)
class UserRecord:
    kind: str
    name: str
    password_hash: str
    is_superuser: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "password_hash": self.password_hash,
            "is_superuser": self.is_superuser,
        }


class UserDb:
    """One sqlite file; lookups are a primary-key read each."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False)
        with self._db:
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(
        self,
        kind: str,
        name: str,
        password: str | None = None,
        *,
        password_hash: str | None = None,
        superuser: bool = False,
        scheme: str = "pbkdf2-sha256",
    ) -> None:
        """Add or replace a rule, from a clear password or an existing hash."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not name:
            raise ValueError("empty name")
        if password_hash is None:
            if password is None:
                raise ValueError("a password or a password hash is needed")
            password_hash = hash_password(password, scheme=scheme)
        else:
            try:
                check_hash(password_hash)
            except HashError as exc:
                raise ValueError(f"{kind} {name!r}: {exc}") from None
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO auth_rules VALUES (?, ?, ?, ?)",
                (kind, name, password_hash, int(superuser)),
            )

    def remove(self, kind: str, name: str) -> bool:
        with self._db:
            cursor = self._db.execute("DELETE FROM auth_rules WHERE kind = ? AND name = ?", (kind, name))
        return cursor.rowcount > 0

    def get(self, kind: str, name: str) -> UserRecord | None:
        row = self._db.execute(
            "SELECT password_hash, is_superuser FROM auth_rules WHERE kind = ? AND name = ?", (kind, name)
        ).fetchone()
        return None if row is None else UserRecord(kind, name, row[0], bool(row[1]))

    def list(self, kind: str | None = None) -> list[UserRecord]:
        query = "SELECT kind, name, password_hash, is_superuser FROM auth_rules"
        args: tuple[str, ...] = ()
        if kind is not None:
            query += " WHERE kind = ?"
            args = (kind,)
        rows = self._db.execute(query + " ORDER BY kind, name", args).fetchall()
        return [UserRecord(k, n, h, bool(s)) for k, n, h, s in rows]

    def check(self, client_id: str, username: str | None, password: bytes | None) -> tuple[bool | None, bool]:
        """``(decision, superuser)``: True allow, False deny, None no rule for this client."""
        records = [self.get("clientid", client_id)]
        if username:
            records.append(self.get("username", username))
        found = [r for r in records if r is not None]
        if not found:
            return None, False
        if password is None:
            return False, False
        for record in found:
            if verify_password(password, record.password_hash):
                return True, record.is_superuser
        return False, False

    # --- import / export

    def export_json(self) -> str:
        return json.dumps([r.as_dict() for r in self.list()], indent=2) + "\n"

    def export_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["kind", "name", "password_hash", "is_superuser"])
        for r in self.list():
            writer.writerow([r.kind, r.name, r.password_hash, "true" if r.is_superuser else "false"])
        return out.getvalue()

    def import_records(self, text: str, fmt: str) -> int:
        """Import JSON (a list of objects) or CSV (with a header row). Each record has ``kind`` (default
        username), ``name`` (or ``username``/``clientid``), and ``password`` or ``password_hash``, and
        optionally ``is_superuser``. Returns how many were imported; a bad record raises ValueError and
        imports nothing."""
        rows: list[dict[str, Any]]
        if fmt == "json":
            data = json.loads(text)
            if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
                raise ValueError("expected a JSON array of objects")
            rows = data
        elif fmt == "csv":
            rows = list(csv.DictReader(io.StringIO(text)))
        else:
            raise ValueError(f"unknown format {fmt!r}")
        records: list[tuple[str, str, str | None, str | None, bool]] = []
        for index, row in enumerate(rows, 1):
            kind = str(row.get("kind") or ("clientid" if row.get("clientid") else "username"))
            name = str(row.get("name") or row.get(kind) or "")
            password = row.get("password")
            stored = row.get("password_hash")
            superuser = row.get("is_superuser", False)
            if isinstance(superuser, str):
                superuser = superuser.strip().lower() in ("1", "true", "yes")
            if kind not in KINDS or not name or (not password and not stored):
                raise ValueError(f"record {index}: needs kind, name and password or password_hash")
            records.append((kind, name, str(password) if password else None, stored, bool(superuser)))
        for kind, name, _password, stored, _superuser in records:
            if stored:
                try:
                    check_hash(stored)
                except HashError as exc:
                    raise ValueError(f"{kind} {name!r}: {exc}") from None
        for kind, name, password, stored, superuser in records:
            self.add(kind, name, password, password_hash=stored or None, superuser=superuser)
        return len(records)
