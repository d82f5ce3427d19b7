"""Tokenized shards on disk and `StreamingBatches`: same batches as `ArrayBatches`, exact resume, rank slices,
windowed order coverage, bounded windows, named errors for bad shards and bad input lines, the `build_batch_source`
switch and `msnc data shards`."""
import json
import random

import numpy as np
import pytest

from ms_nlp_compress.cli import main as msnc_main
from ms_nlp_compress.config import DataConfig
from ms_nlp_compress.data import streaming
from ms_nlp_compress.data.glue import read_sst2
from ms_nlp_compress.data.mindrecord import encode_examples
from ms_nlp_compress.data.streaming import (
    StreamingBatches, build_batch_source, build_shards_from_columns, build_shards_from_lines, build_shards_from_tsv,
    read_manifest, shards_for_file,
)
from ms_nlp_compress.data.tokenization import WordPieceTokenizer
from ms_nlp_compress.errors import ConfigError, DataError
from ms_nlp_compress.train.batches import ArrayBatches, BatchSource

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "film", "very", "not", "a", "the",
         "plot", "##s", "act", "##ing", "great", "dull", "and", "but", "."]
WORDS = ["good", "bad", "movie", "film", "very", "not", "a", "the", "plots", "acting", "great", "dull", "and", "but",
         "."]
MAX_LENGTH = 12
ORDER = ("input_ids", "attention_mask", "token_type_ids", "label")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return WordPieceTokenizer.from_vocab(folder / "vocab.txt", lowercase=True, max_length=MAX_LENGTH)


def sentence(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 14)))


@pytest.fixture(scope="module")
def sst2_file(tmp_path_factory):
    """103 rows (a prime: no batch size divides it), lengths 0..14 words so truncation at 12 happens."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tsv") / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{sentence(rng)}\t{i % 2}\n" for i in range(103)),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shards(sst2_file, tokenizer, tmp_path_factory):
    """The same file as 15 shards of 7 rows (the last has 5), with word ids."""
    output = tmp_path_factory.mktemp("shards") / "sst2"
    build_shards_from_tsv("sst2", sst2_file, tokenizer, output, MAX_LENGTH, shard_rows=7, word_ids=True)
    return output


@pytest.fixture(scope="module")
def columns(sst2_file, tokenizer):
    """The in-memory reference: the padded columns of today's fine-tuning path."""
    examples = read_sst2(sst2_file)
    arrays = encode_examples(examples, tokenizer, MAX_LENGTH, False)
    arrays["word_ids"] = tokenizer.encode_batch([e.text_a for e in examples], max_length=MAX_LENGTH).word_ids
    return arrays


def batches_of(source, epoch, start=0):
    return [(index, [array.copy() for array in arrays]) for index, arrays in source.epoch(epoch, start)]


def assert_same_batches(actual, expected):
    assert [index for index, _ in actual] == [index for index, _ in expected]
    for (index, left), (_, right) in zip(actual, expected):
        for a, b in zip(left, right):
            assert a.dtype == b.dtype and a.shape == b.shape, index
            np.testing.assert_array_equal(a, b, err_msg=f"batch {index}")


def test_manifest_and_shard_layout(shards):
    manifest = read_manifest(shards)
    assert manifest["rows"] == 103 and [s["rows"] for s in manifest["shards"]] == [7] * 14 + [5]
    assert manifest["columns"] == ["input_ids", "attention_mask", "token_type_ids", "word_ids", "label"]
    assert manifest["token_dtype"] == "uint16" and manifest["label_dtype"] == "int32"
    assert manifest["source"]["task"] == "sst2" and manifest["tokenizer"]["vocab_size"] == len(VOCAB)
    with np.load(shards / "shard-000000.npz") as shard:
        assert shard["lengths"].sum() == len(shard["input_ids"]) == manifest["shards"][0]["tokens"]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("dynamic_padding", [False, True])
def test_one_window_gives_exactly_the_array_batches(shards, columns, world_size, drop_last, dynamic_padding):
    order = ORDER + ("word_ids",)
    for rank in range(world_size):
        options = dict(seed=11, rank=rank, world_size=world_size, drop_last=drop_last, dynamic_padding=dynamic_padding)
        expected = ArrayBatches(columns, order, 8, **options)
        actual = StreamingBatches(shards, order, 8, shuffle_shards=0, **options)
        assert isinstance(actual, BatchSource) and len(actual) == len(expected)
        assert actual.column_layout() == expected.column_layout()
        for epoch in (0, 3):
            assert_same_batches(batches_of(actual, epoch), batches_of(expected, epoch))


