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
import http.client
import json
import signal
import os
import re
import socket
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import pytest

from conftest import ALICE, BOB, CAROL, ROOT
from helpers import ServerProcess, bearer, http_exchange, noise_png, png_bytes, poll, request_bytes, seeded_png

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
    start_node: "object" = dataclasses.field(repr=False, default=None)   # the server_process fixture

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

    def restart(self, cleanup: Optional[dict] = None) -> None:
        """Stop every node (SIGTERM), change the configs' cleanup section, start them together."""
        for node in self.nodes:
            assert node.terminate() == 0, node.log[-2000:]
        if cleanup is not None:
            for path in self.configs:
                raw = json.loads(path.read_text(encoding="utf-8"))
                raw["cleanup"].update(cleanup)
                path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
        with concurrent.futures.ThreadPoolExecutor(len(self.configs)) as pool:
            self.nodes = list(pool.map(self.start_node, self.configs))

    def server_errors(self) -> list[str]:
        """Log lines of requests that ended in a 500 (ours, or aiohttp's for what escaped us)."""
        return [line for node in self.nodes for line in node.log.splitlines()
                if "unexpected error" in line or "Error handling request" in line]

    def put_object(self, md5: str, data: bytes, ext: str = "png") -> str:
        """An object written straight into the bucket (as a node that died after its PUT leaves it)."""
        key = f"{md5[:2]}/{md5[2:4]}/{md5}.{ext}"
        status, body = self.s3.request("PUT", f"/{self.bucket}/{key}", data)
        assert status == 200, body[:300]
        return key

    def cleanup(self, node: int, patches: Optional[dict] = None) -> subprocess.CompletedProcess:
        """`cleanup.py --config` of one node, as cron or an operator runs it;
        `patches` sets imgproxy's constants first (as for server_process)."""
        args = ["--config", str(self.configs[node])]
        command = [str(ROOT / "cleanup.py"), *args]
        if patches:
            sets = "".join(f"imgproxy.{k} = {v!r}; " for k, v in patches.items())
            command = ["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import imgproxy, cleanup; {sets}"
                             f"sys.exit(cleanup.main({args!r}))"]
        return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120)


