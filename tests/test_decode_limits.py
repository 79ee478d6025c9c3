"""Decode bombs: files whose declared size passes max_pixels while a later frame,
page, tile, embedded image or scan count costs gigabytes or minutes.

Each crafted file is made here (tests/helpers.py) and decoded in a child process
whose address space is capped, so a regression fails the test instead of taking
the machine's memory; the child reports the verdict and the peak RSS the decode
added, which must stay within DecodeGuard's budget:
DECODE_BYTES_PER_PIXEL x max_pixels + the file + DECODE_SLACK.
"""
from __future__ import annotations

import io
import threading
import time
import warnings

import pytest
from PIL import Image

import imgproxy
from conftest import ALICE
from helpers import (animated_gif, decode_in_child, gif_with_large_second_frame, ico_understating_png,
                     progressive_jpeg_with_many_scans, store_problems, stored_files, tiff_with_huge_later_page,
                     tiff_with_huge_tile)

MAX_PIXELS = 4_000_000


def budget_kb(data: bytes, max_pixels: int = MAX_PIXELS) -> int:
    return (imgproxy.DECODE_BYTES_PER_PIXEL * max_pixels + len(data) + imgproxy.DECODE_SLACK) // 1024


BOMBS = {
    # name: (maker, code); each declares a first size well inside MAX_PIXELS
    "gif-second-frame-beyond-screen": (lambda: gif_with_large_second_frame((16, 16), (3000, 3000)),
                                       "too_many_pixels"),
    "tiff-huge-later-page": (lambda: tiff_with_huge_later_page((16, 16), (3000, 3000)), "too_many_pixels"),
    "tiff-huge-tile": (lambda: tiff_with_huge_tile((64, 64), (12000, 12000)), "too_many_pixels"),
    "ico-understating-png": (lambda: ico_understating_png((16, 16), (5000, 5000)), "too_many_pixels"),
    "jpeg-many-scans": (lambda: progressive_jpeg_with_many_scans((1024, 1024), 2000), "too_complex"),
}


@pytest.fixture(scope="module")
def bomb_files() -> dict[str, bytes]:
    return {name: maker() for name, (maker, _) in BOMBS.items()}


@pytest.mark.parametrize("name", BOMBS)
def test_bomb_is_refused_within_the_memory_budget(bomb_files, name):
    data = bomb_files[name]
    assert len(data) < 200_000  # small files: the cost is in what they declare later
    result = decode_in_child(data, MAX_PIXELS)
    assert (result["status"], result["code"]) == (413, BOMBS[name][1]), result
    assert result["growth_kb"] <= budget_kb(data), result


@pytest.mark.parametrize("name", BOMBS)
async def test_bomb_upload_is_a_413_and_keeps_nothing(make_client, bomb_files, name):
    client = await make_client(server={"max_pixels": MAX_PIXELS})
    resp = await client.put(f"/upload/{name}", data=bomb_files[name], headers=ALICE)
    assert resp.status == 413, await resp.text()
    body = await resp.json()
    assert body["code"] == BOMBS[name][1] and body["error"]
    assert stored_files(client.data_dir) == []
    assert store_problems(client.data_dir) == []


def _encoded(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def _noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    return Image.effect_noise(size, 80).convert(mode)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: _encoded(_noise((2000, 2000), "RGBA"), "PNG", compress_level=1), id="png-rgba"),
    pytest.param(lambda: _encoded(_noise((2000, 2000)), "JPEG", progressive=True), id="jpeg-progressive"),
    pytest.param(lambda: _encoded(_noise((2000, 2000)), "TIFF", compression="tiff_lzw"), id="tiff-lzw"),
    pytest.param(lambda: animated_gif((2000, 2000), 3), id="gif-animated"),
    pytest.param(lambda: _encoded(_noise((1600, 1600)), "WEBP", quality=60), id="webp-at-its-limit"),
])
def test_images_at_the_pixel_limit_are_accepted_within_the_memory_budget(make):
    data = make()
    result = decode_in_child(data, MAX_PIXELS)
    assert result["status"] == 200, result
    assert result["growth_kb"] <= budget_kb(data), result


