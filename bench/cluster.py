"""One node on S3 + PostgreSQL against one node on files + SQLite, in interleaved rounds.

    python3 bench/cluster.py [--rounds 3] [--seconds 4]

Starts a private SeaweedFS (`weed mini`) and PostgreSQL with tests/engines.py, and two
imgproxy processes (the files + SQLite default, and storage.backend "s3" + database.url).
Measured per stack, with wrk (16 connections) for the GETs:

- hot GET: a 60 KB image, served from the node's memory;
- cold GET: a 700 KB image, above the memory cache's per-file limit, so every request
  reads the disk (on S3: the node's own copy, fetched after the first GET);
- first GET: 40 distinct 700 KB images each asked for once (8 threads): on S3 each
  streams from the store (its CPU includes starting the node's own copy);
- uploads: 200 distinct 150 KB PNGs over 8 threads (urllib), uploads per second.

For each: requests per second, CPU per request of the imgproxy process, and of the
engines (weed, postgres) for the S3 + PostgreSQL node: where the time goes. Ratios are
S3+PG / files+SQLite within one run (the machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import engines  # noqa: E402
from helpers import noise_png  # noqa: E402

AUTH = {"Authorization": "Basic " + base64.b64encode(b"alice:bench-password").decode()}
UPLOADS, UPLOAD_THREADS = 200, 8
FIRST_GETS = 40


def start_server(extra: dict, env: dict) -> tuple[subprocess.Popen, str]:
    folder = Path(tempfile.mkdtemp(prefix="imgproxy-bench-"))
    config = folder / "config.json"
    config.write_text(json.dumps({
        "server": {"data_dir": str(folder / "data")}, "cleanup": {"enable": False},
        "users": [{"username": "alice", "password": "bench-password", "role": "admin"}], **extra}))
    proc = subprocess.Popen([sys.executable, str(ROOT / "imgproxy.py"), "--config", str(config), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if "listening on " in line:
            return proc, line.split("listening on ", 1)[1].split()[0]
    raise SystemExit(f"the server did not start ({extra or 'files'})")


def upload(base_url: str, data: bytes, name: str = "x.png") -> str:
    req = urllib.request.Request(f"{base_url}/upload/{name}", data=data, method="PUT", headers=AUTH)
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)["md5"]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def engine_pids(s3: engines.S3Engine, pg: engines.PgEngine) -> list[int]:
    """weed, and every postgres process of the throwaway cluster (backends come and go)."""
    pids = [s3.process.pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"postgres" in cmd or str(pg.folder).encode() in cmd:
                pids.append(int(entry.name))
    return pids


def wrk(url: str, seconds: int) -> int:
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", url], capture_output=True, text=True,
                         check=True).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"errors under load:\n{out}")
    return int(re.search(r"(\d+) requests in", out).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    args = ap.parse_args()

    s3 = engines.S3Engine.launch(engines.find_weed())
    pg = engines.PgEngine.launch(engines.find_pg_bindir())
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        env = dict(os.environ)
        servers["files+sqlite"] = start_server({}, env)
        servers["s3+pg"] = start_server({"storage": s3.storage_config(s3.new_bucket()),
                                         "database": {"url": pg.new_database()}}, env)
        small, large = noise_png(60 * 1024, 1), noise_png(700 * 1024, 2)
        urls = {}
        for name, (_, base) in servers.items():
            urls[name] = {"hot GET 60 KB": f"{base}/i/{upload(base, small)}.png",
                          "cold GET 700 KB": f"{base}/i/{upload(base, large)}.png"}
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for r in range(args.rounds):
            for name, (proc, base) in servers.items():
                others = engine_pids(s3, pg) if name == "s3+pg" else []
                for test, url in urls[name].items():
                    before, before_engines = cpu_seconds([proc.pid]), cpu_seconds(others)
                    started = time.perf_counter()
                    count = wrk(url, args.seconds)
                    wall = time.perf_counter() - started
                    spent, spent_engines = cpu_seconds([proc.pid]) - before, cpu_seconds(others) - before_engines
                    results.setdefault((test, name), []).append(
                        (count / wall, spent / count * 1e6, spent_engines / count * 1e6))
                # First GETs: images this node has never served (for S3, not on its disk yet).
                fresh = [f"{base}/i/{upload(base, noise_png(700 * 1024, 5000 * (r + 1) + i + (0 if name == 'files+sqlite' else 100)))}.png"
                         for i in range(FIRST_GETS)]
                before, before_engines = cpu_seconds([proc.pid]), cpu_seconds(others)
                started = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
                    list(pool.map(lambda u: urllib.request.urlopen(u).read(), fresh))
                wall = time.perf_counter() - started
                spent, spent_engines = cpu_seconds([proc.pid]) - before, cpu_seconds(others) - before_engines
                results.setdefault(("first GET 700 KB", name), []).append(
                    (FIRST_GETS / wall, spent / FIRST_GETS * 1e6, spent_engines / FIRST_GETS * 1e6))
                # Distinct uploads: every one a new object and a new row.
                blobs = [noise_png(150 * 1024, 1000 * (r + 1) + i + (0 if name == "files+sqlite" else 500))
                         for i in range(UPLOADS)]
                before, before_engines = cpu_seconds([proc.pid]), cpu_seconds(others)
                started = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
                    list(pool.map(lambda b: upload(base, b), blobs))
                wall = time.perf_counter() - started
                spent, spent_engines = cpu_seconds([proc.pid]) - before, cpu_seconds(others) - before_engines
                results.setdefault(("uploads 150 KB", name), []).append(
                    (UPLOADS / wall, spent / UPLOADS * 1e6, spent_engines / UPLOADS * 1e6))
    finally:
        for proc, _ in servers.values():
            proc.kill()
        s3.close()
        pg.close()

    print(f"{args.rounds} rounds, wrk -c16 {args.seconds}s per GET test; {UPLOADS} uploads over "
          f"{UPLOAD_THREADS} threads. Best round by rate; CPU in microseconds per request.")
    for test in ("hot GET 60 KB", "cold GET 700 KB", "first GET 700 KB", "uploads 150 KB"):
        best = {name: max(results[(test, name)]) for name in servers}
        base, other = best["files+sqlite"], best["s3+pg"]
        print(f"{test}: files+sqlite {base[0]:.0f}/s ({base[1]:.0f} us CPU); "
              f"s3+pg {other[0]:.0f}/s ({other[1]:.0f} us imgproxy + {other[2]:.0f} us weed/postgres); "
              f"rate {other[0] / base[0]:.2f}x, imgproxy CPU {other[1] / base[1]:.2f}x")
        print(f"    rounds files+sqlite {[tuple(round(x) for x in t) for t in results[(test, 'files+sqlite')]]}, "
              f"s3+pg {[tuple(round(x) for x in t) for t in results[(test, 's3+pg')]]}")


if __name__ == "__main__":
    main()