def node_config(make_config, storage: dict, database_url: str, cleanup: Optional[dict] = None,
                server: Optional[dict] = None) -> Path:
    """A node's config.json: its own data_dir, the shared bucket and database."""
    path = make_config(server={"base_url": BASE_URL, **(server or {})}, cleanup=cleanup)
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["storage"] = storage
    raw["database"] = {"url": database_url}
    path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def make_cluster(s3_engine, pg_engine, make_config, server_process):
    """make_cluster(nodes=3, cleanup=None, server=None, patches=None, pg_settings=None) -> Cluster:
    a fresh bucket and database, `nodes` server processes started together (killed at
    teardown); `cleanup` and `server` go into every node's config, `patches` as for
    server_process, `pg_settings` are the database's own settings."""
    def make(nodes: int = 3, cleanup: Optional[dict] = None, server: Optional[dict] = None,
             patches: Optional[dict] = None, pg_settings: Optional[dict] = None) -> Cluster:
        bucket = s3_engine.new_bucket()
        url = pg_engine.new_database()
        for name, value in (pg_settings or {}).items():   # before any node connects
            pg_engine.psql(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET {name} = {value}")
        configs = [node_config(make_config, s3_engine.storage_config(bucket), url, cleanup, server)
                   for _ in range(nodes)]

        def start(config: Path) -> ServerProcess:
            return server_process(config, patches=patches)

        with concurrent.futures.ThreadPoolExecutor(nodes) as pool:
            started = list(pool.map(start, configs))
        return Cluster(s3_engine, pg_engine, bucket, url.rsplit("/", 1)[1], configs, started, start)

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
    variant = f"/i/{info['md5']}/160.webp"
    for node in (1, 2):   # node 1 serves it from its cache from now on; node 2 too
        for _ in range(2):
            assert cluster.call(node, "GET", path)[0] == 200
            assert cluster.call(node, "GET", variant)[0] == 200   # rendered once, kept on that node
    status, _, _ = cluster.call(0, "DELETE", f"/api/images/{info['md5']}", headers=BOB)
    assert status == 204
    took = seconds_until(lambda: all(cluster.call(n, "GET", p)[0] == 404 for n in (1, 2) for p in (path, variant)),
                         COHERENCE_SECONDS, "the delete to reach the other nodes' caches")
    for node in (0, 1, 2):
        assert cluster.call(node, "GET", f"/api/images/{info['md5']}", headers=BOB)[0] == 404
        assert cluster.call(node, "HEAD", path)[0] == 404
    assert cluster.objects() == {} and cluster.rows() == {}
    assert cluster.problems(claimed_ok=False) == []
    print(f"delete on node 0 honoured by nodes 1 and 2 after {took * 1000:.0f} ms")


def test_a_token_revoked_on_one_node_is_refused_on_the_others_at_once(make_cluster):
    cluster = make_cluster(nodes=2)
    status, _, body = cluster.call(0, "POST", "/api/tokens", json.dumps({"name": "laptop"}).encode(),
                                   {**BOB, "Content-Type": "application/json"})
    assert status == 201
    token = json.loads(body)
    for node in (0, 1):
        assert cluster.call(node, "GET", "/api/images", headers=bearer(token["token"]))[0] == 200
    _, info = cluster.upload(1, seeded_png(1), who=bearer(token["token"]))
    status, _, _ = cluster.call(0, "DELETE", f"/api/tokens/{token['id']}", headers=BOB)
    assert status == 204
    for node in (1, 0):   # the very next request, no wait
        status, _, body = cluster.call(node, "GET", "/api/images", headers=bearer(token["token"]))
        assert status == 401, body
        status, _, body = cluster.call(node, "PUT", "/upload/y.png", seeded_png(2),
                                       {**bearer(token["token"]), "Content-Type": "application/octet-stream"})
        assert status == 401, body
    # What the token uploaded stays: it belongs to bob, not to the token.
    assert cluster.call(0, "GET", cluster.image_path(info))[0] == 200
    assert len(cluster.rows()) == 1


def test_renew_and_expiry_across_nodes(make_cluster):
    """A renewal on one node keeps the image alive on a node that cached it before;
    once expired it is a 404 everywhere, and one node's pass removes its object."""
    life = 2.0
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


def test_identical_uploads_racing_on_every_node_make_one_object_and_one_row(make_cluster):
    cluster = make_cluster()
    data = seeded_png(64, size=(300, 200))
    md5 = hashlib.md5(data).hexdigest()
    users = (BOB, CAROL, ALICE)

    def send(i: int):
        return cluster.call(i % 3, "PUT", f"/upload/same-{i}.png", data,
                            {**users[i % 3], "Content-Type": "application/octet-stream"}, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(send, range(64)))
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) <= {200, 201}, [(s, b[:200]) for s, _, b in answers if s not in (200, 201)]
    assert statuses.count(201) == 1, statuses
    infos = [json.loads(body) for _, _, body in answers]
    assert {(i["md5"], i["url"]) for i in infos} == {(md5, f"{BASE_URL}/i/{md5}.png")}
    assert list(cluster.objects()) == [f"{md5[:2]}/{md5[2:4]}/{md5}.png"]
    assert list(cluster.rows()) == [md5]
    assert sorted(u for (u,) in cluster.sql("SELECT username FROM holds")) == ["alice", "bob", "carol"]
    assert cluster.sql("SELECT COUNT(*) FROM claims") == [["0"]], "every publish drops its claim"
    assert cluster.problems(claimed_ok=False) == []
    for node in range(3):
        assert cluster.call(node, "GET", f"/i/{md5}.png")[2] == data


SUMMARY_RE = re.compile(r"cleanup removed: (\d+) expired images, (\d+) orphan files, (\d+) dangling rows")


def pass_counts(summary: str) -> Optional[tuple[int, int, int]]:
    """(expired, orphan objects, dangling rows) of a pass's summary line; None for a skipped pass."""
    if "cleanup skipped" in summary:
        return None
    found = SUMMARY_RE.search(summary)
    assert found, summary
    return tuple(int(n) for n in found.groups())


