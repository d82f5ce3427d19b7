"""Masked-LM masking and packing (data/masking.py): whole-word grouping, specials, 80/10/10, PMLM counts, packing.

Statistical checks use fixed seeds; tolerances are 4 binomial standard errors (or a chi-square bound at p = 0.001),
so a correct implementation fails with probability well under 1e-3 for any seed, and the fixed seed makes the
outcome deterministic.
"""
import numpy as np
import pytest

from ms_nlp_compress.data.masking import (build_pretraining_examples, mask_batch, mask_tokens, masking_budget,
                                          wordpiece_word_ids)
from ms_nlp_compress.data.tokenization import SPECIAL_TOKENS, WordPieceTokenizer

PAD, UNK, CLS, SEP, MASK = range(5)
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
# Chi-square critical values at p = 0.001 by degrees of freedom.
CHI2_999 = {11: 31.264, 19: 43.820, 44: 78.750}

ENGLISH = ["the", "cat", "dog", "un", "##aff", "##able", "play", "##ing", "##s", "run", "##ner", "a", "big",
           "house", "##hold", "##er", "."]
CHINESE = list("中国人民银行的是在了经济发展新世纪大会")


@pytest.fixture(scope="module")
def english_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("wp_en") / "vocab.txt"
    path.write_text("\n".join(list(SPECIAL_TOKENS) + ENGLISH) + "\n", encoding="utf-8")
    return WordPieceTokenizer.from_vocab(path, lowercase=True, max_length=40)


@pytest.fixture(scope="module")
def chinese_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("wp_zh") / "vocab.txt"
    path.write_text("\n".join(list(SPECIAL_TOKENS) + CHINESE) + "\n", encoding="utf-8")
    return WordPieceTokenizer.from_vocab(path, lowercase=True, max_length=40)


def _masked_set(result):
    return set(result.masked_positions[result.masked_weights > 0].tolist())


def _assert_whole_words(word_ids, result):
    """Every masked position's word has all its pieces masked."""
    masked = _masked_set(result)
    for position in masked:
        word = np.flatnonzero(word_ids == word_ids[position])
        assert set(word.tolist()) <= masked, (position, word, masked)


# ------------------------------------------------------------------------------------------------------------------
# Whole-word grouping
# ------------------------------------------------------------------------------------------------------------------


def test_wordpiece_word_ids_follow_double_hash_pieces(english_tokenizer):
    encoding = english_tokenizer.encode("the unaffable dog playing the households .", pad=True)
    tokens = english_tokenizer.convert_ids_to_tokens(encoding.input_ids)
    assert tokens[:10] == ["[CLS]", "the", "un", "##aff", "##able", "dog", "play", "##ing", "the", "house"]
    from_hashes = wordpiece_word_ids(tokens)
    # The same partition as the tokenizer's word ids (the numbering of words is the same too).
    np.testing.assert_array_equal(from_hashes, encoding.word_ids)
    assert from_hashes[2] == from_hashes[3] == from_hashes[4] != from_hashes[5]


def test_whole_word_masking_on_wordpiece_pieces(english_tokenizer):
    encoding = english_tokenizer.encode("the unaffable dog playing a big households run runner .", pad=True)
    multi_piece_masked = 0
    for seed in range(300):
        result = mask_tokens(encoding.input_ids, encoding.word_ids, vocab_size=len(SPECIAL_TOKENS) + len(ENGLISH),
                             mask_id=MASK, rng=np.random.default_rng(seed), special_ids=SPECIALS, mask_ratio=0.3,
                             max_predictions=8)
        _assert_whole_words(encoding.word_ids, result)
        multi_piece_masked += len(_masked_set(result) & {2, 3, 4})
    assert multi_piece_masked > 0  # the 3-piece word was chosen at least once (and then always whole)


def test_whole_word_masking_on_presegmented_chinese(chinese_tokenizer):
    words = ["中国", "人民", "银行", "的", "经济", "发展", "是", "新", "世纪", "的", "大会"]
    encoding = chinese_tokenizer.encode(words, pad=True)
    # Each word's characters share one word id: word boundaries come from the segmentation, not from characters.
    assert encoding.word_ids[1:5].tolist() == [0, 0, 1, 1]
    seen_words = set()
    for seed in range(300):
        result = mask_tokens(encoding.input_ids, encoding.word_ids, vocab_size=len(SPECIAL_TOKENS) + len(CHINESE),
                             mask_id=MASK, rng=np.random.default_rng(seed), special_ids=SPECIALS, mask_ratio=0.2,
                             max_predictions=6)
        _assert_whole_words(encoding.word_ids, result)
        seen_words |= {int(encoding.word_ids[p]) for p in _masked_set(result)}
    assert seen_words == set(range(len(words)))


