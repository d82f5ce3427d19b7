"""`msnc bench --models A,B`: saved model directories against each other in one run (a teacher and its student).

    msnc bench --models teacher=runs/vader_sst2_cpu/best,student=runs/tinybert_vader_cpu/best \\
               --batch-sizes 1,32 --seqs 64,128 --repeat 5 --threads 1
    msnc bench --models teacher=...,student=... --distill --train-batch 32 --seqs 64 --repeat 3 --threads 1

Inference: graph-mode logits of each model (`load_model_dir`, the directory's own config) on the same random token
ids, every (batch, sequence) case. Ratios are to the FIRST model (`speedup` = first / this), next to the ratio of
their encoder FLOPs (`compress.distill.run.encoder_flops`), so "speedup vs FLOPs ratio" is read off one run.

`--distill` adds the training steps TinyBERT's task distillation runs, at the same batch and sequence: the first
model's own fine-tune step (`finetune_step`: CE on labels, the teacher's cost when it was fine-tuned), the second
model's labels-only step (`student_finetune_step`), and the two distillation updates of `msnc distill task`
(`distill_intermediate_step`: frozen teacher forward with hidden states and scores, student forward / backward
through the embedding, hidden and attention terms, projection, AdamW; `distill_prediction_step`: the same teacher
forward, the plain classifier student, soft cross-entropy). Every step is the engine's `TrainStep` + `AdamW` with
global-norm clip 1.0, the cells `compress.distill.run` builds (`prepare`, `models.frozen.Frozen`). The models are
copies loaded from the directories: nothing is written back.

Timing is `latency.time_interleaved`: each repeat runs every case on every model back to back, alternating the
order, so load from other processes hits both alike; medians are reported. Nothing here asserts on time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ms_nlp_compress.errors import ConfigError

DISTILL_CASES = ("finetune_step", "student_finetune_step", "distill_intermediate_step", "distill_prediction_step")


def parse_models(text: str) -> List[Tuple[str, Path]]:
    """`name=dir,name=dir` (or bare dirs, named model1, model2, ...) -> [(name, Path)]."""
    models = []
    for index, item in enumerate(part.strip() for part in text.split(",") if part.strip()):
        name, _, path = item.partition("=") if "=" in item else (f"model{index + 1}", "", item)
        if not name or not path:
            raise ConfigError(f"--models: {item!r} is not NAME=DIR")
        models.append((name, Path(path)))
    names = [name for name, _ in models]
    if len(models) < 1 or len(set(names)) != len(names):
        raise ConfigError(f"--models: expected distinct NAME=DIR entries, got {text!r}")
    return models


def _load(name: str, path: Path, **build_kwargs):
    from ms_nlp_compress.models.checkpoint import is_model_dir, load_model_dir, read_model_document

    if not is_model_dir(path):
        raise ConfigError(f"--models {name}: {path} is not a model directory (config.json + model.safetensors)")
    cell, document = load_model_dir(path, **build_kwargs)
    return cell, document, read_model_document(path)[1]


def _check_pair(models: Sequence[Tuple[str, Path]], documents, configs) -> None:
    """Same vocabulary and token types everywhere (the same ids feed every model); classifiers for --distill."""
    first_name, first_path = models[0]
    for (name, path), config in zip(models[1:], configs[1:]):
        for key in ("vocab_size", "type_vocab_size"):
            if getattr(config, key) != getattr(configs[0], key):
                raise ConfigError(f"--models: {key} {getattr(config, key)} of {name} ({path}) differs from "
                                  f"{getattr(configs[0], key)} of {first_name} ({first_path})")


def _inputs(rng, vocab_size: int, batch: int, seq: int):
    from mindspore import Tensor

    ids = rng.integers(1, vocab_size, (batch, seq)).astype(np.int32)
    return ids, (Tensor(ids), Tensor(np.ones_like(ids)), Tensor(np.zeros_like(ids)))


def inference_cases(model, vocab_size: int, batch_sizes: Sequence[int], seqs: Sequence[int],
                    seed: int) -> Dict[str, Callable[[], None]]:
    """`infer_b{B}_s{S}` -> a call of the model's graph on (B, S) ids. The same seed gives every model the same
    ids."""
    rng = np.random.default_rng(seed)
    cases = {}
    model.set_train(False)
    for seq in seqs:
        for batch in batch_sizes:
            ids, inputs = _inputs(rng, vocab_size, batch, seq)

            def infer(inputs=inputs):
                output = model(*inputs)
                return (output[0] if isinstance(output, tuple) else output).asnumpy()
            infer.ids = ids  # what the case feeds, for checks against the model run elsewhere
            cases[f"infer_b{batch}_s{seq}"] = infer
    return cases


def _train_step(loss_cell, weights, learning_rate: float = 2e-5):
    from ms_nlp_compress.train.optim import AdamW
    from ms_nlp_compress.train.step import TrainStep

    optimizer = AdamW(weights, learning_rate=learning_rate, weight_decay=0.01, eps=1e-6)
    step = TrainStep(loss_cell, optimizer, max_grad_norm=1.0)
    step.set_train(True)
    return step


def distill_cells(models: Sequence[Tuple[str, Path]], distill=None):
    """(teacher Frozen cell, teacher config, {case: (loss cell, trainable weights, takes labels)}) for the four
    steps of `--distill`, built as `compress.distill.run.run_task` builds them. `distill` is a DistillConfig
    (default: the tinybert_base terms: every weight 1, shared projection, uniform mapping, temperature 1)."""
    from ms_nlp_compress.compress.distill.config import DistillConfig
    from ms_nlp_compress.compress.distill.distiller import prepare
    from ms_nlp_compress.models.frozen import Frozen
    from ms_nlp_compress.train.losses import SequenceClassificationLoss

    if len(models) != 2:
        raise ConfigError(f"--distill: needs exactly two --models (teacher, student), got {len(models)}")
    (teacher_name, teacher_path), (student_name, student_path) = models
    distill = distill or DistillConfig(student=None)
    from ms_nlp_compress.models.checkpoint import is_model_dir, read_model_document

    for role, (name, path) in (("teacher", models[0]), ("student", models[1])):
        if not is_model_dir(path):
            raise ConfigError(f"--models {name}: {path} is not a model directory (config.json + model.safetensors)")
        document = read_model_document(path)[0]  # the architecture only: no weights read
        if document.get("architecture") != "NezhaForSequenceClassification":
            raise ConfigError(f"--distill: {role} {name} ({path}) holds a {document.get('architecture')}, not a "
                              "fine-tuned NezhaForSequenceClassification")
    teacher_outputs, _, teacher_config = _load(teacher_name, teacher_path, output_hidden_states=True,
                                               output_attentions=True)
    teacher = Frozen(teacher_outputs)
    student_config = read_model_document(student_path)[1]
    cells = {}
    teacher_plain = _load(teacher_name, teacher_path)[0]
    cells["finetune_step"] = (SequenceClassificationLoss(teacher_plain), teacher_plain.trainable_params(), True)
    student_plain = _load(student_name, student_path)[0]
    cells["student_finetune_step"] = (SequenceClassificationLoss(student_plain), student_plain.trainable_params(),
                                      True)
    student_outputs = _load(student_name, student_path, output_hidden_states=True, output_attentions=True)[0]
    stage1 = prepare(teacher, student_outputs, distill.intermediate_only(), teacher_config, student_config)
    cells["distill_intermediate_step"] = (stage1, _weights_of(stage1), False)
    student_stage2 = _load(student_name, student_path)[0]
    stage2 = prepare(teacher, student_stage2, distill.prediction_only(), teacher_config, student_config)
    cells["distill_prediction_step"] = (stage2, _weights_of(stage2), stage2.use_hard_label)
    return teacher, teacher_config, cells


def _weights_of(distiller) -> list:
    """The distiller's trainable weights as the Trainer collects them (student + projection, never the teacher)."""
    weights, seen = [], set()
    for cell in distiller.trainable_cells():
        for param in cell.trainable_params():
            if param.name not in seen:
                seen.add(param.name)
                weights.append(param)
    return weights


