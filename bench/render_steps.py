#!/usr/bin/env python3
"""Where the CPU of one first render goes: a JPEG to a 640 px variant, step by step.

    python3 bench/render_steps.py [--repeats 5] [--photo FILE ...]

For a synthetic 12 MP JPEG (bench/variants.py's photo_jpeg) and every --photo
file (real ones: bench/README.md, "Variants"), the median thread CPU time
(time.thread_time) over --repeats rounds, in this process, of:

- the full-size decode (the reference's input) and the draft decode at the
  DCT scale Pillow picks for 640 px (what imgproxy.render_variant does);
- the resize of the draft-decoded image to 640 px wide with LANCZOS, BICUBIC
  and BILINEAR, all with reducing_gap=3.0 so that only the filter differs;
- WebP encodes at quality 80 with method 0, 1, 2 and 4 (of the LANCZOS
  result), and AVIF at quality 60, speed 8 if this Pillow writes AVIF;
- `imgproxy.render_variant(path, 640, "webp", 10**9)` whole.

"MAD" is a sharpness/fidelity proxy: the mean absolute difference per
channel (0-255) between the 640 px result (for encodes: the decoded file)
and a reference made by a full-size decode and a LANCZOS resize without
draft or reducing_gap. Lower is closer. libavif encodes in its own threads,
so AVIF also shows the process CPU time.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageChops, ImageStat, features

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import imgproxy  # noqa: E402
from variants import photo_jpeg  # noqa: E402

WIDTH = 640
FILTERS = {"LANCZOS": Image.Resampling.LANCZOS, "BICUBIC": Image.Resampling.BICUBIC,
           "BILINEAR": Image.Resampling.BILINEAR}
WEBP_METHODS = (0, 1, 2, 4)


def mean_abs_difference(image: Image.Image, reference: Image.Image) -> float:
    diff = ImageChops.difference(image.convert("RGB"), reference)
    return statistics.fmean(ImageStat.Stat(diff).mean)


def decode(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    if draft_size is not None:
        im.draft(im.mode, draft_size)
    im.load()
    return im


def encode(frame: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    frame.save(out, fmt, **options)
    return out.getvalue()


def steps_for(path: Path, repeats: int) -> tuple[str, list[tuple[str, str, str, str]]]:
    """A one-line description of the JPEG and its rows: (step, CPU ms, bytes, MAD).

    The steps run in rounds (each step once per round), so a burst of outside
    load slows one round of every step rather than all the runs of one step.
    """
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        width, height, progressive = im.width, im.height, bool(im.info.get("progressive"))
    target = (min(WIDTH, width), max(1, round(height * min(WIDTH, width) / width)))
    reference = decode(data).convert("RGB").resize(target, Image.Resampling.LANCZOS)
    drafted = decode(data, target)
    scale = round(width / drafted.width)
    frame = drafted.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    steps: dict[str, Callable[[], Any]] = {
        "decode full size (the reference's input)": lambda: decode(data),
        f"draft decode 1/{scale} ({drafted.width}×{drafted.height})": lambda: decode(data, target),
    }
    for name, resample in FILTERS.items():
        steps[f"resize to {target[0]}×{target[1]} {name}, reducing_gap=3.0"] = (
            lambda resample=resample: drafted.resize(target, resample, reducing_gap=3.0))
    for method in WEBP_METHODS:
        steps[f"WebP q80 method {method}"] = lambda method=method: encode(frame, "WEBP", quality=80, method=method)
    avif = "AVIF q60 speed 8"
    if features.check("avif"):
        steps[avif] = lambda: encode(frame, "AVIF", quality=60, speed=8)
    steps["imgproxy.render_variant(path, 640, 'webp') whole"] = (
        lambda: imgproxy.render_variant(path, WIDTH, "webp", 10**9))
    thread_cpu: dict[str, list[float]] = {name: [] for name in steps}
    process_cpu: dict[str, list[float]] = {name: [] for name in steps}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, step in steps.items():
            thread0, process0 = time.thread_time(), time.process_time()
            results[name] = step()
            thread_cpu[name].append(time.thread_time() - thread0)
            process_cpu[name].append(time.process_time() - process0)
    rows = []
    for name in steps:
        result, label = results[name], name
        if name == avif:  # libavif encodes in threads of its own, which thread_time misses
            label += f" (process CPU {statistics.median(process_cpu[name]) * 1000:.1f} ms)"
        if isinstance(result, bytes):
            size, mad = f"{len(result):,}", mean_abs_difference(Image.open(io.BytesIO(result)), reference)
        else:
            size, mad = "", None if name.startswith(("decode", "draft")) else mean_abs_difference(result, reference)
        rows.append((label, f"{statistics.median(thread_cpu[name]) * 1000:.1f}", size,
                     "" if mad is None else f"{mad:.2f}"))
    if avif not in steps:
        rows.insert(-1, (avif, "Pillow does not write AVIF", "", ""))
    kind = "progressive" if progressive else "baseline (not progressive)"
    about = (f"**{path.name}**: {width}×{height}, {len(data) / 1e6:.1f} MB, {kind} JPEG; "
             f"draft scale 1/{scale} for {target[0]} px")
    return about, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs per step; the median is printed")
    ap.add_argument("--photo", action="append", type=Path, default=[], metavar="FILE",
                    help="a JPEG measured after the synthetic one (repeatable)")
    args = ap.parse_args(argv)
    for photo in args.photo:
        if not photo.is_file():
            raise SystemExit(f"--photo {photo}: no such file")
    command = " ".join(["python3 bench/render_steps.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `{command}`")
    print(f"Pillow {Image.__version__}, libjpeg-turbo {features.version('libjpeg_turbo')}, "
          f"libwebp {features.version('webp')}, libavif {features.version('avif')}; "
          f"thread CPU ms, median of {args.repeats}.")
    with tempfile.TemporaryDirectory(prefix="imgproxy-steps-") as tmp:
        synthetic = Path(tmp) / "synthetic-12MP.jpg"
        synthetic.write_bytes(photo_jpeg(0))
        imgproxy.render_variant(synthetic, WIDTH, "webp", 10**9)  # imports Pillow's plugins untimed
        for path in [synthetic, *args.photo]:
            about, rows = steps_for(path, args.repeats)
            print(f"\n{about}\n")
            print("| step | CPU ms | bytes | MAD vs reference |\n|---|---|---|---|")
            for row in rows:
                print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
