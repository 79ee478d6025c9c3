#!/usr/bin/env python3
"""The upload floor for the benchmark: the work every accepted upload must cost, and nothing else.

It hashes the body, runs imgproxy's own image checks (`imgproxy.inspect_image`:
the JPEG header walk, the pixel limit from the header, Pillow's verify() and a
full decode), writes the bytes to a temp file and renames it to its digest, then
answers a small JSON object. The checks and the disk work run in one worker
thread per upload, as any server that keeps its event loop free must do, and
at most as many at once as imgproxy allows (its decode slots: min(4, CPUs)),
which bounds the memory of decoding there.
No authentication, no database, no deduplication, no limits on the body.
imgproxy's uploads/s are reported as a ratio to this.

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
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import imgproxy  # after the path insert: the checks under test are imgproxy's own

CHECKS = imgproxy.ServerConfig()  # default formats and max_pixels, as the benchmark's imgproxy uses


def hash_check_and_write(root: str, body: bytes) -> dict:
    digest = hashlib.md5(body).hexdigest()
    facts = imgproxy.inspect_image(body, len(body), CHECKS.formats, CHECKS.max_pixels)
    tmp = os.path.join(root, f"up-{secrets.token_hex(8)}.part")
    with open(tmp, "wb") as f:
        f.write(body)
    os.replace(tmp, os.path.join(root, f"{digest}.{imgproxy.FORMATS[facts.format][0]}"))
    return {"md5": digest, "size": len(body), "format": facts.format, "width": facts.width,
            "height": facts.height}


async def handle_upload(request: web.Request) -> web.Response:
    chunks = []
    async for chunk in request.content.iter_any():
        chunks.append(chunk)
    try:
        async with request.app["slots"]:
            info = await asyncio.to_thread(hash_check_and_write, request.app["dir"], b"".join(chunks))
    except imgproxy.UploadRejected as exc:
        return web.json_response({"error": exc.message, "code": exc.code}, status=exc.status)
    return web.json_response(info, status=201)


async def serve(host: str, port: int, root: str) -> None:
    await asyncio.to_thread(imgproxy.Image.init)  # as imgproxy does at start: plugins not timed
    app = web.Application(client_max_size=1 << 40)
    app["dir"] = root
    app["slots"] = asyncio.Semaphore(max(1, min(4, os.cpu_count() or 1)))
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
