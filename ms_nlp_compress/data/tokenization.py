"""Tokenizers that turn text into the four arrays every model and masking routine here consumes.

Two vocabularies are supported behind one `encode` API:

- `WordPieceTokenizer`: a BERT `vocab.txt` (English MiniLM/BERT, Chinese BERT/NEZHA), built on the `tokenizers`
  library (BertNormalizer + BertPreTokenizer + WordPiece), so the pieces match what the checkpoint was trained with.
- `SentencePieceTokenizer`: a SentencePiece model, e.g. one trained here on a Chinese corpus with `train`.

Only the splitting into pieces differs between the two. Adding special tokens, truncation and padding are done by one
helper (`assemble_encoding`), so both tokenizers truncate, pad and number words the same way.

Output (`Encoding`), all int32:
    input_ids       [CLS] A [SEP] (B [SEP]) then [PAD]
    token_type_ids  0 for [CLS], A and its [SEP]; 1 for B and its [SEP]; 0 for padding
    attention_mask  1 for real tokens, 0 for padding
    word_ids        index of the word each token came from, -1 for special tokens and padding. Whole-word masking
                    groups tokens by this id, so ids are unique within one encoding: the words of B are numbered
                    after the words of A instead of restarting at 0.

Batches go through the libraries' batch APIs (`tokenizers.Tokenizer.encode_batch`, SentencePiece's list encode)
and are assembled with numpy into a `RaggedEncoding` (unpadded rows stored flat), which the on-disk shards of
`streaming.py` store as is and `encode_batch` pads; `encode` (one text, pure Python) is the reference the batch
path is tested against, id for id.

Pairs are truncated longest-first exactly as BERT's `_truncate_seq_pair`, which the reference GLUE processors
(BERT, TinyBERT, DynaBERT, TernaryBERT) use: remove one token at a time from the end of the currently longer
segment, from B on ties. When both segments are longer than half the budget and the budget is odd, A keeps the
extra token; the Rust `tokenizers` LongestFirst strategy gives it to the longer segment instead, the only place
where our ids can differ from `Tokenizer.from_file(tokenizer.json)`. Inputs of any length (10k words and more)
are truncated, never rejected.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ms_nlp_compress.errors import DataError

# A text is either a raw string or a list of words that are already segmented (e.g. People's Daily words); with a
# list, word_ids follow the given words.
TextInput = Union[str, Sequence[str]]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class Encoding:
    """Model inputs for one text (1-D arrays) or a batch (2-D arrays, one row per text)."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    word_ids: np.ndarray

    def as_dict(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "token_type_ids": self.token_type_ids,
            "attention_mask": self.attention_mask,
            "word_ids": self.word_ids,
        }

    def __len__(self) -> int:
        return int(self.input_ids.shape[-1])


def longest_first_lengths(length_a: int, length_b: int, budget: int) -> Tuple[int, int]:
    """How many tokens of A and B survive longest-first truncation into `budget` tokens.

    Closed form of "pop from the longer segment, from B on ties, until the total fits": the shorter segment is
    kept whole if it fits in half the budget; otherwise both get half, and A gets the extra token of an odd budget.
    """
    if length_a + length_b <= budget:
        return length_a, length_b
    half_low, half_high = budget // 2, budget - budget // 2
    if length_a <= half_low:
        return length_a, budget - length_a
    if length_b <= half_low:
        return budget - length_b, length_b
    return half_high, half_low


