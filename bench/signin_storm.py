#!/usr/bin/env python3
"""Sign-in storms and the cost of failed checks, for bench/RESULTS.md.

    python3 bench/signin_storm.py                       # this checkout's imgproxy.py
    python3 bench/signin_storm.py --imgproxy OLD/imgproxy.py   # another version, same figures

Runs the real app in-process on 127.0.0.1:0 with a throwaway data folder and reports:
verdicts (401) versus refusals (429) for 300 concurrent wrong guesses from one
address; /healthz latency while 80 made-up-user guesses from 80 addresses are
checked; median failed-check time per kind of user in a mixed config (ratio to
an unknown user); and, when the server has app tokens, API requests/s with a
token versus a (remembered) password.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web


def load_imgproxy(path: Path):
    spec = importlib.util.spec_from_file_location("imgproxy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["imgproxy"] = module
    spec.loader.exec_module(module)
    return module


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def scrypt_hash(imgproxy, password: str, n: int) -> str:
    saved = imgproxy.SCRYPT_N
    imgproxy.SCRYPT_N = n
    try:
        return imgproxy.hash_password(password)
    finally:
        imgproxy.SCRYPT_N = saved


async def start(imgproxy, folder: Path, users: list, trust_forwarded_for: bool = False):
    raw = {"server": {"domain": "127.0.0.1", "data_dir": str(folder / "data"),
                      "trust_forwarded_for": trust_forwarded_for},
           "cleanup": {"enable": False}, "users": users}
    config = imgproxy.parse_config(raw, folder)
    runner = web.AppRunner(imgproxy.create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def storm_one_address(imgproxy, folder: Path) -> str:
    users = [{"username": "alice", "password_hash": scrypt_hash(imgproxy, "alice123", 2**12), "role": "admin"}]
    runner, base = await start(imgproxy, folder / "a", users)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=300)) as session:
            async def guess(i):
                async with session.get(base + "/api/images", headers=basic("alice", f"guess{i}")) as resp:
                    return resp.status
            started = time.perf_counter()
            counts = collections.Counter(await asyncio.gather(*[guess(i) for i in range(300)]))
            took = time.perf_counter() - started
    finally:
        await runner.cleanup()
    return f"300 concurrent wrong guesses, one address: {counts[401]} × 401, {counts[429]} × 429 in {took:.2f} s"


async def healthz_during_storm(imgproxy, folder: Path) -> str:
    users = [{"username": "alice", "password_hash": scrypt_hash(imgproxy, "alice123", 2**14), "role": "admin"}]
    runner, base = await start(imgproxy, folder / "b", users, trust_forwarded_for=True)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
            async def guess(i):
                headers = {**basic(f"made-up-{i}", "x"), "X-Forwarded-For": f"10.1.0.{i}"}
                async with session.get(base + "/api/images", headers=headers) as resp:
                    return resp.status
            async with session.get(base + "/healthz") as resp:  # warm
                await resp.read()
            quiet = []
            for _ in range(5):
                started = time.perf_counter()
                async with session.get(base + "/healthz") as resp:
                    await resp.read()
                quiet.append(time.perf_counter() - started)
            storm = [asyncio.ensure_future(guess(i)) for i in range(80)]
            await asyncio.sleep(0.2)
            started = time.perf_counter()
            async with session.get(base + "/healthz") as resp:
                await resp.read()
            loaded = time.perf_counter() - started
            await asyncio.gather(*storm)
    finally:
        await runner.cleanup()
    q = statistics.median(quiet)
    return (f"/healthz during 80 made-up-user guesses (scrypt N=2^14) from 80 addresses: "
            f"{loaded * 1000:.1f} ms vs {q * 1000:.1f} ms when quiet ({loaded / q:.1f}×)")


async def failed_check_costs(imgproxy) -> str:
    auth = imgproxy.Authenticator([imgproxy.UserConfig(**u) for u in [
        {"username": "plain", "password": "plain-password"},
        {"username": "hashed", "password_hash": scrypt_hash(imgproxy, "h", 2**13)},
        {"username": "cheaper", "password_hash": scrypt_hash(imgproxy, "c", 2**11)},
    ]])
    kinds = ["plain", "hashed", "cheaper", "nobody"]
    times = {k: [] for k in kinds}
    for _ in range(4):
        for kind in kinds:
            for _ in range(3):
                started = time.perf_counter()
                await auth.check(basic(kind, "wrong")["Authorization"])
                times[kind].append(time.perf_counter() - started)
    med = {k: statistics.median(v) for k, v in times.items()}
    parts = ", ".join(f"{k} {med[k] * 1000:.1f} ms ({med[k] / med['nobody']:.2f}×)" for k in kinds[:3])
    return f"failed check, mixed config (ratio to an unknown user, {med['nobody'] * 1000:.1f} ms): {parts}"


async def token_vs_password(imgproxy, folder: Path) -> str:
    if not hasattr(imgproxy, "TOKEN_PREFIX"):
        return "app tokens: not in this version"
    users = [{"username": "alice", "password": "alice123", "role": "admin"}]
    runner, base = await start(imgproxy, folder / "c", users)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/api/tokens", json={"name": "bench"},
                                    headers=basic("alice", "alice123")) as resp:
                token = (await resp.json())["token"]
            rates = {}
            for label, headers in (("password", basic("alice", "alice123")),
                                   ("token", {"Authorization": f"Bearer {token}"})) * 2:
                started, n = time.perf_counter(), 0
                while time.perf_counter() - started < 3:
                    async with session.get(base + "/api/images?limit=1", headers=headers) as resp:
                        await resp.read()
                    n += 1
                rates[label] = max(rates.get(label, 0), n / (time.perf_counter() - started))
    finally:
        await runner.cleanup()
    return (f"GET /api/images?limit=1, one connection: token {rates['token']:.0f} req/s vs remembered "
            f"password {rates['password']:.0f} req/s ({rates['token'] / rates['password']:.2f}×)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imgproxy", type=Path, default=Path(__file__).resolve().parents[1] / "imgproxy.py")
    args = parser.parse_args()
    imgproxy = load_imgproxy(args.imgproxy)
    print(f"imgproxy: {args.imgproxy}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(await storm_one_address(imgproxy, folder))
        print(await healthz_during_storm(imgproxy, folder))
        print(await failed_check_costs(imgproxy))
        print(await token_vs_password(imgproxy, folder))


if __name__ == "__main__":
    asyncio.run(main())
