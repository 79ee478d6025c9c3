"""HTTP edge cases: conditional requests and ranges answered alike from memory
and from disk (RFC 9110), HEAD /api/db, a data_dir that needs URI escaping,
Expect: 100-continue refusals, aiohttp's own parser refusals, bounded
multipart forms, dropped uploads, and config values at and past their bounds."""
from __future__ import annotations

import asyncio
import base64
import email.utils
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imgproxy
from conftest import ALICE, ROOT, write_config
from helpers import (byte_ranges, noise_png, parse_responses, png_bytes, raw_exchange, raw_request,
                     request_bytes)

BASIC_ALICE = ALICE["Authorization"]
HOUR = 3600


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


# ---- conditional requests and ranges --------------------------------------------
# (id, request headers, method, expected status, expected byte ranges of a 206).
# "{etag}" is the image's ETag, "{lm}" its Last-Modified; "{before}"/"{after}" a
# date an hour earlier/later; "{n}" (and N in spans) the image's size.
CASES = [
    ("plain", {}, "GET", 200, None),
    ("if-match-same", {"If-Match": "{etag}"}, "GET", 200, None),
    ("if-match-star", {"If-Match": "*"}, "GET", 200, None),
    ("if-match-other", {"If-Match": '"0123"'}, "GET", 412, None),
    ("if-match-weak-is-not-strong", {"If-Match": "W/{etag}"}, "GET", 412, None),
    ("if-match-in-list", {"If-Match": '"a", {etag}'}, "GET", 200, None),
    ("if-match-other-head", {"If-Match": '"0123"'}, "HEAD", 412, None),
    ("if-unmodified-since-before", {"If-Unmodified-Since": "{before}"}, "GET", 412, None),
    ("if-unmodified-since-after", {"If-Unmodified-Since": "{after}"}, "GET", 200, None),
    ("if-unmodified-since-ignored-under-if-match", {"If-Match": "{etag}", "If-Unmodified-Since": "{before}"},
     "GET", 200, None),
    ("if-none-match-same", {"If-None-Match": "{etag}"}, "GET", 304, None),
    ("if-none-match-weak", {"If-None-Match": "W/{etag}"}, "GET", 304, None),
    ("if-none-match-star", {"If-None-Match": "*"}, "HEAD", 304, None),
    ("if-none-match-other", {"If-None-Match": '"0123"'}, "GET", 200, None),
    ("if-match-before-if-none-match", {"If-Match": '"0123"', "If-None-Match": "{etag}"}, "GET", 412, None),
    ("if-modified-since-after", {"If-Modified-Since": "{after}"}, "GET", 304, None),
    ("if-modified-since-lm", {"If-Modified-Since": "{lm}"}, "GET", 304, None),
    ("if-modified-since-before", {"If-Modified-Since": "{before}"}, "GET", 200, None),
    ("if-modified-since-ignored-under-if-none-match",
     {"If-None-Match": '"0123"', "If-Modified-Since": "{after}"}, "GET", 200, None),
    ("if-modified-since-garbage", {"If-Modified-Since": "yesterday"}, "GET", 200, None),
    ("range-first-ten", {"Range": "bytes=0-9"}, "GET", 206, [(0, 9)]),
    ("range-open-end", {"Range": "bytes=10-"}, "GET", 206, [(10, "N-1")]),
    ("range-suffix", {"Range": "bytes=-5"}, "GET", 206, [("N-5", "N-1")]),
    ("range-past-end-clamped", {"Range": "bytes=5-99999999"}, "GET", 206, [(5, "N-1")]),
    ("range-suffix-zero", {"Range": "bytes=-0"}, "GET", 416, None),
    ("range-from-end", {"Range": "bytes={n}-"}, "GET", 416, None),
    ("range-reversed-is-ignored", {"Range": "bytes=5-2"}, "GET", 200, None),
    ("range-other-unit-is-ignored", {"Range": "pages=1-2"}, "GET", 200, None),
    ("range-garbage-is-ignored", {"Range": "bytes=a-b"}, "GET", 200, None),
    ("range-two", {"Range": "bytes=0-9,20-29"}, "GET", 206, [(0, 9), (20, 29)]),
    ("range-two-one-satisfiable", {"Range": "bytes=0-9,{n}-"}, "GET", 206, [(0, 9)]),
    ("range-overlapping-is-ignored", {"Range": "bytes=0-9,5-14"}, "GET", 200, None),
    ("range-too-many-is-ignored", {"Range": "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(17))},
     "GET", 200, None),
    ("range-on-head-is-ignored", {"Range": "bytes=0-9"}, "HEAD", 200, None),
    ("if-range-same-etag", {"Range": "bytes=0-9", "If-Range": "{etag}"}, "GET", 206, [(0, 9)]),
    ("if-range-other-etag", {"Range": "bytes=0-9", "If-Range": '"0123"'}, "GET", 200, None),
    ("if-range-weak-etag", {"Range": "bytes=0-9", "If-Range": "W/{etag}"}, "GET", 200, None),
    ("if-range-exact-date", {"Range": "bytes=0-9", "If-Range": "{lm}"}, "GET", 206, [(0, 9)]),
    ("if-range-later-date", {"Range": "bytes=0-9", "If-Range": "{after}"}, "GET", 200, None),
    ("if-range-without-range", {"If-Range": '"0123"'}, "GET", 200, None),
    ("range-under-if-none-match", {"Range": "bytes=0-9", "If-None-Match": "{etag}"}, "GET", 304, None),
]


def fill(value: str, etag: str, lm: str, n: int) -> str:
    lm_ts = email.utils.parsedate_to_datetime(lm).timestamp()
    return (value.replace("{etag}", etag).replace("{lm}", lm).replace("{before}", http_date(lm_ts - HOUR))
            .replace("{after}", http_date(lm_ts + HOUR)).replace("{n}", str(n)))


def expected_spans(spans, n: int):
    def pos(v):
        return v if isinstance(v, int) else n - int(v[2:]) if v.startswith("N-") else v
    return [(pos(a), pos(b)) for a, b in spans]


async def check_case(port: int, md5: str, data: bytes, lm: str, case: tuple) -> None:
    case_id, headers, method, status, spans = case
    n, etag = len(data), f'"{md5}"'
    sent = {k: fill(v, etag, lm, n) for k, v in headers.items()}
    resp = await raw_request(port, method, f"/i/{md5}.png", sent)
    assert resp.status == status, (case_id, resp)
    assert resp.headers["x-content-type-options"] == "nosniff", case_id
    if status in (200, 206, 304):
        assert resp.headers["etag"] == etag and resp.headers["last-modified"] == lm, case_id
        assert resp.headers["accept-ranges"] == "bytes", case_id
    if status == 200:
        assert resp.headers["content-length"] == str(n), case_id
        assert resp.body == (data if method == "GET" else b""), case_id
    if status == 206:
        parts = byte_ranges(resp)
        assert [(a, b) for a, b, _, _ in parts] == expected_spans(spans, n), case_id
        assert all(total == n and part == data[a:b + 1] for a, b, total, part in parts), case_id
        if len(parts) > 1:
            assert "Content-Type: image/png" in resp.body.decode("latin-1"), case_id
    if status == 304:
        assert resp.body == b"" and "content-type" not in resp.headers, case_id
    if status in (412, 416):
        assert resp.headers["cache-control"] == "no-store", case_id
        if method == "GET":
            assert resp.json()["code"] == {412: "precondition_failed", 416: "range_not_satisfiable"}[status]
    if status == 416:
        assert resp.headers["content-range"] == f"bytes */{n}", case_id


@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_conditional_and_range_requests_answer_alike_from_memory_and_disk(make_client, kind):
    """Every row of CASES, for a small image (served from memory) and a large one (from disk)."""
    client = await make_client()
    data = png_bytes((64, 64)) if kind == "memory" else noise_png(700 * 1024)
    assert (len(data) > imgproxy.BODY_CACHE_MAX_FILE) == (kind == "file")
    md5 = (await (await client.put("/upload/x.png", data=data, headers=ALICE)).json())["md5"]
    plain = await raw_request(client.server.port, "GET", f"/i/{md5}.png")
    assert plain.status == 200 and plain.body == data
    for case in CASES:
        await check_case(client.server.port, md5, data, plain.headers["last-modified"], case)


# ---- HEAD /api/db, and a data_dir that needs escaping -----------------------------

async def test_head_api_db_sends_no_body_and_keeps_the_connection_in_step(make_client):
    client = await make_client()
    await client.put("/upload/a.png", data=png_bytes(), headers=ALICE)
    raw = await raw_exchange(client.server.port,
                             request_bytes("HEAD", "/api/db", ALICE, close=False)
                             + request_bytes("GET", "/healthz"))
    head, health = parse_responses(raw, (True, False))
    assert head.status == 200 and head.headers["content-type"] == "application/vnd.sqlite3"
    assert head.headers["content-disposition"] == 'attachment; filename="images_server.db"'
    assert health.status == 200 and health.json() == {"status": "ok"}


@pytest.mark.parametrize("folder", ["data#1", "data?x=1", "data%20x", "da ta%"])
async def test_api_db_works_whatever_the_data_dir_is_called(make_client, tmp_path, folder):
    client = await make_client(server={"data_dir": str(tmp_path / folder)})
    info = await (await client.put("/upload/a.png", data=png_bytes(), headers=ALICE)).json()
    resp = await client.get("/api/db", headers=ALICE)
    assert resp.status == 200, await resp.text()
    snapshot = tmp_path / "snapshot.db"
    snapshot.write_bytes(await resp.read())
    with sqlite3.connect(snapshot) as db:
        assert db.execute("SELECT md5 FROM images").fetchall() == [(info["md5"],)]
    assert list((tmp_path / folder / "tmp").iterdir()) == []


# ---- Expect: 100-continue refused ---------------------------------------------------

@pytest.mark.parametrize("status, headers", [
    (401, {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode(), "Expect": "100-continue"}),
    (413, {"Authorization": BASIC_ALICE, "Expect": "100-continue"}),
    (417, {"Authorization": BASIC_ALICE, "Expect": "something-else"}),
], ids=["401", "413", "417"])
async def test_a_refused_expect_closes_the_connection_at_once(make_client, status, headers):
    client = await make_client(server={"max_upload_mb": 1})
    length = 50 * 1024 * 1024 if status == 413 else 1000
    started = time.monotonic()
    raw = await raw_exchange(client.server.port,
                             request_bytes("PUT", "/upload/x.png", headers, close=False, length=length),
                             timeout=5)
    elapsed = time.monotonic() - started
    (resp,) = parse_responses(raw)
    assert resp.status == status and resp.json()["code"]
    assert resp.headers.get("connection", "").lower() == "close"
    assert elapsed < 3, f"the server waited {elapsed:.1f} s for a body the client will not send"


# ---- aiohttp's parser refusals carry our JSON and headers ------------------------------

@pytest.mark.parametrize("raw", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nNot a header line\r\n\r\n",
    b"G@T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
], ids=["bad-header-line", "bad-method", "long-header", "two-framings"])
def test_parser_refusals_are_json_with_our_headers(make_config, server_process, raw):
    server = server_process(make_config())
    port = int(server.base_url.rsplit(":", 1)[1])
    data = asyncio.run(raw_exchange(port, raw, timeout=5))
    (resp,) = parse_responses(data)
    assert resp.status == 400
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["code"] == "bad_request" and "malformed request" in resp.json()["error"]
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["cache-control"] == "no-store"
    assert b"aaaa" not in data
    assert "Traceback" not in server.log


