"""Masked-LM inputs: whole-word masking, PMLM masking counts, 80/10/10 replacement, and packing a corpus into
pre-training sequences. Pure numpy; every random draw comes from a `np.random.Generator` passed in, so a sequence's
mask is a pure function of its seed (the pre-training loop seeds each row by (seed, epoch, row), which makes
dynamic re-masking per epoch exact under resume and independent of batch size and rank count).

Decisions (algorithms.md Part A, Part B 1.5/1.6):
- A "word" is a run of tokens sharing a `word_ids` value: WordPiece `##` pieces of one pre-token, or the pieces and
  characters of one word of a segmented corpus (People's Daily). `wordpiece_word_ids` rebuilds the grouping from
  `##` token strings when only those are known. `whole_word=False` makes every token its own word (BERT/NEZHA's
  released generator).
- The budget is counted in TOKENS, as BERT's `create_pretraining_data.py --do_whole_word_mask`: words are visited in
  random order and a word is added whole only if it still fits in the budget (a word that would overshoot is
  skipped and smaller words are tried), so a sequence never gets more masked tokens than the budget and a word is
  never partly masked. A word holding a never-masked token (an [UNK] character) is not a candidate at all.
- Standard budget: min(max_predictions, max(1, round(n * mask_ratio))) where n counts the tokens of candidate
  words (specials excluded; BERT counts [CLS]/[SEP] too, which only matters for very short sequences).
- PMLM budget (PMLM/create_pretraining_data.py): uniform over the integers [1, min(max_predictions,
  round(n * pmlm_max_ratio))] (at least 1).
- Replacement per masked TOKEN (not per word, as in BERT's code): 80 % [MASK], 10 % a random token, 10 % unchanged.
  Random tokens are drawn uniformly from the vocabulary minus the special ids, so the model is never fed a stray
  [CLS]/[SEP]/[PAD]/[MASK] as "noise". Special ids and positions with word id -1 are never masked.
"""
from __future__ import annotations

from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np


class MaskedSequence(NamedTuple):
    """One masked sequence. Predictions are sorted by position and padded to `max_predictions` (weight 0)."""

    input_ids: np.ndarray  # (L,) int32, the corrupted input
    masked_positions: np.ndarray  # (P,) int32
    masked_ids: np.ndarray  # (P,) int32, the original ids at masked_positions
    masked_weights: np.ndarray  # (P,) float32, 1 for a prediction, 0 for padding


def wordpiece_word_ids(tokens: Sequence[str], special_tokens: Iterable[str] = ("[CLS]", "[SEP]", "[PAD]")
                       ) -> np.ndarray:
    """Word index per WordPiece token: a `##` piece continues the previous word; specials get -1.

    This is the grouping BERT's whole-word masking uses. The tokenizers here already return it as `word_ids`; this
    helper serves token lists from elsewhere and lets tests check the two agree.
    """
    special = set(special_tokens)
    word_ids = np.full(len(tokens), -1, dtype=np.int32)
    word = -1
    previous_was_word = False
    for index, token in enumerate(tokens):
        if token in special:
            previous_was_word = False
            continue
        if not (token.startswith("##") and previous_was_word):
            word += 1
        word_ids[index] = word
        previous_was_word = True
    return word_ids


def masking_budget(maskable: int, rng: np.random.Generator, mask_ratio: float = 0.15, max_predictions: int = 20,
                   pmlm: bool = False, pmlm_max_ratio: float = 1.0) -> int:
    """How many tokens to mask in a sequence with `maskable` candidate tokens (0 when there are none)."""
    if maskable <= 0:
        return 0
    if pmlm:
        upper = max(1, min(max_predictions, int(round(maskable * pmlm_max_ratio))))
        return int(rng.integers(1, upper + 1))
    return min(max_predictions, max(1, int(round(maskable * mask_ratio))))


