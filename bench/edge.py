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
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    HOST,
    START_TIMEOUT_S,
    BusyFlags,
    Meter,
    Pinning,
    StartError,
    Unavailable,
    cpu_figures,
    fmt,
    free_port,
    mosquitto_command,
    mqgate_argv,
    mqgate_config,
    mqgate_toml,
    names_of,
    pct,
    pin_load_generator,
    positive_ints,
    print_table,
    reap,
    rss_bytes,
    running,
    sections_to_disable,
    sockets_error,
    tail,
)
from _loadgen import Inbox, LoadError, Received
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
    Settings,
    _subscriber_main,
    _wait_gateway,
    print_reference,
    run_cells,
    run_figures,
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
        run = run_figures(p, r, self.window)
        seconds, delivered = run["seconds"], r.delivered
        # mosquitto's CPU time is taken out of the busy time, so that "other" is neither it nor mqgate's
        busy_s = None if self.cpus_busy_s is None else self.cpus_busy_s - self.mosquitto_cpu_s
        return (
            out
            | run
            | cpu_figures("mqgate", "msg", self.mqgate_cpu_s, p.cpu_s + r.cpu_s, busy_s, seconds, delivered)
            | {
                "mosquitto_cpu_us_per_msg": self.mosquitto_cpu_s * 1e6 / delivered if delivered else None,
                "mosquitto_cpu_pct": pct(self.mosquitto_cpu_s, seconds),
                "socket_drops": self.socket_drops,
            }
        )


def _mqgate_command(
    config: Path, mode: str, mosquitto_port: int, udp_port: int, clients: int, disabled: list[str]
) -> list[str]:
    """Writes the configuration of an mqgate in gateway-only mode towards mosquitto into ``config`` (its
    store-and-forward buffer beside it) and returns the command line."""
    config.write_text(
        mqgate_toml(
            "[upstream]\n"
            f'url = "mqtt://{HOST}:{mosquitto_port}"\n'
            f'mode = "{mode}"\n'
            f'buffer_dir = "{config.with_suffix(".buffer")}"\n'
            "max_buffer_bytes = 1073741824\n\n"
            f'[gateways.mqttsn]\nbind = "{HOST}:{udp_port}"\nadvertise_interval = 0\n'
            f"max_clients = {max(clients, 10_000)}\n\n",
            disabled,
            "info",  # the upstream connection's "connected" line tells when it is ready
        )
    )
    return mqgate_argv(config)


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
    cell.error = sockets_error(cell.clients, "clients", SPARE_FILES)
    if cell.error:
        return
    name = f"{cell.mode}-{cell.clients}x{cell.window}"
    mosquitto_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    mosquitto_log = workdir / f"mosquitto-{name}.log"
    config = workdir / f"mqgate-{name}.toml"
    log = config.with_suffix(".log")
    argv = _mqgate_command(config, cell.mode, mosquitto_port, udp_port, cell.clients, disabled)
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
            mosquitto_command(workdir, mosquitto_port), mosquitto_log, mosquitto_port, mosquitto_cpus
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
    except (LoadError, OSError, StartError, Unavailable) as exc:
        cell.error = str(exc) or repr(exc)
    finally:
        expected.value = max(expected.value, 0)  # a subscriber still waiting stops
        reap(sub)
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
        meter = Meter([pid, mosquitto_pid], cpus, udp_port)
        in_flight = cell.clients * cell.window
        cell.in_flight = min(in_flight, settings.max_in_flight or in_flight)
        cell.published = clients.publish(cell.window, cell.in_flight, settings.count, settings.seconds)
        usage = meter.usage()
        (cell.mqgate_cpu_s, cell.mosquitto_cpu_s), cell.cpus_busy_s = usage.cpu_s, usage.busy_s
        cell.socket_drops = usage.drops
        return cell.published
    finally:
        clients.close()


# ---------------------------------------------------------------- report


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


def _print_table(cells: list[Cell]) -> None:
    print_reference()
    rows, busy = [], BusyFlags()
    for cell in cells:
        f = cell.figures()
        row = [cell.mode, f"{cell.clients:,}", str(cell.window), fmt(cell.in_flight, ",d")]
        if "msgs_per_s" not in f:
            rows.append([*row, f"failed: {cell.error}"])
            continue
        rows.append(
            [
                *row,
                *run_cells(f),
                fmt(f["mqgate_cpu_us_per_msg"], ".1f"),
                fmt(f["mosquitto_cpu_us_per_msg"], ".1f"),
                fmt(f["mqgate_cpu_pct"], ".0f", "%"),
                fmt(f["mosquitto_cpu_pct"], ".0f", "%"),
                fmt(f["load_cpu_pct"], ".0f", "%"),
                busy.cell(f["other_cpu_pct"]),
                fmt(f["ratio_to_reference"], ".2f"),
                *([cell.error] if cell.error else []),
            ]
        )
    print_table(_COLUMNS, rows)
    busy.print_note("msgs/s", "cpu us/msg")


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_COUNT:,} messages or {QUICK_RUN_S:.0f} s per cell"
    )
    parser.add_argument(
        "--modes",
        type=names_of(MODES),
        default=list(MODES),
        help="comma-separated, default transparent,aggregating",
    )
    parser.add_argument(
        "--clients", type=positive_ints, default=list(CLIENTS), help="comma-separated, default 1,1000"
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
    pinning = pin_load_generator("mqgate")
    mosquitto_cpus = {"broker": pinning.broker, "load": pinning.load, "any": None}[args.mosquitto_cpu]
    print(f"mosquitto on {f'cpu {sorted(mosquitto_cpus)}' if mosquitto_cpus else 'any cpu'}")

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
                "cpus": pinning.figures("mqgate") | {"mosquitto": sorted(mosquitto_cpus or ())},
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
