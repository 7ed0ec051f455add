"""The edge-mode message store (core/store.py): a bounded, durable FIFO per stream on sqlite (issue 7).

Plain synchronous tests on ``tmp_path``: order per stream and across streams, the byte bound, durability
across close/reopen and across a ``SIGKILL``-ed writer, idempotent deletes, refusal of corrupt or foreign
files, and a hypothesis state machine against an in-memory model.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import core.store as store_module
from core.errors import MqgateError
from core.store import ROW_OVERHEAD, MessageStore, NewMessage, StoredMessage, StoreError, message_size

ROOT = Path(__file__).resolve().parents[2]
BIG = 1 << 30


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "buffer" / "store.db"


@pytest.fixture
def store(db: Path) -> Iterator[MessageStore]:
    with MessageStore(db, BIG) as opened:
        yield opened


def put(store: MessageStore, stream: str = "s", topic: str = "t", payload: bytes = b"x", qos: int = 1) -> int:
    """Append a message that must be accepted."""
    msg_id = store.append(stream, topic, payload, qos)
    assert msg_id is not None
    return msg_id


def _ids(messages: list[StoredMessage]) -> list[int]:
    return [m.id for m in messages]


# -- opening


def test_open_creates_the_directory_and_a_wal_database_with_the_schema(db: Path) -> None:
    assert not db.parent.exists()
    with MessageStore(db, BIG) as store:
        assert db.is_file()
        assert store.path == db
        assert store.count() == 0 and store.bytes() == 0 and store.streams() == []
        pragma = store._con.execute
        assert pragma("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert pragma("PRAGMA journal_mode").fetchone()[0] == "wal"
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = {row[1]: row[2] for row in con.execute("PRAGMA table_info(messages)")}
        assert columns == {
            "id": "INTEGER",
            "stream": "TEXT",
            "topic": "TEXT",
            "payload": "BLOB",
            "qos": "INTEGER",
            "retain": "INTEGER",
            "properties": "BLOB",
            "created": "REAL",
            "size": "INTEGER",
        }
        index = [row[2] for row in con.execute("PRAGMA index_info(messages_stream_id)")]
        assert index == ["stream", "id"]
    finally:
        con.close()


def test_max_bytes_must_be_positive(db: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MessageStore(db, 0)


def test_close_is_idempotent_and_a_closed_store_raises_store_error(db: Path) -> None:
    store = MessageStore(db, BIG)
    store.append("s", "t", b"x", 1)
    store.close()
    store.close()
    assert store.closed
    with pytest.raises(StoreError, match=re.escape(str(db))):
        store.append("s", "t", b"y", 1)
    with pytest.raises(StoreError):
        store.peek("s", 10)
    with pytest.raises(StoreError):
        store.delete([1])
    assert store.count() == 1
    with MessageStore(db, BIG) as reopened:
        assert reopened.count() == 1


# -- order


def test_peek_returns_a_streams_messages_in_append_order_with_every_field(store: MessageStore) -> None:
    first = store.append("dev-1", "a/b", b"\x00\x01binary\xff", 1, False, b"", 1_700_000_000.25)
    second = store.append("dev-1", "a/ü", b"", 2, True, b"\x01\x01", 1_700_000_001.5)
    assert first is not None and second is not None and second > first
    assert store.peek("dev-1", 10) == [
        StoredMessage(first, "dev-1", "a/b", b"\x00\x01binary\xff", 1, False, b"", 1_700_000_000.25),
        StoredMessage(second, "dev-1", "a/ü", b"", 2, True, b"\x01\x01", 1_700_000_001.5),
    ]
    assert isinstance(store.peek("dev-1", 1)[0].retain, bool)


def test_each_stream_is_fifo_and_ids_increase_across_streams(store: MessageStore) -> None:
    appended: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    all_ids = []
    for i in range(30):
        stream = "abc"[i * 7 % 3]
        msg_id = put(store, stream, f"t/{i}", str(i).encode())
        appended[stream].append(msg_id)
        all_ids.append(msg_id)
    assert all_ids == sorted(all_ids) and len(set(all_ids)) == 30
    for stream, ids in appended.items():
        assert _ids(store.peek(stream, 100)) == ids
    assert sorted(store.streams()) == ["a", "b", "c"]
    assert sorted(_ids(list(store))) == all_ids


def test_peek_pages_through_a_stream_with_limit_and_after_id(store: MessageStore) -> None:
    ids = [put(store, payload=bytes([i])) for i in range(10)]
    store.append("other", "t", b"x", 1)
    assert _ids(store.peek("s", 3)) == ids[:3]
    assert _ids(store.peek("s", 3, after_id=ids[2])) == ids[3:6]
    assert _ids(store.peek("s", 100, after_id=ids[8])) == ids[9:]
    assert store.peek("s", 5, after_id=ids[9]) == []
    assert store.peek("s", 0) == [] and store.peek("s", -1) == []
    assert store.peek("nobody", 10) == []


def test_peek_does_not_remove_anything(store: MessageStore) -> None:
    store.append("s", "t", b"x", 1)
    assert store.peek("s", 10) == store.peek("s", 10)
    assert store.count() == 1


def test_streams_lists_only_streams_with_pending_messages(store: MessageStore) -> None:
    a = put(store, "a")
    b = put(store, "b")
    assert sorted(store.streams()) == ["a", "b"]
    store.delete([a])
    assert store.streams() == ["b"]
    store.delete([b])
    assert store.streams() == []


def test_ids_are_not_reused_after_the_newest_message_is_deleted(store: MessageStore) -> None:
    first = put(store, payload=b"1")
    second = put(store, payload=b"2")
    store.delete([second])
    third = put(store, payload=b"3")
    assert third > second
    store.delete([second])  # a late delete of the old id must not touch the new message
    assert _ids(store.peek("s", 10)) == [first, third]


# -- the bound


def test_message_size_counts_utf8_topic_payload_properties_and_row_overhead() -> None:
    assert message_size("ü/t", b"12345", b"\x01\x02") == 4 + 5 + 2 + ROW_OVERHEAD
    assert message_size("", b"") == ROW_OVERHEAD


def test_a_full_store_rejects_appends_counts_them_and_accepts_again_after_deletes(db: Path) -> None:
    size = message_size("t/1", b"x" * 10)
    with MessageStore(db, 3 * size) as store:
        ids = [put(store, "s", "t/1", b"x" * 10) for _ in range(3)]
        assert store.bytes() == store.max_bytes == 3 * size  # exactly full is allowed
        assert store.append("s", "t/1", b"x" * 10, 1) is None
        assert store.append("other", "t/1", b"", 1) is None
        assert store.rejected_full == 2
        assert store.count() == 3 and store.count("other") == 0 and store.streams() == ["s"]
        assert len(store.peek("s", 10)) == 3
        store.delete([ids[0]])
        assert store.bytes() == 2 * size
        again = put(store, "s", "t/1", b"x" * 10)
        assert _ids(store.peek("s", 10)) == [ids[1], ids[2], again]
        assert store.rejected_full == 2


def test_a_message_larger_than_the_whole_bound_is_rejected_even_when_empty(db: Path) -> None:
    with MessageStore(db, 100) as store:
        assert store.append("s", "t", b"x" * 100, 1) is None
        assert store.count() == 0 and store.rejected_full == 1


def test_count_and_bytes_per_stream_and_in_total(store: MessageStore) -> None:
    store.append("a", "t", b"12", 1, properties=b"\x01")
    store.append("a", "tt", b"", 1)
    store.append("b", "t", b"1234", 2)
    a_bytes = message_size("t", b"12", b"\x01") + message_size("tt", b"")
    assert store.count("a") == 2 and store.bytes("a") == a_bytes
    assert store.count("b") == 1 and store.bytes("b") == message_size("t", b"1234")
    assert store.count() == 3 and store.bytes() == a_bytes + message_size("t", b"1234")
    assert store.count("none") == 0 and store.bytes("none") == 0


def test_append_many_accepts_in_order_what_fits_in_one_transaction(db: Path) -> None:
    size = message_size("t", b"x")
    with MessageStore(db, 3 * size) as store:
        result = store.append_many(
            [
                NewMessage("a", "t", b"x", 1),
                NewMessage("b", "t", b"x", 2, True, b"", 5.0),
                NewMessage("a", "t", b"xx", 1),  # does not fit after the two before it
                NewMessage("a", "t", b"x", 1),  # fits
                NewMessage("b", "t", b"x", 1),  # full
            ]
        )
        assert [r is None for r in result] == [False, False, True, False, True]
        assert store.rejected_full == 2
        assert _ids(store.peek("a", 10)) == [result[0], result[3]]
        assert store.peek("b", 10) == [StoredMessage(result[1] or -1, "b", "t", b"x", 2, True, b"", 5.0)]
        assert store.count() == 3 and store.bytes() == 3 * size
        assert store.append_many([]) == []
    with MessageStore(db, 3 * size) as reopened:
        assert sorted(_ids(list(reopened))) == [result[0], result[1], result[3]]


# -- deletes


@pytest.fixture(params=["json_each", "returning_each", "select_then_delete"])
def delete_strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each delete path: json_each batches, a DELETE ... RETURNING per id, SELECT+DELETE (sqlite < 3.35)."""
    strategy: str = request.param
    if strategy == "select_then_delete":
        monkeypatch.setattr(store_module, "_HAS_RETURNING", False)
    return strategy


