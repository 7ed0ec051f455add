"""Helpers for the CoAP integration tests: a raw UDP CoAP client, libcoap's ``coap-client-notls`` and aiocoap.

* :class:`RawCoap` speaks CoAP over its own UDP socket (bound to 127.0.0.1:0, so each client has its own
  source port) with :mod:`gateways.coap.codec`. It does only what it is told: it never acknowledges a CON
  notification, retries or deduplicates by itself, so tests can send a RST, ignore a notification or repeat a
  message id. Datagrams it did not ask for yet wait in an inbox, in arrival order.
* :func:`coap_client` runs ``coap-client-notls`` once with a CoAP-level timeout (``-B``) and a subprocess
  timeout, and parses the PDUs it prints at ``-v 6`` (the request and the responses; of a block-wise transfer
  only the first request and the last response); the body it received, reassembled across Block2, is read
  from ``-o FILE``. :class:`CoapObserver` runs it in the background with ``-s`` (stdout line-buffered with
  ``stdbuf``) and queues each response as it arrives.
* :class:`AioCoap` is an aiocoap client context on an event loop of its own thread, driven synchronously from
  the test (``request``, ``observe``); :class:`AioObservation` queues notifications and errors.
* :func:`coap_port`, :func:`coap_gateway`, :func:`gateway_counter`, :func:`endpoint_metric` reach the live
  gateway of a ``mqgate`` fixture (read it only through ``mqgate.call``).
* Fixtures ``coap`` (:class:`CoapClients`: raw clients and observers) and ``aio`` (:class:`AioCoap`) close
  what they made; import ``coap_fixture`` / ``aio_fixture`` into a test module to use them.

Nothing here sleeps for a fixed time: every wait is a socket timeout, a queue timeout or a polled condition
with a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import queue
import re
import secrets
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiocoap
import pytest

from gateways.coap import codec
from gateways.coap.codec import CoapMessage
from gateways.coap.gateway import CoapGateway
from gateways.coap.numbers import OptionNumber, Type, code_name
from tests.integration.helpers import TIMEOUT

__all__ = [
    "ACK",
    "CON",
    "HOST",
    "NON",
    "RST",
    "AioCoap",
    "AioObservation",
    "CliResult",
    "CoapClients",
    "CoapObserver",
    "Pdu",
    "RawCoap",
    "aio_code",
    "aio_fixture",
    "coap_client",
    "coap_fixture",
    "coap_gateway",
    "coap_port",
    "coap_uri",
    "code_of",
    "endpoint_metric",
    "gateway_counter",
    "observe_seq",
    "path_options",
    "query_options",
]

HOST = "127.0.0.1"
COAP_CLIENT = "coap-client-notls"

CON, NON, ACK, RST = int(Type.CON), int(Type.NON), int(Type.ACK), int(Type.RST)


# --- the live gateway


def coap_port(mqgate: Any) -> int:
    """The UDP port of the fixture's CoAP gateway."""
    port: int = mqgate.app.listeners["coap:udp"].port
    return port


def coap_gateway(mqgate: Any) -> CoapGateway:
    """The pure gateway behind the fixture's UDP adapter (touch it only inside ``mqgate.call``)."""
    gateway: CoapGateway = mqgate.app.listeners["coap:udp"].gateway
    return gateway


def gateway_counter(mqgate: Any, name: str) -> int:
    """One of the gateway's ``counters`` (0 when never counted), read on the broker's loop."""
    value: int = mqgate.call(lambda: coap_gateway(mqgate).counters.get(name, 0))
    return value


def endpoint_metric(mqgate: Any, name: str) -> int:
    """One counter of the message layer's :class:`EndpointMetrics`, read on the broker's loop."""
    value: int = mqgate.call(lambda: getattr(coap_gateway(mqgate).endpoint.metrics, name))
    return value


def coap_uri(mqgate: Any, path: str, query: Mapping[str, str] | None = None) -> str:
    """``coap://127.0.0.1:PORT/path?k=v&...``; ``path`` is used as given (percent-encode it yourself)."""
    uri = f"coap://{HOST}:{coap_port(mqgate)}/{path.lstrip('/')}"
    if query:
        uri += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
    return uri


