"""The upload page's "My images" grid of variants, in headless Chromium.

The grid loads 320 px variants only (never an original), and each image's
copy buttons give the size picked. Fixtures (browser, server, open_page) are
shared with tests/test_page.py through conftest.py.

docs/screenshot.png (the grid) is rewritten by test_grid_shows_only_variants
when IMGPROXY_SCREENSHOT=1.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

from PIL import Image, ImageDraw

from conftest import ROOT, expect, put_image

SCREENSHOT = ROOT / "docs" / "screenshot.png"
HUES = [(230, 90, 60), (60, 140, 230), (90, 190, 120), (240, 190, 60), (170, 90, 200), (40, 170, 190)]


def picture(path: Path, index: int, size=(1600, 1100)) -> Path:
    """A big, recognisable picture: a gradient sky, a sun, hills; its own colours."""
    w, h = size
    hue = HUES[index % len(HUES)]
    sky = Image.linear_gradient("L").resize(size)
    im = Image.merge("RGB", [sky.point(lambda v, c=c: int(c * (0.45 + v / 510))) for c in hue])
    draw = ImageDraw.Draw(im)
    draw.ellipse((w * 0.62, h * 0.12, w * 0.82, h * 0.12 + w * 0.2), fill=(255, 236, 170))
    draw.polygon([(0, h), (0, h * 0.7), (w * 0.35, h * 0.5), (w * 0.7, h * 0.75), (w, h * 0.6), (w, h)],
                 fill=tuple(int(c * 0.35) for c in hue))
    buf = io.BytesIO()
    im.save(buf, "JPEG" if index % 2 == 0 else "PNG", **({"quality": 88} if index % 2 == 0 else {}))
    path.write_bytes(buf.getvalue())
    return path


def seed(server, tmp_path: Path, count: int) -> list[dict]:
    names = ["harbour", "mountains", "garden", "desert", "evening", "lagoon"]
    infos = []
    for i in range(count):
        ext = "jpg" if i % 2 == 0 else "png"
        infos.append(put_image(server, picture(tmp_path / f"{names[i % len(names)]}-{i}.{ext}", i)))
    return infos


def test_grid_shows_only_variants(open_page, server, tmp_path):
    infos = seed(server, tmp_path, 6)
    tab = open_page(width=1100, height=900)
    page = tab.page
    tab.sign_in()
    cards = page.locator("#mine li.card")
    expect(cards).to_have_count(6)
    thumbs = page.locator("#mine li.card .thumb img")
    for i in range(6):
        thumbs.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbs.nth(i).element_handle())
        assert thumbs.nth(i).evaluate("img => img.naturalWidth") == 320
    # Every image the page fetched is a 320 px variant; no original was loaded.
    image_requests = [r.url for r in tab.requests if "/i/" in r.url]
    by_md5 = {info["md5"] for info in infos}
    assert image_requests, "the grid loaded no images"
    for url in image_requests:
        match = re.fullmatch(re.escape(server.base_url) + r"/i/([0-9a-f]{32})/320", url)
        assert match and match[1] in by_md5, url
    assert {re.search(r"/i/([0-9a-f]{32})/", u)[1] for u in image_requests} == by_md5
    # Chromium says what it can show: the server answered in a modern format.
    responses = [page.request.get(u, headers={"Accept": "image/avif,image/webp,*/*"}) for u in image_requests[:1]]
    assert responses[0].headers["content-type"] in ("image/avif", "image/webp")
    assert responses[0].headers["vary"] == "Accept"
    # Several cards side by side: a grid, not a list.
    first, second = cards.nth(0).bounding_box(), cards.nth(1).bounding_box()
    assert abs(first["y"] - second["y"]) < 2 and second["x"] > first["x"] + first["width"]
    assert tab.unexpected_errors() == []

    if os.environ.get("IMGPROXY_SCREENSHOT") == "1":
        page.evaluate("window.scrollTo(0, document.getElementById('mine-title').offsetTop - 20)")
        page.wait_for_timeout(300)
        page.screenshot(path=str(SCREENSHOT))


def test_copy_a_size_with_markdown_and_html_srcset(open_page, server, tmp_path):
    info = seed(server, tmp_path, 1)[0]
    tab = open_page()
    page = tab.page
    tab.sign_in()
    card = page.locator(f'#mine li.card[data-md5="{info["md5"]}"]')
    expect(card).to_have_count(1)
    base = f"{server.base_url}/i/{info['md5']}"
    expect(card.locator("input.url")).to_have_value(info["url"])  # the original by default

    card.locator("select.size-pick").select_option("640")
    expect(card.locator("input.url")).to_have_value(f"{base}/640")
    expect(card.locator("a.open")).to_have_attribute("href", f"{base}/640")
    card.locator("button[data-copy=markdown]").click()
    markdown = f"![{info['name']}]({base}/640)"
    expect(card.locator("button[data-copy=markdown]")).to_have_attribute("data-copied", markdown)
    assert page.evaluate("navigator.clipboard.readText()") == markdown
    card.locator("button[data-copy=html]").click()
    expect(card.locator("button[data-copy=html]")).to_have_attribute(
        "data-copied", f'<img src="{base}/640" srcset="{base}/640 1x, {base}/1280 2x" alt="{info["name"]}">')

    card.locator("select.size-pick").select_option("320")
    card.locator("button[data-copy=url]").click()
    expect(card.locator("button[data-copy=url]")).to_have_attribute("data-copied", f"{base}/320")

    card.locator("select.size-pick").select_option("1280")
    card.locator("button[data-copy=html]").click()  # no 2560 on offer: no srcset
    expect(card.locator("button[data-copy=html]")).to_have_attribute(
        "data-copied", f'<img src="{base}/1280" alt="{info["name"]}">')

    card.locator("select.size-pick").select_option("")
    card.locator("button[data-copy=bbcode]").click()
    expect(card.locator("button[data-copy=bbcode]")).to_have_attribute("data-copied", f"[img]{info['url']}[/img]")

    # The copied URL works and has the width it names.
    size = page.evaluate("""url => new Promise((resolve, reject) => {
        const img = new Image();
        img.onload = () => resolve([img.naturalWidth, img.naturalHeight]);
        img.onerror = () => reject(new Error('did not load'));
        img.src = url;
    })""", f"{base}/640")
    assert size == [640, 440]
    assert tab.unexpected_errors() == []
