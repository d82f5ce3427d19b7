"""`msnc distill general` and `msnc distill task`: TinyBERT's two distillations as runs of the engine's Trainer.

General distillation (`run_general`): a pre-trained backbone teaches a student backbone on an unlabeled corpus (one
sentence per line, `distill.corpus`), with the intermediate terms only (embeddings, hidden states, attention
scores). The corpus is read through `data.streaming` (in memory or streamed from tokenized shards, `data.stream`),
every rank reads its slice of each global batch (`scripts/run_distributed.sh N distill general ...`), and the
Trainer's checkpoints in `output_dir/checkpoints` make a kill -9 resume exactly. The student is saved as an
ordinary model directory, `output_dir/student` (a `NezhaModel` without pooler): `distill.student_init: pretrained`
with `student_init_path` pointing there starts task distillation from it.

Task distillation (`run_task`): the teacher is a fine-tuned classifier model directory (`msnc finetune`'s
`best/`). Stage 1 (`intermediate`) fits the student's intermediate layers to the teacher's, stage 2 (`prediction`)
its logits to the teacher's soft labels, with dev evaluation every `eval_every` updates and the best dev student
kept in `output_dir/best`. Each stage is its own run in `output_dir/stage1_intermediate` / `stage2_prediction`
(checkpoints, metrics.jsonl), resumed on restart; a stage whose `stage.json` exists is finished and skipped. The
stage-1 student is saved as `stage1_intermediate/student` and stage 2 starts from those weights (read back from
memory or from that directory: the same numbers). `distill.augmented_train` (`msnc augment`'s TSV) replaces the
training split for the stages in `distill.augmented_stages` (both by default, as the reference code does);
`distill.intermediate_train` / `prediction_train` override `train:` keys per stage (the reference trains stage 1
longer, with a larger learning rate).

Why stage 2 trains a fresh student cell (loaded with the stage-1 weights) rather than the stage-1 cell: the stage-1
cell also outputs every hidden state and attention map for the intermediate losses; the stage-2 cell is the plain
classifier that is saved, evaluated, exported and served, so the model selected on dev is exactly the one written.
Its dropout counters start from 0 whether stage 1 ran in this process or was skipped, so a restart gives the same
stage-2 run.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from mindspore import nn

from ms_nlp_compress.atomic import write_text_atomic
from ms_nlp_compress.config import ExperimentConfig, NezhaConfig
from ms_nlp_compress.errors import ConfigError, DataError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
STAGE_DIRS = {"intermediate": "stage1_intermediate", "prediction": "stage2_prediction"}
STAGE_DONE = "stage.json"  # written last by a finished stage: its presence skips the stage on a rerun
STUDENT_DIR = "student"  # the model directory a general run / stage 1 writes
BEST_DIR = "best"  # the best-dev student of task distillation


# ----------------------------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------------------------


def _resolve(value: Optional[str]) -> Optional[Path]:
    from ms_nlp_compress.train.finetune import resolve_path

    return resolve_path(value)


def encoder_flops(config: NezhaConfig, sequence_length: int = 128) -> int:
    """Floating-point operations (2 per multiply-add) of one encoder forward over one sequence: the Q/K/V/output
    projections, the attention scores and context, the FFN. Embeddings, LayerNorm, softmax and the head are left out
    (under 2% of the total for BERT shapes), as in the TinyBERT paper's counts."""
    total = 0
    length = sequence_length
    for layer in range(config.num_layers):
        attention_width = config.heads_of_layer(layer) * config.attention_head_size
        intermediate = config.intermediate_of_layer(layer)
        projections = length * (3 * config.hidden_size * attention_width + attention_width * config.hidden_size)
        attention = 2 * length * length * attention_width  # Q K^T and P V
        ffn = 2 * length * config.hidden_size * intermediate
        total += 2 * (projections + attention + ffn)
    return total


def parameter_count(cell: nn.Cell) -> int:
    from ms_nlp_compress.models.checkpoint import is_run_state

    return int(sum(np.prod(param.shape) for name, param in cell.parameters_and_names() if not is_run_state(name)))


def final_losses(metrics_path: Path) -> Dict[str, float]:
    """The loss and its components in the last `type: train` record of a run's metrics.jsonl."""
    if not metrics_path.is_file():
        return {}
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [record for record in records if record.get("type") == "train"]
    return {key: value for key, value in (train[-1] if train else {}).items()
            if key == "loss" or (key.startswith("loss_") and key != "loss_scale")}


