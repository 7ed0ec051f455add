"""Traces (``POST /api/v5/trace``): every broker event of one client id, or of the topics matching one filter,
written as JSON lines to a file that the API serves, until the trace's end time or its deletion.

Every protocol goes through the broker (the gateways are broker sessions), so the trace sees the client's
connection and session events, subscriptions and every message it publishes or receives, whatever its
protocol. While a trace runs, :class:`TraceManager` wraps the broker's entry points on the broker instance;
with none running the broker is back to its own methods, so tracing costs nothing when unused.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

from core.broker.broker import Broker
from core.broker.session import Session
from core.broker.types import ClientInfo, Message, Subscription
from core.topics import filter_matches, validate_filter

__all__ = ["Trace", "TraceError", "TraceManager"]

log = logging.getLogger("mqgate.trace")

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_PAYLOAD = 1024  # bytes of payload written per message
MAX_TRACES = 32
_WRAPPED = ("publish", "open_session", "connection_lost", "subscribe", "unsubscribe", "discard_session")


class TraceError(Exception):
    """A trace request that cannot be honoured: ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(slots=True, eq=False)
class Trace:
    name: str
    kind: str  # "clientid" or "topic"
    target: str
    path: str
    started_at: float  # wall clock
    end_at: float  # wall clock
    file: IO[str] | None = None
    events: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.file is not None

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind,
            self.kind: self.target,
            "status": "running" if self.running else "stopped",
            "start_at": _rfc3339(self.started_at),
            "end_at": _rfc3339(self.end_at),
            "events": self.events,
            "size": os.path.getsize(self.path) if os.path.exists(self.path) else 0,
        }

    def concerns(self, client_id: str | None, topic: str | None) -> bool:
        if self.kind == "clientid":
            return client_id == self.target
        return topic is not None and filter_matches(self.target, topic)

    def write(self, entry: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.events += 1
        self.file.write(json.dumps({"time": _rfc3339(time.time()), **entry}, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.file is not None:
            self.file.close()
            self.file = None


def _rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall).astimezone().isoformat(timespec="milliseconds")


def _client(client: ClientInfo) -> dict[str, Any]:
    return {"clientid": client.client_id, "protocol": client.protocol, "peer": client.peer}


def _message(message: Message) -> dict[str, Any]:
    return {
        "topic": message.topic,
        "qos": message.qos,
        "retain": message.retain,
        "payload_size": len(message.payload),
        "payload": base64.b64encode(message.payload[:MAX_PAYLOAD]).decode(),
    }


class TraceManager:
    """The traces of one broker, their files under ``directory``."""

    def __init__(self, broker: Broker, directory: str) -> None:
        self.broker = broker
        self.directory = directory
        self.traces: dict[str, Trace] = {}
        self._installed = False

    # --- lifetime of traces

    def start(self, name: str, kind: str, target: str, duration: float) -> Trace:
        if not NAME.fullmatch(name) or name.startswith("."):
            raise TraceError(400, "BAD_REQUEST", "name: 1-64 letters, digits, '_', '-' or '.'")
        if name in self.traces:
            raise TraceError(409, "ALREADY_EXISTS", f"a trace named {name!r} exists")
        if len(self.traces) >= MAX_TRACES:
            raise TraceError(409, "TOO_MANY_TRACES", f"at most {MAX_TRACES} traces; delete one first")
        if kind == "topic" and validate_filter(target) is not None:
            raise TraceError(400, "BAD_REQUEST", f"topic: {validate_filter(target)}")
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{name}.jsonl")
        now = time.time()
        trace = Trace(name, kind, target, path, now, now + duration)
        trace.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by Trace.close
        trace.timer = asyncio.get_running_loop().call_later(duration, self.stop, name)
        self.traces[name] = trace
        self._install()
        log.info("trace %s started: %s %s for %.0f s", name, kind, target, duration)
        return trace

    def stop(self, name: str) -> None:
        trace = self.traces.get(name)
        if trace is None or not trace.running:
            return
        trace.close()
        log.info("trace %s stopped after %d events", name, trace.events)
        if not any(t.running for t in self.traces.values()):
            self._uninstall()

    def delete(self, name: str) -> bool:
        trace = self.traces.pop(name, None)
        if trace is None:
            return False
        self.stop(name)
        trace.close()
        if not any(t.running for t in self.traces.values()):
            self._uninstall()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trace.path)
        return True

    def close(self) -> None:
        for name in list(self.traces):
            self.stop(name)
        self._uninstall()

    # --- the broker hooks

    def _emit(self, client_id: str | None, topic: str | None, entry: Callable[[], dict[str, Any]]) -> None:
        built: dict[str, Any] | None = None
        for trace in self.traces.values():
            if trace.running and trace.concerns(client_id, topic):
                if built is None:
                    built = entry()
                trace.write(built)

    def _receivers(self, topic: str) -> list[Session]:
        """Traced clients whose subscriptions match ``topic``."""
        found = []
        for trace in self.traces.values():
            if trace.running and trace.kind == "clientid":
                session = self.broker.sessions.get(trace.target)
                if session is not None and any(
                    filter_matches(sub.topic_filter.split("/", 2)[-1] if sub.share_group else f, topic)
                    for f, sub in session.subscriptions.items()
                ):
                    found.append(session)
        return found

    def _install(self) -> None:
        if self._installed:
            return
        self._installed = True
        broker = self.broker
        original = {name: getattr(broker, name) for name in _WRAPPED}

        def publish(message: Message, now: float) -> int:
            receivers = self._receivers(message.topic)
            count: int = original["publish"](message, now)
            sender = message.sender or None
            self._emit(
                sender, message.topic, lambda: {"event": "publish", "clientid": sender, **_message(message)}
            )
            for session in receivers:
                if session.client_id != sender:
                    delivered: dict[str, Any] = {
                        "event": "deliver",
                        **_client(session.client),
                        **_message(message),
                    }
                    for trace in self.traces.values():
                        if trace.running and trace.concerns(session.client_id, None):
                            trace.write(delivered)
            return count

        def open_session(client: ClientInfo, **kwargs: Any) -> tuple[Session, bool]:
            result: tuple[Session, bool] = original["open_session"](client, **kwargs)
            self._emit(
                client.client_id,
                None,
                lambda: {"event": "connected", **_client(client), "clean_start": kwargs.get("clean_start")},
            )
            return result

        def connection_lost(session: Session, **kwargs: Any) -> None:
            self._emit(session.client_id, None, lambda: {"event": "disconnected", **_client(session.client)})
            original["connection_lost"](session, **kwargs)

        def subscribe(session: Session, sub: Subscription, now: float) -> tuple[int, list[Message]]:
            result: tuple[int, list[Message]] = original["subscribe"](session, sub, now)
            self._emit(
                session.client_id,
                None,
                lambda: {
                    "event": "subscribe",
                    **_client(session.client),
                    "topic": sub.topic_filter,
                    "qos": sub.qos,
                    "result": result[0],
                },
            )
            return result

        def unsubscribe(session: Session, topic_filter: str) -> bool:
            removed: bool = original["unsubscribe"](session, topic_filter)
            self._emit(
                session.client_id,
                None,
                lambda: {"event": "unsubscribe", **_client(session.client), "topic": topic_filter},
            )
            return removed

        def discard_session(client_id: str, now: float) -> bool:
            self._emit(client_id, None, lambda: {"event": "kicked", "clientid": client_id})
            done: bool = original["discard_session"](client_id, now)
            return done

        for name, wrapper in (
            ("publish", publish),
            ("open_session", open_session),
            ("connection_lost", connection_lost),
            ("subscribe", subscribe),
            ("unsubscribe", unsubscribe),
            ("discard_session", discard_session),
        ):
            setattr(broker, name, wrapper)

    def _uninstall(self) -> None:
        if not self._installed:
            return
        self._installed = False
        for name in _WRAPPED:
            self.broker.__dict__.pop(name, None)
