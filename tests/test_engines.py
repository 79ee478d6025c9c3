"""The engine fixtures give what they promise, checked with the real drivers:
SeaweedFS through aiobotocore (path-style S3) and PostgreSQL through asyncpg."""
from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

MIB = 1024 * 1024


def s3_client_for(engine, *, secret_key=None, access_key=None):
    aiobotocore_session = pytest.importorskip(
        "aiobotocore.session", reason="aiobotocore is not installed (pip install -r requirements-test.txt)")
    from botocore.config import Config
    return aiobotocore_session.get_session().create_client(
        "s3", endpoint_url=engine.endpoint, region_name=engine.region,
        aws_access_key_id=access_key or engine.access_key,
        aws_secret_access_key=secret_key or engine.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                      connect_timeout=5, read_timeout=30))


@pytest.fixture
async def s3(s3_engine):
    async with s3_client_for(s3_engine) as client:
        yield client


@pytest.fixture
def bucket(s3_engine) -> str:
    return s3_engine.new_bucket()


@pytest.fixture
def asyncpg():
    return pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install -r requirements-test.txt)")


def client_error_code(excinfo) -> tuple[int, str]:
    response = excinfo.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


# ---- S3 (SeaweedFS) ------------------------------------------------------------------

async def test_new_bucket_is_fresh_and_empty(s3, s3_engine):
    first, second = s3_engine.new_bucket(), s3_engine.new_bucket()
    assert first != second
    listed = await s3.list_objects_v2(Bucket=first)
    assert listed["KeyCount"] == 0 and not listed.get("Contents")
    names = {b["Name"] for b in (await s3.list_buckets())["Buckets"]}
    assert {first, second} <= names


async def test_put_get_head_keep_type_cache_control_and_md5_etag(s3, bucket):
    body = os.urandom(70_000)
    await s3.put_object(Bucket=bucket, Key="ab/cd/x.png", Body=body, ContentType="image/png",
                        CacheControl="public, max-age=31536000, immutable")
    got = await s3.get_object(Bucket=bucket, Key="ab/cd/x.png")
    async with got["Body"] as stream:
        assert await stream.read() == body
    assert got["ContentType"] == "image/png"
    assert got["CacheControl"] == "public, max-age=31536000, immutable"
    assert got["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    head = await s3.head_object(Bucket=bucket, Key="ab/cd/x.png")
    assert head["ContentLength"] == len(body) and head["ContentType"] == "image/png"


async def test_range_get_is_206_with_content_range(s3, bucket):
    body = bytes(range(256)) * 40
    await s3.put_object(Bucket=bucket, Key="r.bin", Body=body)
    got = await s3.get_object(Bucket=bucket, Key="r.bin", Range="bytes=100-299")
    async with got["Body"] as stream:
        assert await stream.read() == body[100:300]
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == f"bytes 100-299/{len(body)}"
    suffix = await s3.get_object(Bucket=bucket, Key="r.bin", Range="bytes=-10")
    async with suffix["Body"] as stream:
        assert await stream.read() == body[-10:]
    from botocore.exceptions import ClientError
    with pytest.raises(ClientError) as excinfo:
        await s3.get_object(Bucket=bucket, Key="r.bin", Range=f"bytes={len(body) + 10}-")
    assert client_error_code(excinfo)[0] == 416


async def test_list_objects_v2_pages_with_continuation_token(s3, bucket):
    keys = [f"ab/cd/{i:02d}.jpg" for i in range(7)] + ["variants/zz.webp"]
    for key in keys:
        await s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    seen, token, pages = [], None, 0
    while True:
        page = await s3.list_objects_v2(Bucket=bucket, Prefix="ab/", MaxKeys=3,
                                        **({"ContinuationToken": token} if token else {}))
        pages += 1
        seen += [item["Key"] for item in page.get("Contents", [])]
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert seen == sorted(keys[:7]) and pages == 3
    paginator = s3.get_paginator("list_objects_v2")
    everything = [item["Key"] async for page in paginator.paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
                  for item in page.get("Contents", [])]
    assert sorted(everything) == sorted(keys)


async def test_delete_and_delete_objects(s3, bucket):
    from botocore.exceptions import ClientError
    for key in ("a", "b", "c"):
        await s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    deleted = await s3.delete_object(Bucket=bucket, Key="a")
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(ClientError) as excinfo:
        await s3.get_object(Bucket=bucket, Key="a")
    assert client_error_code(excinfo) == (404, "NoSuchKey")
    again = await s3.delete_object(Bucket=bucket, Key="a")   # deleting what is gone is not an error
    assert again["ResponseMetadata"]["HTTPStatusCode"] == 204
    result = await s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "b"}, {"Key": "c"}, {"Key": "nope"}]})
    assert {d["Key"] for d in result.get("Deleted", [])} >= {"b", "c"} and not result.get("Errors")
    assert (await s3.list_objects_v2(Bucket=bucket))["KeyCount"] == 0


