"""What the benchmarks share: starting, pinning and stopping the process under test, free loopback ports,
probes of a process's CPU time and resident memory and of the CPUs' busy time, many UDP endpoints on one
epoll, what every run records (``Outcome``), command-line parsing and the printed tables."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, ClassVar, Self

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
BUSY_OTHER_PCT = 25.0
"""Rows where anything else kept the two CPUs busier than this are flagged: msgs/s not comparable."""


class StartError(Exception):
    """A broker process exited or never accepted connections."""


class Unavailable(Exception):
    """A peer cannot be run on this machine (not installed, install failed)."""


class LoadError(Exception):
    """The load generator could not complete a run (setup failed, a process died or timed out)."""


def tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "(no output)"


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port of ``HOST`` that is free for ``kind`` (TCP by default, or ``socket.SOCK_DGRAM``) right now."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"exited with code {proc.returncode}: {tail(log.read_text(errors='replace'))}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise StartError(f"not accepting connections on port {port} after {START_TIMEOUT_S:.0f} s")


def udp_ready(
    port: int, request: bytes, answers: Callable[[bytes], bool], log: Path
) -> Callable[[subprocess.Popen[bytes]], None]:
    """Readiness for :func:`running`: the process answers ``request`` on UDP ``port`` with a datagram that
    ``answers`` accepts; ``request`` goes out every 0.2 s until then. Raises StartError (with the end of
    ``log`` if the process exited) after ``START_TIMEOUT_S``."""

    def ready(proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last = "none"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((HOST, port))
            sock.settimeout(0.2)
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise StartError(
                        f"exited with code {proc.returncode}: {tail(log.read_text(errors='replace'))}"
                    )
                try:
                    sock.send(request)
                    answer = sock.recv(256)
                except TimeoutError:
                    continue
                except ConnectionRefusedError:  # an ICMP error: nothing listening yet
                    time.sleep(0.05)
                    continue
                if answers(answer):
                    return
                last = answer.hex()
        raise StartError(
            f"no answer to {request.hex()} on udp port {port} after {START_TIMEOUT_S:.0f} s (last: {last})"
        )

    return ready


def coap_ready(port: int, log: Path) -> Callable[[subprocess.Popen[bytes]], None]:
    """Readiness for :func:`running`: the process answers a CoAP ping (an empty CON) on UDP ``port`` with
    a RST (RFC 7252 §4.3)."""
    ping = bytes((0x40, 0, 0x12, 0x34))
    return udp_ready(port, ping, lambda answer: answer[:1] == b"\x70" and answer[2:4] == ping[2:4], log)


def _pin_threads(pid: int, cpus: set[int]) -> None:
    """Pins every thread the broker has; threads it starts later inherit the mask."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(STOP_TIMEOUT_S)


