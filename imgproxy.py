#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "aiohttp>=3.9,<4",
#     "aiosqlite>=0.20,<1",
#     "Pillow>=10.3,<14",
# ]
# ///
"""imgproxy: a self-hosted image host in one file.

Upload an image (multipart POST, raw PUT, the stdlib client or the upload page),
get a public URL. Images are stored once per distinct content under
``uploads/ab/cd/<md5>.<ext>``, described in SQLite, served with strong caching
headers, and removed after ``cleanup.expire_days`` by a daily in-process pass.
For several machines the same file keeps the bytes in an S3-compatible bucket
(same keys) and the rows in PostgreSQL (config ``storage`` and ``database``).

Run:   python3 imgproxy.py [--config config.json] [--host H] [--port P]
Hash:  python3 imgproxy.py hash-password
Check: python3 imgproxy.py check-config [--config PATH] [--print KEY ...]
Move:  python3 imgproxy.py move --config FROM.json --to TO.json

Chapters, top-down: constants · passwords · config · errors · storage · database ·
image inspection · variants · metadata · metrics · auth · middlewares · serving
(conditional requests and ranges) · handlers · cleanup · create_app · connections ·
moving house · main · appendix (the OpenAPI document and the upload page). Each chapter
uses only what stands above it, except the appendix's data, read by handlers at run time.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import dataclasses
import datetime as dt
import email.utils
import errno
import fcntl
import functools
import getpass
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import logging
import math
import mmap
import multiprocessing
import os
import re
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
import warnings
import zlib
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Optional

import aiosqlite
from aiohttp import BodyPartReader, ClientError, MultipartReader, hdrs, http_exceptions, web
from PIL import Image, ImageOps, TiffImagePlugin

# ==== constants =================================================================

__version__ = "2.0.0"
log = logging.getLogger("imgproxy")

DENIED_MESSAGE = "该用户权限不足，请联系管理员"
NO_SUCH_IMAGE = "no such image (never uploaded, deleted or expired)"
SHIPPED_PASSWORDS = frozenset({"alice123"})  # passwords in the example config.json
ROLES = ("uploader", "admin")

# Detected Pillow format -> (stored extension, MIME type). MPO is what Pillow
# calls a camera JPEG with extra preview frames; it is a JPEG for everyone else.
FORMATS: dict[str, tuple[str, str]] = {
    "JPEG": ("jpg", "image/jpeg"),
    "PNG": ("png", "image/png"),
    "GIF": ("gif", "image/gif"),
    "WEBP": ("webp", "image/webp"),
    "BMP": ("bmp", "image/bmp"),
    "TIFF": ("tiff", "image/tiff"),
    "ICO": ("ico", "image/x-icon"),
    "AVIF": ("avif", "image/avif"),
}
# AVIF counts only where Pillow decodes it; HEIF (iPhone HEIC) needs the optional
# pillow-heif and is stored as JPEG. Both are in the default list so that the
# server takes them as soon as it can, and says how to enable HEIC when it cannot.
DEFAULT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "AVIF", "HEIF")
CONVERTED_FORMATS = {"HEIF": "JPEG"}  # detected format -> format it is stored as
HEIF_HOWTO = ("HEIC/HEIF photos need the optional pillow-heif package on the server: "
              "pip install pillow-heif, then restart imgproxy")

MD5_RE = re.compile(r"[0-9a-f]{32}")
CHUNK = 256 * 1024              # network read size
FLUSH_BYTES = 1024 * 1024       # uploads reach tmp/ in writes of this size (and /api/db is sent in such reads)
MULTIPART_SLACK = 64 * 1024     # boundaries and part headers around the file
MAX_FRAMES = 10_000             # animated images: frames decoded at most
JPEG_MAX_SEGMENTS = 4096        # JPEG marker segments before the scan data ...
JPEG_MAX_METADATA = 16 * 1024 * 1024  # ... and bytes of APPn/COM metadata in them
TIFF_MAX_ENTRIES = 100_000      # tags in all the IFDs of a TIFF together
JPEG_MAX_SCANS = 100            # scans in a whole JPEG file (each one walks every block again)
DECODE_BYTES_PER_PIXEL = 4      # one decode may hold this many bytes x max_pixels ...
DECODE_SLACK = 64 * 1024 * 1024  # ... plus the file itself and this much for decoder buffers
DECODE_CPU_SECONDS = 20.0       # CPU time one upload's decode may use (checked between frames)
# Peak bytes a pixel costs while Pillow decodes these (measured with bench/decode_memory.py;
# an ICO's BMP entry: image, its RGBA copy and the mask); others hold DECODE_BYTES_PER_PIXEL.
DECODE_COST = {"WEBP": 20, "AVIF": 12, "APNG": 12, "ICO-BMP": 9}
AVIF_FRAME_COST = 8             # ... an AVIF sequence, for each frame past the first ...
AVIF_REWRITE_COST = 28          # ... and re-encoding an AVIF (metadata removal), per pixel of every frame
TMP_MAX_AGE = 3600.0            # unlocked tmp/ files other than .part are leftovers past this age
COUNT_FLUSH_SECONDS = 2.0       # access counts reach the database this often
CLEANUP_BATCH = 500
CLEANUP_PAUSE = 0.005           # seconds between expiry batches (100,000 images: +1 s)
BODY_CACHE_MAX_FILE = 512 * 1024
META_CACHE_ENTRIES = 100_000
AUTH_FAIL_LIMIT = 10            # failed sign-ins per address ...
AUTH_FAIL_WINDOW = 60.0         # ... within this many seconds block that address ...
AUTH_BLOCK_SECONDS = 60.0       # ... for this long from the failure that tripped it (= Retry-After)
AUTH_FAIL_TABLE = 10_000        # addresses the limiter remembers at most
AUTH_CHECKS_PER_ADDRESS = 2     # password checks one address may have running at once
AUTH_HASH_THREADS = 2           # password hashing's own threads (file reads never wait on them)
AUTH_FAILED_CHECK_FACTOR = 1.5  # a failed check lasts this times the costliest hash at least
UPLOAD_IDLE_TIMEOUT = 60.0      # an upload body that sends nothing for this long is dropped (408)
KEEPALIVE_TIMEOUT = 75.0        # idle connections and unfinished request heads are closed
METRICS_SNAPSHOT_SECONDS = 1.0  # with workers, how stale a sibling's figures in /metrics may be
METRICS_TOKEN_MIN = 16          # characters of metrics.token at least
RESPONSE_STALL_TIMEOUT = 60.0   # a response the client takes nothing of for this long is dropped
MAX_CONNECTIONS = 2048          # default of server.max_connections (per process)
FD_RESERVE = 64                 # descriptors kept for the database, logs, decodes, the listener
MAX_RANGES = 16                 # byte ranges in one request; more, or overlapping ones, get the whole image
MAX_EXPIRE_DAYS = 36500         # config bounds: beyond these, date and size arithmetic breaks
MAX_UPLOAD_MB = 4096
MAX_CACHE_MB = 65536
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
# Object storage (storage.backend "s3"). An upload up to the threshold is one PUT;
# above it a multipart upload of parts sent a few at a time, each read from the
# file as it goes out, so memory holds chunks, never parts or files.
S3_MULTIPART_THRESHOLD = 16 * 1024 * 1024
S3_PART_SIZE = 8 * 1024 * 1024       # grown when a file would need more than S3_MAX_PARTS
S3_MAX_PARTS = 10_000                # the S3 limit on parts in one upload
S3_PART_CONCURRENCY = 4              # parts in flight at once for one upload
S3_STREAM_CHUNK = 64 * 1024          # a GET is handed on in pieces of this size as they arrive
S3_DELETE_BATCH = 1000               # the S3 limit on keys in one DeleteObjects
S3_CONNECT_TIMEOUT = 3.0             # seconds; a store that does not answer is unavailable, not slow
S3_READ_TIMEOUT = 30.0               # seconds without a byte from the store on an open request
S3_MAX_ATTEMPTS = 3                  # tries of one request in all (connection errors, 5xx, throttling): <= 3 s of backoff
S3_ANSWER_SECONDS = 10.0             # a HEAD, or a GET until its headers, tries included; then "unavailable"
COPY_WAIT_MAX = 16 * 1024 * 1024     # a first GET of an original up to this size waits for the node's copy...
COPY_WAIT_SECONDS = 2.0              # ... this long at most, then reads the store itself
S3_POOL_CONNECTIONS = 64             # connections kept to the store, shared by all requests
# App tokens: "imgp_" + 43 base62 characters = 256 bits; the fixed prefix lets
# secret scanners (GitHub's, gitleaks) recognise a leaked one.
TOKEN_PREFIX = "imgp_"
TOKEN_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TOKEN_CHARS = 43
TOKEN_ID_RE = re.compile(r"[0-9a-f]{16}")
TOKEN_NAME_MAX = 100
TOKENS_PER_USER = 100
IMAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
# Variants (/i/{md5}/{size}.{fmt}): output extension -> (Pillow format, MIME type).
VARIANT_FORMATS: dict[str, tuple[str, str]] = {
    "jpg": ("JPEG", "image/jpeg"),
    "png": ("PNG", "image/png"),
    "webp": ("WEBP", "image/webp"),
    "gif": ("GIF", "image/gif"),
    "avif": ("AVIF", "image/avif"),
}
DEFAULT_VARIANT_WIDTHS = (160, 320, 640, 1280, 2048)
VARIANT_RENDER_SECONDS = 10.0   # a render still running after this answers 503 (and finishes for the next asker)
VARIANT_QUEUE_PER_CORE = 8      # distinct renders waiting or running per core before new ones get 503
VARIANT_TOUCH_SECONDS = 3600.0  # a served variant's mtime (its LRU rank on disk) is refreshed at most this often
VARIANT_SWEEP_SECONDS = 300.0   # the disk budget is checked at least this often, and after renders that exceed it
VARIANT_LOCK_STRIPES = 256      # per-variant render locks across workers, hashed onto this many files
VARIANT_HEAD_BYTES = 256 * 1024  # of an original in the object store, read to tell if it can be see-through
VARIANT_SOURCE_CACHE = 10_000   # images whose "has transparency" answer is remembered for negotiation
RENDER_NICE = 10                # render processes yield the CPU to the serving event loop
# More than one machine (storage.backend "s3", database.url): see the storage and database chapters.
PG_POOL_SIZE = 10               # connections per process (reads; writes queue on one lock anyway)
PG_COMMAND_SECONDS = 30.0       # a statement, or a connection attempt, that takes longer fails
PG_CHANNEL = "imgproxy_changes"  # LISTEN/NOTIFY channel of the change feed
PG_LISTEN_CHECK_SECONDS = 1.0   # how often a lost change feed is retried
PG_LOCK_WRITE = 0x696D6770_0001  # advisory locks ("imgp"): every write transaction ...
PG_LOCK_CLEANUP = 0x696D6770_0002  # ... a cleanup pass anywhere in the cluster ...
PG_LOCK_SCHEMA = 0x696D6770_0003   # ... and schema creation by nodes starting together
# Set on objects, for a CDN or public bucket in front of the store (storage.public_base_url):
# an hour, so a deleted or expired image leaves such a cache within the hour.
OBJECT_CACHE_CONTROL = "public, max-age=3600"
CLAIM_SECONDS = 3600.0          # an upload's claim on an object protects it from removal this long
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
            "img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; "
            "base-uri 'none'; frame-ancestors 'none'")

# HTTP cache policies, named once. Errors, API answers and the database copy are
# never kept (they change or are private); the page, its assets and the API
# description are revalidated (an upgrade changes them under the same URL).
CACHE_NO_STORE = "no-store"
CACHE_NO_CACHE = "no-cache"


def image_cache_control(seconds_left: float) -> str:
    """An image's bytes never change under its URL, but a cache must not outlive
    the image: max-age is what is left of its life."""
    return f"public, max-age={int(seconds_left)}, immutable"


# Shared state of the running application (typed keys: aiohttp 3.9+).
CONFIG: web.AppKey[Config] = web.AppKey("config")
STORE: web.AppKey[ImageStore] = web.AppKey("store")
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
VARIANTS: web.AppKey[VariantCache] = web.AppKey("variants")
TASKS = web.AppKey("tasks", list)
STREAMING = web.AppKey("streaming", dict)  # transport -> the task blocked in its native sendfile
CLOCK = web.AppKey("clock", object)
METRICS = web.AppKey("metrics", object)  # a Metrics when metrics.enable, else absent


@dataclasses.dataclass(frozen=True)
class ImageFacts:
    format: str
    width: int
    height: int
    size: int
    frames: int = 1


# ==== passwords ================================================================
# Above the config, which checks that each password_hash parses.

def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(digest)}"


def _parse_scrypt_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not an scrypt hash")
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or n > 2**20 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError("scrypt parameters out of range")
    salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    if not salt or len(digest) < 16:
        raise ValueError("scrypt salt or digest missing")
    return n, r, p, salt, digest


def _unmatchable_hash_like(stored: str) -> str:
    """A hash no password matches, costing as much to check as `stored`."""
    n, r, p, salt, digest = _parse_scrypt_hash(stored)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${n}${r}${p}${b64(secrets.token_bytes(len(salt)))}${b64(secrets.token_bytes(len(digest)))}"


def verify_password_hash(password: str, stored: str) -> bool:
    n, r, p, salt, digest = _parse_scrypt_hash(stored)
    candidate = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p,
                               dklen=len(digest), maxmem=256 * 1024 * 1024)
    return hmac.compare_digest(candidate, digest)


# ==== config ====================================================================

class ConfigError(ValueError):
    """A config problem, worded for the operator: names the key and what to fix."""


@dataclasses.dataclass(frozen=True)
class UserConfig:
    username: str
    role: str = "uploader"
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    password_hash: Optional[str] = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    domain: str = "localhost"
    port: int = 8000
    host: str = "127.0.0.1"
    base_url: Optional[str] = None
    data_dir: Path = Path("data")
    max_upload_mb: float = 20
    max_pixels: int = 50_000_000
    formats: tuple[str, ...] = DEFAULT_FORMATS
    cache_mb: float = 64
    log_file: Optional[Path] = None
    log_level: str = "INFO"
    access_log: bool = False
    trust_forwarded_for: bool = False
    workers: int = 1
    variant_widths: tuple[int, ...] = DEFAULT_VARIANT_WIDTHS
    variant_cache_mb: float = 1024
    strip_metadata: bool = True
    max_connections: int = MAX_CONNECTIONS

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclasses.dataclass(frozen=True)
class CleanupConfig:
    enable: bool = True
    expire_days: float = 30
    cleanup_time: dt.time = dt.time(3, 0, 0)


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    username: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    cache_path: Optional[str] = None
    token: Optional[str] = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    enable: bool = False
    token: Optional[str] = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """Where image bytes live: `files` under data_dir, or an S3-compatible bucket."""
    backend: str = "files"
    endpoint: Optional[str] = None
    bucket: Optional[str] = None
    region: str = "us-east-1"
    prefix: str = ""
    public_base_url: Optional[str] = None
    access_key_id: Optional[str] = dataclasses.field(default=None, repr=False)
    secret_access_key: Optional[str] = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class DatabaseConfig:
    """Where metadata lives: SQLite in data_dir (url null), or PostgreSQL."""
    url: Optional[str] = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    cleanup: CleanupConfig = CleanupConfig()
    users: tuple[UserConfig, ...] = ()
    client: ClientConfig = ClientConfig()
    metrics: MetricsConfig = MetricsConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()

    @property
    def base_url(self) -> str:
        if self.server.base_url:
            return self.server.base_url
        return f"http://{self.server.domain}:{self.server.port}"

    @property
    def expire_seconds(self) -> float:
        return self.cleanup.expire_days * 86400.0


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _expect(key: str, value: Any, kind: str) -> Any:
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value),
        "list": isinstance(value, list),
        "object": isinstance(value, dict),
    }[kind]
    if not ok:
        wanted = {"str": "a string", "bool": "true or false", "int": "an integer",
                  "number": "a number", "list": "a list", "object": "an object"}[kind]
        raise ConfigError(f"{key}: expected {wanted}, got {_type_name(value)} {json.dumps(value)[:40]}")
    return value


def _only_keys(key: str, raw: dict, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    for name in raw:
        if name not in allowed:
            raise ConfigError(f"{key + '.' if key else ''}{name}: unknown key "
                              f"(known keys: {', '.join(allowed)})")


def parse_cleanup_time(text: str, key: str = "cleanup.cleanup_time") -> dt.time:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", text.strip())
    if m:
        h, mi, s = int(m[1]), int(m[2]), int(m[3] or 0)
        if h < 24 and mi < 60 and s < 60:
            return dt.time(h, mi, s)
    raise ConfigError(f"{key}: expected a time of day as HH:MM:SS (like \"03:00:00\"), got {text!r}")


def _optional_path(key: str, value: Any, base: Path) -> Optional[Path]:
    if value is None:
        return None
    p = Path(_expect(key, value, "str")).expanduser()
    return p if p.is_absolute() else base / p


def parse_config(raw: Any, base_dir: Path) -> Config:
    """Validate a decoded config.json into a Config; raises ConfigError naming the key."""
    _expect("config", raw, "object")
    _only_keys("", raw, ("server", "cleanup", "users", "client", "metrics", "storage", "database"))

    s = _expect("server", raw.get("server", {}), "object")
    _only_keys("server", s, [f.name for f in dataclasses.fields(ServerConfig)])
    d = ServerConfig()
    port = _expect("server.port", s.get("port", d.port), "int")
    if not 0 <= port <= 65535:
        raise ConfigError(f"server.port: expected 0..65535, got {port}")
    base_url = s.get("base_url")
    if base_url is not None:
        base_url = _expect("server.base_url", base_url, "str").rstrip("/")
        if not re.match(r"https?://[^/\s]+", base_url):
            raise ConfigError(f"server.base_url: expected an http:// or https:// URL, got {base_url!r}")
    max_mb = _expect("server.max_upload_mb", s.get("max_upload_mb", d.max_upload_mb), "number")
    if not 0 < max_mb <= MAX_UPLOAD_MB:
        raise ConfigError(f"server.max_upload_mb: expected more than 0 and at most {MAX_UPLOAD_MB}, "
                          f"got {max_mb:g}")
    max_pixels = _expect("server.max_pixels", s.get("max_pixels", d.max_pixels), "int")
    if max_pixels <= 0:
        raise ConfigError("server.max_pixels: must be greater than 0")
    formats = s.get("formats", list(d.formats))
    _expect("server.formats", formats, "list")
    wanted_formats = []
    for f in formats:
        name = _expect("server.formats[]", f, "str").upper()
        name = {"JPG": "JPEG", "TIF": "TIFF", "HEIC": "HEIF"}.get(name, name)
        if name not in FORMATS and name not in CONVERTED_FORMATS:
            raise ConfigError(f"server.formats: {f!r} is not supported "
                              f"(choose from {', '.join([*FORMATS, *CONVERTED_FORMATS])})")
        if name == "AVIF" and "formats" in s and not _pillow_has("AVIF"):
            raise ConfigError("server.formats: AVIF needs a Pillow built with AVIF support")
        wanted_formats.append(name)
    if not wanted_formats:
        raise ConfigError("server.formats: list at least one format")
    cache_mb = _expect("server.cache_mb", s.get("cache_mb", d.cache_mb), "number")
    if not 0 <= cache_mb <= MAX_CACHE_MB:
        raise ConfigError(f"server.cache_mb: expected 0 to {MAX_CACHE_MB}, got {cache_mb:g}")
    level = _expect("server.log_level", s.get("log_level", d.log_level), "str").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"server.log_level: expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    workers = _expect("server.workers", s.get("workers", d.workers), "int")
    if not 1 <= workers <= 64:
        raise ConfigError(f"server.workers: expected 1..64 processes, got {workers}")
    widths = _expect("server.variant_widths", s.get("variant_widths", list(d.variant_widths)), "list")
    for w in widths:
        if not isinstance(w, int) or isinstance(w, bool) or not 1 <= w <= 16384:
            raise ConfigError(f"server.variant_widths: expected widths in pixels from 1 to 16384, "
                              f"got {json.dumps(w)[:40]}")
    variant_cache_mb = _expect("server.variant_cache_mb", s.get("variant_cache_mb", d.variant_cache_mb), "number")
    if not 0 < variant_cache_mb <= 1024 * 1024:
        raise ConfigError("server.variant_cache_mb: expected more than 0 and at most 1048576 (1 TB)")
    max_connections = _expect("server.max_connections", s.get("max_connections", d.max_connections), "int")
    if not 16 <= max_connections <= 1_000_000:
        raise ConfigError(f"server.max_connections: expected 16..1000000, got {max_connections}")
    server = ServerConfig(
        workers=workers,
        max_connections=max_connections,
        variant_widths=tuple(sorted(set(widths))),
        variant_cache_mb=variant_cache_mb,
        domain=_expect("server.domain", s.get("domain", d.domain), "str"),
        port=port,
        host=_expect("server.host", s.get("host", d.host), "str"),
        base_url=base_url,
        data_dir=_optional_path("server.data_dir", s.get("data_dir", str(d.data_dir)), base_dir),
        max_upload_mb=max_mb,
        max_pixels=max_pixels,
        formats=tuple(dict.fromkeys(wanted_formats)),
        cache_mb=cache_mb,
        log_file=_optional_path("server.log_file", s.get("log_file"), base_dir),
        log_level=level,
        access_log=_expect("server.access_log", s.get("access_log", d.access_log), "bool"),
        trust_forwarded_for=_expect("server.trust_forwarded_for",
                                    s.get("trust_forwarded_for", d.trust_forwarded_for), "bool"),
        strip_metadata=_expect("server.strip_metadata", s.get("strip_metadata", d.strip_metadata), "bool"),
    )
    if not server.domain.strip():
        raise ConfigError("server.domain: must not be empty")

    c = _expect("cleanup", raw.get("cleanup", {}), "object")
    _only_keys("cleanup", c, ("enable", "expire_days", "cleanup_time"))
    dc = CleanupConfig()
    days = _expect("cleanup.expire_days", c.get("expire_days", dc.expire_days), "number")
    if not 0 <= days <= MAX_EXPIRE_DAYS:
        raise ConfigError(f"cleanup.expire_days: expected 0 to {MAX_EXPIRE_DAYS} (100 years, which is as good "
                          f"as never), got {days:g}")
    cleanup = CleanupConfig(
        enable=_expect("cleanup.enable", c.get("enable", dc.enable), "bool"),
        expire_days=days,
        cleanup_time=dc.cleanup_time if "cleanup_time" not in c else
        parse_cleanup_time(_expect("cleanup.cleanup_time", c["cleanup_time"], "str")),
    )

    users = []
    seen = set()
    for i, u in enumerate(_expect("users", raw.get("users", []), "list")):
        key = f"users[{i}]"
        _expect(key, u, "object")
        _only_keys(key, u, ("username", "password", "password_hash", "role"))
        if "username" not in u:
            raise ConfigError(f"{key}.username: missing")
        name = _expect(f"{key}.username", u["username"], "str")
        if not name or ":" in name or not name.isprintable():
            raise ConfigError(f"{key}.username: must be non-empty, printable and without ':'")
        if name in seen:
            raise ConfigError(f"{key}.username: {name!r} appears twice")
        seen.add(name)
        role = _expect(f"{key}.role", u.get("role", UserConfig.role), "str")
        if role not in ROLES:
            raise ConfigError(f"{key}.role: expected 'uploader' or 'admin', got {role!r}")
        pw = u.get("password")
        ph = u.get("password_hash")
        if pw is None and ph is None:
            raise ConfigError(f"{key}: user {name!r} needs a password or a password_hash "
                              "(make one with: python3 imgproxy.py hash-password)")
        if pw is not None and ph is not None:
            raise ConfigError(f"{key}: user {name!r} has both password and password_hash; keep one")
        if pw is not None:
            _expect(f"{key}.password", pw, "str")
            if not pw:
                raise ConfigError(f"{key}.password: must not be empty")
        if ph is not None:
            _expect(f"{key}.password_hash", ph, "str")
            try:
                _parse_scrypt_hash(ph)
            except ValueError:
                raise ConfigError(f"{key}.password_hash: not a hash made by "
                                  "'python3 imgproxy.py hash-password' (scrypt$N$r$p$salt$hash)") from None
        users.append(UserConfig(username=name, role=role, password=pw, password_hash=ph))

    cl = _expect("client", raw.get("client", {}) or {}, "object")
    _only_keys("client", cl, ("username", "password", "cache_path", "token"))
    client = ClientConfig(
        username=None if cl.get("username") is None else _expect("client.username", cl["username"], "str"),
        password=None if cl.get("password") is None else _expect("client.password", cl["password"], "str"),
        cache_path=None if cl.get("cache_path") is None else _expect("client.cache_path", cl["cache_path"], "str"),
        token=None if cl.get("token") is None else _expect("client.token", cl["token"], "str"),
    )
    return Config(server=server, cleanup=cleanup, users=tuple(users), client=client,
                  metrics=_parse_metrics(raw.get("metrics", {})),
                  storage=_parse_storage(raw.get("storage", {})),
                  database=_parse_database(raw.get("database", {})))


def _require_package(key: str, module: str, package: str) -> None:
    """Optional drivers are imported only when the config asks for them; a
    missing one is a config error naming what to install."""
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"{key}: needs the Python package {package} (pip install {package})") from None


def _parse_storage(raw: Any) -> StorageConfig:
    st = _expect("storage", raw, "object")
    _only_keys("storage", st, [f.name for f in dataclasses.fields(StorageConfig)])
    d = StorageConfig()
    backend = _expect("storage.backend", st.get("backend", d.backend), "str")
    if backend not in ("files", "s3"):
        raise ConfigError(f"storage.backend: expected \"files\" or \"s3\", got {backend!r}")
    if backend == "files":
        extra = [k for k in st if k != "backend" and st[k] is not None]
        if extra:
            raise ConfigError(f"storage.{extra[0]}: only used with \"backend\": \"s3\"")
        return d

    def text(name: str, default: Optional[str]) -> Optional[str]:
        value = st.get(name, default)
        return None if value is None else _expect(f"storage.{name}", value, "str")

    endpoint = text("endpoint", None)
    if not endpoint or not re.fullmatch(r"https?://[^/\s]+/?", endpoint):
        raise ConfigError("storage.endpoint: the S3 endpoint as http(s)://host[:port], "
                          f"got {json.dumps(endpoint)[:60]}")
    bucket = text("bucket", None)
    # S3 bucket naming rules, which also keep the name safe in a path-style URL.
    if not bucket or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ConfigError(f"storage.bucket: expected an S3 bucket name (3-63 of a-z, 0-9, '.', '-'), "
                          f"got {json.dumps(bucket)[:60]}")
    prefix = text("prefix", d.prefix) or ""
    if prefix and (not re.fullmatch(r"[A-Za-z0-9._/-]+", prefix) or prefix.startswith("/") or ".." in prefix):
        raise ConfigError(f"storage.prefix: letters, digits, '.', '_', '-' and '/' only, got {prefix!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    public = text("public_base_url", None)
    if public is not None:
        public = public.rstrip("/")
        if not re.match(r"https?://[^/\s]+", public):
            raise ConfigError(f"storage.public_base_url: expected an http:// or https:// URL, got {public!r}")
    key_id = text("access_key_id", None) or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = text("secret_access_key", None) or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret:
        raise ConfigError("storage: the S3 credentials are missing: set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, or storage.access_key_id and storage.secret_access_key")
    _require_package("storage.backend", "aiobotocore", "aiobotocore")
    return StorageConfig(backend="s3", endpoint=endpoint.rstrip("/"), bucket=bucket,
                         region=text("region", d.region) or d.region, prefix=prefix,
                         public_base_url=public, access_key_id=key_id, secret_access_key=secret)


def _parse_database(raw: Any) -> DatabaseConfig:
    db = _expect("database", raw, "object")
    _only_keys("database", db, [f.name for f in dataclasses.fields(DatabaseConfig)])
    url = db.get("url")
    if url is None:
        return DatabaseConfig()
    url = _expect("database.url", url, "str")
    if not re.match(r"postgres(ql)?://", url):
        # Never echo the URL: it carries the password.
        raise ConfigError("database.url: expected null (SQLite in data_dir) or "
                          "postgresql://user:password@host:port/dbname")
    _require_package("database.url", "asyncpg", "asyncpg")
    return DatabaseConfig(url=url)


def _parse_metrics(raw: Any) -> MetricsConfig:
    m = _expect("metrics", raw, "object")
    d = MetricsConfig()
    _only_keys("metrics", m, [f.name for f in dataclasses.fields(MetricsConfig)])
    enable = _expect("metrics.enable", m.get("enable", d.enable), "bool")
    token = m.get("token", d.token)
    if token is not None:
        token = _expect("metrics.token", token, "str")
        if len(token) < METRICS_TOKEN_MIN or not token.isprintable() or token != token.strip():
            raise ConfigError(f"metrics.token: use at least {METRICS_TOKEN_MIN} printable characters without "
                              "spaces around them, e.g. from: python3 -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))'")
    if enable:
        # Optional dependency, imported only now: the default install keeps to
        # aiohttp, aiosqlite and Pillow. Importing (not just finding) it here
        # turns a broken install into this one line too, not a 500 at scrape time.
        try:
            __import__("prometheus_client")
        except ImportError:
            raise ConfigError("metrics.enable: needs the Python package prometheus-client "
                              "(pip install prometheus-client), or set it to false") from None
    return MetricsConfig(enable=enable, token=token)


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate config.json; every problem is a ConfigError with one clear line."""
    path = Path(path).expanduser().absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (copy config.json from the project "
                          "or pass --config PATH)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    try:
        return parse_config(raw, path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _pillow_has(fmt: str) -> bool:
    Image.init()
    return fmt in Image.OPEN


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_safe_to_listen(config: Config, host: str) -> None:
    """Refuse to face the network while a user keeps the example password."""
    if is_loopback(host):
        return
    for u in config.users:
        # A hash of an example password is the example password all the same.
        if (u.password is not None and u.password in SHIPPED_PASSWORDS
                or u.password_hash is not None
                and any(verify_password_hash(p, u.password_hash) for p in SHIPPED_PASSWORDS)):
            raise ConfigError(
                f"refusing to listen on {host}: user {u.username!r} still has the example password "
                "from config.json. Choose another one, make a hash with 'python3 imgproxy.py hash-password' "
                "and put it in users[].password_hash (removing 'password'), or listen on 127.0.0.1 behind a proxy.")


# ==== errors ====================================================================

class ApiError(web.HTTPException):
    """An HTTP error carrying the JSON error object {"error", "code"} (README, openapi.json)."""

    def __init__(self, status: int, body: str, headers: Optional[dict] = None):
        # aiohttp internals (checked against 3.9.5 and 3.14.5): HTTPException.__init__
        # takes the status from self.status_code, a class attribute meant for the
        # fixed subclasses; an instance value lets one class carry any status.
        self.status_code = status
        super().__init__(text=body, content_type="application/json", headers=headers)


def json_error(status: int, message: str, code: str, headers: Optional[dict] = None) -> web.HTTPException:
    """An exception that renders as the JSON error object; raise it from handlers."""
    return ApiError(status, json.dumps({"error": message, "code": code}, ensure_ascii=False), headers)


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 408: "timeout", 411: "length_required",
                 412: "precondition_failed", 413: "too_large", 415: "unsupported_image",
                 416: "range_not_satisfiable", 417: "expectation_failed", 429: "rate_limited",
                 431: "headers_too_large", 500: "internal_error", 503: "unavailable",
                 507: "insufficient_storage"}


class StoreUnavailable(Exception):
    """The object store could not be reached, timed out or failed (5xx, refused us):
    a 503 with Retry-After for the client, nothing lost. The message is one line
    and never holds credentials."""


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached (a plain OSError while connecting, which
    asyncpg lets through): a 503 like asyncpg's own errors, never mistaken for
    a client that went away. The message never holds the URL."""


class UploadRejected(Exception):
    """Raised by the inspection and streaming steps; becomes a 4xx for the uploader."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def __reduce__(self):  # raised in a render process, re-raised in the server
        return type(self), (self.status, self.code, self.message)


def is_database_outage(exc: BaseException) -> bool:
    """PostgreSQL unreachable, restarting or out of connections (asyncpg's errors
    are recognised by module, so the driver is never imported to check)."""
    return type(exc).__module__.startswith("asyncpg") or isinstance(
        exc, (ConnectionRefusedError, asyncio.TimeoutError, DatabaseUnavailable))


# ==== storage ===================================================================

def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Storage:
    """Paths under data_dir. Every path is built from a digest, never from user text."""

    def __init__(self, data_dir: Path):
        self.root = Path(data_dir)
        self.uploads = self.root / "uploads"
        self.tmp = self.root / "tmp"
        self.variants = self.root / "variants"
        self.db_path = self.root / "images.db"
        self.cleanup_lock = self.root / "cleanup.lock"
        self._uploads_dir = str(self.uploads)
        self._made_dirs: set[str] = set()
        # Names of the tmp/ files this process is writing. A sweep here skips
        # them rather than test their lock: on NFS, flock is a POSIX lock, one
        # process's locks do not conflict with each other, and closing any
        # descriptor of the file would drop the writer's lock too.
        self.in_flight: set[str] = set()

    def prepare(self) -> None:
        for d in (self.root, self.uploads, self.tmp, self.variants):
            d.mkdir(parents=True, exist_ok=True)

    def image_path(self, md5: str, ext: str) -> Path:
        return self.uploads / md5[0:2] / md5[2:4] / f"{md5}.{ext}"

    def variant_path(self, md5: str, size: str, fmt: str) -> Path:
        return self.variants / md5[0:2] / md5[2:4] / f"{md5}-{size}.{fmt}"

    def remove_variants(self, md5: str) -> int:
        """Unlink every variant of one image (blocking); returns the bytes freed.

        Plain strings and os calls: the expiry pass calls this for every
        expired image from the writer thread, where Path objects cost GIL time.
        """
        freed = 0
        with contextlib.suppress(FileNotFoundError):
            with os.scandir(f"{self.variants}/{md5[0:2]}/{md5[2:4]}") as entries:
                for entry in entries:
                    if entry.name.startswith(md5 + "-"):
                        with contextlib.suppress(FileNotFoundError):
                            freed += entry.stat().st_size
                            os.unlink(entry.path)
        return freed

    def new_tmp_path(self, kind: str = "upload") -> Path:
        return self.tmp / f"{kind}-{secrets.token_hex(8)}.part"

    def create_tmp(self, kind: str = "upload") -> tuple[Path, int]:
        """A new tmp/ file, open read-write and flock()ed until its descriptor closes.

        The lock is what tells a live file from a crash leftover: the kernel
        drops it when the writer dies, even by kill -9, and other processes
        (workers, cleanup.py, machines sharing the folder over NFS, where
        Linux emulates flock with byte-range locks) test it before removing.
        A leftover sweep can win the race between our create and our lock; it
        unlinks under the lock, so a file with no links left is one to redo.
        """
        while True:
            path = self.new_tmp_path(kind)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink > 0:
                    self.in_flight.add(path.name)
                    return path, fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release_tmp(self, path: Path, fd: int) -> None:
        """Drop the lock create_tmp took (closing its descriptor): after publish or removal."""
        os.close(fd)
        self.in_flight.discard(path.name)

    def place(self, md5: str, ext: str, tmp_path: Path) -> str:
        """Move a validated upload from tmp/ to its final path (blocking; run in a thread).

        The rename is atomic on one file system, so a reader or a crash never
        sees a half-written image.
        """
        # Plain strings and bare syscalls: this runs in the database writer
        # thread for every new image, where pathlib objects were most of its cost.
        leaf = f"{self._uploads_dir}/{md5[0:2]}/{md5[2:4]}"
        final = f"{leaf}/{md5}.{ext}"
        if leaf not in self._made_dirs:
            self._make_leaf(leaf)
        try:
            os.replace(tmp_path, final)
        except FileNotFoundError:
            # The leaf folder went away (a reset moved uploads/ aside): remake it.
            self._made_dirs.discard(leaf)
            self._make_leaf(leaf)
            os.replace(tmp_path, final)
        return final

    def _make_leaf(self, leaf: str) -> None:
        try:
            os.mkdir(leaf)
        except FileExistsError:
            pass
        except FileNotFoundError:  # its parent is new too (or uploads/ itself went away)
            os.makedirs(leaf, exist_ok=True)
        if len(self._made_dirs) < 70_000:  # at most 65,536 leaf folders exist
            self._made_dirs.add(leaf)


def image_key(md5: str, ext: str) -> str:
    """An image's object key in the bucket: the file layout's relative path."""
    return f"{md5[0:2]}/{md5[2:4]}/{md5}.{ext}"


IMAGE_KEY_RE = re.compile(r"([0-9a-f]{2})/([0-9a-f]{2})/(\1\2[0-9a-f]{28})\.([a-z0-9]{2,5})")


@dataclasses.dataclass
class RemoteObject:
    """An image kept in the object store, served in place of a local file.

    `local` is where this node keeps its own copy of a large original (beside
    its variants, under the same disk budget and eviction): once it is there,
    the image is sent from it like a file. The bytes at an md5 never change,
    so a copy cannot go stale; a deleted image is refused before any copy is
    looked at, since serving always starts from its row.
    """
    blobs: Any  # S3Blobs
    key: str
    local: Optional[Path] = None
    copying: Optional[asyncio.Future] = dataclasses.field(default=None, compare=False, repr=False)

    def open_local(self) -> Optional[io.BufferedReader]:
        """The local copy, opened (blocking), or None: open first, so an eviction cannot slip in between."""
        if self.local is None:
            return None
        try:
            return open(self.local, "rb")
        except FileNotFoundError:
            return None


def _unlink_quietly(path: Optional[Path]) -> int:
    """Remove a file if present; returns the bytes freed."""
    if path is None:
        return 0
    try:
        size = path.stat().st_size
        path.unlink()
        return size
    except FileNotFoundError:
        return 0


def sweep_dead_temp_files(storage: Storage, now: float, dry_run: bool = False) -> list[tuple[Path, int]]:
    """Remove (or list) what dead processes left in tmp/: (path, bytes) of each.

    A `.part` file goes as soon as no process holds its lock (see
    Storage.create_tmp), however young; anything else (SQLite's journal of a
    snapshot, a stray file) once unlocked and untouched for TMP_MAX_AGE.
    Blocking: run in a thread.
    """
    dead = []
    try:
        entries = list(os.scandir(storage.tmp))
    except FileNotFoundError:
        return dead
    for entry in entries:
        try:
            if entry.name in storage.in_flight or not entry.is_file(follow_symlinks=False):
                continue
            if not entry.name.endswith(".part") and now - entry.stat().st_mtime <= TMP_MAX_AGE:
                continue
            fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live writer holds it
            continue
        try:
            size = os.fstat(fd).st_size
            if not dry_run:
                os.unlink(entry.path)  # under the lock: a writer racing its create sees no links
            dead.append((Path(entry.path), size))
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    return dead


class UploadSink:
    """Receives an upload's bytes: hashes them and writes them to a tmp/ file.

    Every FLUSH_BYTES the data goes to the file through a worker thread, one
    write in flight at a time, so hashing and disk work overlap with reading
    the network. An upload smaller than that is written once, by complete(),
    and its bytes are also handed to inspection so it need not read them back.
    `observer`, if given, sees every piece in order (a streaming check). It
    then runs with the file write in a second worker thread, beside the one
    that hashes the same piece: hashlib, zlib and file writes release the GIL
    on large buffers, so with two cores the check costs the upload almost no
    time of its own, and the MD5, as costly as all the rest, sets the pace.
    """

    def __init__(self, storage: Storage, limit: int,
                 observer: Optional[Callable[[bytes | bytearray], None]] = None):
        self.storage = storage
        self.limit = limit
        self.observer = observer
        self.size = 0
        self.md5 = hashlib.md5()
        # Received pieces as they came (no copy on the event loop), and their bytes.
        self.pieces: list[bytes] = []
        self.buffered = 0
        self.tmp_path: Optional[Path] = None
        self.tmp_name: Optional[str] = None  # listed in storage.in_flight until release()
        self._file: Optional[io.BufferedWriter] = None
        self._pending: Optional[asyncio.Future] = None

    async def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise UploadRejected(413, "too_large",
                                 f"file is larger than the {self.limit / 1048576:g} MB upload limit")
        self.pieces.append(chunk if type(chunk) is bytes else bytes(chunk))  # only immutable bytes are shared with threads
        self.buffered += len(chunk)
        if self.buffered >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        data, self.pieces, self.buffered = self.pieces, [], 0
        if self._pending is not None:
            await self._pending
        loop = asyncio.get_running_loop()
        if self.observer is None:
            self._pending = loop.run_in_executor(None, self._hash_and_write, data)
        else:
            self._pending = asyncio.gather(loop.run_in_executor(None, self._hash, data),
                                           loop.run_in_executor(None, self._write_and_observe, data))

    def _hash(self, data: list[bytes]) -> None:
        for piece in data:
            self.md5.update(piece)

    def _write(self, data: list[bytes]) -> None:
        if self._file is None:
            self.tmp_path, fd = self.storage.create_tmp()
            self.tmp_name = self.tmp_path.name
            self._file = open(fd, "wb")
        for piece in data:
            self._file.write(piece)

    def _hash_and_write(self, data: list[bytes]) -> None:
        self._hash(data)
        self._write(data)

    def _write_and_observe(self, data: list[bytes]) -> None:
        self._write(data)
        for piece in data:
            self.observer(piece)

    async def drain(self) -> None:
        """Wait for the write in flight, if any."""
        if self._pending is not None:
            await self._pending
            self._pending = None

    def complete(self) -> tuple[str, Optional[bytes]]:
        """Blocking (worker thread, after drain()): everything on disk under tmp/.

        Returns (md5 hex, the bytes when the upload was small enough to have
        stayed in memory, so inspection need not read them back).
        """
        rest, self.pieces, self.buffered = self.pieces, [], 0
        small = b"".join(rest) if self._file is None else None
        if small is not None:
            rest = [small]  # one piece: hashed and checked at once
        self._hash_and_write(rest)
        if self.observer is not None:
            for piece in rest:
                self.observer(piece)
        self._file.flush()  # stays open, and locked, until published: see release()
        return self.md5.hexdigest(), small

    def release(self) -> None:
        """Close the tmp/ file (blocking), dropping its lock; after publish or discard."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tmp_name is not None:
            self.storage.in_flight.discard(self.tmp_name)
            self.tmp_name = None

    async def discard(self) -> None:
        if self._pending is not None:
            with contextlib.suppress(Exception):
                await self._pending
        if self._file is not None:
            f, path = self._file, self.tmp_path
            self._file = self.tmp_path = None

            def drop() -> None:
                f.close()
                _unlink_quietly(path)

            await asyncio.to_thread(drop)


# ---- object storage (S3) -------------------------------------------------------

class _FileSlice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, read with pread.

    The request body of one PUT or one part: aiohttp reads it in small pieces
    in a worker thread as the socket takes them, and botocore rewinds it with
    seek(0) before a retry. pread keeps slices of one descriptor independent,
    so the parts of an upload go out in parallel from one open file.
    """

    def __init__(self, fd: int, offset: int, length: int):
        super().__init__()
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(base + pos, 0), self._length)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._pos
        size = left if size is None or size < 0 else min(size, left)
        data = os.pread(self._fd, size, self._offset + self._pos) if size > 0 else b""
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def content_md5(self) -> str:
        """Base64 MD5 of the slice, for Content-MD5 (blocking: run in a thread)."""
        digest = hashlib.md5()
        for at in range(0, self._length, CHUNK):
            digest.update(os.pread(self._fd, min(CHUNK, self._length - at), self._offset + at))
        return base64.b64encode(digest.digest()).decode("ascii")


def _content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def _quiet_lost_body_writes(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """aiohttp sends a request body in a task of its own. When the store drops the
    connection mid-request, botocore gets (and we report) the request's error, but
    that task's own is never retrieved, and asyncio would log it with a traceback:
    one debug line instead. Everything else goes to asyncio's default handler."""
    task = context.get("future")
    coro = task.get_coro() if isinstance(task, asyncio.Task) else None
    if (getattr(coro, "__qualname__", "").endswith("write_bytes")
            and isinstance(context.get("exception"), (OSError, ClientError))):
        log.debug("object store: a request body was cut off (%s)", context["exception"])
        return
    loop.default_exception_handler(context)


class S3Blobs:
    """Objects in an S3-compatible bucket, keys `{prefix}{relative path}`.

    Every method turns a store that cannot be reached, times out or fails
    into StoreUnavailable (one line, no credentials), an absent object into
    None or FileNotFoundError. aiobotocore is imported by open(), never at
    module import: the files backend needs nothing beyond aiohttp.
    """

    list_page_size = 1000   # keys per ListObjectsV2 page (the S3 maximum; tests make pages small)
    # One botocore session per process: it parses the S3 service model once, where a
    # session per client costs ~0.25 s of CPU for every open (each test, each cleanup.py run).
    _session: Any = None

    def __init__(self, endpoint: str, bucket: str, region: str = "us-east-1", prefix: str = "",
                 access_key_id: Optional[str] = None, secret_access_key: Optional[str] = None):
        if not re.fullmatch(r"https?://[^/@\s]+/?", endpoint):
            # No user:password@ either: the endpoint is printed in errors and logs.
            raise ConfigError(f"storage.endpoint: expected http(s)://host[:port], got {endpoint[:60]!r}")
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.region = region
        self.prefix = prefix
        self._access_key_id = access_key_id or os.environ.get("AWS_ACCESS_KEY_ID")
        self._secret_access_key = secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
        # Named in errors, so the operator knows which pair to fix (never their values).
        self._credentials_from = ("storage.access_key_id/secret_access_key" if access_key_id
                                  else "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" if self._access_key_id
                                  else "botocore's default chain (~/.aws, instance role)")
        self._client: Any = None
        self._exits: Optional[contextlib.AsyncExitStack] = None
        # Set by open(): botocore's exception classes, for the translation into ours.
        self._client_error: Any = None
        self._transport_errors: tuple = ()
        self._no_credentials: Any = None

    def __repr__(self) -> str:  # never the secret key
        return f"S3Blobs({self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(_quiet_lost_body_writes)
        try:
            import aiohttp
            import botocore.exceptions
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
        except ImportError:
            raise ConfigError('storage.backend is "s3" but aiobotocore is not installed: '
                              "pip install aiobotocore") from None
        self._client_error = botocore.exceptions.ClientError
        self._no_credentials = botocore.exceptions.NoCredentialsError
        self._transport_errors = (botocore.exceptions.BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError)
        config = AioConfig(
            # Path-style (endpoint/bucket/key): MinIO, SeaweedFS, Garage and a plain
            # IP endpoint have no per-bucket host names.
            s3={"addressing_style": "path",
                # UNSIGNED-PAYLOAD: over plain http botocore would hash every body on the
                # event loop to sign it; Content-MD5 (signed) still has the store verify it.
                "payload_signing_enabled": False},
            connect_timeout=S3_CONNECT_TIMEOUT, read_timeout=S3_READ_TIMEOUT,
            retries={"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
            max_pool_connections=S3_POOL_CONNECTIONS,
            # We send Content-MD5 ourselves; botocore's default CRC would read each
            # file body once more, on the event loop.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._exits = contextlib.AsyncExitStack()
        if S3Blobs._session is None:
            S3Blobs._session = get_session()
        self._client = await self._exits.enter_async_context(S3Blobs._session.create_client(
            "s3", endpoint_url=self.endpoint, region_name=self.region, config=config,
            aws_access_key_id=self._access_key_id, aws_secret_access_key=self._secret_access_key))
        try:
            await self._check_bucket()
        except BaseException:
            await self.close()
            raise

    async def _check_bucket(self) -> None:
        where = f'bucket "{self.bucket}" at {self.endpoint}'
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except self._no_credentials:
            raise ConfigError("storage.access_key_id: no credentials for the object store: set "
                              "storage.access_key_id and storage.secret_access_key, or "
                              "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        except self._client_error as e:
            status, code = self._status(e)
            if status == 404:
                raise ConfigError(f"storage.bucket: no {where} (create it first)") from None
            if status in (401, 403):
                raise ConfigError(f"storage.access_key_id: the object store refused the credentials from "
                                  f"{self._credentials_from} for {where} ({status} {code})") from None
            raise ConfigError(f"storage.bucket: the object store answered {status} {code} for {where}") from None
        except self._transport_errors as e:
            raise ConfigError(f"storage.endpoint: cannot reach the object store at {self.endpoint}: "
                              f"{self._reason(e)}") from None

    async def close(self) -> None:
        exits, self._exits, self._client = self._exits, None, None
        if exits is not None:
            await exits.aclose()

    # -- errors

    @staticmethod
    def _status(e) -> tuple[Optional[int], str]:
        response = getattr(e, "response", None) or {}
        return (response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                str(response.get("Error", {}).get("Code", "")))

    def _absent(self, e) -> bool:
        status, code = self._status(e)
        return status == 404 or code in ("NoSuchKey", "NotFound", "404")

    @staticmethod
    def _reason(e: BaseException) -> str:
        text = " ".join(str(e).split()) or type(e).__name__
        return text[:200]

    @contextlib.contextmanager
    def _translated(self, action: str):
        """Everything from the store other than success becomes StoreUnavailable.

        What the store answers with an error status (refused credentials, a
        full disk, 5xx after the retries) is as unavailable to our client as a
        store that is down: the next try may work, nothing was lost.
        """
        try:
            yield
        except self._client_error as e:
            status, code = self._status(e)
            raise StoreUnavailable(f"object store at {self.endpoint}: {action} failed "
                                   f"({status} {code})") from None
        except self._transport_errors as e:
            raise StoreUnavailable(f"object store at {self.endpoint} unavailable during {action}: "
                                   f"{self._reason(e)}") from None

    def _key(self, key: str) -> str:
        return self.prefix + key

    # -- writing. S3 makes an object visible only when its PUT (or the multipart
    # upload's Complete) succeeds: a reader never sees a partial image, and a
    # failed or cancelled upload leaves nothing (its parts are aborted below).

    async def put_bytes(self, key: str, data: bytes, content_type: str,
                        cache_control: Optional[str] = None) -> None:
        extra = {"CacheControl": cache_control} if cache_control else {}
        with self._translated(f"PUT {key}"):
            await self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                          ContentLength=len(data), ContentMD5=_content_md5(data),
                                          ContentType=content_type, **extra)

    async def put_file(self, key: str, path: Path, content_type: str,
                       cache_control: Optional[str] = None) -> None:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            extra = {"CacheControl": cache_control} if cache_control else {}
            if size <= S3_MULTIPART_THRESHOLD:
                body = _FileSlice(fd, 0, size)
                md5 = await asyncio.to_thread(body.content_md5)
                with self._translated(f"PUT {key}"):
                    await self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body,
                                                  ContentLength=size, ContentMD5=md5,
                                                  ContentType=content_type, **extra)
            else:
                await self._put_multipart(key, fd, size, content_type, extra)
        finally:
            os.close(fd)

    async def _put_multipart(self, key: str, fd: int, size: int, content_type: str, extra: dict) -> None:
        part_size = max(S3_PART_SIZE, -(-size // S3_MAX_PARTS))
        offsets = list(range(0, size, part_size))
        with self._translated(f"multipart upload of {key}"):
            upload_id = (await self._client.create_multipart_upload(
                Bucket=self.bucket, Key=self._key(key), ContentType=content_type, **extra))["UploadId"]
        etags: dict[int, str] = {}
        queue = iter(enumerate(offsets, start=1))  # shared by the workers; no await between next() and use

        async def send_parts() -> None:
            for number, offset in queue:
                body = _FileSlice(fd, offset, min(part_size, size - offset))
                md5 = await asyncio.to_thread(body.content_md5)
                answer = await self._client.upload_part(
                    Bucket=self.bucket, Key=self._key(key), UploadId=upload_id, PartNumber=number,
                    Body=body, ContentLength=body._length, ContentMD5=md5)
                etags[number] = answer["ETag"]

        workers = [asyncio.ensure_future(send_parts()) for _ in range(min(S3_PART_CONCURRENCY, len(offsets)))]
        try:
            with self._translated(f"multipart upload of {key}"):
                try:
                    await asyncio.gather(*workers)
                finally:
                    for worker in workers:  # one failed (or we were cancelled): stop the others
                        worker.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
                await self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self._key(key), UploadId=upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]}
                                               for n in range(1, len(offsets) + 1)]})
        except BaseException:
            # Shielded: a second cancellation (shutdown) must not leave the parts
            # stored and billed. After a Complete that did succeed this is a no-op.
            await asyncio.shield(self._abort_upload(key, upload_id))
            raise

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            await self._client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)
        except Exception as e:  # noqa: BLE001 - the upload's own error is the one to report
            log.warning("object store: could not abort the multipart upload of %s (%s); "
                        "a bucket lifecycle rule for incomplete uploads removes its parts", key, self._reason(e))

    # -- reading

    async def size(self, key: str) -> Optional[int]:
        with self._translated(f"HEAD {key}"):
            try:
                answer = await asyncio.wait_for(self._client.head_object(Bucket=self.bucket, Key=self._key(key)),
                                                S3_ANSWER_SECONDS)
            except self._client_error as e:
                if self._absent(e):
                    return None
                raise
        return answer["ContentLength"]

    async def _get(self, key: str, start: int = 0, end: Optional[int] = None) -> dict:
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad byte range {start}-{end} for {key}")
        extra = {}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end}"
        log.debug("object store: GET %s%s", key, f" ({extra['Range']})" if extra else "")
        with self._translated(f"GET {key}"):
            try:
                # Bounded as a whole: a store that accepts connections but has stopped
                # answering would otherwise hold a reader for three read timeouts.
                return await asyncio.wait_for(self._client.get_object(Bucket=self.bucket, Key=self._key(key),
                                                                      **extra), S3_ANSWER_SECONDS)
            except self._client_error as e:
                if self._absent(e):
                    raise FileNotFoundError(f"no object {key} in the store") from None
                if self._status(e)[0] == 416:
                    raise ValueError(f"byte range {extra['Range']} starts beyond the end of {key}") from None
                raise

    async def read(self, key: str) -> bytes:
        """The whole object (for small ones: variants, the database copy)."""
        answer = await self._get(key)
        with self._translated(f"GET {key}"):
            async with answer["Body"] as body:
                return await body.read()

    async def stream(self, key: str, start: int = 0, end: Optional[int] = None) -> AsyncIterator[bytes]:
        """Bytes start..end (inclusive; None: to the end) in pieces as they arrive.

        The GET goes out at the first iteration, so FileNotFoundError (and a
        ValueError for a start beyond the end) come from there: take the first
        piece before committing to a response. Close the iterator if you stop
        early (contextlib.aclosing) so its connection goes back to the pool.
        """
        answer = await self._get(key, start, end)
        body = answer["Body"]
        try:
            with self._translated(f"GET {key}"):
                while True:
                    chunk = await body.read(S3_STREAM_CHUNK)
                    if not chunk:
                        break
                    yield chunk
        finally:
            body.close()

    async def download(self, key: str, path: Path) -> None:
        """The object into a local file (written in FLUSH_BYTES batches by a worker
        thread); on failure the partial file is removed."""
        f = await asyncio.to_thread(open, path, "wb")
        try:
            batch: list[bytes] = []
            held = 0
            async with contextlib.aclosing(self.stream(key)) as pieces:
                async for chunk in pieces:
                    batch.append(chunk)
                    held += len(chunk)
                    if held >= FLUSH_BYTES:
                        await asyncio.to_thread(f.writelines, batch)
                        batch, held = [], 0
            await asyncio.to_thread(f.writelines, batch)
            await asyncio.to_thread(f.close)
        except BaseException:
            await asyncio.to_thread(f.close)
            await asyncio.to_thread(_unlink_quietly, Path(path))
            raise

    async def list(self, prefix: str = "") -> AsyncIterator[tuple[str, int, float]]:
        """(key relative to self.prefix, size, last modified as Unix seconds) of every
        object under prefix, all pages."""
        args = {"Bucket": self.bucket, "Prefix": self._key(prefix), "MaxKeys": self.list_page_size}
        cut = len(self.prefix)
        while True:
            with self._translated(f"LIST {prefix or '/'}"):
                page = await self._client.list_objects_v2(**args)
            for entry in page.get("Contents", ()):
                yield entry["Key"][cut:], entry["Size"], entry["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    async def unfinished_uploads(self) -> AsyncIterator[tuple[str, str, float]]:
        """(key relative to self.prefix, upload id, started as Unix seconds) of every
        multipart upload neither completed nor aborted: a node killed mid-upload
        leaves one, its parts stored (and billed) but no object."""
        args = {"Bucket": self.bucket, "Prefix": self.prefix, "MaxUploads": self.list_page_size}
        cut = len(self.prefix)
        while True:
            with self._translated("LIST unfinished uploads"):
                page = await self._client.list_multipart_uploads(**args)
            for upload in page.get("Uploads", ()):
                yield upload["Key"][cut:], upload["UploadId"], upload["Initiated"].timestamp()
            if not page.get("IsTruncated"):
                return
            args["KeyMarker"], args["UploadIdMarker"] = page.get("NextKeyMarker"), page.get("NextUploadIdMarker")

    # -- removing

    async def abort_unfinished(self, key: str, upload_id: str) -> None:
        """Drop an unfinished multipart upload's parts."""
        with self._translated(f"abort of the multipart upload of {key}"):
            try:
                await self._client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)
            except self._client_error as e:
                if self._status(e)[1] != "NoSuchUpload":   # finished or aborted meanwhile: fine
                    raise

    async def delete(self, keys: list[str]) -> None:
        """Remove the objects; keys that are already absent are fine."""
        for at in range(0, len(keys), S3_DELETE_BATCH):
            batch = [{"Key": self._key(key)} for key in keys[at:at + S3_DELETE_BATCH]]
            with self._translated(f"DELETE of {len(batch)} objects"):
                answer = await self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            failed = [e for e in answer.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if failed:
                raise StoreUnavailable(f"object store at {self.endpoint}: could not delete {len(failed)} "
                                       f"objects (first: {failed[0].get('Key')} {failed[0].get('Code')})")


# ==== database ==================================================================

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    md5          TEXT PRIMARY KEY,
    ext          TEXT NOT NULL,
    format       TEXT NOT NULL,
    mime         TEXT NOT NULL,
    name         TEXT NOT NULL,
    size         INTEGER NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    access_count INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL,
    expire_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_expire ON images(expire_at);
CREATE INDEX IF NOT EXISTS images_created ON images(created_at);
CREATE TABLE IF NOT EXISTS holds (
    md5      TEXT NOT NULL,
    username TEXT NOT NULL,
    held_at  REAL NOT NULL,
    PRIMARY KEY (md5, username)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS holds_user ON holds(username, held_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
IMAGE_COLUMNS = "md5, ext, format, mime, name, size, width, height, access_count, created_at, expire_at"
# App tokens, kept apart from the image tables: an older database gains this
# table on its next open and nothing else changes. Only the SHA-256 of a secret
# is stored; requests find their token by that digest through the unique index.
TOKENS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id           TEXT PRIMARY KEY,
    username     TEXT NOT NULL,
    name         TEXT NOT NULL,
    secret_sha256 BLOB NOT NULL UNIQUE,
    created_at   REAL NOT NULL,
    last_used_at REAL
);
CREATE INDEX IF NOT EXISTS tokens_user ON tokens(username, created_at);
"""
ROW_COLUMNS = IMAGE_COLUMNS + ", source_md5"  # what reads select (the column comes from add_source_md5)


def add_source_md5(db: sqlite3.Connection) -> None:
    """Schema upgrade: images.source_md5, the MD5 of the bytes as uploaded when
    stripping or conversion changed them. Older databases gain the column (their
    rows keep NULL); several processes starting at once upgrade it once."""
    def present() -> bool:
        return any(col[1] == "source_md5" for col in db.execute("PRAGMA table_info(images)"))

    if present():
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if not present():
            db.execute("ALTER TABLE images ADD COLUMN source_md5 TEXT")
            db.execute("CREATE INDEX IF NOT EXISTS images_source ON images(source_md5)")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            db.execute("ROLLBACK")
        raise


def open_write_db(path: Path) -> sqlite3.Connection:
    """The writer's connection (blocking: opened in the writer thread); creates the schema."""
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=15)
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout = 15000")
        # Switching to WAL takes an exclusive lock without waiting on the busy
        # timeout: two processes creating the database at once retry here.
        for attempt in range(50):
            try:
                db.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(SCHEMA)
        db.executescript(TOKENS_SCHEMA)
        db.executescript(CLAIMS_SCHEMA)
        add_source_md5(db)
    except BaseException:
        db.close()
        raise
    return db


def _data_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA data_version").fetchone()[0]


async def open_db(path: Path) -> aiosqlite.Connection:
    """A reading connection (the schema exists: the writer made it)."""
    db = await aiosqlite.connect(str(path), isolation_level=None)
    try:
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA busy_timeout = 15000")
    except BaseException:
        # aiosqlite's worker thread is not a daemon: an unclosed connection
        # would keep the process alive after the error (e.g. a corrupt file).
        await db.close()
        raise
    return db


CLAIMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (md5 TEXT PRIMARY KEY, claimed_at REAL NOT NULL);
"""


# ---- PostgreSQL (database.url) -------------------------------------------------
# The same tables in PostgreSQL's types, and the same transaction functions:
# every write transaction first takes one advisory lock, so writes are
# serialised across all processes on all machines exactly as SQLite serialises
# them in one file, and every invariant of the single-node store holds as is.
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    md5          TEXT PRIMARY KEY,
    ext          TEXT NOT NULL,
    format       TEXT NOT NULL,
    mime         TEXT NOT NULL,
    name         TEXT NOT NULL,
    size         BIGINT NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    access_count BIGINT NOT NULL DEFAULT 0,
    created_at   DOUBLE PRECISION NOT NULL,
    expire_at    DOUBLE PRECISION NOT NULL,
    source_md5   TEXT
);
ALTER TABLE images ADD COLUMN IF NOT EXISTS source_md5 TEXT;
CREATE INDEX IF NOT EXISTS images_expire ON images(expire_at);
CREATE INDEX IF NOT EXISTS images_created ON images(created_at);
CREATE INDEX IF NOT EXISTS images_source ON images(source_md5);
CREATE TABLE IF NOT EXISTS holds (
    md5      TEXT NOT NULL,
    username TEXT NOT NULL,
    held_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (md5, username)
);
CREATE INDEX IF NOT EXISTS holds_user ON holds(username, held_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id            TEXT PRIMARY KEY,
    username      TEXT NOT NULL,
    name          TEXT NOT NULL,
    secret_sha256 BYTEA NOT NULL UNIQUE,
    created_at    DOUBLE PRECISION NOT NULL,
    last_used_at  DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS tokens_user ON tokens(username, created_at);
CREATE TABLE IF NOT EXISTS claims (md5 TEXT PRIMARY KEY, claimed_at DOUBLE PRECISION NOT NULL);
"""
# What GET /api/db copies out of PostgreSQL into an SQLite file (claims are in-flight state).
EXPORT_TABLES = (("images", ROW_COLUMNS), ("holds", "md5, username, held_at"), ("meta", "key, value"),
                 ("tokens", "id, username, name, secret_sha256, created_at, last_used_at"))


@functools.lru_cache(maxsize=256)
def pg_sql(sql: str) -> str:
    """Our SQLite statements in PostgreSQL's dialect: numbered parameters, and
    GREATEST for SQLite's two-argument MAX (the only other difference we use)."""
    sql = sql.replace("MAX(COALESCE(", "GREATEST(COALESCE(")
    parts = sql.split("?")
    return parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))


class PgCursor:
    """The part of an sqlite3 cursor the store's code uses, over fetched rows
    (asyncpg's records answer row["name"], row[0] and keys() like sqlite3.Row)."""

    __slots__ = ("rows", "rowcount")

    def __init__(self, rows: list, rowcount: int):
        self.rows, self.rowcount = rows, rowcount

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list:
        return self.rows

    def __iter__(self):
        return iter(self.rows)


async def pg_run(conn: Any, sql: str, params: Iterable[Any] = ()) -> PgCursor:
    sql = pg_sql(sql)
    head = sql.lstrip()[:6].upper()
    if head == "SELECT" or " RETURNING " in sql.upper():
        rows = await conn.fetch(sql, *params)
        return PgCursor(rows, len(rows))
    status = await conn.execute(sql, *params)  # e.g. "DELETE 3"
    count = status.rpartition(" ")[2]
    return PgCursor([], int(count) if count.isdigit() else -1)


class PgTxnConnection:
    """Txn.db under PostgreSQL. Transaction functions are plain blocking code
    run in the writer thread; each statement is handed to the event loop, where
    asyncpg runs it on the transaction's connection, and the thread waits."""

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop):
        self.conn, self.loop = conn, loop

    def execute(self, sql: str, params: Iterable[Any] = ()) -> PgCursor:
        return asyncio.run_coroutine_threadsafe(pg_run(self.conn, sql, tuple(params)), self.loop).result()

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        asyncio.run_coroutine_threadsafe(self.conn.executemany(pg_sql(sql), list(rows)), self.loop).result()


@contextlib.asynccontextmanager
async def pg_connection(pool: Any) -> AsyncIterator[Any]:
    """pool.acquire() for requests. Opening a connection to a server that is
    stopping or gone fails with whatever the socket says (a reset, not only a
    refusal): that is a database outage, whichever OSError it is."""
    try:
        conn = await pool.acquire()
    except OSError as exc:
        raise DatabaseUnavailable(pg_error_text(exc)) from None
    try:
        yield conn
    finally:
        await pool.release(conn)


class _PgQuery:
    def __init__(self, pool: Any, sql: str, params: Iterable[Any]):
        self.pool, self.sql, self.params = pool, sql, tuple(params)
        self.cursor: Optional[PgCursor] = None

    async def __aenter__(self) -> "_PgQuery":
        async with pg_connection(self.pool) as conn:
            self.cursor = await pg_run(conn, self.sql, self.params)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.cursor = None

    async def fetchone(self) -> Any:
        return self.cursor.fetchone()

    async def fetchall(self) -> list:
        return self.cursor.fetchall()


class PgReader:
    """ImageStore.db_read under PostgreSQL: aiosqlite's `async with db.execute()`
    shape over a connection pool, so the reading code is written once."""

    def __init__(self, pool: Any):
        self.pool = pool

    def execute(self, sql: str, params: Iterable[Any] = ()) -> _PgQuery:
        return _PgQuery(self.pool, sql, params)

    async def close(self) -> None:
        await self.pool.close()


async def _pg_no_reset(_conn: Any) -> None:
    """Pool connections carry no session state to undo (see ImageStore._open_pg)."""


def pg_error_text(exc: BaseException) -> str:
    """An error of the driver or the network, without the URL (it holds the password)."""
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]


class PgPoolNoise(logging.Filter):
    """asyncpg's pool logs a warning with a traceback at every failed reconnection
    while PostgreSQL is down (several a second). Clients get 503s meanwhile; the
    log gets one line, at most one a minute, naming the error."""

    def __init__(self) -> None:
        super().__init__()
        self.last = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg, record.args = "PostgreSQL is unreachable (%s); the pool keeps trying", (
                pg_error_text(record.exc_info[1]),)
            record.exc_info, record.exc_text = None, None
        now = time.monotonic()
        if now - self.last < 60.0:
            return False
        self.last = now
        return True


@dataclasses.dataclass
class ServedImage:
    """What serving one image needs, kept in memory so a hit costs no I/O."""
    md5: str
    ext: str
    mime: str
    size: int
    expire_at: float
    path: Path
    body: Optional[bytes] = None
    created_at: Optional[float] = None  # Last-Modified: the bytes at an md5 never change


class Txn:
    """What a write function gets: the writer connection, and a flag to raise
    when it changed or removed rows that other processes may have cached."""

    __slots__ = ("db", "changed", "loop")

    def __init__(self, db: sqlite3.Connection | PgTxnConnection, loop: asyncio.AbstractEventLoop):
        self.db = db
        self.changed = False
        self.loop = loop

    def wait(self, coro: Awaitable[Any]) -> Any:
        """Run a coroutine (an object-store call) on the event loop and wait for
        it: for what must happen inside the transaction, like a blob's removal."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def row(self, md5: str) -> Optional[sqlite3.Row]:
        return self.db.execute(f"SELECT {ROW_COLUMNS} FROM images WHERE md5 = ?", (md5,)).fetchone()

    def row_any(self, digest: str) -> Optional[sqlite3.Row]:
        """The image named by either digest: its own md5 first, else the upload it came from."""
        return self.row(digest) or self.db.execute(
            f"SELECT {ROW_COLUMNS} FROM images WHERE source_md5 = ? LIMIT 1", (digest,)).fetchone()

    def hold(self, md5: str, user: str, now: float) -> None:
        self.db.execute("INSERT INTO holds (md5, username, held_at) VALUES (?, ?, ?) "
                        "ON CONFLICT (md5, username) DO UPDATE SET held_at = excluded.held_at",
                        (md5, user, now))

    def delete_rows(self, md5s: list[str], expired: bool = False) -> None:
        # Rows removed because they expired need no announcement: every cache
        # already refuses an entry past its expire_at, and expire_at only grows.
        self.changed = self.changed or not expired
        marks = ",".join("?" * len(md5s))
        self.db.execute(f"DELETE FROM holds WHERE md5 IN ({marks})", md5s)
        self.db.execute(f"DELETE FROM images WHERE md5 IN ({marks})", md5s)


class ImageStore:
    """The images: database rows, files, expiry, holds and the serving cache.

    The handlers, the cleanup schedule and cleanup.py all go through this one
    object. Reads use an aiosqlite connection. Every write is one function run
    whole in a single writer thread, inside `BEGIN IMMEDIATE` on its own
    connection: one hop per transaction however many statements it has, writes
    serialised in this process by the thread and across processes (cleanup.py,
    workers) by SQLite's lock. Files are renamed into uploads/ or unlinked only
    inside such a transaction, so no writer ever sees a row without its file.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self.storage = Storage(config.server.data_dir)
        self.db_read: Optional[aiosqlite.Connection] = None
        self._writer: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._wdb: Optional[sqlite3.Connection] = None
        self.pending_counts: collections.Counter[str] = collections.Counter()
        self.pending_token_use: dict[str, float] = {}
        self.served: collections.OrderedDict[str, ServedImage] = collections.OrderedDict()
        self.body_bytes = 0
        self.body_budget = int(config.server.cache_mb * 1024 * 1024)
        self._forget_epoch = 0
        self._data_version: Optional[int] = None
        self._generation: Optional[mmap.mmap] = None
        self._generation_fd = -1
        self._generation_seen = b""
        self.decode_slots = asyncio.Semaphore(max(1, min(4, os.cpu_count() or 1)))
        self.cache_hits = self.cache_misses = 0  # for /metrics; an int add is all a request pays
        # PostgreSQL and the object store, when configured (see their chapters).
        self.pool: Any = None                 # asyncpg pool
        self.blobs: Optional[S3Blobs] = None
        self.node_id = secrets.token_hex(8)   # names this process's change notices
        self.coherent = True                  # False while the change feed is down: nothing is cached
        self._listener: Any = None
        self._listen_task: Optional[asyncio.Task] = None
        self._copying: dict[str, asyncio.Task] = {}  # object key -> its local copy being fetched

    # -- life cycle --
    async def open(self, listen: bool = True) -> "ImageStore":
        """Open the database and the object store; `listen` follows other
        nodes' changes (PostgreSQL), which one-off commands do without."""
        await asyncio.to_thread(self.storage.prepare)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="imgproxy-writer")
        try:
            await asyncio.to_thread(self._open_generation)
            if self.config.database.url is not None:
                await self._open_pg(listen)
            else:
                self._wdb = await asyncio.get_running_loop().run_in_executor(
                    self._writer, open_write_db, self.storage.db_path)
                self.db_read = await open_db(self.storage.db_path)
                self._data_version = await self._in_writer(_data_version)
            if self.config.storage.backend == "s3":
                st = self.config.storage
                self.blobs = S3Blobs(st.endpoint, st.bucket, st.region, st.prefix,
                                     st.access_key_id, st.secret_access_key)
                await self.blobs.open()
        except BaseException:
            await self.close()
            raise
        return self

    async def _open_pg(self, listen: bool) -> None:
        import asyncpg  # optional: only with database.url (checked when the config was read)

        pool_log = logging.getLogger("asyncpg.pool")
        if not any(isinstance(f, PgPoolNoise) for f in pool_log.filters):
            pool_log.addFilter(PgPoolNoise())
        url = self.config.database.url
        try:
            # reset: the pool's default runs four statements per release to undo
            # session state (locks, LISTEN, settings); pool connections never take
            # any: transactions close with their block, and the cleanup lock and
            # the change feed have connections of their own.
            self.pool = await asyncpg.create_pool(url, min_size=1, max_size=PG_POOL_SIZE,
                                                  command_timeout=PG_COMMAND_SECONDS, reset=_pg_no_reset)
            async with self.pool.acquire() as conn:
                async with conn.transaction():
                    # Nodes starting together would race on CREATE ... IF NOT EXISTS.
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", PG_LOCK_SCHEMA)
                    await conn.execute(PG_SCHEMA)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ConfigError(f"database.url: cannot use the PostgreSQL database: {pg_error_text(exc)}") from None
        self.db_read = PgReader(self.pool)
        if listen:
            await self._listen()
            self._listen_task = asyncio.create_task(self._keep_listening(), name="imgproxy-pg-listen")

    # -- change feed between nodes (PostgreSQL) --
    # A write transaction that changed or removed rows others may have cached
    # sends pg_notify inside the transaction, so the notice leaves at commit. Every
    # process listens on its own connection and drops its serving cache on a
    # notice from anyone else. While that connection is down nothing is cached
    # (every request reads the database), so a missed notice serves nothing stale.
    async def _listen(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.config.database.url, timeout=PG_COMMAND_SECONDS)
        await conn.add_listener(PG_CHANNEL, self._on_notice)
        conn.add_termination_listener(self._on_listener_lost)
        self._listener = conn
        self.forget_all()  # whatever changed while we were not listening
        self.coherent = True

    def _on_notice(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload != self.node_id:
            self.forget_all()

    def _on_listener_lost(self, _conn: Any) -> None:
        self.coherent = False
        self.forget_all()
        self._listener = None

    async def _keep_listening(self) -> None:
        while True:
            await asyncio.sleep(PG_LISTEN_CHECK_SECONDS)
            if self._listener is not None and not self._listener.is_closed():
                continue
            self.coherent = False
            self.forget_all()
            try:
                await self._listen()
                log.info("following other nodes' changes again")
            except Exception as exc:  # noqa: BLE001 - retried every second; serving goes on uncached
                log.warning("change feed from PostgreSQL is down (%s); serving without a cache",
                            pg_error_text(exc))

    async def close(self) -> None:
        if self._wdb is not None or self.pool is not None:
            with contextlib.suppress(Exception):
                await self.flush_counts()
            with contextlib.suppress(Exception):
                await self.flush_token_use()
        for task in list(self._copying.values()):
            task.cancel()
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(BaseException):
                await self._listen_task
            self._listen_task = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=2)
            self._listener = None
        if self.blobs is not None:
            with contextlib.suppress(Exception):
                await self.blobs.close()
            self.blobs = None
        if self.db_read is not None:
            with contextlib.suppress(Exception):
                await self.db_read.close()
            self.db_read = None
        elif self.pool is not None:
            with contextlib.suppress(Exception):
                await self.pool.close()
        self.pool = None
        if self._writer is not None:
            if self._wdb is not None:
                with contextlib.suppress(Exception):
                    await self._in_writer(lambda db: db.close())
            self._writer.shutdown(wait=False)
            self._writer, self._wdb = None, None
        if self._generation is not None:
            self._generation.close()
            os.close(self._generation_fd)
            self._generation, self._generation_fd = None, -1

    async def _in_writer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(writer connection, *args) in the writer thread, no transaction."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, lambda: fn(self._wdb, *args))

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(Txn, *args) as one write transaction in the writer thread."""
        loop = asyncio.get_running_loop()

        def run() -> tuple[Any, bool]:
            db = self._wdb
            txn = Txn(db, loop)
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(txn, *args)
            except BaseException:
                with contextlib.suppress(Exception):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result, txn.changed

        if self._writer is None:
            raise RuntimeError("the image store is closed")
        if self.pool is not None:
            # Shielded: a cancelled request must not roll the transaction back
            # under the writer thread's feet; it finishes, as it does on SQLite.
            result, changed = await asyncio.shield(asyncio.ensure_future(self._pg_write(fn, args)))
        else:
            result, changed = await asyncio.get_running_loop().run_in_executor(self._writer, run)
        if changed:
            self._announce_change()
        return result

    async def _pg_write(self, fn: Callable[..., Any], args: tuple) -> tuple[Any, bool]:
        loop = asyncio.get_running_loop()
        async with pg_connection(self.pool) as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PG_LOCK_WRITE)
                txn = Txn(PgTxnConnection(conn, loop), loop)
                result = await loop.run_in_executor(self._writer, lambda: fn(txn, *args))
                if txn.changed:
                    await conn.execute("SELECT pg_notify($1, $2)", PG_CHANNEL, self.node_id)
        return result, txn.changed

    # -- cache coherence between processes --
    # Workers and cleanup.py share `cache.gen`, 8 bytes in a shared mapping.
    # After committing a change to or removal of rows, a writer puts a fresh
    # random value there; a server that finds a value it has not seen drops
    # its serving cache. A process that cached a row before the commit saw the
    # old value, so it always notices; the check is one memory read a request.
    def _open_generation(self) -> None:
        fd = os.open(self.storage.root / "cache.gen", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._generation = mmap.mmap(fd, 8)
        except BaseException:
            os.close(fd)
            raise
        self._generation_fd = fd
        self._generation_seen = self._generation[:8]

    def check_generation(self) -> None:
        if self._generation is not None and self._generation[:8] != self._generation_seen:
            self._generation_seen = self._generation[:8]
            self.forget_all()

    def _announce_change(self) -> None:
        if self._generation is None:
            return
        fcntl.flock(self._generation_fd, fcntl.LOCK_EX)  # held for microseconds
        try:
            if self._generation[:8] != self._generation_seen:
                self.forget_all()  # another process changed things too
            fresh = secrets.token_bytes(8)
            self._generation[:8] = fresh
            self._generation_seen = fresh
        finally:
            fcntl.flock(self._generation_fd, fcntl.LOCK_UN)

    # -- reading --
    def info(self, row: sqlite3.Row, status: Optional[str] = None) -> dict:
        md5 = row["md5"]
        public = self.config.storage.public_base_url
        out = {
            "md5": md5,
            "url": f"{public}/{self.config.storage.prefix}{image_key(md5, row['ext'])}" if public
            else f"{self.config.base_url}/i/{md5}.{row['ext']}",
            "name": row["name"],
            "size": row["size"],
            "width": row["width"],
            "height": row["height"],
            "format": row["format"],
            "mime": row["mime"],
            "access_count": row["access_count"] + self.pending_counts.get(md5, 0),
            "created_at": iso(row["created_at"]),
            "expire_at": iso(row["expire_at"]),
        }
        if "source_md5" in row.keys() and row["source_md5"] and row["source_md5"] != md5:
            out["source_md5"] = row["source_md5"]
        if status:
            out["status"] = status
        return out

    async def get_row(self, md5: str) -> Optional[sqlite3.Row]:
        async with self.db_read.execute(f"SELECT {ROW_COLUMNS} FROM images WHERE md5 = ?", (md5,)) as cur:
            return await cur.fetchone()

    async def get_row_any(self, digest: str) -> Optional[sqlite3.Row]:
        """For the API's {md5} slots, which also take a source_md5; never for /i/."""
        row = await self.get_row(digest)
        if row is None:
            async with self.db_read.execute(f"SELECT {ROW_COLUMNS} FROM images WHERE source_md5 = ? "
                                            "LIMIT 1", (digest,)) as cur:
                row = await cur.fetchone()
        return row

    async def lookup(self, md5: str) -> Optional[dict]:
        row = await self.get_row_any(md5)
        if row is None or row["expire_at"] <= self.clock():
            return None
        return self.info(row)

    async def list_images(self, username: Optional[str], limit: int, offset: int) -> tuple[list[dict], int]:
        now = self.clock()
        db = self.db_read
        if username is None:
            where, args = "WHERE expire_at > ?", [now]
            sql = f"SELECT {ROW_COLUMNS} FROM images {where} ORDER BY created_at DESC, md5 LIMIT ? OFFSET ?"
            count_sql = f"SELECT COUNT(*) FROM images {where}"
        else:
            cols = ", ".join(f"i.{c.strip()}" for c in ROW_COLUMNS.split(","))
            where, args = "WHERE h.username = ? AND i.expire_at > ?", [username, now]
            sql = (f"SELECT {cols} FROM holds h JOIN images i ON i.md5 = h.md5 {where} "
                   "ORDER BY h.held_at DESC, i.md5 LIMIT ? OFFSET ?")
            count_sql = f"SELECT COUNT(*) FROM holds h JOIN images i ON i.md5 = h.md5 {where}"
        async with db.execute(sql, (*args, limit, offset)) as cur:
            rows = await cur.fetchall()
        async with db.execute(count_sql, args) as cur:
            total = (await cur.fetchone())[0]
        return [self.info(r) for r in rows], total

    # -- writing --
    async def publish(self, user: str, md5: str, facts: "ImageFacts", name: str,
                      tmp_path: Path, source_md5: Optional[str] = None) -> tuple[dict, bool]:
        """Store an inspected upload or renew the copy we have; returns (info, created).

        `source_md5` is the MD5 of the bytes as uploaded when stripping changed
        them: recorded on a new row (or on an old row that has none), and
        reported in this answer.
        """
        if source_md5 == md5:
            source_md5 = None
        if self.blobs is not None:
            return await self._publish_object(user, md5, facts, name, tmp_path, source_md5)
        ext = FORMATS[facts.format][0]
        storage = self.storage

        def txn_publish(txn: Txn) -> tuple[sqlite3.Row, bool, bool]:
            row = txn.row(md5)
            # New bytes, or a row whose file went missing: (re)place the file
            # before the row commits, so the row never points at nothing.
            fresh = row is None or row["ext"] != ext or not storage.image_path(md5, ext).is_file()
            if fresh:
                storage.place(md5, ext, tmp_path)
            created = self._record_upload(txn, row, fresh, user, md5, facts, name, source_md5)
            return txn.row(md5), created, fresh

        placed = False
        try:
            row, created, placed = await self.write(txn_publish)
        finally:
            if not placed:
                await asyncio.to_thread(_unlink_quietly, tmp_path)
        return self._published(row, created, source_md5)

    def _record_upload(self, txn: Txn, row: Any, fresh: bool, user: str, md5: str, facts: "ImageFacts",
                       name: str, source_md5: Optional[str]) -> bool:
        """Inside the publishing transaction, the bytes in place: the image's row,
        new (returns True) or renewed, every fact rewritten when the bytes were
        (re)placed (`fresh`); the upload's source_md5 where the row has none; the hold."""
        ext, mime = FORMATS[facts.format]
        now = self.clock()
        expire_at = now + self.config.expire_seconds
        created = row is None
        if created:
            txn.db.execute(f"INSERT INTO images ({ROW_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,0,?,?,?)",
                           (md5, ext, facts.format, mime, name, facts.size, facts.width, facts.height,
                            now, expire_at, source_md5))
        elif fresh:
            txn.db.execute("UPDATE images SET ext=?, format=?, mime=?, size=?, width=?, height=?, expire_at=? "
                           "WHERE md5=?", (ext, facts.format, mime, facts.size, facts.width, facts.height,
                                           expire_at, md5))
            txn.changed = True
        else:
            txn.db.execute("UPDATE images SET expire_at = ? WHERE md5 = ?", (expire_at, md5))
        if source_md5 is not None and row is not None and row["source_md5"] is None:
            txn.db.execute("UPDATE images SET source_md5 = ? WHERE md5 = ?", (source_md5, md5))
        txn.hold(md5, user, now)
        return created

    def _published(self, row: Any, created: bool, source_md5: Optional[str]) -> tuple[dict, bool]:
        self.forget(row["md5"])
        info = self.info(row, "uploaded" if created else "exists")
        if source_md5 is not None:
            info["source_md5"] = source_md5  # this upload's bytes, even when the row names another
        return info, created

    # -- the object store (storage.backend "s3") --
    # An object is written before its row, so no row ever names a missing or
    # half-written object (S3 makes an object visible only once complete). The
    # hazard is the other way round: a delete, expiry or cleanup on one node
    # removing the object another node has just written for the same md5 and
    # is about to record. So a node first *claims* the md5 (a row in `claims`,
    # committed before it writes the object), and objects are only ever removed
    # inside a write transaction (one lock across the cluster) after checking
    # that no image row holds them and no claim younger than CLAIM_SECONDS does.
    # The publishing transaction drops the claim; a node that dies leaves it to age.
    def _claimed(self, txn: Txn, md5: str) -> bool:
        row = txn.db.execute("SELECT claimed_at FROM claims WHERE md5 = ?", (md5,)).fetchone()
        return row is not None and row[0] > self.clock() - CLAIM_SECONDS

    def _remove_objects(self, txn: Txn, items: list[tuple[str, str]]) -> None:
        """Inside a write transaction: remove the objects of (md5, ext) pairs no claim protects."""
        keys = [image_key(m, ext) for m, ext in items if not self._claimed(txn, m)]
        if keys:
            txn.wait(self.blobs.delete(keys))

    async def _publish_object(self, user: str, md5: str, facts: "ImageFacts", name: str,
                              tmp_path: Path, source_md5: Optional[str]) -> tuple[dict, bool]:
        ext, mime = FORMATS[facts.format]
        key = image_key(md5, ext)

        def txn_claim(txn: Txn) -> None:
            txn.db.execute("INSERT INTO claims (md5, claimed_at) VALUES (?, ?) "
                           "ON CONFLICT (md5) DO UPDATE SET claimed_at = excluded.claimed_at",
                           (md5, self.clock()))

        def txn_publish(txn: Txn, written: bool) -> Optional[tuple[Any, bool]]:
            row = txn.row(md5)
            fresh = row is None or row["ext"] != ext
            if fresh and not written:
                return None  # the row went (or never matched) since we looked: write the object first
            created = self._record_upload(txn, row, fresh, user, md5, facts, name, source_md5)
            if written:
                txn.db.execute("DELETE FROM claims WHERE md5 = ?", (md5,))
            return txn.row(md5), created

        try:
            known = await self.get_row(md5)
            # Bytes we already hold are not sent again; one HEAD makes sure, so an
            # upload also heals a row whose object was lost (as on the files backend).
            written = False
            if known is None or known["ext"] != ext or await self.blobs.size(key) is None:
                await self.write(txn_claim)
                await self.blobs.put_file(key, tmp_path, mime, OBJECT_CACHE_CONTROL)
                written = True
            result = await self.write(txn_publish, written)
            if result is None:
                await self.write(txn_claim)
                await self.blobs.put_file(key, tmp_path, mime, OBJECT_CACHE_CONTROL)
                result = await self.write(txn_publish, True)
        finally:
            await asyncio.to_thread(_unlink_quietly, tmp_path)
        return self._published(*result, source_md5)

    def _copy_locally(self, obj: RemoteObject, size: int) -> None:
        """Fetch a large original into this node's copy in the background (once at a time).
        Up to COPY_WAIT_MAX, the first GETs wait for it (obj.copying) rather than each
        reading the store too: one GET from the store however many ask at once."""
        if obj.local is None:
            return
        task = self._copying.get(obj.key)
        if task is None:
            task = asyncio.create_task(self._fetch_copy(obj), name="imgproxy-local-copy")
            self._copying[obj.key] = task
            task.add_done_callback(lambda _: self._copying.pop(obj.key, None))
        if size <= COPY_WAIT_MAX:
            obj.copying = task

    async def _fetch_copy(self, obj: RemoteObject) -> None:
        if await asyncio.to_thread(obj.local.exists):
            return
        tmp, fd = await asyncio.to_thread(self.storage.create_tmp, "source")
        try:
            await obj.blobs.download(obj.key, tmp)

            def place() -> None:
                obj.local.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, obj.local)  # atomic: a reader sees the whole copy or none

            await asyncio.to_thread(place)
        except Exception as exc:  # noqa: BLE001 - a copy is an optimisation; the store still serves
            log.debug("no local copy of %s: %s", obj.key, exc)
        finally:
            await asyncio.to_thread(_unlink_quietly, tmp)
            self.storage.release_tmp(tmp, fd)

    async def renew(self, user: str, digest: str) -> Optional[dict]:
        """Dedup without bytes: renew expiry and record the caller as a holder.
        `digest` is the image's md5 or its source_md5."""
        now = self.clock()
        expire_at = now + self.config.expire_seconds
        storage = self.storage

        def txn_renew(txn: Txn) -> tuple[str, Optional[sqlite3.Row]]:
            row = txn.row_any(digest)
            if row is None:
                return digest, None
            md5 = row["md5"]
            if self.blobs is None and not storage.image_path(md5, row["ext"]).is_file():
                # A row without its file cannot be served; drop it so the
                # client uploads the bytes again instead of trusting a dead URL.
                txn.delete_rows([md5])
                return md5, None
            # No announcement to other processes: expire_at only grows, and a
            # server whose cached copy looks expired reads the row again first.
            txn.db.execute("UPDATE images SET expire_at = ? WHERE md5 = ?", (expire_at, md5))
            txn.hold(md5, user, now)
            return md5, txn.row(md5)

        md5, row = await self.write(txn_renew)
        self.forget(md5)
        return None if row is None else self.info(row, "exists")

    async def delete(self, user: str, digest: str, admin: bool) -> bool:
        """Admin: remove outright. Uploader: drop own hold; the image goes with the last hold.
        `digest` is the image's md5 or its source_md5."""
        storage = self.storage
        md5 = digest

        def txn_delete(txn: Txn) -> bool:
            nonlocal md5
            row = txn.row_any(digest)
            if row is None:
                return False
            md5 = row["md5"]
            if not admin:
                if txn.db.execute("DELETE FROM holds WHERE md5 = ? AND username = ?", (md5, user)).rowcount == 0:
                    return False
                if txn.db.execute("SELECT COUNT(*) FROM holds WHERE md5 = ?", (md5,)).fetchone()[0] > 0:
                    return True
            if self.blobs is None:
                _unlink_quietly(storage.image_path(md5, row["ext"]))
            else:
                self._remove_objects(txn, [(md5, row["ext"])])
            storage.remove_variants(md5)
            txn.delete_rows([md5])
            return True

        found = await self.write(txn_delete)
        self.forget(md5)
        return found

    # -- access counts --
    def count_access(self, md5: str) -> None:
        self.pending_counts[md5] += 1

    async def flush_counts(self) -> None:
        if not self.pending_counts or (self._wdb is None and self.pool is None):  # closed
            return
        counts, self.pending_counts = self.pending_counts, collections.Counter()
        try:
            await self.write(lambda txn: txn.db.executemany(
                "UPDATE images SET access_count = access_count + ? WHERE md5 = ?",
                [(n, md5) for md5, n in counts.items()]))
        except BaseException:
            self.pending_counts.update(counts)  # keep them for the next attempt
            raise

    # -- app tokens --
    # Every request reads its token's row (one indexed lookup): a revocation
    # committed by any process, on any machine sharing the database, holds for
    # the very next request, with no cache to invalidate.
    async def token_owner(self, secret_sha256: bytes) -> Optional[tuple[str, str]]:
        """(token id, username) for a token's digest, or None."""
        async with self.db_read.execute("SELECT id, username FROM tokens WHERE secret_sha256 = ?",
                                        (secret_sha256,)) as cur:
            row = await cur.fetchone()
        return None if row is None else (row["id"], row["username"])

    def note_token_use(self, token_id: str) -> None:
        self.pending_token_use[token_id] = self.clock()

    async def flush_token_use(self) -> None:
        if not self.pending_token_use or (self._wdb is None and self.pool is None):  # closed
            return
        # The uses stay in pending_token_use until the write has committed: a
        # token list read while the write runs would otherwise see neither.
        uses = dict(self.pending_token_use)
        await self.write(lambda txn: txn.db.executemany(
            "UPDATE tokens SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?",
            [(at, token_id) for token_id, at in uses.items()]))
        for token_id, at in uses.items():
            if self.pending_token_use.get(token_id) == at:   # not used again meanwhile
                del self.pending_token_use[token_id]

    def _token_info(self, row: sqlite3.Row) -> dict:
        last = max(row["last_used_at"] or 0.0, self.pending_token_use.get(row["id"], 0.0))
        return {"id": row["id"], "name": row["name"], "created_at": iso(row["created_at"]),
                "last_used_at": iso(last) if last else None}

    async def create_token(self, user: str, name: str, secret_sha256: bytes) -> Optional[dict]:
        """A new token row for `user`; None when the user already has TOKENS_PER_USER."""
        now = self.clock()
        token_id = secrets.token_hex(8)

        def txn_create(txn: Txn) -> Optional[sqlite3.Row]:
            held = txn.db.execute("SELECT COUNT(*) FROM tokens WHERE username = ?", (user,)).fetchone()[0]
            if held >= TOKENS_PER_USER:
                return None
            txn.db.execute("INSERT INTO tokens (id, username, name, secret_sha256, created_at) "
                           "VALUES (?, ?, ?, ?, ?)", (token_id, user, name, secret_sha256, now))
            return txn.db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()

        row = await self.write(txn_create)
        return None if row is None else self._token_info(row)

    async def list_tokens(self, user: str) -> list[dict]:
        async with self.db_read.execute("SELECT * FROM tokens WHERE username = ? ORDER BY created_at DESC, id",
                                        (user,)) as cur:
            return [self._token_info(row) for row in await cur.fetchall()]

    async def revoke_token(self, user: str, token_id: str) -> bool:
        found = await self.write(lambda txn: txn.db.execute(
            "DELETE FROM tokens WHERE id = ? AND username = ?", (token_id, user)).rowcount > 0)
        self.pending_token_use.pop(token_id, None)
        return found

    # -- serving cache --
    async def served_image(self, md5: str) -> Optional[ServedImage]:
        entry = self.served.get(md5)
        if entry is not None:
            self.served.move_to_end(md5)
            self.cache_hits += 1
            return entry
        self.cache_misses += 1
        for _ in range(3):
            # A delete, renew or reset while this load awaits makes what it
            # read possibly stale: then it is not cached, and read again.
            epoch = self._forget_epoch
            row = await self.get_row(md5)
            if row is None:
                return None
            if self.blobs is None:
                path = self.storage.image_path(md5, row["ext"])
            else:
                path = RemoteObject(self.blobs, image_key(md5, row["ext"]),
                                    self.storage.variant_path(md5, "source", row["ext"]))
                if row["size"] > BODY_CACHE_MAX_FILE:
                    self._copy_locally(path, row["size"])
            entry = ServedImage(md5, row["ext"], row["mime"], row["size"], row["expire_at"],
                                path, created_at=row["created_at"])
            if row["size"] <= BODY_CACHE_MAX_FILE and row["size"] <= self.body_budget:
                try:
                    if self.blobs is None:
                        entry.body = await asyncio.to_thread(path.read_bytes)
                    else:
                        entry.body = await self.blobs.read(path.key)
                except OSError:
                    return None
            if epoch != self._forget_epoch:
                continue
            if not self.coherent:
                return entry  # other nodes' changes cannot reach us now: keep nothing
            cached = self.served.get(md5)
            if cached is not None:  # a concurrent miss of the same image stored it first
                return cached
            self.served[md5] = entry
            if entry.body is not None:
                self.body_bytes += len(entry.body)
            while self.served and (self.body_bytes > self.body_budget
                                   or len(self.served) > META_CACHE_ENTRIES):
                _, old = self.served.popitem(last=False)
                if old.body is not None:
                    self.body_bytes -= len(old.body)
            return entry
        return entry  # changing under us all along: serve this fresh read uncached

    def forget(self, md5: str) -> None:
        self._forget_epoch += 1
        old = self.served.pop(md5, None)
        if old is not None and old.body is not None:
            self.body_bytes -= len(old.body)

    def forget_all(self) -> None:
        self._forget_epoch += 1
        self.served.clear()
        self.body_bytes = 0

    async def notice_other_writers(self) -> None:
        """Backstop for changes made outside imgproxy (e.g. the sqlite3 shell):
        PRAGMA data_version moves when another connection commits."""
        if self.pool is not None:
            return  # PostgreSQL: the change feed tells us
        version = await self._in_writer(_data_version)
        if version != self._data_version:
            self._data_version = version
            self.forget_all()

    async def healthy(self) -> Optional[str]:
        try:
            async with self.db_read.execute("SELECT 1") as cur:
                await cur.fetchone()
        except Exception as exc:  # noqa: BLE001 - health reports any failure
            return f"database: {pg_error_text(exc) if self.pool is not None else exc}"
        if self.blobs is not None:
            try:
                await self.blobs.size("healthz")
            except Exception as exc:  # noqa: BLE001 - health reports any failure
                return f"object store: {exc}"
        ok = await asyncio.to_thread(lambda: (self.blobs is not None or os.access(self.storage.uploads, os.W_OK))
                                     and os.access(self.storage.tmp, os.W_OK))
        return None if ok else "data folder is not writable"

    # -- meta --
    async def get_meta(self, key: str) -> Optional[str]:
        async with self.db_read.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def set_meta(self, key: str, value: str) -> None:
        await self.write(lambda txn: txn.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value)))

    # -- database snapshot --
    async def snapshot(self) -> io.BufferedReader:
        """A consistent copy through SQLite's backup API, as an open file already
        unlinked from tmp/: nothing is left behind whatever happens to the reader."""
        if self.pool is not None:
            return await self._pg_snapshot()

        def run() -> io.BufferedReader:
            target, fd = self.storage.create_tmp("snapshot")  # locked: no sweep takes it mid-copy
            try:
                # A URI, percent-encoded: a data_dir may contain '#', '?' or '%'.
                src = sqlite3.connect(self.storage.db_path.absolute().as_uri() + "?mode=ro", uri=True, timeout=15)
                try:
                    dst = sqlite3.connect(str(target))
                    try:
                        src.backup(dst)
                        dst.execute("PRAGMA journal_mode = DELETE")
                    finally:
                        dst.close()
                finally:
                    src.close()
                return open(fd, "rb")
            except BaseException:
                os.close(fd)
                raise
            finally:
                _unlink_quietly(target)
                self.storage.in_flight.discard(target.name)

        return await asyncio.to_thread(run)

    async def _pg_snapshot(self) -> io.BufferedReader:
        """The same tables copied out of PostgreSQL into a new SQLite file, read
        in one repeatable-read transaction: a consistent moment, like the backup API."""
        target, fd = await asyncio.to_thread(self.storage.create_tmp, "snapshot")
        dst: Optional[sqlite3.Connection] = None
        try:
            def make() -> sqlite3.Connection:
                db = sqlite3.connect(str(target), check_same_thread=False, isolation_level=None)
                db.executescript(SCHEMA)
                db.executescript(TOKENS_SCHEMA)
                add_source_md5(db)
                db.execute("BEGIN")
                return db

            dst = await asyncio.to_thread(make)
            async with pg_connection(self.pool) as conn:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    for table, columns in EXPORT_TABLES:
                        insert = f"INSERT INTO {table} ({columns}) VALUES ({','.join('?' * len(columns.split(',')))})"
                        batch: list[tuple] = []
                        async for record in conn.cursor(f"SELECT {columns} FROM {table}", prefetch=1000):
                            batch.append(tuple(record))
                            if len(batch) >= 5000:
                                await asyncio.to_thread(dst.executemany, insert, batch)
                                batch = []
                        if batch:
                            await asyncio.to_thread(dst.executemany, insert, batch)
            await asyncio.to_thread(lambda: (dst.execute("COMMIT"), dst.close()))
            dst = None
            return open(fd, "rb")
        except BaseException:
            if dst is not None:
                dst.close()
            os.close(fd)
            raise
        finally:
            await asyncio.to_thread(_unlink_quietly, target)
            self.storage.in_flight.discard(target.name)


# ==== image inspection ==========================================================


class DecodeGuard:
    """The limits one decode stays within: pixels, memory, frames and CPU time.

    Pillow checks only what a header declares, and only the first frame's
    header at that; every frame, page, tile and embedded image is measured
    here before any of its pixels are decoded, so that whatever the file says
    a decode holds at most DECODE_BYTES_PER_PIXEL x max_pixels plus the file and
    DECODE_SLACK, and stops after DECODE_CPU_SECONDS of CPU.
    """

    def __init__(self, max_pixels: int, file_size: int):
        self.max_pixels = max_pixels
        self.memory = DECODE_BYTES_PER_PIXEL * max_pixels + file_size + DECODE_SLACK
        self.pixels_left = max_pixels * 10  # all frames together
        self.frames = 0
        self.started = time.thread_time()  # this thread's CPU, not the other uploads'

    def pixels(self, width: int, height: int, what: str = "image") -> None:
        if width * height > self.max_pixels:
            raise UploadRejected(413, "too_many_pixels",
                                 f"{what} is {width}x{height} = {width * height} pixels; "
                                 f"the limit is {self.max_pixels}")

    def memory_for(self, nbytes: int, what: str = "image") -> None:
        if nbytes > self.memory:
            raise UploadRejected(413, "too_many_pixels",
                                 f"{what} needs about {nbytes // 2**20} MB to decode; "
                                 f"the limit is {self.memory // 2**20} MB")

    def frame(self, width: int, height: int) -> None:
        """Called before each frame or page is decoded."""
        self.frames += 1
        self.pixels_left -= width * height
        if self.frames > MAX_FRAMES or self.pixels_left < 0:
            raise UploadRejected(413, "too_many_pixels",
                                 "animation is too large to check (too many frames or pixels)")
        self.clock()

    def clock(self) -> None:
        if time.thread_time() - self.started > DECODE_CPU_SECONDS:
            raise UploadRejected(413, "too_complex",
                                 f"image takes more than {DECODE_CPU_SECONDS:g} s of CPU to check")


@dataclasses.dataclass(frozen=True)
class JpegFrame:
    """A JPEG's first frame header (SOFn) and where its scan data starts."""
    marker: int
    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # (horizontal, vertical) per component
    scan_start: int

    @property
    def progressive(self) -> bool:
        return self.marker in (0xC2, 0xC6, 0xCA, 0xCE)

    def coefficient_bytes(self) -> int:
        """What libjpeg holds for a progressive or multi-scan image: every
        block's 64 coefficients of 2 bytes, whatever scale the output is."""
        hmax = max(h for h, _ in self.sampling)
        vmax = max(v for _, v in self.sampling)
        blocks = sum(math.ceil(self.width * h / hmax / 8) * math.ceil(self.height * v / vmax / 8)
                     for h, v in self.sampling)
        return blocks * 128


def check_jpeg_headers(source: bytes | Path, start: int = 0) -> Optional[JpegFrame]:
    """Refuse JPEGs whose header segments would make Pillow slow or greedy.

    Pillow keeps every APPn segment in memory and joins split Exif with
    repeated concatenation, and it steps through fill bytes one at a time, so
    millions of tiny segments (about 1.5 GB and 20 s for a 20 MB file), a 60 MB
    Exif (45 s) or 20 MB of fill bytes (15 s) cost far more than their size.
    Walking the segment lengths first bounds that work. Returns the frame
    header when the walk reaches the scan data. `start`: where the JPEG
    begins (a later frame of an MPO).
    """
    with (io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")) as f:
        f.seek(start)
        if f.read(2) != b"\xff\xd8":
            return None
        segments = metadata = steps = 0
        frame: Optional[JpegFrame] = None
        while True:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0xFF:
                return None  # not ours to judge: Pillow reports the damage
            marker = head[1]
            steps += 1
            if steps > JPEG_MAX_SEGMENTS * 4:  # fill bytes and bare markers advance 1-2 bytes a step
                raise UploadRejected(413, "too_large", "JPEG header is too large (too many markers)")
            if marker == 0xFF:
                f.seek(-3, os.SEEK_CUR)  # fill byte before the marker
                continue
            if marker == 0xDA:
                return None if frame is None else dataclasses.replace(frame, scan_start=f.tell() - 4)
            if marker == 0xD9:
                return None  # end of image before any scan
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:
                f.seek(-2, os.SEEK_CUR)  # markers without a length
                continue
            length = int.from_bytes(head[2:4], "big")
            if length < 2:
                return None  # broken: Pillow reports it
            segments += 1
            if 0xE0 <= marker <= 0xEF or marker == 0xFE:
                metadata += length
            if segments > JPEG_MAX_SEGMENTS or metadata > JPEG_MAX_METADATA:
                raise UploadRejected(413, "too_large",
                                     f"JPEG header is too large (more than {JPEG_MAX_SEGMENTS} segments "
                                     f"or {JPEG_MAX_METADATA // (1024 * 1024)} MB of metadata)")
            if frame is None and 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                body = f.read(length - 2)
                if len(body) >= 6 and len(body) >= 6 + 3 * body[5] and body[5]:
                    height, width = struct.unpack_from(">HH", body, 1)
                    sampling = tuple((max(1, body[7 + 3 * i] >> 4), max(1, body[7 + 3 * i] & 15))
                                     for i in range(body[5]))
                    frame = JpegFrame(marker, width, height, sampling, 0)
                continue
            f.seek(length - 2, os.SEEK_CUR)


def _count(view: bytes | mmap.mmap, needle: bytes, start: int, end: int, stop_after: int) -> int:
    """Occurrences of needle in view[start:end], counting no further than stop_after."""
    found = 0
    while found < stop_after:
        start = view.find(needle, start, end)
        if start < 0:
            break
        found += 1
        start += len(needle)
    return found


def check_jpeg_work(view: bytes | mmap.mmap, frame: Optional[JpegFrame], im: Image.Image,
                    guard: DecodeGuard, held: int = 0) -> None:
    """Bound what the scans cost: their number (each walks the whole image
    again, so a few bytes of scan cost as much as the pixels) and the
    coefficient buffer that progressive and multi-scan images need.

    Inside scan data a 0xFF byte is always followed by 0x00 or a restart
    marker, so every FF DA is a real start of scan. Without a frame header
    (Pillow skips junk our walk stops at) the whole file is counted and the
    coefficients are charged as if no component were subsampled. `held`:
    the bytes of the output image, which libjpeg's buffer comes on top of.
    """
    start = frame.scan_start if frame is not None else 0
    scans = _count(view, b"\xff\xda", start, len(view), JPEG_MAX_SCANS + 1)
    if scans > JPEG_MAX_SCANS:
        raise UploadRejected(413, "too_complex",
                             f"JPEG has more than {JPEG_MAX_SCANS} scans; each one costs a pass over the image")
    image_end = view.find(b"\xff\xd9", start)
    own_scans = _count(view, b"\xff\xda", start, len(view) if image_end < 0 else image_end, 2)
    if frame is None:
        if own_scans > 1:
            width, height = im.size
            guard.memory_for(held + 128 * math.ceil(width / 8) * math.ceil(height / 8) * len(im.getbands()),
                             "progressive JPEG")
    elif frame.progressive or own_scans > 1:
        guard.memory_for(held + frame.coefficient_bytes(), "progressive JPEG")


def decode_gif_frames(view: bytes | mmap.mmap, guard: DecodeGuard) -> int:
    """Decode every frame of a GIF on its own; returns the number of frames.

    Pillow composes each frame onto a full-size RGB(A) canvas and keeps the
    previous one (about 13 bytes a pixel), and it grows that canvas to fit
    any frame, however far it reaches past the logical screen. Cut out, each
    frame is checked against the limits first and then decoded as a one-frame
    GIF of its own size: 1 byte a pixel, and the same LZW decoder.
    """
    screen_w, screen_h, flags = struct.unpack_from("<HHB", view, 6)
    pos = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
    global_table = bytes(view[13:pos])
    canvas_w, canvas_h = screen_w, screen_h
    frames, end = 0, len(view)
    while pos < end:
        kind = view[pos]
        if kind == 0x3B:
            break
        if kind == 0x21:
            pos += 2
            while pos < end and view[pos]:
                pos += view[pos] + 1
            pos += 1
        elif kind == 0x2C:
            x, y, width, height, local = struct.unpack_from("<HHHHB", view, pos + 1)
            start = pos
            pos += 10 + ((3 << ((local & 7) + 1)) if local & 0x80 else 0) + 1  # + LZW code size
            while pos < end and view[pos]:
                pos += view[pos] + 1
            pos += 1
            canvas_w, canvas_h = max(canvas_w, x + width), max(canvas_h, y + height)
            guard.pixels(canvas_w, canvas_h, f"GIF frame {frames + 1} (with the canvas it needs)")
            guard.frame(width, height)
            frames += 1
            if width and height:
                alone = (b"GIF89a" + struct.pack("<HHBBB", width, height, flags, 0, 0) + global_table
                         + b"\x2c" + struct.pack("<HHHH", 0, 0, width, height) + view[start + 9:pos] + b"\x3b")
                with Image.open(io.BytesIO(alone), formats=["GIF"]) as im:
                    im.load()
        else:
            pos += 1  # as Pillow does: stray bytes between blocks are skipped
    return frames


def _tiff_pages(view: bytes | mmap.mmap) -> Iterable[tuple[dict[int, list[int]], int]]:
    """(tags with their first values, number of tile/strip offsets) for each IFD of the chain."""
    order = "<" if view[:2] == b"II" else ">"
    big = struct.unpack_from(order + "H", view, 2)[0] == 43
    widths = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
    entry_size, count_fmt, offset_fmt = (20, "Q", "Q") if big else (12, "H", "I")
    value_room = 8 if big else 4
    offset = struct.unpack_from(order + offset_fmt, view, 8 if big else 4)[0]
    seen: set[int] = set()
    entries_left = TIFF_MAX_ENTRIES
    while offset and offset not in seen and len(seen) <= MAX_FRAMES:
        seen.add(offset)
        (entries,) = struct.unpack_from(order + count_fmt, view, offset)
        entries_left -= entries
        if entries_left < 0:  # overlapping IFDs can make a small file look like millions of tags
            raise UploadRejected(413, "too_complex", "TIFF structure is too large to check")
        first = offset + (8 if big else 2)
        tags: dict[int, list[int]] = {}
        blocks = 0
        for i in range(entries):
            at = first + i * entry_size
            tag, kind = struct.unpack_from(order + "HH", view, at)
            count = struct.unpack_from(order + ("Q" if big else "I"), view, at + 4)[0]
            code = widths.get(kind)
            if code is None or count == 0:
                continue
            if tag in (273, 324):
                blocks += count
            if tag not in (256, 257, 258, 259, 262, 277, 278, 322, 323):
                continue
            n = min(count, 8)
            where = at + (12 if big else 8)
            if n * struct.calcsize(code) > value_room:
                where = struct.unpack_from(order + offset_fmt, view, where)[0]
            tags[tag] = list(struct.unpack_from(order + code * n, view, where))
        yield tags, blocks
        offset = struct.unpack_from(order + offset_fmt, view, first + entries * entry_size)[0]


def check_tiff_pages(view: bytes | mmap.mmap, guard: DecodeGuard) -> None:
    """Measure every page of a TIFF, and the tile or strip buffer libtiff
    allocates for it, before Pillow decodes any: a later page or a single
    tile can be far larger than the first page's header says."""
    total_blocks, jpeg_inside = 0, False
    for number, (tags, blocks) in enumerate(_tiff_pages(view), 1):
        def first(tag: int, default: int) -> int:
            return tags.get(tag, [default])[0]
        width, height = first(256, 0), first(257, 0)
        if number > MAX_FRAMES:
            raise UploadRejected(413, "too_many_pixels", f"TIFF has more than {MAX_FRAMES} pages")
        guard.pixels(width, height, f"TIFF page {number}")
        compression = first(259, 1)
        jpeg_inside = jpeg_inside or compression in (6, 7)
        sample_bytes = math.ceil(first(277, 1) * max(tags.get(258, [1])) / 8)
        if compression in (6, 7) or first(262, 0) == 6:
            sample_bytes = max(sample_bytes, 4)  # libtiff's RGBA conversion of YCbCr
        if 322 in tags or 323 in tags:
            block = first(322, 0) * first(323, 0)
        elif compression != 1:  # libtiff decodes one whole strip at a time
            block = width * min(first(278, height) or height, height)
        else:
            block = 0  # Pillow's own reader streams uncompressed strips
        guard.memory_for(DECODE_BYTES_PER_PIXEL * width * height + block * sample_bytes, f"TIFF page {number}")
        total_blocks += blocks
    if jpeg_inside:
        # Each tile or strip is its own JPEG, with one scan per component at most when baseline.
        scans = _count(view, b"\xff\xda", 0, len(view), 4 * total_blocks + JPEG_MAX_SCANS + 1)
        if scans > 4 * total_blocks + JPEG_MAX_SCANS:
            raise UploadRejected(413, "too_complex", "the JPEG data in this TIFF has too many scans")


def check_ico_entries(view: bytes | mmap.mmap, guard: DecodeGuard) -> None:
    """Measure every image inside an ICO by its own header: the directory's
    sizes are only claims, and Pillow decodes the largest entry while opening."""
    (count,) = struct.unpack_from("<H", view, 4)
    for i in range(count):
        offset = struct.unpack_from("<I", view, 6 + 16 * i + 12)[0]
        head = view[offset:offset + 24]
        if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
            width, height = struct.unpack_from(">II", head, 16)
            cost = DECODE_BYTES_PER_PIXEL
        elif len(head) >= 12:
            if struct.unpack_from("<I", head)[0] == 12:
                width, height = struct.unpack_from("<HH", head, 4)
            else:
                width, height = (abs(v) for v in struct.unpack_from("<ii", head, 4))
            height //= 2  # the colour image and its transparency mask
            cost = DECODE_COST["ICO-BMP"]
        else:
            continue  # truncated: Pillow reports it
        guard.pixels(width, height, f"image {i + 1} inside the ICO")
        guard.memory_for(cost * width * height, f"image {i + 1} inside the ICO")


def check_webp_canvas(view: bytes | mmap.mmap, guard: DecodeGuard) -> None:
    """libwebp allocates the canvas as Pillow opens the file: measure it first."""
    chunk = view[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(view[24:27], "little") + 1
        height = int.from_bytes(view[27:30], "little") + 1
    elif chunk == b"VP8 " and view[23:26] == b"\x9d\x01\x2a":
        width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", view, 26))
    elif chunk == b"VP8L" and view[20:21] == b"\x2f":
        bits = struct.unpack_from("<I", view, 21)[0]
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:
        return
    guard.pixels(width, height)
    guard.memory_for(DECODE_COST["WEBP"] * width * height, "WebP image")


class PngStreamCheck:
    """Checks a PNG while it is received, so a big one needs no decode afterwards.

    Pillow's ImageFile.Parser cannot do it (PNG has its own reader, so the
    parser buffers everything until close). Fed the upload's pieces in order
    (`feed`, from the upload's writer thread), this checks every chunk's CRC
    and inflates the IDAT stream in bounded pieces to exactly the rows the
    IHDR promises, each starting with a valid filter type: what verify() and
    a full decode would find. It vouches (`passed`) only for a plain image
    within max_pixels: one frame, not interlaced, nothing but IDAT after the
    first IDAT, ending with IEND. Anything else, damage included, leaves the
    verdict to inspect_image, so no file is judged differently.
    """
    CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
    DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
    KNOWN_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self.buf = bytearray()
        self.started = False
        self.chunk: Optional[bytes] = None  # the chunk being read ...
        self.left = 0                        # ... and how many of its data bytes are still to come
        self.crc = 0
        self.inflater = zlib.decompressobj()
        self.row = self.expected = self.inflated = self.colour = 0
        self.kinds: set[bytes] = set()
        self.passed = self.gave_up = False

    def feed(self, data: bytes | bytearray) -> None:
        if self.passed or self.gave_up:
            return
        if self.buf:  # a header or a small chunk cut by the piece boundary
            data, self.buf = bytes(self.buf + data), bytearray()
        try:
            rest = self._run(memoryview(data))
            if not (self.passed or self.gave_up):
                self.buf += rest
        except (zlib.error, struct.error, ValueError):
            self.gave_up = True

    def _run(self, view: memoryview) -> memoryview:
        """Consume what can be judged of view; returns the rest (an incomplete unit)."""
        pos, end = 0, len(view)
        if not self.started:
            if end < 8:
                return view
            if view[:8] != b"\x89PNG\r\n\x1a\n":
                self.gave_up = True
                return view[:0]
            pos, self.started = 8, True
        while not (self.passed or self.gave_up):
            if self.chunk is None:
                if end - pos < 8:
                    break
                self.left, kind = struct.unpack_from(">I4s", view, pos)
                pos += 8
                self._begin(kind)
            elif self.chunk == b"IDAT" and self.left:
                take = min(self.left, end - pos)
                if not take:
                    break
                piece = view[pos:pos + take]  # IDAT data is judged as it comes, never buffered
                pos += take
                self.left -= take
                self.crc = zlib.crc32(piece, self.crc)
                self._inflate(piece)
            else:
                if end - pos < self.left + 4:
                    break
                body = view[pos:pos + self.left]
                (crc,) = struct.unpack_from(">I", view, pos + self.left)
                pos += self.left + 4
                if zlib.crc32(body, self.crc) != crc:
                    self.gave_up = True
                    break
                self._end(self.chunk, bytes(body))
                self.chunk = None
        return view[pos:]

    def _begin(self, kind: bytes) -> None:
        ihdr_first = bool(self.kinds) or kind == b"IHDR"
        after_idat = b"IDAT" in self.kinds and kind not in (b"IDAT", b"IEND")
        critical = 65 <= kind[0] <= 90
        if (not ihdr_first or after_idat or kind in (b"acTL", b"fcTL", b"fdAT")
                or (critical and kind not in self.KNOWN_CRITICAL)
                or (kind != b"IDAT" and self.left > 1 << 20)
                or (kind == b"IDAT" and (not self.expected or (self.colour == 3 and b"PLTE" not in self.kinds)))):
            self.gave_up = True
            return
        self.kinds.add(kind)
        self.chunk = kind
        self.crc = zlib.crc32(kind)

    def _end(self, kind: bytes, body: bytes) -> None:
        if kind == b"IHDR":
            if len(body) != 13:
                self.gave_up = True
                return
            width, height, depth, self.colour, compression, filters, interlace = struct.unpack(">IIBBBBB", body)
            if (not 0 < width * height <= self.max_pixels or depth not in self.DEPTHS.get(self.colour, ())
                    or compression or filters or interlace):
                self.gave_up = True
                return
            self.row = (width * self.CHANNELS[self.colour] * depth + 7) // 8 + 1
            self.expected = height * self.row
        elif kind == b"IEND":
            self.passed = (self.inflater.eof and not self.inflater.unused_data
                           and self.inflated == self.expected)
            self.gave_up = not self.passed

    def _inflate(self, data: bytes) -> None:
        piece = 1 << 20  # bounded output whatever the ratio: a zlib bomb costs CPU, not memory
        while not self.gave_up:
            out = self.inflater.decompress(data, piece)
            data = self.inflater.unconsumed_tail
            if out:
                first_row = -self.inflated % self.row
                if out[first_row::self.row] and max(out[first_row::self.row]) > 4:
                    self.gave_up = True  # not a PNG filter type
                self.inflated += len(out)
                if self.inflated > self.expected:
                    self.gave_up = True
            if not data and len(out) < piece:
                return


def check_structure(view: bytes | mmap.mmap, formats: tuple[str, ...], guard: DecodeGuard) -> None:
    """The per-format checks that must run before Pillow opens the file."""
    try:
        if view[:4] == b"\0\0\1\0" and "ICO" in formats:
            check_ico_entries(view, guard)
        elif view[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+") and "TIFF" in formats:
            check_tiff_pages(view, guard)
        elif view[:4] == b"RIFF" and view[8:12] == b"WEBP" and "WEBP" in formats:
            check_webp_canvas(view, guard)
    except struct.error:
        pass  # the structure ends early: Pillow reports the damage


def decode_cost(fmt: str, im: Image.Image) -> int:
    """Peak bytes a pixel of this image's canvas costs while Pillow decodes it."""
    frames = getattr(im, "n_frames", 1)
    if fmt == "PNG" and frames > 1:
        return DECODE_COST["APNG"]
    if fmt == "AVIF" and frames > 1:
        # libavif's decoder keeps more of an image sequence the further it goes
        # (37, 74, 96, 144 MB for 1, 2, 4, 9 frames of 4 MP, measured in review).
        return DECODE_COST["AVIF"] + AVIF_FRAME_COST * (frames - 1)
    return DECODE_COST.get(fmt, DECODE_BYTES_PER_PIXEL)


@contextlib.contextmanager
def _bytes_of(source: bytes | Path):
    """The file's bytes for the structure checks: mapped, not read, when on disk."""
    if isinstance(source, (bytes, bytearray)):
        yield source
        return
    with open(source, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            yield view


def inspect_image(source: bytes | Path, size: int, formats: tuple[str, ...], max_pixels: int, *,
                  png_checked: bool = False) -> ImageFacts:
    """Decide from the bytes what the image is; raise UploadRejected if we refuse it.

    Blocking and CPU-bound: run in a worker thread. Order matters: every
    frame, page and embedded image is measured before any pixel is decoded
    (bombs, see DecodeGuard), then verify() catches broken chunk CRCs and a
    full decode of every frame catches truncated data that verify() misses (JPEG).
    `png_checked`: a PngStreamCheck passed these bytes, which stands for
    verify() and the decode of a PNG.
    """
    pillow_formats = list(formats)  # JPEG's opener also yields MPO, reported as JPEG below

    def open_image() -> Image.Image:
        return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                          formats=pillow_formats)

    unsupported = ("not an image in an accepted format ("
                   + ", ".join(formats) + "); SVG and other formats are refused")
    guard = DecodeGuard(max_pixels, size)
    jpeg_frame = check_jpeg_headers(source) if "JPEG" in formats else None
    with _bytes_of(source) as view:
        try:
            check_structure(view, formats, guard)
            with open_image() as im:
                fmt = "JPEG" if im.format == "MPO" else im.format
                width, height = im.size
                if fmt not in formats:
                    raise UploadRejected(415, "unsupported_image", unsupported)
                if width <= 0 or height <= 0:
                    raise UploadRejected(415, "unsupported_image", "image has no pixels")
                guard.pixels(width, height)
                cost = decode_cost(fmt, im)
                guard.memory_for(cost * width * height)
                # Pillow cannot seek past a scaled first picture of an MPO (camera
                # JPEGs with a preview): those are checked at full size.
                scaled = im.format == "JPEG"
                if fmt == "JPEG":
                    check_jpeg_work(view, jpeg_frame, im, guard,
                                    held=0 if scaled else DECODE_BYTES_PER_PIXEL * width * height)
                streamed = png_checked and fmt == "PNG"
                if not streamed:
                    im.verify()
            if streamed:
                frames = 1
            elif fmt == "GIF":
                frames = decode_gif_frames(view, guard)
            else:
                with open_image() as im:
                    if scaled:
                        # DCT scaling still entropy-decodes the whole stream (so
                        # truncation is caught) at a fraction of the memory and time.
                        im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                    guard.frame(width, height)
                    im.load()
                    frames = 1
                    while True:
                        try:
                            im.seek(frames)
                        except EOFError:
                            break
                        frames += 1
                        w, h = im.size
                        guard.pixels(w, h, f"frame {frames}")
                        guard.memory_for(cost * w * h, f"frame {frames}")
                        if fmt == "JPEG" and im.tile:  # an MPO's next picture: a JPEG of its own, full size
                            check_jpeg_work(view, check_jpeg_headers(source, im.tile[0].offset), im, guard,
                                            held=DECODE_BYTES_PER_PIXEL * w * h)
                        guard.frame(w, h)
                        im.load()
        except UploadRejected:
            raise
        except Image.UnidentifiedImageError:
            raise UploadRejected(415, "unsupported_image", unsupported) from None
        except Image.DecompressionBombError:
            raise UploadRejected(413, "too_many_pixels", "image declares more pixels than allowed") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is bad input
            log.debug("rejected corrupt image: %r", exc)
            raise UploadRejected(415, "unsupported_image",
                                 f"image is corrupt or truncated ({type(exc).__name__})") from None
    return ImageFacts(fmt, width, height, size, frames)


def sanitize_name(raw: Optional[str], ext: str) -> str:
    """A display name from client text: last path segment, printable, bounded."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if len(name) > 200:
        stem, dot, suffix = name.rpartition(".")
        name = (stem[:190] + dot + suffix[:9]) if dot and len(suffix) < 10 else name[:200]
    if name in ("", ".", ".."):
        name = f"image.{ext}"
    return name


# ==== variants ================================================================
# Smaller sizes and other formats of a stored image (/i/{md5}/{size}.{fmt}):
# rendered once on first request, kept under variants/ (tmp + rename, like
# uploads), bounded on disk by least-recently-used eviction.

def accepted_modern_format(accept: Optional[str], formats: Iterable[str]) -> Optional[str]:
    """AVIF or WebP when the Accept header names it with q > 0; wildcards do not count."""
    named = set()
    for part in (accept or "").split(","):
        mime, *params = part.split(";")
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            named.add(mime.strip().lower())
    for fmt in ("avif", "webp"):
        if fmt in formats and VARIANT_FORMATS[fmt][1] in named:
            return fmt
    return None


def has_transparency(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def source_has_transparency(path: Path | bytes) -> bool:
    """From the header alone (no pixels decoded): can this image be see-through?"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
            return has_transparency(im)


def render_variant(source: Path | bytes, width: Optional[int], fmt: str, max_pixels: int) -> bytes:
    """Encode `source` at `width` (None: its own) as `fmt`; blocking and CPU-bound.

    Orientation is applied, the first frame of an animation is used, the ICC
    profile is carried over unchanged (browsers colour-manage tagged images; a
    conversion to sRGB would need littlecms, which not every Pillow has), and
    nothing else of the original's metadata is written.
    """
    pillow_format = VARIANT_FORMATS[fmt][0]
    too_many = UploadRejected(413, "too_many_pixels", "the original has more pixels than allowed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except Image.DecompressionBombError:  # Pillow's backstop: twice its limit (see create_app)
            raise too_many from None
        with im:
            if im.width * im.height > max_pixels:  # stored before a lower limit was set
                raise too_many
            orientation = im.getexif().get(0x0112, 1)
            swapped = orientation in (5, 6, 7, 8)
            shown_w, shown_h = (im.height, im.width) if swapped else im.size
            target_w = shown_w if width is None else min(width, shown_w)
            target_h = max(1, round(shown_h * target_w / shown_w))
            stored_size = im.size
            if im.format in ("JPEG", "MPO") and target_w < shown_w:
                # DCT scaling: decode at 1/2, 1/4 or 1/8 straight away, never below the target.
                im.draft(im.mode, (target_h, target_w) if swapped else (target_w, target_h))
            reduced = im.size != stored_size
            icc = im.info.get("icc_profile")
            if orientation in (2, 3, 4, 5, 6, 7, 8):
                frame = ImageOps.exif_transpose(im)
            else:  # upright: the decoded pixels as they are, without exif_transpose's copy
                im.load()
                frame = im
    alpha = has_transparency(frame)
    if frame.mode not in ("RGB", "RGBA", "L", "LA"):
        if frame.mode == "CMYK":
            icc = None  # a CMYK profile would mislabel the RGB pixels
        frame = frame.convert("RGBA" if alpha else "RGB")
    if frame.width != target_w:
        # reducing_gap: a cheap box reduction first, then the filter for the last factor
        # of 3 at most. After DCT scaling less than 2 is left, where bicubic (Pillow's
        # thumbnail filter) differs from Lanczos by about 1/255 a pixel on real photos
        # and costs 30-40 % less (bench/render_steps.py).
        resample = Image.Resampling.BICUBIC if reduced else Image.Resampling.LANCZOS
        frame = frame.resize((target_w, target_h), resample, reducing_gap=3.0)
    if pillow_format == "JPEG" and frame.mode in ("RGBA", "LA"):
        frame = frame.convert("RGBA")
        flat = Image.new("RGB", frame.size, (255, 255, 255))
        flat.paste(frame, mask=frame.getchannel("A"))
        frame = flat
    if pillow_format == "GIF" and frame.mode in ("RGBA", "LA"):
        # GIF has one see-through palette entry: pixels under half opacity get it.
        frame = frame.convert("RGBA")
        clear = frame.getchannel("A").point(lambda a: 255 if a < 128 else 0)
        frame = frame.convert("RGB").quantize(255)
        frame.paste(255, mask=clear)
        frame.info["transparency"] = 255
    transparency = frame.info.get("transparency") if pillow_format == "GIF" else None
    frame.info = {}  # no EXIF, XMP, comments or text chunks from the original
    options: dict[str, Any] = {}
    if icc and pillow_format != "GIF":
        options["icc_profile"] = icc
    if transparency is not None:
        options["transparency"] = transparency
    if pillow_format == "JPEG":
        options.update(quality=85)
    elif pillow_format == "WEBP":
        options.update(quality=80, method=2)  # method 4+ doubles the encode time for ~3% smaller files
    elif pillow_format == "AVIF":
        options.update(quality=60, speed=8)  # speed 8: a 640 px render in tens of ms
    elif pillow_format == "PNG":
        options.update(compress_level=6)
    out = io.BytesIO()
    frame.save(out, pillow_format, **options)
    return out.getvalue()


class RenderProcessDied(Exception):
    """A render process ended mid-render (killed, say, by the kernel's OOM killer)."""


def _start_render_process(max_pixels: int, server_pid: int) -> None:
    """Initializer of a render process: idle priority, Pillow set up as in the server."""
    threading.Thread(target=_end_with, args=(server_pid,), name="imgproxy-server-watch", daemon=True).start()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, RENDER_NICE)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which then stops us
    Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", module=r"PIL\.")
    Image.init()
    with contextlib.suppress(Exception):  # load the encoders now, not in the first render
        Image.new("RGB", (16, 16)).save(io.BytesIO(), "WEBP")


def _end_with(server_pid: int) -> None:
    """A render process ends when its server does. A server killed with -9
    cannot say so, and a pool process only waits for its next call (and keeps
    the fork server alive), so it watches the server's pid itself."""
    try:
        watch = os.pidfd_open(server_pid)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd (older kernel): look every second
        while True:
            time.sleep(1.0)
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass
    select.select([watch], [], [])  # readable once the server has exited
    os._exit(0)


def _render_process_pid() -> int:
    return os.getpid()


def _lower_thread_priority() -> None:
    # Renders left in threads (no render processes) run at nice 10, which Linux
    # sets per thread: the event loop still gets the CPU first.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class RenderProcesses:
    """render_variant run in a pool of processes, off the server's GIL.

    In a thread of the server, a render holds the GIL for stretches (Pillow's
    Python code, parts of its encoders), and at a lower priority it can be
    descheduled while holding it: the event loop then waits on a thread that
    is not running, and cached images stall for milliseconds. A process has a
    GIL of its own, and as SCHED_IDLE (nice 10 where that is refused) it gets
    a core only when the event loop does not want it.

    The processes come from multiprocessing's fork server (a small process
    started on first use, or by serve() at start): one at first, more as
    renders overlap, up to `size`, and they stay. A process that dies
    mid-render breaks the pool: the renders it held raise RenderProcessDied,
    and the next render starts a new pool. Where processes cannot be made
    (no /dev/shm, say), renders run in the calling thread instead.
    """

    def __init__(self, size: int, max_pixels: int):
        self.size = size
        self.max_pixels = max_pixels
        self.lock = threading.Lock()
        self.pool: Optional[concurrent.futures.ProcessPoolExecutor] = None
        self.in_threads = False
        self.closed = False

    def _pool(self) -> Optional[concurrent.futures.ProcessPoolExecutor]:
        with self.lock:
            if self.pool is None and not self.in_threads and not self.closed:
                try:
                    # A render process imports this file on its own (about 35 MB). Preloading
                    # it in the fork server was tried: reference counting soon copies the
                    # shared pages anyway, and every process grew.
                    self.pool = concurrent.futures.ProcessPoolExecutor(
                        self.size, mp_context=multiprocessing.get_context("forkserver"),
                        initializer=_start_render_process,
                        initargs=(self.max_pixels, os.getpid()))
                except (OSError, ValueError, ImportError) as exc:
                    log.warning("renders run in threads: no render processes (%s)", exc)
                    self.in_threads = True
            return self.pool

    def render(self, source: Path | bytes, width: Optional[int], fmt: str) -> bytes:
        """Blocking: the variant's bytes, rendered in a render process."""
        future = self._submit(render_variant, source, width, fmt, self.max_pixels)
        if future is None:
            _lower_thread_priority()
            return render_variant(source, width, fmt, self.max_pixels)
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise RenderProcessDied() from None

    def warm(self) -> Optional[int]:
        """Start the fork server and one render process now; returns its pid."""
        with contextlib.suppress(concurrent.futures.process.BrokenProcessPool, RenderProcessDied):
            future = self._submit(_render_process_pid)
            return None if future is None else future.result()
        return None

    def _submit(self, fn: Callable[..., Any], *args: Any, again: bool = True) -> Optional[concurrent.futures.Future]:
        """The call queued in a render process; None when renders run in threads."""
        pool = self._pool()
        if pool is None:
            return None
        try:
            future = pool.submit(fn, *args)
        except (concurrent.futures.process.BrokenProcessPool, RuntimeError):
            # A process died since the last render (or another thread just shut this
            # pool down for that): once more, on a new pool.
            self._discard(pool, "a render process died; starting new ones")
            if not again:
                raise RenderProcessDied() from None
            return self._submit(fn, *args, again=False)
        except OSError as exc:  # the fork server or a process could not be started here
            self._discard(pool, f"renders run in threads: no render processes ({exc})", for_good=True)
            return None
        future.add_done_callback(lambda f: self._check(pool, f))
        return future

    def _check(self, pool: concurrent.futures.ProcessPoolExecutor, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and isinstance(future.exception(), concurrent.futures.process.BrokenProcessPool):
            self._discard(pool, "a render process died; starting new ones")

    def _discard(self, pool: concurrent.futures.ProcessPoolExecutor, why: str, for_good: bool = False) -> None:
        with self.lock:
            if self.pool is pool:
                self.pool = None
                self.in_threads = self.in_threads or for_good
                log.warning("%s", why)
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Blocking: renders waiting are dropped, one running finishes (systemd's stop
        signals the render processes too). Waiting also keeps Python 3.11's exit hook
        from writing to the pool's closed wake-up pipe (a traceback at exit)."""
        with self.lock:
            pool, self.pool, self.closed = self.pool, None, True
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class VariantCache:
    """Rendered variants of the stored images: memory, disk, renders.

    A render runs in a pool sized to the cores, at most once at a time per
    variant: in this process one task is shared by everyone who asks (a dict
    of futures), across workers an flock on a striped lock file, taken before
    the disk is checked again. Too many distinct renders waiting answer 503.

    Disk use is bounded by `variant_cache_mb`. Recency is the file's mtime,
    refreshed by a hit at most once an hour, so a hit costs no write; a sweep
    removes the oldest files when the total grows past the budget.
    """

    def __init__(self, config: Config, storage: Storage):
        self.storage = storage
        self.widths = config.server.variant_widths
        self.max_pixels = config.server.max_pixels
        self.disk_budget = int(config.server.variant_cache_mb * 1024 * 1024)
        self.memory_budget = int(config.server.cache_mb * 1024 * 1024)
        Image.init()
        self.formats = tuple(f for f, (pil, _) in VARIANT_FORMATS.items() if pil in Image.SAVE)
        cores = os.cpu_count() or 1
        # These threads take the locks and write the files; renders run in self.renderers.
        self.pool = concurrent.futures.ThreadPoolExecutor(cores, thread_name_prefix="imgproxy-render")
        self.renderers = RenderProcesses(cores, self.max_pixels)
        self.queue_limit = cores * VARIANT_QUEUE_PER_CORE
        self.inflight: dict[str, asyncio.Future] = {}
        self.rendering = 0
        self.renders = 0  # renders done by this process (tests and benchmarks read it)
        self.memory: collections.OrderedDict[str, ServedImage] = collections.OrderedDict()
        self.memory_bytes = 0
        self.touched: dict[str, float] = {}
        self.transparency: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self.disk_bytes: Optional[int] = None  # unknown until the first sweep
        self.last_sweep = 0.0
        self.sweeper: Optional[asyncio.Task] = None

    async def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.sweeper
        self.pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.renderers.close)

    def size_width(self, size: str) -> Optional[int]:
        """The width a size label asks for (None: the original's); 400 if not offered."""
        if size == "full":
            return None
        if size.isdigit() and size.isascii() and int(size) in self.widths:
            return int(size)
        raise self.bad_variant(f"size {size[:20]!r} is not offered")

    def bad_variant(self, problem: str) -> web.HTTPException:
        sizes = ", ".join(["full", *map(str, self.widths)])
        return json_error(400, f"{problem}: sizes are {sizes}; formats are {', '.join(self.formats)}",
                          "bad_variant")

    async def choose_format(self, image: ServedImage, accept: Optional[str]) -> str:
        modern = accepted_modern_format(accept, self.formats)
        if modern:
            return modern
        if image.ext in ("jpg", "bmp"):
            return "jpg"
        see_through = self.transparency.get(image.md5)
        if see_through is None:
            head = image.path
            if isinstance(head, RemoteObject):  # the header is enough, and it comes first
                head = image.body or b"".join([c async for c in head.blobs.stream(head.key, 0, VARIANT_HEAD_BYTES - 1)])
            see_through = await asyncio.to_thread(source_has_transparency, head)
            self.transparency[image.md5] = see_through
            if len(self.transparency) > VARIANT_SOURCE_CACHE:
                self.transparency.popitem(last=False)
        return "png" if see_through else "jpg"

    async def get(self, image: ServedImage, size: str, width: Optional[int], fmt: str) -> ServedImage:
        """The variant, from memory, from disk or rendered now (raises 503 when busy)."""
        key = f"{image.md5}-{size}.{fmt}"
        entry = self.memory.get(key)
        if entry is not None:
            self.memory.move_to_end(key)
            self._touch(key, entry.path)
            return entry
        task = self.inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._obtain(key, image, size, width, fmt))
            self.inflight[key] = task
            task.add_done_callback(lambda _: self.inflight.pop(key, None))
        try:
            return await asyncio.wait_for(asyncio.shield(task), VARIANT_RENDER_SECONDS)
        except asyncio.TimeoutError:
            # The render goes on and is kept; this asker comes back for it.
            raise json_error(503, "this size is still being rendered; try again shortly", "unavailable",
                             {"Retry-After": "5"}) from None

    async def _obtain(self, key: str, image: ServedImage, size: str, width: Optional[int],
                      fmt: str) -> ServedImage:
        path = self.storage.variant_path(image.md5, size, fmt)
        data = await asyncio.to_thread(self._read_and_refresh, path)
        if data is None:
            if self.rendering >= self.queue_limit:
                raise json_error(503, "too many images are being resized right now; try again shortly",
                                 "unavailable", {"Retry-After": "2"})
            self.rendering += 1
            started = time.perf_counter()
            fetched: Optional[tuple[Path, int]] = None
            try:
                source = image.path
                if isinstance(source, RemoteObject):
                    source, fetched = await self._fetch_source(image)
                data, rendered = await asyncio.get_running_loop().run_in_executor(
                    self.pool, self._render_once, path, source, width, fmt)
            except FileNotFoundError:  # the image was deleted while we waited
                raise json_error(404, NO_SUCH_IMAGE, "not_found") from None
            except RenderProcessDied:
                raise json_error(503, "the resize was interrupted; try again shortly", "unavailable",
                                 {"Retry-After": "2"}) from None
            finally:
                self.rendering -= 1
                if fetched is not None:
                    await asyncio.to_thread(self._drop_source, *fetched)
            if rendered:
                self.renders += 1
                log.debug("rendered variant %s in %.0f ms", key, (time.perf_counter() - started) * 1000)
                if self.disk_bytes is not None:
                    self.disk_bytes += len(data)
                self._maybe_sweep()
        entry = ServedImage(hashlib.md5(data).hexdigest(), fmt, VARIANT_FORMATS[fmt][1], len(data), 0.0, path)
        if len(data) <= BODY_CACHE_MAX_FILE and len(data) <= self.memory_budget:
            entry.body = data
            self.memory_bytes += len(data)
        self.memory[key] = entry
        self.touched[key] = time.monotonic()
        while self.memory and (self.memory_bytes > self.memory_budget or len(self.memory) > META_CACHE_ENTRIES):
            old_key, old = self.memory.popitem(last=False)
            self.touched.pop(old_key, None)
            if old.body is not None:
                self.memory_bytes -= len(old.body)
        return entry

    async def _fetch_source(self, image: ServedImage) -> tuple[Path | bytes, Optional[tuple[Path, int]]]:
        """An original kept in the object store, for a render: its cached bytes,
        or a locked tmp/ copy (returned with its descriptor, for _drop_source)."""
        if image.body is not None:
            return image.body, None
        f = await asyncio.to_thread(image.path.open_local)
        if f is not None:  # this node's copy; read whole, so an eviction cannot pull it away mid-render
            try:
                return await asyncio.to_thread(f.read), None
            finally:
                await asyncio.to_thread(f.close)
        tmp, fd = await asyncio.to_thread(self.storage.create_tmp, "source")
        try:
            await image.path.blobs.download(image.path.key, tmp)
        except BaseException:
            await asyncio.to_thread(self._drop_source, tmp, fd)
            raise
        return tmp, (tmp, fd)

    def _drop_source(self, tmp: Path, fd: int) -> None:
        _unlink_quietly(tmp)
        self.storage.release_tmp(tmp, fd)

    def _read_and_refresh(self, path: Path) -> Optional[bytes]:
        try:
            with open(path, "rb") as f:
                data = f.read()
                if time.time() - os.fstat(f.fileno()).st_mtime > VARIANT_TOUCH_SECONDS:
                    os.utime(path)
                return data
        except FileNotFoundError:
            return None

    def _render_once(self, path: Path, source: Path, width: Optional[int], fmt: str) -> tuple[bytes, bool]:
        """Render to disk unless another process did meanwhile; returns (bytes, rendered here)."""
        stripe = hashlib.md5(path.name.encode()).digest()[0] % VARIANT_LOCK_STRIPES
        locks = self.storage.variants / "locks"
        locks.mkdir(exist_ok=True)
        lock_fd = os.open(locks / f"{stripe:02x}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                return path.read_bytes(), False
            data = self.renderers.render(source, width, fmt)
            # Locked while in tmp/, so no leftover sweep takes it from under us.
            tmp_path, fd = self.storage.create_tmp("variant")
            try:
                with open(fd, "wb", closefd=False) as f:
                    f.write(data)
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp_path, path)  # atomic: no reader or crash sees half a variant
            except BaseException:
                _unlink_quietly(tmp_path)
                raise
            finally:
                os.close(fd)
                self.storage.in_flight.discard(tmp_path.name)
            return data, True
        finally:
            os.close(lock_fd)

    def _touch(self, key: str, path: Path) -> None:
        now = time.monotonic()
        if now - self.touched.get(key, now) < VARIANT_TOUCH_SECONDS:
            return
        self.touched[key] = now
        asyncio.get_running_loop().run_in_executor(None, _touch_quietly, path)

    def _maybe_sweep(self) -> None:
        due = (self.disk_bytes is None or self.disk_bytes > self.disk_budget
               or time.monotonic() - self.last_sweep > VARIANT_SWEEP_SECONDS)
        if due and (self.sweeper is None or self.sweeper.done()):
            self.sweeper = asyncio.create_task(self.sweep(), name="imgproxy-variant-sweep")

    async def sweep(self) -> int:
        """Evict the least recently used variants beyond the budget; returns the bytes kept."""
        self.last_sweep = time.monotonic()
        kept, removed = await asyncio.to_thread(_evict_variants, self.storage, self.disk_budget)
        self.disk_bytes = kept
        for name in removed:
            self.forget_key(name)
        return kept

    def forget_key(self, key: str) -> None:
        old = self.memory.pop(key, None)
        self.touched.pop(key, None)
        if old is not None and old.body is not None:
            self.memory_bytes -= len(old.body)


def _touch_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _scan_variants(storage: Storage) -> list[tuple[str, os.stat_result, Path]]:
    """Every variant file as (its md5 or '' for foreign names, stat, path); lock files excluded."""
    found = []
    for dirpath, dirs, files in os.walk(storage.variants):
        if dirpath == str(storage.variants):
            dirs[:] = [d for d in dirs if d != "locks"]
        for f in files:
            path = Path(dirpath) / f
            with contextlib.suppress(FileNotFoundError):
                stem = f.partition("-")[0]
                found.append((stem if MD5_RE.fullmatch(stem) else "", path.stat(), path))
    return found


def _evict_variants(storage: Storage, budget: int) -> tuple[int, list[str]]:
    """Oldest mtime first until the variants fit in 90% of the budget (room for new ones)."""
    files = _scan_variants(storage)
    total = sum(st.st_size for _, st, _ in files)
    removed = []
    if total > budget:
        for _, st, path in sorted(files, key=lambda item: item[1].st_mtime):
            if total <= budget * 0.9:
                break
            total -= _unlink_quietly(path)
            removed.append(path.name)
    return total, removed


# ==== metadata ==================================================================
# Before an upload is stored, what can identify a person or a place goes: EXIF
# (GPS, serials, dates, maker notes), XMP, IPTC/Photoshop blocks, comments, text
# chunks, thumbnails, MPF secondary images and bytes after the image. What
# display needs stays: the ICC profile and the orientation (a lone Orientation
# tag). JPEG, PNG, GIF and WebP are edited as containers: a walk over their
# segments or chunks decides what goes, and everything else is copied byte for
# byte, so the decoded pixels are exactly the upload's. The walk reads headers
# only (plus a C-speed search for the end of JPEG scans), so an image with
# nothing to remove costs no copy. A file the walk does not fully understand is
# left alone: inspection already accepted it, and a guess could break it.
# TIFF and AVIF, whose metadata lives inside structures with offsets, are
# re-encoded with Pillow (TIFF losslessly) only when they carry metadata.

ORIENTATION = 0x0112
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker, not stuffing or a restart
_PNG_KEEP = frozenset({b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"bKGD", b"hIST",
                       b"pHYs", b"acTL", b"fcTL", b"fdAT", b"cICP", b"mDCV", b"cLLI"})
_WEBP_KEEP = frozenset({b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF", b"ICCP"})
_GIF_KEEP_APPS = frozenset({b"\x0bNETSCAPE2.0", b"\x0bANIMEXTS1.0", b"\x0bICCRGBG1012"})
# TIFF tags that describe pixels (layout, colour, resolution, ICC, orientation);
# any other tag (dates, software, GPS and Exif IFDs, XMP, IPTC ...) means re-encode.
_TIFF_STRUCTURE = frozenset({254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 274, 277, 278, 279,
                             280, 281, 282, 283, 284, 286, 287, 292, 293, 296, 317, 318, 319, 320,
                             322, 323, 324, 325, 338, 339, 340, 341, 347, 529, 530, 531, 532, 34675})
HEIF_JPEG_QUALITY = 92
AVIF_QUALITY = 90

def exif_orientation(tiff: bytes) -> int:
    """The Orientation (1-8) in an Exif TIFF block, 1 when absent or malformed."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    ifd = int.from_bytes(tiff[4:8], "little" if order == "<" else "big")
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind, n = struct.unpack_from(order + "HHI", tiff, entry)
        if tag == ORIENTATION:
            value = struct.unpack_from(order + "H", tiff, entry + 8)[0] if kind == 3 and n >= 1 else 1
            return value if 1 <= value <= 8 else 1
    return 1


def minimal_exif(orientation: int) -> bytes:
    """An Exif TIFF block holding nothing but the Orientation tag."""
    return b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">HHHIHHI", 1, ORIENTATION, 3, 1, orientation, 0, 0)


class _Cuts:
    """Collects the pieces of a rewritten file: (start, end) ranges of the source
    to copy and bytes to insert, in order."""

    def __init__(self) -> None:
        self.pieces: list = []
        self.kept_from = 0
        self.changed = False

    def cut(self, start: int, end: int, replacement: bytes = b"") -> None:
        if start > self.kept_from:
            self.pieces.append((self.kept_from, start))
        if replacement:
            self.pieces.append(replacement)
        self.kept_from = end
        self.changed = True

    def finish(self, end: int, size: int) -> Optional[list]:
        if end < size:
            self.cut(end, size)  # trailing bytes: polyglots, appended previews
        if not self.changed:
            return None
        if end > self.kept_from:
            self.pieces.append((self.kept_from, end))
        return self.pieces


def _jpeg_cuts(buf) -> Optional[list]:
    n = len(buf)
    if buf[:3] != b"\xff\xd8\xff":
        return None
    cuts, pos, seen_exif, steps = _Cuts(), 2, False, 0
    while True:
        steps += 1
        if steps > JPEG_MAX_SEGMENTS * 8 or pos + 2 > n or buf[pos] != 0xFF:
            return None  # garbled or truncated: leave it as it is
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return cuts.finish(pos + 2, n)
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(buf[pos + 2:pos + 4], "big")
        if end < pos + 4 or end > n:
            return None
        if marker == 0xDA:  # scan data up to the next real marker, kept as it is
            found = _JPEG_SCAN_END.search(buf, end)
            if found is None:
                return None
            pos = found.start()
            continue
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            head = buf[pos + 4:min(end, pos + 16)]
            needed = ((marker == 0xE0 and head.startswith(b"JFIF\0"))
                      or (marker == 0xE2 and head.startswith(b"ICC_PROFILE\0"))
                      or (marker == 0xEE and head.startswith(b"Adobe")))  # colour transform
            if not needed:
                replacement = b""
                if marker == 0xE1 and head.startswith(b"Exif\0\0") and not seen_exif:
                    seen_exif = True  # readers use the first Exif block only
                    orientation = exif_orientation(buf[pos + 10:end])
                    if orientation != 1:
                        payload = b"Exif\0\0" + minimal_exif(orientation)
                        replacement = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
                if replacement != buf[pos:end]:  # an already minimal Exif stays
                    cuts.cut(pos, end, replacement)
            elif marker == 0xE0 and end - pos > 18:  # a JFIF header with a thumbnail: keep the header only
                cuts.cut(pos, end, b"\xff\xe0\x00\x10" + buf[pos + 4:pos + 16] + b"\x00\x00")
        pos = end


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _png_cuts(buf) -> Optional[list]:
    n = len(buf)
    if buf[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    cuts, pos, seen_exif = _Cuts(), 8, False
    while True:
        if pos + 12 > n:
            return None
        length = int.from_bytes(buf[pos:pos + 4], "big")
        kind = bytes(buf[pos + 4:pos + 8])
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > n or not kind.isalpha():
            return None
        if kind == b"IEND":
            return cuts.finish(end, n)
        if kind[0] & 0x20 and kind not in _PNG_KEEP:  # ancillary and not needed to display
            replacement = b""
            if kind == b"eXIf" and not seen_exif:
                seen_exif = True
                orientation = exif_orientation(buf[pos + 8:end - 4])
                if orientation != 1:
                    replacement = _png_chunk(b"eXIf", minimal_exif(orientation))
            if replacement != buf[pos:end]:
                cuts.cut(pos, end, replacement)
        pos = end


def _gif_cuts(buf) -> Optional[list]:
    n = len(buf)
    if n < 13 or buf[:6] not in (b"GIF87a", b"GIF89a"):
        return None

    def after_sub_blocks(p: int) -> int:
        while p < n:
            size = buf[p]
            p += 1 + size
            if size == 0:
                return p
        return -1

    pos = 13 + (3 << ((buf[10] & 7) + 1) if buf[10] & 0x80 else 0)
    cuts = _Cuts()
    while pos < n:
        intro = buf[pos]
        if intro == 0x3B:  # trailer
            return cuts.finish(pos + 1, n)
        if intro == 0x2C:  # image: descriptor, local colour table, LZW data
            if pos + 11 > n:
                return None
            packed = buf[pos + 9]
            end = after_sub_blocks(pos + 11 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0))
        elif intro == 0x21 and pos + 2 <= n:  # extension: comments and foreign application data go
            label = buf[pos + 1]
            end = after_sub_blocks(pos + 2)
            if end > 0 and (label == 0xFE or (label == 0xFF and bytes(buf[pos + 2:pos + 14]) not in _GIF_KEEP_APPS)):
                cuts.cut(pos, end)
        else:
            return None
        if end < 0:
            return None
        pos = end
    return None


def _webp_cuts(buf) -> Optional[list]:
    n = len(buf)
    if n < 20 or buf[:4] != b"RIFF" or buf[8:12] != b"WEBP":
        return None
    riff_end = 8 + int.from_bytes(buf[4:8], "little")
    if riff_end > n:
        return None
    kept: list = []
    changed, seen_exif, exif_kept, vp8x = riff_end < n, False, False, -1
    pos = 12
    while pos < riff_end:
        if pos + 8 > riff_end:
            return None
        fourcc = bytes(buf[pos:pos + 4])
        size = int.from_bytes(buf[pos + 4:pos + 8], "little")
        end = pos + 8 + size + (size & 1)
        if end > riff_end:
            if pos + 8 + size != riff_end:  # only the last chunk may miss its pad byte
                return None
            end = riff_end
        if fourcc in _WEBP_KEEP:
            if fourcc == b"VP8X":
                if size < 10:
                    return None
                vp8x = len(kept)
            kept.append((pos, end))
        elif fourcc == b"EXIF" and not seen_exif:
            seen_exif = True
            data = buf[pos + 8:pos + 8 + size]
            orientation = exif_orientation(data[6:] if data.startswith(b"Exif\0\0") else data)
            if orientation != 1:
                exif = minimal_exif(orientation)
                chunk = b"EXIF" + len(exif).to_bytes(4, "little") + exif
                exif_kept = True
                changed = changed or chunk != buf[pos:end]
                kept.append(chunk)
            else:
                changed = True
        else:
            changed = True  # XMP, further EXIF, unknown chunks
        pos = end
    if not changed:
        return None
    if vp8x >= 0:  # the feature flags must match the chunks that are left
        start, end = kept[vp8x]
        flags = buf[start + 8] & ~(0x04 | (0 if exif_kept else 0x08))
        kept[vp8x] = buf[start:start + 8] + bytes([flags]) + buf[start + 9:end]
    body = sum(p[1] - p[0] if isinstance(p, tuple) else len(p) for p in kept)
    return [b"RIFF" + (4 + body).to_bytes(4, "little") + b"WEBP", *kept]


_CUTTERS = {"JPEG": _jpeg_cuts, "PNG": _png_cuts, "GIF": _gif_cuts, "WEBP": _webp_cuts}


def metadata_cuts(source: bytes, fmt: str) -> Optional[list]:
    """How to rewrite `source` without its metadata (pieces), or None when
    nothing needs removing or the container is not one we edit in place."""
    cutter = _CUTTERS.get(fmt)
    return None if cutter is None else cutter(source)


def _write_pieces(buf, pieces: list, path: Path) -> tuple[str, int]:
    """Write the pieces to a new file at `path`; returns (md5, size)."""
    digest, size = hashlib.md5(), 0
    view = memoryview(buf)  # ranges of the source without copying them
    try:
        # Normally made already, empty and locked, by Storage.create_tmp.
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as out:
            for piece in pieces:
                chunk = view[piece[0]:piece[1]] if isinstance(piece, tuple) else piece
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
                del chunk  # an mmap cannot close while a view of it lives
    finally:
        view.release()
    return digest.hexdigest(), size


def _open_source(source: bytes | Path) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def _clean_copy(frame: Image.Image) -> Image.Image:
    """Pixels only: a plain Image (a TIFF file's tags do not follow) with no info."""
    copy = frame.copy()
    copy.info = {}
    return copy


def _tiff_without_metadata(source: bytes | Path) -> Optional[bytes]:
    with _open_source(source) as im:
        frames = getattr(im, "n_frames", 1)
        tags: set[int] = set()
        turned = False
        for i in range(frames):
            im.seek(i)
            tags.update(im.tag_v2.keys())
            turned = turned or im.tag_v2.get(ORIENTATION, 1) != 1
        if tags <= _TIFF_STRUCTURE and not turned:
            return None
        icc = im.info.get("icc_profile")
        out = io.BytesIO()
        # Page by page, as inspection decoded them: holding every page at once
        # would let ten pages at max_pixels cost ten decode budgets.
        with TiffImagePlugin.AppendingTiffWriter(out) as tiff:
            for i in range(frames):
                im.seek(i)
                page = _clean_copy(ImageOps.exif_transpose(im))
                page.save(tiff, "TIFF", icc_profile=icc,
                          compression="group4" if page.mode == "1" else "tiff_adobe_deflate")
                tiff.newFrame()
                del page
    return out.getvalue()


def _avif_without_metadata(source: bytes | Path, memory_budget: Optional[int] = None) -> Optional[bytes]:
    with _open_source(source) as im:
        exif = im.getexif()
        if "xmp" not in im.info and set(exif) <= {ORIENTATION}:
            return None
        # Removing an AVIF's metadata means re-encoding every frame, which holds
        # them all at several times the decode's cost: a small animated file
        # could take gigabytes. Over the per-upload budget it is refused.
        need = getattr(im, "n_frames", 1) * im.width * im.height * AVIF_REWRITE_COST
        if memory_budget is not None and need > memory_budget:
            raise UploadRejected(413, "too_many_pixels",
                                 "this AVIF carries metadata (EXIF/XMP), and removing it means re-encoding "
                                 f"{getattr(im, 'n_frames', 1)} frame(s) of {im.width}x{im.height}, more than "
                                 "one upload may use; remove its metadata before uploading, or upload it as "
                                 "JPEG, PNG or WebP")
        orientation = exif.get(ORIENTATION, 1)
        icc = im.info.get("icc_profile")
        frames, durations = [], []
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            durations.append(im.info.get("duration", 0))
            frames.append(_clean_copy(im))
    out = io.BytesIO()
    extra: dict[str, Any] = {"exif": minimal_exif(orientation)} if orientation != 1 else {}
    if len(frames) > 1:
        extra.update(save_all=True, append_images=frames[1:], duration=durations)
    frames[0].save(out, "AVIF", quality=AVIF_QUALITY, icc_profile=icc, **extra)
    return out.getvalue()


def heif_to_jpeg(source: bytes | Path) -> bytes:
    """The primary image of a HEIC/HEIF as a JPEG: orientation applied, ICC kept."""
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                    formats=["HEIF"]) as im:  # pillow-heif opens the primary image first
        icc = im.info.get("icc_profile")
        frame = ImageOps.exif_transpose(im)
    if frame.mode in ("RGBA", "LA", "PA") or (frame.mode == "P" and "transparency" in frame.info):
        rgba = frame.convert("RGBA")
        frame = Image.new("RGB", rgba.size, (255, 255, 255))
        frame.paste(rgba, mask=rgba.getchannel("A"))  # JPEG has no alpha: show it on white
    elif frame.mode not in ("RGB", "L", "CMYK"):
        frame = frame.convert("RGB")
    out = io.BytesIO()
    # No optimize=True: libjpeg's extra Huffman pass holds the GIL for the whole
    # encode (1.5 s of stalled event loop for 12 MP in bench/strip.py).
    _clean_copy(frame).save(out, "JPEG", quality=HEIF_JPEG_QUALITY, icc_profile=icc)
    return out.getvalue()


def looks_like_heif(head: bytes) -> bool:
    """An ISO-BMFF file whose brands say HEIF/HEIC (and not AVIF)."""
    if head[4:8] != b"ftyp":
        return False
    box = min(int.from_bytes(head[:4], "big"), len(head))
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, box - 3, 4)}
    return bool(brands & {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}) \
        and not brands & {b"avif", b"avis"}


def heif_support() -> bool:
    """Register pillow-heif's opener if the package is installed (it is optional)."""
    if "HEIF" in Image.OPEN:
        return True
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def inspect_upload(source: bytes | Path, size: int, formats: tuple[str, ...], max_pixels: int,
                   png_checked: bool = False) -> ImageFacts:
    """inspect_image over the formats this Pillow can open; a HEIC the server
    cannot read gets a 415 that says how to enable it."""
    openable = tuple(f for f in formats if _pillow_has(f))
    if "HEIF" in formats and "HEIF" not in openable:
        with (io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")) as f:
            if looks_like_heif(f.read(64)):
                raise UploadRejected(415, "unsupported_image", HEIF_HOWTO)
    if not openable:
        raise UploadRejected(415, "unsupported_image", HEIF_HOWTO)
    return inspect_image(source, size, openable, max_pixels, png_checked=png_checked)


def prepare_stored(source: bytes | Path, facts: ImageFacts, tmp: Callable[[], Path],
                   strip: bool, max_pixels: Optional[int] = None) -> Optional[tuple[str, ImageFacts, Path]]:
    """The bytes to store instead of the upload, as (md5, facts, file under tmp/),
    or None to store the upload as it is. Blocking: runs in the upload's worker
    thread, after inspect_image accepted the upload (every limit applied).
    `max_pixels` sets the memory budget of a re-encode as for a decode."""
    new_bytes: Optional[bytes] = None
    fmt = facts.format
    budget = None if max_pixels is None else DECODE_BYTES_PER_PIXEL * max_pixels + facts.size + DECODE_SLACK
    reencode = {"TIFF": _tiff_without_metadata, "HEIF": heif_to_jpeg,
                "AVIF": functools.partial(_avif_without_metadata, memory_budget=budget)}
    if fmt in reencode and (strip or fmt in CONVERTED_FORMATS):
        try:
            new_bytes = reencode[fmt](source)
        except UploadRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - an encoder failing on odd input is a refusal, not a 500
            log.debug("could not re-encode a %s: %r", fmt, exc)
            raise UploadRejected(415, "unsupported_image", f"this {fmt} image could not be converted or "
                                 f"cleaned of metadata ({type(exc).__name__})") from None
        fmt = CONVERTED_FORMATS.get(fmt, fmt)
    elif not strip:
        return None
    elif fmt in _CUTTERS:
        with contextlib.ExitStack() as stack:
            buf = source
            if not isinstance(source, (bytes, bytearray)):
                f = stack.enter_context(open(source, "rb"))
                buf = stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            pieces = metadata_cuts(buf, fmt)
            if pieces is None:
                return None
            path = tmp()
            try:
                md5, size = _write_pieces(buf, pieces, path)
            except BaseException:
                _unlink_quietly(path)
                raise
        return md5, dataclasses.replace(facts, size=size, frames=1 if fmt == "JPEG" else facts.frames), path
    if new_bytes is None:
        return None
    path = tmp()
    md5, size = _write_pieces(new_bytes, [(0, len(new_bytes))], path)
    with Image.open(io.BytesIO(new_bytes)) as im:
        width, height = im.size
    return md5, ImageFacts(fmt, width, height, size, facts.frames if fmt == facts.format else 1), path


# ==== metrics ===================================================================
# GET /metrics when metrics.enable: Prometheus text, written by prometheus-client
# (an optional package, imported only then) from counters kept here.

CLEANUP_SECONDS_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)
UPLOAD_ROUTES = frozenset({"/upload", "/upload/{filename}"})
_COUNTED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE"})


def metrics_dir(config: Config) -> Path:
    return Path(config.server.data_dir) / "metrics"


class Metrics:
    """What /metrics reports, counted as plain ints and dicts on the event loop.

    prometheus-client's own Counter takes a lock on every inc() (and in its
    multiprocess mode writes to a mapped file), so every served image would pay
    for it. One dict update from the one event-loop thread needs no lock, and
    prometheus-client only writes out the exposition when someone scrapes.

    With server.workers > 1 each worker writes its counts to
    {data_dir}/metrics/<pid>.json at most once per METRICS_SNAPSHOT_SECONDS, and
    only when they changed (an idle server writes nothing); the worker that
    answers a scrape adds its siblings' files to its own live counts. Their
    figures may lag by that second; no request pays for the aggregation. The
    folder is emptied before the workers start, so a restart is a counter reset,
    which Prometheus expects.
    """

    def __init__(self, snapshot_dir: Optional[Path] = None):
        self.snapshot_dir = snapshot_dir
        self.store: Optional[ImageStore] = None  # its serving-cache counts are read at scrape time
        # Keyed by aiohttp's resource object (None: no route matched), not its
        # template text: hashing an object is cheaper than building the string.
        self.requests: collections.defaultdict[tuple[Any, str, int], int] = collections.defaultdict(int)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.uploads: dict[str, int] = {}
        self.signins: dict[str, int] = {}
        self.cleanup_passes: dict[str, int] = {}
        self.cleanup_removed: dict[str, int] = {}
        self.cleanup_freed = 0
        self.cleanup_buckets = [0] * len(CLEANUP_SECONDS_BUCKETS)
        self.cleanup_seconds = 0.0

    # -- counting (event loop only) --
    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        # Runs for every answer, the served images included: kept to a few
        # attribute reads and dict updates (about a microsecond).
        route = request.match_info.route
        resource = route.resource
        method = request.method
        status = response.status
        if resource is None:
            # No route matched (404, 405): the path is the client's text and would
            # make a label per URL; it is counted under one name.
            self.requests[None, method if method in _COUNTED_METHODS else "OTHER", status] += 1
        else:
            self.requests[resource, route.method, status] += 1
        if status != 304 and method != "HEAD":
            body = response.body if isinstance(response, web.Response) else None
            # A body in memory has its length at hand; parsing Content-Length costs more.
            self.bytes_sent += len(body) if type(body) is bytes else response.content_length or 0
        self.bytes_received += request.content.total_bytes
        if method in ("PUT", "POST") and resource is not None and resource.canonical in UPLOAD_ROUTES:
            self.count(self.uploads, self._upload_outcome(response))

    @staticmethod
    def _upload_outcome(response: web.StreamResponse) -> str:
        if response.status == 201:
            return "uploaded"
        if response.status == 200:
            return "exists"
        if isinstance(response, ApiError):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return str(json.loads(response.text)["code"])
        return _STATUS_CODES.get(response.status, "error")

    @staticmethod
    def count(table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def count_cleanup(self, report: Optional["CleanupReport"], seconds: float) -> None:
        """One scheduled pass: `report` is None when it failed."""
        if report is None:
            result = "failed"
        elif report.skipped:
            result = "skipped"
        else:
            result = "done"
            for kind in ("expired", "orphan_files", "dangling_rows", "temp_files"):
                self.cleanup_removed[kind] = self.cleanup_removed.get(kind, 0) + getattr(report, kind)
            self.cleanup_freed += report.bytes_freed
        self.count(self.cleanup_passes, result)
        self.cleanup_seconds += seconds
        for i, bound in enumerate(CLEANUP_SECONDS_BUCKETS):
            if seconds <= bound:
                self.cleanup_buckets[i] += 1

    # -- snapshots: this process's counts as JSON-able data --
    def snapshot(self) -> dict:
        store = self.store
        return {
            "requests": [["unmatched" if resource is None else resource.canonical, method, status, n]
                         for (resource, method, status), n in self.requests.items()],
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "uploads": dict(self.uploads),
            "signins": dict(self.signins),
            "cache_hits": store.cache_hits if store else 0,
            "cache_misses": store.cache_misses if store else 0,
            "cleanup_passes": dict(self.cleanup_passes),
            "cleanup_removed": dict(self.cleanup_removed),
            "cleanup_freed": self.cleanup_freed,
            "cleanup_buckets": list(self.cleanup_buckets),
            "cleanup_seconds": self.cleanup_seconds,
        }

    def _snapshot_path(self) -> Path:
        return self.snapshot_dir / f"{os.getpid()}.json"

    def write_snapshot(self, snap: dict) -> None:
        """Blocking (worker thread); atomic, so a scraping sibling never reads half a file."""
        final = self._snapshot_path()
        tmp = final.with_suffix(".part")
        tmp.write_text(json.dumps(snap), encoding="utf-8")
        os.replace(tmp, final)

    def read_siblings(self) -> list[dict]:
        """Blocking (worker thread): the other workers' latest snapshots."""
        own = self._snapshot_path().name
        snaps = []
        with contextlib.suppress(FileNotFoundError):
            for path in self.snapshot_dir.glob("*.json"):
                if path.name != own:
                    with contextlib.suppress(OSError, ValueError):
                        snaps.append(json.loads(path.read_text(encoding="utf-8")))
        return snaps

    async def keep_snapshot(self) -> None:
        """Background task of each worker when server.workers > 1."""
        last: Optional[dict] = None
        warned = False
        while True:
            snap = self.snapshot()
            if snap != last:
                try:
                    await asyncio.to_thread(self.write_snapshot, snap)
                    last, warned = snap, False
                except OSError as exc:
                    if not warned:
                        log.warning("cannot write metrics snapshot (other workers' /metrics lag): %s", exc)
                        warned = True
            await asyncio.sleep(METRICS_SNAPSHOT_SECONDS)

    # -- exposition --
    async def exposition(self) -> bytes:
        snaps = [self.snapshot()]
        if self.snapshot_dir is not None:
            snaps += await asyncio.to_thread(self.read_siblings)
        return render_metrics(snaps)


def _sum_snapshots(snaps: list[dict]) -> dict:
    # Known outcomes start at 0 so that a dashboard's rate() sees the first one.
    total: dict = {"requests": {}, "uploads": {"uploaded": 0, "exists": 0},
                   "signins": {"failed": 0, "blocked": 0},
                   "cleanup_passes": {"done": 0, "skipped": 0, "failed": 0}, "cleanup_removed": {},
                   "cleanup_buckets": [0] * len(CLEANUP_SECONDS_BUCKETS)}
    for snap in snaps:
        for route, method, status, n in snap.get("requests", []):
            key = (route, method, status)
            total["requests"][key] = total["requests"].get(key, 0) + n
        for table in ("uploads", "signins", "cleanup_passes", "cleanup_removed"):
            for key, n in snap.get(table, {}).items():
                total[table][key] = total[table].get(key, 0) + n
        for name in ("bytes_sent", "bytes_received", "cache_hits", "cache_misses", "cleanup_freed",
                     "cleanup_seconds"):
            total[name] = total.get(name, 0) + snap.get(name, 0)
        for i, n in enumerate(snap.get("cleanup_buckets", [])[:len(CLEANUP_SECONDS_BUCKETS)]):
            total["cleanup_buckets"][i] += n
    return total


def render_metrics(snaps: list[dict]) -> bytes:
    """Prometheus text exposition of the summed snapshots (one per worker)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    t = _sum_snapshots(snaps)

    def labelled(name: str, doc: str, labels: list[str], table: dict) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=labels)
        for key, n in sorted(table.items()):
            family.add_metric([str(k) for k in (key if isinstance(key, tuple) else (key,))], n)
        return family

    def families() -> Iterable[Any]:
        yield GaugeMetricFamily("imgproxy_worker_processes", "Processes whose counts are summed here",
                                value=len(snaps))
        yield labelled("imgproxy_http_requests", "HTTP answers by route template, method and status",
                       ["route", "method", "status"], t["requests"])
        yield CounterMetricFamily("imgproxy_http_sent_bytes", "Response body bytes sent (HEAD and 304 send none)",
                                  value=t["bytes_sent"])
        yield CounterMetricFamily("imgproxy_http_received_bytes", "Request body bytes received",
                                  value=t["bytes_received"])
        yield labelled("imgproxy_uploads", "Uploads by outcome: uploaded, exists, or the error code",
                       ["outcome"], t["uploads"])
        yield CounterMetricFamily("imgproxy_serving_cache_hits", "Image requests answered from the serving cache",
                                  value=t["cache_hits"])
        yield CounterMetricFamily("imgproxy_serving_cache_misses", "Image requests that read the database",
                                  value=t["cache_misses"])
        yield labelled("imgproxy_signins", "Refused sign-ins: failed (wrong credentials) or blocked (429)",
                       ["result"], t["signins"])
        yield labelled("imgproxy_cleanup_passes", "Scheduled cleanup passes by result: done, skipped, failed",
                       ["result"], t["cleanup_passes"])
        yield labelled("imgproxy_cleanup_removed", "What scheduled cleanup passes removed, by kind",
                       ["kind"], t["cleanup_removed"])
        yield CounterMetricFamily("imgproxy_cleanup_freed_bytes", "Bytes freed by scheduled cleanup passes",
                                  value=t["cleanup_freed"])
        buckets = [(repr(bound), n) for bound, n in zip(CLEANUP_SECONDS_BUCKETS, t["cleanup_buckets"])]
        buckets.append(("+Inf", sum(t["cleanup_passes"].values())))  # counts are cumulative already
        yield HistogramMetricFamily("imgproxy_cleanup_duration_seconds", "Duration of scheduled cleanup passes",
                                    buckets=buckets, sum_value=t["cleanup_seconds"])

    class Collector:
        def collect(self) -> Iterable[Any]:
            return families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry)


# ==== auth ======================================================================

class SignInWait(Exception):
    """The limiter refused to run a check now; retry after `seconds`."""

    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.seconds = seconds


class _Attempts:
    """What the limiter knows of one address."""
    __slots__ = ("failures", "blocked_until", "pending", "slots")

    def __init__(self) -> None:
        self.failures: collections.deque[float] = collections.deque()  # recent, oldest first
        self.blocked_until = 0.0
        self.pending = 0  # admitted checks without a verdict yet
        self.slots: Optional[asyncio.Semaphore] = None


class Authenticator:
    """HTTP Basic against the config's users, with a limiter for guessing.

    The limiter admits a check only while the address's recent failures plus
    its undecided checks stay under AUTH_FAIL_LIMIT, so a burst of concurrent
    guesses gets that many verdicts and 429 for the rest, not a verdict each.
    AUTH_FAIL_LIMIT failures within AUTH_FAIL_WINDOW block the address for
    AUTH_BLOCK_SECONDS from the last of them, exactly what Retry-After says;
    after that it starts from zero.

    Timing does not tell which users exist, whatever the config mixes: when any
    user has a password_hash, every check runs one scrypt in the password
    threads (the user's own hash, or for a plain or missing user an
    unmatchable hash with the costliest configured settings), and a failed
    check is held back to a floor measured from that costliest hash, so users
    whose hash is cheaper fail no faster. With plain passwords only, every
    check is one compare of digests. A successful (user, password) pair is
    remembered as an HMAC under a per-process key, so scrypt runs once per
    client, not per request; identical checks running at once share one.
    """

    def __init__(self, users: Iterable[UserConfig], clock: Callable[[], float] = time.monotonic):
        self.users = {u.username: u for u in users}
        self._plain = {u.username: hashlib.sha256(u.password.encode()).digest()
                       for u in self.users.values() if u.password is not None}
        self._key = secrets.token_bytes(32)
        hashes = [u.password_hash for u in self.users.values() if u.password_hash]
        costliest = max(hashes, key=lambda h: math.prod(_parse_scrypt_hash(h)[:3]), default=None)
        self._dummy_hash = _unmatchable_hash_like(costliest) if costliest else None
        self._dummy_plain = hashlib.sha256(secrets.token_bytes(16)).digest()
        self._failed_check_floor: Optional[float] = None  # seconds, measured on first use
        self._hash_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._accepted: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._checking: dict[bytes, asyncio.Future] = {}
        self._failures: collections.OrderedDict[str, _Attempts] = collections.OrderedDict()
        self.clock = clock

    def close(self) -> None:
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=False, cancel_futures=True)
            self._hash_pool = None

    # -- the limiter --
    @staticmethod
    def _limiter_key(address: str) -> str:
        """One IPv6 client owns a whole /64: count its failures together."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if ip.version == 4:
            return address
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))

    @staticmethod
    def _recent_failures(entry: _Attempts, now: float) -> int:
        while entry.failures and now - entry.failures[0] >= AUTH_FAIL_WINDOW:
            entry.failures.popleft()
        return len(entry.failures)

    def blocked_for(self, address: str) -> float:
        """Seconds this address must wait before its next check (0: go ahead)."""
        entry = self._failures.get(self._limiter_key(address))
        if entry is None:
            return 0.0
        now = self.clock()
        if entry.blocked_until > now:
            return entry.blocked_until - now
        if entry.pending and self._recent_failures(entry, now) + entry.pending >= AUTH_FAIL_LIMIT:
            return 1.0  # checks already running may use up the allowance; ask again then
        return 0.0

    def admit(self, address: str) -> float:
        """Reserve a check for this address before it runs: 0.0, or the seconds to wait."""
        wait = self.blocked_for(address)
        if wait > 0:
            return wait
        key = self._limiter_key(address)
        entry = self._failures.get(key)
        if entry is None:
            entry = self._failures[key] = _Attempts()
            self._bound_table()
        entry.pending += 1
        return 0.0

    def settle(self, address: str, failed: bool) -> None:
        """The verdict of a check that admit() reserved."""
        key = self._limiter_key(address)
        entry = self._failures.get(key)
        if entry is not None:
            entry.pending = max(0, entry.pending - 1)
        if failed:
            self.record_failure(address)
        elif entry is not None and not entry.pending and not entry.failures \
                and entry.blocked_until <= self.clock():
            del self._failures[key]

    def _check_slots(self, address: str) -> asyncio.Semaphore:
        """At most AUTH_CHECKS_PER_ADDRESS checks of one address run at once;
        its other admitted checks wait their turn (there are few: see admit)."""
        entry = self._failures.get(self._limiter_key(address))
        if entry is None:  # dropped from a full table meanwhile: do not hold it up
            return asyncio.Semaphore(AUTH_CHECKS_PER_ADDRESS)
        if entry.slots is None:
            entry.slots = asyncio.Semaphore(AUTH_CHECKS_PER_ADDRESS)
        return entry.slots

    def record_failure(self, address: str) -> None:
        key = self._limiter_key(address)
        now = self.clock()
        entry = self._failures.get(key)
        if entry is None:
            entry = self._failures[key] = _Attempts()
        else:
            self._failures.move_to_end(key)
        self._recent_failures(entry, now)
        entry.failures.append(now)
        if len(entry.failures) >= AUTH_FAIL_LIMIT:
            entry.blocked_until = now + AUTH_BLOCK_SECONDS
            entry.failures.clear()  # after the block the address starts from zero
        self._bound_table()

    def _bound_table(self) -> None:
        if len(self._failures) <= AUTH_FAIL_TABLE:
            return
        # Many addresses at once (a botnet): drop entries that no longer
        # matter, then the least recently failed, down to 90%, so that one scan
        # pays for many failures and the table never outgrows its cap.
        now = self.clock()
        for key in [k for k, e in self._failures.items() if not e.pending and e.blocked_until <= now
                    and (not e.failures or now - e.failures[-1] >= AUTH_FAIL_WINDOW)]:
            del self._failures[key]
        for key in list(itertools.islice(self._failures, max(0, len(self._failures) - AUTH_FAIL_TABLE * 9 // 10))):
            del self._failures[key]

    # -- checking a password --
    def _hash_job(self, user: Optional[UserConfig], password: str) -> tuple[bool, float]:
        """(matches, seconds spent): one scrypt, whoever `user` is. Runs in the
        password threads."""
        if self._failed_check_floor is None:
            started = time.perf_counter()
            verify_password_hash("", self._dummy_hash)
            self._failed_check_floor = AUTH_FAILED_CHECK_FACTOR * (time.perf_counter() - started)
        started = time.perf_counter()
        if user is not None and user.password_hash is not None:
            ok = verify_password_hash(password, user.password_hash)
        else:
            verify_password_hash(password, self._dummy_hash)
            expected = self._plain.get(user.username) if user is not None else None
            ok = hmac.compare_digest(hashlib.sha256(password.encode()).digest(), expected or self._dummy_plain) \
                and expected is not None
        return ok, time.perf_counter() - started

    async def _verify(self, username: str, password: str) -> bool:
        user = self.users.get(username)
        if self._dummy_hash is None:  # plain passwords only: one compare of digests, like it or not
            expected = self._plain.get(username)
            same = hmac.compare_digest(hashlib.sha256(password.encode()).digest(), expected or self._dummy_plain)
            return same and expected is not None
        if self._hash_pool is None:
            self._hash_pool = concurrent.futures.ThreadPoolExecutor(
                AUTH_HASH_THREADS, thread_name_prefix="imgproxy-password")
        ok, spent = await asyncio.get_running_loop().run_in_executor(self._hash_pool, self._hash_job, user, password)
        if not ok:
            # Held back on the event loop, not in a password thread.
            await asyncio.sleep(max(0.0, (self._failed_check_floor or 0.0) - spent))
        return ok

    async def _limited_verify(self, username: str, password: str, address: Optional[str]) -> bool:
        if address is None:
            return await self._verify(username, password)
        ok = False
        try:
            async with self._check_slots(address):
                ok = await self._verify(username, password)
        finally:
            self.settle(address, failed=not ok)
        return ok

    def _malformed(self, address: Optional[str]) -> None:
        if address is not None:
            self.record_failure(address)

    async def check(self, header: Optional[str], address: Optional[str] = None) -> Optional[UserConfig]:
        """The user for an Authorization header, or None. With `address`, the
        limiter admits the check first (or raises SignInWait) and counts it."""
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return self._malformed(address)
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return self._malformed(address)
        username, sep, password = decoded.partition(":")
        if not sep:
            return self._malformed(address)
        memo = hmac.new(self._key, decoded.encode(), hashlib.sha256).digest()
        if memo in self._accepted:
            self._accepted.move_to_end(memo)
            return self.users.get(self._accepted[memo])
        running = self._checking.get(memo)
        if running is None:
            # Only a new guess costs an attempt: requests repeating one already
            # being checked wait for its verdict (a client opening many
            # connections at once with the right password is not refused).
            if address is not None:
                wait = self.admit(address)
                if wait > 0:
                    raise SignInWait(wait)
            # Its own task: the verdict is recorded even if the client leaves.
            running = self._checking[memo] = asyncio.ensure_future(
                self._limited_verify(username, password, address))
            running.add_done_callback(lambda _: self._checking.pop(memo, None))
        if not await asyncio.shield(running):
            return None
        self._accepted[memo] = username
        if len(self._accepted) > 1024:
            self._accepted.popitem(last=False)
        return self.users.get(username)


def new_token_secret() -> str:
    return TOKEN_PREFIX + "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_CHARS))


def token_digest(token: str) -> bytes:
    """What the database keeps of a token. A fast hash is enough: a 256-bit
    random secret cannot be guessed from its digest (slow hashes exist for
    low-entropy passwords), and a fast digest keeps every request cheap."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def bearer_token(header: Optional[str]) -> Optional[str]:
    """The token of an `Authorization: Bearer ...` header, else None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def client_address(request: web.Request) -> str:
    if request.app[CONFIG].server.trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded:
            return forwarded.rsplit(",", 1)[-1].strip()
    return request.remote or "?"


def denied(status: int, request: web.Request) -> web.HTTPException:
    headers = {}
    # The upload page asks without the browser's own login dialog.
    if status == 401 and "X-Requested-With" not in request.headers:
        if bearer_token(request.headers.get(hdrs.AUTHORIZATION)) is not None:
            # RFC 6750: the app's token was refused; no login dialog makes sense.
            headers["WWW-Authenticate"] = 'Bearer realm="imgproxy", error="invalid_token"'
        else:
            headers["WWW-Authenticate"] = 'Basic realm="imgproxy", charset="UTF-8"'
    return json_error(status, DENIED_MESSAGE, "unauthorized" if status == 401 else "forbidden", headers)


def rate_limited(wait: float) -> web.HTTPException:
    seconds = math.ceil(wait)
    return json_error(429, f"too many failed sign-ins from this address; try again in {seconds} s",
                      "rate_limited", {"Retry-After": str(seconds)})


def count_signin(request: web.Request, result: str) -> None:
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.count(metrics.signins, result)


async def _token_user(request: web.Request, token: str) -> Optional[UserConfig]:
    """The user an app token acts for, or None (unknown, revoked, or its user
    no longer in the config)."""
    store = request.app[STORE]
    owner = await store.token_owner(token_digest(token))
    if owner is None:
        return None
    token_id, username = owner
    user = request.app[AUTH].users.get(username)
    if user is not None:
        store.note_token_use(token_id)
    return user


async def require_user(request: web.Request, role: str = "uploader",
                       password_only: bool = False) -> UserConfig:
    """The signed-in user (Basic password, or an app's Bearer token), else 401/403/429.

    `password_only`: managing tokens and downloading the database need the
    person's password; a token that is valid gets 403 there."""
    auth = request.app[AUTH]
    address = client_address(request)
    header = request.headers.get(hdrs.AUTHORIZATION)
    token = bearer_token(header)
    wait = auth.blocked_for(address)
    if wait > 0:
        count_signin(request, "blocked")
        raise rate_limited(wait)
    if token is not None:
        # Not reserved like a password check: a lookup is cheap and a 256-bit
        # secret is not guessed in ten tries or ten thousand, while a
        # reservation per request would turn an app's burst of good requests
        # into 429s. A wrong token counts as a failure once looked up.
        user = None
        try:
            user = await _token_user(request, token)
        finally:
            # A check cut short (the client left) counts as failed: leaving
            # must not buy an attacker extra guesses.
            if user is None:
                auth.record_failure(address)
    else:
        try:
            user = await auth.check(header, address)
        except SignInWait as exc:
            count_signin(request, "blocked")
            raise rate_limited(exc.seconds) from None
    if user is None:
        if header:
            count_signin(request, "failed")
        raise denied(401, request)
    if (role == "admin" and user.role != "admin") or (password_only and token is not None):
        raise denied(403, request)
    return user


async def require_metrics_reader(request: web.Request) -> None:
    """Admin Basic, or `Authorization: Bearer <metrics.token>`.

    The metrics token is looked at on /metrics only, so it never stands in for
    a user elsewhere, and only while the address is not blocked: a blocked
    guesser gets the same 429 whatever it sends. Both sides are hashed first so
    the comparison takes the same time whatever the lengths.
    """
    token = request.app[CONFIG].metrics.token
    scheme, _, given = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if token and scheme.lower() == "bearer" and not request.app[AUTH].blocked_for(client_address(request)):
        if hmac.compare_digest(hashlib.sha256(given.strip().encode("utf-8", "surrogatepass")).digest(),
                               hashlib.sha256(token.encode()).digest()):
            return
    # An admin's app token is for uploading tools, not for monitoring: 403.
    await require_user(request, "admin", password_only=True)


# ==== middlewares ===============================================================

@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error leaves as the JSON error object; surprises are logged, never shown."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        message = exc.reason
        if exc.status == 404:
            message = "not found"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed here"
        elif exc.status == 413:
            message = "request body is too large"
        raise json_error(exc.status, message, _STATUS_CODES.get(exc.status, "error"),
                         {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")})
    except UploadRejected as exc:
        raise json_error(exc.status, exc.message, exc.code)
    except http_exceptions.HttpProcessingError as exc:
        # The body broke aiohttp's own parsing mid-read (an overlong multipart
        # header line, a body shorter than its Content-Length): the client's fault.
        status = exc.code if 400 <= exc.code < 500 else 400
        raise json_error(status, f"malformed request: {exc.message}"[:200], _STATUS_CODES.get(status, "bad_request"))
    except asyncio.CancelledError:
        raise
    except StoreUnavailable as exc:
        log.error("object store unavailable in %s %s: %s", request.method, request.path, exc)
        raise json_error(503, "the image store is unavailable; try again shortly", "unavailable",
                         {"Retry-After": "5"}) from None
    except ConnectionError as exc:
        _raise_if_database_outage(request, exc)
        if request.transport is not None and not request.transport.is_closing():
            raise
        # The client dropped the connection (an upload cancelled, a tab
        # closed): not a server fault, and any uploader could flood the log
        # with tracebacks. One quiet line; the answer goes nowhere.
        log.info("client went away during %s %s", request.method, request.path)
        exc = json_error(400, "the client closed the connection", "client_gone")
        exc.force_close()
        raise exc from None
    except OSError as exc:
        _raise_if_database_outage(request, exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("disk full while handling %s %s", request.method, request.path)
            raise json_error(507, "the server's disk is full; nothing was stored", "insufficient_storage")
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EXDEV):
            log.error("data folder not writable: %s", exc)
            raise json_error(503, "the server cannot write its data folder right now; nothing was stored",
                             "storage_unavailable")
        log.exception("unexpected error in %s %s", request.method, request.path)
        raise json_error(500, "internal server error", "internal_error")
    except sqlite3.OperationalError as exc:
        log.error("database busy or unavailable in %s %s: %s", request.method, request.path, exc)
        raise json_error(503, "the database is busy; try again shortly", "unavailable",
                         {"Retry-After": "2"})
    except Exception as exc:
        _raise_if_database_outage(request, exc)
        log.exception("unexpected error in %s %s", request.method, request.path)
        raise json_error(500, "internal server error", "internal_error")


def _raise_if_database_outage(request: web.Request, exc: BaseException) -> None:
    store = request.app.get(STORE)
    if store is not None and store.pool is not None and is_database_outage(exc):
        log.error("database unavailable in %s %s: %s", request.method, request.path, pg_error_text(exc))
        raise json_error(503, "the database is unavailable; try again shortly", "unavailable",
                         {"Retry-After": "5"}) from None


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    if "Cache-Control" not in headers:
        headers["Cache-Control"] = CACHE_NO_STORE
    headers.setdefault("Referrer-Policy", "no-referrer")


# ==== serving: conditional requests and ranges (RFC 9110) =====================
# One answer for every way a representation is kept: bytes in memory (small
# images), a file (large ones), and whatever else reuses send_representation.

_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")


def _etag_listed(header: str, etag: str, weak: bool) -> bool:
    """Is `etag` (quoted, strong) in an If-Match / If-None-Match list?"""
    if header == etag:  # what browsers send back: skip the parsing
        return True
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            if not weak:
                continue
            tag = tag[2:]
        if tag == etag:
            return True
    return False


def precondition_status(request: web.Request, etag: str, last_modified: Optional[float]) -> Optional[int]:
    """412 or 304 as RFC 9110 13.2.2 orders the checks, or None to answer normally."""
    headers = request.headers
    if_none_match = headers.get(hdrs.IF_NONE_MATCH)
    if (if_none_match == etag and request.method in ("GET", "HEAD")
            and hdrs.IF_MATCH not in headers and hdrs.IF_UNMODIFIED_SINCE not in headers):
        return 304  # a browser revalidating: the common case, decided with the fewest lookups
    if_match = headers.get(hdrs.IF_MATCH)
    if if_match is not None:
        if not _etag_listed(if_match, etag, weak=False):
            return 412
    elif last_modified is not None and hdrs.IF_UNMODIFIED_SINCE in headers:
        since = request.if_unmodified_since
        if since is not None and int(last_modified) > since.timestamp():
            return 412
    if if_none_match is not None:
        if _etag_listed(if_none_match, etag, weak=True):
            return 304 if request.method in ("GET", "HEAD") else 412
    elif last_modified is not None and hdrs.IF_MODIFIED_SINCE in headers and request.method in ("GET", "HEAD"):
        since = request.if_modified_since
        if since is not None and int(last_modified) <= since.timestamp():
            return 304
    return None


@functools.lru_cache(maxsize=4096)
def _http_date(ts: float) -> str:
    return email.utils.formatdate(int(ts), usegmt=True)  # ~5 µs: too dear for every hit


def _byte_pos(digits: str) -> int:
    # Longer numbers than any file are all "past the end" (and int() of
    # thousands of digits is slow, or refused by Python 3.11+).
    return int(digits) if len(digits) <= 18 else 10**18


def requested_ranges(request: web.Request, size: int, etag: str,
                     last_modified: Optional[float]) -> Optional[list[tuple[int, int]]]:
    """The byte ranges to send as (start, stop) pairs; [] when none can be
    satisfied (416); None for the whole representation (200).

    RFC 9110 14: Range counts for GET only; a failed If-Range (a different
    entity tag, or a date that is not exactly Last-Modified), another unit,
    an invalid ranges-specifier, more than MAX_RANGES ranges or overlapping
    ones all mean the whole representation.
    """
    header = request.headers.get(hdrs.RANGE)
    if header is None or request.method != "GET":
        return None
    if_range = request.headers.get(hdrs.IF_RANGE)
    if if_range is not None:
        if_range = if_range.strip()
        if if_range.startswith(('"', "W/")):
            if if_range != etag:
                return None
        else:
            date = request.if_range
            if last_modified is None or date is None or date.timestamp() != int(last_modified):
                return None
    unit, equals, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or not equals:
        return None
    ranges, count = [], 0
    for spec in specs.split(","):
        spec = spec.strip(" \t")
        if not spec:
            continue  # empty list elements are allowed
        m = _RANGE_SPEC.fullmatch(spec)
        if m is None or not (m[1] or m[2]):
            return None
        count += 1
        if m[1]:
            first = _byte_pos(m[1])
            last = _byte_pos(m[2]) if m[2] else None
            if last is not None and last < first:
                return None
            if first < size:
                ranges.append((first, size if last is None else min(last + 1, size)))
        else:
            suffix = _byte_pos(m[2])
            if suffix > 0:  # bytes=-0 asks for nothing: unsatisfiable
                ranges.append((max(0, size - suffix), size))
    if count == 0 or count > MAX_RANGES:
        return None
    ordered = sorted(ranges)
    if any(a[1] > b[0] for a, b in zip(ordered, ordered[1:])):
        return None
    return ranges


async def send_representation(request: web.Request, source: bytes | Path, etag: str,
                              headers: dict[str, str], size: Optional[int] = None,
                              last_modified: Optional[float] = None) -> web.StreamResponse:
    """Answer GET/HEAD for one representation, held as bytes or as a file.

    `etag` is the quoted strong tag, `headers` what every 2xx/304 carries
    (Content-Type among them; the dict is used for the answer, not copied);
    `size` is needed for a file. Preconditions,
    ranges (one, or several as multipart/byteranges), 304, 412 and 416 come
    out the same whichever way the bytes are kept.
    """
    headers["ETag"] = etag
    headers["Accept-Ranges"] = "bytes"
    if last_modified is not None:
        headers["Last-Modified"] = _http_date(last_modified)
    if isinstance(source, (bytes, bytearray)):
        size = len(source)
        asked = request.headers
        if (hdrs.IF_NONE_MATCH not in asked and hdrs.RANGE not in asked and hdrs.IF_MATCH not in asked
                and hdrs.IF_MODIFIED_SINCE not in asked and hdrs.IF_UNMODIFIED_SINCE not in asked):
            return web.Response(body=source, headers=headers)  # the hot path
    assert size is not None
    status = precondition_status(request, etag, last_modified)
    if status == 304:
        headers.pop("Content-Type", None)
        return web.Response(status=304, headers=headers)
    if status == 412:
        raise json_error(412, "precondition failed: the image is not the one the request names",
                         "precondition_failed")
    ranges = requested_ranges(request, size, etag, last_modified)
    if ranges == []:
        raise json_error(416, "range not satisfiable", "range_not_satisfiable",
                         {"Content-Range": f"bytes */{size}"})
    if ranges is None:
        spans, status = [(0, size)], 200
    elif len(ranges) == 1:
        spans, status = ranges, 206
        headers["Content-Range"] = f"bytes {ranges[0][0]}-{ranges[0][1] - 1}/{size}"
    else:
        return await _send_byteranges(request, source, ranges, size, headers)
    start, stop = spans[0]
    if isinstance(source, (bytes, bytearray)):
        return web.Response(status=status, body=source[start:stop] if status == 206 else source,
                            headers=headers)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = stop - start
    return await _send_file_spans(request, resp, source, [(b"", start, stop)])


async def _send_byteranges(request: web.Request, source: bytes | Path, ranges: list[tuple[int, int]],
                           size: int, headers: dict[str, str]) -> web.StreamResponse:
    boundary = secrets.token_hex(12)
    part_type = headers.pop("Content-Type", "application/octet-stream")
    pieces = []
    for start, stop in ranges:
        head = (f"--{boundary}\r\nContent-Type: {part_type}\r\n"
                f"Content-Range: bytes {start}-{stop - 1}/{size}\r\n\r\n").encode()
        pieces.append((b"\r\n" + head if pieces else head, start, stop))
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
    if isinstance(source, (bytes, bytearray)):
        body = b"".join(head + source[start:stop] for head, start, stop in pieces) + tail
        return web.Response(status=206, body=body, headers=headers)
    resp = web.StreamResponse(status=206, headers=headers)
    resp.content_length = sum(len(h) + stop - start for h, start, stop in pieces) + len(tail)
    return await _send_file_spans(request, resp, source, pieces, tail)


async def _send_file_spans(request: web.Request, resp: web.StreamResponse, path: Path,
                           pieces: list[tuple[bytes, int, int]], tail: bytes = b"") -> web.StreamResponse:
    """Write `resp` with each (prefix, start, stop) of the file: sendfile when
    the loop has it. The task is listed under STREAMING meanwhile, so the
    connection guard can stop a native sendfile whose reader stopped reading."""
    if isinstance(path, RemoteObject):
        f = await asyncio.to_thread(path.open_local)
        if f is None and path.copying is not None and not path.copying.done():
            # This node's copy is on its way (asked for when the image was looked up):
            # a moment's wait for it spares the store a second read of the same bytes.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(path.copying), COPY_WAIT_SECONDS)
            f = await asyncio.to_thread(path.open_local)
        if f is None:
            return await _send_object_spans(request, resp, path, pieces, tail)
        path = path.local
    else:
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            # Removed since it was looked up (a delete, a cleanup pass).
            raise json_error(404, NO_SUCH_IMAGE, "not_found") from None
    try:
        await resp.prepare(request)
        if request.method == "HEAD":
            await resp.write_eof()
            return resp
        loop = asyncio.get_running_loop()
        streaming = request.app[STREAMING]
        for prefix, start, stop in pieces:
            if prefix:
                await resp.write(prefix)
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("connection lost")
            streaming[transport] = asyncio.current_task()
            try:
                await loop.sendfile(transport, f, start, stop - start)
                continue
            except NotImplementedError:
                pass  # uvloop, TLS: copy through the writer
            finally:
                streaming.pop(transport, None)
            f.seek(start)
            left = stop - start
            while left > 0:
                chunk = await asyncio.to_thread(f.read, min(CHUNK, left))
                if not chunk:
                    raise OSError(errno.EIO, f"{path} is shorter than its row says")
                await resp.write(chunk)
                left -= len(chunk)
        if tail:
            await resp.write(tail)
        await resp.write_eof()
        return resp
    finally:
        await asyncio.to_thread(f.close)


async def _send_object_spans(request: web.Request, resp: web.StreamResponse, obj: RemoteObject,
                             pieces: list[tuple[bytes, int, int]], tail: bytes = b"") -> web.StreamResponse:
    """The same from the object store: each span is one ranged GET, relayed as it arrives."""
    if request.method == "HEAD":
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    streams = [obj.blobs.stream(obj.key, start, stop - 1) for _, start, stop in pieces]
    try:
        try:
            # The first bytes before the status line: a missing object is still a 404.
            first = await anext(streams[0], b"")
        except FileNotFoundError:
            raise json_error(404, NO_SUCH_IMAGE, "not_found") from None
        await resp.prepare(request)
        for i, (prefix, _start, _stop) in enumerate(pieces):
            if prefix:
                await resp.write(prefix)
            if i == 0:
                await resp.write(first)
            async for chunk in streams[i]:
                await resp.write(chunk)
        if tail:
            await resp.write(tail)
        await resp.write_eof()
        return resp
    finally:
        for stream in streams:  # a client gone mid-way: the store's connections go back to the pool
            await stream.aclose()


# ==== handlers ==================================================================


def md5_param(request: web.Request) -> str:
    md5 = request.match_info["md5"]
    if not MD5_RE.fullmatch(md5):
        raise json_error(400, "not an image id: expected 32 lowercase hex characters (an MD5)", "bad_md5")
    return md5


def wants_text(request: web.Request) -> bool:
    accept = request.headers.get(hdrs.ACCEPT, "")
    t = accept.find("text/plain")
    if t < 0:
        return False
    j = accept.find("application/json")
    return j < 0 or t < j


async def upload_expect(request: web.Request) -> Optional[web.StreamResponse]:
    """Answer `Expect: 100-continue` only when the body would be accepted.

    curl sends big bodies with this header, so a wrong password or a declared
    size over the limit is refused before a single byte is sent.
    """
    if request.version != (1, 1):
        return
    try:
        expect = request.headers.get(hdrs.EXPECT, "")
        if expect.lower() != "100-continue":
            raise json_error(417, f"unknown Expect: {expect}", "expectation_failed")
        await require_user(request)
        check_declared_length(request)
    except web.HTTPException as exc:
        # The client now sends no body (RFC 9110 10.1.1): say the connection
        # closes, and close it once the answer is out, rather than linger
        # waiting for a body that is not coming.
        resp = web.Response(status=exc.status, body=exc.body, headers=exc.headers)
        resp.force_close()
        await resp.prepare(request)
        await resp.write_eof()
        request.protocol.force_close()
        return resp
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # aiohttp internals (checked against 3.9.5 and 3.14.5): the interim 100 counts
    # in writer.output_size, and aiohttp's own error path (handle_error) refuses to
    # answer once that is above 0; the final response has not started yet.
    request.writer.output_size = 0


def check_declared_length(request: web.Request) -> None:
    limit = request.app[CONFIG].server.max_upload_bytes
    declared = request.content_length
    slack = MULTIPART_SLACK if request.method == "POST" else 0
    if declared is not None and declared > limit + slack:
        raise json_error(413, f"file is larger than the {request.app[CONFIG].server.max_upload_mb:g} MB "
                              "upload limit", "too_large")


class IdleWatch:
    """Cancels the current task when `touch()` has not been called for
    UPLOAD_IDLE_TIMEOUT seconds.

    aiohttp has no body read timeout of its own, so without this a client
    that stops sending mid-upload would hold a handler and a temp file
    forever. One timer, moved lazily, costs far less per chunk than a
    timeout context around every read.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.timeout = UPLOAD_IDLE_TIMEOUT
        self.deadline = self.loop.time() + self.timeout
        self.fired = False
        self.handle = self.loop.call_later(self.timeout, self._check)

    def touch(self) -> None:
        self.deadline = self.loop.time() + self.timeout

    def _check(self) -> None:
        remaining = self.deadline - self.loop.time()
        if remaining > 0:
            self.handle = self.loop.call_later(remaining, self._check)
        else:
            self.fired = True
            self.task.cancel()

    def close(self) -> None:
        self.handle.cancel()


class _CappedStream:
    """The request body for the multipart reader, refused once more than `cap`
    bytes have arrived, wherever they are spent: a preamble before the first
    boundary, thousands of small fields, part headers."""

    def __init__(self, stream: Any, cap: int):
        self._stream, self._cap = stream, cap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _check(self) -> None:
        if self._stream.total_bytes > self._cap:
            raise UploadRejected(413, "too_large", "the form is larger than the upload limit allows")

    async def readline(self, *args: Any, **kwargs: Any) -> bytes:
        self._check()
        return await self._stream.readline(*args, **kwargs)

    async def read(self, n: int = -1) -> bytes:
        self._check()
        return await self._stream.read(n)


async def receive_upload(request: web.Request, sink: UploadSink) -> Optional[str]:
    """Stream the upload into sink; returns the client's file name (display only)."""
    watch = IdleWatch()
    try:
        return await _receive_body(request, sink, watch)
    except asyncio.CancelledError:
        if not watch.fired:
            raise
        uncancel = getattr(watch.task, "uncancel", None)  # Python 3.11+
        if uncancel is not None:
            uncancel()
        exc = json_error(408, f"the upload stalled: nothing received for {watch.timeout:g} s; "
                              "nothing was stored", "timeout")
        exc.force_close()
        raise exc from None
    finally:
        watch.close()


async def _receive_body(request: web.Request, sink: UploadSink, watch: IdleWatch) -> Optional[str]:
    if request.method == "PUT":
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            watch.touch()
            await sink.feed(chunk)
        return request.match_info.get("filename")

    if not request.content_type.startswith("multipart/"):
        raise json_error(400, "send the image as multipart/form-data in a field named 'file' "
                              "(curl -F file=@x.png), or as a raw body with PUT /upload/NAME", "bad_request")
    cap = request.app[CONFIG].server.max_upload_bytes + MULTIPART_SLACK
    try:
        reader = MultipartReader(request.headers, _CappedStream(request.content, cap))
    except (ValueError, AssertionError, KeyError):
        raise json_error(400, "malformed multipart body", "bad_request") from None
    filename, found = None, False
    drained = 0  # over every part that is not the file: a body of many small fields is bounded too
    try:
        while True:
            part = await reader.next()
            watch.touch()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise json_error(400, "nested multipart is not supported", "bad_request")
            if part.name != "file":
                drained += 256  # its headers, which read_chunk() does not count
                while True:
                    if drained > MULTIPART_SLACK:
                        raise json_error(400, "the form's other fields are too large; "
                                              "only 'file' carries data", "bad_request")
                    chunk = await part.read_chunk(CHUNK)
                    if not chunk:
                        break
                    watch.touch()
                    drained += len(chunk)
                    if drained > MULTIPART_SLACK:
                        raise json_error(400, f"form field {part.name!r} is too large; "
                                              "only 'file' carries data", "bad_request")
                continue
            if found:
                raise json_error(400, "several files sent; upload one file per request", "several_files")
            found = True
            filename = part.filename
            while chunk := await part.read_chunk(CHUNK):
                watch.touch()
                await sink.feed(chunk)
    except (ValueError, AssertionError) as exc:
        raise json_error(400, f"malformed multipart body ({exc})"[:200], "bad_request") from None
    if not found:
        raise json_error(400, "no field named 'file' in the form", "missing_file")
    return filename


async def handle_upload(request: web.Request) -> web.Response:
    user = await require_user(request)
    check_declared_length(request)
    config, store = request.app[CONFIG], request.app[STORE]
    png_check = PngStreamCheck(config.server.max_pixels) if "PNG" in config.server.formats else None
    sink = UploadSink(store.storage, config.server.max_upload_bytes,
                      observer=png_check.feed if png_check is not None else None)
    stripped_locks: list[tuple[Path, int]] = []

    def locked_tmp() -> Path:
        # The stripped copy is locked like the upload itself, so no leftover
        # sweep (another worker starting, a cleanup pass) takes it before publish.
        path, fd = store.storage.create_tmp("strip")
        stripped_locks.append((path, fd))
        return path

    def release_stripped() -> None:
        for path, fd in stripped_locks:
            _unlink_quietly(path)  # gone once published; still here if stripping or publish failed
            store.storage.release_tmp(path, fd)

    try:
        raw_name = await receive_upload(request, sink)
        if sink.size == 0:
            raise json_error(400, "the upload is empty", "empty_upload")
        await sink.drain()

        def hash_inspect_strip() -> tuple[str, ImageFacts, Optional[tuple[str, ImageFacts, Path]]]:
            # One trip to a worker thread: the rest of the bytes to tmp/, the
            # digest, the decode check (from memory when they fit there), and
            # the metadata removal or HEIC conversion when they change the bytes.
            md5, small = sink.complete()
            source = small if small is not None else sink.tmp_path
            facts = inspect_upload(source, sink.size, config.server.formats, config.server.max_pixels,
                                   png_checked=png_check is not None and png_check.passed)
            return md5, facts, prepare_stored(source, facts, locked_tmp, config.server.strip_metadata,
                                              config.server.max_pixels)

        async with store.decode_slots:
            md5, facts, stored = await asyncio.to_thread(hash_inspect_strip)
        publish_path, source_md5 = sink.tmp_path, None
        if stored is not None:
            source_md5 = md5
            md5, facts, publish_path = stored
        name = sanitize_name(raw_name, FORMATS[facts.format][0])
        info, created = await store.publish(user.username, md5, facts, name, publish_path,
                                            source_md5=source_md5)
        if stored is None:
            sink.tmp_path = None
    finally:
        if sink.tmp_path is not None:
            await sink.discard()
        sink.release()
        if stripped_locks:
            await asyncio.to_thread(release_stripped)
    log.debug("%s %s.%s (%d bytes) for %s", "stored" if created else "renewed", md5,
             FORMATS[facts.format][0], facts.size, user.username)
    status = 201 if created else 200
    if wants_text(request):
        return web.Response(text=info["url"] + "\n", status=status, content_type="text/plain")
    headers = {"Location": info["url"]} if created else None
    return web.json_response(info, status=status, headers=headers, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


async def handle_lookup(request: web.Request) -> web.Response:
    await require_user(request)
    md5 = md5_param(request)
    info = await request.app[STORE].lookup(md5)
    if info is None:
        raise json_error(404, NO_SUCH_IMAGE, "not_found")
    return web.json_response(info, dumps=_dumps)


async def handle_renew(request: web.Request) -> web.Response:
    user = await require_user(request)
    md5 = md5_param(request)
    info = await request.app[STORE].renew(user.username, md5)
    if info is None:
        raise json_error(404, "no such image; upload the bytes", "not_found")
    return web.json_response(info, dumps=_dumps)


async def handle_delete(request: web.Request) -> web.Response:
    user = await require_user(request)
    md5 = md5_param(request)
    if not await request.app[STORE].delete(user.username, md5, admin=user.role == "admin"):
        raise json_error(404, "you hold no image with this id", "not_found")
    return web.Response(status=204)


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise json_error(400, f"{name} must be a whole number", "bad_request") from None
    if not lo <= value <= hi:
        raise json_error(400, f"{name} must be between {lo} and {hi}", "bad_request")
    return value


async def handle_list(request: web.Request) -> web.Response:
    user = await require_user(request)
    limit = _int_param(request, "limit", 50, 1, 1000)
    offset = _int_param(request, "offset", 0, 0, 2**31)
    images, total = await request.app[STORE].list_images(
        None if user.role == "admin" else user.username, limit, offset)
    return web.json_response({"images": images, "total": total}, dumps=_dumps)


async def handle_db(request: web.Request) -> web.StreamResponse:
    await require_user(request, "admin", password_only=True)
    headers = {
        "Content-Type": "application/vnd.sqlite3",
        "Content-Disposition": 'attachment; filename="images_server.db"',
        "Cache-Control": CACHE_NO_STORE,
    }
    if request.method == "HEAD":
        # The size is known only once a snapshot is made (RFC 9110 9.3.2 lets
        # HEAD leave it out), and a HEAD must not cost one; nor carry a body.
        return web.Response(headers=headers)
    f = await request.app[STORE].snapshot()
    with f:
        resp = web.StreamResponse(headers=headers)
        resp.content_length = os.fstat(f.fileno()).st_size
        await resp.prepare(request)
        while chunk := await asyncio.to_thread(f.read, FLUSH_BYTES):
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def _token_name(request: web.Request) -> str:
    try:
        body = await request.json()
    except (ValueError, LookupError):  # LookupError: a charset Python does not know
        raise json_error(400, 'the body must be JSON like {"name": "laptop ShareX"}', "bad_request") from None
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= TOKEN_NAME_MAX or not name.isprintable():
        raise json_error(400, f"name: 1 to {TOKEN_NAME_MAX} printable characters, naming the app",
                         "bad_request")
    return name.strip()


async def handle_token_create(request: web.Request) -> web.Response:
    user = await require_user(request, password_only=True)
    name = await _token_name(request)
    secret = new_token_secret()
    info = await request.app[STORE].create_token(user.username, name, token_digest(secret))
    if info is None:
        raise json_error(409, f"you already have {TOKENS_PER_USER} tokens; revoke one first", "too_many_tokens")
    log.info("token %s created for %s", info["id"], user.username)
    # The only time the secret leaves the server; it is not kept here.
    return web.json_response({**info, "token": secret}, status=201, dumps=_dumps)


async def handle_token_list(request: web.Request) -> web.Response:
    user = await require_user(request, password_only=True)
    return web.json_response({"tokens": await request.app[STORE].list_tokens(user.username)}, dumps=_dumps)


async def handle_token_revoke(request: web.Request) -> web.Response:
    user = await require_user(request, password_only=True)
    token_id = request.match_info["token_id"]
    if not TOKEN_ID_RE.fullmatch(token_id) or not await request.app[STORE].revoke_token(user.username, token_id):
        raise json_error(404, "you have no token with this id", "not_found")
    log.info("token %s revoked by %s", token_id, user.username)
    return web.Response(status=204)


async def handle_health(request: web.Request) -> web.Response:
    problem = await request.app[STORE].healthy()
    if problem:
        return web.json_response({"status": "error", "error": problem, "code": "unhealthy"}, status=503)
    return web.json_response({"status": "ok"})


async def live_image(store: ImageStore, md5: str) -> tuple[ServedImage, float]:
    """The served entry of an unexpired image and the time it was judged at, else 404."""
    store.check_generation()
    entry = await store.served_image(md5)
    now = store.clock()
    if entry is not None and entry.expire_at <= now:
        store.forget(md5)  # maybe renewed by another process since it was cached
        entry = await store.served_image(md5)
    if entry is None or entry.expire_at <= now:
        raise json_error(404, NO_SUCH_IMAGE, "not_found")
    return entry, now


def image_headers(mime: str, seconds_left: float) -> dict[str, str]:
    """What every image answer carries, originals and variants alike."""
    return {
        "Content-Type": mime,
        "Cache-Control": image_cache_control(seconds_left),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": IMAGE_CSP,
        "Access-Control-Allow-Origin": "*",
    }


async def handle_image(request: web.Request) -> web.StreamResponse:
    """The hot path: answer from memory when the image is small and known."""
    md5, dot, ext = request.match_info["name"].partition(".")
    if not dot or not MD5_RE.fullmatch(md5):
        raise json_error(400, "not an image id: expected /i/<md5>.<ext>", "bad_md5")
    store = request.app[STORE]
    entry, now = await live_image(store, md5)
    if entry.ext != ext:
        raise json_error(404, NO_SUCH_IMAGE, "not_found")
    headers = image_headers(entry.mime, entry.expire_at - now)
    if request.method == "GET":  # 304s count too (the image was shown); HEAD does not
        store.count_access(md5)
    return await send_representation(request, entry.path if entry.body is None else entry.body, f'"{md5}"',
                                     headers, entry.size, entry.created_at)


async def handle_variant(request: web.Request) -> web.StreamResponse:
    """/i/{md5}/{size}.{fmt} and /i/{md5}/{size}: checked, then served or rendered once."""
    variants = request.app[VARIANTS]
    if not variants.widths:
        raise json_error(404, "not found (sizes are turned off on this server)", "not_found")
    size, dot, fmt = request.match_info["variant"].partition(".")
    width = variants.size_width(size)
    if dot and fmt not in variants.formats:
        raise variants.bad_variant(f"format {fmt[:10]!r} is not offered")
    md5 = request.match_info["md5"]
    if not MD5_RE.fullmatch(md5):
        raise json_error(400, "not an image id: expected /i/<md5>/<size>.<format>", "bad_md5")
    store = request.app[STORE]
    image, now = await live_image(store, md5)
    if not dot:
        fmt = await variants.choose_format(image, request.headers.get(hdrs.ACCEPT))
    entry = await variants.get(image, size, width, fmt)
    headers = image_headers(entry.mime, image.expire_at - now)
    if not dot:
        headers["Vary"] = "Accept"
    if request.method == "GET":
        store.count_access(md5)
    return await send_representation(request, entry.path if entry.body is None else entry.body,
                                     f'"{entry.md5}"', headers, entry.size, image.created_at)


async def handle_page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE_HTML, content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": CACHE_NO_CACHE,
                                 "X-Frame-Options": "DENY"})


async def handle_asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    if name == "app.js":
        return web.Response(text=PAGE_JS, content_type="text/javascript", charset="utf-8",
                            headers={"Cache-Control": CACHE_NO_CACHE})
    if name == "app.css":
        return web.Response(text=PAGE_CSS, content_type="text/css", charset="utf-8",
                            headers={"Cache-Control": CACHE_NO_CACHE})
    raise json_error(404, "not found", "not_found")


async def handle_openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI, headers={"Cache-Control": CACHE_NO_CACHE})


async def handle_metrics(request: web.Request) -> web.Response:
    metrics = request.app.get(METRICS)
    if metrics is None:
        raise json_error(404, "not found", "not_found")  # as for any unknown path (README: Metrics)
    await require_metrics_reader(request)
    body = await metrics.exposition()
    # The classic text format: every Prometheus reads it, and our names need nothing newer.
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


# ==== cleanup ===================================================================

@dataclasses.dataclass
class CleanupReport:
    expired: int = 0
    orphan_files: int = 0
    dangling_rows: int = 0
    temp_files: int = 0
    orphan_variants: int = 0
    stale_uploads: int = 0   # unfinished multipart uploads in the bucket, older than CLAIM_SECONDS
    bytes_freed: int = 0
    skipped: bool = False
    dry_run: bool = False
    removed: list[str] = dataclasses.field(default_factory=list)
    itemize: bool = False  # fill `removed` (dry runs, cleanup.py -v); counts only otherwise

    def note(self, items: Iterable[str]) -> None:
        if self.itemize:
            self.removed.extend(items)

    def summary(self) -> str:
        if self.skipped:
            return "cleanup skipped: another cleanup pass is running"
        verb = "would remove" if self.dry_run else "removed"
        variants = f"{self.orphan_variants} orphan variants, " if self.orphan_variants else ""
        uploads = f"{self.stale_uploads} unfinished uploads, " if self.stale_uploads else ""
        return (f"cleanup {verb}: {self.expired} expired images, {self.orphan_files} orphan files, "
                f"{self.dangling_rows} dangling rows, {self.temp_files} temp files, "
                f"{variants}{uploads}{self.bytes_freed} bytes")


def _scan_uploads(storage: Storage) -> list[tuple[str, str, Path]]:
    """Every file under uploads/ as (md5, ext, path); foreign names get md5=''."""
    found = []
    for dirpath, _dirs, files in os.walk(storage.uploads):
        for f in files:
            stem, _, ext = f.partition(".")
            found.append((stem if MD5_RE.fullmatch(stem) else "", ext, Path(dirpath) / f))
    return found


def _file_size(path: Path) -> int:
    """What unlinking `path` would free (dry runs); 0 if it is gone."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def run_cleanup_pass(store: ImageStore, dry_run: bool = False,
                           itemize: Optional[bool] = None, not_before: Optional[float] = None) -> CleanupReport:
    """One pass: expired images, orphan files, dangling rows, old temp files.

    Work is cut into batches, each its own short write transaction, with a
    yield to the event loop between them so serving never waits on a pass.
    A pass already running (here, in cleanup.py, or on any node sharing a
    PostgreSQL database) makes this one skip, and so does, with `not_before`
    (the scheduled slot), a pass another process finished since that time.
    This machine's own leftovers (tmp/ and its variant files) are swept anyway.
    """
    report = CleanupReport(dry_run=dry_run, itemize=dry_run if itemize is None else itemize)
    storage = store.storage
    async with cleanup_lock(store) as held:
        done = await store.get_meta("last_cleanup") if held and not_before is not None else None
        if not held or (done is not None and float(done) >= not_before):
            report.skipped = True
        else:
            now = store.clock()
            await _cleanup_expired(store, report, dry_run)
            if store.blobs is None:
                await _cleanup_orphans(store, report, dry_run)
                await _cleanup_dangling(store, report, dry_run)
            else:
                await _cleanup_bucket(store, report, dry_run)
            if not dry_run:
                await store.set_meta("last_cleanup", repr(now))
    await _cleanup_variants(store, report, dry_run)
    for path, size in await asyncio.to_thread(sweep_dead_temp_files, storage, time.time(), dry_run):
        report.temp_files += 1
        report.note([str(path)])
        report.bytes_freed += size
    return report


@contextlib.asynccontextmanager
async def cleanup_lock(store: ImageStore):
    """Yields whether this process may run the pass: an flock on data_dir's
    cleanup.lock, or with PostgreSQL a session advisory lock, one for the cluster."""
    if store.pool is not None:
        import asyncpg

        # A connection of its own: the lock lives as long as it, and goes with it
        # if this process dies, so a crashed pass never blocks the next one.
        try:
            conn = await asyncpg.connect(store.config.database.url, timeout=PG_COMMAND_SECONDS)
        except OSError as exc:
            raise DatabaseUnavailable(pg_error_text(exc)) from None
        try:
            yield await conn.fetchval("SELECT pg_try_advisory_lock($1)", PG_LOCK_CLEANUP)
        finally:
            await conn.close(timeout=5)
        return
    lock_fd = os.open(store.storage.cleanup_lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(lock_fd)


async def _cleanup_expired(store: ImageStore, report: CleanupReport, dry_run: bool) -> None:
    now = store.clock()
    storage = store.storage

    uploads = str(storage.uploads)

    def batch(txn: Txn, after: str) -> list[str]:
        # Plain strings and os calls, not Path objects: this thread holds the
        # GIL while it runs Python, and serving waits for the GIL meanwhile.
        rows = txn.db.execute("SELECT md5, ext, size FROM images WHERE expire_at <= ? AND md5 > ? "
                              "ORDER BY md5 LIMIT ?", (now, after, CLEANUP_BATCH)).fetchall()
        md5s = [r[0] for r in rows]
        report.expired += len(rows)
        report.note(f"expired {m}" for m in md5s)
        if store.blobs is not None:
            report.bytes_freed += sum(r[2] for r in rows)
            if md5s and not dry_run:
                store._remove_objects(txn, [(r[0], r[1]) for r in rows])
                for m in md5s:
                    storage.remove_variants(m)
                txn.delete_rows(md5s, expired=True)
            return md5s
        freed = 0
        for m, ext, _size in rows:
            path = f"{uploads}/{m[0:2]}/{m[2:4]}/{m}.{ext}"
            try:
                # Bytes on disk, not the rows' sizes: a dry run reports what a real pass frees.
                freed += os.stat(path).st_size
                if not dry_run:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            if not dry_run:
                freed += storage.remove_variants(m)
        report.bytes_freed += freed
        if md5s and not dry_run:
            txn.delete_rows(md5s, expired=True)
        return md5s

    after = ""
    while md5s := await store.write(batch, after):
        after = md5s[-1]
        for m in md5s:
            store.forget(m)
        # A short breath between batches: the writer thread's work holds the
        # GIL too, and serving should not queue behind a long pass.
        await asyncio.sleep(CLEANUP_PAUSE)


async def _cleanup_orphans(store: ImageStore, report: CleanupReport, dry_run: bool) -> None:
    def batch(txn: Txn, files: list[tuple[str, str, Path]]) -> None:
        md5s = [m for m, _, _ in files if m]
        known: dict[str, str] = {}
        if md5s:
            marks = ",".join("?" * len(md5s))
            known = {r["md5"]: r["ext"] for r in
                     txn.db.execute(f"SELECT md5, ext FROM images WHERE md5 IN ({marks})", md5s)}
        # exists(): a delete may have removed the file since the scan; not an orphan then.
        orphans = [p for m, ext, p in files if known.get(m) != ext and p.exists()]
        report.orphan_files += len(orphans)
        report.note(f"orphan {p}" for p in orphans)
        report.bytes_freed += sum(map(_file_size if dry_run else _unlink_quietly, orphans))

    files = await asyncio.to_thread(_scan_uploads, store.storage)
    for i in range(0, len(files), CLEANUP_BATCH):
        await store.write(batch, files[i:i + CLEANUP_BATCH])
        await asyncio.sleep(0)


async def _cleanup_dangling(store: ImageStore, report: CleanupReport, dry_run: bool) -> None:
    # Expired rows are the expiry stage's (a dry run leaves them): never count them twice.
    now = store.clock()
    storage = store.storage

    def remove(txn: Txn, missing: list[tuple[str, str]]) -> None:
        # Re-check inside the transaction: an upload may have healed it meanwhile.
        still = [m for m, ext in missing if not storage.image_path(m, ext).is_file()]
        report.dangling_rows += len(still)
        report.note(f"dangling {m}" for m in still)
        if still and not dry_run:
            txn.delete_rows(still)

    after = ""
    while True:
        async with store.db_read.execute("SELECT md5, ext FROM images WHERE md5 > ? AND expire_at > ? "
                                         "ORDER BY md5 LIMIT ?", (after, now, CLEANUP_BATCH * 4)) as cur:
            rows = [(r["md5"], r["ext"]) for r in await cur.fetchall()]
        if not rows:
            return
        after = rows[-1][0]
        missing = await asyncio.to_thread(
            lambda: [(m, ext) for m, ext in rows if not storage.image_path(m, ext).is_file()])
        if missing:
            await store.write(remove, missing)
            for m, _ in missing:
                store.forget(m)
        await asyncio.sleep(0)


async def _cleanup_variants(store: ImageStore, report: CleanupReport, dry_run: bool) -> None:
    """Variants whose image is gone (a delete that raced a render, a crash, files put there by hand)."""
    files = await asyncio.to_thread(_scan_variants, store.storage)
    for i in range(0, len(files), CLEANUP_BATCH):
        chunk = files[i:i + CLEANUP_BATCH]
        md5s = sorted({m for m, _, _ in chunk if m})
        known: set[str] = set()
        if md5s:
            marks = ",".join("?" * len(md5s))
            async with store.db_read.execute(f"SELECT md5 FROM images WHERE md5 IN ({marks})", md5s) as cur:
                known = {r[0] for r in await cur.fetchall()}
        orphans = [path for m, _, path in chunk if m not in known]
        report.orphan_variants += len(orphans)
        report.note(f"orphan variant {p}" for p in orphans)
        report.bytes_freed += await asyncio.to_thread(
            lambda: sum(map(_file_size if dry_run else _unlink_quietly, orphans)))


async def _cleanup_bucket(store: ImageStore, report: CleanupReport, dry_run: bool) -> None:
    """The object store against the database: objects no row holds (and no
    upload has claimed) go, rows whose object is gone go. Keys that are not
    ours (another application's, under the same prefix) are left alone."""
    # md5 -> {ext: size}: one md5 can have a stale object under another extension
    # beside the one its row names (a crash between a re-upload's PUT and commit).
    objects: dict[str, dict[str, int]] = {}
    async for key, size, _modified in store.blobs.list(""):
        m = IMAGE_KEY_RE.fullmatch(key)
        if m:
            objects.setdefault(m[3], {})[m[4]] = size
    names = sorted(objects)
    for i in range(0, len(names), CLEANUP_BATCH):
        chunk = names[i:i + CLEANUP_BATCH]

        def orphans(txn: Txn, chunk: list[str] = chunk) -> None:
            marks = ",".join("?" * len(chunk))
            known = {r[0]: r[1] for r in txn.db.execute(f"SELECT md5, ext FROM images WHERE md5 IN ({marks})", chunk)}
            gone = [(m, ext) for m in chunk for ext in objects[m]
                    if known.get(m) != ext and not store._claimed(txn, m)]
            report.orphan_files += len(gone)
            report.note(f"orphan object {image_key(m, ext)}" for m, ext in gone)
            report.bytes_freed += sum(objects[m][ext] for m, ext in gone)
            if gone and not dry_run:
                txn.wait(store.blobs.delete([image_key(m, ext) for m, ext in gone]))

        await store.write(orphans)
        await asyncio.sleep(0)

    # What a node killed mid-upload leaves: parts of a multipart upload that will
    # never complete, and its claim. Only past CLAIM_SECONDS, the time an upload
    # to the store is given: a younger one may be running on a live node.
    stale_before = store.clock() - CLAIM_SECONDS
    try:
        async for key, upload_id, started in store.blobs.unfinished_uploads():
            if started < stale_before and IMAGE_KEY_RE.fullmatch(key):
                report.stale_uploads += 1
                report.note([f"unfinished upload {key}"])
                if not dry_run:
                    await store.blobs.abort_unfinished(key, upload_id)
    except StoreUnavailable as exc:
        # Not every S3-compatible store lists unfinished uploads; the repair of
        # rows below matters more than these parts (a lifecycle rule takes them too).
        log.warning("cleanup: unfinished multipart uploads not checked: %s", exc)
    if not dry_run:
        await store.write(lambda txn: txn.db.execute("DELETE FROM claims WHERE claimed_at <= ?", (stale_before,)))

    now = store.clock()
    after = ""
    while True:
        async with store.db_read.execute("SELECT md5, ext FROM images WHERE md5 > ? AND expire_at > ? "
                                         "ORDER BY md5 LIMIT ?", (after, now, CLEANUP_BATCH * 4)) as cur:
            rows = [(r["md5"], r["ext"]) for r in await cur.fetchall()]
        if not rows:
            return
        after = rows[-1][0]
        missing = [(m, ext) for m, ext in rows if ext not in objects.get(m, {})]
        if missing:
            def dangling(txn: Txn, missing: list[tuple[str, str]] = missing) -> None:
                # Re-checked inside the transaction: an upload may have written it since the listing.
                still = [m for m, ext in missing if txn.row(m) is not None
                         and txn.wait(store.blobs.size(image_key(m, ext))) is None]
                report.dangling_rows += len(still)
                report.note(f"dangling {m}" for m in still)
                if still and not dry_run:
                    txn.delete_rows(still)

            await store.write(dangling)
            for m, _ in missing:
                store.forget(m)
        await asyncio.sleep(0)


def next_cleanup_after(now: float, at: dt.time) -> float:
    """The first cleanup_time in local time strictly after `now` (Unix seconds)."""
    local = dt.datetime.fromtimestamp(now)
    candidate = dt.datetime.combine(local.date(), at)
    while candidate.timestamp() <= now:
        candidate = dt.datetime.combine(candidate.date() + dt.timedelta(days=1), at)
    return candidate.timestamp()


def last_cleanup_slot(now: float, at: dt.time) -> float:
    """The latest cleanup_time in local time at or before `now`."""
    local = dt.datetime.fromtimestamp(now)
    candidate = dt.datetime.combine(local.date(), at)
    while candidate.timestamp() > now:
        candidate = dt.datetime.combine(candidate.date() - dt.timedelta(days=1), at)
    return candidate.timestamp()


async def cleanup_scheduler(run_pass: Callable[[], Awaitable[Any]], last_run: Optional[float],
                            at: dt.time, clock: Callable[[], float] = time.time,
                            sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
    """Run `run_pass` daily at `at`; once at start if a slot was missed while down.

    Sleeps in short steps against the wall clock, so a suspended VM or a clock
    change does not push the pass a day late.
    """
    async def attempt() -> None:
        try:
            await run_pass()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cleanup pass failed; the schedule goes on")

    if last_run is None or last_run < last_cleanup_slot(clock(), at):
        await attempt()
    while True:
        due = next_cleanup_after(clock(), at)
        while (remaining := due - clock()) > 0:
            await sleep(min(remaining, 60.0))
        await attempt()


async def cleanup_once(config: Config, dry_run: bool = False, itemize: Optional[bool] = None) -> CleanupReport:
    """Open the store of `config`, run one pass, close it (used by cleanup.py)."""
    store = await ImageStore(config).open(listen=False)
    try:
        return await run_cleanup_pass(store, dry_run=dry_run, itemize=itemize)
    finally:
        await store.close()


async def reset_store(config: Config) -> None:
    """Empty the database and the uploads of `config` (cleanup.py --reset)."""
    store = await ImageStore(config).open(listen=False)
    try:
        storage = store.storage
        trash = storage.tmp / f"reset-{secrets.token_hex(6)}"

        def wipe(txn: Txn) -> None:
            txn.db.execute("DELETE FROM holds")
            txn.db.execute("DELETE FROM images")
            txn.db.execute("DELETE FROM meta")
            txn.changed = True
            # Moving uploads/ aside inside the transaction is instant; the slow
            # delete happens after, with no lock held.
            if storage.uploads.exists():
                os.replace(storage.uploads, trash)
            storage.uploads.mkdir(parents=True, exist_ok=True)
            if storage.variants.exists():
                os.replace(storage.variants, storage.tmp / f"reset-{secrets.token_hex(6)}-variants")
            storage.variants.mkdir(parents=True, exist_ok=True)

        await store.write(wipe)
        if store.blobs is not None:
            keys = [key async for key, _, _ in store.blobs.list("") if IMAGE_KEY_RE.fullmatch(key)]
            for i in range(0, len(keys), 1000):
                await store.blobs.delete(keys[i:i + 1000])
        await asyncio.to_thread(shutil.rmtree, trash, True)
        for leftover in storage.tmp.glob("reset-*-variants"):
            await asyncio.to_thread(shutil.rmtree, leftover, True)
        if store.pool is None:
            await store._in_writer(lambda db: db.execute("VACUUM"))
    finally:
        await store.close()


# ==== create_app ================================================================

async def _store_ctx(app: web.Application):
    # Pillow imports its format plugins on first use; do it now, not in the first upload.
    await asyncio.to_thread(Image.init)
    if "HEIF" in app[CONFIG].server.formats and not await asyncio.to_thread(heif_support):
        log.info("HEIC uploads are refused: %s", HEIF_HOWTO)
    store = await ImageStore(app[CONFIG], app[CLOCK]).open()
    app[STORE] = store
    app[VARIANTS] = VariantCache(app[CONFIG], store.storage)
    if METRICS in app:
        app[METRICS].store = store
    # What a killed process left in tmp/ goes now, not at the next pass.
    leftovers = await asyncio.to_thread(sweep_dead_temp_files, store.storage, time.time())
    if leftovers:
        log.info("removed %d temp files (%d bytes) left by a process that died",
                 len(leftovers), sum(size for _, size in leftovers))
    yield
    await app[VARIANTS].close()
    await store.close()


async def _background_ctx(app: web.Application):
    store, config = app[STORE], app[CONFIG]

    async def flusher() -> None:
        while True:
            await asyncio.sleep(COUNT_FLUSH_SECONDS)
            try:
                await store.notice_other_writers()
                await store.flush_counts()
                await store.flush_token_use()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_database_outage(exc):  # requests get 503s meanwhile: one line is enough
                    log.warning("could not flush access counts (%s); will retry", pg_error_text(exc))
                else:
                    log.exception("could not flush access counts; will retry")

    tasks = [asyncio.create_task(flusher(), name="imgproxy-flush")]
    if config.cleanup.enable:
        last = await store.get_meta("last_cleanup")

        async def run_pass() -> None:
            started = time.monotonic()
            # The slot this pass is for: with several workers or nodes, the first
            # to take the lock does it and the others find it done.
            slot = last_cleanup_slot(store.clock(), config.cleanup.cleanup_time)
            try:
                report = await run_cleanup_pass(store, not_before=slot)
            except Exception:
                if METRICS in app:
                    app[METRICS].count_cleanup(None, time.monotonic() - started)
                raise
            if METRICS in app:
                app[METRICS].count_cleanup(report, time.monotonic() - started)
            log.info("%s", report.summary())

        tasks.append(asyncio.create_task(
            cleanup_scheduler(run_pass, float(last) if last else None, config.cleanup.cleanup_time,
                              clock=store.clock), name="imgproxy-cleanup"))
    if METRICS in app and app[METRICS].snapshot_dir is not None:
        tasks.append(asyncio.create_task(app[METRICS].keep_snapshot(), name="imgproxy-metrics"))
    app[TASKS] = tasks
    yield
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t


async def _close_auth(app: web.Application) -> None:
    app[AUTH].close()


def create_app(config: Config, clock: Optional[Callable[[], float]] = None) -> web.Application:
    """The aiohttp application for `config`; nothing starts until it runs."""
    app = web.Application(middlewares=[error_middleware], client_max_size=1024 * 1024)
    app[CONFIG] = config
    app[AUTH] = Authenticator(config.users)
    app.on_cleanup.append(lambda app: _close_auth(app))
    app[CLOCK] = clock or time.time
    app[STREAMING] = {}
    # Pillow's own bomb check, a backstop behind DecodeGuard, refuses at twice
    # this value, i.e. at max_pixels. Its warnings (this check's, odd metadata)
    # are about untrusted files we judge ourselves: silenced once here, as
    # warnings.catch_warnings in the decode threads would race on global state.
    Image.MAX_IMAGE_PIXELS = (config.server.max_pixels + 1) // 2
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", module=r"PIL\.")
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_background_ctx)
    app.on_response_prepare.append(on_prepare)
    if config.metrics.enable:
        # Without metrics nothing is counted and no hook runs: a disabled feature costs nothing.
        app[METRICS] = Metrics(metrics_dir(config) if config.server.workers > 1 else None)
        app.on_response_prepare.append(app[METRICS].on_response_prepare)
    r = app.router
    r.add_get("/i/{name}", handle_image)
    r.add_get("/i/{md5}/{variant}", handle_variant)
    r.add_route("POST", "/upload", handle_upload, expect_handler=upload_expect)
    r.add_route("PUT", "/upload", handle_upload, expect_handler=upload_expect)
    r.add_route("PUT", "/upload/{filename}", handle_upload, expect_handler=upload_expect)
    r.add_get("/api/images", handle_list)
    r.add_get("/api/images/{md5}", handle_lookup)
    r.add_delete("/api/images/{md5}", handle_delete)
    r.add_post("/api/images/{md5}/renew", handle_renew)
    r.add_get("/api/db", handle_db)
    r.add_post("/api/tokens", handle_token_create)
    r.add_get("/api/tokens", handle_token_list)
    r.add_delete("/api/tokens/{token_id}", handle_token_revoke)
    r.add_get("/healthz", handle_health)
    r.add_get("/", handle_page)
    r.add_get("/static/{asset}", handle_asset)
    r.add_get("/openapi.json", handle_openapi)
    r.add_get("/metrics", handle_metrics)
    return app


# ==== connections ===============================================================
# aiohttp accepts every connection it is offered and never times out a
# response the client stops reading. On a small box with 1024 descriptors a
# thousand idle sockets would take the service off line, so `serve` accepts
# through a ConnectionGuard: a cap below what the descriptor limit allows,
# room made by closing the connections silent longest, and a watch that drops
# a response its reader has taken nothing of for RESPONSE_STALL_TIMEOUT.

def raise_fd_limit() -> int:
    """Lift the soft open-file limit to the hard one (systemd: LimitNOFILE); returns it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def connection_limit(config: Config, fd_limit: int) -> int:
    """server.max_connections, lowered to what the descriptors allow: each
    connection may hold two (its socket and a file being sent or received)."""
    allowed = max(8, (fd_limit - FD_RESERVE) // 2) if fd_limit != -1 else config.server.max_connections
    if allowed < config.server.max_connections:
        log.warning("server.max_connections lowered from %d to %d by the open-file limit (%d); "
                    "raise LimitNOFILE (ulimit -n) to allow more", config.server.max_connections,
                    allowed, fd_limit)
    return min(config.server.max_connections, allowed)


def _bytes_acked(transport: asyncio.BaseTransport) -> Optional[int]:
    """What the peer has acknowledged so far (Linux TCP_INFO), or None."""
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 128)
    except (AttributeError, OSError):
        return None
    # struct tcp_info: tcpi_bytes_acked is the u64 at offset 120 (Linux 4.1+).
    return int.from_bytes(info[120:128], sys.byteorder) if len(info) >= 128 else None


class _GuardedRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, noting when the client last sent
    anything, and answering requests its parser refuses like every other
    error: our JSON object and headers, not a bare text/plain 400."""

    last_heard = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.last_heard = time.monotonic()
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        super().data_received(data)

    def handle_error(self, request: Any, status: int = 500, exc: Optional[BaseException] = None,
                     message: Optional[str] = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if an answer was begun
        text = (f"malformed request ({type(exc).__name__})" if 400 <= status < 500 and exc is not None
                else "malformed request" if 400 <= status < 500 else "internal server error")
        resp = web.Response(status=status, content_type="application/json",
                            text=json.dumps({"error": text, "code": _STATUS_CODES.get(status, "error")}),
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": CACHE_NO_STORE,
                                     "Referrer-Policy": "no-referrer"})
        resp.force_close()
        return resp


class _Refusal(asyncio.Protocol):
    """Every connection busy: a 503 straight away, and the socket is closed."""

    ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
              b"Retry-After: 1\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
              b"Connection: close\r\nContent-Length: 75\r\n\r\n"
              b'{"error": "too many connections; try again shortly", "code": "unavailable"}')

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.ANSWER)
        transport.close()


class ConnectionGuard:
    """Protocol factory for `loop.create_server`: caps the connections of one process."""

    def __init__(self, server: web.Server, streaming: dict, limit: int, **handler_options: Any):
        self.server, self.streaming, self.limit = server, streaming, limit
        self.handler_options = handler_options
        self.connections: list[_GuardedRequestHandler] = []
        self._progress: dict[_GuardedRequestHandler, tuple[int, float]] = {}
        self._watch: Optional[asyncio.Task] = None

    def __call__(self) -> asyncio.Protocol:
        if len(self.connections) >= self.limit and not self._make_room():
            return _Refusal()
        handler = _GuardedRequestHandler(self.server, loop=asyncio.get_running_loop(), **self.handler_options)
        self.connections.append(handler)
        return handler

    def _busy_writing(self, transport: asyncio.BaseTransport) -> bool:
        return transport.get_write_buffer_size() > 0 or transport in self.streaming

    def _make_room(self) -> bool:
        """Close the connections silent longest with nothing left to send
        (idle keep-alives, unfinished request heads): a sixteenth of the
        cap at once, so a flood pays one scan per many connections."""
        live = [h for h in self.connections if h.transport is not None and not h.transport.is_closing()]
        self.connections = live
        if len(live) < self.limit:
            return True
        quiet = sorted((h for h in live if not self._busy_writing(h.transport)), key=lambda h: h.last_heard)
        for handler in quiet[:max(1, self.limit // 16)]:
            handler.force_close()
        return bool(quiet)

    # -- responses that make no progress --
    def start(self) -> None:
        self._watch = asyncio.create_task(self._watch_stalls(), name="imgproxy-stall-watch")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    async def _watch_stalls(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, RESPONSE_STALL_TIMEOUT / 4))
            try:
                self.drop_stalled(time.monotonic())
            except Exception:
                log.exception("stall watch failed; it goes on")

    def drop_stalled(self, now: float) -> None:
        progress = {}
        for handler in self.connections:
            transport = handler.transport
            if transport is None or transport.is_closing() or not self._busy_writing(transport):
                continue
            # Progress is what the peer acknowledged (or, without TCP_INFO,
            # any change in what waits to be written).
            mark = _bytes_acked(transport)
            if mark is None:
                mark = -transport.get_write_buffer_size()
            before = self._progress.get(handler)
            if before is None or before[0] != mark:
                progress[handler] = (mark, now)
                continue
            if now - before[1] < RESPONSE_STALL_TIMEOUT:
                progress[handler] = before
                continue
            log.info("dropped a response to %s: nothing taken for %g s",
                     transport.get_extra_info("peername", ("?",))[0], RESPONSE_STALL_TIMEOUT)
            task = self.streaming.pop(transport, None)
            if task is not None:
                task.cancel()  # a native sendfile would otherwise wait on the dead socket forever
            transport.abort()
        self._progress = progress


# ==== moving house ==============================================================
# `imgproxy.py move --config FROM.json --to TO.json` copies an installation to
# another pair of engines (files or S3 for the bytes, SQLite or PostgreSQL for
# the rows), in any direction. The source is only read: SQLite opened read-only,
# PostgreSQL in a read-only transaction, the bucket only listed and read. At the
# target each image goes as the server itself would publish it: its bytes first,
# read back and checked against the md5 that names them, then its row and holds
# in one write transaction (files are renamed into place inside that transaction;
# objects are claimed first, so a cleanup pass running on the target leaves them
# alone until their rows exist). A kill at any moment leaves no row naming a
# missing object, and running the command again finishes the job: what is
# already at the target is read and verified, not copied again.

MOVE_BATCH = 50          # images per target transaction, and per progress line
MOVE_CONCURRENCY = 4     # images fetched, written and read back at once


@dataclasses.dataclass
class MoveReport:
    images: int = 0          # not-expired images at the source
    expired: int = 0         # rows left behind because they expired
    copied: int = 0          # bytes written to the target and verified
    already: int = 0         # found at the target, verified, not copied again
    replaced: int = 0        # of `copied`: wrong bytes under the key at the target, replaced
    failed: int = 0
    rows_new: int = 0
    holds: int = 0
    tokens: int = 0
    meta: int = 0

    @property
    def verified(self) -> int:
        return self.copied + self.already

    def progress(self) -> str:
        return (f"  {self.verified + self.failed}/{self.images} images: {self.copied} copied, "
                f"{self.already} already there, {self.failed} failed")

    def summary(self) -> str:
        replaced = f" ({self.replaced} replaced wrong bytes)" if self.replaced else ""
        return (f"move {'done' if self.failed == 0 else 'INCOMPLETE'}: {self.copied} copied{replaced}, "
                f"{self.already} already there, {self.verified} verified, {self.failed} failed "
                f"of {self.images} images; {self.rows_new} new rows, {self.holds} holds, {self.tokens} tokens, "
                f"{self.meta} meta; {self.expired} expired left behind; variants not copied")


def _endpoint_identity(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    host = "127.0.0.1" if host in ("localhost", "::1") else host
    return parts.scheme, host, parts.port or (443 if parts.scheme == "https" else 80)


def _pg_identity(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    host = (parts.hostname or query.get("host", [""])[0]).lower()
    host = "127.0.0.1" if host in ("localhost", "::1") else host
    port = parts.port or int(query.get("port", ["5432"])[0] or 5432)
    return host, port, urllib.parse.unquote(parts.path.lstrip("/")) or urllib.parse.unquote(parts.username or "")


def _store_places(config: Config) -> dict[tuple, str]:
    """Where an installation keeps anything, each named for the operator."""
    places = {("folder", str(config.server.data_dir.resolve())):
              f"the data folder {config.server.data_dir} (server.data_dir)"}
    st = config.storage
    if st.backend == "s3":
        places[("bucket", *_endpoint_identity(st.endpoint), st.bucket, st.prefix)] = \
            f'bucket "{st.bucket}" at {st.endpoint} with prefix "{st.prefix}" (storage)'
    if config.database.url is not None:
        places[("database", *_pg_identity(config.database.url))] = "the PostgreSQL database (database.url)"
    return places


def refuse_same_store(source: Config, target: Config) -> None:
    """FROM and TO must not share a folder, a bucket+prefix or a database: the
    target is written to, and the source must stay as it was."""
    target_places = _store_places(target)
    for place, name in _store_places(source).items():
        if place in target_places:
            raise ConfigError(f"--to: FROM and TO share {name}; the target needs its own")


def _file_md5(path: Path) -> Optional[str]:
    """Hex MD5 of a file's bytes (blocking), None when it is absent."""
    digest = hashlib.md5()
    try:
        with open(path, "rb") as f:
            while piece := f.read(FLUSH_BYTES):
                digest.update(piece)
    except (FileNotFoundError, IsADirectoryError):
        return None
    return digest.hexdigest()


async def _object_md5(blobs: S3Blobs, key: str) -> Optional[str]:
    """Hex MD5 of an object's bytes as the store gives them now, None when absent."""
    digest = hashlib.md5()
    try:
        async with contextlib.aclosing(blobs.stream(key)) as pieces:
            async for piece in pieces:
                digest.update(piece)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


@dataclasses.dataclass
class SourceTables:
    """What is moved, read at one moment from the source database."""
    images: list[dict]
    holds: dict[str, list[tuple]]   # md5 -> [(md5, username, held_at)]
    tokens: list[tuple]
    meta: list[tuple]


def _read_sqlite_tables(db: sqlite3.Connection, now: float, report: MoveReport) -> SourceTables:
    """Everything to move, in one read transaction (older databases may lack
    source_md5 or the tokens table)."""
    db.execute("BEGIN")
    try:
        columns = {c[1] for c in db.execute("PRAGMA table_info(images)")}
        if not columns:
            raise ConfigError("server.data_dir: its images.db has no images table (not an imgproxy database)")
        select = IMAGE_COLUMNS + (", source_md5" if "source_md5" in columns else ", NULL AS source_md5")
        images = [dict(zip(ROW_COLUMNS.replace(" ", "").split(","), r))
                  for r in db.execute(f"SELECT {select} FROM images ORDER BY md5")]
        holds = db.execute("SELECT md5, username, held_at FROM holds").fetchall()
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tokens = (db.execute("SELECT id, username, name, secret_sha256, created_at, last_used_at FROM tokens")
                  .fetchall() if "tokens" in tables else [])
        meta = db.execute("SELECT key, value FROM meta").fetchall() if "meta" in tables else []
    finally:
        db.execute("ROLLBACK")
    return _source_tables(images, holds, tokens, meta, now, report)


def _source_tables(images: list[dict], holds: Iterable, tokens: Iterable, meta: Iterable,
                   now: float, report: MoveReport) -> SourceTables:
    live = [r for r in images if r["expire_at"] > now]
    report.images, report.expired = len(live), len(images) - len(live)
    names = {r["md5"] for r in live}
    by_md5: dict[str, list[tuple]] = collections.defaultdict(list)
    for md5, username, held_at in holds:
        if md5 in names:
            by_md5[md5].append((md5, username, float(held_at)))
    return SourceTables(live, by_md5, [tuple(t) for t in tokens], [tuple(m) for m in meta])


class MoveSource:
    """The installation moved from, opened so that nothing in it changes."""

    def __init__(self, config: Config):
        self.config = config
        self.storage = Storage(config.server.data_dir)   # paths only: prepare() is never called
        self.blobs: Optional[S3Blobs] = None
        self.pg: Any = None   # one asyncpg connection

    async def open(self) -> "MoveSource":
        try:
            if self.config.database.url is not None:
                import asyncpg  # optional: only with database.url (checked when the config was read)
                try:
                    self.pg = await asyncpg.connect(self.config.database.url, timeout=PG_COMMAND_SECONDS,
                                                    command_timeout=PG_COMMAND_SECONDS)
                except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    raise ConfigError(f"database.url: cannot read the PostgreSQL database: "
                                      f"{pg_error_text(exc)}") from None
            elif not await asyncio.to_thread(self.storage.db_path.is_file):
                raise ConfigError(f"server.data_dir: no images.db in {self.storage.root} "
                                  "(is this the installation to move?)")
            if self.config.storage.backend == "s3":
                st = self.config.storage
                self.blobs = S3Blobs(st.endpoint, st.bucket, st.region, st.prefix,
                                     st.access_key_id, st.secret_access_key)
                await self.blobs.open()   # HEAD of the bucket: nothing is written
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self.blobs is not None:
            with contextlib.suppress(Exception):
                await self.blobs.close()
            self.blobs = None
        if self.pg is not None:
            with contextlib.suppress(Exception):
                await self.pg.close(timeout=2)
            self.pg = None

    async def read_tables(self, now: float, report: MoveReport) -> SourceTables:
        if self.pg is not None:
            return await self._read_pg_tables(now, report)
        return await asyncio.to_thread(self._read_sqlite, now, report)

    def _read_sqlite(self, now: float, report: MoveReport) -> SourceTables:
        # mode=ro alone would create images.db-wal and -shm beside a database at
        # rest (no server running). immutable=1 creates nothing but assumes no
        # writer: it is used only while no -wal exists, and the read is redone
        # with mode=ro if a server started (the -wal appeared or the file changed).
        path = self.storage.db_path
        wal = path.with_name(path.name + "-wal")
        uri = path.absolute().as_uri()
        if not wal.exists():
            before = os.stat(path)
            db = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None)
            try:
                tables = _read_sqlite_tables(db, now, report)
            finally:
                db.close()
            after = os.stat(path)
            if not wal.exists() and (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size):
                return tables
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, timeout=15)
        try:
            return _read_sqlite_tables(db, now, report)
        finally:
            db.close()

    async def _read_pg_tables(self, now: float, report: MoveReport) -> SourceTables:
        conn = self.pg
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            present = await conn.fetchrow("SELECT to_regclass('images') AS images, to_regclass('tokens') AS tokens, "
                                          "to_regclass('meta') AS meta")
            if present["images"] is None:
                raise ConfigError("database.url: that database has no images table (not an imgproxy database)")
            images = [dict(r) for r in await conn.fetch(f"SELECT {ROW_COLUMNS} FROM images ORDER BY md5")]
            holds = await conn.fetch("SELECT md5, username, held_at FROM holds")
            tokens = (await conn.fetch("SELECT id, username, name, secret_sha256, created_at, last_used_at "
                                       "FROM tokens") if present["tokens"] is not None else [])
            meta = await conn.fetch("SELECT key, value FROM meta") if present["meta"] is not None else []
        return _source_tables(images, holds, tokens, meta, now, report)

    async def local_copy(self, md5: str, ext: str, into: Storage,
                         in_place: bool) -> tuple[Optional[Path], Optional[tuple[Path, int]]]:
        """The image's bytes as a local file: with `in_place`, the source's own
        file when it has one, (path, None); else (path, staged), a locked copy
        in `into`'s tmp/. (None, None) when the source lacks the image."""
        if self.blobs is None and in_place:
            path = self.storage.image_path(md5, ext)
            if not await asyncio.to_thread(path.is_file):
                return None, None
            return path, None
        staged = await asyncio.to_thread(into.create_tmp, "move")
        try:
            if self.blobs is None:
                await asyncio.to_thread(shutil.copyfile, self.storage.image_path(md5, ext), staged[0])
            else:
                await self.blobs.download(image_key(md5, ext), staged[0])
        except FileNotFoundError:
            await asyncio.to_thread(_release_staged, staged, into)
            return None, None
        except BaseException:
            await asyncio.to_thread(_release_staged, staged, into)
            raise
        return staged[0], staged


def _release_staged(staged: Optional[tuple[Path, int]], storage: Storage) -> None:
    """Remove a staged copy (if not renamed into place meanwhile) and drop its lock."""
    if staged is not None:
        _unlink_quietly(staged[0])
        storage.release_tmp(*staged)


class _ImageFailed(Exception):
    """This image could not be moved (the rest go on); the message says why."""


class Mover:
    """Copies a MoveSource's tables into an open ImageStore, batch by batch."""

    def __init__(self, source: MoveSource, target: ImageStore, report: MoveReport,
                 say: Callable[[str], None], complain: Callable[[str], None]):
        self.source, self.target, self.report = source, target, report
        self.say, self.complain = say, complain
        self.slots = asyncio.Semaphore(MOVE_CONCURRENCY)
        self.listed: Optional[set[str]] = None   # keys in the target bucket when the run began

    async def run(self, tables: SourceTables) -> None:
        if self.target.blobs is not None:
            # One listing spares a GET per image that is not there yet; a key
            # listed is still read and checked before it counts as there.
            self.listed = {key async for key, _size, _modified in self.target.blobs.list("")}
        self.say(f"moving {self.report.images} images ({self.report.expired} expired ones stay behind), "
                 f"{sum(map(len, tables.holds.values()))} holds, {len(tables.tokens)} tokens, "
                 f"{len(tables.meta)} meta; variants are not copied (the target renders them on demand)")
        for at in range(0, len(tables.images), MOVE_BATCH):
            await self._move_batch(tables.images[at:at + MOVE_BATCH], tables.holds)
            self.say(self.report.progress())
        await self.target.write(self._record_tokens_and_meta, tables.tokens, tables.meta)

    # -- one image: its bytes at the target, verified --

    async def _target_md5(self, md5: str, ext: str, fresh: bool = False) -> Optional[str]:
        """MD5 of what the target holds under the image's name; `fresh` reads
        the object even if it was not listed (after writing it)."""
        if self.target.blobs is not None:
            key = image_key(md5, ext)
            if not fresh and self.listed is not None and key not in self.listed:
                return None
            return await _object_md5(self.target.blobs, key)
        return await asyncio.to_thread(_file_md5, self.target.storage.image_path(md5, ext))

    async def _bring(self, row: dict) -> tuple[str, Optional[tuple[Path, int]]]:
        """Make the image's bytes present and verified at the target: ("already",
        None), or ("copied" / "replaced", the staged file a files target renames
        into place with the row). Raises _ImageFailed for this image alone."""
        md5, ext = row["md5"], row["ext"]
        async with self.slots:
            present = await self._target_md5(md5, ext)
            if present == md5:
                return "already", None
            if present is not None:
                self.complain(f"  {md5}.{ext}: wrong bytes at the target (their MD5 is {present}); "
                              "replacing them")
            # An object store is sent the source's own file when there is one. A
            # files target gets a copy in its own tmp/, so that the MD5 taken next
            # is of bytes on the target's disk; it is renamed into place with its row.
            local, staged = await self.source.local_copy(md5, ext, self.target.storage,
                                                         in_place=self.target.blobs is not None)
            if local is None:
                raise _ImageFailed(f"{md5}.{ext}: missing at the source")
            try:
                digest = await asyncio.to_thread(_file_md5, local)
                if digest != md5:
                    raise _ImageFailed(f"{md5}.{ext}: its bytes at the source have MD5 {digest}; not copied")
                if self.target.blobs is not None:
                    await self.target.blobs.put_file(image_key(md5, ext), local, row["mime"], OBJECT_CACHE_CONTROL)
                    back = await self._target_md5(md5, ext, fresh=True)
                    if back != md5:
                        raise _ImageFailed(f"{md5}.{ext}: the target store gives back other bytes "
                                           f"(MD5 {back}) after the copy")
                    await asyncio.to_thread(_release_staged, staged, self.target.storage)
                    staged = None
            except BaseException:
                await asyncio.to_thread(_release_staged, staged, self.target.storage)
                raise
            return ("replaced" if present is not None else "copied"), staged

    async def _bring_or_fail(self, row: dict) -> Optional[tuple[str, Optional[tuple[Path, int]]]]:
        try:
            return await self._bring(row)
        except _ImageFailed as exc:
            self.complain(f"  failed {exc}")
            return None

    # -- a batch: bytes first, then the rows in one transaction --

    async def _move_batch(self, rows: list[dict], holds: dict[str, list[tuple]]) -> None:
        target = self.target
        md5s = [r["md5"] for r in rows]
        if target.blobs is not None:
            await target.write(self._claim, md5s)
        results = await asyncio.gather(*(self._bring_or_fail(r) for r in rows), return_exceptions=True)
        done = [(row, outcome) for row, outcome in zip(rows, results) if isinstance(outcome, tuple)]
        try:
            trouble = next((r for r in results if isinstance(r, BaseException)), None)
            if trouble is not None:
                raise trouble   # an engine failed, not one image: the run stops, nothing is lost
            recorded = await target.write(self._record, done, holds, md5s)
        finally:
            for _row, (_kind, staged) in done:   # renamed into place by _record, or removed here
                await asyncio.to_thread(_release_staged, staged, target.storage)
        for row, (kind, _staged) in done:
            if row["md5"] not in recorded:
                self.complain(f"  failed {row['md5']}.{row['ext']}: removed at the target meanwhile "
                              "(by a cleanup pass?); run the move again")
            elif kind == "already":
                self.report.already += 1
            else:
                self.report.copied += 1
                self.report.replaced += kind == "replaced"
        self.report.failed += len(rows) - len(recorded)

    def _claim(self, txn: Txn, md5s: list[str]) -> None:
        # A cleanup pass on the target removes objects no row holds unless claimed.
        now = self.target.clock()
        txn.db.executemany("INSERT INTO claims (md5, claimed_at) VALUES (?, ?) "
                           "ON CONFLICT (md5) DO UPDATE SET claimed_at = excluded.claimed_at",
                           [(m, now) for m in md5s])

    def _record(self, txn: Txn, done: list[tuple[dict, tuple]], holds: dict[str, list[tuple]],
                claimed: list[str]) -> set[str]:
        """Rows and holds of the images whose bytes are in place (renaming staged
        files there first); returns the md5s recorded."""
        storage = self.target.storage
        ready = []
        for row, (kind, staged) in done:
            md5, ext = row["md5"], row["ext"]
            if staged is not None:
                storage.place(md5, ext, staged[0])
            elif self.target.blobs is None and not storage.image_path(md5, ext).is_file():
                continue   # verified, then removed by someone else before this transaction
            ready.append(row)
        if ready:
            marks = ",".join("?" * len(ready))
            known = {r[0] for r in txn.db.execute(f"SELECT md5 FROM images WHERE md5 IN ({marks})",
                                                  [r["md5"] for r in ready])}
            self.report.rows_new += len(ready) - len(known)
            txn.changed = bool(known)
            txn.db.executemany(
                f"INSERT INTO images ({ROW_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (md5) DO UPDATE SET "
                "expire_at = CASE WHEN excluded.expire_at > images.expire_at "
                "THEN excluded.expire_at ELSE images.expire_at END, "
                "access_count = CASE WHEN excluded.access_count > images.access_count "
                "THEN excluded.access_count ELSE images.access_count END, "
                "source_md5 = COALESCE(images.source_md5, excluded.source_md5)",
                [(r["md5"], r["ext"], r["format"], r["mime"], r["name"], int(r["size"]), int(r["width"]),
                  int(r["height"]), int(r["access_count"]), float(r["created_at"]), float(r["expire_at"]),
                  r["source_md5"]) for r in ready])
            held = [h for r in ready for h in holds.get(r["md5"], ())]
            if held:
                txn.db.executemany(
                    "INSERT INTO holds (md5, username, held_at) VALUES (?, ?, ?) ON CONFLICT (md5, username) "
                    "DO UPDATE SET held_at = CASE WHEN excluded.held_at > holds.held_at "
                    "THEN excluded.held_at ELSE holds.held_at END", held)
            self.report.holds += len(held)
        if self.target.blobs is not None:
            marks = ",".join("?" * len(claimed))
            txn.db.execute(f"DELETE FROM claims WHERE md5 IN ({marks})", claimed)
        return {r["md5"] for r in ready}

    def _record_tokens_and_meta(self, txn: Txn, tokens: list[tuple], meta: list[tuple]) -> None:
        # Tokens are digests only (the secrets were never stored); one the target
        # has already keeps its row, and gains the later last use.
        for token_id, username, name, secret, created_at, last_used_at in tokens:
            added = txn.db.execute(
                "INSERT INTO tokens (id, username, name, secret_sha256, created_at, last_used_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (token_id, username, name, bytes(secret), float(created_at),
                 None if last_used_at is None else float(last_used_at))).rowcount
            if not added and last_used_at is not None:
                txn.db.execute("UPDATE tokens SET last_used_at = ? WHERE id = ? AND "
                               "(last_used_at IS NULL OR last_used_at < ?)",
                               (float(last_used_at), token_id, float(last_used_at)))
            self.report.tokens += 1
        for key, value in meta:
            txn.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value))
            self.report.meta += 1


async def _pg_fingerprint(conn: Any) -> tuple:
    """Which database this is, whatever URL reached it: two clusters do not start
    in the same microsecond."""
    row = await conn.fetchrow("SELECT current_database(), pg_postmaster_start_time()::text")
    return tuple(row)


async def move_installation(source_config: Config, target_config: Config, report: MoveReport,
                            labels: tuple[str, str] = ("FROM", "TO"),
                            say: Callable[[str], None] = print, complain: Callable[[str], None] = print) -> None:
    """Copy every image that has not expired, with its holds, and the tokens and
    meta, from source to target (see the chapter's head), counting in `report`.
    Raises ConfigError for what the operator must fix (prefixed with the label
    of the config concerned); StoreUnavailable, OSError or a database error when
    an engine fails mid-way: the run stops, and running it again resumes it."""
    source_label, target_label = labels
    try:
        source = await MoveSource(source_config).open()
    except ConfigError as exc:
        raise ConfigError(f"{source_label}: {exc}") from None
    try:
        try:
            tables = await source.read_tables(time.time(), report)
        except ConfigError as exc:
            raise ConfigError(f"{source_label}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{source_label}: server.data_dir: cannot read its images.db: {exc}") from None
        if source.pg is not None and target_config.database.url is not None:
            import asyncpg
            try:
                conn = await asyncpg.connect(target_config.database.url, timeout=PG_COMMAND_SECONDS)
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise ConfigError(f"{target_label}: database.url: cannot use the PostgreSQL database: "
                                  f"{pg_error_text(exc)}") from None
            try:
                same = await _pg_fingerprint(conn) == await _pg_fingerprint(source.pg)
            finally:
                await conn.close(timeout=2)
            if same:
                raise ConfigError("--to: FROM and TO name the same PostgreSQL database (database.url); "
                                  "the target needs its own")
        try:
            target = await ImageStore(target_config).open(listen=False)
        except ConfigError as exc:
            raise ConfigError(f"{target_label}: {exc}") from None
        except OSError as exc:   # the data folder cannot be made or written
            raise ConfigError(f"{target_label}: server.data_dir: cannot use {target_config.server.data_dir}: "
                              f"{exc.strerror or exc}") from None
        try:
            await Mover(source, target, report, say, complain).run(tables)
        finally:
            await target.close()
    finally:
        await source.close()


MOVE_HELP = """\
Copy this installation (--config, the source) to another one (--to, the target):
files+SQLite to S3+PostgreSQL, back, or mixed. The source is only read. Every
image that has not expired is copied bytes first, read back at the target and
checked against its MD5, then its row and holds; then the app tokens (digests
only) and meta. Images already at the target are verified, not copied again, so
a second run copies nothing, and a run stopped at any moment (even kill -9) is
finished by running it again. Variants are NOT copied: the target renders them
again on demand. Users are not moved: give TO the same users[].
Exit status: 0 when every image is at the target and verified, 1 when some are
not (an engine failed, or an image's bytes are missing or wrong at the source),
2 for a config problem (one line naming the key)."""


# ==== main ======================================================================

class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs each request its parser refuses at ERROR with a traceback
    whose message quotes the offending bytes (an overlong Authorization header
    included). That is the client's fault: one INFO line, no bytes quoted.

    aiohttp internals (checked against 3.9.5 and 3.14.5): the record comes from
    the "aiohttp.server" logger with the HttpProcessingError as exc_info; 3.14
    passes the peer address as the first argument, 3.9 passes none ("?" here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, http_exceptions.HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg, record.args = "refused a malformed request from %s (%s)", (peer, type(exc).__name__)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def prepare_data_dir(config: Config) -> None:
    """Make data_dir's folders, or say in one line why they cannot be made."""
    data_dir = config.server.data_dir
    try:
        Storage(data_dir).prepare()
    except OSError as exc:
        reason = "exists but is not a folder" if isinstance(exc, (FileExistsError, NotADirectoryError)) \
            else exc.strerror or str(exc)
        raise ConfigError(f"server.data_dir: cannot use {data_dir}: {reason}") from None


def setup_logging(config: Config) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if config.server.log_file:
        config.server.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(config.server.log_file, encoding="utf-8"))
    logging.basicConfig(level=config.server.log_level, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(
        logging.INFO if config.server.access_log else logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(_MalformedRequestFilter())


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(config: Config, sock: socket.socket, worker: Optional[int] = None) -> None:
    """Run until SIGTERM/SIGINT, then stop: in-flight requests get a grace period,
    access counts are flushed, background tasks are cancelled."""
    app = create_app(config)
    handler_options = dict(access_log=logging.getLogger("aiohttp.access") if config.server.access_log
                           else None, keepalive_timeout=KEEPALIVE_TIMEOUT)
    runner = web.AppRunner(app, shutdown_timeout=10.0, handle_signals=False, **handler_options)
    await runner.setup()
    loop = asyncio.get_running_loop()
    guard = ConnectionGuard(runner.server, app[STREAMING], connection_limit(config, raise_fd_limit()),
                            **handler_options)
    listener = await loop.create_server(guard, sock=sock, backlog=1024)
    if app[VARIANTS].widths:  # the first render need not wait for the render processes to start
        loop.run_in_executor(None, app[VARIANTS].renderers.warm)
    guard.start()
    host, port = sock.getsockname()[:2]
    log.info("imgproxy %s%s listening on http://%s:%d (public URLs: %s)", __version__,
             "" if worker is None else f" worker {worker}",
             f"[{host}]" if ":" in host else host, port, config.base_url)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        listener.close()
        await guard.stop()
        await runner.cleanup()
        log.info("stopped")


def run_workers(config: Config, sock: socket.socket, count: int) -> int:
    """Pre-fork: `count` processes accept on one listening socket.

    Only worker 0 runs the scheduled cleanup; access counts are flushed by
    each; serving caches stay coherent through the shared cache.gen marker.
    If a worker dies, the others are stopped and the exit status is 1, so
    systemd restarts the whole group.
    """
    # Create the database (schema, WAL) once, before the workers race to.
    storage = Storage(config.server.data_dir)
    storage.prepare()
    if config.database.url is None:
        open_write_db(storage.db_path).close()
    if config.metrics.enable:
        # Counts start from zero with the workers: no snapshot of an earlier run is summed.
        shutil.rmtree(metrics_dir(config), ignore_errors=True)
        metrics_dir(config).mkdir()
    children: dict[int, int] = {}
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                cfg = config if index == 0 else dataclasses.replace(
                    config, cleanup=dataclasses.replace(config.cleanup, enable=False))
                asyncio.run(serve(cfg, sock, worker=index))
            except BaseException:  # reported, then this process exits
                log.exception("worker %d failed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
    sock.close()
    stopping = False

    def stop_all(signum=None, frame=None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(wait_status)
        if not stopping:
            log.error("worker %s exited with status %s; stopping the others", index, code)
            status = 1
            stop_all()
    return status


def _hash_password_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="imgproxy.py hash-password",
                                     description="Print a password_hash for config.json users[].")
    parser.add_argument("--stdin", action="store_true", help="read the password from standard input")
    args = parser.parse_args(argv)
    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise SystemExit("passwords differ; nothing printed")
    if not password:
        raise SystemExit("empty password; nothing printed")
    print(hash_password(password))
    return 0


def _config_value(config: Config, key: str) -> str:
    """One value of `check-config --print`, as the server sees it (defaults applied).

    A dotted config key, or a derived one: `base_url` (public URL prefix),
    `local_url` (where this machine reaches the listener), `example_password`
    (`yes` when the server would refuse a non-loopback host for it) and
    `listen_problem` (why it refuses its own host, else empty).
    """
    if key == "base_url":
        return config.base_url
    if key == "local_url":
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(config.server.host, config.server.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{config.server.port}"
    if key in ("example_password", "listen_problem"):
        try:
            check_safe_to_listen(config, config.server.host if key == "listen_problem" else "0.0.0.0")
        except ConfigError as exc:
            return "yes" if key == "example_password" else str(exc)
        return "no" if key == "example_password" else ""
    section, _, name = key.partition(".")
    part = getattr(config, section, None) if section in ("server", "cleanup", "client") else None
    field = next((f for f in dataclasses.fields(part) if f.name == name), None) if part else None
    if field is None:
        raise ConfigError(f"{key}: not a config key (like server.host or cleanup.cleanup_time)")
    if not field.repr:
        raise ConfigError(f"{key}: a secret; check-config does not print it")
    value = getattr(part, name)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, dt.time):
        return value.isoformat()
    return "" if value is None else str(value)


def _check_config_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="imgproxy.py check-config",
        description="Validate config.json as the server would; print values for scripts (units/install.sh).")
    parser.add_argument("--config", default=str(Path(__file__).with_name("config.json")),
                        help="path of config.json (default: beside this file)")
    parser.add_argument("--print", nargs="+", default=[], metavar="KEY", dest="keys",
                        help="print these values, one a line: config keys (server.port) or base_url, "
                             "local_url, example_password, listen_problem")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        values = [_config_value(config, key) for key in args.keys]
    except ConfigError as exc:
        print(f"imgproxy: {exc}", file=sys.stderr)
        return 2
    if not values:
        print(f"{Path(args.config).absolute()}: ok")
    for value in values:
        print(value)
    return 0


def _move_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="imgproxy.py move", description=MOVE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).with_name("config.json")), metavar="FROM.json",
                        help="the installation to copy (only read; default: config.json beside this file)")
    parser.add_argument("--to", required=True, metavar="TO.json", help="the installation to copy it to")
    args = parser.parse_args(argv)
    try:
        source_config = load_config(args.config)
        target_config = load_config(args.to)
        refuse_same_store(source_config, target_config)
    except ConfigError as exc:
        print(f"imgproxy: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    report = MoveReport()
    labels = (str(Path(args.config).absolute()), str(Path(args.to).absolute()))
    stopped = None
    try:
        asyncio.run(move_installation(source_config, target_config, report, labels,
                                      say=functools.partial(print, flush=True),
                                      complain=functools.partial(print, file=sys.stderr, flush=True)))
    except ConfigError as exc:
        print(f"imgproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stopped = "interrupted"
    except (StoreUnavailable, OSError) as exc:
        stopped = str(exc)
    except Exception as exc:
        if not is_database_outage(exc):
            raise
        stopped = f"database: {pg_error_text(exc)}"
    if stopped is not None:
        print(f"imgproxy: move stopped ({stopped}); nothing is lost: run the same command again to finish",
              file=sys.stderr, flush=True)
        report.failed = report.images - report.verified
    print(report.summary(), flush=True)
    return 0 if stopped is None and report.failed == 0 else 1


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hash-password"]:
        return _hash_password_command(argv[1:])
    if argv[:1] == ["check-config"]:
        return _check_config_command(argv[1:])
    if argv[:1] == ["move"]:
        return _move_command(argv[1:])
    parser = argparse.ArgumentParser(prog="imgproxy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).with_name("config.json")),
                        help="path of config.json (default: beside this file)")
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port; 0 picks a free one)")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        host = args.host or config.server.host
        check_safe_to_listen(config, host)
    except ConfigError as exc:
        print(f"imgproxy: {exc}", file=sys.stderr)
        return 2
    try:
        prepare_data_dir(config)
    except ConfigError as exc:
        print(f"imgproxy: {exc}", file=sys.stderr)
        return 2
    try:
        setup_logging(config)
    except OSError as exc:
        print(f"imgproxy: server.log_file: cannot write {config.server.log_file}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    port = config.server.port if args.port is None else args.port
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        print(f"imgproxy: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    # URLs carry the port really bound (it differs from the config with --port).
    config = dataclasses.replace(config, server=dataclasses.replace(
        config.server, host=host, port=sock.getsockname()[1]))
    with contextlib.suppress(ImportError):
        import uvloop  # optional: a faster event loop when installed
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if config.server.workers > 1:
        return run_workers(config, sock, config.server.workers)
    try:
        asyncio.run(serve(config, sock))
    except KeyboardInterrupt:
        pass
    except ConfigError as exc:  # the database or the bucket named by the config cannot be used
        print(f"imgproxy: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"imgproxy: storage: {exc}", file=sys.stderr)
        return 1
    return 0


# ==== appendix: data =========================================================
# Long constant text kept out of the way of the code above: the OpenAPI
# document and the upload page. Module-level, so defined before main() runs.

# ---- openapi ------------------------------------------------------------------
# The wire format (the README's "API" section) as an OpenAPI 3 document, served at /openapi.json
# and shipped as openapi.json (tests keep the two equal and fuzz the server with
# it). Error answers all share one schema; `_errors` lists which ones a route has.

def _errors(*statuses: int) -> dict:
    words = {400: "bad input (malformed id, parameter or body)", 401: "no or wrong credentials",
             403: "the user lacks the needed role, or an app token where a password is needed",
             404: "not found", 408: "the upload stalled", 409: "too many tokens: revoke one first",
             412: "a precondition failed (If-Match, If-Unmodified-Since)",
             413: "too large: bytes, pixels or header", 415: "not an accepted image",
             416: "range not satisfiable", 417: "unknown Expect", 429: "too many failed sign-ins",
             503: "database busy or data folder not writable", 507: "disk full"}
    out = {}
    for status in statuses:
        resp: dict = {"description": words[status],
                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if status == 401:
            resp["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"},
                                                    "description": "absent for the upload page"}}
        if status in (429, 503):
            resp["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
        out[str(status)] = resp
    return out


def _json(schema_name: str, description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}}}


_MD5_PARAM = {"name": "md5", "in": "path", "required": True,
              "description": "hex MD5 of the image bytes, or its source_md5 (the bytes as uploaded)",
              "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}
_UPLOADED = {
    "200": {"description": "already stored: expiry renewed (status: exists)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImageInfo"}},
                        "text/plain": {"schema": {"type": "string"}}}},
    "201": {"description": "stored (status: uploaded)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImageInfo"}},
                        "text/plain": {"schema": {"type": "string"}}}},
    **_errors(400, 401, 408, 413, 415, 417, 429, 503, 507),
}
_RAW_BODY = {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}
_BASIC = [{"basic": []}, {"bearer": []}]  # a password, or an app token acting for its user
_PASSWORD_ONLY = [{"basic": []}]
_TOKEN_ID_PARAM = {"name": "token_id", "in": "path", "required": True, "description": "a token's id",
                   "schema": {"type": "string", "pattern": "^[0-9a-f]{16}$"}}

OPENAPI: dict = {
    "openapi": "3.0.3",
    "info": {"title": "imgproxy", "version": __version__,
             "description": "Self-hosted image host: upload an image, get a public URL. "
                            "Errors are JSON {error, code}."},
    "components": {
        "securitySchemes": {"basic": {"type": "http", "scheme": "basic"},
                            "bearer": {"type": "http", "scheme": "bearer",
                                       "description": "an app token (imgp_...) from POST /api/tokens"},
                            "metrics_token": {"type": "http", "scheme": "bearer",
                                              "description": "metrics.token from config.json; /metrics only"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error", "code"],
                      "properties": {"error": {"type": "string"}, "code": {"type": "string"}}},
            "ImageInfo": {
                "type": "object",
                "required": ["md5", "url", "name", "size", "width", "height", "format", "mime",
                             "access_count", "created_at", "expire_at"],
                "properties": {
                    "md5": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                    "source_md5": {"type": "string", "pattern": "^[0-9a-f]{32}$",
                                   "description": "MD5 of the bytes as uploaded, when metadata removal "
                                                  "or conversion changed them"},
                    "url": {"type": "string"},
                    "name": {"type": "string"},
                    "size": {"type": "integer", "minimum": 1},
                    "width": {"type": "integer", "minimum": 1},
                    "height": {"type": "integer", "minimum": 1},
                    "format": {"type": "string", "enum": list(FORMATS)},
                    "mime": {"type": "string"},
                    "access_count": {"type": "integer", "minimum": 0},
                    "created_at": {"type": "string", "format": "date-time"},
                    "expire_at": {"type": "string", "format": "date-time"},
                    "status": {"type": "string", "enum": ["uploaded", "exists"]},
                },
            },
            "ImageList": {"type": "object", "required": ["images", "total"],
                          "properties": {"images": {"type": "array",
                                                    "items": {"$ref": "#/components/schemas/ImageInfo"}},
                                         "total": {"type": "integer", "minimum": 0}}},
            "Token": {"type": "object", "required": ["id", "name", "created_at", "last_used_at"],
                      "properties": {"id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                                     "name": {"type": "string", "minLength": 1, "maxLength": TOKEN_NAME_MAX},
                                     "created_at": {"type": "string", "format": "date-time"},
                                     "last_used_at": {"type": "string", "format": "date-time",
                                                      "nullable": True}}},
            "NewToken": {"type": "object", "required": ["id", "name", "token", "created_at", "last_used_at"],
                         "properties": {"id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                                        "name": {"type": "string", "minLength": 1, "maxLength": TOKEN_NAME_MAX},
                                        "token": {"type": "string", "pattern": "^imgp_[0-9A-Za-z]{43}$"},
                                        "created_at": {"type": "string", "format": "date-time"},
                                        "last_used_at": {"type": "string", "format": "date-time",
                                                         "nullable": True}}},
            "TokenList": {"type": "object", "required": ["tokens"],
                          "properties": {"tokens": {"type": "array",
                                                    "items": {"$ref": "#/components/schemas/Token"}}}},
            "Health": {"type": "object", "required": ["status"],
                       "properties": {"status": {"type": "string", "enum": ["ok", "error"]},
                                      "error": {"type": "string"}, "code": {"type": "string"}}},
        },
    },
    "paths": {
        "/upload": {
            "post": {"summary": "upload an image (multipart field 'file')", "security": _BASIC,
                     "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                         "type": "object", "required": ["file"],
                         "properties": {"file": {"type": "string", "format": "binary"}}}}}},
                     "responses": _UPLOADED},
            "put": {"summary": "upload an image as the raw body", "security": _BASIC,
                    "requestBody": _RAW_BODY, "responses": _UPLOADED},
        },
        "/upload/{filename}": {
            "put": {"summary": "upload an image as the raw body, with its name", "security": _BASIC,
                    "parameters": [{"name": "filename", "in": "path", "required": True,
                                    "schema": {"type": "string", "minLength": 1}}],
                    "requestBody": _RAW_BODY, "responses": _UPLOADED},
        },
        "/api/images": {
            "get": {"summary": "images the caller holds (admin: all), newest first",
                    "security": _BASIC,
                    "parameters": [
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}},
                        {"name": "offset", "in": "query",
                         "schema": {"type": "integer", "minimum": 0, "maximum": 2**31, "default": 0}}],
                    "responses": {"200": _json("ImageList", "a page of images"),
                                  **_errors(400, 401, 429, 503)}},
        },
        "/api/images/{md5}": {
            "parameters": [_MD5_PARAM],
            "get": {"summary": "info of one image, no side effects", "security": _BASIC,
                    "responses": {"200": _json("ImageInfo", "the image"), **_errors(400, 401, 404, 429, 503)}},
            "delete": {"summary": "drop the caller's hold (admin: remove the image)",
                       "security": _BASIC,
                       "responses": {"204": {"description": "deleted"}, **_errors(400, 401, 404, 429, 503, 507)}},
        },
        "/api/images/{md5}/renew": {
            "parameters": [_MD5_PARAM],
            "post": {"summary": "dedup without bytes: renew expiry if known", "security": _BASIC,
                     "responses": {"200": _json("ImageInfo", "renewed (status: exists)"),
                                   **_errors(400, 401, 404, 429, 503, 507)}},
        },
        "/api/db": {
            "get": {"summary": "consistent snapshot of the server database (admin)", "security": _PASSWORD_ONLY,
                    "responses": {"200": {"description": "SQLite database file",
                                          "content": {"application/vnd.sqlite3": {
                                              "schema": {"type": "string", "format": "binary"}}}},
                                  **_errors(401, 403, 429, 503, 507)}},
        },
        "/api/tokens": {
            "post": {"summary": "create an app token (password only); the secret is in this answer only",
                     "security": _PASSWORD_ONLY,
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "required": ["name"],
                         "properties": {"name": {"type": "string", "minLength": 1,
                                                 "maxLength": TOKEN_NAME_MAX}}}}}},
                     "responses": {"201": _json("NewToken", "created"),
                                   **_errors(400, 401, 403, 409, 413, 429, 503, 507)}},
            "get": {"summary": "the caller's app tokens, without secrets (password only)",
                    "security": _PASSWORD_ONLY,
                    "responses": {"200": _json("TokenList", "the caller's tokens"),
                                  **_errors(401, 403, 429, 503)}},
        },
        "/api/tokens/{token_id}": {
            "parameters": [_TOKEN_ID_PARAM],
            "delete": {"summary": "revoke one of the caller's tokens, in every process at once (password only)",
                       "security": _PASSWORD_ONLY,
                       "responses": {"204": {"description": "revoked"},
                                     **_errors(401, 403, 404, 429, 503, 507)}},
        },
        "/i/{name}": {
            "parameters": [{"name": "name", "in": "path", "required": True, "description": "{md5}.{ext}",
                            "schema": {"type": "string", "pattern": "^[0-9a-f]{32}\\.[a-z]{3,4}$"}}],
            "get": {"summary": "the image bytes (public)", "security": [],
                    "responses": {
                        "200": {"description": "the image",
                                "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
                        "206": {"description": "a byte range, or several as multipart/byteranges",
                                "content": {"image/*": {"schema": {"type": "string", "format": "binary"}},
                                            "multipart/byteranges": {"schema": {"type": "string",
                                                                                "format": "binary"}}}},
                        "304": {"description": "not modified (If-None-Match, If-Modified-Since)"},
                        **_errors(400, 404, 412, 416)}},
        },
        "/i/{md5}/{variant}": {
            "parameters": [
                _MD5_PARAM,
                {"name": "variant", "in": "path", "required": True,
                 "description": "{size}.{fmt} or {size}: size is a width from server.variant_widths "
                                "(default 160, 320, 640, 1280, 2048) or 'full'; fmt is jpg, png, webp, "
                                "gif or avif (where the server can write it). Without .{fmt} the "
                                "Accept header chooses (AVIF, WebP, else JPEG or PNG) and Vary: Accept "
                                "is sent.",
                 "schema": {"type": "string", "pattern": "^(full|[1-9][0-9]{0,4})(\\.(jpg|png|webp|gif|avif))?$"}}],
            "get": {"summary": "a size and format of the image, rendered once (public)", "security": [],
                    "responses": {
                        "200": {"description": "the variant",
                                "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
                        "206": {"description": "a byte range",
                                "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
                        "304": {"description": "not modified (If-None-Match)"},
                        **_errors(400, 404, 416, 503)}},
        },
        "/healthz": {
            "get": {"summary": "database and data folder answer", "security": [],
                    "responses": {"200": _json("Health", "healthy"), "503": _json("Health", "unhealthy")}},
        },
        "/": {
            "get": {"summary": "the upload page", "security": [],
                    "responses": {"200": {"description": "HTML", "content": {"text/html": {
                        "schema": {"type": "string"}}}}}},
        },
        "/static/{asset}": {
            "get": {"summary": "the upload page's script and style", "security": [],
                    "parameters": [{"name": "asset", "in": "path", "required": True,
                                    "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "app.js or app.css", "content": {
                        "text/javascript": {"schema": {"type": "string"}},
                        "text/css": {"schema": {"type": "string"}}}},
                        **_errors(404)}},
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics (admin, or the metrics token); 404 while metrics.enable "
                               "is false",
                    "security": [{"basic": []}, {"metrics_token": []}],
                    "responses": {"200": {"description": "Prometheus text format 0.0.4", "content": {
                        "text/plain": {"schema": {"type": "string"}}}},
                        **_errors(401, 403, 404, 429)}},
        },
        "/openapi.json": {
            "get": {"summary": "this document", "security": [],
                    "responses": {"200": {"description": "OpenAPI 3 document",
                                          "content": {"application/json": {"schema": {"type": "object"}}}}}},
        },
    },
}


# ==== upload page: begin (generated region, edit the assets) ====
# Made by page/embed.py from page/index.html, page/app.css and page/app.js;
# edit those files and run `python3 page/embed.py`, never this block.
PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>imgproxy</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/app.css">
<script src="/static/app.js" defer></script>
</head>
<body>
<header class="topbar">
  <h1 class="brand">imgproxy</h1>
  <div class="who" id="who" hidden>
    <span>Signed in as <strong id="who-name"></strong></span>
    <a class="btn btn-quiet" id="apps-jump" href="#apps">Connect an app</a>
    <button type="button" class="btn btn-quiet" id="sign-out">Sign out</button>
  </div>
</header>

<main>
  <section id="signin" class="panel signin" aria-labelledby="signin-title">
    <h2 id="signin-title">Sign in</h2>
    <p class="hint">Use the user name and password from the server's config. They are kept only in this browser tab.</p>
    <form id="signin-form" method="post" novalidate>
      <label for="signin-user">User name</label>
      <input id="signin-user" name="username" autocomplete="username" autocapitalize="none" spellcheck="false" required>
      <label for="signin-password">Password</label>
      <input id="signin-password" name="password" type="password" autocomplete="current-password" required>
      <p id="signin-error" class="error" role="alert" hidden></p>
      <button type="submit" class="btn btn-primary" id="signin-submit" disabled>Sign in</button>
    </form>
  </section>

  <div id="app" hidden>
    <section class="panel" aria-labelledby="upload-title">
      <h2 id="upload-title">Upload images</h2>
      <div id="dropzone" class="dropzone">
        <p class="dropzone-lead">Drop images anywhere on this page, paste a screenshot with <kbd>Ctrl</kbd>+<kbd>V</kbd>, or</p>
        <input type="file" id="file-input" class="visually-hidden" accept="image/*" multiple>
        <label for="file-input" class="btn btn-primary">Choose images…</label>
        <p class="hint">JPEG, PNG, GIF, WebP, BMP, TIFF or ICO. The same image is stored once: uploading it again renews its expiry.</p>
      </div>
      <ul id="uploads" class="cards" aria-live="polite"></ul>
    </section>

    <section class="panel" aria-labelledby="mine-title">
      <div class="panel-head">
        <h2 id="mine-title">My images</h2>
        <button type="button" class="btn btn-quiet" id="mine-refresh">Refresh</button>
      </div>
      <p id="mine-status" class="hint" role="status"></p>
      <ul id="mine" class="cards grid"></ul>
      <nav class="pager" id="mine-pager" aria-label="My images pages" hidden>
        <button type="button" class="btn" id="mine-prev">← Newer</button>
        <span id="mine-range"></span>
        <button type="button" class="btn" id="mine-next">Older →</button>
      </nav>
    </section>

    <section class="panel" id="apps" aria-labelledby="apps-title">
      <h2 id="apps-title">Connect an app</h2>
      <p class="hint">Give each app (ShareX, PicGo, Typora, a script) a token of its own instead of your password. A token can upload, look up, list and delete your images, nothing else, and revoking it here stops that app at once.</p>
      <form id="token-form" class="token-form" novalidate>
        <label for="token-name">Name the app</label>
        <div class="token-form-row">
          <input id="token-name" name="name" maxlength="100" autocomplete="off" spellcheck="false" placeholder="e.g. laptop ShareX" required>
          <button type="submit" class="btn btn-primary" id="token-create">Create token</button>
        </div>
        <p id="token-error" class="error" role="alert" hidden></p>
      </form>

      <div id="token-new" class="token-new" tabindex="-1" aria-labelledby="token-new-title" hidden>
        <h3 id="token-new-title">Token for “<span id="token-new-name"></span>”</h3>
        <p class="token-warning">Copy it now: this is the only time it is shown. The server keeps only a fingerprint of it.</p>
        <div class="copy-row">
          <input type="text" id="token-secret" class="url" readonly aria-label="The new token" spellcheck="false">
          <span id="token-copy-slot"></span>
        </div>
        <p class="setup-pick-label" id="setup-pick-label">Set up your app:</p>
        <div class="setup-pick" role="group" aria-labelledby="setup-pick-label" id="setup-pick"></div>
        <div id="setup-panels"></div>
        <div class="actions">
          <button type="button" class="btn" id="token-done">Done: hide the token</button>
        </div>
      </div>

      <h3 class="tokens-title">Your tokens</h3>
      <p id="tokens-status" class="hint" role="status"></p>
      <ul id="tokens" class="tokens"></ul>
    </section>
  </div>
</main>

<div id="drop-overlay" class="drop-overlay" hidden><p>Drop to upload</p></div>
<p id="toast" class="toast" role="status" aria-live="polite"></p>

<dialog id="confirm" class="confirm" aria-labelledby="confirm-title">
  <h2 id="confirm-title">Delete this image?</h2>
  <p id="confirm-text"></p>
  <div class="actions">
    <button type="button" class="btn" id="confirm-cancel">Cancel</button>
    <button type="button" class="btn btn-danger" id="confirm-ok">Delete</button>
  </div>
</dialog>

<dialog id="revoke-confirm" class="confirm" aria-labelledby="revoke-title">
  <h2 id="revoke-title">Revoke this token?</h2>
  <p id="revoke-text"></p>
  <div class="actions">
    <button type="button" class="btn" id="revoke-cancel">Cancel</button>
    <button type="button" class="btn btn-danger" id="revoke-ok">Revoke</button>
  </div>
</dialog>
</body>
</html>
"""
PAGE_CSS = r"""/* imgproxy upload page. System fonts only: nothing is fetched from elsewhere. */
:root {
  --bg: #f5f6f8;
  --panel: #ffffff;
  --text: #1d2330;
  --muted: #5d6677;
  --line: #dde1e8;
  --accent: #2457d6;
  --accent-text: #ffffff;
  --ok: #1c7c44;
  --ok-bg: #e3f4ea;
  --info: #805b00;
  --info-bg: #fdf1d3;
  --bad: #b3261e;
  --bad-bg: #fdeceb;
  --focus: #ff9f1c;
  --radius: 10px;
  color-scheme: light dark;
}

@media (prefers-color-scheme: dark) {
  :root {
    --bg: #14171d;
    --panel: #1d2129;
    --text: #e7eaf0;
    --muted: #9aa3b2;
    --line: #323845;
    --accent: #6d95ff;
    --accent-text: #0b1020;
    --ok: #6fd69b;
    --ok-bg: #173326;
    --info: #f2c45a;
    --info-bg: #3a2f12;
    --bad: #ff8a80;
    --bad-bg: #3d1d1b;
  }
}

*, *::before, *::after { box-sizing: border-box; }

html { -webkit-text-size-adjust: 100%; }

body {
  margin: 0;
  background: var(--bg);
  color: var(--text);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei", sans-serif;
}

[hidden] { display: none !important; }

.visually-hidden {
  position: absolute !important;
  width: 1px; height: 1px;
  margin: -1px; padding: 0; border: 0;
  overflow: hidden;
  clip: rect(0 0 0 0);
  white-space: nowrap;
}

.topbar {
  display: flex;
  align-items: center;
  justify-content: space-between;
  gap: 12px;
  flex-wrap: wrap;
  padding: 12px 20px;
  background: var(--panel);
  border-bottom: 1px solid var(--line);
}
.brand { margin: 0; font-size: 20px; letter-spacing: 0.02em; }
.who { display: flex; align-items: center; gap: 10px; color: var(--muted); font-size: 14px; }
.who strong { color: var(--text); }

main { max-width: 980px; margin: 0 auto; padding: 20px 16px 60px; }

.panel {
  background: var(--panel);
  border: 1px solid var(--line);
  border-radius: var(--radius);
  padding: 18px 20px;
  margin-bottom: 20px;
}
.panel h2 { margin: 0 0 12px; font-size: 18px; }
.panel-head { display: flex; align-items: center; justify-content: space-between; gap: 12px; }
.panel-head h2 { margin-bottom: 0; }

.hint { color: var(--muted); font-size: 13px; margin: 6px 0; }
.error {
  color: var(--bad);
  background: var(--bad-bg);
  border-radius: 6px;
  padding: 8px 10px;
  margin: 10px 0 0;
}

/* sign in */
.signin { max-width: 420px; margin: 40px auto; }
.signin form { display: grid; gap: 6px; }
.signin label { font-weight: 600; font-size: 14px; margin-top: 8px; }
.signin .btn { margin-top: 14px; justify-self: start; }

input[type="text"], input:not([type]), input[type="password"] {
  font: inherit;
  color: inherit;
  background: var(--bg);
  border: 1px solid var(--line);
  border-radius: 6px;
  padding: 8px 10px;
  width: 100%;
  min-width: 0;
}

/* buttons */
.btn {
  display: inline-flex;
  align-items: center;
  justify-content: center;
  gap: 6px;
  font: inherit;
  font-size: 14px;
  font-weight: 600;
  color: var(--text);
  background: var(--panel);
  border: 1px solid var(--line);
  border-radius: 6px;
  padding: 7px 14px;
  min-height: 36px;
  cursor: pointer;
  text-decoration: none;
  white-space: nowrap;
}
.btn:hover { border-color: var(--muted); }
.btn:disabled { opacity: 0.5; cursor: default; }
.btn-primary { background: var(--accent); border-color: var(--accent); color: var(--accent-text); }
.btn-primary:hover { filter: brightness(1.08); border-color: var(--accent); }
.btn-quiet { background: transparent; }
.btn-danger { background: var(--bad); border-color: var(--bad); color: #fff; }
.btn-danger-quiet { color: var(--bad); background: transparent; }
.btn-small { font-size: 13px; padding: 4px 10px; min-height: 30px; }
.copy.done { border-color: var(--ok); color: var(--ok); }

:focus-visible,
.dropzone input:focus-visible + label {
  outline: 3px solid var(--focus);
  outline-offset: 2px;
}

/* drop zone */
.dropzone {
  border: 2px dashed var(--line);
  border-radius: var(--radius);
  padding: 22px 16px;
  text-align: center;
}
.dropzone-lead { margin: 0 0 12px; }
kbd {
  font: 12px/1 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  border: 1px solid var(--line);
  border-bottom-width: 2px;
  border-radius: 4px;
  padding: 2px 5px;
}

.drop-overlay {
  position: fixed;
  inset: 0;
  z-index: 20;
  display: flex;
  align-items: center;
  justify-content: center;
  background: rgba(36, 87, 214, 0.18);
  border: 4px dashed var(--accent);
  pointer-events: none;
}
.drop-overlay p {
  background: var(--panel);
  padding: 14px 24px;
  border-radius: var(--radius);
  font-size: 20px;
  font-weight: 700;
}

/* cards */
.cards { list-style: none; margin: 16px 0 0; padding: 0; display: grid; gap: 12px; }
.card {
  display: grid;
  grid-template-columns: 112px minmax(0, 1fr);
  gap: 14px;
  padding: 12px;
  border: 1px solid var(--line);
  border-radius: var(--radius);
  background: var(--panel);
}
.card.failed { border-color: var(--bad); background: var(--bad-bg); }
.card-body { min-width: 0; display: grid; gap: 6px; align-content: start; }
.card-body p { margin: 0; }
.name { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.meta, .expiry { color: var(--muted); font-size: 13px; }
.status { font-size: 14px; }
.card.failed .status { color: var(--bad); font-weight: 600; }

.thumb {
  width: 112px;
  height: 112px;
  border-radius: 8px;
  background: var(--bg);
  border: 1px solid var(--line);
  display: flex;
  align-items: center;
  justify-content: center;
  overflow: hidden;
}
.thumb img { max-width: 100%; max-height: 100%; object-fit: contain; }
.thumb-label { color: var(--muted); font-size: 12px; padding: 4px; text-align: center; }

/* "My images": a grid of 320 px thumbnails, the links under each */
.cards.grid { grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); }
.grid .card { grid-template-columns: minmax(0, 1fr); gap: 10px; }
.grid .thumb { width: 100%; height: 180px; }
.grid .thumb img { width: 100%; height: 100%; object-fit: cover; }
.grid .no-preview .thumb-label { font-size: 14px; }
.size-pick { font: inherit; font-size: 13px; padding: 3px 4px; border: 1px solid var(--line);
  border-radius: 6px; background: var(--panel); color: inherit; }

progress {
  width: 100%;
  height: 8px;
  appearance: none;
  border: 0;
  border-radius: 4px;
  background: var(--line);
  overflow: hidden;
}
progress::-webkit-progress-bar { background: var(--line); border-radius: 4px; }
progress::-webkit-progress-value { background: var(--accent); border-radius: 4px; }
progress::-moz-progress-bar { background: var(--accent); }

.badge {
  display: inline-block;
  font-size: 12px;
  font-weight: 700;
  padding: 1px 8px;
  border-radius: 999px;
}
.badge-new { color: var(--ok); background: var(--ok-bg); }
.badge-exists { color: var(--info); background: var(--info-bg); }

.url { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.copy-row { display: flex; flex-wrap: wrap; align-items: center; gap: 6px; }
.copy-label { color: var(--muted); font-size: 13px; margin-right: 2px; }
.card-actions { display: flex; justify-content: flex-end; }
a.btn { color: var(--accent); }

.pager { display: flex; align-items: center; justify-content: center; gap: 12px; margin-top: 16px; color: var(--muted); font-size: 14px; }

/* confirm dialog */
.confirm {
  border: 1px solid var(--line);
  border-radius: var(--radius);
  background: var(--panel);
  color: var(--text);
  padding: 20px;
  width: min(440px, calc(100vw - 32px));
}
.confirm::backdrop { background: rgba(0, 0, 0, 0.45); }
.confirm h2 { margin: 0 0 8px; font-size: 18px; }
.confirm p { overflow-wrap: anywhere; color: var(--muted); }
.actions { display: flex; justify-content: flex-end; gap: 10px; margin-top: 16px; }

/* connect an app */
.panel h3 { font-size: 15px; margin: 18px 0 8px; }
.token-form { display: grid; gap: 6px; margin-top: 10px; }
.token-form label { font-weight: 600; font-size: 14px; }
.token-form-row { display: flex; gap: 8px; align-items: center; }
.token-form-row input { flex: 1 1 auto; }
.token-new {
  margin-top: 16px;
  padding: 14px;
  border: 2px solid var(--ok);
  border-radius: var(--radius);
  background: var(--ok-bg);
  display: grid;
  gap: 10px;
  min-width: 0;
}
.token-new:focus { outline: none; }
.token-new h3 { margin: 0; overflow-wrap: anywhere; }
.token-warning { margin: 0; font-weight: 600; }
.token-new .copy-row input { flex: 1 1 260px; }
.setup-pick-label { margin: 6px 0 0; font-weight: 600; font-size: 14px; }
.setup-pick { display: flex; flex-wrap: wrap; gap: 6px; }
.setup-choice[aria-pressed="true"] { background: var(--accent); border-color: var(--accent); color: var(--accent-text); }
.setup-panel { display: grid; gap: 10px; min-width: 0; background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
.setup-steps { margin: 0; padding-left: 20px; }
.setup-code {
  margin: 0;
  padding: 10px;
  background: var(--bg);
  border: 1px solid var(--line);
  border-radius: 6px;
  font: 12px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  white-space: pre-wrap;
  overflow-wrap: anywhere;
  max-height: 260px;
  overflow: auto;
}
.fields { margin: 0; display: grid; gap: 4px; }
.field-row { display: grid; grid-template-columns: 120px minmax(0, 1fr); gap: 8px; }
.field-row dt { font-weight: 600; font-size: 13px; }
.field-row dd { margin: 0; font-size: 13px; overflow-wrap: anywhere; }
.tokens-title { margin-top: 22px; }
.tokens { list-style: none; margin: 8px 0 0; padding: 0; display: grid; gap: 8px; }
.token {
  display: flex;
  align-items: center;
  justify-content: space-between;
  gap: 12px;
  padding: 10px 12px;
  border: 1px solid var(--line);
  border-radius: 8px;
}
.token-text { min-width: 0; }
.token-text p { margin: 0; }

.toast {
  position: fixed;
  left: 50%;
  bottom: 20px;
  transform: translate(-50%, 20px);
  margin: 0;
  padding: 8px 16px;
  border-radius: 999px;
  background: var(--text);
  color: var(--bg);
  font-size: 14px;
  opacity: 0;
  pointer-events: none;
  transition: opacity 0.2s, transform 0.2s;
  z-index: 30;
  max-width: calc(100vw - 32px);
}
.toast.show { opacity: 1; transform: translate(-50%, 0); }

.clipboard-helper { position: fixed; top: 0; left: -9999px; opacity: 0; }

@media (max-width: 560px) {
  main { padding: 12px 10px 48px; }
  .panel { padding: 14px 12px; }
  .topbar { padding: 10px 12px; }
  .card { grid-template-columns: 72px minmax(0, 1fr); gap: 10px; padding: 10px; }
  .thumb { width: 72px; height: 72px; }
  .signin { margin: 16px auto; }
  .token-form-row { flex-wrap: wrap; }
  .token-form-row .btn { width: 100%; }
  .field-row { grid-template-columns: minmax(0, 1fr); gap: 0; }
}

@media (prefers-reduced-motion: reduce) {
  .toast { transition: none; }
}
"""
PAGE_JS = r"""// imgproxy upload page. Served as /static/app.js under a strict CSP
// (script-src 'self'), so: no inline handlers, no eval, no innerHTML with data.
// Every name shown here is user text and goes into the DOM via textContent.
"use strict";

(function () {
  var AUTH_KEY = "imgproxy.auth";   // sessionStorage: lives as long as this tab
  var USER_KEY = "imgproxy.user";
  var PAGE_SIZE = 12;
  var COPY_SIZES = [null, 1280, 640, 320];   // widths offered for copying; null: the original
  var GRID_WIDTH = 320;                      // "My images" shows this size, never the original
  var PARALLEL_UPLOADS = 3;
  var AUTH_MESSAGE = "该用户权限不足，请联系管理员";

  var state = {
    auth: null,          // "Basic ..." header value
    user: "",
    offset: 0,
    total: 0,
    queue: [],
    running: 0,
    pendingDelete: null
  };

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (key) {
        var value = attrs[key];
        if (value === null || value === undefined || value === false) return;
        if (key === "text") node.textContent = value;
        else if (key === "className") node.className = value;
        else node.setAttribute(key, value === true ? "" : String(value));
      });
    }
    (children || []).forEach(function (child) {
      if (child !== null && child !== undefined) node.appendChild(child);
    });
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  // ---- auth ---------------------------------------------------------------

  // btoa() only takes Latin-1; Basic credentials are sent as UTF-8 bytes.
  function basicAuth(user, password) {
    var bytes = new TextEncoder().encode(user + ":" + password);
    var binary = "";
    for (var i = 0; i < bytes.length; i++) binary += String.fromCharCode(bytes[i]);
    return "Basic " + btoa(binary);
  }

  // X-Requested-With tells the server to leave out WWW-Authenticate on a 401,
  // so a wrong password shows our message instead of the browser's own prompt.
  function apiHeaders() {
    var headers = { "X-Requested-With": "imgproxy-page", "Accept": "application/json" };
    if (state.auth) headers["Authorization"] = state.auth;
    return headers;
  }

  function api(method, path) {
    return fetch(path, {
      method: method,
      headers: apiHeaders(),
      credentials: "omit",
      cache: "no-store"
    }).then(function (response) {
      if (response.status === 204) return { status: 204, body: null };
      return response.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
        return { status: response.status, body: body };
      });
    });
  }

  function showSignedIn() {
    $("signin").hidden = true;
    $("app").hidden = false;
    $("who").hidden = false;
    $("who-name").textContent = state.user;
    loadTokens();
  }

  function showSignIn(message) {
    $("app").hidden = true;
    $("who").hidden = true;
    $("signin").hidden = false;
    var error = $("signin-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("signin-submit").disabled = false;
  }

  function signOut(message) {
    state.auth = null;
    state.user = "";
    sessionStorage.removeItem(AUTH_KEY);
    sessionStorage.removeItem(USER_KEY);
    state.queue = [];   // files not yet sent stay unsent
    clear($("uploads"));
    clear($("mine"));
    $("mine-status").textContent = "";
    $("mine-pager").hidden = true;
    clearApps();
    $("signin-password").value = "";
    showSignIn(message);
    $(message ? "signin-password" : "signin-user").focus();
  }

  function onSignIn(event) {
    event.preventDefault();
    var user = $("signin-user").value.trim();
    var password = $("signin-password").value;
    if (!user || !password) {
      showSignIn("Enter a user name and a password.");
      return;
    }
    var submit = $("signin-submit");
    submit.disabled = true;
    state.auth = basicAuth(user, password);
    state.user = user;
    // The list endpoint is the cheapest call that proves the credentials.
    api("GET", "/api/images?limit=" + PAGE_SIZE + "&offset=0").then(function (result) {
      submit.disabled = false;
      if (result.status === 200) {
        sessionStorage.setItem(AUTH_KEY, state.auth);
        sessionStorage.setItem(USER_KEY, user);
        $("signin-password").value = "";
        $("signin-error").hidden = true;
        showSignedIn();
        state.offset = 0;
        renderMine(result.body);
        $("file-input").focus();
      } else {
        state.auth = null;
        showSignIn(errorText(result.status, result.body));
        $("signin-password").select();
      }
    }, function () {
      state.auth = null;
      showSignIn("The server did not answer. Check the connection and try again.");
    });
  }

  // ---- formatting ---------------------------------------------------------

  function formatBytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return "";
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
    return (n / 1024 / 1024).toFixed(1) + " MB";
  }

  function formatDate(iso) {
    var date = new Date(iso);
    if (isNaN(date.getTime())) return String(iso || "");
    return date.toLocaleString(undefined, {
      year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit"
    });
  }

  function untilText(iso) {
    var ms = new Date(iso).getTime() - Date.now();
    if (isNaN(ms)) return "";
    if (ms <= 0) return "expired";
    var hours = ms / 3600000;
    if (hours < 1) return "in " + Math.max(1, Math.round(ms / 60000)) + " min";
    if (hours < 48) return "in " + Math.round(hours) + " h";
    return "in " + Math.round(hours / 24) + " days";
  }

  // URLs come from the server (built from base_url), but a link is still only
  // ever http(s).
  function safeUrl(url) {
    return /^https?:\/\//i.test(String(url)) ? String(url) : null;
  }

  function escapeHtml(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;")
      .replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }

  function markdownAlt(text) {
    return String(text).replace(/([\\\[\]])/g, "\\$1").replace(/[\r\n]+/g, " ");
  }

  function snippets(info) {
    var name = info.name || info.md5 || "image";
    return [
      { key: "url", label: "URL", text: info.url },
      { key: "markdown", label: "Markdown", text: "![" + markdownAlt(name) + "](" + info.url + ")" },
      { key: "html", label: "HTML", text: '<img src="' + escapeHtml(info.url) + '" alt="' + escapeHtml(name) + '">' },
      { key: "bbcode", label: "BBCode", text: "[img]" + info.url + "[/img]" }
    ];
  }

  // Words for a failed call, next to the file that caused it. The server's own
  // message comes along when it has one.
  function errorText(status, body) {
    var detail = body && typeof body.error === "string" ? body.error.trim() : "";
    var code = body && typeof body.code === "string" ? body.code : "";
    function says(lead, fallback) {
      return lead + ": " + (detail || fallback) + (/[.!?。]$/.test(detail || fallback) ? "" : ".");
    }
    switch (status) {
      case 401:
      case 403:
        return detail || AUTH_MESSAGE;
      case 413:
        if (code === "too_many_pixels") return says("Too many pixels", "the image is larger than the server allows");
        return says("Too large", "the file is bigger than the server accepts");
      case 415:
        return says("Not a supported image", "the server accepts JPEG, PNG, GIF, WebP, BMP, TIFF and ICO");
      case 400:
        return says("The server refused the upload", "bad request");
      case 429:
        return says("Too many failed sign-ins", "wait a minute and try again");
      case 404:
        return says("Not found", "it may have expired");
      case 0:
        return "Upload failed: the connection closed. The file may be larger than the server allows, or the server is unreachable.";
      default:
        if (status >= 500) return says("Server error " + status, "try again later");
        return says("Request failed (" + status + ")", "unexpected answer");
    }
  }

  // ---- copy ---------------------------------------------------------------

  var toastTimer = null;
  function toast(message) {
    var node = $("toast");
    node.textContent = message;
    node.classList.add("show");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { node.classList.remove("show"); }, 2200);
  }

  // navigator.clipboard exists only in secure contexts (https or localhost);
  // on plain http the hidden-textarea fallback still copies.
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).catch(function () { return legacyCopy(text); });
    }
    return legacyCopy(text);
  }

  function legacyCopy(text) {
    return new Promise(function (resolve, reject) {
      var area = el("textarea", { readonly: true, className: "clipboard-helper", "aria-hidden": "true" });
      area.value = text;
      document.body.appendChild(area);
      var focused = document.activeElement;
      area.select();
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      document.body.removeChild(area);
      if (focused && focused.focus) focused.focus();
      if (ok) resolve(); else reject(new Error("copy failed"));
    });
  }

  function copyButton(snippet) {
    var button = el("button", {
      type: "button",
      className: "btn btn-small copy",
      "data-copy": snippet.key,
      "aria-label": "Copy " + snippet.label,
      text: snippet.label
    });
    button.addEventListener("click", function () {
      copyText(snippet.text).then(function () {
        button.setAttribute("data-copied", snippet.text);
        button.classList.add("done");
        setTimeout(function () { button.classList.remove("done"); }, 1500);
        toast("Copied " + snippet.label);
      }, function () {
        toast("Could not copy: select the text and copy it by hand.");
      });
    });
    return button;
  }

  // A size of an image: /i/{md5}/{width}, the format chosen by the browser's
  // Accept header (AVIF or WebP where it can show them). Null: the original.
  function variantUrl(url, width) {
    var match = /^(.*\/)([0-9a-f]{32})\.[a-z0-9]+$/.exec(String(url));
    return width && match ? match[1] + match[2] + "/" + width : url;
  }

  // The snippets for one size; HTML offers the double width to sharp screens.
  function sizedSnippets(info, width) {
    var url = variantUrl(info.url, width);
    var parts = snippets({ name: info.name, md5: info.md5, url: url });
    if (width && COPY_SIZES.indexOf(width * 2) >= 0) {
      var sharp = variantUrl(info.url, width * 2);
      parts.forEach(function (part) {
        if (part.key !== "html") return;
        part.text = '<img src="' + escapeHtml(url) + '" srcset="' + escapeHtml(url) + " 1x, " +
          escapeHtml(sharp) + ' 2x" alt="' + escapeHtml(info.name || info.md5 || "image") + '">';
      });
    }
    return parts;
  }

  // "My images": the link block with a size picker in front of the copy buttons.
  function sizedLinkBlock(info) {
    var parts = sizedSnippets(info, null);
    var nodes = linkBlock(info, parts);
    var row = nodes[1];
    var open = row.querySelector("a.open");
    var pick = el("select", { className: "size-pick", "aria-label": "Size to copy" },
      COPY_SIZES.map(function (width) {
        return el("option", { value: width || "", text: width ? width + " px" : "Original" });
      }));
    pick.addEventListener("change", function () {
      var width = parseInt(pick.value, 10) || null;
      var fresh = sizedSnippets(info, width);
      parts.forEach(function (part, i) { part.text = fresh[i].text; });
      nodes[0].value = variantUrl(info.url, width);
      open.setAttribute("href", safeUrl(nodes[0].value) || "");
    });
    row.insertBefore(pick, row.children[1]);
    return nodes;
  }

  // The link block every image card shows: URL, copy buttons, expiry.
  function linkBlock(info, parts) {
    parts = parts || snippets(info);
    var url = el("input", {
      type: "text", className: "url", readonly: true, value: info.url,
      "aria-label": "Image URL", spellcheck: "false"
    });
    url.addEventListener("focus", function () { url.select(); });
    var open = el("a", {
      className: "btn btn-small open", href: safeUrl(info.url), target: "_blank",
      rel: "noopener noreferrer", text: "Open ↗"
    });
    var buttons = el("div", { className: "copy-row", role: "group", "aria-label": "Link" },
      [el("span", { className: "copy-label", text: "Copy" })].concat(parts.map(copyButton), [open]));
    return [url, buttons];
  }

  function metaLine(info) {
    var bits = [];
    if (info.format) bits.push(info.format);
    if (info.width && info.height) bits.push(info.width + "×" + info.height);
    if (typeof info.size === "number") bits.push(formatBytes(info.size));
    return bits.join(" · ");
  }

  function viewsText(count) {
    if (typeof count !== "number") return "";
    return " · " + count + (count === 1 ? " view" : " views");
  }

  function expiryLine(info) {
    if (!info.expire_at) return null;
    return el("p", { className: "expiry" }, [
      document.createTextNode("Expires "),
      el("time", { datetime: info.expire_at, text: formatDate(info.expire_at) }),
      document.createTextNode(" (" + untilText(info.expire_at) + ")")
    ]);
  }

  // A preview that degrades to a label when the browser cannot show the
  // format (TIFF) or CSP blocks a base_url on another origin.
  function preview(src, alt, label) {
    var box = el("div", { className: "thumb" });
    var img = el("img", { alt: alt, decoding: "async" });
    img.addEventListener("error", function () {
      box.classList.add("no-preview");
      img.hidden = true;
      if (!box.querySelector(".thumb-label")) {
        box.appendChild(el("span", { className: "thumb-label", text: label || "no preview" }));
      }
    });
    img.addEventListener("load", function () {
      box.classList.remove("no-preview");
      img.hidden = false;
      var old = box.querySelector(".thumb-label");
      if (old) box.removeChild(old);
    });
    if (src) img.src = src;
    box.appendChild(img);
    return { box: box, img: img };
  }

  // ---- uploads ------------------------------------------------------------

  function addFiles(files) {
    if (!state.auth) {
      showSignIn("Sign in first, then add your images.");
      return;
    }
    var list = Array.prototype.slice.call(files || []);
    if (!list.length) return;
    list.forEach(function (file) {
      var item = uploadCard(file);
      $("uploads").insertBefore(item.card, $("uploads").firstChild);
      state.queue.push(item);
    });
    toast(list.length === 1 ? "Uploading 1 file" : "Uploading " + list.length + " files");
    pump();
  }

  function uploadCard(file) {
    var name = file.name || "image";
    var local = URL.createObjectURL(file);
    var thumb = preview(local, name, "no preview");
    var progress = el("progress", { max: 100, value: 0, "aria-label": "Upload progress of " + name });
    var status = el("p", { className: "status", text: "Waiting…" });
    var body = el("div", { className: "card-body" }, [
      el("p", { className: "name", text: name, title: name }),
      el("p", { className: "meta", text: formatBytes(file.size) }),
      progress,
      status
    ]);
    var card = el("li", { className: "card upload pending", "data-name": name }, [thumb.box, body]);
    return { file: file, name: name, local: local, thumb: thumb, card: card, body: body, progress: progress, status: status };
  }

  function pump() {
    while (state.running < PARALLEL_UPLOADS && state.queue.length) {
      state.running++;
      send(state.queue.shift());
    }
  }

  function send(item) {
    var form = new FormData();
    form.append("file", item.file, item.name);
    var xhr = new XMLHttpRequest();
    xhr.open("POST", "/upload");
    var headers = apiHeaders();
    Object.keys(headers).forEach(function (key) { xhr.setRequestHeader(key, headers[key]); });
    item.status.textContent = "Uploading…";
    xhr.upload.addEventListener("progress", function (event) {
      if (event.lengthComputable) {
        var pct = Math.round(event.loaded / event.total * 100);
        item.progress.value = pct;
        item.status.textContent = pct < 100 ? "Uploading… " + pct + "%" : "Checking the image…";
      }
    });
    xhr.addEventListener("load", function () {
      var body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
      finish(item, xhr.status, body);
    });
    xhr.addEventListener("error", function () { finish(item, 0, null); });
    xhr.addEventListener("abort", function () { finish(item, 0, null); });
    xhr.send(form);
  }

  function finish(item, status, body) {
    state.running--;
    item.progress.value = 100;
    item.card.classList.remove("pending");
    if ((status === 200 || status === 201) && body && body.url) {
      showResult(item, status, body);
      refreshMineSoon();
    } else {
      item.card.classList.add("failed");
      item.progress.hidden = true;
      item.status.textContent = errorText(status, body);
      item.status.setAttribute("role", "alert");
      if (status === 401) {
        item.status.textContent = errorText(status, body) + " Sign out and sign in again.";
      }
    }
    pump();
  }

  function showResult(item, status, info) {
    var existed = status === 200 || info.status === "exists";
    item.card.classList.add(existed ? "exists" : "uploaded");
    item.card.setAttribute("data-md5", info.md5 || "");
    item.progress.hidden = true;
    item.status.textContent = "";
    item.status.appendChild(el("span", {
      className: "badge " + (existed ? "badge-exists" : "badge-new"),
      text: existed ? "Already there" : "Uploaded"
    }));
    item.status.appendChild(document.createTextNode(existed
      ? " This image was already stored; its expiry was renewed."
      : " New image stored."));
    item.body.querySelector(".meta").textContent = metaLine(info);
    linkBlock(info).forEach(function (node) { item.body.appendChild(node); });
    var expiry = expiryLine(info);
    if (expiry) item.body.appendChild(expiry);
    // Show the image as served at its public URL, so what you see is what the
    // link gives; the local copy covered the wait.
    var img = item.thumb.img;
    var revoke = function () { URL.revokeObjectURL(item.local); };
    img.addEventListener("load", revoke, { once: true });
    img.addEventListener("error", revoke, { once: true });
    img.classList.add("served");
    img.src = info.url;
  }

  // ---- drag, drop, paste --------------------------------------------------

  function hasFiles(event) {
    var types = event.dataTransfer && event.dataTransfer.types;
    return !!types && Array.prototype.indexOf.call(types, "Files") !== -1;
  }

  var dragDepth = 0;
  function onDragEnter(event) {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth++;
    if (state.auth) $("drop-overlay").hidden = false;
  }
  function onDragOver(event) {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = state.auth ? "copy" : "none";
  }
  function onDragLeave(event) {
    if (!hasFiles(event)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) $("drop-overlay").hidden = true;
  }
  function onDrop(event) {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    $("drop-overlay").hidden = true;
    addFiles(event.dataTransfer.files);
  }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function onPaste(event) {
    var data = event.clipboardData;
    if (!data || !state.auth) return;
    var files = [];
    Array.prototype.forEach.call(data.items || [], function (entry) {
      if (entry.kind === "file") {
        var file = entry.getAsFile();
        if (file) files.push(file);
      }
    });
    if (!files.length) return;   // ordinary text paste into a field
    event.preventDefault();
    // Screenshots arrive as "image.png"; give them a name worth keeping.
    var now = new Date();
    var stamp = now.getFullYear() + pad(now.getMonth() + 1) + pad(now.getDate()) + "-" +
      pad(now.getHours()) + pad(now.getMinutes()) + pad(now.getSeconds());
    files = files.map(function (file, i) {
      if (file.name && file.name !== "image.png") return file;
      var ext = (file.type.split("/")[1] || "png").replace(/[^a-z0-9]/gi, "");
      var name = "pasted-" + stamp + (files.length > 1 ? "-" + (i + 1) : "") + "." + ext;
      return new File([file], name, { type: file.type });
    });
    addFiles(files);
  }

  // ---- my images ----------------------------------------------------------

  var refreshTimer = null;
  function refreshMineSoon() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(function () {
      state.offset = 0;
      loadMine();
    }, 300);
  }

  function loadMine() {
    if (!state.auth) return Promise.resolve();
    $("mine-status").textContent = "Loading…";
    return api("GET", "/api/images?limit=" + PAGE_SIZE + "&offset=" + state.offset).then(function (result) {
      if (result.status === 200 && result.body) {
        renderMine(result.body);
      } else if (result.status === 401) {
        signOut(errorText(401, result.body));
      } else {
        $("mine-status").textContent = errorText(result.status, result.body);
      }
    }, function () {
      $("mine-status").textContent = "The server did not answer. Try Refresh.";
    });
  }

  function renderMine(body) {
    var images = (body && Array.isArray(body.images)) ? body.images : [];
    var total = body && typeof body.total === "number" ? body.total : images.length;
    state.total = total;
    if (!images.length && state.offset > 0 && total > 0) {
      state.offset = Math.max(0, Math.floor((total - 1) / PAGE_SIZE) * PAGE_SIZE);
      loadMine();
      return;
    }
    var list = $("mine");
    clear(list);
    images.forEach(function (info) { list.appendChild(mineCard(info)); });
    $("mine-status").textContent = total ? "" : "No images yet. Upload one above.";
    var pager = $("mine-pager");
    pager.hidden = total <= PAGE_SIZE;
    $("mine-range").textContent = images.length
      ? (state.offset + 1) + "–" + (state.offset + images.length) + " of " + total
      : "";
    $("mine-prev").disabled = state.offset <= 0;
    $("mine-next").disabled = state.offset + images.length >= total;
  }

  function mineCard(info) {
    var name = info.name || info.md5;
    var thumb = preview(variantUrl(info.url, GRID_WIDTH), name, info.format || "no preview");
    thumb.img.setAttribute("loading", "lazy");
    var del = el("button", {
      type: "button", className: "btn btn-small btn-danger-quiet delete",
      "aria-label": "Delete " + name, text: "Delete"
    });
    del.addEventListener("click", function () { askDelete(info, del); });
    var body = el("div", { className: "card-body" }, [
      el("p", { className: "name", text: name, title: name }),
      el("p", { className: "meta", text: metaLine(info) + viewsText(info.access_count) })
    ].concat(sizedLinkBlock(info), [expiryLine(info), el("div", { className: "card-actions" }, [del])]));
    return el("li", { className: "card", "data-md5": info.md5 || "" }, [thumb.box, body]);
  }

  function askDelete(info, button) {
    state.pendingDelete = { info: info, button: button };
    $("confirm-text").textContent = "“" + (info.name || info.md5) + "” will be deleted, and its link " +
      info.url + " stops working unless someone else uploaded the same image. This cannot be undone.";
    var dialog = $("confirm");
    if (typeof dialog.showModal === "function") {
      dialog.showModal();
    } else {
      dialog.setAttribute("open", "");
    }
    $("confirm-cancel").focus();
  }

  function closeConfirm() {
    var dialog = $("confirm");
    if (dialog.open) {
      if (typeof dialog.close === "function") dialog.close(); else dialog.removeAttribute("open");
    }
  }

  function onConfirmCancel() {
    var pending = state.pendingDelete;
    state.pendingDelete = null;
    closeConfirm();
    if (pending && pending.button.isConnected) pending.button.focus();
  }

  function onConfirmOk() {
    var pending = state.pendingDelete;
    state.pendingDelete = null;
    closeConfirm();
    if (!pending) return;
    var md5 = String(pending.info.md5 || "");
    if (!/^[0-9a-f]{32}$/.test(md5)) return;
    pending.button.disabled = true;
    api("DELETE", "/api/images/" + md5).then(function (result) {
      if (result.status === 204 || result.status === 200 || result.status === 404) {
        toast("Deleted " + (pending.info.name || md5));
        loadMine().then(function () {
          var next = $("mine").querySelector("button.delete") || $("mine-refresh");
          next.focus();
        });
      } else {
        pending.button.disabled = false;
        toast(errorText(result.status, result.body));
      }
    }, function () {
      pending.button.disabled = false;
      toast("The server did not answer. Try again.");
    });
  }

  // ---- connect an app -----------------------------------------------------
  // Per-app tokens (POST/GET/DELETE /api/tokens, managed with the password the
  // tab signed in with) and ready-made set-ups for the token just made. The
  // secret lives only in this block's DOM until "Done", sign-out or reload:
  // never in storage, never in a URL (downloads are Blobs).

  var SHAREX_VERSION = "17.0.0";   // above 13.7.1, so ShareX reads the {json:...} syntax as written
  var appState = { tokens: [], shownId: null, pendingRevoke: null };

  function apiJson(method, path, payload) {
    var headers = apiHeaders();
    headers["Content-Type"] = "application/json";
    return fetch(path, {
      method: method,
      headers: headers,
      body: JSON.stringify(payload),
      credentials: "omit",
      cache: "no-store"
    }).then(function (response) {
      return response.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
        return { status: response.status, body: body };
      });
    });
  }

  // ShareX reads {...} as functions, "|" as an argument separator and "\" as
  // an escape in every string of a custom uploader, so literal text escapes them.
  function sharexLiteral(text) {
    return String(text).replace(/[\\{}|]/g, "\\$&");
  }

  function shellQuote(text) {
    return "'" + String(text).replace(/'/g, "'\\''") + "'";
  }

  // Everything an app needs, built from the server this page came from (the
  // address the browser reaches, which is the one the apps on this machine reach).
  function appSetups(base, token, appName) {
    var uploadUrl = base + "/upload";
    var host = base.replace(/^https?:\/\//i, "");
    var sharex = {
      Version: SHAREX_VERSION,
      Name: "imgproxy " + host,   // shown in ShareX's list, not parsed
      DestinationType: "ImageUploader",
      RequestMethod: "POST",
      RequestURL: sharexLiteral(uploadUrl),
      Headers: { Authorization: sharexLiteral("Bearer " + token) },
      Body: "MultipartFormData",
      FileFormName: "file",
      URL: "{json:url}",
      ErrorMessage: "{json:error}"
    };
    var picgo = {
      url: uploadUrl,
      paramName: "file",
      jsonPath: "url",
      customHeader: JSON.stringify({ Authorization: "Bearer " + token }),
      customBody: ""
    };
    var slug = String(appName).toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 40);
    return {
      sharexFileName: "imgproxy" + (slug ? "-" + slug : "") + ".sxcu",
      sharex: JSON.stringify(sharex, null, 2) + "\n",
      picgo: JSON.stringify(picgo, null, 2),
      picgoFields: picgo,
      client: "IMGPROXY_URL=" + shellQuote(base) + " IMGPROXY_TOKEN=" + shellQuote(token) +
        " python3 /path/to/client.py",
      curl: "curl -H " + shellQuote("Authorization: Bearer " + token) +
        " -H 'Accept: text/plain' -F 'file=@screenshot.png' " + shellQuote(uploadUrl)
    };
  }

  function downloadText(filename, text, type) {
    var href = URL.createObjectURL(new Blob([text], { type: type }));
    var link = el("a", { href: href, download: filename, className: "visually-hidden" });
    document.body.appendChild(link);
    link.click();
    document.body.removeChild(link);
    setTimeout(function () { URL.revokeObjectURL(href); }, 30000);
  }

  function labelledCopy(key, label, text) {
    var button = copyButton({ key: key, label: label, text: text });
    button.textContent = "Copy " + label;
    return button;
  }

  function steps(lines) {
    return el("ol", { className: "setup-steps" }, lines.map(function (line) {
      return el("li", { text: line });
    }));
  }

  function codeBlock(text, label) {
    return el("pre", { className: "setup-code", tabindex: "0", "aria-label": label }, [
      el("code", { text: text })
    ]);
  }

  function setupPanels(setups) {
    var download = el("button", {
      type: "button", className: "btn btn-primary btn-small", "data-setup": "sharex-download",
      text: "Download " + setups.sharexFileName
    });
    download.addEventListener("click", function () {
      downloadText(setups.sharexFileName, setups.sharex, "application/json");
      toast("Saved " + setups.sharexFileName);
    });
    var picgoRows = Object.keys(setups.picgoFields).map(function (key) {
      var value = setups.picgoFields[key];
      return el("div", { className: "field-row" }, [
        el("dt", { text: key }),
        el("dd", null, [el("code", { text: value === "" ? "(leave empty)" : value })])
      ]);
    });
    return [
      { key: "sharex", label: "ShareX", body: [
        steps([
          "Download the file below and open it: ShareX asks to add “imgproxy” as a custom uploader.",
          "In ShareX choose Destinations → Image uploader → Custom image uploader.",
          "Take a screenshot: the link is copied when the upload finishes."
        ]),
        el("div", { className: "copy-row" }, [download, labelledCopy("sharex", "ShareX file", setups.sharex)]),
        codeBlock(setups.sharex, "ShareX custom uploader")
      ] },
      { key: "picgo", label: "PicGo", body: [
        steps([
          "In PicGo, open Plugins, search for web-uploader and install it.",
          "Open the picture bed settings for 自定义Web图床 (custom web uploader) and fill in the fields below, or copy them as JSON into picBed.web-uploader of PicGo's config file.",
          "Typora, Obsidian and VS Code can then upload through PicGo."
        ]),
        el("dl", { className: "fields" }, picgoRows),
        el("div", { className: "copy-row" }, [labelledCopy("picgo", "PicGo settings", setups.picgo)]),
        codeBlock(setups.picgo, "PicGo web-uploader settings")
      ] },
      { key: "client", label: "Typora & scripts", body: [
        steps([
          "Save client.py from this project next to your notes or scripts, and put its path in place of /path/to/client.py.",
          "Typora: Preferences → Image → Image Uploader → Custom Command, paste the line, then Test Uploader.",
          "Scripts and Obsidian's shell commands: the same line followed by image files prints one URL per line."
        ]),
        codeBlock(setups.client, "client.py command line"),
        el("div", { className: "copy-row" }, [labelledCopy("client", "command", setups.client)])
      ] },
      { key: "curl", label: "curl", body: [
        steps(["Replace screenshot.png with your file; the answer is the image's URL."]),
        codeBlock(setups.curl, "curl command"),
        el("div", { className: "copy-row" }, [labelledCopy("curl", "curl command", setups.curl)])
      ] }
    ];
  }

  function showSetups(setups) {
    var pick = $("setup-pick");
    var holder = $("setup-panels");
    clear(pick);
    clear(holder);
    var buttons = [];
    var panels = setupPanels(setups).map(function (setup) {
      var panel = el("div", {
        className: "setup-panel", id: "setup-" + setup.key, "data-setup-panel": setup.key,
        role: "region", "aria-label": setup.label + " set-up"
      }, setup.body);
      var button = el("button", {
        type: "button", className: "btn btn-small setup-choice", "data-setup-choice": setup.key,
        "aria-controls": panel.id, "aria-pressed": "false", text: setup.label
      });
      button.addEventListener("click", function () { choose(setup.key); });
      buttons.push(button);
      pick.appendChild(button);
      holder.appendChild(panel);
      return panel;
    });
    function choose(key) {
      buttons.forEach(function (b) {
        b.setAttribute("aria-pressed", b.getAttribute("data-setup-choice") === key ? "true" : "false");
      });
      panels.forEach(function (p) { p.hidden = p.getAttribute("data-setup-panel") !== key; });
    }
    choose("sharex");
  }

  function showNewToken(created) {
    var token = String(created.token || "");
    appState.shownId = String(created.id);
    $("token-new-name").textContent = created.name || "";
    $("token-secret").value = token;
    var slot = $("token-copy-slot");
    clear(slot);
    slot.appendChild(labelledCopy("token", "token", token));
    showSetups(appSetups(window.location.origin, token, created.name || ""));
    $("token-new").hidden = false;
    slot.querySelector("button").focus();
  }

  // Forget the secret: the block is emptied, not just hidden.
  function hideNewToken() {
    appState.shownId = null;
    $("token-new").hidden = true;
    $("token-secret").value = "";
    $("token-new-name").textContent = "";
    clear($("token-copy-slot"));
    clear($("setup-pick"));
    clear($("setup-panels"));
  }

  function tokenErrorText(status, body) {
    var detail = body && typeof body.error === "string" ? body.error.trim() : "";
    if (status === 400) return "The server refused the name: " + (detail || "use 1 to 100 characters") + ".";
    if (status === 401 || status === 403) return detail || AUTH_MESSAGE;
    if (status === 409 && detail) return detail;   // too many tokens: the server says how many
    return errorText(status, body);
  }

  function onCreateToken(event) {
    event.preventDefault();
    var input = $("token-name");
    var name = input.value.trim();
    var error = $("token-error");
    if (!name || name.length > 100) {
      error.textContent = "Give the app a name of 1 to 100 characters, such as “laptop ShareX”.";
      error.hidden = false;
      input.focus();
      return;
    }
    error.hidden = true;
    var submit = $("token-create");
    submit.disabled = true;
    apiJson("POST", "/api/tokens", { name: name }).then(function (result) {
      submit.disabled = false;
      if (result.status === 201 && result.body && result.body.token) {
        input.value = "";
        showNewToken(result.body);
        loadTokens();
      } else if (result.status === 401) {
        signOut(errorText(401, result.body));
      } else {
        error.textContent = tokenErrorText(result.status, result.body);
        error.hidden = false;
      }
    }, function () {
      submit.disabled = false;
      error.textContent = "The server did not answer. Try again.";
      error.hidden = false;
    });
  }

  function loadTokens() {
    if (!state.auth) return Promise.resolve();
    $("tokens-status").textContent = "Loading…";
    return api("GET", "/api/tokens").then(function (result) {
      if (result.status === 200 && result.body && Array.isArray(result.body.tokens)) {
        renderTokens(result.body.tokens);
      } else if (result.status === 401) {
        signOut(errorText(401, result.body));
      } else {
        $("tokens-status").textContent = tokenErrorText(result.status, result.body);
      }
    }, function () {
      $("tokens-status").textContent = "The server did not answer.";
    });
  }

  function renderTokens(tokens) {
    appState.tokens = tokens;
    var list = $("tokens");
    clear(list);
    tokens.forEach(function (token) { list.appendChild(tokenRow(token)); });
    $("tokens-status").textContent = tokens.length ? "" : "No tokens yet: apps you connect appear here.";
  }

  function tokenRow(token) {
    var name = String(token.name || "");
    var used = token.last_used_at
      ? [document.createTextNode(" · last used "), el("time", { datetime: token.last_used_at, text: formatDate(token.last_used_at) })]
      : [document.createTextNode(" · never used")];
    var revoke = el("button", {
      type: "button", className: "btn btn-small btn-danger-quiet revoke",
      "aria-label": "Revoke " + name, text: "Revoke"
    });
    revoke.addEventListener("click", function () { askRevoke(token, revoke); });
    return el("li", { className: "token", "data-token-id": String(token.id) }, [
      el("div", { className: "token-text" }, [
        el("p", { className: "name", text: name, title: name }),
        el("p", { className: "meta" }, [
          document.createTextNode("created "),
          el("time", { datetime: token.created_at, text: formatDate(token.created_at) })
        ].concat(used))
      ]),
      revoke
    ]);
  }

  function askRevoke(token, button) {
    appState.pendingRevoke = { token: token, button: button };
    $("revoke-text").textContent = "“" + token.name + "” stops working at once: the app that holds it can no longer " +
      "upload or see your images. Images it uploaded stay. This cannot be undone.";
    var dialog = $("revoke-confirm");
    if (typeof dialog.showModal === "function") dialog.showModal(); else dialog.setAttribute("open", "");
    $("revoke-cancel").focus();
  }

  function closeRevoke() {
    var dialog = $("revoke-confirm");
    if (dialog.open) {
      if (typeof dialog.close === "function") dialog.close(); else dialog.removeAttribute("open");
    }
  }

  function onRevokeCancel() {
    var pending = appState.pendingRevoke;
    appState.pendingRevoke = null;
    closeRevoke();
    if (pending && pending.button.isConnected) pending.button.focus();
  }

  function onRevokeOk() {
    var pending = appState.pendingRevoke;
    appState.pendingRevoke = null;
    closeRevoke();
    if (!pending) return;
    var id = String(pending.token.id);
    pending.button.disabled = true;
    api("DELETE", "/api/tokens/" + encodeURIComponent(id)).then(function (result) {
      if (result.status === 204 || result.status === 404) {
        toast("Revoked " + pending.token.name);
        if (appState.shownId === id) hideNewToken();
        loadTokens().then(function () {
          var next = $("tokens").querySelector("button.revoke") || $("token-name");
          next.focus();
        });
      } else if (result.status === 401) {
        signOut(errorText(401, result.body));
      } else {
        pending.button.disabled = false;
        toast(tokenErrorText(result.status, result.body));
      }
    }, function () {
      pending.button.disabled = false;
      toast("The server did not answer. Try again.");
    });
  }

  function clearApps() {
    hideNewToken();
    appState.tokens = [];
    clear($("tokens"));
    $("tokens-status").textContent = "";
    $("token-name").value = "";
    $("token-error").hidden = true;
  }

  function startApps() {
    $("token-form").addEventListener("submit", onCreateToken);
    $("token-done").addEventListener("click", function () {
      hideNewToken();
      $("token-name").focus();
    });
    $("apps-jump").addEventListener("click", function (event) {
      event.preventDefault();
      $("apps").scrollIntoView({ block: "start" });
      $("token-name").focus();
    });
    $("revoke-ok").addEventListener("click", onRevokeOk);
    $("revoke-cancel").addEventListener("click", onRevokeCancel);
    $("revoke-confirm").addEventListener("cancel", function (event) {
      event.preventDefault();
      onRevokeCancel();
    });
  }

  // ---- start --------------------------------------------------------------

  function start() {
    $("signin-form").addEventListener("submit", onSignIn);
    $("sign-out").addEventListener("click", function () { signOut(""); });
    $("file-input").addEventListener("change", function (event) {
      addFiles(event.target.files);
      event.target.value = "";
    });
    $("mine-refresh").addEventListener("click", function () { loadMine(); });
    $("mine-prev").addEventListener("click", function () {
      state.offset = Math.max(0, state.offset - PAGE_SIZE);
      loadMine();
    });
    $("mine-next").addEventListener("click", function () {
      if (state.offset + PAGE_SIZE < state.total) state.offset += PAGE_SIZE;
      loadMine();
    });
    $("confirm-ok").addEventListener("click", onConfirmOk);
    $("confirm-cancel").addEventListener("click", onConfirmCancel);
    $("confirm").addEventListener("cancel", function (event) {
      event.preventDefault();
      onConfirmCancel();
    });
    document.addEventListener("dragenter", onDragEnter);
    document.addEventListener("dragover", onDragOver);
    document.addEventListener("dragleave", onDragLeave);
    document.addEventListener("drop", onDrop);
    document.addEventListener("paste", onPaste);
    startApps();

    state.auth = sessionStorage.getItem(AUTH_KEY);
    state.user = sessionStorage.getItem(USER_KEY) || "";
    if (state.auth) {
      showSignedIn();
      loadMine();
    } else {
      showSignIn("");
      $("signin-user").focus();
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
"""
# ==== upload page: end ====


if __name__ == "__main__":
    sys.exit(main())
