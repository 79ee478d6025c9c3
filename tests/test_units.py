"""units/: the systemd units, install.sh and uninstall.sh.

No running systemd is needed. The scripts install into a temporary DESTDIR and
drive a fake systemctl that records every command and remembers what is enabled
and active; `systemd-analyze verify` checks the unit files offline; the real
start runs the installed layout with the command line of the installed unit's
ExecStart, its working directory, environment, umask and (where the kernel has
them) its no-new-privileges and memory-deny-write-execute restrictions.
"""
from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import site
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from helpers import png_bytes

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "units"
UNIT_FILES = ("imgproxy.service", "imgproxy-cleanup.service", "imgproxy-cleanup.timer")
PROGRAM_FILES = ("imgproxy.py", "cleanup.py", "client.py")
SOURCE_FILES = PROGRAM_FILES + ("config.json", "requirements.txt")
# The fixed layout the units name; DESTDIR only relocates it.
PREFIX, CONF_DIR, DATA_DIR, UNIT_DIR = "/opt/imgproxy", "/etc/imgproxy", "/var/lib/imgproxy", "/etc/systemd/system"
CONFIG = CONF_DIR + "/config.json"
# The installed venvs see the packages of the Python running the tests (no downloads),
# also when that Python is itself a venv.
TEST_PYTHONPATH = os.pathsep.join([*site.getsitepackages(), site.getusersitepackages()])
MUTATING_VERBS = {"enable", "disable", "start", "stop", "restart", "reload", "daemon-reload"}


# ---------------------------------------------------------------- helpers

def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"directive outside a section: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(path: Path, section: str, key: str) -> list[str]:
    return [v for k, v in parse_unit(path.read_text()).get(section, []) if k == key]


def unit_value(path: Path, section: str, key: str) -> str:
    values = unit_values(path, section, key)
    assert len(values) == 1, f"{path.name}: [{section}] {key}= appears {len(values)} times"
    return values[0]


def under(destdir: Path, path: str) -> Path:
    return destdir / path.lstrip("/")


def map_into(destdir: Path, word: str) -> str:
    """A path from a unit, as it lies under DESTDIR; other words unchanged."""
    for prefix in (PREFIX, CONF_DIR, DATA_DIR):
        if word == prefix or word.startswith(prefix + "/"):
            return str(under(destdir, word))
    return word


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file, folder and link under root with its mode, mtime and content."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                tree[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                tree[str(path.relative_to(root))] = (
                    "file", st.st_mode, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                tree[str(path.relative_to(root))] = ("dir", st.st_mode, st.st_mtime_ns)
    return tree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; CI installs it (apt-get install systemd)")
        pytest.skip(f"{name} is not installed")
    return path


def optional_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (optional: apt-get install {name})")
    return path


FAKE_SYSTEMCTL = r'''#!{python}
"""A stand-in for systemctl: records each call, keeps enabled/active state."""
import json, os, sys
LOG, STATE, UNIT_DIR = {log!r}, {state!r}, {unit_dir!r}
with open(LOG, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
words = [a for a in sys.argv[1:] if not a.startswith("-")]
verb, units = words[0], words[1:]
state = {{"enabled": [], "active": []}}
if os.path.exists(STATE):
    with open(STATE) as f:
        state = json.load(f)
def known(unit):
    return os.path.exists(os.path.join(UNIT_DIR, unit))
if verb == "is-failed":
    sys.exit(1)
if verb in ("is-enabled", "is-active"):
    kind = "enabled" if verb == "is-enabled" else "active"
    sys.exit(0 if all(u in state[kind] for u in units) else 1)
for unit in units:
    if verb in ("enable", "start", "restart") and not known(unit):
        sys.exit(f"fake systemctl: Unit {{unit}} not found.")
    for kind, add, remove in (("enabled", "enable", "disable"), ("active", "start", "stop"),
                              ("active", "restart", "")):
        if verb == add and unit not in state[kind]:
            state[kind].append(unit)
        if verb == remove and unit in state[kind]:
            state[kind].remove(unit)
with open(STATE, "w") as f:
    json.dump(state, f)
'''


