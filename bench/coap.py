"""CoAP gateway benchmark: mqgate's CoAP gateway beside a bare aiocoap server and libcoap's coap-server-notls.

Every run gets a fresh server process on a free 127.0.0.1 UDP port, pinned to one core; the load generator
(raw UDP sockets, CoAP datagrams built by hand) runs on another. Three measurements:

- requests: confirmable PUTs with a 16-byte payload, W outstanding (W = 1, 8, 64), against each server; for
  mqgate (``PUT /mqtt/bench/c?c=...``: a QoS 1 publish) a raw-socket MQTT subscriber on ``bench/#`` counts
  what the broker saw. Requests/s, p50/p99 latency, the server's CPU time per request, losses.
- notifications (mqgate only): 1 and 1,000 observers (``GET /mqtt/bench/n`` with Observe 0), an MQTT publisher
  at QoS 0 on ``bench/n``; notifications received per second, NON and CON (the observers ACK).
- sustained: W = 64 confirmable PUTs for ``--sustain`` seconds against each server, resident memory sampled
  every 5 s.

Then side-by-side tables with mqgate's ratios to aiocoap and libcoap, and one JSON line with every figure.
See bench/README.md.

    python bench/coap.py [--quick] [--sustain SECONDS[,SERVER=SECONDS...]] [--servers mqgate,aiocoap,libcoap]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    HOST,
    REPO,
    BusyFlags,
    LoadError,
    Meter,
    Outcome,
    Pinning,
    StartError,
    UdpEndpoints,
    Unavailable,
    Usage,
    add_names,
    bench_parser,
    coap_ready,
    fmt,
    free_port,
    mib,
    mqgate_argv,
    mqgate_config,
    mqgate_toml,
    pin_load_generator,
    print_table,
    rss_bytes,
    running,
    scratch,
    sections_to_disable,
    sockets_error,
)
from _loadgen import Received, StampedSubscriber, connect, percentile_ms

WINDOWS = (1, 8, 64)
OBSERVERS = (1, 1_000)
RUN_S, QUICK_RUN_S = 5.0, 1.0
"""Sending time of a requests or notifications run."""
NOTIFICATIONS, QUICK_NOTIFICATIONS = 200_000, 20_000
"""A notifications run publishes this many notifications' worth of messages (divided by the observers),
unless its time runs out first."""
SUSTAIN_S, QUICK_SUSTAIN_S = 120.0, 20.0
SUSTAIN_WINDOW = 64
RSS_EVERY_S = 5.0
RETRY_S = 2.0
"""An unanswered request is sent again (same message id and token) after this long, again and again."""
DRAIN_S = 5.0
"""Longest wait for the last answers or notifications once sending has stopped."""
IDLE_S = 1.0
"""Once sending has stopped, the MQTT subscriber gives up after this long without a delivery."""
STALL_S = 0.5
"""The publisher of a notifications run stops waiting for missing notifications after this long."""
SETUP_TIMEOUT_S = 60.0
MAX_REGISTERING = 100
"""Observe registrations sent and not yet answered, at most."""
IN_SYSTEM = 128
"""Notifications per observer socket published but not yet received, at most (at least 2 publishes)."""
MIDS_PER_SOURCE = 60_000
"""Requests sent from one source port (one client id). A server takes a message id it saw from the same
endpoint within EXCHANGE_LIFETIME (247 s) for a duplicate (RFC 7252 §4.5), so the load generator moves to a
fresh socket before its 16-bit message ids wrap."""
SUSTAIN_LATENCY_EVERY = 16
"""A sustained run keeps the latency of one answered request in this many."""
OBSERVER_RCVBUF = 1 << 20
SPARE_FILES = 300
"""File descriptors needed besides the observers' sockets (request sources, pipes, the server's log)."""
PAYLOAD_SIZE = 16

# CoAP (RFC 7252 §3), built and parsed here rather than with the gateway's codec
_CON, _NON, _ACK = 0, 1, 2
_GET, _PUT = 0x01, 0x03
_CONTENT = 0x45  # 2.05
_OBSERVE, _URI_PATH, _URI_QUERY = 6, 11, 15
_HEADER = struct.Struct(">BBH")
"""Version, type and token length; code; message id."""
_MID_TOKEN = struct.Struct(">HI")
_STAMP = struct.Struct(">QI")
"""The first 12 payload bytes: send time (monotonic ns) and a sequence number; 4 zero bytes follow."""
_TOKEN = struct.Struct(">I")
_ACK_4 = 0x40 | _ACK << 4 | 4
_RST_0 = 0x40 | 3 << 4
_NOTIFICATION_FIRST = (0x40 | _NON << 4 | 4, 0x40 | _CON << 4 | 4)
_now_ns = time.monotonic_ns


def _option(delta: int, value: bytes) -> bytes:
    """One option: delta and length nibbles and their extended bytes, then the value (§3.1)."""

    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes((n - 13,))
        return 14, struct.pack(">H", n - 269)

    d, d_ext = nibble(delta)
    length, l_ext = nibble(len(value))
    return bytes((d << 4 | length,)) + d_ext + l_ext + value


def datagram(
    mtype: int, code: int, mid: int, token: bytes, options: Sequence[tuple[int, bytes]], payload: bytes
) -> bytearray:
    """A CoAP message; ``options`` in any order (repeated options keep theirs)."""
    out = bytearray(_HEADER.pack(0x40 | mtype << 4 | len(token), code, mid) + token)
    last = 0
    for number, value in sorted(options, key=lambda option: option[0]):
        out += _option(number - last, value)
        last = number
    if payload:
        out += b"\xff" + payload
    return out


def uri(path: Sequence[str], query: str) -> list[tuple[int, bytes]]:
    return [(_URI_PATH, segment.encode()) for segment in path] + [(_URI_QUERY, query.encode())]


# ---------------------------------------------------------------- servers


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    path: tuple[str, ...]
    """Where the PUTs go."""


SERVERS = {
    s.name: s
    for s in (
        Server("mqgate", ("mqtt", "bench", "c")),
        Server("aiocoap", ("mqtt", "bench", "c")),
        Server("libcoap", ("example_data",)),
    )
}


@dataclass(frozen=True, slots=True)
class MqgateSetup:
    """What every mqgate configuration of the run shares."""

    disabled: list[str]
    """Listeners and gateways switched off."""
    max_dedup_entries: int
    max_dedup_bytes: int
    """The CoAP gateway's duplicate-detection cache bounds: its defaults, written out."""

    @classmethod
    def load(cls) -> MqgateSetup:
        config = mqgate_config()
        coap = config["gateways"]["coap"]
        return cls(
            sections_to_disable(config, ("listeners.tcp", "gateways.coap")),
            int(coap["max_dedup_entries"]),
            int(coap["max_dedup_bytes"]),
        )


