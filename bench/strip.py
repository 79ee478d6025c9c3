"""Metadata removal and HEIC conversion: what they cost per upload.

    python3 bench/strip.py [--repeat 7] [--uploads 20]

1. The upload's worker-thread trip alone (hash, inspect_upload, prepare_stored),
   in-process, on a 5 MB phone-like JPEG (GPS Exif, XMP, a thumbnail, an MPF
   second image) and on the same pixels without metadata, strip_metadata on
   and off: median CPU of `repeat` interleaved runs.
2. Whole uploads: two server processes (strip on / off) each get the same
   PUTs; their CPU (utime + stime from /proc) per upload.
3. A 12 MP HEIC: check + conversion in a child process (time, peak RSS), and
   one upload to a running server while a ticker measures event-loop stalls.
Prints ratios measured in this run.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import imgproxy  # noqa: E402
from helpers import gps_exif  # noqa: E402
from PIL import Image  # noqa: E402


def phone_picture(size=(4000, 3000)) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo (about 5 MB at q92)."""
    w, h = size
    base = Image.merge("RGB", [Image.linear_gradient("L").resize(size), Image.radial_gradient("L").resize(size),
                               Image.linear_gradient("L").rotate(90).resize(size)])
    noise = Image.effect_noise(size, 40).convert("RGB")
    return Image.blend(base, noise, 0.25)


def phone_jpeg(picture: Image.Image) -> tuple[bytes, bytes]:
    """(JPEG as a phone writes it, the same pixels with no metadata at all)."""
    clean = io.BytesIO()
    picture.save(clean, "JPEG", quality=92)
    exif = gps_exif()
    thumb = io.BytesIO()
    picture.resize((160, 120)).save(thumb, "JPEG", quality=80)
    tagged = io.BytesIO()
    picture.save(tagged, "JPEG", quality=92, exif=exif.tobytes() + thumb.getvalue(),  # a thumbnail's bytes in the APP1
                 xmp=b"<x:xmpmeta>" + b"x" * 60000 + b"</x:xmpmeta>")
    second = io.BytesIO()
    picture.resize((1920, 1440)).save(second, "JPEG", quality=85)
    mpf = b"\xff\xe2" + (2 + 4 + 8).to_bytes(2, "big") + b"MPF\0" + b"MM\x00\x2a\x00\x00\x00\x08"
    body = tagged.getvalue()
    return body[:2] + mpf + body[2:] + second.getvalue(), clean.getvalue()


def upload_trip(data: bytes, tmp: Path, strip: bool) -> float:
    """CPU seconds of the worker-thread part of one upload (file on disk, as above 1 MB)."""
    source = tmp / "upload.part"
    source.write_bytes(data)
    counter = iter(range(10**9))
    start = time.process_time()
    hashlib.md5(data).hexdigest()  # the sink hashes while receiving; counted for scale
    facts = imgproxy.inspect_upload(source, len(data), imgproxy.DEFAULT_FORMATS, 50_000_000)
    stored = imgproxy.prepare_stored(source, facts, lambda: tmp / f"out{next(counter)}", strip)
    spent = time.process_time() - start
    if stored is not None:
        stored[2].unlink()
    return spent


def compare(name: str, data: bytes, repeat: int, tmp: Path) -> dict:
    on, off = [], []
    for _ in range(repeat):
        off.append(upload_trip(data, tmp, False))
        on.append(upload_trip(data, tmp, True))
    a, b = statistics.median(off), statistics.median(on)
    return {"case": name, "bytes": len(data), "cpu_off_ms": round(a * 1000, 1),
            "cpu_on_ms": round(b * 1000, 1), "ratio": round(b / a, 3)}


class ServerUnderTest:
    """imgproxy.py in a child process; `put` uploads, `cpu` reads its utime + stime."""

    def __init__(self, folder: Path, strip: bool):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "server": {"data_dir": str(folder / "data"), "strip_metadata": strip, "max_upload_mb": 50},
            "cleanup": {"enable": False}, "users": [{"username": "alice", "password": "alice123"}]}))
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "imgproxy.py"), "--config",
                                      str(folder / "config.json"), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while "listening on " not in (line := self.proc.stdout.readline()):
            if not line:
                raise RuntimeError("server did not start")
        self.base = line.split("listening on ", 1)[1].split()[0]

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def put(self, data: bytes) -> float:
        """CPU seconds the server spent on one PUT of `data`."""
        before = self.cpu()
        request = urllib.request.Request(self.base + "/upload/IMG_0001.jpg", data=data, method="PUT",
                                         headers={"Authorization": "Basic YWxpY2U6YWxpY2UxMjM="})
        with urllib.request.urlopen(request, timeout=60) as resp:
            resp.read()
        time.sleep(0.05)  # let the worker threads' time reach /proc
        return self.cpu() - before

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def server_cpu(data: bytes, uploads: int, tmp: Path) -> tuple[float, float]:
    """Mean server CPU per upload of `data` with strip_metadata (on, off), interleaved.
    The same bytes each time: after the first, every upload is a dedup hit that has
    still been received, hashed, checked and stripped."""
    on, off = ServerUnderTest(tmp / "on", True), ServerUnderTest(tmp / "off", False)
    try:
        on.put(data), off.put(data)
        spent_on = spent_off = 0.0
        for _ in range(uploads):
            spent_off += off.put(data)
            spent_on += on.put(data)
        return spent_on / uploads, spent_off / uploads
    finally:
        on.stop()
        off.stop()


