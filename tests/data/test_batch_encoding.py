"""Batch encoding through the libraries' batch APIs: the ids of the per-text reference path, exactly.

The reference is `encode` (one text at a time, pure-Python assembly), itself tested against the `tokenizers` BERT
pipeline in test_tokenization.py; here the batch path (one `encode_batch` call of `tokenizers` / SentencePiece,
numpy assembly) must reproduce it on real data, and `RaggedEncoding` is checked against a plain-Python twin.
"""
import random

import numpy as np
import pytest

from ms_nlp_compress.data.glue import read_sst2
from ms_nlp_compress.data.tokenization import (
    RaggedEncoding, SentencePieceTokenizer, WordPieceTokenizer, longest_first_lengths, longest_first_lengths_batch,
)

NAMES = ("input_ids", "token_type_ids", "attention_mask", "word_ids")


def per_text(tokenizer, texts, pairs, max_length, pad=True):
    """The reference: one `encode` call per text, padded by hand to the batch width."""
    encodings = [tokenizer.encode(text, pair, max_length, pad) for text, pair in zip(texts, pairs)]
    width = max_length if pad else max(len(encoding) for encoding in encodings)
    fills = {"input_ids": tokenizer.pad_id, "token_type_ids": 0, "attention_mask": 0, "word_ids": -1}
    return {name: np.array([list(getattr(encoding, name)) + [fills[name]] * (width - len(encoding))
                            for encoding in encodings], dtype=np.int32) for name in NAMES}


def assert_same(batch, reference):
    for name in NAMES:
        actual = getattr(batch, name)
        assert actual.dtype == np.int32, name
        np.testing.assert_array_equal(actual, reference[name], err_msg=name)


@pytest.fixture(scope="module")
def vader_sentences(real_cache):
    return [example.text_a for example in read_sst2(real_cache / "vader/sst2/train.tsv")]


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_path):
    return WordPieceTokenizer.from_vocab(minilm_path / "vocab.txt")


@pytest.mark.parametrize("max_length", [128, 24, 7])
def test_real_vader_batch_ids_equal_per_text_ids(vader_sentences, minilm_tokenizer, max_length):
    """1,500 real VADER sentences with the real MiniLM vocabulary; a third are pairs; the 20 longest included."""
    rng = random.Random(max_length)
    longest = sorted(vader_sentences, key=len)[-20:]  # so that truncation happens at every max_length
    texts = rng.sample(vader_sentences, 1480) + longest
    pairs = [rng.choice(vader_sentences) if row % 3 == 0 else None for row in range(1480)] + longest[::-1]
    reference = per_text(minilm_tokenizer, texts, pairs, max_length)
    assert_same(minilm_tokenizer.encode_batch(texts, pairs, max_length), reference)
    fast = minilm_tokenizer.encode_ragged(texts, pairs, max_length, word_ids=False)  # encode_batch_fast inside
    assert fast.word_ids is None
    padded = fast.padded(minilm_tokenizer.pad_id, max_length)
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(getattr(padded, name), reference[name], err_msg=name)
    assert reference["token_type_ids"].any() and (reference["attention_mask"].sum(1) == max_length).any()
    dynamic = per_text(minilm_tokenizer, texts[:300], pairs[:300], max_length, pad=False)
    assert_same(minilm_tokenizer.encode_batch(texts[:300], pairs[:300], max_length, pad=False), dynamic)


def test_real_vader_batch_matches_tokenizer_json(vader_sentences, minilm_path, minilm_tokenizer):
    """Independent reference for single sentences: MiniLM's own tokenizer.json pipeline (truncation + padding 128)."""
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(minilm_path / "tokenizer.json"))
    texts = vader_sentences[:1000]
    expected = reference.encode_batch(texts)
    batch = minilm_tokenizer.encode_batch(texts)
    assert batch.input_ids.tolist() == [encoding.ids for encoding in expected]
    assert batch.attention_mask.tolist() == [encoding.attention_mask for encoding in expected]
    assert batch.word_ids.tolist() == [[-1 if w is None else w for w in encoding.word_ids] for encoding in expected]


def test_pre_segmented_and_raw_texts_mixed_in_one_batch(minilm_tokenizer):
    texts = ["The unaffable fox jumped, don't!", ["中国人民", "unaffable", "fox"], "", ["a"], "Zürich naïve café"]
    pairs = [["jump", "##ed"], None, "the other side", "", None]
    assert_same(minilm_tokenizer.encode_batch(texts, pairs, 16), per_text(minilm_tokenizer, texts, pairs, 16))


