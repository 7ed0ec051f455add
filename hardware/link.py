"""Links and framers: what makes UDP, serial and radio links interchangeable for the gateways (issue 6).

A :class:`Link` carries frames (whole protocol messages, MQTT-SN datagrams for instance) to and from
printable, hashable :data:`LinkAddress` values; the gateways above it never see how a link delimits frames. A
serial link delimits them with a :class:`Framer`: a pure object (no I/O, no clock, DESIGN.md §1) fed the bytes
that arrive, in whatever chunks the driver delivers, that returns the complete frames and encodes outgoing
ones. The framings themselves live in :mod:`hardware.framing`.

Every framer follows one policy for bad input (DESIGN.md §4.3): ``feed`` never raises; bytes that cannot
belong to a frame are skipped and counted, a frame that fails its check is dropped and counted, and the framer
resynchronises on the next good frame. Between calls a framer holds at most one partial frame, bounded by its
``max_frame`` plus a few header octets; a frame over ``max_frame`` is dropped (``oversize``), never buffered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

__all__ = ["Framer", "FramerMetrics", "Link", "LinkAddress"]

LinkAddress: TypeAlias = str
"""Opaque, printable and hashable: ``udp:127.0.0.1:40000``, ``serial:/dev/ttyUSB0``,
``xbee:0013A20040A1B2C3``, ``fwd:serial:/dev/ttyUSB0/0007``."""


@dataclass(slots=True)
class FramerMetrics:
    """What a framer counts; plain integers, read by the link for its logs and Prometheus counters.

    ``frames``: frames delivered. ``garbage_bytes``: bytes discarded outside delivered or ignored frames (line
    noise, the bytes of dropped frames; escaped framings count some after unescaping). ``bad_checksums``:
    frames dropped for a wrong checksum. ``oversize``: frames (or headers announcing one) over ``max_frame``.
    ``truncated``: partial frames abandoned because a new frame started or :meth:`Framer.reset` was called.
    ``resyncs``: times the framer lost its frame boundary and had to hunt for the next one (one per run of
    garbage or dropped frame). ``malformed``: frames that were delimited and checked but broke their own
    framing's rules (a SLIP escape error, an XBee receive frame too short for its layout). ``ignored``: well
    formed frames that carry no payload for the gateway (XBee transmit status, modem status, AT responses).
    """

    frames: int = 0
    garbage_bytes: int = 0
    bad_checksums: int = 0
    oversize: int = 0
    truncated: int = 0
    resyncs: int = 0
    malformed: int = 0
    ignored: int = 0


class Framer(Protocol):
    """A pure framing of a byte stream (no I/O): bytes in, ``(radio source address, frame)`` pairs out."""

    metrics: FramerMetrics

    def feed(self, data: bytes) -> list[tuple[bytes | None, bytes]]:
        """The frames completed by ``data``, each with its radio source address (``None`` on point-to-point
        framings). Never raises; bad input is dropped and counted in :attr:`metrics`."""
        ...

    def encode(self, frame: bytes, address: bytes | None = None) -> bytes:
        """The bytes that carry ``frame``; ``address`` is the destination radio address where the framing has
        one (XBee), and is ignored otherwise."""
        ...

    def broadcast(self, frame: bytes) -> bytes:
        """The bytes that carry ``frame`` to every node: the radio broadcast address on XBee, otherwise the
        same as :meth:`encode`."""
        ...

    def reset(self) -> None:
        """Forget any partial frame (the link was reopened); counted as ``truncated`` if there was one."""
        ...


class Link(Protocol):
    """One link (a UDP socket, a serial port) carrying frames to and from link addresses.

    The runner sets :attr:`on_frame` before :meth:`open`; the link calls it once per received frame with the
    frame's source address. ``send`` and ``broadcast`` never block: they queue the bytes on the transport.
    """

    on_frame: Callable[[LinkAddress, bytes], None]

    @property
    def name(self) -> LinkAddress:
        """The link's own address, for logs and metrics labels (``serial:/dev/ttyUSB0``)."""
        ...

    def send(self, address: LinkAddress, frame: bytes) -> None: ...

    def broadcast(self, frame: bytes) -> None: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...
