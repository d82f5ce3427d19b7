"""WordPiece and SentencePiece tokenizers: ids, word ids, longest-first truncation, padding, errors."""
import json
import random

import numpy as np
import pytest

from ms_nlp_compress.data.tokenization import (
    SentencePieceTokenizer, WordPieceTokenizer, load_tokenizer, longest_first_lengths,
)
from ms_nlp_compress.errors import DataError

TINY_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "the", "quick", "brown", "fox", "jump", "##ed", "##s", "over", "lazy", "dog", "un", "##aff", "##able",
    "don", "'", "t", ",", ".", "!", "a", "b", "c", "d", "e", "中", "国", "人", "hello", "world", "cafe",
]


@pytest.fixture
def vocab_path(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tokenizer(vocab_path):
    return WordPieceTokenizer.from_vocab(vocab_path, lowercase=True, max_length=16)


def test_special_ids_and_vocab_size(tokenizer):
    assert tokenizer.special_ids() == {"pad_id": 0, "unk_id": 1, "cls_id": 2, "sep_id": 3, "mask_id": 4}
    assert tokenizer.vocab_size == len(TINY_VOCAB)
    assert tokenizer.convert_ids_to_tokens([2, 5, 3]) == ["[CLS]", "the", "[SEP]"]
    assert tokenizer.convert_tokens_to_ids(["fox", "nope"]) == [8, 1]


def test_single_sentence_pieces_and_word_ids(tokenizer):
    encoding = tokenizer.encode("The unaffable fox jumped, don't!")
    tokens = tokenizer.convert_ids_to_tokens(encoding.input_ids[: encoding.attention_mask.sum()])
    assert tokens == ["[CLS]", "the", "un", "##aff", "##able", "fox", "jump", "##ed", ",", "don", "'", "t", "!",
                      "[SEP]"]
    # "##" pieces share the id of the word they continue; punctuation is its own word, as in BERT's basic tokenizer.
    assert encoding.word_ids.tolist() == [-1, 0, 1, 1, 1, 2, 3, 3, 4, 5, 6, 7, 8, -1, -1, -1]
    assert encoding.attention_mask.tolist() == [1] * 14 + [0] * 2
    assert encoding.token_type_ids.tolist() == [0] * 16
    assert encoding.input_ids.dtype == np.int32 and encoding.input_ids.shape == (16,)


def test_accents_are_stripped_when_lowercasing(tokenizer):
    assert tokenizer.tokenize("Café") == ["cafe"]


def test_cased_tokenizer_keeps_case(vocab_path):
    cased = WordPieceTokenizer.from_vocab(vocab_path, lowercase=False)
    assert cased.tokenize("The the") == ["[UNK]", "the"]


def test_lowercase_read_from_tokenizer_config(vocab_path):
    (vocab_path.parent / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert WordPieceTokenizer.from_vocab(vocab_path).lowercase is False
    (vocab_path.parent / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    assert WordPieceTokenizer.from_vocab(vocab_path).lowercase is True


def test_pre_segmented_words_drive_word_ids(tokenizer):
    encoding = tokenizer.encode(["unaffable", "中国人", "fox"], pad=False)
    assert tokenizer.convert_ids_to_tokens(encoding.input_ids) == [
        "[CLS]", "un", "##aff", "##able", "中", "国", "人", "fox", "[SEP]"]
    # a Chinese word is split into characters by BERT, but all of them keep the word's index
    assert encoding.word_ids.tolist() == [-1, 0, 0, 0, 1, 1, 1, 2, -1]


def test_pair_segments_and_word_numbering(tokenizer):
    encoding = tokenizer.encode("the fox", "jumped over", pad=False)
    assert tokenizer.convert_ids_to_tokens(encoding.input_ids) == [
        "[CLS]", "the", "fox", "[SEP]", "jump", "##ed", "over", "[SEP]"]
    assert encoding.token_type_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # B's words continue after A's so a word id never names two words
    assert encoding.word_ids.tolist() == [-1, 0, 1, -1, 2, 2, 3, -1]


def test_parity_with_tokenizers_bert_pipeline(vocab_path, tokenizer):
    """Independent reference: the `tokenizers` library's own BERT pipeline (post-processor, truncation, padding)."""
    from tokenizers import BertWordPieceTokenizer

    reference = BertWordPieceTokenizer(str(vocab_path), lowercase=True)
    reference.enable_truncation(max_length=16)
    reference.enable_padding(length=16)
    rng = random.Random(0)
    words = ["The", "quick", "BROWN", "fox", "jumps", "over", "lazy", "dogs", "unaffable", "zebra", "don't", ",",
             "中国人", "Café", "hello!"]
    for trial in range(200):
        text_a = " ".join(rng.choice(words) for _ in range(rng.randint(0, 20)))
        text_b = " ".join(rng.choice(words) for _ in range(rng.randint(0, 3))) if trial % 2 else None
        expected = reference.encode(text_a, text_b) if text_b is not None else reference.encode(text_a)
        if text_b is not None and len(expected.overflowing):
            continue  # pair truncation: the Rust rule differs by one token on odd budgets (module docstring)
        actual = tokenizer.encode(text_a, text_b)
        assert actual.input_ids.tolist() == expected.ids, text_a
        assert actual.token_type_ids.tolist() == expected.type_ids
        assert actual.attention_mask.tolist() == expected.attention_mask
        if text_b is None:  # the library restarts word numbering for B; we continue it (module docstring)
            assert actual.word_ids.tolist() == [-1 if word is None else word for word in expected.word_ids]


def twin_truncate_pair(tokens_a, tokens_b, budget):
    """BERT's `_truncate_seq_pair`, written independently: pop from the longer list, from B on ties."""
    tokens_a, tokens_b = list(tokens_a), list(tokens_b)
    while len(tokens_a) + len(tokens_b) > budget:
        if len(tokens_a) > len(tokens_b):
            tokens_a.pop()
        else:
            tokens_b.pop()
    return tokens_a, tokens_b


def test_longest_first_lengths_match_twin_exhaustively():
    for budget in range(0, 14):
        for length_a in range(0, 16):
            for length_b in range(0, 16):
                kept_a, kept_b = twin_truncate_pair(range(length_a), range(length_b), budget)
                assert longest_first_lengths(length_a, length_b, budget) == (len(kept_a), len(kept_b))


def test_pair_truncation_matches_twin_on_encodings(tokenizer):
    rng = random.Random(1)
    single_piece_words = ["the", "quick", "brown", "fox", "over", "lazy", "dog", "a", "b", "c"]
    for _ in range(100):
        words_a = [rng.choice(single_piece_words) for _ in range(rng.randint(0, 20))]
        words_b = [rng.choice(single_piece_words) for _ in range(rng.randint(0, 20))]
        max_length = rng.randint(3, 24)
        kept_a, kept_b = twin_truncate_pair(words_a, words_b, max_length - 3)
        expected = ["[CLS]", *kept_a, "[SEP]", *kept_b, "[SEP]"]
        expected += ["[PAD]"] * (max_length - len(expected))
        encoding = tokenizer.encode(" ".join(words_a), " ".join(words_b), max_length=max_length)
        assert tokenizer.convert_ids_to_tokens(encoding.input_ids) == expected
        assert encoding.token_type_ids.tolist() == [0] * (len(kept_a) + 2) + [1] * (len(kept_b) + 1) + [0] * (
            max_length - len(kept_a) - len(kept_b) - 3)


def test_very_long_input_is_truncated_not_rejected(tokenizer):
    long_text = " ".join(["unaffable jumped"] * 5000)  # 10k words, 25k pieces
    encoding = tokenizer.encode(long_text, long_text, max_length=64)
    assert encoding.input_ids.shape == (64,) and encoding.attention_mask.all()
    assert (encoding.token_type_ids == 1).sum() == 31  # 61 pieces split 31/30, plus B's [SEP]
    batch = tokenizer.encode_batch([long_text, "the fox"], max_length=32)
    assert batch.input_ids.shape == (2, 32)


def test_max_length_too_small_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="special tokens"):
        tokenizer.encode("the", "fox", max_length=2)


def test_encode_batch_fixed_and_dynamic_padding(tokenizer):
    batch = tokenizer.encode_batch(["the fox", "the quick brown fox"], ["dog", None])
    assert batch.input_ids.shape == (2, 16) and batch.word_ids.shape == (2, 16)
    dynamic = tokenizer.encode_batch(["the fox", "the quick brown fox"], pad=False)
    assert dynamic.input_ids.shape == (2, 6)
    assert dynamic.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert dynamic.word_ids[0].tolist() == [-1, 0, 1, -1, -1, -1]


def test_missing_vocab_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "vocab.txt"
    with pytest.raises(DataError, match=str(missing)):
        WordPieceTokenizer.from_vocab(missing)


def test_vocab_without_special_tokens_is_rejected(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[UNK]\nthe\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"\[PAD\]"):
        WordPieceTokenizer.from_vocab(path)


# ------------------------------------------------------------------------------------------------ SentencePiece

CHINESE_WORDS = ["我们", "今天", "天气", "很好", "中国", "人民", "大学", "北京", "上海", "的", "是", "了", "在", "学习",
                 "语言", "模型", "压缩", "知识", "蒸馏"]


@pytest.fixture(scope="module")
def chinese_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    lines = ["".join(rng.choice(CHINESE_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return SentencePieceTokenizer.train(folder / "corpus.txt", folder / "zh", vocab_size=100,
                                        character_coverage=1.0, add_dummy_prefix=False, max_length=32)


def test_sentencepiece_fixed_special_ids(chinese_model):
    assert chinese_model.special_ids() == {"pad_id": 0, "unk_id": 1, "cls_id": 2, "sep_id": 3, "mask_id": 4}
    assert chinese_model.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert 30 < chinese_model.vocab_size <= 100


def test_sentencepiece_round_trip(chinese_model):
    text = "我们今天在北京学习语言模型压缩"
    encoding = chinese_model.encode(text)
    real = encoding.input_ids[encoding.attention_mask == 1]
    assert real[0] == chinese_model.cls_id and real[-1] == chinese_model.sep_id
    assert chinese_model.decode(encoding.input_ids) == text
    pieces = chinese_model.tokenize(text)
    assert chinese_model.convert_tokens_to_ids(pieces) == real[1:-1].tolist()
    assert encoding.input_ids.shape == (32,) and (encoding.input_ids[len(real):] == 0).all()


def test_sentencepiece_pre_segmented_word_ids_and_pairs(chinese_model):
    words = ["我们", "学习", "知识", "蒸馏"]
    encoding = chinese_model.encode(words, ["北京", "大学"], pad=False)
    word_ids = encoding.word_ids.tolist()
    assert word_ids[0] == -1 and word_ids[-1] == -1
    tokens = chinese_model.convert_ids_to_tokens(encoding.input_ids)
    first_sep = tokens.index("[SEP]")
    for word_index, word in enumerate(words):  # each word's pieces spell exactly that word
        assert "".join(t for t, w in zip(tokens, word_ids) if w == word_index) == word
    assert set(word_ids[first_sep + 1:-1]) == {4, 5}
    assert chinese_model.encode("我们" * 500).input_ids.shape == (32,)


def test_sentencepiece_model_without_special_tokens_is_rejected(tmp_path):
    import sentencepiece

    (tmp_path / "corpus.txt").write_text("\n".join(["abc def ghi"] * 50), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.Train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "plain"),
                                             vocab_size=20, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(DataError, match="special token"):
        SentencePieceTokenizer(tmp_path / "plain.model")
    with pytest.raises(DataError, match="missing.model"):
        SentencePieceTokenizer(tmp_path / "missing.model")


def test_load_tokenizer_dispatches_on_suffix(vocab_path, chinese_model):
    assert isinstance(load_tokenizer(vocab_path), WordPieceTokenizer)
    assert isinstance(load_tokenizer(chinese_model.model_path), SentencePieceTokenizer)


# --------------------------------------------------------------------------------------- real MiniLM

def test_real_minilm_parity_with_tokenizer_json(minilm_path):
    from tokenizers import Tokenizer

    folder = minilm_path
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))  # truncation 128 LongestFirst, padding 128
    tokenizer = WordPieceTokenizer.from_vocab(folder / "vocab.txt")
    assert tokenizer.lowercase and tokenizer.vocab_size == 30522
    sentences = ["The Rock is destined to be the 21st Century's new ``Conan''.", "Zürich naïve café, 12.5% e-mail!",
                 "中国人民 unaffable " * 80, "A gorgeously elaborate continuation of The Lord of the Rings."]
    for first in sentences:
        expected = reference.encode(first)
        actual = tokenizer.encode(first)
        assert actual.input_ids.tolist() == expected.ids
        assert actual.word_ids.tolist() == [-1 if w is None else w for w in expected.word_ids]
        for second in sentences[:2] + sentences[3:]:  # pairs that fit: no truncation-rule difference
            expected = reference.encode(first, second)
            if not expected.overflowing:
                assert tokenizer.encode(first, second).input_ids.tolist() == expected.ids
