"""Faults: a full disk, a locked database, a read-only data folder, SIGKILL at
random points. Whatever happens, nothing is half-stored, the answer is a clear
5xx with a JSON reason (507/503, never a bare 500), serving goes on, and the
lifecycle invariants hold after every restart."""
from __future__ import annotations

import asyncio
import collections
import datetime as dt
import errno
import hashlib
import http.client
import io
import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import imgproxy
from conftest import ALICE, BOB, CAROL, ROOT
from helpers import (PatchedServer, age_upload_claims, db_rows, http_call, noise_png, png_bytes, store_problems, stored_files,
                     stored_path, tmp_leftovers)


async def seed(client) -> dict:
    resp = await client.put("/upload/seed.png", data=png_bytes(color=(9, 9, 9)), headers=BOB)
    assert resp.status == 201
    return await resp.json()


# ---- disk full ----------------------------------------------------------------------

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# "publish" fails the move into uploads/: the files layer's own step (S3 publishes by PUT).
@pytest.mark.parametrize("where", [pytest.param("publish", marks=pytest.mark.local_files_only),
                                   "temp-file-first-write", "temp-file-later-write"])
async def test_disk_full_is_507_and_nothing_half_stored(make_client, monkeypatch, where):
    client = await make_client()
    kept = await seed(client)
    if where == "publish":
        data = png_bytes(color=(1, 1, 1))  # small: one write to tmp/, then the move into uploads/ fails
        monkeypatch.setattr(imgproxy.Storage, "place", enospc)
    else:
        data = noise_png(3 * 1024 * 1024)  # big: streamed into tmp/ by UploadSink._write
        real_write = imgproxy.UploadSink._write
        calls = []

        def failing_write(self, chunk):
            calls.append(len(chunk))
            if where == "temp-file-first-write" or len(calls) > 1:
                if self._file is None:
                    real_write(self, b"")  # the temp file exists, as it would on a real disk
                enospc()
            real_write(self, chunk)

        monkeypatch.setattr(imgproxy.UploadSink, "_write", failing_write)
    resp = await client.put("/upload/full.png", data=data, headers=ALICE)
    assert resp.status == 507
    body = await resp.json()
    assert body["code"] == "insufficient_storage" and "disk is full" in body["error"]
    assert resp.headers["Cache-Control"] == "no-store"
    md5 = hashlib.md5(data).hexdigest()
    assert not any(md5 in p.name for p in stored_files(client.data_dir))
    assert (md5,) not in db_rows(client.data_dir)
    assert tmp_leftovers(client.data_dir) == []
    assert store_problems(client.data_dir) == []
    # serving goes on during the fault ...
    assert (await client.get(f"/i/{kept['md5']}.png")).status == 200
    assert (await client.get(f"/api/images/{kept['md5']}", headers=BOB)).status == 200
    # ... and uploads work again once there is space
    monkeypatch.undo()
    resp = await client.put("/upload/full.png", data=data, headers=ALICE)
    assert resp.status == 201
    assert store_problems(client.data_dir) == []


@pytest.mark.local_files_only   # fails the move into uploads/
async def test_disk_full_while_placing_a_multipart_upload(make_client, monkeypatch):
    client = await make_client()
    monkeypatch.setattr(imgproxy.Storage, "place", enospc)
    resp = await client.post("/upload", data={"file": io.BytesIO(png_bytes())}, headers=ALICE)
    assert resp.status == 507
    assert stored_files(client.data_dir) == [] and db_rows(client.data_dir) == [] and tmp_leftovers(client.data_dir) == []


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
@pytest.mark.local_files_only   # fails the move into uploads/
async def test_unwritable_storage_is_503_and_serving_goes_on(make_client, monkeypatch, err):
    client = await make_client()
    kept = await seed(client)

    def refuse(*args, **kwargs):
        raise OSError(err, "Read-only file system" if err == errno.EROFS else "Permission denied")

    monkeypatch.setattr(imgproxy.Storage, "place", refuse)
    resp = await client.put("/upload/x.png", data=png_bytes(color=(5, 5, 5)), headers=ALICE)
    assert resp.status == 503
    assert (await resp.json())["code"] == "storage_unavailable"
    assert (await client.get(f"/i/{kept['md5']}.png")).status == 200
    assert len(db_rows(client.data_dir)) == 1 and store_problems(client.data_dir) == []