def test_token_level_masking_splits_words_when_whole_word_is_off(chinese_tokenizer):
    encoding = chinese_tokenizer.encode(["中国人民银行", "经济发展"], pad=True)
    split = 0
    for seed in range(100):
        result = mask_tokens(encoding.input_ids, encoding.word_ids, 30, MASK, np.random.default_rng(seed),
                             special_ids=SPECIALS, mask_ratio=0.2, whole_word=False)
        masked = _masked_set(result)
        split += any(not set(np.flatnonzero(encoding.word_ids == encoding.word_ids[p]).tolist()) <= masked
                     for p in masked)
    assert split > 50


def test_a_word_that_does_not_fit_the_budget_is_skipped_not_cut():
    # One 5-token word and six 1-token words; budget round(11 * 0.2) = 2: the long word can never be chosen.
    input_ids = np.array([CLS, 10, 11, 12, 13, 14, 20, 21, 22, 23, 24, 25, SEP], dtype=np.int32)
    word_ids = np.array([-1, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, -1], dtype=np.int32)
    for seed in range(200):
        result = mask_tokens(input_ids, word_ids, 30, MASK, np.random.default_rng(seed), special_ids=SPECIALS,
                             mask_ratio=0.2)
        masked = _masked_set(result)
        assert len(masked) == 2 and not masked & {1, 2, 3, 4, 5}


# ------------------------------------------------------------------------------------------------------------------
# Specials, targets, padding, determinism
# ------------------------------------------------------------------------------------------------------------------


def _random_sequence(rng, length=48, real=40, vocab=200):
    input_ids = np.full(length, PAD, dtype=np.int32)
    input_ids[:real] = rng.integers(5, vocab, size=real)
    input_ids[0], input_ids[real - 1] = CLS, SEP
    input_ids[7] = UNK  # an [UNK] in the text is never a target either
    word_ids = np.full(length, -1, dtype=np.int32)
    word_ids[1:real - 1] = np.cumsum(rng.random(real - 2) < 0.6)  # words of 1-4 tokens
    return input_ids, word_ids


def test_specials_never_masked_and_targets_are_the_original_ids():
    rng = np.random.default_rng(0)
    for seed in range(200):
        input_ids, word_ids = _random_sequence(rng)
        result = mask_tokens(input_ids, word_ids, 200, MASK, np.random.default_rng(seed), special_ids=SPECIALS,
                             mask_ratio=0.4, max_predictions=24, whole_word=bool(seed % 2))
        real = result.masked_weights > 0
        positions = result.masked_positions[real]
        assert np.all(np.diff(positions) > 0)  # sorted, unique
        assert not np.isin(input_ids[positions], SPECIALS).any()
        assert np.all(word_ids[positions] >= 0)
        np.testing.assert_array_equal(result.masked_ids[real], input_ids[positions])
        untouched = np.ones(len(input_ids), bool)
        untouched[positions] = False
        np.testing.assert_array_equal(result.input_ids[untouched], input_ids[untouched])
        # Padding predictions: weight 0, position 0, id 0; the output is always max_predictions long.
        assert result.masked_positions.shape == (24,)
        assert np.all(result.masked_positions[~real] == 0) and np.all(result.masked_ids[~real] == 0)
        assert real.sum() > 0 and np.all(real[:real.sum()])


def test_special_mask_excludes_positions():
    input_ids, word_ids = _random_sequence(np.random.default_rng(1))
    special_mask = np.zeros(len(input_ids), bool)
    special_mask[1:20] = True
    for seed in range(50):
        result = mask_tokens(input_ids, word_ids, 200, MASK, np.random.default_rng(seed), special_ids=SPECIALS,
                             special_mask=special_mask, mask_ratio=0.4, whole_word=False)
        assert not special_mask[result.masked_positions[result.masked_weights > 0]].any()


def test_same_seed_same_masks_different_seed_different_masks():
    input_ids, word_ids = _random_sequence(np.random.default_rng(2))
    kwargs = dict(vocab_size=200, mask_id=MASK, special_ids=SPECIALS, pmlm=True, pmlm_max_ratio=0.5)
    first = mask_tokens(input_ids, word_ids, rng=np.random.default_rng([7, 3]), **kwargs)
    again = mask_tokens(input_ids, word_ids, rng=np.random.default_rng([7, 3]), **kwargs)
    other = mask_tokens(input_ids, word_ids, rng=np.random.default_rng([7, 4]), **kwargs)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_mask_batch_rows_depend_only_on_their_own_seed():
    rng = np.random.default_rng(3)
    rows = [_random_sequence(rng) for _ in range(5)]
    input_ids = np.stack([r[0] for r in rows])
    word_ids = np.stack([r[1] for r in rows])
    seeds = [(1, 0, row) for row in range(5)]
    kwargs = dict(vocab_size=200, mask_id=MASK, special_ids=SPECIALS)
    batch = mask_batch(input_ids, word_ids, seeds, **kwargs)
    single = mask_batch(input_ids[3:4], word_ids[3:4], seeds[3:4], **kwargs)
    for a, b in zip(batch, single):
        np.testing.assert_array_equal(a[3], b[0])
    assert batch.masked_positions.shape == (5, 20) and batch.input_ids.shape == input_ids.shape


