"""The server core against the README's API section: upload, dedup, serving, metadata, auth, limits."""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import io
import sqlite3
import subprocess
import sys

import aiohttp
import pytest
from PIL import Image

import imgproxy
from conftest import ALICE, BOB, CAROL, ROOT, TEST_BASE_URL, basic, corpus_file, read_manifest
from helpers import db_rows, file_form, png_bytes, stored_files, stored_path

async def upload(client, data: bytes, headers=ALICE, name="x.png"):
    return await client.post("/upload", data=file_form(data, name), headers=headers)


# ---- upload and dedup -------------------------------------------------------

async def test_multipart_upload_stores_content_addressed_file(make_client):
    client = await make_client()
    data = png_bytes()
    md5 = hashlib.md5(data).hexdigest()
    resp = await upload(client, data, name="holiday.png")
    assert resp.status == 201
    info = await resp.json()
    assert info["status"] == "uploaded"
    assert info["md5"] == md5
    assert info["url"] == f"{TEST_BASE_URL}/i/{md5}.png"
    assert resp.headers["Location"] == info["url"]
    assert (info["name"], info["size"], info["width"], info["height"]) == ("holiday.png", len(data), 40, 30)
    assert (info["format"], info["mime"], info["access_count"]) == ("PNG", "image/png", 0)
    assert info["created_at"].endswith("Z") and info["expire_at"].endswith("Z")
    path = stored_path(client.data_dir, md5, "png")
    assert path.read_bytes() == data
    assert stored_files(client.data_dir) == [path]
    assert list((client.data_dir / "tmp").iterdir()) == []


async def test_same_bytes_again_is_exists_with_one_file_and_row(make_client):
    client = await make_client()
    data = png_bytes()
    first = await (await upload(client, data)).json()
    resp = await client.put("/upload/other-name.png", data=data, headers=BOB)
    assert resp.status == 200
    again = await resp.json()
    assert again["status"] == "exists"
    assert again["url"] == first["url"]
    assert again["name"] == first["name"]  # the first upload's name stays
    assert len(stored_files(client.data_dir)) == 1
    assert len(db_rows(client.data_dir)) == 1


async def test_put_raw_upload(make_client):
    client = await make_client()
    data = corpus_file("testorig.jpg").read_bytes()
    resp = await client.put("/upload/photo%20one.jpg", data=data, headers=ALICE)
    assert resp.status == 201
    info = await resp.json()
    assert info["name"] == "photo one.jpg"
    assert info["format"] == "JPEG" and info["url"].endswith(".jpg")


async def test_extension_comes_from_detected_format_not_name(make_client):
    client = await make_client()
    data = corpus_file("hopper.gif").read_bytes()
    info = await (await upload(client, data, name="evil.php")).json()
    assert info["url"].endswith(".gif")
    assert info["format"] == "GIF"
    assert stored_files(client.data_dir)[0].suffix == ".gif"


async def test_accept_text_plain_returns_bare_url(make_client):
    client = await make_client()
    data = png_bytes()
    resp = await client.post("/upload", data=file_form(data), headers={**ALICE, "Accept": "text/plain"})
    assert resp.status == 201
    assert resp.content_type == "text/plain"
    assert await resp.text() == f"{TEST_BASE_URL}/i/{hashlib.md5(data).hexdigest()}.png\n"


async def test_concurrent_identical_uploads_one_file_one_row(make_client):
    client = await make_client()
    data = corpus_file("lossless1.webp").read_bytes()
    users = [ALICE, BOB, CAROL]
    resps = await asyncio.gather(*(upload(client, data, users[i % 3]) for i in range(64)))
    statuses = sorted(r.status for r in resps)
    assert statuses == [200] * 63 + [201]
    urls = {(await r.json())["url"] for r in resps}
    assert len(urls) == 1
    assert len(stored_files(client.data_dir)) == 1
    assert len(db_rows(client.data_dir)) == 1
    assert sorted(db_rows(client.data_dir, "SELECT username FROM holds")) == [("alice",), ("bob",), ("carol",)]
    assert list((client.data_dir / "tmp").iterdir()) == []


async def test_reupload_renews_expiry(make_client, clock):
    client = await make_client(clock=clock)
    data = png_bytes()
    first = await (await upload(client, data)).json()
    clock.advance(86400 * 10)
    again = await (await upload(client, data)).json()
    assert again["expire_at"] > first["expire_at"]
    assert again["created_at"] == first["created_at"]


