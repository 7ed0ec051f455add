"""A simulated LwM2M device for the gateway's integration tests, built on aiocoap's client and server API.

:class:`SimulatedDevice` owns one aiocoap server context bound to ``127.0.0.1:0`` on an event loop in a
thread of its own. From that same context (the same UDP port) it registers with the gateway (``POST /rd``),
updates and de-registers, and it serves objects 1 (LwM2M Server), 3 (Device) and 3303 (Temperature), plus any
instances a test adds, the way an LwM2M client does (OMA-TS-LightweightM2M-1.1 Core §6.3, §6.4):

- Read (GET) of an object, instance, resource or resource instance, in the format the request's Accept asks
  for: TLV 11542, SenML JSON 110, SenML CBOR 112, LwM2M JSON 11543, LwM2M CBOR 11544, text 0 and opaque 42
  (payloads built with :func:`gateways.lwm2m.content.encode_content`); without an Accept a single value is
  text/plain (opaque for bytes) and anything else TLV, unless ``answer_format`` forces a format;
- Discover (GET, Accept 40) in link format with the attributes written to each path;
- Write (PUT replaces, POST on an instance updates partially), decoded with ``decode_content`` and typed by
  the shipped object definitions; writes to read-only resources get 4.05;
- Write-Attributes (PUT with a query and no payload), Execute (POST on an executable resource, with its
  arguments recorded), Create (POST on an object) and Delete (DELETE of an instance);
- ``canned`` answers every read with a fixed (Content-Format, payload): what the gateway cannot decode;
- Observe through aiocoap's observation machinery: :meth:`set_value` changes a value and every observation of
  that path or a path above it is notified (aiocoap numbers them 1, 2, ... after the first response); they
  are CON unless ``non_notifications``; deleting an observed instance ends its observations with 4.04. An
  observe answer or notification over 1024 bytes goes as its first Block2 block (RFC 7959 §2.6).

Every request the device serves is recorded in :attr:`SimulatedDevice.requests` (a ``queue.Queue`` of
:class:`Received`). ``silent`` makes it stop answering (aiocoap still acknowledges the CON, no response
follows); :meth:`drop_socket` closes its socket (the gateway's retransmissions go nowhere).

All device state lives on the device's loop: tests read it with :meth:`SimulatedDevice.call`. Nothing here
sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiocoap
import aiocoap.resource
from aiocoap.numbers.codes import Code as AioCode

from core.errors import MalformedPacket
from gateways.coap.numbers import ContentFormat
from gateways.lwm2m.content import decode_content, encode_content
from gateways.lwm2m.model import Entry, Path, Time, Value, format_path
from gateways.lwm2m.objects import ObjectRegistry
from tests.integration.helpers import TIMEOUT

__all__ = [
    "DEFAULT_LINKS",
    "SIGNED_INTEGERS",
    "DeviceFactory",
    "Received",
    "SimulatedDevice",
    "device_fixture",
]

T = TypeVar("T")

TEXT = int(ContentFormat.TEXT_PLAIN)
LINK_FORMAT = int(ContentFormat.LINK_FORMAT)
OPAQUE = int(ContentFormat.OCTET_STREAM)
TLV = int(ContentFormat.LWM2M_TLV)
SENML_JSON = int(ContentFormat.SENML_JSON)
SENML_CBOR = int(ContentFormat.SENML_CBOR)
LWM2M_JSON = int(ContentFormat.LWM2M_JSON)
LWM2M_CBOR = int(ContentFormat.LWM2M_CBOR)
_MULTI_FORMATS = (TLV, SENML_JSON, SENML_CBOR, LWM2M_JSON, LWM2M_CBOR)

SIGNED_INTEGERS: tuple[int, ...] = (129, -1, 2**63 - 1, -(2**63))
"""The Power Source Voltage instances /3/0/7/0-3: the signed-integer cases (EMQX #4499, #4989)."""

DEFAULT_LINKS = '</>;rt="oma.lwm2m",</1>;ver=1.1,</1/0>,</3/0>,</3303/0>'
"""The object list a device registers with unless told otherwise."""

_METHODS = {AioCode.GET: "GET", AioCode.PUT: "PUT", AioCode.POST: "POST", AioCode.DELETE: "DELETE"}


def initial_values() -> dict[Path, Value]:
    """Objects 1, 3 and 3303 as the device starts: resources ``(o, i, r)``, resource instances
    ``(o, i, r, ri)``."""
    values: dict[Path, Value] = {
        (1, 0, 0): 1,
        (1, 0, 1): 300,
        (1, 0, 2): 0,
        (1, 0, 3): 60,
        (1, 0, 6): False,
        (1, 0, 7): "U",
        (3, 0, 0): "Open Mobile Alliance",
        (3, 0, 1): "Lightweight M2M Client",
        (3, 0, 2): "345000123",
        (3, 0, 3): "1.0",
        (3, 0, 6, 0): 1,
        (3, 0, 6, 1): 5,
        (3, 0, 9): 100,
        (3, 0, 13): Time(1_700_000_000),
        (3, 0, 14): "+02:00",
        (3, 0, 16): "U",
        (3303, 0, 5700): 21.5,
        (3303, 0, 5701): "Cel",
        (3303, 0, 5601): 21.5,
        (3303, 0, 5602): 21.5,
    }
    for ri, number in enumerate(SIGNED_INTEGERS):
        values[(3, 0, 7, ri)] = number
    return values


@dataclass(frozen=True)
class Received:
    """One request the device served."""

    method: str
    path: Path
    query: tuple[str, ...]
    accept: int | None
    content_format: int | None
    observe: int | None
    payload: bytes


class _Reply(Exception):
    """Answer the request with ``code`` (and a diagnostic payload)."""

    def __init__(self, code: AioCode, text: str = "") -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class _Observation:
    path: Path
    servobs: Any


@dataclass
class DeviceState:
    """What the device holds (touched only on its loop)."""

    values: dict[Path, Value] = field(default_factory=initial_values)
    instances: set[tuple[int, int]] = field(default_factory=lambda: {(1, 0), (3, 0), (3303, 0)})
    attributes: dict[Path, dict[str, str]] = field(default_factory=dict)
    executed: list[tuple[Path, bytes]] = field(default_factory=list)
    observations: list[_Observation] = field(default_factory=list)

    @property
    def objects(self) -> set[int]:
        return {obj for obj, _ in self.instances}

    def exists(self, path: Path) -> bool:
        if len(path) == 1:
            return path[0] in self.objects
        if len(path) == 2:
            return (path[0], path[1]) in self.instances
        return any(key[: len(path)] == path for key in self.values)

    def entries(self, path: Path) -> list[Entry]:
        return [Entry(key, value) for key, value in sorted(self.values.items()) if key[: len(path)] == path]


BLOCK_SZX = 6
BLOCK_SIZE = 1024  # 2 ** (BLOCK_SZX + 4): aiocoap's block size


class _DeviceSite(aiocoap.resource.ObservableResource, aiocoap.resource.PathCapable):
    """The whole LwM2M object tree as one aiocoap resource (it parses Uri-Path itself)."""

    def __init__(self, device: SimulatedDevice) -> None:
        super().__init__()
        self.device = device

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        """aiocoap splits first responses; a request for a following block is served by :meth:`render`
        (aiocoap's cache of split responses does not know the observe answers split here)."""
        return request.opt.block2 is None or request.opt.block2.block_number == 0

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        try:
            path = self.device._path_of(request)
        except _Reply:
            return
        state = self.device.state
        if not state.exists(path):
            return
        observation = _Observation(path, serverobservation)
        state.observations.append(observation)

        def cancelled() -> None:
            with contextlib.suppress(ValueError):
                state.observations.remove(observation)

        serverobservation.accept(cancelled)

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        response = await self.device._render(request)
        if self.device.non_notifications and request.opt.observe == 0:
            response.transport_tuning = aiocoap.Unreliable
        block = request.opt.block2
        if block is not None and block.block_number > 0:
            _cut(response, block.block_number, block.size_exponent)
        elif request.opt.observe == 0 and len(response.payload) > BLOCK_SIZE:
            # aiocoap splits plain responses into Block2 blocks but sends observe answers and notifications
            # whole; a constrained device sends their first block and serves the rest to plain GETs
            # (RFC 7959 §2.6)
            _cut(response, 0, BLOCK_SZX)
        return response


def _cut(response: aiocoap.Message, num: int, szx: int) -> None:
    """Make ``response`` carry only Block2 block ``num`` of ``2 ** (szx + 4)`` bytes (RFC 7959 §2.2)."""
    size = 2 ** (szx + 4)
    payload = response.payload
    response.payload = payload[num * size : (num + 1) * size]
    more = len(payload) > (num + 1) * size
    response.opt.block2 = aiocoap.optiontypes.BlockOption.BlockwiseTuple(num, more, szx)


class SimulatedDevice:
    """An LwM2M client on its own aiocoap context and event loop thread (see the module docstring)."""

    def __init__(self, endpoint: str, gateway_port: int, *, alternate_path: str = "") -> None:
        self.endpoint = endpoint
        self.gateway_port = gateway_port
        self.alternate_path = [s for s in alternate_path.split("/") if s]
        self.registry = ObjectRegistry.default()
        self.state = DeviceState()
        self.requests: queue.Queue[Received] = queue.Queue()
        self.answer_format: int | None = None  # answer reads in this format whatever the Accept
        self.canned: tuple[int, bytes] | None = None  # answer reads with this (format, payload) as it is
        self.silent = False
        self.non_notifications = False  # send notifications as NON (the first response stays piggybacked)
        self.location: tuple[str, ...] = ()
        self._wake: asyncio.Event | None = None
        self._closed = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"lwm2m-{endpoint}", daemon=True)
        self._thread.start()
        try:
            self.context: aiocoap.Context = self.run(self._start())
        except BaseException:
            self._stop_loop()
            raise
        self.port: int = self.call(self._bound_port)

    # --- running things on the device's loop

    def run(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        """Run a coroutine on the device's loop and return its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError(f"device {self.endpoint}: nothing within {timeout} s") from None

    def call(self, fn: Callable[[], T], timeout: float = TIMEOUT) -> T:
        """Run ``fn()`` on the device's loop (its state is not thread-safe) and return its result."""

        async def go() -> T:
            return fn()

        result: T = self.run(go(), timeout)
        return result

    async def _start(self) -> aiocoap.Context:
        self._wake = asyncio.Event()
        return await aiocoap.Context.create_server_context(
            _DeviceSite(self), bind=("127.0.0.1", 0), transports=["udp6"]
        )

    def _bound_port(self) -> int:
        for interface in self.context.request_interfaces:
            transport = getattr(getattr(interface, "token_interface", None), "message_interface", None)
            udp = getattr(transport, "transport", None)
            if udp is not None:
                port: int = udp.get_extra_info("socket").getsockname()[1]
                return port
        raise AssertionError("the aiocoap context has no UDP socket")

    # --- client side: registration interface (§6.2)

    def _message(
        self, code: AioCode, path: Iterable[str], query: Iterable[str] = (), payload: bytes = b""
    ) -> aiocoap.Message:
        message = aiocoap.Message(code=code, uri=f"coap://127.0.0.1:{self.gateway_port}/", payload=payload)
        message.opt.uri_path = tuple(path)
        message.opt.uri_query = tuple(query)
        if payload:
            message.opt.content_format = LINK_FORMAT
        return message

    def send(
        self,
        code: AioCode,
        path: Iterable[str],
        query: Iterable[str] = (),
        payload: bytes = b"",
        timeout: float = TIMEOUT,
    ) -> aiocoap.Message:
        """Send one request to the gateway from the device's own port and return the response."""
        message = self._message(code, path, query, payload)

        async def go() -> aiocoap.Message:
            response: aiocoap.Message = await self.context.request(message).response
            return response

        result: aiocoap.Message = self.run(go(), timeout)
        return result

    def register(
        self,
        *,
        lifetime: int | None = 60,
        version: str | None = "1.1",
        binding: str | None = "U",
        links: str = DEFAULT_LINKS,
        extra: Iterable[str] = (),
        check: bool = True,
    ) -> aiocoap.Message:
        """``POST /rd?ep=&lt=&lwm2m=&b=`` with ``links``; ``check`` asserts 2.01 and keeps the location."""
        query = [f"ep={self.endpoint}"]
        if lifetime is not None:
            query.append(f"lt={lifetime}")
        if version is not None:
            query.append(f"lwm2m={version}")
        if binding is not None:
            query.append(f"b={binding}")
        query.extend(extra)
        response = self.send(AioCode.POST, ["rd"], query, links.encode())
        if check:
            assert response.code == AioCode.CREATED, (response.code, response.payload)
            self.location = tuple(response.opt.location_path)
        return response

    def update(
        self,
        *,
        lifetime: int | None = None,
        binding: str | None = None,
        links: str | None = None,
        location: tuple[str, ...] | None = None,
    ) -> aiocoap.Message:
        """``POST /rd/{id}`` with what changed; returns the response."""
        query = []
        if lifetime is not None:
            query.append(f"lt={lifetime}")
        if binding is not None:
            query.append(f"b={binding}")
        payload = links.encode() if links is not None else b""
        return self.send(AioCode.POST, location or self.location, query, payload)

    def deregister(self) -> aiocoap.Message:
        """``DELETE /rd/{id}``."""
        return self.send(AioCode.DELETE, self.location)

    # --- what the test sees and changes

    def expect_request(
        self, predicate: Callable[[Received], bool] | None = None, timeout: float = TIMEOUT
    ) -> Received:
        """The next served request (that ``predicate`` accepts; others are skipped)."""
        end = time.monotonic() + timeout
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"device {self.endpoint}: no matching request within {timeout} s")
            try:
                received = self.requests.get(timeout=remaining)
            except queue.Empty:
                continue
            if predicate is None or predicate(received):
                return received

    def received(self) -> list[Received]:
        """Every request recorded so far and not yet taken (drains the queue)."""
        out = []
        while True:
            try:
                out.append(self.requests.get_nowait())
            except queue.Empty:
                return out

    def value(self, path: Path) -> Value | None:
        return self.call(lambda: self.state.values.get(path))

    def observers(self, path: Path) -> int:
        """How many observations of exactly ``path`` are active on the device."""
        return self.call(lambda: sum(1 for o in self.state.observations if o.path == path))

    def set_value(self, path: Path, value: Value) -> None:
        """Change a value and notify every observation of it or of a path above it."""

        def change() -> None:
            self.state.values[path] = value
            self._notify(path)

        self.call(change)

    def _notify(self, path: Path) -> None:
        for observation in list(self.state.observations):
            if path[: len(observation.path)] == observation.path:
                observation.servobs.trigger()

    # --- server side: the LwM2M device management interface (§6.3, §6.4)

    def _path_of(self, request: aiocoap.Message) -> Path:
        segments = list(request.opt.uri_path)
        prefix = self.alternate_path
        if segments[: len(prefix)] != prefix:
            raise _Reply(AioCode.NOT_FOUND, "outside the alternate path")
        segments = segments[len(prefix) :]
        try:
            path = tuple(int(s) for s in segments)
        except ValueError:
            raise _Reply(AioCode.NOT_FOUND, "not an LwM2M path") from None
        if not 1 <= len(path) <= 4:
            raise _Reply(AioCode.NOT_FOUND, "not an LwM2M path")
        return path

    async def _render(self, request: aiocoap.Message) -> aiocoap.Message:
        content_format = request.opt.content_format
        try:
            path = self._path_of(request)
        except _Reply as exc:
            return aiocoap.Message(code=exc.code, payload=exc.text.encode())
        if not getattr(request, "_lwm2m_recorded", False):  # aiocoap re-renders it for each notification
            request._lwm2m_recorded = True
            self.requests.put(
                Received(
                    _METHODS.get(request.code, str(request.code)),
                    path,
                    tuple(request.opt.uri_query),
                    None if request.opt.accept is None else int(request.opt.accept),
                    None if content_format is None else int(content_format),
                    request.opt.observe,
                    bytes(request.payload),
                )
            )
        if self.silent:
            assert self._wake is not None
            await self._wake.wait()  # until the device closes: the gateway never gets an answer
            return aiocoap.Message(code=AioCode.SERVICE_UNAVAILABLE)
        try:
            if request.code == AioCode.GET:
                return self._get(request, path)
            if request.code == AioCode.PUT:
                return self._put(request, path)
            if request.code == AioCode.POST:
                return self._post(request, path)
            if request.code == AioCode.DELETE:
                return self._delete(path)
            raise _Reply(AioCode.METHOD_NOT_ALLOWED)
        except _Reply as exc:
            return aiocoap.Message(code=exc.code, payload=exc.text.encode())

    def _get(self, request: aiocoap.Message, path: Path) -> aiocoap.Message:
        state = self.state
        if not state.exists(path):
            raise _Reply(AioCode.NOT_FOUND, f"{format_path(path)} does not exist")
        accept = None if request.opt.accept is None else int(request.opt.accept)
        if self.canned is not None and accept != LINK_FORMAT:
            response = aiocoap.Message(code=AioCode.CONTENT, payload=self.canned[1])
            response.opt.content_format = self.canned[0]
            return response
        if accept == LINK_FORMAT:
            return self._discover(path)
        entries = state.entries(path)
        fmt = self.answer_format if self.answer_format is not None else accept
        if fmt is None:
            single = len(entries) == 1 and entries[0].path == path
            fmt = (OPAQUE if isinstance(entries[0].value, bytes) else TEXT) if single else TLV
        if fmt not in (*_MULTI_FORMATS, TEXT, OPAQUE):
            raise _Reply(AioCode.NOT_ACCEPTABLE, f"cannot answer in {fmt}")
        try:
            payload = encode_content(fmt, entries, path)
        except MalformedPacket as exc:
            raise _Reply(AioCode.NOT_ACCEPTABLE, str(exc)) from None
        response = aiocoap.Message(code=AioCode.CONTENT, payload=payload)
        response.opt.content_format = fmt
        return response

    def _discover(self, path: Path) -> aiocoap.Message:
        state = self.state
        keys = sorted({key[: max(3, len(path))][:3] for key in state.values if key[: len(path)] == path})
        if len(path) == 1:
            keys = sorted({(path[0], i) for o, i in state.instances if o == path[0]} | set(keys))
        links = []
        for key in [path, *[k for k in keys if k != path]]:
            attrs = "".join(f";{name}={value}" for name, value in state.attributes.get(key, {}).items())
            links.append(f"<{format_path(key)}>{attrs}")
        response = aiocoap.Message(code=AioCode.CONTENT, payload=",".join(links).encode())
        response.opt.content_format = LINK_FORMAT
        return response

    def _decode(self, request: aiocoap.Message, base: Path) -> list[Entry]:
        content_format = request.opt.content_format
        try:
            return decode_content(
                None if content_format is None else int(content_format),
                bytes(request.payload),
                base,
                self.registry,
            )
        except MalformedPacket as exc:
            code = AioCode.UNSUPPORTED_CONTENT_FORMAT if exc.code == 0x8F else AioCode.BAD_REQUEST
            raise _Reply(code, str(exc)) from None

    def _check_writable(self, entries: list[Entry]) -> None:
        for entry in entries:
            resource = self.registry.resource(entry.path[0], entry.path[2])
            if resource is not None and not resource.writable:
                raise _Reply(AioCode.METHOD_NOT_ALLOWED, f"{format_path(entry.path)} is not writable")

    def _store(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.state.values[entry.path] = entry.value
        for entry in entries:
            self._notify(entry.path)

    def _put(self, request: aiocoap.Message, path: Path) -> aiocoap.Message:
        state = self.state
        if not state.exists(path) and not (len(path) >= 3 and state.exists(path[:2])):
            raise _Reply(AioCode.NOT_FOUND, f"{format_path(path)} does not exist")
        if not request.payload and request.opt.uri_query:  # Write-Attributes (§5.1.2)
            attributes = state.attributes.setdefault(path, {})
            for item in request.opt.uri_query:
                name, _, value = item.partition("=")
                attributes[name] = value
            return aiocoap.Message(code=AioCode.CHANGED)
        entries = self._decode(request, path)
        if len(path) < 2:
            raise _Reply(AioCode.METHOD_NOT_ALLOWED, "write an instance or a resource")
        self._check_writable(entries)
        if len(path) >= 3:  # replace the resource (and its instances)
            for key in [k for k in state.values if k[: len(path)] == path]:
                del state.values[key]
        self._store(entries)
        return aiocoap.Message(code=AioCode.CHANGED)

    def _post(self, request: aiocoap.Message, path: Path) -> aiocoap.Message:
        state = self.state
        if len(path) == 1:
            return self._create(request, path)
        resource = self.registry.resource(path[0], path[2]) if len(path) >= 3 else None
        executable = len(path) == 3 and resource is not None and resource.executable
        if not state.exists(path) and not (executable and state.exists(path[:2])):
            raise _Reply(AioCode.NOT_FOUND, f"{format_path(path)} does not exist")
        if len(path) == 2:  # partial update of an instance
            entries = self._decode(request, path)
            self._check_writable(entries)
            self._store(entries)
            return aiocoap.Message(code=AioCode.CHANGED)
        if not executable:
            raise _Reply(AioCode.METHOD_NOT_ALLOWED, f"{format_path(path)} is not executable")
        state.executed.append((path, bytes(request.payload)))
        if path == (3303, path[1], 5605):  # Reset Min and Max Measured Values
            current = state.values[(3303, path[1], 5700)]
            state.values[(3303, path[1], 5601)] = current
            state.values[(3303, path[1], 5602)] = current
        return aiocoap.Message(code=AioCode.CHANGED)

    def _create(self, request: aiocoap.Message, path: Path) -> aiocoap.Message:
        state = self.state
        obj = path[0]
        if obj != 3303:
            raise _Reply(AioCode.METHOD_NOT_ALLOWED, f"object {obj} has a single instance")
        entries = self._decode(request, path)
        if not entries:
            raise _Reply(AioCode.BAD_REQUEST, "nothing to create")
        instances = {e.path[1] for e in entries}
        if len(instances) != 1:
            raise _Reply(AioCode.BAD_REQUEST, "one instance at a time")
        instance = instances.pop()
        if (obj, instance) in state.instances:
            raise _Reply(AioCode.BAD_REQUEST, f"/{obj}/{instance} exists")
        state.instances.add((obj, instance))
        self._store(entries)
        response = aiocoap.Message(code=AioCode.CREATED)
        response.opt.location_path = (str(obj), str(instance))
        return response

    def _delete(self, path: Path) -> aiocoap.Message:
        state = self.state
        if len(path) != 2:
            raise _Reply(AioCode.METHOD_NOT_ALLOWED, "delete an instance")
        if (path[0], path[1]) not in state.instances:
            raise _Reply(AioCode.NOT_FOUND, f"{format_path(path)} does not exist")
        if path[0] != 3303:
            raise _Reply(AioCode.METHOD_NOT_ALLOWED, f"{format_path(path)} cannot be deleted")
        state.instances.discard((path[0], path[1]))
        for key in [k for k in state.values if k[:2] == path]:
            del state.values[key]
        for observation in list(state.observations):  # observers of what is gone get a final 4.04
            if observation.path[:2] == path:
                observation.servobs.trigger()
        return aiocoap.Message(code=AioCode.DELETED)

    # --- shutdown

    def drop_socket(self) -> None:
        """Close the device's context (its UDP socket): the gateway's requests go unanswered."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        async def go() -> None:
            if self._wake is not None:
                self._wake.set()
            await self.context.shutdown()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(go())

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()

    def close(self) -> None:
        """Shut the context down and stop the loop thread (idempotent)."""
        if self.loop.is_closed():
            return
        try:
            if not self._closed:
                self._closed = True
                self._shutdown()
        finally:
            self._stop_loop()


class DeviceFactory:
    """Owns the simulated devices of a test and closes them all at the end."""

    def __init__(self) -> None:
        self._owned: list[SimulatedDevice] = []

    def __call__(self, endpoint: str, gateway_port: int, **kwargs: Any) -> SimulatedDevice:
        device = SimulatedDevice(endpoint, gateway_port, **kwargs)
        self._owned.append(device)
        return device

    def close(self) -> None:
        errors: list[BaseException] = []
        for device in reversed(self._owned):
            try:
                device.close()
            except BaseException as exc:  # close every device, then report the first failure
                errors.append(exc)
        self._owned.clear()
        if errors:
            raise errors[0]


def device_fixture() -> Iterator[DeviceFactory]:
    """The body of a ``devices`` fixture: ``devices("ep1", port)`` makes a device closed after the test."""
    factory = DeviceFactory()
    try:
        yield factory
    finally:
        factory.close()