def query_options(query: Mapping[str, str] | Iterable[str] | None) -> list[tuple[int, bytes]]:
    """Uri-Query options from a mapping (``k=v``) or from ready ``k=v`` strings."""
    if query is None:
        return []
    items = [f"{k}={v}" for k, v in query.items()] if isinstance(query, Mapping) else list(query)
    return [(int(OptionNumber.URI_QUERY), item.encode()) for item in items]


def path_options(path: str | Iterable[str]) -> list[tuple[int, bytes]]:
    """Uri-Path options: ``"mqtt/a/b"`` is split on ``/``; a list is taken segment by segment, unchanged."""
    segments = [s for s in path.split("/") if s] if isinstance(path, str) else list(path)
    return [(int(OptionNumber.URI_PATH), s.encode()) for s in segments]


# --- a raw client


class RawCoap:
    """A CoAP peer on a plain UDP socket using :mod:`gateways.coap.codec`; see the module docstring."""

    def __init__(self, port: int, *, timeout: float = TIMEOUT) -> None:
        self.server = (HOST, port)
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.address: tuple[str, int] = self.sock.getsockname()
        self.inbox: collections.deque[CoapMessage] = collections.deque()
        self._mid = secrets.randbelow(0x10000)
        self.closed = False

    def next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    @staticmethod
    def new_token(size: int = 4) -> bytes:
        return secrets.token_bytes(size)

    # --- sending

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def send(self, message: CoapMessage) -> bytes:
        """Encode and send ``message``; returns the datagram (to repeat it byte for byte)."""
        data = codec.encode(message)
        self.send_bytes(data)
        return data

    def build(
        self,
        code: int,
        path: str | Iterable[str] = "",
        query: Mapping[str, str] | Iterable[str] | None = None,
        payload: bytes = b"",
        *,
        mtype: int = CON,
        observe: int | None = None,
        content_format: int | None = None,
        options: Iterable[tuple[int, bytes]] = (),
        token: bytes | None = None,
        mid: int | None = None,
    ) -> CoapMessage:
        """A request with a fresh message id and token unless given."""
        opts = path_options(path) + query_options(query) + list(options)
        if observe is not None:
            opts.append((int(OptionNumber.OBSERVE), codec.encode_uint(observe)))
        if content_format is not None:
            opts.append((int(OptionNumber.CONTENT_FORMAT), codec.encode_uint(content_format)))
        return CoapMessage(
            mtype,
            int(code),
            self.next_mid() if mid is None else mid,
            self.new_token() if token is None else token,
            opts,
            payload,
        )

    def request(self, code: int, path: str | Iterable[str] = "", *args: Any, **kwargs: Any) -> CoapMessage:
        """Send a request (as :meth:`build`) and return its response: the piggybacked ACK of a CON, or the
        NON answer to a NON (matched by token)."""
        return self.exchange(self.build(code, path, *args, **kwargs))

    def exchange(self, message: CoapMessage, timeout: float | None = None) -> CoapMessage:
        """Send ``message`` and return the response matching it (mid for an ACK or RST, token otherwise)."""
        self.send(message)
        return self.response_to(message, timeout)

    def response_to(self, message: CoapMessage, timeout: float | None = None) -> CoapMessage:
        mid, token = message.mid, message.token

        def matches(m: CoapMessage) -> bool:
            if m.mtype in (ACK, RST):
                return m.mid == mid
            return m.token == token and m.code >= 0x40 and m.observe() is None

        return self.recv(timeout, matches)

    def ping(self, mid: int | None = None) -> list[CoapMessage]:
        """Send a CoAP ping (an Empty CON, RFC 7252 §4.3) and wait for its RST; return what arrived before
        it. The gateway handles one socket's datagrams in order, so this is everything it had sent us in
        answer to earlier datagrams (except requests still waiting for a broker session)."""
        mid = self.next_mid() if mid is None else mid
        self.send_bytes(codec.encode(CoapMessage(CON, 0, mid)))
        before: list[CoapMessage] = []
        while True:
            message = self.recv()
            if message.mtype == RST and message.mid == mid and message.code == 0:
                return before
            before.append(message)

    def ack(self, message: CoapMessage) -> None:
        """An Empty ACK for a CON we received."""
        self.send_bytes(codec.empty_ack(message.mid))

    def rst(self, message: CoapMessage) -> None:
        """A RST for a message we received (RFC 7252 §4.2, §4.3; for a notification: RFC 7641 §3.6)."""
        self.send_bytes(codec.reset(message.mid))

    # --- receiving

    def _read(self, deadline: float) -> CoapMessage | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.sock.settimeout(remaining)
        try:
            data, _ = self.sock.recvfrom(65536)
        except TimeoutError:
            return None
        return codec.decode(data)

    def recv(
        self, timeout: float | None = None, match: Callable[[CoapMessage], bool] | None = None
    ) -> CoapMessage:
        """The first message (from the inbox, then the socket) that ``match`` accepts; others stay in the
        inbox in order. TimeoutError if none arrives in time."""
        for message in self.inbox:
            if match is None or match(message):
                self.inbox.remove(message)
                return message
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            message = self._read(deadline)
            if message is None:
                raise TimeoutError(f"no matching CoAP message from {self.server}")
            if match is None or match(message):
                return message
            self.inbox.append(message)

    def notification(self, token: bytes, timeout: float | None = None) -> CoapMessage:
        """The next message carrying ``token`` that is not an ACK (a notification, or a final response)."""
        return self.recv(timeout, lambda m: m.token == token and m.mtype in (CON, NON))

    def expect_nothing(
        self, timeout: float = 0.3, match: Callable[[CoapMessage], bool] | None = None
    ) -> None:
        """Assert that no (matching) message arrives within ``timeout`` (a negative wait: keep it short)."""
        try:
            message = self.recv(timeout, match)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected CoAP message {message!r}")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


