"""LwM2M gateway benchmark: registrations/s, read commands/s end to end and resident memory per device.

For every number of devices N, a fresh mqgate (pinned to one core) gets N simulated LwM2M devices, each on its
own non-blocking UDP socket, and one raw-socket MQTT client, all multiplexed on one epoll in this process
(pinned to another core). CoAP is encoded by hand (``struct``, not the gateway's codec).

1. registrations/s: every device sends CON POST /rd?ep=dev{i}&lt=3600&lwm2m=1.1&b=U with ``</3/0>,</3303/0>``,
   at most ``REG_WINDOW`` unanswered at a time, until all got 2.01 Created;
2. read commands/s: the MQTT client subscribes to ``lwm2m/+/up/resp`` and publishes
   ``{"reqID": n, "msgType": "read", "data": {"path": "/3303/0/5700"}}`` to ``lwm2m/dev{i}/dn``
   round-robin over the devices, W commands outstanding; each device answers the gateway's CON GET with a
   piggybacked ACK 2.05 text/plain ``21.5``; responses on up/resp are counted, with the latency from
   publish to response;
3. mqgate's resident memory before and after registering the N devices: bytes per registered device.

It prints two tables and one JSON line with every figure. See bench/README.md.

    python bench/lwm2m.py [--quick] [--devices 1,10000] [--windows 1,64]
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    BusyFlags,
    LoadError,
    Meter,
    Outcome,
    Pinning,
    UdpEndpoints,
    add_numbers,
    bench_parser,
    coap_ready,
    fmt,
    gateway_config,
    mqgate_argv,
    mqgate_config,
    pct,
    pin_load_generator,
    print_table,
    rss_bytes,
    running,
    scratch,
    sections_to_disable,
    sockets_error,
)
from _loadgen import complete_packets, connect, percentile_ms, send_all, subscribe, utf8, varint

DEVICES = (1, 10_000)
WINDOWS = (1, 64)
COUNT, QUICK_COUNT = 20_000, 2_000
"""Read commands per (devices, window) cell."""
RUN_S, QUICK_RUN_S = 5.0, 1.0
"""Publishing commands stops after this long even if the count is not reached."""
DRAIN_S = 5.0
"""Longest wait for the last responses once publishing has stopped."""
REG_WINDOW = 64
"""Unanswered registrations at a time."""
RETRY_S = 2.0
"""An unanswered registration is sent again (same message id) after this long (CoAP's ACK_TIMEOUT)."""
SETUP_TIMEOUT_S = 120.0
"""Longest time for registering every device."""
SPARE_FILES = 100
LIFETIME_S = 3600
LIFETIME_GRACE_S = 1_000_000
LATENCY_SAMPLES = 200_000
RESPONSE_FILTER = "lwm2m/+/up/resp"
READ_PATH = "/3303/0/5700"
VALUE = b"21.5"

# CoAP (RFC 7252 §3): version 1 in the two top bits, then the type, then the token length
_CON, _ACK = 0, 2
_POST, _GET, _CREATED, _CONTENT = 0x02, 0x01, 0x41, 0x45
_URI_PATH, _CONTENT_FORMAT, _URI_QUERY = 11, 12, 15
_LINK_FORMAT = 40
_HEADER = struct.Struct(">BBH")
_LINKS = b"</3/0>,</3303/0>"
_now_ns = time.monotonic_ns


def _option(delta: int, value: bytes) -> bytes:
    """One option: delta and length nibbles with their 1- or 2-byte extensions (§3.1)."""
    out = bytearray(1)
    nibbles = []
    for n in (delta, len(value)):
        if n < 13:
            nibbles.append(n)
        elif n < 269:
            nibbles.append(13)
            out.append(n - 13)
        else:
            nibbles.append(14)
            out += struct.pack(">H", n - 269)
    out[0] = nibbles[0] << 4 | nibbles[1]
    return bytes(out) + value


def register_datagram(i: int, mid: int) -> bytes:
    """CON POST /rd?ep=dev{i}&lt=..&lwm2m=1.1&b=U, link-format payload, 4-byte token (LwM2M 1.1 §6.2.1)."""
    out = _HEADER.pack(0x40 | _CON << 4 | 4, _POST, mid) + struct.pack(">I", i)
    out += _option(_URI_PATH, b"rd") + _option(_CONTENT_FORMAT - _URI_PATH, bytes((_LINK_FORMAT,)))
    delta = _URI_QUERY - _CONTENT_FORMAT
    for query in (f"ep=dev{i}", f"lt={LIFETIME_S}", "lwm2m=1.1", "b=U"):
        out += _option(delta, query.encode())
        delta = 0
    return out + b"\xff" + _LINKS


def content_ack(request: bytes) -> bytes:
    """The piggybacked ACK 2.05 text/plain ``VALUE`` to a CON request: same message id and token (§5.2.1)."""
    tkl = request[0] & 0x0F
    return bytes((0x40 | _ACK << 4 | tkl, _CONTENT)) + request[2 : 4 + tkl] + b"\xc0\xff" + VALUE


# ---------------------------------------------------------------- the devices and the application


@dataclass(frozen=True, slots=True)
class Registered:
    """What registering every device saw."""

    devices: int
    seconds: float
    per_s: float
    resent: int
    """Registrations sent again after ``RETRY_S`` without an answer."""
    gateway_cpu_s: float
    load_cpu_s: float


@dataclass(frozen=True, slots=True)
class Commanded:
    """What one read-command run saw; latencies in ms."""

    window: int
    sent: int
    responses: int
    """Answers on up/resp with code 2.05 and the device's value."""
    errors: int
    """Answers on up/resp with another code or content (a timeout is 5.04)."""
    unanswered: int
    gets: int
    """CON GETs the devices answered (more than ``sent`` when the gateway retransmitted)."""
    seconds: float
    """From the first publish to the last response."""
    per_s: float
    p50_ms: float | None
    p99_ms: float | None
    gateway_cpu_s: float
    load_cpu_s: float
    cpus_busy_s: float | None
    socket_drops: int | None


class Devices(UdpEndpoints):
    """N LwM2M devices, each a non-blocking UDP socket connected to the gateway, on one epoll."""

    def __init__(self, n: int, port: int) -> None:
        super().__init__(n, port)
        self.gets = 0

    def _datagrams(self, i: int) -> list[bytes]:
        """Every datagram waiting at device i; CON GETs are answered here and left out."""
        sock, out = self.socks[i], list[bytes]()
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return out
            except ConnectionRefusedError:
                continue  # an ICMP error for an earlier send
            if len(data) >= 4 and data[0] >> 4 & 3 == _CON and data[1] == _GET:
                sock.send(content_ack(data))
                self.gets += 1
            else:
                out.append(data)

    def register(self) -> tuple[float, int]:
        """Registers every device, ``REG_WINDOW`` unanswered at a time; returns (seconds, resent)."""

        def answered(i: int) -> bool:
            created = False
            for data in self._datagrams(i):
                if len(data) < 4 or data[1] == 0:
                    continue  # an empty ACK: the response comes separately
                if data[0] >> 4 & 3 == _CON:
                    self.socks[i].send(_HEADER.pack(0x40 | _ACK << 4, 0, data[2] << 8 | data[3]))
                if data[1] != _CREATED:
                    raise LoadError(f"device {i}: registration answered {data[1] >> 5}.{data[1] & 31:02d}")
                created = True
            return created

        n = len(self.socks)
        start = _now_ns()
        resent = self.exchange(
            [register_datagram(i, (i + 1) & 0xFFFF) for i in range(n)],
            REG_WINDOW,
            RETRY_S,
            SETUP_TIMEOUT_S,
            answered,
            "devices not registered",
        )
        return (_now_ns() - start) / 1e9, resent

    def command(
        self, mqtt: socket.socket, window: int, count: int, seconds: float
    ) -> tuple[int, int, int, int, int, float | None, float | None]:
        """Publishes read commands round-robin over the devices, ``window`` unanswered at a time, until
        ``count`` were sent or ``seconds`` passed, then waits at most ``DRAIN_S`` for the rest.

        Returns (sent, good responses, other responses, start ns, last response ns, p50 ms, p99 ms)."""
        n = len(self.socks)
        topics = [utf8(f"lwm2m/dev{i}/dn") for i in range(n)]
        mqtt_fd = mqtt.fileno()
        self.poller.register(mqtt_fd, select.EPOLLIN)
        sent_at: dict[int, int] = {}
        every = max(1, count // LATENCY_SAMPLES)
        latencies = array("q")
        sent = good = bad = 0
        buf = bytearray()
        poll, device_of = self.poller.poll, self.index_of
        start = last = t = _now_ns()
        stop, drain_until = start + int(seconds * 1e9), 0
        try:
            while True:
                if not drain_until:
                    if sent < count and t < stop:
                        out = bytearray()
                        while len(sent_at) < window and sent < count:
                            payload = b'{"reqID":%d,"msgType":"read","data":{"path":"%s"}}' % (
                                sent,
                                READ_PATH.encode(),
                            )
                            topic = topics[sent % n]
                            out += b"\x30" + varint(len(topic) + len(payload)) + topic + payload
                            sent_at[sent] = t
                            sent += 1
                        if out:
                            send_all(mqtt, out, "the MQTT connection")
                    else:
                        drain_until = t + int(DRAIN_S * 1e9)
                if drain_until and (not sent_at or t > drain_until):
                    break
                events = poll(0.01)
                t = _now_ns()
                for fd, _ in events:
                    if fd != mqtt_fd:
                        self._datagrams(device_of[fd])
                        continue
                    data = mqtt.recv(1 << 18)
                    if not data:
                        raise LoadError("the broker closed the MQTT connection")
                    t = _now_ns()
                    buf += data
                    for first, body_at, length in complete_packets(buf):
                        if first >> 4 == 3:
                            at = body_at + 2 + (buf[body_at] << 8 | buf[body_at + 1])
                            if first & 0x06:
                                at += 2
                            answer = json.loads(buf[at : body_at + length])
                            sent_ns = sent_at.pop(answer.get("reqID"), None)
                            if sent_ns is not None:
                                data_field = answer.get("data") or {}
                                content = data_field.get("content") or [{}]
                                if data_field.get("code") == "2.05" and content[0].get("value") == float(
                                    VALUE
                                ):
                                    good += 1
                                else:
                                    bad += 1
                                if (good + bad) % every == 0:
                                    latencies.append(t - sent_ns)
                                last = t
        finally:
            self.poller.unregister(mqtt_fd)
        ordered = sorted(latencies)
        return sent, good, bad, start, last, percentile_ms(ordered, 50), percentile_ms(ordered, 99)


# ---------------------------------------------------------------- one run per number of devices


@dataclass(slots=True)
class Run(Outcome):
    """One fresh mqgate with N devices, filled in as it goes."""

    devices: int
    registered: Registered | None = None
    commanded: list[Commanded] = field(default_factory=list)
    rss_before: int | None = None
    rss_registered: int | None = None
    rss_end: int | None = None

    @property
    def rss_per_device(self) -> float | None:
        if self.rss_before is None or self.rss_registered is None:
            return None
        return (self.rss_registered - self.rss_before) / self.devices

    def figures(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "registered": None if self.registered is None else asdict(self.registered),
            "commands": [asdict(c) for c in self.commanded],
            "rss_before": self.rss_before,
            "rss_registered": self.rss_registered,
            "rss_end": self.rss_end,
            "rss_per_device_bytes": self.rss_per_device,
        } | self.outcome_figures()


@dataclass(frozen=True, slots=True)
class Settings:
    count: int
    seconds: float
    windows: tuple[int, ...]


def _run(run: Run, settings: Settings, workdir: Path, pinning: Pinning, disabled: list[str]) -> None:
    """Runs every step for ``run.devices`` on a fresh mqgate; raises StartError if mqgate does not start."""
    run.error = sockets_error(run.devices, "devices", SPARE_FILES)
    if run.error:
        return
    config = workdir / f"mqgate-{run.devices}.toml"
    log = config.with_suffix(".log")
    tcp_port, udp_port = gateway_config(config, "lwm2m", f"lifetime_grace = {LIFETIME_GRACE_S}\n", disabled)
    ready = coap_ready(udp_port, log)
    with run.recording(log), running(mqgate_argv(config), log, tcp_port, pinning.broker, ready) as proc:
        pid = proc.pid
        mqtt, reader = connect(tcp_port, f"bench-lwm2m-{os.getpid()}")
        with mqtt, Devices(run.devices, udp_port) as devices:
            subscribe(mqtt, reader, [RESPONSE_FILTER], 0)
            mqtt.setblocking(False)
            run.rss_before = rss_bytes(pid)
            meter, load0 = Meter([pid], None), time.process_time()
            reg_s, resent = devices.register()
            run.registered = Registered(
                run.devices,
                reg_s,
                run.devices / reg_s if reg_s > 0 else 0.0,
                resent,
                meter.usage().cpu_s[0],
                time.process_time() - load0,
            )
            run.rss_registered = rss_bytes(pid)
            for window in settings.windows:
                meter, load0 = Meter([pid], pinning.cpus, udp_port), time.process_time()
                gets0 = devices.gets
                sent, good, bad, start, last, p50, p99 = devices.command(
                    mqtt, window, settings.count, settings.seconds
                )
                seconds = (last - start) / 1e9 if good + bad else 0.0
                usage = meter.usage()
                run.commanded.append(
                    Commanded(
                        window,
                        sent,
                        good,
                        bad,
                        sent - good - bad,
                        devices.gets - gets0,
                        seconds,
                        good / seconds if seconds > 0 else 0.0,
                        p50,
                        p99,
                        usage.cpu_s[0],
                        time.process_time() - load0,
                        usage.busy_s,
                        usage.drops,
                    )
                )
                _print_commanded(run.devices, run.commanded[-1])
        if proc.poll() is not None:
            raise LoadError(f"mqgate exited with code {proc.returncode} during the run")
        run.rss_end = rss_bytes(pid)


# ---------------------------------------------------------------- report


def _print_commanded(devices: int, c: Commanded) -> None:
    print(
        f"devices={devices} window={c.window}: {c.responses:,}/{c.sent:,} answered in {c.seconds:.2f} s "
        f"= {c.per_s:,.0f} reads/s",
        flush=True,
    )


def _print_tables(runs: list[Run]) -> None:
    print()
    print("registration (CON POST /rd, 2.01 Created)")
    rows = []
    for run in runs:
        r = run.registered
        if r is None:
            rows.append([f"{run.devices:,}", f"failed: {run.error}"])
            continue
        rows.append(
            [
                f"{run.devices:,}",
                f"{r.per_s:,.0f}",
                f"{r.seconds:.2f}",
                f"{r.resent:,}",
                fmt(r.gateway_cpu_s * 1e6 / run.devices, ",.0f"),
                fmt(pct(r.gateway_cpu_s, r.seconds), ".0f", "%"),
                fmt(pct(r.load_cpu_s, r.seconds), ".0f", "%"),
                fmt(None if run.rss_before is None else run.rss_before / 2**20, ".1f"),
                fmt(None if run.rss_registered is None else run.rss_registered / 2**20, ".1f"),
                fmt(run.rss_per_device, ",.0f"),
            ]
        )
    print_table(
        (
            ("devices", 7),
            ("regs/s", 7),
            ("seconds", 7),
            ("resent", 6),
            ("cpu us/reg", 10),
            ("mqgate cpu", 10),
            ("load cpu", 8),
            ("rss0 MiB", 8),
            ("rss1 MiB", 8),
            ("B/device", 8),
        ),
        rows,
    )
    print()
    print(f"read commands ({READ_PATH}): MQTT publish -> CON GET -> ACK 2.05 -> up/resp")
    rows, busy = [], BusyFlags()
    for run in runs:
        for c in run.commanded:
            other = (
                None
                if c.cpus_busy_s is None
                else pct(c.cpus_busy_s - c.gateway_cpu_s - c.load_cpu_s, c.seconds)
            )
            rows.append(
                [
                    f"{run.devices:,}",
                    str(c.window),
                    f"{c.per_s:,.0f}",
                    fmt(c.p50_ms, ".2f"),
                    fmt(c.p99_ms, ".2f"),
                    f"{c.responses:,}",
                    f"{c.errors:,}",
                    f"{c.unanswered:,}",
                    f"{c.gets - c.sent:,}",
                    fmt(c.socket_drops, ",d"),
                    fmt(c.gateway_cpu_s * 1e6 / c.responses if c.responses else None, ".0f"),
                    fmt(pct(c.gateway_cpu_s, c.seconds), ".0f", "%"),
                    fmt(pct(c.load_cpu_s, c.seconds), ".0f", "%"),
                    busy.cell(other),
                ]
            )
        if run.error and run.registered is not None:
            rows.append([f"{run.devices:,}", "-", f"failed: {run.error}"])
    print_table(
        (
            ("devices", 7),
            ("window", 6),
            ("reads/s", 7),
            ("p50 ms", 7),
            ("p99 ms", 7),
            ("answered", 8),
            ("errors", 6),
            ("lost", 5),
            ("resent", 6),
            ("drops", 5),
            ("cpu us/read", 11),
            ("mqgate cpu", 10),
            ("load cpu", 8),
            ("other cpu", 9),
        ),
        rows,
    )
    busy.print_note("reads/s", "cpu us/read")


# ---------------------------------------------------------------- main


def main() -> None:
    parser = bench_parser(__doc__, f"{QUICK_COUNT:,} commands or {QUICK_RUN_S:.0f} s per cell")
    add_numbers(parser, "--devices", DEVICES)
    add_numbers(parser, "--windows", WINDOWS)
    args = parser.parse_args()
    settings = Settings(
        QUICK_COUNT if args.quick else COUNT, QUICK_RUN_S if args.quick else RUN_S, tuple(args.windows)
    )
    pinning = pin_load_generator("mqgate")

    runs = [Run(n) for n in args.devices]
    with scratch("lwm2m") as workdir:
        disabled = sections_to_disable(mqgate_config(), ("listeners.tcp", "gateways.lwm2m"))
        for run in runs:
            _run(run, settings, workdir, pinning, disabled)
            r = run.registered
            registered = None
            if r is not None:
                registered = (
                    f"registered in {r.seconds:.2f} s = {r.per_s:,.0f}/s; "
                    f"{fmt(run.rss_per_device, ',.0f')} B of RSS per device"
                )
            run.print_progress(f"devices={run.devices}", registered)

    _print_tables(runs)
    print(
        json.dumps(
            {
                "quick": args.quick,
                "cpus": pinning.figures("mqgate"),
                "count": settings.count,
                "seconds": settings.seconds,
                "registration_window": REG_WINDOW,
                "results": [run.figures() for run in runs],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
