"""`msnc dynabert importance | train | extract | grid | select`: DynaBERT as runs of the engine's Trainer.

Every command reads one experiment config (`dynabert:`, `data:`, `train:`, `runtime:`) and works in `output_dir`:

    importance  the fine-tuned teacher (`dynabert.teacher_model`, else `pretrained`) scored on a held-out slice of
                the TRAINING rows, rewired, saved as `rewired/` (a model directory: its function is the teacher's)
    train       stage `width` (DynaBERT_W: every width at full depth, the fine-tuned teacher) in `stage1_width/`,
                then stage `width_depth` (DynaBERT: every width x depth, teacher from DynaBERT_W per
                `dynabert.teacher`) in `stage2_width_depth/`; each stage is its own Trainer run (checkpoints,
                metrics.jsonl, kill -9 resumes exactly) and a stage whose `stage.json` exists is skipped.
                The trained elastic model is `dynabert/` (full size, rewired; every sub-network inside).
    extract     one (width, depth) as an ordinary, smaller model directory (msnc eval / predict / export / bench)
    grid        every trained (width, depth) on dev and test through the sliced forward: grid.json and grid.png
    select      extracted candidates timed on this machine; the most accurate within a latency budget

The training rows are all of the (subsampled) training split; importance is computed on `importance_examples` of
them chosen by `held_out_rows` (never dev, which then selects nothing). No final fine-tuning stage is run here.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ms_nlp_compress.atomic import write_text_atomic
from ms_nlp_compress.bench.latency import best_within_budget, forward_latency_ms
from ms_nlp_compress.compress.distill.run import (MODEL_INPUTS, augmented_path, encoder_flops, final_losses,
                                                  stage_source)
from ms_nlp_compress.config import ExperimentConfig
from ms_nlp_compress.errors import ConfigError, DataError

STAGE_DIRS = {"width": "stage1_width", "width_depth": "stage2_width_depth", "final": "stage3_final"}
STAGE_DONE = "stage.json"  # written last by a finished stage: its presence skips the stage on a rerun
REWIRED_DIR = "rewired"  # the importance-ordered teacher, where training starts
MODEL_DIR = "model"  # the model a stage writes inside its directory
FINAL_DIR = "dynabert"  # the trained elastic model (the last stage's)
GRID_FILE = "grid.json"
TRAINED_KEY = "dynabert_trained"  # model-document key: the widths and depths the model was trained at


# ----------------------------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------------------------


def _resolve(value: Optional[str]) -> Optional[Path]:
    from ms_nlp_compress.train.finetune import resolve_path

    return resolve_path(value)


def teacher_path(config: ExperimentConfig) -> Path:
    """`dynabert.teacher_model`, else `pretrained`: a fine-tuned classifier model directory (errors name the key)."""
    from ms_nlp_compress.models.checkpoint import is_model_dir

    key, value = ("dynabert.teacher_model", config.dynabert.teacher_model) if config.dynabert.teacher_model else \
        ("pretrained", config.pretrained)
    if value is None:
        raise ConfigError("dynabert.teacher_model: not set (nor `pretrained`): name the fine-tuned classifier's "
                          "model directory (`msnc finetune` writes <output_dir>/best)")
    path = _resolve(value)
    if not path.exists():
        raise ConfigError(f"{key}: teacher {path} does not exist")
    if not is_model_dir(path):
        raise ConfigError(f"{key}: {path} is not a model directory; DynaBERT needs a fine-tuned classifier")
    return path


def _load_classifier(path: Path, task, key: str, hidden_states: bool = False):
    """(model, its NezhaConfig, document) of a NezhaForSequenceClassification directory for `task`."""
    from ms_nlp_compress.models.checkpoint import load_model_dir, read_model_document

    document, model_config = read_model_document(path)
    if document.get("architecture") != "NezhaForSequenceClassification":
        raise ConfigError(f"{key}: {path} holds a {document.get('architecture')}, not a fine-tuned "
                          "NezhaForSequenceClassification")
    if task is not None and document.get("num_labels") != task.num_labels:
        raise ConfigError(f"{key}: {path} has {document.get('num_labels')} outputs but data.task {task.name} has "
                          f"{task.num_labels}")
    model, document = load_model_dir(path, output_hidden_states=hidden_states)
    return model, model_config, document


def _stage_finished(stage_dir: Path) -> Optional[Dict]:
    done = stage_dir / STAGE_DONE
    return json.loads(done.read_text(encoding="utf-8")) if done.is_file() else None


def _meta(task, config: ExperimentConfig, extra: Dict) -> Dict:
    return dict({"task": task.name, "labels": list(task.labels) if task.labels else None,
                 "max_length": config.data.max_length}, **extra)


def _tokenizer_dir(tokenizer) -> Optional[Path]:
    return Path(tokenizer.vocab_path).parent if getattr(tokenizer, "vocab_path", None) else None


def _columns(config: ExperimentConfig, split: str, tokenizer, task) -> Tuple[Dict[str, np.ndarray], int]:
    from ms_nlp_compress.train.finetune import encode, read_split

    _, examples = read_split(config, split)
    return encode(examples, tokenizer, config.data.max_length, task.is_regression), len(examples)


def _update_timer():
    """(after_update callback, times): wall-clock seconds at every applied update, from the callback's creation."""
    marks: List[float] = [time.perf_counter()]

    def after_update() -> None:
        marks.append(time.perf_counter())

    return after_update, marks


