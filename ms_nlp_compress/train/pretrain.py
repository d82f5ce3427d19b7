"""`msnc pretrain`: masked-LM pre-training of NEZHA (relative positions) or BERT (absolute), no NSP.

    msnc pretrain --config ascend_configs/nezha_pretrain_cpu.yaml [--set pretrain.pmlm=true]
    msnc finetune --config ... --set pretrained=runs/nezha_pretrain_cpu/pretrained

Pipeline: corpus lines (People's Daily words, or raw text) -> tokenizer (a given vocab.txt / spm.model, or one
built from the corpus: a character-level WordPiece vocabulary, as Chinese BERT / NEZHA, or a SentencePiece
model) -> rows packed to `data.max_length` (data/masking.py) -> masking per row, re-drawn each epoch
from (seed, epoch, row) so a resumed run sees exactly the masks an uninterrupted one would -> the shared Trainer
(AdamW or LAMB, warmup, clipping, loss scaling, data parallel, atomic checkpoints) on `MaskedLMLoss`.

Outputs in `output_dir`:
    pretrained/   NezhaModel backbone (+ untrained pooler, since there is no NSP) with the tokenizer files: what
                  `pretrained:` of a fine-tuning config points at (build_classifier loads it strictly).
    mlm/          NezhaForMaskedLM with its tied head: continued pre-training, MLM data augmentation.
    vocab/        the vocabulary built from the corpus (reused when the run resumes).
    metrics.jsonl train loss every `train.log_every` updates; held-out MLM loss / accuracy at each evaluation.
    results.json  the report returned by `run_pretrain`.

Sequence length and batch size are `data.max_length` / `data.batch_size` (the same keys fine-tuning uses);
everything specific to pre-training is `PretrainConfig` (the `pretrain:` section).
"""
from __future__ import annotations

import dataclasses
import json
import string
import time

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ms_nlp_compress.config import PretrainConfig
from ms_nlp_compress.atomic import write_text_atomic
from ms_nlp_compress.errors import ConfigError, DataError

MLM_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "masked_positions", "masked_ids", "masked_weights")
_PACKED_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "word_ids")
# Seed-sequence tags so the packing, the training masks and the held-out masks never share a random stream.
_PACKING_STREAM, _EVAL_STREAM = 1, 2


def pretrain_config_of(config) -> PretrainConfig:
    """The `pretrain` section of an ExperimentConfig (defaults until ExperimentConfig has the field)."""
    section = getattr(config, "pretrain", None)
    return section if section is not None else PretrainConfig()