def _tokenizer_dir(tokenizer) -> Optional[Path]:
    return Path(tokenizer.vocab_path).parent if getattr(tokenizer, "vocab_path", None) else None


def teacher_path(config: ExperimentConfig) -> Path:
    """`distill.teacher`, else `pretrained`; an error naming the key when neither is set or the path is absent."""
    key, value = ("distill.teacher", config.distill.teacher) if config.distill.teacher else \
        ("pretrained", config.pretrained)
    if value is None:
        raise ConfigError("distill.teacher: not set (nor `pretrained`): name the teacher's model directory or "
                          "Hugging Face folder")
    path = _resolve(value)
    if not path.exists():
        raise ConfigError(f"{key}: teacher {path} does not exist")
    return path


def stage_config(config: ExperimentConfig, stage: str) -> ExperimentConfig:
    """The experiment config of one stage: `train:` with `distill.<stage>_train` overridden."""
    return dataclasses.replace(config, train=config.distill.stage_train(config.train, stage))


def _describe(cell: nn.Cell, config: NezhaConfig, sequence_length: int = 128) -> Dict:
    return {"parameters": parameter_count(cell), "layers": config.num_layers, "hidden_size": config.hidden_size,
            "num_heads": config.num_heads, "head_dim": config.attention_head_size,
            "intermediate_size": config.intermediate_size,
            f"encoder_flops_seq{sequence_length}": encoder_flops(config, sequence_length)}


# ----------------------------------------------------------------------------------------------------------------
# General distillation
# ----------------------------------------------------------------------------------------------------------------


def load_backbone_teacher(config: ExperimentConfig, path: Path, log: Callable[[str], None]):
    """The pre-trained backbone (any checkpoint form) with hidden states and attention scores out, its config and
    weights (our names, for `student_init: teacher_layers`)."""
    from ms_nlp_compress.compress.distill.student import BackboneOutputs
    from ms_nlp_compress.models.checkpoint import load_checkpoint, read_checkpoint
    from ms_nlp_compress.models.nezha import NezhaModel
    from ms_nlp_compress.train.finetune import model_config_for

    checkpoint = read_checkpoint(path)
    teacher_config = model_config_for(config, path)
    backbone = NezhaModel(teacher_config, add_pooler=False, output_hidden_states=True, output_attentions=True)
    load_checkpoint(backbone, checkpoint, log=log)  # a pooler or heads in the checkpoint are named as unused
    return BackboneOutputs(backbone), teacher_config, checkpoint.mapped.weights


