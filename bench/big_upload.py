#!/usr/bin/env python3
"""Big PNG uploads, repeated: MiB/s against md5sum's, and the server's CPU per upload.

bench/run.sh's test 6 makes one upload per file to a fresh server, one figure
each, which on a shared machine is mostly noise. This makes `--rounds`
interleaved rounds; in each, md5sum reads the file (warm, median of 3) and
every server under test receives it once by curl (then it is deleted, so the
next round stores it again). Servers: this tree's imgproxy.py and, with
`--base`, another imgproxy.py (e.g. `git show main:imgproxy.py > /tmp/base.py`).
Reports medians: MiB/s, the ratio to md5sum in the same round, and server CPU
(utime + stime from /proc) per upload, which the machine's other load moves less.

    python3 bench/big_upload.py [--base /tmp/base.py] [--rounds 9] [--file big.png]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run as harness  # noqa: E402  (servers, curl and md5sum timing of bench/run.py)
from gen_data import big_png  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="another imgproxy.py to measure in the same rounds")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--file", type=Path, help="the upload (default: run.sh's 20 MB noise PNG)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        path = args.file
        if path is None:
            path = work / "big.png"
            big_png(path, 20 * harness.MiB, 0)
        size = path.stat().st_size
        scripts = {"this": harness.REPO / "imgproxy.py"}
        if args.base:
            scripts["base"] = args.base.resolve()
        servers = {name: harness.start_imgproxy(work, work / f"data-{name}", name, script=script)
                   for name, script in scripts.items()}
        rates: dict[str, list[float]] = {name: [] for name in servers}
        ratios: dict[str, list[float]] = {name: [] for name in servers}
        cpu: dict[str, list[float]] = {name: [] for name in servers}
        md5sums: list[float] = []
        bench = harness.Bench.__new__(harness.Bench)  # only its curl and md5sum helpers
        try:
            for srv in servers.values():
                harness.upload(srv.base, path)  # warm: Pillow plugins, the first mkdir
                _delete(srv, path)
            for _ in range(args.rounds):
                md5sum = bench.md5sum_seconds(path)
                md5sums.append(md5sum)
                for name, srv in servers.items():
                    before = srv.cpu_seconds()
                    r = bench.curl_put(srv.base, path)
                    time.sleep(0.05)  # the worker threads' last ticks reach /proc
                    spent = srv.cpu_seconds() - before
                    if r["status"] != 201:
                        raise RuntimeError(f"{name}: upload answered {r['status']} {r['curl_err']}")
                    rates[name].append(size / r["seconds"] / harness.MiB)
                    ratios[name].append(md5sum / r["seconds"])
                    cpu[name].append(spent)
                    _delete(srv, path)
        finally:
            for srv in servers.values():
                srv.stop()
        print(f"{size / harness.MiB:.2f} MiB {path.suffix[1:].upper()}, {args.rounds} interleaved rounds, medians")
        for name in servers:
            print(json.dumps({"server": name, "MiB/s": round(statistics.median(rates[name])),
                              "vs md5sum": round(statistics.median(ratios[name]), 2),
                              "best vs md5sum": round(max(ratios[name]), 2),
                              "server CPU per upload ms (mean)": round(statistics.fmean(cpu[name]) * 1000, 1)}))
        print(json.dumps({"md5sum MiB/s": round(size / statistics.median(md5sums) / harness.MiB)}))
        if "base" in servers:  # round by round: both servers met the same load
            print(json.dumps({"this / base, median of the rounds' ratios": {
                "MiB/s": round(statistics.median(a / b for a, b in zip(rates["this"], rates["base"])), 2),
                "server CPU (means)": round(statistics.fmean(cpu["this"]) / statistics.fmean(cpu["base"]), 2)}}))
    return 0


def _delete(srv: harness.Server, path: Path) -> None:
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    status, _, body = harness.request(srv.base, "DELETE", f"/api/images/{md5}",
                                      headers={"Authorization": harness.AUTH})
    if status not in (200, 204):
        raise RuntimeError(f"delete answered {status} {body[:200]!r}")


if __name__ == "__main__":
    sys.exit(main())
