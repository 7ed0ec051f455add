"""Pure tests of the LwM2M gateway (:class:`LwM2mGateway`) on the embedded core broker: reads, observe answers
and notifications whose body the device sends block-wise (Block2, RFC 7959 §2.3, §2.6), asked for block by
block and published whole.

No sockets and no sleeps: :class:`Harness` is ``tests/unit/harness.py``'s :class:`GatewayHarness` with an
:class:`LwM2mGateway`. The device is a peer tuple whose datagrams are built and read with the CoAP codec.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable
from typing import Any

import pytest

from core.broker.types import ClientInfo, Credentials
from core.config import LwM2mConfig
from gateways.coap.codec import Block, CoapMessage, decode, encode, encode_block, encode_uint
from gateways.coap.numbers import Code, ContentFormat, OptionNumber, Type
from gateways.lwm2m.gateway import LwM2mGateway, SessionRequest
from gateways.lwm2m.objects import ObjectRegistry
from tests.unit.harness import GatewayHarness

DEVICE: Hashable = ("10.0.0.9", 56830)
CON, ACK = int(Type.CON), int(Type.ACK)
BLOCK2 = int(OptionNumber.BLOCK2)
URI_PATH, URI_QUERY = int(OptionNumber.URI_PATH), int(OptionNumber.URI_QUERY)
CONTENT_FORMAT = int(OptionNumber.CONTENT_FORMAT)
TEXT = encode_uint(int(ContentFormat.TEXT_PLAIN))
SZX_16 = 0


class Harness(GatewayHarness[SessionRequest, CoapMessage]):
    """An LwM2M gateway on the embedded broker with a fake clock, pumped synchronously like the adapter."""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config = LwM2mConfig(**config)
        self.gateway: LwM2mGateway = LwM2mGateway(self.config, self.clock, ObjectRegistry.default())

    def _decode(self, data: bytes) -> CoapMessage:
        return decode(data)

    def _open_session(self, request: SessionRequest) -> None:
        device = request.device
        session = self.open_broker_session(
            ClientInfo(device.endpoint, "lwm2m", str(device.peer), device.endpoint),
            Credentials(device.endpoint, None),
            clean_start=True,
            expiry=0,
            will=None,
            sink=device,
            max_inflight=32,
        )
        assert not isinstance(session, int)
        self.gateway.session_opened(device, session, self.clock.now())

    def send(self, message: CoapMessage) -> list[CoapMessage]:
        """One datagram from the device; returns what the gateway sent it."""
        self.gateway.receive_datagram(encode(message), DEVICE, self.clock.now())
        self.pump()
        return self.take(DEVICE)

    def register(self, endpoint: str) -> None:
        options = [(URI_PATH, b"rd"), *((URI_QUERY, q) for q in (f"ep={endpoint}".encode(), b"lt=3600"))]
        (created,) = self.send(CoapMessage(CON, int(Code.POST), 1, b"r", options, b"</3/0>"))
        assert created.code == int(Code.CREATED)

    def read(self, endpoint: str, path: str) -> CoapMessage:
        """Publish a read command; returns the GET the device receives."""
        self.publish(
            f"lwm2m/{endpoint}/dn",
            json.dumps({"reqID": 1, "msgType": "read", "data": {"path": path}}).encode(),
        )
        (get,) = self.take(DEVICE)
        assert get.code == int(Code.GET)
        return get


def answer(get: CoapMessage, num: int, more: bool, payload: bytes) -> CoapMessage:
    """The device's piggybacked 2.05 to ``get`` carrying Block2 block ``num`` of 16 bytes."""
    options = [(CONTENT_FORMAT, TEXT), (BLOCK2, encode_block(num, more, SZX_16))]
    return CoapMessage(ACK, int(Code.CONTENT), get.mid, get.token, options, payload)


def responses(h: Harness) -> list[dict[str, Any]]:
    return [json.loads(d.payload)["data"] for d in h.watcher.deliveries if d.topic.endswith("/up/resp")]