def run_general(config: ExperimentConfig, resume: bool = True, log=print) -> Dict:
    """General distillation over `distill.corpus`; writes `output_dir/student` and `results.json`."""
    from ms_nlp_compress.compress.distill.distiller import prepare
    from ms_nlp_compress.compress.distill.student import build_student
    from ms_nlp_compress.data.streaming import batch_source_from_config
    from ms_nlp_compress.models.checkpoint import save_model_dir
    from ms_nlp_compress.models.frozen import Frozen
    from ms_nlp_compress.train.finetune import load_tokenizer_for
    from ms_nlp_compress.train.trainer import Trainer, start_run

    distill = config.distill
    if distill.corpus is None:
        raise ConfigError("distill.corpus: general distillation needs an unlabeled corpus, one sentence per line "
                          "(e.g. cache:brown/corpus.txt, cache:peoples_daily/corpus.txt)")
    corpus = _resolve(distill.corpus)
    if not corpus.is_file():
        raise ConfigError(f"distill.corpus: {corpus} is not a file")
    teacher_dir = teacher_path(config)
    rank, world_size, output_dir = start_run(config)
    general = distill.intermediate_only()  # general distillation has no task head: no prediction terms
    teacher, teacher_config, teacher_weights = load_backbone_teacher(config, teacher_dir, log)
    student, student_config = build_student(general, teacher_config, None, teacher_weights, resolve=_resolve)
    distiller = prepare(Frozen(teacher), student, general, teacher_config, student_config)
    tokenizer = load_tokenizer_for(config, teacher_dir)
    batches = batch_source_from_config(config, corpus, MODEL_INPUTS, rank, world_size, output_dir,
                                       tokenizer=tokenizer, log=log)
    trainer = Trainer(config, student, distiller, batches, output_dir, rank=rank, world_size=world_size, log=log,
                      checkpoint_cells=distiller.trainable_cells())
    log(f"general distillation: {teacher_dir} ({teacher_config.num_layers} layers, {teacher_config.hidden_size}) -> "
        f"student {student_config.num_layers} layers, {student_config.hidden_size} wide; terms "
        f"{', '.join(distiller.component_names)}; {trainer.updates_total} updates ({len(batches)} batches/epoch, "
        f"batch {config.data.batch_size} x {world_size} rank(s))")
    result = trainer.fit(resume=resume)
    student_dir = output_dir / STUDENT_DIR
    report = {"kind": "general", "teacher": str(teacher_dir), "corpus": str(corpus), "updates": result.updates,
              "train_seconds": result.seconds, "resumed_from": result.resumed_from, "world_size": world_size,
              "final_losses": final_losses(output_dir / "metrics.jsonl"),
              "student": _describe(student.backbone, student_config), "student_dir": str(student_dir),
              "teacher_model": _describe(teacher.backbone, teacher_config)}
    if rank == 0:
        save_model_dir(student.backbone, student_dir, student_config, tokenizer_dir=_tokenizer_dir(tokenizer),
                       meta={"distilled_from": str(teacher_dir), "distillation": "general",
                             "corpus": str(corpus), "max_length": config.data.max_length})
        write_text_atomic(output_dir / "results.json", json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------------------------------------------
# Task distillation
# ----------------------------------------------------------------------------------------------------------------


def load_task_teacher(config: ExperimentConfig, path: Path, task):
    """The fine-tuned classifier (hidden states and attention scores out), its config and weights. A backbone, a
    Hugging Face folder or a classifier with another label count is an error naming `distill.teacher`."""
    from ms_nlp_compress.models.checkpoint import build_model, is_model_dir, load_weights, read_model_dir
    from ms_nlp_compress.train.finetune import model_config_for

    key = "distill.teacher" if config.distill.teacher else "pretrained"
    if not is_model_dir(path):
        raise ConfigError(f"{key}: {path} is not a model directory; task distillation needs a fine-tuned "
                          "classifier (`msnc finetune` writes one to <output_dir>/best)")
    document, _, weights = read_model_dir(path)
    if document.get("architecture") != "NezhaForSequenceClassification":
        raise ConfigError(f"{key}: {path} holds a {document.get('architecture')}, not a fine-tuned "
                          "NezhaForSequenceClassification (use `msnc distill general` for a bare backbone)")
    if document.get("num_labels") != task.num_labels:
        raise ConfigError(f"{key}: {path} has {document.get('num_labels')} outputs but data.task {task.name} has "
                          f"{task.num_labels}")
    if document.get("task") not in (None, task.name):
        raise ConfigError(f"{key}: {path} was fine-tuned on task {document['task']!r} but data.task is "
                          f"{task.name!r}")
    # run-time keys (kernels, dropout implementation) follow this run's config, as in fine-tuning; a model key the
    # config writes that contradicts the teacher's is an error naming it
    teacher_config = model_config_for(config, path)
    teacher = build_model(document["architecture"], teacher_config, document, output_hidden_states=True,
                          output_attentions=True)
    load_weights(teacher, weights, source=str(path), fresh=())
    return teacher, teacher_config, weights


def _stage_finished(stage_dir: Path) -> Optional[Dict]:
    done = stage_dir / STAGE_DONE
    return json.loads(done.read_text(encoding="utf-8")) if done.is_file() else None


def augmented_path(value: Optional[str], key: str) -> Optional[Path]:
    """`<section>.augmented_train` resolved; an error naming `key` when it is given but not a file (checked before
    any work). Shared by `msnc distill task` and `msnc dynabert train`."""
    augmented = _resolve(value)
    if augmented is not None and not augmented.is_file():
        raise ConfigError(f"{key}: {augmented} is not a file (`msnc augment` writes one)")
    return augmented


def stage_source(config: ExperimentConfig, stage: str, augmented_stages, train_columns, augmented: Optional[Path]):
    """(source, its name for the log) of one stage: TinyBERT's augmented TSV (originals included) when given and
    `stage` is in `augmented_stages`, else the tokenized training split."""
    if augmented is not None and stage in augmented_stages:
        return augmented, str(augmented)
    return train_columns, f"{config.data.data_dir} train split ({len(train_columns['input_ids'])} rows)"


def _train_stage(stage: str, config: ExperimentConfig, output_dir: Path, teacher, student, student_config,
                 teacher_config, task, source, source_name: str, tokenizer, rank: int, world_size: int,
                 resume: bool, log, evaluate=None, metric=None, on_best=None) -> Dict:
    """One stage as its own Trainer run in `output_dir/<stage dir>`."""
    from ms_nlp_compress.compress.distill.distiller import prepare
    from ms_nlp_compress.data.streaming import batch_source_from_config
    from ms_nlp_compress.train.trainer import Trainer

    distill = config.distill
    terms = distill.intermediate_only() if stage == "intermediate" else distill.prediction_only()
    stage_dir = output_dir / STAGE_DIRS[stage]
    run_config = stage_config(config, stage)
    distiller = prepare(teacher, student, terms, teacher_config, student_config, regression=task.is_regression)
    order = MODEL_INPUTS + (("label",) if distiller.use_hard_label else ())
    batches = batch_source_from_config(run_config, source, order, rank, world_size, stage_dir, tokenizer=tokenizer,
                                       task=task.name if isinstance(source, Path) else None, log=log)
    trainer = Trainer(run_config, student, distiller, batches, stage_dir, evaluate=evaluate, metric=metric,
                      on_best=on_best, rank=rank, world_size=world_size, log=log,
                      checkpoint_cells=distiller.trainable_cells())
    log(f"stage {stage}: terms {', '.join(distiller.component_names)} on {source_name}; {trainer.updates_total} "
        f"updates ({len(batches)} batches/epoch, batch {run_config.data.batch_size} x {world_size} rank(s), "
        f"lr {run_config.train.learning_rate:g})")
    result = trainer.fit(resume=resume)
    return {"updates": result.updates, "train_seconds": result.seconds, "resumed_from": result.resumed_from,
            "data": source_name, "terms": list(distiller.component_names),
            "learning_rate": run_config.train.learning_rate, "best_update": result.best_step,
            "best_metric": result.best_metric,
            "final_losses": final_losses(stage_dir / "metrics.jsonl")}


def run_task(config: ExperimentConfig, resume: bool = True, log=print) -> Dict:
    """Task distillation, stage 1 then stage 2 (those listed in `distill.stages`); writes `output_dir/best` (the
    best-dev student, a classifier model directory) and `results.json` (dev and test of that student)."""
    from ms_nlp_compress.compress.distill.student import build_student, make_student_cell
    from ms_nlp_compress.data.glue import get_task
    from ms_nlp_compress.models.checkpoint import (cell_weights, load_model_dir, load_weights, read_model_dir,
                                                   read_model_document, save_model_dir)
    from ms_nlp_compress.models.frozen import Frozen
    from ms_nlp_compress.train.finetune import (encode, evaluate_classifier, evaluate_test_split,
                                                load_tokenizer_for, read_split, selection_metric)
    from ms_nlp_compress.train.trainer import start_run

    distill = config.distill
    teacher_dir = teacher_path(config)
    augmented = augmented_path(distill.augmented_train, "distill.augmented_train")
    for stage in distill.stages:  # bad stage overrides fail before any work
        stage_config(config, stage)
    task = get_task(config.data.task)
    rank, world_size, output_dir = start_run(config)
    teacher, teacher_config, teacher_weights = load_task_teacher(config, teacher_dir, task)
    _, train_examples = read_split(config, "train")
    _, dev_examples = read_split(config, "dev")
    teacher = Frozen(teacher)  # one frozen teacher serves both stages
    tokenizer = load_tokenizer_for(config, teacher_dir)
    train_columns = encode(train_examples, tokenizer, config.data.max_length, task.is_regression)
    dev_columns = encode(dev_examples, tokenizer, config.data.max_length, task.is_regression)
    log(f"{task.name}: {len(train_examples)} train / {len(dev_examples)} dev examples; teacher {teacher_dir}")
    tokenizer_dir = _tokenizer_dir(tokenizer)
    meta = {"task": task.name, "labels": list(task.labels) if task.labels else None,
            "max_length": config.data.max_length, "distilled_from": str(teacher_dir)}
    report: Dict = {"kind": "task", "task": task.name, "teacher": str(teacher_dir), "stages": {},
                    "world_size": world_size}
    stage1_dir = output_dir / STAGE_DIRS["intermediate"]
    student_config: Optional[NezhaConfig] = None
    student_weights: Optional[Dict[str, np.ndarray]] = None  # the stage-1 result, for stage 2
    final_dir: Optional[Path] = None

    if "intermediate" in distill.stages:
        done = _stage_finished(stage1_dir)
        if done is not None:
            log(f"stage intermediate: finished earlier ({stage1_dir / STAGE_DONE}), skipped")
            report["stages"]["intermediate"] = dict(done, skipped=True)
        else:
            student, student_config = build_student(distill.intermediate_only(), teacher_config, task.num_labels,
                                                    teacher_weights, resolve=_resolve)
            source, source_name = stage_source(config, "intermediate", distill.augmented_stages,
                                               train_columns, augmented)
            stage_report = _train_stage("intermediate", config, output_dir, teacher, student, student_config,
                                        teacher_config, task, source, source_name, tokenizer, rank, world_size,
                                        resume, log)
            student_weights = cell_weights(student)
            if rank == 0:
                save_model_dir(student, stage1_dir / STUDENT_DIR, student_config, tokenizer_dir=tokenizer_dir,
                               meta=dict(meta, distillation="task stage 1 (intermediate layers)"))
                write_text_atomic(stage1_dir / STAGE_DONE, json.dumps(stage_report, indent=2))
            report["stages"]["intermediate"] = stage_report
        final_dir = stage1_dir / STUDENT_DIR

    if "prediction" in distill.stages:
        stage2_dir = output_dir / STAGE_DIRS["prediction"]
        best_dir = output_dir / BEST_DIR
        done = _stage_finished(stage2_dir)
        if done is not None:
            log(f"stage prediction: finished earlier ({stage2_dir / STAGE_DONE}), skipped")
            report["stages"]["prediction"] = dict(done, skipped=True)
        else:
            if "intermediate" in distill.stages:
                if student_weights is None:  # stage 1 finished in an earlier process
                    _, student_config, student_weights = read_model_dir(stage1_dir / STUDENT_DIR)
                student = make_student_cell(student_config, task.num_labels, False, False)
                load_weights(student, student_weights, source=str(stage1_dir / STUDENT_DIR), fresh=())
            else:
                student, student_config = build_student(distill.prediction_only(), teacher_config,
                                                        task.num_labels, teacher_weights, resolve=_resolve)
            metric = selection_metric(task)

            def on_best(metrics, update):
                save_model_dir(student, best_dir, student_config, tokenizer_dir=tokenizer_dir,
                               meta=dict(meta, distillation="task (best dev after stage 2)", dev_metrics=metrics,
                                         update=update))

            source, source_name = stage_source(config, "prediction", distill.augmented_stages,
                                               train_columns, augmented)
            stage_report = _train_stage(
                "prediction", config, output_dir, teacher, student, student_config, teacher_config, task, source,
                source_name, tokenizer, rank, world_size, resume, log,
                evaluate=lambda: evaluate_classifier(student, dev_columns, task, config.data.eval_batch_size),
                metric=metric, on_best=on_best)
            stage_report["metric"] = metric
            if rank == 0:
                write_text_atomic(stage2_dir / STAGE_DONE, json.dumps(stage_report, indent=2))
            report["stages"]["prediction"] = stage_report
        final_dir = best_dir

    if rank != 0:
        return report
    if final_dir is None or not final_dir.is_dir():
        raise DataError(f"{output_dir}: no student was written (expected {final_dir})")
    final, _ = load_model_dir(final_dir)
    student_config = read_model_document(final_dir)[1]
    report["student_dir"] = str(final_dir)
    report["student"] = _describe(final, student_config)
    report["teacher_model"] = _describe(teacher.cell, teacher_config)
    report["dev"] = evaluate_classifier(final, dev_columns, task, config.data.eval_batch_size)
    report["splits"] = {"train": len(train_examples), "dev": len(dev_examples)}
    test = evaluate_test_split(config, final, tokenizer, task)
    if test is not None:
        report["test"], report["splits"]["test"] = test
    write_text_atomic(output_dir / "results.json", json.dumps(report, indent=2))
    return report

