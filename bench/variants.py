#!/usr/bin/env python3
"""Variants (/i/{md5}/{size}.{fmt}) against a real imgproxy process: the
figures of issue 12's "Measured" list, in one run of about two minutes.

    python3 bench/variants.py [--renders 7] [--seconds 5] [--flood 500] [--photo FILE ... [--as-phone]]

Server CPU is always that of the whole process tree (the server pid and its
live descendants from /proc/*/stat, utime+stime+cutime+cstime, so reaped
children count too): the figures hold whether renders run in threads of the
server or in render processes (a forkserver pool).

1. First render of a 12 MP JPEG to a 640 px WebP: wall time of the request
   (median of --renders distinct images, each rendered for the first time)
   and the server's CPU time per render; peak RSS (VmHWM) growth of the
   server across those renders. Render processes, if any: per descendant,
   VmHWM at the end minus VmRSS when first seen (for one born during the
   renders, minus its fork parent's VmRSS); the largest is reported.
   With --photo (repeatable), those JPEG files are rendered instead of the
   synthetic ones, one first render each (real photos: see bench/README.md,
   "Variants": `apt-get download lomiri-wallpapers-20.04
   lomiri-wallpapers-16.04 && dpkg-deb -x <deb> DIR`, then
   DIR/usr/share/backgrounds/*.jpg; nothing is installed). With
   --as-phone each is first re-encoded as a phone camera writes a 12 MP
   photo (cropped to 4:3, 4000x3000, baseline, quality 92, 4:2:0): real
   content at the size and coding of the issue's "12 MP JPEG".
   A floor in the same run, if djpeg (libjpeg-turbo-progs) is on PATH:
   `djpeg -scale 1/N -outfile /dev/null` of the same files at the DCT scale
   the render uses (1/4 for 12 MP to 640 px), median of 3 each, wall and CPU:
   the bare entropy decoding no JPEG resize can skip, so "render / djpeg" is
   the machine-independent figure.
2. Hot GET of the cached 640 px WebP against the hot GET of an original of
   the same bytes (the variant uploaded as an image): wrk req/s, ratio.
3. 64 concurrent first requests for one variant: renders counted from the
   server's debug log ("rendered variant ...").
4. --flood distinct uncached variants requested as fast as possible (32
   threads in a separate client process, so they do not share the probe's
   GIL) while a probe in this process GETs a cached image: probe p99 (and
   p50) during the flood / idle, and every status seen (5xx other than 503
   with Retry-After is a failure). Each of --flood-rounds rounds (3) first
   sends a control flood from the same client: as many GETs of one cached
   variant, no render at all. On 2 shared cores the client and the
   requests themselves cost the probe; "render flood / control flood" is
   what the renders add on top.
5. A flood of unknown md5s and bad sizes: renders and files written (both 0).

Everything runs on 127.0.0.1 with a throw-away data folder. Prints a
Markdown table for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import resource
import shutil
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


def as_phone_jpeg(path: Path) -> bytes:
    """A real photo as a 12 MP phone camera writes it: 4:3, 4000x3000, baseline, q92, 4:2:0."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    if w * 3 > h * 4:
        crop_w = h * 4 // 3
        im = im.crop(((w - crop_w) // 2, 0, (w - crop_w) // 2 + crop_w, h))
    else:
        crop_h = w * 3 // 4
        im = im.crop((0, (h - crop_h) // 2, w, (h - crop_h) // 2 + crop_h))
    im = im.resize((4000, 3000), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, subsampling="4:2:0")
    return buf.getvalue()


def proc_kb(pid: int, field: str) -> int:
    """A kB field of /proc/PID/status; -1 if absent (a zombie) or the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return -1
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, ppid) of every live descendant of root, parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = proc_stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        parent = todo.pop(0)
        for child in children.get(parent, []):
            found.append((child, parent))
            todo.append(child)
    return found


def proc_cpu_seconds(pid: int) -> float:
    """CPU of pid and its live descendants, with the reaped children each of them waited for.

    A render process reaped between two readings moves from its own
    utime+stime to its parent's cutime+cstime, so nothing is lost or counted twice.
    """
    ticks = 0
    for member in [pid, *(child for child, _ in descendants(pid))]:
        fields = proc_stat(member)
        if fields is not None:
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


class RenderProcessMemory:
    """Peak RSS growth of the server's descendants (render processes), observed by polling.

    Processes already there when it starts are measured from their VmRSS then
    (their VmHWM reset to it);
    later ones from their fork parent's VmRSS when first seen (a forked child
    starts with its parent's pages). A process that lives and dies between two
    looks is not seen: look() after every render.
    """

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.base_kb: dict[int, int] = {}
        self.peak_kb: dict[int, int] = {}
        for pid, _ in descendants(server_pid):
            # "5" resets VmHWM to the current RSS (Linux, our own processes): a process's
            # start-up (compiling imgproxy.py) peaks higher than a render, and would hide it.
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.base_kb[pid] = proc_kb(pid, "VmRSS")
        self.look()

    def look(self) -> None:
        for pid, parent in descendants(self.server_pid):
            if pid not in self.base_kb:
                self.base_kb[pid] = proc_kb(parent, "VmRSS")
            hwm = proc_kb(pid, "VmHWM")
            if hwm >= 0:
                self.peak_kb[pid] = hwm

    def largest_growth_kb(self) -> tuple[int, int]:
        """(largest VmHWM - base in kB, processes measured)."""
        growths = [self.peak_kb[pid] - self.base_kb[pid] for pid in self.peak_kb if self.base_kb[pid] >= 0]
        return max(growths, default=0), len(growths)


def draft_scale(path: Path, width: int) -> int:
    """The DCT scale denominator (1, 2, 4, 8) Pillow's draft picks for a render at `width`,
    asked for the way imgproxy.render_variant asks (orientation included)."""
    from PIL import Image
    with Image.open(path) as im:
        swapped = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        full_w = im.width
        shown_w, shown_h = (im.height, im.width) if swapped else im.size
        target_w = min(width, shown_w)
        target_h = max(1, round(shown_h * target_w / shown_w))
        im.draft(im.mode, (target_h, target_w) if swapped else (target_w, target_h))
        return round(full_w / im.width)


def djpeg_decode(path: Path, scale: int) -> tuple[float, float]:
    """(wall, CPU) seconds of `djpeg -scale 1/scale` of path to /dev/null, startup included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["djpeg", "-scale", f"1/{scale}", "-outfile", "/dev/null", str(path)], check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


class Server:
    def __init__(self, workdir: Path, program: Path = ROOT / "imgproxy.py"):
        data = workdir / "data"
        config = {"server": {"domain": "127.0.0.1", "host": "127.0.0.1", "data_dir": str(data),
                             "log_level": "DEBUG", "max_upload_mb": 50},
                  "cleanup": {"enable": False},
                  "users": [{"username": "alice", "password": "alice-bench", "role": "admin"}]}
        path = workdir / "config.json"
        path.write_text(json.dumps(config))
        self.data = data
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, str(program), "--config", str(path),
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


# The flood's client: its own process, so its 32 threads do not take the GIL
# from the probe. Reads [port, paths] as JSON on stdin, says "go" when it
# starts, prints {"seconds", "statuses"} as JSON when every answer is in.
FLOOD_CLIENT = r"""
import concurrent.futures, http.client, json, sys, time
port, paths = json.load(sys.stdin)
def get(path):
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        con.request("GET", path)
        resp = con.getresponse()
        resp.read()
        retry = resp.status == 503 and resp.getheader("Retry-After") is not None
        return f"{resp.status}" + (" with Retry-After" if retry else "")
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        con.close()
print("go", flush=True)
t0 = time.perf_counter()
seen = {}
with concurrent.futures.ThreadPoolExecutor(32) as pool:
    for key in pool.map(get, paths):
        seen[key] = seen.get(key, 0) + 1
print(json.dumps({"seconds": time.perf_counter() - t0, "statuses": seen}), flush=True)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--renders", type=int, default=7)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--flood", type=int, default=500)
    ap.add_argument("--flood-rounds", type=int, default=3, choices=(1, 2, 3))
    ap.add_argument("--imgproxy", type=Path, default=ROOT / "imgproxy.py", metavar="FILE",
                    help="the server to measure (e.g. an older imgproxy.py from git show, to compare)")
    ap.add_argument("--photo", action="append", type=Path, default=[], metavar="FILE",
                    help="a JPEG for test 1 instead of the synthetic ones (repeatable)")
    ap.add_argument("--as-phone", action="store_true",
                    help="re-encode each --photo as a phone camera writes one: cropped to 4:3, "
                         "4000x3000, baseline, quality 92, 4:2:0")
    args = ap.parse_args(argv)
    for photo in args.photo:
        if not photo.is_file():
            raise SystemExit(f"--photo {photo}: no such file")
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="imgproxy-variants-") as tmp:
        server = Server(Path(tmp), args.imgproxy)
        try:
            print("generating and uploading images ...", file=sys.stderr)
            if args.photo and args.as_phone:
                sources = [Path(tmp) / f"phone-{i}-{p.name}" for i, p in enumerate(args.photo)]
                for source, path in zip(args.photo, sources):
                    path.write_bytes(as_phone_jpeg(source))
                what = f"12 MP phone-like JPEG of {len(sources)} photo{'s' if len(sources) > 1 else ''}"
            elif args.photo:
                sources = args.photo
                what = f"{len(sources)} photo{'s' if len(sources) > 1 else ''} (--photo)"
            else:
                sources = [Path(tmp) / f"p{i}.jpg" for i in range(args.renders)]
                for i, path in enumerate(sources):
                    path.write_bytes(photo_jpeg(i))
                what = "12 MP JPEG"
            md5s = [server.upload(path.read_bytes(), path.name) for path in sources]
            # 1. first renders
            hwm_before = proc_kb(server.proc.pid, "VmHWM")
            render_memory = RenderProcessMemory(server.proc.pid)
            walls, cpus = [], []
            for m in md5s:
                cpu0, t0 = proc_cpu_seconds(server.proc.pid), time.perf_counter()
                status, _, variant = server.request("GET", f"/i/{m}/640.webp")
                walls.append(time.perf_counter() - t0)
                cpus.append(proc_cpu_seconds(server.proc.pid) - cpu0)
                render_memory.look()
                assert status == 200
            hwm_after = proc_kb(server.proc.pid, "VmHWM")
            growth_kb, processes = render_memory.largest_growth_kb()
            rows.append((f"first render {what} -> 640 WebP", "median request time",
                         f"{statistics.median(walls) * 1000:.0f} ms (min {min(walls) * 1000:.0f})", "≤ 80 ms"))
            rows.append(("", "median server CPU per render (process tree)",
                         f"{statistics.median(cpus) * 1000:.0f} ms", ""))
            rows.append(("", "peak RSS growth over the renders, server process",
                         f"{(hwm_after - hwm_before) / 1024:.1f} MiB", "≤ 100 MB"))
            rows.append(("", "largest peak RSS growth of a render process",
                         f"{growth_kb / 1024:.1f} MiB (of {processes} descendants)" if processes
                         else "no descendants (renders in the server process)", "≤ 100 MB"))
            # the floor: entropy decoding of the same files at the render's DCT scale
            if shutil.which("djpeg"):
                scales = [draft_scale(path, 640) for path in sources]
                floor_walls, floor_cpus = [], []
                for path, scale in zip(sources, scales):
                    runs = [djpeg_decode(path, scale) for _ in range(3)]
                    floor_walls.append(statistics.median(wall for wall, _ in runs))
                    floor_cpus.append(statistics.median(cpu for _, cpu in runs))
                render_wall, floor_wall = statistics.median(walls), statistics.median(floor_walls)
                render_cpu, floor_cpu = statistics.median(cpus), statistics.median(floor_cpus)
                scale_text = ", ".join(f"1/{s}" for s in sorted(set(scales)))
                rows.append((f"floor: djpeg -scale {scale_text}, same files", "render / djpeg decode: wall; CPU",
                             f"{render_wall * 1000:.0f} / {floor_wall * 1000:.0f} ms = "
                             f"{render_wall / floor_wall:.1f}×; {render_cpu * 1000:.0f} / "
                             f"{floor_cpu * 1000:.0f} ms = {render_cpu / max(floor_cpu, 1e-3):.1f}×", ""))
            else:
                rows.append(("floor: djpeg decode, same files", "render / djpeg decode",
                             "djpeg not installed", ""))
            # 2. hot GET: cached variant vs an original of the same bytes
            url_variant = f"/i/{md5s[0]}/640.webp"
            status, _, variant = server.request("GET", url_variant)  # the bytes wrk will get, not the last render's
            assert status == 200
            same = server.upload(variant, "same.webp")
            url_original = f"/i/{same}.webp"
            best_v = best_o = (0.0, 1.0)
            for _ in range(4):  # interleaved rounds, best kept
                best_o = max(best_o, wrk(server, url_original, args.seconds))
                best_v = max(best_v, wrk(server, url_variant, args.seconds))
            rows.append((f"hot GET 640 WebP ({len(variant) // 1024} KB)", "req/s variant vs original",
                         f"{best_v[0]:,.0f} vs {best_o[0]:,.0f} = {best_v[0] / best_o[0]:.2f}×", "≥ 0.9×"))
            rows.append(("", "server CPU per request, original vs variant",
                         f"{best_o[1] * 1e6:.0f} vs {best_v[1] * 1e6:.0f} µs = "
                         f"{best_o[1] / best_v[1]:.2f}× (of the best rounds)", ""))
            # 3. single flight (test 1 rendered 640 px only, so 320 px is uncached even with one photo)
            before = server.renders()
            with concurrent.futures.ThreadPoolExecutor(64) as pool:
                statuses = list(pool.map(lambda _: server.request("GET", f"/i/{md5s[-1]}/320.webp")[0], range(64)))
            time.sleep(0.5)
            rows.append(("64 concurrent first requests", "renders",
                         f"{server.renders() - before} (statuses {sorted(set(statuses))})", "exactly 1"))
            # 4. flood of distinct uncached variants; probe a cached image meanwhile
            probe = f"/i/{md5s[0]}/640.webp"

            def probe_time() -> float:
                t0 = time.perf_counter()
                status, _, _ = server.request("GET", probe)
                assert status == 200, status
                return time.perf_counter() - t0

            idle = [probe_time() for _ in range(300)]
            small = [server.upload(photo_jpeg(100 + i, (1600, 1200)), f"s{i}.jpg")
                     for i in range(max(1, args.flood // 5))]

            def flood(paths: list[str]) -> tuple[list[float], dict[str, int], float, float]:
                """Probe times while the flood client sends `paths`; its statuses, seconds, CPU."""
                children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                flooder = subprocess.Popen([sys.executable, "-c", FLOOD_CLIENT], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
                flooder.stdin.write(json.dumps([server.port, paths]))
                flooder.stdin.close()
                assert flooder.stdout.readline().strip() == "go"
                during = []
                while flooder.poll() is None:
                    during.append(probe_time())
                result = json.loads(flooder.stdout.read())
                usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the flooder is reaped by poll()
                cpu = usage.ru_utime + usage.ru_stime - children_before.ru_utime - children_before.ru_stime
                flooder.stdout.close()
                return during, result["statuses"], result["seconds"], cpu

            # Rounds of (a control flood of one cached variant, then a flood of uncached ones),
            # interleaved: the control is what the same client and requests cost without renders.
            control_path = f"/i/{md5s[-1]}/320.webp"  # rendered by test 3
            seen: dict[str, int] = {}
            rounds = []
            for fmt in ("jpg", "webp", "png")[:args.flood_rounds]:
                targets = [f"/i/{m}/{w}.{fmt}" for m in small for w in (160, 320, 640, 1280, 2048)][:args.flood]
                control, control_seen, control_seconds, control_cpu = flood([control_path] * len(targets))
                during, statuses, seconds, cpu = flood(targets)
                for k, v in statuses.items():
                    seen[k] = seen.get(k, 0) + v
                rounds.append((p99(during), p99(control), statistics.median(during), seconds, cpu,
                               control_seconds, control_cpu, len(during), set(control_seen)))
            # a status other than 2xx-4xx, or a client error instead of an answer, fails
            bad = {k: v for k, v in seen.items() if k[:1] not in "234" and k != "503 with Retry-After"}
            idle99, idle50 = p99(idle), statistics.median(idle)
            mid = sorted(rounds)[len(rounds) // 2]  # the round with the median render-flood p99
            flood99, control99, flood50, seconds, cpu, control_seconds, control_cpu, probes, cseen = mid
            rows.append((f"{args.flood} uncached variants, 32 at a time ({len(rounds)} rounds; median round "
                         f"{seconds:.1f} s, flood client CPU {cpu:.1f} s)",
                         "p99 (p50) of a cached GET: flood / idle",
                         f"{flood99 * 1000:.1f} / {idle99 * 1000:.1f} ms = {flood99 / idle99:.1f}× "
                         f"({flood50 * 1000:.1f} / {idle50 * 1000:.1f} ms = {flood50 / idle50:.1f}×; "
                         f"{probes} probes); rounds: "
                         + ", ".join(f"{r[0] / idle99:.1f}×" for r in rounds), "≤ 3×"))
            rows.append((f"control: {args.flood} GETs of one cached variant, same client "
                         f"({control_seconds:.1f} s, client CPU {control_cpu:.1f} s, statuses {sorted(cseen)})",
                         "p99 of a cached GET: render flood / control flood",
                         f"{flood99 * 1000:.1f} / {control99 * 1000:.1f} ms = {flood99 / control99:.2f}×; rounds: "
                         + ", ".join(f"{r[0] / r[1]:.2f}×" for r in rounds), "renders add ≤ the requests' own cost"))
            rows.append(("", "statuses of the render floods", ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())),
                         "no 5xx but 503 + Retry-After, no errors" + (" ❌" if bad else " ✅")))
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
