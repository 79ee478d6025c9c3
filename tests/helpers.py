"""Helpers for the hostile-input, protocol and fault tests: generated bad files,
raw HTTP over sockets, a server child process with patched constants, and the
storage invariants every test checks after the dust settles."""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Optional

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


# ---- generated files ----------------------------------------------------------

def png_bytes(size=(40, 30), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


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


# ---- a server process with patched constants ------------------------------------

class PatchedServer:
    """`imgproxy.main()` in a child process, after setting module constants.

    `prefix` runs the interpreter under another command (setpriv, to drop root).
    """

    def __init__(self, config_path: Path, patches: Optional[dict] = None, prefix: tuple[str, ...] = (),
                 cwd: Optional[Path] = None):
        sets = "".join(f"imgproxy.{k} = {v!r}; " for k, v in (patches or {}).items())
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import imgproxy; {sets}"
                f"sys.exit(imgproxy.main(['--config', {str(config_path)!r}, '--port', '0']))")
        self.log_lines: list[str] = []
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=cwd)
        deadline = time.monotonic() + 30
        self.base_url = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log_lines.append(line)
            if "listening on " in line:
                self.base_url = line.split("listening on ", 1)[1].split()[0]
                break
        if self.base_url is None:
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log_lines))
        self.port = int(self.base_url.rsplit(":", 1)[1])
        self._reader = threading.Thread(target=lambda: self.log_lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def log(self) -> str:
        return "".join(self.log_lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def proc_status_kb(pid: int, field: str) -> int:
    """A /proc/PID/status field in kB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- storage invariants ----------------------------------------------------------

def store_problems(data_dir: Path, *, rows_need_files: bool = True, files_need_rows: bool = True) -> list[str]:
    """What is wrong with the store at data_dir: the lifecycle invariants.

    Every file under uploads/ is complete (its bytes hash to its name) and sits
    at the path its digest gives; every row has its file; every file has its
    row; the database passes SQLite's integrity check.
    """
    problems = []
    con = sqlite3.connect(f"file:{data_dir / 'images.db'}?mode=ro", uri=True, timeout=30)
    try:
        check = con.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            problems.append(f"integrity_check: {check}")
        rows = {md5: ext for md5, ext in con.execute("SELECT md5, ext FROM images")}
        holds_orphans = con.execute(
            "SELECT COUNT(*) FROM holds WHERE md5 NOT IN (SELECT md5 FROM images)").fetchone()[0]
    finally:
        con.close()
    if holds_orphans:
        problems.append(f"{holds_orphans} holds without an image row")
    files = {}
    uploads = data_dir / "uploads"
    for path in uploads.rglob("*"):
        if not path.is_file():
            continue
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


# ---- blocking HTTP (for servers in other processes) ------------------------------

def call_url(url: str, method: str = "GET", data: Optional[bytes] = None,
             headers: Optional[dict] = None, timeout: float = 30) -> tuple[int, bytes]:
    """(status, body) of one urllib request; HTTP errors are answers, not exceptions."""
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
