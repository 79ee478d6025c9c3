"""Auth beyond the route matrix of test_server.py: timing does not reveal which
users exist, the limiter stops one address without locking out others, and no
password or Authorization value ever reaches the logs."""
from __future__ import annotations

import base64
import statistics
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

import imgproxy
from conftest import ALICE, basic
from helpers import median_refusal_seconds


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def median_check_time(auth: imgproxy.Authenticator, header: str, tries: int) -> float:
    times = []
    for _ in range(tries):
        started = time.perf_counter_ns()
        assert await auth.check(header) is None
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times)


async def compare_existing_and_missing(users, rounds: int, tries: int) -> float:
    auth = imgproxy.Authenticator([imgproxy.UserConfig(**u) for u in users])
    existing = "Basic " + b64("alice:wrong-password-1")
    missing = "Basic " + b64("nobody-by-that-name:wrong-password-1")
    ratios = []
    for _ in range(rounds):  # interleaved, so drift in machine load hits both alike
        a = await median_check_time(auth, existing, tries)
        b = await median_check_time(auth, missing, tries)
        ratios.append(a / b)
    return statistics.median(ratios)


async def test_wrong_password_timing_plain_users():
    ratio = await compare_existing_and_missing(
        [{"username": "alice", "password": "alice123", "role": "admin"}], rounds=9, tries=400)
    assert 0.67 < ratio < 1.5, ratio


async def test_wrong_password_timing_hashed_users():
    users = [{"username": "alice", "password_hash": imgproxy.hash_password("alice123"), "role": "admin"}]
    ratio = await compare_existing_and_missing(users, rounds=3, tries=5)
    assert 0.67 < ratio < 1.5, ratio


def scrypt_hash(password: str, n: int) -> str:
    import hashlib
    import secrets
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=8, p=1, dklen=32, maxmem=2**28)
    return f"scrypt${n}$8$1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


async def test_wrong_password_timing_hashed_users_with_other_parameters():
    # Hashes made with other scrypt settings (older, or by hand): the missing-user
    # path must cost the same, not the default settings' price (it was 4x off).
    for n in (2**12, 2**15):
        users = [{"username": "alice", "password_hash": scrypt_hash("alice123", n), "role": "admin"}]
        ratio = await compare_existing_and_missing(users, rounds=3, tries=3)
        assert 0.67 < ratio < 1.5, (n, ratio)


async def test_wrong_password_timing_over_http(make_client, monkeypatch):
    monkeypatch.setattr(imgproxy, "AUTH_FAIL_LIMIT", 10**9)
    client = await make_client()

    ratios = []
    for _ in range(3):
        ratios.append(await median_refusal_seconds(client, basic("alice", "nope"))
                      / await median_refusal_seconds(client, basic("mallory", "nope")))
    assert 0.67 < statistics.median(ratios) < 1.5, ratios


# ---- the limiter ---------------------------------------------------------------------

async def test_limiter_blocks_one_address_not_another(make_client):
    client = await make_client()
    url = client.make_url("/api/images")
    # 127.0.0.2 is the guesser; loopback accepts any 127/8 source address.
    guesser = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
    try:
        try:
            first = await guesser.get(url, headers=basic("alice", "guess0"))
        except OSError as exc:
            pytest.skip(f"cannot bind 127.0.0.2 here: {exc}")
        assert first.status == 401
        for i in range(1, imgproxy.AUTH_FAIL_LIMIT):
            assert (await guesser.get(url, headers=basic("alice", f"guess{i}"))).status == 401
        blocked = await guesser.get(url, headers=ALICE)  # even the right password waits now
        assert blocked.status == 429
        assert int(blocked.headers["Retry-After"]) > 0
        assert (await blocked.json())["code"] == "rate_limited"
        # alice from her own address is not locked out, nor is anyone else
        assert (await client.get("/api/images", headers=ALICE)).status == 200
        assert (await client.get("/api/images", headers=basic("bob", "bob123"))).status == 200
        assert (await client.get("/api/images", headers=basic("alice", "typo"))).status == 401
        # serving needs no sign-in and goes on for the guesser too
        assert (await guesser.get(client.make_url("/healthz"))).status == 200
        # a forged X-Forwarded-For does not buy new tries (not trusted by default)
        resp = await guesser.get(url, headers={**basic("alice", "x"), "X-Forwarded-For": "10.9.8.7"})
        assert resp.status == 429
        # after the block runs out, the address may sign in again
        auth = client.app[imgproxy.AUTH]
        real_clock = auth.clock
        auth.clock = lambda: real_clock() + 2 * imgproxy.AUTH_FAIL_WINDOW + 1
        assert (await guesser.get(url, headers=ALICE)).status == 200
    finally:
        await guesser.close()


