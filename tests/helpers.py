"""Helpers shared by every test file: generated images and bad files, plain HTTP
calls (urllib, never through a proxy) and raw HTTP over sockets, a server child
process, and the storage invariants every test checks after the dust settles.
Fixtures live in conftest.py; everything a test file imports lives here."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import http.client
import io
import json
import os
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional

import aiohttp
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


# ---- waiting without fixed sleeps -------------------------------------------------

def _until(timeout: float, what: str) -> Iterator[None]:
    """Yields until `timeout` seconds have passed, then fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def poll(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.02):
    """The first true value of `predicate()`, asked every `step` seconds."""
    for _ in _until(timeout, what):
        if value := predicate():
            return value
        time.sleep(step)


async def apoll(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.02):
    """poll() for a test on the event loop: the server keeps running while it waits."""
    for _ in _until(timeout, what):
        if value := predicate():
            return value
        await asyncio.sleep(step)


# ---- generated files ----------------------------------------------------------

def png_bytes(size=(40, 30), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def seeded_png(seed: int, size: tuple[int, int] = (6, 4)) -> bytes:
    """A small PNG whose bytes differ for every seed (up to 2**24)."""
    return png_bytes(size, (seed & 255, (seed >> 8) & 255, (seed >> 16) & 255))


def jpeg_bytes(size=(16, 16), color=(1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def noise_png(nbytes: int, seed: int = 0) -> bytes:
    """A valid PNG of roughly `nbytes` (random pixels do not compress)."""
    side = max(8, int((nbytes / 3) ** 0.5))
    raw = hashlib.shake_256(f"noise{seed}".encode()).digest(side * side * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), raw).save(buf, "PNG", compress_level=0)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a correct CRC) claims width x height."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def gif_with_frames(frames: int) -> bytes:
    """A 1x1 GIF with `frames` image blocks: 15 bytes each, written by hand."""
    head = b"GIF89a" + struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00"
    return head + frame * frames + b"\x3b"


def jpeg_with_app_segments(total: int, marker: int = 0xE1, prefix: bytes = b"Exif\0\0",
                           segment: int = 65535) -> bytes:
    """A valid small JPEG carrying about `total` bytes of APPn segments after SOI."""
    small = jpeg_bytes()
    payload = segment - 2 - len(prefix)
    seg = struct.pack(">HH", 0xFF00 | marker, segment) + prefix + b"\0" * payload
    return small[:2] + seg * max(1, total // len(seg)) + small[2:]


def polyglot_jpeg_zip() -> bytes:
    """A valid JPEG followed by a ZIP archive holding a PHP script."""
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("shell.php", "<?php system($_GET['c']); ?>")
        z.writestr("index.html", "<script>alert(1)</script>")
    return jpeg_bytes((24, 24)) + buf.getvalue()


def multipart(parts: list[tuple[str, bytes]], boundary: str = "hostileBoundary7MA4YWxk") -> tuple[bytes, str]:
    """A multipart/form-data body from (raw part header text, data) pairs."""
    out = b""
    for head, data in parts:
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode("utf-8", "surrogateescape") + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def file_form(data: bytes, name: str = "x.png", field: str = "file") -> aiohttp.FormData:
    """A multipart form as a browser sends it, the way the aiohttp test client posts it."""
    form = aiohttp.FormData()
    form.add_field(field, data, filename=name, content_type="application/octet-stream")
    return form


# ---- plain HTTP from blocking code ------------------------------------------------

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via http_proxy


def http_exchange(method: str, url: str, data: Optional[bytes] = None, headers: Optional[dict] = None,
                  timeout: float = 30.0) -> tuple[int, "http.client.HTTPMessage", bytes]:
    """One request with urllib; an HTTP error status is an answer, not an exception."""
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with _DIRECT.open(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def http_call(method: str, url: str, data: Optional[bytes] = None, headers: Optional[dict] = None,
              timeout: float = 30.0) -> tuple[int, bytes]:
    status, _, body = http_exchange(method, url, data, headers, timeout)
    return status, body


# ---- timing of refusals ----------------------------------------------------------

async def median_refusal_seconds(client, headers: dict, n: int = 150,
                                 path: str = "/api/images/" + "0" * 32) -> float:
    """The median time of `n` requests that must each be refused with 401: a
    median, so that a few requests slowed by other work on the machine do not count."""
    import statistics
    times = []
    for _ in range(n):
        started = time.perf_counter()
        resp = await client.get(path, headers=headers)
        await resp.read()
        assert resp.status == 401
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ---- raw HTTP -------------------------------------------------------------------

class RawResponse:
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes):
        self.status, self.reason, self.body = status, reason, body
        self.header_list = headers
        self.headers = {k.lower(): v for k, v in headers}

    def json(self):
        import json
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<RawResponse {self.status} {self.body[:120]!r}>"


def parse_responses(data: bytes, head_requests: tuple[bool, ...] = ()) -> list[RawResponse]:
    """Split a byte stream into HTTP/1.1 responses (Content-Length, chunked or to EOF)."""
    out = []
    i = 0
    while i < len(data):
        end = data.find(b"\r\n\r\n", i)
        if end < 0:
            break
        lines = data[i:end].decode("latin-1").split("\r\n")
        _, status, *reason = lines[0].split(" ", 2)
        headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
        hmap = {k.lower(): v for k, v in headers}
        i = end + 4
        is_head = head_requests[len(out)] if len(out) < len(head_requests) else False
        if is_head or int(status) in (204, 304) or 100 <= int(status) < 200:
            body = b""
        elif "content-length" in hmap:
            n = int(hmap["content-length"])
            body, i = data[i:i + n], i + n
        elif hmap.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                eol = data.find(b"\r\n", i)
                size = int(data[i:eol].split(b";")[0], 16)
                i = eol + 2
                if size == 0:
                    i = data.find(b"\r\n", i) + 2
                    break
                body += data[i:i + size]
                i += size + 2
        else:
            body, i = data[i:], len(data)
        out.append(RawResponse(int(status), reason[0] if reason else "", headers, body))
    return out


def byte_ranges(resp) -> list[tuple[int, int, int, bytes]]:
    """(first, last, complete length, bytes) of each part of a 206: one from
    its Content-Range header, or several from a multipart/byteranges body."""
    def span(value: str) -> tuple[int, int, int]:
        unit, _, rest = value.strip().partition(" ")
        assert unit == "bytes", value
        first_last, _, total = rest.partition("/")
        first, _, last = first_last.partition("-")
        return int(first), int(last), int(total)

    ctype = resp.headers.get("content-type", "")
    if not ctype.startswith("multipart/byteranges"):
        return [(*span(resp.headers["content-range"]), resp.body)]
    assert "content-range" not in resp.headers
    boundary = ctype.split("boundary=", 1)[1].strip('"').encode()
    body = resp.body
    assert body.startswith(b"--" + boundary + b"\r\n") and body.endswith(b"\r\n--" + boundary + b"--\r\n"), body[:200]
    parts = []
    for chunk in body[len(boundary) + 4:-(len(boundary) + 8)].split(b"\r\n--" + boundary + b"\r\n"):
        head, _, data = chunk.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n"))
        first, last, total = span(fields["Content-Range"])
        assert len(data) == last - first + 1, (fields, len(data))
        parts.append((first, last, total, data))
    return parts


async def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0, half_close: bool = False,
                       host: str = "127.0.0.1") -> bytes:
    """Write `data` on a fresh connection and read until the server closes or `timeout`."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        chunks = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except asyncio.TimeoutError:
                break
            except ConnectionError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def request_bytes(method: str, target: str, headers: Optional[dict] = None, body: bytes = b"",
                  close: bool = True, length: Optional[int] = None) -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    for k, v in (headers or {}).items():
        head.append(f"{k}: {v}")
    if body or length is not None:
        head.append(f"Content-Length: {len(body) if length is None else length}")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


async def raw_request(port: int, method: str, target: str, headers: Optional[dict] = None,
                      body: bytes = b"", timeout: float = 10.0) -> RawResponse:
    data = await raw_exchange(port, request_bytes(method, target, headers, body), timeout=timeout)
    responses = parse_responses(data, (method == "HEAD",))
    assert responses, f"no response to {method} {target!r}: {data[:200]!r}"
    return responses[0]


# ---- the server as a child process -----------------------------------------------

class ServerProcess:
    """`python3 imgproxy.py --config X --port 0` as a child process.

    `patches` sets module constants first (then `imgproxy.main()` runs under
    `python3 -c`); `prefix` runs the interpreter under another command
    (setpriv, to drop root).
    """

    def __init__(self, config_path: Path, extra_args: tuple[str, ...] = (), env: Optional[dict] = None, *,
                 patches: Optional[dict] = None, prefix: tuple[str, ...] = (), cwd: Optional[Path] = None):
        self.config_path = config_path
        args = ["--config", str(config_path), "--port", "0", *extra_args]
        if patches:
            sets = "".join(f"imgproxy.{k} = {v!r}; " for k, v in patches.items())
            command = ["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import imgproxy; {sets}"
                             f"sys.exit(imgproxy.main({args!r}))"]
        else:
            command = [str(ROOT / "imgproxy.py"), *args]
        self.log_lines: list[str] = []
        self.proc = subprocess.Popen([*prefix, sys.executable, *command], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        self.base_url = self._wait_for_listening()
        self.port = int(self.base_url.rsplit(":", 1)[1])
        self._reader = threading.Thread(target=lambda: self.log_lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def _wait_for_listening(self) -> str:
        """The base URL, once every worker the config asks for is listening (a worker
        that starts late, e.g. connecting to PostgreSQL, would otherwise serve nothing)."""
        try:
            workers = json.loads(self.config_path.read_text(encoding="utf-8"))["server"].get("workers", 1)
        except (OSError, ValueError, KeyError, AttributeError):
            workers = 1
        url, listening = None, 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log_lines.append(line)
            if "listening on " in line:
                url = url or line.split("listening on ", 1)[1].split()[0]
                listening += 1
                if listening >= workers:
                    return url
        self.kill()
        raise RuntimeError("server did not start:\n" + "".join(self.log_lines))

    @property
    def log(self) -> str:
        return "".join(self.log_lines)

    def terminate(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class PatchedServer(ServerProcess):
    """A ServerProcess with module constants set first, e.g. {"KEEPALIVE_TIMEOUT": 1.0}."""

    def __init__(self, config_path: Path, patches: Optional[dict] = None, prefix: tuple[str, ...] = (),
                 cwd: Optional[Path] = None):
        super().__init__(config_path, patches=patches, prefix=prefix, cwd=cwd)


def proc_status_kb(pid: int, field: str) -> int:
    """A /proc/PID/status field in kB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- the stack under test: files + SQLite, or S3 and/or PostgreSQL ----------------
# conftest.write_config registers every site it gives a bucket or a database (pytest
# --stack), keyed by data_dir; the helpers below look there to find where a site keeps
# its rows and its image bytes. A data_dir never registered is files + SQLite.

@dataclasses.dataclass(frozen=True)
class SiteStack:
    storage: Optional[dict] = None        # the config's S3 "storage" section
    database_url: Optional[str] = None    # the config's PostgreSQL "database.url"


STACK_SITES: dict[Path, SiteStack] = {}


def register_site(data_dir: Path, stack: SiteStack) -> None:
    STACK_SITES[Path(data_dir).resolve()] = stack


def site_stack(data_dir: Path) -> SiteStack:
    return STACK_SITES.get(Path(data_dir).resolve(), SiteStack())


def _run_async(coro):
    """Run a coroutine to its end from blocking code, even one called on an event loop."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(60)


def pg_rows(url: str, sql: str, args: tuple = ()) -> list[tuple]:
    """Our SQLite-dialect statement (? placeholders) on PostgreSQL, rows as tuples."""
    import asyncpg

    import imgproxy

    async def run() -> list[tuple]:
        con = await asyncpg.connect(url, timeout=15)
        try:
            if not args and ";" in sql.strip().rstrip(";"):
                await con.execute(sql)   # a script
                return []
            return [tuple(r) for r in await con.fetch(imgproxy.pg_sql(sql), *args)]
        finally:
            await con.close()

    return _run_async(run())


def db_rows(data_dir: Path, sql: str = "SELECT md5 FROM images", args: tuple = ()) -> list[tuple]:
    """A query on the live database (SQLite or PostgreSQL) from a connection of the test's own."""
    url = site_stack(data_dir).database_url
    if url is not None:
        return pg_rows(url, sql, tuple(args))
    con = sqlite3.connect(data_dir / "images.db", timeout=15)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def db_write(data_dir: Path, sql: str, rows: list[tuple] | tuple = ()) -> None:
    """One statement (for each of `rows` if it is a list) in one committed transaction,
    as another writer would: SQLite or PostgreSQL. The schema must exist (a server ran)."""
    many = isinstance(rows, list)
    url = site_stack(data_dir).database_url
    if url is not None:
        import asyncpg

        import imgproxy

        async def run() -> None:
            con = await asyncpg.connect(url, timeout=15)
            try:
                async with con.transaction():
                    if many:
                        await con.executemany(imgproxy.pg_sql(sql), rows)
                    else:
                        await con.execute(imgproxy.pg_sql(sql), *rows)
            finally:
                await con.close()

        _run_async(run())
        return
    con = sqlite3.connect(data_dir / "images.db", timeout=15, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.executemany(sql, rows) if many else con.execute(sql, rows)
        con.execute("COMMIT")
    finally:
        con.close()


def db_integrity(data_dir: Path) -> str:
    """"ok", or SQLite's integrity_check complaint. PostgreSQL has no such check of
    a live database: its own constraints hold every row, so it answers "ok"."""
    if site_stack(data_dir).database_url is not None:
        return "ok"
    return db_rows(data_dir, "PRAGMA integrity_check")[0][0]


_WRITE_LOCKER = """
import asyncio, sqlite3, sys
kind, where, lock = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "sqlite":
    con = sqlite3.connect(where, timeout=30, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.read()
    con.execute("ROLLBACK")
else:
    import asyncpg
    async def hold():
        con = await asyncpg.connect(where)
        await con.execute("SELECT pg_advisory_lock($1)", lock)
        print("locked", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        await con.close()
    asyncio.run(hold())
"""


class WriteLockHolder:
    """Another process holding the database's write lock, as a second writer would:
    SQLite's (BEGIN IMMEDIATE) or, under PostgreSQL, imgproxy's write advisory lock.
    Held from construction until release()."""

    def __init__(self, data_dir: Path):
        import imgproxy
        url = site_stack(data_dir).database_url
        args = ("pg", url) if url is not None else ("sqlite", str(data_dir / "images.db"))
        self.proc = subprocess.Popen([sys.executable, "-c", _WRITE_LOCKER, *args, str(imgproxy.PG_LOCK_WRITE)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "locked":
            self.proc.kill()
            raise AssertionError(f"the lock holder did not take the lock: {line!r}")

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
        assert self.proc.wait(30) == 0


class _S3Site:
    """Signed requests to a site's bucket with the standard library (the tests' own view)."""

    def __init__(self, storage: dict):
        self.storage = storage
        self.prefix = storage.get("prefix") or ""
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"

    def request(self, method: str, key: str = "", query: str = "", body: bytes = b"") -> tuple[int, bytes]:
        from engines import sign_v4
        st = self.storage
        url = f"{st['endpoint']}/{st['bucket']}/{urllib.parse.quote(key, safe='/-_.~')}" + (
            f"?{query}" if query else "")
        headers = sign_v4(method, url, body, st["access_key_id"], st["secret_access_key"], st["region"])
        request = urllib.request.Request(url, data=body if method == "PUT" else None, method=method,
                                         headers=headers)
        try:
            with _DIRECT.open(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def keys(self) -> list[str]:
        """Every key under the prefix (the prefix taken off), all pages."""
        import xml.etree.ElementTree as ET
        out: list[str] = []
        token = None
        while True:
            params = {"list-type": "2", "prefix": self.prefix}
            if token:
                params["continuation-token"] = token
            status, body = self.request("GET", query=urllib.parse.urlencode(sorted(params.items())))
            assert status == 200, (status, body[:300])
            root = ET.fromstring(body)
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            out += [el.text[len(self.prefix):] for el in root.iter(f"{ns}Key")]
            token = root.findtext(f"{ns}NextContinuationToken")
            if root.findtext(f"{ns}IsTruncated") != "true" or not token:
                return sorted(out)

    def read(self, key: str) -> bytes:
        status, body = self.request("GET", self.prefix + key)
        if status == 404:
            raise FileNotFoundError(key)
        assert status == 200, (status, body[:300])
        return body

    def write(self, key: str, data: bytes) -> None:
        status, body = self.request("PUT", self.prefix + key, body=data)
        assert status == 200, (status, body[:300])

    def delete(self, key: str) -> None:
        status, body = self.request("DELETE", self.prefix + key)
        assert status in (200, 204), (status, body[:300])


class StoredObject(PurePosixPath):
    """An image object in a bucket, named by the path its file would have under
    data_dir/uploads: it compares equal to that Path, and reads from the bucket."""

    def _bind(self, site: _S3Site, key: str) -> "StoredObject":
        self._site, self._key = site, key
        return self

    def read_bytes(self) -> bytes:
        return self._site.read(self._key)

    def exists(self) -> bool:
        try:
            self._site.read(self._key)
        except FileNotFoundError:
            return False
        return True

    def unlink(self, missing_ok: bool = False) -> None:
        self._site.delete(self._key)


def report_name(path: Path) -> str:
    """How a cleanup report names a stored file: its path, or a bucket object's key."""
    return path._key if isinstance(path, StoredObject) else str(path)


def _image_keys(site: _S3Site) -> list[str]:
    import imgproxy
    return [k for k in site.keys() if imgproxy.IMAGE_KEY_RE.fullmatch(k)]


def stored_files(data_dir: Path, everything: bool = False) -> list[Path]:
    """The stored images: files under uploads/, or the bucket's image objects as
    StoredObjects named like those files (`everything`: also what is not named by a digest)."""
    storage = site_stack(data_dir).storage
    if storage is None:
        return sorted(p for p in (data_dir / "uploads").rglob("*") if p.is_file())
    site = _S3Site(storage)
    keys = site.keys() if everything else _image_keys(site)
    return [StoredObject(data_dir / "uploads" / key)._bind(site, key) for key in keys]


def stored_path(data_dir: Path, md5: str, ext: str) -> Path:
    """Where an image's bytes are: its file, or (S3) its object under the same name."""
    path = data_dir / "uploads" / md5[0:2] / md5[2:4] / f"{md5}.{ext}"
    storage = site_stack(data_dir).storage
    if storage is None:
        return path
    key = f"{md5[0:2]}/{md5[2:4]}/{md5}.{ext}"
    return StoredObject(path)._bind(_S3Site(storage), key)


def store_bytes(data_dir: Path, relative: str, data: bytes) -> Path:
    """Put bytes at uploads/{relative}, or at that key in the site's bucket, as a
    crash or a careless hand would leave them; returns their stored_files() name."""
    path = data_dir / "uploads" / relative
    storage = site_stack(data_dir).storage
    if storage is not None:
        path = StoredObject(path)._bind(_S3Site(storage), relative)
        path._site.write(relative, data)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def store_image(data_dir: Path, md5: str, ext: str, data: bytes) -> Path:
    """Put bytes where the store keeps that image, without a row."""
    return store_bytes(data_dir, f"{md5[0:2]}/{md5[2:4]}/{md5}.{ext}", data)


def db_schema(data_dir: Path) -> None:
    """Create the database's tables as a server's first start would, to seed rows before one runs."""
    import imgproxy
    storage = imgproxy.Storage(data_dir)
    storage.prepare()          # tmp/ and variants/ are local on every stack
    url = site_stack(data_dir).database_url
    if url is not None:
        pg_rows(url, imgproxy.PG_SCHEMA)
        return
    imgproxy.open_write_db(storage.db_path).close()


def age_upload_claims(data_dir: Path) -> None:
    """Let the claims of uploads that died with their node run out, as CLAIM_SECONDS
    later: until then a pass on S3 keeps their objects (the node might be alive)."""
    import imgproxy
    db_write(data_dir, "UPDATE claims SET claimed_at = claimed_at - ?", (imgproxy.CLAIM_SECONDS + 1,))


def objects_left_alone(data_dir: Path) -> bool:
    """Whether a cleanup pass leaves what is not named by a digest in place: in a
    bucket it may be another application's (files under uploads/ are all ours)."""
    return site_stack(data_dir).storage is not None


# ---- storage invariants ----------------------------------------------------------

def tmp_leftovers(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "tmp").iterdir())


def store_problems(data_dir: Path, *, rows_need_files: bool = True, files_need_rows: bool = True) -> list[str]:
    """What is wrong with the store at data_dir: the lifecycle invariants.

    Every stored image (file under uploads/ or bucket object) is complete (its
    bytes hash to its name) and sits at the path its digest gives; every row has
    its image; every image has its row; the database passes its integrity check.
    """
    problems = []
    check = db_integrity(data_dir)
    if check != "ok":
        problems.append(f"integrity_check: {check}")
    rows = {md5: ext for md5, ext in db_rows(data_dir, "SELECT md5, ext FROM images")}
    holds_orphans = db_rows(data_dir, "SELECT COUNT(*) FROM holds WHERE md5 NOT IN (SELECT md5 FROM images)")[0][0]
    if holds_orphans:
        problems.append(f"{holds_orphans} holds without an image row")
    files = {}
    uploads = data_dir / "uploads"
    storage = site_stack(data_dir).storage
    if storage is not None:
        site = _S3Site(storage)
        keys = site.keys()
        problems += [f"object at a key not from a digest: {k}" for k in keys
                     if not k.startswith("variants/") and k not in _image_keys(site)]
        stored = stored_files(data_dir)
    else:
        stored = [p for p in uploads.rglob("*") if p.is_file()]
    for path in stored:
        stem, _, ext = path.name.partition(".")
        if path.parent != uploads / stem[:2] / stem[2:4]:
            problems.append(f"file at a path not from its digest: {path}")
        if hashlib.md5(path.read_bytes()).hexdigest() != stem:
            problems.append(f"partial or corrupt file: {path}")
        files[stem] = ext
    if rows_need_files:
        problems += [f"row without file: {m}.{e}" for m, e in rows.items() if files.get(m) != e]
    if files_need_rows:
        problems += [f"file without row: {m}.{e}" for m, e in files.items() if rows.get(m) != e]
    return problems


# ---- photos that carry metadata (metadata removal, HEIC, AVIF) -------------------

GPS_PLACE = b"Secret-Garden-42"      # GPSAreaInformation text
CAMERA_SERIAL = "SN-998877665544"    # Exif BodySerialNumber
CAMERA_MAKE = "SpyCam Maker"
GPS_SECONDS = 123456789              # numerator of the GPSLatitude seconds rational


def gps_exif(orientation: int = 1) -> "Image.Exif":
    """Exif with a camera make, a date, a serial number and a GPS position."""
    from PIL.TiffImagePlugin import IFDRational
    exif = Image.Exif()
    exif[0x010F] = CAMERA_MAKE
    exif[0x0132] = "2026:11:30 10:00:00"
    if orientation != 1:
        exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0xA431] = CAMERA_SERIAL
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (IFDRational(52, 1), IFDRational(31, 1), IFDRational(GPS_SECONDS, 10_000_000))
    gps[0x1C] = b"ASCII\0\0\0" + GPS_PLACE
    return exif


@functools.lru_cache(maxsize=1)
def srgb_icc() -> bytes:
    """One sRGB profile for the whole run (a new one carries a new creation time)."""
    from PIL import ImageCms
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def photo_bytes(fmt: str, size=(64, 48), color=(10, 200, 30), orientation: int = 1,
                icc: bool = True, **save) -> bytes:
    """An image in `fmt` carrying gps_exif() (TIFF: as tags), an ICC profile
    unless icc=False, and whatever else `save` passes to Pillow."""
    buf = io.BytesIO()
    im = Image.new("RGB", size, color)
    if icc:
        save.setdefault("icc_profile", srgb_icc())
    if fmt == "TIFF":
        from PIL.TiffImagePlugin import ImageFileDirectory_v2
        tags = ImageFileDirectory_v2()
        for tag, value in gps_exif(orientation).items():
            if tag not in (0x8769, 0x8825):
                tags[tag] = value
        tags[34853] = dict(gps_exif().get_ifd(0x8825))
        im.save(buf, "TIFF", tiffinfo=tags, **save)
    else:
        im.save(buf, fmt, exif=gps_exif(orientation), **save)
    return buf.getvalue()


def apply_cuts(source: bytes, pieces: list) -> bytes:
    """What imgproxy's _write_pieces writes for metadata_cuts' pieces, as bytes in memory."""
    return b"".join(source[p[0]:p[1]] if isinstance(p, tuple) else p for p in pieces)


def metadata_leaks(data: bytes) -> list[str]:
    """What of gps_exif() can still be found in `data`: by Pillow's EXIF reader
    and by a byte search for the values themselves."""
    found = []
    with Image.open(io.BytesIO(data)) as im:
        exif = im.getexif()
        if exif.get_ifd(0x8825):
            found.append("GPS IFD")
        if exif.get_ifd(0x8769):
            found.append("Exif IFD")
        for tag, name in ((0x010F, "Make"), (0x0132, "DateTime")):
            if tag in exif:
                found.append(name)
        if im.info.get("xmp"):
            found.append("XMP")
    for needle in (GPS_PLACE, CAMERA_SERIAL.encode(), CAMERA_MAKE.encode(),
                   GPS_SECONDS.to_bytes(4, "big"), GPS_SECONDS.to_bytes(4, "little")):
        if needle in data:
            found.append(f"bytes {needle!r}")
    return found


# ---- decode bombs: files whose later parts break the limits the header keeps ----

def _gif_parts(im: Image.Image) -> tuple[bytes, bytes, bytes]:
    """(logical screen flags, global colour table, image block) of a one-frame GIF by Pillow."""
    buf = io.BytesIO()
    im.save(buf, "GIF")
    data = buf.getvalue()
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    gct = data[13:pos]
    while data[pos] == 0x21:  # extensions before the image
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C and data[-1] == 0x3B
    return bytes([flags]), gct, data[pos:-1]


def gif_with_large_second_frame(screen=(16, 16), frame=(3000, 3000)) -> bytes:
    """A GIF whose logical screen is small and whose second frame is `frame` large."""
    flags, gct, first = _gif_parts(Image.new("P", screen, 0))
    _, _, second = _gif_parts(Image.new("P", frame, 0))
    head = b"GIF89a" + struct.pack("<HH", *screen) + flags + b"\0\0" + gct
    return head + first + second + b"\x3b"


def tiff_with_huge_later_page(small=(16, 16), huge=(3000, 3000)) -> bytes:
    """A two-page TIFF: a small first page, then a deflated page of `huge` size."""
    buf = io.BytesIO()
    Image.new("L", small, 0).save(buf, "TIFF", save_all=True, compression="tiff_adobe_deflate",
                                  append_images=[Image.new("L", huge, 0)])
    return buf.getvalue()


def tiff_with_huge_tile(size=(64, 64), tile=(4096, 4096)) -> bytes:
    """A small grey TIFF (written by hand) stored as one deflated tile of `tile` size."""
    tile_data = zlib.compress(b"\0" * (tile[0] * tile[1]), 9)
    entries = [(256, 4, size[0]), (257, 4, size[1]), (258, 3, 8), (259, 3, 8), (262, 3, 1),
               (277, 3, 1), (322, 4, tile[0]), (323, 4, tile[1]), (324, 4, 0), (325, 4, len(tile_data))]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_at if tag == 324 else value
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3
                                                     else struct.pack("<I", value))
    return b"II*\0" + struct.pack("<I", ifd_at) + ifd + b"\0\0\0\0" + tile_data


def ico_understating_png(declared=(16, 16), actual=(3000, 3000)) -> bytes:
    """An ICO whose directory says `declared` while the PNG inside is `actual` large."""
    buf = io.BytesIO()
    Image.new("RGBA", actual, (0, 0, 0, 0)).save(buf, "PNG")
    png = buf.getvalue()
    entry = struct.pack("<BBBBHHII", declared[0] % 256, declared[1] % 256, 0, 0, 1, 32, len(png), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def animated_gif(size=(500, 500), frames: int = 40) -> bytes:
    """A GIF of `frames` copies of one frame of noise (which LZW cannot shrink)."""
    flags, gct, block = _gif_parts(Image.effect_noise(size, 100).convert("P"))
    return b"GIF89a" + struct.pack("<HH", *size) + flags + b"\0\0" + gct + block * frames + b"\x3b"


def progressive_jpeg_with_many_scans(size=(1024, 1024), scans: int = 600) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `scans` scans.

    Each repeat is a few bytes, but the decoder walks every block of the image
    for each one: the CPU cost grows with scans x pixels, not with the file size.
    """
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 30)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data.rfind(b"\xff\xda")
    assert data.endswith(b"\xff\xd9") and last > 0
    have = data.count(b"\xff\xda")
    return data[:-2] + data[last:-2] * max(0, scans - have) + b"\xff\xd9"


def decode_in_child(data: bytes, max_pixels: int, *, address_space: int = 3 << 30,
                    formats: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO"),
                    patches: Optional[dict] = None, root: Path = ROOT, strip: bool = False) -> dict:
    """Run imgproxy.inspect_image on `data` in a child process, its address space capped
    (with `strip`, then imgproxy.prepare_stored on what it accepted, measured together).

    Returns {"status": 200 or the rejection's status, "code", "growth_kb": peak RSS the
    decode added, "cpu": CPU seconds}. `patches` sets module constants first; `root` is
    the folder whose imgproxy.py runs (bench/ compares commits). The cap turns a runaway allocation into a
    MemoryError in the child (a wrong verdict here) instead of a machine out of memory.
    """
    import json
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(data)
        f.flush()
        code = f"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space}))
sys.path.insert(0, {str(root)!r})
import imgproxy
from pathlib import Path
from PIL import Image
{"".join(f"imgproxy.{k} = {v!r}; " for k, v in (patches or {}).items())}

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

path = Path({f.name!r})
warm = Path({f.name!r} + ".warm.png")
Image.new("RGB", (8, 8)).save(warm)
imgproxy.inspect_image(warm, warm.stat().st_size, ("PNG",), 64)  # imports and first-use costs
warm.unlink()
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # restart the peak (VmHWM) from the current RSS
before = status_kb("VmRSS")
cpu = time.process_time()
out = {{"status": 200, "code": None}}
try:
    facts = imgproxy.inspect_image(path, path.stat().st_size, {tuple(formats)!r}, {max_pixels})
    out["frames"] = facts.frames
    if {strip!r}:
        stored = imgproxy.prepare_stored(path, facts, lambda: Path({f.name!r} + ".stored"), True, {max_pixels})
        out["stripped"] = stored is not None
except imgproxy.UploadRejected as exc:
    out = {{"status": exc.status, "code": exc.code, "message": str(exc)}}
except MemoryError:
    out = {{"status": 500, "code": "MemoryError"}}
out["cpu"] = time.process_time() - cpu
out["growth_kb"] = status_kb("VmHWM") - before
print(json.dumps(out))
"""
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        Path(f.name + ".stored").unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- app tokens and client subprocesses ------------------------------------------

TOKEN_RE = re.compile(r"imgp_[0-9A-Za-z]{43}")  # what POST /api/tokens hands out


async def create_token(client, who: dict, name: str = "laptop ShareX") -> dict:
    resp = await client.post("/api/tokens", json={"name": name}, headers=who)
    assert resp.status == 201, await resp.text()
    return await resp.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def clean_env(tmp_path: Path, **extra: str) -> dict:
    """An environment for subprocesses: no IMGPROXY_* from outside, own cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPROXY_")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    env.update(extra)
    return env
