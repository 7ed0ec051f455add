"""The raw MQTT-SN length-delimited stream (framing ``"length"``): MQTT-SN messages back to back, each
delimited by its own Length field (MQTT-SN 1.2 §5.2.1: one octet, or 0x01 followed by two octets for messages
of 256 octets or more). This is what common MQTT-SN serial bridges send. A frame is the whole MQTT-SN message,
Length field included, so :meth:`LengthFramer.encode` is the identity.

The stream has no delimiter and no checksum, so the framer resynchronises by plausibility. At each offset it
reads a header and accepts it when all of these hold:

- the one-octet Length is 2 or more (0 is never valid; 1 announces the three-octet form);
- a three-octet Length is 256 or more (§5.2.1 reserves the long form for long messages) and at most 0xFFFF;
- the Length is at most ``max_frame`` (otherwise it is counted as ``oversize``);
- the MsgType octet after the Length is a defined :class:`~gateways.mqttsn.numbers.MsgType`;
- for a forwarder encapsulation (MsgType 0xFE, §5.5), whose Length covers only its own header: the one-octet
  form, a Length of 3 or more, and a plausible header (by the rules above, and not itself 0xFE) for the
  encapsulated message that follows it. The frame is the header and the encapsulated message together, and
  ``max_frame`` applies to both.

A rejected header costs one octet: the framer counts it as garbage and tries again at the next offset. An
accepted header is trusted: the framer waits for the whole message and delivers it. So garbage is skipped
exactly when no offset inside it starts a plausible header. Garbage that does (any octet from 2 to
``max_frame`` followed by 0x00, ADVERTISE, for instance) swallows the bytes after it as one bogus frame, which
the gateway's codec usually rejects (not always: plausible bytes can decode), and the framer is back in step
once a bogus frame ends on a rejected header or a real one. Octets no header can start with, whatever follows
them: 0x00 (what a UART reads during a line break) and, when ``max_frame`` is under 256, 0x01 and every octet
over ``max_frame``.

A message over ``max_frame`` is skipped the same way, one octet at a time, not by its announced Length (which
line noise may have made up). The octets of a three-octet Length over ``max_frame`` always hold a plausible
one-octet header, so a real oversize message costs a bogus frame as well. A link that needs stronger recovery
should use ``"slip"`` or an XBee framing.
"""

from __future__ import annotations

from gateways.mqttsn.numbers import MsgType
from hardware.link import FramerMetrics

__all__ = ["LengthFramer"]

_LONG_FORM = 0x01
_LONG_MIN = 256
_ENCAPSULATED = MsgType.ENCAPSULATED.value
_ENCAPSULATION_MIN = 3
"""Length, MsgType and Ctrl octets; the Wireless Node Id follows (§5.5)."""
_TYPE_OK = bytes(1 if value in frozenset(MsgType) else 0 for value in range(256))
"""1 at the index of every defined MsgType (§5.2.2)."""


def _declared_size(frame: bytes, nested: bool = False) -> int:
    """The size the Length field(s) at the start of ``frame`` announce, or -1 if they cannot delimit it."""
    size = len(frame)
    if size < 2:
        return -1
    length = frame[0]
    if length == _LONG_FORM:
        if size < 4:
            return -1
        length = (frame[1] << 8) | frame[2]
        return length if length >= _LONG_MIN and frame[3] != _ENCAPSULATED else -1
    if frame[1] != _ENCAPSULATED:
        return length
    if nested or length < _ENCAPSULATION_MIN:
        return -1
    inner = _declared_size(frame[length:], nested=True)
    return length + inner if inner > 0 else -1


class LengthFramer:
    """MQTT-SN length-delimited stream framer; the module docstring states its resynchronisation heuristic."""

    __slots__ = ("_hunting", "_max_frame", "_rest", "buffer_limit", "metrics")

    def __init__(self, max_frame: int = 1024) -> None:
        if max_frame < 2:
            raise ValueError(f"max_frame must be at least 2 (the shortest MQTT-SN message), not {max_frame}")
        self.metrics = FramerMetrics()
        self.buffer_limit = max_frame + 3
        """The most bytes the framer holds between calls to :meth:`feed`."""
        self._max_frame = max_frame
        self._rest = b""
        self._hunting = False

    @property
    def buffered(self) -> int:
        """Bytes of a partial frame held until more arrive."""
        return len(self._rest)

    def feed(self, data: bytes) -> list[tuple[bytes | None, bytes]]:
        buf = self._rest + data if self._rest else bytes(data)
        size = len(buf)
        max_frame = self._max_frame
        type_ok = _TYPE_OK
        metrics = self.metrics
        out: list[tuple[bytes | None, bytes]] = []
        i = 0
        while True:
            avail = size - i
            if avail < 2:
                break
            length = buf[i]
            if length == _LONG_FORM:
                if avail < 4:
                    break
                length = (buf[i + 1] << 8) | buf[i + 2]
                msg_type = buf[i + 3]
                good = length >= _LONG_MIN and type_ok[msg_type] == 1 and msg_type != _ENCAPSULATED
            else:
                msg_type = buf[i + 1]
                good = length != 0 and type_ok[msg_type] == 1
                if good and msg_type == _ENCAPSULATED:
                    if length < _ENCAPSULATION_MIN:
                        good = False
                    elif length + 2 <= max_frame:
                        inner = self._inner_length(buf, i + length)
                        if inner is None:
                            break
                        good = inner > 0
                        length += inner
                    else:
                        length += 2  # over max_frame whatever it encapsulates
            if good and length > max_frame:
                metrics.oversize += 1
                good = False
            if not good:
                metrics.garbage_bytes += 1
                if not self._hunting:
                    self._hunting = True
                    metrics.resyncs += 1
                i += 1
                continue
            if avail < length:
                break
            out.append((None, buf[i : i + length]))
            i += length
            self._hunting = False
        self._rest = buf[i:]
        metrics.frames += len(out)
        return out

    @staticmethod
    def _inner_length(buf: bytes, j: int) -> int | None:
        """Length of the message encapsulated after a forwarder header ending at ``j`` (§5.5); 0 if its header
        is implausible (including a nested encapsulation), None if its header has not arrived yet."""
        avail = len(buf) - j
        if avail < 2:
            return None
        length = buf[j]
        if length == _LONG_FORM:
            if avail < 4:
                return None
            length = (buf[j + 1] << 8) | buf[j + 2]
            msg_type = buf[j + 3]
            good = length >= _LONG_MIN
        else:
            msg_type = buf[j + 1]
            good = length >= 2
        return length if good and _TYPE_OK[msg_type] == 1 and msg_type != _ENCAPSULATED else 0

    def encode(self, frame: bytes, address: bytes | None = None) -> bytes:
        """``frame`` itself, after checking that its Length fields (§5.2.1, §5.5) add up to its size: a frame
        that does not delimit itself would desynchronise the peer. Raises ValueError otherwise."""
        declared = _declared_size(frame)
        if declared != len(frame):
            raise ValueError(f"the MQTT-SN Length fields say {declared} octets, the frame has {len(frame)}")
        return bytes(frame)

    def broadcast(self, frame: bytes) -> bytes:
        return self.encode(frame)

    def reset(self) -> None:
        if self._rest:
            self.metrics.truncated += 1
        self._rest = b""
        self._hunting = False