async def test_limiter_memory_and_time_are_bounded_under_many_addresses():
    # A botnet (or one IPv6 host) failing from 100,000 addresses within a minute:
    # the table stays capped and each failure stays cheap (it was a full scan
    # of the table per failure, quadratic in the number of addresses).
    auth = imgproxy.Authenticator([imgproxy.UserConfig("alice", password="alice123")])
    started = time.perf_counter()
    for i in range(100_000):
        auth.record_failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert time.perf_counter() - started < 5
    assert len(auth._failures) <= imgproxy.AUTH_FAIL_TABLE


def test_limiter_counts_an_ipv6_slash_64_as_one_client():
    auth = imgproxy.Authenticator([imgproxy.UserConfig("alice", password="alice123")])
    for i in range(imgproxy.AUTH_FAIL_LIMIT):
        auth.record_failure(f"2001:db8:1:2::{i + 1:x}")
    assert auth.blocked_for("2001:db8:1:2:ffff::1") > 0
    assert auth.blocked_for("2001:db8:1:3::1") == 0
    for _ in range(imgproxy.AUTH_FAIL_LIMIT):
        auth.record_failure("::ffff:192.0.2.7")
    assert auth.blocked_for("192.0.2.7") > 0  # IPv4-mapped is the IPv4 address


# ---- secrets never reach the logs -------------------------------------------------------

def test_no_password_or_authorization_value_in_logs(make_config, server_process):
    hashed_secret = "dora's hashed secret"
    dora_hash = imgproxy.hash_password(hashed_secret)
    config = make_config(server={"access_log": True, "log_level": "DEBUG"},
                         users=[{"username": "alice", "password": "alice-Plain-Secret", "role": "admin"},
                                {"username": "dora", "password_hash": dora_hash}])
    proc = server_process(config)
    secrets = ["alice-Plain-Secret", hashed_secret, "wrong-Guess-123", "overlong-Secret-456", dora_hash]
    headers_sent = []

    def call(method, path, headers=None, data=None):
        headers = headers or {}
        if "Authorization" in headers:
            headers_sent.append(headers["Authorization"])
        req = urllib.request.Request(proc.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, ConnectionError):
            return None

    from helpers import png_bytes
    assert call("GET", "/api/images", basic("alice", "alice-Plain-Secret")) == 200
    assert call("PUT", "/upload/a.png", basic("dora", hashed_secret), png_bytes()) == 201
    assert call("GET", "/api/db", basic("dora", hashed_secret)) == 403
    assert call("GET", "/api/images", basic("alice", "wrong-Guess-123")) == 401
    assert call("GET", "/api/images", basic("nobody", "wrong-Guess-123")) == 401
    assert call("GET", "/api/images", {"Authorization": "Basic " + b64("alice-Plain-Secret")}) == 401
    assert call("GET", "/api/images", {"Authorization": "Bearer alice-Plain-Secret"}) == 401
    # an Authorization line longer than aiohttp accepts: its parser error quotes
    # the line's first bytes, and that message must not reach the log
    assert call("GET", "/api/images", basic("alice", "overlong-Secret-456" + "x" * 9000)) in (400, None)
    time.sleep(0.5)
    assert proc.terminate() == 0
    log = proc.log
    assert "GET /api/images" in log  # the access log was on
    for secret in secrets + headers_sent:
        assert secret not in log, f"{secret[:30]!r} appears in the log"
    for token in headers_sent:
        assert token.split(" ", 1)[1][:24] not in log
    assert "Traceback" not in log
