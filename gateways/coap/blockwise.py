"""Block-wise transfer on the client side, pure: a response body the server sends in Block2 blocks, asked for
block by block and put back together (RFC 7959 §2.3, §2.4).

The client sends its request; a response carrying Block2 with the M bit set is the first block of a larger
body, and the client asks for each following block with the same request and Block2 ``NUM`` = the next block
number at the size the server chose (§2.4), without Observe: the rest of an observe response or of a
notification is fetched with plain GETs, and the whole keeps the first block's options (its Observe number,
RFC 7959 §2.6). :class:`Block2Download` checks that every block continues the
body where the previous one ended and keeps the body within a bound; a violation is a
:class:`BlockwiseError` carrying the code to report (4.08 for a block out of sequence, 4.13 for a body over
the bound, RFC 7959 §2.9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.errors import MalformedPacket
from gateways.coap.codec import Block, CoapMessage, encode_block
from gateways.coap.numbers import CoapError, Code, OptionNumber

__all__ = ["Block2Download", "BlockwiseError"]

_BLOCK2 = int(OptionNumber.BLOCK2)
_SIZE2 = int(OptionNumber.SIZE2)
_OBSERVE = int(OptionNumber.OBSERVE)


class BlockwiseError(CoapError):
    """A block-wise response that cannot be put together; ``code`` is the CoAP code to report."""


@dataclass(slots=True)
class Block2Download:
    """The blocks of one response body received so far (RFC 7959 §2.3), at most ``max_size`` bytes."""

    max_size: int
    body: bytearray = field(default_factory=bytearray)
    blocks: int = 0
    first: CoapMessage | None = None  # the first block's response: its options make the whole's

    def add(self, response: CoapMessage) -> Block | None:
        """Append ``response``'s block; returns the Block2 value to ask for next, or None once the body is
        complete (the last block, or a response without Block2 at all). Raises :class:`BlockwiseError`."""
        try:
            block = response.block2()
        except MalformedPacket as exc:
            raise BlockwiseError(Code(exc.code), f"unreadable Block2 option: {exc}") from None
        announced = response.size2()
        if announced is not None and announced > self.max_size:
            raise self._too_large(announced)
        if self.first is None:
            self.first = response
        if block is None:
            if self.blocks:
                raise BlockwiseError(
                    Code.REQUEST_ENTITY_INCOMPLETE, f"block {self.blocks} came without Block2"
                )
            self._append(response.payload)
            return None
        offset = block.num * block.size
        if offset != len(self.body):
            raise BlockwiseError(
                Code.REQUEST_ENTITY_INCOMPLETE,
                f"block {block.num} of {block.size} bytes starts at {offset}, expected byte {len(self.body)}",
            )
        if block.more and len(response.payload) != block.size:
            raise BlockwiseError(
                Code.REQUEST_ENTITY_INCOMPLETE,
                f"block {block.num} holds {len(response.payload)} bytes, not {block.size}, but more follow",
            )
        self._append(response.payload)
        self.blocks += 1
        if not block.more:
            return None
        return Block(block.num + 1, False, block.szx)

    def _append(self, payload: bytes) -> None:
        if len(self.body) + len(payload) > self.max_size:
            raise self._too_large(len(self.body) + len(payload))
        self.body += payload

    def _too_large(self, size: int) -> BlockwiseError:
        return BlockwiseError(
            Code.REQUEST_ENTITY_TOO_LARGE, f"response of {size} bytes or more exceeds {self.max_size} bytes"
        )

    def next_request(self, request: CoapMessage, block: Block) -> CoapMessage:
        """``request`` again without Observe, asking for ``block`` (§2.4, §2.6); the caller gives it a token
        and message id."""
        options = [(n, v) for n, v in request.options if n != _BLOCK2 and n != _OBSERVE]
        options.append((_BLOCK2, encode_block(block.num, False, block.szx)))
        return CoapMessage(request.mtype, request.code, 0, b"", options, request.payload)

    def whole(self, last: CoapMessage) -> CoapMessage:
        """The complete response: the first block's code, token and options (its Observe number) with the
        whole body (``last``'s when it was the only block)."""
        first = self.first or last
        options = [(n, v) for n, v in first.options if n not in (_BLOCK2, _SIZE2)]
        return CoapMessage(first.mtype, first.code, first.mid, first.token, options, bytes(self.body))
