"""Protocol abuse over raw sockets: traversal and encoded slashes on every route,
odd methods, absurd Range headers, a 1 MB header, lying Content-Length,
pipelining, malformed Authorization, and the security headers on every answer."""
from __future__ import annotations

import base64
import hashlib
import io

import pytest

import imgproxy
from conftest import ALICE, BOB
from helpers import (noise_png, parse_responses, png_bytes, raw_exchange, raw_request, request_bytes,
                          store_problems)

MD5 = "0" * 32
# Every route, as (method, path template); {id} is the slot the variants go into.
ROUTES = [
    ("GET", "/i/{id}.png"),
    ("HEAD", "/i/{id}.png"),
    ("POST", "/upload"),
    ("PUT", "/upload/{id}"),
    ("GET", "/api/images/{id}"),
    ("POST", "/api/images/{id}/renew"),
    ("DELETE", "/api/images/{id}"),
    ("GET", "/api/images"),
    ("GET", "/api/db"),
    ("GET", "/healthz"),
    ("GET", "/"),
    ("GET", "/static/{id}"),
    ("GET", "/openapi.json"),
]
TRAVERSALS = [
    "../../images.db", "..%2f..%2fimages.db", "..%2F..%2Fimages.db", "%2e%2e%2f%2e%2e%2fimages.db",
    "..%252f..%252fimages.db", "....//....//images.db", "..\\..\\images.db", "..%5c..%5cimages.db",
    "%c0%ae%c0%ae%c0%afimages.db", "..;/images.db", "%00", "x%00.png", "/etc/passwd", "%2fetc%2fpasswd",
    "uploads/../images.db", ".", "..", "%2e", "%2e%2e",
]


def from_parser(resp) -> bool:
    """aiohttp's own HTTP parser refused the bytes before any of our code ran.

    Those answers (a 400 in text/plain, then the connection closes) cannot
    carry our headers: aiohttp runs no response signal for them.
    """
    return resp.status in (400, 431) and resp.headers.get("content-type", "").startswith("text/plain")


async def seeded(make_client, **kwargs):
    client = await make_client(**kwargs)
    resp = await client.post("/upload", data={"file": io.BytesIO(png_bytes())}, headers=ALICE)
    assert resp.status == 201
    client.info = await resp.json()
    return client


async def test_traversal_and_encoded_slashes_on_every_route(make_client):
    client = await seeded(make_client)
    port = client.server.port
    seen = set()
    for method, template in ROUTES:
        for variant in TRAVERSALS:
            for who in ({}, ALICE):
                target = template.replace("{id}", variant) if "{id}" in template else template + "/" + variant
                resp = await raw_request(port, method, target, who)
                seen.add(resp.status)
                assert resp.status < 500, (method, target, resp)
                assert b"SQLite format 3" not in resp.body, (method, target)
                assert b"root:" not in resp.body, (method, target)
                if resp.status >= 400 and method != "HEAD" and not from_parser(resp):
                    assert resp.json()["code"], (method, target, resp)
                    assert resp.headers.get("x-content-type-options") == "nosniff", (method, target)
    assert store_problems(client.data_dir) == []
    assert {200, 201, 400, 404} & seen


OTHER_METHODS = ["OPTIONS", "PATCH", "TRACE", "PROPFIND", "FOO", "M-SEARCH", "LINK", "CONNECT"]


@pytest.mark.parametrize("method", ["HEAD", *OTHER_METHODS])
async def test_odd_methods_on_every_route_are_json_never_500(make_client, method):
    client = await seeded(make_client)
    md5 = client.info["md5"]
    for _, template in ROUTES:
        target = template.replace("{id}", md5)
        resp = await raw_request(client.server.port, method, target, ALICE)
        assert resp.status < 500, (method, target, resp)
        if from_parser(resp):  # llhttp refuses method names it does not know
            continue
        assert resp.headers.get("x-content-type-options") == "nosniff", (method, target)
        if method == "HEAD":
            assert resp.status in (200, 401, 404, 405), (target, resp)
            continue
        # CONNECT takes an authority, not a path: no route matches it
        assert resp.status in ((404, 405) if method == "CONNECT" else (405,)), (method, target, resp)
        if resp.status == 405:
            assert resp.json()["code"] == "method_not_allowed"
            assert resp.headers["allow"]
        assert resp.headers["cache-control"] == "no-store"
    # nothing changed
    assert (await client.get(f"/i/{md5}.png")).status == 200


