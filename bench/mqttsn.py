"""MQTT-SN gateway benchmark: N clients publishing QoS 1 through mqgate's gateway to an MQTT subscriber.

For every number of clients N and window W, a fresh mqgate (pinned to one core) gets N simulated MQTT-SN
clients, each on its own UDP socket, all multiplexed on one epoll in this process (pinned to another core).
They CONNECT and REGISTER ``bench/sn/{i}``, then publish QoS 1 with W PUBLISHes outstanding per client, each
PUBACK releasing the next, while a raw-socket MQTT subscriber process takes ``bench/sn/#`` at QoS 0. Per cell
it prints delivered msgs/s, PUBACKs/s, p50/p99 latency, losses, mqgate's CPU time per message and resident
memory per connected client, next to the Eclipse Paho MQTT-SN gateway's figures; then one JSON line with every
figure. See bench/README.md.

    python bench/mqttsn.py [--quick] [--clients 1,100,10000] [--windows 1,8] [--max-in-flight 100]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import multiprocessing as mp
import os
import resource
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    BUSY_OTHER_PCT,
    HOST,
    START_TIMEOUT_S,
    Pinning,
    StartError,
    busy_seconds,
    cpu_seconds,
    free_port,
    mqgate_config,
    rss_bytes,
    running,
    sections_to_disable,
    socket_drops,
    tail,
)
from _loadgen import Inbox, LoadError, child_setup, connect, percentile_ms, remaining_length, subscribe

REFERENCE_MSGS_PER_S = {1: 8_600, 8: 23_500}
"""Eclipse Paho MQTT-SN gateway (C++) in front of mosquitto on this kind of machine, by window: one client,
QoS 1, 16-byte payloads."""
CLIENTS = (1, 100, 10_000)
WINDOWS = (1, 8)
COUNT, QUICK_COUNT = 60_000, 6_000
"""Messages published per cell."""
RUN_S, QUICK_RUN_S = 5.0, 1.0
"""Publishing stops after this long even if the count is not reached."""
DRAIN_S = 5.0
"""Longest wait for outstanding PUBACKs and the last deliveries once publishing has stopped."""
IDLE_S = 1.0
"""Once publishing has stopped, the subscriber gives up after this long without a delivery."""
RETRY_S = 1.0
"""An unanswered CONNECT, REGISTER or PUBLISH is sent again after this long (MQTT-SN's T_retry, shortened)."""
MAX_IN_FLIGHT = 100
"""Unanswered datagrams of all clients together, by default: the gateway socket's receive queue (Linux's
default 208 KiB) holds about 125-250 small datagrams, and drops what it has no room for."""
SETUP_TIMEOUT_S = 60.0
SPARE_FILES = 100
"""File descriptors this process needs besides the clients' sockets."""
KEEPALIVE_S = 300
LATENCY_SAMPLES = 200_000
TOPIC = "bench/sn/{}"
SUBSCRIPTION = "bench/sn/#"

# MQTT-SN 1.2 datagrams, built and parsed here rather than with the gateway's codec (§5.2, §5.4)
_SEARCHGW = bytes((3, 0x01, 0))
_GWINFO, _CONNACK, _REGACK, _PUBACK = 0x02, 0x05, 0x0B, 0x0D
_CONNECT_CLEAN_SESSION, _PROTOCOL_ID = 0x04, 0x01
_PUBLISH = struct.Struct(">BBBHHQI4x")
"""Length, PUBLISH, flags, topic id, msg id, then the 16-byte payload: send time (monotonic ns), sequence
number, 4 zero bytes."""
_PUBLISH_QOS1, _DUP = 0x20, 0x80
_ACK = struct.Struct(">BBHHB")
"""REGACK and PUBACK: length, type, topic id, msg id, return code."""
_STAMP = struct.Struct(">QI")
_now_ns = time.monotonic_ns


def connect_datagram(client_id: str) -> bytes:
    """CONNECT, clean session, no will (§5.4.4)."""
    body = struct.pack(">BBBH", 0x04, _CONNECT_CLEAN_SESSION, _PROTOCOL_ID, KEEPALIVE_S) + client_id.encode()
    return bytes((len(body) + 1,)) + body


def register_datagram(msg_id: int, topic: str) -> bytes:
    """REGISTER from a client: topic id 0 (§5.4.10)."""
    body = struct.pack(">BHH", 0x0A, 0, msg_id) + topic.encode()
    return bytes((len(body) + 1,)) + body


# ---------------------------------------------------------------- the clients


@dataclass(frozen=True, slots=True)
class Published:
    """What the clients' publishing phase saw; times are monotonic ns."""

    sent: int
    """Distinct PUBLISHes, not counting retransmissions."""
    acked: int
    refused: int
    """PUBACKs with a return code other than 0 (accepted)."""
    unacked: int
    """Still unacknowledged when the drain time ran out."""
    resent: int
    unexpected: int
    """Datagrams other than a PUBACK for an outstanding PUBLISH."""
    start_ns: int
    last_ack_ns: int
    cpu_s: float


class Clients:
    """N MQTT-SN clients, each its own non-blocking UDP socket connected to the gateway, on one epoll."""

    def __init__(self, n: int, port: int) -> None:
        self.socks: list[socket.socket] = []
        self.poller = select.epoll()
        self.client_of: dict[int, int] = {}
        self.topic_ids = [0] * n
        self.setup_resent = 0
        try:
            for i in range(n):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.socks.append(sock)
                sock.setblocking(False)
                sock.connect((HOST, port))
                self.poller.register(sock.fileno(), select.EPOLLIN)
                self.client_of[sock.fileno()] = i
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.poller.close()
        for sock in self.socks:
            sock.close()

    def connect(self) -> None:
        """CONNECT every client and check every CONNACK."""
        answers = self._exchange([connect_datagram(f"bench-{i}") for i in range(len(self.socks))], _CONNACK)
        for i, answer in enumerate(answers):
            if len(answer) != 3 or answer[2] != 0:
                raise LoadError(f"client {i}: CONNACK {answer.hex()}")

    def register(self) -> None:
        """REGISTER every client's topic and keep the topic ids from the REGACKs."""
        answers = self._exchange(
            [register_datagram(1, TOPIC.format(i)) for i in range(len(self.socks))], _REGACK
        )
        for i, answer in enumerate(answers):
            if len(answer) != _ACK.size:
                raise LoadError(f"client {i}: malformed REGACK {answer.hex()}")
            _, _, topic_id, _, code = _ACK.unpack(answer)
            if code != 0:
                raise LoadError(f"client {i}: REGACK return code {code:#04x}")
            self.topic_ids[i] = topic_id

    def _exchange(self, requests: Sequence[bytes], answer_type: int) -> list[bytes]:
        """Sends ``requests[i]`` from client i, at most ``MAX_IN_FLIGHT`` unanswered at a time, each again
        after ``RETRY_S`` without an answer; returns every client's first answer of ``answer_type``."""
        answers: list[bytes | None] = [None] * len(requests)
        waiting: dict[int, float] = {}  # client -> when its request was last sent, oldest first
        following = iter(range(len(requests)))
        done = 0
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while done < len(requests):
            now = time.monotonic()
            if now > deadline:
                raise LoadError(
                    f"{len(requests) - done} of {len(requests)} clients got no answer of type "
                    f"{answer_type:#04x} after {SETUP_TIMEOUT_S:.0f} s"
                )
            for i in itertools.islice(following, MAX_IN_FLIGHT - len(waiting)):
                self.socks[i].send(requests[i])
                waiting[i] = now
            expired = []
            for i, sent_at in waiting.items():
                if now - sent_at <= RETRY_S:
                    break
                expired.append(i)
            for i in expired:
                del waiting[i]
                self.socks[i].send(requests[i])
                waiting[i] = now
                self.setup_resent += 1
            for fd, _ in self.poller.poll(0.05):
                i = self.client_of[fd]
                data = self.socks[i].recv(256)
                if len(data) >= 2 and data[1] == answer_type and i in waiting:
                    del waiting[i]
                    answers[i] = data
                    done += 1
        return [a for a in answers if a is not None]  # all of them by now

    def publish(self, window: int, max_in_flight: int, count: int, seconds: float) -> Published:
        """QoS 1 PUBLISHes, ``window`` outstanding per client, each PUBACK releasing that client's next, until
        ``count`` were sent or ``seconds`` passed; then waits at most ``DRAIN_S`` for the last PUBACKs.

        With more than ``max_in_flight`` window slots in all, clients with a free slot take turns as PUBACKs
        free room. An unacknowledged PUBLISH is sent again, with DUP set, every ``RETRY_S``."""
        socks, topic_ids, client_of, poll = self.socks, self.topic_ids, self.client_of, self.poller.poll
        outstanding: list[dict[int, bytes]] = [{} for _ in socks]  # per client: msg id -> datagram
        msg_ids = [0] * len(socks)
        ready = deque(i for _ in range(window) for i in range(len(socks)))  # one entry per free window slot
        retry: deque[tuple[int, int, int, bytes]] = deque()  # (sent at, client, msg id, datagram), by time
        retry_ns = int(RETRY_S * 1e9)
        pack = _PUBLISH.pack
        sent = acked = refused = resent = unexpected = in_flight = 0
        cpu0 = time.process_time()
        start = last_ack = t = _now_ns()
        stop, drain_until = start + int(seconds * 1e9), 0
        while True:
            if not drain_until:
                if sent < count and t < stop:
                    while ready and sent < count and in_flight < max_in_flight:
                        i = ready.popleft()
                        msg_id = msg_ids[i] = msg_ids[i] % 0xFFFF + 1
                        datagram = pack(
                            _PUBLISH.size, 0x0C, _PUBLISH_QOS1, topic_ids[i], msg_id, _now_ns(), sent
                        )
                        socks[i].send(datagram)
                        outstanding[i][msg_id] = datagram
                        retry.append((t, i, msg_id, datagram))
                        sent += 1
                        in_flight += 1
                else:
                    drain_until = t + int(DRAIN_S * 1e9)
            if drain_until and (not in_flight or t > drain_until):
                break
            events = poll(0.01)
            t = _now_ns()
            for fd, _ in events:
                i = client_of[fd]
                data = socks[i].recv(256)
                if len(data) != _ACK.size or data[1] != _PUBACK:
                    unexpected += 1
                elif outstanding[i].pop(data[4] << 8 | data[5], None) is None:
                    unexpected += 1  # a second PUBACK for a PUBLISH that was sent again
                else:
                    in_flight -= 1
                    if data[6]:
                        refused += 1
                    else:
                        acked += 1
                    ready.append(i)
                    last_ack = t
            while retry and retry[0][0] < t - retry_ns:
                _, i, msg_id, datagram = retry.popleft()
                if outstanding[i].get(msg_id) is datagram:
                    datagram = bytes((datagram[0], datagram[1], datagram[2] | _DUP)) + datagram[3:]
                    socks[i].send(datagram)
                    outstanding[i][msg_id] = datagram
                    retry.append((t, i, msg_id, datagram))
                    resent += 1
        return Published(
            sent, acked, refused, in_flight, resent, unexpected, start, last_ack, time.process_time() - cpu0
        )


# ---------------------------------------------------------------- the subscriber


@dataclass(frozen=True, slots=True)
class Received:
    delivered: int
    """Distinct messages."""
    duplicates: int
    last_ns: int
    p50_ms: float | None
    p99_ms: float | None
    cpu_s: float


def _subscriber_main(
    port: int,
    count: int,
    cpus: set[int] | None,
    expected: ctypes.c_int64,
    results: mp.Queue[tuple[str, Any]],
) -> None:
    child_setup(cpus)
    try:
        sock, reader = connect(port, f"bench-sn-sub-{os.getpid()}")
        with sock:
            subscribe(sock, reader, [SUBSCRIPTION], 0)
            results.put(("sub-ready", None))
            results.put(("sub", _receive(sock, count, expected)))
    except Exception as exc:
        results.put(("error", f"subscriber: {exc!r}"))


def _receive(sock: socket.socket, count: int, expected: ctypes.c_int64) -> Received:
    """Counts deliveries (message sequence numbers below ``count``) until ``expected`` (-1 while publishing
    goes on) distinct ones arrived, or none for ``IDLE_S`` once publishing is over, or time runs out."""
    sock.setblocking(False)
    poller = select.epoll()
    poller.register(sock.fileno(), select.EPOLLIN)
    seen = bytearray(count)
    every = max(1, count // LATENCY_SAMPLES)
    latencies = array("q")
    n = duplicates = last = publisher_done = 0
    give_up = _now_ns() + int((2 * SETUP_TIMEOUT_S + RUN_S + DRAIN_S) * 1e9)
    buf = bytearray()
    unpack_stamp = _STAMP.unpack_from
    cpu0 = time.process_time()
    while True:
        t = _now_ns()
        if expected.value >= 0:
            if n >= expected.value:
                break
            if not publisher_done:
                publisher_done = t
                give_up = t + int(DRAIN_S * 1e9)
            if t > max(last, publisher_done) + int(IDLE_S * 1e9):
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
            if first >> 4 == 3:  # PUBLISH at QoS 0: topic, then the payload
                sent_ns, seq = unpack_stamp(buf, body_at + 2 + (buf[body_at] << 8 | buf[body_at + 1]))
                if seen[seq]:
                    duplicates += 1
                else:
                    seen[seq] = 1
                    if n % every == 0:
                        latencies.append(t - sent_ns)
                    n += 1
                    last = t
            pos = body_at + length
        del buf[:pos]
    ordered = sorted(latencies)
    return Received(
        n,
        duplicates,
        last,
        percentile_ms(ordered, 50),
        percentile_ms(ordered, 99),
        time.process_time() - cpu0,
    )


# ---------------------------------------------------------------- one cell


@dataclass(slots=True)
class Cell:
    """One (clients, window) run, filled in as it goes."""

    clients: int
    window: int
    error: str | None = None
    in_flight: int | None = None
    """Most unacknowledged PUBLISHes of all clients together."""
    published: Published | None = None
    received: Received | None = None
    connect_s: float | None = None
    """Time to CONNECT and REGISTER every client."""
    setup_resent: int = 0
    rss_before: int | None = None
    rss_connected: int | None = None
    rss_end: int | None = None
    gateway_cpu_s: float = 0.0
    cpus_busy_s: float | None = None
    socket_drops: int | None = None
    """Datagrams the kernel dropped at the gateway's socket (its receive queue was full) while publishing."""
    log_lines: int = 0
    log_tail: str = ""

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clients": self.clients,
            "window": self.window,
            "error": self.error,
            "in_flight": self.in_flight,
            "connect_s": self.connect_s,
            "setup_resent": self.setup_resent,
            "rss_before": self.rss_before,
            "rss_connected": self.rss_connected,
            "rss_end": self.rss_end,
            "rss_per_client_bytes": (
                None
                if self.rss_before is None or self.rss_connected is None
                else (self.rss_connected - self.rss_before) / self.clients
            ),
            "log_lines": self.log_lines,
            "log_tail": self.log_tail,
        }
        p, r = self.published, self.received
        if p is None or r is None:
            return out
        seconds = (r.last_ns - p.start_ns) / 1e9 if r.delivered else 0.0
        ack_seconds = (p.last_ack_ns - p.start_ns) / 1e9
        load_cpu_s = p.cpu_s + r.cpu_s
        reference = REFERENCE_MSGS_PER_S.get(self.window)
        msgs_per_s = r.delivered / seconds if seconds > 0 else 0.0
        return out | {
            "published": asdict(p),
            "received": asdict(r),
            "seconds": seconds,
            "msgs_per_s": msgs_per_s,
            "puback_msgs_per_s": p.acked / ack_seconds if ack_seconds > 0 else 0.0,
            "p50_ms": r.p50_ms,
            "p99_ms": r.p99_ms,
            "lost": p.sent - p.refused - r.delivered,
            "gateway_cpu_us_per_msg": self.gateway_cpu_s * 1e6 / r.delivered if r.delivered else None,
            "gateway_cpu_pct": _pct(self.gateway_cpu_s, seconds),
            "load_cpu_pct": _pct(load_cpu_s, seconds),
            "other_cpu_pct": (
                None
                if self.cpus_busy_s is None
                else _pct(self.cpus_busy_s - self.gateway_cpu_s - load_cpu_s, seconds)
            ),
            "socket_drops": self.socket_drops,
            "reference_msgs_per_s": reference,
            "ratio_to_reference": msgs_per_s / reference if reference else None,
        }


def _pct(part: float, whole: float) -> float | None:
    return 100 * part / whole if whole else None


def _write_config(path: Path, tcp_port: int, udp_port: int, clients: int, disabled: list[str]) -> None:
    path.write_text(
        f'[listeners.tcp]\nbind = "{HOST}:{tcp_port}"\n\n'
        "[broker]\nmax_mqueue_len = 1000000\n\n"
        f'[gateways.mqttsn]\nbind = "{HOST}:{udp_port}"\nadvertise_interval = 0\n'
        f"max_clients = {max(clients, 10_000)}\n\n"
        + "".join(f"[{name}]\nenabled = false\n\n" for name in disabled)
        + '[log]\nlevel = "warning"\n'
    )


def _wait_gateway(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Returns once the gateway answers SEARCHGW with GWINFO (§6.1)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((HOST, port))
        sock.settimeout(0.2)
        while time.monotonic() < deadline and proc.poll() is None:
            sock.send(_SEARCHGW)
            try:
                if sock.recv(256)[1:2] == bytes((_GWINFO,)):
                    return
            except (TimeoutError, ConnectionRefusedError):
                pass
    raise StartError(f"the MQTT-SN gateway did not answer SEARCHGW on udp port {port}")


@dataclass(frozen=True, slots=True)
class Settings:
    count: int
    """Messages to publish per cell."""
    seconds: float
    """Publishing stops after this long even if ``count`` is not reached."""
    max_in_flight: int
    """Unacknowledged PUBLISHes of all clients together; 0: no limit but the clients' windows."""


def _run_cell(cell: Cell, settings: Settings, workdir: Path, pinning: Pinning, disabled: list[str]) -> None:
    """Runs ``cell`` on a fresh mqgate and fills it in; raises StartError if mqgate does not start."""
    _, open_files = resource.getrlimit(resource.RLIMIT_NOFILE)
    if cell.clients + SPARE_FILES > open_files:
        cell.error = f"{cell.clients:,} clients need as many sockets: the open files limit is {open_files:,}"
        return
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    config = workdir / f"mqgate-{cell.clients}x{cell.window}.toml"
    log = config.with_suffix(".log")
    _write_config(config, tcp_port, udp_port, cell.clients, disabled)
    ctx = mp.get_context("fork")
    expected = ctx.RawValue(ctypes.c_int64, -1)
    results: mp.Queue[tuple[str, Any]] = ctx.Queue()
    sub = ctx.Process(
        target=_subscriber_main, args=(tcp_port, settings.count, pinning.load, expected, results), daemon=True
    )
    argv = [sys.executable, "-m", "core.cli", "--config", str(config)]
    try:
        with running(argv, log, tcp_port, pinning.broker) as proc:
            _wait_gateway(udp_port, proc)
            sub.start()
            inbox = Inbox(results)
            inbox.take("sub-ready", SETUP_TIMEOUT_S)
            published = _publish(cell, settings, udp_port, proc.pid, pinning.cpus)
            expected.value = published.sent - published.refused
            cell.received = inbox.take("sub", DRAIN_S + SETUP_TIMEOUT_S)
            if proc.poll() is not None:
                raise LoadError(f"mqgate exited with code {proc.returncode} during the run")
            cell.rss_end = rss_bytes(proc.pid)
    except (LoadError, OSError) as exc:
        cell.error = str(exc) or repr(exc)
    finally:
        expected.value = max(expected.value, 0)  # a subscriber still waiting stops
        if sub.pid is not None:
            sub.join(5)
            if sub.is_alive():
                sub.kill()
                sub.join(5)
        results.close()
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        cell.log_lines, cell.log_tail = len(lines), tail("\n".join(lines), 10)


def _publish(cell: Cell, settings: Settings, udp_port: int, pid: int, cpus: set[int] | None) -> Published:
    """Connects the clients (memory measured around it), then publishes (CPU time measured around it)."""
    cell.rss_before = rss_bytes(pid)
    t0 = time.monotonic()
    clients = Clients(cell.clients, udp_port)
    try:
        clients.connect()
        clients.register()
        cell.connect_s = time.monotonic() - t0
        cell.setup_resent = clients.setup_resent
        cell.rss_connected = rss_bytes(pid)
        drops0 = socket_drops(udp_port)
        cpu0, busy0 = cpu_seconds(pid), busy_seconds(cpus) if cpus else None
        in_flight = cell.clients * cell.window
        cell.in_flight = min(in_flight, settings.max_in_flight or in_flight)
        cell.published = clients.publish(cell.window, cell.in_flight, settings.count, settings.seconds)
        cell.gateway_cpu_s = cpu_seconds(pid) - cpu0
        if busy0 is not None and cpus:
            cell.cpus_busy_s = busy_seconds(cpus) - busy0
        drops1 = socket_drops(udp_port)
        if drops0 is not None and drops1 is not None:
            cell.socket_drops = drops1 - drops0
        return cell.published
    finally:
        clients.close()


# ---------------------------------------------------------------- report


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


_COLUMNS = (  # header, width
    ("clients", 7),
    ("window", 6),
    ("in flight", 9),
    ("msgs/s", 9),
    ("pubacks/s", 9),
    ("p50 ms", 7),
    ("p99 ms", 7),
    ("lost", 6),
    ("resent", 6),
    ("drops", 6),
    ("cpu us/msg", 10),
    ("mqgate cpu", 10),
    ("load cpu", 8),
    ("other cpu", 9),
    ("B/client", 8),
    ("x paho", 6),
)


def _line(cells: list[str]) -> str:
    return "  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, _COLUMNS, strict=False))


def _print_table(cells: list[Cell]) -> None:
    print()
    print(
        "reference, Eclipse Paho MQTT-SN gateway (C++) + mosquitto, 1 client, QoS 1, 16-byte payloads: "
        + ", ".join(f"{rate:,} msgs/s with window {w}" for w, rate in REFERENCE_MSGS_PER_S.items())
    )
    print(_line([header for header, _ in _COLUMNS]))
    flagged = False
    for cell in cells:
        f = cell.figures()
        row = [f"{cell.clients:,}", str(cell.window), _fmt(cell.in_flight, ",d")]
        if "msgs_per_s" not in f:
            print(_line(row) + f"  failed: {cell.error}")
            continue
        published: dict[str, Any] = f["published"]
        busy = (f["other_cpu_pct"] or 0.0) > BUSY_OTHER_PCT
        flagged |= busy
        row += [
            f"{f['msgs_per_s']:,.0f}",
            f"{f['puback_msgs_per_s']:,.0f}",
            _fmt(f["p50_ms"], ".2f"),
            _fmt(f["p99_ms"], ".2f"),
            f"{f['lost']:,}",
            f"{published['resent']:,}",
            _fmt(f["socket_drops"], ",d"),
            _fmt(f["gateway_cpu_us_per_msg"], ".1f"),
            _fmt(f["gateway_cpu_pct"], ".0f", "%"),
            _fmt(f["load_cpu_pct"], ".0f", "%"),
            _fmt(f["other_cpu_pct"], ".0f", "%") + ("!" if busy else ""),
            _fmt(f["rss_per_client_bytes"], ",.0f"),
            _fmt(f["ratio_to_reference"], ".2f"),
        ]
        print(_line(row) + (f"  {cell.error}" if cell.error else ""))
    if flagged:
        print(
            f"! other programs kept the CPUs more than {BUSY_OTHER_PCT:.0f}% busy during that run: "
            "its msgs/s and latencies are not comparable, cpu us/msg suffers least"
        )


# ---------------------------------------------------------------- main


def _numbers(value: str) -> list[int]:
    try:
        numbers = [int(n) for n in value.split(",") if n.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive integers (got {value!r})")
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_COUNT:,} messages or {QUICK_RUN_S:.0f} s per cell"
    )
    parser.add_argument(
        "--clients", type=_numbers, default=list(CLIENTS), help="comma-separated, default 1,100,10000"
    )
    parser.add_argument(
        "--windows", type=_numbers, default=list(WINDOWS), help="comma-separated, default 1,8"
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=MAX_IN_FLIGHT,
        metavar="N",
        help=f"unacknowledged PUBLISHes of all clients together, default {MAX_IN_FLIGHT} (0: no limit)",
    )
    args = parser.parse_args()
    settings = Settings(
        QUICK_COUNT if args.quick else COUNT, QUICK_RUN_S if args.quick else RUN_S, max(0, args.max_in_flight)
    )

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pinning = Pinning.split()
    if pinning.load and pinning.broker:
        os.sched_setaffinity(0, pinning.load)
        print(f"load generator on cpu {sorted(pinning.load)}, mqgate on cpu {sorted(pinning.broker)}")
    else:
        print(
            "one cpu only: mqgate and the load generator share it (figures are not comparable to 2-cpu runs)"
        )

    cells = [Cell(n, w) for n in args.clients for w in args.windows]
    try:
        disabled = sections_to_disable(mqgate_config(), ("listeners.tcp", "gateways.mqttsn"))
        with tempfile.TemporaryDirectory(prefix="mqgate-bench-sn-") as tmp:
            for cell in cells:
                _run_cell(cell, settings, Path(tmp), pinning, disabled)
                _print_progress(cell)
    except StartError as exc:
        sys.exit(f"mqgate: failed to start: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted")

    _print_table(cells)
    print(
        json.dumps(
            {
                "quick": args.quick,
                "cpus": {"load": sorted(pinning.load or ()), "mqgate": sorted(pinning.broker or ())},
                "count": settings.count,
                "max_in_flight": settings.max_in_flight,
                "reference_msgs_per_s": REFERENCE_MSGS_PER_S,
                "results": [cell.figures() for cell in cells],
            }
        ),
        flush=True,
    )


def _print_progress(cell: Cell) -> None:
    f = cell.figures()
    label = f"clients={cell.clients} window={cell.window}"
    if "msgs_per_s" in f:
        print(
            f"{label}: {f['received']['delivered']:,}/{f['published']['sent']:,} delivered in "
            f"{f['seconds']:.2f} s = {f['msgs_per_s']:,.0f} msgs/s; connected in {cell.connect_s:.2f} s",
            flush=True,
        )
    if cell.error:
        print(f"{label}: failed: {cell.error}", flush=True)
    if cell.log_lines or (cell.error and cell.log_tail):
        print(f"  mqgate log, {cell.log_lines} lines, ends: {cell.log_tail}", flush=True)


if __name__ == "__main__":
    main()
