"""Side-by-side MQTT 3.1.1 broker benchmark: mqgate against mosquitto and amqtt.

Each broker is started in turn on a free loopback port (a fresh process per scenario) and pinned to one core,
while the load generator (``_loadgen.py``: raw sockets, pre-encoded pipelined PUBLISHes, a subscriber that
parses the byte stream itself) runs on another. For every scenario and broker it prints delivered msgs/s,
p50/p99 latency, the broker's own CPU time per delivered message (utime+stime from /proc/<pid>/stat) and
mqgate's msgs/s divided by each peer's, then one JSON line with every figure. See bench/README.md.

    python bench/broker.py [--quick] [--brokers mqgate,mosquitto,amqtt] [--scenarios a,b,c,d]
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    HOST,
    REPO,
    BusyFlags,
    LoadError,
    Pinning,
    StartError,
    Unavailable,
    add_names,
    bench_parser,
    busy_seconds,
    cpu_figures,
    cpu_seconds,
    fmt,
    free_port,
    mosquitto_command,
    mqgate_argv,
    mqgate_toml,
    pin_load_generator,
    print_table,
    running,
    scratch,
    tail,
)
from _loadgen import Load, RunResult, run

AMQTT_VENV = REPO / "bench" / ".venv-amqtt"
AMQTT_REQUIREMENT = "amqtt==0.12.1"
RUN_S, QUICK_RUN_S = 5.0, 1.0
"""Publishing time per scenario; the count (a tenth with --quick) may end it sooner."""
DRAIN_S, QUICK_DRAIN_S = 5.0, 2.0
"""Longest wait for the last deliveries once publishing has stopped."""


# ---------------------------------------------------------------- brokers


@dataclass(frozen=True, slots=True)
class Broker:
    name: str
    command: Callable[[Path, int], list[str]]
    """Writes the broker's configuration into a directory and returns its command line for a port."""


def _mqgate_command(workdir: Path, port: int) -> list[str]:
    config = workdir / "mqgate.toml"
    # The same limits as mosquitto's below: 100 QoS 1 messages in flight, a queue that does not drop.
    config.write_text(
        mqgate_toml(
            f'[listeners.tcp]\nbind = "{HOST}:{port}"\n\n'
            "[broker]\nmax_inflight = 100\nmax_mqueue_len = 1000000\n\n",
            (),
        )
    )
    return mqgate_argv(config)


def _amqtt_command(workdir: Path, port: int) -> list[str]:
    exe = _ensure_amqtt()
    config = workdir / "amqtt.yaml"
    config.write_text(
        "listeners:\n"
        "  default:\n"
        "    type: tcp\n"
        f"    bind: {HOST}:{port}\n"
        "plugins:\n"
        "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
        "    allow_anonymous: true\n"
    )
    return [str(exe), "-c", str(config)]