def assemble_encoding(
    pieces_a: Sequence[int],
    words_a: Sequence[int],
    pieces_b: Optional[Sequence[int]],
    words_b: Optional[Sequence[int]],
    max_length: int,
    pad: bool,
    cls_id: int,
    sep_id: int,
    pad_id: int,
) -> Encoding:
    """Truncate (longest-first), add [CLS]/[SEP], set segment ids and pad to `max_length` when `pad`."""
    special_count = 2 if pieces_b is None else 3
    if max_length < special_count:
        raise ValueError(f"max_length={max_length} leaves no room for the {special_count} special tokens")
    budget = max_length - special_count
    if pieces_b is None:
        keep_a, keep_b = min(len(pieces_a), budget), 0
    else:
        keep_a, keep_b = longest_first_lengths(len(pieces_a), len(pieces_b), budget)

    ids = [cls_id, *pieces_a[:keep_a], sep_id]
    types = [0] * len(ids)
    words = [-1, *words_a[:keep_a], -1]
    if pieces_b is not None:
        # Number B's words after A's so that a word id never names two different words in one encoding.
        offset = (max(words_a[:keep_a]) + 1) if keep_a else 0
        ids += [*pieces_b[:keep_b], sep_id]
        types += [1] * (keep_b + 1)
        words += [word + offset for word in words_b[:keep_b]] + [-1]
    mask = [1] * len(ids)
    if pad:
        missing = max_length - len(ids)
        ids += [pad_id] * missing
        types += [0] * missing
        words += [-1] * missing
        mask += [0] * missing
    return Encoding(*(np.asarray(values, dtype=np.int32) for values in (ids, types, mask, words)))


