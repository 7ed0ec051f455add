"""Edge mode's group commit (issue 7): a device's QoS 1/2 publish is in the store at once, durable after
:meth:`UpstreamBroker.commit`, which the UDP adapters call before any datagram (a PUBACK, a CoAP ACK) leaves.

The upstream broker is never started here (aggregating mode without its shared connection): the messages
stay in the buffer, which is all these tests look at.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from pathlib import Path

from core.broker.types import ClientInfo, Message
from core.clock import LoopClock
from core.config import UpstreamConfig
from core.store import MessageStore
from gateways.udp import UdpGatewayAdapter
from gateways.upstream import UpstreamBroker


class NoSink:
    def deliver(self, *args: object) -> None:
        raise AssertionError("nothing is delivered here")

    def deliver_pubrel(self, packet_id: int) -> None:
        raise AssertionError("nothing is delivered here")

    def kick(self, reason_code: int) -> None:
        raise AssertionError("nobody is kicked here")


def _broker(tmp_path: Path) -> UpstreamBroker:
    config = UpstreamConfig(url="mqtt://127.0.0.1:9", mode="aggregating", buffer_dir=str(tmp_path))
    return UpstreamBroker(config, LoopClock(asyncio.get_running_loop()))


def test_publishes_of_a_loop_iteration_share_one_commit_made_before_the_acknowledgement(
    tmp_path: Path,
) -> None:
    async def run() -> tuple[list[bool], bool, bool]:
        broker = _broker(tmp_path)
        try:
            session = await broker.open_session(
                ClientInfo("dev", "mqttsn", "peer"),
                clean_start=True,
                expiry=0,
                will=None,
                sink=NoSink(),
                max_inflight=1,
            )
            states = []
            for i in range(3):
                assert session.publish(Message("t", b"%d" % i, 1, False)) == 0
                states.append(broker.store.uncommitted)
            assert broker.store.count() == 3
            broker.commit()  # what the adapter does before sending the PUBACKs
            after_commit = broker.store.uncommitted
            assert session.publish(Message("t", b"late", 1, False)) == 0
            await asyncio.sleep(0)  # one loop iteration: the loop commits what no adapter did
            return states, after_commit, broker.store.uncommitted
        finally:
            await broker.stop()

    states, after_commit, after_iteration = asyncio.run(run())
    assert states == [True, True, True]
    assert not after_commit and not after_iteration
    with MessageStore(tmp_path / "buffer.sqlite3", 1 << 20) as store:
        assert [m.payload for m in store] == [b"0", b"1", b"2", b"late"]


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


class RecordingBroker:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.commits: list[int] = []  # datagrams waiting to be sent at each commit

    def commit(self) -> None:
        self.commits.append(len(self.core.outbox))


class Adapter(UdpGatewayAdapter):
    def __init__(self, core: Core, broker: RecordingBroker) -> None:
        super().__init__(core, "127.0.0.1", 0)
        self.broker = broker  # type: ignore[assignment]


def test_the_udp_adapter_commits_once_per_batch_of_datagrams_before_answering() -> None:
    async def run() -> tuple[list[int], list[bytes]]:
        loop = asyncio.get_running_loop()
        core = Core()
        broker = RecordingBroker(core)
        adapter = Adapter(core, broker)
        await adapter.start()
        received: asyncio.Queue[bytes] = asyncio.Queue()

        class Device(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                received.put_nowait(data)

        transport, _ = await loop.create_datagram_endpoint(Device, remote_addr=("127.0.0.1", adapter.port))
        try:
            for name in (b"a", b"b", b"c"):
                adapter.datagram_received(name, transport.get_extra_info("sockname"))
            assert broker.commits == []  # nothing answered yet
            answers = [await asyncio.wait_for(received.get(), 5) for _ in range(3)]
            return broker.commits, answers
        finally:
            transport.close()
            await adapter.stop()

    commits, answers = asyncio.run(run())
    assert commits == [3]
    assert answers == [b"ack a", b"ack b", b"ack c"]


def test_the_udp_adapter_commits_and_answers_before_what_handling_the_datagram_scheduled() -> None:
    """An upstream client queues its PUBLISH with ``call_soon`` while the datagram is handled; the
    adapter's commit and answers come first, so the device's PUBACK does not wait for that write."""

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        order: list[str] = []

        class Forwarding(Core):
            def receive_datagram(self, data: bytes, peer: Hashable, now: float) -> None:
                super().receive_datagram(data, peer, now)
                loop.call_soon(order.append, "upstream write")

        class Committing(RecordingBroker):
            def commit(self) -> None:
                order.append("commit")

        core = Forwarding()
        adapter = Adapter(core, Committing(core))
        adapter.datagram_received(b"a", ("127.0.0.1", 9))
        for _ in range(2):  # the callbacks of one loop iteration
            await asyncio.sleep(0)
        await adapter.stop()
        return order

    assert asyncio.run(run()) == ["commit", "upstream write"]
