"""Moving house: `imgproxy.py move --config FROM --to TO` between files+SQLite and
S3+PostgreSQL (the real SeaweedFS and PostgreSQL of tests/engines.py), run as the
operator runs it, as a child process. Installations are made through the real
server's API; the target is checked by a real server serving it."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imgproxy
from conftest import ALICE, BOB, ROOT, FakeClock
from helpers import bearer, create_token, noise_png, photo_bytes, png_bytes, poll, seeded_png, store_problems

SUMMARY_RE = re.compile(r"move (done|INCOMPLETE): (\d+) copied(?: \((\d+) replaced wrong bytes\))?, "
                        r"(\d+) already there, (\d+) verified, (\d+) failed of (\d+) images; (\d+) new rows")


def needs_drivers() -> None:
    pytest.importorskip("asyncpg", reason="the PostgreSQL backend needs asyncpg: pip install asyncpg")
    pytest.importorskip("aiobotocore", reason="the S3 backend needs aiobotocore: pip install aiobotocore")


@pytest.fixture
def cluster_config(make_config, s3_engine, pg_engine):
    """cluster_config() -> the path of a new config on S3 + PostgreSQL: its own
    bucket, its own database, its own data folder."""
    needs_drivers()

    def make() -> Path:
        bucket = s3_engine.new_bucket()
        return with_engines(make_config(), storage=s3_engine.storage_config(bucket),
                            database={"url": pg_engine.new_database()})

    return make


def with_engines(config_path: Path, **sections: dict) -> Path:
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    raw.update(sections)
    config_path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
    return config_path


def run_move(source: Path, target: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "imgproxy.py"), "move", "--config", str(source),
                           "--to", str(target)], capture_output=True, text=True, timeout=timeout)


def summary(result: subprocess.CompletedProcess) -> dict[str, int]:
    """The counts of the final line (which must be the last line of stdout)."""
    last = result.stdout.strip().splitlines()[-1]
    m = SUMMARY_RE.match(last)
    assert m, f"no summary line: {result.stdout}\n{result.stderr}"
    return {"done": m[1] == "done", "copied": int(m[2]), "replaced": int(m[3] or 0), "already": int(m[4]),
            "verified": int(m[5]), "failed": int(m[6]), "images": int(m[7]), "rows_new": int(m[8])}


def folder_state(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`, with the MD5 of each file's bytes."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def data_dir_of(config_path: Path) -> Path:
    return imgproxy.load_config(config_path).server.data_dir


async def upload(client, data: bytes, who: dict, name: str = "x.png") -> dict:
    resp = await client.put(f"/upload/{name}", data=data, headers=who)
    assert resp.status in (200, 201), await resp.text()
    return await resp.json()


async def served_bytes(client, info: dict) -> bytes:
    resp = await client.get(f"/i/{info['md5']}.{info['url'].rsplit('.', 1)[1]}")
    assert resp.status == 200, await resp.text()
    return await resp.read()


async def make_installation(make_client, config_path: Path) -> dict:
    """An installation made through the server's API: images of two users (one
    held by both), a photo whose metadata removal gives it a source_md5, a
    token, an expired image, and some views."""
    made = {"images": {}}
    past = FakeClock(time.time() - 40 * 86400)   # its uploads expired ten days ago
    old = await make_client(config_path=config_path, clock=past)
    made["expired"] = await upload(old, png_bytes((9, 9), (1, 1, 1)), BOB, "old.png")
    await old.close()

    client = await make_client(config_path=config_path)
    for i in range(4):
        info = await upload(client, seeded_png(1000 + i, (20 + i, 10)), BOB, f"bob{i}.png")
        made["images"][info["md5"]] = info
    shared = await upload(client, seeded_png(1000, (20, 10)), ALICE, "same.png")   # bob's first, held by alice too
    assert shared["status"] == "exists"
    photo = await upload(client, photo_bytes("JPEG"), ALICE, "photo.jpg")
    assert photo["source_md5"] != photo["md5"]   # stored without its GPS: another digest
    made["photo"] = photo
    made["images"][photo["md5"]] = photo
    big = await upload(client, noise_png(300_000, seed=3), ALICE, "big.png")
    made["images"][big["md5"]] = big
    made["token"] = (await create_token(client, BOB, "laptop"))["token"]
    assert (await client.get("/api/images", headers=bearer(made["token"]))).status == 200
    for _ in range(3):
        await served_bytes(client, photo)
    await client.close()   # flushes the access counts and the token's last use
    return made


def source_bytes(data_dir: Path, info: dict) -> bytes:
    md5, ext = info["md5"], info["url"].rsplit(".", 1)[1]
    return (data_dir / "uploads" / md5[:2] / md5[2:4] / f"{md5}.{ext}").read_bytes()


# ---- files + SQLite -> S3 + PostgreSQL, and what the target then serves ------------

async def test_files_sqlite_moves_to_s3_postgres_untouched_verified_and_idempotent(make_client, make_config,
                                                                                    cluster_config):
    source = make_config()
    made = await make_installation(make_client, source)
    source_dir = data_dir_of(source)
    before = folder_state(source_dir)
    target = cluster_config()

    first = await asyncio.to_thread(run_move, source, target)
    assert first.returncode == 0, first.stdout + first.stderr
    counts = summary(first)
    n = len(made["images"])
    assert counts == {"done": True, "copied": n, "replaced": 0, "already": 0, "verified": n, "failed": 0,
                      "images": n, "rows_new": n}
    assert "1 expired left behind" in first.stdout and "variants not copied" in first.stdout
    assert "Traceback" not in first.stderr
    assert folder_state(source_dir) == before   # not a byte, not a file more (no -wal, no -shm)

    client = await make_client(config_path=target)
    photo = made["photo"]
    looked_up = await (await client.get(f"/api/images/{photo['source_md5']}", headers=BOB)).json()
    assert looked_up["md5"] == photo["md5"] and looked_up["source_md5"] == photo["source_md5"]
    assert looked_up["access_count"] == 3 and looked_up["expire_at"] == photo["expire_at"]
    for info in made["images"].values():
        assert await served_bytes(client, info) == source_bytes(source_dir, info)
    assert (await client.get(f"/api/images/{made['expired']['md5']}", headers=BOB)).status == 404
    # The token came as its digest and still opens the door; each user sees their own holds.
    mine = await (await client.get("/api/images", headers=bearer(made["token"]))).json()
    assert {i["md5"] for i in mine["images"]} == {m for m, i in made["images"].items() if i["name"].startswith("bob")}
    assert (await (await client.get("/api/images", headers=ALICE)).json())["total"] == len(made["images"])
    # Alice's hold came too: Bob letting go of the image they share leaves it served.
    shared = next(i for i in made["images"].values() if i["name"] == "bob0.png")
    assert (await client.delete(f"/api/images/{shared['md5']}", headers=BOB)).status == 204
    assert await served_bytes(client, shared) == source_bytes(source_dir, shared)
    tokens = await (await client.get("/api/tokens", headers=BOB)).json()
    assert [t["name"] for t in tokens["tokens"]] == ["laptop"] and tokens["tokens"][0]["last_used_at"]
    await client.close()

    second = await asyncio.to_thread(run_move, source, target)
    assert second.returncode == 0, second.stdout + second.stderr
    assert summary(second) == {"done": True, "copied": 0, "replaced": 0, "already": n, "verified": n,
                               "failed": 0, "images": n, "rows_new": 0}
    assert folder_state(source_dir) == before


async def test_wrong_bytes_already_under_a_key_at_the_target_are_replaced(make_client, make_config,
                                                                          cluster_config, s3_engine):
    source = make_config()
    client = await make_client(config_path=source)
    infos = [await upload(client, seeded_png(2000 + i), BOB, f"{i}.png") for i in range(3)]
    await client.close()
    target = cluster_config()
    st = imgproxy.load_config(target).storage
    victim = infos[1]
    key = imgproxy.image_key(victim["md5"], "png")
    status, _ = s3_engine.request("PUT", f"/{st.bucket}/{key}", b"not the image at all")
    assert status == 200

    result = await asyncio.to_thread(run_move, source, target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(result)["replaced"] == 1 and summary(result)["verified"] == 3
    assert f"{victim['md5']}.png: wrong bytes at the target" in result.stderr
    status, body = s3_engine.request("GET", f"/{st.bucket}/{key}")
    assert status == 200 and hashlib.md5(body).hexdigest() == victim["md5"]


async def noise_installation(make_client, make_config, count: int, size: int) -> tuple[Path, list[dict]]:
    """A files + SQLite installation of `count` distinct uploads of about `size` bytes."""
    source = make_config()
    client = await make_client(config_path=source)
    infos = [await upload(client, noise_png(size, seed=100 + i), BOB, f"{i}.png") for i in range(count)]
    await client.close()
    return source, infos


async def move_past_first_batch(source: Path, target: Path, total: int) -> subprocess.Popen:
    """A move as a child process, returned once its first batch is recorded (its progress line)."""
    mover = subprocess.Popen([sys.executable, str(ROOT / "imgproxy.py"), "move", "--config", str(source),
                              "--to", str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_batch = await asyncio.to_thread(lambda: [mover.stdout.readline() for _ in range(2)][-1])
        assert f"{imgproxy.MOVE_BATCH}/{total} images" in first_batch, first_batch
    except BaseException:
        mover.kill()
        mover.wait(30)
        raise
    return mover


async def test_kill_9_mid_move_then_a_second_run_completes(make_client, make_config, cluster_config, pg_engine):
    total = 3 * imgproxy.MOVE_BATCH
    source, infos = await noise_installation(make_client, make_config, total, 40_000)
    target = cluster_config()

    mover = await move_past_first_batch(source, target, total)
    try:
        mover.send_signal(signal.SIGKILL)   # while the next batches are on their way
    finally:
        mover.kill()
        mover.wait(30)

    # No row at the target names a missing object, and the kill came mid-way.
    config = imgproxy.load_config(target)
    store = await imgproxy.ImageStore(config).open(listen=False)
    try:
        async with store.db_read.execute("SELECT md5, ext FROM images") as cur:
            rows = [(r["md5"], r["ext"]) for r in await cur.fetchall()]
        objects = {key async for key, _, _ in store.blobs.list("")}
    finally:
        await store.close()
    assert imgproxy.MOVE_BATCH <= len(rows) < total
    assert {imgproxy.image_key(m, e) for m, e in rows} <= objects

    again = await asyncio.to_thread(run_move, source, target)
    assert again.returncode == 0, again.stdout + again.stderr
    counts = summary(again)
    assert counts["verified"] == total and counts["failed"] == 0
    assert counts["already"] >= len(rows) and counts["copied"] == total - counts["already"]
    target_client = await make_client(config_path=target)
    for info in infos[::7]:
        assert await served_bytes(target_client, info) == source_bytes(data_dir_of(source), info)
    listed = await (await target_client.get("/api/images?limit=1", headers=ALICE)).json()
    assert listed["total"] == total
    await target_client.close()


async def test_object_store_lost_mid_move_is_one_line_exit_1_and_a_rerun_completes(make_client, make_config,
                                                                                  cluster_config, s3_engine):
    total = 4 * imgproxy.MOVE_BATCH
    source, infos = await noise_installation(make_client, make_config, total, 60_000)
    target = cluster_config()
    mover = await move_past_first_batch(source, target, total)
    try:
        s3_engine.stop(kill=True)   # the store dies under the move
        out, err = await asyncio.to_thread(mover.communicate, timeout=120)
    finally:
        mover.kill()
        s3_engine.start()
    assert mover.returncode == 1, out + err
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if "move stopped" in line]
    assert len(stopped) == 1 and "run the same command again" in stopped[0], err
    counts = summary(subprocess.CompletedProcess([], 1, out, err))
    assert not counts["done"] and counts["verified"] + counts["failed"] == total and counts["failed"] > 0

    # SeaweedFS answers 500 for a moment after a restart from SIGKILL: wait until an
    # object of the first batch (the lowest md5 goes first) reads back again.
    first_key = imgproxy.image_key(min(i["md5"] for i in infos), "png")
    bucket = imgproxy.load_config(target).storage.bucket
    await asyncio.to_thread(poll, lambda: s3_engine.request("GET", f"/{bucket}/{first_key}")[0] == 200,
                            60, "SeaweedFS serving reads again")
    again = await asyncio.to_thread(run_move, source, target)
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary(again)["verified"] == total

# ---- and back: S3 + PostgreSQL -> files + SQLite -------------------------------------

async def cluster_state(config_path: Path) -> tuple:
    """Every object (key, size, time, MD5 of its bytes) and every row of every table
    of an S3 + PostgreSQL installation, read with clients of the test's own."""
    import asyncpg
    config = imgproxy.load_config(config_path)
    st = config.storage
    blobs = imgproxy.S3Blobs(st.endpoint, st.bucket, st.region, st.prefix, st.access_key_id, st.secret_access_key)
    await blobs.open()
    try:
        objects = [(key, size, modified, hashlib.md5(await blobs.read(key)).hexdigest())
                   async for key, size, modified in blobs.list("")]
    finally:
        await blobs.close()
    conn = await asyncpg.connect(config.database.url)
    try:
        tables = {name: sorted(tuple(r) for r in await conn.fetch(f"SELECT * FROM {name}"))
                  for name in ("images", "holds", "tokens", "meta", "claims")}
    finally:
        await conn.close()
    return objects, tables