def test_a_block_wise_read_asks_for_every_following_block_and_publishes_the_whole_value() -> None:
    h = Harness()
    h.watch("lwm2m/#")
    h.register("dev")
    value = b"0123456789abcdefghijklmnopqrstuvwxyz"
    get = h.read("dev", "/3/0/15")
    assert get.block2() is None
    for num in (1, 2):
        (get,) = h.send(answer(get, num - 1, True, value[(num - 1) * 16 : num * 16]))
        assert get.block2() == Block(num, False, SZX_16)
        assert get.uri_path() == ["3", "0", "15"]
        assert responses(h) == []
    assert h.send(answer(get, 2, False, value[32:])) == []
    assert responses(h) == [
        {
            "reqPath": "/3/0/15",
            "code": "2.05",
            "codeMsg": "content",
            "content": [{"path": "/3/0/15", "value": value.decode()}],
        }
    ]


def test_a_block_wise_read_over_max_response_size_is_answered_4_13_without_asking_for_more() -> None:
    h = Harness(max_response_size=1024)
    h.watch("lwm2m/#")
    h.register("dev")
    get = h.read("dev", "/3/0/15")
    for num in range(64):
        (get,) = h.send(answer(get, num, True, bytes(16)))
    assert h.send(answer(get, 64, True, bytes(16))) == []
    (data,) = responses(h)
    assert (data["code"], data["codeMsg"]) == ("4.13", "request_entity_too_large")
    assert "exceeds 1024 bytes" in data["error"]
    assert h.gateway.counters["responses_incomplete"] == 1


def test_a_block_out_of_sequence_is_answered_4_08() -> None:
    h = Harness()
    h.watch("lwm2m/#")
    h.register("dev")
    get = h.read("dev", "/3/0/15")
    (get,) = h.send(answer(get, 0, True, bytes(16)))
    assert h.send(answer(get, 2, False, b"late")) == []
    (data,) = responses(h)
    assert (data["code"], data["codeMsg"]) == ("4.08", "request_entity_incomplete")


def test_a_block_never_answered_is_a_timeout_naming_the_block() -> None:
    h = Harness(request_timeout=5.0)
    h.watch("lwm2m/#")
    h.register("dev")
    get = h.read("dev", "/3/0/15")
    h.send(answer(get, 0, True, bytes(16)))
    h.advance(10.0)
    (data,) = responses(h)
    assert data == {
        "reqPath": "/3/0/15",
        "code": "5.04",
        "codeMsg": "timeout",
        "error": "no answer from the device to the request for block 1 of its response",
    }


# --- observations whose answer or notifications come block-wise (RFC 7959 §2.6)

OBSERVE = int(OptionNumber.OBSERVE)


def observe(h: Harness, endpoint: str, path: str) -> CoapMessage:
    """Publish an observe command; returns the GET (with Observe 0) the device receives."""
    h.publish(
        f"lwm2m/{endpoint}/dn",
        json.dumps({"reqID": 7, "msgType": "observe", "data": {"path": path}}).encode(),
    )
    (get,) = h.take(DEVICE)
    assert get.code == int(Code.GET) and get.observe() == 0
    return get


def notification(
    token: bytes, seq: int, mid: int, payload: bytes, block: tuple[int, bool] | None = None
) -> CoapMessage:
    """A confirmable notification of observation ``token`` with Observe ``seq`` (and Block2 ``block``)."""
    options = [(OBSERVE, encode_uint(seq)), (CONTENT_FORMAT, TEXT)]
    if block is not None:
        options.append((BLOCK2, encode_block(block[0], block[1], SZX_16)))
    return CoapMessage(CON, int(Code.CONTENT), mid, token, options, payload)


def accepted(get: CoapMessage) -> CoapMessage:
    """The device's 2.05 to an observe GET, Observe 1: the observation is registered (RFC 7641 §3.2)."""
    options = [(OBSERVE, encode_uint(1)), (CONTENT_FORMAT, TEXT)]
    return CoapMessage(ACK, int(Code.CONTENT), get.mid, get.token, options, b"start")


def notifications(h: Harness) -> list[dict[str, Any]]:
    return [json.loads(d.payload) for d in h.watcher.deliveries if d.topic.endswith("/up/notify")]


def fetch_request(sent: list[CoapMessage]) -> CoapMessage:
    """The GET among what the gateway sent (beside the empty ACK of a confirmable notification)."""
    (get,) = [m for m in sent if m.code == int(Code.GET)]
    assert get.observe() is None, "the rest of a notification is fetched without Observe"
    return get


