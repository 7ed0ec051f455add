"""A bounded, durable FIFO of outgoing MQTT messages on sqlite3 (edge-mode store-and-forward, bridges).

One :class:`MessageStore` is one sqlite database file. Messages belong to a *stream* (one per device
session, or a single shared stream, or one per bridge); each stream is delivered in append order, and the
store as a whole holds at most ``max_bytes`` of messages (see :func:`message_size`). It is the issue-7
buffer behind ``upstream.buffer_dir`` / ``upstream.max_buffer_bytes``: a QoS 1/2 publish is appended
(committed) *before* the device is acknowledged, and deleted once the upstream broker has acknowledged it.

Durability: :meth:`MessageStore.append`, :meth:`~MessageStore.append_many` and :meth:`~MessageStore.delete`
return only after their transaction is committed (together with anything still pending). ``append(...,
commit=False)`` leaves the commit to the caller's :meth:`~MessageStore.commit`, so that the appends of one
event-loop iteration share one commit (the caller acknowledges them after it). :meth:`~MessageStore.discard`
is the cheap delete of a hot path: the messages leave the store's view at once, but their deletion is only
written by the next commit, so a crash before it brings them back at the next open. The database runs in WAL
mode with ``synchronous=NORMAL``, so **a committed append survives the process dying** (crash, ``SIGKILL``,
restart); a power loss or an OS crash may lose the last transactions committed since the previous WAL
checkpoint (never corrupting the file), because commits are not fsync'ed one by one. A message whose delete
is lost either way is delivered again: QoS 1 allows duplicates.

Writes: nothing touches the file before a commit. Pending appends and discards wait in memory, and the commit
inserts the appends with one ``executemany``, deletes the discarded messages with another and commits, all
in one transaction: a few statements per commit, whatever the number of messages. A message discarded
before the commit that would have written it is never written: discarding means delivered, so a caller that
acknowledges its appends only after the commit has then acknowledged messages that are either durable here
or already delivered.

Bound: an append that would take the total over ``max_bytes`` is refused (``None``, counted in
:attr:`MessageStore.rejected_full`) and the caller answers the device with its congestion code (MQTT-SN rc
0x01, CoAP 5.03); nothing is ever dropped to make room. Totals (count and bytes, overall and per stream) are
kept in memory, loaded at open, so the bound check is O(1).

Ids are increasing integers (the order) and are never reused while the store is open, so a late delete of an
id cannot remove a newer message; after a reopen, new ids are larger than every pending id (an id deleted
before the restart may come back: nothing outlives the process holding it). They are assigned here rather
than by sqlite's ``AUTOINCREMENT``, which rewrites the ``sqlite_sequence`` page on every insert: one more WAL
frame per append (5 instead of 4 per append+delete, so a quarter more bytes written and checkpoints).

Reads: the pending messages of a stream that was empty when this process first appended to it are also
kept in memory (up to ``cache_bytes`` for all streams together), so :meth:`MessageStore.peek` of such a
stream reads no row back; a stream from an earlier run, or one that outgrew the cache, is read from the
file until it is empty again.

Threads and asyncio: the store is synchronous and imports no asyncio. A committed append or delete costs
tens of microseconds (no fsync on commit), which is small enough to call on the event-loop thread. The
exception is the commit that crosses sqlite's WAL checkpoint mark (every ``autocheckpoint`` pages, a few
hundred appends): it copies the WAL into the file and fsyncs twice, milliseconds on a slow disk; an owner that
cannot afford that stall on its loop opens the store with ``autocheckpoint=0`` and calls
:meth:`MessageStore.checkpoint` at a quiet moment. Use one store from one thread at a time. The database is
opened with ``locking_mode=EXCLUSIVE``: a second process (or a second store in this one) opening the same file
gets a :class:`StoreError` instead of interleaving deliveries. Close the store (or use ``with``): sqlite3
connections sit in a reference cycle, so an abandoned store keeps the file locked until garbage collection.

Errors: a file that is unreadable, corrupt (checked with ``PRAGMA quick_check`` at open), not an mqgate
store, or locked raises :class:`StoreError` naming the path and the cause; so does a failed write (disk
full, I/O error). The caller decides what to do; the store never deletes or rewrites data to recover.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from core.errors import MqgateError

__all__ = ["ROW_OVERHEAD", "MessageStore", "NewMessage", "StoreError", "StoredMessage", "message_size"]

APPLICATION_ID = 0x6D716774
"""``PRAGMA application_id`` of an mqgate message store (b"mqgt"), so that a foreign database is refused."""
SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of the schema below."""
PAGE_SIZE = 1024
"""Small pages: a commit writes whole pages to the WAL, and buffered IoT messages are small."""
ROW_OVERHEAD = 32
"""Bytes counted per message on top of topic, payload and properties: empty messages are bounded too."""

