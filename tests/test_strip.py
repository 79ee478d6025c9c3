"""Metadata removal: the stripper on its own (JPEG, PNG, GIF, WebP, TIFF, AVIF),
a fuzz run over the corpus and damaged variants of it, and the server end to end
(identity by stored bytes, source_md5 in every {md5} slot, client dedup)."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import random
import signal
import struct
import warnings

import pytest
from PIL import Image

import client as stdlib_client
import imgproxy
from conftest import ALICE, BOB, CAROL, read_manifest
from helpers import (_png_chunk, apoll, apply_cuts, gps_exif, jpeg_bytes, metadata_leaks, photo_bytes, png_bytes,
                     srgb_icc, store_problems)


def strip(data: bytes, fmt: str) -> bytes:
    """The stripper as the server runs it on bytes in memory; unchanged input comes back as is."""
    pieces = imgproxy.metadata_cuts(data, fmt)
    return data if pieces is None else apply_cuts(data, pieces)


def pixels(data: bytes) -> list[tuple[str, tuple[int, int], bytes]]:
    """Every frame decoded: mode, size and raw pixels."""
    out = []
    with Image.open(io.BytesIO(data)) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            im.load()
            out.append((im.mode, im.size, im.tobytes()))
    return out


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, first bytes of the payload) of each segment before the first scan."""
    out, pos = [], 2
    while data[pos + 1] != 0xDA:
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        out.append((data[pos + 1], data[pos + 4:pos + 4 + 12]))
        pos += 2 + length
    return out


# ---- JPEG ----------------------------------------------------------------------

def test_jpeg_loses_gps_serial_xmp_comment_and_trailer_keeps_icc_and_pixels():
    original = photo_bytes("JPEG", xmp=b"<x:xmpmeta>Secret-Garden-42</x:xmpmeta>",
                           comment=b"shot at home") + b"PK\x03\x04 appended zip"
    assert len(metadata_leaks(original)) >= 5
    stripped = strip(original, "JPEG")
    assert metadata_leaks(stripped) == []
    assert b"shot at home" not in stripped and b"PK\x03\x04" not in stripped
    assert stripped.endswith(b"\xff\xd9")
    with Image.open(io.BytesIO(stripped)) as im:
        assert im.info["icc_profile"] == srgb_icc()
        assert "exif" not in im.info  # orientation 1: no Exif at all
    assert pixels(stripped) == pixels(original)
    assert len(stripped) < len(original)


def test_jpeg_orientation_stays_as_a_lone_tag():
    original = photo_bytes("JPEG", orientation=6)
    stripped = strip(original, "JPEG")
    exif = Image.open(io.BytesIO(stripped)).getexif()
    assert dict(exif) == {0x0112: 6}
    assert metadata_leaks(stripped) == []
    assert pixels(stripped) == pixels(original)
    assert imgproxy.metadata_cuts(stripped, "JPEG") is None  # already clean: nothing to do


def test_jfif_thumbnail_goes_jfif_header_stays():
    plain = jpeg_bytes((32, 32))
    assert plain[2:4] == b"\xff\xe0"
    end = 4 + int.from_bytes(plain[4:6], "big")
    thumbnail = bytes([7, 7, 7]) * 4  # 2x2 RGB preview
    jfif = plain[6:18] + b"\x02\x02" + thumbnail
    tagged = plain[:2] + b"\xff\xe0" + (len(jfif) + 2).to_bytes(2, "big") + jfif + plain[end:]
    stripped = strip(tagged, "JPEG")
    assert stripped == plain[:2] + b"\xff\xe0\x00\x10" + plain[6:18] + b"\x00\x00" + plain[end:]
    assert pixels(stripped) == pixels(tagged)


def test_jpeg_without_metadata_is_left_alone():
    plain = jpeg_bytes((32, 32))
    bare = plain[:2] + plain[2 + 2 + int.from_bytes(plain[4:6], "big"):]  # without JFIF too
    for data in (plain, bare):
        assert imgproxy.metadata_cuts(data, "JPEG") is None