def _ensure_amqtt() -> Path:
    """amqtt in its own virtual environment (it pins its own dependencies), created once and kept."""
    exe = AMQTT_VENV / "bin" / "amqtt"
    if exe.exists():
        return exe
    print(f"amqtt: installing {AMQTT_REQUIREMENT} into {AMQTT_VENV.relative_to(REPO)} (once)", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(AMQTT_VENV)],
        [str(AMQTT_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", AMQTT_REQUIREMENT],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"install failed: {exc}") from exc
        if done.returncode != 0:
            raise Unavailable(f"install failed: {tail(done.stdout + done.stderr)}")
    if not exe.exists():
        raise Unavailable(f"install did not provide {exe}")
    return exe


BROKERS = {
    b.name: b
    for b in (
        Broker("mqgate", _mqgate_command),
        Broker("mosquitto", mosquitto_command),
        Broker("amqtt", _amqtt_command),
    )
}


@contextlib.contextmanager
def _running(
    broker: Broker, workdir: Path, label: str, cpus: set[int] | None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Starts the broker, yields (process, port) once it accepts connections; always stops and reaps it."""
    port = free_port()
    argv = broker.command(workdir, port)
    with running(argv, workdir / f"{broker.name}-{label}.log", port, cpus) as proc:
        yield proc, port


def _probe(pid: int, cpus: set[int] | None) -> tuple[float, float | None]:
    return cpu_seconds(pid), busy_seconds(cpus) if cpus else None


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    qos: int
    topics: tuple[str, ...]
    subscriptions: tuple[tuple[str, ...], ...]
    fanout: int
    count: int
    """Publishes in a default run; ``--quick`` uses a tenth."""

    def load(self, port: int, quick: bool) -> Load:
        return Load(
            port=port,
            qos=self.qos,
            topics=self.topics,
            subscriptions=self.subscriptions,
            fanout=self.fanout,
            count=self.count // 10 if quick else self.count,
            seconds=QUICK_RUN_S if quick else RUN_S,
            drain_s=QUICK_DRAIN_S if quick else DRAIN_S,
        )


def _wildcard_scenario() -> Scenario:
    """10,000 wildcard filters over 10 connections; each topic matches exactly 2 filters on 2 connections."""
    groups, connections = 5000, 10
    filters: list[list[str]] = [[] for _ in range(connections)]
    for g in range(groups):
        filters[g % connections].append(f"bench/d/{g}/+/x")
        filters[(g + 1) % connections].append(f"bench/d/{g}/#")
    topics = [f"bench/d/{g}/{g % 7}/x" for g in range(groups)]
    random.Random(1).shuffle(topics)
    return Scenario(
        "d",
        "10k wildcard subs",
        0,
        tuple(topics),
        tuple(tuple(f) for f in filters),
        fanout=2,
        count=1_000_000,
    )


SCENARIOS = {
    s.key: s
    for s in (
        Scenario("a", "1 -> 1 QoS 0", 0, ("bench/a",), (("bench/a",),), fanout=1, count=2_000_000),
        Scenario("b", "1 -> 1 QoS 1", 1, ("bench/b",), (("bench/b",),), fanout=1, count=1_000_000),
        Scenario("c", "1 -> 50 QoS 0", 0, ("bench/c",), (("bench/c",),) * 50, fanout=50, count=100_000),
        _wildcard_scenario(),
    )
}


# ---------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    broker: str
    result: RunResult | None
    error: str | None

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scenario": self.scenario, "broker": self.broker, "error": self.error}
        if self.result is not None:
            r = self.result
            out |= (
                asdict(r)
                | {"lost": r.expected - r.delivered}
                | cpu_figures(
                    "msg", {"broker": r.broker_cpu_s}, r.load_cpu_s, r.cpus_busy_s, r.seconds, r.delivered
                )
            )
        return out


def _ratios(rows: list[Row]) -> dict[str, dict[str, float]]:
    """mqgate msgs/s divided by each peer's, per scenario."""
    rates = {(r.scenario, r.broker): r.result.msgs_per_s for r in rows if r.result and r.result.msgs_per_s}
    ratios: dict[str, dict[str, float]] = {}
    for (scenario, broker), rate in rates.items():
        mqgate = rates.get((scenario, "mqgate"))
        if mqgate is not None and broker != "mqgate":
            ratios.setdefault(scenario, {})[broker] = mqgate / rate
    return ratios


_COLUMNS = (  # header, width; the first two are left-aligned
    ("scenario", 22),
    ("broker", 9),
    ("msgs/s", 10),
    ("p50 ms", 8),
    ("p99 ms", 8),
    ("cpu us/msg", 10),
    ("broker cpu", 10),
    ("load cpu", 8),
    ("other cpu", 9),
    ("delivered", 11),
    ("lost", 7),
    ("mqgate/x", 8),
)


def _print_table(rows: list[Row], ratios: dict[str, dict[str, float]]) -> None:
    print()
    lines, busy = [], BusyFlags()
    for row in sorted(rows, key=lambda r: (r.scenario, list(BROKERS).index(r.broker))):
        cells = [f"{row.scenario}  {SCENARIOS[row.scenario].title}", row.broker]
        f = row.figures()
        if row.result is None:
            lines.append([*cells, f"failed: {row.error}"])
            continue
        lines.append(
            [
                *cells,
                fmt(f["msgs_per_s"], ",.0f"),
                fmt(f["p50_ms"], ".2f"),
                fmt(f["p99_ms"], ".2f"),
                *busy.cpu_cells(f, ("broker",), "msg"),
                f"{f['delivered']:,}",
                f"{f['lost']:,}",
                fmt(ratios.get(row.scenario, {}).get(row.broker), ".2f"),
            ]
        )
    print_table(_COLUMNS, lines, left=2)
    busy.print_note("msgs/s", "cpu us/msg")


# ---------------------------------------------------------------- main


def _run_scenario(broker: Broker, key: str, quick: bool, workdir: Path, pinning: Pinning) -> Row:
    """One scenario on a fresh broker process; raises ``Unavailable`` or ``StartError`` if it cannot start."""
    try:
        with _running(broker, workdir, key, pinning.broker) as (proc, port):
            probe = functools.partial(_probe, proc.pid, pinning.cpus)
            result = run(SCENARIOS[key].load(port, quick), pinning.load, probe)
            if proc.poll() is not None:
                return Row(
                    key, broker.name, None, f"the broker exited with code {proc.returncode} during the run"
                )
    except LoadError as exc:
        return Row(key, broker.name, None, str(exc))
    return Row(key, broker.name, result, None)


def _bench_broker(
    broker: Broker, scenarios: list[str], quick: bool, workdir: Path, pinning: Pinning
) -> tuple[list[Row], str | None]:
    """Runs the scenarios on ``broker``; returns the rows, and why the broker was skipped if it was."""
    rows: list[Row] = []
    for key in scenarios:
        try:
            row = _run_scenario(broker, key, quick, workdir, pinning)
        except Unavailable as exc:
            print(f"{broker.name}: skipped: {exc}", flush=True)
            return rows, f"skipped: {exc}"
        except StartError as exc:
            if not rows:
                print(f"{broker.name}: failed to start: {exc}", flush=True)
                return rows, f"failed to start: {exc}"
            row = Row(key, broker.name, None, str(exc))
        rows.append(row)
        r = row.result
        if r is None:
            print(f"{broker.name} {key}: failed: {row.error}", flush=True)
        else:
            print(
                f"{broker.name} {key}: {r.delivered:,}/{r.expected:,} delivered in {r.seconds:.2f} s = "
                f"{r.msgs_per_s:,.0f} msgs/s, broker cpu {r.broker_cpu_s:.2f} s",
                flush=True,
            )
    return rows, None


def main() -> None:
    parser = bench_parser(__doc__, "a tenth of the messages, 1 s per scenario")
    add_names(parser, "--brokers", BROKERS)
    add_names(parser, "--scenarios", SCENARIOS)
    args = parser.parse_args()

    pinning = pin_load_generator("broker")

    rows: list[Row] = []
    skipped: dict[str, str] = {}
    with scratch("broker") as workdir:
        for name in args.brokers:
            broker_rows, skip = _bench_broker(BROKERS[name], args.scenarios, args.quick, workdir, pinning)
            rows += broker_rows
            if skip:
                skipped[name] = skip

    ratios = _ratios(rows)
    _print_table(rows, ratios)
    print(
        json.dumps(
            {
                "quick": args.quick,
                "cpus": pinning.figures("broker"),
                "results": [r.figures() for r in rows],
                "mqgate_msgs_per_s_ratio": ratios,
                "skipped": skipped,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
