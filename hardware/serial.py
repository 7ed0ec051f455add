"""A serial port as a :class:`~hardware.link.Link`: the thin asyncio adapter around a pure framer.

:class:`SerialLink` opens ``[[hardware.serial]] device`` with pyserial-asyncio, feeds every chunk it reads to
the :class:`~hardware.link.Framer` named by ``framing`` and reports each complete frame with its link address:
``serial:{device}`` on the point-to-point framings (``length``, ``slip``), ``xbee:{SOURCE64 HEX}`` (the radio
source address) on ``xbee1``/``xbee2``. Outgoing frames are encoded by the same framer, on XBee to the radio
address in the link address.

A device that cannot be opened, or goes away (a read or write error, EOF, unplugged), never stops mqgate: the
link logs the transition once (``serial /dev/x lost: reason``), calls :attr:`SerialLink.on_lost` so the runner
can count the clients behind it as lost, resets the framer and reopens the device with exponential backoff
(``reopen_min`` doubling up to ``reopen_max`` seconds, plus up to 50 % jitter from the injected
:class:`random.Random`) until it is back (``serial /dev/x open again``). Frames sent while the device is away,
or while the driver's write buffer is over its high-water mark, are dropped and counted: the MQTT-SN gateway
above retransmits what needs it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum

import serial  # type: ignore[import-untyped]
import serial_asyncio  # type: ignore[import-untyped]

from core.config import SerialLinkConfig
from hardware.framing import make_framer
from hardware.link import Framer, LinkAddress

__all__ = ["LinkState", "SerialLink", "SerialLinkMetrics"]

log = logging.getLogger("mqgate.hardware")

_MAX_DOUBLINGS = 30
_CLOSE_TIMEOUT = 2.0  # seconds to flush on close before the buffered bytes are abandoned
_NOISE_FIELDS = ("garbage_bytes", "bad_checksums", "oversize", "malformed")


class LinkState(Enum):
    """Where a serial link is: never opened yet, open, or away and being reopened."""

    CLOSED = "closed"
    OPEN = "open"
    LOST = "lost"


@dataclass(slots=True)
class SerialLinkMetrics:
    """Counters of one serial link (the framer counts the bytes and frames it drops in its own metrics)."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    opens: int = 0
    losses: int = 0
    open_failures: int = 0
    dropped_link_down: int = 0  # frames to send while the device was away
    dropped_congested: int = 0  # frames to send while the write buffer was over its high-water mark
    dropped_bad_address: int = 0  # frames to an address this link cannot reach
    dropped_unencodable: int = 0  # frames the framer refused (oversize for the framing)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _ignore_frame(address: LinkAddress, frame: bytes) -> None:
    pass


def _ignore_loss(reason: str) -> None:
    pass


