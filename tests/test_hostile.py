"""Hostile uploads beyond the corpus: bombs, giant headers, polyglots, evil names,
broken multipart, stalled clients, and the memory bound of a refused upload.

Each case ends in a clear 4xx or a clean store: never a 5xx, never a stuck
request, never a partial file (checked with helpers.store_problems)."""
from __future__ import annotations

import asyncio
import hashlib
import socket
import time
import urllib.parse

import pytest

import imgproxy
from conftest import ALICE
from helpers import (PatchedServer, file_form, gif_with_frames, jpeg_bytes, jpeg_with_app_segments, multipart,
                     noise_png, png_bytes, png_claiming, polyglot_jpeg_zip, proc_status_kb, store_problems,
                     stored_files, tmp_leftovers)


async def assert_refused(client, resp, status: int, code: str | None = None) -> dict:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["error"]
    if code:
        assert body["code"] == code
    assert stored_files(client.data_dir) == [] and tmp_leftovers(client.data_dir) == []
    assert store_problems(client.data_dir) == []
    return body


# ---- bombs and giant headers ------------------------------------------------------

async def test_png_claiming_100000_squared_is_refused_from_header(make_client):
    client = await make_client()
    started = time.monotonic()
    resp = await client.post("/upload", data=file_form(png_claiming(100_000, 100_000)), headers=ALICE)
    await assert_refused(client, resp, 413, "too_many_pixels")
    assert time.monotonic() - started < 5


async def test_gif_with_100000_frames_is_refused_quickly(make_client):
    client = await make_client()
    data = gif_with_frames(100_000)
    assert len(data) < 2 * 1024 * 1024
    started = time.monotonic()
    resp = await client.post("/upload", data=file_form(data, "anim.gif"), headers=ALICE)
    await assert_refused(client, resp, 413, "too_many_pixels")
    assert time.monotonic() - started < 15


async def test_gif_with_a_few_frames_is_fine(make_client):
    client = await make_client()
    resp = await client.post("/upload", data=file_form(gif_with_frames(50), "anim.gif"), headers=ALICE)
    assert resp.status == 201
    assert (await resp.json())["format"] == "GIF"


async def test_jpeg_with_60mb_of_app_segments_is_refused_in_bounded_time(make_client):
    # Before the header pre-scan, Pillow took 45 s and 520 MB of RAM on this file.
    client = await make_client(server={"max_upload_mb": 100})
    data = jpeg_with_app_segments(60 * 1024 * 1024)
    started = time.monotonic()
    resp = await client.put("/upload/exif.jpg", data=data, headers=ALICE)
    body = await assert_refused(client, resp, 413, "too_large")
    assert "metadata" in body["error"]
    assert time.monotonic() - started < 20


async def test_jpeg_with_millions_of_tiny_segments_is_refused(make_client):
    # 20 MB of empty APP5 segments: 1.5 GB of RAM and 20 s inside Pillow unchecked.
    small = jpeg_bytes()
    data = small[:2] + b"\xff\xe5\x00\x02" * (5 * 1024 * 1024) + small[2:]
    client = await make_client()
    started = time.monotonic()
    resp = await client.put("/upload/tiny.jpg", data=data, headers=ALICE)
    await assert_refused(client, resp, 413, "too_large")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("filler", [b"\xff", b"\xff\xd0"], ids=["fill-bytes", "bare-markers"])
