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

import json
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from _common import (
    HOST,
    START_TIMEOUT_S,
    BusyFlags,
    LoadError,
    Pinning,
    StartError,
    Unavailable,
    add_names,
    free_port,
    mosquitto_command,
    mqgate_argv,
    mqgate_config,
    mqgate_toml,
    pin_load_generator,
    print_table,
    running,
    scratch,
    sections_to_disable,
    sockets_error,
    tail,
)
from mqttsn import SPARE_FILES, Cell, Settings, gateway_ready, parser, print_reference

MODES = ("transparent", "aggregating")
CLIENTS = (1, 1000)
UPSTREAM_CONNECTED = ": connected (MQTT"
"""What mqgate logs (at info) when an upstream connection is up: the aggregating mode is ready then."""


# ---------------------------------------------------------------- one cell


@dataclass(slots=True, kw_only=True)
class EdgeCell(Cell):
    """One (mode, clients, window) run, filled in as it goes; its ``connect_s`` includes, in transparent
    mode, every client's upstream connection."""

    PROCESSES: ClassVar[tuple[str, ...]] = ("mqgate", "mosquitto")
    LOG_LEVELS: ClassVar[tuple[str, ...]] = ("warning", "error", "critical")
    """mqgate logs at info (the upstream connection's "connected" line tells when it is ready)."""
    LOG_KEY: ClassVar[str] = "log_problems"

    mode: str

    def figures(self) -> dict[str, Any]:
        return {"mode": self.mode} | Cell.figures(self)


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


def _ready(mode: str, udp_port: int, log: Path) -> Callable[[subprocess.Popen[bytes]], None]:
    """The gateway answers SEARCHGW; in aggregating mode its shared upstream connection is up as well."""
    gateway = gateway_ready(udp_port, log)

    def check(proc: subprocess.Popen[bytes]) -> None:
        gateway(proc)
        if mode != "aggregating":
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        while UPSTREAM_CONNECTED not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StartError(f"the upstream connection did not come up: {tail(log.read_text())}")
            time.sleep(0.05)

    return check


def _run_cell(
    cell: EdgeCell,
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
    config = workdir / f"mqgate-{name}.toml"
    log = config.with_suffix(".log")
    argv = _mqgate_command(config, cell.mode, mosquitto_port, udp_port, cell.clients, disabled)
    mosquitto_log = workdir / f"mosquitto-{name}.log"
    with cell.recording(log, StartError, Unavailable):
        mosquitto_argv = mosquitto_command(workdir, mosquitto_port)
        with running(mosquitto_argv, mosquitto_log, mosquitto_port, mosquitto_cpus) as mosquitto:
            with running(argv, log, None, pinning.broker, _ready(cell.mode, udp_port, log)) as mqgate:
                cell.measure(settings, mqgate, udp_port, mosquitto_port, pinning, [mosquitto.pid])
            if mosquitto.poll() is not None:
                raise LoadError(f"mosquitto exited with code {mosquitto.returncode} during the run")


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
    ("B/client", 8),
    ("x paho", 6),
)


def _print_table(cells: list[EdgeCell]) -> None:
    print_reference()
    busy = BusyFlags()
    print_table(_COLUMNS, [[c.mode, f"{c.clients:,}", str(c.window), *c.row(busy)] for c in cells])
    busy.print_note("msgs/s", "cpu us/msg")


# ---------------------------------------------------------------- main


def main() -> None:
    cli = parser(__doc__, CLIENTS)
    add_names(cli, "--modes", MODES)
    cli.add_argument(
        "--mosquitto-cpu",
        choices=("broker", "load", "any"),
        default="broker",
        help="where mosquitto runs: beside mqgate (default), beside the load generator, or unpinned",
    )
    args = cli.parse_args()
    settings = Settings.of(args)
    pinning = pin_load_generator("mqgate")
    mosquitto_cpus = {"broker": pinning.broker, "load": pinning.load, "any": None}[args.mosquitto_cpu]
    print(f"mosquitto on {f'cpu {sorted(mosquitto_cpus)}' if mosquitto_cpus else 'any cpu'}")

    cells = [EdgeCell(n, w, mode=m) for m in args.modes for n in args.clients for w in args.windows]
    with scratch("edge") as workdir:
        disabled = _sections_off(mqgate_config())
        for cell in cells:
            _run_cell(cell, settings, workdir, pinning, mosquitto_cpus, disabled)
            label = f"mode={cell.mode} clients={cell.clients} window={cell.window}"
            cell.print_progress(label, cell.delivered())

    _print_table(cells)
    print(
        json.dumps(
            {
                "quick": args.quick,
                "cpus": pinning.figures("mqgate") | {"mosquitto": sorted(mosquitto_cpus or ())},
            }
            | settings.figures()
            | {"results": [cell.figures() for cell in cells]}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
