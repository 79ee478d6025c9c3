#!/usr/bin/env python3
"""Peak memory and CPU of one upload's decode check, normal files and bombs.

Each file is checked by imgproxy.inspect_image in a child process (address
space capped at 3 GB), which reports the verdict and how much its peak RSS
(VmHWM) grew over the decode; the bound is DECODE_BYTES_PER_PIXEL x max_pixels
+ the file + DECODE_SLACK (264 MB + the file for the default 50 megapixels).

    python3 bench/decode_memory.py [--base DIR] [--only TEXT]

--base DIR runs the same files against another checkout's imgproxy.py too
(e.g. `git archive <commit> | tar -x -C DIR`), for a before/after table.
Takes about a minute; the files are generated (gradients, so they are small).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import helpers  # noqa: E402 - tests/helpers.py: the crafted files and the child runner
import imgproxy  # noqa: E402

MAX_PIXELS = 50_000_000  # the default config


def photo(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Smooth content (compresses like a photo's sky, encodes fast)."""
    gradient = Image.radial_gradient("L").resize(size)
    bands = [gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient.rotate(90)]
    return Image.merge("RGB", bands).convert(mode)


def encoded(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


CASES = {
    "12 MP JPEG (4000x3000, baseline 4:2:0)": lambda: encoded(photo((4000, 3000)), "JPEG", quality=90),
    "12 MP progressive JPEG 4:4:4": lambda: encoded(photo((4000, 3000)), "JPEG", progressive=True,
                                                    subsampling=0),
    "50 MP RGBA PNG (7071x7071, at max_pixels)": lambda: encoded(photo((7071, 7071), "RGBA"), "PNG",
                                                                 compress_level=1),
    "12 MP WebP (4000x3000)": lambda: encoded(photo((4000, 3000)), "WEBP", quality=80),
    "4 MP animated PNG, 3 frames (2000x2000)": lambda: encoded(
        photo((2000, 2000), "RGBA"), "PNG", save_all=True, compress_level=1,
        append_images=[photo((2000, 2000), "RGBA").rotate(90), photo((2000, 2000), "RGBA").rotate(180)]),
    "12 MP AVIF (4000x3000; needs Pillow's AVIF support)": lambda: encoded(photo((4000, 3000)), "AVIF",
                                                                         quality=60, speed=10),
    "24 MP TIFF LZW (6000x4000)": lambda: encoded(photo((6000, 4000)), "TIFF", compression="tiff_lzw"),
    "bomb: GIF, 2nd frame 9000x9000 on a 16x16 screen": lambda: helpers.gif_with_large_second_frame(
        (16, 16), (9000, 9000)),
    "bomb: TIFF, 2nd page 9000x9000": lambda: helpers.tiff_with_huge_later_page((16, 16), (9000, 9000)),
    "bomb: TIFF 64x64 in one 20000x20000 tile": lambda: helpers.tiff_with_huge_tile((64, 64), (20000, 20000)),
    "bomb: ICO saying 16x16 holding a 9000x9000 PNG": lambda: helpers.ico_understating_png(
        (16, 16), (9000, 9000)),
    "bomb: progressive JPEG 4000x3000, 1000 scans": lambda: helpers.progressive_jpeg_with_many_scans(
        (4000, 3000), 1000),
}


def row(name: str, data: bytes, result: dict) -> str:
    verdict = str(result["status"]) + (f" {result['code']}" if result.get("code") else "")
    growth = result["growth_kb"] / 1024
    return f"| {name} | {len(data) / 2**20:.2f} MB | {verdict} | {growth:,.0f} MiB | {result['cpu']:.2f} s |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="another checkout to measure the same files with")
    parser.add_argument("--only", default="", help="only the cases whose name contains this")
    args = parser.parse_args(argv)
    budget = imgproxy.DECODE_BYTES_PER_PIXEL * MAX_PIXELS + imgproxy.DECODE_SLACK
    print(f"max_pixels {MAX_PIXELS:,}; budget {budget / 2**20:,.0f} MiB + the file\n")
    print("| file | size | verdict | peak RSS growth | CPU |" + (" before: verdict, growth, CPU |" if args.base else ""))
    print("|---|---|---|---|---|" + ("---|" if args.base else ""))
    formats = (*imgproxy.DEFAULT_FORMATS, "AVIF")
    for name, make in CASES.items():
        if args.only not in name:
            continue
        data = make()
        line = row(name, data, helpers.decode_in_child(data, MAX_PIXELS, formats=formats))
        if args.base:
            before = helpers.decode_in_child(data, MAX_PIXELS, root=args.base, formats=formats)
            line += (f" {before['status']} {before.get('code') or ''}, {before['growth_kb'] / 1024:,.0f} MiB, "
                     f"{before['cpu']:.2f} s |")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