# ---- rejection ----------------------------------------------------------------

def two_files_form() -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", png_bytes(), filename="a.png")
    form.add_field("file", png_bytes(color=(1, 2, 3)), filename="b.png")
    return form


# case -> the POST /upload it sends: (body, extra headers)
BAD_UPLOADS = {
    "empty": lambda: (file_form(b""), {}),
    "no_file_field": lambda: (file_form(png_bytes(), field="image"), {}),
    "two_files": lambda: (two_files_form(), {}),
    "not_multipart": lambda: (png_bytes(), {"Content-Type": "image/png"}),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
async def test_bad_upload_requests_are_400(make_client, case):
    client = await make_client()
    body, headers = BAD_UPLOADS[case]()
    resp = await client.post("/upload", data=body, headers={**ALICE, **headers})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] and body["code"]
    assert stored_files(client.data_dir) == []
    assert db_rows(client.data_dir) == []


async def test_empty_put_is_400(make_client):
    client = await make_client()
    resp = await client.put("/upload/x.png", data=b"", headers=ALICE)
    assert resp.status == 400


@pytest.mark.parametrize("row", read_manifest(), ids=lambda row: row["file"])
async def test_corpus_file_by_manifest(make_client, corpus, row):
    client = await make_client()
    data = (corpus / row["file"]).read_bytes()
    resp = await upload(client, data, name=row["file"])
    assert resp.status < 500
    body = await resp.json()
    readable = row["format"] != "HEIF" or importlib.util.find_spec("pillow_heif") is not None
    accepted = row["expected"] in ("valid", "dangerous") and row["format"] in imgproxy.DEFAULT_FORMATS \
        and readable
    if accepted:
        assert resp.status == 201, body
        stored_format = imgproxy.CONVERTED_FORMATS.get(row["format"], row["format"])
        assert (body["format"], body["width"], body["height"]) == (stored_format, int(row["width"]),
                                                                    int(row["height"]))
        # Metadata removal may change the bytes: then the upload's MD5 is the source_md5.
        assert row["md5"] == body.get("source_md5", body["md5"])
        served = await client.get(f"/i/{body['md5']}.{body['url'].rsplit('.', 1)[1]}")
        assert served.status == 200
        assert served.headers["Content-Type"] == body["mime"]
        assert served.headers["X-Content-Type-Options"] == "nosniff"
        served_bytes = await served.read()
        assert hashlib.md5(served_bytes).hexdigest() == body["md5"]
        assert served_bytes == data or "source_md5" in body
    else:
        assert 400 <= resp.status < 500, body
        if row["expected"] == "valid":
            assert resp.status == 415 and body["code"] == "unsupported_image"  # AVIF/HEIF: not accepted
        if row["expected"] == "bomb" and row["file"] != "png_decompression_dos.png":
            assert resp.status == 413 and body["code"] == "too_many_pixels"
        assert stored_files(client.data_dir) == []
        assert db_rows(client.data_dir) == []
        assert list((client.data_dir / "tmp").iterdir()) == []


async def test_svg_refused(make_client):
    client = await make_client()
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    resp = await upload(client, svg, name="x.svg")
    assert resp.status == 415
    assert (await resp.json())["code"] == "unsupported_image"


async def test_pixel_limit_from_config(make_client):
    client = await make_client(server={"max_pixels": 1000})
    resp = await upload(client, png_bytes((40, 30)))  # 1200 px
    assert resp.status == 413
    assert (await resp.json())["code"] == "too_many_pixels"


async def test_formats_can_be_narrowed(make_client):
    client = await make_client(server={"formats": ["PNG"]})
    resp = await upload(client, corpus_file("hopper.gif").read_bytes())
    assert resp.status == 415
    assert (await upload(client, png_bytes())).status == 201


# ---- size limit ----------------------------------------------------------------

async def test_upload_over_limit_is_413_and_nothing_kept(make_client):
    client = await make_client(server={"max_upload_mb": 0.05})  # 52,428 bytes
    big = bytes(200_000)
    resp = await client.put("/upload/big.png", data=big, headers=ALICE)
    assert resp.status == 413
    assert (await resp.json())["code"] == "too_large"
    resp = await client.post("/upload", data=file_form(big), headers=ALICE)
    assert resp.status == 413
    assert stored_files(client.data_dir) == [] and list((client.data_dir / "tmp").iterdir()) == []


