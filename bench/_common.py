"""What the benchmarks share: starting, pinning and stopping the process under test, free loopback ports,
and probes of a process's CPU time and resident memory and of the CPUs' busy time."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
BUSY_OTHER_PCT = 25.0
"""Rows where anything else kept the two CPUs busier than this are flagged: msgs/s not comparable."""


class StartError(Exception):
    """A broker process exited or never accepted connections."""


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