def distill_cases(models, batch: int, seq: int, seed: int, distill=None, built=None,
                  learning_rate: float = 2e-5) -> Dict[str, Callable[[], None]]:
    """`{case}_b{batch}_s{seq}` -> one update of each `DISTILL_CASES` step on the same random batch. `built`: the
    result of `distill_cells` when the caller already has it. The learning rate changes no cost, only the values."""
    from mindspore import Tensor

    teacher, teacher_config, cells = built or distill_cells(models, distill)
    rng = np.random.default_rng(seed)
    _, inputs = _inputs(rng, teacher_config.vocab_size, batch, seq)
    labels = Tensor(rng.integers(0, 2, (batch,)).astype(np.int32))
    cases = {}
    for name, (loss_cell, weights, takes_labels) in cells.items():
        step = _train_step(loss_cell, weights, learning_rate)
        step_inputs = inputs + ((labels,) if takes_labels else ())

        def update(step=step, step_inputs=step_inputs):
            return step(*step_inputs)
        update.inputs = step_inputs  # what the step feeds, for checks
        cases[f"{name}_b{batch}_s{seq}"] = update
    return cases


def run_model_benchmark(models: Sequence[Tuple[str, Path]], batch_sizes: Sequence[int] = (1, 32),
                        seqs: Sequence[int] = (128,), repeat: int = 5, threads: Optional[int] = None,
                        fusion: bool = False, distill: bool = False, train_batch: int = 32,
                        infer: bool = True, seed: int = 0,
                        log: Callable[[str], None] = lambda message: None) -> Dict:
    """Time the models of `models` (NAME, DIR) against each other; return a dict (see the module docstring).

    {"settings", "models": {name: {dir, parameters, encoder_flops_seq{S}}}, "first_call_s", "cases": {case:
    {name: summary}}, "speedup": {case: {name: first median / this median}}, "flops_ratio": {seq: {name: first
    FLOPs / this FLOPs}}, "distill": {case: {step: median ms}, ratios to finetune_step}}.
    """
    import mindspore as ms

    from ms_nlp_compress.bench.latency import time_interleaved
    from ms_nlp_compress.compress.distill.run import encoder_flops, parameter_count
    from ms_nlp_compress.config import RuntimeConfig
    from ms_nlp_compress.runtime import setup_runtime

    setup_runtime(RuntimeConfig(device="cpu", mode="graph", cpu_threads=threads, graph_kernel_fusion=fusion,
                                seed=seed))
    loaded = [_load(name, path) for name, path in models]
    _check_pair(models, [document for _, document, _ in loaded], [config for _, _, config in loaded])
    described = {name: {"dir": str(path), "parameters": parameter_count(cell),
                        **{f"encoder_flops_seq{seq}": encoder_flops(config, seq) for seq in seqs}}
                 for (name, path), (cell, _, config) in zip(models, loaded)}
    first = models[0][0]
    result = {"settings": {"batch_sizes": list(batch_sizes), "seqs": list(seqs), "repeat": repeat,
                           "mindspore_threads": threads if threads else "default", "graph_kernel_fusion": fusion,
                           "train_batch": train_batch if distill else None,
                           "device_target": str(ms.get_context("device_target"))},
              "versions": {"mindspore": ms.__version__}, "models": described,
              "flops_ratio": {str(seq): {name: round(described[first][f"encoder_flops_seq{seq}"] /
                                                     info[f"encoder_flops_seq{seq}"], 3)
                                         for name, info in described.items()} for seq in seqs}}
    if infer:
        engines = {}
        for (name, _), (cell, _, config) in zip(models, loaded):
            log(f"building inference cases of {name}")
            engines[name] = inference_cases(cell, config.vocab_size, batch_sizes, seqs, seed)
        first_call, cases = time_interleaved(engines, repeat, calls_per_repeat, log)
        result["first_call_s"] = first_call
        result["cases"] = cases
        result["speedup"] = {case: {name: round(by_model[first]["median_ms"] / by_model[name]["median_ms"], 2)
                                    for name in by_model} for case, by_model in cases.items()}
    if distill:
        steps = {}
        for seq in seqs:
            log(f"building the distillation steps at batch {train_batch}, sequence {seq}")
            steps.update(distill_cases(models, train_batch, seq, seed))
        # one "engine" whose cases are the steps: they are interleaved case by case, each step once per repeat
        first_call, cases = time_interleaved({"steps": steps}, repeat, lambda case: 1, log)
        medians = {case: by_engine["steps"] for case, by_engine in cases.items()}
        ratios = {}
        for seq in seqs:
            reference = medians[f"finetune_step_b{train_batch}_s{seq}"]["median_ms"]
            for case in DISTILL_CASES:
                key = f"{case}_b{train_batch}_s{seq}"
                ratios[key] = round(medians[key]["median_ms"] / reference, 2)
        result["distill"] = {"first_call_s": first_call["steps"], "cases": medians,
                             "ratio_to_finetune_step": ratios}
    return result


