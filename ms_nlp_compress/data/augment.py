"""TinyBERT data augmentation: replace words by candidates from a masked LM or from word-vector neighbours.

Per sentence (algorithms.md Part B 2.6):
1. split into words as BERT's basic tokenizer does (the tokenizer's own normaliser and pre-tokenizer);
2. words that are purely alphabetic (a-z after lowercasing) and not English stop words, or purely CJK, get
   candidates:
   - MLM route, for a word that is ONE word piece when a masked-LM model is given: the top-K pieces at its [MASK]
     in "[CLS] masked sentence [SEP] original sentence [SEP]", "##" continuation pieces and special tokens dropped;
   - word-vector route otherwise: the K nearest words by cosine among a word-vector table, the word itself
     excluded; title-cased when the word is;
   a word without candidates keeps itself;
3. N rounds: every word with candidates is replaced, with probability p, by a uniformly drawn candidate; a result
   is kept if new. Output: the original sentence first, then the new variants (<= N).

Differences from the reference, on purpose:
- batched: ONE MLM forward per batch of masked sentences (the reference runs one forward per word) and one matrix
  product per batch of neighbour queries;
- deterministic: sentence i draws from numpy's generator seeded with (seed, i), so results do not depend on batch
  size, order of processing or any global random state;
- the word itself is dropped from the MLM candidates too (the original sentence is in the input, so the MLM often
  predicts the word back; replacing a word by itself only wastes a sample);
- a variant equal to the re-joined original words counts as a duplicate (the reference compared with the raw line,
  so an unchanged sample with different spacing around punctuation was written again);
- pair tasks: each text column is augmented with the other columns ORIGINAL (the reference mutated the row, so
  rows for the second column carried the last variant of the first);
- the word-vector table can be the model's own word-embedding matrix when no GloVe file is at hand: the vector of
  a word is the mean of its word-piece rows, and candidates are the vocabulary's whole alphabetic words.
"""
from __future__ import annotations

import csv
import re
import unicodedata
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ms_nlp_compress.compress.distill.config import AugmentConfig
from ms_nlp_compress.errors import DataError

# The English stop-word list of the reference (NLTK's), as words after lowercasing.
ENGLISH_STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his himself
she she's her hers herself it it's its itself they them their theirs themselves this that that'll these those am is
are was were be been being have has had having do does did doing a an the and but if or because as until while of at
by for with about against between into through during before after above below to from up down in out on off over
under again further then once here there all any both each few more most other some such no nor not only own same so
than too very s t can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn
didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't
shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't 's 're
""".split())

_LATIN_WORD = re.compile(r"[a-z]+")
TEXT_COLUMNS = ("sentence", "sentence1", "sentence2", "text_a", "text_b", "question", "question1", "question2",
                "#1 String", "#2 String")


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


def is_replaceable(word: str) -> bool:
    """The reference's filter (only a-z after lowercasing, not a stop word), plus purely CJK words for Chinese."""
    if _LATIN_WORD.fullmatch(word.lower()):
        return word.lower() not in ENGLISH_STOP_WORDS
    return bool(word) and all(_is_cjk(char) for char in word)


def split_words(tokenizer, text: str) -> List[str]:
    """Words as BERT's basic tokenizer gives them: the WordPiece tokenizer's normaliser (lowercasing for uncased
    models) and pre-tokenizer (whitespace, punctuation, one word per CJK character)."""
    backend = getattr(tokenizer, "_backend", None)
    if backend is not None and backend.pre_tokenizer is not None:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
    words: List[str] = []  # other tokenizers (SentencePiece): whitespace, CJK characters on their own
    for chunk in unicodedata.normalize("NFKC", text).split():
        current = ""
        for char in chunk:
            if _is_cjk(char):
                if current:
                    words.append(current)
                    current = ""
                words.append(char)
            else:
                current += char
        if current:
            words.append(current)
    return words


# ----------------------------------------------------------------------------------------------------------------
# Word-vector neighbours
# ----------------------------------------------------------------------------------------------------------------

