"""`msnc distill general|task` (TinyBERT's distillations, compress/distill/run.py) and `msnc augment` (TinyBERT
data augmentation of a task's TSV or of a one-sentence-per-line file).

    msnc distill general --config X.yaml [--set k=v ...] [--no-resume]     teacher backbone -> student on a corpus
    msnc distill task --config X.yaml [--set k=v ...] [--no-resume]        fine-tuned teacher -> student, 2 stages
    bash scripts/run_distributed.sh N distill general --config X.yaml      data parallel over N ranks (msrun)

    msnc augment --model DIR --input train.tsv|--train-of X.yaml --output train_aug.tsv [--vectors model|none|glove.txt]
                 [--no-mlm]
                 [--candidates 15] [--replace-prob 0.4] [--samples 20] [--seed 42] [--batch-size 64]
                 [--columns sentence1,sentence2] [--lines] [--device cpu] [--mode graph] [--threads N]

DIR gives the tokenizer (its vocab.txt / spm.model) and, when it is one of our `NezhaForMaskedLM` directories (what
`msnc pretrain` writes), the masked-LM route for single-piece words. `--vectors model` (default) uses DIR's own
word-embedding table for the neighbour route; a path reads a GloVe-format text file (first --max-vectors words).
MindSpore is imported inside the command, so `msnc --help` stays fast.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ms_nlp_compress.compress.distill.config import AugmentConfig
from ms_nlp_compress.errors import ConfigError, DataError

WORD_TABLE_SUFFIX = "embeddings.word_embeddings.embedding_table"


def _resolve(value: Optional[str]) -> Optional[Path]:
    from ms_nlp_compress.train.finetune import resolve_path

    return resolve_path(value)


def word_embedding_table(model_dir: Path) -> np.ndarray:
    """The (V, H) word-embedding matrix of our model directory or a Hugging Face BERT folder."""
    from ms_nlp_compress.models.checkpoint import is_model_dir, read_hf_checkpoint, read_model_dir

    weights = read_model_dir(model_dir)[2] if is_model_dir(model_dir) else read_hf_checkpoint(model_dir)[1]
    names = [name for name in weights if name.endswith(WORD_TABLE_SUFFIX)]
    if len(names) != 1:
        raise DataError(f"{model_dir}: expected one word-embedding table (*{WORD_TABLE_SUFFIX}), found {names}")
    return weights[names[0]]


def load_mlm(model_dir: Path):
    """Our `NezhaForMaskedLM` directory as a model, or None when DIR has no masked-LM head."""
    from ms_nlp_compress.models.checkpoint import load_model_dir, saved_architecture

    if saved_architecture(model_dir) != "NezhaForMaskedLM":
        return None
    return load_model_dir(model_dir)[0]


def build_augmenter(model_dir: Path, config: AugmentConfig, vectors: str = "model", use_mlm: bool = True,
                    log=print):
    from ms_nlp_compress.data.augment import Augmenter, WordVectors
    from ms_nlp_compress.data.tokenization import load_tokenizer

    vocab = next((model_dir / name for name in ("vocab.txt", "spm.model") if (model_dir / name).is_file()), None)
    if vocab is None:
        raise DataError(f"{model_dir}: no vocab.txt or spm.model (the tokenizer of the model to augment for)")
    tokenizer = load_tokenizer(vocab, max_length=config.max_length)
    mlm = load_mlm(model_dir) if use_mlm else None
    if vectors == "none":
        table = None
    elif vectors == "model":
        table = WordVectors.from_embedding_table(word_embedding_table(model_dir), tokenizer,
                                                 f"{model_dir} word embeddings")
    else:
        table = WordVectors.from_glove(_resolve(vectors), config.max_vectors)
    log(f"augment: MLM route {'on (' + str(model_dir) + ')' if mlm is not None else 'off'}; vector route "
        f"{'off' if table is None else f'{table.source} ({len(table.words)} candidate words)'}")
    return Augmenter(tokenizer, config, mlm=mlm, vectors=table)


def augment_lines(input_path: Path, output_path: Path, augmenter, chunk: int = 256) -> Dict[str, int]:
    """One sentence per line in, every variant (original first) one per line out."""
    from ms_nlp_compress.data.augment import iter_lines

    lines = list(iter_lines(input_path))
    written = 0
    tmp = output_path.with_name(output_path.name + ".tmp")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as handle:
        for start in range(0, len(lines), chunk):
            for variants in augmenter.augment(lines[start:start + chunk], start_index=start):
                handle.write("".join(variant.replace("\n", " ") + "\n" for variant in variants))
                written += len(variants)
    tmp.replace(output_path)
    return {"rows": len(lines), "written": written}


def write_train_split(config_path: str, overrides, output_path: Path) -> Path:
    """The training split a config trains on (`data.data_dir`'s train.tsv, subsampled per `data.train_limit` exactly
    as `msnc distill task` / `msnc finetune` read it), written as a headed TSV next to the augmented file: the
    originals of `<output>` are then the rows the un-augmented runs trained on."""
    from ms_nlp_compress.config import load_config
    from ms_nlp_compress.train.finetune import read_split

    config = load_config(config_path, overrides)
    task, examples = read_split(config, "train")
    if task.name != "sst2":  # other tasks have their own column layouts; only SST-2's is written here
        raise ConfigError(f"--train-of: data.task is {task.name}; only sst2-format splits are written (augment "
                          "another task's train.tsv with --input)")
    source = output_path.with_name(output_path.stem + ".source.tsv")
    source.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "w", encoding="utf-8", newline="") as handle:
        handle.write("sentence\tlabel\n")
        for example in examples:
            handle.write(f"{example.text_a}\t{task.labels[example.label]}\n")
    return source


def run_augment(args: argparse.Namespace) -> int:
    from ms_nlp_compress.config import RuntimeConfig
    from ms_nlp_compress.data.augment import augment_tsv
    from ms_nlp_compress.runtime import setup_runtime

    config = AugmentConfig(candidates=args.candidates, replace_prob=args.replace_prob, samples=args.samples,
                           seed=args.seed, batch_size=args.batch_size, max_length=args.max_length,
                           max_vectors=args.max_vectors)
    config.validate()
    runtime = RuntimeConfig(device=args.device, mode=args.mode, cpu_threads=args.threads, seed=args.seed)
    runtime.validate()
    setup_runtime(runtime)
    model_dir = _resolve(args.model)
    if model_dir is None or not model_dir.is_dir():
        raise ConfigError(f"--model: {args.model} is not a model directory")
    augmenter = build_augmenter(model_dir, config, args.vectors, not args.no_mlm)
    if (args.input is None) == (args.train_of is None):
        raise ConfigError("msnc augment: give exactly one of --input and --train-of")
    if args.train_of is not None:
        if args.lines:
            raise ConfigError("--train-of: writes a TSV; --lines does not apply")
        args.input = str(write_train_split(args.train_of, args.set, _resolve(args.output)))
        print(f"augment: the training split of {args.train_of} -> {args.input}")
    started = time.perf_counter()
    if args.lines:
        counts = augment_lines(_resolve(args.input), _resolve(args.output), augmenter)
    else:
        columns = [name.strip() for name in args.columns.split(",")] if args.columns else None
        counts = augment_tsv(_resolve(args.input), _resolve(args.output), augmenter, columns)
    seconds = time.perf_counter() - started
    print(f"augment: {counts['rows']} rows -> {counts['written']} rows in {args.output} "
          f"({seconds:.1f} s, {counts['rows'] / max(seconds, 1e-9):.1f} input rows/s)")
    return 0


def run_distill(args: argparse.Namespace) -> int:
    import json

    from ms_nlp_compress.compress.distill.run import run_general, run_task
    from ms_nlp_compress.config import load_config

    config = load_config(args.config, args.overrides)
    run = run_general if args.distill_command == "general" else run_task
    report = run(config, resume=not args.no_resume)
    print(json.dumps(report, indent=2))
    return 0


def add_distill_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill", help="TinyBERT distillation: general (corpus, backbone teacher) or task (fine-tuned teacher)",
        description="TinyBERT distillation into a smaller student (the `distill:` config section).")
    stages = parser.add_subparsers(dest="distill_command", required=True)
    helps = {
        "general": ("general distillation: a pre-trained backbone (distill.teacher or pretrained) teaches a student "
                    "on distill.corpus (one sentence per line), intermediate layers only; writes "
                    "<output_dir>/student"),
        "task": ("task distillation: a fine-tuned classifier (distill.teacher) teaches a student, stage 1 "
                 "intermediate layers (on distill.augmented_train when given), stage 2 predictions with best-dev "
                 "selection; writes <output_dir>/best and results.json"),
    }
    for name, text in helps.items():
        command = stages.add_parser(name, help=text, description=text)
        command.add_argument("--config", required=True)
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        command.add_argument("--no-resume", action="store_true", help="ignore checkpoints in output_dir")
        command.set_defaults(func=run_distill)


def add_parser(subparsers) -> None:
    add_distill_parser(subparsers)
    parser = subparsers.add_parser(
        "augment", help="TinyBERT data augmentation (MLM and word-vector routes)",
        description="Replace words by masked-LM candidates (single-piece words, when --model is a NezhaForMaskedLM "
                    "directory) or by their nearest word vectors, N samples per text, originals kept, duplicates "
                    "removed, seeded. TSV: each text column is augmented with the other columns original.")
    parser.add_argument("--model", required=True, help="model directory or HF folder: tokenizer, MLM head, vectors")
    parser.add_argument("--input", default=None, help="a headed TSV (train.tsv) or, with --lines, a text file")
    parser.add_argument("--train-of", default=None, metavar="CONFIG",
                        help="instead of --input: the training split CONFIG trains on (data.train_limit applied), "
                             "written to <output stem>.source.tsv first")
    parser.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --train-of: config overrides")
    parser.add_argument("--output", required=True, help="where to write (train_aug.tsv)")
    parser.add_argument("--vectors", default="model",
                        help="model: DIR's word-embedding table (default); none; or a GloVe-format text file")
    parser.add_argument("--no-mlm", action="store_true", help="never use the MLM route")
    parser.add_argument("--columns", default=None, help="comma-separated text columns (default: the GLUE names)")
    parser.add_argument("--lines", action="store_true", help="input is one sentence per line")
    defaults = AugmentConfig()
    parser.add_argument("--candidates", type=int, default=defaults.candidates, help="K (reference M = 15)")
    parser.add_argument("--replace-prob", type=float, default=defaults.replace_prob, help="p (reference 0.4)")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="N rounds per text (SST-2: 20)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="masked sentences per MLM forward / neighbour queries per matrix product")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--max-vectors", type=int, default=defaults.max_vectors)
    parser.add_argument("--device", default="cpu", choices=("cpu", "ascend", "gpu"))
    parser.add_argument("--mode", default="graph", choices=("graph", "pynative"))
    parser.add_argument("--threads", type=int, default=None, help="CPU op threads")
    parser.set_defaults(func=run_augment)