def load_pretrain_experiment(path, overrides: Sequence[str] = ()):
    """Load an ExperimentConfig whose YAML has a `pretrain:` section, with the same checks as `load_config`.

    Bridge until `ExperimentConfig.pretrain` exists: the section is split off, built and validated as a
    PretrainConfig (errors name `pretrain.<key>` and the file) and attached as `config.pretrain`. Once the field
    exists this is plain `load_config`.
    """
    from ms_nlp_compress import config as config_module

    if "pretrain" in {f.name for f in dataclasses.fields(config_module.ExperimentConfig)}:
        return config_module.load_config(path, overrides)
    source = str(Path(path).resolve())
    values = config_module._read_yaml(Path(path))
    if overrides:
        values = config_module.apply_overrides(values, overrides)
        source = f"{source} (with --set {' '.join(overrides)})"
    section = values.pop("pretrain", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: pretrain: expected a mapping, got {type(section).__name__}")
    config = config_module.from_mapping(config_module.ExperimentConfig, values, source)
    config_module._validate_with_source(config, source)
    pretrain = config_module.from_mapping(PretrainConfig, section, source, "pretrain")
    config_module._validate_with_source(pretrain, source, "pretrain")
    config.pretrain = pretrain
    return config


def read_corpus(path: Path, max_lines: Optional[int] = None) -> List[str]:
    if not path.is_file():
        raise DataError(f"{path}: pre-training corpus not found (pretrain.corpus; `msnc data fetch` builds "
                        f"cache:peoples_daily/corpus.txt)")
    lines = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if max_lines is not None and number > max_lines:
                break
            lines.append(line.rstrip("\n"))
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: pre-training corpus has no text")
    return lines


def _is_cjk(char: str) -> bool:
    """BERT's `_is_chinese_char`: these characters are always split into their own pre-token."""
    code = ord(char)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0x2A700 <= code <= 0x2B73F or 0x2B740 <= code <= 0x2B81F or 0x2B820 <= code <= 0x2CEAF
            or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


def build_wordpiece_vocab(lines: Sequence[str], directory: Path, vocab_size: int, min_frequency: int = 2,
                          lowercase: bool = True) -> Path:
    """Write a character-level WordPiece vocab.txt (+ tokenizer_config.json, so `WordPieceTokenizer.from_vocab`
    lowercases exactly as here), counted after BERT's own normaliser and pre-tokeniser.

    Why characters: CJK characters are always their own pre-tokens, so a Chinese WordPiece vocabulary is a
    character vocabulary anyway (Chinese BERT / NEZHA); a whole word is what whole-word masking adds, not the
    vocabulary. Contents, in order: the specials (ids 0-4), printable ASCII and the `##` form of ASCII letters and
    digits (fine-tuning text has half-width digits and Latin words that People's Daily writes full-width; without
    `##7`, "1998" would be one [UNK]), every piece seen >= `min_frequency` times (first character of a pre-token
    as itself, later characters as `##c`), then frequent whole multi-character pre-tokens, up to `vocab_size`.
    Ties break by the string, so the vocabulary is a pure function of the corpus (the `tokenizers` WordPiece
    trainer was not: its size moved by a few tokens between identical runs).
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    from ms_nlp_compress.data.tokenization import SPECIAL_TOKENS

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for start in range(0, len(lines), 256):  # one call per chunk: the per-call overhead dominates short lines
        text = normalizer.normalize_str("\n".join(lines[start:start + 256]))
        words.update(token for token, _ in pre_tokenizer.pre_tokenize_str(text))
    pieces: Counter = Counter()
    for word, count in words.items():
        pieces[word[0]] += count
        for char in word[1:]:
            pieces["##" + char] += count
    alphabet = sorted({c.lower() if lowercase else c for c in string.printable if not c.isspace()})
    tokens = list(SPECIAL_TOKENS) + alphabet + ["##" + c for c in alphabet if c.isalnum()]
    present = set(tokens)

    def frequent(counter: Counter) -> List[str]:
        ranked = sorted(((-count, token) for token, count in counter.items() if count >= min_frequency))
        return [token for _, token in ranked if token not in present]

    tokens += frequent(pieces)
    present = set(tokens)
    tokens += frequent(Counter({word: count for word, count in words.items() if len(word) > 1}))
    tokens = tokens[:max(vocab_size, len(SPECIAL_TOKENS))]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase}), encoding="utf-8")
    return directory / "vocab.txt"


def build_sentencepiece_vocab(lines: Sequence[str], directory: Path, vocab_size: int, segmented: bool,
                              lowercase: bool) -> Path:
    """Train a unigram SentencePiece model (spm.model). A segmented Chinese corpus is trained without its spaces
    (and without a dummy prefix), since fine-tuning text arrives unsegmented."""
    from ms_nlp_compress.data.tokenization import SentencePieceTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    text_file = directory / "spm_corpus.txt"
    chinese = segmented and any(_is_cjk(c) for line in lines[:100] for c in line)
    with open(text_file, "w", encoding="utf-8") as handle:
        for line in lines:
            if line.strip():
                handle.write(("".join(line.split()) if chinese else line.strip()) + "\n")
    SentencePieceTokenizer.train(text_file, directory / "spm", vocab_size, add_dummy_prefix=not chinese,
                                 lowercase=lowercase)
    text_file.unlink()
    return directory / "spm.model"


def prepare_tokenizer(config, pretrain: PretrainConfig, lines: Sequence[str], output_dir: Path, rank: int,
                      log=print):
    """The run's tokenizer: `pretrain.vocab` (or the continued model's own) when given, else one built from the
    corpus into `output_dir/vocab` (reused on resume; other ranks wait for rank 0 to write it)."""
    from ms_nlp_compress.data.tokenization import load_tokenizer
    from ms_nlp_compress.train.finetune import model_config_for, resolve_path

    max_length = config.data.max_length
    if pretrain.vocab is not None:
        path = resolve_path(pretrain.vocab)
        return load_tokenizer(path, lowercase=config.data.lowercase if path.suffix == ".model" else None,
                              max_length=max_length)
    pretrained = resolve_path(config.pretrained)
    if pretrained is not None:
        for name in ("vocab.txt", "spm.model"):
            if (pretrained / name).is_file():
                return load_tokenizer(pretrained / name, lowercase=config.data.lowercase if name.endswith(".model")
                                      else None, max_length=max_length)
    directory = output_dir / "vocab"
    name = "vocab.txt" if pretrain.vocab_kind == "wordpiece" else "spm.model"
    # DONE records what the vocabulary was built from: a changed corpus or vocab setting rebuilds it instead of
    # silently reusing a stale one (resume reuses it, so a resumed model's embedding rows keep their tokens).
    settings = json.dumps({"corpus": pretrain.corpus, "max_lines": pretrain.max_lines, "segmented": pretrain.segmented,
                           "kind": pretrain.vocab_kind, "size": pretrain.vocab_size,
                           "min_frequency": pretrain.vocab_min_frequency, "lowercase": config.data.lowercase},
                          sort_keys=True)
    done = directory / "DONE"

    def built() -> bool:
        return done.is_file() and done.read_text(encoding="utf-8") == settings

    if rank == 0 and not built():
        started = time.perf_counter()
        if pretrain.vocab_kind == "wordpiece":
            build_wordpiece_vocab(lines, directory, pretrain.vocab_size, pretrain.vocab_min_frequency,
                                  config.data.lowercase)
        else:
            build_sentencepiece_vocab(lines, directory, pretrain.vocab_size, pretrain.segmented,
                                      config.data.lowercase)
        done.write_text(settings, encoding="utf-8")
        log(f"built a {pretrain.vocab_kind} vocabulary in {time.perf_counter() - started:.1f} s: {directory / name}")
    deadline = time.monotonic() + 600
    while not built():
        if time.monotonic() > deadline:
            raise DataError(f"{done}: rank {rank} waited 600 s for rank 0 to build the vocabulary")
        time.sleep(1.0)
    return load_tokenizer(directory / name, lowercase=config.data.lowercase if name.endswith(".model") else None,
                          max_length=max_length)


# ----------------------------------------------------------------------------------------------------------------
# Batches with per-epoch masking
# ----------------------------------------------------------------------------------------------------------------


class MaskedLMBatches:
    """ArrayBatches over packed rows whose masks are drawn per row from (seed, epoch, row).

    Shuffling, rank slicing and resume come from ArrayBatches (a hidden `row` column carries each row's index to
    the masking); what the trainer receives is the six MaskedLMLoss inputs in `MLM_INPUTS` order. With
    `dynamic_masking` false every epoch reuses epoch 0's masks (BERT's static masking).
    """

    def __init__(self, columns: Dict[str, np.ndarray], tokenizer, pretrain: PretrainConfig, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        from ms_nlp_compress.train.batches import ArrayBatches

        rows = np.arange(len(columns["input_ids"]), dtype=np.int64)
        self._rows = ArrayBatches({**{name: columns[name] for name in _PACKED_COLUMNS}, "row": rows},
                                  _PACKED_COLUMNS + ("row",), batch_size, shuffle=True, seed=seed, rank=rank,
                                  world_size=world_size, drop_last=True, dynamic_padding=False)
        self.seed = seed
        self.pretrain = pretrain
        self.vocab_size = tokenizer.vocab_size
        self.mask_id = tokenizer.mask_id
        self.special_ids = sorted(set(tokenizer.special_ids().values()))
        # The trainer's BatchSource interface (padding is static: every row is max_length long).
        self.order = MLM_INPUTS
        self.dynamic_padding = False
        self.batch_size = batch_size
        self._length = columns["input_ids"].shape[1]

    def __len__(self) -> int:
        return len(self._rows)

    def column_layout(self):
        predictions = self.pretrain.max_predictions
        return [(np.dtype(np.int32), (self._length,))] * 3 + [(np.dtype(np.int32), (predictions,))] * 2 + [
            (np.dtype(np.float32), (predictions,))]

    def mask(self, input_ids, word_ids, rows, epoch: int):
        from ms_nlp_compress.data.masking import mask_batch

        key = epoch if self.pretrain.dynamic_masking else 0
        return mask_batch(input_ids, word_ids, [(self.seed, key, int(row)) for row in rows],
                          vocab_size=self.vocab_size, mask_id=self.mask_id, special_ids=self.special_ids,
                          **self.pretrain.masking_kwargs())

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tuple[int, Tuple[np.ndarray, ...]]]:
        for index, (input_ids, attention_mask, token_type_ids, word_ids, rows) in self._rows.epoch(epoch, start):
            masked = self.mask(input_ids, word_ids, rows, epoch)
            yield index, (masked.input_ids, attention_mask, token_type_ids, masked.masked_positions,
                          masked.masked_ids, masked.masked_weights)


def fixed_masks(columns: Dict[str, np.ndarray], tokenizer, pretrain: PretrainConfig, seed: int) -> Dict:
    """Held-out rows masked once, from their own seed stream, so every evaluation scores the same predictions."""
    from ms_nlp_compress.data.masking import mask_batch

    masked = mask_batch(columns["input_ids"], columns["word_ids"],
                        [(seed, _EVAL_STREAM, row) for row in range(len(columns["input_ids"]))],
                        vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
                        special_ids=sorted(set(tokenizer.special_ids().values())), **pretrain.masking_kwargs())
    return {"input_ids": masked.input_ids, "attention_mask": columns["attention_mask"],
            "token_type_ids": columns["token_type_ids"], "masked_positions": masked.masked_positions,
            "masked_ids": masked.masked_ids, "masked_weights": masked.masked_weights}


def evaluate_mlm(model, masked: Dict[str, np.ndarray], batch_size: int) -> Dict[str, float]:
    """Mean cross-entropy and accuracy over the real predictions. The last batch is padded with weight-0 rows so
    every call has one static shape (no recompile)."""
    from mindspore import Tensor

    model.set_train(False)
    size = len(masked["input_ids"])
    total_loss, total_correct, total_weight = 0.0, 0.0, 0.0
    for start in range(0, size, batch_size):
        rows = np.arange(start, start + batch_size)
        real = rows < size
        rows = np.where(real, rows, 0)
        inputs = [Tensor(np.ascontiguousarray(masked[name][rows])) for name in MLM_INPUTS[:4]]
        logits = model(*inputs)[0].asnumpy().astype(np.float64)  # (B, P, V)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        targets = masked["masked_ids"][rows]
        weights = masked["masked_weights"][rows] * real[:, None]
        picked = np.take_along_axis(log_probs, targets[..., None].astype(np.int64), -1)[..., 0]  # (B, P)
        total_loss += float(-(picked * weights).sum())
        total_correct += float(((log_probs.argmax(-1) == targets) * weights).sum())
        total_weight += float(weights.sum())
    total_weight = max(total_weight, 1.0)
    return {"mlm_loss": total_loss / total_weight, "mlm_acc": total_correct / total_weight}


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def _save_outputs(model, model_config, output_dir: Path, tokenizer_dir: Optional[Path], meta: Dict) -> Tuple[Path,
                                                                                                            Path]:
    """mlm/ (the whole NezhaForMaskedLM) and pretrained/ (a NezhaModel backbone with a fresh pooler: MLM without
    NSP never trains the pooler, and build_classifier loads backbones strictly, so the pooler must be there)."""
    from ms_nlp_compress.models.checkpoint import cell_weights, load_weights, save_model_dir
    from ms_nlp_compress.models.nezha import NezhaModel

    mlm_dir = save_model_dir(model, output_dir / "mlm", model_config, meta=meta, tokenizer_dir=tokenizer_dir)
    backbone = NezhaModel(model_config, add_pooler=True)
    weights = {name: value for name, value in cell_weights(model).items() if name.startswith("bert.")}
    report = load_weights(backbone, weights, strict=False, source=str(mlm_dir))
    if report.unexpected or report.mismatched or any(not n.startswith("pooler.") for n in report.missing):
        raise DataError(f"backbone export from {mlm_dir} is incomplete:\n{report.describe()}")
    backbone_dir = save_model_dir(backbone, output_dir / "pretrained", model_config,
                                  meta=dict(meta, pooler="untrained (no NSP)"), tokenizer_dir=tokenizer_dir)
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer_config.json").is_file():
        for directory in (mlm_dir, backbone_dir):  # save_model_dir copies vocab files only; keep the lowercasing
            (directory / "tokenizer_config.json").write_bytes((tokenizer_dir / "tokenizer_config.json").read_bytes())
    return mlm_dir, backbone_dir


def _read_curve(metrics_path: Path) -> Tuple[List[Dict], List[Dict]]:
    train, evals = [], []
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("type") == "train":
                train.append({"update": record["update"], "loss": round(record["loss"], 4),
                              **({"seconds": record["seconds"]} if "seconds" in record else {})})
            elif record.get("type") == "eval":
                evals.append({"update": record["update"], "mlm_loss": round(record["mlm_loss"], 4),
                              "mlm_acc": round(record["mlm_acc"], 4)})
    return train, evals


def run_pretrain(config, resume: bool = True, log=print) -> Dict:
    """Pre-train a masked LM as configured; save mlm/ and pretrained/ in `config.output_dir`; return a report."""
    from ms_nlp_compress.data.masking import build_pretraining_examples
    from ms_nlp_compress.models.checkpoint import MLM_HEAD, load_pretrained
    from ms_nlp_compress.models.nezha import NezhaForMaskedLM
    from ms_nlp_compress.train.finetune import model_config_for, resolve_path
    from ms_nlp_compress.train.losses import MaskedLMLoss
    from ms_nlp_compress.train.trainer import Trainer, start_run

    pretrain = pretrain_config_of(config)
    pretrain.validate()
    rank, world_size, output_dir = start_run(config)
    seed = config.runtime.seed

    started = time.perf_counter()
    corpus = resolve_path(pretrain.corpus)
    lines = read_corpus(corpus, pretrain.max_lines)
    tokenizer = prepare_tokenizer(config, pretrain, lines, output_dir, rank, log)
    columns = build_pretraining_examples(lines, tokenizer, config.data.max_length, segmented=pretrain.segmented,
                                         short_seq_prob=pretrain.short_seq_prob,
                                         rng=np.random.default_rng([seed, _PACKING_STREAM]))
    count = len(columns["input_ids"])
    held_out = pretrain.eval_sequences if count - pretrain.eval_sequences >= config.data.batch_size * world_size \
        else 0
    train_columns = {name: values[:count - held_out] for name, values in columns.items()}
    eval_columns = {name: values[count - held_out:] for name, values in columns.items()}
    tokens = int(columns["attention_mask"].sum())
    unk_rate = float((columns["input_ids"] == tokenizer.unk_id).sum() / max(tokens, 1))
    log(f"{corpus}: {len(lines)} lines -> {count} rows of <= {config.data.max_length} tokens ({tokens} tokens, "
        f"[UNK] {unk_rate:.2%}); {count - held_out} train / {held_out} held out; "
        f"prepared in {time.perf_counter() - started:.1f} s")

    pretrained = resolve_path(config.pretrained)
    # From a checkpoint: its architecture, the user's run-time keys (dropout, kernels), conflicts named.
    model_config = model_config_for(config, pretrained) if pretrained is not None else dataclasses.replace(config.model)
    if model_config.vocab_size != tokenizer.vocab_size:
        if pretrained is not None:
            raise ConfigError(f"pretrained: {pretrained} has vocab_size {model_config.vocab_size} but its "
                              f"tokenizer has {tokenizer.vocab_size} tokens")
        log(f"model.vocab_size set to the tokenizer's {tokenizer.vocab_size} (config said {model_config.vocab_size})")
        model_config.vocab_size = tokenizer.vocab_size
    model_config.pad_token_id = tokenizer.pad_id
    if model_config.position_embedding == "absolute" and config.data.max_length > model_config.max_position_embeddings:
        raise ConfigError(f"data.max_length: {config.data.max_length} exceeds model.max_position_embeddings "
                          f"{model_config.max_position_embeddings} of an absolute-position model")
    model_config.validate()
    model = NezhaForMaskedLM(model_config)
    if pretrained is not None:
        # The checkpoint's MLM head (transform dense + LayerNorm + decoder bias) continues with its backbone; only a
        # checkpoint without one starts a fresh head, said in the line. An untied decoder is refused (checkpoint.py).
        load_pretrained(model, pretrained, fresh=(MLM_HEAD,), log=lambda line: log(f"continuing from {line}"))

    batches = MaskedLMBatches(train_columns, tokenizer, pretrain, config.data.batch_size, seed, rank, world_size)
    eval_masked = fixed_masks(eval_columns, tokenizer, pretrain, seed) if held_out else None
    evaluate = (lambda: evaluate_mlm(model, eval_masked, config.data.eval_batch_size)) if held_out else None
    trainer = Trainer(config, model, MaskedLMLoss(model), batches, output_dir, evaluate=evaluate,
                      metric="mlm_acc" if held_out else None, rank=rank, world_size=world_size, log=log)
    log(f"pre-training {trainer.updates_total} updates ({len(batches)} batches/epoch, batch "
        f"{config.data.batch_size} x {world_size} rank(s)); {model_config.num_layers} layers, hidden "
        f"{model_config.hidden_size}, {model_config.position_embedding} positions, vocab {model_config.vocab_size}, "
        f"whole_word={pretrain.whole_word}, pmlm={pretrain.pmlm}")
    result = trainer.fit(resume=resume)

    report = {"corpus": str(corpus), "lines": len(lines), "rows": count, "train_rows": count - held_out,
              "held_out_rows": held_out, "tokens": tokens, "unk_rate": unk_rate,
              "vocab": str(getattr(tokenizer, "vocab_path", None) or getattr(tokenizer, "model_path", "")),
              "vocab_size": tokenizer.vocab_size, "updates": result.updates, "train_seconds": result.seconds,
              "last_eval": result.last_eval, "resumed_from": result.resumed_from,
              "skipped_updates": result.skipped_updates}
    if rank == 0:
        vocab_file = Path(report["vocab"])
        meta = {"pretraining": {"corpus": str(corpus), "updates": result.updates, "max_length":
                                config.data.max_length, **dataclasses.asdict(pretrain)},
                "max_length": config.data.max_length}
        mlm_dir, backbone_dir = _save_outputs(model, model_config, output_dir, vocab_file.parent, meta)
        report.update({"mlm_dir": str(mlm_dir), "pretrained_dir": str(backbone_dir)})
        report["train_curve"], report["eval_curve"] = _read_curve(output_dir / "metrics.jsonl")
        write_text_atomic(output_dir / "results.json", json.dumps(report, indent=2))
    return report


def add_parser(subparsers) -> None:
    """`msnc pretrain --config X [--set key=value ...] [--no-resume]`."""
    parser = subparsers.add_parser("pretrain", help="masked-LM pre-training (whole-word / PMLM masking) of a "
                                                    "NEZHA or BERT backbone")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints in output_dir")

    def pretrain_command(args):
        report = run_pretrain(load_pretrain_experiment(args.config, args.overrides), resume=not args.no_resume)
        shown = {key: value for key, value in report.items() if key != "train_curve"}
        print(json.dumps(shown, indent=2))
        return 0

    parser.set_defaults(func=pretrain_command)
