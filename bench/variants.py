#!/usr/bin/env python3
"""Variants (/i/{md5}/{size}.{fmt}) against a real imgproxy process: the
figures of issue 12's "Measured" list, in one run of about two minutes.

    python3 bench/variants.py [--renders 7] [--seconds 5] [--flood 500]

1. First render of a 12 MP JPEG to a 640 px WebP: wall time of the request
   (median of --renders distinct images, each rendered for the first time)
   and the server's CPU time per render; peak RSS (VmHWM) growth of the
   server across those renders.
2. Hot GET of the cached 640 px WebP against the hot GET of an original of
   the same bytes (the variant uploaded as an image): wrk req/s, ratio.
3. 64 concurrent first requests for one variant: renders counted from the
   server's debug log ("rendered variant ...").
4. --flood distinct uncached variants requested as fast as possible while a
   probe GETs a cached image: probe p99 during the flood / idle p99, and
   every status seen (5xx other than 503 with Retry-After is a failure).
5. A flood of unknown md5s and bad sizes: renders and files written (both 0).

Everything runs on 127.0.0.1 with a throw-away data folder. Prints a
Markdown table for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import http.client
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": "Basic " + base64.b64encode(b"alice:alice-bench").decode()}


def photo_jpeg(seed: int, size=(4000, 3000)) -> bytes:
    """A 12 MP JPEG that compresses like a phone photo (about 3.5 MB)."""
    from PIL import Image
    w, h = size
    grad = Image.linear_gradient("L").resize(size)
    texture = Image.effect_noise((w // 4, h // 4), 40 + seed).resize(size)
    im = Image.merge("RGB", (grad, texture, grad.transpose(Image.Transpose.ROTATE_180)))
    im = Image.blend(im, Image.effect_noise(size, 20).convert("RGB"), 0.15)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, workdir: Path):
        data = workdir / "data"
        config = {"server": {"domain": "127.0.0.1", "host": "127.0.0.1", "data_dir": str(data),
                             "log_level": "DEBUG", "max_upload_mb": 50},
                  "cleanup": {"enable": False},
                  "users": [{"username": "alice", "password": "alice-bench", "role": "admin"}]}
        path = workdir / "config.json"
        path.write_text(json.dumps(config))
        self.data = data
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "imgproxy.py"), "--config", str(path),
                                      "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on " in line:
                self.port = int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
                break
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def renders(self) -> int:
        return sum("rendered variant" in line for line in list(self.lines))

    def request(self, method: str, path: str, body: bytes = b"", headers=None):
        con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            con.request(method, path, body=body or None, headers=headers or {})
            resp = con.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            con.close()

    def upload(self, data: bytes, name: str) -> str:
        status, _, body = self.request("PUT", f"/upload/{name}", data, AUTH)
        assert status in (200, 201), body
        return json.loads(body)["md5"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def wrk(server: "Server", path: str, seconds: int) -> tuple[float, float]:
    """(requests per second, server CPU seconds per request) under wrk -c16."""
    cpu = proc_cpu_seconds(server.proc.pid)
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", f"http://127.0.0.1:{server.port}{path}"],
                         capture_output=True, text=True, check=True).stdout
    cpu = proc_cpu_seconds(server.proc.pid) - cpu
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), cpu / max(1, requests)


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--renders", type=int, default=7)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--flood", type=int, default=500)
    args = ap.parse_args(argv)
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="imgproxy-variants-") as tmp:
        server = Server(Path(tmp))
        try:
            print("generating and uploading images ...", file=sys.stderr)
            md5s = [server.upload(photo_jpeg(i), f"p{i}.jpg") for i in range(args.renders)]
            # 1. first renders
            hwm_before = proc_kb(server.proc.pid, "VmHWM")
            walls, cpus = [], []
            for m in md5s:
                cpu0, t0 = proc_cpu_seconds(server.proc.pid), time.perf_counter()
                status, _, variant = server.request("GET", f"/i/{m}/640.webp")
                walls.append(time.perf_counter() - t0)
                cpus.append(proc_cpu_seconds(server.proc.pid) - cpu0)
                assert status == 200
            hwm_after = proc_kb(server.proc.pid, "VmHWM")
            rows.append(("first render 12 MP JPEG -> 640 WebP", "median request time",
                         f"{statistics.median(walls) * 1000:.0f} ms (min {min(walls) * 1000:.0f})", "≤ 80 ms"))
            rows.append(("", "median server CPU per render", f"{statistics.median(cpus) * 1000:.0f} ms", ""))
            rows.append(("", "peak RSS growth over the renders", f"{(hwm_after - hwm_before) / 1024:.1f} MiB",
                         "≤ 100 MB"))
            # 2. hot GET: cached variant vs an original of the same bytes
            same = server.upload(variant, "same.webp")
            url_variant, url_original = f"/i/{md5s[0]}/640.webp", f"/i/{same}.webp"
            best_v = best_o = (0.0, 1.0)
            for _ in range(4):  # interleaved rounds, best kept
                best_o = max(best_o, wrk(server, url_original, args.seconds))
                best_v = max(best_v, wrk(server, url_variant, args.seconds))
            rows.append((f"hot GET 640 WebP ({len(variant) // 1024} KB)", "req/s variant vs original",
                         f"{best_v[0]:,.0f} vs {best_o[0]:,.0f} = {best_v[0] / best_o[0]:.2f}×", "≥ 0.9×"))
            rows.append(("", "server CPU per request, original vs variant",
                         f"{best_o[1] * 1e6:.0f} vs {best_v[1] * 1e6:.0f} µs = "
                         f"{best_o[1] / best_v[1]:.2f}× (of the best rounds)", ""))
            # 3. single flight
            before = server.renders()
            with concurrent.futures.ThreadPoolExecutor(64) as pool:
                statuses = list(pool.map(lambda _: server.request("GET", f"/i/{md5s[1]}/320.webp")[0], range(64)))
            time.sleep(0.5)
            rows.append(("64 concurrent first requests", "renders",
                         f"{server.renders() - before} (statuses {sorted(set(statuses))})", "exactly 1"))
            # 4. flood of distinct uncached variants; probe a cached image meanwhile
            probe = f"/i/{md5s[0]}/640.webp"
            idle = []
            for _ in range(300):
                t0 = time.perf_counter()
                server.request("GET", probe)
                idle.append(time.perf_counter() - t0)
            small = [server.upload(photo_jpeg(100 + i, (1600, 1200)), f"s{i}.jpg")
                     for i in range(max(1, args.flood // 5))]
            targets = [f"/i/{m}/{w}.jpg" for m in small for w in (160, 320, 640, 1280, 2048)][:args.flood]
            seen: dict[str, int] = {}
            during: list[float] = []
            done = threading.Event()

            def flood(path: str) -> None:
                status, headers, _ = server.request("GET", path)
                key = f"{status}" + (" with Retry-After" if status == 503 and "Retry-After" in headers else "")
                seen[key] = seen.get(key, 0) + 1

            def probing() -> None:
                while not done.is_set():
                    t0 = time.perf_counter()
                    server.request("GET", probe)
                    during.append(time.perf_counter() - t0)

            prober = threading.Thread(target=probing)
            prober.start()
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(32) as pool:
                list(pool.map(flood, targets))
            flood_seconds = time.perf_counter() - t0
            done.set()
            prober.join()
            bad = {k: v for k, v in seen.items() if k.startswith("5") and k != "503 with Retry-After"}
            rows.append((f"{len(targets)} uncached variants, 32 at a time ({flood_seconds:.1f} s)",
                         "p99 of a cached GET: flood / idle",
                         f"{p99(during) * 1000:.1f} / {p99(idle) * 1000:.1f} ms = {p99(during) / p99(idle):.1f}×",
                         "≤ 3×"))
            rows.append(("", "statuses", ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())),
                         "no 5xx but 503 + Retry-After" + (" ❌" if bad else " ✅")))
            # 5. unknown md5s and bad sizes
            def files() -> int:
                return sum(len(f) for _, _, f in os.walk(server.data))
            before_files, before = files(), server.renders()
            junk = [f"/i/{hashlib.md5(str(i).encode()).hexdigest()}/320.webp" for i in range(1000)]
            junk += [f"/i/{md5s[0]}/{w}.webp" for w in range(1000, 2000) if w not in (1280, 2048)]
            with concurrent.futures.ThreadPoolExecutor(32) as pool:
                codes = sorted(set(pool.map(lambda p: server.request("GET", p)[0], junk)))
            rows.append((f"{len(junk)} requests: unknown md5s, bad sizes", "renders, files written",
                         f"{server.renders() - before}, {files() - before_files} (statuses {codes})", "0, 0"))
        finally:
            server.stop()
    command = " ".join(["python3 bench/variants.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `{command}`")
    print(f"Load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f} (2 cores).\n")
    print("| test | metric | figure | target |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
