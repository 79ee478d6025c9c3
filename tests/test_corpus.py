"""The image corpus ships with the tests: every file is the one MANIFEST.tsv names,
and, when IMGPROXY_CORPUS_SOURCE names the corpus it was copied from (.ci/run sets
it where that copy exists), a byte-identical copy of it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from conftest import CORPUS, read_manifest

# The corpus this one was copied from, when known: the tests themselves read only
# tests/corpus, so a fresh clone runs every test.
CORPUS_SOURCE = os.environ.get("IMGPROXY_CORPUS_SOURCE")
NOT_IMAGES = {"MANIFEST.tsv", "README.md"}


def copies_elsewhere() -> list[Path]:
    """The corpus this one was copied from, when IMGPROXY_CORPUS_SOURCE names it."""
    if not CORPUS_SOURCE:
        return []
    source = Path(CORPUS_SOURCE)
    assert source.is_dir(), f"IMGPROXY_CORPUS_SOURCE={CORPUS_SOURCE} is not a folder"
    return [source]


def test_corpus_holds_exactly_the_manifest_files():
    listed = {row["file"] for row in read_manifest()}
    present = {p.name for p in CORPUS.iterdir() if p.is_file()} - NOT_IMAGES
    assert listed == present
    assert (CORPUS / "README.md").is_file(), "the licence notes travel with the files"
    for other in copies_elsewhere():
        assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in CORPUS.iterdir())


@pytest.mark.parametrize("row", read_manifest(), ids=lambda row: row["file"])
def test_corpus_file_matches_its_manifest_md5(row):
    data = (CORPUS / row["file"]).read_bytes()
    assert hashlib.md5(data).hexdigest() == row["md5"]
    for other in copies_elsewhere():
        assert (other / row["file"]).read_bytes() == data, f"differs from {other}"


@pytest.mark.parametrize("name", sorted(NOT_IMAGES))
def test_corpus_notes_are_the_shared_ones_byte_for_byte(name):
    text = (CORPUS / name).read_bytes()
    assert text
    for other in copies_elsewhere():
        assert (other / name).read_bytes() == text
