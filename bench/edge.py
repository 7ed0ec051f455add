"""Edge-mode benchmark: MQTT-SN QoS 1 devices through mqgate in gateway-only mode to mosquitto.

For every upstream mode (transparent, aggregating), number of devices N and window W, the benchmark starts a
fresh mosquitto and a fresh mqgate with ``upstream.url`` pointing at it (no embedded MQTT listener: every
MQTT-SN session goes upstream, QoS 1 through the store-and-forward buffer), both pinned to one core. N
simulated MQTT-SN clients (``bench/mqttsn.py``'s load generator, on another core) CONNECT, REGISTER
``bench/sn/{i}`` and publish QoS 1 with W PUBLISHes outstanding per client; a raw-socket MQTT subscriber
process takes ``bench/sn/#`` at QoS 0 **on mosquitto**. Per cell it prints delivered msgs/s, PUBACKs/s,
p50/p99 send-to-delivery latency, losses, mqgate's and mosquitto's CPU time per message, and the ratio to
the Eclipse Paho MQTT-SN gateway's figures in front of mosquitto; then one JSON line with every figure. See
bench/README.md.

    python bench/edge.py [--quick] [--modes transparent,aggregating] [--clients 1,1000] [--windows 1,8]
                         [--max-in-flight 100] [--mosquitto-cpu broker|load|any]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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
from _loadgen import Inbox, LoadError
from mqttsn import (
    COUNT,
    DRAIN_S,
    MAX_IN_FLIGHT,
    QUICK_COUNT,
    QUICK_RUN_S,
    REFERENCE_MSGS_PER_S,
    RUN_S,
    SETUP_TIMEOUT_S,
    SPARE_FILES,
    Clients,
    Published,
    Received,
    Settings,
    _numbers,
    _subscriber_main,
    _wait_gateway,
)

MODES = ("transparent", "aggregating")
CLIENTS = (1, 1000)
WINDOWS = (1, 8)
_PROBLEMS = ("warning", "error", "critical")
UPSTREAM_CONNECTED = ": connected (MQTT"
"""What mqgate logs (at info) when an upstream connection is up: the aggregating mode is ready then."""


# ---------------------------------------------------------------- one cell


@dataclass(slots=True)
class Cell:
    """One (mode, clients, window) run, filled in as it goes."""

    mode: str
    clients: int
    window: int
    error: str | None = None
    in_flight: int | None = None
    published: Published | None = None
    received: Received | None = None
    connect_s: float | None = None
    """Time to CONNECT (transparent: each opens its upstream connection) and REGISTER every client."""
    setup_resent: int = 0
    rss_before: int | None = None
    rss_connected: int | None = None
    mqgate_cpu_s: float = 0.0
    mosquitto_cpu_s: float = 0.0
    cpus_busy_s: float | None = None
    socket_drops: int | None = None
    log_problems: int = 0
    """mqgate log lines at warning or error."""
    log_tail: str = ""

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "clients": self.clients,
            "window": self.window,
            "error": self.error,
            "in_flight": self.in_flight,
            "connect_s": self.connect_s,
            "setup_resent": self.setup_resent,
            "rss_before": self.rss_before,
            "rss_connected": self.rss_connected,
            "rss_per_client_bytes": (
                None
                if self.rss_before is None or self.rss_connected is None
                else (self.rss_connected - self.rss_before) / self.clients
            ),
            "log_problems": self.log_problems,
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
        per_msg = 1e6 / r.delivered if r.delivered else None
        return out | {
            "published": asdict(p),
            "received": asdict(r),
            "seconds": seconds,
            "msgs_per_s": msgs_per_s,
            "puback_msgs_per_s": p.acked / ack_seconds if ack_seconds > 0 else 0.0,
            "p50_ms": r.p50_ms,
            "p99_ms": r.p99_ms,
            "lost": p.sent - p.refused - r.delivered,
            "mqgate_cpu_us_per_msg": self.mqgate_cpu_s * per_msg if per_msg else None,
            "mosquitto_cpu_us_per_msg": self.mosquitto_cpu_s * per_msg if per_msg else None,
            "mqgate_cpu_pct": _pct(self.mqgate_cpu_s, seconds),
            "mosquitto_cpu_pct": _pct(self.mosquitto_cpu_s, seconds),
            "load_cpu_pct": _pct(load_cpu_s, seconds),
            "other_cpu_pct": (
                None
                if self.cpus_busy_s is None
                else _pct(self.cpus_busy_s - self.mqgate_cpu_s - self.mosquitto_cpu_s - load_cpu_s, seconds)
            ),
            "socket_drops": self.socket_drops,
            "reference_msgs_per_s": reference,
            "ratio_to_reference": msgs_per_s / reference if reference else None,
        }


def _pct(part: float, whole: float) -> float | None:
    return 100 * part / whole if whole else None


def _mosquitto_command(workdir: Path, port: int) -> list[str]:
    exe = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if exe is None:
        raise StartError("mosquitto not found (apt-get install mosquitto)")
    config = workdir / "mosquitto.conf"
    # As in bench/broker.py: no queue limits (mosquitto 2.0 drops QoS 0 deliveries to a client with
    # max_queued_messages packets waiting), TCP_NODELAY as asyncio sets it, no persistence.
    config.write_text(
        f"listener {port} {HOST}\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 1000000\n"
        "max_queued_bytes 0\n"
        "max_inflight_messages 100\n"
        "set_tcp_nodelay true\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )
    return [exe, "-c", str(config)]


def _mqgate_command(
    workdir: Path, name: str, mode: str, mosquitto_port: int, udp_port: int, clients: int, disabled: list[str]
) -> tuple[list[str], Path]:
    config = workdir / f"mqgate-{name}.toml"
    config.write_text(
        "[upstream]\n"
        f'url = "mqtt://{HOST}:{mosquitto_port}"\n'
        f'mode = "{mode}"\n'
        f'buffer_dir = "{workdir / ("buffer-" + name)}"\n'
        "max_buffer_bytes = 1073741824\n\n"
        f'[gateways.mqttsn]\nbind = "{HOST}:{udp_port}"\nadvertise_interval = 0\n'
        f"max_clients = {max(clients, 10_000)}\n\n"
        + "".join(f"[{section}]\nenabled = false\n\n" for section in disabled)
        + '[log]\nlevel = "info"\n'  # the upstream connection's "connected" line tells when it is ready
    )
    return [sys.executable, "-m", "core.cli", "--config", str(config)], config.with_suffix(".log")


def _sections_off(config: dict[str, Any]) -> list[str]:
    """Every listener and gateway but MQTT-SN, and any other top-level section with an ``enabled`` switch
    (the HTTP API): nothing binds a fixed port."""
    listed = sections_to_disable(config, ("gateways.mqttsn",))
    return listed + [
        name
        for name, section in config.items()
        if isinstance(section, dict)
        and section.get("enabled") is True
        and name not in ("listeners", "gateways")
    ]


def _ready(mode: str, udp_port: int, log: Path) -> Any:
    """The gateway answers SEARCHGW; in aggregating mode its shared upstream connection is up as well."""

    def check(proc: subprocess.Popen[bytes]) -> None:
        _wait_gateway(udp_port, proc)
        if mode != "aggregating":
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        while UPSTREAM_CONNECTED not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StartError(f"the upstream connection did not come up: {tail(log.read_text())}")
            time.sleep(0.05)

    return check


def _run_cell(
    cell: Cell,
    settings: Settings,
    workdir: Path,
    pinning: Pinning,
    mosquitto_cpus: set[int] | None,
    disabled: list[str],
) -> None:
    """Runs ``cell`` on a fresh mosquitto and mqgate and fills it in."""
    _, open_files = resource.getrlimit(resource.RLIMIT_NOFILE)
    if cell.clients + SPARE_FILES > open_files:
        cell.error = f"{cell.clients:,} clients need as many sockets: the open files limit is {open_files:,}"
        return
    name = f"{cell.mode}-{cell.clients}x{cell.window}"
    mosquitto_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    mosquitto_log = workdir / f"mosquitto-{name}.log"
    argv, log = _mqgate_command(workdir, name, cell.mode, mosquitto_port, udp_port, cell.clients, disabled)
    ctx = mp.get_context("fork")
    expected = ctx.RawValue(ctypes.c_int64, -1)
    results: mp.Queue[tuple[str, Any]] = ctx.Queue()
    sub = ctx.Process(
        target=_subscriber_main,
        args=(mosquitto_port, settings.count, pinning.load, expected, results),
        daemon=True,
    )
    try:
        with running(
            _mosquitto_command(workdir, mosquitto_port), mosquitto_log, mosquitto_port, mosquitto_cpus
        ) as mosquitto:
            sub.start()
            inbox = Inbox(results)
            inbox.take("sub-ready", SETUP_TIMEOUT_S)
            with running(argv, log, None, pinning.broker, ready=_ready(cell.mode, udp_port, log)) as mqgate:
                published = _publish(cell, settings, udp_port, mqgate.pid, mosquitto.pid, pinning.cpus)
                expected.value = published.sent - published.refused
                cell.received = inbox.take("sub", DRAIN_S + SETUP_TIMEOUT_S)
                if mqgate.poll() is not None:
                    raise LoadError(f"mqgate exited with code {mqgate.returncode} during the run")
            if mosquitto.poll() is not None:
                raise LoadError(f"mosquitto exited with code {mosquitto.returncode} during the run")
    except (LoadError, OSError, StartError) as exc:
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
        problems = [line for line in lines if any(f" {level} " in line for level in _PROBLEMS)]
        cell.log_problems, cell.log_tail = len(problems), tail("\n".join(problems), 5)


def _publish(
    cell: Cell, settings: Settings, udp_port: int, pid: int, mosquitto_pid: int, cpus: set[int] | None
) -> Published:
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
        cpu0, mcpu0 = cpu_seconds(pid), cpu_seconds(mosquitto_pid)
        busy0 = busy_seconds(cpus) if cpus else None
        in_flight = cell.clients * cell.window
        cell.in_flight = min(in_flight, settings.max_in_flight or in_flight)
        cell.published = clients.publish(cell.window, cell.in_flight, settings.count, settings.seconds)
        cell.mqgate_cpu_s = cpu_seconds(pid) - cpu0
        cell.mosquitto_cpu_s = cpu_seconds(mosquitto_pid) - mcpu0
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
    ("mode", 11),
    ("clients", 7),
    ("window", 6),
    ("in flight", 9),
    ("msgs/s", 8),
    ("pubacks/s", 9),
    ("p50 ms", 7),
    ("p99 ms", 7),
    ("lost", 5),
    ("resent", 6),
    ("drops", 5),
    ("mqgate us/msg", 13),
    ("mosq us/msg", 11),
    ("mqgate cpu", 10),
    ("mosq cpu", 8),
    ("load cpu", 8),
    ("other cpu", 9),
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
        row = [cell.mode, f"{cell.clients:,}", str(cell.window), _fmt(cell.in_flight, ",d")]
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
            _fmt(f["mqgate_cpu_us_per_msg"], ".1f"),
            _fmt(f["mosquitto_cpu_us_per_msg"], ".1f"),
            _fmt(f["mqgate_cpu_pct"], ".0f", "%"),
            _fmt(f["mosquitto_cpu_pct"], ".0f", "%"),
            _fmt(f["load_cpu_pct"], ".0f", "%"),
            _fmt(f["other_cpu_pct"], ".0f", "%") + ("!" if busy else ""),
            _fmt(f["ratio_to_reference"], ".2f"),
        ]
        print(_line(row) + (f"  {cell.error}" if cell.error else ""))
    if flagged:
        print(
            f"! other programs kept the CPUs more than {BUSY_OTHER_PCT:.0f}% busy during that run: "
            "its msgs/s and latencies are not comparable, cpu us/msg suffers least"
        )


def _print_progress(cell: Cell) -> None:
    f = cell.figures()
    label = f"mode={cell.mode} clients={cell.clients} window={cell.window}"
    if "msgs_per_s" in f:
        print(
            f"{label}: {f['received']['delivered']:,}/{f['published']['sent']:,} delivered in "
            f"{f['seconds']:.2f} s = {f['msgs_per_s']:,.0f} msgs/s; connected in {cell.connect_s:.2f} s",
            flush=True,
        )
    if cell.error:
        print(f"{label}: failed: {cell.error}", flush=True)
    if cell.log_problems:
        print(f"  mqgate logged {cell.log_problems} warnings or errors, last: {cell.log_tail}", flush=True)


# ---------------------------------------------------------------- main


def _modes(value: str) -> list[str]:
    modes = [m.strip() for m in value.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(MODES)} (got {value!r})")
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_COUNT:,} messages or {QUICK_RUN_S:.0f} s per cell"
    )
    parser.add_argument(
        "--modes", type=_modes, default=list(MODES), help="comma-separated, default transparent,aggregating"
    )
    parser.add_argument(
        "--clients", type=_numbers, default=list(CLIENTS), help="comma-separated, default 1,1000"
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
    parser.add_argument(
        "--mosquitto-cpu",
        choices=("broker", "load", "any"),
        default="broker",
        help="where mosquitto runs: beside mqgate (default), beside the load generator, or unpinned",
    )
    args = parser.parse_args()
    settings = Settings(
        QUICK_COUNT if args.quick else COUNT, QUICK_RUN_S if args.quick else RUN_S, max(0, args.max_in_flight)
    )

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pinning = Pinning.split()
    mosquitto_cpus = {"broker": pinning.broker, "load": pinning.load, "any": None}[args.mosquitto_cpu]
    if pinning.load and pinning.broker:
        os.sched_setaffinity(0, pinning.load)
        where = sorted(mosquitto_cpus) if mosquitto_cpus else "any cpu"
        print(
            f"load generator on cpu {sorted(pinning.load)}, mqgate on cpu {sorted(pinning.broker)}, "
            f"mosquitto on {where}"
        )
    else:
        print("one cpu only: everything shares it (figures are not comparable to 2-cpu runs)")

    cells = [Cell(m, n, w) for m in args.modes for n in args.clients for w in args.windows]
    try:
        disabled = _sections_off(mqgate_config())
        with tempfile.TemporaryDirectory(prefix="mqgate-bench-edge-") as tmp:
            for cell in cells:
                _run_cell(cell, settings, Path(tmp), pinning, mosquitto_cpus, disabled)
                _print_progress(cell)
    except StartError as exc:
        sys.exit(f"failed to start: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted")

    _print_table(cells)
    print(
        json.dumps(
            {
                "quick": args.quick,
                "cpus": {
                    "load": sorted(pinning.load or ()),
                    "mqgate": sorted(pinning.broker or ()),
                    "mosquitto": sorted(mosquitto_cpus or ()),
                },
                "count": settings.count,
                "max_in_flight": settings.max_in_flight,
                "reference_msgs_per_s": REFERENCE_MSGS_PER_S,
                "results": [cell.figures() for cell in cells],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
