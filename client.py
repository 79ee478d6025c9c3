"""imgproxy client: upload a local image and get its public URL.

One file, standard library only, so it can be copied into any project:

    from client import get_image_url, upload_or_get, download_db, Client

    url = get_image_url("photo.png")          # the URL, or None on any failure
    thumb = get_image_url("photo.png", size=640, fmt="webp")   # a variant's URL
    info = upload_or_get("photo.png")         # the info object, or {"error": ...}

    $ python3 client.py a.png b.jpg           # one URL per line on stdout

The client hashes the file first and asks the server to renew an image it
already has, so bytes the server holds are never sent twice; answers are kept
in a small SQLite cache until the image expires.  The wire format is in the
README ("API") and the server's /openapi.json.

Configuration: config.json (named by IMGPROXY_CONFIG, else found beside this
file, else in the working directory), overridden by the environment variables
IMGPROXY_URL, IMGPROXY_USER and IMGPROXY_PASSWORD.  An app token
(IMGPROXY_TOKEN or ``client.token``; make one with ``--create-token NAME``) is
preferred over any password.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import getpass
import hashlib
import http.client
import json
import os
import re
import socket
import sqlite3
import ssl
import stat
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Optional, Union

# ---------------------------------------------------------------- constants

PERMISSION_MESSAGE = "该用户权限不足，请联系管理员"
DEFAULT_TIMEOUT = 60.0
DEFAULT_DB_NAME = "images_server.db"
VARIANT_FORMATS = ("jpg", "png", "webp", "gif", "avif")   # /i/{md5}/{size}.{fmt}
HASH_CHUNK = 1 << 20
# http.client reads a file body in blocks of this size (its default is 8 KiB,
# which means many small send() calls for big uploads).
UPLOAD_BLOCK = 256 << 10
# The progress bar is noise for the small files Typora & co. usually send.
PROGRESS_MIN_BYTES = 4 << 20
# A JSON answer from the server is small; anything larger is not ours.
MAX_JSON_BYTES = 4 << 20
# Waiting this long for another process's lock beats dropping the cache.
CACHE_BUSY_TIMEOUT = 10.0
# A cached URL about to expire is renewed instead of returned: a renew is one
# small request and gives the URL a full new lifetime, while a URL handed to an
# editor that dies minutes later is a broken image in a document.
CACHE_RENEW_MARGIN = 3600.0
# Hash memos of files not seen for this long are dropped so the cache stays small.
HASH_MEMO_MAX_AGE = 180 * 86400.0
CACHE_SCHEMA_VERSION = 1
USER_AGENT = "imgproxy-client/1"

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------- errors

class ConfigError(ValueError):
    """The configuration does not say where the server is or who we are."""


class _Failure(Exception):
    """One failed operation; turned into {"error": ..., "code": ...} at the edge."""

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def as_dict(self) -> dict:
        result: dict[str, Any] = {"error": self.message}
        if self.code:
            result["code"] = self.code
        return result


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class Settings:
    """Everything a default client needs, resolved from config file and environment."""

    base_url: str
    username: Optional[str]
    password: Optional[str]
    cache_path: Optional[Path]
    config_path: Optional[Path]
    token: Optional[str] = None


def find_config(environ: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """The config.json to use, or None when there is none (environment-only use)."""
    env = os.environ if environ is None else environ
    named = env.get("IMGPROXY_CONFIG")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"IMGPROXY_CONFIG names {named!r}, which is not a file")
        return path
    for folder in (Path(__file__).resolve().parent, Path.cwd()):
        candidate = folder / "config.json"
        if candidate.is_file():
            return candidate
    return None


def _read_config(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return config


def _section(config: dict, key: str, path: Optional[Path]) -> dict:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {key!r} must be an object")
    return value


def _check_base_url(url: str, source: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{source} must be an http:// or https:// URL, got {url!r}")
    if parts.username or parts.password:
        # Credentials in URLs end up in logs and shell history; the original
        # project leaked passwords exactly this way.
        raise ConfigError(f"{source} must not contain a user name or password; "
                          "use IMGPROXY_USER and IMGPROXY_PASSWORD")
    return url.rstrip("/")


def load_settings(environ: Optional[Mapping[str, str]] = None, *,
                  server: Optional[str] = None,
                  user: Optional[str] = None) -> Settings:
    """Resolve server URL, credentials and cache path.

    Order, strongest first: the ``server``/``user`` arguments (CLI flags), the
    environment, the config's ``client`` section, the config's ``server`` and
    ``users``.  The password may come out None (only a password_hash known);
    callers decide whether to prompt or fail.  A token (IMGPROXY_TOKEN, then
    ``client.token``) is used instead of the password when there is one.
    """
    env = os.environ if environ is None else environ
    config_path = find_config(env)
    config = _read_config(config_path) if config_path else {}
    server_cfg = _section(config, "server", config_path)
    client_cfg = _section(config, "client", config_path)
    users = config.get("users") or []
    if not isinstance(users, list):
        raise ConfigError(f"{config_path}: 'users' must be a list")
    users = [u for u in users if isinstance(u, dict)]

    if server:
        base_url = _check_base_url(server, "--server")
    elif env.get("IMGPROXY_URL"):
        base_url = _check_base_url(env["IMGPROXY_URL"], "IMGPROXY_URL")
    elif server_cfg.get("base_url"):
        base_url = _check_base_url(str(server_cfg["base_url"]), f"{config_path}: server.base_url")
    elif server_cfg.get("domain"):
        port = server_cfg.get("port", 8000)
        base_url = _check_base_url(f"http://{server_cfg['domain']}:{port}",
                                   f"{config_path}: server.domain/port")
    elif config_path:
        raise ConfigError(f"{config_path} has no server.base_url or server.domain; "
                          "set one, or set IMGPROXY_URL")
    else:
        raise ConfigError("no server configured: set IMGPROXY_URL (e.g. "
                          "http://127.0.0.1:8000) or put config.json beside client.py")

    username = user or env.get("IMGPROXY_USER") or client_cfg.get("username") or None
    password = env.get("IMGPROXY_PASSWORD") or None
    if username:
        if password is None and client_cfg.get("username") == username:
            password = client_cfg.get("password") or None
        if password is None:
            for entry in users:
                if entry.get("username") == username and entry.get("password"):
                    password = str(entry["password"])
                    break
    else:
        # The first user.  Without a password from the environment, entries
        # with only a password_hash are no use to a client (the plain password
        # is not in the file), so skip to one that has a password.
        for entry in users:
            if entry.get("username") and (password is not None or entry.get("password")):
                username = str(entry["username"])
                if password is None:
                    password = str(entry["password"])
                break

    cache_path: Optional[Path] = None
    if client_cfg.get("cache_path"):
        cache_path = Path(str(client_cfg["cache_path"])).expanduser()
        if not cache_path.is_absolute() and config_path:
            cache_path = config_path.resolve().parent / cache_path
    token = env.get("IMGPROXY_TOKEN") or client_cfg.get("token") or None
    if token is not None and not isinstance(token, str):
        raise ConfigError(f"{config_path}: client.token must be a string")
    return Settings(base_url, username, password, cache_path, config_path, token)


def default_cache_path(environ: Optional[Mapping[str, str]] = None) -> Path:
    """``$XDG_CACHE_HOME/imgproxy/cache.db``, defaulting to ``~/.cache``."""
    env = os.environ if environ is None else environ
    root = env.get("XDG_CACHE_HOME")
    base = Path(root) if root and os.path.isabs(root) else Path.home() / ".cache"
    return base / "imgproxy" / "cache.db"


# ---------------------------------------------------------------- small helpers

def _parse_time(value: Any) -> Optional[float]:
    """Epoch seconds of an API time (ISO 8601 with ``Z``), or None."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"   # fromisoformat() takes "Z" only from 3.11 on
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"   # pragma: no cover


