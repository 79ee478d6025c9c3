"""The storage and database sections of config.json: validation, optional drivers
imported only when configured, and an unreachable engine at start as one line."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import imgproxy
from conftest import ROOT, write_config

S3 = {"backend": "s3", "endpoint": "http://127.0.0.1:9", "bucket": "images",
      "access_key_id": "key", "secret_access_key": "secret-that-must-not-leak"}


def parse(tmp_path, **sections):
    raw = {"users": [{"username": "a", "password": "long-password-1"}], **sections}
    return imgproxy.parse_config(raw, tmp_path)


def test_defaults_are_files_and_sqlite(tmp_path):
    config = parse(tmp_path)
    assert config.storage.backend == "files" and config.database.url is None


def test_a_full_s3_section_is_read(tmp_path):
    config = parse(tmp_path, storage={**S3, "prefix": "img", "region": "eu-west-1",
                                      "public_base_url": "https://cdn.example/"})
    st = config.storage
    assert (st.backend, st.endpoint, st.bucket, st.prefix, st.region, st.public_base_url) == (
        "s3", "http://127.0.0.1:9", "images", "img/", "eu-west-1", "https://cdn.example")
    assert "secret-that-must-not-leak" not in repr(config)


def test_s3_credentials_come_from_the_environment_too(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    section = {k: v for k, v in S3.items() if k not in ("access_key_id", "secret_access_key")}
    st = parse(tmp_path, storage=section).storage
    assert (st.access_key_id, st.secret_access_key) == ("env-key", "env-secret")


@pytest.mark.parametrize("section,key", [
    ({**S3, "backend": "ftp"}, "storage.backend"),
    ({**S3, "endpoint": "s3.amazonaws.com"}, "storage.endpoint"),
    ({**S3, "endpoint": None}, "storage.endpoint"),
    ({**S3, "bucket": "Bad_Bucket"}, "storage.bucket"),
    ({**S3, "bucket": "../x"}, "storage.bucket"),
    ({**S3, "prefix": "../up"}, "storage.prefix"),
    ({**S3, "prefix": "/abs"}, "storage.prefix"),
    ({**S3, "public_base_url": "cdn.example"}, "storage.public_base_url"),
    ({**S3, "colour": "blue"}, "storage.colour"),
    ({"backend": "files", "bucket": "images"}, "storage.bucket"),
    ({k: v for k, v in S3.items() if k != "secret_access_key"}, "storage"),
])
def test_bad_storage_sections_name_the_key(tmp_path, monkeypatch, section, key):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(imgproxy.ConfigError) as err:
        parse(tmp_path, storage=section)
    assert str(err.value).startswith(key)
    assert "secret-that-must-not-leak" not in str(err.value)


@pytest.mark.parametrize("url", ["mysql://u:p@h/db", "sqlite:///x.db", "u:p@h/db"])
def test_a_database_url_that_is_not_postgresql_is_refused_without_echoing_it(tmp_path, url):
    with pytest.raises(imgproxy.ConfigError) as err:
        parse(tmp_path, database={"url": url})
    assert str(err.value).startswith("database.url") and url not in str(err.value)


def child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("module,package,sections", [
    ("aiobotocore", "aiobotocore", {"storage": S3}),
    ("asyncpg", "asyncpg", {"database": {"url": "postgresql://u:p@127.0.0.1:9/db"}}),
])
def test_a_missing_driver_is_one_config_line_naming_the_package(tmp_path, module, package, sections):
    config = write_config(tmp_path / "config.json")
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, **sections}))
    # The driver hidden as if it were not installed (None in sys.modules makes import fail).
    run = child(f"""
        import sys
        sys.modules[{module!r}] = None
        import imgproxy
        sys.exit(imgproxy.main(["--config", {str(config)!r}]))
    """)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install {package}" in lines[0] and "Traceback" not in run.stderr


def test_the_default_server_imports_neither_driver(tmp_path):
    config = write_config(tmp_path / "config.json")
    run = child(f"""
        import asyncio, sys
        import imgproxy
        from aiohttp.test_utils import TestClient, TestServer

        async def main():
            app = imgproxy.create_app(imgproxy.load_config({str(config)!r}))
            async with TestClient(TestServer(app)) as client:
                assert (await client.get("/healthz")).status == 200
            print(sorted(m for m in ("asyncpg", "aiobotocore", "botocore") if m in sys.modules))

        asyncio.run(main())
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("sections,key", [
    ({"database": {"url": "postgresql://u:secret-pw@127.0.0.1:9/db"}}, "database.url"),
    ({"storage": S3}, "storage"),
])
def test_an_unreachable_engine_at_start_is_one_line_and_no_secret(tmp_path, sections, key):
    pytest.importorskip("asyncpg" if "database" in sections else "aiobotocore")
    config = write_config(tmp_path / "config.json")
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, **sections}))
    run = subprocess.run([sys.executable, str(ROOT / "imgproxy.py"), "--config", str(config), "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode in (1, 2)
    lines = [line for line in run.stderr.splitlines() if line.startswith("imgproxy:")]
    assert len(lines) == 1 and key in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    assert "secret-pw" not in run.stderr and "secret-that-must-not-leak" not in run.stderr