class Box:
    """A source checkout, a DESTDIR and a fake systemctl, for one test."""

    def __init__(self, tmp_path: Path):
        self.src = tmp_path / "src"
        self.destdir = tmp_path / "root"
        self.destdir.mkdir()
        fake = tmp_path / "systemctl"
        self.log = tmp_path / "systemctl.log"
        self.state = tmp_path / "systemctl.state"
        fake.write_text(FAKE_SYSTEMCTL.format(python=sys.executable, log=str(self.log),
                                              state=str(self.state),
                                              unit_dir=str(under(self.destdir, UNIT_DIR))))
        fake.chmod(0o755)
        self.systemctl = fake
        # The source is a copy, so a test can play a `git pull` by editing it.
        (self.src / "units").mkdir(parents=True)
        for name in SOURCE_FILES:
            if (REPO / name).exists():
                shutil.copy2(REPO / name, self.src / name)
        for name in ("imgproxy.py", "config.json", "requirements.txt"):
            assert (self.src / name).exists(), f"the repository has no {name}"
        for path in UNITS.iterdir():
            shutil.copy2(path, self.src / "units" / path.name)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        # No downloads: the venv sees the packages of the Python running the tests.
        env.update(DESTDIR=str(self.destdir), SYSTEMCTL=str(self.systemctl), PYTHON=sys.executable,
                   PIP_INSTALL="0", VENV_OPTS="--system-site-packages",
                   PYTHONPATH=TEST_PYTHONPATH)
        env.update(extra)
        return env

    def run(self, script: str, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        result = subprocess.run(["bash", str(self.src / "units" / script), *args], env=self.env(**env),
                                capture_output=True, text=True, timeout=300)
        if check:
            assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def install(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return self.run("install.sh", *args, **env)

    def uninstall(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return self.run("uninstall.sh", *args, **env)

    def calls(self) -> list[list[str]]:
        """Mutating systemctl calls since the last look (queries left out)."""
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return [c for c in calls if c[0] in MUTATING_VERBS]

    def path(self, path: str) -> Path:
        return under(self.destdir, path)

    def config(self) -> dict:
        return json.loads(self.path(CONFIG).read_text())


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


@pytest.fixture
def installed(box: Box) -> Box:
    box.install()
    box.calls()
    return box


# ---------------------------------------------------------------- the unit files

def verify_units(unit_texts: dict[str, str], workdir: Path) -> None:
    """systemd-analyze verify: the units load, every key is known, ExecStart exists."""
    analyze = need_tool("systemd-analyze")
    unit_dir = workdir / "units-to-verify"
    unit_dir.mkdir()
    for name, text in unit_texts.items():
        (unit_dir / name).write_text(text)
    result = subprocess.run([analyze, "verify", *sorted(map(str, unit_dir.iterdir()))],
                            capture_output=True, text=True, timeout=120)
    # Other units of the machine may draw warnings of their own; ours must draw none.
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if any(name in line for name in unit_texts)]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_repository_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants the ExecStart binary to exist: point the units at a tree that has it.
    tree = tmp_path / "tree"
    (tree / "opt/imgproxy/venv/bin").mkdir(parents=True)
    (tree / "opt/imgproxy/venv/bin/python").symlink_to(sys.executable)
    texts = {name: (UNITS / name).read_text().replace(PREFIX + "/", f"{tree}{PREFIX}/")
             for name in UNIT_FILES}
    verify_units(texts, tmp_path)


def test_installed_units_pass_systemd_analyze_verify(installed: Box, tmp_path: Path) -> None:
    destdir = str(installed.destdir)
    texts = {name: installed.path(f"{UNIT_DIR}/{name}").read_text().replace(PREFIX + "/", f"{destdir}{PREFIX}/")
             for name in UNIT_FILES}
    verify_units(texts, tmp_path)


def test_service_unit_is_hardened_by_systemd_analyze_security(tmp_path: Path) -> None:
    analyze = need_tool("systemd-analyze")
    # --threshold is the exposure times ten: fail above 2.0 ("OK") on the 0-10 scale.
    result = subprocess.run([analyze, "security", "--offline=true", "--threshold=20",
                             str(UNITS / "imgproxy.service")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    exposure = float(re.search(r"Overall exposure level for imgproxy\.service: ([\d.]+)", result.stdout)[1])
    assert exposure <= 2.0


def test_service_unit_runs_the_venv_unprivileged_with_restart_and_back_off() -> None:
    unit = UNITS / "imgproxy.service"
    assert shlex.split(unit_value(unit, "Service", "ExecStart")) == [
        f"{PREFIX}/venv/bin/python", f"{PREFIX}/imgproxy.py", "--config", CONFIG]
    assert unit_value(unit, "Service", "User") == "imgproxy"
    assert unit_value(unit, "Service", "StateDirectory") == "imgproxy"
    assert unit_value(unit, "Service", "WorkingDirectory") == DATA_DIR
    assert unit_value(unit, "Service", "Restart") in ("on-failure", "always")
    assert unit_value(unit, "Service", "RestartSec")
    assert int(unit_value(unit, "Unit", "StartLimitIntervalSec")) > 0
    assert int(unit_value(unit, "Unit", "StartLimitBurst")) > 0
    assert unit_value(unit, "Service", "KillSignal") == "SIGTERM"
    assert unit_value(unit, "Service", "TimeoutStopSec")
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"


def test_service_unit_hardening_directives() -> None:
    unit = UNITS / "imgproxy.service"
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes", "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "UMask": "0027",
        "ReadWritePaths": DATA_DIR,
    }
    for key, value in expected.items():
        assert unit_value(unit, "Service", key) == value, key
    assert "@system-service" in unit_values(unit, "Service", "SystemCallFilter")
    # Render processes lower their own priority (SCHED_IDLE, nice 10) past ~@resources.
    assert "setpriority sched_setscheduler" in unit_values(unit, "Service", "SystemCallFilter")


def test_cleanup_units_are_a_oneshot_and_a_persistent_timer() -> None:
    service, timer = UNITS / "imgproxy-cleanup.service", UNITS / "imgproxy-cleanup.timer"
    assert unit_value(service, "Service", "Type") == "oneshot"
    assert shlex.split(unit_value(service, "Service", "ExecStart")) == [
        f"{PREFIX}/venv/bin/python", f"{PREFIX}/cleanup.py", "--config", CONFIG]
    assert unit_value(service, "Service", "User") == unit_value(UNITS / "imgproxy.service", "Service", "User")
    assert unit_value(timer, "Timer", "Persistent") == "true"
    assert unit_value(timer, "Timer", "Unit") == "imgproxy-cleanup.service"
    assert unit_value(timer, "Install", "WantedBy") == "timers.target"


# ---------------------------------------------------------------- the scripts

def test_scripts_pass_shellcheck() -> None:
    shellcheck = optional_tool("shellcheck")
    result = subprocess.run([shellcheck, str(UNITS / "install.sh"), str(UNITS / "uninstall.sh")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script, words", [
    ("install.sh", ("DESTDIR=", "SYSTEMCTL=", "PIP_INSTALL=0", "--no-deps", "--timer", "HEALTH_URL=", "--no-wait")),
    ("uninstall.sh", ("DESTDIR=", "SYSTEMCTL=", "--purge")),
], ids=["install", "uninstall"])
def test_help_documents_staging_and_fake_systemctl(script: str, words: tuple[str, ...]) -> None:
    assert os.access(UNITS / script, os.X_OK), f"the README runs units/{script} directly: chmod +x it"
    result = subprocess.run(["bash", str(UNITS / script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for word in words:
        assert word in result.stdout, word
    bad = subprocess.run(["bash", str(UNITS / script), "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown option: --bogus" in bad.stderr


def test_install_lays_out_program_venv_config_and_units(box: Box) -> None:
    result = box.install()
    for name in PROGRAM_FILES + ("requirements.txt",):
        if (box.src / name).exists():
            installed = box.path(f"{PREFIX}/{name}")
            assert installed.read_bytes() == (box.src / name).read_bytes(), name
            assert stat.S_IMODE(installed.stat().st_mode) == 0o644, name
    venv_python = box.path(f"{PREFIX}/venv/bin/python")
    assert subprocess.run([str(venv_python), "-c", "import aiohttp, aiosqlite, PIL"],
                          env=box.env(), timeout=60).returncode == 0
    for name in UNIT_FILES:
        assert stat.S_IMODE(box.path(f"{UNIT_DIR}/{name}").stat().st_mode) == 0o644, name
    assert box.path(f"{UNIT_DIR}/imgproxy.service").read_bytes() == (UNITS / "imgproxy.service").read_bytes()
    assert stat.S_IMODE(box.path(CONF_DIR).stat().st_mode) == 0o750
    assert stat.S_IMODE(box.path(CONFIG).stat().st_mode) == 0o640
    assert box.calls() == [["daemon-reload"], ["enable", "imgproxy.service"], ["start", "imgproxy.service"]]
    assert "hash-password" in result.stdout and "Next steps" in result.stdout


def test_fresh_config_keeps_data_in_var_lib_on_loopback_without_the_example_password(box: Box) -> None:
    result = box.install()
    source = json.loads((box.src / "config.json").read_text())
    config = box.config()
    assert config["server"]["data_dir"] == DATA_DIR
    assert config["server"]["host"] == "127.0.0.1"
    assert "alice123" not in box.path(CONFIG).read_text()
    for user in config["users"]:
        if "password" in user:
            assert len(user["password"]) >= 16 and user["password"] in result.stdout
    # Everything else comes from the repository's example, key for key.
    for section in source:
        for key in source[section] if isinstance(source[section], dict) else ():
            if (section, key) not in {("server", "data_dir"), ("server", "host"), ("client", "password")}:
                assert config[section][key] == source[section][key], (section, key)
    assert [u["username"] for u in config["users"]] == [u["username"] for u in source["users"]]


def test_timer_on_calendar_follows_cleanup_time(box: Box) -> None:
    box.install()
    cleanup_time = box.config()["cleanup"]["cleanup_time"]
    timer = box.path(f"{UNIT_DIR}/imgproxy-cleanup.timer")
    assert unit_value(timer, "Timer", "OnCalendar") == f"*-*-* {cleanup_time}"


def test_second_install_changes_nothing_and_restarts_nothing(installed: Box) -> None:
    before = snapshot(installed.destdir)
    result = installed.install()
    assert snapshot(installed.destdir) == before
    assert installed.calls() == []
    assert "nothing to do" in result.stdout


def test_existing_config_and_data_are_kept(box: Box) -> None:
    config = json.loads((box.src / "config.json").read_text())
    config["server"].update(data_dir=DATA_DIR, port=8123)
    config["cleanup"]["cleanup_time"] = "04:30:15"
    text = json.dumps(config, indent=4) + "\n"
    box.path(CONF_DIR).mkdir(parents=True)
    box.path(CONFIG).write_text(text)
    box.path(f"{DATA_DIR}/uploads/ab/cd").mkdir(parents=True)
    box.path(f"{DATA_DIR}/images.db").write_bytes(b"not touched")
    data_before = snapshot(box.path(DATA_DIR))

    box.install()
    assert box.path(CONFIG).read_text() == text
    assert snapshot(box.path(DATA_DIR)) == data_before
    timer = box.path(f"{UNIT_DIR}/imgproxy-cleanup.timer")
    assert unit_value(timer, "Timer", "OnCalendar") == "*-*-* 04:30:15"


def test_install_reads_the_config_with_the_servers_own_rules(box: Box) -> None:
    """No second reader in the script: what the server accepts and defaults to
    (host 127.0.0.1 when absent, a cleanup_time of "3:00") is what install.sh uses."""
    config = json.loads((box.src / "config.json").read_text())
    del config["server"]["host"]
    config["server"]["data_dir"] = DATA_DIR
    config["cleanup"]["cleanup_time"] = "3:00"
    box.path(CONF_DIR).mkdir(parents=True)
    box.path(CONFIG).write_text(json.dumps(config))
    result = box.install()
    assert "warning" not in result.stdout
    timer = box.path(f"{UNIT_DIR}/imgproxy-cleanup.timer")
    assert unit_value(timer, "Timer", "OnCalendar") == "*-*-* 03:00:00"
    assert "http://127.0.0.1:8000" in result.stdout


@pytest.mark.parametrize("server,warning", [
    ({"host": "0.0.0.0", "data_dir": DATA_DIR}, "server.host is 0.0.0.0 and the server refuses to start"),
    ({"data_dir": "data"}, f"server.data_dir is {CONF_DIR}/data: the unit only allows writes under {DATA_DIR}"),
], ids=["example-password-on-a-public-host", "data-outside-the-state-directory"])
def test_install_warns_about_a_config_the_unit_cannot_run(box: Box, server: dict, warning: str) -> None:
    config = json.loads((box.src / "config.json").read_text())
    config["server"].update(server)
    box.path(CONF_DIR).mkdir(parents=True)
    box.path(CONFIG).write_text(json.dumps(config))
    result = box.install()
    assert f"warning: {warning}" in result.stdout


def test_upgrade_with_new_program_restarts_and_keeps_config(installed: Box) -> None:
    config_before = installed.path(CONFIG).read_bytes()
    with open(installed.src / "imgproxy.py", "a") as f:
        f.write("\n# a newer version\n")
    result = installed.install()
    assert installed.path(f"{PREFIX}/imgproxy.py").read_text().endswith("# a newer version\n")
    assert installed.calls() == [["restart", "imgproxy.service"]]
    assert installed.path(CONFIG).read_bytes() == config_before
    assert "imgproxy restarted" in result.stdout


def test_upgrade_with_new_requirements_restarts(installed: Box) -> None:
    with open(installed.src / "requirements.txt", "a") as f:
        f.write("# pins changed\n")
    installed.install()
    assert installed.calls() == [["restart", "imgproxy.service"]]


def test_failed_pip_install_leaves_the_old_version_running(installed: Box) -> None:
    before = snapshot(installed.path(PREFIX))
    with open(installed.src / "requirements.txt", "a") as f:
        f.write("imgproxy-test-no-such-package==0.0.1\n")
    with open(installed.src / "imgproxy.py", "a") as f:
        f.write("\n# a newer version\n")
    result = installed.run("install.sh", check=False, PIP_INSTALL="1", PIP_NO_INDEX="1")
    assert result.returncode != 0 and "pip install failed" in result.stderr
    assert snapshot(installed.path(PREFIX)) == before
    assert installed.calls() == []


def test_upgrade_with_changed_unit_reloads_and_restarts(installed: Box) -> None:
    unit = installed.src / "units/imgproxy.service"
    unit.write_text(unit.read_text().replace("TimeoutStopSec=30s", "TimeoutStopSec=40s"))
    installed.install()
    assert installed.calls() == [["daemon-reload"], ["restart", "imgproxy.service"]]


def test_a_stopped_service_is_started_again(installed: Box) -> None:
    subprocess.run([str(installed.systemctl), "stop", "imgproxy.service"], check=True)
    installed.calls()
    installed.install()
    assert installed.calls() == [["start", "imgproxy.service"]]


def test_timer_is_opt_in_and_switches_the_in_process_schedule_off(installed: Box) -> None:
    assert installed.config()["cleanup"]["enable"] is True
    result = installed.install("--timer")
    assert installed.config()["cleanup"]["enable"] is False
    assert "cleanup.enable=false" in result.stdout
    assert installed.calls() == [["restart", "imgproxy.service"], ["enable", "imgproxy-cleanup.timer"],
                                 ["start", "imgproxy-cleanup.timer"]]
    # An upgrade without the option keeps the operator's choice.
    before = snapshot(installed.destdir)
    installed.install()
    assert installed.calls() == [] and snapshot(installed.destdir) == before

    installed.install("--no-timer")
    assert installed.config()["cleanup"]["enable"] is True
    assert installed.calls() == [["restart", "imgproxy.service"], ["disable", "imgproxy-cleanup.timer"],
                                 ["stop", "imgproxy-cleanup.timer"]]


def test_cleanup_switched_off_without_the_timer_is_warned_about(installed: Box) -> None:
    config = installed.config()
    config["cleanup"]["enable"] = False
    installed.path(CONFIG).write_text(json.dumps(config, indent=2))
    result = installed.install()
    assert "expired images are never" in result.stdout and "--timer" in result.stdout


def test_without_systemctl_a_staged_install_touches_no_systemd(box: Box) -> None:
    result = box.install(SYSTEMCTL="")
    assert "not enabling or starting anything" in result.stdout
    assert not box.log.exists()
    assert box.path(f"{UNIT_DIR}/imgproxy.service").exists()


def test_old_python_is_refused_with_a_clear_message(box: Box, tmp_path: Path) -> None:
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.9.2"\nexit 1\n')
    old.chmod(0o755)
    result = box.run("install.sh", check=False, PYTHON=str(old))
    assert result.returncode != 0
    assert "needs Python >= 3.10" in result.stderr and "3.9.2" in result.stderr
    assert not box.path(PREFIX).exists()


def test_broken_config_stops_the_install_with_its_name(installed: Box) -> None:
    installed.path(CONFIG).write_text("{ not json")
    result = installed.run("install.sh", check=False)
    assert result.returncode != 0
    assert CONFIG in result.stderr


def test_health_wait_failure_points_at_the_journal(installed: Box) -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    result = installed.run("install.sh", check=False, HEALTH_URL=url, HEALTH_TIMEOUT="1")
    assert result.returncode != 0
    assert url in result.stderr and "journalctl -u imgproxy" in result.stderr


def test_uninstall_removes_what_install_added_and_keeps_config_and_data(box: Box) -> None:
    before = set(snapshot(box.destdir))
    box.install()
    box.calls()
    box.path(f"{DATA_DIR}/uploads").mkdir(parents=True)
    box.path(f"{DATA_DIR}/images.db").write_bytes(b"images")
    config = box.path(CONFIG).read_bytes()

    result = box.uninstall()
    assert box.calls() == [["stop", "imgproxy.service"], ["disable", "imgproxy.service"], ["daemon-reload"]]
    left = set(snapshot(box.destdir)) - before
    kept = {p for p in left if p.startswith((CONF_DIR.lstrip("/"), DATA_DIR.lstrip("/")))}
    # Only the config, the data and the empty folders above them stay.
    assert all(box.destdir.joinpath(p).is_dir() for p in left - kept), left - kept
    assert not box.path(PREFIX).exists()
    for name in UNIT_FILES:
        assert not box.path(f"{UNIT_DIR}/{name}").exists()
    assert box.path(CONFIG).read_bytes() == config
    assert box.path(f"{DATA_DIR}/images.db").read_bytes() == b"images"
    assert "--purge" in result.stdout

    again = box.uninstall()
    assert box.calls() == [] and again.returncode == 0

    # Installing again finds the old config and data.
    box.install()
    assert box.path(CONFIG).read_bytes() == config
    assert box.path(f"{DATA_DIR}/images.db").read_bytes() == b"images"


def test_uninstall_stops_and_disables_the_timer_too(installed: Box) -> None:
    installed.install("--timer")
    installed.calls()
    installed.uninstall()
    assert installed.calls() == [
        ["stop", "imgproxy-cleanup.timer"], ["disable", "imgproxy-cleanup.timer"],
        ["stop", "imgproxy.service"], ["disable", "imgproxy.service"], ["daemon-reload"]]


def test_uninstall_purge_removes_config_and_data(installed: Box) -> None:
    installed.path(f"{DATA_DIR}/uploads").mkdir(parents=True)
    installed.path(f"{DATA_DIR}/images.db").write_bytes(b"images")
    installed.uninstall("--purge")
    for path in (PREFIX, CONF_DIR, DATA_DIR):
        assert not installed.path(path).exists(), path
    for name in UNIT_FILES:
        assert not installed.path(f"{UNIT_DIR}/{name}").exists()


# ---------------------------------------------------------------- a real start

PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 1


def sandbox_like_the_unit(umask: int):
    """preexec_fn: the unit's UMask=, NoNewPrivileges= and, on Linux >= 6.3, the
    kernel's own MemoryDenyWriteExecute (PR_SET_MDWE, kept across exec)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        os.umask(umask)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)
    return preexec


class Server:
    """The installed service, started as its unit would start it."""

    def __init__(self, box: Box):
        unit = box.path(f"{UNIT_DIR}/imgproxy.service")
        self.argv = [map_into(box.destdir, w) for w in shlex.split(unit_value(unit, "Service", "ExecStart"))]
        env = dict(os.environ, PYTHONPATH=TEST_PYTHONPATH)
        for value in unit_values(unit, "Service", "Environment"):
            env.update(item.split("=", 1) for item in shlex.split(value))
        self.data_dir = under(box.destdir, DATA_DIR)
        self.data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.argv, cwd=map_into(box.destdir, unit_value(unit, "Service", "WorkingDirectory")), env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=sandbox_like_the_unit(int(unit_value(unit, "Service", "UMask"), 8)))
        self.log: list[str] = []
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_stderr, args=(lines,), daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=30)
            except queue.Empty:
                self.proc.kill()
                pytest.fail("no 'listening on' line within 30 s:\n" + "".join(self.log))
            if line is None:
                pytest.fail(f"the server exited with {self.proc.wait()}:\n" + "".join(self.log))
            match = re.search(r"listening on (http://\S+?:\d+)", line)
            if match:
                self.url = match[1]
                break

    def _read_stderr(self, lines: queue.Queue) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            lines.put(line)
        lines.put(None)

    def request(self, method: str, path: str, body: bytes | None = None, auth: tuple[str, str] | None = None):
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as response:
            return response.status, response.read()

    def stop(self, timeout: float) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("the server did not stop within TimeoutStopSec")


def test_real_start_with_the_units_exec_start_serves_and_stops_cleanly(installed: Box) -> None:
    # Only what a test must change: the data under DESTDIR and a free port.
    config = installed.config()
    config["server"].update(data_dir=str(installed.path(DATA_DIR)), port=0)
    installed.path(CONFIG).write_text(json.dumps(config, indent=2))
    admin = next(u for u in config["users"] if "password" in u)

    server = Server(installed)
    try:
        assert server.argv[0] == str(installed.path(f"{PREFIX}/venv/bin/python"))
        status, body = server.request("GET", "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"

        # install.sh's health wait, pointed at this real server.
        result = installed.install(HEALTH_URL=server.url + "/healthz", HEALTH_TIMEOUT="10")
        assert "imgproxy is up" in result.stdout

        image = png_bytes()
        status, body = server.request("PUT", "/upload/dot.png", image, auth=(admin["username"], admin["password"]))
        assert status == 201
        info = json.loads(body)
        assert info["md5"] == hashlib.md5(image).hexdigest()
        image_path = urllib.parse.urlsplit(info["url"]).path
        for _ in range(3):
            status, body = server.request("GET", image_path)
            assert status == 200 and body == image
        # A size, rendered in a render process started under the same sandbox (MDWE).
        status, body = server.request("GET", f"/i/{info['md5']}/full.webp")
        assert status == 200 and body[:4] == b"RIFF" and body[8:12] == b"WEBP"
        assert not any("renders run in threads" in line for line in server.log), "".join(server.log)
    finally:
        timeout = float(unit_value(installed.path(f"{UNIT_DIR}/imgproxy.service"),
                                   "Service", "TimeoutStopSec").rstrip("s"))
        exit_code = server.stop(timeout)
    assert exit_code == 0, "".join(server.log)

    db = sqlite3.connect(installed.path(f"{DATA_DIR}/images.db"))
    try:
        count = db.execute("SELECT access_count FROM images WHERE md5 = ?", (info["md5"],)).fetchone()
    finally:
        db.close()
    assert count == (4,), "".join(server.log)  # three GETs of the original, one of a size
    # UMask=0027: nothing the service writes is readable by other accounts.
    assert not installed.path(f"{DATA_DIR}/images.db").stat().st_mode & 0o007


def test_cleanup_units_exec_start_runs_a_pass(installed: Box) -> None:
    config = installed.config()
    config["server"]["data_dir"] = str(installed.path(DATA_DIR))
    installed.path(CONFIG).write_text(json.dumps(config, indent=2))
    unit = installed.path(f"{UNIT_DIR}/imgproxy-cleanup.service")
    argv = [map_into(installed.destdir, w) for w in shlex.split(unit_value(unit, "Service", "ExecStart"))]
    installed.path(DATA_DIR).mkdir(parents=True, exist_ok=True)
    result = subprocess.run(argv, cwd=installed.path(DATA_DIR), capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=TEST_PYTHONPATH),
                            preexec_fn=sandbox_like_the_unit(0o027))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- README snippets

def deploy_snippet(language: str) -> str:
    """A code block of the README's "Deploy on a VPS" section (or the draft in docs/)."""
    for path in (REPO / "README.md", REPO / "docs/readme-deploy.md"):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if "## Deploy on a VPS" in text:
            section = text.split("## Deploy on a VPS", 1)[1]
            match = re.search(rf"```{language}\n(.*?)```", section, re.S)
            assert match, f"no {language} block in {path.name}'s Deploy on a VPS section"
            return match[1]
    pytest.fail("no 'Deploy on a VPS' section in README.md or docs/readme-deploy.md")


def test_readme_nginx_snippet_is_valid(tmp_path: Path) -> None:
    nginx = optional_tool("nginx")
    port = free_port()
    server = deploy_snippet("nginx").replace("listen 80;", f"listen 127.0.0.1:{port};")
    server = server.replace("listen [::]:80;", f"listen [::1]:{port};")
    assert "proxy_pass http://127.0.0.1:8000;" in server
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n{server}\n}}\n")
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_readme_caddy_snippet_is_valid(tmp_path: Path) -> None:
    caddy = optional_tool("caddy")
    snippet = deploy_snippet("caddyfile")
    assert "reverse_proxy 127.0.0.1:8000" in snippet
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(snippet)
    env = dict(os.environ, HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    result = subprocess.run([caddy, "validate", "--config", str(caddyfile), "--adapter", "caddyfile"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