def test_jpeg_keeps_jfif_adobe_and_icc_drops_mpf_second_image(corpus):
    cmyk = (corpus / "pil_sample_cmyk.jpg").read_bytes()
    stripped = strip(cmyk, "JPEG")
    assert any(m == 0xEE and head.startswith(b"Adobe") for m, head in jpeg_segments(stripped))
    assert pixels(stripped) == pixels(cmyk)

    # A camera's MPO: an APP2 "MPF" index and a second JPEG after the first one's EOI.
    primary = photo_bytes("JPEG", size=(40, 30))
    mpf = b"\xff\xe2" + struct.pack(">H", 2 + 4 + 8) + b"MPF\0" + b"MM\x00\x2a\x00\x00\x00\x08"
    camera = primary[:2] + mpf + primary[2:] + jpeg_bytes((8, 8), (9, 9, 9))
    stripped = strip(camera, "JPEG")
    markers = [(m, head[:4]) for m, head in jpeg_segments(stripped)]
    assert (0xE2, b"MPF\0") not in markers and (0xE2, b"ICC_") in markers and markers[0] == (0xE0, b"JFIF")
    assert stripped.count(b"\xff\xd8") == 1 and stripped.endswith(b"\xff\xd9")
    assert pixels(stripped) == pixels(primary)


def test_jpeg_php_in_exif_is_gone(corpus):
    data = (corpus / "POC_phpinfo-metadata.jpg").read_bytes()
    assert b"<?php" in data
    stripped = strip(data, "JPEG")
    assert b"<?php" not in stripped
    assert pixels(stripped) == pixels(data)


# ---- PNG -------------------------------------------------------------------------

def png_with_metadata(orientation: int = 1) -> bytes:
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("Location", "Secret-Garden-42")
    info.add_text("Comment", "compressed words " * 20, zip=True)
    info.add_itxt("Author", "Ünïcode person")
    data = photo_bytes("PNG", pnginfo=info, orientation=orientation)
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + _png_chunk(b"tIME", b"\x07\xea\x0b\x1e\x0a\x00\x00") + data[iend:] + b"trailing!"


def test_png_loses_text_time_exif_and_trailer_keeps_icc_and_pixels():
    original = png_with_metadata()
    stripped = strip(original, "PNG")
    for kind in (b"tEXt", b"zTXt", b"iTXt", b"tIME", b"eXIf"):
        assert kind in original and kind not in stripped, kind
    assert metadata_leaks(stripped) == [] and not stripped.endswith(b"trailing!")
    assert b"iCCP" in stripped and stripped.endswith(b"IEND\xaeB`\x82")
    with Image.open(io.BytesIO(stripped)) as im:
        im.verify()  # every kept chunk's CRC still holds
    assert pixels(stripped) == pixels(original)


def test_png_orientation_becomes_a_minimal_exif_chunk():
    stripped = strip(png_with_metadata(orientation=8), "PNG")
    assert dict(Image.open(io.BytesIO(stripped)).getexif()) == {0x0112: 8}
    assert imgproxy.metadata_cuts(stripped, "PNG") is None


def test_png_apng_and_transparency_chunks_stay(corpus):
    for name in ("delay.png", "tbbn3p08.png", "basn0g16.png", "exif2c08.png"):
        data = (corpus / name).read_bytes()
        stripped = strip(data, "PNG")
        assert pixels(stripped) == pixels(data), name
        for kind in (b"acTL", b"fcTL", b"fdAT", b"tRNS", b"gAMA"):
            assert data.count(kind) == stripped.count(kind), (name, kind)


# ---- WebP ------------------------------------------------------------------------

def webp_chunks(data: bytes) -> list[bytes]:
    out, pos = [], 12
    while pos < len(data):
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        out.append(data[pos:pos + 4])
        pos += 8 + size + (size & 1)
    return out