@dataclass(frozen=True, slots=True)
class Live:
    """A server process that answers CoAP on ``udp_port``; mqgate's MQTT listener is on ``tcp_port``."""

    proc: subprocess.Popen[bytes]
    udp_port: int
    tcp_port: int | None
    log: Path


def _argv(
    server: Server, config: Path, udp_port: int, tcp_port: int, mqgate: MqgateSetup | None, notify: str
) -> list[str]:
    """The command line of ``server``; mqgate's configuration goes to ``config``."""
    if server.name == "mqgate":
        if mqgate is None:
            raise Unavailable("mqgate's configuration could not be read")
        config.write_text(
            mqgate_toml(
                f'[listeners.tcp]\nbind = "{HOST}:{tcp_port}"\n\n'
                f'[gateways.coap]\nbind = "{HOST}:{udp_port}"\nnotify_type = "{notify}"\n'
                f"max_dedup_entries = {mqgate.max_dedup_entries}\n"
                f"max_dedup_bytes = {mqgate.max_dedup_bytes}\n\n",
                mqgate.disabled,
            )
        )
        return mqgate_argv(config)
    if server.name == "aiocoap":
        if importlib.util.find_spec("aiocoap") is None:
            raise Unavailable("aiocoap is not installed (pip install aiocoap)")
        return [sys.executable, str(REPO / "bench" / "_aiocoap_server.py"), HOST, str(udp_port)]
    exe = shutil.which("coap-server-notls")
    if exe is None:
        raise Unavailable("coap-server-notls not found (apt-get install libcoap3-bin)")
    return [exe, "-A", HOST, "-p", str(udp_port)]


@contextlib.contextmanager
def serving(
    server: Server, log: Path, cpus: set[int] | None, mqgate: MqgateSetup | None, notify: str = "non"
) -> Iterator[Live]:
    """Starts ``server`` with its output in ``log`` (mqgate's configuration beside it), yields it once it
    answers CoAP; always stops and reaps it. Raises ``Unavailable`` or ``StartError`` when it cannot
    start."""
    udp_port, tcp_port = free_port(socket.SOCK_DGRAM), free_port()
    argv = _argv(server, log.with_suffix(".toml"), udp_port, tcp_port, mqgate, notify)
    mqtt = server.name == "mqgate"
    with running(argv, log, tcp_port if mqtt else None, cpus, coap_ready(udp_port, log)) as proc:
        yield Live(proc, udp_port, tcp_port if mqtt else None, log)


# ---------------------------------------------------------------- confirmable PUTs


