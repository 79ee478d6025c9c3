"""Server CPU per request of two imgproxy trees, in interleaved rounds with wrk.

    python3 bench/compare_serving.py OLD_TREE NEW_TREE

Hot GET of a 60 KB image (served from memory), a 304 revalidation and a GET
of a 700 KB image (served from disk), 16 connections, three rounds of 4 s
per tree and test. Prints the best round and the mean. CPU time per request
comes from /proc/PID/stat, so it stays meaningful on a busy machine where
requests per second do not.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import noise_png

ROUNDS, SECONDS = 3, 4
AUTH = {"Authorization": "Basic " + base64.b64encode(b"alice:alice123").decode()}


def start_server(tree: str) -> tuple[subprocess.Popen, str]:
    folder = Path(tempfile.mkdtemp())
    config = folder / "config.json"
    config.write_text(json.dumps({
        "server": {"data_dir": str(folder / "data")}, "cleanup": {"enable": False},
        "users": [{"username": "alice", "password": "alice123", "role": "admin"}]}))
    proc = subprocess.Popen([sys.executable, f"{tree}/imgproxy.py", "--config", str(config), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "listening on " in line:
            return proc, line.split("listening on ", 1)[1].split()[0]
    raise SystemExit(f"{tree}: the server did not start")


def upload(base_url: str, data: bytes) -> str:
    req = urllib.request.Request(f"{base_url}/upload/x.png", data=data, method="PUT", headers=AUTH)
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)["md5"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    small, large = noise_png(60 * 1024, 1), noise_png(700 * 1024, 2)
    servers = {name: start_server(tree) for name, tree in zip(("old", "new"), sys.argv[1:])}
    try:
        tests = {}
        for name, (_, url) in servers.items():
            small_md5, large_md5 = upload(url, small), upload(url, large)
            tests[name] = {
                "hot GET 60 KB": [f"{url}/i/{small_md5}.png"],
                "304": ["-H", f'If-None-Match: "{small_md5}"', f"{url}/i/{small_md5}.png"],
                "GET 700 KB from disk": [f"{url}/i/{large_md5}.png"],
            }
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(ROUNDS):
            for name, (proc, _) in servers.items():
                for test, args in tests[name].items():
                    before = cpu_seconds(proc.pid)
                    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{SECONDS}s", *args],
                                         capture_output=True, text=True, check=True).stdout
                    spent = cpu_seconds(proc.pid) - before
                    count = int(re.search(r"(\d+) requests in", out).group(1))
                    results.setdefault((test, name), []).append(round(spent / count * 1e6, 1))
    finally:
        for proc, _ in servers.values():
            proc.kill()
    for test in tests["old"]:
        old, new = results[(test, "old")], results[(test, "new")]
        mean_old, mean_new = sum(old) / len(old), sum(new) / len(new)
        print(f"{test}: server CPU per request, best round {min(old)} -> {min(new)} us "
              f"({min(new) / min(old):.2f}x), mean {mean_old:.1f} -> {mean_new:.1f} us "
              f"({mean_new / mean_old:.2f}x); rounds old {old}, new {new}")


if __name__ == "__main__":
    main()
