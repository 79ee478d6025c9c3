"""One config reader: the dataclasses hold every default, parse_config applies
them, the README documents every key with that default, and `imgproxy.py
check-config` is how scripts (units/install.sh) read a config."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import imgproxy
from conftest import ROOT

# Section in config.json -> the dataclass its keys come from. Walking the
# dataclasses means a key added to one is checked here without editing this file.
SECTIONS = {"server": imgproxy.ServerConfig, "cleanup": imgproxy.CleanupConfig,
            "users[]": imgproxy.UserConfig, "client": imgproxy.ClientConfig,
            "metrics": imgproxy.MetricsConfig, "storage": imgproxy.StorageConfig,
            "database": imgproxy.DatabaseConfig}


def test_every_config_section_is_walked():
    assert {f.name for f in dataclasses.fields(imgproxy.Config)} == {s.rstrip("[]") for s in SECTIONS}


def config_keys() -> list[tuple[str, dataclasses.Field]]:
    return [(f"{section}.{field.name}", field)
            for section, cls in SECTIONS.items() for field in dataclasses.fields(cls)]


def readme_config_table() -> dict[str, str]:
    """`key` -> default column, from the README's table under "## Configuration"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3:
            for key in re.findall(r"`([^`]+)`", cells[0]):
                table[key] = cells[1]
    return table


def as_json(value):
    if isinstance(value, tuple):
        return [as_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


@pytest.mark.parametrize("key,field", config_keys(), ids=[key for key, _ in config_keys()])
def test_every_config_key_is_in_the_readme_table_with_its_default(key, field):
    table = readme_config_table()
    assert key in table, f"README.md's configuration table lacks `{key}`"
    documented = table[key].strip("`")
    try:
        documented_value = json.loads(documented)
    except ValueError:
        return  # required ("—"), or a default described in words ("first user")
    assert documented_value == as_json(field.default), f"{key}: README says {documented}"


def test_readme_table_names_no_key_the_server_does_not_know():
    known = {key for key, _ in config_keys()}
    assert set(readme_config_table()) - known == set()


def test_an_empty_config_is_the_dataclass_defaults(tmp_path):
    expected = imgproxy.Config(server=imgproxy.ServerConfig(data_dir=tmp_path / "data"))
    assert imgproxy.parse_config({}, tmp_path) == expected


def test_each_section_left_empty_takes_the_dataclass_defaults(tmp_path):
    raw = {"server": {}, "cleanup": {}, "users": [{"username": "u", "password": "p"}], "client": {}}
    config = imgproxy.parse_config(raw, tmp_path)
    assert config.cleanup == imgproxy.CleanupConfig()
    assert config.client == imgproxy.ClientConfig()
    assert config.users == (imgproxy.UserConfig(username="u", password="p"),)


# ---- check-config ---------------------------------------------------------------

def check_config(config_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "imgproxy.py"), "check-config", "--config",
                           str(config_path), *args], capture_output=True, text=True, timeout=60)


def test_check_config_prints_values_as_the_server_sees_them(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"server": {"port": 9001}, "cleanup": {"cleanup_time": "4:05"}}))
    result = check_config(path, "--print", "server.host", "server.port", "cleanup.cleanup_time",
                          "cleanup.enable", "server.data_dir", "base_url", "local_url", "server.base_url")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        imgproxy.ServerConfig.host, "9001", "04:05:00", "true", str(tmp_path / "data"),
        "http://localhost:9001", "http://127.0.0.1:9001", ""]


@pytest.mark.parametrize("host,local_url", [("0.0.0.0", "http://127.0.0.1:8000"), ("::", "http://[::1]:8000"),
                                            ("192.0.2.7", "http://192.0.2.7:8000")])
def test_check_config_local_url_reaches_a_wildcard_listener_on_loopback(tmp_path, host, local_url):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"server": {"host": host}}))
    assert check_config(path, "--print", "local_url").stdout == local_url + "\n"


@pytest.mark.parametrize("host,example,refused", [("127.0.0.1", "yes", False), ("0.0.0.0", "yes", True)])
def test_check_config_reports_the_example_password_as_the_server_judges_it(tmp_path, host, example, refused):
    password = sorted(imgproxy.SHIPPED_PASSWORDS)[0]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"server": {"host": host}, "users": [{"username": "a", "password": password}]}))
    example_line, problem_line = check_config(path, "--print", "example_password", "listen_problem").stdout.split("\n")[:2]
    assert example_line == example
    assert bool(problem_line) is refused and (not refused or host in problem_line)


def test_check_config_without_keys_says_ok(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    result = check_config(path)
    assert result.returncode == 0 and result.stdout == f"{path}: ok\n"


@pytest.mark.parametrize("text,args,named", [
    ('{"server": {"port": "80"}}', (), "server.port"),
    ("{ not json", (), "invalid JSON"),
    ("{}", ("--print", "server.nope"), "server.nope"),
    ('{"client": {"password": "x"}}', ("--print", "client.password"), "client.password"),
], ids=["bad-value", "bad-json", "unknown-key", "secret"])
def test_check_config_errors_are_one_line_naming_the_key_with_exit_2(tmp_path, text, args, named):
    path = tmp_path / "config.json"
    path.write_text(text)
    result = check_config(path, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and named in result.stderr
    assert '"x"' not in result.stderr


def test_install_sh_has_no_config_reader_of_its_own():
    """Its values come from check-config; a `.get(key, default)` or the example
    password written into the script would be a second set of rules."""
    script = (ROOT / "units" / "install.sh").read_text(encoding="utf-8")
    assert "check-config" in script
    assert re.findall(r"\.get\(\s*['\"]\w+['\"]\s*,", script) == []
    assert [p for p in imgproxy.SHIPPED_PASSWORDS if p in script] == []
