"""The --stack machinery itself: configs get the stack's backends, and the helpers
that look inside a store see the same things on S3 + PostgreSQL as on files + SQLite.

These run in every suite (on the default stack they make their own bucket and
database; without the engines they skip), so a broken helper cannot make a
--stack s3pg run pass by looking at an empty folder.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys

import pytest

import imgproxy
from conftest import ALICE, BOB, ROOT
from helpers import (WriteLockHolder, bearer, create_token, db_rows, db_write, http_call, png_bytes, site_stack,
                     store_image, store_problems, stored_files, stored_path)


def test_the_default_stack_writes_plain_configs(make_config, request):
    if request.config.getoption("--stack") != "files":
        pytest.skip("about the default stack")
    raw = json.loads(make_config().read_text())
    assert "storage" not in raw and "database" not in raw
    assert site_stack(ROOT / "nowhere") == site_stack(make_config().parent / "data")


def test_helpers_look_inside_an_s3_and_postgresql_site(make_config, live_server, s3_engine, pg_engine):
    storage = s3_engine.storage_config(s3_engine.new_bucket(), prefix="helpers/")
    config = make_config(storage=storage, database={"url": pg_engine.new_database()})
    raw = json.loads(config.read_text())
    assert raw["storage"]["prefix"] == "helpers/" and raw["database"]["url"].startswith("postgresql://")
    server = live_server(config)
    data_dir = server.data_dir
    data = png_bytes((30, 20), (4, 5, 6))
    status, body = http_call("PUT", server.base_url + "/upload/a.png", data, ALICE)
    assert status == 201, body
    md5 = hashlib.md5(data).hexdigest()

    # Nothing on the local disk: what the helpers see comes from the bucket and PostgreSQL.
    assert not any((data_dir / "uploads").rglob("*.png")) and not (data_dir / "images.db").exists()
    path = data_dir / "uploads" / md5[:2] / md5[2:4] / f"{md5}.png"
    assert stored_files(data_dir) == [path]
    assert stored_files(data_dir)[0].read_bytes() == data
    assert stored_path(data_dir, md5, "png").exists()
    assert db_rows(data_dir) == [(md5,)]
    assert db_rows(data_dir, "SELECT username FROM holds WHERE md5 = ?", (md5,)) == [("alice",)]
    assert store_problems(data_dir) == []

    # What a crash could leave is reported, as on files.
    stray = hashlib.md5(b"stray").hexdigest()
    store_image(data_dir, stray, "png", b"not the bytes its name says")
    assert sorted(store_problems(data_dir)) == [f"file without row: {stray}.png",
                                                f"partial or corrupt file: {data_dir / 'uploads' / stray[:2] / stray[2:4] / f'{stray}.png'}"]
    stored_path(data_dir, stray, "png").unlink()
    db_write(data_dir, "DELETE FROM holds WHERE md5 = ?", (md5,))
    assert db_rows(data_dir, "SELECT COUNT(*) FROM holds") == [(0,)]
    assert store_problems(data_dir) == []


async def test_write_lock_holder_holds_up_postgresql_writers(make_client, pg_engine):
    client = await make_client(database={"url": pg_engine.new_database()})
    holder = WriteLockHolder(client.data_dir)
    try:
        write = asyncio.create_task(client.app[imgproxy.STORE].set_meta("probe", "1"))
        await asyncio.sleep(0.3)
        assert not write.done()
    finally:
        holder.release()
    await write
    assert db_rows(client.data_dir, "SELECT value FROM meta WHERE key = 'probe'") == [("1",)]


def test_a_stack_without_its_engine_stops_the_run_at_once(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "IMGPROXY_PG_BINDIR": str(tmp_path / "no-postgresql")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--stack", "pg", "-p", "no:randomly",
                             str(ROOT / "tests" / "test_stack.py")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 4, result.stdout + result.stderr   # a usage error, before any test
    assert "--stack pg: PostgreSQL is not installed" in result.stderr
    assert "passed" not in result.stdout and "skipped" not in result.stdout


# ---- server bugs the first --stack s3pg run found (kept in every run) ------------------

async def test_access_counts_and_token_use_reach_postgresql(make_client, pg_engine):
    client = await make_client(database={"url": pg_engine.new_database()})
    made = await create_token(client, BOB)
    resp = await client.put("/upload/a.png", data=png_bytes((9, 9), (1, 9, 1)), headers=bearer(made["token"]))
    md5 = (await resp.json())["md5"]
    for _ in range(3):
        assert (await client.get(f"/i/{md5}.png")).status == 200
    store = client.app[imgproxy.STORE]
    await store.flush_counts()
    await store.flush_token_use()
    assert db_rows(client.data_dir, "SELECT access_count FROM images") == [(3,)]
    assert db_rows(client.data_dir, "SELECT COUNT(*) FROM tokens WHERE last_used_at IS NOT NULL") == [(1,)]


async def test_a_pass_removes_a_stale_object_beside_the_live_one(make_client, s3_engine):
    """Two objects of one md5 (the row names .png, a crash left a .jpg): the stale one goes."""
    storage = s3_engine.storage_config(s3_engine.new_bucket(), prefix="stale/")
    client = await make_client(storage=storage)
    data = png_bytes((9, 9), (2, 8, 2))
    md5 = (await (await client.put("/upload/a.png", data=data, headers=ALICE)).json())["md5"]
    stale = store_image(client.data_dir, md5, "jpg", b"a copy under another extension")
    report = await imgproxy.run_cleanup_pass(client.app[imgproxy.STORE])
    assert (report.orphan_files, report.dangling_rows) == (1, 0)
    assert not stale.exists() and stored_path(client.data_dir, md5, "png").read_bytes() == data
    assert store_problems(client.data_dir) == []