@pytest.mark.parametrize("size", ["small", "large"])
async def test_absurd_range_headers(make_client, size):
    client = await make_client()
    data = png_bytes() if size == "small" else noise_png(700 * 1024)  # large: served by sendfile
    info = await (await client.put("/upload/r.png", data=data, headers=ALICE)).json()
    n = len(data)
    ranges = [
        ",".join(f"{i}-{i}" for i in range(2000)), "bytes=0-0,1-1,2-2", "bytes=0-0," * 500 + "0-0",
        "bytes=99999999999999999999999-", "bytes=0-99999999999999999999999", "bytes=-99999999999999999999",
        f"bytes={n}-", f"bytes={n - 1}-", "bytes=-0", "bytes=-1", "bytes=5-2", "bytes=-5-", "bytes=--5",
        "bytes=a-b", "bytes=", "bytes", "bites=0-1", "bytes=0-1;2-3", "bytes= 0 - 1 ", "bytes=1e3-2e3",
        "bytes=0x10-0x20", "bytes=-", "bytes=0-0\t", "bytes=٣-٤", "bytes=" + "9" * 5000 + "-",
        "bytes=0-" + str(2**63), "bytes=" + str(2**64) + "-" + str(2**65),
    ]
    for rng in ranges:
        for method in ("GET", "HEAD"):
            resp = await raw_request(client.server.port, method, f"/i/{info['md5']}.png", {"Range": rng})
            assert resp.status in (200, 206, 400, 416), (rng, resp)
            if from_parser(resp):  # the 2000-range header is longer than a header line may be
                continue
            assert resp.headers["x-content-type-options"] == "nosniff"
            if method == "GET" and resp.status == 200:
                assert resp.body == data, rng
            if method == "GET" and resp.status == 206:
                first, last = resp.headers["content-range"].split()[1].split("/")[0].split("-")
                assert resp.body == data[int(first):int(last) + 1], rng
            if resp.status == 416:
                assert resp.headers["cache-control"] == "no-store"


async def test_one_megabyte_header_is_refused_cleanly(make_client):
    client = await seeded(make_client)
    for name, value in (("X-Big", "a" * (1024 * 1024)), ("Cookie", "c=" + "b" * (1024 * 1024)),
                        ("Authorization", "Basic " + "QUFB" * (256 * 1024))):
        data = await raw_exchange(client.server.port, request_bytes("GET", "/healthz", {name: value}),
                                  timeout=10)
        responses = parse_responses(data)
        assert responses, name
        assert responses[0].status in (400, 413, 431), (name, responses[0])
    many = {f"X-H{i}": "v" for i in range(20_000)}
    data = await raw_exchange(client.server.port, request_bytes("GET", "/healthz", many), timeout=10)
    assert parse_responses(data)[0].status in (400, 413, 431)
    long_target = "/i/" + "a" * (1024 * 1024)
    data = await raw_exchange(client.server.port, request_bytes("GET", long_target), timeout=10)
    assert parse_responses(data)[0].status in (400, 414, 431)
    assert (await client.get("/healthz")).status == 200


async def test_content_length_shorter_than_body(make_client):
    client = await make_client()
    data = png_bytes()
    raw = request_bytes("PUT", "/upload/x.png", ALICE, data, close=False, length=40)
    responses = parse_responses(await raw_exchange(client.server.port, raw, timeout=5))
    # The first 40 bytes are a truncated PNG and the rest is not a request:
    # aiohttp answers that with a 400 and closes the connection.
    assert responses and all(400 <= r.status < 500 for r in responses), responses
    assert store_problems(client.data_dir) == []
    assert (await client.get("/healthz")).status == 200


async def test_content_length_longer_than_body_then_eof(make_client):
    client = await make_client()
    raw = request_bytes("PUT", "/upload/x.png", ALICE, png_bytes(), close=False, length=100_000)
    responses = parse_responses(await raw_exchange(client.server.port, raw, timeout=5, half_close=True))
    # The client gave up: either a 400 on the way out or no answer to nobody.
    assert all(400 <= r.status < 500 for r in responses), responses
    assert store_problems(client.data_dir) == [] and list((client.data_dir / "tmp").iterdir()) == []
    assert (await client.get("/healthz")).status == 200


