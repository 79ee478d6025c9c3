"""Tests for client.py against the project's real server (no mocks).

Each test starts its own imgproxy app on a fresh port in a background thread,
with a tiny middleware added that records every request the server sees: that
is how "renew sent no bytes" and "cached made no request" are checked.  The
client's blocking calls run in the test thread.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from aiohttp import web

import client
import imgproxy
from client import PERMISSION_MESSAGE, Client
from conftest import ROOT as REPO
from conftest import LiveServer, corpus_file, read_manifest
from helpers import clean_env

CLIENT_PY = REPO / "client.py"
# Formats the README says the server accepts; the corpus also holds AVIF/HEIF,
# which Pillow may read but the server is free to refuse.
ACCEPTED_FORMATS = {"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO"}
MANIFEST = read_manifest()
VALID = [r for r in MANIFEST if r["expected"] == "valid" and r["format"] in ACCEPTED_FORMATS]
REFUSED = [r for r in MANIFEST if r["expected"] in ("invalid", "bomb")]


# ---------------------------------------------------------------- a recording server

@dataclass
class RunningServer:
    """A LiveServer and every (method, path) it was asked, auth failures included."""
    live: LiveServer
    requests: list[tuple[str, str]]

    @property
    def base_url(self) -> str:
        return self.live.base_url

    @property
    def config_path(self) -> Path:
        return self.live.config_path

    def stop(self) -> None:
        self.live.stop()

    def uploads(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[1].startswith("/upload")]


@pytest.fixture
def imgserver(make_config, live_server) -> Callable[..., RunningServer]:
    """Factory: ``imgserver(expire_days=30, max_upload_mb=20, users=None)``
    starts a recording server with its own config and data folder."""

    def start(*, expire_days: float = 30, max_upload_mb: int = 20,
              users: list[dict] | None = None, strip_metadata: bool = True) -> RunningServer:
        # The config names the real port: the client CLI reads its URL from it.
        sock = imgproxy.bind_socket("127.0.0.1", 0)
        config_path = make_config(server={"port": sock.getsockname()[1], "max_upload_mb": max_upload_mb,
                                          "strip_metadata": strip_metadata},
                                  cleanup={"expire_days": expire_days}, users=users)
        seen: list[tuple[str, str]] = []

        @web.middleware
        async def record(request: web.Request, handler):
            seen.append((request.method, request.path))
            return await handler(request)

        return RunningServer(live_server(config_path, middlewares=[record], sock=sock), seen)

    return start


@pytest.fixture
def server(imgserver: Callable[..., RunningServer]) -> RunningServer:
    return imgserver()


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "cache.db"


def new_client(server: RunningServer, cache_path: Path | None, user: str = "alice",
                password: str = "alice123", **options) -> Client:
    if cache_path is None:
        return Client(server.base_url, user, password, use_cache=False, **options)
    return Client(server.base_url, user, password, cache_path=cache_path, **options)


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()   # nothing listens there now: connecting is refused at once
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------- the three statuses

def test_uploaded_then_exists_without_bytes_then_cached(server, tmp_path, cache_path):
    image = corpus_file("testorig.jpg")
    first = new_client(server, cache_path)

    uploaded = first.upload_or_get(image)
    assert uploaded["status"] == "uploaded", uploaded
    assert uploaded["md5"] == "3016112edb6ff1a7af3c2c0093df75a4"
    assert (uploaded["width"], uploaded["height"], uploaded["format"]) == (227, 149, "JPEG")
    assert uploaded["size"] == image.stat().st_size
    assert uploaded["url"].endswith("/i/3016112edb6ff1a7af3c2c0093df75a4.jpg")
    for key in ("name", "access_count", "created_at", "expire_at", "mime"):
        assert key in uploaded
    assert len(server.uploads()) == 1

    # Another machine (its own empty cache) asks for the same image: the
    # server already has it, so only the renew request goes out, no bytes.
    server.requests.clear()
    other = new_client(server, tmp_path / "other-cache.db")
    exists = other.upload_or_get(image)
    assert exists["status"] == "exists", exists
    assert exists["url"] == uploaded["url"]
    assert server.requests == [("POST", f"/api/images/{uploaded['md5']}/renew")]

    # The first machine answers from its cache without any request at all.
    server.requests.clear()
    cached = first.upload_or_get(image)
    assert cached["status"] == "cached"
    assert cached["url"] == uploaded["url"]
    assert cached["md5"] == uploaded["md5"]
    assert server.requests == []


def test_cached_answer_needs_no_server(server, cache_path):
    c = new_client(server, cache_path)
    url = c.get_image_url(corpus_file("hopper.gif"))
    assert url
    server.stop()
    assert c.get_image_url(corpus_file("hopper.gif")) == url
    assert c.upload_or_get(corpus_file("hopper.gif"))["status"] == "cached"


def test_no_cache_always_asks_the_server(server):
    c = new_client(server, None)
    assert c.upload_or_get(corpus_file("rgb.jpg"))["status"] == "uploaded"
    assert c.upload_or_get(corpus_file("rgb.jpg"))["status"] == "exists"
    assert len(server.uploads()) == 1


@pytest.mark.parametrize("row", VALID, ids=[r["file"] for r in VALID])
def test_valid_corpus_image_round_trip(server, row):
    info = new_client(server, None).upload_or_get(corpus_file(row["file"]))
    assert "error" not in info, info
    assert info["status"] == "uploaded"
    # The server may strip metadata: then the file's MD5 is the source_md5.
    assert info.get("source_md5", info["md5"]) == row["md5"]
    assert info["format"] == row["format"]
    assert (info["width"], info["height"]) == (int(row["width"]), int(row["height"]))
    assert info["url"].startswith(server.base_url + "/i/" + info["md5"] + ".")


def test_cache_is_per_user(server, cache_path):
    # Holding an image is per user on the server (delete drops one hold), so
    # alice's cached answer must not stand in for bob's own renew.
    image = corpus_file("transparent.png")
    assert new_client(server, cache_path).upload_or_get(image)["status"] == "uploaded"
    bob = new_client(server, cache_path, "bob", "bob123")
    assert bob.upload_or_get(image)["status"] == "exists"
    assert bob.upload_or_get(image)["status"] == "cached"


# ---------------------------------------------------------------- cache expiry and robustness

def test_expired_cache_entries_are_not_used_and_are_purged(server, cache_path):
    c = new_client(server, cache_path)
    image = corpus_file("basn2c16.png")
    info = c.upload_or_get(image)
    assert info["status"] == "uploaded"

    db = sqlite3.connect(cache_path)
    with db:
        db.execute("UPDATE images SET expire_at = ?", (time.time() - 5,))
        db.execute("INSERT INTO images VALUES (?, 'alice', ?, '{}', ?)",
                   (server.base_url, "0" * 32, time.time() - 3600))
    db.close()

    server.requests.clear()
    again = c.upload_or_get(image)
    assert again["status"] == "exists"           # asked the server, did not trust the cache
    assert server.requests == [("POST", f"/api/images/{info['md5']}/renew")]

    db = sqlite3.connect(cache_path)
    rows = db.execute("SELECT md5, expire_at FROM images").fetchall()
    db.close()
    assert [md5 for md5, _ in rows] == [info["md5"]]   # the stale row is gone
    assert rows[0][1] > time.time()                     # and ours was refreshed


def test_entry_about_to_expire_is_renewed(server, cache_path):
    c = new_client(server, cache_path)
    image = corpus_file("basn0g16.png")
    assert c.upload_or_get(image)["status"] == "uploaded"
    db = sqlite3.connect(cache_path)
    with db:
        db.execute("UPDATE images SET expire_at = ?", (time.time() + 60,))
    db.close()
    assert c.upload_or_get(image)["status"] == "exists"


def test_short_server_expiry_is_never_cached(imgserver, cache_path):
    # expire_days 0: every image expires at once, so the cache must not keep it.
    server = imgserver(expire_days=0)
    c = new_client(server, cache_path)
    first = c.upload_or_get(corpus_file("basn0g01.png"))
    assert first.get("status") == "uploaded", first
    db = sqlite3.connect(cache_path)
    assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0
    db.close()


def test_corrupt_cache_warns_once_and_uploads_anyway(server, cache_path, capsys):
    cache_path.parent.mkdir(parents=True)
    cache_path.write_bytes(b"this is not an SQLite database" * 100)
    c = new_client(server, cache_path)
    assert c.upload_or_get(corpus_file("testorig.jpg"))["status"] == "uploaded"
    assert c.upload_or_get(corpus_file("testorig.jpg"))["status"] == "exists"
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert str(cache_path) in err


def test_unwritable_cache_location_does_not_break_uploads(server, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    c = new_client(server, blocker / "cache.db")
    assert c.get_image_url(corpus_file("hopper.ico"))
    assert capsys.readouterr().err.count("warning") == 1


def test_unchanged_file_is_not_hashed_again(server, tmp_path, cache_path):
    image = tmp_path / "photo.png"
    shutil.copyfile(corpus_file("basn3p04.png"), image)
    c = new_client(server, cache_path)
    assert c.upload_or_get(image)["md5"] == "e1cd04323ac542c5970dc6f5e1f368da"
    stat = image.stat()

    # Same size and mtime, different bytes: the memo answers, which proves the
    # file was not read again.  (Real edits change the mtime; see below.)
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF
    image.write_bytes(bytes(data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert c.upload_or_get(image)["md5"] == "e1cd04323ac542c5970dc6f5e1f368da"

    shutil.copyfile(corpus_file("basn6a16.png"), image)   # a real change
    assert c.upload_or_get(image)["md5"] == "b68cb43acf0232f30a22d49d705911a3"


_CONCURRENT_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from client import Client
c = Client(sys.argv[2], "alice", "alice123", cache_path=sys.argv[3])
print(json.dumps([c.upload_or_get(p) for p in sys.argv[4:]]))
"""