async def test_content_md5_is_checked(s3, bucket):
    import base64
    from botocore.exceptions import ClientError
    body = b"the bytes we mean"
    good = base64.b64encode(hashlib.md5(body).digest()).decode()
    await s3.put_object(Bucket=bucket, Key="m", Body=body, ContentMD5=good)
    bad = base64.b64encode(hashlib.md5(b"other bytes").digest()).decode()
    with pytest.raises(ClientError) as excinfo:
        await s3.put_object(Bucket=bucket, Key="m2", Body=body, ContentMD5=bad)
    assert client_error_code(excinfo) == (400, "BadDigest")
    with pytest.raises(ClientError):
        await s3.head_object(Bucket=bucket, Key="m2")


async def test_if_none_match_star_creates_only(s3, bucket):
    from botocore.exceptions import ClientError
    await s3.put_object(Bucket=bucket, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as excinfo:
        await s3.put_object(Bucket=bucket, Key="once", Body=b"second", IfNoneMatch="*")
    assert client_error_code(excinfo) == (412, "PreconditionFailed")
    got = await s3.get_object(Bucket=bucket, Key="once")
    async with got["Body"] as stream:
        assert await stream.read() == b"first"


async def test_missing_bucket_is_not_created_by_a_put(s3, s3_engine):
    from botocore.exceptions import ClientError
    with pytest.raises(ClientError) as excinfo:
        await s3.put_object(Bucket="never-made-" + s3_engine.new_bucket(), Key="k", Body=b"x")
    assert client_error_code(excinfo) == (404, "NoSuchBucket")


async def test_multipart_upload_of_12_mib(s3, bucket):
    body = os.urandom(12 * MIB)
    upload = await s3.create_multipart_upload(Bucket=bucket, Key="big.bin", ContentType="image/jpeg")
    parts, offset = [], 0
    for number, size in enumerate((5 * MIB, 5 * MIB, 2 * MIB), start=1):
        part = await s3.upload_part(Bucket=bucket, Key="big.bin", UploadId=upload["UploadId"],
                                    PartNumber=number, Body=body[offset:offset + size])
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
        offset += size
    done = await s3.complete_multipart_upload(Bucket=bucket, Key="big.bin", UploadId=upload["UploadId"],
                                              MultipartUpload={"Parts": parts})
    # Like AWS: the ETag of a multipart object is not the MD5 of its bytes.
    assert done["ETag"].strip('"').endswith("-3")
    got = await s3.get_object(Bucket=bucket, Key="big.bin")
    async with got["Body"] as stream:
        assert hashlib.md5(await stream.read()).hexdigest() == hashlib.md5(body).hexdigest()
    assert got["ContentLength"] == len(body) and got["ContentType"] == "image/jpeg"


async def test_aborted_multipart_upload_leaves_no_object(s3, bucket):
    from botocore.exceptions import ClientError
    upload = await s3.create_multipart_upload(Bucket=bucket, Key="half.bin")
    await s3.upload_part(Bucket=bucket, Key="half.bin", UploadId=upload["UploadId"], PartNumber=1,
                         Body=os.urandom(5 * MIB))
    await s3.abort_multipart_upload(Bucket=bucket, Key="half.bin", UploadId=upload["UploadId"])
    with pytest.raises(ClientError) as excinfo:
        await s3.head_object(Bucket=bucket, Key="half.bin")
    assert client_error_code(excinfo)[0] == 404
    assert (await s3.list_objects_v2(Bucket=bucket))["KeyCount"] == 0


@pytest.mark.parametrize("keys, code", [({"secret_key": "not-the-secret"}, "SignatureDoesNotMatch"),
                                         ({"access_key": "AKNOBODY"}, "InvalidAccessKeyId")],
                         ids=["wrong secret", "unknown access key"])
async def test_wrong_keys_get_403(s3_engine, bucket, keys, code):
    from botocore.exceptions import ClientError
    async with s3_client_for(s3_engine, **keys) as intruder:
        with pytest.raises(ClientError) as excinfo:
            await intruder.put_object(Bucket=bucket, Key="intruder", Body=b"x")
        assert client_error_code(excinfo) == (403, code)
        with pytest.raises(ClientError) as excinfo:
            await intruder.list_objects_v2(Bucket=bucket)
        assert client_error_code(excinfo)[0] == 403
    assert s3_engine.request("HEAD", f"/{bucket}/intruder")[0] == 404


def test_unsigned_request_gets_403(s3_engine, bucket):
    import urllib.error
    import urllib.request
    assert s3_engine.request("PUT", f"/{bucket}/public", b"x")[0] == 200
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(f"{s3_engine.endpoint}/{bucket}/public", timeout=10)
    assert excinfo.value.code == 403
    assert b"<Code>AccessDenied</Code>" in excinfo.value.read()


def test_s3_stop_start_keeps_data_and_the_port(s3_engine, bucket):
    endpoint = s3_engine.endpoint
    assert s3_engine.request("PUT", f"/{bucket}/kept", b"still here")[0] == 200
    s3_engine.stop()
    try:
        with pytest.raises(OSError):
            s3_engine.request("GET", f"/{bucket}/kept", timeout=3)
    finally:
        s3_engine.start()
    assert s3_engine.endpoint == endpoint
    assert s3_engine.request("GET", f"/{bucket}/kept") == (200, b"still here")
    assert s3_engine.request("PUT", f"/{bucket}/after", b"new")[0] == 200


def test_s3_crash_and_restart_keeps_acknowledged_writes(s3_engine, bucket):
    for i in range(5):
        assert s3_engine.request("PUT", f"/{bucket}/obj{i}", b"v%d" % i)[0] == 200
    s3_engine.stop(kill=True)
    s3_engine.start()
    for i in range(5):
        assert s3_engine.request("GET", f"/{bucket}/obj{i}") == (200, b"v%d" % i)


# ---- PostgreSQL ----------------------------------------------------------------------

async def test_new_database_connects_with_the_password_only(pg_engine, asyncpg):
    url = pg_engine.new_database()
    assert url.startswith(f"postgresql://{pg_engine.user}:") and f"@127.0.0.1:{pg_engine.port}/" in url
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT current_user") == pg_engine.user
        assert await conn.fetchval("SELECT current_database()") == url.rsplit("/", 1)[1]
        await conn.execute("CREATE TABLE images (md5 text PRIMARY KEY, n int)")
        row = await conn.fetchrow("INSERT INTO images VALUES ('a', 1) ON CONFLICT (md5) DO UPDATE "
                                  "SET n = images.n + 1 RETURNING n")
        assert row["n"] == 1
        assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = 'images'") == 1
    finally:
        await conn.close()
    other = pg_engine.new_database()
    assert other != url
    wrong = url.replace(f":{pg_engine.password}@", ":wrong-password@")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)


