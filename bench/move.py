"""Moving house: what `imgproxy.py move` costs next to a bare copy of the same bytes.

    python3 bench/move.py [--images 1000] [--kb 100]

Starts the tests' real engines (tests/engines.py: SeaweedFS and a throwaway
PostgreSQL), makes a files + SQLite installation of `images` distinct files of
`kb` KB (rows written straight into SQLite: the move does not look inside the
bytes), then times, in one run:
1. move files+SQLite -> S3+PostgreSQL, against the floor: the same files PUT with
   imgproxy's S3Blobs.put_file, MOVE_CONCURRENCY at a time, nothing verified;
2. the same move again (everything already there: each object read back and hashed);
3. move back S3+PostgreSQL -> files+SQLite, against the floor: every object
   downloaded with S3Blobs.download, MOVE_CONCURRENCY at a time.
Prints ratios measured in this run. Needs `weed`, PostgreSQL, aiobotocore, asyncpg.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import imgproxy  # noqa: E402
from engines import PgEngine, S3Engine, find_pg_bindir, find_weed  # noqa: E402


def make_installation(folder: Path, images: int, kb: int) -> list[tuple[str, Path]]:
    data = folder / "data"
    (data / "uploads").mkdir(parents=True)
    db = sqlite3.connect(data / "images.db")
    db.executescript(imgproxy.SCHEMA)
    imgproxy.add_source_md5(db)
    now = time.time()
    made = []
    for i in range(images):
        body = os.urandom(kb * 1024)
        md5 = hashlib.md5(body).hexdigest()
        path = data / "uploads" / md5[:2] / md5[2:4] / f"{md5}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        db.execute(f"INSERT INTO images ({imgproxy.ROW_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,0,?,?,NULL)",
                   (md5, "png", "PNG", "image/png", f"{i}.png", len(body), 1, 1, now, now + 86400))
        db.execute("INSERT INTO holds VALUES (?, 'bob', ?)", (md5, now))
        made.append((md5, path))
    db.commit()
    db.close()
    return made


def config(folder: Path, name: str, **sections) -> Path:
    path = folder / f"{name}.json"
    raw = {"server": {"data_dir": str(folder / f"{name}-data")}, "users": [], **sections}
    path.write_text(json.dumps(raw))
    return path


def timed_move(source: Path, target: Path) -> tuple[float, str]:
    began = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "imgproxy.py"), "move", "--config", str(source),
                             "--to", str(target)], capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"move failed:\n{result.stdout}\n{result.stderr}")
    return seconds, result.stdout.strip().splitlines()[-1]


async def bare_puts(s3: S3Engine, bucket: str, files: list[tuple[str, Path]]) -> float:
    blobs = imgproxy.S3Blobs(s3.endpoint, bucket, s3.region, "", s3.access_key, s3.secret_key)
    await blobs.open()
    slots = asyncio.Semaphore(imgproxy.MOVE_CONCURRENCY)

    async def put(md5: str, path: Path) -> None:
        async with slots:
            await blobs.put_file(imgproxy.image_key(md5, "png"), path, "image/png")

    began = time.perf_counter()
    await asyncio.gather(*(put(m, p) for m, p in files))
    seconds = time.perf_counter() - began
    await blobs.close()
    return seconds


async def bare_downloads(s3: S3Engine, bucket: str, files: list[tuple[str, Path]], into: Path) -> float:
    blobs = imgproxy.S3Blobs(s3.endpoint, bucket, s3.region, "", s3.access_key, s3.secret_key)
    await blobs.open()
    into.mkdir()
    slots = asyncio.Semaphore(imgproxy.MOVE_CONCURRENCY)

    async def get(md5: str) -> None:
        async with slots:
            await blobs.download(imgproxy.image_key(md5, "png"), into / md5)

    began = time.perf_counter()
    await asyncio.gather(*(get(m) for m, _ in files))
    seconds = time.perf_counter() - began
    await blobs.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--kb", type=int, default=100)
    args = parser.parse_args()
    weed, bindir = find_weed(), find_pg_bindir()
    if weed is None or bindir is None:
        raise SystemExit("needs SeaweedFS (`weed`) and PostgreSQL (initdb, pg_ctl): see tests/engines.py")
    s3 = S3Engine.launch(weed)
    pg = PgEngine.launch(bindir)
    try:
        with tempfile.TemporaryDirectory(prefix="imgproxy-bench-move-") as tmp:
            folder = Path(tmp)
            files = make_installation(folder / "src", args.images, args.kb)
            source = folder / "source.json"
            source.write_text(json.dumps({"server": {"data_dir": str(folder / "src" / "data")}, "users": []}))
            cluster = config(folder, "cluster", storage=s3.storage_config(s3.new_bucket()),
                             database={"url": pg.new_database()})
            back = config(folder, "back")
            floor_put = asyncio.run(bare_puts(s3, s3.new_bucket(), files))
            move_there, line_there = timed_move(source, cluster)
            again, line_again = timed_move(source, cluster)
            floor_get = asyncio.run(bare_downloads(s3, imgproxy.load_config(cluster).storage.bucket,
                                                   files, folder / "floor-get"))
            move_back, line_back = timed_move(cluster, back)
    finally:
        s3.close()
        pg.close()
    mb = args.images * args.kb / 1024
    print(f"{args.images} images of {args.kb} KB ({mb:.0f} MB), {imgproxy.MOVE_CONCURRENCY} at a time, "
          f"batches of {imgproxy.MOVE_BATCH}; load average {os.getloadavg()[0]:.2f}")
    print(f"  files+SQLite -> S3+PG   {move_there:6.2f} s ({args.images / move_there:6.0f} images/s)  "
          f"bare PUTs {floor_put:6.2f} s  ratio {move_there / floor_put:.2f}x   [{line_there}]")
    print(f"  again (all there)       {again:6.2f} s ({args.images / again:6.0f} images/s)  "
          f"vs first run {again / move_there:.2f}x   [{line_again}]")
    print(f"  S3+PG -> files+SQLite   {move_back:6.2f} s ({args.images / move_back:6.0f} images/s)  "
          f"bare GETs {floor_get:6.2f} s  ratio {move_back / floor_get:.2f}x   [{line_back}]")


if __name__ == "__main__":
    main()