def observe_seq(message: CoapMessage) -> int:
    value = message.observe()
    assert value is not None, f"no Observe option in {message!r}"
    return value


# --- libcoap's coap-client


_PDU = re.compile(
    r"^v:1 t:(CON|NON|ACK|RST) c:(\S+) i:([0-9a-f]{4}) \{([0-9a-f]*)\} \[ ?(.*?) ?\](?: :: (.*))?$"
)


@dataclass(frozen=True)
class Pdu:
    """One PDU line printed by ``coap-client -v 6``: type, code (``"2.05"`` or a method name), message id,
    token (hex), options as ``(name, value)`` text pairs, payload as printed (``'text'`` or binary info)."""

    mtype: str
    code: str
    mid: int
    token: str
    options: tuple[tuple[str, str], ...]
    payload: str | None

    @classmethod
    def parse(cls, line: str) -> Pdu | None:
        match = _PDU.match(line.rstrip("\n"))
        if match is None:
            return None
        mtype, code, mid, token, options, payload = match.groups()
        pairs = tuple(
            (name.strip(), value) for name, _, value in (o.partition(":") for o in options.split(", ") if o)
        )
        return cls(mtype, code, int(mid, 16), token, pairs, payload)

    @property
    def is_response(self) -> bool:
        """A response from the server (the client sends only requests and empty ACK/RST)."""
        return self.code[:1] in ("2", "4", "5")

    def option(self, name: str) -> str | None:
        for n, value in self.options:
            if n == name:
                return value
        return None

    @property
    def observe(self) -> int | None:
        value = self.option("Observe")
        return None if value is None else int(value)

    @property
    def text(self) -> str | None:
        """The payload when libcoap printed it as text."""
        if self.payload is None or not self.payload.startswith("'"):
            return None
        return self.payload[1:-1]


@dataclass
class CliResult:
    """What one ``coap-client`` run printed: the PDUs, the body it wrote to ``-o``, its exit status."""

    returncode: int
    pdus: list[Pdu]
    body: bytes
    stdout: str
    stderr: str

    @property
    def responses(self) -> list[Pdu]:
        return [p for p in self.pdus if p.is_response]

    @property
    def code(self) -> str:
        """The code of the last response received (``"2.04"``); AssertionError when none came."""
        responses = self.responses
        assert responses, f"coap-client got no response: {self.stdout!r} {self.stderr!r}"
        return responses[-1].code