async def test_jpeg_with_megabytes_of_fill_or_bare_markers_is_refused(make_client, filler):
    # 20 MB of 0xFF fill (or RST markers) before the frame: Pillow walks them
    # one step at a time in Python (15 s and 5 s) unless refused first.
    small = jpeg_bytes()
    data = small[:2] + filler * (20 * 1024 * 1024 // len(filler) - 1024) + small[2:]
    client = await make_client()
    started = time.monotonic()
    resp = await client.put("/upload/fill.jpg", data=data, headers=ALICE)
    await assert_refused(client, resp, 413, "too_large")
    assert time.monotonic() - started < 10


async def test_jpeg_with_a_normal_sized_icc_profile_is_accepted(make_client):
    client = await make_client()
    data = jpeg_with_app_segments(2 * 1024 * 1024, marker=0xE2, prefix=b"ICC_PROFILE\0\x01\x01")
    resp = await client.put("/upload/icc.jpg", data=data, headers=ALICE)
    assert resp.status == 201, await resp.text()


def test_header_prescan_is_bounded_on_its_own():
    small = jpeg_bytes()
    imgproxy.check_jpeg_headers(small)  # a normal JPEG passes
    imgproxy.check_jpeg_headers(b"\xff\xd8\xff")  # truncated: left to Pillow to report
    imgproxy.check_jpeg_headers(png_bytes())  # not a JPEG: not its business
    with pytest.raises(imgproxy.UploadRejected):
        imgproxy.check_jpeg_headers(small[:2] + b"\xff\xfe\x00\x02" * (imgproxy.JPEG_MAX_SEGMENTS + 1) + small[2:])


# ---- polyglots and names ------------------------------------------------------------

async def test_jpeg_zip_polyglot_is_served_only_as_an_image(make_client):
    client = await make_client()
    data = polyglot_jpeg_zip()
    resp = await client.post("/upload", data=file_form(data, "evil.php"), headers=ALICE)
    assert resp.status == 201
    info = await resp.json()
    assert info["format"] == "JPEG" and info["url"].endswith(".jpg")
    assert [p.name for p in stored_files(client.data_dir)] == [f"{info['md5']}.jpg"]
    got = await client.get(f"/i/{info['md5']}.jpg")
    assert got.status == 200
    assert got.headers["Content-Type"] == "image/jpeg"
    assert got.headers["X-Content-Type-Options"] == "nosniff"
    csp = got.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp and "script-src" not in csp
    assert "Content-Disposition" not in got.headers or "attachment" not in got.headers["Content-Disposition"]
    assert (await client.get(f"/i/{info['md5']}.php")).status == 404
    assert (await client.get(f"/i/{info['md5']}.zip")).status == 404


EVIL_NAMES = {
    "php": "shell.php",
    "svg": "drawing.svg",
    "double-ext": "x.png.php",
    "traversal": "../../../etc/passwd",
    "windows-traversal": "..\\..\\boot.ini",
    "nul": "a\x00b.png",
    "newline": "a\r\nSet-Cookie: x=1.png",
    "quotes": "\"quoted\" 'name'.png",
    "html": "<img src=x onerror=alert(1)>.png",
    "dotdot": "..",
    "long": "n" * 5_000 + ".png",
    "unicode": "照片\u202e gnp.exe",
}


def check_name(info: dict, data_dir) -> None:
    name = info["name"]
    assert name and len(name) <= 200
    assert name.isprintable() and "/" not in name and "\\" not in name and "\x00" not in name
    assert name not in (".", "..")
    assert info["url"].endswith(f"/i/{info['md5']}.png")
    assert [p.name for p in stored_files(data_dir)] == [f"{info['md5']}.png"]
    assert store_problems(data_dir) == []


@pytest.mark.parametrize("key", list(EVIL_NAMES))
async def test_evil_names_in_multipart_are_sanitised(make_client, key):
    client = await make_client()
    raw_name = EVIL_NAMES[key]
    # RFC 5987 form carries control characters a quoted filename cannot.
    head = ('Content-Disposition: form-data; name="file"; filename*=UTF-8\'\''
            + urllib.parse.quote(raw_name, safe="") + "\r\nContent-Type: application/octet-stream")
    body, ctype = multipart([(head, png_bytes())])
    resp = await client.post("/upload", data=body, headers={**ALICE, "Content-Type": ctype})
    assert resp.status == 201, await resp.text()
    check_name(await resp.json(), client.data_dir)


@pytest.mark.parametrize("key", [k for k in EVIL_NAMES if k != "long"])
async def test_evil_names_in_put_path_are_sanitised(make_client, key):
    client = await make_client()
    from yarl import URL
    url = client.make_url("/upload/" + urllib.parse.quote(EVIL_NAMES[key], safe=""))
    resp = await client.session.put(URL(str(url), encoded=True), data=png_bytes(), headers=ALICE)
    if key in ("traversal", "windows-traversal", "dotdot"):
        # %2F stays one segment; aiohttp may also refuse the encoded slash outright.
        assert resp.status in (201, 400, 404, 405), await resp.text()
        if resp.status != 201:
            return
    assert resp.status == 201, await resp.text()
    check_name(await resp.json(), client.data_dir)


async def test_ten_thousand_character_names_are_refused_cleanly(make_client):
    # Past aiohttp's 8190-byte line limit: a clear 400 (it was a 500 for multipart).
    client = await make_client()
    resp = await client.put("/upload/" + "n" * 10_000 + ".png", data=png_bytes(), headers=ALICE)
    assert resp.status == 400
    head = 'Content-Disposition: form-data; name="file"; filename="' + "n" * 10_000 + '.png"'
    body, ctype = multipart([(head, png_bytes())])
    resp = await client.post("/upload", data=body, headers={**ALICE, "Content-Type": ctype})
    assert resp.status == 400
    assert (await resp.json())["code"] == "bad_request"
    assert stored_files(client.data_dir) == [] and tmp_leftovers(client.data_dir) == []
    assert (await client.get("/healthz")).status == 200


@pytest.mark.parametrize("disposition", [
    'form-data; name="file"; filename="a\\";b=c;.png"',
    'form-data; name="file"; filename="evil.svg"; filename="x.png"',
    'form-data; name=file; filename=unquoted name.png',
    'form-data; name="file"; filename=""',
], ids=["escaped-quote", "two-filenames", "unquoted", "empty-name"])
@pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader")
async def test_odd_content_dispositions(make_client, disposition):
    # Either stored under a sane name, or a clear 400; the part's own type never counts.
    client = await make_client()
    body, ctype = multipart([(f"Content-Disposition: {disposition}\r\nContent-Type: image/svg+xml",
                              png_bytes())])
    resp = await client.post("/upload", data=body, headers={**ALICE, "Content-Type": ctype})
    if resp.status == 400:
        assert (await resp.json())["code"] in ("missing_file", "bad_request")
        assert stored_files(client.data_dir) == []
        return
    assert resp.status == 201, await resp.text()
    info = await resp.json()
    assert info["mime"] == "image/png"
    check_name(info, client.data_dir)


# ---- broken multipart ------------------------------------------------------------------

@pytest.mark.parametrize("parts,code", [
    ([('Content-Disposition: form-data; name="file"; filename="x.png"', b"")], "empty_upload"),
    ([], "missing_file"),
    ([('Content-Disposition: form-data; name="other"', b"hello")], "missing_file"),
    ([('Content-Disposition: form-data; name="file"; filename="a.png"', b"x"),
      ('Content-Disposition: form-data; name="file"; filename="b.png"', b"y")], "several_files"),
    ([('Content-Disposition: form-data; name="note"', b"z" * 200_000)], "bad_request"),
], ids=["empty-part", "no-parts", "no-file-field", "two-files", "huge-extra-field"])
async def test_broken_multipart_is_400(make_client, parts, code):
    client = await make_client()
    body, ctype = multipart(parts)
    resp = await client.post("/upload", data=body, headers={**ALICE, "Content-Type": ctype})
    await assert_refused(client, resp, 400, code)


@pytest.mark.parametrize("body", [
    b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",  # no closing boundary
    b"garbage without any boundary",
    b"--b\r\n\r\n\r\n--b--\r\n",  # a part without headers
    b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!\r\n--b--\r\n",
    b"",
], ids=["unterminated", "no-boundary", "headerless-part", "bad-base64", "empty-body"])
async def test_malformed_multipart_is_4xx_never_5xx(make_client, body):
    client = await make_client()
    resp = await client.post("/upload", data=body,
                             headers={**ALICE, "Content-Type": "multipart/form-data; boundary=b"})
    assert 400 <= resp.status < 500, await resp.text()
    assert (await resp.json())["code"]
    assert stored_files(client.data_dir) == [] and tmp_leftovers(client.data_dir) == []


# ---- a body that never ends -------------------------------------------------------------

@pytest.mark.parametrize("sent", [1000, 3 * 1024 * 1024], ids=["in-memory", "in-temp-file"])
async def test_stalled_upload_times_out_and_keeps_nothing(make_client, monkeypatch, sent):
    monkeypatch.setattr(imgproxy, "UPLOAD_IDLE_TIMEOUT", 0.5)
    client = await make_client()
    head = ("POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: " + ALICE["Authorization"]
            + "\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n"
            + '--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n').encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(head + b"\0" * sent)  # ... and then nothing, forever
    await writer.drain()
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(65536), 15)
    waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code": "timeout"' in answer and b"Connection: close" in answer
    assert waited < 5
    writer.close()
    for _ in range(50):
        if not tmp_leftovers(client.data_dir):
            break
        await asyncio.sleep(0.05)
    assert tmp_leftovers(client.data_dir) == [] and stored_files(client.data_dir) == []
    assert (await client.get("/healthz")).status == 200


