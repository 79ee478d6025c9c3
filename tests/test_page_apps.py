"""The page's "Connect an app" section, driven in Debian's Chromium with Playwright.

A token is made on the page with the signed-in password, shown once, and the
set-ups for it (ShareX .sxcu, PicGo settings, client.py and curl lines) are
read back the way a person gets them: the download and the copy buttons.
tests/test_apps_tools.py feeds those same texts to the real tools.
Browser fixtures (browser, server, open_page) come from conftest.py and skip
when Playwright or Chromium is missing.
"""
from __future__ import annotations

import base64
import json

from conftest import api, create_token_on_page, expect
from helpers import bearer
from imgproxy import DENIED_MESSAGE as DENIED


def list_tokens(server, user=("bob", "bob123")) -> list[dict]:
    status, _, data = api(server, "GET", "/api/tokens", user=user)
    assert status == 200, data
    return json.loads(data)["tokens"]


def upload_with_token(server, token: str, data: bytes, name: str = "x.gif") -> tuple[int, dict]:
    status, _, body = api(server, "PUT", "/upload/" + name, user=None, body=data,
                          headers={**bearer(token), "Content-Type": "application/octet-stream"})
    return status, json.loads(body)


# ---- in the browser ---------------------------------------------------------------

def test_create_token_shows_it_once_with_every_setup(open_page, server, corpus):
    tab = open_page()
    page = tab.page
    tab.sign_in()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#tokens-status")).to_contain_text("No tokens yet")

    setups = create_token_on_page(tab, "laptop ShareX")
    base = server.base_url
    # The token works for uploads, and is the one the set-ups carry.
    status, info = upload_with_token(server, setups.token, (corpus / "hopper.gif").read_bytes())
    assert status == 201, info

    assert setups.sharex_file_name == "imgproxy-laptop-sharex.sxcu"
    sxcu = json.loads(setups.sharex)
    assert sxcu["DestinationType"] == "ImageUploader" and sxcu["RequestMethod"] == "POST"
    assert sxcu["RequestURL"] == base + "/upload"
    assert sxcu["Body"] == "MultipartFormData" and sxcu["FileFormName"] == "file"
    assert sxcu["Headers"] == {"Authorization": "Bearer " + setups.token}
    assert sxcu["URL"] == "{json:url}" and sxcu["ErrorMessage"] == "{json:error}"

    picgo = json.loads(setups.picgo)
    assert picgo == {"url": base + "/upload", "paramName": "file", "jsonPath": "url",
                     "customHeader": json.dumps({"Authorization": "Bearer " + setups.token},
                                                separators=(",", ":")),
                     "customBody": ""}
    assert setups.client == f"IMGPROXY_URL='{base}' IMGPROXY_TOKEN='{setups.token}' python3 /path/to/client.py"
    assert setups.curl == (f"curl -H 'Authorization: Bearer {setups.token}' -H 'Accept: text/plain' "
                           f"-F 'file=@screenshot.png' '{base}/upload'")

    # Listed with its name and, once the server has seen it, its last use; never the secret.
    listed = list_tokens(server)
    assert [t["name"] for t in listed] == ["laptop ShareX"] and "token" not in listed[0]
    page.reload()
    expect(page.locator("#app")).to_be_visible()
    row = page.locator(f'#tokens li.token[data-token-id="{setups.token_id}"]')
    expect(row.locator(".name")).to_have_text("laptop ShareX")
    expect(row.locator(".meta")).to_contain_text("last used")
    # Shown once: after a reload the secret is nowhere on the page or in storage.
    expect(page.locator("#token-new")).to_be_hidden()
    assert setups.token not in page.content()
    assert setups.token not in page.evaluate("JSON.stringify(sessionStorage) + JSON.stringify(localStorage)")

    for request in tab.requests:
        assert setups.token not in request.url and "bob123" not in request.url
        if "/api/tokens" in request.url:
            assert request.all_headers()["authorization"] == "Basic " + base64.b64encode(b"bob:bob123").decode()
    assert tab.unexpected_errors() == []


def test_done_and_sign_out_forget_the_secret(open_page):
    tab = open_page()
    page = tab.page
    tab.sign_in()
    setups = create_token_on_page(tab, "script")
    page.click("#token-done")
    expect(page.locator("#token-new")).to_be_hidden()
    expect(page.locator("#token-name")).to_be_focused()
    assert setups.token not in page.content()

    setups = create_token_on_page(tab, "second")
    page.click("#sign-out")
    expect(page.locator("#signin")).to_be_visible()
    assert setups.token not in page.content()
    expect(page.locator("#tokens li")).to_have_count(0)
    assert tab.unexpected_errors() == []


