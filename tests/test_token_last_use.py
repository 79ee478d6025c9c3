"""A token's last use stays visible while the batched write of it is in flight.

Uses are kept in memory and written every few seconds; a token list read while
that write waits for the database's write lock must still show the use (it used to
read "never used" for that moment). Another real process holds the write lock.
"""
from __future__ import annotations

import asyncio

import imgproxy
from conftest import BOB
from helpers import WriteLockHolder, bearer, create_token


async def listed_last_use(client) -> str | None:
    resp = await client.get("/api/tokens", headers=BOB)
    return (await resp.json())["tokens"][0]["last_used_at"]


async def test_last_use_is_listed_while_its_write_waits(make_client):
    client = await make_client()
    made = await create_token(client, BOB)
    assert (await client.get("/api/images", headers=bearer(made["token"]))).status == 200
    used = await listed_last_use(client)
    assert used is not None

    blocker = WriteLockHolder(client.data_dir)
    try:
        flush = asyncio.create_task(client.app[imgproxy.STORE].flush_token_use())
        await asyncio.sleep(0.3)
        assert not flush.done()                     # the write waits for the lock
        assert await listed_last_use(client) == used
    finally:
        blocker.release()
    await flush
    assert await listed_last_use(client) == used   # now from the database
