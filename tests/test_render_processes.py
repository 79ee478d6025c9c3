"""Renders run in processes of their own (RenderProcesses): off the server's
GIL, at idle priority, replaced when one dies, and gone when the server goes.
Against a real server (in-process and as its own process), real files."""
from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

import imgproxy
from conftest import ALICE
from helpers import http_exchange
from test_variants import decoded, decoded_json, fetch, photo, put, renders


def process_table() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent pid, nice, CPU seconds) of every process."""
    table = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[16]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def descendants(pid: int) -> set[int]:
    table = process_table()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def render_processes(pid: int) -> dict[int, float]:
    """The render processes under `pid`: forked by its fork server (so its grandchildren),
    at the render nice level. pid -> CPU seconds."""
    table = process_table()
    under = descendants(pid)
    return {p: table[p][2] for p in under
            if p in table and table[p][1] == imgproxy.RENDER_NICE and table[p][0] in under}


def own_cpu(pid: int) -> float:
    return process_table()[pid][2]


def wait_until_gone(pids: set[int], seconds: float = 15.0) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = {p for p in pids if Path(f"/proc/{p}").exists()
                 and "Z" not in (Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split() or ["Z"])[0]}
        if not alive:
            return set()
        time.sleep(0.1)
    return alive


def slow_jpeg() -> bytes:
    """A 12 MP progressive JPEG of noise: its 1/4-scale decode takes a few hundred ms."""
    im = Image.effect_noise((4000, 3000), 60).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, progressive=True)
    return buf.getvalue()


# ---- where renders run ------------------------------------------------------------

def test_renders_run_in_processes_of_their_own_at_idle_priority(make_config, server_process):
    proc = server_process(make_config(server={"log_level": "DEBUG"}))
    status, _, body = http_exchange("PUT", proc.base_url + "/upload/big.jpg", photo((3000, 2000)), ALICE)
    assert status == 201
    md5 = decoded_json(body)["md5"]
    pid = proc.proc.pid
    # Started with the server, so the first render does not wait for it.
    deadline = time.monotonic() + 20
    while not render_processes(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert render_processes(pid), "no render process started with the server"
    before_server, before_renders = own_cpu(pid), render_processes(pid)
    for tail in ("full.png", "full.webp", "2048.png"):
        status, _, body = http_exchange("GET", f"{proc.base_url}/i/{md5}/{tail}", timeout=60)
        assert status == 200, body[:200]
    after = render_processes(pid)
    assert after, "no process at nice 10 under the server"
    # SCHED_IDLE: a core only when nothing else (the event loop) wants it
    assert {os.sched_getscheduler(p) for p in after} == {os.SCHED_IDLE}
    render_cpu = sum(cpu - before_renders.get(p, 0.0) for p, cpu in after.items())
    server_cpu = own_cpu(pid) - before_server
    # Three full-size encodes of 6 MP: hundreds of ms, and almost none of it in the server.
    assert render_cpu >= 0.2, (render_cpu, server_cpu)
    assert server_cpu < render_cpu / 2, (render_cpu, server_cpu)
    everything = descendants(pid)
    assert proc.terminate() == 0
    assert not wait_until_gone(everything), "processes left behind after SIGTERM"
    assert "Traceback" not in proc.log


def test_a_server_stopped_while_its_render_processes_start_exits_cleanly(make_config, server_process):
    """The pool is shut down and waited for: Python 3.11's exit hook otherwise writes
    to the wake-up pipe of a pool still closing, and prints a traceback at exit (seen
    in about 1 stop of 5 right after the start, while the first process starts)."""
    config = make_config()
    for round_ in range(10):
        proc = server_process(config)
        time.sleep(0.02 * round_)
        assert proc.terminate() == 0
        assert "Traceback" not in proc.log, proc.log[-2000:]


def test_render_processes_go_when_the_server_is_killed(make_config, server_process):
    proc = server_process(make_config())
    status, _, body = http_exchange("PUT", proc.base_url + "/upload/a.jpg", photo((800, 600)), ALICE)
    md5 = decoded_json(body)["md5"]
    assert http_exchange("GET", f"{proc.base_url}/i/{md5}/320.webp", timeout=60)[0] == 200
    everything = descendants(proc.proc.pid)
    assert render_processes(proc.proc.pid)
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(10)
    assert not wait_until_gone(everything), "render processes outlived a killed server"


# ---- a render process that dies -----------------------------------------------------

async def test_a_render_process_killed_mid_render_answers_503_then_renders_again(make_client):
    client = await make_client()
    warm = await put(client, photo((400, 300)), name="warm.jpg")
    assert (await fetch(client, f"/i/{warm}/160.webp"))[0] == 200  # the render process is up
    idle = render_processes(os.getpid())
    assert len(idle) == 1
    md5 = await put(client, slow_jpeg())
    variants = client.app[imgproxy.VARIANTS]
    first = asyncio.ensure_future(fetch(client, f"/i/{md5}/640.webp"))
    busy = {}
    deadline = time.monotonic() + 30
    while not busy and time.monotonic() < deadline:  # 50 ms into the render (it takes hundreds)
        await asyncio.sleep(0.01)
        busy = {p: cpu for p, cpu in render_processes(os.getpid()).items() if cpu >= idle.get(p, 0) + 0.05}
    assert busy and variants.rendering == 1
    for p in busy:
        os.kill(p, signal.SIGKILL)
    status, headers, body = await first
    assert status == 503 and int(headers["Retry-After"]) > 0, body[:200]
    assert decoded_json(body)["code"] == "unavailable"
    status, _, body = await fetch(client, f"/i/{md5}/640.webp")
    assert status == 200 and decoded(body).size == (640, 480)
    assert renders(client) == 2


async def test_a_render_process_that_died_idle_is_replaced_without_an_error(make_client):
    client = await make_client()
    md5 = await put(client, photo((1200, 800)))
    assert (await fetch(client, f"/i/{md5}/320.webp"))[0] == 200
    victims = render_processes(os.getpid())
    assert victims
    for p in victims:
        os.kill(p, signal.SIGKILL)
    assert not wait_until_gone(set(victims), 10)
    await asyncio.sleep(0.2)  # the pool notices its process is gone
    for size in ("160", "640"):
        status, _, body = await fetch(client, f"/i/{md5}/{size}.webp")
        assert status == 200, body[:200]
    assert set(render_processes(os.getpid())).isdisjoint(victims)


# ---- what crosses the process boundary -----------------------------------------------

@pytest.mark.files_stack  # a second config on the first one's data folder
async def test_a_refusal_in_the_render_process_reaches_the_client_as_its_4xx(make_client, make_config):
    first = await make_client()
    md5 = await put(first, photo((1200, 800)))
    await first.close()
    lowered = make_config(server={"data_dir": str(first.data_dir), "max_pixels": 500_000})
    again = await make_client(lowered)
    status, _, body = await fetch(again, f"/i/{md5}/320.webp")
    assert status == 413 and decoded_json(body)["code"] == "too_many_pixels", body[:200]


def test_upload_rejected_survives_pickling():
    import pickle
    exc = pickle.loads(pickle.dumps(imgproxy.UploadRejected(413, "too_many_pixels", "too many")))
    assert (exc.status, exc.code, exc.message) == (413, "too_many_pixels", "too many")


async def test_renders_work_in_threads_where_processes_cannot_be_made(make_client):
    client = await make_client()
    md5 = await put(client, photo((1200, 800)))
    renderers = client.app[imgproxy.VARIANTS].renderers
    renderers.in_threads = True  # what an OSError from the fork server leaves behind
    status, _, body = await fetch(client, f"/i/{md5}/320.webp")
    assert status == 200 and decoded(body).size == (320, 213)
    assert not render_processes(os.getpid())


@pytest.mark.local_files_only  # renders the stored file here too
@pytest.mark.parametrize("size", ["160", "1280"])
async def test_sizes_rendered_in_processes_match_a_render_in_this_process(make_client, size):
    client = await make_client()
    data = photo((1600, 1200), orientation=6)
    md5 = await put(client, data)
    status, _, body = await fetch(client, f"/i/{md5}/{size}.webp")
    assert status == 200
    stored = next(client.data_dir.joinpath("uploads").rglob(f"{md5}.*"))
    assert body == imgproxy.render_variant(stored, int(size), "webp", client.config.server.max_pixels)