def test_revoke_asks_first_then_stops_the_app(open_page, server, corpus):
    tab = open_page()
    page = tab.page
    tab.sign_in()
    keep = create_token_on_page(tab, "phone PicGo")
    gone = create_token_on_page(tab, "laptop ShareX")
    image = (corpus / "hopper.gif").read_bytes()
    assert upload_with_token(server, gone.token, image)[0] == 201

    row = page.locator(f'#tokens li.token[data-token-id="{gone.token_id}"]')
    # Cancel (Escape) keeps it.
    row.locator("button.revoke").click()
    dialog = page.locator("#revoke-confirm")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("laptop ShareX")
    expect(page.locator("#revoke-cancel")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(row).to_have_count(1)
    expect(row.locator("button.revoke")).to_be_focused()
    assert upload_with_token(server, gone.token, image)[0] == 200

    # Confirm revokes it on the server at once, and hides its set-ups.
    row.locator("button.revoke").click()
    page.click("#revoke-ok")
    expect(row).to_have_count(0)
    expect(page.locator("#token-new")).to_be_hidden()
    status, answer = upload_with_token(server, gone.token, image)
    assert status == 401 and answer["error"] == DENIED
    assert [t["id"] for t in list_tokens(server)] == [keep.token_id]
    assert upload_with_token(server, keep.token, image)[0] == 200   # the other app goes on
    assert tab.unexpected_errors() == []


def test_a_bad_name_is_explained(open_page, server):
    tab = open_page()
    page = tab.page
    tab.sign_in()
    expect(page.locator("#app")).to_be_visible()
    page.click("#token-create")
    expect(page.locator("#token-error")).to_contain_text("1 to 100 characters")
    expect(page.locator("#token-name")).to_be_focused()
    expect(page.locator("#token-new")).to_be_hidden()
    assert list_tokens(server) == []
    # What only the server refuses (a control character) comes back in words.
    page.fill("#token-name", "tab\there")
    page.click("#token-create")
    expect(page.locator("#token-error")).to_contain_text("The server refused the name")
    assert list_tokens(server) == []
    assert tab.unexpected_errors(400) == []


def test_hostile_app_name_stays_text(open_page, server):
    tab = open_page()
    page = tab.page
    tab.sign_in()
    name = '"><img src=nowhere id=injected>{json:x}|%y'
    setups = create_token_on_page(tab, name)
    assert page.locator("#injected").count() == 0
    expect(page.locator("#tokens li.token .name")).to_have_text(name)
    assert setups.sharex_file_name == "imgproxy-img-src-nowhere-id-injected-json-x-y.sxcu"
    assert json.loads(setups.sharex)["Headers"] == {"Authorization": "Bearer " + setups.token}
    assert [t["name"] for t in list_tokens(server)] == [name]
    assert tab.unexpected_errors() == []


def test_keyboard_only(open_page, server):
    tab = open_page()
    page = tab.page
    tab.sign_in()
    expect(page.locator("#app")).to_be_visible()
    page.locator("#apps-jump").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#token-name")).to_be_focused()
    page.keyboard.type("keyboard app")
    page.keyboard.press("Enter")
    copy = page.locator("#token-new button[data-copy=token]")
    expect(copy).to_be_focused()                      # ready to copy the secret
    page.keyboard.press("Enter")
    token = page.locator("#token-secret").input_value()
    expect(copy).to_have_attribute("data-copied", token)
    assert page.evaluate("navigator.clipboard.readText()") == token

    # Tab on to the set-up choice; Space picks PicGo.
    for _ in range(3):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.dataset.setupChoice") == "picgo":
            break
    assert page.evaluate("document.activeElement.dataset.setupChoice") == "picgo"
    page.keyboard.press("Space")
    expect(page.locator("[data-setup-choice=picgo]")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("[data-setup-panel=picgo]")).to_be_visible()
    expect(page.locator("[data-setup-panel=sharex]")).to_be_hidden()

    # Revoke from the keyboard: Enter on the row's button, Enter on "Revoke".
    row_button = page.locator("#tokens li.token button.revoke").first
    row_button.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#revoke-cancel")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.locator("#revoke-ok")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#tokens li.token")).to_have_count(0)
    expect(page.locator("#token-name")).to_be_focused()
    assert list_tokens(server) == []
    assert tab.unexpected_errors() == []


def test_phone_width(open_page, server):
    tab = open_page(width=375, height=740)
    page = tab.page
    tab.sign_in()
    setups = create_token_on_page(tab, "phone")
    for choice in ("sharex", "picgo", "client", "curl"):
        page.click(f"[data-setup-choice={choice}]")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), choice
    for selector in ("#token-create", "#token-new button[data-copy=token]", "[data-setup-choice=curl]",
                     "#token-new button[data-copy=curl]", "#token-done", "#tokens button.revoke"):
        target = page.locator(selector).first
        target.scroll_into_view_if_needed()
        box = target.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, (selector, box)
    assert setups.token in page.locator("[data-setup-panel=curl] code").inner_text()
    assert tab.unexpected_errors() == []