def ragged_positions(lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(row, position within the row) of every element of ragged rows of these lengths, in row-major order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return rows, np.arange(int(lengths.sum()), dtype=np.int64) - starts[rows]


@dataclass
class RaggedEncoding:
    """A batch of unpadded encodings stored flat: row i is `input_ids[offsets[i]:offsets[i + 1]]`.

    `first_segment[i]` counts the tokens of `[CLS] A [SEP]`: token_type_ids are 0 before it and 1 from it on, so
    segment ids need no storage. The attention mask is implied by the row length. This is what the on-disk shards
    store, a fraction of the padded [rows, max_length] arrays.
    """

    input_ids: np.ndarray  # [total tokens]; int32, or a narrower integer type in shards
    word_ids: Optional[np.ndarray]  # [total tokens], -1 for special tokens; None when not kept
    offsets: np.ndarray  # int64 [rows + 1]
    first_segment: np.ndarray  # [rows]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> "RaggedEncoding":
        """The given rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts  # not self.lengths[rows]: that diffs every row of a big window
        row_of, within = ragged_positions(lengths)
        source = starts[row_of] + within
        return RaggedEncoding(self.input_ids[source], None if self.word_ids is None else self.word_ids[source],
                              _offsets_of(lengths), self.first_segment[rows])

    @staticmethod
    def concatenate(parts: Sequence["RaggedEncoding"]) -> "RaggedEncoding":
        """Rows of `parts` one after the other (all with word ids, or all without)."""
        with_words = {part.word_ids is not None for part in parts}
        if len(with_words) > 1:
            raise ValueError("cannot concatenate encodings with and without word ids")
        return RaggedEncoding(np.concatenate([part.input_ids for part in parts]),
                              np.concatenate([part.word_ids for part in parts]) if with_words == {True} else None,
                              _offsets_of(np.concatenate([part.lengths for part in parts])),
                              np.concatenate([part.first_segment for part in parts]))

    def padded(self, pad_id: int, width: Optional[int] = None, word_width: Optional[int] = None) -> Encoding:
        """2-D int32 arrays [rows, width]; width None: the longest row. Rows longer than `width` are an error.

        word_ids are padded to `word_width` (default `width`); they are None when the encoding has none.
        """
        lengths = self.lengths
        longest = int(lengths.max()) if len(lengths) else 0
        width = longest if width is None else width
        if longest > width:
            raise ValueError(f"a row of {longest} tokens does not fit width {width}")
        columns = np.arange(width)
        real = columns[None, :] < lengths[:, None]  # [rows, width]; row-major order of True cells = flat order
        input_ids = np.full(real.shape, pad_id, dtype=np.int32)
        input_ids[real] = self.input_ids
        token_type_ids = (real & (columns[None, :] >= self.first_segment[:, None])).astype(np.int32)
        word_ids = None
        if self.word_ids is not None:
            word_width = width if word_width is None else word_width
            word_real = np.arange(word_width)[None, :] < lengths[:, None]
            word_ids = np.full(word_real.shape, -1, dtype=np.int32)
            word_ids[word_real] = self.word_ids
        return Encoding(input_ids, token_type_ids, real.astype(np.int32), word_ids)


def _offsets_of(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def _flatten(pieces: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """(flat int32 values, int64 offsets [n + 1]) of a list of lists."""
    lengths = np.fromiter((len(piece) for piece in pieces), dtype=np.int64, count=len(pieces))
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(lengths.sum()))
    return flat, _offsets_of(lengths)


def longest_first_lengths_batch(length_a: np.ndarray, length_b: np.ndarray, budget: np.ndarray):
    """`longest_first_lengths` for arrays of rows (the same closed form, vectorised)."""
    half_low, half_high = budget // 2, budget - budget // 2
    fits = length_a + length_b <= budget
    keep_a = np.where(fits | (length_a <= half_low), length_a,
                      np.where(length_b <= half_low, budget - length_b, half_high))
    keep_b = np.where(fits | (length_b <= half_low), length_b,
                      np.where(length_a <= half_low, budget - length_a, half_low))
    return keep_a, keep_b


def assemble_ragged(pieces_a: Sequence[Sequence[int]], words_a: Optional[Sequence[Sequence[int]]],
                    pieces_b: Sequence[Optional[Sequence[int]]], words_b: Optional[Sequence[Optional[Sequence[int]]]],
                    max_length: int, cls_id: int, sep_id: int) -> RaggedEncoding:
    """`assemble_encoding` for a whole batch with numpy, without padding; rows whose B is None are single texts.

    words_a / words_b None: no word ids (the result's `word_ids` is None).
    """
    count = len(pieces_a)
    has_b = np.fromiter((piece is not None for piece in pieces_b), dtype=bool, count=count)
    special = np.where(has_b, 3, 2)
    if max_length < int(special.max(initial=2)):
        raise ValueError(f"max_length={max_length} leaves no room for the {int(special.max())} special tokens")
    ids_a, offsets_a = _flatten(pieces_a)
    ids_b, offsets_b = _flatten([piece or () for piece in pieces_b])
    length_a, length_b = np.diff(offsets_a), np.diff(offsets_b)
    budget = max_length - special
    keep_a, keep_b = longest_first_lengths_batch(length_a, length_b, budget)
    keep_a = np.where(has_b, keep_a, np.minimum(length_a, budget))
    keep_b = np.where(has_b, keep_b, 0)
    first_segment = keep_a + 2  # [CLS] A [SEP]
    row_lengths = first_segment + np.where(has_b, keep_b + 1, 0)
    offsets = _offsets_of(row_lengths)
    input_ids = np.empty(int(offsets[-1]), dtype=np.int32)
    starts = offsets[:-1]
    input_ids[starts] = cls_id
    input_ids[starts + 1 + keep_a] = sep_id
    rows_a, within_a = ragged_positions(keep_a)
    input_ids[starts[rows_a] + 1 + within_a] = ids_a[offsets_a[rows_a] + within_a]
    rows_b, within_b = ragged_positions(keep_b)
    target_b = starts[rows_b] + first_segment[rows_b] + within_b
    input_ids[target_b] = ids_b[offsets_b[rows_b] + within_b]
    input_ids[(starts + first_segment + keep_b)[has_b]] = sep_id
    word_ids = None
    if words_a is not None:
        word_a, _ = _flatten(words_a)
        word_b, _ = _flatten([word or () for word in words_b])
        word_ids = np.full(int(offsets[-1]), -1, dtype=np.int32)
        kept_words_a = word_a[offsets_a[rows_a] + within_a]
        word_ids[starts[rows_a] + 1 + within_a] = kept_words_a
        # B's words are numbered after the largest kept word id of A (0 when A kept nothing), as assemble_encoding.
        word_offset = np.zeros(count, dtype=np.int64)
        with_a = keep_a > 0
        if with_a.any():
            word_offset[with_a] = np.maximum.reduceat(kept_words_a, (np.cumsum(keep_a) - keep_a)[with_a]) + 1
        word_ids[target_b] = word_b[offsets_b[rows_b] + within_b] + word_offset[rows_b]
    return RaggedEncoding(input_ids, word_ids, offsets, first_segment.astype(np.int32))


def stack_encodings(encodings: Sequence[Encoding], pad_id: int, width: Optional[int] = None) -> Encoding:
    """Stack 1-D encodings into a batch; rows shorter than `width` (default: the longest row) are padded."""
    width = max([len(encoding) for encoding in encodings] + [width or 0])
    batch = {name: np.full((len(encodings), width), fill, dtype=np.int32)
             for name, fill in (("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0), ("word_ids", -1))}
    for row, encoding in enumerate(encodings):
        for name, values in encoding.as_dict().items():
            batch[name][row, : len(values)] = values
    return Encoding(**batch)


class _TokenizerBase:
    """The shared `encode` / `encode_batch` API; subclasses only provide `_pieces(text) -> (ids, word_ids)`."""

    max_length: int
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    unk_id: int

    def _pieces(self, text: TextInput) -> Tuple[List[int], List[int]]:
        raise NotImplementedError

    def _pieces_batch(self, texts: Sequence[TextInput],
                      with_words: bool = True) -> Tuple[List[List[int]], Optional[List[List[int]]]]:
        """(piece ids, word ids or None) of every text; subclasses call their library's batch API."""
        pieces = [self._pieces(text) for text in texts]
        return [ids for ids, _ in pieces], [words for _, words in pieces] if with_words else None

    def encode(self, text: TextInput, text_pair: Optional[TextInput] = None, max_length: Optional[int] = None,
               pad: bool = True) -> Encoding:
        """Encode one text or pair; `text` may be a string or a list of pre-segmented words."""
        pieces_a, words_a = self._pieces(text)
        pieces_b, words_b = self._pieces(text_pair) if text_pair is not None else (None, None)
        return assemble_encoding(pieces_a, words_a, pieces_b, words_b, max_length or self.max_length, pad,
                                 self.cls_id, self.sep_id, self.pad_id)

    def encode_batch(self, texts: Sequence[TextInput], text_pairs: Optional[Sequence[Optional[TextInput]]] = None,
                     max_length: Optional[int] = None, pad: bool = True) -> Encoding:
        """Encode many texts into 2-D arrays [batch, length].

        With pad=True every row has `max_length` tokens; with pad=False rows are padded only to the longest row
        of this batch (dynamic padding).
        """
        ragged = self.encode_ragged(texts, text_pairs, max_length, word_ids=True)
        return ragged.padded(self.pad_id, (max_length or self.max_length) if pad else None)

    def encode_ragged(self, texts: Sequence[TextInput], text_pairs: Optional[Sequence[Optional[TextInput]]] = None,
                      max_length: Optional[int] = None, word_ids: bool = True) -> RaggedEncoding:
        """Encode many texts (one batch call of the library) into unpadded rows; the ids of `encode`, exactly.

        word_ids=False skips word ids (only whole-word masking needs them), which lets WordPiece use the faster
        `encode_batch_fast` of `tokenizers`.
        """
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text pairs")
        pieces_a, words_a = self._pieces_batch(texts, word_ids)
        pieces_b: List[Optional[List[int]]] = [None] * len(texts)
        words_b: Optional[List[Optional[List[int]]]] = [None] * len(texts) if word_ids else None
        paired = [row for row, pair in enumerate(text_pairs or ()) if pair is not None]
        if paired:
            ids, words = self._pieces_batch([text_pairs[row] for row in paired], word_ids)
            for position, row in enumerate(paired):
                pieces_b[row] = ids[position]
                if word_ids:
                    words_b[row] = words[position]
        return assemble_ragged(pieces_a, words_a, pieces_b, words_b, max_length or self.max_length,
                               self.cls_id, self.sep_id)

    def special_ids(self) -> dict:
        return {"pad_id": self.pad_id, "unk_id": self.unk_id, "cls_id": self.cls_id, "sep_id": self.sep_id,
                "mask_id": self.mask_id}


def _require_file(path: Union[str, Path], what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


class WordPieceTokenizer(_TokenizerBase):
    """BERT WordPiece from a `vocab.txt`, with BERT's normalisation (clean text, spaces around CJK characters,
    optional lowercasing with accent stripping) and pre-tokenisation (split on whitespace and punctuation).

    A "word" for word_ids is one pre-token (so "don't" is three words: don ' t, as in BERT whole-word masking), or
    one element of a pre-segmented word list.
    """

    def __init__(self, backend, lowercase: bool, max_length: int = 128, vocab_path: Optional[Path] = None):
        self._backend = backend  # a `tokenizers.Tokenizer` without post-processor, truncation or padding
        self.lowercase = lowercase
        self.max_length = max_length
        self.vocab_path = vocab_path
        ids = {}
        for token in SPECIAL_TOKENS:
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise DataError(f"{vocab_path or 'vocabulary'}: special token {token} is missing")
            ids[token] = token_id
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[token] for token in SPECIAL_TOKENS)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_vocab(cls, vocab_path: Union[str, Path], lowercase: Optional[bool] = None,
                   max_length: int = 128) -> "WordPieceTokenizer":
        """Load a `vocab.txt`.

        lowercase=None reads `do_lower_case` from a `tokenizer_config.json` next to the vocabulary (MiniLM ships
        one saying true; a cased model must not be lowercased or most words become [UNK]), defaulting to True.
        """
        from tokenizers import Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import WordPiece

        vocab_path = _require_file(vocab_path, "WordPiece vocabulary")
        if lowercase is None:
            lowercase = _lowercase_from_config(vocab_path.parent / "tokenizer_config.json")
        try:
            vocab = WordPiece.read_file(str(vocab_path))
        except Exception as err:  # the Rust reader reports bad encodings without the path
            raise DataError(f"{vocab_path}: cannot read WordPiece vocabulary ({err})") from err
        if not vocab:
            raise DataError(f"{vocab_path}: vocabulary is empty")
        backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                      max_input_chars_per_word=100))
        # strip_accents=None follows `lowercase`, which is what BERT's uncased models were trained with.
        backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                        strip_accents=None, lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return cls(backend, lowercase=lowercase, max_length=max_length, vocab_path=vocab_path)

    def _pieces(self, text: TextInput) -> Tuple[List[int], List[int]]:
        if isinstance(text, str):
            encoded = self._backend.encode(text, add_special_tokens=False)
        else:
            encoded = self._backend.encode(list(text), is_pretokenized=True, add_special_tokens=False)
        return encoded.ids, [word if word is not None else -1 for word in encoded.word_ids]

    def _pieces_batch(self, texts: Sequence[TextInput],
                      with_words: bool = True) -> Tuple[List[List[int]], Optional[List[List[int]]]]:
        # One Rust call per kind of input (it tokenizes in parallel); raw strings and word lists cannot be mixed in
        # one call. `encode_batch_fast` skips offset tracking, and with it word ids: used when those are not needed.
        encode = self._backend.encode_batch if with_words else self._backend.encode_batch_fast
        raw = [row for row, text in enumerate(texts) if isinstance(text, str)]
        words = [row for row, text in enumerate(texts) if not isinstance(text, str)]
        encoded = [None] * len(texts)
        for rows, pretokenized in ((raw, False), (words, True)):
            if rows:
                batch = [texts[row] if not pretokenized else list(texts[row]) for row in rows]
                for row, encoding in zip(rows, encode(batch, is_pretokenized=pretokenized, add_special_tokens=False)):
                    encoded[row] = encoding
        ids = [encoding.ids for encoding in encoded]
        if not with_words:
            return ids, None
        return ids, [[-1 if word is None else word for word in encoding.word_ids] for encoding in encoded]

    def tokenize(self, text: TextInput) -> List[str]:
        """The WordPiece pieces of `text`, without special tokens (e.g. ['un', '##aff', '##able'])."""
        return [self._backend.id_to_token(piece) for piece in self._pieces(text)[0]]

    def convert_ids_to_tokens(self, ids) -> List[str]:
        return [self._backend.id_to_token(int(token_id)) for token_id in np.asarray(ids).reshape(-1)]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> List[int]:
        return [self._token_id(token) for token in tokens]

    def _token_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        return self.unk_id if token_id is None else token_id


