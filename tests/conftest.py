"""Shared fixtures: a real mqgate (the App, as `mqgate` runs it) on an ephemeral loopback port.

The App runs on its own event loop in a background thread so that blocking third-party clients
(paho-mqtt, mosquitto_pub/sub subprocesses) can drive it from the test. Every fixture stops what it
started: the loop, its thread, its sockets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from core.app import App
from core.broker.broker import Broker
from core.config import Config, build_section

T = TypeVar("T")


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


class RunningBroker:
    """A started App: ``port`` to connect to, ``call`` to run code on its loop (to inspect the broker)."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        data: dict[str, Any] = {
            "listeners": {"tcp": {"bind": "127.0.0.1:0"}},
            "broker": {"sys_interval": 0},
            "api": {"bind": "127.0.0.1:0"},
            "gateways": {
                "mqttsn": {"bind": "127.0.0.1:0", "advertise_interval": 0},
                "coap": {"bind": "127.0.0.1:0"},
                "lwm2m": {"bind": "127.0.0.1:0"},
            },
        }
        for section, values in overrides.items():
            data[section] = _merge(data.get(section), values)
        self.config = build_section(Config, data)
        self.app = App(self.config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mqgate-test-loop", daemon=True)
        self._thread.start()
        try:
            self.run(self.app.start())  # a failed start stops what it started
        except BaseException:
            self._stop_loop()
            raise
        tcp = self.app.listeners.get("mqtt:tcp")  # none in edge mode (upstream.url set)
        self.port: int | None = tcp.port if tcp is not None else None
        self.host = "127.0.0.1"

    @property
    def broker(self) -> Broker:
        assert self.app.broker is not None
        return self.app.broker

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the App's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn()`` on the App's loop (the broker is not thread-safe) and return its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def runner() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed back to the test thread
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(runner)
        return future.result(timeout)

    def stop(self) -> None:
        try:
            self.run(self.app.stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def start_broker() -> Iterator[Callable[..., RunningBroker]]:
    """``start_broker(broker={"max_mqueue_len": 5})``: a running mqgate with config overrides."""
    started: list[RunningBroker] = []

    def start(**overrides: Any) -> RunningBroker:
        running = RunningBroker(overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def mqgate(start_broker: Callable[..., RunningBroker]) -> RunningBroker:
    """A running mqgate with the default configuration (on an ephemeral port, $SYS off)."""
    return start_broker()
