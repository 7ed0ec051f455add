"""Raw-socket MQTT 3.1.1 load generator used by ``bench/broker.py``.

One run is one publisher process and one subscriber process (all subscriber connections multiplexed with
epoll), both pinned to the load generator's cores. The publisher sends pre-encoded PUBLISH packets in
pipelined batches, patching only the send timestamp (and the packet id at QoS 1) in place; the subscriber
parses the byte stream itself, keeps partial packets across reads and answers QoS 1 deliveries with PUBACKs.

The publisher is not rate-limited, but it keeps the messages in the system (published x fan-out, minus
delivered) under a window sized to about ``BACKLOG_S`` seconds of the delivery rate seen so far, so a slow
broker is never buried under a backlog that would take minutes to drain. Every wait is bounded in time.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import select
import signal
import socket
import struct
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any

from _common import HOST, LoadError, reap

PAYLOAD_SIZE = 64
BATCH = 100
"""PUBLISH packets per ``sendall``."""
BACKLOG_S = 0.02
"""Target time the undelivered messages represent at the delivery rate seen so far."""
MIN_PUBLISHES = 4
MAX_WINDOW = 20_000
"""Bounds on undelivered messages: at least this many publishes, at most this many deliveries."""
IDLE_S = 1.0
"""Once the publisher has finished, give up after this long without a delivery."""
SETUP_TIMEOUT_S = 60.0
SOCKET_TIMEOUT_S = 10.0
LATENCY_SAMPLES = 200_000

_TIMESTAMP = struct.Struct(">Q")
_U16 = struct.Struct(">H")
_PUBACK = 0x40
_SUBSCRIBE_CHUNK = 100
_now_ns = time.monotonic_ns


@dataclass(frozen=True, slots=True)
class Load:
    """What one run does against a broker listening on ``HOST:port``."""

    port: int
    qos: int
    topics: tuple[str, ...]
    """The publisher cycles through these topics."""
    subscriptions: tuple[tuple[str, ...], ...]
    """Topic filters of each subscriber connection."""
    fanout: int
    """Deliveries each publish must cause."""
    count: int
    """Publishes at most."""
    seconds: float
    """Publishing stops after this long even if ``count`` is not reached."""
    drain_s: float
    """Longest wait for the remaining deliveries once publishing has stopped."""
    inflight: int = 100
    """QoS 1: unacknowledged PUBLISHes the publisher allows."""


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one run measured; times are in seconds."""

    published: int
    delivered: int
    expected: int
    seconds: float
    """From the first send to the last delivery."""
    msgs_per_s: float
    """Deliveries per second."""
    p50_ms: float | None
    p99_ms: float | None
    broker_cpu_s: float
    """CPU time of the broker process."""
    cpus_busy_s: float | None
    """Time the broker's and the load generator's CPUs were busy with anything (None when not pinned)."""
    load_cpu_s: float
    """CPU time of the publisher and subscriber processes: near ``seconds`` means the load generator, not
    the broker, was the bottleneck."""


# ---------------------------------------------------------------- encoding


def varint(n: int) -> bytes:
    """A Variable Byte Integer (MQTT 3.1.1 §2.2.3)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def utf8(text: str) -> bytes:
    """A length-prefixed UTF-8 string (MQTT 3.1.1 §1.5.3)."""
    raw = text.encode()
    return _U16.pack(len(raw)) + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + varint(len(body)) + body


def connect_packet(client_id: str) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, keep alive off (MQTT 3.1.1 §3.1)."""
    return _packet(0x10, utf8("MQTT") + bytes([4, 0x02]) + _U16.pack(0) + utf8(client_id))


def subscribe_packet(packet_id: int, filters: Sequence[str], qos: int) -> bytes:
    """SUBSCRIBE with one or more topic filters (MQTT 3.1.1 §3.8)."""
    return _packet(0x82, _U16.pack(packet_id) + b"".join(utf8(f) + bytes([qos]) for f in filters))


