"""TSV -> MindRecord and the dataset pipelines: batching (the last partial batch), sharding, dtypes, the CLI."""
import numpy as np
import pytest

from ms_nlp_compress.cli import main as msnc_main
from ms_nlp_compress.data.glue import read_sst2
from ms_nlp_compress.data.mindrecord import (
    build_dataset, build_dataset_from_examples, convert_tsv_to_mindrecord, encode_examples,
)
from ms_nlp_compress.data.tokenization import WordPieceTokenizer
from ms_nlp_compress.errors import DataError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "film", "very", "not", "a", "the"]
WORDS = ["good", "bad", "movie", "film", "very", "not", "a", "the"]
MAX_LENGTH = 8


@pytest.fixture
def tokenizer(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return WordPieceTokenizer.from_vocab(tmp_path / "vocab.txt", lowercase=True, max_length=MAX_LENGTH)


@pytest.fixture
def sst2_tsv(tmp_path):
    """10 rows: row i has label i % 2 and i + 1 words, so every row is recognisable after batching."""
    rows = ["sentence\tlabel"] + [" ".join(WORDS[j % len(WORDS)] for j in range(i + 1)) + f"\t{i % 2}"
                                  for i in range(10)]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def lengths(dataset):
    return [batch["label"].shape[0] for batch in dataset.create_dict_iterator(output_numpy=True, num_epochs=1)]


def rows(dataset):
    return [row for batch in dataset.create_dict_iterator(output_numpy=True, num_epochs=1)
            for row in zip(*(batch[name] for name in ("input_ids", "token_type_ids", "attention_mask", "label")))]


def test_convert_then_evaluation_keeps_the_last_partial_batch(tmp_path, tokenizer, sst2_tsv):
    report = convert_tsv_to_mindrecord("sst2", sst2_tsv, tokenizer, tmp_path / "out/train.mindrecord", MAX_LENGTH)
    assert report.examples == 10 and report.skipped == 0 and report.files[0].is_file()
    evaluation = build_dataset(report.files[0], batch_size=4, shuffle=False)
    assert lengths(evaluation) == [4, 4, 2]
    batch = next(evaluation.create_dict_iterator(output_numpy=True, num_epochs=1))
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (4, MAX_LENGTH)
    assert batch["label"].dtype == np.int32
    expected = encode_examples(read_sst2(sst2_tsv), tokenizer, MAX_LENGTH)
    for name in ("input_ids", "token_type_ids", "attention_mask", "label"):
        assert np.array_equal(np.concatenate([b[name] for b in evaluation.create_dict_iterator(
            output_numpy=True, num_epochs=1)]), expected[name])


def test_training_drops_the_remainder_unless_told_otherwise(tmp_path, tokenizer, sst2_tsv):
    path = convert_tsv_to_mindrecord("sst2", sst2_tsv, tokenizer, tmp_path / "train.mindrecord", MAX_LENGTH).files[0]
    assert lengths(build_dataset(path, batch_size=4, shuffle=True)) == [4, 4]
    assert sorted(lengths(build_dataset(path, batch_size=4, shuffle=True, drop_remainder=False))) == [2, 4, 4]


def test_ranks_see_every_example_exactly_once_in_evaluation(tmp_path, tokenizer, sst2_tsv):
    path = convert_tsv_to_mindrecord("sst2", sst2_tsv, tokenizer, tmp_path / "train.mindrecord", MAX_LENGTH,
                                     shard_num=2).files[0]
    assert path.name == "train.mindrecord0"
    seen = []
    for rank in range(3):
        shard = rows(build_dataset(tmp_path / "train.mindrecord", batch_size=3, shuffle=False, rank=rank,
                                   world_size=3))
        assert len(shard) == 4  # 10 examples + 2 padding rows over 3 ranks
        seen += shard
    real = [row for row in seen if row[3] != -1]
    padding = [row for row in seen if row[3] == -1]
    assert len(padding) == 2 and all(row[2].sum() == 0 for row in padding)
    assert sorted(int(row[2].sum()) for row in real) == sorted(min(i + 3, MAX_LENGTH) for i in range(10))


def test_regression_labels_are_float32(tmp_path, tokenizer):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    lines = [header] + [f"{i}\tg\tf\t2014\t{i}\tv\tv\tgood movie\t{'' if i % 2 else 'bad film'}\t{i / 4 - 1}"
                        for i in range(5)]
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = convert_tsv_to_mindrecord("stsb", tsv, tokenizer, tmp_path / "dev.mindrecord", MAX_LENGTH).files[0]
    batch = next(build_dataset(path, batch_size=8, shuffle=False).create_dict_iterator(output_numpy=True,
                                                                                      num_epochs=1))
    assert batch["label"].dtype == np.float32
    assert np.allclose(batch["label"], [-1.0, -0.75, -0.5, -0.25, 0.0])
    assert batch["token_type_ids"][0].sum() == 3 and batch["token_type_ids"][1].sum() == 0  # pair vs single


def test_in_memory_pipeline_matches_mindrecord_and_keeps_last_batch(tmp_path, tokenizer, sst2_tsv):
    examples = read_sst2(sst2_tsv)
    evaluation = build_dataset_from_examples(examples, tokenizer, MAX_LENGTH, batch_size=4)
    assert lengths(evaluation) == [4, 4, 2]
    path = convert_tsv_to_mindrecord("sst2", sst2_tsv, tokenizer, tmp_path / "train.mindrecord", MAX_LENGTH).files[0]
    for from_memory, from_file in zip(rows(evaluation), rows(build_dataset(path, batch_size=4, shuffle=False))):
        assert all(np.array_equal(a, b) for a, b in zip(from_memory, from_file))
    per_rank = [rows(build_dataset_from_examples(examples, tokenizer, MAX_LENGTH, batch_size=4, rank=rank,
                                                 world_size=4)) for rank in range(4)]
    assert [len(shard) for shard in per_rank] == [3, 3, 3, 3]
    assert sum(1 for shard in per_rank for row in shard if row[3] == -1) == 2
    assert lengths(build_dataset_from_examples(examples, tokenizer, MAX_LENGTH, batch_size=4, shuffle=True)) == [4, 4]


def test_bad_inputs_are_clear_errors(tmp_path, tokenizer, sst2_tsv):
    with pytest.raises(DataError, match="MindRecord file not found"):
        build_dataset(tmp_path / "missing.mindrecord", batch_size=4, shuffle=False)
    path = convert_tsv_to_mindrecord("sst2", sst2_tsv, tokenizer, tmp_path / "a.mindrecord", MAX_LENGTH).files[0]
    with pytest.raises(DataError, match="no column"):
        build_dataset(path, batch_size=4, shuffle=False, columns=["word_ids"])
    with pytest.raises(ValueError, match="rank 2"):
        build_dataset(path, batch_size=4, shuffle=False, rank=2, world_size=2)
    with pytest.raises(DataError, match="unknown task"):
        convert_tsv_to_mindrecord("wnli", sst2_tsv, tokenizer, tmp_path / "b.mindrecord", MAX_LENGTH)


def test_cli_convert_and_cli_errors(tmp_path, sst2_tsv, capsys):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    with open(sst2_tsv, "a", encoding="utf-8") as handle:
        handle.write("broken row without label\n")
    arguments = ["data", "convert", "--task", "sst2", "--input", str(sst2_tsv), "--vocab", str(tmp_path / "vocab.txt"),
                 "--output", str(tmp_path / "cli.mindrecord"), "--max-length", str(MAX_LENGTH)]
    assert msnc_main(arguments) == 2
    assert f"{sst2_tsv}:12: 1 columns, expected 2" in capsys.readouterr().err
    assert msnc_main(arguments + ["--skip-malformed"]) == 0
    assert "wrote 10 examples" in capsys.readouterr().out
    assert lengths(build_dataset(tmp_path / "cli.mindrecord", batch_size=4, shuffle=False)) == [4, 4, 2]
    assert msnc_main(["data", "fetch", "--cache", str(tmp_path / "cache"), "--only", "glue"]) == 2
    assert "unknown asset(s) glue" in capsys.readouterr().err
