"""What the report says about each produced model, measured the same way for all of them on this machine:
dev / test metrics on the same splits, parameters, bytes on disk (model directory and MindIR), latency.

Each measurement is written to `<stage>/measure/<label>.json` with a fingerprint of the model files and the measure
settings, so an unchanged model is not measured twice and the report is rebuilt from these files alone.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Dict, Optional


from ms_nlp_compress.atomic import write_text_atomic
from ms_nlp_compress.config import config_to_dict
from ms_nlp_compress.pipeline.config import MeasureConfig

Log = Callable[[str], None]


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model directory's files (names and contents): what a downstream stage and a measurement
    were made from."""
    from ms_nlp_compress.data.fetch import sha256_of

    digest = hashlib.sha256()
    for item in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(model_dir)).encode())
        digest.update(sha256_of(item).encode())
    return digest.hexdigest()


def measure_model(label: str, model_dir: Path, eval_config, measure: MeasureConfig, out_dir: Path,
                  log: Log = print) -> Dict:
    """Measure one model directory (see the module docstring); returns and writes the record."""
    from ms_nlp_compress.bench.latency import forward_latency_ms
    from ms_nlp_compress.compress.distill.run import parameter_count
    from ms_nlp_compress.models.checkpoint import directory_bytes
    from ms_nlp_compress.train.finetune import encode, evaluate_classifier, evaluate_test_split, load_for_inference
    from ms_nlp_compress.train.finetune import read_split

    model_dir = Path(model_dir)
    record_path = out_dir / f"{label}.json"
    fingerprint = model_fingerprint(model_dir)
    settings = {"measure": config_to_dict(measure),
                "data": {key: getattr(eval_config.data, key) for key in
                         ("task", "data_dir", "eval_limit", "max_length")}}
    if record_path.is_file():
        previous = json.loads(record_path.read_text(encoding="utf-8"))
        if previous.get("fingerprint") == fingerprint and previous.get("settings") == settings:
            log(f"  {label}: measured before (same model files and settings): {record_path}")
            return previous

    model, document, tokenizer = load_for_inference(model_dir)
    config = getattr(model, "bert", model).config
    record = {"label": label, "model_dir": str(model_dir), "fingerprint": fingerprint, "settings": settings,
              "architecture": document.get("architecture", type(model).__name__),
              "parameters": parameter_count(model), "model_dir_bytes": directory_bytes(model_dir),
              "shape": {"layers": config.num_layers, "hidden": config.hidden_size, "heads": config.num_heads,
                        "intermediate": config.intermediate_size},
              "compression": {key: document[key] for key in ("quant", "dynabert", "distill") if key in document}}
    if measure.evaluate:
        started = time.perf_counter()
        task, dev_examples = read_split(eval_config, "dev")
        columns = encode(dev_examples, tokenizer, eval_config.data.max_length, task.is_regression)
        record["dev"] = evaluate_classifier(model, columns, task, eval_config.data.eval_batch_size)
        test = evaluate_test_split(eval_config, model, tokenizer, task)
        if test is not None:
            record["test"] = test[0]
        record["eval_seconds"] = round(time.perf_counter() - started, 1)
        log(f"  {label}: dev {record['dev']}  test {record.get('test')}")
    latency = {}
    for batch_size in measure.batch_sizes:
        latency[str(batch_size)] = round(forward_latency_ms(model, batch_size, measure.sequence_length,
                                                            config.vocab_size, measure.repeat), 3)
    record["latency_ms"] = latency
    record["latency_shape"] = {"sequence_length": measure.sequence_length, "repeat": measure.repeat}
    log(f"  {label}: latency (ms, sequence {measure.sequence_length}) "
        + ", ".join(f"batch {size}: {value:.1f}" for size, value in latency.items()))
    if measure.export:
        from ms_nlp_compress.export.commands import export_model

        export_dir = out_dir / f"{label}_mindir"
        export_dir.mkdir(parents=True, exist_ok=True)
        summary = export_model(model_dir, export_dir / label, kind="classifier", log=lambda message: None)
        record["mindir"] = {"path": str(summary.mindir), "bytes": summary.file_bytes,
                            "max_abs_difference": {str(k): float(v) for k, v in
                                                   (summary.verify.max_differences.items()
                                                    if summary.verify else [])}}
        log(f"  {label}: MindIR {summary.file_bytes / 1e6:.2f} MB, reload checked")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record_path, json.dumps(record, indent=2))
    return record