class _Progress:
    """A one-line progress bar on stderr, only for big files on a terminal."""

    def __init__(self, label: str, total: int, enabled: Optional[bool] = None,
                 stream: Optional[IO[str]] = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty()) and total >= PROGRESS_MIN_BYTES
        self.enabled = enabled
        self.label = label
        self.total = max(total, 1)
        self._last = 0.0

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < self.total:
            return
        self._last = now
        fraction = min(done / self.total, 1.0)
        bar = "#" * int(fraction * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {fraction:4.0%} "
                          f"{_human(done)}/{_human(self.total)}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            # Clear the line so the next message does not land after the bar.
            self.stream.write("\r\033[K")
            self.stream.flush()


class _UploadBody:
    """File body for http.client: exactly ``size`` bytes, read block by block.

    Capping at the size we announced in Content-Length keeps the request valid
    if the file grows meanwhile; a file that shrinks is an error rather than a
    request the server would wait on forever.
    """

    def __init__(self, fileobj: IO[bytes], size: int, progress: _Progress) -> None:
        self._file = fileobj
        self._size = size
        self._progress = progress
        self.sent = 0

    def read(self, n: int = -1) -> bytes:
        remaining = self._size - self.sent
        if remaining <= 0:
            return b""
        if n is None or n < 0 or n > remaining:
            n = remaining
        try:
            chunk = self._file.read(n)
        except OSError as e:
            raise _Failure(f"cannot read the file while uploading: {e.strerror or e}",
                           "unreadable") from None
        if not chunk:
            raise _Failure("the file became shorter while it was being uploaded",
                           "file_changed")
        self.sent += len(chunk)
        self._progress.update(self.sent)
        return chunk


# ---------------------------------------------------------------- local cache

_warned_caches: set[str] = set()


class LocalCache:
    """SQLite cache: (server, user, md5) -> info until it expires, and
    (path, size, mtime) -> md5 so an unchanged big file is not hashed again.

    Every operation opens its own short-lived connection and transaction, which
    keeps it safe for several processes (WAL plus a busy timeout) and threads.
    Any trouble with the file disables the cache with one warning: it is an
    optimisation and must never stop an upload.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path).expanduser()
        self.disabled = False
        self._ready = False

    # -- plumbing

    def _fail(self, error: BaseException) -> None:
        self.disabled = True
        key = str(self.path)
        if key not in _warned_caches:
            _warned_caches.add(key)
            print(f"imgproxy: warning: local cache {self.path} is not usable "
                  f"({error}); going on without it", file=sys.stderr)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if not self._ready:
            # The cache says which files this user uploaded: keep it private.
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(str(self.path), timeout=CACHE_BUSY_TIMEOUT,
                             isolation_level=None)
        try:
            if not self._ready:
                self._setup(db)
            yield db
        finally:
            db.close()

    def _setup(self, db: sqlite3.Connection) -> None:
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as e:
            # Switching the journal mode can be refused while another process
            # holds the file; WAL is a persistent setting, so that process has
            # probably just set it, and the default journal is still correct.
            if "locked" not in str(e) and "busy" not in str(e):
                raise
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != CACHE_SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("""CREATE TABLE IF NOT EXISTS images (
                    server TEXT NOT NULL, username TEXT NOT NULL, md5 TEXT NOT NULL,
                    info TEXT NOT NULL, expire_at REAL NOT NULL,
                    PRIMARY KEY (server, username, md5))""")
                db.execute("CREATE INDEX IF NOT EXISTS images_expire ON images (expire_at)")
                db.execute("""CREATE TABLE IF NOT EXISTS file_hashes (
                    path TEXT PRIMARY KEY, size INTEGER NOT NULL,
                    mtime_ns INTEGER NOT NULL, md5 TEXT NOT NULL,
                    seen_at REAL NOT NULL)""")
                db.execute(f"PRAGMA user_version={CACHE_SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self._ready = True

    # -- images

    def get_info(self, server: str, username: str, md5: str) -> Optional[dict]:
        """The cached info, or None when absent, expired or about to expire."""
        if self.disabled:
            return None
        now = time.time()
        try:
            with self._connect() as db:
                db.execute("DELETE FROM images WHERE expire_at <= ?", (now,))
                row = db.execute(
                    "SELECT info, expire_at FROM images WHERE server=? AND username=? AND md5=?",
                    (server, username, md5)).fetchone()
        except (sqlite3.Error, OSError) as e:
            self._fail(e)
            return None
        if row is None or row[1] <= now + CACHE_RENEW_MARGIN:
            return None
        try:
            info = json.loads(row[0])
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def put_info(self, server: str, username: str, info: dict, *aliases: str) -> None:
        """Cache ``info`` under its ``md5``, its ``source_md5`` and the local
        file's MD5 (``aliases``): when the server stripped metadata, the
        stored bytes differ from the file, and the file's hash must still hit."""
        if self.disabled:
            return
        expire_at = _parse_time(info.get("expire_at"))
        md5 = info.get("md5")
        if expire_at is None or not isinstance(md5, str) or expire_at <= time.time():
            return
        keys = [k for k in dict.fromkeys((md5, info.get("source_md5"), *aliases))
                if isinstance(k, str) and len(k) == 32]
        stored = {k: v for k, v in info.items() if k != "status"}
        try:
            with self._connect() as db:
                db.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?)",
                               [(server, username, key, json.dumps(stored), expire_at) for key in keys])
        except (sqlite3.Error, OSError) as e:
            self._fail(e)

    # -- hash memo

    def get_md5(self, path: str, size: int, mtime_ns: int) -> Optional[str]:
        if self.disabled:
            return None
        try:
            with self._connect() as db:
                row = db.execute(
                    "SELECT md5 FROM file_hashes WHERE path=? AND size=? AND mtime_ns=?",
                    (path, size, mtime_ns)).fetchone()
        except (sqlite3.Error, OSError) as e:
            self._fail(e)
            return None
        return row[0] if row else None

    def put_md5(self, path: str, size: int, mtime_ns: int, md5: str) -> None:
        if self.disabled:
            return
        now = time.time()
        try:
            with self._connect() as db:
                db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?)",
                           (path, size, mtime_ns, md5, now))
                db.execute("DELETE FROM file_hashes WHERE seen_at < ?",
                           (now - HASH_MEMO_MAX_AGE,))
        except (sqlite3.Error, OSError) as e:
            self._fail(e)


