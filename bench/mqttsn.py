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
import json
import os
import struct
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from _common import (
    BusyFlags,
    LoadError,
    Meter,
    Outcome,
    Pinning,
    UdpEndpoints,
    Usage,
    add_numbers,
    bench_parser,
    fmt,
    gateway_config,
    mqgate_argv,
    mqgate_config,
    pin_load_generator,
    print_table,
    rss_bytes,
    running,
    scratch,
    sections_to_disable,
    sockets_error,
    udp_ready,
)
from _loadgen import Received, StampedSubscriber

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


def subscriber(port: int, count: int) -> StampedSubscriber:
    """The subscriber: ``SUBSCRIPTION`` at QoS 0 on the MQTT broker at ``port``, ``count`` messages expected
    at most."""
    return StampedSubscriber(
        port,
        SUBSCRIPTION,
        f"bench-sn-sub-{os.getpid()}",
        2 * SETUP_TIMEOUT_S + RUN_S + DRAIN_S,
        DRAIN_S,
        max(1, count // LATENCY_SAMPLES),
    )


def gateway_ready(port: int, log: Path) -> Callable[[subprocess.Popen[bytes]], None]:
    """Readiness: the gateway at udp ``port`` answers SEARCHGW with GWINFO (§6.1)."""
    return udp_ready(port, _SEARCHGW, lambda answer: answer[1:2] == bytes((_GWINFO,)), log)


# ---------------------------------------------------------------- one cell


@dataclass(frozen=True, slots=True)
class Settings:
    count: int
    """Messages to publish per cell."""
    seconds: float
    """Publishing stops after this long even if ``count`` is not reached."""
    max_in_flight: int
    """Unacknowledged PUBLISHes of all clients together; 0: no limit but the clients' windows."""

    @classmethod
    def of(cls, args: argparse.Namespace) -> Settings:
        """The settings :func:`parser`'s options ask for."""
        return cls(
            QUICK_COUNT if args.quick else COUNT,
            QUICK_RUN_S if args.quick else RUN_S,
            max(0, args.max_in_flight),
        )

    def figures(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "max_in_flight": self.max_in_flight,
            "reference_msgs_per_s": REFERENCE_MSGS_PER_S,
        }


@dataclass(slots=True)
class Cell(Outcome):
    """One (clients, window) run, filled in as it goes."""

    PROCESSES: ClassVar[tuple[str, ...]] = ("gateway",)
    """The processes whose CPU time is measured, the gateway first, as the figures name them."""

    clients: int
    window: int
    in_flight: int | None = None
    """Most unacknowledged PUBLISHes of all clients together."""
    published: Published | None = None
    received: Received | None = None
    usage: Usage | None = None
    """What the processes spent while the clients published; its drops are at the gateway's socket."""
    connect_s: float | None = None
    """Time to CONNECT and REGISTER every client."""
    setup_resent: int = 0
    rss_before: int | None = None
    rss_connected: int | None = None
    rss_end: int | None = None

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clients": self.clients,
            "window": self.window,
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
        } | self.outcome_figures()
        p, r, u = self.published, self.received, self.usage
        if p is None or r is None or u is None:
            return out
        run = run_figures(p, r, self.window)
        cpu = u.figures(self.PROCESSES, "msg", p.cpu_s + r.cpu_s, run["seconds"], r.delivered)
        return out | run | cpu | {"socket_drops": u.drops}

    def delivered(self) -> str | None:
        """What the progress line says the cell measured."""
        f = self.figures()
        if "msgs_per_s" not in f:
            return None
        return (
            f"{f['received']['delivered']:,}/{f['published']['sent']:,} delivered in {f['seconds']:.2f} s = "
            f"{f['msgs_per_s']:,.0f} msgs/s; connected in {self.connect_s:.2f} s"
        )

    def row(self, busy: BusyFlags) -> list[str]:
        """The table's cells from ``in flight`` on: the figures, or why the cell failed."""
        f = self.figures()
        in_flight = fmt(self.in_flight, ",d")
        if "msgs_per_s" not in f:
            return [in_flight, f"failed: {self.error}"]
        return [
            in_flight,
            f"{f['msgs_per_s']:,.0f}",
            f"{f['puback_msgs_per_s']:,.0f}",
            fmt(f["p50_ms"], ".2f"),
            fmt(f["p99_ms"], ".2f"),
            f"{f['lost']:,}",
            f"{f['published']['resent']:,}",
            fmt(f["socket_drops"], ",d"),
            *busy.cpu_cells(f, self.PROCESSES, "msg"),
            fmt(f["rss_per_client_bytes"], ",.0f"),
            fmt(f["ratio_to_reference"], ".2f"),
            *([self.error] if self.error else []),
        ]

    def measure(
        self,
        settings: Settings,
        gateway: subprocess.Popen[bytes],
        udp_port: int,
        broker_port: int,
        pinning: Pinning,
        others: Sequence[int] = (),
    ) -> None:
        """Loads ``gateway``, an mqgate whose MQTT-SN gateway is at ``udp_port``: connects the clients (its
        memory measured around it), publishes (its CPU time and that of the processes ``others`` measured
        around it) and takes what a subscriber on the MQTT broker at ``broker_port`` received."""
        with subscriber(broker_port, settings.count).started(pinning.load) as received:
            published = self._publish(settings, udp_port, [gateway.pid, *others], pinning.cpus)
            self.received = received(published.sent - published.refused)
        if gateway.poll() is not None:
            raise LoadError(f"mqgate exited with code {gateway.returncode} during the run")
        self.rss_end = rss_bytes(gateway.pid)

    def _publish(
        self, settings: Settings, udp_port: int, pids: list[int], cpus: set[int] | None
    ) -> Published:
        """Connects the clients (the memory of ``pids[0]`` measured around it), then publishes (the CPU time
        of ``pids`` measured around it)."""
        self.rss_before = rss_bytes(pids[0])
        t0 = time.monotonic()
        with Clients(self.clients, udp_port) as clients:
            clients.connect()
            clients.register()
            self.connect_s = time.monotonic() - t0
            self.setup_resent = clients.setup_resent
            self.rss_connected = rss_bytes(pids[0])
            meter = Meter(pids, cpus, udp_port)
            in_flight = self.clients * self.window
            self.in_flight = min(in_flight, settings.max_in_flight or in_flight)
            self.published = clients.publish(self.window, self.in_flight, settings.count, settings.seconds)
            self.usage = meter.usage()
            return self.published


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


