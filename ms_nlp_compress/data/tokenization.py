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

Pairs are truncated longest-first exactly as BERT's `_truncate_seq_pair`, which the reference GLUE processors
(BERT, TinyBERT, DynaBERT, TernaryBERT) use: remove one token at a time from the end of the currently longer
segment, from B on ties. When both segments are longer than half the budget and the budget is odd, A keeps the
extra token; the Rust `tokenizers` LongestFirst strategy gives it to the longer segment instead, the only place
where our ids can differ from `Tokenizer.from_file(tokenizer.json)`. Inputs of any length (10k words and more)
are truncated, never rejected.
"""
from __future__ import annotations

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
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text pairs")
        pairs = text_pairs if text_pairs is not None else [None] * len(texts)
        encodings = [self.encode(text, pair, max_length, pad) for text, pair in zip(texts, pairs)]
        return stack_encodings(encodings, self.pad_id, (max_length or self.max_length) if pad else None)

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