# ---------------------------------------------------------------- HTTP client

@dataclass
class _Reply:
    status: int
    headers: http.client.HTTPMessage
    body: Optional[dict]


def _network_failure(error: BaseException, base_url: str, timeout: float) -> _Failure:
    if isinstance(error, ConnectionRefusedError):
        return _Failure(f"cannot connect to {base_url}: connection refused "
                        "(is the server running?)", "network")
    if isinstance(error, socket.gaierror):
        host = urllib.parse.urlsplit(base_url).hostname
        return _Failure(f"cannot find server {host!r}: {error.strerror or error}", "network")
    if isinstance(error, (socket.timeout, TimeoutError)):
        return _Failure(f"server {base_url} did not answer within {timeout:g} s", "timeout")
    if isinstance(error, ssl.SSLError):
        return _Failure(f"TLS error talking to {base_url}: {error}", "network")
    if isinstance(error, http.client.HTTPException):
        return _Failure(f"bad answer from {base_url}: {error.__class__.__name__} {error}".strip(),
                        "network")
    if isinstance(error, OSError):
        return _Failure(f"network error talking to {base_url}: {error.strerror or error}",
                        "network")
    return _Failure(f"error talking to {base_url}: {error}", "network")   # pragma: no cover


def _server_failure(reply: _Reply, default: str) -> _Failure:
    """Turn a non-2xx answer into a failure with a message a person can act on."""
    body = reply.body or {}
    server_message = body.get("error") if isinstance(body.get("error"), str) else None
    code = body.get("code") if isinstance(body.get("code"), str) else None
    status = reply.status
    if status in (401, 403):
        return _Failure(PERMISSION_MESSAGE, code or ("unauthorized" if status == 401 else "forbidden"))
    if status in (413, 415):
        if server_message:
            message = f"the server refused the file: {server_message}"
        elif status == 415:
            message = ("the server refused the file: not a supported image "
                       "(JPEG, PNG, GIF, WEBP, BMP, TIFF, ICO, AVIF, HEIC)")
        elif code == "too_many_pixels":
            message = "the server refused the file: the image has too many pixels"
        else:
            message = "the server refused the file: it is larger than the server accepts"
    elif status in (301, 302, 303, 307, 308):
        where = reply.headers.get("Location", "elsewhere")
        message = f"the server redirects to {where}; set the server URL to the final address"
    elif server_message:
        message = server_message
    else:
        message = f"{default} (HTTP {status})"
    return _Failure(message, code or f"http_{status}")


