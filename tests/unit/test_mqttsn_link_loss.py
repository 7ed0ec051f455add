"""Pure tests of :meth:`MqttSnGateway.lose_all`: the link under every client went away (a serial device
unplugged), so every client of that gateway is lost at once (issue 6). Same harness as the gateway tests."""

from __future__ import annotations

from gateways.mqttsn import codec
from gateways.mqttsn.channel import ChannelState
from gateways.mqttsn.numbers import ReturnCode
from tests.unit.test_mqttsn_gateway import A, B, C, Harness, state


def test_link_loss_publishes_the_wills_of_active_and_sleeping_clients_at_once() -> None:
    h = Harness()
    watcher = h.watch("will/#")
    h.connect(A, "active", keepalive=600, will=("will/active", b"gone"))
    h.connect(B, "sleeper", keepalive=600, clean=False, will=("will/sleeper", b"gone too"))
    h.sleep(B, 3000)

    assert h.gateway.lose_all(h.clock.now(), "serial unplugged") == 2

    assert sorted(watcher.messages()) == [("will/active", b"gone"), ("will/sleeper", b"gone too")]
    assert h.gateway.metrics.clients_lost == 2
    assert "active" not in h.gateway.by_client and "active" not in h.broker.sessions
    sleeper = h.gateway.by_client["sleeper"]  # clean session 0: kept until session_expiry
    assert state(sleeper) is ChannelState.DISCONNECTED
    assert h.broker.sessions["sleeper"].sink is None


def test_link_loss_drops_unfinished_connects_and_queued_datagrams() -> None:
    h = Harness()
    assert h.send(A, codec.Connect("handshaking", 60, True, True)) == [codec.WillTopicReq()]
    h.gateway.receive_datagram(codec.encode(codec.Connect("opening", 60)), B, h.clock.now())
    (opening,) = h.gateway.take_session_requests()  # the broker session is still being opened
    h.gateway.send(C, codec.Pingresp())

    assert h.gateway.lose_all(h.clock.now(), "serial unplugged") == 0

    assert h.gateway.by_client == {}
    assert h.gateway.datagrams_to_send() == []
    h._open_session(opening)  # the opening lands after the loss: closed, no CONNACK
    h.pump()
    assert "opening" not in h.broker.sessions
    assert h.outbox == []


def test_clients_come_back_by_reconnecting_after_a_link_loss() -> None:
    h = Harness()
    h.connect(A, "node", keepalive=600)
    h.subscribe(A, "cmd/node")
    h.gateway.lose_all(h.clock.now(), "serial unplugged")

    assert h.send(A, codec.Connect("node", 600)) == [codec.Connack(ReturnCode.ACCEPTED)]
    h.subscribe(A, "cmd/node")
    h.publish("cmd/node", b"on", qos=1)
    (delivery,) = h.take(A)
    assert isinstance(delivery, codec.Publish) and delivery.data == b"on"
