"""The code passes ruff with the project's settings (pyproject.toml): every
`noqa` in it names a rule that is really checked."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def ruff_command() -> list[str]:
    if subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode == 0:
        return [sys.executable, "-m", "ruff"]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (pip install -r requirements-test.txt)")


def test_ruff_finds_nothing():
    result = subprocess.run([*ruff_command(), "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_noqa_names_a_rule_ruff_would_report():
    result = subprocess.run([*ruff_command(), "check", "--no-cache", "--extend-select", "RUF100",
                             "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