class Client:
    """A configured connection to one imgproxy server.

    ``cache_path`` None means the default cache location; pass
    ``use_cache=False`` for no local cache at all.  Methods never raise for
    network, server, auth or file problems; they return ``{"error": ...}``.
    """

    def __init__(self, base_url: str, username: Optional[str], password: Optional[str],
                 cache_path: Optional[PathLike] = None, timeout: float = DEFAULT_TIMEOUT,
                 *, use_cache: bool = True, progress: Optional[bool] = None,
                 token: Optional[str] = None) -> None:
        self.base_url = _check_base_url(base_url, "base_url")
        self.username = username
        self._password = password
        self._token = token.strip() if token else None
        self.timeout = timeout
        self.progress = progress   # None: only on a terminal, for big files
        parts = urllib.parse.urlsplit(self.base_url)
        self._scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self.cache: Optional[LocalCache] = None
        if use_cache:
            self.cache = LocalCache(cache_path if cache_path is not None else default_cache_path())

    def __repr__(self) -> str:
        # No password here: reprs end up in logs and tracebacks.
        return f"Client({self.base_url!r}, user={self.username!r})"

    # -- HTTP plumbing

    def _auth_header(self, password_only: bool = False) -> str:
        if self._token and not password_only:
            # A token is printable ASCII without spaces; anything else (a pasted
            # second line, a stray character) would fail deep in http.client
            # with a traceback that prints the secret.
            if not (self._token.isascii() and self._token.isprintable() and " " not in self._token):
                raise _Failure("the app token is malformed (check IMGPROXY_TOKEN or client.token)",
                               "bad_token")
            return "Bearer " + self._token
        if not self.username or self._password is None:
            raise _Failure("no user name and password configured: set IMGPROXY_USER and "
                           "IMGPROXY_PASSWORD, or a \"client\" section in config.json",
                           "no_credentials")
        token = f"{self.username}:{self._password}".encode("utf-8")
        return "Basic " + base64.b64encode(token).decode("ascii")

    def _connection(self) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                               blocksize=UPLOAD_BLOCK)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout,
                                          blocksize=UPLOAD_BLOCK)

    def _headers(self, password_only: bool = False, **extra: str) -> dict:
        headers = {"Authorization": self._auth_header(password_only), "Accept": "application/json",
                   "User-Agent": USER_AGENT}
        headers.update(extra)
        return headers

    @staticmethod
    def _read_reply(response: http.client.HTTPResponse) -> _Reply:
        raw = response.read(MAX_JSON_BYTES + 1)
        body = None
        if raw and len(raw) <= MAX_JSON_BYTES:
            try:
                parsed = json.loads(raw.decode("utf-8"))
                body = parsed if isinstance(parsed, dict) else None
            except ValueError:
                body = None
        return _Reply(response.status, response.headers, body)

    def _request(self, method: str, path: str, headers: dict,
                 body: Optional[_UploadBody] = None) -> _Reply:
        conn = self._connection()
        try:
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                # The server may answer (413, 401) and close before reading the
                # whole body; its answer is still worth reading if it arrived.
                if body is None:
                    raise
                try:
                    return self._read_reply(conn.getresponse())
                except (OSError, http.client.HTTPException):
                    raise _Failure("the server closed the connection during the upload "
                                   "(the file may be larger than it accepts)",
                                   "network") from None
            return self._read_reply(conn.getresponse())
        except _Failure:
            raise
        except (OSError, http.client.HTTPException) as e:
            raise _network_failure(e, self.base_url, self.timeout) from None
        finally:
            conn.close()

    def _info_from(self, reply: _Reply, status: str) -> dict:
        info = reply.body
        if not info or not isinstance(info.get("url"), str) or not isinstance(info.get("md5"), str):
            raise _Failure(f"unexpected answer from {self.base_url} (HTTP {reply.status}); "
                           "is this an imgproxy server?", "bad_response")
        info = dict(info)
        info.setdefault("status", status)
        return info

    # -- files

    @staticmethod
    def _open_file(path: PathLike) -> tuple[IO[bytes], os.stat_result, str]:
        name = os.fspath(path)
        try:
            # stat before open: opening a FIFO for reading would block forever.
            info = os.stat(name)
            if stat.S_ISDIR(info.st_mode):
                raise _Failure(f"is a directory, not an image file: {name}", "is_a_directory")
            if not stat.S_ISREG(info.st_mode):
                raise _Failure(f"not a regular file: {name}", "not_a_file")
            fileobj = open(name, "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise _Failure(f"no such file: {name}", "file_not_found") from None
        except PermissionError:
            raise _Failure(f"permission denied reading {name}", "unreadable") from None
        except OSError as e:
            raise _Failure(f"cannot read {name}: {e.strerror or e}", "unreadable") from None
        info = os.fstat(fileobj.fileno())
        if info.st_size == 0:
            fileobj.close()
            raise _Failure(f"the file is empty: {name}", "empty_file")
        return fileobj, info, name

    def _hash_file(self, path: PathLike) -> str:
        """The file's MD5, from the memo when the file is unchanged."""
        fileobj, before, name = self._open_file(path)
        absolute = os.path.abspath(name)
        with fileobj:
            if self.cache:
                known = self.cache.get_md5(absolute, before.st_size, before.st_mtime_ns)
                if known:
                    return known
            digest = hashlib.md5(usedforsecurity=False)
            progress = _Progress(f"hashing {os.path.basename(name)}", before.st_size,
                                 self.progress and before.st_size >= PROGRESS_MIN_BYTES)
            done = 0
            try:
                while True:
                    chunk = fileobj.read(HASH_CHUNK)
                    if not chunk:
                        break
                    digest.update(chunk)
                    done += len(chunk)
                    progress.update(done)
            except OSError as e:
                raise _Failure(f"cannot read {name}: {e.strerror or e}", "unreadable") from None
            finally:
                progress.close()
            after = os.fstat(fileobj.fileno())
        md5 = digest.hexdigest()
        # Remember the hash only if the file did not change while we read it.
        if self.cache and (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
            self.cache.put_md5(absolute, before.st_size, before.st_mtime_ns, md5)
        return md5

    # -- operations

    def renew(self, md5: str) -> Optional[dict]:
        """Renew a known image (status "exists"), or None when the server lacks it."""
        reply = self._request("POST", f"/api/images/{md5}/renew",
                              self._headers(**{"Content-Length": "0"}))
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise _server_failure(reply, "the server could not check the image")
        return self._info_from(reply, "exists")

    def _upload(self, path: PathLike) -> dict:
        fileobj, info, name = self._open_file(path)
        with fileobj:
            filename = os.path.basename(name)
            progress = _Progress(f"uploading {filename}", info.st_size,
                                 self.progress and info.st_size >= PROGRESS_MIN_BYTES)
            body = _UploadBody(fileobj, info.st_size, progress)
            headers = self._headers(**{"Content-Type": "application/octet-stream",
                                       "Content-Length": str(info.st_size)})
            try:
                reply = self._request("PUT", "/upload/" + urllib.parse.quote(filename, safe=""),
                                      headers, body)
            finally:
                progress.close()
        if reply.status not in (200, 201):
            raise _server_failure(reply, "the upload failed")
        return self._info_from(reply, "uploaded" if reply.status == 201 else "exists")

    def upload_or_get(self, path: PathLike) -> dict:
        """The image's info with status "cached", "exists" or "uploaded";
        ``{"error": ..., "code": ...}`` on any failure."""
        try:
            md5 = self._hash_file(path)
            user = self._cache_identity()
            if self.cache:
                cached = self.cache.get_info(self.base_url, user, md5)
                if cached is not None:
                    cached["status"] = "cached"
                    return cached
            info = self.renew(md5)
            if info is None:
                info = self._upload(path)
            if self.cache:
                self.cache.put_info(self.base_url, user, info, md5)
            return info
        except _Failure as e:
            return e.as_dict()

    def _cache_identity(self) -> str:
        """Whose uploads the cache remembers. A token may not say which user it
        acts for, so it is named by a short digest (never the secret itself)."""
        if self._token:
            return "token:" + hashlib.sha256(self._token.encode("utf-8")).hexdigest()[:16]
        return self.username or ""

    def create_token(self, name: str) -> dict:
        """A new app token for this client's user, made with the password:
        ``{"id", "name", "token", ...}`` (the secret is in this answer only),
        or ``{"error": ..., "code": ...}``."""
        try:
            body = json.dumps({"name": name}).encode("utf-8")
            headers = self._headers(password_only=True, **{"Content-Type": "application/json",
                                                           "Content-Length": str(len(body))})
            reply = self._request("POST", "/api/tokens", headers, body)
            if reply.status != 201 or not isinstance((reply.body or {}).get("token"), str):
                raise _server_failure(reply, "the server did not make a token")
            return reply.body
        except _Failure as e:
            return e.as_dict()

    def get_image_url(self, path: PathLike, size: Union[int, str, None] = None,
                      fmt: Optional[str] = None) -> Optional[str]:
        """The public URL of the image (of its variant when `size` or `fmt` is
        given), or None on any failure."""
        info = self.upload_or_get(path)
        url = info.get("url")
        if "error" in info or not isinstance(url, str):
            return None
        return url if size is None and fmt is None else variant_url(url, size, fmt)

    def download_db(self, dest: PathLike = DEFAULT_DB_NAME) -> Union[str, dict]:
        """Save the server's database snapshot (admin only) to ``dest``.

        Returns the absolute path written, or an error dict.  The bytes go to a
        temporary file beside ``dest`` and are renamed over it only when
        complete and recognisably SQLite, so ``dest`` is never half written.
        """
        target = os.path.abspath(os.fspath(dest))
        if os.path.isdir(target):
            target = os.path.join(target, DEFAULT_DB_NAME)
        folder = os.path.dirname(target)
        tmp_name: Optional[str] = None
        progress: Optional[_Progress] = None
        conn = self._connection()
        try:
            headers = self._headers(Accept="application/vnd.sqlite3, application/json")
            try:
                conn.request("GET", self._prefix + "/api/db", headers=headers)
                response = conn.getresponse()
                if response.status != 200:
                    raise _server_failure(self._read_reply(response),
                                          "the server could not send its database")
                length = response.headers.get("Content-Length") or "0"
                total = int(length) if length.isdigit() else 0
                progress = _Progress("downloading database", total,
                                     self.progress and total >= PROGRESS_MIN_BYTES)
                try:
                    fd, tmp_name = tempfile.mkstemp(
                        dir=folder, prefix="." + os.path.basename(target) + ".", suffix=".part")
                except OSError as e:
                    raise _Failure(f"cannot write in {folder}: {e.strerror or e}",
                                   "unwritable") from None
                done = 0
                first = b""
                with os.fdopen(fd, "wb") as out:
                    while True:
                        chunk = response.read(HASH_CHUNK)
                        if not chunk:
                            break
                        if len(first) < 16:
                            first += chunk[:16 - len(first)]
                        try:
                            out.write(chunk)
                        except OSError as e:
                            raise _Failure(f"cannot write {target}: {e.strerror or e}",
                                           "unwritable") from None
                        done += len(chunk)
                        progress.update(done)
                    try:
                        out.flush()
                        os.fsync(out.fileno())
                    except OSError as e:
                        raise _Failure(f"cannot write {target}: {e.strerror or e}",
                                       "unwritable") from None
            except (OSError, http.client.HTTPException) as e:
                raise _network_failure(e, self.base_url, self.timeout) from None
            if total and done != total:
                raise _Failure("the database download was cut short", "network")
            if first != b"SQLite format 3\x00":
                raise _Failure("the server did not send an SQLite database", "bad_response")
            try:
                os.replace(tmp_name, target)
            except OSError as e:
                raise _Failure(f"cannot write {target}: {e.strerror or e}", "unwritable") from None
            tmp_name = None
            return target
        except _Failure as e:
            return e.as_dict()
        finally:
            if progress:
                progress.close()
            conn.close()
            if tmp_name:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)


# ---------------------------------------------------------------- module functions

_default: Optional[tuple[Settings, Client]] = None


def default_client() -> Client:
    """The client built from config.json and the environment (raises ConfigError).

    Rebuilt whenever the configuration changes, so a long-running program
    picks up edits and tests can point it elsewhere through the environment.
    """
    global _default
    settings = load_settings()
    if _default is not None and _default[0] == settings:
        return _default[1]
    client = Client(settings.base_url, settings.username, settings.password,
                    cache_path=settings.cache_path, token=settings.token)
    _default = (settings, client)
    return client


def upload_or_get(path: PathLike) -> dict:
    """Upload ``path`` unless the server already has it; the info object with
    ``status`` "cached", "exists" or "uploaded", or ``{"error": ...}``."""
    try:
        client = default_client()
    except ConfigError as e:
        return {"error": str(e), "code": "config"}
    return client.upload_or_get(path)


def variant_url(image_url: str, size: Union[int, str, None] = None, fmt: Optional[str] = None) -> str:
    """The URL of a size and format of an image, from the image's URL (no request).

    ``size`` is a width the server offers (server.variant_widths) or "full"
    (the default); ``fmt`` one of VARIANT_FORMATS, or None to let the server
    choose from the browser's Accept header. Raises ValueError for values
    that can never be right.
    """
    size = "full" if size is None else str(size)
    if size != "full" and not (size.isdigit() and size.isascii() and int(size) > 0 and size[0] != "0"):
        raise ValueError(f"size must be a width in pixels or 'full', not {size!r}")
    if fmt is not None and fmt not in VARIANT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(VARIANT_FORMATS)}, not {fmt!r}")
    head, sep, name = image_url.rpartition("/")
    md5 = name.partition(".")[0]
    if not sep or not re.fullmatch(r"[0-9a-f]{32}", md5):
        raise ValueError(f"not an image URL: {image_url!r}")
    return f"{head}/{md5}/{size}" + (f".{fmt}" if fmt else "")


