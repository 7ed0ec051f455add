"""Edge mode's settling (issue 7): a device's QoS 1/2 publish is acknowledged once the upstream broker has
acknowledged it or it is committed to the buffer, whichever comes first (``upstream.commit_delay``); the
gateway adapters hold their datagrams until :meth:`gateways.base.Broker.settle` says so, in order.

The upstream broker is never started here (aggregating mode without its shared connection): the messages
stay in the buffer, so only the commit can settle them. The upstream side is tested against mosquitto in
tests/integration/test_edge_mode.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from pathlib import Path

import pytest

from core.broker.types import ClientInfo, Message
from core.clock import LoopClock
from core.config import UpstreamConfig
from core.store import MessageStore
from gateways.udp import UdpGatewayAdapter
from gateways.upstream import UpstreamBroker, UpstreamSession


class NoSink:
    def deliver(self, *args: object) -> None:
        raise AssertionError("nothing is delivered here")

    def deliver_pubrel(self, packet_id: int) -> None:
        raise AssertionError("nothing is delivered here")

    def kick(self, reason_code: int) -> None:
        raise AssertionError("nobody is kicked here")


def _broker(tmp_path: Path, commit_delay: float) -> UpstreamBroker:
    config = UpstreamConfig(
        url="mqtt://127.0.0.1:9", mode="aggregating", buffer_dir=str(tmp_path), commit_delay=commit_delay
    )
    return UpstreamBroker(config, LoopClock(asyncio.get_running_loop()))


async def _session(broker: UpstreamBroker) -> UpstreamSession:
    return await broker.open_session(
        ClientInfo("dev", "mqttsn", "peer"),
        clean_start=True,
        expiry=0,
        will=None,
        sink=NoSink(),
        max_inflight=1,
    )


def _stored(tmp_path: Path) -> list[bytes]:
    with MessageStore(tmp_path / "buffer.sqlite3", 1 << 20) as store:
        return [m.payload for m in store]


def test_publishes_settle_together_when_the_commit_delay_has_passed(tmp_path: Path) -> None:
    async def run() -> tuple[list[bool], list[str]]:
        broker = _broker(tmp_path, commit_delay=0.01)
        events: list[str] = []
        try:
            session = await _session(broker)
            uncommitted = []
            for i in range(3):
                assert session.publish(Message("t", b"%d" % i, 1, False)) == 0
                uncommitted.append(broker.store.uncommitted)
            done = asyncio.get_running_loop().create_future()
            broker.settle(lambda settled: events.append(f"first {settled}"))
            broker.settle(lambda settled: (events.append(f"second {settled}"), done.set_result(None)))
            events.append("settle returned")
            await asyncio.wait_for(done, 5)
            events.append("committed" if not broker.store.uncommitted else "uncommitted")
            broker.settle(lambda settled: events.append(f"nothing pending {settled}"))
            return uncommitted, events
        finally:
            await broker.stop()

    uncommitted, events = asyncio.run(run())
    assert uncommitted == [True, True, True]
    assert events == ["settle returned", "first True", "second True", "committed", "nothing pending True"]
    assert _stored(tmp_path) == [b"0", b"1", b"2"]


def test_the_commit_waits_for_the_oldest_unsettled_message_not_for_the_first_timer(tmp_path: Path) -> None:
    """Message 1 is acknowledged upstream before its commit is due; the timer armed for it then waits for
    message 2's own delay, so a steady flow acknowledged in time is never written. The loop's clock is
    driven by the test."""

    async def run() -> list[tuple[float, int, int]]:
        loop = asyncio.get_running_loop()
        now = [loop.time()]
        loop.time = lambda: now[0]  # type: ignore[method-assign]
        broker = _broker(tmp_path, commit_delay=0.05)
        seen: list[tuple[float, int, int]] = []

        async def advance(seconds: float) -> None:
            now[0] += seconds
            for _ in range(3):  # the timers due now run
                await asyncio.sleep(0)
            seen.append((round(seconds, 2), broker.store.written, len(broker._unsettled)))

        try:
            session = await _session(broker)
            assert session.publish(Message("t", b"1", 1, False)) == 0
            (first,) = broker._unsettled
            broker._delivered_upstream(first)  # what the upstream PUBACK does
            await advance(0.03)
            assert session.publish(Message("t", b"2", 1, False)) == 0
            await advance(0.03)  # message 1's commit time: message 2 has waited 30 ms only
            await advance(0.03)  # message 2's
            return seen
        finally:
            await broker.stop()

    assert asyncio.run(run()) == [(0.03, 0, 0), (0.03, 0, 1), (0.03, 1, 0)]
    assert _stored(tmp_path) == [b"2"]


def test_a_commit_delay_of_zero_commits_before_settle_returns(tmp_path: Path) -> None:
    async def run() -> tuple[list[bool], bool, int]:
        broker = _broker(tmp_path, commit_delay=0)
        try:
            session = await _session(broker)
            assert session.publish(Message("t", b"now", 1, False)) == 0
            results: list[bool] = []
            broker.settle(results.append)
            return results, broker.store.uncommitted, broker.store.written
        finally:
            await broker.stop()

    results, uncommitted, written = asyncio.run(run())
    assert results == [True]
    assert not uncommitted and written == 1
    assert _stored(tmp_path) == [b"now"]


def test_a_failed_commit_settles_nothing_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> list[bool]:
        broker = _broker(tmp_path, commit_delay=0)
        try:
            session = await _session(broker)
            assert session.publish(Message("t", b"lost", 1, False)) == 0
            broker.store._con.execute("DROP TABLE messages")  # the next insert fails
            results: list[bool] = []
            broker.settle(results.append)
            return results
        finally:
            broker.store._closed = True  # the broken file is not closed cleanly
            broker.store._con.close()
            await broker.stop()

    with caplog.at_level(logging.ERROR, logger="mqgate.upstream"):
        assert asyncio.run(run()) == [False]
    assert "1 messages not acknowledged" in caplog.text


class Core:
    """A datagram core that answers every datagram with an acknowledgement."""

    def __init__(self) -> None:
        self.outbox: list[tuple[Hashable, bytes]] = []

    def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> None:
        self.outbox.append((peer, b"ack " + data))

    def datagrams_to_send(self) -> list[tuple[Hashable, bytes]]:
        out, self.outbox = self.outbox, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


class HoldingBroker:
    """Settles only when the test says so (``release``); with ``at_once``, as the embedded broker does."""

    def __init__(self, at_once: bool = False) -> None:
        self.at_once = at_once
        self.waiting: list[Callable[[bool], None]] = []

    def settle(self, then: Callable[[bool], None]) -> None:
        if self.at_once:
            then(True)
        else:
            self.waiting.append(then)

    def release(self, settled: bool = True) -> None:
        self.waiting.pop(0)(settled)


class Adapter(UdpGatewayAdapter):
    def __init__(self, core: Core, broker: HoldingBroker) -> None:
        super().__init__(core, "127.0.0.1", 0)
        self.broker = broker  # type: ignore[assignment]


def test_the_udp_adapter_holds_each_batch_until_it_is_settled_and_sends_them_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> tuple[list[int], list[bytes]]:
        loop = asyncio.get_running_loop()
        core = Core()
        broker = HoldingBroker()
        adapter = Adapter(core, broker)
        await adapter.start()
        received: asyncio.Queue[bytes] = asyncio.Queue()

        class Device(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                received.put_nowait(data)

        transport, _ = await loop.create_datagram_endpoint(Device, remote_addr=("127.0.0.1", adapter.port))
        device = transport.get_extra_info("sockname")
        try:
            waiting = []
            for batch in ((b"a", b"b"), (b"c",), (b"d",)):
                for name in batch:
                    adapter.datagram_received(name, device)
                await asyncio.sleep(0)  # the flush of this loop iteration: one batch
                waiting.append(len(broker.waiting))
            assert received.empty()  # nothing settled, nothing sent
            broker.release()
            broker.release(settled=False)  # "c" answers a publish that could not be stored
            broker.release()
            answers = [await asyncio.wait_for(received.get(), 5) for _ in range(3)]
            return waiting, answers
        finally:
            transport.close()
            await adapter.stop()

    with caplog.at_level(logging.WARNING, logger="mqgate.gateway"):
        waiting, answers = asyncio.run(run())
    assert waiting == [1, 2, 3]
    assert answers == [b"ack a", b"ack b", b"ack d"]
    assert "1 datagram(s) not sent" in caplog.text


def test_the_udp_adapter_answers_before_what_handling_the_datagram_scheduled() -> None:
    """An upstream client queues its PUBLISH with ``call_soon`` while the datagram is handled; answers
    settled at once (the embedded broker) leave first."""

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        order: list[str] = []

        class Forwarding(Core):
            def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> None:
                super().receive_datagram(data, peer, now)
                loop.call_soon(order.append, "upstream write")

        class Recording(Adapter):
            def _send(self, peer: Hashable, data: bytes) -> None:
                order.append("answer")

        adapter = Recording(Forwarding(), HoldingBroker(at_once=True))
        adapter.datagram_received(b"a", ("127.0.0.1", 9))
        for _ in range(2):  # the callbacks of one loop iteration
            await asyncio.sleep(0)
        await adapter.stop()
        return order

    assert asyncio.run(run()) == ["answer", "upstream write"]