def test_unshuffled_stream_is_the_file_order(shards, columns):
    actual = StreamingBatches(shards, ORDER, 10, shuffle=False, shuffle_shards=2, drop_last=False)
    assert_same_batches(batches_of(actual, 0), batches_of(ArrayBatches(columns, ORDER, 10, shuffle=False,
                                                                       drop_last=False), 0))


def test_windowed_order_covers_every_row_once_with_the_right_content(shards, columns):
    source = StreamingBatches(shards, ("row",) + ORDER, 4, seed=5, shuffle_shards=3, drop_last=False)
    assert len(source.windows(0)) == 5
    seen = []
    for _, (rows, input_ids, mask, types, label) in source.epoch(0):
        seen += rows.tolist()
        # each drawn row is the row the file had at that index
        np.testing.assert_array_equal(input_ids, columns["input_ids"][rows])
        np.testing.assert_array_equal(types, columns["token_type_ids"][rows])
        np.testing.assert_array_equal(label, columns["label"][rows])
    assert sorted(seen) == list(range(103))
    assert source.windows_loaded == 5  # each window is read from disk once per epoch and then dropped
    assert len(source._cache) == 1
    # the windows really mix: within an epoch, rows of one window are contiguous in the stream
    window_of_row = {int(row): w for w, shard_ids in enumerate(source.windows(0))
                     for shard in shard_ids for row in range(7 * shard, min(7 * shard + 7, 103))}
    assert [window_of_row[row] for row in seen] == sorted(window_of_row[row] for row in seen)
    second = [row for _, (rows, *_) in source.epoch(1) for row in rows.tolist()]
    assert sorted(second) == list(range(103)) and second != seen


def test_windowed_order_is_a_pure_function_of_seed_epoch_index(shards):
    options = dict(seed=9, shuffle_shards=4, drop_last=True)
    first = StreamingBatches(shards, ("row",) + ORDER, 6, **options)
    again = StreamingBatches(shards, ("row",) + ORDER, 6, **options)
    assert_same_batches(batches_of(first, 2), batches_of(again, 2))
    other_seed = StreamingBatches(shards, ("row",) + ORDER, 6, seed=10, shuffle_shards=4)
    assert [b[0].tolist() for _, b in batches_of(other_seed, 2)] != [b[0].tolist() for _, b in batches_of(first, 2)]
    rows = np.concatenate([b[0] for _, b in batches_of(first, 2)])
    assert len(rows) == len(first) * 6 == 102 and len(np.unique(rows)) == 102  # drop_last drops 1 row


@pytest.mark.parametrize("shuffle_shards", [0, 2, 5])
def test_resume_from_any_epoch_and_index_reproduces_the_rest(shards, shuffle_shards):
    rng = random.Random(shuffle_shards)
    options = dict(seed=3, world_size=2, dynamic_padding=True, shuffle_shards=shuffle_shards, drop_last=False)
    for rank in (0, 1):
        full = {epoch: batches_of(StreamingBatches(shards, ("row",) + ORDER, 5, rank=rank, **options), epoch)
                for epoch in (0, 1)}
        for _ in range(6):
            epoch, start = rng.choice((0, 1)), rng.randrange(len(full[0]))
            fresh = StreamingBatches(shards, ("row",) + ORDER, 5, rank=rank, **options)  # a new process, no cache
            assert_same_batches(batches_of(fresh, epoch, start), full[epoch][start:])


@pytest.mark.parametrize("shuffle_shards", [0, 3])
def test_rank_slices_are_disjoint_and_make_the_global_batch(shards, shuffle_shards):
    world_size, batch_size = 3, 4
    single = StreamingBatches(shards, ("row",) + ORDER, batch_size * world_size, seed=2,
                              shuffle_shards=shuffle_shards)
    ranks = [StreamingBatches(shards, ("row",) + ORDER, batch_size, seed=2, rank=rank, world_size=world_size,
                              shuffle_shards=shuffle_shards) for rank in range(world_size)]
    assert len(single) == len(ranks[0]) == 103 // 12
    per_rank = [batches_of(source, 1) for source in ranks]
    for index, (_, whole) in enumerate(batches_of(single, 1)):
        parts = [per_rank[rank][index][1] for rank in range(world_size)]
        row_sets = [set(part[0].tolist()) for part in parts]
        assert all(len(rows) == batch_size for rows in row_sets)
        assert not (row_sets[0] & row_sets[1] or row_sets[0] & row_sets[2] or row_sets[1] & row_sets[2])
        for column in range(len(whole)):
            np.testing.assert_array_equal(np.concatenate([part[column] for part in parts]), whole[column])


