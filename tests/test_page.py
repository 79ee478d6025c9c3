"""The upload page at GET /, driven in Debian's headless Chromium with Playwright.

Needs `pip install playwright` and `apt-get install chromium` (no browser
download: Playwright launches /usr/bin/chromium). Without either, the browser
tests skip; the asset and header checks still run.

docs/screenshot.png is written by test_upload_copy_and_dedup when it is missing
or when IMGPROXY_SCREENSHOT=1, so an ordinary run leaves the tree clean.
"""
from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import imgproxy
from conftest import PageSession, api, expect, put_image

REPO = Path(__file__).resolve().parent.parent
PAGE_DIR = REPO / "page"
SCREENSHOT = REPO / "docs" / "screenshot.png"
DENIED = imgproxy.DENIED_MESSAGE


# ---- helpers ---------------------------------------------------------------

def row(manifest, name: str) -> dict:
    return next(r for r in manifest if r["file"] == name)


def uploaded_card(tab: PageSession, corpus: Path, manifest, name: str):
    """Upload one corpus file through the page; (its manifest row, its card once stored)."""
    image = row(manifest, name)
    tab.upload(corpus / image["file"])
    card = tab.card(image["file"])
    expect(card).to_have_class(re.compile(r"\buploaded\b"))
    return image, card


def natural_size(page, url: str) -> list[int]:
    return page.evaluate("""url => new Promise((resolve, reject) => {
        const img = new Image();
        img.addEventListener('load', () => resolve([img.naturalWidth, img.naturalHeight]));
        img.addEventListener('error', () => reject(new Error('image did not load: ' + url)));
        img.src = url;
    })""", url)


# ---- assets and headers (no browser) ---------------------------------------------

def test_embedded_assets_match_page_folder():
    import imgproxy
    for constant, filename in (("PAGE_HTML", "index.html"), ("PAGE_CSS", "app.css"), ("PAGE_JS", "app.js")):
        source = (PAGE_DIR / filename).read_text(encoding="utf-8")
        assert getattr(imgproxy, constant) == source, (
            f"imgproxy.{constant} differs from page/{filename}: run python3 page/embed.py")


def test_assets_need_nothing_the_csp_forbids():
    html = (PAGE_DIR / "index.html").read_text(encoding="utf-8")
    js = (PAGE_DIR / "app.js").read_text(encoding="utf-8")
    css = (PAGE_DIR / "app.css").read_text(encoding="utf-8")
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert "<style" not in html and not re.search(r"\sstyle=", html), "inline style"
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", html), "external resource"
    assert "@import" not in css and "url(http" not in css.replace(" ", "")
    assert ".innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js
    assert "new Function" not in js and "document.write" not in js


def test_page_and_assets_are_served_with_csp(server):
    status, headers, body = api(server, "GET", "/", user=None)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                      "connect-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert body.decode() == (PAGE_DIR / "index.html").read_text(encoding="utf-8")
    status, headers, body = api(server, "GET", "/static/app.js", user=None)
    assert status == 200 and "javascript" in headers["Content-Type"]
    status, headers, body = api(server, "GET", "/static/app.css", user=None)
    assert status == 200 and headers["Content-Type"].startswith("text/css")


def test_page_calls_get_401_without_browser_prompt(server):
    status, headers, body = api(server, "GET", "/api/images", user=("bob", "wrong"),
                                headers={"X-Requested-With": "imgproxy-page"})
    assert status == 401
    assert "WWW-Authenticate" not in headers
    assert json.loads(body)["error"] == DENIED


# ---- in the browser ---------------------------------------------------------------

def test_wrong_password_shows_the_message(open_page):
    tab = open_page()
    tab.sign_in("bob", "not-his-password")
    expect(tab.page.locator("#signin-error")).to_have_text(DENIED)
    expect(tab.page.locator("#app")).to_be_hidden()
    # The form stays usable: the right password gets in.
    tab.sign_in("bob", "bob123")
    expect(tab.page.locator("#app")).to_be_visible()
    expect(tab.page.locator("#signin-error")).to_be_hidden()
    assert tab.unexpected_errors(401) == []