def _normalize_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)  # zero rows stay zero (cosine 0 with all)


def top_k_cosine(queries: np.ndarray, table: np.ndarray, k: int, exclude: Sequence[int]) -> np.ndarray:
    """Indices (Q, k) of the k rows of `table` (L2-normalised, (V, D)) with the highest cosine to each L2-normalised
    query (Q, D), best first, ties broken by lower index; `exclude[q]` (>= 0) is never returned for query q."""
    scores = queries @ table.T  # (Q, V)
    rows = np.arange(len(queries))
    excluded = np.asarray(exclude, dtype=np.int64)
    has_exclusion = excluded >= 0
    scores[rows[has_exclusion], excluded[has_exclusion]] = -np.inf
    k = min(k, table.shape[0] - int(has_exclusion.any()))
    # argpartition finds the k best in O(V); only those k are sorted (by score, then index for ties).
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < table.shape[0] else \
        np.tile(np.arange(table.shape[0]), (len(queries), 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    return np.take_along_axis(part, order, axis=1)


class WordVectors:
    """A table of word vectors for the neighbour route: from a GloVe-format text file, or from a model's own
    word-embedding matrix (then the vector of any word is the mean of its word-piece rows)."""

    def __init__(self, words: Sequence[str], vectors: np.ndarray, source: str, tokenizer=None,
                 piece_table: Optional[np.ndarray] = None):
        if len(words) != len(vectors):
            raise DataError(f"{source}: {len(words)} words but {len(vectors)} vectors")
        if not len(words):
            raise DataError(f"{source}: no word vectors")
        self.words = list(words)
        self.index = {word: position for position, word in enumerate(self.words)}
        self.table = _normalize_rows(np.asarray(vectors, dtype=np.float64))
        self.source = source
        self.tokenizer = tokenizer
        self.piece_table = piece_table
        self._cache: Dict[int, Dict[str, List[str]]] = {}

    @classmethod
    def from_glove(cls, path, max_words: int = 100000) -> "WordVectors":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"word-vector file not found: {path}")
        words, vectors, width = [], [], None
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if len(words) >= max_words:
                    break
                fields = line.rstrip("\n").rstrip().split(" ")
                if len(fields) < 2:
                    raise DataError(f"{path}:{number}: expected 'word v1 v2 ...', got {line[:60]!r}")
                try:
                    vector = [float(value) for value in fields[1:]]
                except ValueError:
                    raise DataError(f"{path}:{number}: non-numeric vector entry for {fields[0]!r}") from None
                if width is None:
                    width = len(vector)
                elif len(vector) != width:
                    raise DataError(f"{path}:{number}: {len(vector)} values for {fields[0]!r}, expected {width}")
                words.append(fields[0])
                vectors.append(vector)
        return cls(words, np.asarray(vectors, dtype=np.float64), str(path))

    @classmethod
    def from_embedding_table(cls, table: np.ndarray, tokenizer, source: str = "word-embedding table") -> "WordVectors":
        """Candidates: vocabulary entries that are whole replaceable words (no "##" pieces, no [specials])."""
        vocabulary = tokenizer.convert_ids_to_tokens(np.arange(table.shape[0]))
        keep = [index for index, token in enumerate(vocabulary) if is_replaceable(token)]
        return cls([vocabulary[index] for index in keep], np.asarray(table)[keep], source, tokenizer,
                   np.asarray(table, dtype=np.float64))

    def query(self, word: str) -> Tuple[Optional[np.ndarray], int]:
        """(normalised vector or None, index of the word itself in the table or -1)."""
        position = self.index.get(word, -1)
        if position >= 0:
            return self.table[position], position
        if self.piece_table is None:
            return None, -1  # GloVe: unknown words have no neighbours, as in the reference
        pieces = self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(word))
        if not pieces:
            return None, -1
        vector = self.piece_table[pieces].mean(axis=0)
        return _normalize_rows(vector[None, :])[0], -1

    def neighbours(self, words: Sequence[str], k: int, batch_size: int = 256) -> List[List[str]]:
        """The k nearest words of each word (itself excluded), best first; [] for words without a vector.

        Results are cached per (word, k): a corpus repeats its words, and the search is the costly part."""
        cache = self._cache.setdefault(k, {})
        todo = sorted({word for word in words if word not in cache})
        found = [(word, *self.query(word.lower() if word.lower() in self.index else word)) for word in todo]
        for word, vector, _ in found:
            if vector is None:
                cache[word] = []
        usable = [(word, vector, self_index) for word, vector, self_index in found if vector is not None]
        for start in range(0, len(usable), batch_size):
            chunk = usable[start:start + batch_size]
            queries = np.stack([vector for _, vector, _ in chunk])
            indices = top_k_cosine(queries, self.table, k, [self_index for _, _, self_index in chunk])
            for (word, _, _), row in zip(chunk, indices):
                cache[word] = [self.words[index] for index in row]
        return [list(cache[word]) for word in words]