def step_timing(marks: Sequence[float]) -> Dict[str, Optional[float]]:
    """From update timestamps (marks[0] = start): the first update (compiling every sub-network's graph + one
    update), the median steady update, and their difference (the compile time)."""
    gaps = np.diff(np.asarray(marks, np.float64))
    if len(gaps) == 0:
        return {"first_update_seconds": None, "update_seconds": None, "compile_seconds": None}
    steady = float(np.median(gaps[1:])) if len(gaps) > 1 else None
    return {"first_update_seconds": round(float(gaps[0]), 3),
            "update_seconds": None if steady is None else round(steady, 3),
            "compile_seconds": None if steady is None else round(float(gaps[0]) - steady, 3),
            "timed_updates": int(len(gaps))}


# ----------------------------------------------------------------------------------------------------------------
# importance
# ----------------------------------------------------------------------------------------------------------------


def importance_batches(columns: Dict[str, np.ndarray], rows: np.ndarray, batch_size: int):
    """(input_ids, attention_mask, token_type_ids, labels) Tensors over `rows`, in order, the last batch partial."""
    from mindspore import Tensor

    for start in range(0, len(rows), batch_size):
        chosen = rows[start:start + batch_size]
        yield tuple(Tensor(np.ascontiguousarray(columns[name][chosen])) for name in MODEL_INPUTS + ("label",))