def seed_cleanup_work(cluster: Cluster) -> dict:
    """Expired images (uploaded through every node), objects no row holds, rows
    whose object is gone, and objects under fresh and stale claims."""
    expired = [cluster.upload(i % 3, seeded_png(100 + i))[1]["md5"] for i in range(9)]
    orphans = [hashlib.md5(seeded_png(200 + i)).hexdigest() for i in range(3)]
    for md5, i in zip(orphans, range(3)):
        cluster.put_object(md5, seeded_png(200 + i))
    now = time.time()
    dangling = [hashlib.md5(seeded_png(300 + i)).hexdigest() for i in range(2)]
    for md5 in dangling:
        cluster.sql(f"INSERT INTO images (md5, ext, format, mime, name, size, width, height, created_at, "
                    f"expire_at) VALUES ('{md5}', 'png', 'PNG', 'image/png', 'lost.png', 10, 6, 4, {now}, "
                    f"{now + 86400})")
    # An upload in flight on another node (claimed, object written, row not yet
    # committed) keeps its object; a claim older than CLAIM_SECONDS (a node that
    # died an hour ago) protects nothing.
    fresh, stale = (hashlib.md5(seeded_png(400 + i)).hexdigest() for i in range(2))
    cluster.put_object(fresh, seeded_png(400))
    cluster.put_object(stale, seeded_png(401))
    cluster.sql(f"INSERT INTO claims (md5, claimed_at) VALUES ('{fresh}', {now}), ('{stale}', {now - 3601})")
    last = json.loads(cluster.call(0, "GET", f"/api/images/{expired[-1]}", headers=BOB)[2])
    return {"expired": expired, "orphans": orphans + [stale], "dangling": dangling, "claimed": fresh,
            "expire_at": last["expire_at"]}


def assert_cleaned(cluster: Cluster, seeded: dict) -> None:
    claimed_key = f"{seeded['claimed'][:2]}/{seeded['claimed'][2:4]}/{seeded['claimed']}.png"
    assert list(cluster.objects()) == [claimed_key]
    assert cluster.rows() == {}
    assert cluster.problems() == []


@pytest.fixture
def expiring_cluster(make_cluster):
    """Three nodes whose images live one second, with work for a cleanup pass waiting."""
    cluster = make_cluster(cleanup={"expire_days": 1 / 86400})
    seeded = seed_cleanup_work(cluster)
    poll(lambda: all(cluster.call(0, "GET", f"/api/images/{m}", headers=BOB)[0] == 404
                     for m in seeded["expired"]), 5, "the images to expire")
    return cluster, seeded


def test_cleanup_run_on_every_node_at_once_does_the_work_once(expiring_cluster):
    cluster, seeded = expiring_cluster
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(cluster.cleanup, range(3)))
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr for r in runs]
    counts = [pass_counts(r.stdout) for r in runs]
    # cleanup.py has no slot to skip by: a pass that starts after another one
    # finished runs and finds nothing. Either way the work is done exactly once.
    busy = [c for c in counts if c is not None and c != (0, 0, 0)]
    assert busy == [(len(seeded["expired"]), len(seeded["orphans"]), len(seeded["dangling"]))], \
        [r.stdout for r in runs]
    assert_cleaned(cluster, seeded)
    print("cleanup.py on three nodes at once:", [r.stdout.strip() for r in runs])


def test_scheduled_cleanup_of_nodes_starting_together_runs_one_pass(expiring_cluster):
    cluster, seeded = expiring_cluster
    # No pass has ever run: each node catches up as it starts, all three at once.
    cluster.restart(cleanup={"enable": True})

    def summaries() -> list[str]:
        return [line for node in cluster.nodes for line in node.log.splitlines()
                if "cleanup removed" in line or "cleanup skipped" in line]

    poll(lambda: any("cleanup removed" in line for line in summaries()), 20, "the start-up cleanup pass")
    # A node that read `last_cleanup` after that pass finished has nothing to catch
    # up and logs nothing; one that started before either finds the lock taken or
    # the slot done: skipped. Give the slower ones a moment to say so.
    time.sleep(1.0)
    counts = [pass_counts(line) for line in summaries()]
    assert [c for c in counts if c is not None] == \
        [(len(seeded["expired"]), len(seeded["orphans"]), len(seeded["dangling"]))], summaries()
    assert_cleaned(cluster, seeded)