def _run_cell(cell: Cell, settings: Settings, workdir: Path, pinning: Pinning, disabled: list[str]) -> None:
    """Runs ``cell`` on a fresh mqgate and fills it in; raises StartError if mqgate does not start."""
    cell.error = sockets_error(cell.clients, "clients", SPARE_FILES)
    if cell.error:
        return
    config = workdir / f"mqgate-{cell.clients}x{cell.window}.toml"
    log = config.with_suffix(".log")
    settings_toml = (
        f"advertise_interval = 0\nmax_clients = {max(cell.clients, 10_000)}\n\n"
        "[broker]\nmax_mqueue_len = 1000000\n"
    )
    tcp_port, udp_port = gateway_config(config, "mqttsn", settings_toml, disabled)
    ready = gateway_ready(udp_port, log)
    with cell.recording(log), running(mqgate_argv(config), log, tcp_port, pinning.broker, ready) as proc:
        cell.measure(settings, proc, udp_port, tcp_port, pinning)


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


def parser(doc: str, clients: Sequence[int]) -> argparse.ArgumentParser:
    """The command line of a benchmark of this load: ``--quick``, ``--clients`` (``clients`` by default),
    ``--windows`` and ``--max-in-flight``."""
    out = bench_parser(doc, f"{QUICK_COUNT:,} messages or {QUICK_RUN_S:.0f} s per cell")
    add_numbers(out, "--clients", clients)
    add_numbers(out, "--windows", WINDOWS)
    out.add_argument(
        "--max-in-flight",
        type=int,
        default=MAX_IN_FLIGHT,
        metavar="N",
        help=f"unacknowledged PUBLISHes of all clients together, default {MAX_IN_FLIGHT} (0: no limit)",
    )
    return out


def _print_table(cells: list[Cell]) -> None:
    print_reference()
    busy = BusyFlags()
    print_table(_COLUMNS, [[f"{cell.clients:,}", str(cell.window), *cell.row(busy)] for cell in cells])
    busy.print_note("msgs/s", "cpu us/msg")


# ---------------------------------------------------------------- main


def main() -> None:
    args = parser(__doc__, CLIENTS).parse_args()
    settings = Settings.of(args)
    pinning = pin_load_generator("mqgate")

    cells = [Cell(n, w) for n in args.clients for w in args.windows]
    with scratch("sn") as workdir:
        disabled = sections_to_disable(mqgate_config(), ("listeners.tcp", "gateways.mqttsn"))
        for cell in cells:
            _run_cell(cell, settings, workdir, pinning, disabled)
            cell.print_progress(f"clients={cell.clients} window={cell.window}", cell.delivered())

    _print_table(cells)
    print(
        json.dumps(
            {"quick": args.quick, "cpus": pinning.figures("mqgate")}
            | settings.figures()
            | {"results": [cell.figures() for cell in cells]}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
