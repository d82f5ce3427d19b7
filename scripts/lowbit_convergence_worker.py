"""One rank of a convergence-study run (scripts/lowbit_convergence.py launches it with msrun, 2 ranks).

`msnc finetune`'s path (same config loading, start_run, data subset, batches, Trainer with the `comm:` section,
best-dev model, dev and test evaluation) with one difference: only the top `--train-top-layers` encoder layers, the
pooler and the classifier are trained; the embeddings and lower layers of the pretrained MiniLM stay frozen. The
low-bit exchange's cost grows with the number of trained entries (the full MiniLM's 22.7M took 14-78 s per 2-bit
update and 9 GB per rank on the loaded 2-core machine), so a top-2 fine-tune (3.7M trained entries) keeps the
pretrained features, learns in a few dozen updates, and leaves every variant affordable.

    msrun ... scripts/lowbit_convergence_worker.py --train-top-layers 2 --config X.yaml [--set k=v ...]
Writes output_dir/metrics.jsonl (the loss curve) and output_dir/results.json (rank 0), like `msnc finetune`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def trained_parameters(model, num_layers: int, top: int):
    """The classifier, pooler and the top `top` encoder layers' Parameters (names carry `layers.<i>.`)."""
    chosen = []
    for param in model.trainable_params():
        match = re.search(r"\blayers\.(\d+)\.", param.name)
        if match:
            if int(match.group(1)) >= num_layers - top:
                chosen.append(param)
        elif "embedding" not in param.name:
            chosen.append(param)  # pooler and classifier
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--train-top-layers", type=int, default=2)
    args = parser.parse_args()

    from ms_nlp_compress.atomic import write_text_atomic
    from ms_nlp_compress.config import load_config
    from ms_nlp_compress.models.checkpoint import load_model_dir, save_model_dir
    from ms_nlp_compress.train.finetune import (build_classifier, encode, evaluate_classifier, evaluate_test_split,
                                                load_tokenizer_for, read_split, selection_metric, training_batches)
    from ms_nlp_compress.train.losses import SequenceClassificationLoss
    from ms_nlp_compress.train.trainer import Trainer, start_run

    config = load_config(args.config, args.overrides)
    rank, world_size, output_dir = start_run(config)
    log = print if rank == 0 else (lambda message: None)
    task, dev_examples = read_split(config, "dev")
    model, model_config, pretrained = build_classifier(config, task.num_labels)
    tokenizer = load_tokenizer_for(config, pretrained)
    batches = training_batches(config, task, tokenizer, rank, world_size, output_dir, log)
    dev_columns = encode(dev_examples, tokenizer, config.data.max_length, task.is_regression)
    trainable = trained_parameters(model, model_config.num_layers, args.train_top_layers)
    entries = sum(int(p.size) for p in trainable)
    log(f"training {len(trainable)} tensors ({entries:,} entries) of {len(model.trainable_params())}")
    metric = selection_metric(task)
    best_dir = output_dir / "best"

    def on_best(metrics, update):
        save_model_dir(model, best_dir, model_config, meta={"task": task.name, "dev_metrics": metrics,
                                                            "update": update})

    trainer = Trainer(config, model, SequenceClassificationLoss(model), batches, output_dir, trainable=trainable,
                      evaluate=lambda: evaluate_classifier(model, dev_columns, task, config.data.eval_batch_size),
                      metric=metric, on_best=on_best, rank=rank, world_size=world_size, log=log)
    result = trainer.fit()
    report = {"task": task.name, "updates": result.updates, "train_seconds": result.seconds,
              "best_update": result.best_step, "metric": metric, "dev": result.last_eval,
              "skipped_updates": result.skipped_updates, "trained_entries": entries,
              "trained_tensors": len(trainable)}
    if rank == 0 and best_dir.is_dir():
        best, _ = load_model_dir(best_dir)
        report["best_dev"] = evaluate_classifier(best, dev_columns, task, config.data.eval_batch_size)
        test = evaluate_test_split(config, best, tokenizer, task)
        if test is not None:
            report["test"] = test[0]
        write_text_atomic(output_dir / "results.json", json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
