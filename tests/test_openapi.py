"""The OpenAPI document: shipped, served, complete, and the server fuzzed with it
by schemathesis (a short run here, a long one with --slow): no 5xx, and every
answer matches the document."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import imgproxy
from conftest import ROOT
from helpers import PatchedServer


def test_shipped_openapi_json_is_the_constant():
    shipped = json.loads((ROOT / "openapi.json").read_text(encoding="utf-8"))
    assert shipped == json.loads(json.dumps(imgproxy.OPENAPI)), (
        "openapi.json is stale: python3 -c 'import imgproxy, json; "
        "print(json.dumps(imgproxy.OPENAPI, indent=2))' > openapi.json")


async def test_served_at_openapi_json(make_client):
    client = await make_client()
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert await resp.json() == json.loads(json.dumps(imgproxy.OPENAPI))


def test_every_route_is_documented_with_its_errors():
    config = imgproxy.Config()
    app = imgproxy.create_app(config)
    documented = {(path, method.upper()) for path, item in imgproxy.OPENAPI["paths"].items()
                  for method in item if method != "parameters"}
    routed = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "*"):
            continue
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        routed.add((path, route.method))
    assert routed == documented
    schemas = imgproxy.OPENAPI["components"]["schemas"]
    assert set(schemas["Error"]["required"]) == {"error", "code"}
    for path, item in imgproxy.OPENAPI["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            for status, resp in op["responses"].items():
                if int(status) >= 400 and path != "/healthz":
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/Error"), (path, method, status)
            if op.get("security"):
                assert "401" in op["responses"] and "429" in op["responses"], (path, method)
    assert re.fullmatch(schemas["ImageInfo"]["properties"]["md5"]["pattern"].strip("^$"), "0" * 32)


def run_schemathesis(make_config, tmp_path, max_examples: int, max_time: int | None) -> None:
    pytest.importorskip("schemathesis")
    # The limiter would answer the fuzzer's wrong passwords with 429 after ten
    # tries and hide the routes behind it; it has tests of its own.
    server = PatchedServer(make_config(), {"AUTH_FAIL_LIMIT": 10**9})
    try:
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.base_url + "/openapi.json",
               "--checks", "all", "--exclude-checks", "positive_data_acceptance,negative_data_rejection",
               # one worker: hypothesis describing lambdas in two threads at once trips a
               # CPython 3.11 ast.parse race ("AST constructor recursion depth mismatch")
               "--auth", "alice:alice123", "--max-examples", str(max_examples), "--workers", "1",
               "--request-timeout", "30", "--suppress-health-check", "all", "--seed", "1"]
        if max_time:  # the run then repeats fuzzing until the time is spent
            cmd += ["--max-time", str(max_time)]
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=(max_time or 60) + 120)
        report = out.stdout[-6000:] + out.stderr[-2000:]
        assert out.returncode == 0, report
        assert "Traceback" not in server.log and " ERROR " not in server.log, server.log[-4000:]
    finally:
        server.kill()


def test_schemathesis_short_run(make_config, tmp_path):
    run_schemathesis(make_config, tmp_path, max_examples=5, max_time=None)


@pytest.mark.slow
def test_schemathesis_long_run(make_config, tmp_path):
    run_schemathesis(make_config, tmp_path, max_examples=300, max_time=None)