def test_jpeg_scan_limit_is_exact():
    at_limit = progressive_jpeg_with_many_scans((64, 64), imgproxy.JPEG_MAX_SCANS)
    over = progressive_jpeg_with_many_scans((64, 64), imgproxy.JPEG_MAX_SCANS + 1)
    assert imgproxy.inspect_image(at_limit, len(at_limit), imgproxy.DEFAULT_FORMATS, MAX_PIXELS).width == 64
    with pytest.raises(imgproxy.UploadRejected) as refused:
        imgproxy.inspect_image(over, len(over), imgproxy.DEFAULT_FORMATS, MAX_PIXELS)
    assert (refused.value.status, refused.value.code) == (413, "too_complex")


@pytest.mark.parametrize("costly, cheap", [
    # libjpeg keeps every coefficient of a progressive image (6 bytes a pixel at
    # 4:4:4) whatever scale Pillow asks for; a baseline JPEG streams.
    pytest.param(lambda im: _encoded(im, "JPEG", progressive=True, subsampling=0),
                 lambda im: _encoded(im, "JPEG", subsampling=0), id="progressive-jpeg"),
    # libwebp and Pillow hold about 20 bytes a pixel; a PNG 4.
    pytest.param(lambda im: _encoded(im, "WEBP", quality=60), lambda im: _encoded(im, "PNG", compress_level=1),
                 id="webp"),
    # libtiff decodes a compressed strip whole: one strip of the whole page
    # costs its size again on top of the image; 64 KB strips cost nothing.
    pytest.param(lambda im: _encoded(im, "TIFF", compression="tiff_lzw", strip_size=2**30),
                 lambda im: _encoded(im, "TIFF", compression="tiff_lzw"), id="tiff-single-strip"),
])
def test_formats_that_cost_more_than_their_pixels_count_against_the_memory_budget(costly, cheap):
    """Without slack the budget is 4 bytes a pixel: the costly encoding of the
    same pixels is refused before decoding, the cheap one is accepted."""
    pixels = _noise((2000, 2000))
    no_slack = {"DECODE_SLACK": 0}
    refused = decode_in_child(costly(pixels), MAX_PIXELS, patches=no_slack)
    assert (refused["status"], refused["code"]) == (413, "too_many_pixels"), refused
    assert refused["growth_kb"] < 8 * 1024, refused  # refused before the pixels were decoded
    assert decode_in_child(cheap(pixels), MAX_PIXELS, patches=no_slack)["status"] == 200


def test_decode_stops_when_its_cpu_budget_is_spent():
    data = animated_gif((500, 500), 120)  # within the frame and pixel budgets
    full = decode_in_child(data, MAX_PIXELS)
    assert (full["status"], full["frames"]) == (200, 120), full
    result = decode_in_child(data, MAX_PIXELS, patches={"DECODE_CPU_SECONDS": full["cpu"] / 4})
    assert (result["status"], result["code"]) == (413, "too_complex"), result
    assert result["cpu"] < full["cpu"] / 2, result


async def test_pillows_own_limit_follows_max_pixels(make_client):
    await make_client(server={"max_pixels": 1_000})
    assert 2 * Image.MAX_IMAGE_PIXELS in (1_000, 1_001)
    await make_client(server={"max_pixels": 80_000_000})
    assert 2 * Image.MAX_IMAGE_PIXELS >= 80_000_000


def test_decoding_in_a_worker_thread_leaves_the_warning_filters_alone():
    """warnings.catch_warnings() saves and restores the process-wide filter list:
    from a decode thread it would drop a filter that another thread adds meanwhile."""
    data = _encoded(_noise((4000, 4000)), "PNG", compress_level=1)
    decoding = threading.Thread(target=imgproxy.inspect_image,
                                args=(data, len(data), imgproxy.DEFAULT_FORMATS, 50_000_000))
    with warnings.catch_warnings():  # this test's own filters, restored from this thread
        decoding.start()
        time.sleep(0.05)
        warnings.filterwarnings("ignore", message="added while a decode ran")
        decoding.join()
        assert any(f[1] is not None and f[1].pattern == "added while a decode ran" for f in warnings.filters)


