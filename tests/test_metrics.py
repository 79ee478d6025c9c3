"""GET /metrics: off by default, admin or the metrics token only, counters that move
with real uploads, GETs, sign-in failures and cleanup passes, summed across
server.workers, and a clear config error when prometheus-client is missing."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

import imgproxy
from conftest import ALICE, BOB, ROOT, basic
from helpers import jpeg_bytes, png_bytes

TOKEN = "metrics-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
METRICS_ON = {"enable": True, "token": TOKEN}


def with_metrics(path: Path, metrics: dict) -> Path:
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["metrics"] = metrics
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@pytest.fixture
def prometheus_parser():
    return pytest.importorskip("prometheus_client.parser",
                               reason="prometheus-client is not installed (pip install prometheus-client)")


@pytest.fixture
def metrics_client(make_client, make_config, prometheus_parser):
    """metrics_client(metrics=METRICS_ON, **config_kwargs) -> a test client with /metrics on."""
    async def make(metrics: dict = METRICS_ON, clock=None, **kwargs):
        server = {"base_url": "http://img.test", **kwargs.pop("server", {})}
        return await make_client(config_path=with_metrics(make_config(server=server, **kwargs), metrics),
                                 clock=clock)
    return make


@pytest.fixture
def parse(prometheus_parser):
    def parse(text: str) -> dict[tuple[str, frozenset], float]:
        """Every sample of a Prometheus text exposition, keyed by (name, labels)."""
        out = {}
        for family in prometheus_parser.text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out
    return parse


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def scrape(parse):
    async def scrape(client, headers=BEARER) -> dict:
        resp = await client.get("/metrics", headers=headers)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await resp.text())
    return scrape


# ---- off by default ---------------------------------------------------------------

async def test_metrics_are_off_by_default_and_add_no_hook(make_client):
    client = await make_client()
    resp = await client.get("/metrics", headers=ALICE)
    assert resp.status == 404
    unknown = await client.get("/no-such-path", headers=ALICE)
    assert await resp.json() == await unknown.json() == {"error": "not found", "code": "not_found"}
    app = client.server.app
    assert imgproxy.METRICS not in app
    assert not any(isinstance(getattr(hook, "__self__", None), imgproxy.Metrics)
                   for hook in app.on_response_prepare)
    assert not (client.data_dir / "metrics").exists()


# ---- who may read -------------------------------------------------------------------

@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    (BOB, 403),
    (basic("alice", "wrong"), 401),
    ({"Authorization": "Bearer " + "x" * len(TOKEN)}, 401),
    ({"Authorization": "Bearer " + TOKEN[:-1]}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Basic " + TOKEN}, 401),
    (ALICE, 200),
    (BEARER, 200),
    ({"Authorization": f"bearer   {TOKEN}  "}, 200),
], ids=["none", "uploader", "wrong-password", "wrong-token", "short-token", "empty-bearer",
        "token-as-basic", "admin", "token", "token-odd-spacing"])
async def test_who_may_read_metrics(metrics_client, headers, status):
    client = await metrics_client()
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == status
    if status != 200:
        assert (await resp.json())["code"] in ("unauthorized", "forbidden")


async def test_metrics_token_is_no_user_credential(metrics_client):
    client = await metrics_client()
    for method, path in (("GET", "/api/images"), ("PUT", "/upload/a.png"), ("GET", "/api/db")):
        resp = await client.request(method, path, headers=BEARER, data=png_bytes())
        assert resp.status == 401, (method, path)


async def test_without_a_token_only_the_admin_reads(metrics_client):
    client = await metrics_client({"enable": True})
    assert (await client.get("/metrics", headers=BEARER)).status == 401
    assert (await client.get("/metrics", headers=ALICE)).status == 200


async def test_an_admins_app_token_does_not_read_metrics(metrics_client):
    # App tokens are for uploading tools; monitoring takes the password or metrics.token.
    client = await metrics_client()
    resp = await client.post("/api/tokens", json={"name": "laptop ShareX"}, headers=ALICE)
    assert resp.status == 201
    app_token = {"Authorization": "Bearer " + (await resp.json())["token"]}
    assert (await client.get("/api/images", headers=app_token)).status == 200  # a working token
    resp = await client.get("/metrics", headers=app_token)
    assert resp.status == 403
    assert (await resp.json())["code"] == "forbidden"


GUESSER = {"X-Forwarded-For": "203.0.113.9"}  # another address than the test client's own


async def test_a_blocked_address_gets_429_even_with_the_right_token(metrics_client, scrape):
    """Otherwise a blocked guesser could still tell a right token (200) from a wrong one (429)."""
    client = await metrics_client(server={"trust_forwarded_for": True})
    wrong = {"Authorization": "Bearer " + "y" * 40, **GUESSER}
    for _ in range(imgproxy.AUTH_FAIL_LIMIT):
        assert (await client.get("/metrics", headers=wrong)).status == 401
    for headers in (wrong, BEARER, ALICE):
        resp = await client.get("/metrics", headers={**headers, **GUESSER})
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) > 0
    samples = await scrape(client)  # from an address that is not blocked
    assert value(samples, "imgproxy_signins_total", result="failed") == imgproxy.AUTH_FAIL_LIMIT
    assert value(samples, "imgproxy_signins_total", result="blocked") == 3


# ---- counters move -------------------------------------------------------------------

async def test_requests_bytes_uploads_and_cache_hits_are_counted(metrics_client, scrape):
    client = await metrics_client()
    assert any(isinstance(getattr(hook, "__self__", None), imgproxy.Metrics)
               for hook in client.server.app.on_response_prepare)
    before = await scrape(client)
    assert value(before, "imgproxy_uploads_total", outcome="uploaded") == 0
    assert value(before, "imgproxy_worker_processes") == 1

    png, jpeg = png_bytes((31, 17)), jpeg_bytes((20, 20))
    first = await client.put("/upload/a.png", data=png, headers=BOB)
    assert first.status == 201
    url_path = "/i/" + (await first.json())["url"].rsplit("/i/", 1)[1]
    assert (await client.put("/upload/again.png", data=png, headers=BOB)).status == 200
    assert (await client.put("/upload/b.jpg", data=jpeg, headers=BOB)).status == 201
    assert (await client.put("/upload/bad.png", data=b"not an image at all", headers=BOB)).status == 415
    assert (await client.put("/upload/empty.png", data=b"", headers=BOB)).status == 400

    sent = 0
    for _ in range(3):
        resp = await client.get(url_path)
        assert resp.status == 200
        sent += len(await resp.read())
    md5 = url_path[3:35]
    assert (await client.get(url_path, headers={"If-None-Match": f'"{md5}"'})).status == 304
    assert (await client.head(url_path)).status == 200
    ranged = await client.get(url_path, headers={"Range": "bytes=0-9"})
    assert ranged.status == 206
    sent += len(await ranged.read())
    assert (await client.get("/i/" + "0" * 32 + ".png")).status == 404
    assert (await client.get("/no/such/route")).status == 404
    assert (await client.request("PATCH", "/upload")).status == 405

    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("imgproxy_uploads_total", outcome="uploaded") == 2
    assert moved("imgproxy_uploads_total", outcome="exists") == 1
    assert moved("imgproxy_uploads_total", outcome="unsupported_image") == 1
    assert moved("imgproxy_uploads_total", outcome="empty_upload") == 1
    assert moved("imgproxy_http_requests_total", route="/upload/{filename}", method="PUT", status="201") == 2
    assert moved("imgproxy_http_requests_total", route="/i/{name}", method="GET", status="200") == 3
    assert moved("imgproxy_http_requests_total", route="/i/{name}", method="GET", status="304") == 1
    assert moved("imgproxy_http_requests_total", route="/i/{name}", method="GET", status="206") == 1
    assert moved("imgproxy_http_requests_total", route="/i/{name}", method="HEAD", status="200") == 1
    assert moved("imgproxy_http_requests_total", route="/i/{name}", method="GET", status="404") == 1
    assert moved("imgproxy_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert moved("imgproxy_http_requests_total", route="unmatched", method="OTHER", status="405") == 1
    # The first GET read the database; the rest of the image requests were cache hits.
    assert moved("imgproxy_serving_cache_misses_total") == 2  # the image, and the unknown md5
    assert moved("imgproxy_serving_cache_hits_total") == 5
    assert moved("imgproxy_http_received_bytes_total") == 2 * len(png) + len(jpeg) + len(b"not an image at all")
    # Sent bytes: the images and ranges above, plus the JSON answers and errors.
    assert moved("imgproxy_http_sent_bytes_total") > sent
    assert moved("imgproxy_http_sent_bytes_total") < sent + 6000


async def test_sign_in_failures_and_blocks_are_counted(metrics_client, scrape):
    client = await metrics_client(server={"trust_forwarded_for": True})
    wrong = {**basic("bob", "not-his-password"), **GUESSER}
    for _ in range(imgproxy.AUTH_FAIL_LIMIT):
        assert (await client.get("/api/images", headers=wrong)).status == 401
    assert (await client.get("/api/images", headers=wrong)).status == 429
    assert (await client.get("/api/images", headers={**BOB, **GUESSER})).status == 429  # the address
    assert (await client.get("/api/images")).status == 401  # no credentials: not a failed sign-in
    samples = await scrape(client)
    assert value(samples, "imgproxy_signins_total", result="failed") == imgproxy.AUTH_FAIL_LIMIT
    assert value(samples, "imgproxy_signins_total", result="blocked") == 2
    assert value(samples, "imgproxy_http_requests_total", route="/api/images", method="GET", status="429") == 2


async def test_scheduled_cleanup_results_and_duration_are_counted(make_config, make_client, metrics_client,
                                                                  scrape, clock):
    """A pass due at start (none has run yet) removes an image that expired while down."""
    first = await make_client(clock=clock, cleanup={"expire_days": 1})
    resp = await first.put("/upload/a.png", data=png_bytes((7, 7)), headers=BOB)
    assert resp.status == 201
    size = (await resp.json())["size"]
    clock.advance(2 * 86400)
    data_dir = first.data_dir
    await first.close()

    client = await metrics_client(clock=clock, server={"data_dir": str(data_dir)},
                                  cleanup={"enable": True, "expire_days": 1})
    deadline = time.monotonic() + 20
    while True:
        samples = await scrape(client)
        if value(samples, "imgproxy_cleanup_passes_total", result="done") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert value(samples, "imgproxy_cleanup_passes_total", result="done") == 1
    assert value(samples, "imgproxy_cleanup_passes_total", result="failed") == 0
    assert value(samples, "imgproxy_cleanup_removed_total", kind="expired") == 1
    assert value(samples, "imgproxy_cleanup_freed_bytes_total") == size
    assert value(samples, "imgproxy_cleanup_duration_seconds_count") == 1
    assert value(samples, "imgproxy_cleanup_duration_seconds_bucket", le="+Inf") == 1
    assert 0 < value(samples, "imgproxy_cleanup_duration_seconds_sum") < 20


# ---- several workers -------------------------------------------------------------------

async def test_two_workers_report_their_sum(make_config, server_process, parse):
    config = with_metrics(make_config(server={"workers": 2}), METRICS_ON)
    data_dir = config.parent / "data"
    (data_dir / "metrics").mkdir(parents=True)
    (data_dir / "metrics" / "1.json").write_text(json.dumps({"uploads": {"uploaded": 1000}}))  # a past run
    proc = server_process(config)
    gets = 60
    # A new connection for every request, so that both workers answer some.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.put(proc.base_url + "/upload/a.png", data=png_bytes((3, 4)), headers=BOB) as resp:
            assert resp.status == 201
            url = (await resp.json())["url"]
        for _ in range(gets):
            async with http.get(url) as resp:
                assert resp.status == 200
        deadline = time.monotonic() + 15
        while True:
            # Each scrape may land on either worker; both must report the sum.
            async with http.get(proc.base_url + "/metrics", headers=BEARER) as resp:
                assert resp.status == 200
                samples = parse(await resp.text())
            counted = value(samples, "imgproxy_http_requests_total", route="/i/{name}", method="GET", status="200")
            if counted == gets or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    assert counted == gets
    assert value(samples, "imgproxy_worker_processes") == 2
    assert value(samples, "imgproxy_uploads_total", outcome="uploaded") == 1
    while True:  # each worker's file catches up within a second
        snapshots = [json.loads(p.read_text()) for p in (data_dir / "metrics").glob("*.json")]
        per_worker = [sum(n for route, _, status, n in s["requests"] if route == "/i/{name}" and status == 200)
                      for s in snapshots]
        if sum(per_worker) == gets or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert len(per_worker) == 2 and all(per_worker), per_worker  # both served, so the sum is real
    assert proc.terminate() == 0
    assert "Traceback" not in proc.log


# ---- configuration -------------------------------------------------------------------

def run_server(config: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "imgproxy.py"), "--config", str(config), "--port", "0"],
                          capture_output=True, text=True, timeout=60, env=env)


def test_missing_prometheus_client_is_a_config_error(make_config, tmp_path):
    """The package hidden by a sitecustomize that refuses its import, as on a default install."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'prometheus_client':\n"
        "            raise ModuleNotFoundError(\"No module named 'prometheus_client'\")\n"
        "sys.meta_path.insert(0, Refuse())\n")
    env = {**os.environ, "PYTHONPATH": str(hide)}
    config = with_metrics(make_config(), {"enable": True})
    out = run_server(config, env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "metrics.enable" in lines[0] and "prometheus-client" in lines[0]
    # Off, the same install loads the config and never imports the package.
    with_metrics(config, {"enable": False})
    off = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); import imgproxy; "
                          "imgproxy.load_config(%r); print('prometheus_client' in sys.modules)"
                          % (str(ROOT), str(config))], capture_output=True, text=True, env=env)
    assert off.returncode == 0 and off.stdout.strip() == "False", off.stderr


@pytest.mark.parametrize("metrics, word", [
    ({"enable": "yes"}, "metrics.enable"),
    ({"enable": True, "token": "short"}, "metrics.token"),
    ({"enable": True, "token": 12345678901234567}, "metrics.token"),
    ({"enable": True, "token": " " + TOKEN + " "}, "metrics.token"),
    ({"enable": True, "tokens": TOKEN}, "metrics.tokens"),
    ([], "metrics"),
], ids=["enable-not-bool", "short-token", "token-not-string", "token-with-spaces", "unknown-key", "not-object"])
def test_bad_metrics_config_is_one_line_naming_the_key(make_config, metrics, word):
    out = run_server(with_metrics(make_config(), metrics))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and word in out.stderr, out.stderr