def _cli_args(uri: str, method: str, args: Iterable[str], wait: float) -> list[str]:
    return [COAP_CLIENT, "-v", "6", "-B", str(max(1, round(wait))), "-m", method, *args, uri]


def coap_client(
    uri: str, method: str = "get", *args: str, payload: bytes | None = None, wait: float = TIMEOUT
) -> CliResult:
    """Run ``coap-client-notls -m METHOD ARGS URI`` once. ``payload`` is sent with ``-f`` (a file, so any
    bytes and any size work); ``wait`` bounds the CoAP exchange (``-B``) and, with a margin, the process."""
    with tempfile.TemporaryDirectory(prefix="coap-client-") as tmp:
        out = os.path.join(tmp, "body")
        extra = ["-o", out]
        if payload is not None:
            source = os.path.join(tmp, "payload")
            with open(source, "wb") as f:
                f.write(payload)
            extra += ["-f", source]
        completed = subprocess.run(
            _cli_args(uri, method, [*extra, *args], wait),
            capture_output=True,
            timeout=wait + 10,
            check=False,
        )
        body = b""
        if os.path.exists(out):
            with open(out, "rb") as f:
                body = f.read()
    stdout = completed.stdout.decode(errors="replace")
    pdus = [p for p in map(Pdu.parse, stdout.splitlines()) if p is not None]
    return CliResult(completed.returncode, pdus, body, stdout, completed.stderr.decode(errors="replace"))


class CoapObserver:
    """``coap-client-notls -s SECONDS`` in the background: observe ``uri`` and queue every response PDU it
    receives (the 2.05 that establishes the observation, then each notification). :meth:`close` kills it."""

    def __init__(self, uri: str, *args: str, duration: float = 30.0) -> None:
        self.uri = uri
        self.responses: queue.Queue[Pdu] = queue.Queue()
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            # line-buffered stdout: libcoap prints PDUs with stdio, block-buffered into a pipe
            [
                "stdbuf",
                "-oL",
                *_cli_args(uri, "get", ["-s", str(round(duration)), "-w", *args], duration + 5),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, name="coap-observer", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            pdu = Pdu.parse(line)
            if pdu is not None and pdu.is_response:
                self.responses.put(pdu)

    def expect(self, timeout: float = TIMEOUT) -> Pdu:
        """The next response PDU received; AssertionError if none arrives in time."""
        try:
            return self.responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"coap-client received nothing; output: {''.join(self.lines)!r}") from None

    def established(self, timeout: float = TIMEOUT) -> Pdu:
        """Wait for the response to the observe request: 2.05 with an Observe option."""
        first = self.expect(timeout)
        assert first.code == "2.05" and first.observe is not None, f"observe refused: {first}"
        return first

    def expect_none(self, timeout: float = 0.3) -> None:
        try:
            pdu = self.responses.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected notification {pdu}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()


# --- aiocoap


@dataclass
class AioObservation:
    """The notifications (``aiocoap.Message``) and the final error of one aiocoap observation."""

    first: aiocoap.Message
    request: Any
    notifications: queue.Queue[aiocoap.Message] = field(default_factory=queue.Queue)
    errors: queue.Queue[BaseException] = field(default_factory=queue.Queue)

    def expect(self, timeout: float = TIMEOUT) -> aiocoap.Message:
        try:
            return self.notifications.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("aiocoap received no notification") from None

    def expect_error(self, timeout: float = TIMEOUT) -> BaseException:
        try:
            return self.errors.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("the aiocoap observation did not end") from None

    def expect_none(self, timeout: float = 0.3) -> None:
        try:
            message = self.notifications.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected notification {message!r}")


