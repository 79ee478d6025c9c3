"""Phone and modern formats: HEIC/HEIF through the optional pillow-heif (stored
as JPEG; a clear 415 without it) and AVIF (accepted where Pillow decodes it)."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import urllib.error
import urllib.request

import pytest
from PIL import Image

import imgproxy
from conftest import ALICE, basic
from helpers import gps_exif, metadata_leaks, photo_bytes, srgb_icc, store_problems, stored_files

HAVE_HEIF = importlib.util.find_spec("pillow_heif") is not None
needs_heif = pytest.mark.skipif(not HAVE_HEIF, reason="pillow-heif is not installed (pip install pillow-heif)")
needs_avif = pytest.mark.skipif(not imgproxy._pillow_has("AVIF"), reason="this Pillow cannot decode AVIF")


def heic_photo(**kwargs) -> bytes:
    imgproxy.heif_support()
    return photo_bytes("HEIF", **kwargs)


def jpeg_quality_at_least(data: bytes, quality: int) -> bool:
    """True when the luminance quantisation table is no coarser than Pillow's at `quality`."""
    reference = io.BytesIO()
    Image.new("RGB", (8, 8)).save(reference, "JPEG", quality=quality)
    with Image.open(io.BytesIO(data)) as stored, Image.open(reference) as ref:
        return sum(stored.quantization[0]) <= sum(ref.quantization[0])


# ---- HEIC with pillow-heif ----------------------------------------------------------

@needs_heif
async def test_heic_is_stored_as_jpeg_rotated_with_icc_and_no_metadata(make_client):
    client = await make_client()
    # As on a phone: pixels stored as taken (64x48, red left, blue right) and an
    # irot transform (from Exif orientation 6) that shows them turned, 48x64.
    picture = Image.new("RGB", (64, 48), (220, 0, 0))
    picture.paste((0, 0, 220), (32, 0, 64, 48))
    buf = io.BytesIO()
    imgproxy.heif_support()
    picture.save(buf, "HEIF", exif=gps_exif(orientation=6).tobytes(), icc_profile=srgb_icc(), quality=95)
    heic = buf.getvalue()
    assert b"irot" in heic
    resp = await client.put("/upload/IMG_0001.HEIC", data=heic, headers=ALICE)
    assert resp.status == 201, await resp.text()
    info = await resp.json()
    assert info["format"] == "JPEG" and info["mime"] == "image/jpeg" and info["url"].endswith(".jpg")
    assert info["source_md5"] == hashlib.md5(heic).hexdigest()
    assert (info["width"], info["height"]) == (48, 64)
    body = await (await client.get(f"/i/{info['md5']}.jpg")).read()
    assert hashlib.md5(body).hexdigest() == info["md5"] and info["size"] == len(body)
    with Image.open(io.BytesIO(body)) as im:
        # Orientation applied once: the JPEG shows what the HEIC shows, with no tag left to apply again.
        assert im.format == "JPEG" and im.size == (48, 64)
        assert im.getexif().get(0x0112, 1) == 1
        top, bottom = im.convert("RGB").getpixel((24, 8)), im.convert("RGB").getpixel((24, 56))
        assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]
        assert im.info["icc_profile"] == srgb_icc()
    assert metadata_leaks(body) == []
    assert jpeg_quality_at_least(body, 90)
    # The phone's file finds its JPEG: lookup and renew by the HEIC's MD5.
    looked = await client.get(f"/api/images/{info['source_md5']}", headers=ALICE)
    assert (await looked.json())["md5"] == info["md5"]
    again = await client.put("/upload/IMG_0001.HEIC", data=heic, headers=ALICE)
    assert again.status == 200 and (await again.json())["md5"] == info["md5"]
    assert (await client.get(f"/i/{info['source_md5']}.jpg")).status == 404


