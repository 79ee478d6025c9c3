#!/usr/bin/env python3
"""What checking a 20 MB PNG costs, step by step, next to md5sum of the same bytes.

The target for big uploads is 0.6x md5sum's rate. Decoding while receiving can
at best hide the decode behind the network, so each step a streaming check
would run per received piece (hashing, chunk CRCs, inflating the IDAT data in
1 MB pieces) and Pillow's whole decode are timed on their own, on the PNG
bench/run.sh uses for test 6 (noise, compress_level 1, just under 20 MB).

    python3 bench/png_decode_steps.py [--runs 5]

Prints each step's rate and its ratio to md5sum's (medians of --runs, one run).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_data import big_png  # the same file as bench/run.sh's test 6


def idat_stream(data: bytes) -> bytes:
    pos, parts = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            parts.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    return b"".join(parts)


def inflate_in_pieces(stream: bytes, piece: int = 1 << 20) -> int:
    decompressor, total = zlib.decompressobj(), 0
    for start in range(0, len(stream), piece):
        total += len(decompressor.decompress(stream[start:start + piece]))
    return total + len(decompressor.flush())


def median_seconds(action, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "big.png"
        big_png(path, 20 * 1000 * 1000, 1)
        data = path.read_bytes()
        stream = idat_stream(data)
        md5sum = median_seconds(lambda: subprocess.run(["md5sum", str(path)], capture_output=True, check=True),
                                args.runs)
        steps = {
            "hashlib.md5": lambda: hashlib.md5(data).digest(),
            "zlib.crc32 (chunk CRCs)": lambda: zlib.crc32(data),
            "inflate IDAT in 1 MB pieces": lambda: inflate_in_pieces(stream),
            "Pillow open + load": lambda: Image.open(io.BytesIO(data)).load(),
        }
        print(f"{len(data) / 2**20:.2f} MiB PNG; md5sum {len(data) / md5sum / 2**20:,.0f} MiB/s "
              f"(median of {args.runs})\n")
        print("| step | MiB/s | vs md5sum |")
        print("|---|---|---|")
        for name, action in steps.items():
            seconds = median_seconds(action, args.runs)
            print(f"| {name} | {len(data) / seconds / 2**20:,.0f} | {md5sum / seconds:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
