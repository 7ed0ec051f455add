"""A real mosquitto for the integration tests, started by the test on a free loopback port with its own
config.

* :class:`Mosquitto` writes a config into its directory (``users`` adds a password file, ``tls`` a
  certificate and key, ``persistence`` a session database in the directory, ``extra`` any further lines),
  ``start`` waits (bounded) until it accepts connections, ``stop`` ends it with SIGTERM (mosquitto saves its
  persistent sessions then), ``kill`` with SIGKILL (a crash: nothing saved, no DISCONNECT to anyone). It
  can be started again on the same port. Its stdout and stderr (the log) go to ``mosquitto.log`` in the
  directory.
* :func:`mosquittos_fixture` yields a factory of started brokers and stops every one by PID at the end; use
  it from a fixture (``yield from mosquittos_fixture(tmp_path)``).
* :func:`free_port` is a free TCP port on 127.0.0.1.

Nothing here sleeps for a fixed time: ``start`` polls the port with a deadline.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tests.integration.helpers import TIMEOUT

__all__ = ["Mosquitto", "free_port", "mosquittos_fixture"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


POLL_INTERVAL = 0.02


class Mosquitto:
    """mosquitto on a fixed loopback port with its own config; ``users`` adds a password file, ``tls`` a
    certificate and key, ``persistence`` keeps sessions and queued messages across a :meth:`stop`; ``port``
    is a free one unless given."""

    def __init__(
        self,
        directory: Path,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
        *,
        persistence: bool = False,
        extra: Iterable[str] = (),
        port: int | None = None,
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "mosquitto.log"
        lines = [f"listener {self.port} 127.0.0.1"]
        if os.geteuid() == 0:  # mosquitto drops root to its own user, which cannot read pytest's tmp dirs
            lines.insert(0, f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if users:
            password_file = directory / "passwords"
            for number, (user, password) in enumerate(users.items()):
                create = ["-c"] if number == 0 else []
                subprocess.run(
                    ["mosquitto_passwd", "-b", *create, str(password_file), user, password],
                    check=True,
                    capture_output=True,
                    timeout=TIMEOUT,
                )
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if tls is not None:
            lines += [f"certfile {tls[0]}", f"keyfile {tls[1]}"]
        if persistence:
            lines += ["persistence true", f"persistence_location {directory}/"]
        lines += list(extra)
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (again, on the same port) and wait, bounded, until it accepts connections."""
        assert not self.running, "mosquitto is already running"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["mosquitto", "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.log.read_text()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() >= deadline:
                    raise AssertionError(f"mosquitto not accepting: {self.log.read_text()}") from None
                time.sleep(POLL_INTERVAL)  # polling for readiness, bounded by the deadline

    def kill(self) -> None:
        """SIGKILL, as a crash: no DISCONNECT to anyone, nothing saved."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(TIMEOUT)

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistent sessions), SIGKILL if it does not exit in time."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def mosquittos_fixture(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Yield ``start(users=..., tls=..., persistence=..., extra=...)``, which returns a started mosquitto;
    every one is stopped by PID at the end."""
    started: list[Mosquitto] = []

    def start(
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
        *,
        persistence: bool = False,
        extra: Iterable[str] = (),
    ) -> Mosquitto:
        directory = tmp_path / f"mosquitto{len(started)}"
        directory.mkdir()
        broker = Mosquitto(directory, users, tls, persistence=persistence, extra=extra)
        started.append(broker)
        broker.start()
        return broker

    try:
        yield start
    finally:
        for broker in started:
            broker.stop()
