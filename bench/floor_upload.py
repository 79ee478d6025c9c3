#!/usr/bin/env python3
"""The upload floor for the benchmark: a minimal streaming aiohttp upload handler.

No authentication, no validation, no database: the body is written to a temp
file while it is hashed, the file is renamed to its digest, and a small JSON
answer goes back. imgproxy's uploads/s are reported as a ratio to this.

    python3 bench/floor_upload.py --dir /tmp/floor [--host 127.0.0.1] [--port 0]

Prints `listening on http://HOST:PORT` on stderr once it accepts connections.
Uses uvloop when installed, as imgproxy.py does, so the comparison is like for like.
"""
import argparse
import asyncio
import contextlib
import hashlib
import os
import secrets
import signal
import sys

from aiohttp import web


async def handle_upload(request: web.Request) -> web.Response:
    root = request.app["dir"]
    tmp = os.path.join(root, f"up-{secrets.token_hex(8)}.part")
    md5 = hashlib.md5()
    size = 0
    with open(tmp, "wb") as f:
        async for chunk in request.content.iter_any():
            md5.update(chunk)
            f.write(chunk)
            size += len(chunk)
    digest = md5.hexdigest()
    os.replace(tmp, os.path.join(root, digest))
    return web.json_response({"md5": digest, "size": size}, status=201)


async def serve(host: str, port: int, root: str) -> None:
    app = web.Application(client_max_size=1 << 40)
    app["dir"] = root
    app.router.add_route("PUT", "/upload/{name}", handle_upload)
    app.router.add_route("POST", "/upload", handle_upload)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = site._server.sockets[0].getsockname()
    print(f"floor_upload listening on http://{bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
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
    parser.add_argument("--dir", required=True, help="where uploaded bodies go")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    with contextlib.suppress(ImportError):
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args.host, args.port, args.dir))


if __name__ == "__main__":
    main()
