"""What the CoAP and LwM2M gateways share on top of the message layer: the adapter interface of a pure
datagram core (DESIGN §1), the session requests the adapter opens, counters, and a periodic sweep."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from gateways.coap.exchange import CoapEndpoint, Event

__all__ = ["CoapApplication"]

R = TypeVar("R")


class CoapApplication(ABC, Generic[R]):
    """A gateway on one :class:`CoapEndpoint`: subclasses handle the endpoint's events in
    :meth:`_handle_event` and their periodic duties in :meth:`_sweep` (every ``sweep_interval`` seconds)."""

    def __init__(self, endpoint: CoapEndpoint, now: float, sweep_interval: float) -> None:
        self.endpoint = endpoint
        self.counters: dict[str, int] = {}
        self.on_output: Callable[[], None] | None = None
        self.sweep_interval = sweep_interval
        self._session_requests: list[R] = []
        self._next_sweep = now + sweep_interval

    @abstractmethod
    def shutdown(self) -> None:
        """End every client at once (mqgate stops)."""

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def datagrams_to_send(self) -> list[tuple[Hashable, bytes]]:
        return self.endpoint.datagrams_to_send()

    def take_session_requests(self) -> list[R]:
        requests, self._session_requests = self._session_requests, []
        return requests

    def get_timer(self) -> float | None:
        endpoint = self.endpoint.get_timer()
        return self._next_sweep if endpoint is None else min(endpoint, self._next_sweep)

    def handle_timer(self, now: float) -> None:
        for event in self.endpoint.handle_timer(now):
            self._handle_event(event, now)
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval
            self._sweep(now)

    def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> None:
        event = self.endpoint.receive_datagram(data, peer, now)
        if event is not None:
            self._handle_event(event, now)

    @abstractmethod
    def _handle_event(self, event: Event, now: float) -> None:
        """React to one event of the message layer."""

    @abstractmethod
    def _sweep(self, now: float) -> None:
        """The periodic duties (expiry, idle clients)."""