async def test_s3_postgres_moves_back_to_files_sqlite(make_client, make_config, cluster_config):
    source = cluster_config()
    made = await make_installation(make_client, source)
    cluster = await make_client(config_path=source)
    originals = {m: await served_bytes(cluster, info) for m, info in made["images"].items()}
    await cluster.close()
    target = make_config()
    before = await cluster_state(source)

    result = await asyncio.to_thread(run_move, source, target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert await cluster_state(source) == before   # the bucket and every table as they were
    n = len(made["images"])
    assert summary(result)["copied"] == n and summary(result)["verified"] == n
    target_dir = data_dir_of(target)
    assert store_problems(target_dir) == []
    assert sorted(m for (m,) in sqlite3.connect(target_dir / "images.db").execute("SELECT md5 FROM images")) \
        == sorted(made["images"])
    assert list((target_dir / "tmp").iterdir()) == []   # the staged copies were renamed into place

    client = await make_client(config_path=target)
    for md5, info in made["images"].items():
        assert await served_bytes(client, info) == originals[md5]
    photo = made["photo"]
    assert (await (await client.get(f"/api/images/{photo['source_md5']}", headers=BOB)).json())["md5"] == photo["md5"]
    assert (await client.get("/api/images", headers=bearer(made["token"]))).status == 200
    await client.close()
    assert summary(await asyncio.to_thread(run_move, source, target))["copied"] == 0


# ---- without the engines: files + SQLite to files + SQLite, failures and refusals ------

async def test_missing_or_damaged_source_bytes_fail_those_images_and_exit_1(make_client, make_config):
    source = make_config()
    client = await make_client(config_path=source)
    infos = [await upload(client, seeded_png(3000 + i), BOB, f"{i}.png") for i in range(4)]
    await client.close()
    source_dir = data_dir_of(source)
    path_of = {i["md5"]: source_dir / "uploads" / i["md5"][:2] / i["md5"][2:4] / f"{i['md5']}.png" for i in infos}
    path_of[infos[0]["md5"]].unlink()
    path_of[infos[1]["md5"]].write_bytes(b"rotten")
    target = make_config()
    wrong = data_dir_of(target) / "uploads" / infos[2]["md5"][:2] / infos[2]["md5"][2:4]
    wrong.mkdir(parents=True)
    (wrong / f"{infos[2]['md5']}.png").write_bytes(b"wrong bytes at the target")

    result = await asyncio.to_thread(run_move, source, target)
    assert result.returncode == 1, result.stdout + result.stderr
    counts = summary(result)
    assert counts["failed"] == 2 and counts["copied"] == 2 and counts["replaced"] == 1 and not counts["done"]
    assert f"{infos[0]['md5']}.png: missing at the source" in result.stderr
    assert f"{infos[1]['md5']}.png: its bytes at the source have MD5" in result.stderr
    assert "Traceback" not in result.stderr
    assert store_problems(data_dir_of(target)) == []   # no row for what failed; the wrong file replaced
    assert {m for (m,) in sqlite3.connect(data_dir_of(target) / "images.db").execute("SELECT md5 FROM images")} \
        == {infos[2]["md5"], infos[3]["md5"]}


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_the_same_store_on_both_sides_is_refused(make_config):
    source = make_config()
    same_folder = make_config(server={"data_dir": str(data_dir_of(source))})
    line = one_line_error(run_move(source, same_folder))
    assert "--to: FROM and TO share the data folder" in line
    assert not data_dir_of(source).exists()   # refused before anything was made


def test_no_installation_at_the_source_is_a_config_error(make_config):
    line = one_line_error(run_move(make_config(), make_config()))
    assert "server.data_dir: no images.db" in line


@pytest.mark.parametrize("engine", ["s3", "postgresql"])
def test_an_unreachable_engine_is_one_line_and_exit_2(make_config, engine):
    needs_drivers()
    import socket
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = make_config()
    if engine == "s3":
        target = with_engines(make_config(), storage={"backend": "s3", "endpoint": f"http://127.0.0.1:{port}",
                                                      "bucket": "nowhere", "access_key_id": "k",
                                                      "secret_access_key": "s"})
    else:
        target = with_engines(make_config(), database={"url": f"postgresql://u:secret@127.0.0.1:{port}/db"})
    (data_dir_of(source)).mkdir()
    sqlite3.connect(data_dir_of(source) / "images.db").executescript(imgproxy.SCHEMA)
    line = one_line_error(run_move(source, target))
    assert ("storage.endpoint: cannot reach" if engine == "s3" else "database.url: cannot use") in line
    assert "secret" not in line


def test_help_says_variants_are_not_copied():
    result = subprocess.run([sys.executable, str(ROOT / "imgproxy.py"), "move", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Variants are NOT copied" in result.stdout



async def test_a_running_source_server_keeps_serving_and_a_second_run_catches_up(make_client, make_config):
    source = make_config()
    client = await make_client(config_path=source)   # stays up: its database has a -wal meanwhile
    first = await upload(client, seeded_png(4000), BOB, "first.png")
    target = make_config()
    result = await asyncio.to_thread(run_move, source, target)
    assert result.returncode == 0 and summary(result)["copied"] == 1, result.stdout + result.stderr

    later = await upload(client, seeded_png(4001), BOB, "later.png")   # after the first run
    assert await served_bytes(client, first) == source_bytes(data_dir_of(source), first)
    result = await asyncio.to_thread(run_move, source, target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (summary(result)["copied"], summary(result)["already"]) == (1, 1)
    await client.close()
    assert store_problems(data_dir_of(target)) == []
    moved = await make_client(config_path=target)
    assert await served_bytes(moved, later) == source_bytes(data_dir_of(source), later)
    await moved.close()


async def test_an_older_database_without_source_md5_or_tokens_moves(make_config):
    source = make_config()
    data_dir = data_dir_of(source)
    body = png_bytes((7, 5), (9, 8, 7))
    md5 = hashlib.md5(body).hexdigest()
    (data_dir / "uploads" / md5[:2] / md5[2:4]).mkdir(parents=True)
    (data_dir / "uploads" / md5[:2] / md5[2:4] / f"{md5}.png").write_bytes(body)
    with sqlite3.connect(data_dir / "images.db") as db:   # the schema of the first release
        db.executescript(imgproxy.SCHEMA)
        db.execute(f"INSERT INTO images ({imgproxy.IMAGE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                   (md5, "png", "PNG", "image/png", "old.png", len(body), 7, 5, 2, time.time(), time.time() + 3600))
        db.execute("INSERT INTO holds VALUES (?, 'bob', ?)", (md5, time.time()))
    db.close()
    target = make_config()
    result = await asyncio.to_thread(run_move, source, target)
    assert result.returncode == 0 and summary(result)["copied"] == 1, result.stdout + result.stderr
    rows = sqlite3.connect(data_dir_of(target) / "images.db").execute(
        "SELECT md5, name, access_count, source_md5 FROM images").fetchall()
    assert rows == [(md5, "old.png", 2, None)]
    assert store_problems(data_dir_of(target)) == []


async def test_the_same_bucket_or_database_under_another_name_is_refused(cluster_config, make_config, make_client,
                                                                         pg_engine):
    source = cluster_config()
    await (await make_client(config_path=source)).close()   # an installation: its tables exist
    config = imgproxy.load_config(source)
    same_bucket = with_engines(make_config(), storage=json.loads(source.read_text())["storage"])
    assert "share bucket" in one_line_error(await asyncio.to_thread(run_move, source, same_bucket))
    # The same database reached through its unix socket instead of 127.0.0.1: told
    # apart by the server's own identity, not by the URL.
    database = config.database.url.rsplit("/", 1)[1]
    socket_url = (f"postgresql://{pg_engine.user}:{pg_engine.password}@/{database}"
                  f"?host={pg_engine.folder}&port={pg_engine.port}")
    same_database = with_engines(make_config(), database={"url": socket_url})
    line = one_line_error(await asyncio.to_thread(run_move, source, same_database))
    assert "FROM and TO name the same PostgreSQL database" in line
    assert not data_dir_of(same_database).exists()   # refused before the target was opened