def test_delete_is_idempotent_ignores_unknown_ids_and_keeps_totals(db: Path, delete_strategy: str) -> None:
    with MessageStore(db, BIG) as store:
        if delete_strategy == "returning_each":
            store._json = False
        ids = [put(store, "abc"[i % 3], "t", bytes(i)) for i in range(12)]
        assert store.delete([]) == 0
        assert store.delete([ids[0]]) == 1
        assert store.delete([ids[0]]) == 0
        assert store.delete(i for i in [ids[1], ids[1], ids[2], 10_000, -1]) == 2
        assert store.delete([10_001, 10_002]) == 0
        remaining = ids[3:]
        assert store.count() == 9
        assert store.bytes() == sum(message_size("t", bytes(i)) for i in range(3, 12))
        assert store.delete(list(reversed(remaining[:4]))) == 4
        assert sorted(_ids(list(store))) == remaining[4:]
        assert store.count("a") + store.count("b") + store.count("c") == 5
    with MessageStore(db, BIG) as reopened:
        assert sorted(_ids(list(reopened))) == remaining[4:]


# -- durability


def test_messages_totals_and_order_survive_close_and_reopen(db: Path) -> None:
    with MessageStore(db, 10_000) as store:
        for i in range(20):
            store.append(f"dev-{i % 4}", f"t/{i}", bytes([i]) * i, i % 3, bool(i % 2), bytes(i % 5), float(i))
        store.delete(_ids(store.peek("dev-0", 2)))
        before = {s: store.peek(s, 100) for s in store.streams()}
        totals = (store.count(), store.bytes(), {s: (store.count(s), store.bytes(s)) for s in before})
    with MessageStore(db, 10_000) as store:
        assert {s: store.peek(s, 100) for s in store.streams()} == before
        assert (store.count(), store.bytes(), {s: (store.count(s), store.bytes(s)) for s in before}) == totals
        newest = max(m.id for ms in before.values() for m in ms)
        assert put(store, "dev-0") > newest


