"""Sizes and formats on the fly (/i/{md5}/{size}.{fmt}) against a real server,
real SQLite and real files: rendering, negotiation, headers, single flight,
back-pressure, the disk budget and the variants' life cycle."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image, ImageCms, features

import imgproxy
from conftest import ALICE, BOB, ROOT, corpus_file
from helpers import http_exchange, noise_png, stored_files

DAY = 86400.0
HAS_AVIF = features.check("avif")


def photo(size=(1200, 800), fmt="JPEG", mode="RGB", orientation=None, icc=None, exif_gps=False,
          seed=0) -> bytes:
    """A smooth gradient with a little structure, like a photo (compresses like one)."""
    w, h = size
    base = Image.linear_gradient("L").resize(size)
    im = Image.merge("RGB", (base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                             Image.new("L", size, (seed * 37) % 256)))
    im.paste((255, 0, 0), (0, 0, max(1, w // 10), max(1, h // 10)))  # a red mark top-left
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(Image.linear_gradient("L").resize(size))  # transparent at the top
    options = {}
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    if exif_gps:
        exif[0x010F] = "SpyCam"
        exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0)}
    if len(exif):
        options["exif"] = exif.tobytes()
    if icc:
        options["icc_profile"] = icc
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


async def put(client, data: bytes, name: str = "x.jpg", headers=ALICE) -> str:
    resp = await client.put(f"/upload/{name}", data=data, headers=headers)
    assert resp.status in (200, 201), await resp.text()
    return (await resp.json())["md5"]


async def fetch(client, url: str, **headers) -> tuple[int, dict, bytes]:
    resp = await client.get(url, headers={k.replace("_", "-"): v for k, v in headers.items()})
    return resp.status, resp.headers, await resp.read()


def decoded(body: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(body))
    im.load()
    return im


def variant_files(data_dir: Path) -> list[Path]:
    root = data_dir / "variants"
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "locks")


def renders(client) -> int:
    return client.app[imgproxy.VARIANTS].renders


# ---- sizes and formats -------------------------------------------------------------

@pytest.mark.parametrize("size,expected", [("160", (160, 107)), ("640", (640, 427)),
                                           ("1280", (1200, 800)), ("full", (1200, 800))],
                         ids=["160", "640", "never-enlarged", "full"])
async def test_size_sets_the_width_and_keeps_the_aspect_ratio(make_client, size, expected):
    client = await make_client()
    md5 = await put(client, photo((1200, 800)))
    status, headers, body = await fetch(client, f"/i/{md5}/{size}.webp")
    assert status == 200
    assert headers["Content-Type"] == "image/webp"
    assert decoded(body).size == expected


@pytest.mark.parametrize("fmt,pillow,mime", [
    ("jpg", "JPEG", "image/jpeg"), ("png", "PNG", "image/png"), ("webp", "WEBP", "image/webp"),
    ("gif", "GIF", "image/gif"),
    pytest.param("avif", "AVIF", "image/avif",
                 marks=pytest.mark.skipif(not HAS_AVIF, reason="this Pillow cannot write AVIF")),
])
async def test_each_format_is_what_it_says(make_client, fmt, pillow, mime):
    client = await make_client()
    md5 = await put(client, photo((800, 600)))
    status, headers, body = await fetch(client, f"/i/{md5}/320.{fmt}")
    assert status == 200 and headers["Content-Type"] == mime
    im = decoded(body)
    assert im.format == pillow and im.size == (320, 240)


async def test_first_render_of_a_big_jpeg_uses_reduced_decoding_and_gives_a_sharp_result(make_client):
    client = await make_client()
    md5 = await put(client, photo((4000, 3000)))
    status, _, body = await fetch(client, f"/i/{md5}/640.jpg")
    assert status == 200
    im = decoded(body).convert("RGB")
    assert im.size == (640, 480)
    # The red mark (top-left tenth) survives resizing: the picture is the picture.
    r, g, b = im.getpixel((20, 20))
    assert r > 200 and g < 60 and b < 60


# ---- negotiation -------------------------------------------------------------------

@pytest.mark.parametrize("accept,source_mode,expected", [
    ("image/avif,image/webp,*/*", "RGB", "image/avif" if HAS_AVIF else "image/webp"),
    ("image/webp,*/*;q=0.8", "RGB", "image/webp"),
    ("image/avif;q=0,image/webp", "RGB", "image/webp"),
    ("*/*", "RGB", "image/jpeg"),
    ("image/*", "RGB", "image/jpeg"),
    (None, "RGB", "image/jpeg"),
    ("*/*", "RGBA", "image/png"),
    (None, "RGBA", "image/png"),
    ("image/webp", "RGBA", "image/webp"),
], ids=["avif-first", "webp", "q0-refuses", "star", "image-star", "no-header", "alpha-star", "alpha-none",
        "alpha-webp"])
async def test_accept_negotiation(make_client, accept, source_mode, expected):
    client = await make_client()
    fmt = "PNG" if source_mode == "RGBA" else "JPEG"
    md5 = await put(client, photo((500, 400), fmt=fmt, mode=source_mode), name=f"x.{fmt.lower()}")
    headers = {} if accept is None else {"Accept": accept}
    resp = await client.get(f"/i/{md5}/320", headers=headers)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == expected
    assert resp.headers["Vary"] == "Accept"
    assert decoded(await resp.read()).size == (320, 256)


async def test_explicit_format_has_no_vary(make_client):
    client = await make_client()
    md5 = await put(client, photo((500, 400)))
    status, headers, _ = await fetch(client, f"/i/{md5}/320.jpg", Accept="image/webp")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert "Vary" not in headers


# ---- refusals ----------------------------------------------------------------------

@pytest.mark.parametrize("tail,word", [("999.webp", "'999'"), ("0640.webp", "'0640'"), ("abc", "'abc'"),
                                       ("300.bmp", "'bmp'"), ("300.", "''"), ("300.webp.jpg", "'webp.jpg'"),
                                       ("FULL.png", "'FULL'")],
                         ids=["width-not-offered", "leading-zero", "word", "format", "empty-format",
                              "double-extension", "case"])
async def test_bad_variant_is_400_listing_what_is_allowed(make_client, tail, word):
    client = await make_client(server={"variant_widths": [100, 300]})
    md5 = await put(client, photo((500, 400)))
    status, headers, body = await fetch(client, f"/i/{md5}/{tail}")
    assert status == 400
    err = decoded_json(body)
    assert err["code"] == "bad_variant"
    assert word in err["error"]
    assert "full, 100, 300" in err["error"] and "jpg, png, webp" in err["error"]
    assert not variant_files(client.data_dir)


def decoded_json(body: bytes) -> dict:
    return json.loads(body)


async def test_unknown_expired_and_malformed_md5(make_client, clock):
    client = await make_client(clock=clock, cleanup={"expire_days": 1})
    md5 = await put(client, photo((500, 400)))
    assert (await fetch(client, f"/i/{'0' * 32}/320.webp"))[0] == 404
    status, _, body = await fetch(client, "/i/nothex/320.webp")
    assert status == 400 and decoded_json(body)["code"] == "bad_md5"
    assert (await fetch(client, f"/i/{md5}/320.webp"))[0] == 200
    clock.advance(DAY + 1)
    status, headers, body = await fetch(client, f"/i/{md5}/320.webp")
    assert status == 404 and decoded_json(body)["code"] == "not_found"
    assert headers["Cache-Control"] == "no-store"


async def test_empty_width_list_turns_variants_off(make_client):
    client = await make_client(server={"variant_widths": []})
    md5 = await put(client, photo((500, 400)))
    for tail in ("320.webp", "full.png", "full", "999.bmp"):
        assert (await fetch(client, f"/i/{md5}/{tail}"))[0] == 404
    assert (await fetch(client, f"/i/{md5}.jpg"))[0] == 200  # originals unaffected
    assert not variant_files(client.data_dir)


@pytest.mark.parametrize("value,message", [
    ("640", "server.variant_widths: expected a list"),
    ([640, "big"], "server.variant_widths: expected widths in pixels"),
    ([0], "server.variant_widths: expected widths in pixels"),
    ([True], "server.variant_widths: expected widths in pixels"),
])
def test_config_rejects_bad_widths(tmp_path, value, message):
    with pytest.raises(imgproxy.ConfigError, match=message):
        imgproxy.parse_config({"server": {"variant_widths": value}}, tmp_path)


@pytest.mark.parametrize("value", [0, -1, "big"])
def test_config_rejects_bad_variant_cache(tmp_path, value):
    with pytest.raises(imgproxy.ConfigError, match="server.variant_cache_mb"):
        imgproxy.parse_config({"server": {"variant_cache_mb": value}}, tmp_path)


# ---- headers, 304, ranges, access counts -----------------------------------------

async def test_headers_match_the_originals_and_etag_is_the_variants_md5(make_client, clock):
    client = await make_client(clock=clock, cleanup={"expire_days": 2})
    md5 = await put(client, photo((500, 400)))
    _, original, _ = await fetch(client, f"/i/{md5}.jpg")
    clock.advance(DAY)
    status, headers, body = await fetch(client, f"/i/{md5}/320.webp")
    assert status == 200
    assert headers["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert headers["ETag"] != original["ETag"]
    max_age = int(headers["Cache-Control"].split("max-age=")[1].split(",")[0])
    assert DAY - 5 <= max_age <= DAY  # bounded by the image's expiry, a day away now
    for name in ("X-Content-Type-Options", "Content-Security-Policy", "Access-Control-Allow-Origin",
                 "Accept-Ranges"):
        assert headers[name] == original[name], name
    head = await client.head(f"/i/{md5}/320.webp")
    assert head.status == 200 and head.headers["ETag"] == headers["ETag"]
    assert int(head.headers["Content-Length"]) == len(body)


async def test_if_none_match_is_304_and_ranges_are_served(make_client):
    client = await make_client()
    md5 = await put(client, photo((900, 600)))
    _, headers, body = await fetch(client, f"/i/{md5}/640.png")
    resp = await client.get(f"/i/{md5}/640.png", headers={"If-None-Match": headers["ETag"]})
    assert resp.status == 304 and await resp.read() == b""
    status, part_headers, part = await fetch(client, f"/i/{md5}/640.png", Range="bytes=10-109")
    assert status == 206 and part == body[10:110]
    assert part_headers["Content-Range"] == f"bytes 10-109/{len(body)}"


async def test_a_large_variant_is_served_from_disk_with_ranges(make_client):
    client = await make_client()
    md5 = await put(client, noise_png(2_000_000), name="x.png")
    _, headers, body = await fetch(client, f"/i/{md5}/full.png")
    assert len(body) > imgproxy.BODY_CACHE_MAX_FILE  # too big for the memory cache
    assert headers["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    status, again_headers, again = await fetch(client, f"/i/{md5}/full.png")
    assert status == 200 and again == body and again_headers["ETag"] == headers["ETag"]
    status, _, part = await fetch(client, f"/i/{md5}/full.png", Range="bytes=-100")
    assert status == 206 and part == body[-100:]
    resp = await client.get(f"/i/{md5}/full.png", headers={"If-None-Match": headers["ETag"]})
    assert resp.status == 304


async def test_variant_gets_count_as_accesses_of_the_image(make_client):
    client = await make_client()
    md5 = await put(client, photo((500, 400)))
    for url in (f"/i/{md5}/320.webp", f"/i/{md5}/320.webp", f"/i/{md5}/160"):
        assert (await fetch(client, url))[0] == 200
    await client.head(f"/i/{md5}/320.webp")  # HEAD does not count, as for originals
    await client.app[imgproxy.STORE].flush_counts()
    info = await (await client.get(f"/api/images/{md5}", headers=ALICE)).json()
    assert info["access_count"] == 3


# ---- what a render does ------------------------------------------------------------

async def test_orientation_is_applied(make_client):
    client = await make_client()
    # Stored 400x200 with "rotate 90° clockwise to view": people see 200x400, red mark top-right.
    md5 = await put(client, photo((400, 200), orientation=6))
    for size, expected in (("full", (200, 400)), ("160", (160, 320))):
        status, _, body = await fetch(client, f"/i/{md5}/{size}.png")
        im = decoded(body).convert("RGB")
        assert status == 200 and im.size == expected
        r, g, b = im.getpixel((im.width - 3, 3))
        assert r > 200 and g < 60 and b < 60, (size, (r, g, b))
        assert "exif" not in im.info and not im.getexif()


async def test_no_metadata_but_the_icc_profile_is_carried_over(make_client):
    client = await make_client()
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    md5 = await put(client, photo((600, 400), exif_gps=True, icc=icc))
    for fmt in ("jpg", "webp", "png"):
        status, _, body = await fetch(client, f"/i/{md5}/320.{fmt}")
        im = decoded(body)
        assert status == 200
        assert not im.getexif(), fmt
        assert b"SpyCam" not in body
        assert im.info.get("icc_profile") == icc, fmt


@pytest.mark.parametrize("fmt", ["png", "webp", "gif"] + (["avif"] if HAS_AVIF else []))
async def test_transparency_is_preserved_where_the_format_holds_it(make_client, fmt):
    client = await make_client()
    md5 = await put(client, photo((400, 400), fmt="PNG", mode="RGBA"), name="x.png")
    status, _, body = await fetch(client, f"/i/{md5}/160.{fmt}")
    assert status == 200
    im = decoded(body).convert("RGBA")
    assert im.getpixel((80, 1))[3] < 30      # top row: transparent
    assert im.getpixel((80, 158))[3] > 220   # bottom row: opaque


async def test_jpeg_of_a_transparent_image_is_flattened_on_white(make_client):
    client = await make_client()
    md5 = await put(client, photo((400, 400), fmt="PNG", mode="RGBA"), name="x.png")
    status, _, body = await fetch(client, f"/i/{md5}/160.jpg")
    im = decoded(body)
    assert status == 200 and im.mode == "RGB"
    assert min(im.getpixel((80, 0))) > 240  # fully transparent became white


async def test_animated_gif_variant_is_its_first_frame(make_client):
    client = await make_client()
    frames = [Image.new("RGB", (300, 200), color) for color in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    md5 = await put(client, buf.getvalue(), name="x.gif")
    for fmt in ("gif", "webp", "png"):
        status, _, body = await fetch(client, f"/i/{md5}/160.{fmt}")
        im = Image.open(io.BytesIO(body))
        assert status == 200 and getattr(im, "n_frames", 1) == 1, fmt
        r, g, b = im.convert("RGB").getpixel((80, 50))
        assert r > 200 and g < 50, fmt


@pytest.mark.parametrize("name,mode", [("pil_sample_cmyk.jpg", "CMYK"), ("basn3p04.png", "P"),
                                       ("basn0g16.png", "I;16"), ("tbbn3p08.png", "P+transparency")])
async def test_corpus_modes_render(make_client, corpus, name, mode):
    client = await make_client()
    md5 = await put(client, (corpus / name).read_bytes(), name=name)
    for fmt in ("jpg", "webp", "png"):
        status, _, body = await fetch(client, f"/i/{md5}/full.{fmt}")
        assert status == 200, (mode, fmt, body[:200])
        assert decoded(body).size[0] > 0


# ---- single flight and back-pressure ---------------------------------------------

async def test_64_concurrent_first_requests_render_once(make_client):
    client = await make_client()
    md5 = await put(client, photo((3000, 2000)))
    results = await asyncio.gather(*(fetch(client, f"/i/{md5}/640.webp") for _ in range(64)))
    assert {status for status, _, _ in results} == {200}
    assert len({body for _, _, body in results}) == 1
    assert renders(client) == 1
    assert len(variant_files(client.data_dir)) == 1


async def test_a_full_render_queue_answers_503_with_retry_after_and_cached_keep_serving(make_client):
    client = await make_client()
    md5 = await put(client, photo((3000, 2000), fmt="PNG"), name="x.png")
    assert (await fetch(client, f"/i/{md5}/160.webp"))[0] == 200
    client.app[imgproxy.VARIANTS].queue_limit = 1
    slow = asyncio.ensure_future(fetch(client, f"/i/{md5}/full.png"))
    while not client.app[imgproxy.VARIANTS].rendering:
        await asyncio.sleep(0.005)
    status, headers, body = await fetch(client, f"/i/{md5}/320.webp")
    assert status == 503 and int(headers["Retry-After"]) > 0
    assert decoded_json(body)["code"] == "unavailable"
    assert (await fetch(client, f"/i/{md5}/160.webp"))[0] == 200  # already rendered: still served
    assert (await fetch(client, f"/i/{md5}.png"))[0] == 200
    assert (await slow)[0] == 200
    assert (await fetch(client, f"/i/{md5}/320.webp"))[0] == 200  # room again


async def test_flood_of_unknown_md5s_and_bad_sizes_renders_nothing_and_writes_nothing(make_client):
    client = await make_client()
    md5 = await put(client, photo((500, 400)))
    before = sorted(p for p in client.data_dir.rglob("*") if p.is_file() and p.name != "images.db-wal")
    stored_before = stored_files(client.data_dir, everything=True)
    urls = [f"/i/{hashlib.md5(str(i).encode()).hexdigest()}/320.webp" for i in range(300)]
    urls += [f"/i/{md5}/{w}.webp" for w in range(321, 520)] + [f"/i/{md5}/320.x{i}" for i in range(50)]
    results = await asyncio.gather(*(fetch(client, u) for u in urls))
    assert {s for s, _, _ in results} == {400, 404}
    assert renders(client) == 0
    after = sorted(p for p in client.data_dir.rglob("*") if p.is_file() and p.name != "images.db-wal")
    assert after == before and stored_files(client.data_dir, everything=True) == stored_before


# ---- disk budget and life cycle --------------------------------------------------

async def test_disk_budget_evicts_least_recently_used_first(make_client):
    budget_mb = 0.4
    client = await make_client(server={"variant_cache_mb": budget_mb})
    md5s = [await put(client, noise_png(200_000, seed=i), name=f"{i}.png") for i in range(6)]
    first = await fetch(client, f"/i/{md5s[0]}/160.png")
    size = len(first[2])
    assert 70_000 < size < 84_000  # five fit in the budget, six do not
    for m in md5s[1:4]:
        assert (await fetch(client, f"/i/{m}/160.png"))[0] == 200
    await client.app[imgproxy.VARIANTS].sweep()
    files = variant_files(client.data_dir)
    assert len(files) == 4
    # Age them all by two hours, oldest first; then use the oldest again (a hit
    # refreshes the mtime once an hour at most: here the file is older than that).
    for i, path in enumerate(sorted(files, key=lambda p: md5s.index(p.name[:32]))):
        os.utime(path, (time.time() - 7200 + i, time.time() - 7200 + i))
    client.app[imgproxy.VARIANTS].forget_key(f"{md5s[0]}-160.png")  # as after a restart
    assert (await fetch(client, f"/i/{md5s[0]}/160.png"))[2] == first[2]
    for m in md5s[4:]:
        assert (await fetch(client, f"/i/{m}/160.png"))[0] == 200
    kept = await client.app[imgproxy.VARIANTS].sweep()
    assert kept <= budget_mb * 1024 * 1024
    names = {p.name[:32] for p in variant_files(client.data_dir)}
    assert md5s[0] in names and md5s[5] in names  # recently used and newest stay
    assert md5s[1] not in names                    # least recently used went first
    # An evicted variant is rendered again on demand.
    assert (await fetch(client, f"/i/{md5s[1]}/160.png"))[0] == 200


async def test_variants_go_with_their_image_on_delete(make_client):
    client = await make_client()
    md5 = await put(client, photo((500, 400)))
    await put(client, photo((500, 400)), headers=BOB)
    other = await put(client, photo((500, 400), seed=3))
    for url in (f"/i/{md5}/320.webp", f"/i/{md5}/160.png", f"/i/{other}/160.png"):
        assert (await fetch(client, url))[0] == 200
    assert (await client.delete(f"/api/images/{md5}", headers=BOB)).status == 204
    assert len(variant_files(client.data_dir)) == 3  # alice still holds it
    assert (await client.delete(f"/api/images/{md5}", headers=ALICE)).status == 204
    assert [p.name[:32] for p in variant_files(client.data_dir)] == [other]
    assert (await fetch(client, f"/i/{md5}/320.webp"))[0] == 404


async def test_variants_go_with_their_image_on_expiry(make_client, clock):
    client = await make_client(clock=clock, cleanup={"expire_days": 1})
    md5 = await put(client, photo((500, 400)))
    assert (await fetch(client, f"/i/{md5}/320.webp"))[0] == 200
    clock.advance(DAY / 2)
    fresh = await put(client, photo((500, 400), seed=5))
    assert (await fetch(client, f"/i/{fresh}/320.webp"))[0] == 200
    clock.advance(DAY / 2 + 1)
    report = await imgproxy.run_cleanup_pass(client.app[imgproxy.STORE])
    assert report.expired == 1
    assert [p.name[:32] for p in variant_files(client.data_dir)] == [fresh]


async def test_cleanup_repairs_variants_without_an_image(make_client):
    client = await make_client()
    md5 = await put(client, photo((500, 400)))
    assert (await fetch(client, f"/i/{md5}/320.webp"))[0] == 200
    ghost = "f" * 32
    stray = client.data_dir / "variants" / "ff" / "ff" / f"{ghost}-320.webp"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"left by a crash")
    foreign = client.data_dir / "variants" / "notes.txt"
    foreign.write_bytes(b"x")
    store = client.app[imgproxy.STORE]
    dry = await imgproxy.run_cleanup_pass(store, dry_run=True)
    assert dry.orphan_variants == 2 and stray.exists()
    report = await imgproxy.run_cleanup_pass(store)
    assert report.orphan_variants == 2 and "2 orphan variants" in report.summary()
    assert not stray.exists() and not foreign.exists()
    assert [p.name[:32] for p in variant_files(client.data_dir)] == [md5]
    assert (await fetch(client, f"/i/{md5}/320.webp"))[0] == 200


async def test_variants_are_written_atomically_under_the_fan_out(make_client):
    client = await make_client()
    md5 = await put(client, photo((500, 400)))
    _, _, body = await fetch(client, f"/i/{md5}/320.webp")
    path = client.data_dir / "variants" / md5[:2] / md5[2:4] / f"{md5}-320.webp"
    assert path.read_bytes() == body
    assert not list((client.data_dir / "tmp").iterdir())  # the tmp file was renamed, not copied


async def test_a_restarted_server_serves_the_variant_from_disk_without_rendering(make_client, make_config):
    config_path = make_config(server={"base_url": "http://img.test"})
    client = await make_client(config_path)
    md5 = await put(client, photo((500, 400)))
    _, headers, body = await fetch(client, f"/i/{md5}/320.webp")
    await client.close()
    again = await make_client(config_path)
    status, headers2, body2 = await fetch(again, f"/i/{md5}/320.webp")
    assert status == 200 and body2 == body and headers2["ETag"] == headers["ETag"]
    assert renders(again) == 0


# ---- client.py -------------------------------------------------------------------

def test_client_gives_variant_urls_without_an_extra_request(make_config, live_server, tmp_path):
    import client as imgclient
    server = live_server(make_config())
    picture = tmp_path / "holiday.jpg"
    picture.write_bytes(photo((900, 600)))
    cache = tmp_path / "cache.db"
    c = imgclient.Client(server.base_url, "alice", "alice123", cache_path=cache)
    url = c.get_image_url(picture, size=640, fmt="webp")
    md5 = hashlib.md5(picture.read_bytes()).hexdigest()
    assert url == f"{server.base_url}/i/{md5}/640.webp"
    assert c.get_image_url(picture, size=320) == f"{server.base_url}/i/{md5}/320"
    assert c.get_image_url(picture, fmt="avif") == f"{server.base_url}/i/{md5}/full.avif"
    status, headers, body = http_exchange("GET", url)
    assert status == 200 and headers["Content-Type"] == "image/webp"
    assert decoded(body).size == (640, 427)
    server.stop()  # cached: the variant URL needs no request at all
    offline = imgclient.Client(server.base_url, "alice", "alice123", cache_path=cache)
    assert offline.get_image_url(picture, size=640, fmt="webp") == url
    with pytest.raises(ValueError):
        imgclient.variant_url(url, size="huge")
    with pytest.raises(ValueError):
        imgclient.variant_url(url, fmt="bmp")


def test_client_cli_size_and_format(make_config, live_server, tmp_path):
    import subprocess
    import sys
    server = live_server(make_config())
    picture = tmp_path / "holiday.jpg"
    picture.write_bytes(photo((900, 600)))
    md5 = hashlib.md5(picture.read_bytes()).hexdigest()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPROXY_")}
    env.update(IMGPROXY_URL=server.base_url, IMGPROXY_USER="alice", IMGPROXY_PASSWORD="alice123",
               IMGPROXY_CONFIG=str(server.config_path), XDG_CACHE_HOME=str(tmp_path / "xdg"))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "client.py"), *args], env=env,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    done = cli("--size", "640", "--format", "webp", str(picture))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{server.base_url}/i/{md5}/640.webp"
    assert cli("--size", "320", str(picture)).stdout.strip() == f"{server.base_url}/i/{md5}/320"
    bad = cli("--size", "big", str(picture))
    assert bad.returncode == 2 and "--size" in bad.stderr
    status, _, body = http_exchange("GET", done.stdout.strip())
    assert status == 200 and decoded(body).size == (640, 427)


async def test_a_render_past_its_time_budget_answers_503_and_is_kept(make_client, monkeypatch):
    client = await make_client()
    md5 = await put(client, photo((3000, 2000), fmt="PNG"), name="x.png")
    monkeypatch.setattr(imgproxy, "VARIANT_RENDER_SECONDS", 0.001)
    status, headers, body = await fetch(client, f"/i/{md5}/full.png")
    assert status == 503 and headers["Retry-After"] == "5"
    assert decoded_json(body)["code"] == "unavailable"
    monkeypatch.setattr(imgproxy, "VARIANT_RENDER_SECONDS", 30.0)
    status, _, body = await fetch(client, f"/i/{md5}/full.png")
    assert status == 200 and decoded(body).size == (3000, 2000)
    assert renders(client) == 1  # the first render finished and was kept


def test_concurrent_first_requests_render_once_across_workers(make_config, server_process):
    import concurrent.futures
    proc = server_process(make_config(server={"workers": 2, "log_level": "DEBUG"}))
    status, _, body = http_exchange("PUT", proc.base_url + "/upload/big.jpg", photo((3000, 2000)), ALICE)
    assert status == 201
    md5 = decoded_json(body)["md5"]

    def get(_: int) -> tuple[int, bytes]:
        status, _, body = http_exchange("GET", f"{proc.base_url}/i/{md5}/640.webp", timeout=60)
        return status, body

    with concurrent.futures.ThreadPoolExecutor(64) as pool:  # a connection each: both workers answer
        results = list(pool.map(get, range(64)))
    assert {status for status, _ in results} == {200}
    assert len({body for _, body in results}) == 1
    assert proc.terminate() == 0
    assert proc.log.count("rendered variant") == 1, proc.log[-3000:]
    assert "Traceback" not in proc.log


async def test_every_valid_corpus_image_renders_in_every_format(make_client, manifest):
    client = await make_client(server={"formats": list(imgproxy.FORMATS)} if HAS_AVIF else {})
    formats = client.app[imgproxy.VARIANTS].formats
    rendered = set()
    for entry in manifest:
        if entry["expected"] != "valid" or entry["md5"] in rendered:
            continue
        resp = await client.put(f"/upload/{entry['file']}", data=corpus_file(entry["file"]).read_bytes(),
                                headers=ALICE)
        if resp.status not in (200, 201):
            continue  # refused at upload (e.g. HEIC without pillow-heif): nothing to render
        md5 = (await resp.json())["md5"]
        rendered.add(entry["md5"])
        for tail in [f"full.{f}" for f in formats] + ["160", "160.webp"]:
            status, _, body = await fetch(client, f"/i/{md5}/{tail}")
            assert status == 200, (entry["file"], tail, body[:200])
            decoded(body)
    assert len(rendered) > 10