async def test_slow_but_steady_upload_is_not_cut_off(make_client, monkeypatch):
    monkeypatch.setattr(imgproxy, "UPLOAD_IDLE_TIMEOUT", 0.5)
    client = await make_client()
    data = png_bytes()

    async def trickle():
        for i in range(0, len(data), 40):
            yield data[i:i + 40]
            await asyncio.sleep(0.05)

    resp = await client.put("/upload/slow.png", data=trickle(), headers=ALICE)
    assert resp.status == 201


def test_unfinished_request_head_is_closed(make_config):
    server = PatchedServer(make_config(), {"KEEPALIVE_TIMEOUT": 1.0})
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
            started = time.monotonic()
            while sock.recv(65536):
                pass
            assert time.monotonic() - started < 10
    finally:
        server.kill()


# ---- memory stays bounded ---------------------------------------------------------------

def stream_refused_upload(port: int, request_head: bytes, total: int, chunked: bool) -> tuple[bytes, int]:
    """Send up to `total` bytes of body; returns (response bytes, body bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(request_head)
    block = b"\x89PNG\r\n\x1a\n" + b"\0" * (1024 * 1024 - 8)
    frame = (b"%x\r\n" % len(block)) + block + b"\r\n" if chunked else block
    sent = 0
    sock.settimeout(0.2)
    response = b""
    deadline = time.monotonic() + 60
    try:
        while sent < total and time.monotonic() < deadline:
            try:
                sock.sendall(frame)
                sent += len(block)
            except socket.timeout:
                pass
            except (BrokenPipeError, ConnectionResetError):
                break
        if chunked and sent >= total:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(10)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
            if b"\r\n\r\n" in response and b"}" in response:
                break
    except (socket.timeout, ConnectionResetError):
        pass
    sock.close()
    return response, sent


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_refused_500mb_upload_keeps_memory_flat(make_config, server_process, method):
    proc = server_process(make_config())
    port = int(proc.base_url.rsplit(":", 1)[1])
    import urllib.request
    urllib.request.urlopen(proc.base_url + "/healthz", timeout=10).read()  # warm up
    before = proc_status_kb(proc.proc.pid, "VmHWM")
    target = "/upload/big.png" if method == "PUT" else "/upload"
    ctype = "application/octet-stream" if method == "PUT" else "multipart/form-data; boundary=b"
    head = (f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {ALICE['Authorization']}\r\n"
            f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    if method == "POST":
        part_head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        for piece in (part_head[:12], part_head[12:]):  # a part head spread over two chunks
            head += b"%x\r\n%s\r\n" % (len(piece), piece)
    response, sent = stream_refused_upload(port, head, 500 * 1024 * 1024, chunked=True)
    after = proc_status_kb(proc.proc.pid, "VmHWM")
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert sent >= 20 * 1024 * 1024
    growth_mb = (after - before) / 1024
    assert growth_mb < 50, f"peak RSS grew {growth_mb:.1f} MB"
    # and the server is fine afterwards
    assert urllib.request.urlopen(proc.base_url + "/healthz", timeout=10).status == 200
    data_dir = imgproxy.load_config(proc.config_path).server.data_dir
    assert stored_files(data_dir) == [] and tmp_leftovers(data_dir) == []


def test_declared_500mb_upload_is_refused_before_reading(make_config, server_process):
    proc = server_process(make_config())
    port = int(proc.base_url.rsplit(":", 1)[1])
    head = (f"PUT /upload/big.png HTTP/1.1\r\nHost: x\r\nAuthorization: {ALICE['Authorization']}\r\n"
            f"Content-Length: {500 * 1024 * 1024}\r\n\r\n").encode()
    started = time.monotonic()
    response, _ = stream_refused_upload(port, head, 500 * 1024 * 1024, chunked=False)
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert time.monotonic() - started < 30


async def test_accepted_big_upload_does_not_sit_in_memory(make_client):
    # 8 MB goes through a temp file in 1 MB steps (FLUSH_BYTES), then is renamed.
    client = await make_client()
    data = noise_png(8 * 1024 * 1024)
    resp = await client.put("/upload/big.png", data=data, headers=ALICE)
    assert resp.status == 201
    info = await resp.json()
    assert info["md5"] == hashlib.md5(data).hexdigest()
    assert store_problems(client.data_dir) == [] and tmp_leftovers(client.data_dir) == []