@contextlib.contextmanager
def running(
    argv: list[str],
    log: Path,
    port: int | None,
    cpus: set[int] | None,
    ready: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Starts ``argv`` in the repository with its output in ``log``, yields the process once it accepts TCP
    connections on ``port`` (unless None) and ``ready(proc)`` returned (if given: it raises StartError when
    the process does not get ready), pinned to ``cpus`` from then on; always stops and reaps it."""
    with log.open("wb") as out:
        # Ctrl-C is held back until ``proc`` is bound, so the finally below always gets to stop the broker.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # nor does a Ctrl-C for the benchmark reach the broker
            )
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            raise StartError(str(exc)) from exc
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            if port is not None:
                _wait_listening(proc, port, log)
            if ready is not None:
                ready(proc)
            if cpus:
                _pin_threads(proc.pid, cpus)
            yield proc
        finally:
            _stop(proc)


def reap(proc: BaseProcess | None) -> None:
    """Joins a load process that was started, killing it if it does not end within 5 s."""
    if proc is not None and proc.pid is not None:
        proc.join(STOP_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            proc.join(STOP_TIMEOUT_S)


def log_summary(path: Path, levels: Collection[str] = ()) -> tuple[int, str]:
    """The number of lines of a process's log and its last 10, joined; only the lines at ``levels``
    (``"warning"``, ...) if any are given."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    if levels:
        lines = [line for line in lines if any(f" {level} " in line for level in levels)]
    return len(lines), tail("\n".join(lines), 10)


def mqgate_argv(config: Path) -> list[str]:
    """mqgate from this checkout with the configuration file ``config``."""
    return [sys.executable, "-m", "core.cli", "--config", str(config)]


def mqgate_toml(sections: str, disabled: Collection[str], log_level: str = "warning") -> str:
    """An mqgate configuration: ``sections`` (TOML), every section in ``disabled`` switched off, the log
    level."""
    return (
        sections
        + "".join(f"[{name}]\nenabled = false\n\n" for name in disabled)
        + f'[log]\nlevel = "{log_level}"\n'
    )


def gateway_config(config: Path, gateway: str, settings: str, disabled: Collection[str]) -> tuple[int, int]:
    """Writes into ``config`` the configuration of an mqgate with its MQTT listener and the gateway
    ``gateway`` (``"mqttsn"``) on free ports, the gateway's ``settings`` (TOML lines; more sections may
    follow) and ``disabled`` switched off; returns the listener's TCP port and the gateway's UDP port."""
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    config.write_text(
        mqgate_toml(
            f'[listeners.tcp]\nbind = "{HOST}:{tcp_port}"\n\n'
            f'[gateways.{gateway}]\nbind = "{HOST}:{udp_port}"\n{settings}\n',
            disabled,
        )
    )
    return tcp_port, udp_port


def mosquitto_command(workdir: Path, port: int) -> list[str]:
    """Writes mosquitto's configuration into ``workdir`` and returns its command line for ``port``; raises
    Unavailable when mosquitto is not installed.

    mosquitto 2.0 drops QoS 0 deliveries to a client with max_queued_messages packets waiting to be written,
    so the queue limits are lifted; 100 QoS 1 messages in flight match the publishers' windows. TCP_NODELAY
    as asyncio sets it for mqgate. With Nagle's algorithm on (mosquitto's default) mosquitto spends less CPU
    per message, but 1 -> 1 stalls on delayed ACKs once a window keeps less than a segment queued. No
    persistence."""
    exe = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if exe is None:
        raise Unavailable("mosquitto not found (apt-get install mosquitto)")
    config = workdir / "mosquitto.conf"
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


def mqgate_config() -> dict[str, Any]:
    """mqgate's default configuration, as ``python -m core.cli --print-config`` prints it."""
    done = subprocess.run(
        [sys.executable, "-m", "core.cli", "--print-config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise StartError(f"--print-config failed: {tail(done.stdout + done.stderr)}")
    return tomllib.loads(done.stdout)


def sections_to_disable(config: dict[str, Any], keep: Collection[str]) -> list[str]:
    """Every listener and gateway section of ``config`` that has an ``enabled`` switch, but those in ``keep``
    (as ``"listeners.tcp"``, ``"gateways.coap"``)."""
    return [
        f"{group}.{name}"
        for group in ("listeners", "gateways")
        for name, section in config.get(group, {}).items()
        if f"{group}.{name}" not in keep and "enabled" in section
    ]


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (the second field of /proc/<pid>/statm, in pages)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def socket_drops(port: int) -> int | None:
    """The drops counter of the UDP socket bound to ``HOST:port``: datagrams the kernel dropped because its
    receive queue was full (the last column of /proc/net/udp, or of /proc/net/udp6 for a socket bound to
    the IPv4-mapped ``::ffff:HOST``); None if there is no such socket."""
    host = f"{int.from_bytes(socket.inet_aton(HOST), sys.byteorder):08X}"
    wanted = {f"{host}:{port:04X}", f"0000000000000000FFFF0000{host}:{port:04X}"}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f:
                columns = line.split()
                if columns[1] in wanted:
                    return int(columns[-1])
    return None


def busy_seconds(cpus: set[int]) -> float:
    """Time ``cpus`` were not idle: user, nice, system, irq, softirq and steal in /proc/stat."""
    ticks = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *columns = line.split()
            if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, columns[:8])
                ticks += user + nice + system + irq + softirq + steal
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Pinning:
    """CPUs of the load generator and of the broker; None (no pinning) on a single-cpu machine."""

    load: set[int] | None
    broker: set[int] | None

    @property
    def cpus(self) -> set[int] | None:
        return self.load | self.broker if self.load and self.broker else None

    @classmethod
    def split(cls) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        return cls({cpus[0]}, {cpus[1]}) if len(cpus) >= 2 else cls(None, None)

    def figures(self, under_test: str) -> dict[str, list[int]]:
        """The CPUs for the JSON line: ``load`` and ``under_test`` (``"mqgate"``, ``"broker"``, ...)."""
        return {"load": sorted(self.load or ()), under_test: sorted(self.broker or ())}


def pin_load_generator(under_test: str) -> Pinning:
    """Raises this process's open files limit to the hard one, pins it to the load generator's CPU and says
    which CPU runs ``under_test`` (``"mqgate"``, ``"servers"``, ...)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pinning = Pinning.split()
    if pinning.load and pinning.broker:
        os.sched_setaffinity(0, pinning.load)
        print(f"load generator on cpu {sorted(pinning.load)}, {under_test} on cpu {sorted(pinning.broker)}")
    else:
        print(
            f"one cpu only: {under_test} and the load generator share it "
            "(figures are not comparable to 2-cpu runs)"
        )
    return pinning


def sockets_error(n: int, what: str, spare: int) -> str | None:
    """Why ``n`` endpoints (``what``: ``"clients"``, ``"devices"``) cannot each have a socket when the
    benchmark needs ``spare`` file descriptors besides, or None."""
    _, open_files = resource.getrlimit(resource.RLIMIT_NOFILE)
    if n + spare > open_files:
        return f"{n:,} {what} need as many sockets: the open files limit is {open_files:,}"
    return None


# ---------------------------------------------------------------- what the load generator measures


@dataclass(frozen=True, slots=True)
class Usage:
    """What the processes under test and the machine spent during a measured stretch."""

    cpu_s: tuple[float, ...]
    """CPU time of each process measured, in the order given."""
    busy_s: float | None
    """Time the pinned CPUs were busy with anything (None when not pinned)."""
    drops: int | None
    """Datagrams the kernel dropped at the UDP socket measured (None: no such socket)."""

    def figures(
        self, names: Sequence[str], unit: str, load_cpu_s: float, seconds: float, count: int
    ) -> dict[str, float | None]:
        """:func:`cpu_figures` of these processes, ``names`` naming them in order."""
        return cpu_figures(
            unit, dict(zip(names, self.cpu_s, strict=True)), load_cpu_s, self.busy_s, seconds, count
        )


class Meter:
    """Takes the CPU time of ``pids``, the busy time of ``cpus`` and the drops at UDP ``port`` at creation;
    ``usage()`` returns what was spent since."""

    def __init__(self, pids: Sequence[int], cpus: set[int] | None, port: int | None = None) -> None:
        self._pids, self._cpus, self._port = tuple(pids), cpus, port
        self._cpu0 = [cpu_seconds(pid) for pid in self._pids]
        self._busy0 = busy_seconds(cpus) if cpus else None
        self._drops0 = None if port is None else socket_drops(port)

    def usage(self) -> Usage:
        cpu = tuple(cpu_seconds(pid) - cpu0 for pid, cpu0 in zip(self._pids, self._cpu0, strict=True))
        busy = None if self._busy0 is None or not self._cpus else busy_seconds(self._cpus) - self._busy0
        drops = None if self._port is None else socket_drops(self._port)
        return Usage(cpu, busy, None if drops is None or self._drops0 is None else drops - self._drops0)


def pct(part: float, whole: float) -> float | None:
    return 100 * part / whole if whole else None


def cpu_figures(
    unit: str,
    cpu_s: Mapping[str, float],
    load_cpu_s: float,
    busy_s: float | None,
    seconds: float,
    count: int,
) -> dict[str, float | None]:
    """For each process under test ``name`` in ``cpu_s``, ``{name}_cpu_us_per_{unit}`` (its CPU time per
    ``count``) and ``{name}_cpu_pct``; then ``load_cpu_pct`` and ``other_cpu_pct`` (what else kept the CPUs
    busy) over ``seconds``."""
    out: dict[str, float | None] = {}
    for name, spent in cpu_s.items():
        out[f"{name}_cpu_us_per_{unit}"] = spent * 1e6 / count if count else None
        out[f"{name}_cpu_pct"] = pct(spent, seconds)
    other = None if busy_s is None else busy_s - sum(cpu_s.values()) - load_cpu_s
    return out | {
        "load_cpu_pct": pct(load_cpu_s, seconds),
        "other_cpu_pct": None if other is None else pct(other, seconds),
    }


@dataclass(slots=True, kw_only=True)
class Outcome:
    """What every run records besides its measurements, filled in as it goes: why it failed, and how much the
    process under test logged."""

    LOG_LEVELS: ClassVar[tuple[str, ...]] = ()
    """Only log lines at these levels count (every line if empty)."""
    LOG_KEY: ClassVar[str] = "log_lines"
    """The name of their count in the figures."""

    error: str | None = None
    log_lines: int = 0
    log_tail: str = ""

    @contextlib.contextmanager
    def recording(self, log: Path, *also: type[Exception]) -> Iterator[None]:
        """Records a LoadError, an OSError or one of ``also`` raised inside as the run's error, and the
        summary of ``log`` at the end."""
        caught: tuple[type[Exception], ...] = (LoadError, OSError, *also)
        try:
            yield
        except caught as exc:
            self.error = str(exc) or repr(exc)
        finally:
            self.log_lines, self.log_tail = log_summary(log, self.LOG_LEVELS)

    def outcome_figures(self) -> dict[str, Any]:
        return {"error": self.error, self.LOG_KEY: self.log_lines, "log_tail": self.log_tail}

    def print_progress(self, label: str, measured: str | None) -> None:
        """Prints ``label: measured`` if the run measured anything, why it failed if it did, and how the log
        ends if anything counted was logged or the run failed."""
        if measured:
            print(f"{label}: {measured}", flush=True)
        if self.error:
            print(f"{label}: failed: {self.error}", flush=True)
        if self.log_lines or (self.error and self.log_tail):
            levels = f" at {'/'.join(self.LOG_LEVELS)}" if self.LOG_LEVELS else ""
            print(f"  log, {self.log_lines} lines{levels}, ends: {self.log_tail}", flush=True)


# ---------------------------------------------------------------- many UDP endpoints


class UdpEndpoints:
    """``n`` non-blocking UDP sockets connected to ``HOST:port``, on one epoll; ``index_of`` maps a socket's
    file descriptor to its index. As a context manager, closes them on the way out."""

    def __init__(self, n: int, port: int, rcvbuf: int | None = None) -> None:
        self.socks: list[socket.socket] = []
        self.poller = select.epoll()
        self.index_of: dict[int, int] = {}
        try:
            for i in range(n):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.socks.append(sock)
                if rcvbuf is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.setblocking(False)
                sock.connect((HOST, port))
                self.poller.register(sock.fileno(), select.EPOLLIN)
                self.index_of[sock.fileno()] = i
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.poller.close()
        for sock in self.socks:
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def exchange(
        self,
        requests: Sequence[bytes | bytearray],
        window: int,
        retry_s: float,
        timeout_s: float,
        answered: Callable[[int], bool],
        what: str,
    ) -> int:
        """Sends ``requests[i]`` from socket i, at most ``window`` unanswered at a time, each again after
        ``retry_s`` without an answer, until every one is answered; returns the resends. ``answered(i)``
        reads what socket i received and says whether it answers i's request (it raises on a refusal).
        Raises TimeoutError naming ``what`` (``"clients got no CONNACK"``) after ``timeout_s``."""
        waiting: dict[int, float] = {}  # endpoint -> when its request was last sent, oldest first
        following = iter(range(len(requests)))
        done = resent = 0
        deadline = time.monotonic() + timeout_s
        while done < len(requests):
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(
                    f"{len(requests) - done} of {len(requests)} {what} after {timeout_s:.0f} s"
                )
            for i in itertools.islice(following, window - len(waiting)):
                self.socks[i].send(requests[i])
                waiting[i] = now
            expired = [i for i, sent_at in waiting.items() if now - sent_at > retry_s]
            for i in expired:
                del waiting[i]
                self.socks[i].send(requests[i])
                waiting[i] = now
                resent += 1
            for fd, _ in self.poller.poll(0.05):
                i = self.index_of[fd]
                if answered(i) and waiting.pop(i, None) is not None:
                    done += 1
        return resent


# ---------------------------------------------------------------- command line and report


@contextlib.contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A temporary directory for a benchmark's configurations and logs; ends the program with one line on
    Ctrl-C or when mqgate fails to start (a StartError)."""
    try:
        with tempfile.TemporaryDirectory(prefix=f"mqgate-bench-{name}-") as workdir:
            yield Path(workdir)
    except StartError as exc:
        sys.exit(f"mqgate: failed to start: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


def bench_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """A benchmark's command line: ``doc`` as its description, ``--quick`` doing ``quick``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    return parser


def add_numbers(parser: argparse.ArgumentParser, flag: str, default: Sequence[int]) -> None:
    """``flag``: a comma-separated list of positive integers, ``default`` if not given."""
    parser.add_argument(
        flag,
        type=positive_ints,
        default=list(default),
        help=f"comma-separated, default {','.join(map(str, default))}",
    )


def add_names(parser: argparse.ArgumentParser, flag: str, known: Collection[str]) -> None:
    """``flag``: a comma-separated list of names from ``known``, all of them if not given."""
    parser.add_argument(
        flag, type=names_of(known), default=list(known), help=f"comma-separated, default {','.join(known)}"
    )


def positive_ints(value: str) -> list[int]:
    """argparse type: a comma-separated list of positive integers."""
    try:
        numbers = [int(n) for n in value.split(",") if n.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive integers (got {value!r})")
    return numbers


def names_of(known: Collection[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated list of names from ``known``."""

    def parse(value: str) -> list[str]:
        names = [n.strip() for n in value.split(",") if n.strip()]
        if not names or any(n not in known for n in names):
            raise argparse.ArgumentTypeError(f"choose from {','.join(known)} (got {value!r})")
        return names

    return parse


def fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def mib(value: float | None) -> str:
    return fmt(None if value is None else value / 2**20, ",.1f")


def print_table(columns: Sequence[tuple[str, int]], rows: Sequence[Sequence[str]], left: int = 0) -> None:
    """Prints ``rows`` under ``columns`` (header, width); the first ``left`` columns are left-aligned, cells
    beyond the last column (an error) follow the row."""

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, (_, width)) in enumerate(zip(cells, columns, strict=False))
        ).rstrip()

    print(line([header for header, _ in columns]))
    for row in rows:
        extra = row[len(columns) :]
        print(line(row[: len(columns)]) + ("  " + " ".join(extra) if extra else ""))


class BusyFlags:
    """Marks the rows where other programs kept the CPUs busier than ``BUSY_OTHER_PCT``."""

    def __init__(self) -> None:
        self.flagged = False

    def cell(self, other_cpu_pct: float | None) -> str:
        busy = (other_cpu_pct or 0.0) > BUSY_OTHER_PCT
        self.flagged |= busy
        return fmt(other_cpu_pct, ".0f", "%") + ("!" if busy else "")

    def cpu_cells(self, figures: Mapping[str, Any], names: Sequence[str], unit: str) -> list[str]:
        """The table's cells for :func:`cpu_figures`: CPU time per ``unit`` of each process in ``names``,
        then their shares, the load generator's and the others' (flagged)."""
        return [
            *(fmt(figures[f"{name}_cpu_us_per_{unit}"], ".1f") for name in names),
            *(fmt(figures[f"{name}_cpu_pct"], ".0f", "%") for name in names),
            fmt(figures["load_cpu_pct"], ".0f", "%"),
            self.cell(figures["other_cpu_pct"]),
        ]

    def print_note(self, rates: str, cpu: str) -> None:
        """The footnote, if a row was flagged: its ``rates`` (``"msgs/s"``) are not comparable, ``cpu``
        (``"cpu us/msg"``) suffers least."""
        if self.flagged:
            print(
                f"! other programs kept the CPUs more than {BUSY_OTHER_PCT:.0f}% busy during that run: "
                f"its {rates} and latencies are not comparable, {cpu} suffers least"
            )
