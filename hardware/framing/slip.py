"""SLIP framing (framing ``"slip"``, RFC 1055): each frame ends with END (0xC0); END and ESC (0xDB) inside a
frame are sent as ESC ESC_END (0xDB 0xDC) and ESC ESC_ESC (0xDB 0xDD).

:meth:`SlipFramer.encode` also sends an END before the frame, as RFC 1055's ``send_packet`` does, so line
noise before it ends up in a frame of its own instead of corrupting this one; empty frames between two ENDs
are ignored. A frame is delivered when its END arrives, so the bytes before the first END after start-up or
:meth:`~SlipFramer.reset` count as a frame too (a peer that sends only trailing ENDs loses nothing; the tail
of a frame cut by a reopen reaches the gateway, whose codec rejects it).

Bad input: an ESC followed by anything but ESC_END or ESC_ESC (END included) is a protocol error (RFC 1055
keeps the byte; we cannot trust such a frame): the frame is dropped and counted as ``malformed``. A frame that
grows over ``max_frame`` octets (after unescaping) is dropped and counted as ``oversize``. Either way the
framer skips to the next END and resynchronises there: END always ends a frame, so one bad frame never costs
the next one. The framer holds at most ``max_frame`` unescaped octets between calls.
"""

from __future__ import annotations

from hardware.link import FramerMetrics

__all__ = ["END", "ESC", "ESC_END", "ESC_ESC", "SlipFramer"]

END = 0xC0
ESC = 0xDB
ESC_END = 0xDC
ESC_ESC = 0xDD

_END = bytes((END,))
_ESC = bytes((ESC,))
_ESCAPED_END = bytes((ESC, ESC_END))
_ESCAPED_ESC = bytes((ESC, ESC_ESC))


class SlipFramer:
    """RFC 1055 framer; see the module docstring for the bad-input policy."""

    __slots__ = ("_buf", "_dropping", "_escape", "_hunting", "_max_frame", "buffer_limit", "metrics")

    def __init__(self, max_frame: int = 1024) -> None:
        if max_frame < 1:
            raise ValueError(f"max_frame must be at least 1, not {max_frame}")
        self.metrics = FramerMetrics()
        self.buffer_limit = max_frame
        """The most bytes the framer holds between calls to :meth:`feed`."""
        self._max_frame = max_frame
        self._buf = bytearray()
        self._escape = False
        """The last byte received was an ESC whose partner has not arrived yet."""
        self._dropping = False
        """Discarding the rest of a bad frame, up to the next END."""
        self._hunting = False

    @property
    def buffered(self) -> int:
        """Unescaped bytes of a partial frame held until its END arrives."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[bytes | None, bytes]]:
        out: list[tuple[bytes | None, bytes]] = []
        size = len(data)
        pos = 0
        while pos < size:
            end = data.find(END, pos)
            stop = size if end < 0 else end
            if stop > pos:
                self._collect(data[pos:stop], last=end < 0)
            if end < 0:
                break
            pos = end + 1
            if self._escape:
                self._drop(1)  # ESC END
            if self._dropping:
                self._dropping = False
            elif self._buf:
                out.append((None, bytes(self._buf)))
                self._buf.clear()
                self._hunting = False
        self.metrics.frames += len(out)
        return out

    def _collect(self, segment: bytes, last: bool) -> None:
        """Unescape ``segment`` (no END in it) onto the frame being received; ``last``: no END follows it in
        this chunk, so a trailing ESC waits for its partner."""
        if self._dropping:
            self.metrics.garbage_bytes += len(segment)
            return
        if self._escape:
            self._escape = False
            partner = segment[0]
            if partner == ESC_END:
                self._buf.append(END)
            elif partner == ESC_ESC:
                self._buf.append(ESC)
            else:
                self._drop(len(segment) + 1)
                return
            segment = segment[1:]
        if last and segment.endswith(_ESC):
            segment = segment[:-1]
            self._escape = True
        if ESC in segment:
            escapes = segment.count(_ESC)
            ends = segment.count(_ESCAPED_END)
            if escapes != ends + segment.count(_ESCAPED_ESC):
                self._escape = False
                self._drop(len(segment))
                return
            segment = segment.replace(_ESCAPED_END, _END).replace(_ESCAPED_ESC, _ESC)
        if len(self._buf) + len(segment) > self._max_frame:
            self.metrics.oversize += 1
            self.metrics.garbage_bytes += len(self._buf) + len(segment)
            self._buf.clear()
            self._escape = False
            self._dropping = True
            self._lose_sync()
            return
        self._buf += segment

    def _drop(self, skipped: int) -> None:
        """A protocol error (RFC 1055 defines only ESC_END and ESC_ESC after ESC): drop the frame."""
        self.metrics.malformed += 1
        self.metrics.garbage_bytes += len(self._buf) + skipped
        self._buf.clear()
        self._escape = False
        self._dropping = True
        self._lose_sync()

    def _lose_sync(self) -> None:
        if not self._hunting:
            self._hunting = True
            self.metrics.resyncs += 1

    def encode(self, frame: bytes, address: bytes | None = None) -> bytes:
        """END, ``frame`` with END and ESC escaped, END (RFC 1055 ``send_packet``)."""
        return _END + frame.replace(_ESC, _ESCAPED_ESC).replace(_END, _ESCAPED_END) + _END

    def broadcast(self, frame: bytes) -> bytes:
        return self.encode(frame)

    def reset(self) -> None:
        if self._buf or self._escape:
            self.metrics.truncated += 1
        self._buf.clear()
        self._escape = False
        self._dropping = False
        self._hunting = False
