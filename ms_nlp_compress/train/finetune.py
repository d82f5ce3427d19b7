"""Fine-tuning, evaluation and prediction for sentence(-pair) classification and regression tasks.

Paths in configs may start with `cache:` to name the demo cache (`cache:minilm`, `cache:vader/sst2`), so one config
works on every machine whatever its cache location.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from mindspore import Tensor, nn

from ms_nlp_compress import paths
from ms_nlp_compress.atomic import write_text_atomic
from ms_nlp_compress.config import ExperimentConfig, NezhaConfig
from ms_nlp_compress.errors import ConfigError, DataError, MsncError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def resolve_path(value: Optional[str]) -> Optional[Path]:
    if value is None:
        return None
    if value.startswith("cache:"):
        return paths.cache_dir() / value[len("cache:"):]
    return Path(value)


def load_tokenizer_for(config: ExperimentConfig, model_dir: Optional[Path]):
    from ms_nlp_compress.data.tokenization import load_tokenizer

    vocab = resolve_path(config.data.vocab)
    if vocab is None and model_dir is not None:
        for name in ("vocab.txt", "spm.model"):
            if (model_dir / name).is_file():
                vocab = model_dir / name
                break
    if vocab is None:
        raise ConfigError("data.vocab: no vocabulary given and the pretrained model has no vocab.txt / spm.model")
    lowercase = config.data.lowercase if vocab.suffix == ".model" else None
    return load_tokenizer(vocab, lowercase=lowercase, max_length=config.data.max_length)


def subsample(examples, limit: int, seed: int):
    """A seeded random subset in the original order (quick presets); all examples when limit is 0."""
    if limit <= 0 or len(examples) <= limit:
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), limit, replace=False))
    return [examples[i] for i in keep]


def read_split(config: ExperimentConfig, split: str):
    """(task, examples) of a split, subsampled per `data.train_limit` / `data.eval_limit`."""
    from ms_nlp_compress.data.glue import get_task

    task = get_task(config.data.task)
    data_dir = resolve_path(config.data.data_dir)
    if data_dir is None:
        raise ConfigError("data.data_dir: not set")
    names = {"train": ("train.tsv",), "dev": task.dev_files, "test": ("test.tsv",)}[split]
    path = data_dir / names[0]
    if not path.is_file():
        raise DataError(f"{path}: {split} file not found for task {task.name}")
    examples = task.reader(path, skip_malformed=config.data.skip_malformed)
    limit = config.data.train_limit if split == "train" else config.data.eval_limit
    return task, subsample(examples, limit, config.runtime.seed + len(split))


def encode(examples, tokenizer, max_length: int, regression: bool) -> Dict[str, np.ndarray]:
    from ms_nlp_compress.data.mindrecord import encode_examples

    columns = encode_examples(examples, tokenizer, max_length, is_regression=regression)
    return {name: columns[name] for name in MODEL_INPUTS + ("label",)}


# NezhaConfig keys that say how a model runs, not what it is: a checkpoint's config does not decide them.
RUN_TIME_MODEL_KEYS = ("hidden_dropout", "attention_dropout", "dropout_impl", "kernels", "initializer_range")


def model_config_for(config: ExperimentConfig, pretrained: Optional[Path]) -> NezhaConfig:
    """The model config of a run that starts from `pretrained`.

    Architecture keys come from the checkpoint; a value written in the config file itself or with --set that
    contradicts it is an error naming the key (silently building another shape, or silently ignoring the user, are
    both wrong); values inherited from a preset through `base:` are defaults and yield to the checkpoint. Run-time
    keys (dropout rates, dropout implementation, kernels) come from the user's config when written anywhere in
    it, else from the checkpoint's config (its dropout rates) or our defaults.
    """
    import dataclasses

    from ms_nlp_compress.config import config_source, given_keys
    from ms_nlp_compress.models.checkpoint import pretrained_config

    if pretrained is None:
        return config.model
    model_config = pretrained_config(pretrained)
    given, own = given_keys(config), given_keys(config, inherited=False)
    for field in dataclasses.fields(NezhaConfig):
        name, key = field.name, f"model.{field.name}"
        user_value, saved_value = getattr(config.model, name), getattr(model_config, name)
        if name in RUN_TIME_MODEL_KEYS:
            if given is None or key in given:
                setattr(model_config, name, user_value)
        elif own is not None and key in own and user_value != saved_value:
            raise ConfigError(f"{config_source(config)}: {key} is {user_value!r} but the checkpoint {pretrained} "
                              f"has {saved_value!r}: architecture keys come from the checkpoint; remove {key} "
                              f"from the config or use --set {key}={saved_value}")
    model_config.validate()
    return model_config


def build_classifier(config: ExperimentConfig, num_labels: int):
    """The task model, its backbone initialised from `config.pretrained` (a model dir or a HF folder) if set."""
    from ms_nlp_compress.models.checkpoint import load_pretrained, saved_architecture
    from ms_nlp_compress.models.nezha import NezhaForSequenceClassification

    pretrained = resolve_path(config.pretrained)
    model_config = model_config_for(config, pretrained)
    model = NezhaForSequenceClassification(model_config, num_labels)
    if pretrained is not None:
        if saved_architecture(pretrained) == type(model).__name__:
            load_pretrained(model, pretrained)  # continue from a fine-tuned model: heads included
        else:
            load_pretrained(model.bert, pretrained)  # a backbone: the classifier starts fresh
    return model, model_config, pretrained


def predict_logits(model: nn.Cell, columns: Dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Logits for every row (the last partial batch included), each batch trimmed to its longest row."""
    from ms_nlp_compress.inference import declare_dynamic_inputs

    model.set_train(False)
    declare_dynamic_inputs(model)
    outputs = []
    size = len(columns["input_ids"])
    for start in range(0, size, batch_size):
        stop = min(start + batch_size, size)
        length = max(int(columns["attention_mask"][start:stop].sum(1).max()), 1)
        inputs = [Tensor(np.ascontiguousarray(columns[name][start:stop, :length])) for name in MODEL_INPUTS]
        outputs.append(model(*inputs)[0].asnumpy())
    return np.concatenate(outputs)


