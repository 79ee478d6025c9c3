#!/usr/bin/env python3
"""The worker-thread chain of a big PNG upload, in CPU time, next to md5sum's CPU.

While a PNG arrives, `UploadSink` hands each piece to one worker thread that
hashes it and to another that writes it and runs `PngStreamCheck` on it. The
upload cannot go faster than the busier of the two, so on a machine with a
free core that thread's CPU time bounds the rate; CPU time, unlike wall time,
holds still while other work shares the cores. This feeds run.sh's 20 MiB
noise PNG through a real UploadSink (tmp/ file, 256 KiB pieces, no network)
and reports each thread's CPU (time.thread_time) per upload against md5sum's
own CPU (getrusage of the child) over the same file: medians of --runs.

    python3 bench/sink_chain.py [--runs 9]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]
import imgproxy  # noqa: E402
from gen_data import big_png  # noqa: E402


class TimedSink(imgproxy.UploadSink):
    """The server's sink, with each thread's CPU time added up."""
    hashing = checking = 0.0

    def _hash(self, data):
        start = time.thread_time()
        super()._hash(data)
        TimedSink.hashing += time.thread_time() - start

    def _write_and_observe(self, data):
        start = time.thread_time()
        super()._write_and_observe(data)
        TimedSink.checking += time.thread_time() - start


async def receive(storage: imgproxy.Storage, pieces: list[bytes]) -> None:
    check = imgproxy.PngStreamCheck(50_000_000)
    sink = TimedSink(storage, 1 << 30, observer=check.feed)
    for piece in pieces:
        await sink.feed(piece)
    await sink.drain()
    await asyncio.to_thread(sink.complete)
    if not check.passed:
        raise RuntimeError("the stream check did not vouch for the PNG")
    sink.release()
    os.unlink(sink.tmp_path)


def md5sum_cpu(path: Path) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["md5sum", str(path)], capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "big.png"
        big_png(path, 20 * 1024 * 1024, 0)
        data = path.read_bytes()
        pieces = [data[i:i + 256 * 1024] for i in range(0, len(data), 256 * 1024)]
        storage = imgproxy.Storage(Path(folder) / "data")
        storage.prepare()
        md5sum_cpu(path)  # into the page cache
        hashing, checking, md5sum = [], [], []
        for _ in range(args.runs):
            TimedSink.hashing = TimedSink.checking = 0.0
            asyncio.run(receive(storage, pieces))
            hashing.append(TimedSink.hashing)
            checking.append(TimedSink.checking)
            md5sum.append(md5sum_cpu(path))
        h, c, m = (statistics.median(x) * 1000 for x in (hashing, checking, md5sum))
        print(f"{len(data) / 2**20:.2f} MiB PNG, medians of {args.runs}: md5sum {m:.1f} ms CPU; "
              f"hash thread {h:.1f} ms, write + check thread {c:.1f} ms")
        print(f"| both in one thread | {h + c:.1f} ms | {m / (h + c):.2f}x md5sum |")
        print(f"| in two threads (the busier one) | {max(h, c):.1f} ms | {m / max(h, c):.2f}x md5sum |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
