"""Serial framing benchmark: frames per second each framer decodes in pure CPU, next to what a line carries.

For each framing (``length``, ``slip``, ``xbee1``, ``xbee2``) it builds one large stream of MQTT-SN PUBLISH
frames of 20 to 100 octets (seeded, uniform sizes, random payloads, so XBee and SLIP escapes occur at their
natural rate), wrapped as that framing puts them on the wire (XBee: Receive Packets 0x90 from 16 nodes, as a
module emits them), cuts it into chunks the way a serial driver delivers them (64 octets by default, and
single octets as the worst case), and times a fresh framer fed every chunk (best of ``--repeat`` runs; the
chunks are cut before timing). It also times encoding one frame (the gateway-to-node direction).

Next to each it prints what a ``--baud`` line (115200 by default, 8N1: 10 bits an octet) can carry of the same
frames, the ratio of the two, and the share of one CPU core the framer needs at full line rate; then one JSON
line with every figure.

    python bench/framing.py [--frames 20000] [--chunks 64,1] [--baud 115200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from _common import REPO, print_table

sys.path.insert(0, str(REPO))

from hardware.framing import FRAMINGS, make_framer
from hardware.framing.xbee import api_frame, build_receive_packet
from hardware.link import Framer

SEED = 1055
MIN_FRAME, MAX_FRAME = 20, 100
NODES = [struct.pack(">Q", 0x0013A20040A10000 + node) for node in range(16)]
BITS_PER_OCTET = 10
"""8N1: a start bit, 8 data bits, a stop bit."""
_COLUMNS = (  # header, width; the first is left-aligned
    ("framing", 8),
    ("chunk", 5),
    ("wire B/frame", 12),
    ("frames/s", 10),
    ("us/frame", 9),
    ("encode us", 9),
    ("line frames/s", 13),
    ("x line", 8),
    ("CPU at line %", 13),
)


@dataclass(slots=True)
class Row:
    framing: str
    chunk: int
    frames: int
    wire_octets_per_frame: float
    frames_per_s: float
    us_per_frame: float
    encode_us_per_frame: float
    line_frames_per_s: float
    ratio: float
    cpu_at_line_rate_pct: float


def mqttsn_frames(count: int, rng: random.Random) -> list[bytes]:
    """PUBLISH QoS 1 to a registered topic id (MQTT-SN 1.2 §5.4.12), 20-100 octets in all."""
    frames = []
    for msg_id in range(count):
        size = rng.randint(MIN_FRAME, MAX_FRAME)
        header = struct.pack(">BBBHH", size, 0x0C, 0x20, 1 + msg_id % 50, 1 + msg_id % 0xFFFF)
        frames.append(header + rng.randbytes(size - len(header)))
    return frames


def wire(framing: str, frames: Sequence[bytes]) -> bytes:
    """The frames as a node (or an XBee module) puts them on the line for ``framing``."""
    if framing == "length":
        return b"".join(frames)
    if framing == "slip":
        encoder = make_framer("slip")
        return b"".join(encoder.encode(frame) for frame in frames)
    escaped = framing == "xbee2"
    return b"".join(
        api_frame(build_receive_packet(frame, NODES[i % len(NODES)]), escaped)
        for i, frame in enumerate(frames)
    )


def chunked(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def best_seconds(run: Callable[[], int], expected: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        decoded = run()
        elapsed = time.perf_counter() - start
        if decoded != expected:
            raise SystemExit(f"decoded {decoded} frames, expected {expected}")
        best = min(best, elapsed)
    return best


def decode_all(framing: str, chunks: list[bytes]) -> int:
    framer: Framer = make_framer(framing)
    feed = framer.feed
    count = 0
    for chunk in chunks:
        count += len(feed(chunk))
    return count


def encode_us(framing: str, frames: Sequence[bytes], repeat: int) -> float:
    framer = make_framer(framing)
    address = NODES[0]
    encode = framer.encode
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for frame in frames:
            encode(frame, address)
        best = min(best, time.perf_counter() - start)
    return best / len(frames) * 1e6


def measure(framing: str, frames: Sequence[bytes], chunk: int, baud: int, repeat: int) -> Row:
    stream = wire(framing, frames)
    chunks = chunked(stream, chunk)
    seconds = best_seconds(lambda: decode_all(framing, chunks), len(frames), repeat)
    per_frame = len(stream) / len(frames)
    line_fps = baud / BITS_PER_OCTET / per_frame
    fps = len(frames) / seconds
    us = seconds / len(frames) * 1e6
    return Row(
        framing=framing,
        chunk=chunk,
        frames=len(frames),
        wire_octets_per_frame=round(per_frame, 1),
        frames_per_s=round(fps),
        us_per_frame=round(us, 2),
        encode_us_per_frame=round(encode_us(framing, frames[:2000], repeat), 2),
        line_frames_per_s=round(line_fps, 1),
        ratio=round(fps / line_fps, 1),
        cpu_at_line_rate_pct=round(line_fps * us / 1e4, 3),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20_000, help="frames per stream (20000)")
    parser.add_argument("--chunks", default="64,1", help="chunk sizes in octets, comma-separated (64,1)")
    parser.add_argument("--baud", type=int, default=115_200, help="line rate to compare with (115200)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell, the best kept (5)")
    args = parser.parse_args(argv)
    chunks = [int(size) for size in args.chunks.split(",")]

    frames = mqttsn_frames(args.frames, random.Random(SEED))
    mean = sum(map(len, frames)) / len(frames)
    print(
        f"{args.frames} MQTT-SN PUBLISH frames of {MIN_FRAME}-{MAX_FRAME} octets (mean {mean:.1f}); "
        f"line: {args.baud} baud 8N1 = {args.baud // BITS_PER_OCTET} octets/s; best of {args.repeat}"
    )
    rows: list[Row] = []
    for chunk in chunks:
        # byte-at-a-time feeding is slow by nature: a tenth of the frames keeps the run short
        sample = frames if chunk >= 16 else frames[: max(1, len(frames) // 10)]
        for framing in FRAMINGS:
            rows.append(measure(framing, sample, chunk, args.baud, args.repeat))
    print_table(
        _COLUMNS,
        [
            [
                row.framing,
                str(row.chunk),
                f"{row.wire_octets_per_frame:.1f}",
                f"{row.frames_per_s:,.0f}",
                f"{row.us_per_frame:.2f}",
                f"{row.encode_us_per_frame:.2f}",
                f"{row.line_frames_per_s:,.1f}",
                f"{row.ratio:,.0f}",
                f"{row.cpu_at_line_rate_pct:.3f}",
            ]
            for row in rows
        ],
        left=1,
    )
    print(json.dumps({"benchmark": "framing", "baud": args.baud, "rows": [asdict(row) for row in rows]}))


if __name__ == "__main__":
    main()