@pytest.mark.parametrize("orientation", [1, 3])
@pytest.mark.parametrize("lossless", [False, True], ids=["lossy", "lossless"])
def test_webp_loses_exif_and_xmp_fixes_riff_size_and_flags(orientation, lossless):
    original = photo_bytes("WEBP", xmp=b"<x:xmpmeta>Secret-Garden-42</x:xmpmeta>",
                           orientation=orientation, lossless=lossless) + b"junk after RIFF"
    assert {b"EXIF", b"XMP ", b"ICCP"} <= set(webp_chunks(original))
    stripped = strip(original, "WEBP")
    assert int.from_bytes(stripped[4:8], "little") == len(stripped) - 8
    chunks = webp_chunks(stripped)
    assert b"XMP " not in chunks and b"ICCP" in chunks
    flags = stripped[20]  # VP8X's first payload byte
    assert not flags & 0x04 and flags & 0x20
    assert bool(flags & 0x08) == (b"EXIF" in chunks) == (orientation != 1)
    assert metadata_leaks(stripped) == []
    with Image.open(io.BytesIO(stripped)) as im:
        assert im.info["icc_profile"] == srgb_icc()
        assert im.getexif().get(0x0112, 1) == orientation
    assert pixels(stripped) == pixels(original)


def test_animated_webp_keeps_frames(corpus):
    data = (corpus / "iss634.webp").read_bytes()
    frames = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    frames.save(buf, "WEBP", save_all=True, exif=gps_exif(), lossless=True)
    tagged = buf.getvalue()
    stripped = strip(tagged, "WEBP")
    assert metadata_leaks(stripped) == []
    assert pixels(stripped) == pixels(tagged)


# ---- GIF -------------------------------------------------------------------------

def test_gif_loses_comments_foreign_extensions_and_trailer_keeps_loop(corpus):
    data = (corpus / "chi.gif").read_bytes()
    xmp = b"\x21\xff\x0bXMP DataXMP" + b"\x10Secret-Garden-42" + b"\x00"
    comment = b"\x21\xfe\x0dshot at home!\x00"
    tagged = data[:-1] + comment + xmp + data[-1:] + b"trailing bytes"
    head = tagged.index(b"\x21\xf9")  # the first frame's graphic control extension
    tagged = tagged[:head] + comment + tagged[head:]
    stripped = strip(tagged, "GIF")
    assert b"Secret-Garden-42" not in stripped and b"shot at home" not in stripped
    assert stripped.endswith(b"\x3b") and b"NETSCAPE2.0" in stripped
    assert pixels(stripped) == pixels(data)
    assert Image.open(io.BytesIO(stripped)).info.get("loop") == Image.open(io.BytesIO(data)).info.get("loop")


# ---- re-encoded formats: TIFF and AVIF -------------------------------------------

def stored_bytes(data: bytes, tmp_path, strip_metadata: bool = True) -> tuple[bytes, imgproxy.ImageFacts]:
    """What the server would store for `data` (prepare_stored after inspection)."""
    facts = imgproxy.inspect_upload(data, len(data), imgproxy.DEFAULT_FORMATS, 50_000_000)
    counter = iter(range(10**6))
    result = imgproxy.prepare_stored(data, facts, lambda: tmp_path / f"out{next(counter)}", strip_metadata)
    if result is None:
        return data, facts
    md5, stored_facts, path = result
    out = path.read_bytes()
    assert hashlib.md5(out).hexdigest() == md5 and stored_facts.size == len(out)
    return out, stored_facts


def test_tiff_with_gps_is_rewritten_losslessly(tmp_path):
    original = photo_bytes("TIFF")
    assert "GPS IFD" in metadata_leaks(original)
    stored, facts = stored_bytes(original, tmp_path)
    assert facts.format == "TIFF" and metadata_leaks(stored) == []
    assert Image.open(io.BytesIO(stored)).info["icc_profile"] == srgb_icc()
    assert pixels(stored) == pixels(original)


def test_clean_tiff_is_kept_as_it_is(corpus, tmp_path):
    data = (corpus / "16bit.cropped.tif").read_bytes()
    assert stored_bytes(data, tmp_path)[0] == data