async def test_database_error_is_503_with_retry_after(make_client, monkeypatch):
    client = await make_client()
    kept = await seed(client)

    async def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(imgproxy.ImageStore, "publish", locked)
    resp = await client.put("/upload/x.png", data=png_bytes(color=(5, 5, 5)), headers=ALICE)
    assert resp.status == 503
    assert resp.headers["Retry-After"]
    assert (await resp.json())["code"] == "unavailable"
    assert tmp_leftovers(client.data_dir) == [] and store_problems(client.data_dir) == []
    assert (await client.get(f"/i/{kept['md5']}.png")).status == 200


# ---- the database locked by another process -----------------------------------------------

LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
con.execute("INSERT INTO meta (key, value) VALUES ('locker', 'was here') "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("COMMIT")
print("released", flush=True)
"""


@pytest.mark.sqlite_only   # SQLite's own lock and WAL readers
async def test_database_locked_by_another_process_makes_writers_wait(make_client):
    client = await make_client()
    kept = await seed(client)
    hold = 1.5
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(client.data_dir / "images.db"), str(hold)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        started = time.monotonic()

        async def timed(coro):
            resp = await coro
            await resp.read()
            return resp.status, time.monotonic() - started

        data = png_bytes(color=(7, 7, 7))
        results = await asyncio.gather(
            timed(client.put("/upload/new.png", data=data, headers=ALICE)),
            timed(client.post(f"/api/images/{kept['md5']}/renew", headers=CAROL)),
            timed(client.get(f"/i/{kept['md5']}.png")),
            timed(client.get(f"/api/images/{kept['md5']}", headers=BOB)),
            timed(client.get("/api/images", headers=ALICE)),
            timed(client.get("/healthz")),
        )
    finally:
        assert locker.wait(30) == 0
    (up, up_t), (renew, renew_t), (img, img_t), (look, _), (lst, _), (health, _) = results
    assert (up, renew, img, look, lst, health) == (201, 200, 200, 200, 200, 200)
    assert up_t >= hold * 0.8 and renew_t >= hold * 0.8  # writers waited for the lock ...
    assert img_t < hold  # ... readers (WAL) did not
    con = sqlite3.connect(client.data_dir / "images.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("SELECT value FROM meta WHERE key = 'locker'").fetchone() == ("was here",)
    finally:
        con.close()
    assert store_problems(client.data_dir) == [] and len(db_rows(client.data_dir)) == 2


# ---- an unwritable data folder, for real ----------------------------------------------------

def _set_immutable(folders: list[Path], on: bool) -> subprocess.CompletedProcess:
    return subprocess.run(["chattr", "+i" if on else "-i", *map(str, folders)], capture_output=True, text=True)


@pytest.mark.local_files_only   # chattr'd folders under uploads/
async def test_unwritable_data_folder_refuses_uploads_and_keeps_serving(make_client):
    # Root ignores file modes, so the folders are made immutable (chattr +i):
    # nothing can be created, renamed or removed in them, not even by root.
    # The database stays writable, as it would on a separate volume.
    client = await make_client()
    kept = await seed(client)
    data_dir = client.data_dir
    folders = [data_dir / "tmp", *[p for p in (data_dir / "uploads").rglob("*") if p.is_dir()],
               data_dir / "uploads"]
    done = _set_immutable(folders, True)
    if done.returncode != 0:
        _set_immutable(folders, False)
        pytest.skip(f"chattr +i not possible here: {done.stderr.strip()}")
    try:
        for data in (png_bytes(color=(3, 4, 5)), noise_png(2 * 1024 * 1024)):
            resp = await client.put("/upload/b.png", data=data, headers=ALICE)
            assert resp.status == 503, await resp.text()
            answer = await resp.json()
            assert answer["code"] == "storage_unavailable" and "nothing was stored" in answer["error"]
        resp = await client.get(f"/i/{kept['md5']}.png")
        assert resp.status == 200 and hashlib.md5(await resp.read()).hexdigest() == kept["md5"]
        assert (await client.post(f"/api/images/{kept['md5']}/renew", headers=CAROL)).status == 200
        resp = await client.delete(f"/api/images/{kept['md5']}", headers=ALICE)
        assert resp.status == 503  # the file cannot be removed: the row stays with it
        assert (await client.get(f"/i/{kept['md5']}.png")).status == 200
        resp = await client.get("/healthz")
        assert resp.status == 503 and "not writable" in (await resp.json())["error"]
    finally:
        assert _set_immutable(folders, False).returncode == 0
    assert store_problems(data_dir) == [] and tmp_leftovers(data_dir) == []
    assert (await client.put("/upload/b.png", data=png_bytes(color=(3, 4, 5)), headers=ALICE)).status == 201


# ---- SIGKILL at random points --------------------------------------------------------------

EXPIRE_SECONDS = 4.0


class Load:
    """Uploads, renews, deletes and GETs from a few threads against one server life."""

    def __init__(self, base_url: str, state: dict, rng: random.Random):
        self.base, self.state, self.rng = base_url, state, rng
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.busy: collections.Counter[str] = collections.Counter()

    def begin(self, md5: str) -> None:
        """An operation on md5 starts: uncertain until its answer. Two at once
        (a delete and a re-upload) may be answered in another order than the
        server applied them, so such an md5 stays uncertain for good."""
        with self.lock:
            if self.busy[md5]:
                self.state["conflicted"].add(md5)
            self.busy[md5] += 1
            self.state["uncertain"].add(md5)

    def settle(self, md5: str) -> None:
        with self.lock:
            self.busy[md5] -= 1
            if md5 not in self.state["conflicted"]:
                self.state["uncertain"].discard(md5)

    def end(self, md5: str) -> None:
        """The operation ended without a verdict (error, server gone)."""
        with self.lock:
            self.busy[md5] -= 1

    def run(self, threads: int = 3) -> list[threading.Thread]:
        workers = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(threads)]
        for w in workers:
            w.start()
        return workers

    def worker(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        users = [("alice", ALICE), ("bob", BOB), ("carol", CAROL)]
        while not self.stop.is_set():
            op = rng.choice(["upload", "upload", "upload", "big", "again", "renew", "delete", "get"])
            acked = self.state["acked"]
            md5 = None
            settled = True
            try:
                if op in ("upload", "big") or (op == "again" and not acked):
                    seed = self.state["seq"] = self.state["seq"] + 1
                    data = noise_png(1_500_000 if op == "big" else 3000, seed)
                elif op == "again":
                    md5 = rng.choice(list(acked))
                    data = self.state["bytes"][md5]
                else:
                    data = None
                if data is not None:
                    md5 = hashlib.md5(data).hexdigest()
                    self.state["bytes"][md5] = data
                    self.begin(md5)
                    settled = False
                    status, body = http_call("PUT", f"{self.base}/upload/k{i}.png", data, rng.choice(users)[1])
                    if status in (200, 201):
                        info = json.loads(body)
                        acked[md5] = _ts(info["expire_at"])
                        self.settle(md5)
                        settled = True
                    elif status not in (503, 507):
                        self.errors.append(f"upload {status} {body[:100]!r}")
                elif op == "renew" and acked:
                    md5 = rng.choice(list(acked))
                    self.begin(md5)
                    settled = False
                    status, body = http_call("POST", f"{self.base}/api/images/{md5}/renew", headers=BOB)
                    if status == 200:
                        acked[md5] = max(acked.get(md5, 0), _ts(json.loads(body)["expire_at"]))
                    if status in (200, 404):
                        self.settle(md5)
                        settled = True
                elif op == "delete" and acked:
                    md5 = rng.choice(list(acked))
                    self.begin(md5)
                    settled = False
                    status, _ = http_call("DELETE", f"{self.base}/api/images/{md5}", headers=ALICE)
                    if status in (204, 404):
                        acked.pop(md5, None)
                        self.settle(md5)
                        settled = True
                        if status == 204:
                            self.state["deleted"].add(md5)
                elif op == "get" and acked:
                    md5 = rng.choice(list(acked))
                    status, _ = http_call("GET", f"{self.base}/i/{md5}.png")
                    if status >= 500:
                        self.errors.append(f"GET {status}")
            except (OSError, urllib.error.URLError, http.client.HTTPException):
                # HTTPException: IncompleteRead, a body cut off by the kill
                if not self.stop.is_set():
                    time.sleep(0.01)
                return  # the server died under us: whatever was in flight is uncertain
            finally:
                if not settled:
                    self.end(md5)


def _ts(iso: str) -> float:
    return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()


def run_cleanup(config_path: Path, kill_after: float | None = None) -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "cleanup.py"), "--config", str(config_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        return
    try:
        proc.wait(kill_after)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def check_after_restart(base: str, data_dir: Path, state: dict) -> None:
    """The invariants right after a restart, before any repair."""
    # No partial file ever sits under uploads/. A crash between unlink and
    # commit (delete, expiry) may leave a row whose file is gone, and one
    # between rename and commit (publish) a file without a row, but only for
    # operations that were in flight; cleanup repairs both (checked next).
    problems = store_problems(data_dir, rows_need_files=False, files_need_rows=False)
    assert problems == [], problems
    now = time.time()
    expired_or_uncertain = state["uncertain"] | {m for m, exp in state["acked"].items() if exp <= now + 0.5}
    rows = dict(db_rows(data_dir, "SELECT md5, expire_at FROM images"))
    for md5 in rows:
        if not stored_path(data_dir, md5, "png").exists():
            assert md5 in expired_or_uncertain or rows[md5] <= now + 0.5, f"row {md5} lost its file"
    for path in stored_files(data_dir):
        md5 = path.name.split(".")[0]
        assert md5 in rows or md5 in state["uncertain"], f"file {md5} without row"
    for md5, expire_at in list(state["acked"].items()):
        if md5 in state["uncertain"]:
            continue
        status, body = http_call("GET", f"{base}/i/{md5}.png")
        # expire_at comes in whole seconds, rounded down: the truth is up to 1 s later
        if expire_at > time.time() + 0.5:
            assert status == 200, f"acknowledged {md5} not served: {status}"
            assert body == state["bytes"][md5]
        elif expire_at + 1 < time.time() - 0.5:
            assert status == 404, f"expired {md5} still served"


def kill_loop(make_config, kills: int, seed: int) -> dict:
    rng = random.Random(seed)
    config_path = make_config(cleanup={"enable": False, "expire_days": EXPIRE_SECONDS / 86400})
    data_dir = imgproxy.load_config(config_path).server.data_dir
    state = {"acked": {}, "bytes": {}, "uncertain": set(), "conflicted": set(), "deleted": set(),
             "seq": seed * 100_000}
    errors: list[str] = []
    servers: list[PatchedServer] = []
    try:
        for n in range(kills):
            server = PatchedServer(config_path)
            servers.append(server)
            check_after_restart(server.base_url, data_dir, state)
            load = Load(server.base_url, state, rng)
            workers = load.run()
            cleaner = threading.Thread(target=run_cleanup, args=(config_path, rng.uniform(0.1, 1.0)), daemon=True)
            cleaner.start()
            time.sleep(rng.uniform(0.3, 1.2))
            server.proc.kill()  # SIGKILL, mid-whatever
            server.proc.wait(10)
            load.stop.set()
            for w in workers:
                w.join(30)
            cleaner.join(30)
            errors += load.errors
            assert "Traceback" not in server.log, server.log
        # last restart: every invariant, strictly, after one cleanup pass repairs
        server = PatchedServer(config_path)
        servers.append(server)
        check_after_restart(server.base_url, data_dir, state)
        age_upload_claims(data_dir)   # the claims of uploads killed mid-way run out
        run_cleanup(config_path)
        assert store_problems(data_dir) == []
        check_after_restart(server.base_url, data_dir, state)
    finally:
        for server in servers:
            server.kill()
    assert errors == []
    state["data_dir"] = data_dir
    return state


def test_sigkill_three_times_keeps_invariants(make_config):
    state = kill_loop(make_config, kills=3, seed=1)
    assert state["acked"] or state["deleted"]


@pytest.mark.slow
def test_sigkill_25_times_keeps_invariants(make_config):
    state = kill_loop(make_config, kills=25, seed=2)
    assert len(state["acked"]) + len(state["deleted"]) > 25