# ------------------------------------------------------------------------------------------------------------------
# Replacement proportions and counts
# ------------------------------------------------------------------------------------------------------------------


def test_80_10_10_replacement_proportions():
    vocab = 1000
    outcomes = np.zeros(3)  # [MASK], random, unchanged
    random_tokens = []
    rng = np.random.default_rng(4)
    for seed in range(1500):
        input_ids, word_ids = _random_sequence(rng, vocab=vocab)
        result = mask_tokens(input_ids, word_ids, vocab, MASK, np.random.default_rng([4, seed]),
                             special_ids=SPECIALS, mask_ratio=0.3, max_predictions=12, whole_word=False)
        real = result.masked_weights > 0
        new = result.input_ids[result.masked_positions[real]]
        old = result.masked_ids[real]
        is_mask = new == MASK
        unchanged = new == old
        outcomes += [is_mask.sum(), (~is_mask & ~unchanged).sum(), unchanged.sum()]
        random_tokens.extend(new[~is_mask & ~unchanged].tolist())
    total = outcomes.sum()
    assert total > 15000
    # A random draw equals the original with probability 1 / (vocab - 5): it then counts as unchanged.
    collide = 0.1 / (vocab - len(SPECIALS))
    for observed, expected in zip(outcomes / total, (0.8, 0.1 - collide, 0.1 + collide)):
        standard_error = np.sqrt(expected * (1 - expected) / total)
        assert abs(observed - expected) < 4 * standard_error, (outcomes / total)
    assert not np.isin(random_tokens, SPECIALS).any()