def test_batch_errors_and_empty_batch(minilm_tokenizer):
    with pytest.raises(ValueError, match="special tokens"):
        minilm_tokenizer.encode_batch(["a"], ["b"], max_length=2)
    with pytest.raises(ValueError, match="2 texts but 1 text pairs"):
        minilm_tokenizer.encode_batch(["a", "b"], ["c"])
    empty = minilm_tokenizer.encode_batch([], max_length=8)
    assert empty.input_ids.shape == (0, 8)


def test_vectorised_truncation_matches_closed_form_exhaustively():
    grid = np.array([(a, b, budget) for budget in range(0, 14) for a in range(16) for b in range(16)])
    keep_a, keep_b = longest_first_lengths_batch(grid[:, 0], grid[:, 1], grid[:, 2])
    expected = np.array([longest_first_lengths(a, b, budget) for a, b, budget in grid])
    np.testing.assert_array_equal(np.stack([keep_a, keep_b], 1), expected)


def test_ragged_take_concatenate_padded_against_python_twin():
    rng = np.random.default_rng(0)
    rows = [rng.integers(5, 100, rng.integers(2, 9)).tolist() for _ in range(12)]
    first = [int(rng.integers(2, len(row) + 1)) for row in rows]
    words = [list(range(len(row))) for row in rows]
    ragged = RaggedEncoding(np.array(sum(rows, []), np.int32), np.array(sum(words, []), np.int32),
                            np.concatenate([[0], np.cumsum([len(row) for row in rows])]), np.array(first, np.int32))
    pick = [7, 0, 7, 11, 3]
    chosen = RaggedEncoding.concatenate([ragged.take(pick[:2]), ragged.take(pick[2:])])
    padded = chosen.padded(pad_id=0, width=10, word_width=12)
    for out_row, row in enumerate(pick):
        n = len(rows[row])
        assert padded.input_ids[out_row].tolist() == rows[row] + [0] * (10 - n)
        assert padded.attention_mask[out_row].tolist() == [1] * n + [0] * (10 - n)
        assert padded.token_type_ids[out_row].tolist() == [0] * first[row] + [1] * (n - first[row]) + [0] * (10 - n)
        assert padded.word_ids[out_row].tolist() == words[row] + [-1] * (12 - n)
    assert chosen.padded(0).input_ids.shape == (5, max(len(rows[row]) for row in pick))
    with pytest.raises(ValueError, match="does not fit"):
        chosen.padded(0, width=3)


# ------------------------------------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def english_spm(real_cache, tmp_path_factory):
    """A small unigram model on real Brown sentences ("▁" marks word starts: word ids come from it)."""
    folder = tmp_path_factory.mktemp("spm_en")
    lines = (real_cache / "brown/corpus.txt").read_text(encoding="utf-8").splitlines()[:3000]
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return SentencePieceTokenizer.train(folder / "corpus.txt", folder / "en", vocab_size=600, lowercase=True,
                                        character_coverage=1.0, max_length=48), lines


@pytest.fixture(scope="module")
def chinese_spm(real_cache, tmp_path_factory):
    """A small model on real People's Daily paragraphs (spaces removed), fed segmented words too."""
    folder = tmp_path_factory.mktemp("spm_zh")
    paragraphs = (real_cache / "peoples_daily/corpus.txt").read_text(encoding="utf-8").splitlines()[:600]
    (folder / "corpus.txt").write_text("\n".join(p.replace(" ", "") for p in paragraphs) + "\n", encoding="utf-8")
    model = SentencePieceTokenizer.train(folder / "corpus.txt", folder / "zh", vocab_size=1500,
                                         add_dummy_prefix=False, character_coverage=0.98, max_length=40)
    return model, paragraphs


def test_sentencepiece_batch_equals_per_text_on_brown(english_spm):
    model, lines = english_spm
    rng = random.Random(0)
    texts = lines[1000:1400]
    pairs = [rng.choice(lines) if row % 2 else None for row in range(len(texts))]
    reference = per_text(model, texts, pairs, 48)
    assert len(set(reference["word_ids"][:, 1])) > 0 and reference["word_ids"].max() > 5
    assert_same(model.encode_batch(texts, pairs, 48), reference)


def test_sentencepiece_batch_equals_per_text_on_segmented_peoples_daily(chinese_spm):
    model, paragraphs = chinese_spm
    raw = [paragraph.replace(" ", "") for paragraph in paragraphs[:100]]
    segmented = [paragraph.split(" ")[:30] for paragraph in paragraphs[100:200]]
    texts = [item for pair in zip(raw, segmented) for item in pair]  # raw strings and word lists interleaved
    pairs = [segmented[row % 100][:5] if row % 3 == 0 else None for row in range(len(texts))]
    reference = per_text(model, texts, pairs, 40)
    assert_same(model.encode_batch(texts, pairs, 40), reference)
    np.testing.assert_array_equal(model.encode_ragged(texts, pairs, 40, word_ids=False).padded(0, 40).input_ids,
                                  reference["input_ids"])