def _lowercase_from_config(config_path: Path) -> bool:
    if not config_path.is_file():
        return True
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{config_path}: not valid JSON ({err})") from err
    return bool(config.get("do_lower_case", True))


class SentencePieceTokenizer(_TokenizerBase):
    """A SentencePiece model with BERT-style special tokens.

    Models made by `train` have fixed special ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4 (no BOS/EOS), so
    that padding is 0 as in every BERT vocabulary and a model's embedding rows for special tokens never move when
    the corpus changes. [CLS]/[SEP]/[MASK] are control symbols: the literal text "[MASK]" is not turned into them.

    Word ids: a pre-segmented word list encodes each word on its own, so pieces never cross a given word boundary
    and word_ids follow the list (what Chinese whole-word masking needs). A raw string's words are its
    whitespace-separated words (a piece starting with "▁" starts a word); raw Chinese text has no spaces, so pass
    segmented words to get useful word ids.
    """

    def __init__(self, model_path: Union[str, Path], lowercase: bool = False, max_length: int = 128):
        import sentencepiece

        self.model_path = _require_file(model_path, "SentencePiece model")
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(str(self.model_path))
        except (OSError, RuntimeError) as err:
            raise DataError(f"{self.model_path}: not a SentencePiece model ({err})") from err
        self.lowercase = lowercase
        self.max_length = max_length
        ids = {}
        for token in SPECIAL_TOKENS:
            token_id = self._processor.PieceToId(token)
            # PieceToId returns the unk id for unknown pieces; only [UNK] itself may map there.
            if token != "[UNK]" and token_id == self._processor.unk_id():
                raise DataError(f"{self.model_path}: special token {token} is missing (train with "
                                f"SentencePieceTokenizer.train to get them)")
            ids[token] = token_id
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[token] for token in SPECIAL_TOKENS)
        self.vocab_size = self._processor.GetPieceSize()
        self._word_start_marker = "\u2581"
        self._starts_word: Optional[np.ndarray] = None  # per piece id: starts a word; built on first batch

    @classmethod
    def train(cls, corpus_path: Union[str, Path], model_prefix: Union[str, Path], vocab_size: int,
              character_coverage: float = 0.9995, model_type: str = "unigram", add_dummy_prefix: bool = True,
              lowercase: bool = False, max_length: int = 128, **trainer_options) -> "SentencePieceTokenizer":
        """Train a model on a text file (one sentence or paragraph per line) and load it.

        character_coverage 0.9995 is SentencePiece's advice for Chinese/Japanese (rare characters become [UNK]
        instead of taking vocabulary slots); use 1.0 for small alphabets. For Chinese pass add_dummy_prefix=False,
        otherwise every word starts with a separate "▁" piece. vocab_size is a soft limit (hard_vocab_limit off)
        so a tiny corpus does not make training fail.
        """
        import sentencepiece

        corpus_path = _require_file(corpus_path, "SentencePiece training corpus")
        options = dict(
            input=str(corpus_path), model_prefix=str(model_prefix), vocab_size=vocab_size,
            character_coverage=character_coverage, model_type=model_type, add_dummy_prefix=add_dummy_prefix,
            pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
            control_symbols=["[CLS]", "[SEP]", "[MASK]"], hard_vocab_limit=False, minloglevel=2,
        )
        options.update(trainer_options)
        try:
            sentencepiece.SentencePieceTrainer.Train(**options)
        except RuntimeError as err:
            raise DataError(f"{corpus_path}: SentencePiece training failed ({err})") from err
        return cls(f"{model_prefix}.model", lowercase=lowercase, max_length=max_length)

    def _pieces(self, text: TextInput) -> Tuple[List[int], List[int]]:
        if isinstance(text, str):
            text = text.lower() if self.lowercase else text
            ids = self._processor.EncodeAsIds(text)
            words, word = [], -1
            for index, piece_id in enumerate(ids):
                if index == 0 or self._processor.IdToPiece(piece_id).startswith(self._word_start_marker):
                    word += 1
                words.append(word)
            return ids, words
        ids, words = [], []
        for word_index, word in enumerate(text):
            word_pieces = self._processor.EncodeAsIds(word.lower() if self.lowercase else word)
            ids += word_pieces
            words += [word_index] * len(word_pieces)
        return ids, words

    def _pieces_batch(self, texts: Sequence[TextInput],
                      with_words: bool = True) -> Tuple[List[List[int]], Optional[List[List[int]]]]:
        # SentencePiece encodes a list in one C++ call; pre-segmented words are flattened into that call too.
        strings, owners = [], []  # one string per raw text, or per word of a segmented text
        for row, text in enumerate(texts):
            parts = [text] if isinstance(text, str) else list(text)
            strings += [part.lower() if self.lowercase else part for part in parts]
            owners.append(len(parts))
        encoded = self._processor.Encode(strings, out_type=int) if strings else []
        if self._starts_word is None:
            self._starts_word = np.array([self._processor.IdToPiece(i).startswith(self._word_start_marker)
                                          for i in range(self.vocab_size)], dtype=bool)
        ids, words, cursor = [], [], 0
        for text, parts in zip(texts, owners):
            pieces = encoded[cursor:cursor + parts]
            cursor += parts
            if isinstance(text, str):
                row_ids = pieces[0]
                starts = self._starts_word[np.asarray(row_ids, dtype=np.int64)]
                if len(row_ids):
                    starts[0] = True
                ids.append(row_ids)
                words.append((np.cumsum(starts) - 1).tolist())
            else:
                ids.append([piece for word_pieces in pieces for piece in word_pieces])
                words.append([index for index, word_pieces in enumerate(pieces) for _ in word_pieces])
        return ids, words if with_words else None

    def tokenize(self, text: TextInput) -> List[str]:
        return [self._processor.IdToPiece(piece) for piece in self._pieces(text)[0]]

    def convert_ids_to_tokens(self, ids) -> List[str]:
        return [self._processor.IdToPiece(int(token_id)) for token_id in np.asarray(ids).reshape(-1)]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> List[int]:
        return [self._processor.PieceToId(token) for token in tokens]

    def decode(self, ids) -> str:
        """Text of the ids, special tokens and padding dropped."""
        special = set(self.special_ids().values())
        return self._processor.DecodeIds([int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in special])


def load_tokenizer(path: Union[str, Path], lowercase: Optional[bool] = None, max_length: int = 128):
    """A tokenizer from a file path: `*.model` is SentencePiece, anything else a WordPiece `vocab.txt`."""
    path = Path(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, lowercase=bool(lowercase), max_length=max_length)
    return WordPieceTokenizer.from_vocab(path, lowercase=lowercase, max_length=max_length)