MB = 1024 * 1024


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A valid 20 MB PNG: above S3_MULTIPART_THRESHOLD, so it goes to the store in parts."""
    return noise_png(20 * MB, seed=14)


def start_slow_upload(node: ServerProcess, data: bytes, sent: int) -> socket.socket:
    """A PUT whose first `sent` bytes of body are on their way; the rest never come."""
    sock = socket.create_connection(("127.0.0.1", node.port))
    sock.sendall(request_bytes("PUT", "/upload/big.png", {**BOB, "Content-Type": "application/octet-stream"},
                               length=len(data)))
    for at in range(0, sent, MB):
        sock.sendall(data[at:min(sent, at + MB)])
        time.sleep(0.01)
    return sock


def test_a_node_killed_while_receiving_a_large_upload_leaves_nothing_behind(make_cluster, big_png):
    cluster = make_cluster(nodes=2, server={"max_upload_mb": 64})
    _, kept = cluster.upload(1, seeded_png(7))
    sock = start_slow_upload(cluster.nodes[0], big_png, len(big_png) // 2)
    leftover = poll(lambda: list((cluster.configs[0].parent / "data" / "tmp").glob("upload-*.part")), 10,
                    "the upload to reach node 0's tmp/")
    cluster.nodes[0].proc.kill()
    cluster.nodes[0].proc.wait(10)
    sock.close()
    assert cluster.objects() == {f"{kept['md5'][:2]}/{kept['md5'][2:4]}/{kept['md5']}.png":
                                 len(seeded_png(7))}
    assert cluster.problems(claimed_ok=False) == []
    # The next pass (cleanup.py with the dead node's config) sweeps its half file,
    # which no live process holds any more; the shared store needed nothing.
    done = cluster.cleanup(0)
    assert done.returncode == 0, done.stderr
    assert pass_counts(done.stdout) == (0, 0, 0) and "1 temp files" in done.stdout, done.stdout
    assert not any(p.exists() for p in leftover)
    assert cluster.problems(claimed_ok=False) == []


def test_a_node_killed_while_writing_a_large_upload_to_the_store(make_cluster, big_png):
    # One part at a time: the multipart upload lasts long enough to be caught in the act.
    cluster = make_cluster(nodes=2, server={"max_upload_mb": 64}, patches={"S3_PART_CONCURRENCY": 1})
    md5 = hashlib.md5(big_png).hexdigest()
    key = f"{md5[:2]}/{md5[2:4]}/{md5}.png"
    sock = start_slow_upload(cluster.nodes[0], big_png, len(big_png))
    poll(lambda: key in cluster.unfinished_uploads(), 20, "node 0 to start the multipart upload", step=0.005)
    cluster.nodes[0].proc.kill()
    cluster.nodes[0].proc.wait(10)
    sock.close()
    # Nothing of it is visible: no object (S3 shows one only once complete), no row;
    # only the claim node 0 took before writing, and the unfinished upload's parts.
    assert cluster.objects() == {} and cluster.rows() == {}
    assert cluster.sql("SELECT md5 FROM claims") == [[md5]]
    assert cluster.call(1, "GET", f"/i/{md5}.png")[0] == 404
    assert cluster.problems(claimed_ok=False) == []
    # The next pass cannot tell the dead upload from one still running on a live
    # node until CLAIM_SECONDS (an hour) have passed: it leaves the parts and the claim.
    done = cluster.cleanup(1)
    assert done.returncode == 0 and pass_counts(done.stdout) == (0, 0, 0), done.stdout + done.stderr
    assert "unfinished" not in done.stdout
    assert cluster.unfinished_uploads() == [key] and cluster.sql("SELECT md5 FROM claims") == [[md5]]
    assert cluster.problems(claimed_ok=False) == []
    # A pass an hour later (here: with CLAIM_SECONDS shortened to nothing) aborts
    # the upload, which frees its parts, and forgets the claim.
    done = cluster.cleanup(1, patches={"CLAIM_SECONDS": 0.0})
    assert done.returncode == 0 and "1 unfinished uploads" in done.stdout, done.stdout + done.stderr
    assert cluster.unfinished_uploads() == [] and cluster.sql("SELECT md5 FROM claims") == []
    assert cluster.problems(claimed_ok=False) == []
    # The same upload through the surviving node completes: its claim replaces the dead one's.
    status, _, body = cluster.call(1, "PUT", "/upload/big.png", big_png,
                                   {**BOB, "Content-Type": "application/octet-stream"}, timeout=120)
    assert status == 201, body[:300]
    assert cluster.objects() == {key: len(big_png)}
    assert cluster.sql("SELECT COUNT(*) FROM claims") == [["0"]]
    assert cluster.problems(claimed_ok=False) == []


CUT = -1   # Answer.status of a response whose body ended short


@dataclasses.dataclass
class Answer:
    what: str            # "upload" or "get"
    node: int
    status: int          # 0: no HTTP answer at all (connection error, timeout)
    seconds: float
    headers: dict
    body: bytes
    data: bytes = b""    # what was sent (uploads) or expected (gets)


class Load:
    """Uploads of new images and GETs of known ones, from a few threads against
    every node, until stopped; every answer is kept."""

    def __init__(self, cluster: Cluster, served: list[tuple[str, bytes]], threads: int = 6):
        self.cluster, self.served = cluster, served
        self.answers: list[Answer] = []
        self.stopping = False
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)
        self.workers = [self.pool.submit(self._work, i) for i in range(threads)]

    def _one(self, what: str, node: int, method: str, path: str, body: Optional[bytes], headers: dict,
             data: bytes) -> None:
        began = time.monotonic()
        try:
            status, got_headers, got = self.cluster.call(node, method, path, body, headers, timeout=30)
        except OSError as exc:   # a node that does not answer at all: the test fails on it
            status, got_headers, got = 0, {}, repr(exc).encode()
        except http.client.IncompleteRead as exc:   # the body was cut after the status line
            status, got_headers, got = CUT, {}, repr(exc).encode()
        self.answers.append(Answer(what, node, status, time.monotonic() - began, dict(got_headers), got, data))

    def _work(self, worker: int) -> None:
        n = 0
        while not self.stopping:
            n += 1
            node = (worker + n) % len(self.cluster.nodes)
            if worker % 2 == 0:
                data = seeded_png(10_000 * (worker + 1) + n, size=(24, 16))
                self._one("upload", node, "PUT", f"/upload/load-{worker}-{n}.png", data,
                          {**BOB, "Content-Type": "application/octet-stream"}, data)
            else:
                path, data = self.served[n % len(self.served)]
                self._one("get", node, "GET", path, None, {}, data)
            time.sleep(0.01)

    def stop(self) -> list[Answer]:
        self.stopping = True
        for worker in self.workers:
            worker.result(60)
        self.pool.shutdown()
        return self.answers


def assert_clear_refusals(answers: list[Answer], max_seconds: float, cut_ok: bytes = b"") -> None:
    """Each answer a success or a JSON 503 with Retry-After, none slower than
    max_seconds. `cut_ok`: an image whose GET may end short (the store crashed while
    the node relayed it; the status line had gone out with the first bytes)."""
    for a in answers:
        if a.status == CUT and cut_ok and a.what == "get" and a.data == cut_ok:
            continue
        assert a.status in (200, 201, 503), (a.what, a.node, a.status, a.body[:300])
        if a.status == 503:
            assert a.headers.get("Retry-After", "").isdigit(), a.headers
            error = json.loads(a.body)
            assert error["code"] == "unavailable" and error["error"], error
        assert a.seconds < max_seconds, (a.what, a.status, a.seconds)


def assert_nothing_acknowledged_lost(cluster: Cluster, answers: list[Answer]) -> int:
    """Every upload answered 200/201 is served, byte for byte, by every node."""
    acknowledged = [(json.loads(a.body), a.data) for a in answers if a.what == "upload" and a.status in (200, 201)]
    for info, data in acknowledged:
        for node in range(len(cluster.nodes)):
            status, _, body = cluster.call(node, "GET", cluster.image_path(info))
            assert status == 200 and body == data, (node, info["md5"], status)
    return len(acknowledged)


@pytest.mark.parametrize("crash", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["sigterm", "sigkill"])
def test_object_store_stopped_under_load_gives_clear_503s_then_recovers(make_cluster, s3_engine, crash):
    cluster = make_cluster(nodes=2)
    # Small images are served from the nodes' memory; a large one from each node's own
    # copy once its first GET has fetched it; a large one never asked for before streams
    # from the store.
    served, md5s = [], []
    for i, data in enumerate([seeded_png(50), seeded_png(51), noise_png(MB, seed=5)]):
        _, info = cluster.upload(i % 2, data)
        served.append((cluster.image_path(info), data))
        md5s.append(info["md5"])
    _, untouched = cluster.upload(0, noise_png(MB, seed=6))
    for node in range(2):
        for path, _ in served:
            assert cluster.call(node, "GET", path)[0] == 200
    copied = md5s[2]
    for config in cluster.configs:
        copy = config.parent / "data" / "variants" / copied[:2] / copied[2:4] / f"{copied}-source.png"
        poll(copy.exists, 10, "the node's own copy of the large image")
    load = Load(cluster, served)
    try:
        time.sleep(0.5)
        s3_engine.stop(kill=crash)
        down_from = len(load.answers)
        time.sleep(1.0)
        # A large image no node has fetched yet can only come from the store.
        from_store = [cluster.call(node, "GET", cluster.image_path(untouched)) for node in range(2)]
        time.sleep(1.0)
        down_answers = list(load.answers[down_from:])
    finally:
        s3_engine.start()
    time.sleep(1.5)
    answers = load.stop()

    assert_clear_refusals(answers, max_seconds=8.0, cut_ok=served[2][1] if crash else b"")
    assert cluster.server_errors() == []
    refused = [a for a in down_answers if a.status == 503]
    assert any(a.what == "upload" for a in refused), "uploads went on while the store was down?"
    for status, headers, body in from_store:
        assert status == 503 and headers.get("Retry-After", "").isdigit(), (status, body[:200])
        assert json.loads(body)["code"] == "unavailable"
    held = [a for a in down_answers if a.what == "get"]
    assert held and all(a.status == 200 and a.body == a.data for a in held), \
        "images in the nodes' memory or on their disks are served while the store is down"
    # After the restart: every node takes uploads and serves everything again.
    recovered = answers[-12:]
    assert all(a.status in (200, 201) for a in recovered), [(a.what, a.status) for a in recovered]
    for node in range(2):
        assert cluster.call(node, "GET", "/healthz")[0] == 200
        for path, data in served:
            assert cluster.call(node, "GET", path)[2] == data
    kept = assert_nothing_acknowledged_lost(cluster, answers)
    assert cluster.problems() == []
    print(f"store down 2 s: {len(answers)} requests, {len(refused)} refused with 503, "
          f"{kept} uploads acknowledged and kept, slowest answer {max(a.seconds for a in answers):.2f} s")


def test_concurrent_first_gets_of_a_large_image_read_the_store_once(make_cluster):
    """The node's own copy is fetched when the image is first looked up; the first
    GETs wait for it instead of each streaming the object from the store as well."""
    cluster = make_cluster(nodes=1, server={"log_level": "DEBUG"})
    data = noise_png(MB, seed=9)
    _, info = cluster.upload(0, data)
    key = f"{info['md5'][:2]}/{info['md5'][2:4]}/{info['md5']}.png"
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # a connection each
        answers = list(pool.map(lambda _: cluster.call(0, "GET", cluster.image_path(info)), range(16)))
    assert {status for status, _, _ in answers} == {200}
    assert all(body == data for _, _, body in answers)
    reads = [line for line in cluster.nodes[0].log.splitlines() if f"object store: GET {key}" in line]
    assert len(reads) == 1, reads
    status, headers, body = cluster.call(0, "GET", cluster.image_path(info), headers={"Range": "bytes=10-19"})
    assert status == 206 and body == data[10:20]  # from the copy: still no second read
    assert len([line for line in cluster.nodes[0].log.splitlines() if f"object store: GET {key}" in line]) == 1


def test_a_frozen_store_that_still_accepts_connections_is_a_503_within_the_answer_bound(make_cluster):
    """SIGSTOP: the kernel still accepts connections for SeaweedFS, nothing answers.
    A GET that must read the store gives up after S3_ANSWER_SECONDS (here 2 s),
    retries included, instead of three 30 s read timeouts; memory keeps serving."""
    cluster = make_cluster(nodes=1, patches={"S3_ANSWER_SECONDS": 2.0})
    _, small = cluster.upload(0, seeded_png(80))
    _, large = cluster.upload(0, noise_png(MB, seed=8))  # streamed from the store, never asked for yet
    assert cluster.call(0, "GET", cluster.image_path(small))[0] == 200
    os.kill(cluster.s3.process.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        status, headers, body = cluster.call(0, "GET", cluster.image_path(large), timeout=60)
        took = time.monotonic() - began
        assert status == 503 and int(headers["Retry-After"]) > 0, (status, body[:200])
        assert took < 2.0 + 3.0, took  # the bound, plus slack for a loaded machine; not 3 x 30 s
        assert cluster.call(0, "GET", cluster.image_path(small))[0] == 200  # from memory meanwhile
    finally:
        os.kill(cluster.s3.process.pid, signal.SIGCONT)
    status, _, body = cluster.call(0, "GET", cluster.image_path(large), timeout=60)
    assert status == 200 and len(body) == large["size"]
    assert cluster.server_errors() == []


@pytest.mark.parametrize("mode", ["fast", pytest.param("immediate", marks=pytest.mark.slow)])
def test_database_stopped_under_load_gives_clear_503s_then_the_change_feed_returns(make_cluster, pg_engine, mode):
    # A crash: the test cluster commits asynchronously for speed, which a crash may
    # undo; an acknowledged upload must survive one, so this database waits for the disk.
    cluster = make_cluster(nodes=2, pg_settings={"synchronous_commit": "on"} if mode == "immediate" else None)
    served = []
    for i in range(2):
        data = seeded_png(60 + i)
        _, info = cluster.upload(i, data)
        served.append((cluster.image_path(info), data))
    load = Load(cluster, served)
    try:
        time.sleep(0.5)
        pg_engine.stop(mode=mode)
        down_from = len(load.answers)
        time.sleep(2.0)
        down_answers = list(load.answers[down_from:])
    finally:
        pg_engine.start()
    time.sleep(2.0)
    answers = load.stop()

    assert_clear_refusals(answers, max_seconds=8.0)
    assert cluster.server_errors() == []
    # The pool's failed reconnections: one line naming the error, no tracebacks.
    noisy = [node.log for node in cluster.nodes if "Traceback" in node.log or "connection floor" in node.log]
    assert not noisy, noisy[0][max(0, noisy[0].find("Traceback") - 400):][:3000]
    refused = [a for a in down_answers if a.status == 503]
    assert any(a.what == "upload" for a in refused), [(a.what, a.status) for a in down_answers]
    recovered = answers[-12:]
    assert all(a.status in (200, 201) for a in recovered), [(a.what, a.status, a.body[:100]) for a in recovered]
    kept = assert_nothing_acknowledged_lost(cluster, answers)
    assert cluster.problems() == []

    # The change feed is back: node 1 caches an image again, and a delete on
    # node 0 reaches it within the second, as before the outage.
    path, _ = served[0]
    for _ in range(2):
        assert cluster.call(1, "GET", path)[0] == 200
    md5 = path.rsplit("/", 1)[1].split(".")[0]
    assert cluster.call(0, "DELETE", f"/api/images/{md5}", headers=ALICE)[0] == 204
    took = seconds_until(lambda: cluster.call(1, "GET", path)[0] == 404, COHERENCE_SECONDS,
                         "a delete after the database restart to reach node 1")
    assert cluster.problems() == []
    print(f"database down 2 s: {len(answers)} requests, {len(refused)} refused with 503, {kept} uploads kept, "
          f"slowest answer {max(a.seconds for a in answers):.2f} s; delete seen after {took * 1000:.0f} ms")


def test_a_database_that_resets_new_connections_is_a_503_not_a_500(make_cluster, pg_engine):
    """A PostgreSQL shutting down accepts a connection and resets it: asyncpg lets
    that ConnectionResetError through, and it is the database's, not the client's."""
    cluster = make_cluster(nodes=1)
    _, info = cluster.upload(0, seeded_png(70))
    pg_engine.stop()
    resetter = socket.socket()
    try:
        resetter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        resetter.bind((pg_engine.host, pg_engine.port))
        resetter.listen(64)
        stop = False

        def reset_all() -> None:
            while not stop:
                try:
                    conn, _ = resetter.accept()
                except OSError:
                    return
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            resetting = pool.submit(reset_all)
            try:
                for method, path, body, headers in [
                        ("GET", cluster.image_path(info), None, {}),
                        ("GET", f"/api/images/{info['md5']}", None, BOB),
                        ("PUT", "/upload/z.png", seeded_png(71), {**BOB, "Content-Type": "image/png"})]:
                    status, got_headers, got = cluster.call(0, method, path, body, headers)
                    assert status == 503, (method, path, status, got[:200])
                    assert got_headers["Retry-After"] and json.loads(got)["code"] == "unavailable"
            finally:
                stop = True
                resetter.shutdown(socket.SHUT_RDWR)
                resetting.result(10)
    finally:
        resetter.close()
        pg_engine.start()
    assert cluster.server_errors() == []
    poll(lambda: cluster.call(0, "GET", cluster.image_path(info))[0] == 200, 10, "the node to reconnect")


def test_deletes_racing_uploads_of_the_same_bytes_on_other_nodes_never_lose_an_object(make_cluster):
    """The hazard of a shared bucket: a delete on one node removing the object that
    an upload on another node has just written for the same md5. Whatever order the
    race takes, a row never outlives its object."""
    cluster = make_cluster()
    data = seeded_png(80, size=(40, 40))
    md5 = hashlib.md5(data).hexdigest()
    path = f"/i/{md5}.png"

    def upload(node: int) -> int:
        return cluster.call(node, "PUT", "/upload/race.png", data,
                            {**BOB, "Content-Type": "application/octet-stream"})[0]

    def delete(node: int) -> int:
        return cluster.call(node, "DELETE", f"/api/images/{md5}", headers=ALICE)[0]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for round_ in range(15):
            moves = [pool.submit(upload, round_ % 3), pool.submit(delete, (round_ + 1) % 3),
                     pool.submit(upload, (round_ + 2) % 3)]
            statuses = [m.result() for m in moves]
            assert statuses[0] in (200, 201) and statuses[2] in (200, 201) and statuses[1] in (204, 404), statuses
            assert cluster.problems() == [], round_
            served = [cluster.call(n, "GET", path) for n in range(3)]
            if md5 in cluster.rows():
                assert all(s == 200 and body == data for s, _, body in served), (round_, [s for s, _, _ in served])
            else:
                assert all(s == 404 for s, _, _ in served), (round_, [s for s, _, _ in served])
    assert cluster.server_errors() == []


def test_a_delete_leaves_the_object_that_an_upload_on_another_node_has_claimed(make_cluster):
    """The same hazard, made to happen: node 1 is between writing the object and
    recording it (its claim is in the database) when node 0 deletes the image."""
    cluster = make_cluster(nodes=2)
    data = seeded_png(81)
    _, info = cluster.upload(0, data)
    md5, key = info["md5"], f"{info['md5'][:2]}/{info['md5'][2:4]}/{info['md5']}.png"
    cluster.sql(f"INSERT INTO claims (md5, claimed_at) VALUES ('{md5}', {time.time()})")
    assert cluster.call(0, "DELETE", f"/api/images/{md5}", headers=ALICE)[0] == 204
    assert cluster.rows() == {} and cluster.call(1, "GET", f"/i/{md5}.png")[0] == 404
    assert cluster.object_bytes(key) == data, "the delete removed an object an upload had claimed"
    done = cluster.cleanup(1)
    assert pass_counts(done.stdout) == (0, 0, 0), done.stdout + done.stderr
    assert cluster.object_bytes(key) == data
    # The uploader never came back: once its claim is older than CLAIM_SECONDS the
    # object is an orphan like any other.
    cluster.sql(f"UPDATE claims SET claimed_at = {time.time() - 3601}")
    done = cluster.cleanup(0)
    assert pass_counts(done.stdout) == (0, 1, 0), done.stdout + done.stderr
    assert cluster.objects() == {} and cluster.sql("SELECT md5 FROM claims") == []
