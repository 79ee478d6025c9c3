#!/usr/bin/env python3
"""Soak test: mixed load against a real imgproxy process for N minutes.

    python3 bench/soak.py [--minutes 10] [--workers 4] [--seed 1] [--keep]

Starts `imgproxy.py` on 127.0.0.1 with a throw-away config and data folder,
then runs uploads (new, duplicate, 2 MB), GETs (plain, conditional, ranges),
lookups, lists, renews and deletes from several threads, with `cleanup.py`
every 15 s. Images expire after 90 s, so cleanups have real work to do.

Reports: requests and errors (must be 0: any 5xx, any wrong answer, any
acknowledged and unexpired image not served byte for byte), the server's
RSS and open file descriptors after warm-up and at the end (should be
flat), and the storage invariants at the end (every row has its file, every
file its row and its digest). Exit status 0 only when all of that holds.
"""
from __future__ import annotations

import argparse
import base64
import collections
import datetime as dt
import hashlib
import http.client
import io
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USERS = [("alice", "alice-soak", "admin"), ("bob", "bob-soak", "uploader"), ("carol", "carol-soak", "uploader")]
EXPIRE_SECONDS = 90


def auth(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def make_image(seed: int, size: int) -> bytes:
    """A PNG of about `size` bytes (random pixels), different for every seed."""
    from PIL import Image
    side = max(4, int((size / 3) ** 0.5))
    raw = hashlib.shake_256(f"soak{seed}".encode()).digest(side * side * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), raw).save(buf, "PNG", compress_level=0)
    return buf.getvalue()


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def ts(iso: str) -> float:
    return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()


