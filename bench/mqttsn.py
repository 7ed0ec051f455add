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
import json
import multiprocessing as mp
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    HOST,
    START_TIMEOUT_S,
    BusyFlags,
    Meter,
    Pinning,
    StartError,
    UdpEndpoints,
    cpu_figures,
    fmt,
    free_port,
    log_summary,
    mqgate_argv,
    mqgate_config,
    mqgate_toml,
    pin_load_generator,
    positive_ints,
    print_table,
    reap,
    rss_bytes,
    running,
    sections_to_disable,
    sockets_error,
)
from _loadgen import Inbox, LoadError, Received, StampedSubscriber

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


class Clients(UdpEndpoints):
    """N MQTT-SN clients, each its own non-blocking UDP socket connected to the gateway, on one epoll."""

    def __init__(self, n: int, port: int) -> None:
        super().__init__(n, port)
        self.topic_ids = [0] * n
        self.setup_resent = 0

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
        answers = [b""] * len(requests)

        def answered(i: int) -> bool:
            data = self.socks[i].recv(256)
            if len(data) < 2 or data[1] != answer_type or answers[i]:
                return False
            answers[i] = data
            return True

        self.setup_resent += self.exchange(
            requests,
            MAX_IN_FLIGHT,
            RETRY_S,
            SETUP_TIMEOUT_S,
            answered,
            f"clients got no answer of type {answer_type:#04x}",
        )
        return answers

    def publish(self, window: int, max_in_flight: int, count: int, seconds: float) -> Published:
        """QoS 1 PUBLISHes, ``window`` outstanding per client, each PUBACK releasing that client's next, until
        ``count`` were sent or ``seconds`` passed; then waits at most ``DRAIN_S`` for the last PUBACKs.

        With more than ``max_in_flight`` window slots in all, clients with a free slot take turns as PUBACKs
        free room. An unacknowledged PUBLISH is sent again, with DUP set, every ``RETRY_S``."""
        socks, topic_ids, client_of, poll = self.socks, self.topic_ids, self.index_of, self.poller.poll
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


