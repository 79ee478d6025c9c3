"""App tokens (API.md "App tokens"): who may do what with a token, a password or
nothing; revocation seen at once by every worker; wrong tokens cost the same; only
a digest is stored; client.py signs in with a token."""
from __future__ import annotations

import asyncio
import collections
import json
import secrets
import sqlite3
import statistics
import time

import aiohttp
import pytest

import imgproxy
from conftest import ALICE, BOB
from helpers import TOKEN_RE, bearer, create_token, db_rows, http_call, median_refusal_seconds, png_bytes



# ---- creating, listing, revoking ------------------------------------------------------

async def test_create_list_revoke(make_client, clock):
    client = await make_client(clock=clock)
    made = await create_token(client, BOB, "laptop ShareX")
    assert set(made) == {"id", "name", "token", "created_at", "last_used_at"}
    assert TOKEN_RE.fullmatch(made["token"]) and made["name"] == "laptop ShareX"
    assert made["last_used_at"] is None and made["created_at"].endswith("Z")

    listed = await (await client.get("/api/tokens", headers=BOB)).json()
    assert listed == {"tokens": [{k: made[k] for k in ("id", "name", "created_at", "last_used_at")}]}
    assert (await (await client.get("/api/tokens", headers=ALICE)).json()) == {"tokens": []}

    clock.advance(5)
    assert (await client.get("/api/images", headers=bearer(made["token"]))).status == 200
    used = (await (await client.get("/api/tokens", headers=BOB)).json())["tokens"][0]
    assert used["last_used_at"] == imgproxy.iso(clock())

    # someone else's id is a 404 and revokes nothing
    assert (await client.delete(f"/api/tokens/{made['id']}", headers=ALICE)).status == 404
    assert (await client.get("/api/images", headers=bearer(made["token"]))).status == 200
    assert (await client.delete(f"/api/tokens/{made['id']}", headers=BOB)).status == 204
    assert (await client.delete(f"/api/tokens/{made['id']}", headers=BOB)).status == 404
    assert (await (await client.get("/api/tokens", headers=BOB)).json()) == {"tokens": []}
    resp = await client.get("/api/images", headers=bearer(made["token"]))
    assert resp.status == 401
    assert (await resp.json()) == {"error": imgproxy.DENIED_MESSAGE, "code": "unauthorized"}
    assert resp.headers["WWW-Authenticate"].startswith("Bearer ")


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", b'{"name": ""}', b'{"name": "   "}', b'{"name": 7}', b'{}',
    json.dumps({"name": "x" * 101}).encode(), json.dumps({"name": "tab\there"}).encode(),
], ids=["empty", "not-json", "list", "empty-name", "blank-name", "number", "no-name", "101-chars", "control"])
async def test_bad_token_names_are_400(make_client, body):
    client = await make_client()
    resp = await client.post("/api/tokens", data=body, headers={**BOB, "Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["code"] == "bad_request"
    assert (await (await client.get("/api/tokens", headers=BOB)).json()) == {"tokens": []}


async def test_a_hundred_characters_is_a_good_name_and_tokens_per_user_are_capped(make_client, monkeypatch):
    monkeypatch.setattr(imgproxy, "TOKENS_PER_USER", 3)
    client = await make_client()
    assert (await create_token(client, BOB, "é" * 100))["name"] == "é" * 100
    await create_token(client, BOB)
    await create_token(client, BOB)
    resp = await client.post("/api/tokens", json={"name": "one too many"}, headers=BOB)
    assert resp.status == 409 and (await resp.json())["code"] == "too_many_tokens"
    await create_token(client, ALICE)  # the cap is per user


# ---- the authorization matrix ---------------------------------------------------------

# What each kind of caller gets from each route: None = the route's success.
ROUTES = ["upload-multipart", "upload-put", "list", "lookup", "renew", "delete",
          "db", "token-create", "token-list", "token-revoke"]
MATRIX = {
    "none":           dict.fromkeys(ROUTES, 401),
    "wrong-token":    dict.fromkeys(ROUTES, 401),
    "revoked-token":  dict.fromkeys(ROUTES, 401),
    "bob-password":   {**dict.fromkeys(ROUTES), "db": 403},
    "bob-token":      {**dict.fromkeys(ROUTES), "db": 403, "token-create": 403, "token-list": 403,
                       "token-revoke": 403},
    "alice-password": dict.fromkeys(ROUTES),
    "alice-token":    {**dict.fromkeys(ROUTES), "db": 403, "token-create": 403, "token-list": 403,
                       "token-revoke": 403},
}
SUCCESS = {"upload-multipart": 201, "upload-put": 201, "list": 200, "lookup": 200, "renew": 200,
           "delete": 204, "db": 200, "token-create": 201, "token-list": 200, "token-revoke": 204}


@pytest.mark.parametrize("caller", list(MATRIX))
async def test_authorization_matrix(make_client, caller):
    client = await make_client()
    user, password_headers = ("alice", ALICE) if caller.startswith("alice") else ("bob", BOB)
    token = (await create_token(client, password_headers))["token"]
    headers = {
        "none": {},
        "wrong-token": bearer("imgp_" + "".join(secrets.choice(imgproxy.TOKEN_ALPHABET) for _ in range(43))),
        "revoked-token": bearer(token),
        "bob-password": BOB, "alice-password": ALICE,
        "bob-token": bearer(token), "alice-token": bearer(token),
    }[caller]
    if caller == "revoked-token":
        token_id = (await (await client.get("/api/tokens", headers=BOB)).json())["tokens"][0]["id"]
        assert (await client.delete(f"/api/tokens/{token_id}", headers=BOB)).status == 204

    for i, route in enumerate(ROUTES):
        # each route gets an image the caller's user holds, and a token of theirs to revoke
        image = png_bytes(color=(i, 7, len(caller)))
        resp = await client.put(f"/upload/{route}.png", data=image, headers=password_headers)
        md5 = (await resp.json())["md5"]
        victim = (await create_token(client, password_headers, f"victim {route}"))["id"]
        form = aiohttp.FormData()
        form.add_field("file", png_bytes(color=(i, 8, len(caller))), filename="a.png")
        resp = {
            "upload-multipart": lambda: client.post("/upload", data=form, headers=headers),
            "upload-put": lambda: client.put("/upload/b.png", data=png_bytes(color=(i, 9, len(caller))),
                                             headers=headers),
            "list": lambda: client.get("/api/images", headers=headers),
            "lookup": lambda: client.get(f"/api/images/{md5}", headers=headers),
            "renew": lambda: client.post(f"/api/images/{md5}/renew", headers=headers),
            "delete": lambda: client.delete(f"/api/images/{md5}", headers=headers),
            "db": lambda: client.get("/api/db", headers=headers),
            "token-create": lambda: client.post("/api/tokens", json={"name": "new"}, headers=headers),
            "token-list": lambda: client.get("/api/tokens", headers=headers),
            "token-revoke": lambda: client.delete(f"/api/tokens/{victim}", headers=headers),
        }[route]
        answer = await resp()
        expected = MATRIX[caller][route] or SUCCESS[route]
        assert answer.status == expected, (caller, route, await answer.text())
        if expected >= 400:
            body = await answer.json()
            assert body["error"] == imgproxy.DENIED_MESSAGE, (caller, route)
            assert body["code"] == ("unauthorized" if expected == 401 else "forbidden")
            assert token not in await answer.text()
        if expected == 401:
            scheme = "Bearer" if "token" in caller else "Basic"
            assert answer.headers["WWW-Authenticate"].startswith(scheme + " "), (caller, route)
        if route == "list" and expected == 200:
            listed = (await answer.json())["images"]
            assert md5 in {img["md5"] for img in listed}  # the token acts as its own user
    if caller == "bob-token":  # and an upload with bob's token is held by bob
        mine = await (await client.get("/api/images", headers=BOB)).json()
        assert len(mine["images"]) >= len(ROUTES)


async def test_token_of_a_user_removed_from_the_config_stops_working(make_config, make_client):
    config = make_config()
    client = await make_client(config)
    token = (await create_token(client, BOB))["token"]
    raw = json.loads(config.read_text())
    raw["users"] = [u for u in raw["users"] if u["username"] != "bob"]
    config.write_text(json.dumps(raw))
    restarted = await make_client(config)
    assert (await restarted.get("/api/images", headers=bearer(token))).status == 401


async def test_wrong_tokens_count_toward_the_sign_in_limiter(make_client):
    client = await make_client()
    for i in range(imgproxy.AUTH_FAIL_LIMIT):
        assert (await client.get("/api/images", headers=bearer(f"imgp_guess{i}"))).status == 401
    resp = await client.get("/api/images", headers=ALICE)
    assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0


# ---- revocation across processes ------------------------------------------------------

def test_revocation_holds_at_once_in_every_worker(make_config, server_process):
    proc = server_process(make_config(server={"workers": 2}))
    base = proc.base_url
    status, body = http_call("POST", base + "/api/tokens", json.dumps({"name": "script"}).encode(),
                              {**BOB, "Content-Type": "application/json"})
    assert status == 201
    made = json.loads(body)
    # a new connection each time: both workers answer some of these
    for i in range(30):
        status, _ = http_call("PUT", base + f"/upload/{i}.png", png_bytes(color=(i, 1, 2)), bearer(made["token"]))
        assert status == 201
    status, _ = http_call("DELETE", base + f"/api/tokens/{made['id']}", headers=BOB)
    assert status == 204
    # fewer than the limiter's ten failures, so every answer is the token's verdict
    answers = {http_call("GET", base + "/api/images", headers=bearer(made["token"]))[0]
               for _ in range(imgproxy.AUTH_FAIL_LIMIT - 1)}
    assert answers == {401}
    status, body = http_call("GET", base + "/api/images?limit=1000", headers=BOB)
    assert json.loads(body)["total"] == 30  # what the token uploaded stays bob's
    assert proc.terminate() == 0
    assert made["token"] not in proc.log and "Traceback" not in proc.log


# ---- timing ---------------------------------------------------------------------------

async def test_wrong_token_timing_does_not_depend_on_how_close_it_is(make_client, monkeypatch):
    """Tokens are found by the digest of the whole secret: a guess sharing a long
    prefix with a real token costs the same as any other wrong guess."""
    monkeypatch.setattr(imgproxy, "AUTH_FAIL_LIMIT", 10**9)
    client = await make_client()
    real = (await create_token(client, BOB))["token"]
    near = real[:-1] + ("A" if real[-1] != "A" else "B")

    far = "imgp_" + "z" * 43
    ratios = [await median_refusal_seconds(client, bearer(near)) / await median_refusal_seconds(client, bearer(far))
              for _ in range(3)]
    assert 0.67 < statistics.median(ratios) < 1.5, ratios


# ---- storage: a digest, never the secret ------------------------------------------------

def test_only_a_digest_is_stored_and_nothing_secret_is_logged(make_config, server_process):
    config = make_config(server={"access_log": True, "log_level": "DEBUG"})
    proc = server_process(config)
    status, body = http_call("POST", proc.base_url + "/api/tokens", b'{"name": "editor"}',
                              {**ALICE, "Content-Type": "application/json"})
    token = json.loads(body)["token"]
    assert http_call("PUT", proc.base_url + "/upload/a.png", png_bytes(), bearer(token))[0] == 201
    assert http_call("GET", proc.base_url + "/api/images", headers=bearer(token[:-2] + "xx"))[0] == 401
    status, snapshot = http_call("GET", proc.base_url + "/api/db", headers=ALICE)
    assert status == 200
    time.sleep(0.3)
    assert proc.terminate() == 0
    data_dir = config.parent / "data"
    token_rows = db_rows(data_dir, "SELECT * FROM tokens")   # what a database on a server of its own holds
    on_disk = (b"".join(p.read_bytes() for p in data_dir.glob("images.db*")) + snapshot
               + repr(token_rows).encode())
    secret_part = token[len("imgp_"):]
    assert token.encode() not in on_disk and secret_part.encode() not in on_disk
    assert secret_part[:20] not in proc.log and token[:-2] not in proc.log
    (digest,), = db_rows(data_dir, "SELECT secret_sha256 FROM tokens")
    assert digest == imgproxy.token_digest(token)


@pytest.mark.sqlite_only   # an SQLite file of the release before tokens
def test_an_existing_database_gains_the_tokens_table(make_config, live_server):
    config = make_config()
    data_dir = config.parent / "data"
    data_dir.mkdir()
    old = sqlite3.connect(data_dir / "images.db")  # the schema of the release before tokens
    old.executescript(imgproxy.SCHEMA)
    old.close()
    server = live_server(config)
    status, body = http_call("POST", server.base_url + "/api/tokens", b'{"name": "x"}',
                              {**BOB, "Content-Type": "application/json"})
    assert status == 201
    assert http_call("GET", server.base_url + "/api/images", headers=bearer(json.loads(body)["token"]))[0] == 200


def test_client_token_is_accepted_in_the_server_config(make_config):
    config = imgproxy.load_config(make_config(client={"username": "bob", "token": "imgp_x"}))
    assert config.client.token == "imgp_x" and "imgp_x" not in repr(config)
    with pytest.raises(imgproxy.ConfigError, match="client.token"):
        imgproxy.load_config(make_config(client={"token": 5}))


# ---- client.py with a token -------------------------------------------------------------

def run_client(tmp_path, *args: str, stdin: str = "", **env: str):
    """client.py in a child process, with no IMGPROXY_* or cache from outside."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPROXY_")}
    child_env.update(XDG_CACHE_HOME=str(tmp_path / "client-cache"), **env)
    return subprocess.run([sys.executable, str(ROOT / "client.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=60, env=child_env)


def password_free_config(tmp_path, base_url: str, **client: str):
    """A client's config.json with a server address and no password anywhere."""
    path = tmp_path / "client-config.json"
    path.write_text(json.dumps({"server": {"base_url": base_url}, "client": client}))
    return path


def make_token_over_http(base_url: str, who: dict) -> dict:
    status, body = http_call("POST", base_url + "/api/tokens", b'{"name": "client.py"}',
                              {**who, "Content-Type": "application/json"})
    assert status == 201
    return json.loads(body)


def held_by(base_url: str, who: dict) -> set[str]:
    return {img["url"] for img in json.loads(http_call("GET", base_url + "/api/images", headers=who)[1])["images"]}


def test_client_cli_with_imgproxy_token_and_no_password_on_disk(make_config, live_server, tmp_path):
    server = live_server(make_config())
    token = make_token_over_http(server.base_url, BOB)["token"]
    image = tmp_path / "shot.png"
    image.write_bytes(png_bytes(color=(3, 4, 5)))
    config = password_free_config(tmp_path, server.base_url)
    out = run_client(tmp_path, str(image), IMGPROXY_CONFIG=str(config), IMGPROXY_TOKEN=token)
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    assert url in held_by(server.base_url, BOB)  # the token acted as bob
    again = run_client(tmp_path, str(image), "--json", IMGPROXY_CONFIG=str(config), IMGPROXY_TOKEN=token)
    assert json.loads(again.stdout)["status"] == "cached"
    assert token not in out.stderr + again.stderr + again.stdout


def test_client_token_stdin_and_config_token_beat_a_password(make_config, live_server, tmp_path):
    server = live_server(make_config())
    token = make_token_over_http(server.base_url, BOB)["token"]
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(color=(6, 6, 6)))
    # a wrong password in the config: the token is used, not the password
    config = password_free_config(tmp_path, server.base_url, username="bob", password="wrong", token=token)
    out = run_client(tmp_path, "--no-cache", str(image), IMGPROXY_CONFIG=str(config))
    assert out.returncode == 0, out.stderr
    # --token-stdin: the secret never on a command line or in a file
    config = password_free_config(tmp_path, server.base_url)
    out = run_client(tmp_path, "--no-cache", "--token-stdin", str(image), stdin=token + "\n",
                     IMGPROXY_CONFIG=str(config))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in held_by(server.base_url, BOB)


def test_client_create_token_prints_only_the_token(make_config, live_server, tmp_path):
    server = live_server(make_config())
    config = password_free_config(tmp_path, server.base_url)
    out = run_client(tmp_path, "--create-token", "Typora on laptop", "--user", "bob",
                     IMGPROXY_CONFIG=str(config), IMGPROXY_PASSWORD="bob123")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert TOKEN_RE.fullmatch(token)
    assert "bob123" not in out.stdout + out.stderr + config.read_text()
    listed = json.loads(http_call("GET", server.base_url + "/api/tokens", headers=BOB)[1])["tokens"]
    assert [t["name"] for t in listed] == ["Typora on laptop"]
    assert http_call("GET", server.base_url + "/api/images", headers=bearer(token))[0] == 200
    wrong = run_client(tmp_path, "--create-token", "x", "--user", "bob",
                       IMGPROXY_CONFIG=str(config), IMGPROXY_PASSWORD="nope")
    assert wrong.returncode == 1 and not wrong.stdout
    assert imgproxy.DENIED_MESSAGE in wrong.stderr


def test_client_api_with_a_revoked_token_is_an_error_dict(make_config, live_server, tmp_path):
    import client as imgclient
    server = live_server(make_config())
    made = make_token_over_http(server.base_url, ALICE)
    app = imgclient.Client(server.base_url, None, None, use_cache=False, token=made["token"])
    image = tmp_path / "b.png"
    image.write_bytes(png_bytes(color=(8, 8, 9)))
    assert app.upload_or_get(image)["status"] == "uploaded"
    assert made["token"] not in repr(app)
    assert http_call("DELETE", server.base_url + f"/api/tokens/{made['id']}", headers=ALICE)[0] == 204
    assert app.upload_or_get(image) == {"error": imgproxy.DENIED_MESSAGE, "code": "unauthorized"}
    assert "error" in app.create_token("needs a password")  # a token cannot make tokens


# ---- found in review ------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["application/json; charset=bogus", "application/json; charset=utf-99"])
async def test_a_token_request_with_an_unknown_charset_is_400_not_500(make_client, content_type):
    client = await make_client()
    resp = await client.post("/api/tokens", data=b'{"name": "x"}', headers={**BOB, "Content-Type": content_type})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["code"] == "bad_request"
    assert (await (await client.get("/api/tokens", headers=BOB)).json()) == {"tokens": []}



async def test_concurrent_requests_with_a_valid_token_are_never_rate_limited(make_client):
    """An app (or several behind one NAT) sending many requests at once with a
    good token has failed nothing: none of them may get 429, and the address
    stays unblocked afterwards."""
    client = await make_client()
    token = (await create_token(client, BOB))["token"]
    statuses = await asyncio.gather(*[client.get("/api/images", headers=bearer(token))
                                      for _ in range(4 * imgproxy.AUTH_FAIL_LIMIT)])
    assert collections.Counter(resp.status for resp in statuses) == {200: 4 * imgproxy.AUTH_FAIL_LIMIT}
    assert (await client.get("/api/images", headers=BOB)).status == 200


@pytest.mark.parametrize("token", ["imgp_first\nsecond-line-9f3k", "imgp_caf\u00e9-9f3k"], ids=["newline", "non-ascii"])
def test_client_with_a_malformed_token_fails_in_one_line_without_echoing_it(make_config, live_server, tmp_path,
                                                                            token):
    server = live_server(make_config())
    image = tmp_path / "c.png"
    image.write_bytes(png_bytes(color=(3, 8, 9)))
    out = run_client(tmp_path, "--no-cache", str(image), IMGPROXY_URL=server.base_url, IMGPROXY_TOKEN=token)
    assert out.returncode == 1 and not out.stdout
    assert "Traceback" not in out.stderr and "9f3k" not in out.stderr, out.stderr
    assert "token" in out.stderr