def test_camera_jpeg_with_a_preview_picture_is_accepted_and_its_pictures_measured():
    """Cameras append a preview as a second picture (MPO to Pillow): each one is a
    JPEG of its own, checked like the first (pixels, scans, coefficients)."""
    def mpo(second: Image.Image, **options) -> bytes:
        return _encoded(Image.new("RGB", (64, 64)), "MPO", save_all=True, append_images=[second], **options)

    photo = mpo(_noise((640, 480)))
    facts = imgproxy.inspect_image(photo, len(photo), imgproxy.DEFAULT_FORMATS, MAX_PIXELS)
    assert (facts.format, facts.frames) == ("JPEG", 2)
    huge = decode_in_child(mpo(Image.new("RGB", (3000, 3000))), MAX_PIXELS)
    assert (huge["status"], huge["code"]) == (413, "too_many_pixels"), huge
    costly = decode_in_child(mpo(_noise((2000, 2000)), progressive=True, subsampling=0), MAX_PIXELS,
                             patches={"DECODE_SLACK": 0})
    assert (costly["status"], costly["code"]) == (413, "too_many_pixels"), costly
    assert costly["growth_kb"] < 8 * 1024, costly


# ---- PNG checked while it is received -----------------------------------------------

def _png_with_valid_crcs(data: bytes) -> bytes:
    """The same chunks with their CRCs recomputed: damage that only a decode can see."""
    import struct
    import zlib
    out, pos = bytearray(data[:8]), 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        body = data[pos + 4:pos + 8 + length]
        out += data[pos:pos + 4] + body + struct.pack(">I", zlib.crc32(body))
        pos += 12 + length
    return bytes(out)


def _streamed(data: bytes, piece: int) -> imgproxy.PngStreamCheck:
    check = imgproxy.PngStreamCheck(MAX_PIXELS)
    for start in range(0, len(data), piece):
        check.feed(data[start:start + piece])
    return check


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return _encoded(_noise((1200, 900)), "PNG", compress_level=1)  # about 3 MB: streamed to tmp/


def test_png_stream_check_vouches_for_a_whole_png_in_any_pieces(big_png):
    small = _encoded(_noise((60, 40), "RGBA"), "PNG")
    assert _streamed(small, 1).passed
    for piece in (4093, 1 << 20):
        check = _streamed(big_png, piece)
        assert check.passed and check.inflated == 900 * (1200 * 3 + 1)
    assert not _streamed(big_png[:-12], 4093).passed  # without IEND


