"""`msnc augment` end to end on a tiny saved masked-LM directory: both routes, originals kept, deterministic."""
import mindspore as ms

from ms_nlp_compress.cli import main
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.data.augment import split_words
from ms_nlp_compress.data.tokenization import WordPieceTokenizer
from ms_nlp_compress.models.checkpoint import save_model_dir
from ms_nlp_compress.models.nezha import NezhaForMaskedLM

WORDS = ["the", "movie", "film", "good", "great", "bad", "plot", "story", "fun", "dull", "un", "##believ", "##able",
         "."]


def test_augment_command_lines_and_tsv(tmp_path, capsys):
    model_dir = tmp_path / "mlm"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    ms.set_seed(0)
    config = NezhaConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                         max_relative_position=8)
    save_model_dir(NezhaForMaskedLM(config), model_dir, config)
    lines = tmp_path / "in.txt"
    lines.write_text("the movie was good .\nunbelievable dull plot\n")
    common = ["augment", "--model", str(model_dir), "--samples", "6", "--candidates", "3", "--mode", "pynative"]
    assert main(common + ["--input", str(lines), "--output", str(tmp_path / "a.txt"), "--lines"]) == 0
    assert main(common + ["--input", str(lines), "--output", str(tmp_path / "b.txt"), "--lines"]) == 0
    assert "MLM route on" in capsys.readouterr().out
    out = (tmp_path / "a.txt").read_text().splitlines()
    assert out == (tmp_path / "b.txt").read_text().splitlines()
    tokenizer = WordPieceTokenizer.from_vocab(model_dir / "vocab.txt", lowercase=True)
    first_block = out[: out.index("unbelievable dull plot")]
    assert first_block[0] == "the movie was good ." and len(first_block) > 1
    for variant in out:
        assert len(split_words(tokenizer, variant)) in (5, 3)  # whole words only
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\ngood film\t1\ndull story\t0\n")
    assert main(common + ["--input", str(tsv), "--output", str(tmp_path / "train_aug.tsv")]) == 0
    rows = [row.split("\t") for row in (tmp_path / "train_aug.tsv").read_text().splitlines()]
    assert rows[0] == ["sentence", "label"] and rows[1] == ["good film", "1"]
    second = rows.index(["dull story", "0"])
    assert {row[1] for row in rows[1:second]} == {"1"} and {row[1] for row in rows[second:]} == {"0"}
    assert len(rows) > 3
    assert main(common + ["--input", str(tmp_path / "missing.tsv"), "--output", str(tmp_path / "x.tsv")]) == 2


def test_augment_train_of_a_config_takes_the_split_the_runs_train_on(tmp_path, capsys):
    """`--train-of X.yaml`: the originals of the augmented file are exactly the examples `read_split` gives the
    distillation (data.train_limit subsample, order kept), each followed by its variants with the same label."""
    from ms_nlp_compress.config import load_config
    from ms_nlp_compress.data.glue import get_task
    from ms_nlp_compress.train.finetune import read_split

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    ms.set_seed(0)
    config = NezhaConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                         max_relative_position=8)
    save_model_dir(NezhaForMaskedLM(config), model_dir, config)
    data = tmp_path / "sst2"
    data.mkdir()
    texts = ["good film", "dull story", 'the "fun" plot', "bad movie", "great story", "the dull film"]
    (data / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"data: {{task: sst2, data_dir: {data}, train_limit: 4}}\nruntime: {{seed: 3}}\n")
    output = tmp_path / "aug" / "train_aug.tsv"
    common = ["augment", "--model", str(model_dir), "--samples", "3", "--candidates", "3", "--mode", "pynative",
              "--no-mlm"]
    assert main(common + ["--train-of", str(preset), "--output", str(output)]) == 0
    expected = [(e.text_a, e.label) for e in read_split(load_config(preset), "train")[1]]
    assert len(expected) == 4
    source = [(e.text_a, e.label) for e in get_task("sst2").reader(tmp_path / "aug" / "train_aug.source.tsv")]
    assert source == expected
    rows = [(e.text_a, e.label) for e in get_task("sst2").reader(output)]
    starts = [rows.index(pair) for pair in expected]
    assert starts == sorted(starts) and starts[0] == 0
    for begin, end, (_, label) in zip(starts, starts[1:] + [len(rows)], expected):
        assert {row_label for _, row_label in rows[begin:end]} == {label}
    assert main(common + ["--output", str(output)]) == 2  # neither --input nor --train-of
    assert "exactly one of --input and --train-of" in capsys.readouterr().err
