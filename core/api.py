"""The HTTP management API (``/api/v5/...``, JSON in and out) and ``/metrics`` (Prometheus text format).

It runs on the App's event loop, so it reads the broker and the gateways directly, between two of their
events. Every error is a 4xx (or a 500 without details) with a JSON body ``{"code": ..., "message": ...}``:
a middleware turns every exception into one, so no stack trace ever reaches a caller. The OpenAPI document
of these endpoints is ``core/openapi.json``, served at ``/api/v5/openapi.json``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from core import __version__
from core.alarms import AlarmManager
from core.broker.broker import Broker
from core.broker.metrics import QOS_LEVELS, BrokerMetrics
from core.broker.session import Session
from core.broker.types import ClientInfo, Message, Subscription
from core.config import parse_bind
from core.logging import format_peer
from core.topics import validate_topic
from core.trace import Trace, TraceError, TraceManager

if TYPE_CHECKING:
    from core.app import App

__all__ = ["ApiServer", "MetricsCollector"]

log = logging.getLogger("mqgate.api")

OPENAPI_FILE = Path(__file__).with_name("openapi.json")
PROTOCOLS = ("mqtt", "mqttsn", "coap", "lwm2m")
STATES = ("connected", "asleep", "offline")
MAX_LIMIT = 10_000
DTLS_COUNTERS = (
    "handshakes",
    "handshake_failures",
    "banned_handshakes",
    "dropped_peers",
    "ignored_datagrams",
    "unsent_datagrams",
    "bytes_in",
    "bytes_out",
)
"""The counters of :class:`gateways.coap.dtls.DtlsDatagramCore` shown (as ``dtls_*``) for a DTLS listener."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A request the API refuses: ``status`` (4xx), ``code`` (an upper-case word) and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


_HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "REQUEST_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as a JSON body; an unexpected exception is logged and answered 500 without details."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "HTTP_ERROR")
        response = _error(exc.status, code, exc.reason)
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
        return response
    except Exception:
        log.exception("API %s %s failed", request.method, request.path)
        return _error(500, "INTERNAL_ERROR", "internal error (logged by mqgate)")


def _is_loopback(remote: str | None) -> bool:
    if remote is None:
        return False
    try:
        return ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return False


def _auth_middleware(keys: list[str]) -> Middleware:
    """``keys``: bearer tokens and ``user:pass`` pairs; none configured: loopback callers only."""
    basics = [k.encode() for k in keys if ":" in k]
    bearers = [k.encode() for k in keys if ":" not in k]

    def allowed(header: str) -> bool:
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            given = value.encode()
            return any(hmac.compare_digest(given, key) for key in bearers)
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return False
            return any(hmac.compare_digest(given, key) for key in basics)
        return False

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if keys:
            if not allowed(request.headers.get("Authorization", "")):
                response = _error(401, "UNAUTHORIZED", "a valid API key is required (Bearer or Basic)")
                response.headers["WWW-Authenticate"] = 'Basic realm="mqgate"'
                return response
        elif not _is_loopback(request.remote):
            return _error(403, "FORBIDDEN", "no api.keys configured: only loopback callers are served")
        return await handler(request)

    return authenticate


# --- request parsing


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "BAD_REQUEST", f"{name}: {raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ApiError(400, "BAD_REQUEST", f"{name}: {value} is not within {low}..{high}")
    return value


def _query_choice(request: web.Request, name: str, choices: tuple[str, ...]) -> str | None:
    raw = request.query.get(name)
    if raw is not None and raw not in choices:
        raise ApiError(400, "BAD_REQUEST", f"{name}: {raw!r} is not one of {', '.join(choices)}")
    return raw


def _page(request: web.Request, items: list[dict[str, Any]]) -> dict[str, Any]:
    page = _query_int(request, "page", 1, 1, 1 << 31)
    limit = _query_int(request, "limit", 100, 1, MAX_LIMIT)
    start = (page - 1) * limit
    return {"data": items[start : start + limit], "meta": {"page": page, "limit": limit, "count": len(items)}}


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "the body must be application/json")
    body = await request.read()  # larger than client_max_size: HTTPRequestEntityTooLarge (413)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "BAD_REQUEST", f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "BAD_REQUEST", "the body must be a JSON object")
    return data


# --- views of the broker and gateways