def test_an_observe_answered_block_wise_is_published_whole_and_the_observation_stays() -> None:
    h = Harness()
    h.watch("lwm2m/#")
    h.register("dev")
    value = b"0123456789abcdef-rest"
    get = observe(h, "dev", "/3/0/15")
    first = answer(get, 0, True, value[:16])
    first.options.insert(0, (OBSERVE, encode_uint(1)))
    follow = fetch_request(h.send(first))
    assert follow.block2() == Block(1, False, SZX_16) and follow.token != get.token
    assert h.send(answer(follow, 1, False, value[16:])) == []
    (data,) = responses(h)
    assert (data["code"], data["content"]) == ("2.05", [{"path": "/3/0/15", "value": value.decode()}])
    sent = h.send(notification(get.token, 2, 900, b"small"))  # the observation is still there
    assert [m.mtype for m in sent] == [ACK]
    assert notifications(h)[0]["data"]["content"] == [{"path": "/3/0/15", "value": "small"}]


def test_a_block_wise_notification_is_fetched_by_gets_and_published_whole_with_its_observe_number() -> None:
    h = Harness()
    h.watch("lwm2m/#")
    h.register("dev")
    get = observe(h, "dev", "/3/0/15")
    h.send(accepted(get))  # the observe's own answer: one block
    value = b"0123456789abcdefghijklmnopqrstuvwxyz"
    sent = h.send(notification(get.token, 5, 901, value[:16], (0, True)))
    assert [m.mtype for m in sent if m.code == 0] == [ACK]  # the notification is acknowledged at once
    follow = fetch_request(sent)
    for num in (1, 2):
        assert follow.block2() == Block(num, False, SZX_16) and follow.uri_path() == ["3", "0", "15"]
        assert notifications(h) == []
        more = num < 2
        sent = h.send(answer(follow, num, more, value[num * 16 : (num + 1) * 16]))
        if more:
            follow = fetch_request(sent)
    (body,) = notifications(h)
    assert (body["msgType"], body["seqNum"], body["reqID"]) == ("notify", 5, 7)
    assert body["data"]["content"] == [{"path": "/3/0/15", "value": value.decode()}]
    assert h.gateway.counters["notifications"] == 1


def test_a_newer_notification_replaces_one_still_being_fetched() -> None:
    h = Harness()
    h.watch("lwm2m/#")
    h.register("dev")
    get = observe(h, "dev", "/3/0/15")
    h.send(accepted(get))
    stale = fetch_request(h.send(notification(get.token, 5, 901, b"A" * 16, (0, True))))
    fresh = fetch_request(h.send(notification(get.token, 6, 902, b"B" * 16, (0, True))))
    assert h.send(answer(stale, 1, False, b"a-end")) == []  # the older one's rest is dropped
    assert notifications(h) == []
    h.send(answer(fresh, 1, False, b"b-end"))
    (body,) = notifications(h)
    assert body["seqNum"] == 6
    assert body["data"]["content"] == [{"path": "/3/0/15", "value": "B" * 16 + "b-end"}]


def test_a_notification_block_never_answered_is_published_as_a_timeout() -> None:
    h = Harness(request_timeout=5.0)
    h.watch("lwm2m/#")
    h.register("dev")
    get = observe(h, "dev", "/3/0/15")
    h.send(accepted(get))
    h.send(notification(get.token, 5, 901, bytes(16), (0, True)))
    h.advance(10.0)
    (body,) = notifications(h)
    assert (body["seqNum"], body["data"]["code"], body["data"]["codeMsg"]) == (5, "5.04", "gateway_timeout")
    assert h.gateway.counters["notifications_incomplete"] == 1


def test_a_malformed_datagram_from_a_device_is_logged_as_lwm2m(caplog: pytest.LogCaptureFixture) -> None:
    """The CoAP layer under the LwM2M gateway names the gateway's protocol in its log lines."""
    h = Harness()
    with caplog.at_level(logging.INFO, logger="mqgate.coap"):
        h.gateway.receive_datagram(b"\x40\x01", DEVICE, h.clock.now())  # a header cut short
    (record,) = caplog.records
    assert record.protocol == "lwm2m", record.getMessage()
