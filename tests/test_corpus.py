"""The image corpus ships with the tests: every file is the one MANIFEST.tsv names,
and, where this checkout sits beside the shared corpus it was copied from
(../shared/corpus), a byte-identical copy of it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import CORPUS, ROOT, read_manifest

# Where the corpus was copied from, in the workspace this project grew up in
# (../shared/corpus of the checkout or of a folder above it, as for a worktree).
SHARED_CORPUS = next((d / "shared" / "corpus" for d in ROOT.parents if (d / "shared" / "corpus").is_dir()),
                     ROOT.parent / "shared" / "corpus")
NOT_IMAGES = {"MANIFEST.tsv", "README.md"}


def copies_elsewhere() -> list[Path]:
    """The shared corpus this one was copied from, when this checkout sits beside it."""
    return [SHARED_CORPUS] if SHARED_CORPUS.is_dir() else []


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