def _random_tokens(count: int, vocab_size: int, excluded: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`count` ids uniform over [0, vocab_size) minus `excluded` (sorted, unique): draw in the smaller range and
    step over each excluded id, which keeps the draw uniform without building a vocabulary-sized table."""
    draws = rng.integers(0, vocab_size - len(excluded), size=count)
    for special in excluded:  # ascending: each shift can only push a value past later specials
        draws = draws + (draws >= special)
    return draws.astype(np.int32)


def mask_tokens(input_ids: np.ndarray, word_ids: np.ndarray, vocab_size: int, mask_id: int,
                rng: np.random.Generator, special_ids: Sequence[int] = (), special_mask: Optional[np.ndarray] = None,
                mask_ratio: float = 0.15, max_predictions: int = 20, pmlm: bool = False,
                pmlm_max_ratio: float = 1.0, whole_word: bool = True, mask_token_prob: float = 0.8,
                random_token_prob: float = 0.1) -> MaskedSequence:
    """Mask one sequence.

    Args:
        input_ids, word_ids: (L,) ints; word id -1 marks [CLS]/[SEP]/[PAD] (never masked).
        special_ids: ids that are never masked and never drawn as random replacements ([PAD], [UNK], [CLS],
            [SEP], [MASK]: predicting [UNK] teaches nothing).
        special_mask: optional (L,) bool, True = never mask (e.g. a padding mask from elsewhere).
        mask_ratio / max_predictions: the standard budget; pmlm / pmlm_max_ratio: the PMLM budget (module doc).
        whole_word: mask all tokens of a chosen word together; False masks single tokens.
        mask_token_prob / random_token_prob: replacement split; the rest stays unchanged (0.8 / 0.1 / 0.1).
    """
    input_ids = np.asarray(input_ids)
    word_ids = np.asarray(word_ids)
    if input_ids.shape != word_ids.shape or input_ids.ndim != 1:
        raise ValueError(f"input_ids {input_ids.shape} and word_ids {word_ids.shape} must be equal 1-D shapes")
    if not 0.0 <= mask_token_prob + random_token_prob <= 1.0:
        raise ValueError(f"mask_token_prob + random_token_prob = {mask_token_prob + random_token_prob} > 1")
    excluded = np.unique(np.asarray(list(special_ids) + [mask_id], dtype=np.int64))
    in_word = word_ids >= 0
    maskable = in_word & ~np.isin(input_ids, excluded)
    if special_mask is not None:
        maskable &= ~np.asarray(special_mask, dtype=bool)
    if whole_word:
        # Words as arrays of positions. A word with any unmaskable token (an [UNK] inside a Chinese word) is not a
        # candidate at all: masking the rest of it would leak part of the word.
        positions = np.flatnonzero(in_word)
        _, group = np.unique(word_ids[positions], return_inverse=True)
        order = np.argsort(group, kind="stable")
        cuts = np.flatnonzero(np.diff(group[order])) + 1
        words = [word for word in np.split(positions[order], cuts) if maskable[word].all()] if len(positions) else []
    else:
        words = [np.array([position]) for position in np.flatnonzero(maskable)]
    budget = masking_budget(sum(len(word) for word in words), rng, mask_ratio, max_predictions, pmlm,
                            pmlm_max_ratio)
    chosen: List[np.ndarray] = []
    count = 0
    for word in (words[i] for i in rng.permutation(len(words))):
        if count >= budget:
            break
        if count + len(word) > budget:
            continue  # a whole word that does not fit is skipped, never cut
        chosen.append(word)
        count += len(word)
    positions = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)

    corrupted = input_ids.astype(np.int32).copy()
    roll = rng.random(len(positions))
    use_mask = roll < mask_token_prob
    use_random = (roll >= mask_token_prob) & (roll < mask_token_prob + random_token_prob)
    corrupted[positions[use_mask]] = mask_id
    corrupted[positions[use_random]] = _random_tokens(int(use_random.sum()), vocab_size, excluded, rng)

    masked_positions = np.zeros(max_predictions, dtype=np.int32)
    masked_ids = np.zeros(max_predictions, dtype=np.int32)
    masked_weights = np.zeros(max_predictions, dtype=np.float32)
    masked_positions[:len(positions)] = positions
    masked_ids[:len(positions)] = input_ids[positions]
    masked_weights[:len(positions)] = 1.0
    return MaskedSequence(corrupted, masked_positions, masked_ids, masked_weights)


def mask_batch(input_ids: np.ndarray, word_ids: np.ndarray, seeds: Sequence[Sequence[int]], **kwargs
               ) -> MaskedSequence:
    """Mask each row of (B, L) arrays with its own generator `np.random.default_rng(seeds[row])`.

    One generator per row makes a row's mask independent of which batch, rank or resume point it lands in.
    Returns a MaskedSequence of stacked (B, L) / (B, P) arrays; kwargs go to `mask_tokens`.
    """
    rows = [mask_tokens(input_ids[row], word_ids[row], rng=np.random.default_rng(list(seeds[row])), **kwargs)
            for row in range(len(input_ids))]
    if not rows:
        width = kwargs.get("max_predictions", 20)
        return MaskedSequence(np.zeros_like(input_ids, dtype=np.int32), np.zeros((0, width), np.int32),
                              np.zeros((0, width), np.int32), np.zeros((0, width), np.float32))
    return MaskedSequence(*(np.stack(column) for column in zip(*rows)))


# ----------------------------------------------------------------------------------------------------------------
# Packing a corpus into sequences
# ----------------------------------------------------------------------------------------------------------------


def _line_pieces(tokenizer, line, limit: int) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids and word ids of one line without specials (via the tokenizer's public `encode`)."""
    encoding = tokenizer.encode(line, max_length=limit, pad=False)
    return encoding.input_ids[1:-1], encoding.word_ids[1:-1]


def build_pretraining_examples(corpus_lines: Iterable, tokenizer, max_length: int, segmented: bool = True,
                               short_seq_prob: float = 0.0, rng: Optional[np.random.Generator] = None
                               ) -> dict:
    """Pack consecutive lines into `[CLS] tokens [SEP]` sequences of up to `max_length` tokens.

    Why packing: People's Daily paragraphs average ~95 characters, so one per sequence would leave much of each
    128-token row as padding; filling rows with consecutive lines (RoBERTa's FULL-SENTENCES, no NSP) uses the
    compute on text. Lines continue across sequence boundaries; a word is never split between two sequences (a word
    longer than a whole row is truncated). A blank line ends a document: no sequence spans two documents.
    `short_seq_prob` is BERT's: that fraction of rows gets a random shorter target length, so fine-tuning on short
    inputs is not out of distribution.

    Args:
        corpus_lines: strings. With `segmented`, each line is whitespace-separated words (word boundaries for
            whole-word masking); otherwise raw text whose words are the tokenizer's (WordPiece pre-tokens).
        tokenizer: a WordPieceTokenizer or SentencePieceTokenizer.
    Returns: dict of int32 (N, max_length) arrays input_ids, attention_mask, token_type_ids, word_ids (word ids are
    renumbered 0.. within each row, -1 on specials and padding).
    """
    if max_length < 3:
        raise ValueError(f"max_length={max_length} leaves no room for text between [CLS] and [SEP]")
    if short_seq_prob > 0 and rng is None:
        raise ValueError("short_seq_prob > 0 needs an rng")
    budget = max_length - 2
    rows: List[Tuple[np.ndarray, np.ndarray]] = []
    pieces: List[np.ndarray] = []  # the current row's words, one id array each
    filled = 0
    row_target = budget

    def target() -> int:
        if short_seq_prob > 0 and rng.random() < short_seq_prob:
            return int(rng.integers(1, budget + 1))
        return budget

    def flush() -> None:
        if pieces:
            lengths = [len(word) for word in pieces]
            rows.append((np.concatenate(pieces), np.repeat(np.arange(len(pieces), dtype=np.int32), lengths)))
        pieces.clear()

    for line in corpus_lines:
        text = line.split() if segmented else line.strip()
        if not text:
            flush()  # document boundary
            filled, row_target = 0, target()
            continue
        limit = 2 + 4 * (sum(len(word) + 1 for word in text) if segmented else len(text) + 1)
        ids, words = _line_pieces(tokenizer, text, limit)
        if len(ids) == 0:
            continue
        # Cut the line at word starts so whole words move to the next row together.
        bounds = np.flatnonzero(np.diff(words, prepend=words[0] - 1) != 0).tolist() + [len(ids)]
        for begin, end in zip(bounds[:-1], bounds[1:]):
            if filled + (end - begin) > row_target and pieces:
                flush()
                filled, row_target = 0, target()
            end = min(end, begin + budget)  # a word longer than a row is truncated
            pieces.append(ids[begin:end])
            filled += end - begin
    flush()

    count = len(rows)
    columns = {
        "input_ids": np.full((count, max_length), tokenizer.pad_id, dtype=np.int32),
        "attention_mask": np.zeros((count, max_length), dtype=np.int32),
        "token_type_ids": np.zeros((count, max_length), dtype=np.int32),
        "word_ids": np.full((count, max_length), -1, dtype=np.int32),
    }
    for index, (ids, words) in enumerate(rows):
        length = len(ids) + 2
        columns["input_ids"][index, :length] = np.concatenate([[tokenizer.cls_id], ids, [tokenizer.sep_id]])
        columns["attention_mask"][index, :length] = 1
        columns["word_ids"][index, 1:length - 1] = words
    return columns
