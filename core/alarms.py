"""Alarms: conditions raised and cleared with their start time and duration, listed by the API and published
on ``$SYS/brokers/{node}/alarms/activate`` and ``.../alarms/deactivate`` (JSON, like EMQX).

- ``high_memory``: the process's resident memory is above ``api.alarm_memory_bytes`` (0 = never);
- ``queue_full/{clientid}``: a session queue is full (the next message drops the oldest);
- ``upstream_down``: edge mode and no connection to the upstream broker is up.

:meth:`AlarmManager.check` evaluates them (the API calls it once a second and before answering).
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from core.broker.types import Message

if TYPE_CHECKING:
    from core.app import App

__all__ = ["Alarm", "AlarmManager", "resident_memory"]

MAX_HISTORY = 1000


@dataclass(slots=True)
class Alarm:
    name: str
    message: str
    details: dict[str, Any]
    activated_at: float  # wall clock
    deactivated_at: float | None = None

    def view(self, now: float) -> dict[str, Any]:
        end = self.deactivated_at if self.deactivated_at is not None else now
        return {
            "name": self.name,
            "message": self.message,
            "details": self.details,
            "activated": self.deactivated_at is None,
            "activate_at": _rfc3339(self.activated_at),
            "deactivate_at": None if self.deactivated_at is None else _rfc3339(self.deactivated_at),
            "duration": round(end - self.activated_at, 3),
        }


def _rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall).astimezone().isoformat(timespec="milliseconds")


def resident_memory() -> int:
    """The process's resident set size in bytes (the peak where /proc is not available)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AlarmManager:
    """The active alarms of an App and a bounded history of the cleared ones."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.active: dict[str, Alarm] = {}
        self.history: deque[Alarm] = deque(maxlen=MAX_HISTORY)

    def check(self) -> None:
        wanted: dict[str, tuple[str, dict[str, Any]]] = {}
        limit = self.app.config.api.alarm_memory_bytes
        if limit:
            rss = resident_memory()
            if rss > limit:
                wanted["high_memory"] = (f"resident memory {rss} bytes is over {limit}", {"rss": rss})
        broker = self.app.broker
        if broker is not None:
            for session in broker.sessions.values():
                if session.max_queue > 0 and len(session.queue) >= session.max_queue:
                    wanted["queue_full/" + session.client_id] = (
                        f"the queue of {session.client_id} is full ({session.max_queue} messages)",
                        {"clientid": session.client_id, "protocol": session.client.protocol},
                    )
        upstream = self.app.upstream
        if upstream is not None:
            from core.mqtt.client import ClientState

            shared = upstream._shared
            links = [shared] if shared is not None else []
            links += [s.connection for s in upstream.sessions.values() if s.connection is not None]
            if links and not any(c.state is ClientState.CONNECTED for c in links):
                wanted["upstream_down"] = (
                    f"{upstream.name} is unreachable",
                    {"buffered": upstream.store.count()},
                )
        now = time.time()
        for name, (message, details) in wanted.items():
            if name not in self.active:
                alarm = self.active[name] = Alarm(name, message, details, now)
                self._publish("activate", alarm, now)
        for name in [n for n in self.active if n not in wanted]:
            alarm = self.active.pop(name)
            alarm.deactivated_at = now
            self.history.append(alarm)
            self._publish("deactivate", alarm, now)

    def views(self, activated: bool | None) -> list[dict[str, Any]]:
        now = time.time()
        alarms: list[Alarm] = []
        if activated is not False:
            alarms += self.active.values()
        if activated is not True:
            alarms += self.history
        return [a.view(now) for a in alarms]

    def _publish(self, what: str, alarm: Alarm, now: float) -> None:
        broker = self.app.broker
        if broker is None:
            return
        import asyncio

        topic = f"$SYS/brokers/{broker.node_name}/alarms/{what}"
        payload = json.dumps(alarm.view(now)).encode()
        broker.publish(Message(topic, payload, 0, False, ""), asyncio.get_running_loop().time())
