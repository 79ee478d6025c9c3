"""The image corpus ships with the tests: every file is the one MANIFEST.tsv names."""
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


def test_corpus_holds_exactly_the_manifest_files():
    listed = {row["file"] for row in read_manifest()}
    present = {p.name for p in CORPUS.iterdir() if p.is_file()} - NOT_IMAGES
    assert listed == present
    assert (CORPUS / "README.md").is_file(), "the licence notes travel with the files"


@pytest.mark.parametrize("row", read_manifest(), ids=lambda row: row["file"])
def test_corpus_file_matches_its_manifest_md5(row):
    assert hashlib.md5((CORPUS / row["file"]).read_bytes()).hexdigest() == row["md5"]


@pytest.mark.skipif(not SHARED_CORPUS.is_dir(), reason="no ../shared/corpus beside this checkout to compare with")
def test_corpus_is_a_byte_identical_copy_of_the_shared_one():
    ours = {p.name: p.read_bytes() for p in Path(CORPUS).iterdir() if p.is_file()}
    theirs = {p.name: p.read_bytes() for p in SHARED_CORPUS.iterdir() if p.is_file()}
    assert ours.keys() == theirs.keys()
    assert [name for name in ours if ours[name] != theirs[name]] == []