def test_columns_round_trip_through_shards(columns, tokenizer, tmp_path):
    build_shards_from_columns(columns, tmp_path / "cols", tokenizer.pad_id, tokenizer.vocab_size, shard_rows=10)
    order = ORDER + ("word_ids",)
    assert_same_batches(batches_of(StreamingBatches(tmp_path / "cols", order, 7, seed=4, shuffle_shards=0), 0),
                        batches_of(ArrayBatches(columns, order, 7, seed=4), 0))
    broken = dict(columns, attention_mask=columns["attention_mask"][:, ::-1].copy())
    with pytest.raises(DataError, match="attention_mask"):
        build_shards_from_columns(broken, tmp_path / "bad", tokenizer.pad_id, tokenizer.vocab_size)


# ------------------------------------------------------------------------------------------ errors


def copy_shards(shards, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(shards, target)
    return target


def test_corrupted_shard_is_an_error_naming_the_file(shards, tmp_path):
    target = copy_shards(shards, tmp_path)
    shard = target / "shard-000004.npz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    source = StreamingBatches(target, ORDER, 4, shuffle_shards=2)
    with pytest.raises(DataError, match=r"shard-000004\.npz: shard is corrupted"):
        for _ in source.epoch(0):
            pass


def test_missing_or_truncated_shard_is_an_error_naming_the_file(shards, tmp_path):
    target = copy_shards(shards, tmp_path)
    (target / "shard-000002.npz").unlink()
    with pytest.raises(DataError, match=r"shard-000002\.npz: shard listed in .*manifest\.json is missing"):
        StreamingBatches(target, ORDER, 4)
    target = copy_shards(shards, tmp_path / "again")
    shard = target / "shard-000003.npz"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"shard-000003\.npz: \d+ bytes, the manifest says"):
        StreamingBatches(target, ORDER, 4)
    with pytest.raises(DataError, match=r"empty.*manifest\.json: no shard manifest"):
        StreamingBatches(tmp_path / "empty", ORDER, 4)


def test_bad_batch_settings_are_named(shards):
    with pytest.raises(ConfigError, match=r"batch columns \['masked_positions'\]"):
        StreamingBatches(shards, ORDER + ("masked_positions",), 4)
    with pytest.raises(ConfigError, match="cannot fill one global batch of 120"):
        StreamingBatches(shards, ORDER, 60, world_size=2)
    with pytest.raises(ConfigError, match="rank 2 is outside world size 2"):
        StreamingBatches(shards, ORDER, 4, rank=2, world_size=2)