async def test_content_length_longer_than_body_then_silence(make_client, monkeypatch):
    monkeypatch.setattr(imgproxy, "UPLOAD_IDLE_TIMEOUT", 0.5)
    client = await make_client()
    raw = request_bytes("PUT", "/upload/x.png", ALICE, png_bytes(), close=False, length=100_000)
    responses = parse_responses(await raw_exchange(client.server.port, raw, timeout=2))
    assert [r.status for r in responses] == [408]
    assert store_problems(client.data_dir) == []


@pytest.mark.parametrize("headers", [
    {"Content-Length": "-1"}, {"Content-Length": "abc"}, {"Content-Length": "1, 2"},
    {"Content-Length": "99999999999999999999999999"}, {"Transfer-Encoding": "gzip"},
    {"Transfer-Encoding": "chunked", "Content-Length": "5"},
], ids=["negative", "text", "list", "huge", "unknown-te", "te-and-cl"])
async def test_bad_framing_headers(make_client, headers):
    client = await make_client()
    head = "PUT /upload/x.png HTTP/1.1\r\nHost: x\r\nAuthorization: " + ALICE["Authorization"] + "\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "Connection: close\r\n\r\n"
    responses = parse_responses(await raw_exchange(client.server.port, head.encode() + b"0\r\n\r\n", timeout=5))
    assert responses and all(400 <= r.status < 500 for r in responses), responses
    assert store_problems(client.data_dir) == []


async def test_pipelined_requests_are_answered_in_order(make_client):
    client = await seeded(make_client)
    md5 = client.info["md5"]
    batch = (request_bytes("GET", "/healthz", close=False)
             + request_bytes("GET", f"/i/{md5}.png", close=False)
             + request_bytes("HEAD", f"/i/{md5}.png", close=False)
             + request_bytes("GET", f"/api/images/{md5}", BOB, close=False)
             + request_bytes("GET", "/nope", close=False)
             + request_bytes("GET", "/healthz", close=True))
    data = await raw_exchange(client.server.port, batch, timeout=10)
    responses = parse_responses(data, (False, False, True, False, False, False))
    assert [r.status for r in responses] == [200, 200, 200, 200, 404, 200]
    assert responses[0].json() == {"status": "ok"}
    assert hashlib.md5(responses[1].body).hexdigest() == md5
    assert responses[2].body == b"" and responses[2].headers["content-type"] == "image/png"
    assert responses[3].json()["md5"] == md5


async def test_pipelined_upload_then_get(make_client):
    client = await make_client()
    data = png_bytes(color=(1, 2, 3))
    md5 = hashlib.md5(data).hexdigest()
    batch = (request_bytes("PUT", "/upload/p.png", ALICE, data, close=False)
             + request_bytes("GET", f"/i/{md5}.png", close=True))
    responses = parse_responses(await raw_exchange(client.server.port, batch, timeout=10))
    assert [r.status for r in responses] == [201, 200]
    assert responses[1].body == data


# ---- Authorization headers that are not what they claim -----------------------------

def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


MALFORMED_AUTH = {
    "bare-scheme": "Basic",
    "empty-token": "Basic ",
    "not-base64": "Basic !!!not base64!!!",
    "bad-padding": "Basic YWxpY2U6YWxpY2UxMjM",
    "no-colon": "Basic " + b64(b"alicealice123"),
    "only-colon": "Basic " + b64(b":"),
    "empty-user": "Basic " + b64(b":alice123"),
    "not-utf8": "Basic " + b64(b"\xff\xfe:\xff\xfe"),
    "latin1-user": "Basic " + b64("alïce:alice123".encode("latin-1")),
    "nul": "Basic " + b64(b"alice\x00:alice123"),
    "bearer": "Bearer " + b64(b"alice:alice123"),
    "digest": 'Digest username="alice", realm="imgproxy", response="x"',
    "double-basic": "Basic Basic " + b64(b"alice:alice123"),
    "trailing-junk": "Basic " + b64(b"alice:alice123") + " extra",
    "huge": "Basic " + b64(b"alice:" + b"x" * 6000),
    "unicode-in-header": "Basic ÿÿÿÿ",
}


@pytest.mark.parametrize("key", list(MALFORMED_AUTH))
async def test_malformed_authorization_is_401_never_500(make_client, key):
    client = await make_client()
    resp = await raw_request(client.server.port, "GET", "/api/images", {"Authorization": MALFORMED_AUTH[key]})
    assert resp.status == 401, resp
    assert resp.json()["code"] == "unauthorized"
    # a refused Bearer (app token) is challenged as one, RFC 6750; the rest as Basic
    assert resp.headers["www-authenticate"].startswith("Bearer" if key == "bearer" else "Basic")


