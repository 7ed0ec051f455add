"""The LwM2M gateway, pure: the registration interface, device management through MQTT JSON commands,
observations and queue mode (OMA-TS-LightweightM2M-1.1 Core §6.2-§6.4, §6.5 queue mode).

Each registered device is a broker session with client id = prefix + endpoint name. It subscribes to
``{mountpoint}dn/#``; commands arriving there become CoAP requests to the device (through the shared
:class:`CoapEndpoint`), and the gateway publishes register, update, de-register and expiry events, command
responses and notifications as JSON under ``{mountpoint}up/...``. A device in queue mode (binding with Q)
receives commands only within ``queue_window`` seconds of its last uplink; others wait, bounded and with a
time-to-live, and are sent when it next shows up.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from core.broker.types import Message, Subscription
from core.clock import Clock
from core.config import LwM2mConfig
from core.errors import MalformedPacket
from core.logging import client_fields
from core.topics import validate_topic
from gateways.base import SessionHandle
from gateways.coap.application import CoapApplication
from gateways.coap.blockwise import Block2Download, BlockwiseError
from gateways.coap.codec import CoapMessage
from gateways.coap.exchange import (
    Acknowledged,
    CoapEndpoint,
    Event,
    GaveUp,
    Rejected,
    RequestReceived,
    ResponseReceived,
)
from gateways.coap.numbers import CoapError, Code, OptionNumber, Timing
from gateways.lwm2m.commands import (
    Command,
    CommandError,
    error_response,
    notify_message,
    parse_command,
    response_for,
    timeout_response,
)
from gateways.lwm2m.content import TypeLookup
from gateways.lwm2m.registration import RegisterRequest, parse_register, parse_update

__all__ = ["Device", "LwM2mGateway", "SessionRequest"]

log = logging.getLogger("mqgate.lwm2m")

POST, DELETE = int(Code.POST), int(Code.DELETE)
_LOCATION_PATH = int(OptionNumber.LOCATION_PATH)
_BLOCK2 = int(OptionNumber.BLOCK2)
_OBSERVE = int(OptionNumber.OBSERVE)


@dataclass(slots=True)
class _NotificationFetch:
    """The exchange context of the GETs fetching the rest of a block-wise notification (RFC 7959 §2.6)."""

    device: Device
    command: Command
    download: Block2Download


_SWEEP_SECONDS = 1.0
_SKIPPED_BY_ALL = frozenset({0, 1, 2})  # security, server and access control are not observed by "all"


@dataclass(slots=True)
class SessionRequest:
    """A device whose broker session the adapter must open."""

    device: Device


@dataclass(eq=False)
class Device:
    """A registered endpoint: its registration, broker session, outstanding and queued commands.
    It is the :class:`DeliverySink` of its session (commands arrive as deliveries)."""

    gateway: LwM2mGateway
    endpoint: str
    location: str
    peer: Hashable
    info: RegisterRequest
    registered_at: float
    last_uplink: float
    session: SessionHandle | None = None
    register_request: RequestReceived | None = None
    queued: deque[tuple[Command, float]] = field(default_factory=deque)
    observations: dict[bytes, Command] = field(default_factory=dict)
    closed: bool = False

    @property
    def expires_at(self) -> float:
        return self.last_update + self.info.lifetime + self.gateway.config.lifetime_grace

    last_update: float = 0.0

    def topic(self, suffix: str) -> str:
        return self.gateway.config.mountpoint.replace("{ep}", self.endpoint) + suffix

    def awake(self, now: float) -> bool:
        return not self.info.queue_mode or now <= self.last_uplink + self.gateway.config.queue_window

    def deliver(
        self, message: Message, qos: int, packet_id: int, dup: bool, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        session = self.session
        if session is not None and qos:
            if qos == 2:
                session.received(packet_id)
            session.ack(packet_id)
        self.gateway.on_command(self, message.payload)

    def deliver_pubrel(self, packet_id: int) -> None:
        if self.session is not None:
            self.session.ack(packet_id)

    def kick(self, reason_code: int) -> None:
        self.gateway.end_device(self, "its client id was taken over", publish=False, detached=True)


class LwM2mGateway(CoapApplication[SessionRequest]):
    """Every LwM2M device of one socket."""

    def __init__(self, config: LwM2mConfig, clock: Clock, types: TypeLookup) -> None:
        endpoint = CoapEndpoint(
            Timing(),
            max_dedup_entries=config.max_dedup_entries,
            max_dedup_bytes=config.max_dedup_bytes,
            exchange_lifetime=config.exchange_lifetime,
            request_timeout=config.request_timeout,
            protocol="lwm2m",
        )
        super().__init__(endpoint, clock.now(), _SWEEP_SECONDS)
        self.config = config
        self.clock = clock
        self.types = types
        self.devices: dict[str, Device] = {}
        self.by_location: dict[str, Device] = {}
        # the name a peer authenticated with (DTLS), which its endpoint name must be; None: no check
        self.peer_identity: Callable[[Hashable], str | None] | None = None

    def _sweep(self, now: float) -> None:
        """Expire registrations past their lifetime (§6.2.1) and queued commands past their time-to-live."""
        for device in [d for d in self.devices.values() if d.session is not None and d.expires_at <= now]:
            self.end_device(device, "lifetime expired", publish=True, event="expired")
        for device in self.devices.values():
            while device.queued and device.queued[0][1] <= now:
                command, _ = device.queued.popleft()
                self.count("commands_expired")
                self._publish(device, self.config.topic_response, timeout_response(command))

    def _handle_event(self, event: Event, now: float) -> None:
        if isinstance(event, RequestReceived):
            self._on_request(event, now)
        elif isinstance(event, ResponseReceived):
            self._on_response(event, now)
        elif isinstance(event, GaveUp):
            self._on_gave_up(event)
        elif isinstance(event, Acknowledged | Rejected):
            self.count("unexpected_acks")

    # --- the registration interface (§6.2)

    def _on_request(self, request: RequestReceived, now: float) -> None:
        msg = request.message
        try:
            path = msg.uri_path()
            if path == ["rd"] and msg.code == POST:
                self._register(request, now)
            elif len(path) == 2 and path[0] == "rd":
                device = self.by_location.get(path[1])
                if device is None:
                    raise CoapError(Code.NOT_FOUND, "no such registration")
                self._check_identity(request, device.endpoint)  # nobody else updates or ends it
                if msg.code == POST:
                    self._update(device, request, now)
                elif msg.code == DELETE:
                    self._reply(request, Code.DELETED)
                    self.end_device(device, "de-registered", publish=True, event="deregister")
                else:
                    raise CoapError(Code.METHOD_NOT_ALLOWED, "POST or DELETE")
            elif path and path[0] in ("rd", "bs"):
                raise CoapError(Code.METHOD_NOT_ALLOWED if path == ["rd"] else Code.NOT_FOUND, "unsupported")
            else:
                raise CoapError(Code.NOT_FOUND, "unknown resource")
        except CoapError as exc:
            self.count("registrations_refused")
            log.info(
                "lwm2m %s: %s refused: %s",
                request.peer,
                _describe(msg),
                exc.text,
                extra=client_fields(None, request.peer, "lwm2m"),
            )
            self._reply(request, exc.code, exc.text.encode())
        except MalformedPacket as exc:
            self.count("registrations_refused")
            log.info(
                "lwm2m %s: refused: %s", request.peer, exc, extra=client_fields(None, request.peer, "lwm2m")
            )
            self._reply(request, exc.code, str(exc).encode())

    def _reply(
        self,
        request: RequestReceived,
        code: int,
        payload: bytes = b"",
        options: list[tuple[int, bytes]] | None = None,
    ) -> None:
        self.endpoint.respond(request, CoapMessage(0, int(code), 0, b"", options or [], payload))

    def _register(self, request: RequestReceived, now: float) -> None:
        msg = request.message
        info = parse_register(msg.uri_query(), msg.payload)
        # "+" or "#" in the name would make every uplink and the dn subscription fail: refuse it instead
        mountpoint = self.config.mountpoint.replace("{ep}", info.endpoint)
        problem = validate_topic(mountpoint + self.config.topic_register)
        if problem is not None:
            raise CoapError(Code.BAD_REQUEST, f"endpoint name {info.endpoint!r}: {problem}")
        self._check_identity(request, info.endpoint)
        old = self.devices.get(info.endpoint)
        if old is not None:
            self.end_device(old, "registered again", publish=False)
        location = secrets.token_hex(4)
        device = Device(self, info.endpoint, location, request.peer, info, now, now, last_update=now)
        device.register_request = request
        self.devices[info.endpoint] = device
        self.by_location[location] = device
        self._session_requests.append(SessionRequest(device))

    def _check_identity(self, request: RequestReceived, endpoint: str) -> None:
        """Refuse (4.03) an endpoint name that is not the identity the peer authenticated with (LwM2M 1.1
        Transport §5.2.8, Core §7.1), before a registration of that name is replaced, updated or ended."""
        identity = None if self.peer_identity is None else self.peer_identity(request.peer)
        if identity is not None and identity != endpoint:
            self.count("registrations_identity_mismatch")
            raise CoapError(
                Code.FORBIDDEN, f"endpoint name {endpoint!r} is not the DTLS identity {identity!r}"
            )

    def session_opened(self, device: Device, session: SessionHandle, now: float) -> None:
        if device.closed or self.devices.get(device.endpoint) is not device:
            session.close(publish_will=False)
            return
        device.session = session
        codes = session.subscribe([Subscription(device.topic(self.config.topic_command), 0)])
        if codes[0] >= 0x80:
            log.info(
                "lwm2m %s may not subscribe to its command topic: 0x%02x",
                device.endpoint,
                codes[0],
                extra=client_fields(device.endpoint, device.peer, "lwm2m"),
            )
        request, device.register_request = device.register_request, None
        if request is not None:
            location = [(_LOCATION_PATH, b"rd"), (_LOCATION_PATH, device.location.encode())]
            self._reply(request, Code.CREATED, b"", location)
        self.count("registrations")
        log.info(
            "lwm2m %s registered from %s (lifetime %d s, binding %s)",
            device.endpoint,
            device.peer,
            device.info.lifetime,
            device.info.binding,
            extra=client_fields(device.endpoint, device.peer, "lwm2m"),
        )
        self._publish(device, self.config.topic_register, self._event_json("register", device))
        self._auto_observe(device, now)

    def session_refused(self, device: Device, reason_code: int, now: float) -> None:
        request, device.register_request = device.register_request, None
        self._forget(device)
        log.info(
            "lwm2m %s refused by the broker: reason 0x%02x",
            device.endpoint,
            reason_code,
            extra=client_fields(device.endpoint, device.peer, "lwm2m"),
        )
        if request is not None:
            code = Code.FORBIDDEN if reason_code in (0x86, 0x87, 0x8C) else Code.SERVICE_UNAVAILABLE
            if reason_code == 0x8A:  # banned: too many failures from the address (RFC 8516 §3)
                code = Code.TOO_MANY_REQUESTS
            self._reply(request, code, b"registration refused")

    def _update(self, device: Device, request: RequestReceived, now: float) -> None:
        msg = request.message
        update = parse_update(msg.uri_query(), msg.payload)
        info = device.info
        if update.lifetime is not None:
            info.lifetime = update.lifetime
        if update.binding is not None:
            info.binding = update.binding
        if update.queue_mode is not None:
            info.queue_mode = update.queue_mode
        if update.sms is not None:
            info.sms = update.sms
        if update.objects is not None:
            info.objects = update.objects
        if update.alternate_path is not None:
            info.alternate_path = update.alternate_path
        if update.content_format is not None:
            info.content_format = update.content_format
        device.peer = request.peer
        device.last_update = now
        self._reply(request, Code.CHANGED)
        self.count("updates")
        self._publish(device, self.config.topic_update, self._event_json("update", device))
        self._uplink(device, now)

    def _event_json(self, msg_type: str, device: Device) -> bytes:
        info = device.info
        data: dict[str, Any] = {
            "ep": device.endpoint,
            "lt": info.lifetime,
            "lwm2m": info.version,
            "b": info.binding,
            "alternatePath": info.alternate_path,
            "objectList": [str(o) for o in info.objects],
            "location": f"/rd/{device.location}",
        }
        if info.sms is not None:
            data["sms"] = info.sms
        if info.content_format is not None:
            data["ct"] = info.content_format
        if info.extra:
            data["extra"] = info.extra
        return json.dumps({"msgType": msg_type, "data": data}, separators=(",", ":")).encode()

    def end_device(
        self, device: Device, why: str, *, publish: bool, event: str = "deregister", detached: bool = False
    ) -> None:
        """Forget ``device``; publish ``event`` (deregister or expired) first when asked."""
        if device.closed:
            return
        if publish and device.session is not None:
            payload = json.dumps({"msgType": event, "data": {"ep": device.endpoint}}, separators=(",", ":"))
            self._publish(device, self.config.topic_register, payload.encode())
        log.info(
            "lwm2m %s: %s", device.endpoint, why, extra=client_fields(device.endpoint, device.peer, "lwm2m")
        )
        for token in list(device.observations):
            self.endpoint.cancel(device.peer, token)
        for command, _ in device.queued:
            self._publish(device, self.config.topic_response, timeout_response(command))
        device.queued.clear()
        session, device.session = device.session, None
        self._forget(device)
        if session is not None and not detached:
            session.close(publish_will=False)

    def _forget(self, device: Device) -> None:
        device.closed = True
        if self.devices.get(device.endpoint) is device:
            del self.devices[device.endpoint]
        if self.by_location.get(device.location) is device:
            del self.by_location[device.location]

    # --- commands (§6.3, §6.4)

    def _publish(self, device: Device, suffix: str, payload: bytes) -> None:
        session = device.session
        if session is None:
            return
        code = session.publish(Message(device.topic(suffix), payload, self.config.qos, False))
        if code >= 0x80:
            self.count("uplinks_refused")
            log.info(
                "lwm2m %s: publish to %s refused: 0x%02x",
                device.endpoint,
                suffix,
                code,
                extra=client_fields(device.endpoint, device.peer, "lwm2m"),
            )

    def on_command(self, device: Device, payload: bytes) -> None:
        """A command from ``{mountpoint}dn``: send it now, or queue it while the device sleeps."""
        if self.on_output is not None:
            self.on_output()
        now = self.clock.now()
        try:
            command = parse_command(
                payload,
                self.types,
                alternate_path=device.info.alternate_path,
                preferred_format=device.info.content_format,
            )
        except CommandError as exc:
            self.count("commands_invalid")
            log.info(
                "lwm2m %s: invalid command: %s",
                device.endpoint,
                exc,
                extra=client_fields(device.endpoint, device.peer, "lwm2m"),
            )
            self._publish(device, self.config.topic_response, error_response(payload, str(exc)))
            return
        self.count("commands")
        if device.awake(now):
            self._send(device, command, now)
            return
        if len(device.queued) >= self.config.max_queued_commands:
            self.count("commands_queue_full")
            self._publish(device, self.config.topic_response, error_response(payload, "command queue full"))
            return
        device.queued.append((command, now + self.config.command_ttl))
        self.count("commands_queued")

    def _send(self, device: Device, command: Command, now: float) -> None:
        message = command.request
        message.token = secrets.token_bytes(4)
        message.options = list(message.options)
        if command.msg_type == "observe":
            device.observations[message.token] = command
        elif command.msg_type == "cancel-observe":
            for token, observed in list(device.observations.items()):
                if observed.path == command.path:
                    del device.observations[token]
                    self.endpoint.cancel(device.peer, token)
                    message.token = token  # deregister with the observation's own token (RFC 7641 §3.6)
        self.endpoint.request(device.peer, message, (device, command), now)

    def _uplink(self, device: Device, now: float) -> None:
        """The device showed up: in queue mode, send what waited (§6.5)."""
        device.last_uplink = now
        while device.queued:
            command, _ = device.queued.popleft()
            self._send(device, command, now)

    def _on_response(self, event: ResponseReceived, now: float) -> None:
        context = event.context
        if isinstance(context, _NotificationFetch):
            if context.device.closed or context.command.notification is not context.download:
                return  # the device is gone, or a newer notification replaced this one
            self._uplink(context.device, now)
            self._notification_block(context, event.message, now)
            return
        if not isinstance(context, tuple):
            return
        device, command = context
        assert isinstance(device, Device) and isinstance(command, Command)
        if device.closed:
            return
        self._uplink(device, now)
        response = event.message
        if command.msg_type == "observe" and command.answered:
            if response.observe() is None or response.code >= 128:  # the device ended it (RFC 7641 §3.2)
                device.observations.pop(command.request.token, None)
            if response.code == int(Code.CONTENT) and response.option(_BLOCK2) is not None:
                # the rest by GETs (RFC 7959 §2.6); a newer notification drops what is left of this one
                download = command.notification = Block2Download(self.config.max_response_size)
                self._notification_block(_NotificationFetch(device, command, download), response, now)
                return
            self.count("notifications")
            self._publish(device, self.config.topic_notify, notify_message(command, response, self.types))
            return
        if not command.answered and response.code == int(Code.CONTENT):
            whole = self._whole_response(device, command, response, now)
            if whole is None:
                return
            response = whole
        command.answered = True
        if command.msg_type == "observe" and (
            response.code != int(Code.CONTENT) or response.observe() is None
        ):
            device.observations.pop(command.request.token, None)
            self.endpoint.cancel(device.peer, command.request.token)
        self.count("responses")
        self._publish(device, self.config.topic_response, response_for(command, response, self.types))

    def _whole_response(
        self, device: Device, command: Command, response: CoapMessage, now: float
    ) -> CoapMessage | None:
        """``response`` with its whole body: while it comes in Block2 blocks, asks the device for the next
        one (RFC 7959 §2.3, §2.4), up to ``max_response_size`` bytes. None while a block is outstanding, or
        once a broken transfer was answered on up/resp with its error (4.08 out of sequence, 4.13 too large).
        """
        download = command.download
        if download is None:
            if response.option(_BLOCK2) is None:
                return response
            download = command.download = Block2Download(self.config.max_response_size)
        try:
            following = download.add(response)
        except BlockwiseError as exc:
            self.count("responses_incomplete")
            log.info(
                "lwm2m %s: %s %s: %s",
                device.endpoint,
                command.msg_type,
                command.req_path,
                exc.text,
                extra=client_fields(device.endpoint, device.peer, "lwm2m"),
            )
            failed = CoapMessage(0, int(exc.code), 0, b"", [], exc.text.encode())
            self._publish(device, self.config.topic_response, response_for(command, failed, self.types))
            return None
        if following is None:
            return download.whole(response)
        request = download.next_request(command.request, following)
        request.token = secrets.token_bytes(4)
        self.endpoint.request(device.peer, request, (device, command), now)
        return None

    def _notification_block(self, fetch: _NotificationFetch, response: CoapMessage, now: float) -> None:
        """One block of a notification: ask for the next, or publish the whole notification on up/notify
        (with the first block's Observe number); a broken transfer is published there with its error
        (4.08, 4.13) and counted in ``notifications_incomplete``."""
        device, command, download = fetch.device, fetch.command, fetch.download
        try:
            following = download.add(response)
        except BlockwiseError as exc:
            self._notification_failed(fetch, int(exc.code), exc.text)
            return
        if following is None:
            command.notification = None
            self.count("notifications")
            whole = download.whole(response)
            self._publish(device, self.config.topic_notify, notify_message(command, whole, self.types))
            return
        request = download.next_request(command.request, following)
        request.token = secrets.token_bytes(4)
        self.endpoint.request(device.peer, request, fetch, now)

    def _notification_failed(self, fetch: _NotificationFetch, code: int, reason: str) -> None:
        device, command, download = fetch.device, fetch.command, fetch.download
        command.notification = None
        self.count("notifications_incomplete")
        log.info(
            "lwm2m %s: notification of %s: %s",
            device.endpoint,
            command.req_path,
            reason,
            extra=client_fields(device.endpoint, device.peer, "lwm2m"),
        )
        first = download.first
        options = [] if first is None else [(n, v) for n, v in first.options if n == _OBSERVE]
        failed = CoapMessage(0, code, 0, b"", options, reason.encode())
        self._publish(device, self.config.topic_notify, notify_message(command, failed, self.types))

    def _on_gave_up(self, event: GaveUp) -> None:
        context = event.context
        if isinstance(context, _NotificationFetch):
            if not context.device.closed and context.command.notification is context.download:
                blocks = context.download.blocks
                reason = f"no answer from the device to the request for block {blocks} of a notification"
                self._notification_failed(context, int(Code.GATEWAY_TIMEOUT), reason)
            return
        if not isinstance(context, tuple):
            return
        device, command = context
        assert isinstance(device, Device) and isinstance(command, Command)
        device.observations.pop(command.request.token, None)
        self.count("commands_timed_out")
        log.info(
            "lwm2m %s: no answer to %s %s",
            device.endpoint,
            command.msg_type,
            command.req_path,
            extra=client_fields(device.endpoint, device.peer, "lwm2m"),
        )
        self._publish(device, self.config.topic_response, timeout_response(command))

    def _auto_observe(self, device: Device, now: float) -> None:
        paths = self.config.auto_observe
        if not paths:
            return
        if paths == ["all"]:
            targets = [
                str(o) for o in device.info.objects if len(o.path) == 2 and o.path[0] not in _SKIPPED_BY_ALL
            ]
        else:
            targets = paths
        for path in targets:
            body = json.dumps({"reqID": "auto-observe", "msgType": "observe", "data": {"path": path}})
            self.on_command(device, body.encode())

    def shutdown(self) -> None:
        for device in list(self.devices.values()):
            session, device.session = device.session, None
            self._forget(device)
            if session is not None:
                session.close(publish_will=False)


def _describe(msg: CoapMessage) -> str:
    """Method and path of a request, for log lines (never raises)."""
    try:
        path = "/" + "/".join(msg.uri_path())
    except MalformedPacket:
        path = "(path not UTF-8)"
    return f"{msg.code >> 5}.{msg.code & 0x1F:02d} {path}"