class AioCoap:
    """An aiocoap client context on an event loop in its own thread, used synchronously from the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="aiocoap-client", daemon=True)
        self._thread.start()
        self._observations: list[AioObservation] = []
        try:
            self.context: aiocoap.Context = self._run(aiocoap.Context.create_client_context())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError(f"aiocoap got no answer within {timeout} s") from None

    @staticmethod
    def message(
        method: aiocoap.Code,
        uri: str,
        payload: bytes = b"",
        *,
        confirmable: bool = True,
        **options: Any,
    ) -> aiocoap.Message:
        """A request; ``options`` are aiocoap option attributes (``observe=0``, ``content_format=50``)."""
        tuning = aiocoap.Reliable if confirmable else aiocoap.Unreliable
        message = aiocoap.Message(code=method, uri=uri, payload=payload, transport_tuning=tuning)
        for name, value in options.items():
            setattr(message.opt, name, value)
        return message

    def request(
        self,
        method: aiocoap.Code,
        uri: str,
        payload: bytes = b"",
        *,
        confirmable: bool = True,
        timeout: float = TIMEOUT,
        **options: Any,
    ) -> aiocoap.Message:
        """Send one request (block-wise handled by aiocoap) and return the final response."""
        message = self.message(method, uri, payload, confirmable=confirmable, **options)

        async def go() -> aiocoap.Message:
            response: aiocoap.Message = await self.context.request(message).response
            return response

        result: aiocoap.Message = self._run(go(), timeout)
        return result

    def observe(self, uri: str, *, timeout: float = TIMEOUT, **options: Any) -> AioObservation:
        """GET with Observe=0; the first response is in ``.first``; every later response (notifications and
        a final one without Observe) queues up in ``.notifications``, the end of the observation in
        ``.errors``. aiocoap's callback interface is used (the ``async for`` one drops a final response)."""
        message = self.message(aiocoap.GET, uri, observe=0, **options)

        async def go() -> AioObservation:
            request = self.context.request(message)
            first = await request.response
            observation = AioObservation(first, request)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"register_(call|err)back .*deprecated", DeprecationWarning)
                request.observation.register_callback(observation.notifications.put)
                request.observation.register_errback(observation.errors.put)
            return observation

        observation: AioObservation = self._run(go(), timeout)
        self._observations.append(observation)
        return observation

    def cancel(self, observation: AioObservation) -> None:
        """Stop observing (aiocoap sends nothing: the next notification is answered with a RST)."""

        async def go() -> None:
            observation.request.observation.cancel()

        self._run(go())

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()

    def close(self) -> None:
        try:
            for observation in self._observations:
                with contextlib.suppress(Exception):
                    self.cancel(observation)
            self._run(self.context.shutdown())

            async def drain() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            self._run(drain())
        finally:
            self._stop_loop()


def code_of(message: CoapMessage) -> str:
    """``"2.04"``-style name of a raw message's code."""
    return code_name(message.code)


def aio_code(message: aiocoap.Message) -> str:
    """``"2.04"``-style name of an aiocoap message's code."""
    return code_name(int(message.code))


# --- fixtures (import them into a test module to use them)


class CoapClients:
    """Owns the raw clients and ``coap-client`` observers of a test and closes them all at the end."""

    def __init__(self) -> None:
        self._owned: list[RawCoap | CoapObserver] = []

    def raw(self, mqgate: Any, **kwargs: Any) -> RawCoap:
        client = RawCoap(coap_port(mqgate), **kwargs)
        self._owned.append(client)
        return client

    def observer(self, uri: str, *args: str, duration: float = 30.0) -> CoapObserver:
        observer = CoapObserver(uri, *args, duration=duration)
        self._owned.append(observer)
        return observer

    def close(self) -> None:
        errors: list[BaseException] = []
        for owned in reversed(self._owned):
            try:
                owned.close()
            except BaseException as exc:  # close everything, then report the first failure
                errors.append(exc)
        self._owned.clear()
        if errors:
            raise errors[0]


@pytest.fixture(name="coap")
def coap_fixture() -> Iterator[CoapClients]:
    """``coap.raw(mqgate)``, ``coap.observer(uri)``: CoAP clients closed after the test."""
    owned = CoapClients()
    try:
        yield owned
    finally:
        owned.close()


@pytest.fixture(name="aio")
def aio_fixture() -> Iterator[AioCoap]:
    """An aiocoap client context (its own loop thread), shut down after the test."""
    client = AioCoap()
    try:
        yield client
    finally:
        client.close()