_SCHEMA = (
    "CREATE TABLE messages ("
    " id INTEGER PRIMARY KEY,"
    " stream TEXT NOT NULL,"
    " topic TEXT NOT NULL,"
    " payload BLOB NOT NULL,"
    " qos INTEGER NOT NULL,"
    " retain INTEGER NOT NULL,"
    " properties BLOB NOT NULL,"
    " created REAL NOT NULL,"
    " size INTEGER NOT NULL)",
    "CREATE INDEX messages_stream_id ON messages (stream, id)",
)
_INSERT = (
    "INSERT INTO messages (id, stream, topic, payload, qos, retain, properties, created, size)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_PEEK = (
    "SELECT id, topic, payload, qos, retain, properties, created FROM messages"
    " WHERE stream = ? AND id > ? ORDER BY id LIMIT ?"
)
_DELETE_ONE = "DELETE FROM messages WHERE id = ? RETURNING id, stream, size"
_DELETE_JSON = "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?)) RETURNING id, stream, size"
_SELECT_ONE = "SELECT id, stream, size FROM messages WHERE id = ?"
_DELETE_PLAIN = "DELETE FROM messages WHERE id = ?"
_TOTALS = "SELECT stream, count(*), sum(size) FROM messages GROUP BY stream ORDER BY min(id)"

_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)

_Row = tuple[int, str, str, bytes, int, int, bytes, float, int]
"""A pending append as :data:`_INSERT` writes it: id, stream, topic, payload, qos, retain, properties,
created, size."""


class StoreError(MqgateError):
    """The message store cannot be opened or written; the message names the database file and the cause."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A pending message as :meth:`MessageStore.peek` reads it; ``properties`` are encoded v5 properties."""

    id: int
    stream: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: bytes
    created: float


class NewMessage(NamedTuple):
    """A message for :meth:`MessageStore.append_many`: the arguments of :meth:`MessageStore.append`."""

    stream: str
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    properties: bytes = b""
    created: float = 0.0


def message_size(topic: str, payload: bytes, properties: bytes = b"") -> int:
    """What a message counts against ``max_bytes``: UTF-8 topic, payload, properties, :data:`ROW_OVERHEAD`."""
    return len(topic.encode()) + len(payload) + len(properties) + ROW_OVERHEAD


