"""CoAP numbers: message types, codes, options and content formats (RFC 7252 §3, §5.10, §12), the
transmission parameters of RFC 7252 §4.8, and the numbers added by Observe (RFC 7641), block-wise transfer
(RFC 7959), FETCH/PATCH (RFC 8132) and No-Response (RFC 7967)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "CoapError",
    "Code",
    "ContentFormat",
    "OptionNumber",
    "Timing",
    "Type",
    "code_class",
    "code_name",
    "is_critical",
    "is_no_cache_key",
    "is_request",
    "is_response",
    "is_unsafe",
    "make_code",
]


class Type(IntEnum):
    """Message type T, 2 bits (RFC 7252 §3, §4)."""

    CON = 0
    NON = 1
    ACK = 2
    RST = 3


def make_code(cls: int, detail: int) -> int:
    """The code byte ``c.dd``: a 3-bit class and a 5-bit detail (RFC 7252 §3)."""
    return (cls << 5) | detail


class Code(IntEnum):
    """Method and response codes (RFC 7252 §5.8, §5.9, §12.1; RFC 7959 §2.9; RFC 8132 §2-§3; RFC 8516)."""

    EMPTY = 0x00
    GET = 0x01
    POST = 0x02
    PUT = 0x03
    DELETE = 0x04
    FETCH = 0x05
    PATCH = 0x06
    IPATCH = 0x07

    CREATED = 0x41  # 2.01
    DELETED = 0x42
    VALID = 0x43
    CHANGED = 0x44
    CONTENT = 0x45
    CONTINUE = 0x5F  # 2.31, RFC 7959 §2.9.1

    BAD_REQUEST = 0x80  # 4.00
    UNAUTHORIZED = 0x81
    BAD_OPTION = 0x82
    FORBIDDEN = 0x83
    NOT_FOUND = 0x84
    METHOD_NOT_ALLOWED = 0x85
    NOT_ACCEPTABLE = 0x86
    REQUEST_ENTITY_INCOMPLETE = 0x88  # 4.08, RFC 7959 §2.9.2
    CONFLICT = 0x89  # 4.09, RFC 8132 §3.4
    PRECONDITION_FAILED = 0x8C  # 4.12
    REQUEST_ENTITY_TOO_LARGE = 0x8D  # 4.13, RFC 7959 §2.9.3
    UNSUPPORTED_CONTENT_FORMAT = 0x8F  # 4.15
    UNPROCESSABLE_ENTITY = 0x96  # 4.22, RFC 8132 §3.4
    TOO_MANY_REQUESTS = 0x9D  # 4.29, RFC 8516 §3

    INTERNAL_SERVER_ERROR = 0xA0  # 5.00
    NOT_IMPLEMENTED = 0xA1
    BAD_GATEWAY = 0xA2
    SERVICE_UNAVAILABLE = 0xA3
    GATEWAY_TIMEOUT = 0xA4
    PROXYING_NOT_SUPPORTED = 0xA5


def code_name(code: int) -> str:
    """The dotted ``c.dd`` form of a code byte, e.g. ``"4.04"`` (RFC 7252 §3)."""
    return f"{code >> 5}.{code & 0x1F:02d}"


def code_class(code: int) -> int:
    """The class ``c`` of a code: 0 request, 2 success, 4 client error, 5 server error; 1, 6, 7 reserved."""
    return code >> 5


def is_request(code: int) -> bool:
    """Class 0 with a non-zero detail: a method (RFC 7252 §5.8)."""
    return 0 < code < 0x20


def is_response(code: int) -> bool:
    """Classes 2, 4 and 5 (RFC 7252 §5.9)."""
    return 0x40 <= code < 0xC0


class CoapError(Exception):
    """A request or response that is answered or reported with a CoAP response code (RFC 7252 §5.9) and a
    diagnostic text (§5.5.2)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class OptionNumber(IntEnum):
    """Option numbers (RFC 7252 §5.10, §12.2; RFC 7641 §2; RFC 7959 §2.1, §4; RFC 7967 §2)."""

    IF_MATCH = 1
    URI_HOST = 3
    ETAG = 4
    IF_NONE_MATCH = 5
    OBSERVE = 6
    URI_PORT = 7
    LOCATION_PATH = 8
    URI_PATH = 11
    CONTENT_FORMAT = 12
    MAX_AGE = 14
    URI_QUERY = 15
    ACCEPT = 17
    LOCATION_QUERY = 20
    BLOCK2 = 23
    BLOCK1 = 27
    SIZE2 = 28
    PROXY_URI = 35
    PROXY_SCHEME = 39
    SIZE1 = 60
    NO_RESPONSE = 258


def is_critical(number: int) -> bool:
    """Odd numbers are critical: a CON request carrying one the server does not know gets 4.02 (RFC 7252
    §5.4.1, §5.4.6)."""
    return bool(number & 1)


def is_unsafe(number: int) -> bool:
    """Bit 1 set: unsafe to forward by a proxy that does not know the option (RFC 7252 §5.4.2, §5.4.6)."""
    return bool(number & 2)


def is_no_cache_key(number: int) -> bool:
    """The NoCacheKey pattern ``xxx111x0`` in the low byte (RFC 7252 §5.4.6)."""
    return (number & 0x1E) == 0x1C


class ContentFormat(IntEnum):
    """Content-Format identifiers used by the gateways (RFC 7252 §12.3, RFC 8428 §12.3, OMA LwM2M 1.1
    §7.3.1 / 1.2 §7.2)."""

    TEXT_PLAIN = 0
    LINK_FORMAT = 40
    XML = 41
    OCTET_STREAM = 42
    EXI = 47
    JSON = 50
    CBOR = 60
    SENML_JSON = 110
    SENML_CBOR = 112
    LWM2M_TLV = 11542
    LWM2M_JSON = 11543
    LWM2M_CBOR = 11544


@dataclass(frozen=True, slots=True)
class Timing:
    """Transmission parameters (RFC 7252 §4.8) and the times derived from them (§4.8.2).

    Field names are the spec's in lower case; seconds as floats. With the defaults,
    ``exchange_lifetime`` is 247 s and ``non_lifetime`` 145 s.
    """

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    nstart: int = 1
    default_leisure: float = 5.0
    probing_rate: float = 1.0  # bytes/second
    max_latency: float = 100.0  # §4.8.2: an assumption, not a measured value

    @property
    def max_transmit_span(self) -> float:
        """First to last transmission of a CON message: 45 s by default."""
        return self.ack_timeout * ((1 << self.max_retransmit) - 1) * self.ack_random_factor

    @property
    def max_transmit_wait(self) -> float:
        """First transmission to giving up on an ACK or RST: 93 s by default."""
        return self.ack_timeout * ((1 << (self.max_retransmit + 1)) - 1) * self.ack_random_factor

    @property
    def processing_delay(self) -> float:
        """Time a node takes to answer a CON: ACK_TIMEOUT (§4.8.2)."""
        return self.ack_timeout

    @property
    def max_rtt(self) -> float:
        """Maximum round-trip time: 202 s by default."""
        return 2 * self.max_latency + self.processing_delay

    @property
    def exchange_lifetime(self) -> float:
        """How long a CON message id is remembered (deduplication, §4.5): 247 s by default."""
        return self.max_transmit_span + 2 * self.max_latency + self.processing_delay

    @property
    def non_lifetime(self) -> float:
        """How long a NON message id is remembered: 145 s by default."""
        return self.max_transmit_span + self.max_latency