# ----------------------------------------------------------------------------------------------------------------
# Masked-LM candidates
# ----------------------------------------------------------------------------------------------------------------

def _masked_top_k_cell(mlm, k: int):
    from mindspore import nn, ops

    class MaskedTopK(nn.Cell):
        """(B, L) inputs and one masked position per row -> the k best vocabulary ids there (B, k)."""

        def __init__(self):
            super().__init__(auto_prefix=False)
            self.mlm = mlm
            self.k = k

        def construct(self, input_ids, attention_mask, token_type_ids, masked_positions):
            logits = self.mlm(input_ids, attention_mask, token_type_ids, masked_positions)[0]  # (B, 1, V)
            return ops.topk(logits[:, 0], self.k)[1]  # (B, k)

    return MaskedTopK()


def _bucket(length: int, limit: int) -> int:
    """Pad to a multiple of 32 (at most `limit`): a handful of shapes, so graph mode compiles a handful of graphs."""
    return min(limit, -(-length // 32) * 32)


class Augmenter:
    """Args:
        tokenizer: the teacher's WordPiece tokenizer (its vocabulary decides single-piece words and MLM ids).
        config: K, p, N, seed, batch size, lengths.
        mlm: a masked-LM Cell (`NezhaForMaskedLM`) or None: without it every word takes the vector route.
        vectors: `WordVectors` or None: without them multi-piece words keep themselves.
    """

    def __init__(self, tokenizer, config: AugmentConfig, mlm=None, vectors: Optional[WordVectors] = None):
        config.validate()
        if mlm is None and vectors is None:
            raise DataError("augmentation needs a masked-LM model, word vectors, or both")
        self.tokenizer = tokenizer
        self.config = config
        self.vectors = vectors
        self.top_k = None
        if mlm is not None:
            mlm.set_train(False)
            self.top_k = _masked_top_k_cell(mlm, config.candidates)
        special = set(tokenizer.special_ids().values())
        self.special_ids = special

    # ------------------------------------------------------------------------------------------------------------
    def _mlm_candidates(self, requests: List[Tuple[List[str], int]]) -> List[List[str]]:
        """For each (words, word index) with a single-piece word: the MLM's top-K whole-word candidates."""
        from mindspore import Tensor

        rows = []
        for words, target in requests:
            encoding = self.tokenizer.encode(words, words, max_length=self.config.max_length, pad=False)
            in_a = (encoding.token_type_ids == 0) & (encoding.word_ids == target)
            positions = np.flatnonzero(in_a)
            rows.append((encoding, int(positions[0]) if len(positions) == 1 else -1))
        results: List[List[str]] = [[] for _ in requests]
        usable = [(index, encoding, position) for index, (encoding, position) in enumerate(rows) if position >= 0]
        size = self.config.batch_size
        for start in range(0, len(usable), size):
            chunk = usable[start:start + size]
            width = _bucket(max(len(encoding) for _, encoding, _ in chunk), self.config.max_length)
            batch = {name: np.zeros((len(chunk), width), np.int32)
                     for name in ("input_ids", "attention_mask", "token_type_ids")}
            batch["input_ids"][:] = self.tokenizer.pad_id
            masked_positions = np.zeros((len(chunk), 1), np.int32)
            for row, (_, encoding, position) in enumerate(chunk):
                length = len(encoding)
                batch["input_ids"][row, :length] = encoding.input_ids
                batch["input_ids"][row, position] = self.tokenizer.mask_id
                batch["attention_mask"][row, :length] = 1
                batch["token_type_ids"][row, :length] = encoding.token_type_ids
                masked_positions[row, 0] = position
            ids = self.top_k(Tensor(batch["input_ids"]), Tensor(batch["attention_mask"]),
                             Tensor(batch["token_type_ids"]), Tensor(masked_positions)).asnumpy()
            for (index, _, _), candidate_ids in zip(chunk, ids):
                words, target = requests[index]
                tokens = self.tokenizer.convert_ids_to_tokens(
                    [token for token in candidate_ids if int(token) not in self.special_ids])
                results[index] = [token for token in tokens
                                  if not token.startswith("##") and not token.startswith("[")
                                  and token != words[target]]
        return results

    def candidates(self, sentences_words: Sequence[List[str]]) -> List[Dict[int, List[str]]]:
        """For each sentence: {word index: candidates} for every replaceable word (a word with no candidate maps to
        [itself], as in the reference)."""
        mlm_requests, vector_requests = [], []
        table: List[Dict[int, List[str]]] = [dict() for _ in sentences_words]
        for sentence, words in enumerate(sentences_words):
            for index, word in enumerate(words):
                if not is_replaceable(word):
                    continue
                single_piece = len(self.tokenizer.tokenize(word)) == 1
                if self.top_k is not None and single_piece:
                    mlm_requests.append((sentence, index))
                elif self.vectors is not None:
                    vector_requests.append((sentence, index))
                else:
                    table[sentence][index] = []
        if mlm_requests:
            found = self._mlm_candidates([(list(sentences_words[s]), i) for s, i in mlm_requests])
            for (sentence, index), words in zip(mlm_requests, found):
                table[sentence][index] = words
        if vector_requests:
            unique = sorted({sentences_words[s][i] for s, i in vector_requests})
            found = dict(zip(unique, self.vectors.neighbours(unique, self.config.candidates,
                                                              self.config.batch_size)))
            for sentence, index in vector_requests:
                word = sentences_words[sentence][index]
                words = found[word]
                table[sentence][index] = [w.title() for w in words] if word.istitle() else list(words)
        for sentence, entries in enumerate(table):
            for index in entries:
                if not entries[index]:
                    entries[index] = [sentences_words[sentence][index]]
        return table

    def sample(self, words: List[str], candidates: Dict[int, List[str]], sentence_index: int) -> List[str]:
        """The N rounds for one sentence; returns the new variants (joined with spaces), first-seen order."""
        rng = np.random.default_rng((self.config.seed, sentence_index))
        seen = {" ".join(words)}
        variants = []
        positions = sorted(candidates)
        for _ in range(self.config.samples):
            new_words = list(words)
            for position in positions:
                options = candidates[position]
                choice = options[int(rng.integers(len(options)))]
                if rng.random() < self.config.replace_prob:
                    new_words[position] = choice
            joined = " ".join(new_words)
            if joined not in seen:
                seen.add(joined)
                variants.append(joined)
        return variants

    def augment(self, sentences: Sequence[str], start_index: int = 0,
                sentence_ids: Optional[Sequence[int]] = None) -> List[List[str]]:
        """For each sentence: [the original text, new variants...]. Sentence i draws from the seed stream
        `sentence_ids[i]` (default start_index + i), so augmenting a file in chunks of any size gives the same
        result as one call."""
        ids = list(sentence_ids) if sentence_ids is not None else list(range(start_index, start_index + len(sentences)))
        if len(ids) != len(sentences):
            raise ValueError(f"{len(sentences)} sentences but {len(ids)} sentence ids")
        words = [split_words(self.tokenizer, sentence) for sentence in sentences]
        table = self.candidates(words)
        return [[sentence] + self.sample(sentence_words, entries, sentence_id)
                for sentence, sentence_words, entries, sentence_id in zip(sentences, words, table, ids)]


# ----------------------------------------------------------------------------------------------------------------
# TSV files
# ----------------------------------------------------------------------------------------------------------------

class _TsvWriter:
    """Rows joined by tabs with no quoting or escaping, the inverse of the readers (`csv.QUOTE_NONE`, no escape
    character, like the reference). csv.writer with an escape character would write a quote as a backslash and a
    quote, which the GLUE readers then read back literally: the original rows would no longer match the task's."""

    def __init__(self, handle, path: Path):
        self.handle = handle
        self.path = path
        self.rows = 0

    def writerow(self, row: Sequence[str]) -> None:
        for cell in row:
            if "\t" in cell or "\n" in cell or "\r" in cell:
                raise DataError(f"{self.path}: output row {self.rows + 1} has a tab or line break inside a cell "
                                f"({cell[:60]!r}); the TSV has no quoting to carry it")
        self.handle.write("\t".join(row) + "\n")
        self.rows += 1


def _read_rows(path: Path) -> Tuple[List[str], List[List[str]]]:
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path}: empty file (a header row is required)")
    header = rows[0]
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}:{number}: {len(row)} columns, the header has {len(header)}")
    return header, rows[1:]


