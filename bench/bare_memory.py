#!/usr/bin/env python3
"""A bare aiohttp handler answering one image from memory: the ceiling for imgproxy.

It does what imgproxy's hot path cannot avoid (route match, a prepared set of
headers, the bytes already in memory, 304 on a matching If-None-Match) and
nothing else, so imgproxy's hot GET next to it shows our own per-request cost.

    python3 bench/bare_memory.py --file hot.jpg [--host 127.0.0.1] [--port 0]

Serves the file at /i/{anything}. Prints `listening on http://HOST:PORT` on
stderr. Uses uvloop when installed, as imgproxy.py does.
"""
import argparse
import asyncio
import contextlib
import hashlib
import signal
import sys

from aiohttp import web


def make_handler(body: bytes):
    etag = f'"{hashlib.md5(body).hexdigest()}"'
    headers = {"Content-Type": "image/jpeg", "ETag": etag,
               "Cache-Control": "public, max-age=2592000, immutable"}

    async def handle(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=body, headers=headers)

    return handle


async def serve(host: str, port: int, body: bytes) -> None:
    app = web.Application()
    app.router.add_get("/i/{name}", make_handler(body))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = site._server.sockets[0].getsockname()
    print(f"bare_memory listening on http://{bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--file", required=True, help="the image to serve")
    args = parser.parse_args()
    with open(args.file, "rb") as f:
        body = f.read()
    with contextlib.suppress(ImportError):
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args.host, args.port, body))


if __name__ == "__main__":
    main()