@dataclass(frozen=True, slots=True)
class Requests:
    """What one requests run saw; times are monotonic ns."""

    sent: int
    """Distinct requests, not counting retransmissions."""
    answered: int
    """2.xx responses."""
    refused: int
    """Other responses, and RSTs."""
    lost: int
    """No response when the drain time ran out."""
    resent: int
    unexpected: int
    """Datagrams other than the first response to an outstanding request (a second answer to a request
    sent again, a wrong token)."""
    sources: int
    """Source ports (and client ids) used."""
    start_ns: int
    last_ns: int
    """The last response."""
    p50_ms: float | None
    p99_ms: float | None
    """Latency from a request's first transmission to its response."""
    cpu_s: float
    rss: list[tuple[float, int]]
    """(seconds since the start, server RSS bytes), when sampled."""


class _Source:
    """One UDP socket of the load generator: one CoAP endpoint, one client id (``c=loadgen-{index}``).

    Its request datagram is built once; each send patches the message id, token and payload in place."""

    __slots__ = ("next_mid", "opened", "outstanding", "payload_at", "sock", "template")

    def __init__(self, index: int, port: int, path: Sequence[str]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect((HOST, port))
        options = uri(path, f"c=loadgen-{index}")
        self.template = datagram(_CON, _PUT, 0, bytes(4), options, bytes(PAYLOAD_SIZE))
        self.payload_at = len(self.template) - PAYLOAD_SIZE
        self.next_mid = 0
        self.opened = False  # a response came back: for mqgate, the client id's broker session is open
        self.outstanding: dict[int, tuple[int, int]] = {}  # message id -> (first sent, ns; sequence = token)

    def send(self, mid: int, seq: int, sent_ns: int) -> None:
        template = self.template
        _MID_TOKEN.pack_into(template, 2, mid, seq)
        _STAMP.pack_into(template, self.payload_at, sent_ns, seq)
        self.sock.send(template)


def put_load(
    port: int, path: Sequence[str], window: int, seconds: float, rss_of: int | None, latency_every: int
) -> Requests:
    """Confirmable PUTs, ``window`` outstanding, each response releasing the next, for ``seconds``; then waits
    at most ``DRAIN_S`` for the last responses. Responses are matched by message id (and their token checked).
    Samples the RSS of process ``rss_of`` every ``RSS_EVERY_S`` if given."""
    sources: list[_Source] = []
    by_fd: dict[int, _Source] = {}
    poller = select.epoll()
    retry: deque[tuple[int, _Source, int]] = deque()  # (due, source, message id), by due time
    retry_ns = int(RETRY_S * 1e9)
    latencies = array("q")
    rss: list[tuple[float, int]] = []
    seq = answered = refused = resent = unexpected = in_flight = 0
    current: _Source | None = None
    unpack_header, unpack_token = _HEADER.unpack_from, _TOKEN.unpack_from
    cpu0 = time.process_time()
    start = last = t = _now_ns()
    stop, drain_until = start + int(seconds * 1e9), 0
    next_rss = start if rss_of is not None else -1
    try:
        while True:
            if rss_of is not None and 0 <= next_rss <= t:
                rss.append(((t - start) / 1e9, rss_bytes(rss_of)))
                next_rss += int(RSS_EVERY_S * 1e9)
            if not drain_until:
                if t < stop:
                    while in_flight < window:
                        if current is None or current.next_mid >= MIDS_PER_SOURCE:
                            current = _Source(len(sources), port, path)
                            sources.append(current)
                            by_fd[current.sock.fileno()] = current
                            poller.register(current.sock.fileno(), select.EPOLLIN)
                        elif not current.opened and current.outstanding:
                            break  # a new client id: its first request opens the session, the rest wait
                        mid = current.next_mid
                        current.next_mid += 1
                        sent_ns = _now_ns()
                        current.send(mid, seq, sent_ns)
                        current.outstanding[mid] = (sent_ns, seq)
                        retry.append((sent_ns + retry_ns, current, mid))
                        seq += 1
                        in_flight += 1
                else:
                    drain_until = t + int(DRAIN_S * 1e9)
                    if rss_of is not None:
                        rss.append(((t - start) / 1e9, rss_bytes(rss_of)))
                        next_rss = -1
            if drain_until and (not in_flight or t > drain_until):
                break
            events = poller.poll(0.05)
            t = _now_ns()
            for fd, _ in events:
                source = by_fd[fd]
                for _ in range(window):
                    try:
                        data = source.sock.recv(2048)
                    except BlockingIOError:
                        break
                    if len(data) < 4:
                        unexpected += 1
                        continue
                    first, code, mid = unpack_header(data)
                    pending = source.outstanding.get(mid)
                    if pending is None:
                        unexpected += 1
                        continue
                    if first == _RST_0:
                        refused += 1
                    elif (
                        first != _ACK_4 or not code or len(data) < 8 or unpack_token(data, 4)[0] != pending[1]
                    ):
                        unexpected += 1  # an empty ACK (a separate response would follow), a wrong token
                        continue
                    elif code >> 5 == 2:
                        answered += 1
                        if answered % latency_every == 0:
                            latencies.append(t - pending[0])
                    else:
                        refused += 1
                    del source.outstanding[mid]
                    source.opened = True
                    in_flight -= 1
                    last = t
            while retry and retry[0][0] <= t:
                _, source, mid = retry.popleft()
                pending = source.outstanding.get(mid)
                if pending is not None:
                    source.send(mid, pending[1], pending[0])
                    retry.append((t + retry_ns, source, mid))
                    resent += 1
    finally:
        poller.close()
        for source in sources:
            source.sock.close()
    ordered = sorted(latencies)
    return Requests(
        sent=seq,
        answered=answered,
        refused=refused,
        lost=in_flight,
        resent=resent,
        unexpected=unexpected,
        sources=len(sources),
        start_ns=start,
        last_ns=last,
        p50_ms=percentile_ms(ordered, 50),
        p99_ms=percentile_ms(ordered, 99),
        cpu_s=time.process_time() - cpu0,
        rss=rss,
    )


# ---------------------------------------------------------------- one requests run


@dataclass(slots=True)
class PutRun(Outcome):
    """A requests run (``sustained`` False) or a sustained run against one server, filled in as it goes."""

    server: str
    window: int
    seconds: float
    """Sending time asked for."""
    sustained: bool
    requests: Requests | None = None
    received: Received | None = None
    """mqgate's subscriber."""
    usage: Usage | None = None
    """What the server spent during the run; its drops are at the server's socket."""

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "server": self.server,
            "window": self.window,
            "sustained": self.sustained,
            "drops": None if self.usage is None else self.usage.drops,
        } | self.outcome_figures()
        r, u = self.requests, self.usage
        if r is None or u is None:
            return out
        seconds = (r.last_ns - r.start_ns) / 1e9 if r.answered else 0.0
        load_cpu_s = r.cpu_s + (self.received.cpu_s if self.received else 0.0)
        out |= u.figures(("server",), "request", load_cpu_s, seconds, r.answered)
        out |= {
            "requests": asdict(r),
            "received": None if self.received is None else asdict(self.received),
            "seconds": seconds,
            "requests_per_s": r.answered / seconds if seconds > 0 else 0.0,
            "p50_ms": r.p50_ms,
            "p99_ms": r.p99_ms,
            "undelivered": None if self.received is None else r.answered - self.received.delivered,
        }
        if r.rss:
            rss = [b for _, b in r.rss]
            half = next(b for s, b in r.rss if s >= r.rss[-1][0] / 2)
            out |= {
                "rss_start": rss[0],
                "rss_end": rss[-1],
                "rss_max": max(rss),
                "rss_growth": rss[-1] - rss[0],
                "rss_growth_second_half": rss[-1] - half,
            }
        return out


