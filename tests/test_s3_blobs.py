"""S3Blobs (imgproxy.py, storage chapter) against a real SeaweedFS: the `s3_engine` fixture.

Every test talks to the real store; the checks of what landed in the bucket use
a separate aiobotocore client, not the class under test.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

import imgproxy
from conftest import ROOT, corpus_file

aiobotocore = pytest.importorskip("aiobotocore", reason="the S3 backend needs aiobotocore: pip install aiobotocore")
from aiobotocore.config import AioConfig  # noqa: E402
from aiobotocore.session import get_session  # noqa: E402

MB = 1024 * 1024


def new_blobs(engine, bucket: str, prefix: str = "", **overrides) -> imgproxy.S3Blobs:
    settings = {"endpoint": engine.endpoint, "bucket": bucket, "region": engine.region, "prefix": prefix,
                "access_key_id": engine.access_key, "secret_access_key": engine.secret_key, **overrides}
    return imgproxy.S3Blobs(**settings)


@pytest.fixture
async def bucket(s3_engine) -> str:
    return await asyncio.to_thread(s3_engine.new_bucket)


@pytest.fixture
async def blobs(s3_engine, bucket):
    store = new_blobs(s3_engine, bucket)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def raw(s3_engine):
    """An independent client, to look at what S3Blobs left in the bucket."""
    config = AioConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1})
    async with get_session().create_client(
            "s3", endpoint_url=s3_engine.endpoint, region_name=s3_engine.region, config=config,
            aws_access_key_id=s3_engine.access_key, aws_secret_access_key=s3_engine.secret_key) as client:
        yield client


def random_file(path: Path, size: int) -> str:
    """Incompressible bytes written in 1 MB pieces; returns their MD5."""
    digest = hashlib.md5()
    with open(path, "wb") as f:
        for at in range(0, size, MB):
            piece = os.urandom(min(MB, size - at))
            digest.update(piece)
            f.write(piece)
    return digest.hexdigest()


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(MB), b""):
            digest.update(piece)
    return digest.hexdigest()


async def collect(pieces) -> list[bytes]:
    return [piece async for piece in pieces]


# ---- optional dependency ---------------------------------------------------------

def test_import_imgproxy_does_not_load_aiobotocore():
    probe = ("import sys; import imgproxy; "
             "print(sorted(m for m in ('aiobotocore', 'botocore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_open_without_aiobotocore_names_the_package():
    # A child where aiobotocore cannot be imported, as on a machine without it.
    probe = ("import asyncio, sys; sys.modules['aiobotocore'] = None; import imgproxy\n"
             "blobs = imgproxy.S3Blobs('http://127.0.0.1:9', 'b')\n"
             "try:\n    asyncio.run(blobs.open())\n"
             "except imgproxy.ConfigError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ('storage.backend is "s3" but aiobotocore is not installed: '
                                  "pip install aiobotocore")


@pytest.mark.parametrize("endpoint", ["http://user:secret@127.0.0.1:9000", "127.0.0.1:9000",
                                      "ftp://127.0.0.1", "http://127.0.0.1:9000/bucket"],
                         ids=["credentials", "no-scheme", "ftp", "path"])
def test_endpoint_must_be_a_plain_url(endpoint):
    with pytest.raises(imgproxy.ConfigError, match=r"^storage\.endpoint: "):
        imgproxy.S3Blobs(endpoint, "b")


# ---- writing and reading ----------------------------------------------------------

async def test_corpus_image_round_trip_with_headers(blobs, raw, bucket):
    source = corpus_file("testorig.jpg")
    key = "30/16/3016112edb6ff1a7af3c2c0093df75a4.jpg"
    await blobs.put_file(key, source, "image/jpeg", "public, max-age=600, immutable")

    assert await blobs.read(key) == source.read_bytes()
    assert await blobs.size(key) == source.stat().st_size
    head = await raw.head_object(Bucket=bucket, Key=key)
    assert head["ContentType"] == "image/jpeg"
    assert head["CacheControl"] == "public, max-age=600, immutable"
    assert head["ETag"].strip('"') == hashlib.md5(source.read_bytes()).hexdigest()


async def test_a_body_cut_off_by_the_store_is_a_debug_line_not_a_traceback(blobs, caplog):
    """aiohttp writes a request body in a task of its own; when the store drops the
    connection, that task's error is never retrieved. S3Blobs.open() installs a loop
    handler that makes it one debug line; any other lost task error still goes to
    asyncio's own handler, traceback and all."""
    from aiohttp import ClientOSError
    assert asyncio.get_running_loop().get_exception_handler() is imgproxy._quiet_lost_body_writes

    class ClientRequest:  # the qualified name of aiohttp's body writer
        async def write_bytes(self):
            raise ClientOSError(104, "Connection reset by peer")

    async def something_of_ours():
        raise ConnectionResetError("a bug of ours")

    caplog.set_level(logging.DEBUG)
    tasks = [asyncio.ensure_future(ClientRequest().write_bytes()), asyncio.ensure_future(something_of_ours())]
    await asyncio.sleep(0.01)
    del tasks  # never retrieved: asyncio reports them when they are collected
    gc.collect()
    await asyncio.sleep(0.01)
    reported = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert len(reported) == 1 and "a bug of ours" in str(reported[0].exc_info[1]), reported