def test_two_processes_share_one_cache(server, tmp_path, cache_path):
    files = [str(corpus_file(r["file"])) for r in VALID]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_SCRIPT, str(REPO), server.base_url,
             str(cache_path), *order],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=clean_env(tmp_path))
        for order in (files, files[::-1], files[1::2] + files[::2])
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "warning" not in err, err   # nobody had to give up on the cache
        results = json.loads(out)
        assert all("error" not in r for r in results), results
        assert {r["status"] for r in results} <= {"uploaded", "exists", "cached"}

    # Every image is now in the shared cache and answers without a request.
    check = Client(server.base_url, "alice", "alice123", cache_path=cache_path)
    server.requests.clear()
    answers = [check.upload_or_get(f) for f in files]
    assert {a["status"] for a in answers} == {"cached"}
    assert server.requests == []
    # One row per digest: the stored bytes' md5 and, when stripping changed them, the file's.
    digests = {a["md5"] for a in answers} | {a["source_md5"] for a in answers if "source_md5" in a}
    db = sqlite3.connect(cache_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == len(digests)
    db.close()


# ---------------------------------------------------------------- failures become error dicts

def test_wrong_password_gives_permission_message(server, cache_path):
    c = new_client(server, cache_path, "alice", "wrong")
    result = c.upload_or_get(corpus_file("testorig.jpg"))
    assert result == {"error": PERMISSION_MESSAGE, "code": "unauthorized"}
    assert server.uploads() == []   # refused at the renew; no bytes were sent


def test_unknown_user_gives_permission_message(server):
    result = Client(server.base_url, "mallory", "x", use_cache=False).upload_or_get(CLIENT_PY)
    assert result["error"] == PERMISSION_MESSAGE


def test_server_down_fails_fast(tmp_path, cache_path):
    c = Client(closed_port_url(), "alice", "alice123", cache_path=cache_path)
    started = time.monotonic()
    result = c.upload_or_get(CLIENT_PY)
    assert time.monotonic() - started < 3
    assert result["code"] == "network"
    assert "connection refused" in result["error"]
    assert c.get_image_url(CLIENT_PY) is None
    assert isinstance(c.download_db(tmp_path / "x.db"), dict)
    assert not (tmp_path / "x.db").exists()


def test_unresolvable_host_is_an_error_dict(cache_path):
    c = Client("http://no-such-host.invalid:8000", "alice", "alice123", cache_path=cache_path,
               timeout=5)
    result = c.upload_or_get(CLIENT_PY)
    assert result["code"] in ("network", "timeout")


def test_non_image_is_refused_clearly(server):
    result = new_client(server, None).upload_or_get(corpus_file("invalid.png"))
    assert result["code"] == "unsupported_image"
    assert result["error"].startswith("the server refused the file: ")


def test_pixel_bomb_is_refused_clearly(server):
    result = new_client(server, None).upload_or_get(corpus_file("lottapixel.jpg"))
    assert result["code"] == "too_many_pixels", result
    assert result["error"].startswith("the server refused the file: ")


@pytest.mark.parametrize("row", REFUSED, ids=[r["file"] for r in REFUSED])
def test_every_bad_corpus_file_is_an_error_dict(server, row, cache_path):
    result = new_client(server, cache_path).upload_or_get(corpus_file(row["file"]))
    assert "error" in result and "url" not in result, result
    assert result.get("code") not in ("network", "bad_response"), result
    assert new_client(server, cache_path).get_image_url(corpus_file(row["file"])) is None


def test_file_larger_than_server_limit(imgserver, tmp_path):
    from PIL import Image

    server = imgserver(max_upload_mb=1)
    big = tmp_path / "big.bmp"
    Image.new("RGB", (2000, 2000), (200, 30, 30)).save(big)   # 12 MB
    result = new_client(server, None).upload_or_get(big)
    # The server stops reading at 1 MB; its 413 must still reach the user
    # as a refusal, not as a broken connection.
    assert result.get("code") not in (None, "network", "bad_response"), result
    assert result["error"].startswith("the server refused the file: ")
    assert server.uploads() == [("PUT", "/upload/big.bmp")]


def test_missing_file(tmp_path):
    result = Client(closed_port_url(), "a", "b", use_cache=False).upload_or_get(tmp_path / "nope.png")
    assert result["code"] == "file_not_found"
    assert "nope.png" in result["error"]


def test_directory(tmp_path):
    result = Client(closed_port_url(), "a", "b", use_cache=False).upload_or_get(tmp_path)
    assert result["code"] == "is_a_directory"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_not_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = Client(closed_port_url(), "a", "b", use_cache=False).upload_or_get(fifo)
    assert result["code"] == "not_a_file"


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    result = Client(closed_port_url(), "a", "b", use_cache=False).upload_or_get(empty)
    assert result["code"] == "empty_file"


_UNREADABLE_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from client import Client
print(json.dumps(Client("http://127.0.0.1:1", "a", "b", use_cache=False).upload_or_get(sys.argv[2])))
"""


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_unreadable_file():
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        locked = Path(folder) / "locked.png"
        locked.write_bytes(b"\x89PNG\r\n\x1a\n")
        locked.chmod(0)
        # Root reads any file, so as root the client runs as "nobody".
        as_user = {"user": 65534} if os.geteuid() == 0 else {}
        try:
            proc = subprocess.run([sys.executable, "-c", _UNREADABLE_SCRIPT, str(REPO),
                                   str(locked)], capture_output=True, text=True, timeout=60,
                                  **as_user)
        except PermissionError:
            pytest.skip("running as root without the right to switch user")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["code"] == "unreadable"
        assert "permission denied" in result["error"]


# ---------------------------------------------------------------- large files are streamed

_STREAM_SCRIPT = """
import json, sys, tracemalloc
sys.path.insert(0, sys.argv[1])
from client import Client
tracemalloc.start()
c = Client(sys.argv[2], "alice", "alice123", cache_path=sys.argv[3])
result = c.upload_or_get(sys.argv[4])
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1], "result": result}))
"""


def test_large_file_is_streamed_with_small_client_memory(imgserver, tmp_path, cache_path):
    from PIL import Image

    server = imgserver(max_upload_mb=100)
    big = tmp_path / "big.bmp"
    Image.new("RGB", (5000, 4000), (10, 120, 200)).save(big)   # 60 MB, 20 megapixels
    size = big.stat().st_size
    assert size > 50 << 20

    # In its own process, so the server thread's allocations do not count.
    proc = subprocess.run(
        [sys.executable, "-c", _STREAM_SCRIPT, str(REPO), server.base_url, str(cache_path), str(big)],
        capture_output=True, text=True, timeout=300, env=clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["result"].get("status") == "uploaded", report["result"]
    assert report["result"]["size"] == size
    assert report["peak"] < 8 << 20, report["peak"]   # far below the 60 MB file
    assert proc.stderr == ""   # stderr is not a terminal: no progress bar


# ---------------------------------------------------------------- database download

def test_download_db_saves_an_sqlite_snapshot(server, tmp_path, cache_path):
    c = new_client(server, cache_path)
    assert c.upload_or_get(corpus_file("testorig.jpg"))["status"] == "uploaded"
    dest = tmp_path / "out" / "images_server.db"
    dest.parent.mkdir()
    assert c.download_db(dest) == str(dest)
    assert c.download_db(dest.parent) == str(dest)   # a folder gets the default name
    db = sqlite3.connect(dest)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='table'").fetchone()[0] > 0
    db.close()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["images_server.db"]


def test_download_db_needs_admin_and_leaves_no_file(server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = new_client(server, None, "bob", "bob123").download_db(out / "images_server.db")
    assert result == {"error": PERMISSION_MESSAGE, "code": "forbidden"}
    assert list(out.iterdir()) == []


def test_download_db_wrong_password(server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = new_client(server, None, "alice", "nope").download_db(out / "x.db")
    assert result["error"] == PERMISSION_MESSAGE
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- module functions and config

def test_module_functions_use_config_and_environment(server, tmp_path, monkeypatch):
    monkeypatch.delenv("IMGPROXY_URL", raising=False)
    monkeypatch.delenv("IMGPROXY_USER", raising=False)
    monkeypatch.delenv("IMGPROXY_PASSWORD", raising=False)
    monkeypatch.setenv("IMGPROXY_CONFIG", str(server.config_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    info = client.upload_or_get(str(corpus_file("chi.gif")))
    assert info["status"] == "uploaded", info
    assert client.get_image_url(corpus_file("chi.gif")) == info["url"]
    assert client.upload_or_get(corpus_file("chi.gif"))["status"] == "cached"
    assert (tmp_path / "xdg" / "imgproxy" / "cache.db").is_file()
    saved = client.download_db(tmp_path / "images_server.db")
    assert saved == str(tmp_path / "images_server.db")

    monkeypatch.setenv("IMGPROXY_PASSWORD", "wrong")
    assert client.upload_or_get(corpus_file("hopper.gif"))["error"] == PERMISSION_MESSAGE
    assert client.get_image_url(corpus_file("hopper.gif")) is None


def test_module_functions_report_config_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGPROXY_CONFIG", str(tmp_path / "missing.json"))
    result = client.upload_or_get(CLIENT_PY)
    assert result["code"] == "config"
    assert "IMGPROXY_CONFIG" in result["error"]
    assert client.get_image_url(CLIENT_PY) is None


def _config(tmp_path: Path, data: dict) -> dict:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return {"IMGPROXY_CONFIG": str(path)}


def test_settings_from_server_domain_and_first_user(tmp_path):
    env = _config(tmp_path, {"server": {"domain": "127.0.0.1", "port": 8000, "host": "127.0.0.1"},
                             "users": [{"username": "alice", "password": "alice123", "role": "admin"}]})
    s = client.load_settings(env)
    assert (s.base_url, s.username, s.password) == ("http://127.0.0.1:8000", "alice", "alice123")
    assert s.cache_path is None


def test_settings_base_url_and_client_section_win(tmp_path):
    env = _config(tmp_path, {
        "server": {"domain": "x", "port": 1, "base_url": "https://img.example.com/pics/"},
        "users": [{"username": "alice", "password": "alice123"}],
        "client": {"username": "bob", "password": "bob123", "cache_path": "c.db"}})
    s = client.load_settings(env)
    assert (s.base_url, s.username, s.password) == ("https://img.example.com/pics", "bob", "bob123")
    assert s.cache_path == tmp_path / "c.db"


def test_settings_skip_users_with_only_a_password_hash(tmp_path):
    env = _config(tmp_path, {"server": {"domain": "h", "port": 1},
                             "users": [{"username": "root", "password_hash": "scrypt$x"},
                                       {"username": "bob", "password": "bob123"}]})
    assert client.load_settings(env).username == "bob"
    # Asking for the hashed user by name gives no password: the CLI prompts,
    # the functions answer with a clear error instead of sending a wrong one.
    s = client.load_settings({**env, "IMGPROXY_USER": "root"})
    assert (s.username, s.password) == ("root", None)
    result = Client(s.base_url, s.username, s.password, use_cache=False).upload_or_get(CLIENT_PY)
    assert result["code"] == "no_credentials"
    assert "IMGPROXY_PASSWORD" in result["error"]


def test_settings_environment_overrides(tmp_path):
    env = _config(tmp_path, {"server": {"domain": "h", "port": 1},
                             "users": [{"username": "alice", "password": "alice123"}]})
    env.update(IMGPROXY_URL="http://10.0.0.1:9000/", IMGPROXY_USER="carol",
               IMGPROXY_PASSWORD="pw")
    s = client.load_settings(env)
    assert (s.base_url, s.username, s.password) == ("http://10.0.0.1:9000", "carol", "pw")
    s = client.load_settings(env, server="https://other:1", user="dave")
    assert (s.base_url, s.username, s.password) == ("https://other:1", "dave", "pw")


@pytest.mark.parametrize("url", ["ftp://x", "img.example.com", "http://alice:pw@host:1"])
def test_bad_server_urls_are_refused(url):
    with pytest.raises(client.ConfigError):
        Client(url, "a", "b", use_cache=False)


def test_malformed_config_is_a_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(client.ConfigError, match="not valid JSON"):
        client.load_settings({"IMGPROXY_CONFIG": str(path)})


def test_default_cache_location(tmp_path):
    assert client.default_cache_path({"XDG_CACHE_HOME": str(tmp_path)}) == \
        tmp_path / "imgproxy" / "cache.db"
    assert client.default_cache_path({}) == Path.home() / ".cache" / "imgproxy" / "cache.db"


def test_password_is_not_in_repr():
    assert "s3cret" not in repr(Client("http://h:1", "alice", "s3cret", use_cache=False))


# ---------------------------------------------------------------- the command line

def run_cli(args: list[str], env: dict, cwd: Path | None = None,
            script: Path = CLIENT_PY) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120, stdin=subprocess.DEVNULL)


def server_env(server: RunningServer, tmp_path: Path, user: str = "alice",
               password: str = "alice123") -> dict:
    # IMGPROXY_CONFIG keeps the repository's own config.json out of the test.
    return clean_env(tmp_path, IMGPROXY_URL=server.base_url, IMGPROXY_USER=user,
                     IMGPROXY_PASSWORD=password, IMGPROXY_CONFIG=str(server.config_path))


def test_cli_prints_one_url_per_file_in_order(imgserver, tmp_path):
    server = imgserver(strip_metadata=False)  # URLs name the files' own MD5s
    files = [corpus_file(n) for n in ("testorig.jpg", "hopper.gif", "test.webp")]
    proc = run_cli([str(f) for f in files], server_env(server, tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    for line, md5 in zip(lines, ("3016112edb6ff1a7af3c2c0093df75a4",
                                 "ce2348678c010a74a7b551c6c6e26c90",
                                 "ddf8da7d873240cffeb0f617f5b9b69d")):
        assert line.startswith(server.base_url + "/i/" + md5 + ".")
    assert proc.stderr == ""


def test_cli_with_a_failure_prints_only_good_urls_and_exits_1(imgserver, tmp_path):
    server = imgserver(strip_metadata=False)  # URLs name the files' own MD5s
    args = [str(corpus_file("rgb.jpg")), str(tmp_path / "missing.png"),
            str(corpus_file("invalid.png")), str(corpus_file("hopper_lzw.tif"))]
    proc = run_cli(args, server_env(server, tmp_path))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    assert "/i/e19023fbd6c4c8ffd909e7fc96810230." in lines[0]
    assert "/i/8652f69e5403d75738ece2ca2cbe451e." in lines[1]
    assert "missing.png" in proc.stderr and "invalid.png" in proc.stderr


def test_cli_json_and_no_cache(server, tmp_path):
    env = server_env(server, tmp_path)
    image = str(corpus_file("lossless1.webp"))
    first = run_cli(["--json", image, str(tmp_path / "gone.png")], env)
    assert first.returncode == 1
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert [line.get("status") for line in lines] == ["uploaded", None]
    assert lines[0]["file"] == image and lines[0]["width"] == 1000
    assert lines[1]["code"] == "file_not_found"

    again = run_cli(["--json", image], env)
    assert json.loads(again.stdout)["status"] == "cached"
    uncached = run_cli(["--json", "--no-cache", image], env)
    assert json.loads(uncached.stdout)["status"] == "exists"


def test_cli_wrong_password(server, tmp_path):
    proc = run_cli([str(CLIENT_PY)], server_env(server, tmp_path, password="bad"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert PERMISSION_MESSAGE in proc.stderr
    assert "bad" not in proc.stderr.replace("client.py", "")


def test_cli_download_db(server, tmp_path):
    dest = tmp_path / "snap.db"
    proc = run_cli(["--download-db", str(dest)], server_env(server, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    sqlite3.connect(dest).execute("SELECT * FROM sqlite_master").fetchall()

    proc = run_cli(["--download-db"], server_env(server, tmp_path, "bob", "bob123"), cwd=tmp_path)
    assert proc.returncode == 1
    assert PERMISSION_MESSAGE in proc.stderr
    assert not (tmp_path / "images_server.db").exists()


def test_cli_server_and_user_flags(server, tmp_path):
    env = clean_env(tmp_path, IMGPROXY_URL=closed_port_url(), IMGPROXY_PASSWORD="bob123",
                    IMGPROXY_CONFIG=str(server.config_path))
    proc = run_cli(["--server", server.base_url, "--user", "bob", "--download-db",
                    str(tmp_path / "x.db")], env)
    assert PERMISSION_MESSAGE in proc.stderr   # reached the server, as bob (not an admin)


def test_environment_only_without_any_config_file(server, tmp_path):
    # A copy of client.py in a folder with no config.json, run from there.
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    script = lonely / "client.py"
    shutil.copyfile(CLIENT_PY, script)
    image = str(corpus_file("pal8rle.bmp"))

    proc = run_cli([image], server_env(server, tmp_path), cwd=lonely, script=script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(server.base_url + "/i/684d9beb65de7b1ec7deb43deef67401.")

    code = ("import client, json; print(json.dumps(client.upload_or_get(%r)))" % image)
    proc = subprocess.run([sys.executable, "-c", code], cwd=lonely, capture_output=True,
                          text=True, env=server_env(server, tmp_path), timeout=60)
    assert json.loads(proc.stdout)["status"] == "cached", proc.stderr

    proc = run_cli([image], clean_env(tmp_path), cwd=lonely, script=script)
    assert proc.returncode != 0
    assert "IMGPROXY_URL" in proc.stderr
    assert proc.stdout == ""


def test_cli_needs_something_to_do(tmp_path):
    proc = run_cli([], clean_env(tmp_path))
    assert proc.returncode == 2
    assert "FILE" in proc.stderr


def test_cli_without_password_and_no_terminal(tmp_path, make_config):
    config = make_config(users=[{"username": "root", "password_hash": "scrypt$x"}])
    env = clean_env(tmp_path, IMGPROXY_URL="http://127.0.0.1:1", IMGPROXY_CONFIG=str(config))
    proc = run_cli(["--user", "root", str(CLIENT_PY)], env)
    assert proc.returncode == 1
    assert "IMGPROXY_PASSWORD" in proc.stderr


def test_cli_with_only_hashed_users_names_the_fix(tmp_path, make_config):
    config = make_config(users=[{"username": "root", "password_hash": "scrypt$x"}])
    proc = run_cli([str(CLIENT_PY)], clean_env(tmp_path, IMGPROXY_CONFIG=str(config)))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "IMGPROXY_USER" in proc.stderr


def test_main_is_importable_and_returns_status(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMGPROXY_CONFIG", str(server.config_path))
    monkeypatch.setenv("IMGPROXY_URL", server.base_url)
    monkeypatch.setenv("IMGPROXY_USER", "alice")
    monkeypatch.setenv("IMGPROXY_PASSWORD", "alice123")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert client.main([str(tmp_path / "nothing.png")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "nothing.png" in err


# ---------------------------------------------------------------- progress bar

class _FakeTerminal:
    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_progress_bar_only_for_big_files_on_a_terminal():
    term = _FakeTerminal()
    bar = client._Progress("uploading x", 50 << 20, stream=term)
    bar.update(50 << 20)
    bar.close()
    assert "100%" in term.text and "uploading x" in term.text

    small = _FakeTerminal()
    bar = client._Progress("uploading y", 1000, stream=small)
    bar.update(1000)
    bar.close()
    assert small.text == ""

    class Pipe(_FakeTerminal):
        def isatty(self) -> bool:
            return False

    pipe = Pipe()
    bar = client._Progress("uploading z", 50 << 20, stream=pipe)
    bar.update(50 << 20)
    assert pipe.text == ""