def test_avif_with_gps_and_xmp_loses_them_keeps_icc_and_orientation(tmp_path):
    if not imgproxy._pillow_has("AVIF"):
        pytest.skip("this Pillow has no AVIF support")
    original = photo_bytes("AVIF", orientation=6, xmp=b"<x:xmpmeta>Secret-Garden-42</x:xmpmeta>")
    stored, facts = stored_bytes(original, tmp_path)
    assert facts.format == "AVIF" and metadata_leaks(stored) == []
    with Image.open(io.BytesIO(stored)) as im:
        assert im.info["icc_profile"] == srgb_icc()
        assert im.getexif().get(0x0112) == 6


def test_strip_metadata_false_keeps_bytes(tmp_path):
    original = photo_bytes("JPEG")
    assert stored_bytes(original, tmp_path, strip_metadata=False)[0] == original


# ---- fuzz --------------------------------------------------------------------------

@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging when the stripper loops."""
    def expired(*_):
        raise TimeoutError("the stripper did not finish")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def decodes(data: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # garbled files make Pillow warn as well as fail
            pixels(data)
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means "invalid"
        return False


def variants(data: bytes, rng: random.Random, count: int) -> list[bytes]:
    """Truncations, flipped bytes, spliced copies and inflated length fields."""
    out = [data]
    for _ in range(count):
        kind = rng.randrange(4)
        if kind == 0:
            out.append(data[:rng.randrange(len(data))])
        elif kind == 1:
            garbled = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                garbled[rng.randrange(len(garbled))] = rng.randrange(256)
            out.append(bytes(garbled))
        elif kind == 2:
            a, b = sorted(rng.randrange(len(data)) for _ in range(2))
            out.append(data[:b] + data[a:])
        else:
            garbled = bytearray(data)
            at = rng.randrange(max(1, len(garbled) - 4))
            garbled[at:at + 4] = b"\xff\xff\xff\xff"[:len(garbled) - at]
            out.append(bytes(garbled))
    return out


def fuzz_inputs(corpus) -> list[tuple[str, str, bytes]]:
    cases = [("gps.jpg", "JPEG", photo_bytes("JPEG", orientation=6, comment=b"hi")),
             ("meta.png", "PNG", png_with_metadata(orientation=3)),
             ("gps.webp", "WEBP", photo_bytes("WEBP", xmp=b"<x/>", orientation=2)),
             ("gps-lossless.webp", "WEBP", photo_bytes("WEBP", lossless=True))]
    for row in read_manifest():
        data = (corpus / row["file"]).read_bytes()
        for fmt in ("JPEG", "PNG", "GIF", "WEBP"):  # every walker sees every file
            cases.append((row["file"], fmt, data))
    return cases


def test_fuzz_never_breaks_grows_or_loops(corpus):
    rng = random.Random(20261130)
    checked = changed = 0
    for name, fmt, data in fuzz_inputs(corpus):
        if not data:
            continue
        native = (Image.open(io.BytesIO(data)).format if decodes(data) else None) in (fmt, "MPO")
        for variant in variants(data, rng, 12 if native else 3):
            with deadline(5):
                pieces = imgproxy.metadata_cuts(variant, fmt)
            if pieces is None:
                continue
            out = apply_cuts(variant, pieces)
            changed += 1
            assert len(out) <= len(variant), name
            assert imgproxy.metadata_cuts(out, fmt) is None, f"{name}: stripping twice changes more"
            if decodes(variant):
                checked += 1
                assert pixels(out) == pixels(variant), f"{name}: a valid image changed its pixels"
    assert changed > 50 and checked > 30  # the run did exercise the stripper


def test_fuzz_with_hypothesis_bytes():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st
    seeds = [jpeg_bytes(), png_bytes(), photo_bytes("WEBP", icc=False)]

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
    @hypothesis.given(st.sampled_from(range(len(seeds))), st.binary(max_size=64),
                      st.integers(min_value=0, max_value=4000))
    def run(which, noise, at):
        seed = seeds[which]
        data = seed[:at % len(seed)] + noise + seed[at % len(seed):]
        for fmt in ("JPEG", "PNG", "GIF", "WEBP"):
            with deadline(5):
                pieces = imgproxy.metadata_cuts(data, fmt)
            if pieces is not None:
                out = apply_cuts(data, pieces)
                assert len(out) <= len(data)
                if decodes(data):
                    assert pixels(out) == pixels(data)

    run()


# ---- server end to end ---------------------------------------------------------------

async def put(client, data: bytes, name: str = "photo.jpg", headers=ALICE):
    return await client.put(f"/upload/{name}", data=data, headers=headers)


async def test_upload_stores_stripped_bytes_under_their_md5(make_client):
    client = await make_client()
    original = photo_bytes("JPEG", orientation=6)
    source_md5 = hashlib.md5(original).hexdigest()
    resp = await put(client, original)
    assert resp.status == 201
    info = await resp.json()
    assert info["source_md5"] == source_md5 and info["md5"] != source_md5
    served = await client.get(f"/i/{info['md5']}.jpg")
    body = await served.read()
    assert served.status == 200 and hashlib.md5(body).hexdigest() == info["md5"] == served.headers["ETag"].strip('"')
    assert info["size"] == len(body) < len(original)
    assert metadata_leaks(body) == [] and dict(Image.open(io.BytesIO(body)).getexif()) == {0x0112: 6}
    assert pixels(body) == pixels(original)
    # /i/ names stored bytes only.
    assert (await client.get(f"/i/{source_md5}.jpg")).status == 404
    # Every API slot takes either digest.
    for digest in (info["md5"], source_md5):
        looked = await client.get(f"/api/images/{digest}", headers=ALICE)
        assert looked.status == 200 and (await looked.json())["md5"] == info["md5"]
        assert (await looked.json())["source_md5"] == source_md5
        renewed = await client.post(f"/api/images/{digest}/renew", headers=BOB)
        assert renewed.status == 200 and (await renewed.json())["status"] == "exists"
    # The same original again is a dedup hit.
    again = await put(client, original)
    assert again.status == 200 and (await again.json())["md5"] == info["md5"]
    # Delete by source_md5: bob's hold goes, alice's keeps the image; then alice (admin) removes it.
    assert (await client.delete(f"/api/images/{source_md5}", headers=BOB)).status == 204
    assert (await client.get(f"/i/{info['md5']}.jpg")).status == 200
    assert (await client.delete(f"/api/images/{source_md5}", headers=BOB)).status == 404
    assert (await client.delete(f"/api/images/{source_md5}", headers=ALICE)).status == 204
    assert (await client.get(f"/i/{info['md5']}.jpg")).status == 404
    assert (await client.get(f"/api/images/{source_md5}", headers=ALICE)).status == 404
    assert store_problems(client.data_dir) == []


async def test_large_upload_is_stripped_from_its_temp_file(make_client):
    # Past FLUSH_BYTES the upload is on disk, not in memory: the stripper reads it through mmap.
    noise = Image.effect_noise((900, 900), 80).convert("RGB")
    buf = io.BytesIO()
    noise.save(buf, "JPEG", quality=98, exif=gps_exif(orientation=3), comment=b"shot at home")
    original = buf.getvalue() + b"PK\x03\x04 trailing archive"
    assert len(original) > imgproxy.FLUSH_BYTES
    client = await make_client()
    info = await (await put(client, original, "big.jpg")).json()
    assert info["source_md5"] == hashlib.md5(original).hexdigest()
    body = await (await client.get(f"/i/{info['md5']}.jpg")).read()
    assert metadata_leaks(body) == [] and b"shot at home" not in body and b"PK\x03\x04" not in body
    assert dict(Image.open(io.BytesIO(body)).getexif()) == {0x0112: 3}
    assert pixels(body) == pixels(original)
    # The stripper's temp files are gone at once; on S3 the GET may have started this
    # node's local copy of the large original (tmp/source-*), which must end cleanly too.
    tmp = client.data_dir / "tmp"
    assert [p for p in tmp.iterdir() if not p.name.startswith("source-")] == []
    await apoll(lambda: not any(tmp.iterdir()), 10, "the local copy of the original to finish")
    assert store_problems(client.data_dir) == []


async def test_two_originals_that_strip_alike_are_one_image(make_client):
    client = await make_client()
    first = photo_bytes("PNG")
    second = first[:33] + _png_chunk(b"tEXt", b"Comment\0another camera") + first[33:]  # after IHDR
    a = await (await put(client, first, "a.png", headers=CAROL)).json()
    resp = await put(client, second, "b.png", headers=BOB)
    b = await resp.json()
    assert resp.status == 200 and b["status"] == "exists" and b["md5"] == a["md5"]
    assert b["source_md5"] == hashlib.md5(second).hexdigest() != a["source_md5"]
    listed = await (await client.get("/api/images", headers=ALICE)).json()
    assert listed["total"] == 1
    assert (await client.delete(f"/api/images/{a['md5']}", headers=CAROL)).status == 204
    assert (await client.get(f"/i/{a['md5']}.png")).status == 200  # bob still holds it
    assert (await client.delete(f"/api/images/{a['md5']}", headers=BOB)).status == 204
    assert (await client.get(f"/i/{a['md5']}.png")).status == 404


async def test_strip_metadata_false_stores_the_upload(make_client):
    client = await make_client(server={"strip_metadata": False})
    original = photo_bytes("JPEG")
    info = await (await put(client, original)).json()
    assert info["md5"] == hashlib.md5(original).hexdigest() and "source_md5" not in info
    assert await (await client.get(f"/i/{info['md5']}.jpg")).read() == original


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "AVIF"])
async def test_served_bytes_carry_no_gps(make_client, fmt):
    if fmt == "AVIF" and not imgproxy._pillow_has("AVIF"):
        pytest.skip("this Pillow has no AVIF support")
    client = await make_client()
    original = photo_bytes(fmt)
    assert metadata_leaks(original)
    resp = await put(client, original, f"photo.{fmt.lower()}")
    assert resp.status == 201
    info = await resp.json()
    body = await (await client.get(info["url"].replace(imgproxy_base(client), ""))).read()
    assert info["format"] == fmt and metadata_leaks(body) == []


def imgproxy_base(client) -> str:
    return client.config.base_url


async def test_client_sends_no_bytes_for_a_stripped_image(aiohttp_client, make_config, tmp_path):
    app = imgproxy.create_app(imgproxy.load_config(make_config()))
    seen: list[tuple[str, str, int]] = []

    from aiohttp import web

    @web.middleware
    async def count_bytes(request, handler):
        seen.append((request.method, request.path, request.content_length or 0))
        return await handler(request)

    app.middlewares.insert(0, count_bytes)
    server = await aiohttp_client(app)
    base = str(server.make_url("")).rstrip("/")
    photo = tmp_path / "IMG_0001.jpg"
    photo.write_bytes(photo_bytes("JPEG", size=(120, 90)))
    source_md5 = hashlib.md5(photo.read_bytes()).hexdigest()

    first = stdlib_client.Client(base, "alice", "alice123", cache_path=tmp_path / "a.db")
    uploaded = await asyncio.to_thread(first.upload_or_get, photo)
    assert uploaded["status"] == "uploaded" and uploaded["source_md5"] == source_md5
    assert sum(n for m, p, n in seen if p.startswith("/upload")) == photo.stat().st_size

    seen.clear()  # another machine, empty cache: one renew by the file's MD5, no bytes
    other = stdlib_client.Client(base, "bob", "bob123", cache_path=tmp_path / "b.db")
    exists = await asyncio.to_thread(other.upload_or_get, photo)
    assert exists["status"] == "exists" and exists["md5"] == uploaded["md5"]
    assert seen == [("POST", f"/api/images/{source_md5}/renew", 0)]

    seen.clear()  # the first machine answers from its cache, found by the file's MD5
    cached = await asyncio.to_thread(first.upload_or_get, photo)
    assert cached["status"] == "cached" and cached["url"] == uploaded["url"] and seen == []
    import sqlite3
    db = sqlite3.connect(tmp_path / "a.db")
    keys = {row[0] for row in db.execute("SELECT md5 FROM images")}
    db.close()
    assert keys == {uploaded["md5"], source_md5}

    served = await server.get(f"/i/{uploaded['md5']}.jpg")
    assert metadata_leaks(await served.read()) == []