# ---- multipart forms are bounded as a whole; dropped uploads are not errors -----------------

async def send_until_answered(port: int, head: bytes, piece: bytes, limit: int) -> tuple[int, bytes]:
    """Stream `piece` as chunks after `head` until the server answers or `limit`
    bytes went out; returns (bytes sent, answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.ensure_future(reader.read(65536))
    sent = 0
    try:
        writer.write(head)
        while sent < limit and not answer.done():
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
            await writer.drain()
    except ConnectionError:
        pass
    try:
        return sent, await asyncio.wait_for(answer, 10)
    except asyncio.TimeoutError:
        return sent, b""
    finally:
        writer.close()


@pytest.mark.parametrize("shape", ["many-small-fields", "preamble"])
async def test_a_chunked_form_without_a_file_is_bounded(make_client, shape):
    client = await make_client(server={"max_upload_mb": 1})
    head = (f"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: {BASIC_ALICE}\r\n"
            "Content-Type: multipart/form-data; boundary=BB\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    if shape == "many-small-fields":
        piece = b'--BB\r\nContent-Disposition: form-data; name="note"\r\n\r\n' + b"a" * 1000 + b"\r\n"
    else:
        piece = b"preamble text before any boundary\r\n" * 30
    sent, answer = await send_until_answered(client.server.port, head, piece * 50, 200 * 1024 * 1024)
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 413")), (sent, answer[:100])
    assert sent < 32 * 1024 * 1024, f"{sent} bytes read with a 1 MB limit"


def test_a_dropped_upload_is_one_quiet_log_line(make_config, server_process):
    server = server_process(make_config())
    port = int(server.base_url.rsplit(":", 1)[1])

    async def drop(head: bytes, body: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + body)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.transport.abort()

    put = (f"PUT /upload/x.png HTTP/1.1\r\nHost: x\r\nAuthorization: {BASIC_ALICE}\r\n"
           "Transfer-Encoding: chunked\r\n\r\n").encode()
    post = (f"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: {BASIC_ALICE}\r\n"
            "Content-Type: multipart/form-data; boundary=BB\r\nContent-Length: 9000000\r\n\r\n"
            '--BB\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n').encode()
    for head, body in ((put, b"10000\r\n" + b"a" * 65536 + b"\r\n"), (post, b"a" * 2_000_000)):
        asyncio.run(drop(head, body))
    deadline = time.monotonic() + 10
    while server.log.count("client went away") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.log.count("client went away") == 2, server.log
    assert "Traceback" not in server.log and " ERROR " not in server.log, server.log
    assert list((Path(server.config_path).parent / "data" / "tmp").iterdir()) == []


# ---- config values at and past their bounds -------------------------------------------------

@pytest.mark.parametrize("section, key, value, start", [
    ("cleanup", "expire_days", 1e9, True),
    ("cleanup", "expire_days", 36500.5, False),
    ("server", "max_upload_mb", 1e308, True),
    ("server", "max_upload_mb", 4097, False),
    ("server", "cache_mb", 1e308, True),
    ("server", "cache_mb", -1, False),
    ("server", "max_connections", 1, False),
    ("server", "max_connections", 10**9, False),
], ids=lambda v: str(v))
def test_config_values_past_their_bounds_are_one_line_and_exit_2(make_config, section, key, value, start):
    config_path = make_config(**{section: {key: value}})
    with pytest.raises(imgproxy.ConfigError) as caught:
        imgproxy.load_config(config_path)
    assert f"{section}.{key}" in str(caught.value) and "\n" not in str(caught.value)
    if not start:
        return
    result = subprocess.run([sys.executable, str(ROOT / "imgproxy.py"), "--config", str(config_path),
                             "--port", "0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{section}.{key}" in result.stderr


async def test_the_largest_expiry_and_upload_limit_still_upload(make_client):
    client = await make_client(server={"max_upload_mb": imgproxy.MAX_UPLOAD_MB},
                               cleanup={"expire_days": imgproxy.MAX_EXPIRE_DAYS})
    resp = await client.put("/upload/a.png", data=png_bytes(), headers=ALICE)
    assert resp.status == 201, await resp.text()
    info = await resp.json()
    assert int(info["expire_at"][:4]) >= time.gmtime().tm_year + 99
    assert (await client.get(f"/i/{info['md5']}.png")).status == 200


def hashed(password: str) -> str:
    return imgproxy.hash_password(password)


@pytest.mark.parametrize("problem", ["data-dir-is-a-file", "log-file-unwritable", "example-password-hashed"])
def test_start_up_problems_are_one_line_and_exit_2(tmp_path, problem):
    server, users, args = {}, None, []
    if problem == "data-dir-is-a-file":
        (tmp_path / "afile").write_text("not a folder")
        server["data_dir"] = str(tmp_path / "afile")
        key = "server.data_dir"
    elif problem == "log-file-unwritable":
        (tmp_path / "afile").write_text("not a folder")
        server["log_file"] = str(tmp_path / "afile" / "imgproxy.log")
        key = "server.log_file"
    else:
        users = [{"username": "alice", "password_hash": hashed("alice123"), "role": "admin"}]
        args = ["--host", "0.0.0.0"]
        key = "example password"
    config_path = write_config(tmp_path / "config.json", server=server, users=users)
    result = subprocess.run([sys.executable, str(ROOT / "imgproxy.py"), "--config", str(config_path),
                             "--port", "0", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and key in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_hashed_password_that_is_not_the_example_may_face_the_network(tmp_path):
    config = imgproxy.parse_config(
        {"users": [{"username": "alice", "password_hash": hashed("not-the-example")}]}, tmp_path)
    imgproxy.check_safe_to_listen(config, "0.0.0.0")