@pytest.mark.parametrize("damage", [
    pytest.param(lambda d: d[:len(d) // 2], id="truncated"),
    pytest.param(lambda d: d[:len(d) // 2] + bytes([d[len(d) // 2] ^ 0x40]) + d[len(d) // 2 + 1:], id="bad-crc"),
    pytest.param(lambda d: _png_with_valid_crcs(d[:len(d) // 2] + b"\xff" * 64 + d[len(d) // 2 + 64:]),
                 id="corrupt-idat-valid-crc"),
    pytest.param(lambda d: d[:16] + (99999).to_bytes(4, "big") + d[20:], id="ihdr-over-limit-bad-crc"),
    pytest.param(lambda d: _png_with_valid_crcs(d[:16] + (5000).to_bytes(4, "big") + d[20:]), id="ihdr-over-limit"),
])
async def test_damaged_big_png_gets_the_same_verdict_through_the_stream_check(make_client, big_png, damage):
    """The check vouches only for what it saw whole; everything else goes to
    Pillow as before, so the upload is refused as before."""
    data = damage(big_png)
    assert not _streamed(data, 1 << 20).passed
    with pytest.raises(imgproxy.UploadRejected) as before:
        imgproxy.inspect_image(data, len(data), imgproxy.DEFAULT_FORMATS, MAX_PIXELS)
    client = await make_client(server={"max_pixels": MAX_PIXELS})
    resp = await client.put("/upload/big.png", data=data, headers=ALICE)
    assert (resp.status, (await resp.json())["code"]) == (before.value.status, before.value.code)
    assert store_problems(client.data_dir) == []


async def test_big_png_checked_while_received_is_stored_with_its_facts(make_client, big_png):
    client = await make_client(server={"max_pixels": MAX_PIXELS})
    resp = await client.put("/upload/big.png", data=big_png, headers=ALICE)
    assert resp.status == 201, await resp.text()
    info = await resp.json()
    assert (info["format"], info["width"], info["height"], info["size"]) == ("PNG", 1200, 900, len(big_png))
    assert store_problems(client.data_dir) == []


def test_png_stream_check_agrees_with_pillow_on_the_corpus(corpus):
    """Wherever the check vouches for a corpus PNG (and Pillow can open it),
    Pillow's verify() and decode accept it too."""
    vouched = 0
    for path in sorted(corpus.glob("*.png")):
        data = path.read_bytes()
        if not _streamed(data, 4093).passed:
            continue
        try:
            Image.open(io.BytesIO(data), formats=["PNG"]).close()
        except Exception:  # noqa: BLE001 - refused at open, which runs on the streamed path too
            continue
        vouched += 1
        imgproxy.inspect_image(data, len(data), imgproxy.DEFAULT_FORMATS, 50_000_000)
    assert vouched >= 10


# ---- found in review ------------------------------------------------------------------

def test_stripping_a_many_page_tiff_stays_within_the_memory_budget():
    """Every page at the pixel limit passes inspection (one page is decoded at a
    time there), and a tag to remove makes the TIFF be rewritten: that must not
    hold all pages decoded at once either, or ten pages cost ten budgets."""
    from PIL import TiffImagePlugin
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[305] = "CameraMaker firmware 1.0"  # Software: metadata the strip removes
    pages = [Image.new("RGBA", (2000, 2000), (i, 2, 3, 255)) for i in range(9)]
    out = io.BytesIO()
    pages[0].save(out, "TIFF", save_all=True, append_images=pages[1:], compression="tiff_adobe_deflate",
                  tiffinfo=tags)
    data = out.getvalue()
    result = decode_in_child(data, MAX_PIXELS, strip=True)
    assert result["status"] == 200 and result["stripped"], result
    assert result["growth_kb"] <= budget_kb(data), result


def test_stripping_an_avif_stays_within_the_memory_budget():
    """Re-encoding an AVIF to remove its Exif costs about 28 bytes a pixel of
    every frame, all held at once, and an AVIF sequence costs more to decode
    the longer it is: past the budget either is refused before it starts."""
    if not imgproxy._pillow_has("AVIF"):
        pytest.skip("this Pillow has no AVIF support")
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make: metadata the strip removes

    def avif(frames: int, **extra) -> bytes:
        pictures = [Image.new("RGBA", (2000, 2000), (i * 20, 2, 3, 255)) for i in range(frames)]
        out = io.BytesIO()
        pictures[0].save(out, "AVIF", save_all=True, append_images=pictures[1:], speed=10, quality=30, **extra)
        return out.getvalue()

    for data, word in ((avif(1, exif=exif.tobytes()), "metadata"),   # decodes in budget, re-encode would not
                       (avif(3, exif=exif.tobytes()), "to decode")):  # the sequence alone is over budget
        result = decode_in_child(data, MAX_PIXELS, formats=("AVIF",), strip=True)
        assert (result["status"], result["code"]) == (413, "too_many_pixels"), result
        assert word in result["message"], result
        assert result["growth_kb"] <= budget_kb(data), result
    # Without metadata nothing is re-encoded: stored as it is.
    result = decode_in_child(avif(1), MAX_PIXELS, formats=("AVIF",), strip=True)
    assert result["status"] == 200 and not result["stripped"], result