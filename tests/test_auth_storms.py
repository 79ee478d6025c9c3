"""Sign-in storms and timing (issue 15, items 3 and 4): a burst of guesses from one
address gets about AUTH_FAIL_LIMIT verdicts and the rest 429; password hashing has
its own threads, so /healthz and file reads never queue behind it; the block lasts
exactly what Retry-After says; and every failed check costs the same whichever
kind of user it names, in a config that mixes plain and hashed passwords."""
from __future__ import annotations

import asyncio
import base64
import collections
import statistics
import time

import pytest

import imgproxy
from conftest import ALICE, basic


def hashed(password: str, n: int) -> str:
    """A password_hash made with scrypt N = n (as an older config may hold)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imgproxy, "SCRYPT_N", n)
        return imgproxy.hash_password(password)


def hashed_users(n: int = 2**11) -> list[dict]:
    return [{"username": "alice", "password_hash": hashed("alice123", n), "role": "admin"},
            {"username": "bob", "password": "bob123"}]


# ---- storms ---------------------------------------------------------------------------

@pytest.mark.parametrize("user", ["alice", "nobody-made-up"])
async def test_a_burst_of_concurrent_guesses_gets_about_limit_verdicts(make_client, user):
    client = await make_client(users=hashed_users())
    statuses = await asyncio.gather(*[
        client.get("/api/images", headers=basic(user, f"guess-{i}")) for i in range(300)])
    counts = collections.Counter(resp.status for resp in statuses)
    assert set(counts) == {401, 429}, counts
    assert counts[401] <= imgproxy.AUTH_FAIL_LIMIT, counts
    for resp in statuses:
        if resp.status == 429:
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["code"] == "rate_limited"
    # and the address is blocked now, even with the right password
    assert (await client.get("/api/images", headers=ALICE)).status == 429


async def test_identical_concurrent_sign_ins_share_one_check(make_client):
    """A client opening many connections at once with the right password is
    not refused: one check serves them all."""
    client = await make_client(users=hashed_users(2**14))
    statuses = await asyncio.gather(*[client.get("/api/images", headers=ALICE) for _ in range(40)])
    assert {resp.status for resp in statuses} == {200}


async def test_healthz_answers_during_a_storm_of_made_up_users(make_client):
    """Guesses from many addresses (no limiter can stop them) queue for the
    password threads only; /healthz and file reads use other threads."""
    client = await make_client(users=hashed_users(2**12), server={"trust_forwarded_for": True})
    guesses = [asyncio.ensure_future(client.get(
        "/api/images", headers={**basic(f"made-up-{i}", "x"), "X-Forwarded-For": f"10.0.{i // 250}.{i % 250}"}))
        for i in range(80)]  # fewer than the test client's 100 connections: /healthz gets one
    await asyncio.sleep(0.3)  # the storm is queued now
    health = await client.get("/healthz")
    assert health.status == 200
    unanswered = sum(not g.done() for g in guesses)
    assert unanswered >= 40, f"/healthz waited for {80 - unanswered} of 80 password checks"
    assert {(await g).status for g in guesses} == {401}


# ---- the limiter's timeline -------------------------------------------------------------

async def test_limiter_timeline(make_client, clock):
    client = await make_client()
    client.app[imgproxy.AUTH].clock = clock
    limit = imgproxy.AUTH_FAIL_LIMIT

    async def status(headers) -> tuple[int, int]:
        resp = await client.get("/api/images", headers=headers)
        return resp.status, int(resp.headers.get("Retry-After", 0))

    wrong = basic("alice", "wrong")
    # failures older than the window do not count
    for _ in range(limit - 1):
        assert await status(wrong) == (401, 0)
    clock.advance(imgproxy.AUTH_FAIL_WINDOW + 0.01)
    assert await status(wrong) == (401, 0)
    assert await status(ALICE) == (200, 0)
    # limit failures within the window: blocked from the failure that tripped it
    for _ in range(limit - 2):
        assert await status(wrong) == (401, 0)
    clock.advance(imgproxy.AUTH_FAIL_WINDOW - 1)
    assert await status(wrong) == (401, 0)  # the limit-th failure in 60 s
    code, retry_after = await status(ALICE)
    assert code == 429
    assert retry_after == imgproxy.AUTH_BLOCK_SECONDS  # the whole block, from the tripping failure
    clock.advance(retry_after / 2)
    assert await status(ALICE) == (429, retry_after / 2)  # it counts down
    clock.advance(retry_after / 2 - 0.5)
    assert await status(ALICE) == (429, 1)
    clock.advance(0.5)
    # a client that obeyed Retry-After is let in, and stays in
    assert await status(ALICE) == (200, 0)
    clock.advance(1)
    assert await status(ALICE) == (200, 0)
    # after the block the count starts again from zero
    for _ in range(limit - 1):
        assert await status(wrong) == (401, 0)
    assert await status(wrong) == (401, 0)
    assert (await status(ALICE))[0] == 429


# ---- equal cost of every failed check -------------------------------------------------------

async def test_failed_checks_cost_the_same_in_a_mixed_config():
    """Plain, hashed with the default settings, hashed with cheaper settings,
    and unknown: a wrong password takes as long for each."""
    auth = imgproxy.Authenticator([imgproxy.UserConfig(**u) for u in [
        {"username": "plain", "password": "plain-password"},
        {"username": "hashed", "password_hash": hashed("hashed-password", 2**13)},
        {"username": "cheaper", "password_hash": hashed("cheaper-password", 2**11)},
    ]])
    kinds = ["plain", "hashed", "cheaper", "nobody"]
    headers = {k: "Basic " + base64.b64encode(f"{k}:wrong-password".encode()).decode() for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(4):  # interleaved, so drift in machine load hits all alike
        for kind in kinds:
            for _ in range(3):
                started = time.perf_counter()
                assert await auth.check(headers[kind]) is None
                times[kind].append(time.perf_counter() - started)
    medians = {k: statistics.median(v) for k, v in times.items()}
    for kind in kinds:
        assert 0.67 < medians[kind] / medians["nobody"] < 1.5, medians
