"""Image lifecycle (issue 3): expiry, the daily schedule and its catch-up, one cleanup
pass with repair, crash safety under kill -9, cleanup.py, reset, access counts.

Time is injected (FakeClock, fake sleep) wherever the code allows it; real
processes are used where the behaviour is about processes (kill -9, SIGTERM,
a second writer). Nothing waits a fixed time for readiness: every wait polls
against a deadline.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import fcntl
import hashlib
import http.client
import logging
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional
from zoneinfo import ZoneInfo

import aiohttp
import pytest

import imgproxy
from conftest import ALICE, BOB, CAROL, ROOT, FakeClock
from helpers import (age_upload_claims, apoll, db_integrity, db_rows, db_schema, db_write, http_call,
                     objects_left_alone, poll, report_name, seeded_png, store_bytes, store_image, stored_files, stored_path)

DAY = 86400.0
HOUR = 3600.0


# ---- helpers ----------------------------------------------------------------

def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def data_dir_of(config_path: Path) -> Path:
    return imgproxy.load_config(config_path).server.data_dir


@dataclasses.dataclass
class Planted:
    md5: str
    ext: str
    data: bytes
    path: Path


def plant(data_dir: Path, items: Iterable[tuple[bytes, float]], *, ext: str = "png",
          holders: Iterable[str] = ("alice",), with_file: bool = True, now: Optional[float] = None,
          ) -> list[Planted]:
    """Write rows (expire_at given per item), holds and files as a publish would have."""
    now = time.time() if now is None else now
    planted, rows, holds = [], [], []
    for data, expire_at in items:
        md5 = md5_of(data)
        path = store_image(data_dir, md5, ext, data) if with_file else stored_path(data_dir, md5, ext)
        rows.append((md5, ext, "PNG", "image/png", f"{md5[:6]}.{ext}", len(data), 6, 4, 0, now - DAY, expire_at))
        holds.extend((md5, user, now - DAY) for user in holders)
        planted.append(Planted(md5, ext, data, path))
    db_schema(data_dir)
    db_write(data_dir, f"INSERT INTO images ({imgproxy.IMAGE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    db_write(data_dir, "INSERT INTO holds (md5, username, held_at) VALUES (?,?,?)", holds)
    return planted


def set_meta(data_dir: Path, key: str, value: str) -> None:
    db_schema(data_dir)
    db_write(data_dir, "INSERT INTO meta (key, value) VALUES (?, ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def image_rows(data_dir: Path) -> dict[str, str]:
    return dict(db_rows(data_dir, "SELECT md5, ext FROM images"))


def upload_files(data_dir: Path) -> set[Path]:
    return set(stored_files(data_dir, everything=True))


def tmp_files(data_dir: Path) -> set[Path]:
    return {p for p in (data_dir / "tmp").iterdir() if p.is_file()}


def assert_consistent(data_dir: Path) -> None:
    """The crash-safety invariant: a row exactly when its file; no hold without a row."""
    storage = imgproxy.Storage(data_dir)
    rows = image_rows(data_dir)
    expected = {storage.image_path(md5, ext) for md5, ext in rows.items()}
    files = set(stored_files(data_dir, everything=not objects_left_alone(data_dir)))
    assert files - expected == set(), "files without a row"
    assert expected - files == set(), "rows without a file"
    assert db_rows(data_dir, "SELECT COUNT(*) FROM holds WHERE md5 NOT IN (SELECT md5 FROM images)") == [(0,)]
    assert db_integrity(data_dir) == "ok"


def no_old_tmp(data_dir: Path) -> None:
    now = time.time()
    old = [p for p in tmp_files(data_dir) if now - p.stat().st_mtime > imgproxy.TMP_MAX_AGE]
    assert old == []


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def run_cleanup_py(config_path: Path, *args: str, stdin=subprocess.DEVNULL,
                   timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cleanup.py"), "--config", str(config_path), *args],
                          stdin=stdin, capture_output=True, text=True, timeout=timeout)


def local_hms(seconds_from_now: float) -> str:
    return (dt.datetime.now() + dt.timedelta(seconds=seconds_from_now)).strftime("%H:%M:%S")


@pytest.fixture
async def open_store():
    """open_store(config_path, clock=None) -> an open ImageStore (closed at teardown)."""
    stores: list[imgproxy.ImageStore] = []

    async def make(config_path: Path, clock: Optional[Callable[[], float]] = None) -> imgproxy.ImageStore:
        config = imgproxy.load_config(config_path)
        store = await imgproxy.ImageStore(config, clock or time.time).open()
        stores.append(store)
        return store

    yield make
    for s in stores:
        await s.close()


@pytest.fixture
def local_tz():
    """local_tz("Asia/Shanghai") switches this process's local zone; restored afterwards."""
    old = os.environ.get("TZ")

    def use(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()

    yield use
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


async def upload(client, data: bytes, headers=ALICE, name: str = "x.png"):
    fd = aiohttp.FormData()
    fd.add_field("file", data, filename=name, content_type="application/octet-stream")
    return await client.post("/upload", data=fd, headers=headers)


# ---- expiry -------------------------------------------------------------------

async def test_expired_image_is_404_everywhere_then_removed_by_a_pass(make_client, clock):
    client = await make_client(clock=clock, cleanup={"expire_days": 1})
    store = client.app[imgproxy.STORE]
    old, young = seeded_png(1), seeded_png(2)
    old_md5, young_md5 = md5_of(old), md5_of(young)
    assert (await upload(client, old)).status == 201
    assert (await upload(client, old, headers=BOB)).status == 200   # a second holder
    assert (await client.get(f"/i/{old_md5}.png")).status == 200    # now in the serving cache
    clock.advance(DAY / 2)
    assert (await upload(client, young)).status == 201
    clock.advance(DAY / 2 + 1)                                        # old is past expire_at

    assert (await client.get(f"/i/{old_md5}.png")).status == 404
    assert (await client.head(f"/i/{old_md5}.png")).status == 404
    assert (await client.get(f"/api/images/{old_md5}", headers=ALICE)).status == 404
    listed = await (await client.get("/api/images", headers=ALICE)).json()
    assert [i["md5"] for i in listed["images"]] == [young_md5]
    old_path = stored_path(client.data_dir, old_md5, "png")
    assert old_path.exists()                                           # not removed before the pass

    report = await imgproxy.run_cleanup_pass(store)
    assert (report.expired, report.orphan_files, report.dangling_rows, report.temp_files) == (1, 0, 0, 0)
    assert report.bytes_freed == len(old)
    assert not old_path.exists()
    assert image_rows(client.data_dir) == {young_md5: "png"}
    assert db_rows(client.data_dir, "SELECT md5, username FROM holds") == [(young_md5, "alice")]
    assert (await client.get(f"/i/{young_md5}.png")).status == 200
    assert_consistent(client.data_dir)
    # Recorded in the database, so a restart knows the pass ran.
    assert float(await store.get_meta("last_cleanup")) == clock()


async def test_expire_at_boundary_and_fractional_days(make_client, clock):
    client = await make_client(clock=clock, cleanup={"expire_days": 0.5})
    data = seeded_png(3)
    info = await (await upload(client, data)).json()
    created = dt.datetime.strptime(info["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    expires = dt.datetime.strptime(info["expire_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs((expires - created).total_seconds() - 12 * HOUR) <= 1
    clock.advance(12 * HOUR - 5)
    assert (await client.get(f"/i/{info['md5']}.png")).status == 200
    report = await imgproxy.run_cleanup_pass(client.app[imgproxy.STORE])
    assert report.expired == 0 and image_rows(client.data_dir)
    clock.advance(10)
    assert (await client.get(f"/i/{info['md5']}.png")).status == 404
    report = await imgproxy.run_cleanup_pass(client.app[imgproxy.STORE])
    assert report.expired == 1 and image_rows(client.data_dir) == {}


async def test_reupload_after_expiry_before_cleanup_revives_it(make_client, clock):
    client = await make_client(clock=clock, cleanup={"expire_days": 1})
    data = seeded_png(4)
    await upload(client, data)
    clock.advance(DAY + 1)
    assert (await client.get(f"/i/{md5_of(data)}.png")).status == 404
    again = await upload(client, data)
    assert again.status == 200 and (await again.json())["status"] == "exists"
    assert (await client.get(f"/i/{md5_of(data)}.png")).status == 200
    report = await imgproxy.run_cleanup_pass(client.app[imgproxy.STORE])
    assert report.expired == 0
    assert_consistent(client.data_dir)


async def test_expired_rows_are_removed_in_batches(make_client, clock):
    client = await make_client(clock=clock)
    n = imgproxy.CLEANUP_BATCH * 2 + 7
    planted = plant(client.data_dir, [(seeded_png(1000 + i), clock() - 1) for i in range(n)],
                    holders=("alice", "bob"))
    report = await imgproxy.run_cleanup_pass(client.app[imgproxy.STORE])
    assert report.expired == n
    assert report.bytes_freed == sum(len(p.data) for p in planted)
    assert image_rows(client.data_dir) == {} and upload_files(client.data_dir) == set()
    assert db_rows(client.data_dir, "SELECT COUNT(*) FROM holds") == [(0,)]


# ---- the schedule -----------------------------------------------------------

SHANGHAI = ZoneInfo("Asia/Shanghai")


def sh(y, mo, d, h=0, mi=0, s=0) -> float:
    return dt.datetime(y, mo, d, h, mi, s, tzinfo=SHANGHAI).timestamp()


@pytest.mark.parametrize("now, at, next_run, last_slot", [
    (sh(2026, 11, 25, 2, 0), "03:00:00", sh(2026, 11, 25, 3), sh(2026, 11, 24, 3)),
    (sh(2026, 11, 25, 3, 0), "03:00:00", sh(2026, 11, 26, 3), sh(2026, 11, 25, 3)),
    (sh(2026, 11, 25, 3, 0, 1), "03:00:00", sh(2026, 11, 26, 3), sh(2026, 11, 25, 3)),
    (sh(2026, 11, 25, 23, 59, 59), "03:00:00", sh(2026, 11, 26, 3), sh(2026, 11, 25, 3)),
    (sh(2026, 11, 25, 0, 0), "00:00:00", sh(2026, 11, 26, 0), sh(2026, 11, 25, 0)),
    (sh(2026, 12, 31, 23, 0), "23:30:00", sh(2026, 12, 31, 23, 30), sh(2026, 12, 30, 23, 30)),
    (sh(2026, 12, 31, 23, 45), "23:30:00", sh(2027, 1, 1, 23, 30), sh(2026, 12, 31, 23, 30)),
], ids=["before", "exactly-at", "just-after", "late-evening", "midnight", "before-new-year", "after-new-year"])
def test_next_run_and_last_slot_in_local_time(local_tz, now, at, next_run, last_slot):
    local_tz("Asia/Shanghai")
    at_time = imgproxy.parse_cleanup_time(at)
    assert imgproxy.next_cleanup_after(now, at_time) == next_run
    assert imgproxy.last_cleanup_slot(now, at_time) == last_slot


def test_schedule_follows_the_local_zone_not_utc(local_tz):
    at = imgproxy.parse_cleanup_time("03:00:00")
    now = dt.datetime(2026, 11, 25, 20, 0, tzinfo=dt.timezone.utc).timestamp()  # 04:00 on the 26th in Shanghai
    local_tz("UTC")
    assert imgproxy.next_cleanup_after(now, at) == dt.datetime(2026, 11, 26, 3, tzinfo=dt.timezone.utc).timestamp()
    local_tz("Asia/Shanghai")
    assert imgproxy.next_cleanup_after(now, at) == sh(2026, 11, 27, 3)


@pytest.mark.parametrize("at, start, first_day, gaps", [
    # Spring forward (8 March 2026): one 23-hour day, still at 03:00 local.
    ("03:00:00", (2026, 3, 6, 12), 7, [23, 24, 24, 24]),
    # Fall back (1 November 2026): 01:30 happens twice that night, the pass runs once.
    ("01:30:00", (2026, 10, 30, 12), 31, [24, 25, 24, 24]),
], ids=["spring-forward", "fall-back"])
def test_schedule_runs_once_a_day_across_dst(local_tz, at, start, first_day, gaps):
    local_tz("America/New_York")
    zone = ZoneInfo("America/New_York")
    at_time = imgproxy.parse_cleanup_time(at)
    t = dt.datetime(*start, tzinfo=zone).timestamp()
    runs = []
    for _ in range(len(gaps) + 1):
        t = imgproxy.next_cleanup_after(t, at_time)
        runs.append(t)
        assert imgproxy.last_cleanup_slot(t, at_time) == t
    local = [dt.datetime.fromtimestamp(r, zone) for r in runs]
    assert all(x.time() == at_time for x in local)
    assert [x.day for x in local][0] == first_day
    assert len({x.date() for x in local}) == len(local)
    assert [(b - a) / HOUR for a, b in zip(runs, runs[1:])] == gaps


def test_a_cleanup_time_skipped_by_spring_forward_still_runs_that_day(local_tz):
    local_tz("America/New_York")
    zone = ZoneInfo("America/New_York")
    at = imgproxy.parse_cleanup_time("02:30:00")       # does not exist on 8 March 2026
    first = imgproxy.next_cleanup_after(dt.datetime(2026, 3, 8, 0, 0, tzinfo=zone).timestamp(), at)
    second = imgproxy.next_cleanup_after(first, at)
    assert dt.datetime.fromtimestamp(first, zone) == dt.datetime(2026, 3, 8, 3, 30, tzinfo=zone)
    assert dt.datetime.fromtimestamp(second, zone) == dt.datetime(2026, 3, 9, 2, 30, tzinfo=zone)


class StopScheduler(BaseException):
    """Raised by the fake sleep to end a scheduler run (not an Exception: it must escape)."""


async def drive_scheduler(*, start: float, at: str, last_run: Optional[float], passes: int,
                          fail: Callable[[int], bool] = lambda n: False) -> list[float]:
    """Run cleanup_scheduler on a fake clock until `passes` passes ran; returns their times."""
    clock = FakeClock(start)
    runs: list[float] = []

    async def run_pass() -> None:
        runs.append(clock())
        if fail(len(runs)):
            raise RuntimeError(f"disk on fire in pass {len(runs)}")

    async def fake_sleep(seconds: float) -> None:
        assert 0 < seconds <= 60.0
        if len(runs) >= passes:
            raise StopScheduler
        clock.advance(seconds)

    with pytest.raises(StopScheduler):
        await imgproxy.cleanup_scheduler(run_pass, last_run, imgproxy.parse_cleanup_time(at),
                                         clock=clock, sleep=fake_sleep)
    return runs


@pytest.mark.parametrize("last_run, catches_up", [
    (None, True),                              # never ran: run now
    (sh(2026, 11, 24, 3) - 1, True),           # last ran before the latest slot (today 03:00 was missed)
    (sh(2026, 11, 24, 3), False),              # ran at the latest slot
    (sh(2026, 11, 24, 9), False),              # ran since (e.g. cleanup.py by hand)
], ids=["never", "missed-a-slot", "ran-at-slot", "ran-since"])
async def test_scheduler_catches_up_once_at_start(local_tz, last_run, catches_up):
    local_tz("Asia/Shanghai")
    start = sh(2026, 11, 24, 10)
    runs = await drive_scheduler(start=start, at="03:00:00", last_run=last_run, passes=0)
    assert runs == ([start] if catches_up else [])
    runs = await drive_scheduler(start=start, at="03:00:00", last_run=last_run, passes=2)
    expected = [start, sh(2026, 11, 25, 3)] if catches_up else [sh(2026, 11, 25, 3), sh(2026, 11, 26, 3)]
    assert runs == expected


async def test_scheduler_runs_daily_at_cleanup_time(local_tz):
    local_tz("Asia/Shanghai")
    runs = await drive_scheduler(start=sh(2026, 11, 24, 10), at="04:15:30", last_run=sh(2026, 11, 24, 5),
                                 passes=4)
    assert runs == [sh(2026, 11, d, 4, 15, 30) for d in (25, 26, 27, 28)]


async def test_a_failing_pass_is_logged_and_the_schedule_goes_on(local_tz, caplog):
    local_tz("Asia/Shanghai")
    caplog.set_level(logging.ERROR, logger="imgproxy")
    runs = await drive_scheduler(start=sh(2026, 11, 24, 10), at="03:00:00", last_run=None, passes=4,
                                 fail=lambda n: n in (1, 2))
    assert runs == [sh(2026, 11, 24, 10), sh(2026, 11, 25, 3), sh(2026, 11, 26, 3), sh(2026, 11, 27, 3)]
    failures = [r for r in caplog.records if "cleanup pass failed" in r.getMessage()]
    assert len(failures) == 2
    assert "disk on fire in pass 1" in caplog.text and "disk on fire in pass 2" in caplog.text  # the cause


async def test_scheduler_task_cancels_cleanly_mid_pass():
    started = asyncio.Event()

    async def endless_pass() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(imgproxy.cleanup_scheduler(endless_pass, None, dt.time(3)))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_disabled_cleanup_starts_no_task(make_client):
    client = await make_client()
    tasks = client.app[imgproxy.TASKS]
    assert [t.get_name() for t in tasks] == ["imgproxy-flush"]


async def test_enabled_cleanup_task_is_started_and_cancelled_on_shutdown(aiohttp_client, make_config):
    config = imgproxy.load_config(make_config(cleanup={"enable": True, "cleanup_time": local_hms(6 * HOUR)}))
    set_meta(config.server.data_dir, "last_cleanup", repr(time.time()))
    app = imgproxy.create_app(config)
    client = await aiohttp_client(app)
    tasks = list(app[imgproxy.TASKS])
    assert sorted(t.get_name() for t in tasks) == ["imgproxy-cleanup", "imgproxy-flush"]
    assert not any(t.done() for t in tasks)
    await client.close()
    assert all(t.done() for t in tasks)


async def test_app_catches_up_at_start_when_last_cleanup_is_old(make_client, make_config, clock):
    config_path = make_config(server={"base_url": "http://img.test"},
                              cleanup={"enable": True, "cleanup_time": "03:00:00"})
    data_dir = data_dir_of(config_path)
    expired = plant(data_dir, [(seeded_png(10), clock() - 60)])[0]
    live = plant(data_dir, [(seeded_png(11), clock() + DAY)])[0]
    set_meta(data_dir, "last_cleanup", repr(clock() - 2 * DAY))
    client = await make_client(config_path, clock=clock)
    await apoll(lambda: not expired.path.exists() and expired.md5 not in image_rows(data_dir), 10,
                "the catch-up pass")
    assert image_rows(data_dir) == {live.md5: "png"}
    await apoll(lambda: db_rows(data_dir, "SELECT value FROM meta WHERE key='last_cleanup'") == [(repr(clock()),)],
                5, "last_cleanup recorded")
    assert (await client.get(f"/i/{live.md5}.png")).status == 200


async def test_app_does_not_run_a_pass_at_start_after_a_recent_one(make_client, make_config, clock):
    # Pick the slot so that "now" is far from it on both sides, whatever the hour of the test.
    at = dt.datetime.fromtimestamp(clock() + 6 * HOUR).strftime("%H:%M:%S")
    config_path = make_config(cleanup={"enable": True, "cleanup_time": at})
    data_dir = data_dir_of(config_path)
    expired = plant(data_dir, [(seeded_png(12), clock() - 60)])[0]
    set_meta(data_dir, "last_cleanup", repr(clock() - 60))   # after the latest slot (18 h ago)
    client = await make_client(config_path, clock=clock)
    assert len(client.app[imgproxy.TASKS]) == 2
    # A negative can only be observed for a while: a pass on this tiny store would
    # finish in milliseconds, so half a second without one is conclusive enough.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert expired.path.exists() and expired.md5 in image_rows(data_dir)
        await asyncio.sleep(0.05)


def test_server_process_catches_up_at_start(make_config, server_process):
    config_path = make_config(cleanup={"enable": True, "cleanup_time": local_hms(6 * HOUR)})
    data_dir = data_dir_of(config_path)
    now = time.time()
    expired = plant(data_dir, [(seeded_png(20), now - 60)], holders=("alice", "bob"))[0]
    live = plant(data_dir, [(seeded_png(21), now + DAY)])[0]
    orphan = store_bytes(data_dir, "ab/cd/abcd" + "0" * 28 + ".png", b"left by a crash")
    set_meta(data_dir, "last_cleanup", repr(now - 3 * DAY))
    server = server_process(config_path)
    poll(lambda: "cleanup removed: 1 expired images, 1 orphan files" in server.log, 10, "the catch-up pass")
    assert image_rows(data_dir) == {live.md5: "png"}
    assert not expired.path.exists() and not orphan.exists()
    assert float(db_rows(data_dir, "SELECT value FROM meta WHERE key='last_cleanup'")[0][0]) >= now
    assert http_call("GET", f"{server.base_url}/i/{live.md5}.png") == (200, live.data)
    assert http_call("GET", f"{server.base_url}/i/{expired.md5}.png")[0] == 404
    assert server.terminate() == 0
    assert_consistent(data_dir)


# ---- repair -----------------------------------------------------------------

def plant_damage(data_dir: Path, live_md5: str) -> dict:
    """Everything a crash or a careless hand can leave behind, one of each."""
    tmp = data_dir / "tmp"
    orphan = store_image(data_dir, md5_of(b"orphan bytes"), "png", b"orphan bytes")
    foreign = store_bytes(data_dir, "zz/notes.txt", b"not ours at all")
    # the row says png
    wrong_ext = store_image(data_dir, live_md5, "jpg", b"stale copy under another extension")
    dangling = plant(data_dir, [(seeded_png(30), time.time() + DAY)], holders=("bob",), with_file=False)[0]
    old_tmp = tmp / "upload-0123456789abcdef.part"
    old_tmp.write_bytes(b"x" * 1000)
    age(old_tmp, 2 * HOUR)
    # A live upload's temp file: its writer holds the lock (kept open in the dict).
    young_tmp, fd = imgproxy.Storage(data_dir).create_tmp()
    writer = open(fd, "wb")
    writer.write(b"y" * 500)
    writer.flush()
    # A foreign file under uploads/ is ours to remove; in a bucket it may be another
    # application's, so a pass leaves it alone (and counts it nowhere).
    orphans, kept = ([orphan, wrong_ext], [foreign]) if objects_left_alone(data_dir) else \
        ([orphan, foreign, wrong_ext], [])
    return {"orphans": orphans, "kept": kept, "dangling": dangling,
            "old_tmp": old_tmp, "young_tmp": young_tmp, "young_tmp_writer": writer,
            "bytes": sum(len(p.read_bytes()) for p in (*orphans, old_tmp))}


async def test_one_pass_repairs_exactly_the_damage(make_client):
    client = await make_client()
    store, data_dir = client.app[imgproxy.STORE], client.data_dir
    live = seeded_png(31)
    live_md5 = (await (await upload(client, live)).json())["md5"]
    damage = plant_damage(data_dir, live_md5)
    files_before = upload_files(data_dir)

    dry = await imgproxy.run_cleanup_pass(store, dry_run=True)
    assert upload_files(data_dir) == files_before
    assert set(image_rows(data_dir)) == {live_md5, damage["dangling"].md5}
    assert damage["old_tmp"].exists() and damage["young_tmp"].exists()
    assert await store.get_meta("last_cleanup") is None   # a dry run is not a pass

    report = await imgproxy.run_cleanup_pass(store, itemize=True)
    for r in (dry, report):
        assert (r.expired, r.orphan_files, r.dangling_rows, r.temp_files) == (0, len(damage["orphans"]), 1, 1)
        assert r.bytes_freed == damage["bytes"]
    assert sorted(dry.removed) == sorted(report.removed)
    assert all(not p.exists() for p in damage["orphans"]) and not damage["old_tmp"].exists()
    assert all(p.exists() for p in damage["kept"])
    assert damage["young_tmp"].exists()                    # an upload may still be writing it
    assert image_rows(data_dir) == {live_md5: "png"}
    assert db_rows(data_dir, "SELECT md5 FROM holds") == [(live_md5,)]
    assert_consistent(data_dir)
    resp = await client.get(f"/i/{live_md5}.png")
    assert resp.status == 200 and await resp.read() == live
    assert (await client.get(f"/i/{damage['dangling'].md5}.png")).status == 404

    again = await imgproxy.run_cleanup_pass(store)
    assert (again.expired, again.orphan_files, again.dangling_rows, again.temp_files, again.bytes_freed) == \
        (0, 0, 0, 0, 0)


async def test_dangling_row_is_dropped_even_if_cached_for_serving(make_client):
    client = await make_client()
    data = seeded_png(32)
    md5 = (await (await upload(client, data)).json())["md5"]
    assert (await client.get(f"/i/{md5}.png")).status == 200
    stored_path(client.data_dir, md5, "png").unlink()
    report = await imgproxy.run_cleanup_pass(client.app[imgproxy.STORE])
    assert report.dangling_rows == 1
    assert (await client.get(f"/i/{md5}.png")).status == 404
    assert (await upload(client, data)).status == 201       # the bytes can come back
    assert_consistent(client.data_dir)


async def test_dry_run_counts_match_a_real_pass_with_everything_at_once(make_client, clock):
    client = await make_client(clock=clock)
    store, data_dir = client.app[imgproxy.STORE], client.data_dir
    live_md5 = (await (await upload(client, seeded_png(33))).json())["md5"]
    plant(data_dir, [(seeded_png(40 + i), clock() - 1) for i in range(5)])
    plant(data_dir, [(seeded_png(50), clock() - 1)], with_file=False)     # expired and dangling
    damage = plant_damage(data_dir, live_md5)                               # holds the live temp file's lock
    dry = await imgproxy.run_cleanup_pass(store, dry_run=True)
    real = await imgproxy.run_cleanup_pass(store)
    fields = ("expired", "orphan_files", "dangling_rows", "temp_files", "bytes_freed")
    assert [getattr(dry, f) for f in fields] == [getattr(real, f) for f in fields]
    assert (real.expired, real.orphan_files, real.dangling_rows, real.temp_files) == \
        (6, len(damage["orphans"]), 1, 1)
    assert damage["young_tmp"].exists()
    assert_consistent(data_dir)


# ---- two passes at once -----------------------------------------------------

async def test_second_concurrent_pass_in_process_skips(make_client, clock):
    client = await make_client(clock=clock)
    store = client.app[imgproxy.STORE]
    n = imgproxy.CLEANUP_BATCH * 3
    plant(client.data_dir, [(seeded_png(2000 + i), clock() - 1) for i in range(n)])
    reports = await asyncio.gather(imgproxy.run_cleanup_pass(store), imgproxy.run_cleanup_pass(store))
    # Either may take the lock first (with PostgreSQL, whichever connects first).
    first, second = sorted(reports, key=lambda r: r.skipped)
    assert (first.skipped, second.skipped) == (False, True)
    assert second.expired == 0 and "skipped" in second.summary()
    assert first.expired == n
    assert_consistent(client.data_dir)
    later = await imgproxy.run_cleanup_pass(store)     # the lock is released afterwards
    assert not later.skipped


@pytest.mark.sqlite_only   # the flock on cleanup.lock (PostgreSQL: an advisory lock)
def test_cleanup_py_skips_while_another_pass_holds_the_lock(make_config):
    config_path = make_config()
    data_dir = data_dir_of(config_path)
    expired = plant(data_dir, [(seeded_png(60), time.time() - 1)])[0]
    with open(data_dir / "cleanup.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run_cleanup_py(config_path)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout
    assert expired.path.exists() and image_rows(data_dir)
    assert run_cleanup_py(config_path).returncode == 0
    assert image_rows(data_dir) == {}


def test_two_cleanup_processes_at_once_leave_a_consistent_store(make_config):
    config_path = make_config()
    data_dir = data_dir_of(config_path)
    n = imgproxy.CLEANUP_BATCH * 3
    plant(data_dir, [(seeded_png(3000 + i), time.time() - 1) for i in range(n)])
    live = plant(data_dir, [(seeded_png(2999), time.time() + DAY)])[0]
    cmd = [sys.executable, str(ROOT / "cleanup.py"), "--config", str(config_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    removed = 0
    for out, _err in outs:
        if "skipped" not in out:
            removed += int(out.split("cleanup removed: ")[1].split(" expired")[0])
    assert removed == n
    assert image_rows(data_dir) == {live.md5: "png"}
    assert_consistent(data_dir)


# ---- serving continues during a large pass -------------------------------------

async def test_serving_keeps_answering_while_a_large_pass_runs(make_client, clock):
    client = await make_client(clock=clock)
    store = client.app[imgproxy.STORE]
    live = seeded_png(70)
    live_md5 = (await (await upload(client, live)).json())["md5"]
    n = 3000
    plant(client.data_dir, [(seeded_png(10_000 + i), clock() - 1) for i in range(n)])
    statuses: list[int] = []
    during_pass = 0
    cleanup = asyncio.create_task(imgproxy.run_cleanup_pass(store))
    while not cleanup.done():
        resp = await client.get(f"/i/{live_md5}.png")
        statuses.append(resp.status)
        assert await resp.read() == live
        if not cleanup.done():
            during_pass += 1
    report = await cleanup
    assert report.expired == n
    assert during_pass >= 1, "no GET was answered while the pass ran"
    assert set(statuses) == {200}
    assert image_rows(client.data_dir) == {live_md5: "png"}


async def test_uploads_during_a_pass_are_kept(make_client, clock):
    client = await make_client(clock=clock)
    store = client.app[imgproxy.STORE]
    plant(client.data_dir, [(seeded_png(20_000 + i), clock() - 1) for i in range(1500)])
    cleanup = asyncio.create_task(imgproxy.run_cleanup_pass(store))
    uploaded = {}
    i = 0
    while not cleanup.done() or i < 5:
        data = seeded_png(30_000 + i)
        resp = await upload(client, data)
        assert resp.status == 201
        uploaded[md5_of(data)] = data
        i += 1
    await cleanup
    assert set(image_rows(client.data_dir)) == set(uploaded)
    for md5, data in uploaded.items():
        resp = await client.get(f"/i/{md5}.png")
        assert resp.status == 200 and await resp.read() == data
    assert_consistent(client.data_dir)


# ---- crash safety -----------------------------------------------------------

class UploadStream:
    """Threads uploading distinct small PNGs to a server until told to stop or it dies."""

    def __init__(self, base_url: str, threads: int = 6):
        self.base_url = base_url
        self.ok: dict[str, bytes] = {}          # md5 -> bytes, for every 200/201 received
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counter = iter(range(100_000, 10**7))
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, worker: int) -> None:
        while not self.stop.is_set():
            with self.lock:
                seed = next(self.counter)
            data = seeded_png(seed)
            try:
                if worker % 2:
                    status, body = http_call("PUT", f"{self.base_url}/upload/w{seed}.png", data, ALICE)
                else:
                    status, body = self._multipart(data, seed)
            except (OSError, http.client.HTTPException):
                return                          # the server is gone
            if status in (200, 201):
                with self.lock:
                    self.ok[md5_of(data)] = data

    def _multipart(self, data: bytes, seed: int) -> tuple[int, bytes]:
        boundary = f"----b{seed}"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m{seed}.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        return http_call("POST", f"{self.base_url}/upload", body,
                    {**ALICE, "Content-Type": f"multipart/form-data; boundary={boundary}"})

    def count(self) -> int:
        with self.lock:
            return len(self.ok)

    def finish(self) -> dict[str, bytes]:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return dict(self.ok)


def start_stalled_upload(base_url: str, data_dir: Path, size: int) -> http.client.HTTPConnection:
    """A raw PUT that sends more than FLUSH_BYTES and then stalls, so a tmp/ file is open."""
    host, port = base_url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("PUT", "/upload/stalled.png")
    for k, v in ALICE.items():
        conn.putheader(k, v)
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    conn.send(b"\x89PNG\r\n\x1a\n" + os.urandom(imgproxy.FLUSH_BYTES + 200_000))
    poll(lambda: tmp_files(data_dir), 10, "the stalled upload's tmp file")
    return conn


def test_kill_9_during_uploads_then_one_pass_restores_every_invariant(make_config, server_process):
    config_path = make_config()
    data_dir = data_dir_of(config_path)
    server = server_process(config_path)
    stalled = start_stalled_upload(server.base_url, data_dir, 5 * imgproxy.FLUSH_BYTES)
    stream = UploadStream(server.base_url)
    poll(lambda: stream.count() >= 40, 30, "40 uploads answered")
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    answered = stream.finish()
    stalled.close()
    assert len(answered) >= 40
    leftovers = tmp_files(data_dir)
    assert leftovers, "the stalled upload should have left its tmp file"

    restarted = server_process(config_path)
    age_upload_claims(data_dir)                    # the dead node's claims on objects run out
    result = run_cleanup_py(config_path)           # while the restarted server runs
    assert result.returncode == 0, result.stderr
    assert "cleanup removed:" in result.stdout
    assert_consistent(data_dir)
    no_old_tmp(data_dir)
    assert not leftovers & tmp_files(data_dir)      # their writer died: the restart removed them
    for md5, data in answered.items():
        assert http_call("GET", f"{restarted.base_url}/i/{md5}.png") == (200, data), md5

    for p in tmp_files(data_dir):
        age(p, 2 * HOUR)
    result = run_cleanup_py(config_path)
    assert result.returncode == 0, result.stderr
    assert "0 temp files" in result.stdout
    assert tmp_files(data_dir) == set()
    assert_consistent(data_dir)
    status, body = http_call("PUT", f"{restarted.base_url}/upload/after.png", seeded_png(99), ALICE)
    assert status == 201
    assert restarted.terminate() == 0


def test_kill_9_during_a_cleanup_pass_then_rerun_restores_every_invariant(make_config):
    config_path = make_config()
    data_dir = data_dir_of(config_path)
    n = imgproxy.CLEANUP_BATCH * 4
    expired = plant(data_dir, [(seeded_png(200_000 + i), time.time() - 1) for i in range(n)],
                    holders=("alice", "carol"))
    first_batch = min(expired, key=lambda p: p.md5)     # the pass walks the expired rows in md5 order
    live = plant(data_dir, [(seeded_png(199_999), time.time() + DAY)])[0]
    proc = subprocess.Popen([sys.executable, str(ROOT / "cleanup.py"), "--config", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Kill as soon as the pass has visibly started unlinking: mid-batch or between batches.
        poll(lambda: proc.poll() is not None or not first_batch.path.exists(), 30, "the pass to start",
             step=0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the pass finished before it could be killed"
    remaining = image_rows(data_dir)
    assert len(remaining) > 1, "the kill came after the pass"

    result = run_cleanup_py(config_path)
    assert result.returncode == 0, result.stderr
    assert image_rows(data_dir) == {live.md5: "png"}
    assert db_rows(data_dir, "SELECT md5, username FROM holds") == [(live.md5, "alice")]
    assert_consistent(data_dir)
    no_old_tmp(data_dir)


# ---- cleanup.py -------------------------------------------------------------

@pytest.fixture
def damaged_site(make_config):
    """A config whose store has 2 expired images, 3 orphan files (2 and a foreign object left
    alone in a bucket), 1 dangling row, 1 old tmp file."""
    config_path = make_config()
    data_dir = data_dir_of(config_path)
    live = plant(data_dir, [(seeded_png(80), time.time() + DAY)])[0]
    expired = plant(data_dir, [(seeded_png(81), time.time() - 1), (seeded_png(82), time.time() - 1)])
    damage = plant_damage(data_dir, live.md5)
    damage["bytes"] += sum(len(p.data) for p in expired)
    return config_path, data_dir, live, expired, damage


def test_cleanup_py_prints_counts_and_removes(damaged_site):
    config_path, data_dir, live, expired, damage = damaged_site
    result = run_cleanup_py(config_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        f"cleanup removed: 2 expired images, {len(damage['orphans'])} orphan files, 1 dangling rows, 1 temp files, "
        f"{damage['bytes']} bytes")
    assert image_rows(data_dir) == {live.md5: "png"}
    assert damage["young_tmp"].exists() and not damage["old_tmp"].exists()
    assert_consistent(data_dir)
    verbose = run_cleanup_py(config_path, "--verbose")
    assert verbose.returncode == 0
    assert "cleanup removed: 0 expired images, 0 orphan files, 0 dangling rows, 0 temp files, 0 bytes" \
        in verbose.stdout


def test_cleanup_py_dry_run_removes_nothing_and_says_what_it_would(damaged_site):
    config_path, data_dir, live, expired, damage = damaged_site
    files, rows = upload_files(data_dir), image_rows(data_dir)
    holds, tmp = db_rows(data_dir, "SELECT * FROM holds ORDER BY 1, 2"), tmp_files(data_dir)
    result = run_cleanup_py(config_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == (f"cleanup would remove: 2 expired images, {len(damage['orphans'])} orphan files, 1 dangling rows, "
                         f"1 temp files, {damage['bytes']} bytes")
    assert all(line.startswith("would remove ") for line in lines[:-1]) and len(lines) == 1 + 2 + len(damage["orphans"]) + 1 + 1
    for p in (*damage["orphans"], damage["old_tmp"]):
        assert any(report_name(p) in line for line in lines)
    assert any(e.md5 in line for e in expired for line in lines)
    assert (upload_files(data_dir), image_rows(data_dir)) == (files, rows)
    assert (db_rows(data_dir, "SELECT * FROM holds ORDER BY 1, 2"), tmp_files(data_dir)) == (holds, tmp)
    assert db_rows(data_dir, "SELECT value FROM meta WHERE key='last_cleanup'") == []


def test_cleanup_py_reset_without_yes_and_without_a_terminal_exits_2(damaged_site):
    config_path, data_dir, *_ = damaged_site
    files, rows = upload_files(data_dir), image_rows(data_dir)
    result = run_cleanup_py(config_path, "--reset")
    assert result.returncode == 2
    assert "--yes" in result.stderr
    assert (upload_files(data_dir), image_rows(data_dir)) == (files, rows)


@pytest.mark.parametrize("answer, rc", [("no\n", 1), ("yes\n", 0)], ids=["declined", "confirmed"])
def test_cleanup_py_reset_asks_at_a_terminal(damaged_site, answer, rc):
    config_path, data_dir, *_, damage = damaged_site
    files = upload_files(data_dir)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cleanup.py"), "--config", str(config_path), "--reset"],
                                stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(controller, answer.encode())
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == rc, err
    assert "Type 'yes'" in out
    if rc:
        assert upload_files(data_dir) == files
    else:
        assert upload_files(data_dir) == set(damage["kept"]) and image_rows(data_dir) == {}


def test_cleanup_py_reset_yes_while_the_server_runs(make_config, server_process):
    config_path = make_config()
    data_dir = data_dir_of(config_path)
    server = server_process(config_path)
    images = {}
    for seed in (90, 91):
        data = seeded_png(seed)
        assert http_call("PUT", f"{server.base_url}/upload/r.png", data, BOB)[0] == 201
        images[md5_of(data)] = data
        assert http_call("GET", f"{server.base_url}/i/{md5_of(data)}.png") == (200, data)   # cached in memory
    (data_dir / "tmp" / "upload-aaaaaaaaaaaaaaaa.part").write_bytes(b"left over")

    result = run_cleanup_py(config_path, "--reset", "--yes")
    assert result.returncode == 0, result.stderr
    assert "reset done" in result.stdout
    assert image_rows(data_dir) == {}
    assert db_rows(data_dir, "SELECT COUNT(*) FROM holds") == [(0,)]
    assert upload_files(data_dir) == set()
    assert db_integrity(data_dir) == "ok"

    # The running server notices the other writer within its flush period.
    for md5 in images:
        poll(lambda: http_call("GET", f"{server.base_url}/i/{md5}.png")[0] == 404,
             imgproxy.COUNT_FLUSH_SECONDS * 2 + 3, "the server to drop reset images from its cache")
        assert http_call("GET", f"{server.base_url}/api/images/{md5}", headers=ALICE)[0] == 404
    assert http_call("GET", f"{server.base_url}/healthz")[0] == 200
    md5, data = next(iter(images.items()))
    assert http_call("PUT", f"{server.base_url}/upload/again.png", data, CAROL)[0] == 201
    assert http_call("GET", f"{server.base_url}/i/{md5}.png") == (200, data)
    assert server.terminate() == 0
    assert_consistent(data_dir)


def test_cleanup_py_repairs_under_a_running_server_which_then_stops_serving(make_config, server_process):
    config_path = make_config()
    data_dir = data_dir_of(config_path)
    server = server_process(config_path)
    keep, lost = seeded_png(92), seeded_png(93)
    for data in (keep, lost):
        assert http_call("PUT", f"{server.base_url}/upload/k.png", data, ALICE)[0] == 201
        assert http_call("GET", f"{server.base_url}/i/{md5_of(data)}.png") == (200, data)   # cached in memory
    stored_path(data_dir, md5_of(lost), "png").unlink()          # lost by hand
    result = run_cleanup_py(config_path)
    assert result.returncode == 0, result.stderr
    assert "1 dangling rows" in result.stdout
    poll(lambda: http_call("GET", f"{server.base_url}/i/{md5_of(lost)}.png")[0] == 404,
         imgproxy.COUNT_FLUSH_SECONDS * 2 + 3, "the server to notice the repair")
    assert http_call("GET", f"{server.base_url}/i/{md5_of(keep)}.png") == (200, keep)
    assert server.terminate() == 0
    assert_consistent(data_dir)


@pytest.mark.parametrize("content, args", [
    (None, ()),
    ("{not json", ()),
    ('{"cleanup": {"cleanup_time": "25:00:00"}}', ()),
    ('{"server": {"dta_dir": "x"}}', ()),
    (None, ("--reset", "--yes")),
    ("{not json", ("--dry-run",)),
], ids=["missing", "malformed", "bad-time", "unknown-key", "missing-reset", "malformed-dry-run"])
def test_cleanup_py_bad_config_exits_2(tmp_path, content, args):
    config_path = tmp_path / "config.json"
    if content is not None:
        config_path.write_text(content, encoding="utf-8")
    result = run_cleanup_py(config_path, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("cleanup.py: ") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_cleanup_py_unknown_option_exits_2(make_config):
    result = run_cleanup_py(make_config(), "--frobnicate")
    assert result.returncode == 2


@pytest.mark.sqlite_only   # a corrupt SQLite file
def test_cleanup_py_failure_exits_1(make_config):
    config_path = make_config()
    data_dir = data_dir_of(config_path)
    plant(data_dir, [(seeded_png(95), time.time() - 1)])
    for suffix in ("", "-wal", "-shm"):
        (data_dir / f"images.db{suffix}").unlink(missing_ok=True)
    (data_dir / "images.db").write_bytes(b"this is not a database" * 100)
    result = run_cleanup_py(config_path)
    assert result.returncode == 1
    assert result.stderr.startswith("cleanup.py: cleanup failed:")


# ---- access counts ------------------------------------------------------------

def access_count(data_dir: Path, md5: str) -> int:
    rows = db_rows(data_dir, "SELECT access_count FROM images WHERE md5 = ?", (md5,))
    return rows[0][0] if rows else -1


async def test_access_count_in_info_includes_unflushed_hits(make_client):
    client = await make_client()
    data = seeded_png(100)
    md5 = (await (await upload(client, data)).json())["md5"]
    for _ in range(3):
        assert (await client.get(f"/i/{md5}.png")).status == 200
    assert (await client.head(f"/i/{md5}.png")).status == 200           # HEAD is not a view
    assert (await client.get(f"/i/{md5}.png", headers={"If-None-Match": f'"{md5}"'})).status == 304
    info = await (await client.get(f"/api/images/{md5}", headers=ALICE)).json()
    assert info["access_count"] == 4
    await client.app[imgproxy.STORE].flush_counts()
    assert access_count(client.data_dir, md5) == 4
    info = await (await client.get(f"/api/images/{md5}", headers=ALICE)).json()
    assert info["access_count"] == 4                                     # not counted twice


def upload_and_view(base_url: str, data: bytes, views: int) -> str:
    """Upload `data` over HTTP and fetch it `views` times; returns its md5."""
    assert http_call("PUT", f"{base_url}/upload/c.png", data, ALICE)[0] == 201
    md5 = md5_of(data)
    for _ in range(views):
        assert http_call("GET", f"{base_url}/i/{md5}.png")[0] == 200
    return md5


def test_access_counts_reach_the_database_within_the_flush_delay(make_config, server_process):
    config_path = make_config()
    data_dir = data_dir_of(config_path)
    server = server_process(config_path)
    md5 = upload_and_view(server.base_url, seeded_png(101), 5)
    poll(lambda: access_count(data_dir, md5) == 5, imgproxy.COUNT_FLUSH_SECONDS + 3, "the flushed count",
         step=0.1)
    info = http_call("GET", f"{server.base_url}/api/images/{md5}", headers=ALICE)
    assert b'"access_count": 5' in info[1]


def test_access_counts_are_flushed_at_shutdown(make_config, server_process):
    config_path = make_config()
    data_dir = data_dir_of(config_path)
    server = server_process(config_path)
    md5 = upload_and_view(server.base_url, seeded_png(102), 7)
    assert server.terminate() == 0
    assert access_count(data_dir, md5) == 7


def test_counts_of_images_removed_meanwhile_do_not_break_the_flush(make_config, server_process):
    config_path = make_config()
    data_dir = data_dir_of(config_path)
    server = server_process(config_path)
    keep, gone = (upload_and_view(server.base_url, seeded_png(seed), 1) for seed in (103, 104))
    assert http_call("DELETE", f"{server.base_url}/api/images/{gone}", headers=ALICE)[0] == 204
    assert http_call("GET", f"{server.base_url}/i/{keep}.png")[0] == 200
    assert server.terminate() == 0
    assert access_count(data_dir, keep) == 2
    assert "Traceback" not in server.log
