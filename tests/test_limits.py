"""Connections, descriptors, stalled readers and crash leftovers in tmp/.

Each test runs the real server as a child process: the connection cap and
the stall watch live in `serve`, and the descriptor limit is the process's."""
from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imgproxy
from conftest import ALICE, ROOT
from helpers import http_call, noise_png, open_fds, png_bytes, poll

SERVER_FD_LIMIT = 1024  # systemd's default LimitNOFILE


def upload(base_url: str, data: bytes) -> str:
    status, body = http_call("PUT", f"{base_url}/upload/x.png", data, ALICE, timeout=60)
    assert status == 201, body
    return json.loads(body)["md5"]


# ---- a thousand idle and half-sent connections -------------------------------------------

@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux) to cap the server's fds")
def test_a_thousand_idle_connections_leave_room_for_an_image_and_healthz(make_config, server_process):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the test needs {wanted} descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        server = server_process(make_config(), prefix=("prlimit", f"--nofile={SERVER_FD_LIMIT}:{SERVER_FD_LIMIT}"))
        data = png_bytes((50, 50))
        md5 = upload(server.base_url, data)

        async def crowd_then_ask() -> tuple[int, list]:
            held = []
            for i in range(1100):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                if i % 2:  # half of them begin a request and never finish its head
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                held.append(writer)
            await asyncio.sleep(0.5)
            answers = await asyncio.gather(*(asyncio.to_thread(http_call, "GET", f"{server.base_url}{path}")
                                             for path in (f"/i/{md5}.png", "/healthz", f"/i/{md5}.png")))
            fds = open_fds(server.proc.pid)
            for writer in held:
                writer.transport.abort()
            return fds, answers

        fds, answers = asyncio.run(asyncio.wait_for(crowd_then_ask(), 60))
        assert answers[0] == (200, data) and answers[2] == (200, data)
        assert answers[1] == (200, b'{"status": "ok"}')
        assert fds < SERVER_FD_LIMIT - imgproxy.FD_RESERVE // 2, fds
        assert server.proc.poll() is None
        assert "lowered from 2048 to 480" in server.log
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_when_every_connection_is_busy_a_new_one_gets_503(make_config, server_process):
    server = server_process(make_config(server={"max_connections": 16}), patches={"RESPONSE_STALL_TIMEOUT": 3.0})
    data = noise_png(6 * 1024 * 1024)
    md5 = upload(server.base_url, data)
    stalled = [non_reading_get(server.port, f"/i/{md5}.png") for _ in range(16)]
    try:
        time.sleep(0.5)
        status, body = http_call("GET", f"{server.base_url}/healthz")
        assert status == 503 and json.loads(body)["code"] == "unavailable"
        # the stall watch frees them: then there is room again
        poll(lambda: http_call("GET", f"{server.base_url}/healthz")[0] == 200, 15, "room after the stalls")
    finally:
        for s in stalled:
            s.close()


# ---- responses that make no progress --------------------------------------------------------

def non_reading_get(port: int, path: str) -> socket.socket:
    """A GET whose client never reads the answer (a small receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def image_fds(pid: int, md5: str) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += md5 in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return count


@pytest.fixture(params=["uvloop", "asyncio"])
def event_loop_prefix(request, tmp_path):
    """Run the server on uvloop (when installed) or on asyncio's own loop,
    whose native sendfile needs the task cancelled, not just the socket."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
        return ()
    blocker = tmp_path / "no-uvloop"
    blocker.mkdir()
    (blocker / "uvloop.py").write_text("raise ImportError('switched off for this test')\n")
    return ("env", f"PYTHONPATH={blocker}")


@pytest.mark.local_files_only   # watches the served file's descriptor
def test_a_reader_that_takes_nothing_is_dropped_and_the_file_closed(make_config, server_process, event_loop_prefix):
    server = server_process(make_config(), patches={"RESPONSE_STALL_TIMEOUT": 2.0}, prefix=event_loop_prefix)
    data = noise_png(8 * 1024 * 1024)
    md5 = upload(server.base_url, data)
    sock = non_reading_get(server.port, f"/i/{md5}.png")
    try:
        poll(lambda: image_fds(server.proc.pid, md5), 5, "the image file to be open for the reader")
        started_at = time.monotonic()
        poll(lambda: not image_fds(server.proc.pid, md5), 15, "the stalled response to be dropped")
        assert time.monotonic() - started_at < 10
        sock.settimeout(10)
        received = 0
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionError:
            pass  # reset: the server aborted the connection
        assert received < len(data), "the connection should have been cut short"
    finally:
        sock.close()
    assert "dropped a response" in server.log and "Traceback" not in server.log
    assert http_call("GET", f"{server.base_url}/healthz")[0] == 200


