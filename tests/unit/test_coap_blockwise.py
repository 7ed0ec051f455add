"""Pure tests of the client side of block-wise transfer (:class:`Block2Download`, RFC 7959 §2.3, §2.4): a
response body sent in Block2 blocks, put back together, bounded, with its sequence checked."""

from __future__ import annotations

import pytest

from gateways.coap.blockwise import Block2Download, BlockwiseError
from gateways.coap.codec import Block, CoapMessage, encode_block, encode_uint
from gateways.coap.numbers import Code, ContentFormat, OptionNumber, Type

ACK = int(Type.ACK)
CONTENT = int(Code.CONTENT)
BLOCK2 = int(OptionNumber.BLOCK2)
SIZE2 = int(OptionNumber.SIZE2)
URI_PATH = int(OptionNumber.URI_PATH)
ACCEPT = int(OptionNumber.ACCEPT)
CONTENT_FORMAT = int(OptionNumber.CONTENT_FORMAT)
TEXT = encode_uint(int(ContentFormat.TEXT_PLAIN))
SZX_16 = 0  # 16-byte blocks


def block(num: int, more: bool, payload: bytes, szx: int = SZX_16, *extra: tuple[int, bytes]) -> CoapMessage:
    """A 2.05 response carrying one Block2 block."""
    options = [(CONTENT_FORMAT, TEXT), (BLOCK2, encode_block(num, more, szx)), *extra]
    return CoapMessage(ACK, CONTENT, 0x10 + num, b"tok", options, payload)


def test_a_body_in_three_blocks_asks_for_each_next_block_then_is_whole() -> None:
    body = bytes(range(40))
    download = Block2Download(max_size=1024)
    assert download.add(block(0, True, body[:16])) == Block(1, False, SZX_16)
    assert download.add(block(1, True, body[16:32])) == Block(2, False, SZX_16)
    last = block(2, False, body[32:])
    assert download.add(last) is None
    whole = download.whole(last)
    assert whole.payload == body
    assert whole.code == CONTENT
    assert whole.options == [(CONTENT_FORMAT, TEXT)]
    assert download.blocks == 3


def test_a_response_without_block2_is_whole_at_once() -> None:
    response = CoapMessage(ACK, CONTENT, 1, b"tok", [(CONTENT_FORMAT, TEXT)], b"21.5")
    download = Block2Download(max_size=1024)
    assert download.add(response) is None
    assert download.whole(response).payload == b"21.5"


def test_the_next_request_is_the_same_request_with_block2_num_set() -> None:
    request = CoapMessage(0, int(Code.GET), 7, b"old", [(URI_PATH, b"3"), (URI_PATH, b"0"), (ACCEPT, TEXT)])
    asked = Block2Download(max_size=1024).next_request(request, Block(2, False, 6))
    assert (asked.code, asked.mid, asked.token, asked.payload) == (int(Code.GET), 0, b"", b"")
    assert asked.options == [
        (URI_PATH, b"3"),
        (URI_PATH, b"0"),
        (ACCEPT, TEXT),
        (BLOCK2, encode_block(2, False, 6)),
    ]
    again = Block2Download(max_size=1024).next_request(asked, Block(3, False, 6))
    assert [v for n, v in again.options if n == BLOCK2] == [encode_block(3, False, 6)]


def test_a_block_out_of_sequence_is_4_08() -> None:
    download = Block2Download(max_size=1024)
    download.add(block(0, True, bytes(16)))
    with pytest.raises(BlockwiseError) as caught:
        download.add(block(2, False, b"x"))
    assert caught.value.code == Code.REQUEST_ENTITY_INCOMPLETE
    assert "block 2" in caught.value.text


def test_a_short_block_that_announces_more_is_4_08() -> None:
    with pytest.raises(BlockwiseError) as caught:
        Block2Download(max_size=1024).add(block(0, True, bytes(10)))
    assert caught.value.code == Code.REQUEST_ENTITY_INCOMPLETE


def test_a_following_response_without_block2_is_4_08() -> None:
    download = Block2Download(max_size=1024)
    download.add(block(0, True, bytes(16)))
    with pytest.raises(BlockwiseError) as caught:
        download.add(CoapMessage(ACK, CONTENT, 2, b"tok", [], b"rest"))
    assert caught.value.code == Code.REQUEST_ENTITY_INCOMPLETE


def test_a_body_growing_over_max_size_is_4_13() -> None:
    download = Block2Download(max_size=40)
    download.add(block(0, True, bytes(16)))
    download.add(block(1, True, bytes(16)))
    with pytest.raises(BlockwiseError) as caught:
        download.add(block(2, True, bytes(16)))
    assert caught.value.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert len(download.body) == 32


def test_a_size2_over_max_size_is_4_13_at_the_first_block() -> None:
    with pytest.raises(BlockwiseError) as caught:
        Block2Download(max_size=1024).add(block(0, True, bytes(16), SZX_16, (SIZE2, encode_uint(5000))))
    assert caught.value.code == Code.REQUEST_ENTITY_TOO_LARGE


def test_an_unreadable_block2_option_is_reported_with_the_codec_code() -> None:
    response = CoapMessage(ACK, CONTENT, 1, b"tok", [(BLOCK2, bytes((0x0F,)))], bytes(16))  # SZX 7: reserved
    with pytest.raises(BlockwiseError) as caught:
        Block2Download(max_size=1024).add(response)
    assert caught.value.code == Code.BAD_REQUEST