def evaluate_classifier(model: nn.Cell, columns: Dict[str, np.ndarray], task, batch_size: int) -> Dict[str, float]:
    from ms_nlp_compress.train.metrics import compute_metrics

    logits = predict_logits(model, columns, batch_size)
    labels = columns["label"]
    keep = ~np.isnan(labels) if task.is_regression else labels >= 0
    predictions = logits[:, 0] if task.is_regression else logits.argmax(-1)
    metrics = compute_metrics(task.name, predictions[keep], labels[keep])
    return {key: float(value) for key, value in metrics.items()}


def evaluate_test_split(config: ExperimentConfig, model: nn.Cell, tokenizer, task):
    """(metrics, number of examples) of `model` on the task's labelled test.tsv, or None when there is none."""
    data_dir = resolve_path(config.data.data_dir)
    if data_dir is None or not (data_dir / "test.tsv").is_file():
        return None
    _, examples = read_split(config, "test")
    if not examples or examples[0].label is None:
        return None
    columns = encode(examples, tokenizer, config.data.max_length, task.is_regression)
    return evaluate_classifier(model, columns, task, config.data.eval_batch_size), len(examples)


def selection_metric(task) -> str:
    return {"accuracy": "acc", "accuracy_and_f1": "acc_and_f1", "matthews_corrcoef": "mcc",
            "pearson_and_spearman": "corr"}.get(task.metric, "acc")


def training_batches(config: ExperimentConfig, task, tokenizer, rank: int, world_size: int, output_dir: Path,
                     log=print, train_file: Optional[Path] = None):
    """This rank's training BatchSource for `task`, per `data.stream`.

    A subsample (`data.train_limit`) or `stream: memory` tokenizes into RAM (`ArrayBatches`); otherwise the TSV
    itself goes to `data/streaming.py`, which keeps it in RAM when small (`auto`) and else streams tokenized shards
    from disk with exact resume (built once per file content and settings, shared by the ranks of a host).
    """
    from ms_nlp_compress.data.streaming import batch_source_from_config

    order = MODEL_INPUTS + ("label",)
    if train_file is None and (config.data.train_limit or config.data.stream == "memory"):
        _, examples = read_split(config, "train")
        source = encode(examples, tokenizer, config.data.max_length, task.is_regression)
    else:
        source = train_file if train_file is not None else resolve_path(config.data.data_dir) / "train.tsv"
        if not Path(source).is_file():
            raise DataError(f"{source}: train file not found for task {task.name}")
    return batch_source_from_config(config, source, order, rank, world_size, output_dir, tokenizer=tokenizer,
                                    task=task.name, log=log)


