"""`msnc pretrain` (train/pretrain.py): config section, vocabulary, per-epoch masking batches, a tiny real run whose
MLM loss falls and whose saved backbone loads into build_classifier."""
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from ms_nlp_compress.config import ExperimentConfig
from ms_nlp_compress.data.masking import build_pretraining_examples
from ms_nlp_compress.data.tokenization import SPECIAL_TOKENS, load_tokenizer
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.train.pretrain import (MLM_INPUTS, MaskedLMBatches, PretrainConfig, build_wordpiece_vocab,
                                            load_pretrain_experiment, run_pretrain)

REPO = Path(__file__).resolve().parents[2]
# A toy segmented "news" corpus: a few fixed phrases, so a 2-layer model learns something within 30 updates.
PHRASES = [["中国", "人民", "银行"], ["经济", "的", "发展"], ["新", "世纪", "的", "会议"],
           ["北京", "召开", "会议"], ["上海", "经济", "发展"], ["１９９８年", "的", "中国"]]


def _corpus(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        words = [w for index in rng.integers(0, len(PHRASES), size=int(rng.integers(1, 4))) for w in PHRASES[index]]
        lines.append(" ".join(words + ["。"]))
    return lines


@pytest.fixture(scope="module")
def toy_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vocab")
    build_wordpiece_vocab(_corpus(200), directory, vocab_size=1000, min_frequency=1)
    return load_tokenizer(directory / "vocab.txt", max_length=24)


def test_wordpiece_vocab_is_deterministic_with_fixed_specials(tmp_path, toy_tokenizer):
    lines = _corpus(200)
    first = build_wordpiece_vocab(lines, tmp_path / "a", vocab_size=1000, min_frequency=1).read_text("utf-8")
    second = build_wordpiece_vocab(lines, tmp_path / "b", vocab_size=1000, min_frequency=1).read_text("utf-8")
    assert first == second
    tokens = first.split("\n")
    assert tokens[:5] == list(SPECIAL_TOKENS)
    assert {"中", "国", "##９", "##7", "x"} <= set(tokens)  # corpus chars, full-width continuation, ASCII
    assert toy_tokenizer.tokenize("中国XP 1998") == ["中", "国", "x", "##p", "1", "##9", "##9", "##8"]
    small = build_wordpiece_vocab(lines, tmp_path / "c", vocab_size=50, min_frequency=1).read_text("utf-8")
    assert len(small.split("\n")) - 1 == 50


def test_sentencepiece_vocab_for_a_segmented_chinese_corpus(tmp_path):
    from ms_nlp_compress.train.pretrain import build_sentencepiece_vocab

    lines = _corpus(300)
    model = build_sentencepiece_vocab(lines, tmp_path, vocab_size=60, segmented=True, lowercase=False)
    tokenizer = load_tokenizer(model, max_length=24)
    assert [tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id] == [0, 1, 2,
                                                                                                            3, 4]
    assert not (tmp_path / "spm_corpus.txt").exists()
    columns = build_pretraining_examples(lines[:20], tokenizer, 24)
    # Pieces never cross the corpus's word boundaries: every row's words re-join into corpus words (SentencePiece
    # NFKC-normalises, so the full-width "１９９８年" comes back as "1998年").
    corpus_words = {unicodedata.normalize("NFKC", word) for line in lines[:20] for word in line.split()}
    for ids, words, length in zip(columns["input_ids"], columns["word_ids"], columns["attention_mask"].sum(1)):
        for word in range(words[1:length - 1].max() + 1):
            assert tokenizer.decode(ids[1:length - 1][words[1:length - 1] == word]) in corpus_words


def test_presets_load_and_pretrain_errors_name_key_and_file(tmp_path):
    for name in ("nezha_pretrain_cpu.yaml", "nezha_pretrain_910_8p.yaml"):
        config = load_pretrain_experiment(REPO / "ascend_configs" / name)
        assert config.model.position_embedding == "relative" and config.pretrain.whole_word
    quick = load_pretrain_experiment(REPO / "ascend_configs" / "nezha_pretrain_cpu.yaml",
                                     ["pretrain.pmlm=true", "pretrain.pmlm_max_ratio=0.5"])
    assert quick.pretrain.pmlm and quick.pretrain.pmlm_max_ratio == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  mask_ratoi: 0.2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*pretrain\.mask_ratoi"):
        load_pretrain_experiment(bad)
    with pytest.raises(ConfigError, match=r"pretrain\.mask_ratio"):
        load_pretrain_experiment(REPO / "ascend_configs" / "nezha_pretrain_cpu.yaml", ["pretrain.mask_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"pretrain\.whole_word.*true/false"):
        load_pretrain_experiment(REPO / "ascend_configs" / "nezha_pretrain_cpu.yaml", ["pretrain.whole_word=3"])


def test_pretrain_command_parses(tmp_path):
    import argparse

    from ms_nlp_compress.train.pretrain import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pretrain", "--config", "x.yaml", "--set", "pretrain.pmlm=true", "--no-resume"])
    assert args.config == "x.yaml" and args.overrides == ["pretrain.pmlm=true"] and args.no_resume
    assert callable(args.func)


def _batches(tokenizer, rows=64, **pretrain_overrides):
    columns = build_pretraining_examples(_corpus(rows), tokenizer, 24)
    pretrain = PretrainConfig(max_predictions=4, **pretrain_overrides)
    return columns, pretrain


def test_masked_batches_resume_exactly_and_remask_per_epoch(toy_tokenizer):
    columns, pretrain = _batches(toy_tokenizer)
    batches = MaskedLMBatches(columns, toy_tokenizer, pretrain, batch_size=4, seed=3)
    assert batches.order == MLM_INPUTS
    full = list(batches.epoch(0))
    resumed = list(MaskedLMBatches(columns, toy_tokenizer, pretrain, batch_size=4, seed=3).epoch(0, start=2))
    assert [index for index, _ in resumed] == [index for index, _ in full[2:]]
    for (_, a), (_, b) in zip(full[2:], resumed):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    rows = np.arange(len(columns["input_ids"]))
    epoch0 = batches.mask(columns["input_ids"], columns["word_ids"], rows, 0)
    epoch1 = batches.mask(columns["input_ids"], columns["word_ids"], rows, 1)
    assert not np.array_equal(epoch0.masked_positions, epoch1.masked_positions)  # dynamic re-masking
    static = MaskedLMBatches(columns, toy_tokenizer, PretrainConfig(max_predictions=4, dynamic_masking=False),
                             batch_size=4, seed=3)
    np.testing.assert_array_equal(static.mask(columns["input_ids"], columns["word_ids"], rows, 5).masked_positions,
                                  epoch0.masked_positions)


def test_masks_do_not_depend_on_rank_layout(toy_tokenizer):
    """Two ranks of batch 2 see exactly the rows and masks one process of batch 4 sees."""
    columns, pretrain = _batches(toy_tokenizer)
    single = next(MaskedLMBatches(columns, toy_tokenizer, pretrain, 4, seed=1).epoch(1))[1]
    ranks = [next(MaskedLMBatches(columns, toy_tokenizer, pretrain, 2, seed=1, rank=r, world_size=2).epoch(1))[1]
             for r in range(2)]
    for column, (part0, part1) in zip(single, zip(*ranks)):
        np.testing.assert_array_equal(column, np.concatenate([part0, part1]))


def test_tiny_pretrain_loss_falls_and_backbone_loads_into_classifier(tmp_path, graph_mode):
    from ms_nlp_compress.models.checkpoint import load_model_dir, read_model_dir
    from ms_nlp_compress.train.finetune import build_classifier

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_corpus(300)) + "\n", encoding="utf-8")
    config_file = tmp_path / "pretrain.yaml"
    config_file.write_text(f"""
name: tiny_pretrain
output_dir: {tmp_path / 'run'}
model: {{vocab_size: 100, hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, hidden_act: gelu_tanh,
        position_embedding: relative, max_relative_position: 16, hidden_dropout: 0.0, attention_dropout: 0.0}}
runtime: {{device: cpu, mode: graph, seed: 0}}
data: {{max_length: 24, batch_size: 8, eval_batch_size: 16}}
train: {{learning_rate: 0.005, warmup_ratio: 0.0, schedule: constant, max_steps: 30, log_every: 1, eval_every: 15,
        save_every: 0}}
pretrain: {{corpus: {corpus}, eval_sequences: 16, max_predictions: 4, vocab_min_frequency: 1}}
""", encoding="utf-8")
    report = run_pretrain(load_pretrain_experiment(config_file), resume=False, log=lambda message: None)
    assert report["updates"] == 30 and report["held_out_rows"] == 16 and report["unk_rate"] == 0.0
    losses = [record["loss"] for record in report["train_curve"]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    evals = report["eval_curve"]
    assert len(evals) == 2 and evals[-1]["mlm_loss"] < np.log(report["vocab_size"]) - 0.5

    run = tmp_path / "run"
    mlm, document = load_model_dir(run / "mlm")
    assert type(mlm).__name__ == "NezhaForMaskedLM" and document["pretraining"]["whole_word"] is True
    assert (run / "pretrained" / "vocab.txt").is_file() and (run / "pretrained" / "tokenizer_config.json").is_file()
    finetune_config = ExperimentConfig(pretrained=str(run / "pretrained"))
    classifier, model_config, _ = build_classifier(finetune_config, num_labels=2)  # strict load of the backbone
    assert model_config.vocab_size == report["vocab_size"] and model_config.position_embedding == "relative"
    np.testing.assert_array_equal(classifier.bert.embeddings.word_embeddings.embedding_table.asnumpy(),
                                  mlm.bert.embeddings.word_embeddings.embedding_table.asnumpy())
    _, _, saved = read_model_dir(run / "pretrained")
    assert any(name.startswith("pooler.") for name in saved) and not any(n.startswith("lm_head") for n in saved)
    assert json.loads((run / "results.json").read_text())["pretrained_dir"] == str(run / "pretrained")