def put_run(
    server: Server,
    window: int,
    seconds: float,
    sustained: bool,
    workdir: Path,
    pinning: Pinning,
    mqgate: MqgateSetup | None,
) -> PutRun:
    """One requests or sustained run on a fresh server; raises Unavailable or StartError if it cannot
    start."""
    run = PutRun(server.name, window, seconds, sustained)
    log = workdir / f"{server.name}-{'sustained-' if sustained else 'w'}{window}.log"
    with (
        run.recording(log),
        serving(server, log, pinning.broker, mqgate) as live,
        contextlib.ExitStack() as stack,
    ):
        received = None
        if live.tcp_port is not None:
            subscriber = StampedSubscriber(
                live.tcp_port,
                "bench/#",
                f"bench-coap-sub-{os.getpid()}",
                seconds + DRAIN_S + SETUP_TIMEOUT_S,
                DRAIN_S,
                SUSTAIN_LATENCY_EVERY,
            )
            received = stack.enter_context(subscriber.started(pinning.load))
        meter = Meter([live.proc.pid], pinning.cpus, live.udp_port)
        run.requests = put_load(
            live.udp_port,
            server.path,
            window,
            seconds,
            live.proc.pid if sustained else None,
            SUSTAIN_LATENCY_EVERY if sustained else 1,
        )
        run.usage = meter.usage()
        if received is not None:
            run.received = received(run.requests.answered)
        if live.proc.poll() is not None:
            raise LoadError(f"{server.name} exited with code {live.proc.returncode} during the run")
    return run


# ---------------------------------------------------------------- notifications (mqgate)


@dataclass(frozen=True, slots=True)
class Notified:
    """What the observers of one notifications run received; times are monotonic ns."""

    published: int
    received: int
    """Distinct notifications (by observer and the publish's sequence number)."""
    duplicates: int
    other: int
    """Datagrams other than a 2.05 notification for the observer's token."""
    stalls: int
    """Times the publisher stopped waiting for missing notifications."""
    start_ns: int
    last_ns: int
    p50_ms: float | None
    p99_ms: float | None
    """From the publish to the notification."""
    cpu_s: float


