"""The error hierarchy shared by the broker, the gateways and the hardware layer.

Every error the project raises on purpose derives from :class:`MqgateError`. Decoders raise
:class:`MalformedPacket` carrying the protocol's own code to answer with (an MQTT v5 reason code,
an MQTT-SN return code, a CoAP response code), never ``struct.error``, ``IndexError`` or
``UnicodeDecodeError``.
"""

from __future__ import annotations

__all__ = ["ConfigError", "MalformedPacket", "MqgateError", "ProtocolError"]


class MqgateError(Exception):
    """Root of every error raised on purpose by mqgate."""


class ConfigError(MqgateError):
    """The configuration is invalid; the message names the key or the address."""


class ProtocolError(MqgateError):
    """A peer broke the rules of its protocol; ``code`` is the protocol's answer to it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class MalformedPacket(ProtocolError):
    """Bytes that do not decode; ``code`` is the protocol's code for a malformed packet."""