async def test_scheme_is_case_insensitive_and_whitespace_tolerated(make_client):
    client = await make_client()
    token = b64(b"alice:alice123")
    for header in (f"basic {token}", f"BASIC {token}", f"Basic  {token}"):
        resp = await raw_request(client.server.port, "GET", "/api/images", {"Authorization": header})
        assert resp.status == 200, (header, resp)


async def test_raw_non_ascii_bytes_in_authorization(make_client):
    client = await make_client()
    raw = (b"GET /api/images HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xff\xfe\x80\r\n"
           b"Connection: close\r\n\r\n")
    responses = parse_responses(await raw_exchange(client.server.port, raw))
    assert responses[0].status in (400, 401), responses


# ---- security headers on every kind of answer ------------------------------------------

async def all_kinds_of_answers(client) -> list[tuple[str, object]]:
    """(label, response) for a success and the errors of every route."""
    md5 = client.info["md5"]
    img = f"/i/{md5}.png"
    calls = [
        ("page", "GET", "/", {}), ("app.js", "GET", "/static/app.js", {}), ("app.css", "GET", "/static/app.css", {}),
        ("asset-404", "GET", "/static/nope.js", {}), ("healthz", "GET", "/healthz", {}),
        ("openapi", "GET", "/openapi.json", {}),
        ("image", "GET", img, {}), ("image-head", "HEAD", img, {}), ("image-range", "GET", img, {"Range": "bytes=0-9"}),
        ("image-416", "GET", img, {"Range": "bytes=999999-"}), ("image-304", "GET", img, {"If-None-Match": f'"{md5}"'}),
        ("image-404", "GET", f"/i/{MD5}.png", {}), ("image-400", "GET", "/i/nope.png", {}),
        ("image-wrong-ext", "GET", f"/i/{md5}.gif", {}),
        ("lookup", "GET", f"/api/images/{md5}", BOB), ("lookup-404", "GET", f"/api/images/{MD5}", BOB),
        ("lookup-400", "GET", "/api/images/xyz", BOB), ("lookup-401", "GET", f"/api/images/{md5}", {}),
        ("list", "GET", "/api/images", BOB), ("list-400", "GET", "/api/images?limit=0", BOB),
        ("renew", "POST", f"/api/images/{md5}/renew", BOB), ("renew-404", "POST", f"/api/images/{MD5}/renew", BOB),
        ("db", "GET", "/api/db", ALICE), ("db-403", "GET", "/api/db", BOB), ("db-401", "GET", "/api/db", {}),
        ("delete-404", "DELETE", f"/api/images/{MD5}", BOB),
        ("upload-400", "POST", "/upload", ALICE), ("upload-415", "PUT", "/upload/x.png", ALICE),
        ("405", "PATCH", "/upload", ALICE), ("404", "GET", "/nowhere", {}),
    ]
    out = []
    for label, method, path, headers in calls:
        data = b"not an image" if label == "upload-415" else None
        resp = await client.request(method, path, headers=headers, data=data)
        await resp.read()
        out.append((label, resp))
    # a protocol-level error built by aiohttp itself, before any handler
    raw = parse_responses(await raw_exchange(client.server.port, b"GET /\x00 HTTP/1.1\r\n\r\n"))
    out.append(("bad-request-line", raw[0]))
    return out


async def test_every_answer_has_nosniff_and_errors_are_not_cached(make_client):
    client = await seeded(make_client)
    for label, resp in await all_kinds_of_answers(client):
        headers = {k.lower(): v for k, v in resp.headers.items()}
        if label == "bad-request-line":
            assert from_parser(resp)
            continue
        assert headers.get("x-content-type-options") == "nosniff", label
        if resp.status >= 400:
            assert headers.get("cache-control") == "no-store", label
    db = await client.get("/api/db", headers=ALICE)
    assert db.headers["Cache-Control"] == "no-store"


async def test_images_carry_a_csp_that_forbids_scripts(make_client):
    client = await seeded(make_client)
    for label, resp in await all_kinds_of_answers(client):
        if not label.startswith("image") or resp.status >= 400:
            continue
        csp = resp.headers["Content-Security-Policy"]
        directives = {d.strip().split()[0]: d.strip() for d in csp.split(";") if d.strip()}
        assert directives["default-src"] == "default-src 'none'", label
        assert "script-src" not in directives and "sandbox" in directives, label