def run_finetune(config: ExperimentConfig, resume: bool = True, log=print) -> Dict:
    """Fine-tune, keep the best dev model in `output_dir/best`, report dev and test metrics of that model."""
    from ms_nlp_compress.models.checkpoint import load_model_dir, save_model_dir
    from ms_nlp_compress.train.losses import SequenceClassificationLoss
    from ms_nlp_compress.train.trainer import Trainer, start_run

    rank, world_size, output_dir = start_run(config)
    task, dev_examples = read_split(config, "dev")
    model, model_config, pretrained = build_classifier(config, task.num_labels)
    tokenizer = load_tokenizer_for(config, pretrained)
    started = time.perf_counter()
    batches = training_batches(config, task, tokenizer, rank, world_size, output_dir, log)
    dev_columns = encode(dev_examples, tokenizer, config.data.max_length, task.is_regression)
    log(f"{task.name}: {batches.size} train / {len(dev_examples)} dev examples ({type(batches).__name__}), "
        f"tokenized in {time.perf_counter() - started:.1f} s")
    metric = selection_metric(task)
    best_dir = output_dir / "best"
    tokenizer_dir = Path(tokenizer.vocab_path).parent if getattr(tokenizer, "vocab_path", None) else None

    def on_best(metrics, update):
        save_model_dir(model, best_dir, model_config, tokenizer_dir=tokenizer_dir,
                       meta={"task": task.name, "labels": list(task.labels) if task.labels else None,
                             "max_length": config.data.max_length, "dev_metrics": metrics, "update": update})

    trainer = Trainer(config, model, SequenceClassificationLoss(model), batches, output_dir,
                      evaluate=lambda: evaluate_classifier(model, dev_columns, task, config.data.eval_batch_size),
                      metric=metric, on_best=on_best, rank=rank, world_size=world_size, log=log)
    log(f"training {trainer.updates_total} updates ({len(batches)} batches/epoch, batch {config.data.batch_size} "
        f"x {world_size} rank(s), accumulation {config.train.gradient_accumulation})")
    result = trainer.fit(resume=resume)
    report = {"task": task.name, "updates": result.updates, "train_seconds": result.seconds,
              "best_update": result.best_step, "metric": metric, "dev": result.last_eval,
              "skipped_updates": result.skipped_updates, "resumed_from": result.resumed_from}
    if rank == 0 and best_dir.is_dir():
        best, _ = load_model_dir(best_dir)
        report["best_dev"] = evaluate_classifier(best, dev_columns, task, config.data.eval_batch_size)
        test = evaluate_test_split(config, best, tokenizer, task)
        if test is not None:
            report["test"] = test[0]
        write_text_atomic(output_dir / "results.json", json.dumps(report, indent=2))
    return report


def load_for_inference(model_dir: Path):
    from ms_nlp_compress.data.tokenization import load_tokenizer
    from ms_nlp_compress.models.checkpoint import load_model_dir

    model, document = load_model_dir(model_dir)
    vocab = next((model_dir / n for n in ("vocab.txt", "spm.model") if (model_dir / n).is_file()), None)
    if vocab is None:
        raise MsncError(f"{model_dir}: no vocab.txt or spm.model saved with the model")
    tokenizer = load_tokenizer(vocab, max_length=document.get("max_length", 128))
    return model, document, tokenizer


def run_eval(model_dir: Path, task_name: str, tsv: Path, batch_size: int = 64, skip_malformed: bool = False) -> Dict:
    from ms_nlp_compress.data.glue import get_task

    model, document, tokenizer = load_for_inference(model_dir)
    task = get_task(task_name or document.get("task", ""))
    examples = task.reader(tsv, skip_malformed=skip_malformed)
    columns = encode(examples, tokenizer, document.get("max_length", 128), task.is_regression)
    return evaluate_classifier(model, columns, task, batch_size)


def run_predict(model_dir: Path, lines: Sequence[str], batch_size: int = 64) -> List[str]:
    """One output line per input line: `label<TAB>probability` or the regression score.

    An input line is a text, or `text_a<TAB>text_b` for pair tasks.
    """
    from ms_nlp_compress.inference import run_batched

    model, document, tokenizer = load_for_inference(model_dir)
    texts, pairs = [], []
    for number, line in enumerate(lines, 1):
        fields = line.rstrip("\n").split("\t")
        if len(fields) > 2:
            raise DataError(f"input line {number}: expected text or text_a<TAB>text_b, got {len(fields)} fields")
        texts.append(fields[0])
        pairs.append(fields[1] if len(fields) == 2 else None)
    logits = run_batched(model, tokenizer, texts, pairs if any(p is not None for p in pairs) else None,
                         batch_size=batch_size, max_length=document.get("max_length", 128))
    labels = document.get("labels")
    if not labels:
        return [f"{row[0]:.6f}" for row in logits]
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities = shifted / shifted.sum(-1, keepdims=True)
    return [f"{labels[int(row.argmax())]}\t{row.max():.6f}" for row in probabilities]


def add_parsers(subparsers) -> None:
    from ms_nlp_compress.config import load_config

    parser = subparsers.add_parser("finetune", help="fine-tune a classifier / regressor on a GLUE-format task")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints in output_dir")

    def finetune(args):
        report = run_finetune(load_config(args.config, args.overrides), resume=not args.no_resume)
        print(json.dumps(report, indent=2))
        return 0

    parser.set_defaults(func=finetune)

    parser = subparsers.add_parser("eval", help="evaluate a saved model directory on a labelled TSV")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--task", default="")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-malformed", action="store_true")
    parser.set_defaults(func=lambda args: print(json.dumps(run_eval(
        args.model, args.task, args.input, args.batch_size, args.skip_malformed), indent=2)) or 0)

    parser = subparsers.add_parser("predict", help="label texts (one per line, or text_a<TAB>text_b) from a file "
                                                   "or stdin")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--input", default="-", help="a text file, or - for stdin")
    parser.add_argument("--batch-size", type=int, default=64)

    def predict(args):
        if args.input == "-":
            lines = sys.stdin.read().splitlines()
        else:
            path = Path(args.input)
            if not path.is_file():
                raise DataError(f"{path}: input file not found")
            lines = path.read_text(encoding="utf-8").splitlines()
        for line in run_predict(args.model, [line for line in lines if line.strip()], args.batch_size):
            print(line)
        return 0

    parser.set_defaults(func=predict)