def test_with_autocheckpoint_off_the_wal_grows_until_checkpoint_and_nothing_is_lost(db: Path) -> None:
    wal = Path(f"{db}-wal")
    with MessageStore(db, BIG, autocheckpoint=0) as store:
        ids = store.append_many([NewMessage("s", f"t/{i}", bytes(100), 1) for i in range(50)])
        for i in range(50):
            put(store, "s", f"u/{i}")
        grown = wal.stat().st_size
        assert grown > 50 * store_module.PAGE_SIZE
        store.checkpoint()
        assert wal.stat().st_size == 0
        store.delete([i for i in ids[:10] if i is not None])
        assert store.count() == 90
    with MessageStore(db, BIG) as reopened:
        assert reopened.count() == 90
        assert _ids(reopened.peek("s", 1)) == [ids[10]]


CHILD = """
import sys
from core.store import MessageStore
store = MessageStore(sys.argv[1], 1 << 30)
group = int(sys.argv[2])  # 1: each append commits; more: a group commit after that many
i = 0
while True:
    batch = []
    for i in range(i, i + group):
        payload = i.to_bytes(4, "big") * 8
        msg_id = store.append(f"dev-{i % 3}", f"t/{i}", payload, 1, False, b"", float(i), commit=group == 1)
        batch.append((i, msg_id))
    store.commit()
    for n, msg_id in batch:
        print("ok", n, msg_id, flush=True)
    i += 1
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("group", [1, 7], ids=["commit-each", "group-commit"])
def test_every_append_reported_committed_survives_a_sigkill_of_the_writer(db: Path, group: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(group)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if len(lines) >= 300:
                break
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()  # what it printed before dying was reported too
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert len(lines) >= 300, err
    assert proc.returncode == -signal.SIGKILL, err
    reported = {}
    for line in lines + rest.splitlines(keepends=True):
        match = re.fullmatch(r"ok (\d+) (\d+)\n", line)
        if match:  # a line cut short by the kill was never reported
            reported[int(match[2])] = int(match[1])
    with MessageStore(db, BIG) as store:
        stored = {m.id: m for m in store}
        lost = sorted(set(reported) - set(stored))
        assert not lost, f"{len(lost)} of {len(reported)} reported appends lost, the first: {lost[:5]}"
        for msg_id, i in reported.items():
            assert stored[msg_id] == StoredMessage(
                msg_id, f"dev-{i % 3}", f"t/{i}", i.to_bytes(4, "big") * 8, 1, False, b"", float(i)
            )
        assert sorted(stored) == list(range(1, len(stored) + 1))  # committed ones only, none torn
        assert store.count() == len(stored)
        assert store.bytes() == sum(message_size(m.topic, m.payload, m.properties) for m in stored.values())
        for stream in store.streams():
            sequence = [int(m.topic[2:]) for m in store.peek(stream, BIG)]
            assert sequence == sorted(sequence)


# -- group commit, deferred deletes, the memory tail


def die(store: MessageStore) -> None:
    """What the process dying leaves: the connection gone without a COMMIT (sqlite rolls back)."""
    store._con.close()
    store._closed = True


def test_uncommitted_appends_and_discards_are_visible_at_once_and_lost_without_commit(db: Path) -> None:
    with MessageStore(db, BIG) as store:
        kept = put(store)
        gone = store.append("s", "t", b"uncommitted", 1, commit=False)
        assert store.uncommitted and store.count() == 2
        assert _ids(store.peek("s", 10)) == [kept, gone]
        die(store)  # sqlite never saw a COMMIT
    with MessageStore(db, BIG) as store:
        assert _ids(list(store)) == [kept]
        assert store.discard([kept]) == 1
        assert store.uncommitted and store.count() == 0 and store.peek("s", 10) == []
        die(store)
    with MessageStore(db, BIG) as store:
        assert _ids(list(store)) == [kept]  # a deletion lost with the process: sent again, QoS 1 allows it
        later = store.append("s", "t", b"y", 1, commit=False)
        assert store.discard([kept]) == 1
        store.commit()
        assert not store.uncommitted
        die(store)
    with MessageStore(db, BIG) as store:
        assert _ids(list(store)) == [later]


def test_an_append_that_commits_carries_the_pending_discards(db: Path) -> None:
    with MessageStore(db, BIG) as store:
        first = put(store)
        store.discard([first])
        second = put(store)
        assert not store.uncommitted
        die(store)
    with MessageStore(db, BIG) as store:
        assert _ids(list(store)) == [second]


def test_close_commits_what_is_pending(db: Path) -> None:
    with MessageStore(db, BIG) as store:
        first = put(store)
        second = store.append("s", "t", b"y", 1, commit=False)
        store.discard([first])
    with MessageStore(db, BIG) as store:
        assert _ids(list(store)) == [second]


def test_nothing_is_written_before_the_commit_and_a_message_discarded_before_it_never_is(db: Path) -> None:
    with MessageStore(db, BIG) as store:
        sent = put(store)
        statements: list[str] = []
        store._con.set_trace_callback(statements.append)
        kept = store.append("s", "t", b"kept", 1, commit=False)
        delivered = store.append("s", "t", b"delivered", 1, commit=False)
        assert store.discard([sent, delivered]) == 2  # acknowledged upstream: one committed, one not yet
        assert statements == [] and store.uncommitted
        assert _ids(store.peek("s", 10)) == [kept]
        store.commit()
        assert [s.split()[0] for s in statements] == ["BEGIN", "INSERT", "DELETE", "COMMIT"]
        assert f"VALUES({kept}," in statements[1].replace(" ", "")
        die(store)
    with MessageStore(db, BIG) as store:
        assert [m.payload for m in store] == [b"kept"]


def test_a_failed_commit_forgets_its_appends_and_names_the_file(db: Path) -> None:
    with MessageStore(db, BIG) as store:
        first = put(store)
        assert store.append("s", "t", b"second", 1, commit=False) is not None
        store._next_id = first  # the next append takes the id of a stored message: its INSERT fails
        assert store.append("s", "t", b"clash", 1, commit=False) == first
        assert store.count() == 3
        with pytest.raises(StoreError, match=re.escape(str(db))):
            store.commit()
        assert not store.uncommitted
        assert store.count() == 1 and store.bytes() == message_size("t", b"x")
    with MessageStore(db, BIG) as store:
        assert [m.payload for m in store] == [b"x"]


def test_a_stream_over_the_cache_bound_is_read_from_the_file_until_it_is_empty(db: Path) -> None:
    size = message_size("t", b"x" * 10)
    with MessageStore(db, BIG, cache_bytes=3 * size) as store:
        ids = [put(store, "s", "t", b"x" * 10) for _ in range(5)]
        assert "s" not in store._tails  # the fourth did not fit: the stream went back to the file
        assert _ids(store.peek("s", 3, after_id=ids[0])) == ids[1:4]
        store.delete(ids)
        again = put(store, "s", "t", b"x" * 10)
        assert store._tails["s"] == {again: store.peek("s", 1)[0]}
        assert store._cached_bytes == size


def test_streams_of_an_earlier_run_are_read_from_the_file(db: Path) -> None:
    with MessageStore(db, BIG) as store:
        old = put(store, "old")
    with MessageStore(db, BIG) as store:
        assert store._tails == {}
        new = put(store, "old")
        fresh = put(store, "fresh")
        assert _ids(store.peek("old", 10)) == [old, new]
        assert set(store._tails) == {"fresh"} and _ids(store.peek("fresh", 10)) == [fresh]


# -- bad files


def _assert_refused_untouched(path: Path, match: str) -> None:
    before = path.read_bytes()
    with pytest.raises(StoreError, match=match) as info:
        MessageStore(path, BIG)
    assert str(path) in str(info.value)
    assert isinstance(info.value, MqgateError)
    assert path.read_bytes() == before


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"this is not sqlite " * 300)
    _assert_refused_untouched(path, "not a database")


def test_another_applications_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE readings (value REAL)")
    con.execute("INSERT INTO readings VALUES (1.5)")
    con.commit()
    con.close()
    _assert_refused_untouched(path, "not an mqgate message store")


def test_a_store_with_a_newer_schema_is_refused_untouched(db: Path) -> None:
    MessageStore(db, BIG).close()
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version = 99")
    con.close()
    _assert_refused_untouched(db, "schema version 99")


def test_a_store_with_a_corrupt_page_is_refused(db: Path) -> None:
    with MessageStore(db, BIG) as store:
        store.append_many([NewMessage("s", f"t/{i}", bytes(200), 1) for i in range(300)])
    data = bytearray(db.read_bytes())
    page = store_module.PAGE_SIZE
    data[page + 8 : 3 * page] = b"\xa5" * (2 * page - 8)  # the table's and the index's root pages
    db.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=re.escape(str(db))):
        MessageStore(db, BIG)
    assert db.read_bytes() == bytes(data)


def test_a_directory_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=re.escape(str(tmp_path))):
        MessageStore(tmp_path, BIG)


def test_a_second_store_on_the_same_file_is_refused_while_the_first_is_open(db: Path) -> None:
    with MessageStore(db, BIG) as first:
        first.append("s", "t", b"x", 1)
        with pytest.raises(StoreError, match="locked"):
            MessageStore(db, BIG)
        assert first.append("s", "t", b"y", 1) is not None
    with MessageStore(db, BIG) as reopened, pytest.raises(StoreError, match="locked"):
        MessageStore(db, BIG)
    assert reopened.closed


# -- against a model

_FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
"""tmpfs when there is one: the model test checks logic, and the disk's fsyncs would make it slow."""