def test_a_slow_reader_that_keeps_reading_gets_everything(make_config, server_process):
    server = server_process(make_config(), patches={"RESPONSE_STALL_TIMEOUT": 2.0})
    data = noise_png(6 * 1024 * 1024)
    md5 = upload(server.base_url, data)
    sock = non_reading_get(server.port, f"/i/{md5}.png")
    sock.settimeout(10)
    try:
        received = b""
        pauses = 0
        while True:
            if pauses < 4:  # four pauses of 1.5 s: six seconds in all, never two without progress
                time.sleep(1.5)
                pauses += 1
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            received += chunk
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep and len(body) >= len(data):
                break
        assert head.startswith(b"HTTP/1.1 200") and body == data
    finally:
        sock.close()
    assert "dropped a response" not in server.log


# ---- crash leftovers in tmp/ -------------------------------------------------------------------

def stalled_upload(port: int, data: bytes, sent: int) -> socket.socket:
    """A PUT of `data` that sends `sent` bytes of it (enough to reach tmp/), then waits."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = ["PUT /upload/big.png HTTP/1.1", "Host: x", f"Authorization: {ALICE['Authorization']}",
            f"Content-Length: {len(data)}"]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    sock.sendall(data[:sent])
    return sock


def part_files(data_dir: Path) -> set[Path]:
    return set((data_dir / "tmp").glob("*.part"))


def test_crash_leftovers_go_at_the_next_start_but_a_live_writers_file_stays(make_config, server_process):
    config_path = make_config()
    data_dir = config_path.parent / "data"
    doomed, alive = server_process(config_path), server_process(config_path)
    data, sent = noise_png(3 * imgproxy.FLUSH_BYTES), 2 * imgproxy.FLUSH_BYTES
    doomed_upload = stalled_upload(doomed.port, data, sent)
    leftover = poll(lambda: part_files(data_dir), 10, "the doomed upload's temp file")
    live_upload = stalled_upload(alive.port, data, sent)
    live_file = poll(lambda: part_files(data_dir) - leftover, 10, "the live upload's temp file")
    os.kill(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait(10)
    doomed_upload.close()
    assert leftover <= part_files(data_dir)

    restarted = server_process(config_path)  # no cleanup pass has run: the start itself sweeps
    assert part_files(data_dir) == live_file
    assert "removed 1 temp files" in restarted.log
    result = subprocess.run([sys.executable, str(ROOT / "cleanup.py"), "--config", str(config_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "0 temp files" in result.stdout, result.stdout + result.stderr
    assert part_files(data_dir) == live_file

    live_upload.sendall(data[sent:])
    live_upload.settimeout(30)
    answer = live_upload.recv(65536)
    live_upload.close()
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    assert part_files(data_dir) == set()
    assert restarted.terminate() == 0 and alive.terminate() == 0


async def test_every_cleanup_pass_removes_an_unlocked_part_file_however_young(make_client):
    client = await make_client()
    store = client.app[imgproxy.STORE]
    dead = store.storage.tmp / "upload-00000000deadbeef.part"
    dead.write_bytes(b"x" * 100)
    live_path, live_fd = imgproxy.Storage(client.data_dir).create_tmp()  # as another process would
    try:
        report = await imgproxy.run_cleanup_pass(store)
        assert (report.temp_files, report.bytes_freed) == (1, 100)
        assert not dead.exists() and live_path.exists()
    finally:
        os.close(live_fd)
    report = await imgproxy.run_cleanup_pass(store)
    assert report.temp_files == 1 and not live_path.exists()


async def test_a_sweep_never_touches_this_process_own_uploads(make_client):
    """On NFS a lock test cannot see our own locks: our in-flight files are skipped by name."""
    client = await make_client()
    store = client.app[imgproxy.STORE]
    own_path, own_fd = store.storage.create_tmp()
    try:
        assert own_path.name in store.storage.in_flight
        report = await imgproxy.run_cleanup_pass(store)
        assert report.temp_files == 0 and own_path.exists()
    finally:
        os.close(own_fd)


def test_the_service_unit_allows_the_default_connection_cap():
    unit = (ROOT / "units" / "imgproxy.service").read_text()
    values = [line.split("=", 1)[1].strip() for line in unit.splitlines() if line.startswith("LimitNOFILE=")]
    assert len(values) == 1, "imgproxy.service should set LimitNOFILE once"
    limit = int(values[0].split(":")[-1])
    assert (limit - imgproxy.FD_RESERVE) // 2 >= imgproxy.MAX_CONNECTIONS
