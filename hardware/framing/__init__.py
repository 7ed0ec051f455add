"""Framings of a serial byte stream into frames (issue 6), each a pure :class:`~hardware.link.Framer`.

Named in the configuration as ``framing =``:

- ``"length"``: the raw MQTT-SN length-delimited stream (MQTT-SN 1.2 §5.2.1), :mod:`hardware.framing.length`;
- ``"slip"``: RFC 1055, :mod:`hardware.framing.slip`;
- ``"xbee1"`` / ``"xbee2"``: XBee API frames, unescaped (AP = 1) or escaped (AP = 2), with each node's 64-bit
  address as its radio address, :mod:`hardware.framing.xbee`.
"""

from __future__ import annotations

from hardware.framing.length import LengthFramer
from hardware.framing.slip import SlipFramer
from hardware.framing.xbee import XBeeFramer
from hardware.link import Framer

__all__ = ["FRAMINGS", "LengthFramer", "SlipFramer", "XBeeFramer", "make_framer"]

FRAMINGS = ("length", "slip", "xbee1", "xbee2")
"""The framing names :func:`make_framer` accepts."""


def make_framer(name: str, max_frame: int = 1024) -> Framer:
    """A new framer for ``name`` (one of :data:`FRAMINGS`) delivering frames of at most ``max_frame`` octets
    (the RF data on XBee). Raises ValueError for an unknown name or a ``max_frame`` under the framing's
    minimum."""
    if name == "length":
        return LengthFramer(max_frame)
    if name == "slip":
        return SlipFramer(max_frame)
    if name == "xbee1":
        return XBeeFramer(escaped=False, max_frame=max_frame)
    if name == "xbee2":
        return XBeeFramer(escaped=True, max_frame=max_frame)
    raise ValueError(f"unknown framing {name!r}: expected one of {', '.join(FRAMINGS)}")