async def test_listen_notify_round_trip(pg_engine, asyncpg):
    url = pg_engine.new_database()
    listener, sender = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        received: asyncio.Queue = asyncio.Queue()
        await listener.add_listener("imgproxy", lambda _conn, _pid, channel, payload: received.put_nowait(
            (channel, payload)))
        await sender.execute("SELECT pg_notify('imgproxy', $1)", "delete:0123abcd")
        assert await asyncio.wait_for(received.get(), 5) == ("imgproxy", "delete:0123abcd")
    finally:
        await listener.close()
        await sender.close()


async def test_advisory_lock_between_two_connections(pg_engine, asyncpg):
    url = pg_engine.new_database()
    first, second = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        assert await first.fetchval("SELECT pg_try_advisory_lock(4242)") is True
        assert await second.fetchval("SELECT pg_try_advisory_lock(4242)") is False
        waiting = asyncio.ensure_future(second.fetchval("SELECT pg_advisory_lock(4242)"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        assert await first.fetchval("SELECT pg_advisory_unlock(4242)") is True
        await asyncio.wait_for(waiting, 5)
        assert await first.fetchval("SELECT pg_try_advisory_lock(4242)") is False
    finally:
        await first.close()
        await second.close()
    # A lock dies with its session: a crashed holder never blocks the cluster.
    third = await asyncpg.connect(url)
    try:
        assert await third.fetchval("SELECT pg_try_advisory_lock(4242)") is True
    finally:
        await third.close()


async def test_pg_stop_start_keeps_data_and_the_port(pg_engine, asyncpg):
    url = pg_engine.new_database()
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')")
    await conn.close()
    await asyncio.to_thread(pg_engine.stop)
    try:
        with pytest.raises(OSError):
            await asyncpg.connect(url, timeout=3)
    finally:
        await asyncio.to_thread(pg_engine.start)
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT v FROM kept") == "still here"
    finally:
        await conn.close()


async def test_pg_crash_keeps_committed_rows_and_new_database_restarts_it(pg_engine, asyncpg):
    url = pg_engine.new_database()
    conn = await asyncpg.connect(url)
    # The cluster runs with synchronous_commit=off: a crash may lose the last ~0.6 s of
    # commits. A test that crashes it and counts on its commits turns it back on.
    await conn.execute("SET synchronous_commit = on")
    await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept SELECT generate_series(1, 100)")
    await conn.close()
    await asyncio.to_thread(pg_engine.stop, mode="immediate")
    assert not pg_engine.running
    await asyncio.to_thread(pg_engine.new_database)   # a later test finds it running again
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM kept") == 100
    finally:
        await conn.close()


# ---- an engine that is installed but broken fails loudly ---------------------------

def test_weed_that_exits_fails_with_its_log(tmp_path):
    from engines import EngineError, S3Engine
    broken = tmp_path / "weed"
    broken.write_text("#!/bin/sh\necho 'volume dir is full' >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(EngineError) as excinfo:
        S3Engine.launch(str(broken))
    assert "exited with 3" in str(excinfo.value) and "volume dir is full" in str(excinfo.value)