@dataclass(frozen=True, slots=True)
class _Batch:
    """Pre-encoded PUBLISH packets; ``ends[i]`` is where packet i ends in ``data``."""

    data: bytearray
    timestamp_at: tuple[int, ...]
    packet_id_at: tuple[int, ...]
    ends: tuple[int, ...]


def _encode_batches(topics: Sequence[str], qos: int) -> list[_Batch]:
    """PUBLISH packets for every topic, grouped into batches of at most ``BATCH`` (MQTT 3.1.1 §3.3)."""
    sequence = list(topics) * max(1, BATCH // len(topics))
    batches = []
    for start in range(0, len(sequence), BATCH):
        data = bytearray()
        timestamp_at, packet_id_at, ends = [], [], []
        for topic in sequence[start : start + BATCH]:
            topic_field = utf8(topic)
            id_size = 2 if qos else 0
            data += bytes([0x30 | qos << 1]) + varint(len(topic_field) + id_size + PAYLOAD_SIZE) + topic_field
            if qos:
                packet_id_at.append(len(data))
            timestamp_at.append(len(data) + id_size)
            data += bytes(id_size + PAYLOAD_SIZE)
            ends.append(len(data))
        batches.append(_Batch(data, tuple(timestamp_at), tuple(packet_id_at), tuple(ends)))
    return batches


# ---------------------------------------------------------------- framing


class _PacketReader:
    """Splits an MQTT byte stream into (first byte, body) packets, keeping a partial packet for later."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        packets, pos = [], 0
        while True:
            decoded = remaining_length(buf, pos + 1)
            if decoded is None or decoded[1] + decoded[0] > len(buf):
                break
            length, body_at = decoded
            packets.append((buf[pos], bytes(buf[body_at : body_at + length])))
            pos = body_at + length
        del buf[:pos]
        return packets


def remaining_length(buf: bytearray, at: int) -> tuple[int, int] | None:
    """(remaining length, offset of the body) from the varint at ``at``; None if incomplete (§2.2.3)."""
    value, shift = 0, 0
    for i in range(at, min(at + 4, len(buf))):
        value |= (buf[i] & 0x7F) << shift
        if buf[i] < 0x80:
            return value, i + 1
        shift += 7
    if len(buf) - at >= 4:
        raise LoadError("malformed remaining length from the broker")
    return None


def complete_packets(buf: bytearray) -> Iterator[tuple[int, int, int]]:
    """(first byte, offset of the body, remaining length) of each complete packet at the start of ``buf``;
    once exhausted, drops them from ``buf``, keeping a partial packet for the next read (§2.2)."""
    pos, end = 0, len(buf)
    while end - pos >= 2:
        first, length, body_at = buf[pos], buf[pos + 1], pos + 2
        if length & 0x80:
            decoded = remaining_length(buf, pos + 1)
            if decoded is None:
                break
            length, body_at = decoded
        if body_at + length > end:
            break
        yield first, body_at, length
        pos = body_at + length
    del buf[:pos]


def _expect(sock: socket.socket, reader: _PacketReader, packet_type: int, count: int) -> list[bytes]:
    """Block until ``count`` packets of ``packet_type`` arrived; returns their bodies."""
    bodies: list[bytes] = []
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while len(bodies) < count:
        if time.monotonic() > deadline:
            raise LoadError(f"timed out waiting for packet type {packet_type}")
        data = sock.recv(65536)
        if not data:
            raise LoadError("broker closed the connection during setup")
        bodies += [body for first, body in reader.feed(data) if first >> 4 == packet_type]
    return bodies


def connect(port: int, client_id: str) -> tuple[socket.socket, _PacketReader]:
    sock = socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id))
    reader = _PacketReader()
    connack = _expect(sock, reader, 2, 1)[0]
    if len(connack) != 2 or connack[1] != 0:
        sock.close()
        raise LoadError(f"CONNACK refused: {connack.hex()}")
    return sock, reader


def subscribe(sock: socket.socket, reader: _PacketReader, filters: Sequence[str], qos: int) -> None:
    """Pipelines SUBSCRIBEs of up to ``_SUBSCRIBE_CHUNK`` filters, then checks every SUBACK."""
    chunks = [filters[i : i + _SUBSCRIBE_CHUNK] for i in range(0, len(filters), _SUBSCRIBE_CHUNK)]
    sock.sendall(b"".join(subscribe_packet(n + 1, chunk, qos) for n, chunk in enumerate(chunks)))
    for body in _expect(sock, reader, 9, len(chunks)):
        if any(code >= 0x80 for code in body[2:]):
            raise LoadError(f"SUBACK refused a filter: {body.hex()}")


# ---------------------------------------------------------------- processes


def child_setup(cpus: set[int] | None) -> None:
    """Pins a load process; Ctrl-C is left to the parent, which stops the children itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpus:
        os.sched_setaffinity(0, cpus)


def _subscriber_main(
    load: Load,
    cpus: set[int] | None,
    delivered: ctypes.c_int64,
    published: ctypes.c_int64,
    results: mp.Queue[tuple[str, Any]],
) -> None:
    child_setup(cpus)
    socks: list[socket.socket] = []
    try:
        for i, filters in enumerate(load.subscriptions):
            sock, reader = connect(load.port, f"bench-sub{i}-{os.getpid()}")
            socks.append(sock)
            subscribe(sock, reader, filters, load.qos)
        results.put(("sub-ready", None))
        cpu0 = time.process_time()
        n, last, p50_ms, p99_ms = _receive(load, socks, delivered, published)
        results.put(("sub", (n, last, p50_ms, p99_ms, time.process_time() - cpu0)))
    except Exception as exc:
        results.put(("error", f"subscriber: {exc!r}"))
    finally:
        for sock in socks:
            sock.close()


def _receive(
    load: Load, socks: list[socket.socket], delivered: ctypes.c_int64, published: ctypes.c_int64
) -> tuple[int, int, float | None, float | None]:
    """Counts deliveries until all arrived or the run timed out.

    Returns (deliveries, monotonic ns of the last one, p50 and p99 latency in ms).
    """
    poller = select.epoll()
    by_fd = {sock.fileno(): (sock, bytearray()) for sock in socks}
    for fd, (sock, _) in by_fd.items():
        sock.setblocking(False)  # one recv() per wake-up: a socket with a timeout polls before each call
        poller.register(fd, select.EPOLLIN)
    every = max(1, load.count * load.fanout // LATENCY_SAMPLES)
    latencies = array("q")
    n = last = 0
    give_up = _now_ns() + int((load.seconds + SETUP_TIMEOUT_S) * 1e9)
    publisher_done = 0
    unpack_ts = _TIMESTAMP.unpack_from
    while True:
        t = _now_ns()
        if published.value >= 0:
            if n >= published.value * load.fanout:
                break
            if not publisher_done:
                publisher_done = t
                give_up = t + int(load.drain_s * 1e9)
            if t > max(last, publisher_done) + int(IDLE_S * 1e9):
                break
        if t > give_up:
            break
        for fd, _ in poller.poll(0.05):
            sock, buf = by_fd[fd]
            data = sock.recv(1 << 18)
            if not data:
                raise LoadError("broker closed a subscriber connection")
            t = _now_ns()
            buf += data
            n0 = n
            acks = bytearray()
            for first, body_at, _ in complete_packets(buf):
                if first >> 4 == 3:
                    p = body_at + 2 + (buf[body_at] << 8 | buf[body_at + 1])
                    if first & 0x06:
                        acks += b"\x40\x02"
                        acks += buf[p : p + 2]
                        p += 2
                    if n % every == 0:
                        latencies.append(t - unpack_ts(buf, p)[0])
                    n += 1
            if acks:
                send_all(sock, acks, "a subscriber's PUBACKs")
            if n != n0:
                last = t
                delivered.value = n
    ordered = sorted(latencies)
    return n, last, percentile_ms(ordered, 50), percentile_ms(ordered, 99)


def send_all(sock: socket.socket, data: bytes | bytearray, what: str) -> None:
    """``sendall`` for a non-blocking socket, waiting at most ``SOCKET_TIMEOUT_S`` for buffer space; raises
    LoadError saying the broker stopped reading ``what``."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            if not select.select([], [sock], [], SOCKET_TIMEOUT_S)[1]:
                raise LoadError(f"the broker stopped reading {what}") from None


def _publisher_main(
    load: Load,
    cpus: set[int] | None,
    go: Event,
    finished: Event,
    delivered: ctypes.c_int64,
    published: ctypes.c_int64,
    results: mp.Queue[tuple[str, Any]],
) -> None:
    child_setup(cpus)
    sent = 0
    try:
        sock, reader = connect(load.port, f"bench-pub-{os.getpid()}")
        with sock:
            batches = _encode_batches(load.topics, load.qos)
            results.put(("pub-ready", None))
            if not go.wait(SETUP_TIMEOUT_S):
                raise LoadError("never told to start")
            start, cpu0 = _now_ns(), time.process_time()
            sent = _publish(load, sock, reader, batches, delivered, start)
            published.value = sent  # tells the subscriber how many deliveries to wait for
            results.put(("pub", (start, time.process_time() - cpu0)))
            # Disconnect only once the subscriber is done: amqtt drops the PUBLISHes it has read but not yet
            # routed when the publisher's DISCONNECT arrives.
            finished.wait(load.drain_s + SETUP_TIMEOUT_S)
            sock.sendall(b"\xe0\x00")
    except Exception as exc:
        published.value = sent
        results.put(("error", f"publisher: {exc!r}"))


def _publish(
    load: Load,
    sock: socket.socket,
    reader: _PacketReader,
    batches: list[_Batch],
    delivered: ctypes.c_int64,
    start: int,
) -> int:
    """Sends batches until ``load.count`` or ``load.seconds`` is reached; returns how many were published."""
    stop = start + int(load.seconds * 1e9)
    sent = acked = packet_id = index = 0
    pack_ts, pack_id = _TIMESTAMP.pack_into, _U16.pack_into
    while sent < load.count:
        t = _now_ns()
        if t >= stop:
            break
        done = delivered.value
        room = (_window(done, t - start, load.fanout) - (sent * load.fanout - done)) // load.fanout
        if load.qos:
            if sent - acked >= load.inflight:
                acked += _count_pubacks(sock, reader, wait=True)
                continue
            room = min(room, load.inflight - (sent - acked))
        if room <= 0:
            time.sleep(0.0002)
            continue
        batch = batches[index % len(batches)]
        index += 1
        k = min(len(batch.ends), load.count - sent, room)
        for at in batch.timestamp_at[:k]:
            pack_ts(batch.data, at, t)
        for at in batch.packet_id_at[:k]:
            packet_id = packet_id % 65535 + 1
            pack_id(batch.data, at, packet_id)
        sock.sendall(memoryview(batch.data)[: batch.ends[k - 1]])
        sent += k
        if load.qos:
            acked += _count_pubacks(sock, reader, wait=False)
    ack_deadline = _now_ns() + int(load.drain_s * 1e9)
    while load.qos and acked < sent and _now_ns() < ack_deadline:
        acked += _count_pubacks(sock, reader, wait=True)
    return sent


def _window(delivered: int, elapsed_ns: int, fanout: int) -> int:
    """Deliveries allowed in the system: ``BACKLOG_S`` worth at the delivery rate so far, within bounds."""
    at_rate = int(delivered * BACKLOG_S * 1e9 / max(elapsed_ns, 1))
    return max(MIN_PUBLISHES * fanout, min(MAX_WINDOW, at_rate))


def _count_pubacks(sock: socket.socket, reader: _PacketReader, *, wait: bool) -> int:
    try:
        data = sock.recv(65536, 0 if wait else socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 0
    if not data:
        raise LoadError("broker closed the publisher connection")
    return sum(1 for first, _ in reader.feed(data) if first == _PUBACK)


# ---------------------------------------------------------------- a subscriber counting stamped messages


_STAMP = struct.Struct(">QI")
"""The first 12 payload bytes of a gateway benchmark's message: send time (monotonic ns), sequence number."""


@dataclass(frozen=True, slots=True)
class Received:
    """What a ``StampedSubscriber`` counted; times are monotonic ns."""

    delivered: int
    """Distinct messages (by the sequence number in the payload)."""
    duplicates: int
    last_ns: int
    p50_ms: float | None
    p99_ms: float | None
    """From the send time in the payload to the delivery."""
    cpu_s: float


@dataclass(frozen=True, slots=True)
class StampedSubscriber:
    """A subscriber process for the gateway benchmarks: one raw-socket connection taking ``topic_filter`` at
    QoS 0, counting messages stamped with ``_STAMP``."""

    port: int
    topic_filter: str
    client_id: str
    give_up_s: float
    """Longest run in all."""
    drain_s: float
    """Longest wait once the load is over."""
    latency_every: int
    """One latency is kept per this many messages."""

    @contextlib.contextmanager
    def started(self, cpus: set[int] | None) -> Iterator[Callable[[int], Received]]:
        """Runs the subscriber in a process of its own pinned to ``cpus`` and yields once it has subscribed;
        what it yields, given how many messages to expect, returns what the subscriber received. Tells it to
        stop and reaps it on the way out."""
        ctx = mp.get_context("fork")
        expected = ctx.RawValue(ctypes.c_int64, -1)
        results: mp.Queue[tuple[str, Any]] = ctx.Queue()
        inbox = Inbox(results)
        process = ctx.Process(target=self._main, args=(cpus, expected, results), daemon=True)

        def received(count: int) -> Received:
            expected.value = count
            got: Received = inbox.take("sub", self.drain_s + SETUP_TIMEOUT_S)
            return got

        try:
            process.start()
            inbox.take("sub-ready", SETUP_TIMEOUT_S)
            yield received
        finally:
            expected.value = max(expected.value, 0)  # a subscriber still waiting stops
            reap(process)
            results.close()

    def _main(
        self, cpus: set[int] | None, expected: ctypes.c_int64, results: mp.Queue[tuple[str, Any]]
    ) -> None:
        """Process target: puts ``("sub-ready", None)`` once subscribed, then ``("sub", Received)``."""
        child_setup(cpus)
        try:
            sock, reader = connect(self.port, self.client_id)
            with sock:
                subscribe(sock, reader, [self.topic_filter], 0)
                results.put(("sub-ready", None))
                results.put(("sub", self._receive(sock, expected)))
        except Exception as exc:
            results.put(("error", f"subscriber: {exc!r}"))

    def _receive(self, sock: socket.socket, expected: ctypes.c_int64) -> Received:
        """Counts deliveries until ``expected`` (-1 while the load goes on) distinct ones arrived, or none for
        ``IDLE_S`` once the load is over, or time runs out."""
        sock.setblocking(False)
        poller = select.epoll()
        poller.register(sock.fileno(), select.EPOLLIN)
        seen = bytearray()
        latencies = array("q")
        every = self.latency_every
        n = duplicates = last = done_at = 0
        give_up = _now_ns() + int(self.give_up_s * 1e9)
        buf = bytearray()
        unpack_stamp = _STAMP.unpack_from
        cpu0 = time.process_time()
        while True:
            t = _now_ns()
            if expected.value >= 0:
                if n >= expected.value:
                    break
                if not done_at:
                    done_at = t
                    give_up = min(give_up, t + int(self.drain_s * 1e9))
                if t > max(last, done_at) + int(IDLE_S * 1e9):
                    break
            if t > give_up:
                break
            if not poller.poll(0.05):
                continue
            data = sock.recv(1 << 18)
            if not data:
                raise LoadError("the broker closed the subscriber connection")
            t = _now_ns()
            buf += data
            for first, body_at, _ in complete_packets(buf):
                if first >> 4 == 3:  # PUBLISH at QoS 0: topic, then the payload
                    sent_ns, seq = unpack_stamp(buf, body_at + 2 + (buf[body_at] << 8 | buf[body_at + 1]))
                    if seq >= len(seen):
                        seen += bytes(seq + 65536 - len(seen))
                    if seen[seq]:
                        duplicates += 1
                    else:
                        seen[seq] = 1
                        if n % every == 0:
                            latencies.append(t - sent_ns)
                        n += 1
                        last = t
        poller.close()
        ordered = sorted(latencies)
        return Received(
            n,
            duplicates,
            last,
            percentile_ms(ordered, 50),
            percentile_ms(ordered, 99),
            time.process_time() - cpu0,
        )


# ---------------------------------------------------------------- one run


def percentile_ms(sorted_ns: Sequence[int], p: float) -> float | None:
    if not sorted_ns:
        return None
    return sorted_ns[min(len(sorted_ns) - 1, round(p / 100 * (len(sorted_ns) - 1)))] / 1e6


class Inbox:
    """Messages from the two load processes, taken by kind whatever order they arrived in."""

    def __init__(self, results: mp.Queue[tuple[str, Any]]) -> None:
        self._results = results
        self._early: dict[str, Any] = {}

    def take(self, kind: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while kind not in self._early:
            try:
                got, value = self._results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise LoadError(f"no {kind} message after {timeout:.0f} s") from None
            if got == "error":
                raise LoadError(value)
            self._early[got] = value
        return self._early.pop(kind)


def run(load: Load, cpus: set[int] | None, probe: Callable[[], tuple[float, float | None]]) -> RunResult:
    """Runs ``load`` once, with the load processes pinned to ``cpus``.

    ``probe`` returns the broker's CPU time and the busy time of the CPUs in use. It is called once every
    connection and subscription is in place, right before the start signal, and again after the last delivery.
    """
    ctx = mp.get_context("fork")
    delivered = ctx.RawValue(ctypes.c_int64, 0)
    published = ctx.RawValue(ctypes.c_int64, -1)
    results: mp.Queue[tuple[str, Any]] = ctx.Queue()
    inbox = Inbox(results)
    go, finished = ctx.Event(), ctx.Event()
    sub = ctx.Process(target=_subscriber_main, args=(load, cpus, delivered, published, results), daemon=True)
    pub = ctx.Process(
        target=_publisher_main, args=(load, cpus, go, finished, delivered, published, results), daemon=True
    )
    try:
        sub.start()
        inbox.take("sub-ready", SETUP_TIMEOUT_S * 2)
        pub.start()
        inbox.take("pub-ready", SETUP_TIMEOUT_S)
        cpu0, busy0 = probe()
        go.set()
        start_ns, pub_cpu_s = inbox.take("pub", load.seconds + load.drain_s + SETUP_TIMEOUT_S)
        n, last_ns, p50_ms, p99_ms, sub_cpu_s = inbox.take("sub", load.drain_s + SETUP_TIMEOUT_S)
        cpu1, busy1 = probe()
    finally:
        finished.set()
        published.value = max(published.value, 0)  # a subscriber still waiting stops
        reap(pub)
        reap(sub)
        results.close()
    seconds = (last_ns - start_ns) / 1e9 if n else 0.0
    return RunResult(
        published=published.value,
        delivered=n,
        expected=published.value * load.fanout,
        seconds=seconds,
        msgs_per_s=n / seconds if seconds > 0 else 0.0,
        p50_ms=p50_ms,
        p99_ms=p99_ms,
        broker_cpu_s=cpu1 - cpu0,
        cpus_busy_s=None if busy0 is None or busy1 is None else busy1 - busy0,
        load_cpu_s=pub_cpu_s + sub_cpu_s,
    )