class MessageStore:
    """A bounded FIFO of outgoing messages per stream, in one sqlite file (see the module docstring).

    ``append`` commits and returns the message id (or ``None`` when full); ``peek`` reads a stream's oldest
    messages in order; ``delete`` removes delivered ones. ``count``/``bytes`` answer from memory.
    """

    __slots__ = (
        "_cache_bytes",
        "_cached_bytes",
        "_closed",
        "_con",
        "_doomed",
        "_execute",
        "_json",
        "_max_bytes",
        "_next_id",
        "_path",
        "_rows",
        "_streams",
        "_tail_of",
        "_tails",
        "_total_bytes",
        "_total_count",
        "rejected_full",
        "written",
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int,
        *,
        verify: bool = True,
        autocheckpoint: int = 1000,
        cache_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        """Open (creating the directory and the file if needed) the store at ``path``.

        ``verify`` runs ``PRAGMA quick_check`` (a read of the whole file) so that corruption is reported at
        open rather than in the middle of a delivery. ``autocheckpoint`` is sqlite's ``wal_autocheckpoint``
        in pages (see :meth:`checkpoint`). ``cache_bytes`` bounds the pending messages also kept in memory
        (see the module docstring; 0: none). Raises :class:`StoreError` naming the path and the cause.
        """
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._closed = True
        self._streams: dict[str, list[int]] = {}
        self._tails: dict[str, dict[int, StoredMessage]] = {}  # streams whose pending messages are in memory
        self._tail_of: dict[int, dict[int, StoredMessage]] = {}  # a cached message's id: its stream's tail
        self._rows: dict[int, _Row] = {}  # appended, written by the next commit
        self._doomed: list[int] = []  # cached messages discarded, deleted by the next commit
        self.written = 0  # messages inserted into the file (those discarded before a commit never are)
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._total_count = 0
        self._total_bytes = 0
        self._next_id = 1
        self._json = False
        self.rejected_full = 0
        """Appends refused because the store was full."""
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"message store {self._path}: cannot create its directory: {exc}") from exc
        try:
            con = sqlite3.connect(self._path, timeout=0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error("cannot open", exc) from exc
        self._con = con
        self._execute = con.execute
        try:
            self._open(verify, autocheckpoint)
        except BaseException as exc:
            con.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error("cannot open", exc) from exc
            raise
        self._closed = False

    def _error(self, what: str, exc: BaseException) -> StoreError:
        detail = str(exc) or type(exc).__name__
        if "locked" in detail:
            detail += " (is another mqgate using this buffer?)"
        return StoreError(f"message store {self._path}: {what}: {detail}")

    def _open(self, verify: bool, autocheckpoint: int) -> None:
        execute = self._execute
        execute(f"PRAGMA page_size = {PAGE_SIZE}")
        execute("PRAGMA locking_mode = EXCLUSIVE")
        # the lock first (a second user of the file fails here, not on the hot path), then look before
        # writing anything: a foreign or newer file is refused untouched
        execute("BEGIN EXCLUSIVE")
        try:
            app_id = execute("PRAGMA application_id").fetchone()[0]
            version = execute("PRAGMA user_version").fetchone()[0]
            tables = [row[0] for row in execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        finally:
            if self._con.in_transaction:
                execute("ROLLBACK")
        fresh = app_id == 0 and version == 0 and not tables
        if not fresh and app_id != APPLICATION_ID:
            raise StoreError(
                f"message store {self._path}: not an mqgate message store "
                f"(application_id {app_id:#x}, tables {sorted(tables)})"
            )
        if not fresh and version != SCHEMA_VERSION:
            raise StoreError(
                f"message store {self._path}: schema version {version}, this mqgate reads {SCHEMA_VERSION}"
            )
        mode = execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"message store {self._path}: cannot use WAL journal mode (got {mode!r})")
        execute("PRAGMA synchronous = NORMAL")
        execute(f"PRAGMA wal_autocheckpoint = {int(autocheckpoint)}")
        if fresh:
            execute("BEGIN EXCLUSIVE")
            try:
                for statement in _SCHEMA:
                    execute(statement)
                execute(f"PRAGMA application_id = {APPLICATION_ID}")
                execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                execute("COMMIT")
            except BaseException:
                if self._con.in_transaction:
                    execute("ROLLBACK")
                raise
        if verify:
            problems = [row[0] for row in execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise StoreError(f"message store {self._path}: corrupt: {'; '.join(map(str, problems))}")
        for stream, count, size in execute(_TOTALS):
            self._streams[stream] = [count, size]
            self._total_count += count
            self._total_bytes += size
        self._next_id = (execute("SELECT max(id) FROM messages").fetchone()[0] or 0) + 1
        try:
            self._json = (
                _HAS_RETURNING and execute("SELECT count(*) FROM json_each('[1]')").fetchone()[0] == 1
            )
        except sqlite3.OperationalError:
            self._json = False

    # -- writes

    def append(
        self,
        stream: str,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool = False,
        properties: bytes = b"",
        created: float = 0.0,
        *,
        commit: bool = True,
    ) -> int | None:
        """Store one message, committed on return; its id, or ``None`` when it would exceed ``max_bytes``.

        ``created`` is the caller's wall time (the store reads no clock). With ``commit=False`` the message
        waits in memory and is written, durable, by :meth:`commit` (group commit: one commit for the
        messages of a loop iteration); it is readable by :meth:`peek` at once.
        """
        size = len(topic.encode()) + len(payload) + len(properties) + ROW_OVERHEAD
        if self._total_bytes + size > self._max_bytes:
            self.rejected_full += 1
            return None
        if self._closed:
            raise StoreError(f"message store {self._path}: append failed: the store is closed")
        msg_id = self._next_id
        self._next_id = msg_id + 1
        self._rows[msg_id] = (
            msg_id,
            stream,
            topic,
            payload,
            qos,
            1 if retain else 0,
            properties,
            created,
            size,
        )
        self._count_in(
            stream, size, StoredMessage(msg_id, stream, topic, payload, qos, retain, properties, created)
        )
        if commit:  # with what is pending: one commit for all
            self.commit()
        return msg_id

    def _count_in(self, stream: str, size: int, message: StoredMessage) -> None:
        """Totals and the memory tail after an append."""
        self._total_count += 1
        self._total_bytes += size
        totals = self._streams.get(stream)
        tail: dict[int, StoredMessage] | None
        if totals is None:
            self._streams[stream] = [1, size]
            tail = self._tails[stream] = {}  # was empty: everything pending from now on is in memory
        else:
            totals[0] += 1
            totals[1] += size
            tail = self._tails.get(stream)
        if tail is None:
            return
        if self._cached_bytes + size > self._cache_bytes:
            self._uncache(stream)  # read from the file until the stream is empty again
            return
        tail[message.id] = message
        self._tail_of[message.id] = tail
        self._cached_bytes += size

    def _count_out(self, msg_id: int, stream: str, size: int) -> None:
        """Totals and the memory tail after a delete."""
        totals = self._streams[stream]
        totals[0] -= 1
        totals[1] -= size
        self._total_count -= 1
        self._total_bytes -= size
        tail = self._tail_of.pop(msg_id, None)
        if tail is not None:
            del tail[msg_id]
            self._cached_bytes -= size
        if not totals[0]:
            del self._streams[stream]
            self._uncache(stream)

    def _uncache(self, stream: str) -> None:
        tail = self._tails.pop(stream, None)
        if tail:
            self._cached_bytes -= sum(message_size(m.topic, m.payload, m.properties) for m in tail.values())
            tail_of = self._tail_of
            for msg_id in tail:
                del tail_of[msg_id]

    def append_many(self, messages: Iterable[NewMessage]) -> list[int | None]:
        """Like :meth:`append` for each message in order, in one transaction (committed on return).

        Each message is accepted if it fits after the ones accepted before it; the result holds its id or
        ``None`` at the same position. On a :class:`StoreError` none of them is stored.
        """
        ids = [self.append(*message, commit=False) for message in messages]
        if any(msg_id is not None for msg_id in ids):
            self.commit()
        return ids

    def delete(self, ids: Iterable[int]) -> int:
        """Remove messages by id, committed on return, in one transaction; the number actually removed.

        Unknown and already-deleted ids are ignored, so deleting twice is harmless.
        """
        removed = self.discard(ids)
        self.commit()
        return removed

    def discard(self, ids: Iterable[int]) -> int:
        """Like :meth:`delete`, but written by the next commit (an append, a delete, :meth:`commit`,
        :meth:`close`): gone from :meth:`peek` and the totals at once, back after a crash before that
        commit (see the module docstring). A message appended since the last commit is never written."""
        pending = self._rows
        tail_of = self._tail_of
        removed = 0
        unknown: list[int] = []  # neither pending nor in memory: deleted in the file now
        for msg_id in ids:
            row = pending.pop(msg_id, None)
            if row is not None:  # never written
                self._count_out(msg_id, row[1], row[8])
            elif (tail := tail_of.get(msg_id)) is not None:
                message = tail[msg_id]
                self._count_out(
                    msg_id, message.stream, message_size(message.topic, message.payload, message.properties)
                )
                self._doomed.append(msg_id)
            else:
                unknown.append(int(msg_id))
                continue
            removed += 1
        if not unknown:
            return removed
        try:
            self._write_pending()  # a doomed id among them is gone before the file is asked
            self._begin()
            if not _HAS_RETURNING:
                rows = self._delete_select(unknown)
            elif len(unknown) == 1:
                rows = self._execute(_DELETE_ONE, (unknown[0],)).fetchall()
            elif self._json:
                rows = self._execute(_DELETE_JSON, (json.dumps(unknown),)).fetchall()
            else:
                rows = [row for msg_id in unknown for row in self._execute(_DELETE_ONE, (msg_id,))]
        except sqlite3.Error as exc:
            raise self._failed("delete failed", exc) from exc
        for msg_id, stream, size in rows:
            self._count_out(msg_id, stream, size)
        return removed + len(rows)

    def commit(self) -> None:
        """Commit what :meth:`discard` and ``append(commit=False)`` left pending (nothing to do when nothing
        is)."""
        if self._rows or self._doomed or self._con.in_transaction:
            try:
                self._write_pending()
                self._execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._failed("commit failed", exc) from exc

    def _write_pending(self) -> None:
        """Insert the pending appends and delete the doomed messages in the open transaction (begun here
        if none is): one ``executemany`` each."""
        rows = self._rows
        doomed = self._doomed
        if not rows and not doomed:
            return
        self._begin()
        if rows:
            self._con.executemany(_INSERT, rows.values())
            self.written += len(rows)
            rows.clear()
        if doomed:
            self._con.executemany(_DELETE_PLAIN, [(msg_id,) for msg_id in doomed])
            doomed.clear()

    def _begin(self) -> None:
        if not self._con.in_transaction:
            self._execute("BEGIN")

    def _failed(self, what: str, exc: sqlite3.Error) -> StoreError:
        """Roll back the failed transaction and forget the pending appends (none of them is stored) and
        discards (those messages come back at the next open); name the cause."""
        if not self._closed and self._con.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._execute("ROLLBACK")
        for msg_id, stream, *_, size in list(self._rows.values()):
            self._count_out(msg_id, stream, size)
        self._rows.clear()
        self._doomed.clear()
        return self._error(what, exc)

    def _delete_select(self, ids: list[int]) -> list[Any]:
        """SELECT then DELETE per id (sqlite older than 3.35 has no RETURNING), in the open transaction."""
        execute = self._execute
        rows: list[Any] = []
        for msg_id in ids:
            row = execute(_SELECT_ONE, (msg_id,)).fetchone()
            if row is not None:
                execute(_DELETE_PLAIN, (msg_id,))
                rows.append(row)
        return rows

    # -- reads

    def peek(self, stream: str, limit: int, after_id: int = 0) -> list[StoredMessage]:
        """Up to ``limit`` of ``stream``'s pending messages with an id above ``after_id``, oldest first.

        Nothing is removed: :meth:`delete` the ones delivered. ``after_id`` lets a sender with messages in
        flight read the next ones without reading those again.
        """
        if limit <= 0 or stream not in self._streams:  # nothing pending: no read
            return []
        tail = self._tails.get(stream)
        if tail is not None:
            found: list[StoredMessage] = []
            for msg_id, message in tail.items():  # ids ascend; those at or below after_id are in flight
                if msg_id > after_id:
                    found.append(message)
                    if len(found) == limit:
                        break
            return found
        try:
            self._write_pending()
            rows = self._execute(_PEEK, (stream, after_id, limit)).fetchall()
        except sqlite3.Error as exc:
            raise self._failed("read failed", exc) from exc
        return [
            StoredMessage(msg_id, stream, topic, payload, qos, bool(retain), properties, created)
            for msg_id, topic, payload, qos, retain, properties, created in rows
        ]

    def streams(self) -> list[str]:
        """The streams with pending messages (no order is promised)."""
        return list(self._streams)

    def count(self, stream: str | None = None) -> int:
        """Pending messages, in all streams or in one."""
        if stream is None:
            return self._total_count
        totals = self._streams.get(stream)
        return totals[0] if totals is not None else 0

    @property
    def max_bytes(self) -> int:
        """The bound on :meth:`bytes` given at open."""
        return self._max_bytes

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending_deletes(self) -> bool:
        """Writes to the file wait for :meth:`commit` besides pending appends: deletes of written messages
        (or rows a read of a long stream had to write first)."""
        return not self._closed and bool(self._doomed or self._con.in_transaction)

    @property
    def uncommitted(self) -> bool:
        """Appends or discards wait for :meth:`commit`."""
        return not self._closed and bool(self._rows or self._doomed or self._con.in_transaction)

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and restart it (two fsyncs: milliseconds on a slow disk).

        sqlite does this by itself every ``autocheckpoint`` WAL pages, inside the commit that crosses the
        mark, so one append in a few hundred pays for it; an owner that opened the store with
        ``autocheckpoint=0`` calls this at a quiet moment instead (and must, or the WAL file keeps growing).
        """
        try:
            self._execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            raise self._error("checkpoint failed", exc) from exc

    def close(self) -> None:
        """Close the database (checkpointing the WAL into it); closing twice is harmless."""
        if self._closed:
            return
        try:
            self.commit()
        finally:
            self._closed = True
            self._tails.clear()
            self._tail_of.clear()
            self._cached_bytes = 0
            try:
                self._con.close()
            except sqlite3.Error as exc:
                raise self._error("close failed", exc) from exc

    def __enter__(self) -> MessageStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[StoredMessage]:
        """Every pending message, stream by stream (as :meth:`streams`), in order; for tools and tests."""
        for stream in self.streams():
            after = 0
            while batch := self.peek(stream, 512, after):
                yield from batch
                after = batch[-1].id

    def __repr__(self) -> str:
        used = f"{self._total_count} messages, {self._total_bytes}/{self._max_bytes} B"
        return f"<MessageStore {self._path} {used}>"

    def bytes(self, stream: str | None = None) -> int:  # defined last: the name shadows the builtin
        """Bytes counted against ``max_bytes`` (see :func:`message_size`), in all streams or in one."""
        if stream is None:
            return self._total_bytes
        totals = self._streams.get(stream)
        return totals[1] if totals is not None else 0