_streams = st.sampled_from(["", "a", "dev/ü", "b"])
_messages = st.builds(
    NewMessage,
    stream=_streams,
    topic=st.text(st.characters(codec="utf-8"), max_size=8),
    payload=st.binary(max_size=64),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    properties=st.binary(max_size=6),
    created=st.floats(allow_nan=False),
)


class StoreMachine(RuleBasedStateMachine):
    """Random appends, batches, deletes, peeks and reopens against a dict of the pending messages."""

    MAX_BYTES = 500
    CACHE_BYTES = 200  # some streams in memory, some read from the file

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="mqgate-store-", dir=_FAST_TMP)
        self.path = os.path.join(self.directory, "store.db")
        self.store = MessageStore(self.path, self.MAX_BYTES, cache_bytes=self.CACHE_BYTES)
        self.model: dict[int, StoredMessage] = {}
        self.durable: dict[int, StoredMessage] = {}  # what a crash leaves
        self.rejected = 0
        self.newest = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory)

    def _apply(self, message: NewMessage, msg_id: int | None) -> None:
        size = message_size(message.topic, message.payload, message.properties)
        used = sum(message_size(m.topic, m.payload, m.properties) for m in self.model.values())
        if used + size > self.MAX_BYTES:
            assert msg_id is None
            self.rejected += 1
            return
        assert msg_id is not None and msg_id > self.newest
        self.newest = msg_id
        self.model[msg_id] = StoredMessage(msg_id, *message)

    @rule(message=_messages, commit=st.booleans())
    def append(self, message: NewMessage, commit: bool) -> None:
        msg_id = self.store.append(*message, commit=commit)
        self._apply(message, msg_id)
        if commit and msg_id is not None:
            self.durable = dict(self.model)

    @rule(messages=st.lists(_messages, max_size=5))
    def append_many(self, messages: list[NewMessage]) -> None:
        ids = self.store.append_many(messages)
        for message, msg_id in zip(messages, ids, strict=True):
            self._apply(message, msg_id)
        if any(i is not None for i in ids):  # committed, with whatever was pending
            self.durable = dict(self.model)

    @rule(
        picks=st.lists(st.integers(0, 1 << 20), max_size=6), others=st.lists(st.integers(-2, 99), max_size=2)
    )
    def delete(self, picks: list[int], others: list[int]) -> None:
        known = sorted(self.model)
        ids = [known[p % len(known)] for p in picks] if known else []
        ids += others
        expected = {i for i in ids if i in self.model}
        assert self.store.delete(ids) == len(expected)
        for i in expected:
            del self.model[i]
        self.durable = dict(self.model)

    @rule(pick=st.integers(0, 1 << 20))
    def discard(self, pick: int) -> None:
        known = sorted(self.model)
        if known:
            msg_id = known[pick % len(known)]
            assert self.store.discard([msg_id]) == 1
            del self.model[msg_id]

    @rule()
    def commit(self) -> None:
        self.store.commit()
        self.durable = dict(self.model)

    @rule()
    def crash(self) -> None:
        """The process dies: what was not committed is gone, deletions come back."""
        die(self.store)
        self.store = MessageStore(self.path, self.MAX_BYTES, cache_bytes=self.CACHE_BYTES)
        self.model = dict(self.durable)
        self.rejected = 0
        self.newest = max(self.model, default=0)

    @rule(stream=_streams, limit=st.integers(-1, 6), pick=st.integers(0, 1 << 20), after_known=st.booleans())
    def peek(self, stream: str, limit: int, pick: int, after_known: bool) -> None:
        known = [0, *sorted(self.model)]
        after = known[pick % len(known)] if after_known else pick % (self.newest + 2)
        expected = [m for i, m in sorted(self.model.items()) if m.stream == stream and i > after]
        assert self.store.peek(stream, limit, after) == expected[: max(limit, 0)]

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.durable = dict(self.model)
        self.store = MessageStore(self.path, self.MAX_BYTES, cache_bytes=self.CACHE_BYTES)
        self.rejected = 0
        self.newest = max(self.model, default=0)

    @invariant()
    def totals_match_the_model(self) -> None:
        sizes: dict[str, list[int]] = {}
        for m in self.model.values():
            sizes.setdefault(m.stream, []).append(message_size(m.topic, m.payload, m.properties))
        assert self.store.count() == len(self.model)
        assert self.store.bytes() == sum(map(sum, sizes.values())) <= self.MAX_BYTES
        assert sorted(self.store.streams()) == sorted(sizes)
        for stream, stream_sizes in sizes.items():
            assert self.store.count(stream) == len(stream_sizes)
            assert self.store.bytes(stream) == sum(stream_sizes)
        assert self.store.rejected_full == self.rejected


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=100, stateful_step_count=25, deadline=None)