def test_sign_in_with_the_keyboard_lasts_for_the_tab(open_page):
    tab = open_page()
    page = tab.page
    expect(page.locator("#signin-user")).to_be_focused()
    page.keyboard.type("alice")
    page.keyboard.press("Tab")
    page.keyboard.type("alice123")
    page.keyboard.press("Enter")
    expect(page.locator("#who-name")).to_have_text("alice")
    expect(page.locator("#file-input")).to_be_focused()   # ready to press Enter and pick files
    page.reload()
    expect(page.locator("#app")).to_be_visible()          # sessionStorage keeps the tab signed in
    assert page.evaluate("localStorage.length") == 0      # nothing outlives the tab
    page.click("#sign-out")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    assert tab.unexpected_errors() == []


def test_upload_copy_and_dedup(open_page, server, corpus, manifest):
    tab = open_page(width=1000, height=760)
    page = tab.enter()

    image, card = uploaded_card(tab, corpus, manifest, "testorig.jpg")
    expect(card.locator(".badge")).to_have_text("Uploaded")
    url = f"{server.base_url}/i/{image['md5']}.jpg"
    expect(card.locator("input.url")).to_have_value(url)
    expect(card.locator(".expiry time")).to_have_attribute("datetime", re.compile(r"Z$"))
    assert natural_size(page, url) == [int(image["width"]), int(image["height"])]
    # The preview shows the image as served at its public URL.
    preview = card.locator(".thumb img")
    expect(preview).to_have_attribute("src", url)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=preview.element_handle())

    card.locator("button[data-copy=markdown]").click()
    markdown = f"![{image['file']}]({url})"
    expect(card.locator("button[data-copy=markdown]")).to_have_attribute("data-copied", markdown)
    assert page.evaluate("navigator.clipboard.readText()") == markdown
    for key, text in (("html", f'<img src="{url}" alt="{image["file"]}">'),
                      ("bbcode", f"[img]{url}[/img]"), ("url", url)):
        card.locator(f"button[data-copy={key}]").click()
        expect(card.locator(f"button[data-copy={key}]")).to_have_attribute("data-copied", text)
    assert page.evaluate("navigator.clipboard.readText()") == url

    # "My images" picks the new upload up.
    expect(page.locator("#mine li.card")).to_have_count(1)
    expect(page.locator("#mine li.card input.url")).to_have_value(url)

    if not SCREENSHOT.exists() or os.environ.get("IMGPROXY_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.wait_for_timeout(2500)   # let the "Copied" toast fade
        page.screenshot(path=str(SCREENSHOT))

    # The same bytes again: honest about the dedup.
    tab.upload(corpus / image["file"])
    again = page.locator("#uploads li.card").first
    expect(again).to_have_class(re.compile(r"\bexists\b"))
    expect(again.locator(".badge")).to_have_text("Already there")
    expect(again.locator("input.url")).to_have_value(url)
    expect(page.locator("#uploads li.card")).to_have_count(2)

    # A text file named .png: the error sits next to it, in words.
    tab.upload(corpus / "invalid.png")
    bad = tab.card("invalid.png")
    expect(bad).to_have_class(re.compile(r"\bfailed\b"))
    expect(bad.locator(".status")).to_contain_text("Not a supported image")
    expect(bad.locator("input.url")).to_have_count(0)

    assert tab.unexpected_errors(415) == []
    for request in tab.requests:
        assert request.url.startswith((server.base_url + "/", "blob:", "data:")), request.url
        assert "bob123" not in request.url
        if request.url.startswith(server.base_url + "/upload") or "/api/" in request.url:
            headers = request.all_headers()
            assert headers["authorization"] == "Basic " + base64.b64encode(b"bob:bob123").decode()
            assert headers["x-requested-with"] == "imgproxy-page"


def test_several_files_at_once_each_with_progress(open_page, corpus, manifest):
    tab = open_page()
    page = tab.enter()
    names = ["hopper.gif", "basn6a16.png", "lossless1.webp", "hopper_lzw.tif"]
    tab.upload(*(corpus / n for n in names))
    expect(page.locator("#uploads li.card")).to_have_count(len(names))
    for name in names:
        card = tab.card(name)
        expect(card).to_have_class(re.compile(r"\buploaded\b"))
        info = row(manifest, name)
        expect(card.locator(".meta")).to_contain_text(f"{info['width']}×{info['height']}")
        assert card.locator("progress").count() == 1
    # Chromium cannot show TIFF: the card says so instead of a broken image.
    expect(tab.card("hopper_lzw.tif").locator(".thumb-label")).to_be_visible()
    expect(page.locator("#mine li.card")).to_have_count(len(names))
    assert tab.unexpected_errors() == []


def test_drop_and_paste_upload(open_page, corpus, manifest):
    tab = open_page()
    page = tab.enter()
    dropped = corpus / "hopper.gif"
    pasted = corpus / "basn3p04.png"
    page.evaluate("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type: 'image/gif'}));
        const target = document.querySelector('#mine-title');
        for (const type of ['dragenter', 'dragover', 'drop']) {
            target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data}));
        }
    }""", [dropped.name, base64.b64encode(dropped.read_bytes()).decode()])
    expect(tab.card(dropped.name)).to_have_class(re.compile(r"\buploaded\b"))
    expect(page.locator("#drop-overlay")).to_be_hidden()

    # A screenshot on the clipboard arrives as "image.png"; the page names it.
    page.evaluate("""b64 => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'image.png', {type: 'image/png'}));
        document.dispatchEvent(new ClipboardEvent('paste', {bubbles: true, cancelable: true, clipboardData: data}));
    }""", base64.b64encode(pasted.read_bytes()).decode())
    card = page.locator("#uploads li.card").first
    expect(card).to_have_class(re.compile(r"\buploaded\b"))
    expect(card.locator(".name")).to_have_text(re.compile(r"^pasted-\d{8}-\d{6}\.png$"))
    md5 = row(manifest, pasted.name)["md5"]
    expect(card).to_have_attribute("data-md5", md5)
    assert tab.unexpected_errors() == []


def test_hostile_file_name_stays_text(open_page, server, corpus):
    tab = open_page()
    page = tab.enter()
    name = 'x]"><img src=nowhere id=injected>[b.gif'
    tab.upload({"name": name, "mimeType": "image/gif", "buffer": (corpus / "hopper.gif").read_bytes()})
    card = page.locator("#uploads li.card").first
    expect(card).to_have_class(re.compile(r"\buploaded\b"))
    expect(card.locator(".name")).to_have_text(name)
    assert page.locator("#injected").count() == 0
    md5 = card.get_attribute("data-md5")
    status, _, data = api(server, "GET", f"/api/images/{md5}")
    info = json.loads(data)
    card.locator("button[data-copy=markdown]").click()
    alt = re.sub(r"([\\\[\]])", r"\\\1", info["name"])
    expect(card.locator("button[data-copy=markdown]")).to_have_attribute(
        "data-copied", f"![{alt}]({info['url']})")
    card.locator("button[data-copy=html]").click()
    expect(card.locator("button[data-copy=html]")).to_have_attribute("data-copied", re.compile("^<img "))
    copied = card.locator("button[data-copy=html]").get_attribute("data-copied")
    assert copied.startswith(f'<img src="{info["url"]}" alt="') and copied.count("<") == 1, copied
    expect(page.locator("#mine li.card")).to_have_count(1)
    assert page.locator("#injected").count() == 0
    assert tab.unexpected_errors() == []


def test_server_errors_are_reported_next_to_the_file(browser, make_config, live_server):
    server = live_server(make_config(server={"max_upload_mb": 1}))
    tab = PageSession(browser, server)
    try:
        page = tab.enter()
        tab.upload({"name": "huge.png", "mimeType": "image/png",
                    "buffer": b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * 1024 * 1024)})
        card = tab.card("huge.png")
        expect(card).to_have_class(re.compile(r"\bfailed\b"))
        # A 413, or the connection cut once the limit is crossed: both say why.
        expect(card.locator(".status")).to_contain_text(re.compile(r"Too large|larger than the server allows"))

        tab.upload({"name": "empty.png", "mimeType": "image/png", "buffer": b""})
        card = tab.card("empty.png")
        expect(card).to_have_class(re.compile(r"\bfailed\b"))
        expect(card.locator(".status")).to_contain_text("The server refused the upload")

        # The password changed while the tab was open: the file says so.
        page.evaluate("sessionStorage.setItem('imgproxy.auth', 'Basic ' + btoa('bob:old-password'))")
        page.reload()
        expect(page.locator("#signin-error")).to_have_text(DENIED)   # the list call found out first
        expect(page.locator("#app")).to_be_hidden()
        tab.enter()

        # No role grants less than upload today, so a 403 is staged in the browser:
        # what is checked here is that the page puts it next to the file.
        page.route("**/upload", lambda route: route.fulfill(
            status=403, content_type="application/json",
            body=json.dumps({"error": DENIED, "code": "forbidden"})))
        tab.upload({"name": "refused.gif", "mimeType": "image/gif", "buffer": b"GIF89a"})
        card = tab.card("refused.gif")
        expect(card).to_have_class(re.compile(r"\bfailed\b"))
        expect(card.locator(".status")).to_have_text(DENIED)
        assert [e for e in tab.unexpected_errors(400, 401, 403, 413) if "net::ERR" not in e] == []
    finally:
        tab.close()


def test_my_images_pages_and_delete_with_confirmation(open_page, server, corpus, manifest):
    valid = [r for r in manifest if r["expected"] == "valid"
             and r["format"] in ("JPEG", "PNG", "GIF", "WEBP")]
    names = list(dict.fromkeys(r["file"] for r in valid))[:14]
    assert len(names) == 14
    infos = [put_image(server, corpus / name) for name in names]
    newest = infos[-1]

    tab = open_page()
    page = tab.page
    tab.sign_in()
    mine = page.locator("#mine li.card")
    expect(mine).to_have_count(12)
    expect(page.locator("#mine-range")).to_have_text("1–12 of 14")
    expect(mine.first).to_have_attribute("data-md5", newest["md5"])   # newest first
    expect(page.locator("#mine-prev")).to_be_disabled()
    page.click("#mine-next")
    expect(page.locator("#mine-range")).to_have_text("13–14 of 14")
    expect(mine).to_have_count(2)
    page.click("#mine-prev")
    expect(page.locator("#mine-range")).to_have_text("1–12 of 14")

    target = page.locator(f'#mine li.card[data-md5="{newest["md5"]}"]')
    target.locator("button[data-copy=bbcode]").click()
    expect(target.locator("button[data-copy=bbcode]")).to_have_attribute(
        "data-copied", f"[img]{newest['url']}[/img]")

    # Cancel keeps it.
    target.locator("button.delete").click()
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(newest["name"])
    expect(page.locator("#confirm-cancel")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(target).to_have_count(1)

    # Confirm deletes it, on the server too.
    target.locator("button.delete").click()
    page.click("#confirm-ok")
    expect(target).to_have_count(0)
    expect(page.locator("#mine-range")).to_have_text("1–12 of 13")
    status, _, data = api(server, "GET", "/api/images?limit=50&offset=0")
    assert newest["md5"] not in {image["md5"] for image in json.loads(data)["images"]}
    assert tab.unexpected_errors() == []


def test_phone_width(open_page, server, corpus, manifest):
    tab = open_page(width=375, height=740)
    page = tab.enter()
    image, card = uploaded_card(tab, corpus, manifest, "hopper.gif")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    for selector in ("label[for=file-input]", "button[data-copy=markdown]", "button[data-copy=bbcode]",
                     "input.url", "#sign-out"):
        target = page.locator(selector).first
        target.scroll_into_view_if_needed()
        box = target.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, (selector, box)
    card.locator("button[data-copy=url]").click()
    expect(card.locator("button[data-copy=url]")).to_have_attribute("data-copied", image_url(server, image))
    assert page.evaluate("navigator.clipboard.readText()") == image_url(server, image)
    assert tab.unexpected_errors() == []


def image_url(server, image) -> str:
    # Metadata removal may change the stored bytes: the file's MD5 is then the
    # image's source_md5, which the API answers for just the same.
    status, _, data = api(server, "GET", f"/api/images/{image['md5']}", user=("alice", "alice123"))
    assert status == 200, data
    info = json.loads(data)
    assert image["md5"] in (info["md5"], info.get("source_md5"))
    return info["url"]
