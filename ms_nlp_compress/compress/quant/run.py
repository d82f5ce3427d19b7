"""`msnc quantize`: TernaryBERT / 8-bit as one command, from a fine-tuned classifier to a packed, exported model.

    run_quantize(config)        prepare -> distillation-aware QAT -> best-dev convert -> export + reload check -> sizes
    run_ptq(config)             prepare -> convert (no training: the baseline QAT is measured against) -> same tail

Layout of `output_dir` (each finished stage leaves a marker and is skipped on a rerun):
    qat/                 the Trainer run (checkpoints/, metrics.jsonl; kill -9 resumes exactly); stage.json when done
    qat/best_fake_quant.safetensors   the best-dev student's latent float weights (+ LAT preconditioners): the
                         fake-quant model the export is checked against
    best/                the best-dev student CONVERTED: integer codes + float scales (a Quantized* model directory)
    model.mindir         `best/` exported; integers stay integers in the file and are unpacked in the graph
    export.json          the reload check (max |diff| per input shape) and the size report; written last
    results.json         dev / test of `best/` as loaded from disk, sizes and ratios vs the fp32 teacher

Training (TernaryBERT, Zhang et al. 2020): the teacher is the fine-tuned full-precision classifier
(`distill.teacher`), the student a copy of it prepared with `quant:` (same Parameter names, fake-quant weights and
activations). Loss = the Distiller's terms with `distill.*_weight` (TernaryBERT: embedding-output + hidden MSE,
attention-score MSE, soft cross-entropy on the logits), identity layer mapping and no projection (same shape). LAT
groups get their preconditioner refreshed from Adam's second moment after each applied update (`after_update`).
The best dev student is converted and written when the dev metric improves, so `best/` is exactly the selected model.

Why the export check uses the fake-quant model rebuilt from `best_fake_quant.safetensors` rather than the converted
model itself: comparing the file with the cell it was exported from would only test MindSpore's serializer; the
fake-quant model is the independent reference (float latent weights quantized on the fly by the STE cells).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ms_nlp_compress.atomic import write_text_atomic
from ms_nlp_compress.config import ExperimentConfig
from ms_nlp_compress.errors import CheckpointError, ConfigError

QAT_DIR = "qat"
BEST_DIR = "best"
STAGE_DONE = "stage.json"
FAKE_QUANT_FILE = "best_fake_quant.safetensors"
MINDIR_STEM = "model"
EXPORT_DONE = "export.json"
FP32_MINDIR_STEM = "fp32_reference"  # the teacher exported once per output_dir: the ratio's denominator
# Reload check tolerance on logits. The file and the fake-quant cell compute the same integers; what used to differ
# was the STE's forward value `x + (q - x)`, one rounding away from q where q > 2x (TWN weights just above the
# threshold), which moved activations across 8-bit rounding boundaries: the QAT 2-2-8 MiniLM measured 2.84e-3 after
# 20 updates and 8.9e-3 after 374. ste.straight_through now returns q bit for bit (max |diff| 0 on that model);
# the tolerance stays as room for a backend that orders a reduction differently (one 8-bit step ~1e-4..1e-3).
EXPORT_ATOL = 5e-3
# Real dev rows at three (batch, length) shapes: batch 1, an odd batch, the longest rows.
VERIFY_SHAPES = ((1, 16), (5, 33), (8, 64))


# ----------------------------------------------------------------------------------------------------------------
# Pieces shared by QAT and PTQ
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    config: ExperimentConfig
    output_dir: Path
    rank: int
    world_size: int
    task: object
    teacher_dir: Path
    teacher: object  # the fine-tuned classifier with hidden states and attention scores out
    teacher_config: object
    teacher_weights: Dict[str, np.ndarray]
    tokenizer: object
    train_examples: list
    dev_columns: Dict[str, np.ndarray]
    meta: Dict


def _start(config: ExperimentConfig, log) -> Context:
    from ms_nlp_compress.compress.distill.run import _tokenizer_dir, load_task_teacher, teacher_path
    from ms_nlp_compress.data.glue import get_task
    from ms_nlp_compress.train.finetune import encode, load_tokenizer_for, read_split
    from ms_nlp_compress.train.trainer import start_run

    config.quant.validate("quant")
    teacher_dir = teacher_path(config)
    task = get_task(config.data.task)
    if task.is_regression:
        raise ConfigError(f"data.task: {task.name} is a regression task; msnc quantize evaluates classifiers")
    rank, world_size, output_dir = start_run(config)
    teacher, teacher_config, teacher_weights = load_task_teacher(config, teacher_dir, task)
    tokenizer = load_tokenizer_for(config, teacher_dir)
    _, train_examples = read_split(config, "train")
    _, dev_examples = read_split(config, "dev")
    dev_columns = encode(dev_examples, tokenizer, config.data.max_length, False)
    log(f"{task.name}: {len(train_examples)} train / {len(dev_examples)} dev examples; teacher {teacher_dir} "
        f"({teacher_config.num_layers} layers x {teacher_config.hidden_size})")
    meta = {"task": task.name, "labels": list(task.labels) if task.labels else None,
            "max_length": config.data.max_length, "quantized_from": str(teacher_dir)}
    context = Context(config, output_dir, rank, world_size, task, teacher_dir, teacher, teacher_config,
                      teacher_weights, tokenizer, train_examples, dev_columns, meta)
    context.meta["tokenizer_dir"] = str(_tokenizer_dir(tokenizer) or "")
    return context


def _classifier(context: Context, with_outputs: bool):
    """A float copy of the teacher (its weights loaded); `with_outputs`: hidden states + attention scores too."""
    from ms_nlp_compress.compress.distill.student import make_student_cell
    from ms_nlp_compress.models.checkpoint import load_weights

    model = make_student_cell(context.teacher_config, context.task.num_labels, with_outputs, with_outputs)
    load_weights(model, context.teacher_weights, source=str(context.teacher_dir), fresh=())
    return model


def _save_best(context: Context, deployed, extra_meta: Dict) -> Path:
    from ms_nlp_compress.models.checkpoint import save_model_dir

    tokenizer_dir = context.meta.get("tokenizer_dir") or None
    meta = {key: value for key, value in context.meta.items() if key != "tokenizer_dir"}
    return save_model_dir(deployed, context.output_dir / BEST_DIR, context.teacher_config,
                          tokenizer_dir=tokenizer_dir, meta=dict(meta, **extra_meta))


def verify_inputs(columns: Dict[str, np.ndarray], shapes: Sequence[Tuple[int, int]] = VERIFY_SHAPES):
    """(ids, mask, types) batches of real rows at the given (batch, length) shapes; the longest rows are used so
    the shorter shapes still see real tokens (cut at the length, the [SEP] may be lost: fine for a numeric check)."""
    order = np.argsort(-columns["attention_mask"].sum(1), kind="stable")
    batches = []
    for batch, length in shapes:
        length = min(length, columns["input_ids"].shape[1])
        rows = order[:batch]
        batches.append(tuple(np.ascontiguousarray(columns[name][rows, :length]).astype(np.int32)
                             for name in ("input_ids", "attention_mask", "token_type_ids")))
    return batches


def _size_entry(report, baseline) -> Dict:
    return {"file": str(report.path), "file_bytes": report.file_bytes, "fp32_file_bytes": baseline.file_bytes,
            "ratio_to_fp32": round(baseline.file_bytes / report.file_bytes, 3), "groups": dict(report.groups),
            "fp32_groups": dict(baseline.groups)}


def export_and_check(context: Context, deployed, fake_quant, log, atol: float = EXPORT_ATOL) -> Dict:
    """Export `deployed` to MindIR, reload it and compare with the fake-quant model on real dev rows (ExportError
    above `atol`), then the byte-exact size report of the model directory and the MindIR against the fp32 teacher.
    Writes export.json last; an existing export.json means this stage finished and is returned as is."""
    from ms_nlp_compress.compress.quant.size import mindir_report, safetensors_report
    from ms_nlp_compress.export.mindir import export_mindir, inference_wrapper, mindir_path, verify_mindir

    done = context.output_dir / EXPORT_DONE
    if done.is_file():
        log(f"export: finished earlier ({done}), skipped")
        return dict(json.loads(done.read_text(encoding="utf-8")), skipped=True)
    graph = context.config.quant.export_graph
    if graph == "shared":
        from ms_nlp_compress.compress.quant.convert import share_graph_functions

        share_graph_functions(deployed)  # same values; each packed cell's ops stored once in the file
    path = export_mindir(inference_wrapper(deployed, "classifier"), context.output_dir / MINDIR_STEM)
    inputs = verify_inputs(context.dev_columns)
    check = verify_mindir(path, inference_wrapper(fake_quant, "classifier"), inputs, atol=atol)
    log(f"export: {path} ({path.stat().st_size:,} bytes) reloaded == fake-quant model, max |diff| "
        f"{check.worst:.3g} <= {atol:g} on shapes {[tuple(batch[0].shape) for batch in inputs]}")
    fp32_path = mindir_path(context.output_dir / FP32_MINDIR_STEM)
    if not fp32_path.is_file():
        from ms_nlp_compress.models.nezha import NezhaForSequenceClassification

        teacher = NezhaForSequenceClassification(context.teacher_config, context.task.num_labels)
        from ms_nlp_compress.models.checkpoint import load_weights

        load_weights(teacher, context.teacher_weights, source=str(context.teacher_dir), fresh=())
        fp32_path = export_mindir(inference_wrapper(teacher, "classifier"), context.output_dir / FP32_MINDIR_STEM)
    from ms_nlp_compress.models.checkpoint import directory_bytes

    best = context.output_dir / BEST_DIR
    directory = safetensors_report(best)
    fp32_directory = safetensors_report(context.teacher_dir)
    mindir, fp32_mindir = mindir_report(path), mindir_report(fp32_path)
    for report in (directory, fp32_directory, mindir, fp32_mindir):
        if sum(report.groups.values()) != report.file_bytes:  # the accounting must cover every byte
            raise CheckpointError(f"{report.path}: size groups sum to {sum(report.groups.values())} bytes, the "
                                  f"file has {report.file_bytes}")
    log("model directory (model.safetensors) vs fp32 teacher:\n  " + "\n  ".join(directory.table(fp32_directory)))
    log("MindIR vs fp32 teacher MindIR:\n  " + "\n  ".join(mindir.table(fp32_mindir)))
    result = {"mindir": str(path), "graph": graph, "verify": {"atol": atol, "max_abs_difference": check.worst,
                                              "per_shape": {f"{b}x{l}": d for (b, l), d in
                                                            check.max_differences.items()}},
              "size": {"model_dir_weights": _size_entry(directory, fp32_directory),
                       "model_dir_total_bytes": directory_bytes(best),
                       "fp32_model_dir_total_bytes": directory_bytes(context.teacher_dir),
                       "mindir": _size_entry(mindir, fp32_mindir)}}
    if context.rank == 0:
        write_text_atomic(done, json.dumps(result, indent=2))
    return result


def _final_report(context: Context, kind: str, stages: Dict, export: Dict, log) -> Dict:
    """dev / test of the converted model AS LOADED FROM `best/` (codes validated on load), plus the export."""
    from ms_nlp_compress.models.checkpoint import load_model_dir
    from ms_nlp_compress.train.finetune import evaluate_classifier, evaluate_test_split

    import ms_nlp_compress.compress.quant.convert  # noqa: F401  registers the Quantized* architectures

    config = context.config
    deployed, document = load_model_dir(context.output_dir / BEST_DIR)
    report = {"kind": kind, "task": context.task.name, "teacher": str(context.teacher_dir),
              "quant": config.quant.to_dict(), "stages": stages, "best_dir": str(context.output_dir / BEST_DIR),
              "architecture": document.get("architecture"),
              "dev": evaluate_classifier(deployed, context.dev_columns, context.task, config.data.eval_batch_size),
              "splits": {"train": len(context.train_examples), "dev": len(context.dev_columns["input_ids"])},
              "export": export}
    test = evaluate_test_split(config, deployed, context.tokenizer, context.task)
    if test is not None:
        report["test"], report["splits"]["test"] = test
    log(f"{kind}: dev {report['dev']}" + (f", test {report['test']}" if test is not None else "")
        + f"; MindIR {export['size']['mindir']['ratio_to_fp32']}x smaller than fp32, model.safetensors "
          f"{export['size']['model_dir_weights']['ratio_to_fp32']}x")
    if context.rank == 0:
        write_text_atomic(context.output_dir / "results.json", json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------------------------------------------
# Post-training quantization
# ----------------------------------------------------------------------------------------------------------------


def run_ptq(config: ExperimentConfig, log=print, atol: float = EXPORT_ATOL) -> Dict:
    """The no-training baseline: the teacher quantized with `quant:` as is, converted, exported, measured."""
    from ms_nlp_compress.compress.quant.ptq import post_training_quantize

    context = _start(config, log)
    fake_quant, deployed = post_training_quantize(_classifier(context, False), config.quant)
    if context.rank == 0:
        stale = context.output_dir / EXPORT_DONE  # PTQ takes seconds: always rebuilt, never resumed
        if stale.is_file():
            os.remove(stale)
        _save_best(context, deployed, {"quantization": "post-training (no training)"})
    export = export_and_check(context, deployed, fake_quant, log, atol)
    return _final_report(context, "ptq", {}, export, log)


# ----------------------------------------------------------------------------------------------------------------
# Quantization-aware training with distillation
# ----------------------------------------------------------------------------------------------------------------


def _train(context: Context, resume: bool, log) -> Dict:
    """The QAT stage as a Trainer run in `output_dir/qat`; on each dev improvement the student is converted into
    `best/` and its latent weights written to `qat/best_fake_quant.safetensors`."""
    from ms_nlp_compress.compress.distill.distiller import HiddenProjection, prepare as prepare_distiller
    from ms_nlp_compress.compress.distill.mapping import uniform_mapping
    from ms_nlp_compress.compress.distill.run import final_losses
    from ms_nlp_compress.compress.quant.convert import convert
    from ms_nlp_compress.compress.quant.lat import LatRefresh
    from ms_nlp_compress.compress.quant.prepare import prepare
    from ms_nlp_compress.data.streaming import batch_source_from_config
    from ms_nlp_compress.models.checkpoint import cell_weights, write_safetensors
    from ms_nlp_compress.train.finetune import encode, evaluate_classifier, selection_metric
    from ms_nlp_compress.train.trainer import Trainer

    config, qat_dir = context.config, context.output_dir / QAT_DIR
    layers, width = context.teacher_config.num_layers, context.teacher_config.hidden_size
    student = prepare(_classifier(context, True), config.quant)
    # TernaryBERT: student layer i <- teacher layer i, no projection (same shape); distill.projection and the
    # student keys of the distill: section are not used here.
    mapping = uniform_mapping(layers, layers)
    projection = HiddenProjection("none", width, width, len(mapping.hidden_pairs()))
    distiller = prepare_distiller(context.teacher, student, config.distill, context.teacher_config,
                                  context.teacher_config, mapping=mapping, projection=projection)
    order = ("input_ids", "attention_mask", "token_type_ids") + (("label",) if distiller.use_hard_label else ())
    train_columns = encode(context.train_examples, context.tokenizer, config.data.max_length, False)
    batches = batch_source_from_config(config, train_columns, order, context.rank, context.world_size, qat_dir,
                                       tokenizer=context.tokenizer, log=log)
    metric = selection_metric(context.task)

    def on_best(metrics, update):
        # latent weights first: a crash between the two writes leaves a fake-quant file NEWER than best/, which
        # the update numbers in both expose (checked before export)
        write_safetensors(cell_weights(student), qat_dir / FAKE_QUANT_FILE, metadata={"update": str(update)})
        _save_best(context, convert(student), {"quantization": "QAT + distillation (best dev)",
                                               "dev_metrics": metrics, "update": update})

    refresh: List[LatRefresh] = []
    trainer = Trainer(config, student, distiller, batches, qat_dir,
                      evaluate=lambda: evaluate_classifier(student, context.dev_columns, context.task,
                                                           config.data.eval_batch_size),
                      metric=metric, on_best=on_best, rank=context.rank, world_size=context.world_size, log=log,
                      checkpoint_cells=(student,),
                      after_update=(lambda: refresh[0].refresh()) if config.quant.uses_lat() else None)
    if config.quant.uses_lat():
        # matched to Adam's second moments by Parameter object; written after every applied update
        refresh.append(LatRefresh(student, trainer.optimizer, config.quant.lat_epsilon))
    log(f"quantize: {', '.join(sorted(_recipe(config.quant)))}; terms {', '.join(distiller.component_names)}; "
        f"{trainer.updates_total} updates ({len(batches)} batches/epoch, batch {config.data.batch_size} x "
        f"{context.world_size} rank(s), lr {config.train.learning_rate:g})")
    result = trainer.fit(resume=resume)
    return {"updates": result.updates, "train_seconds": result.seconds, "resumed_from": result.resumed_from,
            "terms": list(distiller.component_names), "best_update": result.best_step,
            "best_metric": result.best_metric, "metric": metric,
            "final_losses": final_losses(qat_dir / "metrics.jsonl")}


def _recipe(quant) -> List[str]:
    from ms_nlp_compress.compress.quant.config import WEIGHT_GROUPS

    parts = [f"{group} {spec.method}/{spec.bits}b/{spec.granularity}" for group in WEIGHT_GROUPS
             for spec in [getattr(quant, group)] if spec.enabled]
    return parts + [f"activations {quant.activation.method}/{quant.activation.bits}b"]


def load_fake_quant(context: Context, update: Optional[int]):
    """The best-dev fake-quant student rebuilt from `qat/best_fake_quant.safetensors` (strict load)."""
    from ms_nlp_compress.compress.quant.prepare import prepare
    from ms_nlp_compress.models.checkpoint import load_weights, read_safetensors
    from safetensors import safe_open

    path = context.output_dir / QAT_DIR / FAKE_QUANT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the QAT stage writes it with best/ (rerun with --no-resume)")
    with safe_open(str(path), framework="numpy") as handle:
        saved_update = (handle.metadata() or {}).get("update")
    if update is not None and saved_update != str(update):
        raise CheckpointError(f"{path}: holds the student of update {saved_update}, but best/ is from update "
                              f"{update} (interrupted between the two writes); rerun with --no-resume")
    model = prepare(_classifier(context, False), context.config.quant)
    load_weights(model, read_safetensors(path), source=str(path), fresh=())
    model.set_train(False)
    return model


def run_quantize(config: ExperimentConfig, resume: bool = True, log=print, atol: float = EXPORT_ATOL) -> Dict:
    """QAT with distillation, best-dev selection, convert, export with reload check, size report (results.json)."""
    from ms_nlp_compress.models.checkpoint import load_model_dir, read_model_document

    import ms_nlp_compress.compress.quant.convert  # noqa: F401  registers the Quantized* architectures

    context = _start(config, log)
    stage_file = context.output_dir / QAT_DIR / STAGE_DONE
    if resume and stage_file.is_file():
        log(f"qat: finished earlier ({stage_file}), skipped")
        stages = {"qat": dict(json.loads(stage_file.read_text(encoding="utf-8")), skipped=True)}
    else:
        if not resume:
            for stale in (context.output_dir / EXPORT_DONE, stage_file):
                if stale.is_file():
                    os.remove(stale)
        stages = {"qat": _train(context, resume, log)}
        if context.rank == 0:
            write_text_atomic(stage_file, json.dumps(stages["qat"], indent=2))
    if context.rank != 0:
        return {"kind": "qat", "stages": stages}
    best = context.output_dir / BEST_DIR
    if not best.is_dir():
        raise CheckpointError(f"{best}: no best-dev student was written (did an evaluation run?)")
    update = read_model_document(best)[0].get("update")
    fake_quant = load_fake_quant(context, update)
    deployed, _ = load_model_dir(best)
    export = export_and_check(context, deployed, fake_quant, log, atol)
    return _final_report(context, "qat", stages, export, log)