def _register(observers: UdpEndpoints) -> int:
    """GET /mqtt/bench/n?c=obs{i} with Observe 0 from every observer socket (token i, message id i), at most
    ``MAX_REGISTERING`` unanswered, each again after ``RETRY_S``; checks every 2.05. Returns the resends."""
    requests = [
        datagram(
            _CON,
            _GET,
            i & 0xFFFF,
            _TOKEN.pack(i),
            [(_OBSERVE, b""), *uri(("mqtt", "bench", "n"), f"c=obs{i}")],
            b"",
        )
        for i in range(len(observers.socks))
    ]

    def answered(i: int) -> bool:
        data = observers.socks[i].recv(2048)
        if len(data) < 8 or _HEADER.unpack_from(data)[2] != i & 0xFFFF:
            return False
        first, code, _ = _HEADER.unpack_from(data)
        if first != _ACK_4 or code != _CONTENT or _TOKEN.unpack_from(data, 4)[0] != i:
            raise LoadError(f"observer {i}: registration answered with {data.hex()}")
        return True

    return observers.exchange(
        requests, MAX_REGISTERING, RETRY_S, SETUP_TIMEOUT_S, answered, "observers not registered"
    )


def notify_load(observers: UdpEndpoints, pub: socket.socket, count: int, seconds: float) -> Notified:
    """QoS 0 PUBLISHes to bench/n (in batches, at most ``IN_SYSTEM`` notifications per observer unreceived)
    until ``count`` or ``seconds``; then waits at most ``DRAIN_S`` for the last notifications. Confirmable
    notifications are acknowledged at once."""
    socks, poller, index_of = observers.socks, observers.poller, observers.index_of
    n_obs = len(socks)
    topic = b"bench/n"
    packet = bytearray(bytes((0x30, 2 + len(topic) + PAYLOAD_SIZE)) + struct.pack(">H", len(topic)) + topic)
    payload_at = len(packet)
    packet += bytes(PAYLOAD_SIZE)
    max_publishes = max(2, IN_SYSTEM // n_obs)
    seen = bytearray(n_obs * count)  # observer i, publish k: seen[i * count + k]
    latencies = array("q")
    published = received = duplicates = other = stalls = forgiven = 0
    unpack_stamp = _STAMP.unpack_from
    cpu0 = time.process_time()
    start = last = t = progress = _now_ns()
    stop, drain_until = start + int(seconds * 1e9), 0
    while True:
        missing = published * n_obs - received - forgiven
        if not drain_until:
            if published < count and t < stop:
                if missing and t - progress > STALL_S * 1e9:
                    forgiven += missing
                    missing = 0
                    stalls += 1
                room = min(count - published, max_publishes - (missing + n_obs - 1) // n_obs)
                if room > 0:
                    batch = bytearray()
                    for _ in range(room):
                        _STAMP.pack_into(packet, payload_at, _now_ns(), published)
                        batch += packet
                        published += 1
                    pub.sendall(batch)
                    progress = _now_ns()
            else:
                drain_until = t + int(DRAIN_S * 1e9)
        if drain_until and (received >= published * n_obs or t > drain_until or t - progress > IDLE_S * 1e9):
            break
        events = poller.poll(0.05)
        t = _now_ns()
        for fd, _ in events:
            i = index_of[fd]
            sock = socks[i]
            data = sock.recv(2048)
            first = data[0] if data else 0
            if first not in _NOTIFICATION_FIRST or len(data) < 4 + 4 + PAYLOAD_SIZE + 1:
                other += 1
                continue
            if first == _NOTIFICATION_FIRST[1]:
                sock.send(bytes((0x40 | _ACK << 4, 0)) + data[2:4])
            if data[1] != _CONTENT or _TOKEN.unpack_from(data, 4)[0] != i or data[-PAYLOAD_SIZE - 1] != 0xFF:
                other += 1
                continue
            sent_ns, seq = unpack_stamp(data, len(data) - PAYLOAD_SIZE)
            if seq >= count or seen[i * count + seq]:
                duplicates += 1
                continue
            seen[i * count + seq] = 1
            received += 1
            latencies.append(t - sent_ns)
            last = progress = t
    ordered = sorted(latencies)
    return Notified(
        published=published,
        received=received,
        duplicates=duplicates,
        other=other,
        stalls=stalls,
        start_ns=start,
        last_ns=last,
        p50_ms=percentile_ms(ordered, 50),
        p99_ms=percentile_ms(ordered, 99),
        cpu_s=time.process_time() - cpu0,
    )


@dataclass(slots=True)
class NotifyRun(Outcome):
    """A notifications run, filled in as it goes."""

    observers: int
    notify_type: str
    """``non`` or ``con``: the gateway's ``notify_type``."""
    register_s: float | None = None
    register_resent: int = 0
    notified: Notified | None = None
    usage: Usage | None = None
    """What mqgate spent during the run; its drops (of the observers' ACKs) are at mqgate's socket."""

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "observers": self.observers,
            "notify_type": self.notify_type,
            "register_s": self.register_s,
            "register_resent": self.register_resent,
            "drops": None if self.usage is None else self.usage.drops,
        } | self.outcome_figures()
        r, u = self.notified, self.usage
        if r is None or u is None:
            return out
        seconds = (r.last_ns - r.start_ns) / 1e9 if r.received else 0.0
        return (
            out
            | {
                "notified": asdict(r),
                "seconds": seconds,
                "notifications_per_s": r.received / seconds if seconds > 0 else 0.0,
                "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms,
                "lost": r.published * self.observers - r.received,
            }
            | u.figures(("server",), "notification", r.cpu_s, seconds, r.received)
        )


def notify_run(
    observers: int,
    notify_type: str,
    count: int,
    seconds: float,
    workdir: Path,
    pinning: Pinning,
    mqgate: MqgateSetup,
) -> NotifyRun:
    """One notifications run on a fresh mqgate; raises StartError if it cannot start."""
    run = NotifyRun(observers, notify_type)
    run.error = sockets_error(observers, "observers", SPARE_FILES)
    if run.error:
        return run
    log = workdir / f"mqgate-n{observers}-{notify_type}.log"
    with (
        run.recording(log),
        serving(SERVERS["mqgate"], log, pinning.broker, mqgate, notify_type) as live,
        UdpEndpoints(observers, live.udp_port, OBSERVER_RCVBUF) as endpoints,
    ):
        t0 = time.monotonic()
        run.register_resent = _register(endpoints)
        run.register_s = time.monotonic() - t0
        assert live.tcp_port is not None
        pub, _ = connect(live.tcp_port, f"bench-coap-pub-{os.getpid()}")
        with pub:
            meter = Meter([live.proc.pid], pinning.cpus, live.udp_port)
            run.notified = notify_load(endpoints, pub, max(1, count // observers), seconds)
            run.usage = meter.usage()
            pub.sendall(b"\xe0\x00")  # DISCONNECT
        if live.proc.poll() is not None:
            raise LoadError(f"mqgate exited with code {live.proc.returncode} during the run")
    return run


# ---------------------------------------------------------------- report


def _print_requests(runs: list[PutRun], busy: BusyFlags) -> None:
    print("\nconfirmable PUT requests, 16-byte payload")
    rows = []
    for run in runs:
        f = run.figures()
        row = [run.server, str(run.window)]
        if "requests_per_s" not in f:
            rows.append([*row, f"failed: {run.error}"])
            continue
        r: dict[str, Any] = f["requests"]
        rows.append(
            [
                *row,
                f"{f['requests_per_s']:,.0f}",
                fmt(f["p50_ms"], ".2f"),
                fmt(f["p99_ms"], ".2f"),
                *busy.cpu_cells(f, ("server",), "request"),
                f"{r['answered']:,}",
                f"{r['refused']:,}",
                f"{r['lost']:,}",
                f"{r['resent']:,}",
                fmt(f["drops"], ",d"),
                fmt(f["undelivered"], ",d"),
                *([run.error] if run.error else []),
            ]
        )
    print_table(
        (
            ("server", 8),
            ("window", 6),
            ("req/s", 8),
            ("p50 ms", 7),
            ("p99 ms", 7),
            ("cpu us/req", 10),
            ("server cpu", 10),
            ("load cpu", 8),
            ("other cpu", 9),
            ("answered", 9),
            ("refused", 7),
            ("lost", 5),
            ("resent", 6),
            ("drops", 5),
            ("undelivered", 11),
        ),
        rows,
        left=1,
    )


def _print_notifications(runs: list[NotifyRun], busy: BusyFlags) -> None:
    print("\nmqgate notifications: an MQTT publisher at QoS 0 -> CoAP observers")
    rows = []
    for run in runs:
        f = run.figures()
        row = [f"{run.observers:,}", run.notify_type]
        if "notifications_per_s" not in f:
            rows.append([*row, f"failed: {run.error}"])
            continue
        r: dict[str, Any] = f["notified"]
        rows.append(
            [
                *row,
                f"{f['notifications_per_s']:,.0f}",
                fmt(f["p50_ms"], ".2f"),
                fmt(f["p99_ms"], ".2f"),
                *busy.cpu_cells(f, ("server",), "notification"),
                f"{r['published']:,}",
                f"{r['received']:,}",
                f"{f['lost']:,}",
                f"{r['duplicates']:,}",
                fmt(f["drops"], ",d"),
                f"{run.register_s:.2f}",
                *([run.error] if run.error else []),
            ]
        )
    print_table(
        (
            ("observers", 9),
            ("type", 4),
            ("notif/s", 8),
            ("p50 ms", 7),
            ("p99 ms", 7),
            ("cpu us/notif", 12),
            ("server cpu", 10),
            ("load cpu", 8),
            ("other cpu", 9),
            ("published", 9),
            ("received", 9),
            ("lost", 7),
            ("dup", 6),
            ("drops", 5),
            ("register s", 10),
        ),
        rows,
        left=2,
    )


def _print_sustained(runs: list[PutRun], mqgate: MqgateSetup | None, busy: BusyFlags) -> None:
    print(
        f"\nsustained: window {SUSTAIN_WINDOW}, confirmable PUTs; "
        f"RSS in MiB, sampled every {RSS_EVERY_S:.0f} s"
    )
    if mqgate is not None:
        print(
            f"mqgate's duplicate-detection cache: max_dedup_entries = {mqgate.max_dedup_entries:,}, "
            f"max_dedup_bytes = {mqgate.max_dedup_bytes:,} (its defaults)"
        )
    rows = []
    for run in runs:
        f = run.figures()
        row = [run.server, f"{run.seconds:.0f}"]
        if "rss_start" not in f:
            rows.append([*row, f"failed: {run.error}"])
            continue
        r: dict[str, Any] = f["requests"]
        rows.append(
            [
                *row,
                f"{f['requests_per_s']:,.0f}",
                fmt(f["p99_ms"], ".2f"),
                fmt(f["server_cpu_us_per_request"], ".1f"),
                busy.cell(f["other_cpu_pct"]),
                mib(f["rss_start"]),
                mib(f["rss_end"]),
                mib(f["rss_max"]),
                mib(f["rss_growth"]),
                mib(f["rss_growth_second_half"]),
                f"{r['answered']:,}",
                f"{r['lost']:,}",
                f"{r['resent']:,}",
                fmt(f["drops"], ",d"),
                *([run.error] if run.error else []),
            ]
        )
    print_table(
        (
            ("server", 8),
            ("s", 4),
            ("req/s", 8),
            ("p99 ms", 7),
            ("cpu us/req", 10),
            ("other cpu", 9),
            ("RSS start", 9),
            ("end", 7),
            ("max", 7),
            ("growth", 7),
            ("2nd half", 8),
            ("answered", 10),
            ("lost", 5),
            ("resent", 6),
            ("drops", 5),
        ),
        rows,
        left=1,
    )


def ratios(runs: list[PutRun]) -> dict[str, dict[str, float]]:
    """mqgate's requests/s divided by each peer's, per window (``"64 sustained"`` for the sustained runs)."""
    rates: dict[tuple[str, str], float] = {}
    for run in runs:
        rate = run.figures().get("requests_per_s")
        if rate:
            rates[(f"{run.window}{' sustained' if run.sustained else ''}", run.server)] = rate
    out: dict[str, dict[str, float]] = {}
    for (cell, server), rate in rates.items():
        mine = rates.get((cell, "mqgate"))
        if mine is not None and server != "mqgate":
            out.setdefault(cell, {})[server] = mine / rate
    return out


def _print_side_by_side(runs: list[PutRun], by_cell: dict[str, dict[str, float]]) -> None:
    print("\nside by side: requests/s, server cpu us/request, and mqgate's requests/s divided by each peer's")
    figures = {
        (f"{r.window}{' sustained' if r.sustained else ''}", r.server): r.figures()
        for r in runs
        if r.requests
    }
    cells = list(dict.fromkeys(cell for cell, _ in figures))
    rows = []
    for cell in cells:
        rates = [figures.get((cell, name), {}).get("requests_per_s") for name in SERVERS]
        cpus = [figures.get((cell, name), {}).get("server_cpu_us_per_request") for name in SERVERS]
        rows.append(
            [
                cell,
                *(fmt(rate, ",.0f") for rate in rates),
                *(fmt(cpu, ".1f") for cpu in cpus),
                fmt(by_cell.get(cell, {}).get("aiocoap"), ".2f"),
                fmt(by_cell.get(cell, {}).get("libcoap"), ".2f"),
            ]
        )
    print_table(
        (
            ("window", 12),
            ("mqgate/s", 9),
            ("aiocoap/s", 9),
            ("libcoap/s", 9),
            ("mqgate us", 9),
            ("aiocoap us", 10),
            ("libcoap us", 10),
            ("x aiocoap", 9),
            ("x libcoap", 9),
        ),
        rows,
        left=1,
    )


# ---------------------------------------------------------------- main


def _sustain(value: str) -> dict[str, float]:
    """``SECONDS`` for every server and/or ``SERVER=SECONDS`` items, comma-separated; key ``""``: the rest."""
    out: dict[str, float] = {}
    for item in value.split(","):
        name, _, seconds = item.strip().rpartition("=")
        try:
            out[name] = float(seconds)
        except ValueError:
            out[name] = -1.0
        if out[name] < 0 or (name and name not in SERVERS):
            raise argparse.ArgumentTypeError(
                f"SECONDS or SERVER=SECONDS items, comma-separated, SERVER one of {','.join(SERVERS)} "
                f"(got {value!r})"
            )
    return out


@dataclass(slots=True)
class Results:
    puts: list[PutRun] = field(default_factory=list)
    notifications: list[NotifyRun] = field(default_factory=list)
    sustained: list[PutRun] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _progress(run: PutRun | NotifyRun) -> None:
    f = run.figures()
    measured = None
    if isinstance(run, NotifyRun):
        label = f"mqgate notifications observers={run.observers} {run.notify_type}"
        if "notifications_per_s" in f:
            n: dict[str, Any] = f["notified"]
            measured = (
                f"{n['received']:,}/{n['published'] * run.observers:,} received in {f['seconds']:.2f} s = "
                f"{f['notifications_per_s']:,.0f}/s"
            )
    else:
        label = f"{run.server} {'sustained ' if run.sustained else ''}window={run.window}"
        if "requests_per_s" in f:
            r: dict[str, Any] = f["requests"]
            rss = f" RSS {mib(f['rss_start'])} -> {mib(f['rss_end'])} MiB" if "rss_start" in f else ""
            measured = (
                f"{r['answered']:,}/{r['sent']:,} answered in {f['seconds']:.2f} s = "
                f"{f['requests_per_s']:,.0f} req/s{rss}"
            )
    run.print_progress(label, measured)


def _bench(
    args: argparse.Namespace, workdir: Path, pinning: Pinning, mqgate: MqgateSetup | None, results: Results
) -> None:
    """Every run, server by server; a server that cannot start is skipped with one line."""
    seconds = QUICK_RUN_S if args.quick else RUN_S
    notifications = QUICK_NOTIFICATIONS if args.quick else NOTIFICATIONS
    default_sustain = QUICK_SUSTAIN_S if args.quick else SUSTAIN_S
    for name in args.servers:
        server = SERVERS[name]
        sustain = (
            args.sustain.get(name, args.sustain.get("", default_sustain)) if args.sustain else default_sustain
        )
        try:
            for window in WINDOWS:
                results.puts.append(put_run(server, window, seconds, False, workdir, pinning, mqgate))
                _progress(results.puts[-1])
            if name == "mqgate" and mqgate is not None:
                for notify_type in ("non", "con"):
                    for observers in OBSERVERS:
                        run = notify_run(
                            observers, notify_type, notifications, seconds, workdir, pinning, mqgate
                        )
                        results.notifications.append(run)
                        _progress(run)
            if sustain > 0:
                results.sustained.append(
                    put_run(server, SUSTAIN_WINDOW, sustain, True, workdir, pinning, mqgate)
                )
                _progress(results.sustained[-1])
        except (Unavailable, StartError) as exc:
            results.skipped[name] = str(exc)
            print(f"{name}: skipped: {exc}", flush=True)


def main() -> None:
    parser = bench_parser(
        __doc__,
        f"{QUICK_RUN_S:.0f} s per run, a tenth of the notifications, {QUICK_SUSTAIN_S:.0f} s sustained",
    )
    parser.add_argument(
        "--sustain",
        type=_sustain,
        default=None,
        metavar="SECONDS[,SERVER=SECONDS...]",
        help=f"sustained run length, default {SUSTAIN_S:.0f} ({QUICK_SUSTAIN_S:.0f} with --quick); "
        "0 skips it; e.g. 120,aiocoap=60",
    )
    add_names(parser, "--servers", SERVERS)
    args = parser.parse_args()
    pinning = pin_load_generator("servers")

    results = Results()
    mqgate: MqgateSetup | None = None
    if "mqgate" in args.servers:
        try:
            mqgate = MqgateSetup.load()
        except (StartError, KeyError, ValueError, OSError, subprocess.SubprocessError) as exc:
            results.skipped["mqgate"] = f"its configuration could not be read: {exc}"
            print(f"mqgate: skipped: {results.skipped['mqgate']}", flush=True)
            args.servers.remove("mqgate")
    with scratch("coap") as workdir:
        _bench(args, workdir, pinning, mqgate, results)

    busy = BusyFlags()
    by_cell = ratios(results.puts + results.sustained)
    _print_requests(results.puts, busy)
    if results.notifications:
        _print_notifications(results.notifications, busy)
    if results.sustained:
        _print_sustained(results.sustained, mqgate, busy)
    _print_side_by_side(results.puts + results.sustained, by_cell)
    busy.print_note("rates", "cpu us/req")
    print(
        json.dumps(
            {
                "quick": args.quick,
                "cpus": pinning.figures("server"),
                "mqgate_dedup": None if mqgate is None else asdict(mqgate),
                "requests": [r.figures() for r in results.puts],
                "notifications": [r.figures() for r in results.notifications],
                "sustained": [r.figures() for r in results.sustained],
                "mqgate_requests_per_s_ratio": by_cell,
                "skipped": results.skipped,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