def get_image_url(path: PathLike, size: Union[int, str, None] = None,
                  fmt: Optional[str] = None) -> Optional[str]:
    """The public URL for the image at ``path`` (of its variant when ``size``
    or ``fmt`` is given: see variant_url), or None on any failure."""
    info = upload_or_get(path)
    url = info.get("url")
    if "error" in info or not isinstance(url, str):
        return None
    return url if size is None and fmt is None else variant_url(url, size, fmt)


def download_db(dest: PathLike = DEFAULT_DB_NAME) -> Union[str, dict]:
    """Save the server's database snapshot (admin only); the path or an error dict."""
    try:
        client = default_client()
    except ConfigError as e:
        return {"error": str(e), "code": "config"}
    return client.download_db(dest)


# ---------------------------------------------------------------- command line

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="client.py",
        description="Upload images to an imgproxy server and print their URLs, "
                    "one per line, in argument order.",
        epilog="Credentials: an app token from IMGPROXY_TOKEN, --token-stdin or client.token "
               "in config.json is preferred; else the password comes from IMGPROXY_PASSWORD, "
               "config.json, or a prompt on a terminal. --create-token NAME asks for the "
               "password and prints only the new token. "
               "Exit status: 0 when every file succeeded, else 1.")
    parser.add_argument("files", nargs="*", metavar="FILE", help="image files to upload")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON info object per line instead of URLs")
    parser.add_argument("--no-cache", action="store_true",
                        help="neither read nor write the local cache")
    parser.add_argument("--download-db", nargs="?", const=DEFAULT_DB_NAME, metavar="PATH",
                        help=f"save the server's database (admin only; default {DEFAULT_DB_NAME})")
    parser.add_argument("--server", metavar="URL", help="server base URL (over IMGPROXY_URL)")
    parser.add_argument("--user", metavar="NAME", help="user name (over IMGPROXY_USER)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"network timeout (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--token-stdin", action="store_true",
                        help="read an app token from the first line of standard input (over IMGPROXY_TOKEN)")
    parser.add_argument("--create-token", metavar="NAME",
                        help="make an app token named NAME with your password (asked for, never "
                             "stored) and print only the token")
    parser.add_argument("--size", metavar="WIDTH",
                        help="print the URL of this width (one the server offers, e.g. 640, or 'full')")
    parser.add_argument("--format", choices=VARIANT_FORMATS, dest="fmt",
                        help="print the URL of this format (default with --size: chosen by the browser)")
    args = parser.parse_args(argv)
    if args.size is not None:
        try:
            variant_url("http://x/i/" + "0" * 32 + ".png", args.size)
        except ValueError as e:
            parser.error(f"--size: {e}")
    if not args.files and args.download_db is None and args.create_token is None:
        parser.error("give at least one FILE, --download-db or --create-token")

    try:
        settings = load_settings(server=args.server, user=args.user)
    except ConfigError as e:
        raise SystemExit(f"client.py: {e}") from None
    token = settings.token
    if args.token_stdin:
        token = sys.stdin.readline().strip()
        if not token:
            raise SystemExit("client.py: --token-stdin: standard input held no token")
    if args.create_token is not None:
        return _create_token_command(settings, args)
    if token and args.download_db is None:
        client = Client(settings.base_url, settings.username, None, cache_path=settings.cache_path,
                        timeout=args.timeout, use_cache=not args.no_cache, token=token)
        try:
            return 1 if _run(client, args) else 0
        except KeyboardInterrupt:
            print("client.py: interrupted", file=sys.stderr)
            return 130
    password = settings.password
    if not settings.username:
        raise SystemExit("client.py: no user configured: set IMGPROXY_USER and IMGPROXY_PASSWORD, "
                         "use --user, or add a \"client\" section to config.json")
    if password is None:
        if not sys.stdin.isatty():
            raise SystemExit(f"client.py: no password for user {settings.username!r}: "
                             "set IMGPROXY_PASSWORD")
        password = getpass.getpass(f"password for {settings.username} at {settings.base_url}: ")
    client = Client(settings.base_url, settings.username, password,
                    cache_path=settings.cache_path, timeout=args.timeout,
                    use_cache=not args.no_cache)

    try:
        failed = _run(client, args)
    except KeyboardInterrupt:
        print("client.py: interrupted", file=sys.stderr)
        return 130
    return 1 if failed else 0


def _create_token_command(settings: Settings, args: argparse.Namespace) -> int:
    """--create-token: the password from IMGPROXY_PASSWORD or a prompt (never from
    a file, never written), the token alone on stdout so it can be piped."""
    if not settings.username:
        raise SystemExit("client.py: --create-token needs a user: use --user or IMGPROXY_USER")
    password = os.environ.get("IMGPROXY_PASSWORD")
    if not password:
        try:
            password = getpass.getpass(f"password for {settings.username} at {settings.base_url}: ")
        except (EOFError, OSError):
            password = ""
    if not password:
        raise SystemExit("client.py: --create-token needs the password (a prompt on a terminal, "
                         "or IMGPROXY_PASSWORD)")
    client = Client(settings.base_url, settings.username, password, timeout=args.timeout, use_cache=False)
    made = client.create_token(args.create_token)
    if "error" in made:
        print(f"client.py: could not create the token: {made['error']}", file=sys.stderr)
        return 1
    print(made["token"])
    print(f"client.py: token {made['id']} ({made['name']}) created; it is shown only now. "
          "Use it as IMGPROXY_TOKEN or client.token in config.json.", file=sys.stderr)
    return 0


def _run(client: Client, args: argparse.Namespace) -> bool:
    """Do what the command line asked; True when anything failed."""
    failed = False
    for name in args.files:
        info = client.upload_or_get(name)
        if "error" in info:
            failed = True
            where = "" if name in info["error"] else f"{name}: "
            print(f"client.py: {where}{info['error']}", file=sys.stderr)
        wants_variant = args.size is not None or args.fmt is not None
        if wants_variant and "error" not in info:
            info = {**info, "variant_url": variant_url(info["url"], args.size, args.fmt)}
        if args.json:
            print(json.dumps({**info, "file": name}, ensure_ascii=False))
        elif "error" not in info:
            print(info["variant_url"] if wants_variant else info["url"])
        sys.stdout.flush()   # Typora and pipes read lines as they come

    if args.download_db is not None:
        result = client.download_db(args.download_db)
        if isinstance(result, dict):
            failed = True
            print(f"client.py: database download: {result['error']}", file=sys.stderr)
        else:
            print(f"client.py: saved the server database to {result}", file=sys.stderr)
    return failed


if __name__ == "__main__":
    sys.exit(main())
