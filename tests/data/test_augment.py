"""TinyBERT data augmentation: neighbour search vs a numpy cosine top-K, batched MLM candidates vs one unpadded
forward per word, determinism for a seed, whole-word replacement only, originals kept and duplicates removed."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from ms_nlp_compress.compress.distill.config import AugmentConfig
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.data.augment import (Augmenter, WordVectors, augment_tsv, is_replaceable, split_words,
                                          top_k_cosine)
from ms_nlp_compress.data.tokenization import WordPieceTokenizer
from ms_nlp_compress.errors import ConfigError, DataError
from ms_nlp_compress.models.nezha import NezhaForMaskedLM

WORDS = ["the", "a", "is", "was", "very", "movie", "film", "good", "great", "bad", "terrible", "plot", "story", "actor",
         "fun", "boring", "dull", "nice", "fine", "awful", "un", "##believ", "##able", "##s", ".", ",", "!", "'"]
SENTENCES = ["The movie was very good.", "A terrible plot, but the actors were fun!", "unbelievable film",
             "the story is dull", "Nice actor", "a fine, awful, boring movie"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n", encoding="utf-8")
    return WordPieceTokenizer.from_vocab(path, lowercase=True, max_length=64)


def embedding_table(tokenizer, seed=0, width=12):
    return np.random.default_rng(seed).standard_normal((tokenizer.vocab_size, width)).astype(np.float32)


def twin_top_k(queries, table, k, exclude):
    """Per query: cosine in float64 against every row, the excluded row removed, stable sort, first k."""
    result = []
    for query, skip in zip(queries, exclude):
        q = query.astype(np.float64) / np.linalg.norm(query)
        rows = table.astype(np.float64) / np.linalg.norm(table, axis=1, keepdims=True)
        cosine = rows @ q
        order = [index for index in np.argsort(-cosine, kind="stable") if index != skip]
        result.append(order[:k])
    return np.asarray(result)


@pytest.mark.parametrize("k", [1, 5, 39])
def test_top_k_cosine_equals_numpy_twin(k):
    rng = np.random.default_rng(k)
    table, queries = rng.standard_normal((40, 7)), rng.standard_normal((9, 7))
    exclude = [-1, 3, 0, 39, -1, 5, 6, 7, 8]
    normalized = table / np.linalg.norm(table, axis=1, keepdims=True)
    actual = top_k_cosine((queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32),
                          normalized.astype(np.float32), k, exclude)
    np.testing.assert_array_equal(actual, twin_top_k(queries, table, k, exclude))
    for row, skip in zip(actual, exclude):
        assert skip not in row


def test_glove_file_neighbours_exclude_the_word_and_keep_case(tmp_path, tokenizer):
    rng = np.random.default_rng(3)
    words = ["good", "great", "fine", "bad", "awful", "movie", "film", "plot"]
    vectors = rng.standard_normal((len(words), 5))
    glove = tmp_path / "glove.txt"
    glove.write_text("".join(f"{w} {' '.join(f'{v:.6f}' for v in vec)}\n" for w, vec in zip(words, vectors)))
    table = WordVectors.from_glove(glove, max_words=6)  # only the first 6 lines, like the reference's 100,000
    assert table.words == words[:6]
    rounded = np.asarray([[float(f"{v:.6f}") for v in vec] for vec in vectors[:6]])
    expected = twin_top_k(rounded[[0, 4]], rounded, 3, [0, 4])
    assert table.neighbours(["good", "awful", "plot"], 3) == [[words[i] for i in expected[0]],
                                                              [words[i] for i in expected[1]], []]
    bad = tmp_path / "bad.txt"
    bad.write_text("good 1 2\nbad 1\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: 1 values for 'bad', expected 2"):
        WordVectors.from_glove(bad)


def test_embedding_table_vectors_average_pieces_and_offer_whole_words(tokenizer):
    table = embedding_table(tokenizer)
    vectors = WordVectors.from_embedding_table(table, tokenizer)
    assert all(is_replaceable(word) for word in vectors.words)
    assert "##believ" not in vectors.words and "the" not in vectors.words and "[MASK]" not in vectors.words
    # "unbelievable" is three pieces: its query is the mean of their rows.
    ids = tokenizer.convert_tokens_to_ids(["un", "##believ", "##able"])
    candidates = np.asarray([table[tokenizer.convert_tokens_to_ids([w])[0]] for w in vectors.words])
    expected = twin_top_k(table[ids].mean(0, keepdims=True), candidates, 4, [-1])[0]
    assert vectors.neighbours(["unbelievable"], 4) == [[vectors.words[i] for i in expected]]


def test_word_filter_and_split(tokenizer):
    assert split_words(tokenizer, "The movie wasn't GOOD.") == ["the", "movie", "wasn", "'", "t", "good", "."]
    assert [is_replaceable(w) for w in ["movie", "the", "wasn", "t", ".", "film2", "电影", "é"]] == \
        [True, False, False, False, False, False, True, False]


# ---------------------------------------------------------------------------------------------------------------
# the MLM route
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlm(tokenizer):
    ms.set_seed(5)
    config = NezhaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=24, max_relative_position=8)
    model = NezhaForMaskedLM(config)
    model.lm_head.bias.set_data(Tensor(np.random.default_rng(1).standard_normal(tokenizer.vocab_size)
                                       .astype(np.float32)))  # spread the logits so top-K is not tie-bound
    model.set_train(False)
    return model


def test_mlm_candidates_batched_equal_one_unpadded_forward_per_word(tokenizer, mlm):
    augmenter = Augmenter(tokenizer, AugmentConfig(candidates=6, batch_size=4), mlm=mlm)
    calls = []
    inner = augmenter.top_k.construct

    def counting(*inputs):
        calls.append(inputs[0].shape)
        return inner(*inputs)

    augmenter.top_k.construct = counting
    words = [split_words(tokenizer, s) for s in SENTENCES]
    table = augmenter.candidates(words)
    requests = [(s, i) for s, ws in enumerate(words) for i, w in enumerate(ws)
                if is_replaceable(w) and len(tokenizer.tokenize(w)) == 1]
    assert len(calls) == -(-len(requests) // 4)  # one forward per batch of masked sentences
    specials = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    for sentence, index in requests:
        encoding = tokenizer.encode(words[sentence], words[sentence], max_length=64, pad=False)
        position = int(np.flatnonzero((encoding.token_type_ids == 0) & (encoding.word_ids == index))[0])
        ids = encoding.input_ids.copy()
        ids[position] = tokenizer.mask_id
        logits = mlm(Tensor(ids[None]), Tensor(np.ones_like(ids)[None]), Tensor(encoding.token_type_ids[None]))[0]
        best = np.argsort(-logits.asnumpy()[0, position], kind="stable")[:6]
        expected = [t for t in tokenizer.convert_ids_to_tokens(best)
                    if t not in specials and not t.startswith("##") and t != words[sentence][index]]
        assert table[sentence][index] == (expected or [words[sentence][index]]), (sentence, index)


def test_augment_deterministic_whole_words_originals_first_no_duplicates(tokenizer, mlm):
    vectors = WordVectors.from_embedding_table(embedding_table(tokenizer), tokenizer)
    config = AugmentConfig(candidates=5, replace_prob=0.5, samples=12, seed=7, batch_size=3)
    augmenter = Augmenter(tokenizer, config, mlm=mlm, vectors=vectors)
    first = augmenter.augment(SENTENCES)
    assert first == augmenter.augment(SENTENCES)
    # Chunked calls with the matching start index, and another batch size, give the same result.
    rebatched = Augmenter(tokenizer, AugmentConfig(candidates=5, replace_prob=0.5, samples=12, seed=7, batch_size=64),
                          mlm=mlm, vectors=vectors)
    assert rebatched.augment(SENTENCES[:2]) + rebatched.augment(SENTENCES[2:], start_index=2) == first
    other_seed = Augmenter(tokenizer, AugmentConfig(candidates=5, replace_prob=0.5, samples=12, seed=8), mlm=mlm,
                           vectors=vectors)
    assert other_seed.augment(SENTENCES) != first

    words = [split_words(tokenizer, s) for s in SENTENCES]
    table = augmenter.candidates(words)
    assert any(len(variants) > 3 for variants in first)
    for sentence, variants, original_words, candidates in zip(SENTENCES, first, words, table):
        assert variants[0] == sentence
        assert len(set(variants[1:])) == len(variants) - 1 and " ".join(original_words) not in variants[1:]
        assert len(variants) <= config.samples + 1
        for variant in variants[1:]:
            new_words = variant.split(" ")
            assert len(new_words) == len(original_words)  # only whole words replaced, nothing split or merged
            for position, (old, new) in enumerate(zip(original_words, new_words)):
                if old != new:
                    assert is_replaceable(old) and new in candidates[position] and not new.startswith("##")
    # The multi-piece word took the vector route.
    assert table[2][0] == vectors.neighbours(["unbelievable"], 5)[0]


def test_replace_probability_extremes_and_config_errors(tokenizer):
    vectors = WordVectors.from_embedding_table(embedding_table(tokenizer), tokenizer)
    never = Augmenter(tokenizer, AugmentConfig(replace_prob=0.0, samples=5), vectors=vectors)
    assert never.augment(SENTENCES) == [[s] for s in SENTENCES]
    always = Augmenter(tokenizer, AugmentConfig(replace_prob=1.0, samples=5, candidates=1), vectors=vectors)
    result = always.augment(["good movie"])[0]  # one candidate each, always replaced: exactly one variant
    assert result[0] == "good movie" and len(result) == 2
    assert result[1].split() == [vectors.neighbours(["good"], 1)[0][0], vectors.neighbours(["movie"], 1)[0][0]]
    with pytest.raises(ConfigError, match=r"augment\.replace_prob: must be in \[0, 1\]"):
        Augmenter(tokenizer, AugmentConfig(replace_prob=1.5), vectors=vectors)
    with pytest.raises(DataError, match="needs a masked-LM model, word vectors, or both"):
        Augmenter(tokenizer, AugmentConfig())


def test_augment_tsv_pairs_keep_the_other_column_original(tmp_path, tokenizer):
    vectors = WordVectors.from_embedding_table(embedding_table(tokenizer), tokenizer)
    augmenter = Augmenter(tokenizer, AugmentConfig(samples=4, seed=1), vectors=vectors)
    source = tmp_path / "train.tsv"
    source.write_text("index\tsentence1\tsentence2\tscore\n0\tgood movie\tbad plot\t1.5\n1\tfun story\t\t-2\n")
    counts = augment_tsv(source, tmp_path / "train_aug.tsv", augmenter, chunk_rows=1)
    lines = [line.split("\t") for line in (tmp_path / "train_aug.tsv").read_text().splitlines()]
    assert lines[0] == ["index", "sentence1", "sentence2", "score"] and counts["written"] == len(lines) - 1
    assert lines[1] == ["0", "good movie", "bad plot", "1.5"]
    first_row = [line for line in lines[1:] if line[0] == "0"]
    assert all(line[3] == "1.5" for line in first_row)
    assert all(line[1] == "good movie" or line[2] == "bad plot" for line in first_row)  # one column varied at a time
    assert any(line[1] != "good movie" for line in first_row) and any(line[2] != "bad plot" for line in first_row)
    assert all(line[2] == "" for line in lines[1:] if line[0] == "1")  # the empty second text stays empty
    again = augment_tsv(source, tmp_path / "again.tsv", augmenter, chunk_rows=64)
    assert (tmp_path / "again.tsv").read_text() == (tmp_path / "train_aug.tsv").read_text() and again == counts


def test_augment_tsv_round_trips_quotes_and_backslashes_through_the_task_reader(tmp_path, tokenizer):
    """The GLUE readers split on tabs with no quoting or escaping: the augmented file must be read back with every
    original row exactly as in the input (a writer escaping quotes as \\" broke this) and every label kept."""
    from ms_nlp_compress.data.glue import get_task

    vectors = WordVectors.from_embedding_table(embedding_table(tokenizer), tokenizer)
    augmenter = Augmenter(tokenizer, AugmentConfig(samples=3, seed=2), vectors=vectors)
    rows = [('my "home" movie was good', 1), ("a \\ slash and 'quotes' in the plot", 0), ('"unbalanced fun', 1)]
    source = tmp_path / "train.tsv"
    source.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    augment_tsv(source, tmp_path / "train_aug.tsv", augmenter)
    original = [(e.text_a, e.label) for e in get_task("sst2").reader(source)]
    augmented = [(e.text_a, e.label) for e in get_task("sst2").reader(tmp_path / "train_aug.tsv")]
    assert original == rows
    assert [pair for pair in augmented if pair in rows] == rows  # the originals, in order, byte for byte
    assert len(augmented) > len(rows)  # and variants, each with its source row's label
    assert not any('\\"' in text for text, _ in augmented)  # no escaped quote anywhere
    assert sum('"' in text for text, _ in augmented) >= 2  # the quotes themselves survive into the variants


def test_augment_tsv_refuses_a_cell_the_format_cannot_carry(tmp_path, tokenizer):
    from ms_nlp_compress.data.augment import _TsvWriter

    writer = _TsvWriter(open(tmp_path / "out.tsv", "w", encoding="utf-8"), tmp_path / "out.tsv")
    writer.writerow(["sentence", "label"])
    with pytest.raises(DataError, match=r"out.tsv: output row 2 has a tab or line break inside a cell"):
        writer.writerow(["two\tcells", "1"])
    writer.handle.close()
