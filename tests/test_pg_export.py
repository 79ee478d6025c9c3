"""GET /api/db when the metadata lives in PostgreSQL: an SQLite file of the same
tables, copied at one consistent moment even while uploads commit."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from conftest import ALICE, BOB
from helpers import create_token, seeded_png

pytest.importorskip("asyncpg", reason="the PostgreSQL backend needs asyncpg: pip install asyncpg")


async def test_api_db_from_postgresql_is_one_consistent_moment(make_client, pg_engine, tmp_path):
    client = await make_client(database={"url": pg_engine.new_database()})
    await create_token(client, ALICE, "exported")
    stop = asyncio.Event()
    uploaded = 0

    async def uploads(who: dict, seed: int) -> None:
        nonlocal uploaded
        while not stop.is_set():
            resp = await client.put(f"/upload/{seed}.png", data=seeded_png(seed), headers=who)
            assert resp.status == 201, await resp.text()
            uploaded += 1
            seed += 2

    writers = [asyncio.create_task(uploads(ALICE, 0)), asyncio.create_task(uploads(BOB, 1))]
    try:
        counts = []
        for i in range(10):
            resp = await client.get("/api/db", headers=ALICE)
            assert resp.status == 200
            target = tmp_path / f"export{i}.db"
            target.write_bytes(await resp.read())
            con = sqlite3.connect(target)
            try:
                assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                # Images are copied before holds: read at different moments, holds of
                # images committed in between would name rows the copy does not have.
                assert con.execute("SELECT COUNT(*) FROM holds WHERE md5 NOT IN (SELECT md5 FROM images)"
                                   ).fetchone() == (0,)
                assert con.execute("SELECT COUNT(*) FROM images WHERE md5 NOT IN (SELECT md5 FROM holds)"
                                   ).fetchone() == (0,)
                columns = {row[1] for row in con.execute("PRAGMA table_info(images)")}
                assert {"md5", "source_md5", "access_count", "expire_at"} <= columns
                assert con.execute("SELECT name, length(secret_sha256) FROM tokens").fetchall() == [("exported", 32)]
                counts.append(con.execute("SELECT COUNT(*) FROM images").fetchone()[0])
            finally:
                con.close()
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*writers)
    assert counts == sorted(counts) and counts[-1] > counts[0], counts  # the copies saw uploads land
    assert uploaded > 0
    assert list((client.data_dir / "tmp").iterdir()) == []