async def test_streamed_upload_without_length_stops_at_limit(make_client):
    """A chunked body that never says its size is cut off as the limit is crossed."""
    client = await make_client(server={"max_upload_mb": 1})
    sent = 0

    async def endless():
        nonlocal sent
        chunk = bytes(64 * 1024)
        for _ in range(200):  # 12.5 MB on offer
            sent += len(chunk)
            yield chunk

    resp = await client.put("/upload/x.png", data=endless(), headers=ALICE)
    assert resp.status == 413
    assert list((client.data_dir / "tmp").iterdir()) == []
    assert stored_files(client.data_dir) == []


async def test_large_valid_upload_goes_through_temp_file(make_client):
    """Bigger than the in-memory threshold: streamed to tmp/, then renamed into place."""
    client = await make_client()
    img = Image.effect_noise((1200, 1000), 80).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "BMP")
    data = buf.getvalue()
    assert len(data) > imgproxy.FLUSH_BYTES
    resp = await client.put("/upload/noise.bmp", data=data, headers=ALICE)
    assert resp.status == 201, await resp.text()
    info = await resp.json()
    assert info["md5"] == hashlib.md5(data).hexdigest()
    assert stored_files(client.data_dir)[0].read_bytes() == data
    assert list((client.data_dir / "tmp").iterdir()) == []