def calls_per_repeat(case: str) -> int:
    """Calls per repeat: 10 for small-batch inference (a few ms each), 1 otherwise."""
    batch = int(case.split("_")[1][1:])
    return 10 if batch < 8 else 1


def format_model_table(result: Dict) -> str:
    names = list(result["models"])
    first = names[0]
    lines = []
    if "cases" in result:
        header = ["case"] + [f"{name} ms" for name in names] + [f"speedup {name} vs {first}" for name in names[1:]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for case, by_model in result["cases"].items():
            row = [case] + [f"{by_model[name]['median_ms']:.2f}" for name in names]
            row += [f"{result['speedup'][case][name]:.2f}x" for name in names[1:]]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if "distill" in result:
        lines += ["| step | median ms | min ms | / finetune_step |", "|---|---|---|---|"]
        for case, summary in result["distill"]["cases"].items():
            lines.append(f"| {case} | {summary['median_ms']:.1f} | {summary['min_ms']:.1f} | "
                         f"{result['distill']['ratio_to_finetune_step'][case]:.2f}x |")
        lines.append("")
    flops = "; ".join(f"seq {seq}: " + ", ".join(f"{first}/{name} {ratio:.2f}x" for name, ratio in by_name.items()
                                                 if name != first)
                      for seq, by_name in result["flops_ratio"].items())
    settings = result["settings"]
    lines.append(f"MindSpore {result['versions']['mindspore']} graph mode, threads {settings['mindspore_threads']}, "
                 f"fusion {'on' if settings['graph_kernel_fusion'] else 'off'}; encoder FLOPs ratio {flops}; "
                 + "; ".join(f"{name}: {info['dir']} ({info['parameters'] / 1e6:.2f}M parameters)"
                             for name, info in result["models"].items()))
    return "\n".join(lines)