def _client_state(session: Session) -> str:
    if session.sink is None:
        return "offline"
    return "asleep" if session.parked else "connected"


def _plain(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


def _client_summary(session: Session) -> dict[str, Any]:
    client = session.client
    sink = session.sink
    keepalive = getattr(sink, "keepalive", None)
    return {
        "clientid": client.client_id,
        "protocol": client.protocol,
        "state": _client_state(session),
        "peer": client.peer,
        "username": client.username,
        "keepalive": keepalive if isinstance(keepalive, int) else None,
        "subscriptions_count": len(session.subscriptions),
        "mqueue_len": len(session.queue),
        "inflight": len(session.inflight),
    }


def _client_detail(session: Session) -> dict[str, Any]:
    detail = _client_summary(session)
    sink = session.sink
    link_state = getattr(sink, "state", None)
    detail.update(
        {
            "proto_ver": session.client.protocol_version if session.client.protocol == "mqtt" else None,
            "link_state": str(_plain(link_state)) if link_state is not None else None,
            "expiry_interval": session.expiry_interval,
            "max_inflight": session.max_inflight,
            "max_mqueue": session.max_queue,
            "subscriptions": [
                {"topic": f, "qos": s.qos, "no_local": s.no_local} for f, s in session.subscriptions.items()
            ],
        }
    )
    return detail


def _message_view(message: Message) -> dict[str, Any]:
    return {
        "topic": message.topic,
        "qos": message.qos,
        "payload": base64.b64encode(message.payload).decode(),
        "payload_size": len(message.payload),
        "from_clientid": message.sender,
    }


def _listener_view(listener_id: str, listener: Any) -> dict[str, Any]:
    """A listener; a TLS or WebSocket one (and a DTLS gateway) with its failed handshakes."""
    kind, _, transport = listener_id.partition(":")
    view: dict[str, Any] = {
        "id": listener_id,
        "type": kind,
        "transport": transport,
        "address": listener.address,
    }
    failures = getattr(getattr(listener, "dtls", listener), "handshake_failures", None)
    if transport != "tcp" and isinstance(failures, int):
        view["handshake_failures"] = failures
    return view


class ApiServer:
    """The aiohttp application on ``api.bind``; ``start``/``stop`` like a listener."""

    name = "api:http"

    def __init__(self, app: App) -> None:
        self.app = app
        self.config = app.config.api
        self.host, self.port = parse_bind(self.config.bind, "api.bind")
        self.metrics = MetricsCollector(app)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.metrics)
        self.registry.register(ProcessCollector(registry=None))
        self._runner: web.AppRunner | None = None
        self._traces: TraceManager | None = None
        self._command_seq = 0
        self.alarms = AlarmManager(app)
        self._alarm_task: asyncio.Task[None] | None = None
        self.web = self._build()

    @property
    def address(self) -> str:
        return format_peer((self.host, self.port))

    @property
    def url(self) -> str:
        """The base URL of the API: ``http://host:port``."""
        return "http://" + self.address

    def _build(self) -> web.Application:
        web_app = web.Application(
            middlewares=[_errors, _auth_middleware(list(self.config.keys))],
            client_max_size=self.config.max_body_size,
        )
        r = web_app.router
        r.add_get("/metrics", self.metrics_text)
        r.add_get("/api/v5/openapi.json", self.openapi)
        r.add_get("/api/v5/clients", self.list_clients)
        r.add_get("/api/v5/clients/{clientid:.+}", self.get_client)
        r.add_delete("/api/v5/clients/{clientid:.+}", self.kick_client)
        r.add_get("/api/v5/subscriptions", self.list_subscriptions)
        r.add_get("/api/v5/topics", self.list_topics)
        r.add_post("/api/v5/publish", self.publish)
        r.add_get("/api/v5/retained", self.list_retained)
        r.add_get("/api/v5/retained/{topic:.+}", self.get_retained)
        r.add_delete("/api/v5/retained/{topic:.+}", self.delete_retained)
        r.add_get("/api/v5/gateways", self.list_gateways)
        r.add_get("/api/v5/gateways/{name}", self.get_gateway)
        r.add_get("/api/v5/listeners", self.list_listeners)
        r.add_post("/api/v5/listeners/{id}/restart", self.restart_listener)
        r.add_get("/api/v5/lwm2m/{ep}", self.get_lwm2m)
        r.add_post("/api/v5/lwm2m/{ep}/{op:read|write|execute|observe|discover}", self.lwm2m_command)
        r.add_delete("/api/v5/acl-cache", self.clear_acl_cache)
        r.add_get("/api/v5/alarms", self.list_alarms)
        r.add_get("/api/v5/trace", self.list_traces)
        r.add_post("/api/v5/trace", self.start_trace)
        r.add_get("/api/v5/trace/{name}", self.get_trace)
        r.add_get("/api/v5/trace/{name}/download", self.download_trace)
        r.add_delete("/api/v5/trace/{name}", self.delete_trace)
        return web_app

    async def start(self) -> None:
        runner = web.AppRunner(self.web, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._alarm_task = asyncio.create_task(self._watch_alarms(), name="mqgate-alarms")
        addresses = runner.addresses
        if addresses:
            self.port = int(addresses[0][1])

    async def _watch_alarms(self) -> None:
        while True:
            try:
                self.alarms.check()
            except Exception:  # an alarm check must never stop the API
                log.exception("alarm check failed")
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._alarm_task is not None:
            self._alarm_task.cancel()
            await asyncio.gather(self._alarm_task, return_exceptions=True)
            self._alarm_task = None
        if self._traces is not None:
            self._traces.close()
            self._traces = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- helpers

    @property
    def broker(self) -> Broker:
        broker = self.app.broker
        if broker is None:
            raise ApiError(409, "NOT_RUNNING", "the broker is not running")
        return broker

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _session(self, request: web.Request) -> Session:
        client_id = request.match_info["clientid"]
        session = self.broker.sessions.get(client_id)
        if session is None:
            raise ApiError(404, "CLIENTID_NOT_FOUND", f"no client {client_id!r}")
        return session

    # --- endpoints

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI_FILE.read_bytes(), content_type="application/json")

    async def metrics_text(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_clients(self, request: web.Request) -> web.Response:
        protocol = _query_choice(request, "protocol", PROTOCOLS)
        state = _query_choice(request, "state", STATES)
        items = [
            _client_summary(s)
            for s in self.broker.sessions.values()
            if s.client.protocol != "api"  # the API's own short-lived sessions (LwM2M commands)
            and (protocol is None or s.client.protocol == protocol)
            and (state is None or _client_state(s) == state)
        ]
        return web.json_response(_page(request, items))

    async def get_client(self, request: web.Request) -> web.Response:
        return web.json_response(_client_detail(self._session(request)))

    async def kick_client(self, request: web.Request) -> web.Response:
        session = self._session(request)
        self.broker.discard_session(session.client_id, self._now())
        client = session.client
        log.info(
            "API: client %s kicked",
            client.client_id,
            extra={"clientid": client.client_id, "peer": client.peer, "protocol": client.protocol},
        )
        return web.Response(status=204)

    async def list_subscriptions(self, request: web.Request) -> web.Response:
        client_id = request.query.get("clientid")
        items = [
            {"clientid": s.client_id, "protocol": s.client.protocol, "topic": f, "qos": sub.qos}
            for s in self.broker.sessions.values()
            if client_id is None or s.client_id == client_id
            for f, sub in s.subscriptions.items()
        ]
        return web.json_response(_page(request, items))

    async def list_topics(self, request: web.Request) -> web.Response:
        routes: dict[str, int] = {}
        for session in self.broker.sessions.values():
            for topic_filter in session.subscriptions:
                routes[topic_filter] = routes.get(topic_filter, 0) + 1
        items = [{"topic": t, "subscribers": n} for t, n in sorted(routes.items())]
        return web.json_response(_page(request, items))

    async def publish(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        allowed = {"topic", "payload", "qos", "retain", "encoding"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ApiError(400, "BAD_REQUEST", f"unknown field(s): {', '.join(unknown)}")
        topic = data.get("topic")
        payload = data.get("payload", "")
        qos = data.get("qos", 0)
        retain = data.get("retain", False)
        encoding = data.get("encoding", "plain")
        if not isinstance(topic, str):
            raise ApiError(400, "BAD_REQUEST", "topic: a string is required")
        if not isinstance(payload, str):
            raise ApiError(400, "BAD_REQUEST", "payload: must be a string")
        if type(qos) is not int or qos not in (0, 1, 2):
            raise ApiError(400, "BAD_REQUEST", "qos: must be 0, 1 or 2")
        if not isinstance(retain, bool):
            raise ApiError(400, "BAD_REQUEST", "retain: must be a boolean")
        if encoding not in ("plain", "base64"):
            raise ApiError(400, "BAD_REQUEST", "encoding: must be plain or base64")
        why = validate_topic(topic, self.broker.config.max_topic_levels)
        if why is not None or topic.startswith("$"):
            raise ApiError(400, "BAD_REQUEST", f"topic: {why or 'topics starting with $ are reserved'}")
        if encoding == "base64":
            try:
                body = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "BAD_REQUEST", "payload: not base64") from None
        else:
            try:
                body = payload.encode()
            except UnicodeEncodeError:
                raise ApiError(400, "BAD_REQUEST", "payload: not encodable as UTF-8") from None
        delivered = self.broker.publish(Message(topic, body, qos, retain, ""), self._now())
        return web.json_response({"topic": topic, "delivered": delivered})

    async def list_retained(self, request: web.Request) -> web.Response:
        items = [_message_view(m) for m in self.broker.retained.all()]
        return web.json_response(_page(request, items))

    async def get_retained(self, request: web.Request) -> web.Response:
        topic = request.match_info["topic"]
        message = self.broker.retained.get(topic)
        if message is None:
            raise ApiError(404, "TOPIC_NOT_FOUND", f"no retained message on {topic!r}")
        return web.json_response(_message_view(message))

    async def delete_retained(self, request: web.Request) -> web.Response:
        topic = request.match_info["topic"]
        if not self.broker.retained.delete(topic):
            raise ApiError(404, "TOPIC_NOT_FOUND", f"no retained message on {topic!r}")
        return web.Response(status=204)

    def _gateways(self) -> Iterator[tuple[str, str, Any]]:
        """(gateway type, listener id, gateway core) of every running gateway."""
        for listener_id, listener in self.app.listeners.items():
            core = getattr(listener, "gateway", None)
            if core is not None:
                yield listener_id.split(":", 1)[0], listener_id, core

    @staticmethod
    def _gateway_clients(kind: str, core: Any) -> list[str]:
        if kind == "mqttsn":
            return sorted(core.by_client)
        if kind == "coap":
            return sorted(core.clients)
        if kind == "lwm2m":
            return sorted(core.devices)
        return []

    @staticmethod
    def _gateway_counters(listener: Any) -> dict[str, int]:
        """The counters of a gateway listener: its gateway's; a CoAP or LwM2M one adds its message layer's
        (datagrams, retransmissions, duplicates ...), a DTLS one its DTLS layer's as ``dtls_*``."""
        core = listener.gateway
        metrics = getattr(core, "metrics", None)
        if metrics is not None and hasattr(metrics, "as_dict"):
            counters: dict[str, int] = metrics.as_dict()
        else:
            counters = dict(getattr(core, "counters", {}))
            endpoint = getattr(core, "endpoint", None)
            if endpoint is not None:
                counters.update((f.name, getattr(endpoint.metrics, f.name)) for f in fields(endpoint.metrics))
        dtls = getattr(listener, "dtls", None)
        if dtls is not None:
            counters.update((f"dtls_{name}", getattr(dtls, name)) for name in DTLS_COUNTERS)
        return counters

    def _gateway_view(self, name: str, *, details: bool) -> dict[str, Any]:
        found = [(listener_id, core) for kind, listener_id, core in self._gateways() if kind == name]
        if not found:
            raise ApiError(404, "GATEWAY_NOT_FOUND", f"no running gateway {name!r}")
        counters: dict[str, int] = {}
        clients: list[str] = []
        listeners = []
        for listener_id, core in found:
            for key, value in self._gateway_counters(self.app.listeners[listener_id]).items():
                counters[key] = counters.get(key, 0) + value
            clients += self._gateway_clients(name, core)
            listeners.append({"id": listener_id, "address": self.app.listeners[listener_id].address})
        view: dict[str, Any] = {
            "name": name,
            "status": "running",
            "listeners": listeners,
            "current_connections": len(clients),
            "counters": counters,
        }
        if details:
            view["clients"] = clients
        return view

    async def list_gateways(self, request: web.Request) -> web.Response:
        names = sorted({kind for kind, _, _ in self._gateways()})
        return web.json_response([self._gateway_view(n, details=False) for n in names])

    async def get_gateway(self, request: web.Request) -> web.Response:
        return web.json_response(self._gateway_view(request.match_info["name"], details=True))

    def _listener_views(self) -> Iterable[dict[str, Any]]:
        for listener_id, listener in self.app.listeners.items():
            yield _listener_view(listener_id, listener)

    async def list_listeners(self, request: web.Request) -> web.Response:
        return web.json_response(list(self._listener_views()))

    async def restart_listener(self, request: web.Request) -> web.Response:
        from core.errors import ConfigError

        listener_id = request.match_info["id"]
        if listener_id not in self.app.listeners:
            raise ApiError(404, "LISTENER_NOT_FOUND", f"no listener {listener_id!r}")
        try:
            listener = await self.app.restart_listener(listener_id)
        except ConfigError as exc:
            raise ApiError(409, "RESTART_FAILED", str(exc)) from None
        except KeyError:
            raise ApiError(409, "RESTART_FAILED", f"{listener_id} is disabled in the configuration") from None
        return web.json_response(_listener_view(listener_id, listener))

    @property
    def traces(self) -> TraceManager:
        if self._traces is None:
            self._traces = TraceManager(self.broker, self.config.trace_dir, self.app.listeners.values)
        return self._traces

    def _trace(self, request: web.Request) -> Trace:
        name = request.match_info["name"]
        trace = self.traces.traces.get(name)
        if trace is None:
            raise ApiError(404, "TRACE_NOT_FOUND", f"no trace {name!r}")
        return trace

    async def list_alarms(self, request: web.Request) -> web.Response:
        activated = _query_choice(request, "activated", ("true", "false"))
        self.alarms.check()
        views = self.alarms.views(None if activated is None else activated == "true")
        return web.json_response(_page(request, views))

    async def list_traces(self, request: web.Request) -> web.Response:
        return web.json_response([t.view() for t in self.traces.traces.values()])

    async def start_trace(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        unknown = sorted(set(data) - {"name", "type", "clientid", "topic", "duration"})
        if unknown:
            raise ApiError(400, "BAD_REQUEST", f"unknown field(s): {', '.join(unknown)}")
        name, kind, duration = data.get("name"), data.get("type"), data.get("duration", 600)
        if not isinstance(name, str):
            raise ApiError(400, "BAD_REQUEST", "name: a string is required")
        if kind not in ("clientid", "topic"):
            raise ApiError(400, "BAD_REQUEST", "type: must be clientid or topic")
        target = data.get(kind)
        if not isinstance(target, str) or not target:
            raise ApiError(400, "BAD_REQUEST", f"{kind}: a non-empty string is required")
        if set(data) & {"clientid", "topic"} != {kind}:
            raise ApiError(400, "BAD_REQUEST", f"a {kind} trace takes {kind}, not both clientid and topic")
        if type(duration) not in (int, float) or not 1 <= duration <= 86400:
            raise ApiError(400, "BAD_REQUEST", "duration: seconds, 1..86400")
        try:
            trace = self.traces.start(name, kind, target, float(duration))
        except TraceError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        return web.json_response(trace.view())

    async def get_trace(self, request: web.Request) -> web.Response:
        return web.json_response(self._trace(request).view())

    async def download_trace(self, request: web.Request) -> web.Response:
        trace = self._trace(request)
        try:
            with open(trace.path, "rb") as file:
                body = file.read()
        except FileNotFoundError:
            raise ApiError(404, "TRACE_NOT_FOUND", f"the file of trace {trace.name!r} is gone") from None
        return web.Response(
            body=body,
            content_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="{trace.name}.jsonl"'},
        )

    async def delete_trace(self, request: web.Request) -> web.Response:
        self.traces.delete(self._trace(request).name)
        return web.Response(status=204)

    async def clear_acl_cache(self, request: web.Request) -> web.Response:
        access = getattr(self.broker, "access", None)
        if access is not None:
            access.clear_cache()
        log.info("API: ACL caches cleared")
        return web.Response(status=204)

    def _lwm2m_device(self, endpoint: str) -> Any:
        for kind, _, core in self._gateways():
            if kind == "lwm2m":
                device = core.devices.get(endpoint)
                if device is not None:
                    return device
        raise ApiError(404, "ENDPOINT_NOT_FOUND", f"no registered LwM2M endpoint {endpoint!r}")

    async def lwm2m_command(self, request: web.Request) -> web.Response:
        """The MQTT command path, synchronously: publish the command on the device's command topic and
        answer with the gateway's response from its response topic (or 504 after the request timeout)."""
        device = self._lwm2m_device(request.match_info["ep"])
        data = await _json_object(request)
        if self.app.upstream is not None:
            raise ApiError(409, "NOT_AVAILABLE", "LwM2M commands go through the upstream broker in edge mode")
        broker = self.broker
        config = device.gateway.config
        self._command_seq += 1
        request_id = f"api-{self._command_seq}"
        command = {"reqID": request_id, "msgType": request.match_info["op"], "data": data}
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()
        sink = _ResponseSink(request_id, answer)
        client = ClientInfo(f"$api/lwm2m/{request_id}", "api", "api")
        now = loop.time()
        session, _ = broker.open_session(
            client, clean_start=True, expiry=0, will=None, sink=sink, max_inflight=1, now=now
        )
        try:
            code, _ = broker.subscribe(session, Subscription(device.topic(config.topic_response), 0), now)
            if code >= 0x80:
                raise ApiError(403, "FORBIDDEN", f"cannot subscribe to the response topic: 0x{code:02x}")
            command_topic = config.topic_command.rstrip("#").rstrip("/")
            payload = json.dumps(command).encode()
            broker.publish(Message(device.topic(command_topic), payload, 0, False, client.client_id), now)
            try:
                response = await asyncio.wait_for(answer, config.request_timeout + 1.0)
            except TimeoutError:
                raise ApiError(504, "TIMEOUT", f"no answer from {device.endpoint} in time") from None
        finally:
            broker.discard_session(client.client_id, loop.time())
        return web.json_response(json.loads(response))

    async def get_lwm2m(self, request: web.Request) -> web.Response:
        now = self._now()
        device = self._lwm2m_device(request.match_info["ep"])
        info = device.info
        return web.json_response(
            {
                "endpoint": device.endpoint,
                "location": device.location,
                "peer": str(device.peer),
                "lifetime": info.lifetime,
                "lwm2m_version": info.version,
                "binding": info.binding,
                "queue_mode": info.queue_mode,
                "awake": device.awake(now),
                "registered_seconds_ago": round(now - device.registered_at, 3),
                "expires_in": round(device.expires_at - now, 3),
                "objects": [str(link) for link in info.objects],
                "queued_commands": len(device.queued),
                "observations": len(device.observations),
            }
        )


class _ResponseSink:
    """The sink of the API's short-lived session on a LwM2M response topic: resolves ``answer`` with the
    response whose reqID is ``request_id``."""

    def __init__(self, request_id: str, answer: asyncio.Future[bytes]) -> None:
        self.request_id = request_id
        self.answer = answer

    def deliver(
        self, message: Message, qos: int, packet_id: int, dup: bool, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        try:
            fields = json.loads(message.payload)
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(fields, dict) and fields.get("reqID") == self.request_id and not self.answer.done():
            self.answer.set_result(message.payload)

    def deliver_pubrel(self, packet_id: int) -> None:
        pass

    def kick(self, reason_code: int) -> None:
        pass


class MetricsCollector(Collector):
    """The broker, gateways and upstream counters as Prometheus metric families, read at scrape time."""

    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        broker = app.broker
        yield _gauge("mqgate_info", "mqgate version", {"version": __version__}, 1)
        gateways = {
            listener_id: ApiServer._gateway_counters(listener)
            for listener_id, listener in app.listeners.items()
            if getattr(listener, "gateway", None) is not None
        }
        if broker is not None:
            yield from self._broker(broker, gateways)
        yield from self._gateways(gateways)
        yield from self._upstream()

    def _broker(self, broker: Broker, gateways: dict[str, dict[str, int]]) -> Iterator[Metric]:
        sessions_of_all: list[Session] = list(broker.sessions.values())
        m = broker.metrics
        upstream = self.app.upstream
        if upstream is not None:  # edge mode: the gateways' devices have their sessions there
            sessions_of_all += [s.local for s in upstream.sessions.values()]
            m = m.add(upstream.metrics)
        connections = GaugeMetricFamily(
            "mqgate_connections", "Clients with an attached connection, by protocol", labels=["protocol"]
        )
        sessions = GaugeMetricFamily(
            "mqgate_sessions", "Sessions (online or not), by protocol", labels=["protocol"]
        )
        asleep = GaugeMetricFamily(
            "mqgate_sleeping_devices", "Connected clients that are asleep, by protocol", labels=["protocol"]
        )
        queued = GaugeMetricFamily(
            "mqgate_queued_messages", "Messages waiting in session queues, by protocol", labels=["protocol"]
        )
        inflight = GaugeMetricFamily(
            "mqgate_inflight_messages", "Unacknowledged QoS 1/2 deliveries, by protocol", labels=["protocol"]
        )
        counts: dict[str, list[int]] = {p: [0, 0, 0, 0, 0] for p in PROTOCOLS}
        for session in sessions_of_all:
            row = counts.setdefault(session.client.protocol, [0, 0, 0, 0, 0])
            row[1] += 1
            if session.sink is not None:
                row[0] += 1
                if session.parked:
                    row[2] += 1
            row[3] += len(session.queue)
            row[4] += len(session.inflight)
        for protocol, row in counts.items():
            connections.add_metric([protocol], row[0])
            sessions.add_metric([protocol], row[1])
            asleep.add_metric([protocol], row[2])
            queued.add_metric([protocol], row[3])
            inflight.add_metric([protocol], row[4])
        yield from (connections, sessions, asleep, queued, inflight)
        yield from _traffic(m)
        yield _counter(
            "mqgate_messages_published",
            "Messages routed by the broker (clients, wills, API)",
            m.messages_published,
        )
        yield _wire_bytes(
            "mqgate_bytes_received",
            "Bytes received on the wire, by protocol",
            m.bytes_received,
            gateways,
            "in",
        )
        yield _wire_bytes(
            "mqgate_bytes_sent", "Bytes sent on the wire, by protocol", m.bytes_sent, gateways, "out"
        )
        yield _counter("mqgate_packets_received", "MQTT packets received", m.packets_received)
        yield _counter("mqgate_packets_sent", "MQTT packets sent", m.packets_sent)
        yield _counter(
            "mqgate_connections_accepted", "Sessions opened (connections accepted)", m.connections_total
        )
        yield _counter("mqgate_malformed_packets", "Malformed MQTT packets received", m.malformed_packets)
        yield _counter("mqgate_keepalive_timeouts", "Connections closed by keepalive", m.keepalive_timeouts)
        dropped = CounterMetricFamily(
            "mqgate_messages_dropped", "Messages dropped by the broker, by reason", labels=["reason"]
        )
        for reason in (
            "no_subscribers",
            "queue_full",
            "qos0_offline",
            "expired",
            "too_large",
            "slow_consumer",
        ):
            dropped.add_metric([reason], getattr(m, "dropped_" + reason))
        yield dropped
        yield _gauge("mqgate_retained_messages", "Retained messages stored", {}, len(broker.retained))
        yield _gauge(
            "mqgate_subscriptions", "Subscriptions of every session", {}, broker.subscription_count()
        )
        stats = getattr(getattr(broker, "access", None), "stats", None)
        if stats is not None:
            auth = CounterMetricFamily("mqgate_auth", "Authentications, by result", labels=["result"])
            auth.add_metric(["success"], stats.auth_success)
            auth.add_metric(["failure"], stats.auth_failure)
            auth.add_metric(["banned"], stats.auth_banned)
            auth.add_metric(["handshake_failure"], stats.handshake_failure)
            denied = CounterMetricFamily(
                "mqgate_acl_denied", "Operations refused by the ACL, by action", labels=["action"]
            )
            denied.add_metric(["publish"], stats.acl_denied_publish)
            denied.add_metric(["subscribe"], stats.acl_denied_subscribe)
            denied.add_metric(["will"], stats.wills_denied)
            yield from (auth, denied)

    def _gateways(self, gateways: dict[str, dict[str, int]]) -> Iterator[Metric]:
        counters = CounterMetricFamily(
            "mqgate_gateway_events",
            "Gateway counters (datagrams, messages, drops by reason, retransmissions), by gateway listener",
            labels=["listener", "event"],
        )
        retransmissions = CounterMetricFamily(
            "mqgate_retransmissions",
            "Gateway retransmissions to devices (MQTT-SN retries, CoAP/LwM2M CON), by protocol and listener",
            labels=["protocol", "listener"],
        )
        clients = GaugeMetricFamily(
            "mqgate_gateway_clients", "Clients known to each gateway listener", labels=["listener"]
        )
        for listener_id, values in gateways.items():
            for event, value in sorted(values.items()):
                counters.add_metric([listener_id, event], value)
            protocol = listener_id.split(":", 1)[0]
            retransmissions.add_metric([protocol, listener_id], values.get("retransmissions", 0))
            core = getattr(self.app.listeners[listener_id], "gateway", None)
            clients.add_metric([listener_id], len(ApiServer._gateway_clients(protocol, core)))
        yield from (counters, retransmissions, clients)

    def _upstream(self) -> Iterator[Metric]:
        upstream = self.app.upstream
        if upstream is None:
            return
        from core.mqtt.client import ClientState

        shared = upstream._shared
        links = [shared] if shared is not None else []
        links += [s.connection for s in upstream.sessions.values() if s.connection is not None]
        connected = sum(1 for c in links if c.state is ClientState.CONNECTED)
        yield _gauge("mqgate_upstream_connections", "Connections to the upstream broker", {}, len(links))
        yield _gauge("mqgate_upstream_connected", "Upstream connections that are up", {}, connected)
        yield _gauge(
            "mqgate_upstream_buffered_messages",
            "QoS 1/2 messages buffered for upstream",
            {},
            upstream.store.count(),
        )
        yield _gauge(
            "mqgate_upstream_buffered_bytes", "Bytes buffered for upstream", {}, upstream.store.bytes()
        )
        yield _counter(
            "mqgate_upstream_buffer_full", "Publishes refused: upstream buffer full", upstream.buffer_full
        )
        yield _counter(
            "mqgate_upstream_buffer_writes",
            "QoS 1/2 messages written to the buffer file (not acknowledged upstream within commit_delay)",
            upstream.store.written,
        )
        yield _counter(
            "mqgate_upstream_dropped_qos0",
            "QoS 0 messages dropped during an outage",
            upstream.dropped_qos0_outage,
        )


def _gauge(name: str, documentation: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _wire_bytes(
    name: str, documentation: str, mqtt: int, gateways: dict[str, dict[str, int]], direction: str
) -> CounterMetricFamily:
    """Wire bytes by protocol: MQTT's counted by the connections; a gateway's are the datagrams of its
    listeners (``bytes_in``/``bytes_out``), over DTLS the records (``dtls_bytes_*``) rather than the
    decrypted messages."""
    totals = dict.fromkeys(PROTOCOLS, 0)
    totals["mqtt"] = mqtt
    for listener_id, counters in gateways.items():
        protocol = listener_id.split(":", 1)[0]
        wire = counters.get(f"dtls_bytes_{direction}", counters.get(f"bytes_{direction}", 0))
        totals[protocol] = totals.get(protocol, 0) + wire
    family = CounterMetricFamily(name, documentation, labels=["protocol"])
    for protocol, value in totals.items():
        family.add_metric([protocol], value)
    return family


_TRAFFIC = (
    (
        "mqgate_messages_received",
        "Application messages received from clients and accepted for routing, by the client's protocol and "
        "the message QoS (MQTT-SN QoS -1 counts as 0)",
        "received",
    ),
    (
        "mqgate_payload_bytes_received",
        "Payload bytes of the messages received, by protocol and QoS",
        "received_bytes",
    ),
    (
        "mqgate_messages_sent",
        "Application messages delivered to clients (first transmissions), by protocol and delivered QoS",
        "sent",
    ),
    ("mqgate_payload_bytes_sent", "Payload bytes of the messages sent, by protocol and QoS", "sent_bytes"),
    (
        "mqgate_messages_redelivered",
        "QoS 1/2 deliveries sent again with DUP after a reconnect or a wake-up, by protocol and QoS",
        "redelivered",
    ),
)


def _traffic(metrics: BrokerMetrics) -> Iterator[CounterMetricFamily]:
    """The per-protocol, per-QoS tables of :class:`BrokerMetrics` as labelled counters."""
    protocols = list(metrics.reported_protocols())
    for name, documentation, attribute in _TRAFFIC:
        table: list[int] = getattr(metrics, attribute)
        family = CounterMetricFamily(name, documentation, labels=["protocol", "qos"])
        for protocol, slot in protocols:
            for qos in range(QOS_LEVELS):
                family.add_metric([protocol, str(qos)], table[slot + qos])
        yield family