class Soak:
    def __init__(self, port: int, seed: int):
        self.port = port
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.acked: dict[str, tuple[float, int, int]] = {}  # md5 -> (expire_at, seed, size)
        self.pending: collections.Counter[str] = collections.Counter()  # md5s with a write in flight
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.seq = seed * 1_000_000
        self.stop = threading.Event()

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)
            if len(self.errors) <= 20:
                print("ERROR", text, file=sys.stderr, flush=True)

    def pick(self, rng: random.Random):
        with self.lock:
            if not self.acked:
                return None
            md5 = rng.choice(list(self.acked))
            return md5, self.acked[md5]

    def request(self, conn, method, path, body=None, headers=None):
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        self.counts[f"{method} {resp.status}"] += 1
        if resp.status >= 500:
            self.error(f"{method} {path} -> {resp.status} {data[:200]!r}")
        return resp, data

    def worker(self, n: int) -> None:
        rng = random.Random(self.rng.random())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        ops = ["upload"] * 4 + ["big"] + ["again"] * 2 + ["get"] * 8 + ["cond"] + ["range"] + \
              ["lookup"] * 2 + ["list"] + ["renew"] * 2 + ["delete"]
        while not self.stop.is_set():
            op = rng.choice(ops)
            user, password, role = rng.choice(USERS)
            try:
                self.one(conn, rng, op, auth(user, password), role)
            except (OSError, http.client.HTTPException) as exc:
                self.error(f"{op}: {type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.close()

    def upload(self, conn, seed: int, size: int, headers: dict) -> None:
        data = make_image(seed, size)
        md5 = hashlib.md5(data).hexdigest()
        with self.lock:
            self.pending[md5] += 1
        try:
            resp, body = self.request(conn, "PUT", f"/upload/soak-{seed}.png", data, headers)
            if resp.status not in (200, 201):
                self.error(f"upload -> {resp.status} {body[:200]!r}")
                return
            info = json.loads(body)
            if info["md5"] != md5:
                self.error(f"upload md5 {info['md5']} != {md5}")
            with self.lock:
                self.acked[md5] = (ts(info["expire_at"]), seed, size)
        finally:
            with self.lock:
                self.pending[md5] -= 1

    def one(self, conn, rng: random.Random, op: str, headers: dict, role: str) -> None:
        if op in ("upload", "big") or (op == "again" and not self.acked):
            with self.lock:
                self.seq += 1
                seed = self.seq
            self.upload(conn, seed, 2_000_000 if op == "big" else rng.choice([800, 5000, 40_000, 200_000]), headers)
            return
        picked = self.pick(rng)
        if picked is None:
            return
        md5, (expire_at, seed, size) = picked
        if op == "again":
            self.upload(conn, seed, size, headers)
        elif op in ("get", "cond", "range"):
            extra = {"If-None-Match": f'"{md5}"'} if op == "cond" else {"Range": "bytes=0-99"} if op == "range" else {}
            resp, body = self.request(conn, "GET", f"/i/{md5}.png", headers=extra)
            with self.lock:
                busy = self.pending[md5] > 0 or md5 not in self.acked
                expire_at = self.acked.get(md5, (expire_at,))[0]
            fresh = expire_at > time.time() + 2
            if resp.status == 404 and (busy or not fresh):
                return  # deleted meanwhile, or expired and cleaned
            want = {"get": 200, "cond": 304, "range": 206}[op]
            if resp.status != want:
                self.error(f"GET {op} {md5} -> {resp.status} (fresh={fresh})")
            elif op == "get" and hashlib.md5(body).hexdigest() != md5:
                self.error(f"GET {md5}: wrong bytes")
            elif op == "range" and len(body) != 100:
                self.error(f"range {md5}: {len(body)} bytes")
        elif op == "lookup":
            resp, _ = self.request(conn, "GET", f"/api/images/{md5}", headers=headers)
            if resp.status not in (200, 404):
                self.error(f"lookup -> {resp.status}")
        elif op == "list":
            resp, body = self.request(conn, "GET", f"/api/images?limit={rng.choice([1, 10, 100])}", headers=headers)
            if resp.status != 200 or "total" not in json.loads(body):
                self.error(f"list -> {resp.status}")
        elif op == "renew":
            with self.lock:
                self.pending[md5] += 1
            try:
                resp, body = self.request(conn, "POST", f"/api/images/{md5}/renew", headers=headers)
                if resp.status == 200:
                    with self.lock:
                        self.acked[md5] = (ts(json.loads(body)["expire_at"]), seed, size)
                elif resp.status != 404:
                    self.error(f"renew -> {resp.status}")
            finally:
                with self.lock:
                    self.pending[md5] -= 1
        elif op == "delete":
            with self.lock:
                self.pending[md5] += 1
            try:
                admin = auth("alice", "alice-soak")
                resp, _ = self.request(conn, "DELETE", f"/api/images/{md5}", headers=admin)
                if resp.status in (204, 404):
                    with self.lock:
                        self.acked.pop(md5, None)
                else:
                    self.error(f"delete -> {resp.status}")
            finally:
                with self.lock:
                    self.pending[md5] -= 1


def invariants(data_dir: Path) -> list[str]:
    problems = []
    con = sqlite3.connect(f"file:{data_dir / 'images.db'}?mode=ro", uri=True, timeout=30)
    try:
        if con.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            problems.append("integrity_check failed")
        rows = dict(con.execute("SELECT md5, ext FROM images"))
    finally:
        con.close()
    files = {}
    for path in (data_dir / "uploads").rglob("*"):
        if path.is_file():
            stem, _, ext = path.name.partition(".")
            files[stem] = ext
            if hashlib.md5(path.read_bytes()).hexdigest() != stem:
                problems.append(f"corrupt file {path}")
    problems += [f"row without file {m}" for m in rows if files.get(m) != rows[m]]
    problems += [f"file without row {m}" for m in files if rows.get(m) != files[m]]
    return problems


def run_cleanup(config: Path) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "cleanup.py"), "--config", str(config)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"cleanup.py failed: {out.stderr.strip()}")
    return out.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the data folder afterwards")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="imgproxy-soak-"))
    config = folder / "config.json"
    config.write_text(json.dumps({
        "server": {"host": "127.0.0.1", "port": 0, "domain": "127.0.0.1", "data_dir": str(folder / "data")},
        "cleanup": {"enable": False, "expire_days": EXPIRE_SECONDS / 86400},
        "users": [{"username": u, "password": p, "role": r} for u, p, r in USERS],
    }))
    server = subprocess.Popen([sys.executable, str(ROOT / "imgproxy.py"), "--config", str(config), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_lines: list[str] = []
    line = server.stdout.readline()
    log_lines.append(line)
    if "listening on " not in line:
        print("server did not start:", line, server.stdout.read(), file=sys.stderr)
        return 1
    port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
    threading.Thread(target=lambda: log_lines.extend(server.stdout), daemon=True).start()
    pid = server.pid
    soak = Soak(port, args.seed)
    workers = [threading.Thread(target=soak.worker, args=(i,), daemon=True) for i in range(args.workers)]
    started = time.monotonic()
    for w in workers:
        w.start()
    duration = args.minutes * 60
    warm = min(20.0, duration / 5)
    time.sleep(warm)
    rss_start, fds_start = proc_kb(pid, "VmRSS"), fd_count(pid)
    cleanups = []
    next_cleanup = time.monotonic() + 15
    samples = []
    while time.monotonic() - started < duration:
        time.sleep(1)
        samples.append((proc_kb(pid, "VmRSS"), fd_count(pid)))
        if time.monotonic() >= next_cleanup:
            try:
                cleanups.append(run_cleanup(config))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                soak.error(str(exc))
            next_cleanup = time.monotonic() + 15
        if server.poll() is not None:
            soak.error(f"server exited with {server.returncode}")
            break
    soak.stop.set()
    for w in workers:
        w.join(120)
    time.sleep(3)  # let access counts flush and keep-alive connections close
    rss_end, fds_end, hwm = proc_kb(pid, "VmRSS"), fd_count(pid), proc_kb(pid, "VmHWM")
    final_cleanup = run_cleanup(config)
    problems = invariants(folder / "data")
    server.terminate()
    rc = server.wait(30)
    log = "".join(log_lines)
    if "Traceback" in log or " ERROR " in log:
        soak.error("server log has errors: " + "".join(line for line in log_lines if "ERROR" in line)[:500])
    if rc != 0:
        soak.error(f"server exit status {rc} on SIGTERM")

    total = sum(soak.counts.values())
    elapsed = time.monotonic() - started
    print(f"soak: {elapsed / 60:.1f} min, {args.workers} workers, {total} requests ({total / elapsed:.0f}/s)")
    for key, n in sorted(soak.counts.items()):
        print(f"  {key:12} {n}")
    print(f"  cleanups: {len(cleanups)} (last: {cleanups[-1] if cleanups else '-'}); final: {final_cleanup}")
    print(f"errors: {len(soak.errors)}")
    for e in soak.errors[:20]:
        print("  ", e)
    rss_min = min(s[0] for s in samples) if samples else rss_start
    rss_max = max(s[0] for s in samples) if samples else rss_end
    print(f"RSS after {warm:.0f} s warm-up: {rss_start / 1024:.1f} MB, end: {rss_end / 1024:.1f} MB "
          f"(range {rss_min / 1024:.1f}-{rss_max / 1024:.1f} MB, peak {hwm / 1024:.1f} MB)")
    print(f"open fds after warm-up: {fds_start}, end: {fds_end} (max {max((s[1] for s in samples), default=fds_end)})")
    print(f"images at end: {len(soak.acked)} acknowledged and not deleted; invariants: "
          + ("ok" if not problems else f"{len(problems)} problems"))
    for p in problems[:20]:
        print("  ", p)
    if not args.keep:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"data kept in {folder}")
    return 0 if not soak.errors and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
