"""Several imgproxy processes sharing one bucket (SeaweedFS) and one database (PostgreSQL).

Each node is `python3 imgproxy.py --config ...` with its own data_dir and port, as
on separate machines behind a load balancer (same `base_url`). The checks of what
is in the bucket and the database use the engines' own doors (signed S3 requests
of tests/engines.py, psql), not the server under test.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import pytest

from conftest import ALICE, BOB, CAROL, ROOT
from helpers import ServerProcess, bearer, http_exchange, png_bytes, poll, seeded_png

pytest.importorskip("aiobotocore", reason="the S3 backend needs aiobotocore: pip install aiobotocore")
pytest.importorskip("asyncpg", reason="the PostgreSQL backend needs asyncpg: pip install asyncpg")

BASE_URL = "http://img.test"    # what the load balancer's clients see, the same for every node
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
COHERENCE_SECONDS = 1.0         # API.md: a change on one node holds on every node within this


@dataclasses.dataclass
class Cluster:
    s3: "object"                 # engines.S3Engine
    pg: "object"                 # engines.PgEngine
    bucket: str
    database: str
    configs: list[Path]
    nodes: list[ServerProcess]

    def call(self, node: int, method: str, path: str, body: Optional[bytes] = None,
             headers: Optional[dict] = None, timeout: float = 30.0):
        """(status, headers, body) of one request to one node."""
        return http_exchange(method, self.nodes[node].base_url + path, body, headers, timeout)

    def upload(self, node: int, data: bytes, name: str = "x.png", who: dict = BOB) -> tuple[int, dict]:
        status, _, body = self.call(node, "PUT", f"/upload/{name}", data,
                                    {**who, "Content-Type": "application/octet-stream"})
        assert status in (200, 201), (status, body[:300])
        return status, json.loads(body)

    def image_path(self, info: dict) -> str:
        assert info["url"].startswith(BASE_URL + "/i/"), info["url"]
        return info["url"][len(BASE_URL):]

    def sql(self, query: str) -> list[list[str]]:
        out = self.pg.psql(query, database=self.database)
        return [line.split("|") for line in out.splitlines() if line]

    def rows(self) -> dict[str, tuple[str, int]]:
        """md5 -> (ext, size) of every image row."""
        return {m: (ext, int(size)) for m, ext, size in self.sql("SELECT md5, ext, size FROM images")}

    def objects(self) -> dict[str, int]:
        """key -> size of every object in the bucket (all pages)."""
        found, token = {}, None
        while True:
            query = "list-type=2&max-keys=1000" + (f"&continuation-token={token}" if token else "")
            status, body = self.s3.request("GET", f"/{self.bucket}?{query}")
            assert status == 200, body[:300]
            root = ET.fromstring(body)
            for entry in root.iter(S3_NS + "Contents"):
                found[entry.find(S3_NS + "Key").text] = int(entry.find(S3_NS + "Size").text)
            if root.findtext(S3_NS + "IsTruncated") != "true":
                return found
            token = root.findtext(S3_NS + "NextContinuationToken")

    def object_bytes(self, key: str) -> Optional[bytes]:
        status, body = self.s3.request("GET", f"/{self.bucket}/{key}")
        return body if status == 200 else None

    def unfinished_uploads(self) -> list[str]:
        status, body = self.s3.request("GET", f"/{self.bucket}?uploads")
        assert status == 200, body[:300]
        return [e.findtext(S3_NS + "Key") for e in ET.fromstring(body).iter(S3_NS + "Upload")]

    def problems(self, *, claimed_ok: bool = True) -> list[str]:
        """The cluster's invariants, as store_problems() states them for one node:
        every row has its object, complete (its bytes hash to its name, its size is
        the row's); every object has its row, unless an upload's claim protects it
        (`claimed_ok`); no hold without its image."""
        problems = []
        rows, objects = self.rows(), self.objects()
        claims = {m for (m,) in self.sql("SELECT md5 FROM claims")}
        for md5, (ext, size) in rows.items():
            key = f"{md5[:2]}/{md5[2:4]}/{md5}.{ext}"
            data = self.object_bytes(key) if key in objects else None
            if data is None:
                problems.append(f"row without object: {key}")
            elif hashlib.md5(data).hexdigest() != md5 or len(data) != size:
                problems.append(f"partial or corrupt object: {key} ({len(data)} bytes, row says {size})")
        for key in objects:
            md5, _, ext = key.rpartition("/")[2].partition(".")
            if rows.get(md5, ("",))[0] != ext and not (claimed_ok and md5 in claims):
                problems.append(f"object without row: {key}")
        orphan_holds = self.sql("SELECT COUNT(*) FROM holds WHERE md5 NOT IN (SELECT md5 FROM images)")
        if orphan_holds[0][0] != "0":
            problems.append(f"{orphan_holds[0][0]} holds without an image row")
        return problems

    def cleanup(self, node: int) -> subprocess.CompletedProcess:
        """`cleanup.py --config` of one node, as cron or an operator runs it."""
        return subprocess.run([sys.executable, str(ROOT / "cleanup.py"), "--config", str(self.configs[node])],
                              capture_output=True, text=True, timeout=120)


def node_config(make_config, storage: dict, database_url: str, cleanup: Optional[dict] = None) -> Path:
    """A node's config.json: its own data_dir, the shared bucket and database."""
    path = make_config(server={"base_url": BASE_URL}, cleanup=cleanup)
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["storage"] = storage
    raw["database"] = {"url": database_url}
    path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def make_cluster(s3_engine, pg_engine, make_config, server_process):
    """make_cluster(nodes=3, cleanup=None) -> Cluster: a fresh bucket and database,
    `nodes` server processes started together (killed at teardown)."""
    def make(nodes: int = 3, cleanup: Optional[dict] = None) -> Cluster:
        bucket = s3_engine.new_bucket()
        url = pg_engine.new_database()
        configs = [node_config(make_config, s3_engine.storage_config(bucket), url, cleanup) for _ in range(nodes)]
        with concurrent.futures.ThreadPoolExecutor(nodes) as pool:
            started = list(pool.map(server_process, configs))
        return Cluster(s3_engine, pg_engine, bucket, url.rsplit("/", 1)[1], configs, started)

    return make


def test_upload_on_one_node_is_served_listed_and_found_on_the_others(make_cluster):
    cluster = make_cluster()
    data = png_bytes((50, 40), (10, 120, 200))
    status, info = cluster.upload(0, data, "sky.png")
    assert status == 201 and info["status"] == "uploaded"
    md5 = hashlib.md5(data).hexdigest()
    assert info["md5"] == md5 and info["url"] == f"{BASE_URL}/i/{md5}.png"

    status, headers, body = cluster.call(1, "GET", cluster.image_path(info))
    assert status == 200 and body == data
    assert headers["Content-Type"] == "image/png"
    assert headers["ETag"] == f'"{md5}"'
    assert headers["Cache-Control"].startswith("public, max-age=") and "immutable" in headers["Cache-Control"]
    status, headers, body = cluster.call(1, "GET", cluster.image_path(info), headers={"Range": "bytes=0-7"})
    assert status == 206 and body == data[:8]

    status, _, body = cluster.call(2, "GET", f"/api/images/{md5}", headers=BOB)
    assert status == 200
    assert {k: v for k, v in json.loads(body).items() if k != "access_count"} == \
        {k: v for k, v in info.items() if k not in ("status", "access_count")}
    status, _, body = cluster.call(2, "GET", "/api/images", headers=BOB)
    assert status == 200 and [i["md5"] for i in json.loads(body)["images"]] == [md5]
    # The same bytes again through a third node: a dedup hit, not a second object.
    status, again = cluster.upload(2, data, "sky-again.png", CAROL)
    assert status == 200 and again["status"] == "exists" and again["url"] == info["url"]
    assert list(cluster.objects()) == [f"{md5[:2]}/{md5[2:4]}/{md5}.png"]
    assert cluster.problems(claimed_ok=False) == []


def seconds_until(predicate, timeout: float, what: str) -> float:
    """How long it took `predicate()` to hold (asked every 20 ms)."""
    began = time.monotonic()
    poll(predicate, timeout, what)
    return time.monotonic() - began


def test_delete_on_one_node_is_a_404_on_the_others_within_a_second(make_cluster):
    cluster = make_cluster()
    data = png_bytes((30, 30), (200, 30, 30))
    _, info = cluster.upload(0, data)
    path = cluster.image_path(info)
    for node in (1, 2):   # node 1 serves it from its cache from now on; node 2 too
        for _ in range(2):
            assert cluster.call(node, "GET", path)[0] == 200
    status, _, _ = cluster.call(0, "DELETE", f"/api/images/{info['md5']}", headers=BOB)
    assert status == 204
    took = seconds_until(lambda: all(cluster.call(n, "GET", path)[0] == 404 for n in (1, 2)),
                         COHERENCE_SECONDS, "the delete to reach the other nodes' caches")
    for node in (0, 1, 2):
        assert cluster.call(node, "GET", f"/api/images/{info['md5']}", headers=BOB)[0] == 404
        assert cluster.call(node, "HEAD", path)[0] == 404
    assert cluster.objects() == {} and cluster.rows() == {}
    assert cluster.problems(claimed_ok=False) == []
    print(f"delete on node 0 honoured by nodes 1 and 2 after {took * 1000:.0f} ms")


def test_a_token_revoked_on_one_node_is_refused_on_the_others_at_once(make_cluster):
    cluster = make_cluster()
    status, _, body = cluster.call(0, "POST", "/api/tokens", json.dumps({"name": "laptop"}).encode(),
                                   {**BOB, "Content-Type": "application/json"})
    assert status == 201
    token = json.loads(body)
    for node in (1, 2):
        assert cluster.call(node, "GET", "/api/images", headers=bearer(token["token"]))[0] == 200
    _, info = cluster.upload(1, seeded_png(1), who=bearer(token["token"]))
    status, _, _ = cluster.call(0, "DELETE", f"/api/tokens/{token['id']}", headers=BOB)
    assert status == 204
    for node in (1, 2, 0):   # the very next request, no wait
        status, _, body = cluster.call(node, "GET", "/api/images", headers=bearer(token["token"]))
        assert status == 401, body
        status, _, body = cluster.call(node, "PUT", "/upload/y.png", seeded_png(2),
                                       {**bearer(token["token"]), "Content-Type": "application/octet-stream"})
        assert status == 401, body
    # What the token uploaded stays: it belongs to bob, not to the token.
    assert cluster.call(2, "GET", cluster.image_path(info))[0] == 200
    assert len(cluster.rows()) == 1


def test_renew_and_expiry_across_nodes(make_cluster):
    """A renewal on one node keeps the image alive on a node that cached it before;
    once expired it is a 404 everywhere, and one node's pass removes its object."""
    life = 3.0
    cluster = make_cluster(cleanup={"expire_days": life / 86400})
    data = png_bytes((20, 20), (5, 5, 250))
    _, info = cluster.upload(0, data)
    born = time.time()
    path, md5 = cluster.image_path(info), info["md5"]
    assert cluster.call(1, "GET", path)[0] == 200   # cached on node 1 with the first expiry
    time.sleep(1.2)
    status, _, body = cluster.call(2, "POST", f"/api/images/{md5}/renew", headers=BOB)
    assert status == 200
    renewed = json.loads(body)["expire_at"]
    assert renewed > info["expire_at"]
    status, _, body = cluster.call(1, "GET", f"/api/images/{md5}", headers=BOB)
    assert status == 200 and json.loads(body)["expire_at"] == renewed
    # Past the first expiry, before the renewed one: node 1 serves it still.
    time.sleep(max(0.0, born + life + 0.2 - time.time()))
    status, headers, body = cluster.call(1, "GET", path)
    assert status == 200 and body == data, "node 1 judged the image by the expiry it had cached"
    # Past the renewed expiry: gone on every node, though the row and object remain.
    poll(lambda: all(cluster.call(n, "GET", path)[0] == 404 for n in (0, 1, 2)), life + 2,
         "the renewed image to expire on every node")
    for node in (0, 1, 2):
        assert cluster.call(node, "GET", f"/api/images/{md5}", headers=BOB)[0] == 404
    assert len(cluster.objects()) == 1 and list(cluster.rows()) == [md5]
    done = cluster.cleanup(2)
    assert done.returncode == 0, done.stderr
    assert "1 expired images" in done.stdout, done.stdout
    assert cluster.objects() == {} and cluster.rows() == {}
    assert cluster.problems(claimed_ok=False) == []
