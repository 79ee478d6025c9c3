"""Several processes (server.workers) and cache coherence between processes."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import ALICE, ROOT
from helpers import db_rows, http_call, png_bytes, poll


def test_two_workers_serve_and_a_delete_is_seen_by_both(make_config, server_process):
    proc = server_process(make_config(server={"workers": 2}, cleanup={"enable": True}))
    status, body = http_call("PUT", proc.base_url + "/upload/a.png", png_bytes((20, 20), (10, 200, 30)), ALICE)
    assert status == 201
    url = json.loads(body)["url"]
    for _ in range(40):  # new connection each time: both workers get some and cache it
        assert http_call("GET", url)[0] == 200
    assert http_call("DELETE", url.replace("/i/", "/api/images/").rsplit(".", 1)[0], headers=ALICE)[0] == 204
    assert {http_call("GET", url)[0] for _ in range(40)} == {404}
    # The catch-up pass runs at start; on the S3 stack it may still be listing the bucket.
    poll(lambda: "cleanup removed" in proc.log, 15, "worker 0's catch-up cleanup pass")
    assert proc.terminate() == 0
    log = proc.log
    assert log.count("listening on") == 2
    assert log.count("cleanup removed") == 1  # only worker 0 runs the schedule
    assert "Traceback" not in log


def test_access_counts_from_all_workers_reach_the_database(make_config, server_process):
    config = make_config(server={"workers": 2})
    proc = server_process(config)
    status, body = http_call("PUT", proc.base_url + "/upload/a.png", png_bytes((20, 20), (1, 2, 3)), ALICE)
    url = json.loads(body)["url"]
    for _ in range(30):
        assert http_call("GET", url)[0] == 200
    assert proc.terminate() == 0
    assert db_rows(config.parent / "data", "SELECT access_count FROM images") == [(30,)]


def test_reset_by_another_process_is_seen_at_once(make_config, live_server):
    """cleanup.py --reset changes the database from outside: the server's cache drops
    the image on the next request, not after a polling delay."""
    config = make_config()
    server = live_server(config)
    status, body = http_call("PUT", server.base_url + "/upload/a.png", png_bytes((20, 20), (9, 9, 9)), ALICE)
    url = json.loads(body)["url"]
    assert http_call("GET", url)[0] == 200  # cached in memory now
    out = subprocess.run([sys.executable, str(ROOT / "cleanup.py"), "--config", str(config), "--reset", "--yes"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    started = time.monotonic()
    assert http_call("GET", url)[0] == 404
    assert time.monotonic() - started < 1.0


def test_workers_config_is_validated(tmp_path, capsys):
    import imgproxy
    path = tmp_path / "config.json"
    path.write_text('{"server": {"workers": 0}}')
    assert imgproxy.main(["--config", str(path)]) == 2
    assert "server.workers" in capsys.readouterr().err


async def test_renew_by_another_process_is_honoured_by_a_cached_copy(make_client, clock):
    """A renew in another process does not flush this server's cache; a cached
    copy that looks expired must be checked against the database before a 404."""
    import imgproxy
    client = await make_client(clock=clock, cleanup={"expire_days": 1})
    status_body = await client.put("/upload/a.png", data=png_bytes((20, 20), (4, 5, 6)), headers=ALICE)
    info = await status_body.json()
    path = f"/i/{info['md5']}.png"
    assert (await client.get(path)).status == 200  # cached with the first expiry
    other = await imgproxy.ImageStore(client.config, clock).open()  # "another process"
    try:
        clock.advance(3600)
        assert await other.renew("bob", info["md5"]) is not None
    finally:
        await other.close()
    clock.advance(86400 - 1800)  # past the first expiry, before the renewed one
    resp = await client.get(path)
    assert resp.status == 200
    assert int(resp.headers["Cache-Control"].split("max-age=")[1].split(",")[0]) > 0
    clock.advance(86400)
    assert (await client.get(path)).status == 404