CHILD = """
import io, resource, sys, time
sys.path[:0] = [{root!r}]
import imgproxy
imgproxy.heif_support()
from pathlib import Path
data = Path({path!r}).read_bytes()
def hwm():  # VmHWM: ru_maxrss would carry the parent's peak across exec
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
base = hwm()
start = time.perf_counter(); cpu = time.process_time()
facts = imgproxy.inspect_upload(data, len(data), imgproxy.DEFAULT_FORMATS, 50_000_000)
jpeg = imgproxy.heif_to_jpeg(data)
print(time.perf_counter() - start, time.process_time() - cpu, base, hwm(), len(jpeg))
"""


async def loop_stalls_during_upload(config_path: Path, heic: bytes) -> tuple[float, float]:
    """(upload seconds, longest event-loop stall in ms) for one HEIC upload to a running server."""
    from aiohttp import ClientSession, web
    app = imgproxy.create_app(imgproxy.load_config(config_path))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    worst, running = 0.0, True

    async def ticker() -> None:
        nonlocal worst
        loop = asyncio.get_running_loop()
        while running:
            before = loop.time()
            await asyncio.sleep(0.005)
            worst = max(worst, loop.time() - before - 0.005)

    tick = asyncio.create_task(ticker())
    start = time.perf_counter()
    async with ClientSession() as session:
        async with session.put(f"http://127.0.0.1:{port}/upload/IMG.heic", data=heic,
                               headers={"Authorization": "Basic YWxpY2U6YWxpY2UxMjM="}) as resp:
            assert resp.status in (200, 201), await resp.text()
    took = time.perf_counter() - start
    running = False
    await tick
    await runner.cleanup()
    return took, worst * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--no-heic", action="store_true", help="only the JPEG figures")
    args = parser.parse_args()
    Image.init()
    picture = phone_picture()
    tagged, clean = phone_jpeg(picture)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        rows = [compare("phone JPEG with metadata", tagged, args.repeat, tmp),
                compare("same JPEG without metadata", clean, args.repeat, tmp)]
        for row in rows:
            print(json.dumps(row))
        spent = {}
        for label, work in (("walk + end-of-scan search", lambda: imgproxy.metadata_cuts(tagged, "JPEG")),
                            ("MD5 of the stored bytes", lambda: hashlib.md5(clean).digest())):
            start = time.process_time()
            for _ in range(10):
                work()
            spent[label + " (ms)"] = round((time.process_time() - start) * 100, 1)
        print(json.dumps({"case": "where the strip time goes, 5 MB JPEG", **spent}))
        for name, data in (("phone JPEG with metadata", tagged), ("same JPEG without metadata", clean)):
            where = tmp / name.split()[0]
            where.mkdir()
            on, off = server_cpu(data, args.uploads, where)
            print(json.dumps({"case": f"server CPU per upload: {name}", "cpu_off_ms": round(off * 1000, 1),
                              "cpu_on_ms": round(on * 1000, 1), "ratio": round(on / off, 3)}))
        if args.no_heic:
            return
        if not imgproxy.heif_support():
            print(json.dumps({"case": "HEIC", "skipped": "pillow-heif is not installed"}))
            return
        heic_path = tmp / "IMG.heic"
        picture.resize((4032, 3024)).save(heic_path, "HEIF", quality=90, exif=gps_exif().tobytes())
        child = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), path=str(heic_path))],
                               capture_output=True, text=True, check=True)
        wall, cpu, base, peak, size = child.stdout.split()
        print(json.dumps({"case": "HEIC 12 MP -> JPEG (check + convert)", "heic_bytes": heic_path.stat().st_size,
                          "jpeg_bytes": int(size), "wall_s": round(float(wall), 2), "cpu_s": round(float(cpu), 2),
                          "peak_rss_mb": round(int(peak) / 1024), "rss_growth_mb": round((int(peak) - int(base)) / 1024)}))
        config = tmp / "config.json"
        config.write_text(json.dumps({"server": {"data_dir": str(tmp / "data")},
                                      "cleanup": {"enable": False},
                                      "users": [{"username": "alice", "password": "alice123"}]}))
        took, stall = asyncio.run(loop_stalls_during_upload(config, heic_path.read_bytes()))
        print(json.dumps({"case": "HEIC upload to a running server", "wall_s": round(took, 2),
                          "longest_loop_stall_ms": round(stall, 1)}))


if __name__ == "__main__":
    main()