class SerialLink:
    """One ``[[hardware.serial]]`` device; see the module docstring."""

    def __init__(
        self, config: SerialLinkConfig, *, rng: random.Random | None = None, framer: Framer | None = None
    ) -> None:
        self.config = config
        self.framer = framer if framer is not None else make_framer(config.framing, config.max_frame)
        self.rng = rng if rng is not None else random.Random()
        self.metrics = SerialLinkMetrics()
        self.state = LinkState.CLOSED
        self.on_frame: Callable[[LinkAddress, bytes], None] = _ignore_frame
        self.on_lost: Callable[[str], None] = _ignore_loss
        self._name = f"serial:{config.device}"
        self._radio = config.framing.startswith("xbee")
        self._transport: asyncio.Transport | None = None
        self._protocol: _SerialProtocol | None = None
        self._congested = False
        self._closing = False
        self._attempt = 0
        self._opened_at = 0.0
        self._reopen_timer: asyncio.TimerHandle | None = None
        self._opening: asyncio.Task[None] | None = None
        self._noise = 0
        self._noise_logged = False
        self._logged_addresses = False

    @property
    def name(self) -> LinkAddress:
        return self._name

    @property
    def up(self) -> bool:
        return self.state is LinkState.OPEN

    # --- Link

    async def open(self) -> None:
        """Open the device once; if it cannot be opened the link is ``LOST`` and keeps trying in the
        background (this never raises for a missing or busy device)."""
        self._closing = False
        await self._open_once()

    async def close(self) -> None:
        """Stop reopening and close the device (buffered output gets :data:`_CLOSE_TIMEOUT` to drain)."""
        self._closing = True
        if self._reopen_timer is not None:
            self._reopen_timer.cancel()
            self._reopen_timer = None
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
        transport, protocol = self._transport, self._protocol
        self._transport = self._protocol = None
        self.state = LinkState.CLOSED
        if transport is None or protocol is None:
            return
        transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(protocol.closed), _CLOSE_TIMEOUT)
        except TimeoutError:
            transport.abort()
            await protocol.closed

    def send(self, address: LinkAddress, frame: bytes) -> None:
        destination: bytes | None = None
        if self._radio:
            destination = _radio_address(address)
            if destination is None:
                self.metrics.dropped_bad_address += 1
                if not self._logged_addresses:
                    self._logged_addresses = True
                    log.warning(
                        "serial %s: cannot send to %s: not an XBee address", self.config.device, address
                    )
                return
        self._write(frame, destination, broadcast=False)

    def broadcast(self, frame: bytes) -> None:
        self._write(frame, None, broadcast=True)

    def _write(self, frame: bytes, destination: bytes | None, *, broadcast: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            self.metrics.dropped_link_down += 1
            return
        if self._congested:
            self.metrics.dropped_congested += 1
            return
        try:
            data = self.framer.broadcast(frame) if broadcast else self.framer.encode(frame, destination)
        except ValueError as exc:
            self.metrics.dropped_unencodable += 1
            log.debug("serial %s: frame not sent: %s", self.config.device, exc)
            return
        self.metrics.frames_out += 1
        self.metrics.bytes_out += len(data)
        transport.write(data)

    # --- opening and reopening

    async def _open_once(self) -> None:
        loop = asyncio.get_running_loop()
        protocol = _SerialProtocol(self, loop)
        try:
            transport, _ = await serial_asyncio.create_serial_connection(
                loop, lambda: protocol, self.config.device, baudrate=self.config.baudrate
            )
        except (OSError, ValueError, serial.SerialException) as exc:
            self._open_failed(_reason(exc))
            return
        if self._closing:
            transport.abort()
            return
        self._transport, self._protocol = transport, protocol
        self._congested = False
        self.framer.reset()
        again = self.state is LinkState.LOST
        self.state = LinkState.OPEN
        self._opened_at = loop.time()
        self._noise_logged = False
        self.metrics.opens += 1
        if again:
            log.info("serial %s open again", self.config.device)
        else:
            log.info(
                "serial %s open (%s framing, %d baud)",
                self.config.device,
                self.config.framing,
                self.config.baudrate,
            )

    def _open_failed(self, reason: str) -> None:
        self.metrics.open_failures += 1
        if self.state is not LinkState.LOST:
            self.state = LinkState.LOST
            log.warning("serial %s lost: %s", self.config.device, reason)
        else:
            log.debug("serial %s: reopening failed: %s", self.config.device, reason)
        self._schedule_reopen()

    def _connection_lost(self, protocol: _SerialProtocol, exc: Exception | None) -> None:
        if protocol is not self._protocol or self._closing:
            return  # a transport we closed ourselves
        loop = asyncio.get_running_loop()
        self._transport = self._protocol = None
        self.state = LinkState.LOST
        self.metrics.losses += 1
        if loop.time() - self._opened_at >= self.config.reopen_max:
            self._attempt = 0  # it worked for a while: start the backoff over
        self.framer.reset()
        reason = _reason(exc) if exc is not None else "closed by the driver"
        log.warning("serial %s lost: %s", self.config.device, reason)
        self.on_lost(reason)
        self._schedule_reopen()

    def _schedule_reopen(self) -> None:
        if self._closing:
            return
        config = self.config
        ceiling = max(config.reopen_min, config.reopen_max)
        base = min(ceiling, config.reopen_min * 2 ** min(self._attempt, _MAX_DOUBLINGS))
        delay = min(ceiling, base * (1.0 + 0.5 * self.rng.random()))
        self._attempt += 1
        self._reopen_timer = asyncio.get_running_loop().call_later(delay, self._reopen)

    def _reopen(self) -> None:
        self._reopen_timer = None
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._open_once(), name=f"reopen {self._name}")
        self._opening = task
        task.add_done_callback(self._reopened)

    def _reopened(self, task: asyncio.Task[None]) -> None:
        if self._opening is task:
            self._opening = None
        if not task.cancelled() and task.exception() is not None:
            log.error("serial %s: reopening failed", self.config.device, exc_info=task.exception())
            self._schedule_reopen()

    # --- input

    def _received(self, data: bytes) -> None:
        self.metrics.bytes_in += len(data)
        framer = self.framer
        frames = framer.feed(data)
        metrics = framer.metrics
        noise = sum(getattr(metrics, name) for name in _NOISE_FIELDS)
        if noise != self._noise:
            self._noise_seen(noise)
        if not frames:
            return
        self.metrics.frames_in += len(frames)
        self._attempt = 0  # the device talks: a later loss starts the backoff over
        name = self._name
        on_frame = self.on_frame
        for source, frame in frames:
            on_frame(name if source is None else "xbee:" + source.hex().upper(), frame)

    def _noise_seen(self, total: int) -> None:
        """Line noise or bad frames were skipped: logged once per open, then at debug level."""
        self._noise = total
        metrics = self.framer.metrics
        counts = ", ".join(f"{name} {getattr(metrics, name)}" for name in _NOISE_FIELDS)
        if self._noise_logged:
            log.debug("serial %s: skipped bad input (%s)", self.config.device, counts)
            return
        self._noise_logged = True
        log.warning(
            "serial %s: skipped line noise or bad frames, resynchronised (%s; more at debug level)",
            self.config.device,
            counts,
        )


class _SerialProtocol(asyncio.Protocol):
    """Hands the driver's callbacks to its :class:`SerialLink`; ``closed`` resolves when the port closes."""

    def __init__(self, link: SerialLink, loop: asyncio.AbstractEventLoop) -> None:
        self.link = link
        self.closed: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.link._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.link._connection_lost(self, exc)

    def pause_writing(self) -> None:
        self.link._congested = True

    def resume_writing(self) -> None:
        self.link._congested = False


def _radio_address(address: LinkAddress) -> bytes | None:
    """``xbee:0013A20040A1B2C3`` -> the radio address bytes; None for anything else."""
    kind, _, digits = address.partition(":")
    if kind != "xbee" or not digits or len(digits) % 2:
        return None
    try:
        return bytes.fromhex(digits)
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    """A one-line reason from an open or I/O error (pyserial wraps the OSError text in its own)."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
