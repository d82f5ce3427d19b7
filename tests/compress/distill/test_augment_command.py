"""`msnc augment` end to end on a tiny saved masked-LM directory: both routes, originals kept, deterministic."""
import mindspore as ms

from ms_nlp_compress.compress.distill.commands import main
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