def test_malformed_lines_name_file_and_line(tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"the good movie\n\nbad acting .\n\xff\xfe broken\nvery dull\n")
    with pytest.raises(DataError, match=r"corpus\.txt:4: invalid UTF-8 at byte 0"):
        build_shards_from_lines(corpus, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a failed build leaves nothing behind
    manifest = build_shards_from_lines(corpus, tokenizer, tmp_path / "out", skip_malformed=True)
    assert manifest["rows"] == 3 and manifest["skipped"] == 1 and manifest["skipped_lines"][0][0] == 4
    tsv_like = tmp_path / "pairs.txt"
    tsv_like.write_text("good movie\nthe plot\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs\.txt:2: holds a tab"):
        build_shards_from_lines(tsv_like, tokenizer, tmp_path / "out2")


def test_malformed_tsv_row_names_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "aug.tsv"
    path.write_text("sentence\tlabel\ngood movie\t1\nbad movie\t7\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"aug\.tsv:3: unknown label '7'"):
        build_shards_from_tsv("sst2", path, tokenizer, tmp_path / "out")


def test_lines_shards_hold_the_batch_encoding(tokenizer, tmp_path):
    rng = random.Random(4)
    lines = [sentence(rng) or "good" for _ in range(50)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    build_shards_from_lines(tmp_path / "corpus.txt", tokenizer, tmp_path / "out", shard_rows=16)
    source = StreamingBatches(tmp_path / "out", ("row", "input_ids", "word_ids"), 50, shuffle=False)
    (_, (rows, input_ids, word_ids)), = list(source.epoch(0))
    expected = tokenizer.encode_batch(lines, max_length=MAX_LENGTH)
    np.testing.assert_array_equal(rows, np.arange(50))
    np.testing.assert_array_equal(input_ids, expected.input_ids)
    np.testing.assert_array_equal(word_ids, expected.word_ids)


# ------------------------------------------------------------------------------------------ the switch


def test_build_batch_source_modes(sst2_file, columns, tokenizer, tmp_path, monkeypatch):
    common = dict(tokenizer=tokenizer, task="sst2", max_length=MAX_LENGTH, shard_dir=tmp_path / "shards")
    memory = build_batch_source(sst2_file, ORDER, 8, 1, stream="memory", **common)
    assert isinstance(memory, ArrayBatches)
    reference = batches_of(ArrayBatches(columns, ORDER, 8, seed=1), 0)
    assert_same_batches(batches_of(memory, 0), reference)
    assert isinstance(build_batch_source(columns, ORDER, 8, 1), ArrayBatches)

    disk = build_batch_source(sst2_file, ORDER, 8, 1, stream="disk", shuffle_shards=0, shard_rows=16, **common)
    assert isinstance(disk, StreamingBatches)
    assert_same_batches(batches_of(disk, 0), reference)
    built = sorted(path.name for path in (tmp_path / "shards").iterdir() if not path.name.startswith("."))
    again = build_batch_source(sst2_file, ORDER, 8, 1, stream="disk", shard_rows=16, **common)
    assert again.directory == disk.directory  # same content and settings: reused, not rebuilt
    assert sorted(p.name for p in (tmp_path / "shards").iterdir() if not p.name.startswith(".")) == built

    monkeypatch.setattr(streaming, "AUTO_MEMORY_BYTES", 104 * MAX_LENGTH * 12 - 1)  # 104 lines: just over
    assert isinstance(build_batch_source(sst2_file, ORDER, 8, 1, stream="auto", **common), StreamingBatches)
    monkeypatch.setattr(streaming, "AUTO_MEMORY_BYTES", 104 * MAX_LENGTH * 12)
    assert isinstance(build_batch_source(sst2_file, ORDER, 8, 1, stream="auto", **common), ArrayBatches)
    with pytest.raises(ConfigError, match="data.stream must be one of"):
        build_batch_source(sst2_file, ORDER, 8, 1, stream="ram", **common)


def test_changed_file_gets_new_shards(sst2_file, tokenizer, tmp_path):
    copy = tmp_path / "train.tsv"
    copy.write_bytes(sst2_file.read_bytes())
    first = shards_for_file(copy, tokenizer, tmp_path / "shards", "sst2", MAX_LENGTH)
    copy.write_bytes(sst2_file.read_bytes() + b"good film\t1\n")
    second = shards_for_file(copy, tokenizer, tmp_path / "shards", "sst2", MAX_LENGTH)
    assert first != second and read_manifest(second)["rows"] == 104


def test_data_config_stream_keys_are_validated():
    DataConfig(stream="disk", shard_rows=4, shuffle_shards=0).validate()
    with pytest.raises(ConfigError, match="data.stream: must be auto, memory or disk"):
        DataConfig(stream="ram").validate()
    with pytest.raises(ConfigError, match="data.shard_rows"):
        DataConfig(shard_rows=0).validate()
    with pytest.raises(ConfigError, match="data.shuffle_shards"):
        DataConfig(shuffle_shards=-1).validate()


def test_batch_source_from_config_follows_the_data_keys(sst2_file, columns, tokenizer, tmp_path):
    from ms_nlp_compress.config import load_config
    from ms_nlp_compress.data.streaming import batch_source_from_config

    config = load_config(None, ["data.stream=disk", "data.shuffle_shards=0", "data.shard_rows=20", "data.batch_size=8",
                                f"data.max_length={MAX_LENGTH}", "runtime.seed=6", "train.padding=dynamic"])
    source = batch_source_from_config(config, sst2_file, ORDER, rank=1, world_size=2, output_dir=tmp_path / "run",
                                      tokenizer=tokenizer, task="sst2")
    assert isinstance(source, StreamingBatches) and source.dynamic_padding
    assert source.directory.parent == tmp_path / "run" / "shards" and len(source.shards) == 6
    expected = ArrayBatches(columns, ORDER, 8, seed=6, rank=1, world_size=2, dynamic_padding=True)
    assert_same_batches(batches_of(source, 2), batches_of(expected, 2))
    with pytest.raises(ConfigError, match="data.stream: must be auto, memory or disk"):
        load_config(None, ["data.stream=ram"])


def test_msnc_data_shards_command(sst2_file, tokenizer, tmp_path, capsys):
    vocab = str(tokenizer.vocab_path)
    assert msnc_main(["data", "shards", "--task", "sst2", "--input", str(sst2_file), "--vocab", vocab,
                      "--output", str(tmp_path / "tsv"), "--max-length", "12", "--shard-rows", "40"]) == 0
    out = capsys.readouterr().out
    assert "shard 1: 40 rows, 39% of the rows" in out and "wrote 103 rows in 3 shards" in out
    assert json.loads((tmp_path / "tsv" / "manifest.json").read_text())["rows"] == 103
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"good movie\nbad\xff film\n")
    assert msnc_main(["data", "shards", "--input", str(corpus), "--vocab", vocab,
                      "--output", str(tmp_path / "lines")]) == 2
    assert "corpus.txt:2: invalid UTF-8" in capsys.readouterr().err
