"""Test images for the benchmark, generated with Pillow and kept in a cache folder.

Everything is made from random noise (upscaled, so JPEG sizes are realistic),
so every file is distinct. Files already in the cache are reused: a second run
generates nothing. Run alone to prepare the cache:

    python3 bench/gen_data.py --cache /tmp/imgproxy-bench/cache [--quick]
"""
import argparse
import io
import math
import os
import random
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

MiB = 1024 * 1024
HOT_SIZE = 60 * 1024            # the hot GET image
UPLOAD_SIZE = 100 * 1024        # the upload bodies, 800x600
MIXED_MIN, MIXED_MAX = 20 * 1024, 2 * MiB
REFUSED_SIZE = 500 * MiB        # the upload the limit refuses


def noise_image(w: int, h: int, tile: int, seed: int) -> Image.Image:
    """Random noise drawn at 1/tile scale and scaled up: compresses like a photo, not like static."""
    rnd = random.Random(seed)
    tw, th = max(1, w // tile), max(1, h // tile)
    small = Image.frombytes("RGB", (tw, th), rnd.randbytes(tw * th * 3))
    return small.resize((w, h), Image.BILINEAR)


def jpeg_bytes(im: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()


def jpeg_near(target: int, seed: int, tile: int = 4, quality: int = 85, aspect: float = 4 / 3) -> bytes:
    """A JPEG of about `target` bytes: guess the pixel count, then correct once or twice."""
    bpp = 0.37  # bytes per pixel at tile 4, quality 85 (measured)
    data = b""
    for _ in range(3):
        pixels = target / bpp
        h = max(8, int(math.sqrt(pixels / aspect)))
        w = max(8, int(h * aspect))
        data = jpeg_bytes(noise_image(w, h, tile, seed), quality)
        if abs(len(data) - target) < target * 0.05:
            break
        bpp = len(data) / (w * h)
    return data


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _make_upload(args: tuple[str, int]) -> None:
    path, seed = args
    # tile 8 at quality 82 lands near 100 KB at 800x600
    _write(Path(path), jpeg_bytes(noise_image(800, 600, 8, seed), 82))


def _make_mixed(args: tuple[str, int, int]) -> None:
    path, target, seed = args
    _write(Path(path), jpeg_near(target, seed))


def mixed_sizes(n: int) -> list[int]:
    """Log-uniform sizes between 20 KB and 2 MB, the same list every run."""
    rnd = random.Random(7)
    lo, hi = math.log(MIXED_MIN), math.log(MIXED_MAX)
    return [int(math.exp(rnd.uniform(lo, hi))) for _ in range(n)]


def big_png(path: Path, limit: int, seed: int) -> None:
    """The largest noisy PNG that fits under `limit` bytes (noise does not compress)."""
    w = 3000
    rows = (limit - 4096) // (w * 3 + 1)
    rnd = random.Random(seed)
    while True:
        im = Image.frombytes("RGB", (w, rows), rnd.randbytes(w * rows * 3))
        out = io.BytesIO()
        im.save(out, "PNG", compress_level=1)
        if out.tell() <= limit:
            _write(path, out.getvalue())
            return
        rows -= max(1, (out.tell() - limit) // (w * 3) + 1)


def big_bmp(path: Path, limit: int, seed: int) -> None:
    """The largest 24-bit BMP under `limit` bytes (decoding it is a copy: transport-bound)."""
    w = 3000                       # 9000 bytes a row, already a multiple of 4
    rows = (limit - 54) // (w * 3)
    rnd = random.Random(seed)
    im = Image.frombytes("RGB", (w, rows), rnd.randbytes(w * rows * 3))
    out = io.BytesIO()
    im.save(out, "BMP")
    assert out.tell() <= limit
    _write(path, out.getvalue())


def refused_file(path: Path) -> None:
    """500 MiB that starts like a PNG; sparse, so it costs no disk and reads fast."""
    if path.exists() and path.stat().st_size == REFUSED_SIZE:
        return
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR")
        f.truncate(REFUSED_SIZE)


def ensure(cache: Path, n_mixed: int, n_uploads: int, n_big: int, upload_limit: int,
           log=print) -> dict:
    """Make whatever is missing in `cache`; returns the paths to use."""
    t0 = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "mixed").mkdir(exist_ok=True)
    (cache / "uploads").mkdir(exist_ok=True)
    hot = cache / "hot.jpg"
    if not hot.exists():
        _write(hot, jpeg_near(HOT_SIZE, seed=1))
    mixed = [cache / "mixed" / f"m{i:04d}.jpg" for i in range(n_mixed)]
    uploads = [cache / "uploads" / f"u{i:05d}.jpg" for i in range(n_uploads)]
    todo_mixed = [(str(p), s, 1000 + i) for i, (p, s) in enumerate(zip(mixed, mixed_sizes(n_mixed)))
                  if not p.exists()]
    todo_uploads = [(str(p), 100_000 + i) for i, p in enumerate(uploads) if not p.exists()]
    if todo_mixed or todo_uploads:
        log(f"generating {len(todo_mixed)} mixed and {len(todo_uploads)} upload images in {cache} ...")
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(_make_mixed, todo_mixed, chunksize=8))
            list(pool.map(_make_upload, todo_uploads, chunksize=64))
    bigs = []
    for i in range(n_big):
        for kind, maker in (("png", big_png), ("bmp", big_bmp)):
            p = cache / f"big{i}.{kind}"
            if not p.exists():
                maker(p, upload_limit, seed=9000 + i)
            bigs.append(p)
    refused = cache / "refused-500MiB.bin"
    refused_file(refused)
    if time.monotonic() - t0 > 1:
        log(f"data ready in {time.monotonic() - t0:.0f} s")
    return {"hot": hot, "mixed": mixed, "uploads": uploads,
            "big_png": [p for p in bigs if p.suffix == ".png"],
            "big_bmp": [p for p in bigs if p.suffix == ".bmp"], "refused": refused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--mixed", type=int, default=1000)
    parser.add_argument("--uploads", type=int, default=16000)
    parser.add_argument("--big", type=int, default=3)
    args = parser.parse_args()
    got = ensure(args.cache, args.mixed, args.uploads, args.big, 20 * MiB)
    sizes = [p.stat().st_size for p in got["uploads"][:200]]
    print(f"hot {got['hot'].stat().st_size} B; uploads ~{sum(sizes) // max(1, len(sizes))} B; "
          f"big png {got['big_png'][0].stat().st_size if got['big_png'] else 0} B", file=sys.stderr)


if __name__ == "__main__":
    main()