async def test_put_bytes_round_trip_without_cache_control(blobs, raw, bucket):
    data = corpus_file("iss634.webp").read_bytes()
    await blobs.put_bytes("variants/ab/cd/x-320.webp", data, "image/webp")

    assert b"".join(await collect(blobs.stream("variants/ab/cd/x-320.webp"))) == data
    head = await raw.head_object(Bucket=bucket, Key="variants/ab/cd/x-320.webp")
    assert head["ContentType"] == "image/webp"
    assert "CacheControl" not in head


async def test_prefix_is_added_to_keys_and_removed_in_listings(s3_engine, bucket, raw):
    store = new_blobs(s3_engine, bucket, prefix="site-a/")
    await store.open()
    try:
        await store.put_bytes("ab/cd/one.png", b"1", "image/png")
        listed = await raw.list_objects_v2(Bucket=bucket)
        assert [o["Key"] for o in listed["Contents"]] == ["site-a/ab/cd/one.png"]
        assert [key async for key, _, _ in store.list()] == ["ab/cd/one.png"]
    finally:
        await store.close()


async def test_multipart_upload_of_40_mb_streams_from_the_file(blobs, raw, bucket, tmp_path):
    source = tmp_path / "big.bin"
    size = 40 * MB
    md5 = random_file(source, size)

    tracemalloc.start()
    try:
        await blobs.put_file("big/one.bin", source, "application/octet-stream")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Parts are read from the file as the socket takes them: a few 64 KB pieces
    # per part in flight, not parts (8 MB each) or the file.
    assert peak < size / 8, f"peak Python memory {peak / MB:.1f} MB while uploading {size / MB:.0f} MB"

    head = await raw.head_object(Bucket=bucket, Key="big/one.bin")
    parts = -(-size // imgproxy.S3_PART_SIZE)
    assert head["ETag"].strip('"').endswith(f"-{parts}"), head["ETag"]  # it was a multipart upload
    assert head["ContentLength"] == size
    copy = tmp_path / "copy.bin"
    await blobs.download("big/one.bin", copy)
    assert file_md5(copy) == md5
    assert (await raw.list_multipart_uploads(Bucket=bucket)).get("Uploads", []) == []


async def test_cancelled_multipart_upload_leaves_no_parts_and_no_object(blobs, raw, bucket, tmp_path):
    source = tmp_path / "big.bin"
    random_file(source, 40 * MB)
    upload = asyncio.create_task(blobs.put_file("big/cancelled.bin", source, "application/octet-stream"))

    # Cancel once the store holds a part: the upload is really half done.
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "the multipart upload stored no part within 30 s"
        assert not upload.done(), "the upload ended before it could be cancelled"
        uploads = (await raw.list_multipart_uploads(Bucket=bucket)).get("Uploads", [])
        if uploads and (await raw.list_parts(Bucket=bucket, Key="big/cancelled.bin",
                                             UploadId=uploads[0]["UploadId"])).get("Parts"):
            break
        await asyncio.sleep(0.02)
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert (await raw.list_multipart_uploads(Bucket=bucket)).get("Uploads", []) == []
    assert await blobs.size("big/cancelled.bin") is None


# ---- ranges -----------------------------------------------------------------------

@pytest.fixture
async def numbered(blobs) -> bytes:
    data = bytes(i % 251 for i in range(300_000))
    await blobs.put_bytes("r/numbered.bin", data, "application/octet-stream")
    return data


@pytest.mark.parametrize(("start", "end"), [(0, 0), (1000, 199_999), (299_990, None), (299_999, 299_999),
                                            (0, None), (299_000, 10**9)],
                         ids=["first-byte", "middle", "tail", "last-byte", "whole", "end-past-size"])
async def test_range_reads(blobs, numbered, start, end):
    pieces = await collect(blobs.stream("r/numbered.bin", start, end))
    expected = numbered[start:None if end is None else end + 1]
    assert b"".join(pieces) == expected
    assert all(len(p) <= imgproxy.S3_STREAM_CHUNK for p in pieces)


@pytest.mark.parametrize(("start", "end"), [(300_000, None), (400_000, 500_000), (10, 5), (-1, None)],
                         ids=["start-at-size", "past-end", "reversed", "negative"])
async def test_unsatisfiable_range_is_a_clear_error(blobs, numbered, start, end):
    with pytest.raises(ValueError, match="r/numbered.bin"):
        await collect(blobs.stream("r/numbered.bin", start, end))


async def test_stream_stopped_early_gives_its_connection_back(blobs, numbered):
    for _ in range(3 * imgproxy.S3_POOL_CONNECTIONS):  # would exhaust the pool if any leaked
        async with contextlib.aclosing(blobs.stream("r/numbered.bin")) as pieces:
            assert len(await anext(pieces)) > 0
    assert b"".join(await collect(blobs.stream("r/numbered.bin"))) == numbered


# ---- absent objects ---------------------------------------------------------------

async def test_absent_keys(blobs, tmp_path):
    assert await blobs.size("no/such.png") is None
    with pytest.raises(FileNotFoundError):
        await blobs.read("no/such.png")
    with pytest.raises(FileNotFoundError):
        await collect(blobs.stream("no/such.png", 10, 20))
    target = tmp_path / "copy.png"
    with pytest.raises(FileNotFoundError):
        await blobs.download("no/such.png", target)
    assert not target.exists()
    await blobs.delete(["no/such.png"])  # fine
    assert [entry async for entry in blobs.list("no/")] == []


# ---- listing and deleting ---------------------------------------------------------

async def put_tiny(blobs, keys: list[str], concurrency: int = 32) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(key: str) -> None:
        async with gate:
            await blobs.put_bytes(key, key.encode(), "text/plain")

    await asyncio.gather(*(one(k) for k in keys))


async def test_list_walks_every_page(blobs):
    keys = sorted(f"ab/{i:02x}/{i:032x}.png" for i in range(23))
    await put_tiny(blobs, keys + ["cd/00/other.png"])
    began = time.time()
    blobs.list_page_size = 5  # 5 pages for the 23 under ab/

    listed = [entry async for entry in blobs.list("ab/")]
    assert [key for key, _, _ in listed] == keys
    assert [size for _, size, _ in listed] == [len(k) for k in keys]
    assert all(began - 120 < modified < began + 120 for _, _, modified in listed)
    assert len([entry async for entry in blobs.list()]) == 24


async def test_delete_goes_in_batches_and_ignores_absent_keys(blobs):
    keys = [f"d/{i:04d}.txt" for i in range(imgproxy.S3_DELETE_BATCH + 37)]
    await put_tiny(blobs, keys)
    listed = [key async for key, _, _ in blobs.list("d/")]  # over a full page: two of them
    assert listed == keys

    await blobs.delete(keys[:5] + ["d/absent-1.txt"] + keys[5:] + ["d/absent-2.txt"])
    assert [key async for key, _, _ in blobs.list("d/")] == []


# ---- a store that refuses us or is gone --------------------------------------------

async def test_wrong_secret_key_is_a_config_error_without_the_secret(s3_engine, bucket):
    wrong = "not-" + s3_engine.secret_key
    store = new_blobs(s3_engine, bucket, secret_access_key=wrong)
    with pytest.raises(imgproxy.ConfigError, match=r"^storage\.access_key_id: .*refused .*403") as failure:
        await store.open()
    assert wrong not in str(failure.value) and wrong not in repr(store)
    assert "\n" not in str(failure.value)


async def test_missing_bucket_is_a_config_error(s3_engine):
    store = new_blobs(s3_engine, "no-such-bucket-here")
    with pytest.raises(imgproxy.ConfigError, match=r'^storage\.bucket: no bucket "no-such-bucket-here"'):
        await store.open()


async def test_unreachable_endpoint_is_a_config_error(s3_engine, unused_tcp_port):
    store = new_blobs(s3_engine, "b", endpoint=f"http://127.0.0.1:{unused_tcp_port}")
    began = time.monotonic()
    with pytest.raises(imgproxy.ConfigError, match=r"^storage\.endpoint: cannot reach"):
        await store.open()
    assert time.monotonic() - began < 15


async def test_stopped_store_is_unavailable_quickly_then_recovers(s3_engine, blobs, tmp_path):
    await blobs.put_bytes("s/kept.txt", b"kept", "text/plain")
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    operations = {
        "size": lambda: blobs.size("s/kept.txt"),
        "read": lambda: blobs.read("s/kept.txt"),
        "stream": lambda: collect(blobs.stream("s/kept.txt", 1, 2)),
        "download": lambda: blobs.download("s/kept.txt", tmp_path / "copy.txt"),
        "put_bytes": lambda: blobs.put_bytes("s/new.txt", b"new", "text/plain"),
        "put_file": lambda: blobs.put_file("s/new.bin", small, "application/octet-stream"),
        "list": lambda: collect(blobs.list("s/")),
        "delete": lambda: blobs.delete(["s/kept.txt"]),
    }
    big = tmp_path / "big.bin"
    random_file(big, 24 * MB)
    await blobs.put_file("s/big.bin", big, "application/octet-stream")
    in_flight = blobs.stream("s/big.bin")
    assert await anext(in_flight)

    await asyncio.to_thread(s3_engine.stop)
    try:
        # A GET the store cut halfway fails the same way, not with aiohttp's own errors.
        with pytest.raises(imgproxy.StoreUnavailable):
            await asyncio.wait_for(collect(in_flight), 30)
        for name, operation in operations.items():
            began = time.monotonic()
            with pytest.raises(imgproxy.StoreUnavailable) as failure:
                await asyncio.wait_for(operation(), 30)
            took = time.monotonic() - began
            message = str(failure.value)
            assert took < 5, f"{name} took {took:.1f}s to give up"  # 3 tries, <= 3 s of backoff
            assert s3_engine.endpoint in message and "\n" not in message
            assert s3_engine.secret_key not in message and s3_engine.access_key not in message
        assert not (tmp_path / "copy.txt").exists()
    finally:
        await asyncio.to_thread(s3_engine.start)
    # The same client works again once the store is back: nothing was lost.
    assert await blobs.read("s/kept.txt") == b"kept"
    await blobs.put_file("s/new.bin", small, "application/octet-stream")
    assert await blobs.size("s/new.bin") == 1000


# ---- the store checks the bytes it gets ---------------------------------------------

@pytest.mark.parametrize("size", [300_000, 20 * MB], ids=["single-put", "multipart"])
async def test_bytes_changed_on_the_way_are_refused_and_leave_nothing(blobs, raw, bucket, tmp_path,
                                                                     monkeypatch, size):
    # Content-MD5 is computed from the file before sending; flip one byte of what is
    # then sent (of the second part, for a multipart upload) and the store must refuse it.
    source = tmp_path / "file.bin"
    random_file(source, size)
    sent = imgproxy._FileSlice.read
    victim = min(size - 1, imgproxy.S3_PART_SIZE + 10)

    def corrupting_read(self, n=-1):
        at = self._offset + self._pos
        data = sent(self, n)
        if at <= victim < at + len(data):
            i = victim - at
            data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
        return data

    monkeypatch.setattr(imgproxy._FileSlice, "read", corrupting_read)
    with pytest.raises(imgproxy.StoreUnavailable, match="BadDigest"):
        await blobs.put_file("bad/file.bin", source, "application/octet-stream")
    monkeypatch.undo()

    assert await blobs.size("bad/file.bin") is None
    assert (await raw.list_multipart_uploads(Bucket=bucket)).get("Uploads", []) == []