def _subscriber_main(
    port: int,
    count: int,
    cpus: set[int] | None,
    expected: ctypes.c_int64,
    results: mp.Queue[tuple[str, Any]],
) -> None:
    """The subscriber process: ``SUBSCRIPTION`` at QoS 0 on the MQTT listener at ``port``, ``count``
    messages expected at most."""
    subscriber = StampedSubscriber(
        port,
        SUBSCRIPTION,
        f"bench-sn-sub-{os.getpid()}",
        2 * SETUP_TIMEOUT_S + RUN_S + DRAIN_S,
        DRAIN_S,
        max(1, count // LATENCY_SAMPLES),
    )
    subscriber.main(cpus, expected, results)


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
        run = run_figures(p, r, self.window)
        cpu = cpu_figures(
            "gateway",
            "msg",
            self.gateway_cpu_s,
            p.cpu_s + r.cpu_s,
            self.cpus_busy_s,
            run["seconds"],
            r.delivered,
        )
        return out | run | cpu | {"socket_drops": self.socket_drops}


def run_figures(p: Published, r: Received, window: int) -> dict[str, Any]:
    """What the publishers and the subscriber measured: rates from the first PUBLISH to the last delivery
    and PUBACK, latencies, losses, and the ratio to the Paho gateway's rate for ``window``."""
    seconds = (r.last_ns - p.start_ns) / 1e9 if r.delivered else 0.0
    ack_seconds = (p.last_ack_ns - p.start_ns) / 1e9
    reference = REFERENCE_MSGS_PER_S.get(window)
    msgs_per_s = r.delivered / seconds if seconds > 0 else 0.0
    return {
        "published": asdict(p),
        "received": asdict(r),
        "seconds": seconds,
        "msgs_per_s": msgs_per_s,
        "puback_msgs_per_s": p.acked / ack_seconds if ack_seconds > 0 else 0.0,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "lost": p.sent - p.refused - r.delivered,
        "reference_msgs_per_s": reference,
        "ratio_to_reference": msgs_per_s / reference if reference else None,
    }


def _write_config(path: Path, tcp_port: int, udp_port: int, clients: int, disabled: list[str]) -> None:
    path.write_text(
        mqgate_toml(
            f'[listeners.tcp]\nbind = "{HOST}:{tcp_port}"\n\n'
            "[broker]\nmax_mqueue_len = 1000000\n\n"
            f'[gateways.mqttsn]\nbind = "{HOST}:{udp_port}"\nadvertise_interval = 0\n'
            f"max_clients = {max(clients, 10_000)}\n\n",
            disabled,
        )
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
    cell.error = sockets_error(cell.clients, "clients", SPARE_FILES)
    if cell.error:
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
    try:
        with running(mqgate_argv(config), log, tcp_port, pinning.broker) as proc:
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
        reap(sub)
        results.close()
        cell.log_lines, cell.log_tail = log_summary(log)


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
        meter = Meter([pid], cpus, udp_port)
        in_flight = cell.clients * cell.window
        cell.in_flight = min(in_flight, settings.max_in_flight or in_flight)
        cell.published = clients.publish(cell.window, cell.in_flight, settings.count, settings.seconds)
        usage = meter.usage()
        (cell.gateway_cpu_s,), cell.cpus_busy_s, cell.socket_drops = usage.cpu_s, usage.busy_s, usage.drops
        return cell.published
    finally:
        clients.close()


# ---------------------------------------------------------------- report


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


def print_reference() -> None:
    """The Paho gateway's figures the table compares with."""
    print()
    print(
        "reference, Eclipse Paho MQTT-SN gateway (C++) + mosquitto, 1 client, QoS 1, 16-byte payloads: "
        + ", ".join(f"{rate:,} msgs/s with window {w}" for w, rate in REFERENCE_MSGS_PER_S.items())
    )


def run_cells(f: dict[str, Any]) -> list[str]:
    """The table's cells for :func:`run_figures` and the socket drops of a cell's ``figures()``."""
    published: dict[str, Any] = f["published"]
    return [
        f"{f['msgs_per_s']:,.0f}",
        f"{f['puback_msgs_per_s']:,.0f}",
        fmt(f["p50_ms"], ".2f"),
        fmt(f["p99_ms"], ".2f"),
        f"{f['lost']:,}",
        f"{published['resent']:,}",
        fmt(f["socket_drops"], ",d"),
    ]


def _print_table(cells: list[Cell]) -> None:
    print_reference()
    rows, busy = [], BusyFlags()
    for cell in cells:
        f = cell.figures()
        row = [f"{cell.clients:,}", str(cell.window), fmt(cell.in_flight, ",d")]
        if "msgs_per_s" not in f:
            rows.append([*row, f"failed: {cell.error}"])
            continue
        rows.append(
            [
                *row,
                *run_cells(f),
                fmt(f["gateway_cpu_us_per_msg"], ".1f"),
                fmt(f["gateway_cpu_pct"], ".0f", "%"),
                fmt(f["load_cpu_pct"], ".0f", "%"),
                busy.cell(f["other_cpu_pct"]),
                fmt(f["rss_per_client_bytes"], ",.0f"),
                fmt(f["ratio_to_reference"], ".2f"),
                *([cell.error] if cell.error else []),
            ]
        )
    print_table(_COLUMNS, rows)
    busy.print_note("msgs/s", "cpu us/msg")


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_COUNT:,} messages or {QUICK_RUN_S:.0f} s per cell"
    )
    parser.add_argument(
        "--clients", type=positive_ints, default=list(CLIENTS), help="comma-separated, default 1,100,10000"
    )
    parser.add_argument(
        "--windows", type=positive_ints, default=list(WINDOWS), help="comma-separated, default 1,8"
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
    pinning = pin_load_generator("mqgate")

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
                "cpus": pinning.figures("mqgate"),
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