def run_importance(config: ExperimentConfig, log=print, started_run: Optional[Tuple[int, int, Path]] = None) -> Dict:
    """Score, rewire and save `output_dir/rewired` (skipped when it exists); returns its report. `started_run`:
    `start_run`'s result when the caller already started the run (runtime, data-parallel group)."""
    from ms_nlp_compress.compress.dynabert.importance import held_out_rows
    from ms_nlp_compress.compress.dynabert.prepare import prepare
    from ms_nlp_compress.data.glue import get_task
    from ms_nlp_compress.models.checkpoint import is_model_dir, save_model_dir
    from ms_nlp_compress.train.finetune import load_tokenizer_for
    from ms_nlp_compress.train.trainer import start_run

    section = config.dynabert
    task = get_task(config.data.task)
    if task.is_regression:
        raise ConfigError(f"data.task: {task.name} is a regression task; `msnc dynabert` trains classifiers")
    teacher_dir = teacher_path(config)
    rank, world_size, output_dir = started_run or start_run(config)
    rewired_dir = output_dir / REWIRED_DIR
    report_path = output_dir / "importance.json"
    if is_model_dir(rewired_dir) and report_path.is_file():
        log(f"importance: {rewired_dir} exists, skipped")
        return dict(json.loads(report_path.read_text(encoding="utf-8")), skipped=True)
    key = "dynabert.teacher_model" if section.teacher_model else "pretrained"
    model, model_config, _ = _load_classifier(teacher_dir, task, key)
    tokenizer = load_tokenizer_for(config, teacher_dir)
    columns, rows = _columns(config, "train", tokenizer, task)
    chosen, _ = held_out_rows(rows, section.importance_examples, config.runtime.seed)
    started = time.perf_counter()
    reduce = None
    if world_size > 1:  # every rank scores the same rows here; the sum over ranks would only scale the scores
        log("importance: data parallel: every rank scores the same held-out rows (identical rewiring)")
    prepared = prepare(model, importance_batches(columns, chosen, section.importance_batch_size), reduce)
    seconds = time.perf_counter() - started
    report = {"teacher": str(teacher_dir), "importance_rows": int(len(chosen)), "train_rows": rows,
              "batches": prepared.importance.batches, "seconds": round(seconds, 3),
              "head_orders": [np.asarray(o).tolist() for o in prepared.head_orders]}
    if rank == 0:
        save_model_dir(model, rewired_dir, model_config, tokenizer_dir=_tokenizer_dir(tokenizer),
                       meta=_meta(task, config, dict(prepared.rewiring_record(), rewired_from=str(teacher_dir))))
        write_text_atomic(report_path, json.dumps(report, indent=2))
    log(f"importance: {len(chosen)} held-out training rows in {prepared.importance.batches} batches, "
        f"{seconds:.1f} s; rewired model in {rewired_dir}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------------


def _train_stage(stage: str, config: ExperimentConfig, output_dir: Path, start_dir: Path, teacher_dir: Path,
                 task, train_columns, tokenizer, rank: int, world_size: int, resume: bool, log) -> Dict:
    """One stage as its own Trainer run in `output_dir/<stage dir>`; writes `<stage dir>/model`."""
    from mindspore import nn

    from ms_nlp_compress.compress.dynabert.elastic import ElasticModel
    from ms_nlp_compress.compress.dynabert.loss import build_loss, stage2_teacher
    from ms_nlp_compress.data.streaming import batch_source_from_config
    from ms_nlp_compress.models.checkpoint import save_model_dir
    from ms_nlp_compress.models.frozen import Frozen
    from ms_nlp_compress.train.trainer import Trainer

    section = config.dynabert.for_stage(stage)
    stage_dir = output_dir / STAGE_DIRS[stage]
    run_config = dataclasses.replace(config, train=section.stage_train(config.train, stage))
    student, student_config, document = _load_classifier(start_dir, task, str(start_dir))
    elastic = ElasticModel(student)
    if stage == "final":  # the optional final fine-tuning: every sub-network on the labels, no teacher
        teacher, teacher_name = None, "none (labels)"
    elif stage == "width":  # DynaBERT_W distils from the fine-tuned model (the rewired one: the same function)
        teacher_model = _load_classifier(teacher_dir, task, str(teacher_dir), hidden_states=True)[0]
        teacher = Frozen(teacher_model)
        teacher_name = str(teacher_dir)
    else:  # DynaBERT distils from the trained DynaBERT_W: full width or the same width (dynabert.teacher)
        teacher_elastic = ElasticModel(_load_classifier(teacher_dir, task, str(teacher_dir))[0])
        chosen = stage2_teacher(teacher_elastic, section)
        teacher = Frozen(chosen) if isinstance(chosen, nn.Cell) else \
            (lambda width, depth, pick=chosen: Frozen(pick(width, depth)))
        teacher_name = f"{teacher_dir} ({section.teacher})"
    loss = build_loss(elastic, section, teacher)
    source, source_name = stage_source(config, stage, section.augmented_stages, train_columns,
                                       _resolve(section.augmented_train))
    order = MODEL_INPUTS + (("label",) if stage == "final" else ())  # the final stage learns from the labels
    batches = batch_source_from_config(run_config, source, order, rank, world_size, stage_dir,
                                       tokenizer=tokenizer, task=task.name if isinstance(source, Path) else None,
                                       log=log)
    after_update, marks = _update_timer()
    trainer = Trainer(run_config, student, loss, batches, stage_dir, rank=rank, world_size=world_size, log=log,
                      checkpoint_cells=loss.trainable_cells(), after_update=after_update)
    log(f"stage {stage}: {len(loss.component_names)} sub-networks ({', '.join(loss.component_names)}), graph "
        f"{section.graph}; teacher {teacher_name}; data {source_name}; {trainer.updates_total} updates "
        f"({len(batches)} batches/epoch, "
        f"batch {run_config.data.batch_size} x {world_size} rank(s), lr {run_config.train.learning_rate:g})")
    marks[0] = time.perf_counter()
    result = trainer.fit(resume=resume)
    timing = step_timing(marks)
    if timing["update_seconds"] is not None:
        log(f"stage {stage}: first update (compiles the {len(loss.component_names)} sub-network graphs) "
            f"{timing['first_update_seconds']:.1f} s, steady update {timing['update_seconds']:.2f} s -> compile "
            f"~{timing['compile_seconds']:.1f} s")
    report = {"updates": result.updates, "train_seconds": result.seconds, "resumed_from": result.resumed_from,
              "subnetworks": list(loss.component_names), "graph": section.graph, "teacher": teacher_name,
              "data": source_name,
              "learning_rate": run_config.train.learning_rate, "timing": timing,
              "final_losses": final_losses(stage_dir / "metrics.jsonl")}
    if rank == 0:
        trained = {"widths": list(section.widths()), "depths": list(section.depths()), "stage": stage}
        save_model_dir(student, stage_dir / MODEL_DIR, student_config, tokenizer_dir=start_dir,
                       meta=dict({k: v for k, v in document.items() if k in ("task", "labels", "max_length",
                                                                               "dynabert_rewiring")},
                                 **{TRAINED_KEY: trained}))
        write_text_atomic(stage_dir / STAGE_DONE, json.dumps(report, indent=2))
    return report


def run_train(config: ExperimentConfig, resume: bool = True, log=print) -> Dict:
    """Importance (when `rewired/` is missing), then the stages of `dynabert.stages`; writes `dynabert/` and
    results.json (per stage: updates, compile time of the sub-network graphs, steady update time, losses)."""
    from ms_nlp_compress.data.glue import get_task
    from ms_nlp_compress.models.checkpoint import load_model_dir, read_model_document, save_model_dir
    from ms_nlp_compress.parallel.barrier import RankBarrier
    from ms_nlp_compress.train.finetune import load_tokenizer_for
    from ms_nlp_compress.train.trainer import start_run

    section = config.dynabert
    for stage in section.stages:  # bad stage overrides fail before any work
        section.stage_train(config.train, stage)
    augmented_path(section.augmented_train, "dynabert.augmented_train")  # a missing file fails before any work
    teacher_dir = teacher_path(config)
    task = get_task(config.data.task)
    rank, world_size, output_dir = start_run(config)
    importance = run_importance(config, log=log, started_run=(rank, world_size, output_dir))
    # Data parallel: rank 0 alone writes rewired/ and each stage's model/, which every rank then loads (and whose
    # STAGE_DONE decides a skip): every rank waits here until rank 0 has written them.
    barrier = RankBarrier(world_size)
    barrier.agree(True)
    tokenizer = load_tokenizer_for(config, teacher_dir)
    train_columns, rows = _columns(config, "train", tokenizer, task)
    report: Dict = {"kind": "dynabert", "task": task.name, "teacher": str(teacher_dir), "train_rows": rows,
                    "world_size": world_size, "importance": {k: v for k, v in importance.items()
                                                             if k != "head_orders"}, "stages": {}}
    start_dir = output_dir / REWIRED_DIR
    stage_teacher = start_dir  # stage 1: the fine-tuned model (rewired: the same function, the same names)
    for stage in section.stages:
        stage_dir = output_dir / STAGE_DIRS[stage]
        done = _stage_finished(stage_dir)
        if done is not None:
            log(f"stage {stage}: finished earlier ({stage_dir / STAGE_DONE}), skipped")
            report["stages"][stage] = dict(done, skipped=True)
        else:
            report["stages"][stage] = _train_stage(stage, config, output_dir, start_dir, stage_teacher, task,
                                                   train_columns, tokenizer, rank, world_size, resume, log)
        barrier.agree(True)
        start_dir = stage_teacher = stage_dir / MODEL_DIR
    final_dir = output_dir / FINAL_DIR
    if rank == 0:
        model, document = load_model_dir(start_dir)
        save_model_dir(model, final_dir, read_model_document(start_dir)[1], tokenizer_dir=start_dir,
                       meta={k: v for k, v in document.items() if k in ("task", "labels", "max_length",
                                                                     "dynabert_rewiring", TRAINED_KEY)})
        report["model_dir"] = str(final_dir)
        write_text_atomic(output_dir / "results.json", json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------------------------------------------
# extract
# ----------------------------------------------------------------------------------------------------------------


def trained_model_dir(config: ExperimentConfig, model: Optional[str] = None) -> Path:
    """`--model`, else `output_dir/dynabert` (what `train` writes); an error naming the path when absent."""
    from ms_nlp_compress.models.checkpoint import is_model_dir

    path = _resolve(model) if model else _resolve(config.output_dir) / FINAL_DIR
    if not is_model_dir(path):
        raise ConfigError(f"{'--model' if model else 'output_dir'}: {path} is not a trained DynaBERT model "
                          "directory (`msnc dynabert train` writes <output_dir>/dynabert)")
    return path


def load_trained(path: Path):
    """(full elastic-trained model, its document, trained widths, trained depths)."""
    model, _, document = _load_classifier(path, None, str(path))
    trained = document.get(TRAINED_KEY) or {}
    return model, document, trained.get("widths"), trained.get("depths")


def extract_to(path: Path, width: float, depth: float, output: Path, log=print) -> Dict:
    """Write the (width, depth) sub-network of the model in `path` as a model directory at `output`."""
    from ms_nlp_compress.compress.dynabert.extract import extract, extraction_record
    from ms_nlp_compress.compress.distill.run import parameter_count
    from ms_nlp_compress.models.checkpoint import save_model_dir

    model, document, widths, depths = load_trained(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smaller, small_config, shape = extract(model, width, depth, widths, depths)
    for warning in caught:
        log(f"warning: {warning.message}")
    meta = {k: v for k, v in document.items() if k in ("task", "labels", "max_length")}
    meta.update(extraction_record(shape), extracted_from=str(path))
    save_model_dir(smaller, output, small_config, meta=meta, tokenizer_dir=path)
    return {"width": shape.width, "depth": shape.depth, "name": shape.name, "model_dir": str(output),
            "layers": list(shape.layers), "heads": list(shape.heads), "intermediate": list(shape.intermediate),
            "parameters": parameter_count(smaller), "encoder_flops_seq128": encoder_flops(small_config, 128),
            "warnings": [str(w.message) for w in caught]}


def run_extract(config: ExperimentConfig, width: float, depth: float, output: Optional[str] = None,
                model: Optional[str] = None, log=print) -> Dict:
    path = trained_model_dir(config, model)
    target = _resolve(output) if output else _resolve(config.output_dir) / "extracted" / f"w{width:g}_d{depth:g}"
    report = extract_to(path, width, depth, target, log=log)
    log(f"extract: {report['name']} -> {target} ({report['parameters']} parameters, layers {report['layers']}, "
        f"heads {report['heads']})")
    return report


# ----------------------------------------------------------------------------------------------------------------
# grid
# ----------------------------------------------------------------------------------------------------------------


def subnetwork_size(model, shape, sequence_length: int) -> Dict:
    """Parameters the extracted model would hold (counted from the sliced weights) and its encoder FLOPs."""
    from ms_nlp_compress.compress.dynabert.extract import subnetwork_weights
    from ms_nlp_compress.compress.dynabert.sizes import subnetwork_config

    weights = subnetwork_weights(model, shape)
    config = subnetwork_config(model.bert.config, shape)
    return {"parameters": int(sum(v.size for v in weights.values())),
            f"encoder_flops_seq{sequence_length}": encoder_flops(config, sequence_length)}


_AXES = (("encoder_flops", "encoder GFLOPs per sequence (128 tokens)", 1e-9), ("parameters", "parameters (M)", 1e-6),
         ("latency_ms", "measured latency per batch (ms)", 1.0), ("model_dir_bytes", "model directory (MB)", 1e-6))


def plot_grid(entries: List[Dict], path: Path, x_key: str, title: str,
              x_of: Optional[Callable[[Dict], float]] = None) -> None:
    """Accuracy vs `x_key` (or `x_of(entry)` when given; `x_key` still names the axis), one line per depth, dev
    (solid) and test (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, scale = next((label, scale) for prefix, label, scale in _AXES if x_key.startswith(prefix))
    x_of = x_of or (lambda e: e[x_key])
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    for depth in sorted({e["depth"] for e in entries}, reverse=True):
        row = sorted((e for e in entries if e["depth"] == depth), key=x_of)
        xs = [x_of(e) * scale for e in row]
        line, = axis.plot(xs, [e["dev"]["acc"] for e in row], "o-", label=f"depth {depth:g} dev")
        if all(e.get("test") for e in row):
            axis.plot(xs, [e["test"]["acc"] for e in row], "s--", color=line.get_color(),
                      label=f"depth {depth:g} test")
        for x, e in zip(xs, row):
            axis.annotate(f"w{e['width']:g}", (x, e["dev"]["acc"]), textcoords="offset points", xytext=(3, 3),
                          fontsize=7)
    axis.set_xlabel(label)
    axis.set_ylabel("accuracy")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def measure_extracted(path: Path, entries: List[Dict], output_dir: Path, batch_sizes: Sequence[int],
                      sequence_length: int, repeat: int, log=print) -> None:
    """Extract every entry's (width, depth) of the model in `path` to `output_dir/extracted/w<W>_d<D>` and add to
    the entry, in place: `model_dir`, `model_dir_bytes` (the directory as copied to a device) and `latency_ms`
    {batch size: median ms of a forward of batch x `sequence_length` on this machine}; then, against the largest
    entry, `speedup` per batch size and `speedup_vs_flops` (measured speedup / FLOPs ratio: 1.0 = the FLOPs saving
    fully realised). Timing is `msnc bench --models`' (`time_interleaved`): every sub-network runs each case in
    every round, the order reversed every other round, so load from other processes hits all of them alike (timed
    one after the other, some models measured here ran up to 1.75x slow on an idle machine)."""
    from ms_nlp_compress.bench.latency import time_interleaved
    from ms_nlp_compress.bench.models import calls_per_repeat, inference_cases
    from ms_nlp_compress.models.checkpoint import directory_bytes, load_model_dir

    engines = {}
    for entry in entries:
        target = output_dir / "extracted" / f"w{entry['width']:g}_d{entry['depth']:g}"
        extract_to(path, entry["width"], entry["depth"], target, log=lambda message: None)
        extracted, _ = load_model_dir(target)
        entry.update(model_dir=str(target), model_dir_bytes=directory_bytes(target), latency_ms={})
        engines[entry["name"]] = inference_cases(extracted, extracted.bert.config.vocab_size, batch_sizes,
                                                 (sequence_length,), seed=0)
    _, cases = time_interleaved(engines, repeat, calls_per_repeat)
    for entry in entries:
        for batch in batch_sizes:
            entry["latency_ms"][str(batch)] = cases[f"infer_b{batch}_s{sequence_length}"][entry["name"]]["median_ms"]
        log(f"grid: {entry['name']} extracted: {entry['model_dir_bytes'] / 1e6:.1f} MB, "
            + ", ".join(f"{ms:.1f} ms at {batch} x {sequence_length}" for batch, ms in entry["latency_ms"].items()))
    full = max(entries, key=lambda e: e["encoder_flops_seq128"])
    for entry in entries:
        entry["speedup"] = {batch: round(full["latency_ms"][batch] / ms, 3) for batch, ms in entry["latency_ms"].items()}
        flops_speedup = full["encoder_flops_seq128"] / entry["encoder_flops_seq128"]
        entry["speedup_vs_flops"] = {batch: round(speed / flops_speedup, 3) for batch, speed in entry["speedup"].items()}


def run_grid(config: ExperimentConfig, model: Optional[str] = None, log=print, measure: bool = False,
             batch_sizes: Sequence[int] = (1, 32), sequence_length: int = 128, repeat: int = 5) -> Dict:
    """Every trained (width, depth) on dev and test through the sliced forward; writes grid.json and grid.png
    (accuracy vs FLOPs) and grid_params.png. With `measure`, also extracts every sub-network and times it on this
    machine (`measure_extracted`), adding grid_latency.png (accuracy vs latency at the largest batch size) and
    grid_size.png (accuracy vs model directory bytes)."""
    from ms_nlp_compress.compress.dynabert.elastic import ElasticModel
    from ms_nlp_compress.data.glue import get_task
    from ms_nlp_compress.train.finetune import evaluate_classifier, evaluate_test_split, load_tokenizer_for
    from ms_nlp_compress.train.trainer import start_run

    path = trained_model_dir(config, model)
    task = get_task(config.data.task)
    _, _, output_dir = start_run(config)
    full, document, widths, depths = load_trained(path)
    if not widths or not depths:
        raise DataError(f"{path}: the model document has no `{TRAINED_KEY}` (not written by `msnc dynabert train`)")
    tokenizer = load_tokenizer_for(config, path)
    dev_columns, dev_rows = _columns(config, "dev", tokenizer, task)
    elastic = ElasticModel(full)
    entries = []
    for depth in sorted(depths, reverse=True):
        for width in sorted(widths, reverse=True):
            shape = elastic.shape(width, depth)
            sub = elastic.subnetwork(width, depth)
            started = time.perf_counter()
            entry = {"width": width, "depth": depth, "name": shape.name, "layers": list(shape.layers),
                     "heads": list(shape.heads), "intermediate": list(shape.intermediate),
                     **subnetwork_size(full, shape, 128),
                     "dev": evaluate_classifier(sub, dev_columns, task, config.data.eval_batch_size)}
            test = evaluate_test_split(config, sub, tokenizer, task)
            entry["test"] = test[0] if test is not None else None
            entry["eval_seconds"] = round(time.perf_counter() - started, 2)
            entries.append(entry)
            log(f"grid: {shape.name}: dev acc {entry['dev']['acc']:.4f}"
                + (f", test acc {entry['test']['acc']:.4f}" if entry["test"] else "")
                + f" ({entry['parameters'] / 1e6:.2f}M parameters, "
                  f"{entry['encoder_flops_seq128'] / 1e9:.3f} GFLOPs at 128)")
    full_flops = max(e["encoder_flops_seq128"] for e in entries)
    for entry in entries:
        entry["flops_ratio"] = round(entry["encoder_flops_seq128"] / full_flops, 4)
    report = {"model_dir": str(path), "task": task.name, "dev_rows": dev_rows, "entries": entries}
    rewired_dir = _resolve(config.output_dir) / REWIRED_DIR
    if model is None and (rewired_dir / "config.json").is_file():  # the fine-tuned teacher's function, same slice
        teacher = _load_classifier(rewired_dir, task, str(rewired_dir))[0]
        test = evaluate_test_split(config, teacher, tokenizer, task)
        report["teacher"] = {"model_dir": str(rewired_dir),
                             "dev": evaluate_classifier(teacher, dev_columns, task, config.data.eval_batch_size),
                             "test": test[0] if test is not None else None}
        log(f"grid: teacher (fine-tuned, rewired): dev acc {report['teacher']['dev']['acc']:.4f}")
    if measure:
        measure_extracted(path, entries, output_dir, batch_sizes, sequence_length, repeat, log)
        report["measured"] = {"batch_sizes": list(batch_sizes), "sequence_length": sequence_length,
                              "repeat": repeat, "threads": config.runtime.cpu_threads}
    write_text_atomic(output_dir / GRID_FILE, json.dumps(report, indent=2))
    plot_grid(entries, output_dir / "grid.png", "encoder_flops_seq128",
              f"DynaBERT on {task.name}: accuracy vs encoder FLOPs")
    plot_grid(entries, output_dir / "grid_params.png", "parameters",
              f"DynaBERT on {task.name}: accuracy vs parameters")
    if measure:
        batch = str(max(batch_sizes))
        plot_grid(entries, output_dir / "grid_latency.png", "latency_ms",
                  f"DynaBERT on {task.name}: accuracy vs latency (batch {batch} x {sequence_length}, this CPU)",
                  x_of=lambda entry: entry["latency_ms"][batch])
        plot_grid(entries, output_dir / "grid_size.png", "model_dir_bytes",
                  f"DynaBERT on {task.name}: accuracy vs model directory size")
    log(f"grid: {len(entries)} sub-networks -> {output_dir / GRID_FILE}, {output_dir / 'grid.png'}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# select
# ----------------------------------------------------------------------------------------------------------------


def choose(candidates: Sequence[Dict], latency_ms: float, metric: str = "acc") -> Optional[Dict]:
    """The most accurate (dev `metric`) candidate whose `latency_ms` is within the budget; ties: the faster one.
    None when no candidate fits."""
    return best_within_budget(candidates, latency_ms, lambda c: c["latency_ms"], lambda c: c["dev"][metric])


def run_select(config: ExperimentConfig, latency_ms: float, batch_size: int, model: Optional[str] = None,
               sequence_length: Optional[int] = None, repeat: int = 5,
               measure: Optional[Callable[[Path, Dict], float]] = None, log=print) -> Dict:
    """Extract every sub-network of grid.json, time it on this machine (or with `measure(model_dir, entry)`), and
    return the most accurate on dev within `latency_ms` per batch of `batch_size`. Writes select.json."""
    from ms_nlp_compress.models.checkpoint import load_model_dir

    if not latency_ms > 0:
        raise ConfigError(f"--latency-ms must be > 0, got {latency_ms}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    path = trained_model_dir(config, model)
    output_dir = _resolve(config.output_dir)
    grid_path = output_dir / GRID_FILE
    if not grid_path.is_file():
        raise DataError(f"{grid_path}: no grid (run `msnc dynabert grid` first: select ranks by its dev accuracy)")
    grid = json.loads(grid_path.read_text(encoding="utf-8"))
    length = sequence_length or config.data.max_length
    candidates = []
    for entry in grid["entries"]:
        target = output_dir / "extracted" / f"w{entry['width']:g}_d{entry['depth']:g}"
        extract_to(path, entry["width"], entry["depth"], target, log=lambda message: None)
        if measure is not None:
            latency = float(measure(target, entry))
        else:
            extracted, document = load_model_dir(target)
            latency = forward_latency_ms(extracted, batch_size, length, extracted.bert.config.vocab_size,
                                         repeat)
        candidates.append(dict(entry, latency_ms=round(latency, 3), model_dir=str(target)))
        log(f"select: {entry['name']}: {latency:.1f} ms per batch of {batch_size} x {length}, dev acc "
            f"{entry['dev']['acc']:.4f}")
    best = choose(candidates, latency_ms)
    report = {"latency_budget_ms": latency_ms, "batch_size": batch_size, "sequence_length": length,
              "candidates": [{k: c[k] for k in ("name", "width", "depth", "latency_ms", "dev", "test", "parameters",
                                                 "model_dir")} for c in candidates],
              "selected": None if best is None else {k: best[k] for k in ("name", "width", "depth", "latency_ms",
                                                                          "dev", "test", "parameters",
                                                                          "model_dir")}}
    write_text_atomic(output_dir / "select.json", json.dumps(report, indent=2))
    if best is None:
        fastest = min(candidates, key=lambda c: c["latency_ms"])
        raise ConfigError(f"--latency-ms {latency_ms}: no sub-network fits; the fastest, {fastest['name']}, takes "
                          f"{fastest['latency_ms']:.1f} ms per batch of {batch_size} x {length}")
    return report