def _write_chunk(writer, chunk: List[List[str]], start: int, positions: Sequence[int], augmenter: Augmenter) -> int:
    """Rows of one chunk: the original row, then for each text column its variants with the other columns
    original. The seed stream of a cell is (row number, column), whatever the chunk size."""
    written = 0
    per_column = []
    for column_number, position in enumerate(positions):
        cells = [(offset, row[position]) for offset, row in enumerate(chunk) if row[position].strip()]
        ids = [(start + offset) * len(positions) + column_number for offset, _ in cells]
        variants = augmenter.augment([text for _, text in cells], sentence_ids=ids)
        per_column.append({offset: found[1:] for (offset, _), found in zip(cells, variants)})
    for offset, row in enumerate(chunk):
        writer.writerow(row)
        written += 1
        for position, variants in zip(positions, per_column):
            for variant in variants.get(offset, ()):
                out = list(row)
                out[position] = variant
                writer.writerow(out)
                written += 1
    return written


def augment_tsv(input_path, output_path, augmenter: Augmenter, columns: Optional[Sequence[str]] = None,
                chunk_rows: int = 256, progress=None) -> Dict[str, int]:
    """Augment the text columns of a headed TSV (default: the GLUE / CLUE text column names present). Each text
    column is augmented on its own with the other columns original; other columns (labels) are copied. Writes
    `output_path` atomically. Returns counts."""
    input_path, output_path = Path(input_path), Path(output_path)
    header, rows = _read_rows(input_path)
    names = list(columns) if columns else [name for name in TEXT_COLUMNS if name in header]
    missing = [name for name in names if name not in header]
    if missing or not names:
        raise DataError(f"{input_path}: text column(s) {missing or list(TEXT_COLUMNS)} not in header {header}")
    positions = [header.index(name) for name in names]
    tmp = output_path.with_name(output_path.name + ".tmp")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = _TsvWriter(handle, output_path)
        writer.writerow(header)
        for start in range(0, len(rows), chunk_rows):
            chunk = rows[start:start + chunk_rows]
            written += _write_chunk(writer, chunk, start, positions, augmenter)
            if progress is not None:
                progress(min(start + chunk_rows, len(rows)), len(rows))
    tmp.replace(output_path)
    return {"rows": len(rows), "written": written}


def iter_lines(path) -> Iterable[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield line.rstrip("\n")