def test_random_replacements_are_uniform_over_non_special_ids():
    vocab = 50  # 45 non-special ids: enough draws per id for a chi-square test
    input_ids = np.array([CLS] + [10] * 30 + [SEP], dtype=np.int32)
    word_ids = np.array([-1] + list(range(30)) + [-1], dtype=np.int32)
    draws = []
    for seed in range(1500):
        result = mask_tokens(input_ids, word_ids, vocab, MASK, np.random.default_rng([5, seed]),
                             special_ids=SPECIALS, max_predictions=30, mask_ratio=0.9, mask_token_prob=0.0,
                             random_token_prob=1.0)
        draws.extend(result.input_ids[result.masked_positions[result.masked_weights > 0]].tolist())
    counts = np.bincount(draws, minlength=vocab)
    assert counts[list(SPECIALS)].sum() == 0
    expected = len(draws) / (vocab - len(SPECIALS))
    chi2 = ((counts[5:] - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_999[44], chi2


def test_standard_budget_is_rounded_ratio_capped_by_max_predictions():
    input_ids, word_ids = np.arange(5, 65, dtype=np.int32), np.arange(60, dtype=np.int32)  # 60 one-token words
    for ratio, cap, expected in ((0.15, 20, 9), (0.5, 20, 20), (0.01, 20, 1)):
        result = mask_tokens(input_ids, word_ids, 100, MASK, np.random.default_rng(0), special_ids=SPECIALS,
                             mask_ratio=ratio, max_predictions=cap)
        assert result.masked_weights.sum() == expected
    empty = mask_tokens(np.array([CLS, SEP, PAD]), np.array([-1, -1, -1]), 100, MASK, np.random.default_rng(0),
                        special_ids=SPECIALS)
    assert empty.masked_weights.sum() == 0 and empty.masked_positions.shape == (20,)


@pytest.mark.parametrize("ratio,cap,upper", [(0.2, 20, 12), (1.0, 20, 20)])
def test_pmlm_count_is_uniform_over_one_to_k(ratio, cap, upper):
    """n = 60 maskable tokens: k = min(cap, round(60 * ratio)); counts must be uniform over 1..k."""
    input_ids, word_ids = np.arange(5, 65, dtype=np.int32), np.arange(60, dtype=np.int32)
    samples = 4000
    counts = np.zeros(upper + 2, dtype=np.int64)
    for seed in range(samples):
        result = mask_tokens(input_ids, word_ids, 100, MASK, np.random.default_rng([6, seed]), special_ids=SPECIALS,
                             pmlm=True, pmlm_max_ratio=ratio, max_predictions=cap)
        counts[int(result.masked_weights.sum())] += 1
    assert counts[0] == 0 and counts[upper + 1] == 0 and counts[1:upper + 1].min() > 0
    expected = samples / upper
    chi2 = ((counts[1:upper + 1] - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_999[upper - 1], (chi2, counts)


def test_pmlm_budget_draw_and_whole_word_count_never_exceeds_it():
    draws = [masking_budget(60, np.random.default_rng(s), pmlm=True, pmlm_max_ratio=0.2) for s in range(2000)]
    assert min(draws) == 1 and max(draws) == 12
    input_ids, word_ids = _random_sequence(np.random.default_rng(8), length=64, real=64)
    # The word holding the [UNK] at position 7 is not a candidate (it would be masked only in part).
    candidates = int((word_ids >= 0).sum() - (word_ids == word_ids[7]).sum())
    for seed in range(300):
        budget = masking_budget(candidates,
                                np.random.default_rng([9, seed]), max_predictions=20, pmlm=True, pmlm_max_ratio=0.5)
        result = mask_tokens(input_ids, word_ids, 200, MASK, np.random.default_rng([9, seed]), special_ids=SPECIALS,
                             pmlm=True, pmlm_max_ratio=0.5, max_predictions=20)
        assert 0 < result.masked_weights.sum() <= budget
        _assert_whole_words(word_ids, result)
        assert not _masked_set(result) & set(np.flatnonzero(word_ids == word_ids[7]).tolist())


# ------------------------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------------------------


def test_packing_keeps_every_token_never_splits_words_and_respects_documents(chinese_tokenizer):
    words_rng = np.random.default_rng(10)
    lines = []
    for index in range(60):
        if index == 30:
            lines.append("")  # a document boundary
        count = int(words_rng.integers(1, 12))
        lines.append(" ".join("".join(words_rng.choice(CHINESE, int(words_rng.integers(1, 4)))) for _ in range(count)))
    columns = build_pretraining_examples(lines, chinese_tokenizer, max_length=16, segmented=True)
    expected_tokens = [chinese_tokenizer.convert_tokens_to_ids(list("".join(line.split()))) for line in lines]
    flat = [token for line in expected_tokens for token in line]
    ids, mask, words = columns["input_ids"], columns["attention_mask"], columns["word_ids"]
    assert ids.shape[1] == 16 and np.all(ids[:, 0] == CLS)
    lengths = mask.sum(1)
    assert np.all(ids[np.arange(len(ids)), lengths - 1] == SEP) and lengths.min() >= 3
    packed = [token for row, length in zip(ids, lengths) for token in row[1:length - 1]]
    assert packed == flat  # nothing lost or reordered
    # Rows break only at word starts: re-joining each row's words reproduces the corpus's words in order.
    corpus_words = [word for line in lines for word in line.split()]
    row_words = []
    for row, word_row, length in zip(ids, words, lengths):
        tokens = chinese_tokenizer.convert_ids_to_tokens(row[1:length - 1])
        for word in range(word_row[1:length - 1].max() + 1):
            row_words.append("".join(t for t, w in zip(tokens, word_row[1:length - 1]) if w == word))
    assert row_words == corpus_words
    # The document boundary starts a new row.
    first_document = sum(len(t) for t in expected_tokens[:30])
    assert first_document in np.cumsum(lengths - 2).tolist()


def test_packing_short_sequences_and_raw_text(english_tokenizer):
    lines = ["the cat playing a big households ."] * 40
    plain = build_pretraining_examples(lines, english_tokenizer, 24, segmented=False)
    short = build_pretraining_examples(lines, english_tokenizer, 24, segmented=False, short_seq_prob=0.5,
                                       rng=np.random.default_rng(0))
    assert len(short["input_ids"]) > len(plain["input_ids"])
    text_tokens = [c["attention_mask"].sum() - 2 * len(c["input_ids"]) for c in (plain, short)]
    assert text_tokens[0] == text_tokens[1] == 400  # 40 lines x 10 pieces, nothing dropped
    # Raw text: words are the tokenizer's pre-tokens, so "##" pieces share a word id.
    tokens = english_tokenizer.convert_ids_to_tokens(plain["input_ids"][0])
    np.testing.assert_array_equal(
        wordpiece_word_ids(tokens) >= 0, plain["word_ids"][0] >= 0)
    row = plain["word_ids"][0]
    for index, token in enumerate(tokens):
        if token.startswith("##"):
            assert row[index] == row[index - 1]
