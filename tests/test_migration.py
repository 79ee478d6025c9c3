"""Schema upgrade: a database made by the code before metadata removal (no
images.source_md5) opens with the new server, keeps every image working, and
gains the column and its index exactly once, however many processes start."""
from __future__ import annotations

import hashlib
import sqlite3
import threading
import time

import imgproxy
from conftest import ALICE, BOB
from helpers import photo_bytes, png_bytes, store_problems

# The schema as the server wrote it before this change (commit 51e101d), verbatim.
SCHEMA_BEFORE_SOURCE_MD5 = """
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


def old_database(data_dir, images: list[bytes]) -> list[str]:
    """A data folder as the old server left it: rows, holds and files; returns the md5s."""
    (data_dir / "uploads").mkdir(parents=True)
    db = sqlite3.connect(data_dir / "images.db")
    db.executescript(SCHEMA_BEFORE_SOURCE_MD5)
    db.execute("PRAGMA journal_mode = WAL")
    now = time.time()
    md5s = []
    for data in images:
        md5 = hashlib.md5(data).hexdigest()
        path = data_dir / "uploads" / md5[:2] / md5[2:4] / f"{md5}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        db.execute("INSERT INTO images VALUES (?, 'png', 'PNG', 'image/png', 'old.png', ?, 40, 30, 3, ?, ?)",
                   (md5, len(data), now - 60, now + 86400))
        db.execute("INSERT INTO holds VALUES (?, 'bob', ?)", (md5, now - 60))
        md5s.append(md5)
    db.commit()
    db.close()
    return md5s


def columns_and_indexes(data_dir) -> tuple[list[str], set[str]]:
    db = sqlite3.connect(data_dir / "images.db")
    try:
        cols = [row[1] for row in db.execute("PRAGMA table_info(images)")]
        indexes = {row[1] for row in db.execute("PRAGMA index_list(images)")}
        return cols, indexes
    finally:
        db.close()


async def test_old_database_opens_and_keeps_working(make_config, make_client):
    config_path = make_config(server={"base_url": "http://img.test"})
    data_dir = config_path.parent / "data"
    old = png_bytes((40, 30), (1, 2, 3))
    (md5,) = old_database(data_dir, [old])
    assert "source_md5" not in columns_and_indexes(data_dir)[0]

    client = await make_client(config_path)
    cols, indexes = columns_and_indexes(data_dir)
    assert cols.count("source_md5") == 1 and "images_source" in indexes

    info = await (await client.get(f"/api/images/{md5}", headers=BOB)).json()
    assert info["md5"] == md5 and info["access_count"] == 3 and "source_md5" not in info
    served = await client.get(f"/i/{md5}.png")
    assert served.status == 200 and await served.read() == old
    assert (await client.post(f"/api/images/{md5}/renew", headers=BOB)).status == 200
    again = await client.put("/upload/old.png", data=old, headers=ALICE)
    assert again.status == 200 and (await again.json())["status"] == "exists"

    # New uploads record their source on the upgraded table; old rows keep NULL.
    photo = photo_bytes("PNG")
    fresh = await (await client.put("/upload/new.png", data=photo, headers=BOB)).json()
    assert fresh["source_md5"] == hashlib.md5(photo).hexdigest()
    assert (await client.get(f"/api/images/{fresh['source_md5']}", headers=BOB)).status == 200
    db = sqlite3.connect(data_dir / "images.db")
    assert db.execute("SELECT source_md5 FROM images WHERE md5 = ?", (md5,)).fetchone() == (None,)
    db.close()
    assert (await client.delete(f"/api/images/{md5}", headers=BOB)).status == 204
    assert store_problems(data_dir) == []


def test_processes_upgrading_at_once_add_the_column_once(tmp_path):
    data_dir = tmp_path / "data"
    old_database(data_dir, [png_bytes(), png_bytes(color=(0, 0, 0))])
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_and_close() -> None:
        try:
            start.wait()
            imgproxy.open_write_db(data_dir / "images.db").close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_and_close) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    cols, indexes = columns_and_indexes(data_dir)
    assert cols.count("source_md5") == 1 and "images_source" in indexes
    # Opening an upgraded database again changes nothing.
    imgproxy.open_write_db(data_dir / "images.db").close()
    assert columns_and_indexes(data_dir) == (cols, indexes)