async def test_expect_100_continue_refused_before_body(make_client):
    """curl's Expect: 100-continue gets 401/413 without sending the body."""
    client = await make_client(server={"max_upload_mb": 1})
    host, port = client.server.host, client.server.port

    async def ask(headers: str) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(("PUT /upload/x.png HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n" + headers +
                      "\r\n").encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        return line

    assert b" 401 " in await ask("Content-Length: 10\r\n")
    auth = ALICE["Authorization"]
    assert b" 413 " in await ask(f"Authorization: {auth}\r\nContent-Length: 5000000\r\n")
    assert b" 100 " in await ask(f"Authorization: {auth}\r\nContent-Length: 100\r\n")


# ---- serving --------------------------------------------------------------------

async def test_serving_headers_etag_304_and_head(make_client, clock):
    client = await make_client(clock=clock)
    data = png_bytes()
    info = await (await upload(client, data)).json()
    path = f"/i/{info['md5']}.png"
    resp = await client.get(path)
    assert resp.status == 200
    assert await resp.read() == data
    h = resp.headers
    assert h["Content-Type"] == "image/png"
    assert h["ETag"] == f'"{info["md5"]}"'
    assert h["X-Content-Type-Options"] == "nosniff"
    assert "script" not in h["Content-Security-Policy"] and "default-src 'none'" in h["Content-Security-Policy"]
    max_age = int(h["Cache-Control"].split("max-age=")[1].split(",")[0])
    assert 30 * 86400 - 5 <= max_age <= 30 * 86400
    clock.advance(20 * 86400)
    resp = await client.get(path)
    max_age = int(resp.headers["Cache-Control"].split("max-age=")[1].split(",")[0])
    assert 10 * 86400 - 5 <= max_age <= 10 * 86400  # bounded by the remaining life
    resp = await client.get(path, headers={"If-None-Match": f'"{info["md5"]}"'})
    assert resp.status == 304
    assert await resp.read() == b""
    resp = await client.get(path, headers={"If-None-Match": '"something-else"'})
    assert resp.status == 200
    resp = await client.head(path)
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(data)


@pytest.mark.parametrize("big", [False, True], ids=["memory", "sendfile"])
async def test_byte_ranges(make_client, big):
    client = await make_client(server={"cache_mb": 0} if big else {})
    data = corpus_file("lossless1.webp").read_bytes()
    info = await (await upload(client, data)).json()
    path = f"/i/{info['md5']}.webp"
    resp = await client.get(path, headers={"Range": "bytes=10-19"})
    assert resp.status == 206
    assert await resp.read() == data[10:20]
    assert resp.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert resp.headers["ETag"] == f'"{info["md5"]}"'
    resp = await client.get(path, headers={"Range": "bytes=-5"})
    assert resp.status == 206 and await resp.read() == data[-5:]
    resp = await client.get(path, headers={"Range": f"bytes={len(data) + 10}-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"


async def test_expired_image_is_404_before_cleanup(make_client, clock):
    client = await make_client(clock=clock, cleanup={"expire_days": 1})
    info = await (await upload(client, png_bytes())).json()
    path = f"/i/{info['md5']}.png"
    assert (await client.get(path)).status == 200
    clock.advance(86400 + 1)
    assert (await client.get(path)).status == 404
    assert (await client.get(f"/api/images/{info['md5']}", headers=ALICE)).status == 404
    assert len(stored_files(client.data_dir)) == 1  # still on disk until the cleanup pass


async def test_access_count_is_batched_and_reported(make_client):
    client = await make_client()
    info = await (await upload(client, png_bytes())).json()
    for _ in range(3):
        assert (await client.get(f"/i/{info['md5']}.png")).status == 200
    await client.head(f"/i/{info['md5']}.png")  # HEAD does not count
    looked = await (await client.get(f"/api/images/{info['md5']}", headers=ALICE)).json()
    assert looked["access_count"] == 3
    assert db_rows(client.data_dir, "SELECT access_count FROM images") == [(0,)]  # not written per request
    await client.app[imgproxy.STORE].flush_counts()
    assert db_rows(client.data_dir, "SELECT access_count FROM images") == [(3,)]


@pytest.mark.parametrize("path,status", [
    ("/i/../../images.db", 404),
    ("/i/..%2f..%2fimages.db", 400),
    ("/i/%2e%2e%2fimages.db", 400),
    ("/i/" + "0" * 32 + ".png", 404),
    ("/i/" + "Z" * 32 + ".png", 400),
    ("/i/" + "A" * 32 + ".png", 400),
    ("/i/nothex.png", 400),
    ("/i/" + "0" * 32, 400),
    ("/api/images/not-an-md5", 400),
    ("/api/images/..%2fdb", 400),
    ("/uploads/", 404),
    ("/data/images.db", 404),
])
async def test_path_tricks(make_client, path, status):
    client = await make_client()
    await upload(client, png_bytes())
    resp = await client.get(path, headers=BOB)
    assert resp.status == status
    body = await resp.json()
    assert body["error"] and body["code"]


async def test_wrong_extension_for_known_md5_is_404(make_client):
    client = await make_client()
    info = await (await upload(client, png_bytes())).json()
    assert (await client.get(f"/i/{info['md5']}.jpg")).status == 404
    assert (await client.get(f"/i/{info['md5']}.png")).status == 200


# ---- metadata API ----------------------------------------------------------------

async def test_lookup_and_renew(make_client, clock):
    client = await make_client(clock=clock)
    data = png_bytes()
    md5 = hashlib.md5(data).hexdigest()
    assert (await client.get(f"/api/images/{md5}", headers=BOB)).status == 404
    assert (await client.post(f"/api/images/{md5}/renew", headers=BOB)).status == 404
    first = await (await upload(client, data)).json()
    looked = await (await client.get(f"/api/images/{md5}", headers=BOB)).json()
    assert looked == {k: v for k, v in first.items() if k != "status"}  # lookup carries no status
    clock.advance(3600 * 24)
    resp = await client.post(f"/api/images/{md5}/renew", headers=BOB)
    assert resp.status == 200
    renewed = await resp.json()
    assert renewed["status"] == "exists"
    assert renewed["expire_at"] > first["expire_at"]
    # renew made bob a holder: it shows in his list and he can delete his hold
    listed = await (await client.get("/api/images", headers=BOB)).json()
    assert [i["md5"] for i in listed["images"]] == [md5]


async def test_delete_drops_only_callers_hold(make_client):
    client = await make_client()
    data = png_bytes()
    info = await (await upload(client, data, BOB)).json()
    await upload(client, data, CAROL)
    path = f"/i/{info['md5']}.png"
    resp = await client.delete(f"/api/images/{info['md5']}", headers=BOB)
    assert resp.status == 204
    assert (await client.get(path)).status == 200  # carol still holds it
    assert (await client.delete(f"/api/images/{info['md5']}", headers=BOB)).status == 404
    assert (await client.delete(f"/api/images/{info['md5']}", headers=CAROL)).status == 204
    assert (await client.get(path)).status == 404
    assert stored_files(client.data_dir) == [] and db_rows(client.data_dir) == []


async def test_admin_delete_removes_outright(make_client):
    client = await make_client()
    info = await (await upload(client, png_bytes(), BOB)).json()
    await client.get(f"/i/{info['md5']}.png")  # now in the serving cache
    assert (await client.delete(f"/api/images/{info['md5']}", headers=ALICE)).status == 204
    assert (await client.get(f"/i/{info['md5']}.png")).status == 404
    assert stored_files(client.data_dir) == []
    assert (await client.delete(f"/api/images/{info['md5']}", headers=ALICE)).status == 404


async def test_list_newest_first_paged_and_scoped(make_client, clock):
    client = await make_client(clock=clock)
    md5s = []
    for i in range(5):
        info = await (await upload(client, png_bytes(color=(i, i, i)), BOB)).json()
        md5s.append(info["md5"])
        clock.advance(1)
    await upload(client, png_bytes(color=(99, 0, 0)), CAROL)
    page = await (await client.get("/api/images?limit=2&offset=1", headers=BOB)).json()
    assert page["total"] == 5
    assert [i["md5"] for i in page["images"]] == [md5s[3], md5s[2]]
    everything = await (await client.get("/api/images", headers=ALICE)).json()
    assert everything["total"] == 6
    carol = await (await client.get("/api/images", headers=CAROL)).json()
    assert carol["total"] == 1
    for bad in ("limit=0", "limit=abc", "offset=-1", "limit=100000"):
        assert (await client.get(f"/api/images?{bad}", headers=BOB)).status == 400


async def test_db_download_is_admin_snapshot(make_client, tmp_path):
    client = await make_client()
    await upload(client, png_bytes())
    assert (await client.get("/api/db", headers=BOB)).status == 403
    resp = await client.get("/api/db", headers=ALICE)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/vnd.sqlite3"
    assert resp.headers["Content-Disposition"] == 'attachment; filename="images_server.db"'
    assert resp.headers["Cache-Control"] == "no-store"
    target = tmp_path / "images_server.db"
    target.write_bytes(await resp.read())
    con = sqlite3.connect(target)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("SELECT COUNT(*) FROM images").fetchone() == (1,)
    con.close()
    assert [p.name for p in (client.data_dir / "tmp").iterdir()] == []  # snapshot removed


async def test_healthz(make_client):
    client = await make_client()
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


# ---- auth -----------------------------------------------------------------------

ROUTES = [
    ("POST", "/upload", "uploader"),
    ("PUT", "/upload/x.png", "uploader"),
    ("GET", "/api/images/" + "0" * 32, "uploader"),
    ("POST", "/api/images/" + "0" * 32 + "/renew", "uploader"),
    ("DELETE", "/api/images/" + "0" * 32, "uploader"),
    ("GET", "/api/images", "uploader"),
    ("GET", "/api/db", "admin"),
    ("GET", "/i/" + "0" * 32 + ".png", None),
    ("GET", "/healthz", None),
    ("GET", "/", None),
]
WHO = {"none": {}, "wrong": basic("alice", "nope"), "unknown": basic("mallory", "alice123"),
       "uploader": BOB, "admin": ALICE}


@pytest.mark.parametrize("method,path,need", ROUTES, ids=[f"{m} {p[:24]}" for m, p, _ in ROUTES])
@pytest.mark.parametrize("who", list(WHO))
async def test_auth_matrix(make_client, method, path, need, who):
    client = await make_client()
    data = file_form(png_bytes()) if path == "/upload" else (png_bytes() if method == "PUT" else None)
    resp = await client.request(method, path, headers=WHO[who], data=data)
    if need is None or (who == "admin") or (who == "uploader" and need == "uploader"):
        assert resp.status not in (401, 403)
        assert resp.status < 500
        return
    body = await resp.json()
    assert body["error"] == imgproxy.DENIED_MESSAGE
    if who in ("none", "wrong", "unknown"):
        assert resp.status == 401
        assert body["code"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"].startswith('Basic realm="imgproxy"')
    else:
        assert resp.status == 403
        assert body["code"] == "forbidden"


async def test_page_requests_get_no_browser_login_prompt(make_client):
    client = await make_client()
    resp = await client.get("/api/images", headers={"X-Requested-With": "imgproxy-page"})
    assert resp.status == 401
    assert "WWW-Authenticate" not in resp.headers


async def test_password_hash_users_authenticate(make_client):
    hashed = imgproxy.hash_password("s3cret pass")
    client = await make_client(users=[{"username": "dora", "password_hash": hashed, "role": "admin"}])
    assert (await client.get("/api/images", headers=basic("dora", "s3cret pass"))).status == 200
    assert (await client.get("/api/images", headers=basic("dora", "s3cret"))).status == 401
    assert (await client.get("/api/images", headers=basic("dora", "s3cret pass"))).status == 200


async def test_repeated_failures_are_rate_limited(make_client):
    client = await make_client()
    for _ in range(imgproxy.AUTH_FAIL_LIMIT):
        assert (await client.get("/api/images", headers=basic("alice", "guess"))).status == 401
    resp = await client.get("/api/images", headers=basic("alice", "guess"))
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) > 0
    assert (await resp.json())["code"] == "rate_limited"
    # serving is not behind auth and goes on
    assert (await client.get("/healthz")).status == 200


# ---- errors are JSON, methods, headers ---------------------------------------

async def test_unknown_route_and_method_are_json(make_client):
    client = await make_client()
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json())["code"] == "not_found"
    resp = await client.patch("/upload", headers=ALICE)
    assert resp.status == 405
    assert (await resp.json())["code"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "no-store"


# ---- config and start-up --------------------------------------------------------

def run_main(args, capsys):
    rc = imgproxy.main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("content,needle", [
    (None, "not found"),
    ('{"server": {"port": 8000,}}', "line 1, column"),
    ('{"server": {"prot": 8000}}', "server.prot: unknown key"),
    ('{"server": {"port": "8000"}}', "server.port: expected an integer"),
    ('{"server": {"max_upload_mb": true}}', "server.max_upload_mb: expected a number"),
    ('{"cleanup": {"cleanup_time": "25:00"}}', "cleanup.cleanup_time"),
    ('{"cleanup": {"expire_days": -1}}', "cleanup.expire_days"),
    ('{"users": [{"username": "x"}]}', "users[0]: user 'x' needs a password or a password_hash"),
    ('{"users": [{"username": "x", "password": "p", "role": "root"}]}', "users[0].role"),
    ('{"users": [{"username": "x", "password_hash": "md5$abc"}]}', "users[0].password_hash"),
    ('{"extra": 1}', "extra: unknown key"),
    ('[1, 2]', "expected an object"),
], ids=["missing", "bad-json", "unknown-key", "wrong-type", "bool-for-number", "bad-time", "negative-days",
        "no-password", "bad-role", "bad-hash", "unknown-section", "not-object"])
def test_config_errors_exit_2_with_one_clear_line(tmp_path, capsys, content, needle):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    rc, err = run_main(["--config", str(path)], capsys)
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_data_dir_is_relative_to_config(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "config.json"
    path.write_text('{"server": {"data_dir": "store"}}')
    assert imgproxy.load_config(path).server.data_dir == tmp_path / "conf" / "store"


def test_shipped_config_is_valid_and_safe():
    config = imgproxy.load_config(ROOT / "config.json")
    assert config.server.host == "127.0.0.1" and config.server.port == 8000
    assert config.server.data_dir == ROOT / "data"
    imgproxy.check_safe_to_listen(config, config.server.host)


def test_refuses_public_listen_with_example_password(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"users": [{"username": "alice", "password": "alice123", "role": "admin"}]}')
    rc, err = run_main(["--config", str(path), "--host", "0.0.0.0"], capsys)
    assert rc == 2
    assert "example password" in err and "hash-password" in err
    hashed = imgproxy.hash_password("better one")
    path.write_text('{"users": [{"username": "alice", "password_hash": "%s"}]}' % hashed)
    imgproxy.check_safe_to_listen(imgproxy.load_config(path), "0.0.0.0")  # no error


def test_hash_password_command():
    out = subprocess.run([sys.executable, str(ROOT / "imgproxy.py"), "hash-password"],
                         input="correct horse\n", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("scrypt$")
    assert imgproxy.verify_password_hash("correct horse", line)
    assert not imgproxy.verify_password_hash("wrong horse", line)
    assert "correct horse" not in out.stdout + out.stderr


def test_process_serves_and_stops_on_sigterm(make_config, server_process):
    import urllib.request
    proc = server_process(make_config())
    with urllib.request.urlopen(proc.base_url + "/healthz", timeout=10) as resp:
        assert resp.status == 200
    assert proc.terminate() == 0
    assert "Traceback" not in proc.log


async def test_concurrent_misses_of_one_image_count_its_bytes_once(make_client):
    """Many requests missing the same image at once share one cache entry; the
    cache's byte count must not drift (it would end in every request missing)."""
    client = await make_client()
    data = png_bytes()
    info = await (await upload(client, data)).json()
    store = client.app[imgproxy.STORE]
    store.forget_all()
    resps = await asyncio.gather(*(client.get(f"/i/{info['md5']}.png") for _ in range(16)))
    assert {r.status for r in resps} == {200}
    assert len(store.served) == 1
    assert store.body_bytes == len(data)
    await client.delete(f"/api/images/{info['md5']}", headers=ALICE)
    assert store.body_bytes == 0 and not store.served