@needs_heif
async def test_multi_image_heic_stores_the_primary_image(make_client, corpus):
    import pillow_heif
    data = (corpus / "zPug_3.heic").read_bytes()
    heif = pillow_heif.open_heif(io.BytesIO(data))
    primary = heif[heif.primary_index]
    client = await make_client()
    resp = await client.put("/upload/pugs.heic", data=data, headers=ALICE)
    assert resp.status == 201
    info = await resp.json()
    assert (info["width"], info["height"]) == primary.size and info["format"] == "JPEG"


@needs_heif
async def test_heic_limits_apply_before_converting(make_client):
    client = await make_client(server={"max_pixels": 1000})
    resp = await client.put("/upload/big.heic", data=heic_photo(size=(64, 48)), headers=ALICE)
    assert resp.status == 413 and (await resp.json())["code"] == "too_many_pixels"
    assert store_problems(client.data_dir) == []
    assert not [p for p in stored_files(client.data_dir) if p.suffix == ".jpg"]


@needs_heif
async def test_truncated_heic_is_refused(make_client, corpus):
    client = await make_client()
    resp = await client.put("/upload/t.heic", data=(corpus / "truncated.heic").read_bytes(), headers=ALICE)
    assert resp.status == 415 and (await resp.json())["code"] == "unsupported_image"
    assert list((client.data_dir / "tmp").iterdir()) == []


async def test_heic_can_be_left_out_of_the_formats(make_client, corpus):
    client = await make_client(server={"formats": ["JPEG", "PNG"]})
    resp = await client.put("/upload/x.heif", data=(corpus / "RGBA_10__29x100.heif").read_bytes(), headers=ALICE)
    assert resp.status == 415


# ---- HEIC without pillow-heif ------------------------------------------------------

def test_without_pillow_heif_heic_gets_a_415_that_says_how(make_config, server_process, corpus, tmp_path):
    # A module named pillow_heif that fails to import stands in for the package
    # being absent: the server itself runs unchanged, in its own process.
    shim = tmp_path / "no-heif"
    shim.mkdir()
    (shim / "pillow_heif.py").write_text("raise ImportError('pillow-heif hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": str(shim)}
    server = server_process(make_config(), env=env)
    request = urllib.request.Request(server.base_url + "/upload/IMG_0002.heic", method="PUT",
                                     data=(corpus / "RGBA_10__29x100.heif").read_bytes(),
                                     headers={**basic("alice", "alice123"), "Accept": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 415
    body = json.loads(refused.value.read())
    assert body["code"] == "unsupported_image" and "pip install pillow-heif" in body["error"]
    assert "HEIC uploads are refused" in server.log
    png = urllib.request.Request(server.base_url + "/upload/ok.png", method="PUT",
                                 data=photo_bytes("PNG"), headers=basic("alice", "alice123"))
    with urllib.request.urlopen(png, timeout=30) as ok:
        assert ok.status == 201  # everything else works as before


# ---- AVIF ----------------------------------------------------------------------------

@needs_avif
def test_avif_is_accepted_by_default(make_config):
    assert "AVIF" in imgproxy.load_config(make_config()).server.formats


@needs_avif
@pytest.mark.parametrize("name", ["hopper.avif", "star.avifs"])
async def test_corpus_avif_is_stored_as_avif(make_client, corpus, name):
    data = (corpus / name).read_bytes()
    client = await make_client()
    resp = await client.put(f"/upload/{name}", data=data, headers=ALICE)
    assert resp.status == 201, await resp.text()
    info = await resp.json()
    assert info["format"] == "AVIF" and info["mime"] == "image/avif" and info["url"].endswith(".avif")
    body = await (await client.get(f"/i/{info['md5']}.avif")).read()
    assert Image.open(io.BytesIO(body)).format == "AVIF"
    assert body == data and "source_md5" not in info  # nothing to remove: kept byte for byte


@needs_avif
async def test_avif_can_be_narrowed_away(make_client, corpus):
    client = await make_client(server={"formats": ["PNG"]})
    resp = await client.put("/upload/x.avif", data=(corpus / "hopper.avif").read_bytes(), headers=ALICE)
    assert resp.status == 415
